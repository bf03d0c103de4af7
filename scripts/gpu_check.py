"""Driver of scripts/gpu_check.sh: presets that each fit in ~5 minutes of a lent GPU machine and write
their own record. A lent card gives ~15 minutes in all (1-2 of them to start it) and one command may
run 10, so a session runs two presets: in one call (`--preset step,profile --preset-budget 280`,
timeout_s 600), or two calls of one each.

    scripts/gpu_check.sh --preset step          # one preset
    scripts/gpu_check.sh --preset verify,ops    # several, in order, each with its own record
    scripts/gpu_check.sh --dry-run              # every preset, cheaply, no GPU (tests/test_gpu_check.py)

Presets (steps in priority order: the rows that decide a target of issue 14 first):
  verify  build maefast._C; scripts/capture_probe.py (a host sync refused before capture, the allocator
          whole after it); the `cuda` tests of tests/test_step_capture.py (TrainStep's captures), then the other
          `cuda`-marked tests, each in a process of its own; the dispatch diagnosis
  step    ViT-H/14 b128 step rows, in two budgets so that no compile starves the rest: reference and
          maefast's captured rows (+ ViT-B/16 b128's, the loader's target), then the decisive pair
          interleaved in one process (torch-native-graph, the baseline, against the faster of
          maefast-block-graph and maefast-graph just timed: alternating rounds, bench_step's
          test_train_step_pair) and maefast-compile-graph
  profile the torch.profiler kernel table of one captured ViT-H step and of the compiled torch-native
          one (the attention target); maefast-graph interleaved with maefast-sdpa-graph (the attention
          route); then the eager and compiled-eager step rows
  ops     per-op rows, both backends: attention at the four paper shapes vs every SDPA backend,
          the masking/embedding, un-shuffle and loss rows of the targets, the attention tile sweep,
          then the rest
  table2  Table 2 with maefast's step (L, H, then B); `maefast profile`'s overhead
  kernels the `device` tests (those taking the `device` fixture: every op and kernel against the
          reference on fresh random inputs, run on the CPU's Triton interpreter in CI) on the card,
          the ops the step presets time first: compiled code the interpreter cannot check
  data    build maefast._jpeg (the windowed JPEG reader; where libjpeg-turbo's headers are missing
          the loader reads with simplejpeg); `maefast bench data` (16 workers, 4000 JPEGs: the
          loader's img/s, the CPU path and the GPU decode, issue 15); `maefast train` on those JPEGs vs `--data synthetic`, ViT-L/16 b128
          (ratio >= 0.9, issue 15); `maefast train --data synthetic` ViT-H/14 b128 (>= 0.95x the
          step record's row, issue 14)

Each step runs in a subprocess under its own budget (scripts/gpu_runner.py: the budgets, the runner),
clipped to what is left of the preset's
(default 290 s; the step and profile presets' last steps, the compiled rows, take all that is left);
pytest steps stop starting cases near their deadline (scripts/pytest_deadline.py)
and benchmark rows are appended as they finish (MAEFAST_BENCH_ROWS), so a step cut short keeps what
it did. A failing step is recorded, never aborts the rest; a step stopped at its budget takes its whole
process group with it; the record is rewritten after every step and every 10 s during one, with the rows
the running step has finished (`complete` false until the preset ends, the running step's rc "running"; a
SIGTERM writes it too), and each step's output goes straight into the log, so a call the device tool kills,
even with SIGKILL, keeps what finished. Per preset, $OUT gets exactly
`<preset>-record.json` (environment with `uname -r`, card, date, commit from MAEFAST_COMMIT,
versions, preset, wall time; every step; every row; `targets`: the issue's figures next to their
thresholds) and `<preset>-log.txt` (+ `table2.png`); intermediate files stay in --work.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import gpu_record as rec  # noqa: E402
from gpu_runner import BUDGET, PRESET_BUDGET_S, RESERVE_S, Runner  # noqa: E402

PRESETS = ("verify", "step", "profile", "ops", "table2", "kernels", "data")

# verify's `cuda` tests in this order (333 of them on 2026-12-04; 180 took 74 s with 8 workers on
# 2026-11-27, so the step's deadline may skip the tail): the ops the step presets time, then the
# uint8 path (the training default), then the rest of tests/
VERIFY_TEST_ORDER = ("attention", "masking", "patch_embed", "loss", "unshuffle", "block", "fused", "graphs", "compile",
                     "model", "uint8", "uint8_model", "uint8_gpu", "validation", "attention_offsets", "attention_tiles")
STEP_TESTS = "tests/test_step_capture.py"  # verify runs TrainStep's captures apart, in a process of their own
STEP_MODEL = "huge:128"  # the targets: ViT-H/14, batch 128
LOADER_STEP_ROWS = "base:128@maefast-graph+maefast-block-graph"  # what the loader must keep up with
# bench_step rows: the ones the step targets are read from, then the rest that fits the preset (each
# compile row ~30-60 s); the patch and custom-op rows (maefast-patch, -patch-hf, -custom-op) are left
# to a run of benchmarks/bench_step.py of its own
STEP_DECISIVE = ("reference", "maefast-block-graph", "maefast-graph")  # no compile: each ~10 s once Triton is warm
# the baseline against maefast's fastest captured step, interleaved in one process: the
# step_vs_torch_native_paired target, and the only torch-native-graph timing of the preset (one compile).
# The pair decides the target, so it holds the step maefast ships: the faster of STEP_PAIRED_CANDIDATES in
# this run's step-rows (maefast-block-graph, 2026-12-04's fastest, where neither has a time)
STEP_PAIR = ("torch-native-graph", "maefast-block-graph")
STEP_PAIRED_CANDIDATES = ("maefast-block-graph", "maefast-graph")
STEP_COMPILED = ("maefast-compile-graph",)  # after the pair: no target without the baseline
# first maefast's captured step with its own attention and with torch's SDPA (no compile: ~10 s each),
# interleaved in one process: maefast's attention against cuDNN's with everything else equal (keep only
# what wins; gpu_record.attention_route); then the eager and compiled-eager rows
ROUTE_PAIR = ("maefast-graph", "maefast-sdpa-graph")
STEP_MORE = ("torch-native", "sdpa", "maefast", "maefast-block", "maefast-compile")
PROFILE_PROVIDERS = ("maefast-block-graph", "torch-native-graph")
# data preset: the benchmark's JPEG folder (issue 15: 16 workers, a few thousand files), ViT-L/16 at
# a batch that fits for the JPEG-vs-synthetic ratio, ViT-H/14 b128 for train vs the step row
DATA_IMAGES, DATA_WORKERS, TRAIN_WORKERS = 4000, 16, 15  # one core left to the training process
DIFF_IMAGES = 256  # bench data's pixel differences to the exact path (fast and gpu): ~2 s each
LOADER_MODEL, LOADER_BATCH, LOADER_STEPS = "large", 128, 130
# bench data's loader batch: its clock starts when the first wave (one batch a worker) has arrived; 4000
# images at 128 left 15 batches after it, each worker's second (~0.3 s timed), at 64 they leave 46
BENCH_DATA_BATCH = 64
# each JPEG linked this many times: 20000 entries, 156-step epochs (4000 files would make 31-step epochs,
# each starting with an empty pipeline: an artifact of the small folder, not of the loader)
LOADER_COPIES = 5
PREFETCH_FACTOR = 4  # maefast train's DataLoader: batches made ahead per worker, so the first
# TRAIN_WORKERS x PREFETCH_FACTOR steps may eat batches made during start-up and capture: not timed
HUGE_STEPS = 40


# -- presets -----------------------------------------------------------------------------------------

def ensure_built(r: Runner) -> None:
    """Builds maefast._C in place (sm_90); incremental (ninja: ~1 s when csrc is unchanged), so a warm
    machine's .so from an older tree is never reused."""
    if r.dry:
        r.run("build", [r.py, "-c", "import sys; sys.path.insert(0, 'csrc'); import build; "
                        "print(build.sources(), build.compile_flags()[:4])"])
        return
    env = {"MAEFAST_CUDA_ARCHS": os.environ.get("MAEFAST_CUDA_ARCHS", "90"),
           "MAEFAST_BUILD_JOBS": os.environ.get("MAEFAST_BUILD_JOBS", str(os.cpu_count() or 8))}
    r.run("build", [r.py, "csrc/build.py", "--inplace", "--build-dir", os.path.join(ROOT, "build", "gpu_check")], env)


