"""The two eager routes to every op (maefast/ops/_dispatch.py) — "direct" (autograd.Function around
the op's Python, the default) and "custom_op" (through the dispatcher, what torch.compile sees) —
give the same outputs and gradients, bit for bit, for every backend that runs here."""
import subprocess
import sys

import pytest
import torch

import maefast.ops as ops
from maefast.ops._dispatch import DISPATCH_MODES, eager_dispatch, get_eager_dispatch

IMPLS = ["reference", "triton"]


def _case_tensors(name, device):
    """Fresh leaf inputs for op `name`; returns (fn(*leaves) -> outputs, leaves)."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    if name == "layer_norm":
        return (lambda x, w, b, impl: ops.layer_norm(x, w, b, impl=impl)), [r(2, 5, 16), r(16), r(16)]
    if name == "add_layer_norm":
        return (lambda x, res, w, b, impl: ops.add_layer_norm(x, res, w, b, impl=impl)), \
            [r(2, 5, 16), r(2, 5, 16), r(16), r(16)]
    if name == "bias_gelu":
        return (lambda x, b, impl: ops.bias_gelu(x, b, impl=impl)), [r(2, 5, 32), r(32)]
    if name == "visible_attention":
        return (lambda qkv, impl: ops.visible_attention(qkv, 2, impl=impl)), [r(2, 7, 3 * 2 * 16)]
    ids_keep, ids_restore, mask = ops.random_masking(2, 4, 0.5, seed=3, device=device, impl="reference")
    imgs = r(2, 3, 16, 16)
    if name == "masked_patch_embed":
        return (lambda w, b, pos, impl: ops.masked_patch_embed(imgs, ids_keep, w, b, pos, 8, impl=impl)), \
            [r(16, 3, 8, 8), r(16), r(1, 5, 16)]
    if name == "unshuffle":
        return (lambda x, tok, pos, impl: ops.unshuffle(x, tok, ids_restore, pos, impl=impl)), \
            [r(2, 3, 16), r(1, 1, 16), r(1, 5, 16)]
    if name == "norm_pix_loss_all":
        return (lambda pred, impl: ops.norm_pix_loss(pred, imgs, mask, 8, impl=impl)), [r(2, 4, 192)]
    if name == "norm_pix_loss_masked":
        return (lambda pred, impl: ops.norm_pix_loss(pred, imgs, ids_restore, 8, pred_on="masked", impl=impl)), \
            [r(2, 2, 192)]
    raise KeyError(name)


CASES = ["layer_norm", "add_layer_norm", "bias_gelu", "visible_attention", "masked_patch_embed", "unshuffle",
         "norm_pix_loss_all", "norm_pix_loss_masked"]


def _run(name, impl, mode, device):
    fn, leaves = _case_tensors(name, device)
    leaves = [t.requires_grad_() for t in leaves]
    with eager_dispatch(mode):
        out = fn(*leaves, impl)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        # a fixed, non-trivial upstream gradient for every differentiable output
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum() for o in outs)
        grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], grads, outs[0].grad_fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_direct_and_custom_op_routes_agree(name, impl, device):
    out_d, g_d, fn_d = _run(name, impl, "direct", device)
    out_c, g_c, fn_c = _run(name, impl, "custom_op", device)
    for a, b in zip(out_d + list(g_d), out_c + list(g_c)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and each route really took its path (the loss is the last op of its graph)
    assert type(fn_d).__name__.startswith("maefast_"), type(fn_d).__name__
    assert not type(fn_c).__name__.startswith("maefast_"), type(fn_c).__name__


def test_masking_routes_agree(device):
    with eager_dispatch("direct"):
        a = ops.random_masking(3, 16, 0.75, seed=7, device=device)
    with eager_dispatch("custom_op"):
        b = ops.random_masking(3, 16, 0.75, seed=7, device=device)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_no_grad_needed_builds_no_graph():
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    y = ops.layer_norm(x, w, b, impl="reference")
    assert y.grad_fn is None and not y.requires_grad


def test_eager_dispatch_validates_mode():
    assert get_eager_dispatch() in DISPATCH_MODES
    with pytest.raises(ValueError, match="mode must be one of"):
        with eager_dispatch("fast"):
            pass


def test_env_var_selects_route_and_rejects_typos():
    code = ("import maefast; from maefast.ops._dispatch import get_eager_dispatch as g; "
            "assert maefast.backends()['eager_dispatch'] == g(); print(g())")
    env = {"MAEFAST_EAGER_DISPATCH": "custom_op", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "custom_op", out.stderr
    env["MAEFAST_EAGER_DISPATCH"] = "fast"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "MAEFAST_EAGER_DISPATCH must be one of" in out.stderr
    # a typo is refused where an op is first called, not at import: the CLIs say it in one line (exit 2)
    # and --help still works
    op = "import maefast, torch; maefast.ops.layer_norm(torch.ones(2, 4), torch.ones(4), torch.zeros(4))"
    out = subprocess.run([sys.executable, "-c", op], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "ValueError: MAEFAST_EAGER_DISPATCH must be one of" in out.stderr
    cli = [sys.executable, "-m", "maefast"]
    out = subprocess.run(cli + ["--help"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(cli + ["info"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "invalid 'fast'" in out.stdout, out.stderr
    out = subprocess.run(cli + ["profile", "--model", "tiny", "--steps", "1", "--warmup", "0"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "maefast profile: error: MAEFAST_EAGER_DISPATCH must be one of ('direct', 'custom_op'), got 'fast'"
    ), out.stderr  # refused before any work (the CLIs check it first)


def test_compile_sees_the_custom_op():
    """While dynamo traces, the public function routes to the custom op (one opaque node)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    f = torch.compile(lambda x, w, b: ops.layer_norm(x, w, b, impl="reference"), backend=backend, fullgraph=True)
    torch.testing.assert_close(f(x, w, b), ops.layer_norm(x, w, b, impl="reference"), rtol=0, atol=0)
    assert any("maefast.layer_norm" in s for s in seen), seen


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad", [False, True])
def test_jit_trace_records_the_custom_op(impl, grad):
    """torch.jit.trace of a direct call recorded what the kernel's launcher does with torch (an empty
    output; the kernel writes through a raw pointer the tracer does not see, so the trace replayed
    garbage) or an untraceable Python autograd node: while tracing, every op takes the custom-op route,
    one `maefast::` node that replays the op on the new input."""
    class LN(torch.nn.LayerNorm):  # parameters, not closed-over tensors (the tracer refuses those with grad)
        def forward(self, x):
            return ops.layer_norm(x, self.weight, self.bias, impl=impl)

    fn = LN(16).requires_grad_(grad)
    with eager_dispatch("direct"):
        traced = torch.jit.trace(fn, (torch.randn(3, 16),), check_trace=False)
        x = torch.randn(5, 3, 16)[1]
        assert torch.equal(traced(x), fn(x))
    assert "maefast::layer_norm" in {n.kind() for n in traced.graph.nodes()}


