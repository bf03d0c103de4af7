"""A whole MAE training step (forward, backward, optimizer step) captured once in a CUDA graph and
replayed: no Python, no per-kernel launch cost after capture.

At the batch sizes people train MAE with, an eager step is launch-bound on a fast GPU (the official
ViT-B step at batch 64 reached 10% MFU on an H200, 2026-11-27). maefast's fused path never syncs the
host, and its masking reads a *device* seed, so the whole step can be captured: each replay adds 1
to that seed inside the graph and draws a fresh mask.

    step = CUDAGraphTrainStep(model, optimizer, example_imgs, mask_ratio=0.75, seed=0)
    for imgs in loader:
        loss = step(imgs)          # a 0-d CUDA tensor; read it (loss.item()) only when you log

Requirements: a CUDA model whose forward takes ``seed=`` and ``return_pred=`` (maefast's
MaskedAutoencoderViT with impl != "reference", or a model after ``maefast.patch``); an optimizer
that can be captured (Adam/AdamW with ``capturable=True``); a fixed batch shape; no GradScaler
(use bf16). Status: written and CPU-checked for its Python paths only; its `cuda`-marked test
(tests/test_graphs.py) has not run on a GPU yet.
"""
from __future__ import annotations

import torch


class CUDAGraphTrainStep:
    """Captures `optimizer.zero_grad -> model(imgs, mask_ratio, seed) -> backward -> optimizer.step`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, example_imgs: torch.Tensor, *,
                 mask_ratio: float = 0.75, seed: int = 0, autocast_dtype: torch.dtype | None = torch.bfloat16,
                 warmup_steps: int = 3):
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
        self.model, self.optimizer = model, optimizer
        self.mask_ratio = float(mask_ratio)
        self.autocast_dtype = autocast_dtype
        self.static_imgs = example_imgs.detach().clone()
        # the device seed: each warm-up step and each replay first adds 1, then draws its mask (capture
        # records the step without running it)
        self.seed = torch.full((1,), int(seed) - 1, dtype=torch.int64, device=example_imgs.device)

        side = torch.cuda.Stream(device=example_imgs.device)
        side.wait_stream(torch.cuda.current_stream(example_imgs.device))
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self._step()
        torch.cuda.current_stream(example_imgs.device).wait_stream(side)

        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's pool
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step(zero_grad=False)

    def _step(self, zero_grad: bool = True) -> torch.Tensor:
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        self.seed.add_(1)
        ctx = (torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)
               if self.autocast_dtype is not None else torch.autocast("cuda", enabled=False))
        with ctx:
            loss = self.model(self.static_imgs, self.mask_ratio, seed=self.seed, return_pred=False)[0]
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        """One training step on `imgs` (same shape and dtype as the example); returns the loss tensor."""
        if imgs.shape != self.static_imgs.shape or imgs.dtype != self.static_imgs.dtype:
            raise ValueError(f"imgs must match the captured batch: shape {tuple(self.static_imgs.shape)}, "
                             f"{self.static_imgs.dtype}; got {tuple(imgs.shape)}, {imgs.dtype}")
        self.static_imgs.copy_(imgs, non_blocking=True)
        self.graph.replay()
        return self.static_loss


__all__ = ["CUDAGraphTrainStep"]
