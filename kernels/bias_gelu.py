"""Triton bias + exact (erf) GELU for the MLP's fc1 output, forward and backward.

    z = x + b          (fp32, never rounded: x is the bias-free fc1 matmul output)
    y = z * Phi(z)     Phi(z) = (1 + erf(z / sqrt(2))) / 2
    dz = dy * (Phi(z) + z * phi(z)),  phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
    dx = dz,  db = sum over rows of dz

The backward recomputes z from x and b (nothing extra is saved). db is summed per program in
fp32 over a fixed range of rows into (P, N) partials, then `.sum(0)`: deterministic, no atomics.
On request (`want_y`) the backward also writes y, by the forward's own expression on the same z:
`maefast.ops.vit_block` needs it for fc2's weight gradient and would otherwise run the forward again
(a second read of x; 40 of the 80 forward launches of a ViT-H/14 step, ~2.9 ms on the 2026-12-04 H200).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rows import row_split

@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr,   # (M, N) fc1 output without bias, any strides
    b_ptr,   # (N,) bias, contiguous
    y_ptr,   # (M, N) output, contiguous, x's dtype
    M, N,
    stride_x_m, stride_x_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    m = (rows < M)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x_m + cols[None, :] * stride_x_n, mask=m, other=0.0)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
    z = x.to(tl.float32) + b.to(tl.float32)[None, :]
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # erf(z / sqrt(2))
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr,      # (M, N) grad of y, any strides
    x_ptr,       # (M, N) fc1 output without bias, any strides
    b_ptr,       # (N,) bias, contiguous
    dx_ptr,      # (M, N) grad of x, contiguous, x's dtype
    db_part_ptr,  # (P, N) fp32 per-program partial sums of dz
    y_ptr,       # (M, N) gelu(x + b), contiguous, x's dtype (written only if WRITE_Y)
    M, N, ROWS_PER_PROG,
    stride_dy_m, stride_dy_n,
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
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid_p * ROWS_PER_PROG
    row_end = tl.minimum(row_start + ROWS_PER_PROG, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m = (rows < row_end)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x_m + cols[None, :] * stride_x_n, mask=m, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy_m + cols[None, :] * stride_dy_n, mask=m, other=0.0)
        z = x.to(tl.float32) + b[None, :]
        e = tl.math.erf(z * 0.7071067811865476)
        cdf = 0.5 * (1.0 + e)
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1/sqrt(2 pi)
        dz = tl.where(m, dy.to(tl.float32) * (cdf + z * pdf), 0.0)
        tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dz.to(dx_ptr.dtype.element_ty), mask=m)
        if WRITE_Y:
            y = 0.5 * z * (1.0 + e)  # the forward kernel's expression, operation for operation
            tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
        acc += dz
    tl.store(db_part_ptr + pid_p * N + cols, tl.sum(acc, axis=0), mask=col_ok)


# -- launchers ------------------------------------------------------------------------------------

def _config(N: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) by width; no autotune (the interpreter cannot run it)."""
    block_n = min(triton.next_power_of_2(N), 1024)
    if device.type != "cuda":
        return max(1, min(32, 8192 // block_n)), block_n, 4  # interpreter: few, large programs
    return max(1, 4096 // block_n), block_n, 8


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor, shape: tuple | None = None) -> torch.Tensor:
    """Launcher (inputs validated by maefast.ops.bias_gelu). x (M, N) any strides, bias (N,).

    Returns gelu(x + bias) (M, N) contiguous in x's dtype; with `shape`, (..., N) of M rows, allocated
    so (not a view of an (M, N) tensor, which autograd would refuse to modify in place).
    """
    M, N = x.shape
    y = torch.empty((M, N) if shape is None else tuple(shape), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    block_m, block_n, warps = _config(N, x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _bias_gelu_fwd_kernel[grid](
        x, bias.contiguous(), y, M, N, x.stride(0), x.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, want_y: bool = False) -> tuple:
    """Launcher. dy, x (M, N) any strides; bias (N,).

    Returns (dx (M, N) contiguous in x's dtype, dbias (N,) fp32), and with `want_y` also
    y = gelu(x + bias) (M, N) contiguous in x's dtype, equal to `bias_gelu_fwd`'s.
    """
    M, N = x.shape
    dev = x.device
    dx = torch.empty(M, N, dtype=x.dtype, device=dev)
    y = torch.empty(M, N, dtype=x.dtype, device=dev) if want_y else dx  # dx: a placeholder never written
    if M == 0 or N == 0:
        db = torch.zeros(N, dtype=torch.float32, device=dev)
        return (dx, db, y) if want_y else (dx, db)
    block_m, block_n, warps = _config(N, dev)
    n_blocks = triton.cdiv(N, block_n)
    progs, rows_per = row_split(M, block_m, n_blocks, dev, per_sm=8)
    db_part = torch.empty(progs, N, dtype=torch.float32, device=dev)
    _bias_gelu_bwd_kernel[(n_blocks, progs)](
        dy, x, bias.contiguous(), dx, db_part, y, M, N, rows_per,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        WRITE_Y=want_y, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return (dx, db_part.sum(0), y) if want_y else (dx, db_part.sum(0))
