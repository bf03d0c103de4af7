"""uint8 images into the MAE ops and the model: the masked patch embedding, the norm-pix loss (and the
masked-only head) and the model read raw pixels and normalise them per channel (mean/std, ImageNet's
by default) where they read them. The contract: the same as normalising first (torchvision's
ToTensor + Normalize in fp32, `maefast.reference.normalize`) and running the fp32 path, to the
tolerance table, for every backend (reference, Triton under the interpreter here, the CUDA C++ ones
in the `cuda`-marked tests), fp32 and bf16/fp16 autocast; bad statistics raise naming the argument."""
import pytest
import torch

from maefast import reference as R
from maefast._triton import HAS_TRITON
from maefast.models import MaskedAutoencoderViT
from maefast.nn import MaskedPatchEmbed, NormPixLoss
from maefast.ops import masked_patch_embed, masked_prediction_loss, norm_pix_loss, random_masking
from maefast.ops._pixels import pixel_affine
from maefast.reference.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize
from maefast.testing import assert_close, assert_error_ratio, assert_grad_close, randn

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
IMPLS = ["reference", pytest.param("triton", marks=needs_triton)]
# tests on the `device` fixture also run the CUDA C++ kernels: on a card, or without one under the CPU
# emulation (tests/cuda_emu)
DEVICE_IMPLS = IMPLS + [pytest.param("cuda", marks=pytest.mark.cuda)]
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


def _pixels(*shape, device="cpu"):
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)


def _stats(c, kind="imagenet"):
    """ImageNet's for 3 channels (also passed as None), else fresh per-channel statistics."""
    if kind == "imagenet" and c == 3:
        return IMAGENET
    return (tuple((torch.rand(c) * 0.6 + 0.2).tolist()), tuple((torch.rand(c) * 0.3 + 0.1).tolist()))


def _kw(stats):
    return {} if stats is IMAGENET else dict(mean=stats[0], std=stats[1])


def _autocast(mode, device):
    dt = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    return torch.autocast(torch.device(device).type, dtype=dt, enabled=dt is not None), dt or torch.float32


# -- the normalisation itself ---------------------------------------------------------------------

def test_normalize_is_totensor_then_normalize():
    u = _pixels(2, 3, 8, 8)
    m = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)
    want = u.to(torch.float32).div(255).sub(m).div(s)  # torchvision's ToTensor, then Normalize's tensor ops
    assert torch.equal(normalize(u, IMAGENET_MEAN, IMAGENET_STD), want)


def test_folded_affine_rounding():
    """What maefast/ops/_pixels.py states: the kernels' (v - offset) * scale is within 4.8e-7 of the
    official three-step fp32 normalisation for every value of every ImageNet channel; both are within
    2.6e-7 of the exact value and within 3.4e-8 near 0 (where norm_pix amplifies errors); they round to
    the same bf16/fp16 value."""
    scale, offset = pixel_affine(IMAGENET)
    assert scale[3] == 1.0 and offset[3] == 0.0  # padded to 4 channels
    assert all(torch.tensor(v).item() == v for v in scale + offset)  # fp32 values
    v = torch.arange(256, dtype=torch.float32).reshape(1, 1, 256, 1).expand(1, 3, 256, 1)
    official = normalize(v.to(torch.uint8), *IMAGENET)
    folded = (v - torch.tensor(offset[:3]).reshape(1, 3, 1, 1)) * torch.tensor(scale[:3]).reshape(1, 3, 1, 1)
    assert (folded - official).abs().max() <= 4.8e-7
    m, s = (torch.tensor(t).double().reshape(1, 3, 1, 1) for t in IMAGENET)  # the fp32 values Normalize uses
    exact = (v.double() / 255 - m) / s
    near0 = exact.abs() < 0.05
    for x in (folded, official):
        err = (x.double() - exact).abs()
        assert err.max() <= 2.6e-7 and err[near0].max() <= 3.4e-8
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(folded.to(dt), official.to(dt))


