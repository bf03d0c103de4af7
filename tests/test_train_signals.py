"""Ctrl-C and SIGTERM mid-epoch, as a terminal and a scheduler send them: the run finishes its step,
saves a checkpoint of it (every rank at the same step under torchrun), says so in one line and exits
non-zero; --resume auto then continues bit-exactly like the run that was never interrupted."""
import os
import signal

import pytest
import torch

from train_cli_helpers import ROOT, TINY, cli, kill_group, lines, start, wait_for_steps

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")]
# one epoch of 250 (or 500) steps; every invocation stops at step 100 (--max-steps is per invocation)
ARGS = ["train", *TINY, "--synthetic-size", "2000", "--batch-size", "4", "--epochs", "1", "--lr", "1e-3",
        "--log-every", "1", "--max-steps", "100"]


def _load(path):
    return torch.load(path, weights_only=True)


def _assert_same_run(a_dir, b_dir):
    a, b = _load(os.path.join(a_dir, "checkpoint-last.pth")), _load(os.path.join(b_dir, "checkpoint-last.pth"))
    assert a["step"] == b["step"] == 100 and (a["epoch"], a["samples"]) == (b["epoch"], b["samples"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for name, st in a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[key], b["optimizer"]["state"][name][key]), (name, key)
    # steps.jsonl: one line per step, and the same losses as the straight run's
    la, lb = lines(os.path.join(a_dir, "steps.jsonl")), lines(os.path.join(b_dir, "steps.jsonl"))
    assert [r["step"] for r in lb] == list(range(1, 101))
    assert [r["loss"] for r in lb] == [r["loss"] for r in la]


def _interrupt(tmp_path, sig, nproc):
    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    ref = cli(*ARGS, "--output-dir", straight, nproc=nproc)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = start(*ARGS, "--output-dir", cut, nproc=nproc)
    try:
        wait_for_steps(proc, os.path.join(cut, "steps.jsonl"), 3)
        # the process group, as a terminal's Ctrl-C or `kill -TERM -PGID` (torchrun's workers run in
        # sessions of their own: torchrun forwards the signal to them)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=180)
    finally:
        kill_group(proc)
    # no traceback of ours (torchrun prints its own SignalException traceback; its frames are torch's)
    assert proc.returncode != 0 and f'File "{ROOT}' not in err, err[-3000:]
    assert nproc or "Traceback" not in err, err[-3000:]
    said = [ln for ln in err.splitlines() if "interrupted by" in ln]
    assert len(said) == 1 and f"interrupted by {signal.Signals(sig).name}" in said[0], err[-3000:]
    assert "--resume auto" in said[0] and "checkpoint saved" in said[0]
    ck = _load(os.path.join(cut, "checkpoint-last.pth"))
    logged = [r["step"] for r in lines(os.path.join(cut, "steps.jsonl"))]
    assert 3 <= ck["step"] < 100 and ck["step"] == logged[-1] and logged == list(range(1, ck["step"] + 1))
    assert ck["samples"] == ck["step"] * 8 if nproc else ck["step"] * 4  # mid-epoch
    assert len(ck["rng"]) == max(nproc, 1)
    res = cli(*ARGS, "--output-dir", cut, "--resume", "auto", nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_run(straight, cut)
    return proc.returncode, said[0]


def test_ctrl_c_one_process(tmp_path):
    rc, _ = _interrupt(tmp_path, signal.SIGINT, nproc=0)
    assert rc == 130


def test_sigterm_under_torchrun(tmp_path):
    """torchrun forwards SIGTERM to both workers; they stop at the same step and write one checkpoint
    of it, which resumes bit-exactly on 2 processes."""
    _interrupt(tmp_path, signal.SIGTERM, nproc=2)


@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_a_stop_asked_during_a_save_stops_on_that_checkpoint(tmp_path, monkeypatch, where):
    """SIGTERM while a checkpoint is written (torchrun's grace period is short): the run stops on that
    checkpoint, not one step and one more full checkpoint write later."""
    from maefast.train import TrainConfig, loop, train
    from maefast.train.errors import Interrupted

    real, saves = loop._Trainer._save, []

    def save_then_signal(self, *args, **kwargs):
        real(self, *args, **kwargs)
        saves.append(self.step)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop._Trainer, "_save", save_then_signal)
    # 12 images, batch 4: 3 steps an epoch; mid-epoch: --save-every-steps 2; epoch-end: 2 steps an epoch
    kw = dict(synthetic_size=12, save_every_steps=2) if where == "mid-epoch" else dict(synthetic_size=8)
    cfg = TrainConfig(model="mae_vit_tiny_test", data="synthetic", batch_size=4, epochs=3, lr=1e-3, progress=False,
                      workers=0, device="cpu", plot=False, export=False, output_dir=str(tmp_path / "run"), **kw)
    with pytest.raises(Interrupted, match="stopped after step 2"):
        train(cfg)
    assert saves == [2]


def test_a_stop_asked_during_the_last_epochs_save_finishes_the_run(tmp_path, monkeypatch):
    """SIGTERM while the last epoch's checkpoint is written: nothing is left to train, so the run finishes
    (the checkpoint of its last step written, no Interrupted), as it would have a moment later."""
    from maefast.train import TrainConfig, loop, train

    real, saves = loop._Trainer._save, []

    def save_then_signal(self, *args, **kwargs):
        real(self, *args, **kwargs)
        saves.append(self.step)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop._Trainer, "_save", save_then_signal)
    cfg = TrainConfig(model="mae_vit_tiny_test", data="synthetic", synthetic_size=8, batch_size=4, epochs=1, lr=1e-3,
                      progress=False, workers=0, device="cpu", plot=False, export=False,
                      output_dir=str(tmp_path / "run"))
    res = train(cfg)
    assert saves == [2] and res["steps"] == 2 and res["epoch"] == 0
