"""pytest setup for `benchmarks/`: `--gpu` selects the GPU sizes; every result records card, date,
versions, commit and the card's measured peak; speed-ups against the baseline of the same run are
written into the JSON (`--benchmark-json`) and printed as a short table at the end. With
MAEFAST_BENCH_ROWS=path each finished case is also appended to that file as one JSON line, so a run
killed at a time limit (scripts/gpu_check.py) keeps every row it finished."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates anything, so before maefast (via _harness) is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import _harness  # noqa: E402

try:  # the GPU machine may lack pytest-benchmark: then a minimal stand-in below keeps the suite running
    if os.environ.get("MAEFAST_NO_PYTEST_BENCHMARK") == "1":
        raise ImportError("MAEFAST_NO_PYTEST_BENCHMARK=1")
    import pytest_benchmark  # noqa: F401
    HAVE_PYTEST_BENCHMARK = True
except ImportError:
    HAVE_PYTEST_BENCHMARK = False


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False,
                     help="maefast: run the GPU-sized benchmark cases (default: CPU-sized cases)")
    if not HAVE_PYTEST_BENCHMARK:
        parser.addoption("--benchmark-json", default=None, help="maefast stand-in (pytest-benchmark not installed)")
        parser.addoption("--benchmark-disable", action="store_true", default=False, help="accepted, no effect")
    parser.addoption("--bench-budget-s", type=float, default=None,
                     help="maefast: skip the remaining cases once this many seconds have passed since the session "
                          "started (what ran is still reported and saved); list the files in priority order")


def pytest_configure(config):
    _harness.configure(gpu=config.getoption("--gpu"))
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped with the reason when none is present)")


def pytest_collect_file(file_path, parent):
    # bench files are named bench_*.py (not test_*.py): collect them here, without touching the
    # project's python_files setting; an explicitly named file is already collected by pytest.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    if config.getoption("--gpu") and not torch.cuda.is_available():
        reason = "--gpu selects GPU-sized cases but torch.cuda.is_available() is False"
    for item in items:
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
        elif "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))


_SESSION_START = time.monotonic()


def pytest_runtest_setup(item):
    budget = item.config.getoption("--bench-budget-s")
    if budget is not None and time.monotonic() - _SESSION_START > budget:
        pytest.skip(f"--bench-budget-s {budget:g} spent")


_ROWS_WRITTEN = 0


def pytest_runtest_teardown(item, nextitem):
    """Appends the rows this case added (complete: a bench file adds its own fields, e.g. img_per_s,
    before the case ends) to MAEFAST_BENCH_ROWS."""
    global _ROWS_WRITTEN
    path = os.environ.get("MAEFAST_BENCH_ROWS")
    new = _harness.RESULTS[_ROWS_WRITTEN:]
    if not path or not new:
        return
    _harness.update_ratios()
    with open(path, "a") as fh:
        for r in new:
            fh.write(json.dumps(dict(r, test=item.nodeid), default=str) + "\n")
    _ROWS_WRITTEN = len(_harness.RESULTS)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present (CPU-sized cases run there too unless --gpu), else the CPU."""
    return _harness.bench_device()


@pytest.fixture(scope="session")
def gpu_sizes() -> bool:
    return _harness.gpu_mode()


@pytest.fixture(scope="session")
def card_peak(device) -> dict:
    """The card's measured peak (copy GB/s, matmul TFLOP/s), once per session."""
    from maefast import timing

    return timing.measure_peak(device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


if HAVE_PYTEST_BENCHMARK:
    def pytest_benchmark_update_machine_info(config, machine_info):
        machine_info["maefast"] = _harness.session_record()

    def pytest_benchmark_update_json(config, benchmarks, output_json):
        _harness.update_ratios()
        # extra_info dicts are shared with _harness.RESULTS, but the JSON holds copies: refresh them.
        by_name = {b.get("fullname"): b for b in output_json.get("benchmarks", [])}
        for bench in benchmarks:
            entry = by_name.get(getattr(bench, "fullname", None))
            if entry is not None:
                entry["extra_info"] = dict(bench.extra_info)
        output_json["maefast"] = {**_harness.session_record(), "summary": _harness.summary_lines(),
                                  "other_rows": _harness.other_rows([b.extra_info for b in benchmarks])}
else:
    class _StandInBenchmark:
        """What run_bench needs from pytest-benchmark's fixture: pedantic, group, extra_info."""

        def __init__(self, fullname: str):
            self.fullname, self.name = fullname, fullname.split("::")[-1]
            self.group, self.extra_info = None, {}

        def pedantic(self, fn, args=(), kwargs=None, rounds=1, iterations=1, warmup_rounds=0, **_):
            for _ in range(warmup_rounds + rounds * iterations):
                fn(*args, **(kwargs or {}))

    _STAND_INS: list = []

    @pytest.fixture
    def benchmark(request):
        b = _StandInBenchmark(request.node.nodeid)
        _STAND_INS.append(b)
        return b

    def pytest_sessionfinish(session, exitstatus):
        path = session.config.getoption("--benchmark-json")
        if not path or not _STAND_INS:
            return
        import json

        _harness.update_ratios()
        rec = _harness.session_record()
        out = {"machine_info": {"maefast": rec}, "note": "pytest-benchmark not installed: maefast's stand-in JSON",
               "benchmarks": [{"name": b.name, "fullname": b.fullname, "group": b.group, "extra_info": b.extra_info}
                              for b in _STAND_INS if b.extra_info],
               "maefast": {**rec, "summary": _harness.summary_lines(),
                           "other_rows": _harness.other_rows([b.extra_info for b in _STAND_INS])}}
        with open(path, "w") as fh:
            json.dump(out, fh, indent=2, default=str)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = _harness.summary_lines()
    if lines:
        terminalreporter.write_sep("-", "maefast benchmark summary (time = median; speedup = baseline/this)")
        for line in lines:
            terminalreporter.write_line(line)
