"""Which Triton attention kernel runs, and with which tile: the per-(L, head dim) tile table
(kernels/attention_tiles.py) and its generic rule, each table entry and sweep candidate against the
reference at its own shape, the launchers launching the tile and grid asked for, the head-dim split,
and every tile compiled for sm_90 without spills (scripts/compile_kernels.py, no GPU needed). The
attention op itself: tests/test_attention.py."""
from __future__ import annotations


import pytest
import torch

from maefast.kernels.attention_tiles import (SWEEP_MIN_GAIN, BwdTiles, ShapeTiles, Tile, bwd_fused_default, bwd_tiles,
                                             check_bwd_tiles, fwd_tiles, sweep_winners)
from maefast.reference.attention import attention as ref_attention
from maefast.testing import assert_close, assert_error_ratio, poison_, randn
from test_kernels_compile import compile_kernels

BF16, FP32 = torch.bfloat16, torch.float32


def test_split_head_dim_matches_padded(device):
    """80 = 64 + 16 (two dot chunks) computes the same as the padded 128-wide variant."""
    from maefast.kernels.attention import attention_bwd, attention_fwd, head_dim_split

    assert head_dim_split(80) == (64, 16) and head_dim_split(96) == (64, 32) and head_dim_split(64) == (64, 0)
    n, L, H, dh = 1, 40, 1, 80
    qkv = randn(n, L, 3 * H * dh, device=device)
    dout = randn(n, L, H * dh, device=device)
    o1, l1 = attention_fwd(qkv, H, dh ** -0.5)
    o2, l2 = attention_fwd(qkv, H, dh ** -0.5, pad_head_dim=True)
    assert_close(o2, o1, name="padded out")
    assert_close(l2, l1, name="padded lse")
    g1 = attention_bwd(dout, qkv, o1, l1, H, dh ** -0.5)
    g2 = attention_bwd(dout, qkv, o2, l2, H, dh ** -0.5, pad_head_dim=True)
    assert_close(g2, g1, name="padded dqkv")


def test_every_attention_tile_compiles_for_sm90_without_spills(tmp_path):
    """Every table entry and sweep candidate (kernels/attention_tiles.py), the table's tiles on
    varlen input (int32 and int64 cu_seqlens), and the fp32 rule at the paper shapes, compiles for
    sm_90 as a launch specialises it (scripts/compile_kernels.py; no GPU) and spills no register:
    code-generation errors the interpreter cannot see fail here."""
    from maefast.kernels.attention_tiles import TILES

    rows = compile_kernels(tmp_path, "--attention-only")
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    spilled = [(r["kernel"], r["spill_stack_bytes"]) for r in rows if r["spill_stack_bytes"]]
    assert not spilled, spilled
    names = " | ".join(r["kernel"] for r in rows)
    for (L, dh), entry in TILES.items():
        for t in entry.fwd_candidates:
            assert f"fwd L{L} Dh{dh} bf16 {t.name} " in names
        for b in entry.bwd_candidates:
            assert f"bwd-dkdv L{L} Dh{dh} bf16 {b.name} " in names
        assert f"fwd L{L} Dh{dh} bf16 {entry.fwd.name} [table]" in names
        for cu in ("i32", "i64"):
            assert f"fwd L{L} Dh{dh} bf16 {entry.fwd.name} [table varlen {cu}]" in names
            assert f"bwd-dkdv L{L} Dh{dh} bf16 {entry.bwd.name} [table varlen {cu}]" in names


def _tile_cases():
    from maefast.kernels.attention_tiles import TILES

    cases = []
    for (L, dh), entry in TILES.items():
        cases += [(L, dh, "fwd", t.name) for t in entry.fwd_candidates]
        cases += [(L, dh, "bwd", b.name) for b in entry.bwd_candidates]
    return cases


