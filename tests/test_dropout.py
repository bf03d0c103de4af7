"""Attention dropout and drop path (stochastic depth) do what timm / the official MAE do, on every route
that takes them: maefast.nn.drop_path, maefast.nn.Attention (SDPA with dropout_p), maefast.nn.Block
(op by op and fused=True), and a patched official-layout model whose timm-0.3.2-style blocks carry
their own Dropout / DropPath modules (those calls must run the model's own forward).

Semantics pinned here, in training mode with p > 0:
- drop path: each sample of a residual branch is either dropped whole (the sample equals its skip
  path) or kept and scaled by 1/(1-p); drops are Bernoulli(p) per sample and branch;
- attention dropout: the attention probabilities are dropped with p and rescaled by 1/(1-p), so a
  fixed-seed run equals softmax -> F.dropout -> @ v drawn from the same generator state, and the mean
  over many draws is the no-dropout output.
In eval mode (and with p = 0) both are the identity: eval output equals the p = 0 module's, bit for bit.
Everything runs on the CPU with impl="reference" (dropout never reaches maefast's kernels).
"""
from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import maefast
from maefast.models import MaskedAutoencoderViT, routing
from maefast.nn.attention import Attention, Block, drop_path
from maefast.reference import MaskedAutoencoderViT as ReferenceMAE
from maefast.reference.model import Attention as ReferenceAttention
from maefast.reference.model import Mlp
from maefast.testing import TOLERANCES, assert_close, randn
from official_layout import N, _slow_warning
from test_patching_parts import _hf, _pair, _same_call

pytestmark = pytest.mark.usefixtures("one_thread", "warn_again")

LN = functools.partial(nn.LayerNorm, eps=1e-6)
TOL = TOLERANCES[torch.float32]


def _binomial_ok(k: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """k drops out of n Bernoulli(p) trials, within `sigmas` standard deviations (loose: a fixed seed)."""
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def _which(y: torch.Tensor, candidates: list[torch.Tensor], name: str) -> torch.Tensor:
    """For each sample y[i], the index of the one candidate (each (N, ...)) it equals within the fp32
    tolerance; fails naming the samples that match none (or several)."""
    hits = torch.stack([torch.isclose(y, c, atol=TOL["atol"], rtol=TOL["rtol"]).flatten(1).all(1)
                        for c in candidates], 1)  # (N, len(candidates))
    bad = (hits.sum(1) != 1).nonzero().flatten().tolist()
    assert not bad, (f"{name}: samples {bad[:8]} (of {len(bad)}) equal {hits[bad[:8]].sum(1).tolist()} of the "
                     f"{len(candidates)} allowed outcomes (each sample must match exactly one)")
    return hits.int().argmax(1)


# -- drop_path -----------------------------------------------------------------------------------------

def test_drop_path_drops_whole_samples_and_rescales_the_rest():
    p, n = 0.3, 2000
    x = randn(n, 3, 4)
    assert drop_path(x, p, training=False) is x and drop_path(x, 0.0, training=True) is x
    torch.manual_seed(1)
    y = drop_path(x, p, training=True)
    kind = _which(y, [torch.zeros_like(x), x / (1 - p)], "drop_path")
    dropped = int((kind == 0).sum())
    assert _binomial_ok(dropped, n, p), f"drop_path dropped {dropped}/{n} samples, expected about {n * p:.0f}"
    torch.manual_seed(1)
    assert torch.equal(drop_path(x, p, training=True), y), "not reproducible from the generator state"
    assert not torch.equal(drop_path(x, p, training=True), y), "another draw dropped the same samples"


# -- Block drop path --------------------------------------------------------------------------------------

def _block_outcomes(blk: Block, x: torch.Tensor, p: float) -> list[torch.Tensor]:
    """The four per-sample outcomes of a block whose only randomness is drop path with p: each residual
    branch dropped (the skip path alone) or kept and scaled by 1/(1-p). Index = 2*attn_kept + mlp_kept."""
    out = []
    with torch.no_grad():
        a = blk.attn(blk.norm1(x))
        for attn_kept in (False, True):
            x1 = x + a / (1 - p) if attn_kept else x
            m = blk.mlp(blk.norm2(x1))
            out += [x1, x1 + m / (1 - p)]
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["op-by-op", "fused"])
def test_block_drop_path_per_sample(fused):
    p, n, dim = 0.25, 600, 16
    torch.manual_seed(0)
    blk = Block(dim, 2, qkv_bias=True, norm_layer=LN, drop_path=p, impl="reference", fused=fused)
    x = randn(n, 3, dim)
    blk.eval()
    with torch.no_grad():
        y_eval = blk(x)
        plain = Block(dim, 2, qkv_bias=True, norm_layer=LN, impl="reference", fused=fused).eval()
        plain.load_state_dict(blk.state_dict())
        assert torch.equal(y_eval, plain(x)), "eval with drop_path is not the drop_path=0 block"
        blk.train()
        torch.manual_seed(3)
        y = blk(x)
    kind = _which(y, _block_outcomes(blk, x, p), "block drop path")
    attn_dropped, mlp_dropped = int((kind < 2).sum()), int((kind % 2 == 0).sum())
    for what, k in (("attention", attn_dropped), ("mlp", mlp_dropped)):
        assert _binomial_ok(k, n, p), f"the {what} branch was dropped for {k}/{n} samples, expected about {n * p:.0f}"
    assert not torch.equal(y, y_eval)


