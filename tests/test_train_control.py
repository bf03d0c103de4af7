"""StopControl in process: its agreement group (made once per run, destroyed at the run's end, also inside a
process group the caller owns), signals as stop requests (a second Ctrl-C, torchrun's repeats), the reasons'
priority across ranks, the launcher's exit, the handlers' lifetime. Signals through the CLI and under
torchrun: tests/test_train_signals.py."""
import os
import signal
import sys
import threading
import types

import pytest
import torch.distributed as dist

from maefast.train import control
from maefast.train.control import StopControl


def test_the_agreement_group_is_destroyed_at_exit(tmp_path):
    """Three runs inside a caller's (one-process gloo) group: each makes its gloo group, agrees on it
    and destroys it at exit; the caller's group lives on, no group is left behind."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        groups = set(dist.distributed_c10d._world.pg_map)
        info = types.SimpleNamespace(distributed=True)  # the agreement as under torchrun
        for _ in range(3):
            with StopControl(info) as ctl:
                ctl.setup()
                assert ctl._group in dist.distributed_c10d._world.pg_map
                assert ctl.agree() is None
        assert set(dist.distributed_c10d._world.pg_map) == groups and dist.is_initialized()
    finally:
        dist.destroy_process_group()


def _one_process():
    return types.SimpleNamespace(distributed=False)


@pytest.fixture
def clock(monkeypatch):
    """control's time.monotonic, set by the test."""
    now = [100.0]
    monkeypatch.setattr(control.time, "monotonic", lambda: now[0])
    return now


def _signal(ctl, signum):
    """A signal that must be a stop request only (a KeyboardInterrupt here would end pytest's session)."""
    try:
        ctl._on_signal(signum, None)
    except KeyboardInterrupt:
        pytest.fail(f"{signal.Signals(signum).name} stopped at once")


def test_a_signal_is_a_stop_request_and_a_second_ctrl_c_stops_at_once(clock, monkeypatch):
    """The first SIGINT/SIGTERM asks for a stop at the next step boundary; a repeat within half a second
    (the same keypress reaching the process twice) or a repeated SIGTERM changes nothing; a second Ctrl-C
    later stops at once. Under torchrun a repeat is ignored (the launcher forwards every signal)."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    ctl = StopControl(_one_process())
    assert ctl.agree() is None
    _signal(ctl, signal.SIGINT)
    assert ctl.agree() == "SIGINT"
    clock[0] += 0.4
    _signal(ctl, signal.SIGINT)
    clock[0] += 5.0
    _signal(ctl, signal.SIGTERM)
    assert ctl.reason == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        ctl._on_signal(signal.SIGINT, None)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    assert control.under_launcher()
    ctl = StopControl(_one_process())
    _signal(ctl, signal.SIGINT)
    clock[0] += 5.0
    _signal(ctl, signal.SIGINT)
    assert ctl.agree() == "SIGINT"


def test_a_ctrl_c_after_a_schedulers_sigterm_stops_at_once(clock, monkeypatch):
    """A SIGTERM asked for a stop at the next boundary; a Ctrl-C half a second or more after it stops
    now (the user wants out, the previous checkpoint is whole); within half a second (the process group's
    signal reaching the process beside it) it changes nothing, the reason staying SIGTERM."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    ctl = StopControl(_one_process())
    _signal(ctl, signal.SIGTERM)
    clock[0] += 0.3
    _signal(ctl, signal.SIGINT)
    assert ctl.agree() == "SIGTERM"
    clock[0] += 0.3
    with pytest.raises(KeyboardInterrupt):
        ctl._on_signal(signal.SIGINT, None)


