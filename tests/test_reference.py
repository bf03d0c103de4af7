"""The reference's semantics, checked directly against the official definitions."""
import math

import pytest
import torch

from maefast import reference as R


@pytest.mark.parametrize("C,H,W,p", [(3, 224, 224, 16), (3, 224, 224, 14), (3, 32, 48, 8), (1, 8, 4, 2)])
def test_patchify_order_and_roundtrip(C, H, W, p):
    imgs = torch.randn(2, C, H, W)
    x = R.patchify(imgs, p)
    h, w = H // p, W // p
    assert x.shape == (2, h * w, p * p * C)
    # token index = row*w + col; inside: (p_row*p + p_col)*C + c
    n, r, col, pr, pc, c = 1, h - 1, w // 2, p - 1, 1 % p, C - 1
    assert x[n, r * w + col, (pr * p + pc) * C + c] == imgs[n, c, r * p + pr, col * p + pc]
    assert torch.equal(R.unpatchify(x, p, (h, w), C), imgs)


def test_patchify_bad_inputs():
    with pytest.raises(ValueError, match="multiples of patch_size"):
        R.patchify(torch.randn(1, 3, 30, 32), 16)
    with pytest.raises(ValueError, match="imgs must have 4 dimensions"):
        R.patchify(torch.randn(3, 32, 32), 16)
    with pytest.raises(TypeError, match="imgs must be a floating point"):
        R.patchify(torch.ones(1, 3, 32, 32, dtype=torch.int64), 16)
    with pytest.raises(TypeError, match="patch_size"):
        R.patchify(torch.randn(1, 3, 32, 32), 16.0)
    with pytest.raises(ValueError, match="grid_size"):
        R.unpatchify(torch.randn(1, 6, 12), 2, (2, 2), 3)
    with pytest.raises(ValueError, match="not a square grid"):
        R.unpatchify(torch.randn(1, 6, 12), 2)


