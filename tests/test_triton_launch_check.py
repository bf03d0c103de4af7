"""tests/conftest.py fails a test parametrized impl="triton" that launched no Triton kernel under the
interpreter (an op that quietly ran the reference would compare the reference with itself and pass),
unless it is marked no_triton_launch (a refusal). Checked by running tests/conftest.py as a plugin
over a file of probe tests."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBES = '''
import pytest
import torch


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_runs_nothing(impl):
    assert torch.ones(2).sum() == 2


@pytest.mark.no_triton_launch
@pytest.mark.parametrize("impl", ["triton"])
def test_a_refusal(impl):
    assert True


@pytest.mark.parametrize("impl", ["triton"])
def test_skipped(impl):
    pytest.skip("a skip is not judged")


@pytest.fixture
def launched_in_setup(impl):
    from maefast.ops import unshuffle
    ids = torch.argsort(torch.rand(2, 5), 1)
    return unshuffle(torch.randn(2, 3, 8), torch.randn(1, 1, 8), ids, torch.randn(1, 6, 8), impl=impl)


@pytest.mark.parametrize("impl", ["triton"])
def test_launched_by_a_fixture(impl, launched_in_setup):
    assert launched_in_setup.shape == (2, 6, 8)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_launches(impl):
    from maefast.ops import unshuffle
    n, k, length, d = 2, 3, 5, 8
    ids = torch.argsort(torch.rand(n, length), 1)
    unshuffle(torch.randn(n, k, d), torch.randn(1, 1, d), ids, torch.randn(1, length + 1, d), impl=impl)
'''


def test_a_triton_case_that_launches_nothing_fails(tmp_path):
    pytest.importorskip("triton")
    (tmp_path / "test_probes.py").write_text(PROBES)
    env = dict(os.environ, TRITON_INTERPRET="1", MAEFAST_MEMCHECK="0",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rA", "-q",
                        "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path / "test_probes.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    outcome = {}
    for line in out.splitlines():
        for word in ("PASSED", "FAILED"):
            if line.startswith(word + " "):
                outcome[line.split()[1].split("::")[-1]] = word
    assert outcome == {"test_runs_nothing[reference]": "PASSED", "test_runs_nothing[triton]": "FAILED",
                       "test_a_refusal[triton]": "PASSED", "test_launched_by_a_fixture[triton]": "PASSED",
                       "test_launches[reference]": "PASSED",
                       "test_launches[triton]": "PASSED"}, out
    assert "1 skipped" in out and "no Triton kernel was launched" in out and r.returncode == 1, out
