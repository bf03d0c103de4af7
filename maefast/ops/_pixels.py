"""uint8 images in the kernels: the official normalisation folded into one multiply-add per pixel.

Official (torchvision ToTensor + Normalize, fp32): x = (v / 255 - mean_c) / std_c, three roundings.
Kernels: x = fma(v, scale_c, shift_c) in fp32, scale_c = 1 / (255 std_c), shift_c = -mean_c / std_c
(computed in float64, rounded once to fp32). For ImageNet's mean/std, over all 256 values of each
channel, the two differ by at most 4.8e-7 (2 ulp at |x| ~ 2.6); the fold is the closer of the two to
the exact value (2.3e-7 vs 3.7e-7 off), and both round to the same bf16 and fp16 value everywhere, so
under autocast the GEMM reads the same inputs as after normalising to fp32 first.
The factors reach the kernels as scalar arguments (no device buffer: nothing to copy to the device
per call, so a CUDA graph captures it), MAX_CHANNELS of each.
"""
from __future__ import annotations

import torch

MAX_CHANNELS = 4  # grey, RGB, RGBA; more channels take the reference (impl="auto") or raise


def pixel_affine(stats: tuple[tuple[float, ...], tuple[float, ...]]) -> tuple[list[float], list[float]]:
    """(scale, shift), MAX_CHANNELS fp32-representable floats each (padded with 1, 0), from
    (mean, std) per channel (`maefast.reference.normalize.pixel_stats`)."""
    mean, std = stats
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).float().tolist()
    shift = (-m / s).float().tolist()
    pad = MAX_CHANNELS - len(scale)
    return scale + [1.0] * pad, shift + [0.0] * pad


def kernels_take(imgs: torch.Tensor) -> tuple[bool, str]:
    """(whether the Triton/CUDA kernels read these images, why not)."""
    if imgs.dtype == torch.uint8 and imgs.shape[1] > MAX_CHANNELS:
        return False, (f"uint8 imgs with {imgs.shape[1]} channels (the kernels normalise up to {MAX_CHANNELS}; "
                       "impl='reference' or 'auto' takes any)")
    return True, ""
