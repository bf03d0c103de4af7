"""impl="sdpa": maefast's attention through torch's scaled_dot_product_attention (the op, the drop-in
modules, maefast's model, `maefast.patch`, the CLIs and the step benchmark's `maefast-sdpa-graph` row),
so the step benchmark times maefast's attention against torch's with everything else equal."""
from __future__ import annotations

import pytest
import torch

from maefast import ops
from maefast.models import MaskedAutoencoderViT
from maefast.models.configs import model_config
from maefast.nn.attention import Attention, Block
from maefast.reference.attention import attention as ref_attention
from maefast.testing import DTYPES, assert_close, assert_error_ratio, randn

CPU = torch.device("cpu")


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_vs_oracle(qkv, H, scale=None, name=""):
    """Forward and backward error of impl="sdpa" against the fp64 reference, relative to the
    same-dtype reference's (the tolerance table's 2x / 3x rule)."""
    out = ops.visible_attention(qkv, H, scale=scale, impl="sdpa")
    ref = ref_attention(qkv, H, scale=scale)
    x64 = qkv.detach().double().requires_grad_(True)
    oracle = ref_attention(x64, H, scale=scale)
    assert out.shape == ref.shape and out.dtype == qkv.dtype
    assert_error_ratio(out, ref, oracle, qkv.dtype, "forward", name=f"{name} out")
    dout = randn(*out.shape, dtype=qkv.dtype, device=qkv.device)
    (g,) = torch.autograd.grad(out, qkv, dout)
    (g_ref,) = torch.autograd.grad(ref, qkv, dout)
    (g_oracle,) = torch.autograd.grad(oracle, x64, dout.double())
    assert g.shape == qkv.shape and g.dtype == qkv.dtype
    assert_error_ratio(g, g_ref, g_oracle, qkv.dtype, "backward", name=f"{name} dqkv")


