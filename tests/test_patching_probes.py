"""maefast.patch's patch-time probes of official-layout forks (from tests/test_patching_parts.py): run on the
meta device and in bf16, leaving the user's hooks, the model and the process as they were; a fork's default mask
ratio kept; each output compared; a fork failing a probe refused naming the method; and parts the fast path
computes changed after patching run the original."""
import copy
import types

import pytest
import torch
import torch.nn as nn

import maefast
from official_layout import TINY, L, N, _slow_warning
from test_patching_parts import _hf, _hf_same, _pair, _same_call

pytestmark = pytest.mark.usefixtures("warn_again")


# -- patch-time probes of official-layout forks: any device, any dtype, the user's hooks aside ------------

def _first_patches(self, x, mask_ratio):  # "block masking": always keeps the first patches
    n, length, d = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_restore = torch.arange(length, device=x.device).expand(n, length)
    return x[:, :keep], (ids_restore >= keep).float(), ids_restore


def test_forks_are_probed_on_the_meta_device_and_in_bf16():
    from test_patching import _decoder_without_norm, official_class

    with torch.device("meta"):
        masking_fork = official_class(random_masking=_first_patches)(**TINY)
        decoder_fork = official_class(forward_decoder=_decoder_without_norm)(**TINY)
        plain = official_class()(**TINY)
    with pytest.raises(TypeError, match="random_masking"):
        maefast.patch(masking_fork)
    with pytest.raises(TypeError, match="does not compute the official MAE"):
        maefast.patch(decoder_fork)
    assert maefast.patch(plain)._maefast is not None and plain.pos_embed.device.type == "meta"
    torch.manual_seed(0)
    bf16_fork = official_class(forward_decoder=_decoder_without_norm)(**TINY).bfloat16()
    with pytest.raises(TypeError, match="does not compute the official MAE"):
        maefast.patch(bf16_fork)
    assert maefast.patch(official_class()(**TINY).bfloat16())._maefast is not None


