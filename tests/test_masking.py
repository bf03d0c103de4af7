"""maefast.ops.random_masking: the official masking given noise, seeded Philox masks identical on
every backend, the sampler's statistics, the custom op, and bad inputs."""
import os

import pytest
import torch

from maefast import reference as R
from maefast._triton import HAS_TRITON
from maefast.ops import random_masking
from maefast.reference.philox import philox4x32, philox_noise, philox_uniform

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# tests on the `device` fixture run every backend: the CUDA C++ kernels on a card, or without one under the
# CPU emulation (tests/cuda_emu)
DEVICE_IMPLS = ["reference", pytest.param("triton", marks=needs_triton),
                pytest.param("cuda", marks=pytest.mark.cuda)]

# (N, L, mask_ratio): paper grids (224/p16 -> 196, 224/p14 -> 256), batch 1 and a prime, odd L.
# 129 = 2 * 64 + 1: one patch alone in the last chunk of BLOCK_J = 64 and in a second block of BLOCK_I = 128.
SHAPES_CPU = [(1, 196, 0.75), (7, 196, 0.5), (2, 256, 0.9), (3, 50, 0.75), (5, 17, 0.3), (2, 2, 0.5),
              (2, 129, 0.75)]
SHAPES_GPU = [(1, 196, 0.75), (7, 196, 0.5), (13, 256, 0.75), (256, 196, 0.75), (256, 256, 0.9), (64, 1024, 0.75),
              (3, 4096, 0.6), (5, 333, 0.25)]


def _assert_ids_equal(got, want, what=""):
    for name, a, b in zip(("ids_keep", "ids_restore", "mask"), got, want):
        assert a.dtype == b.dtype, f"{what} {name}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{what} {name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if not torch.equal(a.cpu(), b.cpu()):
            bad = (a.cpu() != b.cpu()).nonzero()
            raise AssertionError(f"{what} {name}: {len(bad)} entries differ, first at {tuple(bad[0].tolist())}")


def _check_invariants(ids, L, K):
    ids_keep, ids_restore, mask = (t.cpu() for t in ids)
    N = ids_keep.shape[0]
    assert ids_keep.shape == (N, K) and ids_restore.shape == (N, L) and mask.shape == (N, L)
    assert mask.dtype == torch.float32 and ids_keep.dtype == torch.int64 and ids_restore.dtype == torch.int64
    assert torch.equal(ids_restore.sort(1).values, torch.arange(L).expand(N, L))
    assert torch.equal(mask.sum(1), torch.full((N,), float(L - K)))
    assert torch.equal(torch.gather(mask, 1, ids_keep), torch.zeros(N, K))
    assert torch.equal(torch.gather(ids_restore, 1, ids_keep), torch.arange(K).expand(N, K))


def _stable_reference(noise, K):
    shuffle = torch.argsort(noise.double(), dim=1, stable=True)
    restore = torch.argsort(shuffle, dim=1)
    return shuffle[:, :K], restore, (restore >= K).float()


# ---- Philox ----------------------------------------------------------------------------------

def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32_10 (the same rounds, constants and key schedule).
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        got = philox4x32(*(torch.tensor([c]) for c in ctr), *key)
        assert tuple(int(g) for g in got) == want


@needs_triton
@pytest.mark.parametrize("seed,offset", [(0, 0), (1, 1), (12345, 2 ** 32 - 100), (2 ** 62 + 99, 2 ** 40), (2 ** 31 + 3, 7)])
def test_philox_matches_triton_rand(device, seed, offset):
    import triton
    import triton.language as tl

    @triton.jit
    def _rand_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK).to(tl.int64)
        tl.store(out_ptr + offs, tl.rand(seed, offset + offs), mask=offs < n)

    n = 1000
    out = torch.full((n,), float("nan"), device=device)
    _rand_kernel[(1,)](out, seed, offset, n, BLOCK=1024)
    want = philox_uniform(seed, offset + torch.arange(n))
    assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32)), "Philox reference != tl.rand bit for bit"


