"""scripts/gpu_check.py's presets and records, without a GPU: the dry run writes one record per
preset, a real run demands a preset, each step's budget and deadline, benchmark rows and the record
survive a run cut short (a signal, a step at its budget). The verdicts read off the rows:
tests/test_gpu_record.py."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_record as rec  # noqa: E402
import gpu_runner  # noqa: E402


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


# every preset's dry run, in the tests below: CI runs none of its own (test_each_dry_run_is_complete)
DRY_RUNS = ("table2,data", "verify", "kernels", "step,profile", "ops")


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory, request):
    """`scripts/gpu_check.sh --dry-run --preset PRESETS` (the card's command, through its wrapper) once per
    test session: `dry_run(presets)` gives (the folder its records went to, what it printed). Each takes
    5-25 s (collecting and parsing every step's command), so the pytest-xdist workers share them: the first
    to ask runs it under a lock, the others read its records (read-only: a test that changed them would
    change the others')."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    worker = getattr(request.config, "workerinput", None)  # a worker's base temp is <the run's>/popen-gwN
    root = (base.parent / f"gpu-check-dry-runs-{worker['testrunuid']}") if worker else (base / "gpu-check-dry-runs")
    root.mkdir(exist_ok=True)
    # the wrapper runs `python3`: this interpreter's
    env = dict(_env(), PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))

    def run(presets: str):
        assert presets in DRY_RUNS, f"add {presets!r} to DRY_RUNS"
        here = root / presets.replace(",", "+")
        with open(root / f"{here.name}.lock", "w") as lock:  # one lock per dry run: others run meanwhile
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (here / "rc").exists():
                here.mkdir(exist_ok=True)
                try:
                    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--work",
                                        str(here / "work"), "--dry-run", "--preset", presets], capture_output=True,
                                       text=True, env=dict(env, OUT=str(here / "out")), timeout=600)
                    rc, printed, failed = str(r.returncode), r.stdout, (r.stdout + r.stderr)[-3000:]
                except subprocess.TimeoutExpired as e:
                    rc, printed, failed = "timeout", "", f"the dry run of {presets} took over {e.timeout} s"
                (here / "printed.txt").write_text(printed)
                (here / "failed.txt").write_text(failed)
                (here / "rc").write_text(rc)  # last: the others wait for it
        assert (here / "rc").read_text() == "0", (here / "failed.txt").read_text()
        return here / "out", (here / "printed.txt").read_text()

    return run


def _runner(tmp_path, monkeypatch, preset_budget=60.0, budget=None, dry_run=False, preset="step"):
    """gpu_check's Runner for `preset` as its command line would build it, writing under tmp_path."""
    import argparse

    import gpu_check

    # no torch import, CUDA or nvidia-smi on the clock; what the printed summary needs
    monkeypatch.setattr(gpu_check.rec, "environment", lambda: {"date": "2026-12-06", "commit": "0123456"})
    return gpu_check.Runner(preset, argparse.Namespace(dry_run=dry_run, work=str(tmp_path / "work"),
                                                       out=str(tmp_path / "out"), preset_budget=preset_budget,
                                                       budget=budget or {}))


