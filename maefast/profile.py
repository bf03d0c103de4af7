"""`maefast profile`: where an MAE training step spends its time.

    maefast profile                      # small MAE, synthetic batch, on the CPU (or ViT-B on a GPU)
    maefast profile --model large --batch 64 --dtype bf16 --impl reference,auto --steps 20
    maefast profile --trace trace.json --json profile.json

Stages: masking+embed | encoder attention | encoder MLP/norms | decoder embed + un-shuffle |
decoder | head+loss | backward | optimizer. The model runs its own forward; F.linear/layer_norm/
conv2d and the maefast ops are wrapped during it to mark the stage boundaries by the parameters each
call reads (qkv/proj: attention; fc1/fc2/norms: MLP/norms; decoder_embed/mask_token: un-shuffle;
...), so the reference modules and maefast's fused path (which calls ops with the weights) are
profiled alike. On a GPU each boundary records a CUDA
event (or synchronises, with --sync), so a stage's time is its span on the GPU timeline; on the
CPU, perf_counter. Warm-up steps are excluded; the time per stage is the median over --steps
steps. Plain steps (no stage marks) alternate with the staged ones to report the profiler's
overhead (the median of the staged/plain pair ratios). FLOPs are the official model's (maefast.flops; maefast's
model does 0.2-1.5% fewer in all, but in masking+embed it embeds the K visible patches only, 1/4 of the stage's
count at mask ratio 0.75, and in head+loss runs the head on the L-K masked rows only: those two stages' TFLOP/s
and GB/s overstate its rates), bytes the minimum traffic of a fused implementation of that computation, so GB/s
is a lower bound (but for those two stages of maefast's model); the roofline note
compares each stage's arithmetic intensity with the ridge point of the card's *measured* peak.

Each profile also says what runs where: the backend each maefast op chose in the first step
(`BackendLog`). On the CPU impl="auto" runs every op's PyTorch reference (the Triton and CUDA C++
kernels need a CUDA GPU), so there the default profiles maefast's model alone, the output says so,
and a side-by-side run prints no speed-up: it would compare the same PyTorch ops with themselves.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from . import bench as mb
from . import flops as flops_mod
from . import timing
from .models.configs import check_config, model_config, resolve_model_name
from .step import TrainStep

STAGES = ["masking+embed", "encoder attention", "encoder MLP/norms", "decoder embed + un-shuffle", "decoder",
          "head+loss", "backward", "optimizer"]
COMPILED_STAGES = ["forward (compiled)", "backward", "optimizer"]


class StageClock:
    """Marks stage boundaries: CUDA events (or synchronise + perf_counter with sync=True) or perf_counter."""

    def __init__(self, device: torch.device, sync: bool = False, trace: bool = False):
        self.cuda = device.type == "cuda"
        self.sync = sync
        self.trace = trace
        self.marks: list = []
        self.current = None
        self.enabled = True
        self._rf = None
        # CUDA events are created once and reused step after step: creating one per mark (~60 marks a
        # ViT-B step) cost more host time than recording it, and on a launch-bound step that shows
        self._events: list = []
        self._used = 0

    def _event(self):
        if self._used == len(self._events):
            self._events.append(torch.cuda.Event(enable_timing=True))
        ev = self._events[self._used]
        self._used += 1
        return ev

    def switch(self, label):
        if not self.enabled or label == self.current:
            return
        if self._rf is not None:
            self._rf.__exit__(None, None, None)
            self._rf = None
        if self.cuda and not self.sync:
            ev = self._event()
            ev.record()
            self.marks.append((label, ev))
        else:
            if self.cuda:
                torch.cuda.synchronize()
            self.marks.append((label, time.perf_counter()))
        self.current = label
        if self.trace and label is not None:
            self._rf = torch.profiler.record_function(f"maefast::{label}")
            self._rf.__enter__()

    def durations(self) -> dict:
        """ms per stage for the marks so far (call after the last switch(None)); resets."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict = {}
        for (label, a), (_, b) in zip(self.marks[:-1], self.marks[1:]):
            if label is None:
                continue
            ms = a.elapsed_time(b) if (self.cuda and not self.sync) else (b - a) * 1e3
            out[label] = out.get(label, 0.0) + ms
        self.marks, self.current, self._used = [], None, 0
        return out