def test_philox_noise_is_uniform():
    x = philox_noise(200, 500, seed=2024).double().reshape(-1)
    n = x.numel()
    assert float(x.min()) >= 0.0 and float(x.max()) < 1.0
    assert abs(float(x.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    hist = torch.histc(x, bins=10, min=0.0, max=1.0)
    expect = n / 10
    assert float((hist - expect).abs().max()) < 5 * (expect * 0.9) ** 0.5
    # Counters: offset shifts the stream, sample n starts at offset + n*L.
    assert torch.equal(philox_noise(2, 500, 2024, offset=500)[0], x.float().reshape(200, 500)[1])


@pytest.mark.parametrize("seed", (0, 7, 2 ** 32 - 1, 2 ** 32, 2 ** 62 + 17, 2 ** 63 - 1))
def test_philox_tensor_seed_computes_where_it_lives(seed):
    """A 0-d int64 tensor as the key (a device seed) gives the int seed's bits, and compiles as one graph:
    its value is never read on the host (on a GPU that read would sync, and fail inside a capture)."""
    from maefast.reference.philox import philox_randint

    ctr = 2 ** 40 + torch.arange(300)
    want = philox_uniform(seed, ctr)
    assert torch.equal(philox_uniform(torch.tensor(seed), ctr).view(torch.int32), want.view(torch.int32))
    fn = torch.compile(lambda s, c: philox_randint(s, c), backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(torch.tensor([seed]), ctr), philox_randint(seed, ctr))
    # philox_noise reads a CPU tensor as the int it holds (checked as one), and refuses what is no seed
    assert torch.equal(philox_noise(3, 5, torch.tensor([seed]), 11), philox_noise(3, 5, seed, 11))
    with pytest.raises(ValueError, match="1 int64 element"):
        philox_noise(1, 2, torch.tensor([seed], dtype=torch.float64))
    with pytest.raises(ValueError, match="seed must be in"):
        philox_noise(1, 2, torch.tensor([-1]))


def test_philox_seed_and_offset_bounds():
    # the last counter may be 2**63 - 1 (offset + N*L == 2**63), one more is refused; a bool is no seed
    assert philox_noise(1, 2, 0, offset=2 ** 63 - 2).shape == (1, 2)
    with pytest.raises(ValueError, match="offset"):
        philox_noise(1, 2, 0, offset=2 ** 63 - 1)
    with pytest.raises(TypeError, match="seed"):
        philox_noise(1, 2, True)


# ---- given noise: the official masking ------------------------------------------------------

@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("N,L,ratio", SHAPES_CPU)
def test_given_noise_matches_reference(device, impl, N, L, ratio):
    noise = torch.rand(N, L, device=device)
    want = R.masking_ids(N, L, ratio, noise=noise.cpu())
    got = random_masking(N, L, ratio, noise=noise, impl=impl)
    _assert_ids_equal(got, want, f"{impl} N={N} L={L} r={ratio}")
    _check_invariants(got, L, int(L * (1 - ratio)))


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_noise_dtypes_and_ties(device, impl, dtype):
    N, L, ratio = 3, 64, 0.75
    noise = (torch.randint(0, 8, (N, L), device=device).to(dtype) / 8)  # many ties: broken by index
    got = random_masking(N, L, ratio, noise=noise, impl=impl)
    _assert_ids_equal(got, _stable_reference(noise.cpu(), 16), f"{impl} {dtype} ties")
    signed = noise - 0.5  # negative values too (the interpreter once compared bf16 bits)
    got = random_masking(N, L, ratio, noise=signed, impl=impl)
    _assert_ids_equal(got, _stable_reference(signed.cpu(), 16), f"{impl} {dtype} signed ties")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_noncontiguous_noise(device, impl):
    base = torch.rand(40, 6, device=device)
    noise = base.t()  # (6, 40), strides (1, 6)
    got = random_masking(6, 40, 0.5, noise=noise, impl=impl)
    _assert_ids_equal(got, R.masking_ids(6, 40, 0.5, noise=noise.cpu().contiguous()), f"{impl} transposed noise")


# ---- seeded: the same mask everywhere ----------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("N,L,ratio,seed,offset", [(2, 196, 0.75, 0, 0), (3, 256, 0.75, 2 ** 40 + 5, 123),
                                                   (4, 50, 0.5, 1, 1), (1, 17, 0.9, 77, 2 ** 33)])
