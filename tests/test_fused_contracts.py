"""maefast.ops.add_layer_norm / layer_norm / bias_gelu beyond their numerics (tests/test_fused.py): each
argument check on its own, eps = 0 and the default eps, out_dtype through layer_norm, gradients in each
input's dtype, a gradient through s alone, strided parameters, upstream gradients and statistics (the
attention backward's lse too), the width limit's edge, and the fakes' dtypes (opcheck)."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from test_fused import EPS, _gelu_run, _ln_inputs, _ln_run, _torch_bias_gelu, _torch_ln

from maefast.ops._dispatch import eager_dispatch
from maefast.ops.bias_gelu import bias_gelu
from maefast.ops.layernorm import add_layer_norm, layer_norm
from maefast.testing import assert_close, randn

IMPLS = ["triton", "reference"]


def _fused(impl):
    return lambda *a: add_layer_norm(*a, EPS, impl=impl)


# -- arguments ----------------------------------------------------------------------------------------

def test_bad_inputs_raise_where_the_rest_agrees():
    """Each check alone: the other arguments consistent with the bad one (an empty width with empty
    parameters, a bias one short, a bool or NaN eps, a residual on another device), so only it can raise."""
    x, r, w, b = _ln_inputs((2, 3, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="x"):
        layer_norm(torch.empty(3, 0), torch.empty(0), torch.empty(0))
    with pytest.raises(ValueError, match="x"):
        bias_gelu(torch.empty(3, 0), torch.empty(0))
    with pytest.raises(ValueError, match="bias"):
        add_layer_norm(x, r, w, b[:7])
    for eps in (True, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            add_layer_norm(x, r, w, b, eps=eps)
    with pytest.raises(ValueError, match="residual"):
        add_layer_norm(x, r.to("meta"), w, b)
    with pytest.raises(ValueError, match="bias"):
        bias_gelu(x, b.view(8, 1))  # (N, 1): its first dimension is N


def test_ops_refuse_impl_cuda_themselves():
    """Called as torch.ops (torch.compile's graphs, opcheck), past the Python wrappers' own check: impl='cuda'
    is refused, as these ops have no CUDA C++ kernel (not left to whether the extension loads)."""
    ops = torch.ops.maefast
    x, r, w, b = _ln_inputs((2, 8), torch.float32, "cpu")
    for call in (lambda: ops.layer_norm(x, w, b, EPS, None, "cuda"),
                 lambda: ops.add_layer_norm(x, r, w, b, EPS, None, "cuda"),
                 lambda: ops.bias_gelu(x, b, "cuda")):
        with pytest.raises(ValueError, match="no CUDA C"):
            call()


def test_refusals_name_the_function_called(monkeypatch):
    """A refused impl names the function the user called: add_layer_norm without a residual runs the
    layer_norm op, and its refusal named layer_norm; add_layer_norm's op refused a width as layer_norm's."""
    from maefast.ops import _backend

    x, r, w, b = _ln_inputs((2, 8), torch.float32, "cpu")
    for impl in ("cuda", "sdpa"):
        for residual in (None, r):
            with pytest.raises(ValueError, match=f"impl='{impl}' is not available for add_layer_norm:"):
                add_layer_norm(x, residual, w, b, impl=impl)
        with pytest.raises(ValueError, match=f"impl='{impl}' is not available for layer_norm:"):
            layer_norm(x, w, b, impl=impl)
    monkeypatch.setattr(_backend, "triton_usable", lambda device: (True, ""))  # as on a GPU: the width decides
    wide = torch.zeros(1, 16385)
    with pytest.raises(ValueError, match="impl='triton' is not available for add_layer_norm: widths up to 16384"):
        add_layer_norm(wide, wide, wide[0], wide[0], impl="triton")
    with pytest.raises(ValueError, match="impl='triton' is not available for layer_norm: widths up to 16384"):
        layer_norm(wide, wide[0], wide[0], impl="triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_eps_zero_and_the_default_eps(device, impl):
    """eps = 0 is allowed (eps >= 0); left out, eps is MAE's 1e-6 in both entry points (rows of variance
    1e-6 tell it from 1e-5)."""
    x, r, w, b = _ln_inputs((16, 64), torch.float32, device)  # no rows past M in the tile (0/0 there)
    assert_close(layer_norm(x, w, b, eps=0.0, impl=impl), F.layer_norm(x, (64,), w, b, 0.0), name="eps=0")
    x, r = x * 1e-3, r * 1e-3
    assert_close(layer_norm(x, w, b, impl=impl), F.layer_norm(x, (64,), w, b, EPS), name="layer_norm")
    assert_close(add_layer_norm(x, r, w, b, impl=impl)[0], _torch_ln(x, r, w, b)[0], name="add_layer_norm")


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm_out_dtype(device, impl):
    x, _, w, b = _ln_inputs((3, 40), torch.float32, device, residual=False)
    y = layer_norm(x, w, b, impl=impl, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), F.layer_norm(x, (40,), w, b, EPS).bfloat16().float(), dtype=torch.bfloat16, name="y")


def test_triton_takes_the_widest_row(device):
    x, _, w, b = _ln_inputs((1, 16384), torch.float32, device, residual=False)
    y, _, g = _ln_run(_fused("triton"), x, None, w, b, x, None)
    y_ref, _, g_ref = _ln_run(_torch_ln, x, None, w, b, x, None)
    assert_close(y, y_ref, name="y")
    assert_close(g[0], g_ref[0], name="dx", scale=10.0)


def test_auto_takes_the_reference_beyond_the_triton_width(monkeypatch):
    from maefast.ops import _backend

    ln_mod = importlib.import_module("maefast.ops.layernorm")  # (maefast.ops.layer_norm is the function)
    monkeypatch.setattr(_backend, "triton_usable", lambda device: (True, ""))  # as on a GPU
    cuda = torch.device("cuda")
    assert ln_mod._resolve("auto", cuda, 16384) == "triton"
    assert ln_mod._resolve("auto", cuda, 16385) == "reference"
    with pytest.raises(ValueError, match="16384"):
        ln_mod._resolve("triton", cuda, 16385)


@pytest.mark.parametrize("impl", IMPLS)
def test_y_takes_s_dtype_when_x_is_the_narrower_operand(device, impl):
    """bf16 x and an fp32 residual: s = x + r is fp32, and y (out_dtype left out) takes s's dtype, not x's,
    as the fake says (the other tests give the wider dtype to x)."""
    x, r, w, b = _ln_inputs((3, 40), torch.bfloat16, device, param_dtype=torch.float32, r_dtype=torch.float32)
    y, s = add_layer_norm(x, r, w, b, impl=impl)
    assert s.dtype == torch.float32 and y.dtype == torch.float32
    assert_close(y, F.layer_norm(x.float() + r, (40,), w, b, EPS), name="y")


# -- gradients: dtypes, a gradient through s alone, strides ----------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtype_gradients_come_back_in_each_inputs_dtype(device, impl):
    # fp32 stream x, bf16 branch output r, bf16 weight, fp32 bias: each gradient in its input's dtype.
    x, r, w, b = _ln_inputs((3, 5, 96), torch.float32, device, r_dtype=torch.bfloat16)
    w = w.bfloat16()
    gy, gs = randn(*x.shape, device=device), randn(*x.shape, device=device)
    _, _, g = _ln_run(_fused(impl), x, r, w, b, gy, gs)
    _, _, g_ref = _ln_run(_torch_ln, x, r.float(), w.float(), b, gy, gs)
    for name, a, e, t in zip(["dx", "dr", "dweight", "dbias"], g, g_ref, (x, r, w, b)):
        assert a.dtype == t.dtype, name
        assert_close(a.float(), e.to(t.dtype).float(), dtype=t.dtype, name=name, scale=10.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_through_s_alone(device, impl):
    """y unused (its gradient None, not materialised): d x = d r = ds, and weight and bias get zeros."""
    x, r, w, b = _ln_inputs((2, 3, 24), torch.float32, device)
    leaves = [t.requires_grad_(True) for t in (x, r, w, b)]
    _, s = add_layer_norm(*leaves, impl=impl)
    gs = randn(*x.shape, device=device)
    gx, gr, gw, gb = torch.autograd.grad(s, leaves, gs, allow_unused=True)
    assert torch.equal(gx, gs) and torch.equal(gr, gs)
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("impl", IMPLS)
def test_upstream_gradients_of_other_strides(device, impl):
    # The gradients of y and s each with their own strides (one transposed, one contiguous, and the
    # other way round): the backward reads each by its own.
    m, d = 6, 40
    x, r, w, b = _ln_inputs((m, d), torch.float32, device)
    for gy, gs in ((randn(d, m, device=device).t(), randn(m, d, device=device)),
                   (randn(m, d, device=device), randn(d, m, device=device).t())):
        _, _, g = _ln_run(_fused(impl), x, r, w, b, gy, gs)
        _, _, g_ref = _ln_run(_torch_ln, x, r, w, b, gy, gs)
        for name, a, e in zip(["dx", "dr", "dweight", "dbias"], g, g_ref):
            assert_close(a, e, name=name, scale=10.0)


def test_strided_parameters_triton(device):
    # weight and bias views with a stride (every other element): the kernels read them contiguous.
    x, r, w2, b2 = _ln_inputs((3, 2 * 48), torch.float32, device)
    x, r, w, b = x[:, :48].contiguous(), r[:, :48].contiguous(), w2[::2], b2[::2]
    gy, gs = randn(3, 48, device=device), randn(3, 48, device=device)
    y, _, g = _ln_run(_fused("triton"), x, r, w, b, gy, gs)
    y_ref, _, g_ref = _ln_run(_torch_ln, x, r, w, b, gy, gs)
    assert_close(y, y_ref, name="y")
    for name, a, e in zip(["dx", "dr", "dweight", "dbias"], g, g_ref):
        assert_close(a, e, name=name, scale=10.0)
    xg, bg, gyg = randn(4, 40, device=device, scale=2.0), randn(80, device=device)[::2], randn(4, 40, device=device)
    y, gx, gb = _gelu_run(lambda x_, b_: bias_gelu(x_, b_, impl="triton"), xg, bg, gyg)
    y_ref, gx_ref, gb_ref = _gelu_run(_torch_bias_gelu, xg, bg, gyg)
    for name, a, e in (("y", y, y_ref), ("dx", gx, gx_ref), ("dbias", gb, gb_ref)):
        assert_close(a, e, name=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm_backward_op_reads_strided_statistics(device, impl):
    """`maefast::layer_norm_backward` given mean and rstd as views with a stride (every other element of
    a buffer, NaN between): the same gradients as from the contiguous statistics (the kernel read them
    as contiguous before)."""
    dev = device if impl == "triton" else "cpu"
    ops = torch.ops.maefast
    x, _, w, b = _ln_inputs((6, 16), torch.float32, dev, residual=False)
    dy, ds = randn(6, 16, device=dev), randn(6, 16, device=dev)
    _, mean, rstd = ops.layer_norm(x, w, b, EPS, None, impl)

    def spread(t):
        return torch.stack([t, torch.full_like(t, float("nan"))], 1)[:, 0]

    assert spread(mean).stride() == (2,)
    want = ops.layer_norm_backward(dy, ds, x, w, mean, rstd, impl)
    got = ops.layer_norm_backward(dy, ds, x, w, spread(mean), spread(rstd), impl)
    for name, a, e in zip(["dx", "dweight", "dbias"], got, want):
        assert torch.equal(a, e), name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_attention_backward_op_reads_strided_lse(device, impl, varlen):
    """The same for `maefast::visible_attention_backward`'s lse (Nb, H, Lr): a transposed copy, equal values
    but rows not contiguous, gives the same dqkv (the Triton backward read it as contiguous before)."""
    dev = device if impl == "triton" else "cpu"
    ops, heads = torch.ops.maefast, 2
    qkv = randn(1 if varlen else 2, 9, 3 * heads * 16, device=dev)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=dev) if varlen else None
    max_len = 5 if varlen else None
    out, lse = ops.visible_attention(qkv, heads, cu, max_len, None, impl)
    dout = randn(*out.shape, device=dev)
    strided = lse.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(strided, lse) and not strided.is_contiguous()
    want = ops.visible_attention_backward(dout, qkv, out, lse, heads, cu, max_len, None, impl)
    assert torch.equal(ops.visible_attention_backward(dout, qkv, out, strided, heads, cu, max_len, None, impl), want)


def test_bias_gelu_width_past_a_column_block_triton(device):
    # 1100 columns: one full block of 1024 and a ragged one (the tests' other widths are multiples or below).
    x, b, gy = randn(2, 1100, device=device, scale=2.0), randn(1100, device=device), randn(2, 1100, device=device)
    got = _gelu_run(lambda x_, b_: bias_gelu(x_, b_, impl="triton"), x, b, gy)
    want = _gelu_run(_torch_bias_gelu, x, b, gy)
    for name, a, e in zip(("y", "dx", "dbias"), got, want):
        assert_close(a, e, name=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_gelu_backward_forms_x_plus_bias_in_fp32(device, impl):
    # bf16 x and bias: z = x + bias is never rounded to bf16 (the op's fp32 dbias would be off by ~1e-3).
    dev = device if impl == "triton" else "cpu"
    bf16 = torch.bfloat16
    x, b, dy = randn(8, 64, dtype=bf16, device=dev, scale=2.0), randn(64, dtype=bf16, device=dev), \
        randn(8, 64, dtype=bf16, device=dev)
    _, db = torch.ops.maefast.bias_gelu_backward(dy, x, b, impl)
    z = x.double() + b.double()
    dz = dy.double() * (0.5 * (1 + torch.erf(z * 0.5 ** 0.5)) + z * torch.exp(-0.5 * z * z) * (2 * math.pi) ** -0.5)
    assert db.dtype == torch.float32
    assert_close(db, dz.sum(0).float(), name="dbias")


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_gelu_backward_op_gives_dx_in_x_dtype_for_another_dy_dtype(device, impl):
    """`maefast::bias_gelu_backward` with an fp32 dy for bf16 x: dx in x's dtype (the fake's, the kernel's),
    not dy's; its values the fp32 derivative rounded once."""
    dev = device if impl == "triton" else "cpu"
    x, b, dy = randn(4, 48, dtype=torch.bfloat16, device=dev), randn(48, device=dev), randn(4, 48, device=dev)
    dx, db = torch.ops.maefast.bias_gelu_backward(dy, x, b, impl)
    assert dx.dtype == torch.bfloat16 and db.dtype == torch.float32
    z = (x.float() + b).requires_grad_(True)
    (want,) = torch.autograd.grad(F.gelu(z), z, dy)
    assert_close(dx.float(), want.bfloat16().float(), dtype=torch.bfloat16, name="dx")


