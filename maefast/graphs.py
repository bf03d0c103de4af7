"""CUDA-graph capture (`capture_cuda_graph`), shared by `maefast.TrainStep` (maefast/step.py: the
captured training step) and the per-op benchmarks, and what keeps a training step from being captured
(`capture_blocker`: no CUDA device, a distributed wrapper, an optimizer that is not capturable), and the
undo of a capture's warm-up (`snapshot_training` / `restore_training`).

A capture that fails inside ``torch.cuda.graph`` cannot be stepped past in the same process on
torch 2.11: its ``CUDAGraph::capture_end`` raises on the failed ``cudaStreamEndCapture`` before it
ends the capture's allocation to its memory pool (fixed by pytorch#180395, 2026-04, in 2.12), so
afterwards every ``torch.cuda.empty_cache()`` fails an internal assert (and with it every later
capture, whose ``__enter__`` calls it), frees recorded on other streams (``record_stream``: every
batch of ``maefast train``'s feed) are deferred forever, and the failed capture's memory stays
reserved (which even a torch with that fix keeps until the process exits, up to pytorch#190348,
2026-07). So failures are found before the capture where possible: the last warm-up iteration runs
with torch's sync debug mode set to "error", which raises on the host syncs that would invalidate the
capture (``.item()``, ``.cpu()``, ``nonzero``, blocking copies, ``Stream.synchronize()``; not
``torch.cuda.synchronize()`` nor a ``non_blocking`` copy from pageable memory), as a `HostSyncError`
before anything is captured. A failure inside the capture is a `CaptureError`: the caller must not
go on as if nothing happened.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections import defaultdict
from typing import Callable

import torch
import torch.nn as nn

_SYNC_MESSAGE = "called a synchronizing CUDA operation"  # c10::cuda::warn_or_error_on_sync
# one capture stream per device: graphs sharing a memory pool are best captured on the same stream
# (torch.cuda.graph's note), and torch's own default stream is one per process, made on whichever
# device was current when the first capture ran
_streams: dict[int, "torch.cuda.Stream"] = {}


class HostSyncError(RuntimeError):
    """The captured function synchronizes with the host (found by the warm-up, before any capture
    began): a capture would fail; nothing is left behind, so falling back to eager steps is safe."""


class CaptureError(RuntimeError):
    """A failure inside ``torch.cuda.graph``, after the capture began.

    Attributes:
        reason: the first line of the error that failed the capture (the first in the chain: on torch
            2.11 the one raised by ``capture_end`` only says that an earlier one invalidated it).
        broken: whether torch's CUDA caching allocator is left unusable by it (``empty_cache()``
            raises; see the module docstring). False on a torch that cleans up after a failed capture.
    """

    def __init__(self, reason: str, broken: bool):
        self.reason, self.broken = reason, broken
        state = (f"torch {torch.__version__}'s CUDA caching allocator is left unusable by it (empty_cache() fails, "
                 "memory freed across streams is never reused), so this process cannot go on" if broken else
                 "a failure inside a capture is not stepped past (its memory pool may stay reserved until the "
                 "process exits)")
        super().__init__(f"the CUDA-graph capture failed inside the graph ({reason}); {state}: run again without "
                         "capturing (capture=False), or remove what failed it (a host sync, a CPU tensor)")


def _line(exc: BaseException, width: int) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:width] if text else ""


def message_line(exc: BaseException, width: int = 200) -> str:
    """The first line of ``exc``'s message, cut at ``width``; the type's name when the message is blank
    (an ``OSError()`` still says what failed)."""
    return _line(exc, width) or type(exc).__name__


def first_line(exc: BaseException, width: int = 200) -> str:
    """``Type: first line of the message`` (cut at ``width``; ``Type`` alone for a blank message): an error
    said in one line."""
    line = _line(exc, width)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _where(exc: BaseException) -> str:
    """' at FILE:LINE in FUNC' of the innermost frame of `exc` outside torch (the model's line that
    synced: the sync itself is raised in C++), or ''."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} in {f.name}"


