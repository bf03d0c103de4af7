"""maefast/testing.py's checks themselves: a uniform 0.3% or 1% error in bf16 (inside the error-ratio rule's floor)
fails on its scale bias, rounding noise does not; assert_grad_close scales atol, not rtol, by the
gradient's magnitude."""
from __future__ import annotations

import pytest
import torch

from maefast.testing import DTYPES, assert_close, assert_error_ratio, assert_grad_close, randn, rel_err, scale_bias


def test_scale_bias_measures_a_uniform_factor():
    o = torch.randn(1000, dtype=torch.float64)
    assert scale_bias(1.01 * o, o) == pytest.approx(0.01)
    assert scale_bias(o, o) == 0.0 and scale_bias(torch.zeros(3), torch.zeros(3)) == 0.0
    noisy = o + 1e-3 * torch.randn(1000, dtype=torch.float64)  # noise: next to no component along o
    assert abs(scale_bias(noisy, o)) < 2e-4
    nan = o.clone()
    nan[0] = float("nan")
    assert scale_bias(1.01 * nan, nan) == pytest.approx(0.01)  # over the finite entries


@pytest.mark.parametrize("factor", [0.99, 0.997, 1.003, 1.01])
def test_a_uniform_error_inside_the_floor_fails_on_its_bias(factor):
    g = torch.Generator().manual_seed(0)
    oracle = torch.randn(4096, generator=g, dtype=torch.float64)
    ref = oracle.bfloat16()  # the same-dtype reference: rounded to nearest
    out = (oracle.float() * factor).bfloat16()
    assert_error_ratio(ref, ref, oracle, torch.bfloat16)  # rounding alone passes
    with pytest.raises(AssertionError, match="uniform factor"):
        assert_error_ratio(out, ref, oracle, torch.bfloat16, name="y")


def test_grad_close_tolerance_is_relative_to_each_value_not_scaled_by_the_largest():
    want = torch.full((64,), 100.0)
    want[0] = 1.0
    assert_grad_close(want * (1 + 5e-6), want, torch.float32)
    with pytest.raises(AssertionError):  # 1e-4 relative: passed when rtol was scaled by max |want| (1e-3)
        assert_grad_close(want * (1 + 1e-4), want, torch.float32)


# -- from a mutation audit of maefast/testing.py: each check below passed a loosened table entry, a dropped
#    term or a swapped argument --

def _off_oracle(oracle: torch.Tensor, rel: float, seed: int) -> torch.Tensor:
    """oracle + noise orthogonal to it with ||noise|| = rel * ||oracle|| (no scale bias: only the
    relative-error rule can reject it)."""
    z = torch.randn(oracle.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - (z @ oracle) / (oracle @ oracle) * oracle
    return oracle + rel * oracle.norm() / z.norm() * z


def _oracle(n: int = 4096) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_a_result_far_beyond_rounding_fails_beside_an_exact_reference(dtype, rel):
    """With a reference as good as the oracle, a result off by ~100 rounding units of the dtype (fp32 1e-5,
    fp16 1%, bf16 5%) is wrong whatever the floor; the same data rounded to the dtype passes."""
    oracle = _oracle()
    assert_error_ratio(oracle.to(dtype), oracle, oracle, dtype)  # rounding alone passes
    with pytest.raises(AssertionError, match="relative error"):
        assert_error_ratio(_off_oracle(oracle, rel, 1), oracle, oracle, dtype, name="y")


@pytest.mark.parametrize("kind,ok,bad", [("forward", 1.5, 2.5), ("backward", 2.5, 3.5)])
def test_the_error_ratio_is_measured_against_the_oracle_and_the_floor_is_added_once(kind, ok, bad):
    """A same-dtype reference 2% off the oracle (well above the bf16 floor): a result that repeats its error
    `ok` times passes, `bad` times fails (the rule's 2x forward, 3x backward), although the bad one is only
    (bad - 1)x the reference's error away from the reference itself."""
    oracle = _oracle()
    ref = _off_oracle(oracle, 0.02, 1)
    out_ok, out_bad = (oracle + c * (ref - oracle) for c in (ok, bad))
    e_out, e_ref = assert_error_ratio(out_ok, ref, oracle, torch.bfloat16, kind)
    assert (e_out, e_ref) == (pytest.approx(ok * 0.02), pytest.approx(0.02))  # (the result's, the reference's)
    assert rel_err(out_ok, oracle) == pytest.approx(ok * 0.02)
    with pytest.raises(AssertionError, match="relative error"):
        assert_error_ratio(out_bad, ref, oracle, torch.bfloat16, kind, name="y")


@pytest.mark.parametrize("dtype,rel,noise", [(torch.bfloat16, 0.018, 0.004), (torch.float16, 0.002, 0.0004)])
def test_the_floor_is_not_a_second_allowance(dtype, rel, noise):
    """A reference with rounding-sized error (bf16 0.4%, fp16 0.04%): a result 4.5-5x that far from the
    oracle in fresh noise is a wrong kernel, not rounding, and fails."""
    oracle = _oracle()
    ref = _off_oracle(oracle, noise, 1)
    with pytest.raises(AssertionError, match="relative error"):
        assert_error_ratio(_off_oracle(oracle, rel, 2), ref, oracle, dtype, name="y")


def test_a_scale_bias_beyond_the_references_fails_even_when_the_reference_has_one():
    """Bias is measured against the oracle: with a reference 1% high, a result 2.5% high fails (2.5x the
    reference's), although it is only 1.5% above the reference itself; 1.5% high passes."""
    oracle = _oracle()
    ref = 1.01 * oracle
    assert_error_ratio(1.015 * oracle, ref, oracle, torch.bfloat16)
    with pytest.raises(AssertionError, match="uniform factor"):
        assert_error_ratio(1.025 * oracle, ref, oracle, torch.bfloat16, name="y")


@pytest.mark.parametrize("factor", [0.999, 1.001])
def test_a_uniform_error_inside_the_fp16_floor_fails_on_its_bias(factor):
    """fp16's twin of the bf16 check above: a uniform 0.1% error sits inside fp16's relative-error floor,
    rounding to nearest has no such bias."""
    g = torch.Generator().manual_seed(0)
    oracle = torch.randn(4096, generator=g, dtype=torch.float64)
    ref = oracle.half()
    out = (oracle.float() * factor).half()
    assert_error_ratio(ref, ref, oracle, torch.float16)
    with pytest.raises(AssertionError, match="uniform factor"):
        assert_error_ratio(out, ref, oracle, torch.float16, name="y")


def test_rel_err_and_scale_bias_with_non_finite_values():
    """rel_err is inf for a NaN the oracle lacks; scale_bias skips an entry non-finite on either side."""
    o = _oracle(1000)
    x = o.clone()
    x[3] = float("nan")
    assert rel_err(x, o) == float("inf")
    x = 1.01 * o
    x[0] = float("inf")
    assert scale_bias(x, o) == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-3), (torch.float16, 2e-2), (torch.bfloat16, 0.1)])
