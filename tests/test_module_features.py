"""torch.nn.Module features meeting the fast path (maefast's own model, a patched official-layout model, a
patched transformers ViTMAE): the fast path reads parameters through views instead of calling every
submodule, so each feature must give the official result (or run the original forward), never a
silently different one. Hooks, dropout and replaced parts: tests/test_patching*.py."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import maefast
from maefast.models import mae_vit_tiny_test
from official_layout import L, N, _assert_grads_equal, _grads, _official_pair, _run_official

pytestmark = pytest.mark.usefixtures("warn_again")


class RowMixingHead(nn.Module):
    """A prediction head of one's own that mixes an image's rows (each row less the mean over the rows,
    the cls row included): the official code calls it on every row and drops the cls row after."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        y = self.linear(x)
        return y - y.mean(dim=1, keepdim=True)


def _own_pair(fused=False, impl="auto"):
    torch.manual_seed(0)
    ref = mae_vit_tiny_test(impl="reference")
    fast = copy.deepcopy(ref)
    maefast.patch(fast, impl, fused=fused)
    return ref, fast


def _run_own(model, imgs, noise, **kw):
    model.zero_grad()
    loss, pred, _ = model(imgs, 0.75, noise, **kw)
    loss.backward()
    return loss.detach(), pred, _grads(model)


@pytest.mark.parametrize("impl,fused", [("auto", False), ("auto", "block"), ("triton", False)])
def test_own_model_head_that_mixes_rows_is_called_on_every_row(impl, fused):
    """A head that is not a plain Linear gets the decoder's every row, as the official forward gives it
    (before: the patch rows alone, a silently different loss, prediction and gradients); the loss then
    reads a prediction that is a slice of the head's output."""
    if impl == "triton":
        pytest.importorskip("triton")
    ref, fast = _own_pair(fused, impl)
    for m in (ref, fast):
        m.decoder_pred = RowMixingHead(m.decoder_pred)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    loss0, pred0, g0 = _run_own(ref, imgs, noise)
    with warnings.catch_warnings():
        warnings.simplefilter("error", maefast.patching.SlowPathWarning)  # served by the fast path
        loss1, pred1, g1 = _run_own(fast, imgs, noise)
    torch.testing.assert_close(loss1, loss0)
    torch.testing.assert_close(pred1, pred0)
    _assert_grads_equal(g1, g0)


@pytest.mark.parametrize("when", ["before", "after"])
def test_patched_official_head_that_mixes_rows_is_called_on_every_row(when):
    """The same head in an official-layout model, set before patching (the patch-time probe refused the
    model: its forward differed from the fast path's) or after."""
    plain, patched = _official_pair()
    if when == "before":
        plain.decoder_pred = RowMixingHead(plain.decoder_pred)
        patched = maefast.patch(copy.deepcopy(plain))
    else:
        for m in (plain, patched):
            m.decoder_pred = RowMixingHead(m.decoder_pred)
    imgs = torch.randn(N, 3, 32, 32)
    (loss0, pred0, _), g0 = _run_official(plain, imgs, 0)
    (loss1, pred1, _), g1 = _run_official(patched, imgs, 0)
    torch.testing.assert_close(loss1, loss0)
    torch.testing.assert_close(pred1, pred0)
    _assert_grads_equal(g1, g0)


def test_patched_transformers_head_that_mixes_rows_is_called_on_every_row():
    pytest.importorskip("transformers")
    from test_patching_transformers import _hf_pair, _run_hf

    plain, patched = _hf_pair()
    for m in (plain, patched):
        m.decoder.decoder_pred = RowMixingHead(m.decoder.decoder_pred)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    out0, g0 = _run_hf(plain, imgs, noise)
    out1, g1 = _run_hf(patched, imgs, noise)
    torch.testing.assert_close(out1.loss, out0.loss)
    torch.testing.assert_close(out1.logits, out0.logits)
    _assert_grads_equal(g1, g0)


class Scale(nn.Module):
    def forward(self, w):
        return w * 1.25


@pytest.mark.parametrize("fused", [False, "block"])
def test_own_model_reads_parametrized_weights(fused):
    """A parametrization (weight norm, one's own) on a layer whose weights the fast path reads (qkv, the patch
    projection, the head of a return_pred=False call, with fused='block' every block layer) or on the model's
    own tensors: the fast path reads the parametrized tensors, and their gradients reach the originals."""
    from torch.nn.utils.parametrizations import weight_norm

    ref, fast = _own_pair(fused)
    for m in (ref, fast):
        weight_norm(m.blocks[0].attn.qkv)
        weight_norm(m.patch_embed.proj)
        weight_norm(m.decoder_pred)
        parametrize.register_parametrization(m.blocks[1].mlp.fc1, "weight", Scale())
        parametrize.register_parametrization(m.blocks[1].norm1, "bias", Scale())
        parametrize.register_parametrization(m, "mask_token", Scale())
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    loss0, _, g0 = _run_own(ref, imgs, noise)
    with warnings.catch_warnings():
        warnings.simplefilter("error", maefast.patching.SlowPathWarning)
        loss1, _, g1 = _run_own(fast, imgs, noise, return_pred=False)
    torch.testing.assert_close(loss1, loss0)
    _assert_grads_equal(g1, g0)


