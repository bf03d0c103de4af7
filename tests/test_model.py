"""The fast MAE (maefast.models.MaskedAutoencoderViT): same loss and gradients as the official
computation (maefast.patch of other models: tests/test_patching.py)."""
import warnings

import pytest
import torch

import maefast
from maefast.models import MaskedAutoencoderViT, create_model, resolve_model_name, routing
from maefast.reference import MaskedAutoencoderViT as ReferenceMAE
from maefast.testing import assert_error_ratio
from test_block import _interpreter_or_skip

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)  # head dims 16 and 16


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_equal(g, g0, rel=1e-5):
    assert set(g) == set(g0)
    scale = max(v.abs().max().item() for v in g0.values())
    for n in g0:
        diff = (g[n] - g0[n]).norm().item()
        # relative per tensor, with a floor at the model's gradient scale (key biases have ~0 grads)
        assert diff <= rel * g0[n].norm().item() + 1e-6 * scale, (n, diff, g0[n].norm().item())


def _run(model, imgs, noise, **kw):
    model.zero_grad()
    loss, pred, mask = model(imgs, 0.75, noise, **kw)
    loss.backward()
    return loss.detach(), pred, mask, _grads(model)


# The paper's models (the official models_mae.py factories): patch, width, depth, heads; decoder 512 x 8, 16 heads.
PAPER = {"base": (16, 768, 12, 12), "large": (16, 1024, 24, 16), "huge": (14, 1280, 32, 16)}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_configs_are_the_official_factories(name):
    """Every size of the paper's three models, and LayerNorm eps 1e-6 everywhere (the factories' partial);
    the FLOP count does not see the head counts, so they are checked here."""
    p, d, depth, heads = PAPER[name]
    with torch.device("meta"):
        m = create_model(name)
    assert m.patch_embed.proj.kernel_size == (p, p) and m.patch_embed.proj.stride == (p, p)
    assert m.pos_embed.shape == (1, 1 + (224 // p) ** 2, d) and len(m.blocks) == depth
    assert all(b.attn.num_heads == heads and b.mlp.fc1.out_features == 4 * d for b in m.blocks)
    assert m.decoder_embed.in_features == d and m.decoder_embed.out_features == 512 and len(m.decoder_blocks) == 8
    assert all(b.attn.num_heads == 16 and b.mlp.fc1.out_features == 2048 for b in m.decoder_blocks)
    assert m.decoder_pred.out_features == p * p * 3
    eps = {mod.eps for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)}
    assert eps == {1e-6}


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("fused", [False, "block"])
def test_fast_path_equals_official_fp32(norm_pix, fused):
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, norm_pix_loss=norm_pix, fused=fused)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    m.impl = "reference"
    l0, p0, k0, g0 = _run(m, imgs, noise)
    m.impl = "auto"
    for return_pred in (True, False):
        l1, p1, k1, g1 = _run(m, imgs, noise, return_pred=return_pred)
        assert abs(l1.item() - l0.item()) <= 1e-5 * abs(l0.item())
        assert torch.equal(k1, k0)
        if return_pred:
            assert torch.allclose(p1, p0, rtol=1e-5, atol=1e-6)
        else:
            assert p1 is None
        _assert_grads_equal(g1, g0)


