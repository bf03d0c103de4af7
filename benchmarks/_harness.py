"""Timing and recording helpers for `benchmarks/bench_*.py` (pytest-benchmark).

Usage in a bench file (one `run_bench` per test: pytest-benchmark allows one fixture use)::

    from _harness import run_bench, sizes

    @pytest.mark.parametrize("shape", sizes(cpu=[(2, 64, 192)], gpu=[(256, 197, 768)]))
    @pytest.mark.parametrize("provider", ["reference", "triton"])
    def test_foo(benchmark, device, shape, provider):
        fn = ...  # a closure that runs the op once
        run_bench(benchmark, fn, group="foo-fwd", provider=provider, baseline=provider == "reference",
                  flops=..., bytes_moved=..., shape=dict(N=shape[0], L=shape[1], D=shape[2]), dtype=dtype)

The number is ours, not pytest-benchmark's: on CUDA the median of CUDA-event timings after warm-up
with the L2 flushed between calls (`maefast.timing.time_cuda`, the do_bench recipe); on the CPU the
median of a few `perf_counter` calls. pytest-benchmark runs `fn` once more (synchronised) through
`benchmark.pedantic(rounds=1)` so that it still records and saves JSON (`--benchmark-json`). The
result lives in `benchmark.extra_info`: time_ms (+ min/p20/p80/reps), tflops and/or gbps and the
fraction of the card's measured peak, provider, group, shape, dtype, card, date, versions and git
commit, and `speedup_vs_baseline` (baseline time / this time, same group and shape, same run).
Imports and runs without a GPU and without triton.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the checkout, also when maefast is not pip-installed
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from maefast import timing  # noqa: E402
from maefast.graphs import capture_cuda_graph, first_line, message_line, process_broken  # noqa: E402

_GPU_MODE = False  # set by conftest from --gpu
RESULTS: list[dict] = []  # every run_bench record of this session (the benchmark.extra_info dicts)


def configure(gpu: bool) -> None:
    global _GPU_MODE
    _GPU_MODE = bool(gpu)


def gpu_mode() -> bool:
    """True under `pytest benchmarks --gpu`: bench files parametrise with their GPU sizes."""
    return _GPU_MODE


def sizes(cpu: Sequence, gpu: Sequence) -> list:
    """The parametrisation for this session: `gpu` under --gpu, else the CPU-sized `cpu` cases."""
    return list(gpu if _GPU_MODE else cpu)


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shape_key(shape) -> str:
    if isinstance(shape, dict):
        return json.dumps(shape, sort_keys=True, default=str)
    if isinstance(shape, (tuple, list)):
        return json.dumps(list(shape), default=str)
    return json.dumps(shape, default=str)


def _jsonable(shape):
    if isinstance(shape, dict):
        return {str(k): _jsonable(v) for k, v in shape.items()}
    if isinstance(shape, (tuple, list)):
        return [_jsonable(v) for v in shape]
    if isinstance(shape, (int, float, str, bool)) or shape is None:
        return shape
    return str(shape)


def update_ratios() -> None:
    """speedup_vs_baseline (and peak_mem_vs_baseline where both record peak_mem_gib) for every record
    whose group+shape has a baseline in this run."""
    base = {}
    for r in RESULTS:
        if r.get("baseline"):
            base[(r["group"], r["shape_key"])] = r
    for r in RESULTS:
        b = base.get((r["group"], r["shape_key"]))
        if b is not None and r.get("time_ms"):
            r["baseline_provider"] = b["provider"]
            r["speedup_vs_baseline"] = timing.speedup(b, r)  # like with like
            if bool(b.get("cuda_graph")) != bool(r.get("cuda_graph")):
                r["speedup_timing"] = "eager (one side could not be captured)"
            if b.get("eager_time_ms") and r.get("eager_time_ms"):
                r["eager_speedup_vs_baseline"] = b["eager_time_ms"] / r["eager_time_ms"]
        if b is not None and b.get("peak_mem_gib") and r.get("peak_mem_gib"):  # the step rows (GPU)
            r["peak_mem_vs_baseline"] = r["peak_mem_gib"] / b["peak_mem_gib"]


def _stop_if_broken(exc: BaseException) -> None:
    """A capture that failed inside the graph leaves this process's CUDA allocator unusable (torch
    2.11): every later row would fail or leak, so the session stops here with the rows so far."""
    if process_broken(exc):
        pytest.exit(f"stopping the benchmarks: {first_line(exc, 300)}", returncode=1)


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph (warmed up on a side stream first); returns the replay. Raises
    RuntimeError when fn cannot be captured (a host sync, a CPU tensor, ...)."""

    graph, _ = capture_cuda_graph(fn, warmup_steps=3)
    return graph.replay


