"""maefast.TrainStep with uint8 images and a dataset's own per-channel mean/std (`TrainStep(..., mean=, std=)`):
the same steps as normalising the images first (torchvision's ToTensor + Normalize arithmetic,
`reference.normalize`) and stepping on those, eager and captured (the CPU stand-in), for maefast's model and a
patched official-layout one. Before, the step passed no statistics: a uint8 batch of any other dataset than
ImageNet was normalised with ImageNet's, silently (or refused for a channel count other than 3)."""
from __future__ import annotations

import pytest
import torch

import maefast
from maefast.reference.normalize import normalize
from maefast.step import TrainStep
from official_layout import official_class
from step_twins import assert_same_params, twins

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.3, 0.5, 0.6), (0.2, 0.25, 0.3)


def _uint8(n, batch=2, channels=3):
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, 256, (batch, channels, 32, 32), generator=g, dtype=torch.uint8) for _ in range(n)]


def _pair(a, b, **kw):
    opt = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True, capturable=True)  # noqa: E731
    return TrainStep(a, opt(a), seed=5, mean=MEAN, std=STD, **kw), TrainStep(b, opt(b), seed=5, **kw)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_uint8_steps_equal_normalising_first(impl):
    a, b = twins(impl)
    raw, plain = _pair(a, b, capture=False)
    for i, imgs in enumerate(_uint8(3)):
        torch.manual_seed(i)  # impl="reference" draws its masks from torch's generator
        la = raw(imgs)
        torch.manual_seed(i)
        lb = plain(normalize(imgs, MEAN, STD))
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    assert_same_params(a, b, exact=False)


def test_captured_uint8_step_replays_with_the_statistics(fake_capture):
    a, b = twins()
    cap, plain = _pair(a, b, capture=True)
    batches = _uint8(4)
    cap.prepare(batches[0])
    assert cap.captured
    for imgs in batches:
        torch.testing.assert_close(cap(imgs).clone(), plain(normalize(imgs, MEAN, STD)), rtol=1e-5, atol=1e-6)
    assert_same_params(a, b, exact=False)
    with pytest.raises(AttributeError, match="mean is baked into the captured graphs"):
        cap.mean = (0.5, 0.5, 0.5)


def test_a_patched_official_model_gets_the_statistics():
    cls = official_class()
    torch.manual_seed(0)
    a = maefast.patch(cls(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                          decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True))
    torch.manual_seed(0)
    b = maefast.patch(cls(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                          decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True))
    raw, plain = _pair(a, b, capture=False)
    for imgs in _uint8(2):
        torch.testing.assert_close(raw(imgs), plain(normalize(imgs, MEAN, STD)), rtol=1e-5, atol=1e-6)
    assert_same_params(a, b, exact=False)


def test_one_channel_images_need_their_statistics():
    a, _ = twins(in_chans=1)
    opt = torch.optim.AdamW(a.parameters())
    imgs = _uint8(1, channels=1)[0]
    with pytest.raises(ValueError, match="with 1 channels need mean= and std="):
        TrainStep(a, opt, capture=False)(imgs)
    loss = TrainStep(a, opt, capture=False, seed=1, mean=(0.5,), std=(0.25,))(imgs)
    assert torch.isfinite(loss)


class _NoStats(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, imgs, mask_ratio=0.75):
        return (imgs.float().mean() * self.w).sum()


@pytest.mark.parametrize("kw, err, match", [
    (dict(mean=MEAN), ValueError, "std must be given with mean"),
    (dict(std=STD), ValueError, "mean must be given with std"),
    (dict(mean=0.5, std=0.5), TypeError, "mean must be a sequence"),
    (dict(mean=MEAN, std=(0.2, 0.0, 0.3)), ValueError, "std"),
    (dict(mean=MEAN, std=(0.2, 0.3)), ValueError, "std must have 3 values"),
    (dict(mean=(0.1, float("nan"), 0.2), std=STD), ValueError, "mean must be finite"),
])
def test_bad_statistics_are_refused_when_the_step_is_built(kw, err, match):
    a, _ = twins()
    with pytest.raises(err, match=match):
        TrainStep(a, torch.optim.AdamW(a.parameters()), capture=False, **kw)


def test_a_forward_without_mean_and_std_is_told_to_normalise_first():
    m = _NoStats()
    with pytest.raises(ValueError, match=r"_NoStats.forward takes no mean= and std=; normalise the images"):
        TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), mean=MEAN, std=STD)


def test_statistics_with_float_images_are_refused_at_the_call():
    a, _ = twins()
    step = TrainStep(a, torch.optim.AdamW(a.parameters()), capture=False, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="mean/std normalise uint8"):
        step(torch.randn(2, 3, 32, 32))


def test_a_forward_taking_kwargs_only_is_not_handed_the_statistics():
    """A forward with **kwargs but no mean/std parameters (transformers' unpatched ViTMAE) would drop them
    unread: refused as for a forward without them."""
    class Kw(_NoStats):
        def forward(self, imgs, mask_ratio=0.75, **kwargs):
            return super().forward(imgs)

    m = Kw()
    with pytest.raises(ValueError, match="Kw.forward takes no mean= and std="):
        TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), mean=MEAN, std=STD)
