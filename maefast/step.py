"""`maefast.TrainStep`: one MAE training step (forward, backward, optimizer step), eager or captured
whole in one CUDA graph. `maefast train`, the step benchmarks, `maefast profile` and users all step
through it.

At the batch sizes MAE trains with, an eager step is launch-bound on a fast GPU (the official ViT-B
step at batch 64 reached 10% MFU on an H200, 2026-11-27; maefast's captured ViT-H/14 step at batch
128 ran 114 ms against 124 ms eager, 2026-12-04). A captured step replays forward, backward, the
optimizer (AdamW with ``capturable=True``; fused AdamW also takes fp16's GradScaler without a host
sync: the scaler hands it ``grad_scale``/``found_inf`` as device tensors and updates its scale on
the device) and the learning rate (a device tensor ``set_lr`` writes) without Python or per-kernel
launch cost. The mask is drawn on the device: from a device seed that the graph advances by one per
call (maefast's models), from the caller's per-call noise (the official convention), or by the
model itself (the official code's ``torch.rand``: torch's CUDA generator hands each replay fresh
numbers).

    step = maefast.TrainStep(model, optimizer, dtype=torch.bfloat16)   # captured on CUDA, else eager
    for imgs in loader:
        step.set_lr(schedule(it))        # optional
        loss = step(imgs)                # a 0-d tensor; read it (.item()) only when you log

Capturing needs: a CUDA model, an optimizer built with ``capturable=True`` (fused AdamW for fp16),
no distributed wrapper (DDP / FSDP communicate outside the graph), batches of one shape, and a
forward without host syncs. ``capture="auto"`` (default) captures when it can and otherwise steps
eagerly with the reason in ``step.eager_reason``; ``capture=True`` raises instead; ``False`` is eager.
``auto`` falls back only for reasons found before the capture begins (the checks above, or a host
sync that the last warm-up step finds): a capture that fails inside the graph leaves torch 2.11's
CUDA allocator unusable (maefast/graphs.py), so it raises `maefast.graphs.CaptureError` whatever
``capture`` says, and the step refuses further calls.
"""
from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict

import torch
import torch.nn as nn

from . import graphs
from ._lrs import mark_read_by_graphs, own_lr_per_scale, set_group_lrs
from ._modules import package
from .graphs import capture_blocker, sync_wrapper, unwrap
from .models.routing import step_seed
from ._step_settings import RANK_STRIDE, SEED_LIMIT, SETTING_CHECKS, check_dtype, check_seed, checked_setting
from ._validate import check_bool, check_nonneg_number, check_pixel_stat_args