def test_gpu_run_needs_a_preset_and_known_names(tmp_path):
    for args, msg in (([], "--preset is required"), (["--preset", "steps"], "unknown preset")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--out", str(tmp_path),
                            *args], capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_gpu_run_refuses_a_tree_without_a_commit(tmp_path):
    """The GPU machine's copy has no .git: without MAEFAST_COMMIT a run would write records naming no
    commit, so it refuses before anything starts (one line, exit 2); a dry run needs no commit."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "maefast").mkdir()
    for rel in ("scripts/gpu_check.py", "scripts/gpu_runner.py", "scripts/gpu_record.py", "maefast/_commit.py"):
        (tmp_path / rel).write_text(open(os.path.join(ROOT, rel)).read())
    env = {k: v for k, v in _env().items() if k != "MAEFAST_COMMIT"}
    cmd = [sys.executable, str(tmp_path / "scripts" / "gpu_check.py"), "--out", str(tmp_path / "out"),
           "--preset", "step"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "MAEFAST_COMMIT" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()  # nothing started, no record written


def test_dry_run_writes_one_record_per_preset(dry_run):
    out, printed = dry_run("table2,data")
    assert sorted(os.listdir(out)) == ["data-log.txt", "data-record.json", "table2-log.txt", "table2-record.json"]
    for preset in ("table2", "data"):
        record = json.loads((out / f"{preset}-record.json").read_text())
        assert record["preset"] == preset and record["dry_run"] is True
        env = record["env"]
        for key in ("uname_r", "runtime", "card", "date", "commit", "torch", "triton"):
            assert key in env, key
        assert record["wall_s"] >= 0 and record["steps"]
    assert "== gpu_check data (dry run)" in printed
    data = json.loads((out / "data-record.json").read_text())
    assert list(data["steps"]) == ["build-jpeg", "bench-data", "train-jpeg", "train-synthetic", "train-huge"]
    import importlib.util

    spec = importlib.util.spec_from_file_location("maefast_csrc_build", os.path.join(ROOT, "csrc", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    # the windowed JPEG reader, where this machine can build it; without it the loader reads with simplejpeg
    assert data["steps"]["build-jpeg"]["rc"] == (0 if build.jpeg_headers_found() else 1)
    assert all(st["rc"] == 0 for name, st in data["steps"].items() if name != "build-jpeg"), data["steps"]
    assert sum(st["budget_s"] for st in data["steps"].values()) <= 290
    cmds = {k: v["cmd"] for k, v in data["train"].items()}
    for name, cmd in cmds.items():  # short runs that write no multi-GB checkpoint, export or plot
        assert all(f in cmd for f in ("--max-steps", "--no-save", "--no-export", "--no-plot")), (name, cmd)
    assert "--model large --batch-size 128" in cmds["train-jpeg"] and "jpegs-linked" in cmds["train-jpeg"]
    assert "--data synthetic --model large --batch-size 128" in cmds["train-synthetic"]
    assert "--data synthetic --model huge --batch-size 128" in cmds["train-huge"]
    # the dry run parses each command's real argument list with its real parser (gpu_runner.parse_only);
    # the train arguments must also validate as on the card (a CUDA run, one process), or the card's
    # minutes go to an exit code 2
    from maefast.train.config import config_from_args, resolve_config, validate_config

    for name, cmd in cmds.items():
        argv = shlex.split(cmd)
        cfg = resolve_config(config_from_args(argv[argv.index("train") + 1:]), cuda=True)
        validate_config(cfg)
    assert "bench data --workers 16 --images 4000" in data["bench_data_cmd"] and "--json" in data["bench_data_cmd"]
    assert set(data["targets"]) >= {"train_jpeg_vs_synthetic", "train_vs_step", "loader_img_per_s"}


def test_dry_run_parses_each_presets_real_arguments(dry_run):
    """table2, profile-overhead, bench-data and the train runs: the dry run puts the preset's real argument
    list through the command's real parser (not --help), so a flag the card would refuse fails here."""
    out, _ = dry_run("table2,data")
    log = (out / "table2-log.txt").read_text() + (out / "data-log.txt").read_text()
    for preset, names in (("table2", ("table2", "profile-overhead")),
                          ("data", ("bench-data", "train-jpeg", "train-synthetic", "train-huge"))):
        steps = json.loads((out / f"{preset}-record.json").read_text())["steps"]
        for name in names:
            cmd = shlex.split(steps[name]["cmd"])
            assert cmd[1:3] == ["-c", "import gpu_runner; gpu_runner.parse_only()"] and "--help" not in cmd, cmd
            assert steps[name]["rc"] == 0, steps[name]
            assert "--json" in cmd or "--max-steps" in cmd, cmd  # the real argument list, not a stand-in
    assert "--fused block --batch large=256,huge=192" in json.loads((out / "table2-record.json").read_text())[
        "steps"]["table2"]["cmd"]
    assert log.count("the arguments parse (dry run: not run)") == 6
    env = dict(_env(), PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "scripts")]))
    parse = [sys.executable, "-c", "import gpu_runner; gpu_runner.parse_only()", "-m", "maefast"]
    for args, rc in ((["bench", "table2", "--quick", "--fused", "block"], 0),
                     (["bench", "table2", "--fused", "blocks"], 2),
                     (["profile", "--steps", "30"], 0), (["profile", "--steps", "30", "--nope"], 2),
                     (["bench", "data", "--workers", "16"], 0), (["train", "--max-step", "x"], 2)):
        r = subprocess.run(parse + args, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert r.returncode == rc, (args, r.stdout, r.stderr[-2000:])
        assert ("the arguments parse" in r.stdout) == (rc == 0), (args, r.stdout)


def test_verify_runs_the_capture_checks_first_each_in_its_own_process(dry_run):
    """verify: the capture probe and TrainStep's `cuda` tests before (and apart from) the other `cuda`
    tests, so that a capture failed inside its graph (torch 2.11: the allocator left broken for its
    process) cannot fail unrelated tests; the steps' budgets fit the preset's."""
    out, _ = dry_run("verify")
    steps = json.loads((out / "verify-record.json").read_text())["steps"]
    assert list(steps) == ["build", "capture-probe", "step-tests", "tests", "diagnose"]
    assert all(st["rc"] == 0 for st in steps.values()), steps
    assert "scripts/capture_probe.py" in steps["capture-probe"]["cmd"]
    python, *args = shlex.split(steps["step-tests"]["cmd"])  # the wrapper's python3: this interpreter
    assert os.path.samefile(python, sys.executable) and args[:5] == ["-m", "pytest", "tests/test_step_capture.py",
                                                                    "-m", "cuda"], args
    assert steps["step-tests"]["collected"] >= 8  # the captured-vs-eager cases at least
    assert "--ignore=tests/test_step_capture.py" in steps["tests"]["cmd"] and steps["tests"]["collected"] > 0
    # every file named, the step's ops first (pytest would sort a folder's files), the captures not again
    assert steps["tests"]["cmd"].split(" -m pytest ")[1].startswith("tests/test_attention.py tests/test_masking.py")
    assert " tests/test_step_capture.py" not in steps["tests"]["cmd"]
    assert sum(st["budget_s"] for st in steps.values()) <= 290


def test_kernels_preset_runs_the_device_tests_on_the_card(dry_run):
    """kernels: every test taking the `device` fixture (run on the CPU's interpreter in CI, never on a card
    by verify's `-m cuda`), the step's ops first, within the preset's budget."""
    out, _ = dry_run("kernels")
    steps = json.loads((out / "kernels-record.json").read_text())["steps"]
    assert list(steps) == ["build", "kernel-tests"] and all(st["rc"] == 0 for st in steps.values()), steps
    cmd = steps["kernel-tests"]["cmd"]
    assert " -m device " in cmd
    assert cmd.split(" -m pytest ")[1].startswith("tests/test_attention.py tests/test_masking.py"), cmd
    assert steps["kernel-tests"]["collected"] > 200
    assert sum(st["budget_s"] for st in steps.values()) <= 290


def test_step_and_profile_presets_fit_their_budgets(dry_run):
    """step: the rows without a compile, then the torch-native baseline interleaved with maefast's block
    step (one process, alternating rounds) and the other compiled row, each under a budget of its own;
    profile: the kernel table, then the attention route's interleaved pair and the eager rows. Each fits
    ~5 minutes."""
    out, _ = dry_run("step,profile")
    step = json.loads((out / "step-record.json").read_text())["steps"]
    prof = json.loads((out / "profile-record.json").read_text())["steps"]
    assert list(step) == ["step-rows", "step-compiled"] and list(prof) == ["profile-kernels", "step-more"]
    import gpu_check

    for steps in (step, prof):
        assert all(st["rc"] == 0 for st in steps.values()), steps
        first, last = steps.values()
        nominal = [gpu_check.BUDGET[name][0] for name in steps]
        assert sum(nominal) <= 290 - 8 and first["budget_s"] == nominal[0]
        # the last step takes what is left of the preset's budget, more than its nominal share when the
        # step before it ended early (a dry run's take seconds)
        assert nominal[1] < last["budget_s"] <= 290 - 8 - first["seconds"] + 1
    assert step["step-rows"]["collected"] == 5 and step["step-compiled"]["collected"] == 2
    compiled = (out / "step-log.txt").read_text().split("$ ")[-1]  # the log of the last step: its collection
    assert compiled.index("test_train_step_pair[mae_vit_huge_patch14-b128-torch-native-graph-vs-maefast-block-graph]") \
        < compiled.index("b128-maefast-compile-graph")
    more = (out / "profile-log.txt").read_text().split("$ ")[-1]
    assert more.index("test_train_step_pair[mae_vit_huge_patch14-b128-maefast-graph-vs-maefast-sdpa-graph]") \
        < more.index("b128-torch-native]") and prof["step-more"]["collected"] == 6


def test_the_step_pair_holds_the_fastest_captured_maefast_step():
    """The pair decides step_vs_torch_native_paired: its maefast side is the faster of the captured rows
    timed alone at ViT-H/14 b128 in this run's step-rows (before, always maefast-block-graph, 2026-12-04's
    fastest, whatever the run measured); another shape's rows, a pair's rows and a row without a time choose
    nothing; with no time, maefast-block-graph."""
    import gpu_check

    def row(provider, ms, model="mae_vit_huge_patch14", batch=128, group="train-step"):
        return {"group": group, "provider": provider, "time_ms": ms, "shape": {"model": model, "batch": batch}}

    assert gpu_check.step_pair([]) == ("torch-native-graph", "maefast-block-graph")
    rows = [row("maefast-block-graph", 110.0), row("maefast-graph", 105.0), row("reference", 90.0)]
    assert gpu_check.step_pair(rows) == ("torch-native-graph", "maefast-graph")
    others = [row("maefast-graph", 50.0, model="mae_vit_base_patch16"), row("maefast-graph", 50.0, batch=64),
              row("maefast-graph", 50.0, group="train-step-pair"), row("maefast-graph", None)]
    assert gpu_check.step_pair(others + [row("maefast-block-graph", 110.0)]) == \
        ("torch-native-graph", "maefast-block-graph")
    assert gpu_check.step_pair(others) == gpu_check.STEP_PAIR


def test_ops_preset_runs_the_target_rows_first_within_its_budget(dry_run):
    """ops: maefast._C built, then one pytest of the op benchmarks with the attention-vs-SDPA rows of every
    paper shape first, then the per-op target rows at ViT-H/14 b256, then the tile sweep; the record has
    every target (unmeasured on a dry run) and the tile table."""
    out, printed = dry_run("ops")
    record = json.loads((out / "ops-record.json").read_text())
    steps = record["steps"]
    assert list(steps) == ["build", "ops-rows"] and all(st["rc"] == 0 for st in steps.values()), steps
    # the rows take what the build and the collection left of the preset's budget (less the reserve), which
    # is under their nominal 280 s: the collection takes seconds
    rows, before_and_after = steps["ops-rows"], record["wall_s"] - steps["ops-rows"]["seconds"]
    assert record["budget_s"] - gpu_runner.RESERVE_S - before_and_after - 1 <= rows["budget_s"] \
        < gpu_runner.BUDGET["ops-rows"][0], (rows, record["wall_s"])
    ids = [a for a in shlex.split(rows["cmd"]) if "::" in a]
    assert len(ids) == rows["collected"] == sum(g["cases"] for g in record["ops_order"]) > 200
    groups = {}  # each group's cases, in the command's order
    for g in record["ops_order"]:
        groups[g["group"]], ids = ids[:g["cases"]], ids[g["cases"]:]
    assert list(groups)[:4] == ["attention vs every SDPA backend (targets)", "per-op targets, ViT-H/14 b256",
                                "attention tile sweep", "attention: official, math, split/pad"], list(groups)
    assert all(groups.values()), record["ops_order"]
    first, targets, sweep, more = list(groups.values())[:4]
    assert all("bench_attention.py::test_attention[" in i for i in first), first
    assert all("b256" in i and "-compile]" not in i and any(
        k in i for k in ("mask_embed_fwd_bwd", "patch_gather", "unshuffle_fwd_bwd", "loss_masked_fwd_bwd"))
        for i in targets), targets
    assert all("::test_tile_sweep[" in i for i in sweep) and all("::test_attention_more[" in i for i in more)
    assert set(record["targets"]["attention"]) == {"L50", "L65", "L197", "L257"}
    assert {"mask_embed_fwd_bwd_vs_reference", "memory_bound_frac_peak_bw"} <= set(record["targets"])
    assert set(record["attention_table"]) == {"L50 Dh64", "L65 Dh80", "L197 Dh32", "L257 Dh32"}
    assert "== gpu_check ops (dry run)" in printed


@pytest.mark.parametrize("presets", DRY_RUNS)
def test_each_dry_run_is_complete(presets, dry_run):
    """CI dry-runs the GPU script only through these tests: every preset is in one of DRY_RUNS, and each
    dry run (shared with the tests above) wrote a complete record per preset, in the order asked."""
    import gpu_check

    assert sorted(p for run in DRY_RUNS for p in run.split(",")) == sorted(gpu_check.PRESETS)
    out, printed = dry_run(presets)
    heads = [ln for ln in printed.splitlines() if ln.startswith("== gpu_check ")]
    assert [h.split()[2] for h in heads] == presets.split(","), heads
    for preset in presets.split(","):
        record = json.loads((out / f"{preset}-record.json").read_text())
        assert record["dry_run"] is True and record["complete"] is True and record["steps"], record
        assert all(st["rc"] == 0 for st in record["steps"].values()), record["steps"]


def test_a_signal_keeps_the_running_steps_rows_and_the_presets_summary(tmp_path, monkeypatch):
    """The device tool's time limit (SIGTERM) during a benchmark step: the rows that step finished (in its
    rows file) and the preset's summary (the profile preset's attention_route) reach the saved record."""
    import gpu_check

    r = _runner(tmp_path, monkeypatch, preset="profile")
    h = dict(model="mae_vit_huge_patch14", batch=128)
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(dict(group="train-step", provider=p, time_ms=t, shape=h, captured=True,
                                                  shape_key=json.dumps(h, sort_keys=True))) + "\n"
                                 for p, t in (("maefast-graph", 114.0), ("maefast-sdpa-graph", 100.0))))
    r.record["steps"]["step-more"] = {"rc": None}
    r.pending_rows = ("step-more", str(rows_file))
    r.summarize = lambda: r.record.update(attention_route=gpu_check.rec.attention_route(r.record["rows"], "huge:128"))
    saved = json.loads(open(r.stop(15)).read())
    assert saved["complete"] is False and "stopped by signal 15" in saved["error"]
    assert [x["provider"] for x in saved["rows"]] == ["maefast-graph", "maefast-sdpa-graph"]
    assert saved["steps"]["step-more"]["rows"] == 2
    assert saved["attention_route"]["faster"] == "sdpa"
    r.log.close()


