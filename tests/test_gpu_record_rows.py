"""Which rows scripts/gpu_record.py's verdicts read, and which they must not (from a mutation audit: each
test here passed a verdict read from the wrong row, shape, backend or record): the fastest maefast and
torch-native rows of the issue's shape only, the attention route's pair either way round, every attention
and memory-bound provider, the loader's fastest path, a step record of another commit, the junit errors,
a torn rows file. Made-up rows, no GPU; tests/test_gpu_record.py has the thresholds and the spreads."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_record as rec  # noqa: E402

H = dict(model="mae_vit_huge_patch14", batch=128)
KEY = json.dumps(H, sort_keys=True)


def _row(group, provider, time_ms, shape=H, **kw):
    return dict(group=group, provider=provider, time_ms=time_ms, shape=shape,
                shape_key=json.dumps(shape, sort_keys=True), **kw)


def _pair(base, ours, base_ms, ours_ms, ratio, lo, hi, shape=H):
    return [_row("train-step-pair", base, base_ms, shape, baseline=True),
            _row("train-step-pair", ours, ours_ms, shape, paired_with=base, pair_ratio=ratio, pair_ratio_range=[lo, hi],
                 pair_ratio_rounds=[lo, ratio, hi])]


# -- step_targets --

def test_a_spread_that_starts_at_the_target_is_not_within_noise():
    """`within_noise` is the target strictly above the spread's low end and at most its high end: a ratio
    whose worst draw (base p20 / ours p80) is exactly the target meets it in every draw."""
    rows = [_row("train-step", "reference", 205.0, time_p20_ms=200.0, time_p80_ms=210.0),
            _row("train-step", "maefast-graph", 97.5, time_p20_ms=95.0, time_p80_ms=100.0)]
    t = rec.step_targets(rows, "huge:128")[KEY]["step_vs_reference"]
    assert t["spread"][0] == 2.0 and t["met"] is True and t["within_noise"] is False
    # ... and one whose best draw (base p80 / ours p20) just reaches it is a miss within the noise
    rows = [_row("train-step", "reference", 195.0, time_p20_ms=190.0, time_p80_ms=200.0),
            _row("train-step", "maefast-graph", 100.0, time_p20_ms=100.0, time_p80_ms=105.0)]
    t = rec.step_targets(rows, "huge:128")[KEY]["step_vs_reference"]
    assert t["spread"][1] == 2.0 and t["met"] is False and t["within_noise"] is True


def test_a_row_without_percentiles_leaves_the_ratio_without_a_spread():
    """Only both rows' p20 and p80 make a spread: the baseline's alone gives the value, not a KeyError."""
    rows = [_row("train-step", "reference", 200.0, time_p20_ms=199.0, time_p80_ms=201.0),
            _row("train-step", "maefast-graph", 90.0)]
    t = rec.step_targets(rows, "huge:128")[KEY]["step_vs_reference"]
    assert t["value"] == round(200 / 90, 4) and "spread" not in t and "within_noise" not in t


def test_a_row_recorded_without_a_time_is_no_baseline():
    """A row that ran out of memory or was cut short carries no time: the target says the reference is
    missing instead of dividing by None (and a second, timed, reference row is the one read)."""
    rows = [_row("train-step", "reference", None, error="CUDA out of memory"),
            _row("train-step", "maefast-graph", 90.0, peak_mem_gib=18.0)]
    t = rec.step_targets(rows, "huge:128")[KEY]
    assert t["step_vs_reference"]["met"] is None and t["step_vs_reference"]["reason"] == "missing row: reference"
    t = rec.step_targets(rows + [_row("train-step", "reference", 180.0)], "huge:128")[KEY]
    assert t["step_vs_reference"]["value"] == 2.0


def test_step_targets_of_one_shape_do_not_read_another_batch():
    """`only` names model and batch: ViT-H rows at batch 64 are information, not the batch-128 verdict."""
    b64 = dict(H, batch=64)
    rows = [_row("train-step", "reference", 90.0, b64), _row("train-step", "maefast-graph", 40.0, b64)]
    t = rec.step_targets(rows, "huge:128")
    assert t["(huge:128)"]["step_vs_reference"]["met"] is None
    assert set(t[json.dumps(b64, sort_keys=True)]) == {"rows"}


def test_the_maefast_best_is_a_maefast_row_even_where_torch_native_is_faster():
    """A torch-native row faster than every maefast row is the baseline, never `maefast_best`: the target
    is then missed, not compared with itself."""
    rows = [_row("train-step", "reference", 180.0), _row("train-step", "maefast-graph", 100.0, frac_peak_flops=0.5),
            _row("train-step", "torch-native-graph", 80.0, frac_peak_flops=0.7)]
    t = rec.step_targets(rows, "huge:128")[KEY]
    assert t["maefast_best"] == "maefast-graph" and t["mfu"]["value"] == 0.5
    assert t["step_vs_torch_native"]["value"] == 0.8 and t["step_vs_torch_native"]["met"] is False


def test_sdpa_is_a_torch_native_baseline():
    """bench_step's `sdpa` row is torch-native: where it is the fastest of them, it is the baseline."""
    rows = [_row("train-step", "maefast-graph", 100.0), _row("train-step", "torch-native-graph", 120.0),
            _row("train-step", "sdpa", 110.0)]
    t = rec.step_targets(rows, "huge:128")[KEY]
    assert t["torch_native_best"] == "sdpa" and t["step_vs_torch_native"]["value"] == 1.1


