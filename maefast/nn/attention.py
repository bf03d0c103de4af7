"""Drop-in `Attention` and `Block` (timm 0.3.2 / official MAE constructor arguments and state-dict
keys: `norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) whose attention runs
`maefast.ops.visible_attention` on the packed qkv output, with no layout copies.

An official block's weights load as they are: `Block(...).load_state_dict(official_block.state_dict())`.
Both modules also take `cu_seqlens` / `max_seqlen` for a packed batch of sequences of different
lengths (x is then (T, C) or (1, T, C)).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from .._modules import hooked, plain_layer, trusted_class, vit_block_computes
from .._validate import FLOAT_DTYPES, autocast_dtype
from ..ops._backend import check_impl
from ..ops.attention import sdpa_attention, visible_attention
from ..reference.attention import attention as reference_attention
from ..reference.model import Attention as _ReferenceAttention
from ..reference.model import Mlp  # plain PyTorch: the same module as the reference

__all__ = ["Attention", "Block", "DropPath", "Mlp", "drop_path"]


def _probs_reason(d: nn.Module, rate) -> str:
    """Why attn_drop needs the probabilities (a sentence's subject and verb)."""
    return ("hooks on attn_drop need" if hooked(d) else "an attn_drop with its own forward needs"
            if "forward" in d.__dict__ else f"an attn_drop of class {type(d).__name__} (not nn.Dropout) needs"
            if rate is None else f"attn_drop (p={rate:g}) in training mode needs dropout on")


class Attention(_ReferenceAttention):
    """timm/official `Attention` (same arguments, defaults and keys) on the fused op.

    forward(x (N, L, C), cu_seqlens=None, max_seqlen=None) -> (N, L, C). With attn_drop > 0 in
    training mode (attn_drop's own mode, as calling it decides), the probabilities need dropout, which
    the kernels do not do: that case runs PyTorch's SDPA (with the layout copies) instead. MAE
    pre-training uses attn_drop = 0. With hooks on ``attn_drop`` (the usual way to capture attention
    maps), or a module other than nn.Dropout / nn.Identity there, the probabilities are materialised,
    as timm computes them, and attn_drop is called on them. impl: as `maefast.ops.visible_attention`'s ("sdpa":
    torch's scaled_dot_product_attention on the same views; no cu_seqlens); an explicit "triton" or "cuda"
    refuses the two cases above (ValueError), which its kernels cannot serve.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 impl: str = "auto"):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                         proj_drop=proj_drop)
        check_impl(impl, "maefast.nn.Attention", sdpa=True)  # "sdpa": torch's SDPA, no cu_seqlens
        self.impl = impl
        self.scale = _real(self.scale, "qk_scale")  # the ops take a float (timm multiplies by any number)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if cu_seqlens is None and x.dim() != 3:
            raise ValueError(f"x must be (N, L, C) (or packed rows (T, C) with cu_seqlens), got shape {tuple(x.shape)}")
        rate = _dropout_rate(self.attn_drop)
        if (rate is None or hooked(self.attn_drop) or rate) and self.impl in ("triton", "cuda"):
            raise ValueError(f"impl={self.impl!r}: {_probs_reason(self.attn_drop, rate)} the attention probabilities, "
                             "which maefast's kernels never form; impl='auto' computes them with PyTorch there")
        if rate is None or hooked(self.attn_drop):
            if cu_seqlens is not None:
                raise ValueError(f"{_probs_reason(self.attn_drop, rate)} the attention probabilities, which are not "
                                 "materialised with cu_seqlens")
            # timm's computation: attn_drop called on the probabilities (an identity in eval mode)
            return self.proj_drop(self.proj(reference_attention(self.qkv(x), self.num_heads, scale=self.scale,
                                                                dropout=self.attn_drop)))
        qkv = self.qkv(x)
        if rate:
            x = self._sdpa_with_dropout(qkv, cu_seqlens)
        else:
            x = visible_attention(qkv, self.num_heads, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                  scale=self.scale, impl=self.impl)
        return self.proj_drop(self.proj(x))

    def _sdpa_with_dropout(self, qkv: torch.Tensor, cu_seqlens) -> torch.Tensor:
        if cu_seqlens is not None:
            raise ValueError("attn_drop > 0 in training mode is not supported with cu_seqlens")
        return sdpa_attention(qkv, self.num_heads, self.scale, dropout_p=self.attn_drop.p)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, scale={self.scale:g}, impl={self.impl!r}"


def _dropout_rate(m: nn.Module) -> float | None:
    """The rate at which a dropout slot (attn_drop, proj_drop, mlp.drop) drops now, by its own mode as calling it
    would (Monte Carlo dropout trains the Dropouts of an eval() block): a torch Dropout's p in training, else 0,
    and 0 for an Identity; None for another module (its own forward must run)."""
    if "forward" in m.__dict__ or type(m) not in (nn.Dropout, nn.Identity):
        return None
    return m.p if type(m) is nn.Dropout and m.training else 0.0


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's DropPath): x (N, ...) with whole samples zeroed w.p. p."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """timm's ``DropPath`` (its attribute ``drop_prob``, which stochastic-depth schedules set): `drop_path`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = _drop_rate(drop_prob, "drop_prob")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


def _real(v, name: str, what: str = "a number") -> float:
    """A number as a float: a Python or numpy number, or a 0-d tensor or array (TypeError naming ``name``)."""
    if hasattr(v, "ndim") and getattr(v, "ndim") == 0 and hasattr(v, "item"):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(v).__name__} {v!r}")
    return float(v)


