"""torch.compile of the fast MAE step: maefast's ops stay opaque custom ops, Inductor compiles everything
around them, `fullgraph=True`, and forward + backward equal eager (the tolerance table of maefast.testing).

- Inductor (the default backend) on the CPU, one test per model kind: maefast's own model on the per-op
  reference backend (fp32; bf16 autocast with grad checkpointing and a seed tensor) and on the Triton
  kernels (TRITON_INTERPRET=1 here, fp32), a `maefast.patch`-ed
  official-layout model and a patched transformers ViTMAEForPreTraining. The generated code calls each
  maefast op once per use, while LayerNorm, GELU and the residual adds are Inductor's own fused kernels.
  A second call with new images and a new mask must not recompile.
- Every model kind x fused mode on the crossref backend (AOTAutograd without Inductor's codegen, each
  custom op run for real next to its fake implementation): one graph, fake outputs with the real
  shapes, strides and dtypes (what Inductor relies on), equal to eager.
- Decisions taken while tracing that once failed only under compile, on the CPU.

Inductor compiles a model for tens of seconds on the CPU: each configuration compiles once per module
(module-scoped fixtures shared by the tests that read it).
"""
from __future__ import annotations

import contextlib
import re
from collections import Counter

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import maefast
from maefast.models import MaskedAutoencoderViT
from maefast.ops._backend import choose_impl
from maefast.ops.attention import model_level_impl
from maefast.reference import MaskedAutoencoderViT as ReferenceMAE
from maefast.testing import assert_close, assert_error_ratio
from official_layout import official_class

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)  # L = 16 patches, K = 4 kept, head dims 16
N, L = 3, 16
HAS_CUDA = torch.cuda.is_available()
# the Triton kernels run on the card when there is one, else interpreted on the CPU (tests/conftest.py)
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


# -- models and one training step ---------------------------------------------------------------------

def _own(impl, fused, ckpt):
    return MaskedAutoencoderViT(**TINY, norm_pix_loss=True, impl=impl, fused=fused, grad_checkpointing=ckpt)


def _official(impl, fused, ckpt):
    """The facebookresearch layout written as models_mae.py (no noise argument), patched."""
    model = official_class()(norm_pix_loss=True, **TINY)
    return maefast.patch(model, impl, fused=fused, grad_checkpointing=ckpt)


def _transformers(impl, fused, ckpt):
    pytest.importorskip("transformers")
    from maefast.convert import to_transformers_model

    model = to_transformers_model(ReferenceMAE(**TINY, norm_pix_loss=True), mask_ratio=0.75)
    if ckpt:  # 5.25+ renamed it; the old name warns
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return maefast.patch(model, impl, fused=fused)


BUILD = {"own": _own, "official": _official, "transformers": _transformers}


def _loss(model, kind: str, imgs: torch.Tensor, mask: dict) -> torch.Tensor:
    if kind == "transformers":
        return model(pixel_values=imgs, **mask).loss
    if kind == "plain":  # the official forward's arguments only
        return model(imgs, 0.75, **mask)[0]
    return model(imgs, 0.75, **mask, return_pred=False)[0]


def _inputs(i: int, mask: str, device) -> tuple[torch.Tensor, dict]:
    """Images and the mask argument of call i: noise=, or seed= as a 1-element int64 tensor on the
    device (a device seed on a GPU: what a captured step feeds)."""
    g = torch.Generator().manual_seed(100 + i)
    imgs = torch.randn(N, 3, 32, 32, generator=g).to(device)
    if mask == "noise":
        return imgs, {"noise": torch.rand(N, L, generator=g).to(device)}
    return imgs, {"seed": torch.tensor([7 + i], dtype=torch.int64, device=device)}


def _autocast(amp, device):
    return torch.autocast(torch.device(device).type, dtype=amp) if amp is not None else contextlib.nullcontext()


