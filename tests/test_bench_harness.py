"""benchmarks/_harness.py beyond test_bench.py's bookkeeping checks (from a mutation audit: each of these
passed a swapped ratio, a dropped field or a flipped condition): the CUDA-graph timing path of run_bench
(on the CPU with a stand-in capture and timer), the ratio directions, the fields a row records, which
provider rows run where, and the bench_step fields of an fp16 row (GradScaler skips) and of a row timed
alone (best torch-native)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from maefast import bench as mb
from maefast import timing
from test_bench import _FakeBenchmark, harness  # noqa: F401 - the harness fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK = {"matmul_tflops": 4.0, "copy_gbps": 100.0}


@pytest.fixture
def bench_harness(request):
    """test_bench.py's `harness` fixture: benchmarks/_harness.py with an empty result list."""
    return request.getfixturevalue("harness")


@pytest.fixture
def fake_cuda(bench_harness, monkeypatch):
    """run_bench on a device "cuda" with stand-ins: the timer answers 8 ms for the eager fn and 2 ms for
    the graph replay (`cuda_graphed` wraps fn; `fail` makes the capture raise), no device calls."""
    state = {"fail": False, "timed": []}

    def time_fn(fn, dev, **kw):
        graphed = getattr(fn, "replay_of", None) is not None
        state["timed"].append("graph" if graphed else "eager")
        ms = 2.0 if graphed else 8.0
        return {"median_ms": ms, "min_ms": ms / 2, "p20_ms": ms, "p80_ms": ms, "reps": 5}

    def cuda_graphed(fn):
        if state["fail"]:
            raise RuntimeError("operation not permitted when stream is capturing")

        def replay():
            fn()
        replay.replay_of = fn
        return replay

    monkeypatch.setattr(bench_harness.timing, "time_fn", time_fn)
    monkeypatch.setattr(bench_harness.timing, "synchronize", lambda dev=None: None)
    monkeypatch.setattr(bench_harness.timing, "measure_peak", lambda dev=None: dict(PEAK))
    monkeypatch.setattr(bench_harness.timing, "env_info", lambda dev=None: {"card": "fake", "device": "cuda"})
    monkeypatch.setattr(bench_harness, "cuda_graphed", cuda_graphed)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: None)
    monkeypatch.delenv("MAEFAST_BENCH_EAGER", raising=False)
    return state


def test_run_bench_times_the_graph_replay_and_keeps_the_eager_time(bench_harness, fake_cuda, monkeypatch):
    """cuda_graph=True: time_ms is the replay's median, eager_time_ms the eager median; a capture that fails
    leaves the eager time as time_ms and says cuda_graph False; MAEFAST_BENCH_EAGER=1 times eagerly only."""
    info = bench_harness.run_bench(_FakeBenchmark(), lambda: None, group="g", provider="p", shape=(1,), device="cuda",
                             cuda_graph=True, flops=4e9)
    assert (info["time_ms"], info["eager_time_ms"], info["cuda_graph"]) == (2.0, 8.0, True)
    assert fake_cuda["timed"] == ["eager", "graph"] and info["tflops"] == pytest.approx(2.0)
    fake_cuda["fail"] = True
    info = bench_harness.run_bench(_FakeBenchmark(), lambda: None, group="g", provider="q", shape=(1,), device="cuda",
                             cuda_graph=True)
    assert (info["time_ms"], info["eager_time_ms"], info["cuda_graph"]) == (8.0, 8.0, False)
    monkeypatch.setenv("MAEFAST_BENCH_EAGER", "1")
    fake_cuda["fail"], fake_cuda["timed"] = False, []
    info = bench_harness.run_bench(_FakeBenchmark(), lambda: None, group="g", provider="r", shape=(1,), device="cuda",
                             cuda_graph=True)
    assert (info["time_ms"], info["eager_time_ms"], info["cuda_graph"]) == (8.0, None, False)
    assert fake_cuda["timed"] == ["eager"]


def test_ratios_point_from_the_baseline_and_match_shapes_in_any_key_order(bench_harness):
    """speedup_vs_baseline and eager_speedup_vs_baseline are baseline time / this time (> 1: faster than the
    baseline); a shape dict written in another key order is the same shape; a row with no time gets none."""
    base = dict(group="g", shape_key=bench_harness._shape_key({"N": 2, "L": 4}), provider="ref", baseline=True,
                time_ms=4.0, cuda_graph=True, eager_time_ms=12.0)
    fast = dict(group="g", shape_key=bench_harness._shape_key({"L": 4, "N": 2}), provider="x", baseline=False,
                time_ms=2.0, cuda_graph=True, eager_time_ms=4.0)
    untimed = dict(group="g", shape_key=base["shape_key"], provider="y", baseline=False, time_ms=None)
    bench_harness.RESULTS.extend([base, fast, untimed])
    bench_harness.update_ratios()
    assert fast["speedup_vs_baseline"] == pytest.approx(2.0) and fast["eager_speedup_vs_baseline"] == 3.0
    assert fast["baseline_provider"] == "ref" and "speedup_timing" not in fast
    assert "speedup_vs_baseline" not in untimed


