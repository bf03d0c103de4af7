"""maefast.nn.MaskedPatchEmbed, the drop-in module for the official ``patch_embed``: the official composition,
offset and pixel statistics passed on, a hooked/wrapped or other-geometry ``proj`` called as a module, sizes it
cannot embed refused, one graph under torch.compile (the op itself: tests/test_patch_embed.py)."""
import pytest
import torch

from maefast import reference as R
from maefast.nn import MaskedPatchEmbed
from maefast.testing import assert_close, randn


def test_module_matches_official_composition():
    torch.manual_seed(1)
    m = MaskedPatchEmbed(img_size=(32, 48), patch_size=8, in_chans=3, embed_dim=32)
    official = R.PatchEmbed(img_size=(32, 48), patch_size=8, in_chans=3, embed_dim=32)
    assert set(m.state_dict()) == set(official.state_dict()) == {"proj.weight", "proj.bias"}
    official.load_state_dict(m.state_dict())
    assert m.num_patches == official.num_patches == 24 and m.grid_size == (4, 6)
    imgs, noise, pos = randn(3, 3, 32, 48), torch.rand(3, 24), randn(1, 25, 32)
    tokens, mask, ids_restore = m(imgs, 0.75, pos_embed=pos, noise=noise)
    x = official(imgs) + pos[:, 1:]
    x_masked, mask_o, ids_restore_o = R.random_masking(x, 0.75, noise=noise)
    assert_close(tokens, x_masked, torch.float32, name="tokens vs official")
    assert torch.equal(mask, mask_o) and torch.equal(ids_restore, ids_restore_o)
    # Seeded: same mask again; rectangular image of another size works with a matching pos_embed.
    t1, m1, _ = m(imgs, 0.75, seed=9)
    t2, m2, _ = m(imgs, 0.75, seed=9)
    assert torch.equal(t1, t2) and torch.equal(m1, m2)
    t3, m3, r3 = m(randn(2, 3, 16, 40), 0.5, pos_embed=randn(1, 11, 32), seed=1)
    assert t3.shape == (2, 5, 32) and m3.shape == (2, 10) and r3.shape == (2, 10)


def test_module_passes_offset_and_pixel_statistics_on():
    """The module's Philox offset and uint8 mean/std reach the ops: the mask of (seed, offset) is the one the
    documented noise philox_noise(seed, offset) gives, and uint8 images embed as their normalisation does."""
    from maefast.reference.normalize import normalize
    from maefast.reference.philox import philox_noise

    torch.manual_seed(1)
    m = MaskedPatchEmbed(img_size=16, patch_size=8, in_chans=3, embed_dim=16, impl="reference")
    imgs = randn(2, 3, 16, 16)
    _, mask, ids_restore = m(imgs, 0.5, seed=7, offset=100)
    want = R.masking_ids(2, 4, 0.5, noise=philox_noise(2, 4, 7, 100))
    assert torch.equal(mask, want.mask) and torch.equal(ids_restore, want.ids_restore)
    u8 = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    noise = torch.rand(2, 4)
    got, _, _ = m(u8, 0.5, noise=noise, mean=mean, std=std)
    assert_close(got, m(normalize(u8, mean, std), 0.5, noise=noise)[0], torch.float32)


