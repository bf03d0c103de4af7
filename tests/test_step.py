"""maefast.TrainStep: the one training step (eager or captured) that `maefast train`, the benchmarks
and users share.

On the CPU the eager step is checked against a hand-written official loop, and the captured step's
Python (static buffers, device seed, device lrs, GradScaler, accumulation graphs, warm-up undone,
fallback) against the eager step through a stand-in for CUDA-graph capture whose replay runs the
captured function again (`fake_capture`, tests/fake_capture.py). The `cuda` tests replay real graphs.
"""
from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import textwrap

import fake_capture as fake_capture_lib
import pytest
import torch
import torch.nn as nn

from maefast import bench as mb
from maefast import graphs
from maefast.graphs import capture_blocker
from maefast.step import TrainStep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake_capture(monkeypatch):
    """CPU 'capture' (tests/fake_capture.py); returns the capture function (``.made``, ``.fail``)."""
    return fake_capture_lib.install(monkeypatch)


def _twins(impl="auto", seed=0, **overrides):
    torch.manual_seed(seed)
    a = mb.build_model("tiny", impl, CPU, **overrides)
    return a, copy.deepcopy(a)


def _batches(n, batch=3):
    return [torch.randn(batch, 3, 32, 32) for _ in range(n)], [torch.rand(batch, 16) for _ in range(n)]


def _assert_same_params(a, b, exact=True):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), n
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


# -- the eager step is the official loop ---------------------------------------------------------

@pytest.mark.parametrize("source", ["noise", "seed", "model", "noise-reference"])
def test_eager_step_is_the_official_loop(source):
    """Same weights, batches and masks: TrainStep's eager steps equal `zero_grad; loss = model(imgs,
    mask_ratio, noise); loss.backward(); opt.step()` bit for bit."""
    impl = "reference" if source in ("model", "noise-reference") else "auto"
    a, b = _twins(impl)
    imgs, noise = _batches(3)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3, betas=(0.9, 0.95))
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3, betas=(0.9, 0.95))
    step = TrainStep(a, opt_a, seed=100)
    assert step.eager_reason.startswith("CUDA graphs need a CUDA device")  # "auto" on the CPU: eager, says why
    for i in range(3):
        kw = {"noise": noise[i]} if source.startswith("noise") else {}
        torch.manual_seed(7 + i)  # the model-drawn masks come from torch's generator: same draws both sides
        la = step(imgs[i], **kw)
        opt_b.zero_grad(set_to_none=True)
        if source == "seed":
            kw = {"seed": 100 + i}
        if impl == "auto":
            kw["return_pred"] = False
        torch.manual_seed(7 + i)
        lb = b(imgs[i], 0.75, **kw)[0]
        lb.backward()
        opt_b.step()
        assert torch.equal(la, lb.detach()) and not la.requires_grad, (i, la, lb)
    assert step.mask_source == source.split("-")[0] and step.calls == step.optimizer_steps == 3
    _assert_same_params(a, b)
    assert all(p.grad is None for p in a.parameters())  # the step leaves no gradients behind


def test_eager_accumulation_clipping_and_weight():
    """accum_steps=2, clip_grad, a per-call weight and an explicit update=: the official
    accumulation (loss * weight / accum; clip; step; zero_grad at the boundary)."""
    a, b = _twins()
    imgs, noise = _batches(5)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3, betas=(0.9, 0.95))
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3, betas=(0.9, 0.95))
    step = TrainStep(a, opt_a, accum_steps=2, clip_grad=0.05, capture=False)
    weights = [1.0, 0.5, 1.0, 0.0, 1.0]
    updates = [None, None, None, None, True]  # the 5th call ends a short cycle on request
    stepped = []
    for i in range(5):
        step(imgs[i], noise[i], weight=weights[i], update=updates[i])
        lb = b(imgs[i], 0.75, noise[i], return_pred=False)[0]
        (lb * (weights[i] / 2)).backward()
        if i % 2 == 1 or updates[i]:
            torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
            opt_b.step()
            opt_b.zero_grad(set_to_none=True)
        stepped.append(step.optimizer_steps)
        _assert_same_params(a, b)
    assert stepped == [0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="accum_steps > 1"):
        TrainStep(a, opt_a, capture=False)(imgs[0], noise[0], update=False)


def test_bad_weight_and_lr_name_themselves():
    """A NaN weight or learning rate would silently fill every parameter with NaN; a string would fail
    deep inside. Both are refused, naming the argument, before anything runs."""
    a, _ = _twins()
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), lr=1e-3), capture=False)
    before = [p.detach().clone() for p in a.parameters()]
    imgs, noise = _batches(1)
    for bad, err in ((float("nan"), ValueError), (float("inf"), ValueError), (-1.0, ValueError), ("a", TypeError),
                     (True, TypeError), (None, TypeError)):
        with pytest.raises(err, match="weight must be"):
            step(imgs[0], noise[0], weight=bad)
        with pytest.raises(err, match="weight must be"):
            step.backward(torch.zeros((), requires_grad=True), bad)
        with pytest.raises(err, match="lr must be"):
            step.set_lr(bad)
    assert step.calls == 0 and all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    step.set_lr(torch.tensor(2e-3))  # a one-element tensor is a number too
    assert step.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)