def _ceil_masking(self, x, mask_ratio):  # a fork that keeps ceil(L * (1 - r)): the official count at 0.75 only
    import math

    n, length, d = x.shape
    keep = math.ceil(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(torch.rand(n, length, device=x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_masked = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
    return x_masked, (ids_restore >= keep).float(), ids_restore


def test_a_fork_whose_masking_differs_at_another_ratio_is_refused():
    """The masking probe ran at 0.75 alone, where a fork rounding len_keep up keeps the official 4 of 16: it was
    patched, and at 0.6 the fast path kept 6 patches where the fork keeps 7, silently."""
    from official_layout import official_class

    with pytest.raises(TypeError, match=r"random_masking is not the official masking \(a probe at mask_ratio 0\.6687 "):
        maefast.patch(official_class(random_masking=_ceil_masking)(**TINY))


def _forward_taking(extra: str):
    from official_layout import _o_forward

    ns = {"_o_forward": _o_forward}
    exec(f"def forward(self, imgs, {extra}):\n    return _o_forward(self, imgs, mask_ratio)", ns)
    return ns["forward"]


@pytest.mark.parametrize("extra, named", [
    ("mask_ratio=0.75, patch_weights=None", "patch_weights"),  # a positional third: the patched forward's noise
    ("mask_ratio=0.75, noise=None, *, return_latent=False", "return_latent"),  # a keyword it would not take
    ("noise=None, mask_ratio=0.75", "its arguments")])  # another order: model(imgs, 0.5) a noise there
def test_a_forks_forward_with_parameters_the_patched_one_would_not_hand_on_is_refused(extra, named):
    """A fork's forward(imgs, mask_ratio, patch_weights) called model(imgs, 0.75, w) ran the fast path with w as
    the masking noise (another loss, no warning); a keyword of its own was a TypeError only once patched."""
    from official_layout import official_class

    torch.manual_seed(0)
    fork = official_class(forward=_forward_taking(extra))(**TINY)
    with pytest.raises(TypeError, match=f"forward takes \\(imgs, .*would not hand {named} on"):
        maefast.patch(fork)
    for ok in ("mask_ratio=0.75, noise=None, *, mean=None, std=None", "mask_ratio=0.75, *args, **kwargs"):
        assert maefast.patch(official_class(forward=_forward_taking(ok))(**TINY))._maefast is not None


def test_probes_leave_the_users_hooks_alone_and_take_sequential_blocks():
    from official_layout import official_class

    torch.manual_seed(0)
    m = official_class()(**TINY)
    seen = []
    m.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    m.blocks[1].register_forward_hook(lambda mod, args, out: out + 0.1)  # changes what the model computes
    maefast.patch(m)  # not refused: the hook is the user's, the routing sends hooked calls to the original
    assert seen == [] and len(m.blocks[0]._forward_hooks) == 1 and len(m.blocks[1]._forward_hooks) == 1
    torch.manual_seed(0)
    seq = official_class()(**TINY)
    seq.blocks = nn.Sequential(*seq.blocks)
    assert maefast.patch(seq)._maefast is not None


def test_a_forks_default_mask_ratio_is_kept():
    from official_layout import _o_forward, official_class

    def forward(self, imgs, mask_ratio=0.5):
        return _o_forward(self, imgs, mask_ratio)

    torch.manual_seed(0)
    plain = official_class(forward=forward)(**TINY)
    patched = maefast.patch(copy.deepcopy(plain))
    imgs = torch.randn(N, 3, 32, 32)
    torch.manual_seed(1)
    want = plain(imgs)
    torch.manual_seed(1)
    got = patched(imgs, noise=torch.rand(N, L))
    assert want[2].sum(1).tolist() == got[2].sum(1).tolist() == [8.0] * N  # half the 16 patches masked
    assert torch.allclose(got[0], want[0], rtol=1e-5)


def test_a_forward_without_a_mask_ratio_parameter_keeps_the_official_default():
    """A forward that names no mask_ratio (a wrapper passing *args through): a call without a ratio is
    served with the official 0.75, the ratio the original's own default gives."""
    from official_layout import _o_forward, official_class

    def forward(self, imgs, *args):
        return _o_forward(self, imgs, *args)

    torch.manual_seed(0)
    plain = official_class(forward=forward)(**TINY)
    patched = maefast.patch(copy.deepcopy(plain))
    assert patched._maefast.mask_ratio == 0.75
    imgs = torch.randn(N, 3, 32, 32)
    torch.manual_seed(1)
    want = plain(imgs)
    torch.manual_seed(1)
    got = patched(imgs, noise=torch.rand(N, L))
    assert want[2].sum(1).tolist() == got[2].sum(1).tolist() == [12.0] * N
    assert torch.allclose(got[0], want[0], rtol=1e-5)


def test_parts_the_fast_path_computes_changed_after_patching_run_the_original():
    """A newer-timm block (trusted class, its forward unchanged) given a LayerScale, the patch embedding
    given a norm, a fused block's norm or activation given an instance forward, and the head given one
    for a return_pred=False call: each on every call, not only at patch time."""
    from maefast.reference.model import Block as ReferenceBlock

    class LayerScale(nn.Module):
        def forward(self, x):
            return 0.5 * x

    def timm_forward(self, x):  # timm >= 0.9's Block.forward (ls1/ls2 Identity unless init_values)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

    timm_block = type("Block", (ReferenceBlock,), {"__module__": "timm.models.vision_transformer",
                                                   "forward": timm_forward})
    plain, patched = _pair()
    for m in (plain, patched):
        for blk in m.blocks:
            blk.__class__ = timm_block
            blk.ls1, blk.ls2 = nn.Identity(), nn.Identity()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", _slow_warning())  # timm's own Block with Identities: served fast
        assert torch.allclose(patched(imgs, 0.75, noise)[0], plain(imgs, 0.75, noise)[0], rtol=1e-6)
    for m in (plain, patched):
        m.blocks[1].ls2 = LayerScale()
    _same_call(plain, patched, r"blocks\.1\.ls2")
    plain, patched = _pair()
    for m in (plain, patched):
        m.patch_embed.norm = nn.LayerNorm(TINY["embed_dim"])
        real = type(m.patch_embed).forward
        m.patch_embed.forward = types.MethodType(lambda self, x, _r=real: self.norm(_r(self, x)), m.patch_embed)
    _same_call(plain, patched, r"patch_embed\.norm")
    plain, patched = _pair(fused="block")
    for m in (plain, patched):
        n1 = m.blocks[0].norm1
        n1.forward = types.MethodType(lambda self, x: 1.5 * nn.LayerNorm.forward(self, x), n1)
    _same_call(plain, patched, r"blocks\.0\.norm1")
    plain, patched = _pair()
    for m in (plain, patched):
        head = m.decoder_pred
        head.forward = types.MethodType(lambda self, x: 1.5 * nn.Linear.forward(self, x), head)
    with pytest.warns(_slow_warning(), match="decoder_pred is an instance forward"):
        got = patched(imgs, 0.75, noise, return_pred=False)[0]
    assert torch.allclose(got, plain(imgs, 0.75, noise)[0], rtol=1e-6)


def test_transformers_attention_class_changed_after_patching_runs_the_original():
    plain, patched = _hf()
    for m in (plain, patched):
        layers = m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer
        att = layers[0].attention
        real = type(att).forward
        att.__class__ = type("ScaledAttention", (type(att),), {"forward": lambda self, *a, _r=real, **k: (
            lambda out: (out[0] * 1.5,) + tuple(out[1:]) if isinstance(out, tuple) else out * 1.5)(_r(self, *a, **k))})
    _hf_same(plain, patched, "encoder layer 0.attention runs its own forward")


def test_an_explicit_none_mask_ratio_runs_the_original():
    """mask_ratio=None given explicitly: what the unpatched official forward does with it (a TypeError), named
    in the warning. A fork's None default: tests/test_patching_edges.py."""
    from official_layout import official_class

    torch.manual_seed(0)
    official = maefast.patch(official_class()(**TINY))
    with pytest.warns(_slow_warning(), match="mask_ratio is None"), pytest.raises(TypeError):
        official(torch.randn(N, 3, 32, 32), None)


def test_probes_leave_the_model_and_the_process_as_they_were():
    """patch probes an fp32 model itself (in eval mode, TF32 off, each norm_pix_loss, from a generator state it
    replays) and a bf16 one through a cut-down copy: afterwards each module's training flag, the blocks,
    norm_pix_loss, torch's generator and the TF32 flags are the user's again."""
    from official_layout import official_class

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            m = official_class()(norm_pix_loss=False, **TINY).to(dtype)
            m.blocks[1].eval()  # a block the user holds in eval mode stays so
            blocks, modes = [*m.blocks], {n: s.training for n, s in m.named_modules()}
            state = torch.get_rng_state()
            maefast.patch(m)
            assert torch.equal(torch.get_rng_state(), state), dtype
            assert [*m.blocks] == blocks and {n: m.get_submodule(n).training for n in modes} == modes, dtype
            assert m.norm_pix_loss is False
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_the_loss_probe_tries_both_norm_pix_loss_values():
    """A fork whose loss differs only with norm_pix_loss=True (a biased variance), built with False: its own
    loss serves the calls after the user turns norm_pix_loss on."""
    from official_layout import _o_forward_loss, _official_pair, _run_official, official_class

    def biased_var_loss(self, imgs, pred, mask):
        if not self.norm_pix_loss:
            return _o_forward_loss(self, imgs, pred, mask)
        target = self.patchify(imgs)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-6) ** .5
        return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()

    plain, patched = _official_pair(official_class(forward_loss=biased_var_loss), norm_pix=False)
    assert patched._maefast.loss_via_model
    plain.norm_pix_loss = patched.norm_pix_loss = True
    imgs = torch.randn(N, 3, 32, 32)
    (l0, _, _), _ = _run_official(plain, imgs, seed=2)
    (l1, _, _), _ = _run_official(patched, imgs, seed=2)
    assert torch.allclose(l1, l0, rtol=1e-5), (l1.item(), l0.item())


def _sequential_encoder(self, x, mask_ratio):  # a fork that calls its blocks as one nn.Sequential
    x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
    x, mask, ids_restore = self.random_masking(x, mask_ratio)
    cls_token = self.cls_token + self.pos_embed[:, :1, :]
    x = self.blocks(torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1))
    return self.norm(x), mask, ids_restore


def test_probes_call_sequential_blocks_and_set_every_kind_of_hook_aside():
    from official_layout import official_class

    torch.manual_seed(0)
    m = official_class(forward_encoder=_sequential_encoder)(**TINY)
    m.blocks = nn.Sequential(*m.blocks)
    seen = []
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    m.blocks[1].register_forward_hook(lambda mod, args, kwargs, out: seen.append("kw"), with_kwargs=True)
    m.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))  # changes the computation
    assert maefast.patch(m)._maefast is not None and seen == []
    assert [len(d) for d in (m.blocks[0]._forward_pre_hooks, m.blocks[1]._forward_hooks_with_kwargs)] == [1, 1]


