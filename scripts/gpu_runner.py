"""How scripts/gpu_check.py runs a preset's steps: each in a subprocess (its own process group) under its
own budget, clipped to what is left of the preset's; the record rewritten after every step, so a call the
device tool kills keeps what finished. The presets themselves (what each step runs, in which order) are
in gpu_check.py."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import gpu_record as rec  # noqa: E402

PRESET_BUDGET_S = 290  # each preset, its record written within ~5 minutes
RESERVE_S = 8  # kept back from the last step for writing the record
SAVE_EVERY_S = 10  # the record (with the running step's rows so far) rewritten this often during a step
# Per step: (nominal budget, margin): a pytest step stops starting cases `margin` seconds before its
# budget ends (its longest single case), then is killed at the budget.
# verify's split of its 290 s is a guess (the capture tests have not run on a card yet): the probe ~1 min
# with Triton's compiles, TrainStep's tests incl. one torch.compile row, then the rest
# (the build took 23.5 s on 2026-11-27; 180 `cuda` tests 74 s with 8 workers: today's 333 need more, the
# deadline's skips are counted as not_run; the probe said ~1 min, its budget has a margin over it)
BUDGET = {"build": (35, 0), "capture-probe": (75, 0), "step-tests": (65, 20), "tests": (95, 15), "diagnose": (20, 0),
          # step: each row's build (compile, warm-up, capture) is recorded as build_s: tune these from it.
          # Unmeasured guesses: Triton's cold compiles ~30 s for the first maefast row; one whole-model
          # Inductor compile of ViT-H ~60-90 s (a second one in the same machine session reads its caches)
          "step-rows": (110, 30), "step-compiled": (165, 75),
          "profile-kernels": (170, 0), "step-more": (105, 45),
          "ops-rows": (280, 25),
          "table2": (200, 0), "profile-overhead": (70, 0), "kernel-tests": (240, 25),
          "build-jpeg": (5, 0), "bench-data": (75, 0), "train-jpeg": (75, 0), "train-synthetic": (60, 0),
          "train-huge": (70, 0)}


def parse_only() -> None:
    """`python -c 'import gpu_runner; gpu_runner.parse_only()' -m <module> <args>`, the dry run's form of a
    preset's command: runs `python -m <module> <args>` as far as its first argparse parse (the real parser
    on the real argument list), then exits 0 without running the job; a bad argument exits 2 with the
    parser's message, as it would on the card."""
    import argparse
    import runpy

    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        print(f"{self.prog}: the arguments parse (dry run: not run)", flush=True)
        raise SystemExit(0)

    if sys.argv[1:2] != ["-m"] or len(sys.argv) < 3:
        raise SystemExit("parse_only: usage: python -c 'import gpu_runner; gpu_runner.parse_only()' -m <module> [args]")
    argparse.ArgumentParser.parse_args = parse_and_stop
    sys.argv = sys.argv[2:]  # [module, args...], as `python -m module args...` sees them
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    raise SystemExit(f"parse_only: {sys.argv[0]} ended without parsing its arguments")