def test_sweep_winners_and_the_rows_file_of_a_cpu_sweep(tmp_path):
    """The conftest appends each finished case to MAEFAST_BENCH_ROWS; sweep_winners reads a sweep
    from those rows (CPU: the interpreter's tiny sweep at L 50; its times mean nothing)."""
    from maefast.kernels.attention_tiles import TILES, sweep_winners

    path = tmp_path / "rows.jsonl"
    env = _env()
    env["MAEFAST_BENCH_ROWS"] = str(path)
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "benchmarks", "bench_attention.py"), "-q",
                        "-p", "no:cacheprovider", "-k", "tile_sweep and fwd", "--benchmark-disable"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = rec.read_rows(str(path))
    entry = TILES[(50, 64)]
    assert sorted(x["tile"] for x in rows) == sorted(t.name for t in entry.fwd_candidates)
    assert all(x["test"].startswith("benchmarks/bench_attention.py::test_tile_sweep") for x in rows)
    (w,) = sweep_winners(rows)
    assert w["table"] == entry.fwd.name and w["direction"] == "fwd" and len(w["candidates"]) == len(rows)
    # made-up times: a candidate 10% faster than the table's tile is flagged, 2% is noise
    fake = [dict(x, time_ms=1.0 if x["table_tile"] else 1.5) for x in rows]
    other = next(x for x in fake if not x["table_tile"])
    other["time_ms"] = 0.9
    assert sweep_winners(fake)[0]["change"] is True and sweep_winners(fake)[0]["best"] == other["tile"]
    other["time_ms"] = 0.98
    assert sweep_winners(fake)[0]["change"] is False
    # like with like: a candidate timed eagerly (its capture failed) beside graph replays is not ranked
    graphed = [dict(x, cuda_graph=True) for x in fake]
    eager = next(x for x in graphed if not x["table_tile"])
    eager.update(cuda_graph=False, time_ms=0.5)
    (w,) = sweep_winners(graphed)
    assert w["best"] != eager["tile"] and w["not_compared"] == [eager["tile"]], w
    with open(path, "a") as f:
        f.write('{"torn": ')  # a run killed mid-line
    assert len(rec.read_rows(str(path))) == len(rows)


