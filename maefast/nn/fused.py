"""Drop-in LayerNorm and MLP on maefast's fused ops, with the official/timm keys.

- `FusedLayerNorm(dim, eps=1e-6)`: an `nn.LayerNorm` (same keys `weight`, `bias`, same init, still
  `isinstance(m, nn.LayerNorm)`) whose forward runs `maefast.ops.add_layer_norm`;
  `norm(x)` -> y and `norm(x, residual)` -> (y, s = x + residual); `out_dtype=` sets y's dtype.
- `FusedMlp(in_features, hidden_features, out_features, act_layer=nn.GELU, drop=0.0)`: the timm
  0.3.2 `Mlp` (keys `fc1`, `fc2`) computing fc1 without its bias, then `maefast.ops.bias_gelu`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.bias_gelu import bias_gelu
from ..ops.layernorm import add_layer_norm
from ..reference.model import Mlp as _ReferenceMlp


class FusedLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` over the last dimension with MAE's eps default (1e-6) and an optional fused
    residual add.

    Args:
        normalized_shape: D (an int or a 1-tuple).
        eps: added to the variance (official MAE: 1e-6).
        elementwise_affine, bias, device, dtype: as nn.LayerNorm. Without weight or bias the
            forward falls back to F.layer_norm (no fused path).
        impl: "auto" | "triton" | "reference" (see maefast.ops.add_layer_norm).
    """

    def __init__(self, normalized_shape: Union[int, tuple], eps: float = 1e-6, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, impl: str = "auto"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"FusedLayerNorm normalises the last dimension only: normalized_shape must be an int "
                             f"or a 1-tuple, got {tuple(self.normalized_shape)}")
        self.impl = impl

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                out_dtype: Optional[torch.dtype] = None):
        """x (..., D) -> y; with `residual` (..., D) -> (y, s) where s = x + residual, y = LN(s).

        out_dtype: y's dtype (default s's). Under autocast, passing the autocast dtype gives the
        next Linear the same input it would cast to, written once in the narrow dtype.
        """
        if self.weight is None or self.bias is None:
            s = x if residual is None else x + residual
            y = F.layer_norm(s, self.normalized_shape, self.weight, self.bias, self.eps)
            y = y if out_dtype is None else y.to(out_dtype)
            return y if residual is None else (y, s)
        y, s = add_layer_norm(x, residual, self.weight, self.bias, self.eps, impl=self.impl, out_dtype=out_dtype)
        return y if residual is None else (y, s)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", impl={self.impl!r}"


class FusedMlp(_ReferenceMlp):
    """timm 0.3.2 `Mlp` (as in the official MAE Block) with bias + exact GELU fused after fc1.

    Args:
        in_features, hidden_features (default in_features), out_features (default in_features),
        act_layer: nn.GELU (exact) takes the fused path; any other activation runs unfused,
            exactly as the reference Mlp.
        drop: dropout after the activation and after fc2 (MAE pre-training: 0).
        impl: "auto" | "triton" | "reference" (see maefast.ops.bias_gelu).

    State-dict keys: fc1.weight, fc1.bias, fc2.weight, fc2.bias.
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer=nn.GELU, drop: float = 0.0, impl: str = "auto"):
        super().__init__(in_features, hidden_features, out_features, act_layer=act_layer, drop=drop)
        self.impl = impl

    def _fused(self) -> bool:
        return (type(self.act) is nn.GELU and self.act.approximate == "none" and self.fc1.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        if self._fused():
            h = bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias, impl=self.impl)
        else:
            h = self.act(self.fc1(x))
        return self.drop(self.fc2(self.drop(h)))