def _cuda_tests(r: Runner, name: str, targets: list[str], marker: str = "cuda") -> dict | None:
    """The `marker` tests of `targets` in one pytest process (and its xdist workers); returns the junit
    summary (None on a dry run: the cases collected go in the step)."""
    xml = os.path.join(r.work, f"{name}.xml")
    if os.path.exists(xml):
        os.remove(xml)
    cmd = [r.py, "-m", "pytest", *targets, "-m", marker, "-q", "-p", "no:cacheprovider", "-p",
           "pytest_deadline", f"--junitxml={xml}", "-o", "junit_family=xunit1", "--durations=5"]
    if r.dry:
        cmd.append("--collect-only")
    else:
        import importlib.util
        workers = r.args.workers if r.args.workers >= 0 else (8 if importlib.util.find_spec("xdist") else 0)
        cmd += ["-n", str(workers)] if workers > 0 else []
    _, out = r.run(name, cmd)
    if r.dry:
        r.record["steps"][name]["collected"] = sum(1 for ln in out.splitlines() if "::" in ln)
        return None
    if r.record["steps"].get(name, {}).get("rc") == "skipped":  # not started: its note says why, kept
        return None
    return rec.junit_summary(xml)


def preset_verify(r: Runner) -> None:
    ensure_built(r)
    # first, each in a process of its own: a capture that fails inside its graph leaves torch 2.11's
    # CUDA allocator broken for the rest of its process (maefast/graphs.py), which must not take the
    # unrelated tests down with it
    pj = os.path.join(r.work, "capture-probe.json")
    cmd = [r.py, "-m", "py_compile", "scripts/capture_probe.py"] if r.dry else [r.py, "scripts/capture_probe.py", pj]
    r.json_step("capture-probe", cmd, pj, "capture_probe")
    checks = (r.record.get("capture_probe") or {}).get("checks") or {}
    if checks:
        r.record["steps"]["capture-probe"]["note"] = ", ".join(f"{k} {'ok' if c.get('ok') else 'FAILED'}"
                                                               for k, c in checks.items())
    s = _cuda_tests(r, "step-tests", [STEP_TESTS])
    if s is not None:
        r.record["step_tests"] = s
        r.record["steps"]["step-tests"]["note"] = (
            f"passed {s.get('passed')} failed {s.get('failed')} skipped {s.get('skipped')}"
            + "".join(f"\n      FAIL {f['test']}: {f['message'][:150]}" for f in s.get("failures", [])[:8]))
    paths = [p for p in _test_files(r) if p != STEP_TESTS]
    s = _cuda_tests(r, "tests", [*paths, f"--ignore={STEP_TESTS}"])
    if s is not None:
        r.record["tests"] = s
    dj = os.path.join(r.work, "diagnose.json")
    cmd = [r.py, "-m", "py_compile", "scripts/diagnose_dispatch.py"] if r.dry else \
        [r.py, "scripts/diagnose_dispatch.py", dj]
    r.json_step("diagnose", cmd, dj, "diagnose")