def test_eager_fp16_grad_scaler_is_the_official_amp_loop():
    """dtype=fp16 brings a GradScaler (fused AdamW: found_inf goes to the optimizer on the device);
    the steps equal the official AMP loop (autocast fp16, scaler.scale/step/update)."""
    a, b = _twins()
    imgs, noise = _batches(3)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3, fused=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3, fused=True)
    step = TrainStep(a, opt_a, dtype=torch.float16, clip_grad=1.0, capture=False)
    scaler = torch.amp.GradScaler("cpu")
    assert isinstance(step.scaler, torch.amp.GradScaler) and step.scaler.is_enabled()
    for i in range(3):
        la = step(imgs[i], noise[i])
        with torch.autocast("cpu", dtype=torch.float16):
            lb = b(imgs[i], 0.75, noise[i], return_pred=False)[0]
        scaler.scale(lb).backward()
        scaler.unscale_(opt_b)
        torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
        scaler.step(opt_b)
        scaler.update()
        opt_b.zero_grad(set_to_none=True)
        assert torch.equal(la, lb.detach())
    _assert_same_params(a, b)
    assert step.scaler.get_scale() == scaler.get_scale()
    assert TrainStep(a, opt_a, dtype=torch.float16, scaler=False).scaler is None


# -- the captured step (fake capture on the CPU) -----------------------------------------------------

CAPTURE_CASES = {
    "seed": dict(),
    "noise": dict(noise=True),
    "accum2-clip": dict(accum_steps=2, clip_grad=0.05, noise=True),
    "fp16-scaler": dict(dtype=torch.float16, clip_grad=1.0),
    "accum3-fp16": dict(dtype=torch.float16, accum_steps=3),
    "model-drawn": dict(impl="reference"),
}


@pytest.mark.parametrize("case", list(CAPTURE_CASES))
def test_captured_step_equals_eager_step(fake_capture, case):
    """A captured step (warmed up, captured, warm-up undone) replays the same steps as an eager twin:
    same masks (device seed / the caller's noise / torch's generator), lr schedule, accumulation,
    GradScaler; the lrs become device tensors that set_lr writes in place."""
    cfg = dict(CAPTURE_CASES[case])
    use_noise, impl = cfg.pop("noise", False), cfg.pop("impl", "auto")
    a, b = _twins(impl)
    imgs, noise = _batches(6)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True, capturable=True)
    # the eager twin's lr a tensor too (the captured step's become float32 tensors): the same arithmetic
    opt_b = torch.optim.AdamW(b.parameters(), lr=torch.tensor(1e-3), betas=(0.9, 0.95), fused=True, capturable=True)
    cap = TrainStep(a, opt_a, capture=True, seed=50, **cfg)
    eager = TrainStep(b, opt_b, capture=False, seed=50, **cfg)
    n_graphs = 1 if cfg.get("accum_steps", 1) == 1 else 2
    cap.prepare(imgs[0], noise[0] if use_noise else None)  # warm-up and capture draw from torch's generator
    for i, lr in enumerate((1e-3, 1e-3, 5e-4, 5e-4, 2e-4, 1e-4)):
        cap.set_lr(lr)
        eager.set_lr(lr)
        kw = {"noise": noise[i]} if use_noise else {}
        torch.manual_seed(3 + i)
        la = cap(imgs[i], **kw).clone()
        if i == 0:
            assert cap.captured and cap.eager_reason is None and len(fake_capture.made) == n_graphs
        torch.manual_seed(3 + i)
        lb = eager(imgs[i], **kw)
        assert torch.equal(la, lb), (i, la, lb)
        _assert_same_params(a, b)  # the warm-up and capture left no trace
        assert cap.optimizer_steps == eager.optimizer_steps
    assert sum(g.replays for g in fake_capture.made) == 6
    for g in opt_a.param_groups:
        assert isinstance(g["lr"], torch.Tensor) and g["lr"].dtype == torch.float32 and float(g["lr"]) == pytest.approx(1e-4)
    if cap.scaler is not None:
        assert cap.scaler.get_scale() == eager.scaler.get_scale()


def test_capture_undoes_the_warm_up(fake_capture):
    a, b = _twins()
    imgs, _ = _batches(1)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-3, fused=True, capturable=True)
    opt.param_groups[0]["lr_scale"] = 0.5
    step = TrainStep(a, opt, dtype=torch.float16, seed=9, warmup_steps=2).prepare(imgs[0])
    assert step.captured
    _assert_same_params(a, b)
    for st in opt.state.values():  # state the warm-up created starts from zero, like a fresh AdamW
        assert all(not v.any() for v in st.values() if isinstance(v, torch.Tensor))
    assert step.scaler.get_scale() == 65536.0 and int(step.scaler._growth_tracker) == 0
    assert int(step._seed_dev) == 8  # the next call adds 1: seed 9
    lr = opt.param_groups[0]["lr"]
    step.set_lr(2e-4)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(1e-4)  # in place, times lr_scale
    # restore=False keeps the warm-up's updates (benchmarks)
    c = copy.deepcopy(b)
    TrainStep(c, torch.optim.AdamW(c.parameters(), fused=True, capturable=True), restore=False).prepare(imgs[0])
    assert not torch.equal(c.blocks[0].mlp.fc1.weight, b.blocks[0].mlp.fc1.weight)