def test_the_paired_target_reads_the_pair_of_its_own_shape():
    """An interleaved pair at another batch is not the issue shape's paired verdict."""
    other = _pair("torch-native-graph", "maefast-block-graph", 104.0, 80.0, 1.3, 1.28, 1.32, dict(H, batch=64))
    rows = [_row("train-step", "maefast-graph", 100.0), _row("train-step", "torch-native-graph", 104.0), *other]
    t = rec.step_targets(rows, "huge:128")[KEY]["step_vs_torch_native_paired"]
    assert t["met"] is None and "no interleaved pair" in t["reason"]


def test_the_paired_target_says_why_the_pair_failed():
    """A pair whose second row did not fit or could not run leaves its baseline timed alone with
    `pair_failed`: the missing paired figure gives that reason, not only "no pair"."""
    why = "maefast-block-graph did not fit beside torch-native-graph: out of GPU memory; torch-native-graph timed alone"
    rows = [_row("train-step", "maefast-block-graph", 100.0), _row("train-step", "torch-native-graph", 120.0,
                                                                    pair_failed=why)]
    t = rec.step_targets(rows, "huge:128")[KEY]
    assert t["step_vs_torch_native"]["value"] == 1.2  # the baseline timed alone still gives its target
    assert t["step_vs_torch_native_paired"]["met"] is None and why in t["step_vs_torch_native_paired"]["reason"]


# -- attention_route --

def test_attention_route_reads_only_its_shapes_rows():
    """Rows of another batch listed first are not read: the decision is the issue shape's."""
    b64 = dict(H, batch=64)
    rows = [_row("train-step", "maefast-graph", 50.0, b64, time_p20_ms=49.9, time_p80_ms=50.1),
            _row("train-step", "maefast-sdpa-graph", 60.0, b64, time_p20_ms=59.9, time_p80_ms=60.1),
            _row("train-step", "maefast-graph", 114.0, time_p20_ms=113.9, time_p80_ms=114.1),
            _row("train-step", "maefast-sdpa-graph", 110.0, time_p20_ms=109.9, time_p80_ms=110.1)]
    r = rec.attention_route(rows, "huge:128")
    assert r["rows"]["triton"]["time_ms"] == 114.0 and r["faster"] == "sdpa"


def test_attention_route_without_the_pairs_rounds_reads_the_rows_timed_apart():
    """A pair row with a median ratio but no per-round range cannot say every round agrees: the rows
    timed one after the other decide (no error on the missing range)."""
    pair = _pair("maefast-graph", "maefast-sdpa-graph", 114.0, 111.0, 1.027, 1.01, 1.04)
    del pair[1]["pair_ratio_range"]
    apart = [_row("train-step", "maefast-graph", 114.0, time_p20_ms=113.9, time_p80_ms=114.2),
             _row("train-step", "maefast-sdpa-graph", 116.5, time_p20_ms=116.4, time_p80_ms=116.7)]
    r = rec.attention_route(apart + pair, "huge:128")
    assert r["timing"] == "rows timed one after the other" and r["faster"] == "triton"