def test_seed_same_mask_across_impls(device, N, L, ratio, seed, offset):
    ref = random_masking(N, L, ratio, seed=seed, offset=offset, device="cpu", impl="reference")
    # The seeded noise is documented: its official masking is the seeded mask.
    _assert_ids_equal(ref, _stable_reference(philox_noise(N, L, seed, offset), int(L * (1 - ratio))), "documented")
    tri = random_masking(N, L, ratio, seed=seed, offset=offset, device=device, impl="triton")
    _assert_ids_equal(tri, ref, "triton vs reference")
    _check_invariants(tri, L, int(L * (1 - ratio)))


@needs_triton
def test_triton_kernel_reads_the_seed_tensor(device):
    """The launcher's seed_tensor (a device seed, what a CUDA-graph replay feeds) is what the kernel draws
    from, not the int seed beside it. The op reads a CPU seed tensor on the host, so the launcher is called
    directly: on a CPU no other test reaches the kernel's SEED_FROM_PTR branch."""
    from maefast.kernels.masking import random_masking_triton

    N, L, K, offset = 3, 50, 12, 7
    dev = torch.device(device)
    for value in (5, 2 ** 62 + 17):
        want = random_masking(N, L, 0.76, seed=value, offset=offset, device="cpu", impl="reference")
        assert want.ids_keep.shape[1] == K
        got = random_masking_triton(N, L, K, None, 999, offset, dev,
                                    seed_tensor=torch.tensor([value], dtype=torch.int64, device=dev))
        _assert_ids_equal(got, want, f"seed tensor {value}")