def test_the_warm_ups_gradients_are_released_before_the_capture(fake_capture, monkeypatch):
    """torch empties its allocator cache when a capture begins: gradients still held then stay reserved
    beside the graph pool's own (~2.6 GB at ViT-H) for the step's life. With accumulation they are
    the graphs' persistent buffers, allocated by the warm-up on purpose."""
    held = []
    real = graphs.capture_cuda_graph

    def capture(fn, *, before_capture=None, **kw):
        def then_look():
            if before_capture is not None:
                before_capture()
            held.append([p.grad is not None for p in a.parameters() if p.requires_grad])

        return real(fn, before_capture=then_look, **kw)

    monkeypatch.setattr(graphs, "capture_cuda_graph", capture)
    a, _ = _twins()
    imgs, _ = _batches(1)
    TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), restore=False).prepare(imgs[0])
    assert held and not any(held[0])
    held.clear()
    TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), accum_steps=2,
              restore=False).prepare(imgs[0])
    assert held and all(held[0])


def test_captured_step_copies_inputs_unless_given_its_buffer(fake_capture):
    a, _ = _twins()
    imgs, noise = _batches(2)
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True))
    step(imgs[0], noise[0])
    buf, nbuf = step.static_imgs, step.static_noise
    v, nv = buf._version, nbuf._version
    step(buf, nbuf)  # the captured buffers themselves (e.g. filled by the data pipeline): no copy
    assert buf._version == v and nbuf._version == nv
    step(imgs[1], noise[1])
    assert buf._version == v + 1 and nbuf._version == nv + 1 and torch.equal(buf, imgs[1])
    with pytest.raises(ValueError, match="captured batch"):
        step(imgs[1][:2], noise[1][:2])
    with pytest.raises(ValueError, match="weight"):
        step(imgs[1], noise[1], weight=0.0)
    with pytest.raises(ValueError, match="noise= on every call or on none"):
        step(imgs[1])


def test_failed_capture_falls_back_to_eager_and_says_why(fake_capture):
    """capture='auto': a capture that fails before it begins (the stand-in raises as a failed warm-up
    does) leaves the model as it was and steps eagerly, with the reason; capture=True raises it.
    (Failures inside the capture, and the real capture code: tests/test_step_failures.py.)"""
    a, b = _twins()
    imgs, noise = _batches(2)
    fake_capture.fail = RuntimeError("operation not permitted when stream is capturing\nmore")
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), lr=1e-3, fused=True, capturable=True), seed=4)
    la = step(imgs[0], noise[0])
    assert not step.captured and step.static_imgs is None
    assert step.eager_reason == "capture failed: RuntimeError: operation not permitted when stream is capturing"
    eager = TrainStep(b, torch.optim.AdamW(b.parameters(), lr=1e-3, fused=True, capturable=True), capture=False,
                      seed=4)
    lb = eager(imgs[0], noise[0])
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
    _assert_same_params(a, b, exact=False)
    c, _ = _twins()
    with pytest.raises(RuntimeError, match="stream is capturing"):
        TrainStep(c, torch.optim.AdamW(c.parameters(), fused=True, capturable=True), capture=True).prepare(imgs[0])


def test_capture_blocker_reasons():
    m = mb.build_model("tiny", "auto", CPU)
    cuda = torch.device("cuda")
    good = torch.optim.AdamW(m.parameters(), fused=True, capturable=True)
    assert capture_blocker(m, good, None, cuda) is None
    assert "CUDA device" in capture_blocker(m, good, None, CPU)
    assert "capturable=True" in capture_blocker(m, torch.optim.AdamW(m.parameters()), None, cuda)
    scaler = torch.amp.GradScaler("cpu")
    assert capture_blocker(m, good, scaler, cuda) is None  # fused AdamW takes the scaler on the device
    foreach = torch.optim.AdamW(m.parameters(), capturable=True, foreach=True)
    assert "found_inf on the host" in capture_blocker(m, foreach, scaler, cuda)
    assert "DDPLike steps eagerly" in capture_blocker(DDPLike(m), good, None, cuda)
    assert "FSDP2Like steps eagerly" in capture_blocker(FSDP2Like(m), good, None, cuda)
    with pytest.raises(ValueError, match="capture=True: CUDA graphs need a CUDA device"):
        TrainStep(m, good, capture=True)