# (N, L, H, Dh): MAE's encoder (50 / 65 tokens, Dh 64 / 80) and decoder (197, Dh 32); odd ones
CASES = [(2, 50, 2, 64), (2, 65, 2, 80), (1, 197, 2, 32), (3, 7, 3, 48), (1, 1, 1, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_matches_the_oracle(shape, dtype):
    n, L, H, dh = shape
    qkv = randn(n, L, 3 * H * dh, dtype=dtype, device=_device()).requires_grad_(True)
    _check_vs_oracle(qkv, H, name=f"{shape} {dtype}")


def test_sdpa_takes_strided_qkv_and_a_scale():
    """qkv as the slice of a wider Linear output (rows strided 101 apart) and an explicit scale; the
    gradient arrives in the packed layout."""
    wide = randn(2, 9, 5 + 3 * 2 * 16, device=_device()).requires_grad_(True)
    view = wide[..., 5:]
    assert not view.is_contiguous()
    _check_vs_oracle(view, 2, scale=0.3, name="strided")
    ops.visible_attention(view, 2, impl="sdpa").sum().backward()
    assert torch.equal(wide.grad[..., :5], torch.zeros_like(wide.grad[..., :5]))


@pytest.mark.parametrize("shape", [(0, 5, 2, 8), (2, 0, 2, 8)])
def test_sdpa_empty_batches(shape):
    n, L, H, dh = shape
    qkv = torch.randn(n, L, 3 * H * dh, requires_grad=True)
    out = ops.visible_attention(qkv, H, impl="sdpa")
    assert out.shape == (n, L, H * dh)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


def test_sdpa_refuses_cu_seqlens_and_other_ops_refuse_sdpa():
    qkv = torch.randn(6, 3 * 2 * 8)
    with pytest.raises(ValueError, match="impl='sdpa' takes no cu_seqlens"):
        ops.visible_attention(qkv, 2, cu_seqlens=torch.tensor([0, 2, 6]), impl="sdpa")
    pred, imgs, mask = torch.randn(2, 4, 12), torch.randn(2, 3, 4, 4), torch.ones(2, 4)
    with pytest.raises(ValueError, match="impl=.sdpa. is not available for maefast.ops.norm_pix_loss"):
        ops.norm_pix_loss(pred, imgs, mask, 2, impl="sdpa")
    with pytest.raises(ValueError, match="impl='sdpa' is not available"):
        ops.random_masking(2, 4, 0.5, impl="sdpa")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.visible_attention(torch.randn(1, 4, 24), 2, impl="flash")


def test_modules_on_sdpa():
    """nn.Attention(impl="sdpa") computes the official attention; nn.Block refuses fused=True with it
    and runs op by op if its attention is switched to sdpa afterwards."""
    torch.manual_seed(0)
    a = Attention(32, num_heads=4, qkv_bias=True, impl="sdpa")
    x = torch.randn(2, 9, 32)
    ref = ref_attention(a.qkv(x), 4, scale=a.scale)
    assert_close(a(x), a.proj(ref), torch.float32)
    assert "impl='sdpa'" in repr(a)
    with pytest.raises(ValueError, match="impl='sdpa' .* needs fused=False"):
        Block(32, 4, impl="sdpa", fused=True)
    fused, plain = Block(32, 4, qkv_bias=True, fused=True), Block(32, 4, qkv_bias=True)
    plain.load_state_dict(fused.state_dict())
    fused.attn.impl = "sdpa"
    assert not fused._one_op(x, None)
    assert_close(fused(x), plain(x), torch.float32)


def _tiny(impl, fused=False):
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**model_config("tiny"), impl=impl, fused=fused).eval()


def test_model_on_sdpa_equals_the_official_computation():
    """maefast's model with impl="sdpa" (the other ops "auto") gives the official loss, prediction and
    gradients; fused="block" with it is refused, and a model switched to it afterwards runs its blocks
    op by op."""
    ref, fast = _tiny("reference"), _tiny("sdpa")
    fast.load_state_dict(ref.state_dict())
    imgs = torch.randn(2, 3, *ref.patch_embed.img_size)
    noise = torch.rand(2, ref.patch_embed.num_patches)
    outs, calls = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
        for m in (ref, fast):
            m.zero_grad()
            loss, pred, mask = m(imgs, 0.75, noise)
            loss.backward()
            outs.append((loss, pred, mask, {k: p.grad for k, p in m.named_parameters()}))
    assert len(calls) == len(fast.blocks) + len(fast.decoder_blocks)  # every attention of the sdpa model, no other
    (l0, p0, m0, g0), (l1, p1, m1, g1) = outs
    assert torch.equal(m0, m1)
    assert_close(l1, l0, torch.float32, name="loss")
    assert_close(p1, p0, torch.float32, name="pred")
    assert {k for k, g in g0.items() if g is None} == {k for k, g in g1.items() if g is None}  # the frozen pos_embeds
    for k in g0:
        if g0[k] is not None:
            assert_close(g1[k], g0[k], torch.float32, name=k)
    with pytest.raises(ValueError, match="fused='block' .* impl='sdpa'"):
        _tiny("sdpa", fused="block")
    fast.fused = "block"  # set afterwards: refused by the call as by the constructor (it ran unfused silently)
    with pytest.raises(ValueError, match="fused='block' .* impl='sdpa'"):
        fast(imgs, 0.75, noise)


def test_model_on_sdpa_under_autocast():
    """Under bf16 autocast (the training recipe) the sdpa model's loss and gradients are those of the
    "auto" model to the bf16 tolerance, in the same dtypes."""
    a, s = _tiny("auto"), _tiny("sdpa")
    s.load_state_dict(a.state_dict())
    imgs = torch.randn(2, 3, *a.patch_embed.img_size)
    noise = torch.rand(2, a.patch_embed.num_patches)
    got = []
    for m in (a, s):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, pred, _ = m(imgs, 0.75, noise)
        loss.backward()
        got.append((loss, pred, m.blocks[0].attn.qkv.weight.grad))
    (la, pa, ga), (ls, ps, gs) = got
    assert (ls.dtype, ps.dtype, gs.dtype) == (la.dtype, pa.dtype, ga.dtype)
    assert_close(ls, la, torch.bfloat16, name="loss")
    assert_close(ps, pa, torch.bfloat16, name="pred")
    assert_close(gs, ga, torch.bfloat16, name="qkv weight grad")


def test_profile_counts_the_sdpa_attention():
    """`maefast profile`'s backend log (which backend each op ran) names sdpa for the attention."""
    from maefast.profile import BackendLog

    m = _tiny("sdpa")
    with BackendLog() as log:
        m(torch.randn(2, 3, *m.patch_embed.img_size))
    assert log.ran["attention"] == {"sdpa": len(m.blocks) + len(m.decoder_blocks)}, log.ran
    assert set(log.ran["loss"]) == {"reference"}  # the other ops as "auto" (the reference on the CPU)


def test_patch_takes_sdpa():
    from maefast.patching import patch
    from maefast.reference import MaskedAutoencoderViT as OfficialLayout

    torch.manual_seed(0)
    official = OfficialLayout(**model_config("tiny")).eval()
    imgs = torch.randn(2, 3, *official.patch_embed.img_size)
    noise = torch.rand(2, official.patch_embed.num_patches)
    want = official(imgs, 0.75, noise)[0]
    with pytest.raises(ValueError, match="fused='block' .* impl='sdpa'"):
        patch(official, impl="sdpa", fused="block")
    patch(official, impl="sdpa")
    from maefast.profile import BackendLog

    with BackendLog() as log:  # the patched forward runs on the impl patch was given, not on "auto"
        got = official(imgs, 0.75, noise)[0]
    assert log.ran["attention"] == {"sdpa": len(official.blocks) + len(official.decoder_blocks)}, log.ran
    assert_close(got, want, torch.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        patch(official, impl="flash")


def test_patch_takes_sdpa_for_transformers():
    """maefast.patch(hf_model, impl="sdpa"): transformers' ViTMAEForPreTraining runs its attention on sdpa."""
    pytest.importorskip("transformers")
    from maefast.convert import to_transformers_model
    from maefast.patching import patch
    from maefast.profile import BackendLog
    from maefast.reference import MaskedAutoencoderViT as OfficialLayout

    torch.manual_seed(0)
    hf = to_transformers_model(OfficialLayout(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2))
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    want = hf(pixel_values=imgs, noise=noise).loss
    patch(hf, impl="sdpa")
    with BackendLog() as log:
        got = hf(pixel_values=imgs, noise=noise).loss
    assert log.ran["attention"] == {"sdpa": 3}, log.ran
    assert_close(got, want, torch.float32)


def test_model_on_sdpa_compiles_in_one_graph():
    """torch.compile(fullgraph=True) of the model on sdpa: the attention is torch's own op (Inductor sees
    it), no graph break; the same loss as eager."""
    torch._dynamo.reset()
    m = _tiny("sdpa")
    imgs = torch.randn(2, 3, *m.patch_embed.img_size)
    noise = torch.rand(2, m.patch_embed.num_patches)
    want = m(imgs, 0.75, noise)[0]
    got = torch.compile(m, fullgraph=True, backend="aot_eager")(imgs, 0.75, noise)[0]
    assert_close(got, want, torch.float32)


def test_clis_take_sdpa():
    from maefast.cli import check_impls
    from maefast.train.config import config_from_args, resolve_config, validate_config

    check_impls(["reference", "sdpa"], "reference,sdpa")
    with pytest.raises(ValueError, match="--impl sdpa .* needs --fused off"):
        check_impls(["sdpa"], "sdpa", "block")
    with pytest.raises(ValueError, match="--impl takes a comma list of auto, triton, cuda, reference, sdpa"):
        check_impls(["flash"], "flash")
    def cfg(*argv):
        return resolve_config(config_from_args(["--data", "synthetic", *argv]), cuda=False)

    validate_config(cfg("--impl", "sdpa"))
    with pytest.raises(ValueError, match="--impl sdpa .* needs --fused off"):
        validate_config(cfg("--impl", "sdpa", "--fused", "block"))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(64, 50, 16, 64), (64, 65, 16, 80), (64, 197, 16, 32), (64, 257, 16, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_sdpa_paper_shapes(shape):
    """On a card (cuDNN / flash): the paper's shapes in bf16, forward and backward, from the packed layout."""
    n, L, H, dh = shape
    qkv = randn(n, L, 3 * H * dh, dtype=torch.bfloat16, device="cuda").requires_grad_(True)
    _check_vs_oracle(qkv, H, name=f"{shape}")