def test_requests_only_raise_the_reason_and_a_local_error_stops_every_rank():
    """Reasons by priority (the agreement keeps the highest): a later request of a lower one leaves it; a
    rank's own error is agreed as "error on another rank" (the others raise "another rank failed")."""
    ctl = StopControl(_one_process())
    ctl.request("SIGINT")
    ctl.request("SIGTERM")
    assert ctl.agree() == "SIGTERM"
    ctl.request("SIGINT")
    assert ctl.agree() == "SIGTERM"
    ctl.request("launcher gone")
    ctl.request("SIGTERM")
    assert ctl.agree() == "launcher gone"
    assert ctl.agree(local_error=True) == control.REASONS[control.ERROR] == "error on another rank"
    assert StopControl(_one_process()).agree(local_error=True) == "error on another rank"
    # the shell's exit status of a process killed by the signal (128 + its number)
    assert control.EXIT_CODES == {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM,
                                  "launcher gone": 128 + signal.SIGTERM}


def _pdeathsig() -> int:
    import ctypes

    sig = ctypes.c_int(-1)
    ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    return sig.value


def test_handlers_are_installed_for_the_run_and_restored_after_it():
    """The main thread's SIGINT/SIGTERM handlers are the control's inside the block and the previous ones
    after it; outside the main thread (where Python refuses handlers) none are installed."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopControl(_one_process()) as ctl:
        assert all(signal.getsignal(s) == ctl._on_signal for s in before)
    assert {s: signal.getsignal(s) for s in before} == before
    errors = []

    def in_a_thread():
        try:
            with StopControl(_one_process()):
                pass
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join()
    assert not errors and {s: signal.getsignal(s) for s in before} == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_under_torchrun_the_launchers_exit_is_a_sigterm_and_is_named(monkeypatch):
    """Under torchrun: the kernel sends SIGTERM when the launcher dies (reset at exit); a parent that is no
    longer the launcher is a stop request ("launcher gone"), and a SIGTERM then is named as the launcher's
    exit. Outside torchrun nothing of this (the parent may change without meaning anything)."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with StopControl(_one_process()) as ctl:
        assert _pdeathsig() == signal.SIGTERM and ctl._launcher == os.getppid()
        assert ctl.agree() is None and ctl.describe("SIGTERM") == "SIGTERM"
        _signal(ctl, signal.SIGTERM)
        assert ctl.agree() == "SIGTERM"
        ctl._launcher = os.getppid() + 1  # the launcher gone: this process was re-parented
        assert ctl.launcher_gone() and ctl.describe("SIGTERM") == "the exit of its torchrun launcher"
        assert ctl.describe("SIGINT") == "SIGINT (Ctrl-C)"
        assert ctl.agree() == "launcher gone"
        fresh = StopControl(_one_process())
        fresh._launcher = ctl._launcher
        _signal(fresh, signal.SIGTERM)
        assert fresh.reason == "launcher gone"
    assert _pdeathsig() == 0
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert not control.under_launcher()
    with StopControl(_one_process()) as ctl:
        assert ctl._launcher is None and not ctl.launcher_gone() and _pdeathsig() == 0


def test_data_workers_ignore_the_stop_signals():
    """A worker's worker_init_fn: Ctrl-C and SIGTERM reach the whole process group; the workers ignore
    them (the main process stops them at a step boundary)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        control.ignore_stop_signals_in_worker(0)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in before)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _agree_on_rank(rank, store, requests, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        with StopControl(types.SimpleNamespace(distributed=True), timeout_s=60) as ctl:
            ctl.setup()
            out = [ctl.agree()]
            for reason in requests[rank]:  # one per step boundary (None: no request on this rank)
                if reason is not None:
                    ctl.request(reason)
                out.append(ctl.agree())
            out.append(ctl.agree(local_error=rank == 1))
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_for_the_highest_reason_of_any_rank(tmp_path):
    """Two ranks (forked, gloo): a request on one rank is every rank's reason at the next boundary, the
    higher of two different ones wins on both, and one rank's error stops the other as "error on another rank"."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    results = ctx.Queue()
    requests = {0: ["SIGINT", "SIGINT"], 1: [None, "launcher gone"]}
    procs = [ctx.Process(target=_agree_on_rank, args=(r, str(tmp_path / "store"), requests, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # a rank stuck in the agreement: not left behind
                p.kill()
    assert got[0] == got[1] == [None, "SIGINT", "launcher gone", "error on another rank"], got
