"""`maefast train` and `maefast visualize` as a user runs them (subprocesses): a run folder is never
written over without --resume/--overwrite, a rejected option or unreadable data leaves nothing behind,
files that are not checkpoints are one-line errors, --help reads right, the loss curve shows both lines."""
import os

import numpy as np
import pytest
import torch

from train_cli_helpers import TINY, cli, lines, one_line_error

from maefast.models import create_model
from maefast.train.checkpoint import atomic_save, encoder_state_dict


def test_help_reads_right():
    proc = cli("train", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    # on/off options show both spellings, so "(default: True)" reads as "on"
    for name, words in (("progress", "progress bar"), ("export", "encoder"), ("plot", "loss_curve.png")):
        assert f"--{name}, --no-{name} " in text and words in text
    assert "(default: None)" not in text
    for option, words in (("--mask-ratio", "fraction of the patches removed"), ("--weight-decay", "AdamW weight decay"),
                          ("--seed", "seed of the initial weights"), ("--overwrite", "start over")):
        assert words in text.split(option, 2)[2][:200], option
    for name in ("mae_vit_base_patch16", "mae_vit_huge_patch14", "mae_vit_tiny_test"):
        assert name in text.split("--model MODEL", 2)[2][:400]
    bad = cli("train", "--epochs", "two")
    one_line_error(bad, "maefast train", "--epochs", "invalid int value")


def _snapshot(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


@pytest.mark.slow
def test_existing_run_is_refused_then_overwritten_or_continued(tmp_path):
    out = str(tmp_path / "run")
    args = ["train", *TINY, "--synthetic-size", "12", "--batch-size", "4", "--epochs", "1", "--log-every", "1",
            "--output-dir", out]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(out)
    assert "checkpoint-last.pth" in before and len(lines(os.path.join(out, "steps.jsonl"))) == 3
    again = cli(*args)  # the same command again: refused, nothing touched
    one_line_error(again, "maefast train", out, "--resume auto", "--overwrite")
    assert _snapshot(out) == before
    # --overwrite with an option refused later (by the step, the optimizer, the first loss) deleted the old
    # run first: every option is checked before the folder is touched
    for bad in (["--clip-grad", "-1"], ["--clip-grad", "nan"], ["--lr", "nan"], ["--weight-decay", "inf"],
                ["--blr", "inf"]):
        one_line_error(cli(*args, "--overwrite", *bad), "maefast train", bad[0], "must be")
        assert _snapshot(out) == before, bad
    over = cli(*args, "--overwrite", "--max-steps", "1")
    assert over.returncode == 0, over.stderr[-3000:]
    assert [r["step"] for r in lines(os.path.join(out, "steps.jsonl"))] == [1]  # the old run's lines are gone
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ck["step"] == 1


@pytest.mark.slow
def test_resume_auto_without_a_checkpoint_keeps_a_finished_run(tmp_path):
    """--resume auto where no checkpoint-last.pth is: a run stopped before its first checkpoint (steps.jsonl
    only) starts fresh; a finished --no-save run (its encoder export, its log.jsonl epoch records) is
    refused, untouched."""
    out = str(tmp_path / "run")
    args = ["train", *[a for a in TINY if a != "--no-export"], "--synthetic-size", "8", "--batch-size", "4",
            "--epochs", "1", "--output-dir", out]
    first = cli(*args, "--no-save")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(out)
    assert any(n.startswith("mae_pretrain_") for n in before) and "checkpoint-last.pth" not in before
    one_line_error(cli(*args, "--resume", "auto"), "maefast train", "--resume auto", "checkpoint-last.pth",
                   "--overwrite")
    assert _snapshot(out) == before
    for n in before:
        if n.startswith("mae_pretrain_"):
            os.remove(os.path.join(out, n))
    # its epoch records are still the user's (log.jsonl gets one only after a checkpoint, or with --no-save)
    one_line_error(cli(*args, "--resume", "auto"), "maefast train", "--resume auto", "log.jsonl", "--overwrite")
    os.remove(os.path.join(out, "log.jsonl"))  # steps.jsonl only: a run stopped before it saved: a fresh start
    again = cli(*args, "--resume", "auto", "--no-save")
    assert again.returncode == 0 and "no checkpoint, fresh start" in again.stderr + again.stdout, again.stderr[-3000:]


def test_resume_auto_folder_rule(tmp_path):
    """What --resume auto without a checkpoint-last.pth may start fresh over: logs, a loss curve and the
    shards folder of a first save cut short (a temporary); not an export or a kept checkpoint."""
    from maefast.train.rundir import check_folder

    out = tmp_path / "run"
    out.mkdir()
    for name in ("log.jsonl", "steps.jsonl", "loss_curve.png"):
        (out / name).write_text("x")
    (out / "checkpoint-last.pth.dcp-0a1b2c").mkdir()
    check_folder(str(out), "auto", False)
    for result in ("mae_pretrain_vit_tiny_test.pth", "checkpoint-0001.pth"):
        (out / result).write_text("x")
        with pytest.raises(ValueError, match="no checkpoint-last.pth to continue from"):
            check_folder(str(out), "auto", False)
        (out / result).unlink()
    (out / "checkpoint-last.pth").write_text("x")  # something to continue: the resume's own checks follow
    (out / "mae_pretrain_vit_tiny_test.pth").write_text("x")
    check_folder(str(out), "auto", False)
    # rewinding in place to a kept epoch checkpoint is named as that (it read "holds another run")
    (out / "checkpoint-0000.pth").write_text("x")
    with pytest.raises(ValueError, match="is an earlier checkpoint of the run in --output-dir"):
        check_folder(str(out), str(out / "checkpoint-0000.pth"), False)
    with pytest.raises(ValueError, match="holds another run"):
        check_folder(str(out), str(tmp_path / "elsewhere.pth"), False)
    check_folder(str(out), str(out / "checkpoint-0000.pth"), True)


def _unreadable_folder(path, n=3):
    os.makedirs(path)
    for i in range(n):
        (path / f"img{i}.jpg").write_bytes(os.urandom(300))
    return str(path)


@pytest.mark.slow
def test_rejected_input_leaves_no_folder(tmp_path):
    common = ["train", *TINY, "--synthetic-size", "8", "--batch-size", "4"]
    out = tmp_path / "out"
    # --mask-ratio 0 passed a first check "[0, 1)" and failed the model's "(0, 1)" after the folder existed;
    # 0.95 keeps no patch of the tiny model's 16: the same rule, the model's, before anything is created
    for ratio, words in (("0", "(0, 1)"), ("0.95", "at least one patch")):
        one_line_error(cli(*common, "--mask-ratio", ratio, "--output-dir", str(out)), "maefast train",
                       "--mask-ratio", words)
        assert not out.exists()
    bad = _unreadable_folder(tmp_path / "bad")
    one_line_error(cli(*common[:1], *TINY, "--data", bad, "--output-dir", str(out)), "maefast train",
                   "cannot read", "img0.jpg")
    assert not out.exists()
    # a run folder inside the data folder: its loss curve PNG would become a training image (and a resume
    # then blamed "another data set")
    inner = os.path.join(bad, "run")
    one_line_error(cli(*common[:1], *TINY, "--data", bad, "--output-dir", inner), "maefast train",
                   "is inside --data")
    assert not os.path.exists(inner)
    one_line_error(cli(*common[:1], *TINY, "--data", bad, "--synthetic-size", "8", "--output-dir", str(out)),
                   "maefast train", "--synthetic-size is the size of --data synthetic")  # it was silently ignored
    assert not out.exists()


def _files(tmp_path):
    """A random-bytes file, a truncated checkpoint, an encoder-only export, a full checkpoint of another model."""
    model = create_model("mae_vit_tiny_test")
    full = tmp_path / "full.pth"
    atomic_save({"model": model.state_dict(), "model_name": "mae_vit_tiny_test",
                 "model_kwargs": {"img_size": 32, "norm_pix_loss": False}}, str(full))
    rand = tmp_path / "random.pth"
    rand.write_bytes(os.urandom(4096))
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    enc = tmp_path / "mae_pretrain_vit_tiny_test.pth"
    atomic_save({"model": encoder_state_dict(model.state_dict())}, str(enc))
    return str(rand), str(cut), str(enc), str(full)


@pytest.mark.slow
def test_files_that_are_not_checkpoints_are_one_line_errors(tmp_path):
    rand, cut, enc, full = _files(tmp_path)
    common = ["train", *TINY, "--synthetic-size", "8", "--batch-size", "4", "--output-dir", str(tmp_path / "o")]
    for path, words in ((rand, "not a readable maefast/MAE checkpoint"), (cut, "not a readable"),
                        (enc, "encoder-only"), (full, "cannot resume a run")):
        line = one_line_error(cli(*common, "--resume", path), "maefast train", path, words)
        assert "weights_only" not in line  # torch's advice to unpickle anything is not ours to give
    assert not (tmp_path / "o").exists()
    img = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(img)
    vis = ["visualize", "--image", str(img), "--out", str(tmp_path / "v.png")]
    one_line_error(cli(*vis, "--checkpoint", rand), "maefast visualize", rand, "not a readable")
    one_line_error(cli(*vis, "--checkpoint", full, "--model", "small"), "maefast visualize",
                   "--model small contradicts", "mae_vit_tiny_test")
    one_line_error(cli(*vis, "--checkpoint", full, "--mask-ratio", "0"), "maefast visualize", "(0, 1)")
    one_line_error(cli(*vis[:-1], str(tmp_path / "no" / "v.png"), "--checkpoint", full), "maefast visualize",
                   "--out", "does not exist")
    not_sd = tmp_path / "listmodel.pth"  # a dict with a 'model' that is no state dict: was a traceback
    torch.save({"model": [1, 2]}, not_sd)
    one_line_error(cli(*vis, "--checkpoint", str(not_sd)), "maefast visualize", "'model' is a list")
    one_line_error(cli(*common, "--resume", str(not_sd)), "maefast train", "'model' is a list")
    ok = cli(*vis, "--checkpoint", full, "--model", "tiny")  # the same model by an alias: fine
    assert ok.returncode == 0, ok.stderr


def test_visualize_in_process_errors(tmp_path):
    """The remaining file kinds through visualize's main (same code path as the CLI)."""
    from maefast import visualize as vis

    rand, cut, enc, full = _files(tmp_path)
    official = tmp_path / "official.pth"  # records no model: --model names it, a wrong one is refused clearly
    atomic_save({"model": torch.load(full, weights_only=True)["model"]}, str(official))
    img = str(tmp_path / "img.png")
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(img)
    for path, model, words in ((cut, None, "not a readable"), (enc, None, "no decoder weights"),
                               (str(official), None, "does not record its model"),
                               (str(official), "small", "do not fit mae_vit_small_cpu"),
                               (str(tmp_path), None, "is a folder")):
        with pytest.raises((ValueError, OSError), match=words):
            vis.visualize(path, img, str(tmp_path / "x.png"), model_name=model)
    assert vis.visualize(str(official), img, str(tmp_path / "x.png"), model_name="tiny")["losses"][0] > 0


def test_loss_curve_shows_the_step_line_on_short_runs(tmp_path):
    """On a short run the per-step readings fall on the epoch means; the step line must stay visible."""
    import json

    from PIL import Image

    from maefast.train.plot import plot_loss_curve

    with open(tmp_path / "steps.jsonl", "w") as f:
        for s, v in ((3, 1.0), (6, 0.8)):
            f.write(json.dumps({"step": s, "loss": v}) + "\n")
    with open(tmp_path / "log.jsonl", "w") as f:
        for s, v in ((3, 1.0), (6, 0.8)):
            f.write(json.dumps({"epoch": s // 3 - 1, "step": s, "train_loss": v, "complete": True}) + "\n")
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    matplotlib.use("pdf")  # a caller's own choice (a notebook's inline backend): plotting must keep it
    try:
        arr = np.asarray(Image.open(plot_loss_curve(str(tmp_path))).convert("RGB")).astype(int)
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == []  # nor leave pyplot a figure
    finally:
        matplotlib.use(backend)
    blue = (abs(arr[..., 0] - 31) < 30) & (abs(arr[..., 1] - 119) < 30) & (abs(arr[..., 2] - 180) < 30)
    assert blue[:, : int(0.6 * arr.shape[1])].sum() > 100  # the line itself, left of the legend


def test_a_full_disk_while_plotting_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """The loss curve is written like a checkpoint: a full disk there ends the run with one line
    (exit 2), no temporary left, the run's checkpoint intact."""
    import errno

    from matplotlib.figure import Figure

    from maefast.cli import main

    def full(self, f, **kw):
        f.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    out = tmp_path / "run"
    rc = main(["train", "--model", "mae_vit_tiny_test", "--synthetic-size", "6", "--batch-size", "3", "--epochs", "1",
               "--device", "cpu", "--workers", "0", "--no-progress", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    said = [ln for ln in err.splitlines() if "error" in ln]
    assert len(said) == 1 and "no space left" in said[0] and "loss_curve.png not written" in said[0], err
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    assert (out / "checkpoint-last.pth").is_file() and not (out / "loss_curve.png").exists()
