"""`maefast.TrainStep` around a user's own module (not maefast's, not patched): a forward that returns the
loss and takes none of the MAE's arguments, an optimizer whose groups change after the step is built, a
forward whose output has no first item, a model frozen whole. Found by exploring feature combinations."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from maefast.step import TrainStep

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoHeads(nn.Module):
    """A model of one's own whose forward(imgs) returns the loss: no mask_ratio, noise or seed parameter."""

    def __init__(self, out=None):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.out = nn.Linear(12, 3), nn.Linear(12, 3), out

    def forward(self, imgs):
        x = imgs.flatten(1)
        loss = (self.a(x) * 10).pow(2).mean() + (self.b(x) * 10).pow(2).mean()
        return loss if self.out is None else self.out(loss)


class TakesRatio(TwoHeads):
    """The same with a mask_ratio parameter (which it ignores): the tests below stand apart from the one above."""

    def forward(self, imgs, mask_ratio=0.75):
        return super().forward(imgs)


def _imgs(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 2, 2, generator=g) for _ in range(n)]


def test_a_forward_without_mask_ratio_gets_none_passed():
    """The docstring's rule: a forward without the parameter gets none passed (before, a forward that named
    no mask_ratio and took no **kwargs got mask_ratio= anyway: every call a TypeError)."""
    m, twin = TwoHeads(), TwoHeads()
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), accum_steps=2)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for i, imgs in enumerate(_imgs(4)):
        torch.testing.assert_close(step(imgs), twin(imgs))
        (twin(imgs) / 2).backward()
        if i % 2:
            opt.step()
            opt.zero_grad()
    assert step.optimizer_steps == 2
    for p, q in zip(m.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_a_param_group_added_after_the_step_is_clipped_too():
    """optimizer.add_param_group after the step was built (unfreezing a part): clip_grad clips the global norm
    of every group's gradients, as clip_grad_norm_ over the model's parameters does (before, only the groups
    the step was built with: the new group's gradients went unclipped into the update)."""
    m, twin = TakesRatio(), TakesRatio()
    opt = torch.optim.SGD(m.a.parameters(), lr=0.1)
    step = TrainStep(m, opt, clip_grad=1.0)
    opt.add_param_group({"params": list(m.b.parameters())})
    topt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for imgs in _imgs(2):
        step(imgs)
        twin(imgs).backward()
        torch.nn.utils.clip_grad_norm_(list(twin.parameters()), 1.0)
        topt.step()
        topt.zero_grad()
    for p, q in zip(m.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    # a group added later that is not the model's is refused as at construction
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match=r"optimizer: its parameter 4 \(shape \(2,\)\) is not one of the model's"):
        step(_imgs(1)[0])


@pytest.mark.parametrize("out,got", [(lambda loss: {"loss": loss}, "got dict"), (lambda loss: None, "got NoneType"),
                                     (lambda loss: (), "got tuple")], ids=["dict", "none", "empty-tuple"])
def test_a_forward_without_a_first_item_is_told_what_to_return(out, got):
    """A forward returning a plain dict, None or (): the step's own message (before: KeyError: 0, TypeError
    'not subscriptable' or IndexError from reading its first item)."""
    m = TakesRatio(out)
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=f"must return the scalar loss .*{got}"):
        step(_imgs(1)[0])


def test_a_model_frozen_whole_is_told_so():
    """Every parameter requires_grad_(False): the step says the loss does not require grad and why (torch said
    'element 0 of tensors does not require grad and does not have a grad_fn'); nothing is stepped."""
    m = TakesRatio().requires_grad_(False)
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="none of its parameters requires grad \\(a model frozen whole"):
        step(_imgs(1)[0])
    assert step.optimizer_steps == step.calls == 0 and step.mask_source is None
    m.a.requires_grad_(True)  # unfrozen: it steps
    assert step(_imgs(1)[0]).dim() == 0 and step.optimizer_steps == 1


def test_a_forward_that_detaches_its_loss_is_told_so():
    """The loss needs no gradient although parameters do (a forward that detaches it): the step says so."""
    m = TakesRatio(lambda loss: loss.detach())
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="the model's loss does not require grad.*detaches its loss"):
        step(_imgs(1)[0])
    assert step.optimizer_steps == 0


def test_a_ratio_the_forward_cannot_take_is_refused():
    """A forward without mask_ratio (nor **kwargs) applies its own ratio: a step built with another is refused
    (before 2026-12-07 every call was a TypeError; since, it would silently train at the model's ratio)."""
    m = TwoHeads()
    with pytest.raises(ValueError, match="mask_ratio=0.5: the model's forward takes no mask_ratio"):
        TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), mask_ratio=0.5)
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="mask_ratio=0.5: the model's forward takes no mask_ratio"):
        step.mask_ratio = 0.5  # set on an eager step later: refused alike, not silently ignored
    assert step.mask_ratio == 0.75


def test_backward_names_a_bad_loss():
    m = TwoHeads()
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="loss must be a torch.Tensor .*got float"):
        step.backward(1.0)
    with pytest.raises(ValueError, match=r"loss must be a 0-d tensor .*shape \(2,\)"):
        step.backward(torch.ones(2, requires_grad=True))


def test_float16_set_later_needs_the_constructors_grad_scaler():
    """The constructor makes a GradScaler for float16 only: a step built in float32 and set to float16 later
    trained without loss scaling (gradients underflowing silently). Refused; bfloat16 and back are fine."""
    m = TwoHeads()
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="dtype=torch.float16 set on a step without a GradScaler"):
        step.dtype = torch.float16
    step.dtype = torch.bfloat16
    assert step.dtype == torch.bfloat16 and step.scaler is None
    half = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), dtype=torch.float16)
    half.dtype = torch.float32
    half.dtype = torch.float16
    assert half.scaler is not None