def _test_files(r: Runner) -> list[str]:
    """--tests' paths; the default: every file of tests/ named one by one (pytest sorts a folder's files,
    also when some are named beside it), VERIFY_TEST_ORDER's first."""
    paths = shlex.split(r.args.tests)
    if paths != ["tests"]:
        return paths
    first = [f"tests/test_{n}.py" for n in VERIFY_TEST_ORDER if os.path.exists(os.path.join(ROOT, f"tests/test_{n}.py"))]
    return first + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))
                          if os.path.relpath(p, ROOT) not in first)


def preset_kernels(r: Runner) -> None:
    ensure_built(r)
    s = _cuda_tests(r, "kernel-tests", _test_files(r), marker="device")
    if s is not None:
        r.record["tests"] = s


def step_pair(rows: list[dict]) -> tuple[str, str]:
    """STEP_PAIR's baseline against the fastest of STEP_PAIRED_CANDIDATES timed alone at STEP_MODEL in ``rows``
    (STEP_PAIR itself where none was)."""
    model, batch = STEP_MODEL.split(":")
    timed = [x for x in rows if x.get("group") == "train-step" and rec._is_shape(x, model, int(batch))]
    best = rec._fastest(timed, STEP_PAIRED_CANDIDATES)
    return (STEP_PAIR[0], best["provider"]) if best is not None else STEP_PAIR


