"""The reference pinned by an implementation no one here wrote: transformers' ViTMAEForPreTraining,
same weights (through maefast.convert), same noise -> same loss, pred, mask, ids_restore, gradients."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from maefast.convert import from_transformers, from_transformers_model, to_transformers_model  # noqa: E402
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


# Configurations the three above leave open, each against transformers with the same weights and noise, for the
# reference and for the fast model (impl="triton": the kernels, under the interpreter on a CPU). Head dims 16.
MORE = {
    "1ch_npl": dict(in_chans=1, norm_pix_loss=True),
    "4ch": dict(in_chans=4),
    "ratio0.9_L100": dict(img_size=40, patch_size=4, mask_ratio=0.9),  # 100 * (1 - 0.9) = 9.999...: keeps 9
    "ratio0.7_L16": dict(mask_ratio=0.7, norm_pix_loss=True),  # 16 * 0.3 = 4.8: keeps 4
    "ratio0.5_batch1": dict(mask_ratio=0.5, batch=1),
    "decoder_depth0": dict(decoder_depth=0),
    "depth0": dict(depth=0),
    "eps1e-6": dict(eps=1e-6),
    "p14_4ch_npl": dict(img_size=28, patch_size=14, in_chans=4, norm_pix_loss=True),
    "p3_2ch_npl": dict(img_size=9, patch_size=3, in_chans=2, norm_pix_loss=True, mask_ratio=0.5),  # 18-long patches
}


def _more_case(name):
    import functools

    cfg = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
               decoder_depth=1, decoder_num_heads=1, norm_pix_loss=False, mask_ratio=0.75, batch=2, eps=None)
    cfg.update(MORE[name])
    batch, ratio, eps = cfg.pop("batch"), cfg.pop("mask_ratio"), cfg.pop("eps")
    if eps is not None:
        cfg["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=eps)
    return cfg, batch, ratio


@pytest.mark.parametrize("name", list(MORE))
def test_reference_and_fast_model_equal_transformers_on_more_configs(name, device):
    """The reference on the CPU, the fast model's kernels on `device` (interpreted on a CPU), against transformers:
    loss, pred, mask (its len_keep int(L * (1 - r)) included), ids_restore, every gradient; and back."""
    import copy

    from maefast.models import MaskedAutoencoderViT as FastMAE

    cfg, batch, ratio = _more_case(name)
    torch.manual_seed(0)
    ours = FastMAE(impl="reference", **cfg)
    hf = to_transformers_model(ours, mask_ratio=ratio).train()
    assert hf.config.layer_norm_eps == ours.norm.eps and hf.config.num_channels == cfg["in_chans"]
    assert torch.equal(ours.pos_embed, hf.vit.embeddings.position_embeddings)
    assert torch.equal(ours.decoder_pos_embed, hf.decoder.decoder_pos_embed)
    L = ours.patch_embed.num_patches
    imgs = torch.randn(batch, cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    noise = torch.rand(batch, L)

    out = hf(pixel_values=imgs, noise=noise)
    out.loss.backward()
    hf_grads = from_transformers({k: p.grad for k, p in hf.named_parameters() if p.grad is not None})
    # the official len_keep, int(L * (1 - r)) as transformers computes it
    assert int((out.mask == 0).sum(1).unique()) == int(L * (1 - ratio))
    assert out.mask.dtype == torch.float32 and out.ids_restore.dtype == torch.int64
    assert torch.equal(masking_ids(batch, L, ratio, noise=noise).ids_restore, out.ids_restore)
    tol, gtol = (1e-5, 1e-5) if device.type == "cpu" else (1e-4, 1e-3)
    scale = max(g.abs().max().item() for g in hf_grads.values())
    for impl, fused in (("reference", False), ("triton", False), ("triton", "block")):
        m = ours if impl == "reference" else copy.deepcopy(ours).to(device)
        m.impl, m.fused = impl, fused
        m.zero_grad(set_to_none=True)
        x, z = imgs.to(m.pos_embed.device), noise.to(m.pos_embed.device)
        loss, pred, mask = m(x, mask_ratio=ratio, noise=z)
        assert torch.equal(mask.cpu(), out.mask), impl
        assert _rel(pred.cpu(), out.logits) <= tol, (impl, fused)
        assert abs(loss.item() - out.loss.item()) <= tol * abs(out.loss.item()), (impl, fused)
        loss.backward()
        for n, p in m.named_parameters():
            if p.requires_grad:
                g, mine = hf_grads[n], p.grad.cpu()
                # (a key bias's gradient is zero up to rounding: softmax ignores it)
                assert _rel(mine, g) <= gtol or (mine - g).abs().max().item() <= 1e-7 * scale, (impl, fused, n)
        if impl != "reference":  # the head on the masked rows only: the same loss
            loss2, none, _ = m(x, mask_ratio=ratio, noise=z, return_pred=False)
            assert none is None and abs(loss2.item() - out.loss.item()) <= tol * abs(out.loss.item())
    back = from_transformers_model(hf, impl="reference")  # and from transformers: the same model (eps carried)
    assert back.norm.eps == ours.norm.eps
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def _official_sincos_2d(embed_dim, grid_size):
    """facebookresearch/mae util/pos_embed.py's get_2d_sincos_pos_embed(cls_token=True) in numpy, its square
    grid_size read as (h, w): np.meshgrid(grid_w, grid_h) (w first), the first half of the channels from
    grid[0] (the column index), row-major tokens; float32 positions, float64 frequencies, then .float()."""
    import numpy as np

    gh, gw = grid_size

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape([2, 1, gh, gw])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


@pytest.mark.parametrize("dim,grid", [(768, (14, 14)), (512, (16, 16)), (1280, (16, 16)), (32, (4, 6)),
                                      (64, (6, 4)), (48, (3, 5)), (16, (1, 7))])
def test_sincos_table_is_the_officials_and_transformers_on_any_grid(dim, grid):
    """Bit for bit the official table (zero cls row, column index in the first half) on the paper's grids; on a
    non-square grid the official code generalised (it takes one side), which is also transformers' own table
    builder for (height, width) with its halves swapped as its ViTMAE does (its model is square-only: the
    ViTMAE init builds the table of an int(sqrt(L)) grid, so a non-square config does not construct)."""
    from maefast.reference import get_2d_sincos_pos_embed
    from transformers.models.vit_mae import modeling_vit_mae

    ours = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert torch.equal(ours, _official_sincos_2d(dim, grid))
    build = getattr(modeling_vit_mae, "build_2d_sinusoidal_position_embedding", None)
    if build is not None:  # transformers 5.x: [h | w] built, then rotated to the official [w | h]
        theirs = build(grid[0], grid[1], dim, cls_token=True)
        theirs = torch.cat([theirs[..., dim // 2:], theirs[..., :dim // 2]], dim=-1)
        assert torch.equal(ours, theirs)
    assert torch.equal(get_2d_sincos_pos_embed(dim, grid), ours[1:])


@pytest.mark.parametrize("img_size,in_chans,norm_pix_loss", [((32, 48), 1, True), ((48, 32), 4, False),
                                                             ((28, 42), 3, True)])
def test_fast_model_equals_reference_on_non_square_images(img_size, in_chans, norm_pix_loss, device):
    """No oracle outside maefast takes non-square images (the official code and transformers' ViTMAE are
    square-only): the fast model (the kernels on `device`: masked patch embedding on an h != w grid, the
    un-shuffle with its positions, the loss's patch order) must give the CPU reference's loss, pred, mask and
    gradients, with the head on every row and on the masked rows only."""
    import copy

    from maefast.models import MaskedAutoencoderViT as FastMAE

    p = 14 if img_size[0] % 8 else 8
    torch.manual_seed(0)
    ref = FastMAE(img_size=img_size, patch_size=p, in_chans=in_chans, embed_dim=32, depth=1, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=1, norm_pix_loss=norm_pix_loss,
                  impl="reference")
    assert ref.patch_embed.grid_size == (img_size[0] // p, img_size[1] // p)
    L = ref.patch_embed.num_patches
    imgs, noise = torch.randn(2, in_chans, *img_size), torch.rand(2, L)
    loss0, pred0, mask0 = ref(imgs, mask_ratio=0.6, noise=noise)
    loss0.backward()
    g0 = {n: p_.grad for n, p_ in ref.named_parameters() if p_.grad is not None}
    tol, gtol = (1e-5, 1e-5) if device.type == "cpu" else (1e-4, 1e-3)
    for fused in (False, "block"):
        for return_pred in (True, False):
            m = copy.deepcopy(ref).to(device)
            m.impl, m.fused = "triton", fused
            m.zero_grad(set_to_none=True)
            loss, pred, mask = m(imgs.to(device), mask_ratio=0.6, noise=noise.to(device), return_pred=return_pred)
            assert torch.equal(mask.cpu(), mask0)
            assert abs(loss.item() - loss0.item()) <= tol * loss0.item(), (fused, return_pred)
            assert pred is None if not return_pred else _rel(pred.cpu(), pred0) <= tol
            loss.backward()
            for n, p_ in m.named_parameters():
                if n in g0:
                    assert _rel(p_.grad.cpu(), g0[n]) <= gtol, (fused, return_pred, n)


@pytest.mark.parametrize("change", [dict(hidden_act="gelu_new"), dict(hidden_act="relu"), dict(hidden_act="quick_gelu"),
                                    dict(qkv_bias=False), dict(layer_norm_eps=1e-12, num_channels=4),
                                    dict(num_channels=1, norm_pix_loss=True, mask_ratio=0.9)], ids=str)
@pytest.mark.parametrize("fused", [False, "block"])
def test_patched_transformers_model_maefasts_own_model_cannot_express(change, fused, device):
    """A ViTMAEConfig outside maefast's MAE (another activation, q/k/v without biases: from_transformers_model
    refuses it) or at transformers' defaults (eps 1e-12): maefast.patch runs it on the kernels (fused='block'
    where the block op computes it, else the plain composition) with transformers' loss, pred, mask, grads."""
    import copy
    import warnings

    import maefast
    from maefast.models.routing import SlowPathWarning

    cfg = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=1,
               decoder_intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(change)
    torch.manual_seed(0)
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**cfg)).train()
    with torch.no_grad():  # distinct weights (fresh LayerNorms and zero biases hide swaps)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if change.get("hidden_act") or change.get("qkv_bias") is False:
        with pytest.raises(ValueError, match="exact GELU and q/k/v biases"):
            from_transformers_model(hf)
    imgs, noise = torch.randn(2, cfg.get("num_channels", 3), 32, 32), torch.rand(2, 16)
    out = hf(pixel_values=imgs, noise=noise)
    out.loss.backward()
    fast = maefast.patch(copy.deepcopy(hf).to(device), impl="triton", fused=fused)
    fast.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        got = fast(pixel_values=imgs.to(device), noise=noise.to(device))
    tol, gtol = (1e-5, 1e-5) if device.type == "cpu" else (1e-4, 1e-3)
    assert torch.equal(got.mask.cpu(), out.mask) and torch.equal(got.ids_restore.cpu(), out.ids_restore)
    assert _rel(got.logits.cpu(), out.logits) <= tol
    assert abs(got.loss.item() - out.loss.item()) <= tol * abs(out.loss.item())
    got.loss.backward()
    want = dict(hf.named_parameters())
    scale = max(p.grad.abs().max().item() for p in want.values() if p.grad is not None)
    for n, p in fast.named_parameters():
        g = want[n].grad
        assert (p.grad is None) == (g is None), n
        if g is not None:  # (a key bias's gradient is zero up to rounding)
            assert _rel(p.grad.cpu(), g) <= gtol or (p.grad.cpu() - g).abs().max().item() <= 1e-7 * scale, n
