"""A CPU stand-in for CUDA-graph capture (shared by tests/test_step.py and the `maefast train` tests):
`maefast.TrainStep`'s Python around a capture (static buffers, device seed, device lrs, GradScaler,
accumulation graphs, warm-up undone, fallback) runs on the CPU; a "replay" runs the captured function
again and writes its result into the static output, as a real replay overwrites it."""
from __future__ import annotations

import torch

from maefast import graphs
from maefast import step as step_mod


class FakeGraph:
    """torch.cuda.CUDAGraph's stand-in."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.out.copy_(self.fn())
        self.replays += 1

    def pool(self):
        return None


def install(monkeypatch):
    """CPU 'capture': the blocker is the real one asked about a CUDA device, and capture runs the
    warm-up and the function once (a real capture only records it: TrainStep's restore=True undoes
    both). Returns the capture function; ``.made`` lists the graphs made; set ``.fail`` to an
    exception to make the next capture raise it."""
    real_blocker = step_mod.capture_blocker
    made = []

    def capture(fn, *, warmup_steps=3, warmup_fn=None, before_capture=None, device=None, pool=None):
        if getattr(capture, "fail", None) is not None:
            raise capture.fail
        for _ in range(warmup_steps):
            (warmup_fn or fn)()
        if before_capture is not None:
            before_capture()
        out = fn()
        made.append(FakeGraph(fn, out))
        return made[-1], out

    capture.made = made
    monkeypatch.setattr(graphs, "capture_cuda_graph", capture)
    monkeypatch.setattr(step_mod, "capture_blocker",
                        lambda model, opt, scaler, device: real_blocker(model, opt, scaler, torch.device("cuda")))
    return capture
