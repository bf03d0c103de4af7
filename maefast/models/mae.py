"""maefast's MaskedAutoencoderViT: the reference class (same constructor, keys, initialisation)
whose forward runs the fused path (`maefast.models.fast`) unless impl="reference"."""
from __future__ import annotations

from .._validate import check_bool, check_mask_ratio, compiling
from ..reference.model import MaskedAutoencoderViT as _ReferenceMAE
from .fast import check_fused, check_model_impl
from .routing import Overrides, class_overrides, instance_overrides, official_call, refuse


class MaskedAutoencoderViT(_ReferenceMAE):
    """Masked Autoencoder with a ViT backbone on maefast's kernels.

    Extra constructor arguments (all keyword, after the official ones):
        impl: "auto" | "triton" | "cuda" | "reference" | "sdpa". "reference" runs the official
            computation; the others run the fused path with that backend for every op ("auto": the
            fastest verified one on CUDA, the reference composition of each op on the CPU; "cuda" where
            an op has a CUDA C++ kernel, "auto" elsewhere; "sdpa": the attention on torch's
            scaled_dot_product_attention, every other op "auto", with fused=False only).
        fused: False | "block". False: torch's LayerNorm, GELU and Linear around maefast's attention
            (under torch.compile, Inductor fuses the element-wise work). "block": each transformer
            block is one op (`maefast.ops.vit_block`: one autograd node, LayerNorm and GELU recomputed
            in the backward, ~40% less activation memory than False). (fused=True, maefast's eager
            LayerNorm/GELU ops between torch's matmuls, was removed: no measured step had it ahead.)
        grad_checkpointing: activation checkpointing per block (the mask is drawn once, outside); not
            with impl="reference", the official forward as it is (a ValueError: it checkpointed nothing).

    forward(imgs (N, C, H, W), mask_ratio=0.75, noise=None (N, L), *, seed=None, return_pred=True)
        -> (loss, pred, mask). ``seed`` (int) draws the mask from maefast's Philox stream instead of
        ``noise``; neither: a seed from torch's CPU generator (no GPU sync). return_pred=False skips
        the head on the visible rows (pred is None) — what training loops want. imgs may be uint8 raw
        pixels: ``mean=``/``std=`` (per channel; None: ImageNet's) normalise them, in the kernels on the
        fused path; the result is that of the fp32 images normalised first.
        A call the fast path cannot serve exactly (images that require a gradient, dropout active in
        training) runs the official computation with a `SlowPathWarning` (maefast.models.routing);
        a subclass's forward_loss / patchify is honoured, its random_masking / forward_encoder /
        forward_decoder is refused with a TypeError unless impl="reference".
    """

    _maefast_overrides = Overrides((), ())

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a user's subclass: which of its methods the fast path would replace (read per call, cheaply)
        cls._maefast_overrides = class_overrides(cls, forward=False)

    def __init__(self, *args, impl: str = "auto", fused: bool | str = False, grad_checkpointing: bool = False,
                 **kwargs):
        fused = check_fused(fused)
        grad_checkpointing = check_bool("grad_checkpointing", grad_checkpointing)
        check_model_impl(impl, fused, grad_checkpointing, own=True, together=True)
        super().__init__(*args, **kwargs)
        self.impl = impl
        self.fused = fused
        self.grad_checkpointing = grad_checkpointing

    def forward(self, imgs, mask_ratio=0.75, noise=None, *, seed: int | None = None, return_pred: bool = True,
                mean=None, std=None):
        # checked per call (`model.fused = ...`, tests, maefast.patch: not ignored), as in the constructor but
        # for fused='block' with impl='reference', refused only given together: set later, the official runs
        fused = check_fused(self.fused)
        grad_checkpointing = check_bool("grad_checkpointing", self.grad_checkpointing)
        check_model_impl(self.impl, fused, grad_checkpointing, own=True)
        # the original forward (ours) takes a Python number only: a tensor or None is one TypeError here,
        # not a SlowPathWarning (the fast path declines it) followed by that forward's TypeError
        if not compiling():
            check_mask_ratio(mask_ratio, official=True)
        if self.impl == "reference":
            if seed is not None:
                raise ValueError("seed needs the fused path (impl != 'reference'); pass noise= instead")
            check_bool("return_pred", return_pred)
            loss, pred, mask = super().forward(imgs, mask_ratio, noise, mean=mean, std=std)
            return loss, (pred if return_pred else None), mask  # as every other route returns it
        ov = self._maefast_overrides
        inst = instance_overrides(self)  # traced under torch.compile too: a compiled call must not differ
        ov = Overrides(ov.refused + inst.refused, ov.loss + inst.loss)
        if ov.refused:
            refuse(self, ov.refused, f"its fast path (impl={self.impl!r}) cannot run it; use impl='reference'")
        return official_call(self, super().forward, imgs, mask_ratio, noise, seed, return_pred, impl=self.impl,
                             fused=fused, grad_checkpointing=grad_checkpointing,
                             loss_via_model=bool(ov.loss), takes_noise=True,
                             mean=mean, std=std, takes_uint8=True)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, fused={self.fused}, grad_checkpointing={self.grad_checkpointing}"


__all__ = ["MaskedAutoencoderViT"]