class DDPLike(nn.Module):
    """DistributedDataParallel's shape: .module, no_sync() (records when it is entered: the number of
    forwards run before)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.entered, self.forwards = module, [], 0

    @contextlib.contextmanager
    def no_sync(self):
        self.entered.append(self.forwards)
        yield

    def forward(self, *a, **kw):
        self.forwards += 1
        return self.module(*a, **kw)


class FSDP1Like(nn.Module):
    """FullyShardedDataParallel (FSDP1)'s shape: the model registered as _fsdp_wrapped_module (its
    .module is a property), no_sync()."""

    def __init__(self, module):
        super().__init__()
        self._fsdp_wrapped_module = module

    @property
    def module(self):
        return self._fsdp_wrapped_module

    @contextlib.contextmanager
    def no_sync(self):
        yield

    def forward(self, *a, **kw):
        return self._fsdp_wrapped_module(*a, **kw)


def test_fsdp1_is_read_through():
    """The forward under FSDP1 is inspected: return_pred=False and seed= are passed as without it."""
    m = mb.build_model("tiny", "auto", CPU)
    opt = torch.optim.AdamW(m.parameters(), fused=True, capturable=True)
    step = TrainStep(FSDP1Like(m), opt)
    assert step._fwd_kwargs == {"return_pred": False} and step._takes_seed
    assert repr(step).startswith("TrainStep(MaskedAutoencoderViT")
    assert "FSDP1Like steps eagerly" in capture_blocker(FSDP1Like(m), opt, None, torch.device("cuda"))


class FSDP2Like(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.inner, self.flags = module, []

    def set_requires_gradient_sync(self, flag):
        self.flags.append(flag)

    def forward(self, *a, **kw):
        return self.inner(*a, **kw)


def test_distributed_wrappers_skip_the_gradient_sync_inside_an_accumulation():
    m = mb.build_model("tiny", "auto", CPU)
    imgs, noise = _batches(4)
    ddp = DDPLike(m)
    step = TrainStep(ddp, torch.optim.AdamW(m.parameters()), accum_steps=2)
    assert step._fwd_kwargs == {"return_pred": False} and step._takes_seed  # read through .module
    for i in range(4):
        step(imgs[i], noise[i])
    # micro-batches 0 and 2 accumulate without the all-reduce; 1 and 3, which update, sync
    assert ddp.entered == [0, 2] and step.optimizer_steps == 2
    fsdp = FSDP2Like(m)
    step = TrainStep(fsdp, torch.optim.AdamW(m.parameters()), accum_steps=2)
    for i in range(4):
        step(imgs[i], noise[i])
    assert fsdp.flags == [False, True, False, True]


def test_compiled_model_steps_like_the_plain_one():
    """TrainStep takes a torch.compile'd model (read through _orig_mod: seed= and return_pred=)."""
    a, b = _twins()
    imgs, noise = _batches(2)
    ca = torch.compile(a, backend="aot_eager")
    step = TrainStep(ca, torch.optim.AdamW(a.parameters(), lr=1e-3), seed=3)
    eager = TrainStep(b, torch.optim.AdamW(b.parameters(), lr=1e-3), seed=3)
    assert step._takes_seed and step._fwd_kwargs == {"return_pred": False}
    for i in range(2):
        torch.testing.assert_close(step(imgs[i]), eager(imgs[i]), rtol=1e-5, atol=1e-6)
    _assert_same_params(a, b, exact=False)


@pytest.mark.parametrize("kw,match", [(dict(capture="yes"), "capture must be"), (dict(accum_steps=0), "accum_steps"),
                                      (dict(clip_grad=0), "clip_grad"), (dict(dtype=torch.int32), "dtype"),
                                      (dict(seed=-1), "seed"), (dict(warmup_steps=0), "warmup_steps"),
                                      (dict(scaler="yes"), "scaler"), (dict(capture=1), "capture must be"),
                                      (dict(restore="no"), "restore must be True or False"),
                                      (dict(mask_ratio=1.5), "mask_ratio must be in the open interval"),
                                      (dict(mask_ratio="0.75"), "mask_ratio must be a float")])
def test_bad_arguments_name_themselves(kw, match):
    m = mb.build_model("tiny", "auto", CPU)
    with pytest.raises((ValueError, TypeError), match=match):
        TrainStep(m, torch.optim.AdamW(m.parameters()), **kw)
    with pytest.raises(TypeError, match="optimizer must be"):
        TrainStep(m, None)
    with pytest.raises(TypeError, match="model must be"):
        TrainStep(lambda x: x, torch.optim.AdamW(m.parameters()))


def test_update_must_be_a_bool():
    m = mb.build_model("tiny", "auto", CPU)
    step = TrainStep(m, torch.optim.AdamW(m.parameters()), accum_steps=2, capture=False)
    with pytest.raises(TypeError, match="update must be True or False"):  # "no" would have stepped
        step(torch.randn(2, 3, 32, 32), update="no")


def test_transformers_model_takes_the_ratio_of_its_config():
    """transformers' ViTMAE reads its ratio from its config and would drop a mask_ratio= into **kwargs:
    the step passes none, and a ratio that differs from the config's is an error, not ignored."""
    pytest.importorskip("transformers")
    import maefast
    from maefast.convert import to_transformers_model

    torch.manual_seed(0)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    for patched in (False, True):
        hf = to_transformers_model(mb.build_model("tiny", "reference", CPU), mask_ratio=0.5)
        if patched:
            maefast.patch(hf)
        opt = torch.optim.AdamW(hf.parameters())
        with pytest.raises(ValueError, match=r"model.config.mask_ratio \(0.5\)"):
            TrainStep(hf, opt, capture=False)(imgs, noise)  # the step's default 0.75
        step = TrainStep(hf, opt, mask_ratio=0.5, capture=False)
        want = hf(pixel_values=imgs, noise=noise).loss
        torch.testing.assert_close(step(imgs, noise), want.detach())
        hf.config.mask_ratio = 0.25  # changed under a built step: refused at the next call
        with pytest.raises(ValueError, match="takes its ratio from model.config.mask_ratio"):
            step(imgs, noise)


