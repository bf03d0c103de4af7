"""Fused residual-add + LayerNorm and bias + exact GELU (maefast.ops.add_layer_norm / layer_norm /
bias_gelu; the building blocks of `maefast.ops.vit_block`) against PyTorch (F.layer_norm, F.gelu), with the
error-ratio rule against an fp64 oracle. On a CPU-only machine the Triton impl runs interpreted on
small row counts at the real widths; `cuda` tests take the paper's sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maefast.ops.bias_gelu import bias_gelu
from maefast.ops.layernorm import add_layer_norm, layer_norm
from maefast.testing import DTYPES, assert_close, assert_error_ratio, randn

EPS = 1e-6
WIDTHS = [512, 768, 1024, 1280, 333]  # decoder, ViT-B, L, H; an odd width (masked tail)


def _ln_inputs(shape, dtype, device, param_dtype=None, residual=True, r_dtype=None):
    d = shape[-1]
    param_dtype = param_dtype or dtype
    x = randn(*shape, dtype=dtype, device=device)
    r = randn(*shape, dtype=r_dtype or dtype, device=device) if residual else None
    w = (1 + 0.5 * torch.randn(d, device=device)).to(param_dtype)
    b = (0.5 * torch.randn(d, device=device)).to(param_dtype)
    return x, r, w, b


def _ln_run(fn, x, r, w, b, gy, gs, dtype=None):
    """Runs fn(x, r, w, b) -> (y, s) at `dtype` (default: inputs' own) and returns
    (y, s, [grads of x, r?, w, b]) for the upstream grads gy (of y) and gs (of s)."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    leaves = [cast(t).detach().requires_grad_(True) for t in (x, r, w, b) if t is not None]
    if r is None:
        xx, ww, bb = leaves
        rr = None
    else:
        xx, rr, ww, bb = leaves
    y, s = fn(xx, rr, ww, bb)
    outs, grads = [y], [cast(gy)]
    if rr is not None:
        outs.append(s)
        grads.append(cast(gs))
    gr = torch.autograd.grad(outs, leaves, grads)
    return y.detach(), s.detach(), list(gr)


def _torch_ln(x, r, w, b):
    s = x if r is None else x + r
    return F.layer_norm(s, (s.shape[-1],), w, b, EPS), s


def _check_sum(s, s_ref):
    """s = x + r equals PyTorch's add exactly (under the interpreter too: tests/triton_bf16.py rounds its
    fp32 -> bf16 casts to nearest even, as a GPU does)."""
    assert torch.equal(s, s_ref), "s = x + r must equal PyTorch's add exactly"


def _check_ln(x, r, w, b, impl, dtype):
    gy = randn(*x.shape, dtype=x.dtype, device=x.device)
    gs = randn(*x.shape, dtype=x.dtype, device=x.device)
    fused = lambda x_, r_, w_, b_: add_layer_norm(x_, r_, w_, b_, EPS, impl=impl)  # noqa: E731
    y, s, g = _ln_run(fused, x, r, w, b, gy, gs)
    y_ref, s_ref, g_ref = _ln_run(_torch_ln, x, r, w, b, gy, gs)
    y_or, _, g_or = _ln_run(_torch_ln, x, r, w, b, gy, gs, dtype=torch.float64)
    assert y.dtype == y_ref.dtype and s.dtype == s_ref.dtype
    _check_sum(s, s_ref)
    assert_error_ratio(y, y_ref, y_or, dtype, "forward", name="y")
    names = ["dx", "dr", "dweight", "dbias"] if r is not None else ["dx", "dweight", "dbias"]
    for name, a, e, o in zip(names, g, g_ref, g_or):
        assert a.dtype == e.dtype, name
        assert_error_ratio(a, e, o, dtype, "backward", name=name)


# -- add_layer_norm / layer_norm: Triton (interpreted on CPU) and reference ---------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("residual", [True, False])
def test_add_layer_norm_triton(device, dtype, width, residual):
    x, r, w, b = _ln_inputs((2, 7, width), dtype, device, residual=residual)
    _check_ln(x, r, w, b, "triton", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm_reference_impl(dtype):
    x, r, w, b = _ln_inputs((3, 5, 384), dtype, "cpu")
    _check_ln(x, r, w, b, "reference", dtype)
    x, r, w, b = _ln_inputs((3, 5, 384), dtype, "cpu", residual=False)
    _check_ln(x, r, w, b, "reference", dtype)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_mixed_dtypes(device, impl):
    # fp32 residual stream + bf16 branch output + fp32 parameters (autocast training): s is fp32.
    x, r, w, b = _ln_inputs((3, 11, 768), torch.float32, device, r_dtype=torch.bfloat16)
    (y, s), (y_ref, s_ref) = add_layer_norm(x, r, w, b, impl=impl), _torch_ln(x, r.float(), w, b)
    assert s.dtype == torch.float32 and y.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert_close(y, y_ref, name="y")
    # bf16 activations with fp32 parameters; y written in bf16 from an fp32 stream (out_dtype).
    xb, rb, w32, b32 = _ln_inputs((3, 11, 768), torch.bfloat16, device, param_dtype=torch.float32)
    xb.requires_grad_(True)
    rb.requires_grad_(True)
    w32.requires_grad_(True)
    y, s = add_layer_norm(xb, rb, w32, b32, impl=impl)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y.float().square().sum(), (xb, w32))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    y16, _ = add_layer_norm(x, r, w, b, impl=impl, out_dtype=torch.bfloat16)
    assert y16.dtype == torch.bfloat16
    assert_close(y16.float(), y_ref.bfloat16().float(), dtype=torch.bfloat16, name="y out_dtype")


def test_triton_matches_reference_impl_and_is_deterministic(device):
    # Many rows per program in the backward (the row loop and its tail); D not a power of two.
    x, r, w, b = _ln_inputs((3, 67, 96), torch.float32, device)
    gy, gs = randn(*x.shape, device=device), randn(*x.shape, device=device)
    runs = []
    for impl in ("triton", "triton", "reference"):
        f = lambda x_, r_, w_, b_, impl=impl: add_layer_norm(x_, r_, w_, b_, impl=impl)  # noqa: E731
        runs.append(_ln_run(f, x, r, w, b, gy, gs))
    (y1, s1, g1), (y2, s2, g2), (y3, s3, g3) = runs
    assert torch.equal(y1, y2) and all(torch.equal(a, c) for a, c in zip(g1, g2)), "not deterministic"
    assert_close(y1, y3, name="y")
    for name, a, c in zip(["dx", "dr", "dweight", "dbias"], g1, g3):
        assert_close(a, c, name=name, scale=10.0)  # sums over 201 rows in another order


def test_non_contiguous_inputs(device):
    m, d = 13, 320
    x = randn(d, m, device=device).t()               # (M, D) with stride (1, M)
    r = randn(m, 2 * d, device=device)[:, ::2]       # stride (2D, 2)
    w, b = randn(d, device=device) + 1, randn(d, device=device)
    for impl in ("triton", "reference"):
        y, s = add_layer_norm(x, r, w, b, impl=impl)
        y_ref, s_ref = _torch_ln(x, r, w, b)
        assert torch.equal(s, s_ref)
        assert_close(y, y_ref, name=f"y {impl}")
        # A broadcast upstream gradient (stride 0), as from y.sum().backward().
        xx = x.detach().requires_grad_(True)
        (gx,) = torch.autograd.grad(add_layer_norm(xx, None, w, b, impl=impl)[0].sum(), xx)
        xr = x.detach().requires_grad_(True)
        (gr,) = torch.autograd.grad(_torch_ln(xr, None, w, b)[0].sum(), xr)
        assert_close(gx, gr, name=f"dx {impl}", scale=10.0)


def test_layer_norm_alias_and_edge_widths(device):
    x, _, w, b = _ln_inputs((4, 1), torch.float32, device, residual=False)
    assert_close(layer_norm(x, w, b, impl="triton"), F.layer_norm(x, (1,), w, b, EPS), name="D=1")
    x, r, w, b = _ln_inputs((5, 3), torch.float32, device)
    y, x_back = add_layer_norm(x, None, w, b, impl="triton")
    assert x_back is x
    assert_close(y, F.layer_norm(x, (3,), w, b, EPS), name="D=3")
    empty = torch.empty(0, 8, device=device)
    w8, b8 = randn(8, device=device), randn(8, device=device)
    assert add_layer_norm(empty, empty, w8, b8, impl="triton")[0].shape == (0, 8)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_eps_counts_for_rows_of_small_variance(device, impl):
    """Rows whose variance is near eps (1e-4 to 1e-8 against 1e-6): unit-variance inputs cannot tell an
    ignored or wrong eps from the right one, these rows can (an eps of 1e-12 instead fails here)."""
    x, r, w, b = _ln_inputs((6, 3, 80), torch.float32, device)
    scales = torch.tensor([1e-2, 1e-3, 3e-4, 1e-4, 1e-3, 1e-2], device=device).reshape(6, 1, 1)
    _check_ln(x * scales, r * scales, w, b, impl, torch.float32)
    _check_ln(x * scales, None, w, b, impl, torch.float32)


# -- bias_gelu -------------------------------------------------------------------------------------

def _gelu_run(fn, x, b, gy, dtype=None):
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    xx, bb = cast(x).detach().requires_grad_(True), cast(b).detach().requires_grad_(True)
    y = fn(xx, bb)
    gx, gb = torch.autograd.grad(y, (xx, bb), cast(gy))
    return y.detach(), gx, gb


def _check_bias_gelu(x, b, gy, impl, dtype):
    """bias_gelu(impl) forward and grads within the error-ratio rule of torch's own (fp64 oracle)."""
    y, gx, gb = _gelu_run(lambda x_, b_: bias_gelu(x_, b_, impl=impl), x, b, gy)
    y_ref, gx_ref, gb_ref = _gelu_run(_torch_bias_gelu, x, b, gy)
    y_or, gx_or, gb_or = _gelu_run(_torch_bias_gelu, x, b, gy, dtype=torch.float64)
    assert_error_ratio(y, y_ref, y_or, dtype, "forward", name="y")
    assert_error_ratio(gx, gx_ref, gx_or, dtype, "backward", name="dx")
    assert_error_ratio(gb, gb_ref, gb_or, dtype, "backward", name="dbias")


def _torch_bias_gelu(x, b):
    return F.gelu(x + b, approximate="none")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2048, 3072, 4096, 5120, 1000])
