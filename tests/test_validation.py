"""Bad and unusual inputs to the public ops: each one checked or handled in every backend — no
out-of-bounds kernel access, no silently wrong result, errors that name the argument (issue 17).

Backends: the reference and Triton (interpreted on a CPU machine); `cuda`-marked tests run the
on-device contracts (values trusted, no host sync) on a GPU, impl="cuda" included. Attention's
offsets (cu_seqlens, max_seqlen, int32 columns): tests/test_attention_offsets.py. What is checked
where: maefast/_validate.py and the README ("The ops").
"""
from __future__ import annotations

import sys

import pytest
import torch

from maefast import _validate as V
from maefast import reference as R
from maefast._triton import HAS_TRITON
from maefast.models import mae_vit_tiny_test
from maefast.nn import MaskedPatchEmbed, NormPixLoss
from maefast.ops import (masked_patch_embed, masked_patch_ids, masked_prediction_loss, norm_pix_loss, random_masking,
                         unshuffle, visible_attention)
from maefast.testing import assert_close, randn

unshuffle_mod = sys.modules["maefast.ops.unshuffle"]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
IMPLS = [pytest.param("triton", marks=needs_triton), "reference"]
H, DH = 2, 16  # attention cases: 2 heads of 16


# -- unshuffle: ids_restore -------------------------------------------------------------------------

def _unshuffle_inputs(N=2, L=8, K=3, D=16):
    x = randn(N, 1 + K, D).requires_grad_()
    tok = randn(1, 1, D).requires_grad_()
    pos = randn(1, 1 + L, D).requires_grad_()
    return x, tok, pos


BAD_IDS = {"duplicate": [0, 0, 2, 3, 4, 5, 6, 7], "zeros": [0] * 8, "equal-L": [0, 1, 2, 3, 4, 5, 6, 8],
           "negative": [-1, 1, 2, 3, 4, 5, 6, 7]}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD_IDS))
@pytest.mark.no_triton_launch  # a refusal / meta tensors: no kernel runs
def test_unshuffle_refuses_a_non_permutation(impl, case):
    """One contract for every backend: ids_restore is a permutation (checked where free). Before:
    the forward ran and the gradients were wrong in both backends (a duplicate, a row of zeros), and
    an out-of-range id was a mask token in Triton but an IndexError-like RuntimeError in the reference."""
    x, tok, pos = _unshuffle_inputs()
    ids = torch.tensor([list(range(8)), BAD_IDS[case]])
    with pytest.raises(ValueError, match="ids_restore must hold a permutation"):
        unshuffle(x, tok, ids, pos, impl=impl)


def test_unshuffle_reference_gradient_is_exact_for_any_ids():
    """Below the host check (a GPU run), the reference backend's gradient is the exact gradient of its
    forward even for a visible token placed twice (accumulated; a scatter kept one of the two)."""
    x, tok, pos = _unshuffle_inputs()
    ids = torch.tensor([[0, 0, 2, 5, 1, 9, 6, 7], [2, 2, 2, 3, 4, -1, 0, 0]])
    out = unshuffle_mod._unshuffle_op(x, tok, ids, pos, "reference")
    K = x.shape[1] - 1
    vis = (ids >= 0) & (ids < K)
    want = torch.where(vis[..., None], x[:, 1:][torch.arange(2)[:, None], ids.clamp(0, K - 1)], tok.expand(2, 8, -1))
    want = torch.cat([x[:, :1], want], 1) + pos
    g = randn(*out.shape)
    assert_close(out, want, torch.float32, name="out")
    for name, a, b in zip(("x_vis", "mask_token", "pos_embed"), torch.autograd.grad(out, (x, tok, pos), g),
                          torch.autograd.grad(want, (x, tok, pos), g)):
        assert_close(a, b, torch.float32, name=f"grad {name}")


