"""tests/triton_bf16.py: the interpreter's bf16 dots and fp32 -> bf16 casts compute as a GPU's (and
torch's) do, so the bf16 paths of the kernels are tested on the CPU."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # on a GPU the real dots run; nothing to check
    pytest.skip("checks the interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton_bf16  # noqa: E402


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, c16_ptr, M: tl.constexpr):
    r = tl.arange(0, M)
    a = tl.load(a_ptr + r[:, None] * M + r[None, :])  # (M, M) bf16
    b = tl.load(b_ptr + r[:, None] * M + r[None, :])  # (M, M) bf16
    c = tl.dot(a, b)
    tl.store(c_ptr + r[:, None] * M + r[None, :], c)  # (M, M) fp32
    tl.store(c16_ptr + r[:, None] * M + r[None, :], c.to(tl.bfloat16))  # (M, M) bf16


@triton.jit
def _cast_kernel(x_ptr, y_ptr, z_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)  # (n,) fp32
    tl.store(y_ptr + offs, x.to(tl.bfloat16), mask=offs < n)  # (n,) bf16
    tl.store(z_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtz"), mask=offs < n)  # (n,) bf16


def _edge_values():
    """Ties (to even and odd), values just off them, subnormals, the largest finite bf16, overflow,
    signed zeros and infinities, and random normals."""
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x00008000, 0x00018000, 0x00000001,
                     0x007FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x80000000, 0x00000000, 0x7F800000,
                     0xFF800000, 0xBF808000, 0xBF818000], dtype=np.uint32)
    special = torch.from_numpy(bits.view(np.float32).copy())
    return torch.cat([special, torch.randn(4096) * 3, torch.randn(256) * 1e-39])


def test_installed_under_the_interpreter():
    assert triton_bf16.installed()


def test_round_to_nearest_even_equals_torch():
    x = _edge_values()
    got = torch.from_numpy(triton_bf16.f32_to_bf16_bits(x.numpy()).view(np.int16))
    assert torch.equal(got, x.to(torch.bfloat16).view(torch.int16))
    nan = torch.tensor([float("nan"), -float("nan")])
    back = triton_bf16.bf16_bits_to_f32(triton_bf16.f32_to_bf16_bits(nan.numpy()))
    assert np.isnan(back).all()


def test_kernel_casts_round_as_a_gpu():
    """`x.to(tl.bfloat16)` rounds to nearest even (the unpatched interpreter truncated); an explicit
    `fp_downcast_rounding="rtz"` still truncates."""
    x = _edge_values()
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    z = torch.empty_like(y)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, z, x.numel(), BLOCK=1024)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    finite = torch.isfinite(x)
    truncated = (x.view(torch.int32) >> 16).to(torch.int16)
    assert torch.equal(z.view(torch.int16)[finite], truncated[finite])


def test_bf16_dot_multiplies_the_values():
    """A bf16 tl.dot equals the fp32 product of the bf16 values (the unpatched interpreter multiplied
    their bit patterns as integers)."""
    M = 32
    a, b = torch.randn(M, M).bfloat16(), torch.randn(M, M).bfloat16()
    c, c16 = torch.empty(M, M), torch.empty(M, M, dtype=torch.bfloat16)
    _dot_kernel[(1,)](a, b, c, c16, M)
    want = a.double() @ b.double()
    assert (c.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(c16, c.bfloat16())


@triton.jit
def _int_cast_kernel(i_ptr, b_ptr, x_ptr, f_ptr, j_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    i = tl.load(i_ptr + offs)  # (BLOCK,) int32
    tl.store(b_ptr + offs, (i % 3 == 0).to(tl.bfloat16))  # (BLOCK,) bf16: a bool's 1.0 / 0.0
    tl.store(x_ptr + offs, i.to(tl.bfloat16))  # (BLOCK,) bf16
    x = tl.load(x_ptr + offs)
    tl.store(f_ptr + offs, x.to(tl.float32))  # (BLOCK,) fp32
    tl.store(j_ptr + offs, x.to(tl.int32))  # (BLOCK,) int32


def test_casts_between_bf16_and_ints_or_bools_go_through_the_values():
    """A bool or an int cast to bf16 is its value (the unpatched interpreter kept its low 16 bits: True
    became 9e-41), and a bf16 cast to an int is its value truncated; bf16 -> fp32 is exact."""
    n = 64
    i = torch.arange(-n // 2, n // 2, dtype=torch.int32) * 37
    b, x = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    f, j = torch.empty(n), torch.empty(n, dtype=torch.int32)
    _int_cast_kernel[(1,)](i, b, x, f, j, BLOCK=n)
    assert torch.equal(b, (i % 3 == 0).to(torch.bfloat16))
    assert torch.equal(x, i.to(torch.bfloat16)) and torch.equal(f, x.float()) and torch.equal(j, x.to(torch.int32))


def test_bf16_subnormals_widen_exactly():
    bits = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16)
    want = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float()
    x = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
    y = torch.empty(x.numel())
    _widen_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    nan = torch.isnan(want)
    assert torch.equal(y[~nan], want[~nan]) and torch.isnan(y[nan]).all()


@triton.jit
def _widen_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.float32), mask=offs < n)  # (n,) bf16 -> fp32


@triton.jit
def _arith_kernel(x_ptr, y_ptr, s_ptr, lt_ptr, mx_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)  # (BLOCK,) bf16
    y = tl.load(y_ptr + offs)  # (BLOCK,) bf16
    tl.store(s_ptr + offs, x + y)  # (BLOCK,) bf16
    tl.store(lt_ptr + offs, (x < y).to(tl.int32))  # (BLOCK,) int32
    tl.store(mx_ptr + offs, tl.maximum(x, y))  # (BLOCK,) bf16


def test_bf16_arithmetic_and_comparisons_act_on_the_values():
    """x + y rounded once (as torch: the fp32 sum rounded to bf16), x < y and max by value (the bits of a
    negative bf16 compared above every positive one)."""
    n = 256
    x, y = torch.randn(n).bfloat16(), torch.randn(n).bfloat16()
    s, mx = torch.empty_like(x), torch.empty_like(x)
    lt = torch.empty(n, dtype=torch.int32)
    _arith_kernel[(1,)](x, y, s, lt, mx, BLOCK=n)
    assert torch.equal(s, x + y) and torch.equal(lt, (x < y).int()) and torch.equal(mx, torch.maximum(x, y))
