"""maefast.ops.masked_patch_embed and maefast.nn.MaskedPatchEmbed against the reference: forward,
weight/bias/pos_embed gradients (error ratio vs a float64 oracle), autocast, custom op, compile,
state-dict keys, bad inputs. The Triton kernels run under the interpreter on small shapes here;
paper shapes and the CUDA C++ gather are in the `cuda`-marked tests."""
import json
import os
import subprocess
import sys

import pytest
import torch

from maefast import reference as R
from maefast._triton import HAS_TRITON
from maefast.nn import MaskedPatchEmbed
from maefast.ops import masked_patch_embed, random_masking
from maefast.testing import assert_close, assert_error_ratio, assert_grad_close, randn

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# tests on the `device` fixture run every backend: the CUDA C++ kernels on a card, or without one under the
# CPU emulation (tests/cuda_emu)
DEVICE_IMPLS = ["reference", pytest.param("triton", marks=needs_triton),
                pytest.param("cuda", marks=pytest.mark.cuda)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (N, C, H, W, p, D, mask_ratio): square/rectangular, p16 and p14 (KD = 768 / 588), L odd.
CASES_CPU = [(2, 3, 32, 32, 8, 64, 0.75), (1, 3, 32, 48, 8, 64, 0.5), (3, 3, 28, 42, 14, 64, 0.75),
             (1, 3, 224, 224, 16, 64, 0.75), (2, 1, 20, 12, 4, 40, 0.9)]
# Paper shapes for the GPU: ViT-B/16, ViT-L/16, ViT-H/14 at 224, batch 1 and a prime, and odd ones.
CASES_GPU = [(1, 3, 224, 224, 16, 768, 0.75), (7, 3, 224, 224, 16, 1024, 0.5), (7, 3, 224, 224, 14, 1280, 0.75),
             (5, 3, 224, 224, 14, 1280, 0.9), (3, 3, 160, 272, 16, 768, 0.75), (2, 3, 42, 70, 14, 200, 0.6)]


@pytest.fixture(autouse=True)
def _no_tf32_conv():
    """The fp32 reference conv must be IEEE fp32 on a GPU too (cuDNN defaults to TF32)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _inputs(N, C, H, W, p, D, ratio, dtype, device, pos_requires_grad=True, bias=True, pos_dtype=torch.float32):
    imgs = randn(N, C, H, W, dtype=dtype, device=device)
    L = (H // p) * (W // p)
    ids = random_masking(N, L, ratio, seed=int(torch.randint(0, 2 ** 31, (1,))), device=device).ids_keep
    w = randn(D, C, p, p, dtype=dtype, device=device, scale=(C * p * p) ** -0.5)
    b = randn(D, dtype=dtype, device=device) if bias else None
    pos = randn(1, 1 + L, D, dtype=pos_dtype, device=device)
    params = [w] + ([b] if bias else []) + [pos]
    for t in params:
        t.requires_grad_(t is not pos or pos_requires_grad)
    return imgs, ids, w, b, pos


def _run(fn, imgs, ids, w, b, pos, p, grad_out=None, cast=None):
    """Forward + backward; cast turns every floating input into that dtype (the oracle uses float64)."""
    leaves = [t.detach().to(cast or t.dtype, copy=True).requires_grad_(t.requires_grad) if t is not None else None
              for t in (w, b, pos)]
    args = leaves
    x = imgs.to(cast) if cast is not None else imgs
    out = fn(x, ids, args[0], args[1], args[2], p)
    if grad_out is None:
        grad_out = randn(*out.shape, dtype=out.dtype, device=out.device)
    out.backward(grad_out.to(out.dtype))
    grads = [t.grad if (t is not None and t.requires_grad) else None for t in leaves]
    return out, grads, grad_out


def _check_against_reference(impl, case, dtype, device, pos_requires_grad=True, bias=True, pos_dtype=torch.float32):
    """pos_dtype float32 with 16-bit weights: the tokens are fp32 (the official `x + pos_embed` promotes)."""
    N, C, H, W, p, D, ratio = case
    imgs, ids, w, b, pos = _inputs(N, C, H, W, p, D, ratio, dtype, device, pos_requires_grad, bias, pos_dtype)
    out, grads, g = _run(lambda *a: masked_patch_embed(*a, impl=impl), imgs, ids, w, b, pos, p)
    ref, ref_grads, _ = _run(R.masked_patch_embed, imgs, ids, w, b, pos, p, grad_out=g)
    oracle, oracle_grads, _ = _run(R.masked_patch_embed, imgs, ids, w, b, pos, p, grad_out=g.double(),
                                   cast=torch.float64)
    assert out.dtype == ref.dtype == torch.promote_types(dtype, pos_dtype) and out.shape == (N, ids.shape[1], D)
    assert_error_ratio(out, ref, oracle, dtype, "forward", name=f"{impl} out")
    for name, a, r, o in zip(("weight", "bias", "pos_embed"), grads, ref_grads, oracle_grads):
        if o is None:
            assert a is None, f"{name} got a gradient it should not have"
            continue
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert_error_ratio(a, r, o, dtype, "backward", name=f"{impl} grad {name}")


# ---- CPU: reference path in every dtype, Triton under the interpreter in every dtype -------------

@pytest.mark.parametrize("case", CASES_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_impl(case, dtype):
    _check_against_reference("reference", case, dtype, "cpu")


@needs_triton
@pytest.mark.parametrize("case", CASES_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_impl(device, case, dtype):
    _check_against_reference("triton", case, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_pos_embed_in_the_weights_dtype(device, impl, dtype):
    """A 16-bit pos_embed (a model cast to half or bf16): the tokens stay in the weight's dtype."""
    _check_against_reference(impl, CASES_CPU[1], dtype, device, pos_dtype=dtype)


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_no_bias_frozen_pos_and_no_pos(device, impl):
    case = (2, 3, 32, 48, 8, 32, 0.75)
    _check_against_reference(impl, case, torch.float32, device, pos_requires_grad=False, bias=False)
    imgs, ids, w, b, _ = _inputs(*case, torch.float32, device)
    out = masked_patch_embed(imgs, ids, w, b, None, 8, impl=impl)
    assert_close(out, R.masked_patch_embed(imgs, ids, w, b, None, 8), torch.float32, name="no pos")


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_repeated_ids_and_strided_images(device, impl, layout):
    N, C, H, W, p, D = 2, 3, 24, 32, 8, 32
    if layout == "channels_last":
        imgs = randn(N, C, H, W, device=device).contiguous(memory_format=torch.channels_last)
    else:
        imgs = randn(N, C, H, W + 8, device=device)[..., 4:4 + W]
    ids = torch.tensor([[3, 3, 0, 11], [5, 1, 5, 5]], device=device)  # repeats add up in grad pos
    _, _, w, b, pos = _inputs(N, C, H, W, p, D, 0.5, torch.float32, device)
    out, grads, g = _run(lambda *a: masked_patch_embed(*a, impl=impl), imgs, ids, w, b, pos, p)
    ref, ref_grads, _ = _run(R.masked_patch_embed, imgs.contiguous(), ids, w, b, pos, p, grad_out=g)
    assert_close(out, ref, torch.float32, name="tokens")
    for name, a, r in zip(("dweight", "dbias", "dpos"), grads, ref_grads):
        assert_grad_close(a, r, torch.float32, name=name)  # sums over N*K rows: relative to their size


@needs_triton
def test_triton_backward_is_deterministic(device):
    imgs, ids, w, b, pos = _inputs(3, 3, 32, 32, 8, 64, 0.5, torch.float32, device)
    g = randn(3, ids.shape[1], 64, device=device)
    first = _run(lambda *a: masked_patch_embed(*a, impl="triton"), imgs, ids, w, b, pos, 8, grad_out=g)[1]
    again = _run(lambda *a: masked_patch_embed(*a, impl="triton"), imgs, ids, w, b, pos, 8, grad_out=g)[1]
    for a, c in zip(first, again):
        assert torch.equal(a, c)


def _official_tokens(imgs, ids, w, b, pos, p):
    """The official order of operations: patch_embed (a Conv2d, autocast's dtype), + pos_embed (fp32:
    the sum is promoted), then the kept rows."""
    x = torch.nn.functional.conv2d(imgs, w, b, stride=p).flatten(2).transpose(1, 2) + pos[:, 1:, :]
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@pytest.mark.parametrize("impl,amp", [("reference", torch.bfloat16),
                                       pytest.param("triton", torch.float16, marks=needs_triton),
                                       pytest.param("triton", torch.bfloat16, marks=needs_triton)])
def test_autocast_is_the_official_composition(device, impl, amp):
    """Under autocast the conv rounds to the autocast dtype and pos_embed is added in fp32: the official
    tokens (bit for bit on the reference backend; the Triton epilogue where its fp32 summation order does
    not move a conv value across a rounding boundary).
    The gradients are autograd's of that composition from an fp32 output gradient: pos_embed's from
    it as it is, bias's from it rounded to the autocast dtype, bit for bit; the weight gradient within
    one ulp of the autocast dtype (its GEMM's summation order against the conv backward's)."""
    if impl == "reference" and torch.device(device).type != "cpu":
        pytest.skip("the CPU's conv is the oracle here")
    imgs, ids, w, b, pos = _inputs(2, 3, 32, 48, 8, 64, 0.5, torch.float32, device)
    pos = (pos.detach() * 100).requires_grad_()  # a 16-bit sum would round pos_embed's bits away
    leaves = [t.detach().clone().requires_grad_() for t in (w, b, pos)]
    g = randn(2, ids.shape[1], 64, device=device)
    with torch.autocast(torch.device(device).type, dtype=amp):
        out = masked_patch_embed(imgs, ids, w, b, pos, 8, impl=impl)
        want = _official_tokens(imgs, ids, *leaves, 8)
    assert out.dtype == want.dtype == torch.float32
    if impl == "reference":
        assert torch.equal(out, want)
    diff = (out - want).abs()
    assert (diff == 0).float().mean() > 0.9, "the tokens are not the official roundings"
    conv = (want - torch.gather(pos[:, 1:].expand(2, -1, -1), 1, ids.unsqueeze(-1).expand(-1, -1, 64))).abs()
    assert (diff <= conv * torch.finfo(amp).eps + 1e-6).all()
    out.backward(g)
    want.backward(g)
    for name, t, o in zip(("weight", "bias", "pos_embed"), (w, b, pos), leaves):
        assert t.grad.dtype == torch.float32, name
    assert torch.equal(b.grad, leaves[1].grad), "bias gradient: not autograd's (the output's rounded)"
    assert torch.equal(pos.grad, leaves[2].grad), "pos_embed gradient: not autograd's (the output's as it is)"
    dw, want_dw = w.grad, leaves[0].grad
    # the reference's GEMM and the conv's backward sum in their own orders (which CPU kernels oneDNN picks
    # depends on the machine: bit-equal on an AVX-512 one, not on an AVX2-only AMD EPYC, 2026-12-07), the
    # Triton kernel in fp32: within one rounding of the autocast dtype
    assert (dw - want_dw).abs().max() <= want_dw.abs().max() * torch.finfo(amp).eps, "weight gradient"


def test_float64_pos_embed(device):
    """A float64 pos_embed ("any float dtype") makes float64 tokens, the official promotion: the
    reference computes them (auto takes it; the kernels' fp32 epilogue could not add exactly and
    refuse by name), and pos_embed's gradient stays float64."""
    imgs, ids, w, b, pos = _inputs(2, 3, 32, 48, 8, 64, 0.5, torch.float32, device)
    pos64 = (pos.detach().double() * 1000).requires_grad_()
    ref64 = pos64.detach().clone().requires_grad_()
    out = masked_patch_embed(imgs, ids, w, b, pos64, 8)
    want = _official_tokens(imgs, ids, w.detach(), b.detach(), ref64, 8)
    assert out.dtype == torch.float64 and torch.equal(out, want)
    g = randn(*out.shape, device=device).double()
    out.backward(g)
    want.backward(g)
    assert pos64.grad.dtype == torch.float64 and torch.equal(pos64.grad, ref64.grad)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="pos_embed dtype torch.float64"):
            masked_patch_embed(imgs, ids, w, b, pos64, 8, impl="triton")


