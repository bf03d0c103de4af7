"""Triton decoder un-shuffle: mask-token fill, gather by ids_restore and decoder position embedding in
one pass, and its backward (scatter of the visible-token grads, deterministic mask-token and
position-embedding reductions).

Output row t of sample n (t = 0 is the cls token, t = 1 + l is patch l):
    t == 0:                    x_vis[n, 0] + pos[0]
    0 <= ids_restore[n, l] < K: x_vis[n, 1 + ids_restore[n, l]] + pos[1 + l]
    otherwise:                 mask_token + pos[1 + l]
An index outside [0, K) therefore reads the mask token: no load or store ever leaves its tensor,
whatever the ids hold.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _unshuffle_fwd_kernel(
    x_ptr,      # (N, 1+K, D) x_vis, any strides
    tok_ptr,    # (D,) mask token, contiguous, out's dtype
    ids_ptr,    # (N, L) int64 ids_restore
    pos_ptr,    # (1+L, D) position embedding, out's dtype
    out_ptr,    # (N, 1+L, D) contiguous: x's dtype promoted with tok's and pos's
    T, K, D,
    stride_x_n, stride_x_k, stride_x_d,
    stride_ids_n, stride_ids_l,
    stride_pos_t, stride_pos_d,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # the batch on axis 0: axes 1 and 2 stop at 65535
    pid_t = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    row_ok = t < T
    is_patch = row_ok & (t >= 1)
    r = tl.load(ids_ptr + n * stride_ids_n + (t - 1) * stride_ids_l, mask=is_patch, other=0).to(tl.int64)
    vis = is_patch & (r >= 0) & (r < K)
    take_x = (row_ok & (t == 0)) | vis
    take_tok = is_patch & ((r < 0) | (r >= K))
    src = tl.where(vis, r + 1, 0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        dm = d < D
        xv = tl.load(x_ptr + n * stride_x_n + src[:, None] * stride_x_k + d[None, :] * stride_x_d,
                     mask=take_x[:, None] & dm[None, :], other=0.0).to(tl.float32)
        tok = tl.load(tok_ptr + d, mask=dm, other=0.0).to(tl.float32)
        v = tl.where(take_tok[:, None], tok[None, :], xv)
        pos = tl.load(pos_ptr + t[:, None] * stride_pos_t + d[None, :] * stride_pos_d,
                      mask=row_ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
        tl.store(out_ptr + (n * T + t[:, None]) * D + d[None, :], (v + pos).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dm[None, :])


@triton.jit
def _unshuffle_bwd_kernel(
    g_ptr,         # (N, 1+L, D) grad of the output, any strides
    ids_ptr,       # (N, L) int64 ids_restore
    gx_ptr,        # (N, 1+K, D) grad of x_vis, contiguous, x_vis's dtype (g rounded where stored)
    tok_part_ptr,  # (N_CHUNKS * T_BLOCKS, D) fp32 per-program mask-token partial sums
    pos_part_ptr,  # (N_CHUNKS, 1+L, D) fp32 per-chunk position-embedding partial sums (NEED_POS)
    N, T, K, D, N_PER,
    stride_g_n, stride_g_t, stride_g_d,
    stride_ids_n, stride_ids_l,
    NEED_POS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_T output rows x a chunk of N_PER samples, walked in a fixed order, so the
    # reductions over samples are sequential and the result does not depend on scheduling.
    pid_t = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    n_tblocks = tl.num_programs(0).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    row_ok = t < T
    is_patch = row_ok & (t >= 1)
    n_start = pid_c * N_PER
    n_end = tl.minimum(n_start + N_PER, N)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        dm = d < D
        acc_tok = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        acc_pos = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for n in range(n_start, n_end):
            r = tl.load(ids_ptr + n * stride_ids_n + (t - 1) * stride_ids_l, mask=is_patch, other=0).to(tl.int64)
            vis = is_patch & (r >= 0) & (r < K)
            take_x = (row_ok & (t == 0)) | vis
            take_tok = is_patch & ((r < 0) | (r >= K))
            dst = tl.where(vis, r + 1, 0)
            gv = tl.load(g_ptr + n * stride_g_n + t[:, None] * stride_g_t + d[None, :] * stride_g_d,
                         mask=row_ok[:, None] & dm[None, :], other=0.0)
            tl.store(gx_ptr + (n * (K + 1) + dst[:, None]) * D + d[None, :], gv.to(gx_ptr.dtype.element_ty),
                     mask=take_x[:, None] & dm[None, :])
            g32 = gv.to(tl.float32)
            acc_tok += tl.where(take_tok[:, None], g32, 0.0)
            if NEED_POS:
                acc_pos += g32
        tl.store(tok_part_ptr + (pid_c * n_tblocks + pid_t) * D + d, tl.sum(acc_tok, axis=0), mask=dm)
        if NEED_POS:
            tl.store(pos_part_ptr + (pid_c * T + t[:, None]) * D + d[None, :], acc_pos,
                     mask=row_ok[:, None] & dm[None, :])


def _config(T: int, D: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) by shape; no autotune (the interpreter cannot run it)."""
    block_d = min(triton.next_power_of_2(D), 1024)
    if device.type != "cuda":
        # Interpreter: fewer, larger programs run faster.
        return min(16, triton.next_power_of_2(T)), block_d, 4
    block_t = max(1, min(8, 4096 // block_d))
    warps = 4 if block_t * block_d <= 2048 else 8
    return block_t, block_d, warps


def unshuffle_fwd(x_vis: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                  pos_embed: torch.Tensor) -> torch.Tensor:
    """Launcher (inputs validated by maefast.ops.unshuffle).

    x_vis (N, 1+K, D); mask_token (D,) and pos_embed (1+L, D) in one dtype; ids_restore (N, L)
    int64. Returns the contiguous (N, 1+L, D) decoder input in x_vis's dtype promoted with theirs.
    """
    N, K1, D = x_vis.shape
    L = ids_restore.shape[1]
    T = L + 1
    out = torch.empty(N, T, D, dtype=torch.promote_types(x_vis.dtype, pos_embed.dtype), device=x_vis.device)
    if N == 0 or D == 0:
        return out
    block_t, block_d, warps = _config(T, D, x_vis.device)
    grid = (N, triton.cdiv(T, block_t))
    _unshuffle_fwd_kernel[grid](
        x_vis, mask_token, ids_restore, pos_embed, out,
        T, K1 - 1, D,
        x_vis.stride(0), x_vis.stride(1), x_vis.stride(2),
        ids_restore.stride(0), ids_restore.stride(1),
        pos_embed.stride(0), pos_embed.stride(1),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def _n_chunks(N: int, t_blocks: int, device: torch.device) -> int:
    if device.type != "cuda":
        return min(N, 2)
    # Enough programs to fill a large GPU (~1000), few enough to keep the partials small.
    return max(1, min(N, triton.cdiv(1024, t_blocks)))


def unshuffle_bwd(grad_out: torch.Tensor, ids_restore: torch.Tensor, num_visible: int,
                  need_pos: bool, x_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launcher. grad_out (N, 1+L, D); ids_restore (N, L) int64 (a permutation of 0..L-1, as from
    masking: then every row of the x_vis grad is written exactly once).

    Returns (grad_x_vis (N, 1+K, D) in x_dtype (default grad_out's; rounded where the kernel stores
    it), grad_mask_token (D,) fp32, grad_pos_embed (1+L, D) fp32 or None).
    """
    N, T, D = grad_out.shape
    K = num_visible
    dev = grad_out.device
    # zeros: a row no id maps to (ids_restore not a permutation) reads 0, never stale memory
    gx = torch.zeros(N, K + 1, D, dtype=x_dtype or grad_out.dtype, device=dev)
    block_t, block_d, warps = _config(T, D, dev)
    t_blocks = triton.cdiv(T, block_t)
    chunks = _n_chunks(N, t_blocks, dev)
    n_per = triton.cdiv(N, chunks)
    chunks = triton.cdiv(N, n_per)
    tok_part = torch.empty(chunks * t_blocks, D, dtype=torch.float32, device=dev)
    pos_part = torch.empty(chunks, T, D, dtype=torch.float32, device=dev) if need_pos else tok_part
    _unshuffle_bwd_kernel[(t_blocks, chunks)](
        grad_out, ids_restore, gx, tok_part, pos_part,
        N, T, K, D, n_per,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        ids_restore.stride(0), ids_restore.stride(1),
        NEED_POS=need_pos, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )
    g_tok = tok_part.sum(0)
    g_pos = pos_part.sum(0) if need_pos else None
    return gx, g_tok, g_pos
