"""Training step of the MAE (forward + backward + AdamW, mask ratio 0.75, synthetic batch).

Rows (providers, `maefast.bench.STEP_PROVIDERS`): reference (the official computation, eager,
fp16 autocast + GradScaler as the official AMP loop; the baseline), sdpa (the reference with torch's scaled_dot_product_attention), compile
(the sdpa variant with each block torch.compile'd; compile-full, the whole model, with
MAEFAST_BENCH_COMPILE_FULL=1), maefast (maefast's model, impl="auto"), maefast-custom-op (the same
with every op called through the torch.library dispatcher instead of the direct route), plus whatever
`maefast.bench.register_step_provider` added (e.g. maefast.patch rows). Autocast bf16 on a GPU, fp32 on the CPU. Reports step time,
TFLOP/s (the official model's training FLOPs, `maefast.flops`), img/s, peak memory (GPU), and
the speed-up against reference eager in the same run.

CPU: tiny/small configs; torch.compile is skipped there (its ~20 s compile would dominate the
suite) unless MAEFAST_BENCH_COMPILE_CPU=1. GPU (--gpu): ViT-B/16 at batch 128 and ViT-H/14 at
batch 64 (MAEFAST_BENCH_STEP_MODELS=base:128,huge:64 style to change, `huge:192@reference+maefast-block`
for only those rows at that size; MAEFAST_BENCH_STEP_PROVIDERS=a,b to run only those rows). Peak memory
is the allocator's high-water mark from before the model is built; peak_mem_vs_baseline divides it by
the reference row's of the same size. A size that does not fit the card skips with "out of GPU memory". On an H200 the 8 cases at
B/128 + H/32 took 57 s, 30 s of it the two regional compiles.
"""
from __future__ import annotations

import os

import pytest
import torch

from _harness import gpu_mode, run_bench, sizes

from maefast import bench as mb
from maefast.flops import mae_flops
from maefast.models.configs import resolve_model_name


def _cases():
    """[(model, batch, providers or None)]; MAEFAST_BENCH_STEP_MODELS items are `name:batch` (every
    row) or `name:batch@p1+p2` (only those rows at that size, e.g. a large batch for the memory figure)."""
    env = os.environ.get("MAEFAST_BENCH_STEP_MODELS")
    if env and gpu_mode():
        out = []
        for item in filter(None, (i.strip() for i in env.split(","))):
            size, _, only = item.partition("@")
            name, _, batch = size.partition(":")
            out.append((resolve_model_name(name), int(batch or 32),
                        [p for p in only.split("+") if p] if only else None))
        return out
    return [(n, b, None) for n, b in sizes(cpu=[("mae_vit_tiny_test", 4), ("mae_vit_small_cpu", 8)],
                                           gpu=[("mae_vit_base_patch16", 128), ("mae_vit_huge_patch14", 64)])]


CASES = _cases()
# every registered provider (the fast model appends its rows with register_step_provider), except
# whole-model compile, which costs minutes of compilation per model: opt in with the env var
PROVIDERS = [p for p in mb.STEP_PROVIDERS
             if p not in ("compile-full", "maefast-compile") or os.environ.get("MAEFAST_BENCH_COMPILE_FULL") == "1"]
if os.environ.get("MAEFAST_BENCH_STEP_PROVIDERS"):  # a comma list: only these rows (a short GPU window)
    PROVIDERS = [p.strip() for p in os.environ["MAEFAST_BENCH_STEP_PROVIDERS"].split(",") if p.strip()]
_unknown = sorted({p for p in PROVIDERS + [q for *_, only in CASES for q in (only or [])]} - set(mb.STEP_PROVIDERS))
if _unknown:
    raise ValueError(f"MAEFAST_BENCH_STEP_PROVIDERS / MAEFAST_BENCH_STEP_MODELS: unknown provider(s) {_unknown}; "
                     f"known {sorted(mb.STEP_PROVIDERS)}")
# (model, batch) outer, provider inner: the harness budget cuts the last size's last rows first
PARAMS = [((name, batch), p) for name, batch, only in CASES for p in (only if only is not None else PROVIDERS)]


@pytest.mark.parametrize("case,provider", PARAMS, ids=[f"{n}-b{b}-{p}" for (n, b), p in PARAMS])
def test_train_step(benchmark, device, case, provider):
    name, batch = case
    if "compile" in provider and device.type == "cpu" and os.environ.get("MAEFAST_BENCH_COMPILE_CPU") != "1":
        pytest.skip("torch.compile on the CPU compiles for ~20 s; set MAEFAST_BENCH_COMPILE_CPU=1 to include it")
    # the official recipe's AMP: fp16 autocast + GradScaler for the baseline; bf16 for every other row
    dtype = (torch.float16 if provider == "reference" else torch.bfloat16) if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        mb.free_memory()
        torch.cuda.reset_peak_memory_stats(device)
    oom = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    try:
        step = mb.make_step(provider, name, batch, device=device, dtype=dtype)
    except ValueError as e:  # a provider that cannot run here (e.g. no fast model yet)
        pytest.skip(str(e))
    except oom:
        mb.free_memory()
        pytest.skip(f"{provider} {name} batch {batch}: out of GPU memory building the step")
    kw = dict(warmup_ms=1.0, rep_ms=500.0, min_reps=3, max_reps=30, flush_l2=False) if device.type == "cuda" \
        else dict(warmup=1, min_reps=2, max_reps=5, budget_s=0.5)
    try:
        info = run_bench(benchmark, step, group="train-step", provider=provider, baseline=provider == "reference",
                         flops=mae_flops(name)["train"] * batch, shape=dict(model=name, batch=batch), dtype=dtype,
                         device=device, **kw)
    except oom:  # a batch too large for this card: say so, free it, go on with the next row
        del step
        mb.free_memory()
        pytest.skip(f"{provider} {name} batch {batch}: out of GPU memory")
    info["img_per_s"] = batch / (info["time_ms"] * 1e-3)
    if device.type == "cuda":
        # allocator high-water mark since before the model was built: weights, AdamW state, activations
        info["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del step
    mb.free_memory()
