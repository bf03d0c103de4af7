"""The MAE reconstruction loss as one custom op `maefast::norm_pix_loss`: masked MSE on (optionally)
per-patch-normalised pixels, target read straight from the NCHW image, fused backward; plus the
"predict only where the loss looks" head (`masked_prediction_loss`).

Two layouts of `pred` (see `norm_pix_loss`):
  pred_on="all":    pred (N, L, P) for every patch, mask_or_ids = mask (N, L) float, 1 = removed —
                    the official `forward_loss(imgs, pred, mask)`.
  pred_on="masked": pred (N, L-K, P) for the masked patches only, row j of sample n = patch
                    ids_shuffle[n, K + j] (`masked_patch_ids` order); mask_or_ids = ids_restore (N, L)
                    — `maefast.reference.forward_loss_masked`.

Non-finite values follow the reference of each layout in every backend: with pred_on="all" every
image patch is read, and a NaN/Inf anywhere in the image or in pred makes the loss NaN (the
official `(loss * mask).sum()`: 0 * NaN is NaN); with pred_on="masked" visible patches are never
read (as in `forward_loss_masked`), so only masked patches and pred reach the loss.
ids_restore (pred_on="masked") must be a permutation of 0..L-1 per row: checked on the host for a
CPU tensor; trusted on a GPU, where every backend still reads inside the image whatever it holds.
uint8 images are normalised per channel (mean/std, ImageNet's by default) as the kernels read them,
in fp32 before the per-patch statistics: the target of the same images normalised first, without a
float image in memory (the reference backend normalises first: it is the definition).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .._validate import (FLOAT_DTYPES, check_bool, check_images, check_input_dtype, check_patch_size, check_permutation,
                         check_tensor, dense_index)
from ..reference.loss import NORM_PIX_EPS, forward_loss, forward_loss_masked, norm_pix_target
from ..reference.normalize import as_float_images, pixel_stats
from ..reference.patchify import patchify
from ._backend import choose_impl, device_guard, dtype_code, stream_of
from ._dispatch import bwd, call, custom_op, register_autograd
from ._pixels import kernels_take, pixel_affine

PRED_ON = ("all", "masked")
_INDEX_DTYPES = (torch.int64, torch.int32)


def _validate(pred, imgs, mask_or_ids, patch_size, pred_on) -> None:
    check_patch_size(patch_size)
    if pred_on not in PRED_ON:
        raise ValueError(f"pred_on must be one of {PRED_ON}, got {pred_on!r}")
    h, w = check_images("imgs", imgs, patch_size, uint8=True)
    n, c = imgs.shape[:2]
    L, P = h * w, patch_size * patch_size * c
    check_tensor("pred", pred, ndim=3, dtypes=FLOAT_DTYPES, device=imgs.device)
    if imgs.dtype not in FLOAT_DTYPES + (torch.uint8,):
        raise TypeError(f"imgs must be float32/float16/bfloat16 or uint8, got {imgs.dtype}")
    if pred_on == "all":
        if tuple(pred.shape) != (n, L, P):
            raise ValueError(f"pred must have shape (N, L, p*p*C) = {(n, L, P)} for pred_on='all', "
                             f"got {tuple(pred.shape)}")
        check_tensor("mask", mask_or_ids, ndim=2, device=imgs.device)
        if not mask_or_ids.is_floating_point():
            raise TypeError(f"mask (pred_on='all') must be a float (N, L) tensor, 1 = removed; got {mask_or_ids.dtype} "
                            "(pass ids_restore with pred_on='masked')")
        if tuple(mask_or_ids.shape) != (n, L):
            raise ValueError(f"mask must have shape (N, L) = {(n, L)}, got {tuple(mask_or_ids.shape)}")
    else:
        if pred.shape[0] != n or pred.shape[2] != P or not 1 <= pred.shape[1] <= L:
            raise ValueError(f"pred must have shape (N, M, p*p*C) = ({n}, M, {P}) with 1 <= M <= L = {L} masked "
                             f"patches for pred_on='masked', got {tuple(pred.shape)}")
        check_tensor("ids_restore", mask_or_ids, ndim=2, dtypes=_INDEX_DTYPES, device=imgs.device)
        if tuple(mask_or_ids.shape) != (n, L):
            raise ValueError(f"ids_restore must have shape (N, L) = {(n, L)}, got {tuple(mask_or_ids.shape)}")
        check_permutation("ids_restore", mask_or_ids)


# -- backends -----------------------------------------------------------------------------------

def _split(mask_or_ids, pred_masked: bool):
    """(weight fp32 or None, ids int64 or None)."""
    if pred_masked:
        return None, mask_or_ids.to(torch.int64)
    return mask_or_ids.to(torch.float32), None


def _denominator(pred, mask_or_ids, pred_masked: bool) -> torch.Tensor:
    if pred_masked:
        # the count stays an int: float() of a traced shape would specialise torch.compile to one batch size
        return torch.full((), pred.shape[0] * pred.shape[1], dtype=torch.float32, device=pred.device)
    return mask_or_ids.sum(dtype=torch.float32)


def _reference_target(imgs, mask_or_ids, patch_size, norm_pix, pred_masked, m, stats):
    target = patchify(as_float_images(imgs, stats), patch_size)
    if pred_masked:
        ids = _masked_patch_ids(mask_or_ids, mask_or_ids.shape[1] - m)
        target = torch.gather(target, 1, ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    return norm_pix_target(target) if norm_pix else target


def _cuda_call(fwd: bool, pred, imgs, mask_or_ids, patch_size, norm_pix, pred_masked, affine, scale=None):
    from .._cpp_lib import require_C

    C = require_C()
    weight, ids = _split(mask_or_ids, pred_masked)
    wt = weight if weight is not None else ids
    n, c, H, W = imgs.shape
    gw = W // patch_size
    L = (H // patch_size) * gw
    m = pred.shape[1]
    k = L - m if pred_masked else 0
    px_scale, px_offset = affine if affine is not None else ([], [])
    common = (n, L, gw, k, m, c, patch_size, *pred.stride(), *imgs.stride(), *wt.stride(), bool(norm_pix),
              bool(pred_masked), dtype_code(pred.dtype), dtype_code(imgs.dtype), px_scale, px_offset, stream_of(pred))
    if fwd:
        rows = torch.empty(n * L, dtype=torch.float32, device=pred.device)
        with device_guard(pred):  # the extension launches on the current device
            C.norm_pix_loss_fwd(pred.data_ptr(), imgs.data_ptr(), wt.data_ptr(), rows.data_ptr(), *common)
        return rows.sum()
    gpred = (torch.zeros if pred_masked else torch.empty)(pred.shape, dtype=pred.dtype, device=pred.device)
    with device_guard(pred):
        C.norm_pix_loss_bwd(pred.data_ptr(), imgs.data_ptr(), wt.data_ptr(), scale.data_ptr(), gpred.data_ptr(),
                            *common)
    return gpred


# -- custom op ------------------------------------------------------------------------------------

def _triton_rows(pred, mask_or_ids, pred_masked: bool):
    """(weight fp32 or None, ids or None) for the Triton kernels: with pred_on="masked" the kernels walk
    the rows of pred, so they take the masked patch ids in shuffle order (N, M), not ids_restore."""
    if pred_masked:
        return None, _masked_patch_ids(mask_or_ids, mask_or_ids.shape[1] - pred.shape[1])
    return mask_or_ids.to(torch.float32), None


def _fuses_grad(impl: str, with_grad: bool) -> bool:
    """Whether the forward also writes the weighted residual w * (pred - target) that the gradient is
    made of (Triton: one pass over pred and the image for both; the backward then only scales it)."""
    return with_grad and impl == "triton"


@custom_op("maefast::norm_pix_loss", mutates_args=())
def _loss_op(pred: torch.Tensor, imgs: torch.Tensor, mask_or_ids: torch.Tensor, patch_size: int, norm_pix: bool,
             pred_masked: bool, impl: str, with_grad: bool, mean: Optional[list[float]] = None,
             std: Optional[list[float]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, r): r = w * (pred - target) in pred's dtype where the forward computes it (`_fuses_grad`;
    the gradient is r * grad_loss * 2 / (P * sum(w))), else an empty tensor (the backward op then
    recomputes from pred and imgs). uint8 imgs are normalised with mean/std (None: ImageNet's)."""
    mask_or_ids = dense_index(mask_or_ids)
    den = _denominator(pred, mask_or_ids, pred_masked)
    none = pred.new_empty(0)
    stats = pixel_stats(imgs, mean, std)  # tuples for uint8 imgs (defaulted), else None
    affine = pixel_affine(stats) if stats is not None else None
    if impl == "triton":
        from ..kernels.loss import norm_pix_loss_fwd

        weight, ids = _triton_rows(pred, mask_or_ids, pred_masked)
        with device_guard(pred):
            total, r = norm_pix_loss_fwd(pred, imgs, weight, ids, patch_size, norm_pix, _fuses_grad(impl, with_grad),
                                         affine)
        return total / den, (r if r is not None else none)
    if impl == "cuda":
        return _cuda_call(True, pred, imgs, mask_or_ids, patch_size, norm_pix, pred_masked, affine) / den, none
    # Reference semantics with fp32 arithmetic whatever the input dtypes.
    x = as_float_images(imgs, stats)
    if pred_masked:
        loss = forward_loss_masked(x, pred.float(), mask_or_ids.to(torch.int64), patch_size, norm_pix)
    else:
        loss = forward_loss(x, pred.float(), mask_or_ids.float(), patch_size, norm_pix)
    return loss, none


