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
    # what it names as written over is what comes after it: not itself nor the epochs kept before it
    (out / "checkpoint-0001.pth").write_text("x")
    (out / "checkpoint-0002.pth").write_text("x")
    for kept in ("checkpoint-0000.pth.dcp-0a", "checkpoint-0001.pth.dcp-0b"):  # --fsdp's shard folders stay too
        (out / kept).mkdir()
    with pytest.raises(ValueError, match=r"later checkpoints and logs \(checkpoint-0002.pth, checkpoint-last.pth, "
                                         r"checkpoint-last.pth.dcp-0a1b2c, log.jsonl, \.\.\.\)"):
        check_folder(str(out), str(out / "checkpoint-0001.pth"), False)
    with pytest.raises(ValueError, match="holds another run"):
        check_folder(str(out), str(tmp_path / "elsewhere.pth"), False)
    check_folder(str(out), str(out / "checkpoint-0000.pth"), True)
    # a folder holding only the kept checkpoint it continues from: nothing is written over
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "checkpoint-0000.pth").write_text("x")
    check_folder(str(alone), str(alone / "checkpoint-0000.pth"), False)


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


def test_what_counts_as_a_run_for_a_fresh_start(tmp_path):
    """Each file a run writes, alone, makes a fresh start refuse the folder (a loss curve or a sharded
    state folder is the user's too); --output-dir that is a file is named as that; a resume through
    another path to the folder's own checkpoint (a symbolic link) is that run continuing, not another's."""
    from maefast.train.rundir import check_folder

    for name in ("loss_curve.png", "steps.jsonl", "checkpoint-last.pth.dcp-0a1b", "checkpoint-0003.pth"):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).mkdir() if ".dcp-" in name else (out / name).write_text("x")
        with pytest.raises(ValueError, match="already holds a run"):
            check_folder(str(out), None, False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_folder(str(tmp_path / "afile"), None, False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-last.pth").write_text("x")
    (tmp_path / "link").symlink_to(run)
    check_folder(str(run), str(tmp_path / "link" / "checkpoint-last.pth"), False)


def _sharded(folder, name, shards):
    atomic_save({"shards": shards, "step": 1}, str(folder / name))
    (folder / shards).mkdir()
    (folder / shards / "__0_0.distcp").write_bytes(b"shard")


def test_run_folder_upkeep_keeps_named_shards_and_the_users_files(tmp_path):
    """Stale temporaries go (a killed start's write probe too), the sharded folders a checkpoint names
    stay (a resume reads them next), a user's file that merely looks like a temporary stays; --overwrite
    removes the old run's sharded folders with their files; a rewind keeps the earlier kept epochs and
    the resumed one's shards."""
    from maefast.train.checkpoint import referenced_shards
    from maefast.train.rundir import RunFolder

    out = tmp_path / "run"
    out.mkdir()
    _sharded(out, "checkpoint-last.pth", "checkpoint-last.pth.dcp-0a")
    _sharded(out, "checkpoint-0001.pth", "checkpoint-0001.pth.dcp-0b")
    (out / "checkpoint-last.pth.dcp-0c").mkdir()  # a save cut short: named by no file
    (out / "checkpoint-0002.pth").write_bytes(b"torn")  # not readable: its folder is stale
    (out / "checkpoint-0002.pth.dcp-0d").mkdir()
    for name in (".checkpoint-last.pth.k2j4.tmp", ".maefast-write-test.1234.tmp", ".notes.draft.tmp", "notes.txt"):
        (out / name).write_text("x")
    assert referenced_shards(str(out)) == {"checkpoint-last.pth.dcp-0a", "checkpoint-0001.pth.dcp-0b"}
    assert referenced_shards(str(out), only="checkpoint-0001.pth") == {"checkpoint-0001.pth.dcp-0b"}
    folder = RunFolder(str(out), is_main=True)
    removed = folder.remove_stale_temporaries()
    assert ".checkpoint-last.pth.k2j4.tmp" in removed and ".notes.draft.tmp" not in removed
    assert ".maefast-write-test.1234.tmp" in removed  # the write probe of a run killed at its start
    assert {"checkpoint-last.pth.dcp-0c", "checkpoint-0002.pth.dcp-0d"} <= set(removed)
    assert (out / "checkpoint-last.pth.dcp-0a" / "__0_0.distcp").is_file() and (out / ".notes.draft.tmp").is_file()
    # a rewind in place to checkpoint-0001.pth (it continues at epoch 2): the later run files go
    (out / "checkpoint-0000.pth").write_text("x")
    (out / "log.jsonl").write_text("")
    folder.prepare(0, overwrite=True, keep=(str(out / "checkpoint-0001.pth"),), resume_epoch=2)
    folder.close()
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "checkpoint-0000.pth", "checkpoint-0001.pth", "checkpoint-0001.pth.dcp-0b", "log.jsonl", "notes.txt"]
    # --overwrite for a fresh start: every run file goes, sharded folders included; the user's stay
    folder = RunFolder(str(out), is_main=True)
    folder.prepare(0, overwrite=True, resume_epoch=0)  # as a fresh start passes it
    folder.close()
    assert sorted(os.listdir(out)) == [".notes.draft.tmp", "notes.txt"]


def test_one_run_per_folder_and_a_failed_start_leaves_no_folder(tmp_path, monkeypatch):
    """A second run in a folder another run holds is refused naming its pid; the lock goes with the run.
    Too little free space is found before the first step, and the folder this start created is removed."""
    import errno
    import shutil

    from maefast.train import rundir
    from maefast.train.errors import RunError

    out = tmp_path / "run"
    out.mkdir()  # the user's: stays, empty
    first = rundir.RunFolder(str(out), is_main=True)
    first.prepare(0, overwrite=False)
    with pytest.raises(RunError, match=f"another maefast train \\(pid {os.getpid()}\\) is running"):
        rundir.RunFolder(str(out), is_main=True).prepare(0, overwrite=False)
    first.close()
    assert os.listdir(out) == []
    second = rundir.RunFolder(str(out), is_main=True)
    second.prepare(0, overwrite=False)
    second.close()
    new = tmp_path / "new"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * 2 ** 20, 9 * 2 ** 20, 2 ** 20))
    folder = rundir.RunFolder(str(new), is_main=True)
    with pytest.raises(RunError, match="not enough space for a checkpoint .*about 3.0 MiB needed, 1.0 MiB free"):
        folder.prepare(3 * 2 ** 20, overwrite=False)
    folder.close()
    assert not new.exists()
    # a log line that cannot be written is one line naming the file and why (a full disk as that)
    with pytest.raises(RunError, match="cannot write .*log.jsonl: No such file"):
        rundir.JsonlLog(str(tmp_path / "gone" / "log.jsonl")).write({"step": 1})
    full = rundir._os_error("cannot write log.jsonl", OSError(errno.ENOSPC, "No space left", str(tmp_path)))
    assert "no space left on" in str(full)


