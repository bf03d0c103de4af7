"""Stopping a run cleanly: SIGINT / SIGTERM (what Ctrl-C and schedulers send) become a stop request,
and every rank agrees, at every step boundary, on whether to stop there, so that all ranks stop at
the same step, save one checkpoint of it, and exit.

Under torchrun the agreement is a one-integer all-reduce over a gloo (CPU) group per optimizer step:
no GPU synchronisation, a few hundred microseconds on one node (to be measured on the GPU machines
beside a step). One process needs no collective.

A Ctrl-C after a stop request (a first Ctrl-C or a scheduler's SIGTERM; outside torchrun, at least
half a second after it) stops at once, without a checkpoint of the step in progress: the previous
checkpoint is whole (writes are atomic). A repeated SIGTERM changes nothing. Under
torchrun a signal reaches a worker twice (from the terminal and again from the launcher), and the
launcher itself kills the workers if they take too long, so there a repeat is ignored.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

# Stop reasons, by priority (an all-reduce MAX keeps the highest), and the exit code each one gives.
REASONS = (None, "SIGINT", "SIGTERM", "launcher gone", "error on another rank")
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "launcher gone": 143}
SAID = {"SIGINT": "SIGINT (Ctrl-C)", "SIGTERM": "SIGTERM", "launcher gone": "the exit of its torchrun launcher"}
ERROR = len(REASONS) - 1


def under_launcher() -> bool:
    """Whether torchrun (torch.distributed.elastic) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class StopControl:
    """Stop requests of this process and the agreement of all ranks on the step to stop at.

    Use as a context manager around the run (installs the signal handlers in the main thread, restores
    the previous ones at exit); call ``agree()`` on every rank at every step boundary.
    """

    def __init__(self, info, timeout_s: float = 1800.0):
        self.info, self.timeout = info, float(timeout_s)
        self.reason: str | None = None
        self._first = 0.0
        self._old: dict = {}
        self._group = None
        self._launcher: int | None = None

    def __enter__(self) -> "StopControl":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_signal)
        if under_launcher():
            # Workers outlive a SIGKILLed torchrun (orphans that go on training): have the kernel send
            # SIGTERM when the launcher dies, which stops the run like a scheduler's SIGTERM; the parent
            # pid is also checked at every step (other systems, or a launcher gone before this line).
            self._launcher = os.getppid()
            _parent_death_signal(signal.SIGTERM)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        if self._launcher is not None:
            _parent_death_signal(0)
        if self._group is not None:
            # destroyed with the default group only when maefast made that one: a caller's process group
            # would otherwise keep one gloo group (its sockets and threads) per train() call
            if dist.is_initialized():
                dist.destroy_process_group(self._group)
            self._group = None

    def describe(self, reason: str) -> str:
        """How the stop message names ``reason``. A SIGTERM from the kernel on the launcher's death can
        arrive while the dying launcher is still our parent (once per exiting launcher thread), so
        whether the launcher is gone is asked again when the message is written."""
        return SAID["launcher gone" if reason == "SIGTERM" and self.launcher_gone() else reason]

    def launcher_gone(self) -> bool:
        return self._launcher is not None and os.getppid() != self._launcher

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM and self.launcher_gone():
            name = "launcher gone"
        if self.reason is None:
            self.reason, self._first = name, time.monotonic()
            return
        if signum == signal.SIGINT and not under_launcher() and time.monotonic() - self._first > 0.5:
            raise KeyboardInterrupt  # Ctrl-C after a stop request: stop now (no checkpoint of this step)

    def request(self, reason: str) -> None:
        """A stop request from inside the process (e.g. the launcher is gone)."""
        if REASONS.index(reason) > REASONS.index(self.reason):
            self.reason = reason

    def _control_group(self):
        if self._group is None:
            # its own gloo group: a CPU integer, no GPU sync, and never queued behind DDP's buckets
            import datetime

            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout))
        return self._group

    def setup(self) -> None:
        """Collective: creates the agreement's group on every rank (call once, before the first step)."""
        if self.info.distributed:
            self._control_group()

    def agree(self, local_error: bool = False) -> str | None:
        """The reason to stop at this step boundary (None: go on); the same on every rank.

        Args:
            local_error: this rank hit an error that it raises after the agreement (the others stop
                too, with reason "error on another rank").
        """
        if self.launcher_gone():
            self.request("launcher gone")
        code = ERROR if local_error else REASONS.index(self.reason)
        if self.info.distributed:
            t = torch.tensor([code], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control_group())
            code = int(t.item())
        return REASONS[code]


def _parent_death_signal(sig: int) -> None:
    """Linux prctl(PR_SET_PDEATHSIG): ``sig`` is sent to this process when its parent dies (0: never)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C and a scheduler's SIGTERM reach the whole process group;
    a data worker killed by them makes the main process fail mid-step. The main process stops the
    workers itself (and they exit when it dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
