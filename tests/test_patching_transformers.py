"""maefast.patch of transformers' ViTMAEForPreTraining keeps its promises (4.x and 5.x): patched vs
plain model, same noise, same outputs, or a SlowPathWarning naming why the original forward ran.
The official layout and the shared helpers: tests/test_patching.py."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import maefast
from maefast.reference import MaskedAutoencoderViT as ReferenceMAE
from official_layout import L, N, TINY, _assert_grads_equal, _close, _grads, _no_slow_warning, _slow_warning
from test_patching import assert_patch_keeps_the_state_dict

pytestmark = pytest.mark.usefixtures("warn_again")

pytest.importorskip("transformers")


def _hf_pair(**config):
    """transformers' ViTMAEForPreTraining with our tiny weights (config overrides applied), and a patched copy."""
    pytest.importorskip("transformers")
    from maefast.convert import to_transformers_model

    torch.manual_seed(0)
    plain = to_transformers_model(ReferenceMAE(**TINY, norm_pix_loss=True), mask_ratio=0.75)
    if config:  # modules read the config when built: build another with the same weights
        cfg = copy.deepcopy(plain.config)
        for k, v in config.items():
            setattr(cfg, k, v)
        src, plain = plain, type(plain)(cfg)
        plain.load_state_dict(src.state_dict())
    patched = maefast.patch(copy.deepcopy(plain))
    return plain, patched


def _run_hf(model, imgs, noise, seed=0, **kw):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(pixel_values=imgs, noise=noise, **kw)
    loss = out[0] if isinstance(out, tuple) else out.loss
    loss.backward()
    return out, _grads(model)

@pytest.mark.parametrize("norm_pix,fused", [(False, False), (True, False), (True, "block")])
def test_patch_transformers_vitmae(norm_pix, fused):
    pytest.importorskip("transformers")
    from maefast.convert import to_transformers_model

    torch.manual_seed(0)
    hf = to_transformers_model(ReferenceMAE(**TINY, norm_pix_loss=norm_pix), mask_ratio=0.75)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    hf.zero_grad()
    o0 = hf(pixel_values=imgs, noise=noise)
    o0.loss.backward()
    g0 = _grads(hf)
    maefast.patch(hf, fused=fused)
    hf.zero_grad()
    o1 = hf(pixel_values=imgs, noise=noise)
    o1.loss.backward()
    assert abs(o1.loss.item() - o0.loss.item()) <= 1e-5 * abs(o0.loss.item())
    assert torch.equal(o1.mask, o0.mask) and torch.equal(o1.ids_restore, o0.ids_restore)
    assert torch.allclose(o1.logits, o0.logits, rtol=1e-5, atol=1e-6)
    _assert_grads_equal(_grads(hf), g0)

def test_image_gradient_transformers_equals_plain():
    plain, patched = _hf_pair()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    x0 = imgs.clone().requires_grad_()
    o0, g0 = _run_hf(plain, x0, noise)
    x1 = imgs.clone().requires_grad_()
    with pytest.warns(_slow_warning(), match="requires a gradient"):
        o1, g1 = _run_hf(patched, x1, noise)
    assert x1.grad is not None
    torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-5, atol=1e-7)
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)

def test_patch_refuses_transformers_overrides():
    plain, _ = _hf_pair()
    emb = plain.vit.embeddings
    emb.__class__ = type("MyEmbeddings", (type(emb),), {"random_masking": lambda self, s, noise=None: None})
    with pytest.raises(TypeError, match="random_masking"):
        maefast.patch(plain)
    plain, _ = _hf_pair()
    base = type(plain)

    def doubled_target(self, x, interpolate_pos_encoding=False):  # another target: the loss must change
        return 2 * base.patchify(self, x, interpolate_pos_encoding)

    plain.__class__ = type("MyMAE", (base,), {"patchify": doubled_target})
    if not hasattr(plain, "forward_loss"):  # transformers 5.x computes the loss inside forward
        with pytest.raises(TypeError, match="patchify"):
            maefast.patch(plain)
        return
    patched = maefast.patch(copy.deepcopy(plain))  # 4.x: the loss goes through forward_loss (and its patchify)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    o0, g0 = _run_hf(plain, imgs, noise)
    o1, g1 = _run_hf(patched, imgs, noise)
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)

# == transformers' forward API ===================================================================