@pytest.mark.parametrize("impl", [pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("N,L,ratio,seed,offset", [(2, 196, 0.75, 0, 0), (3, 256, 0.75, 2 ** 40 + 5, 123),
                                                   (1, 17, 0.9, 77, 2 ** 33)])
def test_seeded_cuda_kernel_matches_the_reference(device, impl, N, L, ratio, seed, offset):
    """The CUDA C++ kernel's Philox draws (both key words: a seed past 2**32; the counter's high word:
    an offset past 2**32; the sign fold of uint_to_uniform) give the reference's seeded mask."""
    ref = random_masking(N, L, ratio, seed=seed, offset=offset, device="cpu", impl="reference")
    got = random_masking(N, L, ratio, seed=seed, offset=offset, device=device, impl=impl)
    _assert_ids_equal(got, ref, f"{impl} seeded N={N} L={L} seed={seed} offset={offset}")


@pytest.mark.parametrize("impl", [pytest.param("cuda", marks=pytest.mark.cuda)])
def test_cuda_kernel_reads_the_seed_pointer(device, impl):
    """A device seed (seed_ptr, what a CUDA-graph replay feeds) is what the CUDA C++ kernel draws from,
    not the int seed beside it. The op reads a CPU seed tensor on the host, so the launcher is called
    directly (as for Triton above)."""
    from maefast.ops.masking import _cuda

    N, L, K, offset = 3, 50, 12, 7
    for value in (5, 2 ** 62 + 17):
        want = random_masking(N, L, 0.76, seed=value, offset=offset, device="cpu", impl="reference")
        seed_t = torch.tensor([value], dtype=torch.int64, device=device)
        got = _cuda(N, L, K, None, 999, offset, seed_t.device, seed_ptr=seed_t.data_ptr())
        _assert_ids_equal(got, want, f"seed pointer {value}")


def test_seed_reproducible_and_distinct():
    a = random_masking(4, 196, 0.75, seed=5)
    _assert_ids_equal(random_masking(4, 196, 0.75, seed=5), a, "same seed")
    _assert_ids_equal(random_masking(4, 196, 0.75, seed=torch.tensor([5])), a, "seed tensor")
    assert not torch.equal(random_masking(4, 196, 0.75, seed=6).mask, a.mask)
    shifted = random_masking(3, 196, 0.75, seed=5, offset=196)  # offset skips sample 0
    _assert_ids_equal(shifted, tuple(t[1:] for t in a), "offset")
    torch.manual_seed(3)
    b = random_masking(4, 196, 0.75)
    torch.manual_seed(3)
    _assert_ids_equal(random_masking(4, 196, 0.75), b, "torch.manual_seed")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
def test_sampler_statistics(device, impl):
    # Each patch is kept with probability K/L; counts over N samples ~ Binomial(N, K/L).
    N, L, ratio = (4000, 16, 0.75) if impl == "reference" else (600, 16, 0.75)
    K = int(L * (1 - ratio))
    ids = random_masking(N, L, ratio, seed=31337, device=device, impl=impl)
    _check_invariants(ids, L, K)
    kept = (1 - ids.mask.cpu()).sum(0)
    p = K / L
    sd = (N * p * (1 - p)) ** 0.5
    assert float((kept - N * p).abs().max()) < 5 * sd, f"kept counts {kept.tolist()} vs {N * p} +- {sd:.1f}"
    # The first kept position is uniform over the patches too.
    first = torch.bincount(ids.ids_keep[:, 0].cpu(), minlength=L).double()
    sd1 = (N / L * (1 - 1 / L)) ** 0.5
    assert float((first - N / L).abs().max()) < 5 * sd1


def test_opcheck():
    op = torch.ops.maefast.random_masking.default
    torch.library.opcheck(op, (3, 10, 4, None, torch.tensor([5]), 0, torch.device("cpu"), "reference"))
    torch.library.opcheck(op, (3, 10, 4, torch.rand(3, 10), None, 0, torch.device("cpu"), "reference"))


# ---- bad inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(mask_ratio=0.0), ValueError, "mask_ratio"),
    (dict(mask_ratio=1.0), ValueError, "mask_ratio"),
    (dict(mask_ratio=True), TypeError, "mask_ratio"),
    (dict(mask_ratio="0.5"), TypeError, "mask_ratio"),
    (dict(num_patches=3, mask_ratio=0.9), ValueError, "at least one patch"),
    (dict(batch=-1), ValueError, "batch"),
    (dict(num_patches=0), ValueError, "num_patches"),
    (dict(batch=2.0), TypeError, "batch"),
    (dict(batch=True), TypeError, "batch must be an int, got bool"),  # True would be batch 1
    (dict(num_patches=True), TypeError, "num_patches must be an int, got bool"),
    (dict(noise=torch.rand(2, 10), device="meta"), ValueError, "differs from noise.device"),
    (dict(noise=torch.rand(2, 9)), ValueError, "noise must have shape"),
    (dict(noise=torch.ones(2, 10, dtype=torch.int64)), TypeError, "floating point"),
    (dict(noise=torch.rand(2, 10), seed=3), ValueError, "not both"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2 ** 63), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=torch.tensor([1], dtype=torch.int32)), ValueError, "seed tensor"),
    (dict(seed=3, offset=-1), ValueError, "offset"),
    (dict(impl="fast"), ValueError, "impl"),
])
def test_bad_inputs(kwargs, exc, match):
    args = dict(batch=2, num_patches=10, mask_ratio=0.5)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        random_masking(args.pop("batch"), args.pop("num_patches"), args.pop("mask_ratio"), **args)


def test_bad_impl_is_refused_on_the_meta_device_too():
    """On meta with no tensor input (the op answers with the fake's shapes before resolving impl) a
    misspelt impl still raises, as on every other device."""
    with pytest.raises(ValueError, match="impl"):
        random_masking(2, 16, 0.75, seed=1, device="meta", impl="fast")


def test_custom_op_needs_noise_or_seed():
    """The op called directly (torch.ops, a traced graph) names the missing input."""
    with pytest.raises(ValueError, match="needs noise or a seed"):
        torch.ops.maefast.random_masking.default(2, 10, 5, None, None, 0, torch.device("cpu"), "reference")


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.no_triton_launch  # an empty grid: nothing to launch
def test_empty_batch(device, impl):
    """batch 0 is allowed: empty outputs of the right shapes and dtypes."""
    for kw in (dict(seed=1, device=device), dict(noise=torch.rand(0, 16, device=device))):
        got = random_masking(0, 16, 0.75, impl=impl, **kw)
        assert [tuple(t.shape) for t in got] == [(0, 4), (0, 16), (0, 16)]
        assert [t.dtype for t in got] == [torch.int64, torch.int64, torch.float32]