def run_bench(benchmark, fn: Callable[[], object], *, group: str, provider: str, baseline: bool = False,
              flops: float | None = None, bytes_moved: float | None = None, shape=None, dtype=None,
              device=None, cuda_graph: bool = False, **timing_kw) -> dict:
    """Times `fn` (see the module docstring), records it in `benchmark.extra_info` and returns it.

    Args:
        benchmark: the pytest-benchmark fixture.
        fn: runs the measured work once (a closure; inputs prepared outside it).
        group: what is compared (e.g. "attention-fwd"); ratios are taken inside a group and shape.
        provider: "reference", "sdpa", "compile", "triton", "cuda", ...
        baseline: this provider is the group's baseline (speed-ups are relative to it).
        flops / bytes_moved: per call, for TFLOP/s and GB/s (give the one that bounds the op, or both).
        shape: a dict or tuple describing the case (saved as given).
        dtype: recorded as a string.
        cuda_graph: on CUDA, time fn eagerly (`eager_time_ms`: GPU time plus Python dispatch, what a
            host-bound loop sees) and then as a CUDA-graph replay (`time_ms`: the GPU time of the
            kernels alone, what a GPU-bound training step sees); ratios use `time_ms`, and
            `eager_speedup_vs_baseline` the eager times. If fn cannot be captured, `time_ms` is the
            eager time and `cuda_graph` says False. MAEFAST_BENCH_EAGER=1 turns graphs off.
        timing_kw: passed to `maefast.timing.time_fn` (warmup_ms, rep_ms, min_reps, budget_s, ...).
    """
    dev = torch.device(device) if device is not None else bench_device()
    graphed = cuda_graph and dev.type == "cuda" and os.environ.get("MAEFAST_BENCH_EAGER") != "1"
    eager = None
    if graphed:
        eager = timing.time_fn(fn, dev, **timing_kw)
        try:
            fn = cuda_graphed(fn)
        except RuntimeError as e:  # not capturable: the eager time stands, and the record says so
            _stop_if_broken(e)
            graphed = False
            torch.cuda.synchronize(dev)
            print(f"{group}/{provider}: CUDA graph capture failed ({message_line(e, 120)}); eager time")
    stats = eager if (eager is not None and not graphed) else timing.time_fn(fn, dev, **timing_kw)

    def once():
        fn()
        timing.synchronize(dev)

    benchmark.group = group
    benchmark.pedantic(once, rounds=1, iterations=1, warmup_rounds=0)
    timer = ("cuda-events median" + (", L2 flushed" if timing_kw.get("flush_l2", True) else "")
             if dev.type == "cuda" else "perf_counter median")
    return record_row(benchmark.extra_info, stats, group=group, provider=provider, baseline=baseline, flops=flops,
                      bytes_moved=bytes_moved, shape=shape, dtype=dtype, device=dev, timer=timer,
                      cuda_graph=graphed, eager_time_ms=None if eager is None else eager["median_ms"])


def record_row(info: dict, stats: dict, *, group: str, provider: str, baseline: bool = False,
               flops: float | None = None, bytes_moved: float | None = None, shape=None, dtype=None,
               device=None, timer: str, **extra) -> dict:
    """Fills `info` (a benchmark's extra_info, or a dict of its own for a second row of one case) with a
    row's record from `stats` (a `maefast.timing` summary: median_ms, min_ms, p20_ms, p80_ms, reps), the
    throughput against the card's measured peak and the environment, plus `extra`; appends it to RESULTS
    and refreshes the ratios. Returns `info`."""
    dev = torch.device(device) if device is not None else bench_device()
    peak = timing.measure_peak(dev)
    info.update(provider=provider, group=group, baseline=bool(baseline), shape=_jsonable(shape),
                shape_key=_shape_key(shape), dtype=None if dtype is None else str(dtype).replace("torch.", ""),
                time_ms=stats["median_ms"], time_min_ms=stats["min_ms"], time_p20_ms=stats["p20_ms"],
                time_p80_ms=stats["p80_ms"], reps=stats["reps"], flops=flops, bytes_moved=bytes_moved,
                timer=timer, **extra)
    info.update(timing.throughput(stats["median_ms"], flops, bytes_moved, peak))
    info.update(timing.env_info(dev))
    RESULTS.append(info)
    update_ratios()
    return info


def other_rows(extra_infos: list[dict]) -> list[dict]:
    """The rows of this session that no benchmark's extra_info holds (a case that records two rows,
    such as bench_step's interleaved pair, hands the fixture one): the JSON keeps them beside its
    `benchmarks`, so every row a ratio names is in the file."""
    held = {id(e) for e in extra_infos}
    return [r for r in RESULTS if id(r) not in held]


