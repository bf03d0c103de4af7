"""Triton LayerNorm with an optional fused residual add, forward and backward.

Forward (one pass over the rows):
    s = x + r                      (rounded to s's dtype and stored: the block's residual stream)
    y = (s - mean) * rstd * w + b  (mean, rstd = 1/sqrt(var + eps) in fp32, from the rounded s)
so a pre-norm block does `s = x + attn_out; h = LN2(s)` reading x and r once. Without r it is a
plain LayerNorm of x. Statistics are always fp32, whatever the input dtype.

Backward: dx = rstd * (w*dy - xhat * mean(xhat*w*dy) - mean(w*dy)) + ds (ds: the gradient that
reached s from its other use, so the residual branch costs no extra pass); dr = dx. dweight and
dbias are summed per program in fp32 over a fixed, contiguous range of rows and written as
(P, D) partials, then reduced with `.sum(0)`: deterministic, no atomics (Liger-Kernel layer_norm).
With the forward's statistics (mean, rstd) it can also take the forward's operands instead of s
(HAS_R: s = x + r again, rounded as the forward rounds it) and write the forward's output y again
(WRITE_Y, by the forward's expression): `maefast.ops.vit_block`'s backward needs LN(s) for a weight
gradient and would otherwise run the forward a second time (80 of the 162 forward launches of a
ViT-H/14 step on the 2026-12-04 H200, and a second read of the fp32 stream).

Rows are tiles of BLOCK_M rows x BLOCK_D = next_power_of_2(D) columns; the tail of an odd width
is masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rows import row_split

MAX_WIDTH = 16384  # one row must fit in one tile (registers)


@triton.jit
def _add_ln_fwd_kernel(
    x_ptr,      # (M, D) input, any strides
    r_ptr,      # (M, D) residual, any strides (HAS_RESIDUAL)
    w_ptr,      # (D,) weight, contiguous
    b_ptr,      # (D,) bias, contiguous
    y_ptr,      # (M, D) output, contiguous
    s_ptr,      # (M, D) x + r, contiguous (HAS_RESIDUAL)
    mean_ptr,   # (M,) fp32
    rstd_ptr,   # (M,) fp32
    M, D, eps,
    stride_x_m, stride_x_d,
    stride_r_m, stride_r_d,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x_m + cols[None, :] * stride_x_d, mask=m, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_r_m + cols[None, :] * stride_r_d, mask=m, other=0.0)
        s = (x + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + rows[:, None] * D + cols[None, :], s, mask=m)
        # Normalise the stored (rounded) sum, so y = LN(s) holds for the returned s exactly as in
        # the PyTorch composition, and the backward (which reads s) sees the forward's input.
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    diff = tl.where(m, x - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd_kernel(
    dy_ptr,       # (M, D) grad of y, any strides
    ds_ptr,       # (M, D) grad of s from its other uses, any strides (HAS_DS)
    x_ptr,        # (M, D) the normalised input (s, or x for a plain LN; with HAS_R the forward's x), any strides
    r_ptr,        # (M, D) the forward's residual, any strides (HAS_R: the input is s = x + r)
    w_ptr,        # (D,) weight, contiguous
    b_ptr,        # (D,) bias, contiguous (WRITE_Y)
    mean_ptr,     # (M,) fp32
    rstd_ptr,     # (M,) fp32
    dx_ptr,       # (M, D) grad of the input, contiguous, in the input's (s's) dtype
    dw_part_ptr,  # (P, D) fp32 per-program partial sums of dy * xhat
    db_part_ptr,  # (P, D) fp32 per-program partial sums of dy
    y_ptr,        # (M, D) the forward's output again, contiguous (WRITE_Y)
    M, D, ROWS_PER_PROG,
    stride_dy_m, stride_dy_d,
    stride_ds_m, stride_ds_d,
    stride_x_m, stride_x_d,
    stride_r_m, stride_r_d,
    HAS_DS: tl.constexpr,
    HAS_R: tl.constexpr,
    WRITE_Y: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program `pid` owns rows [pid * ROWS_PER_PROG, (pid + 1) * ROWS_PER_PROG) and walks them in
    # order: its weight/bias partial sums do not depend on scheduling.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if WRITE_Y:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    row_end = tl.minimum(row_start + ROWS_PER_PROG, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < row_end
        m = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x_m + cols[None, :] * stride_x_d, mask=m,
                    other=0.0).to(tl.float32)
        if HAS_R:  # s as the forward made it: the fp32 sum rounded to s's dtype (dx's)
            r = tl.load(r_ptr + rows[:, None] * stride_r_m + cols[None, :] * stride_r_d, mask=m, other=0.0)
            x = (x + r.to(tl.float32)).to(dx_ptr.dtype.element_ty).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy_m + cols[None, :] * stride_dy_d, mask=m,
                     other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        if WRITE_Y:  # the forward kernel's (x - mean) * rstd * w + b, operation for operation
            yv = xhat * w[None, :] + b[None, :]
            tl.store(y_ptr + rows[:, None] * D + cols[None, :], yv.to(y_ptr.dtype.element_ty), mask=m)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            ds = tl.load(ds_ptr + rows[:, None] * stride_ds_m + cols[None, :] * stride_ds_d, mask=m, other=0.0)
            dx += ds.to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    tl.store(dw_part_ptr + pid * D + cols, dw_acc, mask=col_ok)
    tl.store(db_part_ptr + pid * D + cols, db_acc, mask=col_ok)


# -- launchers ------------------------------------------------------------------------------------

def _fwd_config(D: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) by width; no autotune (the interpreter cannot run it)."""
    block_d = triton.next_power_of_2(D)
    if device.type != "cuda":
        return max(1, min(16, 8192 // block_d)), block_d, 4  # interpreter: few, large programs
    block_m = max(1, min(16, 4096 // block_d))
    warps = 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)
    return block_m, block_d, warps


def _bwd_config(D: int, device: torch.device) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(D)
    if device.type != "cuda":
        return max(1, min(16, 8192 // block_d)), block_d, 4
    # More live fp32 tiles than the forward (x, dy, xhat, dx, ds): half the rows per tile.
    block_m = max(1, min(8, 2048 // block_d))
    warps = 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)
    return block_m, block_d, warps


def _check_width(D: int) -> None:
    if D > MAX_WIDTH:
        raise ValueError(f"the Triton LayerNorm supports widths up to {MAX_WIDTH}, got {D}")


def add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float, out_dtype: torch.dtype | None = None, shape: tuple | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Launcher (inputs validated by maefast.ops.layernorm).

    x, residual: (M, D), any strides and float dtypes; weight, bias: (D,). Returns y (M, D) in
    `out_dtype` (default: s's dtype), s = x + residual (M, D) in the promoted dtype (None without a
    residual), mean and rstd (M,) fp32. `shape`: y's and s's shape instead, (..., D) of M rows (mean's
    and rstd's shape[:-1]), allocated so (contiguous): not views of (M, D) tensors, which autograd
    would refuse to modify in place.
    """
    M, D = x.shape
    _check_width(D)
    dev = x.device
    shape = (M, D) if shape is None else tuple(shape)
    s_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = torch.empty(shape, dtype=out_dtype or s_dtype, device=dev)
    s = torch.empty(shape, dtype=s_dtype, device=dev) if residual is not None else None
    mean = torch.empty(shape[:-1], dtype=torch.float32, device=dev)
    rstd = torch.empty(shape[:-1], dtype=torch.float32, device=dev)
    if M == 0 or D == 0:
        return y, s, mean, rstd
    block_m, block_d, warps = _fwd_config(D, dev)
    r = residual if residual is not None else x
    _add_ln_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, r, weight.contiguous(), bias.contiguous(), y, s if s is not None else y, mean, rstd,
        M, D, float(eps),
        x.stride(0), x.stride(1), r.stride(0), r.stride(1),
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return y, s, mean, rstd


def layer_norm_bwd(dy: torch.Tensor, ds: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                   mean: torch.Tensor, rstd: torch.Tensor, residual: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> tuple:
    """Launcher. dy, ds (or None), x: (M, D), any strides; mean, rstd (M,) fp32: the forward's.

    x is the normalised input, or with `residual` the forward's x: the input is s = x + residual in
    their promoted dtype, formed again as the forward formed it. Returns (dx (M, D) in the input's
    dtype, dweight (D,) fp32, dbias (D,) fp32), and with `out_dtype` (needs `bias`) also the forward's
    output LN(input) (M, D) in out_dtype, as `add_layer_norm_fwd` wrote it.
    """
    M, D = x.shape
    _check_width(D)
    dev = x.device
    if out_dtype is not None and bias is None:
        raise ValueError("layer_norm_bwd: out_dtype (write the forward's output again) needs the LayerNorm's bias")
    s_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    dx = torch.empty(M, D, dtype=s_dtype, device=dev)
    want_y = out_dtype is not None
    y = torch.empty(M, D, dtype=out_dtype, device=dev) if want_y else dx  # dx: a placeholder never written
    if M == 0 or D == 0:
        z = torch.zeros(D, dtype=torch.float32, device=dev)
        return (dx, z, z.clone(), y) if want_y else (dx, z, z.clone())
    block_m, block_d, warps = _bwd_config(D, dev)
    progs, rows_per = row_split(M, block_m, 1, dev, per_sm=4)
    dw_part = torch.empty(progs, D, dtype=torch.float32, device=dev)
    db_part = torch.empty(progs, D, dtype=torch.float32, device=dev)
    g = ds if ds is not None else dy
    r = residual if residual is not None else x
    w = weight.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()  # the kernel reads them at mean_ptr + row
    _ln_bwd_kernel[(progs,)](
        dy, g, x, r, w, bias.contiguous() if want_y else w, mean, rstd, dx, dw_part, db_part, y,
        M, D, rows_per,
        dy.stride(0), dy.stride(1), g.stride(0), g.stride(1), x.stride(0), x.stride(1), r.stride(0), r.stride(1),
        HAS_DS=ds is not None, HAS_R=residual is not None, WRITE_Y=want_y, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=warps,
    )
    out = (dx, dw_part.sum(0), db_part.sum(0))
    return out + (y,) if want_y else out