def _drop_rate(p, name: str = "drop_path") -> float:
    """A drop-path rate as a float in [0, 1): a number, or a 0-d tensor or array (timm-style schedules
    pass ``torch.linspace(...)[i]``)."""
    p = _real(p, name, "a number in [0, 1)")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p!r}")
    return p


class Block(nn.Module):
    """Pre-norm transformer block with timm 0.3.2's arguments and attribute names.

    forward(x (N, L, C), cu_seqlens=None, max_seqlen=None) -> (N, L, C); with cu_seqlens, x holds
    the packed rows (T, C) or (1, T, C) of several sequences (drop_path is then not supported).

    fused=True runs the whole block as one op (`maefast.ops.vit_block`: one autograd node, LayerNorm
    and GELU recomputed in the backward, ~40% less activation memory than False) whenever it
    computes the same thing: no cu_seqlens, no dropout/drop-path in training mode (each module's own, as
    Monte Carlo dropout sets them), weights of x's dtype outside autocast, torch's exact GELU, affine
    LayerNorms, proj/fc biases, this module's own attention and MLP (their forwards not replaced), no
    hooks on the parts it would not call, a float32/16 input, an attention impl other than "sdpa". Otherwise (and
    always with fused=False) the block runs op by op, calling its parts as modules.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm, impl: str = "auto",
                 fused: bool = False):
        super().__init__()
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be True or False, got {fused!r}")
        if fused and impl == "sdpa":
            raise ValueError("fused=True runs maefast's own attention inside the block's one op; impl='sdpa' "
                             "(torch's SDPA) needs fused=False")
        self.fused = fused
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                              proj_drop=drop, impl=impl)
        # timm's attribute: a DropPath (drop_prob) or Identity; a schedule may set drop_prob or swap the module
        self.drop_path = DropPath(drop_path) if _drop_rate(drop_path) > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    @property
    def drop_path_prob(self) -> float:
        """The drop-path rate in effect (the ``drop_path`` module's ``drop_prob``; 0 for Identity); setting it
        sets that (an Identity becomes a DropPath)."""
        return float(getattr(self.drop_path, "drop_prob", 0.0) or 0.0)

    @drop_path_prob.setter
    def drop_path_prob(self, p) -> None:
        p = _drop_rate(p, "drop_path_prob")
        if isinstance(self.drop_path, DropPath):
            self.drop_path.drop_prob = p
        else:
            self.drop_path = DropPath(p)

    def _one_op(self, x: torch.Tensor, cu_seqlens) -> bool:
        a, m = self.attn, self.mlp
        if not self.fused or cu_seqlens is not None or getattr(x, "dtype", None) not in FLOAT_DTYPES:
            return False
        if getattr(a, "impl", None) == "sdpa":  # torch's attention: the block op would run maefast's
            return False
        if not (isinstance(a, Attention) and isinstance(m, Mlp)
                and isinstance(self.drop_path, (DropPath, nn.Identity))):
            return False  # a part replaced by another module: its own forward runs (op by op)
        # each dropout by its own mode (an Identity in a dropout's place drops nothing)
        if any(_dropout_rate(d) != 0.0 for d in (a.attn_drop, a.proj_drop, m.drop)):
            return False
        if self.drop_path.training and self.drop_path_prob:
            return False
        parts = (self.norm1, a, a.qkv, a.attn_drop, a.proj, a.proj_drop, self.drop_path, self.norm2, m, m.fc1, m.act,
                 m.drop, m.fc2)
        # the one op computes these modules' official forwards without calling them: their classes must be
        # ones maefast knows (a subclass's own forward, e.g. a QuickGELU deriving from nn.GELU, would be
        # skipped), none may have an instance forward or hooks (they would not run), and the layers whose
        # weights it reads must be plain (a LoRA adapter's children would be skipped)
        if not all(trusted_class(type(p)) and "forward" not in p.__dict__ and not hooked(p) for p in parts):
            return False
        linears = (a.qkv, a.proj, m.fc1, m.fc2)
        if not all(plain_layer(lin, nn.Linear) for lin in linears):
            return False
        if autocast_dtype(x.device) is None and any(lin.weight.dtype != x.dtype for lin in linears):
            return False  # the op would cast the weights to x's dtype; the modules raise (F.linear), as timm's
        exact_gelu = isinstance(m.act, nn.GELU) and m.act.approximate == "none"
        return vit_block_computes((self.norm1, self.norm2), exact_gelu, a.proj, m.fc1, m.fc2)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        if self._one_op(x, cu_seqlens):
            from ..ops.block import vit_block

            a, m = self.attn, self.mlp
            return vit_block(x, self.norm1.weight, self.norm1.bias, a.qkv.weight, a.qkv.bias, a.proj.weight,
                             a.proj.bias, self.norm2.weight, self.norm2.bias, m.fc1.weight, m.fc1.bias, m.fc2.weight,
                             m.fc2.bias, num_heads=a.num_heads, scale=a.scale, eps1=self.norm1.eps,
                             eps2=self.norm2.eps, impl=a.impl)
        if cu_seqlens is not None and self.drop_path.training and self.drop_path_prob:
            raise ValueError("drop_path > 0 in training mode is not supported with cu_seqlens (it drops whole samples)")
        # the packed-sequence arguments only when given: a timm Attention put in as `attn` takes x alone
        extra = () if cu_seqlens is None else (cu_seqlens, max_seqlen)
        x = x + self.drop_path(self.attn(self.norm1(x), *extra))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return "fused=True" if self.fused else ""
