"""Triton attention over the packed qkv layout of the official qkv Linear.

qkv is (Nb, Lr, 3*H*Dh) with the last dim ordered [3][H][Dh] and read in place through its strides;
the output is written as (Nb, Lr, H*Dh) (ready for `proj`) and the backward writes dqkv in the packed
layout. With `cu_seqlens` (VARLEN) the rows of a (1, T, 3*H*Dh) input are a packed batch of
sequences; each program finds its sequence's bounds from cu_seqlens and computes no padding.

Head dims that are not a power of two are split into two power-of-two chunks, D0 + D1 (80 = 64 + 16,
96 = 64 + 32, 48 = 32 + 16): every matmul over the head dim is two `tl.dot`s, so 80 costs 80 and not
128 (`tl.arange` needs powers of two). Softmax statistics are fp32; the forward saves only the
logsumexp (natural log, (Nb, H, Lr) fp32). The backward is deterministic (no atomics):

* L <= 128 and Dh <= 80 (the encoder's 50 / 65 visible tokens; fp16/bf16): one program per
  (sequence, head) holds the whole K and V, loops over query blocks and writes dq, dk and dv
  (D = rowsum(dO * O) computed inline);
* otherwise (the decoder's 197 / 257 tokens, Dh 96/128, fp32): a dQ kernel (which also writes D),
  then a dK/dV kernel.

Block sizes, warps and pipeline stages come from kernels/attention_tiles.py: a table at MAE's four
shapes (with where each value comes from and the candidates a GPU sweep times), a generic rule
elsewhere; the launchers take an explicit tile too (`config=`), which the sweep and tests use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tiles import (FUSED_BWD_MAX_LEN, BwdTiles, Tile, bwd_fused_default, bwd_tiles, check_bwd_tiles,
                              fwd_tiles)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def head_dim_split(head_dim: int, pad: bool = False) -> tuple[int, int]:
    """(D0, D1): two power-of-two chunks covering head_dim (D1 may be 0). pad=True gives the
    next power of two in one chunk instead (used only to measure what the split saves)."""
    p = triton.next_power_of_2(head_dim)
    if pad or p == head_dim:
        return p, 0
    d0 = p // 2
    return d0, head_dim - d0


@triton.jit
def _load_rows(base_ptr, rows, row_mask, cols, col_mask, stride_l, stride_c):
    # int64 row offsets: "any strides" admits row strides where rows * stride_l passes 2**31
    return tl.load(base_ptr + rows.to(tl.int64)[:, None] * stride_l + cols[None, :] * stride_c,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _store_rows(base_ptr, val, rows, row_mask, cols, col_mask, stride_l, stride_c):
    tl.store(base_ptr + rows.to(tl.int64)[:, None] * stride_l + cols[None, :] * stride_c, val,
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _offsets_malformed(cu_ptr, nseq, seqlen):
    """Whether the B+1 = nseq+1 offsets break the contract: cu[0] != 0, a decrease, or cu[B] > T.

    Every program checks the whole array: sequences that decreasing offsets make overlap are each
    well-formed on their own, and would race on their shared rows; only a global check makes each of
    them poison what it writes. B+1 values, L2-resident after the first program, read in chunks of
    64 (no constexpr on B, so no recompile per batch size); a device flag computed by the op instead
    would add launches to every call."""
    n_bad = (tl.load(cu_ptr) != 0).to(tl.int32) + (tl.load(cu_ptr + nseq) > seqlen).to(tl.int32)
    chunk = tl.arange(0, 64)
    for i0 in range(0, nseq, 64):
        i = i0 + chunk
        ok = i < nseq
        lo = tl.load(cu_ptr + i, mask=ok, other=0)
        hi = tl.load(cu_ptr + i + 1, mask=ok, other=0)
        n_bad += tl.sum((hi < lo).to(tl.int32), 0)
    return n_bad > 0


@triton.jit
def _seq_bounds(cu_ptr, pid_b, nseq, seqlen, max_seqlen, VARLEN: tl.constexpr):
    """(batch index into the strided tensors, first row, length, poison) of sequence pid_b of nseq.

    Varlen (seqlen = T rows): offsets on a GPU are not checked on the host (a sync). Each program
    checks the whole array (`_offsets_malformed`): offsets that do not start at 0, decrease or end
    beyond T poison every sequence; a sequence longer than max_seqlen (the grid covers only
    max_seqlen rows of it) poisons itself. poison = NaN or 1.0: the kernels multiply it into what
    they write, so such input comes out NaN instead of silently wrong. Offsets are clamped into
    [0, T] as well: no access leaves the tensors whatever cu_seqlens holds."""
    if VARLEN:
        a = tl.load(cu_ptr + pid_b).to(tl.int64)
        b = tl.load(cu_ptr + pid_b + 1).to(tl.int64)
        start = tl.minimum(tl.maximum(a, 0), seqlen)
        end = tl.minimum(tl.maximum(b, start), seqlen)
        n_rows = (end - start).to(tl.int32)
        bad = _offsets_malformed(cu_ptr, nseq, seqlen) | (n_rows > max_seqlen)
        return pid_b * 0, start, n_rows, tl.where(bad, float("nan"), 1.0)
    else:
        return pid_b, pid_b * 0, seqlen, 1.0


@triton.jit
def _attn_fwd_kernel(
    qkv_ptr,  # (Nb, Lr, 3*H*HEAD_DIM), [3][H][HEAD_DIM]
    out_ptr,  # (Nb, Lr, H*HEAD_DIM)
    lse_ptr,  # (Nb, H, Lr) fp32, natural log; row stride 1
    cu_ptr,  # (B+1,) int32/int64 sequence starts (VARLEN only)
    stride_qkv_b, stride_qkv_l, stride_qkv_c,
    stride_out_b, stride_out_l, stride_out_c,
    stride_lse_b, stride_lse_h,
    seqlen, max_seqlen, num_heads, num_m_blocks, qk_scale_log2,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_m = (pid % num_m_blocks).to(tl.int32)
    pid_h = ((pid // num_m_blocks) % num_heads).to(tl.int32)
    pid_b = pid // (num_m_blocks * num_heads)
    nseq = tl.num_programs(0) // (num_m_blocks * num_heads)
    batch, row0, n_rows, poison = _seq_bounds(cu_ptr, pid_b, nseq, seqlen, max_seqlen, VARLEN)
    head_stride = num_heads * HEAD_DIM * stride_qkv_c
    q_base = qkv_ptr + batch * stride_qkv_b + row0 * stride_qkv_l + pid_h * HEAD_DIM * stride_qkv_c
    k_base = q_base + head_stride
    v_base = k_base + head_stride

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_rows
    d0 = tl.arange(0, D0)
    d0_mask = d0 < HEAD_DIM  # all true unless the head dim is padded
    q0 = _load_rows(q_base, offs_m, m_mask, d0, d0_mask, stride_qkv_l, stride_qkv_c)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        d1_mask = d1 < HEAD_DIM
        q1 = _load_rows(q_base, offs_m, m_mask, d1, d1_mask, stride_qkv_l, stride_qkv_c)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Programs past the end of a short (varlen) sequence skip the loop; their stores are masked.
    hi = tl.where(pid_m * BLOCK_M < n_rows, n_rows, 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_rows
        k0 = _load_rows(k_base, offs_n, n_mask, d0, d0_mask, stride_qkv_l, stride_qkv_c)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if D1 > 0:
            k1 = _load_rows(k_base, offs_n, n_mask, d1, d1_mask, stride_qkv_l, stride_qkv_c)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.where(n_mask[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load_rows(v_base, offs_n, n_mask, d0, d0_mask, stride_qkv_l, stride_qkv_c)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=DOT_PREC)
        if D1 > 0:
            v1 = _load_rows(v_base, offs_n, n_mask, d1, d1_mask, stride_qkv_l, stride_qkv_c)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=DOT_PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0) * poison  # NaN out and lse for a poisoned sequence
    o_base = out_ptr + batch * stride_out_b + row0 * stride_out_l + pid_h * HEAD_DIM * stride_out_c
    _store_rows(o_base, (acc0 / l_safe[:, None]).to(out_ptr.dtype.element_ty), offs_m, m_mask, d0, d0_mask,
                stride_out_l, stride_out_c)
    if D1 > 0:
        _store_rows(o_base, (acc1 / l_safe[:, None]).to(out_ptr.dtype.element_ty), offs_m, m_mask, d1, d1_mask,
                    stride_out_l, stride_out_c)
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(lse_ptr + batch * stride_lse_b + pid_h * stride_lse_h + row0 + offs_m, lse, mask=m_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    qkv_ptr,  # (Nb, Lr, 3*H*HEAD_DIM)
    out_ptr,  # (Nb, Lr, H*HEAD_DIM), the forward output
    dout_ptr,  # (Nb, Lr, H*HEAD_DIM)
    lse_ptr,  # (Nb, H, Lr) fp32
    delta_ptr,  # (Nb, H, Lr) fp32, written here: rowsum(dO * O)
    dqkv_ptr,  # (Nb, Lr, 3*H*HEAD_DIM), the dq third written here
    cu_ptr,  # (B+1,) (VARLEN only)
    stride_qkv_b, stride_qkv_l, stride_qkv_c,
    stride_out_b, stride_out_l, stride_out_c,
    stride_do_b, stride_do_l, stride_do_c,
    stride_dqkv_b, stride_dqkv_l, stride_dqkv_c,
    stride_lse_b, stride_lse_h,
    seqlen, max_seqlen, num_heads, num_m_blocks, sm_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_m = (pid % num_m_blocks).to(tl.int32)
    pid_h = ((pid // num_m_blocks) % num_heads).to(tl.int32)
    pid_b = pid // (num_m_blocks * num_heads)
    nseq = tl.num_programs(0) // (num_m_blocks * num_heads)
    batch, row0, n_rows, poison = _seq_bounds(cu_ptr, pid_b, nseq, seqlen, max_seqlen, VARLEN)
    sm_scale = sm_scale * poison  # a poisoned sequence: NaN probabilities, so a NaN dq
    head_stride = num_heads * HEAD_DIM * stride_qkv_c
    q_base = qkv_ptr + batch * stride_qkv_b + row0 * stride_qkv_l + pid_h * HEAD_DIM * stride_qkv_c
    k_base = q_base + head_stride
    v_base = k_base + head_stride
    o_base = out_ptr + batch * stride_out_b + row0 * stride_out_l + pid_h * HEAD_DIM * stride_out_c
    do_base = dout_ptr + batch * stride_do_b + row0 * stride_do_l + pid_h * HEAD_DIM * stride_do_c
    dq_base = dqkv_ptr + batch * stride_dqkv_b + row0 * stride_dqkv_l + pid_h * HEAD_DIM * stride_dqkv_c
    stat_off = batch * stride_lse_b + pid_h * stride_lse_h + row0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_rows
    d0 = tl.arange(0, D0)
    d0_mask = d0 < HEAD_DIM
    q0 = _load_rows(q_base, offs_m, m_mask, d0, d0_mask, stride_qkv_l, stride_qkv_c)
    do0 = _load_rows(do_base, offs_m, m_mask, d0, d0_mask, stride_do_l, stride_do_c)
    o0 = _load_rows(o_base, offs_m, m_mask, d0, d0_mask, stride_out_l, stride_out_c)
    delta = tl.sum(do0.to(tl.float32) * o0.to(tl.float32), 1)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        d1_mask = d1 < HEAD_DIM
        q1 = _load_rows(q_base, offs_m, m_mask, d1, d1_mask, stride_qkv_l, stride_qkv_c)
        do1 = _load_rows(do_base, offs_m, m_mask, d1, d1_mask, stride_do_l, stride_do_c)
        o1 = _load_rows(o_base, offs_m, m_mask, d1, d1_mask, stride_out_l, stride_out_c)
        delta += tl.sum(do1.to(tl.float32) * o1.to(tl.float32), 1)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    tl.store(delta_ptr + stat_off + offs_m, delta, mask=m_mask)
    lse2 = tl.load(lse_ptr + stat_off + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    qk_scale_log2 = sm_scale * 1.4426950408889634

    hi = tl.where(pid_m * BLOCK_M < n_rows, n_rows, 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_rows
        k0 = _load_rows(k_base, offs_n, n_mask, d0, d0_mask, stride_qkv_l, stride_qkv_c)
        v0 = _load_rows(v_base, offs_n, n_mask, d0, d0_mask, stride_qkv_l, stride_qkv_c)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if D1 > 0:
            k1 = _load_rows(k_base, offs_n, n_mask, d1, d1_mask, stride_qkv_l, stride_qkv_c)
            v1 = _load_rows(v_base, offs_n, n_mask, d1, d1_mask, stride_qkv_l, stride_qkv_c)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
            dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
        p = tl.exp2(s * qk_scale_log2 - lse2[:, None])
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 += tl.dot(ds, k0, input_precision=DOT_PREC)
        if D1 > 0:
            dq1 += tl.dot(ds, k1, input_precision=DOT_PREC)

    ty = dqkv_ptr.dtype.element_ty
    _store_rows(dq_base, (dq0 * sm_scale).to(ty), offs_m, m_mask, d0, d0_mask, stride_dqkv_l, stride_dqkv_c)
    if D1 > 0:
        _store_rows(dq_base, (dq1 * sm_scale).to(ty), offs_m, m_mask, d1, d1_mask, stride_dqkv_l, stride_dqkv_c)


@triton.jit
def _attn_bwd_dkdv_kernel(
    qkv_ptr,  # (Nb, Lr, 3*H*HEAD_DIM)
    out_ptr,  # (Nb, Lr, H*HEAD_DIM), read only when FUSED_DQ (for D = rowsum(dO * O))
    dout_ptr,  # (Nb, Lr, H*HEAD_DIM)
    lse_ptr,  # (Nb, H, Lr) fp32
    delta_ptr,  # (Nb, H, Lr) fp32, read unless FUSED_DQ
    dqkv_ptr,  # (Nb, Lr, 3*H*HEAD_DIM): dk, dv thirds (and dq when FUSED_DQ) written here
    cu_ptr,  # (B+1,) (VARLEN only)
    stride_qkv_b, stride_qkv_l, stride_qkv_c,
    stride_out_b, stride_out_l, stride_out_c,
    stride_do_b, stride_do_l, stride_do_c,
    stride_dqkv_b, stride_dqkv_l, stride_dqkv_c,
    stride_lse_b, stride_lse_h,
    seqlen, max_seqlen, num_heads, num_n_blocks, sm_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, FUSED_DQ: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # FUSED_DQ requires one key block per sequence (n_rows <= BLOCK_N): then this program sees every
    # key of each query row and dq is complete after one pass, with no other program touching it.
    pid = tl.program_id(0).to(tl.int64)
    pid_n = (pid % num_n_blocks).to(tl.int32)
    pid_h = ((pid // num_n_blocks) % num_heads).to(tl.int32)
    pid_b = pid // (num_n_blocks * num_heads)
    nseq = tl.num_programs(0) // (num_n_blocks * num_heads)
    batch, row0, n_rows, poison = _seq_bounds(cu_ptr, pid_b, nseq, seqlen, max_seqlen, VARLEN)
    sm_scale = sm_scale * poison  # a poisoned sequence: NaN probabilities, so NaN dk, dv (and dq)
    head_stride = num_heads * HEAD_DIM * stride_qkv_c
    q_base = qkv_ptr + batch * stride_qkv_b + row0 * stride_qkv_l + pid_h * HEAD_DIM * stride_qkv_c
    k_base = q_base + head_stride
    v_base = k_base + head_stride
    o_base = out_ptr + batch * stride_out_b + row0 * stride_out_l + pid_h * HEAD_DIM * stride_out_c
    do_base = dout_ptr + batch * stride_do_b + row0 * stride_do_l + pid_h * HEAD_DIM * stride_do_c
    dhead = num_heads * HEAD_DIM * stride_dqkv_c
    dq_base = dqkv_ptr + batch * stride_dqkv_b + row0 * stride_dqkv_l + pid_h * HEAD_DIM * stride_dqkv_c
    dk_base = dq_base + dhead
    dv_base = dk_base + dhead
    stat_off = batch * stride_lse_b + pid_h * stride_lse_h + row0
    ty = dqkv_ptr.dtype.element_ty
    qk_scale_log2 = sm_scale * 1.4426950408889634

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_rows
    d0 = tl.arange(0, D0)
    d0_mask = d0 < HEAD_DIM
    k0 = _load_rows(k_base, offs_n, n_mask, d0, d0_mask, stride_qkv_l, stride_qkv_c)
    v0 = _load_rows(v_base, offs_n, n_mask, d0, d0_mask, stride_qkv_l, stride_qkv_c)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        d1_mask = d1 < HEAD_DIM
        k1 = _load_rows(k_base, offs_n, n_mask, d1, d1_mask, stride_qkv_l, stride_qkv_c)
        v1 = _load_rows(v_base, offs_n, n_mask, d1, d1_mask, stride_qkv_l, stride_qkv_c)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)

    hi = tl.where(pid_n * BLOCK_N < n_rows, n_rows, 0)
    for start_m in range(0, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n_rows
        q0 = _load_rows(q_base, offs_m, m_mask, d0, d0_mask, stride_qkv_l, stride_qkv_c)
        do0 = _load_rows(do_base, offs_m, m_mask, d0, d0_mask, stride_do_l, stride_do_c)
        st = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M) = S^T
        dpt = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if D1 > 0:
            q1 = _load_rows(q_base, offs_m, m_mask, d1, d1_mask, stride_qkv_l, stride_qkv_c)
            do1 = _load_rows(do_base, offs_m, m_mask, d1, d1_mask, stride_do_l, stride_do_c)
            st += tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
            dpt += tl.dot(v1, tl.trans(do1), input_precision=DOT_PREC)
        if FUSED_DQ:
            o0 = _load_rows(o_base, offs_m, m_mask, d0, d0_mask, stride_out_l, stride_out_c)
            delta = tl.sum(do0.to(tl.float32) * o0.to(tl.float32), 1)
            if D1 > 0:
                o1 = _load_rows(o_base, offs_m, m_mask, d1, d1_mask, stride_out_l, stride_out_c)
                delta += tl.sum(do1.to(tl.float32) * o1.to(tl.float32), 1)
        else:
            delta = tl.load(delta_ptr + stat_off + offs_m, mask=m_mask, other=0.0)
        lse2 = tl.load(lse_ptr + stat_off + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
        pt = tl.exp2(st * qk_scale_log2 - lse2[None, :])
        pt = tl.where(n_mask[:, None] & m_mask[None, :], pt, 0.0)
        dv0 += tl.dot(pt.to(do0.dtype), do0, input_precision=DOT_PREC)
        dst = (pt * (dpt - delta[None, :])).to(q0.dtype)
        dk0 += tl.dot(dst, q0, input_precision=DOT_PREC)
        if D1 > 0:
            dv1 += tl.dot(pt.to(do1.dtype), do1, input_precision=DOT_PREC)
            dk1 += tl.dot(dst, q1, input_precision=DOT_PREC)
        if FUSED_DQ:
            ds = tl.trans(dst)
            dq0 = tl.dot(ds, k0, input_precision=DOT_PREC) * sm_scale
            _store_rows(dq_base, dq0.to(ty), offs_m, m_mask, d0, d0_mask, stride_dqkv_l, stride_dqkv_c)
            if D1 > 0:
                dq1 = tl.dot(ds, k1, input_precision=DOT_PREC) * sm_scale
                _store_rows(dq_base, dq1.to(ty), offs_m, m_mask, d1, d1_mask, stride_dqkv_l, stride_dqkv_c)

    _store_rows(dk_base, (dk0 * sm_scale).to(ty), offs_n, n_mask, d0, d0_mask, stride_dqkv_l, stride_dqkv_c)
    _store_rows(dv_base, dv0.to(ty), offs_n, n_mask, d0, d0_mask, stride_dqkv_l, stride_dqkv_c)
    if D1 > 0:
        _store_rows(dk_base, (dk1 * sm_scale).to(ty), offs_n, n_mask, d1, d1_mask, stride_dqkv_l, stride_dqkv_c)
        _store_rows(dv_base, dv1.to(ty), offs_n, n_mask, d1, d1_mask, stride_dqkv_l, stride_dqkv_c)


# -- launchers ---------------------------------------------------------------------------------------
# Tiles come from kernels/attention_tiles.py: a table at MAE's shapes, a generic rule elsewhere; no
# autotuning (several configs break the interpreter, and MAE has few shapes).


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (tf32 would lose ~3 digits vs the PyTorch reference).
    return "ieee" if dtype == torch.float32 else "tf32"


def _alloc(shape, dtype: torch.dtype, device: torch.device, nan: bool) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device) if nan else \
        torch.empty(shape, dtype=dtype, device=device)


def _columns_overflow(t: torch.Tensor) -> bool:
    """Whether a row's column offsets (width x last-dim stride) reach 2**31: the kernels compute the
    per-head column offsets in int32 (batch and row offsets are int64). Only a view with a far-strided
    last dim gets there (e.g. (3HD, N, L).permute(1, 2, 0) with N*L >= 2**31 / 3HD: ViT-H at 448 px from
    N = 1638); a Linear's output never does."""
    return t.shape[-1] * abs(t.stride(-1)) >= 2 ** 31