def preset_step(r: Runner) -> None:
    common = {"MAEFAST_BENCH_STEP_MODELS": STEP_MODEL}
    # + ViT-B/16 b128's captured maefast rows: issue 15's loader target is the fastest model's step img/s
    first = {"MAEFAST_BENCH_STEP_MODELS": f"{STEP_MODEL},{LOADER_STEP_ROWS}"}
    # after each benchmark step and when a signal stops one: the targets of the rows measured so far
    r.summarize = lambda: r.record.update(targets={"step": rec.step_targets(r.record["rows"], STEP_MODEL)})
    r.pytest("step-rows", ["benchmarks/bench_step.py"], dict(common, MAEFAST_BENCH_STEP_PROVIDERS=",".join(STEP_DECISIVE),
                                                               **first))
    pair = step_pair(r.record["rows"])
    r.record["step_pair"] = "+".join(pair)
    r.pytest("step-compiled", ["benchmarks/bench_step.py"],
             dict(common, MAEFAST_BENCH_STEP_PROVIDERS=",".join(STEP_COMPILED), MAEFAST_BENCH_STEP_PAIR="+".join(pair)),
             note="the interleaved pair first; each whole-model torch.compile of ViT-H takes ~1 min (build_s in each "
             "row)", last=True)
    r.summary()  # (r.pytest made it after each step too; the preset's own last word)


def preset_profile(r: Runner) -> None:
    common = {"MAEFAST_BENCH_STEP_MODELS": STEP_MODEL}
    pj = os.path.join(r.work, "profile.json")
    model, batch = STEP_MODEL.split(":")
    cmd = [r.py, "scripts/profile_step.py", "--providers", ",".join(PROFILE_PROVIDERS), "--model", model, "--batch",
           batch, "--json", pj] + (["--dry-run"] if r.dry else [])
    # two profiler sessions in one process with CUDA graphs alive: CUPTI's teardown between them has
    # crashed the re-init (torch sets this itself only for Inductor's graphs on CUDA < 12.6)
    r.json_step("profile-kernels", cmd, pj, "profile", env={"TEARDOWN_CUPTI": "0"})
    # after step-more and when a signal stops it: the profile's target is already known by then
    r.summarize = lambda: _profile_summary(r)
    r.pytest("step-more", ["benchmarks/bench_step.py"],
             dict(common, MAEFAST_BENCH_STEP_PROVIDERS=",".join(STEP_MORE), MAEFAST_BENCH_STEP_PAIR="+".join(ROUTE_PAIR)),
             note="maefast-graph interleaved with maefast-sdpa-graph, then the eager and compiled-eager rows: each "
             "whole-model torch.compile of ViT-H takes ~1 min", last=True)
    r.summary()  # (r.pytest made it after the step too; the preset's own last word)


