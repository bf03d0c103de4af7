"""A step that cannot be captured: `maefast.graphs.capture_cuda_graph`'s own code on the CPU, through
the stand-in of torch.cuda's capture API in tests/fake_capture.py (`FakeCuda`, which fails a capture
the way torch 2.11 does, allocator and all), and `maefast.TrainStep` around it.

What is found before the capture (a host sync in the last warm-up step, an out-of-memory in the
warm-up, a blocker) falls back to eager steps with the model, optimizer and GradScaler as they were;
a failure inside the capture raises `CaptureError` and the step takes no more calls. The card's own
check of the same: scripts/capture_probe.py (gpu_check's verify preset)."""
from __future__ import annotations


import fake_capture as fake_capture_lib
import pytest
import torch
import torch.nn as nn

from maefast import graphs
from maefast.step import TrainStep
from step_twins import assert_same_params, batches, twins

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _adamw(m):
    # the lr a float32 tensor, as a (tried) capture leaves it: an eager twin computes the same way
    return torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-3), fused=True, capturable=True)


class Hooked(nn.Module):
    """An MAE whose forward calls ``hook(loss)`` (e.g. a logging line's ``loss.item()``: a host sync)."""

    def __init__(self, inner, hook):
        super().__init__()
        self.inner, self.hook = inner, hook

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        out = self.inner(imgs, mask_ratio, noise)
        self.hook(out[0])
        return out


def test_host_sync_is_found_by_the_warm_up_before_capture(monkeypatch):
    """capture="auto", a forward with `.item()`: the last warm-up step runs under the sync debug mode
    "error" (restored after), the sync is found there, nothing is captured (the allocator is
    untouched), and the step falls back to eager steps that train as an eager twin's."""
    cuda = fake_capture_lib.FakeCuda().install(monkeypatch)
    a, b = twins()
    imgs, noise = batches(2)
    step = TrainStep(Hooked(a, lambda loss: loss.item()), _adamw(a), seed=3).prepare(imgs[0], noise[0])
    assert not step.captured and step.static_imgs is None
    assert step.eager_reason.startswith("capture failed: HostSyncError: the step synchronizes with the host at ")
    assert step.eager_reason.endswith("(found by the warm-up, before capture: a capture would fail on it)")
    assert not any(e[0] == "capture" for e in cuda.log) and not cuda.broken  # never got as far as capturing
    assert [e for e in cuda.log if e[0] == "sync_mode"] == [("sync_mode", 2), ("sync_mode", 0)]  # last step only
    assert_same_params(a, b)  # the warm-up is undone
    eager = TrainStep(Hooked(b, lambda loss: loss.item()), _adamw(b), capture=False, seed=3)
    for i in range(2):
        assert torch.equal(step(imgs[i], noise[i]), eager(imgs[i], noise[i]))
    assert_same_params(a, b)
    torch.cuda.empty_cache()  # the (stand-in) allocator works