@pytest.mark.slow
def test_fast_path_triton_interpreter_equals_official():
    _interpreter_or_skip()
    torch.manual_seed(0)
    cfg = dict(TINY, depth=1)
    m = MaskedAutoencoderViT(**cfg, norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    m.impl = "reference"
    l0, _, k0, g0 = _run(m, imgs, noise)
    m.impl = "triton"
    l1, _, k1, g1 = _run(m, imgs, noise, return_pred=False)
    assert torch.equal(k1, k0)
    assert abs(l1.item() - l0.item()) <= 1e-4 * abs(l0.item())
    _assert_grads_equal(g1, g0, rel=1e-3)


@pytest.mark.parametrize("impl", ["auto", "triton"])
@pytest.mark.parametrize("fused", [False, "block"])
def test_bf16_autocast_within_tolerance(fused, impl):
    """The training step's dtype: loss and every gradient under bf16 autocast within the error-ratio rule
    of the official computation's (bf16 autocast) against its fp32 values. `auto` is the per-op reference
    on the CPU; `triton` runs every Triton kernel (interpreted here: its bf16 dots and roundings patched
    to a GPU's, tests/triton_bf16.py)."""
    if impl == "triton":
        _interpreter_or_skip()
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, norm_pix_loss=True, fused=fused)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    m.impl = "reference"
    l32, _, _, g32 = _run(m, imgs, noise)  # the fp32 oracle
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lref, _, _, gref = _run(m, imgs, noise)
    m.impl = impl
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l1, _, _, g1 = _run(m, imgs, noise, return_pred=False)
    assert l1.dtype == torch.float32 and torch.isfinite(l1)
    assert_error_ratio(l1, lref, l32, torch.bfloat16, "forward", "loss")
    assert set(g1) == set(g32)
    for n in g32:
        assert_error_ratio(g1[n], gref[n], g32[n], torch.bfloat16, "backward", n)


@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16], ids=str)
def test_fast_forward_is_the_official_forward_bit_for_bit(amp):
    """The fast path (fused=False) on the per-op reference backends (what `auto` runs on the CPU) computes
    the official forward's values exactly, also under autocast: the patch embedding rounds the conv
    to the autocast dtype and adds the fp32 pos_embed in fp32, the un-shuffle promotes as the official
    cat/+ do (before 2026-12-05 the bf16 loss differed by ~9e-6). Loss, pred and mask are equal.
    (return_pred=False runs the head on the masked rows only: a GEMM of another shape, whose CPU
    kernels may sum in another order; it is held to the tolerance table elsewhere.)"""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, norm_pix_loss=True)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    out = {}
    for impl in ("reference", "auto"):
        m.impl = impl
        with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            out[impl] = m(imgs, 0.75, noise)
    (l0, p0, k0), (l1, p1, k1) = out["reference"][:3], out["auto"][:3]
    assert torch.equal(l1, l0)
    assert p1.dtype == p0.dtype and torch.equal(p1, p0)
    assert torch.equal(k1, k0)


@pytest.mark.parametrize("amp", [False, True])
def test_model_cast_to_bf16_streams_as_the_official(amp):
    """A model cast to bf16 (`model.bfloat16()`, pos_embed too): the official residual stream is then
    bf16, also under autocast (`x + pos_embed` and torch.cat promote nothing); the fast path takes the
    same dtypes (under CPU autocast it fed an fp32 stream to the bf16 LayerNorm, which raised) and
    predicts the official values bit for bit. (The loss: the official computes it in bf16, maefast's in
    fp32 from the same pred.)"""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY).bfloat16()
    imgs, noise = torch.randn(2, 3, 32, 32).bfloat16(), torch.rand(2, 16)
    out = {}
    for impl in ("reference", "auto"):
        m.impl = impl
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out[impl] = m(imgs, 0.75, noise)
    (l0, p0, k0), (l1, p1, k1) = out["reference"][:3], out["auto"][:3]
    assert p1.dtype == p0.dtype == torch.bfloat16 and torch.equal(p1, p0)
    assert torch.equal(k1, k0)
    assert abs(l1.item() - l0.item()) <= 4e-3 * abs(l0.item())


