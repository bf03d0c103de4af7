"""maefast: fast, exact Masked Autoencoder pre-training kernels and models.

`import maefast` works with CPU-only torch, without triton and without the built CUDA extension:
what is missing is recorded (`maefast.backends()` says why), never raised at import.
"""
from __future__ import annotations

import os

__version__ = "0.1.0"

from . import _kernels_path

_kernels_path.ensure_kernels_package()

from . import models, reference  # noqa: E402
from ._cpp_lib import get_C as _get_C  # noqa: E402


def _eager_dispatch_said() -> str:
    mode = os.environ.get("MAEFAST_EAGER_DISPATCH") or "direct"
    return mode if mode in ("direct", "custom_op") else f"invalid {mode!r} (direct or custom_op; every op call raises)"


def backends() -> dict:
    """What can run here, and why not.

    Returns a dict (JSON-ready). What is installed: "torch", "triton" (importable), "triton_version",
    "triton_error", "_C" (the CUDA C++ extension is built and imports), "_C_error", "_C_ops",
    "eager_dispatch", "torch_cuda_build" (torch.version.cuda). What can run: "torch_cuda" (torch sees a
    CUDA GPU), "gpu" (its name, or None),
    "can_run" ({"reference", "triton", "cuda"} -> bool: whether that impl's kernels run on this
    machine, compiled; "triton_interpreter" says whether TRITON_INTERPRET=1 is set), "why_not" (impl -> the reason, for those that cannot) and "auto" (what impl="auto"
    runs here). An installed triton or a built `_C` does not mean either runs: both need a CUDA GPU.
    "jpeg_reader": the data loader's JPEG reader (`maefast.train.jpeg`), "jpeg_window_error": why its
    windowed one (maefast._jpeg) is not used, or None.
    """
    import torch

    from . import _cpp_lib, _triton

    C = _get_C()
    has_gpu = torch.cuda.is_available()
    info = {
        "torch": torch.__version__,
        "torch_cuda": has_gpu,
        "triton": _triton.HAS_TRITON,
        "triton_error": _triton.triton_error,
        "_C": C is not None,
        "_C_error": _cpp_lib.load_error,
        "_C_ops": list(getattr(C, "registered", [])) if C is not None else [],
        # how eager calls reach the ops (maefast/ops/_dispatch.py); read here without importing the ops
        "eager_dispatch": _eager_dispatch_said(),
    }
    if _triton.HAS_TRITON:
        import triton

        info["triton_version"] = triton.__version__
    info["gpu"] = torch.cuda.get_device_name(0) if has_gpu else None
    info["torch_cuda_build"] = torch.version.cuda  # None: a CPU-only build of torch
    why_not = {}
    if not _triton.HAS_TRITON:
        why_not["triton"] = f"triton is not importable ({_triton.triton_error})"
    elif not has_gpu:
        why_not["triton"] = (f"triton {info['triton_version']} is installed, but its kernels need a CUDA GPU "
                             "(TRITON_INTERPRET=1 runs them on CPU tensors, slowly: for tests)")
    if C is None:
        why_not["cuda"] = (f"maefast._C is not built or does not load ({_cpp_lib.load_error})"
                           + ("; its kernels would also need a CUDA GPU" if not has_gpu else ""))
    elif not has_gpu or not _cpp_lib.cuda_available():
        why_not["cuda"] = "maefast._C is built, but its kernels need a CUDA GPU"
    info["triton_interpreter"] = _triton.interpret_mode()  # TRITON_INTERPRET=1: tests run Triton on CPU tensors
    info["can_run"] = {"reference": True, "triton": "triton" not in why_not, "cuda": "cuda" not in why_not}
    info["why_not"] = why_not
    from .train import jpeg

    info["jpeg_reader"] = jpeg.describe()
    info["jpeg_window_error"] = None if jpeg.reader() == "window" else (
        jpeg.load_error or "maefast._jpeg does not decode as this Pillow does (or Pillow is not on libjpeg-turbo)")
    if not has_gpu:
        info["auto"] = ("reference: on CPU tensors every op runs its PyTorch reference; maefast's Triton and "
                        "CUDA C++ kernels need a CUDA GPU")
    else:
        fast = [k for k in ("triton", "cuda") if info["can_run"][k]]
        info["auto"] = (f"on CUDA tensors each op takes the fastest verified backend ({' or '.join(fast)}), else "
                        "its PyTorch reference" if fast else "reference: neither triton nor maefast._C can run")
    return info


def __getattr__(name):
    # ops and nn import lazily: they register torch.library custom ops.
    if name in ("ops", "nn"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name == "patch":
        from .patching import patch

        return patch
    if name == "TrainStep":  # torch only: no triton, no custom ops until a step runs
        from .step import TrainStep

        return TrainStep
    raise AttributeError(f"module 'maefast' has no attribute {name!r}")


__all__ = ["__version__", "backends", "models", "reference", "ops", "nn", "patch", "TrainStep"]