@contextlib.contextmanager
def _host_syncs_raise():
    """torch's sync debug mode "error" (process-wide) for the block, the previous mode restored after;
    a sync in the block becomes a HostSyncError."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as e:
        sync = next((x for x in _chain(e) if _SYNC_MESSAGE in str(x)), None)
        if sync is None:
            raise
        raise HostSyncError(f"the step synchronizes with the host{_where(sync)} (found by the warm-up, before "
                            "capture: a capture would fail on it)") from e
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def allocator_usable() -> bool:
    """Whether torch's CUDA caching allocator still works after a failed capture (its
    ``empty_cache()`` asserts that no capture is under way: it raises when one never ended)."""
    try:
        torch.cuda.empty_cache()
    except RuntimeError:
        return False
    return True


def capture_cuda_graph(fn: Callable[[], object], *, warmup_steps: int = 3, warmup_fn: Callable[[], object] | None = None,
                       before_capture: Callable[[], object] | None = None, device=None, pool=None):
    """Captures one call of `fn` in a CUDA graph; returns (graph, what that call returned: the static
    outputs each replay overwrites).

    First `warmup_fn` (default `fn`) runs `warmup_steps` times on a side stream (Triton compiles,
    autograd and cuBLAS warm up outside the capture), the last time with host syncs raising
    (with ``warmup_steps=1`` that is also the first call: a one-off sync of a first
    call, e.g. ``.item()`` in a lazy initialisation, is then reported too), then `before_capture()`
    (e.g. grads set to None, so the captured backward allocates them in the graph's pool). `pool`
    (another graph's ``pool()``) shares its memory pool: replay such graphs in the order they were
    captured. Warm-up and capture run with `device` current, the capture on a stream of that device.
    The capture is in thread_local mode: CUDA calls from other threads (the DataLoader's pin-memory
    thread) do not invalidate it, as they would in the default "global" mode.

    Raises:
        HostSyncError: the last warm-up synchronized with the host (nothing was captured).
        CaptureError: the capture itself failed (see its ``broken``); the caller's stream is current
            again (capture_end leaves its own current).
        Whatever `warmup_fn` raises (out of memory, ...), once the caller's stream waits for the
        warm-up's work (what the caller writes next is ordered after it).
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):
        current = torch.cuda.current_stream(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = _streams.get(index)
        if stream is None:
            stream = _streams[index] = torch.cuda.Stream(device=device)
        if warmup_steps:
            stream.wait_stream(current)
            try:
                with torch.cuda.stream(stream):
                    for i in range(warmup_steps):
                        last = i == warmup_steps - 1
                        with _host_syncs_raise() if last else contextlib.nullcontext():
                            (warmup_fn or fn)()
            finally:
                current.wait_stream(stream)
        if before_capture is not None:
            before_capture()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                out = fn()
        except Exception as e:
            torch.cuda.set_stream(current)
            first = list(_chain(e))[-1]  # the error that invalidated the capture, not capture_end's
            raise CaptureError(first_line(first), broken=not allocator_usable()) from e
    return graph, out


def process_broken(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a `CaptureError` that left this process's
    CUDA allocator unusable: a caller that catches errors per row or per case must stop, not go on."""
    return any(isinstance(x, CaptureError) and x.broken for x in _chain(exc))




# -- what keeps a training step from being captured (maefast.TrainStep) -----------------------------

def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


class _FreshState(dict):
    """A parameter's optimizer state created during a warm-up: keeps each tensor's value as first set (its fresh
    value: not zeros for every optimizer, e.g. NAdam's mu_product, ASGD's eta and mu, Rprop's step_size), which
    `restore_training` writes back: None for all zeros (AdamW's moments: no host copy of ViT-H's 5 GB), else a
    host copy."""

    def __init__(self):
        super().__init__()
        self.fresh = {}

    def __setitem__(self, key, value):
        if key not in self.fresh and isinstance(value, torch.Tensor):
            if value.is_cuda and torch.cuda.is_current_stream_capturing():  # (no read inside a graph: zero)
                self.fresh[key] = None
                return super().__setitem__(key, value)
            # a deliberate read, once per state, in the warm-up: not a host sync to report
            mode = torch.cuda.get_sync_debug_mode() if value.is_cuda else 0
            if mode:
                torch.cuda.set_sync_debug_mode(0)
            try:
                self.fresh[key] = _host(value) if value.numel() <= 1 or bool(value.any()) else None
            finally:
                if mode:
                    torch.cuda.set_sync_debug_mode(mode)
        super().__setitem__(key, value)


def snapshot_training(params: list, optimizer: torch.optim.Optimizer, scaler) -> tuple:
    """Host copies of what a warm-up changes: the parameters, the optimizer's tensor state, its groups' lrs
    (tensors) and an enabled GradScaler's scale and growth tracker (`restore_training` writes them back); the
    state that the warm-up creates keeps its fresh values (`_FreshState`).
    Through host memory: a device copy of a ViT-H's weights and AdamW state would add ~10 GB to the peak."""
    state = {p: {k: _host(v) for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)}
             for p in params if p in optimizer.state}
    lrs = [_host(g["lr"]) for g in optimizer.param_groups]
    kept = [_host(t) for t in (scaler._scale, scaler._growth_tracker)] if scaler is not None and scaler.is_enabled() \
        else None
    saved = [_host(p) for p in params], state, lrs, kept
    # last, once nothing above can fail (restore_training puts torch's plain dict back); a factory of one's own stays
    if isinstance(optimizer.state, defaultdict) and optimizer.state.default_factory is dict:
        optimizer.state.default_factory = _FreshState
    return saved


@torch.no_grad()
def restore_training(saved: tuple, params: list, optimizer: torch.optim.Optimizer, scaler) -> None:
    """`snapshot_training`'s values written into the same tensors (a graph replays on their addresses); state
    created since back to its fresh values (zero where they are unknown)."""
    values, state, lrs, kept = saved
    fresh = {}  # first, whatever fails below: torch's plain dicts back (a checkpoint pickles them; weights_only)
    if isinstance(optimizer.state, defaultdict) and optimizer.state.default_factory is _FreshState:
        optimizer.state.default_factory = dict
        for p, s in list(optimizer.state.items()):
            if isinstance(s, _FreshState):
                fresh[p] = s.fresh
                optimizer.state[p] = dict(s)  # the same tensors
    for p, v in zip(params, values):
        p.copy_(v)
    for p in params:
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                old = state[p].get(k) if p in state else None
                old = old if old is not None else fresh.get(p, {}).get(k)
                v.copy_(old) if old is not None else v.zero_()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"].copy_(lr)
    if kept is not None:
        scaler._scale.copy_(kept[0])
        scaler._growth_tracker.copy_(kept[1])


def unwrap(model: nn.Module) -> list[nn.Module]:
    """`model` and what it wraps: torch.compile's OptimizedModule (_orig_mod), DDP (.module), FSDP1
    (registered as _fsdp_wrapped_module; its .module is a property)."""
    chain = [model]
    while True:
        m = chain[-1]
        inner = m._modules.get("_orig_mod")
        if inner is None and hasattr(m, "no_sync"):
            inner = m._modules.get("module", m._modules.get("_fsdp_wrapped_module"))
        if not isinstance(inner, nn.Module):
            return chain
        chain.append(inner)


def fsdp1_wrapper(model: nn.Module) -> nn.Module | None:
    """An FSDP1 wrapper in `model` (its chain or any submodule), or None (FSDP1 is looked for only where whoever
    wrapped the model imported it: its import costs ~1 s)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return None
    return next((m for m in model.modules() if isinstance(m, fsdp.FullyShardedDataParallel)), None)


def step_scaler(model: nn.Module, optimizer, device: torch.device, dtype: torch.dtype, scaler
                ) -> torch.amp.GradScaler | bool:
    """TrainStep's ``scaler`` checked, or made for fp16 where it is None (False: none). FSDP1 shards the
    gradients: a plain GradScaler finds each rank's infs in its own shard alone, so one rank skipped a step the
    others took and their scales parted (the next gradients were summed at different scales); torch's
    ShardedGradScaler agrees them over the wrapper's process group: made there, and a plain one refused. Its
    all-reduce is in `unscale_`, which torch's GradScaler.step skips for a fused optimizer (whose step unscales
    itself; with clipping its found_inf has the wrong shape): such an optimizer is refused there."""
    if scaler is not None and scaler is not False and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, False or None, got {type(scaler).__name__}")
    wrapper = fsdp1_wrapper(model)
    if wrapper is None:
        return (torch.amp.GradScaler(device.type) if dtype == torch.float16 else False) if scaler is None else scaler
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler  # (FSDP1 is imported: costs nothing)

    if scaler is None:
        if dtype != torch.float16:
            return False
        scaler = ShardedGradScaler(device.type, process_group=wrapper.process_group)
    elif scaler is False or not scaler.is_enabled():
        return scaler
    elif not isinstance(scaler, ShardedGradScaler):
        raise ValueError("scaler: under FSDP1 a plain GradScaler sees only its rank's gradient shard (ranks would skip "
                         "different steps); pass torch's ShardedGradScaler, or scaler=None for one")
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        raise ValueError(f"optimizer: a fused {type(optimizer).__name__} under FSDP1 with fp16's ShardedGradScaler "
                         "(torch's GradScaler.step skips the all-reduce of the ranks' inf checks for it): build it "
                         "with fused=False")
    return scaler


def sync_wrapper(model: nn.Module) -> nn.Module | None:
    """The distributed wrapper in `model`'s chain: one with no_sync() (DDP, FSDP1) or
    set_requires_gradient_sync() (FSDP2); None for a plain model."""
    for m in unwrap(model):
        if hasattr(m, "no_sync") or hasattr(m, "set_requires_gradient_sync"):
            return m
    return None


def drop_unsharded_grads(model: nn.Module) -> None:
    """Drops the gradients that FSDP2 (`fully_shard`) holds on its *unsharded* parameters: micro-batches
    run with ``set_requires_gradient_sync(False)`` accumulate there, out of reach of the optimizer's
    zero_grad (which clears the sharded parameters' ``.grad``); torch has no public call for it."""
    for m in model.modules():
        state_of = getattr(m, "_get_fsdp_state", None)
        if state_of is None:
            continue
        state = state_of()
        groups = getattr(state, "_fsdp_param_groups", None)  # (older torch: one _fsdp_param_group)
        groups = groups if groups is not None else [g for g in [getattr(state, "_fsdp_param_group", None)] if g]
        for group in groups:
            for fp in group.fsdp_params:
                if hasattr(fp, "_unsharded_param"):
                    fp._unsharded_param.grad = None
                fp.unsharded_accumulated_grad = None


def group_scalars(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's Python values, which a captured step's graphs were recorded with (not its lr, a
    tensor they read, nor lr_scale: set_lr's, which writes that tensor)."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "lr_scale") and not isinstance(v, torch.Tensor)}
            for g in optimizer.param_groups]


def scalars_change(optimizer: torch.optim.Optimizer, baked: list[dict]) -> str | None:
    """Why the groups' Python values are no longer ``baked`` (`group_scalars` at the capture); None when not."""
    changed = [f"group {i} {k}" for i, (was, g) in enumerate(zip(baked, group_scalars(optimizer)))
               for k in was if g.get(k) != was[k]]
    if not changed:
        return None
    return (f"{', '.join(changed)} changed after the capture: the captured graphs keep the values they were "
            "captured with (only the learning rate is a tensor they read; set it with set_lr); build a new "
            "TrainStep, or step eagerly (capture=False)")


def groups_change(optimizer: torch.optim.Optimizer, captured: int) -> str | None:
    """Why the optimizer's param groups are no longer those a captured step was captured with: groups added, or
    an lr set as a number (a hand-written schedule's group["lr"] = value) in place of the tensor the graphs read;
    None when neither."""
    groups = len(optimizer.param_groups)
    if groups != captured:
        return (f"the optimizer has {groups} param groups, {captured} when the step was captured (an "
                "add_param_group() since?): the captured graphs step only the parameters they were captured with. "
                "Add groups before the step's first call, or build a new TrainStep")
    for i, g in enumerate(optimizer.param_groups):
        if not isinstance(g["lr"], torch.Tensor):
            return (f"param group {i}'s lr was set to a {type(g['lr']).__name__} after the capture: the captured "
                    "graphs read the lr tensor it held. Set learning rates with step.set_lr() (it puts that tensor "
                    "back) or a torch.optim.lr_scheduler (it writes into the tensor)")
    return None


def train_modes(model: nn.Module, params: list, before: tuple | None = None) -> tuple:
    """Which of `params` require grad, and which of `model`'s modules (listed once) are in training mode, for
    `mode_change`. ``before``: this answer before the warm-up; a module whose mode the warm-up changed (the
    model sets it in its own forward: an eval() of a frozen part) is the model's to manage, left out."""
    mods = list(model.modules())
    modes = [m.training for m in mods]
    if before is not None:
        was = {id(m): t for m, t in zip(before[1], before[2])}
        kept = [i for i, (m, t) in enumerate(zip(mods, modes)) if was.get(id(m), t) == t]
        mods, modes = [mods[i] for i in kept], [modes[i] for i in kept]
    return [p.requires_grad for p in params], mods, modes


def mode_change(model: nn.Module, params: list, was: tuple) -> str | None:
    """What changed since `train_modes` returned `was` that a captured step's replays would ignore (they replay
    the backward and update of the parameters that required grad, the forward in the modules' modes then:
    dropout, batch norm), or None. Checked on every replay: ~tens of microseconds for ViT-H's 500 parameters."""
    grads, mods, modes = was
    if [p.requires_grad for p in params] == grads and [m.training for m in mods] == modes:
        return None
    i = next((i for i, (p, g) in enumerate(zip(params, grads)) if p.requires_grad != g), None)
    if i is not None:
        name = next((n for n, p in model.named_parameters() if p is params[i]), f"parameter {i}")
        if grads[i]:
            return f"{name} was frozen (requires_grad=False) after the capture: the captured graphs go on updating it"
        return f"{name} was unfrozen (requires_grad=True) after the capture: the captured graphs never update it"
    names = {id(m): n for n, m in model.named_modules()}
    m, training = next((m, t) for m, t in zip(mods, modes) if m.training != t)
    name = names.get(id(m)) or "the model"
    if training:
        return (f"{name} was switched to eval mode after the capture: the captured graphs go on running it in "
                "train mode (call model.train() after evaluating)")
    return f"{name} was switched to train mode after the capture: the captured graphs go on running it in eval mode"


def capture_blocker(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, device: torch.device) -> str | None:
    """Why a step of `model` with `optimizer` (and `scaler`) cannot be captured in a CUDA graph on
    `device`, or None when nothing known prevents it (the capture itself may still fail: a host sync
    in the forward, a CPU tensor)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (the model is on {device.type})"
    wrapper = sync_wrapper(model)
    if wrapper is not None:
        return f"{type(wrapper).__name__} steps eagerly: its gradient communication is not captured here"
    for group in optimizer.param_groups:
        if "capturable" not in group:  # e.g. SGD: its step reads the learning rate on the host (.item())
            return f"{type(optimizer).__name__} has no capturable option (its step reads values on the host)"
        if not group["capturable"]:
            return (f"{type(optimizer).__name__} was built without capturable=True (its step counts live on "
                    "the host)")
    if scaler is not None and scaler.is_enabled() and not getattr(optimizer, "_step_supports_amp_scaling", False):
        return (f"GradScaler steps {type(optimizer).__name__} after reading found_inf on the host (a sync); "
                "a fused AdamW (fused=True) takes it on the device, or use bf16")
    return None


__all__ = ["capture_cuda_graph", "CaptureError", "HostSyncError", "allocator_usable", "process_broken",
           "snapshot_training", "restore_training", "capture_blocker", "sync_wrapper", "unwrap", "train_modes",
           "mode_change", "groups_change", "group_scalars", "scalars_change", "fsdp1_wrapper", "step_scaler",
           "drop_unsharded_grads"]
