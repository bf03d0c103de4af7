"""Reference attention on the packed qkv layout (N, L, 3*H*Dh) of the official qkv Linear."""
from __future__ import annotations

import torch

from .._validate import check_tensor, compiling


def attention(qkv: torch.Tensor, num_heads: int, *, scale: float | None = None,
              cu_seqlens: torch.Tensor | None = None, dropout=None) -> torch.Tensor:
    """Softmax attention, non-causal. qkv (N, L, 3*H*Dh) -> (N, L, H*Dh).

    With ``cu_seqlens`` (B+1,) int32/int64 the input is (1, T, 3*H*Dh) or (T, 3*H*Dh): a packed
    batch of sequences; each attends within itself only. Computed in the input dtype, softmax in fp32.
    ``dropout``: a module applied to the attention probabilities before they weigh v (timm's ``attn_drop``,
    called as timm calls it: its own train/eval mode decides).
    """
    if cu_seqlens is not None:
        squeeze = qkv.dim() == 2
        rows = qkv if squeeze else qkv.reshape(qkv.shape[-2], qkv.shape[-1])
        bounds = [int(v) for v in cu_seqlens.tolist()]
        outs = [attention(rows[s:e].unsqueeze(0), num_heads, scale=scale, dropout=dropout)[0]
                for s, e in zip(bounds[:-1], bounds[1:])]
        out = torch.cat(outs, 0) if outs else rows.new_empty(0, rows.shape[-1] // 3)
        return out if squeeze else out.unsqueeze(0)
    if not compiling():
        check_tensor("qkv", qkv, ndim=3)
    n, L, three_hd = qkv.shape
    hd = three_hd // 3
    dh = hd // num_heads
    scale = dh ** -0.5 if scale is None else scale
    q, k, v = qkv.reshape(n, L, 3, num_heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q @ k.transpose(-2, -1)) * scale  # timm 0.3.2's order (scaling q first rounds differently)
    # softmax statistics in fp32 for half inputs (float64 stays float64 for oracles)
    attn = attn.softmax(dim=-1, dtype=torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype).to(q.dtype)
    if dropout is not None:
        attn = dropout(attn)
    return (attn @ v).transpose(1, 2).reshape(n, L, hd)
