"""Attention over the visible tokens: maefast (Triton; the CUDA C++ forward) vs torch SDPA's backends
and the official explicit attention, forward and forward+backward, on the packed qkv layout.

Every provider starts from the packed qkv (N, L, 3*H*Dh) the qkv Linear makes and ends with the
(N, L, H*Dh) input of `proj` (and, backward, the packed dqkv): SDPA rows include the reshape/permute
and output transpose copies it needs; "official" is the explicit attention of the official code
(`maefast.reference.attention`, fp32 softmax). FLOPs are nominal (4*N*L^2*H*Dh forward, 3.5x that
forward+backward); bytes are the packed tensors read and written once.

Rows (providers): official (baseline), sdpa-flash / sdpa-efficient / sdpa-cudnn / sdpa-math (each
pinned with `sdpa_kernel`; skipped when that backend refuses the shape or dtype), triton, cuda (the
C++ WMMA forward, L <= 128; its backward is Triton's), and for Dh = 80 triton-split / triton-pad128
(the raw kernels with 80 = 64 + 16 vs padded to 128: what the split saves). At the end each maefast
row gets `speedup_vs_best_sdpa` (best SDPA backend of the same group and shape, same run).

GPU (--gpu): bf16, batch 256, the shapes the issue's targets name: ViT-L encoder (L=50, Dh=64),
ViT-H encoder (L=65, Dh=80), decoder (L=197, Dh=32); ~40 timings, well under a minute.
MAEFAST_BENCH_ATTN_FULL=1 adds ViT-B's encoder, ViT-H's decoder (L=257), batch 64 and the math
backend (about 3x the time). Each call is timed eagerly
(`eager_time_ms`) and captured in a CUDA graph and replayed (`time_ms`, the ratios): GPU time without
Python dispatch (the kernels, not the launch overhead, are compared); MAEFAST_BENCH_ATTN_EAGER=1 (or
MAEFAST_BENCH_EAGER=1) times eager calls only. CPU: one
tiny fp32 case (Triton under the interpreter: it shows the path runs, its time means nothing).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from _harness import RESULTS, run_bench, sizes

from maefast.ops.attention import visible_attention
from maefast.reference.attention import attention as official_attention

FULL = os.environ.get("MAEFAST_BENCH_ATTN_FULL") == "1"
_GPU_CASES = [dict(model="L-enc", N=256, L=50, H=16, D=64), dict(model="H-enc", N=256, L=65, H=16, D=80),
              dict(model="dec", N=256, L=197, H=16, D=32)]
if FULL:
    _GPU_CASES += [dict(model="B-enc", N=256, L=50, H=12, D=64), dict(model="H-dec", N=256, L=257, H=16, D=32),
                   dict(model="L-enc", N=64, L=50, H=16, D=64), dict(model="H-enc", N=64, L=65, H=16, D=80)]
CASES = sizes(cpu=[dict(model="tiny", N=2, L=50, H=2, D=64)], gpu=_GPU_CASES)
SDPA = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn") + (("sdpa-math",) if FULL else ())
OURS = ("triton", "cuda", "triton-split", "triton-pad128")
PROVIDERS = ("official",) + SDPA + OURS
MODES = ("fwd", "fwdbwd")


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
               "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}[backend_name]

    def attn(qkv, H, scale):
        n, L, width = qkv.shape
        q, k, v = qkv.unflatten(-1, (3, H, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, L, Dh) views
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2).reshape(n, L, width // 3)

    return attn


def _raw_triton(pad: bool):
    """The kernels without the custom op (for the split-vs-pad comparison): (fwd, fwdbwd) closures."""
    from maefast.kernels.attention import attention_bwd, attention_fwd

    def fwd(qkv, H, scale):
        return attention_fwd(qkv, H, scale, pad_head_dim=pad)[0]

    def fwdbwd(qkv, H, scale, dout):
        out, lse = attention_fwd(qkv, H, scale, pad_head_dim=pad)
        return attention_bwd(dout, qkv, out, lse, H, scale, pad_head_dim=pad)

    return fwd, fwdbwd


def _make(provider: str, mode: str, qkv: torch.Tensor, H: int, dout: torch.Tensor):
    scale = (qkv.shape[-1] // (3 * H)) ** -0.5
    if provider in ("triton-split", "triton-pad128"):
        fwd, fwdbwd = _raw_triton(provider == "triton-pad128")
        return (lambda: fwd(qkv, H, scale)) if mode == "fwd" else (lambda: fwdbwd(qkv, H, scale, dout))
    if provider == "official":
        attn = lambda x: official_attention(x, H, scale=scale)  # noqa: E731
    elif provider.startswith("sdpa-"):
        f = _sdpa(provider)
        attn = lambda x: f(x, H, scale)  # noqa: E731
    else:
        attn = lambda x: visible_attention(x, H, scale=scale, impl=provider)  # noqa: E731
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return attn(qkv)
        return run
    return lambda: torch.autograd.grad(attn(qkv), qkv, dout)[0]


@pytest.fixture(scope="module", autouse=True)
def _best_sdpa_ratios():
    """After the module: speedup_vs_best_sdpa on every maefast row, and a short printed table."""
    yield
    lines = []
    for r in RESULTS:
        if not r.get("group", "").startswith("attention-") or r["provider"] not in OURS:
            continue
        rivals = [o for o in RESULTS if o["group"] == r["group"] and o["shape_key"] == r["shape_key"]
                  and o["provider"] in SDPA and o.get("time_ms")]
        if rivals and r.get("time_ms"):
            best = min(rivals, key=lambda o: o["time_ms"])
            r["best_sdpa_provider"] = best["provider"]
            r["speedup_vs_best_sdpa"] = best["time_ms"] / r["time_ms"]
            lines.append(f"{r['group']:<18} {r['shape_key']:<60} {r['provider']:<14} "
                         f"{r['speedup_vs_best_sdpa']:.2f}x vs {best['provider']}")
    if lines:
        print("\nmaefast attention vs the best SDPA backend (same run):\n" + "\n".join(lines))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['model']}-N{c['N']}-L{c['L']}-H{c['H']}-D{c['D']}")
def test_attention(benchmark, device, case, provider, mode):
    N, L, H, D = case["N"], case["L"], case["H"], case["D"]
    on_gpu = device.type == "cuda"
    if provider in ("triton-split", "triton-pad128") and D != 80:
        pytest.skip("the split-vs-pad rows are for head dim 80")
    if not on_gpu and provider not in ("official", "sdpa-flash", "triton"):
        pytest.skip("GPU provider (the CPU case shows only the official, SDPA and interpreted Triton paths)")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    qkv = torch.randn(N, L, 3 * H * D, device=device, dtype=dtype).requires_grad_(mode == "fwdbwd")
    dout = torch.randn(N, L, H * D, device=device, dtype=dtype)
    fn = _make(provider, mode, qkv, H, dout)
    try:
        fn()  # a backend that refuses this shape/dtype (or a missing _C) says so here
        if on_gpu:
            torch.cuda.synchronize()
    except (RuntimeError, ValueError) as e:
        pytest.skip(f"{provider} cannot run {case} {dtype}: {str(e).splitlines()[0][:200]}")
    fwd_flops = 4.0 * N * L * L * H * D
    es = qkv.element_size()
    io = N * L * H * D * es
    kw = dict(warmup_ms=10.0, rep_ms=40.0, min_reps=5) if on_gpu else dict(warmup=1, min_reps=1, max_reps=3,
                                                                          budget_s=0.3)
    info = run_bench(benchmark, fn, group=f"attention-{mode}", provider=provider, baseline=provider == "official",
                     flops=fwd_flops * (3.5 if mode == "fwdbwd" else 1.0),
                     bytes_moved=io * (4 if mode == "fwd" else 12), shape=dict(N=N, L=L, H=H, Dh=D),
                     dtype=dtype, cuda_graph=os.environ.get("MAEFAST_BENCH_ATTN_EAGER") != "1", **kw)
