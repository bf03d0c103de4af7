"""The MAE reconstruction loss (official forward_loss)."""
from __future__ import annotations

import torch

from .._validate import check_images, check_patch_size, check_tensor, compiling
from .patchify import patchify

NORM_PIX_EPS = 1e-6


def norm_pix_target(target: torch.Tensor) -> torch.Tensor:
    """Per-patch normalization over the last dim: unbiased variance, (t - mean) / sqrt(var + 1e-6)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased (N-1), as the official
    return (target - mean) / (var + NORM_PIX_EPS) ** 0.5


def forward_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                 norm_pix_loss: bool = False) -> torch.Tensor:
    """Official MAE loss.

    Args:
        imgs: (N, C, H, W) images. pred: (N, L, p*p*C) predictions for every patch.
        mask: (N, L), 1 = removed (the loss looks only there).
    Returns a scalar: sum(per-patch MSE * mask) / sum(mask).
    """
    if not compiling():
        check_patch_size(patch_size)
        h, w = check_images("imgs", imgs, patch_size)
        n, c = imgs.shape[:2]
        check_tensor("pred", pred, ndim=3)
        if tuple(pred.shape) != (n, h * w, patch_size * patch_size * c):
            raise ValueError(f"pred must have shape (N, L, p*p*C) = {(n, h * w, patch_size * patch_size * c)}, "
                             f"got {tuple(pred.shape)}")
        check_tensor("mask", mask, ndim=2)
        if tuple(mask.shape) != (n, h * w):
            raise ValueError(f"mask must have shape (N, L) = {(n, h * w)}, got {tuple(mask.shape)}")
    target = patchify(imgs, patch_size)
    if norm_pix_loss:
        target = norm_pix_target(target)
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def masked_patch_ids(ids_restore: torch.Tensor, len_keep: int) -> torch.Tensor:
    """The masked patches in shuffle order: ids_shuffle[:, len_keep:] with ids_shuffle = argsort(ids_restore).

    ids_restore (N, L) int64 (a permutation per sample) -> (N, L - len_keep) int64 patch indices.
    """
    return torch.argsort(ids_restore, dim=1)[:, len_keep:]


def forward_loss_masked(imgs: torch.Tensor, pred: torch.Tensor, ids_restore: torch.Tensor, patch_size: int,
                        norm_pix_loss: bool = False) -> torch.Tensor:
    """The official loss when the head predicted only the masked patches.

    Args:
        imgs: (N, C, H, W). pred: (N, M, p*p*C), M = L - len_keep masked patches; row j of sample n
            predicts patch ids_shuffle[n, len_keep + j] (``masked_patch_ids`` order).
        ids_restore: (N, L) from masking; len_keep = L - M.
    Equals ``forward_loss(imgs, full_pred, mask)`` for any full_pred holding these rows at their
    patches (the loss looks only at masked patches): mean over the N*M rows of the per-patch MSE.
    """
    n, m, d = pred.shape
    L = ids_restore.shape[1]
    ids = masked_patch_ids(ids_restore, L - m)
    target = patchify(imgs, patch_size)
    target = torch.gather(target, 1, ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    if norm_pix_loss:
        target = norm_pix_target(target)
    loss = ((pred - target) ** 2).mean(dim=-1)
    return loss.sum() / (n * m)
