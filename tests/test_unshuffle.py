"""maefast.ops.unshuffle / maefast.nn.Unshuffle: equality with the reference decoder un-shuffle
(forward and the grads of x_vis, mask_token and pos_embed), paper and odd shapes, dtypes, the custom
op (opcheck, torch.compile), determinism, and bad inputs. The CUDA C++ impl runs in cuda-marked tests."""
import sys

import pytest
import torch

from maefast import reference as R
from maefast._triton import HAS_TRITON
from maefast.nn import Unshuffle
from maefast.ops import unshuffle
from maefast.testing import DTYPES, assert_close, assert_error_ratio

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
ops_mod = sys.modules["maefast.ops.unshuffle"]

# (N, L, mask_ratio, Dd): paper decoder grids (224/p16 -> 196, 224/p14 -> 256, width 512), batch 1
# and primes, ratios 0.5/0.9, odd widths, and a width over one Triton block (1280 > 1024).
SHAPES = [(2, 196, 0.75, 512), (1, 256, 0.75, 512), (3, 49, 0.5, 64), (5, 60, 0.9, 40), (7, 16, 0.75, 24),
          (2, 16, 0.75, 1280)]
IMPLS = [pytest.param("triton", marks=needs_triton), "reference"]
# tests on the `device` fixture also run the CUDA C++ kernels: on a card, or without one under the CPU
# emulation (tests/cuda_emu)
DEVICE_IMPLS = IMPLS + [pytest.param("cuda", marks=pytest.mark.cuda)]


def _inputs(N, L, ratio, D, dtype, device, pos_grad=False, param_dtype=torch.float32):
    """param_dtype: mask_token's and pos_embed's (fp32 as the models keep them: a 16-bit x_vis then gives
    fp32 out; x_vis's dtype: an all-16-bit model, the 16-bit kernels)."""
    ids = R.masking_ids(N, L, ratio, noise=torch.rand(N, L, device=device))
    K = ids.ids_keep.shape[1]
    x = torch.randn(N, 1 + K, D, device=device).to(dtype).requires_grad_()
    tok = (torch.randn(1, 1, D, device=device) * 0.02).to(param_dtype).requires_grad_()
    pos = torch.randn(1, 1 + L, D, device=device).to(param_dtype).requires_grad_(pos_grad)
    return x, tok, ids.ids_restore, pos


def _grads(fn, x, tok, ids, pos, g):
    out = fn(x, tok, ids, pos)
    wrt = (x, tok, pos) if pos.requires_grad else (x, tok)
    return (out,) + torch.autograd.grad(out, wrt, g.to(out.dtype))


def _assert_equal(a, b, name):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    diff = (a.double() - b.double()).abs()
    assert torch.equal(a, b), f"{name}: {int((diff > 0).sum())} values differ, max {diff.max()}"


