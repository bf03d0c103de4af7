"""The commit a measurement records. No torch import: scripts/gpu_record.py loads this file by path, so
a GPU record names its commit even where torch fails to import."""
from __future__ import annotations

import os
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
    MAEFAST_COMMIT=<sha>), MAEFAST_COMMIT; else 'unknown'. The checkout wins over the variable, so one
    left set in a shell cannot name the wrong commit."""
    top = _git("rev-parse", "--show-toplevel")
    sha = _git("rev-parse", "HEAD") if top and os.path.realpath(top) == os.path.realpath(_REPO_ROOT) else None
    if sha and len(sha) == 40 and all(c in "0123456789abcdef" for c in sha):
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return sha + ("-dirty" if dirty else "")
    return os.environ.get("MAEFAST_COMMIT") or "unknown"