def test_transformers_return_dict_false_is_served_fast():
    plain, patched = _hf_pair()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    t0, g0 = _run_hf(plain, imgs, noise, return_dict=False)
    with _no_slow_warning():
        t1, g1 = _run_hf(patched, imgs, noise, return_dict=False)
    assert isinstance(t1, tuple) and len(t1) == len(t0) == 4
    loss, logits, mask, ids = t1
    assert _close(loss, t0[0]) and torch.equal(mask, t0[2]) and torch.equal(ids, t0[3])
    torch.testing.assert_close(logits, t0[1], rtol=1e-5, atol=1e-6)
    _assert_grads_equal(g1, g0)
    patched.config.return_dict = False  # the config's default too
    assert isinstance(patched(pixel_values=imgs, noise=noise), tuple)


def test_transformers_return_type_follows_the_installed_versions_rule_under_torchscript():
    """config.torchscript=True: the original of 4.x before 4.56 returns a tuple (use_return_dict is False),
    4.56+'s and 5.x's the output object (no torchscript mode); the patched forward returns what the original does."""
    plain, patched = _hf_pair()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    for m in (plain, patched):
        m.config.torchscript = True
    with torch.no_grad():
        want, got = plain(pixel_values=imgs, noise=noise), patched(pixel_values=imgs, noise=noise)
    assert type(got) is type(want), (type(got), type(want))


@pytest.mark.parametrize("version,tuple_under_torchscript", [("4.55.4", True), ("4.56.0.dev0", False),
                                                              ("4.57.6", False), ("5.0.0", False)])
def test_transformers_return_type_rule_is_the_one_of_the_installed_version(monkeypatch, version,
                                                                           tuple_under_torchscript):
    """The rule by version: before 4.56 the forward's default is config.use_return_dict (False under
    torchscript); 4.56+ (can_return_tuple) and 5.x read config.return_dict alone. 4.56-4.57's fast path
    returned a tuple where their original returns the output object."""
    plain = _hf_pair()[0]
    import transformers  # after building: 5.x puts another module object in sys.modules at its first model import

    monkeypatch.setattr(transformers, "__version__", version)
    # 4.x's config property (5.x's is return_dict alone, deprecated)
    monkeypatch.setattr(type(plain.config), "use_return_dict", property(lambda c: c.return_dict and not c.torchscript))
    patched = maefast.patch(copy.deepcopy(plain))
    patched.config.torchscript = True
    with torch.no_grad():
        got = patched(pixel_values=torch.randn(N, 3, 32, 32), noise=torch.rand(N, L))
    assert isinstance(got, tuple) is tuple_under_torchscript, type(got)


@pytest.mark.parametrize("what", ["output_hidden_states", "output_attentions"])
@pytest.mark.parametrize("via", ["argument", "config"])
def test_transformers_outputs_the_fast_path_lacks_run_the_original(what, via):
    plain, patched = _hf_pair()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    kw = {what: True} if via == "argument" else {}
    for m in (plain, patched):
        if what == "output_attentions":  # SDPA gives no attention probabilities (5.x refuses the config)
            m.set_attn_implementation("eager")
        if via == "config":
            setattr(m.config, what, True)
    o0, g0 = _run_hf(plain, imgs, noise, **kw)
    with pytest.warns(_slow_warning(), match=what):
        o1, g1 = _run_hf(patched, imgs, noise, **kw)
    field = "hidden_states" if what == "output_hidden_states" else "attentions"
    got, want = getattr(o1, field), getattr(o0, field)
    assert want is not None and got is not None and len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)