def test_public_and_light():
    """maefast.TrainStep is the class; `import maefast` and the attribute import no triton."""
    code = textwrap.dedent("""
        import sys, maefast
        assert 'maefast.step' not in sys.modules
        from maefast.step import TrainStep
        assert maefast.TrainStep is TrainStep and 'TrainStep' in maefast.__all__
        assert not any(m == 'triton' or m.startswith('triton.') for m in sys.modules), 'triton imported'
        print('ok')
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# -- every step-benchmark row builds and steps (none may rot) ---------------------------------------

@pytest.mark.parametrize("provider", list(mb.STEP_PROVIDERS))
def test_every_step_benchmark_row_runs_one_step(fake_capture, provider):
    """Each row of benchmarks/bench_step.py on the tiny model: built, prepared (captured rows through
    the CPU stand-in; compiled rows with the aot_eager backend: Inductor takes minutes here), one
    step that trains."""
    if provider == "maefast-patch-hf":
        pytest.importorskip("transformers")
    recipe = mb.STEP_PROVIDERS[provider]
    # the official recipe's fp16 + GradScaler runs on the CPU too: its row is exercised as on a GPU
    dtype = torch.float16 if recipe.official_amp else None
    row = mb.make_step(provider, "tiny", 2, device=CPU, dtype=dtype, compile_backend="aot_eager")
    w = [p for p in row.model.parameters() if p.requires_grad and p.dim() == 2][0]
    before = w.detach().clone()
    assert row.describe()["graph_breaks"] is None  # not read before the row ran: an eager compile is at its first call
    loss = row()
    assert torch.isfinite(loss) and not torch.equal(before, w)
    d = row.describe()
    assert d["captured"] == recipe.capture and d["compiled"] == recipe.compile, d
    assert d["graph_breaks"] == (0 if recipe.compile else None), d  # compiled rows: one graph (fullgraph)
    assert d["amp"] == ("float16 + GradScaler" if recipe.official_amp else "float32"), d
    assert ("fused" in d["optimizer"]) != recipe.official_amp, d
    assert ("capturable" in d["optimizer"]) == recipe.capture, d
    if recipe.capture:
        assert row.imgs is row.step.static_imgs  # the timed call copies nothing


def test_patch_row_patches_an_official_layout_model():
    """The maefast-patch row measures what a user of the official code gets: maefast.patch on an
    official-layout instance (not maefast's own class, whose forward is the fast path already), whose
    parameters the patched forward trains."""
    from maefast.models import MaskedAutoencoderViT
    from maefast.patching import _OfficialForward

    model = mb.STEP_PROVIDERS["maefast-patch"].build("tiny", CPU)
    assert not isinstance(model, MaskedAutoencoderViT) and isinstance(model.__dict__.get("forward"), _OfficialForward)
    from maefast.models.configs import model_config
    from maefast.reference import MaskedAutoencoderViT as OfficialLayout

    plain = OfficialLayout(**model_config("tiny"))
    assert list(dict(model.named_parameters())) == list(dict(plain.named_parameters()))  # the official keys
    row = mb.make_step("maefast-patch", "tiny", 2, device=CPU)
    assert row.step._fwd_kwargs == {"return_pred": False} and row.step._takes_seed


def test_torch_native_ratios():
    recs = [dict(group="train-step", shape_key="a", provider="reference", time_ms=200.0),
            dict(group="train-step", shape_key="a", provider="torch-native", time_ms=120.0),
            dict(group="train-step", shape_key="a", provider="torch-native-graph", time_ms=100.0),
            dict(group="train-step", shape_key="a", provider="maefast-graph", time_ms=80.0),
            dict(group="train-step", shape_key="b", provider="maefast", time_ms=10.0),
            dict(group="other", shape_key="a", provider="x", time_ms=1.0)]
    mb.torch_native_ratios(recs)
    assert recs[3]["best_torch_native_provider"] == "torch-native-graph" and recs[3]["best_torch_native_ms"] == 100.0
    assert recs[3]["speedup_vs_best_torch_native"] == pytest.approx(1.25)
    assert recs[0]["speedup_vs_best_torch_native"] == pytest.approx(0.5)
    assert "best_torch_native_ms" not in recs[4] and "best_torch_native_ms" not in recs[5]


# -- CUDA ------------------------------------------------------------------------------------------

def _assert_params_close(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if n.endswith("qkv.bias"):
            # the key bias's true gradient is 0 (softmax is shift-invariant): AdamW turns its rounding
            # noise into full-size steps, so compare only the query and value thirds
            d = p.shape[0] // 3
            p, q = torch.cat([p[:d], p[2 * d:]]), torch.cat([q[:d], q[2 * d:]])
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-5), n


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CAPTURE_CASES) + ["block-noise", "bf16"])
def test_gpu_captured_step_matches_eager_steps(case):
    """Real CUDA graphs: replays equal an eager twin's steps (fp32 math; fp16/bf16 cases closely)."""
    cfg = dict(CAPTURE_CASES.get(case, {"block-noise": dict(noise=True), "bf16": dict(dtype=torch.bfloat16)}[case]))
    use_noise, impl = cfg.pop("noise", False), cfg.pop("impl", "auto")
    cfg.setdefault("dtype", torch.float32)
    torch.manual_seed(0)
    a = mb.build_model("tiny", impl, "cuda", img_size=64, **({"fused": "block"} if case == "block-noise" else {}))
    b = copy.deepcopy(a)
    imgs = [torch.randn(4, 3, 64, 64, device="cuda") for _ in range(6)]
    noise = [torch.rand(4, 64, device="cuda") for _ in range(6)]
    mk = [torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True, capturable=True) for m in (a, b)]
    cap = TrainStep(a, mk[0], capture=True, seed=100, warmup_steps=2, **cfg)
    eager = TrainStep(b, mk[1], capture=False, seed=100, **cfg)
    loose = cfg["dtype"] != torch.float32
    cap.prepare(imgs[0], noise[0] if use_noise else None)
    torch.cuda.synchronize()
    assert cap.captured
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n  # the warm-up and capture are undone, before any step
    for i, lr in enumerate((1e-3, 1e-3, 5e-4, 5e-4, 2e-4, 1e-4)):
        cap.set_lr(lr)
        eager.set_lr(lr)
        kw = {"noise": noise[i]} if use_noise else {}
        if impl == "reference":  # torch's CUDA generator: a replay draws fresh numbers, not the eager twin's
            cap(imgs[i], **kw)
            continue
        la = cap(imgs[i], **kw).clone()
        lb = eager(imgs[i], **kw)
        torch.testing.assert_close(la, lb, rtol=1e-2 if loose else 1e-4, atol=1e-3 if loose else 1e-6)
        if not loose:  # both have stepped (as often): the same weights
            torch.cuda.synchronize()
            _assert_params_close(a, b)
    assert cap.optimizer_steps == eager.optimizer_steps or impl == "reference"


@pytest.mark.cuda
def test_gpu_replays_draw_fresh_masks_and_train():
    """The same batch replayed: each replay draws a new mask (device seed / torch's generator), so
    the losses differ; the weights move."""
    for impl in ("auto", "reference"):
        torch.manual_seed(0)
        m = mb.build_model("tiny", impl, "cuda")
        step = TrainStep(m, torch.optim.AdamW(m.parameters(), lr=0.0, fused=True, capturable=True), capture=True)
        x = torch.randn(4, 3, 32, 32, device="cuda")
        losses = [float(step(x)) for _ in range(3)]
        assert len(set(losses)) == 3, (impl, losses)
        step.set_lr(1e-3)
        w = m.blocks[0].mlp.fc1.weight.detach().clone()
        step(x)
        torch.cuda.synchronize()
        assert not torch.equal(w, m.blocks[0].mlp.fc1.weight)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["torch-native-graph", "maefast-graph", "maefast-sdpa-graph", "maefast-block-graph",
                                      "maefast-compile-graph"])
