"""Drop-in `Attention` and `Block` (timm 0.3.2 / official MAE constructor arguments and state-dict
keys: `norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) whose attention runs
`maefast.ops.visible_attention` on the packed qkv output, with no layout copies.

An official block's weights load as they are: `Block(...).load_state_dict(official_block.state_dict())`.
Both modules also take `cu_seqlens` / `max_seqlen` for a packed batch of sequences of different
lengths (x is then (T, C) or (1, T, C)).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.fast import is_layer_norm
from ..ops.attention import visible_attention
from ..reference.model import Attention as _ReferenceAttention
from ..reference.model import Mlp  # plain PyTorch: the same module as the reference

__all__ = ["Attention", "Block", "Mlp", "drop_path"]


class Attention(_ReferenceAttention):
    """timm/official `Attention` (same arguments, defaults and keys) on the fused op.

    forward(x (N, L, C), cu_seqlens=None, max_seqlen=None) -> (N, L, C). With attn_drop > 0 in
    training mode, the probabilities need dropout, which the kernels do not do: that case runs
    PyTorch's SDPA (with the layout copies) instead. MAE pre-training uses attn_drop = 0.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 impl: str = "auto"):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                         proj_drop=proj_drop)
        self.impl = impl

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        qkv = self.qkv(x)
        if self.training and self.attn_drop.p > 0:
            x = self._sdpa_with_dropout(qkv, cu_seqlens)
        else:
            x = visible_attention(qkv, self.num_heads, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                  scale=self.scale, impl=self.impl)
        return self.proj_drop(self.proj(x))

    def _sdpa_with_dropout(self, qkv: torch.Tensor, cu_seqlens) -> torch.Tensor:
        if cu_seqlens is not None:
            raise ValueError("attn_drop > 0 in training mode is not supported with cu_seqlens")
        n, L, width = qkv.shape
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p, scale=self.scale)
        return out.transpose(1, 2).reshape(n, L, width // 3)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, scale={self.scale:g}, impl={self.impl!r}"


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's DropPath): x (N, ...) with whole samples zeroed w.p. p."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class Block(nn.Module):
    """Pre-norm transformer block with timm 0.3.2's arguments and attribute names.

    forward(x (N, L, C), cu_seqlens=None, max_seqlen=None) -> (N, L, C); with cu_seqlens, x holds
    the packed rows (T, C) or (1, T, C) of several sequences (drop_path is then not supported).

    fused=True runs the whole block as one op (`maefast.ops.vit_block`: one autograd node, LayerNorm
    and GELU recomputed in the backward, ~1/3 less activation memory) whenever it computes the same
    thing: no cu_seqlens, no active dropout/drop-path, exact GELU, affine LayerNorms, proj/fc biases.
    Otherwise (and always with fused=False) the block runs op by op.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm, impl: str = "auto",
                 fused: bool = False):
        super().__init__()
        self.fused = bool(fused)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                              proj_drop=drop, impl=impl)
        self.drop_path_prob = float(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def _one_op(self, cu_seqlens) -> bool:
        if not self.fused or cu_seqlens is not None:
            return False
        if self.training and (self.drop_path_prob or self.attn.attn_drop.p or self.attn.proj_drop.p
                              or self.mlp.drop.p):
            return False
        act = self.mlp.act
        norms_ok = all(is_layer_norm(n) and n.weight is not None and n.bias is not None
                       for n in (self.norm1, self.norm2))
        return (norms_ok and isinstance(act, nn.GELU) and act.approximate == "none"
                and None not in (self.attn.proj.bias, self.mlp.fc1.bias, self.mlp.fc2.bias))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        if self._one_op(cu_seqlens):
            from ..ops.block import vit_block

            a, m = self.attn, self.mlp
            return vit_block(x, self.norm1.weight, self.norm1.bias, a.qkv.weight, a.qkv.bias, a.proj.weight,
                             a.proj.bias, self.norm2.weight, self.norm2.bias, m.fc1.weight, m.fc1.bias, m.fc2.weight,
                             m.fc2.bias, num_heads=a.num_heads, scale=a.scale, eps1=self.norm1.eps,
                             eps2=self.norm2.eps, impl=a.impl)
        p = self.drop_path_prob if self.training else 0.0
        if p and cu_seqlens is not None:
            raise ValueError("drop_path > 0 in training mode is not supported with cu_seqlens (it drops whole samples)")
        x = x + drop_path(self.attn(self.norm1(x), cu_seqlens, max_seqlen), p, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), p, self.training)

    def extra_repr(self) -> str:
        parts = ([f"drop_path={self.drop_path_prob:g}"] if self.drop_path_prob else []) + (["fused=True"] if self.fused
                                                                                          else [])
        return ", ".join(parts)
