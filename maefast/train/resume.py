"""Continuing a run (``--resume``): which checkpoint, where in the data the run continues, and how the
options of the new command relate to the recorded ones (the resume contract, README: Training)."""
from __future__ import annotations

import os

from .checkpoint import CHECKPOINT_NAME
from .config import TrainConfig


def resume_source(cfg: TrainConfig) -> str | None:
    """The checkpoint file to continue from: ``--resume PATH``, or with ``--resume auto`` the one in
    ``--output-dir`` if there is one (None: a fresh start)."""
    if cfg.resume == "auto":
        path = os.path.join(cfg.output_dir, CHECKPOINT_NAME)
        return path if os.path.isfile(path) else None
    return cfg.resume


def recorded_position(ck: dict) -> tuple[int, int, int]:
    """(epoch, samples of that epoch already trained on, optimizer steps done) of a checkpoint.

    Format 1 recorded a per-rank micro-batch index; it is converted with that run's batch and world size.
    """
    if "samples" in ck:
        return int(ck["epoch"]), int(ck["samples"]), int(ck["step"])
    sched = ck.get("schedule", {})
    samples = int(ck.get("batch", 0)) * int(sched.get("batch_size", 1)) * int(sched.get("world_size", 1))
    return int(ck["epoch"]), samples, int(ck["step"])
