"""scripts/gpu_runner.py and scripts/gpu_check.py at the edges a mutation audit found untested, without a
GPU and without a dry run of a whole preset (tests/test_gpu_check.py has those): a step's budget at its
floor and at its margin, JSON and rows files left by an earlier run, parse_only's refusals, --budget and
--preset spellings, a preset that raises, and the helpers the presets build their commands with."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_runner  # noqa: E402


def _runner(tmp_path, monkeypatch, preset_budget=60.0, budget=None, dry_run=False, preset="verify", **args):
    """gpu_check's Runner for `preset` as its command line would build it, writing under tmp_path."""
    import gpu_check

    monkeypatch.setattr(gpu_check.rec, "environment", lambda: {"date": "2026-12-06", "commit": "0123456"})
    ns = argparse.Namespace(dry_run=dry_run, work=str(tmp_path / "work"), out=str(tmp_path / "out"),
                            preset_budget=preset_budget, budget=budget or {}, workers=0, tests="tests",
                            step_record=None)
    for k, v in args.items():
        setattr(ns, k, v)
    return gpu_check.Runner(preset, ns)


def _write(path, text: str) -> list[str]:
    """A step's command that writes `text` to `path`."""
    return [sys.executable, "-c", f"open({str(path)!r}, 'w').write({text!r})"]


# -- gpu_runner: a step's budget --------------------------------------------------------------------------

def test_a_spent_preset_skips_a_step_without_a_margin(tmp_path, monkeypatch):
    """Under 5 s left of the preset: a step with no margin (not a pytest step) is skipped too, saying the
    preset's budget is spent, not started at the 5 s floor."""
    r = _runner(tmp_path, monkeypatch, gpu_runner.RESERVE_S + 2.0)
    try:
        assert gpu_runner.BUDGET["diagnose"][1] == 0
        assert r.run("diagnose", [sys.executable, "-c", "pass"]) == (-1, "")
        st = r.record["steps"]["diagnose"]
        assert st["rc"] == "skipped" and st["note"] == "preset budget spent", st
    finally:
        r.log.close()


def test_a_step_whose_budget_equals_its_margin_is_skipped(tmp_path, monkeypatch):
    """budget == margin puts its pytest's deadline at its start: skipped, as a budget under the margin is."""
    margin = gpu_runner.BUDGET["step-rows"][1]
    r = _runner(tmp_path, monkeypatch, 200.0, budget={"step-rows": float(margin)}, preset="step")
    try:
        assert r.run("step-rows", [sys.executable, "-c", "pass"]) == (-1, "")
        st = r.record["steps"]["step-rows"]
        assert st["rc"] == "skipped" and st["budget_s"] == margin, st
        assert f"not over its longest case ({margin} s)" in st["note"], st
    finally:
        r.log.close()


# -- gpu_runner: files an earlier run left, what a step's JSON says ------------------------------------------

def test_json_step_reads_only_this_runs_json_and_says_what_it_found(tmp_path, monkeypatch):
    """A JSON an earlier run left is removed before the step (a step that writes none records none); a JSON
    without `complete` is whole (no note), `complete: false` is noted partial, unreadable JSON is recorded as
    such; the record is written atomically (no .tmp left in OUT)."""
    r = _runner(tmp_path, monkeypatch)
    path = tmp_path / "diagnose.json"
    try:
        path.write_text(json.dumps({"stale": True}))
        r.json_step("diagnose", [sys.executable, "-c", "pass"], str(path), "diagnose")
        assert "diagnose" not in r.record and "note" not in r.record["steps"]["diagnose"]
        r.json_step("diagnose", _write(path, '{"a": 1}'), str(path), "diagnose")
        assert r.record["diagnose"] == {"a": 1} and "note" not in r.record["steps"]["diagnose"]
        r.json_step("diagnose", _write(path, '{"a": 1, "complete": true}'), str(path), "diagnose")
        assert "note" not in r.record["steps"]["diagnose"]
        r.json_step("diagnose", _write(path, '{"complete": false}'), str(path), "diagnose")
        assert r.record["steps"]["diagnose"]["note"].startswith("partial: cut short")
        r.json_step("diagnose", _write(path, '{"torn'), str(path), "diagnose")
        assert r.record["diagnose"]["error"].startswith("unreadable JSON")
        assert sorted(os.listdir(tmp_path / "out")) == ["verify-log.txt", "verify-record.json"]
    finally:
        r.log.close()