def test_deadline_plugin_skips_what_has_not_started(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_a():\n    pass\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "scripts"), env["PYTHONPATH"]])
    # unset or empty (the plugin loaded outside a timed step): no deadline, every test runs
    for deadline, expect in (("0", "1 skipped"), ("9999999999", "1 passed"), (None, "1 passed"), ("", "1 passed")):
        env.pop("MAEFAST_DEADLINE", None)
        if deadline is not None:
            env["MAEFAST_DEADLINE"] = deadline
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_deadline", "-p", "no:cacheprovider",
                            str(tmp_path / "test_x.py")], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=120)
        assert expect in r.stdout, r.stdout


def test_a_step_stopped_at_its_budget_takes_its_children_with_it_and_the_record_is_kept(tmp_path, monkeypatch):
    """A step killed at its budget: its whole process group stops (a grandchild, like pytest's xdist
    workers, kept running into the next step's timings), and the preset's record is on disk after every
    step, not only at the end (a preset the device tool kills keeps what it finished)."""
    r = _runner(tmp_path, monkeypatch, budget={"diagnose": 2.0}, preset="verify")
    pid_file = tmp_path / "grandchild.pid"
    cmd = [sys.executable, "-c", "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
           "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(60)", str(pid_file)]
    rc, out = r.run("diagnose", cmd)
    assert rc == 124 and "stopped at its budget" in out
    pid = int(pid_file.read_text())
    import time
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the grandchild outlived its step")
    saved = json.loads((tmp_path / "out" / "verify-record.json").read_text())
    assert saved["complete"] is False and saved["steps"]["diagnose"]["rc"] == 124
    r.finish()
    assert json.loads((tmp_path / "out" / "verify-record.json").read_text())["complete"] is True


