"""Launch tiles of the attention kernels (kernels/attention.py): a small table for the shapes MAE runs,
keyed by (L, head dim), and a generic rule for every other shape.

MAE's attention comes in four shapes (mask ratio 0.75, 16 heads unless said):

| (L, Dh) | where | N*H at the benchmark's batch 256 |
|---|---|---|
| (50, 64) | ViT-B (12 heads) / ViT-L encoder: 49 visible patches + cls | 4096 |
| (65, 80) | ViT-H/14 encoder: 64 visible + cls | 4096 |
| (197, 32) | decoder of a 16-patch model (16 heads of 512) | 4096 |
| (257, 32) | decoder of ViT-H/14 | 4096 |

Every table entry names where its values come from (`source`): a card and date where a sweep
(`benchmarks/bench_attention.py::test_tile_sweep`, the `ops` preset of scripts/gpu_check.sh) measured
them, or "chosen by reasoning, unmeasured". Each entry also lists the candidates that sweep times, so
the table is replaced by data, not argument: when a sweep's winner beats the entry (the record's
`attention_tiles` section says by how much), put the winner here with the card and date. Every entry
and every candidate compiles for sm_90 without register spills under triton 3.6 and 3.9
(scripts/compile_kernels.py; tests/test_kernels_compile.py) and is checked against the reference
under the interpreter (tests/test_attention.py).

The reasoning behind the unmeasured entries (numbers for N*H = 4096 on an H100/H200: ~4.3 TB/s
copy, ~600-790 TFLOP/s bf16 wgmma, ~4e12 exp2/s on the special-function units):

* These kernels are small: at (65, 80) the forward moves ~170 MB (~40 us at copy speed) and does
  5.5 GFLOP of useful matmul (~9 us), so the time goes to padding (tiles are powers of two: 65 keys
  in a 128-key tile are 51% useful, and a 64-row block run twice for 65 rows another 51%), to
  exponentials (one per padded score: 67 M at today's tiles, ~16 us), to re-reading K/V once per
  query block, and to latency: a program that needs ~250 registers a thread at 8 warps runs alone
  on its SM, so nothing overlaps its loads.
* Under 64 query rows Triton emits mma.sync instead of Hopper's wgmma, and 16/32-row blocks
  multiply the K/V re-reads (through L2) by 3-5: the forward and dq entries keep 64- or 128-row
  blocks and cut the key padding instead (32-key tiles: 65 -> 96 padded keys, 257 -> 288). The fused
  backwards (L 50, 65) step 16 query rows against all keys: their dk/dv products (64 or 128 key rows)
  are wgmma, their dq product mma.sync (scripts/compile_kernels.py counts both).
* The decoder (Dh 32) does L^2 exponentials for only 2 x 32 MACs each: exponentials and padding,
  not bytes, bound it, so its tiles are the least-padded wgmma tiles, with 3 pipeline stages for
  their 7-9 key-tile loops.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Single-block sequences: the backward fuses dq into the dk/dv program up to this length.
FUSED_BWD_MAX_LEN = 128
# The table is for the tensor-core dtypes; fp32 (exact "ieee" dots, no tensor cores) takes the
# generic rule's small tiles.
TABLE_DTYPES = (torch.float16, torch.bfloat16)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _pow2(max(int(n), 1))))


@dataclass(frozen=True)
class Tile:
    """One kernel launch's tiling: BLOCK_M query rows x BLOCK_N key rows per block, num_warps,
    num_stages (software-pipelining depth of the block loop). Named like "m64n32w4s3"."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for k in ("BLOCK_M", "BLOCK_N"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{k} must be a power of two >= 16 (tl.dot and tl.arange need it), got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {self.num_stages!r}")

    @property
    def name(self) -> str:
        return f"m{self.BLOCK_M}n{self.BLOCK_N}w{self.num_warps}s{self.num_stages}"

    def launch(self) -> dict:
        """The keyword arguments of a kernel launch."""
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, num_warps=self.num_warps,
                    num_stages=self.num_stages)

    @classmethod
    def parse(cls, name: str) -> "Tile":
        m = re.fullmatch(r"m(\d+)n(\d+)w(\d+)s(\d+)", name)
        if m is None:
            raise ValueError(f"a tile name looks like 'm64n32w4s3', got {name!r}")
        return cls(*map(int, m.groups()))


