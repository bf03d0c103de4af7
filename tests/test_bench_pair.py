"""The interleaved pair of step rows, checked on the CPU: `maefast.timing.time_interleaved` alternates the
order of its functions round by round and times whole rounds; bench_step's `test_train_step_pair` records
both rows and the per-round ratio; the GPU record judges `step_vs_torch_native_paired` from it (with the
rounds' range as its spread) and the attention route reads an interleaved pair before rows timed apart."""
from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
import torch

from maefast import timing
from test_bench import _FakeBenchmark, harness  # noqa: F401 - the harness fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_record as rec  # noqa: E402

H = dict(model="mae_vit_huge_patch14", batch=128)
KEY = json.dumps(H, sort_keys=True)


def test_time_interleaved_alternates_the_order_and_times_whole_rounds(monkeypatch):
    """Rounds run A..B then B..A (a drift weighs on both alike), each fn a whole number of calls sized
    to ~round_ms from a timed call after an untimed one (which may compile: a first call that took seconds
    would size every round to one call), warm-up calls first; a round's time is its calls' total / count."""
    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    calls = []

    def fn(name, ms, first_ms=None):
        def run():
            slow = first_ms is not None and name not in calls  # a first call that compiles
            calls.append(name)
            clock["t"] += (first_ms if slow else ms) / 1e3
        return run

    a, b = timing.time_interleaved([fn("a", 2.0, first_ms=3000.0), fn("b", 5.0)], "cpu", rounds=4, round_ms=10.0,
                                   warmup_ms=4.0)
    assert a["calls_per_round"] == 5 and b["calls_per_round"] == 2  # 10 ms / 2 ms, 10 ms / 5 ms
    # an untimed call, a sizing call + warm-up: a twice + 2 warm-up calls, b twice + none (4 ms < one 5 ms call)
    assert calls[:6] == ["a", "a", "a", "a", "b", "b"]
    assert "".join(calls[6:]) == "aaaaabb" + "bbaaaaa" + "aaaaabb" + "bbaaaaa"
    assert a["rounds_ms"] == pytest.approx([2.0] * 4) and b["rounds_ms"] == pytest.approx([5.0] * 4)
    assert a["reps"] == 4 and a["median_ms"] == pytest.approx(2.0) and b["p80_ms"] == pytest.approx(5.0)


def test_time_interleaved_checks_its_arguments():
    with pytest.raises(TypeError, match="fns"):
        timing.time_interleaved([], "cpu")
    with pytest.raises(TypeError, match="fns"):
        timing.time_interleaved([lambda: None, 3], "cpu")
    for kw, name in ((dict(rounds=0), "rounds"), (dict(rounds=True), "rounds"), (dict(round_ms=-1.0), "round_ms"),
                     (dict(warmup_ms=float("nan")), "warmup_ms"), (dict(round_ms=float("inf")), "round_ms")):
        with pytest.raises(ValueError, match=name):
            timing.time_interleaved([lambda: None], "cpu", **kw)
    one = timing.time_interleaved([lambda: None], "cpu", rounds=3, round_ms=0.0, warmup_ms=0.0)
    assert len(one) == 1 and one[0]["calls_per_round"] == 1 and len(one[0]["rounds_ms"]) == 3


