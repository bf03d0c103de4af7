"""maefast.TrainStep: the one training step (eager or captured) that `maefast train`, the benchmarks
and users share.

On the CPU the eager step is checked against a hand-written official loop; the distributed wrappers,
compiled and transformers models, the arguments, and every step-benchmark row. The captured step:
tests/test_step_capture.py; a capture that fails: tests/test_step_failures.py.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from maefast import bench as mb
from maefast.graphs import capture_blocker
from maefast.step import TrainStep
from step_twins import assert_same_params, batches, twins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the eager step is the official loop ---------------------------------------------------------

@pytest.mark.parametrize("source", ["noise", "seed", "model", "noise-reference"])
def test_eager_step_is_the_official_loop(source):
    """Same weights, batches and masks: TrainStep's eager steps equal `zero_grad; loss = model(imgs,
    mask_ratio, noise); loss.backward(); opt.step()` bit for bit."""
    impl = "reference" if source in ("model", "noise-reference") else "auto"
    a, b = twins(impl)
    imgs, noise = batches(3)
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
    assert_same_params(a, b)
    assert all(p.grad is None for p in a.parameters())  # the step leaves no gradients behind


def test_eager_accumulation_clipping_and_weight():
    """accum_steps=2, clip_grad, a per-call weight and an explicit update=: the official
    accumulation (loss * weight / accum; clip; step; zero_grad at the boundary)."""
    a, b = twins()
    imgs, noise = batches(5)
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
        assert_same_params(a, b)
    assert stepped == [0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="accum_steps > 1"):
        TrainStep(a, opt_a, capture=False)(imgs[0], noise[0], update=False)


def test_bad_weight_and_lr_name_themselves():
    """A NaN weight or learning rate would silently fill every parameter with NaN; a string would fail
    deep inside. Both are refused, naming the argument, before anything runs."""
    a, _ = twins()
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), lr=1e-3), capture=False)
    before = [p.detach().clone() for p in a.parameters()]
    imgs, noise = batches(1)
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
    a, b = twins()
    imgs, noise = batches(3)
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
    assert_same_params(a, b)
    assert step.scaler.get_scale() == scaler.get_scale()
    assert TrainStep(a, opt_a, dtype=torch.float16, scaler=False).scaler is None


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


def test_capture_blocker_reads_every_group_and_any_non_cuda_device():
    """A later param group built with capturable=False blocks the capture as the first would (its step counts
    live on the host); a model on any device but CUDA (meta here, not only the CPU) is not captured."""
    m = mb.build_model("tiny", "auto", CPU)
    ps = list(m.parameters())
    mixed = torch.optim.AdamW([{"params": ps[:-1]}, {"params": ps[-1:], "capturable": False}], fused=True,
                              capturable=True)
    assert "AdamW was built without capturable=True" in capture_blocker(m, mixed, None, torch.device("cuda"))
    good = torch.optim.AdamW(ps, fused=True, capturable=True)
    reason = capture_blocker(m, good, None, torch.device("meta"))
    assert reason == "CUDA graphs need a CUDA device (the model is on meta)"


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
    imgs, noise = batches(4)
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
    a, b = twins()
    imgs, noise = batches(2)
    ca = torch.compile(a, backend="aot_eager")
    step = TrainStep(ca, torch.optim.AdamW(a.parameters(), lr=1e-3), seed=3)
    eager = TrainStep(b, torch.optim.AdamW(b.parameters(), lr=1e-3), seed=3)
    assert step._takes_seed and step._fwd_kwargs == {"return_pred": False}
    for i in range(2):
        torch.testing.assert_close(step(imgs[i]), eager(imgs[i]), rtol=1e-5, atol=1e-6)
    assert_same_params(a, b, exact=False)


@pytest.mark.parametrize("kw,match", [(dict(capture="yes"), "capture must be"), (dict(accum_steps=0), "accum_steps"),
                                      (dict(clip_grad=0), "clip_grad"), (dict(dtype=torch.int32), "dtype"),
                                      (dict(seed=-1), "seed"), (dict(warmup_steps=0), "warmup_steps"),
                                      (dict(scaler="yes"), "scaler"), (dict(capture=1), "capture must be"),
                                      (dict(restore="no"), "restore must be True or False"),
                                      (dict(mask_ratio=1.5), "mask_ratio must be in the open interval"),
                                      (dict(mask_ratio="0.75"), "mask_ratio must be a float"),
                                      (dict(clip_grad=-1.0), "clip_grad"), (dict(seed=1.5), "seed")])
def test_bad_arguments_name_themselves(kw, match):
    """And an eager step's setting assigned later is checked alike (a clip_grad of -1 reversed every update,
    accum_steps = 0 divided by zero at the next backward), the value kept."""
    m = mb.build_model("tiny", "auto", CPU)
    with pytest.raises((ValueError, TypeError), match=match):
        TrainStep(m, torch.optim.AdamW(m.parameters()), **kw)
    (name, value), = kw.items()
    if name not in ("capture", "scaler"):  # (fixed when built)
        step = TrainStep(m, torch.optim.AdamW(m.parameters()), capture=False)
        before = getattr(step, name)
        with pytest.raises((ValueError, TypeError), match=match):
            setattr(step, name, value)
        assert getattr(step, name) == before
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
    # not read before the model ran: an eager row compiles at its first call, a captured one in its warm-up
    assert row.describe()["graph_breaks"] == (0 if recipe.compile and recipe.capture else None)
    loss = row()
    assert torch.isfinite(loss) and not torch.equal(before, w)
    d = row.describe()
    assert d["captured"] == recipe.capture and d["compiled"] == recipe.compile, d
    assert d["graph_breaks"] == (0 if recipe.compile else None), d  # compiled rows: one graph (fullgraph)
    assert d["amp"] == ("float16 + GradScaler" if recipe.official_amp else "float32"), d
    assert ("fused" in d["optimizer"]) != recipe.official_amp, d
    assert ("default (for-loop)" in d["optimizer"]) == recipe.official_amp, d  # torch's default on the CPU
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
    a, b = twins(impl="reference")
    imgs, noise = batches(2)
    sa = TrainStep(a, torch.optim.AdamW(a.parameters(), lr=1e-3), dtype=dtype, capture=False, clip_grad=1.0)
    sb = TrainStep(b, torch.optim.AdamW(b.parameters(), lr=1e-3), dtype=dtype, capture=False, clip_grad=1.0)
    for i in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            la = sa(imgs[i], noise[i])
        lb = sb(imgs[i], noise[i])
        assert la.dtype == lb.dtype and torch.equal(la, lb), (la, lb)
    assert_same_params(a, b)


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
    a, b = twins()
    imgs, noise = batches(2)
    sa = TrainStep(Returns(a, "alone"), torch.optim.AdamW(a.parameters(), lr=1e-3), capture=False)
    sb = TrainStep(Returns(b, "tuple"), torch.optim.AdamW(b.parameters(), lr=1e-3), capture=False)
    for i in range(2):
        assert torch.equal(sa(imgs[i], noise[i]), sb(imgs[i], noise[i]))
    assert_same_params(a, b)
    bad = TrainStep(Returns(b, "vector"), torch.optim.AdamW(b.parameters()), capture=False)
    with pytest.raises(ValueError, match=r"must return the scalar loss .* got Tensor \(3,\)"):
        bad(imgs[0], noise[0])


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
    a, b = twins()
    imgs, noise = batches(1)
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


def test_only_fp16_brings_a_grad_scaler_by_default():
    """scaler=None: a new GradScaler for fp16 only; bf16 and fp32 have the range of fp32 and step without one (a
    scaler there would skip steps on its own and, on a captured step, needs a fused AdamW for nothing)."""
    m = mb.build_model("tiny", "auto", CPU)
    opt = torch.optim.AdamW(m.parameters())
    for dtype in (torch.bfloat16, torch.float32):
        assert TrainStep(m, opt, dtype=dtype, capture=False).scaler is None, dtype
    assert isinstance(TrainStep(m, opt, dtype=torch.float16, capture=False).scaler, torch.amp.GradScaler)


def test_a_seed_past_philoxs_range_is_refused():
    """Call k draws with seed + k, which must stay inside Philox's [0, 2**63): seeds are refused from 2**62 on
    (the largest one below is taken)."""
    m = mb.build_model("tiny", "auto", CPU)
    opt = torch.optim.AdamW(m.parameters())
    assert TrainStep(m, opt, seed=2 ** 62 - 1, capture=False).seed == 2 ** 62 - 1
    for bad in (2 ** 62, 2 ** 63 + 5):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*62\)"):
            TrainStep(m, opt, seed=bad, capture=False)


def test_a_model_without_parameters_is_refused_by_name():
    """A model with no parameters (a wrapper whose MAE is held outside it, say) has nothing to train and no device
    to step on: a ValueError saying so, before the optimizer is looked at."""
    m = mb.build_model("tiny", "auto", CPU)
    holder = nn.Module()
    holder.__dict__["mae"] = m  # not registered: holder has no parameters
    with pytest.raises(ValueError, match="model has no parameters to train"):
        TrainStep(holder, torch.optim.AdamW(m.parameters()), capture=False)


@pytest.mark.parametrize("name", ["accum_steps", "warmup_steps", "clip_grad", "seed"])
def test_a_bool_is_no_step_count_norm_or_seed(name):
    """True is the int 1 to Python: accum_steps=True, warmup_steps=True, clip_grad=True (a max norm of 1) or
    seed=True (seed 1) is a flag passed to the wrong argument, refused by name rather than taken as 1."""
    m = mb.build_model("tiny", "auto", CPU)
    with pytest.raises(ValueError, match=f"{name} must be"):
        TrainStep(m, torch.optim.AdamW(m.parameters()), capture=False, **{name: True})


class ConfigWithoutRatio(nn.Module):
    """A wrapper with a ``config`` that has no number for mask_ratio, whose forward takes the ratio in **kwargs."""

    def __init__(self, mae, ratio_attr):
        super().__init__()
        self.mae = mae
        self.config = type("Config", (), {} if ratio_attr is None else {"mask_ratio": ratio_attr})()

    def forward(self, imgs, **kw):
        return self.mae(imgs, **kw)


@pytest.mark.parametrize("ratio_attr", [None, "0.5"], ids=["no-attribute", "not-a-number"])
def test_a_config_without_a_numeric_ratio_is_not_the_models_ratio(ratio_attr):
    """Only a config whose mask_ratio is a number (transformers' ViTMAE) takes the ratio away from the step: any
    other ``config`` is ignored and the step passes its own mask_ratio= (as to a model without one)."""
    a, b = twins()
    imgs, noise = batches(1)
    step = TrainStep(ConfigWithoutRatio(a, ratio_attr), torch.optim.AdamW(a.parameters(), lr=1e-3), mask_ratio=0.5,
                     capture=False)
    eager = TrainStep(b, torch.optim.AdamW(b.parameters(), lr=1e-3), mask_ratio=0.5, capture=False)
    torch.testing.assert_close(step(imgs[0], noise=noise[0]), eager(imgs[0], noise=noise[0]))


def test_a_config_ratio_binds_only_a_model_that_reads_it():
    """A model of one's own whose forward takes mask_ratio= and whose config.mask_ratio is only a default is
    stepped at the step's ratio (transformers' ViTMAE, patched or not, reads the config:
    tests/test_step_capture.py)."""
    import types

    model = mb.build_model("tiny", "reference", torch.device("cpu"))
    model.config = types.SimpleNamespace(mask_ratio=0.25)
    step = TrainStep(model, torch.optim.AdamW(model.parameters()), mask_ratio=0.75, seed=3)
    imgs = torch.randn(2, 3, 32, 32)
    assert step(imgs).dim() == 0


def test_a_patched_official_layout_model_on_its_slow_path_trains_through_the_step():
    """README: a call the fast path cannot serve runs the original forward (same result, slower) with a
    SlowPathWarning. TrainStep passes a seed (for fresh masks) that an original forward without noise cannot
    take: there the original draws its own mask (before 2026-12-07 every call raised, telling the user to
    call without the seed=, which the user never passed). A seed the caller passes is still refused."""
    import warnings

    import maefast
    from maefast.patching import SlowPathWarning
    from official_layout import TINY, official_class

    torch.manual_seed(0)
    model = official_class()(**TINY)
    model.blocks[0].mlp.drop.p = 0.1  # a fork that trains with dropout: served by the original forward
    maefast.patch(model)
    before = model.decoder_pred.weight.detach().clone()
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    imgs = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        losses = [step(imgs) for _ in range(2)]
        assert step.mask_source == "seed" and all(torch.isfinite(x) for x in losses)
        assert not torch.equal(model.decoder_pred.weight, before)
        with pytest.raises(TypeError, match="original forward takes no noise \\(nor seed\\)"):
            model(imgs, seed=3)


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_a_step_under_no_grad_says_it_needs_gradients(ctx):
    """Under torch.no_grad() (an evaluation loop's context) torch failed deep in the backward with "element 0
    of tensors does not require grad"; the step says what is wrong, before touching anything."""
    model = mb.build_model("tiny", "auto", torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), seed=3)
    with getattr(torch, ctx)(), pytest.raises(RuntimeError, match="called under torch.no_grad.* needs gradients"):
        step(torch.randn(2, 3, 32, 32))
    assert step.calls == 0 and step.mask_source is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert step(torch.randn(2, 3, 32, 32)).dim() == 0  # outside: it steps
