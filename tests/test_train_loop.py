"""`maefast train` end to end on the CPU with the tiny model: outputs (checkpoint, JSONL logs, loss
curve PNG, encoder export), exact resume, atomic checkpoint writes, corrupt files, the loss falling."""
import json
import math
import os

import numpy as np
import pytest
import torch

from maefast.models import create_model
from maefast.train import TrainConfig, load_checkpoint, main, train
from maefast.train import checkpoint as ckpt_lib

TINY = dict(model="mae_vit_tiny_test", data="synthetic", batch_size=4, progress=False, workers=0, device="cpu")


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_cli_writes_checkpoint_logs_curve_and_encoder(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--model", "tiny", "--data", "synthetic", "--synthetic-size", "24", "--batch-size", "4",
               "--epochs", "2", "--log-every", "2", "--output-dir", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "mae_vit_tiny_test" in err and "img/s" in err
    epochs = _read_jsonl(out / "log.jsonl")
    assert [r["epoch"] for r in epochs] == [0, 1] and [r["step"] for r in epochs] == [6, 12]
    for r in epochs:
        assert set(r) >= {"train_loss", "train_lr", "img_per_s", "skipped_files", "images"}
        assert r["images"] == 24 and r["skipped_files"] == 0 and np.isfinite(r["train_loss"])
    steps = _read_jsonl(out / "steps.jsonl")
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    # the lr follows the schedule: warm-up 0.1 epoch, cosine to 0 at the end
    assert steps[-1]["lr"] < steps[1]["lr"]

    from PIL import Image

    with Image.open(out / "loss_curve.png") as im:
        assert im.size == (800, 450)
        arr = np.asarray(im.convert("RGB")).astype(int)
    assert arr.std() > 10  # not blank
    blue = (abs(arr[..., 0] - 31) < 30) & (abs(arr[..., 1] - 119) < 30) & (abs(arr[..., 2] - 180) < 30)
    assert blue.sum() > 200  # the tab:blue loss line is drawn

    ck = load_checkpoint(str(out / "checkpoint-last.pth"))
    assert (ck["epoch"], ck["samples"], ck["step"], ck["model_name"]) == (2, 0, 12, "mae_vit_tiny_test")
    assert {"model", "optimizer", "scaler", "rng", "schedule", "config"} <= set(ck)

    enc = torch.load(out / "mae_pretrain_vit_tiny_test.pth", weights_only=True)
    assert list(enc) == ["model"]
    keys = set(enc["model"])
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias"} <= keys
    assert not any(k.startswith(("decoder", "mask_token")) for k in keys)
    for k, v in enc["model"].items():
        assert torch.equal(v, ck["model"][k]), k
    # loads into an encoder (the official fine-tuning does strict=False for head / fc_norm)
    fresh = create_model("mae_vit_tiny_test")
    missing, unexpected = fresh.load_state_dict(enc["model"], strict=False)
    assert not unexpected and all(k.startswith(("decoder", "mask_token")) for k in missing)


def _params(path):
    return load_checkpoint(str(path))


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_bit_exact(tmp_path, accum):
    # 4 optimizer steps straight vs 2 + resume + 2 (a mid-epoch stop: 8 steps per epoch... 4 used)
    cfg = _cfg(synthetic_size=16 * accum, epochs=1, accum_iter=accum, lr=1e-3, log_every=1,
                      plot=False, export=False)
    train(cfg, output_dir=str(tmp_path / "straight"))
    train(cfg, output_dir=str(tmp_path / "split"), max_steps=2)
    half = _params(tmp_path / "split" / "checkpoint-last.pth")
    assert (half["step"], half["epoch"], half["samples"]) == (2, 0, 2 * 4 * accum)  # 2 steps of 4 x accum
    res = train(cfg, output_dir=str(tmp_path / "split"), resume=str(tmp_path / "split" / "checkpoint-last.pth"))
    assert res["steps"] == 4
    a = _params(tmp_path / "straight" / "checkpoint-last.pth")
    b = _params(tmp_path / "split" / "checkpoint-last.pth")
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, st in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[name], b["optimizer"]["state"][i][name]), (i, name)
    # and training really moved the weights
    fresh = create_model("mae_vit_tiny_test")
    assert not torch.equal(fresh.state_dict()["blocks.0.attn.qkv.weight"], a["model"]["blocks.0.attn.qkv.weight"])