def test_auto_takes_the_reference_where_the_kernels_refuse(monkeypatch):
    """On a GPU "auto" picks a kernel, then takes the reference for what the kernels refuse (a float64
    pos_embed; uint8 imgs with 5 channels or with a float64 weight) rather than raising as an explicit
    impl does. On the CPU "auto" is the reference from the start, so the GPU's pick is simulated here."""
    import maefast.ops.patch_embed as pe

    real = pe.choose_impl
    monkeypatch.setattr(pe, "choose_impl", lambda impl, *a, **k: "triton" if impl == "auto" else real(impl, *a, **k))
    imgs, ids, w, b, pos = _inputs(2, 3, 16, 24, 8, 16, 0.5, torch.float32, "cpu")
    w, b, pos64 = w.detach(), b.detach(), pos.detach().double()
    u5, w5 = torch.randint(0, 256, (2, 5, 16, 24), dtype=torch.uint8), randn(16, 5, 8, 8)
    u3 = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8)
    stats5 = dict(mean=[0.5] * 5, std=[0.25] * 5)
    for args, kw in (((imgs, ids, w, b, pos64, 8), {}), ((u5, ids, w5, None, None, 8), stats5),
                     ((u3, ids, w.double(), b.double(), None, 8), {})):
        with pytest.raises(ValueError, match="impl='triton' is not available"):
            masked_patch_embed(*args, impl="triton", **kw)
        assert torch.equal(masked_patch_embed(*args, **kw), masked_patch_embed(*args, impl="reference", **kw))


