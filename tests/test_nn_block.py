"""`maefast.nn.Block` / `Attention` / `Unshuffle` as drop-ins for timm 0.3.2's and the official code's:
the one-op block (fused=True) runs only where it computes what the module tree says (a GELU subclass,
a replaced part, hooks, float64 run op by op), hooks see what timm's would, ``drop_path`` is timm's
module attribute, and bad arguments fail at construction."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from maefast.nn import Attention, Block, DropPath, Unshuffle
from maefast.testing import assert_close, randn
from test_dropout import TimmAttention, TimmBlock

D, H = 32, 2


class QuickGELU(nn.GELU):
    """A GELU subclass computing something else (CLIP's approximation)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def _pair(**kw):
    """A timm 0.3.2 block and maefast's fused one with the same weights."""
    torch.manual_seed(0)
    timm = TimmBlock(D, H, qkv_bias=True, **kw)
    ours = Block(D, H, qkv_bias=True, fused=True, **kw)
    ours.load_state_dict(timm.state_dict())
    return timm.eval(), ours.eval()


def test_fused_block_runs_a_gelu_subclass_as_its_own_forward():
    timm, ours = _pair(act_layer=QuickGELU)
    x = randn(3, 7, D)
    assert_close(ours(x), timm(x), name="fused block with QuickGELU")
    plain, ours_plain = _pair()
    assert not torch.allclose(ours(x), ours_plain(x))  # the activation matters here


def test_fused_block_runs_tanh_gelu_and_mlp_dropout_op_by_op():
    """The block op computes the erf GELU and no dropout: a tanh GELU, or an MLP dropout set on the module in
    training, runs the block's own modules (same output as timm's, the same dropout draws)."""
    timm, ours = _pair(act_layer=lambda: nn.GELU(approximate="tanh"))
    x = randn(3, 7, D)
    assert_close(ours(x), timm(x), name="fused block with a tanh GELU")
    timm, ours = _pair()
    timm.mlp.drop.p = ours.mlp.drop.p = 0.5  # Mlp's own rate (the constructor's `drop` sets proj_drop too)
    outs = []
    for blk in (timm.train(), ours.train()):
        torch.manual_seed(1)
        outs.append(blk(x))
    assert_close(outs[1], outs[0], name="fused block with MLP dropout in training")


def test_fused_block_keeps_each_layer_norms_eps():
    # eps 0.1 / 0.3 (not the paper's 1e-6, whose effect hides under fp32 tolerances): the op reads both norms' own
    timm, ours = _pair(norm_layer=lambda d: nn.LayerNorm(d, eps=0.1))
    timm.norm2.eps = ours.norm2.eps = 0.3
    x = randn(3, 7, D)
    assert_close(ours(x), timm(x), name="fused block with LayerNorm eps 0.1 / 0.3")


class CentredNorm(nn.LayerNorm):
    """A LayerNorm subclass computing something else (a residual mix of its input)."""

    def forward(self, x):
        return super().forward(x) + 0.1 * x


@pytest.mark.parametrize("act", [QuickGELU, lambda: nn.GELU(approximate="tanh"), "norm"],
                         ids=["QuickGELU", "tanh_GELU", "LayerNorm_subclass"])
def test_model_fused_block_runs_a_gelu_or_norm_subclass_as_its_own_forward(act):
    """The fast model with fused='block' runs an activation other than exact GELU as itself (a subclass, or
    torch's GELU with approximate='tanh': the block op computes the erf GELU only), and a LayerNorm subclass
    with its own forward too."""
    import warnings

    from maefast.models import mae_vit_tiny_test

    imgs, noise = randn(2, 3, 32, 32), torch.rand(2, 16)
    preds = {}
    for impl, fused in (("reference", False), ("auto", "block")):
        torch.manual_seed(0)
        m = mae_vit_tiny_test(impl=impl, fused=fused)
        for blk in (*m.blocks, *m.decoder_blocks):
            if act == "norm":  # the block op computes torch's LayerNorm only
                blk.norm2.__class__ = CentredNorm
            else:
                blk.mlp.act = act()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            preds[impl] = m(imgs, noise=noise)[1]  # pred (the loss moves too little to tell: QuickGELU ~ GELU)
    assert_close(preds["auto"], preds["reference"], name="fused='block' pred with the blocks' own activation")


def test_fused_block_calls_hooked_parts_and_attention_maps_reach_attn_drop_hooks():
    timm, ours = _pair()
    x = randn(2, 5, D)
    seen = {"timm": [], "ours": []}
    for name, blk in (("timm", timm), ("ours", ours)):
        for part in ("norm1", "attn", "mlp"):
            getattr(blk, part).register_forward_hook(lambda m, i, o, _n=name, _p=part: seen[_n].append(_p))
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o, _n=name: seen[_n].append(o.shape))
        with torch.no_grad():
            out = blk(x)
        seen[name].append(out)
    assert seen["ours"][:-1] == seen["timm"][:-1] == ["norm1", torch.Size([2, H, 5, 5]), "attn", "mlp"]
    assert_close(seen["ours"][-1], seen["timm"][-1], name="hooked block")
    maps = []
    ours.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o))
    ours.fused = False
    with torch.no_grad():
        ours(x)
    assert maps and torch.allclose(maps[0].sum(-1), torch.ones(2, H, 5))  # probabilities, op by op too


