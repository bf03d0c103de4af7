"""maefast/testing.py's checks themselves: a uniform 0.3% or 1% error in bf16 (inside the error-ratio rule's floor)
fails on its scale bias, rounding noise does not; assert_grad_close scales atol, not rtol, by the
gradient's magnitude."""
from __future__ import annotations

import pytest
import torch

from maefast.testing import assert_error_ratio, assert_grad_close, scale_bias


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