def _step(model, run, kind, imgs, mask):
    """(loss, {name: grad}) of one forward + backward of `run` (the model or its compiled wrapper)."""
    model.zero_grad(set_to_none=True)
    loss = _loss(run, kind, imgs, mask)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want, dtype, what: str) -> None:
    assert_close(got[0], want[0], dtype, name=f"{what}: loss")
    assert set(got[1]) == set(want[1]) and want[1], f"{what}: parameters with a gradient differ"
    for name, g in want[1].items():
        assert_close(got[1][name], g, dtype, name=f"{what}: grad of {name}")


def _assert_error_ratio(got, want, oracle, dtype, what: str) -> None:
    assert_error_ratio(got[0], want[0], oracle[0], dtype, "forward", name=f"{what}: loss")
    assert set(got[1]) == set(want[1]) == set(oracle[1]) and want[1]
    for name in want[1]:
        assert_error_ratio(got[1][name], want[1][name], oracle[1][name], dtype, "backward",
                           name=f"{what}: grad of {name}")


def _compare(kind, impl="auto", fused=False, ckpt=False, amp=None, mask="noise", device="cpu", backend="inductor"):
    """Eager and `torch.compile(model, fullgraph=True, backend=...)` on two calls with fresh images and
    masks (the second must not recompile). Returns dict(eager, compiled, oracle (eager fp32, with amp),
    code (Inductor's generated code of the first call))."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BUILD[kind](impl, fused, ckpt).to(device).train()
    calls = [_inputs(i, mask, device) for i in range(2)]
    out = {"code": ""}
    if amp is not None:
        out["oracle"] = [_step(model, model, kind, *c) for c in calls]
    with _autocast(amp, device):
        out["eager"] = [_step(model, model, kind, *c) for c in calls]
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        if backend == "inductor":
            first, code = run_and_get_code(_step, model, compiled, kind, *calls[0])
            out["code"] = "\n".join(code)
        else:
            first = _step(model, compiled, kind, *calls[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            out["compiled"] = [first, _step(model, compiled, kind, *calls[1])]
    torch._dynamo.reset()
    return out


def _check(res, what, amp=None) -> None:
    for i in range(2):
        if amp is None:
            _assert_same(res["compiled"][i], res["eager"][i], torch.float32, f"{what}, call {i}")
        else:
            _assert_error_ratio(res["compiled"][i], res["eager"][i], res["oracle"][i], amp, f"{what}, call {i}")


# == 1. Inductor, fullgraph=True: compiled == eager, per model kind ===================================

@pytest.fixture(scope="module")
def own_reference():
    return _compare("own", "auto")  # "auto" on the CPU: every op's reference composition


@pytest.mark.slow
def test_inductor_own_model_reference_backend(own_reference):
    _check(own_reference, "own model, reference ops, fp32")


@pytest.mark.slow
def test_inductor_keeps_maefast_ops_opaque_and_fuses_the_rest(own_reference):
    """fused=False, the configuration meant for Inductor: each maefast op is one extern call per use in
    the generated code (forward and backward), and the LayerNorms, GELUs and residual adds are fused
    kernels Inductor generated itself (no eager fallback for them)."""
    code = own_reference["code"]
    calls = Counter(re.findall(r"torch\.ops\.maefast\.(\w+)\.default\(", code))
    blocks = TINY["depth"] + TINY["decoder_depth"]
    assert calls == {"random_masking": 1, "masked_patch_embed": 1, "masked_patch_embed_backward": 1,
                     "visible_attention": blocks, "visible_attention_backward": blocks, "unshuffle": 1,
                     "unshuffle_backward": 1, "norm_pix_loss": 1, "norm_pix_loss_backward": 1}, calls
    eager_fallback = r"aten\.(native_layer_norm|native_layer_norm_backward|gelu|gelu_backward|add)\.\w+\("
    assert not re.search(eager_fallback, code)
    kernels = set(re.findall(r"\b\w*fused_\w+", code))
    for fused_op in ("add_native_layer_norm", "gelu", "native_layer_norm_backward", "gelu_backward"):
        assert any(fused_op in k for k in kernels), f"no Inductor kernel fuses {fused_op}: {sorted(kernels)}"
    # no host sync in the step: nothing reads a tensor's value on the host
    assert "_local_scalar_dense" not in code and ".item()" not in code


@pytest.mark.slow
def test_inductor_own_model_triton_kernels():
    res = _compare("own", "triton", device=TRITON_DEVICE)
    _check(res, "own model, Triton kernels, fp32")


@pytest.mark.slow
def test_inductor_own_model_bf16_checkpointed_seeded():
    """The training configuration: bf16 autocast, grad checkpointing, the mask from a seed tensor. The
    compiled step's error against the fp32 eager step is within the table's ratio of eager bf16's."""
    res = _compare("own", "auto", ckpt=True, amp=torch.bfloat16, mask="seed")
    _check(res, "own model, bf16 autocast, checkpointed, seed tensor", amp=torch.bfloat16)


