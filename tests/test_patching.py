"""maefast.patch keeps every promise of the model it patches: patched vs plain model, same noise,
same outputs (or a clear error / a SlowPathWarning naming why the original forward ran).

Models: an official-layout class written like facebookresearch/mae's models_mae.py (no `noise`
argument, torch.rand in random_masking, forward_loss through self.patchify; tests/official_layout.py,
with the helpers the patch tests share), maefast's reference
class (the official layout with `noise=`), maefast's own model, and transformers' ViTMAEForPreTraining.
"""
import copy
import types

import pytest
import torch
import torch.nn as nn

import maefast
from maefast.models import MaskedAutoencoderViT
from maefast.patching import unpatch
from maefast.reference import MaskedAutoencoderViT as ReferenceMAE
from official_layout import (TINY, L, N, _assert_grads_equal, _close, _grads, _no_slow_warning, _official_pair, _run,
                             _run_official, _slow_warning, official_class)

pytestmark = pytest.mark.usefixtures("warn_again")


# == 0. same loss, prediction, mask and gradients; the same parameters ==========================

@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16], ids=str)
def test_patched_forward_is_the_official_bit_for_bit(amp):
    """maefast.patch() on the official code's layout, on the CPU's per-op reference backends: the official
    forward's loss, pred and mask bit for bit, in fp32 and under bf16/fp16 autocast (the patch embedding
    and un-shuffle round and promote as the official code does)."""
    plain, patched = _official_pair()
    imgs = torch.randn(3, 3, 32, 32)
    outs = []
    for m in (plain, patched):
        torch.manual_seed(5)  # the official draws its noise with torch.rand; the patched one is handed it
        kw = {"noise": torch.rand(3, L)} if m is patched else {}
        with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            outs.append(m(imgs, 0.75, **kw)[:3])
    for name, a, b in zip(("loss", "pred", "mask"), *outs):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("fused", [False, "block"])
def test_patch_official_layout_model_in_place(fused):
    torch.manual_seed(0)
    ref = ReferenceMAE(**TINY, norm_pix_loss=True)  # the official layout (facebookresearch keys and methods)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    l0, p0, k0, g0 = _run(ref, imgs, noise)
    params_before = [id(p) for p in ref.parameters()]
    out = maefast.patch(ref, fused=fused)
    assert out is ref and [id(p) for p in ref.parameters()] == params_before
    l1, p1, k1, g1 = _run(ref, imgs, noise)
    assert abs(l1.item() - l0.item()) <= 1e-5 * abs(l0.item()) and torch.equal(k0, k1)
    _assert_grads_equal(g1, g0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)  # the optimizer keeps working on the same tensors
    opt.step()
    unpatch(ref)
    assert "forward" not in ref.__dict__


@pytest.mark.parametrize("kind", ["official", "reference"])
def test_patch_keeps_the_state_dict(kind):
    """Patching adds and renames nothing in the state dict (a checkpoint saved patched loads into the
    plain model, strict, and back), and unpatching leaves it as it was."""
    torch.manual_seed(0)
    plain = official_class()(norm_pix_loss=True, **TINY) if kind == "official" else ReferenceMAE(**TINY)
    assert_patch_keeps_the_state_dict(plain, maefast.patch(copy.deepcopy(plain)))


def assert_patch_keeps_the_state_dict(plain, patched):
    """The same keys and values, strict loads both ways, and unpatching changes nothing."""
    before = plain.state_dict()
    sd = patched.state_dict()
    assert list(sd) == list(before) and all(torch.equal(sd[k], before[k]) for k in before)
    plain.load_state_dict(sd, strict=True)
    patched.load_state_dict(before, strict=True)
    unpatch(patched)
    assert list(patched.state_dict()) == list(before)


def test_patch_rejects_unknown_models_listing_what_is_missing():
    class NotMAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList()

    with pytest.raises(TypeError, match="missing: patch_embed.proj, pos_embed"):
        maefast.patch(NotMAE())
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        maefast.patch(object())
    with pytest.raises(ValueError, match="impl must be one of"):
        maefast.patch(ReferenceMAE(**TINY), impl="fast")


def test_patch_validates_its_arguments_before_touching_the_model():
    m = ReferenceMAE(**TINY)
    with pytest.raises(TypeError, match="grad_checkpointing"):
        maefast.patch(m, grad_checkpointing="yes")
    with pytest.raises((TypeError, ValueError), match="fused"):
        maefast.patch(m, fused="yes")
    assert "forward" not in m.__dict__ and not hasattr(m, "_maefast")