def test_gpu_captured_benchmark_rows_capture(provider):
    if provider not in mb.STEP_PROVIDERS:
        pytest.skip(f"{provider}: not in this checkout")
    row = mb.make_step(provider, "tiny", 4, device="cuda")
    assert row.step.captured
    losses = [float(row()) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_zero_grad_drops_a_partial_accumulation(fake_capture):
    """step.zero_grad() between epochs: eager sets the gradients to None; captured zeroes the graphs'
    own gradient buffers in place (held by the step: a caller's set_to_none cannot free them)."""
    imgs, noise = _batches(3)
    for capture in (False, True):
        a, _ = _twins()
        opt = torch.optim.AdamW(a.parameters(), fused=True, capturable=True)
        step = TrainStep(a, opt, accum_steps=2, capture=capture)
        step(imgs[0], noise[0])
        assert step._in_cycle == 1 and a.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
        held = list(step._static_grads) if capture else None
        opt.zero_grad(set_to_none=True)  # what a loop may do between epochs
        step.zero_grad()
        assert step._in_cycle == 0
        if capture:
            assert all(not g.any() for g in held if g is not None)
            assert all(x is y for x, y in zip(step._static_grads, held))
        else:
            assert all(p.grad is None for p in a.parameters())
        step(imgs[1], noise[1])
        assert step.optimizer_steps == 0  # a new cycle: the first of two micro-batches


# -- gaps found by mutation testing ---------------------------------------------------------------

def test_default_seed_comes_from_torchs_generator():
    """seed=None: drawn from torch's default generator, so torch.manual_seed reproduces a run's masks and
    another seed gives other masks (not one fixed seed for every run)."""
    m = mb.build_model("tiny", "auto", CPU)
    opt = torch.optim.AdamW(m.parameters())
    seeds = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        seeds.append(TrainStep(m, opt, capture=False).seed)
    assert seeds[0] == seeds[1] != seeds[2], seeds
    assert all(0 <= s < 2 ** 62 for s in seeds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_steps_dtype_rules_inside_a_callers_autocast(dtype):
    """The step's dtype rules its forward, backward and update, also inside a caller's autocast region: a
    loop wrapped in torch.autocast(fp16) steps as it would outside it (an fp32 step's backward once ran
    its matmuls in the caller's 16-bit dtype: the loss equal, the parameters an update apart)."""
    a, b = _twins(impl="reference")
    imgs, noise = _batches(2)
    sa = TrainStep(a, torch.optim.AdamW(a.parameters(), lr=1e-3), dtype=dtype, capture=False, clip_grad=1.0)
    sb = TrainStep(b, torch.optim.AdamW(b.parameters(), lr=1e-3), dtype=dtype, capture=False, clip_grad=1.0)
    for i in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            la = sa(imgs[i], noise[i])
        lb = sb(imgs[i], noise[i])
        assert la.dtype == lb.dtype and torch.equal(la, lb), (la, lb)
    _assert_same_params(a, b)


class Returns(nn.Module):
    """An MAE whose forward returns the official tuple ("tuple"), the loss alone ("alone") or one loss
    per sample ("vector", not a scalar)."""

    def __init__(self, inner, how):
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        out = self.inner(imgs, mask_ratio, noise)
        return out if self.how == "tuple" else out[0] if self.how == "alone" else out[0].expand(imgs.shape[0])


def test_a_forward_may_return_the_loss_alone_but_not_a_vector():
    a, b = _twins()
    imgs, noise = _batches(2)
    sa = TrainStep(Returns(a, "alone"), torch.optim.AdamW(a.parameters(), lr=1e-3), capture=False)
    sb = TrainStep(Returns(b, "tuple"), torch.optim.AdamW(b.parameters(), lr=1e-3), capture=False)
    for i in range(2):
        assert torch.equal(sa(imgs[i], noise[i]), sb(imgs[i], noise[i]))
    _assert_same_params(a, b)
    bad = TrainStep(Returns(b, "vector"), torch.optim.AdamW(b.parameters()), capture=False)
    with pytest.raises(ValueError, match=r"must return the scalar loss .* got Tensor \(3,\)"):
        bad(imgs[0], noise[0])


def test_a_captured_step_refuses_its_eager_pieces(fake_capture):
    """forward() and optimizer_step() of a captured step raise (the graphs own the gradients): they would
    step the optimizer or count calls behind the replays' back."""
    a, _ = _twins()
    imgs, noise = _batches(1)
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), seed=3)
    step(imgs[0], noise[0])
    assert step.captured
    before = [p.detach().clone() for p in a.parameters()]
    for piece in (lambda: step.forward(imgs[0], noise[0]), step.optimizer_step):
        with pytest.raises(RuntimeError, match="this step is captured"):
            piece()
    assert step.calls == step.optimizer_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))


