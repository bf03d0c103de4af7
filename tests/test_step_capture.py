"""maefast.TrainStep captured: the step's Python around a CUDA-graph capture (static buffers, device
seed, device lrs, GradScaler, accumulation graphs, warm-up undone, fallback) against the eager step,
through a stand-in for the capture whose replay runs the captured function again (`fake_capture`,
tests/fake_capture.py); the `cuda` tests replay real graphs. The eager step and the arguments:
tests/test_step.py; a capture that fails: tests/test_step_failures.py."""
from __future__ import annotations

import copy

import pytest
import torch

from maefast import bench as mb
from maefast import graphs
from maefast.step import TrainStep
from step_twins import assert_same_params, batches, twins

pytestmark = pytest.mark.usefixtures("one_thread")


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
    a, b = twins(impl)
    imgs, noise = batches(6)
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
        assert_same_params(a, b)  # the warm-up and capture left no trace
        assert cap.optimizer_steps == eager.optimizer_steps
    assert sum(g.replays for g in fake_capture.made) == 6
    for g in opt_a.param_groups:
        assert isinstance(g["lr"], torch.Tensor) and g["lr"].dtype == torch.float32
        assert float(g["lr"]) == pytest.approx(1e-4)
    if cap.scaler is not None:
        assert cap.scaler.get_scale() == eager.scaler.get_scale()


def test_capture_undoes_the_warm_up(fake_capture):
    a, b = twins()
    imgs, _ = batches(1)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-3, fused=True, capturable=True)
    opt.param_groups[0]["lr_scale"] = 0.5
    step = TrainStep(a, opt, dtype=torch.float16, seed=9, warmup_steps=2).prepare(imgs[0])
    assert step.captured
    assert_same_params(a, b)
    for st in opt.state.values():  # state the warm-up created starts from zero, like a fresh AdamW
        assert all(not v.any() for v in st.values() if isinstance(v, torch.Tensor))
    assert step.scaler.get_scale() == 65536.0 and int(step.scaler._growth_tracker) == 0
    assert int(step._seed_dev) == 8  # the next call adds 1: seed 9
    lr = opt.param_groups[0]["lr"]
    step.set_lr(2e-4)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(1e-4)  # in place, times lr_scale
    # restore=False keeps the warm-up's steps (benchmarks), counted: call k still draws seed + k
    for accum in (1, 2):
        c = copy.deepcopy(b)
        kept = TrainStep(c, torch.optim.AdamW(c.parameters(), fused=True, capturable=True), seed=9, warmup_steps=2,
                         accum_steps=accum, restore=False).prepare(imgs[0])
        assert not torch.equal(c.blocks[0].mlp.fc1.weight, b.blocks[0].mlp.fc1.weight)
        assert (kept.calls, kept.optimizer_steps, int(kept._seed_dev)) == (2 * accum, 2, 9 + 2 * accum - 1)
        kept(imgs[0])  # the replay drew the mask of seed + k, k the calls before it
        assert (kept.calls, int(kept._seed_dev)) == (2 * accum + 1, 9 + 2 * accum)


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
    a, _ = twins()
    imgs, _ = batches(1)
    TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), restore=False).prepare(imgs[0])
    assert held and not any(held[0])
    held.clear()
    TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), accum_steps=2,
              restore=False).prepare(imgs[0])
    assert held and all(held[0])


def test_captured_step_copies_inputs_unless_given_its_buffer(fake_capture):
    a, _ = twins()
    imgs, noise = batches(2)
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
    a, b = twins()
    imgs, noise = batches(2)
    fake_capture.fail = RuntimeError("operation not permitted when stream is capturing\nmore")
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), lr=1e-3, fused=True, capturable=True), seed=4)
    la = step(imgs[0], noise[0])
    assert not step.captured and step.static_imgs is None
    assert step.eager_reason == "capture failed: RuntimeError: operation not permitted when stream is capturing"
    eager = TrainStep(b, torch.optim.AdamW(b.parameters(), lr=1e-3, fused=True, capturable=True), capture=False,
                      seed=4)
    lb = eager(imgs[0], noise[0])
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
    assert_same_params(a, b, exact=False)
    c, _ = twins()
    with pytest.raises(RuntimeError, match="stream is capturing"):
        TrainStep(c, torch.optim.AdamW(c.parameters(), fused=True, capturable=True), capture=True).prepare(imgs[0])


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
    cfg = dict({**CAPTURE_CASES, "block-noise": dict(noise=True), "bf16": dict(dtype=torch.bfloat16)}[case])
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
@pytest.mark.parametrize("provider", ["torch-native-graph", "maefast-graph", "maefast-sdpa-graph",
                                      "maefast-block-graph", "maefast-compile-graph"])
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
    imgs, noise = batches(3)
    for capture in (False, True):
        a, _ = twins()
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

