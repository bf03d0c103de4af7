"""The CPU emulation that runs maefast's CUDA C++ kernels in the suite without a GPU (tests/cuda_emu): what it
computes (warp shuffles, block votes, WMMA products, dynamic shared memory, per-thread parameters) and
what it reports where a GPU would refuse the launch or leave the result undefined (a barrier some
threads never reach, a shuffle naming an exited or missing lane, launch limits, shared memory past
the kernel's attribute, a misaligned WMMA pointer, a lane reading another's WMMA store without
__syncwarp). The kernels are in tests/cuda_emu/selftest.cu, built into the emulated extension only."""
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_emu  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the emulation stands in for a GPU: none here")


@pytest.fixture(scope="module")
def C():
    mod = cuda_emu.module()
    if mod is None:
        if "no host C++ compiler" in (cuda_emu.error() or ""):
            pytest.skip(cuda_emu.error())
        pytest.fail(f"the CUDA emulation did not build: {cuda_emu.error()}")
    return mod


def _error(C):
    return pytest.raises(RuntimeError, match="emulated")  # maefast's CudaError, a RuntimeError


def test_it_is_marked_and_counts_launches(C):
    assert C.emulated is True
    assert C.device_count() == 0  # no device: maefast never takes the emulation for a GPU
    out = torch.zeros(4, dtype=torch.int32)
    before = C.launches()
    C.selftest_launch(out.data_ptr(), 2, 1, 2, 1)
    assert C.launches() == before + 1 and out.tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("threads,lane_mask", [(32, 1), (64, 16), (96, 7)])
def test_shuffle_xor(C, threads, lane_mask):
    x = torch.randn(threads)
    out = torch.full((threads,), float("nan"))
    C.selftest_shfl(x.data_ptr(), out.data_ptr(), threads, lane_mask)
    assert torch.equal(out, x[torch.arange(threads) ^ lane_mask])


def test_block_vote(C):
    blocks, threads = 3, 64
    x = torch.zeros(blocks * threads, dtype=torch.int32)
    x[threads + 17] = 1  # block 1 votes yes
    x[2 * threads:] = 1  # block 2 all yes
    out = torch.full((3 * blocks,), -1, dtype=torch.int32)
    C.selftest_vote(x.data_ptr(), out.data_ptr(), blocks, threads)
    assert out.view(blocks, 3).tolist() == [[0, 0, 1], [1, 0, 1], [1, 0, 1]]


def test_barrier_never_complete_is_a_deadlock(C):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cudaErrorLaunchFailure.*deadlock"):
        C.selftest_deadlock(out.data_ptr())
    C.selftest_launch(out.data_ptr(), 1, 1, 64, 1)  # the error was read: the next launch is clean


def test_shuffle_naming_an_exited_lane(C):
    out = torch.zeros(32)
    with pytest.raises(RuntimeError, match="exited"):
        C.selftest_exited_lane(out.data_ptr())


def test_lane_exiting_while_its_warp_waits_for_it(C):
    out = torch.zeros(1)
    with pytest.raises(RuntimeError, match="a lane exited while others of its warp wait for it"):
        C.selftest_exit_while_waited(out.data_ptr())


def test_full_mask_shuffle_in_a_partial_warp(C):
    out = torch.zeros(48)
    with pytest.raises(RuntimeError, match="lanes that do not run"):
        C.selftest_partial_warp(out.data_ptr())


@pytest.mark.parametrize("grid,block", [((1, 1), (1025, 1)), ((1, 65536), (32, 1)), ((0, 1), (32, 1)),
                                        ((1, 1), (0, 1))])
def test_launch_limits(C, grid, block):
    out = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cudaErrorInvalidConfiguration"):
        C.selftest_launch(out.data_ptr(), *grid, *block)
    assert not out.any()  # nothing ran


def test_dynamic_shared_memory(C):
    first = torch.zeros(1, dtype=torch.uint8)
    blocks, threads = 3, 64
    out = torch.zeros(blocks * threads)
    C.selftest_dyn_smem(first.data_ptr(), out.data_ptr(), blocks, threads, threads * 4, -1)
    assert int(first) == 0xFF  # what a block finds there: not zeros
    t = torch.arange(threads)
    want = torch.cat([(threads - 1 - t) + 100.0 * b for b in range(blocks)]).float()
    assert torch.equal(out, want)
    # past 48 KiB only with the kernel's attribute, and never past the card's opt-in limit
    with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):
        C.selftest_dyn_smem(first.data_ptr(), out.data_ptr(), 1, threads, 64 * 1024, -1)
    C.selftest_dyn_smem(first.data_ptr(), out.data_ptr(), 1, threads, 64 * 1024, 64 * 1024)
    with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):
        C.selftest_dyn_smem(first.data_ptr(), out.data_ptr(), 1, threads, 64 * 1024, 232448 + 1)