@dataclass(frozen=True)
class BwdTiles:
    """The backward's launches: fused (one program per (sequence, head) holds every key and writes
    dq, dk and dv; needs L <= dkdv.BLOCK_N) or a dq kernel (`dq`) then a dk/dv kernel (`dkdv`)."""

    fused: bool
    dkdv: Tile
    dq: Tile | None = None

    def __post_init__(self):
        if self.fused == (self.dq is not None):
            raise ValueError("a fused backward has no dq tile; an unfused one needs one")

    @property
    def name(self) -> str:
        return f"fused-{self.dkdv.name}" if self.fused else f"dq-{self.dq.name}+dkdv-{self.dkdv.name}"

    @classmethod
    def parse(cls, name: str) -> "BwdTiles":
        if name.startswith("fused-"):
            return cls(True, Tile.parse(name[len("fused-"):]))
        m = re.fullmatch(r"dq-(\S+)\+dkdv-(\S+)", name)
        if m is None:
            raise ValueError(f"a backward tiling looks like 'fused-m16n64w4s1' or "
                             f"'dq-m64n32w4s3+dkdv-m32n64w4s3', got {name!r}")
        return cls(False, Tile.parse(m.group(2)), Tile.parse(m.group(1)))


@dataclass(frozen=True)
class ShapeTiles:
    """A table entry: the tiles used at one (L, Dh), where they come from, and what a sweep tries."""

    fwd: Tile
    bwd: BwdTiles
    source: str
    fwd_candidates: tuple[Tile, ...]
    bwd_candidates: tuple[BwdTiles, ...]

    def __post_init__(self):
        if self.fwd not in self.fwd_candidates or self.bwd not in self.bwd_candidates:
            raise ValueError("a table entry's own tiles must be among its candidates (the sweep times both)")


_REASONED = "chosen by reasoning, unmeasured (2026-12-04; sm_90 compiles without spills, triton 3.6.0 and 3.9.0)"
_T = Tile.parse
_B = BwdTiles.parse

# (L, head dim) -> tiles for float16/bfloat16. The first candidate of each list is what the generic
# rule gave before this table (the "before" row of a sweep); the comments give each entry's reason.
TILES: dict[tuple[int, int], ShapeTiles] = {
    # L 50 pads to 64 rows and 64 keys whatever the tile (50 < 64 and tiles are >= 16 and powers of
    # two), so only latency is left to win: the key loop runs once, so a second pipeline stage buys
    # nothing and costs 24 KB of shared memory (and 146 registers instead of 122 under triton 3.9).
    # The fused backward in 16-row steps needs ~128 registers at 4 warps (4 programs per SM) where
    # the 64-row, 8-warp tile needed ~200 (1 per SM: nothing overlaps its loads); its 16-row dq product
    # is mma.sync (the 64-row tile's is wgmma).
    (50, 64): ShapeTiles(
        fwd=_T("m64n64w4s1"), bwd=_B("fused-m16n64w4s1"), source=_REASONED,
        fwd_candidates=(_T("m64n64w4s2"), _T("m64n64w4s1"), _T("m64n64w8s1"), _T("m64n32w4s2")),
        bwd_candidates=(_B("fused-m64n64w8s2"), _B("fused-m16n64w4s1"), _B("fused-m32n64w8s1"),
                        _B("fused-m32n64w4s1"), _B("fused-m16n64w4s2"))),
    # L 65: one 128-row program per (sequence, head) reads K and V once (two 64-row programs read
    # them twice), two warpgroups keep wgmma, and 32-key tiles pad 65 keys to 96 instead of 128:
    # 25% fewer scores, exponentials and MMAs than 64x128 tiles, at ~115 registers (2 programs per
    # SM; the 64x128 8-warp tile, ~170, ran alone). Backward: fused (every key in one 128-key
    # block), in 16-row steps (80 padded rows, not 96 or 128); it still runs alone on its SM
    # (~240 registers: K, V and the dK, dV accumulators of 128 keys), and its dq product (16 rows x 128
    # keys) compiles to mma.sync, the others to wgmma (compile_kernels.py counts both), hence the
    # unfused candidate, all wgmma.
    (65, 80): ShapeTiles(
        fwd=_T("m128n32w8s2"), bwd=_B("fused-m16n128w8s1"), source=_REASONED,
        fwd_candidates=(_T("m64n128w8s2"), _T("m128n32w8s2"), _T("m64n128w4s1"), _T("m64n64w4s1"),
                        _T("m64n32w4s2"), _T("m16n32w4s2")),
        bwd_candidates=(_B("fused-m32n128w8s2"), _B("fused-m16n128w8s1"), _B("fused-m32n128w8s1"),
                        _B("dq-m128n32w8s2+dkdv-m16n128w8s2"))),
    # Decoder: 197 -> 224 padded keys with 32-key tiles (256 with 64), 7 loop steps: 3 stages.
    # Backward: dq kernel like the forward; the dk/dv kernel holds 64 keys and steps 32 query rows.
    (197, 32): ShapeTiles(
        fwd=_T("m64n32w4s3"), bwd=_B("dq-m64n32w4s3+dkdv-m32n64w4s3"), source=_REASONED,
        fwd_candidates=(_T("m64n64w4s2"), _T("m64n32w4s3"), _T("m64n64w4s3"), _T("m128n64w8s2"),
                        _T("m128n32w8s3")),
        bwd_candidates=(_B("dq-m64n64w4s2+dkdv-m64n64w4s2"), _B("dq-m64n32w4s3+dkdv-m32n64w4s3"),
                        _B("dq-m64n64w4s3+dkdv-m64n64w4s2"), _B("dq-m128n32w8s3+dkdv-m32n128w8s3"))),
    # 257 = 256 + 1: the last key tile holds one key; 32-key tiles waste 31 keys where 64-key tiles
    # waste 63 (288 padded keys, not 320).
    (257, 32): ShapeTiles(
        fwd=_T("m64n32w4s3"), bwd=_B("dq-m64n32w4s3+dkdv-m32n64w4s3"), source=_REASONED,
        fwd_candidates=(_T("m64n64w4s2"), _T("m64n32w4s3"), _T("m64n64w4s3"), _T("m128n64w8s2"),
                        _T("m128n32w8s3")),
        bwd_candidates=(_B("dq-m64n64w4s2+dkdv-m64n64w4s2"), _B("dq-m64n32w4s3+dkdv-m32n64w4s3"),
                        _B("dq-m64n64w4s3+dkdv-m64n64w4s2"), _B("dq-m128n32w8s3+dkdv-m32n128w8s3"))),
}


