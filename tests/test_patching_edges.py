"""maefast.patch at the edges earlier audits left open (a mutation audit of maefast/patching.py,
maefast/models/routing.py and maefast/models/fast.py): each newer-timm block part the fast block computes
as an Identity, a fused block's activation given its own forward, a tensor seed on the slow path, patching
twice, a fork without norm_pix_loss; for transformers a hook on the decoder embedding, where the slow-path
warning points, an instance forward on a layer the fast path calls (accepted) or on a stack it replaces
(seen on every call); a fork's numpy default ratio and a transformers 5.x subclass's forward_loss (two bugs
the audit found). Patched vs plain model, same inputs, same outputs (or the warning or error that names why)."""
import copy
import types
import warnings

import pytest
import torch
import torch.nn as nn

import maefast
from maefast.models import create_model, routing
from maefast.testing import assert_close
from official_layout import TINY, L, N, _slow_warning
from test_patching_parts import _pair, _same_call

pytestmark = pytest.mark.usefixtures("warn_again")


@pytest.mark.parametrize("where", ["attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm"])
def test_each_newer_timm_block_part_that_is_not_an_identity_is_seen(where):
    """timm >= 0.9's qk norm (qk_norm=True), attention scale norm and MLP norm: the fast block computes
    each as an Identity, so one that is a real module sends the call to the original forward, named
    (each part of BLOCK_IDENTITIES, not only ls1/ls2), and is refused at patch time."""
    parent, name = where.rsplit(".", 1)
    plain, patched = _pair()
    for m in (plain, patched):  # the reference block never calls it: the plain model's loss is unchanged
        setattr(m.blocks[1].get_submodule(parent), name, nn.LayerNorm(TINY["embed_dim"]))
    path = rf"blocks\.1\.{where.replace('.', chr(92) + '.')}"
    _same_call(plain, patched, path)
    with pytest.raises(TypeError, match=path):
        maefast.patch(copy.deepcopy(plain))


def test_a_fused_blocks_activation_given_its_own_forward_runs_the_original():
    """fused="block" computes the exact GELU inside the one op and never calls mlp.act: an instance forward
    set on it after patching sends the call to the original forward, named, with the original's loss."""
    plain, patched = _pair(fused="block")
    for m in (plain, patched):
        act = m.blocks[0].mlp.act
        act.forward = types.MethodType(lambda self, x: 1.5 * nn.GELU.forward(self, x), act)
    _same_call(plain, patched, r"blocks\.0\.mlp\.act")


class GELUActivation(nn.Module):
    """A user's activation that shares transformers' class name (not its exact GELU)."""

    def forward(self, x):
        return 3 * torch.relu(x)


def test_an_activation_named_like_transformers_gelu_is_not_computed_as_it():
    """fused="block" computes transformers' GELUActivation as the exact GELU: it recognised the class by its
    name alone, so another package's class of that name was silently computed as a GELU; now only
    transformers' own is, and this block runs unfused, calling the user's activation."""
    from maefast.models import MaskedAutoencoderViT

    plain, patched = _pair(fused="block")
    torch.manual_seed(0)
    own = MaskedAutoencoderViT(**TINY, fused="block")
    for m in (plain, patched, own):
        m.blocks[0].mlp.act = GELUActivation()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    with warnings.catch_warnings():
        warnings.simplefilter("error", _slow_warning())  # served fast, the block unfused
        got = patched(imgs, 0.75, noise)[1]
        own_got = own(imgs, 0.75, noise)[1]
    assert_close(got, plain(imgs, 0.75, noise)[1], name="patched pred")
    own.impl = "reference"
    assert_close(own_got, own(imgs, 0.75, noise)[1], name="own model pred")