def test_attention_route_reads_a_pairs_range_only_of_two_positive_ratios():
    """A pair row whose range is not two positive ratios (one value, or a 0 from a torn row) cannot say
    every round agrees: the rows timed one after the other decide, with no ZeroDivisionError."""
    apart = [_row("train-step", "maefast-graph", 114.0, time_p20_ms=113.9, time_p80_ms=114.2),
             _row("train-step", "maefast-sdpa-graph", 116.5, time_p20_ms=116.4, time_p80_ms=116.7)]
    for ours, base, rng in (("maefast-graph", "maefast-sdpa-graph", [0.0, 0.0]),
                            ("maefast-graph", "maefast-sdpa-graph", [1.03]),
                            ("maefast-sdpa-graph", "maefast-graph", [0.0, 1.04])):
        pair = _pair(base, ours, 114.0, 111.0, 1.03, 1.01, 1.04)
        pair[1]["pair_ratio_range"] = rng
        r = rec.attention_route(apart + pair, "huge:128")
        assert r["timing"] == "rows timed one after the other" and r["faster"] == "triton", (rng, r)


def test_attention_route_with_triton_as_the_pairs_ours_needs_every_round():
    """The pair named the other way (sdpa the base): triton wins only where every round is on its
    side; one round lost (sdpa faster there) decides nothing, though the median is past the gain."""
    straddle = _pair("maefast-sdpa-graph", "maefast-graph", 117.0, 114.0, 1.03, 0.99, 1.04)
    r = rec.attention_route(straddle, "huge:128")
    assert r["timing"] == "interleaved pair" and r["faster"] is None and r["sdpa_speedup"] == round(1 / 1.03, 4)


def test_attention_route_skips_a_row_without_a_time():
    """A row that failed (no time) is not read: a timed row of the provider is, and where there is none
    the route says the row is missing."""
    failed = _row("train-step", "maefast-sdpa-graph", None, error="CUDA out of memory")
    rows = [failed, _row("train-step", "maefast-graph", 114.0, time_p20_ms=113.9, time_p80_ms=114.1)]
    assert rec.attention_route(rows, "huge:128")["decide"] == "missing row: maefast-sdpa-graph"
    r = rec.attention_route(rows + [_row("train-step", "maefast-sdpa-graph", 110.0, time_p20_ms=109.9,
                                         time_p80_ms=110.1)], "huge:128")
    assert r["rows"]["sdpa"]["time_ms"] == 110.0 and r["faster"] == "sdpa"


# -- attention_targets and op_targets --

_S = dict(N=256, L=65, H=16, Dh=80)


def test_attention_targets_judge_the_cuda_rows_too():
    rows = [_row("attention-fwdbwd", p, ms, _S) for p, ms in (("cuda", 0.2), ("triton", 0.25), ("sdpa-flash", 0.3))]
    t = rec.attention_targets(rows)["L65 Dh80 H16 N256"]["fwdbwd"]
    assert t["cuda_vs_best_sdpa"]["value"] == 1.5 and t["cuda_vs_best_sdpa"]["met"] is True
    assert t["cuda_ms"] == 0.2 and t["triton_vs_best_sdpa"]["value"] == 1.2


def test_attention_targets_count_the_math_backend_among_the_rivals():
    """The best SDPA backend is the fastest of all four, the math one included."""
    rows = [_row("attention-fwd", p, ms, _S) for p, ms in (("triton", 0.2), ("sdpa-flash", 0.4), ("sdpa-math", 0.25))]
    t = rec.attention_targets(rows)["L65 Dh80 H16 N256"]["fwd"]
    assert t["best_sdpa"] == "sdpa-math" and t["triton_vs_best_sdpa"]["value"] == 1.25