def _profile_summary(r: Runner) -> None:
    """The attention route from the rows so far; the profile's target (the step targets are the step preset's:
    its rows are captured; these eager rows are in "rows")."""
    r.record["attention_route"] = rec.attention_route(r.record["rows"], STEP_MODEL)
    prof = r.record.get("profile") or {}
    done = {x.get("provider") for x in prof.get("results", []) if x.get("attention_ms_per_step")}
    lacking = [p for p in PROFILE_PROVIDERS if p not in done]
    r.record["targets"] = {"attention_profile_ratio": rec.judge(
        "attention_profile_ratio", prof.get("attention_ms_ratio"),
        f"missing row: {', '.join(lacking)} (no attention time profiled)" if lacking else "no ratio in the profile")}


def ops_node_ids(r: Runner) -> list[str]:
    """The ops preset's benchmark cases in priority order (collected once, ordered by the rules below)."""
    files = ["benchmarks/bench_attention.py", "benchmarks/bench_masking.py", "benchmarks/bench_unshuffle.py",
             "benchmarks/bench_loss.py", "benchmarks/bench_block.py", "benchmarks/bench_fused.py"]
    # inside the preset's budget, as its steps are: a collection that hangs (an import waiting on the card)
    # must not run past it and take the next preset's minutes or the call's limit
    left = max(5.0, r.left())
    try:
        out = subprocess.run([r.py, "-m", "pytest", *files, "--collect-only", "-q", "-p", "no:cacheprovider", "--gpu"],
                             cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                             timeout=left)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"collecting the ops benchmarks did not end within the preset's {left:.0f} s "
                           "left") from None
    ids = [ln.strip() for ln in out.stdout.splitlines() if "::" in ln]
    if not ids:
        raise RuntimeError("collecting the ops benchmarks found nothing:\n" + (out.stdout + out.stderr)[-2000:])
    h14 = ("vit_h14-b256", "p14-b256")
    rules = [  # (why, predicate), first match decides a case's place
        ("attention vs every SDPA backend (targets)", lambda i: "bench_attention.py::test_attention[" in i),
        ("per-op targets, ViT-H/14 b256", lambda i: any(s in i for s in h14) and "-compile]" not in i and (
            "mask_embed_fwd_bwd" in i or "patch_gather" in i or "unshuffle_fwd_bwd" in i or "loss_masked_fwd_bwd" in i)),
        ("attention tile sweep", lambda i: "test_tile_sweep" in i),
        ("attention: official, math, split/pad", lambda i: "test_attention_more" in i),
        ("the other op rows at ViT-H/14 b256", lambda i: any(s in i for s in h14)),
        ("the rest", lambda i: True),
    ]
    ordered, seen = [], set()
    r.record["ops_order"] = []
    for why, pred in rules:
        chosen = [i for i in ids if i not in seen and pred(i)]
        seen.update(chosen)
        ordered += chosen
        r.record["ops_order"].append({"group": why, "cases": len(chosen)})
    return ordered


def preset_ops(r: Runner) -> None:
    ensure_built(r)  # the cuda rows need maefast._C
    try:
        ids = ops_node_ids(r)
    except Exception as e:  # noqa: BLE001
        r.record["steps"]["ops-rows"] = {"rc": 1, "seconds": 0.0, "budget_s": 0, "note": f"collection failed: {e}"}
        return
    r.pytest("ops-rows", ids)
    from maefast.kernels.attention_tiles import TILES, sweep_winners

    r.record["attention_tiles"] = sweep_winners(r.record["rows"])
    r.record["attention_table"] = {f"L{L} Dh{d}": {"fwd": e.fwd.name, "bwd": e.bwd.name, "source": e.source}
                                   for (L, d), e in TILES.items()}
    r.record["targets"] = {"attention": rec.attention_targets(r.record["rows"]), **rec.op_targets(r.record["rows"])}