# -- custom-op registration -----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_opcheck_out_dtype_and_low_precision(device, impl):
    # The fakes' dtypes where they differ from x's: y in out_dtype, dbias fp32 for bf16 activations.
    dev = device if impl == "triton" else "cpu"
    x, _, w, b = _ln_inputs((2, 3, 24), torch.float32, dev, residual=False)
    torch.library.opcheck(torch.ops.maefast.layer_norm.default, (x, w, b, EPS, torch.bfloat16, impl))
    xg, dy = randn(2, 3, 40, dtype=torch.bfloat16, device=dev), randn(2, 3, 40, dtype=torch.bfloat16, device=dev)
    torch.library.opcheck(torch.ops.maefast.bias_gelu_backward.default, (dy, xg, randn(40, device=dev), impl))


@pytest.mark.parametrize("route", ["direct", "custom_op"])
@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_take_in_place_ops(impl, route):
    """An output changed in place (a gate, an in-place dropout) then differentiated, as torch's own ops allow:
    the Triton launchers handed back (..., D) views of (M, D) tensors, which autograd refused to modify in
    place on a GPU (impl="auto" runs Triton there) while the CPU's reference path took it. (add_layer_norm's s is
    saved for the backward: changed in place, autograd refuses it as it does torch's own saved outputs.)"""
    x, r, w, b = _ln_inputs((2, 3, 16), torch.float32, "cpu")
    runs = {"layer_norm": lambda x, r, w, b, i: layer_norm(x, w, b, EPS, impl=i),
            "add_layer_norm y": lambda x, r, w, b, i: add_layer_norm(x, r, w, b, EPS, impl=i)[0],
            "bias_gelu": lambda x, r, w, b, i: bias_gelu(x, b, impl=i)}
    for name, run in runs.items():
        grads = []
        for i in (impl, "reference"):
            leaves = [t.detach().requires_grad_() for t in (x, r, w, b)]
            with eager_dispatch(route):
                out = run(*leaves, i)
            assert out._base is None, name
            out.mul_(torch.linspace(0.5, 2.0, out.shape[-1]))
            out.sum().backward()
            grads.append([t.grad for t in leaves])
        for got, want in zip(*grads):
            assert (got is None) == (want is None), name
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
