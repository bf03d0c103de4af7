"""maefast.ops.vit_block: one pre-norm ViT block as one op (LayerNorm and GELU recomputed in the
backward) against the official Block (maefast.reference.model.Block) — output and every gradient."""
import os

import pytest
import torch

import maefast.ops as ops
from maefast.ops._dispatch import eager_dispatch
from maefast.ops.block import _WEIGHTS
from maefast.reference.model import Block
from maefast.testing import assert_close, assert_error_ratio

NAMES = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
         "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def _block(dim, heads, device="cpu", qkv_bias=True, seed=0):
    torch.manual_seed(seed)
    blk = Block(dim, heads, 4.0, qkv_bias=qkv_bias).to(device)
    with torch.no_grad():  # non-trivial norms and biases, so their gradients are checked for real
        for n, p in blk.named_parameters():
            if n.startswith("norm"):
                p.add_(0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.normal_(std=0.05)
    return blk


def _op(blk, x, impl):
    params = dict(blk.named_parameters())
    return ops.vit_block(x, *[params.get(n) for n in NAMES], num_heads=blk.attn.num_heads, scale=blk.attn.scale,
                         eps1=blk.norm1.eps, eps2=blk.norm2.eps, impl=impl)


def _fwd_bwd(fn, blk, x, dy):
    blk.zero_grad()
    x = x.detach().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad.detach().clone() for n, p in blk.named_parameters()}


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 17, 64, 4), (3, 5, 48, 2)])  # (N, T, D, H): head dims 16 and 24
def test_fp32_equals_official_block(shape, qkv_bias):
    n, t, d, h = shape
    blk = _block(d, h, qkv_bias=qkv_bias)
    x, dy = torch.randn(n, t, d), torch.randn(n, t, d)
    y0, dx0, g0 = _fwd_bwd(blk, blk, x, dy)
    y1, dx1, g1 = _fwd_bwd(lambda x: _op(blk, x, "reference"), blk, x, dy)
    assert_close(y1, y0, name="y")
    assert_close(dx1, dx0, name="dx")
    for name in g0:
        assert_close(g1[name], g0[name], name=name, scale=2.0)
    assert not qkv_bias or g1["attn.qkv.bias"].abs().sum() > 0


def _assert_op_is_the_block(blk, impl):
    """The op on blk's own parameters and settings: the block's output and gradients (fp32, 2 x 9 tokens)."""
    x = torch.randn(2, 9, blk.norm1.normalized_shape[0])
    dy = torch.randn_like(x)
    y0, dx0, g0 = _fwd_bwd(blk, blk, x, dy)
    y1, dx1, g1 = _fwd_bwd(lambda x: _op(blk, x, impl), blk, x, dy)
    assert_close(y1, y0, name="y")
    assert_close(dx1, dx0, name="dx")
    for name in g0:
        assert_close(g1[name], g0[name], name=name, scale=2.0)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_each_layer_norm_keeps_its_own_eps(impl):
    """norm1 and norm2 with different eps (1e-6, 1e-2: 0.5% apart on unit-variance rows): each LayerNorm,
    forward and in the backward's recomputation, uses its own."""
    if impl == "triton":
        _interpreter_or_skip()
    blk = _block(32, 2)
    blk.norm1.eps, blk.norm2.eps = 1e-6, 1e-2
    _assert_op_is_the_block(blk, impl)


def test_eps_zero_is_allowed():
    """eps1 = eps2 = 0 is a valid LayerNorm eps (>= 0, as `ops.layer_norm` takes it): the op runs the block."""
    blk = _block(32, 2)
    blk.norm1.eps, blk.norm2.eps = 0.0, 0.0
    _assert_op_is_the_block(blk, "reference")


def test_a_given_scale_reaches_forward_and_backward():
    """A softmax scale other than the default (0.5, head dim 16's default 0.25): the forward and the
    backward's attention gradient each take it (one falling back to the default passes every test above)."""
    blk = _block(32, 2)
    blk.attn.scale = 0.5  # the official Attention's qk_scale
    _assert_op_is_the_block(blk, "reference")


def test_defaults_are_the_head_dim_scale_and_eps_1e_6():
    """Called without scale and eps the op is the paper's block: scale head dim ** -0.5 (not D ** -0.5)
    and both LayerNorms' eps 1e-6, bit for bit the explicit call (rows of variance ~1e-5, where the eps shows)."""
    blk = _block(32, 2)
    params = [dict(blk.named_parameters()).get(n) for n in NAMES]
    x, dy = 3e-3 * torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    explicit = lambda x: ops.vit_block(x, *params, num_heads=2, scale=16 ** -0.5, eps1=1e-6, eps2=1e-6,  # noqa: E731
                                       impl="reference")
    y0, dx0, g0 = _fwd_bwd(explicit, blk, x, dy)
    y1, dx1, g1 = _fwd_bwd(lambda x: ops.vit_block(x, *params, num_heads=2, impl="reference"), blk, x, dy)
    assert torch.equal(y1, y0) and torch.equal(dx1, dx0) and all(torch.equal(g1[n], g0[n]) for n in g0)