def _stop_group(proc: subprocess.Popen, grace: float = 5.0) -> bytes:
    """Stops `proc`'s process group (SIGINT, then SIGKILL after `grace` s); returns the output it wrote to a
    pipe (nothing when it has none or, even after SIGKILL, a process outside the group still holds it)."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.communicate(timeout=wait)[0]
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    return b""


class Runner:
    """Runs a preset's steps under the preset's budget and builds its record."""

    def __init__(self, preset: str, args):
        self.preset, self.args = preset, args
        self.dry = args.dry_run
        self.work = os.path.join(args.work, preset)
        os.makedirs(self.work, exist_ok=True)
        os.makedirs(args.out, exist_ok=True)
        self.log = open(os.path.join(args.out, f"{preset}-log.txt"), "w")
        self.t0 = time.time()
        self.budget = args.preset_budget
        self.record = {"kind": "maefast gpu_check", "preset": preset, "dry_run": self.dry, "env": rec.environment(),
                       "budget_s": self.budget, "steps": {}, "rows": []}
        self.py = sys.executable
        self.child: subprocess.Popen | None = None
        self.pending_rows: tuple[str, str] | None = None  # the running benchmark step's (name, rows file)
        self.pending_json: tuple[str, str] | None = None  # the running JSON step's (record key, its JSON)
        self.summarize = None  # the preset's own summary of its rows, also made when a signal stops it

    def job(self, cmd: list[str]) -> list[str]:
        """`cmd` (`python -m <module> <args>`), or on a dry run the same argument list through the real
        parser and no further (`parse_only`): a flag the card would refuse fails here."""
        if not self.dry:
            return cmd
        assert cmd[:2] == [self.py, "-m"], cmd
        return [self.py, "-c", "import gpu_runner; gpu_runner.parse_only()", *cmd[1:]]

    def left(self) -> float:
        return self.budget - RESERVE_S - (time.time() - self.t0)

    def run(self, name: str, cmd: list[str], env: dict | None = None, note: str = "",
            last: bool = False) -> tuple[int, str]:
        """Runs one step under its budget: BUDGET's nominal one (or --budget's), clipped to what is left
        of the preset's; the preset's `last` step gets all that is left unless --budget names it (what
        earlier steps did not use would otherwise go unused: the compiled step rows need it when the
        rows before them ran fast)."""
        nominal, margin = BUDGET[name]
        last = last and name not in self.args.budget  # a --budget given for the step is kept
        nominal = self.args.budget.get(name, nominal)
        budget = max(5.0, self.left() if last else min(nominal, self.left()))
        # rc "running" until it ends: what a record saved during the step (a call SIGKILLed then) says of it
        st = {"rc": "running", "seconds": 0.0, "budget_s": round(budget), "cmd": " ".join(shlex.quote(c) for c in cmd)}
        if note:
            st["note"] = note
        self.record["steps"][name] = st
        # spent, or not over the step's longest case (its pytest's deadline would be past: no case would start)
        if (self.left() < 5 or (margin and budget <= margin)) and not self.dry:
            st.update(rc="skipped", note="preset budget spent" + (f": {budget:.0f} s left, not over its longest "
                                                                  f"case ({margin} s)" if margin else ""))
            return -1, ""
        full_env = dict(os.environ, **(env or {}))
        full_env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        full_env["MAEFAST_DEADLINE"] = str(time.time() + budget - margin)
        self.log.write(f"\n$ {st['cmd']}\n")
        self.log.flush()
        start = self.log.tell()
        t = time.time()
        # a process group of its own: at the budget the whole group stops (pytest's xdist workers, DataLoader
        # workers, Inductor's compile pool), not only the child, which would leave them running into the
        # next step's timings; SIGINT first, so that pytest still writes its junit XML. A group, not a
        # session: the device tool kills what a command leaves behind except a new session's processes.
        # Its output goes straight into the log: on disk as it is written, also when the call is killed.
        # process_group (3.11+) calls setpgid in C after the fork; preexec_fn runs Python in a forked copy of a
        # threaded parent (a deadlock risk documented by subprocess), so it is left to 3.10
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=full_env, **group)
        self.child = proc
        end = t + budget
        try:
            while True:
                try:
                    rc, tail = proc.wait(timeout=max(0.0, min(SAVE_EVERY_S, end - time.time()))), ""
                    break
                except subprocess.TimeoutExpired:
                    if time.time() >= end:
                        _stop_group(proc)
                        rc, tail = 124, f"\n[gpu_check: stopped at its budget, {budget:.0f} s]\n"
                        break
                    self.save(complete=False)  # the rows it finished so far: a SIGKILL cannot take them
        finally:
            self.child = None
        self.log.write(tail)
        self.log.flush()
        with open(self.log.name, "rb") as f:
            f.seek(start)
            out = f.read().decode(errors="replace")
        st.update(rc=rc, seconds=round(time.time() - t, 1))
        self.save(complete=False)
        return rc, out

    def pytest(self, name: str, targets: list[str], env: dict | None = None, extra: list[str] = (), note: str = "",
               last: bool = False):
        """A benchmark step: rows appended to WORK/<name>.jsonl as they finish, then into the record."""
        rows_path = os.path.join(self.work, f"{name}.jsonl")
        if os.path.exists(rows_path):
            os.remove(rows_path)
        cmd = [self.py, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "-p", "pytest_deadline", "--gpu",
               *extra] + (["--collect-only"] if self.dry else [])
        self.pending_rows = (name, rows_path)
        rc, out = self.run(name, cmd, dict(env or {}, MAEFAST_BENCH_ROWS=rows_path), note, last)
        self.collect_rows()
        if self.summarize is not None:  # the preset's summary of the rows so far, saved with them
            self.summary()
            self.save(complete=False)
        if self.dry:
            self.record["steps"][name]["collected"] = sum(1 for ln in out.splitlines() if "::" in ln)
        return rc, out

    def collect_rows(self) -> None:
        """The running benchmark step's finished rows into the record (also when a signal stops it)."""
        if self.pending_rows is None:
            return
        (name, path), self.pending_rows = self.pending_rows, None
        rows = rec.read_rows(path)
        self.record["rows"] += rows
        self.record["steps"].setdefault(name, {})["rows"] = len(rows)

    def summary(self) -> None:
        """The preset's summary of its rows so far (`summarize`), between steps and on a signal: our bug in it
        is recorded (`summary_error`), never keeps the next steps from running or the record from being saved."""
        if self.summarize is None:
            return
        try:
            self.summarize()
            self.record.pop("summary_error", None)  # an earlier failure's, now made good
        except Exception as e:  # noqa: BLE001
            self.record["summary_error"] = f"{type(e).__name__}: {e}"

    def stop(self, signum: int) -> str:
        """A signal (the device tool's time limit): the running step stops, the rows it finished and the
        preset's summary go into the record, which is saved (complete: false). A preset that had ended (the
        signal came as the next one started) keeps its complete record."""
        if self.record.get("complete"):
            return os.path.join(self.args.out, f"{self.preset}-record.json")
        if self.child is not None:
            _stop_group(self.child, grace=2.0)
            self.log.write(f"\n[gpu_check: stopped by signal {signum}]\n")
            self.log.flush()
        self.collect_rows()
        self.summary()
        self.record["error"] = f"stopped by signal {signum} (a time limit?): the steps before it are complete"
        return self.save(complete=False)

    def json_step(self, name: str, cmd: list[str], path: str, key: str, env: dict | None = None):
        if os.path.exists(path):
            os.remove(path)
        self.pending_json = (key, path)
        try:
            rc, out = self.run(name, cmd, env)
        finally:
            self.pending_json = None
        if os.path.exists(path):
            try:
                self.record[key] = json.load(open(path))
            except ValueError as e:
                self.record[key] = {"error": f"unreadable JSON: {e}"}
            # written section by section: one the step's budget cut short says so (its figures are partial)
            if isinstance(self.record[key], dict) and self.record[key].get("complete") is False:
                st = self.record["steps"][name]
                st["note"] = (st.get("note", "") + "; " if st.get("note") else "") + "partial: cut short, its JSON " \
                    "holds the sections that finished"
        return rc, out

    def save(self, complete: bool) -> str:
        """The record so far, written atomically: after every step (a preset the device tool kills keeps
        what it finished) and at the end (``complete``)."""
        self.record["wall_s"] = round(time.time() - self.t0, 1)
        self.record["complete"] = complete
        record = self.record
        if self.pending_rows is not None:  # a benchmark step still running (or stopped): its rows so far
            record = dict(record, rows=record["rows"] + rec.read_rows(self.pending_rows[1]))
        if self.pending_json is not None:  # a JSON step still running (or stopped): the sections it has written
            try:
                with open(self.pending_json[1]) as f:
                    record = dict(record, **{self.pending_json[0]: json.load(f)})
            except (OSError, ValueError):
                pass
        path = os.path.join(self.args.out, f"{self.preset}-record.json")
        # SIGTERM held off while the file is written: main's handler saves too, and the interrupted write's
        # buffer, flushed as the handler's SystemExit closes the file, would land in the replaced record
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(record, f, indent=1, default=str)
            os.replace(path + ".tmp", path)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return path

    def finish(self) -> dict:
        path = self.save(complete=True)
        self.log.close()
        print("\n".join(rec.short_lines(self.record)))
        print(f"record: {path}", flush=True)
        return self.record