def test_static_shared_memory_is_poisoned_per_block(C):
    """A static __shared__ array or scalar holds 0xff bytes as each block starts, as dynamic shared memory
    does (a GPU leaves it undefined): not the zeros of a fresh static, nor the previous block's values."""
    blocks = 3
    out = torch.zeros(blocks * 64 * 2, dtype=torch.int32)
    C.selftest_static_smem(out.data_ptr(), blocks)
    assert (out == -1).all(), out.unique().tolist()


def test_poison_byte_is_chosen_by_cuda_emu_poison(C, monkeypatch):
    """CUDA_EMU_POISON=0x7f fills shared memory, static and dynamic, with 0x7f bytes (3.4e38 as a float: a stale
    value that fmaxf does not skip, as it skips the default NaN)."""
    monkeypatch.setenv("CUDA_EMU_POISON", "0x7f")
    out = torch.zeros(2 * 64 * 2, dtype=torch.int32)
    C.selftest_static_smem(out.data_ptr(), 2)
    assert (out == 0x7F7F7F7F).all(), out.unique().tolist()
    first, dyn_out = torch.zeros(1, dtype=torch.uint8), torch.zeros(64)
    C.selftest_dyn_smem(first.data_ptr(), dyn_out.data_ptr(), 1, 64, 64 * 4, -1)
    assert int(first) == 0x7F


def test_thread_order_and_reverse(C, monkeypatch):
    """Threads switch only at barriers, in thread order; CUDA_EMU_ORDER=reverse runs them the other way
    round, so a result that depends on an order a GPU does not promise (a race) changes."""
    out = torch.zeros(1, dtype=torch.int32)
    C.selftest_race(out.data_ptr(), 64)
    assert int(out) == 63
    monkeypatch.setenv("CUDA_EMU_ORDER", "reverse")
    C.selftest_race(out.data_ptr(), 64)
    assert int(out) == 0


def test_parameters_are_per_thread(C):
    out = torch.zeros(40, dtype=torch.int32)
    C.selftest_param(7, out.data_ptr(), 40)
    assert out.tolist() == list(range(7, 47))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b_col_major", [False, True], ids=["b-row", "b-col"])