def test_bias_gelu_triton(device, dtype, width):
    x = randn(2, 5, width, dtype=dtype, device=device, scale=2.0)
    b = randn(width, dtype=dtype, device=device)
    gy = randn(2, 5, width, dtype=dtype, device=device)
    f = lambda x_, b_: bias_gelu(x_, b_, impl="triton")  # noqa: E731
    y, gx, gb = _gelu_run(f, x, b, gy)
    y_ref, gx_ref, gb_ref = _gelu_run(_torch_bias_gelu, x, b, gy)
    y_or, gx_or, gb_or = _gelu_run(_torch_bias_gelu, x, b, gy, dtype=torch.float64)
    assert y.dtype == dtype and gx.dtype == dtype and gb.dtype == dtype
    assert_error_ratio(y, y_ref, y_or, dtype, "forward", name="y")
    assert_error_ratio(gx, gx_ref, gx_or, dtype, "backward", name="dx")
    assert_error_ratio(gb, gb_ref, gb_or, dtype, "backward", name="dbias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_reference_impl(dtype):
    x, b = randn(3, 4, 96, dtype=dtype, scale=2.0), randn(96, dtype=dtype)
    gy = randn(3, 4, 96, dtype=dtype)
    _check_bias_gelu(x, b, gy, "reference", dtype)


def test_bias_gelu_many_rows_strided_mixed(device):
    # fp32 bias on bf16 activations (autocast fc1 output); strided x; many rows per backward program.
    x = randn(300, 2 * 200, dtype=torch.bfloat16, device=device, scale=2.0)[:, ::2]
    b = randn(200, device=device)
    gy = randn(300, 200, dtype=torch.bfloat16, device=device)
    runs = [_gelu_run(lambda x_, b_: bias_gelu(x_, b_, impl="triton"), x, b, gy) for _ in range(2)]
    assert all(torch.equal(a, c) for a, c in zip(*runs)), "not deterministic"
    y, gx, gb = runs[0]
    assert y.dtype == torch.bfloat16 and gb.dtype == torch.float32
    y_or, gx_or, gb_or = _gelu_run(_torch_bias_gelu, x, b, gy, dtype=torch.float64)
    y_ref, gx_ref, gb_ref = _gelu_run(lambda x_, b_: bias_gelu(x_, b_, impl="reference"), x, b, gy)
    assert_error_ratio(y, y_ref, y_or, torch.bfloat16, "forward", name="y")
    assert_error_ratio(gx, gx_ref, gx_or, torch.bfloat16, "backward", name="dx")
    assert_close(gb, gb_ref, name="dbias", scale=10.0)


def _check_ln_backward_and_output(x, r, w, b, dy, ds, out_dtype, impl):
    """`layernorm.backward_and_output` (vit_block's backward) from the forward's operands and statistics:
    the forward's output again and the op backward's gradients on the forward's s, bit for bit."""
    from maefast.ops.layernorm import _forward, _ln_bwd_op, backward_and_output

    y0, s0, mean, rstd = _forward(x, r, w, b, 1e-6, out_dtype, impl)
    s0 = x if r is None else s0
    dx0, dw0, db0 = _ln_bwd_op._maefast_impl(dy, ds, s0, w, mean, rstd, impl)
    dx, dw, db, y = backward_and_output(dy, ds, x, r, w, b, mean, rstd, out_dtype, impl)
    assert y.dtype == out_dtype and y.is_contiguous() and dx.dtype == s0.dtype
    assert torch.equal(y, y0), "the forward's output, formed again"
    assert torch.equal(dx, dx0) and torch.equal(dw, dw0) and torch.equal(db, db0)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("case", ["block_ln2", "block_ln1", "bf16_stream", "odd_strided"])
def test_layer_norm_backward_and_output(device, impl, case):
    if impl == "reference":
        device = torch.device("cpu")
    f32, bf16 = torch.float32, torch.bfloat16
    if case == "block_ln2":  # s = p (bf16 projection) + x (fp32 stream), bf16 output, + the stream's gradient
        x, r, w, b = _ln_inputs((2, 9, 1280), bf16, device, param_dtype=f32, r_dtype=f32)
        dy, ds, out = randn(2, 9, 1280, dtype=bf16, device=device), randn(2, 9, 1280, device=device), bf16
    elif case == "block_ln1":  # LN1 of the fp32 stream, bf16 output, + the residual's gradient
        x, _, w, b = _ln_inputs((3, 5, 512), f32, device, residual=False)
        r, dy, ds, out = None, randn(3, 5, 512, dtype=bf16, device=device), randn(3, 5, 512, device=device), bf16
    elif case == "bf16_stream":  # a bf16 model: s rounded to bf16, as the forward rounds it
        x, r, w, b = _ln_inputs((4, 6, 768), bf16, device)
        dy, ds, out = randn(4, 6, 768, dtype=bf16, device=device), None, bf16
    else:  # an odd width, strided operands, fp16 output
        x, r, w, b = _ln_inputs((5, 2 * 333), f32, device)
        x, r, w, b = x[:, ::2], r[:, 1::2], w[:333], b[:333]
        dy, ds, out = randn(5, 333, device=device), randn(5, 333, device=device), torch.float16
    _check_ln_backward_and_output(x, r, w, b, dy, ds, out, impl)


def _check_backward_and_output(x, b, gy, impl):
    """`backward_and_output` (vit_block's backward): dx and dbias equal the op's backward, and the GELU
    output it writes equals the forward's, bit for bit (same kernel expression / same reference)."""
    from maefast.ops.bias_gelu import _bias_gelu_bwd_op, _bias_gelu_op, backward_and_output

    dx, db, y = backward_and_output(gy, x, b, impl)
    dx0, db0 = _bias_gelu_bwd_op._maefast_impl(gy, x, b, impl)
    y0 = _bias_gelu_op._maefast_impl(x, b, impl)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert torch.equal(y, y0) and torch.equal(dx, dx0) and torch.equal(db, db0)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_backward_and_output(device, impl, dtype):
    if impl == "reference":
        device = torch.device("cpu")
    for shape in ((2, 5, 1000), (3, 7, 40), (1, 1, 1)):
        x = randn(*shape, dtype=dtype, device=device, scale=3.0)
        _check_backward_and_output(x, randn(shape[-1], device=device), randn(*shape, dtype=dtype, device=device), impl)
    strided = randn(30, 2 * 50, dtype=dtype, device=device, scale=3.0)[:, ::2]  # many rows, a column stride
    _check_backward_and_output(strided, randn(50, dtype=dtype, device=device), randn(30, 50, dtype=dtype,
                                                                                      device=device), impl)


# -- bad inputs -------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    x, r, w, b = _ln_inputs((2, 3, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="residual"):
        add_layer_norm(x, r[:, :2], w, b)
    with pytest.raises(ValueError, match="weight"):
        add_layer_norm(x, r, w[:4], b)
    with pytest.raises(ValueError, match="bias"):
        add_layer_norm(x, r, w, b.view(2, 4))
    with pytest.raises(TypeError, match="x"):
        add_layer_norm(x.long(), r, w, b)
    with pytest.raises(TypeError, match="residual"):
        add_layer_norm(x, [1.0], w, b)
    with pytest.raises(ValueError, match="eps"):
        add_layer_norm(x, r, w, b, eps=-1.0)
    with pytest.raises(ValueError, match="impl"):
        add_layer_norm(x, r, w, b, impl="fast")
    with pytest.raises(ValueError, match="for add_layer_norm: it has no CUDA C"):  # the op called, named
        add_layer_norm(x, r, w, b, impl="cuda")
    with pytest.raises(ValueError, match="for layer_norm: it has no CUDA C"):
        layer_norm(x, w, b, impl="cuda")
    with pytest.raises(TypeError, match="out_dtype"):
        add_layer_norm(x, r, w, b, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="x"):
        layer_norm(torch.empty(3, 0), w, b)
    with pytest.raises(ValueError, match="bias"):
        bias_gelu(x, b[:3])
    with pytest.raises(TypeError, match="x"):
        bias_gelu(x.int(), b)
    with pytest.raises(TypeError, match="bias"):
        bias_gelu(x, "b")
    with pytest.raises(ValueError, match="no CUDA C"):
        bias_gelu(x, b, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        bias_gelu(x, b, impl="fast")


def test_triton_width_limit(device):
    x = torch.randn(1, 16385, device=device)
    w, b = torch.ones(16385, device=device), torch.zeros(16385, device=device)
    with pytest.raises(ValueError, match="16384"):
        add_layer_norm(x, None, w, b, impl="triton")
    assert add_layer_norm(x, None, w, b, impl="auto")[0].shape == x.shape  # auto: reference


# -- custom-op registration, torch.compile ------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_opcheck(device, impl):
    dev = device if impl == "triton" else "cpu"
    x, r, w, b = _ln_inputs((2, 3, 24), torch.float32, dev)
    args = [t.requires_grad_(True) for t in (x, r, w, b)]
    torch.library.opcheck(torch.ops.maefast.add_layer_norm.default, (*args, EPS, None, impl))
    torch.library.opcheck(torch.ops.maefast.layer_norm.default, (args[0], args[2], args[3], EPS, None, impl))
    torch.library.opcheck(torch.ops.maefast.add_layer_norm.default,
                          (x.detach().bfloat16(), r.detach(), w.detach(), b.detach(), EPS, torch.bfloat16, impl))
    xg, bg = randn(2, 3, 40, device=dev).requires_grad_(True), randn(40, device=dev).requires_grad_(True)
    torch.library.opcheck(torch.ops.maefast.bias_gelu.default, (xg, bg, impl))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    w1, b1 = randn(64).requires_grad_(True), randn(64)
    w2, b2 = randn(64).requires_grad_(True), randn(64)
    fc1_w, fc1_b = randn(256, 64) * 0.1, randn(256).requires_grad_(True)

    def block_tail(x, attn_out):
        h, s = add_layer_norm(attn_out, x, w2, b2, 1e-6, impl="reference")   # s = x + attn_out; h = LN2(s)
        out = s + bias_gelu(F.linear(h, fc1_w), fc1_b, impl="reference") @ fc1_w
        return layer_norm(out, w1, b1, 1e-6, impl="reference").square().mean()

    x, a = randn(2, 9, 64).requires_grad_(True), randn(2, 9, 64).requires_grad_(True)
    eager = block_tail(x, a)
    g_eager = torch.autograd.grad(eager, (x, a, fc1_b, w2))
    compiled = torch.compile(block_tail, fullgraph=True, backend="aot_eager")
    res = compiled(x, a)
    g = torch.autograd.grad(res, (x, a, fc1_b, w2))
    assert_close(res, eager, name="loss")
    for name, u, v in zip(["dx", "dattn", "dfc1.bias", "dnorm2.weight"], g, g_eager):
        assert_close(u, v, name=name)


# -- GPU: real sizes, Triton on CUDA -------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,width", [(64 * 50, 768), (64 * 50, 1024), (32 * 65, 1280), (32 * 197, 512),
                                        (7 * 257, 512)])
