"""How the row-reducing kernels split an (M, N) matrix's rows among programs: each program walks a fixed,
contiguous range of rows in order and writes per-program partial sums, so the sums do not depend on
scheduling (deterministic, no atomics). Used by the LayerNorm and bias+GELU backwards and the column sums."""
from __future__ import annotations

import functools

import torch
import triton


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_split(M: int, block_m: int, col_blocks: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """(programs along the rows, rows per program: a multiple of block_m) for about `per_sm` programs per
    SM in all over `col_blocks` column blocks on a GPU; two (few, large programs) under the interpreter."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = max(1, per_sm * _sm_count(index) // col_blocks)
    else:
        target = 2
    progs = max(1, min(triton.cdiv(M, block_m), target))
    rows_per = triton.cdiv(triton.cdiv(M, progs), block_m) * block_m
    return triton.cdiv(M, rows_per), rows_per