@pytest.mark.parametrize("accum", [1, 2])
def test_a_kept_warm_up_before_a_failed_capture_is_counted(monkeypatch, accum):
    """restore=False (the benchmarks') keeps the warm-up's steps; when the capture then fails (a host sync
    in the last warm-up step), the steps that ran to their end were not counted: the eager steps after
    drew the masks of the kept ones again. Now call k after the fallback draws seed + k, k counting the
    kept micro-batches, and the model is the eager twin's after as many calls."""
    class SeedHooked(Hooked):  # draws its mask from the step's seed
        def forward(self, imgs, mask_ratio=0.75, noise=None, seed=None):
            out = self.inner(imgs, mask_ratio, noise, seed=seed)
            self.hook(out[0])
            return out

    fake_capture_lib.FakeCuda().install(monkeypatch)
    a, b = twins()
    imgs, _ = batches(1)
    state = {"calls": 0}

    def sync_in_the_last_warm_up(loss):  # the warm-up's last micro-batch syncs (its mask drawn, no update)
        state["calls"] += 1
        if state["calls"] == 3 * accum:
            loss.item()

    step = TrainStep(SeedHooked(a, sync_in_the_last_warm_up), _adamw(a), seed=3, warmup_steps=3,
                     accum_steps=accum, restore=False)
    loss = step(imgs[0])
    assert not step.captured and step.eager_reason.startswith("capture failed: HostSyncError")
    kept = 2 * accum + accum - 1  # two whole cycles, and the failed cycle's micro-batches before the sync
    assert (step.calls, step.optimizer_steps) == (kept + 1, 2 + (accum == 1))
    eager = TrainStep(SeedHooked(b, lambda loss: None), _adamw(b), capture=False, seed=3, accum_steps=accum)
    for _ in range(2 * accum):
        eager(imgs[0])
    for _ in range(accum - 1):  # the failed cycle's gradients were dropped: their masks are drawn, unused
        eager.calls += 1
    assert torch.equal(loss, eager(imgs[0]))
    assert (eager.calls, eager.optimizer_steps) == (step.calls, step.optimizer_steps)
    assert_same_params(a, b)
    if accum == 1:  # a first eager call that then fails on the caller's side decides nothing, but the kept
        state["calls"] = 0  # warm-up steps stay counted (the call's rollback went back to before them)

        def sync_then_refuse(loss):
            state["calls"] += 1
            if state["calls"] == 3:
                loss.item()
            elif state["calls"] == 4:
                raise ValueError("the caller's batch")

        c, _ = twins()
        step = TrainStep(SeedHooked(c, sync_then_refuse), _adamw(c), seed=3, warmup_steps=3, restore=False)
        with pytest.raises(ValueError, match="the caller's batch"):
            step(imgs[0])
        assert (step.calls, step.optimizer_steps, step.mask_source) == (2, 2, None)


@pytest.mark.parametrize("fixed_torch", [False, True], ids=["torch-2.11", "fixed-torch"])
@pytest.mark.parametrize("capture", ["auto", True])
def test_a_failure_inside_the_capture_raises_and_the_step_takes_no_more_calls(monkeypatch, fixed_torch, capture):
    """What the sync debug mode cannot see (a non_blocking copy from pageable memory) fails the capture
    itself: torch 2.11 then leaves its allocator broken, so neither "auto" nor True steps on in this
    process: CaptureError names the first error and whether the allocator is broken; the caller's
    stream is current again, the model as it was, and later calls are refused."""
    cuda = fake_capture_lib.FakeCuda(fixed_torch=fixed_torch).install(monkeypatch)
    a, b = twins()
    imgs, noise = batches(1)
    step = TrainStep(Hooked(a, lambda loss: cuda.pageable_copy()), _adamw(a), capture=capture)
    with pytest.raises(graphs.CaptureError) as info:
        step.prepare(imgs[0], noise[0])
    err = info.value
    assert err.reason == f"RuntimeError: {fake_capture_lib.CAPTURING_ERROR}" and err.broken is (not fixed_torch)
    assert "run again without capturing (capture=False)" in str(err)
    assert ("torch" in str(err) and "left unusable" in str(err)) is (not fixed_torch)
    assert cuda.streams[0].name == "default0"  # capture_end left its stream current; the caller's is back
    assert_same_params(a, b)
    assert all(p.grad is None for p in a.parameters())
    assert not step.captured and step.static_imgs is None and "refused" in repr(step)
    with pytest.raises(RuntimeError, match="this step takes no more calls: the CUDA-graph capture failed inside"):
        step(imgs[0], noise[0])