def test_fake_tensors_take_the_custom_op_route():
    """Under FakeTensorMode the public function reaches the op's fake impl (shapes only, no kernel)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
        y = ops.layer_norm(x, w, b, impl="reference")
        qkv = torch.randn(2, 5, 3 * 2 * 16, requires_grad=True)
        o = ops.visible_attention(qkv, 2, impl="reference")
    assert y.shape == (3, 8) and o.shape == (2, 5, 32)
    assert not type(o.grad_fn).__name__.startswith("maefast_")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_second_derivative_raises_on_both_routes(name, impl, device):
    """The backwards treat saved statistics (and the fused loss's residual) as constants: a gradient of a
    gradient would be silently wrong, so create_graph=True raises, on both routes and every backend. Before,
    a gradient penalty (``grad(loss, x, create_graph=True)``, its upstream gradient not requiring grad, then
    ``grad(penalty, x)``) got silently first-order gradients: torch's once_differentiable let it through."""
    for mode in DISPATCH_MODES:
        fn, leaves = _case_tensors(name, device)
        leaves = [t.requires_grad_() for t in leaves]
        with eager_dispatch(mode):
            out = fn(*leaves, impl)
            outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
            loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum()
                       for o in outs)
            with pytest.raises(RuntimeError, match="has no second derivative"):
                torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            torch.autograd.grad(loss, leaves, allow_unused=True)  # first order: fine (the graph was kept)