def test_a_captured_step_refuses_its_eager_pieces(fake_capture):
    """forward() and optimizer_step() of a captured step raise (the graphs own the gradients): they would
    step the optimizer or count calls behind the replays' back."""
    a, _ = twins()
    imgs, noise = batches(1)
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
    a, b = twins()
    imgs, noise = batches(2)
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
    assert_same_params(a, b)


def test_prepare_runs_once_and_checks_the_device(fake_capture):
    """prepare() of a prepared step raises (it would capture again); a batch on another device than the
    model's is the caller's mistake: refused, the step left unprepared, not made eager for good."""
    a, _ = twins()
    imgs, noise = batches(1)
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
    a, b = twins()
    imgs, noise = batches(1)
    fake_capture.fail = RuntimeError("CUDA out of memory")
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), capture=True, seed=4)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="out of memory"):
            step(imgs[0], noise[0])
        assert step.mask_source is None and not step.captured and step.calls == step.optimizer_steps == 0
    assert_same_params(a, b)
    fake_capture.fail = None
    step(imgs[0], noise[0])
    assert step.captured and step.eager_reason is None and step.optimizer_steps == 1


def test_captured_step_owns_its_buffers_and_checks_each_batch(fake_capture):
    """The static buffers are copies (the caller's first batch is never overwritten by later ones); a
    batch of another dtype, or noise of another shape (which would broadcast: one sample's noise for
    all), is refused rather than cast or broadcast into the buffers."""
    a, _ = twins()
    imgs, noise = batches(2)
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
        a, _ = twins()
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
        TrainStep(a, opt, accum_steps=accum, warmup_steps=2).prepare(batches(1)[0][0])
        assert seen == [2.0], (accum, seen)


def test_capture_undoes_the_warm_up_back_to_a_resumed_optimizers_state(fake_capture):
    """An optimizer with state (resumed from a checkpoint, or stepped before the step was built): the
    warm-up is undone back to that state, not to a fresh one, and the steps continue as an eager
    twin's."""
    a, b = twins()
    imgs, noise = batches(3)
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
        assert_same_params(a, b)
    for p, q in zip(a.parameters(), b.parameters()):
        for k, v in opts[1].state[q].items():
            assert torch.equal(opts[0].state[p][k], v), k


def test_an_optimizer_changed_after_the_capture_is_refused(fake_capture):
    """The graphs step the groups and read the state they were captured with: a group added later
    (add_param_group) would never train (its learning rate written by set_lr, read by no one), and a
    state dropped later (opt.state.clear()) would leave them reading tensors no one holds."""
    a, _ = twins()
    imgs, noise = batches(1)
    params = list(a.parameters())
    opt = torch.optim.AdamW(params[:-1], lr=torch.tensor(1e-3), fused=True, capturable=True)
    step = TrainStep(a, opt, seed=3)
    step(imgs[0], noise[0])
    opt.add_param_group({"params": params[-1:]})
    with pytest.raises(RuntimeError, match=r"2 param groups, 1 when the step was captured \(an add_param_group"):
        step(imgs[0], noise[0])
    with pytest.raises(RuntimeError, match=r"2 param groups, 1 when the step was captured \(an add_param_group"):
        step.set_lr(1e-4)
    opt.param_groups.pop()
    step(imgs[0], noise[0])  # as captured again: fine
    opt.state.clear()
    with pytest.raises(RuntimeError, match="replaced after the capture"):
        step(imgs[0], noise[0])


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
    a, _ = twins()
    imgs, noise = batches(1)
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), dtype=torch.float16)
    step(imgs[0], noise[0])
    assert step.captured and seen and not any(seen), seen
    seen.clear()
    TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True), dtype=torch.float16, capture=False)(imgs[0], noise[0])
    assert seen == [True]