def test_attention_targets_take_rivals_of_the_same_shape_only():
    """A faster SDPA row at a smaller L is no rival of this shape's triton row."""
    small = dict(_S, L=50)
    rows = [_row("attention-fwd", "triton", 0.2, _S), _row("attention-fwd", "sdpa-flash", 0.3, _S),
            _row("attention-fwd", "sdpa-flash", 0.05, small)]
    t = rec.attention_targets(rows)["L65 Dh80 H16 N256"]["fwd"]
    assert t["best_sdpa_ms"] == 0.3 and t["triton_vs_best_sdpa"]["value"] == 1.5


def test_op_targets_judge_every_memory_bound_kernel():
    """patch gather, un-shuffle and the masked loss each judged against 80% of the copy bandwidth, a
    measured 0.0 included (a figure, not a missing one), the CUDA rows as well as the Triton ones."""
    s = dict(N=256, L=256)
    rows = [_row(g, p, 0.1, s, frac_peak_bw=f) for g, p, f in
            (("patch-gather", "triton", 0.9), ("unshuffle-fwd-bwd", "triton", 0.85),
             ("loss-masked-fwd-bwd", "triton", 0.0), ("patch-gather", "cuda", 0.7))]
    t = rec.op_targets(rows)["memory_bound_frac_peak_bw"]
    assert {(k.split()[0], k.split()[-1]): v["met"] for k, v in t.items()} == {
        ("patch-gather", "triton"): True, ("unshuffle-fwd-bwd", "triton"): True,
        ("loss-masked-fwd-bwd", "triton"): False, ("patch-gather", "cuda"): False}


def test_attention_targets_say_which_mode_of_a_shape_cut_short_is_missing():
    """A paper shape whose fwd+bwd rows ran but whose forward rows did not (the deadline fell between the
    two modes) still has its forward target, as `?`, not a silent gap."""
    rows = [_row("attention-fwdbwd", p, ms, _S) for p, ms in (("triton", 0.2), ("sdpa-flash", 0.3))]
    t = rec.attention_targets(rows)["L65 Dh80 H16 N256"]
    assert t["fwdbwd"]["triton_vs_best_sdpa"]["value"] == 1.5
    assert t["fwd"]["triton_vs_best_sdpa"]["met"] is None
    assert "attention-fwd row at L 65" in t["fwd"]["triton_vs_best_sdpa"]["reason"]


_H14 = dict(model="vit_h14", N=256, img=224, p=14, D=1280, L=256, K=64)  # bench_masking's ViT-H/14 b256
_B16 = dict(model="vit_b16", N=256, img=224, p=16, D=768, L=196, K=49)


def test_op_targets_judge_maefast_rows_only_and_the_issues_shape_always():
    """torch.compile of the official composition (`compile`) is no maefast row to hold to the 4x target,
    and a group with no maefast row at ViT-H/14 b256 reads `?` even where other shapes' rows ran."""
    rows = [_row("mask-embed-fwd-bwd", "reference", 1.0, _H14, baseline=True, speedup_vs_baseline=1.0),
            _row("mask-embed-fwd-bwd", "compile", 0.5, _H14, speedup_vs_baseline=2.0),
            _row("mask-embed-fwd-bwd", "cuda", 0.2, _B16, speedup_vs_baseline=5.0),
            _row("patch-gather", "cuda", 0.1, _B16, frac_peak_bw=0.9),
            _row("unshuffle-fwd-bwd", "triton", 0.1, dict(case="p14", N=256, L=256, K=64, D=512), frac_peak_bw=0.85)]
    t = rec.op_targets(rows)
    embed = t["mask_embed_fwd_bwd_vs_reference"]
    assert not any(k.endswith(" compile") for k in embed)
    assert embed[f"{json.dumps(_B16, sort_keys=True)} cuda"]["met"] is True
    assert embed["mask-embed-fwd-bwd ViT-H/14 b256"]["met"] is None
    bound = t["memory_bound_frac_peak_bw"]
    assert bound["patch-gather ViT-H/14 b256"]["met"] is None and "N 256, L 256" in \
        bound["patch-gather ViT-H/14 b256"]["reason"]
    assert bound["loss-masked-fwd-bwd ViT-H/14 b256"]["met"] is None
    assert "unshuffle-fwd-bwd ViT-H/14 b256" not in bound  # it ran there: judged, no `?`
    no_bw = rec.op_targets([_row("patch-gather", "cuda", 0.1, _H14)])["memory_bound_frac_peak_bw"]
    assert list(no_bw) == [f"patch-gather {json.dumps(_H14, sort_keys=True)} cuda", "unshuffle-fwd-bwd ViT-H/14 b256",
                           "loss-masked-fwd-bwd ViT-H/14 b256"]
    assert "the row ran, but no copy bandwidth" in no_bw[f"patch-gather {json.dumps(_H14, sort_keys=True)} cuda"][
        "reason"]
    rows.append(_row("mask-embed-fwd-bwd", "triton", 0.25, _H14, speedup_vs_baseline=4.0))
    embed = rec.op_targets(rows)["mask_embed_fwd_bwd_vs_reference"]
    assert "mask-embed-fwd-bwd ViT-H/14 b256" not in embed
    assert embed[f"{json.dumps(_H14, sort_keys=True)} triton"]["met"] is True