@_loss_op.register_fake
def _(pred, imgs, mask_or_ids, patch_size, norm_pix, pred_masked, impl, with_grad, mean=None, std=None):
    r = torch.empty_like(pred, memory_format=torch.contiguous_format) if _fuses_grad(impl, with_grad) \
        else pred.new_empty(0)
    return pred.new_empty((), dtype=torch.float32), r


@custom_op("maefast::norm_pix_loss_backward", mutates_args=())
def _loss_bwd_op(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask_or_ids: torch.Tensor,
                 patch_size: int, norm_pix: bool, pred_masked: bool, impl: str, mean: Optional[list[float]] = None,
                 std: Optional[list[float]] = None) -> torch.Tensor:
    """Grad of pred (pred's shape and dtype, contiguous); grad is the 0-d fp32 grad of the loss."""
    mask_or_ids = dense_index(mask_or_ids)
    scale = (grad.float() / _denominator(pred, mask_or_ids, pred_masked)).reshape(())
    stats = pixel_stats(imgs, mean, std)  # tuples for uint8 imgs (defaulted), else None
    affine = pixel_affine(stats) if stats is not None else None
    if impl == "triton":
        from ..kernels.loss import norm_pix_loss_bwd

        weight, ids = _triton_rows(pred, mask_or_ids, pred_masked)
        with device_guard(pred):
            return norm_pix_loss_bwd(scale.contiguous(), pred, imgs, weight, ids, patch_size, norm_pix, affine)
    if impl == "cuda":
        return _cuda_call(False, pred, imgs, mask_or_ids, patch_size, norm_pix, pred_masked, affine,
                          scale.contiguous())
    target = _reference_target(imgs, mask_or_ids, patch_size, norm_pix, pred_masked, pred.shape[1], stats)
    g = (pred.float() - target) * (scale * 2.0 / pred.shape[-1])
    if not pred_masked:
        g = g * mask_or_ids.float().unsqueeze(-1)
    return g.to(pred.dtype).contiguous()