def test_unseeded_calls_draw_fresh_masks():
    """seed=None draws a new seed from torch's default generator on every call: two calls differ (a
    constant seed would pass the reproducibility test above and train on one mask per batch shape)."""
    torch.manual_seed(3)
    a, b = random_masking(4, 196, 0.75), random_masking(4, 196, 0.75)
    assert not torch.equal(a.mask, b.mask)
    torch.manual_seed(4)
    assert not torch.equal(random_masking(4, 196, 0.75).mask, a.mask)


def test_compiled_masking_refuses_a_ratio_keeping_no_patch():
    """Under torch.compile random_masking checks the ratio without the eager helpers (a constant message
    for dynamo), by the same rule: 0.95 of 16 patches keeps floor(0.8) = 0, refused as eagerly (a compiled
    call must not hand the kernels len_keep = 0)."""
    torch._dynamo.reset()
    f = torch.compile(lambda s: random_masking(2, 16, 0.95, seed=s).ids_keep, fullgraph=True, backend="eager")
    with pytest.raises(ValueError, match="at least one patch"):
        random_masking(2, 16, 0.95, seed=torch.tensor([7]))
    with pytest.raises(Exception, match=r"open interval \(0, 1\), keep at least one patch"):
        f(torch.tensor([7]))


def test_a_ratio_masking_no_patch_is_refused():
    """A ratio in (0, 1) so small that 1 - r rounds to 1.0 keeps all L patches and masks none (the loss over
    masked patches would be 0/0): refused by the rule, eagerly and compiled, as 0 is; 1e-16 still masks one."""
    assert random_masking(2, 16, 1e-16, seed=1).ids_keep.shape == (2, 15)
    with pytest.raises(ValueError, match="masks none of the 16 patches"):
        random_masking(2, 16, 1e-17, seed=1)
    torch._dynamo.reset()
    f = torch.compile(lambda s: random_masking(2, 16, 1e-17, seed=s).ids_keep, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="mask one"):
        f(torch.tensor([7]))


def test_unavailable_impl_raises_with_reason():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: impl='cuda' may be available")
    with pytest.raises(ValueError, match="not available"):
        random_masking(2, 10, 0.5, seed=1, device="cpu", impl="cuda")


# ---- GPU: paper shapes, every impl (GPU and GPU_IMPLS are globals so the bodies can be dry-run on a CPU) ----

GPU = torch.device("cuda")
GPU_IMPLS = ("reference", "triton", "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_empty_batch(impl):
    """batch 0 on the card, seeded and with noise: empty outputs of the right shapes (the CUDA C++ kernel
    checked its pointers before its N = 0 return, and the caching allocator gives an empty tensor none)."""
    for kw in (dict(seed=1, device=GPU), dict(noise=torch.rand(0, 16, device=GPU))):
        got = random_masking(0, 16, 0.75, impl=impl, **kw)
        assert [tuple(t.shape) for t in got] == [(0, 4), (0, 16), (0, 16)]
        assert all(t.device.type == "cuda" for t in got)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS[1:])
@pytest.mark.parametrize("N,L,ratio", SHAPES_GPU)
def test_gpu_given_noise(impl, N, L, ratio):
    noise = torch.rand(N, L, device=GPU)
    want = _stable_reference(noise.cpu(), int(L * (1 - ratio)))
    got = random_masking(N, L, ratio, noise=noise, impl=impl)
    _assert_ids_equal(got, want, f"{impl} N={N} L={L}")
    for dtype in (torch.float16, torch.float64):
        n2 = noise.to(dtype)
        _assert_ids_equal(random_masking(N, L, ratio, noise=n2, impl=impl),
                          _stable_reference(n2.cpu(), int(L * (1 - ratio))), f"{impl} {dtype}")


@pytest.mark.cuda
def test_gpu_philox_matches_compiled_triton_rand():
    for seed, offset in ((0, 0), (1, 1), (2 ** 62 + 99, 2 ** 40)):
        test_philox_matches_triton_rand(GPU, seed, offset)


@pytest.mark.cuda
@pytest.mark.parametrize("N,L,ratio", SHAPES_GPU)
def test_gpu_seed_same_mask_on_every_impl(N, L, ratio):
    seed, offset = 987654321, 2 ** 32 + 11
    ref = random_masking(N, L, ratio, seed=seed, offset=offset, device="cpu", impl="reference")
    for impl in GPU_IMPLS:
        got = random_masking(N, L, ratio, seed=seed, offset=offset, device=GPU, impl=impl)
        _assert_ids_equal(got, ref, f"{impl} seeded N={N} L={L}")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ("auto",) + GPU_IMPLS)