def test_a_benchmark_step_does_not_take_an_earlier_runs_rows(tmp_path, monkeypatch):
    """WORK/<step>.jsonl left by an earlier run (same --work) is removed before the step: the record holds
    only the rows this run's step appended."""
    r = _runner(tmp_path, monkeypatch, preset="step")
    rows_path = os.path.join(r.work, "step-rows.jsonl")
    with open(rows_path, "w") as f:
        f.write(json.dumps({"group": "train-step", "provider": "stale", "time_ms": 1.0}) + "\n")

    def fake_run(name, cmd, env=None, note="", last=False):
        r.record["steps"][name] = {"rc": 0}
        with open(env["MAEFAST_BENCH_ROWS"], "a") as f:
            f.write(json.dumps({"group": "train-step", "provider": "new", "time_ms": 2.0}) + "\n")
        return 0, ""

    monkeypatch.setattr(r, "run", fake_run)
    try:
        r.pytest("step-rows", ["benchmarks/bench_step.py"])
    finally:
        r.log.close()
    assert [x["provider"] for x in r.record["rows"]] == ["new"] and r.record["steps"]["step-rows"]["rows"] == 1


# -- pytest_deadline --------------------------------------------------------------------------------------

def test_deadline_plugin_skips_as_soon_as_the_deadline_has_passed(monkeypatch):
    """The hook itself, to the second: a deadline half a second ago skips, one a minute ahead does not."""
    import time

    import pytest_deadline

    monkeypatch.setenv("MAEFAST_DEADLINE", str(time.time() - 0.5))
    with pytest.raises(pytest.skip.Exception, match="time budget is spent"):
        pytest_deadline.pytest_runtest_setup(None)
    monkeypatch.setenv("MAEFAST_DEADLINE", str(time.time() + 60))
    pytest_deadline.pytest_runtest_setup(None)


# -- gpu_runner.parse_only -------------------------------------------------------------------------------

