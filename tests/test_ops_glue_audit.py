"""The ops' glue that no other test pinned (found by mutation testing, 2026-12-06): `choose_impl`'s answers
("auto" off CUDA, on the meta device; the reason an explicit backend cannot run) and the ops fingerprint's
file names."""
from __future__ import annotations

import pytest
import torch

from maefast.ops import _backend
from maefast.ops._backend import choose_impl
from maefast.ops._dispatch import ops_fingerprint


@pytest.mark.parametrize("impl, want", [("auto", "reference"), ("reference", "reference"), ("triton", "triton")])
@pytest.mark.no_triton_launch  # meta tensors: no kernel runs
def test_choose_impl_on_meta_names_a_backend(impl, want):
    """On meta tensors any request is accepted (only the fakes run), and the answer is still a backend's name:
    "auto" resolves to the reference there, never comes back as "auto"."""
    assert choose_impl(impl, torch.device("meta"), auto_order=("triton",), what="an op") == want


def test_auto_off_cuda_is_the_reference_even_where_triton_could_run(monkeypatch):
    """"auto" runs Triton on CUDA only: a CPU tensor takes the reference even where Triton could run it
    (interpreted), and "triton" asked for explicitly does run there."""
    monkeypatch.setattr(_backend, "triton_usable", lambda device: (True, ""))
    assert choose_impl("auto", torch.device("cpu"), auto_order=("triton",), what="an op") == "reference"
    assert choose_impl("triton", torch.device("cpu"), auto_order=("triton",), what="an op") == "triton"


def test_an_explicit_backend_that_cannot_run_says_why(monkeypatch):
    """The refusal of an explicit impl names the op and carries the backend's own reason."""
    with pytest.raises(ValueError, match=r"impl='cuda' is not available for an op: the CUDA C\+\+ kernels need "
                                         r"CUDA tensors; got cpu"):
        choose_impl("cuda", torch.device("cpu"), what="an op")
    monkeypatch.setattr(_backend, "triton_usable", lambda device: (False, "no triton on this test's machine"))
    with pytest.raises(ValueError, match="impl='triton' is not available for an op: no triton on this test's"):
        choose_impl("triton", torch.device("cpu"), what="an op")


def test_ops_fingerprint_tells_which_file_holds_a_line(tmp_path):
    """The fingerprint hashes each source's name with its text: a line moved from one file to the next (the
    same bytes end to end), or a module renamed, gives another fingerprint."""
    (tmp_path / "a.py").write_text("x = 1\ny = 2\n")
    (tmp_path / "b.py").write_text("")
    first = ops_fingerprint(str(tmp_path))
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    moved = ops_fingerprint(str(tmp_path))
    assert moved != first
    (tmp_path / "b.py").rename(tmp_path / "c.py")
    assert ops_fingerprint(str(tmp_path)) not in (first, moved)


def test_layer_norm_backward_launcher_refuses_out_dtype_without_bias():
    """`kernels.layernorm.layer_norm_bwd` asked to write the forward's output again (out_dtype) needs the bias:
    its own ValueError, not an AttributeError from inside."""
    pytest.importorskip("triton")
    from maefast.kernels.layernorm import layer_norm_bwd

    x, dy, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)
    mean, rstd = x.mean(-1), torch.ones(2)
    with pytest.raises(ValueError, match="out_dtype .* needs the LayerNorm's bias"):
        layer_norm_bwd(dy, None, x, w, mean, rstd, None, None, torch.float32)


def test_backward_launchers_on_no_rows_give_zero_sums_of_their_own():
    """M = 0 rows (an empty batch): the bias+GELU backward's dbias and the LayerNorm backward's dweight and
    dbias are sums over no rows, zeros, not uninitialised memory; and two tensors, not one returned twice
    (a gradient accumulated into one would change the other)."""
    pytest.importorskip("triton")
    from maefast.kernels.bias_gelu import bias_gelu_bwd
    from maefast.kernels.layernorm import layer_norm_bwd

    empty = torch.empty(0, 8)
    for want_y in (False, True):
        db = bias_gelu_bwd(empty, empty, torch.randn(8), want_y)[1]
        assert db.dtype == torch.float32 and torch.equal(db, torch.zeros(8)), want_y
    for out_dtype in (None, torch.float32):
        out = layer_norm_bwd(empty, None, empty, torch.ones(8), torch.empty(0), torch.empty(0), None, torch.zeros(8),
                             out_dtype)
        dw, db = out[1], out[2]
        assert torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))
        dw.add_(1.0)
        assert torch.equal(db, torch.zeros(8)), "dweight and dbias are one tensor"