def test_resume_of_a_checkpoint_counting_micro_batches(tmp_path):
    """A mid-epoch checkpoint written before 2026-12-05 carried the epoch's loss as a sum of micro-batch
    means and their count n; its resumed epoch's loss is still the whole epoch's per-image mean."""
    cfg = _cfg(synthetic_size=16, epochs=1, lr=1e-3, plot=False, export=False)
    train(cfg, output_dir=str(tmp_path / "straight"))
    train(cfg, output_dir=str(tmp_path / "old"), max_steps=2)
    path = str(tmp_path / "old" / "checkpoint-last.pth")
    ck = torch.load(path, weights_only=False)
    st = ck["epoch_stats"]
    assert st["images"] == 8 and "n" not in st
    ck["epoch_stats"] = {**st, "loss_sum": st["loss_sum"] / st["images"] * 2, "n": 2}  # 2 micro-batches of 4
    torch.save(ck, path)
    train(cfg, output_dir=str(tmp_path / "old"), resume=path)
    got, want = (_read_jsonl(tmp_path / d / "log.jsonl")[-1] for d in ("old", "straight"))
    assert got["images"] == want["images"] == 16 and got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-9)


def test_resume_across_epochs_and_auto(tmp_path):
    cfg = _cfg(synthetic_size=12, epochs=2, lr=1e-3, plot=False, export=False)
    train(cfg, output_dir=str(tmp_path / "straight"))
    out = str(tmp_path / "split")
    train(cfg, output_dir=out, max_steps=4)  # stops in the middle of epoch 1 (3 steps per epoch)
    assert _params(os.path.join(out, "checkpoint-last.pth"))["epoch"] == 1
    train(cfg, output_dir=out, resume="auto")
    a = _params(tmp_path / "straight" / "checkpoint-last.pth")
    b = _params(os.path.join(out, "checkpoint-last.pth"))
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    ckpt_lib.atomic_save({"model": {"w": torch.ones(3)}}, str(path))

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_lib.atomic_save({"model": {"w": torch.zeros(3)}}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ck.pth"]  # no temp file left behind


def test_atomic_write_text_writes_through_a_link(tmp_path):
    """A --json given as a symbolic link: the file it points to is replaced, the link stays a link."""
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    ckpt_lib.atomic_write_text(str(link), "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]


def test_rng_state_roundtrip():
    import random

    state = ckpt_lib.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    ckpt_lib.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _folder(tmp_path, n_good, n_bad, size=40):
    from maefast.train.data import SyntheticDataset

    src = SyntheticDataset(n_good, size, 4, data_seed=7)
    for i in range(n_good):
        sub = tmp_path / ("dogs" if i % 2 else "cats")
        sub.mkdir(parents=True, exist_ok=True)
        src.load(i).save(sub / f"{i}.png")
    for i in range(n_bad):
        (tmp_path / "cats" / f"bad{i}.jpg").write_bytes(os.urandom(200))
    return tmp_path


def test_corrupt_files_are_skipped_and_counted(tmp_path, capsys):
    data = _folder(tmp_path / "data", 12, 2)
    res = train(_cfg(data=str(data), batch_size=7, epochs=1, plot=False, export=False,
                            output_dir=str(tmp_path / "out")))
    assert res["skipped_files"] == 2 and np.isfinite(res["final_loss"])
    rec = _read_jsonl(tmp_path / "out" / "log.jsonl")[0]
    assert rec["skipped_files"] == 2 and rec["images"] == 12
    assert all("bad" in e for e in rec["skipped_examples"])
    assert "skipped 2 unreadable" in capsys.readouterr().err


def test_unreadable_files_weigh_the_same_at_any_split_of_the_batch(tmp_path):
    """A batch with unreadable files trains the same whether its 4 images run as one micro-batch or as
    2 x 2 accumulated (or on 2 ranks: DDP averages the ranks as accumulation does): each micro-batch's
    loss weighs its readable images / --batch-size. (Before, a micro-batch's mean weighed 1 however few
    images it kept: a micro-batch with 1 readable image of 2 counted that image twice.)"""
    from train_cli_helpers import assert_states_close

    data = str(_folder(tmp_path / "d", 10, 6))
    runs = {}
    for b, a in ((4, 1), (2, 2)):
        out = tmp_path / f"b{b}a{a}"
        # an lr that moves the weights well past the comparison's tolerance (the default, blr * 4 / 256
        # with the first step at lr 0, moved them by < 4e-6: a micro-batch weighed wrong passed)
        res = train(_cfg(data=data, batch_size=b, accum_iter=a, epochs=1, plot=False, export=False, lr=1e-3,
                         warmup_epochs=0.25, output_dir=str(out)))
        assert res["skipped_files"] == 6 and res["steps"] == 4
        runs[b] = (load_checkpoint(str(out / "checkpoint-last.pth"))["model"], _read_jsonl(out / "log.jsonl")[0])
    (w4, log4), (w2, log2) = runs[4], runs[2]
    assert_states_close(w2, w4, "batch 2 x accumulation 2 vs batch 4")
    assert log2["images"] == log4["images"] == 10
    assert log2["train_loss"] == pytest.approx(log4["train_loss"], rel=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_each_step_runs_at_the_official_schedules_lr(tmp_path, accum):
    """The lr a step logs is the official adjust_learning_rate's at that step's first micro-batch
    (iteration k of the official loop: epoch + k / steps per epoch), with and without accumulation."""
    from maefast.train import schedule

    out = tmp_path / "run"
    train(_cfg(synthetic_size=16 * accum, epochs=2, accum_iter=accum, lr=1e-3, warmup_epochs=1, min_lr=1e-5,
               log_every=1, plot=False, export=False, output_dir=str(out)))
    got = [r["lr"] for r in _read_jsonl(out / "steps.jsonl")]
    want = [schedule.lr_at(k / 4, 1e-3, 1, 2, 1e-5) for k in range(8)]  # 4 optimizer steps per epoch
    assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_empty_or_missing_folder_is_a_clear_cli_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty"), "--model", "tiny", "--output-dir", str(tmp_path / "o")]) == 2
    assert "no image files" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing"), "--model", "tiny", "--output-dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_loss_falls_on_an_image_folder(tmp_path):
    data = _folder(tmp_path / "data", 32, 0, size=48)
    res = train(_cfg(data=str(data), batch_size=8, epochs=12, lr=2e-3, warmup_epochs=1,
                            log_every=1, plot=False, export=False, output_dir=str(tmp_path / "out")))
    losses = [r["loss"] for r in _read_jsonl(tmp_path / "out" / "steps.jsonl")]
    assert len(losses) == 48
    first, last = np.mean(losses[:6]), np.mean(losses[-6:])
    assert last < 0.9 * first, (first, last)
    assert res["img_per_s"] > 0


@pytest.mark.cuda
def test_cuda_bf16_smoke_and_exact_resume(tmp_path):
    """On a GPU: bf16 autocast, pinned memory, 2 workers; loss finite; resume restores the step."""
    cfg = _cfg(device="cuda", dtype="bfloat16", workers=2, synthetic_size=64, batch_size=8, epochs=1, lr=1e-3,
               plot=False)
    res = train(cfg, output_dir=str(tmp_path / "a"), max_steps=4)
    assert res["steps"] == 4 and np.isfinite(res["final_loss"])
    res = train(cfg, output_dir=str(tmp_path / "a"), resume=str(tmp_path / "a" / "checkpoint-last.pth"))
    assert res["steps"] == 8 and res["encoder"].endswith("mae_pretrain_vit_tiny_test.pth")


def test_fused_block_and_checkpointing_train_like_the_default(tmp_path):
    """--fused block and --grad-checkpointing change how the blocks run, not what they compute: the same
    run gives the same weights as the default fast path (fp32, CPU) up to float rounding."""
    cfg = _cfg(synthetic_size=8, epochs=1, lr=1e-3, plot=False, export=False, log_every=1)
    train(cfg, output_dir=str(tmp_path / "default"))
    train(cfg, output_dir=str(tmp_path / "block"), fused="block", grad_checkpointing=True)
    a = load_checkpoint(str(tmp_path / "default" / "checkpoint-last.pth"))["model"]
    b = load_checkpoint(str(tmp_path / "block" / "checkpoint-last.pth"))["model"]
    for k in a:
        if k.endswith("qkv.bias"):
            # the key bias's true gradient is 0 (softmax is shift-invariant): AdamW turns its rounding
            # noise into full-size steps of either sign, differently for every summation order
            continue
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    la = _read_jsonl(str(tmp_path / "default" / "steps.jsonl"))
    lb = _read_jsonl(str(tmp_path / "block" / "steps.jsonl"))
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], rel=1e-5)


def test_fused_option_is_checked():
    from maefast.train.config import resolve_config

    with pytest.raises(ValueError, match="--fused must be one of"):
        resolve_config(TrainConfig(fused="yes"), cuda=False)


def test_api_options_are_type_checked_and_paths_taken_as_given(tmp_path):
    """train()'s options typed as the command line's parser types them: a str "no" for a bool was
    true, a float step count ran, a str number failed deep inside naming nothing; pathlib paths, a
    torch.device and numpy ints are what a Python caller passes."""
    from maefast.train.config import as_config

    for kw, match in ((dict(norm_pix_loss="no"), "--norm-pix-loss must be bool, got str 'no'"),
                      (dict(max_steps=1.5), "--max-steps must be int or None, got float"),
                      (dict(epochs="2"), "--epochs must be int or None, got str"),
                      (dict(epochs=True), "--epochs must be int or None, got bool"),
                      (dict(output_dir=None), "--output-dir must be str, got NoneType"),
                      (dict(clip_grad="1"), "--clip-grad must be float or None"),
                      (dict(keep_every_epochs=0.5), "--keep-every-epochs must be int, got float")):
        with pytest.raises(TypeError, match=match):
            train(**kw)
    cfg = as_config(None, dict(output_dir=tmp_path / "run", device=torch.device("cpu"), epochs=np.int64(2),
                               batch_size=np.int64(8), blr=np.float32(1e-3)))
    assert (cfg.output_dir, cfg.device, cfg.epochs, cfg.batch_size) == (str(tmp_path / "run"), "cpu", 2, 8)
    assert type(cfg.batch_size) is int and type(cfg.blr) is float  # numpy's numbers as the rest expects them
    # a timeout the process group cannot hold: refused before it is built (inf was a traceback per rank)
    for bad in (float("inf"), 1e10, 0):
        with pytest.raises(ValueError, match="--dist-timeout must be"):
            train(dist_timeout=bad)


def test_a_bad_eager_dispatch_setting_is_refused_before_the_folder_is_touched(tmp_path, monkeypatch):
    """MAEFAST_EAGER_DISPATCH is read lazily (a typo must not break `maefast --help`); train checks it with
    the options, before --overwrite empties a run's folder (it failed at the first step, after that)."""
    from maefast.ops import _dispatch

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(b"theirs")
    monkeypatch.setattr(_dispatch, "_mode", None)
    monkeypatch.setenv("MAEFAST_EAGER_DISPATCH", "fast")
    with pytest.raises(ValueError, match="MAEFAST_EAGER_DISPATCH must be one of"):
        train(model="mae_vit_tiny_test", synthetic_size=8, batch_size=4, device="cpu", workers=0, progress=False,
              output_dir=str(out), overwrite=True)
    assert (out / "checkpoint-last.pth").read_bytes() == b"theirs"


def test_cuda_graph_option_is_checked():
    """--cuda-graph auto|on|off (auto by default); `on` is refused only where no step can be captured
    (the CPU, several processes); accumulation, clipping, compile and fp16 capture now (TrainStep)."""
    from maefast.train.config import config_from_args, resolve_config

    assert TrainConfig().cuda_graph == "auto" and config_from_args([]).cuda_graph == "auto"
    assert resolve_config(TrainConfig(), cuda=False).cuda_graph == "auto"
    with pytest.raises(ValueError, match="--cuda-graph on needs a CUDA device"):
        resolve_config(TrainConfig(cuda_graph="on"), cuda=False)
    with pytest.raises(ValueError, match=r"--cuda-graph on needs one process .*this run has 2"):
        resolve_config(TrainConfig(cuda_graph="on", device="cuda"), world_size=2, cuda=True)
    with pytest.raises(ValueError, match="--cuda-graph must be one of auto, on, off"):
        resolve_config(TrainConfig(cuda_graph="yes"), cuda=False)
    ok = resolve_config(TrainConfig(cuda_graph="on", device="cuda", accum_iter=2, clip_grad=1.0, compile=True,
                                    dtype="float16"), cuda=True)
    assert ok.cuda_graph == "on"
    # the Python API's and older checkpoints' booleans
    assert resolve_config(TrainConfig(cuda_graph=False), cuda=False).cuda_graph == "off"
    assert resolve_config(TrainConfig(cuda_graph=True, device="cuda"), cuda=True).cuda_graph == "on"
    with pytest.raises(SystemExit):
        config_from_args(["--cuda-graph", "maybe"])


@pytest.mark.cuda
@pytest.mark.parametrize("fused", ["off", "block"])
def test_cuda_graph_training_matches_eager(tmp_path, fused):
    """--cuda-graph on replays the same steps as the eager loop (same noise, same lr schedule): same
    losses and weights up to rounding; its checkpoint resumes an eager run (lr saved as a float)."""
    cfg = TrainConfig(model="mae_vit_tiny_test", data="synthetic", synthetic_size=32, batch_size=8, epochs=1,
                      device="cuda", dtype="bfloat16", workers=0, progress=False, plot=False, export=False,
                      log_every=1, lr=1e-3, fused=fused)
    train(cfg, output_dir=str(tmp_path / "eager"), cuda_graph="off")
    res = train(cfg, output_dir=str(tmp_path / "graph"), cuda_graph="on")
    assert res["train_step"]["captured"], res["train_step"]
    la = [r["loss"] for r in _read_jsonl(str(tmp_path / "eager" / "steps.jsonl"))]
    lb = [r["loss"] for r in _read_jsonl(str(tmp_path / "graph" / "steps.jsonl"))]
    assert len(la) == len(lb) == 4
    assert lb == pytest.approx(la, rel=2e-2)
    a = load_checkpoint(str(tmp_path / "eager" / "checkpoint-last.pth"))
    b = load_checkpoint(str(tmp_path / "graph" / "checkpoint-last.pth"))
    assert all(isinstance(g["lr"], float) for g in b["optimizer"]["param_groups"])
    for k in a["model"]:
        if not k.endswith("qkv.bias"):  # the key bias's gradient is rounding noise (see above)
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=5e-2, atol=5e-3, msg=k)
    res = train(cfg, output_dir=str(tmp_path / "graph"), epochs=2, cuda_graph="off",
                resume=str(tmp_path / "graph" / "checkpoint-last.pth"))
    assert res["steps"] == 8 and math.isfinite(res["final_loss"]) and not res["train_step"]["captured"]
    # and the other way: an eager run's checkpoint resumed captured (the optimizer comes back capturable)
    res = train(cfg, output_dir=str(tmp_path / "eager"), epochs=2, cuda_graph="on",
                resume=str(tmp_path / "eager" / "checkpoint-last.pth"))
    assert res["steps"] == 8 and math.isfinite(res["final_loss"]) and res["train_step"]["captured"]


