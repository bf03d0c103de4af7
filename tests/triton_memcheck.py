"""A memory checker for Triton kernels run by the interpreter (TRITON_INTERPRET=1): what
compute-sanitizer's memcheck and racecheck find on a GPU, found on the CPU.

The interpreter runs a launch's programs one after another on raw host addresses, so two classes of
GPU bugs pass silently there:

* **out of bounds**: a lane the mask enables that loads or stores outside every tensor the kernel was
  launched with (an illegal memory access on a GPU, or a silent read of a neighbour's memory). The
  bound is each tensor argument's span as viewed (from its lowest to its highest element's bytes),
  not its whole storage: a kernel reading past a view of a bigger buffer would run past the
  allocation when a user's tensor ends there.
* **races between programs**: on a GPU a launch's programs run concurrently and in no set order, so
  one program storing where another stores (write-write) or loads (read-write) in the same launch
  gives a result that depends on timing; run one by one, the interpreter always gives the same one.
  maefast's kernels promise "deterministic, no atomics": each output element has one writer, and no
  program reads what another writes in the same launch.

`install()` wraps the interpreter's masked load and store (every `tl.load` / `tl.store` goes
through them, tensor-descriptor loads included) and its argument setup and teardown; a violation
raises `MemcheckError` naming the kernel, the access, the program(s) and the tensor argument, before
the access is made (an out-of-bounds store would write into the test process). Raised inside a
program, the interpreter re-raises it as `triton.runtime.errors.InterpreterError` quoting it; a
read-write race, found when the launch ends, comes out as `MemcheckError` itself. Race cells are the
gcd of the element sizes of the arguments sharing memory; an access covers every cell of its width
(an access narrower than a cell, e.g. bytes of an fp32 tensor through a uint8 pointer, counts as the
whole cell: two programs writing different bytes of one element would be reported, which maefast's
kernels never do). tests/conftest.py installs it for every test run under the interpreter.

It patches triton's private interpreter (`GridExecutor`'s `_init_args_hst` / `_restore_args_dev`,
`InterpreterBuilder.create_masked_load` / `_store`), whose names are those of triton 3.6 to 3.9; a
triton without them fails `install()` loudly (the tests would otherwise pass unchecked).
"""
from __future__ import annotations

import functools
import math

import numpy as np


class MemcheckError(AssertionError):
    """A Triton kernel addressed memory outside its tensor arguments, or two of its programs raced."""


def _extent(t) -> tuple[int, int] | None:
    """[lo, hi) bytes a tensor view's elements span; None when it has none."""
    if t.numel() == 0:
        return None
    lo = hi = 0
    for n, s in zip(t.shape, t.stride()):
        if s > 0:
            hi += (n - 1) * s
        else:
            lo += (n - 1) * s
    es, base = t.element_size(), t.data_ptr()
    return base + lo * es, base + (hi + 1) * es


def _tensor_args(names, values) -> list[tuple[str, int, int, int]]:
    """(name, lo, hi, element size) of every tensor argument with elements (tuples unpacked)."""
    out = []

    def visit(name, v):
        if isinstance(v, tuple):
            for i, x in enumerate(v):
                visit(f"{name}[{i}]", x)
            return
        if type(v).__name__ in ("TensorWrapper", "TensorDescriptor"):  # a dtype reinterpretation; a TMA view
            v = v.base
        if hasattr(v, "data_ptr") and hasattr(v, "numel"):
            ext = _extent(v)
            if ext is not None:
                out.append((name, *ext, v.element_size()))

    for name, v in zip(names, values):
        visit(name, v)
    return out


class _Region:
    """Overlapping argument spans merged: where program ids of writers and readers are kept, one int32
    per `grain` bytes (the gcd of the element sizes of the arguments in it); -1 none, -2 several."""

    def __init__(self, lo, hi, grain, names):
        self.lo, self.hi, self.grain, self.names = lo, hi, grain, names
        self.writer = self.reader = None

    def cells(self, addrs):
        return (addrs - np.uint64(self.lo)) // np.uint64(self.grain)

    def arrays(self):
        if self.writer is None:
            n = (self.hi - self.lo + self.grain - 1) // self.grain
            self.writer = np.full(n, -1, dtype=np.int32)
            self.reader = np.full(n, -1, dtype=np.int32)
        return self.writer, self.reader


