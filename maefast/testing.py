"""Test helpers: the one tolerance table, error-ratio checks against a higher-precision oracle,
and poisoning of outputs. Used by tests/ and scripts/gpu_check (correctness on the card)."""
from __future__ import annotations

import torch

# Direct comparisons of a kernel with the reference computed in the same dtype (atol, rtol).
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
# Error-ratio rule (flash-attention tests): kernel's error vs an fp32/fp64 oracle must be at most
# RATIO x the error of the same-dtype PyTorch reference vs the same oracle, plus a floor (ERR_FLOOR)
# for the case where the reference is exact.
RATIO = {"forward": 2.0, "backward": 3.0}
ERR_FLOOR: dict[torch.dtype, float] = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3,
                                       torch.bfloat16: 8e-3}
# The same rule for the error's component along the oracle (`scale_bias`: a result off by a uniform
# factor). Rounding noise has almost none: a uniform 1% error in bf16 sits inside ERR_FLOOR's relative
# error but is a 1e-2 scale bias here. Measured over every error-ratio check of the suite (CPU,
# 2026-12-06, the interpreter rounding to nearest as a GPU does: tests/triton_bf16.py; 1083 checks): at
# most 1.2e-7 (fp32), 3.4e-5 (fp16), 7.7e-4 (bf16) beyond the rule's multiple of the same-dtype reference's.
# Not yet measured on a GPU (the cuda-marked checks: paper shapes, cuBLAS / cuDNN references).
SCALE_FLOOR: dict[torch.dtype, float] = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 6e-4,
                                         torch.bfloat16: 2e-3}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tol(dtype: torch.dtype) -> dict[str, float]:
    return TOLERANCES[dtype]


def _where(actual: torch.Tensor, expected: torch.Tensor) -> str:
    diff = (actual.double() - expected.double()).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    idx = int(diff.argmax())
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), diff.shape)) if diff.dim() else ()
    return (f"max |diff| {diff.max().item():.3e} at {pos}: actual {actual.reshape(-1)[idx].item():.6g}, "
            f"expected {expected.reshape(-1)[idx].item():.6g}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, name: str = "",
                 scale: float = 1.0, equal_nan: bool = False) -> None:
    """torch.testing-style check with the table's tolerance for `dtype` (default: expected's dtype)."""
    dtype = dtype or expected.dtype
    t = TOLERANCES[dtype]
    _isclose(actual, expected, dtype, name, t["atol"] * scale, t["rtol"] * scale, equal_nan)


def _isclose(actual, expected, dtype, name, atol, rtol, equal_nan=False) -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    ok = torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=equal_nan)
    if not bool(ok.all()):
        bad = int((~ok).sum())
        raise AssertionError(f"{name}: {bad}/{ok.numel()} elements differ beyond {dtype} tolerance "
                             f"(atol={atol:g}, rtol={rtol:g}); {_where(a, e)}")


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                      name: str = "") -> None:
    """assert_close with the table's atol taken relative to the reference gradient's largest finite
    magnitude m (atol * m; rtol as the table says). A mean loss's gradients sit at 1e-6..1e-2, often
    below the table's atol, where the plain check passes an all-zero gradient; here a zeroed or halved
    one fails. m is at least the stored dtype's smallest normal: below it (fp16 from 6.1e-5) values are
    subnormal, spaced by a fixed step a relative tolerance cannot resolve (fp16: atol 2 steps, 1.2e-7)."""
    e = expected.detach().double().abs()
    e = e[torch.isfinite(e)]
    m = e.max().item() if e.numel() else 0.0
    if m == 0.0:
        raise AssertionError(f"{name}: the reference gradient has no nonzero finite value to set the scale")
    tiny = max(torch.finfo(t.dtype).smallest_normal for t in (actual, expected) if t.is_floating_point())
    dtype = dtype or expected.dtype
    t = TOLERANCES[dtype]
    _isclose(actual, expected, dtype, name, t["atol"] * max(m, tiny), t["rtol"])


def rel_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    """||x - oracle|| / ||oracle|| in float64 (inf if x has NaN where oracle has none)."""
    x, o = x.detach().double().cpu(), oracle.detach().double().cpu()
    if torch.isnan(x).any() and not torch.isnan(o).any():
        return float("inf")
    den = o.norm().item()
    return (x - o).norm().item() / (den if den > 0 else 1.0)


def scale_bias(x: torch.Tensor, oracle: torch.Tensor) -> float:
    """<x - oracle, oracle> / <oracle, oracle> in float64 over the finite entries of both: how far x is
    off the oracle by a uniform factor (x = 1.01 * oracle gives 0.01; rounding noise next to nothing)."""
    x, o = x.detach().double().cpu(), oracle.detach().double().cpu()
    ok = torch.isfinite(x) & torch.isfinite(o)
    x, o = x[ok], o[ok]
    den = (o * o).sum().item()
    return ((x - o) * o).sum().item() / den if den > 0 else 0.0


def assert_error_ratio(out: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype,
                       kind: str = "forward", name: str = "") -> tuple[float, float]:
    """err(out, oracle) <= RATIO[kind] * err(ref, oracle) + ERR_FLOOR[dtype], and the same for the
    error's scale bias (`scale_bias`, floor SCALE_FLOOR[dtype]); returns both errors."""
    e_out, e_ref = rel_err(out, oracle), rel_err(ref, oracle)
    bound = RATIO[kind] * e_ref + ERR_FLOOR[dtype]
    if not e_out <= bound:
        raise AssertionError(f"{name}: relative error {e_out:.3e} vs oracle exceeds {RATIO[kind]}x the "
                             f"same-dtype reference's {e_ref:.3e} (+{ERR_FLOOR[dtype]:g} floor) [{dtype}, {kind}]; "
                             + _where(out, oracle))
    b_out, b_ref = scale_bias(out, oracle), scale_bias(ref, oracle)
    if not abs(b_out) <= RATIO[kind] * abs(b_ref) + SCALE_FLOOR[dtype]:
        raise AssertionError(f"{name}: off the oracle by a uniform factor of {1 + b_out:.5f}, beyond {RATIO[kind]}x "
                             f"the same-dtype reference's {1 + b_ref:.5f} (+{SCALE_FLOOR[dtype]:g} floor) "
                             f"[{dtype}, {kind}]")
    return e_out, e_ref


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a buffer so unwritten (or read-before-written) elements show: NaN (floating, complex), 0xA5
    bytes (integers, as glibc's MALLOC_PERTURB_; negative for signed ones), True (bool). Also for a
    leaf that requires grad (filled under no_grad). tests/poison_alloc.py applies it to every fresh
    allocation in the tests."""
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        elif t.dtype == torch.uint8:
            t.fill_(0xA5)
        elif t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            t.view(-1).view(torch.uint8).fill_(0xA5) if t.is_contiguous() else t.fill_(-91)  # -91: 0xA5 as int8
    return t


def randn(*shape, dtype=torch.float32, device="cpu", generator=None, scale=1.0):
    """Fresh random normal data (never zeros), made in fp32 then cast."""
    return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)
