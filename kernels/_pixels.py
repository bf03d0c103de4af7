"""uint8 pixels in the Triton kernels: per-channel normalisation x = v * scale_c + shift_c in fp32
(the fold of ToTensor + Normalize; see maefast/ops/_pixels.py), up to 4 channels whose factors are
scalar kernel arguments px_scale0..3 / px_shift0..3."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def normalize_pixels(v, c, px_scale0, px_scale1, px_scale2, px_scale3, px_shift0, px_shift1, px_shift2, px_shift3):
    """v: uint8 pixels; c: their channel (an int tensor broadcastable to v). Returns fp32 v * scale_c + shift_c
    (one rounding, an fma on the GPU)."""
    scale = tl.where(c == 0, px_scale0, tl.where(c == 1, px_scale1, tl.where(c == 2, px_scale2, px_scale3)))
    shift = tl.where(c == 0, px_shift0, tl.where(c == 1, px_shift1, tl.where(c == 2, px_shift2, px_shift3)))
    x = v.to(tl.float32)
    return tl.fma(x, tl.broadcast_to(scale, x.shape), tl.broadcast_to(shift, x.shape))


def affine_args(affine) -> list[float]:
    """The launchers' px_scale0..3, px_shift0..3 arguments: (scale, shift) of 4 floats each, or
    None (float images: unused)."""
    if affine is None:
        return [1.0] * 4 + [0.0] * 4
    scale, shift = affine
    return [float(v) for v in scale] + [float(v) for v in shift]
