"""Reference patch embedding and its masked (visible-only) form."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_embed(imgs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, patch_size: int) -> torch.Tensor:
    """Official Conv2d patch embedding: (N, C, H, W) -> (N, L, D); weight [D, C, p, p]."""
    x = F.conv2d(imgs, weight, bias, stride=patch_size)
    return x.flatten(2).transpose(1, 2)


def masked_patch_embed(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, pos_embed: torch.Tensor | None, patch_size: int) -> torch.Tensor:
    """(embed(all patches) + pos_embed[1:])[ids_keep] -> (N, K, D); pos_embed (1, 1+L, D) or None,
    added as the official adds it (dtypes promoted: fp32 for a bf16 conv output and an fp32 pos_embed)."""
    x = patch_embed(imgs, weight, bias, patch_size)
    if pos_embed is not None:
        x = x + pos_embed[:, 1:, :]
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