def test_record_row_records_the_environment_and_both_fractions_of_the_peak(bench_harness, monkeypatch):
    monkeypatch.setattr(timing, "measure_peak", lambda dev=None: dict(PEAK))
    info = bench_harness.record_row({}, {"median_ms": 2.0, "min_ms": 1.0, "p20_ms": 1.5, "p80_ms": 3.0, "reps": 5},
                              group="g", provider="p", flops=4e9, bytes_moved=1e8, shape=(1,), device="cpu", timer="t")
    assert info["tflops"] == pytest.approx(2.0) and info["frac_peak_flops"] == pytest.approx(0.5)
    assert info["gbps"] == pytest.approx(50.0) and info["frac_peak_bw"] == pytest.approx(0.5)
    assert {"card", "date", "torch", "git_commit"} <= set(info) and bench_harness.RESULTS == [info]


def test_summary_lists_each_groups_baseline_first(bench_harness):
    rows = [dict(group="g", shape_key="k", provider=p, baseline=p == "zz-ref", time_ms=t)
            for p, t in (("a-fast", 1.0), ("zz-ref", 2.0))]
    bench_harness.RESULTS.extend(rows)
    lines = [ln for ln in bench_harness.summary_lines() if ln.startswith("g ")]
    assert [ln.split()[2] for ln in lines] == ["zz-ref", "a-fast"] and lines[1].split()[-3] == "2.00x"


def test_provider_rows_run_where_they_mean_something(bench_harness, monkeypatch):
    """On the CPU: the reference and maefast (auto) rows run, torch.compile only when asked for, Triton
    never (the interpreter's times mean nothing), the CUDA C++ rows never. On a GPU the maefast row is the
    triton and cuda rows. A GPU op row repeats for the rep_ms its benchmark asks."""
    monkeypatch.delenv("MAEFAST_BENCH_COMPILE_CPU", raising=False)
    skip = lambda p, dev="cpu": bench_harness.provider_skip_reason(p, torch.device(dev), "patch_gather")  # noqa: E731
    assert skip("reference") is None and skip("maefast") is None
    assert "MAEFAST_BENCH_COMPILE_CPU" in skip("compile") and "GPU" in skip("triton") and "GPU" in skip("cuda")
    monkeypatch.setenv("MAEFAST_BENCH_COMPILE_CPU", "1")
    assert skip("compile") is None
    assert skip("maefast", "cuda") is not None and skip("compile", "cuda") is None
    from maefast import _cpp_lib  # a built _C without this op's binding: the cuda row cannot run

    monkeypatch.setattr(_cpp_lib, "get_C", lambda: type("C", (), {"unshuffle_fwd": None})())
    assert "GPU" in skip("cuda", "cuda") and harness_reason(bench_harness, "unshuffle_fwd") is None
    assert bench_harness.op_timing(torch.device("cuda"), rep_ms=100.0)["rep_ms"] == 100.0


def harness_reason(h, binding):
    return h.provider_skip_reason("cuda", torch.device("cuda"), binding)


# -- bench_step's fields ---------------------------------------------------------------------------