def test_compile_cache_key_carries_the_ops_fingerprint(tmp_path):
    """torch's FX-graph/AOTAutograd caches do not hash a custom op's fake implementation or backward:
    a graph cached by another maefast would be reused with its old output dtypes (a NaN loss, seen
    when masked_patch_embed's output became fp32 under autocast). maefast's import puts a fingerprint
    of its op sources in `torch.compiler.config.cache_key_tag`, after the user's own tag, once."""
    from maefast.ops._dispatch import ops_fingerprint, tag_compile_caches

    cfg = pytest.importorskip("torch.compiler.config")
    if not hasattr(cfg, "cache_key_tag"):
        pytest.skip("this torch has no cache key tag")
    own = "maefast-ops-" + ops_fingerprint()
    old = cfg.cache_key_tag
    try:
        assert cfg.cache_key_tag.split("+")[-1] == own
        cfg.cache_key_tag = "mine+maefast-ops-0123"  # the user's tag, and one from another maefast
        tag_compile_caches()
        tag_compile_caches()
        assert cfg.cache_key_tag == "mine+" + own
    finally:
        cfg.cache_key_tag = old
    # the fingerprint follows the sources: one changed byte in one file changes it
    for name, text in (("a.py", "x = 1\n"), ("b.py", "y = 2\n"), ("notes.txt", "not code")):
        (tmp_path / name).write_text(text)
    first = ops_fingerprint(str(tmp_path))
    (tmp_path / "notes.txt").write_text("changed, but not a source")
    assert ops_fingerprint(str(tmp_path)) == first
    (tmp_path / "b.py").write_text("y = 3\n")
    assert ops_fingerprint(str(tmp_path)) != first
    assert ops_fingerprint() != first and len(first) == 16
    # no sources to read (a sourceless install, a missing folder): a fingerprint still, never an error
    (tmp_path / "empty").mkdir()
    assert len(ops_fingerprint(str(tmp_path / "empty"))) == 16
    assert len(ops_fingerprint(str(tmp_path / "missing"))) == 16


def test_another_tag_misses_inductors_cache(tmp_path, monkeypatch):
    """The tag is in the key torch computes for a graph: the same graph compiled again hits the FX-graph
    cache, under another maefast's tag it compiles afresh."""
    cfg = pytest.importorskip("torch.compiler.config")
    if not hasattr(cfg, "cache_key_tag"):
        pytest.skip("this torch has no cache key tag")
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    old = cfg.cache_key_tag
    x = torch.randn(8, 8)

    def compiled_once():
        torch._dynamo.reset()
        counters.clear()
        torch.compile(lambda t: (t * 2 + 1).relu().sum(), fullgraph=True)(x)
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    try:
        with inductor_config.patch(fx_graph_cache=True):  # the config's own patch (torch 2.11 broke under monkeypatch)
            assert compiled_once() == (0, 1)
            assert compiled_once() == (1, 0)
            cfg.cache_key_tag = old.replace("maefast-ops-", "maefast-ops-other")
            assert compiled_once() == (0, 1)
    finally:
        cfg.cache_key_tag = old
        torch._dynamo.reset()


def test_env_var_empty_or_unset_is_the_direct_route(monkeypatch):
    """MAEFAST_EAGER_DISPATCH= (set but empty, as `env VAR= cmd` or a CI matrix's blank entry) is the
    default, not a typo; read where the module loads (no subprocess needed to check the rule)."""
    from maefast.ops import _dispatch

    for value, mode in (("", "direct"), ("custom_op", "custom_op"), ("direct", "direct"), ("fast", None)):
        monkeypatch.setenv("MAEFAST_EAGER_DISPATCH", value)
        assert _dispatch._mode_from_env() == mode, value
    monkeypatch.delenv("MAEFAST_EAGER_DISPATCH")
    assert _dispatch._mode_from_env() == "direct"


def test_eager_dispatch_restores_the_route_it_replaced():
    before = get_eager_dispatch()
    other = "custom_op" if before == "direct" else "direct"
    with eager_dispatch(other):
        assert get_eager_dispatch() == other
    assert get_eager_dispatch() == before
    with pytest.raises(KeyError):
        with eager_dispatch(other):
            raise KeyError("raised inside")
    assert get_eager_dispatch() == before