def _parse_only(tmp_path, *args):
    (tmp_path / "noparse_mod.py").write_text("print('ran without a parser')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "scripts"), str(tmp_path), ROOT]))
    return subprocess.run([sys.executable, "-c", "import gpu_runner; gpu_runner.parse_only()", *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_parse_only_fails_a_module_that_never_parses_and_a_missing_module_name(tmp_path):
    """A command whose module ends without an argparse parse did not have its arguments checked: a failure
    naming the module, not a dry run's pass; `-m` without a module is a usage error."""
    r = _parse_only(tmp_path, "-m", "noparse_mod", "--x")
    assert r.returncode != 0 and "noparse_mod ended without parsing its arguments" in r.stderr, r
    r = _parse_only(tmp_path, "-m")
    assert r.returncode != 0 and "parse_only: usage" in r.stderr, r


# -- gpu_check: the command line ----------------------------------------------------------------------------

def _main(monkeypatch, argv):
    """gpu_check.main(argv) with its SIGTERM handler put back afterwards; the records' environment stubbed."""
    import signal

    import gpu_check

    monkeypatch.setattr(gpu_check.rec, "environment", lambda: {"date": "2026-12-06", "commit": "0123456"})
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return gpu_check.main(argv)
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_budget_without_an_equals_sign_is_a_usage_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        _main(monkeypatch, ["--out", str(tmp_path / "o"), "--preset", "step", "--budget", "step-rows"])
    assert e.value.code == 2 and "--budget takes STEP=SECONDS" in capsys.readouterr().err


def test_preset_all_runs_every_preset_in_order_and_blanks_are_dropped(tmp_path, monkeypatch):
    import gpu_check

    ran = []
    for name in gpu_check.PRESETS:
        monkeypatch.setitem(gpu_check.RUN, name, lambda r: ran.append(r.preset))
    base = ["--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--dry-run"]
    assert _main(monkeypatch, base + ["--preset", "all"]) == 0
    assert ran == list(gpu_check.PRESETS)
    ran.clear()
    assert _main(monkeypatch, base) == 0  # a dry run without --preset: every preset, as `all`
    assert ran == list(gpu_check.PRESETS)
    ran.clear()
    assert _main(monkeypatch, base + ["--preset", " step, ,profile,"]) == 0
    assert ran == ["step", "profile"]


def test_a_preset_that_raises_is_a_failure_and_its_record_says_why(tmp_path, monkeypatch):
    """Our bug in a preset: the record is still written (complete, with the error), the exit code is 1
    even though every step it ran passed, and the presets after it still run."""
    import gpu_check

    def boom(r):
        r.record["steps"]["table2"] = {"rc": 0, "seconds": 0.0, "budget_s": 5}
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check.RUN, "table2", boom)
    monkeypatch.setitem(gpu_check.RUN, "data", lambda r: None)
    out = tmp_path / "o"
    assert _main(monkeypatch, ["--out", str(out), "--work", str(tmp_path / "w"), "--dry-run", "--preset",
                               "table2,data"]) == 1
    record = json.loads((out / "table2-record.json").read_text())
    assert record["error"] == "RuntimeError: boom" and record["complete"] is True
    assert json.loads((out / "data-record.json").read_text())["complete"] is True


# -- gpu_check: verify's and kernels' tests ---------------------------------------------------------------

def test_a_tests_step_that_wrote_no_junit_xml_is_not_given_an_earlier_runs(tmp_path, monkeypatch):
    """WORK/<step>.xml left by an earlier run is removed first: a step that crashed before writing its
    report says so, not the earlier run's counts."""
    import gpu_check

    r = _runner(tmp_path, monkeypatch)
    xml = os.path.join(r.work, "tests.xml")
    with open(xml, "w") as f:
        f.write('<testsuite><testcase classname="a" name="t1"/></testsuite>')

    def crashed(name, cmd, env=None, note="", last=False):
        r.record["steps"][name] = {"rc": 1}
        return 1, ""

    monkeypatch.setattr(r, "run", crashed)
    try:
        assert gpu_check._cuda_tests(r, "tests", ["tests/test_ext.py"]) == {"error": "no junit xml"}
    finally:
        r.log.close()


def test_test_files_are_given_paths_or_every_file_once_verify_order_first(tmp_path, monkeypatch):
    import gpu_check

    r = _runner(tmp_path, monkeypatch, tests="tests/test_ext.py -k 'not slow'")
    r.log.close()
    assert gpu_check._test_files(r) == ["tests/test_ext.py", "-k", "not slow"]
    r.args.tests = "tests"
    files = gpu_check._test_files(r)
    every = sorted(f"tests/{f}" for f in os.listdir(os.path.join(ROOT, "tests"))
                   if f.startswith("test_") and f.endswith(".py"))
    assert len(files) == len(set(files)) and sorted(files) == every
    first = [f"tests/test_{n}.py" for n in gpu_check.VERIFY_TEST_ORDER]
    assert files[:len(first)] == [f for f in first if f in every]
    # a name of VERIFY_TEST_ORDER whose file is gone is left out, not handed to pytest (which would fail)
    monkeypatch.setattr(gpu_check, "VERIFY_TEST_ORDER", ("attention", "no_such_file_xyz"))
    files = gpu_check._test_files(r)
    assert files[0] == "tests/test_attention.py" and "tests/test_no_such_file_xyz.py" not in files


def test_verify_notes_the_capture_checks_and_the_step_tests_failures(tmp_path, monkeypatch):
    import gpu_check

    r = _runner(tmp_path, monkeypatch)
    cmds = {}

    def run(name, cmd, env=None, note="", last=False):
        cmds[name] = (cmd, env)
        r.record["steps"][name] = {"rc": 0}
        if name == "step-tests":
            with open(os.path.join(r.work, "step-tests.xml"), "w") as f:
                f.write('<testsuite><testcase classname="t" name="ok"/><testcase classname="t" name="bad">'
                        '<failure message="boom"/></testcase></testsuite>')
        return 0, ""

    def json_step(name, cmd, path, key, env=None):
        run(name, cmd)
        if key == "capture_probe":
            r.record[key] = {"checks": {"sync": {"ok": True}, "allocator": {"ok": False}}}
        return 0, ""

    monkeypatch.setattr(r, "run", run)
    monkeypatch.setattr(r, "json_step", json_step)
    monkeypatch.delenv("MAEFAST_CUDA_ARCHS", raising=False)
    try:
        gpu_check.preset_verify(r)
    finally:
        r.log.close()
    assert list(cmds) == ["build", "capture-probe", "step-tests", "tests", "diagnose"]
    assert r.record["steps"]["capture-probe"]["note"] == "sync ok, allocator FAILED"
    assert r.record["steps"]["step-tests"]["note"] == "passed 1 failed 1 skipped 0\n      FAIL t::bad: boom"
    build, env = cmds["build"]
    assert "--inplace" in build and env["MAEFAST_CUDA_ARCHS"] == "90"  # sm_90 unless the caller says otherwise


# -- gpu_check: the ops preset's order ---------------------------------------------------------------------

def _ops_ids(r, monkeypatch, ids):
    import gpu_check

    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, "".join(i + "\n" for i in ids) + f"\n{len(ids)} tests collected\n", ""))
    return gpu_check.ops_node_ids(r)