def test_fused_block_with_an_adapter_or_an_instance_forward_runs_op_by_op():
    from test_patching_parts import LoRALinear

    for change in (lambda b: setattr(b.mlp, "fc1", LoRALinear(b.mlp.fc1, b_init=0.01)),
                   lambda b: setattr(b.norm2, "forward", lambda x, _n=b.norm2: 1.5 * nn.LayerNorm.forward(_n, x))):
        timm, ours = _pair()
        torch.manual_seed(3)
        change(timm)
        torch.manual_seed(3)
        change(ours)
        x = randn(2, 5, D)
        with torch.no_grad():
            assert_close(ours(x), timm(x), name="fused block with a changed part")


@pytest.mark.parametrize("part", ["attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias", "norm1.bias", "norm2.weight"])
def test_fused_block_without_a_bias_or_a_norm_affine_runs_op_by_op(part):
    """The block op reads each bias and both norms' weight and bias: a block missing one (bias=False,
    elementwise_affine=False) runs its own modules, as timm's does."""
    timm, ours = _pair()
    module, name = part.rsplit(".", 1)
    for blk in (timm, ours):
        setattr(blk.get_submodule(module), name, None)
    x = randn(2, 5, D)
    with torch.no_grad():
        assert_close(ours(x), timm(x), name=f"fused block without {part}")


def test_fused_block_with_a_replaced_attention_or_float64():
    timm, ours = _pair()
    x = randn(2, 5, D)
    ours.attn = TimmAttention(D, H, qkv_bias=True)  # timm's own module in our block
    ours.attn.load_state_dict(timm.attn.state_dict())
    with torch.no_grad():
        assert_close(ours(x), timm(x), name="block with timm's Attention")
    timm, ours = _pair()
    x64 = x.double()
    timm.double(), ours.double()
    with torch.no_grad():
        assert torch.allclose(ours(x64), timm(x64), rtol=1e-12, atol=1e-12)  # op by op, not refused


def test_drop_path_is_timms_module_attribute():
    blk = Block(D, H, drop_path=0.25)
    assert isinstance(blk.drop_path, DropPath) and blk.drop_path.drop_prob == 0.25 and blk.drop_path_prob == 0.25
    assert isinstance(Block(D, H).drop_path, nn.Identity) and Block(D, H).drop_path_prob == 0.0
    assert "drop_path" not in "".join(blk.state_dict())  # no new keys
    # a stochastic-depth schedule sets drop_prob: the block follows it
    x = randn(8, 3, D)
    blk.train()
    blk.drop_path.drop_prob = 0.0
    with torch.no_grad():
        assert torch.equal(blk(x), blk.eval()(x))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\)"):
            Block(D, H, drop_path=bad)
    for bad in ("0.1", True, None):
        with pytest.raises(TypeError, match="drop_path must be a number"):
            Block(D, H, drop_path=bad)
    import numpy as np

    # what stochastic-depth schedules pass: a linspace's element, with or without .item(), numpy floats
    dpr = torch.linspace(0, 0.1, 3)
    for p in (dpr[2], dpr[2].item(), np.float64(0.05), np.array(0.05), 0):
        assert Block(D, H, drop_path=p).drop_path_prob == pytest.approx(float(p))
    blk = Block(D, H)
    blk.drop_path_prob = 0.2  # the attribute older code set
    assert isinstance(blk.drop_path, DropPath) and blk.drop_path.drop_prob == 0.2
    with pytest.raises(ValueError, match="drop_prob must be in"):
        DropPath(2.0)


