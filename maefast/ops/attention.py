"""`maefast.ops.visible_attention`: softmax attention read in place from the packed output of the
qkv Linear, (N, L, 3*H*Dh), written as (N, L, H*Dh) for `proj`; varlen through cu_seqlens.

Custom ops `maefast::visible_attention` (-> out, lse) and `maefast::visible_attention_backward`
(-> dqkv), with fake and autograd registrations so torch.compile sees them whole. Backends:
"triton" (forward + backward, any L, head dims 16..128), "cuda" (C++ WMMA forward for L <= 128
where the GPU's shared memory holds the sequence, fp16/bf16; its backward is the Triton one, fed by
the same natural-log logsumexp) and "reference" (the PyTorch reference forward; its backward is the
same math written out in fp32). "auto" = Triton on CUDA, else the reference; it never picks the CUDA
C++ kernel until that kernel has been verified on a card. "sdpa" is no custom op: torch's
`F.scaled_dot_product_attention` on (N, H, L, Dh) views of the packed qkv, its output viewed back as
(N, L, H*Dh) (cuDNN and flash allocate it in that layout: no copy forward), its backward torch's (one
copy: dq, dk, dv stacked into the packed gradient); dense batches only. It is what a compiled
torch-native model runs, offered in maefast's model so the step benchmark can time both attentions
with everything else equal (the `maefast-sdpa-graph` row).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .._validate import autocast_dtype, check_cu_seqlens, check_scale, check_tensor, compiling, dense_index
from ..reference.attention import attention as _reference_attention
from ._backend import check_impl, choose_impl, device_guard, stream_of
from ._dispatch import bwd, call, custom_op, register_autograd

# Head dims each backend handles. Triton splits non-powers of two into two power-of-two chunks
# (80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16); the CUDA kernel instantiates these five.
TRITON_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)
CUDA_HEAD_DIMS = (32, 64, 80, 96, 128)
CUDA_MAX_SEQLEN = 128
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = KERNEL_DTYPES + (torch.float64,)  # fp64 runs on the reference only (for oracles)


# -- backend choice ----------------------------------------------------------------------------------

def _kernel_unsupported(impl: str, qkv: torch.Tensor, head_dim: int, max_len: int) -> str | None:
    """Why `impl` cannot run this case, or None."""
    if impl == "triton":
        if qkv.dtype not in KERNEL_DTYPES:
            return f"the Triton kernels take float32/float16/bfloat16, got {qkv.dtype}"
        if head_dim not in TRITON_HEAD_DIMS:
            return f"head dim {head_dim} is not supported by the Triton kernels (supported: {TRITON_HEAD_DIMS})"
    elif impl == "cuda":
        if qkv.dtype not in (torch.float16, torch.bfloat16):
            return f"the CUDA C++ kernel takes float16/bfloat16 (tensor cores), got {qkv.dtype}"
        if head_dim not in CUDA_HEAD_DIMS:
            return f"head dim {head_dim} is not supported by the CUDA C++ kernel (supported: {CUDA_HEAD_DIMS})"
        if max_len > CUDA_MAX_SEQLEN:
            return f"the CUDA C++ kernel holds a whole sequence in one block: L <= {CUDA_MAX_SEQLEN}, got {max_len}"
        es = qkv.element_size()
        # while torch.compile traces there is no data pointer: qkv is then a Linear's fresh output (the
        # allocators align far beyond 16 bytes), and the op checks the pointer again when it runs
        misaligned = not compiling() and qkv.data_ptr() % 16
        if qkv.stride(-1) != 1 or misaligned or any(s % (16 // es) for s in qkv.stride()[:-1]):
            return ("the CUDA C++ kernel needs qkv's last dim contiguous, its data 16-byte aligned and the other "
                    f"strides multiples of 8 elements; got strides {tuple(qkv.stride())}")
        need, have = cuda_smem_bytes(max_len, head_dim, es), _smem_optin(qkv.device)
        if have is not None and need > have:  # e.g. L 128, Dh 64 on sm_86/sm_89 (~99 KB)
            return (f"the CUDA C++ kernel needs {need} bytes of shared memory per block at L={max_len}, "
                    f"Dh={head_dim}; this GPU allows {have}")
    return None


def cuda_smem_bytes(max_len: int, head_dim: int, elem_size: int) -> int:
    """The CUDA C++ forward's dynamic shared memory (csrc/attention.cu `smem_bytes`): K and V of the
    sequence padded to 16 rows, plus one 16-row strip of scores (fp32) and probabilities per warp."""
    lp = -(-max_len // 16) * 16
    strip = 16 * max(lp, head_dim)
    return 2 * lp * head_dim * elem_size + (lp // 16) * (strip * elem_size + strip * 4)


def _smem_optin(device: torch.device) -> int | None:
    """The most shared memory a block may opt into on `device` (None where torch does not say)."""
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


# a constant of the device while torch.compile traces (as _backend.cuda_ext_usable: the mark
# torch.compiler.assume_constant_result sets, without importing torch._dynamo here)
_smem_optin._dynamo_marked_constant = True


def model_level_impl(impl: str, qkv: torch.Tensor, num_heads: int) -> str:
    """impl="cuda" asked of a whole model or block: the CUDA C++ attention (fp16/bf16 forward, L <= 128)
    where it runs, "auto" (Triton) elsewhere (e.g. fp32, or the decoder's 197/257 tokens); any other
    impl as it is."""
    if impl != "cuda":
        return impl
    why = _kernel_unsupported("cuda", qkv, qkv.shape[-1] // (3 * num_heads), qkv.shape[-2])
    return "cuda" if why is None else "auto"


def _resolve(impl: str, qkv: torch.Tensor, head_dim: int, max_len: int) -> str:
    if impl == "sdpa":  # torch's op runs any shape and dtype it is given (checked by _validate)
        return impl
    chosen = choose_impl(impl, qkv.device, auto_order=("triton",), cuda_op="attention_fwd",
                         what="maefast.ops.visible_attention")
    if chosen == "reference":
        return chosen
    why = _kernel_unsupported(chosen, qkv, head_dim, max_len)
    if why is None:
        return chosen
    if impl == "auto":
        return "reference"
    raise ValueError(f"impl={impl!r} cannot run this input: {why}")


# -- implementations ---------------------------------------------------------------------------------

def int32_offsets(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens as the int32 the CUDA C++ kernel reads, without a sync. int64 offsets are clamped to
    [-1, T+1] first: a plain cast would wrap one from 2**31 up into a well-formed offset (the kernel
    would compute a sequence instead of poisoning it); clamped, every array that breaks the contract
    (a start other than 0, a decrease, an end past T) still does, and a well-formed one is unchanged."""
    if cu_seqlens.dtype == torch.int64:
        cu_seqlens = cu_seqlens.clamp(-1, total + 1)
    return dense_index(cu_seqlens, torch.int32)


def _max_len(qkv: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int | None) -> int:
    if cu_seqlens is None:
        return qkv.shape[1]
    if max_seqlen is not None and max_seqlen >= 0:
        return int(max_seqlen)
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if cu_seqlens.numel() > 1 else 0


def _reference_lse(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """(Nb, H, Lr) fp32 natural-log logsumexp of the scaled scores of one sequence per batch row."""
    dh = qkv.shape[-1] // (3 * num_heads)
    qk = qkv.unflatten(-1, (3, num_heads, dh))
    return (torch.einsum("blhd,bmhd->bhlm", qk[:, :, 0].float(), qk[:, :, 1].float()) * scale).logsumexp(-1)


def _contract_segments(bounds: list[int], total: int, max_len: int) -> list[tuple[int, int]] | None:
    """Offsets trusted on a GPU (given with max_seqlen, never checked on the host) under the kernels'
    contract: None for the plain case (start 0, non-decreasing, end at the last row, no sequence past
    max_len); else the (start, end) of the sequences that come out, every other row NaN: none when
    the offsets do not start at 0, decrease or end past the rows (sequences would overlap), else the
    ones no longer than max_len (rows after the last offset are padding)."""
    b = bounds
    pairs = list(zip(b[:-1], b[1:]))
    if not b or b[0] != 0 or any(e < s for s, e in pairs) or b[-1] > total:
        return []
    if b[-1] == total and all(e - s <= max_len for s, e in pairs):
        return None
    return [(s, e) for s, e in pairs if 0 < e - s <= max_len]


def _reference_segments(qkv, num_heads, scale, segments) -> tuple[torch.Tensor, torch.Tensor]:
    """out and lse of the reference for `segments`, (start, end) row ranges, NaN elsewhere, as the kernels."""
    nb, total, width = qkv.shape
    out = qkv.new_full((nb, total, width // 3), float("nan"))
    lse = torch.full((nb, num_heads, total), float("nan"), dtype=torch.float32, device=qkv.device)
    for s, e in segments:
        out[:, s:e] = _reference_attention(qkv[:, s:e], num_heads, scale=scale)
        lse[:, :, s:e] = _reference_lse(qkv[:, s:e], num_heads, scale)
    return out, lse


def _reference_backward(dout, qkv, num_heads, scale, cu_seqlens, max_len: int = 0) -> torch.Tensor:
    """The attention gradient in plain PyTorch, fp32 (fp64 for fp64). Written out because autograd
    cannot run inside a custom op's implementation. Trusted offsets outside the plain case: NaN rows
    where the forward's are (`_contract_segments`)."""
    if cu_seqlens is not None:
        bounds = [int(v) for v in cu_seqlens.tolist()]  # the reference reads them on the host anyway
        segments = _contract_segments(bounds, qkv.shape[1], max_len)
        dqkv = torch.full_like(qkv, 0.0 if segments is None else float("nan"), memory_format=torch.contiguous_format)
        for s, e in zip(bounds[:-1], bounds[1:]) if segments is None else segments:
            if e > s:
                dqkv[:, s:e] = _reference_backward(dout[:, s:e], qkv[:, s:e], num_heads, scale, None)
        return dqkv
    n, L, width = qkv.shape
    acc = torch.promote_types(qkv.dtype, torch.float32)
    # reshape, not unflatten: vmap over batched gradients (jacobian(vectorize=True)) has no rule for unflatten
    q, k, v = qkv.to(acc).reshape(n, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (n, H, L, Dh)
    do = dout.to(acc).reshape(n, L, num_heads, -1).transpose(1, 2)
    p = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)
    dv = p.transpose(-2, -1) @ do
    dp = do @ v.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ k) * scale
    dk = (ds.transpose(-2, -1) @ q) * scale
    return torch.stack((dq, dk, dv), 0).permute(1, 3, 0, 2, 4).reshape(n, L, width).to(qkv.dtype)


def _alloc(shape, dtype, device, fill):
    return torch.empty(shape, dtype=dtype, device=device) if fill is None else \
        torch.full(shape, fill, dtype=dtype, device=device)


def _cuda_fwd(qkv, num_heads, scale, cu_seqlens, max_len):
    from .._cpp_lib import require_C

    C = require_C()
    nb, lr, width = qkv.shape
    dh = width // (3 * num_heads)
    # varlen: a row no (well-formed) sequence covers stays NaN (see check_cu_seqlens)
    fill = None if cu_seqlens is None else float("nan")
    out = _alloc((nb, lr, num_heads * dh), qkv.dtype, qkv.device, fill)
    lse = _alloc((nb, num_heads, lr), torch.float32, qkv.device, fill)
    nseq = nb if cu_seqlens is None else cu_seqlens.numel() - 1
    if out.numel() == 0 or nseq == 0 or max_len == 0:
        return out, lse
    cu = None if cu_seqlens is None else int32_offsets(cu_seqlens, lr)
    with device_guard(qkv):
        C.attention_fwd(qkv.data_ptr(), out.data_ptr(), lse.data_ptr(), 0 if cu is None else cu.data_ptr(),
                        nseq, num_heads, dh, max_len, lr, qkv.stride(0), qkv.stride(1), out.stride(0),
                        out.stride(1), lse.stride(0), lse.stride(1), float(scale), qkv.dtype == torch.bfloat16,
                        stream_of(qkv))
    return out, lse


@custom_op("maefast::visible_attention", mutates_args=())
def _visible_attention(qkv: torch.Tensor, num_heads: int, cu_seqlens: torch.Tensor | None, max_seqlen: int | None,
                       scale: float | None, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Nb, Lr, 3*H*Dh) -> out (Nb, Lr, H*Dh), lse (Nb, H, Lr) fp32. Inputs validated by the caller."""
    cu_seqlens = None if cu_seqlens is None else dense_index(cu_seqlens)
    dh = qkv.shape[-1] // (3 * num_heads)
    scale = dh ** -0.5 if scale is None else float(scale)
    max_len = _max_len(qkv, cu_seqlens, max_seqlen)
    chosen = _resolve(impl, qkv, dh, max_len)
    if chosen == "triton":
        from ..kernels.attention import attention_fwd

        with device_guard(qkv):
            return attention_fwd(qkv, num_heads, scale, cu_seqlens, max_len)
    if chosen == "cuda":
        return _cuda_fwd(qkv, num_heads, scale, cu_seqlens, max_len)
    # in qkv's dtype, as the kernels, the fake op and a compiled graph compute it (autocast would run the
    # reference's matmuls in its dtype: a bf16 output for an fp32 qkv)
    with torch.autocast(qkv.device.type, enabled=False):
        if cu_seqlens is None:
            return _reference_attention(qkv, num_heads, scale=scale).contiguous(), _reference_lse(qkv, num_heads, scale)
        # packed: sequence by sequence (one read of the offsets on the host; no (T, T) score matrix)
        bounds = [int(v) for v in cu_seqlens.tolist()]
        segments = _contract_segments(bounds, qkv.shape[1], max_len)
        if segments is None:  # the plain case: every row in a sequence
            segments = [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        return _reference_segments(qkv, num_heads, scale, segments)


@_visible_attention.register_fake
def _(qkv, num_heads, cu_seqlens, max_seqlen, scale, impl):
    nb, lr, width = qkv.shape
    return (qkv.new_empty(nb, lr, width // 3),
            qkv.new_empty(nb, num_heads, lr, dtype=torch.float32))


@custom_op("maefast::visible_attention_backward", mutates_args=())
def _visible_attention_backward(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                num_heads: int, cu_seqlens: torch.Tensor | None, max_seqlen: int | None,
                                scale: float | None, impl: str) -> torch.Tensor:
    """-> dqkv (Nb, Lr, 3*H*Dh) in the packed layout of qkv, qkv's dtype."""
    cu_seqlens = None if cu_seqlens is None else dense_index(cu_seqlens)
    dh = qkv.shape[-1] // (3 * num_heads)
    scale = dh ** -0.5 if scale is None else float(scale)
    max_len = _max_len(qkv, cu_seqlens, max_seqlen)
    chosen = _resolve(impl, qkv, dh, max_len)
    dout = dout.to(qkv.dtype)  # e.g. an fp32 gradient arriving for a bf16 output
    if chosen in ("triton", "cuda"):  # the CUDA C++ impl is forward-only; same lse convention
        from ..kernels.attention import attention_bwd

        with device_guard(qkv):
            return attention_bwd(dout, qkv, out, lse, num_heads, scale, cu_seqlens, max_len)
    with torch.autocast(qkv.device.type, enabled=False):  # its fp32 math, also for a backward run under autocast
        return _reference_backward(dout, qkv, num_heads, scale, cu_seqlens, max_len)


@_visible_attention_backward.register_fake
def _(dout, qkv, out, lse, num_heads, cu_seqlens, max_seqlen, scale, impl):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, cu_seqlens, max_seqlen, scale, impl = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled dlse (and dout stays None when out is unused)
    if cu_seqlens is not None and cu_seqlens.is_inference():  # made under torch.inference_mode: cannot be saved
        cu_seqlens = cu_seqlens.clone()
    ctx.save_for_backward(qkv, out, lse, cu_seqlens)
    ctx.num_heads, ctx.max_seqlen, ctx.scale, ctx.impl = num_heads, max_seqlen, scale, impl


def _backward(ctx, dout, dlse):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None
    dqkv = bwd(ctx, _visible_attention_backward)(dout, qkv, out, lse, ctx.num_heads, cu_seqlens, ctx.max_seqlen, ctx.scale,
                                       ctx.impl)
    return dqkv, None, None, None, None, None


register_autograd(_visible_attention, _backward, setup_context=_setup_context)


def sdpa_attention(qkv: torch.Tensor, num_heads: int, scale: float | None, dropout_p: float = 0.0) -> torch.Tensor:
    """impl="sdpa" (and nn.Attention's dropout case): torch's scaled_dot_product_attention on views of the
    packed (N, L, 3*H*Dh) qkv, dropout_p on the probabilities.

    Unbound on the packed [3] dim, then transposed: the backward's only copy is the one stack of dq, dk,
    dv into the packed dqkv (unbinding a (3, N, H, L, Dh) permutation instead stacks them in that
    order and then copies the result back into the packed layout: a second full copy)."""
    n, L, width = qkv.shape
    if qkv.numel() == 0:  # not every SDPA backend takes empty inputs; the reference's dtype under autocast
        return _reference_attention(qkv, num_heads, scale=scale)
    q, k, v = (t.transpose(1, 2) for t in qkv.unflatten(-1, (3, num_heads, -1)).unbind(2))  # (N, H, L, Dh) views
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(n, L, width // 3)


# -- public entry point ------------------------------------------------------------------------------

def _validate(qkv, num_heads, cu_seqlens, max_seqlen, scale, impl) -> int | None:
    """Raises on bad input; returns max_seqlen (computed, with one host sync, when device offsets
    come without it; see `maefast._validate.check_cu_seqlens` for what is trusted)."""
    check_tensor("qkv", qkv, dtypes=_DTYPES)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    check_scale(scale)
    check_impl(impl, "maefast.ops.visible_attention", sdpa=True)
    if impl == "sdpa" and cu_seqlens is not None:
        raise ValueError("impl='sdpa' takes no cu_seqlens (torch's scaled_dot_product_attention has no packed-"
                         "sequence form here); use impl='auto' for packed sequences")
    if cu_seqlens is None:
        if qkv.dim() != 3:
            raise ValueError(f"qkv must be (N, L, 3*H*Dh), got shape {tuple(qkv.shape)}")
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens (without it every sequence has length L)")
    else:
        if not (qkv.dim() == 2 or (qkv.dim() == 3 and qkv.shape[0] == 1)):
            raise ValueError(f"with cu_seqlens, qkv must be packed rows (T, 3*H*Dh) or (1, T, 3*H*Dh), "
                             f"got shape {tuple(qkv.shape)}")
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=qkv.device)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must hold B+1 >= 2 offsets, got {cu_seqlens.numel()}")
    width = qkv.shape[-1]
    if width % 3:
        raise ValueError(f"qkv's last dim must be 3*H*Dh (the packed q, k, v), got {width}, not a multiple of 3")
    if (width // 3) % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the q/k/v width {width // 3} (qkv last dim {width})")
    if width == 0:
        raise ValueError("qkv's last dim must be non-empty")
    if cu_seqlens is None:
        return None
    return check_cu_seqlens(cu_seqlens, qkv.shape[-2], max_seqlen)


def visible_attention(qkv: torch.Tensor, num_heads: int, *, cu_seqlens: torch.Tensor | None = None,
                      max_seqlen: int | None = None, scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Non-causal softmax attention on the packed output of the qkv Linear, without layout copies.

    Args:
        qkv: (N, L, 3*H*Dh), last dim ordered [3][H][Dh] (the official `qkv(x)`), float32/float16/
            bfloat16 (float64 on the reference), any strides. With `cu_seqlens`: (T, 3*H*Dh) or
            (1, T, 3*H*Dh), the rows of B sequences one after the other.
        num_heads: H.
        cu_seqlens: optional (B+1,) int32/int64 on qkv's device: sequence b is rows
            [cu_seqlens[b], cu_seqlens[b+1]); each attends within itself, no padding computed.
        max_seqlen: the longest sequence, with cu_seqlens. When None it is computed and cu_seqlens is
            checked (one host sync on a GPU; under torch.compile computed where the op runs, the
            offsets then checked by the kernels as below). When given, CPU offsets are still checked (free) and
            must fit it. Offsets must start at 0, not decrease and end at T. GPU offsets given with
            max_seqlen are trusted (no sync) and checked by the kernels instead, never silently
            wrong: offsets that do not start at 0, decrease or end beyond T make every row NaN
            (output, logsumexp, gradient); a sequence longer than max_seqlen comes out as NaN rows;
            rows after cu_seqlens[-1] (padding) are NaN; no kernel access leaves the tensors.
        scale: softmax scale, default Dh ** -0.5.
        impl: "auto" | "triton" | "cuda" | "reference" | "sdpa" (see the module docstring; "sdpa"
            without cu_seqlens).

    Returns:
        (N, L, H*Dh) (or (T, H*Dh) / (1, T, H*Dh)), qkv's dtype; differentiable w.r.t. qkv (the
        gradient arrives in the packed layout). Softmax statistics are fp32; the backward is
        deterministic and recomputes the probabilities from the saved logsumexp.
    """
    max_seqlen = _validate(qkv, num_heads, cu_seqlens, max_seqlen, scale, impl)
    if impl == "sdpa":  # torch's own op, no custom op; _resolve says "sdpa" (what `maefast profile` counts)
        _resolve(impl, qkv, qkv.shape[-1] // (3 * num_heads), qkv.shape[-2])
        # dropout_p given, not read from the default: torch.compile(dynamic=True) traces a default float as a
        # symbolic input, which a second checkpointed block cannot lift (AssertionError "lift_tracked_freevar_to_
        # input should not be called on root SubgraphTracer"; torch 2.13, any function with a float default)
        # in qkv's dtype, as every other impl (autocast would run an fp32 qkv's SDPA in its dtype); switched off
        # only where it is on (autocast knows no meta device)
        off = torch.autocast(qkv.device.type, enabled=False) if autocast_dtype(qkv.device) else contextlib.nullcontext()
        with off:
            return sdpa_attention(qkv, num_heads, None if scale is None else float(scale), 0.0)
    squeeze = qkv.dim() == 2
    x = qkv.unsqueeze(0) if squeeze else qkv
    out, _ = call(_visible_attention, x, num_heads, cu_seqlens, max_seqlen, None if scale is None else float(scale), impl)
    return out.squeeze(0) if squeeze else out


__all__ = ["visible_attention", "TRITON_HEAD_DIMS", "CUDA_HEAD_DIMS", "CUDA_MAX_SEQLEN"]
