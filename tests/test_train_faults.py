"""Disk and rank failures, made for real: a read-only and a too-small file system (a tmpfs mounted in
a user namespace), a disk that fills mid-run, stale temporaries of a killed save, a SIGKILLed
torchrun launcher, a SIGSTOPped rank."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from train_cli_helpers import ROOT, TINY, cli, command, env, kill_group, lines, start, wait_for_steps

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
LONG = ["train", *TINY, "--synthetic-size", "2000", "--batch-size", "4", "--epochs", "1", "--lr", "1e-3"]


def _can_mount() -> bool:
    try:
        return subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs unshare -Urm (user namespaces) to mount a tmpfs")


def _in_tmpfs(tmp_path, options: str, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``script`` (sh) with a fresh tmpfs (mount ``options``) at $M, in a user namespace."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    full = f"M={shlex.quote(str(mnt))}; mount -t tmpfs -o {options} tmpfs \"$M\" && {script}"
    return subprocess.run(["unshare", "-Urm", "sh", "-c", full], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def _cmd(*args, nproc=0) -> str:
    return " ".join(shlex.quote(a) for a in command(*args, nproc=nproc))


@pytest.mark.slow
@needs_mount
@pytest.mark.parametrize("nproc", [0, 2])
def test_unwritable_output_dir_is_found_before_the_first_step(tmp_path, nproc):
    # --log-every 1000: the first log write used to come after a whole epoch of compute, then a
    # PermissionError traceback (and SIGABRT of rank 0 under torchrun)
    proc = _in_tmpfs(tmp_path, "ro,size=1m", _cmd(*LONG, "--log-every", "1000", "--output-dir", "$M/run",
                                                  nproc=nproc).replace("'$M/run'", '"$M/run"'))
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("maefast train")]
    assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-3000:]
    assert "cannot create --output-dir" in ours[0] and "Read-only file system" in ours[0]
    assert f'File "{ROOT}' not in proc.stderr and "Signal 6" not in proc.stderr and "SIGABRT" not in proc.stderr
    if not nproc:
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@needs_mount
def test_too_little_space_is_found_before_the_first_step(tmp_path):
    script = _cmd(*LONG, "--output-dir", "$M/run").replace("'$M/run'", '"$M/run"') + '; echo "rc=$?"; ls -A "$M"'
    proc = _in_tmpfs(tmp_path, "size=1m", script)  # a checkpoint of the tiny model needs ~3 MiB
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "not enough space for a checkpoint" in err[0] and "tmpfs mounted at" in err[0], proc.stderr
    out = proc.stdout.split()
    assert out[0] == "rc=2" and out[1:] == []  # the folder this run created is gone again


@pytest.mark.slow
@needs_mount
@pytest.mark.parametrize("fsdp", [False, True], ids=["one-file", "fsdp-shards"])
def test_disk_full_mid_run_keeps_the_previous_checkpoint(tmp_path, fsdp):
    """The disk fills after the checkpoint of step 5: the save of step 10 fails with one line, the
    checkpoint of step 5 stays whole, no temporary is left and log.jsonl claims no save. Sharded (2
    ranks, --fsdp): torch.distributed.checkpoint raises the full disk as a CheckpointException, a
    BaseException (it was a traceback on every rank, exit 1)."""
    extra, nproc = (["--fsdp"], 2) if fsdp else ([], 0)
    run = _cmd(*LONG, *extra, "--save-every-steps", "5", "--log-every", "1000", "--output-dir", "$M/run",
               nproc=nproc).replace("'$M/run'", '"$M/run"')
    check = (f"{shlex.quote(sys.executable)} -c 'import json, os, sys, torch; d = sys.argv[1]; "
             "ck = torch.load(os.path.join(d, \"checkpoint-last.pth\"), weights_only=True); "
             "print(json.dumps({\"step\": ck[\"step\"], \"shards\": ck.get(\"shards\"), "
             "\"files\": sorted(os.listdir(d))}))' \"$M/run\"")
    script = (f"{run} & pid=$!; "
              'while [ ! -f "$M/run/checkpoint-last.pth" ]; do sleep 0.05; done; '
              'dd if=/dev/zero of="$M/filler" bs=64k 2>/dev/null; '
              'wait $pid; echo "rc=$?"; rm -f "$M/filler"; ' + check)
    proc = _in_tmpfs(tmp_path, "size=24m", script)
    out = proc.stdout.strip().splitlines()
    assert out and out[0] == ("rc=1" if nproc else "rc=2"), proc.stdout + proc.stderr[-3000:]  # torchrun: 1
    said = [ln for ln in proc.stderr.splitlines() if ln.startswith("maefast train: error")]
    assert len(said) == 1 and f'File "{ROOT}' not in proc.stderr and "CheckpointException" not in proc.stderr, \
        proc.stderr[-3000:]
    assert "no space left on tmpfs mounted at" in said[0] and "checkpoint-last.pth not written" in said[0]
    assert "the previous one (if any) is intact" in said[0]
    if not nproc:
        assert "Traceback" not in proc.stderr
    state = json.loads(out[1])
    assert state["step"] >= 5 and state["step"] % 5 == 0
    # no temporary left (nor a partial shards folder), and no log.jsonl line claiming a checkpoint
    want = ["checkpoint-last.pth"] + ([state["shards"]] if fsdp else [])
    assert [f for f in state["files"] if not f.startswith(".maefast-train.lock")] == sorted(want)


@pytest.mark.slow
def test_stale_temporaries_of_a_killed_save_are_removed_on_resume(tmp_path):
    out = tmp_path / "run"
    base = ["train", *TINY, "--synthetic-size", "16", "--batch-size", "4", "--output-dir", str(out)]
    assert cli(*base, "--max-steps", "1").returncode == 0
    # what a kill during saves leaves (atomic writes' temporaries, a sharded folder never named by a
    # checkpoint), beside files of the user's that look alike
    stale = [".checkpoint-last.pth.k2j4h1.tmp", ".mae_pretrain_vit_tiny_test.pth.abc.tmp", ".log.jsonl.x1.tmp",
             ".loss_curve.png.123.tmp", "checkpoint-last.pth.dcp-0badc0ffee00"]
    mine = ["notes.txt", ".my.tmp", "checkpoint-last.pth.bak", "data.tmp"]
    for name in stale[:-1] + mine:
        (out / name).write_bytes(b"partial")
    (out / stale[-1]).mkdir()
    (out / stale[-1] / "__0_0.distcp").write_bytes(b"partial")
    res = cli(*base, "--resume", "auto", "--max-steps", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    left = set(os.listdir(out))
    assert not left & set(stale) and set(mine) <= left


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env_vars = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env_vars[b"RANK"])


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)  # torchrun starts each worker in a session of its own
        except ProcessLookupError:
            pass


def _workers(launcher: int) -> dict:
    """rank -> pid of torchrun's workers (they start a moment after the launcher)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = {}
        for pid in _children(launcher):
            try:
                found[_rank_of(pid)] = pid
            except (OSError, KeyError, ValueError):
                pass
        if len(found) == 2:
            return found
        time.sleep(0.1)
    raise AssertionError("torchrun's workers not found")