def _bench_step(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    sys.modules.pop("bench_step", None)
    import bench_step

    return bench_step


def test_an_fp16_step_row_counts_the_steps_its_scaler_skipped(bench_harness, monkeypatch):
    """The official recipe's GradScaler halves its scale at each skipped (inf/NaN) step: a row whose scale
    went 65536 -> 16384 over the timed steps skipped at least 2 of them."""
    bs = _bench_step(monkeypatch)
    try:
        scales = iter([65536.0, 16384.0])
        scaler = type("S", (), {"is_enabled": lambda self: True, "get_scale": lambda self: next(scales)})()
        step = type("T", (), {"scaler": scaler, "dtype": torch.float16})()
        row = type("R", (), {"provider": "reference", "step": step, "__call__": lambda self: None})()
        monkeypatch.setattr(timing, "time_fn", lambda fn, dev, **kw: timing._summary([4.0, 4.0]))
        info = bs._time_alone(_FakeBenchmark(), torch.device("cpu"), row, "mae_vit_tiny_test", 2, 0.0, {})
    finally:
        sys.modules.pop("bench_step", None)
    assert info["grad_scale"] == [65536.0, 16384.0] and info["skipped_steps_min"] == 2
    assert info["baseline"] is True and info["group"] == "train-step"


def test_a_step_row_timed_alone_gets_its_best_torch_native_ratio(bench_harness, monkeypatch):
    """Each step case refreshes speedup_vs_best_torch_native: a maefast row timed after the sdpa row
    (torch-native without compile, the only native row on the CPU) carries sdpa time / its time."""
    bs = _bench_step(monkeypatch)
    times = {"sdpa": 6.0, "maefast": 3.0}
    try:
        for provider in ("sdpa", "maefast"):
            monkeypatch.setattr(timing, "time_fn", lambda fn, dev, t=times[provider], **kw: timing._summary([t]))
            try:  # a skip would pass silently here: neither row compiles, both run on the CPU
                bs.test_train_step(_FakeBenchmark(), torch.device("cpu"), ("mae_vit_tiny_test", 2), provider)
            except pytest.skip.Exception as e:
                pytest.fail(f"{provider} skipped on the CPU: {e}")
    finally:
        sys.modules.pop("bench_step", None)
    sdpa, ours = bench_harness.RESULTS
    assert sdpa["provider"] == "sdpa" and ours["best_torch_native_provider"] == "sdpa"
    assert ours["speedup_vs_best_torch_native"] == pytest.approx(2.0)
    assert mb.TORCH_NATIVE_ROWS and "sdpa" in mb.TORCH_NATIVE_ROWS


# -- benchmarks/conftest.py's hooks ----------------------------------------------------------------

def _bench_conftest(monkeypatch):
    """benchmarks/conftest.py loaded as a module of its own (its hooks called directly)."""
    import importlib.util

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("maefast_bench_conftest", os.path.join(ROOT, "benchmarks",
                                                                                         "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Config:
    def __init__(self, **opts):
        self.opts = opts

    def getoption(self, name):
        return self.opts.get(name)

    def addinivalue_line(self, *a):
        pass


def test_each_finished_case_appends_its_own_rows_once(bench_harness, monkeypatch, tmp_path):
    """MAEFAST_BENCH_ROWS: a case that recorded two rows (bench_step's pair) appends both, named by its test;
    the next case appends only its own."""
    import json

    ct = _bench_conftest(monkeypatch)
    path = tmp_path / "rows.jsonl"
    monkeypatch.setenv("MAEFAST_BENCH_ROWS", str(path))
    item = lambda nodeid: type("Item", (), {"nodeid": nodeid})()  # noqa: E731
    row = lambda p: dict(group="g", shape_key="k", provider=p, baseline=p == "a", time_ms=1.0)  # noqa: E731
    bench_harness.RESULTS.extend([row("a"), row("b")])
    ct.pytest_runtest_teardown(item("t::pair"), None)
    ct.pytest_runtest_teardown(item("t::nothing"), None)
    bench_harness.RESULTS.append(row("c"))
    ct.pytest_runtest_teardown(item("t::one"), None)
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [(r["provider"], r["test"]) for r in rows] == [("a", "t::pair"), ("b", "t::pair"), ("c", "t::one")]


def test_session_options_gpu_sizes_and_the_budget(bench_harness, monkeypatch):
    """--gpu selects the GPU sizes (and skips every case where torch sees no GPU); --bench-budget-s skips
    the cases that start after it is spent, not those before."""
    ct = _bench_conftest(monkeypatch)
    monkeypatch.setattr(bench_harness, "_GPU_MODE", False)
    ct.pytest_configure(_Config(**{"--gpu": True}))
    assert bench_harness.gpu_mode() and bench_harness.sizes(cpu=[1], gpu=[2]) == [2]
    marked = []
    items = [type("Item", (), {"keywords": {}, "add_marker": lambda self, m: marked.append(m)})()]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ct.pytest_collection_modifyitems(_Config(**{"--gpu": True}), items)
    assert len(marked) == 1 and "GPU" in marked[0].kwargs["reason"]
    ct.pytest_configure(_Config(**{"--gpu": False}))
    assert not bench_harness.gpu_mode()
    item = type("Item", (), {"config": _Config(**{"--bench-budget-s": 1e6})})()
    try:
        ct.pytest_runtest_setup(item)
    except pytest.skip.Exception:
        pytest.fail("a case that starts with budget left was skipped")
    item.config = _Config(**{"--bench-budget-s": 0.0})
    with pytest.raises(pytest.skip.Exception, match="budget"):
        ct.pytest_runtest_setup(item)


def test_the_json_gets_the_ratios_computed_after_each_case(bench_harness, monkeypatch):
    """pytest-benchmark saved each case's extra_info when the case ended: the hook writes the refreshed
    records (a baseline timed after a row gives that row its speed-up only at the end) and the rows no
    benchmark holds."""
    ct = _bench_conftest(monkeypatch)
    if not ct.HAVE_PYTEST_BENCHMARK:
        pytest.skip("pytest-benchmark is not installed: the stand-in writes its JSON at the session's end")
    monkeypatch.setattr(bench_harness, "session_record", lambda: {"env": {}})
    fast = dict(group="g", shape_key="k", provider="x", baseline=False, time_ms=1.0)
    base = dict(group="g", shape_key="k", provider="ref", baseline=True, time_ms=3.0)
    pair_row = dict(group="g2", shape_key="k", provider="y", baseline=True, time_ms=1.0)
    bench_harness.RESULTS.extend([fast, base, pair_row])
    benches = [type("B", (), {"fullname": n, "extra_info": e})() for n, e in (("t::x", fast), ("t::ref", base))]
    out = {"benchmarks": [{"fullname": "t::x", "extra_info": {"provider": "x"}}, {"fullname": "t::ref"}]}
    ct.pytest_benchmark_update_json(None, benches, out)
    assert out["benchmarks"][0]["extra_info"]["speedup_vs_baseline"] == pytest.approx(3.0)
    assert out["maefast"]["other_rows"] == [pair_row]
