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
from maefast.testing import assert_close, assert_error_ratio, randn, tol

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
IMPLS = ["reference", pytest.param("triton", marks=needs_triton)]
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
    u = _pixels(N, C, H, W + 4, device=device)[..., 2:2 + W] if layout == "sliced" else _pixels(N, C, H, W, device=device)
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
    (out, grads), (want, want_grads) = res
    assert out.dtype == want.dtype == dt
    assert_close(out, want, dt, name="tokens")
    for name, a, b in zip(("weight", "bias", "pos_embed"), grads, want_grads):
        assert_close(a, b, dt, name=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", EMBED_CASES, ids=lambda c: "x".join(map(str, c[:7])) + c[7])
def test_embed_equals_normalise_first(impl, case, mode, device):
    if device.type == "cpu" and (mode == "bf16" and impl == "triton" or mode == "fp16" and impl == "reference"):
        pytest.skip("the interpreter's bf16 tl.dot is wrong; fp16 conv on the CPU is slow (both on the GPU)")
    if device.type == "cpu" and mode == "fp16" and case[3] > 64:
        pytest.skip("fp16 under the interpreter at 224 px is slow; covered on the GPU")
    res, (u, ids, (w, b, pos), stats) = _embed_both(impl, case, mode, device)
    _check_embed(res, _autocast(mode, device)[1])
    if impl == "reference" and mode == "fp32":  # the definition, bit for bit
        assert torch.equal(res[0][0], R.masked_patch_embed(normalize(u, *stats), ids, w, b, pos, case[4]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_embed_strided_uint8(impl, layout, device):
    res, _ = _embed_both(impl, (2, 3, 24, 32, 8, 32, 0.5, "own"), "fp32", device, layout)
    _check_embed(res, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
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
    t16, _, _ = m(u, 0.5, pos_embed=pos, seed=4)
    assert t16.dtype == torch.bfloat16
    assert torch.equal(t16, m(normalize(u, *IMAGENET).bfloat16(), 0.5, pos_embed=pos, seed=4)[0])


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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("pred_on", ["all", "masked"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "x".join(map(str, c[:6])) + c[6])
def test_loss_equals_normalise_first(impl, case, pred_on, norm, device):
    ((loss8, g8), (loss, g)), (pred, idx, x) = _loss_both(impl, case, pred_on, norm, torch.float32, device)
    assert_close(loss8, loss, torch.float32, name="loss")
    assert_close(g8, g, torch.float32, name="grad pred")
    if impl == "reference":  # the definition, bit for bit
        ref = (R.forward_loss if pred_on == "all" else R.forward_loss_masked)(x, pred.detach(), idx, case[4], norm)
        assert torch.equal(loss8, ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_loss_half_pred(impl, pred_on, dtype, device):
    ((loss8, g8), (loss, g)), _ = _loss_both(impl, LOSS_CASES[0], pred_on, True, dtype, device)
    assert g8.dtype == dtype
    assert_close(loss8, loss, torch.float32, name="loss")
    assert_close(g8, g, dtype, name="grad pred")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
def test_masked_prediction_head(impl, norm, device):
    ((loss8, gw8), (loss, gw)), _ = _loss_both(impl, LOSS_CASES[2], "masked", norm, torch.float32, device, head=True)
    assert_close(loss8, loss, torch.float32, name="loss")
    assert_close(gw8, gw, torch.float32, name="grad pred_weight")


@pytest.mark.parametrize("impl", IMPLS)
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