@pytest.mark.slow
def test_workers_stop_when_the_launcher_is_killed(tmp_path):
    """SIGKILL of torchrun used to leave both workers training on as orphans; now they stop together
    at a step boundary, checkpoint it and exit."""
    out = tmp_path / "run"
    proc = start(*LONG, "--log-every", "1", "--output-dir", str(out), nproc=2)  # 250 steps
    workers = {}
    try:
        workers = _workers(proc.pid)
        wait_for_steps(proc, out / "steps.jsonl", 3)
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only
        deadline = time.monotonic() + 90
        while any(_alive(p) for p in workers.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers.values()), "workers still running without their launcher"
        _, err = proc.communicate(timeout=30)
    finally:
        kill_group(proc)
        _kill(workers.values())
    said = [ln for ln in err.splitlines() if "interrupted by" in ln]
    assert len(said) == 1 and "torchrun launcher" in said[0], err[-3000:]
    ck = torch.load(out / "checkpoint-last.pth", weights_only=True)
    logged = [r["step"] for r in lines(out / "steps.jsonl")]
    assert ck["step"] == logged[-1] < 250 and logged == list(range(1, ck["step"] + 1))


@pytest.mark.slow
def test_a_stopped_rank_is_named_within_the_dist_timeout(tmp_path):
    out = tmp_path / "run"
    proc = start(*LONG, "--log-every", "1", "--dist-timeout", "5", "--output-dir", str(out), nproc=2)
    workers = {}
    try:
        workers = _workers(proc.pid)
        wait_for_steps(proc, out / "steps.jsonl", 3)
        os.kill(workers[1], signal.SIGSTOP)
        t0 = time.monotonic()
        while _alive(workers[0]) and time.monotonic() - t0 < 90:
            time.sleep(0.1)
        waited = time.monotonic() - t0
        assert not _alive(workers[0]), "rank 0 still waits for the stopped rank"
    finally:
        kill_group(proc)
        _kill(workers.values())  # SIGKILL ends a stopped process too
    _, err = proc.communicate(timeout=60)
    said = [ln for ln in err.splitlines() if "stopped answering" in ln]
    assert len(said) == 1 and said[0].startswith("maefast train: error: rank 1 stopped answering"), err[-3000:]
    assert "--dist-timeout 5" in said[0] and 3 <= waited < 60  # the heartbeat is read once a second