@pytest.mark.parametrize("fused", [False, "block"])
def test_fp16_gradscaler_no_nan(fused):
    """fp16 autocast + GradScaler at the official initial scale: every step's gradients are finite (the
    scaler skips a step with inf/NaN gradients silently and halves its scale, so finite weights alone
    prove nothing) and every step updates the weights."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, norm_pix_loss=True, fused=fused)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}  # not the sin-cos tables
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            loss, _, _ = m(torch.randn(2, 3, 32, 32), return_pred=False)
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() == 2.0 ** 16  # no step skipped for inf/NaN gradients
    assert all(torch.isfinite(p).all() for p in m.parameters())
    moved = [n for n, p in m.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before), sorted(set(before) - set(moved))


@pytest.mark.parametrize("fused", [False, "block"])
def test_grad_checkpointing_same_mask_and_grads(fused):
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, fused=fused)
    imgs = torch.randn(2, 3, 32, 32)
    l0, _, k0, g0 = _run(m, imgs, None, seed=123)
    m.grad_checkpointing = True
    l1, _, k1, g1 = _run(m, imgs, None, seed=123)
    assert torch.equal(k0, k1) and l0.item() == l1.item()
    _assert_grads_equal(g1, g0, rel=1e-6)


@pytest.mark.parametrize("setting", [("grad_checkpointing", True), ("fused", "block")])
def test_fast_path_settings_with_the_reference_impl_are_refused(setting):
    """impl="reference" runs the official forward as it is: grad_checkpointing=True checkpointed nothing and
    fused="block" fused nothing, silently. Both refused when given with it (built, maefast.patch: as the CLI
    refuses --impl reference with either); set later, grad_checkpointing is refused per call, while a fused
    model switched to impl="reference" runs the official forward (how one compares with it)."""
    import maefast

    name, value = setting
    msg = f"{name}={value!r} .* impl='reference'"
    with pytest.raises(ValueError, match=msg):
        MaskedAutoencoderViT(**TINY, impl="reference", **{name: value})
    with pytest.raises(ValueError, match=msg):
        maefast.patch(MaskedAutoencoderViT(**TINY), impl="reference", **{name: value})
    m = MaskedAutoencoderViT(**TINY, **{name: value})
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    m.impl = "reference"
    if name == "grad_checkpointing":
        with pytest.raises(ValueError, match=msg):
            m(imgs, noise=noise)
    else:
        setattr(m, name, False)
        want = m(imgs, noise=noise)[0]
        setattr(m, name, value)
        assert torch.equal(m(imgs, noise=noise)[0], want)
    assert maefast.patch(m, impl="auto", **{name: value}).impl == "auto"


def test_return_pred_false_gives_no_pred_with_the_reference_impl_too():
    """README: return_pred=False gives pred None. Every route honoured it (fast path, the original forward of a
    call the fast path declines, a patched official model) but impl="reference", which returned pred; and a
    non-bool there was taken silently. Same loss and mask either way."""
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    for impl in ("reference", "auto"):
        m = MaskedAutoencoderViT(**TINY, impl=impl)
        loss0, pred0, mask0 = m(imgs, noise=noise)
        loss, pred, mask = m(imgs, noise=noise, return_pred=False)
        assert pred0 is not None and pred is None, impl
        assert loss.item() == loss0.item() and torch.equal(mask, mask0), impl
        with pytest.raises(TypeError, match="return_pred"):
            m(imgs, noise=noise, return_pred="no")


def test_seed_reproducible_and_default_draw_follows_manual_seed():
    m = MaskedAutoencoderViT(**TINY)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = m(imgs, seed=7)[2]
        b = m(imgs, seed=7)[2]
        c = m(imgs, seed=8)[2]
        torch.manual_seed(5)
        d = m(imgs)[2]
        torch.manual_seed(5)
        e = m(imgs)[2]
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(d, e)
    with pytest.raises(ValueError, match="seed needs the fused path"):
        MaskedAutoencoderViT(**TINY, impl="reference")(imgs, seed=1)


def test_state_dict_round_trips():
    pytest.importorskip("transformers")
    from maefast.convert import from_transformers_model, load_official_state_dict, to_transformers_model

    official = ReferenceMAE(**TINY)
    ours = MaskedAutoencoderViT(**TINY)
    load_official_state_dict(ours, official.state_dict())
    assert list(ours.state_dict()) == list(official.state_dict())
    back = ReferenceMAE(**TINY)
    load_official_state_dict(back, ours.state_dict())
    for k, v in official.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    hf = to_transformers_model(official)
    mid = from_transformers_model(hf)
    assert isinstance(mid, MaskedAutoencoderViT)
    hf2 = to_transformers_model(mid)
    for k, v in hf.state_dict().items():
        assert torch.equal(hf2.state_dict()[k], v), k


def test_compile_fullgraph_native_and_patched():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    l0 = m(imgs, noise=noise, return_pred=False)[0]
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    l1 = cm(imgs, noise=noise, return_pred=False)[0]
    l1.backward()
    assert torch.allclose(l0, l1, rtol=1e-5)
    ref = maefast.patch(ReferenceMAE(**TINY))
    cr = torch.compile(ref, fullgraph=True, backend="aot_eager")
    assert torch.isfinite(cr(imgs, noise=noise)[0])
    # the whole-block op traces as one opaque node too
    torch._dynamo.reset()
    mb = MaskedAutoencoderViT(**TINY, fused="block")
    mb.load_state_dict(m.state_dict())
    lb = torch.compile(mb, fullgraph=True, backend="aot_eager")(imgs, noise=noise, return_pred=False)[0]
    lb.backward()
    assert torch.allclose(lb, l0, rtol=1e-5) and mb.blocks[0].mlp.fc1.weight.grad is not None


@pytest.mark.parametrize("ratio", [0.0, 0.94, 1.0])
def test_mask_ratios_only_the_official_code_takes_run_its_forward(ratio):
    # 0 (features from forward_encoder(imgs, 0.0)) and a ratio keeping no patch: the official code runs
    # them, maefast's fast path keeps one patch at least, so the call runs the official computation.
    # 0.94 keeps floor(16 * 0.06) = 0 of the L = 16 patches, but would keep one of L + 1 = 17 (the
    # pos_embed rows, cls included): the rule counts the patches only
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY)
    ref = ReferenceMAE(**TINY)
    ref.load_state_dict(m.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)

    routing._WARNED.clear()  # one warning per reason and process
    with pytest.warns(routing.SlowPathWarning, match="fast path's rule"):
        loss, pred, mask = m(imgs, ratio, noise)
    want = ref(imgs, ratio, noise)
    assert torch.equal(mask, want[2]) and torch.equal(pred, want[1])
    assert torch.equal(loss, want[0]) or (loss.isnan() and want[0].isnan())  # ratio 0: 0/0, as the official
    latent, mask, _ = m.forward_encoder(imgs, ratio, noise)
    assert latent.shape == (2, 1 + (16 if ratio == 0 else 0), TINY["embed_dim"])


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("ratio", [torch.tensor(0.75), None])
def test_a_mask_ratio_that_is_not_a_number_is_one_type_error(impl, ratio):
    """maefast's own class: its original forward (the reference) takes a Python number only, so a tensor or
    None is refused up front with one TypeError, not a SlowPathWarning (running the original) and then it."""
    m = create_model("tiny", impl=impl)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="mask_ratio must be a float in"):
            m(torch.randn(2, 3, 32, 32), mask_ratio=ratio)


def test_bad_inputs():
    m = create_model("tiny")
    with pytest.raises(ValueError, match="imgs must be 32x32"):
        m(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="3 channels"):
        m(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match="floating point tensor or uint8"):  # uint8: raw pixels (test_uint8_model)
        m(torch.ones(2, 3, 32, 32, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"mask_ratio must be in the interval \[0, 1\]"):
        m(torch.randn(2, 3, 32, 32), mask_ratio=1.5)
    with pytest.raises(TypeError, match="mask_ratio must be a float"):
        m(torch.randn(2, 3, 32, 32), mask_ratio="0.75")
    with pytest.raises(TypeError, match="grad_checkpointing must be True or False, got str"):
        create_model("tiny", grad_checkpointing="no")
    import numpy as np

    assert create_model("tiny", grad_checkpointing=np.True_).grad_checkpointing is True  # numpy's bool is one
    with pytest.raises(ValueError, match=r"mask_ratio must be in the interval \[0, 1\]"):  # whichever forward
        m(torch.randn(2, 3, 32, 32).requires_grad_(), mask_ratio=1.5)  # runs (image gradients: the official)
    with pytest.raises(TypeError, match="return_pred must be True or False"):
        m(torch.randn(2, 3, 32, 32), return_pred="no")
    with pytest.raises(ValueError, match="noise must have shape"):
        m(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 10))
    with pytest.raises(ValueError, match="impl must be one of"):
        create_model("tiny", impl="gpu")
    with pytest.raises(ValueError, match="impl='cuda' is not available"):
        create_model("tiny", impl="cuda")(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="fused must be False or 'block'"):
        create_model("tiny", fused="blocks")
    with pytest.raises(ValueError, match="fused must be False or 'block'"):
        maefast.patch(ReferenceMAE(**TINY), fused=2)
    with pytest.raises(ValueError, match="fused=True .* was removed"):  # a clear word, not a silent other mode
        create_model("tiny", fused=True)
    # errors that named internals (x_vis, a 'device' nobody passed) or came from deep inside
    # float64 weights: maefast's kernels take none, so the official computation runs (it named x_vis)
    from maefast.models.routing import SlowPathWarning

    routing._WARNED.clear()  # one warning per reason and process
    m64, x64 = create_model("tiny").double(), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(2, 16, dtype=torch.float64)
    with pytest.warns(SlowPathWarning, match="float64 weights"):
        got = m64(x64, 0.75, noise)[0]
    m64.impl = "reference"
    assert torch.equal(got, m64(x64, 0.75, noise)[0])
    with pytest.raises(ValueError, match="noise must be on cpu, got meta"):
        m(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 16, device="meta"))
    with pytest.raises(ValueError, match="imgs must be on the model's device cpu, got meta"):
        m(torch.randn(2, 3, 32, 32, device="meta"))


@pytest.mark.parametrize("kw,err,match", [
    (dict(patch_size=0), ValueError, r"patch_size must be > 0, got 0"),
    (dict(img_size=(32, -32)), ValueError, r"img_size must be > 0"),
    (dict(patch_size=2.5), TypeError, "patch_size must be an int or a pair of ints"),
    (dict(embed_dim=0), ValueError, "embed_dim must be an int >= 1"),
    (dict(depth=-1), ValueError, "depth must be an int >= 0"),
    (dict(in_chans=0), ValueError, "in_chans must be an int >= 1"),
    (dict(decoder_num_heads=1.0), ValueError, "decoder_num_heads must be an int >= 1"),
    (dict(mlp_ratio=0), ValueError, "mlp_ratio must be a number > 0"),
    (dict(num_heads=0), ValueError, "num_heads must be an int >= 1"),  # not a ZeroDivisionError from dim % 0
    (dict(mlp_ratio=float("nan")), ValueError, "mlp_ratio must be a number > 0"),  # int(dim * nan) names nothing
    (dict(mlp_ratio=True), ValueError, "mlp_ratio must be a number > 0"),  # a bool is no ratio
])
@pytest.mark.parametrize("cls", [ReferenceMAE, MaskedAutoencoderViT])
def test_bad_configs_name_themselves(cls, kw, err, match):
    with pytest.raises(err, match=match):
        cls(**{**TINY, **kw})


def test_bad_model_name():
    with pytest.raises(TypeError, match="the model name must be a str, got NoneType"):
        create_model(None)
    with pytest.raises(ValueError, match="unknown model 'vit_q'"):
        create_model("vit_q")


@pytest.mark.parametrize("name,want", [("ViT-B/16", "mae_vit_base_patch16"), ("ViT-L/16", "mae_vit_large_patch16"),
                                       ("ViT-H/14", "mae_vit_huge_patch14"), ("vit_h14", "mae_vit_huge_patch14"),
                                       ("mae_vit_huge_patch14_dec512d8b", "mae_vit_huge_patch14")])
def test_the_papers_model_names_resolve(name, want):
    assert resolve_model_name(name) == want
    with pytest.raises(ValueError, match="unknown model 'ViT-H/16'"):
        resolve_model_name("ViT-H/16")  # the paper has no such model: no guessing


GPU_CFG = dict(img_size=224, patch_size=16, embed_dim=256, depth=2, num_heads=4, decoder_embed_dim=128,
               decoder_depth=2, decoder_num_heads=4, norm_pix_loss=True)  # head dims 64 and 32, L = 196


@pytest.fixture
def no_tf32():
    """fp32 oracles on the GPU: cuDNN convolutions (the reference patch embedding) default to TF32."""
    import torch.backends.cudnn as cudnn

    saved = (cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
    yield
    cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["auto", "triton", "cuda"])
def test_gpu_fast_model_equals_official(impl, no_tf32):
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**GPU_CFG).cuda()
    imgs, noise = torch.randn(8, 3, 224, 224, device="cuda"), torch.rand(8, 196, device="cuda")
    _check_impl_equals_official(m, imgs, noise, impl, ("blocks.0.attn.qkv.weight", "decoder_blocks.1.mlp.fc2.weight",
                                                       "patch_embed.proj.weight"))


def _check_impl_equals_official(m, imgs, noise, impl, names):
    """The model at ``impl`` against impl="reference" (the official computation): the same mask, fp32 loss to
    1e-5 and gradients to 1e-4; under bf16 autocast the loss and the gradients of ``names`` within the
    error-ratio rule against the fp32 oracle."""
    m.impl = "reference"
    l0, _, k0, g0 = _run(m, imgs, noise)
    m.impl = impl
    l1, _, k1, g1 = _run(m, imgs, noise, return_pred=False)
    assert torch.equal(k0, k1)
    assert abs(l1.item() - l0.item()) <= 1e-5 * abs(l0.item()), (l1.item(), l0.item())
    _assert_grads_equal(g1, g0, rel=1e-4)
    m.impl = "reference"
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16):
        lr, _, _, gr = _run(m, imgs, noise)
    m.impl = impl
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16):
        lb, _, _, gb = _run(m, imgs, noise, return_pred=False)
    assert_error_ratio(lb, lr, l0, torch.bfloat16, "forward", "loss")
    for n in names:
        assert_error_ratio(gb[n], gr[n], g0[n], torch.bfloat16, "backward", n)


# head dims 64 and 32 (the CUDA C++ attention takes both), 16 patches: small enough for the CPU emulation
EMU_CFG = dict(img_size=64, patch_size=16, embed_dim=128, depth=2, num_heads=2, decoder_embed_dim=64, decoder_depth=1,
               decoder_num_heads=2, norm_pix_loss=True)


@pytest.mark.parametrize("fused", [False, "block"])
@pytest.mark.parametrize("impl", [pytest.param("cuda", marks=pytest.mark.cuda)])  # a card, or tests/cuda_emu
def test_cuda_impl_model_equals_official(impl, fused, device, no_tf32):
    """impl="cuda" through a whole model: masking, patch gather, the attention forward (16-bit: under bf16
    autocast; inside the block op with fused="block"), un-shuffle and loss run their CUDA C++ kernels; fp32
    to 1e-4 of the official, bf16 by the error-ratio rule against the fp32 oracle."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**EMU_CFG, fused=fused).to(device)
    imgs, noise = torch.randn(4, 3, 64, 64, device=device), torch.rand(4, 16, device=device)
    _check_impl_equals_official(m, imgs, noise, impl, ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight",
                                                       "decoder_blocks.0.attn.qkv.weight", "patch_embed.proj.weight",
                                                       "mask_token"))