def table_entry(max_len: int, head_dim: int, dtype: torch.dtype) -> ShapeTiles | None:
    """The table's entry for this shape and dtype, or None (then the generic rule applies)."""
    if dtype not in TABLE_DTYPES:
        return None
    return TILES.get((int(max_len), int(head_dim)))


# -- the generic rule (shapes outside the table; fp32) -------------------------------------------------
# Chosen so that the sm_90 builds do not spill (under triton 3.6 and 3.9; scripts/compile_kernels.py
# builds every tile this rule gives at the head dims 16-128): on Hopper, query blocks under 64 rows
# spill in the forward with 128-key tiles; the fused backward fits up to Dh 80 with 128 keys, and at
# 32 keys with Dh over 64 only in 16-row steps at 8 warps; fp32 (exact, no tensor cores) needs small
# tiles, and 8 warps from Dh 32 in the fused backward and over Dh 96 in the forward.

def bwd_fused_default(max_len: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether one program per (sequence, head) does dq, dk and dv (the sequence is one key block)."""
    entry = table_entry(max_len, head_dim, dtype)
    if entry is not None:
        return entry.bwd.fused
    if dtype == torch.float32:
        return max_len <= 32
    return max_len <= 32 or (max_len <= FUSED_BWD_MAX_LEN and head_dim <= 80)


def fwd_tiles(max_len: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> Tile:
    """The forward's tile: the table's at MAE's shapes; else one key block covers sequences up to
    128 tokens and longer ones loop over 64-key blocks."""
    entry = table_entry(max_len, head_dim, dtype)
    if entry is not None:
        return entry.fwd
    if dtype == torch.float32:
        return Tile(32, 32, 8 if head_dim > 96 else 4, 2)
    block_n = _pow2_block(max_len, 16, 128) if max_len <= 128 else 64
    block_m = _pow2_block(max_len, 16, 64)
    return Tile(block_m, block_n, 8 if block_n == 128 and head_dim > 32 else 4, 2)


def bwd_tiles(max_len: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
              fused: bool | None = None) -> BwdTiles:
    """The backward's tiles: the table's at MAE's shapes (unless `fused` asks for the other kind);
    else the generic rule. Raises ValueError for fused=True with max_len > 128."""
    entry = table_entry(max_len, head_dim, dtype)
    if entry is not None and (fused is None or fused == entry.bwd.fused):
        return entry.bwd
    fused = bwd_fused_default(max_len, head_dim, dtype) if fused is None else fused
    fp32 = dtype == torch.float32
    if fused:
        block_n = _pow2_block(max_len, 16, 128)
        if max_len > block_n:
            raise ValueError(f"the fused backward needs max_seqlen <= {block_n}, got {max_len}")
        stages = 2
        if fp32:
            block_m, warps = 16, 8 if head_dim >= 32 else 4
        elif block_n == 32 and head_dim > 64:
            block_m, warps, stages = 16, 8, 1 if head_dim <= 80 else 2
        else:
            block_m = min(block_n, 64 if block_n <= 64 and head_dim <= 64 else 32)
            warps = 8 if block_n * head_dim >= 64 * 64 else 4
        return BwdTiles(True, Tile(block_m, block_n, warps, stages))
    if fp32:
        return BwdTiles(False, Tile(16, 32, 4, 2), Tile(32, 32, 4, 2))
    warps = 8 if head_dim >= 64 else 4
    blk = _pow2_block(max_len, 16, 64)
    return BwdTiles(False, Tile(min(blk, 64 if head_dim <= 96 else 32), blk, warps, 2), Tile(blk, blk, warps, 2))


def check_bwd_tiles(tiles: BwdTiles, max_len: int) -> None:
    """Raises ValueError when a fused tiling cannot hold the sequence in one key block."""
    if tiles.fused and max_len > tiles.dkdv.BLOCK_N:
        raise ValueError(f"the fused backward {tiles.name} holds {tiles.dkdv.BLOCK_N} keys, got max_seqlen {max_len}")


# A candidate replaces the table's tile only when it is this much faster in the same run: two timings
# of one kernel differ by a few percent from run to run (METHOD.md: a difference under the spread of
# one version timed twice is noise).
SWEEP_MIN_GAIN = 1.05


def sweep_winners(rows) -> list[dict]:
    """Reads a tile sweep's rows (benchmarks/bench_attention.py::test_tile_sweep: dicts with group
    "attention-tiles-fwd"/"-bwd", tile, L, Dh, time_ms, table_tile) and returns, per shape and
    direction: the table's tile and time, the fastest candidate and its time, gain = table / best,
    change = gain >= SWEEP_MIN_GAIN, and every candidate's time (fastest first). Like with like: only
    candidates timed as the table's tile was (CUDA-graph replays, or eager where its capture failed)
    are ranked; the others are listed under `not_compared`. Pure bookkeeping: scripts/gpu_check.py
    puts it in the `ops` record; whoever reads it edits TILES."""
    by_key: dict = {}
    for r in rows:
        if not str(r.get("group", "")).startswith("attention-tiles-") or not r.get("time_ms"):
            continue
        key = (r["L"], r["Dh"], r["direction"])
        by_key.setdefault(key, {})[r["tile"]] = r
    out = []
    for (L, dh, direction), tiles in by_key.items():
        table = next((r for r in tiles.values() if r.get("table_tile")), None)
        graphed = bool(table.get("cuda_graph")) if table is not None else \
            any(r.get("cuda_graph") for r in tiles.values())
        ranked = sorted((r for r in tiles.values() if bool(r.get("cuda_graph")) == graphed), key=lambda r: r["time_ms"])
        best = ranked[0]
        gain = table["time_ms"] / best["time_ms"] if table is not None else None
        out.append(dict(L=L, Dh=dh, direction=direction, table=table["tile"] if table else None,
                        table_ms=round(table["time_ms"], 4) if table else None, best=best["tile"],
                        best_ms=round(best["time_ms"], 4), gain=gain,
                        change=bool(gain is not None and gain >= SWEEP_MIN_GAIN),
                        candidates=[(r["tile"], round(r["time_ms"], 4)) for r in ranked],
                        not_compared=sorted(r["tile"] for r in tiles.values() if r not in ranked)))
    return out


__all__ = ["Tile", "BwdTiles", "ShapeTiles", "TILES", "TABLE_DTYPES", "FUSED_BWD_MAX_LEN", "SWEEP_MIN_GAIN",
           "table_entry", "fwd_tiles", "bwd_tiles", "bwd_fused_default", "check_bwd_tiles", "sweep_winners"]