def test_a_tensor_seed_on_the_slow_path_gives_the_fast_paths_mask():
    """A device seed (a one-element tensor, as a captured step passes it) on a call the original forward
    serves (a hook on a module the fast path skips) is read as that integer: the same mask and loss as the
    fast path's for seed=int."""
    torch.manual_seed(0)
    fast = create_model("tiny", impl="auto", norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        l0, _, k0 = fast(imgs, 0.75, seed=7)
    fast.blocks[0].attn.register_forward_hook(lambda mod, args, out: None)  # observes only
    with torch.no_grad(), pytest.warns(_slow_warning(), match="blocks.0.attn has hooks"):
        l1, _, k1 = fast(imgs, 0.75, seed=torch.tensor([7]))
    assert torch.equal(k1, k0)
    assert_close(l1, l0, torch.float32, name="loss")


def test_patching_an_official_model_again_replaces_its_settings():
    """patch on a model already patched starts from the model's own forward (it is not taken for a
    forward the user set on the instance, which is refused): the new impl / fused / checkpointing apply,
    and the call still computes the plain model's loss."""
    plain, patched = _pair()
    assert maefast.patch(patched, fused="block", grad_checkpointing=True) is patched
    st = patched._maefast
    assert (st.impl, st.fused, st.grad_checkpointing) == ("auto", "block", True)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    with warnings.catch_warnings():
        warnings.simplefilter("error", _slow_warning())
        got = patched(imgs, 0.75, noise)[0]
    assert_close(got, plain(imgs, 0.75, noise)[0], torch.float32, name="loss")


def test_a_fork_without_norm_pix_loss_gets_the_plain_pixel_loss():
    """A fork that dropped the norm_pix_loss option (no attribute; its forward_loss is the plain per-pixel
    MSE, the official loss with norm_pix_loss=False) is served maefast's fused loss, without the per-patch
    normalisation: the fast path reads a missing norm_pix_loss as False."""
    from official_layout import _o_init, official_class

    def init(self, **kw):
        _o_init(self, **kw)
        del self.norm_pix_loss

    def mse(self, imgs, pred, mask):
        return (((pred - self.patchify(imgs)) ** 2).mean(-1) * mask).sum() / mask.sum()

    torch.manual_seed(0)
    plain = official_class(__init__=init, forward_loss=mse)(**TINY)
    patched = maefast.patch(copy.deepcopy(plain))
    assert not hasattr(patched, "norm_pix_loss")
    imgs = torch.randn(N, 3, 32, 32)
    torch.manual_seed(1)
    want = plain(imgs)
    for return_pred in (True, False):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", _slow_warning())
            got = patched(imgs, noise=torch.rand(N, L), return_pred=return_pred)
        assert torch.equal(got[2], want[2])
        assert_close(got[0], want[0], torch.float32, name=f"loss (return_pred={return_pred})")


_UNSET = object()


@pytest.mark.parametrize("kind", ["none", "numpy", "sentinel"])
def test_a_forks_default_mask_ratio_that_is_no_number_is_the_originals_own(kind):
    """A fork whose forward's default ratio is not a Python number (None then the model's own, a numpy scalar
    read from a config, a sentinel it resolves itself): a call without a ratio runs the original forward
    without one, so its own default applies, as unpatched, also in a deep copy (a copied sentinel is another
    object). The numpy one was passed mask_ratio=None: a TypeError from inside the user's masking."""
    np = pytest.importorskip("numpy")
    from official_layout import _o_forward, official_class

    if kind == "none":  # a common fork: None, then the ratio from the model
        def forward(self, imgs, mask_ratio=None):
            return _o_forward(self, imgs, self.mask_ratio if mask_ratio is None else mask_ratio)
    elif kind == "numpy":
        def forward(self, imgs, mask_ratio=np.float32(0.5)):
            return _o_forward(self, imgs, mask_ratio)
    else:
        def forward(self, imgs, mask_ratio=_UNSET):
            return _o_forward(self, imgs, 0.5 if mask_ratio is _UNSET else mask_ratio)

    torch.manual_seed(0)
    plain = official_class(forward=forward)(**TINY)
    plain.mask_ratio = 0.5
    patched = maefast.patch(copy.deepcopy(plain))
    imgs = torch.randn(N, 3, 32, 32)
    torch.manual_seed(1)
    want = plain(imgs)
    for model in (patched, copy.deepcopy(patched)):
        routing._WARNED.clear()  # (once per reason and process)
        torch.manual_seed(1)
        with pytest.warns(_slow_warning(), match="default is not a number"):
            got = model(imgs)
        assert want[2].sum(1).tolist() == got[2].sum(1).tolist() == [8.0] * N
        assert torch.equal(got[0], want[0])


# -- transformers' ViTMAEForPreTraining ---------------------------------------------------------------

def _hf():
    from test_patching_transformers import _hf_pair

    return _hf_pair()


def test_transformers_a_hook_on_the_decoder_embedding_keeps_the_fast_path():
    """The fast path calls the decoder embedding as a module, on the 1 + kept rows the original gives it:
    a hook there, even one that changes the output, is served fast (no warning) with the original's loss,
    and runs."""
    from test_patching_parts import _hf_same

    plain, patched = _hf()
    seen = []

    def scale(mod, args, out):
        seen.append(out.shape)
        return out * 1.5

    for m in (plain, patched):
        m.decoder.decoder_embed.register_forward_hook(scale)
    _hf_same(plain, patched, None)
    assert len(seen) == 2 and seen[0] == seen[1]


def test_transformers_slow_path_takes_a_tensor_seed_inside_one_compiled_graph():
    """A seed tensor (a captured step's device seed) on the original forward's path (attention dropout in
    training) becomes its noise as a tensor, never read on the host: the model compiles as one graph
    (before, reading it was a data-dependent graph break) and draws the mask of that seed."""
    from test_patching_transformers import _hf_pair

    _, patched = _hf_pair(attention_probs_dropout_prob=0.1)
    patched.train()
    imgs = torch.randn(N, 3, 32, 32)
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings():  # said when eager (below); a traced warning is torch's to show or not
        warnings.simplefilter("ignore", _slow_warning())
        got = compiled(pixel_values=imgs, seed=torch.tensor([7]))
    with pytest.warns(_slow_warning(), match="attention dropout"):
        want = patched(pixel_values=imgs, seed=7)
    assert torch.equal(got.mask, want.mask) and torch.equal(got.ids_restore, want.ids_restore)


def test_transformers_5_subclass_forward_loss_the_original_never_calls():
    """transformers 5.x computes the loss inside ViTMAEForPreTraining.forward (4.x called forward_loss): a
    subclass that defines a forward_loss (an L1 loss here) does not change the unpatched model's loss, so
    the patched model must compute the same (the inline MSE), not the subclass's method, silently."""
    from transformers import ViTMAEForPreTraining

    if hasattr(ViTMAEForPreTraining, "forward_loss"):
        pytest.skip("transformers 4.x calls forward_loss")
    base, _ = _hf()

    class L1(ViTMAEForPreTraining):
        def forward_loss(self, pixel_values, pred, mask, interpolate_pos_encoding=False):
            return ((pred - self.patchify(pixel_values)).abs().mean(-1) * mask).sum() / mask.sum()

    plain = L1(base.config)
    plain.load_state_dict(base.state_dict())
    patched = maefast.patch(copy.deepcopy(plain))
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    want = plain(pixel_values=imgs, noise=noise).loss
    on_instance = maefast.patch(copy.deepcopy(base))  # set after patching: still never called, still fast
    on_instance.forward_loss = types.MethodType(L1.forward_loss, on_instance)
    for model in (patched, on_instance):
        with warnings.catch_warnings():
            warnings.simplefilter("error", _slow_warning())  # served fast
            got = model(pixel_values=imgs, noise=noise).loss
        assert_close(got, want, torch.float32, name="loss")


def test_transformers_forward_loss_is_honoured_where_the_librarys_forward_calls_it():
    """4.x's ViTMAEForPreTraining defines forward_loss and its forward calls it; 5.x's does not: the rule
    reads every transformers class of the MRO (a transformers mixin listed first is not the MAE class)."""
    from maefast.patching import _library_calls_forward_loss

    def lib(name, **attrs):
        return type(name, (), dict(attrs, __module__="transformers.models.x"))

    mixin, mae4, mae5 = lib("Mixin"), lib("MAE4", forward_loss=lambda self: 0), lib("MAE5")
    user = {"__module__": "user", "forward_loss": lambda self: 1}
    assert _library_calls_forward_loss(type("A", (mixin, mae4), user))
    assert _library_calls_forward_loss(type("B", (mae4,), user))
    assert not _library_calls_forward_loss(type("C", (mixin, mae5), user))


def test_a_model_shaped_like_transformers_mae_without_its_classes_is_refused_by_name():
    """A user's own module with transformers' attribute layout (config, vit.embeddings.patch_embeddings,
    decoder.decoder_layers) and no transformers class is refused with a TypeError naming what it overrides,
    not a bare StopIteration (which map() would swallow)."""
    base, _ = _hf()

    class Port(nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.vit, self.decoder = base.config, base.vit, base.decoder

        def forward(self, pixel_values, noise=None):
            return base.forward.__func__(self, pixel_values, noise)

    with pytest.raises(TypeError, match="Port overrides forward"):
        maefast.patch(Port())


def test_transformers_slow_path_warning_points_at_the_users_call():
    """The SlowPathWarning of a transformers call the original forward serves names the user's
    model(...) line (its stacklevel counts nn.Module's call wrappers), not a line inside maefast or torch."""
    _, patched = _hf()
    patched.vit.embeddings.register_forward_hook(lambda mod, args, out: None)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        patched(pixel_values=imgs, noise=noise)
    slow = [w for w in said if issubclass(w.category, _slow_warning())]
    assert len(slow) == 1 and slow[0].filename == __file__, [(w.filename, w.lineno) for w in slow]


def test_transformers_an_instance_forward_on_a_layer_the_fast_path_calls_is_patched_and_served():
    """A torch layer inside a transformers layer with a forward set on the instance before patching (a
    scaled MLP input layer): unfused, the fast path calls that layer as a module, so patch accepts the model
    (it is not a method the fast path would drop) and serves the call fast, running the user's forward."""
    from test_patching_parts import _hf_same

    plain, _ = _hf()
    layer = (plain.vit.layers if hasattr(plain.vit, "layers") else plain.vit.encoder.layer)[1]
    fc1 = layer.mlp.fc1 if hasattr(layer, "mlp") else layer.intermediate.dense
    fc1.forward = types.MethodType(lambda self, x: 1.5 * nn.Linear.forward(self, x), fc1)
    patched = maefast.patch(copy.deepcopy(plain))
    _hf_same(plain, patched, None)


@pytest.mark.parametrize("where", ["vit", "vit.embeddings", "vit.embeddings.patch_embeddings", "decoder"])
def test_transformers_a_forward_set_on_a_stack_after_patching_runs_the_original(where):
    """A forward set on the instance of the encoder, the embeddings, the patch embedding or the decoder after
    patching (the fast path replaces each): every call sees it and runs the original forward, which calls
    it, named in the warning."""
    from test_patching_parts import _hf_same

    plain, patched = _hf()
    seen = []
    for m in (plain, patched):
        obj = m.get_submodule(where)
        real = type(obj).forward
        obj.forward = types.MethodType(lambda self, *a, _r=real, **k: seen.append(1) or _r(self, *a, **k), obj)
    _hf_same(plain, patched, rf"^.*: {where.replace('.', chr(92) + '.')}\.forward is set on the instance")
    assert len(seen) == 2


@pytest.mark.parametrize("where,name", [("vit", "forward"), ("vit.embeddings", "forward"),
                                        ("vit.embeddings", "random_masking"),
                                        ("vit.embeddings.patch_embeddings", "forward"), ("decoder", "forward")])
def test_transformers_a_stack_of_a_users_class_after_patching_runs_the_original(where, name):
    """The same parts turned into instances of a user's subclass after patching (its own forward or masking,
    as a module replaced by one of the user's): every call sees the class and runs the original forward,
    which calls the method. The per-call check read instance attributes only: the fast path dropped it."""
    from test_patching_parts import _hf_same

    plain, patched = _hf()
    seen = []
    for m in (plain, patched):
        obj = m.get_submodule(where)

        def method(self, *a, _real=getattr(type(obj), name), **k):
            seen.append(1)
            return _real(self, *a, **k)

        obj.__class__ = type(f"My{type(obj).__name__}", (type(obj),), {name: method})
    _hf_same(plain, patched, rf"^.*: {where.replace('.', chr(92) + '.')}\.{name} is .*\.My\w+\.{name} ")
    assert len(seen) == 2


def test_transformers_images_are_checked_against_the_size_the_model_was_built_with():
    """transformers' original checks images against its patch embedding's image_size (the config's when
    built); a config.image_size set afterwards changes nothing there. The fast path read the config: it
    refused the model's own 32x32 images ("imgs must be 64x64") and let 64x64 ones through to an op's error."""
    from test_patching_parts import _hf_same

    plain, patched = _hf()
    for m in (plain, patched):
        m.config.image_size = 64
    _hf_same(plain, patched, None)
    with pytest.raises(ValueError, match="imgs must be 32x32"):
        patched(pixel_values=torch.randn(N, 3, 64, 64), noise=torch.rand(N, L))


def test_transformers_heads_are_the_ones_the_layers_split_by():
    """Each layer splits q/k/v by the head size it was built with; a config's head counts set afterwards
    change nothing there. The fast path took the counts from the config: another attention, silently."""
    from test_patching_parts import _hf_same

    plain, patched = _hf()
    for m in (plain, patched):
        m.config.num_attention_heads, m.config.decoder_num_attention_heads = 1, 1
        enc, dec = (m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer), m.decoder.decoder_layers
        with torch.no_grad():
            # sharper attention, where the split shows (the config's split is ~1 off in the logits); q and k x10
            # made float32 rounding reach 2e-4 on some draws (transformers 4.57's), past _hf_same's 1e-5
            for layer in (*enc, *dec):
                for lin in maefast.patching._hf_linears(layer)[:2]:
                    lin.weight.mul_(3)
    _hf_same(plain, patched, None)


@pytest.mark.parametrize("which", ["q", "k"])
def test_transformers_q_or_k_projection_without_a_bias(which):
    """A layer whose q (or k) projection has no bias while the others have one: the packed qkv bias has zeros
    there. The fast path took q's bias for all three (k's and v's dropped, silently) or raised a bare
    TypeError from torch.cat."""
    from test_patching_parts import _hf_same

    plain, _ = _hf()
    enc = plain.vit.layers if hasattr(plain.vit, "layers") else plain.vit.encoder.layer
    for layer in (enc[0], plain.decoder.decoder_layers[0]):
        lin = maefast.patching._hf_linears(layer)[0 if which == "q" else 1]
        lin.bias = None
        with torch.no_grad():  # biases that matter (they start at zero)
            for other in maefast.patching._hf_linears(layer)[:3]:
                if other.bias is not None:
                    other.bias.normal_()
    patched = maefast.patch(copy.deepcopy(plain))
    grads = _hf_same(plain, patched, None)
    for n, p in plain.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


def test_transformers_patched_forward_pickled_by_an_older_version_still_runs():
    """A patched model saved by a maefast whose transformers forward held only the model (no output class or
    version resolved at patch time) loads and runs its fast path."""
    import pickle

    from maefast.patching import _TransformersForward

    plain, patched = _hf()
    old = pickle.loads(pickle.dumps(patched))
    fwd = old.__dict__["forward"]
    for name in ("output_cls", "return_dict_only"):
        del fwd.__dict__[name]
    old = pickle.loads(pickle.dumps(old))
    assert isinstance(old.forward, _TransformersForward) and old.forward.output_cls is type(patched.forward(
        pixel_values=torch.randn(N, 3, 32, 32), noise=torch.rand(N, L)))
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    with warnings.catch_warnings():
        warnings.simplefilter("error", _slow_warning())
        got = old(pixel_values=imgs, noise=noise).loss
    assert_close(got, plain(pixel_values=imgs, noise=noise).loss, torch.float32, name="loss")


class _DDPLike(nn.Module):
    """DDP as maefast sees it: the model under .module, a no_sync()."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def no_sync(self):
        raise AssertionError("not called")

    def forward(self, *a, **kw):
        return self.module(*a, **kw)


@pytest.mark.parametrize("wrap", ["ddp", "data-parallel", "fully-shard"])
def test_a_distributed_wrapper_is_refused_saying_to_patch_first(wrap):
    """maefast.patch(DDP(model)) said it did not recognise DistributedDataParallel, "missing" every part of
    the model inside it, and a model whose blocks fully_shard had sharded failed the loss probe on DTensors
    as "does not compute the official MAE": each now says to patch before wrapping or sharding, and leaves
    the model as it was."""
    plain, _ = _pair()
    if wrap == "fully-shard":  # fully_shard swaps a module's class for a subclass of FSDPModule
        fsdp = pytest.importorskip("torch.distributed.fsdp")
        model = plain
        blk = model.blocks[0]
        blk.__class__ = type("FSDPBlock", (fsdp.FSDPModule, type(blk)), {})
    else:
        model = _DDPLike(plain) if wrap == "ddp" else nn.DataParallel(plain)
    with pytest.raises(TypeError, match="patch the model before wrapping or sharding it") as e:
        maefast.patch(model)
    assert "missing" not in str(e.value) and "forward" not in plain.__dict__ and "_maefast" not in plain.__dict__


@pytest.mark.parametrize("img_size", ["absent", None])
def test_a_patch_embedding_without_an_image_size_is_refused_by_name(img_size):
    """A fork's own patch embedding without img_size (or timm's img_size=None) gives the fast path no image
    size to check the images against and probe with: a TypeError naming it, not a bare 'NoneType' error."""
    from official_layout import official_class

    m = official_class()(**TINY)
    if img_size == "absent":
        del m.patch_embed.img_size
    else:
        m.patch_embed.img_size = None
    with pytest.raises(TypeError, match=r"does not recognise MaskedAutoencoderViT.*missing: patch_embed\.img_size$"):
        maefast.patch(m)
    assert "forward" not in m.__dict__


class _QVBiasAttention(nn.Module):
    """A fork's attention written in its models_mae.py (its module is the model's, so its class is trusted as
    a copy of the official one) with BEiT's separate q and v biases beside a bias-free qkv."""

    def __init__(self, attn):
        super().__init__()
        self.num_heads, self.scale, self.qkv, self.proj = attn.num_heads, attn.scale, attn.qkv, attn.proj
        self.qkv.bias = None
        dim = attn.proj.in_features
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))

    def forward(self, x):
        n, length, dim = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        q, k, v = nn.functional.linear(x, self.qkv.weight, bias).reshape(
            n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(n, length, dim))