def test_imgs_requiring_grad_raise():
    imgs, ids, w, b, pos = _inputs(1, 3, 16, 16, 8, 16, 0.5, torch.float32, "cpu")
    with pytest.raises(ValueError, match="imgs must not require grad"):
        masked_patch_embed(imgs.requires_grad_(), ids, w, b, pos, 8)
    with torch.no_grad():  # fine without autograd
        masked_patch_embed(imgs, ids, w, b, pos, 8)


def _bad(**over):
    imgs, ids, w, b, pos = _inputs(2, 3, 16, 24, 8, 16, 0.5, torch.float32, "cpu")
    args = dict(imgs=imgs, ids_keep=ids, weight=w.detach(), bias=b.detach(), pos_embed=pos.detach(), patch_size=8)
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(imgs=torch.randn(2, 3, 16)), ValueError, "imgs must have 4 dimensions"),
    (dict(imgs=torch.randn(2, 3, 16, 20)), ValueError, "multiples of patch_size"),
    (dict(imgs=torch.ones(2, 3, 16, 24, dtype=torch.int64)), TypeError, "floating point"),
    (dict(weight=torch.randn(16, 3, 4, 4)), ValueError, "weight must have shape"),
    (dict(weight=torch.randn(16, 3, 8, 8).double()), TypeError, "weight dtype"),
    (dict(bias=torch.randn(15)), ValueError, "bias must have shape"),
    (dict(pos_embed=torch.randn(1, 6, 16)), ValueError, "pos_embed must have shape"),
    (dict(ids_keep=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "ids_keep"),
    (dict(ids_keep=torch.zeros(3, 3, dtype=torch.int64)), ValueError, "ids_keep must have shape"),
    (dict(ids_keep=torch.full((2, 3), 6, dtype=torch.int64)), ValueError, r"in \[0, L=6\)"),
    (dict(patch_size=8.0), TypeError, "patch_size"),
    (dict(impl="fast"), ValueError, "impl"),
])
def test_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        masked_patch_embed(**_bad(**over))