@pytest.mark.cuda
def test_gpu_block_op_model_equals_official(no_tf32):
    """fused="block" on the card: fp32 grads to 1e-4 of the official, bf16 by the error-ratio rule."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**GPU_CFG, fused="block").cuda()
    imgs, noise = torch.randn(8, 3, 224, 224, device="cuda"), torch.rand(8, 196, device="cuda")
    _check_impl_equals_official(m, imgs, noise, "auto", ("blocks.0.attn.qkv.weight", "blocks.1.norm1.weight",
                                                         "blocks.0.mlp.fc1.bias", "decoder_blocks.1.mlp.fc2.weight",
                                                         "decoder_blocks.0.norm2.bias"))


@pytest.mark.cuda
def test_gpu_patched_transformers_equals_unpatched(no_tf32):
    pytest.importorskip("transformers")
    from maefast.convert import to_transformers_model

    torch.manual_seed(0)
    hf = to_transformers_model(ReferenceMAE(**GPU_CFG)).cuda()
    imgs, noise = torch.randn(4, 3, 224, 224, device="cuda"), torch.rand(4, 196, device="cuda")
    o0 = hf(pixel_values=imgs, noise=noise)
    o0.loss.backward()
    g0 = _grads(hf)
    maefast.patch(hf)
    hf.zero_grad()
    o1 = hf(pixel_values=imgs, noise=noise)
    o1.loss.backward()
    assert abs(o1.loss.item() - o0.loss.item()) <= 1e-5 * abs(o0.loss.item())
    _assert_grads_equal(_grads(hf), g0, rel=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, "block"])
def test_gpu_fast_step_never_syncs_the_host(fused):
    """Forward and backward of the fast model (bf16, int seed and device seed) with torch's sync
    debugging set to raise: no .item(), no implicit device-to-host copy anywhere."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**GPU_CFG, fused=fused).cuda()
    imgs = torch.randn(4, 3, 224, 224, device="cuda")
    dev_seed = torch.tensor([7], device="cuda")
    for seed in (3, dev_seed):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            m(imgs, seed=seed, return_pred=False)[0].backward()  # warm-up: Triton compiles, caches fill
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(imgs, seed=seed, return_pred=False)[0]
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss)