def test_transformers_attention_function_of_the_users_runs_the_original(monkeypatch):
    """An attention implementation registered with transformers' AttentionInterface, named by the config
    (set_attn_implementation, here after patching) runs as the original forward calls it, with a
    SlowPathWarning naming it; the fast path's attention would silently replace it."""
    interface = pytest.importorskip("transformers.modeling_utils").__dict__.get("AttentionInterface")
    if interface is None:
        pytest.skip("this transformers has no AttentionInterface")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sharp(module, q, k, v, mask, **kw):  # a user's attention: another softmax temperature
        return sdpa_attention_forward(module, q, k, v, mask, **{**kw, "scaling": 10 * kw["scaling"]})

    monkeypatch.setitem(interface._global_mapping, "maefast_test_sharp", sharp)
    plain, patched = _hf_pair()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    eager, _ = _run_hf(plain, imgs, noise)
    for m in (plain, patched):
        m.set_attn_implementation("maefast_test_sharp")
    o0, g0 = _run_hf(plain, imgs, noise)
    assert not _close(o0.loss, eager.loss)  # the user's attention changes the result
    with pytest.warns(_slow_warning(), match="'maefast_test_sharp' is '.*sharp', not one of transformers' own plain"):
        o1, g1 = _run_hf(patched, imgs, noise)
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)
    # transformers' own function under a key of its plain attentions is served fast; under another key (a kernel
    # transformers ships for something else, registered from the hub) it is not taken for plain attention
    for key, slow in (("sdpa", False), ("maefast_test_other", True)):
        monkeypatch.setitem(interface._global_mapping, key, sdpa_attention_forward)
        for m in (plain, patched):
            m.set_attn_implementation(key)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _run_hf(patched, imgs, noise)
        assert any(issubclass(w.category, _slow_warning()) and key in str(w.message) for w in seen) == slow, key


def test_transformers_interpolate_pos_encoding_runs_the_original():
    plain, patched = _hf_pair()
    imgs, noise = torch.randn(2, 3, 48, 48), torch.rand(2, 36)
    o0, _ = _run_hf(plain, imgs, noise, interpolate_pos_encoding=True)
    with pytest.warns(_slow_warning(), match="interpolate_pos_encoding"):
        o1, _ = _run_hf(patched, imgs, noise, interpolate_pos_encoding=True)
    assert _close(o1.loss, o0.loss) and torch.equal(o1.mask, o0.mask)


def test_transformers_masks_run_the_original():
    import inspect

    plain, patched = _hf_pair()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    params = inspect.signature(type(plain).forward).parameters
    name = "attention_mask" if "attention_mask" in params else "head_mask"
    if name == "attention_mask":  # transformers 5.x: a (N, tokens) padding mask over cls + visible tokens
        value = torch.ones(N, 1 + 4, dtype=torch.long)
        value[0, -1] = 0
    else:  # 4.x: a per-head mask
        value = torch.ones(TINY["num_heads"])
        value[1] = 0
    o0, g0 = _run_hf(plain, imgs, noise, **{name: value})
    with pytest.warns(_slow_warning(), match=name):
        o1, g1 = _run_hf(patched, imgs, noise, **{name: value})
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)


@pytest.mark.parametrize("fused", [False, "block"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_transformers_hidden_dropout_in_train_is_served_fast(fused, checkpointing):
    plain, patched = _hf_pair(hidden_dropout_prob=0.25)
    maefast.patch(patched, fused=fused)
    plain.train()
    patched.train()
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # 5.x: renamed activation_checkpointing_enable
            plain.gradient_checkpointing_enable()
            patched.gradient_checkpointing_enable()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    o0, g0 = _run_hf(plain, imgs, noise, seed=7)
    with _no_slow_warning():
        o1, g1 = _run_hf(patched, imgs, noise, seed=7)
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)
    o2, _ = _run_hf(patched, imgs, noise, seed=8)  # the dropout is live: another seed, another loss
    assert not _close(o2.loss, o1.loss, rel=1e-7)
    patched.eval()
    plain.eval()
    assert _close(patched(pixel_values=imgs, noise=noise).loss, plain(pixel_values=imgs, noise=noise).loss)


def test_transformers_attention_dropout_in_train_runs_the_original():
    plain, patched = _hf_pair(attention_probs_dropout_prob=0.25)
    plain.train()
    patched.train()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    o0, g0 = _run_hf(plain, imgs, noise, seed=3)
    with pytest.warns(_slow_warning(), match="attention dropout"):
        o1, g1 = _run_hf(patched, imgs, noise, seed=3)
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)
    patched.eval()  # no dropout in eval: fast again
    with _no_slow_warning():
        patched(pixel_values=imgs, noise=noise)


def test_transformers_attention_dropout_in_eval_is_served_fast(monkeypatch):
    """A model configured with attention dropout is served fast in eval mode (no dropout there), also when
    no training call came first."""
    from maefast.models import routing

    monkeypatch.setattr(routing, "_WARNED", set())
    plain, patched = _hf_pair(attention_probs_dropout_prob=0.25)
    plain.eval()
    patched.eval()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    o0, g0 = _run_hf(plain, imgs, noise)
    with _no_slow_warning():
        o1, g1 = _run_hf(patched, imgs, noise)
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)


