"""Honest timing shared by `maefast profile`, `maefast bench` and `benchmarks/`.

On CUDA: CUDA events around each call, warm-up first, the L2 cache flushed between calls, median
reported (the `triton.testing.do_bench` recipe, without needing triton). On the CPU:
`time.perf_counter` over a few calls. Also the environment record (card, date, versions, git
commit) and the card's *measured* peak (device-to-device copy GB/s, dense matmul TFLOP/s), measured
once per process. Nothing here touches CUDA at import time.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import platform
import statistics
import time
from typing import Callable, Sequence

import torch

from ._commit import git_commit, runtime


def synchronize(device: torch.device | str | None = None) -> None:
    """Waits for the device (no-op on the CPU)."""
    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """torch's intra-op thread count set to `n` inside the block and restored after (one thread: a
    DataLoader worker's setting, and steadier than oversubscribed threads on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _summary(times_ms: list[float]) -> dict:
    ts = sorted(times_ms)
    q = lambda p: ts[min(len(ts) - 1, int(p * (len(ts) - 1) + 0.5))]  # noqa: E731
    return {"median_ms": statistics.median(ts), "min_ms": ts[0], "p20_ms": q(0.2), "p80_ms": q(0.8),
            "mean_ms": sum(ts) / len(ts), "reps": len(ts)}


_L2_FLUSH: dict = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    # 256 MiB > the L2 of any current card (H100 50 MB, H200 60 MB, B200 126 MB).
    key = str(device)
    if key not in _L2_FLUSH:
        _L2_FLUSH[key] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    return _L2_FLUSH[key]


def release_flush_buffers() -> None:
    """Drops the L2-flush buffers (256 MiB a device; the next flushed timing makes one again): kept, one
    allocated by per-op rows would count in the peak memory of a step row measured later in the process."""
    _L2_FLUSH.clear()


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5,
              max_reps: int = 1000, flush_l2: bool = True, device=None) -> dict:
    """Median time of `fn()` on ``device``'s current CUDA stream (do_bench-style). Returns a dict of ms stats."""
    device = torch.device(device if device is not None else "cuda")
    with torch.cuda.device(device):  # the events go to the stream fn runs on, not the current device's
        return _time_cuda(fn, warmup_ms, rep_ms, min_reps, max_reps, flush_l2, device)


def _time_cuda(fn, warmup_ms, rep_ms, min_reps, max_reps, flush_l2, device) -> dict:
    cache = _flush_buffer(device) if flush_l2 else None
    fn()
    torch.cuda.synchronize(device)
    # estimate one call to size warm-up and repetitions by time
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        if cache is not None:
            cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    est = max(start.elapsed_time(end) / 3, 1e-3)
    n_warm = max(1, int(warmup_ms / est))
    n_rep = max(min_reps, min(max_reps, int(rep_ms / est)))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        if cache is not None:
            cache.zero_()  # cold L2 for every call, like do_bench
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


