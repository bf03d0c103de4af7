"""Decoder un-shuffle as one custom op `maefast::unshuffle`: mask-token fill + gather by ids_restore +
decoder position embedding in one pass, with a fused, deterministic backward.

    out = maefast.ops.unshuffle(x_vis, mask_token, ids_restore, pos_embed)  # (N, 1+L, Dd)

equals `maefast.reference.unshuffle` (the official forward_decoder up to the blocks).

Contract for ids_restore (every backend): each row a permutation of 0..L-1, as masking returns;
checked on the host when it is a CPU tensor. On a GPU it is trusted (a check would sync); every
backend then reads and writes inside its tensors whatever it holds, with one rule: patch l takes
visible token ids_restore[n, l] when that is in [0, K), else the mask token. The gradient is the
exact gradient of that forward, except that a visible token placed twice (never by a permutation)
gets one of its two gradients in the kernels (they write, they do not accumulate).
"""
from __future__ import annotations

import torch

from .._validate import FLOAT_DTYPES, check_permutation, check_tensor, dense_index
from ._backend import choose_impl, device_guard, dtype_code, stream_of
from ._dispatch import bwd, call, custom_op, register_autograd

_INDEX_DTYPES = (torch.int64, torch.int32)


def _validate(x_vis, mask_token, ids_restore, pos_embed, dtypes=FLOAT_DTYPES) -> None:
    check_tensor("x_vis", x_vis, ndim=3, dtypes=dtypes)
    n, k1, d = x_vis.shape
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=_INDEX_DTYPES, device=x_vis.device)
    L = ids_restore.shape[1]
    if ids_restore.shape[0] != n:
        raise ValueError(f"ids_restore must have shape (N, L) with N = x_vis.shape[0] = {n}, "
                         f"got {tuple(ids_restore.shape)}")
    if n < 1 or L < 1 or d < 1:
        raise ValueError(f"x_vis (N, 1+K, Dd) and ids_restore (N, L) must be non-empty, got x_vis "
                         f"{tuple(x_vis.shape)} and ids_restore {tuple(ids_restore.shape)}")
    if not 1 <= k1 <= L + 1:
        raise ValueError(f"x_vis must hold the cls token and K <= L visible tokens: shape (N, 1+K, Dd) with "
                         f"1 <= 1+K <= 1+L = {L + 1}, got {tuple(x_vis.shape)}")
    check_tensor("mask_token", mask_token, dtypes=dtypes, device=x_vis.device)
    if tuple(mask_token.shape) != (1, 1, d):
        raise ValueError(f"mask_token must have shape (1, 1, Dd) = {(1, 1, d)}, got {tuple(mask_token.shape)}")
    check_tensor("pos_embed", pos_embed, ndim=3, dtypes=dtypes, device=x_vis.device)
    if tuple(pos_embed.shape) != (1, L + 1, d):
        raise ValueError(f"pos_embed must have shape (1, 1+L, Dd) = {(1, L + 1, d)}, got {tuple(pos_embed.shape)}")
    check_permutation("ids_restore", ids_restore)


# -- backends -----------------------------------------------------------------------------------

def out_dtype(x_vis, mask_token, pos_embed) -> torch.dtype:
    """The official composition's dtype: cat([x, mask_tokens]) and `+ pos_embed` promote."""
    return torch.promote_types(torch.promote_types(x_vis.dtype, mask_token.dtype), pos_embed.dtype)


def _prep(x_vis, mask_token, ids_restore, pos_embed):
    # mask_token and pos_embed in the output dtype (exact: it is their promotion with x's)
    dt = out_dtype(x_vis, mask_token, pos_embed)
    tok = mask_token.reshape(-1).to(dt).contiguous()
    pos = pos_embed[0].to(dt)
    return tok, ids_restore, pos


def _fwd_reference(x_vis, mask_token, ids_restore, pos_embed):
    """`maefast.reference.unshuffle` under the op's contract: the same values for a permutation
    (ids >= K pick a mask token there too), and in bounds for any ids (an id outside [0, K) takes
    the mask token, as in the kernels)."""
    n, k1, d = x_vis.shape
    K = k1 - 1
    dt = out_dtype(x_vis, mask_token, pos_embed)
    x_vis = x_vis.to(dt)  # exact: the promotion cat does
    src = torch.cat([x_vis[:, 1:], mask_token.to(dt).expand(n, 1, d)], dim=1)  # K visible + 1 mask
    idx = torch.where((ids_restore >= 0) & (ids_restore < K), ids_restore, K)
    x = torch.gather(src, 1, idx.unsqueeze(-1).expand(-1, -1, d))
    return (torch.cat([x_vis[:, :1], x], dim=1) + pos_embed.to(dt)).contiguous()