# -- masked_patch_embed: ids_keep ----------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_patch_embed_out_of_range_ids_give_nan_rows_and_no_gradient(impl):
    """The on-device contract (ids_keep not checked on a GPU), through the custom op: an id outside
    [0, L) gives a NaN row and no weight/pos_embed gradient, in every backend (before: the
    reference's gather raised)."""
    pe_mod = sys.modules["maefast.ops.patch_embed"]
    imgs, L = randn(2, 3, 16, 16), 16
    w, b, pos = randn(8, 3, 4, 4).requires_grad_(), randn(8).requires_grad_(), randn(1, 17, 8).requires_grad_()
    ids = torch.tensor([[0, 5, -1, 3], [16, 2, 7, 1000]])
    ok = ((ids >= 0) & (ids < L)).unsqueeze(-1)
    out = pe_mod._masked_patch_embed_op(imgs, ids, w, b, pos, 4, impl)
    want = R.masked_patch_embed(imgs, ids.clamp(0, L - 1), w, b, pos, 4)
    assert out.masked_select(~ok).isnan().all()
    assert_close(out.masked_fill(~ok, 0), want.masked_fill(~ok, 0), torch.float32, name="out")
    g = randn(*out.shape)
    got = torch.autograd.grad(out, (w, b, pos), g)
    ref = torch.autograd.grad(want, (w, pos), g * ok)
    assert_close(got[0], ref[0], torch.float32, name="grad weight")
    assert_close(got[2], ref[1], torch.float32, name="grad pos_embed")
    assert_close(got[1], g.sum((0, 1)), torch.float32, name="grad bias")


# -- loss: ids_restore, NaN, the masked head's weights ----------------------------------------------

