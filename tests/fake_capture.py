"""CPU stand-ins for CUDA-graph capture (shared by tests/test_step.py, tests/test_step_failures.py and
the `maefast train` tests).

`install`: `maefast.graphs.capture_cuda_graph` replaced, so that `maefast.TrainStep`'s Python around a
capture (static buffers, device seed, device lrs, GradScaler, accumulation graphs, warm-up undone,
fallback) runs on the CPU; a "replay" runs the captured function again and writes its result into
the static output, as a real replay overwrites it.

`FakeCuda`: torch.cuda's capture API replaced instead, so that capture_cuda_graph's own code (warm-up,
sync check, streams, devices, a failed capture's aftermath) runs on the CPU; it captures, never replays."""
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
    exception to make the next capture raise it (a `maefast.graphs.CaptureError` stands for a failure
    inside the capture, anything else for one before it)."""
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


# -- torch.cuda's capture API on the CPU (graphs.capture_cuda_graph's own code runs) -------------------

CAPTURING_ERROR = "CUDA error: operation not permitted when stream is capturing"


class FakeStream:
    def __init__(self, cuda, index: int, name: str):
        self.cuda, self.device, self.name = cuda, torch.device("cuda", index), name

    def wait_stream(self, other):
        self.cuda.log.append(("wait", self.name, other.name))

    def __repr__(self):
        return f"FakeStream({self.name})"


class FakeCUDAGraph:
    def replay(self):
        raise AssertionError("the CPU stand-in of torch.cuda records captures, it cannot replay them")

    def pool(self):
        return ("pool", id(self))


class FakeCuda:
    """torch.cuda's streams, devices, sync debug mode and ``torch.cuda.graph`` on the CPU, recording
    what `maefast.graphs.capture_cuda_graph` does with them in ``log``, so that its own code (not a
    stand-in for it) runs on the CPU:

    - the sync debug mode: in "error" mode ``Tensor.item()`` raises as a synchronizing CUDA call does
      (only ``.item()`` called from Python is seen);
    - ``torch.cuda.graph`` runs the body once (a capture records it); inside it ``Tensor.item()`` and
      ``pageable_copy()`` (what the sync debug mode does not see: a non_blocking copy from pageable
      memory) fail as CUDA fails them under capture; a body that raises ends the capture as torch
      2.11 does: ``capture_end`` raises, the capture stream stays current, and (unless
      ``fixed_torch``: pytorch#180395) the allocator is left broken: ``empty_cache()`` raises after;
    - torch's default capture stream is one per process (``default_capture_stream``), made on the
      current device by the first capture that passes no stream, as in torch.
    """

    def __init__(self, devices: int = 2, fixed_torch: bool = False):
        self.log: list[tuple] = []
        self.current, self.sync_mode, self.capturing, self.broken = 0, 0, False, False
        self.fixed_torch = fixed_torch
        self.streams = {i: FakeStream(self, i, f"default{i}") for i in range(devices)}  # current, per device
        self.default_capture_stream: FakeStream | None = None
        self._made = 0

    # the stand-ins of torch.cuda's functions
    def _index(self, device) -> int:
        device = torch.device(device) if device is not None else None
        return device.index if device is not None and device.type == "cuda" and device.index is not None \
            else self.current

    def current_device(self) -> int:
        return self.current

    def current_stream(self, device=None) -> FakeStream:
        return self.streams[self._index(device)]

    def new_stream(self, device=None) -> FakeStream:
        self._made += 1
        i = self._index(device)
        return FakeStream(self, i, f"side{self._made}@{i}")

    def set_stream(self, stream: FakeStream) -> None:
        self.streams[stream.device.index] = stream

    def device(self, device):
        cuda, index = self, self._index(device)

        class Guard:
            def __enter__(self):
                self.prev, cuda.current = cuda.current, index

            def __exit__(self, *exc):
                cuda.current = self.prev

        return Guard()

    def stream(self, stream: FakeStream):
        cuda = self

        class Ctx:
            def __enter__(self):
                self.prev = cuda.streams[stream.device.index]
                cuda.streams[stream.device.index] = stream

            def __exit__(self, *exc):
                cuda.streams[stream.device.index] = self.prev

        return Ctx()

    def get_sync_debug_mode(self) -> int:
        return self.sync_mode

    def set_sync_debug_mode(self, mode) -> None:
        self.sync_mode = {"default": 0, "warn": 1, "error": 2}.get(mode, mode)
        self.log.append(("sync_mode", self.sync_mode))

    def empty_cache(self) -> None:
        if self.broken:
            raise RuntimeError("captures_underway.empty() INTERNAL ASSERT FAILED at CUDACachingAllocator.cpp")
        self.log.append(("empty_cache",))

    def graph(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        cuda = self
        if stream is None:
            if cuda.default_capture_stream is None:
                cuda.default_capture_stream = cuda.new_stream()
            stream = cuda.default_capture_stream

        class Capture:
            def __enter__(self):
                cuda.empty_cache()  # torch.cuda.graph.__enter__ frees the cache first
                self.prev = cuda.streams[stream.device.index]
                cuda.streams[stream.device.index] = stream
                cuda.log.append(("capture", stream.name, stream.device.index, cuda.current, capture_error_mode))
                cuda.capturing = True

            def __exit__(self, exc_type, *exc):
                cuda.capturing = False
                if exc_type is not None:  # the failed call invalidated the capture: capture_end raises
                    cuda.broken = not cuda.fixed_torch
                    cuda.log.append(("capture failed",))
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
                cuda.streams[stream.device.index] = self.prev
                cuda.log.append(("captured",))

        return Capture()

    # what a model under test calls
    def pageable_copy(self) -> None:
        """A non_blocking copy from pageable memory: unseen by the sync debug mode, fatal to a capture."""
        if self.capturing:
            raise RuntimeError(CAPTURING_ERROR)

    def install(self, monkeypatch) -> "FakeCuda":
        """Replaces torch.cuda's capture API by this stand-in (and TrainStep's blocker asks about a CUDA
        device, so that a CPU model captures); returns self."""
        for name, fn in (("current_device", self.current_device), ("current_stream", self.current_stream),
                         ("Stream", self.new_stream), ("set_stream", self.set_stream), ("device", self.device),
                         ("stream", self.stream), ("get_sync_debug_mode", self.get_sync_debug_mode),
                         ("set_sync_debug_mode", self.set_sync_debug_mode), ("empty_cache", self.empty_cache),
                         ("graph", self.graph), ("CUDAGraph", FakeCUDAGraph)):
            monkeypatch.setattr(torch.cuda, name, fn)
        monkeypatch.setattr(graphs, "_streams", {})
        real_item, cuda = torch.Tensor.item, self

        def item(t):
            if cuda.capturing:
                raise RuntimeError(CAPTURING_ERROR)
            if cuda.sync_mode == 2:
                raise RuntimeError("called a synchronizing CUDA operation")
            return real_item(t)

        monkeypatch.setattr(torch.Tensor, "item", item)
        real_blocker = step_mod.capture_blocker
        monkeypatch.setattr(step_mod, "capture_blocker",
                            lambda model, opt, scaler, device: real_blocker(model, opt, scaler, torch.device("cuda")))
        return self
