"""One pre-norm ViT block as a single op with a hand-written backward that recomputes its cheap parts:
`maefast::vit_block` (forward) and `maefast::vit_block_backward`.

    y = vit_block(x, blk_weights..., num_heads=H)          # = x + attn(LN1(x)) -> s;  s + mlp(LN2(s))

Forward (matmul dtype c = the autocast dtype, else x's dtype; the residual stream stays in x's):
    h = LN1(x) [c];  qkv = h W_qkv^T + b_qkv;  o, lse = attention(qkv);  p = o W_proj^T + b_proj
    s = x + p;  h2 = LN2(s) [c];  a = h2 W_1^T;  g = gelu(a + b_1);  y = s + g W_2^T + b_2
Saved for backward: x, qkv, o, lse, p, a and the LayerNorms' statistics (8 bytes a token each) —
not h, h2, s, g: the LayerNorm and bias+GELU backward kernels form their input again (s = p + x,
rounded as the forward rounds it) and write the forward's outputs h, h2, g again (the forward's
expression on the forward's statistics) in the pass that reads those inputs for the gradient, for
the weight gradients that need them; nor the c-dtype weight copies (re-cast). Under bf16 autocast p
is bf16 where s is the fp32 stream's: 11 values of 2 bytes per token and width unit instead of 12
(ViT-H/14, b128: 0.89 GiB less at the step's peak by scripts/peak_memory.py).

Backward: torch matmuls around those kernels, the attention backward and the bias-gradient column
sums (kernels/colsum.py, fused with the cast of the fp32 stream's gradient to c that the matmuls
need); weight gradients in c (as autocast's linear backward computes them), LayerNorm and bias
gradients in fp32. No forward kernel runs again: the 2026-12-04 H200 profile (ViT-H/14 b128) had the
recomputes at 80 of 162 LayerNorm and 40 of 80 bias+GELU forward launches. One autograd node per
block instead of ~12 (what a launch-bound step pays for in Python). Each sub-op takes `impl` as its
own op does ("auto": Triton on CUDA, the reference elsewhere). Inside one block's backward a few
more hidden-width temporaries are alive at once than a recompute-first order would hold (g beside
dg and da); the step's peak is at the end of the forward, far above them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._validate import FLOAT_DTYPES, autocast_dtype, check_scale, check_tensor
from . import _backend
from ._backend import device_guard
from ._dispatch import bwd, call, custom_op, register_autograd
from .attention import _visible_attention, _visible_attention_backward, model_level_impl
from .bias_gelu import _bias_gelu_op
from .bias_gelu import backward_and_output as _gelu_backward_and_output
from .layernorm import _forward as _ln_forward
from .layernorm import backward_and_output as _ln_backward_and_output

_WEIGHTS = ("ln1_w", "ln1_b", "qkv_w", "qkv_b", "proj_w", "proj_b", "ln2_w", "ln2_b", "fc1_w", "fc1_b", "fc2_w",
            "fc2_b")


def _impl_of(op):
    return op._maefast_impl


def _linear(x, w, b, c):
    return F.linear(x, w.to(c), None if b is None else b.to(c))


def _ln(x, w, b, eps, out_dtype, impl):
    y, _, mean, rstd = _ln_forward(x, None, w, b, eps, out_dtype, _sub_impl(impl))
    return y, mean, rstd


def _sub_impl(impl: str) -> str:
    return "auto" if impl == "cuda" else impl  # LayerNorm and bias+GELU have no CUDA C++ kernel


def _forward_impl(x, ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b,
                  num_heads, scale, eps1, eps2, compute_dtype, impl):
    c = compute_dtype or x.dtype
    with torch.autocast(x.device.type, enabled=False):
        h, mean1, rstd1 = _ln(x, ln1_w, ln1_b, eps1, c, impl)
        qkv = _linear(h, qkv_w, qkv_b, c)
        attn = model_level_impl(impl, qkv, num_heads)
        o, lse = _impl_of(_visible_attention)(qkv, num_heads, None, None, scale, attn)
        p = _linear(o, proj_w, proj_b, c)
        h2, s, mean2, rstd2 = _ln_forward(p, x, ln2_w, ln2_b, eps2, c, _sub_impl(impl))  # s = p + x in x's dtype
        a = _linear(h2, fc1_w, None, c)
        g = _impl_of(_bias_gelu_op)(a, fc1_b, _sub_impl(impl))
        m = _linear(g, fc2_w, fc2_b, c)
        y = s + m
    return y, qkv, o, lse, p, a, torch.stack((mean1, rstd1, mean2, rstd2))


@custom_op("maefast::vit_block", mutates_args=())
def _vit_block_op(x: torch.Tensor, ln1_w: torch.Tensor, ln1_b: torch.Tensor, qkv_w: torch.Tensor,
                  qkv_b: Optional[torch.Tensor], proj_w: torch.Tensor, proj_b: torch.Tensor, ln2_w: torch.Tensor,
                  ln2_b: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor, fc2_w: torch.Tensor,
                  fc2_b: torch.Tensor, num_heads: int, scale: float, eps1: float, eps2: float,
                  compute_dtype: Optional[torch.dtype], impl: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor]:
    """Returns (y, and what the backward needs: qkv, attention out, lse, attention projection p, a, the
    two LayerNorms' statistics (mean1, rstd1, mean2, rstd2) stacked fp32)."""
    return _forward_impl(x, ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b,
                         num_heads, scale, eps1, eps2, compute_dtype, impl)


@_vit_block_op.register_fake
def _(x, ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b, num_heads, scale,
      eps1, eps2, compute_dtype, impl):
    c = compute_dtype or x.dtype
    lead = x.shape[:-1]
    s_dtype = torch.promote_types(x.dtype, c)
    return (x.new_empty(x.shape, dtype=s_dtype), x.new_empty(*lead, qkv_w.shape[0], dtype=c),
            x.new_empty(*lead, qkv_w.shape[0] // 3, dtype=c),
            x.new_empty(x.shape[0], num_heads, x.shape[1], dtype=torch.float32),
            x.new_empty(x.shape, dtype=c), x.new_empty(*lead, fc1_w.shape[0], dtype=c),
            x.new_empty(4, *lead, dtype=torch.float32))


def _wgrad(dout: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """dW = dout^T inp over all rows, in their (matmul) dtype."""
    return dout.reshape(-1, dout.shape[-1]).t() @ inp.reshape(-1, inp.shape[-1])


def _cast_bsum(dout: torch.Tensor, dtype: torch.dtype | None, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dout in `dtype` (dout itself when None or its own), the bias gradient: the column sums of those
    values, accumulated in fp32). Triton: one kernel reads dout once for both (kernels/colsum.py)."""
    n = dout.shape[-1]
    # through its module: a profile's BackendLog counts the block's choice once, in vit_block
    if _backend.choose_impl(impl, dout.device, auto_order=("triton",), what="maefast.ops.vit_block") == "triton":
        from ..kernels.colsum import colsum

        with device_guard(dout):
            y, sums = colsum(dout.reshape(-1, n), dtype)
        return y.view(dout.shape), sums
    y = dout if dtype is None else dout.to(dtype)
    return y, y.reshape(-1, n).sum(0, dtype=torch.float32)


@custom_op("maefast::vit_block_backward", mutates_args=())
def _vit_block_bwd_op(dy: torch.Tensor, x: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                      p: torch.Tensor, a: torch.Tensor, stats: torch.Tensor, ln1_w: torch.Tensor, ln1_b: torch.Tensor,
                      qkv_w: torch.Tensor, has_qkv_b: bool, proj_w: torch.Tensor, ln2_w: torch.Tensor,
                      ln2_b: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor, fc2_w: torch.Tensor,
                      num_heads: int, scale: float, compute_dtype: Optional[torch.dtype], impl: str
                      ) -> list[torch.Tensor]:
    """Returns [dx, d ln1_w, d ln1_b, d qkv_w, d qkv_b (empty without bias), d proj_w, d proj_b, d ln2_w,
    d ln2_b, d fc1_w, d fc1_b, d fc2_w, d fc2_b]; weight grads in c, LayerNorm and bias grads fp32."""
    c = compute_dtype or x.dtype
    sub = _sub_impl(impl)
    with torch.autocast(x.device.type, enabled=False):
        # MLP: g written again by the GELU backward from a, as the forward wrote it
        mean1, rstd1, mean2, rstd2 = stats.unbind(0)
        dm, d_fc2_b = _cast_bsum(dy, c, sub)
        dg = dm @ fc2_w.to(c)
        da, d_fc1_b, g = _gelu_backward_and_output(dg, a, fc1_b, sub)  # g as the forward made it, same pass
        del dg
        d_fc2_w = _wgrad(dm, g)
        del g, dm
        dh2 = da @ fc1_w.to(c)
        # LN2's backward from the forward's p and x (s = p + x formed again) and statistics, + dy; h2 back
        # from the same pass, as the forward made it
        ds, d_ln2_w, d_ln2_b, h2 = _ln_backward_and_output(dh2, dy.to(torch.promote_types(p.dtype, x.dtype)), p, x,
                                                           ln2_w, ln2_b, mean2, rstd2, c, sub)
        del dh2
        d_fc1_w = _wgrad(da, h2)
        del da, h2
        # attention half
        dp, d_proj_b = _cast_bsum(ds, c, sub)
        d_proj_w = _wgrad(dp, o)
        do = dp @ proj_w.to(c)
        del dp
        attn_bwd = model_level_impl(impl, qkv, num_heads)  # the forward's choice; the CUDA C++ kernel is forward-only
        dqkv = _impl_of(_visible_attention_backward)(do, qkv, o, lse, num_heads, None, None, scale,
                                                     "triton" if attn_bwd == "cuda" else attn_bwd)
        del do
        d_qkv_b = _cast_bsum(dqkv, None, sub)[1] if has_qkv_b else dqkv.new_empty(0, dtype=torch.float32)
        dh = dqkv @ qkv_w.to(c)
        dx, d_ln1_w, d_ln1_b, h = _ln_backward_and_output(dh, ds.to(x.dtype), x, None, ln1_w, ln1_b, mean1, rstd1,
                                                          c, sub)  # + ds; h as the forward made it
        del dh
        d_qkv_w = _wgrad(dqkv, h)
        del dqkv, h
    return [dx, d_ln1_w, d_ln1_b, d_qkv_w, d_qkv_b, d_proj_w, d_proj_b, d_ln2_w, d_ln2_b, d_fc1_w, d_fc1_b,
            d_fc2_w, d_fc2_b]


@_vit_block_bwd_op.register_fake
def _(dy, x, qkv, o, lse, p, a, stats, ln1_w, ln1_b, qkv_w, has_qkv_b, proj_w, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w,
      num_heads, scale, compute_dtype, impl):
    c = compute_dtype or x.dtype
    f32 = torch.float32
    d = x.shape[-1]
    return [torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(d, dtype=f32),
            x.new_empty(d, dtype=f32), qkv_w.new_empty(qkv_w.shape, dtype=c),
            x.new_empty(qkv_w.shape[0] if has_qkv_b else 0, dtype=f32), proj_w.new_empty(proj_w.shape, dtype=c),
            x.new_empty(d, dtype=f32), x.new_empty(d, dtype=f32), x.new_empty(d, dtype=f32),
            fc1_w.new_empty(fc1_w.shape, dtype=c), x.new_empty(fc1_w.shape[0], dtype=f32),
            fc2_w.new_empty(fc2_w.shape, dtype=c), x.new_empty(d, dtype=f32)]


def _setup(ctx, inputs, output):
    (x, ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b, num_heads, scale,
     eps1, eps2, compute_dtype, impl) = inputs
    _, qkv, o, lse, p, a, stats = output
    ctx.mark_non_differentiable(qkv, o, lse, p, a, stats)
    # the saved-only outputs get no gradient: without this autograd would hand the backward six
    # zero-filled tensors of their sizes (~0.4 GB a ViT-H block at batch 256) that it never reads
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, qkv, o, lse, p, a, stats, ln1_w, ln1_b, qkv_w, proj_w, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w)
    ctx.args = (num_heads, scale, compute_dtype, impl)  # the eps live on in the saved statistics
    ctx.has_qkv_b = qkv_b is not None
    ctx.dtypes = [t.dtype if t is not None else None for t in
                  (x, ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b)]


def _backward(ctx, dy, *_unused):
    x, qkv, o, lse, p, a, stats, ln1_w, ln1_b, qkv_w, proj_w, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w = ctx.saved_tensors
    if dy is None:
        dy = x.new_zeros(x.shape, dtype=torch.promote_types(x.dtype, p.dtype))
    grads = bwd(ctx, _vit_block_bwd_op)(dy, x, qkv, o, lse, p, a, stats, ln1_w, ln1_b, qkv_w, ctx.has_qkv_b, proj_w,
                                        ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, *ctx.args)
    out = []
    for g, dt in zip(grads, ctx.dtypes):
        out.append(None if dt is None else (g if g.dtype == dt else g.to(dt)))
    return (*out, None, None, None, None, None, None)


register_autograd(_vit_block_op, _backward, setup_context=_setup)


def vit_block(x: torch.Tensor, ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b,
              *, num_heads: int, scale: float | None = None, eps1: float = 1e-6, eps2: float = 1e-6,
              impl: str = "auto") -> torch.Tensor:
    """A pre-norm ViT block (the official/timm `Block` with exact GELU) in one op; see the module docstring.

    Args:
        x: (N, T, D) float32/bfloat16/float16 residual stream (fp32 under autocast, like the official).
        ln1_w, ln1_b, ln2_w, ln2_b: (D,) norm1 / norm2. qkv_w (3D, D), qkv_b (3D,) or None;
            proj_w (D, D), proj_b (D,); fc1_w (Dh, D), fc1_b (Dh,); fc2_w (D, Dh), fc2_b (D,).
        num_heads: H (D = H * head dim). scale: softmax scale (default head dim ** -0.5).
        eps1, eps2: the two LayerNorms' eps.
        impl: "auto" | "triton" | "cuda" (the CUDA C++ attention forward where it runs) | "reference".
    Returns:
        (N, T, D) in the promoted dtype of x and the matmul dtype (x's, for an fp32 stream).
        Matmuls run in the autocast dtype when autocast is on, else in x's dtype.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    # "triton" and "cuda" must be able to run here (the CUDA C++ kernel is the attention forward's;
    # a shape it does not take runs Triton, but a machine without it raises, as every op does); called
    # through its module: a profile's BackendLog counts an op module's own choose_impl as a run
    _backend.choose_impl(impl, x.device, auto_order=("triton",), cuda_op="attention_fwd", what="maefast.ops.vit_block")
    check_tensor("fc1_w", fc1_w, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    d = x.shape[-1]
    shapes = {"ln1_w": (d,), "ln1_b": (d,), "qkv_w": (3 * d, d), "qkv_b": (3 * d,), "proj_w": (d, d),
              "proj_b": (d,), "ln2_w": (d,), "ln2_b": (d,), "fc1_w": (fc1_w.shape[0], d),
              "fc1_b": (fc1_w.shape[0],), "fc2_w": (d, fc1_w.shape[0]), "fc2_b": (d,)}
    for name, t in zip(_WEIGHTS, (ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b,
                                  fc2_w, fc2_b)):
        if t is None and name == "qkv_b":
            continue
        check_tensor(name, t, dtypes=FLOAT_DTYPES, device=x.device)
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{name} must have shape {shapes[name]} for x of shape {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or d % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing D={d}, got {num_heads!r}")
    check_scale(scale)
    for name, eps in (("eps1", eps1), ("eps2", eps2)):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"{name} must be a float >= 0, got {eps!r}")
    c = autocast_dtype(x.device)
    head_dim = x.shape[-1] // num_heads
    scale = head_dim ** -0.5 if scale is None else float(scale)
    return call(_vit_block_op, x, ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w,
                fc2_b, num_heads, scale, float(eps1), float(eps2), c, impl)[0]


__all__ = ["vit_block"]
