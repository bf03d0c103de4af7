"""bf16 in the Triton interpreter (TRITON_INTERPRET=1) as on a GPU, so that the CPU tests can cover the
bf16 paths, the dtype maefast's training step runs in.

The interpreter holds bf16 values as their raw uint16 bits (numpy has no bfloat16), and several of its
operations get that wrong (triton 3.6 to 3.9):

* **`tl.dot` with bf16 operands** hands the uint16 bits to `np.matmul(..., dtype=float32)`, which
  multiplies the integers the bits spell, not the numbers: the result is garbage. The fix widens both
  bf16 operands to fp32 first (exact: a bf16 is the top half of an fp32).
* **fp32 -> bf16 casts** drop the low 16 bits (rounding toward zero; its RTNE mode rounds ties up;
  subnormals come out wrong in both); a GPU (and torch) rounds to nearest, ties to even. The fix
  rounds to nearest even (NaN stays NaN; an overflow becomes inf, as on a GPU); an explicit
  `fp_downcast_rounding="rtz"` truncates, subnormals too.
* **bf16 -> fp32** got subnormals wrong: now exact.
* **casts between bf16 and ints, bools, fp16 or fp64** (`cast_impl`'s plain `astype`) took the value's
  low 16 bits as the bf16 (`True` became 9e-41), or the bf16's bits as an integer: now through fp32.

* **arithmetic and comparisons of bf16 values** (`x + y`, `x < y`, `tl.maximum`) acted on the bits
  (a negative bf16 compared above every positive one): now on the fp32 values, a result rounded once.

Left as they are (no maefast kernel does them): math functions and reductions of bf16 values
(`tl.exp`, `tl.sqrt`, `tl.sum`; the kernels compute them in fp32).

`install()` patches `InterpreterBuilder.create_dot`, `.cast_impl` and `.binary_op` (every two-operand
arithmetic, comparison, min and max) and `triton.runtime.interpreter._convert_float` (what `cast_impl`,
`create_fp_to_fp` and `get_bf16` convert fp32 <-> bf16 with).
tests/conftest.py installs it for every test run under the interpreter; `MAEFAST_INTERP_BF16=0` turns it
off (then the tests that depend on it fail, which is how tests/test_triton_bf16.py shows it is needed).
A triton whose interpreter lacks those names fails `install()` loudly.
"""
from __future__ import annotations

import functools

import numpy as np

_installed = False


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits -> float32 values (exact)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray, toward_zero: bool = False) -> np.ndarray:
    """float32 values -> uint16 bf16 bits, rounded to nearest, ties to even (as torch and a GPU do), or
    toward zero (the low 16 bits dropped, subnormals included)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if toward_zero:
        rounded = u >> 16
    else:
        rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16  # wraps for no finite input: 0xFFFF7FFF + 0x8000 < 2**32
    rounded = np.where(nan, (u >> 16) | 0x0040, rounded)  # a quiet NaN, sign kept
    return rounded.astype(np.uint16)


def installed() -> bool:
    return _installed


def install() -> None:
    """Patches the interpreter's dot and its bf16 casts (idempotent)."""
    global _installed
    if _installed:
        return
    import triton.language as tl
    from triton.runtime import interpreter as itp

    ib = itp.InterpreterBuilder
    names = [(ib, "create_dot"), (ib, "cast_impl"), (ib, "binary_op"), (itp, "_convert_float"),
             (itp, "TensorHandle"), (itp, "_get_np_dtype")]
    missing = [n for o, n in names if not hasattr(o, n)]
    if missing:
        raise RuntimeError(f"tests/triton_bf16.py: this triton's interpreter has no {missing}: update the patch")
    dot, cast, binary, convert = ib.create_dot, ib.cast_impl, ib.binary_op, itp._convert_float
    rtne, rtz = itp._ir.ROUNDING_MODE.RTNE, itp._ir.ROUNDING_MODE.RTZ  # `x.to(tl.bfloat16)` passes None: RTNE

    @functools.wraps(dot)
    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        # bf16 operands (tl.dot refuses mixed operands and a bf16 accumulator): widened, the fp32 dot
        if a.dtype.scalar == tl.bfloat16 and a.data.dtype == np.uint16:
            a, b = (itp.TensorHandle(bf16_bits_to_f32(h.data), tl.float32) for h in (a, b))
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    @functools.wraps(cast)
    def cast_impl(self, src, dst_type):
        # a handle's dtype can be its operands' (a comparison of bf16 values holds bools "as bf16"): bf16 is
        # what holds bf16 bits
        s, d = src.dtype.scalar, dst_type.scalar
        from_bf16, to_bf16 = s == tl.bfloat16 and src.data.dtype == np.uint16, d == tl.bfloat16
        if from_bf16 == to_bf16 or (from_bf16 and d == tl.float32) or (to_bf16 and s == tl.float32):
            return cast(self, src, dst_type)  # no bf16, or bf16 <-> fp32 (through _convert_float, below)
        if to_bf16:  # ints, bools, fp16, fp64 -> bf16 (it took their values' low 16 bits): through fp32
            return itp.TensorHandle(f32_to_bf16_bits(src.data.astype(np.float32)), d)
        # bf16 -> ints, bools, fp16, fp64 (it converted the bits as an integer): from the fp32 value
        return itp.TensorHandle(bf16_bits_to_f32(src.data).astype(itp._get_np_dtype(dst_type)), d)

    @functools.wraps(binary)
    def binary_op(self, lhs, rhs, op):
        if not any(h.dtype.scalar == tl.bfloat16 and h.data.dtype == np.uint16 for h in (lhs, rhs)):
            return binary(self, lhs, rhs, op)
        # arithmetic and comparisons of bf16 values (it compared and added their bits): on the fp32 values,
        # a result rounded to bf16 once
        f32 = [itp.TensorHandle(bf16_bits_to_f32(h.data), tl.float32) if h.data.dtype == np.uint16 else h
               for h in (lhs, rhs)]
        out = binary(self, *f32, op)
        if out.data.dtype == np.float32:
            return itp.TensorHandle(f32_to_bf16_bits(out.data), tl.bfloat16)
        return itp.TensorHandle(out.data, lhs.dtype.scalar)  # a comparison's bools, typed as it typed them

    @functools.wraps(convert)
    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode in (None, rtne, rtz):
            return f32_to_bf16_bits(input, toward_zero=rounding_mode == rtz)
        if input_dtype == tl.bfloat16 and output_dtype == tl.float32:  # exact (its subnormals came out wrong)
            return bf16_bits_to_f32(input)
        return convert(input, input_dtype, output_dtype, rounding_mode)

    ib.create_dot = create_dot
    ib.cast_impl = cast_impl
    ib.binary_op = binary_op
    itp._convert_float = convert_float
    _installed = True