def test_transformers_uint8_images_on_the_slow_path_are_normalised_first():
    """uint8 pixel_values (served fast, normalised in the kernels) reach the original forward of a
    slow-path call normalised, as the fast path reads them (ImageNet's mean and std)."""
    from maefast.reference.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize

    plain, patched = _hf_pair(attention_probs_dropout_prob=0.25)
    plain.train()
    patched.train()
    u8, noise = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8), torch.rand(N, L)
    o0, g0 = _run_hf(plain, normalize(u8, IMAGENET_MEAN, IMAGENET_STD), noise, seed=3)
    with pytest.warns(_slow_warning(), match="attention dropout"):
        o1, g1 = _run_hf(patched, u8, noise, seed=3)
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)


@pytest.mark.parametrize("slow", [False, True])
def test_transformers_uint8_images_take_mean_and_std(slow):
    """mean=/std= normalise uint8 pixel_values on the fast path and before the original forward (they
    were dropped into the original's **kwargs: ImageNet's statistics were used whatever was given)."""
    plain, patched = _hf_pair()
    plain.eval()
    patched.eval()
    u8, noise = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8), torch.rand(N, L)
    mean, std = (0.25, 0.5, 0.75), (0.5, 0.25, 1.0)
    want = plain(pixel_values=(u8.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1),
                 noise=noise).loss
    kw = dict(output_hidden_states=True) if slow else {}
    with (pytest.warns(_slow_warning(), match="output_hidden_states") if slow else _no_slow_warning()):
        got = patched(pixel_values=u8, noise=noise, mean=mean, std=std, **kw).loss
    assert _close(got, want)


def test_patch_keeps_the_transformers_state_dict():
    """A patched ViTMAEForPreTraining saves the same keys (save_pretrained / load_state_dict round trips)."""
    assert_patch_keeps_the_state_dict(*_hf_pair())


def test_transformers_fast_path_takes_the_configs_mask_ratio():
    """The fast path masks with config.mask_ratio (here 0.6, not the paper's 0.75): the same mask, loss and
    gradients as the plain model."""
    plain, patched = _hf_pair(mask_ratio=0.6)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    o0, g0 = _run_hf(plain, imgs, noise)
    with _no_slow_warning():
        o1, g1 = _run_hf(patched, imgs, noise)
    assert int(o1.mask.sum()) == N * (L - int(L * (1 - 0.6)))
    assert torch.equal(o1.mask, o0.mask) and abs(o1.loss.item() - o0.loss.item()) <= 1e-5 * abs(o0.loss.item())
    _assert_grads_equal(g1, g0)


def test_transformers_mask_ratio_argument_must_match_the_config():
    _, patched = _hf_pair()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    with _no_slow_warning():
        patched(pixel_values=imgs, noise=noise, mask_ratio=0.75)  # the config's: fine
    with pytest.raises(ValueError, match=r"mask_ratio=0.5, but this model takes its ratio from model.config"):
        patched(pixel_values=imgs, noise=noise, mask_ratio=0.5)


def test_transformers_without_pixel_values_is_a_clear_error():
    _, patched = _hf_pair()  # (transformers 4.x's own message; 5.x fails on None.shape)
    with pytest.raises(ValueError, match="You have to specify pixel_values"):
        patched(noise=torch.rand(N, L))


def test_transformers_trainer_kwargs_and_unknown_kwargs():
    plain, patched = _hf_pair()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    o0, _ = _run_hf(plain, imgs, noise)
    with _no_slow_warning():  # what transformers' Trainer passes: ignored by the original's loss too
        o1, _ = _run_hf(patched, imgs, noise, num_items_in_batch=torch.tensor(12))
    assert _close(o1.loss, o0.loss)
    try:  # an argument the fast path does not know: whatever the original does with it
        o0 = plain(pixel_values=imgs, noise=noise, nope=1)
    except TypeError:
        with pytest.raises(TypeError, match="nope"):
            patched(pixel_values=imgs, noise=noise, nope=1)
    else:  # transformers 5.x forwards unknown keyword arguments to its layers, which ignore it
        with pytest.warns(_slow_warning(), match="nope"):
            o1 = patched(pixel_values=imgs, noise=noise, nope=1)
        assert _close(o1.loss, o0.loss)