def _check_autocast(blk, x, dy, impl, dtype):
    """Under autocast the op's error vs the fp32 oracle is within the rule's multiple of the official's."""
    y32, dx32, g32 = _fwd_bwd(blk, blk, x, dy)
    with torch.autocast(x.device.type, dtype=dtype):
        yr, dxr, gr = _fwd_bwd(blk, blk, x, dy)
        y1, dx1, g1 = _fwd_bwd(lambda x: _op(blk, x, impl), blk, x, dy)
    assert y1.dtype == torch.float32 and dx1.dtype == torch.float32  # the fp32 residual stream stays fp32
    assert_error_ratio(y1, yr, y32, dtype, "forward", "y")
    assert_error_ratio(dx1, dxr, dx32, dtype, "backward", "dx")
    for name in NAMES:
        assert g1[name].dtype == torch.float32
        assert_error_ratio(g1[name], gr[name], g32[name], dtype, "backward", name)


def _interpreter_or_skip():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU run of the Triton kernels needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_within_error_ratio(dtype):
    _check_autocast(_block(64, 4), torch.randn(2, 17, 64), torch.randn(2, 17, 64), "reference", dtype)


def test_triton_interpreter_equals_official():
    _interpreter_or_skip()
    blk = _block(32, 2)
    x, dy = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    y0, dx0, g0 = _fwd_bwd(blk, blk, x, dy)
    y1, dx1, g1 = _fwd_bwd(lambda x: _op(blk, x, "triton"), blk, x, dy)
    assert_close(y1, y0, name="y", scale=10.0)
    assert_close(dx1, dx0, name="dx", scale=10.0)
    for name in g0:
        assert_close(g1[name], g0[name], name=name, scale=10.0)


def test_routes_agree_and_one_node_per_block():
    blk = _block(64, 4)
    x, dy = torch.randn(2, 17, 64), torch.randn(2, 17, 64)
    with eager_dispatch("custom_op"):
        yc, dxc, gc = _fwd_bwd(lambda x: _op(blk, x, "reference"), blk, x, dy)
    yd, dxd, gd = _fwd_bwd(lambda x: _op(blk, x, "reference"), blk, x, dy)
    assert torch.equal(yc, yd) and torch.equal(dxc, dxd) and all(torch.equal(gc[n], gd[n]) for n in gc)
    y = _op(blk, x.requires_grad_(), "reference")
    assert type(y.grad_fn).__name__ == "maefast_vit_blockBackward"