def _loss_case(N=2, p=4, C=3, S=16, ratio=0.75):
    imgs = randn(N, C, S, S)
    L = (S // p) ** 2
    ids = R.masking_ids(N, L, ratio, noise=torch.rand(N, L))
    return imgs, ids, L, p * p * C


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["duplicate", "equal-L"])
@pytest.mark.no_triton_launch  # a refusal / meta tensors: no kernel runs
def test_loss_masked_refuses_a_non_permutation(impl, case):
    """Before: a duplicate id gave a different loss per backend with no error; id == L passed the
    reference silently and raised an unclear error in Triton."""
    imgs, ids, L, P = _loss_case()
    bad = ids.ids_restore.clone()
    if case == "duplicate":
        bad[1, 0] = bad[1, 1]
    else:
        bad[1, bad[1].argmax()] = L
    K = ids.ids_keep.shape[1]
    pred = randn(2, L - K, P).requires_grad_()
    with pytest.raises(ValueError, match="ids_restore must hold a permutation"):
        norm_pix_loss(pred, imgs, bad, 4, pred_on="masked", impl=impl)
    dec, w, b = randn(2, 1 + L, 32), randn(P, 32), randn(P)
    with pytest.raises(ValueError, match="ids_restore must hold a permutation"):
        masked_prediction_loss(dec, w, b, imgs, bad, K, 4, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
def test_loss_nan_in_a_visible_patch(impl, norm):
    """pred_on="all" follows the official loss: a NaN in an unmasked image patch makes the loss NaN
    (0 * NaN) and that row's gradient NaN, in every backend (before: Triton skipped the patch and
    returned a finite loss). pred_on="masked" never reads visible patches (as forward_loss_masked),
    in every backend: the loss is the one without the NaN."""
    imgs, ids, L, P = _loss_case()
    n, l = 1, int((ids.mask[1] == 0).nonzero()[0, 0])  # a visible patch of sample 1
    bad = imgs.clone()
    bad[n, 0, (l // 4) * 4, (l % 4) * 4] = float("nan")
    pred = randn(2, L, P).requires_grad_()
    loss = norm_pix_loss(pred, bad, ids.mask, 4, norm_pix=norm, impl=impl)
    gp, = torch.autograd.grad(loss, pred)
    ref = R.forward_loss(bad, pred, ids.mask, 4, norm)
    gr, = torch.autograd.grad(ref, pred)
    assert torch.isnan(loss) and torch.isnan(ref)
    assert_close(gp, gr, torch.float32, name="grad pred", equal_nan=True)
    assert gp[n, l].isnan().any() and not gp[n, :l].isnan().any()  # that row only (0 * NaN)

    K = ids.ids_keep.shape[1]
    pm = randn(2, L - K, P)
    got = norm_pix_loss(pm, bad, ids.ids_restore, 4, norm_pix=norm, pred_on="masked", impl=impl)
    assert_close(got, R.forward_loss_masked(imgs, pm, ids.ids_restore, 4, norm), torch.float32, name="loss")


def test_masked_prediction_loss_names_a_wrong_head():
    """Before: F.linear's shape or dtype error, naming neither argument."""
    imgs, ids, L, P = _loss_case()
    K = ids.ids_keep.shape[1]
    dec = randn(2, 1 + L, 32)
    with pytest.raises(ValueError, match=r"pred_weight must have shape \(p\*p\*C, Dd\) = \(48, 32\)"):
        masked_prediction_loss(dec, randn(P, 31), None, imgs, ids.ids_restore, K, 4)
    with pytest.raises(ValueError, match=r"pred_weight must have shape"):
        masked_prediction_loss(dec, randn(P + 1, 32), None, imgs, ids.ids_restore, K, 4)
    with pytest.raises(ValueError, match=r"pred_bias must have shape \(p\*p\*C,\) = \(48,\)"):
        masked_prediction_loss(dec, randn(P, 32), randn(P - 1), imgs, ids.ids_restore, K, 4)
    with pytest.raises(TypeError, match="decoder_out dtype bfloat16 must match pred_weight dtype float32"):
        masked_prediction_loss(dec.bfloat16(), randn(P, 32), None, imgs, ids.ids_restore, K, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts them itself: no error
        masked_prediction_loss(dec.bfloat16(), randn(P, 32), randn(P), imgs, ids.ids_restore, K, 4)
    # imgs that do not match ids_restore were reported as a wrong 'pred' (an argument nobody passed)
    w = randn(P, 32)
    with pytest.raises(ValueError, match=r"imgs must be N = 2 images of L = 16 patches"):
        masked_prediction_loss(dec, w, None, torch.cat([imgs, imgs[:1]]), ids.ids_restore, K, 4)
    with pytest.raises(ValueError, match=r"imgs must be N = 2 images of L = 16 patches"):
        masked_prediction_loss(dec, w, None, imgs[..., :8, :], ids.ids_restore, K, 4)
    with pytest.raises(ValueError, match="imgs must be on decoder_out's device cpu, got meta"):
        masked_prediction_loss(dec, w, None, imgs.to("meta"), ids.ids_restore, K, 4)


def test_masked_patch_ids_and_random_masking_name_bad_arguments():
    r = random_masking(2, 16, 0.75, seed=0).ids_restore
    for bad in (-1, 17, 2.0, True):
        with pytest.raises(ValueError, match=r"len_keep must be an int in \[0, L\] = \[0, 16\]"):
            masked_patch_ids(r, bad)
    with pytest.raises(ValueError, match="ids_restore must have 2 dimensions"):
        masked_patch_ids(r[0], 4)
    with pytest.raises(TypeError, match="ids_restore must be a torch.Tensor"):
        masked_patch_ids(r.tolist(), 4)
    assert masked_patch_ids(r, 16).shape == (2, 0)  # mask ratio 0: nothing masked
    if not torch.cuda.is_available():  # was torch's AssertionError "Torch not compiled with CUDA enabled"
        with pytest.raises(ValueError, match="device='cuda': CUDA is not available here"):
            random_masking(2, 16, 0.75, seed=0, device="cuda")
    with pytest.raises(ValueError, match="device must name a torch device, got 'gpu0'"):
        random_masking(2, 16, 0.75, seed=0, device="gpu0")


# -- one rule for index tensors: strided views ------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("op", ["unshuffle", "loss-all", "loss-masked", "patch_embed"])
def test_strided_index_tensors_equal_their_contiguous_copies(op):
    """ids_restore, the loss mask and ids_keep as strided views give what their contiguous copies
    give (cu_seqlens: test_attention_strided_cu_seqlens)."""
    imgs, ids, L, P = _loss_case()
    K = ids.ids_keep.shape[1]
    if op == "unshuffle":
        x, tok, pos = randn(2, 1 + K, 8), randn(1, 1, 8), randn(1, 1 + L, 8)
        run, idx = (lambda i: unshuffle(x, tok, i, pos, impl="triton")), ids.ids_restore
    elif op == "loss-all":
        pred = randn(2, L, P)
        run, idx = (lambda i: norm_pix_loss(pred, imgs, i, 4, impl="triton")), ids.mask
    elif op == "loss-masked":
        pred = randn(2, L - K, P)
        run, idx = (lambda i: norm_pix_loss(pred, imgs, i, 4, pred_on="masked", impl="triton")), ids.ids_restore
    else:
        w = randn(8, 3, 4, 4)
        run, idx = (lambda i: masked_patch_embed(imgs, i, w, None, None, 4, impl="triton")), ids.ids_keep
    wide = torch.full((idx.shape[0], 2 * idx.shape[1]), -7, dtype=idx.dtype)  # same values, every other slot
    wide[:, ::2] = idx
    view = wide[:, ::2]
    assert not view.is_contiguous() and torch.equal(view, idx)
    assert_close(run(view), run(idx.contiguous()), torch.float32, name=op)


# -- meta tensors -----------------------------------------------------------------------------------

META_IMPLS = [pytest.param("triton", marks=needs_triton), "reference", "auto"]


@pytest.mark.parametrize("impl", META_IMPLS)
@pytest.mark.no_triton_launch  # a refusal / meta tensors: no kernel runs
def test_meta_tensors_run_the_fake_implementations(impl):
    """Meta inputs (memory counting, lazy construction) give meta outputs of the right shapes and
    dtypes, forward and backward, through the ops' fake implementations. Before: "Cannot copy out of
    meta tensor" (Triton), "unknown device type for autocast" (masked_patch_embed), and the
    reference read varlen offsets that a meta tensor does not have."""
    m = dict(device="meta")
    ids = random_masking(2, 16, 0.75, device="meta", impl=impl)
    assert [tuple(t.shape) for t in ids] == [(2, 4), (2, 16), (2, 16)] and ids.mask.device.type == "meta"
    assert random_masking(2, 16, 0.75, noise=torch.rand(2, 16, **m), impl=impl).ids_keep.device.type == "meta"

    imgs, w = torch.randn(2, 3, 16, 16, **m), torch.randn(8, 3, 4, 4, **m, requires_grad=True)
    pos = torch.randn(1, 17, 8, **m, requires_grad=True)
    tok = masked_patch_embed(imgs, ids.ids_keep, w, None, pos, 4, impl=impl)
    assert tok.shape == (2, 4, 8) and tok.device.type == "meta"

    qkv = torch.randn(2, 5, 3 * H * DH, **m, requires_grad=True)
    out = visible_attention(qkv, H, impl=impl)
    packed = torch.randn(10, 3 * H * DH, **m, requires_grad=True)
    out_cu = visible_attention(packed, H, cu_seqlens=torch.zeros(3, dtype=torch.int32, **m), impl=impl)
    assert out.shape == (2, 5, H * DH) and out_cu.shape == (10, H * DH)

    x = torch.randn(2, 5, 8, **m, requires_grad=True)
    mtok = torch.randn(1, 1, 8, **m, requires_grad=True)
    dec = unshuffle(x, mtok, ids.ids_restore, pos, impl=impl)
    assert dec.shape == (2, 17, 8)

    pred = torch.randn(2, 16, 48, **m, requires_grad=True)
    loss = norm_pix_loss(pred, imgs, ids.mask, 4, impl=impl)
    loss_m = norm_pix_loss(pred[:, :12], imgs, ids.ids_restore, 4, pred_on="masked", impl=impl)
    assert loss.shape == () and loss.dtype == torch.float32 and loss_m.device.type == "meta"

    (tok.sum() + out.sum() + out_cu.sum() + dec.sum() + loss + loss_m).backward()
    for t in (w, pos, qkv, packed, x, mtok, pred):
        assert t.grad is not None and t.grad.device.type == "meta" and t.grad.shape == t.shape


@pytest.mark.parametrize("impl, return_pred", [  # the reference model always returns pred
    *(pytest.param("triton", rp, marks=needs_triton) for rp in (True, False)), ("reference", True), ("auto", True),
    ("auto", False), ("sdpa", False)])  # (sdpa: the attention's autocast switch knows no meta device)
@pytest.mark.no_triton_launch  # a refusal / meta tensors: no kernel runs
def test_meta_model(impl, return_pred):
    """Before: "unknown device type for autocast" from the fast path."""
    model = mae_vit_tiny_test(impl=impl).to("meta")
    imgs = torch.randn(2, 3, *model.patch_embed.img_size, device="meta")
    loss, pred, mask = model(imgs, return_pred=return_pred) if impl != "reference" else model(imgs)
    assert loss.shape == () and loss.device.type == "meta" and mask.shape == (2, model.patch_embed.num_patches)
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


# -- the model: fp16 images, fp32 weights -----------------------------------------------------------

@pytest.mark.parametrize("impl", META_IMPLS)
@pytest.mark.no_triton_launch  # a refusal: whether an op launched before it is not the point
def test_model_names_mixed_image_and_weight_dtypes(impl):
    """Before: "Input type (c10::Half) and bias type (float) should be the same" (reference) or an
    error naming the op's `weight`; now imgs and the weight, with what to do."""
    model = mae_vit_tiny_test(impl=impl)
    imgs = randn(2, 3, *model.patch_embed.img_size).half()
    with pytest.raises(TypeError, match="imgs dtype float16 must match .*weight dtype float32"):
        model(imgs)


# -- GPU: the on-device contracts (values trusted, no host sync, never out of bounds) ---------------


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda", "reference"])
def test_gpu_unshuffle_out_of_range_ids_are_mask_tokens(impl):
    N, L, K, D = 2, 8, 3, 16
    x = randn(N, 1 + K, D, device="cuda")
    tok, pos = randn(1, 1, D, device="cuda"), randn(1, 1 + L, D, device="cuda")
    ids = torch.tensor([[0, -1, 2, 99, 1, 3, -7, 4]] * N, device="cuda")
    got = unshuffle(x, tok, ids, pos, impl=impl)  # trusted on the GPU: no check, no sync
    want = unshuffle_mod._fwd_reference(x.cpu(), tok.cpu(), ids.cpu(), pos.cpu())
    assert_close(got.cpu(), want, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda", "reference"])
def test_gpu_loss_nan_in_a_visible_patch_and_bad_ids_stay_in_bounds(impl):
    imgs, ids, L, P = _loss_case()
    mask = ids.mask.clone()
    mask[1, 0] = 0  # patch 0 of sample 1 is visible ...
    nan_imgs = imgs.clone()
    nan_imgs[1, :, :4, :4] = float("nan")  # ... and holds NaN
    assert torch.isnan(norm_pix_loss(randn(2, L, P, device="cuda"), nan_imgs.cuda(), mask.cuda(), 4, impl=impl))
    bad = ids.ids_restore.cuda()
    bad[:, 0] = 10 ** 6  # trusted on the GPU: read in bounds (no device-side assert), some finite loss
    K = ids.ids_keep.shape[1]
    assert int(masked_patch_ids(bad, K).max()) < L
    loss = norm_pix_loss(randn(2, L - K, P, device="cuda"), imgs.cuda(), bad, 4, pred_on="masked", impl=impl)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("impl,match", [("bogus", "impl must be one of"), (None, "impl must be one of"),
                                        ("cuda", "impl='cuda' is not available for")])
@pytest.mark.parametrize("route", ["direct", "custom_op"])
def test_impl_is_checked_on_every_route(route, device, impl, match):
    """A bad impl is a ValueError naming it before dispatch, also where no backend is resolved (meta
    tensors: their fakes run) and through the torch.library dispatcher (custom_op route). 'cuda'
    only for the ops without a CUDA C++ kernel."""
    from maefast.ops._dispatch import eager_dispatch
    from maefast.ops.bias_gelu import bias_gelu
    from maefast.ops.layernorm import add_layer_norm

    x, b = torch.zeros(4, 8, device=device), torch.zeros(8, device=device)
    calls = [lambda: bias_gelu(x, b, impl=impl), lambda: add_layer_norm(x, None, b, b, impl=impl)]
    if impl != "cuda":
        imgs, w = torch.zeros(2, 3, 16, 16, device=device), torch.zeros(8, 3, 8, 8, device=device)
        ids = torch.zeros(2, 2, dtype=torch.int64, device=device)
        calls.append(lambda: masked_patch_embed(imgs, ids, w, None, None, 8, impl=impl))
    with eager_dispatch(route):
        for call in calls:
            with pytest.raises(ValueError, match=match):
                call()


@pytest.mark.parametrize("build, exc, match", [
    (lambda: NormPixLoss(patch_size="8"), TypeError, "patch_size must be an int"),
    (lambda: NormPixLoss(8, norm_pix_loss="no"), TypeError, "norm_pix_loss must be a bool"),
    (lambda: NormPixLoss(8, impl="fast"), ValueError, "impl must be one of"),
    (lambda: MaskedPatchEmbed(32, 8, in_chans=0), ValueError, "in_chans must be an int >= 1"),
    (lambda: MaskedPatchEmbed(32, 8, embed_dim=0), ValueError, "embed_dim must be an int >= 1"),
    (lambda: MaskedPatchEmbed(32, 8, impl="fast"), ValueError, "impl must be one of"),
])
def test_nn_modules_check_their_arguments_when_built(build, exc, match):
    """Not at the first forward (a string "no" for norm_pix_loss was taken as True)."""
    with pytest.raises(exc, match=match):
        build()


# -- the shared checks at their edges (maefast/_validate.py; from a mutation audit: each of these let a
#    wrong check through) --

def test_image_checks_refuse_an_empty_batch_and_give_the_grid_as_rows_then_columns():
    with pytest.raises(ValueError, match=r"imgs must be non-empty, got shape \(0, 3, 16, 16\)"):
        V.check_images("imgs", torch.zeros(0, 3, 16, 16), 8)
    assert V.check_images("imgs", torch.zeros(1, 3, 16, 32), 8) == (2, 4)  # (H/p, W/p)


def test_pixel_stats_are_refused_with_float_images_even_one_of_them():
    imgs = torch.zeros(1, 3, 8, 8)
    for mean, std in (((0.5,) * 3, None), (None, (0.2,) * 3)):
        with pytest.raises(ValueError, match="taken as already normalised"):
            V.check_pixel_stats("imgs", imgs, mean, std)


def test_sizes_are_one_int_or_a_pair_of_ints():
    assert V.to_2tuple("img_size", 32) == (32, 32) and V.to_2tuple("img_size", [32, 48]) == (32, 48)
    for bad in ((32, 48, 3), (True, 8), (32,), 32.0):
        with pytest.raises(TypeError, match="img_size must be an int or a pair of ints"):
            V.to_2tuple("img_size", bad)
    with pytest.raises(ValueError, match="img_size must be > 0"):
        V.to_2tuple("img_size", (32, 0))


def test_cu_seqlens_host_checks_at_their_edges(monkeypatch):
    cu = torch.tensor([0, 30, 40], dtype=torch.int32)
    assert V.check_cu_seqlens(cu, 40, None) == 30  # computed: the longest sequence
    assert V.check_cu_seqlens(cu, 40, 35) == 35  # the given one is launched with
    assert V.check_cu_seqlens(cu, 40, 1000) == 40  # lowered to T: no sequence is longer
    with pytest.raises(ValueError, match=r"max_seqlen=29 is smaller than the longest sequence in cu_seqlens \(30"):
        V.check_cu_seqlens(cu, 40, 29)
    assert V.check_cu_seqlens(torch.tensor([0, 0], dtype=torch.int32), 0, 0) == 0  # no rows: 0 is a length
    # offsets without values (meta; a GPU's, trusted): max_seqlen >= ceil(T/B) is still checked
    meta = torch.empty(3, dtype=torch.int32, device="meta")  # B = 2
    assert V.check_cu_seqlens(meta, 41, 21) == 21
    with pytest.raises(ValueError, match=r"ceil\(T/B\) = 21"):
        V.check_cu_seqlens(meta, 41, 20)
    # offsets whose reading is a host sync (a GPU's): read when max_seqlen is not given, else trusted
    monkeypatch.setattr(V, "values_on_host", lambda t: False)
    assert V.check_cu_seqlens(cu, 40, None) == 30
    assert V.check_cu_seqlens(torch.tensor([0, 45, 40], dtype=torch.int32), 40, 20) == 20


def test_permutation_check_names_the_first_bad_row():
    ids = torch.stack([torch.arange(4), torch.tensor([0, 0, 2, 3]), torch.tensor([3, 3, 1, 0])])
    with pytest.raises(ValueError, match=r"permutation of 0\.\.3 in every row .*; row 1 is \[0, 0, 2, 3\]"):
        V.check_permutation("ids_restore", ids)


def test_index_range_refuses_negative_and_too_large_ids():
    V.check_index_range("ids_keep", torch.tensor([[0, 5]]), 6)
    for bad, got in (([[-1, 2]], r"\[-1, 2\]"), ([[0, 6]], r"\[0, 6\]")):
        with pytest.raises(ValueError, match=r"ids_keep values must be in \[0, L=6\), got values in " + got):
            V.check_index_range("ids_keep", torch.tensor(bad), 6)


def test_small_checks_at_their_edges():
    for shape in ((2, 3), (2, 3, 4, 5)):  # too few and too many dimensions
        with pytest.raises(ValueError, match=r"x must have 3 dimensions, got shape"):
            V.check_tensor("x", torch.zeros(shape), ndim=3)
    assert V.check_int("in_chans", 1, 1) == 1  # the bound itself is allowed
    np = pytest.importorskip("numpy")
    assert V.check_bool("flag", np.False_) is False
    with pytest.raises(TypeError, match="flag must be True or False, got numpy.int64"):
        V.check_bool("flag", np.int64(1))  # numpy's bool scalar only, not any numpy number
