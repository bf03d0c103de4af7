"""Fixed 2D sin-cos position embeddings with the official channel layout.

The first D/2 channels encode the column (w) index, the second D/2 the row (h) index; each half
is [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (D/4)). Computed in float64 on the CPU like the
official numpy code (also inside a `with torch.device("cuda")` block: CUDA's sin/cos are other functions), returned
as float32 CPU tensors. A zero row is prepended for the cls token.
"""
from __future__ import annotations

import torch

from .._validate import to_2tuple


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device="cpu") / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1, 1).to(torch.float64) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size, cls_token: bool = False) -> torch.Tensor:
    """Returns (h*w [+1], embed_dim) float32; grid_size is an int or (h, w)."""
    if not isinstance(embed_dim, int) or embed_dim <= 0 or embed_dim % 4:
        raise ValueError(f"embed_dim must be a positive multiple of 4, got {embed_dim}")
    h, w = to_2tuple("grid_size", grid_size)
    if h < 1 or w < 1:
        raise ValueError(f"grid_size must be positive, got {(h, w)}")
    # official: grid = meshgrid(grid_w, grid_h) -> grid[0] is the column index, row-major tokens
    rows = torch.arange(h, dtype=torch.float64, device="cpu").repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device="cpu").repeat(h)
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64, device="cpu"), emb], dim=0)
    return emb.to(torch.float32)