def test_a_warm_up_failure_waits_for_the_side_stream_before_restoring(monkeypatch):
    """Out of memory in the 2nd warm-up step: the caller's stream waits for the warm-up's stream
    before the step restores the parameters and AdamW state on it (the warm-up's kernels may still
    be queued there); then eager steps, with the reason."""
    cuda = fake_capture_lib.FakeCuda().install(monkeypatch)
    a, b = twins()
    imgs, noise = batches(1)
    calls = []

    def hook(loss):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    step = TrainStep(Hooked(a, hook), _adamw(a))
    real_restore = step._restore
    monkeypatch.setattr(step, "_restore", lambda saved: (cuda.log.append(("restore",)), real_restore(saved)))
    step.prepare(imgs[0], noise[0])
    assert step.eager_reason == "capture failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    waits = [e for e in cuda.log if e[0] in ("wait", "restore")]
    side = waits[0][2] if waits[0][1] == "default0" else waits[0][1]
    assert waits[0] == ("wait", side, "default0")  # the warm-up starts after the caller's work
    assert waits[-2:] == [("wait", "default0", side), ("restore",)], waits
    assert_same_params(a, b)


def test_capture_runs_on_the_models_device(monkeypatch):
    """A model on cuda:1 while cuda:0 is current (and torch's default capture stream was made on
    cuda:0 by an earlier capture): warm-up and capture run with cuda:1 current, on a cuda:1 stream;
    cuda:0 is current again after."""
    cuda = fake_capture_lib.FakeCuda().install(monkeypatch)
    cuda.default_capture_stream = fake_capture_lib.FakeStream(cuda, 0, "torch-default@0")
    seen = []

    def fn():
        seen.append((cuda.current, torch.cuda.current_stream().device.index))
        return torch.zeros(())

    graph, out = graphs.capture_cuda_graph(fn, warmup_steps=2, device="cuda:1")
    assert seen == [(1, 1)] * 3, seen  # two warm-up calls and the captured one
    (cap,) = [e for e in cuda.log if e[0] == "capture"]
    assert cap[2:] == (1, 1, "thread_local"), cap  # a cuda:1 stream, cuda:1 current
    assert cuda.current == 0 and cuda.streams[1].name == "default1"


@pytest.mark.parametrize("clip", [None, 1.0], ids=["fused-step", "unscaled-then-clipped"])
def test_a_failure_in_the_warm_ups_update_leaves_no_scaler_or_optimizer_state_behind(monkeypatch, clip):
    """fp16 with a GradScaler and a fused AdamW whose step syncs (found by the warm-up, inside
    GradScaler.step: after its unscale_ when clipping): the eager steps that follow are the official
    AMP loop's, not ones that see a stage left UNSCALED ("unscale_() has already been called") or
    the grad_scale/found_inf the scaler handed the interrupted fused step."""
    fake_capture_lib.FakeCuda().install(monkeypatch)
    a, b = twins()
    imgs, noise = batches(2)

    def syncing(opt):
        real = opt.step

        def step(closure=None):
            opt.param_groups[0]["lr"].item()  # a sync: fine eagerly, found by the warm-up's check
            return real(closure)

        opt.step = step
        return opt

    opt_a, opt_b = syncing(_adamw(a)), syncing(_adamw(b))
    step = TrainStep(a, opt_a, dtype=torch.float16, clip_grad=clip, seed=5).prepare(imgs[0], noise[0])
    assert step.eager_reason.startswith("capture failed: HostSyncError"), step.eager_reason
    assert "grad_scale" not in opt_a.__dict__ and "found_inf" not in opt_a.__dict__
    eager = TrainStep(b, opt_b, dtype=torch.float16, clip_grad=clip, capture=False, seed=5)
    for i in range(2):
        assert torch.equal(step(imgs[i], noise[i]), eager(imgs[i], noise[i]))
    assert_same_params(a, b)
    assert step.scaler.get_scale() == eager.scaler.get_scale()


def test_process_broken_reads_the_chain():
    """Callers that catch per row (benchmarks, table2, profile_step) stop on a capture that left the
    allocator unusable, also when it arrives wrapped in another error."""
    from maefast.graphs import CaptureError, process_broken

    broken, fine = CaptureError("x", broken=True), CaptureError("x", broken=False)
    assert process_broken(broken) and not process_broken(fine) and not process_broken(RuntimeError("y"))
    try:
        try:
            raise broken
        except CaptureError as e:
            raise RuntimeError("step failed") from e
    except RuntimeError as wrapped:
        assert process_broken(wrapped)


# -- misuse of a step: refused, never silently decided or dropped ---------------------------------