@pytest.mark.parametrize("autocast", [False, True])
def test_saves_only_x_qkv_out_lse_p_a_stats(autocast):
    """What the op keeps for backward (besides the parameters): x, qkv, attention out, lse, the
    attention projection p, a and the two LayerNorms' statistics — the LayerNorm outputs, the mid-block
    residual s = x + p and the GELU output are formed again by the backward kernels. Under bf16
    autocast x (the fp32 stream), lse and the statistics are fp32 and the rest bf16: p instead of s is
    what makes the block keep 2 bytes less per token and width unit."""
    n, t, d, h = 2, 17, 64, 4
    blk = _block(d, h)
    params = {p.untyped_storage().data_ptr() for p in blk.parameters()}
    saved = {}

    def pack(tensor):
        st = tensor.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = (st.nbytes(), tensor.dtype)
        return tensor

    x = torch.randn(n, t, d, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _op(blk, x, "reference")
    f32, c, rows = 4, (2 if autocast else 4), n * t
    expected = (rows * d * f32 + rows * 3 * d * c + rows * d * c + n * h * t * f32 + rows * d * c + rows * 4 * d * c
                + 4 * rows * f32)
    assert sum(b for b, _ in saved.values()) == expected, (saved, expected)
    if autocast:
        assert sorted(str(dt) for _, dt in saved.values()) == ["torch.bfloat16"] * 4 + ["torch.float32"] * 3


def test_backward_runs_no_forward_kernel(monkeypatch):
    """The backward forms the LayerNorm and GELU outputs in its gradient kernels' pass: no LayerNorm or
    bias+GELU forward kernel launches between the forward and the end of the backward (a recompute
    brought back would cost a second read of the fp32 stream and of fc1's output)."""
    _interpreter_or_skip()
    import maefast.kernels.bias_gelu as kbg
    import maefast.kernels.layernorm as kln

    launches = []
    for mod, name in ((kln, "add_layer_norm_fwd"), (kbg, "bias_gelu_fwd")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: launches.append(_name) or _real(*a, **k))
    blk = _block(32, 2)
    x = torch.randn(2, 9, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        y = _op(blk, x, "triton")
    assert sorted(launches) == ["add_layer_norm_fwd", "add_layer_norm_fwd", "bias_gelu_fwd"], launches
    y.backward(torch.randn_like(y))
    assert len(launches) == 3, launches
    assert x.grad is not None and all(p.grad is not None for p in blk.parameters())


@pytest.mark.parametrize("route", ["direct", "custom_op"])
def test_backward_fills_no_zero_grads_for_saved_outputs(route):
    """qkv, o, lse, p, a and the statistics are outputs only to be saved: the backward must not be handed (and so
    allocate and fill) zero gradients for them — nor the inner LayerNorm/attention ops for their
    statistics. Counted at the dispatcher: no zeros-like op runs during the block's backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.zero_fills = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("zeros", "zeros_like", "new_zeros", "zero_", "fill_", "full", "full_like", "new_full"):
                self.zero_fills.append(name)
            return func(*args, **(kwargs or {}))

    blk = _block(64, 4)
    x = torch.randn(2, 17, 64, requires_grad=True)
    with eager_dispatch(route):
        y = _op(blk, x, "reference")
        with Count() as c:
            y.backward(torch.randn_like(y))
    assert c.zero_fills == [], c.zero_fills
    assert x.grad is not None and all(p.grad is not None for p in blk.parameters())


@pytest.mark.parametrize("route", ["direct", "custom_op"])
def test_no_gradient_reaching_y_gives_zero_gradients(route):
    """A downstream backward that hands y no gradient (None: grads are not materialised): the block's backward
    runs on zeros, x keeps its other path's gradient alone and every weight gets a zero one."""
    class NoGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    blk = _block(32, 2)
    x = torch.randn(2, 5, 32, requires_grad=True)
    with eager_dispatch(route):
        y = _op(blk, x, "reference")
    (NoGrad.apply(y).sum() + 2 * x.sum()).backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    for name, p in blk.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_bad_inputs():
    blk = _block(64, 4)
    params = [dict(blk.named_parameters()).get(n) for n in NAMES]
    x = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match="qkv_w must have shape"):
        ops.vit_block(x, params[0], params[1], params[2][:96], *params[3:], num_heads=4)
    with pytest.raises(ValueError, match="num_heads must be a positive int dividing"):
        ops.vit_block(x, *params, num_heads=5)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        ops.vit_block(x[0], *params, num_heads=4)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.vit_block(x.double(), *params, num_heads=4)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.vit_block(x, *params, num_heads=4, impl="fast")
    for bad in (None, [x]):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            ops.vit_block(bad, *params, num_heads=4)
    with pytest.raises(TypeError, match="fc1_w must be a torch.Tensor"):
        ops.vit_block(x, *params[:8], None, *params[9:], num_heads=4)
    for name in ("eps1", "eps2"):
        for bad in (-1.0, float("nan"), "a"):
            with pytest.raises(ValueError, match=f"{name} must be a float >= 0"):
                ops.vit_block(x, *params, num_heads=4, **{name: bad})
    with pytest.raises(TypeError, match="scale must be a float or None"):
        ops.vit_block(x, *params, num_heads=4, scale="a")
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.vit_block(x, *params, num_heads=4, scale=float("nan"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, maefast.ops as ops; from maefast.reference.model import Block\n"
            "b = Block(64, 4, qkv_bias=True); x = torch.randn(2, 5, 64)\n"
            "try:\n    ops.vit_block(x, *b.parameters(), num_heads=4, impl='triton')\n"
            "except ValueError as e:\n    print(e)")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "impl='triton' is not available for maefast.ops.vit_block" in out.stdout, out.stdout + out.stderr[-2000:]


def test_bad_arguments_name_themselves():
    """Each refusal names its argument: head counts that are no positive int (0 divided D by zero, True ran one
    head), a bool scale, a missing weight other than qkv_b, a weight on another device than x."""
    blk = _block(32, 2)
    params = [dict(blk.named_parameters()).get(n) for n in NAMES]
    x = torch.randn(2, 5, 32)
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="num_heads"):
            ops.vit_block(x, *params, num_heads=bad)
    with pytest.raises(TypeError, match="scale"):
        ops.vit_block(x, *params, num_heads=2, scale=True)
    for i, name in enumerate(NAMES):
        if name != "attn.qkv.bias":
            with pytest.raises(TypeError, match=_WEIGHTS[i]):
                ops.vit_block(x, *params[:i], None, *params[i + 1:], num_heads=2)
        with pytest.raises(ValueError, match=f"{_WEIGHTS[i]} must be on cpu"):
            ops.vit_block(x, *params[:i], params[i].to("meta"), *params[i + 1:], num_heads=2)


def test_opcheck():
    blk = _block(32, 2)
    params = [dict(blk.named_parameters()).get(n) for n in NAMES]
    x = torch.randn(2, 5, 32, requires_grad=True)
    args = (x, *params, 2, 16 ** -0.5, 1e-6, 1e-6, None, "reference")
    torch.library.opcheck(torch.ops.maefast.vit_block.default, args)


def test_fake_output_dtypes_for_a_half_stream_under_the_other_half_autocast():
    """An fp16 stream under bf16 autocast: y is their promotion (fp32), and the fake op (what torch.compile
    plans its buffers by) must say so, not x's dtype."""
    blk = _block(32, 2)
    params = [dict(blk.named_parameters()).get(n) for n in NAMES]
    x = torch.randn(2, 5, 32, dtype=torch.float16, requires_grad=True)
    args = (x, *params, 2, 16 ** -0.5, 1e-6, 1e-6, torch.bfloat16, "reference")
    assert torch.ops.maefast.vit_block.default(*args)[0].dtype == torch.float32
    torch.library.opcheck(torch.ops.maefast.vit_block.default, args, test_utils=("test_faketensor",))


def test_backward_fake_outputs_without_qkv_bias():
    """qkv_bias=False (a timm block's default): the backward's qkv-bias gradient is empty, fake and real
    alike (test_compile's opcheck of the backward op has a bias)."""
    blk = _block(32, 2, qkv_bias=False)
    p = dict(blk.named_parameters())
    x = torch.randn(2, 5, 32)
    w = [p.get(n) for n in NAMES]
    _, qkv, o, lse, pp, a, stats = torch.ops.maefast.vit_block(x, *w, 2, 16 ** -0.5, 1e-6, 1e-6, None, "reference")
    args = (torch.randn(2, 5, 32), x, qkv, o, lse, pp, a, stats, w[0], w[1], w[2], False, w[4], w[6], w[7], w[8],
            w[9], w[10], 2, 16 ** -0.5, None, "reference")
    assert torch.ops.maefast.vit_block_backward(*args)[4].shape == (0,)
    torch.library.opcheck(torch.ops.maefast.vit_block_backward.default, args, test_utils=("test_faketensor",))


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["auto", "cuda"])
@pytest.mark.parametrize("shape", [(16, 50, 1024, 16), (8, 65, 1280, 16), (8, 197, 512, 16)])
def test_gpu_block_bf16_within_error_ratio(shape, impl):
    n, t, d, h = shape
    blk = _block(d, h, device="cuda")
    x, dy = torch.randn(n, t, d, device="cuda"), torch.randn(n, t, d, device="cuda")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 oracle
    try:
        _check_autocast(blk, x, dy, impl, torch.bfloat16)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 9, 32, 2), (1, 65, 160, 2)], ids=["small", "vit_h_heads"])  # (N, T, D, H)