def test_drop_path_in_training_refuses_packed_sequences():
    # drop_path drops whole samples: with cu_seqlens the rows are several sequences, so it is refused, not applied
    blk = Block(D, H, drop_path=0.1).train()
    with pytest.raises(ValueError, match="drop_path"):
        blk(randn(7, D), cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=4)


def test_bad_impl_and_fused_fail_at_construction():
    from maefast.nn import Attention

    for make in (lambda: Attention(D, H, impl="bogus"), lambda: Block(D, H, impl="bogus"),
                 lambda: Unshuffle(impl="bogus")):
        with pytest.raises(ValueError, match="impl must be one of"):
            make()
    with pytest.raises(TypeError, match="fused must be True or False"):
        Block(D, H, fused="block")
    with pytest.raises(ValueError, match=r"x must be \(N, L, C\)"):
        Attention(D, H)(randn(5, D))


def _official_unshuffle(x_vis, mask_token, ids_restore, pos):
    """The official forward_decoder's un-shuffle, written out."""
    n, L = ids_restore.shape
    x_ = torch.cat([x_vis[:, 1:, :], mask_token.repeat(n, L + 1 - x_vis.shape[1], 1)], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x_vis.shape[-1]))
    return torch.cat([x_vis[:, :1, :], x_], dim=1) + pos


def test_unshuffle_promotes_as_the_official_decoder():
    """The official forward_decoder concatenates the fp32 mask token and adds the fp32 position
    embedding: a bf16 x_vis (autocast) gives an fp32 stream, its values exact."""
    n, L, keep = 2, 16, 4
    x_vis = randn(n, 1 + keep, D).bfloat16()
    mask_token, pos = randn(1, 1, D), randn(1, 1 + L, D)
    ids_restore = torch.stack([torch.randperm(L) for _ in range(n)])
    want = _official_unshuffle(x_vis, mask_token, ids_restore, pos)
    assert want.dtype == torch.float32
    got = Unshuffle(impl="reference")(x_vis, mask_token, ids_restore, pos)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    same = Unshuffle(impl="reference")(x_vis, mask_token.bfloat16(), ids_restore, pos.bfloat16())
    assert same.dtype == torch.bfloat16  # all bf16: stays bf16


def test_loss_and_unshuffle_take_what_the_official_code_takes():
    """A bool mask (official: (loss * mask).sum() / mask.sum()) and float64 inputs."""
    from maefast.nn import NormPixLoss
    from maefast.reference.loss import forward_loss

    imgs, pred = randn(2, 3, 16, 16), randn(2, 16, 48)
    mask = torch.rand(2, 16) < 0.75
    loss = NormPixLoss(4, norm_pix_loss=True, impl="reference")
    assert torch.equal(loss(imgs, pred, mask), loss(imgs, pred, mask.float()))
    want = forward_loss(imgs.double(), pred.double(), mask.double(), 4, True)
    assert want.dtype == torch.float64 and torch.equal(loss(imgs.double(), pred.double(), mask.double()), want)
    n, L, keep = 2, 16, 4
    x_vis, token, pos = randn(n, 1 + keep, D).double(), randn(1, 1, D).double(), randn(1, 1 + L, D).double()
    ids = torch.stack([torch.randperm(L) for _ in range(n)])
    got = Unshuffle()(x_vis, token, ids, pos)
    assert got.dtype == torch.float64 and torch.equal(got, _official_unshuffle(x_vis, token, ids, pos))


