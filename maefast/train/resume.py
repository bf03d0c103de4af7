"""Continuing a run (``--resume``): which checkpoint, where in the data the run continues, and how the
options of the new command relate to the recorded ones (the resume contract, README: Training)."""
from __future__ import annotations

import os

from .checkpoint import CHECKPOINT_NAME
from .config import DTYPE_NAMES, TrainConfig, cuda_graph_mode


def resume_source(cfg: TrainConfig) -> str | None:
    """The checkpoint file to continue from: ``--resume PATH``, or with ``--resume auto`` the one in
    ``--output-dir`` if there is one (None: a fresh start)."""
    if cfg.resume == "":  # an unset shell variable: said as the option, not as a checkpoint named ''
        raise ValueError("--resume takes a checkpoint file or 'auto', got ''")
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


def start_position(ck: dict, source: str, cfg: TrainConfig, model_kwargs: dict, dataset_size: int,
                   global_batch: int, files: str | None = None) -> tuple[int, int, int]:
    """(epoch, samples of it already trained on, optimizer steps done) where this run continues checkpoint
    ``ck`` (a finished epoch is the start of the next; ``cfg`` reconciled, ``global_batch`` this run's;
    ``files`` the data set's fingerprint).
    A run with all its epochs trained gets a note in ``cfg.notes``: only what a finished run writes is left.

    Raises:
        ValueError: another model or data set than the run's, a position off this run's global batches, or
            --epochs ending the run before the position.
    """
    if ck.get("model_name") != cfg.model or ck.get("model_kwargs", model_kwargs) != model_kwargs:
        raise ValueError(f"--resume {source}: the checkpoint is {ck.get('model_name')} "
                         f"{ck.get('model_kwargs')}, this run is {cfg.model} {model_kwargs}")
    recorded_size = ck.get("schedule", {}).get("dataset_size", dataset_size)
    if recorded_size != dataset_size:
        raise ValueError(f"--resume {source}: the run trained on {recorded_size} images, --data {cfg.data} "
                         f"has {dataset_size}: another data set would change every step's samples")
    recorded_files = ck.get("schedule", {}).get("files")  # recorded since 2026-12-07
    if recorded_files and files and recorded_files != files:
        raise ValueError(f"--resume {source}: --data {cfg.data} has as many images as the run trained on, but "
                         "other file names (one renamed, or one added and another removed): another data set "
                         "would change every step's samples")
    epoch, samples, step = recorded_position(ck)
    if samples % global_batch:
        raise ValueError(f"--resume {source}: the checkpoint stopped {samples} samples into epoch {epoch}, "
                         f"not a whole number of this run's global batches of {global_batch}")
    if samples >= dataset_size // global_batch * global_batch:
        epoch, samples = epoch + 1, 0
    if epoch > cfg.epochs or (epoch == cfg.epochs and samples > 0):  # trained into epoch `epoch`
        least = epoch + (samples > 0)
        raise ValueError(f"--resume {source}: the run has trained {epoch} epochs" +
                         (f" and {samples} samples of the next" if samples else "") + f" (step {step}); "
                         f"--epochs {cfg.epochs} would end it before that: pass --epochs >= {least}")
    if epoch == cfg.epochs:  # stopped after its last checkpoint (before or during its export): finish it
        cfg.notes.append(f"--resume {source}: the run has trained all its {epoch} epochs (step {step}): "
                         "nothing left to train, only what a finished run writes")
    return epoch, samples, step


# The resume contract (README, Training). An option left out takes the checkpoint's value, except
# the per-invocation ones. One set again to another value is:
#   - refused, when it defines the run (its data order, masks, optimisation): continuing with it would
#     make a run that is neither the recorded one nor a fresh one;
#   - applied, announced and recorded, when it changes how the run is computed or kept (the same
#     steps up to float rounding, or more of them: --epochs recomputes the lr schedule from here on).
# The global batch (batch x accum x processes) defines the run too: any split of the same global
# batch resumes exactly (same samples per step, same schedule); another global batch is refused.
RUN_DEFINING = ("model", "input_size", "norm_pix_loss", "seed", "mask_ratio", "synthetic_size", "blr", "lr",
                "min_lr", "weight_decay", "warmup_epochs", "clip_grad")
CHANGEABLE = ("epochs", "data", "decode", "image_dtype", "dtype", "impl", "fused", "grad_checkpointing", "cuda_graph",
              "compile", "fsdp", "save_every_steps", "keep_every_epochs", "log_every", "export", "plot", "accum_iter",
              "batch_size")
# --save: whether this invocation writes checkpoints (a benchmark run does not), not how the run computes
PER_INVOCATION = ("device", "workers", "output_dir", "resume", "overwrite", "max_steps", "progress", "dist_timeout",
                  "save")