def test_unpatch_leaves_no_patch_state():
    """unpatch removes the patched forward and the PatchState (a plain model again: it pickles and patches
    as one)."""
    m = maefast.patch(official_class()(**TINY))
    assert isinstance(m._maefast, maefast.patching.PatchState)
    assert unpatch(m) is m
    assert "forward" not in m.__dict__ and "_maefast" not in m.__dict__

@pytest.mark.parametrize("where", ["blocks", "decoder_blocks"])
def test_patch_names_the_block_part_that_is_missing(where):
    """The first encoder and decoder block are checked part by part; the error names the stack."""
    m = ReferenceMAE(**TINY)
    del getattr(m, where)[0].attn.qkv  # e.g. separate q/k/v projections: not the official block
    with pytest.raises(TypeError, match=rf"does not recognise MaskedAutoencoderViT.*missing: {where}\[0\]\.attn\.qkv$"):
        maefast.patch(m)
    assert "forward" not in m.__dict__


# == 1. input gradients =========================================================================

@pytest.mark.parametrize("fused", [False, "block"])
def test_image_gradient_official_layout_equals_plain(fused):
    plain, patched = _official_pair(fused=fused)
    imgs = torch.randn(N, 3, 32, 32)
    x0 = imgs.clone().requires_grad_()
    (l0, p0, k0), g0 = _run_official(plain, x0, seed=1)
    x1 = imgs.clone().requires_grad_()
    with pytest.warns(_slow_warning(), match="imgs requires a gradient"):
        (l1, p1, k1), g1 = _run_official(patched, x1, seed=1, noise=None)  # the official draws the same noise
    assert x1.grad is not None, "the patched model silently gave no image gradient"
    torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(k1, k0) and _close(l1, l0)
    _assert_grads_equal(g1, g0)
    # once per reason: the second such call is quiet; a call without an image gradient is fast
    with _no_slow_warning():
        patched(imgs.clone().requires_grad_(), 0.75)
        with torch.no_grad():
            patched(imgs.clone().requires_grad_(), 0.75, seed=3)


def test_image_gradient_with_noise_or_seed_needs_an_original_that_takes_noise():
    """facebookresearch's forward has no `noise`: a seeded call that needs the original forward
    cannot keep its mask there, and says so."""
    _, patched = _official_pair()
    imgs = torch.randn(N, 3, 32, 32, requires_grad=True)
    with pytest.raises(TypeError, match="takes no noise"), pytest.warns(_slow_warning()):
        patched(imgs, 0.75, seed=5)


def _kwargs_forward(self, imgs, mask_ratio=0.75, **kwargs):
    """A fork's forward that hands its keywords on (noise= among them) without naming them."""
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, **kwargs)
    pred = self.forward_decoder(latent, ids_restore)
    return self.forward_loss(imgs, pred, mask), pred, mask


def test_image_gradient_with_a_seed_reaches_a_forward_taking_noise_through_kwargs():
    """A forward with **kwargs may take noise: the seeded call that needs the original forward (an image
    gradient) hands it noise= by keyword (positionally it was a raw TypeError from the fork's forward),
    and keeps the fast path's mask."""
    torch.manual_seed(0)
    fork = official_class(forward=_kwargs_forward, forward_encoder=ReferenceMAE.forward_encoder,
                          random_masking=ReferenceMAE.random_masking)
    plain = fork(norm_pix_loss=True, **TINY)
    patched = maefast.patch(copy.deepcopy(plain))
    assert patched._maefast.takes_noise
    imgs = torch.randn(N, 3, 32, 32)
    with torch.no_grad():
        fast_mask = patched(imgs, 0.75, seed=11)[2]
    x1 = imgs.clone().requires_grad_()
    with pytest.warns(_slow_warning(), match="imgs requires a gradient"):
        l1, _, k1 = patched(x1, 0.75, seed=11)
    from maefast.reference.philox import philox_noise

    l0, _, k0 = plain(imgs, 0.75, noise=philox_noise(N, L, 11))
    assert torch.equal(k1, fast_mask) and torch.equal(k1, k0) and _close(l1, l0)