def test_module_calls_a_hooked_or_wrapped_projection():
    """A projection with hooks (the legacy weight_norm computes its weight in a forward pre-hook) or an
    adapter's children is called as a module, as the official patch_embed calls it: before, the op read a
    weight_norm'd proj's stale weight (silently wrong tokens after an optimizer step) and skipped its hooks."""
    import warnings

    from maefast.reference.normalize import normalize

    torch.manual_seed(3)
    m = MaskedPatchEmbed(img_size=16, patch_size=8, in_chans=3, embed_dim=16, impl="reference")
    official = R.PatchEmbed(img_size=16, patch_size=8, in_chans=3, embed_dim=16)
    official.load_state_dict(m.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy weight_norm is deprecated
        for mod in (m, official):
            torch.nn.utils.weight_norm(mod.proj)
    for mod in (m, official):
        with torch.no_grad():  # an optimizer step on the weight_norm parameters
            mod.proj.weight_g.mul_(2.0)
    imgs, noise, pos = randn(2, 3, 16, 16), torch.rand(2, 4), randn(1, 5, 16)
    seen = []
    m.proj.register_forward_hook(lambda *_: seen.append("proj"))
    tokens, mask, ids_restore = m(imgs, 0.5, pos_embed=pos, noise=noise)
    want, mask_o, ids_o = R.random_masking(official(imgs) + pos[:, 1:], 0.5, noise=noise)
    assert seen == ["proj"]
    assert_close(tokens, want, torch.float32, name="tokens of a weight_norm'd proj vs official")
    assert torch.equal(mask, mask_o) and torch.equal(ids_restore, ids_o)
    tokens.square().sum().backward()
    official_tokens = R.random_masking(official(imgs) + pos[:, 1:], 0.5, noise=noise)[0]
    official_tokens.square().sum().backward()
    assert_close(m.proj.weight_g.grad, official.proj.weight_g.grad, torch.float32, name="weight_g grad")
    u8 = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert_close(m(u8, 0.5, noise=noise)[0], m(normalize(u8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                                                0.5, noise=noise)[0], torch.float32)
    with pytest.raises(ValueError, match="pos_embed"):
        m(imgs, 0.5, pos_embed=pos[:, 1:], noise=noise)
    with pytest.raises(ValueError, match="imgs must not require grad"):
        m(imgs.requires_grad_(), 0.5, noise=noise)


def test_module_projection_of_other_geometry_is_called_or_refused():
    """A proj that is not a non-overlapping p x p patch conv (padding, here) is called as the official
    patch_embed calls it; one giving another number of tokens than the L patches masked is refused. Before,
    the op read its weight as a patch conv's: a padded conv's tokens were silently those without padding."""
    torch.manual_seed(4)
    imgs, noise, pos = randn(2, 3, 16, 16), torch.rand(2, 4), randn(1, 5, 16)
    m = MaskedPatchEmbed(img_size=16, patch_size=8, in_chans=3, embed_dim=16, impl="reference")
    m.proj = torch.nn.Conv2d(3, 16, 8, stride=8, padding=1)
    want = R.random_masking(m.proj(imgs).flatten(2).transpose(1, 2) + pos[:, 1:], 0.5, noise=noise)[0]
    assert_close(m(imgs, 0.5, pos_embed=pos, noise=noise)[0], want, torch.float32, name="padded proj vs official")
    m.proj = torch.nn.Conv2d(3, 16, 8, stride=4)
    with pytest.raises(ValueError, match="proj gives 9 tokens"):
        m(imgs, 0.5, pos_embed=pos, noise=noise)


def test_module_refuses_sizes_it_cannot_embed():
    with pytest.raises(ValueError, match="img_size"):
        MaskedPatchEmbed(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="patch_size"):
        MaskedPatchEmbed(img_size=32, patch_size=(8, 4))
    with pytest.raises(ValueError, match="imgs"):  # the images are wrong, not the weight
        MaskedPatchEmbed(img_size=16, patch_size=8, in_chans=3, embed_dim=16)(randn(2, 1, 16, 16), 0.5)


def test_compile_fullgraph():
    torch.manual_seed(2)
    pe = MaskedPatchEmbed(img_size=(16, 24), patch_size=8, in_chans=3, embed_dim=16, impl="reference")
    pos = randn(1, 7, 16)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pe = pe

        def forward(self, x, seed):
            tokens, mask, ids_restore = self.pe(x, 0.5, pos, seed=seed)
            return (tokens * tokens).sum() + mask.sum() + ids_restore.float().sum()

    model = Tiny()
    imgs = randn(2, 3, 16, 24)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(imgs, 7)
    out.backward()
    grad = pe.proj.weight.grad.clone()
    pe.zero_grad()
    eager = model(imgs, 7)
    eager.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, pe.proj.weight.grad)