def test_loss_module_defaults_and_a_float64_prediction_and_impls_reach_the_ops():
    """NormPixLoss(p) is the official default (norm_pix_loss False); a float64 pred with float32 images takes
    the official ops as they are (the target in float32, the rest promoted to float64)."""
    from maefast.nn import NormPixLoss
    from maefast.reference.loss import forward_loss

    imgs, pred = randn(2, 3, 16, 16), randn(2, 16, 48)
    mask = (torch.rand(2, 16) < 0.75).float()
    assert_close(NormPixLoss(4)(imgs, pred, mask), forward_loss(imgs, pred, mask, 4, False), torch.float32)
    for norm in (False, True):
        got = NormPixLoss(4, norm_pix_loss=norm)(imgs, pred.double(), mask)
        assert got.dtype == torch.float64 and torch.equal(got, forward_loss(imgs, pred.double(), mask, 4, norm))
    with pytest.raises(ValueError, match="impl"):  # the module's impl reaches the op: no CUDA kernels for CPU tensors
        NormPixLoss(4, impl="cuda")(imgs, pred, mask)
    n, L, keep = 2, 16, 4
    ids_restore = torch.stack([torch.randperm(L) for _ in range(n)])
    with pytest.raises(ValueError, match="impl"):
        Unshuffle(impl="cuda")(randn(n, 1 + keep, D), randn(1, 1, D), ids_restore, randn(1, 1 + L, D))


def test_drop_path_prob_setter_updates_the_blocks_own_drop_path():
    """Setting drop_path_prob on a block with a DropPath sets that module's drop_prob (the module a schedule may
    hold stays the one the block calls); a rate outside [0, 1) is refused by name."""
    blk = Block(D, H, drop_path=0.25)
    dp = blk.drop_path
    blk.drop_path_prob = 0.0
    assert blk.drop_path is dp and dp.drop_prob == 0.0 and blk.drop_path_prob == 0.0
    x = randn(8, 3, D)
    with torch.no_grad():
        assert torch.equal(blk.train()(x), blk.eval()(x))  # rate 0 in training: no sample dropped
    blk.drop_path_prob = torch.tensor(0.5)  # a schedule's 0-d tensor
    assert blk.drop_path is dp and dp.drop_prob == 0.5
    with pytest.raises(ValueError, match=r"drop_path_prob must be in \[0, 1\)"):
        blk.drop_path_prob = 1.0
    with pytest.raises(TypeError, match="drop_path_prob must be a number"):
        blk.drop_path_prob = True
    assert dp.drop_prob == 0.5


