"""Loads the torch-free CUDA extension `maefast._C`, recording (not raising) a load failure."""
from __future__ import annotations

import importlib

_C = None
load_error: str | None = None


def _load():
    global _C, load_error
    try:
        _C = importlib.import_module("maefast._C")
        load_error = None
    except Exception as e:  # ImportError, or an OSError from a missing libcudart
        _C = None
        load_error = f"{type(e).__name__}: {e}"
    return _C


def get_C():
    """The extension module, or None (then `load_error` says why)."""
    if _C is None and load_error is None:
        _load()
    return _C


def require_C():
    C = get_C()
    if C is None:
        raise RuntimeError(
            f"maefast._C (the CUDA C++ extension) is not available: {load_error}. Build it with nvcc present: "
            "`pip install -e .` or `python setup.py build_ext --inplace`.")
    return C


def cuda_available() -> bool:
    C = get_C()
    if C is None:
        return False
    try:
        return C.device_count() > 0
    except Exception:
        return False
