"""`run_cli`: a maefast command run as a user runs it (shared by the CLI tests)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """`python -m maefast ...` on this checkout, without the tests' TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "maefast", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)