@pytest.mark.cuda
def test_gpu_transformers_hidden_dropout_equals_plain():
    """On the card too, the fast path draws transformers' hidden-dropout masks in the original's order
    (SDPA with dropout_p=0 must not advance the generator for this to hold)."""
    plain, patched = _hf_pair(hidden_dropout_prob=0.25)
    plain, patched = plain.cuda().train(), patched.cuda().train()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        imgs, noise = torch.randn(N, 3, 32, 32, device="cuda"), torch.rand(N, L, device="cuda")
        o0, g0 = _run_hf(plain, imgs, noise, seed=7)
        with _no_slow_warning():
            o1, g1 = _run_hf(patched, imgs, noise, seed=7)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert _close(o1.loss, o0.loss, rel=1e-5), (o1.loss.item(), o0.loss.item())
    _assert_grads_equal(g1, g0, rel=1e-4)


def test_transformers_mask_ratio_the_fast_path_refuses_runs_the_original():
    """A config mask ratio that keeps no patch (0.95 of 16): the original forward ran it unpatched, so the
    patched model runs it too (with a warning) instead of raising."""
    plain, patched = _hf_pair(mask_ratio=0.95)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    with torch.no_grad():
        want = plain(pixel_values=imgs, noise=noise).loss
        with pytest.warns(_slow_warning(), match="mask_ratio"):
            got = patched(pixel_values=imgs, noise=noise).loss
    assert torch.equal(got, want)


def test_transformers_seed_on_the_slow_path_keeps_the_fast_paths_mask(monkeypatch):
    """seed= on a call that runs the original forward (here output_hidden_states=True) becomes the noise
    over the L patches (position_embeddings has 1 + L rows: the cls row is not a patch) that gives the
    fast path's mask, and the same loss."""
    from maefast.models import routing

    monkeypatch.setattr(routing, "_WARNED", set())
    _, patched = _hf_pair()
    imgs = torch.randn(N, 3, 32, 32)
    with torch.no_grad(), _no_slow_warning():
        fast = patched(pixel_values=imgs, seed=5)
    with torch.no_grad(), pytest.warns(_slow_warning(), match="output_hidden_states"):
        slow = patched(pixel_values=imgs, seed=5, output_hidden_states=True)
    assert slow.mask.shape == (N, L) and torch.equal(slow.mask, fast.mask)
    assert torch.equal(slow.ids_restore, fast.ids_restore) and _close(slow.loss, fast.loss)


def test_patch_refuses_a_transformers_vit_that_is_not_an_mae():
    """A transformers ViT without the MAE decoder (vit.embeddings.patch_embeddings alone) is not taken for
    ViTMAEForPreTraining: the unrecognised-model TypeError, not an AttributeError from inside patch."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    vit = ViTForImageClassification(cfg)
    assert vit.vit.embeddings.patch_embeddings is not None
    with pytest.raises(TypeError, match="does not recognise ViTForImageClassification"):
        maefast.patch(vit)
    assert "forward" not in vit.__dict__ and not hasattr(vit, "_maefast")


def test_transformers_arguments_given_positionally_run_the_original():
    """Arguments after noise given positionally (5.x: interpolate_pos_encoding, attention_mask; 4.x:
    head_mask ...) are not dropped: the call runs the original forward, which honours them."""
    import inspect

    plain, patched = _hf_pair()
    params = list(inspect.signature(type(plain).forward).parameters)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    name = "attention_mask" if "attention_mask" in params else "head_mask"
    if name == "attention_mask":  # a padding mask over cls + the 4 visible tokens
        value = torch.ones(N, 1 + 4, dtype=torch.long)
        value[0, -1] = 0
    else:  # 4.x's SDPA attention takes a head mask for an additive attention mask (no change): eager's applies it
        value = torch.ones(TINY["num_heads"])
        value[1] = 0
        for m in (plain, patched):
            m.config._attn_implementation = "eager"
    args = [None] * (params.index(name) - 3) + [value]  # after self, pixel_values, noise
    o0, _ = _run_hf(plain, imgs, noise)
    want = plain(imgs, noise, *args)
    assert not _close(want.loss, o0.loss, rel=1e-7)  # the mask changes the loss
    with pytest.warns(_slow_warning(), match="positional argument"):
        got = patched(imgs, noise, *args)
    assert _close(got.loss, want.loss) and torch.equal(got.mask, want.mask)


def test_transformers_arguments_at_their_defaults_are_served_fast():
    """interpolate_pos_encoding=False, attention_mask=None / head_mask=None and an explicit
    output_hidden_states=False / output_attentions=False (over a config that says True) change nothing
    the fast path computes: served fast, the plain model's loss and gradients."""
    plain, patched = _hf_pair()
    for m in (plain, patched):
        m.config.output_hidden_states = True
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    kw = dict(interpolate_pos_encoding=False, attention_mask=None, head_mask=None, output_hidden_states=False,
              output_attentions=False)
    o0, g0 = _run_hf(plain, imgs, noise, output_hidden_states=False)
    with _no_slow_warning():
        o1, g1 = _run_hf(patched, imgs, noise, **kw)
    assert _close(o1.loss, o0.loss) and torch.equal(o1.mask, o0.mask)
    _assert_grads_equal(g1, g0)


