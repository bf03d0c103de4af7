"""scripts/gpu_check.py's presets and records, without a GPU: the dry run writes one record per
preset, a real run demands a preset, the figures of the issue's targets are read off made-up rows
correctly, benchmark rows survive a run cut short, and the profiler's kernel classifier."""
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
import profile_step  # noqa: E402


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def _dry_run(tmp_path, presets: str):
    """scripts/gpu_check.py --dry-run of `presets`: (the folder its records went to, what it printed)."""
    out, work = tmp_path / "out", tmp_path / "work"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--out", str(out), "--work",
                        str(work), "--dry-run", "--preset", presets], capture_output=True, text=True, env=_env(),
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return out, r.stdout


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
    for rel in ("scripts/gpu_check.py", "scripts/gpu_record.py", "maefast/_commit.py"):
        (tmp_path / rel).write_text(open(os.path.join(ROOT, rel)).read())
    env = {k: v for k, v in _env().items() if k != "MAEFAST_COMMIT"}
    cmd = [sys.executable, str(tmp_path / "scripts" / "gpu_check.py"), "--out", str(tmp_path / "out"),
           "--preset", "step"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "MAEFAST_COMMIT" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()  # nothing started, no record written


def test_dry_run_writes_one_record_per_preset(tmp_path):
    out, printed = _dry_run(tmp_path, "table2,data")
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
    # the dry run parses each command's real argument list with its real parser (gpu_check.parse_only);
    # the train arguments must also validate as on the card (a CUDA run, one process), or the card's
    # minutes go to an exit code 2
    from maefast.train.config import config_from_args, resolve_config, validate_config

    for name, cmd in cmds.items():
        argv = shlex.split(cmd)
        cfg = resolve_config(config_from_args(argv[argv.index("train") + 1:]), cuda=True)
        validate_config(cfg)
    assert "bench data --workers 16 --images 4000" in data["bench_data_cmd"] and "--json" in data["bench_data_cmd"]
    assert set(data["targets"]) >= {"train_jpeg_vs_synthetic", "train_vs_step", "loader_img_per_s"}


def test_dry_run_parses_each_presets_real_arguments(tmp_path):
    """table2, profile-overhead, bench-data and the train runs: the dry run puts the preset's real argument
    list through the command's real parser (not --help), so a flag the card would refuse fails here."""
    out, _ = _dry_run(tmp_path, "table2,data")
    log = (out / "table2-log.txt").read_text() + (out / "data-log.txt").read_text()
    for preset, names in (("table2", ("table2", "profile-overhead")),
                          ("data", ("bench-data", "train-jpeg", "train-synthetic", "train-huge"))):
        steps = json.loads((out / f"{preset}-record.json").read_text())["steps"]
        for name in names:
            cmd = shlex.split(steps[name]["cmd"])
            assert cmd[1:3] == ["-c", "import gpu_check; gpu_check.parse_only()"] and "--help" not in cmd, cmd
            assert steps[name]["rc"] == 0, steps[name]
            assert "--json" in cmd or "--max-steps" in cmd, cmd  # the real argument list, not a stand-in
    assert "--fused block --batch large=256,huge=192" in json.loads((out / "table2-record.json").read_text())[
        "steps"]["table2"]["cmd"]
    assert log.count("the arguments parse (dry run: not run)") == 6
    env = dict(_env(), PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "scripts")]))
    parse = [sys.executable, "-c", "import gpu_check; gpu_check.parse_only()", "-m", "maefast"]
    for args, rc in ((["bench", "table2", "--quick", "--fused", "block"], 0),
                     (["bench", "table2", "--fused", "blocks"], 2),
                     (["profile", "--steps", "30"], 0), (["profile", "--steps", "30", "--nope"], 2),
                     (["bench", "data", "--workers", "16"], 0), (["train", "--max-step", "x"], 2)):
        r = subprocess.run(parse + args, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert r.returncode == rc, (args, r.stdout, r.stderr[-2000:])
        assert ("the arguments parse" in r.stdout) == (rc == 0), (args, r.stdout)


def test_verify_runs_the_capture_checks_first_each_in_its_own_process(tmp_path):
    """verify: the capture probe and TrainStep's `cuda` tests before (and apart from) the other `cuda`
    tests, so that a capture failed inside its graph (torch 2.11: the allocator left broken for its
    process) cannot fail unrelated tests; the steps' budgets fit the preset's."""
    out, _ = _dry_run(tmp_path, "verify")
    steps = json.loads((out / "verify-record.json").read_text())["steps"]
    assert list(steps) == ["build", "capture-probe", "step-tests", "tests", "diagnose"]
    assert all(st["rc"] == 0 for st in steps.values()), steps
    assert "scripts/capture_probe.py" in steps["capture-probe"]["cmd"]
    assert steps["step-tests"]["cmd"].startswith(f"{sys.executable} -m pytest tests/test_step.py -m cuda")
    assert steps["step-tests"]["collected"] >= 8  # the captured-vs-eager cases at least
    assert "--ignore=tests/test_step.py" in steps["tests"]["cmd"] and steps["tests"]["collected"] > 0
    # every file named, the step's ops first (pytest would sort a folder's files), test_step.py not again
    assert steps["tests"]["cmd"].split(" -m pytest ")[1].startswith("tests/test_attention.py tests/test_masking.py")
    assert " tests/test_step.py" not in steps["tests"]["cmd"]
    assert sum(st["budget_s"] for st in steps.values()) <= 290


def test_kernels_preset_runs_the_device_tests_on_the_card(tmp_path):
    """kernels: every test taking the `device` fixture (run on the CPU's interpreter in CI, never on a card
    by verify's `-m cuda`), the step's ops first, within the preset's budget."""
    out, _ = _dry_run(tmp_path, "kernels")
    steps = json.loads((out / "kernels-record.json").read_text())["steps"]
    assert list(steps) == ["build", "kernel-tests"] and all(st["rc"] == 0 for st in steps.values()), steps
    cmd = steps["kernel-tests"]["cmd"]
    assert " -m device " in cmd and cmd.split(" -m pytest ")[1].startswith("tests/test_attention.py tests/test_masking.py")
    assert steps["kernel-tests"]["collected"] > 200
    assert sum(st["budget_s"] for st in steps.values()) <= 290


def test_step_and_profile_presets_fit_their_budgets(tmp_path):
    """step: the rows without a compile, then the torch-native baseline interleaved with maefast's block
    step (one process, alternating rounds) and the other compiled row, each under a budget of its own;
    profile: the kernel table, then the attention route's interleaved pair and the eager rows. Each fits
    ~5 minutes."""
    out, _ = _dry_run(tmp_path, "step,profile")
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


def _row(group, provider, time_ms, shape, **kw):
    return dict(group=group, provider=provider, time_ms=time_ms, shape=shape, shape_key=json.dumps(shape, sort_keys=True),
                **kw)


def test_step_targets_read_the_fastest_rows():
    s = dict(model="mae_vit_huge_patch14", batch=128)
    rows = [_row("train-step", "reference", 180.0, s, peak_mem_gib=40.0),
            _row("train-step", "maefast-block-graph", 90.0, s, peak_mem_gib=18.0, frac_peak_flops=0.62, captured=True,
                 peak_mem_reserved_gib=21.0),
            _row("train-step", "maefast", 120.0, s, peak_mem_gib=20.0, frac_peak_flops=0.4, captured=False),
            _row("train-step", "torch-native-graph", 110.0, s), _row("train-step", "sdpa", 140.0, s)]
    t = rec.step_targets(rows)[json.dumps(s, sort_keys=True)]
    assert t["maefast_best"] == "maefast-block-graph" and t["torch_native_best"] == "torch-native-graph"
    assert t["step_vs_reference"] == {"value": 2.0, "target": ">= 2.0", "met": True}
    assert t["step_vs_torch_native"]["value"] == pytest.approx(110 / 90, abs=1e-4)
    assert t["step_vs_torch_native"]["met"] is True
    assert t["peak_mem_vs_reference"]["value"] == 0.45 and t["peak_mem_vs_reference"]["met"] is True
    assert t["mfu"]["met"] is True
    # how each row stepped, as the row says (bench_step's rows carry `captured`, not the harness's cuda_graph)
    assert t["rows"]["maefast-block-graph"]["captured"] is True and t["rows"]["maefast"]["captured"] is False
    assert t["rows"]["maefast-block-graph"]["peak_mem_reserved_gib"] == 21.0


def test_step_ratios_say_when_the_target_lies_inside_the_spread():
    """A ratio judged against its target also carries the range the two rows' p20-p80 spreads allow:
    a target inside it is not a result (`within_noise`)."""
    s = dict(model="mae_vit_huge_patch14", batch=128)

    def rows(ours_ms, ours_p20, ours_p80):
        return [_row("train-step", "reference", 216.0, s, time_p20_ms=215.0, time_p80_ms=217.0),
                _row("train-step", "maefast-block-graph", ours_ms, s, time_p20_ms=ours_p20, time_p80_ms=ours_p80),
                _row("train-step", "torch-native-graph", 104.0, s, time_p20_ms=103.5, time_p80_ms=104.5)]

    t = rec.step_targets(rows(88.0, 87.8, 88.2))[json.dumps(s, sort_keys=True)]  # 1.18x, spread 1.174-1.19
    native = t["step_vs_torch_native"]
    assert native["met"] is True and native["within_noise"] is False
    assert native["spread"] == [round(103.5 / 88.2, 4), round(104.5 / 87.8, 4)]
    t = rec.step_targets(rows(90.4, 88.0, 92.0))[json.dumps(s, sort_keys=True)]  # 1.1504x, spread 1.125-1.188
    assert t["step_vs_torch_native"]["met"] is True and t["step_vs_torch_native"]["within_noise"] is True
    assert t["step_vs_reference"]["within_noise"] is False  # 2.39x, far from 2.0
    assert "spread" not in rec.step_targets([_row("train-step", "reference", 2.0, s),
                                             _row("train-step", "maefast-graph", 1.0, s)])[
        json.dumps(s, sort_keys=True)]["step_vs_reference"]  # no percentiles: the value alone


def test_attention_route_decides_only_beyond_the_spread():
    """The profile preset's decision between maefast's attention and torch's SDPA in the same captured
    step: a backend wins only by 2% and where the two timings' p20-p80 spreads do not overlap."""
    h = dict(model="mae_vit_huge_patch14", batch=128)

    def rows(t, s):
        return [_row("train-step", "maefast-graph", t[1], h, time_p20_ms=t[0], time_p80_ms=t[2], captured=True),
                _row("train-step", "maefast-sdpa-graph", s[1], h, time_p20_ms=s[0], time_p80_ms=s[2], captured=True),
                _row("train-step", "maefast-sdpa-graph", 50.0, dict(h, batch=64))]  # another shape: not read

    r = rec.attention_route(rows((113.9, 114.0, 114.2), (110.8, 111.0, 111.3)), "huge:128")
    assert r["faster"] == "sdpa" and r["sdpa_speedup"] == round(114.0 / 111.0, 4) and "route auto" in r["decide"]
    assert r["rows"]["sdpa"]["time_ms"] == 111.0
    assert rec.attention_route(rows((113.9, 114.0, 114.2), (116.4, 116.5, 116.7)), "huge:128")["faster"] == "triton"
    tie = rec.attention_route(rows((113.0, 114.0, 115.0), (113.5, 113.8, 114.5)), "huge:128")
    assert tie["faster"] is None and tie["sdpa_speedup"] > 1 and "neither" in tie["decide"]
    close = rec.attention_route(rows((113.9, 114.0, 114.1), (112.4, 112.5, 112.6)), "huge:128")  # apart, but 1.3%
    assert close["faster"] is None
    gone = rec.attention_route(rows((113.9, 114.0, 114.2), (1, 1, 1))[:1], "huge:128")
    assert gone["faster"] is None and gone["decide"] == "missing row: maefast-sdpa-graph"
    lines = rec.short_lines({"env": {"date": "d", "commit": "c"}, "preset": "profile", "dry_run": True, "steps": {},
                             "attention_route": r})
    assert any("attention route huge:128: triton 114.0 ms, sdpa 111.0 ms" in x for x in lines), lines


def test_a_signal_keeps_the_running_steps_rows_and_the_presets_summary(tmp_path, monkeypatch):
    """The device tool's time limit (SIGTERM) during a benchmark step: the rows that step finished (in its
    rows file) and the preset's summary (the profile preset's attention_route) reach the saved record."""
    import gpu_check

    r = _runner(tmp_path, monkeypatch, preset="profile")
    h = dict(model="mae_vit_huge_patch14", batch=128)
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(_row("train-step", p, t, h, captured=True)) + "\n"
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


def test_step_targets_say_which_baseline_row_is_missing():
    """A baseline row that did not run (capture skipped, out of memory, the deadline) leaves its target
    in the record with met None and the missing row named, and the printed summary says so: no target
    disappears and no row is taken from another record."""
    s = dict(model="mae_vit_huge_patch14", batch=128)
    key = json.dumps(s, sort_keys=True)
    rows = [_row("train-step", "maefast-block-graph", 90.0, s, peak_mem_gib=18.0, frac_peak_flops=0.62)]
    t = rec.step_targets(rows)[key]
    assert set(rec.STEP_TARGETS) <= set(t) and t["mfu"]["met"] is True
    for name in ("step_vs_reference", "peak_mem_vs_reference"):
        assert t[name]["met"] is None and t[name]["reason"] == "missing row: reference", t[name]
    assert t["step_vs_torch_native"]["met"] is None and "torch-native-graph" in t["step_vs_torch_native"]["reason"]
    lines = rec.short_lines({"preset": "step", "dry_run": False, "env": {"date": "d", "commit": "c"}, "steps": {},
                             "targets": {"step": rec.step_targets(rows)}})
    (native,) = [ln for ln in lines if "step_vs_torch_native =" in ln]
    assert native.startswith("  ?  ") and "missing row: no torch-native row" in native, native
    assert not any(ln.startswith("  ok ") and "step_vs_reference" in ln for ln in lines)
    # the reference there, the maefast rows missing: every target None, naming them
    t = rec.step_targets([_row("train-step", "reference", 180.0, s, peak_mem_gib=40.0)])[key]
    assert all(t[n]["met"] is None and t[n]["reason"] == "missing row: no maefast row" for n in rec.STEP_TARGETS
               if n != "step_vs_torch_native_paired")
    assert t["step_vs_torch_native_paired"]["reason"].startswith("missing row: no interleaved pair")
    t = rec.step_targets([])  # no train-step row at all: still every target, each saying so
    assert all(v["met"] is None and "no train-step row" in v["reason"] for e in t.values() for v in e.values())
    assert set(next(iter(t.values()))) == set(rec.STEP_TARGETS)


def test_data_targets_read_the_train_windows_and_the_step_record():
    """img/s from steps.jsonl windows after the prefetched ones; JPEG vs synthetic; train vs the step
    row of the same configuration (and the loader vs the ViT-B row) when a step record has them."""
    steps = [dict(step=s, img_per_s=ips) for s, ips in ((10, 50.0), (20, 100.0), (30, 200.0), (40, 100.0))]
    # windows of 10 steps x batch 10 = 100 images: 2 s, 1 s, 0.5 s, 1 s
    assert rec.window_rate(steps, 10) == pytest.approx(400 / 4.5)
    assert rec.window_rate(steps, 10, after_step=20) == pytest.approx(200 / 1.5)  # windows (20, 30], (30, 40]
    assert rec.window_rate(steps, 10, after_step=40) is None and rec.window_rate([], 10) is None
    record = {"bench_data": {"loader": {"official": {"img_per_s": 1500.0}, "fast-uint8": {"img_per_s": 3000.0}}},
              "train": {"train-jpeg": {"img_per_s": 1800.0}, "train-synthetic": {"img_per_s": 2000.0},
                        "train-huge": {"img_per_s": 1100.0}}}
    t = rec.data_targets(record, None)
    assert t["train_jpeg_vs_synthetic"] == {"value": 0.9, "target": ">= 0.9", "met": True}
    assert t["train_vs_step"]["met"] is None and t["loader_vs_step"]["met"] is None  # no step record
    assert "maefast-graph" in t["train_vs_step"]["reason"] and "base:128" in t["loader_vs_step"]["reason"]
    assert t["loader_img_per_s"] == {"official": 1500.0, "fast-uint8": 3000.0}
    step = {"rows": [_row("train-step", "maefast-graph", 110.0, dict(model="huge", batch=128), img_per_s=1150.0),
                     _row("train-step", "maefast-block-graph", 100.0, dict(model="huge", batch=128), img_per_s=1280.0),
                     _row("train-step", "maefast-graph", 40.0, dict(model="base", batch=128), img_per_s=3200.0)]}
    t = rec.data_targets(record, step)
    assert t["train_vs_step"]["value"] == pytest.approx(1100 / 1150, abs=1e-4) and t["train_vs_step"]["met"] is True
    assert t["train_vs_best_step_row"]["row"] == "maefast-block-graph"
    assert t["loader_vs_step"]["value"] == pytest.approx(3000 / 3200, abs=1e-4) and t["loader_vs_step"]["met"] is False


def test_attention_targets_take_the_best_sdpa_backend():
    s = dict(N=256, L=65, H=16, Dh=80)
    rows = [_row("attention-fwdbwd", p, ms, s) for p, ms in
            (("triton", 0.2), ("sdpa-cudnn", 0.35), ("sdpa-flash", 0.3), ("sdpa-efficient", 0.5), ("official", 2.0))]
    rows.append(_row("attention-fwd", "triton", 0.12, s))
    rows.append(_row("attention-fwd", "sdpa-cudnn", 0.1, s, out_layout="blhd"))
    t = rec.attention_targets(rows)["L65 Dh80 H16 N256"]
    assert t["fwdbwd"]["best_sdpa"] == "sdpa-flash"
    assert t["fwdbwd"]["triton_vs_best_sdpa"]["value"] == 1.5 and t["fwdbwd"]["triton_vs_best_sdpa"]["met"]
    assert t["fwd"]["triton_vs_best_sdpa"]["met"] is False and t["fwd"]["best_sdpa_out_layout"] == "blhd"
    lines = rec.short_lines({"preset": "ops", "dry_run": False, "env": {"date": "d", "commit": "c"}, "steps": {},
                             "targets": {"attention": {"L65 Dh80 H16 N256": t}}})
    assert any(ln.startswith("  NO ") and "fwd / triton_vs_best_sdpa" in ln for ln in lines)


def test_attention_targets_compare_like_with_like():
    """A backend that could not be captured is timed eagerly (with Python dispatch): it is set against
    triton's eager time, not its graph replay."""
    s = dict(N=256, L=50, H=16, Dh=64)
    rows = [_row("attention-fwdbwd", "triton", 0.2, s, cuda_graph=True, eager_time_ms=0.4),
            _row("attention-fwdbwd", "sdpa-flash", 0.5, s, cuda_graph=True, eager_time_ms=0.7),
            _row("attention-fwdbwd", "sdpa-cudnn", 0.45, s, cuda_graph=False)]  # capture failed: eager time
    t = rec.attention_targets(rows)["L50 Dh64 H16 N256"]["fwdbwd"]
    assert t["best_sdpa"] == "sdpa-cudnn" and t["triton_vs_best_sdpa"]["value"] == pytest.approx(0.45 / 0.4)
    rows[2]["cuda_graph"] = True  # all captured: the replay times
    t = rec.attention_targets(rows)["L50 Dh64 H16 N256"]["fwdbwd"]
    assert t["best_sdpa"] == "sdpa-cudnn" and t["triton_vs_best_sdpa"]["value"] == pytest.approx(0.45 / 0.2)


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
    for deadline, expect in (("0", "1 skipped"), ("9999999999", "1 passed")):
        env["MAEFAST_DEADLINE"] = deadline
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_deadline", "-p", "no:cacheprovider",
                            str(tmp_path / "test_x.py")], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=120)
        assert expect in r.stdout, r.stdout


