"""Bias + exact (erf) GELU as one custom op `maefast::bias_gelu` (backward
`maefast::bias_gelu_backward`), for the MLP's fc1 output computed without its bias:

    h = maefast.ops.bias_gelu(x @ fc1.weight.T, fc1.bias)   # = F.gelu(fc1(x)), approximate='none'

x + b is formed in fp32 and never rounded; GELU and its derivative are evaluated in fp32. The
backward recomputes x + b (saves x and b only) and sums dbias deterministically.
"""
from __future__ import annotations

import torch

from .._validate import FLOAT_DTYPES, check_tensor
from ._backend import check_impl, choose_impl, device_guard
from ._dispatch import bwd, call, custom_op, register_autograd


def _resolve(impl: str, device: torch.device) -> str:
    check_impl(impl, "bias_gelu", cuda=False)
    return choose_impl(impl, device, auto_order=("triton",), what="bias_gelu")


def _validate(x, bias) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., N) with N >= 1, got {tuple(x.shape)}")
    check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    if bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias must have shape (N,) = ({x.shape[-1]},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(bias.shape)}")


# the references' outputs are contiguous whatever the inputs' layout, as the fake ops (and the kernels) say

def _fwd_reference(x, bias):
    return torch.nn.functional.gelu(x.contiguous().float() + bias.float(), approximate="none").to(x.dtype)


def _bwd_reference(dy, x, bias, want_y=False):
    x, dy = x.contiguous(), dy.contiguous()
    z = x.float() + bias.float()
    cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
    pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327
    dz = dy.float() * (cdf + z * pdf)
    out = (dz.to(x.dtype), dz.reshape(-1, x.shape[-1]).sum(0))
    return out + (_fwd_reference(x, bias),) if want_y else out


def _bwd(dy, x, bias, impl, want_y):
    impl = _resolve(impl, x.device)
    if impl == "triton":
        from ..kernels.bias_gelu import bias_gelu_bwd

        n = x.shape[-1]
        with device_guard(x):
            out = bias_gelu_bwd(dy.reshape(-1, n), x.reshape(-1, n), bias, want_y)
        return (out[0].view(x.shape), out[1]) + ((out[2].view(x.shape),) if want_y else ())
    return _bwd_reference(dy, x, bias, want_y)


def backward_and_output(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, impl: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dbias fp32, gelu(x + bias) as the forward computes it) in one pass over x:
    `ops.vit_block`'s backward needs the GELU output again for fc2's weight gradient. Not an op of
    its own: called inside `maefast::vit_block_backward` (inputs checked there)."""
    return _bwd(dy, x, bias, impl, True)


@custom_op("maefast::bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor, impl: str) -> torch.Tensor:
    impl = _resolve(impl, x.device)
    if impl == "triton":
        from ..kernels.bias_gelu import bias_gelu_fwd

        with device_guard(x):
            return bias_gelu_fwd(x.reshape(-1, x.shape[-1]), bias, shape=x.shape)
    return _fwd_reference(x, bias)


@_bias_gelu_op.register_fake
def _(x, bias, impl):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("maefast::bias_gelu_backward", mutates_args=())
def _bias_gelu_bwd_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, impl: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx in x's dtype, dbias fp32)."""
    return _bwd(dy, x, bias, impl, False)


@_bias_gelu_bwd_op.register_fake
def _(dy, x, bias, impl):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[-1], dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, bias, impl = inputs
    ctx.save_for_backward(x, bias)
    ctx.impl = impl


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = bwd(ctx, _bias_gelu_bwd_op)(dy, x, bias, ctx.impl)
    return dx, (db if db.dtype == bias.dtype else db.to(bias.dtype)), None


register_autograd(_bias_gelu_op, _backward, setup_context=_setup)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """`gelu(x + bias)` with the exact (erf) GELU, fused.

    Args:
        x: (..., N) float32/bfloat16/float16 (the fc1 matmul output without bias), any strides.
        bias: (N,) float tensor of any float dtype (its grad comes back in it).
        impl: "auto" (Triton on CUDA, reference elsewhere) | "triton" | "reference".

    Returns:
        (..., N) in x's dtype.
    """
    _validate(x, bias)
    check_impl(impl, "bias_gelu", cuda=False)  # the rest where the op runs (what a profile counts)
    return call(_bias_gelu_op, x, bias, impl)