def test_a_first_call_with_bad_inputs_decides_nothing(monkeypatch):
    """capture="auto": the caller's mistake in the first call (an ndarray, noise of another shape) raises and
    leaves the step unprepared: the corrected call still captures (it stepped eagerly for good before)."""
    fake_capture_lib.install(monkeypatch)
    a, _ = twins()
    imgs, noise = batches(1)
    step = TrainStep(a, _adamw(a), seed=3)
    with pytest.raises((TypeError, ValueError)):
        step(imgs[0].numpy(), noise[0])
    assert step.mask_source is None and step.eager_reason is None
    with pytest.raises(ValueError, match="noise must have shape"):
        step(imgs[0], noise[0][:, :10])
    assert step.mask_source is None and step.eager_reason is None
    step(imgs[0], noise[0])
    assert step.captured, step.eager_reason
    # an eager step too: the failed first call fixed neither the mask source nor the call count
    a2, _ = twins()
    eager = TrainStep(a2, _adamw(a2), seed=3, capture=False)
    with pytest.raises(ValueError, match="noise must have shape"):
        eager(imgs[0], noise[0][:, :10])
    assert eager.mask_source is None and eager.calls == 0
    eager(imgs[0])  # no noise now: fine (it said "pass noise= on every call or on none")
    assert eager.mask_source == "seed" and eager.calls == 1


def test_misuse_after_capture_is_refused(monkeypatch):
    """A captured step's graphs own the gradients, the learning-rate tensors and the settings they were
    captured with: backward(), a replaced optimizer state (load_state_dict) and a changed setting raise
    instead of being silently ignored by the replays."""
    fake_capture_lib.install(monkeypatch)
    a, _ = twins()
    imgs, noise = batches(2)
    opt = _adamw(a)
    step = TrainStep(a, opt, seed=3)
    loss = step(imgs[0], noise[0])
    assert step.captured
    with pytest.raises(RuntimeError, match="this step is captured"):
        step.backward(loss)
    for name, value in (("mask_ratio", 0.5), ("accum_steps", 2), ("clip_grad", 1.0), ("seed", 7)):
        with pytest.raises(AttributeError, match=f"{name} is baked into the captured graphs"):
            setattr(step, name, value)
    step.set_lr(5e-4)
    step(imgs[1], noise[1])
    wd = opt.param_groups[0]["weight_decay"]
    opt.param_groups[0]["weight_decay"] = wd * 2  # a weight-decay schedule: baked into the graphs
    with pytest.raises(RuntimeError, match="group 0 weight_decay changed after the capture"):
        step(imgs[1], noise[1])
    opt.param_groups[0]["weight_decay"] = wd
    step(imgs[1], noise[1])
    opt.load_state_dict(opt.state_dict())  # new tensors: the graphs would go on reading the old ones
    with pytest.raises(RuntimeError, match="replaced after the capture"):
        step.set_lr(1e-4)
    with pytest.raises(RuntimeError, match="replaced after the capture"):
        step(imgs[1], noise[1])


def test_an_optimizer_over_other_parameters_is_refused():
    a, b = twins()
    with pytest.raises(ValueError, match="optimizer: its parameter 0 .* is not one of the model's"):
        TrainStep(a, torch.optim.AdamW(b.parameters()), capture=False)


def test_an_optimizer_without_a_capturable_option_steps_eagerly_saying_why(monkeypatch):
    fake_capture_lib.FakeCuda().install(monkeypatch)
    a, _ = twins()
    step = TrainStep(a, torch.optim.SGD(a.parameters(), lr=0.1), seed=3)
    assert step.eager_reason == "SGD has no capturable option (its step reads values on the host)"