def test_exit_codes_and_the_one_line_of_a_users_error(monkeypatch, capsys):
    """`maefast train`'s main: a user's error is its first line after `maefast train: error:` and exit 2;
    a RunError its own exit code, said by rank 0 only (the others' are quiet); an interruption 130/143
    with no "error:"; the CLI's guard turns a full disk into one line, and keeps the traceback of a bug."""
    import errno

    import maefast.train as train_mod
    from maefast.cli import guarded
    from maefast.train.errors import Interrupted, RunError

    def raising(exc):
        def fn(*args, **kwargs):
            raise exc
        return fn

    for exc, rc, said in ((ValueError("--x is bad"), 2, "maefast train: error: --x is bad"),
                          (RunError("no space", quiet=True), 2, ""),
                          (RunError("no space"), 2, "maefast train: error: no space"),
                          (Interrupted("stopped after step 3", 143), 143, "maefast train: stopped after step 3")):
        monkeypatch.setattr(train_mod, "train", raising(exc))
        assert train_mod.main(["--device", "cpu"]) == rc, exc
        assert capsys.readouterr().err.strip() == said
    assert guarded("maefast x", raising(ValueError("first line\nmore detail")), []) == 2
    assert capsys.readouterr().err == "maefast x: error: first line\n"
    assert guarded("maefast x", raising(OSError(errno.ENOSPC, "No space left on device")), []) == 2
    assert capsys.readouterr().err == "maefast x: error: [Errno 28] No space left on device\n"
    with pytest.raises(OSError, match="Input/output error"):
        guarded("maefast x", raising(OSError(errno.EIO, "Input/output error")), [])


