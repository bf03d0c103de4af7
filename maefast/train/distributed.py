"""Process groups and model wrapping on torch's engines: DDP, or FSDP (``fully_shard``, FSDP2,
when torch has it; else FSDP1). Started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the env):
nccl on GPUs, gloo on the CPU. Without those variables everything is a no-op, world size 1."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we destroy it at the end

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Joins the torchrun process group if there is one; picks this rank's device.

    ``device``: "cuda", "cpu" or None (CUDA when available). With CUDA each rank uses
    ``cuda:LOCAL_RANK`` and nccl; on the CPU gloo.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine")
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)
    if env_world <= 1:
        return DistInfo(0, 1, local_rank, dev, owns_group=False)
    backend = "nccl" if device == "cuda" else "gloo"
    kwargs = {"device_id": dev} if device == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=True)


def cleanup(info: DistInfo, sync: bool = True) -> None:
    """Destroys the group we created. ``sync``: barrier first (on success; seen on CPU: a rank
    that tears gloo down while a peer still finishes the last collective can abort at exit).
    After an error no barrier: the other ranks may be elsewhere, torchrun stops them."""
    if info.owns_group and dist.is_initialized():
        try:
            if sync:
                barrier(info)
        finally:
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sums a few Python numbers over ranks (float64)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed(fn, info: DistInfo):
    """Runs ``fn()`` on every rank and returns its result; when it fails on any rank, every rank stops.

    One process: ``fn``'s exception as is. Several: the failing rank raises its own exception when it is
    a bug of ours (a traceback), every other rank a RunError with the first failure's message, quiet
    except on rank 0 (printed once, not once per process). For the steps before the first one, where
    a rank that failed alone would leave the others waiting in the next collective.
    """
    from .errors import USER_ERRORS, RunError

    failure, result = None, None
    try:
        result = fn()
    except Exception as exc:  # gathered below; re-raised on this rank
        failure = exc
    if not info.distributed:
        if failure is not None:
            raise failure
        return result
    mine = None if failure is None else (str(failure), isinstance(failure, USER_ERRORS + (RunError,)))
    reports = [(r, rep) for r, rep in enumerate(all_gather_object(mine, info)) if rep is not None]
    if not reports:
        return result
    if failure is not None and not mine[1]:
        raise failure
    first_rank, (msg, user) = reports[0]
    same = len(reports) == info.world_size and len({rep[0] for _, rep in reports}) == 1
    text = msg if same else f"rank {first_rank}: {msg}" if user else f"rank {first_rank} failed: {msg}"
    raise RunError(text, quiet=not info.is_main) from failure


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
        return fully_shard
    except ImportError:
        pass
    try:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4 / 2.5
        return fully_shard
    except ImportError:
        return None


def fsdp_flavor() -> str:
    """"fsdp2" (fully_shard) when torch has it, else "fsdp1"."""
    return "fsdp2" if _fully_shard() is not None else "fsdp1"


def fsdp_per_block(model: torch.nn.Module) -> bool:
    """Whether FSDP may shard per block: forward must run through the block modules — always on the
    reference path; on maefast's fast path with FSDP2 (its blocks are then called as modules, see
    `maefast.models.fast.route_blocks_through_modules`)."""
    return getattr(model, "impl", "reference") == "reference" or _fully_shard() is not None


def wrap_model(model: torch.nn.Module, info: DistInfo, fsdp: bool = False) -> torch.nn.Module:
    """DDP (or FSDP with ``fsdp=True``) around ``model`` when distributed, else ``model`` itself.

    FSDP shards each transformer block (encoder and decoder) and the root. maefast's fast path
    reads the block weights itself, so with FSDP2 (`fully_shard`) its blocks are first made to run
    through their modules (their hooks gather and free each block's parameters); with FSDP1 (old
    torch) the fast path shards the root only (parameters gathered once per forward). FSDP needs the same initial parameters on every
    rank (it does not broadcast): the caller seeds before building.
    """
    if fsdp:
        if not info.distributed:
            return model  # nothing to shard over one process
        fully_shard = _fully_shard()
        blocks = [m for name in ("blocks", "decoder_blocks") for m in getattr(model, name, [])]
        if not fsdp_per_block(model):
            blocks = []
        if fully_shard is not None:
            if blocks and getattr(model, "impl", "reference") != "reference":
                from ..models.fast import route_blocks_through_modules

                route_blocks_through_modules(model)
            for block in blocks:
                fully_shard(block)
            fully_shard(model)
            return model
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        block_types = {type(b) for b in blocks}
        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy(block_types), use_orig_params=True,
                    device_id=info.device if info.device.type == "cuda" else None)
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, output_device=ids[0] if ids else None)
