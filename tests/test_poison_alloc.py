"""tests/poison_alloc.py: fresh allocations made from Python start poisoned in the tests (NaN, 0xA5
bytes), as a GPU's recycled memory is never the zeros of a fresh CPU page; not while torch.compile
traces, not on the meta device."""
import os

import pytest
import torch

from poison_alloc import installed

pytestmark = pytest.mark.skipif(os.environ.get("MAEFAST_POISON_EMPTY", "1") == "0", reason="turned off")


def test_every_python_allocation_starts_poisoned():
    assert installed()
    assert torch.isnan(torch.empty(5)).all() and torch.isnan(torch.empty_like(torch.ones(2, 3))).all()
    assert torch.isnan(torch.empty_strided((2, 3), (1, 2), dtype=torch.bfloat16)).all()
    assert torch.isnan(torch.zeros(1).new_empty(4, dtype=torch.float16)).all()
    assert (torch.empty(3, dtype=torch.int64) == int.from_bytes(b"\xa5" * 8, "little", signed=True)).all()
    assert (torch.empty(3, dtype=torch.uint8) == 0xA5).all() and torch.empty(2, dtype=torch.bool).all()
    assert (torch.empty_strided((2, 2), (1, 2), dtype=torch.int32) < 0).all()
    assert torch.empty((), dtype=torch.int64) < 0 and torch.isnan(torch.empty(()))  # 0-d too


def test_leaves_requiring_grad_and_meta_tensors_and_traced_code():
    t = torch.empty(3, requires_grad=True)
    assert t.requires_grad and t.is_leaf and torch.isnan(t).all()
    assert torch.empty(3, device="meta").device.type == "meta"
    compiled = torch.compile(lambda x: torch.empty_like(x).copy_(x) + 1, backend="eager", fullgraph=True)
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))


def test_a_default_device_context_still_reaches_the_wrapped_constructors():
    with torch.device("meta"):
        made = (torch.empty(2), torch.empty_strided((2,), (1,)), torch.nn.Linear(3, 4).weight, torch.zeros(1))
    assert [t.device.type for t in made] == ["meta"] * 4
