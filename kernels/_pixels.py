"""uint8 pixels in the Triton kernels: per-channel normalisation x = (v - offset_c) * scale_c in fp32
(the fold of ToTensor + Normalize and its rounding: maefast/ops/_pixels.py), up to 4 channels whose
factors are scalar kernel arguments px_scale0..3 / px_offset0..3."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pixel_factors(c, px_scale0, px_scale1, px_scale2, px_scale3, px_offset0, px_offset1, px_offset2, px_offset3):
    """(scale_c, offset_c) fp32 for channel ids `c` (any int tensor). Computed once per column
    where the channel depends only on the column (the patch-embedding GEMM), not per tile element."""
    scale = tl.where(c == 0, px_scale0, tl.where(c == 1, px_scale1, tl.where(c == 2, px_scale2, px_scale3)))
    offset = tl.where(c == 0, px_offset0, tl.where(c == 1, px_offset1, tl.where(c == 2, px_offset2, px_offset3)))
    return scale, offset


@triton.jit
def apply_pixel_factors(v, scale, offset):
    """fp32 (v - offset) * scale: uint8 pixels v, factors broadcastable to v (v - offset is exact
    for |v - offset| < 128)."""
    return (v.to(tl.float32) - offset) * scale


@triton.jit
def normalize_pixels(v, c, px_scale0, px_scale1, px_scale2, px_scale3, px_offset0, px_offset1, px_offset2,
                     px_offset3):
    """v: uint8 pixels; c: their channel (an int tensor broadcastable to v). Returns fp32
    (v - offset_c) * scale_c."""
    scale, offset = pixel_factors(c, px_scale0, px_scale1, px_scale2, px_scale3, px_offset0, px_offset1, px_offset2,
                                  px_offset3)
    return apply_pixel_factors(v, scale, offset)


def affine_args(affine) -> list[float]:
    """The launchers' px_scale0..3, px_offset0..3 arguments: (scale, offset) of 4 floats each, or
    None (float images: unused)."""
    if affine is None:
        return [1.0] * 4 + [0.0] * 4
    scale, offset = affine
    return [float(v) for v in scale] + [float(v) for v in offset]