def _fwd_cuda(x_vis, mask_token, ids_restore, pos_embed):
    from .._cpp_lib import require_C

    C = require_C()
    tok, ids, pos = _prep(x_vis, mask_token, ids_restore, pos_embed)
    x_vis = x_vis.to(tok.dtype)  # the C++ kernel reads one dtype
    n, k1, d = x_vis.shape
    L = ids.shape[1]
    out = torch.empty(n, L + 1, d, dtype=x_vis.dtype, device=x_vis.device)
    with device_guard(x_vis):
        C.unshuffle_fwd(x_vis.data_ptr(), tok.data_ptr(), ids.data_ptr(), pos.data_ptr(), out.data_ptr(),
                        n, L, k1 - 1, d, *x_vis.stride(), *ids.stride(), *pos.stride(), dtype_code(x_vis.dtype),
                        stream_of(x_vis))
    return out


def _bwd_cuda(grad, ids_restore, num_visible, need_pos, x_dtype):
    from .._cpp_lib import require_C

    C = require_C()
    ids = ids_restore
    n, T, d = grad.shape
    chunks = max(1, min(n, -(-1024 // T)))
    n_per = -(-n // chunks)
    chunks = -(-n // n_per)
    gx = torch.zeros(n, num_visible + 1, d, dtype=grad.dtype, device=grad.device)  # see kernels/unshuffle.py
    tok_part = torch.empty(chunks, T, d, dtype=torch.float32, device=grad.device)
    pos_part = torch.empty(chunks, T, d, dtype=torch.float32, device=grad.device) if need_pos else tok_part
    with device_guard(grad):
        C.unshuffle_bwd(grad.data_ptr(), ids.data_ptr(), gx.data_ptr(), tok_part.data_ptr(), pos_part.data_ptr(),
                        n, T - 1, num_visible, d, n_per, chunks, *grad.stride(), *ids.stride(), bool(need_pos),
                        dtype_code(grad.dtype), stream_of(grad))
    # the C++ kernel writes one dtype: x_vis's gradient rounded here (a pass the Triton kernel does not make)
    return gx.to(x_dtype), tok_part.sum((0, 1)), (pos_part.sum(0) if need_pos else None)


def _bwd_reference(grad, ids_restore, num_visible, need_pos, x_dtype):
    """The exact gradient of `_fwd_reference` for any ids: a visible token placed twice gets both
    gradients (accumulated in fp32); deterministic for a permutation (each row added once)."""
    n, T, d = grad.shape
    K = num_visible
    g = grad[:, 1:]
    vis = (ids_restore >= 0) & (ids_restore < K)
    # The gather's backward: add the patch rows back to their visible token; row K collects the
    # mask-token rows and is dropped (their sum is taken below, in a fixed order).
    dst = torch.where(vis, ids_restore, K).unsqueeze(-1).expand(-1, -1, d)
    # out of place: vmap over batched gradients (jacobian(vectorize=True)) cannot scatter into a plain zeros
    g_vis = torch.zeros(n, K + 1, d, dtype=torch.float32, device=grad.device).scatter_add(1, dst, g.float())
    gx = torch.cat([grad[:, :1].to(x_dtype), g_vis[:, :K].to(x_dtype)], dim=1)
    g_tok = g.masked_fill(vis.unsqueeze(-1), 0).sum((0, 1), dtype=torch.float32)
    g_pos = grad.sum(0, dtype=torch.float32) if need_pos else None
    return gx, g_tok, g_pos


# -- custom op ------------------------------------------------------------------------------------

@custom_op("maefast::unshuffle", mutates_args=())
def _unshuffle_op(x_vis: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                  pos_embed: torch.Tensor, impl: str) -> torch.Tensor:
    ids_restore = dense_index(ids_restore, torch.int64)
    if impl == "triton":
        from ..kernels.unshuffle import unshuffle_fwd

        tok, ids, pos = _prep(x_vis, mask_token, ids_restore, pos_embed)
        with device_guard(x_vis):
            return unshuffle_fwd(x_vis, tok, ids, pos)
    if impl == "cuda":
        return _fwd_cuda(x_vis, mask_token, ids_restore, pos_embed)
    return _fwd_reference(x_vis, mask_token, ids_restore, pos_embed)


@_unshuffle_op.register_fake
def _(x_vis, mask_token, ids_restore, pos_embed, impl):
    n, _, d = x_vis.shape
    return x_vis.new_empty(n, ids_restore.shape[1] + 1, d, dtype=out_dtype(x_vis, mask_token, pos_embed))


@custom_op("maefast::unshuffle_backward", mutates_args=())
def _unshuffle_bwd_op(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int, need_pos: bool,
                      impl: str, x_dtype: torch.dtype) -> list[torch.Tensor]:
    """Returns [grad_x_vis (N, 1+K, Dd) in x_dtype (the output's gradient rounded once, as autograd's
    promotion would), grad_mask_token (Dd,) fp32, grad_pos_embed (1+L, Dd) fp32 (an empty tensor when
    need_pos is False)]; the sums are of the output's gradient as it is."""
    grad = grad.contiguous() if grad.stride(-1) != 1 else grad
    ids_restore = dense_index(ids_restore, torch.int64)
    if impl == "triton":
        from ..kernels.unshuffle import unshuffle_bwd

        with device_guard(grad):
            gx, g_tok, g_pos = unshuffle_bwd(grad, ids_restore, num_visible, need_pos, x_dtype)
    elif impl == "cuda":
        gx, g_tok, g_pos = _bwd_cuda(grad, ids_restore, num_visible, need_pos, x_dtype)
    else:
        gx, g_tok, g_pos = _bwd_reference(grad, ids_restore, num_visible, need_pos, x_dtype)
    if g_pos is None:
        g_pos = grad.new_empty(0, dtype=torch.float32)
    return [gx, g_tok, g_pos]


@_unshuffle_bwd_op.register_fake
def _(grad, ids_restore, num_visible, need_pos, impl, x_dtype):
    n, T, d = grad.shape
    g_pos = grad.new_empty(T, d, dtype=torch.float32) if need_pos else grad.new_empty(0, dtype=torch.float32)
    return [grad.new_empty(n, num_visible + 1, d, dtype=x_dtype), grad.new_empty(d, dtype=torch.float32), g_pos]


def _setup_context(ctx, inputs, output):
    x_vis, mask_token, ids_restore, pos_embed, impl = inputs
    # ids made under torch.inference_mode cannot be saved for backward: a copy then (the official gather saves none)
    ctx.save_for_backward(ids_restore.clone() if ids_restore.is_inference() else ids_restore)
    ctx.num_visible = x_vis.shape[1] - 1
    ctx.x_dtype = x_vis.dtype
    ctx.tok_dtype, ctx.tok_shape = mask_token.dtype, tuple(mask_token.shape)
    ctx.pos_dtype, ctx.pos_shape = pos_embed.dtype, tuple(pos_embed.shape)
    ctx.impl = impl


def _backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    need_pos = bool(ctx.needs_input_grad[3])
    # the output's gradient as it is (fp32 when promoted) for every sum; x_vis's rounded to its dtype, as
    # autograd's promotion would (by the kernel, where it writes it)
    gx, g_tok, g_pos = bwd(ctx, _unshuffle_bwd_op)(grad, ids_restore, ctx.num_visible, need_pos, ctx.impl,
                                                   ctx.x_dtype)
    g_tok = g_tok.to(ctx.tok_dtype).reshape(ctx.tok_shape)
    g_pos = g_pos.to(ctx.pos_dtype).reshape(ctx.pos_shape) if need_pos else None
    return gx, g_tok, None, g_pos, None


register_autograd(_unshuffle_op, _backward, setup_context=_setup_context)


# -- public API -----------------------------------------------------------------------------------

def unshuffle(x_vis: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor,
              impl: str = "auto") -> torch.Tensor:
    """The MAE decoder input in one pass: visible tokens back at their patches, mask_token elsewhere,
    plus the decoder position embedding.

    Args:
        x_vis: (N, 1+K, Dd) fp32/bf16/fp16 decoder-embedded tokens, cls first, then the K visible
            patches in ids_keep order.
        mask_token: (1, 1, Dd) float.
        ids_restore: (N, L) int64/int32, a permutation of 0..L-1 per sample (from masking): patch l
            takes visible token ids_restore[n, l] when it is < K, else the mask token. Checked on
            the host for a CPU tensor (ValueError); trusted on a GPU (no host sync), where an index
            outside [0, K) takes the mask token in every backend (see the module docstring).
        pos_embed: (1, 1+L, Dd) float, the decoder position embedding (cls row first).
        impl: "auto" | "triton" | "cuda" | "reference".
    Returns:
        (N, 1+L, Dd) contiguous, in the promotion of the three dtypes, as the official composition
        (`cat([x, mask_tokens])`, `+ pos_embed`) computes it: fp32 for bf16 x_vis (decoder_embed
        under autocast) and the models' fp32 mask_token / pos_embed. Differentiable in x_vis (the
        output's gradient rounded once to its dtype), mask_token (fp32 sum over the masked slots,
        deterministic) and pos_embed (fp32 sum over the batch, only when it requires grad); the sums
        are of the output's gradient as it is, rounded once to a 16-bit parameter's dtype (autograd
        would round each term first: up to ~2e-3 relative apart for a bf16 mask_token under an fp32
        output).
    """
    _validate(x_vis, mask_token, ids_restore, pos_embed)
    impl = choose_impl(impl, x_vis.device, cuda_op="unshuffle_fwd", what="maefast.ops.unshuffle")
    return call(_unshuffle_op, x_vis, mask_token, ids_restore, pos_embed, impl)
