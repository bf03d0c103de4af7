"""uint8 images into the model (maefast.models.MaskedAutoencoderViT, fused path and official
computation): uint8 + mean/std gives what normalising first (`maefast.reference.normalize`) and
passing the fp32 images gives — bit for bit on the CPU's reference ops, to the tolerance table on the
kernels. The ops themselves: tests/test_uint8.py."""
import pytest
import torch

from maefast._triton import HAS_TRITON
from maefast.models import MaskedAutoencoderViT, routing
from maefast.reference.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize
from maefast.testing import assert_close, assert_grad_close

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
OWN = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
GPU = torch.device("cuda")


def _pixels(*shape, device="cpu"):
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)


TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)


def _model_step(m, imgs, noise, mode="fp32", **kw):
    m.zero_grad()
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
        loss, pred, mask = m(imgs, 0.75, noise, **kw)
    loss.backward()
    return loss.detach(), pred, mask, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.parametrize("stats", ["imagenet", "own"])
def test_model_equals_normalise_first(impl, mode, stats):
    """On the CPU (the reference ops) uint8 + mean/std is the normalised fp32 run bit for bit, loss,
    pred, mask and every gradient, for the official computation and the fused path."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, norm_pix_loss=True, impl=impl)
    st = IMAGENET if stats == "imagenet" else OWN
    u, noise = _pixels(3, 3, 32, 32), torch.rand(3, 16)
    kw = dict(return_pred=True) if impl != "reference" else {}
    got = _model_step(m, u, noise, mode, **({} if st is IMAGENET else dict(mean=st[0], std=st[1])), **kw)
    want = _model_step(m, normalize(u, *st), noise, mode, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert got[3].keys() == want[3].keys() and all(torch.equal(got[3][n], want[3][n]) for n in want[3])


@pytest.mark.slow
@needs_triton
def test_model_triton_equals_normalise_first(device):
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**dict(TINY, depth=1), norm_pix_loss=True, impl="triton").to(device)
    u, noise = _pixels(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    got = _model_step(m, u, noise, return_pred=False)
    want = _model_step(m, normalize(u, *IMAGENET), noise, return_pred=False)
    assert_close(got[0], want[0], torch.float32, name="loss")
    for n in want[3]:
        assert_close(got[3][n], want[3][n], torch.float32, name=f"grad {n}", scale=10)


def test_model_bf16_weights_read_uint8_in_their_dtype():
    """A bf16 model without autocast: the patch embedding reads the normalised pixels in bf16 (the
    fused path and the official computation alike), the loss target stays fp32."""
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, norm_pix_loss=True).bfloat16()
    u, noise = _pixels(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        fast = m(u, 0.75, noise)
        m.impl = "reference"
        ref = m(u, 0.75, noise)
    assert fast[1].dtype == torch.bfloat16 and torch.isfinite(fast[0])
    assert_close(fast[0], ref[0], torch.bfloat16, name="loss")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["auto", "cuda", "reference"])
def test_gpu_model_uint8(impl):
    torch.manual_seed(0)
    cfg = dict(img_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3, decoder_embed_dim=128,
               decoder_depth=1, decoder_num_heads=4)
    m = MaskedAutoencoderViT(**cfg, norm_pix_loss=True, impl=impl).to(GPU)
    u, noise = _pixels(8, 3, 224, 224, device=GPU), torch.rand(8, 196, device=GPU)
    got = _model_step(m, u, noise, "bf16")
    want = _model_step(m, normalize(u, *IMAGENET), noise, "bf16")
    assert torch.equal(got[2], want[2])
    assert_close(got[0], want[0], torch.float32, name="loss", scale=10)
    for n in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight"):
        assert_grad_close(got[3][n], want[3][n], torch.bfloat16, name=f"grad {n}")


def test_the_original_forward_gets_images_normalised_with_the_calls_stats(monkeypatch):
    """A call the fast path hands to the original forward (dropout active in training) normalises uint8
    images with the call's own mean/std, not ImageNet's: the loss, pred, mask and gradients of the
    images normalised first."""
    torch.manual_seed(0)
    u, noise = _pixels(2, 3, 32, 32), torch.rand(2, 16)
    m = MaskedAutoencoderViT(**TINY, norm_pix_loss=True, impl="auto")
    m.blocks[0].mlp.drop = torch.nn.Dropout(0.1)  # active in train(): the original forward runs
    m.train()
    monkeypatch.setattr(routing, "_WARNED", set())  # one warning per reason and process: this test's own
    with pytest.warns(routing.SlowPathWarning, match="Dropout"):
        torch.manual_seed(1)
        got = _model_step(m, u, noise, mean=OWN[0], std=OWN[1])
    torch.manual_seed(1)
    want = _model_step(m, normalize(u, *OWN), noise)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert all(torch.equal(got[3][n], want[3][n]) for n in want[3])


def test_a_declined_call_of_a_bf16_model_takes_uint8_images(monkeypatch):
    """A model cast to bf16 (no autocast; maefast's, or maefast.reference's patched) given uint8 images, in a
    call the fast path declines (a hook on a module it does not call): the original forward normalises them
    itself, the loss target in fp32 and the embedding in bf16, as maefast's official forward does. Before
    2026-12-07 they reached it normalised to fp32 and its input check refused them (fp32 images, bf16 weights):
    a TypeError instead of the slow path."""
    import maefast
    from maefast.reference import MaskedAutoencoderViT as ReferenceMAE

    u, noise = _pixels(2, 3, 32, 32), torch.rand(2, 16)
    for patched in (False, True):  # maefast's model; maefast.reference's, patched (its forward takes uint8 too)
        torch.manual_seed(0)
        ref = ReferenceMAE(**TINY, norm_pix_loss=True).to(torch.bfloat16)
        m = ReferenceMAE(**TINY, norm_pix_loss=True) if patched else MaskedAutoencoderViT(**TINY, norm_pix_loss=True)
        m = maefast.patch(m) if patched else m
        m.to(torch.bfloat16).load_state_dict(ref.state_dict())
        m.blocks[0].attn.register_forward_hook(lambda *a: None)
        monkeypatch.setattr(routing, "_WARNED", set())  # one warning per reason and process: this test's own
        with pytest.warns(routing.SlowPathWarning, match="hooks"):
            got = m(u, noise=noise, mean=OWN[0], std=OWN[1])
        want = ref(u, noise=noise, mean=OWN[0], std=OWN[1])
        assert all(torch.equal(a, b) for a, b in zip(got, want)), patched


def test_routed_calls_see_normalised_images(monkeypatch):
    """A call the fast path hands elsewhere (a subclass's own forward_loss; dropout active in training,
    which runs the original forward) gets the images normalised first, as the official code takes them."""
    seen = []

    class OwnLoss(MaskedAutoencoderViT):
        def forward_loss(self, imgs, pred, mask):
            seen.append(imgs.dtype)
            return super().forward_loss(imgs, pred, mask)

    torch.manual_seed(0)
    u, noise = _pixels(2, 3, 32, 32), torch.rand(2, 16)
    m = OwnLoss(**TINY, norm_pix_loss=True, impl="auto")
    got = _model_step(m, u, noise, mean=OWN[0], std=OWN[1])
    want = _model_step(m, normalize(u, *OWN), noise)
    assert seen == [torch.float32, torch.float32]
    assert torch.equal(got[0], want[0])

    m = MaskedAutoencoderViT(**TINY, norm_pix_loss=True, impl="auto")
    m.blocks[0].mlp.drop = torch.nn.Dropout(0.1)  # active in train(): the original forward runs
    m.train()
    monkeypatch.setattr(routing, "_WARNED", set())  # one warning per reason and process: a fresh set
    with pytest.warns(Warning, match="dropout|Dropout"):
        torch.manual_seed(1)
        got = _model_step(m, u, noise)
    torch.manual_seed(1)
    want = _model_step(m, normalize(u, *IMAGENET), noise)
    assert torch.equal(got[0], want[0])


def test_reference_bf16_weights_keep_the_fp32_loss_target():
    """The official model with bf16 weights on uint8 pixels: the patch embedding reads them in bf16, the loss
    target is the fp32 normalised image (its bf16 rounding would move the loss and make it bf16)."""
    from maefast.reference import MaskedAutoencoderViT as ReferenceMAE, forward_loss

    torch.manual_seed(0)
    m = ReferenceMAE(**TINY, norm_pix_loss=True).bfloat16()
    u, noise = _pixels(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask = m(u, 0.75, noise)
        x = normalize(u, *IMAGENET)
        want = m(x.bfloat16(), 0.75, noise)  # the same prediction from pixels normalised, then cast, first
    assert torch.equal(pred, want[1]) and pred.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    assert torch.equal(loss, forward_loss(x, pred, mask, 8, norm_pix_loss=True))
