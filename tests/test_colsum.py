"""kernels/colsum.py, the Triton column sums (with a fused cast) that `maefast.ops.vit_block`'s backward
takes its bias gradients from: the cast equals torch's, the sums equal an fp64 sum of the cast values to
fp32 rounding, at odd and real widths and row counts, strided inputs, deterministically. On a CPU-only
machine the kernel runs interpreted on small row counts; the `cuda` test takes the paper's sizes."""
from __future__ import annotations

import os

import pytest
import torch

from maefast.ops.block import _cast_bsum
from maefast.testing import assert_close, randn


def _kernel(device):
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU run of the Triton kernels needs TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    from maefast.kernels.colsum import colsum

    return colsum


def _check(colsum, x, out_dtype):
    y, sums = colsum(x, out_dtype)
    want = x if out_dtype is None else x.to(out_dtype)
    assert y.dtype == want.dtype and y.shape == x.shape and sums.dtype == torch.float32 and sums.shape == (x.shape[1],)
    if out_dtype is None or out_dtype == x.dtype:
        assert y is x  # no copy made
    else:
        assert torch.equal(y, want), "the cast must equal torch's exactly"
    oracle = want.double().sum(0)
    err = (sums.double() - oracle).abs()
    # fp32 accumulation of M terms: |error| <= M * eps32 * sum|terms| (a loose bound; the order is fixed)
    bound = x.shape[0] * 2 ** -23 * want.double().abs().sum(0) + 1e-30
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (33, 256), (70, 300), (130, 1280), (5, 3840)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                    (torch.bfloat16, None), (torch.float32, None), (torch.float16, torch.float16)])
def test_colsum_equals_torch(device, shape, dtypes):
    colsum = _kernel(device)
    x_dtype, out_dtype = dtypes
    _check(colsum, randn(*shape, dtype=x_dtype, device=device, scale=3.0), out_dtype)


def test_colsum_strided_and_empty(device):
    colsum = _kernel(device)
    base = randn(40, 2 * 96 + 5, device=device)
    _check(colsum, base[:, 3:3 + 2 * 96:2], torch.float16)  # column stride 2
    _check(colsum, base.t()[:96], torch.bfloat16)  # a transposed view
    y, sums = colsum(torch.empty(0, 8, device=device), torch.bfloat16)
    assert y.shape == (0, 8) and torch.equal(sums, torch.zeros(8, device=device))


def test_colsum_deterministic(device):
    colsum = _kernel(device)
    x = randn(300, 768, device=device)
    a, b = colsum(x, torch.bfloat16), colsum(x, torch.bfloat16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_block_bias_gradients_route(device, impl):
    """The block backward's helper: the cast and the sums by either path, shaped as the gradient."""
    if impl == "triton":
        _kernel(device)
    dout = randn(3, 17, 64, device=device)
    y, sums = _cast_bsum(dout, torch.float16, impl)
    assert y.shape == dout.shape and y.dtype == torch.float16
    assert torch.equal(y, dout.to(torch.float16))
    assert_close(sums, dout.to(torch.float16).float().sum((0, 1)), name="sums")
    y, sums = _cast_bsum(dout, None, impl)
    assert y is dout or torch.equal(y, dout)
    assert_close(sums, dout.sum((0, 1)), name="sums")


@pytest.mark.cuda
@pytest.mark.parametrize("rows,width", [(128 * 65, 1280), (128 * 65, 3840), (128 * 257, 512), (128 * 257, 1536)])
def test_cuda_colsum_full_size(rows, width):
    from maefast.kernels.colsum import colsum

    x = randn(rows, width, device="cuda")
    _check(colsum, x, torch.bfloat16)
    _check(colsum, x.to(torch.bfloat16), None)


@pytest.mark.parametrize("M,block_m,col_blocks,per_sm",
                         [(8320, 16, 5, 8), (32896, 16, 2, 8), (8320, 1, 1, 4), (7, 16, 15, 8), (1, 1, 1, 4)])
def test_row_split_covers_every_row_once(monkeypatch, M, block_m, col_blocks, per_sm):
    """kernels/_rows.py (the LayerNorm and bias+GELU backwards', the column sums'): contiguous ranges of a
    multiple of block_m rows, the last one reaching M and none empty, about per_sm programs an SM (a 132-SM
    card, its count stubbed) over the column blocks; two under the interpreter, exactly where the rows fill
    two blocks: the CPU tests of the kernels then run the partial sums of more than one program."""
    triton = pytest.importorskip("triton")
    from maefast.kernels import _rows

    monkeypatch.setattr(_rows, "_sm_count", lambda index: 132)
    for device, target in ((torch.device("cuda", 0), max(1, per_sm * 132 // col_blocks)), (torch.device("cpu"), 2)):
        progs, rows_per = _rows.row_split(M, block_m, col_blocks, device, per_sm)
        assert rows_per % block_m == 0 and (progs - 1) * rows_per < M <= progs * rows_per
        assert 1 <= progs <= target
    assert progs == min(2, triton.cdiv(M, block_m))  # the CPU's split (the loop's last device)