@pytest.mark.parametrize("layout", ["names", "ids"])
def test_resume_keeps_this_runs_optimizer_implementation(layout):
    """A checkpoint stores how its run stepped (foreach/fused/capturable); resuming keeps this run's.
    Both layouts: parameter names (format 2) and format 1's parameter ids."""
    from maefast.train.state import full_states, restore_states

    m = create_model("mae_vit_tiny_test")
    a = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=False)
    m(torch.randn(2, 3, 32, 32), seed=0, return_pred=False)[0].backward()
    a.step()
    if layout == "names":
        msd, osd = full_states(m, a)
        ck = {"model": msd, "optimizer": osd, "optimizer_format": "fqn"}
    else:
        ck = {"model": m.state_dict(), "optimizer": a.state_dict()}
    m2 = create_model("mae_vit_tiny_test")
    b = torch.optim.AdamW(m2.parameters(), lr=1e-3, foreach=True)
    restore_states(ck, None, m2, m2, b, sharded=False)
    assert b.param_groups[0]["foreach"] is True and ck["optimizer"]["param_groups"][0]["foreach"] is False
    p0, q0 = next(m.parameters()), next(m2.parameters())
    assert torch.equal(b.state[q0]["exp_avg"], a.state[p0]["exp_avg"]) and torch.equal(q0, p0)