@pytest.mark.parametrize("L,dh,direction,name", _tile_cases(), ids=lambda v: str(v))
def test_every_tile_candidate_matches_the_reference(L, dh, direction, name, device):
    """Each tile of the table and of its sweep, forced on the raw launchers at its own shape (batch 2,
    one head; fp16, whose finer rounding shows a tile's error sooner than bf16's): outputs poisoned
    first, forward and backward within the error-ratio rule of the fp16 reference vs an fp64 oracle."""
    from maefast.kernels.attention import attention_bwd, attention_fwd

    n, H, dtype = 2, 1, torch.float16
    scale = dh ** -0.5
    qkv = randn(n, L, 3 * H * dh, dtype=dtype, device=device)
    x64 = qkv.double().requires_grad_(True)
    oracle = ref_attention(x64, H)
    x16 = qkv.clone().requires_grad_(True)
    ref = ref_attention(x16, H)
    if direction == "fwd":
        out = poison_(torch.empty(n, L, H * dh, dtype=dtype, device=device))
        lse = poison_(torch.empty(n, H, L, device=device))
        attention_fwd(qkv, H, scale, config=name, out=out, lse=lse)
        assert_error_ratio(out, ref, oracle, dtype, "forward", name=f"{name} out")
        from maefast.ops.attention import _reference_lse
        assert_close(lse, _reference_lse(qkv, H, scale), dtype=torch.float32, scale=100, name=f"{name} lse")
        return
    out, lse = attention_fwd(qkv, H, scale)
    dout = randn(n, L, H * dh, dtype=dtype, device=device)
    dqkv = poison_(torch.empty_like(qkv))
    attention_bwd(dout, qkv, out, lse, H, scale, config=name, dqkv=dqkv)
    (g_ref,) = torch.autograd.grad(ref, x16, dout)
    (g_oracle,) = torch.autograd.grad(oracle, x64, dout.double())
    assert_error_ratio(dqkv, g_ref, g_oracle, dtype, "backward", name=f"{name} dqkv")


def test_tile_table_is_what_the_launchers_use():
    from maefast.kernels.attention_tiles import (TILES, BwdTiles, Tile, bwd_tiles, check_bwd_tiles, fwd_tiles,
                                                  table_entry)

    assert set(TILES) == {(50, 64), (65, 80), (197, 32), (257, 32)}  # the paper's four shapes
    for (L, dh), entry in TILES.items():
        assert entry.source, "every entry says where its values come from"
        for dtype in (torch.float16, torch.bfloat16):
            assert table_entry(L, dh, dtype) is entry
            assert fwd_tiles(L, dh, dtype) == entry.fwd and bwd_tiles(L, dh, dtype) == entry.bwd
        # fp32 takes the generic rule (no tensor cores); the first candidates are the generic rule's
        # 16-bit tiles, the "before" rows of a sweep
        assert fwd_tiles(L, dh, torch.float32) == Tile(32, 32, 4, 2)
        other = {(50, 64): (51, 64), (65, 80): (66, 80), (197, 32): (198, 32), (257, 32): (258, 32)}[(L, dh)]
        assert table_entry(*other, torch.bfloat16) is None
        import maefast.kernels.attention_tiles as tt
        saved = dict(tt.TILES)
        try:
            tt.TILES.clear()
            assert entry.fwd_candidates[0] == fwd_tiles(L, dh, torch.bfloat16)
            assert entry.bwd_candidates[0] == bwd_tiles(L, dh, torch.bfloat16)
        finally:
            tt.TILES.update(saved)
        assert len(set(entry.fwd_candidates)) == len(entry.fwd_candidates)
        assert len(set(entry.bwd_candidates)) == len(entry.bwd_candidates)
    # asking for the other kind of backward than the table's falls back to the generic rule
    assert bwd_tiles(65, 80, torch.bfloat16, fused=False).fused is False
    assert bwd_tiles(197, 32, torch.bfloat16, fused=False) == TILES[(197, 32)].bwd
    # names round-trip; bad tiles and names raise ValueError naming the problem
    for t in ("m64n32w4s3", "m128n32w8s2"):
        assert Tile.parse(t).name == t
    for b in ("fused-m16n128w8s1", "dq-m64n32w4s3+dkdv-m32n64w4s3"):
        assert BwdTiles.parse(b).name == b
    with pytest.raises(ValueError, match="power of two"):
        Tile(48, 32)
    with pytest.raises(ValueError, match="num_warps"):
        Tile(64, 32, 3)
    with pytest.raises(ValueError, match="looks like"):
        Tile.parse("64x32")
    with pytest.raises(ValueError, match="looks like"):
        BwdTiles.parse("m64n32w4s3")
    with pytest.raises(ValueError, match="no dq tile"):
        BwdTiles(True, Tile(16, 64), Tile(64, 64))
    with pytest.raises(ValueError, match="holds 64 keys"):
        check_bwd_tiles(BwdTiles.parse("fused-m16n64w4s1"), 65)