def use_device(device: torch.device) -> None:
    """A CLI's CUDA work (events, synchronisations, the peak) on the card it was asked for: ``cuda:N``
    becomes the current device; plain ``cuda`` (the current one) and the CPU change nothing."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def time_cpu(fn: Callable[[], object], *, warmup: int = 1, min_reps: int = 3, max_reps: int = 20,
             budget_s: float = 0.5) -> dict:
    """Median wall time of `fn()` on the CPU: `warmup` calls, then at least `min_reps` calls and at
    most `max_reps`, stopping once `budget_s` is spent."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def time_interleaved(fns: Sequence[Callable[[], object]], device=None, *, rounds: int = 8,
                     round_ms: float = 500.0, warmup_ms: float = 200.0) -> list[dict]:
    """Times several functions in alternation, for a comparison that the card's clock, its temperature
    or another tenant cannot bias: `rounds` rounds, each running every fn back to back for ~`round_ms`
    (a whole number of calls, at least one, sized from the second of two calls: the first may compile),
    in the given order in even rounds and reversed in odd ones (A B, B A, ...: a drift during the run
    weighs on both alike). One time per fn and round: its
    calls' total over their count (CUDA events around the round's calls, no L2 flush: for whole training
    steps, where the next call's inputs are what a real loop leaves; perf_counter on the CPU).

    Returns one dict per fn, in order: `_summary` of its round times (median_ms, min_ms, p20_ms, p80_ms,
    mean_ms, reps = rounds) plus `rounds_ms` (the times in round order) and `calls_per_round`. The
    ratio of two fns is best taken per round (`rounds_ms` side by side), each pair timed seconds apart.
    """
    fns = list(fns)
    if not fns or not all(callable(f) for f in fns):
        raise TypeError("fns must be a non-empty sequence of callables")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    for name, v in (("round_ms", round_ms), ("warmup_ms", warmup_ms)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"

    def timed(fn, n: int) -> float:
        """ms per call of n back-to-back calls."""
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize(dev)
            return start.elapsed_time(end) / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1e3 / n

    ctx = torch.cuda.device(dev) if cuda else contextlib.nullcontext()
    with ctx:  # the events go to the stream the fns run on
        calls = []
        for fn in fns:  # one call each that is not timed (a lazy compile, e.g. after another fn's
            # torch._dynamo.reset(), happens there), one that sizes the rounds, then the warm-up
            timed(fn, 1)
            est = max(timed(fn, 1), 1e-3)
            n_warm = int(warmup_ms / est)
            if n_warm:
                timed(fn, n_warm)
            calls.append(max(1, int(round_ms / est + 0.5)))
        times: list[list[float]] = [[] for _ in fns]
        for r in range(rounds):
            order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
            for i in order:
                times[i].append(timed(fns[i], calls[i]))
    return [dict(_summary(ts), rounds_ms=ts, calls_per_round=n) for ts, n in zip(times, calls)]


def time_fn(fn: Callable[[], object], device=None, **kw) -> dict:
    """`time_cuda` for a CUDA device, else `time_cpu`. Extra keywords go to the chosen one."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        keys = ("warmup_ms", "rep_ms", "min_reps", "max_reps", "flush_l2")
        return time_cuda(fn, device=dev, **{k: v for k, v in kw.items() if k in keys})
    keys = ("warmup", "min_reps", "max_reps", "budget_s")
    return time_cpu(fn, **{k: v for k, v in kw.items() if k in keys})


# -- environment record --------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_ENV: dict = {}


def env_info(device=None) -> dict:
    """card, date (UTC), torch/triton/CUDA versions, git commit, python, the machine's runtime (`uname_r`,
    `runtime`: gVisor, Firecracker; scripts/gpu_record.py records the same); cached per device."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = str(dev)
    if key not in _ENV:
        try:
            import triton
            triton_v = triton.__version__
        except Exception:  # noqa: BLE001 - absent or broken triton is a fact to record
            triton_v = None
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            card = props.name
            extra = {"sm": f"{props.major}.{props.minor}", "gpu_mem_gib": round(props.total_memory / 2**30, 1),
                     "sm_count": props.multi_processor_count}
        else:
            card = f"CPU: {_cpu_name()}"
            extra = {"threads": torch.get_num_threads()}
        _ENV[key] = {"card": card, "device": dev.type, "date": datetime.datetime.now(datetime.timezone.utc)
                     .strftime("%Y-%m-%dT%H:%M:%SZ"), "torch": torch.__version__, "triton": triton_v,
                     "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": git_commit(),
                     **runtime(), **extra}
    return dict(_ENV[key])


# -- measured peak -------------------------------------------------------------------------------

_PEAK: dict = {}


# dense bf16 tensor-core TFLOP/s of the data sheets (no sparsity), by a part of the device name;
# the first that matches (so "H100 PCIe" before "H100")
SPEC_BF16_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H100", 989.4),
                    ("A100", 312.0), ("GB200", 2500.0), ("B200", 2250.0))


def spec_bf16_tflops(name: str) -> float | None:
    return next((v for part, v in SPEC_BF16_TFLOPS if part in name), None)


# (fp32 elements copied, matmul dtype, matmul shapes (M, K, N)): 1 GiB of fp32 on a card; 32 MiB on the CPU
_PEAK_SETUP = {"cuda": (2**28, torch.bfloat16, ((8192, 8192, 8192), (8320, 1280, 5120))),
               "cpu": (2**23, torch.float32, ((1024, 1024, 1024),))}


