"""The interpreter's memory checker (tests/triton_memcheck.py) catches what a GPU would fault on or race
on: loads and stores of enabled lanes outside every tensor argument (also past the end of a view of a
bigger buffer), and programs of one launch storing where another stores or loads."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the Triton interpreter")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton_memcheck import MemcheckError, installed  # noqa: E402


@triton.jit
def _copy(x_ptr, y_ptr, n, x_step, MASK_LOAD: tl.constexpr, MASK_STORE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    if MASK_LOAD:
        x = tl.load(x_ptr + offs * x_step, mask=ok, other=0.0)
    else:
        x = tl.load(x_ptr + offs * x_step)
    tl.store(y_ptr + offs, x, mask=ok if MASK_STORE else None)


def _run(x, y, n, step=1, mask_load=True, mask_store=True):
    _copy[(1,)](x, y, n, step, MASK_LOAD=mask_load, MASK_STORE=mask_store, BLOCK=16)


@triton.jit
def _blocks(x_ptr, y_ptr, n, SHIFT: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr):
    """Program i reads block i + SHIFT of x and writes block i of y (y is x when IN_PLACE)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    src = (pid + SHIFT) * BLOCK + offs
    x = tl.load(x_ptr + src, mask=src < n, other=0.0)
    dst = pid * BLOCK + offs
    if IN_PLACE:
        tl.store(x_ptr + dst, x * 2, mask=dst < n)
    else:
        tl.store(y_ptr + dst, x * 2, mask=dst < n)


@triton.jit
def _all_to_one(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """Every program stores its block's sum to y[0]: a write-write race."""
    pid = tl.program_id(0)
    x = tl.load(x_ptr + pid * BLOCK + tl.arange(0, BLOCK))
    tl.store(y_ptr, tl.sum(x, 0))


@triton.jit
def _wide_then_narrow(y_ptr):
    """Program 0 stores one int32 over int16 elements 0-1; program 1 stores int16 element 1."""
    if tl.program_id(0) == 0:
        tl.store(y_ptr.to(tl.pointer_type(tl.int32)), 7)
    else:
        tl.store(y_ptr + 1, 3)


def test_installed_under_the_interpreter():
    assert installed()


def test_masked_lanes_in_bounds_pass():
    x, y = torch.randn(10), torch.full((10,), float("nan"))
    _run(x, y, 10)
    assert torch.equal(x, y)


def test_unmasked_load_past_the_end_raises():
    x, y = torch.randn(10), torch.empty(16)
    with pytest.raises(Exception, match=r"_copy: load of 6 lane\(s\) outside.*x_ptr.*past its last"):
        _run(x, y, 10, mask_load=False)


def test_unmasked_store_past_the_end_raises():
    x, y = torch.randn(16), torch.empty(10)
    with pytest.raises(Exception, match=r"_copy: store of 6 lane\(s\) outside.*y_ptr"):
        _run(x, y, 10, mask_store=False)


def test_reading_past_a_view_inside_a_bigger_buffer_raises():
    buf = torch.randn(32)
    x, y = buf[4:14], torch.empty(16)  # the storage goes on; the view ends at element 13
    with pytest.raises(Exception, match="past its last"):
        _run(x, y, 10, mask_load=False)
    _run(x, y[:10], 10)


def test_a_strided_view_spans_its_elements():
    buf = torch.randn(48)
    x = buf[:40:4]  # 10 elements over 37 floats: reading x[0..9] with step 4 is in bounds
    y = torch.empty(10)
    _run(x, y, 10, step=4)
    assert torch.equal(y, x)
    with pytest.raises(Exception, match="load"):
        _run(x, torch.empty(16), 11, step=4)  # element 10: inside the storage, past the view


def test_programs_on_their_own_blocks_pass_also_in_place():
    x = torch.randn(70)
    y = torch.empty(70)
    _blocks[(5,)](x, y, 70, SHIFT=0, IN_PLACE=False, BLOCK=16)
    assert torch.equal(y, x * 2)
    _blocks[(5,)](y, y, 70, SHIFT=0, IN_PLACE=True, BLOCK=16)  # each program reads, then writes, its own block
    assert torch.equal(y, x * 4)


def test_a_program_reading_what_another_writes_raises():
    x = torch.randn(64)
    with pytest.raises(Exception, match="read-write race"):
        _blocks[(3,)](x, x, 64, SHIFT=1, IN_PLACE=True, BLOCK=16)  # program 0 reads block 1, program 1 writes it
    _blocks[(3,)](x, torch.empty(64), 64, SHIFT=1, IN_PLACE=False, BLOCK=16)  # into another tensor: no race


def test_two_programs_storing_to_one_place_raises():
    x, y = torch.randn(32), torch.empty(1)
    with pytest.raises(Exception, match=r"store by program 1 where program 0 stored.*write-write race"):
        _all_to_one[(2,)](x, y, BLOCK=16)
    _all_to_one[(1,)](x, y, BLOCK=32)
    assert torch.allclose(y, x.sum())


def test_an_access_covers_every_cell_of_its_width():
    with pytest.raises(Exception, match="write-write race"):
        _wide_then_narrow[(2,)](torch.zeros(2, dtype=torch.int16))


def test_the_error_types():
    """Raised before the access, inside a program: the interpreter wraps it (InterpreterError quoting
    it); a read-write race, found when the launch ends, is a MemcheckError itself."""
    from triton.runtime.errors import InterpreterError

    with pytest.raises(InterpreterError, match="MemcheckError"):
        _run(torch.randn(10), torch.empty(16), 10, mask_load=False)
    x = torch.randn(64)
    with pytest.raises(MemcheckError, match="read-write race"):
        _blocks[(3,)](x, x, 64, SHIFT=1, IN_PLACE=True, BLOCK=16)
    assert issubclass(MemcheckError, AssertionError)
