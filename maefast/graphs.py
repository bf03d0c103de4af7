"""A whole MAE training step (forward, backward, optimizer step) captured once in a CUDA graph and
replayed: no Python, no per-kernel launch cost after capture.

At the batch sizes people train MAE with, an eager step is launch-bound on a fast GPU (the official
ViT-B step at batch 64 reached 10% MFU on an H200, 2026-11-27). maefast's fused path never syncs the
host, and its masking reads a *device* seed, so the whole step can be captured: each replay adds 1
to that seed inside the graph and draws a fresh mask.

    step = CUDAGraphTrainStep(model, optimizer, example_imgs, mask_ratio=0.75, seed=0)
    for imgs in loader:
        step.set_lr(schedule(it))  # optional: the groups' lr are device tensors the graph reads
        loss = step(imgs)          # a 0-d CUDA tensor; read it (loss.item()) only when you log

Replay k (from 0) draws its mask with seed + k (restore=False: seed + warmup_steps + k). With ``example_noise=`` the masks come from the
noise passed to each call instead (``step(imgs, noise)``: the official noise convention, e.g.
per-sample noise from a data pipeline). Building the step runs ``warmup_steps`` eager steps (Triton
compiles, autograd and cuBLAS warm up) and then restores the parameters and the optimizer state, so
construction does not train the model (``restore=False`` keeps the warm-up updates).

Requirements: a CUDA model whose forward takes ``seed=`` and ``return_pred=`` (maefast's
MaskedAutoencoderViT with impl != "reference", or a model after ``maefast.patch``); an optimizer
that can be captured (Adam/AdamW with ``capturable=True``); a fixed batch shape; no GradScaler
(use bf16); no gradient accumulation or clipping inside. Status: written and CPU-checked for its
Python paths only; its `cuda`-marked tests (tests/test_graphs.py) have not run on a GPU yet.
"""
from __future__ import annotations

import torch


def capture_cuda_graph(fn, *, warmup_steps: int = 3, warmup_fn=None, before_capture=None, device=None):
    """Captures one call of `fn` in a CUDA graph; returns (graph, what that call returned: the static
    outputs each replay overwrites).

    First `warmup_fn` (default `fn`) runs `warmup_steps` times on a side stream (Triton compiles,
    autograd and cuBLAS warm up outside the capture), then `before_capture()` (e.g. grads set to
    None, so the captured backward allocates them in the graph's pool). The capture is in
    thread_local mode: CUDA calls from other threads (the DataLoader's pin-memory thread) do not
    invalidate it, as they would in the default "global" mode. A failed capture (a host sync, a CPU
    tensor) raises RuntimeError after restoring the caller's stream (capture_end leaves its own current).
    """
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            (warmup_fn or fn)()
    current.wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
    except RuntimeError:
        torch.cuda.set_stream(current)
        raise
    return graph, out