def test_a_forks_attention_with_parameters_the_fast_block_never_reads():
    """A block part of the model's own module (trusted) holding parameters the fast block never reads (BEiT-style
    q_bias / v_bias): the fast path dropped them without a word. Refused at patch time, naming the parameter;
    swapped in after patching, every call runs the original forward."""
    plain, patched = _pair()
    _QVBiasAttention.__module__ = type(plain).__module__  # written in the model's file
    torch.manual_seed(1)
    for m in (plain, patched):
        m.blocks[1].attn = _QVBiasAttention(m.blocks[1].attn)
        with torch.no_grad():
            m.blocks[1].attn.q_bias.copy_(plain.blocks[1].attn.q_bias)
            m.blocks[1].attn.v_bias.copy_(plain.blocks[1].attn.v_bias)
    said = r"blocks\.1\.attn runs a forward with its own 'q_bias' \(a parameter or buffer the fast block never reads\)"
    _same_call(plain, patched, said)
    with pytest.raises(TypeError, match=r"maefast\.patch: " + said):
        maefast.patch(copy.deepcopy(plain))


def test_a_patch_embedding_holding_state_the_fast_path_never_reads_is_seen():
    """A parameter or buffer added to the patch embedding after patching (a fork's learned scale, say) is one the
    fast patch embedding never reads: every call runs the original forward, naming it."""
    plain, patched = _pair()
    for m in (plain, patched):
        m.patch_embed.register_buffer("scale", torch.ones(1))
    _same_call(plain, patched, r"patch_embed runs a forward with its own 'scale' \(a parameter or buffer the fast path "
                               r"never reads\)")
