"""Training step of the MAE (forward + backward + AdamW, mask ratio 0.75, synthetic batch), every row
stepped by `maefast.TrainStep`, the baselines measured in the same run.

Rows (providers, `maefast.bench.STEP_PROVIDERS`, in this order unless chosen):
  reference            the official computation, eager, fp16 autocast + GradScaler, default (foreach)
                       AdamW: the official recipe and the baseline (`speedup_vs_baseline`)
  sdpa                 torch-native without compile: the same model with scaled_dot_product_attention
  torch-native         + torch.compile of the whole model, eager step
  torch-native-graph   + the step captured in one CUDA graph
  torch-native-autotune-graph   the same with Inductor's mode="max-autotune-no-cudagraphs" (compiles for
                       minutes: run it by name)
  maefast, maefast-graph, maefast-block, maefast-block-graph, maefast-compile, maefast-compile-graph,
  maefast-patch, maefast-patch-hf, maefast-custom-op   (see `STEP_PROVIDERS[...].what`)
Every row but reference: bf16 autocast and fused AdamW (capturable in the captured rows). The fastest
of the torch-native rows that ran at a size (sdpa, torch-native, torch-native-graph,
torch-native-autotune-graph: `maefast.bench.TORCH_NATIVE_ROWS`) is "best torch-native": every record carries
`best_torch_native_provider`, `best_torch_native_ms` and `speedup_vs_best_torch_native`. A captured
row that cannot capture does not run (skipped with the reason): it is never timed eagerly.

Each record: time_ms, img_per_s, tflops (the official model's training FLOPs, `maefast.flops`),
frac_peak_flops (of the bf16 matmul peak measured in the same run, before the first row is built),
peak_mem_gib and peak_mem_reserved_gib (the allocator's high-water marks of allocated and reserved
memory from before the model is built; reserved also holds a captured row's graph pool) and
peak_mem_vs_baseline (allocated / the reference row's at the same size), and how the row stepped
(`captured`, `compiled`, `amp`, `optimizer`, `mask_source`, `cudnn_benchmark`: on for every row, as the
official recipe sets it).

CPU: tiny/small configs in fp32; the compile rows skip unless MAEFAST_BENCH_COMPILE_CPU=1 (Inductor
compiles a tiny model for ~80 s on a 2-core CPU) and the captured rows skip (no GPU); tests/test_step.py
runs every row once on the CPU. GPU (--gpu): ViT-B/16 at batch 128 and ViT-H/14 at batch 64
(MAEFAST_BENCH_STEP_MODELS=base:128,huge:64 style to change, `huge:192@reference+maefast-block` for
only those rows at that size; MAEFAST_BENCH_STEP_PROVIDERS=a,b to run only those rows, in that
order). A size that does not fit the card skips with "out of GPU memory".

The decisive pair, interleaved (`test_train_step_pair`, group `train-step-pair`): two rows built side
by side in one process and timed in alternating rounds (`maefast.timing.time_interleaved`: A B, B A,
..., ~0.5 s each, 8 rounds), so that the card's clock, its temperature or the order of the rows weighs
on both alike: rows timed minutes apart in separate processes, and the fastest of several maefast rows
set against one torch-native row, lean toward maefast. MAEFAST_BENCH_STEP_PAIR=base+ours names the pair
(default `torch-native-graph+maefast-block-graph` under --gpu, `sdpa+maefast-block` without; "none"
for no pair), at every size that runs every row; with MAEFAST_BENCH_STEP_PROVIDERS set and no
MAEFAST_BENCH_STEP_PAIR, no pair runs. The pair's two rows carry the usual fields (their time: the median
of their rounds) and the ours row `pair_ratio` (the median of the rounds' base / ours ratios),
`pair_ratio_rounds`, `pair_ratio_range` and `peak_mem_pair_gib` (both rows resident: not a row's own).
When the second row does not fit beside the first (out of GPU memory) or skips (it cannot run here), the
base is timed alone as a `train-step` row with `pair_failed` saying why (a preset whose only baseline
timing is the pair keeps its other targets) and the pair skips.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import pytest
import torch

from _harness import (RESULTS, _stop_if_broken, gpu_mode, peak_memory, record_row, reset_peak_memory, run_bench,
                      sizes)

from maefast import bench as mb
from maefast import timing
from maefast.flops import mae_flops
from maefast.graphs import message_line
from maefast.timing import synchronize
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
# rows that run only when named (MAEFAST_BENCH_STEP_PROVIDERS or a size's @rows): minutes of compiling each
ON_REQUEST = ("torch-native-autotune-graph",)
PROVIDERS = [p for p in mb.STEP_PROVIDERS if p not in ON_REQUEST]
if os.environ.get("MAEFAST_BENCH_STEP_PROVIDERS"):  # a comma list: only these rows (a short GPU window)
    PROVIDERS = [p.strip() for p in os.environ["MAEFAST_BENCH_STEP_PROVIDERS"].split(",") if p.strip()]
_unknown = sorted({p for p in PROVIDERS + [q for *_, only in CASES for q in (only or [])]} - set(mb.STEP_PROVIDERS))
if _unknown:
    raise ValueError(f"MAEFAST_BENCH_STEP_PROVIDERS / MAEFAST_BENCH_STEP_MODELS: unknown provider(s) {_unknown}; "
                     f"known {sorted(mb.STEP_PROVIDERS)}")
# (model, batch) outer, provider inner: the harness budget cuts the last size's last rows first
PARAMS = [((name, batch), p) for name, batch, only in CASES for p in (only if only is not None else PROVIDERS)]
DEFAULT_PAIR = {"gpu": "torch-native-graph+maefast-block-graph", "cpu": "sdpa+maefast-block"}


def _pair() -> tuple[str, str] | None:
    """(base, ours) of MAEFAST_BENCH_STEP_PAIR, or the default pair of a whole run; None: no pair."""
    env = os.environ.get("MAEFAST_BENCH_STEP_PAIR")
    if env is None:
        if os.environ.get("MAEFAST_BENCH_STEP_PROVIDERS"):
            return None  # a chosen list of rows: the pair only when asked for
        env = DEFAULT_PAIR["gpu" if gpu_mode() else "cpu"]
    if env.strip().lower() in ("", "none"):
        return None
    pair = tuple(p.strip() for p in env.split("+"))
    if len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError(f"MAEFAST_BENCH_STEP_PAIR must be two different rows, base+ours, got {env!r}")
    unknown = sorted(set(pair) - set(mb.STEP_PROVIDERS))
    if unknown:
        raise ValueError(f"MAEFAST_BENCH_STEP_PAIR: unknown provider(s) {unknown}; known {sorted(mb.STEP_PROVIDERS)}")
    return pair


PAIR = _pair()
PAIR_PARAMS = [(name, batch) for name, batch, only in CASES if only is None] if PAIR else []


def _skip_unbuildable(provider: str, device) -> None:
    recipe = mb.STEP_PROVIDERS[provider]
    if recipe.compile and device.type == "cpu" and os.environ.get("MAEFAST_BENCH_COMPILE_CPU") != "1":
        pytest.skip("torch.compile on the CPU compiles for minutes; set MAEFAST_BENCH_COMPILE_CPU=1 to include it")


def _build(provider: str, name: str, batch: int, device, oom_skips: bool = True):
    """(the row, built and stepped once; seconds that took), or pytest.skip with the reason it cannot run
    (out of memory: with oom_skips=False the OutOfMemoryError itself, what was built freed)."""
    t_build = time.perf_counter()
    try:
        row = mb.make_step(provider, name, batch, device=device)
        try:  # the first step: an eager row's compiles (Inductor's, Triton's JIT) happen in it
            row()
            synchronize(device)
        except torch.cuda.OutOfMemoryError:
            row = None
            raise
    except (ValueError, RuntimeError) as e:  # a row that cannot run here (no fast model, no GPU, no capture)
        mb.free_memory()
        if isinstance(e, torch.cuda.OutOfMemoryError):
            if not oom_skips:
                raise
            pytest.skip(f"{provider} {name} batch {batch}: out of GPU memory")
        _stop_if_broken(e)
        pytest.skip(f"{provider}: {message_line(e)}")
    # building to a first step done: the model, compiles, warm-up and capture (what a GPU preset's budget pays)
    return row, round(time.perf_counter() - t_build, 1)


def _train_step_pair(benchmark, device, case):
    """The pair (base, ours) in one process, timed in alternating rounds (see the module docstring)."""
    name, batch = case
    base_p, ours_p = PAIR
    for p in PAIR:
        _skip_unbuildable(p, device)
    reset_peak_memory(device)
    base, base_s = _build(base_p, name, batch, device)
    described = {base_p: base.describe()}  # now: a later build resets the graph-break counters
    try:  # a failure or a skip of the second build gives the first row's memory back before the next case
        ours, ours_s = _build(ours_p, name, batch, device, oom_skips=False)
        kw = dict(rounds=8, round_ms=500.0, warmup_ms=500.0) if device.type == "cuda" \
            else dict(rounds=2, round_ms=0.0, warmup_ms=0.0)
        t_base, t_ours = timing.time_interleaved([base, ours], device, **kw)
    except torch.cuda.OutOfMemoryError:
        ours, why = None, f"{ours_p} did not fit beside {base_p}: out of GPU memory"
    except pytest.skip.Exception as e:  # ours cannot run here (a capture refused, ...); this process is sound
        ours, why = None, f"no pair: {e.msg}"
    except BaseException:
        base = None
        mb.free_memory()
        raise
    if ours is None:  # no pair: the baseline built (a whole-model compile) alone keeps the record's other targets
        mb.free_memory()
        if ((name, batch), base_p) in PARAMS:  # its own case times it alone: no second row of it
            base = None
            mb.free_memory()
            pytest.skip(f"{why} ({base_p} has its own row)")
        info = _time_alone(benchmark, device, base, name, batch, base_s, described[base_p])
        info["pair_failed"] = f"{why}; {base_p} timed alone"
        mb.torch_native_ratios(RESULTS)
        base = None
        mb.free_memory()
        pytest.skip(info["pair_failed"])
    described[ours_p] = ours.describe()
    benchmark.group = "train-step-pair"
    benchmark.pedantic(lambda row=ours: (row(), synchronize(device)), rounds=1, iterations=1, warmup_rounds=0)
    ratios = [b / o for b, o in zip(t_base["rounds_ms"], t_ours["rounds_ms"])]
    mem = peak_memory(device)
    common = dict(group="train-step-pair", flops=mae_flops(name)["train"] * batch, shape=dict(model=name, batch=batch),
                  device=device, timer=("cuda-events over each round's calls, interleaved rounds"
                                        if device.type == "cuda" else "perf_counter over each round's calls"))
    for row, t, build_s, info, extra in (
            (base, t_base, base_s, {}, {}),
            (ours, t_ours, ours_s, benchmark.extra_info,
             dict(paired_with=base_p, pair_ratio=statistics.median(ratios), pair_ratio_rounds=ratios,
                  pair_ratio_range=[min(ratios), max(ratios)],
                  peak_mem_pair_gib=mem.get("peak_mem_gib")))):
        record_row(info, t, provider=row.provider, baseline=row is base, dtype=row.step.dtype,
                   rounds_ms=t["rounds_ms"], calls_per_round=t["calls_per_round"], build_s=build_s,
                   img_per_s=batch / (t["median_ms"] * 1e-3), **common, **extra, **described[row.provider])
    mb.torch_native_ratios(RESULTS)
    del base, ours, row
    mb.free_memory()


if PAIR_PARAMS:  # no case, no test (an empty parametrisation would add a skipped one to every count)
    test_train_step_pair = pytest.mark.parametrize(
        "case", PAIR_PARAMS, ids=[f"{n}-b{b}-{'-vs-'.join(PAIR)}" for n, b in PAIR_PARAMS])(_train_step_pair)


@pytest.mark.parametrize("case,provider", PARAMS, ids=[f"{n}-b{b}-{p}" for (n, b), p in PARAMS])
def test_train_step(benchmark, device, case, provider):
    name, batch = case
    _skip_unbuildable(provider, device)
    reset_peak_memory(device)  # the card's peak measured before the row exists: its buffers are not the row's
    row, build_s = _build(provider, name, batch, device)
    info = _time_alone(benchmark, device, row, name, batch, build_s, row.describe())
    # allocator high-water marks since before the model was built: weights, AdamW state, activations
    info.update(peak_memory(device))
    mb.torch_native_ratios(RESULTS)
    del row
    mb.free_memory()


def _time_alone(benchmark, device, row, name: str, batch: int, build_s: float, described: dict) -> dict:
    """Times a built row on its own (a `train-step` row) and returns its record; skips when the card runs
    out of memory (the caller's reference to the row goes with the case: the next one's
    reset_peak_memory collects it before it measures)."""
    provider = row.provider
    # >= 10 timed steps (a ViT-H/14 b128 step: ~14 in 1.5 s): 3-4 (500 ms) spread ~2.5% on the 2026-12-04
    # H200, more than the gains the record has to tell apart; the step preset's row budget has room for it
    kw = dict(warmup_ms=1.0, rep_ms=1500.0, min_reps=10, max_reps=40, flush_l2=False) if device.type == "cuda" \
        else dict(warmup=1, min_reps=2, max_reps=5, budget_s=0.5)
    scaler = row.step.scaler if row.step.scaler is not None and row.step.scaler.is_enabled() else None
    scale0 = scaler.get_scale() if scaler is not None else None
    try:
        info = run_bench(benchmark, row, group="train-step", provider=provider, baseline=provider == "reference",
                         flops=mae_flops(name)["train"] * batch, shape=dict(model=name, batch=batch),
                         dtype=row.step.dtype, device=device, **kw)
    except torch.cuda.OutOfMemoryError:  # a batch too large for this card: say so, free it, go on
        row = None
        mb.free_memory()
        pytest.skip(f"{provider} {name} batch {batch}: out of GPU memory")
    info["img_per_s"] = batch / (info["time_ms"] * 1e-3)
    if scaler is not None:  # fp16 (the official recipe): a step the scaler skips (inf/NaN gradients) has no
        # AdamW in it; each skip halves the scale, so the halvings over the timed steps count them at least
        scale1 = scaler.get_scale()
        info["grad_scale"] = [scale0, scale1]
        info["skipped_steps_min"] = max(0, round(math.log2(scale0 / scale1))) if scale0 and scale1 else None
    info["build_s"] = build_s
    info.update(described)  # `captured`: whether the row's step is a graph replay
    # run_bench's `cuda_graph` says whether the harness captured fn, which it never does here: False would
    # read as "not captured" in a captured row. Dropped; ratios compare the rows' own step times.
    info.pop("cuda_graph", None)
    return info