def test_triton_interpreter_autocast_within_error_ratio(dtype, shape):
    """The Triton path under fp16 and bf16 autocast (the training step's dtype; the interpreter's bf16
    dots and roundings patched to a GPU's: tests/triton_bf16.py); also at ViT-H's 65 tokens and head dim 80."""
    _interpreter_or_skip()
    n, t, d, h = shape
    _check_autocast(_block(d, h), torch.randn(n, t, d), torch.randn(n, t, d), "triton", dtype)


def test_cuda_impl_falls_back_in_forward_and_backward_alike():
    """Inside the op, impl="cuda" where the CUDA C++ attention cannot run (a shape or dtype it does not
    take; here the CPU) picks the same fallback in the backward as in the forward. The public function
    first checks that the CUDA C++ kernels can run at all, as every op does."""
    torch.manual_seed(0)
    b = _block(32, 2)
    p = [dict(b.named_parameters())[n] for n in NAMES]
    x = torch.randn(2, 5, 32, requires_grad=True)
    with pytest.raises(ValueError, match="impl='cuda' is not available for maefast.ops.vit_block"):
        ops.vit_block(x, *p, num_heads=2, impl="cuda")
    y = torch.ops.maefast.vit_block.default(x, *p, 2, 16 ** -0.5, b.norm1.eps, b.norm2.eps, None, "cuda")[0]
    y.sum().backward()
    x2 = x.detach().requires_grad_()
    b(x2).sum().backward()
    assert_close(x.grad, x2.grad, torch.float32, name="dx")
