"""Triton column sums of an (M, N) matrix in fp32, with an optional fused cast: a bias gradient and the
matmul-dtype copy of the gradient it is summed from, in one read.

    y = x.to(out_dtype)                  (when out_dtype is given and differs from x's; else y is x)
    sums = y.float().sum(0)              (the values the matmuls see: the cast's, summed in fp32)

`maefast.ops.vit_block`'s backward takes its bias gradients here: the fc2 and projection biases from
the fp32 residual-stream gradients it casts for the weight-gradient matmuls anyway, the qkv bias from
the attention backward's output. torch's column reduction ran these at ~31% of copy bandwidth on the
H200 of 2026-12-04 (3.6 ms a ViT-H/14 b128 step; `reduce_kernel<..BFloat16..>` in
../shared/records/2026-12-04-h200/kt_block.txt), after a separate cast kernel for two of the three.

Each program sums a fixed range of rows for BLOCK_N columns in order into a (P, N) fp32 partial, then
`.sum(0)`: deterministic, no atomics (as the bias+GELU backward's bias gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rows import row_split


@triton.jit
def _colsum_kernel(
    x_ptr,      # (M, N) input, any strides
    y_ptr,      # (M, N) the cast copy, contiguous (unused unless WRITE_Y)
    part_ptr,   # (P, N) fp32 per-program partial sums
    M, N, ROWS_PER_PROG,
    stride_x_m, stride_x_n,
    WRITE_Y: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program (pid_n, pid_p) owns columns pid_n * BLOCK_N + [0, BLOCK_N) of rows
    # [pid_p * ROWS_PER_PROG, (pid_p + 1) * ROWS_PER_PROG), walked in order.
    pid_n = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid_p * ROWS_PER_PROG
    row_end = tl.minimum(row_start + ROWS_PER_PROG, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m = (rows < row_end)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x_m + cols[None, :] * stride_x_n, mask=m, other=0.0)
        if WRITE_Y:
            y = x.to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + rows[:, None] * N + cols[None, :], y, mask=m)
            acc += y.to(tl.float32)
        else:
            acc += x.to(tl.float32)
    tl.store(part_ptr + pid_p * N + cols, tl.sum(acc, axis=0), mask=col_ok)


def config(N: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). 256 columns divide every width MAE sums (512, 768, 1024, 1280,
    1536, 3072, 3840), so no column block runs mostly masked; no autotune (the interpreter cannot)."""
    block_n = min(triton.next_power_of_2(N), 256)
    if device.type != "cuda":
        return max(1, min(64, 8192 // block_n)), block_n, 4  # interpreter: few, large programs
    return max(1, 4096 // block_n), block_n, 8  # 16 elements a thread: <= 48 registers (sm_90)


def colsum(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher (inputs validated by the caller). x (M, N) any strides.

    Returns (y, sums): y = x cast to out_dtype ((M, N) contiguous, new) or x itself (out_dtype None or
    x's); sums (N,) fp32, the column sums of y.
    """
    M, N = x.shape
    dev = x.device
    write_y = out_dtype is not None and out_dtype != x.dtype
    y = torch.empty(M, N, dtype=out_dtype, device=dev) if write_y else x
    if M == 0 or N == 0:
        return y, torch.zeros(N, dtype=torch.float32, device=dev)
    block_m, block_n, warps = config(N, dev)
    progs, rows_per = row_split(M, block_m, triton.cdiv(N, block_n), dev, per_sm=8)
    part = torch.empty(progs, N, dtype=torch.float32, device=dev)
    _colsum_kernel[(triton.cdiv(N, block_n), progs)](
        x, y, part, M, N, rows_per, x.stride(0), x.stride(1),
        WRITE_Y=write_y, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y, part.sum(0)