def measure_peak(device=None) -> dict:
    """The card's measured peak, once per process per device.

    copy_gbps: a large device-to-device copy (read + write bytes / time); matmul_tflops: the fastest
    of the timed calls of dense matmuls (bf16 on CUDA: 8192^3 and ViT-H/14's MLP product at batch 128,
    8320 x 1280 x 5120; fp32 on the CPU, 1024^3, where bf16 is not the fast path). The fastest, not
    the median: one H200 read 695 and 794 TFLOP/s in two runs (a median under a clock still ramping
    understates the peak, which overstates every fraction of it). matmul_spec_tflops: the data
    sheet's dense bf16 figure where the card is known (`SPEC_BF16_TFLOPS`), for reference.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = str(dev)
    if key in _PEAK:
        return dict(_PEAK[key])
    n_copy, mm_dtype, shapes = _PEAK_SETUP["cuda" if dev.type == "cuda" else "cpu"]
    src = torch.empty(n_copy, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    # long warm-up: a cold GPU ramps its clocks
    kw = dict(warmup_ms=200.0, rep_ms=200.0, min_reps=5, flush_l2=False, budget_s=0.3)
    t_copy = time_fn(functools.partial(dst.copy_, src), dev, **kw)["median_ms"]
    del src, dst
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=dev, dtype=mm_dtype)
        b = torch.randn(k, n, device=dev, dtype=mm_dtype)
        t_mm = time_fn(functools.partial(torch.matmul, a, b), dev, **kw)["min_ms"]
        best = max(best, 2 * m * k * n / (t_mm * 1e-3) / 1e12)
        del a, b
    out = {"copy_gbps": 2 * n_copy * 4 / (t_copy * 1e-3) / 1e9, "matmul_tflops": best,
           "matmul_dtype": str(mm_dtype).replace("torch.", ""), "matmul_n": shapes[0][0],
           "matmul_shapes": [list(s) for s in shapes], "copy_bytes": n_copy * 4,
           "how": "measured: median device-to-device copy_; the fastest call of the matmuls"}
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # hand the 2 GiB back before the benchmarks allocate
        out["matmul_spec_tflops"] = spec_bf16_tflops(torch.cuda.get_device_name(dev))
    _PEAK[key] = out
    return dict(out)


def throughput(time_ms: float, flops: float | None = None, bytes_moved: float | None = None,
               peak: dict | None = None) -> dict:
    """TFLOP/s and/or GB/s for one call of `time_ms`, and the fraction of the measured peak (and of the
    data sheet's, `frac_spec_flops`, where the card is known)."""
    out: dict = {}
    s = time_ms * 1e-3
    if flops:
        out["tflops"] = flops / s / 1e12
        if peak and peak.get("matmul_tflops"):
            out["frac_peak_flops"] = out["tflops"] / peak["matmul_tflops"]
        if peak and peak.get("matmul_spec_tflops"):
            out["frac_spec_flops"] = out["tflops"] / peak["matmul_spec_tflops"]
    if bytes_moved:
        out["gbps"] = bytes_moved / s / 1e9
        if peak and peak.get("copy_gbps"):
            out["frac_peak_bw"] = out["gbps"] / peak["copy_gbps"]
    return out


def speedup(base: dict, row: dict) -> float | None:
    """``base``'s time / ``row``'s of two benchmark records, like with like: as timed when both are
    CUDA-graph replays or both eager; when only one could be captured, the two eager times (None when
    either has none)."""
    if bool(base.get("cuda_graph")) == bool(row.get("cuda_graph")):
        return base["time_ms"] / row["time_ms"] if base.get("time_ms") and row.get("time_ms") else None
    theirs = base.get("eager_time_ms") or (base.get("time_ms") if not base.get("cuda_graph") else None)
    mine = row.get("eager_time_ms") or (row.get("time_ms") if not row.get("cuda_graph") else None)
    return theirs / mine if theirs and mine else None


def best_rival(rivals: list[dict], row: dict) -> tuple[dict, float] | None:
    """The rival record ``row`` compares worst against (`speedup`, like with like), and that speedup."""
    pairs = [(o, speedup(o, row)) for o in rivals]
    pairs = [(o, x) for o, x in pairs if x is not None]
    return min(pairs, key=lambda p: p[1]) if pairs else None


def ridge_point(peak: dict) -> float:
    """FLOP/byte at which the measured roofline turns from memory- to compute-bound."""
    return peak["matmul_tflops"] * 1e12 / (peak["copy_gbps"] * 1e9)