def _check(impl, x, tok, ids, pos, dtype):
    g = torch.randn(x.shape[0], ids.shape[1] + 1, x.shape[2], device=x.device).to(dtype)
    got = _grads(lambda *a: unshuffle(*a, impl=impl), x, tok, ids, pos, g)
    ref = _grads(R.unshuffle, x, tok, ids, pos, g)
    # fp64 oracle for the reductions (mask_token, pos_embed grads): autograd's reduce in the output's dtype.
    oracle = _grads(R.unshuffle, x.detach().double().requires_grad_(), tok.detach().double().requires_grad_(), ids,
                    pos.detach().double().requires_grad_(pos.requires_grad), g.double())
    names = ("out", "grad x_vis", "grad mask_token", "grad pos_embed")
    # 16-bit x_vis with the fp32 mask_token / pos_embed: fp32 out, as the official cat and add promote
    assert got[0].dtype == ref[0].dtype == torch.promote_types(dtype, pos.dtype) and got[0].is_contiguous()
    assert got[1].dtype == x.dtype
    # each output one add of two exact values rounded once, x_vis's gradient a scatter of g: the
    # reference's values exactly (the table's 16-bit tolerance would pass a uniform 1% error)
    _assert_equal(got[0], ref[0], names[0])
    _assert_equal(got[1], ref[1], names[1])
    for i in range(2, len(got)):
        assert got[i].dtype == ref[i].dtype
        # Reductions over N*(L-K) terms: the fp32 reference itself is inexact there (seen on an H200:
        # 6e-5 off at |g| ~ 150 for 64x147 terms), so they are judged against the fp64 oracle only.
        assert_error_ratio(got[i], ref[i], oracle[i], dtype, "backward", name=names[i])


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(impl, shape, device):
    _check(impl, *_inputs(*shape, torch.float32, device), torch.float32)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("params", ["fp32", "same"])
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_half(impl, shape, dtype, params, device):
    """fp32 params: fp32 out (the autocast case); the same 16-bit dtype: 16-bit out and grads (a cast model)."""
    pd = torch.float32 if params == "fp32" else dtype
    _check(impl, *_inputs(*shape, dtype, device, pos_grad=True, param_dtype=pd), dtype)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_half_x_is_the_official_composition(impl, dtype, device):
    """decoder_embed's 16-bit output with the fp32 mask_token and pos_embed (autocast): the official
    cat/gather/add in fp32, bit for bit (each output one fp32 add of exact values), and x_vis's
    gradient the fp32 one rounded once to its dtype."""
    x, tok, ids, pos = _inputs(3, 49, 0.75, 40, dtype, device, pos_grad=True)
    pos = (pos.detach() * 100).requires_grad_()  # a 16-bit add would round pos_embed's bits away
    g = torch.randn(3, 50, 40, device=device)
    got = _grads(lambda *a: unshuffle(*a, impl=impl), x, tok, ids, pos, g)
    n = x.shape[0]
    x_ = torch.cat([x[:, 1:, :], tok.repeat(n, ids.shape[1] + 1 - x.shape[1], 1)], dim=1)  # models_mae.py
    x_ = torch.gather(x_, dim=1, index=ids.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    want = torch.cat([x[:, :1, :], x_], dim=1) + pos
    ref = (want,) + torch.autograd.grad(want, (x, tok, pos), g)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], ref[0])
    assert got[1].dtype == dtype
    assert torch.equal(got[1], ref[1])
    for name, a, b in zip(("mask_token", "pos_embed"), got[2:], ref[2:]):
        assert a.dtype == torch.float32
        assert_close(a, b, torch.float32, name=name)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pos_embed_grad(impl, dtype, device):
    _check(impl, *_inputs(5, 49, 0.75, 48, dtype, device, pos_grad=True), dtype)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_noncontiguous_and_int32(impl, device):
    x, tok, ids, pos = _inputs(3, 36, 0.75, 40, torch.float32, device)
    xt = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # (N, 1+K, D), stride(2) != 1
    ids32 = ids.to(torch.int32)
    pos_nc = pos.detach().expand(1, -1, -1)[:, :, :]  # a view; strides of an expand are allowed
    out = unshuffle(xt, tok, ids32, pos_nc, impl=impl)
    assert_close(out, R.unshuffle(xt, tok, ids, pos_nc), torch.float32, name="out")
    # An expanded (stride-0) upstream grad, as from out.sum().
    gx, gt = torch.autograd.grad(out.sum(), (xt, tok))
    rx, rt = torch.autograd.grad(R.unshuffle(xt, tok, ids, pos_nc).sum(), (xt, tok))
    assert_close(gx, rx, torch.float32, name="grad x_vis")
    assert_close(gt, rt, torch.float32, name="grad mask_token")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_transposed_pos_embed(impl, device):
    """A pos_embed whose last dimension is strided (a transposed copy): read through its strides, the
    reference's values exactly, and its gradient."""
    x, tok, ids, pos = _inputs(3, 36, 0.75, 40, torch.float32, device, pos_grad=True)
    pos_t = pos.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert pos_t.stride(2) != 1
    _check(impl, x, tok, ids, pos_t, torch.float32)


@needs_triton
def test_triton_backward_kernel_reads_the_grad_through_its_strides(device):
    """The backward kernel takes grad_out with any strides (the op hands it a unit last stride, so the
    launcher is called here): a grad whose last dimension is strided gives the reference's gradients."""
    from maefast.kernels.unshuffle import unshuffle_bwd

    x, tok, ids, pos = _inputs(3, 36, 0.75, 40, torch.float32, device)
    K = x.shape[1] - 1
    g = torch.randn(3, 40, 37, device=device).transpose(1, 2)
    assert g.stride(2) != 1
    got = unshuffle_bwd(g, ids, K, True)
    want = ops_mod._bwd_reference(g.contiguous(), ids, K, True, torch.float32)
    _assert_equal(got[0], want[0], "grad x_vis")
    for name, a, b in zip(("grad mask_token", "grad pos_embed"), got[1:], want[1:]):
        assert_close(a, b, torch.float32, name=name)


