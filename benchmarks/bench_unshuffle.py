"""Decoder un-shuffle: mask tokens + gather by ids_restore + decoder position embedding (issue 5).

Groups (speed-up = reference composition time / this, same run, same shape):
  unshuffle-fwd      reference = the official forward_decoder lines (mask_token.repeat, cat, gather
                     with a repeated index, cat the cls, + decoder_pos_embed); maefast = one pass.
  unshuffle-fwd-bwd  the same with the grads of x_vis and mask_token (pos_embed frozen, as official).
Providers: reference (baseline), compile (torch.compile of the reference composition), maefast's
triton / cuda impls (GPU), or maefast's auto impl (the reference path) on the CPU, where Triton only
runs interpreted and its timings mean nothing.

GPU (--gpu): decoder width 512, L = 196 (ViT-B/L, patch 16) and L = 256 (ViT-H, patch 14) at batch
256 (two cases: the project's GPU time is short), bf16 tokens, fp32 mask token and position
embedding, ratio 0.75.
CPU: a tiny case that runs in seconds; torch.compile is skipped there unless MAEFAST_BENCH_COMPILE_CPU=1.
GB/s counts the bytes maefast's kernels move, for every provider alike: forward reads x_vis and
ids_restore and writes the (N, 1+L, Dd) output (fp32: the promotion); backward reads the output grad
(fp32) and ids_restore and writes the x_vis grad (bf16). The cuda provider's casts (x_vis to fp32
before its kernel, its fp32 x_vis grad to bf16 after) are not counted.
"""
from __future__ import annotations


import pytest
import torch

from _harness import op_timing, run_bench, sizes, skip_unless_runs

from maefast import ops
from maefast import reference as R
from maefast.bench import compile_static

RATIO = 0.75
DEC_DIM = 512
# (name, N, L)
CASES = sizes(cpu=[("tiny", 4, 16)], gpu=[("p16", 256, 196), ("p14", 256, 256)])
PROVIDERS = ["reference", "compile", "maefast", "triton", "cuda"]


def _official(x, mask_token, ids_restore, pos_embed):
    """forward_decoder of the official code, between decoder_embed and the blocks (a bf16 x with the
    fp32 mask token and position embedding: cat and + promote, the output is fp32, as maefast's)."""
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + pos_embed


def _setup(case, device):
    name, N, L = case
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    K = int(L * (1 - RATIO))
    D = DEC_DIM if device.type == "cuda" else 64
    ids = R.masking_ids(N, L, RATIO, device=device)
    x = torch.randn(N, 1 + K, D, device=device).to(dtype).requires_grad_()
    tok = (torch.randn(1, 1, D, device=device) * 0.02).requires_grad_()
    pos = torch.randn(1, 1 + L, D, device=device)
    el, out_el = x.element_size(), torch.promote_types(dtype, pos.dtype).itemsize  # fp32 out for bf16 x
    fwd_bytes = N * (1 + K) * D * el + N * (1 + L) * D * out_el + N * L * 8
    bwd_bytes = fwd_bytes + N * (1 + L) * D * out_el + N * (1 + K) * D * el + N * L * 8
    shape = dict(case=name, N=N, L=L, K=K, D=D)
    return x, tok, ids.ids_restore, pos, dtype, fwd_bytes, bwd_bytes, shape


def _fn(provider):
    if provider in ("reference", "compile"):
        return compile_static(_official) if provider == "compile" else _official
    impl = "auto" if provider == "maefast" else provider
    return lambda x, tok, ids, pos: ops.unshuffle(x, tok, ids, pos, impl=impl)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-b{c[1]}" for c in CASES])
def test_unshuffle_fwd(benchmark, device, case, provider):
    skip_unless_runs(provider, device, "unshuffle_fwd")
    x, tok, ids, pos, dtype, fwd_bytes, _, shape = _setup(case, device)
    f = _fn(provider)

    def fn():
        with torch.no_grad():
            return f(x, tok, ids, pos)

    run_bench(benchmark, fn, group="unshuffle-fwd", provider=provider, baseline=provider == "reference",
              shape=shape, dtype=dtype, device=device, bytes_moved=fwd_bytes, cuda_graph=True, **op_timing(device))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-b{c[1]}" for c in CASES])
def test_unshuffle_fwd_bwd(benchmark, device, case, provider):
    skip_unless_runs(provider, device, "unshuffle_fwd")
    x, tok, ids, pos, dtype, _, bwd_bytes, shape = _setup(case, device)
    f = _fn(provider)
    g = torch.randn(x.shape[0], ids.shape[1] + 1, x.shape[2], device=device)  # the fp32 output's grad

    def fn():
        return torch.autograd.grad(f(x, tok, ids, pos), (x, tok), g)

    run_bench(benchmark, fn, group="unshuffle-fwd-bwd", provider=provider, baseline=provider == "reference",
              shape=shape, dtype=dtype, device=device, bytes_moved=bwd_bytes, cuda_graph=True, **op_timing(device))