def test_a_failed_write_on_rank_0_is_told_to_every_rank(tmp_path, monkeypatch):
    """An OSError other than a full disk from rank 0's checkpoint write (read-only remount, I/O error)
    becomes the RunError every rank receives (it was raised on rank 0 alone: the other ranks then
    waited for its broadcast or died with a gloo traceback)."""
    import errno

    from maefast.train import state as st
    from maefast.train.distributed import DistInfo
    from maefast.train.errors import RunError

    def read_only(obj, path):
        raise OSError(errno.EROFS, "Read-only file system", path)

    told = []
    monkeypatch.setattr(st, "atomic_save", read_only)
    monkeypatch.setattr(st.dist_lib, "broadcast_object", lambda obj, info: told.append(obj) or obj)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(RunError, match=r"checkpoint-last.pth not written \(\[Errno 30\] Read-only file system"):
        st.save_checkpoint({"step": 1}, str(tmp_path), "checkpoint-last.pth", model, opt, DistInfo(), sharded=False)
    assert told and "Read-only file system" in told[-1]


def test_ranks_that_list_other_data_refuse_to_start(monkeypatch):
    """Each rank lists --data itself: a node whose copy of the folder held one file more (or one renamed)
    trained other samples per index in silence, or another number of steps per epoch (then a hang in the
    next collective). The ranks now compare the count and the file names' fingerprint before any step."""
    from types import SimpleNamespace

    from maefast.train import loop
    from maefast.train.config import TrainConfig

    def trainer(n, files):
        return SimpleNamespace(source=None, start_epoch=0, start_samples=0, step=0, dataset=range(n), files=files,
                               info=None, cfg=TrainConfig(data="/data/in"))

    monkeypatch.setattr(loop.dist_lib, "all_gather_object", lambda mine, info: [mine, mine])
    loop._Trainer._same_start(trainer(8, "abc"))  # the same: fine
    for other, said in ((trainer(9, "abd"), "rank 1 9;"), (trainer(8, "abd"), "rank 1 as many with other file names;")):
        theirs = (None, 0, 0, 0, len(other.dataset), other.files)  # rank 1's tuple
        monkeypatch.setattr(loop.dist_lib, "all_gather_object", lambda mine, info, t=theirs: [mine, t])
        with pytest.raises(ValueError, match="the ranks see other data in --data /data/in: rank 0 lists 8 images, "
                                             + said + " every rank must see the same folder"):
            loop._Trainer._same_start(trainer(8, "abc"))


