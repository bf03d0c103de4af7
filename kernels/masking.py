"""Triton random masking: per-sample noise (given, or Philox from a seed) ranked inside the kernel.

rank[i] = #{j : noise[j] < noise[i] or (noise[j] == noise[i] and j < i)} is the position of patch i
in a stable ascending argsort of the sample's noise, so ids_restore = rank, ids_shuffle[rank[i]] = i,
ids_keep = ids_shuffle[:len_keep] and mask = (rank >= len_keep). One program ranks BLOCK_I patches
of one sample against all L patches in chunks of BLOCK_J: no global argsort, no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _noise_block(noise_ptr, stride_noise_n, stride_noise_l, n, offs, valid, seed, offset, L,
                 HAS_NOISE: tl.constexpr):
    if HAS_NOISE:
        v = tl.load(noise_ptr + n * stride_noise_n + offs * stride_noise_l, mask=valid, other=0.0)
    else:
        # Counter of (sample n, patch l) = offset + n*L + l, as in maefast.reference.philox_noise.
        v = tl.rand(seed, offset + n * L + offs)
    return v


# seed and offset change from call to call: unspecialised, or a value divisible by 16 (or equal to 1)
# would compile another variant of the kernel on first sight, inside a CUDA-graph capture too
@triton.jit(do_not_specialize=["seed", "offset"])
def _random_masking_fwd_kernel(
    noise_ptr,        # (N, L) any float dtype, read only when HAS_NOISE
    ids_keep_ptr,     # (N, K) int64, contiguous
    ids_restore_ptr,  # (N, L) int64, contiguous
    mask_ptr,         # (N, L) float32, contiguous
    seed_ptr,         # (1,) int64 device seed, read when SEED_FROM_PTR (CUDA-graph replays see its value)
    stride_noise_n, stride_noise_l,
    seed, offset,
    L, K,
    HAS_NOISE: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    valid_i = offs_i < L
    v_i = _noise_block(noise_ptr, stride_noise_n, stride_noise_l, n, offs_i, valid_i, seed, offset, L, HAS_NOISE)
    rank = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for j0 in range(0, L, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        valid_j = offs_j < L
        v_j = _noise_block(noise_ptr, stride_noise_n, stride_noise_l, n, offs_j, valid_j, seed, offset, L,
                           HAS_NOISE)
        # NaN ranks after every number (torch's sort order), NaNs among themselves by index
        nan_i = (v_i != v_i)[:, None]
        nan_j = (v_j != v_j)[None, :]
        lt = (v_j[None, :] < v_i[:, None]) | (nan_i & ~nan_j)
        eq = (v_j[None, :] == v_i[:, None]) | (nan_i & nan_j)
        before = lt | (eq & (offs_j[None, :] < offs_i[:, None]))
        before = before & valid_j[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)
    rank64 = rank.to(tl.int64)
    tl.store(ids_restore_ptr + n * L + offs_i, rank64, mask=valid_i)
    tl.store(mask_ptr + n * L + offs_i, (rank64 >= K).to(tl.float32), mask=valid_i)
    tl.store(ids_keep_ptr + n * K + rank64, offs_i, mask=valid_i & (rank64 < K))


def _config(L: int) -> tuple[int, int, int]:
    """(BLOCK_I, BLOCK_J, num_warps) chosen by shape (no autotune: the interpreter cannot run it)."""
    block_i = min(128, triton.next_power_of_2(L))
    block_j = min(64, triton.next_power_of_2(L))
    return block_i, block_j, 4


def random_masking_triton(batch: int, num_patches: int, len_keep: int, noise: torch.Tensor | None,
                          seed: int, offset: int, device: torch.device, seed_tensor: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher; inputs validated by maefast.ops.random_masking. Returns (ids_keep, ids_restore, mask).
    seed_tensor: a 1-element int64 tensor on `device` read by the kernel instead of `seed`."""
    N, L, K = batch, num_patches, len_keep
    ids_keep = torch.empty(N, K, dtype=torch.int64, device=device)
    ids_restore = torch.empty(N, L, dtype=torch.int64, device=device)
    mask = torch.empty(N, L, dtype=torch.float32, device=device)
    if N == 0:
        return ids_keep, ids_restore, mask
    block_i, block_j, warps = _config(L)
    has_noise = noise is not None
    src = noise if has_noise else mask  # dummy pointer when the kernel draws its own noise
    sn, sl = (noise.stride(0), noise.stride(1)) if has_noise else (0, 0)
    grid = (N, triton.cdiv(L, block_i))
    from_ptr = seed_tensor is not None and not has_noise
    _random_masking_fwd_kernel[grid](
        src, ids_keep, ids_restore, mask, seed_tensor if from_ptr else ids_restore, sn, sl,
        0 if from_ptr else seed, offset, L, K,
        HAS_NOISE=has_noise, SEED_FROM_PTR=from_ptr, BLOCK_I=block_i, BLOCK_J=block_j, num_warps=warps)
    return ids_keep, ids_restore, mask
