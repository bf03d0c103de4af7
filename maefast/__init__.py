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


def backends() -> dict:
    """What can run here: triton, the CUDA extension (with load errors), torch's CUDA."""
    import torch

    from . import _cpp_lib, _triton

    C = _get_C()
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.cuda.is_available(),
        "triton": _triton.HAS_TRITON,
        "triton_error": _triton.triton_error,
        "_C": C is not None,
        "_C_error": _cpp_lib.load_error,
        "_C_ops": list(getattr(C, "registered", [])) if C is not None else [],
        # how eager calls reach the ops (maefast/ops/_dispatch.py); read here without importing the ops
        "eager_dispatch": os.environ.get("MAEFAST_EAGER_DISPATCH") or "direct",
    }
    if _triton.HAS_TRITON:
        import triton

        info["triton_version"] = triton.__version__
    return info


def __getattr__(name):
    # ops and nn import lazily: they register torch.library custom ops.
    if name in ("ops", "nn"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name == "patch":
        from .patching import patch

        return patch
    raise AttributeError(f"module 'maefast' has no attribute {name!r}")


__all__ = ["__version__", "backends", "models", "reference", "ops", "nn", "patch"]
