"""maefast.ops.norm_pix_loss / masked_prediction_loss / maefast.nn.NormPixLoss: equality with the
official loss (value and grad of pred) for pred on all patches and on masked patches only, paper and
odd shapes, dtypes, zero-variance patches, NaN/Inf propagation, the masked-only head against the
official model's gradients, the custom op (opcheck, torch.compile), determinism and bad inputs.
The CUDA C++ impl runs in cuda-marked tests."""
import pytest
import torch

from maefast import reference as R
from maefast._triton import HAS_TRITON
from maefast.nn import NormPixLoss
from maefast.ops import masked_patch_ids, masked_prediction_loss, norm_pix_loss, unshuffle
from maefast.testing import DTYPES, assert_close, assert_error_ratio, assert_grad_close

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
IMPLS = [pytest.param("triton", marks=needs_triton), "reference"]
# tests on the `device` fixture also run the CUDA C++ kernels: on a card, or without one under the CPU
# emulation (tests/cuda_emu)
DEVICE_IMPLS = IMPLS + [pytest.param("cuda", marks=pytest.mark.cuda)]

# (N, H, W, patch, mask_ratio): ViT-B/16 and ViT-H/14 grids at 224 (L 196 / 256, P 768 / 588), a
# rectangular image, ratios 0.5 / 0.9, batch 1 and primes, a tiny patch.
SHAPES = [(2, 224, 224, 16, 0.75), (1, 224, 224, 14, 0.75), (3, 32, 48, 8, 0.5), (5, 80, 48, 8, 0.9),
          (7, 16, 16, 4, 0.75)]
_ID = lambda s: "x".join(map(str, s))  # noqa: E731