def test_loss_curve_from_either_log_alone_and_where_it_is_asked(tmp_path):
    """A run stopped inside its first epoch has only steps.jsonl; a log.jsonl may hold lines without a
    train_loss: each is plotted from what there is, nothing at all is None; `out` is where the PNG goes."""
    import json

    from PIL import Image

    from maefast.train.plot import plot_loss_curve

    assert plot_loss_curve(str(tmp_path)) is None
    with open(tmp_path / "log.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "note": "resumed"}) + "\n")
    assert plot_loss_curve(str(tmp_path)) is None
    with open(tmp_path / "steps.jsonl", "w") as f:
        for s, v in ((1, 1.0), (2, 0.9), (3, 0.85)):
            f.write(json.dumps({"step": s, "loss": v}) + "\n")
    out = plot_loss_curve(str(tmp_path))
    assert out == str(tmp_path / "loss_curve.png") and Image.open(out).format == "PNG"
    os.remove(tmp_path / "steps.jsonl")
    os.remove(out)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 0, "step": 3, "train_loss": 0.9}) + "\n")
    asked = str(tmp_path / "curve.png")
    assert plot_loss_curve(str(tmp_path), out=asked) == asked and Image.open(asked).format == "PNG"
    assert not os.path.exists(tmp_path / "loss_curve.png")


@pytest.mark.parametrize("n,marked", [(2, True), (50, True), (51, False)])
def test_loss_curve_marks_every_reading_of_a_short_run(tmp_path, monkeypatch, n, marked):
    """Up to 50 step readings each get a marker (a run of a few steps is points, and a single reading draws no
    line at all); a long run's line is drawn bare. The step line lies above the epoch means."""
    import json

    from matplotlib.figure import Figure

    from maefast.train.plot import plot_loss_curve

    with open(tmp_path / "steps.jsonl", "w") as f:
        for s in range(1, n + 1):
            f.write(json.dumps({"step": s, "loss": 1.0 / s}) + "\n")
    with open(tmp_path / "log.jsonl", "w") as f:
        f.write(json.dumps({"epoch": 0, "step": n, "train_loss": 0.5}) + "\n")
    saved = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig) or savefig(fig, *a, **k))
    plot_loss_curve(str(tmp_path))
    (fig,) = saved
    epoch_line, step_line = fig.axes[0].get_lines()
    assert list(step_line.get_xdata()) == list(range(1, n + 1))
    assert (step_line.get_marker() == "o") == marked and step_line.get_zorder() > epoch_line.get_zorder()


def test_resume_auto_names_the_last_kept_checkpoint_by_its_epoch_number(tmp_path):
    """--resume auto in a folder of kept checkpoints without checkpoint-last.pth names the latest epoch's to continue
    from, compared as numbers: checkpoint-10000.pth comes after checkpoint-9999.pth (not as text)."""
    from maefast.train.rundir import check_folder

    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-9999.pth", "checkpoint-10000.pth"):
        (out / name).write_text("x")
    with pytest.raises(ValueError, match=r"last kept checkpoint: --resume \S*checkpoint-10000\.pth --overwrite"):
        check_folder(str(out), "auto", False)