def _denormalised(self, imgs, loss, pred, mask):  # a norm_pix fork returning its prediction in pixels
    target = self.patchify(imgs)
    return loss, pred * (target.var(-1, keepdim=True) + 1e-6) ** .5 + target.mean(-1, keepdim=True), mask


@pytest.mark.parametrize("change", [
    lambda self, imgs, loss, pred, mask: (loss + 0.01 * self.pos_embed.pow(2).mean(), pred, mask),  # a regulariser
    _denormalised,
    lambda self, imgs, loss, pred, mask: (loss, pred.flatten(1), mask),
    lambda self, imgs, loss, pred, mask: (loss, pred, 1 - mask),  # the kept patches marked
], ids=["loss", "pred", "pred-shape", "mask"])
def test_the_forward_probe_compares_each_output(change):
    """A fork whose forward returns another loss, prediction or mask than the official one (its masking,
    loss method and blocks official) is refused, with the reason, not served the official outputs."""
    from official_layout import _o_forward, official_class

    def forward(self, imgs, mask_ratio=0.75):
        return change(self, imgs, *_o_forward(self, imgs, mask_ratio))

    torch.manual_seed(0)
    with pytest.raises(TypeError, match="does not compute the official MAE"):
        maefast.patch(official_class(forward=forward)(norm_pix_loss=True, **TINY))


def _fails(self, *args):
    raise RuntimeError("this fork needs its own data")


@pytest.mark.parametrize("method", ["random_masking", "forward"])
def test_a_fork_failing_on_a_probe_is_refused_naming_the_method(method):
    """A fork whose masking or forward raises on the probe's small input is refused, not served the official
    computation; a failing random_masking is named (the forward probe would only say the forward failed)."""
    from official_layout import official_class

    torch.manual_seed(0)
    with pytest.raises(TypeError, match=method if method == "random_masking" else "does not compute the official"):
        maefast.patch(official_class(**{method: _fails})(**TINY))