def test_stepping_through_the_pieces_first_makes_the_step_eager_saying_why(fake_capture):
    """forward()/backward()/optimizer_step() before any call: the step is eager from then on (a capture
    would not see the pieces' state), and eager_reason and repr say so."""
    a, b = _twins()
    imgs, noise = _batches(2)
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), lr=1e-3, fused=True, capturable=True), seed=3)
    eager = TrainStep(b, torch.optim.AdamW(b.parameters(), lr=1e-3, fused=True, capturable=True), capture=False,
                      seed=3)
    step.backward(step.forward(imgs[0], noise[0]))
    step.optimizer_step()
    eager(imgs[0], noise[0])
    assert step.eager_reason == "stepped through forward()/backward()/optimizer_step() before any call"
    assert "eager (stepped through" in repr(step)
    assert torch.equal(step(imgs[1], noise[1]), eager(imgs[1], noise[1]))
    assert not step.captured and not fake_capture.made and step.calls == step.optimizer_steps == 2
    _assert_same_params(a, b)


def test_prepare_runs_once_and_checks_the_device(fake_capture):
    """prepare() of a prepared step raises (it would capture again); a batch on another device than the
    model's is the caller's mistake: refused, the step left unprepared, not made eager for good."""
    a, _ = _twins()
    imgs, noise = _batches(1)
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), seed=3)
    with pytest.raises(ValueError, match="imgs must be a tensor on the model's device cpu, got meta"):
        step(imgs[0].to("meta"), noise[0])
    with pytest.raises(ValueError, match="noise must be a tensor on the model's device cpu, got meta"):
        step.prepare(imgs[0], noise[0].to("meta"))
    assert step.mask_source is None and step.eager_reason is None and not fake_capture.made
    step.prepare(imgs[0], noise[0])
    assert step.captured and len(fake_capture.made) == 1
    with pytest.raises(RuntimeError, match="already prepared"):
        step.prepare(imgs[0], noise[0])
    assert len(fake_capture.made) == 1


def test_capture_true_tries_again_after_a_failure_before_the_capture(fake_capture):
    """capture=True: a capture that failed before it began (e.g. out of memory in the warm-up) raises and
    leaves the step unprepared, with the model as it was; the next call tries to capture again, never
    stepping eagerly."""
    a, b = _twins()
    imgs, noise = _batches(1)
    fake_capture.fail = RuntimeError("CUDA out of memory")
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), capture=True, seed=4)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="out of memory"):
            step(imgs[0], noise[0])
        assert step.mask_source is None and not step.captured and step.calls == step.optimizer_steps == 0
    _assert_same_params(a, b)
    fake_capture.fail = None
    step(imgs[0], noise[0])
    assert step.captured and step.eager_reason is None and step.optimizer_steps == 1


def test_captured_step_owns_its_buffers_and_checks_each_batch(fake_capture):
    """The static buffers are copies (the caller's first batch is never overwritten by later ones); a
    batch of another dtype, or noise of another shape (which would broadcast: one sample's noise for
    all), is refused rather than cast or broadcast into the buffers."""
    a, _ = _twins()
    imgs, noise = _batches(2)
    first = imgs[0].clone(), noise[0].clone()
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), seed=3)
    step(imgs[0], noise[0])
    step(imgs[1], noise[1])
    assert torch.equal(imgs[0], first[0]) and torch.equal(noise[0], first[1])
    assert step.static_imgs is not imgs[0] and step.static_noise is not noise[0]
    with pytest.raises(ValueError, match="captured batch"):
        step(imgs[1].double(), noise[1])
    with pytest.raises(ValueError, match=r"noise must have shape \(3, 16\)"):
        step(imgs[1], noise[1][:1])
    assert step.calls == 2


def test_the_warm_up_steps_the_optimizer_before_the_capture(fake_capture, monkeypatch):
    """warmup_steps are optimizer steps (AdamW's state and its kernels made outside the graphs), also with
    accumulation, where each warm-up step is a whole cycle ending in an update."""
    real = graphs.capture_cuda_graph
    for accum in (1, 2):
        a, _ = _twins()
        opt = torch.optim.AdamW(a.parameters(), fused=True, capturable=True)
        p0 = next(a.parameters())
        seen = []

        def capture(fn, *, warmup_steps=3, warmup_fn=None, **kw):
            for _ in range(warmup_steps):
                (warmup_fn or fn)()
            if warmup_steps:  # what the warm-up left, before the capture
                seen.append(float(opt.state[p0]["step"]) if p0 in opt.state else 0.0)
            return real(fn, warmup_steps=0, **kw)

        monkeypatch.setattr(graphs, "capture_cuda_graph", capture)
        TrainStep(a, opt, accum_steps=accum, warmup_steps=2).prepare(_batches(1)[0][0])
        assert seen == [2.0], (accum, seen)