@pytest.mark.parametrize("fused,when", [(False, "after"), ("block", "after"), (False, "before")])
def test_patched_transformers_reads_parametrized_weights_on_the_fast_path(fused, when):
    """One's own parametrization on a q projection (whose weight the fast path reads) is computed where the
    weight is read: patching takes the model and the call stays on the fast path (before: a model parametrized
    before patching was refused with a TypeError, one parametrized after ran the original forward, with a
    warning saying the parametrization "runs its own forward, which the fast path would replace")."""
    pytest.importorskip("transformers")
    from test_patching_transformers import _hf_pair, _run_hf

    from maefast.patching import _hf_layers

    def parametrized(m):
        att = _hf_layers(m)[0][0].attention
        q = att.q_proj if hasattr(att, "q_proj") else att.attention.query
        parametrize.register_parametrization(q, "weight", Scale())
        return m

    plain, patched = _hf_pair()
    if when == "before":
        maefast.patching.unpatch(patched)
        patched = maefast.patch(parametrized(patched), fused=fused)
    else:
        patched = parametrized(maefast.patch(patched, fused=fused))
    parametrized(plain)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    out0, g0 = _run_hf(plain, imgs, noise)
    with warnings.catch_warnings():
        warnings.simplefilter("error", maefast.patching.SlowPathWarning)
        out1, g1 = _run_hf(patched, imgs, noise)
    torch.testing.assert_close(out1.loss, out0.loss)
    _assert_grads_equal(g1, g0)


# patch projections that are not one embedding per non-overlapping kernel-sized patch (16 patches of 32x32 images)
_OTHER_CONVS = {"stride": dict(kernel_size=4, stride=8), "dilation": dict(kernel_size=2, stride=8, dilation=4)}


@pytest.mark.parametrize("conv", sorted(_OTHER_CONVS))
def test_own_model_patch_projection_of_other_geometry_runs_the_original(conv):
    """A patch Conv2d whose stride is not its kernel (or with dilation, padding, groups) computes something
    else than the fast patch embedding, which read its kernel size as the patch size: the call runs the
    original forward (before: a ValueError about pos_embed's shape, for a model the official code runs)."""
    ref, fast = _own_pair()
    torch.manual_seed(1)
    ref.patch_embed.proj = nn.Conv2d(3, 64, **_OTHER_CONVS[conv])
    fast.patch_embed.proj = copy.deepcopy(ref.patch_embed.proj)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    loss0, pred0, g0 = _run_own(ref, imgs, noise)
    with pytest.warns(maefast.patching.SlowPathWarning, match="patch_embed.proj runs a Conv2d with kernel_size"):
        loss1, pred1, g1 = _run_own(fast, imgs, noise)
    torch.testing.assert_close(loss1, loss0)
    torch.testing.assert_close(pred1, pred0)
    _assert_grads_equal(g1, g0)


def test_own_model_overlapping_patch_projection_fails_as_the_official_does():
    """Overlapping patches (stride 4, padding 2: 64 of them for 16 positions): the official forward raises;
    before, the fast path returned a loss, reading the 8x8 kernel as 16 non-overlapping patches."""
    ref, fast = _own_pair()
    for m in (ref, fast):
        m.patch_embed.proj = nn.Conv2d(3, 64, kernel_size=8, stride=4, padding=2)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    for m in (ref, fast):
        with pytest.raises(RuntimeError, match="must match the size"), warnings.catch_warnings():
            warnings.simplefilter("ignore", maefast.patching.SlowPathWarning)
            m(imgs, 0.75, noise)


def test_patched_official_patch_projection_of_other_geometry_is_refused():
    from official_layout import TINY, official_class

    torch.manual_seed(0)
    model = official_class()(norm_pix_loss=True, **TINY)
    model.patch_embed.proj = nn.Conv2d(3, TINY["embed_dim"], kernel_size=4, stride=8)
    with pytest.raises(TypeError, match=r"patch_embed.proj runs a Conv2d with kernel_size=\(4, 4\), stride=\(8, 8\)"):
        maefast.patch(model)


def test_patched_transformers_patch_projection_of_other_geometry_runs_the_original():
    pytest.importorskip("transformers")
    from test_patching_transformers import _hf_pair, _run_hf

    plain, patched = _hf_pair()
    torch.manual_seed(1)
    plain.vit.embeddings.patch_embeddings.projection = nn.Conv2d(3, 64, kernel_size=4, stride=8)
    patched.vit.embeddings.patch_embeddings.projection = copy.deepcopy(plain.vit.embeddings.patch_embeddings.projection)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    out0, g0 = _run_hf(plain, imgs, noise)
    with pytest.warns(maefast.patching.SlowPathWarning, match="projection is a Conv2d with kernel_size"):
        out1, g1 = _run_hf(patched, imgs, noise)
    torch.testing.assert_close(out1.loss, out0.loss)
    _assert_grads_equal(g1, g0)
