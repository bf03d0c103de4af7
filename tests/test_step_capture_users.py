"""A captured TrainStep against what users do between its calls: lr schedules (torch's and hand-written),
optimizers whose fresh state is not zeros, parameters frozen or unfrozen and modules switched to eval after the
capture, a snapshot that fails (tests/fake_capture.py stands in for CUDA graphs on the CPU)."""
from __future__ import annotations

import pytest
import torch

from maefast.step import TrainStep
from step_twins import assert_same_params, batches, twins


def test_an_lr_set_as_a_float_after_the_capture_is_refused_saying_how_to_set_it(fake_capture):
    """A hand-written schedule (``for g in opt.param_groups: g["lr"] = lr``, as the official loop's
    adjust_learning_rate) replaces the tensor the graphs read: refused with set_lr named, not as a reloaded
    optimizer. A torch.optim.lr_scheduler writes into the tensor: its lrs reach the replays."""
    a, b = twins()
    imgs, noise = batches(3)
    opt_a = torch.optim.AdamW(a.parameters(), lr=torch.tensor(1e-3), fused=True, capturable=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=torch.tensor(1e-3), fused=True, capturable=True)
    cap, eager = TrainStep(a, opt_a, seed=5), TrainStep(b, opt_b, capture=False, seed=5)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 0.5 ** i) for o in (opt_a, opt_b)]
    for i in range(2):
        assert torch.equal(cap(imgs[i], noise[i]), eager(imgs[i], noise[i]))
        for s in sched:
            s.step()
        assert_same_params(a, b)
    assert cap.captured and float(opt_a.param_groups[0]["lr"]) == pytest.approx(2.5e-4)
    opt_a.param_groups[0]["lr"] = 1e-4
    with pytest.raises(RuntimeError, match=r"param group 0's lr was set to a float after the capture.*step.set_lr"):
        cap(imgs[2], noise[2])
    cap.set_lr(1e-4)  # as the message says: the tensor the graphs read is back, with the value
    eager.set_lr(1e-4)
    assert opt_a.param_groups[0]["lr"] is cap._graph_reads[0] and float(cap._graph_reads[0]) == pytest.approx(1e-4)
    assert torch.equal(cap(imgs[2], noise[2]), eager(imgs[2], noise[2]))
    assert_same_params(a, b)


@pytest.mark.parametrize("name", ["NAdam", "ASGD", "Rprop", "Adam"])
def test_capture_undoes_the_warm_up_back_to_an_optimizers_fresh_state(fake_capture, monkeypatch, name):
    """The state the warm-up creates is put back to its fresh values, not to zeros: NAdam's mu_product (1),
    ASGD's eta (lr) and mu (1), Rprop's step_size (lr) start elsewhere; zeroed, the captured step trained
    silently otherwise than the eager one (Rprop not at all). (torch refuses capturable=True on the CPU:
    its device check is widened for the stand-in.)"""
    import importlib

    for m in ("adam", "nadam", "asgd", "rprop"):
        monkeypatch.setattr(importlib.import_module(f"torch.optim.{m}"), "_get_capturable_supported_devices",
                            lambda supports_xla=True: ["cpu", "cuda"])
    a, b = twins()
    imgs, noise = batches(3)
    opt_a = getattr(torch.optim, name)(a.parameters(), lr=1e-3, capturable=True)
    opt_b = getattr(torch.optim, name)(b.parameters(), lr=torch.tensor(1e-3), capturable=True)
    cap = TrainStep(a, opt_a, capture=True, seed=5)
    eager = TrainStep(b, opt_b, capture=False, seed=5)
    for i in range(3):
        cap(imgs[i], noise[i])
        eager(imgs[i], noise[i])
        assert cap.captured
        assert_same_params(a, b, exact=False)
    assert all(type(s) is dict for s in opt_a.state.values())  # plain dicts again: a checkpoint pickles them