def test_profile_overhead_target_is_the_worst_impls(tmp_path, monkeypatch):
    import gpu_check

    r = _runner(tmp_path, monkeypatch, dry_run=True, preset="table2")

    def fake(name, cmd, path, key, env=None):
        if key == "profile":
            r.record["profile"] = {"results": [{"profiler_overhead": 0.01}, {"profiler_overhead": 0.08}]}
        return 0, ""

    monkeypatch.setattr(r, "json_step", fake)
    try:
        gpu_check.preset_table2(r)
        assert r.record["targets"]["profile_overhead"]["value"] == 0.08
    finally:
        r.log.close()


# -- a step's budget, the deadline it hands pytest, the reserve, the dry run (from a mutation audit) --

# what is left of the step's deadline when it starts (MAEFAST_DEADLINE: seconds since the epoch)
_DEADLINE_LEFT = [sys.executable, "-c", "import os, time; print(float(os.environ['MAEFAST_DEADLINE']) - time.time())"]


def test_a_steps_budget_is_clipped_to_the_presets_and_pytests_deadline_keeps_its_margin(tmp_path, monkeypatch):
    """BUDGET's nominal budget (or --budget's) clipped to what is left of the preset's less RESERVE_S (the
    record's writing); the last step gets all that is left unless --budget names it; pytest stops starting
    cases the step's margin (its longest case) before the budget ends."""
    from gpu_runner import BUDGET, RESERVE_S

    rows, more_margin = BUDGET["step-rows"][0], BUDGET["step-more"][1]
    preset, more = rows - 10 + RESERVE_S, more_margin + 15  # step-rows' nominal budget does not fit

    def deadline_left(name, **kw):  # the child starts after the deadline is set: at most budget - margin
        left = r.left()
        rc, out = r.run(name, _DEADLINE_LEFT, **kw)
        budget = r.record["steps"][name]["budget_s"]
        assert rc == 0 and budget - BUDGET[name][1] - 10 < float(out) <= budget - BUDGET[name][1] + 0.5, (name, out)
        return left, budget

    r = _runner(tmp_path, monkeypatch, preset, budget={"step-more": more})
    try:
        left, budget = deadline_left("step-rows")
        assert budget == pytest.approx(left, abs=1) and budget < rows  # clipped to what is left
        assert deadline_left("step-more", last=True)[1] == more  # last, but --budget names it: kept
        left, budget = deadline_left("step-compiled", last=True)  # the last step: all that is left
        assert budget == pytest.approx(left, abs=1) and budget > more
    finally:
        r.log.close()