# -- table2_targets --

def test_table2_targets_read_a_bare_list_and_the_rows_error():
    """table2's JSON as a bare list of rows is read like {"rows": [...]}, and a row that failed says why."""
    rows = [dict(model="mae_vit_large_patch16", decoder_depth=8, impl="auto", of_flop_bound=0.97),
            dict(model="mae_vit_huge_patch14", decoder_depth=1, impl="auto", of_flop_bound=None,
                 error="OutOfMemoryError: CUDA out of memory")]
    t = rec.table2_targets(rows)
    assert t["mae_vit_large_patch16 dec8 auto"]["met"] is True
    assert t["mae_vit_huge_patch14 dec1 auto"] == {"value": None, "target": ">= 0.95", "met": None,
                                                   "reason": "OutOfMemoryError: CUDA out of memory"}
    assert "mae_vit_large_patch16 dec8" not in t and len(t) == 4  # dec8 large there; three cells still `?`


# -- data_targets --

_B = dict(model="mae_vit_base_patch16", batch=128)


def test_loader_vs_step_takes_the_faster_of_the_cpu_and_gpu_loaders():
    record = {"bench_data": {"loader": {"fast-uint8": {"img_per_s": 3000.0}, "gpu": {"img_per_s": 4000.0}}}}
    step = {"rows": [_row("train-step", "maefast-graph", 40.0, _B, img_per_s=3200.0)]}
    assert rec.data_targets(record, step)["loader_vs_step"] == {"value": 1.25, "target": ">= 1.0", "met": True}
    del record["bench_data"]["loader"]["fast-uint8"]  # the GPU decode alone is read too
    assert rec.data_targets(record, step)["loader_vs_step"]["value"] == 1.25


def test_loader_vs_step_skips_a_loader_row_that_timed_nothing():
    """`bench data` writes NaN img/s for a loader row that timed no batch: the other row is read, and with
    neither the target is missing, not missed."""
    nan = float("nan")
    record = {"bench_data": {"loader": {"fast-uint8": {"img_per_s": nan}, "gpu": {"img_per_s": 4000.0}}}}
    step = {"rows": [_row("train-step", "maefast-graph", 40.0, _B, img_per_s=3200.0)]}
    assert rec.data_targets(record, step)["loader_vs_step"] == {"value": 1.25, "target": ">= 1.0", "met": True}
    record["bench_data"]["loader"]["gpu"]["img_per_s"] = nan
    t = rec.data_targets(record, step)["loader_vs_step"]
    assert t["value"] is None and t["met"] is None and "timed nothing (NaN)" in t["reason"]