@needs_triton
def test_triton_deterministic(device):
    x, tok, ids, pos = _inputs(7, 196, 0.75, 64, torch.bfloat16, device, pos_grad=True)
    g = torch.randn(7, 197, 64, device=device).to(torch.bfloat16)
    a = _grads(lambda *t: unshuffle(*t, impl="triton"), x, tok, ids, pos, g)
    b = _grads(lambda *t: unshuffle(*t, impl="triton"), x, tok, ids, pos, g)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_out_of_range_ids_read_the_mask_token(impl, device):
    """The on-device contract (values not checked there): an index outside [0, K) stands for a masked
    slot in every backend, never an out-of-bounds access, and the gradients are those of that
    forward. Through the custom op, which (like a GPU run) does not check the values."""
    N, L, K, D = 2, 8, 3, 16
    x = torch.randn(N, 1 + K, D, device=device, requires_grad=True)
    tok = torch.randn(1, 1, D, device=device, requires_grad=True)
    pos = torch.randn(1, 1 + L, D, device=device, requires_grad=True)
    ids = torch.tensor([[0, -1, 2, 99, 1, 3, -7, 4]] * N, device=device)
    out = ops_mod._unshuffle_op(x, tok, ids, pos, impl)
    masked = (ids < 0) | (ids >= K)
    want = torch.where(masked[..., None], tok.expand(N, L, D), x[:, 1:][torch.arange(N)[:, None], ids.clamp(0, K - 1)])
    want = torch.cat([x[:, :1], want], 1) + pos
    assert_close(out, want, torch.float32)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, tok, pos), g)
    ref = torch.autograd.grad(want, (x, tok, pos), g)
    for name, a, b in zip(("x_vis", "mask_token", "pos_embed"), got, ref):
        assert_close(a, b, torch.float32, name=f"grad {name}")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_unplaced_visible_token_gets_a_zero_gradient(impl, device):
    """Below the host check (a GPU run), a visible token no id points at (ids_restore not a permutation)
    gets a zero gradient in every backend, never stale memory: the Triton kernel writes only the rows
    placed, into a zeroed buffer."""
    N, L, K, D = 2, 8, 3, 16
    x = torch.randn(N, 1 + K, D, device=device, requires_grad=True)
    tok = torch.randn(1, 1, D, device=device, requires_grad=True)
    pos = torch.randn(1, 1 + L, D, device=device)
    ids = torch.tensor([[0, -1, 2, 99, 5, 3, -7, 4], [2, 4, 5, 6, 7, 3, 1, -2]], device=device)  # 1; 0 unplaced
    out = ops_mod._unshuffle_op(x, tok, ids, pos, impl)
    gx, = torch.autograd.grad(out, (x,), torch.randn_like(out))
    assert torch.isfinite(gx).all()
    assert (gx[0, 2] == 0).all() and (gx[1, 1] == 0).all()
    assert (gx[0, 1] != 0).all() and (gx[1, 2] != 0).all()


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_visible_tokens_from_none_to_all_patches(impl, device):
    """1 + K tokens for 0 <= K <= L are accepted (mask_ratio 1 and 0: every patch or no patch a mask
    token), and equal the reference; a token more than the L patches is refused."""
    N, L, D = 2, 6, 8
    for K in (0, L):
        ids = torch.argsort(torch.rand(N, L, device=device), dim=1)
        x = torch.randn(N, 1 + K, D, device=device, requires_grad=True)
        tok = torch.randn(1, 1, D, device=device, requires_grad=True)
        pos = torch.randn(1, 1 + L, D, device=device, requires_grad=True)
        g = torch.randn(N, 1 + L, D, device=device)
        got = _grads(lambda *a: unshuffle(*a, impl=impl), x, tok, ids, pos, g)
        ref = _grads(R.unshuffle, x, tok, ids, pos, g)
        for name, a, b in zip(("out", "grad x_vis", "grad mask_token", "grad pos_embed"), got, ref):
            assert_close(a, b, torch.float32, name=f"K={K} {name}")
    with pytest.raises(ValueError, match="K <= L visible"):
        unshuffle(torch.randn(N, 2 + L, D, device=device), tok, ids, pos, impl=impl)


def test_pos_embed_gradient_only_when_it_requires_one(monkeypatch):
    """A frozen pos_embed (the fixed sin-cos table of the official models) costs no position-embedding
    reduction in the backward: the backward op is asked for it only when pos_embed requires grad."""
    asked = []
    real = ops_mod._bwd_reference

    def spy(grad, ids_restore, num_visible, need_pos, x_dtype):
        asked.append(need_pos)
        return real(grad, ids_restore, num_visible, need_pos, x_dtype)

    monkeypatch.setattr(ops_mod, "_bwd_reference", spy)
    for pos_grad in (False, True):
        x, tok, ids, pos = _inputs(2, 16, 0.75, 8, torch.float32, "cpu", pos_grad=pos_grad)
        unshuffle(x, tok, ids, pos, impl="reference").sum().backward()
        assert (pos.grad is not None) == pos_grad
    assert asked == [False, True]