def int32_columns(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy of it when its column offsets would overflow int32 (`_columns_overflow`)."""
    return t.contiguous() if _columns_overflow(t) else t


def _layout(qkv: torch.Tensor, num_heads: int, cu_seqlens, max_seqlen):
    nb, lr, width = qkv.shape
    head_dim = width // (3 * num_heads)
    if cu_seqlens is None:
        nseq, max_len, cu = nb, lr, qkv  # cu unused (any pointer)
    else:
        nseq, max_len, cu = cu_seqlens.numel() - 1, int(max_seqlen), cu_seqlens
    return nb, lr, head_dim, nseq, max_len, cu


def _fwd_tile(config, max_len: int, head_dim: int, dtype: torch.dtype) -> Tile:
    if config is None:
        return fwd_tiles(max_len, head_dim, dtype)
    return config if isinstance(config, Tile) else Tile.parse(config)


def attention_fwd(qkv: torch.Tensor, num_heads: int, scale: float, cu_seqlens: torch.Tensor | None = None,
                  max_seqlen: int | None = None, pad_head_dim: bool = False, config: Tile | str | None = None,
                  out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """qkv (Nb, Lr, 3*H*Dh) -> (out (Nb, Lr, H*Dh), lse (Nb, H, Lr) fp32). Inputs are validated by
    the caller (maefast.ops.visible_attention); with cu_seqlens, Nb == 1 and max_seqlen is given.
    `config` overrides the tile (a `Tile` or its name, e.g. "m64n32w4s3"; default: `fwd_tiles`).
    `out` / `lse` may be passed (tests poison them); `lse` must be contiguous."""
    qkv = int32_columns(qkv)
    nb, lr, head_dim, nseq, max_len, cu = _layout(qkv, num_heads, cu_seqlens, max_seqlen)
    tile = _fwd_tile(config, max_len, head_dim, qkv.dtype)
    # varlen: rows no sequence covers (only for malformed cu_seqlens) stay NaN, not plausible zeros
    if out is None:
        out = _alloc((nb, lr, num_heads * head_dim), qkv.dtype, qkv.device, cu_seqlens is not None)
    if lse is None:
        lse = _alloc((nb, num_heads, lr), torch.float32, qkv.device, cu_seqlens is not None)
    if out.numel() == 0 or nseq == 0 or max_len == 0:
        return out, lse
    d0, d1 = head_dim_split(head_dim, pad_head_dim)
    num_m_blocks = triton.cdiv(max_len, tile.BLOCK_M)
    grid = (nseq * num_heads * num_m_blocks,)
    _attn_fwd_kernel[grid](
        qkv, out, lse, cu,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        lr, max_len, num_heads, num_m_blocks, scale * LOG2E,
        HEAD_DIM=head_dim, D0=d0, D1=d1, VARLEN=cu_seqlens is not None, DOT_PREC=_dot_precision(qkv.dtype),
        **tile.launch())
    return out, lse


def attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
                  scale: float, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                  fused: bool | None = None, pad_head_dim: bool = False, config: BwdTiles | str | None = None,
                  dqkv: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of attention_fwd: -> dqkv (Nb, Lr, 3*H*Dh) in qkv's dtype (contiguous unless given).
    `config` overrides the tiles (a `BwdTiles` or its name, e.g. "fused-m16n128w8s1"; default:
    `bwd_tiles`, which `fused` steers). `lse` of any strides (the kernels read it row-contiguous)."""
    dout, qkv, out = int32_columns(dout), int32_columns(qkv), int32_columns(out)
    lse = lse.contiguous()  # a view (e.g. (Nb, Lr, H) transposed) was read as if contiguous: wrong dqkv
    nb, lr, head_dim, nseq, max_len, cu = _layout(qkv, num_heads, cu_seqlens, max_seqlen)
    if config is None:
        tiles = bwd_tiles(max_len, head_dim, qkv.dtype, fused)
    else:
        tiles = config if isinstance(config, BwdTiles) else BwdTiles.parse(config)
    check_bwd_tiles(tiles, max_len)
    if dqkv is None:
        dqkv = _alloc(qkv.shape, qkv.dtype, qkv.device, cu_seqlens is not None)
    elif _columns_overflow(dqkv):
        raise ValueError("dqkv: its last-dim stride times its width reaches 2**31 (the kernels' column offsets "
                         "are int32); pass a contiguous one")
    if dqkv.numel() == 0 or nseq == 0 or max_len == 0:  # varlen: no row any sequence computes (NaN, as forward)
        return dqkv.fill_(float("nan")) if cu_seqlens is not None else dqkv.zero_()
    d0, d1 = head_dim_split(head_dim, pad_head_dim)
    common = (qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2),
              dout.stride(0), dout.stride(1), dout.stride(2), dqkv.stride(0), dqkv.stride(1), dqkv.stride(2),
              lse.stride(0), lse.stride(1))
    meta = dict(HEAD_DIM=head_dim, D0=d0, D1=d1, VARLEN=cu_seqlens is not None, DOT_PREC=_dot_precision(qkv.dtype))
    delta = lse if tiles.fused else torch.empty_like(lse)  # unused when fused
    if not tiles.fused:
        num_m_blocks = triton.cdiv(max_len, tiles.dq.BLOCK_M)
        _attn_bwd_dq_kernel[(nseq * num_heads * num_m_blocks,)](
            qkv, out, dout, lse, delta, dqkv, cu, *common, lr, max_len, num_heads, num_m_blocks, scale, **meta,
            **tiles.dq.launch())
    num_n_blocks = triton.cdiv(max_len, tiles.dkdv.BLOCK_N)
    _attn_bwd_dkdv_kernel[(nseq * num_heads * num_n_blocks,)](
        qkv, out, dout, lse, delta, dqkv, cu, *common, lr, max_len, num_heads, num_n_blocks, scale,
        FUSED_DQ=tiles.fused, **meta, **tiles.dkdv.launch())
    return dqkv


__all__ = ["attention_fwd", "attention_bwd", "head_dim_split", "fwd_tiles", "bwd_tiles", "bwd_fused_default",
           "Tile", "BwdTiles", "FUSED_BWD_MAX_LEN"]
