"""Drop-in decoder un-shuffle module (the official forward_decoder's mask-token fill + gather + pos add)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops._backend import check_impl, check_no_kernel_for_fp64
from .._validate import FLOAT_DTYPES
from ..ops.unshuffle import _validate, unshuffle
from ..reference.unshuffle import unshuffle as reference_unshuffle


class Unshuffle(nn.Module):
    """Stateless: the model keeps ``mask_token`` and ``decoder_pos_embed`` (official state-dict keys).

    forward(x_vis (N, 1+K, Dd), mask_token (1, 1, Dd), ids_restore (N, L), pos_embed (1, 1+L, Dd))
    -> (N, 1+L, Dd) in the dtype the official code's ``torch.cat`` and ``+`` promote to (under autocast
    a bf16 ``x_vis`` with the fp32 parameters gives fp32, as the official decoder's stream); see
    `maefast.ops.unshuffle`.
    """

    def __init__(self, impl: str = "auto"):
        super().__init__()
        check_impl(impl, "maefast.nn.Unshuffle")
        self.impl = impl

    def forward(self, x_vis: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                pos_embed: torch.Tensor) -> torch.Tensor:
        # the official ops in float64 (the kernels take float32/16; the op promotes the rest itself); a
        # non-tensor argument reaches the op's check, which names it
        if any(getattr(t, "dtype", None) == torch.float64 for t in (x_vis, mask_token, pos_embed)):
            check_no_kernel_for_fp64(self.impl, "maefast.nn.Unshuffle")
            _validate(x_vis, mask_token, ids_restore, pos_embed, dtypes=FLOAT_DTYPES + (torch.float64,))
            return reference_unshuffle(x_vis, mask_token, ids_restore, pos_embed)
        return unshuffle(x_vis, mask_token, ids_restore, pos_embed, impl=self.impl)  # it promotes too

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