class CUDAGraphTrainStep:
    """Captures `optimizer.zero_grad -> model(imgs, mask_ratio, seed) -> backward -> optimizer.step`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, example_imgs: torch.Tensor, *,
                 mask_ratio: float = 0.75, seed: int = 0, autocast_dtype: torch.dtype | None = torch.bfloat16,
                 warmup_steps: int = 3, example_noise: torch.Tensor | None = None, restore: bool = True):
        if not isinstance(example_imgs, torch.Tensor) or example_imgs.device.type != "cuda":
            raise ValueError("example_imgs must be a CUDA tensor (CUDA graphs need a GPU)")
        if getattr(model, "impl", None) == "reference":
            raise ValueError("the reference path (impl='reference') syncs the host in its masking; use impl='auto'")
        for group in optimizer.param_groups:
            if "capturable" in group and not group["capturable"]:
                raise ValueError(f"{type(optimizer).__name__} must be built with capturable=True to be captured")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1 (Triton compiles and autograd warms up), got "
                             f"{warmup_steps!r}")
        if example_noise is not None and (not isinstance(example_noise, torch.Tensor)
                                          or example_noise.device != example_imgs.device or example_noise.dim() != 2
                                          or example_noise.shape[0] != example_imgs.shape[0]):
            raise ValueError("example_noise must be an (N, L) tensor on example_imgs' device (N = its batch)")
        dev = example_imgs.device
        self.model, self.optimizer = model, optimizer
        self.mask_ratio = float(mask_ratio)
        self.autocast_dtype = autocast_dtype
        self.static_imgs = example_imgs.detach().clone()
        self.static_noise = None if example_noise is None else example_noise.detach().clone()
        # the device seed: each warm-up step and each replay first adds 1, then draws its mask (capture
        # records the step without running it)
        self.seed = torch.full((1,), int(seed) - 1, dtype=torch.int64, device=dev)
        # learning rates as device tensors, so that set_lr reaches the captured optimizer step
        # (a float, or a tensor elsewhere / of another dtype: a CPU lr would be read once and baked in)
        for group in optimizer.param_groups:
            lr = group["lr"]
            if not (isinstance(lr, torch.Tensor) and lr.device == dev and lr.dtype == torch.float32):
                group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=dev)
        saved = self._snapshot() if restore else None

        try:
            self.graph, self.static_loss = capture_cuda_graph(
                lambda: self._step(zero_grad=False), warmup_steps=warmup_steps, warmup_fn=self._step,
                before_capture=lambda: self.optimizer.zero_grad(set_to_none=True), device=dev)
        finally:  # also when the capture fails: a caller falling back to eager gets the model it passed
            if saved is not None:
                self._restore(saved)
                self.seed.fill_(int(seed) - 1)

    def _snapshot(self):
        # host copies: a device copy of a ViT-H's parameters and AdamW state would add ~10 GB to the peak
        def host(t):
            return t.detach().to("cpu", copy=True)

        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        state = {p: {k: host(v) for k, v in self.optimizer.state[p].items() if isinstance(v, torch.Tensor)}
                 for p in params if p in self.optimizer.state}
        lrs = [host(g["lr"]) for g in self.optimizer.param_groups]
        return [host(p) for p in params], state, lrs

    @torch.no_grad()
    def _restore(self, saved) -> None:
        """Parameters, optimizer state and lrs as before the warm-up, written into the same tensors
        (the graph replays on their addresses); state the warm-up created starts from zero, as a
        fresh AdamW state does."""
        values, state, lrs = saved
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for p, v in zip(params, values):
            p.copy_(v)
        for p in params:
            for k, v in self.optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    continue
                if p in state and k in state[p]:
                    v.copy_(state[p][k])
                else:
                    v.zero_()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"].copy_(lr)

    def set_lr(self, lr: float) -> None:
        """Sets every group's learning rate (times its ``lr_scale`` if present) for the next replays."""
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr * group["lr_scale"] if "lr_scale" in group else lr)

    def _step(self, zero_grad: bool = True) -> torch.Tensor:
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        self.seed.add_(1)
        ctx = (torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)
               if self.autocast_dtype is not None else torch.autocast("cuda", enabled=False))
        with ctx:
            if self.static_noise is not None:
                loss = self.model(self.static_imgs, self.mask_ratio, noise=self.static_noise, return_pred=False)[0]
            else:
                loss = self.model(self.static_imgs, self.mask_ratio, seed=self.seed, return_pred=False)[0]
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One training step on `imgs` (same shape and dtype as the example; with example_noise, `noise`
        too); returns the loss tensor (overwritten by the next replay: read or copy it before). Inputs
        are copied into the captured buffers, unless they are those buffers (`step.static_imgs`,
        `step.static_noise`, e.g. filled by the data pipeline)."""
        if imgs.shape != self.static_imgs.shape or imgs.dtype != self.static_imgs.dtype:
            raise ValueError(f"imgs must match the captured batch: shape {tuple(self.static_imgs.shape)}, "
                             f"{self.static_imgs.dtype}; got {tuple(imgs.shape)}, {imgs.dtype}")
        if (noise is None) != (self.static_noise is None):
            raise ValueError("pass noise= exactly when the step was built with example_noise=")
        if noise is not None:
            if noise.shape != self.static_noise.shape:
                raise ValueError(f"noise must have shape {tuple(self.static_noise.shape)}, got {tuple(noise.shape)}")
            if noise is not self.static_noise:
                self.static_noise.copy_(noise, non_blocking=True)
        if imgs is not self.static_imgs:
            self.static_imgs.copy_(imgs, non_blocking=True)
        self.graph.replay()
        return self.static_loss


__all__ = ["CUDAGraphTrainStep"]