def test_module_and_auto(device):
    x, tok, ids, pos = _inputs(2, 16, 0.75, 24, torch.float32, device)
    m = Unshuffle()
    assert "impl='auto'" in repr(m) and len(m.state_dict()) == 0
    assert_close(m(x, tok, ids, pos), R.unshuffle(x, tok, ids, pos), torch.float32)


# -- custom op ------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    x, tok, ids, pos = _inputs(3, 16, 0.75, 24, torch.float32, "cpu", pos_grad=True)
    torch.library.opcheck(torch.ops.maefast.unshuffle.default, (x, tok, ids, pos, impl))
    g = torch.randn(3, 17, 24)
    for need_pos in (False, True):
        for x_dtype in (torch.float32, torch.bfloat16):  # x_vis's gradient in its own dtype
            torch.library.opcheck(torch.ops.maefast.unshuffle_backward.default,
                                  (g, ids, x.shape[1] - 1, need_pos, impl, x_dtype))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    x, tok, ids, pos = _inputs(3, 16, 0.75, 24, torch.float32, "cpu", pos_grad=True)

    def f(x, tok, ids, pos):
        return (unshuffle(x * 2, tok, ids, pos, impl="reference") ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(x, tok, ids, pos), (x, tok, pos))
    want = torch.autograd.grad(f(x, tok, ids, pos), (x, tok, pos))
    for a, b in zip(got, want):
        assert_close(a, b, torch.float32, scale=10)


# -- bad inputs -----------------------------------------------------------------------------------

def test_bad_inputs():
    x, tok, ids, pos = _inputs(2, 16, 0.75, 24, torch.float32, "cpu")
    cases = [
        ((x[0], tok, ids, pos), ValueError, "x_vis must have 3 dimensions"),
        ((x.long(), tok, ids, pos), TypeError, "x_vis must have dtype"),
        ((x, tok, ids.float(), pos), TypeError, "ids_restore must have dtype"),
        ((x, tok, ids[:1], pos), ValueError, "ids_restore must have shape"),
        ((x, tok, ids[:, :2], pos[:, :3]), ValueError, "K <= L visible"),
        ((x, tok[0, 0], ids, pos), ValueError, "mask_token must have shape"),
        ((x, tok, ids, pos[:, 1:]), ValueError, "pos_embed must have shape"),
        ((x, tok, ids, pos[..., :8]), ValueError, "pos_embed must have shape"),
        ((x, tok, ids.to("meta"), pos), ValueError, "ids_restore must be on cpu"),
        ((x, tok, ids, "pos"), TypeError, "pos_embed must be a torch.Tensor"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            unshuffle(*args)
    with pytest.raises(ValueError, match="impl must be one of"):
        unshuffle(x, tok, ids, pos, impl="fast")


def test_cuda_impl_unavailable_on_cpu():
    x, tok, ids, pos = _inputs(2, 16, 0.75, 24, torch.float32, "cpu")
    with pytest.raises(ValueError, match="impl='cuda' is not available"):
        unshuffle(x, tok, ids, pos, impl="cuda")


# -- GPU only (written for the card; run by scripts/gpu_check) --------------------------------------

GPU_SHAPES = [(64, 196, 0.75, 512), (13, 256, 0.75, 512), (1, 60, 0.9, 40), (3, 16, 0.5, 1280)]


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_reference(impl, shape, dtype):
    _check(impl, *_inputs(*shape, dtype, "cuda", pos_grad=shape[0] == 13), dtype)
    if dtype != torch.float32:  # an all-16-bit model: the 16-bit kernels (out and grads in x's dtype)
        _check(impl, *_inputs(*shape, dtype, "cuda", pos_grad=True, param_dtype=dtype), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_paper_batch_deterministic(impl):
    x, tok, ids, pos = _inputs(256, 196, 0.75, 512, torch.bfloat16, "cuda", pos_grad=True)
    g = torch.randn(256, 197, 512, device="cuda").to(torch.bfloat16)
    a = _grads(lambda *t: unshuffle(*t, impl=impl), x, tok, ids, pos, g)
    b = _grads(lambda *t: unshuffle(*t, impl=impl), x, tok, ids, pos, g)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    ref = _grads(R.unshuffle, x, tok, ids, pos, g)
    assert_close(a[0], ref[0], torch.bfloat16, name="out")
    assert_close(a[1], ref[1], torch.bfloat16, name="grad x_vis")