def test_ops_cases_are_ordered_by_the_rules_and_an_empty_collection_fails(tmp_path, monkeypatch):
    import gpu_check

    r = _runner(tmp_path, monkeypatch, preset="ops")
    ids = ["benchmarks/bench_loss.py::test_loss[cpu-vit_b16-b256-loss_masked_fwd_bwd]",
           "benchmarks/bench_masking.py::test_mask[vit_h14-b256-mask_embed_fwd_bwd-compile]",
           "benchmarks/bench_block.py::test_block[vit_h14-b256-block]",
           "benchmarks/bench_attention.py::test_attention_more[official]",
           "benchmarks/bench_attention.py::test_tile_sweep[L50-fwd-m64n64w4s1]",
           "benchmarks/bench_masking.py::test_mask[vit_h14-b256-mask_embed_fwd_bwd]",
           "benchmarks/bench_attention.py::test_attention[vit_h14-flash]"]
    try:
        got = _ops_ids(r, monkeypatch, ids)
        assert got == [ids[6], ids[5], ids[4], ids[3], ids[1], ids[2], ids[0]]
        assert [g["cases"] for g in r.record["ops_order"]] == [1, 1, 1, 1, 2, 1]
        with pytest.raises(RuntimeError, match="found nothing"):
            _ops_ids(r, monkeypatch, [])
        # the preset records a failed collection as its step's failure and goes no further
        monkeypatch.setattr(r, "run", lambda *a, **k: (0, ""))
        gpu_check.preset_ops(r)
        st = r.record["steps"]["ops-rows"]
        assert st["rc"] == 1 and st["note"].startswith("collection failed: collecting the ops benchmarks found nothing")
        assert "targets" not in r.record
    finally:
        r.log.close()


def test_the_ops_collection_is_bounded_by_what_is_left_of_the_presets_budget(tmp_path, monkeypatch):
    """The ops cases' collection (a subprocess outside Runner.run) may take what the preset has left, not a
    fixed 300 s past a 290 s preset; one that hangs fails the step saying so."""
    import gpu_check

    r, seen = _runner(tmp_path, monkeypatch, preset="ops", preset_budget=100.0), {}

    def hangs(cmd, **kw):
        seen["timeout"] = kw.get("timeout")
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))
    try:
        monkeypatch.setattr(gpu_check.subprocess, "run", hangs)
        monkeypatch.setattr(r, "run", lambda *a, **k: (0, ""))
        gpu_check.preset_ops(r)
        assert 5 <= seen["timeout"] <= 100 - gpu_runner.RESERVE_S
        st = r.record["steps"]["ops-rows"]
        assert st["rc"] == 1 and "did not end within the preset's" in st["note"], st
    finally:
        r.log.close()


# -- gpu_check: table2, profile and data presets' bookkeeping ---------------------------------------------