def _find(d, key):
    if isinstance(d, dict):
        if key in d:
            yield d
        for v in d.values():
            yield from _find(v, key)
    elif isinstance(d, list):
        for v in d:
            yield from _find(v, key)


def preset_table2(r: Runner) -> None:
    tj, png = os.path.join(r.work, "table2.json"), os.path.join(r.args.out, "table2.png")
    # maefast's rows first (the targets are on them), for L, H, then B; rows are saved as they finish.
    # Batches where AdamW's fixed ~3/6 ms (L/H) is small beside the visible step; the whole-block op
    # so that the mask-token steps fit (ViT-H b192 with mask tokens: ~60 GB)
    # maefast's rows only: the official computation's are not a target (2026-11-27's record has them), took
    # ~40% of the time, and its ViT-H b192 mask-token step (~130 of the card's 140 GiB) risks an
    # out-of-memory inside a capture, which ends the process
    cmd = [r.py, "-m", "maefast", "bench", "table2", "--quick", "--models", "large,huge,base", "--impl",
           "auto", "--fused", "block", "--batch", "large=256,huge=192", "--json", tj, "--png", png, "--overwrite"]
    r.json_step("table2", r.job(cmd), tj, "table2")
    pj = os.path.join(r.work, "profile.json")
    # 30 staged/plain pairs: the overhead figure (target < 5%) is the median of their ratios
    cmd = [r.py, "-m", "maefast", "profile", "--steps", "30", "--json", pj, "--overwrite"]
    r.json_step("profile-overhead", r.job(cmd), pj, "profile")
    targets = {"table2": rec.table2_targets(r.record.get("table2"))}
    overheads = [d["profiler_overhead"] for d in _find(r.record.get("profile"), "profiler_overhead")
                 if d["profiler_overhead"] is not None]
    targets["profile_overhead"] = rec.judge("profile_overhead", max(overheads) if overheads else None,
                                            "missing: maefast profile wrote no profiler_overhead")
    r.record["targets"] = targets


def _train_cmd(r: Runner, name: str, data: str, model: str, batch: int, steps: int, extra=()) -> list[str]:
    """A short `maefast train` run for a figure: no checkpoint, export, plot or bar (a ViT-H checkpoint
    would be ~7.6 GB to write), a log line every 10 steps (steps.jsonl: the windowed img/s)."""
    return [r.py, "-m", "maefast", "train", "--data", data, "--model", model, "--batch-size", str(batch),
            "--max-steps", str(steps), "--epochs", "1", "--log-every", "10", "--workers", str(TRAIN_WORKERS),
            "--no-save", "--no-export", "--no-plot", "--no-progress", "--overwrite",
            "--output-dir", os.path.join(r.work, name), *extra]


def _train_step(r: Runner, name: str, cmd: list[str], batch: int, skip_steps: int) -> None:
    rc, out = r.run(name, r.job(cmd))
    rows = rec.read_rows(os.path.join(r.work, name, "steps.jsonl")) if not r.dry else []
    said = ("training step:", "batches:", "--compile", "done:", "error")
    m = re.search(r"([\d.]+) img/s after the first log window", out)
    r.record.setdefault("train", {})[name] = {
        "cmd": " ".join(cmd), "rc": rc, "lines": [ln for ln in out.splitlines() if ln.startswith("maefast train")
                                                and any(k in ln for k in said)][-6:],
        "img_per_s": rec.window_rate(rows, batch, skip_steps), "timed_after_step": skip_steps,
        "img_per_s_after_first_window": float(m.group(1)) if m else None}


