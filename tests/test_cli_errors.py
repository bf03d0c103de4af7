"""Every command's user errors and the CLI's own behaviour, as a user runs them (`python -m maefast ...`
on this checkout): one line on stderr and exit code 2, `--help`/`--version` without work, a closed pipe
quiet. The commands' own tests: tests/test_profile.py, test_bench.py, test_train_cli.py, test_visualize.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cli_run import ROOT, run_cli


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden():
    """Only the reader of stdout leaving ends a command quietly; a BrokenPipeError from elsewhere (a
    worker's pipe, a socket) is a traceback as before."""
    from maefast.cli import guarded

    def fn(argv):
        raise BrokenPipeError("a worker's pipe")

    with pytest.raises(BrokenPipeError, match="a worker's pipe"):
        guarded("maefast x", fn, [])


def test_profile_broken_pipe_is_quiet():
    """`maefast profile | head -1`: the reader goes away; no traceback (it was a BrokenPipeError)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(f"{sys.executable} -m maefast profile --model tiny --steps 1 --warmup 0 | head -1",
                       shell=True, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.stdout.startswith("maefast profile on") and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args,needle", [
    (["profile", "--batch", "0"], "--batch must be a finite number > 0"),  # 0 was replaced by the default
    (["profile", "--warmup", "-1"], "--warmup must be a finite number >= 0"),
    (["profile", "--dtype", "foo"], "--dtype must be one of"),
    (["profile", "--device", "foo"], "--device must name a torch device"),
    (["profile", "--device", "cuda:0"] if not torch.cuda.is_available() else ["profile", "--device", "mps"],
     "--device"),
    (["profile", "--mask-ratio", "1.5"], "--mask-ratio must be in"),
    (["profile", "--model", "tiny", "--mask-ratio", "0.99"], "= 0 patches"),  # the model's patch count
    (["profile", "--json", "/"], "--json '/' is a folder"),
    (["profile", "--json", ""], "--json is empty"),
    (["profile", "--json", __file__], "exists: pass --overwrite to replace it"),
    (["profile", "--trace", __file__], "--trace '" + __file__ + "' exists: pass --overwrite"),
    (["bench", "data", "--json", __file__], "--json '" + __file__ + "' exists: pass --overwrite"),
    (["bench", "table2", "--json", __file__], "exists: pass --overwrite"),
    # JSON text under an image's name (with --overwrite: over the user's picture)
    (["profile", "--json", "/tmp/maefast-x.png", "--overwrite"],
     "--json '/tmp/maefast-x.png': the name's ending '.png' is an image's"),
    (["bench", "data", "--json", "/tmp/x.SVG"], "--json '/tmp/x.SVG': the name's ending '.svg' is an image's"),
    (["profile", "--bogus"], "unrecognized arguments: --bogus"),
    (["bench", "data", "--bogus"], "unrecognized arguments: --bogus"),
    (["bench", "data", "--images", "0"], "--images must be a finite number > 0"),
    (["bench", "data", "--paths", ","], "--paths names no row"),
    (["bench", "data", "--json", "/no/such/dir/x.json"], "--json '/no/such/dir/x.json': the folder"),
    (["bench", "data", "--folder", __file__, "--quick"], "is a file, not a folder"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    (["nope"], "unknown command 'nope'"),
    # two outputs of one run on one name: the JSON replaced the trace just written
    (["profile", "--trace", "/tmp/maefast-same.json", "--json", "/tmp/maefast-same.json"],
     "--json and --trace (auto) name the same file"),
    (["bench", "table2", "--json", "/tmp/maefast-t2.json", "--png", "/tmp/maefast-t2.json"],
     "--json and --png name the same file"),
    (["profile", "--json", "/proc/maefast-x.json"], "cannot write in '/proc'"),  # refused before the work
    # a list naming one thing twice ran and reported it twice
    (["profile", "--impl", "auto,reference,auto"], "--impl names 'auto' twice"),
    (["bench", "table2", "--models", "tiny,mae_vit_tiny_test"], "--models names 'mae_vit_tiny_test' twice (as 'tiny')"),
    (["bench", "table2", "--models", "tiny", "--decoder-depths", "1,01"], "--decoder-depths names 1 twice"),
    (["bench", "table2", "--models", ","], "--models must name at least one model"),  # was an IndexError
    # a ratio so small that it masks nothing: the loss was NaN (visualize, table2) or failed after the setup
    (["profile", "--model", "tiny", "--mask-ratio", "1e-17"], "masks none of the 16 patches"),
    # an image name whose ending is no format written: PNG bytes were written under it
    (["visualize", "--checkpoint", __file__, "--image", __file__, "--out", "/tmp/maefast-x.gif"], "no image format"),
    (["bench", "table2", "--png", "/tmp/maefast-x.jpg"], "end it in .png"),
    # "-" is no stdout here: a file named "-" was written in the working folder
    (["visualize", "--checkpoint", __file__, "--image", __file__, "--out", "-"], "--out -: the output goes to a file"),
    # a count no tensor takes: torch's TypeError "Overflow when unpacking long" was a traceback
    (["profile", "--model", "tiny", "--batch", "99999999999999999999"], "--batch must be < 2**63"),
    # a setting given twice: the last one silently won
    (["bench", "table2", "--models", "tiny", "--override", "depth=1", "--override", "depth=2"],
     "--override names 'depth' twice"),
] + ([] if torch.cuda.is_available() else [  # a backend this machine cannot run: refused before any work
    (["profile", "--impl", "auto,triton"], "--impl triton: impl='triton' is not available"),
    (["bench", "table2", "--models", "tiny", "--quick", "--impl", "triton"], "--impl triton:"),
]))
def test_cli_user_errors_are_one_line_exit_2(args, needle):
    """A user's error in any command: one line on stderr, exit 2, no traceback, before any work."""
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and needle in r.stderr, (r.returncode, r.stderr)


def test_version_and_help_answer_without_work():
    """`maefast --version` prints the version (it was read as an option of profile: "unrecognized arguments")."""
    import maefast

    r = run_cli("--version", timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"maefast {maefast.__version__}", (r.stdout, r.stderr)
    r = run_cli("--help", timeout=120)
    assert r.returncode == 0 and "maefast --version" in r.stdout
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for flag in ("--help", "--version"):  # into a closed pipe: exit 141, quietly (a BrokenPipeError traceback)
        r = subprocess.run(f"{sys.executable} -m maefast {flag} | (exec 0<&-; sleep 0.5); echo ${{PIPESTATUS[0]}}",
                           shell=True, executable="/bin/bash", capture_output=True, text=True, env=env, timeout=120)
        assert r.stdout.strip() == "141" and "Traceback" not in r.stderr, (r.stdout, r.stderr)


def test_positive_is_every_commands_one_number_check():
    """`maefast.cli.positive` (train's config and resume, profile, bench data, table2): finite numbers only
    (numpy's too), an int past float's range refused as a size (math.isfinite raised OverflowError there:
    a traceback), None only where the flag is optional."""
    import numpy as np

    from maefast.cli import positive

    for value, msg in ((np.float32("nan"), "finite number > 0"), (float("inf"), "finite number > 0"),
                       (10 ** 400, "< 2[*][*]63"), (np.uint64(2 ** 63), "< 2[*][*]63"), (0, "finite number > 0"),
                       (-1.0, "finite number > 0")):
        with pytest.raises(ValueError, match=f"--x must be (a )?{msg}"):
            positive("--x", value)
    with pytest.raises(ValueError, match="--x must be a finite number >= 0, got None"):
        positive("--x", None, allow_zero=True, optional=False)
    assert positive("--x", None) is None and positive("--x", 0, allow_zero=True) == 0
    assert positive("--x", np.int64(3)) == 3 and positive("--x", 2.5) == 2.5