def test_image_gradient_reference_layout_keeps_the_seeded_mask():
    torch.manual_seed(0)
    plain = ReferenceMAE(**TINY, norm_pix_loss=True)
    patched = maefast.patch(copy.deepcopy(plain))
    imgs = torch.randn(N, 3, 32, 32)
    with torch.no_grad():
        fast_mask = patched(imgs, 0.75, seed=11)[2]
    x1 = imgs.clone().requires_grad_()
    with pytest.warns(_slow_warning(), match="imgs requires a gradient"):
        l1, pred, k1 = patched(x1, 0.75, seed=11, return_pred=False)
    assert torch.equal(k1, fast_mask) and pred is None
    l1.backward()
    from maefast.reference.philox import philox_noise

    x0 = imgs.clone().requires_grad_()
    l0, _, k0 = plain(x0, 0.75, philox_noise(N, L, 11))
    l0.backward()
    assert torch.equal(k0, k1) and _close(l1, l0)
    torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-5, atol=1e-7)


def test_image_gradient_own_model_equals_reference_path():
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, norm_pix_loss=True, fused="block")
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    m.impl = "reference"
    x0 = imgs.clone().requires_grad_()
    m(x0, 0.75, noise)[0].backward()
    m.impl = "auto"
    x1 = imgs.clone().requires_grad_()
    with pytest.warns(_slow_warning(), match="imgs requires a gradient"):
        m(x1, 0.75, noise)[0].backward()
    torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-5, atol=1e-7)


def test_fast_forward_refuses_an_image_gradient():
    from maefast.models.fast import fast_forward, official_view

    m = MaskedAutoencoderViT(**TINY)
    imgs = torch.randn(2, 3, 32, 32, requires_grad=True)
    with pytest.raises(ValueError, match="imgs requires a gradient"):
        fast_forward(official_view(m), imgs, 0.75, torch.rand(2, L))
    with torch.no_grad():  # no gradient wanted: fine
        fast_forward(official_view(m), imgs, 0.75, torch.rand(2, L))


# == 2. overridden methods ======================================================================

@pytest.mark.parametrize("name", ["random_masking", "forward_encoder", "forward_decoder", "forward"])
def test_patch_refuses_a_subclass_overriding_what_the_fast_path_replaces(name):
    base = getattr(ReferenceMAE, name)
    sub = type("BlockMaskingMAE", (ReferenceMAE,), {name: lambda self, *a, **k: base(self, *a, **k)})
    with pytest.raises(TypeError, match=f"BlockMaskingMAE overrides {name}"):
        maefast.patch(sub(**TINY))
    off = official_class()
    osub = type("Sub", (off,), {name: lambda self, *a, **k: getattr(off, name)(self, *a, **k)})
    with pytest.raises(TypeError, match=f"overrides {name}"):
        maefast.patch(osub(**TINY))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_official_models_keep_the_fused_loss(norm_pix):
    """The probes find nothing to honour in the official code: its loss stays maefast's fused one."""
    for cls in (official_class(), ReferenceMAE):
        m = maefast.patch(cls(**TINY, norm_pix_loss=norm_pix))
        assert m._maefast.loss_via_model is False and m._maefast.takes_noise is (cls is ReferenceMAE)


def test_patch_refuses_an_instance_override():
    m = ReferenceMAE(**TINY)
    m.random_masking = types.MethodType(lambda self, x, r, noise=None: ReferenceMAE.random_masking(self, x, r), m)
    with pytest.raises(TypeError, match="overrides random_masking"):
        maefast.patch(m)


def test_patch_refuses_a_fork_whose_masking_differs():
    """A copy of models_mae.py with its own random_masking (no subclass to see): a probe finds it."""

    def first_patches(self, x, mask_ratio):  # "block masking": always keeps the first patches
        n, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        ids_restore = torch.arange(length).expand(n, length)
        mask = (ids_restore >= keep).float()
        return x[:, :keep], mask, ids_restore

    with pytest.raises(TypeError, match="random_masking"):
        maefast.patch(official_class(random_masking=first_patches)(**TINY))


def _decoder_without_norm(self, x, ids_restore):  # a fork's forward_decoder that skips decoder_norm
    x = self.decoder_embed(x)
    mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
        x = blk(x)
    return self.decoder_pred(x)[:, 1:, :]