class Case:
    def __init__(self, N, H, W, p, ratio, dtype, device, img_dtype=torch.float32, channels=3):
        self.p = p
        self.imgs = torch.randn(N, channels, H, W, device=device).to(img_dtype)
        L = (H // p) * (W // p)
        ids = R.masking_ids(N, L, ratio, noise=torch.rand(N, L, device=device))
        self.mask, self.ids_restore, self.K = ids.mask, ids.ids_restore, ids.ids_keep.shape[1]
        self.ids_masked = R.masked_patch_ids(self.ids_restore, self.K)
        self.pred_all = torch.randn(N, L, p * p * channels, device=device).to(dtype).requires_grad_()
        self.pred_masked = self.gather(self.pred_all.detach()).requires_grad_()

    def gather(self, full):
        return torch.gather(full, 1, self.ids_masked.unsqueeze(-1).expand(-1, -1, full.shape[-1]))

    def args(self, pred_on):
        if pred_on == "all":
            return self.pred_all, self.mask
        return self.pred_masked, self.ids_restore

    def reference(self, pred_on, norm, pred=None, imgs=None):
        """(loss, grad of pred) of the reference composition (autograd)."""
        pred0, idx = self.args(pred_on)
        pred = pred0 if pred is None else pred
        imgs = self.imgs if imgs is None else imgs
        if pred_on == "all":
            loss = R.forward_loss(imgs, pred, idx, self.p, norm)
        else:
            loss = R.forward_loss_masked(imgs, pred, idx, self.p, norm)
        return (loss,) + torch.autograd.grad(loss, pred)

    def oracle(self, pred_on, norm):
        pred0, _ = self.args(pred_on)
        return self.reference(pred_on, norm, pred0.detach().double().requires_grad_(), self.imgs.double())

    def ours(self, pred_on, norm, impl, scale=1.0):
        pred, idx = self.args(pred_on)
        loss = norm_pix_loss(pred, self.imgs, idx, self.p, norm_pix=norm, pred_on=pred_on, impl=impl)
        return (loss,) + torch.autograd.grad(loss * scale, pred)


def _check(case, pred_on, norm, impl, dtype):
    got, ref, orc = case.ours(pred_on, norm, impl), case.reference(pred_on, norm), case.oracle(pred_on, norm)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert got[1].dtype == dtype and got[1].shape == case.args(pred_on)[0].shape
    if dtype == torch.float32 and case.imgs.dtype == torch.float32:
        assert_close(got[0], ref[0], torch.float32, name="loss")
        assert_close(got[1], ref[1], torch.float32, name="grad pred")
    assert_error_ratio(got[0], ref[0], orc[0], dtype, "forward", name="loss")
    assert_error_ratio(got[1], ref[1], orc[1], dtype, "backward", name="grad pred")
    return got


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("pred_on", ["all", "masked"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ID)
def test_matches_reference_fp32(impl, shape, pred_on, norm, device):
    got = _check(Case(*shape, torch.float32, device), pred_on, norm, impl, torch.float32)
    assert torch.isfinite(got[1]).all()  # every row written (masked: the grad buffer starts empty)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("img_dtype", [torch.float32, torch.bfloat16], ids=["img32", "img16"])
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_matches_reference_half(impl, pred_on, dtype, img_dtype, device):
    _check(Case(2, 224, 224, 16, 0.75, dtype, device, img_dtype), pred_on, True, impl, dtype)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
def test_masked_equals_all(impl, norm, device):
    c = Case(3, 32, 48, 8, 0.75, torch.float32, device)
    la, ga = c.ours("all", norm, impl)
    lm, gm = c.ours("masked", norm, impl)
    assert_close(lm, la, torch.float32, name="loss")
    assert_close(gm, c.gather(ga), torch.float32, name="grad of the masked rows")
    # The official path's gradient is exactly zero on the visible rows.
    assert torch.equal(ga[c.mask == 0], torch.zeros_like(ga[c.mask == 0]))


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_layouts_weights_and_grad_scale(impl, device):
    # channels_last images, a non-contiguous pred, a non-binary mask, a scaled upstream grad.
    c = Case(3, 32, 48, 8, 0.5, torch.float32, device)
    c.imgs = c.imgs.to(memory_format=torch.channels_last)
    c.mask = c.mask * torch.rand_like(c.mask)
    pred = c.pred_all.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    c.pred_all = pred
    got = c.ours("all", True, impl, scale=3.0)
    ref = c.reference("all", True)
    assert_close(got[0], ref[0], torch.float32, name="loss")
    assert_close(got[1], 3.0 * ref[1], torch.float32, name="grad pred")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_zero_variance_patch_is_finite(impl, pred_on, device):
    c = Case(2, 32, 32, 8, 0.75, torch.float32, device)
    l = int(c.ids_masked[0, 0])  # a masked patch of sample 0: make it constant
    hi, wi = divmod(l, 4)
    c.imgs[0, :, hi * 8:(hi + 1) * 8, wi * 8:(wi + 1) * 8] = 0.37
    got, ref = c.ours(pred_on, True, impl), c.reference(pred_on, True)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    assert_close(got[0], ref[0], torch.float32, name="loss")
    assert_close(got[1], ref[1], torch.float32, name="grad pred")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_near_constant_patch_adds_eps_under_the_root(impl, pred_on, device):
    """A masked patch of variance ~1e-8 (a flat region with a little noise): the official target divides by
    sqrt(var + 1e-6) ~ 1e-3, where sqrt(var) + 1e-6 ~ 1e-4 would scale the target by 10 (a zero-variance
    patch cannot tell them apart: its target is 0 either way)."""
    c = Case(2, 32, 32, 8, 0.75, torch.float32, device)
    l = int(c.ids_masked[0, 0])
    hi, wi = divmod(l, 4)
    patch = c.imgs[0, :, hi * 8:(hi + 1) * 8, wi * 8:(wi + 1) * 8]
    c.imgs[0, :, hi * 8:(hi + 1) * 8, wi * 8:(wi + 1) * 8] = 0.37 + 1e-4 * torch.randn_like(patch)
    got, ref = c.ours(pred_on, True, impl), c.reference(pred_on, True)
    assert_close(got[0], ref[0], torch.float32, name="loss")
    assert_close(got[1], ref[1], torch.float32, name="grad pred")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_nan_and_inf_propagate(impl, device):
    c = Case(2, 32, 32, 8, 0.75, torch.float32, device)
    lm = int(c.ids_masked[1, 2])
    lv = int((c.mask[1] == 0).nonzero()[0])
    hi, wi = divmod(lm, 4)
    for pred_on in ("all", "masked"):
        pred, idx = c.args(pred_on)
        # NaN / Inf in a masked prediction.
        for bad in (float("nan"), float("inf")):
            p2 = pred.detach().clone()
            p2[1, lm if pred_on == "all" else 2, 5] = bad
            loss = norm_pix_loss(p2, c.imgs, idx, 8, pred_on=pred_on, impl=impl)
            assert torch.isnan(loss) or torch.isinf(loss), (pred_on, bad, loss)
        # Inf in a masked image patch (normalised target: NaN).
        imgs = c.imgs.clone()
        imgs[1, 0, hi * 8 + 1, wi * 8 + 2] = float("inf")
        assert torch.isnan(norm_pix_loss(pred, imgs, idx, 8, pred_on=pred_on, impl=impl))
    # pred_on="all": a NaN in an unmasked prediction row reaches the loss, as 0 * NaN does in the reference.
    p2 = c.pred_all.detach().clone()
    p2[1, lv, 0] = float("nan")
    assert torch.isnan(norm_pix_loss(p2, c.imgs, c.mask, 8, impl=impl))
    assert torch.isnan(R.forward_loss(c.imgs, p2, c.mask, 8, True))


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_non_finite_visible_image_patch_reaches_the_loss(impl, device):
    """pred_on="all" reads every image patch, as the official (loss * mask).sum(): Inf in a visible (w = 0)
    patch gives it a NaN target and 0 * NaN = NaN, normalised or not; pred_on="masked" never reads it."""
    c = Case(2, 32, 32, 8, 0.75, torch.float32, device)
    lv = int((c.mask[1] == 0).nonzero()[0])
    hi, wi = divmod(lv, 4)
    imgs = c.imgs.clone()
    imgs[1, 0, hi * 8 + 1, wi * 8 + 2] = float("inf")
    with torch.no_grad():
        for norm in (True, False):
            assert torch.isnan(norm_pix_loss(c.pred_all, imgs, c.mask, 8, norm_pix=norm, impl=impl)), norm
            assert torch.isnan(R.forward_loss(imgs, c.pred_all, c.mask, 8, norm))
            assert torch.isfinite(norm_pix_loss(c.pred_masked, imgs, c.ids_restore, 8, norm_pix=norm,
                                                pred_on="masked", impl=impl)), norm


@needs_triton
def test_triton_kernels_clamp_masked_ids_into_the_image(device):
    """Below the ops (which hand the kernels ids already in [0, L)), the kernels' own contract: a masked
    patch id outside [0, L) reads the nearest patch (clamped), never memory outside the image."""
    from maefast.kernels.loss import norm_pix_loss_bwd, norm_pix_loss_fwd

    c = Case(2, 16, 24, 8, 0.5, torch.float32, device)  # L = 6 patches, M = 3 masked rows
    pred = c.pred_masked.detach()
    bad = torch.tensor([[-1, 6, 2], [-100, 3, 1000]], device=device)
    clamped = bad.clamp(0, 5)
    target = R.norm_pix_target(R.patchify(c.imgs, 8))
    target = torch.gather(target, 1, clamped.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    want = ((pred - target) ** 2).mean(-1).sum()
    scale = torch.tensor(0.5, device=device)
    want_grad = scale * 2 / target.shape[-1] * (pred - target)
    for ids in (bad, clamped):
        total, res = norm_pix_loss_fwd(pred, c.imgs, None, ids, 8, True, with_residual=True)
        assert_close(total, want, torch.float32, name="sum of row losses")
        assert_close(res, pred - target, torch.float32, name="residual")
        assert_grad_close(norm_pix_loss_bwd(scale, pred, c.imgs, None, ids, 8, True), want_grad, torch.float32,
                          name="grad pred")


@needs_triton
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_triton_deterministic(pred_on, device):
    c = Case(3, 96, 96, 16, 0.75, torch.bfloat16, device)
    a, b = c.ours(pred_on, True, "triton"), c.ours(pred_on, True, "triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_backward_op_matches_the_reference_gradient(impl, dtype, norm, pred_on, device):
    """The standalone backward op, its Triton kernel included (autograd's path in the tests above takes
    the residual the forward writes; this op runs where none was written: a forward without a gradient
    to come, a direct call): against the reference's autograd gradient, for both losses and every
    dtype, at two loss-gradient scales; fp32 to the table, every dtype by the error-ratio rule."""
    c = Case(3, 32, 48, 8, 0.5, dtype, device)
    pred, idx = c.args(pred_on)
    ref, orc = c.reference(pred_on, norm)[1], c.oracle(pred_on, norm)[1]
    for scale in (1.0, 3.0):
        got = torch.ops.maefast.norm_pix_loss_backward.default(torch.tensor(scale, device=device), pred.detach(),
                                                               c.imgs, idx, 8, norm, pred_on == "masked", impl)
        assert got.dtype == dtype and got.shape == pred.shape
        if dtype == torch.float32:
            assert_grad_close(got, ref * scale, torch.float32, name=f"grad pred x{scale}")
        assert_error_ratio(got, ref * scale, orc * scale, dtype, "backward", name=f"grad pred x{scale}")


@needs_triton
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_triton_forward_writes_no_residual_without_a_gradient_to_come(pred_on, device, monkeypatch):
    """The residual w * (pred - target) is written only for a gradient to come: a pred that requires
    grad under no_grad (evaluation) gets the loss alone, as a pred that does not require grad does."""
    import maefast.kernels.loss as kl

    fwd, fused = kl.norm_pix_loss_fwd, []

    def spy(*args, **kwargs):
        fused.append(args[6])
        return fwd(*args, **kwargs)

    monkeypatch.setattr(kl, "norm_pix_loss_fwd", spy)
    c = Case(2, 32, 32, 8, 0.75, torch.float32, device)
    pred, idx = c.args(pred_on)
    assert pred.requires_grad
    with torch.no_grad():
        norm_pix_loss(pred, c.imgs, idx, 8, pred_on=pred_on, impl="triton")
    norm_pix_loss(pred.detach(), c.imgs, idx, 8, pred_on=pred_on, impl="triton")
    norm_pix_loss(pred, c.imgs, idx, 8, pred_on=pred_on, impl="triton")
    assert fused == [False, False, True]


@needs_triton
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_triton_forward_written_residual_gives_the_backward_kernels_gradient(pred_on, device):
    """With a gradient to come, the Triton forward also writes w * (pred - target) (one pass) and the
    backward only scales it: the backward kernel's gradient to within one rounding, for a unit and a
    GradScaler-sized loss gradient; fp16 holds it where the gradient itself would be subnormal."""
    # 32 x 48 masked rows of P = 192: the unit-loss gradient, ~2 / (P * 1536) * (pred - t), is below
    # fp16's normal range; scaled by GradScaler's 65536 it is not
    c = Case(32, 64, 64, 8, 0.75, torch.float16, device)
    pred, idx = c.args(pred_on)
    masked = pred_on == "masked"
    op = torch.ops.maefast.norm_pix_loss.default
    loss_f, r = op(pred.detach(), c.imgs, idx, 8, True, masked, "triton", True)
    loss_u, none = op(pred.detach(), c.imgs, idx, 8, True, masked, "triton", False)
    assert torch.equal(loss_f, loss_u) and none.numel() == 0 and r.shape == pred.shape and r.dtype == pred.dtype
    for scale in (1.0, 65536.0):
        grad = torch.tensor(scale, device=device)
        want = torch.ops.maefast.norm_pix_loss_backward.default(grad, pred.detach(), c.imgs, idx, 8, True, masked,
                                                                "triton")
        got = torch.autograd.grad(norm_pix_loss(pred, c.imgs, idx, 8, pred_on=pred_on, impl="triton") * scale,
                                  pred)[0]
        assert got.dtype == torch.float16
        if scale == 1.0:  # subnormal in fp16 either way: below the table's atol, so relative to its largest value
            assert_grad_close(got, want, torch.float16, name="unit grad")
            assert_grad_close(got, c.reference(pred_on, True)[1], torch.float16, name="grad vs reference")
            continue
        # one fp16 rounding apart: within 2^-9 relative wherever the gradient is not tiny (a stored
        # unit-loss gradient, subnormal in fp16, would be off by up to ~17% here once scaled)
        sel = want.float().abs() >= 1e-2 * want.float().abs().max()
        rel = (got.float() - want.float()).abs()[sel] / want.float().abs()[sel]
        assert rel.max() <= 2 ** -9, (scale, rel.max())
    with torch.no_grad():  # no gradient to come: nothing but the loss is written
        assert torch.equal(norm_pix_loss(pred, c.imgs, idx, 8, pred_on=pred_on, impl="triton"), loss_u)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_triton_fused_backward_scales_the_residual_in_fp32(dtype, device):
    """The fused backward's factor grad / sum(w) * 2 / P is applied in fp32, not rounded to pred's dtype first
    (on a GPU `r * factor` with a 0-d fp32 CUDA tensor does that: the whole gradient scaled off by the
    factor's rounding, here +0.26% in bf16 and +7.7% / -14% in fp16 without GradScaler). The factors of
    the paper's shapes (b64 ViT-B/16 and b256 ViT-H/14 at ratio 0.75, unit loss gradient) are given to a
    small case through the loss gradient; the gradient's scale along the backward kernel's (which applies
    the factor in fp32) must agree to well within one rounding of it. Only a card shows the rounding:
    torch's CPU kernels apply a 0-d tensor at full precision, so on the CPU this passes either way."""
    c = Case(2, 32, 32, 8, 0.75, dtype, device)
    pred, idx = c.args("masked")
    den, P = pred.shape[0] * pred.shape[1], pred.shape[-1]
    for factor in (2 / (64 * 147 * 768), 2 / (256 * 192 * 588)):
        grad = torch.tensor(factor * den * P / 2, device=device)
        want = torch.ops.maefast.norm_pix_loss_backward.default(grad, pred.detach(), c.imgs, idx, 8, True, True,
                                                                "triton").double()
        loss = norm_pix_loss(pred, c.imgs, idx, 8, pred_on="masked", impl="triton")
        got = torch.autograd.grad(loss, pred, grad_outputs=grad)[0].double()
        bias = ((got * want).sum() / (want * want).sum() - 1).abs().item()
        assert bias < 1e-3, (dtype, factor, bias)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_triton_fused_backward_multiplies_half_residuals_in_fp32(dtype):
    """The CPU's side of the test above: every multiply of the fused backward that takes the 0-d factor takes it
    with an fp32 tensor (a half one is what a GPU rounds the factor to), seen under a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    c = Case(2, 32, 32, 8, 0.75, dtype, "cpu")
    pred, idx = c.args("masked")
    loss = norm_pix_loss(pred, c.imgs, idx, 8, pred_on="masked", impl="triton")
    muls = []

    class Muls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            shaped = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() > 0]
            if func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.mul_) and shaped:  # (not the factor's own)
                muls.append(shaped)
            return func(*args, **(kwargs or {}))

    with Muls():
        gpred, = torch.autograd.grad(loss, pred)
    assert gpred.dtype == dtype and muls and all(d == [torch.float32] for d in muls), muls


@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_reference_impl_computes_half_images_in_fp32(pred_on):
    # the reference impl reads bf16 images as fp32 (patchify and the norm-pix statistics in fp32, not in bf16)
    c = Case(2, 32, 32, 8, 0.75, torch.float32, "cpu", img_dtype=torch.bfloat16)
    pred, idx = c.args(pred_on)
    got = norm_pix_loss(pred, c.imgs, idx, 8, pred_on=pred_on, impl="reference")
    official = R.forward_loss if pred_on == "all" else R.forward_loss_masked
    assert torch.equal(got, official(c.imgs.float(), pred, idx, 8, True))


def test_masked_patch_ids_matches_reference(device):
    ids = R.masking_ids(5, 196, 0.75, noise=torch.rand(5, 196, device=device))
    got = masked_patch_ids(ids.ids_restore, 49)
    assert torch.equal(got, R.masked_patch_ids(ids.ids_restore, 49))
    assert torch.equal(torch.gather(ids.mask, 1, got), torch.ones(5, 147, device=device))


def test_nn_norm_pix_loss_is_the_official_forward_loss(device):
    torch.manual_seed(0)
    model = R.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                   decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2,
                                   norm_pix_loss=True).to(device)
    imgs = torch.randn(3, 3, 32, 32, device=device)
    loss, pred, mask = model(imgs, 0.75, torch.rand(3, 16, device=device))
    crit = NormPixLoss(8, norm_pix_loss=True)
    assert "norm_pix_loss=True" in repr(crit) and len(crit.state_dict()) == 0
    assert_close(crit(imgs, pred, mask), loss, torch.float32)
    assert not NormPixLoss(8).norm_pix_loss  # the official default


# -- "predict only where the loss looks" -------------------------------------------------------

def _official_and_masked_head(norm, impl, device, ratio=0.75):
    torch.manual_seed(0)
    model = R.MaskedAutoencoderViT(img_size=(32, 48), patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                   decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=2,
                                   norm_pix_loss=norm).to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    N, L = 5, 24
    imgs = torch.randn(N, 3, 32, 48, device=device)
    noise = torch.rand(N, L, device=device)
    loss_ref, _, _ = model(imgs, ratio, noise)
    grads_ref = torch.autograd.grad(loss_ref, [p for _, p in params])

    latent, _, ids_restore = model.forward_encoder(imgs, ratio, noise)
    K = latent.shape[1] - 1
    x = unshuffle(model.decoder_embed(latent), model.mask_token, ids_restore, model.decoder_pos_embed, impl=impl)
    for blk in model.decoder_blocks:
        x = blk(x)
    x = model.decoder_norm(x)
    loss, pred = masked_prediction_loss(x, model.decoder_pred.weight, model.decoder_pred.bias, imgs, ids_restore, K,
                                        8, norm_pix=norm, return_pred=True, impl=impl)
    assert pred.shape == (N, L - K, 8 * 8 * 3)
    grads = torch.autograd.grad(loss, [p for _, p in params])
    return params, (loss_ref, grads_ref), (loss, grads)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
def test_masked_head_same_loss_and_grads_as_official(impl, norm, device):
    params, (loss_ref, grads_ref), (loss, grads) = _official_and_masked_head(norm, impl, device)
    assert_close(loss, loss_ref, torch.float32, name="loss")
    for (name, _), g, gr in zip(params, grads, grads_ref):
        assert_close(g, gr, torch.float32, name=f"grad {name}")


# -- custom op ------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_opcheck(impl, pred_on):
    c = Case(2, 16, 24, 8, 0.5, torch.float32, "cpu")
    pred, idx = c.args(pred_on)
    masked = pred_on == "masked"
    for with_grad in (False, True):  # with_grad: the Triton forward also writes the gradient
        torch.library.opcheck(torch.ops.maefast.norm_pix_loss.default,
                              (pred, c.imgs, idx, 8, True, masked, impl, with_grad))
    torch.library.opcheck(torch.ops.maefast.norm_pix_loss_backward.default,
                          (torch.tensor(1.5), pred.detach(), c.imgs, idx, 8, True, masked, impl))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("pred_on", ["all", "masked"])
def test_compile_fullgraph(backend, pred_on):
    c = Case(2, 16, 24, 8, 0.5, torch.float32, "cpu")
    pred, idx = c.args(pred_on)

    def f(pred, imgs, idx):
        return norm_pix_loss(pred * 2, imgs, idx, 8, pred_on=pred_on, impl="reference")

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = compiled(pred, c.imgs, idx)
    want = f(pred, c.imgs, idx)
    assert_close(got, want, torch.float32)
    assert_close(torch.autograd.grad(got, pred)[0], torch.autograd.grad(want, pred)[0], torch.float32)


# -- bad inputs -----------------------------------------------------------------------------------

def test_bad_inputs():
    c = Case(2, 16, 24, 8, 0.5, torch.float32, "cpu")
    pa, pm, m, ids, imgs = c.pred_all, c.pred_masked, c.mask, c.ids_restore, c.imgs
    cases = [
        ((pa, imgs, m, 8), dict(pred_on="some"), ValueError, "pred_on must be one of"),
        ((pa, imgs, m, 0), {}, ValueError, "patch_size must be >= 1"),
        ((pa, imgs, m, 8.0), {}, TypeError, "patch_size must be an int"),
        ((pa, imgs, m, 5), {}, ValueError, "multiples of patch_size"),
        ((pa, torch.randn(2, 3, 16, 28), m, 8), {}, ValueError, r"\(16, 28\) must be multiples of patch_size=8"),
        ((pa, imgs[0], m, 8), {}, ValueError, "imgs must have 4 dimensions"),
        ((pa.long(), imgs, m, 8), {}, TypeError, "pred must have dtype"),
        ((pa[:, :-1], imgs, m, 8), {}, ValueError, r"pred must have shape \(N, L, p\*p\*C\)"),
        ((pa, imgs, m[:, :-1], 8), {}, ValueError, r"mask must have shape \(N, L\)"),
        ((pa, imgs, ids, 8), {}, TypeError, "mask .* must be a float"),
        ((pm, imgs, ids, 8), dict(pred_on="masked"), None, None),
        ((pm[..., :-1], imgs, ids, 8), dict(pred_on="masked"), ValueError, r"pred must have shape \(N, M, p\*p\*C\)"),
        ((pm, imgs, m, 8), dict(pred_on="masked"), TypeError, "ids_restore must have dtype"),
        ((pm, imgs, ids[:1], 8), dict(pred_on="masked"), ValueError, r"ids_restore must have shape \(N, L\)"),
        ((pa[:, :0], imgs, ids, 8), dict(pred_on="masked"), ValueError, "1 <= M <= L"),
        ((pa, imgs, m.to("meta"), 8), {}, ValueError, "mask must be on cpu"),
        ((pa, imgs, m, 8), dict(impl="fast"), ValueError, "impl must be one of"),
        ((pa, imgs, m, 8), dict(impl="cuda"), ValueError, "impl='cuda' is not available"),
        ((pa, imgs, m, 8), dict(norm_pix="False"), TypeError, "norm_pix must be True or False"),  # (was true)
    ]
    for args, kw, exc, msg in cases:
        if exc is None:
            norm_pix_loss(*args, **kw)
            continue
        with pytest.raises(exc, match=msg):
            norm_pix_loss(*args, **kw)
    x = torch.randn(2, 1 + 6, 16)
    w = torch.randn(192, 16)
    with pytest.raises(ValueError, match="len_keep must be an int"):
        masked_prediction_loss(x, w, None, imgs, ids, 6, 8)
    with pytest.raises(ValueError, match="decoder_out must have shape"):
        masked_prediction_loss(x[:, 1:], w, None, imgs, ids, 3, 8)
    with pytest.raises(TypeError, match="has_cls must be True or False"):  # "no" was true: row 0 dropped as cls
        masked_prediction_loss(x, w, None, imgs, ids, 3, 8, has_cls="no")


def test_images_that_require_grad_are_refused():
    """The loss gives imgs no gradient (its target is data): an imgs that requires one is refused
    with a ValueError, as masked_patch_embed refuses it, never a silent None; under no_grad it is fine."""
    c = Case(2, 16, 24, 8, 0.5, torch.float32, "cpu")
    imgs = c.imgs.clone().requires_grad_()
    for impl in ("reference", "auto"):
        with pytest.raises(ValueError, match="imgs must not require grad"):
            norm_pix_loss(c.pred_all, imgs, c.mask, 8, impl=impl)
        with pytest.raises(ValueError, match="imgs must not require grad"):
            norm_pix_loss(c.pred_masked, imgs, c.ids_restore, 8, pred_on="masked", impl=impl)
    with pytest.raises(ValueError, match="imgs must not require grad"):
        masked_prediction_loss(torch.randn(2, 1 + 6, 16), torch.randn(192, 16), None, imgs, c.ids_restore, 3, 8)
    with torch.no_grad():
        norm_pix_loss(c.pred_all, imgs, c.mask, 8)


def test_a_mask_that_requires_grad_is_refused():
    """Soft mask weights that require a gradient (a learned mask) would get None from the ops, where the
    official forward_loss gives one: refused, never silent; fine under no_grad or detached."""
    c = Case(2, 16, 24, 8, 0.5, torch.float32, "cpu")
    soft = (c.mask * 0.5 + 0.25).requires_grad_()
    for impl in ("reference", "auto"):
        with pytest.raises(ValueError, match="mask_or_ids must not require grad"):
            norm_pix_loss(c.pred_all, c.imgs, soft, 8, impl=impl)
    assert torch.isfinite(norm_pix_loss(c.pred_all, c.imgs, soft.detach(), 8))
    with torch.no_grad():
        norm_pix_loss(c.pred_all, c.imgs, soft, 8)


@pytest.mark.parametrize("impl", IMPLS)
def test_images_made_under_inference_mode_train(impl):
    """Images made under torch.inference_mode (a GPU augmentation, say) work as in the official loss, which saves
    none of them: the backends whose backward reads them save a copy (an inference tensor cannot be saved)."""
    c = Case(2, 16, 24, 8, 0.5, torch.float32, "cpu")
    with torch.inference_mode():
        imgs, u8 = c.imgs.clone(), torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8)
    for x, want_imgs in ((imgs, c.imgs), (u8, u8.clone())):  # clone(): a normal tensor
        for pred_on in ("all", "masked"):
            pred, third = c.args(pred_on)[:2]
            (g,) = torch.autograd.grad(norm_pix_loss(pred, x, third, 8, pred_on=pred_on, impl=impl), pred)
            (want,) = torch.autograd.grad(norm_pix_loss(pred, want_imgs, third, 8, pred_on=pred_on, impl=impl), pred)
            assert torch.equal(g, want)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("mask_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_mask_is_summed_in_fp32(impl, mask_dtype, device):
    """A bf16/fp16 weight mask: sum(w) in fp32, as the reference's mask.float().sum(), not rounded to the
    mask's dtype (36 weights of bf16(0.7) sum to 25.17, not a bf16 value)."""
    c = Case(3, 32, 48, 8, 0.5, torch.float32, device)
    w = (c.mask * 0.7).to(mask_dtype)
    loss = norm_pix_loss(c.pred_all, c.imgs, w, c.p, impl=impl)
    ref = R.forward_loss(c.imgs, c.pred_all, w.float(), c.p, True)
    assert_close(loss, ref, torch.float32, name="loss")
    g, = torch.autograd.grad(loss, c.pred_all)
    assert_grad_close(g, torch.autograd.grad(ref, c.pred_all)[0], torch.float32, name="grad pred")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_small_and_zero_weight_sums_are_not_clamped(impl, device):
    """sum(w) < 1 divides by sum(w) (weights 1e-3: the weighted mean, not 1e-3 times it), and an all-zero
    mask gives the official 0/0 = NaN, not 0."""
    c = Case(3, 32, 48, 8, 0.5, torch.float32, device)
    w = c.mask * 1e-3
    assert_close(norm_pix_loss(c.pred_all, c.imgs, w, c.p, impl=impl),
                 R.forward_loss(c.imgs, c.pred_all, w, c.p, True), torch.float32, name="loss, sum(w) < 1")
    zero = torch.zeros_like(c.mask)
    with torch.no_grad():
        assert torch.isnan(norm_pix_loss(c.pred_all, c.imgs, zero, c.p, impl=impl))
        assert torch.isnan(R.forward_loss(c.imgs, c.pred_all, zero, c.p, True))


# -- GPU only (written for the card; run by scripts/gpu_check) --------------------------------------

# (N, H, W, p, ratio, norm_pix): few cases, each Triton specialisation costs a compile on the card.
GPU_SHAPES = [(64, 224, 224, 16, 0.75, True), (13, 224, 224, 14, 0.75, True), (1, 160, 96, 16, 0.9, False)]


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pred_on", ["all", "masked"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_ID)
def test_gpu_matches_reference(impl, shape, pred_on, dtype):
    _check(Case(*shape[:5], dtype, "cuda"), pred_on, shape[5], impl, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_paper_batch_deterministic_and_masked_head(impl):
    c = Case(256, 224, 224, 14, 0.75, torch.bfloat16, "cuda")
    a, b = c.ours("masked", True, impl), c.ours("masked", True, impl)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    params, (loss_ref, grads_ref), (loss, grads) = _official_and_masked_head(True, impl, "cuda")
    assert_close(loss, loss_ref, torch.float32, name="loss", scale=10)
    for (name, _), g, gr in zip(params, grads, grads_ref):
        assert_close(g, gr, torch.float32, name=f"grad {name}", scale=10)