def test_atomic_save_gives_a_new_file_the_usual_mode_and_keeps_a_replaced_ones(tmp_path):
    """mkstemp makes its temporary 0600: a checkpoint must not end up unreadable to the group that read
    the file it replaces, nor a new one to those a plain new file would allow."""
    ref = tmp_path / "ref"
    ref.write_bytes(b"")  # what the umask gives a new file
    new = tmp_path / "new.pth"
    ckpt_lib.atomic_save({"w": torch.ones(1)}, str(new))
    assert new.stat().st_mode & 0o7777 == ref.stat().st_mode & 0o7777
    old = tmp_path / "old.pth"
    old.write_bytes(b"")
    os.chmod(old, 0o640)
    ckpt_lib.atomic_save({"w": torch.ones(1)}, str(old))
    assert old.stat().st_mode & 0o7777 == 0o640


def test_atomic_save_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """The contract of a durable replace: the data reaches the disk before the new name points at it,
    and the rename itself is made durable (fsync of the folder)."""
    import stat

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt_lib.atomic_save({"w": torch.ones(1)}, str(tmp_path / "ck.pth"))
    assert events == ["fsync file", "replace", "fsync folder"]


def test_link_or_copy_copies_without_hard_links_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    """--keep-every-epochs' copies: a file system without hard links (or another device) gets a real
    copy; a copy that fails (a full disk) leaves neither its temporary nor a partial destination."""
    import errno
    import shutil

    from maefast.train.errors import RunError

    src_file, src_dir = tmp_path / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth.dcp-0a"
    src_file.write_bytes(b"ck")
    src_dir.mkdir()
    (src_dir / "__0_0.distcp").write_bytes(b"shard")

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    ckpt_lib.link_or_copy(str(src_file), str(tmp_path / "checkpoint-0001.pth"))
    ckpt_lib.link_or_copy(str(src_dir), str(tmp_path / "checkpoint-0001.pth.dcp-0a"))
    assert (tmp_path / "checkpoint-0001.pth").read_bytes() == b"ck"
    assert (tmp_path / "checkpoint-0001.pth.dcp-0a" / "__0_0.distcp").read_bytes() == b"shard"
    before = sorted(os.listdir(tmp_path))

    def full(src, dst, **kw):
        with open(dst, "wb") as f:
            f.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device", dst)

    monkeypatch.setattr(shutil, "copy2", full)
    for src, dst in ((src_file, "checkpoint-0002.pth"), (src_dir, "checkpoint-0002.pth.dcp-0a")):
        with pytest.raises((OSError, RunError), match="No space left|no space left"):
            ckpt_lib.link_or_copy(str(src), str(tmp_path / dst))
        assert sorted(os.listdir(tmp_path)) == before, dst