@pytest.mark.slow
def test_inductor_patched_official_layout_model():
    _check(_compare("official", "auto"), "patched official-layout model")


@pytest.mark.slow
def test_inductor_patched_transformers_model():
    res = _compare("transformers", "auto", ckpt=True, mask="seed")
    _check(res, "patched transformers ViTMAE, gradient checkpointing, seed tensor")


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, "block"])
def test_inductor_on_the_card(fused):
    """The fast step compiled for the GPU: Triton kernels, bf16 autocast, a device seed, no recompile on
    a new seed, and the error ratio against fp32 eager."""
    res = _compare("own", "auto", fused=fused, amp=torch.bfloat16, mask="seed", device="cuda")
    _check(res, f"own model on the card, fused={fused!r}", amp=torch.bfloat16)


# == 2. every model kind x fused mode: one graph, exact fake implementations, compiled == eager ======

_CROSSREF = [(kind, "auto", fused, variant) for kind in BUILD for fused in (False, "block")
             for variant in ("fp32", "bf16-ckpt-seed")]
_CROSSREF += [("own", "triton", fused, "fp32") for fused in (False, "block")]
_CROSSREF += [("own", "triton", "block", "bf16-ckpt-seed")]  # the card's compiled step: Triton, bf16, the block op


@pytest.mark.parametrize("kind,impl,fused,variant", _CROSSREF)
def test_fullgraph_and_fake_ops_match_real_ops(kind, impl, fused, variant):
    """fullgraph=True (a graph break raises), no recompile on a second call with new inputs, and every
    custom op's fake output metadata (shape, strides, dtype) equal to its real output's (the crossref
    backend raises otherwise): Inductor's layout decisions rest on them."""
    amp = torch.bfloat16 if variant.startswith("bf16") else None
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    res = _compare(kind, impl, fused=fused, ckpt=amp is not None, amp=amp,
                   mask="seed" if amp is not None else "noise", device=device,
                   backend="aot_eager_decomp_partition_crossref")
    what = f"{kind}, impl={impl}, fused={fused!r}, {variant}"
    for i in range(2):
        _assert_same(res["compiled"][i], res["eager"][i], amp or torch.float32, f"{what}, call {i}")


def _reference_model(impl, fused, ckpt):
    """The reference model itself (the torch-native baselines' model), traced op by op."""
    return ReferenceMAE(**TINY, norm_pix_loss=True)


def _own_reference_ops(impl, fused, ckpt):
    """maefast's model with impl="reference": the reference compositions traced, not custom ops (fused set
    after building: given with impl="reference" it is refused, set later the official forward runs)."""
    m = _own("reference", False, ckpt)
    m.fused = fused
    return m


# (model, impl, fused, mask): the mask drawn by the model itself ("own"), from noise= or from a seed tensor
_NEW_BATCH = [(_own, "triton", False, "noise"), (_reference_model, None, False, "own"),
              (_own_reference_ops, None, "block", "own"), (_official, "auto", False, "own"),
              (_transformers, "auto", "block", "seed")]


@pytest.mark.parametrize("build,impl,fused,mask", _NEW_BATCH,
                         ids=["own-triton-noise", "reference-model", "own-impl-reference", "official", "transformers"])