def test_cuda_add_layer_norm_full_size(dtype, rows, width):
    x, r, w, b = _ln_inputs((rows, width), dtype, "cuda")
    _check_ln(x, r, w, b, "triton", dtype)
    x, _, w, b = _ln_inputs((rows, width), dtype, "cuda", residual=False)
    _check_ln(x, None, w, b, "triton", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,width", [(64 * 50, 3072), (32 * 65, 5120), (32 * 197, 2048)])
def test_cuda_bias_gelu_full_size(dtype, rows, width):
    x = randn(rows, width, dtype=dtype, device="cuda", scale=2.0)
    b = randn(width, dtype=dtype, device="cuda")
    gy = randn(rows, width, dtype=dtype, device="cuda")
    _check_bias_gelu(x, b, gy, "triton", dtype)
    _check_backward_and_output(x, b, gy, "triton")


@pytest.mark.cuda
@pytest.mark.parametrize("rows,width", [(128 * 65, 1280), (128 * 257, 512)])
def test_cuda_layer_norm_backward_and_output_full_size(rows, width):
    """On the GPU the kernels' FMA contraction decides: the backward's output must still equal the
    forward's bit for bit (the same expression in both kernels)."""
    f32, bf16 = torch.float32, torch.bfloat16
    x, r, w, b = _ln_inputs((rows, width), bf16, "cuda", param_dtype=f32, r_dtype=f32)
    dy, ds = randn(rows, width, dtype=bf16, device="cuda"), randn(rows, width, device="cuda")
    _check_ln_backward_and_output(x, r, w, b, dy, ds, bf16, "triton")
    _check_ln_backward_and_output(r, None, w, b, dy, ds, bf16, "triton")


@pytest.mark.cuda
def test_cuda_deterministic_and_auto_is_triton():
    import importlib

    # (maefast.ops.bias_gelu is also the name of the function: fetch the modules by path)
    ln_mod = importlib.import_module("maefast.ops.layernorm")
    bg_mod = importlib.import_module("maefast.ops.bias_gelu")

    assert ln_mod._resolve("auto", torch.device("cuda"), 1024) == "triton"
    assert bg_mod._resolve("auto", torch.device("cuda")) == "triton"
    x, r, w, b = _ln_inputs((256 * 50, 1024), torch.bfloat16, "cuda")
    gy, gs = randn(*x.shape, dtype=x.dtype, device="cuda"), randn(*x.shape, dtype=x.dtype, device="cuda")
    f = lambda x_, r_, w_, b_: add_layer_norm(x_, r_, w_, b_)  # noqa: E731  (auto -> triton on CUDA)
    (y1, _, g1), (y2, _, g2) = _ln_run(f, x, r, w, b, gy, gs), _ln_run(f, x, r, w, b, gy, gs)
    assert torch.equal(y1, y2) and all(torch.equal(u, v) for u, v in zip(g1, g2))
    xg, bg = randn(256 * 50, 4096, dtype=torch.bfloat16, device="cuda"), randn(4096, device="cuda")
    gyg = randn(256 * 50, 4096, dtype=torch.bfloat16, device="cuda")
    r1 = _gelu_run(lambda x_, b_: bias_gelu(x_, b_), xg, bg, gyg)
    r2 = _gelu_run(lambda x_, b_: bias_gelu(x_, b_), xg, bg, gyg)
    assert all(torch.equal(u, v) for u, v in zip(r1, r2))