def test_load_checkpoint_names_what_is_wrong_with_a_file(tmp_path, monkeypatch):
    """Each kind of file that is not a checkpoint is one clear error naming it: a missing path, a file
    holding a bare tensor or non-tensor weights or pickled Python objects (never unpickled), a sharded
    checkpoint whose folder is gone, a file this user may not read."""
    import fractions

    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth' does not exist"):
        load_checkpoint(missing)
    cases = {"tensor.pth": (torch.zeros(2), "no 'model' entry"),
             "numbers.pth": ({"model": {"w": 1}}, "'model' is a dict with non-tensor entries"),
             "objects.pth": ({"model": {"w": torch.ones(1)}, "note": fractions.Fraction(1, 3)},
                             "it holds Python objects, not only tensors")}
    for name, (obj, words) in cases.items():
        torch.save(obj, tmp_path / name)
        for optimizer in (True, False):
            with pytest.raises(ValueError, match=words) as info:
                load_checkpoint(str(tmp_path / name), optimizer=optimizer)
            assert name in str(info.value) and "weights_only" not in str(info.value)
    # a text file (e.g. log.jsonl passed as --resume) is not said to hold Python objects
    (tmp_path / "log.jsonl").write_text('{"epoch": 0}\n')
    with pytest.raises(ValueError, match="log.jsonl' is not a readable .*not a file torch.save wrote"):
        load_checkpoint(str(tmp_path / "log.jsonl"))
    sharded = tmp_path / "checkpoint-last.pth"
    ckpt_lib.atomic_save({"shards": "checkpoint-last.pth.dcp-0a", "step": 1}, str(sharded))
    with pytest.raises(FileNotFoundError, match="checkpoint-last.pth.dcp-0a'?, which is missing"):
        load_checkpoint(str(sharded), states=False)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(PermissionError, match="cannot read checkpoint .*checkpoint-last.pth'?: Permission denied"):
        load_checkpoint(str(sharded))


