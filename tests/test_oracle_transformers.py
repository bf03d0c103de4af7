"""The reference pinned by an implementation no one here wrote: transformers' ViTMAEForPreTraining,
same weights (through maefast.convert), same noise -> same loss, pred, mask, ids_restore, gradients."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from maefast.convert import from_transformers, to_transformers_model  # noqa: E402
from maefast.reference import MaskedAutoencoderViT, masking_ids  # noqa: E402

CONFIGS = [
    dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
         decoder_num_heads=4, mask_ratio=0.75, norm_pix_loss=False, batch=3),
    dict(img_size=48, patch_size=6, embed_dim=48, depth=3, num_heads=3, decoder_embed_dim=32, decoder_depth=2,
         decoder_num_heads=2, mask_ratio=0.6, norm_pix_loss=True, batch=5),
    dict(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
         decoder_num_heads=1, mask_ratio=0.5, norm_pix_loss=True, batch=2),
]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"img{c['img_size']}p{c['patch_size']}npl{int(c['norm_pix_loss'])}")
def test_reference_equals_transformers_forward_and_backward(cfg):
    cfg = dict(cfg)
    batch, ratio = cfg.pop("batch"), cfg.pop("mask_ratio")
    torch.manual_seed(0)
    ours = MaskedAutoencoderViT(**cfg)
    hf = to_transformers_model(ours, mask_ratio=ratio)
    hf.train()
    L = ours.patch_embed.num_patches
    imgs = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"])
    noise = torch.rand(batch, L)

    out = hf(pixel_values=imgs, noise=noise)
    loss, pred, mask = ours(imgs, mask_ratio=ratio, noise=noise)
    assert torch.equal(mask, out.mask)
    assert torch.equal(masking_ids(batch, L, ratio, noise=noise).ids_restore, out.ids_restore)
    assert _rel(pred, out.logits) <= 1e-5
    assert abs(loss.item() - out.loss.item()) <= 1e-5 * abs(out.loss.item())

    loss.backward()
    out.loss.backward()
    hf_grads = from_transformers({k: p.grad for k, p in hf.named_parameters() if p.grad is not None})
    n = 0
    for name, p in ours.named_parameters():
        if p.grad is None:
            continue
        g = hf_grads[name]
        assert _rel(p.grad, g) <= 1e-5 or (p.grad - g).abs().max().item() <= 1e-7, name
        n += 1
    assert n == sum(1 for p in ours.parameters() if p.requires_grad)
