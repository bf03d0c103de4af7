"""LayerNorm with an optional fused residual add, as custom ops `maefast::add_layer_norm` and
`maefast::layer_norm` (sharing `maefast::layer_norm_backward`).

    y, s = maefast.ops.add_layer_norm(x, attn_out, norm2.weight, norm2.bias)   # s = x + attn_out, y = LN(s)
    y, x = maefast.ops.add_layer_norm(x, None, norm1.weight, norm1.bias)       # plain LN (returns x itself)
    y = maefast.ops.layer_norm(x, weight, bias)

The reference impl is the same computation in PyTorch (fp32 statistics); the Triton impl reads x
and r once and writes y and s once in the forward, and reads dy, ds and s once and writes dx once
in the backward (ds, the gradient that reached s from the residual stream, is added in the kernel).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._validate import FLOAT_DTYPES, check_tensor
from ._backend import check_impl, choose_impl, device_guard
from ._dispatch import bwd, call, custom_op, register_autograd

MAX_TRITON_WIDTH = 16384  # = maefast.kernels.layernorm.MAX_WIDTH (not imported: no triton import here)


def _resolve(impl: str, device: torch.device, width: int, what: str = "layer_norm") -> str:
    """The backend for a LayerNorm of ``width`` on ``device``; a refusal names ``what``, the op that runs."""
    check_impl(impl, what, cuda=False)
    if impl == "auto" and width > MAX_TRITON_WIDTH:
        return "reference"
    chosen = choose_impl(impl, device, auto_order=("triton",), what=what)
    if chosen == "triton" and width > MAX_TRITON_WIDTH:
        raise ValueError(f"impl='triton' is not available for {what}: widths up to {MAX_TRITON_WIDTH} "
                         f"are supported, got {width}")
    return chosen


def _validate(x, residual, weight, bias, eps, out_dtype) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {tuple(x.shape)}")
    d = x.shape[-1]
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES, device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        if t.shape[0] != d:
            raise ValueError(f"{name} must have shape (D,) = ({d},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be None or one of float32, float16, bfloat16, got {out_dtype}")


# -- backends -----------------------------------------------------------------------------------

def _fwd_reference(x, residual, weight, bias, eps, out_dtype):
    # contiguous outputs whatever the inputs' layout, as the fake ops (and the kernels) say
    x = x.contiguous()
    s = x + residual.contiguous() if residual is not None else x
    sf = s.float()
    mean = sf.mean(-1)
    diff = sf - mean.unsqueeze(-1)
    rstd = torch.rsqrt((diff * diff).mean(-1) + eps)
    return _normalize(diff, rstd, weight, bias, out_dtype or s.dtype), (s if residual is not None else None), mean, rstd


def _normalize(diff, rstd, weight, bias, out_dtype):
    """y from s - mean: the forward's expression, also the backward's when it hands y back."""
    return (diff * rstd.unsqueeze(-1) * weight.float() + bias.float()).to(out_dtype)


def _bwd_reference(dy, ds, x, weight, mean, rstd):
    d = x.shape[-1]
    x, dy, mean, rstd = x.contiguous(), dy.contiguous(), mean.contiguous(), rstd.contiguous()
    xhat = (x.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dyf = dy.float()
    wdy = dyf * weight.float()
    c1 = (xhat * wdy).mean(-1, keepdim=True)
    c2 = wdy.mean(-1, keepdim=True)
    dx = (wdy - xhat * c1 - c2) * rstd.unsqueeze(-1)
    if ds is not None:
        dx = dx + ds.float()
    dw = (dyf * xhat).reshape(-1, d).sum(0)
    db = dyf.reshape(-1, d).sum(0)
    return dx.to(x.dtype), dw, db


def _forward(x, residual, weight, bias, eps, out_dtype, impl, what="layer_norm"):
    impl = _resolve(impl, x.device, x.shape[-1], what)
    if impl == "triton":
        from ..kernels.layernorm import add_layer_norm_fwd

        d = x.shape[-1]
        with device_guard(x):
            return add_layer_norm_fwd(x.reshape(-1, d), None if residual is None else residual.reshape(-1, d),
                                      weight, bias, eps, out_dtype, shape=x.shape)
    return _fwd_reference(x, residual, weight, bias, eps, out_dtype)


def backward_and_output(dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor,
                        residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, out_dtype: torch.dtype, impl: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of `_forward(x, residual, weight, bias, ...)` from the forward's operands and its
    statistics (mean, rstd), handing back the forward's output y again, bit for bit, from the same pass:
    (d s (= dx = d residual, in s's dtype; includes ds), dweight fp32, dbias fp32, y in out_dtype).
    s = x + residual is formed again as the forward formed it, never stored. Not an op of its own:
    called inside `maefast::vit_block_backward` (inputs checked there)."""
    return _backward(dy, ds, x, residual, weight, bias, mean, rstd, out_dtype, impl)


def _backward(dy, ds, x, residual, weight, bias, mean, rstd, out_dtype, impl) -> tuple:
    """(dx, dweight, dbias), and y with out_dtype: the op backward and `backward_and_output`."""
    impl = _resolve(impl, x.device, x.shape[-1])
    if impl == "triton":
        from ..kernels.layernorm import layer_norm_bwd

        d = x.shape[-1]
        flat = (lambda t: None if t is None else t.reshape(-1, d))  # noqa: E731
        with device_guard(x):
            out = layer_norm_bwd(flat(dy), flat(ds), flat(x), weight, mean.reshape(-1), rstd.reshape(-1),
                                 flat(residual), bias, out_dtype)
        return (out[0].view(x.shape), *out[1:3]) + ((out[3].view(x.shape),) if out_dtype is not None else ())
    x = x.contiguous()
    s = x + residual.contiguous() if residual is not None else x  # _fwd_reference's s
    grads = _bwd_reference(dy, ds, s, weight, mean, rstd)
    if out_dtype is None:
        return grads
    return (*grads, _normalize(s.float() - mean.unsqueeze(-1), rstd, weight, bias, out_dtype))