class _Launch:
    def __init__(self, kernel: str, args):
        self.kernel, self.args = kernel, args
        regions: list[list] = []
        for name, lo, hi, es in sorted(args, key=lambda a: a[1]):
            if regions and lo < regions[-1][1]:
                r = regions[-1]
                r[1], r[2], r[3] = max(r[1], hi), math.gcd(r[2], es), r[3] + [name]
            else:
                regions.append([lo, hi, es, [name]])
        self.regions = [_Region(*r) for r in regions]
        self.starts = np.array([r.lo for r in self.regions], dtype=np.uint64)
        self.ends = np.array([r.hi for r in self.regions], dtype=np.uint64)

    def _pid(self):
        from triton.runtime.interpreter import interpreter_builder as b

        (x, y, z), (gx, gy, _) = b.grid_idx, b.grid_dim
        return int(x + gx * (y + gy * z))

    def _fail(self, kind, msg):
        raise MemcheckError(f"Triton kernel {self.kernel}: {kind} {msg}")

    def access(self, kind: str, ptrs, mask) -> None:
        p = np.asarray(ptrs.data)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), p.shape)
        p = p[m].astype(np.uint64, copy=False)
        if p.size == 0:
            return
        es = np.uint64(ptrs.get_element_ty().primitive_bitwidth // 8)
        reg = np.searchsorted(self.starts, p, side="right").astype(np.int64) - 1
        inside = (reg >= 0) & (p + es <= self.ends[np.maximum(reg, 0)])
        if not inside.all():
            self._out_of_bounds(kind, p[~inside], int(es))
        pid = self._pid()
        single = bool((reg == reg[0]).all())
        for r in ([int(reg[0])] if single else np.unique(reg).tolist()):
            region = self.regions[r]
            first = region.cells(p if single else p[reg == r])
            width = max(1, int(es) // region.grain)  # an fp32 access spans two cells of a region of fp16 too
            cells = first if width == 1 else (first[:, None] + np.arange(width, dtype=first.dtype)).reshape(-1)
            writer, reader = region.arrays()
            if kind == "load":
                seen = reader[cells]
                reader[cells] = np.where((seen == -1) | (seen == pid), pid, -2)
            else:
                w = writer[cells]
                other = (w != -1) & (w != pid)
                if other.any():
                    self._fail("store", f"by program {pid} where program {int(w[other][0])} stored in the same "
                               f"launch ({int(other.sum())} lane(s), in {'/'.join(self.regions[r].names)}): a "
                               "write-write race on a GPU")
                writer[cells] = pid

    def _out_of_bounds(self, kind, bad, es):
        first = int(bad[0])

        def distance(a):
            return a[1] - first if first < a[1] else first + es - a[2]

        near = min(self.args, key=distance, default=None)
        where = "no tensor argument" if near is None else (
            f"{near[0]} (bytes [{near[1]:#x}, {near[2]:#x})), {distance(near)} bytes "
            + ("before its first element" if first < near[1] else "past its last"))
        self._fail(kind, f"of {bad.size} lane(s) outside every tensor argument (program {self._pid()}); the first "
                   f"at {first:#x}, nearest {where}")

    def finish(self) -> None:
        """Read-write races: a cell one program stored that another program loaded."""
        for r in self.regions:
            if r.writer is None:
                continue
            raced = (r.writer >= 0) & (r.reader != -1) & (r.reader != r.writer)
            if raced.any():
                i = int(np.flatnonzero(raced)[0])
                who = "several programs" if r.reader[i] == -2 else f"program {int(r.reader[i])}"
                self._fail("load", f"by {who} of what program {int(r.writer[i])} stored in the same launch "
                           f"({int(raced.sum())} cell(s) of {r.grain} bytes, in {'/'.join(r.names)}): a read-write "
                           "race on a GPU")


_current: list = [None]  # the launch the interpreter is running (it runs one at a time)
_installed = False


def installed() -> bool:
    return _installed


def install() -> None:
    """Wraps the interpreter's argument setup and teardown, masked load and masked store (idempotent)."""
    global _installed
    if _installed:
        return
    from triton.runtime import interpreter as itp

    ge, ib = itp.GridExecutor, itp.InterpreterBuilder
    names = ((ge, "_init_args_hst"), (ge, "_restore_args_dev"), (ib, "create_masked_load"),
             (ib, "create_masked_store"))
    missing = [n for o, n in names if not hasattr(o, n)]
    if missing:
        raise RuntimeError(f"tests/triton_memcheck.py: this triton's interpreter has no {missing}: update the checker")
    init, restore, load, store = (getattr(o, n) for o, n in names)

    @functools.wraps(init)
    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        arg_names = list(self.arg_names[:len(args_hst)]) + list(kwargs_hst)
        _current[0] = _Launch(getattr(self.fn, "__name__", "?"),
                              _tensor_args(arg_names, list(args_hst) + list(kwargs_hst.values())))
        return args_hst, kwargs_hst

    @functools.wraps(restore)
    def restore_args(self, *a, **k):
        launch, _current[0] = _current[0], None
        if launch is not None:
            launch.finish()
        return restore(self, *a, **k)

    @functools.wraps(load)
    def masked_load(self, ptrs, mask, *rest, **kw):  # descriptor loads pass the cache options by name
        if _current[0] is not None:
            _current[0].access("load", ptrs, mask)
        return load(self, ptrs, mask, *rest, **kw)

    @functools.wraps(store)
    def masked_store(self, ptrs, value, mask, *rest, **kw):
        if _current[0] is not None:
            _current[0].access("store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest, **kw)

    ge._init_args_hst, ge._restore_args_dev = init_args, restore_args
    ib.create_masked_load, ib.create_masked_store = masked_load, masked_store
    _installed = True