@_loss_bwd_op.register_fake
def _(grad, pred, imgs, mask_or_ids, patch_size, norm_pix, pred_masked, impl, mean=None, std=None):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, imgs, mask_or_ids, patch_size, norm_pix, pred_masked, impl, with_grad, mean, std = inputs
    _, r = output
    ctx.mark_non_differentiable(r)
    ctx.set_materialize_grads(False)
    ctx.fused = _fuses_grad(impl, with_grad)
    # the fused forward's residual replaces pred (the same bytes) and imgs; the mask for sum(w) (a copy of one made
    # under torch.inference_mode, which cannot be saved for backward)
    if mask_or_ids.is_inference():
        mask_or_ids = mask_or_ids.clone()
    if ctx.fused:
        ctx.save_for_backward(r, mask_or_ids)
    else:
        # images made under torch.inference_mode cannot be saved for backward: a copy of them then (eager; the
        # official loss takes them, as the fused path does: neither saves them)
        ctx.save_for_backward(pred, imgs.clone() if imgs.is_inference() else imgs, mask_or_ids)
    ctx.args = (patch_size, norm_pix, pred_masked, impl, mean, std)


def _backward(ctx, grad, _dg):
    if grad is None:
        return (None,) * 10
    if ctx.fused:
        r, mask_or_ids = ctx.saved_tensors  # r has pred's shape
        den = _denominator(r, mask_or_ids, ctx.args[2])
        # the backward kernel's factor, (grad / sum(w)) * 2 / P, applied in fp32, then one rounding to r's dtype:
        # `r * factor` would round the factor itself to r's dtype first on a GPU (a 0-d CUDA tensor is no CPU
        # scalar: TensorIterator casts it to the common dtype), a uniform bias of up to 2^-8 in bf16 and a
        # subnormal factor in fp16 without GradScaler (2 / (64*147*768): 7.7% off)
        factor = (grad.float() / den) * 2.0 / r.shape[-1]
        gpred = r * factor if r.dtype == torch.float32 else r.float().mul_(factor).to(r.dtype)  # (one fp32 copy)
    else:
        pred, imgs, mask_or_ids = ctx.saved_tensors
        gpred = bwd(ctx, _loss_bwd_op)(grad, pred, imgs, mask_or_ids, *ctx.args)
    return (gpred,) + (None,) * 9