def _linked_folder(src: str, dst: str, copies: int) -> None:
    """``dst`` holding ``copies`` symbolic links to each JPEG of ``src`` (other names: other crops)."""
    os.makedirs(dst, exist_ok=True)
    for f in sorted(os.listdir(src)):
        if f.endswith(".jpg"):
            for c in range(copies):
                link = os.path.join(dst, f"c{c}-{f}")
                if not os.path.lexists(link):
                    os.symlink(os.path.join(src, f), link)


def preset_data(r: Runner) -> None:
    jpegs, bj = os.path.join(r.work, "jpegs"), os.path.join(r.work, "bench-data.json")
    # the windowed JPEG reader (~0.1 s); where libjpeg-turbo's headers are missing the step fails saying so
    # and the loader reads with simplejpeg (the bench record names the reader)
    out = [] if not r.dry else ["--output", os.path.join(r.work, "_jpeg-dry-run.so")]
    r.run("build-jpeg", [r.py, "csrc/build.py", "--inplace", "--jpeg"] + out)
    # the loader's img/s: official, maefast's default path (fast decode, uint8) and the GPU decode (nvJPEG;
    # skipped with the reason where torchvision cannot decode on the card) at 16 workers; the per-worker rows
    # short (the CPU target is the CPU record's); the pixel difference to the exact path on a few hundred
    # images (the GPU decode's has no record yet)
    cmd = [r.py, "-m", "maefast", "bench", "data", "--workers", str(DATA_WORKERS), "--images", str(DATA_IMAGES),
           "--folder", jpegs, "--paths", "official,fast-uint8,gpu", "--batch", str(BENCH_DATA_BATCH), "--rounds", "1",
           "--per-worker-images", "200", "--loader-rounds", "1", "--diff-images", str(DIFF_IMAGES), "--json", bj,
           "--overwrite"]
    r.record["bench_data_cmd"] = " ".join(cmd)
    r.json_step("bench-data", r.job(cmd), bj, "bench_data")
    linked = os.path.join(r.work, "jpegs-linked")
    if not r.dry and os.path.isdir(jpegs):
        _linked_folder(jpegs, linked, LOADER_COPIES)
    skip = TRAIN_WORKERS * PREFETCH_FACTOR + 10
    n = DATA_IMAGES * LOADER_COPIES
    _train_step(r, "train-jpeg", _train_cmd(r, "train-jpeg", linked, LOADER_MODEL, LOADER_BATCH, LOADER_STEPS),
                LOADER_BATCH, skip)
    _train_step(r, "train-synthetic", _train_cmd(r, "train-synthetic", "synthetic", LOADER_MODEL, LOADER_BATCH,
                                                 LOADER_STEPS, ["--synthetic-size", str(n)]), LOADER_BATCH, skip)
    model, batch = STEP_MODEL.split(":")
    # all of its steps may be prefetched: this figure is the loop's overhead on the step, not the loader's
    _train_step(r, "train-huge", _train_cmd(r, "train-huge", "synthetic", model, int(batch), HUGE_STEPS,
                                            ["--synthetic-size", str(int(batch) * HUGE_STEPS)]), int(batch), 10)
    step_record = None
    path = r.args.step_record or os.path.join(r.args.out, "step-record.json")
    if os.path.isfile(path):
        with open(path) as f:
            step_record = json.load(f)
    r.record["step_record"] = path if step_record is not None else None
    r.record["targets"] = rec.data_targets(r.record, step_record, STEP_MODEL)


