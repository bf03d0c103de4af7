"""patchify / unpatchify with the official MAE layout.

Token index = row * w + col (row-major); inside a patch vector the index is
(p_row * p + p_col) * C + c (channel fastest).
"""
from __future__ import annotations

import torch

from .._validate import check_images, check_patch_size, check_tensor, compiling, to_2tuple


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, h*w, p*p*C), h = H/p, w = W/p."""
    if not compiling():
        check_patch_size(patch_size)
        check_images("imgs", imgs, patch_size)
    n, c, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size=None, channels: int = 3) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, h*p, w*p). grid_size (h, w) defaults to a square grid."""
    if not compiling():
        check_patch_size(patch_size)
        check_tensor("x", x, ndim=3)
    n, L, D = x.shape
    p = patch_size
    if grid_size is None:
        h = int(round(L ** 0.5))
        if h * h != L:
            raise ValueError(f"x has L={L} patches, which is not a square grid; pass grid_size=(h, w)")
        grid = (h, h)
    else:
        grid = to_2tuple("grid_size", grid_size)
    h, w = grid
    if h * w != L:
        raise ValueError(f"grid_size {grid} holds {h * w} patches but x has L={L}")
    if D != p * p * channels:
        raise ValueError(f"x last dim must be patch_size**2 * channels = {p * p * channels}, got {D}")
    x = x.reshape(n, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, h * p, w * p)
