"""Masked (visible-only) patch embedding as a custom op: ``maefast::masked_patch_embed``.

tokens = (patchify(imgs) @ W^T + b + pos_embed[1:])[ids_keep], computed for the kept patches only,
reading pixels straight from the NCHW image, with the weight in the Conv2d layout [D, C, p, p].
Backward gives the weight, bias and (when it requires grad) pos_embed gradients, deterministic
(fp32 partial sums, no atomics); the image gets none.

uint8 images are normalised per channel (mean/std, ImageNet's by default) where they are read: in
the Triton GEMM's prologue and in the CUDA gather, rounded to the weight's dtype, so the kernels
never materialise a float image (the reference backend normalises first: it is the definition).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import reference
from .._cpp_lib import get_C
from .._validate import (FLOAT_DTYPES, autocast_dtype, check_images, check_index_range, check_input_dtype,
                         check_patch_size, check_tensor, dense_index)
from ..reference.normalize import as_float_images, pixel_stats
from ._backend import check_impl, choose_impl, device_guard, dtype_code, stream_of
from ._dispatch import bwd, call, custom_op, register_autograd
from ._pixels import kernels_take, pixel_affine

_NAN_BITS = {torch.float32: 0x7FC00000, torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}
_WHAT = "maefast.ops.masked_patch_embed"


def _resolve(impl: str, imgs: torch.Tensor, weight: torch.Tensor, pos_embed: torch.Tensor | None) -> str:
    u8 = imgs.dtype == torch.uint8
    chosen = choose_impl(impl, imgs.device, auto_order=("triton", "cuda"),
                         cuda_op="patch_gather_normalize" if u8 else "patch_gather", what=_WHAT)
    if chosen == "reference":
        return chosen
    # uint8 imgs are normalised into the weight's dtype: the kernels write fp32, fp16 and bf16 only
    ok, why = (kernels_take(imgs) if weight.dtype in FLOAT_DTYPES else
               (False, f"weight dtype {weight.dtype} is not supported by the kernels (float32, float16, bfloat16)")) \
        if u8 else (imgs.dtype in FLOAT_DTYPES, f"dtype {imgs.dtype} is not supported by the kernels (float32, "
                                                 "float16, bfloat16, uint8)")
    if ok and pos_embed is not None and pos_embed.dtype not in FLOAT_DTYPES:
        # the tokens would be float64 (the promotion), which the kernels' fp32 epilogue cannot add exactly
        ok, why = False, (f"pos_embed dtype {pos_embed.dtype} is not supported by the kernels (float32, float16, "
                          "bfloat16)")
    if ok:
        return chosen
    if impl == "auto":
        return "reference"
    raise ValueError(f"impl={impl!r} is not available for {_WHAT}: {why}")


def _float_imgs(imgs, stats, dtype):
    """What the reference computes with: uint8 imgs normalised (fp32), rounded to the GEMM's dtype."""
    return imgs if stats is None else as_float_images(imgs, stats).to(dtype)


