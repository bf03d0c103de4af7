"""The Triton patch-embedding kernels (kernels/patch_embed.py) at their edges, against the reference
backend: ids just outside [0, L) (a NaN row and no gradient, the contract of ids a GPU does not
check), and a shape past one tile in every direction (embedding width, K = C*p*p not a multiple of the
K block, rows past one block and the split backward's last, short partial), and the uint8 prologue's
normalisation bit for bit. Small shapes: the interpreter runs them here; tests/test_patch_embed.py
has the paper shapes and the dtype sweep."""
import pytest
import torch

from maefast.ops.patch_embed import _masked_patch_embed_backward_op, _masked_patch_embed_op
from maefast.reference.normalize import IMAGENET_MEAN, IMAGENET_STD
from maefast.testing import assert_close, randn
from test_patch_embed import _check_against_reference, needs_triton

pytestmark = needs_triton


@pytest.mark.parametrize("kind", ["float", "uint8"])
def test_ids_just_outside_the_grid_give_nan_rows_and_no_gradient(device, kind):
    """-1 and L (the first id past the grid: an off-by-one in the kernel's bound check reads the next
    sample's patch) as well as a far id: NaN token rows, and neither the weight's nor pos_embed's
    gradient takes anything from those rows, as on the reference backend."""
    N, C, H, W, p, D = 3, 3, 16, 24, 8, 8
    L = (H // p) * (W // p)
    if kind == "uint8":
        imgs = torch.randint(0, 256, (N, C, H, W), dtype=torch.uint8, device=device)
        stats = (list(IMAGENET_MEAN), list(IMAGENET_STD))
    else:
        imgs, stats = randn(N, C, H, W, device=device), (None, None)
    ids = torch.tensor([[0, L, 3], [-1, 2, 5], [L + 5, 1, L]], device=device)
    bad = (ids < 0) | (ids >= L)
    w = randn(D, C, p, p, device=device, scale=(C * p * p) ** -0.5)
    b, pos = randn(D, device=device), randn(1, 1 + L, D, device=device)
    out = {impl: _masked_patch_embed_op._maefast_impl(imgs, ids, w, b, pos, p, impl, *stats)
           for impl in ("triton", "reference")}
    assert torch.isnan(out["triton"][bad]).all() and torch.isfinite(out["triton"][~bad]).all()
    assert_close(out["triton"], out["reference"], torch.float32, name="tokens", equal_nan=True)
    g = randn(N, 3, D, device=device)
    dw, _, dpos = _masked_patch_embed_backward_op._maefast_impl(g, imgs, ids, w, pos, p, True, "triton", *stats)
    want_dw, _, want_dpos = _masked_patch_embed_backward_op._maefast_impl(g, imgs, ids, w, pos, p, True, "reference",
                                                                          *stats)
    assert_close(dw, want_dw, torch.float32, name="grad weight")
    assert_close(dpos, want_dpos, torch.float32, name="grad pos_embed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_shape_past_one_tile_everywhere(device, dtype):
    """D = 72 (two 64-wide forward tiles, three 32-wide backward ones), K = 3*6*6 = 108 (the last
    K block part full), L = 15 patches, 36 rows (past one 32-row block; the weight backward's second
    split holds 4 rows) and 3 samples (the position backward's second split holds one)."""
    _check_against_reference("triton", (3, 3, 18, 30, 6, 72, 0.2), dtype, device)


def test_uint8_pixels_are_the_fold_bit_for_bit(device):
    """kernels/_pixels.py computes (v - offset_c) * scale_c in fp32, the fold whose rounding
    maefast/ops/_pixels.py bounds (test_uint8.py::test_folded_affine_rounding): an identity weight
    makes the tokens the normalised patch rows themselves (one product of 1 per sum: exact), so every
    value 0..255 of every channel (4: the last factor slot too) must come out as the fold gives it."""
    from maefast.ops._pixels import pixel_affine

    N, C, p = 1, 4, 4
    u = torch.stack([torch.randperm(256) for _ in range(C)]).reshape(N, C, 16, 16).to(torch.uint8).to(device)
    L, KD = 16, C * p * p
    ids = torch.randperm(L).reshape(N, L).to(device)
    stats = ((0.3, 0.45, 0.5, 0.6), (0.2, 0.25, 0.3, 0.35))
    w = torch.eye(KD, device=device).reshape(KD, C, p, p)
    out = _masked_patch_embed_op._maefast_impl(u, ids, w, None, None, p, "triton", *map(list, stats))
    scale, offset = (torch.tensor(f, device=device).repeat_interleave(p * p) for f in pixel_affine(stats))
    rows = u.reshape(N, C, 4, p, 4, p).permute(0, 2, 4, 1, 3, 5).reshape(N, L, KD)[:, ids[0]]
    assert torch.equal(out, (rows.float() - offset) * scale)