@pytest.mark.slow
def test_ranks_that_see_different_checkpoints_refuse_to_start(tmp_path):
    """--resume auto where rank 1 does not see the checkpoint rank 0 resumes from (no shared file
    system): one line, before any step (rank 1 started fresh beside a resumed rank 0)."""
    out = tmp_path / "run"
    first = cli(*LONG, "--max-steps", "2", "--output-dir", str(out), nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    script = tmp_path / "blind_rank1.py"
    script.write_text("import os, runpy, sys\n"
                      "from maefast.train import loop\n"
                      "if os.environ.get('RANK') == '1':\n"
                      "    loop.resume_source = lambda cfg: None  # this rank's disk has no checkpoint\n"
                      "sys.argv = ['maefast'] + sys.argv[1:]\n"
                      "runpy.run_module('maefast', run_name='__main__')\n")
    before = (out / "steps.jsonl").read_text()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *LONG, "--resume", "auto", "--output-dir", str(out)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    said = [ln for ln in proc.stderr.splitlines() if ln.startswith("maefast train: error")]
    assert proc.returncode != 0 and len(said) == 1, proc.stderr[-3000:]
    assert "the ranks disagree on where the run starts" in said[0] and "rank 1 a fresh start" in said[0]
    assert "shared file system" in said[0] and f'File "{ROOT}' not in proc.stderr
    assert (out / "steps.jsonl").read_text() == before


@pytest.mark.slow
def test_a_killed_rank_is_one_line_on_the_others(tmp_path):
    """A rank killed outright (the OOM killer): the others' lost connection is one line, not a gloo
    traceback; the launcher's report names the rank. (The launcher also sends SIGTERM to the others: a
    rank it reaches after its error but before the line is printed ends silently; most runs print it.)"""
    out = tmp_path / "run"
    proc = start(*LONG, "--log-every", "1", "--output-dir", str(out), nproc=2)
    workers = {}
    try:
        workers = _workers(proc.pid)
        wait_for_steps(proc, out / "steps.jsonl", 3)
        os.kill(workers[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
        _kill(workers.values())
    said = [ln for ln in err.splitlines() if ln.startswith("maefast train: error")]
    assert proc.returncode != 0 and len(said) <= 1 and "[rank0]: RuntimeError" not in err, err[-3000:]
    assert all("the connection to another rank was lost" in ln for ln in said) and f'File "{ROOT}' not in err
    assert "rank      : 1 (local_rank: 1)" in err and "(SIGKILL)" in err


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "shards"])
def test_a_failed_keep_copy_says_the_checkpoint_is_written(tmp_path, monkeypatch, sharded):
    """The copy checkpoint-NNNN.pth fails after checkpoint-last.pth was replaced: the message says the
    checkpoint is written (it said "not written; the previous one is intact"), and under --fsdp the
    shards the new checkpoint names are kept (they were removed, leaving it pointing at nothing)."""
    import errno

    from maefast.train import state as st
    from maefast.train.checkpoint import load_checkpoint
    from maefast.train.distributed import DistInfo
    from maefast.train.errors import RunError

    def failing_copy(meta, folder, name, keep, shards):
        raise OSError(errno.EIO, "Input/output error", os.path.join(folder, keep))

    monkeypatch.setattr(st, "_keep_copy", failing_copy)
    if sharded:  # one process stands in for the ranks: the shards folder as torch.distributed.checkpoint writes it
        monkeypatch.setattr(st, "save_shards", lambda path, target, optimizer: os.makedirs(path))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RunError, match=r"checkpoint-last.pth \(step 7\) is written, but its copy "
                                       r"checkpoint-0009.pth is not \(\[Errno 5\] Input/output error"):
        st.save_checkpoint({"step": 7}, str(tmp_path), "checkpoint-last.pth", model,
                           torch.optim.AdamW(model.parameters()), DistInfo(), sharded=sharded, keep="checkpoint-0009.pth")
    ck = load_checkpoint(str(tmp_path / "checkpoint-last.pth"), states=False)
    assert ck["step"] == 7 and (not sharded or (tmp_path / ck["shards"]).is_dir())


def test_loader_workers_stop_when_train_raises(tmp_path, monkeypatch):
    """An error inside the step loop (an out-of-memory error, say): the caller that keeps the exception
    (a notebook's sys.last_value) must not keep the loader's worker processes alive with it."""
    import gc
    import multiprocessing as mp

    from maefast.train import TrainConfig, loop, train

    cfg = TrainConfig(model="mae_vit_tiny_test", data="synthetic", synthetic_size=12, batch_size=3, epochs=1,
                      lr=1e-3, progress=False, workers=2, device="cpu", plot=False, export=False, save=False)
    real = loop._Trainer._micro_step

    def boom(self, batch, b):
        if b == 1:
            raise RuntimeError("simulated failure in the step")
        return real(self, batch, b)

    before = {p.pid for p in mp.active_children()}
    monkeypatch.setattr(loop._Trainer, "_micro_step", boom)
    with pytest.raises(RuntimeError, match="simulated failure") as info:
        train(cfg, output_dir=str(tmp_path / "run"))
    gc.collect()
    deadline = time.time() + 10
    while time.time() < deadline and {p.pid for p in mp.active_children()} - before:
        time.sleep(0.1)
    assert info.value is not None and not {p.pid for p in mp.active_children()} - before