def test_fused_block_with_an_idle_drop_path_runs_the_one_op(monkeypatch):
    """A DropPath that drops nothing (eval mode, or rate 0 in training) keeps the block one op: the fused path
    must not fall back to op by op only because a stochastic-depth schedule put a DropPath there."""
    import maefast.ops.block as block_op

    calls = []
    real = block_op.vit_block
    monkeypatch.setattr(block_op, "vit_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    timm, ours = _pair(drop_path=0.1)
    x = randn(3, 7, D)
    with torch.no_grad():
        assert_close(ours(x), timm(x), name="fused block with drop_path in eval")
        assert len(calls) == 1
        ours.train().drop_path_prob = 0.0
        assert_close(ours(x), timm(x), name="fused block with drop_path 0 in training")
    assert len(calls) == 2 and isinstance(ours.drop_path, DropPath)
    # another torch module put in as drop_path (here a Dropout, whose rate drop_path_prob does not read): called
    ours.drop_path = timm.drop_path = nn.Dropout(0.5)
    outs = []
    for blk in (timm.train(), ours):
        torch.manual_seed(1)
        outs.append(blk(x))
    assert_close(outs[1], outs[0], name="fused block with a Dropout as drop_path in training")
    assert len(calls) == 2


@pytest.mark.parametrize("route", ["one op", "op by op", "sdpa", "attn_drop hook", "attn_drop in training"])
def test_every_attention_route_takes_qk_scale(route):
    """A qk_scale other than head_dim ** -0.5 (which every kernel would default to) reaches each route: the block
    op, the visible-attention op, torch's SDPA, the materialised probabilities and SDPA with dropout."""
    torch.manual_seed(0)
    timm = TimmBlock(D, H, qkv_bias=True, qk_scale=0.3)
    ours = Block(D, H, qkv_bias=True, qk_scale=0.3, fused=route == "one op", impl="sdpa" if route == "sdpa" else "auto")
    ours.load_state_dict(timm.state_dict())
    timm.eval(), ours.eval()
    x = randn(2, 5, D)
    if route == "attn_drop hook":
        for blk in (timm, ours):
            blk.attn.attn_drop.register_forward_hook(lambda m, i, o: None)
    if route == "attn_drop in training":  # SDPA's dropout on the CPU draws as F.dropout on the probabilities
        timm.attn.attn_drop.p = ours.attn.attn_drop.p = 0.3
        timm.train(), ours.train()
    with torch.no_grad():
        torch.manual_seed(1)
        got = ours.attn(ours.norm1(x))
        torch.manual_seed(1)
        want = timm.attn(timm.norm1(x))
        assert_close(got, want, name=f"attention with qk_scale=0.3 ({route})")
        torch.manual_seed(2)
        got = ours(x)
        torch.manual_seed(2)
        assert_close(got, timm(x), name=f"block with qk_scale=0.3 ({route})")


def test_attention_and_block_take_timms_defaults_and_mlp_ratio():
    """timm 0.3.2's defaults: no qkv bias unless asked, and mlp_ratio sizing the MLP (a bias-less timm block with
    mlp_ratio 2 loads strictly: same keys and shapes)."""
    assert Attention(D, H).qkv.bias is None and Block(D, H).attn.qkv.bias is None
    ours = Block(D, H, mlp_ratio=2.0)
    assert ours.mlp.fc1.out_features == 2 * D
    ours.load_state_dict(TimmBlock(D, H, mlp_ratio=2.0).state_dict())


@pytest.mark.parametrize("fused", [False, True], ids=["op-by-op", "fused"])
@pytest.mark.parametrize("where", ["drop", "proj_drop alone"])
def test_block_drop_is_the_projection_and_mlp_dropout(where, fused):
    """timm's `drop` is the attention's proj_drop and the MLP's dropout: in training a block with it equals timm's
    drawn from the same seed, op by op or fused (the one op has no dropout, so it must not run), also with the
    projection's dropout alone."""
    timm, ours = _pair(drop=0.3)
    ours.fused = fused
    if where == "proj_drop alone":
        timm.mlp.drop.p = ours.mlp.drop.p = 0.0
    x = randn(3, 7, D)
    outs = []
    with torch.no_grad():
        plain = timm(x)
        for blk in (timm.train(), ours.train()):
            torch.manual_seed(1)
            outs.append(blk(x))
    assert_close(outs[1], outs[0], name=f"block with {where} in training ({'fused' if fused else 'op by op'})")
    assert not torch.allclose(outs[0], plain)  # the dropout drew something


def test_attention_on_packed_rows_and_what_it_refuses_there():
    """Packed rows (T, C) with cu_seqlens: each sequence attends within itself; a max_seqlen the longest sequence
    overflows is refused (it reaches the op); attention dropout in training and hooks on attn_drop (which need the
    materialised probabilities of one sequence per row) are refused, not run across the sequences."""
    torch.manual_seed(0)
    a = Attention(D, H, qkv_bias=True, impl="reference").eval()
    x, cu = randn(7, D), torch.tensor([0, 3, 7], dtype=torch.int32)
    with torch.no_grad():
        y = a(x, cu, 4)
        for s, e in ((0, 3), (3, 7)):
            assert_close(y[s:e], a(x[None, s:e])[0], name=f"packed rows {s}:{e}")
    with pytest.raises(ValueError, match="max_seqlen=2 is too small"):
        a(x, cu, 2)
    a.attn_drop.p = 0.1
    with pytest.raises(ValueError, match="attn_drop > 0 in training mode is not supported with cu_seqlens"):
        a.train()(x, cu, 4)
    a.eval().attn_drop.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(ValueError, match="hooks on attn_drop need the attention probabilities"):
        a(x, cu, 4)


def test_block_with_drop_path_runs_packed_rows_in_eval():
    """drop_path is refused with cu_seqlens in training only: in eval it is the identity and the packed rows run,
    each sequence as alone."""
    torch.manual_seed(0)
    blk = Block(D, H, qkv_bias=True, drop_path=0.1, impl="reference").eval()
    x, cu = randn(1, 7, D), torch.tensor([0, 3, 7], dtype=torch.int32)
    with torch.no_grad():
        y = blk(x, cu_seqlens=cu, max_seqlen=4)
        for s, e in ((0, 3), (3, 7)):
            assert_close(y[:, s:e], blk(x[:, s:e]), name=f"packed rows {s}:{e} in eval")


def test_hooked_attention_in_training_drops_as_timms():
    """A hook on attn_drop (attention maps) materialises the probabilities as timm computes them; in training both
    attn_drop and proj_drop apply there, the draws of timm's from the same seed."""
    torch.manual_seed(0)
    timm = TimmAttention(D, H, True, None, 0.2, 0.3)
    ours = Attention(D, H, qkv_bias=True, attn_drop=0.2, proj_drop=0.3)
    ours.load_state_dict(timm.state_dict())
    x, outs, maps = randn(3, 7, D), [], []
    with torch.no_grad():
        for a in (timm.train(), ours.train()):
            a.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o))
            torch.manual_seed(1)
            outs.append(a(x))
    assert_close(outs[1], outs[0], name="hooked attention in training")
    assert_close(maps[1], maps[0], name="dropped probabilities the hooks saw")