class TrainStep:
    """One MAE training step of `model` with `optimizer`; each call is one (micro-)batch.

    Args:
        model: an MAE whose ``forward(imgs, mask_ratio=..., noise=None)`` returns the loss first (the
            official convention: ``(loss, pred, mask)``), or a ``torch.compile``/DDP/FSDP wrapper of
            one. ``return_pred=False`` is passed when the forward takes it (maefast's head then runs on
            the masked rows only), ``seed=`` when it takes one (and its ``impl`` is not "reference").
        optimizer: over the model's parameters; for a captured step built with ``capturable=True``
            (``torch.optim.AdamW(..., fused=True, capturable=True)``: one kernel, and fp16-capturable).
        dtype: the autocast dtype: torch.bfloat16 or torch.float16 (autocast), torch.float32 (none).
            Default: bf16 on CUDA, fp32 elsewhere. It rules inside a caller's autocast region too: the
            forward runs under the step's own, the backward and the update under none.
        mask_ratio: the fraction of patches removed, in (0, 1). A model that takes its ratio from
            ``config.mask_ratio`` (transformers' ViTMAE, patched or not, or any model whose forward has no
            ``mask_ratio`` parameter) must agree (else ValueError, when built and on every call, replays
            too); a forward without the parameter (nor ``**kwargs``) gets none passed, its own ratio
            applies, and a step built with another ratio than 0.75 for it is refused.
        scaler: a ``torch.amp.GradScaler`` (e.g. one restored from a checkpoint; a disabled one is
            fine), False for none, or None: a new one for fp16 (a ShardedGradScaler under FSDP1), none otherwise.
        accum_steps: gradient accumulation: the optimizer steps on every accum_steps-th call (or when
            a call passes ``update=True``), each micro-batch's loss scaled by 1/accum_steps.
        clip_grad: max global gradient norm (unscaled first under a GradScaler), or None.
        capture: "auto" (capture when it can, else eager with ``eager_reason``), True (capture or
            raise), False (eager). A capture that fails inside the graph raises
            `maefast.graphs.CaptureError` either way (the process cannot go on capturing or eagerly).
        seed: the masks' Philox seed (models that take ``seed=``; a patched official-layout model's call
            that runs its original forward without ``noise`` draws its own): call k draws with seed + k,
            on rank r of torch.distributed with (seed + r * S) mod 2**62 + k, S = 0x9E3779B97F4A7C15 mod 2**62
            (the official code seeds seed + rank), so one seed for every rank gives each its own masks. None: drawn
            from torch's default generator (``torch.manual_seed`` reproduces it). To continue a run's masks
            in a new step (a resume), pass ``seed=old.seed + old.calls`` (rank 0's is every rank's).
        warmup_steps: eager optimizer steps before the capture (Triton compiles, torch.compile,
            autograd and cuBLAS warm up); undone afterwards unless ``restore=False``. The last one runs
            with host syncs raising (torch's sync debug mode): a sync found there is a reason to step
            eagerly, found before anything is captured.
        restore: put the parameters, optimizer state, learning rates, scaler and seed back as they
            were before the warm-up (the weights go through host memory: a device copy of a ViT-H's
            weights and AdamW state would add ~10 GB to the peak). False keeps the warm-up's updates
            (benchmarks: saves the copy), counted in ``calls``/``optimizer_steps`` (the masks go on after them).
        mean, std: the per-channel statistics that normalise uint8 images (C floats each), passed on to a
            forward that takes them (maefast's models and patched ones normalise inside the kernels);
            None: ImageNet's for uint8 images, none for float ones (already normalised).

    Attributes:
        captured: whether calls replay a CUDA graph (decided by the first call or ``prepare``).
        eager_reason: why the step runs eagerly (None while capturing or captured).
        mask_source: "seed", "noise" or "model" (decided by the first call).
        static_imgs, static_noise: a captured step's input buffers (each call copies its inputs in,
            unless it passes these very tensors).
        calls, optimizer_steps: micro-batches and optimizer steps run through this object (a step fp16's
            GradScaler skipped for infs counts: the learning-rate schedule moves on, as in the official loop).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, dtype: torch.dtype | None = None,
                 mask_ratio: float = 0.75, scaler=None, accum_steps: int = 1, clip_grad: float | None = None,
                 capture: bool | str = "auto", seed: int | None = None, warmup_steps: int = 3, restore: bool = True,
                 mean=None, std=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if (first := next(model.parameters(), None)) is None:
            raise ValueError("model has no parameters to train")
        self.device = first.device
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        check_dtype(dtype)
        if capture not in ("auto", True, False) or (capture != "auto" and not isinstance(capture, bool)):
            raise ValueError(f"capture must be 'auto', True or False, got {capture!r}")
        for name, v in (("mask_ratio", mask_ratio), ("restore", restore), ("accum_steps", accum_steps),
                        ("warmup_steps", warmup_steps), ("clip_grad", clip_grad)):
            SETTING_CHECKS[name](v)
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        # rank r's masks: seed + r * stride + k (the official code seeds seed + rank): the seed a run is given,
        # or resumed with from rank 0's checkpoint, is the same on every rank, their masks are not
        self._rank_offset = rank * RANK_STRIDE
        seed = check_seed(seed)
        scaler = graphs.step_scaler(model, optimizer, self.device, dtype, scaler)
        self.model, self.optimizer = model, optimizer
        self.dtype, self.mask_ratio = dtype, mask_ratio
        self.scaler = scaler if scaler is not False else None
        self.accum_steps, self.clip_grad = accum_steps, clip_grad
        self.seed, self.warmup_steps, self.restore = seed, warmup_steps, restore
        self._capture = capture
        self._params = self._optimizer_params()
        inner = unwrap(model)[-1]
        try:
            takes = inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):
            takes = {}
        self._fwd_kwargs = {"return_pred": False} if "return_pred" in takes else {}
        # transformers' ViTMAE reads its ratio from its config on every call (unpatched, it drops an unknown
        # mask_ratio= into **kwargs): the step checks on every call, replays too, that the two agree
        cfg = getattr(inner, "config", None)
        reads_cfg = "mask_ratio" not in takes or any(package(c) == "transformers" for c in type(inner).__mro__)
        self._config = cfg if reads_cfg and isinstance(getattr(cfg, "mask_ratio", None), (int, float)) else None
        # a forward naming no mask_ratio and taking no **kwargs cannot take one (an unreadable signature: passed)
        open_kw = not takes or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values())
        self._pass_ratio = "mask_ratio" in takes or (self._config is None and open_kw)
        checked_setting(self, "mask_ratio", mask_ratio)  # (now that the forward's signature is known)
        self._check_config_ratio()
        self.mean, self.std = check_pixel_stat_args(mean, std)
        if self.mean is not None and takes and not ("mean" in takes and "std" in takes):  # not into a **kwargs
            raise ValueError(f"mean/std: {type(inner).__name__}.forward takes no mean= and std=; normalise the "
                             "images before the step instead")
        # maefast's class with impl="reference" runs the official forward, which refuses seed=
        self._takes_seed = "seed" in takes and getattr(inner, "impl", None) != "reference"
        self._sync = sync_wrapper(model)
        self.eager_reason = "capture=False" if capture is False else capture_blocker(model, optimizer, self.scaler,
                                                                                      self.device)
        if capture is True and self.eager_reason is not None:
            raise ValueError(f"capture=True: {self.eager_reason}")
        self.captured = False
        self.mask_source: str | None = None
        self.static_imgs = self.static_noise = None
        self.calls = self.optimizer_steps = 0
        self._in_cycle = 0  # micro-batches since the last optimizer step
        self._graphs: dict[bool, tuple] = {}  # update? -> (graph, static loss)
        self._replaying = False  # (a CPU stand-in's replay runs the Python body again)
        self._refused: str | None = None  # why this step takes no more calls (its capture failed for good)

    def _optimizer_params(self, known: list | None = None) -> list:
        """The optimizer's parameters, each the model's (``known`` when they still are those)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if known is not None and len(params) == len(known) and all(a is b for a, b in zip(params, known)):
            return known
        own = {id(p) for p in self.model.parameters()}
        stray = next((i for i, p in enumerate(params) if id(p) not in own), None)
        if stray is not None:  # it would step tensors the model never uses: nothing would train
            raise ValueError(f"optimizer: its parameter {stray} (shape {tuple(params[stray].shape)}) is not "
                             "one of the model's; build the optimizer over model.parameters()")
        return params

    # baked into a captured step's graphs: changing one afterwards would be honoured by eager steps only
    _FROZEN_WHEN_CAPTURED = ("mask_ratio", "clip_grad", "accum_steps", "dtype", "scaler", "seed", "model", "optimizer",
                             "mean", "std")

    def __setattr__(self, name, value):
        if name in self._FROZEN_WHEN_CAPTURED and self.__dict__.get("captured"):
            raise AttributeError(f"{name} is baked into the captured graphs: build a new TrainStep to change it")
        if name in SETTING_CHECKS:  # an eager step's settings may change, to what the constructor takes
            value = checked_setting(self, name, value)
        super().__setattr__(name, value)

    @property
    def _stream_seed(self) -> int:  # this rank's first mask seed (call k draws with it + k)
        return (self.seed + self._rank_offset) % SEED_LIMIT

    # -- the pieces of an eager step (`maefast profile` times them apart) ---------------------------

    def _autocast(self, cache: bool = True):
        if self.dtype == torch.float32:  # the step's dtype rules, also inside a caller's autocast region
            return torch.autocast(self.device.type, enabled=False)
        # a CUDA graph must not keep autocast's cast cache (torch.cuda.graph's documented requirement)
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=cache)

    def _check_config_ratio(self) -> None:
        if self._config is not None and self._config.mask_ratio != self.mask_ratio:
            r = self._config.mask_ratio
            raise ValueError(f"mask_ratio={self.mask_ratio}, but {type(unwrap(self.model)[-1]).__name__} takes its "
                             f"ratio from model.config.mask_ratio ({r}): build the step with mask_ratio={r} or set it")

    def _loss(self, imgs: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor | None,
              cache: bool = True) -> torch.Tensor:
        kw = dict(self._fwd_kwargs)
        self._check_config_ratio()
        if self._pass_ratio:
            kw["mask_ratio"] = self.mask_ratio
        if self.mean is not None:
            kw["mean"], kw["std"] = self.mean, self.std
        if self.mask_source == "noise":
            kw["noise"] = noise
        elif self.mask_source == "seed":
            kw["seed"] = seed
        with self._autocast(cache), step_seed():
            out = self.model(imgs, **kw)
        try:  # (a transformers ModelOutput's [0] is its loss; a plain dict, None or () have no first item)
            loss = out if isinstance(out, torch.Tensor) else out[0]
        except (KeyError, IndexError, TypeError):
            loss = out
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("the model's forward must return the scalar loss (alone or first, as the official "
                             f"(loss, pred, mask)), got {type(loss).__name__} "
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        return loss

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The next micro-batch's forward under the step's autocast (eager steps only).

        Args:
            imgs: (N, C, H, W) float images on the model's device, or uint8 (see ``mean``/``std``).
            noise: (N, L) float, the official per-sample noise that orders the patches; give it on
                every call or on none.
        Returns:
            the 0-d loss, attached to the autograd graph.
        """
        if self.captured:
            raise RuntimeError("forward/backward/optimizer_step are the eager step's pieces; this step is captured")
        if self._refused is not None:
            raise RuntimeError(f"this step takes no more calls: {self._refused}")
        if self.mask_source is None and self.eager_reason is None:
            self.eager_reason = "stepped through forward()/backward()/optimizer_step() before any call"
        self._set_mask_source(noise)
        # a host seed: the op reads it without waiting on the GPU; a compiled model sees a tensor, not a
        # new int per call (which would recompile)
        seed = torch.tensor([self._stream_seed + self.calls], dtype=torch.int64) if self.mask_source == "seed" else None
        loss = self._loss(imgs, noise, seed)
        self.calls += 1
        return loss

    def backward(self, loss: torch.Tensor, weight: float = 1.0) -> None:
        """Backward of ``loss * weight / accum_steps`` (through the GradScaler when there is one)."""
        if self.captured and not self._replaying:  # the graphs own the gradients' buffers
            raise RuntimeError("forward/backward/optimizer_step are the eager step's pieces; this step is captured")
        factor = check_nonneg_number("weight", weight) / self.accum_steps
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a torch.Tensor (what forward returned), got {type(loss).__name__}")
        if loss.dim() != 0:
            raise ValueError(f"loss must be a 0-d tensor (the scalar loss), got shape {tuple(loss.shape)}")
        if not loss.requires_grad and torch.is_grad_enabled():  # (torch: "element 0 of tensors does not require grad")
            raise ValueError("the model's loss does not require grad: none of the parameters it was computed from "
                             "requires grad (a model frozen whole, or a forward that detaches its loss?)")
        scaled = loss if factor == 1.0 else loss * factor
        # a caller's autocast region would turn the backward's matmuls to its dtype (an fp32 step's
        # gradients in bf16): each backward op takes its forward op's dtype, as in torch's AMP recipe
        with torch.autocast(self.device.type, enabled=False):
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def _update(self) -> None:
        # unscale (if clipping), clip, step, scale update: every piece runs on the device, in the
        # optimizer's own dtypes whatever autocast region the caller is in
        with torch.autocast(self.device.type, enabled=False):
            if self.clip_grad is not None:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                # in the model's order, as the official loop's clip_grad_norm_(model.parameters()): the norms are
                # summed in the order given (the groups' order, e.g. [no decay, decay], differs in the last bits)
                mine = {id(p) for p in self._params}
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if id(p) in mine], self.clip_grad)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()

    def optimizer_step(self) -> None:
        """Clip, optimizer (and scaler) step, gradients set to None (eager steps only)."""
        if self.captured:
            raise RuntimeError("forward/backward/optimizer_step are the eager step's pieces; this step is captured")
        self._params = self._optimizer_params(self._params)  # a group added since (add_param_group): clipped too
        self._update()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        self._in_cycle = 0

    # -- the step -------------------------------------------------------------------------------------

    def __call__(self, imgs: torch.Tensor, noise: torch.Tensor | None = None, *, weight: float = 1.0,
                 update: bool | None = None) -> torch.Tensor:
        """One micro-batch: forward, backward and, when it ends the accumulation, the optimizer step.

        Args:
            imgs: (N, C, H, W) float images on the model's device, or uint8 ones (normalised with ``mean``/
                ``std``); captured: the first call's shape and dtype (``step.static_imgs`` itself: no copy).
            noise: (N, L) per-sample noise ordering the patches (the official convention), on every
                call or on none.
            weight: the loss's weight in the accumulated gradient (eager only; e.g. 0 for a batch a
                distributed run must step through without data).
            update: step the optimizer after this micro-batch; default: every accum_steps-th call.
        Returns:
            the micro-batch's loss, 0-d, detached, unscaled (captured: overwritten by the next call).
        """
        weight = check_nonneg_number("weight", weight)
        if update is not None:
            check_bool("update", update)
        if not torch.is_grad_enabled():  # (torch said it as "element 0 of tensors does not require grad")
            raise RuntimeError("TrainStep was called under torch.no_grad() or torch.inference_mode(): a training "
                               "step needs gradients (call it outside, or use model(imgs) to evaluate)")
        if update is None:
            update = self._in_cycle + 1 >= self.accum_steps
        elif not update and self.accum_steps == 1:
            raise ValueError("update=False accumulates gradients: build the step with accum_steps > 1")
        if not self.captured:  # a group added since (add_param_group): checked, then clipped and zeroed too
            self._params = self._optimizer_params(self._params)
            if self._params and not any(p.requires_grad for p in self._params):
                raise ValueError("optimizer: none of its parameters requires grad (a model frozen whole?)")
        first = self.mask_source is None
        if first:
            self.prepare(imgs, noise)
        calls = self.calls  # after prepare: a failed capture's kept warm-up steps (restore=False) count
        if self.captured:
            return self._replay(imgs, noise, weight, bool(update))
        try:
            return self._eager_call(imgs, noise, weight, update)
        except (TypeError, ValueError):
            # a first call that fails on the caller's inputs decides nothing (the mask source; after a
            # capture that failed on them too, the capture: a corrected call may still capture)
            if first:
                self.mask_source, self.calls = None, calls
                if self._capture == "auto" and (self.eager_reason or "").startswith("capture failed"):
                    self.eager_reason = capture_blocker(self.model, self.optimizer, self.scaler, self.device)
            raise

    def _eager_call(self, imgs, noise, weight: float, update: bool) -> torch.Tensor:
        if self._sync is not None and hasattr(self._sync, "set_requires_gradient_sync"):
            self._sync.set_requires_gradient_sync(bool(update))
        # DDP/FSDP1 all-reduce only when the accumulation ends (the forward must be inside no_sync too)
        ctx = self._sync.no_sync() if self._sync is not None and hasattr(self._sync, "no_sync") and not update \
            else contextlib.nullcontext()
        with ctx:
            loss = self.forward(imgs, noise)
            self.backward(loss, weight)
        self._in_cycle += 1
        if update:
            self.optimizer_step()
        return loss.detach()

    def zero_grad(self) -> None:
        """Drops a partial accumulation: the next call starts a new one (eager: gradients set to None, FSDP2's
        unsynced unsharded ones too; captured: the graphs' gradients zeroed in place, since the graphs keep
        their addresses)."""
        if self.captured:
            with torch.no_grad():
                torch._foreach_zero_([g for g in self._static_grads if g is not None])
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if self._in_cycle and self._sync is not None and hasattr(self._sync, "set_requires_gradient_sync"):
                graphs.drop_unsharded_grads(self._sync)  # FSDP2 accumulates unsynced micro-batches there
        self._in_cycle = 0

    def set_lr(self, lr: float) -> None:
        """Every group's learning rate for the next steps (times its ``lr_scale`` if present); a captured
        step's are device tensors, written in place (no host sync)."""
        lr = check_nonneg_number("lr", lr)
        if self.captured:  # a number written over a group's lr tensor (a hand-made schedule): that tensor back
            for g, t in zip(self.optimizer.param_groups, self._graph_reads):
                g["lr"] = g["lr"] if isinstance(g["lr"], torch.Tensor) else t
            self._check_optimizer_intact()
        set_group_lrs(self.optimizer, lr)

    def _set_mask_source(self, noise) -> None:
        source = "noise" if noise is not None else ("seed" if self._takes_seed else "model")
        if self.mask_source is None:
            self.mask_source = source
        elif (source == "noise") != (self.mask_source == "noise"):
            raise ValueError("pass noise= on every call or on none (the first call " +
                             ("had noise)" if self.mask_source == "noise" else "had none)"))

    # -- capture --------------------------------------------------------------------------------------

    def prepare(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> "TrainStep":
        """Fixes the mask source and, for a step that captures, the batch shape: warms up, captures
        (and restores what the warm-up changed). The first call does this itself; call it to capture
        before the loop, or to have ``static_imgs`` to fill. Returns self.

        Raises:
            maefast.graphs.CaptureError: the capture failed inside the graph (the step takes no more
                calls; see the module docstring).
            RuntimeError, ValueError: with ``capture=True``, what prevented the capture before it began
                (the step is unprepared again).
        """
        if self.mask_source is not None:
            raise RuntimeError("prepare: this step is already prepared (by an earlier call)")
        if self.eager_reason is None:  # the caller's mistake, not a reason to step eagerly for good
            for name, t in (("imgs", imgs), ("noise", noise)):
                if t is not None and (not isinstance(t, torch.Tensor) or t.device != self.device):
                    raise ValueError(f"{name} must be a tensor on the model's device {self.device}, got "
                                     f"{t.device if isinstance(t, torch.Tensor) else type(t).__name__}")
        self._set_mask_source(noise)
        if self.eager_reason is not None:
            return self
        try:
            self._capture_step(imgs, noise)
        except graphs.CaptureError as e:  # inside the graph: never stepped past (see the module docstring)
            self._drop_capture()
            self._refused = str(e)
            raise
        except (RuntimeError, ValueError) as e:  # before the capture began: the process is intact
            self._drop_capture()
            if self._capture is True:
                self.mask_source = None  # unprepared again: a later call tries again, never steps eagerly
                raise
            self.eager_reason = f"capture failed: {graphs.first_line(e)}"
        return self

    def _drop_capture(self) -> None:
        """What a failed capture leaves that an eager step must not see: the static buffers and graphs,
        gradients, GradScaler's per-step record (after its unscale_ the stage stays UNSCALED: the next
        unscale_ would raise) and what GradScaler.step hands a fused optimizer (kept when its step
        raised)."""
        self.static_imgs = self.static_noise = None
        self._graphs.clear()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            from torch.amp.grad_scaler import _refresh_per_optimizer_state

            self.scaler._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)  # as its update() does
        for name in ("grad_scale", "found_inf"):
            self.optimizer.__dict__.pop(name, None)

    def _capture_step(self, imgs, noise) -> None:
        dev = self.device
        self.static_imgs = imgs.detach().clone()
        self.static_noise = None if noise is None else noise.detach().clone()
        # the device seed: each micro-batch first adds 1, then draws its mask (call k: seed + k)
        self._seed_dev = torch.full((1,), self._stream_seed + self.calls - 1, dtype=torch.int64, device=dev)
        # learning rates as device tensors the graph reads (a float, or a CPU tensor, would be baked in), one
        # per lr_scale where groups share one (set_lr then never replaces a tensor the graph reads)
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            if not (isinstance(lr, torch.Tensor) and lr.device == dev and lr.dtype == torch.float32):
                group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=dev)
        own_lr_per_scale(self.optimizer)
        mark_read_by_graphs(self.optimizer, self)
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(torch.zeros((), device=dev))  # creates its scale tensor now: the snapshot holds it
        modes = graphs.train_modes(self.model, self._params)
        saved = graphs.snapshot_training(self._params, self.optimizer, self.scaler) if self.restore else None
        kept = [0, 0]  # the warm-up's micro-batches and optimizer steps that ran to their end

        def warm(update: bool) -> None:
            self._body(update)
            kept[0], kept[1] = kept[0] + 1, kept[1] + update

        try:
            if self.accum_steps == 1:
                # the warm-up's gradients released before the capture begins (torch empties the
                # allocator's cache then): held through it, ~2.6 GB of ViT-H's fp32 gradients stayed
                # reserved beside the graph pool's own for the life of the step
                graph, out = graphs.capture_cuda_graph(
                    lambda: self._body(True), warmup_steps=self.warmup_steps, warmup_fn=lambda: warm(True),
                    device=dev, before_capture=lambda: self.optimizer.zero_grad(set_to_none=True))
                self._graphs = {True: (graph, out)}
            else:
                # the gradients persist across micro-batches: allocated by the warm-up (outside the
                # graphs), accumulated in place, zeroed by the updating graph; both graphs share one pool
                def cycle():
                    for j in range(self.accum_steps):
                        warm(j == self.accum_steps - 1)

                acc = graphs.capture_cuda_graph(lambda: self._body(False), warmup_steps=self.warmup_steps,
                                                warmup_fn=cycle, device=dev)
                upd = graphs.capture_cuda_graph(lambda: self._body(True), warmup_steps=0, device=dev,
                                                pool=acc[0].pool())
                self._graphs = {False: acc, True: upd}
        finally:  # also when the capture fails: a caller falling back to eager gets the model it passed
            if saved is not None:
                self._restore(saved)
            else:  # the warm-up's steps were kept (also before a failure, whose unfinished cycle's gradients
                self.calls += kept[0]  # are dropped): counted, and the masks go on after theirs
                self.optimizer_steps += kept[1]
                self._seed_dev.fill_(self._stream_seed + self.calls - 1)
        # the graphs write and read these gradients at fixed addresses: held here, they stay allocated
        # even if the caller sets p.grad to None (optimizer.zero_grad(set_to_none=True) between epochs)
        self._static_grads = [p.grad for p in self._params]
        # and read these: the learning rates and the first parameter's optimizer state
        self._graph_reads = self._read_tensors()
        # and were recorded with these Python values (a weight-decay schedule would change them unseen)
        self._baked = graphs.group_scalars(self.optimizer)
        # and in these modes: a parameter frozen or unfrozen afterwards, or a module left in eval(), would not be
        self._modes = graphs.train_modes(self.model, self._params, before=modes)
        self.captured = True

    def _read_tensors(self) -> list:
        return [g["lr"] for g in self.optimizer.param_groups] + \
            list(self.optimizer.state.get(self._params[0], {}).values())

    def _check_optimizer_intact(self) -> None:
        """The graphs read the tensors the optimizer held at capture: an optimizer.load_state_dict() since
        then replaced them, and the step would go on updating (and set_lr writing) tensors no one reads."""
        if (why := graphs.groups_change(self.optimizer, len(self._baked))) is not None:
            raise RuntimeError(why)
        now = self._read_tensors()
        if len(now) != len(self._graph_reads) or any(a is not b for a, b in zip(now, self._graph_reads)):
            raise RuntimeError("the optimizer's learning rates or state were replaced after the capture (an "
                               "optimizer.load_state_dict()?): the captured graphs still read the old tensors. Load "
                               "checkpoints before the step's first call, or build a new TrainStep")
        if (why := graphs.scalars_change(self.optimizer, self._baked)) is not None:
            raise RuntimeError(why)

    def _body(self, update: bool) -> torch.Tensor:
        """One captured micro-batch (also its warm-up): reads only the static buffers."""
        if self.accum_steps == 1:
            # Python only: the backward then writes fresh gradients (at capture: in the graph's pool,
            # at the same addresses every replay), as the CUDA-graph recipe for whole networks does
            self.optimizer.zero_grad(set_to_none=True)
        if self.mask_source == "seed":
            self._seed_dev.add_(1)
        loss = self._loss(self.static_imgs, self.static_noise, self._seed_dev, cache=False)
        self.backward(loss)
        if update:
            self._update()
            if self.accum_steps > 1:
                torch._foreach_zero_([p.grad for p in self._params if p.grad is not None])
        return loss.detach()

    def _replay(self, imgs, noise, weight, update) -> torch.Tensor:
        self._check_config_ratio()  # the captured Python that checks it does not run in a replay
        if weight != 1.0:
            raise ValueError(f"weight={weight}: a captured step takes full batches of weight 1 (skip the batch, "
                             "or build the step with capture=False)")
        s = self.static_imgs
        if not isinstance(imgs, torch.Tensor) or imgs.shape != s.shape or imgs.dtype != s.dtype \
                or imgs.device != s.device:
            got = (tuple(imgs.shape), imgs.dtype, imgs.device) if isinstance(imgs, torch.Tensor) else type(imgs)
            raise ValueError(f"imgs must match the captured batch {tuple(s.shape)}, {s.dtype} on {s.device} "
                             f"(a captured step takes one batch shape: skip or pad short batches), got {got}")
        self._set_mask_source(noise)
        if noise is not None:
            if noise.shape != self.static_noise.shape or noise.device != self.static_noise.device:
                raise ValueError(f"noise must have shape {tuple(self.static_noise.shape)} on {self.static_noise.device}"
                                 f", got {tuple(noise.shape)} on {noise.device}")
            if noise is not self.static_noise:
                self.static_noise.copy_(noise, non_blocking=True)
        if imgs is not s:
            s.copy_(imgs, non_blocking=True)
        graph, out = self._graphs[update]
        self._check_optimizer_intact()
        if (changed := graphs.mode_change(self.model, self._params, self._modes)) is not None:
            raise RuntimeError(f"{changed}; build a new TrainStep, or step eagerly (capture=False)")
        self._replaying = True
        try:
            graph.replay()
        finally:
            self._replaying = False
        self.calls += 1
        self._in_cycle += 1
        if update:
            self.optimizer_steps += 1
            self._in_cycle = 0
        return out

    @torch.no_grad()
    def _restore(self, saved) -> None:
        """`graphs.restore_training`, and the seed as before the warm-up (accumulated grads zeroed)."""
        graphs.restore_training(saved, self._params, self.optimizer, self.scaler)
        self._seed_dev.fill_(self._stream_seed + self.calls - 1)
        if self.accum_steps > 1:
            for p in self._params:
                if p.grad is not None:
                    p.grad.zero_()

    def __repr__(self) -> str:
        how = "captured" if self.captured else f"eager ({self.eager_reason})" if self.eager_reason else \
            "refused (its capture failed inside the graph)" if self._refused else "not prepared"
        return (f"TrainStep({type(unwrap(self.model)[-1]).__name__}, {type(self.optimizer).__name__}, "
                f"dtype={str(self.dtype).replace('torch.', '')}, accum_steps={self.accum_steps}, {how})")


__all__ = ["TrainStep"]