def test_a_changed_lr_scale_is_set_lrs_not_baked(monkeypatch):
    """Layer-wise lr scales (the fine-tuning recipe's lr_scale) are read by set_lr, which writes the lr tensor
    the graphs read: changing one after capture is honoured, not refused."""
    fake_capture_lib.install(monkeypatch)
    a, _ = twins()
    imgs, noise = batches(1)
    opt = torch.optim.AdamW([{"params": list(a.parameters()), "lr_scale": 1.0}], lr=torch.tensor(1e-3), fused=True,
                            capturable=True)
    step = TrainStep(a, opt, seed=3)
    step(imgs[0], noise[0])
    opt.param_groups[0]["lr_scale"] = 0.5
    step.set_lr(1e-3)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(5e-4)
    step(imgs[0], noise[0])


# -- capture_cuda_graph's own code (gaps found by mutation testing) ---------------------------------

def test_only_the_last_warm_up_step_must_not_sync_and_the_callers_mode_is_restored(monkeypatch):
    """A sync in an earlier warm-up step (a lazy initialisation's .item() on the first call) is fine: the
    capture goes ahead. The caller's own sync debug mode ("warn") is put back after the check, not
    reset to "default"."""
    cuda = fake_capture_lib.FakeCuda().install(monkeypatch)
    torch.cuda.set_sync_debug_mode("warn")
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            torch.zeros(()).item()  # a first call's one-off sync
        return torch.zeros(())

    graphs.capture_cuda_graph(fn, warmup_steps=3, device="cuda:0")
    assert len(calls) == 4 and any(e[0] == "captured" for e in cuda.log)
    assert [e for e in cuda.log if e[0] == "sync_mode"] == [("sync_mode", 1), ("sync_mode", 2), ("sync_mode", 1)]
    assert torch.cuda.get_sync_debug_mode() == 1


def test_another_error_in_the_last_warm_up_step_is_raised_as_it_is(monkeypatch):
    """Only a host sync becomes a HostSyncError: another error of the checked (last) warm-up step, out of
    memory say, reaches the caller as it was raised, and TrainStep steps eagerly saying so."""
    cuda = fake_capture_lib.FakeCuda().install(monkeypatch)

    def fn():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 4.00 GiB"):
        graphs.capture_cuda_graph(fn, warmup_steps=1, device="cuda:0")
    assert cuda.sync_mode == 0 and not any(e[0] == "capture" for e in cuda.log)
    a, b = twins()
    imgs, noise = batches(1)
    calls = []

    def hook(loss):
        calls.append(1)
        if len(calls) == 2:  # the last of 2 warm-up steps
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    step = TrainStep(Hooked(a, hook), _adamw(a), warmup_steps=2).prepare(imgs[0], noise[0])
    assert step.eager_reason == "capture failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert_same_params(a, b)


def test_warmup_steps_zero_captures_at_once_and_bad_counts_are_refused(monkeypatch):
    """warmup_steps=0 (TrainStep's second accumulation graph, warmed up by the first): no warm-up, no sync
    check, straight to before_capture and the capture. A negative or bool count is refused."""
    cuda = fake_capture_lib.FakeCuda().install(monkeypatch)
    order = []
    graph, out = graphs.capture_cuda_graph(lambda: order.append("fn") or torch.ones(()), warmup_steps=0,
                                           before_capture=lambda: order.append("before"), device="cuda:0")
    assert order == ["before", "fn"] and float(out) == 1.0
    assert not any(e[0] in ("sync_mode", "wait") for e in cuda.log)
    order.clear()
    graphs.capture_cuda_graph(lambda: order.append("fn"), warmup_steps=2, before_capture=lambda: order.append("before"),
                              device="cuda:0")
    assert order == ["fn", "fn", "before", "fn"]  # after the warm-up, before the capture
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
            graphs.capture_cuda_graph(lambda: None, warmup_steps=bad, device="cuda:0")