def test_fused_block_runs_a_hooked_drop_path():
    """A hook on drop_path (the one op would not call it) sends the fused block op by op: the hook runs for both
    residual branches, as timm's."""
    timm, ours = _pair(drop_path=0.1)
    calls = {"timm": 0, "ours": 0}
    for name, blk in (("timm", timm), ("ours", ours)):
        blk.drop_path.register_forward_hook(lambda m, i, o, _n=name: calls.update({_n: calls[_n] + 1}))
    x = randn(2, 5, D)
    with torch.no_grad():
        assert_close(ours(x), timm(x), name="fused block with a hooked drop_path")
    assert calls == {"timm": 2, "ours": 2}


@pytest.mark.parametrize("fused", [False, True], ids=["op-by-op", "fused"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_block_runs_its_attention_on_its_impl(impl, fused):
    """The block's impl reaches the op it runs (the visible attention op by op, the block op fused): impl="triton"
    launches Triton kernels (the launch check of conftest.py), with timm's result either way."""
    torch.manual_seed(0)
    timm = TimmBlock(D, H, qkv_bias=True)
    ours = Block(D, H, qkv_bias=True, impl=impl, fused=fused)
    ours.load_state_dict(timm.state_dict())
    x = randn(2, 5, D)
    with torch.no_grad():
        assert_close(ours(x), timm(x), name=f"block on impl={impl!r}")


def _set_dropouts(blk, on: bool):
    for mod in blk.modules():
        if isinstance(mod, nn.Dropout) or type(mod).__name__ == "DropPath":
            mod.train(on)


@pytest.mark.parametrize("fused", [False, True], ids=["op-by-op", "fused"])
@pytest.mark.parametrize("kw", [dict(drop=0.3), dict(attn_drop=0.3), dict(drop_path=0.3)],
                         ids=["drop", "attn_drop", "drop_path"])
def test_each_dropout_follows_its_own_mode_as_timms(kw, fused):
    """A dropout drops when its own module is in training mode, as calling it does in timm's block: Monte Carlo
    dropout (an eval() block whose Dropouts/DropPaths are set back to train()) drops, and a train() block whose
    dropouts were set to eval() does not (the one op skipped the first, the attention's rate read the block's or
    the attention's mode instead of attn_drop's)."""
    timm, ours = _pair(**kw)
    ours.fused = fused
    x = randn(3, 7, D)
    with torch.no_grad():
        plain = timm(x)
        for mode in ("monte carlo", "dropouts off in training"):
            outs = []
            for blk in (timm, ours):
                blk.train(mode != "monte carlo")
                _set_dropouts(blk, mode == "monte carlo")
                torch.manual_seed(1)
                outs.append(blk(x))
            if mode == "monte carlo":
                assert not torch.allclose(outs[1], plain, atol=1e-4), f"{kw}: no dropout in {mode}"
                if "drop_path" not in kw:  # same draws (drop path: same distribution, other draws)
                    assert_close(outs[1], outs[0], name=f"{kw} in {mode}")
            else:
                assert_close(outs[1], plain, name=f"{kw} in {mode}")


@pytest.mark.parametrize("fused", [False, True], ids=["op-by-op", "fused"])
@pytest.mark.parametrize("part", ["attn.attn_drop", "attn.proj_drop", "mlp.drop"])
def test_a_dropout_replaced_by_identity_trains(part, fused):
    """Stripping a dropout by putting an nn.Identity in its place works in training as in timm's block (it raised
    AttributeError: 'Identity' object has no attribute 'p')."""
    timm, ours = _pair(drop=0.3, attn_drop=0.3)
    for blk in (timm, ours):
        for name in ("attn.attn_drop", "attn.proj_drop", "mlp.drop"):
            parent, attr = name.rsplit(".", 1)
            setattr(blk.get_submodule(parent), attr, nn.Identity() if name == part else nn.Dropout(0.0))
    ours.fused = fused
    x = randn(3, 7, D)
    with torch.no_grad():
        assert_close(ours.train()(x), timm.train()(x), name=f"block with {part} an Identity in training")


def test_fused_block_refuses_an_input_of_another_dtype_as_timms():
    """Outside autocast a bf16 input on an fp32 block raises as timm's (F.linear's dtype error) instead of running
    the one op with the weights cast to bf16; under autocast both run."""
    timm, ours = _pair()
    x = randn(2, 5, D).bfloat16()
    for blk in (timm, ours):
        with pytest.raises(RuntimeError, match="dtype"):
            blk(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close(ours(x), timm(x), dtype=torch.bfloat16, name="fused block under bf16 autocast")


def test_fused_block_with_a_wrapped_linear_runs_op_by_op():
    """A Linear wrapped by a module of one's own (an adapter, no `.weight`) in a fused block: the block runs op by
    op, calling it (the dtype check once read `.weight` before the plain-layer check: AttributeError)."""
    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    timm, ours = _pair()
    timm.attn.qkv, ours.attn.qkv = Wrap(timm.attn.qkv), Wrap(ours.attn.qkv)
    x = randn(2, 5, D)
    with torch.no_grad():
        assert_close(ours(x), timm(x), name="fused block with a wrapped qkv")


def test_reference_attention_drops_by_attn_drops_own_mode():
    """maefast.reference's Attention (the truth the drop-ins are checked against) calls attn_drop as timm's does:
    Monte Carlo dropout on an eval() attention drops, with timm's draws; attn_drop set to eval() in training does
    not; an Identity in its place trains."""
    from maefast.reference.model import Attention as ReferenceAttention

    torch.manual_seed(0)
    timm = TimmAttention(D, H, True, None, 0.3, 0.0)
    ref = ReferenceAttention(D, H, qkv_bias=True, attn_drop=0.3)
    ref.load_state_dict(timm.state_dict())
    x = randn(3, 7, D)
    with torch.no_grad():
        plain = timm.eval()(x)
        for train_attn in (False, True):
            outs = []
            for a in (timm, ref):
                a.train(train_attn).attn_drop.train(not train_attn)
                torch.manual_seed(1)
                outs.append(a(x))
            assert_close(outs[1], outs[0], name=f"reference attention, attn_drop.training={not train_attn}")
            assert torch.allclose(outs[1], plain) == train_attn
        ref.attn_drop = nn.Identity()
        assert_close(ref.train()(x), plain, name="reference attention with an Identity attn_drop")


class HalfProbs(nn.Module):
    """A module put at attn_drop that changes the probabilities (no `p`): timm calls it on them."""

    def forward(self, attn):
        return attn * 0.5


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("fused", [False, True], ids=["op-by-op", "fused"])
def test_another_module_at_attn_drop_is_called_on_the_probabilities(fused, train):
    """A module other than nn.Dropout / nn.Identity at attn_drop is called on the materialised probabilities as in
    timm's attention (it was skipped in eval and raised AttributeError (no `p`) in training); with packed rows it is
    refused, naming its class."""
    timm, ours = _pair()
    timm.attn.attn_drop, ours.attn.attn_drop = HalfProbs(), HalfProbs()
    ours.fused = fused
    x = randn(3, 7, D)
    with torch.no_grad():
        assert_close(ours.train(train)(x), timm.train(train)(x), name="block with HalfProbs at attn_drop")
        with pytest.raises(ValueError, match="attn_drop of class HalfProbs"):
            ours.attn(randn(7, D), torch.tensor([0, 3, 7], dtype=torch.int32), 4)


def test_float64_unshuffle_checks_its_inputs_as_the_op_does():
    """The float64 route (the official ops) names a bad argument as the fp32 one does (it raised torch's size
    mismatch from the `+`, or ran a non-permutation ids_restore)."""
    n, L, keep = 2, 4, 2
    x_vis, token, pos = randn(n, 1 + keep, D).double(), randn(1, 1, D).double(), randn(1, 1 + L, D).double()
    ids = torch.stack([torch.randperm(L) for _ in range(n)])
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, 1\+L, Dd\)"):
        Unshuffle()(x_vis, token, ids, pos[:, 1:])
    with pytest.raises(ValueError, match="ids_restore"):
        Unshuffle()(x_vis, token, torch.zeros_like(ids), pos)