def test_assert_close_fails_a_result_off_by_more_than_the_dtypes_rounding(dtype, rel):
    """A direct comparison in each dtype: ~10x the dtype's rounding (fp32 1e-3, fp16 2%, bf16 10%) relative
    error on O(1) values fails, absolute errors of the same size on them too."""
    want = (1.0 + torch.rand(256, generator=torch.Generator().manual_seed(0))).to(dtype)
    assert_close(want.clone(), want)
    for wrong in (want.double() * (1 + rel), want.double() + rel):
        with pytest.raises(AssertionError, match="differ beyond"):
            assert_close(wrong.to(dtype), want)


def test_assert_close_takes_the_dtype_asked_for_and_its_scale_on_both_tolerances():
    """dtype= picks the table's row (a bf16-sized error fails an fp32 check of bf16 tensors); scale
    multiplies atol and rtol alike (a 10x-scaled fp32 check passes 5e-5 relative on values of 1000)."""
    want = torch.randn(64, generator=torch.Generator().manual_seed(0)).bfloat16()
    with pytest.raises(AssertionError):
        assert_close(want.float() * 1.005, want, torch.float32)
    big = torch.full((8,), 1000.0)
    assert_close(big * (1 + 5e-5), big, torch.float32, scale=10)
    with pytest.raises(AssertionError):
        assert_close(big * (1 + 5e-5), big, torch.float32, scale=1)


def test_assert_close_rejects_broadcastable_shapes_and_nan_unless_asked():
    """A (1, 4) result for (2, 4) expected (torch.isclose would broadcast it) and NaN for NaN fail by
    default; equal_nan=True accepts the NaN."""
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.ones(1, 4), torch.ones(2, 4))
    nan = torch.full((3,), float("nan"))
    with pytest.raises(AssertionError):
        assert_close(nan, nan.clone())
    assert_close(nan, nan.clone(), equal_nan=True)


def test_assert_close_reports_the_worst_element():
    want = torch.zeros(3, 4)
    got = want.clone()
    got[1, 2], got[2, 0] = 1e-3, 5.0
    with pytest.raises(AssertionError, match=r"2/12 elements.*max \|diff\| 5\.000e\+00 at \(2, 0\)"):
        assert_close(got, want, name="y")


def test_grad_close_scales_atol_by_the_gradients_own_magnitude():
    """A mean loss's gradient at 1e-6: zeroed or halved it fails (a plain atol of 1e-5 would pass both);
    an inf entry in the reference does not set the scale; fp16 gradients at 1e-3 are judged at their own
    scale, not at a multiple of fp16's smallest normal."""
    want = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 1e-6
    assert_grad_close(want * (1 + 1e-6), want, torch.float32)
    for wrong in (torch.zeros_like(want), want / 2):
        with pytest.raises(AssertionError):
            assert_grad_close(wrong, want, torch.float32)
    inf = torch.cat([torch.tensor([float("inf")]), torch.ones(15)])
    with pytest.raises(AssertionError):
        assert_grad_close(torch.cat([inf[:1], 2 * inf[1:]]), inf, torch.float32)
    small = torch.full((16,), 1e-3).half()
    small[0] = 1e-5  # a small entry beside the largest: off by 5e-6 (0.5% of the largest) it fails
    bad = small.clone()
    bad[0] = 1.5e-5
    with pytest.raises(AssertionError):
        assert_grad_close(bad, small, torch.float16)


def test_randn_scales_and_the_dtypes_are_the_three_training_dtypes():
    x = randn(4096, scale=3.0, generator=torch.Generator().manual_seed(0))
    assert x.std().item() == pytest.approx(3.0, rel=0.05)
    assert randn(4, 4, dtype=torch.bfloat16).dtype is torch.bfloat16
    assert set(DTYPES) == {torch.float32, torch.bfloat16, torch.float16}  # every kernel test's parametrisation