def _import_bench_step(monkeypatch, **env):
    for k in ("MAEFAST_BENCH_STEP_PAIR", "MAEFAST_BENCH_STEP_PROVIDERS", "MAEFAST_BENCH_STEP_MODELS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    sys.modules.pop("bench_step", None)
    try:
        return importlib.import_module("bench_step")
    finally:
        sys.modules.pop("bench_step", None)


def test_bench_step_pair_from_env(harness, monkeypatch):
    """The pair runs by default in a whole run (no row list), when named, never with a row list alone;
    a bad MAEFAST_BENCH_STEP_PAIR is a ValueError naming it."""
    bs = _import_bench_step(monkeypatch)
    assert bs.PAIR == ("sdpa", "maefast-block") and hasattr(bs, "test_train_step_pair")
    assert len(bs.PAIR_PARAMS) == len(bs.CASES)
    bs = _import_bench_step(monkeypatch, MAEFAST_BENCH_STEP_PROVIDERS="reference")
    assert bs.PAIR is None and bs.PAIR_PARAMS == [] and not hasattr(bs, "test_train_step_pair")
    bs = _import_bench_step(monkeypatch, MAEFAST_BENCH_STEP_PROVIDERS="reference", MAEFAST_BENCH_STEP_PAIR="none")
    assert bs.PAIR is None
    monkeypatch.setattr(harness, "_GPU_MODE", True)
    bs = _import_bench_step(monkeypatch, MAEFAST_BENCH_STEP_PROVIDERS="maefast-compile-graph",
                            MAEFAST_BENCH_STEP_PAIR=" torch-native-graph + maefast-block-graph",
                            MAEFAST_BENCH_STEP_MODELS="huge:128,base:128@maefast-graph")
    assert bs.PAIR == ("torch-native-graph", "maefast-block-graph")
    assert bs.PAIR_PARAMS == [("mae_vit_huge_patch14", 128)]  # not at a size that runs only chosen rows
    assert _import_bench_step(monkeypatch).PAIR == ("torch-native-graph", "maefast-block-graph")  # the GPU default
    for bad, msg in (("sdpa", "two different rows"), ("sdpa+sdpa", "two different rows"), ("a+b+c", "two different"),
                     ("sdpa+nope", "unknown provider.*nope")):
        with pytest.raises(ValueError, match=f"MAEFAST_BENCH_STEP_PAIR.*{msg}"):
            _import_bench_step(monkeypatch, MAEFAST_BENCH_STEP_PAIR=bad)


def test_the_autotune_row_runs_only_when_named(harness, monkeypatch):
    """torch-native-autotune-graph compiles for minutes: a whole run leaves it out (README: 'on request'),
    a row list or a size's @rows runs it."""
    monkeypatch.setattr(harness, "_GPU_MODE", True)
    row = "torch-native-autotune-graph"
    bs = _import_bench_step(monkeypatch)
    assert row not in bs.PROVIDERS and all(p != row for _, p in bs.PARAMS) and "torch-native-graph" in bs.PROVIDERS
    bs = _import_bench_step(monkeypatch, MAEFAST_BENCH_STEP_PROVIDERS=f"{row},maefast-block-graph")
    assert bs.PROVIDERS == [row, "maefast-block-graph"]
    bs = _import_bench_step(monkeypatch, MAEFAST_BENCH_STEP_MODELS=f"huge:64@{row}")
    assert bs.PARAMS == [(("mae_vit_huge_patch14", 64), row)]


def test_bench_step_pair_records_both_rows_and_the_rounds_ratio(harness, monkeypatch):
    """Both rows of the pair are built in one process and timed interleaved; the base row is the group's
    baseline, the ours row carries the median of the per-round ratios and their range, and the peak memory
    of the two together under its own name (not a row's own peak)."""
    bs = _import_bench_step(monkeypatch)
    rounds = {"base": [10.0, 12.0, 11.0], "ours": [5.0, 4.0, 5.5]}

    def fake_interleaved(fns, device, **kw):
        assert [f.provider for f in fns] == ["sdpa", "maefast-block"]
        return [dict(timing._summary(rounds[k]), rounds_ms=rounds[k], calls_per_round=n)
                for k, n in (("base", 3), ("ours", 7))]

    monkeypatch.setattr(bs.timing, "time_interleaved", fake_interleaved)
    bench = _FakeBenchmark()
    bs._train_step_pair(bench, torch.device("cpu"), ("mae_vit_tiny_test", 2))
    base, ours = harness.RESULTS
    assert bench.extra_info is ours and bench.calls == 1
    assert (base["group"], ours["group"]) == ("train-step-pair", "train-step-pair")
    assert base["provider"] == "sdpa" and base["baseline"] and not ours["baseline"]
    assert base["time_ms"] == 11.0 and ours["time_ms"] == 5.0 and ours["rounds_ms"] == [5.0, 4.0, 5.5]
    assert ours["calls_per_round"] == 7 and ours["paired_with"] == "sdpa" and "paired_with" not in base
    ratios = [10.0 / 5.0, 12.0 / 4.0, 11.0 / 5.5]
    assert ours["pair_ratio_rounds"] == pytest.approx(ratios) and ours["pair_ratio"] == pytest.approx(2.0)
    assert ours["pair_ratio_range"] == pytest.approx([2.0, 3.0])
    assert ours["speedup_vs_baseline"] == pytest.approx(11.0 / 5.0)  # the medians' ratio, beside the rounds'
    assert ours["peak_mem_pair_gib"] is None and "peak_mem_gib" not in ours  # the CPU has no allocator record
    assert ours["img_per_s"] == pytest.approx(2 / 5e-3) and ours["build_s"] >= 0 and ours["captured"] is False
    assert ours["speedup_vs_best_torch_native"] == pytest.approx(11.0 / 5.0)  # sdpa is a torch-native row
    assert "round" in ours["timer"]
    assert harness.other_rows([bench.extra_info]) == [base]  # what --benchmark-json keeps beside the fixture's


@pytest.mark.parametrize("where", ["build", "timing"])
def test_bench_step_pair_times_the_baseline_alone_when_the_two_do_not_fit(harness, monkeypatch, where):
    """The step preset's only baseline timing is the pair's: when the second row does not fit beside the
    first (out of memory building it or timing the two), the baseline is timed alone as a `train-step`
    row saying why, and the pair skips with that reason; the JSON keeps rows no benchmark holds."""
    bs = _import_bench_step(monkeypatch)
    make_step = bs.mb.make_step

    def oom_for_ours(provider, *a, **kw):
        if provider == "maefast-block" and where == "build":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return make_step(provider, *a, **kw)

    def oom_interleaved(fns, device, **kw):
        if len(fns) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return timing.time_interleaved(fns, device, **kw)

    monkeypatch.setattr(bs.mb, "make_step", oom_for_ours)
    monkeypatch.setattr(bs.timing, "time_interleaved", oom_interleaved)
    bench = _FakeBenchmark()
    with pytest.raises(pytest.skip.Exception, match="maefast-block did not fit beside sdpa"):
        bs._train_step_pair(bench, torch.device("cpu"), ("mae_vit_tiny_test", 2))
    (alone,) = harness.RESULTS
    assert alone["group"] == "train-step" and alone["provider"] == "sdpa" and alone["time_ms"] > 0
    assert "timed alone" in alone["pair_failed"] and bench.extra_info is alone
    assert harness.other_rows([bench.extra_info]) == [] and harness.other_rows([]) == [alone]
    # at a size whose own cases time the baseline alone: no second row of it
    harness.RESULTS.clear()
    assert (("mae_vit_tiny_test", 4), "sdpa") in bs.PARAMS
    with pytest.raises(pytest.skip.Exception, match="has its own row"):
        bs._train_step_pair(_FakeBenchmark(), torch.device("cpu"), ("mae_vit_tiny_test", 4))
    assert harness.RESULTS == []


def test_bench_step_pair_times_the_baseline_alone_when_the_second_row_cannot_run(harness, monkeypatch):
    """The pair's second row skipping (a capture refused, no fast model: not out of memory) does not throw
    away the baseline already built (on a card a whole-model compile): it is timed alone, saying why."""
    bs = _import_bench_step(monkeypatch)
    make_step = bs.mb.make_step

    def refuse_ours(provider, *a, **kw):
        if provider == "maefast-block":
            raise RuntimeError("capture refused (test)")
        return make_step(provider, *a, **kw)

    monkeypatch.setattr(bs.mb, "make_step", refuse_ours)
    with pytest.raises(pytest.skip.Exception, match="capture refused"):
        bs._train_step_pair(_FakeBenchmark(), torch.device("cpu"), ("mae_vit_tiny_test", 2))
    (alone,) = harness.RESULTS
    assert alone["group"] == "train-step" and alone["provider"] == "sdpa" and alone["time_ms"] > 0
    assert "capture refused" in alone["pair_failed"] and "sdpa timed alone" in alone["pair_failed"]


def _row(group, provider, time_ms, **kw):
    return dict(group=group, provider=provider, time_ms=time_ms, shape=H, shape_key=KEY, **kw)


def _pair(base, ours, base_ms, ours_ms, ratio, lo, hi):
    return [_row("train-step-pair", base, base_ms, baseline=True),
            _row("train-step-pair", ours, ours_ms, paired_with=base, pair_ratio=ratio, pair_ratio_range=[lo, hi],
                 pair_ratio_rounds=[lo, ratio, hi], frac_peak_flops=0.55)]


def test_step_targets_read_the_interleaved_pair():
    """step_vs_torch_native_paired is the pair's median per-round ratio, its spread the rounds' range;
    the pair's base counts as a torch-native row (the step preset times the baseline only there); the peak
    memory comes from the fastest maefast provider's row timed alone."""
    rows = [_row("train-step", "reference", 180.0, peak_mem_gib=34.0),
            _row("train-step", "maefast-block-graph", 92.0, peak_mem_gib=17.0, frac_peak_flops=0.54),
            *_pair("torch-native-graph", "maefast-block-graph", 104.0, 90.0, 1.16, 1.14, 1.18)]
    t = rec.step_targets(rows, "huge:128")[KEY]
    assert t["torch_native_best"] == "torch-native-graph (paired)"
    # maefast-block-graph timed alone is read from that row, not the faster of its two timings
    assert t["maefast_best"] == "maefast-block-graph"
    assert t["step_vs_torch_native"]["value"] == round(104.0 / 92.0, 4)
    paired = t["step_vs_torch_native_paired"]
    assert paired["value"] == 1.16 and paired["met"] is True and paired["spread"] == [1.14, 1.18]
    assert paired["within_noise"] is True and paired["pair"] == "torch-native-graph / maefast-block-graph"
    assert paired["rounds"] == 3
    assert t["peak_mem_vs_reference"]["value"] == 0.5  # 17 / 34: the provider's own row
    assert t["rows"]["maefast-block-graph (paired)"]["pair_ratio"] == 1.16
    assert "pair_ratio" not in t["rows"]["maefast-block-graph"]
    assert t["mfu"]["value"] == 0.54  # the row timed alone
    t = rec.step_targets(rows[:1] + rows[2:], "huge:128")[KEY]  # timed only in the pair: its pair row
    assert t["maefast_best"] == "maefast-block-graph (paired)" and t["mfu"]["value"] == 0.55
    # clear of the spread either way: not within the noise
    t = rec.step_targets(rows[:2] + _pair("torch-native-graph", "maefast-block-graph", 104.0, 85.0, 1.22, 1.2, 1.25),
                         "huge:128")[KEY]
    assert t["step_vs_torch_native_paired"]["within_noise"] is False


def test_step_targets_without_or_with_an_unpaired_provider():
    """No pair: the paired target is missing with the reason; ours timed only in the pair: the memory
    target says why it has no figure; a pair of two maefast rows (the attention route's) is no baseline
    pair, and of several baseline pairs the one maefast wins least is judged."""
    rows = [_row("train-step", "reference", 180.0, peak_mem_gib=34.0),
            _row("train-step", "maefast-graph", 100.0, peak_mem_gib=20.0),
            _row("train-step", "torch-native-graph", 104.0)]
    t = rec.step_targets(rows, "huge:128")[KEY]
    assert t["step_vs_torch_native_paired"]["met"] is None
    assert "test_train_step_pair" in t["step_vs_torch_native_paired"]["reason"]
    t = rec.step_targets(rows[:1] + _pair("torch-native-graph", "maefast-block-graph", 104.0, 90.0, 1.16, 1.1, 1.2),
                         "huge:128")[KEY]
    assert t["peak_mem_vs_reference"]["met"] is None and "only in the interleaved pair" in \
        t["peak_mem_vs_reference"]["reason"]
    route = _pair("maefast-graph", "maefast-sdpa-graph", 114.0, 111.0, 1.027, 1.02, 1.03)
    assert rec.step_targets(rows + route, "huge:128")[KEY]["step_vs_torch_native_paired"]["met"] is None
    two = (_pair("torch-native-graph", "maefast-block-graph", 104.0, 90.0, 1.16, 1.1, 1.2)
           + _pair("sdpa", "maefast-graph", 140.0, 100.0, 1.4, 1.3, 1.5))
    assert rec.step_targets(rows + two, "huge:128")[KEY]["step_vs_torch_native_paired"]["value"] == 1.16
    assert "step_vs_torch_native_paired" in rec.step_targets([], "huge:128")["(huge:128)"]


def test_attention_route_reads_the_interleaved_pair_first():
    """The profile preset times maefast-graph and maefast-sdpa-graph as an interleaved pair: the route
    reads its per-round ratios (every round on the winner's side, 2% in the median) before any rows
    timed one after the other, whichever way round the pair was named."""
    apart = [_row("train-step", "maefast-graph", 114.0, time_p20_ms=113.9, time_p80_ms=114.2),
             _row("train-step", "maefast-sdpa-graph", 116.5, time_p20_ms=116.4, time_p80_ms=116.7)]
    assert rec.attention_route(apart, "huge:128")["faster"] == "triton"
    r = rec.attention_route(apart + _pair("maefast-graph", "maefast-sdpa-graph", 114.0, 111.0, 1.027, 1.01, 1.04),
                            "huge:128")
    assert r["timing"] == "interleaved pair" and r["faster"] == "sdpa" and r["sdpa_speedup"] == 1.027
    assert r["rows"]["triton"]["time_ms"] == 114.0 and r["rows"]["sdpa"]["time_ms"] == 111.0
    straddle = _pair("maefast-graph", "maefast-sdpa-graph", 114.0, 111.0, 1.027, 0.99, 1.04)  # one round lost
    assert rec.attention_route(straddle, "huge:128")["faster"] is None
    flipped = _pair("maefast-sdpa-graph", "maefast-graph", 116.5, 114.0, 1.022, 1.021, 1.03)  # triton is ours
    r = rec.attention_route(flipped, "huge:128")
    assert r["faster"] == "triton" and r["sdpa_speedup"] == round(1 / 1.022, 4)
    assert rec.attention_route(apart, "huge:128")["timing"] == "rows timed one after the other"


def test_torch_native_ratios_take_the_fastest_native_row():
    from maefast import bench as mb

    rows = [_row("train-step", "sdpa", 140.0), _row("train-step", "torch-native-graph", 104.0),
            _row("train-step-pair", "torch-native-graph", 106.0), _row("train-step", "maefast-graph", 80.0)]
    mb.torch_native_ratios(rows)
    assert rows[3]["speedup_vs_best_torch_native"] == pytest.approx(104 / 80)


def test_summary_percentiles():
    s = timing._summary([float(x) for x in range(1, 11)])
    assert (s["p20_ms"], s["median_ms"], s["p80_ms"]) == (3.0, 5.5, 8.0)


# -- maefast.timing's summaries, CPU timer, measured peak and ratios (from a mutation audit: each of these
#    passed a wrong index, factor, keyword or comparison) --

def test_summary_min_and_mean():
    s = timing._summary([6.0, 1.0, 2.0])
    assert (s["min_ms"], s["median_ms"], s["mean_ms"], s["reps"]) == (1.0, 2.0, 3.0, 3)


def test_time_cpu_warms_up_then_times_min_reps_to_max_reps_within_its_budget(monkeypatch):
    """`warmup` untimed calls; then timed calls until `budget_s` is spent (at least `min_reps`, at most
    `max_reps`); ms per call."""
    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    calls = []

    def fn():
        calls.append(clock["t"])
        clock["t"] += 0.002  # 2 ms a call

    s = timing.time_cpu(fn, warmup=2, min_reps=3, max_reps=20, budget_s=0.011)
    assert len(calls) == 2 + 6 and s["reps"] == 6  # the budget, from after the warm-up: 6 calls to pass 11 ms
    assert s["median_ms"] == pytest.approx(2.0) and s["min_ms"] == pytest.approx(2.0)
    assert timing.time_cpu(fn, warmup=0, min_reps=1, max_reps=4, budget_s=10.0)["reps"] == 4
    assert timing.time_cpu(fn, warmup=0, min_reps=3, max_reps=20, budget_s=0.0)["reps"] == 3


def test_time_interleaved_rounds_the_calls_per_round_to_the_nearest(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])

    def fn():
        clock["t"] += 0.006  # 6 ms a call

    (a,) = timing.time_interleaved([fn], "cpu", rounds=1, round_ms=10.0, warmup_ms=0.0)
    assert a["calls_per_round"] == 2  # 10 ms / 6 ms = 1.67 calls: 2, not 1