def test_captures_on_one_device_share_one_stream(monkeypatch):
    """Graphs sharing a memory pool are best captured on the same stream (torch.cuda.graph's note): every
    capture on a device uses that device's one capture stream, and hands the pool on."""
    cuda = fake_capture_lib.FakeCuda().install(monkeypatch)
    pools = []
    real_graph = cuda.graph

    def graph(g, pool=None, **kw):
        pools.append(pool)
        return real_graph(g, pool=pool, **kw)

    monkeypatch.setattr(torch.cuda, "graph", graph)
    first, _ = graphs.capture_cuda_graph(lambda: torch.zeros(()), warmup_steps=1, device="cuda:0")
    graphs.capture_cuda_graph(lambda: torch.zeros(()), warmup_steps=1, device="cuda:0", pool=first.pool())
    graphs.capture_cuda_graph(lambda: torch.zeros(()), warmup_steps=1, device="cuda:1")
    caps = [e for e in cuda.log if e[0] == "capture"]
    assert caps[0][1] == caps[1][1] != caps[2][1], caps
    assert pools == [None, first.pool(), None]


def test_where_names_the_innermost_frame_outside_torch():
    """A sync is raised inside torch: the HostSyncError names the caller's line that led there."""
    def model_line():
        torch.nn.functional.dropout(torch.zeros(2), p=2.0)  # raises inside torch/nn/functional.py

    try:
        model_line()
    except ValueError as e:
        where = graphs._where(e)
    line = model_line.__code__.co_firstlineno + 1
    assert where == f" at test_step_failures.py:{line} in model_line", where


def test_process_broken_ends_on_a_cyclic_chain():
    """An error chain that loops (x from y, y from x) is read once round, not forever (run in a thread:
    a loop fails the test instead of hanging it)."""
    import threading

    from maefast.graphs import process_broken

    x, y = RuntimeError("x"), RuntimeError("y")
    x.__cause__, y.__cause__ = y, x
    got = []
    t = threading.Thread(target=lambda: got.append(process_broken(x)), daemon=True)
    t.start()
    t.join(10)
    assert got == [False]


def test_a_host_sync_wrapped_in_another_error_is_still_a_host_sync(monkeypatch):
    """A forward that catches the sync's error and raises its own from it (a model's or a library's wrapper) is
    still found as a host sync: the chain is read, and the step can fall back to eager steps."""
    fake_capture_lib.FakeCuda().install(monkeypatch)

    def fn():
        try:
            torch.zeros(()).item()
        except RuntimeError as e:
            raise RuntimeError("the model's forward failed") from e
        return torch.zeros(())

    with pytest.raises(graphs.HostSyncError, match="the step synchronizes with the host at "):
        graphs.capture_cuda_graph(fn, warmup_steps=1, device="cuda:0")


def test_process_broken_follows_an_implicit_chain_too():
    """A CaptureError that another error was raised while handling (its __context__, no ``from``) still stops a
    caller that catches per row."""
    from maefast.graphs import CaptureError, process_broken

    try:
        try:
            raise CaptureError("x", broken=True)
        except CaptureError:
            raise RuntimeError("cleanup failed")
    except RuntimeError as wrapped:
        assert wrapped.__cause__ is None and process_broken(wrapped)


def test_capture_without_a_device_runs_on_the_current_one(monkeypatch):
    """device=None is the current CUDA device (not cuda:0), and "cuda" without an index is that device too: all
    three captures below run on cuda:1, on its one capture stream."""
    cuda = fake_capture_lib.FakeCuda().install(monkeypatch)
    cuda.current = 1
    for device in (None, "cuda", "cuda:1"):
        graphs.capture_cuda_graph(lambda: torch.zeros(()), warmup_steps=1, device=device)
    caps = [e for e in cuda.log if e[0] == "capture"]
    assert [c[2:4] for c in caps] == [(1, 1)] * 3, caps
    assert len({c[1] for c in caps}) == 1, caps
    assert cuda.current == 1


def test_first_line_is_one_line_of_at_most_width_characters():
    """eager_reason and CaptureError.reason say an error in one line: its type, the first line of its message cut
    at ``width``; an error without a message is its type's name."""
    assert graphs.first_line(RuntimeError("a\nb")) == "RuntimeError: a"
    assert graphs.first_line(ValueError("x" * 500)) == "ValueError: " + "x" * 200
    assert graphs.first_line(ValueError("x" * 50), width=10) == "ValueError: " + "x" * 10
    assert graphs.first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