def test_explicit_fused_tile_too_short_for_the_sequence_raises(device):
    from maefast.kernels.attention import attention_bwd, attention_fwd

    qkv = randn(1, 65, 3 * 32, dtype=torch.float16, device=device)
    out, lse = attention_fwd(qkv, 1, 32 ** -0.5)
    with pytest.raises(ValueError, match="holds 64 keys"):
        attention_bwd(randn(1, 65, 32, dtype=torch.float16, device=device), qkv, out, lse, 1, 32 ** -0.5,
                      config="fused-m16n64w4s1")


def test_head_dim_split_pads_when_asked():
    """pad=True (what the split saves is measured against it) gives one power-of-two chunk."""
    from maefast.kernels.attention import head_dim_split

    assert head_dim_split(80, pad=True) == (128, 0) and head_dim_split(48, pad=True) == (64, 0)
    assert head_dim_split(64, pad=True) == (64, 0) and head_dim_split(48) == (32, 16)


def test_launchers_launch_the_tiles_and_grids_asked_for(monkeypatch):
    """An explicit tile (the sweep's candidates) is the one launched, `fused` picks the backward's kernels,
    and each grid has one program per (sequence, head, block of rows): a block count from the other tile
    dimension still computes the right numbers (the extra programs store nothing) but times another launch."""
    import maefast.kernels.attention as KA

    launches = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((grid, tuple(kw[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")),
                                 kw.get("FUSED_DQ")))
                return self.kernel[grid](*args, **kw)
            return launch

    for name in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        monkeypatch.setattr(KA, name, Spy(getattr(KA, name)))
    n, L, H, dh = 2, 40, 2, 16
    qkv, dout = randn(n, L, 3 * H * dh), randn(n, L, H * dh)
    out, lse = KA.attention_fwd(qkv, H, 0.25, config="m32n16w4s1")
    assert launches == [((n * H * 2,), (32, 16, 4, 1), None)]  # ceil(40 / 32) query blocks
    assert_close(out, ref_attention(qkv, H, scale=0.25), name="out")
    launches.clear()
    KA.attention_bwd(dout, qkv, out, lse, H, 0.25, config="dq-m32n16w4s2+dkdv-m16n32w4s1")
    assert launches == [((n * H * 2,), (32, 16, 4, 2), None), ((n * H * 2,), (16, 32, 4, 1), False)]
    for fused, kernels in ((True, [True]), (False, [None, False])):  # fp32 at L 40: unfused unless asked
        launches.clear()
        KA.attention_bwd(dout, qkv, out, lse, H, 0.25, fused=fused)
        assert [f for _, _, f in launches] == kernels, fused


def test_generic_tile_rule_at_its_edges():
    """The rule outside the table at its bounds: fp32 fuses the backward up to 32 keys, 16-bit forwards hold
    up to 128 keys in one block, a fused backward past 128 keys is refused, and tiles are at least 16."""
    from maefast.kernels.attention_tiles import Tile, bwd_fused_default, bwd_tiles, fwd_tiles

    assert bwd_fused_default(32, 64, torch.float32) and not bwd_fused_default(33, 64, torch.float32)
    assert fwd_tiles(128, 64, torch.float16).BLOCK_N == 128 and fwd_tiles(129, 64, torch.float16).BLOCK_N == 64
    with pytest.raises(ValueError, match="fused backward needs max_seqlen <= 128, got 129"):
        bwd_tiles(129, 64, torch.float16, fused=True)
    with pytest.raises(ValueError, match="power of two >= 16"):
        Tile(8, 16)


# -- the generic rule's tiles at the edges its comments state, the tile types, the sweep's bookkeeping ------
# (each tile the rule gives is one scripts/compile_kernels.py built without spills: a changed rule needs a new
# compile run)

@pytest.mark.parametrize("L", [1, 15, 16, 17, 32, 33, 48, 64, 65, 100, 128, 129, 300, 577])
def test_generic_forward_tile_is_the_least_padded(L):
    """16-bit, outside the table: one key block, the smallest power of two >= L (at least 16), holds a
    sequence up to 128 tokens, longer ones loop over 64-key blocks; query blocks likewise, up to 64."""
    pow2 = max(16, 1 << (L - 1).bit_length())
    t = fwd_tiles(L, 48, BF16)
    assert (t.BLOCK_M, t.BLOCK_N) == (min(pow2, 64), pow2 if L <= 128 else 64), t.name


@pytest.mark.parametrize("L,dh,dtype,name", [
    (100, 64, BF16, "m64n128w8s2"), (100, 32, BF16, "m64n128w4s2"), (60, 128, BF16, "m64n64w4s2"),
    (50, 96, FP32, "m32n32w4s2"), (50, 128, FP32, "m32n32w8s2"),  # fp32: 8 warps over Dh 96
])
def test_generic_forward_warps(L, dh, dtype, name):
    """8 warps for a 128-key 16-bit tile past Dh 32, and for fp32 past Dh 96; else 4."""
    assert fwd_tiles(L, dh, dtype).name == name


@pytest.mark.parametrize("L,dh,dtype,fused", [
    (128, 80, BF16, True), (128, 96, BF16, False), (129, 16, BF16, False), (32, 128, BF16, True),
    (33, 128, BF16, False), (32, 128, FP32, True), (33, 16, FP32, False),
])
def test_generic_backward_fuses_where_it_fits(L, dh, dtype, fused):
    """16-bit: fused up to 32 keys at any head dim, and up to 128 keys up to Dh 80; fp32 up to 32 keys."""
    assert bwd_fused_default(L, dh, dtype) is fused
    assert bwd_tiles(L, dh, dtype).fused is fused


@pytest.mark.parametrize("L,dh,dtype,name", [
    # fused, 16-bit: past Dh 64 at 32 keys only in 16-row steps at 8 warps, one stage up to Dh 80
    (32, 80, BF16, "fused-m16n32w8s1"), (32, 96, BF16, "fused-m16n32w8s2"), (32, 64, BF16, "fused-m32n32w4s2"),
    (64, 64, BF16, "fused-m64n64w8s2"), (64, 32, BF16, "fused-m64n64w4s2"), (128, 64, BF16, "fused-m32n128w8s2"),
    (16, 16, BF16, "fused-m16n16w4s2"), (16, 96, BF16, "fused-m16n16w4s2"),  # the 8-warp rule is 32 keys' only
    # fused, fp32: 16-row steps, 8 warps from Dh 32
    (20, 16, FP32, "fused-m16n32w4s2"), (20, 32, FP32, "fused-m16n32w8s2"),
    # unfused
    (33, 64, FP32, "dq-m32n32w4s2+dkdv-m16n32w4s2"), (200, 32, BF16, "dq-m64n64w4s2+dkdv-m64n64w4s2"),
    (200, 64, BF16, "dq-m64n64w8s2+dkdv-m64n64w8s2"), (200, 96, BF16, "dq-m64n64w8s2+dkdv-m64n64w8s2"),
    (200, 128, BF16, "dq-m64n64w8s2+dkdv-m32n64w8s2"), (129, 48, BF16, "dq-m64n64w4s2+dkdv-m64n64w4s2"),
])
def test_generic_backward_tiles(L, dh, dtype, name):
    assert bwd_tiles(L, dh, dtype).name == name


def test_a_fused_backward_holds_exactly_its_key_block():
    """L == BLOCK_N fits one key block (no refusal), L == BLOCK_N + 1 does not."""
    assert bwd_tiles(128, 64, BF16, fused=True).dkdv.BLOCK_N == 128
    assert bwd_tiles(64, 64, BF16, fused=True).dkdv.BLOCK_N == 64
    check_bwd_tiles(BwdTiles.parse("fused-m16n64w4s1"), 64)
    with pytest.raises(ValueError, match="holds 64 keys"):
        check_bwd_tiles(BwdTiles.parse("fused-m16n64w4s1"), 65)
    check_bwd_tiles(BwdTiles.parse("dq-m64n32w4s3+dkdv-m32n64w4s3"), 577)  # unfused: any length


def test_tile_types_refuse_what_cannot_launch():
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        Tile(64, 48)
    with pytest.raises(ValueError, match="num_stages"):
        Tile(64, 32, 4, 0)
    with pytest.raises(ValueError, match="needs one"):
        BwdTiles(False, Tile(64, 64))
    with pytest.raises(ValueError, match="looks like"):
        Tile.parse("m64n32w4s3x")
    fwd, bwd = Tile.parse("m64n64w4s2"), BwdTiles.parse("fused-m16n64w4s1")
    with pytest.raises(ValueError, match="among its candidates"):
        ShapeTiles(fwd, bwd, "test", (fwd,), (BwdTiles.parse("fused-m64n64w8s2"),))
    with pytest.raises(ValueError, match="among its candidates"):
        ShapeTiles(fwd, bwd, "test", (Tile.parse("m64n32w4s2"),), (bwd,))


def _row(tile, ms, table=False, direction="fwd", graph=False, L=50, dh=64):
    return dict(group=f"attention-tiles-{direction}", tile=tile, L=L, Dh=dh, direction=direction, time_ms=ms,
                table_tile=table, cuda_graph=graph)


def test_sweep_winners_threshold_directions_and_failed_cases():
    """A candidate exactly SWEEP_MIN_GAIN faster is a change; the forward and the backward of one shape
    are ranked apart; a case without a time (it failed) is left out; without the table's tile there is
    no gain, and the fastest is reported among the graph replays."""
    rows = [_row("m64n64w4s1", SWEEP_MIN_GAIN, table=True), _row("m64n32w4s2", 1.0), _row("m64n64w8s1", None),
            _row("fused-m16n64w4s1", 2.0, table=True, direction="bwd"), _row("fused-m64n64w8s2", 1.99, direction="bwd")]
    fwd, bwd = sorted(sweep_winners(rows), key=lambda w: w["direction"], reverse=True)
    assert (fwd["direction"], fwd["best"], fwd["change"]) == ("fwd", "m64n32w4s2", True)
    assert fwd["gain"] == pytest.approx(SWEEP_MIN_GAIN) and [t for t, _ in fwd["candidates"]] == ["m64n32w4s2",
                                                                                                 "m64n64w4s1"]
    assert (bwd["direction"], bwd["table"], bwd["best"], bwd["change"]) == ("bwd", "fused-m16n64w4s1",
                                                                             "fused-m64n64w8s2", False)
    (w,) = sweep_winners([_row("m64n64w4s2", 3.0, graph=True), _row("m64n32w4s2", 2.0, graph=True),
                          _row("m64n64w8s1", 1.0)])
    assert (w["table"], w["gain"], w["change"], w["best"]) == (None, None, False, "m64n32w4s2")
    assert w["not_compared"] == ["m64n64w8s1"]


def test_tile_types_accept_every_launchable_warp_count_and_only_int_blocks():
    """16 warps is a launch Triton takes; a float block size (64.0: what a JSON reader gives) is refused with
    the same ValueError, not a TypeError from the power-of-two check; a backward's name with anything after
    it is refused, not cut short."""
    assert Tile(64, 64, 16).name == "m64n64w16s2"
    with pytest.raises(ValueError, match="BLOCK_M must be a power of two"):
        Tile(64.0, 32)
    with pytest.raises(ValueError, match="looks like"):
        BwdTiles.parse("dq-m64n32w4s3+dkdv-m32n64w4s3 m16n16w4s1")


def test_sweep_winners_reports_both_times_and_reads_only_the_sweeps_rows():
    """table_ms is the table tile's time and best_ms the fastest's; rows of other groups in the same
    record (the ops preset's other attention rows) are not part of any sweep."""
    rows = [_row("m64n64w4s1", 2.0, table=True), _row("m64n32w4s2", 1.0),
            dict(group="attention-fwd", provider="maefast", L=50, Dh=64, time_ms=0.5),
            dict(group="attention", time_ms=0.1)]
    (w,) = sweep_winners(rows)
    assert (w["table_ms"], w["best_ms"], w["gain"]) == (2.0, 1.0, 2.0), w
    assert [t for t, _ in w["candidates"]] == ["m64n32w4s2", "m64n64w4s1"]