def test_time_fn_gives_the_cpu_timer_its_own_keywords(monkeypatch):
    seen = {}
    monkeypatch.setattr(timing, "time_cpu", lambda fn, **kw: seen.update(kw) or timing._summary([1.0]))
    timing.time_fn(lambda: None, "cpu", warmup_ms=200.0, rep_ms=200.0, min_reps=5, flush_l2=False, budget_s=0.3)
    assert seen == {"min_reps": 5, "budget_s": 0.3}  # measure_peak's keywords: the CUDA ones dropped


def test_measure_peak_counts_2mnk_flops_over_the_fastest_call_and_read_plus_write_bytes(monkeypatch):
    """The CPU's branch (fp32 1024^3 matmul, a 2^23-float copy) with its timer faked: each call's fastest
    time 2 ms, median 4 ms. FLOPs 2*M*N*K over the fastest matmul call (a median under a ramping clock
    understates the peak); bytes read + written over the copy's median; cached, the caller gets a copy."""
    seen = []

    def fake_time_fn(fn, dev, **kw):
        seen.append(kw)
        return {"median_ms": 4.0, "min_ms": 2.0}

    monkeypatch.setattr(timing, "time_fn", fake_time_fn)
    monkeypatch.setattr(timing, "_PEAK", {})
    tflops = 2 * 1024**3 / 2e-3 / 1e12
    for _ in range(3):  # measured by the first call; each call gives its caller a copy of the cached peak
        p = timing.measure_peak("cpu")
        assert p["matmul_tflops"] == pytest.approx(tflops) and p["matmul_shapes"] == [[1024, 1024, 1024]]
        assert p["copy_gbps"] == pytest.approx(2 * 2**23 * 4 / 4e-3 / 1e9) and p["copy_bytes"] == 2**23 * 4
        p["matmul_tflops"] = 0.0
    assert len(seen) == 2  # one copy and one matmul, timed once


