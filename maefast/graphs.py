"""CUDA-graph capture (`capture_cuda_graph`), shared by `maefast.TrainStep` (maefast/step.py: the
captured training step) and the per-op benchmarks.
"""
from __future__ import annotations

from typing import Callable

import torch


def capture_cuda_graph(fn: Callable[[], object], *, warmup_steps: int = 3, warmup_fn: Callable[[], object] | None = None,
                       before_capture: Callable[[], object] | None = None, device=None, pool=None):
    """Captures one call of `fn` in a CUDA graph; returns (graph, what that call returned: the static
    outputs each replay overwrites).

    First `warmup_fn` (default `fn`) runs `warmup_steps` times on a side stream (Triton compiles,
    autograd and cuBLAS warm up outside the capture), then `before_capture()` (e.g. grads set to
    None, so the captured backward allocates them in the graph's pool). `pool` (another graph's
    ``pool()``) shares its memory pool: replay such graphs in the order they were captured. The
    capture is in thread_local mode: CUDA calls from other threads (the DataLoader's pin-memory
    thread) do not invalidate it, as they would in the default "global" mode. A failed capture (a
    host sync, a CPU tensor) raises RuntimeError after restoring the caller's stream (capture_end
    leaves its own current).
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    current = torch.cuda.current_stream(device)
    if warmup_steps:
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
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = fn()
    except RuntimeError:
        torch.cuda.set_stream(current)
        raise
    return graph, out


__all__ = ["capture_cuda_graph"]