def test_a_parameter_frozen_or_a_model_left_in_eval_after_the_capture_is_refused(fake_capture):
    """A CUDA graph replays the backward and update of the parameters that required grad when it was captured,
    in the modules' modes then: freezing (or unfreezing) a parameter afterwards, or a validation pass that leaves
    the model in eval(), would be ignored by the replays (an eager step honours both). Refused by name; back as
    captured (model.train() after evaluating), the step steps on as its eager twin."""
    a, b = twins()
    imgs, noise = batches(4)
    opt_a = torch.optim.AdamW(a.parameters(), lr=torch.tensor(1e-3), fused=True, capturable=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=torch.tensor(1e-3), fused=True, capturable=True)
    cap = TrainStep(a, opt_a, capture=True, seed=5)
    eager = TrainStep(b, opt_b, capture=False, seed=5)
    cap(imgs[0], noise[0])
    eager(imgs[0], noise[0])
    a.pos_embed.requires_grad_(not a.pos_embed.requires_grad)  # (a fixed sin-cos table: unfrozen)
    with pytest.raises(RuntimeError, match=r"pos_embed was unfrozen \(requires_grad=True\) after the capture"):
        cap(imgs[1], noise[1])
    a.pos_embed.requires_grad_(not a.pos_embed.requires_grad)
    a.cls_token.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"cls_token was frozen .* after the capture: .* go on updating it"):
        cap(imgs[1], noise[1])
    a.cls_token.requires_grad_(True)
    for m in (a, b):  # a validation pass between steps
        m.eval()
        with torch.no_grad():
            m(imgs[3], mask_ratio=0.75, noise=noise[3])
    with pytest.raises(RuntimeError, match=r"the model was switched to eval mode .*call model.train\(\)"):
        cap(imgs[1], noise[1])
    a.train(), b.train()
    for i in (1, 2):
        assert torch.equal(cap(imgs[i], noise[i]), eager(imgs[i], noise[i]))
        assert_same_params(a, b)
    assert cap.calls == 3


def test_a_mode_the_model_sets_in_its_own_forward_is_not_refused(fake_capture):
    """A model that puts a part in eval() in its own forward (a frozen part): the user's model.train() before
    each epoch sets it back to train, and the next replay's forward would set it to eval again; the warm-up
    showed that the model manages that mode, so the replays do not refuse it."""
    a, _ = twins()
    real = type(a).forward

    def forward(self, *args, **kwargs):
        self.decoder_pred.eval()
        return real(self, *args, **kwargs)

    a.forward = forward.__get__(a)
    imgs, noise = batches(3)
    opt = torch.optim.AdamW(a.parameters(), lr=torch.tensor(1e-3), fused=True, capturable=True)
    cap = TrainStep(a, opt, capture=True, seed=5)
    cap(imgs[0], noise[0])
    a.train()  # an epoch's start: decoder_pred back to train
    cap(imgs[1], noise[1])
    a.eval()
    with pytest.raises(RuntimeError, match="switched to eval mode"):
        cap(imgs[2], noise[2])


def test_a_failed_snapshot_leaves_torchs_plain_optimizer_state(fake_capture, monkeypatch):
    """The warm-up's fresh-state records are installed last: a snapshot that fails (the host out of memory for
    ViT-H's copies) leaves the optimizer as it was, so a checkpoint of it loads with weights_only=True."""
    import io

    from maefast import graphs

    a, _ = twins()
    imgs, noise = batches(2)
    opt = torch.optim.AdamW(a.parameters(), lr=torch.tensor(1e-3), fused=True, capturable=True)
    real = graphs._host
    calls = []

    def failing(t):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(t)

    monkeypatch.setattr(graphs, "_host", failing)
    step = TrainStep(a, opt, seed=5)
    step(imgs[0], noise[0])
    assert not step.captured and "can't allocate memory" in step.eager_reason
    assert opt.state.default_factory is dict and all(type(v) is dict for v in opt.state.values())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_capture_undoes_an_lr_the_optimizers_own_step_moved(fake_capture):
    """An optimizer whose step moves its own learning rate in place (an adaptive-lr optimizer): the warm-up's
    steps (and the stand-in's capture, which runs the step) are undone for the lr too, so the captured step's first
    update runs at the caller's lr, as the eager step's does."""
    class HalvingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            out = super().step(closure)
            with torch.no_grad():
                for g in self.param_groups:
                    g["lr"].mul_(0.5)
            return out

    a, b = twins()
    imgs, noise = batches(2)
    opt_a, opt_b = (HalvingAdamW(m.parameters(), lr=torch.tensor(1e-3), fused=True, capturable=True) for m in (a, b))
    cap, eager = TrainStep(a, opt_a, seed=5), TrainStep(b, opt_b, capture=False, seed=5)
    for i in range(2):
        assert torch.equal(cap(imgs[i], noise[i]), eager(imgs[i], noise[i]))
        lr_a, lr_b = (float(o.param_groups[0]["lr"]) for o in (opt_a, opt_b))
        assert lr_a == lr_b == pytest.approx(1e-3 * 0.5 ** (i + 1))
        assert_same_params(a, b)
    assert cap.captured
