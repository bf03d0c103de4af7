"""Running `maefast train` / `maefast visualize` as a user does, in a subprocess (shared by the CLI,
signal, resume and fault tests)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tiny CPU model, no bar / plot / export: a step takes milliseconds
TINY = ["--model", "tiny", "--data", "synthetic", "--device", "cpu", "--workers", "0", "--no-progress", "--no-plot",
        "--no-export"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def command(*args: str, nproc: int = 0) -> list[str]:
    """``python -m maefast ARGS`` or, with ``nproc``, the same under torchrun (gloo on the CPU)."""
    if nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                "maefast", *args]
    return [sys.executable, "-m", "maefast", *args]


def cli(*args: str, nproc: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args, nproc=nproc), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def start(*args: str, nproc: int = 0, **kw) -> subprocess.Popen:
    """Starts the command in its own session (its process group can be signalled like a terminal's)."""
    return subprocess.Popen(command(*args, nproc=nproc), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def lines(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def wait_for_steps(proc: subprocess.Popen, steps_file, n: int, timeout: float = 240) -> None:
    """Waits until ``steps_file`` holds ``n`` lines (the run is stepping)."""
    deadline = time.monotonic() + timeout
    while len(lines(steps_file)) < n:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {n}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"no {n} steps in {timeout} s")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stderr_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def one_line_error(proc, prog: str = "maefast train", *words: str) -> str:
    """Asserts exit code 2 and exactly one line on stderr, ``prog: error: ...`` naming ``words``."""
    got = stderr_lines(proc.stderr)
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert len(got) == 1 and got[0].startswith(f"{prog}: error: "), proc.stderr[-3000:]
    for w in words:
        assert w in got[0], (w, got[0])
    return got[0]


def assert_states_close(got: dict, want: dict, what: str, lr: float = 1e-3, steps: int = 4) -> None:
    """fp32 closeness of two runs that saw the same samples and masks with another reduction order
    (another world size): the attention KEY biases aside, whose true gradient is 0 (softmax ignores
    them), so they receive rounding noise that Adam scales up to steps of about lr."""
    import torch

    from maefast.testing import assert_close

    assert set(got) == set(want), what
    for k in want:
        a, b = got[k], want[k]
        if k.endswith("attn.qkv.bias"):
            d = a.shape[0] // 3
            assert (a[d:2 * d] - b[d:2 * d]).abs().max().item() <= 2 * lr * steps, f"{what} {k}"
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        assert_close(a, b, torch.float32, name=f"{what} {k}")