def test_patch_refuses_a_fork_whose_forward_or_blocks_differ():
    """A copy of models_mae.py whose forward_decoder (or a Block class written in the same file) computes
    something else: a probe of the whole forward on one image finds it (it ran the official computation
    silently: loss 1.32 for the fork's 1.30)."""
    with pytest.raises(TypeError, match="does not compute the official MAE"):
        maefast.patch(official_class(forward_decoder=_decoder_without_norm)(**TINY))
    from maefast.reference.model import Block

    post_norm = type("Block", (Block,), {"forward": lambda self, x: self.norm2(
        (y := self.norm1(x + self.attn(x))) + self.mlp(y)), "__module__": __name__})
    fork = official_class()
    fork.__module__ = __name__  # the root's own file: its block classes are trusted, then probed
    m = fork(**TINY)
    m.decoder_blocks[0].__class__ = post_norm
    with pytest.raises(TypeError, match="does not compute the official MAE"):
        maefast.patch(m)
    m = fork(**TINY)
    m.blocks[1].__class__ = post_norm  # after a block of the official class: each class is probed
    with pytest.raises(TypeError, match="does not compute the official MAE"):
        maefast.patch(m)
    ok = fork(**TINY)  # the same file with the official blocks: patched
    assert maefast.patch(ok)._maefast is not None and ok.training


def test_a_subclass_in_another_file_keeps_the_block_classes_of_the_roots_file():
    """The block classes trusted are those of the official-layout class's own file (the root of the MRO),
    not the file of a user's subclass that only adds a method: its Block copy is patched and served fast."""
    from maefast.reference.model import Block

    fork = official_class()
    fork.__module__ = "my_models_mae"  # a copy of models_mae.py, with its own Block class
    block_copy = type("Block", (Block,), {"forward": Block.forward, "__module__": "my_models_mae"})
    sub = type("MyMAE", (fork,), {"__module__": "my_train_script", "describe": lambda self: "mine"})
    torch.manual_seed(0)
    plain = sub(norm_pix_loss=True, **TINY)
    for blk in (*plain.blocks, *plain.decoder_blocks):
        blk.__class__ = block_copy
    patched = maefast.patch(copy.deepcopy(plain))
    imgs = torch.randn(N, 3, 32, 32)
    (l0, _, k0), g0 = _run_official(plain, imgs, seed=3)
    with _no_slow_warning():
        (l1, _, k1), g1 = _run_official(patched, imgs, seed=3)
    assert torch.equal(k1, k0) and _close(l1, l0)
    _assert_grads_equal(g1, g0)


def test_patch_refuses_a_compiled_model_and_an_instance_forward():
    m = ReferenceMAE(**TINY)
    with pytest.raises(TypeError, match="torch.compile wrapper.*patch the model, then compile it"):
        maefast.patch(torch.compile(m))
    m.forward = types.MethodType(lambda self, *a, **k: "mine", m)
    with pytest.raises(TypeError, match="overrides forward"):
        maefast.patch(m)
    assert m(torch.randn(1, 3, 32, 32)) == "mine"  # left as it was


def test_dropout_in_a_training_block_of_an_eval_model_takes_the_slow_path():
    plain = ReferenceMAE(**TINY)
    plain.blocks[0].mlp.drop.p = 0.3
    patched = maefast.patch(copy.deepcopy(plain))
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    for x in (plain, patched):
        x.eval()
        x.blocks[0].train()
    torch.manual_seed(1)
    want = plain(imgs, 0.75, noise)[0]
    torch.manual_seed(1)
    with pytest.warns(_slow_warning(), match="Dropout"):
        got = patched(imgs, 0.75, noise)[0]
    assert torch.equal(got, want)


