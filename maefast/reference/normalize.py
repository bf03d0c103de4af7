"""uint8 images: the official input normalisation (torchvision ToTensor, then Normalize).

The official model takes images already normalised: `x = (img / 255 - mean) / std` per channel, in
fp32, with ImageNet's mean/std. maefast's ops and models also take the raw uint8 NCHW batch and
normalise it themselves; this is what they must equal.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .._validate import check_pixel_stats

# timm's IMAGENET_DEFAULT_MEAN / _STD, as the official main_pretrain.py passes them to Normalize
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pixel_stats(imgs: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The per-channel (mean, std) that `imgs` are normalised with: None for float images (already
    normalised, the official convention; mean/std must then be None); for uint8 images, the given
    values or ImageNet's (3 channels), as tuples of C floats. Checked, also while torch.compile traces
    (as every public op's shapes: the error comes from the call, not from inside the compiled graph)."""
    check_pixel_stats("imgs", imgs, mean, std)
    if imgs.dtype != torch.uint8:
        return None
    return (tuple(float(m) for m in (IMAGENET_MEAN if mean is None else mean)),
            tuple(float(s) for s in (IMAGENET_STD if std is None else std)))


def normalize(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, C, H, W) uint8 -> fp32 ``(imgs / 255 - mean) / std``, torchvision's ToTensor + Normalize
    operation for operation (each rounded in fp32; mean/std as fp32 values)."""
    # Divisors as 0-d tensors on the images' device (torch.full: a fill kernel, no host-to-device copy, so
    # a captured step may hold it): a Python scalar divisor is a reciprocal multiply on CUDA ("may lose
    # one bit", ATen's BinaryDivTrueKernel), where ToTensor + Normalize divide on the CPU, exactly
    def div(t, v):
        return t.div(torch.full((), v, dtype=torch.float32, device=t.device))

    x = div(imgs.to(torch.float32), 255.0)
    return torch.stack([div(x[:, c].sub(m), s) for c, (m, s) in enumerate(zip(mean, std))], dim=1)


def as_float_images(imgs: torch.Tensor, stats: tuple | None) -> torch.Tensor:
    """The fp32 images an op computes with: `normalize` for uint8 (stats from `pixel_stats`), else
    imgs in fp32."""
    return normalize(imgs, *stats) if stats is not None else imgs.float()
