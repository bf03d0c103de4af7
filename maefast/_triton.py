"""Whether Triton kernels can run here, and why not (recorded, never raised at import)."""
from __future__ import annotations

import os

triton_error: str | None = None
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    HAS_TRITON = True
except Exception as e:  # ImportError on platforms without triton
    HAS_TRITON = False
    triton_error = f"{type(e).__name__}: {e}"


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device) -> tuple[bool, str]:
    """(usable, reason) for running a Triton kernel on tensors of `device`."""
    if not HAS_TRITON:
        return False, f"triton is not importable ({triton_error})"
    dev = str(device)
    if dev.startswith("cuda"):
        return True, ""
    if interpret_mode():
        return True, ""
    return False, f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors); got {dev}"
