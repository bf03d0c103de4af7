"""pytest plugin for scripts/gpu_check.py (`-p pytest_deadline`, with scripts/ on PYTHONPATH): once
MAEFAST_DEADLINE (seconds since the epoch) has passed, every test not yet started is skipped, so a
step cut short by its time budget still ends normally and writes its reports (junit XML, benchmark
JSON). Under pytest-xdist every worker loads it and reads the same absolute deadline."""
from __future__ import annotations

import os
import time

import pytest


def pytest_runtest_setup(item):
    deadline = os.environ.get("MAEFAST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("gpu_check: this step's time budget is spent")