def test_calls_the_fast_path_cannot_take_run_the_original():
    """float64 weights and a mask ratio that keeps no patch: the original forward runs (with a warning),
    as unpatched; uint8 images with mean/std reach the patched forward as the reference class takes them."""
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    plain = ReferenceMAE(**TINY).double()
    patched = maefast.patch(copy.deepcopy(plain))
    with pytest.warns(_slow_warning(), match="float64 weights"):
        got = patched(imgs.double(), 0.75, noise)[0]
    assert torch.equal(got, plain(imgs.double(), 0.75, noise)[0])
    plain = ReferenceMAE(**TINY)
    patched = maefast.patch(copy.deepcopy(plain))
    u8 = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8)
    stats = dict(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert _close(patched(u8, 0.75, noise, **stats)[0], plain(u8, 0.75, noise, **stats)[0])


def _l1_loss(self, imgs, pred, mask):
    return (((pred - self.patchify(imgs)).abs()).mean(-1) * mask).sum() / mask.sum()


def _channel_first_patchify(self, imgs):
    p = self.patch_embed.proj.kernel_size[0]
    h = imgs.shape[2] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, h, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(imgs.shape[0], h * h, 3 * p * p)


@pytest.mark.parametrize("how", ["subclass", "fork", "patchify-subclass", "patchify-fork"])
@pytest.mark.parametrize("return_pred", [True, False])
def test_loss_overrides_run_through_the_users_method(how, return_pred):
    off = official_class()
    cls = {"subclass": lambda: type("L1MAE", (off,), {"forward_loss": _l1_loss}),
           "fork": lambda: official_class(forward_loss=_l1_loss),
           "patchify-subclass": lambda: type("P", (off,), {"patchify": _channel_first_patchify}),
           "patchify-fork": lambda: official_class(patchify=_channel_first_patchify)}[how]()
    plain, patched = _official_pair(cls, fused="block")
    imgs = torch.randn(N, 3, 32, 32)
    (l0, p0, k0), g0 = _run_official(plain, imgs, seed=2)
    with _no_slow_warning():
        (l1, p1, k1), g1 = _run_official(patched, imgs, seed=2, return_pred=return_pred)
    assert torch.equal(k1, k0) and _close(l1, l0)
    assert (p1 is None) if not return_pred else torch.allclose(p1, p0, rtol=1e-5, atol=1e-6)
    _assert_grads_equal(g1, g0)


def test_own_model_subclass_overrides():
    class MyMasking(MaskedAutoencoderViT):
        def random_masking(self, x, mask_ratio, noise=None):
            return super().random_masking(x, mask_ratio, noise)

    class MyLoss(MaskedAutoencoderViT):
        def forward_loss(self, imgs, pred, mask):
            return _l1_loss(self, imgs, pred, mask)

    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    with pytest.raises(TypeError, match="MyMasking overrides random_masking"):
        MyMasking(**TINY)(imgs, 0.75, noise)
    MyMasking(**TINY, impl="reference")(imgs, 0.75, noise)  # the official computation runs it
    with pytest.raises(TypeError, match="overrides random_masking"):
        maefast.patch(MyMasking(**TINY, impl="reference"))
    m = MyLoss(**TINY, fused="block")
    m.impl = "reference"
    l0 = m(imgs, 0.75, noise)[0]
    m.impl = "auto"
    assert _close(m(imgs, 0.75, noise, return_pred=False)[0], l0)


def test_patch_refuses_blocks_it_cannot_see_through():
    class LayerScale(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.gamma = nn.Parameter(torch.full((dim,), 0.1))

        def forward(self, x):
            return x * self.gamma

    m = ReferenceMAE(**TINY)
    m.blocks[1].ls1 = LayerScale(64)
    with pytest.raises(TypeError, match=r"blocks\.1\.ls1"):
        maefast.patch(m)

    class MyBlock(type(m.blocks[0])):
        def forward(self, x):
            return x + 0.5 * super().forward(x)

    m = ReferenceMAE(**TINY)
    m.decoder_blocks[0].__class__ = MyBlock
    with pytest.raises(TypeError, match=r"decoder_blocks\.0.*MyBlock"):
        maefast.patch(m)


def test_patch_official_layout_grad_checkpointing_is_honoured():
    """patch(grad_checkpointing=True) on an official-layout model checkpoints its blocks: far fewer tensors
    kept for the backward than the plain model keeps (the fast path without checkpointing keeps about as
    many), the same loss, mask and gradients."""
    def saved(model, imgs, **kw):
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        model.zero_grad()
        torch.manual_seed(4)  # the official draws its noise with torch.rand; the patched one is handed it
        if model.__dict__.get("forward") is not None:
            kw["noise"] = torch.rand(imgs.shape[0], L)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _, mask = model(imgs, 0.75, **kw)
        loss.backward()
        return count[0], loss.detach(), mask, _grads(model)

    plain, patched = _official_pair(grad_checkpointing=True)
    assert patched._maefast.grad_checkpointing is True
    imgs = torch.randn(N, 3, 32, 32)
    n0, l0, k0, g0 = saved(plain, imgs)
    with _no_slow_warning():
        n1, l1, k1, g1 = saved(patched, imgs)
    assert n1 < n0 / 2, (n1, n0)  # only the block inputs are kept in the forward
    assert torch.equal(k1, k0) and _close(l1, l0)
    _assert_grads_equal(g1, g0)


# == 3. pickling ================================================================================

# at module level, of this module: pickle finds the class by module and name
OfficialMAE = official_class("OfficialMAE", __module__=__name__)


def _build(kind):
    torch.manual_seed(0)
    if kind == "official":
        return OfficialMAE(norm_pix_loss=True, **TINY)
    if kind == "reference":
        return ReferenceMAE(**TINY, norm_pix_loss=True)
    if kind == "ours":
        return MaskedAutoencoderViT(**TINY, norm_pix_loss=True, impl="reference")
    pytest.importorskip("transformers")
    from maefast.convert import to_transformers_model

    return to_transformers_model(ReferenceMAE(**TINY, norm_pix_loss=True))


def _loss(model, kind, imgs, noise):
    if kind == "transformers":
        return model(pixel_values=imgs, noise=noise, seed=None).loss
    return model(imgs, 0.75, noise, seed=None)[0]


@pytest.mark.parametrize("kind", ["official", "reference", "ours", "transformers"])
def test_patched_model_round_trips_torch_save_and_deepcopy(kind, tmp_path):
    m = maefast.patch(_build(kind), fused="block")
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    l0 = _loss(m, kind, imgs, noise)
    torch.save(m, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for m2 in (loaded, copy.deepcopy(m)):
        l2 = _loss(m2, kind, imgs, noise)  # seed= is accepted: still the patched forward
        assert torch.equal(l2, l0)
        l2.backward()  # and it trains its own parameters
        assert all(p.grad is None for p in m.parameters())
        assert any(p.grad is not None for p in m2.parameters())
        m2.zero_grad()


# == 5. model.impl ==============================================================================

def test_patch_own_model_reports_what_runs():
    m = MaskedAutoencoderViT(**TINY, impl="reference")
    imgs = torch.randn(2, 3, 32, 32)
    assert maefast.patch(m, fused="block", grad_checkpointing=True) is m
    assert (m.impl, m.fused, m.grad_checkpointing) == ("auto", "block", True)
    m(imgs, seed=3)  # the fast path runs (seed= is the fast path's)
    assert "impl='auto'" in repr(m)
    maefast.patch(m, impl="reference")
    assert m.impl == "reference"
    unpatch(m)  # back to what the model said before the first patch
    assert (m.impl, m.fused, m.grad_checkpointing) == ("reference", False, False)


# == 6. LayerNorm eps ===========================================================================

def test_class_default_layer_norm_eps_is_the_official_1e_5():
    from maefast.bench import build_model
    from maefast.models import create_model, mae_vit_base_patch16

    for cls in (ReferenceMAE, MaskedAutoencoderViT):
        m = cls(**TINY)
        assert m.norm.eps == m.blocks[0].norm1.eps == m.decoder_norm.eps == 1e-5
    assert create_model("tiny").blocks[0].norm2.eps == 1e-6  # the paper's factories pass 1e-6
    with torch.device("meta"):
        assert mae_vit_base_patch16().decoder_blocks[0].norm1.eps == 1e-6
    assert build_model("tiny", device="cpu").norm.eps == 1e-6


def test_from_transformers_model_keeps_the_configs_eps():
    pytest.importorskip("transformers")
    from maefast.convert import from_transformers_model, to_transformers_model

    from maefast.models import create_model

    hf = to_transformers_model(create_model("tiny"))
    assert from_transformers_model(hf).norm.eps == 1e-6
    hf.config.layer_norm_eps = 1e-12
    assert from_transformers_model(hf).blocks[0].norm1.eps == 1e-12


@pytest.mark.parametrize("ratio", [1.5, -0.5])
def test_a_ratio_outside_the_official_interval_is_refused_before_the_original_forward(ratio):
    """A number outside [0, 1] is refused whichever forward the call would run: the official code does not
    check it (1.5: int(16 * -0.5) = -8 keeps ids_shuffle[:, :-8], 8 patches; -0.5 keeps all 16), so
    the slow path must not be its way around the check."""
    plain, patched = _official_pair()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    with pytest.raises(ValueError, match=r"mask_ratio must be in the interval \[0, 1\]"):
        patched(imgs, ratio, noise)
    plain(imgs, ratio)  # the unpatched official code runs it: the check is maefast's