@pytest.mark.parametrize("N,L,ratio", [(1, 196, 0.75), (7, 256, 0.75), (3, 196, 0.5), (5, 49, 0.9), (2, 7, 0.3)])
def test_masking_matches_official_definition(N, L, ratio):
    noise = torch.rand(N, L)
    ids_keep, ids_restore, mask = R.masking_ids(N, L, ratio, noise=noise)
    K = int(L * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(ids_keep, ids_shuffle[:, :K])
    assert torch.equal(ids_restore, torch.argsort(ids_shuffle, dim=1))
    assert mask.dtype == torch.float32
    # kept = the K smallest noise values, mask 1 = removed in original order
    expect = torch.ones(N, L)
    expect.scatter_(1, ids_shuffle[:, :K], 0.0)
    assert torch.equal(mask, expect)
    assert torch.equal(mask.sum(1), torch.full((N,), float(L - K)))


def test_random_masking_tensor_form_gathers_kept_tokens():
    x = torch.randn(3, 16, 5)
    noise = torch.rand(3, 16)
    xm, mask, ids_restore = R.random_masking(x, 0.75, noise=noise)
    ids = R.random_masking((3, 16), 0.75, noise=noise)
    assert torch.equal(xm, torch.gather(x, 1, ids.ids_keep[..., None].expand(-1, -1, 5)))
    assert torch.equal(mask, ids.mask) and torch.equal(ids_restore, ids.ids_restore)
    g = torch.Generator().manual_seed(3)
    a = R.random_masking((2, 9), 0.5, generator=g)
    g = torch.Generator().manual_seed(3)
    b = R.random_masking((2, 9), 0.5, generator=g)
    assert torch.equal(a.ids_keep, b.ids_keep)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_mask_ratio_outside_the_official_domain(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must be in the interval \[0, 1\]"):
        R.masking_ids(2, 16, ratio)


@pytest.mark.parametrize("ratio,keep", [(0.0, 16), (0.9, 1), (0.97, 0), (1.0, 0)])
def test_mask_ratio_official_domain(ratio, keep):
    # the official code keeps floor(L*(1-r)) for any r in [0, 1], none at all included
    ids = R.masking_ids(2, 16, ratio, noise=torch.rand(2, 16))
    assert ids.ids_keep.shape == (2, keep)
    assert torch.equal(ids.mask.sum(1), torch.full((2,), 16.0 - keep))
    x = torch.randn(2, 16, 8)
    x_masked, mask, ids_restore = R.random_masking(x, ratio, noise=torch.rand(2, 16))
    assert x_masked.shape == (2, keep, 8) and mask.sum() == 2 * (16 - keep)


def test_masking_bad_inputs():
    with pytest.raises(TypeError, match="mask_ratio"):
        R.masking_ids(2, 4, "0.5")
    with pytest.raises(ValueError, match="noise must have shape"):
        R.masking_ids(2, 16, 0.75, noise=torch.rand(2, 15))
    with pytest.raises(TypeError, match="x must be"):
        R.random_masking("x", 0.75)


def test_pos_embed_layout():
    D, h, w = 16, 3, 5
    pe = R.get_2d_sincos_pos_embed(D, (h, w), cls_token=True)
    assert pe.shape == (1 + h * w, D) and pe.dtype == torch.float32
    assert torch.equal(pe[0], torch.zeros(D))
    r, c = 2, 4
    row = pe[1 + r * w + c].double()
    k = torch.arange(D // 4, dtype=torch.float64)
    omega = 1.0 / 10000 ** (k / (D / 4))
    col_half = torch.cat([torch.sin(c * omega), torch.cos(c * omega)])  # first half: the column
    row_half = torch.cat([torch.sin(r * omega), torch.cos(r * omega)])
    assert torch.allclose(row, torch.cat([col_half, row_half]).float().double(), atol=1e-7)
    with pytest.raises(ValueError, match="multiple of 4"):
        R.get_2d_sincos_pos_embed(10, 4)
    # computed on the CPU, as the official numpy code, whatever the default device (bench.build_model builds under
    # `with torch.device("cuda")`, whose float64 sin/cos are other functions; meta would give no values at all)
    with torch.device("meta"):
        assert torch.equal(R.get_2d_sincos_pos_embed(D, (h, w), cls_token=True), pe)


def test_pos_embed_matches_transformers_init():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                    decoder_intermediate_size=32, image_size=48, patch_size=8)
    emb = transformers.ViTMAEForPreTraining(cfg).vit.embeddings
    # transformers 5.x may skip this init at construction (its lazy-init flag); run it explicitly.
    emb.patch_embeddings.projection._is_hf_initialized = False
    with torch.no_grad():
        emb.initialize_weights()
    ours = R.get_2d_sincos_pos_embed(32, 6, cls_token=True)
    assert emb.position_embeddings.abs().sum() > 0
    assert torch.allclose(emb.position_embeddings[0].detach(), ours, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.01])  # 0.01: per-patch variance ~1e-4, where eps 1e-6 vs 1e-5 shows
@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_definition(norm_pix, scale):
    imgs = torch.randn(2, 3, 32, 32) * scale
    p = 8
    pred = torch.randn(2, 16, p * p * 3)
    mask = R.masking_ids(2, 16, 0.75).mask
    loss = R.forward_loss(imgs, pred, mask, p, norm_pix)
    t = R.patchify(imgs, p).double()
    if norm_pix:
        m = t.mean(-1, keepdim=True)
        v = ((t - m) ** 2).sum(-1, keepdim=True) / (t.shape[-1] - 1)  # unbiased
        t = (t - m) / torch.sqrt(v + 1e-6)
    per = ((pred.double() - t) ** 2).mean(-1)
    expect = (per * mask).sum() / mask.sum()
    assert math.isclose(loss.item(), expect.item(), rel_tol=1e-5)


def test_loss_constant_patch_is_finite():
    imgs = torch.randn(1, 3, 16, 16)
    imgs[..., :8, :8] = 0.3  # one constant patch: var 0 -> divided by sqrt(1e-6), stays finite
    pred = torch.randn(1, 4, 192)
    loss = R.forward_loss(imgs, pred, torch.ones(1, 4), 8, True)
    assert torch.isfinite(loss)


def test_loss_bad_inputs():
    imgs = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="pred must have shape"):
        R.forward_loss(imgs, torch.randn(2, 16, 10), torch.ones(2, 16), 8)
    with pytest.raises(ValueError, match="mask must have shape"):
        R.forward_loss(imgs, torch.randn(2, 16, 192), torch.ones(2, 15), 8)


