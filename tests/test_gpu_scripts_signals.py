"""scripts/gpu_runner.py and scripts/gpu_check.py when a call is cut short (from the mutation audit of
tests/test_gpu_scripts_audit.py): a signal stops the running step's process group, a SIGKILL mid-step keeps the
rows that step finished, the targets are saved after each step and on a signal, and what a command line may
not say (a repeated preset, a budget that runs nothing)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_runner  # noqa: E402
from test_gpu_scripts_audit import _main, _runner  # noqa: E402


def _gone(pid: int) -> bool:
    """Whether process `pid` has ended: no such process, or a zombie (an orphan that nothing reaps where the
    container's PID 1 does not collect orphans)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True  # gone between the two looks


def test_a_signal_stops_the_running_steps_process_group(tmp_path, monkeypatch):
    """Runner.stop (main's SIGTERM handler) ends the running step's whole group, not only saves the record:
    a step left running would go on timing into the next call's work."""
    r = _runner(tmp_path, monkeypatch)
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(pid_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=os.setpgrp)
    try:
        import time

        t = time.time()
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.time() - t < 60, "the step never started"
            time.sleep(0.05)
        r.child = proc
        saved = json.loads(open(r.stop(15)).read())
        assert saved["complete"] is False and proc.poll() is not None
        grandchild = int(pid_file.read_text())
        for _ in range(50):
            if _gone(grandchild):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the step's grandchild outlived the signal")
    finally:
        r.log.close()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


# -- gpu_check: a call cut short, and what its command line may not say -----------------------------------

@pytest.mark.parametrize("args, msg", [
    (["--preset", "step,step"], "named twice"),  # the second run would overwrite the first's record
    (["--preset", " , "], "names no preset"),  # an unset shell variable: nothing measured, exit 0
    (["--preset", "step", "--preset-budget", "0"], "--preset-budget: 0 s"),  # every step skipped, exit 0
    (["--preset", "step", "--preset-budget", "-5"], "--preset-budget: -5 s"),
    (["--preset", "step", "--preset-budget", "nan"], "--preset-budget: nan s"),
    (["--preset", "step", "--budget", "build=0"], "SECONDS must be a positive number"),
    (["--preset", "step", "--budget", "build=nan"], "SECONDS must be a positive number")])
def test_a_repeated_preset_and_a_budget_that_runs_nothing_are_usage_errors(tmp_path, monkeypatch, capsys, args, msg):
    with pytest.raises(SystemExit) as e:
        _main(monkeypatch, ["--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--dry-run", *args])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_a_sigkill_mid_step_keeps_the_rows_that_step_finished(tmp_path):
    """The device tool may SIGKILL the call (no handler runs): the record on disk already holds the rows the
    running benchmark step finished, because it is rewritten during the step, not only after it."""
    import signal
    import time

    rows, pid_file, out = tmp_path / "rows.jsonl", tmp_path / "step.pid", tmp_path / "o"
    step = (f"import json, os, time; open({str(rows)!r}, 'a').write(json.dumps({{'provider': 'reference'}}) + '\\n'); "
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    code = ("import sys, gpu_check, gpu_runner\n"
            "gpu_runner.SAVE_EVERY_S = 0.2\n"
            f"gpu_check.RUN['step'] = lambda r: (setattr(r, 'pending_rows', ('step-rows', {str(rows)!r})), "
            f"r.run('step-rows', [sys.executable, '-c', {step!r}]))\n"
            "sys.exit(gpu_check.main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "scripts"),
                                                        os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-c", code, "--out", str(out), "--work", str(tmp_path / "w"), "--dry-run",
                          "--preset", "step"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    record = out / "step-record.json"
    try:
        t = time.time()
        while not (record.exists() and json.loads(record.read_text())["rows"]):
            assert time.time() - t < 60 and p.poll() is None, "the running step's row never reached the record"
            time.sleep(0.1)
        p.kill()
        p.wait(timeout=30)
    finally:
        p.kill()
        if pid_file.exists() and pid_file.read_text():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    saved = json.loads(record.read_text())
    assert saved["complete"] is False and [r["provider"] for r in saved["rows"]] == ["reference"]
    assert saved["steps"]["step-rows"]["rc"] == "running"  # what it was doing when the call was killed


def test_the_step_presets_targets_are_saved_after_each_step_and_on_a_signal(tmp_path, monkeypatch):
    """A step preset stopped during its compiled rows (a signal, or a SIGKILL after step-rows' save) still has
    the targets of the rows step-rows measured, not only the rows; a profile preset stopped during step-more,
    the target of the kernel profile it finished."""
    import gpu_check

    r = _runner(tmp_path, monkeypatch, preset="profile")
    monkeypatch.setattr(r, "json_step", lambda *a, **k: r.record.update(profile={"attention_ms_ratio": 0.5}))
    monkeypatch.setattr(r, "pytest", lambda *a, **k: gpu_check.sys.exit(143))  # the handler's exit
    with pytest.raises(SystemExit):
        gpu_check.preset_profile(r)
    saved = json.loads(open(r.stop(15)).read())
    assert saved["targets"]["attention_profile_ratio"]["met"] is True and "attention_route" in saved
    r.log.close()

    h = dict(model="mae_vit_huge_patch14", batch=128)
    key = json.dumps(h, sort_keys=True)

    def fake_run(r, name, cmd, env=None, note="", last=False):
        if name != "step-rows":
            raise SystemExit(143)  # the signal handler's exit, mid step-compiled
        with open(env["MAEFAST_BENCH_ROWS"], "w") as f:  # what bench_step's conftest appends
            for p, t in (("reference", 300.0), ("maefast-graph", 100.0)):
                f.write(json.dumps(dict(group="train-step", provider=p, time_ms=t, shape=h, shape_key=key)) + "\n")
        r.record["steps"][name] = {"rc": 0, "seconds": 1.0, "budget_s": 5}
        return 0, ""

    monkeypatch.setattr(gpu_runner.Runner, "run", fake_run)
    r = _runner(tmp_path, monkeypatch, preset="step")
    with pytest.raises(SystemExit):
        gpu_check.preset_step(r)
    saved = json.loads((tmp_path / "out" / "step-record.json").read_text())
    assert saved["targets"]["step"][key]["step_vs_reference"]["value"] == 3.0
    saved = json.loads(open(r.stop(15)).read())
    assert saved["targets"]["step"][key]["step_vs_reference"]["value"] == 3.0
    r.log.close()


def test_a_signal_after_a_preset_ended_leaves_its_complete_record(tmp_path, monkeypatch):
    """main's handler stops the last Runner it started: when that preset has already finished (the signal
    came while the next one set up), its complete record is not turned into a stopped one."""
    r = _runner(tmp_path, monkeypatch, preset="table2")
    r.finish()
    saved = json.loads(open(r.stop(15)).read())
    assert saved["complete"] is True and "error" not in saved


def test_a_signal_during_a_json_step_keeps_the_sections_its_json_has(tmp_path, monkeypatch):
    """profile_step.py, `bench data`, `maefast profile` and table2 rewrite their JSON after each section: a
    call stopped while one runs (SIGTERM, or SIGKILL after a save during the step) keeps those sections."""
    r = _runner(tmp_path, monkeypatch, preset="profile")
    pj = tmp_path / "profile.json"
    pj.write_text(json.dumps({"results": [{"provider": "maefast-block-graph"}], "complete": False}))
    r.record["steps"]["profile-kernels"] = {"rc": "running"}
    r.pending_json = ("profile", str(pj))
    saved = json.loads(open(r.stop(15)).read())
    assert saved["profile"]["results"] == [{"provider": "maefast-block-graph"}] and saved["complete"] is False
    r.log.close()


def test_a_summary_that_raises_between_steps_keeps_the_next_steps_and_the_save(tmp_path, monkeypatch):
    """The preset's summary now runs after each benchmark step and on a signal: our bug in it is recorded,
    and neither stops the steps after it nor the signal's save."""
    r = _runner(tmp_path, monkeypatch, preset="step")
    monkeypatch.setattr(r, "run", lambda *a, **k: (0, ""))
    r.summarize = lambda: {}["targets"]
    r.pytest("step-rows", ["benchmarks/bench_step.py"])
    assert r.record["summary_error"] == "KeyError: 'targets'"
    saved = json.loads(open(r.stop(15)).read())
    assert saved["summary_error"] == "KeyError: 'targets'" and "stopped by signal 15" in saved["error"]
    r.summarize = lambda: r.record.update(targets={})
    r.summary()  # made good later: the error no longer stands beside a summary that is there
    assert "summary_error" not in r.record and r.record["targets"] == {}
    r.log.close()