def test_capture_undoes_the_warm_up_back_to_a_resumed_optimizers_state(fake_capture):
    """An optimizer with state (resumed from a checkpoint, or stepped before the step was built): the
    warm-up is undone back to that state, not to a fresh one, and the steps continue as an eager
    twin's."""
    a, b = _twins()
    imgs, noise = _batches(3)
    opts = []
    for m in (a, b):
        opt = torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-3), fused=True, capturable=True)
        m(imgs[0], 0.75, noise[0], return_pred=False)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        opts.append(opt)
    cap = TrainStep(a, opts[0], capture=True, seed=5)
    eager = TrainStep(b, opts[1], capture=False, seed=5)
    for i in (1, 2):
        assert torch.equal(cap(imgs[i], noise[i]), eager(imgs[i], noise[i]))
        _assert_same_params(a, b)
    for p, q in zip(a.parameters(), b.parameters()):
        for k, v in opts[1].state[q].items():
            assert torch.equal(opts[0].state[p][k], v), k


def test_an_optimizer_changed_after_the_capture_is_refused(fake_capture):
    """The graphs step the groups and read the state they were captured with: a group added later
    (add_param_group) would never train (its learning rate written by set_lr, read by no one), and a
    state dropped later (opt.state.clear()) would leave them reading tensors no one holds."""
    a, _ = _twins()
    imgs, noise = _batches(1)
    params = list(a.parameters())
    opt = torch.optim.AdamW(params[:-1], lr=torch.tensor(1e-3), fused=True, capturable=True)
    step = TrainStep(a, opt, seed=3)
    step(imgs[0], noise[0])
    opt.add_param_group({"params": params[-1:]})
    with pytest.raises(RuntimeError, match="replaced after the capture"):
        step(imgs[0], noise[0])
    with pytest.raises(RuntimeError, match="replaced after the capture"):
        step.set_lr(1e-4)
    opt.param_groups.pop()
    step(imgs[0], noise[0])  # as captured again: fine
    opt.state.clear()
    with pytest.raises(RuntimeError, match="replaced after the capture"):
        step(imgs[0], noise[0])


def test_a_disabled_grad_scaler_does_not_block_the_capture():
    """A disabled GradScaler (e.g. restored from a bf16 run's checkpoint) is no scaler: the step still
    captures with a non-fused capturable AdamW."""
    m = mb.build_model("tiny", "auto", CPU)
    foreach = torch.optim.AdamW(m.parameters(), capturable=True, foreach=True)
    assert capture_blocker(m, foreach, torch.amp.GradScaler("cpu", enabled=False), torch.device("cuda")) is None


class Wrapped(nn.Module):
    """A user's module around an MAE, held as ``self.module`` (no distributed wrapper: no no_sync()),
    with its own forward, which takes neither seed= nor return_pred=."""

    def __init__(self, mae):
        super().__init__()
        self.module = mae

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        return self.module(imgs, mask_ratio, noise)


def test_a_plain_module_named_module_is_not_unwrapped():
    """Only a distributed wrapper (no_sync()) is read through its .module: a user's wrapper is called
    with what its own forward takes."""
    a, b = _twins()
    imgs, noise = _batches(1)
    step = TrainStep(Wrapped(a), torch.optim.AdamW(a.parameters(), lr=1e-3), capture=False)
    assert step._fwd_kwargs == {} and not step._takes_seed and repr(step).startswith("TrainStep(Wrapped")
    eager = TrainStep(b, torch.optim.AdamW(b.parameters(), lr=1e-3), capture=False)
    torch.testing.assert_close(step(imgs[0], noise[0]), eager(imgs[0], noise[0]))


def test_a_transformers_ratio_that_differs_is_refused_when_built():
    """The config/ratio disagreement is found when the step is built, not first at its first call."""
    pytest.importorskip("transformers")
    from maefast.convert import to_transformers_model

    hf = to_transformers_model(mb.build_model("tiny", "reference", CPU), mask_ratio=0.5)
    with pytest.raises(ValueError, match=r"mask_ratio=0.75, but .* model.config.mask_ratio \(0.5\)"):
        TrainStep(hf, torch.optim.AdamW(hf.parameters()), capture=False)


def test_a_captured_forward_runs_without_autocasts_cast_cache(fake_capture, monkeypatch):
    """torch.cuda.graph requires autocast's cast cache off inside a capture (a cached cast would replay
    stale weights): the captured body's autocast has cache_enabled=False; an eager step keeps the cache."""
    seen = []
    real = torch.autocast

    def spy(*args, **kw):
        if kw.get("dtype") == torch.float16:
            seen.append(kw.get("cache_enabled", True))
        return real(*args, **kw)

    monkeypatch.setattr(torch, "autocast", spy)
    a, _ = _twins()
    imgs, noise = _batches(1)
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), dtype=torch.float16)
    step(imgs[0], noise[0])
    assert step.captured and seen and not any(seen), seen
    seen.clear()
    TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True), dtype=torch.float16, capture=False)(imgs[0], noise[0])
    assert seen == [True]