def test_gpu_device_seed_same_mask_as_int_seed(impl):
    """A 1-element int64 seed on the output device (what a captured step feeds) is read by the kernels:
    the same mask as the int seed, and a new value in the same tensor gives the new seed's mask."""
    N, L, ratio, offset = 7, 196, 0.75, 2 ** 33 + 5
    seed = torch.tensor([123456789], dtype=torch.int64, device=GPU)
    for value in (123456789, 2 ** 62 + 17):
        seed.fill_(value)
        ref = random_masking(N, L, ratio, seed=value, offset=offset, device="cpu", impl="reference")
        got = random_masking(N, L, ratio, seed=seed, offset=offset, device=GPU, impl=impl)
        _assert_ids_equal(got, ref, f"{impl} device seed {value}")


@pytest.mark.cuda
def test_gpu_device_seed_refusals():
    """The wrapper refuses a device seed that is not int64; the op itself (called directly, as a
    compiled graph does) refuses it too; past the kernels' patch limit `auto` runs the reference on the
    device seed (its noise computed on the GPU, without reading the seed on the host: no sync)."""
    from maefast.ops.masking import KERNEL_MAX_PATCHES

    with pytest.raises(ValueError, match="1-element int64"):
        random_masking(2, 16, 0.75, seed=torch.tensor([3], dtype=torch.int32, device=GPU), device=GPU)
    for impl in GPU_IMPLS[1:]:
        with pytest.raises(ValueError, match="device seed must be an int64 tensor"):
            torch.ops.maefast.random_masking(2, 16, 4, None, torch.tensor([3], dtype=torch.int32, device=GPU), 0,
                                             GPU, impl)
    L = KERNEL_MAX_PATCHES + 1
    want = random_masking(1, L, 0.75, seed=3, device="cpu")
    for impl in ("auto", "reference"):
        torch.cuda.set_sync_debug_mode("error")  # a read of the seed on the host would raise
        try:
            got = random_masking(1, L, 0.75, seed=torch.tensor([3], device=GPU), device=GPU, impl=impl)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        _assert_ids_equal(got, want, f"{impl}, device seed past the limit")


@pytest.mark.cuda
def test_gpu_auto_and_statistics():
    ids = random_masking(8192, 196, 0.75, seed=4, device=GPU)
    _check_invariants(ids, 196, 49)
    kept = (1 - ids.mask).sum(0).cpu()
    p = 49 / 196
    sd = (8192 * p * (1 - p)) ** 0.5
    assert float((kept - 8192 * p).abs().max()) < 5 * sd


@pytest.mark.parametrize("impl", DEVICE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_noise_ranks_last_like_torch_sort(device, impl, dtype):
    """NaN in given noise: every backend ranks it after all numbers (NaNs by index), as torch's
    stable argsort does, so ids_restore stays a permutation (reviewed, not a paper case). The CUDA C++
    kernel's two NaN terms each matter: without `nan_i && !nan_j` a NaN ranks among the numbers, without
    `nan_i && nan_j` several NaNs share a rank."""
    from maefast.reference import masking_ids

    noise = torch.rand(3, 40, dtype=dtype)
    noise[0, [3, 17]] = float("nan")
    noise[1, :] = float("nan")
    noise[2, 5] = float("nan")
    ref = masking_ids(3, 40, 0.75, noise=noise)
    got = random_masking(3, 40, 0.75, noise=noise.to(device), impl=impl)
    for name, g, r in zip(("ids_keep", "ids_restore", "mask"), got, ref):
        assert torch.equal(g.cpu(), r), f"{impl} {dtype} {name}"


def test_triton_kernel_does_not_specialise_on_seed_or_offset():
    """Triton compiles a variant per integer argument that is 1 or divisible by 16; the seed changes
    every call (a CPU-drawn seed), so a specialised seed could compile inside a CUDA-graph capture."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("from maefast.kernels.masking import _random_masking_fwd_kernel as k; "
            "print(sorted(p.name for p in k.params if p.do_not_specialize))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the JIT function, not the interpreter's
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[-2] == "['offset', 'seed']", res.stdout