def test_a_sharded_checkpoint_read_for_its_weights_leaves_the_optimizer_and_ctrl_c_is_not_damage(tmp_path):
    """load_checkpoint(optimizer=False) of a sharded checkpoint (what visualize reads) unshards the model
    only; a Ctrl-C while the shards are read stays a KeyboardInterrupt (not "damaged or incomplete")."""
    from maefast.train.state import save_shards

    m = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    save_shards(str(tmp_path / "checkpoint-last.pth.dcp-0a"), m, opt)
    ckpt_lib.atomic_save({"shards": "checkpoint-last.pth.dcp-0a", "step": 1}, str(tmp_path / "checkpoint-last.pth"))
    weights = load_checkpoint(str(tmp_path / "checkpoint-last.pth"), optimizer=False)
    assert weights["optimizer"] is None and torch.equal(weights["model"]["weight"], m.weight.detach())
    assert load_checkpoint(str(tmp_path / "checkpoint-last.pth"))["optimizer"]["state"]
    with pytest.raises(KeyboardInterrupt):
        with ckpt_lib.reading_shards(str(tmp_path / "checkpoint-last.pth.dcp-0a")):
            raise KeyboardInterrupt


def test_check_resumable_refuses_what_cannot_continue_a_run():
    """An export, weights without the run's optimizer or position, a newer format: each refused in one
    line naming what is missing; a sharded checkpoint's optimizer is in its folder (not missing)."""
    sd = create_model("mae_vit_tiny_test").state_dict()
    run = {"model": sd, "optimizer": {}, "step": 3, "epoch": 1, "model_name": "mae_vit_tiny_test"}
    ckpt_lib.check_resumable(run, "ck.pth")
    ckpt_lib.check_resumable({**{k: v for k, v in run.items() if k not in ("model", "optimizer")},
                              "shards": "ck.pth.dcp-0a"}, "ck.pth")
    with pytest.raises(ValueError, match="encoder-only file"):
        ckpt_lib.check_resumable({"model": ckpt_lib.encoder_state_dict(sd)}, "ck.pth")
    for key in ("optimizer", "step", "epoch", "model_name"):
        with pytest.raises(ValueError, match=f"not a maefast train run's state \\(no {key}\\)"):
            ckpt_lib.check_resumable({k: v for k, v in run.items() if k != key}, "ck.pth")
    with pytest.raises(ValueError, match="written by a newer maefast \\(checkpoint format 3"):
        ckpt_lib.check_resumable({**run, "format_version": ckpt_lib.FORMAT_VERSION + 1}, "ck.pth")


def test_encoder_export_names_and_refusals():
    """The official release file names for the official models; a state dict with no MAE encoder
    (another model's) is refused, not exported as an empty file."""
    assert ckpt_lib.release_filename("mae_vit_base_patch16") == "mae_pretrain_vit_base.pth"
    assert ckpt_lib.release_filename("mae_vit_huge_patch14") == "mae_pretrain_vit_huge.pth"
    assert ckpt_lib.release_filename("mae_vit_tiny_test") == "mae_pretrain_vit_tiny_test.pth"
    with pytest.raises(ValueError, match="no MAE encoder keys"):
        ckpt_lib.encoder_state_dict({"fc.weight": torch.ones(2)})