register_autograd(_loss_op, _backward, setup_context=_setup_context)


# -- public API -----------------------------------------------------------------------------------

def norm_pix_loss(pred: torch.Tensor, imgs: torch.Tensor, mask_or_ids: torch.Tensor, patch_size: int, *,
                  norm_pix: bool = True, pred_on: str = "all", impl: str = "auto",
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """MAE reconstruction loss: mean over the masked patches of the per-patch MSE against the
    (optionally per-patch-normalised) image pixels.

    Args:
        pred: fp32/bf16/fp16 predictions, P = p*p*C values per patch in the official (p_row, p_col, c) order.
            pred_on="all":    (N, L, P), every patch (the official decoder output without cls).
            pred_on="masked": (N, M, P), M = L - K masked patches only; row j of sample n predicts
                              patch ids_shuffle[n, K + j] (see `masked_patch_ids`).
        imgs: (N, C, H, W) images (any strides, e.g. channels_last); H, W multiples of patch_size:
            float (already normalised, the official convention) or uint8 raw pixels, normalised per
            channel in fp32 as torchvision's ToTensor + Normalize(mean, std) would, where the kernels
            read them (no float image is made); the target is then that of the normalised images.
        mask_or_ids: pred_on="all": mask (N, L) float, 1 = removed (any weights: sum(w * loss) / sum(w)).
            pred_on="masked": ids_restore (N, L) int64/int32 from masking (a permutation; K = L - M;
            checked for a CPU tensor, trusted on a GPU).
        patch_size: p.
        norm_pix: normalise each target patch: (t - mean) / sqrt(unbiased var + 1e-6), in fp32.
        pred_on: "all" (official) | "masked".
        impl: "auto" | "triton" | "cuda" | "reference".
        mean, std: per-channel statistics for uint8 imgs (C floats each, std > 0; both None:
            ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)). Must be None for float imgs.
    Returns:
        0-d fp32 loss, sum(per-patch MSE * w) / sum(w) (fp32 arithmetic for any input dtype).
        Differentiable in pred only (imgs or a mask that require a gradient raise ValueError); the gradient is
        zero on unmasked rows (pred_on="all"), computed without host sync and deterministically.
        NaN/Inf in pred reach the loss; so do NaN/Inf in imgs: anywhere with pred_on="all"
        (official: 0 * NaN is NaN), in masked patches only with pred_on="masked" (visible patches
        are not read there).
    """
    _validate(pred, imgs, mask_or_ids, patch_size, pred_on)
    norm_pix = check_bool("norm_pix", norm_pix)  # (a string "False" was true)
    if imgs.requires_grad and torch.is_grad_enabled():  # the target is data: never a silent None gradient
        raise ValueError("imgs must not require grad: norm_pix_loss gives no gradient to the input images "
                         "(detach them)")
    if mask_or_ids.requires_grad and torch.is_grad_enabled():  # a learned soft mask would get None silently
        raise ValueError("mask_or_ids must not require grad: norm_pix_loss gives no gradient to the mask weights "
                         "(detach it, or use maefast.reference.forward_loss for a learned mask)")
    impl = _resolve(impl, pred, imgs)
    stats = pixel_stats(imgs, mean, std)
    m, s = (list(stats[0]), list(stats[1])) if stats is not None else (None, None)
    with_grad = torch.is_grad_enabled() and pred.requires_grad
    return call(_loss_op, pred, imgs, mask_or_ids, patch_size, norm_pix, pred_on == "masked", impl,
                with_grad, m, s)[0]


def _resolve(impl: str, pred: torch.Tensor, imgs: torch.Tensor) -> str:
    what = "maefast.ops.norm_pix_loss"
    chosen = choose_impl(impl, pred.device, cuda_op="norm_pix_loss_fwd", what=what)
    ok, why = kernels_take(imgs)
    if chosen == "reference" or ok:
        return chosen
    if impl == "auto":
        return "reference"
    raise ValueError(f"impl={impl!r} is not available for {what}: {why}")


def masked_patch_ids(ids_restore: torch.Tensor, len_keep: int) -> torch.Tensor:
    """(N, L) ids_restore -> (N, L - len_keep) int64 masked patches in shuffle order
    (ids_shuffle[:, len_keep:]), by a scatter (ids_restore is a permutation): no sort, no host sync.
    Same result as `maefast.reference.masked_patch_ids`. For a non-permutation (trusted on a GPU,
    refused on the CPU by the ops) the result is some ids in [0, L): never out of bounds."""
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=_INDEX_DTYPES)
    L = ids_restore.shape[1]
    if isinstance(len_keep, bool) or not isinstance(len_keep, int) or not 0 <= len_keep <= L:
        raise ValueError(f"len_keep must be an int in [0, L] = [0, {L}], got {len_keep!r}")
    return _masked_patch_ids(ids_restore, len_keep)