def test_a_new_batch_size_recompiles_once(build, impl, fused, mask):
    """A short last batch compiles the step once more, with a symbolic batch size; no further size
    recompiles (nothing in the forward or the traced backward may specialise the batch). On the Triton
    kernels, the GPU's default (their loss backward once did); the reference model drawing its own noise
    (its torch.rand took no symbolic size before 2026-12-07); patched models through the custom ops."""
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    kind = {_transformers: "transformers", _reference_model: "plain"}.get(build, "own")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(impl, fused, False).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for i, n in enumerate((3, 2, 4)):  # (1 is a size of its own for torch.compile)
        imgs = torch.randn(n, 3, 32, 32, device=device)
        m = {"noise": torch.rand(n, L, device=device)} if mask == "noise" else (
            {"seed": torch.tensor([7 + i], dtype=torch.int64, device=device)} if mask == "seed" else {})
        with torch._dynamo.config.patch(error_on_recompile=i == 2):
            got = _step(model, compiled, kind, imgs, m)
        if mask == "own":  # another draw than eager's: a finite loss and every gradient
            assert torch.isfinite(got[0]) and got[1].keys() == {n for n, p in model.named_parameters()
                                                                 if p.requires_grad}, f"batch {n}"
        else:
            _assert_same(got, _step(model, model, kind, imgs, m), torch.float32, f"batch {n}")
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", sorted(BUILD))
def test_dynamic_true_traces_every_model_kind_as_one_graph(kind):
    """torch.compile(model, dynamic=True, fullgraph=True): sizes and the modules' float attributes are
    symbolic from the first call. A patched transformers model's attention-dropout rates were reduced with
    max(..., default=0.0), for which dynamo has no handler once they are symbolic floats (a graph break,
    so fullgraph=True raised; before 2026-12-07). Compiled == eager at two batch sizes, no recompile."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BUILD[kind]("auto", False, False).train()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for i, n in enumerate((5, 2)):  # (not 3: duck sizing would tie the batch to the channels, which specialise)
        imgs, mask = torch.randn(n, 3, 32, 32), {"noise": torch.rand(n, L)}
        with torch._dynamo.config.patch(error_on_recompile=i == 1):
            got = _step(model, compiled, kind, imgs, mask)
        _assert_same(got, _step(model, model, kind, imgs, mask), torch.float32, f"{kind}, batch {n}")
    torch._dynamo.reset()


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-break", "fullgraph"])
@pytest.mark.parametrize("kind", sorted(BUILD))
def test_a_compiled_model_names_the_images_it_cannot_take(kind, fullgraph):
    """The model-level checks run while torch.compile traces too (before 2026-12-07 they were skipped
    there, and an op reported a wrong image size as its pos_embed's shape, a wrong channel count as the
    patch weight's), as the eager call says them."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BUILD[kind]("auto", False, False)
    compiled = torch.compile(model, fullgraph=fullgraph, backend="eager")
    # (torch 2.11's fullgraph "Observed exception" quotes an f-string's message as its pieces)
    for shape, msg in (((2, 3, 64, 64), r"imgs.{0,40}must be.{0,40}32.{0,40}x.{0,40}32"),
                       ((2, 1, 32, 32), r"imgs.{0,40}must have.{0,40}3.{0,40}channels")):
        for run in (model, compiled):
            with pytest.raises(Exception, match=msg) as info:
                _loss(run, kind, torch.randn(*shape), {"noise": torch.rand(2, L)})
            assert "pos_embed" not in str(info.value) and "weight must" not in str(info.value)
    torch._dynamo.reset()


# == 3. decisions taken while tracing ===================================================================

def test_cuda_attention_choice_traces_without_a_data_pointer():
    """impl="cuda" at the model level takes the CUDA C++ attention where it runs, which includes a
    16-byte alignment check of qkv's data; while torch.compile traces there is no data (FakeTensor)."""
    qkv = torch.randn(2, 50, 3 * 2 * 64, dtype=torch.bfloat16)  # a shape the CUDA C++ kernel takes

    def f(t):
        return t * (1.0 if model_level_impl("cuda", t, 2) == "cuda" else 2.0)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(qkv), f(qkv))