def _valid_ids(ids_keep: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids clamped into [0, L), which ids were in range): the kernels' contract for ids that are not
    checked on a GPU (an out-of-range id gives a NaN row, and the weight and pos_embed no gradient from it;
    the bias's is the upstream gradient's sum, every row), kept by the reference."""
    return ids_keep.clamp(0, L - 1), (ids_keep >= 0) & (ids_keep < L)


def _rows_torch(imgs: torch.Tensor, ids_keep: torch.Tensor, p: int) -> torch.Tensor:
    """The kept patches as rows (N*K, C*p*p) ordered (c, kh, kw), in PyTorch (zero rows for ids
    outside [0, L))."""
    n, c, H, W = imgs.shape
    h, w = H // p, W // p
    ids, ok = _valid_ids(ids_keep, h * w)
    x = imgs.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, c * p * p)
    x = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, c * p * p)).masked_fill(~ok.unsqueeze(-1), 0)
    return x.reshape(-1, c * p * p)


def _rows_cuda(imgs: torch.Tensor, ids_keep: torch.Tensor, p: int, dtype: torch.dtype | None = None,
               affine=None) -> torch.Tensor:
    """The same rows through maefast._C.patch_gather (NaN rows for ids outside [0, L)); uint8 imgs
    through patch_gather_normalize, normalised with `affine` (scale, offset) into `dtype`."""
    n, c, H, W = imgs.shape
    k = ids_keep.shape[1]
    ids = ids_keep.contiguous()
    u8 = imgs.dtype == torch.uint8
    out = torch.empty(n * k, c * p * p, dtype=dtype if u8 else imgs.dtype, device=imgs.device)
    with device_guard(imgs):
        if u8:
            get_C().patch_gather_normalize(imgs.data_ptr(), *imgs.stride(), ids.data_ptr(), n, k, c, p, H // p,
                                           W // p, affine[0], affine[1], dtype_code(out.dtype), out.data_ptr(),
                                           stream_of(out))
        else:
            get_C().patch_gather(imgs.data_ptr(), imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3),
                                 ids.data_ptr(), n, k, c, p, H // p, W // p, imgs.element_size(),
                                 _NAN_BITS[imgs.dtype], out.data_ptr(), stream_of(out))
    return out


def _out_dtype(weight: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.dtype:
    """The tokens' dtype: the conv's (the weight's), promoted with pos_embed's as `x + pos_embed`."""
    return weight.dtype if pos_embed is None else torch.promote_types(weight.dtype, pos_embed.dtype)


def _forward_cuda(imgs, ids_keep, weight, bias, pos_embed, p, affine):
    n, k = ids_keep.shape
    D = weight.shape[0]
    rows = _rows_cuda(imgs, ids_keep, p, weight.dtype, affine)
    w2 = weight.reshape(D, -1)
    out = torch.addmm(bias, rows, w2.t()) if bias is not None else rows @ w2.t()
    out = out.reshape(n, k, D)
    if pos_embed is not None:
        L = pos_embed.shape[1] - 1
        dt = _out_dtype(weight, pos_embed)
        # Clamped so a bad id cannot index out of bounds; its row is NaN already.
        out = out.to(dt) + pos_embed[0, 1:].to(dt)[ids_keep.clamp(0, L - 1)]
    return out


@custom_op("maefast::masked_patch_embed", mutates_args=())
def _masked_patch_embed_op(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor], pos_embed: Optional[torch.Tensor], patch_size: int,
                           impl: str, mean: Optional[list[float]] = None,
                           std: Optional[list[float]] = None) -> torch.Tensor:
    """Tokens (N, K, D) in `_out_dtype`; uint8 imgs are normalised with mean/std (None: ImageNet's)."""
    ids_keep = dense_index(ids_keep, torch.int64)  # the CUDA C++ kernels read int64 ids
    chosen = _resolve(impl, imgs, weight, pos_embed)
    stats = pixel_stats(imgs, mean, std)  # tuples for uint8 imgs (defaulted), else None
    affine = pixel_affine(stats) if stats is not None else None
    with torch.autocast(imgs.device.type, enabled=False):
        if chosen == "triton":
            from ..kernels.patch_embed import masked_patch_embed_fwd_triton

            with device_guard(imgs):
                return masked_patch_embed_fwd_triton(imgs, ids_keep, weight, bias, pos_embed, patch_size, affine)
        if chosen == "cuda":
            return _forward_cuda(imgs, ids_keep, weight, bias, pos_embed, patch_size, affine)
        L = (imgs.shape[-2] // patch_size) * (imgs.shape[-1] // patch_size)
        ids, ok = _valid_ids(ids_keep, L)
        out = reference.masked_patch_embed(_float_imgs(imgs, stats, weight.dtype), ids, weight, bias, pos_embed,
                                           patch_size)
        return out.masked_fill(~ok.unsqueeze(-1), float("nan")).contiguous()


@_masked_patch_embed_op.register_fake
def _(imgs, ids_keep, weight, bias, pos_embed, patch_size, impl, mean=None, std=None):
    return weight.new_empty(ids_keep.shape[0], ids_keep.shape[1], weight.shape[0],
                            dtype=_out_dtype(weight, pos_embed))


@custom_op("maefast::masked_patch_embed_backward", mutates_args=())
def _masked_patch_embed_backward_op(grad: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor,
                                    weight: torch.Tensor, pos_embed: Optional[torch.Tensor], patch_size: int,
                                    need_pos: bool, impl: str, mean: Optional[list[float]] = None,
                                    std: Optional[list[float]] = None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_weight like weight, grad_bias (D,) in weight's dtype, grad_pos like pos_embed or empty)."""
    ids_keep = dense_index(ids_keep, torch.int64)  # the CUDA C++ kernels read int64 ids
    chosen = _resolve(impl, imgs, weight, pos_embed)
    stats = pixel_stats(imgs, mean, std)  # tuples for uint8 imgs (defaulted), else None
    affine = pixel_affine(stats) if stats is not None else None
    D = weight.shape[0]
    n, k = ids_keep.shape
    need_pos = need_pos and pos_embed is not None
    with torch.autocast(imgs.device.type, enabled=False):
        g = grad.reshape(n * k, D)
        if chosen == "triton":
            from ..kernels.patch_embed import masked_patch_embed_bwd_triton

            with device_guard(imgs):
                dw, dpos = masked_patch_embed_bwd_triton(grad, imgs, ids_keep, D, patch_size, True, need_pos,
                                                         weight.dtype, affine)
        else:
            if chosen == "cuda":  # its NaN rows (bad ids) contribute nothing, as in the other backends
                ok = _valid_ids(ids_keep, (imgs.shape[-2] // patch_size) * (imgs.shape[-1] // patch_size))[1]
                rows = _rows_cuda(imgs, ids_keep, patch_size, weight.dtype, affine).masked_fill(~ok.reshape(-1, 1), 0)
            else:
                rows = _rows_torch(_float_imgs(imgs, stats, weight.dtype), ids_keep, patch_size)
            dw = g.to(weight.dtype).float().t() @ rows.float()
            dpos = None
            if need_pos:
                L = pos_embed.shape[1] - 1
                # one-hot(ids) @ G: repeated ids add up; a matmul, so deterministic (no scatter-add atomics).
                onehot = (ids_keep.reshape(1, -1) == torch.arange(L, device=g.device).unsqueeze(1)).float()
                gp = g.to(torch.promote_types(g.dtype, torch.float32))  # fp64 stays fp64
                dpos = onehot.to(gp.dtype) @ gp
        # the conv's gradients from the output's rounded to the conv's dtype (as autograd's promotion
        # gives it), pos_embed's from the output's as it is
        db = g.to(weight.dtype).float().sum(0)
        grad_w = dw.reshape(weight.shape).to(weight.dtype)
        grad_b = db.to(weight.dtype)
        if need_pos:
            # the cls row's zero padded on, not written into a zeros tensor: vmap over batched gradients
            # (jacobian(vectorize=True)) cannot copy a batched dpos into an unbatched tensor
            grad_pos = torch.nn.functional.pad(dpos.reshape(-1, D), (0, 0, 1, 0)).reshape(pos_embed.shape)
            grad_pos = grad_pos.to(pos_embed.dtype)
        else:
            grad_pos = grad.new_empty(0)
    return grad_w, grad_b, grad_pos


@_masked_patch_embed_backward_op.register_fake
def _(grad, imgs, ids_keep, weight, pos_embed, patch_size, need_pos, impl, mean=None, std=None):
    need_pos = need_pos and pos_embed is not None
    # contiguous, as the real op returns them (a reshape of a fresh (D, C*p*p) matrix; a fresh tensor),
    # whatever the weight's or pos_embed's strides (empty_like would keep channels_last)
    return (weight.new_empty(weight.shape), weight.new_empty(weight.shape[0]),
            pos_embed.new_empty(pos_embed.shape) if need_pos else grad.new_empty(0))


def _setup_context(ctx, inputs, output):
    imgs, ids_keep, weight, bias, pos_embed, patch_size, impl, mean, std = inputs
    ctx.save_for_backward(imgs, ids_keep, weight, pos_embed)
    ctx.patch_size = patch_size
    ctx.impl = impl
    ctx.stats = (mean, std)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    imgs, ids_keep, weight, pos_embed = ctx.saved_tensors
    if ctx.needs_input_grad[0]:
        raise RuntimeError("maefast.ops.masked_patch_embed gives no gradient to imgs (the input images); "
                           "detach them or call .requires_grad_(False)")
    need_pos = bool(ctx.needs_input_grad[4])
    grad_w, grad_b, grad_pos = bwd(ctx, _masked_patch_embed_backward_op)(grad, imgs, ids_keep, weight, pos_embed,
                                                               ctx.patch_size, need_pos, ctx.impl, *ctx.stats)
    grad_b = grad_b.to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    return (None, None, grad_w if ctx.needs_input_grad[2] else None, grad_b,
            grad_pos if need_pos else None, None, None, None, None)


register_autograd(_masked_patch_embed_op, _backward, setup_context=_setup_context)


def _validate(imgs, ids_keep, weight, bias, pos_embed, patch_size) -> None:
    check_patch_size(patch_size)
    h, w = check_images("imgs", imgs, patch_size, uint8=True)
    n, c = imgs.shape[:2]
    L = h * w
    dev = imgs.device
    check_tensor("weight", weight, ndim=4, device=dev)
    D = weight.shape[0]
    if tuple(weight.shape[1:]) != (c, patch_size, patch_size):
        raise ValueError(f"weight must have shape [D, C, p, p] = [D, {c}, {patch_size}, {patch_size}], "
                         f"got {list(weight.shape)}")
    if imgs.dtype == torch.uint8:  # normalised, then read in the weight's dtype
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating point tensor, got {weight.dtype}")
    else:
        check_input_dtype("imgs", imgs, weight, "the patch embedding weight")  # as F.conv2d requires
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=dev)
        if bias.shape[0] != D:
            raise ValueError(f"bias must have shape ({D},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3, device=dev)
        if tuple(pos_embed.shape) != (1, 1 + L, D):
            raise ValueError(f"pos_embed must have shape (1, 1 + L, D) = (1, {1 + L}, {D}), got {tuple(pos_embed.shape)}")
        if not pos_embed.is_floating_point():
            raise TypeError(f"pos_embed must be a floating point tensor, got {pos_embed.dtype}")
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=(torch.int64,), device=dev)
    if ids_keep.shape[0] != n:
        raise ValueError(f"ids_keep must have shape (N, K) with N = {n}, got {tuple(ids_keep.shape)}")
    check_index_range("ids_keep", ids_keep, L)  # free on the CPU; on a GPU it would sync the host
    if imgs.requires_grad and torch.is_grad_enabled():
        raise ValueError("imgs must not require grad: masked_patch_embed gives no gradient to the input images "
                         "(detach them)")


def masked_patch_embed(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       pos_embed: torch.Tensor | None, patch_size: int, impl: str = "auto", *,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """Patch embedding of the kept patches only: ``(patchify(imgs) @ W^T + b + pos_embed[1:])[ids_keep]``.

    Args:
        imgs: (N, C, H, W) images, H and W multiples of ``patch_size`` (any strides): float (already
            normalised, the official convention) or uint8 raw pixels, which are normalised per channel
            as torchvision's ToTensor + Normalize(mean, std) would, in fp32, and rounded to the
            weight's dtype (the kernels do it where they read the pixels: no float image is made).
            They get no gradient: a ValueError is raised if they require one.
        ids_keep: (N, K) int64 kept patch indices in [0, L), L = (H/p)*(W/p), row-major patch grid.
        weight: Conv2d weight [D, C, p, p], bias (D,) or None, both in float imgs' dtype (any float dtype
            for uint8 imgs).
        pos_embed: (1, 1 + L, D) (row 0 is the cls position, rows 1: the patches) or None; any float
            dtype: added as the official ``x + pos_embed`` adds it, to the conv's output rounded to
            the weight's dtype, in the two dtypes' promotion (fp32 under autocast).
        patch_size: p.
        impl: "auto" | "triton" | "cuda" | "reference".
        mean, std: per-channel statistics for uint8 imgs (C floats each, std > 0; both None:
            ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)). Must be None for float imgs.

    Returns:
        (N, K, D) tokens in weight's dtype, which float imgs share (fp32 accumulation), promoted
        with pos_embed's when it is given. Under autocast, float imgs, weight and bias are first
        cast to the autocast dtype, as F.conv2d would (uint8 imgs are then normalised into it), so
        the tokens are that dtype, or fp32 with an fp32 pos_embed (the official fp32 stream).
        On a GPU, ids outside [0, L) are not checked (that would sync) and give NaN rows.
    """
    dt = autocast_dtype(imgs.device) if isinstance(imgs, torch.Tensor) else None
    if dt is not None:
        if imgs.is_floating_point():
            imgs = imgs.to(dt)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            weight = weight.to(dt)
        if isinstance(bias, torch.Tensor) and bias.is_floating_point():
            bias = bias.to(dt)
    _validate(imgs, ids_keep, weight, bias, pos_embed, patch_size)
    check_impl(impl, _WHAT)  # the rest where the op runs (what a profile counts)
    stats = pixel_stats(imgs, mean, std)
    m, s = (list(stats[0]), list(stats[1])) if stats is not None else (None, None)
    return call(_masked_patch_embed_op, imgs, ids_keep, weight, bias, pos_embed, patch_size, impl, m, s)


__all__ = ["masked_patch_embed"]