def _masked_patch_ids(ids_restore: torch.Tensor, len_keep: int) -> torch.Tensor:
    n, L = ids_restore.shape
    ids = dense_index(ids_restore, torch.int64).clamp(0, L - 1)  # the scatter stays inside ids_shuffle
    arange = torch.arange(L, device=ids.device).expand(n, L)
    ids_shuffle = torch.zeros_like(ids).scatter_(1, ids, arange)  # zeros: in range even for a bad ids_restore
    return ids_shuffle[:, len_keep:]


def masked_prediction_loss(decoder_out: torch.Tensor, pred_weight: torch.Tensor, pred_bias: torch.Tensor | None,
                           imgs: torch.Tensor, ids_restore: torch.Tensor, len_keep: int, patch_size: int, *,
                           norm_pix: bool = True, has_cls: bool = True, return_pred: bool = False,
                           impl: str = "auto", mean: Sequence[float] | None = None,
                           std: Sequence[float] | None = None):
    """Prediction head + loss on the masked patches only (the decoder blocks still see every token).

    Gathers the L - K masked rows of the decoder output, applies `decoder_pred` (F.linear) to them
    only, and takes `norm_pix_loss(..., pred_on="masked")`. Same loss and the same gradients for
    every parameter as the official `decoder_pred` on all rows + `forward_loss` (unmasked rows get
    zero gradient there), with 3/4 of its FLOPs at ratio 0.75 (L - K of the 1 + L rows).

    Args:
        decoder_out: (N, 1+L, Dd) after decoder_norm (cls first; has_cls=False: (N, L, Dd)).
        pred_weight: (p*p*C, Dd), pred_bias: (p*p*C,) or None — `decoder_pred.weight/.bias`.
        imgs: (N, C, H, W), float or uint8 (normalised with mean/std; see `norm_pix_loss`).
        ids_restore: (N, L) from masking. len_keep: K.
        return_pred: also return the (N, L-K, P) masked predictions (rows in `masked_patch_ids` order).
    Returns:
        loss (0-d fp32), or (loss, pred_masked) when return_pred.
    """
    _validate_head(decoder_out, pred_weight, pred_bias, imgs, ids_restore, len_keep, patch_size, has_cls)
    x = decoder_out[:, 1:] if has_cls else decoder_out
    ids = _masked_patch_ids(ids_restore, len_keep)
    x = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    pred = F.linear(x, pred_weight, pred_bias)
    loss = norm_pix_loss(pred, imgs, ids_restore, patch_size, norm_pix=norm_pix, pred_on="masked", impl=impl,
                         mean=mean, std=std)
    return (loss, pred) if return_pred else loss