def test_unshuffle_and_masked_patch_embed_match_official_composition():
    torch.manual_seed(0)
    m = R.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                               decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    ids = R.masking_ids(3, 16, 0.75, noise=noise)
    x = m.patch_embed(imgs) + m.pos_embed[:, 1:]
    x_official, _, _ = m.random_masking(x, 0.75, noise)
    x_ours = R.masked_patch_embed(imgs, ids.ids_keep, m.patch_embed.proj.weight, m.patch_embed.proj.bias,
                                  m.pos_embed, 8)
    assert torch.allclose(x_official, x_ours, atol=1e-6)
    xv = torch.randn(3, 1 + 4, 16)
    dec = m.decoder_embed  # the official decoder's un-shuffle, minus the embed
    mask_tokens = m.mask_token.repeat(3, 16 + 1 - 5, 1)
    x_ = torch.cat([xv[:, 1:], mask_tokens], 1)
    x_ = torch.gather(x_, 1, ids.ids_restore[..., None].repeat(1, 1, 16))
    expect = torch.cat([xv[:, :1], x_], 1) + m.decoder_pos_embed
    assert dec is not None
    assert torch.allclose(R.unshuffle(xv, m.mask_token, ids.ids_restore, m.decoder_pos_embed), expect)


def test_reference_attention_matches_sdpa():
    qkv = torch.randn(2, 50, 3 * 4 * 16, dtype=torch.float64)
    out = R.attention(qkv, 4)
    q, k, v = qkv.reshape(2, 50, 3, 4, 16).permute(2, 0, 3, 1, 4)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 50, 64)
    assert torch.allclose(out, ref, atol=1e-10)
    cu = torch.tensor([0, 3, 10, 50])
    packed = R.attention(qkv[:1], 4, cu_seqlens=cu)
    assert torch.allclose(packed[0, 3:10], R.attention(qkv[:1, 3:10], 4)[0], atol=1e-12)


def test_model_official_keys_and_init():
    from maefast.models import mae_vit_base_patch16

    m = R.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                               decoder_depth=1, decoder_num_heads=2)
    keys = set(m.state_dict())
    for k in ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.1.norm1.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.norm2.bias",
              "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "decoder_embed.weight", "mask_token",
              "decoder_pos_embed", "decoder_blocks.0.attn.qkv.weight", "decoder_norm.weight", "decoder_pred.weight"]:
        assert k in keys, k
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    # the official class's own default, norm_layer=nn.LayerNorm (the paper factories pass eps 1e-6)
    assert m.norm.eps == 1e-5 and m.blocks[0].norm1.eps == 1e-5
    assert torch.equal(m.blocks[0].attn.qkv.bias, torch.zeros(96))
    assert isinstance(m.blocks[0].mlp.act, torch.nn.GELU) and m.blocks[0].mlp.act.approximate == "none"
    with torch.device("meta"):
        b = mae_vit_base_patch16()
    assert b.pos_embed.shape == (1, 197, 768) and len(b.blocks) == 12 and len(b.decoder_blocks) == 8
    assert b.decoder_pred.out_features == 768


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_model_initialisation_is_the_official(fast):
    """models_mae.py's initialize_weights: xavier_uniform on every Linear and on patch_embed.proj viewed
    as 2-D (out, C*p*p), zero Linear biases, LayerNorm 1 / 0, cls_token and mask_token normal(std 0.02); the
    oracle (transformers) is handed our weights, so it cannot see the initialisation."""
    from maefast.models import MaskedAutoencoderViT as Fast

    torch.manual_seed(0)
    cls = Fast if fast else R.MaskedAutoencoderViT
    m = cls(img_size=32, patch_size=8, embed_dim=256, depth=1, num_heads=4, decoder_embed_dim=512, decoder_depth=1,
            decoder_num_heads=4)

    def near_bound(w, bound, name):  # uniform(-bound, bound): the largest |w| of thousands of draws is near it
        top = w.abs().max().item()
        assert 0.95 * bound < top <= bound, f"{name}: max |w| {top:.4g}, xavier bound {bound:.4g}"

    w = m.patch_embed.proj.weight
    near_bound(w, math.sqrt(6 / (w[0].numel() + w.shape[0])), "patch_embed.proj.weight")  # 4-D xavier: 8x smaller
    b = m.patch_embed.proj.bias  # not re-initialised by the official code: Conv2d's own uniform(1 / sqrt(fan_in))
    assert b.any() and b.abs().max().item() <= w[0].numel() ** -0.5
    n_linear = 0
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            near_bound(mod.weight, math.sqrt(6 / (mod.in_features + mod.out_features)), name)
            assert mod.bias is None or not mod.bias.any(), name
            n_linear += 1
        elif isinstance(mod, torch.nn.LayerNorm):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)) and not mod.bias.any(), name
    assert n_linear == 2 * 4 + 2  # two blocks of qkv/proj/fc1/fc2, decoder_embed, decoder_pred
    for name in ("cls_token", "mask_token"):
        std = getattr(m, name).std().item()
        assert 0.017 < std < 0.023, (name, std)