def test_a_step_left_no_more_than_its_margin_is_skipped_and_a_budget_under_it_refused(tmp_path, monkeypatch,
                                                                                      capsys):
    """Its pytest's deadline would already be past (every case skipped after pytest's start-up): the step
    is skipped, saying why; a --budget at or under a pytest step's margin is a usage error."""
    import gpu_check

    margin = gpu_check.BUDGET["step-compiled"][1]
    r = _runner(tmp_path, monkeypatch, gpu_runner.RESERVE_S + margin - 5)
    try:
        assert r.run("step-compiled", [sys.executable, "-c", "pass"], last=True) == (-1, "")
        st = r.record["steps"]["step-compiled"]
        assert st["rc"] == "skipped" and f"not over its longest case ({margin} s)" in st["note"], st
    finally:
        r.log.close()
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path / "o"), "--preset", "step", "--budget", f"step-compiled={margin}"])
    assert e.value.code == 2 and f"step-compiled={margin} (margin {margin} s)" in capsys.readouterr().err


def test_a_spent_preset_skips_its_steps_except_on_a_dry_run(tmp_path, monkeypatch):
    """Under 5 s left: a real run records the step as skipped without starting it; a dry run still runs it
    (it checks every command), at the 5 s floor."""
    from gpu_runner import RESERVE_S

    for dry in (False, True):
        r = _runner(tmp_path / str(dry), monkeypatch, RESERVE_S + 2.0, dry_run=dry)
        try:
            rc, _ = r.run("step-rows", [sys.executable, "-c", "pass"])
            st = r.record["steps"]["step-rows"]
            assert st["budget_s"] == 5
            assert (rc, st["rc"]) == ((0, 0) if dry else (-1, "skipped")), st
        finally:
            r.log.close()


