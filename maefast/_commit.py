"""What every measurement's record names about where it ran, without torch: the commit and the machine's
runtime. No torch import: scripts/gpu_record.py loads this file by path, so a GPU record names both even
where torch fails to import; maefast.timing.env_info records the same for every benchmark row."""
from __future__ import annotations

import os
import platform
import re
import subprocess

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_commit() -> str:
    """HEAD of this maefast checkout (+ '-dirty' when tracked files differ); where the tree is not a git
    checkout of its own (the GPU machine's copy has no .git: scripts/gpu_check.sh is run with
    MAEFAST_COMMIT=<sha>), MAEFAST_COMMIT when it is a commit (7-40 hex digits, optionally '-dirty');
    else 'unknown'. The checkout wins over the variable, so one left set in a shell cannot name the wrong
    commit."""
    top = _git("rev-parse", "--show-toplevel")
    sha = _git("rev-parse", "HEAD") if top and os.path.realpath(top) == os.path.realpath(_REPO_ROOT) else None
    if sha and len(sha) == 40 and all(c in "0123456789abcdef" for c in sha):
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return sha + ("-dirty" if dirty else "")
    given = os.environ.get("MAEFAST_COMMIT", "")
    return given if re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", given) else "unknown"


def runtime() -> dict:
    """uname -r and what it says about the sandbox: gVisor reports kernel 4.4.0 (every eager kernel
    launch is expensive there, which flatters graphed rows), the lent Firecracker VMs an '-fc' kernel."""
    rel = platform.release()
    kind = "gvisor" if rel.startswith("4.4.0") else "firecracker" if "-fc" in rel else "unknown"
    return {"uname_r": rel, "runtime": kind}
