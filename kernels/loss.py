"""Triton masked MSE on (optionally) per-patch-normalised pixels, read straight from the NCHW image.

Programs walk the rows of pred, BLOCK_M rows each:
  PRED_MASKED=False: pred (N, L, P), row (n, l) is patch l, weight w = mask[n, l] (1 = removed); every
      image patch is read, also where w == 0: a zero-weight row contributes w * row loss = 0, or NaN
      when its pred or image patch is not finite, as the official `(loss * mask).sum()` (0 * NaN).
  PRED_MASKED=True: pred (N, M, P), row (n, j) is patch ids[n, j] (the masked patches in shuffle
      order, `maefast.ops.masked_patch_ids`; clamped into [0, L)), w = 1: visible patches are never
      read and every pred row is written by the backward (no zero fill).
Target t = img patch in the official (p_row, p_col, c) order; with NORM, per patch in fp32:
mean, unbiased var, (t - mean) / sqrt(var + 1e-6). Row loss = mean((pred - t)^2) * w.
Forward writes one fp32 partial per program (summed by torch: deterministic) and, with GRAD, the
weighted residual w * (pred - t) in pred's dtype as well (one pass over pred and the image instead
of two; the op's backward then only scales it by grad_loss * 2 / (P * sum(w)) — scaled later, so
that fp16 holds it: the gradient itself can be below fp16's normal range until GradScaler's factor
is in); the backward kernel writes grad = scale * w * 2 / P * (pred - t), scale = grad_loss / sum(w)
read from device memory.
uint8 images (NORMALIZE): each pixel is normalised as it is read, (v - offset_c) * scale_c in fp32
(kernels/_pixels.py), before the per-patch statistics — the target of a float image normalised first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._pixels import affine_args, normalize_pixels

# no fma contraction: a uint8 pixel's normalised value is rounded as such before pred - target uses it
# (the target of a float image normalised first, as csrc/pixels.cuh's __fmul_rn keeps it), and the
# squared residuals are rounded before they are summed, as the reference's ops do
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

NORM_PIX_EPS = 1e-6


@triton.jit
def _rows(
    pred_ptr, img_ptr, w_ptr, ids_ptr,
    pid, NR, R, L, GW, P,
    stride_pred_n, stride_pred_r, stride_pred_e,
    stride_img_n, stride_img_c, stride_img_h, stride_img_w,
    stride_w_n, stride_w_l,
    stride_ids_n, stride_ids_l,
    eps,
    px_scale0, px_scale1, px_scale2, px_scale3, px_offset0, px_offset1, px_offset2, px_offset3,
    PATCH: tl.constexpr, CHANNELS: tl.constexpr, NORM: tl.constexpr, PRED_MASKED: tl.constexpr,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Loads BLOCK_M pred rows (of NR = N * R) and their image patches; returns (pred - target in
    fp32, weight, sample, pred row, row valid, e, e valid)."""
    q = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = q < NR
    n = q // R
    prow = q % R
    if PRED_MASKED:
        l = tl.load(ids_ptr + n * stride_ids_n + prow * stride_ids_l, mask=row_ok, other=0).to(tl.int64)
        l = tl.minimum(tl.maximum(l, 0), L - 1)  # never outside the image, whatever the ids hold
        active = row_ok
        w = row_ok.to(tl.float32)
    else:
        l = prow
        w = tl.load(w_ptr + n * stride_w_n + l * stride_w_l, mask=row_ok, other=0.0).to(tl.float32)
        active = row_ok  # the official loss reads every patch (NaN in an unmasked one reaches it)
    # (p_row, p_col, c) of each element: constexpr divisors (strength-reduced), int32 until the offsets
    e32 = tl.arange(0, BLOCK_P)
    em = e32 < P
    c = (e32 % CHANNELS).to(tl.int64)
    pc = ((e32 // CHANNELS) % PATCH).to(tl.int64)
    pr = (e32 // (CHANNELS * PATCH)).to(tl.int64)
    e = e32.to(tl.int64)
    hi = l // GW
    wi = l % GW
    img_off = (n[:, None] * stride_img_n + c[None, :] * stride_img_c
               + (hi[:, None] * PATCH + pr[None, :]) * stride_img_h
               + (wi[:, None] * PATCH + pc[None, :]) * stride_img_w)
    tm = active[:, None] & em[None, :]
    t = tl.load(img_ptr + img_off, mask=tm, other=0)
    if NORMALIZE:
        t = tl.where(tm, normalize_pixels(t, c[None, :], px_scale0, px_scale1, px_scale2, px_scale3, px_offset0,
                                          px_offset1, px_offset2, px_offset3), 0.0)
    t = t.to(tl.float32)
    if NORM:
        mean = tl.sum(t, axis=1) / P
        dev = tl.where(em[None, :], t - mean[:, None], 0.0)
        var = tl.sum(dev * dev, axis=1) / (P - 1)
        t = dev / tl.sqrt_rn(var + eps)[:, None]
    pred_off = n[:, None] * stride_pred_n + prow[:, None] * stride_pred_r + e[None, :] * stride_pred_e
    pm = row_ok[:, None] & em[None, :]
    x = tl.load(pred_ptr + pred_off, mask=pm, other=0.0).to(tl.float32)
    diff = tl.where(pm, x - t, 0.0)
    return diff, w, n, prow, row_ok, e, em


@triton.jit
def _store_scaled(out_ptr, factor, diff, w, n, prow, row_ok, e, em, R, P):
    """factor * w * (pred - t) into the contiguous (N, R, P) out, in its dtype."""
    g = diff * (factor * w)[:, None]
    tl.store(out_ptr + (n[:, None] * R + prow[:, None]) * P + e[None, :], g.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & em[None, :])


@triton.jit
def _norm_pix_loss_fwd_kernel(
    pred_ptr,   # (N, R, P) float, any strides (R = L, or M masked rows)
    img_ptr,    # (N, C, H, W) float or uint8 (NORMALIZE), any strides
    w_ptr,      # (N, L) fp32 mask (PRED_MASKED=False)
    ids_ptr,    # (N, M) int64 masked patch ids in shuffle order (PRED_MASKED=True)
    part_ptr,   # (num_programs,) fp32 partial sums of w * row loss
    res_ptr,    # (N, R, P) contiguous, pred's dtype: w * (pred - t) (GRAD)
    NR, R, L, GW, P,
    stride_pred_n, stride_pred_r, stride_pred_e,
    stride_img_n, stride_img_c, stride_img_h, stride_img_w,
    stride_w_n, stride_w_l,
    stride_ids_n, stride_ids_l,
    eps,
    px_scale0, px_scale1, px_scale2, px_scale3, px_offset0, px_offset1, px_offset2, px_offset3,
    PATCH: tl.constexpr, CHANNELS: tl.constexpr, NORM: tl.constexpr, PRED_MASKED: tl.constexpr,
    NORMALIZE: tl.constexpr, GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    diff, w, n, prow, row_ok, e, em = _rows(
        pred_ptr, img_ptr, w_ptr, ids_ptr, pid, NR, R, L, GW, P,
        stride_pred_n, stride_pred_r, stride_pred_e,
        stride_img_n, stride_img_c, stride_img_h, stride_img_w,
        stride_w_n, stride_w_l, stride_ids_n, stride_ids_l, eps,
        px_scale0, px_scale1, px_scale2, px_scale3, px_offset0, px_offset1, px_offset2, px_offset3,
        PATCH, CHANNELS, NORM, PRED_MASKED, NORMALIZE, BLOCK_M, BLOCK_P)
    row_loss = tl.sum(diff * diff, axis=1) / P
    contrib = tl.where(row_ok, row_loss * w, 0.0)
    tl.store(part_ptr + pid, tl.sum(contrib, axis=0))
    if GRAD:  # what the backward needs, ~1 in magnitude whatever N, L and P (fp16 holds it; the scale comes later)
        _store_scaled(res_ptr, 1.0, diff, w, n, prow, row_ok, e, em, R, P)


@triton.jit
def _norm_pix_loss_bwd_kernel(
    pred_ptr, img_ptr, w_ptr, ids_ptr,
    scale_ptr,  # () fp32: grad_loss / sum(w)
    gpred_ptr,  # like pred, contiguous, pred's dtype
    NR, R, L, GW, P,
    stride_pred_n, stride_pred_r, stride_pred_e,
    stride_img_n, stride_img_c, stride_img_h, stride_img_w,
    stride_w_n, stride_w_l,
    stride_ids_n, stride_ids_l,
    eps,
    px_scale0, px_scale1, px_scale2, px_scale3, px_offset0, px_offset1, px_offset2, px_offset3,
    PATCH: tl.constexpr, CHANNELS: tl.constexpr, NORM: tl.constexpr, PRED_MASKED: tl.constexpr,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    diff, w, n, prow, row_ok, e, em = _rows(
        pred_ptr, img_ptr, w_ptr, ids_ptr, pid, NR, R, L, GW, P,
        stride_pred_n, stride_pred_r, stride_pred_e,
        stride_img_n, stride_img_c, stride_img_h, stride_img_w,
        stride_w_n, stride_w_l, stride_ids_n, stride_ids_l, eps,
        px_scale0, px_scale1, px_scale2, px_scale3, px_offset0, px_offset1, px_offset2, px_offset3,
        PATCH, CHANNELS, NORM, PRED_MASKED, NORMALIZE, BLOCK_M, BLOCK_P)
    _store_scaled(gpred_ptr, tl.load(scale_ptr) * 2.0 / P, diff, w, n, prow, row_ok, e, em, R, P)


def _config(P: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_P, num_warps) by shape; no autotune (the interpreter cannot run it)."""
    block_p = triton.next_power_of_2(P)
    if device.type != "cuda":
        return max(1, min(16, 16384 // block_p)), block_p, 4
    block_m = max(1, min(4, 4096 // block_p))
    warps = 4 if block_m * block_p <= 2048 else 8
    return block_m, block_p, warps


def _args(pred, imgs, weight, ids, patch_size):
    N, C, H, W = imgs.shape
    GW = W // patch_size
    L = (H // patch_size) * GW
    P = patch_size * patch_size * C
    R = pred.shape[1]
    wt = weight if weight is not None else ids
    it = ids if ids is not None else weight
    return (N * R, R, L, GW, P,
            pred.stride(0), pred.stride(1), pred.stride(2),
            imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3),
            wt.stride(0), wt.stride(1), it.stride(0), it.stride(1)), (wt, it), N * R, P, C


def norm_pix_loss_fwd(pred: torch.Tensor, imgs: torch.Tensor, weight: torch.Tensor | None,
                      ids: torch.Tensor | None, patch_size: int, norm_pix: bool,
                      with_residual: bool = False, affine=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launcher (inputs validated by maefast.ops.norm_pix_loss). Exactly one of weight ((N, L) fp32
    mask: pred is (N, L, P)) and ids ((N, M) int64 masked patch ids in shuffle order: pred is
    (N, M, P)) is given. Returns (sum over rows of w * row loss, a 0-d fp32 tensor — the caller
    divides by sum(w) —, and with_residual the weighted residual w * (pred - target) that the
    gradient is made of (grad = residual * grad_loss * 2 / (P * sum(w))): contiguous, pred's dtype,
    every row written; else None). uint8 imgs need `affine`, (scale, offset) of 4 floats each
    (maefast.ops._pixels)."""
    args, (wt, it), NR, P, C = _args(pred, imgs, weight, ids, patch_size)
    block_m, block_p, warps = _config(P, pred.device)
    grid = (triton.cdiv(NR, block_m),)
    part = torch.empty(grid[0], dtype=torch.float32, device=pred.device)
    res = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device) if with_residual else None
    _norm_pix_loss_fwd_kernel[grid](
        pred, imgs, wt, it, part, res if res is not None else part, *args, NORM_PIX_EPS, *affine_args(affine),
        PATCH=patch_size, CHANNELS=C, NORM=norm_pix, PRED_MASKED=ids is not None,
        NORMALIZE=imgs.dtype == torch.uint8, GRAD=res is not None,
        BLOCK_M=block_m, BLOCK_P=block_p, num_warps=warps, **LAUNCH_OPTIONS)
    return part.sum(), res


def norm_pix_loss_bwd(scale: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, weight: torch.Tensor | None,
                      ids: torch.Tensor | None, patch_size: int, norm_pix: bool, affine=None) -> torch.Tensor:
    """Launcher. scale: 0-d fp32 tensor grad_loss / sum(w) (stays on the device: no host sync).
    Returns grad of pred (contiguous, pred's dtype; every row written)."""
    args, (wt, it), NR, P, C = _args(pred, imgs, weight, ids, patch_size)
    block_m, block_p, warps = _config(P, pred.device)
    grid = (triton.cdiv(NR, block_m),)
    gpred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    _norm_pix_loss_bwd_kernel[grid](
        pred, imgs, wt, it, scale, gpred, *args, NORM_PIX_EPS, *affine_args(affine),
        PATCH=patch_size, CHANNELS=C, NORM=norm_pix, PRED_MASKED=ids is not None,
        NORMALIZE=imgs.dtype == torch.uint8,
        BLOCK_M=block_m, BLOCK_P=block_p, num_warps=warps, **LAUNCH_OPTIONS)
    return gpred