# -- masked patch embedding --------------------------------------------------------------------------

# (N, C, H, W, p, D, mask_ratio, stats): p8 / p14 (odd L), a 224 ViT-B/16 grid, grey and RGBA with own stats.
EMBED_CASES = [(2, 3, 32, 32, 8, 64, 0.75, "imagenet"), (3, 3, 28, 42, 14, 48, 0.75, "own"),
               (1, 3, 224, 224, 16, 64, 0.75, "imagenet"), (2, 1, 20, 12, 4, 40, 0.9, "own"),
               (2, 4, 16, 24, 8, 32, 0.5, "own")]


def _embed_both(impl, case, mode, device, layout="nchw"):
    """((out, grads) from the uint8 images, the same from the images normalised first), one upstream grad."""
    N, C, H, W, p, D, ratio, kind = case
    stats = _stats(C, kind)
    u = _pixels(N, C, H, W + 4, device=device)
    u = u[..., 2:2 + W] if layout == "sliced" else u[..., :W].contiguous()
    if layout == "channels_last":
        u = u.contiguous(memory_format=torch.channels_last)
    L = (H // p) * (W // p)
    ids = random_masking(N, L, ratio, seed=int(torch.randint(0, 2 ** 31, (1,))), device=device).ids_keep
    params = (randn(D, C, p, p, device=device, scale=(C * p * p) ** -0.5), randn(D, device=device),
              randn(1, 1 + L, D, device=device))
    ctx, dt = _autocast(mode, device)
    g = randn(N, ids.shape[1], D, dtype=dt, device=device)
    res = []
    for imgs, kw in ((u, _kw(stats)), (normalize(u, *stats), {})):
        leaves = [t.clone().requires_grad_() for t in params]
        with ctx:
            out = masked_patch_embed(imgs, ids, *leaves, p, impl=impl, **kw)
        out.backward(g)
        res.append((out, [t.grad for t in leaves]))
    return res, (u, ids, params, stats)


def _check_embed(res, dt):
    """dt: the GEMM's dtype (the tolerance); the tokens are fp32, the fp32 pos_embed added in fp32."""
    (out, grads), (want, want_grads) = res
    assert out.dtype == want.dtype == torch.float32
    assert_close(out, want, dt, name="tokens")
    for name, a, b in zip(("weight", "bias", "pos_embed"), grads, want_grads):
        assert_close(a, b, dt, name=f"grad {name}")


def test_pixel_affine_is_cached_by_value():
    """Every op call asks for the factors: one computation per statistics (before: CPU tensors built
    on every call, ~15 us), the same immutable value for equal statistics in any sequence type."""
    a = pixel_affine(IMAGENET)
    assert pixel_affine((list(IMAGENET[0]), list(IMAGENET[1]))) is a
    assert isinstance(a[0], tuple) and isinstance(a[1], tuple)
    fp32 = torch.tensor(1 / 63.75, dtype=torch.float32).item()  # 1 / (255 * 0.25), rounded once to fp32
    assert pixel_affine(((0.5,), (0.25,))) == ((fp32, 1.0, 1.0, 1.0), (127.5, 0.0, 0.0, 0.0))


@needs_triton
def test_triton_launchers_refuse_uint8_without_dtype_or_affine(device):
    """The raw launchers cannot know the weight's dtype or the normalisation of uint8 images: before,
    dtype=None cast the gradient to uint8 and affine=None read raw pixels, silently."""
    from maefast.kernels.patch_embed import masked_patch_embed_bwd_triton, masked_patch_embed_fwd_triton

    imgs = _pixels(2, 3, 16, 16, device=device)
    ids = random_masking(2, 4, 0.5, seed=1, device=device).ids_keep
    grad, w = randn(2, 2, 8, device=device), randn(8, 3, 8, 8, device=device)
    affine = pixel_affine(IMAGENET)
    with pytest.raises(ValueError, match="dtype="):
        masked_patch_embed_bwd_triton(grad, imgs, ids, 8, 8, True, False, affine=affine)
    with pytest.raises(ValueError, match="affine="):
        masked_patch_embed_bwd_triton(grad, imgs, ids, 8, 8, True, False, torch.float32)
    with pytest.raises(ValueError, match="affine="):
        masked_patch_embed_fwd_triton(imgs, ids, w, None, None, 8)
    dw, _ = masked_patch_embed_bwd_triton(grad, imgs, ids, 8, 8, True, False, torch.float32, affine)
    ref, _ = masked_patch_embed_bwd_triton(grad, normalize(imgs, *IMAGENET), ids, 8, 8, True, False)
    assert dw.dtype == torch.float32 and torch.isfinite(dw).all()
    assert_close(dw, ref, torch.float32, name="dW")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", EMBED_CASES, ids=lambda c: "x".join(map(str, c[:7])) + c[7])
def test_embed_equals_normalise_first(impl, case, mode, device):
    res, (u, ids, (w, b, pos), stats) = _embed_both(impl, case, mode, device)
    _check_embed(res, _autocast(mode, device)[1])
    if impl == "reference" and mode == "fp32":  # the definition, bit for bit
        assert torch.equal(res[0][0], R.masked_patch_embed(normalize(u, *stats), ids, w, b, pos, case[4]))


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_embed_strided_uint8(impl, layout, device):
    res, _ = _embed_both(impl, (2, 3, 24, 32, 8, 32, 0.5, "own"), "fp32", device, layout)
    _check_embed(res, torch.float32)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_embed_bad_ids_give_nan_rows_and_no_gradient(impl, device):
    """The unchecked-ids contract (NaN row, no weight/pos gradient) holds for uint8 images too: the
    normalisation of a masked-out pixel is not a zero, and must not leak into the gradients."""
    u = _pixels(2, 3, 16, 16, device=device)
    ids = torch.tensor([[0, 3], [1, 2]], device=device)
    w, b, pos = (randn(8, 3, 8, 8, device=device).requires_grad_(), randn(8, device=device),
                 randn(1, 5, 8, device=device).requires_grad_())
    from maefast.ops.patch_embed import _masked_patch_embed_op
    bad = ids.clone()
    bad[1, 0] = 9
    out = _masked_patch_embed_op._maefast_impl(u, bad, w, b, pos, 8, impl, list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert torch.isnan(out[1, 0]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[1, 1]).all()
    from maefast.ops.patch_embed import _masked_patch_embed_backward_op
    g = randn(2, 2, 8, device=device)
    g_bad, g_ok = g.clone(), g.clone()
    g_ok[1, 0] = 0  # the bad row's contribution removed by hand
    dw, _, dpos = _masked_patch_embed_backward_op._maefast_impl(g_bad, u, bad, w, pos, 8, True, impl,
                                                                 list(IMAGENET_MEAN), list(IMAGENET_STD))
    dw0, _, dpos0 = _masked_patch_embed_backward_op._maefast_impl(g_ok, u, ids, w, pos, 8, True, impl,
                                                                   list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert_close(dw, dw0, torch.float32, name="grad weight")
    assert_close(dpos, dpos0, torch.float32, name="grad pos")


def test_embed_module_and_bf16_weights_outside_autocast():
    torch.manual_seed(3)
    m = MaskedPatchEmbed(img_size=(16, 24), patch_size=8, in_chans=3, embed_dim=16, impl="reference")
    u, pos = _pixels(2, 3, 16, 24), randn(1, 7, 16)
    t8, mask8, r8 = m(u, 0.5, pos_embed=pos, seed=4)
    t, mask, r = m(normalize(u, *IMAGENET), 0.5, pos_embed=pos, seed=4)
    assert torch.equal(t8, t) and torch.equal(mask8, mask) and torch.equal(r8, r)
    m.bfloat16()  # uint8 images are read in the weight's dtype: no autocast needed
    t16, _, _ = m(u, 0.5, pos_embed=pos.bfloat16(), seed=4)
    assert t16.dtype == torch.bfloat16
    assert torch.equal(t16, m(normalize(u, *IMAGENET).bfloat16(), 0.5, pos_embed=pos.bfloat16(), seed=4)[0])
    t32, _, _ = m(u, 0.5, pos_embed=pos, seed=4)  # an fp32 pos_embed: added in fp32, as `x + pos_embed`
    assert t32.dtype == torch.float32
    assert torch.equal(t32, m(normalize(u, *IMAGENET).bfloat16(), 0.5, pos_embed=pos, seed=4)[0])


# -- loss -----------------------------------------------------------------------------------------

# (N, C, H, W, p, mask_ratio, stats)
LOSS_CASES = [(2, 3, 224, 224, 16, 0.75, "imagenet"), (1, 3, 224, 224, 14, 0.75, "own"),
              (3, 3, 32, 48, 8, 0.5, "imagenet"), (5, 1, 16, 16, 4, 0.75, "own"), (2, 4, 16, 24, 8, 0.75, "own")]


def _loss_both(impl, case, pred_on, norm, dtype, device, imgs=None, head=False):
    """((loss, grad pred) from uint8, the same normalised first), and the normalised images."""
    N, C, H, W, p, ratio, kind = case
    stats = _stats(C, kind)
    u = _pixels(N, C, H, W, device=device) if imgs is None else imgs
    x = normalize(u, *stats)
    L = (H // p) * (W // p)
    ids = R.masking_ids(N, L, ratio, noise=torch.rand(N, L, device=device))
    K = ids.ids_keep.shape[1]
    pred = randn(N, L - K if pred_on == "masked" else L, p * p * C, dtype=dtype, device=device).requires_grad_()
    idx = ids.ids_restore if pred_on == "masked" else ids.mask
    dec, wt = randn(N, 1 + L, 16, dtype=dtype, device=device), randn(p * p * C, 16, dtype=dtype, device=device)
    res = []
    for imgs_, kw in ((u, _kw(stats)), (x, {})):
        if head:  # the masked-only prediction head in front of the loss
            w_ = wt.clone().requires_grad_()
            loss = masked_prediction_loss(dec, w_, None, imgs_, ids.ids_restore, K, p, norm_pix=norm, impl=impl, **kw)
            res.append((loss, torch.autograd.grad(loss, w_)[0]))
            continue
        loss = norm_pix_loss(pred, imgs_, idx, p, norm_pix=norm, pred_on=pred_on, impl=impl, **kw)
        res.append((loss, torch.autograd.grad(loss, pred)[0]))
    return res, (pred, idx, x)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("pred_on", ["all", "masked"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "x".join(map(str, c[:6])) + c[6])
def test_loss_equals_normalise_first(impl, case, pred_on, norm, device):
    ((loss8, g8), (loss, g)), (pred, idx, x) = _loss_both(impl, case, pred_on, norm, torch.float32, device)
    assert_close(loss8, loss, torch.float32, name="loss")
    assert_grad_close(g8, g, torch.float32, name="grad pred")
    if impl == "reference":  # the definition, bit for bit
        ref = (R.forward_loss if pred_on == "all" else R.forward_loss_masked)(x, pred.detach(), idx, case[4], norm)
        assert torch.equal(loss8, ref)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_loss_half_pred(impl, pred_on, dtype, device):
    ((loss8, g8), (loss, g)), _ = _loss_both(impl, LOSS_CASES[0], pred_on, True, dtype, device)
    assert g8.dtype == dtype
    assert_close(loss8, loss, torch.float32, name="loss")
    assert_grad_close(g8, g, dtype, name="grad pred")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
def test_masked_prediction_head(impl, norm, device):
    ((loss8, gw8), (loss, gw)), _ = _loss_both(impl, LOSS_CASES[2], "masked", norm, torch.float32, device, head=True)
    assert_close(loss8, loss, torch.float32, name="loss")
    assert_close(gw8, gw, torch.float32, name="grad pred_weight")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_norm_pix_near_constant_patches(impl, pred_on, device):
    """norm_pix divides each patch by its std, which spans the channels: where the normalised channel
    values nearly coincide (these pixels: 0.006, -0.005, 0.008) that std is ~0.006 and fp32 rounding
    of the target is amplified ~170x on both paths. The uint8 path must stay within the error-ratio
    rule of the fp32 path against an fp64 oracle (the normalisation and the loss in float64)."""
    N, C, H, W, p = 3, 3, 32, 32, 8
    u = torch.tensor([124, 116, 104], dtype=torch.uint8, device=device).reshape(1, 3, 1, 1).repeat(N, 1, H, W)
    u = u + (torch.rand(N, C, H, W, device=device) < 0.05).to(torch.uint8)  # a few one-level steps
    ((loss8, g8), (loss, g)), (pred, idx, _) = _loss_both(impl, (N, C, H, W, p, 0.75, "imagenet"), pred_on, True,
                                                          torch.float32, device, imgs=u)
    m = torch.tensor(IMAGENET_MEAN).double().reshape(3, 1, 1).to(device)
    s = torch.tensor(IMAGENET_STD).double().reshape(3, 1, 1).to(device)
    x64 = (u.double() / 255 - m) / s
    p64 = pred.detach().double().requires_grad_()
    loss64 = (R.forward_loss if pred_on == "all" else R.forward_loss_masked)(x64, p64, idx, p, True)
    g64, = torch.autograd.grad(loss64, p64)
    assert_error_ratio(loss8, loss, loss64, torch.float32, "forward", name="loss")
    assert_error_ratio(g8, g, g64, torch.float32, "backward", name="grad pred")


@needs_triton
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_triton_fused_residual_uint8(pred_on, device):
    """The Triton forward that also writes w * (pred - target) (with a gradient to come) normalises
    the same way as the backward kernel that recomputes it."""
    N, p = 4, 8
    u = _pixels(N, 3, 32, 32, device=device)
    ids = R.masking_ids(N, 16, 0.75, noise=torch.rand(N, 16, device=device))
    pred = randn(N, 12 if pred_on == "masked" else 16, 192, device=device)
    idx = ids.ids_restore if pred_on == "masked" else ids.mask
    args = (idx, p, True, pred_on == "masked", "triton")
    stats = (list(IMAGENET_MEAN), list(IMAGENET_STD))
    loss, r = torch.ops.maefast.norm_pix_loss.default(pred, u, *args, True, *stats)
    want = torch.ops.maefast.norm_pix_loss_backward.default(torch.tensor(1.0, device=device), pred, u, *args, *stats)
    den = float(N * 12) if pred_on == "masked" else idx.sum().item()
    assert_close(r * (2.0 / (192 * den)), want, torch.float32, name="residual")
    assert_close(loss, norm_pix_loss(pred, normalize(u, *IMAGENET), idx, p, pred_on=pred_on, impl="triton"),
                 torch.float32, name="loss")


def test_loss_module():
    u = _pixels(2, 3, 16, 16)
    pred, mask = randn(2, 4, 192), R.masking_ids(2, 4, 0.5, noise=torch.rand(2, 4)).mask
    crit = NormPixLoss(8, norm_pix_loss=True)
    own = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert torch.equal(crit(u, pred, mask), crit(normalize(u, *IMAGENET), pred, mask))
    assert torch.equal(crit(u, pred, mask, mean=own[0], std=own[1]), crit(normalize(u, *own), pred, mask))
    # a float64 pred takes the official ops in float64, on the images normalised first (as their fp32 images do)
    pred64 = pred.double()
    assert torch.equal(crit(u, pred64, mask), crit(normalize(u, *IMAGENET), pred64, mask))
    assert torch.equal(crit(u, pred64, mask, mean=own[0], std=own[1]), crit(normalize(u, *own), pred64, mask))


# -- custom ops: opcheck, compile, meta -----------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    u = _pixels(2, 3, 16, 24)
    L = 6
    ids = random_masking(2, L, 0.5, seed=3).ids_keep
    w, b, pos = randn(16, 3, 8, 8, scale=0.05), randn(16), randn(1, 1 + L, 16)
    st = [list(IMAGENET_MEAN), list(IMAGENET_STD)]
    for p_ in (w, b, pos):
        p_.requires_grad_()
    torch.library.opcheck(torch.ops.maefast.masked_patch_embed.default, (u, ids, w, b, pos, 8, impl, *st))
    torch.library.opcheck(torch.ops.maefast.masked_patch_embed_backward.default,
                          (randn(2, 3, 16), u, ids, w.detach(), pos.detach(), 8, True, impl, *st))
    masking = R.masking_ids(2, L, 0.5, noise=torch.rand(2, L))
    for masked, pred, idx in ((False, randn(2, L, 192), masking.mask), (True, randn(2, 3, 192), masking.ids_restore)):
        for with_grad in (False, True):
            torch.library.opcheck(torch.ops.maefast.norm_pix_loss.default,
                                  (pred.requires_grad_(), u, idx, 8, True, masked, impl, with_grad, *st))
        torch.library.opcheck(torch.ops.maefast.norm_pix_loss_backward.default,
                              (torch.tensor(1.5), pred.detach(), u, idx, 8, True, masked, impl, *st))


def test_compile_fullgraph():
    torch.manual_seed(0)
    u = _pixels(2, 3, 16, 24)
    ids = random_masking(2, 6, 0.5, seed=3)
    w, b, pos = randn(16, 3, 8, 8, scale=0.05).requires_grad_(), randn(16), randn(1, 7, 16)
    own = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))

    def f(u, w):
        tok = masked_patch_embed(u, ids.ids_keep, w, b, pos, 8, impl="reference", mean=own[0], std=own[1])
        pred = tok.sum(-1, keepdim=True).expand(-1, -1, 192)
        return norm_pix_loss(pred, u, ids.ids_restore, 8, pred_on="masked", impl="reference", mean=own[0],
                             std=own[1])

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(u, w)
    want = f(u, w)
    assert_close(got, want, torch.float32)
    assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w)[0], torch.float32)


@pytest.mark.parametrize("impl", ["auto", "triton", "cuda"])
@pytest.mark.no_triton_launch  # a refusal / meta tensors: no kernel runs
def test_meta(impl):
    m = dict(device="meta")
    u = torch.empty(2, 3, 16, 24, dtype=torch.uint8, **m)
    ids = random_masking(2, 6, 0.5, device="meta", impl=impl)
    w = torch.empty(16, 3, 8, 8, dtype=torch.bfloat16, **m).requires_grad_()
    tok = masked_patch_embed(u, ids.ids_keep, w, None, None, 8, impl=impl)
    assert tok.shape == (2, 3, 16) and tok.dtype == torch.bfloat16 and tok.device.type == "meta"
    pred = torch.empty(2, 6, 192, **m).requires_grad_()
    loss = norm_pix_loss(pred, u, ids.mask, 8, impl=impl)
    (loss + tok.float().sum()).backward()
    assert loss.shape == () and pred.grad.shape == pred.shape and w.grad.dtype == torch.bfloat16


# -- bad inputs -----------------------------------------------------------------------------------

BAD_INPUTS = [
    (dict(mean=(0.5, 0.5), std=(0.2, 0.2, 0.2)), ValueError, r"mean must have 3 values \(one per channel of imgs"),
    (dict(mean=(0.5,) * 3, std=(0.2,) * 4), ValueError, "std must have 3 values"),
    (dict(mean=(0.5,) * 3, std=(0.2, 0.0, 0.2)), ValueError, "std must be > 0"),
    (dict(mean=(0.5,) * 3, std=(0.2, -1, 0.2)), ValueError, "std must be > 0"),
    (dict(mean=(0.5, float("nan"), 0.5), std=(0.2,) * 3), ValueError, "mean must be finite"),
    (dict(mean=(0.5,) * 3), ValueError, "std must be given with mean"),
    (dict(std=(0.2,) * 3), ValueError, "mean must be given with std"),
    (dict(mean="rgb", std=(0.2,) * 3), TypeError, "mean must be a sequence of 3 floats"),
    (dict(mean=torch.tensor([0.5] * 3), std=(0.2,) * 3), TypeError, "mean must be a sequence"),
    (dict(mean=(True, 0.5, 0.5), std=(0.2,) * 3), TypeError, "mean must hold real numbers"),
    (dict(imgs="float", mean=(0.5,) * 3, std=(0.2,) * 3), ValueError, "taken as already normalised"),
    (dict(imgs="int16"), TypeError, "floating point tensor or uint8"),
    (dict(imgs="grey"), ValueError, "with 1 channels need mean= and std="),
    (dict(imgs="5ch", impl="triton", mean=(0.5,) * 5, std=(0.2,) * 5), ValueError,
     "impl='triton' is not available .* uint8 imgs with 5 channels"),
]


# The model is built for 3 channels and says so first: grey and 5-channel images are no case for it.
@pytest.mark.parametrize("op,kw,exc,match", [
    pytest.param(op, kw, exc, match, id=f"{op}-kw{i}-{exc.__name__}-{match}")
    for op in ("embed", "loss", "head", "model") for i, (kw, exc, match) in enumerate(BAD_INPUTS)
    if not (op == "model" and kw.get("imgs") in ("grey", "5ch"))])
def test_bad_inputs_name_the_argument(op, kw, exc, match):
    kw = dict(kw)
    kind = kw.pop("imgs", "uint8")
    impl = kw.pop("impl", "auto")
    c = {"grey": 1, "5ch": 5}.get(kind, 3)
    u = _pixels(2, c, 16, 16)
    imgs = {"float": normalize(_pixels(2, 3, 16, 16), *IMAGENET), "int16": u.to(torch.int16)}.get(kind, u)
    if op == "model":
        run = lambda: MaskedAutoencoderViT(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,  # noqa: E731
                                           decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                           impl=impl)(imgs, **kw)
    elif op == "embed":
        ids = random_masking(2, 4, 0.5, seed=1).ids_keep
        run = lambda: masked_patch_embed(imgs, ids, randn(8, c, 8, 8), None, None, 8, impl=impl, **kw)  # noqa: E731
    elif op == "loss":
        mask = R.masking_ids(2, 4, 0.5, noise=torch.rand(2, 4)).mask
        run = lambda: norm_pix_loss(randn(2, 4, 64 * c), imgs, mask, 8, impl=impl, **kw)  # noqa: E731
    else:
        ids = R.masking_ids(2, 4, 0.5, noise=torch.rand(2, 4))
        run = lambda: masked_prediction_loss(randn(2, 5, 16), randn(64 * c, 16), None, imgs,  # noqa: E731
                                             ids.ids_restore, 2, 8, impl=impl, **kw)
    with pytest.raises(exc, match=match):
        run()


def test_five_channels_take_the_reference_under_auto():
    own = (tuple([0.5] * 5), tuple([0.25] * 5))
    u = _pixels(2, 5, 16, 16)
    ids = random_masking(2, 4, 0.5, seed=1).ids_keep
    w = randn(8, 5, 8, 8)
    assert torch.equal(masked_patch_embed(u, ids, w, None, None, 8, mean=own[0], std=own[1]),
                       masked_patch_embed(normalize(u, *own), ids, w, None, None, 8))


def test_float64_weight_takes_the_reference_under_auto_and_is_refused_by_a_kernel(device):
    """uint8 imgs are normalised into the weight's dtype; the kernels write fp32/fp16/bf16 only (the CUDA
    C++ route failed with a bare KeyError for a float64 weight). On the kernels' device: with a GPU, CPU
    tensors would be refused by the backend's device check before the dtype is looked at."""
    u = _pixels(2, 3, 16, 16, device=device)
    ids = random_masking(2, 4, 0.5, seed=1, device=device).ids_keep
    w = randn(8, 3, 8, 8, device=device).double()
    want = masked_patch_embed(normalize(u, *IMAGENET).double(), ids, w, None, None, 8, impl="reference")
    assert torch.equal(masked_patch_embed(u, ids, w, None, None, 8), want)
    for impl in ("triton", "cuda"):
        with pytest.raises(ValueError, match="float64" if impl == "triton" or _has_cuda_kernels() else impl):
            masked_patch_embed(u, ids, w, None, None, 8, impl=impl)


def _has_cuda_kernels() -> bool:
    from maefast._cpp_lib import get_C

    return torch.cuda.is_available() and get_C() is not None


def test_every_backend_gets_int64_ids_under_compile(monkeypatch):
    """An int32 ids_keep is refused by the public function, eagerly and (since 2026-12-05) under
    torch.compile; one that reaches the custom op itself (torch.ops.maefast.masked_patch_embed, traced)
    is handed to every backend as int64 (the CUDA C++ gathers read int64; an int32 buffer read as int64
    merged two ids and read past its end)."""
    import maefast.ops.patch_embed as pe

    seen = []

    def fake_forward_cuda(imgs, ids_keep, weight, bias, pos_embed, p, affine):
        seen.append(ids_keep.dtype)
        return weight.new_zeros(ids_keep.shape[0], ids_keep.shape[1], weight.shape[0])

    monkeypatch.setattr(pe, "_resolve", lambda *a: "cuda")
    monkeypatch.setattr(pe, "_forward_cuda", fake_forward_cuda)
    u = _pixels(2, 3, 16, 16)
    ids = random_masking(2, 4, 0.5, seed=1).ids_keep.to(torch.int32)
    w = randn(8, 3, 8, 8)
    torch._dynamo.reset()
    public = torch.compile(lambda u, i: masked_patch_embed(u, i, w, None, None, 8, impl="cuda"), backend="aot_eager",
                           fullgraph=True)
    with pytest.raises(Exception, match=r"ids_keep must have dtype in \(int64\), got int32"):
        public(u, ids)
    assert seen == []
    torch._dynamo.reset()
    op = torch.compile(lambda u, i: torch.ops.maefast.masked_patch_embed(u, i, w, None, None, 8, "cuda"),
                       backend="aot_eager", fullgraph=True)
    op(u, ids)
    assert seen == [torch.int64]


def test_cuda_bindings_check_the_channels():
    """maefast._C refuses uint8 images it cannot normalise, before any CUDA call (host code: runs
    without a GPU when the extension is built)."""
    from maefast._cpp_lib import get_C

    C = get_C()
    if C is None or not hasattr(C, "patch_gather_normalize"):
        pytest.skip("maefast._C is not built")
    one = [1.0] * 5
    with pytest.raises(ValueError, match="1 to 4 channels"):
        C.patch_gather_normalize(16, 1, 1, 1, 1, 16, 1, 1, 5, 8, 2, 2, one, one, 0, 16, 0)
    with pytest.raises(ValueError, match="a scale and offset per channel"):
        C.patch_gather_normalize(16, 1, 1, 1, 1, 16, 1, 1, 3, 8, 2, 2, one[:2], one[:2], 0, 16, 0)
    with pytest.raises(ValueError, match="out dtype code"):
        C.patch_gather_normalize(16, 1, 1, 1, 1, 16, 1, 1, 3, 8, 2, 2, one, one, 3, 16, 0)
    with pytest.raises(ValueError, match="1 to 4 channels"):
        C.norm_pix_loss_fwd(16, 16, 16, 16, 1, 4, 2, 0, 4, 5, 8, 1, 1, 1, 1, 1, 1, 1, 1, 1, True, False, 0, 3,
                            one, one, 0)