def test_backend_choice_traces_before_the_extension_is_loaded(monkeypatch):
    """Choosing a backend while tracing must not trace the extension's import (torch.compile refuses
    importlib.import_module): the first compiled call of a process may come before any eager one."""
    from maefast import _cpp_lib

    monkeypatch.setattr(_cpp_lib, "_C", None)
    monkeypatch.setattr(_cpp_lib, "load_error", None)
    dev = torch.device("cuda", 0)

    def f(x):
        impl = choose_impl("auto", dev, auto_order=("cuda",), cuda_op="unshuffle_fwd")
        return x + (1.0 if impl == "cuda" else 2.0)

    torch._dynamo.reset()
    x = torch.zeros(1)
    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert torch.equal(got, f(x))


# == 4. opcheck of the ops the other test files do not opcheck =======================================

@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_opcheck_backward_ops_and_triton_forwards(impl):
    """torch.library.opcheck (schema: no input mutated or aliased by an output; fake vs real metadata;
    AOT dispatch) of the backward ops of LayerNorm, bias+GELU, patch embedding and the whole block, and
    of masking and patch embedding on the Triton kernels."""
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    ops = torch.ops.maefast
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    x, ln_w, ln_b = rnd(2, 5, 32), rnd(32), rnd(32)
    _, mean, rstd = ops.layer_norm(x, ln_w, ln_b, 1e-6, None, impl)
    for ds in (None, rnd(2, 5, 32)):
        torch.library.opcheck(ops.layer_norm_backward.default, (rnd(2, 5, 32), ds, x, ln_w, mean, rstd, impl))
    torch.library.opcheck(ops.bias_gelu_backward.default, (rnd(2, 5, 40), rnd(2, 5, 40), rnd(40), impl))

    for noise, seed in ((torch.rand(3, 16, generator=g).to(dev), None), (None, torch.tensor([5]))):
        torch.library.opcheck(ops.random_masking.default, (3, 16, 4, noise, seed, 0, torch.device(dev), impl))
    imgs, w_pe, b_pe, pos = rnd(3, 3, 32, 32), rnd(24, 3, 8, 8), rnd(24), rnd(1, 17, 24)
    ids_keep = ops.random_masking(3, 16, 4, None, torch.tensor([5]), 0, torch.device(dev), impl)[0]
    torch.library.opcheck(ops.masked_patch_embed.default, (imgs, ids_keep, w_pe.requires_grad_(), b_pe, pos, 8, impl))
    for need_pos in (False, True):
        torch.library.opcheck(ops.masked_patch_embed_backward.default,
                              (rnd(3, 4, 24), imgs, ids_keep, w_pe.detach(), pos, 8, need_pos, impl))

    d, hid, heads, scale = 32, 64, 2, 16 ** -0.5
    w = dict(ln1_w=rnd(d), ln1_b=rnd(d), qkv_w=rnd(3 * d, d) * 0.2, qkv_b=rnd(3 * d), proj_w=rnd(d, d) * 0.2,
             proj_b=rnd(d), ln2_w=rnd(d), ln2_b=rnd(d), fc1_w=rnd(hid, d) * 0.2, fc1_b=rnd(hid),
             fc2_w=rnd(d, hid) * 0.2, fc2_b=rnd(d))
    xb = rnd(2, 5, d)
    _, qkv, o, lse, p, a, stats = ops.vit_block(xb, *w.values(), heads, scale, 1e-6, 1e-6, None, impl)
    torch.library.opcheck(ops.vit_block_backward.default,
                          (rnd(2, 5, d), xb, qkv, o, lse, p, a, stats, w["ln1_w"], w["ln1_b"], w["qkv_w"], True,
                           w["proj_w"], w["ln2_w"], w["ln2_b"], w["fc1_w"], w["fc1_b"], w["fc2_w"], heads, scale, None,
                           impl))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_opcheck_transposed_inputs(impl):
    """Fake vs real metadata when the inputs are dense but not contiguous (a transposed activation, noise
    drawn as (L, N).t()): every output is contiguous, as the fake ops say; before, the references kept the
    input's layout and Inductor failed its stride assertion (`torch.compile` of a LayerNorm on x.transpose)."""
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    ops = torch.ops.maefast
    g = torch.Generator().manual_seed(1)

    def t(*shape):  # (a, b, ...) stored as (b, a, ...)
        return torch.randn(shape[1], shape[0], *shape[2:], generator=g).to(dev).transpose(0, 1)

    w, b = t(1, 32)[0], t(1, 32)[0]
    x, r = t(5, 2, 32), t(5, 2, 32)
    torch.library.opcheck(ops.layer_norm.default, (x, w, b, 1e-6, None, impl))
    torch.library.opcheck(ops.add_layer_norm.default, (x, r, w, b, 1e-6, None, impl))
    _, mean, rstd = ops.layer_norm(x, w, b, 1e-6, None, impl)
    for ds in (None, t(5, 2, 32)):
        torch.library.opcheck(ops.layer_norm_backward.default, (t(5, 2, 32), ds, x, w, mean.t().contiguous().t(),
                                                                rstd, impl))
    bias = t(1, 40)[0]
    torch.library.opcheck(ops.bias_gelu.default, (t(5, 2, 40), bias, impl))
    torch.library.opcheck(ops.bias_gelu_backward.default, (t(5, 2, 40), t(5, 2, 40), bias, impl))
    noise = torch.rand(16, 3, generator=g).to(dev).t()
    torch.library.opcheck(ops.random_masking.default, (3, 16, 4, noise, None, 0, torch.device(dev), impl))