def test_transformers_attention_dropout_of_one_layer_runs_the_original():
    """Attention dropout set on one layer only (the others at 0) still sends a training call to the
    original forward: the fast path has no attention dropout."""
    plain, patched = _hf_pair()
    for m in (plain, patched):
        layer = (m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer)[1]
        inner = getattr(layer.attention, "attention", layer.attention)
        if not hasattr(inner, "attention_dropout") and not hasattr(inner, "dropout_prob"):
            pytest.skip("this transformers keeps the attention dropout in a Dropout module")
        setattr(inner, "attention_dropout" if hasattr(inner, "attention_dropout") else "dropout_prob", 0.25)
        m.train()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    o0, g0 = _run_hf(plain, imgs, noise, seed=3)
    with pytest.warns(_slow_warning(), match=r"attention dropout \(p=0.25\)"):
        o1, g1 = _run_hf(patched, imgs, noise, seed=3)
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)


@pytest.mark.parametrize("fused", [False, "block"])
def test_transformers_mlp_layer_wrapped_in_torch_modules(fused):
    """An MLP layer replaced by torch modules (a Sequential: the Linear, then a Tanh): with fused="block"
    the fast path would read its weights, so the call runs the original forward; unfused it is called as
    a module (served fast, the Tanh runs). Either way the plain model's loss and gradients."""
    plain, patched = _hf_pair()
    maefast.patch(patched, fused=fused)
    for m in (plain, patched):
        layer = (m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer)[0]
        parent, name = (layer.mlp, "fc1") if hasattr(layer, "mlp") else (layer.intermediate, "dense")
        setattr(parent, name, nn.Sequential(getattr(parent, name), nn.Tanh()))
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    o0, g0 = _run_hf(plain, imgs, noise)
    with (pytest.warns(_slow_warning(), match="encoder layer 0 linear 4 is not a plain Linear") if fused == "block"
          else _no_slow_warning()):
        o1, g1 = _run_hf(patched, imgs, noise)
    assert _close(o1.loss, o0.loss)
    _assert_grads_equal(g1, g0)


def test_transformers_instance_methods_after_patching():
    """An instance forward on a layer part the fast path computes (the attention) runs the original
    forward; one on a part it calls as a module (a layer norm, unfused) is served fast and runs; an instance
    patchify (5.x's forward computes its loss target with it) runs the original forward."""
    import types

    def scaled(cls):
        return lambda self, *a, **k: (lambda out: (out[0] * 1.5,) + tuple(out[1:]) if isinstance(out, tuple)
                                      else out * 1.5)(cls.forward(self, *a, **k))

    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    for what in ("attention", "layernorm_before", "patchify"):
        plain, patched = _hf_pair()
        for m in (plain, patched):
            layer = (m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer)[0]
            if what == "patchify":
                base = type(m).patchify
                m.patchify = types.MethodType(lambda self, x, *a, _b=base, **k: 2 * _b(self, x, *a, **k), m)
            else:
                part = getattr(layer, what)
                part.forward = types.MethodType(scaled(type(part)), part)
        o0, g0 = _run_hf(plain, imgs, noise)
        if what == "layernorm_before":
            with _no_slow_warning():
                o1, g1 = _run_hf(patched, imgs, noise)
        else:
            with pytest.warns(_slow_warning(), match="encoder layer 0.attention runs its own forward"
                              if what == "attention" else "patchify is set on the instance"):
                o1, g1 = _run_hf(patched, imgs, noise)
        assert _close(o1.loss, o0.loss), what
        _assert_grads_equal(g1, g0)
