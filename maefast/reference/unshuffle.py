"""Reference decoder un-shuffle (official forward_decoder, the part before the blocks)."""
from __future__ import annotations

import torch


def unshuffle(x_vis: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
              pos_embed: torch.Tensor) -> torch.Tensor:
    """x_vis (N, 1+K, Dd) with the cls token first; mask_token (1, 1, Dd); ids_restore (N, L);
    pos_embed (1, 1+L, Dd). Returns (N, 1+L, Dd): visible tokens at their original places,
    mask_token elsewhere, plus the position embedding, in the three dtypes' promotion."""
    n, k1, d = x_vis.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.expand(n, L + 1 - k1, d)
    x_ = torch.cat([x_vis[:, 1:, :], mask_tokens], dim=1)  # dtypes promoted, as in the official code
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    x = torch.cat([x_vis[:, :1, :], x_], dim=1)
    return x + pos_embed