def stage_of_param(name: str) -> str | None:
    """The profile stage a parameter (official MAE state-dict name) belongs to."""
    n = name.removeprefix("model.").removeprefix("_orig_mod.")
    if n.startswith(("patch_embed.", "cls_token", "pos_embed", "encoder_mask_token")):
        return "masking+embed"
    if n.startswith("blocks."):
        return "encoder attention" if ".attn." in n else "encoder MLP/norms"
    if n.startswith("norm."):
        return "encoder MLP/norms"
    if n.startswith(("decoder_embed.", "mask_token", "decoder_pos_embed")):
        return "decoder embed + un-shuffle"
    if n.startswith(("decoder_blocks.", "decoder_norm.")):
        return "decoder"
    if n.startswith("decoder_pred."):
        return "head+loss"
    return None


# the functions whose weights tell the stage: torch's (what nn.Linear/LayerNorm/Conv2d call) and
# every maefast op (what the fused path calls with the weights directly)
_TORCH_FUNCS = ("linear", "layer_norm", "conv2d")


class StageMarks:
    """Context manager: while active, calls to F.linear / F.layer_norm / F.conv2d and to the
    `maefast.ops` entry points switch the clock's stage by whose parameters they read.

    qkv/proj -> encoder attention; norm1/norm2/fc1/fc2/norm -> encoder MLP/norms; decoder_embed/
    mask_token/decoder_pos_embed -> un-shuffle; decoder_blocks/decoder_norm -> decoder; decoder_pred
    -> head+loss; patch_embed/cls/pos -> masking+embed. Calls without parameters (masking,
    attention on qkv, the loss) stay in the current stage. Works for the reference modules and for
    maefast's fused path alike, at ~1 us per wrapped call (a TorchFunctionMode, which sees every
    tensor call, cost 15-25% of a ViT-B step on an H200). Active in the forward only.
    """

    def __init__(self, model: torch.nn.Module, clock: StageClock):
        self.clock = clock
        self.stage_by_id = {id(p): st for name, p in model.named_parameters()
                            if (st := stage_of_param(name)) is not None}
        self._saved: list = []

    def _wrap(self, fn):
        stage_by_id, clock = self.stage_by_id, self.clock

        def wrapped(*args, **kwargs):
            for a in args:
                st = stage_by_id.get(id(a)) if isinstance(a, torch.Tensor) else None
                if st is not None:
                    clock.switch(st)
                    break
            else:
                for a in kwargs.values():
                    st = stage_by_id.get(id(a)) if isinstance(a, torch.Tensor) else None
                    if st is not None:
                        clock.switch(st)
                        break
            return fn(*args, **kwargs)

        wrapped.__wrapped__ = fn
        return wrapped

    def __enter__(self):
        import torch.nn.functional as F

        targets = [(F, name) for name in _TORCH_FUNCS]
        try:
            from . import ops

            targets += [(ops, name) for name in getattr(ops, "__all__", dir(ops))
                        if not name.startswith("_") and callable(getattr(ops, name, None))
                        and not isinstance(getattr(ops, name), type)]
        except Exception:  # noqa: BLE001 - no ops (e.g. missing deps): the torch functions suffice
            pass
        for mod, name in targets:
            fn = getattr(mod, name)
            self._saved.append((mod, name, fn))
            setattr(mod, name, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()
        return False


class BackendLog:
    """Context manager: records which backend ("reference", "triton", "cuda") each maefast op runs on.

    It listens to the ops' own choice: while active, each loaded `maefast.ops` module's `_resolve`
    (or `choose_impl`, in a module without one) is wrapped, and its result is what the op runs (an
    op's `_resolve` refines `choose_impl`'s answer, e.g. the attention falls back to the reference
    for a head dim its kernel lacks). `ran` maps op module (e.g. "attention") -> {backend: calls}, a
    forward and a backward that each choose counting one call each. Not for compiled models (the
    wrappers would be traced).
    """

    def __init__(self):
        self.ran: dict[str, dict[str, int]] = {}
        self._depth = 0
        self._saved: list = []

    def _wrap(self, op: str, fn):
        log = self

        def wrapped(*args, **kwargs):
            log._depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                log._depth -= 1
            if log._depth == 0 and isinstance(out, str):
                counts = log.ran.setdefault(op, {})
                counts[out] = counts.get(out, 0) + 1
            return out

        wrapped.__wrapped__ = fn
        return wrapped

    def __enter__(self):
        try:
            from . import ops  # noqa: F401 - loads every op module
        except Exception:  # noqa: BLE001 - no ops (e.g. missing deps): nothing to record
            return self
        for name, mod in list(sys.modules.items()):
            if not name.startswith("maefast.ops.") or name.rsplit(".", 1)[1].startswith("_") or mod is None:
                continue
            # an op's _resolve is its last word where it has one (its own choose_impl calls, e.g. a
            # check of an explicit impl before _resolve runs, would count a backend that never ran)
            attr = "_resolve" if callable(getattr(mod, "_resolve", None)) else "choose_impl"
            fn = getattr(mod, attr, None)
            if callable(fn):
                self._saved.append((mod, attr, fn))
                setattr(mod, attr, self._wrap(name.rsplit(".", 1)[1], fn))
        return self

    def __exit__(self, *exc):
        for mod, attr, fn in reversed(self._saved):
            setattr(mod, attr, fn)
        self._saved.clear()
        return False


def cpu_note(device: torch.device) -> str | None:
    """What a profile on a device other than CUDA can and cannot show (None on CUDA)."""
    if device.type == "cuda":
        return None
    where = ("this machine has none (`maefast info`)" if not torch.cuda.is_available()
             else "pass --device cuda to profile them")
    dev = "CPU" if device.type == "cpu" else device.type
    return (f"On the {dev} impl=auto runs each maefast op's PyTorch reference: maefast's Triton and CUDA C++ kernels "
            f"need a CUDA GPU, and {where}. The stage times show where a {dev} step spends its time; they measure no "
            "speed-up of maefast's kernels.")


def _peak_mem_gib(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "CUDA max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS high-water (whole process)"


def _progress(total, desc, enabled):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, file=sys.stderr)


def _export_trace(prof, path: str) -> None:
    """The profiler's Chrome trace written under a temporary name beside ``path``, then renamed onto it: an
    interrupted write leaves the previous file (torch.profiler writes to a path, not a file object). The
    temporary keeps the name's ending (torch gzips a path ending in .gz) and the file a replaced one's mode;
    through a symbolic link, the file it points to (as every output: train.checkpoint.atomic_write_file)."""
    import tempfile

    path = os.path.realpath(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp" + (
        ".json.gz" if path.endswith(".gz") else ".json"), dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        from .train.checkpoint import file_mode

        prof.export_chrome_trace(tmp)
        os.chmod(tmp, file_mode(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def profile_impl(name: str, impl: str, *, batch: int, dtype: torch.dtype, device: torch.device, steps: int = 5,
                 warmup: int = 2, compile: bool = False, sync: bool = False, mask_ratio: float = 0.75,
                 trace: str | None = None, progress: bool = True, peak: dict | None = None, fused=False,
                 **overrides) -> dict:
    """Profiles one impl; returns the per-stage record (see the module docstring). fused: the fast
    model's `fused` (False | True | "block"; ignored for impl="reference")."""
    peak = peak or timing.measure_peak(device)
    extra = {"fused": fused} if fused and impl != "reference" else {}
    mb.cudnn_benchmark()  # as the official loop, `maefast train` and the benchmark rows
    model = mb.build_model(name, impl, device, **extra, **overrides)
    imgs = mb.synthetic_batch(model, batch, device)
    # eager (stage marks need the Python between the stages), the default AdamW as the official loop
    step = TrainStep(torch.compile(model) if compile else model, mb.adamw(model), dtype=dtype, mask_ratio=mask_ratio,
                     capture=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = StageClock(device, sync=sync)
    marks = None if compile else StageMarks(model, clock)

    def staged_step():
        if compile:
            clock.switch(COMPILED_STAGES[0])
            loss = step.forward(imgs)
        else:
            clock.switch("masking+embed")
            with marks:
                loss = step.forward(imgs)
        clock.switch("backward")
        step.backward(loss)
        clock.switch("optimizer")
        step.optimizer_step()
        clock.switch(None)

    def plain_step() -> float:
        # the same step without stage marks: the baseline for the profiler-overhead figure
        clock.enabled = False
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(imgs)
            b.record()
            torch.cuda.synchronize(device)
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            step(imgs)
            ms = (time.perf_counter() - t0) * 1e3
        clock.enabled = True
        return ms

    bar = _progress(warmup + steps, f"{impl}", progress)
    per_step, plain_ms_list, pair_ok = [], [], []
    backend_log = BackendLog()
    for i in range(warmup + steps):
        # staged and plain steps alternate, each first in every other pair, so that drift (clocks, other
        # load) and the order within a pair hit both alike
        timed = i >= warmup
        plain_first = timed and (i - warmup) % 2 == 1
        p = plain_step() if plain_first else None
        if i == 0 and not compile:  # what each op runs on, as the ops chose in the first step
            with backend_log:
                staged_step()
        else:
            staged_step()
        d = clock.durations()
        if i == 0:
            plain_step()  # untimed: the plain step's first call is not timed cold either
        if timed:
            per_step.append(d)
            plain_ms_list.append(p if plain_first else plain_step())
            pair_ok.append(i > 0)  # with --warmup 0 the first staged step is cold: not an overhead pair
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if trace:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        clock.trace = True
        with profile(activities=acts) as prof:
            for _ in range(2):
                staged_step()
                clock.durations()
        clock.trace = False
        _export_trace(prof, trace)
    mem, mem_how = _peak_mem_gib(device)
    labels = COMPILED_STAGES if compile else STAGES
    med = {s: statistics.median([d.get(s, 0.0) for d in per_step]) for s in labels}
    stage_sum = sum(med.values())
    staged_total = statistics.median([sum(d.values()) for d in per_step])
    f = flops_mod.mae_flops(model, mask_ratio=mask_ratio)
    elt = torch.finfo(dtype).bits // 8
    byt = flops_mod.stage_bytes(model, batch, act_bytes=elt, mask_ratio=mask_ratio)
    stage_flops = {k: v * batch for k, v in f["stage_fwd"].items()}
    # maefast.flops' rule: no patch-embedding input gradient
    stage_flops.update(backward=f["backward"] * batch, optimizer=0)
    fwd_bytes = sum(v for k, v in byt.items() if k != "optimizer")
    byt["backward"] = 2 * fwd_bytes
    if compile:
        stage_flops = {"forward (compiled)": f["forward"] * batch, "backward": stage_flops["backward"], "optimizer": 0}
        byt = {"forward (compiled)": fwd_bytes, "backward": 2 * fwd_bytes, "optimizer": byt["optimizer"]}
    ridge = timing.ridge_point(peak)
    rows = []
    for s in labels:
        ms = med[s]
        fl, by = stage_flops.get(s, 0), byt.get(s, 0)
        r = {"stage": s, "ms": ms, "share": ms / stage_sum if stage_sum else 0.0, "flops": fl, "bytes": by}
        if ms > 0:
            r.update(timing.throughput(ms, fl or None, by or None, peak))
        r["intensity"] = ai = fl / by if by else float("inf")
        r["bound"] = "compute" if ai > ridge else "memory"
        if ms > 0 and r["bound"] == "compute":
            r["note"] = f"compute-bound (AI {ai:.0f} > ridge {ridge:.0f}): {100 * r.get('frac_peak_flops', 0):.0f}% of matmul peak"
        elif ms > 0:
            r["note"] = f"memory-bound (AI {ai:.0f} < ridge {ridge:.0f}): {100 * r.get('frac_peak_bw', 0):.0f}% of copy BW"
        else:
            r["note"] = "not reached (no call read this stage's parameters)"
        rows.append(r)
    train_flops = f["train"] * batch
    plain_ms = statistics.median(plain_ms_list)
    # staged and plain steps alternate: the median of the per-pair ratios cancels slow drift (clocks,
    # temperature) that a ratio of the two medians keeps
    pairs = [sum(d.values()) / p for d, p, ok in zip(per_step, plain_ms_list, pair_ok) if ok and p > 0]
    pair_ratio = statistics.median(pairs) if pairs else None
    out = {"model": resolve_model_name(name) if not overrides else name, "impl": impl, "fused": extra.get("fused", False), "batch": batch,
           "dtype": str(dtype).replace("torch.", ""), "compile": compile, "mask_ratio": mask_ratio,
           "steps": steps, "warmup": warmup, "stage_timer": ("cuda-events" if not sync else "synchronise+perf_counter")
           if device.type == "cuda" else "perf_counter", "stages": rows, "step_ms_staged": staged_total, "step_ms_stage_sum": stage_sum,
           "step_ms_plain": plain_ms, "overhead_pairs": len(pairs),
           "profiler_overhead": pair_ratio - 1.0 if pairs else None,  # None: no warm pair (JSON has no NaN)
           "profiler_overhead_of_medians": staged_total / plain_ms - 1.0,
           "img_per_s": batch / (plain_ms * 1e-3), "train_flops": train_flops,
           "tflops": train_flops / (plain_ms * 1e-3) / 1e12,
           "mfu": train_flops / (plain_ms * 1e-3) / 1e12 / peak["matmul_tflops"], "peak_mem_gib": mem,
           "peak_mem_how": mem_how, "trace": trace, "device": device.type,
           "backends": backend_log.ran if not compile else None}
    del step, model, imgs
    mb.free_memory()
    return out


def _fmt_flops(v):
    return "-" if not v else f"{v / 1e9:.2f}"


def format_profile(r: dict, peak: dict) -> str:
    lines = [f"{r['model']}  impl={r['impl']}" + (f"  fused={r['fused']}" if r.get("fused") else "")
             + f"  batch={r['batch']}  {r['dtype']}" + ("  compiled" if r["compile"] else "")
             + f"  ({r['steps']} steps after {r['warmup']} warm-up, median; stage timer: {r['stage_timer']})"]
    lines += format_backends(r)
    head = f"{'stage':<28} {'ms':>9} {'share':>6} {'GFLOP':>9} {'TFLOP/s':>8} {'GB/s':>8}  roofline"
    lines += [head, "-" * (len(head) + 40)]
    for s in r["stages"]:
        lines.append(f"{s['stage']:<28} {s['ms']:>9.3f} {100 * s['share']:>5.1f}% {_fmt_flops(s['flops']):>9} "
                     f"{(format(s['tflops'], '.3f') if 'tflops' in s else '-'):>8} "
                     f"{(format(s['gbps'], '.1f') if 'gbps' in s else '-'):>8}  {s['note']}")
    lines.append(f"{'sum of stage medians':<28} {r['step_ms_stage_sum']:>9.3f}")
    lines.append(f"{'step (stage-timed, median)':<28} {r['step_ms_staged']:>9.3f}")
    overhead = (f"{100 * r['profiler_overhead']:+.1f}% (median of {r.get('overhead_pairs', 'the')} staged/plain pairs)"
                if r['profiler_overhead'] is not None else "n/a (no warm pair: run more --steps)")
    lines.append(f"{'step (plain, no marks)':<28} {r['step_ms_plain']:>9.3f}   profiler overhead {overhead}")
    lines.append(f"{r['img_per_s']:.1f} img/s, {r['tflops']:.3f} TFLOP/s = MFU {100 * r['mfu']:.1f}% of the measured "
                 f"{peak['matmul_dtype']} matmul peak {peak['matmul_tflops']:.3g} TFLOP/s (model FLOPs: official count, "
                 f"forward + backward without the images' gradient); peak memory {r['peak_mem_gib']:.2f} GiB "
                 f"({r['peak_mem_how']})")
    return "\n".join(lines)


def format_backends(r: dict) -> list[str]:
    """'what runs where' lines of one profile: each maefast op's backend, as the ops chose."""
    dev = r.get("device", "?")
    if r.get("backends") is None:
        return ["what runs where: not recorded under --compile (the ops' choice is traced, not called)"]
    if not r["backends"]:
        return [f"what runs where: no maefast op ran; every stage is torch's own ops on {dev}"]

    def ran(counts: dict) -> str:  # the backend; with call counts only where an op ran on more than one
        return "/".join(f"{b} x{n}" if len(counts) > 1 else b for b, n in counts.items())

    ops = ", ".join(f"{op} {ran(counts)}" for op, counts in r["backends"].items())
    return [f"what runs where: maefast ops on {dev}: {ops}; the rest (Linear GEMMs, torch's LayerNorm/GELU, AdamW) "
            f"is torch on {dev}"]


def format_side_by_side(results: list[dict]) -> str:
    names = [r["impl"] + (" (compiled)" if r["compile"] else "") for r in results]
    w = max([14] + [len(n) for n in names])  # a column as wide as its name ("reference (compiled)" was cut)
    head = f"{'stage (ms)':<28} " + " ".join(f"{n:>{w}}" for n in names)
    lines = ["side by side:", head, "-" * len(head)]
    labels = list(dict.fromkeys(s["stage"] for r in results for s in r["stages"]))
    for lab in labels:
        vals = []
        for r in results:
            m = {s["stage"]: s["ms"] for s in r["stages"]}
            vals.append(f"{m[lab]:>{w}.3f}" if lab in m else f"{'-':>{w}}")
        lines.append(f"{lab:<28} " + " ".join(vals))
    lines.append(f"{'step (plain)':<28} " + " ".join(f"{r['step_ms_plain']:>{w}.3f}" for r in results))
    lines.append(f"{'img/s':<28} " + " ".join(f"{r['img_per_s']:>{w}.1f}" for r in results))
    base = results[0]["step_ms_plain"]
    if all(r.get("device") == "cuda" for r in results):
        ratios = " ".join(f"{base / r['step_ms_plain']:>{w - 1}.2f}x" for r in results)
        lines.append(f"{'speed-up vs ' + results[0]['impl']:<28} " + ratios)
    else:  # every impl ran PyTorch ops here: a ratio would compare the reference with itself plus overhead
        lines.append(f"no speed-up row: on {results[0].get('device')} every impl runs PyTorch ops (see 'what runs "
                     "where'); maefast's kernels need a CUDA GPU")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .cli import OneLineParser

    p = OneLineParser(prog="maefast profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="small (CPU default), base (GPU default), large, huge, tiny, ...")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on the CPU, 64 on a GPU")
    p.add_argument("--dtype", default=None, help="fp32 (CPU default), bf16 (GPU default), fp16")
    p.add_argument("--impl", default=None, help="comma list, profiled side by side (reference, auto, triton, "
                   "cuda, sdpa); default on a GPU: reference,auto (the official computation and maefast's model, with "
                   "the speed-up); on the CPU: auto alone (its ops run their PyTorch reference there)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on the CPU, 10 on a GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (stages: forward/backward/optimizer)")
    p.add_argument("--fused", default="off", choices=["off", "block"],
                   help="the fast model's blocks (see maefast train --fused); with 'block' each block is one op, "
                        "so its attention time is counted in the block's norm/MLP stage")
    p.add_argument("--sync", action="store_true", help="GPU: synchronise at each stage boundary instead of events")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of the patches removed (default 0.75)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--trace", default=None, help="write a Chrome trace (torch.profiler) of 2 steps here")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--overwrite", action="store_true", help="replace --json / --trace files that exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (1 is steadier on a busy machine)")
    a = p.parse_args(argv)
    from .cli import (check_distinct_outputs, check_impls, check_json_name, check_mask_ratio_flag, check_out_file,
                      labelled_path, positive)

    # every option checked before any work (an error one line, exit 2: maefast.cli.guarded)
    for flag, v, zero in (("--batch", a.batch, False), ("--steps", a.steps, False), ("--warmup", a.warmup, True),
                          ("--threads", a.threads, False)):
        positive(flag, v, allow_zero=zero)
    device = mb.parse_device(a.device)
    on_cpu = device.type == "cpu"
    name = a.model or ("small" if on_cpu else "base")
    check_mask_ratio_flag(a.mask_ratio, check_config(model_config(name)))  # on the model's patch count
    batch = a.batch if a.batch is not None else (8 if on_cpu else 64)
    dtype = mb.parse_dtype(a.dtype) if a.dtype else (torch.float32 if on_cpu else torch.bfloat16)
    steps = a.steps if a.steps is not None else (5 if on_cpu else 10)
    # on a GPU: maefast's model beside the official computation (the speed-up); elsewhere maefast's model
    # alone, since both would run the same PyTorch ops
    impl_arg = a.impl or ("auto" if on_cpu else "reference,auto")
    impls = [v.strip() for v in impl_arg.split(",") if v.strip()]
    check_impls(impls, a.impl, a.fused, device=device)
    # one trace per impl when there are several: trace.json -> trace.auto.json, t.json.gz -> t.auto.json.gz
    traces = {i: a.trace if len(impls) == 1 or not a.trace else labelled_path(a.trace, i) for i in impls}
    check_json_name("--json", a.json)
    check_out_file("--json", a.json, a.overwrite)
    for t in dict.fromkeys(traces.values()):
        check_out_file("--trace", t, a.overwrite)
    check_distinct_outputs({"--json": a.json, **{f"--trace ({i})": t for i, t in traces.items()}})
    if a.threads:
        torch.set_num_threads(a.threads)
    if on_cpu and not a.model:
        print(f"CPU: small config by default (mae_vit_small_cpu, batch {batch}, {str(dtype).replace('torch.', '')}, "
              "synthetic batch); --model base|large|huge for the paper's", file=sys.stderr)
    note = cpu_note(device)
    timing.use_device(device)  # --device cuda:N: events, synchronisations and the peak on that card
    env, peak = timing.env_info(device), timing.measure_peak(device)
    print(f"maefast profile on {env['card']} ({env['date']}, torch {env['torch']}, commit {env['git_commit'][:12]}); "
          f"measured peak: {peak['matmul_dtype']} matmul {peak['matmul_tflops']:.3g} TFLOP/s, copy "
          f"{peak['copy_gbps']:.0f} GB/s (ridge {timing.ridge_point(peak):.0f} FLOP/B)")
    if note:
        print(note)
    results = []

    def save(complete: bool) -> None:  # after each impl, atomically: a run killed at a deadline keeps its rows
        if a.json:
            from .train.checkpoint import atomic_write_text
            atomic_write_text(a.json, json.dumps({"kind": "maefast.profile", "env": env, "peak": peak, "note": note,
                                                  "results": results, "complete": complete}, indent=2))

    for impl in impls:
        trace = traces[impl]
        try:
            r = profile_impl(name, impl, batch=batch, dtype=dtype, device=device, steps=steps, warmup=a.warmup,
                             compile=a.compile, sync=a.sync, mask_ratio=a.mask_ratio, trace=trace,
                             progress=not a.no_progress, peak=peak,
                             fused={"off": False, "block": "block"}[a.fused])
        except ValueError as e:  # one line and exit 2 (maefast.cli.guarded); the finished impls' JSON is saved
            raise ValueError(f"impl {impl}: {e}") from None
        results.append(r)
        save(complete=False)
        print()
        print(format_profile(r, peak))
        if trace:
            print(f"trace: {trace}")
    if len(results) > 1:
        print()
        print(format_side_by_side(results))
    if a.json:
        save(complete=True)
        print(f"json: {a.json}")
    return 0