# -- custom ops -----------------------------------------------------------------------------------

@custom_op("maefast::add_layer_norm", mutates_args=())
def _add_ln_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out_dtype: Optional[torch.dtype], impl: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, s = x + residual, mean fp32 (...), rstd fp32 (...))."""
    return _forward(x, residual, weight, bias, eps, out_dtype, impl, "add_layer_norm")


@_add_ln_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype, impl):
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=out_dtype or s_dtype), x.new_empty(x.shape, dtype=s_dtype),
            stat, torch.empty_like(stat))


@custom_op("maefast::layer_norm", mutates_args=())
def _ln_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype],
           impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, mean fp32 (...), rstd fp32 (...))."""
    y, _, mean, rstd = _forward(x, None, weight, bias, eps, out_dtype, impl)
    return y, mean, rstd


@_ln_op.register_fake
def _(x, weight, bias, eps, out_dtype, impl):
    stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), stat, torch.empty_like(stat)


@custom_op("maefast::layer_norm_backward", mutates_args=())
def _ln_bwd_op(dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
               mean: torch.Tensor, rstd: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: the normalised input (s for add_layer_norm). Returns (dx in x's dtype, dweight fp32,
    dbias fp32); dx includes ds."""
    return _backward(dy, ds, x, None, weight, None, mean, rstd, None, impl)


@_ln_bwd_op.register_fake
def _(dy, ds, x, weight, mean, rstd, impl):
    d = x.shape[-1]
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(d, dtype=torch.float32), \
        x.new_empty(d, dtype=torch.float32)


def _cast(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return g if g.dtype == dtype else g.to(dtype)


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype, impl = inputs
    y, s, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.dtypes = (x.dtype, residual.dtype, weight.dtype, bias.dtype)
    ctx.impl = impl
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled grads for mean/rstd (two launches per call)


def _add_ln_backward(ctx, dy, ds, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s)
    dx, dw, db = bwd(ctx, _ln_bwd_op)(dy, ds, s, weight, mean, rstd, ctx.impl)
    x_dt, r_dt, w_dt, b_dt = ctx.dtypes
    # d(x + r)/dx = d(x + r)/dr = 1: one tensor serves both (as aten's add backward does).
    return _cast(dx, x_dt), _cast(dx, r_dt), _cast(dw, w_dt), _cast(db, b_dt), None, None, None


register_autograd(_add_ln_op, _add_ln_backward, setup_context=_add_ln_setup)


def _ln_setup(ctx, inputs, output):
    x, weight, bias, eps, out_dtype, impl = inputs
    y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.dtypes = (weight.dtype, bias.dtype)
    ctx.impl = impl
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled grads for mean/rstd (two launches per call)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dw, db = bwd(ctx, _ln_bwd_op)(dy, None, x, weight, mean, rstd, ctx.impl)
    w_dt, b_dt = ctx.dtypes
    return dx, _cast(dw, w_dt), _cast(db, b_dt), None, None, None


register_autograd(_ln_op, _ln_backward, setup_context=_ln_setup)


# -- public API -----------------------------------------------------------------------------------

def add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-6, impl: str = "auto", out_dtype: Optional[torch.dtype] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + LayerNorm over the last dimension in one pass: `s = x + residual`, `y = LN(s)`.

    Args:
        x: (..., D) float32/bfloat16/float16, any strides.
        residual: (..., D) like x (its dtype may differ: s takes the promoted dtype), or None for
            a plain LayerNorm of x.
        weight, bias: (D,) float tensors (any float dtype; their grads come back in it).
        eps: added to the variance (MAE: 1e-6).
        impl: "auto" (Triton on CUDA, reference elsewhere) | "triton" | "reference".
        out_dtype: dtype of y (default s's dtype); e.g. bfloat16 to feed an autocast matmul
            directly from an fp32 residual stream.

    Returns:
        (y, s): y (..., D) = LN(s) in out_dtype, s = x + residual (..., D) in the promoted dtype;
        with residual None, s is x itself (not a copy). Mean and 1/std are computed in fp32.
    """
    return _add_layer_norm(x, residual, weight, bias, eps, impl, out_dtype, "add_layer_norm")


def _add_layer_norm(x, residual, weight, bias, eps, impl, out_dtype, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_layer_norm` and `layer_norm`: ``what``, the function the user called, is the one a refusal of
    ``impl`` names (add_layer_norm without a residual runs the layer_norm op, but was not called so)."""
    _validate(x, residual, weight, bias, eps, out_dtype)
    check_impl(impl, what, cuda=False)  # the rest where the op runs (what a profile counts)
    if residual is None:
        y, _, _ = call(_ln_op, x, weight, bias, float(eps), out_dtype, impl)
        return y, x
    y, s, _, _ = call(_add_ln_op, x, residual, weight, bias, float(eps), out_dtype, impl)
    return y, s


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, impl: str = "auto",
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LayerNorm of x (..., D) over D with fp32 statistics; see `add_layer_norm` (residual=None)."""
    return _add_layer_norm(x, None, weight, bias, eps, impl, out_dtype, "layer_norm")[0]