def _norm(name: str, value):
    """A comparable form of an option's value (model aliases, dtype spellings, ints given as floats)."""
    if value is None:
        return None
    if name == "model":
        from ..models import resolve_model_name

        try:
            return resolve_model_name(value)
        except ValueError:
            return value
    if name == "data" and value != "synthetic":
        return os.path.abspath(value)  # (recorded relative to the cwd of the start before 2026-12-07)
    if name == "dtype":
        return DTYPE_NAMES.get(value, value)
    if name == "cuda_graph":  # recorded as a bool before "auto" existed
        return cuda_graph_mode(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def recorded_global_batch(ck: dict) -> int:
    sched = ck.get("schedule", {})
    if "global_batch" in sched:
        return int(sched["global_batch"])
    return int(sched.get("batch_size", 1)) * int(sched.get("accum_iter", 1)) * int(sched.get("world_size", 1))


def reconcile(cfg: TrainConfig, ck: dict, source: str, world_size: int) -> tuple[TrainConfig, list[str], dict]:
    """``cfg`` for continuing the run of checkpoint ``ck`` on ``world_size`` processes (see the contract
    above); returns (config, notes to print, the changes {option: (recorded, new)}).

    Raises:
        ValueError: a run-defining option set to another value, or a batch that changes the global batch.
    """
    import dataclasses

    from ..cli import positive

    for name in ("accum_iter", "batch_size"):  # divided by below, before validate_config sees them
        positive(_flag(name), getattr(cfg, name))
    recorded = dict(ck.get("config") or {})
    explicit = set(cfg.explicit or ())
    values, conflicts, changed = {}, [], {}
    for name in RUN_DEFINING + CHANGEABLE:
        if name not in recorded:
            continue
        if not cfg.save and name in ("save_every_steps", "keep_every_epochs") and name not in explicit:
            continue  # --no-save writes no checkpoint: the run's checkpoint rhythm does not apply to it
        old, new = recorded[name], getattr(cfg, name)
        if name not in explicit or _norm(name, new) == _norm(name, old):
            values[name] = old
        elif name in RUN_DEFINING or (name == "data" and "synthetic" in (old, new)):
            # --data may name a moved copy of the folder; synthetic images and a folder are other data
            conflicts.append(f"{_flag(name)} {new} (the run's: {old})")
        elif name not in ("batch_size", "accum_iter"):
            # (the folder, and --dtype's name for a short spelling, as the config has them)
            changed[name] = (old, _norm(name, new) if name in ("data", "dtype") else new)
    if conflicts:
        raise ValueError(f"--resume {source}: {', '.join(conflicts)}: these options define the run and cannot change "
                         "when it continues; leave them out, or start a new run (another --output-dir)")
    global_batch = recorded_global_batch(ck)
    accum = cfg.accum_iter if "accum_iter" in explicit else int(recorded.get("accum_iter", cfg.accum_iter))
    if "batch_size" in explicit:
        batch = cfg.batch_size
    elif global_batch % (accum * world_size) == 0:
        batch = global_batch // (accum * world_size)
    else:
        # the processes divide it, the accumulation (recorded, or given) is what does not fit
        fix = (f"give an --accum-iter that divides {global_batch // world_size} (the batch per process is derived)"
               if global_batch % world_size == 0 else "resume on a number of processes that divides it")
        raise ValueError(f"--resume {source}: the run's global batch {global_batch} does not split over {world_size} "
                         f"processes x --accum-iter {accum}; {fix}")
    if batch * accum * world_size != global_batch:
        raise ValueError(f"--resume {source}: --batch-size {batch} x --accum-iter {accum} x {world_size} process(es) "
                         f"is a global batch of {batch * accum * world_size}, the run's is {global_batch} (another "
                         "would change the samples of each step, the lr and the schedule); keep the product at "
                         f"{global_batch}")
    for name, new in (("batch_size", batch), ("accum_iter", accum)):
        if name in recorded and recorded[name] != new:
            changed[name] = (recorded[name], new)
    values.update(batch_size=batch, accum_iter=accum)
    for name, (old, new) in changed.items():
        values[name] = new
    notes = []
    if changed:
        said = ", ".join(f"{_flag(k)} {old} -> {new}" for k, (old, new) in changed.items())
        notes.append(f"continuing with {said} (recorded in the checkpoint)"
                     + ("; the lr schedule is recomputed for the new --epochs from here on" if "epochs" in changed
                        else "") + ("; the same global batch: the same samples per step" if
                                    {"batch_size", "accum_iter"} & set(changed) else ""))
    return dataclasses.replace(cfg, **values), notes, {k: list(v) for k, v in changed.items()}