def test_profile_overhead_skips_impls_without_a_figure(tmp_path, monkeypatch):
    import gpu_check

    for results, want in (([{"profiler_overhead": None}, {"profiler_overhead": 0.02}], 0.02),
                          ([{"profiler_overhead": None}], None)):
        r = _runner(tmp_path, monkeypatch, dry_run=True, preset="table2")

        def fake(name, cmd, path, key, env=None, results=results):
            if key == "profile":
                r.record["profile"] = {"results": results}
            return 0, ""

        monkeypatch.setattr(r, "json_step", fake)
        try:
            gpu_check.preset_table2(r)
        finally:
            r.log.close()
        judged = r.record["targets"]["profile_overhead"]
        assert judged["value"] == want, judged
        assert ("reason" in judged) == (want is None), judged


def test_profile_target_names_the_provider_it_could_not_profile(tmp_path, monkeypatch):
    import gpu_check

    r = _runner(tmp_path, monkeypatch, preset="profile")

    def json_step(name, cmd, path, key, env=None):
        r.record["profile"] = {"results": [{"provider": "maefast-block-graph", "attention_ms_per_step": 3.0}]}
        return 0, ""

    monkeypatch.setattr(r, "json_step", json_step)
    monkeypatch.setattr(r, "pytest", lambda *a, **k: (0, ""))
    try:
        gpu_check.preset_profile(r)
    finally:
        r.log.close()
    judged = r.record["targets"]["attention_profile_ratio"]
    assert judged["met"] is None and judged["reason"] == "missing row: torch-native-graph (no attention time profiled)"


def test_linked_folder_links_each_jpeg_copies_times_and_can_run_again(tmp_path):
    import gpu_check

    src, dst = tmp_path / "jpegs", tmp_path / "linked"
    src.mkdir()
    for f in ("a.jpg", "b.jpg", "notes.txt"):
        (src / f).write_text(f)
    gpu_check._linked_folder(str(src), str(dst), 3)
    gpu_check._linked_folder(str(src), str(dst), 3)  # a warm machine's second run: the links are there
    assert sorted(os.listdir(dst)) == sorted(f"c{c}-{f}" for f in ("a.jpg", "b.jpg") for c in range(3))
    assert os.path.realpath(dst / "c2-b.jpg") == os.path.realpath(src / "b.jpg")


def test_train_step_keeps_the_last_lines_and_the_first_windows_rate(tmp_path, monkeypatch):
    import gpu_check

    r = _runner(tmp_path, monkeypatch, dry_run=True, preset="data")
    said = [f"maefast train: training step: {i}" for i in range(8)]
    out = "\n".join(["noise", *said, "maefast train: done: 1234.5 img/s after the first log window", "x"])
    monkeypatch.setattr(r, "run", lambda name, cmd, env=None: (0, out))
    try:
        gpu_check._train_step(r, "train-huge", [sys.executable, "-m", "maefast", "train"], 128, 10)
    finally:
        r.log.close()
    t = r.record["train"]["train-huge"]
    assert t["lines"] == said[3:] + ["maefast train: done: 1234.5 img/s after the first log window"]
    assert t["img_per_s_after_first_window"] == 1234.5 and t["timed_after_step"] == 10 and t["rc"] == 0


def test_data_preset_reads_the_step_record_from_out_by_default(tmp_path, monkeypatch):
    """The data preset's train-vs-step ratio reads OUT/step-record.json when --step-record is not given
    (a session that ran the step preset first)."""
    import gpu_check

    seen = []
    monkeypatch.setattr(gpu_check.rec, "data_targets", lambda record, step_record, model: seen.append(step_record)
                        or {})
    for given in (None, "elsewhere"):
        r = _runner(tmp_path / str(given), monkeypatch, preset="data")
        if given:
            r.args.step_record = str(tmp_path / "elsewhere.json")
            (tmp_path / "elsewhere.json").write_text(json.dumps({"preset": "elsewhere"}))
        (tmp_path / str(given) / "out" / "step-record.json").write_text(json.dumps({"preset": "step"}))
        monkeypatch.setattr(r, "run", lambda name, cmd, env=None: (0, ""))
        monkeypatch.setattr(r, "json_step", lambda *a, **k: (0, ""))
        try:
            gpu_check.preset_data(r)
        finally:
            r.log.close()
    assert seen == [{"preset": "step"}, {"preset": "elsewhere"}]
