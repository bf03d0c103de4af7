"""Drop-in for the official MAE ``patch_embed`` + ``random_masking`` pair: masks first, then embeds
only the kept patches (maefast.ops.random_masking + maefast.ops.masked_patch_embed)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .._modules import hooked, plain_layer
from .._validate import autocast_dtype, check_images, check_int, to_2tuple
from ..models.routing import patch_conv_reason
from ..ops._backend import check_impl
from ..ops.masking import random_masking
from ..ops.patch_embed import masked_patch_embed
from ..reference.normalize import normalize, pixel_stats


class MaskedPatchEmbed(nn.Module):
    """Patch embedding of the visible patches, with the official ``PatchEmbed`` constructor and keys.

    Sits where the official ``patch_embed`` sat: its Conv2d is ``proj`` (state-dict keys
    ``patch_embed.proj.weight`` [D, C, p, p] and ``patch_embed.proj.bias``), ``num_patches``,
    ``grid_size`` and ``patch_size`` as in timm. Images may be rectangular and of any size that is a
    multiple of the patch size (``pos_embed`` must then have 1 + (H/p)*(W/p) rows). The op reads
    ``proj``'s weights; a ``proj`` with hooks (the legacy ``weight_norm`` computes its weight in one), child
    modules (an adapter), a forward of its own or another geometry (padding, say) is called instead, as the
    official ``patch_embed`` calls it.

    Args:
        img_size: int or (H, W), the default image size (sets ``num_patches``/``grid_size``).
        patch_size: square patch side p.
        in_chans: C. embed_dim: D.
        impl: backend of both ops, "auto" | "triton" | "cuda" | "reference".
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, impl: str = "auto"):
        super().__init__()
        self.img_size = to_2tuple("img_size", img_size)
        patch = to_2tuple("patch_size", patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"patch_size must be square, got {patch}")
        if self.img_size[0] % patch[0] or self.img_size[1] % patch[1]:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {patch[0]}")
        self.patch_size = patch
        self.grid_size = (self.img_size[0] // patch[0], self.img_size[1] // patch[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        check_int("in_chans", in_chans, 1)
        check_int("embed_dim", embed_dim, 1)
        check_impl(impl, "maefast.nn.MaskedPatchEmbed")
        self.impl = impl
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, imgs: torch.Tensor, mask_ratio: float, pos_embed: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, seed: int | torch.Tensor | None = None, offset: int = 0, *,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        """Masks, then embeds the kept patches.

        Args:
            imgs: (N, C, H, W) images (no gradient flows to them): float, already normalised, or
                uint8 raw pixels normalised with mean/std in the kernels (`ops.masked_patch_embed`).
            mask_ratio: fraction of patches removed, in (0, 1).
            pos_embed: (1, 1 + L, D) position embeddings added to the kept tokens, or None.
            noise: optional (N, L) noise (official semantics); else ``seed``/``offset`` (Philox) or,
                with neither, a seed drawn from torch's default CPU generator.
            mean, std: per-channel statistics of uint8 imgs (None: ImageNet's); None for float imgs.

        Returns:
            tokens (N, K, D) in the weight's dtype (autocast dtype under autocast) promoted with
            pos_embed's (fp32 under autocast with an fp32 pos_embed, as the official ``x + pos_embed``),
            mask (N, L) float32 (1 = removed), ids_restore (N, L) int64 — as the official
            ``random_masking`` returns them.
        """
        p = self.patch_size[0]
        check_images("imgs", imgs, p, channels=getattr(self.proj, "in_channels", None), uint8=True)
        n, _, H, W = imgs.shape
        L = (H // p) * (W // p)
        ids = random_masking(n, L, mask_ratio, noise=noise, seed=seed, offset=offset, device=imgs.device,
                             impl=self.impl)
        if hooked(self.proj) or not plain_layer(self.proj, nn.Conv2d) or patch_conv_reason(self.proj) is not None \
                or tuple(self.proj.kernel_size) != (p, p):
            tokens = self._called(imgs, ids.ids_keep, L, pos_embed, mean, std)
        else:
            tokens = masked_patch_embed(imgs, ids.ids_keep, self.proj.weight, self.proj.bias, pos_embed, p,
                                        impl=self.impl, mean=mean, std=std)
        return tokens, ids.mask, ids.ids_restore

    def _called(self, imgs, ids_keep, L: int, pos_embed, mean, std) -> torch.Tensor:
        """The official ``proj(imgs) + pos_embed[1:]``, gathered, with ``proj`` called as a module: the op reads
        its weights and would skip its hooks (the legacy weight_norm/spectral_norm compute the weight in one),
        an adapter's children or a subclass's forward, and embeds non-overlapping patches only."""
        if imgs.requires_grad and torch.is_grad_enabled():
            raise ValueError("imgs must not require grad: MaskedPatchEmbed gives no gradient to the input images "
                             "(detach them)")
        stats = pixel_stats(imgs, mean, std)
        if stats is not None:  # uint8: normalised, then read in the weight's (or autocast's) dtype, as the op does
            imgs, weight = normalize(imgs, *stats), getattr(self.proj, "weight", None)
            if isinstance(weight, torch.Tensor) and autocast_dtype(imgs.device) is None:
                imgs = imgs.to(weight.dtype)
        x = self.proj(imgs).flatten(2).transpose(1, 2)
        if x.shape[1] != L:
            raise ValueError(f"proj gives {x.shape[1]} tokens for imgs of shape {tuple(imgs.shape)}, not the L = {L} "
                             f"patches of patch_size {self.patch_size[0]} that are masked")
        if pos_embed is not None:
            want = (1, 1 + x.shape[1], x.shape[2])
            if not isinstance(pos_embed, torch.Tensor) or tuple(pos_embed.shape) != want:
                got = tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed).__name__
                raise ValueError(f"pos_embed must have shape (1, 1 + L, D) = {want}, got {got}")
            x = x + pos_embed[:, 1:, :]
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}, num_patches={self.num_patches}, impl={self.impl!r}"
