"""maefast.TrainStep's learning rates: maefast/_lrs.py's `set_group_lrs` / `own_lr_per_scale` (a tensor lr that
torch.optim gives every group), set_lr's argument, and the device lr tensors a captured step's graphs read (through
the CPU stand-in of the capture, tests/fake_capture.py). The captured step against an eager twin:
tests/test_step_capture.py; the official schedule writing the lrs: tests/test_train_recipe.py."""
from __future__ import annotations

import gc

import pytest
import torch

from maefast.step import TrainStep, set_group_lrs
from maefast.train.schedule import adjust_learning_rate
from step_twins import batches, twins

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(n):
    return [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]


def test_a_group_without_lr_scale_shares_the_tensor_with_groups_of_scale_one():
    """A group without ``lr_scale`` takes ``lr`` itself: it is a group of scale 1, so it keeps sharing the default
    tensor lr with groups of ``lr_scale=1.0`` (the caller's tensor still steers both); only the group of another
    scale gets its own copy."""
    p = _params(3)
    lr_t = torch.tensor(1.0)
    opt = torch.optim.AdamW([{"params": p[:1]}, {"params": p[1:2], "lr_scale": 1.0},
                             {"params": p[2:], "lr_scale": 0.5}], lr=lr_t)
    set_group_lrs(opt, 2e-3)
    g = opt.param_groups
    assert g[0]["lr"] is lr_t and g[1]["lr"] is lr_t and g[2]["lr"] is not lr_t
    assert [float(x["lr"]) for x in g] == pytest.approx([2e-3, 2e-3, 1e-3])
    lr_t.fill_(4e-3)  # the caller's own tensor: both groups of scale 1
    assert [float(x["lr"]) for x in g] == pytest.approx([4e-3, 4e-3, 1e-3])


def test_set_lr_refuses_a_tensor_of_many_values_or_complex_naming_lr():
    """A one-element real tensor is a number (set_lr(torch.tensor(2e-3)) is fine); a tensor of several values, or
    a complex one, is not: a TypeError naming lr, the optimizer's lrs untouched (not a raw error from float())."""
    a, _ = twins()
    opt = torch.optim.AdamW(a.parameters(), lr=1e-3)
    step = TrainStep(a, opt, capture=False)
    for bad in (torch.tensor([1e-3, 2e-3]), torch.tensor(1e-3 + 0j)):
        with pytest.raises(TypeError, match="lr must be a number, got Tensor"):
            step.set_lr(bad)
    assert opt.param_groups[0]["lr"] == 1e-3


def test_a_captured_steps_lrs_are_float32_tensors_whatever_the_callers_tensor(fake_capture):
    """The graphs read each group's lr as a float32 tensor on the model's device: a caller's float64 (or fp16) lr
    tensor is replaced by a float32 one of its value before the capture (as a float lr is), which set_lr then
    writes in place."""
    imgs, noise = batches(1)
    for dtype in (torch.float64, torch.float16):
        a, _ = twins()
        opt = torch.optim.AdamW(a.parameters(), lr=torch.tensor(1e-3, dtype=dtype), fused=True, capturable=True)
        step = TrainStep(a, opt, seed=3)
        step(imgs[0], noise[0])
        assert step.captured
        lr = opt.param_groups[0]["lr"]
        assert lr.dtype == torch.float32 and lr.device == next(a.parameters()).device
        assert float(lr) == pytest.approx(1e-3, rel=1e-3)
        step.set_lr(2e-4)
        assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(2e-4)


def _two_groups_sharing_one_lr_captured():
    """(model, optimizer, its step captured after one call, imgs, noise): two param groups sharing torch.optim's
    default tensor lr."""
    a, _ = twins()
    imgs, noise = batches(2)
    ps = list(a.parameters())
    opt = torch.optim.AdamW([{"params": ps[:-1]}, {"params": ps[-1:]}], lr=torch.tensor(1e-3), fused=True,
                            capturable=True)
    step = TrainStep(a, opt, seed=3)
    step(imgs[0], noise[0])
    return a, opt, step, imgs, noise


def test_a_captured_step_keeps_the_lr_tensors_its_graphs_read_when_an_lr_scale_changes(fake_capture):
    """Two groups share torch.optim's default tensor lr through the capture (one lr_scale); the caller then gives
    one group another lr_scale (honoured for a group of its own: tests/test_step_failures.py). set_lr must not
    replace a tensor the graphs read (that group would step on at the old lr, and every later call is refused as
    if the optimizer had been reloaded, even once the scale is set back): it refuses the new scale by name,
    writing nothing; the graphs' tensors stay the groups' and the step steps on."""
    a, opt, step, imgs, noise = _two_groups_sharing_one_lr_captured()
    read = [g["lr"] for g in opt.param_groups]
    assert step.captured and read[0] is read[1]
    opt.param_groups[0]["lr_scale"] = 0.5
    before = float(read[0])
    with pytest.raises(ValueError, match=r"param groups 0 and 1 share one lr tensor.*\(0\.5, 1\.0\)"):
        step.set_lr(1e-4)
    with pytest.raises(ValueError, match="param groups 0 and 1"):  # the schedule's writer, the same rule
        adjust_learning_rate(opt, 10.0, 1e-4, 1.0, 100.0)
    assert all(g["lr"] is t for g, t in zip(opt.param_groups, read)) and float(read[0]) == before
    opt.param_groups[0]["lr_scale"] = 1.0
    step.set_lr(1e-3)
    step(imgs[1], noise[1])
    assert step.calls == 2
    del step  # no graph reads the tensor any more: the group of another scale gets its own copy again
    fake_capture.made.clear()  # (the stand-in's record of its graphs holds them)
    gc.collect()
    opt.param_groups[0]["lr_scale"] = 0.5
    set_group_lrs(opt, 1e-3)
    assert opt.param_groups[0]["lr"] is read[0] and opt.param_groups[1]["lr"] is not read[1]
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([5e-4, 1e-3])


@pytest.mark.parametrize("second", ["fails to capture", "captured, then dropped"])
def test_a_second_step_on_the_optimizer_leaves_the_first_steps_lr_tensors_read(fake_capture, second):
    """Two steps on one optimizer (a resumed run's new step beside the old one): a second step whose capture
    fails, or that is captured and then dropped, does not lift the first step's claim on the lr tensor its
    graphs read: a split is still refused, by set_lr and by the schedule's writer, and the first step steps on."""
    a, opt, first, imgs, noise = _two_groups_sharing_one_lr_captured()
    if second == "fails to capture":
        fake_capture.fail = RuntimeError("before the capture")
    other = TrainStep(a, opt, seed=4)
    other(imgs[0], noise[0])
    assert first.captured and other.captured == (second != "fails to capture")
    fake_capture.fail = None
    if second != "fails to capture":
        del other
        fake_capture.made.clear()  # (the stand-in's record of its graphs holds them; the steps hold their own)
        gc.collect()
    read = [g["lr"] for g in opt.param_groups]
    opt.param_groups[0]["lr_scale"] = 0.5
    with pytest.raises(ValueError, match="param groups 0 and 1"):
        first.set_lr(1e-4)
    with pytest.raises(ValueError, match="param groups 0 and 1"):
        adjust_learning_rate(opt, 10.0, 1e-4, 1.0, 100.0)
    assert all(g["lr"] is t for g, t in zip(opt.param_groups, read))
    opt.param_groups[0]["lr_scale"] = 1.0
    first(imgs[1], noise[1])
    assert first.calls == 2
