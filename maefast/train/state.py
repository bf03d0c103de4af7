"""Model and optimizer state in and out of checkpoints, whatever wraps the model (nothing, DDP, FSDP)
and whichever layout the checkpoint has (see ``checkpoint``): a run saved sharded resumes on one
process, and a single-file run resumes sharded at any world size. torch's
``torch.distributed.checkpoint.state_dict`` API does the (un)sharding; keys are parameter names."""
from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import warnings

import torch
import torch.distributed as dist

from ..graphs import message_line
from . import distributed as dist_lib
from .checkpoint import (SHARDS_SUFFIX, _no_space, atomic_save, link_or_copy, reading_shards,
                         referenced_shards)
from .errors import RunError

# How the optimizer of *this* run steps; a checkpoint's values (how that run stepped) are not taken:
# a checkpoint of an eager run resumed with --cuda-graph must come back capturable, and the other way.
IMPL_FLAGS = ("capturable", "fused", "foreach")


def _api():
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    return StateDictOptions, get_state_dict, set_state_dict


def full_states(target: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with full CPU tensors keyed by parameter names (collective under
    FSDP; the result is complete on rank 0)."""
    options, get_state_dict, _ = _api()
    msd, osd = get_state_dict(target, optimizer, options=options(full_state_dict=True, cpu_offload=True))
    for g in osd.get("param_groups", []):  # --cuda-graph keeps lr as a device tensor: save a float
        if isinstance(g.get("lr"), torch.Tensor):
            g["lr"] = float(g["lr"])
    return msd, osd


def save_shards(folder: str, target: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer state into ``folder`` (collective)."""
    import torch.distributed.checkpoint as dcp

    _, get_state_dict, _ = _api()
    msd, osd = get_state_dict(target, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=folder, no_dist=not dist.is_initialized())


def restore_states(ck: dict, shards: str | None, model: torch.nn.Module, target: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, sharded: bool) -> None:
    """Loads a checkpoint's model and optimizer state into this run (collective when ``shards``).

    Args:
        ck: the checkpoint (``load_checkpoint(path, states=False)``).
        shards: its sharded-state folder, or None for a single file.
        model: the bare model; ``target``: what wraps it (DDP / FSDP), or the model itself.
        sharded: this run shards its state (FSDP over several processes).
    """
    options, get_state_dict, set_state_dict = _api()
    keep = [{k: g[k] for k in IMPL_FLAGS if k in g} for g in optimizer.param_groups]
    if shards is not None:
        import torch.distributed.checkpoint as dcp

        msd, osd = get_state_dict(target, optimizer)  # this run's layout: dcp reshards into it
        state = {"model": msd, "optimizer": osd}
        with reading_shards(shards), warnings.catch_warnings():
            # one process reading shards: torch warns "torch.distributed is disabled, unavailable or uninitialized"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(state, checkpoint_id=shards, no_dist=not dist.is_initialized())
        msd, osd, opts = state["model"], state["optimizer"], None
    elif ck.get("optimizer_format", "torch") == "torch":  # format 1 (one process / DDP): parameter ids
        if sharded:
            raise ValueError("the checkpoint is in maefast's format 1 (before sharded checkpoints): resume it "
                             "once without --fsdp; its next checkpoint resumes with --fsdp")
        model.load_state_dict(ck["model"])
        sd = dict(ck["optimizer"])
        sd["param_groups"] = [{**g, **mine} for g, mine in zip(sd["param_groups"], keep)]
        optimizer.load_state_dict(sd)
        return
    else:
        msd, osd, opts = ck["model"], ck["optimizer"], options(full_state_dict=True)
    osd = dict(osd)
    osd["param_groups"] = [{**g, **mine} for g, mine in zip(osd["param_groups"], keep)]
    set_state_dict(target, optimizer, model_state_dict=msd, optim_state_dict=osd, options=opts)


def full_model_state(target: torch.nn.Module) -> dict:
    """The model's state dict, full CPU tensors keyed by parameter names (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(target, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(meta: dict, folder: str, name: str, target: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    info, sharded: bool, keep: str | None = None) -> None:
    """Writes checkpoint ``folder/name`` (collective), and ``folder/keep`` as a copy when given.

    ``meta`` is what the file records besides the states (position, settings, RNG). Single file: the
    full states go into it (rank 0 writes). Sharded: every rank writes its shards into a new folder
    beside it, then rank 0 writes the file naming that folder and removes the folder the file named
    before. Either way the file is replaced atomically last: a failure or a kill leaves the previous
    checkpoint whole. A failure (a full disk) raises RunError on every rank, once the partial
    folder is removed.
    """
    path = os.path.join(folder, name)
    error, shards = None, None
    if sharded:
        shards = dist_lib.broadcast_object(f"{name}{SHARDS_SUFFIX}{secrets.token_hex(6)}" if info.is_main else None,
                                           info)
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            save_shards(os.path.join(folder, shards), target, optimizer)
        except (Exception, CheckpointException) as exc:  # dcp gathers every rank's failure and raises it
            error = _save_failure(path, exc)  # on all of them, as a CheckpointException (a BaseException)
        meta = {**meta, "shards": shards}
    else:
        model_sd, optim_sd = full_states(target, optimizer)
        meta = {**meta, "model": model_sd, "optimizer": optim_sd, "optimizer_format": "fqn"}
    written = False
    if info.is_main and error is None:
        try:
            atomic_save(meta, path)
        except RunError as exc:
            error = str(exc)
        except OSError as exc:  # told to every rank below (raised here, the others would wait for rank 0)
            error = _save_failure(path, exc)
        else:
            written = True
            drop_unreferenced_shards(folder, name, shards)
            if keep is not None:
                try:
                    _keep_copy(meta, folder, name, keep, shards)
                except (RunError, OSError) as exc:  # the checkpoint itself is whole: say so, keep its shards
                    _drop_failed_copy(folder, keep)
                    why = message_line(exc)
                    error = f"{name} (step {meta.get('step')}) is written, but its copy {keep} is not ({why})"
    if info.is_main and error is not None and shards is not None and not written:
        shutil.rmtree(os.path.join(folder, shards), ignore_errors=True)
    error = dist_lib.broadcast_object(error, info)
    if error is not None:
        raise RunError(error, quiet=not info.is_main)


def _save_failure(path: str, exc: BaseException) -> str:
    full = _no_space(path, exc)
    if full is not None:
        return str(full)
    if isinstance(exc, OSError) or "Errno" in str(exc):
        why = message_line(exc)
        return f"{os.path.basename(path)} not written ({why}); the previous one is intact"
    raise exc


def _keep_copy(meta: dict, folder: str, name: str, keep: str, shards: str | None) -> None:
    """``keep`` (e.g. checkpoint-0009.pth) as a copy of the checkpoint just written: hard links, no space."""
    if shards is None:
        link_or_copy(os.path.join(folder, name), os.path.join(folder, keep))
        return
    kept_shards = keep + SHARDS_SUFFIX + shards.rsplit(SHARDS_SUFFIX, 1)[1]
    link_or_copy(os.path.join(folder, shards), os.path.join(folder, kept_shards))
    atomic_save({**meta, "shards": kept_shards}, os.path.join(folder, keep))
    drop_unreferenced_shards(folder, keep, kept_shards)


def _drop_failed_copy(folder: str, keep: str) -> None:
    """After a failed kept copy: its folders but the one a ``keep`` file already there names (an earlier copy,
    e.g. before a rewind, stays whole; the run folder's upkeep rule, `referenced_shards`)."""
    current = referenced_shards(folder, only=keep)
    drop_unreferenced_shards(folder, keep, next(iter(current), None))


def drop_unreferenced_shards(folder: str, owner: str, current: str | None) -> None:
    """Removes the sharded-state folders of checkpoint file ``owner`` other than ``current``."""
    prefix = owner + SHARDS_SUFFIX
    for entry in os.listdir(folder):
        if entry.startswith(prefix) and entry != current:
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


@dataclasses.dataclass
class EpochStats:
    """Sums over all ranks of one epoch (carried in a mid-epoch checkpoint, so the epoch's record
    after a resume covers the whole epoch). loss_sum: each micro-batch's loss times its images, so the
    epoch's loss is loss_sum / images whatever the split of the global batch (ranks, accumulation)."""

    loss_sum: float = 0.0
    images: int = 0
    bad: int = 0
    time_s: float = 0.0
    bad_names: list = dataclasses.field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "EpochStats":
        """The sums a checkpoint carries (``epoch_stats``)."""
        carried = dict(saved)
        n = carried.pop("n", None)  # written before 2026-12-05: a sum of micro-batch means, n of them
        if n is not None:
            carried["loss_sum"] = carried["loss_sum"] / n * carried["images"] if n else 0.0
        return cls(**carried)