def test_wmma_product(C, bf16, b_col_major):
    dt = torch.bfloat16 if bf16 else torch.float16
    a, b = torch.randn(16, 16).to(dt), torch.randn(16, 16).to(dt)
    b_mem = b.t().contiguous() if b_col_major else b  # column-major B: B's columns laid out as rows
    d = torch.full((16, 16), float("nan"))
    col0 = torch.full((16,), float("nan"))
    C.selftest_wmma(a.data_ptr(), b_mem.data_ptr(), d.data_ptr(), col0.data_ptr(), bf16, b_col_major, True)
    want = a.double() @ b.double()
    torch.testing.assert_close(d.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(col0, d[:, 0])


def test_wmma_store_needs_syncwarp_before_other_lanes_read(C):
    """Each lane stores its own share of a WMMA tile, as on a GPU: lanes reading elements that later lanes
    store, without a __syncwarp, read what was there before (-1 here)."""
    a, b = torch.randn(16, 16).half(), torch.randn(16, 16).half()
    d, col0 = torch.zeros(16, 16), torch.zeros(16)
    C.selftest_wmma(a.data_ptr(), b.data_ptr(), d.data_ptr(), col0.data_ptr(), False, False, False)
    assert (col0 == -1).any() and not torch.equal(col0, d[:, 0])


def test_wmma_load_needs_syncwarp_after_other_lanes_write(C):
    """load_matrix_sync waits for the warp's lanes but does not order their earlier writes (a __syncwarp does):
    a tile the lanes copy into shared memory and load without one is read as it was before (0xFF poison)."""
    a, eye = torch.randn(16, 16).half(), torch.eye(16).half()
    for sync in (True, False):
        d = torch.zeros(16, 16)
        C.selftest_wmma_load(a.data_ptr(), eye.data_ptr(), d.data_ptr(), sync)
        assert torch.equal(d, a.float()) == sync


def test_wmma_misaligned_pointer(C):
    a, d = torch.zeros(16 * 17, dtype=torch.float16), torch.zeros(16, 16)
    with pytest.raises(RuntimeError, match="cudaErrorMisalignedAddress.*256-bit"):
        C.selftest_wmma_misaligned(a.data_ptr(), d.data_ptr())


def test_misaligned_word_access_stops_the_process(C):
    """A load through a wider type at a misaligned address (what a card refuses: x86 would perform it) traps:
    the build's -fsanitize=alignment. Run in a child process, which dies of SIGILL."""
    x, out = torch.zeros(16, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64)
    C.selftest_misaligned_load(x.data_ptr(), out.data_ptr(), 8)  # aligned: runs
    code = ("import sys, torch; sys.path.insert(0, 'tests'); import cuda_emu; C = cuda_emu.module(); "
            "x, o = torch.zeros(16, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64); "
            "C.selftest_misaligned_load(x.data_ptr(), o.data_ptr(), 3)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -4, (r.returncode, r.stderr[-2000:])  # SIGILL


def test_rewrite_of_launches_and_dynamic_shared_memory():
    src = ("extern __shared__ __align__(128) unsigned char smem_raw[];\n"
           "k<T, 4><<<dim3(n, h), 256, smem, stream>>>(p, q);\nkernel<<<1, 32>>>(x);")
    out = cuda_emu.rewrite(src)
    assert "unsigned char* smem_raw = reinterpret_cast<unsigned char*>(::cuda_emu::dynamic_smem());" in out
    assert "::cuda_emu::launch(::cuda_emu::Cfg(dim3(n, h), 256, smem, stream), k<T, 4>)(p, q);" in out
    assert "::cuda_emu::launch(::cuda_emu::Cfg(1, 32), kernel)(x);" in out
    stat = cuda_emu.rewrite("  __shared__ float smem[33];\n  __shared__ __align__(32) float t[2][4];\n"
                            "  __shared__ int cell;")
    assert "static float smem[33]; ::cuda_emu::poison_static(&smem, sizeof(smem));" in stat
    assert "static __align__(32) float t[2][4]; ::cuda_emu::poison_static(&t, sizeof(t));" in stat
    assert "static int cell; ::cuda_emu::poison_static(&cell, sizeof(cell));" in stat
    with pytest.raises(RuntimeError, match="cannot rewrite"):
        cuda_emu.rewrite("extern __shared__ float s[4];")  # a sized extern array: not a form csrc uses


def test_every_csrc_kernel_file_is_built():
    """A new csrc/*.cu joins the emulated build by itself (and must compile there)."""
    built = [os.path.basename(p) for p in cuda_emu._sources()]
    csrc = sorted(f for f in os.listdir(cuda_emu.CSRC) if f.endswith(".cu"))
    assert built[:len(csrc)] == csrc


# -- AddressSanitizer (opt-in: minutes) ---------------------------------------------------------------------

ASAN_RUN = os.environ.get("MAEFAST_CUDA_EMU_ASAN") == "1"
asan_only = pytest.mark.skipif(not ASAN_RUN, reason="MAEFAST_CUDA_EMU_ASAN=1 runs the emulated kernels under "
                                                    "AddressSanitizer (a build and a run of minutes)")
# the test files whose impl="cuda" cases run the kernels (the emulated cases: `-k cuda` there)
KERNEL_TESTS = ["tests/test_cuda_emu.py", "tests/test_loss.py", "tests/test_unshuffle.py", "tests/test_uint8.py",
                "tests/test_masking.py", "tests/test_patch_embed.py", "tests/test_attention.py",
                "tests/test_attention_offsets.py", "tests/test_model.py"]


def _asan(args, timeout):
    """Runs python with AddressSanitizer's runtime loaded first (and libstdc++, whose exceptions it intercepts)
    and the kernels built with it (CUDA_EMU_ASAN=1)."""
    cxx = cuda_emu.CXX
    libs = [subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
            for lib in ("libasan.so", "libstdc++.so")]
    env = dict(os.environ, CUDA_EMU_ASAN="1", LD_PRELOAD=" ".join(libs), ASAN_OPTIONS="detect_leaks=0",
               TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MAEFAST_CUDA_EMU_ASAN")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@asan_only
def test_out_of_bounds_read_is_caught_under_asan():
    code = ("import sys, torch; sys.path.insert(0, 'tests'); import cuda_emu; C = cuda_emu.module(); "
            "print(cuda_emu.error()); x, y = torch.zeros(32), torch.zeros(32); "
            "C.selftest_oob(x.data_ptr(), y.data_ptr(), 32)")
    r = _asan(["-c", code], timeout=1800)
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr, (r.returncode, r.stdout, r.stderr[-3000:])


@asan_only
def test_emulated_kernel_tests_pass_under_asan():
    r = _asan(["-m", "pytest", *KERNEL_TESTS, "-q", "-p", "no:cacheprovider", "-k", "cuda"], timeout=3600)
    assert r.returncode == 0 and "AddressSanitizer" not in r.stderr, (r.stdout[-3000:], r.stderr[-3000:])
