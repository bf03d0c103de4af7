"""Random masking exactly as the official MAE (models_mae.py, random_masking)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .._validate import check_mask_ratio, check_tensor, compiling


class MaskIds(NamedTuple):
    ids_keep: torch.Tensor     # (N, K) int64, the kept patches in shuffle order
    ids_restore: torch.Tensor  # (N, L) int64, argsort(ids_shuffle)
    mask: torch.Tensor         # (N, L) float, 1 = removed, original order


def masking_ids(batch: int, num_patches: int, mask_ratio: float, *, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, device=None,
                dtype: torch.dtype = torch.float32) -> MaskIds:
    """The index side of random masking.

    ids_shuffle = argsort(noise) (ascending: small noise is kept; ties by index), ids_restore = argsort(ids_shuffle),
    len_keep = floor(L * (1 - mask_ratio)), ids_keep = ids_shuffle[:, :len_keep],
    mask (1 = removed) in the original patch order, float32 like the official (``dtype``).
    """
    len_keep = check_mask_ratio(mask_ratio, num_patches, official=True)  # the official code's domain
    if noise is None:
        # generator=None spelled out selects rand's generator overload, which takes no symbolic sizes: a
        # model compiled with dynamic shapes (or recompiled so after a batch-size change) failed to trace
        noise = (torch.rand(batch, num_patches, device=device) if generator is None
                 else torch.rand(batch, num_patches, generator=generator, device=device))
    else:
        check_tensor("noise", noise, ndim=2)
        if tuple(noise.shape) != (batch, num_patches):
            raise ValueError(f"noise must have shape (N, L) = ({batch}, {num_patches}), got {tuple(noise.shape)}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating point tensor, got {noise.dtype}")
    # stable: equal noise values keep index order, as every maefast kernel does (the official
    # unstable argsort may order ties either way; for continuous noise there are none)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, num_patches, device=noise.device, dtype=dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return MaskIds(ids_keep, ids_restore, mask)


def random_masking(x, mask_ratio: float, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None):
    """Official random masking.

    Args:
        x: either tokens (N, L, D) -> returns ``(x_masked (N, K, D), mask (N, L), ids_restore (N, L))``
           exactly like the official code, or a shape ``(N, L)`` -> returns ``MaskIds(ids_keep,
           ids_restore, mask)``.
        mask_ratio: fraction removed, in [0, 1] as the official code takes it; K = floor(L * (1 - mask_ratio))
            (0 keeps every patch; K may be 0). maefast's fast path and ops keep one patch at least.
        noise: optional (N, L) uniform noise (same convention as the official ``noise``).
        generator: torch.Generator for the noise draw when noise is None.
    """
    if isinstance(x, torch.Tensor):
        if not compiling():
            check_tensor("x", x, ndim=3)
        n, L, d = x.shape
        ids = masking_ids(n, L, mask_ratio, noise=noise, generator=generator, device=x.device)
        x_masked = torch.gather(x, 1, ids.ids_keep.unsqueeze(-1).expand(-1, -1, d))
        return x_masked, ids.mask, ids.ids_restore
    if isinstance(x, (tuple, list, torch.Size)) and len(x) == 2 and all(isinstance(v, int) for v in x):
        n, L = int(x[0]), int(x[1])
        if n < 1 or L < 1:
            raise ValueError(f"shape must be positive (N, L), got {tuple(x)}")
        device = noise.device if noise is not None else None
        return masking_ids(n, L, mask_ratio, noise=noise, generator=generator, device=device)
    raise TypeError(f"x must be a (N, L, D) tensor or an (N, L) shape, got {type(x).__name__}")