def test_model_rectangular_and_bad_inputs():
    m = R.MaskedAutoencoderViT(img_size=(32, 48), patch_size=8, embed_dim=32, depth=1, num_heads=2,
                               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 48)
    loss, pred, mask = m(imgs, 0.75)
    assert pred.shape == (2, 24, 192) and mask.shape == (2, 24) and torch.isfinite(loss)
    loss.backward()
    with pytest.raises(ValueError, match="imgs must be 32x48"):
        m(torch.randn(2, 3, 48, 32))
    with pytest.raises(ValueError, match="3 channels"):
        m(torch.randn(2, 1, 32, 48))
    with pytest.raises(ValueError, match="noise must have shape"):
        m(imgs, noise=torch.rand(2, 23))
    with pytest.raises(ValueError, match="mask_ratio"):
        m(imgs, mask_ratio=1.01)  # outside the official code's [0, 1]
    with pytest.raises(ValueError, match="multiple of patch_size"):
        R.MaskedAutoencoderViT(img_size=30, patch_size=8)


def test_imagenet_statistics_are_the_official_ones():
    """The normalisation every path uses (uint8 kernels, the loaders, the reference): the official
    main_pretrain.py's Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), timm's
    IMAGENET_DEFAULT_MEAN / _STD. Every other test reads these constants from the code it tests, so
    only this one would notice a changed digit; and there is one definition of them."""
    from maefast.reference.normalize import IMAGENET_MEAN, IMAGENET_STD
    from maefast.train import augment, data

    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    assert augment.IMAGENET_MEAN is IMAGENET_MEAN and augment.IMAGENET_STD is IMAGENET_STD
    assert data.IMAGENET_MEAN is IMAGENET_MEAN and data.IMAGENET_STD is IMAGENET_STD