def test_profile_kernel_classes_and_summary():
    bad = {k: (profile_step.classify(k), v) for k, v in profile_step.PROBE.items() if profile_step.classify(k) != v}
    assert not bad, bad  # the dry run's probe: every attention kernel named, and no Inductor kernel among them
    # Inductor names a layout copy feeding SDPA after it: that is element-wise work, not attention time
    assert profile_step.classify("triton_poi_fused__scaled_dot_product_efficient_attention_clone_0") == "inductor"
    assert profile_step.classify("triton_poi_fused__scaled_dot_product_flash_attention_cat_2") == "inductor"
    assert profile_step.classify("void (anonymous namespace)::attention_fwd_wmma_kernel<float, 64>(P)") == "attention"
    assert profile_step.classify("void pytorch_flash::flash_bwd_convert_dq_kernel<T>(P)") == "attention"
    assert profile_step.classify("_attn_bwd_dkdv_kernel") == "attention"
    assert profile_step.classify("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == "attention"
    assert profile_step.classify("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT") == "gemm"
    assert profile_step.classify("triton_per_fused_native_layer_norm_3") == "inductor"
    assert profile_step.classify("_norm_pix_loss_fwd_kernel") == "maefast"
    assert profile_step.classify("void at::native::vectorized_elementwise_kernel<4>") == "elementwise"
    s = profile_step.summarise([dict(name="sm90_xmma_gemm", category="gemm", calls_per_step=10, ms_per_step=6.0),
                                dict(name="_attn_fwd_kernel", category="attention", calls_per_step=4, ms_per_step=3.0),
                                dict(name="copy", category="copy", calls_per_step=2, ms_per_step=1.0)])
    assert s["total_ms_per_step"] == 10.0 and s["gemm_share"] == 0.6 and s["attention_ms_per_step"] == 3.0
    assert [k["name"] for k in s["top"]] == ["sm90_xmma_gemm", "_attn_fwd_kernel", "copy"]
    assert s["kernels_per_step"] == 16


def test_runtime_is_recorded():
    """The machine's runtime goes into every record: gpu_check's env and every benchmark row's
    (maefast.timing.env_info), from one implementation (maefast/_commit.py, torch-free)."""
    from maefast import _commit, timing

    r = rec.runtime()
    assert r["uname_r"] and r["runtime"] in ("gvisor", "firecracker", "unknown")
    assert timing.runtime is _commit.runtime and rec.runtime.__code__.co_filename == _commit.runtime.__code__.co_filename
    env = timing.env_info("cpu")
    assert {k: env[k] for k in r} == r


def test_kernel_table_reads_the_profilers_device_events():
    import types

    import torch

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    evts = [types.SimpleNamespace(key="_attn_fwd_kernel", count=8, device_type=cuda, self_device_time_total=4000.0),
            types.SimpleNamespace(key="nvjet_tst_gemm", count=40, device_type=cuda, self_device_time_total=16000.0),
            types.SimpleNamespace(key="aten::mm", count=40, device_type=cpu, self_device_time_total=0.0)]
    prof = types.SimpleNamespace(key_averages=lambda: evts)
    t = profile_step.kernel_table(prof, steps=2)
    assert t["total_ms_per_step"] == 10.0 and t["attention_ms_per_step"] == 2.0 and t["gemm_share"] == 0.8
    assert t["top"][0]["name"] == "nvjet_tst_gemm" and t["top"][0]["calls_per_step"] == 20


def test_records_judge_the_issues_shapes_and_say_what_is_missing():
    """The step targets judge the issue's shape only (the loader's ViT-B/16 rows are information); ops and
    table2 records with no row still carry every target as `?`; a data record compares with a step record
    only of the same card and commit; pytest's deadline skips are counted apart (not_run)."""
    h, b = dict(model="mae_vit_huge_patch14", batch=128), dict(model="mae_vit_base_patch16", batch=128)
    rows = [_row("train-step", "reference", 180.0, h, peak_mem_gib=40.0),
            _row("train-step", "maefast-graph", 100.0, h, peak_mem_gib=18.0, frac_peak_flops=0.6),
            _row("train-step", "maefast-graph", 40.0, b)]
    t = rec.step_targets(rows, "huge:128")
    assert set(t[json.dumps(h, sort_keys=True)]) >= set(rec.STEP_TARGETS)
    assert set(t[json.dumps(b, sort_keys=True)]) == {"rows"}  # no "? step_vs_reference" for the loader's rows
    assert all(v["met"] is None for v in rec.step_targets(rows[2:], "huge:128")["(huge:128)"].values())
    att = rec.attention_targets([])
    assert {k for k in att} == {"L50", "L65", "L197", "L257"}
    assert att["L65"]["fwd"]["triton_vs_best_sdpa"]["met"] is None
    ops = rec.op_targets([])
    assert {k for k in ops} == {"mask_embed_fwd_bwd_vs_reference", "memory_bound_frac_peak_bw"}
    t2 = rec.table2_targets({"rows": []})
    assert len(t2) == 4 and all(v["met"] is None for v in t2.values())
    record = {"env": {"card": "NVIDIA H200", "commit": "abc1234"}, "bench_data": {},
              "train": {"train-huge": {"img_per_s": 1100.0}}}
    step = {"env": {"card": "NVIDIA H100 80GB HBM3", "commit": "abc1234"},
            "rows": [_row("train-step", "maefast-graph", 110.0, dict(model="huge", batch=128), img_per_s=1150.0)]}
    t = rec.data_targets(record, step)
    assert t["train_vs_step"]["met"] is None and "another run's" in t["train_vs_step"]["reason"]
    assert "card" in t["step_record_differs"]
    step["env"]["card"] = "NVIDIA H200"
    assert rec.data_targets(record, step)["train_vs_step"]["met"] is True


def test_junit_counts_deadline_skips_apart(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuite><testcase classname="a" name="t1"/>'
                   '<testcase classname="a" name="t2"><skipped message="needs a CUDA GPU"/></testcase>'
                   '<testcase classname="a" name="t3"><skipped message="gpu_check: this step\'s time budget is spent"/>'
                   '</testcase></testsuite>')
    s = rec.junit_summary(str(xml))
    assert (s["passed"], s["skipped"], s["not_run"]) == (1, 1, 1)


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


# -- the verdicts' numbers (from a mutation audit: each of these passed a wrong threshold or comparison) --

_H = dict(model="mae_vit_huge_patch14", batch=128)


def test_targets_thresholds_are_the_issues():
    assert rec.TARGETS["mfu"] == (">=", 0.60) and rec.TARGETS["peak_mem_vs_reference"] == ("<=", 0.5)
    assert rec.judge("mfu", 0.59)["met"] is False and rec.judge("peak_mem_vs_reference", 0.51)["met"] is False
    assert rec.judge("profile_overhead", 0.05)["met"] is False
    assert rec.judge("table2_of_flop_bound", 0.94)["met"] is False
    assert rec.judge("mfu", 0.60)["met"] and rec.judge("peak_mem_vs_reference", 0.5)["met"]


def test_attention_route_needs_apart_spreads_even_past_the_gain():
    """A gain above ROUTE_MIN_GAIN whose rows' p20-p80 spreads overlap decides nothing."""
    rows = [_row("train-step", "maefast-graph", 114.0, _H, time_p20_ms=108.0, time_p80_ms=118.0),
            _row("train-step", "maefast-sdpa-graph", 110.0, _H, time_p20_ms=106.0, time_p80_ms=115.0)]
    r = rec.attention_route(rows, "huge:128")
    assert r["sdpa_speedup"] > rec.ROUTE_MIN_GAIN and r["faster"] is None


def test_a_clearly_missed_target_is_not_within_noise():
    key = json.dumps(_H, sort_keys=True)
    pair = [_row("train-step-pair", "torch-native-graph", 104.0, _H, baseline=True),
            _row("train-step-pair", "maefast-block-graph", 98.0, _H, paired_with="torch-native-graph",
                 pair_ratio=1.06, pair_ratio_range=[1.04, 1.08], pair_ratio_rounds=[1.04, 1.06, 1.08])]
    p = rec.step_targets(pair, "huge:128")[key]["step_vs_torch_native_paired"]
    assert p["met"] is False and p["within_noise"] is False
    alone = [_row("train-step", "torch-native-graph", 104.0, _H, time_p20_ms=103.5, time_p80_ms=104.5),
             _row("train-step", "maefast-graph", 98.0, _H, time_p20_ms=97.5, time_p80_ms=98.5)]
    assert rec.step_targets(alone, "huge:128")[key]["step_vs_torch_native"]["within_noise"] is False


def test_table2_targets_judge_the_fraction_of_the_flop_bound():
    rows = [dict(model="mae_vit_large_patch16", decoder_depth=8, impl=i, speedup=s, flop_ratio=3.5,
                 of_flop_bound=s / 3.5) for i, s in (("auto", 3.2), ("reference", 3.4))]
    t = rec.table2_targets({"rows": rows})
    assert t["mae_vit_large_patch16 dec8 auto"]["value"] == round(3.2 / 3.5, 4)
    assert not any(k.endswith(" reference") for k in t)  # the official computation is not judged


def test_op_targets_read_the_graphed_speedup():
    s = dict(N=256, L=256)
    rows = [_row("mask-embed-fwd-bwd", "reference", 1.0, s, baseline=True, speedup_vs_baseline=1.0),
            _row("mask-embed-fwd-bwd", "triton", 0.2, s, speedup_vs_baseline=5.0, eager_speedup_vs_baseline=2.0)]
    t = rec.op_targets(rows)["mask_embed_fwd_bwd_vs_reference"]
    assert list(t) == [f"{rows[1]['shape_key']} triton"] and t[list(t)[0]]["value"] == 5.0


def test_loader_vs_step_reads_the_fastest_step_row():
    record = {"bench_data": {"loader": {"official": {"img_per_s": 9000.0}, "fast-uint8": {"img_per_s": 3000.0}}},
              "train": {}}
    b = dict(model="mae_vit_base_patch16", batch=128)
    step = {"rows": [_row("train-step", "maefast-graph", 40.0, b, img_per_s=3200.0),
                     _row("train-step", "maefast-block-graph", 50.0, b, img_per_s=2500.0)]}
    assert rec.data_targets(record, step)["loader_vs_step"]["value"] == round(3000 / 3200, 4)


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


def test_profile_step_attention_ratio_is_against_the_fastest_torch_native(monkeypatch, tmp_path):
    import torch

    fake = {"maefast-block-graph": 2.0, "torch-native-graph": 4.0, "sdpa": 5.0}
    monkeypatch.setattr(profile_step, "profile_provider",
                        lambda p, *a, **k: dict(provider=p, attention_ms_per_step=fake[p]))
    monkeypatch.setattr(profile_step, "format_table", lambda r: "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "p.json"
    assert profile_step.main(["--providers", ",".join(fake), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["attention_ms_ratio"] == 0.5


# -- a step's budget, the deadline it hands pytest, the reserve, the dry run (from a mutation audit) --

# what is left of the step's deadline when it starts (MAEFAST_DEADLINE: seconds since the epoch)
_DEADLINE_LEFT = [sys.executable, "-c", "import os, time; print(float(os.environ['MAEFAST_DEADLINE']) - time.time())"]


def test_a_steps_budget_is_clipped_to_the_presets_and_pytests_deadline_keeps_its_margin(tmp_path, monkeypatch):
    """BUDGET's nominal budget (or --budget's) clipped to what is left of the preset's less RESERVE_S (the
    record's writing); the last step gets all that is left unless --budget names it; pytest stops starting
    cases the step's margin (its longest case) before the budget ends."""
    from gpu_check import BUDGET, RESERVE_S

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
    r = _runner(tmp_path, monkeypatch, gpu_check.RESERVE_S + margin - 5)
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
    from gpu_check import RESERVE_S

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
    import gpu_check

    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGINT, lambda *a: (print('interrupted', flush=True), sys.exit(3)))\n"
            "print('ready', flush=True)\ntime.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=os.setpgrp)
    try:
        assert proc.stdout.readline() == b"ready\n"
        out = gpu_check._stop_group(proc, grace=10.0)
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
    r = _runner(tmp_path, monkeypatch, gpu_check.RESERVE_S + margin - 5)
    r.args.workers = 0
    try:
        assert gpu_check._cuda_tests(r, "tests", ["tests/test_ext.py"]) is None
    finally:
        r.log.close()
    assert "not over its longest case" in r.record["steps"]["tests"]["note"]
