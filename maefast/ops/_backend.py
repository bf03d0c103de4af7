"""Backend choice shared by every op: impl = "auto" | "triton" | "cuda" | "reference"; attention (and the
models and blocks built on it) also takes "sdpa": torch's scaled_dot_product_attention."""
from __future__ import annotations

import contextlib

import torch

from .._cpp_lib import get_C, load_error
from .._triton import triton_usable

IMPLS = ("auto", "triton", "cuda", "reference")
# What a model, a block or `maefast.ops.visible_attention` takes: "sdpa" runs the attention through torch's
# F.scaled_dot_product_attention on views of the packed qkv (cuDNN / flash on a GPU: what a compiled
# torch-native step uses), every other op as "auto". The step benchmark's `maefast-sdpa-graph` row measures
# it against maefast's own attention in the same model (issue 14: keep only what wins).
MODEL_IMPLS = IMPLS + ("sdpa",)


def cuda_ext_usable(device: torch.device, op: str | None = None) -> tuple[bool, str]:
    """(usable, reason) for the CUDA C++ extension on `device` (and, if given, its binding `op`). The test
    suite's CPU emulation of the extension (tests/cuda_emu: ``emulated``) runs on CPU tensors."""
    C = get_C()
    if device.type != "cuda" and not (device.type == "cpu" and getattr(C, "emulated", False)):
        return False, f"the CUDA C++ kernels need CUDA tensors; got {device}"
    if C is None:
        from .. import _cpp_lib
        return False, f"maefast._C is not built or failed to load ({_cpp_lib.load_error or load_error})"
    if op is not None and not hasattr(C, op):
        return False, f"maefast._C has no '{op}' (rebuild the extension)"
    # bf16/fp16 WMMA and the built archs (sm_80, sm_90): no kernel image runs before 8.0 (asked only where
    # torch has CUDA: a CPU build cannot, and has no CUDA tensors to run on)
    major, minor = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else (8, 0)
    if major < 8:
        return False, f"the CUDA C++ kernels need compute capability 8.0 or newer; {device} is {major}.{minor}"
    return True, ""


# While torch.compile traces, Dynamo calls cuda_ext_usable as plain Python and takes its answer as a constant:
# the first call may load the extension, and Dynamo refuses to trace importlib.import_module (a fullgraph
# compile would fail). This is the mark torch.compiler.assume_constant_result sets; calling that would
# import torch._dynamo, and with it triton, at `import maefast` (tests/test_import.py).
cuda_ext_usable._dynamo_marked_constant = True


def check_impl(impl, what: str, cuda: bool = True, sdpa: bool = False) -> None:
    """The check of ``impl`` itself that every public op makes before dispatching, on every route (the
    meta and fake tensors of tracing never resolve a backend): one of IMPLS (MODEL_IMPLS where ``sdpa``:
    attention and what is built on it), and not "cuda" for an op without a CUDA C++ kernel
    (``cuda=False``). Whether a backend can run on the tensors given is the op's own resolve, made where
    the op runs."""
    allowed = MODEL_IMPLS if sdpa else IMPLS
    if not isinstance(impl, str) or impl not in allowed:
        if impl == "sdpa":
            raise ValueError(f"impl='sdpa' is not available for {what}: only the attention runs on torch's SDPA "
                             "(a model or block given impl='sdpa' runs its other ops as 'auto', with fused=False)")
        raise ValueError(f"impl must be one of {allowed}, got {impl!r}")
    if impl == "cuda" and not cuda:
        raise ValueError(f"impl='cuda' is not available for {what}: it has no CUDA C++ kernel "
                         "(use 'triton', 'reference' or 'auto')")


def check_no_kernel_for_fp64(impl: str, what: str) -> None:
    """A module's float64 inputs run the official ops (the kernels take 16/32-bit floats): refused for an
    explicit kernel backend, as any request that cannot be met."""
    if impl in ("triton", "cuda"):
        raise ValueError(f"impl={impl!r} is not available for {what} on float64 inputs: the kernels take float32, "
                         "float16 and bfloat16 (impl='auto' or 'reference' run the official ops in float64)")


def choose_impl(impl: str, device: torch.device, *, auto_order=("triton", "cuda"), cuda_op: str | None = None,
                what: str = "this op") -> str:
    """Resolve `impl` for tensors on `device`.

    "auto" tries `auto_order` (only verified-fast backends belong there) and falls back to the
    reference; an explicit request that cannot run raises ValueError with the reason. On the meta
    device only the fake implementations run (shapes and dtypes), so any request is accepted there.
    """
    check_impl(impl, what)
    device = torch.device(device)
    if impl == "reference":
        return "reference"
    if device.type == "meta":
        return "reference" if impl == "auto" else impl
    checks = {"triton": lambda: triton_usable(device),
              "cuda": lambda: cuda_ext_usable(device, cuda_op)}
    if impl == "auto":
        if device.type != "cuda":
            return "reference"
        for cand in auto_order:
            ok, _ = checks[cand]()
            if ok:
                return cand
        return "reference"
    ok, reason = checks[impl]()
    if not ok:
        raise ValueError(f"impl={impl!r} is not available for {what}: {reason}")
    return impl


def stream_of(t: torch.Tensor) -> int:
    """The current torch CUDA stream of t's device, as an int for maefast._C (0 for the CPU tensors of the
    test suite's emulated extension)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3}  # csrc/dtype.cuh DTypeCode


def dtype_code(dtype: torch.dtype) -> int:
    """The code maefast._C's kernels take for a dtype (csrc/dtype.cuh; uint8: raw pixels)."""
    return _DTYPE_CODES[dtype]


def device_guard(t: torch.Tensor):
    """Makes t's CUDA device current (Triton and maefast._C launch on the current device and its
    current stream); a no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