def test_a_tensor_lr_shared_by_the_groups_is_split_only_by_lr_scale(fake_capture):
    """torch.optim gives every group the one tensor of a tensor default lr. Groups of one lr_scale keep sharing
    it through the capture (a caller writing that tensor steers them all, as before the capture); a group of
    another lr_scale gets its own, so set_lr's scale reaches it, and each replay steps each group at its own
    lr (as an eager twin steps)."""
    a, b = twins()
    imgs, noise = batches(2)

    def groups(model):
        ps = list(model.parameters())
        return [{"params": ps[:-2]}, {"params": ps[-2:-1]}, {"params": ps[-1:], "lr_scale": 0.25}]

    lr_t = torch.tensor(1e-3)
    opt = torch.optim.AdamW(groups(a), lr=lr_t, fused=True, capturable=True)
    twin = torch.optim.AdamW(groups(b), lr=torch.tensor(1e-3), fused=True, capturable=True)  # the same arithmetic
    step, eager = TrainStep(a, opt, seed=3), TrainStep(b, twin, seed=3, capture=False)
    for s in (step, eager):  # captured with the three groups sharing lr_t (no set_lr yet)
        s(imgs[0], noise[0])
    g = opt.param_groups
    assert step.captured and g[0]["lr"] is g[1]["lr"] is lr_t and g[2]["lr"] is not lr_t
    lr_t.fill_(5e-4)  # the caller's own tensor: both groups that share it
    assert [float(x["lr"]) for x in g] == pytest.approx([5e-4, 5e-4, 1e-3])
    for s in (step, eager):
        s.set_lr(2e-3)
    assert [float(x["lr"]) for x in g] == pytest.approx([2e-3, 2e-3, 5e-4])
    assert [float(x["lr"]) for x in twin.param_groups] == pytest.approx([2e-3, 2e-3, 5e-4])
    assert_same_params(a, b)
    for s in (step, eager):
        s(imgs[1], noise[1])
    assert_same_params(a, b)


def test_every_setting_baked_into_the_graphs_is_frozen_after_the_capture(fake_capture):
    """What the graphs were captured with (the autocast dtype, the GradScaler, the model and optimizer they step,
    as well as the ratio, clipping, accumulation and seed) cannot be changed on a captured step: the replays would
    go on with the old one. Before the capture they may be set."""
    a, _ = twins()
    imgs, noise = batches(1)
    opt = torch.optim.AdamW(a.parameters(), fused=True, capturable=True)
    step = TrainStep(a, opt, seed=3)
    step.clip_grad = 1.0  # not captured yet: fine
    step(imgs[0], noise[0])
    assert step.captured
    for name, value in (("dtype", torch.float16), ("scaler", torch.amp.GradScaler("cpu")), ("model", a),
                        ("optimizer", opt), ("mask_ratio", 0.5), ("clip_grad", 2.0), ("accum_steps", 2),
                        ("seed", 7), ("mean", (0.5,) * 3), ("std", (0.2,) * 3)):
        with pytest.raises(AttributeError, match=f"{name} is baked into the captured graphs"):
            setattr(step, name, value)
    assert step.dtype == torch.float32 and step.scaler is None and step.clip_grad == 1.0


def test_the_accumulation_graphs_share_one_memory_pool(fake_capture, monkeypatch):
    """accum_steps > 1 captures two graphs (accumulate, update) replayed one after the other: the second is
    captured into the first's memory pool (else each holds its own copy of the activations' memory)."""
    real = graphs.capture_cuda_graph
    seen = []

    def capture(fn, *, pool=None, **kw):
        graph, out = real(fn, **kw)
        graph.pool = lambda g=graph: ("pool", id(g))  # a pool of its own, as a real graph's
        seen.append((graph, pool))
        return graph, out

    monkeypatch.setattr(graphs, "capture_cuda_graph", capture)
    a, _ = twins()
    opt = torch.optim.AdamW(a.parameters(), fused=True, capturable=True)
    TrainStep(a, opt, accum_steps=2).prepare(batches(1)[0][0])
    (acc, first_pool), (_, second_pool) = seen
    assert first_pool is None and second_pool == acc.pool()


