"""Every public op checks shapes, dtypes and devices while torch.compile traces too: a compiled function
may never have run eagerly, and a kernel handed a tensor of the wrong shape reads or writes outside it
(before 2026-12-05 the checks were skipped under compile: a compiled norm_pix_loss with a pred of the
wrong width read 68 values past its end, found by tests/triton_memcheck.py). The kernels run the
Triton ones (interpreted and memory-checked on a CPU), so a check that did not happen shows as an
out-of-bounds error instead of the op's own message."""
import pytest
import torch

from maefast import ops
from maefast._triton import triton_usable

pytestmark = pytest.mark.skipif(not triton_usable(torch.device("cpu"))[0] and not torch.cuda.is_available(),
                                reason="needs triton (interpreted on a CPU)")


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cases():
    d = _dev()
    g = torch.Generator().manual_seed(0)

    def r(*s, dtype=torch.float32):
        return torch.randn(*s, generator=g).to(d, dtype)

    imgs = r(2, 3, 32, 32)  # 4 patches of 16
    ids_keep = torch.tensor([[0], [3]], device=d)
    ids_restore = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]], device=d)
    w, b = r(8, 3, 16, 16), r(8)
    ones = torch.ones(2, 4, device=d)
    # name -> (op(*tensors), tensors, the op's message): the tensors are the compiled function's inputs
    return {
        "norm_pix_loss: pred narrower than p*p*C": (
            lambda p, i, m: ops.norm_pix_loss(p, i, m, 16, impl="triton"), (r(2, 4, 700), imgs, ones),
            r"pred must have shape \(N, L, p\*p\*C\)"),
        "masked_prediction_loss: pred_weight of another width": (
            lambda x, pw, pb, i, ids: ops.masked_prediction_loss(x, pw, pb, i, ids, 1, 16, impl="triton"),
            (r(2, 5, 16), r(700, 16), r(700), imgs, ids_restore), r"pred_weight must have shape"),
        "unshuffle: pos_embed shorter than 1+L": (
            lambda x, t, ids, pos: ops.unshuffle(x, t, ids, pos, impl="triton"),
            (r(2, 2, 8), r(1, 1, 8), ids_restore, r(1, 3, 8)), r"pos_embed must have shape \(1, 1\+L, Dd\)"),
        "masked_patch_ids: len_keep past L": (
            lambda ids: ops.masked_patch_ids(ids, 99), (ids_restore,), r"len_keep must be an int in \[0, L\]"),
        "random_masking: a negative seed": (
            lambda: ops.random_masking(2, 8, 0.75, seed=-1, impl="triton"), (), r"seed must be in \[0, 2\*\*63\)"),
        "random_masking: a negative offset": (
            lambda: ops.random_masking(2, 8, 0.75, seed=3, offset=-5, impl="triton"), (),
            r"offset must be >= 0"),
        "masked_patch_embed: fewer ids_keep rows than images": (
            lambda i, ids, w, b: ops.masked_patch_embed(i, ids, w, b, None, 16, impl="triton"),
            (imgs, ids_keep[:1], w, b), r"ids_keep must have shape \(N, K\) with N = 2"),
        "masked_patch_embed: uint8 images with a mean per channel short": (
            lambda u, ids, w, b: ops.masked_patch_embed(u, ids, w, b, None, 16, impl="triton", mean=(0.5, 0.5),
                                                        std=(0.2, 0.2)),
            (torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8).to(d), ids_keep, w, b),
            r"mean must have 3 values"),
        "masked_patch_embed: pos_embed of another width": (
            lambda i, ids, w, b, pos: ops.masked_patch_embed(i, ids, w, b, pos, 16, impl="triton"),
            (imgs, ids_keep, w, b, r(1, 5, 4)), r"pos_embed must have shape \(1, 1 \+ L, D\)"),
        "random_masking: noise smaller than (N, L)": (
            lambda noise: ops.random_masking(2, 8, 0.75, noise=noise, impl="triton"),
            (r(2, 4),), r"noise must have shape \(N, L\) = \(2, 8\)"),
        "visible_attention: width not 3*H*Dh": (
            lambda qkv: ops.visible_attention(qkv, 2, impl="triton"), (r(2, 5, 3 * 16 + 3),),
            r"must divide the q/k/v width"),
        "layer_norm: weight shorter than D": (
            lambda x, w, b: ops.layer_norm(x, w, b, impl="triton"), (r(2, 5, 16), r(8), r(8)),
            r"weight must have shape \(D,\) = \(16,\)"),
        "bias_gelu: bias shorter than N": (
            lambda x, b: ops.bias_gelu(x, b, impl="triton"), (r(2, 5, 16), r(8)),
            r"bias must have shape \(N,\) = \(16,\)"),
        "vit_block: ln1_w shorter than D": (
            lambda x, *w: ops.vit_block(x, *w, num_heads=2, impl="triton"),
            (r(2, 5, 16), r(8), r(16), r(48, 16), r(48), r(16, 16), r(16), r(16), r(16), r(32, 16), r(32),
             r(16, 32), r(16)), r"ln1_w must have shape \(16,\)"),
    }


CASES = sorted(_cases())


@pytest.mark.parametrize("case", CASES)
def test_eager_raises_the_message(case):
    fn, args, msg = _cases()[case]
    with pytest.raises((ValueError, TypeError), match=msg):
        fn(*args)


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-break", "fullgraph"])
@pytest.mark.parametrize("case", CASES)
def test_compiled_raises_the_message_not_an_out_of_bounds_access(case, fullgraph):
    fn, args, msg = _cases()[case]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="eager", fullgraph=fullgraph)
    # without fullgraph dynamo falls back to the eager call (our ValueError); with it torch raises its
    # "Observed exception" quoting ours. Either way no kernel ran on the bad shapes.
    with pytest.raises(Exception, match=msg) as info:
        compiled(*args)
    assert "outside every tensor" not in str(info.value) and "Memcheck" not in str(info.value)