def test_data_targets_name_issue_15s_bytes_per_image_and_the_per_worker_ratio():
    """Every figure of issue 15 the data preset measures is in its targets: the bytes each image costs the copy
    to the GPU, and this run's per-worker ratio for information (the target is judged on the CPU records: no
    `?` line in every GPU record)."""
    record = {"bench_data": {"loader": {"official": {"img_per_s": 900.0, "bytes_per_image": 602112.0},
                                        "fast-uint8": {"img_per_s": 3000.0, "bytes_per_image": 151312.0}},
                             "per_worker": {"official": {"vs_official": 1.0}, "fast-uint8": {"vs_official": 2.1}}}}
    t = rec.data_targets(record, None)
    assert t["loader_bytes_per_image"] == {"official": 602112.0, "fast-uint8": 151312.0}
    assert t["per_worker_fast_uint8_vs_official"] == 2.1
    assert "per_worker" not in " ".join(rec.short_lines({"env": {"date": "d", "commit": "c"}, "preset": "data",
                                                         "dry_run": False, "steps": {}, "targets": t}))


def test_loader_vs_step_is_against_maefast_rows_only():
    """A faster torch-native or reference row at base:128 is not what the loader must keep up with."""
    record = {"bench_data": {"loader": {"fast-uint8": {"img_per_s": 3000.0}}}}
    step = {"rows": [_row("train-step", "maefast-graph", 40.0, _B, img_per_s=2500.0),
                     _row("train-step", "torch-native-graph", 30.0, _B, img_per_s=4000.0)]}
    assert rec.data_targets(record, step)["loader_vs_step"]["value"] == 1.2


def test_a_step_record_of_another_commit_is_not_compared():
    record = {"env": {"card": "NVIDIA H200", "commit": "abc1234"}, "bench_data": {},
              "train": {"train-huge": {"img_per_s": 1100.0}}}
    step = {"env": {"card": "NVIDIA H200", "commit": "def5678"},
            "rows": [_row("train-step", "maefast-graph", 110.0, img_per_s=1150.0)]}
    t = rec.data_targets(record, step)
    assert t["train_vs_step"]["met"] is None and "commit" in t["step_record_differs"]
    assert "train_vs_best_step_row" not in t


def test_no_step_record_is_missing_not_another_runs():
    """Without a step record (none found for the commit) the ratios say the row is missing; no card or
    commit is said to differ."""
    record = {"env": {"card": "NVIDIA H200", "commit": "abc1234"}, "bench_data": {},
              "train": {"train-huge": {"img_per_s": 1100.0}}}
    t = rec.data_targets(record, None)
    assert "step_record_differs" not in t
    assert t["train_vs_step"]["reason"] == "missing row: maefast-graph huge:128 in the step record"


def test_train_vs_step_reads_the_step_records_timed_alone_row():
    """The interleaved pair's row of the same provider is not the step row train is judged against."""
    record = {"train": {"train-huge": {"img_per_s": 1100.0}}}
    step = {"rows": [_row("train-step", "maefast-graph", 110.0, img_per_s=1150.0),
                     _row("train-step-pair", "maefast-graph", 100.0, img_per_s=1300.0, paired_with="sdpa")]}
    t = rec.data_targets(record, step)["train_vs_step"]
    assert t["value"] == round(1100 / 1150, 4) and t["met"] is True


# -- junit_summary, read_rows, short_lines --

def test_junit_counts_errors_as_failures(tmp_path):
    """A test that errored (a fixture's failure: <error>, not <failure>) is a failure, with its message."""
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuite><testcase classname="a" name="t1"/>'
                   '<testcase classname="a" name="t2"><error message="fixture blew up"/></testcase></testsuite>')
    s = rec.junit_summary(str(xml))
    assert (s["passed"], s["failed"]) == (1, 1) and s["failures"] == [{"test": "a::t2", "message": "fixture blew up"}]
    assert rec.junit_summary(str(tmp_path / "none.xml")) == {"error": "no junit xml"}