def test_measure_peak_is_the_fastest_rate_over_its_matmul_shapes(monkeypatch):
    """A card times two matmuls (8192^3 and ViT-H's MLP product): the peak is the higher of the two
    rates, whichever shape gave it, not the last one timed. The CPU's setup with two small shapes and a
    timer that makes the first shape's rate the highest."""
    shapes = ((64, 32, 16), (32, 16, 8))
    times = iter([1.0, 1.0, 1.0])  # the copy, then each matmul's fastest call: 1 ms each

    monkeypatch.setattr(timing, "time_fn", lambda fn, dev, **kw: {"median_ms": 1.0, "min_ms": next(times)})
    monkeypatch.setattr(timing, "_PEAK", {})
    monkeypatch.setitem(timing._PEAK_SETUP, "cpu", (1024, torch.float32, shapes))
    p = timing.measure_peak("cpu")
    assert p["matmul_tflops"] == pytest.approx(2 * 64 * 32 * 16 / 1e-3 / 1e12)  # 8x the second's FLOPs
    assert p["matmul_shapes"] == [[64, 32, 16], [32, 16, 8]] and p["matmul_n"] == 64 and p["copy_bytes"] == 4096
    monkeypatch.setattr(timing, "_PEAK", {})
    times = iter([1.0, 1.0, 0.01])  # the second shape now 100x faster a call: 12.5x the first's rate
    assert timing.measure_peak("cpu")["matmul_tflops"] == pytest.approx(2 * 32 * 16 * 8 / 1e-5 / 1e12)