def test_opcheck():
    imgs, ids, w, b, pos = _inputs(2, 3, 16, 24, 8, 16, 0.5, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.maefast.masked_patch_embed.default, (imgs, ids, w, b, pos, 8, "reference"))
    torch.library.opcheck(torch.ops.maefast.masked_patch_embed.default, (imgs, ids, w, None, None, 8, "reference"))



@pytest.mark.parametrize("dtype,pos_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "reference"])
def test_backward_fake_matches_real_for_a_channels_last_weight(impl, dtype, pos_dtype):
    """The backward op's fake gives the real op's layouts and dtypes: the weight gradient contiguous
    whatever the weight's strides (before: empty_like kept a channels_last weight's strides, and a
    compiled graph planned for a layout the op does not return), the weight's and bias's gradients in
    the weight's dtype, pos_embed's in its own (a bf16 weight with an fp32 pos_embed: the autocast case)."""
    imgs, ids, w, b, pos = _inputs(2, 3, 16, 24, 8, 16, 0.5, dtype, "cpu", pos_dtype=pos_dtype)
    w = w.detach().contiguous(memory_format=torch.channels_last)
    g = randn(2, ids.shape[1], 16, dtype=torch.promote_types(dtype, pos_dtype))
    args = (g, imgs, ids, w, pos.detach(), 8, True, impl)
    op = torch.ops.maefast.masked_patch_embed_backward.default
    real = op(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    for name, r, f in zip(("weight", "bias", "pos_embed"), real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), name
    torch.library.opcheck(op, args)



@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "reference"])
def test_backward_op_without_pos_embed_ignores_need_pos(impl):
    """The backward op called with need_pos=True and no pos_embed (a direct call, or a graph that
    traced one) returns what its fake says: an empty pos_embed gradient, the weight's and bias's as usual."""
    imgs, ids, w, b, pos = _inputs(2, 3, 16, 24, 8, 16, 0.5, torch.float32, "cpu")
    g = randn(2, ids.shape[1], 16)
    op = torch.ops.maefast.masked_patch_embed_backward.default
    dw, db, dpos = op(g, imgs, ids, w.detach(), None, 8, True, impl)
    want = op(g, imgs, ids, w.detach(), None, 8, False, impl)
    assert dpos.numel() == 0 and torch.equal(dw, want[0]) and torch.equal(db, want[1])
    torch.library.opcheck(op, (g, imgs, ids, w.detach(), None, 8, True, impl))


