"""Triton masked (visible-only) patch embedding: a gather-GEMM straight from the NCHW image.

Forward: out[m, d] = sum_k A[m, k] * W[d, k] + b[d] + pos[1 + l(m), d], where row m = n*K + j is the
kept patch l(m) = ids_keep[n, j] of image n and A[m, k] is its pixel with k ordered (c, kh, kw) —
the flattening of the Conv2d weight [D, C, p, p], so the weight is used as is. The prologue gathers
the A tile from the image (any strides), the epilogue adds the bias and the gathered position rows.

Backward (both deterministic: per-program fp32 partials over a split of the rows, summed by the
launcher; no atomics):
  dW[d, k] = sum_m G[m, d] * A[m, k]                      (A gathered again, never stored)
  dpos[1 + l, d] = sum_{n, j : ids_keep[n, j] = l} G[n*K + j, d]
computed as one-hot(ids) @ G per sample, so repeated ids add up like the reference's gather.
An id outside [0, L) gives a NaN output row and contributes nothing to the gradients.

uint8 images (NORMALIZE): the prologue normalises each gathered pixel, (v - offset_c) * scale_c in fp32
(kernels/_pixels.py), and rounds it to the weight's dtype, the dtype of the GEMM — what a float
image normalised first and cast to that dtype would hold; no float image is ever written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._pixels import affine_args, apply_pixel_factors, pixel_factors

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_TARGET_PROGRAMS = 264  # ~2 waves of an H100's 132 SMs; a split heuristic, not a device query


@triton.jit
def _gather_rows(imgs_ptr, ids_ptr, offs_m, m_valid, K, L, GRID_W,
                 stride_img_n, stride_img_c, stride_img_h, stride_img_w, P: tl.constexpr):
    """Per row m: (pixel offset of the patch's top-left corner, whether its id is valid, the id)."""
    l = tl.load(ids_ptr + offs_m, mask=m_valid, other=-1)
    valid = m_valid & (l >= 0) & (l < L)
    l = tl.where(valid, l, 0)
    n = offs_m // K
    pr = l // GRID_W
    pc = l - pr * GRID_W
    base = n * stride_img_n + (pr * P) * stride_img_h + (pc * P) * stride_img_w
    return base, valid, l


@triton.jit
def _col_offsets(offs_k, stride_img_c, stride_img_h, stride_img_w, P: tl.constexpr):
    """Pixel offset inside a patch of column k = (c*P + kh)*P + kw (the Conv2d weight order)."""
    c = offs_k // (P * P)
    r = offs_k - c * (P * P)
    kh = r // P
    kw = r - kh * P
    return c * stride_img_c + kh * stride_img_h + kw * stride_img_w


@triton.jit
def _pixels(imgs_ptr, offs, mask, scale_k, offset_k, NORMALIZE: tl.constexpr, DTYPE: tl.constexpr):
    """The A tile in the GEMM's dtype: pixels as stored, or (NORMALIZE) uint8 normalised with the
    per-column factors scale_k / offset_k (1-D over the tile's columns: `pixel_factors` of each
    column's channel, computed once per column, not per element); 0 where ~mask."""
    a = tl.load(imgs_ptr + offs, mask=mask, other=0)
    if NORMALIZE:
        a = tl.where(mask, apply_pixel_factors(a, scale_k[None, :], offset_k[None, :]), 0.0)
    return a.to(DTYPE)


@triton.jit
def _masked_patch_embed_fwd_kernel(
    imgs_ptr,   # (N, C, H, W) any strides; float in the weight's dtype, or uint8 (NORMALIZE)
    ids_ptr,    # (N, K) int64, contiguous
    w_ptr,      # (D, C*P*P) the Conv2d weight flattened, strides (stride_w_d, stride_w_k)
    b_ptr,      # (D,) contiguous, read when HAS_BIAS
    pos_ptr,    # (1 + L, D) strides (stride_pos_l, stride_pos_d), read when HAS_POS
    out_ptr,    # (N*K, D) contiguous: the weight's dtype promoted with pos_embed's (HAS_POS)
    stride_img_n, stride_img_c, stride_img_h, stride_img_w,
    stride_w_d, stride_w_k,
    stride_pos_l, stride_pos_d,
    M, K, D, L, GRID_W, KD,
    px_scale0, px_scale1, px_scale2, px_scale3, px_offset0, px_offset1, px_offset2, px_offset3,
    P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_valid = offs_m < M
    n_valid = offs_n < D
    base, row_valid, l = _gather_rows(imgs_ptr, ids_ptr, offs_m, m_valid, K, L, GRID_W,
                                      stride_img_n, stride_img_c, stride_img_h, stride_img_w, P)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_valid = offs_k < KD
        col = _col_offsets(offs_k, stride_img_c, stride_img_h, stride_img_w, P)
        scale_k, offset_k = pixel_factors(offs_k // (P * P), px_scale0, px_scale1, px_scale2, px_scale3, px_offset0,
                                          px_offset1, px_offset2, px_offset3)  # per column, not per element
        a = _pixels(imgs_ptr, base[:, None] + col[None, :], row_valid[:, None] & k_valid[None, :], scale_k, offset_k,
                    NORMALIZE, w_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs_n[None, :] * stride_w_d + offs_k[:, None] * stride_w_k,
                    mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    out_dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        # the reference's (the official's) roundings: the conv's output in the weight's dtype, then
        # + pos_embed in the output dtype (both promoted: fp32 for bf16 weights and an fp32 pos_embed)
        acc = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
        pos = tl.load(pos_ptr + (1 + l)[:, None] * stride_pos_l + offs_n[None, :] * stride_pos_d,
                      mask=row_valid[:, None] & n_valid[None, :], other=0.0)
        acc += pos.to(out_dtype).to(tl.float32)
    acc = tl.where(row_valid[:, None], acc, float("nan"))
    tl.store(out_ptr + offs_m[:, None] * D + offs_n[None, :], acc.to(out_dtype),
             mask=m_valid[:, None] & n_valid[None, :])


@triton.jit
def _masked_patch_embed_bwd_dw_kernel(
    imgs_ptr,   # (N, C, H, W) any strides; float in g's dtype, or uint8 (NORMALIZE)
    ids_ptr,    # (N, K) int64, contiguous
    g_ptr,      # (N*K, D) contiguous: grad of the output, in the weight's dtype
    part_ptr,   # (SPLIT, D, KD) float32 partial sums of dW
    stride_img_n, stride_img_c, stride_img_h, stride_img_w,
    M, K, D, L, GRID_W, KD, ROWS_PER_SPLIT,
    px_scale0, px_scale1, px_scale2, px_scale3, px_offset0, px_offset1, px_offset2, px_offset3,
    P: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_d = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    offs_k = pid_k * BLOCK_KD + tl.arange(0, BLOCK_KD).to(tl.int64)
    d_valid = offs_d < D
    k_valid = offs_k < KD
    col = _col_offsets(offs_k, stride_img_c, stride_img_h, stride_img_w, P)
    # the channel depends on the column only: its factors once, outside the row loop
    scale_k, offset_k = pixel_factors(offs_k // (P * P), px_scale0, px_scale1, px_scale2, px_scale3, px_offset0,
                                      px_offset1, px_offset2, px_offset3)
    acc = tl.zeros((BLOCK_D, BLOCK_KD), dtype=tl.float32)
    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_valid = offs_m < m_end
        base, row_valid, _ = _gather_rows(imgs_ptr, ids_ptr, offs_m, m_valid, K, L, GRID_W,
                                          stride_img_n, stride_img_c, stride_img_h, stride_img_w, P)
        a = _pixels(imgs_ptr, base[:, None] + col[None, :], row_valid[:, None] & k_valid[None, :], scale_k, offset_k,
                    NORMALIZE, g_ptr.dtype.element_ty)
        gt = tl.load(g_ptr + offs_m[None, :] * D + offs_d[:, None], mask=m_valid[None, :] & d_valid[:, None],
                     other=0.0)
        if IEEE:
            acc = tl.dot(gt, a, acc, input_precision="ieee")
        else:
            acc = tl.dot(gt, a, acc)
    tl.store(part_ptr + pid_s * D * KD + offs_d[:, None] * KD + offs_k[None, :], acc,
             mask=d_valid[:, None] & k_valid[None, :])


@triton.jit
def _masked_patch_embed_bwd_dpos_kernel(
    ids_ptr,    # (N, K) int64, contiguous
    g_ptr,      # (N*K, D) contiguous: grad of the output
    part_ptr,   # (SPLIT, L, D) float32 partial sums of dpos[1:]
    N, K, D, L, SAMPLES_PER_SPLIT,
    IEEE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_l = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_valid = offs_d < D
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    g_dtype = g_ptr.dtype.element_ty
    n_start = pid_s * SAMPLES_PER_SPLIT
    n_end = tl.minimum(n_start + SAMPLES_PER_SPLIT, N)
    for n in range(n_start, n_end):
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_valid = offs_k < K
            ids = tl.load(ids_ptr + n * K + offs_k, mask=k_valid, other=-1)
            onehot = (ids[None, :] == offs_l[:, None]).to(g_dtype)  # exact in every dtype
            g = tl.load(g_ptr + (n * K + offs_k)[:, None] * D + offs_d[None, :],
                        mask=k_valid[:, None] & d_valid[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(onehot, g, acc, input_precision="ieee")
            else:
                acc = tl.dot(onehot, g, acc)
    tl.store(part_ptr + pid_s * L * D + offs_l[:, None] * D + offs_d[None, :], acc,
             mask=(offs_l < L)[:, None] & d_valid[None, :])


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _check_uint8_args(imgs: torch.Tensor, affine, dtype: torch.dtype | None = None, need_dtype: bool = False) -> None:
    """uint8 imgs carry neither the GEMM's dtype nor their normalisation: without them the launchers
    would cast the gradient to uint8, or read unnormalised pixels, silently."""
    if imgs.dtype != torch.uint8:
        return
    if affine is None:
        raise ValueError("uint8 imgs need affine=(scale, offset), their normalisation (maefast.ops._pixels.pixel_affine)")
    if need_dtype and dtype not in _TL_DTYPE:
        raise ValueError(f"uint8 imgs need dtype=, the weight's float dtype (the GEMM's), got {dtype}")


def _fwd_config(dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the forward, by the GEMM's (weight's) dtype.

    16-bit: 128 x 64 tiles. 128 x 128 (before 2026-12-05) spilled 8-32 B at p14 once the tokens became
    fp32 with an fp32 pos_embed (the autocast case: Triton 3.6 with uint8 images, 3.9 with bf16 ones);
    128 x 64 compiles without spills under both, 132-254 registers (scripts/compile_kernels.py). A
    GEMM of ~12 GFLOP at ViT-H/14 b128, well under 0.1% of the step: unmeasured."""
    if device.type != "cuda":
        return 32, 64, 32, 4, 1
    return (64, 64, 32, 4, 2) if dtype == torch.float32 else (128, 64, 32, 8, 3)


def _dw_config(dtype: torch.dtype, uint8: bool, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_D, BLOCK_KD, BLOCK_M, num_warps, num_stages) of the weight backward.

    fp32 (IEEE products: FMA, no tensor cores) with uint8 images runs one stage: pipelined, the
    16-wide uint8 tile (16 bytes a thread) on top of the FMA tiles spilled at 255 registers under
    Triton 3.6 (sm_90: 824 B at p14, 392 B at p16), unpipelined 227 / 88 registers and no spill
    (3.9: 160 / 90); the loop's arithmetic and order are the same. fp32 images keep two stages: no
    spill under 3.6 (168 / 174 registers; one stage: 227 / 96), ~3 KB under 3.9 (one stage: none);
    a GPU measurement decides. scripts/compile_kernels.py prints these figures."""
    if device.type != "cuda":
        return 32, 32, 32, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 1 if uint8 else 2
    return 128, 64, 64, 8, 3


def masked_patch_embed_fwd_triton(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None, pos_embed: torch.Tensor | None,
                                  patch_size: int, affine=None) -> torch.Tensor:
    """Launcher (inputs validated by maefast.ops): returns (N, K, D) in the weight's dtype (float imgs
    have it too), promoted with pos_embed's when it is given (`x + pos_embed` in torch). uint8 imgs
    need `affine`, (scale, offset) of 4 floats each (maefast.ops._pixels)."""
    _check_uint8_args(imgs, affine)
    N, C, H, W = imgs.shape
    K = ids_keep.shape[1]
    D = weight.shape[0]
    P = patch_size
    grid_w = W // P
    L = (H // P) * grid_w
    KD = C * P * P
    M = N * K
    w2 = weight.reshape(D, KD)
    ids = ids_keep.contiguous()
    dt = weight.dtype
    normalize = imgs.dtype == torch.uint8
    out_dt = torch.promote_types(dt, pos_embed.dtype) if pos_embed is not None else dt
    out = torch.empty(N, K, D, dtype=out_dt, device=imgs.device)
    if M == 0 or D == 0:
        return out
    pos2 = pos_embed.reshape(pos_embed.shape[-2], D) if pos_embed is not None else None
    b = bias.contiguous() if bias is not None else None
    bm, bn, bk, warps, stages = _fwd_config(dt, imgs.device)
    grid = (triton.cdiv(M, bm), triton.cdiv(D, bn))
    _masked_patch_embed_fwd_kernel[grid](
        imgs, ids, w2, b if b is not None else out, pos2 if pos2 is not None else out, out,
        imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3),
        w2.stride(0), w2.stride(1),
        pos2.stride(0) if pos2 is not None else 0, pos2.stride(1) if pos2 is not None else 0,
        M, K, D, L, grid_w, KD, *affine_args(affine),
        P=P, HAS_BIAS=b is not None, HAS_POS=pos2 is not None, NORMALIZE=normalize, IEEE=dt == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


def _split(work_items: int, programs: int, interpreted: bool) -> int:
    if interpreted:
        return max(1, min(2, work_items))  # still exercises the partial-sum path
    return max(1, min(work_items, triton.cdiv(_TARGET_PROGRAMS, max(programs, 1)), 32))


def masked_patch_embed_bwd_triton(grad: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor, num_embed: int,
                                  patch_size: int, need_weight: bool, need_pos: bool, dtype: torch.dtype | None = None,
                                  affine=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launcher: (dW (D, C*p*p) float32 or None, dpos[1:] (L, D) float32 or None); grad (N, K, D) in
    the forward's output dtype: dW from it rounded to `dtype`, dpos from it as given. dtype: the
    weight's (the GEMM's; default imgs' dtype, which float imgs share with it); uint8 imgs need it
    and `affine` as in the forward (ValueError without them)."""
    _check_uint8_args(imgs, affine, dtype, need_dtype=True)
    N, C, H, W = imgs.shape
    K = ids_keep.shape[1]
    D = num_embed
    P = patch_size
    grid_w = W // P
    L = (H // P) * grid_w
    KD = C * P * P
    M = N * K
    g = grad.reshape(M, D).to(dtype or imgs.dtype).contiguous()  # as autograd gives it to the conv
    ids = ids_keep.contiguous()
    interp = _interpreted(imgs)
    ieee = g.dtype == torch.float32
    dw = dpos = None
    if need_weight:
        bd, bkd, bm, warps, stages = _dw_config(g.dtype, imgs.dtype == torch.uint8, imgs.device)
        tiles = triton.cdiv(D, bd) * triton.cdiv(KD, bkd)
        split = _split(triton.cdiv(M, bm), tiles, interp) if M else 1
        rows_per_split = triton.cdiv(triton.cdiv(M, split), bm) * bm if M else bm
        split = triton.cdiv(M, rows_per_split) if M else 1
        part = torch.zeros(split, D, KD, dtype=torch.float32, device=imgs.device)
        if M:
            _masked_patch_embed_bwd_dw_kernel[(triton.cdiv(D, bd), triton.cdiv(KD, bkd), split)](
                imgs, ids, g, part,
                imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3),
                M, K, D, L, grid_w, KD, rows_per_split, *affine_args(affine),
                P=P, NORMALIZE=imgs.dtype == torch.uint8, IEEE=ieee, BLOCK_D=bd, BLOCK_KD=bkd, BLOCK_M=bm,
                num_warps=warps, num_stages=stages)
        dw = part.sum(0) if split > 1 else part[0]
    if need_pos:
        bl, bd = (32, 32) if interp else (64, 64)
        bk = 16 if K <= 16 else (32 if interp or K <= 32 else 64)
        tiles = triton.cdiv(L, bl) * triton.cdiv(D, bd)
        split = _split(N, tiles, interp) if N else 1
        per = triton.cdiv(N, split) if N else 1
        split = triton.cdiv(N, per) if N else 1
        part = torch.zeros(split, L, D, dtype=torch.float32, device=imgs.device)
        gp = grad.reshape(M, D).contiguous()  # pos_embed's gradient from the output's (fp32 when promoted)
        if M:
            _masked_patch_embed_bwd_dpos_kernel[(triton.cdiv(L, bl), triton.cdiv(D, bd), split)](
                ids, gp, part, N, K, D, L, per,
                IEEE=gp.dtype == torch.float32, BLOCK_L=bl, BLOCK_D=bd, BLOCK_K=bk, num_warps=4,
                num_stages=1 if interp else 2)
        dpos = part.sum(0) if split > 1 else part[0]
    return dw, dpos