def test_every_pytest_steps_margin_is_inside_its_budget():
    """A margin at or above its step's budget puts pytest's deadline at the start: every case skipped."""
    import gpu_check

    assert all(0 <= margin < budget for budget, margin in gpu_check.BUDGET.values()), gpu_check.BUDGET


def test_a_step_at_its_budget_is_interrupted_before_it_is_killed():
    """SIGINT first (pytest then writes its junit XML and the rows it has), SIGKILL only after the grace."""
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGINT, lambda *a: (print('interrupted', flush=True), sys.exit(3)))\n"
            "print('ready', flush=True)\ntime.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=os.setpgrp)
    try:
        assert proc.stdout.readline() == b"ready\n"
        out = gpu_runner._stop_group(proc, grace=10.0)
        assert b"interrupted" in out and proc.returncode == 3
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


def test_main_counts_skipped_steps_as_no_failure_and_a_dry_run_needs_no_commit(tmp_path, monkeypatch):
    import signal

    import gpu_check

    monkeypatch.setattr(gpu_check.rec, "git_commit", lambda: "unknown")  # a tree without .git
    handler = signal.getsignal(signal.SIGTERM)
    try:
        for steps, want in (({"a": 0, "b": "skipped"}, 0), ({"a": 0, "b": 1}, 1)):
            monkeypatch.setitem(gpu_check.RUN, "table2", lambda r, s=steps: r.record["steps"].update(
                {k: {"rc": v, "seconds": 0.0, "budget_s": 5} for k, v in s.items()}))
            assert gpu_check.main(["--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--dry-run",
                                   "--preset", "table2"]) == want
        with pytest.raises(SystemExit) as e:
            gpu_check.main(["--out", str(tmp_path / "o"), "--preset", "step", "--budget", "step-row=30"])
        assert e.value.code == 2  # a typo in a step's name: refused, not silently unbudgeted
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_sigterm_stops_the_running_step_and_saves_the_record(tmp_path):
    """The device tool's time limit (SIGTERM to gpu_check): main's handler stops the running step and saves
    the record, incomplete and saying why."""
    import signal
    import time

    pid_file = tmp_path / "step.pid"  # the step writes its pid (its own process group's id), then sleeps
    step = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    code = ("import sys, gpu_check\n"
            f"gpu_check.RUN['table2'] = lambda r: r.run('table2', [sys.executable, '-c', {step!r}])\n"
            "sys.exit(gpu_check.main(sys.argv[1:]))")
    out = tmp_path / "o"
    env = dict(_env(), PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "scripts"), _env()["PYTHONPATH"]]))
    p = subprocess.Popen([sys.executable, "-c", code, "--out", str(out), "--work", str(tmp_path / "w"), "--dry-run",
                          "--preset", "table2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        t = time.time()
        while not (pid_file.exists() and pid_file.read_text()):  # the step has started
            assert time.time() - t < 60 and p.poll() is None, "the step never started"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        p.kill()
        if pid_file.exists() and pid_file.read_text():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # gone already, unless the handler failed
            except ProcessLookupError:
                pass
    record = json.loads((out / "table2-record.json").read_text())
    assert record["complete"] is False and "stopped by signal 15" in record["error"]


def test_workers_zero_runs_the_cuda_tests_without_xdist(tmp_path, monkeypatch):
    """--workers 0: one pytest process (no -n); -1: 8 xdist workers where xdist is installed."""
    import importlib.util

    import gpu_check

    for workers, want in ((0, None), (3, "3"), (-1, "8" if importlib.util.find_spec("xdist") else None)):
        r = _runner(tmp_path, monkeypatch, 60.0)
        r.args.workers = workers
        cmds = []
        monkeypatch.setattr(r, "run", lambda name, cmd, **kw: cmds.append(cmd) or (0, ""))
        monkeypatch.setattr(gpu_check.rec, "junit_summary", lambda xml: {})
        try:
            gpu_check._cuda_tests(r, "tests", ["tests/test_ext.py"])
        finally:
            r.log.close()
        (cmd,) = cmds
        assert (cmd[cmd.index("-n") + 1] if "-n" in cmd else None) == want, cmd


def test_a_skipped_test_step_keeps_its_note(tmp_path, monkeypatch):
    """A `cuda` tests step skipped for its budget has no junit XML: no summary, and its note says why."""
    import gpu_check

    margin = gpu_check.BUDGET["tests"][1]
    r = _runner(tmp_path, monkeypatch, gpu_runner.RESERVE_S + margin - 5)
    r.args.workers = 0
    try:
        assert gpu_check._cuda_tests(r, "tests", ["tests/test_ext.py"]) is None
    finally:
        r.log.close()
    assert "not over its longest case" in r.record["steps"]["tests"]["note"]
