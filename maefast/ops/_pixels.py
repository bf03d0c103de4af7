"""uint8 images in the kernels: the official normalisation folded into one subtract and one multiply.

Official (torchvision ToTensor + Normalize, fp32): x = (v / 255 - mean_c) / std_c, mean/std as fp32
values, three roundings. Kernels: x = (v - offset_c) * scale_c in fp32, offset_c = 255 mean_c,
scale_c = 1 / (255 std_c) (from the fp32 mean/std, computed in float64, rounded once to fp32). For
ImageNet's statistics, over all 256 values of each channel: the two differ by at most 4.8e-7 (2 ulp
at |x| ~ 2.6); each is within 2.6e-7 of the exact value, and within 3.4e-8 where |x| < 0.05 (v -
offset_c is exact there, so no rounding of a large term is left where the value is small: that is
where norm_pix_loss's per-patch std can be small and amplify it; v * scale + shift as one fma is 3x
further off there); and both round to the same bf16 and fp16 value everywhere, so under autocast
the GEMM reads exactly what it reads after normalising to fp32 first.
The factors reach the kernels as scalar arguments (no device buffer: nothing to copy to the device
per call, so a CUDA graph captures it), MAX_CHANNELS of each.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

MAX_CHANNELS = 4  # grey, RGB, RGBA; more channels take the reference (impl="auto") or raise


def pixel_affine(stats: tuple[Sequence[float], Sequence[float]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, offset), MAX_CHANNELS fp32-representable floats each (padded with 1, 0), from
    (mean, std) per channel (`maefast.reference.normalize.pixel_stats`). Cached by the values: every
    op call asks again, and building them (CPU tensors) cost ~15 us a call; no device work either way."""
    mean, std = stats
    return _pixel_affine(tuple(float(v) for v in mean), tuple(float(v) for v in std))


@functools.lru_cache(maxsize=64)
def _pixel_affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    m = torch.tensor(mean, dtype=torch.float32).double()  # the values Normalize computes with
    s = torch.tensor(std, dtype=torch.float32).double()
    scale = (1.0 / (255.0 * s)).float().tolist()
    offset = (255.0 * m).float().tolist()
    pad = MAX_CHANNELS - len(scale)
    return tuple(scale + [1.0] * pad), tuple(offset + [0.0] * pad)  # tuples: a cached value must not change


def kernels_take(imgs: torch.Tensor) -> tuple[bool, str]:
    """(whether the Triton/CUDA kernels read these images, why not)."""
    if imgs.dtype == torch.uint8 and imgs.shape[1] > MAX_CHANNELS:
        return False, (f"uint8 imgs with {imgs.shape[1]} channels (the kernels normalise up to {MAX_CHANNELS}; "
                       "impl='reference' or 'auto' takes any)")
    return True, ""
