"""The uint8 path on a GPU (run by scripts/gpu_check's verify preset): paper shapes, the CUDA C++
backend beside Triton, no host sync and no float image in a step. The CPU tests and the helpers are
tests/test_uint8.py's."""
import pytest
import torch

from maefast.nn import MaskedPatchEmbed
from maefast.ops import norm_pix_loss, random_masking
from maefast.ops._pixels import pixel_affine
from maefast.reference.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize
from maefast.testing import assert_close, assert_grad_close, randn
from test_uint8 import IMAGENET, _autocast, _check_embed, _embed_both, _loss_both, _pixels

GPU = torch.device("cuda")
# (N, C, H, W, p, D, ratio, stats): ViT-B/16 and ViT-H/14 at 224 with prime batches, odd shapes, grey
GPU_EMBED = [(7, 3, 224, 224, 16, 768, 0.75, "imagenet"), (5, 3, 224, 224, 14, 1280, 0.75, "own"),
             (3, 3, 42, 70, 14, 200, 0.6, "own"), (2, 1, 32, 48, 8, 64, 0.75, "own")]
GPU_LOSS = [(64, 3, 224, 224, 16, 0.75, "imagenet"), (13, 3, 224, 224, 14, 0.75, "own"), (3, 4, 32, 48, 8, 0.5, "own")]


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_EMBED, ids=lambda c: "x".join(map(str, c[:7])) + c[7])
def test_gpu_embed_equals_normalise_first(impl, mode, case):
    res, _ = _embed_both(impl, case, mode, GPU)
    _check_embed(res, _autocast(mode, GPU)[1])


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pred_on", ["all", "masked"])
@pytest.mark.parametrize("case", GPU_LOSS, ids=lambda c: "x".join(map(str, c[:6])) + c[6])
def test_gpu_loss_equals_normalise_first(impl, case, pred_on, dtype):
    ((loss8, g8), (loss, g)), _ = _loss_both(impl, case, pred_on, True, dtype, GPU)
    assert_close(loss8, loss, torch.float32, name="loss")
    assert_grad_close(g8, g, dtype, name="grad pred")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_loss_raw_and_head(impl):
    for pred_on in ("all", "masked"):
        ((loss8, g8), (loss, g)), _ = _loss_both(impl, GPU_LOSS[1], pred_on, False, torch.bfloat16, GPU)
        assert_close(loss8, loss, torch.float32, name="loss")
        assert_grad_close(g8, g, torch.bfloat16, name="grad pred")
    ((loss8, gw8), (loss, gw)), _ = _loss_both(impl, GPU_LOSS[0], "masked", True, torch.float32, GPU, head=True)
    assert_close(loss8, loss, torch.float32, name="loss")
    assert_close(gw8, gw, torch.float32, name="grad pred_weight", scale=10)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [16, 14])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_gpu_patch_gather_normalize_rows(dtype, p, layout):
    """maefast._C.patch_gather_normalize writes exactly the fold of the gathered pixels (bit for bit,
    it is the same two fp32 operations), which is the official normalisation to the table (and bit for
    bit in bf16/fp16); a bad id gives a NaN row."""
    from maefast.ops.patch_embed import _rows_cuda, _rows_torch

    n, size = 5, 224
    x = _pixels(n, 3, size + 2, size + 2, device=GPU)
    u = {"nchw": x[:, :, :size, :size].contiguous(),
         "channels_last": x[:, :, :size, :size].contiguous(memory_format=torch.channels_last),
         "sliced": x[:, :, 1:size + 1, 1:size + 1]}[layout]
    L = (size // p) ** 2
    ids = random_masking(n, L, 0.75, seed=4, device=GPU).ids_keep.contiguous()
    scale, offset = pixel_affine(IMAGENET)
    rows = _rows_cuda(u, ids, p, dtype, (scale, offset))
    fold = (u.float() - torch.tensor(offset[:3], device=GPU).reshape(1, 3, 1, 1)) * \
        torch.tensor(scale[:3], device=GPU).reshape(1, 3, 1, 1)
    assert torch.equal(rows, _rows_torch(fold.to(dtype), ids, p))
    official = _rows_torch(normalize(u, *IMAGENET).to(dtype), ids, p)
    if dtype == torch.float32:
        assert_close(rows, official, dtype, name="rows")
    else:
        assert torch.equal(rows, official)
    bad = ids.clone()
    bad[1, 2] = L + 7
    rows = _rows_cuda(u, bad, p, dtype, (scale, offset))
    assert torch.isnan(rows[ids.shape[1] + 2].float()).all()


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_uint8_step_never_syncs_nor_makes_a_float_image(impl):
    """Masked embedding + loss, forward and backward, at ViT-B/16 batch 256 under bf16 autocast: no
    host sync, and no more device memory than the same step given the normalised image already in
    memory (bf16 for the embedding, fp32 for the loss): a float copy of the image would add 77 MB
    (bf16) or 154 MB (fp32)."""
    torch.manual_seed(0)
    N, L, D = 256, 196, 768
    m = MaskedPatchEmbed(224, 16, 3, D, impl=impl).to(GPU)
    pos = randn(1, 1 + L, D, device=GPU)
    head = torch.nn.Linear(D, 768).to(GPU)
    u = _pixels(N, 3, 224, 224, device=GPU)
    x = normalize(u, *IMAGENET)
    xb = x.bfloat16()

    def step(imgs_embed, imgs_loss):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            tokens, mask, _ = m(imgs_embed, 0.75, pos_embed=pos, seed=3)
            dec = torch.cat([tokens, tokens, tokens, tokens], 1)[:, :L]  # any (N, L, D) function of the tokens
            loss = norm_pix_loss(head(dec), imgs_loss, mask, 16, impl=impl)
        loss.backward()
        return loss.detach()

    peaks = []
    for imgs in ((u, u), (xb, x), (u, u)):  # the first call compiles
        step(*imgs)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = step(*imgs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        peaks.append((torch.cuda.max_memory_allocated() - base, loss))
    assert peaks[2][0] <= peaks[1][0] + 8 * 2 ** 20, (peaks[2][0], peaks[1][0])
    assert_close(peaks[2][1], peaks[1][1], torch.float32, name="loss", scale=10)


@pytest.mark.cuda
def test_gpu_normalize_is_the_cpus_bit_for_bit():
    """The reference normalisation on a CUDA tensor gives ToTensor + Normalize's CPU bits (a Python-scalar
    divisor is a reciprocal multiply on CUDA: every (value, channel) pair is checked), eagerly and compiled."""
    u = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(1, 3, 16, 16)
    want = normalize(u, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(normalize(u.to(GPU), IMAGENET_MEAN, IMAGENET_STD).cpu(), want)
    compiled = torch.compile(lambda x: normalize(x, IMAGENET_MEAN, IMAGENET_STD), fullgraph=True)
    assert torch.equal(compiled(u.to(GPU)).cpu(), want)
