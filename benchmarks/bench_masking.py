"""Random masking + visible-only patch embedding (issue 3).

Groups (speed-up = reference composition time / this, same run, same shape):
  mask-embed-fwd      noise + argsort x2 + mask + patch embedding of the kept tokens (+ pos_embed)
  mask-embed-fwd-bwd  the same with the backward to the patch-embed weight and bias
  random-masking      the index side alone (ids_keep, ids_restore, mask)
  patch-gather        the memory-bound part alone: kept patches -> (N*K, C*p*p) rows (GB/s vs copy)
Providers: reference (the official composition: conv patch-embed of ALL patches, + pos_embed[1:],
torch.rand noise, argsort, argsort, gather; the baseline), compile (torch.compile of it), and maefast's
triton / cuda impls (GPU), or maefast's auto impl (the reference path) on the CPU, where Triton only
runs interpreted and its timings mean nothing.

GPU (--gpu): ViT-B/16 b256, ViT-L/16 b128, ViT-H/14 b64 and b256 at 224 px, bf16 tensors, ratio 0.75.
CPU: a tiny case that runs in seconds; torch.compile is skipped there unless MAEFAST_BENCH_COMPILE_CPU=1.
GB/s counts the useful bytes (kept pixels read, weight read, tokens written (fp32: the bf16 conv +
the fp32 pos_embed promote, in the official code and in maefast since 2026-12-05), pos rows read)
for every provider alike, so the reference's extra traffic shows as a lower figure.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from _harness import op_timing, run_bench, sizes, skip_unless_runs

from maefast import ops
from maefast.bench import compile_static

RATIO = 0.75
# mask-embed-fwd-bwd FLOPs = this x the forward's: the backward computes the weight gradient (one matmul
# the size of the forward's) and no input gradient (imgs need none); tests/test_bench.py counts it
FWD_BWD_FLOPS = 2
# (name, N, img, p, D)
CASES = sizes(cpu=[("tiny-p16", 4, 64, 16, 64)],
              gpu=[("vit_b16", 256, 224, 16, 768), ("vit_l16", 128, 224, 16, 1024), ("vit_h14", 64, 224, 14, 1280),
                   ("vit_h14", 256, 224, 14, 1280)])
PROVIDERS = ["reference", "compile", "maefast", "triton", "cuda"]


def _reference_composition(imgs, weight, bias, pos_embed, p, ratio):
    """The official order: embed all patches, add positions, draw noise, argsort twice, gather."""
    x = F.conv2d(imgs, weight, bias, stride=p).flatten(2).transpose(1, 2)
    x = x + pos_embed[:, 1:, :]  # bf16 conv + the fp32 parameter: fp32 tokens, as maefast's
    N, L, D = x.shape
    K = int(L * (1 - ratio))
    noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :K]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(N, L, device=x.device)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x, mask, ids_restore


def _maefast_composition(imgs, weight, bias, pos_embed, p, ratio, impl):
    N, _, H, W = imgs.shape
    ids = ops.random_masking(N, (H // p) * (W // p), ratio, device=imgs.device, impl=impl)
    x = ops.masked_patch_embed(imgs, ids.ids_keep, weight, bias, pos_embed, p, impl=impl)
    return x, ids.mask, ids.ids_restore


def _fn(provider, imgs, weight, bias, pos, p, ratio):
    if provider in ("reference", "compile"):
        f = compile_static(_reference_composition) if provider == "compile" else _reference_composition
        return lambda: f(imgs, weight, bias, pos, p, ratio)
    impl = "auto" if provider == "maefast" else provider
    return lambda: _maefast_composition(imgs, weight, bias, pos, p, ratio, impl)


def _setup(case, device, requires_grad=False):
    name, N, img, p, D = case
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    L = (img // p) ** 2
    imgs = torch.randn(N, 3, img, img, device=device, dtype=dtype)
    weight = (torch.randn(D, 3, p, p, device=device) * (3 * p * p) ** -0.5).to(dtype).requires_grad_(requires_grad)
    bias = torch.randn(D, device=device, dtype=dtype).requires_grad_(requires_grad)
    pos = torch.randn(1, 1 + L, D, device=device)  # fp32 like the official parameter (frozen)
    K = int(L * (1 - RATIO))
    el, out_el = imgs.element_size(), torch.promote_types(dtype, pos.dtype).itemsize  # fp32 tokens
    useful = dict(flops=2 * N * K * 3 * p * p * D,
                  bytes_moved=N * K * (3 * p * p * el + D * out_el + D * 4) + D * 3 * p * p * el)
    shape = dict(model=name, N=N, img=img, p=p, D=D, L=L, K=K)
    return imgs, weight, bias, pos, p, dtype, useful, shape


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-b{c[1]}" for c in CASES])
def test_mask_embed_fwd(benchmark, device, case, provider):
    skip_unless_runs(provider, device, "patch_gather")
    imgs, weight, bias, pos, p, dtype, useful, shape = _setup(case, device)
    fn = _fn(provider, imgs, weight, bias, pos, p, RATIO)
    with torch.no_grad():
        run_bench(benchmark, fn, group="mask-embed-fwd", provider=provider, baseline=provider == "reference",
                  shape=shape, dtype=dtype, device=device, **useful, cuda_graph=True, **op_timing(device, rep_ms=100.0))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-b{c[1]}" for c in CASES])
def test_mask_embed_fwd_bwd(benchmark, device, case, provider):
    skip_unless_runs(provider, device, "patch_gather")
    imgs, weight, bias, pos, p, dtype, useful, shape = _setup(case, device, requires_grad=True)
    fwd = _fn(provider, imgs, weight, bias, pos, p, RATIO)

    def step():
        x = fwd()[0]
        gw, gb = torch.autograd.grad(x, (weight, bias), torch.ones_like(x))
        return gw, gb

    run_bench(benchmark, step, group="mask-embed-fwd-bwd", provider=provider, baseline=provider == "reference",
              shape=shape, dtype=dtype, device=device, flops=FWD_BWD_FLOPS * useful["flops"], cuda_graph=True,
              **op_timing(device, rep_ms=100.0))


@pytest.mark.parametrize("provider", ["reference", "triton", "cuda", "maefast"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-b{c[1]}" for c in CASES])
def test_random_masking(benchmark, device, case, provider):
    skip_unless_runs(provider, device, "patch_gather")
    _, N, img, p, _ = case
    L = (img // p) ** 2
    if provider == "reference":
        def fn():
            noise = torch.rand(N, L, device=device)
            ids_shuffle = torch.argsort(noise, dim=1)
            ids_restore = torch.argsort(ids_shuffle, dim=1)
            K = int(L * (1 - RATIO))
            mask = torch.ones(N, L, device=device)
            mask[:, :K] = 0
            return ids_shuffle[:, :K], ids_restore, torch.gather(mask, 1, ids_restore)
    else:
        impl = "auto" if provider == "maefast" else provider

        def fn():
            return ops.random_masking(N, L, RATIO, seed=1234, device=device, impl=impl)
    run_bench(benchmark, fn, group="random-masking", provider=provider, baseline=provider == "reference",
              shape=dict(N=N, L=L), device=device, bytes_moved=N * L * (8 + 8 + 4) + N * int(L * (1 - RATIO)) * 8,
              cuda_graph=True, **op_timing(device, rep_ms=100.0))


@pytest.mark.parametrize("provider", ["reference", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-b{c[1]}" for c in CASES])
def test_patch_gather(benchmark, device, case, provider):
    """The memory-bound part: GB/s of reading the kept pixels and writing them as rows."""
    skip_unless_runs(provider, device, "patch_gather")
    from maefast.ops.patch_embed import _rows_cuda, _rows_torch

    imgs, _, _, _, p, dtype, _, shape = _setup(case, device)
    N, L, K = shape["N"], shape["L"], shape["K"]
    ids_keep = ops.random_masking(N, L, RATIO, seed=5, device=device).ids_keep
    rows = _rows_cuda if provider == "cuda" else _rows_torch
    run_bench(benchmark, lambda: rows(imgs, ids_keep, p), group="patch-gather", provider=provider,
              baseline=provider == "reference", shape=shape, dtype=dtype, device=device,
              bytes_moved=2 * N * K * 3 * p * p * imgs.element_size() + N * K * 8, cuda_graph=True, **op_timing(device, rep_ms=100.0))