def _validate_head(decoder_out, pred_weight, pred_bias, imgs, ids_restore, len_keep, patch_size, has_cls) -> None:
    check_bool("has_cls", has_cls)  # (a string "no" was true: the first row dropped as the cls token)
    check_tensor("decoder_out", decoder_out, ndim=3, dtypes=FLOAT_DTYPES)
    dev = decoder_out.device
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=_INDEX_DTYPES, device=dev)
    L = ids_restore.shape[1]
    rows = L + 1 if has_cls else L
    if decoder_out.shape[:2] != (ids_restore.shape[0], rows):
        raise ValueError(f"decoder_out must have shape (N, {'1+L' if has_cls else 'L'}, Dd) = "
                         f"({ids_restore.shape[0]}, {rows}, Dd), got {tuple(decoder_out.shape)}")
    if isinstance(len_keep, bool) or not isinstance(len_keep, int) or not 0 <= len_keep < L:
        raise ValueError(f"len_keep must be an int in [0, L) = [0, {L}), got {len_keep!r}")
    check_patch_size(patch_size)
    h, w = check_images("imgs", imgs, patch_size, uint8=True)
    if imgs.device != dev:
        raise ValueError(f"imgs must be on decoder_out's device {dev}, got {imgs.device}")
    if imgs.shape[0] != ids_restore.shape[0] or h * w != L:
        raise ValueError(f"imgs must be N = {ids_restore.shape[0]} images of L = {L} patches of {patch_size}x"
                         f"{patch_size} (ids_restore's shape), got shape {tuple(imgs.shape)} ({h * w} patches)")
    dd, P = decoder_out.shape[-1], patch_size * patch_size * imgs.shape[1]
    check_tensor("pred_weight", pred_weight, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    if tuple(pred_weight.shape) != (P, dd):
        raise ValueError(f"pred_weight must have shape (p*p*C, Dd) = ({P}, {dd}) (decoder_pred.weight for patch "
                         f"size {patch_size}, {imgs.shape[1]} channels and decoder width {dd}), "
                         f"got {tuple(pred_weight.shape)}")
    if pred_bias is not None:
        check_tensor("pred_bias", pred_bias, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
        if pred_bias.shape[0] != P:
            raise ValueError(f"pred_bias must have shape (p*p*C,) = ({P},), got {tuple(pred_bias.shape)}")
    check_input_dtype("decoder_out", decoder_out, pred_weight, "pred_weight")  # as F.linear requires
    if pred_bias is not None:
        check_input_dtype("decoder_out", decoder_out, pred_bias, "pred_bias")


__all__ = ["norm_pix_loss", "masked_patch_ids", "masked_prediction_loss", "NORM_PIX_EPS", "PRED_ON"]