@pytest.mark.parametrize("dim, heads", [(768, 12), (512, 16), (1280, 16)])  # head dims 64, 32 (decoder), 80 (ViT-H)
def test_reference_attention_is_timms_bit_for_bit(dim, heads):
    """The official model's Attention (timm 0.3.2, as written there) and the reference give the same bits in
    fp32: the scale multiplies q @ k^T (scaling q first differed in the last bit where the scale is not a
    power of two: head dims 32 and 80, the decoder and ViT-H)."""
    torch.manual_seed(0)
    qkv_lin = torch.nn.Linear(dim, 3 * dim)
    x = torch.randn(2, 50, dim)

    def timm_attention(x):  # timm 0.3.2 vision_transformer.Attention.forward, projection left out
        B, N, C = x.shape
        qkv = qkv_lin(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
        attn = attn.softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(B, N, C)

    with torch.no_grad():
        assert torch.equal(R.attention(qkv_lin(x), heads), timm_attention(x))


def test_unpatchify_names_a_bad_patch_vector_length():
    # 13 values per patch is not p*p*C = 12: a ValueError naming x, not a raw reshape error
    with pytest.raises(ValueError, match="^x "):
        R.unpatchify(torch.randn(1, 4, 13), 2, (2, 2), 3)


def test_masking_ties_keep_index_order():
    # noise with ties (quantised): the documented stable order, i.e. argsort of (noise, index) pairs; L = 196 is
    # long enough that torch's unstable argsort orders ties otherwise
    N, L, ratio = 3, 196, 0.75
    noise = torch.randint(0, 3, (N, L)).float()
    K = int(L * (1 - ratio))
    shuffle = torch.argsort(noise.double() * L + torch.arange(L, dtype=torch.float64), dim=1)  # distinct keys
    ids = R.masking_ids(N, L, ratio, noise=noise)
    assert torch.equal(ids.ids_keep, shuffle[:, :K])
    assert torch.equal(ids.ids_restore, torch.argsort(shuffle, dim=1))


def test_masking_refuses_integer_noise_and_empty_shapes():
    with pytest.raises(TypeError, match="noise"):
        R.masking_ids(2, 16, 0.75, noise=torch.randint(0, 100, (2, 16)))
    for shape in [(0, 16), (2, 0)]:
        with pytest.raises(ValueError, match="shape"):
            R.random_masking(shape, 0.75)


def test_random_masking_tensor_form_draws_from_the_generator():
    x = torch.randn(2, 16, 4)
    outs = [R.random_masking(x, 0.5, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    want = R.random_masking((2, 16), 0.5, generator=torch.Generator().manual_seed(5))
    for xm, mask, ids_restore in outs:  # the same draw each time: the generator's, not torch's default one
        assert torch.equal(mask, want.mask) and torch.equal(ids_restore, want.ids_restore)
        assert torch.equal(xm, torch.gather(x, 1, want.ids_keep[..., None].expand(-1, -1, 4)))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_on_masked_rows_is_the_official_loss(norm_pix):
    """forward_loss_masked: row j of sample n predicts patch ids_shuffle[n, K + j] (ids_shuffle = argsort(noise));
    written out from the official definition (ratio 0.75: K != M, so len_keep = L - M is pinned)."""
    N, p, L, ratio = 3, 8, 16, 0.75
    imgs = torch.randn(N, 3, 32, 32)
    noise = torch.rand(N, L)
    ids = R.masking_ids(N, L, ratio, noise=noise)
    K = int(L * (1 - ratio))
    masked = torch.argsort(noise, dim=1)[:, K:]
    assert torch.equal(R.masked_patch_ids(ids.ids_restore, K), masked)
    pred = torch.randn(N, L - K, p * p * 3, dtype=torch.float64)
    t = R.patchify(imgs, p).double()
    if norm_pix:
        m = t.mean(-1, keepdim=True)
        t = (t - m) / torch.sqrt(((t - m) ** 2).sum(-1, keepdim=True) / (t.shape[-1] - 1) + 1e-6)
    t = torch.stack([t[n, masked[n]] for n in range(N)])
    expect = ((pred - t) ** 2).mean(-1).mean()
    loss = R.forward_loss_masked(imgs.double(), pred, ids.ids_restore, p, norm_pix)
    assert math.isclose(loss.item(), expect.item(), rel_tol=1e-12)


def test_reference_attention_packed_sequences_take_the_scale():
    qkv = torch.randn(1, 12, 3 * 2 * 8, dtype=torch.float64)
    out = R.attention(qkv, 2, scale=0.3, cu_seqlens=torch.tensor([0, 5, 12]))
    for s, e in [(0, 5), (5, 12)]:  # each sequence alone, through torch's SDPA with the same scale
        q, k, v = qkv[:, s:e].reshape(1, e - s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
        want = want.transpose(1, 2).reshape(1, e - s, 16)
        assert torch.allclose(out[:, s:e], want, atol=1e-12)


def test_reference_attention_no_packed_sequence():
    # cu_seqlens [0]: no sequence at all -> (0, H*Dh) rows, the width of the output, not of qkv
    assert R.attention(torch.randn(0, 3 * 16), 2, cu_seqlens=torch.tensor([0])).shape == (0, 16)
    assert R.attention(torch.randn(1, 0, 3 * 16), 2, cu_seqlens=torch.tensor([0])).shape == (1, 0, 16)


def test_unshuffle_adds_the_whole_position_embedding():
    # a position embedding whose cls row is not zero (a loaded or learned one): the official adds all 1 + L rows
    xv, token, pos = torch.randn(2, 1 + 3, 8), torch.randn(1, 1, 8), torch.randn(1, 1 + 6, 8)
    ids_restore = torch.stack([torch.randperm(6) for _ in range(2)])
    x_ = torch.gather(torch.cat([xv[:, 1:], token.repeat(2, 3, 1)], 1), 1, ids_restore[..., None].repeat(1, 1, 8))
    assert torch.equal(R.unshuffle(xv, token, ids_restore, pos), torch.cat([xv[:, :1], x_], 1) + pos)


def test_model_cls_token_takes_the_first_position_row():
    """cls_token + pos_embed[:, 0] (the official; a loaded or resized pos_embed may hold a non-zero cls row)."""
    m = R.MaskedAutoencoderViT(img_size=16, patch_size=8, embed_dim=16, depth=0, num_heads=2, decoder_embed_dim=8,
                               decoder_depth=0, decoder_num_heads=2)
    with torch.no_grad():
        m.pos_embed[:, 0] = torch.randn(16)
    latent, _, _ = m.forward_encoder(torch.randn(2, 3, 16, 16), 0.5, torch.rand(2, 4))
    assert torch.allclose(latent[:, 0], m.norm(m.cls_token[0] + m.pos_embed[:, 0]).expand(2, 16), atol=1e-6)


def test_reference_block_refuses_drop_path():
    """MAE pre-training has no drop path: the reference block refuses a rate rather than ignore it."""
    with pytest.raises(ValueError, match="drop_path"):
        R.Block(16, 2, drop_path=0.1)
    assert R.Block(16, 2, drop_path=0.0).mlp.fc1.out_features == 64


def test_model_refuses_a_non_square_patch_and_a_partial_patch_on_either_side():
    small = dict(embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(ValueError, match="patch_size must be square"):  # the official patchify reads p x p
        R.MaskedAutoencoderViT(img_size=32, patch_size=(8, 4), **small)
    for size in ((32, 30), (30, 32)):  # either side alone leaves a partial patch
        with pytest.raises(ValueError, match="multiple of patch_size"):
            R.MaskedAutoencoderViT(img_size=size, patch_size=8, **small)


def test_reference_attention_takes_qk_scale():
    """timm's qk_scale replaces head_dim ** -0.5 (the official MAE passes None, the default)."""
    torch.manual_seed(0)
    a = R.Attention(16, 2, qkv_bias=True, qk_scale=0.5).double()
    assert a.scale == 0.5 and R.Attention(16, 2).scale == 8 ** -0.5
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = a.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        want = a.proj(((q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
        assert torch.allclose(a(x), want, rtol=1e-12, atol=1e-12)


def test_model_defaults_are_the_official_constructors():
    """models_mae.py's defaults: ViT-L/16 on 224 x 224 images, a decoder of 8 x 512 with 16 heads, mlp_ratio 4,
    nn.LayerNorm (eps 1e-5) and norm_pix_loss False."""
    import inspect

    got = {k: v.default for k, v in inspect.signature(R.MaskedAutoencoderViT).parameters.items()}
    assert got == dict(img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                       decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                       norm_layer=torch.nn.LayerNorm, norm_pix_loss=False)


def test_model_refuses_a_width_its_heads_do_not_split():
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=3"):
        R.Attention(10, 3)
    small = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8, decoder_depth=1)
    with pytest.raises(ValueError, match="dim=8 must be divisible by num_heads=3"):
        R.MaskedAutoencoderViT(**small, decoder_num_heads=3)


def test_model_mlp_ratio_sizes_encoder_and_decoder_mlps():
    """The official passes mlp_ratio to the decoder blocks too: int(width * mlp_ratio) hidden units in both."""
    m = R.MaskedAutoencoderViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8,
                               decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.5)
    assert m.blocks[0].mlp.fc1.out_features == 40 and m.decoder_blocks[0].mlp.fc1.out_features == 20
    assert m(torch.randn(2, 3, 16, 16), 0.5)[1].shape == (2, 4, 192)


def test_model_position_embeddings_are_the_sincos_table_of_its_grid():
    """initialize_weights fills pos_embed and decoder_pos_embed with the 2-D sin-cos table of the (h, w) patch grid
    at each width, cls row first; on a rectangular image a transposed grid (w, h) gives other rows, as does a
    table never written (zeros)."""
    m = R.MaskedAutoencoderViT(img_size=(16, 40), patch_size=8, embed_dim=16, depth=0, num_heads=2,
                               decoder_embed_dim=8, decoder_depth=0, decoder_num_heads=2)
    assert m.patch_embed.grid_size == (2, 5) and m.patch_embed.num_patches == 10
    for name, width in (("pos_embed", 16), ("decoder_pos_embed", 8)):
        want = R.get_2d_sincos_pos_embed(width, (2, 5), cls_token=True)
        assert torch.equal(getattr(m, name)[0], want), name


def test_model_linears_have_the_official_biases_and_modules_their_timm_defaults():
    """The official model builds every Linear with a bias (qkv_bias=True in the encoder and decoder blocks, timm's
    proj / fc1 / fc2, decoder_embed, decoder_pred): a missing one drops a parameter and its key. timm 0.3.2's own
    defaults: Attention without a qkv bias, Mlp with hidden = out = in_features."""
    m = R.MaskedAutoencoderViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8,
                               decoder_depth=1, decoder_num_heads=2)
    linears = {n: mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert len(linears) == 10 and [n for n, mod in linears.items() if mod.bias is None] == []
    a = R.Attention(16, 2)
    assert a.qkv.bias is None and a.proj.bias is not None
    mlp = R.Mlp(16)
    assert (mlp.fc1.out_features, mlp.fc2.in_features, mlp.fc2.out_features) == (16, 16, 16)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_model_takes_a_square_patch_size_pair(fast):
    """PatchEmbed takes an int or a pair (to_2tuple) and refuses a non-square pair by name, so (8, 8) is the
    model of patch_size=8: the same parameters and state-dict keys, the same loss (decoder_pred's width was
    once `patch_size ** 2`: a TypeError naming nothing for a pair)."""
    from maefast.models import MaskedAutoencoderViT as Fast

    cls = Fast if fast else R.MaskedAutoencoderViT
    small = dict(img_size=16, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8, decoder_depth=1,
                 decoder_num_heads=2)
    m = cls(patch_size=(8, 8), **small)
    want = cls(patch_size=8, **small)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in want.state_dict().items()}
    m.load_state_dict(want.state_dict())
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 4)
    assert torch.equal(m(imgs, noise=noise)[0], want(imgs, noise=noise)[0])
    with pytest.raises(ValueError, match="patch_size must be square"):
        cls(patch_size=(8, 4), **small)


def test_one_channel_rectangular_model_round_trips_its_patches_and_checks_both_sides():
    """in_chans and the (h, w) grid reach the model's helpers: a one-channel 16 x 40 model predicts p * p values per
    patch, unpatchify(patchify(imgs)) gives the images back, and images of another channel count, or of the right
    height but another width, are refused naming what the model takes."""
    m = R.MaskedAutoencoderViT(img_size=(16, 40), patch_size=8, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                               decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(2, 1, 16, 40)
    assert torch.equal(m.unpatchify(m.patchify(imgs)), imgs)
    loss, pred, mask = m(imgs, 0.5)
    assert pred.shape == (2, 10, 64) and mask.shape == (2, 10) and torch.isfinite(loss)
    with pytest.raises(ValueError, match="1 channels"):
        m(torch.randn(2, 3, 16, 40))
    with pytest.raises(ValueError, match="imgs must be 16x40"):
        m(torch.randn(2, 1, 16, 16))