# -- attention dropout -------------------------------------------------------------------------------------

def _attention_with_dropout(attn: Attention, x: torch.Tensor, p: float) -> torch.Tensor:
    """timm 0.3.2's Attention.forward: softmax(q k^T * scale), dropout on the probabilities, @ v, proj."""
    n, L, C = x.shape
    q, k, v = attn.qkv(x).reshape(n, L, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    probs = F.dropout((q @ k.transpose(-2, -1) * attn.scale).softmax(-1), p, training=True)
    return attn.proj((probs @ v).transpose(1, 2).reshape(n, L, C))


def test_attention_dropout_drops_the_probabilities():
    p, dim, heads = 0.4, 16, 2
    torch.manual_seed(0)
    attn = Attention(dim, heads, qkv_bias=True, attn_drop=p, impl="reference")
    plain = Attention(dim, heads, qkv_bias=True, impl="reference")
    plain.load_state_dict(attn.state_dict())
    x = randn(3, 7, dim)
    with torch.no_grad():
        y_eval = attn.eval()(x)
        assert torch.equal(y_eval, plain.eval()(x)), "eval with attn_drop is not the attn_drop=0 module"
        assert torch.equal(plain.train()(x), y_eval), "attn_drop=0 in training is not deterministic"
        attn.train()
        torch.manual_seed(5)
        y = attn(x)
        torch.manual_seed(5)
        want = _attention_with_dropout(attn, x, p)
    assert_close(y, want, name="attention dropout vs softmax -> dropout -> @v from the same generator")
    assert not torch.isclose(y, y_eval, atol=TOL["atol"], rtol=TOL["rtol"]).all(), "training ignored attn_drop"
    # with dropout_p = 0 (or an unscaled mask) it would still differ from the reference above; and the
    # probabilities, not the output, are what is dropped: no output row is zeroed whole
    assert (y.abs().sum(-1) > 0).all()


def test_attention_dropout_mean_is_the_output_without_dropout():
    """E[dropout(P)/(1-p)] = P and the rest is linear: the mean over many independent draws (one per
    batch copy of the same sequence) is the eval output, within 6 standard errors per element."""
    p, dim, heads, copies = 0.5, 16, 2, 4000
    torch.manual_seed(0)
    attn = Attention(dim, heads, qkv_bias=True, attn_drop=p, impl="reference")
    x = randn(1, 5, dim)
    with torch.no_grad():
        y_eval = attn.eval()(x)[0]
        torch.manual_seed(2)
        ys = attn.train()(x.expand(copies, -1, -1))
    mean, err = ys.mean(0), ys.std(0) / math.sqrt(copies)
    assert (err > 0).all(), "the draws do not vary: no dropout was applied"
    z = ((mean - y_eval).abs() / err).max().item()
    assert z < 6.0, f"mean over {copies} draws is {z:.1f} standard errors from the no-dropout output"


@pytest.mark.parametrize("fused", [False, True], ids=["op-by-op", "fused"])
def test_block_attention_dropout(fused):
    p, dim, heads = 0.4, 16, 2
    torch.manual_seed(0)
    blk = Block(dim, heads, qkv_bias=True, norm_layer=LN, attn_drop=p, impl="reference", fused=fused)
    plain = Block(dim, heads, qkv_bias=True, norm_layer=LN, impl="reference", fused=fused)
    plain.load_state_dict(blk.state_dict())
    x = randn(3, 7, dim)
    with torch.no_grad():
        y_eval = blk.eval()(x)
        assert torch.equal(y_eval, plain.eval()(x)), "eval with attn_drop is not the attn_drop=0 block"
        blk.train()
        torch.manual_seed(4)
        y = blk(x)
        torch.manual_seed(4)
        x1 = x + _attention_with_dropout(blk.attn, blk.norm1(x), p)
        want = x1 + blk.mlp(blk.norm2(x1))
    assert_close(y, want, name="block with attention dropout")
    assert not torch.isclose(y, y_eval, atol=TOL["atol"], rtol=TOL["rtol"]).all(), "training ignored attn_drop"


# -- a patched official-layout model with timm 0.3.2's blocks --------------------------------------------

class DropPath(nn.Module):
    """timm 0.3.2's DropPath (the routing finds it by its `drop_prob`)."""

    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask


class TimmAttention(ReferenceAttention):
    """timm 0.3.2's Attention (the same modules as maefast's reference one; its own forward, written as
    timm's: dropout on the attention probabilities)."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop((q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))


class TimmBlock(nn.Module):
    """timm 0.3.2's Block."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = TimmAttention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2)  # L = 16


def _official_init(self, drop_path=0.0, attn_drop=0.0, **kw):
    """The official layout (methods as the reference class's) with timm 0.3.2 blocks carrying the flags."""
    nn.Module.__init__(self)
    ref = ReferenceMAE(**kw)
    for name, child in ref.named_children():
        setattr(self, name, child)
    for name in ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed"):
        setattr(self, name, getattr(ref, name))
    self.norm_pix_loss, self.in_chans = ref.norm_pix_loss, ref.in_chans
    for blocks, dim, heads in ((self.blocks, kw["embed_dim"], kw["num_heads"]),
                               (self.decoder_blocks, kw["decoder_embed_dim"], kw["decoder_num_heads"])):
        for i, old in enumerate(blocks):
            new = TimmBlock(dim, heads, qkv_bias=True, norm_layer=LN, drop_path=drop_path, attn_drop=attn_drop)
            new.load_state_dict(old.state_dict())
            blocks[i] = new


# a root class defined here (no maefast base): patch trusts the block classes of its own file
OfficialMAE = type("MaskedAutoencoderViT", (nn.Module,), dict(
    {k: v for k, v in vars(ReferenceMAE).items() if not k.startswith("__")}, __init__=_official_init,
    __module__=__name__))


@pytest.mark.parametrize("flag,match", [("drop_path", "DropPath"), ("attn_drop", "Dropout")])
def test_patched_official_model_keeps_its_blocks_dropout(flag, match):
    """A module's own flag active in training: the patched model runs its original forward (with the
    SlowPathWarning naming it) and draws what the unpatched model draws; in eval it is fast again."""
    from maefast.patching import SlowPathWarning

    torch.manual_seed(0)
    plain = OfficialMAE(**TINY, **{flag: 0.5})
    patched = maefast.patch(copy.deepcopy(plain), impl="reference")
    imgs, noise = randn(3, 3, 32, 32), torch.rand(3, 16)
    plain.eval()
    with torch.no_grad():
        eval_loss = plain(imgs, 0.75, noise)[0]
    plain.train()
    patched.train()
    with torch.no_grad():
        torch.manual_seed(6)
        want = plain(imgs, 0.75, noise)[0]
        torch.manual_seed(6)
        with pytest.warns(SlowPathWarning, match=match):
            got = patched(imgs, 0.75, noise)[0]
    assert want != eval_loss, f"{flag} changed nothing in the unpatched model: the test proves nothing"
    assert torch.equal(got, want), f"patched {got.item()} != unpatched {want.item()} with {flag} in training"
    patched.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        assert_close(patched(imgs, 0.75, noise)[0], eval_loss, name="patched eval loss")


# -- maefast's own model: attention dropout (the reference Attention ignored attn_drop) and blocks whose
# drop path the routing did not see (maefast.nn.Block keeps it in a DropPath, as timm: drop_prob) ---------

def _own_model(seed=0):
    torch.manual_seed(seed)
    return MaskedAutoencoderViT(**TINY, norm_layer=LN)


def test_own_model_applies_attention_dropout_in_training():
    m = _own_model()
    imgs, noise = randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        eval_loss = m.eval()(imgs, 0.75, noise)[0]
        for blk in m.blocks:
            blk.attn.attn_drop.p = 0.5
        m.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses = {m(imgs, 0.75, noise)[0].item() for _ in range(3)}
    assert eval_loss.item() not in losses and len(losses) > 1, "attention dropout was not applied"


def test_model_with_drop_path_blocks_does_not_skip_drop_path():
    m = _own_model()
    imgs, noise = randn(3, 3, 32, 32), torch.rand(3, 16)
    for i, old in enumerate(m.blocks):
        new = Block(TINY["embed_dim"], TINY["num_heads"], qkv_bias=True, norm_layer=LN, drop_path=0.5)
        new.load_state_dict(old.state_dict())
        m.blocks[i] = new
    with torch.no_grad():
        eval_loss = m.eval()(imgs, 0.75, noise)[0]
        m.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses = {m(imgs, 0.75, noise)[0].item() for _ in range(3)}
    assert eval_loss.item() not in losses and len(losses) > 1, "drop path was skipped"


def test_mlp_dropout_follows_the_activation_and_fc2():
    """timm 0.3.2's Mlp applies its one Dropout twice: after the activation and after fc2; a fixed-seed run
    equals fc1 -> GELU -> dropout -> fc2 -> dropout drawn from the same generator state."""
    p = 0.3
    torch.manual_seed(0)
    mlp = Mlp(16, 32, drop=p).train()
    x = randn(4, 5, 16)
    with torch.no_grad():
        torch.manual_seed(3)
        y = mlp(x)
        torch.manual_seed(3)
        want = F.dropout(mlp.fc2(F.dropout(mlp.act(mlp.fc1(x)), p)), p)
        assert torch.equal(mlp.eval()(x), mlp.fc2(mlp.act(mlp.fc1(x))))  # eval: no dropout at all
    assert_close(y, want, name="Mlp dropout vs fc1 -> GELU -> dropout -> fc2 -> dropout")


def test_reference_attention_drops_its_projection_output():
    """timm 0.3.2's proj_drop: dropout on the output projection in training (the probabilities keep attn_drop)."""
    p = 0.4
    torch.manual_seed(0)
    attn = ReferenceAttention(16, 2, qkv_bias=True, proj_drop=p).train()
    x = randn(3, 7, 16)
    with torch.no_grad():
        torch.manual_seed(5)
        y = attn(x)
        torch.manual_seed(5)
        want = F.dropout(_attention_with_dropout(attn, x, 0.0), p)
    assert_close(y, want, name="proj_drop vs dropout on the projection from the same generator")


# -- modules of the user's (or other torch dropouts) in a block's dropout slots, which the fast path never calls

class Shift(nn.Module):
    """A user's regulariser in a block's dropout slot: no dropout class, no rate the routing reads."""

    def forward(self, x):
        return x + 0.1


@pytest.mark.usefixtures("warn_again")
@pytest.mark.parametrize("where", ["blocks.0.mlp.drop", "blocks.1.attn.proj_drop", "decoder_blocks.0.attn.attn_drop"])
@pytest.mark.parametrize("fused", [False, "block"])
def test_a_users_module_in_a_dropout_slot_is_not_dropped(where, fused):
    """The fast block never calls a block's dropout slots (their rates are checked); a module of the user's
    there was silently skipped (another loss, other gradients): refused at patch time, and when set after
    patching (or in maefast's own model) the call runs the original forward."""
    plain, patched = _pair(fused)
    bad = copy.deepcopy(plain)
    bad.get_submodule(where.rsplit(".", 1)[0]).__setattr__(where.rsplit(".", 1)[1], Shift())
    with pytest.raises(TypeError, match=f"{where}.*Shift"):
        maefast.patch(bad, fused=fused)
    for m in (plain, patched):
        m.get_submodule(where.rsplit(".", 1)[0]).__setattr__(where.rsplit(".", 1)[1], Shift())
    _same_call(plain, patched, where.replace(".", r"\."))
    routing._WARNED.clear()  # the same class name and reason: warned once
    torch.manual_seed(0)
    own = MaskedAutoencoderViT(**TINY, fused=fused)
    own.get_submodule(where.rsplit(".", 1)[0]).__setattr__(where.rsplit(".", 1)[1], Shift())
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, 16)
    own.impl = "reference"
    want = own(imgs, 0.75, noise)[0]
    own.impl = "auto"
    with pytest.warns(_slow_warning(), match=where.replace(".", r"\.")):
        got = own(imgs, 0.75, noise)[0]
    assert torch.allclose(got, want, rtol=1e-6), (got.item(), want.item())