@pytest.mark.parametrize("dtype,pos_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, None),
                                             (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "reference"])
def test_forward_fake_matches_real_dtype(impl, dtype, pos_dtype):
    """The forward op's fake gives the real tokens' shape and dtype: the weight's, promoted with
    pos_embed's (fp32 for a bf16 weight and an fp32 pos_embed; fp32 for fp16 with bf16), so a compiled
    graph plans for what the op returns."""
    imgs, ids, w, b, pos = _inputs(2, 3, 16, 24, 8, 16, 0.5, dtype, "cpu", pos_dtype=pos_dtype or dtype)
    args = (imgs, ids, w.detach(), b.detach(), pos.detach() if pos_dtype else None, 8, impl)
    op = torch.ops.maefast.masked_patch_embed.default
    real = op(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert real.dtype == torch.promote_types(dtype, pos_dtype or dtype)
    assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype)


def test_uint8_kernels_compile_for_sm90_without_spills(tmp_path):
    """The patch-embedding kernels reading uint8 images, with fp32, bf16 and fp16 weights, compile
    for sm_90 as the launchers configure them (scripts/compile_kernels.py, no GPU) and spill no
    register in the weight backward. Before: the fp32 one ran two pipeline stages and spilled at 255
    registers (392-824 B under Triton 3.6, 384-392 B under 3.9)."""
    pytest.importorskip("triton.backends.compiler")
    out = tmp_path / "pe.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compile_kernels.py"), "--no-attention",
                          "--match", "uint8", "--json", str(out)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    rows = [r for r in json.loads(out.read_text())["kernels"] if r["kernel"].startswith("patch_embed")]
    names = {r["kernel"] for r in rows}
    for p in (14, 16):
        for dt in ("fp32", "bf16", "fp16"):
            assert f"patch_embed bwd dW p{p} {dt} uint8" in names and f"patch_embed fwd p{p} {dt} uint8 pos=True" in names
    spilled = [(r["kernel"], r["spill_stack_bytes"]) for r in rows if "bwd" in r["kernel"] and r["spill_stack_bytes"]]
    assert not spilled, spilled