def test_throughput_fractions_are_of_their_own_peaks_and_the_ridge_point():
    peak = {"matmul_tflops": 100.0, "copy_gbps": 2000.0, "matmul_spec_tflops": 200.0}
    out = timing.throughput(2.0, flops=1e11, bytes_moved=2e9, peak=peak)  # 50 TFLOP/s, 1000 GB/s
    assert out == pytest.approx({"tflops": 50.0, "frac_peak_flops": 0.5, "frac_spec_flops": 0.25, "gbps": 1000.0,
                                 "frac_peak_bw": 0.5})
    assert timing.throughput(2.0, flops=1e11) == pytest.approx({"tflops": 50.0})  # no peak: the rates alone
    assert timing.ridge_point(peak) == pytest.approx(50.0)  # FLOP/byte: 100e12 / 2000e9


def test_speedup_never_sets_a_graph_replay_against_an_eager_time():
    graph_only = {"time_ms": 2.0, "cuda_graph": True}  # captured, no eager time recorded
    eager = {"time_ms": 4.0, "cuda_graph": False}
    assert timing.speedup(graph_only, eager) is None and timing.speedup(eager, graph_only) is None
    assert timing.speedup(dict(graph_only, eager_time_ms=6.0), eager) == pytest.approx(1.5)


def test_best_rival_skips_the_rivals_it_cannot_compare_with():
    row = {"time_ms": 2.0, "cuda_graph": False}
    rivals = [{"time_ms": 3.0, "cuda_graph": False}, {"time_ms": 1.0, "cuda_graph": True}, {"time_ms": 5.0}]
    rival, x = timing.best_rival(rivals, row)
    assert rival is rivals[0] and x == pytest.approx(1.5)  # the closest comparable rival; the graph-only one skipped
    assert timing.best_rival([rivals[1]], row) is None


def test_spec_peak_reads_the_most_specific_card_name():
    assert timing.spec_bf16_tflops("NVIDIA H100 PCIe") == 756.5 and timing.spec_bf16_tflops("NVIDIA H100 NVL") == 835.5
    assert timing.spec_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert timing.spec_bf16_tflops("NVIDIA H200 NVL") == 835.5 and timing.spec_bf16_tflops("NVIDIA H200") == 989.4
    assert timing.spec_bf16_tflops("NVIDIA GB200") == 2500.0 and timing.spec_bf16_tflops("Tesla T4") is None
