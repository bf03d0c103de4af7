"""Stopping a run cleanly: SIGINT / SIGTERM (what Ctrl-C and schedulers send) become a stop request,
and every rank agrees, at every step boundary, on whether to stop there, so that all ranks stop at
the same step, save one checkpoint of it, and exit.

Under torchrun the agreement is a one-integer all-reduce over a gloo (CPU) group per optimizer step:
no GPU synchronisation, a few hundred microseconds on one node (to be measured on the GPU machines
beside a step). One process needs no collective.

A second Ctrl-C (outside torchrun, at least half a second after the first) stops at once, without a
checkpoint of the step in progress: the previous checkpoint is whole (writes are atomic). Under
torchrun a signal reaches a worker twice (from the terminal and again from the launcher), and the
launcher itself kills the workers if they take too long, so there a repeat is ignored.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

# Stop reasons, by priority (an all-reduce MAX keeps the highest), and the exit code each one gives.
REASONS = (None, "SIGINT", "SIGTERM", "launcher gone", "error on another rank")
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "launcher gone": 143}
ERROR = len(REASONS) - 1


def under_launcher() -> bool:
    """Whether torchrun (torch.distributed.elastic) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class StopControl:
    """Stop requests of this process and the agreement of all ranks on the step to stop at.

    Use as a context manager around the run (installs the signal handlers in the main thread, restores
    the previous ones at exit); call ``agree()`` on every rank at every step boundary.
    """

    def __init__(self, info):
        self.info = info
        self.reason: str | None = None
        self._first = 0.0
        self._old: dict = {}
        self._group = None

    def __enter__(self) -> "StopControl":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is None:
            self.reason, self._first = name, time.monotonic()
            return
        if signum == signal.SIGINT and not under_launcher() and time.monotonic() - self._first > 0.5:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now (no checkpoint of this step)

    def request(self, reason: str) -> None:
        """A stop request from inside the process (e.g. the launcher is gone)."""
        if REASONS.index(reason) > REASONS.index(self.reason):
            self.reason = reason

    def _control_group(self):
        if self._group is None:
            # its own gloo group: a CPU integer, no GPU sync, and never queued behind DDP's buckets
            self._group = dist.new_group(backend="gloo")
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
        code = ERROR if local_error else REASONS.index(self.reason)
        if self.info.distributed:
            t = torch.tensor([code], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control_group())
            code = int(t.item())
        return REASONS[code]


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C and a scheduler's SIGTERM reach the whole process group;
    a data worker killed by them makes the main process fail mid-step. The main process stops the
    workers itself (and they exit when it dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
