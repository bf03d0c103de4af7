"""Poisoned allocations for the tests: every tensor made by `torch.empty`, `torch.empty_like`,
`torch.empty_strided` or `Tensor.new_empty` from Python starts as NaN (floating dtypes) or a sentinel
(integers: 0xA5 bytes, like glibc's MALLOC_PERTURB_), never as the zeros a fresh CPU page holds.

A GPU's caching allocator hands back memory that earlier kernels wrote: a launcher that allocates an
output with `torch.empty` and a kernel that leaves part of it unwritten, or reads it before writing
(an accumulator assumed zero), gives garbage there; on a CPU the same code usually reads zeros and
passes. With every such allocation poisoned, an element the code never writes shows as NaN (or a
sentinel index), and a read-before-write poisons what is computed from it.

Skipped while torch.compile traces (a traced fill would join the graph; the compiled code's own
buffers are Inductor's) and for meta/fake tensors (no data). tests/conftest.py installs it for the
whole session (`MAEFAST_POISON_EMPTY=0` turns it off). maefast's own code is the target; torch's
C++ allocations are not touched.
"""
from __future__ import annotations

import functools

import torch

from maefast.testing import poison_

_installed = False


def _has_data(t) -> bool:
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(t, FakeTensor) and type(t) in (torch.Tensor, torch.nn.Parameter)


def _wrap(make):
    @functools.wraps(make)
    def poisoned(*args, **kwargs):
        t = make(*args, **kwargs)
        if torch.compiler.is_compiling() or not _has_data(t):
            return t
        return poison_(t)

    return poisoned


def install() -> None:
    """Wraps the four allocation functions (idempotent)."""
    global _installed
    if _installed:
        return
    # dynamo's rules for torch functions are keyed by the functions it finds when it is imported: first,
    # so that it knows the originals this wrapper calls while it traces (else it graph-breaks on them)
    import torch._dynamo  # noqa: F401

    # `with torch.device(d):` adds d to the calls of the constructors it lists, found by identity in a set that
    # is built on its first use: built now, it holds the originals that the wrappers call (built after, it
    # would hold the wrappers, and the originals would run on the CPU: a model built "on the meta device" in a
    # test would be a real one)
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in ("empty", "empty_like", "empty_strided"):
        setattr(torch, name, _wrap(getattr(torch, name)))
    torch.Tensor.new_empty = _wrap(torch.Tensor.new_empty)
    _installed = True


def installed() -> bool:
    return _installed
