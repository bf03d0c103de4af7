"""MAE reconstruction loss, masked MSE on normalised pixels (issue 5).

Groups (speed-up = reference composition time / this, same run, same shape; norm_pix_loss on):
  loss-masked-fwd-bwd  pred only for the masked patches (N, L-K, P): reference =
                       maefast.reference.forward_loss_masked (patchify, gather, normalise, MSE) +
                       autograd; maefast = norm_pix_loss(pred_on="masked"). The issue's target case.
  loss-all-fwd-bwd     the official layout, pred (N, L, P) + mask: reference = the official forward_loss.
Providers: reference (baseline), compile (torch.compile of the reference composition), maefast's
triton / cuda impls (GPU), or maefast's auto impl (the reference path) on the CPU, where Triton only
runs interpreted and its timings mean nothing.

GPU (--gpu): patch 16 (ViT-B/L, L=196, P=768) and patch 14 (ViT-H, L=256, P=588) at batch 256 (two
cases only: the GPU time of the project is short and each torch.compile costs tens of seconds);
bf16 pred, fp32 images, ratio 0.75. The loss does not depend on the encoder width.
CPU: a tiny case that runs in seconds; torch.compile is skipped there unless MAEFAST_BENCH_COMPILE_CPU=1.
GB/s counts the bytes maefast's Triton path moves, for every provider alike: the forward reads pred
and the masked image patches (forward-only rows); with a gradient to come it also writes the
weighted residual w * (pred - target), which the backward reads and scales into the grad of pred
(fwd+bwd rows: pred + image + 3 x pred bytes; pred_on="all": every pred row is read and every grad
row written, the image only where masked). The cuda impl reads pred and the image twice instead.
"""
from __future__ import annotations


import pytest
import torch

from _harness import op_timing, run_bench, sizes, skip_unless_runs

from maefast import ops
from maefast import reference as R
from maefast.bench import compile_static

RATIO = 0.75
# (name, N, img, p)
CASES = sizes(cpu=[("tiny-p16", 4, 64, 16)],
              gpu=[("p16", 256, 224, 16), ("p14", 256, 224, 14)])
PROVIDERS = ["reference", "compile", "maefast", "triton", "cuda"]


def _setup(case, device, pred_on):
    name, N, img, p = case
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    L = (img // p) ** 2
    K = int(L * (1 - RATIO))
    M = L - K
    P = p * p * 3
    imgs = torch.randn(N, 3, img, img, device=device)
    ids = R.masking_ids(N, L, RATIO, device=device)
    rows = M if pred_on == "masked" else L
    pred = torch.randn(N, rows, P, device=device).to(dtype).requires_grad_()
    idx = ids.ids_restore if pred_on == "masked" else ids.mask
    el = pred.element_size()
    fwd_bytes = N * rows * P * el + N * M * P * imgs.element_size()
    bwd_bytes = fwd_bytes + 3 * N * rows * P * el  # + write g (fwd), read g and write g * grad (bwd)
    shape = dict(case=name, N=N, img=img, p=p, L=L, K=K, P=P)
    return imgs, pred, idx, p, dtype, fwd_bytes, bwd_bytes, shape


def _loss_fn(provider, pred_on):
    if provider in ("reference", "compile"):
        f = R.forward_loss_masked if pred_on == "masked" else R.forward_loss
        if provider == "compile":
            f = compile_static(f)
        return lambda pred, imgs, idx, p: f(imgs, pred, idx, p, True)
    impl = "auto" if provider == "maefast" else provider
    return lambda pred, imgs, idx, p: ops.norm_pix_loss(pred, imgs, idx, p, norm_pix=True, pred_on=pred_on, impl=impl)


def _run(benchmark, device, case, provider, pred_on, backward):
    skip_unless_runs(provider, device, "norm_pix_loss_fwd")
    imgs, pred, idx, p, dtype, fwd_bytes, bwd_bytes, shape = _setup(case, device, pred_on)
    loss_fn = _loss_fn(provider, pred_on)
    if backward:
        def fn():
            return torch.autograd.grad(loss_fn(pred, imgs, idx, p), pred)
    else:
        def fn():
            with torch.no_grad():
                return loss_fn(pred, imgs, idx, p)
    group = f"loss-{pred_on}-{'fwd-bwd' if backward else 'fwd'}"
    run_bench(benchmark, fn, group=group, provider=provider, baseline=provider == "reference", shape=shape,
              dtype=dtype, device=device, bytes_moved=bwd_bytes if backward else fwd_bytes, cuda_graph=True, **op_timing(device))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-b{c[1]}" for c in CASES])
def test_loss_masked_fwd_bwd(benchmark, device, case, provider):
    _run(benchmark, device, case, provider, "masked", backward=True)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-b{c[1]}" for c in CASES])
def test_loss_all_fwd_bwd(benchmark, device, case, provider):
    _run(benchmark, device, case, provider, "all", backward=True)