@pytest.mark.parametrize("fused", [False, "block"])
def test_a_forks_copy_of_timms_drop_path_is_taken_as_timms(fused):
    """The rule above refuses classes maefast does not know in the dropout slots; a copy of timm's DropPath (same
    name, same `drop_prob`; this file's, another module than the official-layout model's) is timm's: patched,
    served on the fast path (at rate 0, or in eval)."""
    plain, _ = _pair(fused)
    for where in ("blocks.0.mlp.drop", "decoder_blocks.0.attn.proj_drop"):
        plain.get_submodule(where.rsplit(".", 1)[0]).__setattr__(where.rsplit(".", 1)[1], DropPath(0.0))
    patched = maefast.patch(copy.deepcopy(plain), fused=fused)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", _slow_warning())
        got = patched(imgs, 0.75, noise)[0]
    assert torch.allclose(got, plain(imgs, 0.75, noise)[0], rtol=1e-6)
    patched.blocks[0].mlp.drop = Shift()  # another class there: the message says what to put instead
    with pytest.warns(_slow_warning(), match="put an nn.Identity, a torch Dropout or timm's DropPath there"):
        patched(imgs, 0.75, noise)


@pytest.mark.usefixtures("warn_again")
@pytest.mark.parametrize("drop", [nn.AlphaDropout, nn.Dropout1d])
def test_transformers_another_torch_dropout_in_a_layer_runs_the_original(drop):
    """The fast path applies a layer's nn.Dropout rate with torch's dropout; another torch dropout class put in
    its place (a torch class, so not refused as a user's) was silently skipped in training."""
    plain, patched = _hf()
    if not hasattr(plain.vit, "layers"):
        pytest.skip("transformers 4.x names")
    for m in (plain, patched):
        m.vit.layers[1].dropout = drop(0.5)
        m.train()
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, 16)
    torch.manual_seed(4)
    want = plain(pixel_values=imgs, noise=noise).loss
    torch.manual_seed(4)
    with pytest.warns(_slow_warning(), match=rf"encoder layer 1\.dropout is a {drop.__name__}"):
        got = patched(pixel_values=imgs, noise=noise).loss
    assert torch.equal(got, want), (got.item(), want.item())