def test_routed_blocks_survive_deepcopy_and_pickle():
    """route_blocks_through_modules (FSDP2 per block) binds each block's forward to the block itself:
    a deep copy trains its own parameters, and the model still pickles."""
    import copy
    import pickle

    from maefast.models.fast import route_blocks_through_modules

    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, fused="block")
    route_blocks_through_modules(m)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    m2 = copy.deepcopy(m)
    m2(imgs, noise=noise, return_pred=False)[0].backward()
    assert m2.blocks[0].mlp.fc1.weight.grad is not None and m.blocks[0].mlp.fc1.weight.grad is None
    m3 = pickle.loads(pickle.dumps(m))
    l3 = m3(imgs, noise=noise, return_pred=False)[0]
    l0 = MaskedAutoencoderViT(**TINY, fused="block")
    l0.load_state_dict(m.state_dict())
    assert torch.allclose(l3, l0(imgs, noise=noise, return_pred=False)[0])
    m.impl = "reference"  # the routed blocks still run as official blocks on the reference path
    assert torch.isfinite(m(imgs, noise=noise)[0])


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "original forward"])
def test_noise_and_seed_together_are_refused_on_either_path(slow):
    """noise= and seed= together are refused whichever forward the call runs: the original forward
    (images that require a gradient) must not silently replace the given noise by the seed's."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY)
    imgs, noise = torch.randn(2, 3, 32, 32).requires_grad_(slow), torch.rand(2, 16)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="pass either noise or seed, not both"):
        warnings.simplefilter("ignore", routing.SlowPathWarning)
        m(imgs, 0.75, noise, seed=3)


@pytest.mark.parametrize("factory,name", [("mae_vit_base_patch16", "base"), ("mae_vit_large_patch16", "large"),
                                          ("mae_vit_huge_patch14", "huge"),
                                          ("mae_vit_base_patch16_dec512d8b", "base"),
                                          ("mae_vit_large_patch16_dec512d8b", "large"),
                                          ("mae_vit_huge_patch14_dec512d8b", "huge")])
def test_factory_functions_build_their_papers_model(factory, name):
    """The official factory names (models_mae.py's, as a user's `models_mae.__dict__[args.model]` call reaches
    them) build the model they name, and pass keyword arguments on."""
    import maefast.models as models

    p, d, depth, heads = PAPER[name]
    with torch.device("meta"):
        m = getattr(models, factory)(norm_pix_loss=True)
    assert m.patch_embed.proj.kernel_size == (p, p) and m.pos_embed.shape[-1] == d and len(m.blocks) == depth
    assert m.blocks[0].attn.num_heads == heads and m.norm_pix_loss is True
