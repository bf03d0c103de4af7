"""Drop-in MAE reconstruction loss module (the official `MaskedAutoencoderViT.forward_loss`)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .._validate import check_images, check_patch_size
from ..ops._backend import check_impl, check_no_kernel_for_fp64
from ..ops.loss import norm_pix_loss
from ..reference.loss import forward_loss
from ..reference.normalize import normalize, pixel_stats


class NormPixLoss(nn.Module):
    """The official MAE loss as a module: ``forward(imgs, pred, mask)`` = ``forward_loss(imgs, pred, mask)``.

    Args:
        patch_size: p (the model's patch size).
        norm_pix_loss: normalise each target patch (official flag, default False like the official model).
        impl: "auto" | "triton" | "cuda" | "reference".

    forward(imgs (N, C, H, W), pred (N, L, p*p*C), mask (N, L) float or bool, 1 = removed) -> 0-d fp32
    loss (float64 inputs: the official computation in float64).
    With ``pred_on="masked"``, pred is (N, L-K, p*p*C) (masked patches in shuffle order) and the
    third argument is ids_restore (N, L); see `maefast.ops.norm_pix_loss`. uint8 imgs (raw pixels)
    are normalised with ``mean``/``std`` per channel (None: ImageNet's) as the kernels read them.
    """

    def __init__(self, patch_size: int, norm_pix_loss: bool = False, impl: str = "auto"):
        super().__init__()
        check_patch_size(patch_size)
        if not isinstance(norm_pix_loss, bool):
            raise TypeError(f"norm_pix_loss must be a bool, got {norm_pix_loss!r}")
        check_impl(impl, "maefast.nn.NormPixLoss")
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        self.impl = impl

    def forward(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, pred_on: str = "all", *,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
        if pred_on == "all" and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            mask = mask.to(torch.float32)  # the official (loss * mask).sum() / mask.sum() reads it as 0/1: exact
        if pred_on == "all" and torch.float64 in (getattr(imgs, "dtype", None), getattr(pred, "dtype", None)):
            # float64: the official ops, given uint8 imgs normalised first (the fp32 images of the uint8 contract)
            check_no_kernel_for_fp64(self.impl, "maefast.nn.NormPixLoss")
            check_images("imgs", imgs, self.patch_size, uint8=True)
            stats = pixel_stats(imgs, mean, std)
            imgs = imgs if stats is None else normalize(imgs, *stats)
            return forward_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss)
        return norm_pix_loss(pred, imgs, mask, self.patch_size, norm_pix=self.norm_pix_loss, pred_on=pred_on,
                             impl=self.impl, mean=mean, std=std)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, norm_pix_loss={self.norm_pix_loss}, impl={self.impl!r}"
