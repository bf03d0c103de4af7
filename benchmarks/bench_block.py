"""One pre-norm ViT block, forward + backward, three ways (issue 6: which block path the model uses).

Providers (bf16 autocast on GPU, an fp32 residual stream as in the official model):
  official   maefast.reference.model.Block (timm 0.3.2 / official MAE: explicit softmax attention)
  ops        maefast.nn.Block: torch Linear/LayerNorm/GELU around maefast's attention op
             (what the model runs with fused=False)
  block      maefast.nn.Block(fused=True): the whole block as one `maefast.ops.vit_block` op, LayerNorm
             and GELU recomputed in the backward (the model's fused="block")
Every row is timed eagerly (`eager_time_ms`: Python dispatch included) and as a CUDA-graph replay
(`time_ms`, the ratios: GPU time); peak memory of the forward+backward is recorded too.

Shapes (GPU, --gpu; batch 256 at ratio 0.75 for the encoders, 64 for the decoder): ViT-L/16 encoder
(50 tokens, 1024 wide, 16 heads), ViT-H/14 encoder (65, 1280, 16), decoder p14 (257, 512, 16).
CPU: one tiny case (reference impl: the Triton interpreter's timings mean nothing).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

from _harness import run_bench, sizes

from maefast.nn import Block as FastBlock
from maefast.reference.model import Block as OfficialBlock

# (name, batch, tokens, width, heads)
CASES = sizes(cpu=[("tiny", 4, 17, 64, 2)],
              gpu=[("L-enc", 256, 50, 1024, 16), ("H-enc", 256, 65, 1280, 16), ("p14-dec", 64, 257, 512, 16)])
PROVIDERS = ["official", "ops", "block"]


def _make(provider, width, heads, device):
    norm = functools.partial(nn.LayerNorm, eps=1e-6)
    impl = "auto" if device.type == "cuda" else "reference"
    if provider == "official":
        blk = OfficialBlock(width, heads, 4.0, qkv_bias=True, norm_layer=norm)
    else:
        blk = FastBlock(width, heads, 4.0, qkv_bias=True, norm_layer=norm, impl=impl, fused=provider == "block")
    return blk.to(device)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_block_fwd_bwd(benchmark, device, case, provider):
    name, n, t, d, h = case
    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    blk = _make(provider, d, h, device)
    x = torch.randn(n, t, d, device=device, requires_grad=True)
    dy = torch.randn(n, t, d, device=device)
    params = [x, *blk.parameters()]
    dtype = torch.bfloat16 if on_gpu else torch.float32

    def fn():
        # no autocast weight cache: the call is also captured in a CUDA graph (each weight is cast once anyway)
        with torch.autocast(device.type, dtype=dtype, enabled=on_gpu, cache_enabled=False):
            y = blk(x)
        return torch.autograd.grad(y, params, dy)

    if on_gpu:
        fn()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # forward FLOPs per sample: 24*T*D^2 (the four Linears) + 4*T^2*D (QK^T and PV); backward twice that
    flops = 3 * 2 * n * (12 * t * d * d + 2 * t * t * d)
    kw = dict(warmup_ms=10.0, rep_ms=100.0, min_reps=5, max_reps=100) if on_gpu else \
        dict(warmup=1, min_reps=2, max_reps=5, budget_s=0.3)
    info = run_bench(benchmark, fn, group="block-fwd-bwd", provider=provider, baseline=provider == "official",
                     flops=flops, shape=dict(case=name, N=n, T=t, D=d, H=h), dtype=dtype, device=device,
                     cuda_graph=True, **kw)
    if on_gpu:
        info["peak_extra_mib"] = peak