@pytest.mark.parametrize("impl", [pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("layout", ["channels_last", "padded-planes"])
def test_cuda_gather_bad_ids_and_unaligned_channel_planes(device, impl, layout):
    """maefast._C.patch_gather on a card or under the CPU emulation: the element-wise kernel (channels_last)
    and the row kernel (channel planes padded by one element: 16-byte rows, 2-byte-aligned planes) copy what
    the PyTorch gather does; the row kernel's copy unit divides the base and every byte stride (a wider
    one is a misaligned load on a GPU); an id outside [0, L), L itself included, gives a NaN row."""
    from maefast._cpp_lib import get_C
    from maefast.ops.patch_embed import _rows_cuda, _rows_torch

    n, c, size, p = 2, 3, 32, 8
    g = size // p
    if layout == "channels_last":
        imgs = randn(n, c, size, size, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    else:
        plane, s_n = size * size + 1, 3 * (size * size + 1) + 5  # 2050-byte planes, 6160-byte images
        imgs = randn(n * s_n, device=device).to(torch.bfloat16).as_strided((n, c, size, size), (s_n, plane, size, 1))
    ids = random_masking(n, g * g, 0.5, seed=4, device=device, impl="reference").ids_keep
    k = ids.shape[1]
    out = torch.empty(n * k, c * p * p, dtype=imgs.dtype, device=device)
    unit = get_C().patch_gather_unit_bytes(imgs.data_ptr(), *imgs.stride(), n, k, c, p, g, g, 2, out.data_ptr())
    assert (unit == 0) == (layout == "channels_last")
    assert all((v * 2) % max(unit, 1) == 0 for v in (*imgs.stride()[:3], p)) and imgs.data_ptr() % max(unit, 1) == 0
    want = _rows_torch(imgs, ids, p)
    assert torch.equal(_rows_cuda(imgs, ids, p), want)
    for bad_id in (g * g, g * g + 7, -1):
        bad = ids.clone()
        bad[1, 2] = bad_id
        rows = _rows_cuda(imgs, bad, p)
        assert torch.isnan(rows[k + 2].float()).all(), bad_id
        assert torch.equal(rows[:k + 2], want[:k + 2]) and torch.equal(rows[k + 3:], want[k + 3:])


# ---- GPU: paper shapes, every impl (GPU and GPU_IMPLS are globals so the bodies can be dry-run on a CPU) ----

GPU = torch.device("cuda")
GPU_IMPLS = ("reference", "triton", "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES_GPU)
def test_gpu_paper_shapes(impl, dtype, case):
    _check_against_reference(impl, case, dtype, GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_gpu_no_image_or_no_kept_patch_gives_empty_tokens(impl, dtype):
    """K = 0 kept patches: empty tokens of the right shape on every backend, float and uint8 images (the CUDA C++
    gathers checked their pointers before their empty-size return, and the caching allocator gives an empty
    tensor none); N = 0 images are refused before any kernel, as on the CPU (`check_images`)."""
    w, b, pos = randn(64, 3, 16, 16, device=GPU), randn(64, device=GPU), randn(1, 17, 64, device=GPU)
    for n, k in ((0, 4), (2, 0)):
        imgs = (torch.randint(0, 256, (n, 3, 64, 64), device=GPU, dtype=torch.uint8) if dtype == torch.uint8
                else randn(n, 3, 64, 64, device=GPU))
        ids = torch.zeros(n, k, dtype=torch.int64, device=GPU)
        if n == 0:
            with pytest.raises(ValueError, match="imgs must be non-empty"):
                masked_patch_embed(imgs, ids, w, b, pos, 16, impl=impl)
            continue
        out = masked_patch_embed(imgs, ids, w, b, pos, 16, impl=impl)
        assert out.shape == (n, k, 64) and out.dtype == torch.float32, (n, k)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS[1:])
def test_gpu_deterministic_backward_and_autocast(impl):
    dev = GPU
    imgs, ids, w, b, pos = _inputs(7, 3, 224, 224, 14, 1280, 0.75, torch.float32, dev)
    g = randn(7, ids.shape[1], 1280, dtype=torch.bfloat16, device=dev)

    def fn(*a):
        with torch.autocast(GPU.type, dtype=torch.bfloat16):
            return masked_patch_embed(*a, impl=impl)

    out1, grads1, _ = _run(fn, imgs, ids, w, b, pos, 14, grad_out=g)
    out2, grads2, _ = _run(fn, imgs, ids, w, b, pos, 14, grad_out=g)
    assert out1.dtype == torch.float32  # the bf16 conv + the fp32 pos_embed, as the official
    assert torch.equal(out1, out2)
    for a, c in zip(grads1, grads2):
        assert torch.equal(a, c), "backward is not bitwise reproducible"
    with torch.autocast(GPU.type, dtype=torch.bfloat16):
        ref = R.masked_patch_embed(imgs, ids, w, b, pos, 14)
    oracle = R.masked_patch_embed(imgs.double(), ids, w.double(), b.double(), pos.double(), 14)
    assert_error_ratio(out1, ref, oracle, torch.bfloat16, "forward", name=f"{impl} autocast")


@pytest.mark.cuda
def test_gpu_module_auto_no_sync():
    dev = GPU
    m = MaskedPatchEmbed(224, 14, 3, 1280).to(dev)
    imgs = randn(13, 3, 224, 224, device=dev)
    pos = randn(1, 257, 1280, device=dev)
    tokens, _, _ = m(imgs, 0.75, pos_embed=pos, seed=3)  # compiles the kernels first
    tokens.float().square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in forward or backward now raises
    try:
        tokens, mask, ids_restore = m(imgs, 0.75, pos_embed=pos, seed=3)
        tokens.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ids = random_masking(13, 256, 0.75, seed=3, device=dev, impl="reference")
    assert torch.equal(mask, ids.mask) and torch.equal(ids_restore, ids.ids_restore)
    ref = R.masked_patch_embed(imgs, ids.ids_keep, m.proj.weight, m.proj.bias, pos, 14)
    oracle = R.masked_patch_embed(imgs.double(), ids.ids_keep, m.proj.weight.double(), m.proj.bias.double(),
                                  pos.double(), 14)
    assert_error_ratio(tokens, ref, oracle, torch.float32, "forward", name="module auto")


def _C_or_skip():
    from maefast._cpp_lib import get_C

    C = get_C()
    if C is None or not hasattr(C, "patch_gather_unit_bytes"):
        pytest.skip("maefast._C is not built")
    return C


@pytest.mark.parametrize("elem,p,base,strides,unit", [
    (2, 16, 4096, (150528, 50176, 224, 1), 16),   # bf16 NCHW 224, patch 16: 32-byte lines
    (4, 16, 4096, (150528, 50176, 224, 1), 16),
    (2, 14, 4096, (150528, 50176, 224, 1), 4),    # 28-byte lines
    (4, 14, 4096, (150528, 50176, 224, 1), 8),
    (2, 16, 4098, (150528, 50176, 224, 1), 2),    # a sliced image: 2-byte aligned base
    (2, 16, 4096, (150528, 1, 672, 3), 0),        # channels_last: the element-wise kernel
])
def test_patch_gather_copy_unit(elem, p, base, strides, unit):
    """The CUDA gather's host-side choice of copy width (pure host code: runs without a GPU)."""
    C = _C_or_skip()
    g = 224 // p
    assert C.patch_gather_unit_bytes(base, *strides, 256, g * g // 4, 3, p, g, g, elem, 1 << 20) == unit


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [16, 14])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "wsliced"])
def test_gpu_patch_gather_rows_equal_torch(dtype, p, layout):
    """maefast._C.patch_gather (row kernel or element-wise) copies exactly what the PyTorch gather does,
    and a bad id gives a NaN row."""
    from maefast.ops.patch_embed import _rows_cuda, _rows_torch

    C = _C_or_skip()
    n, size = 5, 224
    x = randn(n, 3, size + 2, size + 2, device=GPU).to(dtype)
    imgs = {"nchw": x[:, :, :size, :size].contiguous(),
            "channels_last": x[:, :, :size, :size].contiguous(memory_format=torch.channels_last),
            "sliced": x[:, :, 1:size + 1, :size],  # rows of 226: odd line strides
            "wsliced": x[:, :, :size, 1:size + 1]}[layout]  # base one element in: the narrowest unit
    L = (size // p) ** 2
    ids = random_masking(n, L, 0.75, seed=4, device=GPU).ids_keep.contiguous()
    out = torch.empty(1, device=GPU)
    unit = C.patch_gather_unit_bytes(imgs.data_ptr(), *imgs.stride(), n, ids.shape[1], 3, p, size // p, size // p,
                                     imgs.element_size(), out.data_ptr())
    assert (unit == 0) == (layout == "channels_last")
    assert torch.equal(_rows_cuda(imgs, ids, p), _rows_torch(imgs, ids, p))
    bad = ids.clone()
    bad[1, 2] = L + 7
    rows = _rows_cuda(imgs, bad, p)
    k = ids.shape[1]
    assert torch.isnan(rows[k + 2].float()).all()
    assert torch.equal(rows[: k + 2], _rows_torch(imgs, ids, p)[: k + 2])
