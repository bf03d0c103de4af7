"""Whether Triton kernels can run here, and why not (recorded, never raised at import).

triton is imported on first use (`HAS_TRITON`, `triton_error`, `triton_usable`), not when maefast
is imported: `import maefast` stays light and the reference never pulls triton in.
"""
from __future__ import annotations

import os

_probe: tuple[bool, str | None] | None = None


def _probe_triton() -> tuple[bool, str | None]:
    global _probe
    if _probe is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _probe = (True, None)
        except Exception as e:  # ImportError on platforms without triton, or a broken install
            _probe = (False, f"{type(e).__name__}: {e}")
    return _probe


# A process constant: while torch.compile traces, Dynamo calls the probe as plain Python and takes its answer as a
# constant (the mark torch.compiler.assume_constant_result sets, as on ops._backend.cuda_ext_usable). Traced, the
# first compiled call of a process that had run no Triton op guarded on `_probe is None`, which that call itself
# made false: one recompile at the next call.
_probe_triton._dynamo_marked_constant = True


def __getattr__(name):
    if name == "HAS_TRITON":
        return _probe_triton()[0]
    if name == "triton_error":
        return _probe_triton()[1]
    raise AttributeError(name)


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device) -> tuple[bool, str]:
    """(usable, reason) for running a Triton kernel on tensors of `device`."""
    ok, err = _probe_triton()
    if not ok:
        return False, f"triton is not importable ({err})"
    dev = str(device)
    if dev.startswith("cuda"):
        return True, ""
    if interpret_mode():
        return True, ""
    return False, f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors); got {dev}"
