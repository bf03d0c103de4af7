"""maefast/_commit.py, what every measurement's record names about where it ran: the commit of the
checkout (with '-dirty' when tracked files differ) or a valid MAEFAST_COMMIT, and the sandbox runtime."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "maefast", "_commit.py")


def _load_in(folder):
    """maefast/_commit.py as a copy inside `folder`/maefast would run (its repo root is `folder`)."""
    (folder / "maefast").mkdir(parents=True, exist_ok=True)
    path = folder / "maefast" / "_commit.py"
    path.write_text(open(SRC).read())
    ns = {"__file__": str(path), "__name__": "copied_commit"}
    exec(compile(path.read_text(), str(path), "exec"), ns)
    return ns


def _git(folder, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                          cwd=folder, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_checkouts_commit_is_dirty_for_tracked_changes_only(tmp_path, monkeypatch):
    """'-dirty' marks a record measured on code no commit holds; an untracked scratch file (a log, a
    benchmark's JSON) does not change what ran, so it must not mark every record of a run dirty."""
    monkeypatch.setenv("MAEFAST_COMMIT", "ab" * 20)  # a checkout's HEAD wins over the variable
    ns = _load_in(tmp_path)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "x")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert ns["git_commit"]() == head
    (tmp_path / "scratch.json").write_text("{}")
    assert ns["git_commit"]() == head
    with open(tmp_path / "maefast" / "_commit.py", "a") as f:
        f.write("# edited\n")
    assert ns["git_commit"]() == head + "-dirty"


@pytest.mark.parametrize("given,want", [("ab" * 20, "ab" * 20), ("abc1234", "abc1234"),
                                        ("abc1234-dirty", "abc1234-dirty"), ("abc123", "unknown"),
                                        ("ab" * 20 + "a", "unknown"), ("abc1234 and more", "unknown"),
                                        ("ABC1234", "unknown"), ("", "unknown")])
def test_maefast_commit_is_taken_only_when_it_is_a_commit(tmp_path, monkeypatch, given, want):
    """Outside a checkout (the GPU machine's copy) MAEFAST_COMMIT names the commit only when it is one: 7-40
    lower-case hex digits, optionally '-dirty' (gpu_check.sh passes a dirty tree's as such), nothing after."""
    monkeypatch.setenv("MAEFAST_COMMIT", given)
    assert _load_in(tmp_path)["git_commit"]() == want


@pytest.mark.parametrize("release,kind", [("4.4.0", "gvisor"), ("4.4.1", "unknown"), ("4.40.0", "unknown"),
                                          ("6.18.44-fc-v1272", "firecracker"),  # a lent VM's
                                          ("6.8.0-45-generic", "unknown")])
def test_runtime_names_the_sandbox_from_the_kernel_release(monkeypatch, release, kind):
    """gVisor reports kernel 4.4.0 and the lent Firecracker VMs an '-fc' kernel; anything else is unknown
    (a timing row labelled with the wrong sandbox is compared with the wrong baselines)."""
    from maefast import _commit

    monkeypatch.setattr(_commit.platform, "release", lambda: release)
    assert _commit.runtime() == {"uname_r": release, "runtime": kind}
