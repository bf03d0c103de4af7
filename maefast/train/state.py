"""Model and optimizer state in and out of checkpoints, whatever wraps the model (nothing, DDP, FSDP)
and whichever layout the checkpoint has (see ``checkpoint``): a run saved sharded resumes on one
process, and a single-file run resumes sharded at any world size. torch's
``torch.distributed.checkpoint.state_dict`` API does the (un)sharding; keys are parameter names."""
from __future__ import annotations

import torch
import torch.distributed as dist

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