RUN = {"verify": preset_verify, "step": preset_step, "profile": preset_profile, "ops": preset_ops, "table2": preset_table2,
       "kernels": preset_kernels, "data": preset_data}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where the records go ($OUT on the device machine)")
    ap.add_argument("--work", default=None, help="intermediate files (default: ./out/gpu_check/work)")
    ap.add_argument("--preset", default=None, help=f"comma list of {', '.join(PRESETS)} or 'all' "
                                                    "(the default with --dry-run; required otherwise)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: every preset collects/parses, records written")
    ap.add_argument("--preset-budget", type=float, default=PRESET_BUDGET_S, help="seconds per preset")
    ap.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS", help="override a step's budget")
    ap.add_argument("--workers", type=int, default=-1, help="pytest-xdist workers for the tests (-1: 8 when installed)")
    ap.add_argument("--tests", default="tests", help="test paths/args of verify's tests step (space-separated)")
    ap.add_argument("--step-record", default=None, help="the data preset's train-vs-step ratio reads the step rows "
                    "from this record (default: OUT/step-record.json when a step preset wrote one)")
    args = ap.parse_args(argv)
    if args.preset is None and not args.dry_run:
        ap.error(f"--preset is required on a GPU run: one or more of {', '.join(PRESETS)} (each <= ~5 minutes)")
    names = list(PRESETS) if args.preset in (None, "all") else [p.strip() for p in args.preset.split(",") if p.strip()]
    bad = [p for p in names if p not in PRESETS]
    if not names:  # `--preset ""` (an unset shell variable): a call that would measure nothing and exit 0
        ap.error(f"--preset names no preset; presets: {', '.join(PRESETS)}")
    if bad:
        ap.error(f"unknown preset(s) {bad}; presets: {', '.join(PRESETS)}")
    if len(set(names)) < len(names):  # a preset's second run would overwrite the first's record
        ap.error(f"--preset: {sorted({p for p in names if names.count(p) > 1})} named twice; each writes one record")
    if not math.isfinite(args.preset_budget) or args.preset_budget <= RESERVE_S + 5:
        ap.error(f"--preset-budget: {args.preset_budget:g} s; give a number of seconds over {RESERVE_S + 5} (the last "
                 f"{RESERVE_S} are kept for the record, a step takes at least 5)")
    try:
        args.budget = {k: float(v) for k, v in (item.split("=") for item in args.budget)}
    except ValueError:
        ap.error("--budget takes STEP=SECONDS")
    if not all(math.isfinite(v) and v > 0 for v in args.budget.values()):
        ap.error("--budget: SECONDS must be a positive number")
    unknown = sorted(set(args.budget) - set(BUDGET))
    if unknown:
        ap.error(f"--budget: unknown step(s) {unknown}; steps: {', '.join(BUDGET)}")
    short = [f"{k}={v:g} (margin {BUDGET[k][1]} s)" for k, v in args.budget.items()
             if BUDGET[k][1] and v <= BUDGET[k][1]]
    if short:  # its pytest would start no case: the deadline is the budget less the margin (its longest case)
        ap.error(f"--budget: {', '.join(short)}: a pytest step's budget must exceed its margin, the time its "
                 "longest case takes")
    if not args.dry_run and rec.git_commit() == "unknown":  # a record that cannot name its commit is worthless
        print("gpu_check: refusing a GPU run with no commit to record (no .git here, MAEFAST_COMMIT unset or not a "
              "commit sha): run MAEFAST_COMMIT=<sha> scripts/gpu_check.sh ..., <sha> from `git rev-parse HEAD` in the "
              "checkout (+ '-dirty' when it has uncommitted changes)", file=sys.stderr)
        return 2
    args.work = args.work or os.path.join(ROOT, "out", "gpu_check", "work")
    failed = []
    current: list[Runner] = []

    def on_term(signum, frame):  # the device tool's time limit: the running step stops, the record stays
        if current:
            current[0].stop(signum)
        raise SystemExit(128 + signum)

    import signal

    signal.signal(signal.SIGTERM, on_term)
    for name in names:
        r = Runner(name, args)
        current[:] = [r]
        try:
            RUN[name](r)
        except Exception as e:  # noqa: BLE001 - our bug: still write what the preset has
            r.record["error"] = f"{type(e).__name__}: {e}"
            failed.append(name)
        record = r.finish()
        failed += [f"{name}/{s}" for s, st in record["steps"].items() if st["rc"] not in (0, "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
