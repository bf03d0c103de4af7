"""Process groups and model wrapping on torch's engines: DDP, or FSDP (``fully_shard``, FSDP2,
when torch has it; else FSDP1). Started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the env):
nccl on GPUs, gloo on the CPU. Without those variables everything is a no-op, world size 1."""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import RunError


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


class Heartbeat:
    """Finds a rank that stopped answering (SIGSTOP, a hung machine, a lost network) and names it.

    Each rank's thread publishes a counter in the rendezvous store every second and watches the next
    rank's (a ring: every rank is watched once, store traffic O(world)). Being a thread, it beats while
    its main thread waits in a collective or writes a checkpoint: only a process that is not running
    at all falls silent. When the watched counter has not moved for ``timeout`` seconds, the watcher
    prints one line naming that rank and ends its own process (its main thread is stuck in a
    collective with the silent rank); torchrun then stops the others. The process group's own
    timeout is set a little longer, as the backstop for a rank that runs but never arrives.
    """

    PERIOD = 1.0

    def __init__(self, info: DistInfo, timeout_s: float):
        self.info, self.timeout = info, float(timeout_s)
        self._stop = threading.Event()
        self._thread = None
        self.store = None

    def _key(self, rank: int) -> str:
        return f"maefast/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"

    def start(self) -> None:
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not self.info.distributed or not host or not port:
            return
        try:  # its own client connection: never shares a socket with the process group's use of the store
            self.store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=min(self.timeout, 30.0)))
        except Exception:  # no store to beat in (an unusual init method): no watch, the group timeout remains
            return
        self._thread = threading.Thread(target=self._run, name="maefast-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rank, world = self.info.rank, self.info.world_size
        mine, peer = self._key(rank), (rank + 1) % world
        count, seen, since = 0, None, time.monotonic()
        while not self._stop.wait(self.PERIOD):
            count += 1
            try:
                self.store.set(mine, str(count))
                value = self.store.get(self._key(peer)) if self.store.check([self._key(peer)]) else None
            except Exception:  # the store's host is gone (the launcher): no verdict on the peer
                continue
            now = time.monotonic()
            if value != seen or value == b"done":
                seen, since = value, now
            elif now - since > self.timeout and not self._stop.is_set():
                print(f"maefast train: error: rank {peer} stopped answering (no heartbeat for {now - since:.0f} s, "
                      f"--dist-timeout {self.timeout:g}); stopping the run: its last checkpoint is intact, "
                      "--resume auto continues from it", file=sys.stderr, flush=True)
                os._exit(2)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        try:
            self.store.set(self._key(self.info.rank), "done")  # a rank that finished is not a silent one
        except Exception:
            pass
        self._thread.join(timeout=5)
        self._thread = None


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


# what gloo (and NCCL's socket transport) say when a peer process is gone
_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe")


def lost_rank_error(exc: RuntimeError, info: DistInfo, timeout_s: float, margin_s: float):
    """The one-line RunError for a collective that failed because another rank went silent or away
    (torch's RuntimeError from gloo/NCCL), or None for any other error (a bug: its traceback stays)."""
    said = str(exc).lower()
    if info.distributed and "timed out" in said:  # gloo: "Timed out waiting ... for recv"
        return RunError(f"a collective waited more than --dist-timeout {timeout_s:g} s (+{margin_s:g} s) for another "
                        "rank; the last checkpoint is intact, --resume auto continues from it", quiet=not info.is_main)
    if info.distributed and any(w in said for w in _PEER_GONE):  # a rank killed (OOM killer, SIGKILL)
        return RunError("the connection to another rank was lost (it ended without a word: the launcher's report "
                        "names it and its exit code); the last checkpoint is intact, --resume auto continues from it",
                        quiet=not info.is_main)
    return None


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


def node_share_of_run(info: DistInfo) -> tuple[int, int] | None:
    """(CPUs, processes) of the run on this machine (`config.node_share` of every process's host name and CPU
    mask; collective), or None for one process."""
    if not info.distributed:
        return None
    import socket

    from .config import cpu_mask, node_share

    host = socket.gethostname()
    return node_share(all_gather_object((host, sorted(cpu_mask())), info), host)


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
    torch) the fast path shards the root only (parameters gathered once per forward). FSDP needs the
    same initial parameters on every rank (it does not broadcast): the caller seeds before building.
    """
    if fsdp:
        if not info.distributed:
            return model  # nothing to shard over one process
        fully_shard = _fully_shard()
        blocks = [m for name in ("blocks", "decoder_blocks") for m in getattr(model, name, [])]
        if not fsdp_per_block(model):
            blocks = []
        if fully_shard is not None:
            from torch.distributed.device_mesh import init_device_mesh

            if blocks and getattr(model, "impl", "reference") != "reference":
                from ..models.fast import route_blocks_through_modules

                route_blocks_through_modules(model)
            # on the run's device: fully_shard's default mesh is the machine's accelerator, where it moves the
            # parameters (a --device cpu run on a GPU machine had its model moved to the GPU)
            mesh = init_device_mesh(info.device.type, (info.world_size,))
            for block in blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
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