def session_record() -> dict:
    """What the whole session adds to the JSON: environment, the measured peak, and the ratios."""
    dev = bench_device()
    update_ratios()
    rec = {"env": timing.env_info(dev), "gpu_sizes": _GPU_MODE}
    if RESULTS:
        rec["peak"] = timing.measure_peak(dev)
    return rec


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def summary_lines() -> list[str]:
    """A short table of this run (group, shape, provider, time, throughput, speed-up)."""
    if not RESULTS:
        return []
    update_ratios()
    env = timing.env_info(bench_device())
    lines = [f"maefast benchmarks on {env['card']} ({env['date']}, torch {env['torch']}, triton {env['triton']}, "
             f"commit {env['git_commit'][:12]})"]
    if timing._PEAK.get(str(bench_device())):
        p = timing._PEAK[str(bench_device())]
        lines.append(f"measured peak: copy {p['copy_gbps']:.0f} GB/s, {p['matmul_dtype']} matmul "
                     f"{p['matmul_tflops']:.3g} TFLOP/s")
    head = (f"{'group':<24} {'shape':<34} {'provider':<16} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'speedup':>8} "
            f"{'eager ms':>9} {'eager x':>8}")
    lines += [head, "-" * len(head)]
    for r in sorted(RESULTS, key=lambda r: (r["group"], r["shape_key"], not r.get("baseline"), r["provider"])):
        shape = r["shape_key"].replace('"', "").replace(" ", "")
        sp = r.get("speedup_vs_baseline")
        lines.append(f"{r['group'][:24]:<24} {shape[:34]:<34} {r['provider'][:16]:<16} {r['time_ms']:>9.3f} "
                     f"{_fmt(r.get('tflops'), '8.2f'):>8} {_fmt(r.get('gbps'), '8.1f'):>8} "
                     f"{(_fmt(sp, '.2f') + 'x') if sp is not None else '-':>8} "
                     f"{_fmt(r.get('eager_time_ms'), '9.3f'):>9} "
                     f"{(_fmt(r.get('eager_speedup_vs_baseline'), '.2f') + 'x') if r.get('eager_speedup_vs_baseline') else '-':>8}")
    return lines


def reset_peak_memory(device: torch.device) -> None:
    """Before a row is built: the card's peak measured first (`timing.measure_peak`, once per process: its
    ~2.25 GiB of copy and matmul buffers, allocated later beside a resident row, would be that row's
    high-water mark), the allocator's cache emptied and its peak statistics reset. No-op off CUDA."""
    if device.type != "cuda":
        return
    from maefast.bench import free_memory

    timing.measure_peak(device)
    free_memory()
    torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """The allocator's high-water marks since `reset_peak_memory`, GiB: `peak_mem_gib` (tensors allocated)
    and `peak_mem_reserved_gib` (segments reserved: also what the allocator holds for reuse, such as a
    captured step's private graph pool). {} off CUDA."""
    if device.type != "cuda":
        return {}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def op_timing(device: torch.device, rep_ms: float = 200.0) -> dict:
    """`run_bench` timing arguments of the per-op benchmarks: on CUDA ~rep_ms of repetitions after
    10 ms of warm-up; on the CPU a few calls (the interpreter's timings mean nothing)."""
    if device.type == "cuda":
        return dict(warmup_ms=10.0, rep_ms=rep_ms, min_reps=5, max_reps=int(rep_ms))
    return dict(warmup=1, min_reps=2, max_reps=5, budget_s=0.3)


def skip_unless_runs(provider: str, device: torch.device, cuda_binding: str) -> None:
    """pytest.skip with `provider_skip_reason`'s reason when the row cannot run here."""
    reason = provider_skip_reason(provider, device, cuda_binding)
    if reason:
        import pytest

        pytest.skip(reason)


def provider_skip_reason(provider: str, device: torch.device, cuda_binding: str) -> str | None:
    """Why an op benchmark's `provider` row cannot run on `device` (None: it can). Providers:
    reference, compile, maefast (auto; CPU only: on a GPU the triton/cuda rows are maefast),
    triton, cuda (needs `cuda_binding` in a built maefast._C)."""
    if provider == "compile" and device.type == "cpu" and os.environ.get("MAEFAST_BENCH_COMPILE_CPU") != "1":
        return "torch.compile on the CPU compiles for ~20 s; set MAEFAST_BENCH_COMPILE_CPU=1 to include it"
    if provider == "maefast" and device.type == "cuda":
        return "on a GPU the triton and cuda rows are the maefast impls"
    if provider == "triton":
        from maefast._triton import HAS_TRITON

        if device.type != "cuda" or not HAS_TRITON:
            return "Triton timings need a GPU (the CPU interpreter's are meaningless)"
    if provider == "cuda":
        from maefast._cpp_lib import get_C

        C = get_C()
        if device.type != "cuda" or C is None or not hasattr(C, cuda_binding):
            return "the CUDA C++ impl needs a GPU and a built maefast._C"
    return None