def test_compiled_layer_norm_and_masking_of_transposed_inputs():
    """The model-level symptom: Inductor's stride assertion on a transposed input (CPU, reference backend)."""
    from maefast.ops import layer_norm, random_masking

    torch._dynamo.reset()
    x, w, b = torch.randn(5, 2, 32).transpose(0, 1), torch.randn(32), torch.randn(32)
    f = torch.compile(lambda x: layer_norm(x, w, b) * 2, fullgraph=True)
    assert_close(f(x), layer_norm(x, w, b) * 2)
    noise = torch.rand(16, 3).t()
    g = torch.compile(lambda n: random_masking(3, 16, 0.75, noise=n).mask + 1, fullgraph=True)
    assert torch.equal(g(noise), random_masking(3, 16, 0.75, noise=noise).mask + 1)


def test_random_masking_without_device_compiles_fullgraph():
    """The documented default (device=None: torch's default device) under fullgraph: no graph break."""
    from maefast.ops import random_masking

    torch._dynamo.reset()
    f = torch.compile(lambda s: random_masking(2, 16, 0.75, seed=s).ids_keep, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(torch.tensor([7])), random_masking(2, 16, 0.75, seed=torch.tensor([7])).ids_keep)


def test_compiled_model_runs_the_official_forward_for_a_ratio_keeping_no_patch():
    """Under torch.compile the eager validation is skipped, but a ratio keeping no patch must still not
    reach the fast path (before issue 17 the compiled model ran it on 0 visible patches). The official
    code takes such a ratio (the encoder sees the cls token alone): the call runs the official
    computation, compiled or not, as ratio 0 does."""
    import warnings

    from maefast.models import routing

    model = maefast.models.create_model("mae_vit_tiny_test")
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    torch._dynamo.reset()
    c = torch.compile(model, backend="aot_eager")
    c(x, 0.75, noise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", routing.SlowPathWarning)
        got = c(x, 0.99, noise)
        want = model(x, 0.99, noise)
    assert torch.equal(got[2], want[2]) and got[2].sum() == 2 * 16  # every patch removed
    torch.testing.assert_close(got[0], want[0])
    with pytest.raises(ValueError, match=r"mask_ratio must be in the interval \[0, 1\]"):
        c(x, 1.5, noise)


def test_a_model_compiled_before_any_eager_call_compiles_once(monkeypatch):
    """The README's promise (a seed tensor or noise per call: no recompile) also when the first call is a
    compiled one: a per-class cache that the first trace filled failed that trace's guards at the next call."""
    from maefast import _modules

    monkeypatch.setattr(_modules, "_TRUST", {})  # as in a fresh process
    torch._dynamo.reset()
    model = maefast.models.create_model("mae_vit_tiny_test")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    compiled(x, 0.75, seed=torch.tensor([1]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s in (2, 3):
            compiled(x, 0.75, seed=torch.tensor([s]))


def test_a_patched_transformers_model_compiled_first_compiles_once(monkeypatch):
    """A patched transformers ViTMAE whose first call is a compiled one (fresh per-class caches, as in a new
    process) does not recompile at its next calls, nor after another transformers model is patched: what the
    traced forward reads per call is decided at patch time, not in a process-wide cache it would guard on."""
    pytest.importorskip("transformers")
    from maefast import patching
    from maefast.convert import to_transformers_model

    monkeypatch.setattr(patching, "_KNOWN_FORWARD", {})
    torch._dynamo.reset()
    model = _transformers("auto", False, False)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 32, 32)
    compiled(pixel_values=x, noise=torch.rand(2, 16))
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(pixel_values=x, noise=torch.rand(2, 16))
        other = to_transformers_model(ReferenceMAE(**TINY), mask_ratio=0.75)
        other.__class__ = type("MyViTMAE", (type(other),), {})
        maefast.patch(other)
        compiled(pixel_values=x, noise=torch.rand(2, 16))


def test_a_triton_model_compiled_before_any_eager_triton_call_compiles_once(monkeypatch):
    """The first compiled call of a process that had run no Triton op (impl="triton", or "auto" on a GPU):
    the trace read the import probe's cache (`_probe is None`), guarded on it, and filled it, so the next
    call recompiled (before 2026-12-07)."""
    from maefast import _triton

    monkeypatch.setattr(_triton, "_probe", None)  # as in a fresh process
    torch._dynamo.reset()
    model = _own("triton", False, False).to(TRITON_DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 32, 32, device=TRITON_DEVICE)
    compiled(x, 0.75, torch.rand(2, L, device=TRITON_DEVICE))
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x, 0.75, torch.rand(2, L, device=TRITON_DEVICE))
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["own", "official"])
def test_dynamic_true_takes_uint8_images(kind):
    """torch.compile(dynamic=True) traces Python floats as symbolic ones, ImageNet's mean/std of uint8
    images too, and Dynamo has no math.isfinite for those: the pixel statistics' check broke the graph
    (an error under fullgraph=True; before 2026-12-07). Compiled == eager at two batch sizes, one graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BUILD[kind]("auto", False, False).train()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for i, n in enumerate((2, 5)):
        imgs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
        mask = {"noise": torch.rand(n, L)}
        with torch._dynamo.config.patch(error_on_recompile=i == 1):
            got = _step(model, compiled, kind, imgs, mask)
        _assert_same(got, _step(model, model, kind, imgs, mask), torch.float32, f"{kind}, uint8, batch {n}")
    torch._dynamo.reset()


@pytest.mark.parametrize("impl,dynamic", [("auto", True), ("auto", None), ("sdpa", True)],
                         ids=["dynamic", "new-ratio", "sdpa-dynamic"])
def test_grad_checkpointing_compiles_with_symbolic_floats(impl, dynamic):
    """Floats Dynamo traces as symbolic ones (dynamic=True; or torch's default once a second ratio recompiles,
    specialize_float=False) crashed the trace of checkpointed blocks (before 2026-12-07): the mask ratio made
    the kept-patch count K a symbolic expression that checkpointing could not lift ("Source of 'TruncToInt(16.0
    - 16.0*zf..) + 1' is None"), now specialised by random_masking (each ratio compiles once, as it did); and on
    impl="sdpa", sdpa_attention's default dropout_p=0.0 became a symbolic input of the first checkpointed block
    that the second could not lift (a torch bug: "lift_tracked_freevar_to_input should not be called on root
    SubgraphTracer"), now passed explicitly. Compiled == eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _own(impl, False, True).train()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    def step(run, imgs, ratio, noise):
        model.zero_grad(set_to_none=True)
        run(imgs, ratio, noise, return_pred=False)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for ratio in (0.75, 0.5):
        imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, L)
        got, want = step(compiled, imgs, ratio, noise), step(model, imgs, ratio, noise)
        assert got.keys() == want.keys() and want
        for name, g in want.items():
            assert_close(got[name], g, torch.float32, name=f"ratio {ratio}: grad of {name}")
    torch._dynamo.reset()