def test_read_rows_drops_a_torn_last_line(tmp_path):
    """A step killed mid-write leaves half a line: the whole rows before it are kept."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"provider": "a"}\n{"provider": "b"}\n{"provider": "c", "ti')
    assert [r["provider"] for r in rec.read_rows(str(path))] == ["a", "b"]
    assert rec.read_rows(str(tmp_path / "missing.jsonl")) == []


def test_short_lines_count_the_tests_not_run():
    record = {"env": {"date": "d", "commit": "c"}, "preset": "kernels", "dry_run": False,
              "steps": {"tests": {"rc": 1, "seconds": 10.0, "budget_s": 60}},
              "tests": {"passed": 5, "failed": 1, "skipped": 2, "not_run": 3,
                        "failures": [{"test": "a::t", "message": "boom"}]}}
    lines = rec.short_lines(record)
    assert any("passed 5 failed 1 skipped 2 not run 3" in ln for ln in lines), lines
    assert any("FAIL a::t: boom" in ln for ln in lines)


@pytest.mark.parametrize("after_step, expect", [(0, 300 / 3.5), (10, 200 / 2.5), (15, 100 / 0.5)])
def test_window_rate_orders_the_windows_by_step(after_step, expect):
    """steps.jsonl lines out of order are timed in step order (windows of 10 steps x batch 10: 1 s, 2 s,
    0.5 s), and a window counts only where it starts at or after `after_step` (not where it ends past it)."""
    steps = [dict(step=30, img_per_s=200.0), dict(step=10, img_per_s=100.0), dict(step=20, img_per_s=50.0)]
    assert rec.window_rate(steps, 10, after_step) == pytest.approx(expect)


def test_data_targets_without_the_huge_run_give_no_train_ratio():
    """A step record with rows but no train-huge run: the train targets say the run is missing (no
    division by None), and the best step row named for information is a maefast row."""
    step = {"rows": [_row("train-step", "maefast-graph", 110.0, img_per_s=1150.0),
                     _row("train-step", "torch-native-graph", 90.0, img_per_s=1400.0)]}
    t = rec.data_targets({"train": {}}, step)
    assert t["train_vs_step"]["met"] is None and t["train_vs_step"]["reason"] == "missing run: train-huge"
    assert "train_vs_best_step_row" not in t
    t = rec.data_targets({"train": {"train-huge": {"img_per_s": 1100.0}}}, step)
    assert t["train_vs_best_step_row"] == {"row": "maefast-graph", "value": round(1100 / 1150, 4)}


def test_step_record_rows_without_img_per_s_are_not_read():
    """A step record's row cut short (no img/s) is skipped: the train and loader ratios read the timed rows."""
    record = {"bench_data": {"loader": {"fast-uint8": {"img_per_s": 3000.0}}},
              "train": {"train-huge": {"img_per_s": 1100.0}}}
    step = {"rows": [_row("train-step", "maefast-graph", 110.0, img_per_s=1150.0),
                     _row("train-step", "maefast-block-graph", None, img_per_s=None),
                     _row("train-step", "maefast-graph", 40.0, _B, img_per_s=2500.0),
                     _row("train-step", "maefast-block-graph", None, _B, img_per_s=None)]}
    t = rec.data_targets(record, step)
    assert t["train_vs_best_step_row"]["row"] == "maefast-graph" and t["loader_vs_step"]["value"] == 1.2


def test_short_lines_header_and_tile_lines():
    """The printed summary says a dry run only on a dry run, and a tile window asks for a table change only
    where the sweep found one."""
    record = {"env": {"date": "d", "commit": "0123456789abcdef", "card": "NVIDIA H200"}, "preset": "ops",
              "dry_run": False, "steps": {},
              "attention_tiles": [dict(L=65, Dh=80, direction="fwd", table="64x64", table_ms=0.2, best="64x64",
                                       best_ms=0.2, change=False),
                                  dict(L=257, Dh=64, direction="bwd", table="64x64", table_ms=0.5, best="128x64",
                                       best_ms=0.4, change=True)]}
    lines = rec.short_lines(record)
    assert lines[0].startswith("== gpu_check ops: NVIDIA H200") and "dry run" not in lines[0]
    assert "commit 0123456789ab |" in lines[0]
    (keep,) = [ln for ln in lines if "tiles L65" in ln]
    (change,) = [ln for ln in lines if "tiles L257" in ln]
    assert "change the table" not in keep and change.endswith("<- change the table")
    assert "(dry run)" in rec.short_lines(dict(record, dry_run=True))[0]