def test_the_accumulation_warm_up_ends_each_cycle_with_the_update(fake_capture, monkeypatch):
    """With accumulation each warm-up step is a whole cycle whose last micro-batch updates (and zeroes the
    gradients): the warm-up leaves zero gradients behind, not a micro-batch's that the first replayed cycle would
    add to its own (with restore=False nothing else clears them)."""
    real = graphs.capture_cuda_graph
    seen = []

    def capture(fn, *, warmup_steps=3, warmup_fn=None, **kw):
        for _ in range(warmup_steps):
            (warmup_fn or fn)()
        if warmup_steps:
            seen.append([p.grad is not None and not p.grad.any() for p in a.parameters() if p.requires_grad])
        return real(fn, warmup_steps=0, **kw)

    monkeypatch.setattr(graphs, "capture_cuda_graph", capture)
    a, _ = twins()
    TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), accum_steps=3, warmup_steps=1,
              restore=False).prepare(batches(1)[0][0])
    assert len(seen) == 1 and all(seen[0]), seen


def test_a_batch_or_noise_on_another_device_is_refused_by_a_captured_step(fake_capture):
    """A captured step copies each batch into its buffers on the model's device: a batch or noise on another device
    (meta here) is refused by name before anything is copied or replayed."""
    a, _ = twins()
    imgs, noise = batches(1)
    step = TrainStep(a, torch.optim.AdamW(a.parameters(), fused=True, capturable=True), seed=3)
    step(imgs[0], noise[0])
    with pytest.raises(ValueError, match=r"imgs must match the captured batch \(3, 3, 32, 32\), torch.float32 on cpu"):
        step(imgs[0].to("meta"), noise[0])
    with pytest.raises(ValueError, match=r"noise must have shape \(3, 16\) on cpu, got \(3, 16\) on meta"):
        step(imgs[0], noise[0].to("meta"))
    assert step.calls == 1 and sum(g.replays for g in fake_capture.made) == 1  # the first call's only


@pytest.mark.parametrize("patched", [False, True])
def test_a_captured_transformers_step_refuses_a_config_ratio_changed_after_the_capture(fake_capture, patched):
    """transformers' ViTMAE takes its ratio from model.config.mask_ratio; the step checks it against its own "when
    built and per call" (TrainStep's docstring), and an eager step does (tests/test_step.py). A captured step's
    ratio is baked into the graphs (step.mask_ratio is frozen): a config changed after the capture must be refused
    by the call, not replayed at the old ratio. A real replay runs no Python: the stand-in's replays here do not
    either."""
    pytest.importorskip("transformers")
    from maefast.convert import to_transformers_model

    torch.manual_seed(0)
    hf = to_transformers_model(mb.build_model("tiny", "reference", torch.device("cpu")), mask_ratio=0.5)
    if patched:  # its forward takes mask_ratio= (and refuses another than the config's, in Python)
        import maefast

        hf = maefast.patch(hf)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    step = TrainStep(hf, torch.optim.AdamW(hf.parameters(), fused=True, capturable=True), mask_ratio=0.5, seed=3)
    step(imgs, noise)
    assert step.captured
    for g in fake_capture.made:  # replays without Python, as a CUDA graph's
        g.replay = lambda g=g: setattr(g, "replays", g.replays + 1)
    step(imgs, noise)
    hf.config.mask_ratio = 0.25
    kept = step.static_imgs.clone(), step.static_noise.clone()
    with pytest.raises(ValueError, match="takes its ratio from model.config.mask_ratio"):
        step(imgs + 1, noise / 2)
    assert torch.equal(step.static_imgs, kept[0]) and torch.equal(step.static_noise, kept[1])  # nothing copied


def test_a_param_group_added_before_the_first_call_is_captured_with_the_rest(fake_capture):
    """optimizer.add_param_group between building the step and its first call: the capture takes the new
    group too (its gradients zeroed per accumulation cycle, clipped, its warm-up updates undone); it took
    the groups the step was built with, and the new group's gradients grew cycle after cycle."""
    a, b = twins()
    imgs, _ = batches(4)
    steps = []
    for m, capture, lr in ((a, True, 1e-3), (b, False, torch.tensor(1e-3))):
        dec = [p for n, p in m.named_parameters() if n.startswith("decoder")]
        opt = torch.optim.AdamW(dec, lr=lr, betas=(0.9, 0.95), fused=True, capturable=True)
        steps.append(TrainStep(m, opt, capture=capture, seed=5, accum_steps=2, clip_grad=0.05))
        opt.add_param_group({"params": [p for n, p in m.named_parameters() if not n.startswith("decoder")]})
    for i, x in enumerate(imgs):
        torch.manual_seed(i)
        la = steps[0](x).clone()
        torch.manual_seed(i)
        assert torch.equal(la, steps[1](x)), i
    assert steps[0].captured and steps[0].optimizer_steps == 2
    assert_same_params(a, b)
