"""The resume contract through the CLI: options left out keep the run's values, run-defining ones
cannot change, the global batch is the run's at any world size (the resumed position is exact in
samples), steps.jsonl holds one line per step, and sharded (FSDP, torch.distributed.checkpoint) and
single-file checkpoints resume each other at another world size (gloo on the CPU)."""
import json
import os

import pytest
import torch

from train_cli_helpers import TINY, assert_states_close, cli, lines, one_line_error

from maefast.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.mark.slow
def test_options_left_out_keep_the_run_and_run_defining_ones_cannot_change(tmp_path):
    out = str(tmp_path / "run")
    base = ["train", *TINY, "--synthetic-size", "16", "--output-dir", out]
    first = cli(*base, "--batch-size", "4", "--epochs", "2", "--max-steps", "2", "--weight-decay", "0.3",
                "--mask-ratio", "0.5")
    assert first.returncode == 0, first.stderr[-3000:]
    # --weight-decay 0.3 on resume used to be ignored while the config recorded it; --seed / --mask-ratio
    # changed data order and masks without a word: now one line names each with the run's value
    line = one_line_error(cli(*base, "--resume", "auto", "--weight-decay", "0.05", "--seed", "1", "--mask-ratio",
                              "0.5"), "maefast train", "--weight-decay 0.05 (the run's: 0.3)",
                          "--seed 1 (the run's: 0)")
    assert "--mask-ratio" not in line  # the same value as recorded is no change
    one_line_error(cli(*base, "--resume", "auto", "--batch-size", "8"), "maefast train",
                   "global batch of 8, the run's is 4")
    # left out: the run's values (batch 4, weight decay 0.3, mask ratio 0.5); --epochs may change: announced
    res = cli(*base, "--resume", "auto", "--epochs", "3", "--log-every", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "continuing with --epochs 2 -> 3" in res.stderr and "lr schedule is recomputed" in res.stderr
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ck["step"] == 12 and (ck["config"]["epochs"], ck["config"]["weight_decay"]) == (3, 0.3)
    assert (ck["config"]["mask_ratio"], ck["config"]["batch_size"]) == (0.5, 4)
    assert [g["weight_decay"] for g in ck["optimizer"]["param_groups"]] == [0.0, 0.3]
    assert ck["history"] == [{"resumed_at_step": 2, "world_size": 1,
                              "changed": {"epochs": [2, 3], "log_every": [10, 1]}}]
    steps = [r["step"] for r in lines(os.path.join(out, "steps.jsonl"))]
    assert steps == [2] + list(range(3, 13))  # one line per step (the first run logged at its --max-steps)
    # the run is finished (3 epochs): --epochs 1 would end it before that (it was announced as "continuing
    # with --epochs 3 -> 1" and reported a NaN loss at 0 img/s); --epochs 3 finishes what a finished run
    # writes (a run stopped after its last checkpoint, or one without its export), saying so
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    one_line_error(cli(*base, "--resume", "auto", "--epochs", "1"), "maefast train",
                   "has trained 3 epochs (step 12)", "--epochs 1 would end it before that")
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before
    res = cli(*base, "--resume", "auto", "--export")
    assert res.returncode == 0 and "nothing left to train" in res.stderr, res.stderr[-3000:]
    assert "loss nan" not in res.stderr and any(n.startswith("mae_pretrain_") for n in os.listdir(out))


@pytest.mark.slow
def test_a_fresh_start_never_mixes_its_logs_with_an_old_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    old = [{"step": s, "epoch": 0.1 * s, "loss": 9.0, "lr": 0.0, "img_per_s": 1.0} for s in range(1, 8)]
    (out / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))  # a run killed before its save
    base = ["train", *TINY, "--synthetic-size", "8", "--batch-size", "4", "--log-every", "1", "--output-dir", str(out)]
    one_line_error(cli(*base), "maefast train", "steps.jsonl", "--resume auto", "--overwrite")
    res = cli(*base, "--resume", "auto")  # nothing to continue: a fresh start, the dead run's lines dropped
    assert res.returncode == 0 and "no checkpoint, fresh start" in res.stderr, res.stderr[-3000:]
    assert [(r["step"], r["loss"] != 9.0) for r in lines(out / "steps.jsonl")] == [(1, True), (2, True)]


def _common(n=36):
    # 36 images, global batch 8: 4 steps, the same 32 samples at every world size (the tail of 4 dropped)
    return ["train", *TINY, "--synthetic-size", str(n), "--epochs", "1", "--lr", "1e-3", "--warmup-epochs", "0.25",
            "--log-every", "1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    res = cli(*_common(), "--batch-size", "8", "--output-dir", out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [
    ("ddp2", "one"),     # single file from 2 processes, resumed on 1 (batch 4 -> 8: the same global batch)
    ("fsdp2", "one"),    # sharded (torch.distributed.checkpoint), resumed unsharded on 1 process
    ("one", "fsdp2")])   # single file from 1 process, resumed sharded on 2
def test_resume_at_another_world_size_and_layout(tmp_path, straight, first, then):
    out = str(tmp_path / "run")
    how = {"one": (["--batch-size", "8"], 0), "ddp2": (["--batch-size", "4"], 2),
           "fsdp2": (["--batch-size", "4", "--fsdp"], 2)}
    extra, nproc = how[first]
    a = cli(*_common(), *extra, "--max-steps", "2", "--output-dir", out, nproc=nproc)
    assert a.returncode == 0, a.stderr[-3000:]
    ck = load_checkpoint(os.path.join(out, "checkpoint-last.pth"), states=False)
    assert (ck["step"], ck["samples"], bool(ck.get("shards"))) == (2, 16, first == "fsdp2")
    assert "4 steps/epoch" in a.stderr  # 36 images: 4 steps of 8 at every world size (the same 4 dropped)
    extra, nproc = how[then]
    extra = extra[2:]  # --batch-size left out: derived from the run's global batch
    b = cli(*_common(), *extra, "--resume", "auto", "--keep-every-epochs", "1", "--output-dir", out, nproc=nproc)
    assert b.returncode == 0, b.stderr[-3000:]
    assert "the same global batch" in b.stderr and "UserWarning" not in b.stderr  # (torch's, reading shards alone)
    got = load_checkpoint(os.path.join(out, "checkpoint-last.pth"))
    want = load_checkpoint(os.path.join(straight, "checkpoint-last.pth"))
    assert got["step"] == want["step"] == 4 and bool(got.get("shards")) == (then == "fsdp2")
    assert_states_close(got["model"], want["model"], f"{first} -> {then}")
    epoch = lines(os.path.join(out, "log.jsonl"))
    assert [(r["epoch"], r["images"], r["complete"]) for r in epoch] == [(0, 32, True)]  # the whole epoch, once
    # and its loss is the straight run's: a per-image mean, whatever split of the global batch each part ran
    # (it counted micro-batches: 2 x 2 of 4 images then 2 of 8 weighed 8 images as much as 4)
    want_loss = lines(os.path.join(straight, "log.jsonl"))[0]["train_loss"]
    assert epoch[0]["train_loss"] == pytest.approx(want_loss, rel=1e-5, abs=0), (first, then)
    assert [r["step"] for r in lines(os.path.join(out, "steps.jsonl"))] == [1, 2, 3, 4]
    # the sharded folder of the checkpoint being replaced is gone; the kept copy of epoch 0 (hard links)
    # has its own; visualize reads either layout
    kept = load_checkpoint(os.path.join(out, "checkpoint-0000.pth"))
    assert kept["step"] == 4 and all(torch.equal(kept["model"][k], v) for k, v in got["model"].items())
    weights = load_checkpoint(os.path.join(out, "checkpoint-last.pth"), optimizer=False)  # what visualize reads
    assert all(torch.equal(weights["model"][k], v) for k, v in got["model"].items())
    assert got["optimizer"] and (weights.get("optimizer") is None) == (then == "fsdp2")  # not unsharded
    assert sorted(n for n in os.listdir(out) if ".dcp-" in n) == (
        sorted([got["shards"], kept["shards"]]) if then == "fsdp2" else [])
    from maefast.visualize import load_model

    assert load_model(os.path.join(out, "checkpoint-last.pth"))[1] == "mae_vit_tiny_test"


def test_global_batch_rules():
    """Resuming splits the recorded global batch over the new world size, or refuses in one line."""
    from maefast.train.config import TrainConfig
    from maefast.train.resume import reconcile

    ck = {"config": {"batch_size": 4, "accum_iter": 1, "seed": 0}, "schedule": {"global_batch": 8}}
    cfg, notes, changed = reconcile(TrainConfig(explicit=()), ck, "ck.pth", world_size=1)
    assert (cfg.batch_size, changed) == (8, {"batch_size": [4, 8]}) and "same global batch" in notes[0]
    cfg, _, _ = reconcile(TrainConfig(accum_iter=2, explicit=("accum_iter",)), ck, "ck.pth", world_size=2)
    assert (cfg.batch_size, cfg.accum_iter) == (2, 2)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        reconcile(TrainConfig(explicit=()), ck, "ck.pth", world_size=3)
    # 8 processes divide 8: the recorded accumulation (4) is what does not fit, and is what to give (before
    # 2026-12-07 the line said to resume on a number of processes that divides 8)
    accumulated = {"config": {"batch_size": 2, "accum_iter": 4, "seed": 0}, "schedule": {"global_batch": 8}}
    with pytest.raises(ValueError, match="over 8 processes x --accum-iter 4; give an --accum-iter that divides 1 "):
        reconcile(TrainConfig(explicit=()), accumulated, "ck.pth", world_size=8)
    cfg, _, _ = reconcile(TrainConfig(accum_iter=1, explicit=("accum_iter",)), accumulated, "ck.pth", world_size=8)
    assert (cfg.batch_size, cfg.accum_iter) == (1, 1)
    with pytest.raises(ValueError, match="global batch of 12, the run's is 8"):
        reconcile(TrainConfig(batch_size=4, explicit=("batch_size",)), ck, "ck.pth", world_size=3)
    # checked before it divides by them (--accum-iter 0 on resume was a ZeroDivisionError traceback)
    with pytest.raises(ValueError, match="--accum-iter must be a finite number > 0, got 0"):
        reconcile(TrainConfig(accum_iter=0, explicit=("accum_iter",)), ck, "ck.pth", world_size=1)
    with pytest.raises(ValueError, match="--batch-size must be a finite number > 0, got -2"):
        reconcile(TrainConfig(batch_size=-2, explicit=("batch_size",)), ck, "ck.pth", world_size=1)


def test_data_may_move_but_not_turn_synthetic():
    """--data on resume: another path is a moved copy (applied, announced); synthetic images for a folder
    (of the same size) or the other way round is other data: refused like a run-defining option."""
    from maefast.train.config import TrainConfig
    from maefast.train.resume import reconcile

    ck = {"config": {"batch_size": 4, "accum_iter": 1, "data": "/data/a"}, "schedule": {"global_batch": 4}}
    _, _, changed = reconcile(TrainConfig(data="/data/b", explicit=("data",)), ck, "ck.pth", world_size=1)
    assert changed == {"data": ["/data/a", "/data/b"]}
    with pytest.raises(ValueError, match="--data synthetic \\(the run's: /data/a\\)"):
        reconcile(TrainConfig(data="synthetic", explicit=("data",)), ck, "ck.pth", world_size=1)


def test_recorded_position_and_global_batch_of_older_checkpoints():
    """Format 2 records the position in samples; format 1 a per-rank micro-batch index (converted with that
    run's batch and world size), and a schedule without its global batch has batch x accum x world."""
    from maefast.train.config import TrainConfig
    from maefast.train.resume import recorded_global_batch, recorded_position, reconcile

    assert recorded_position({"epoch": 1, "samples": 24, "step": 9, "batch": 5}) == (1, 24, 9)
    old = {"epoch": 2, "batch": 3, "step": 11, "schedule": {"batch_size": 4, "accum_iter": 2, "world_size": 2}}
    assert recorded_position(old) == (2, 24, 11)
    assert recorded_global_batch(old) == 16 and recorded_global_batch({}) == 1
    ck = {"config": {"batch_size": 4, "accum_iter": 2}, "schedule": old["schedule"]}
    cfg, _, changed = reconcile(TrainConfig(explicit=()), ck, "ck.pth", world_size=1)
    assert (cfg.batch_size, cfg.accum_iter, changed) == (8, 2, {"batch_size": [4, 8]})


def test_the_same_value_spelled_otherwise_is_no_change():
    """A model alias, --dtype's short spelling, an int given as a float: the recorded value, no change
    announced (nor refused)."""
    from maefast.train.config import TrainConfig
    from maefast.train.resume import reconcile

    rec = {"model": "mae_vit_tiny_test", "dtype": "bfloat16", "epochs": 2, "batch_size": 4, "accum_iter": 1}
    ck = {"config": rec, "schedule": {"global_batch": 4}}
    cfg, notes, changed = reconcile(TrainConfig(model="tiny", dtype="bf16", epochs=2.0,
                                                explicit=("model", "dtype", "epochs")), ck, "ck.pth", world_size=1)
    assert (changed, notes) == ({}, [])
    assert (cfg.model, cfg.dtype, cfg.epochs) == ("mae_vit_tiny_test", "bfloat16", 2)


def test_changes_are_announced_with_what_they_change():
    """Each change is named with both values; the lr schedule is said to be recomputed for a new --epochs
    only; --no-save does not take the run's checkpoint rhythm (it writes no checkpoint)."""
    from maefast.train.config import TrainConfig
    from maefast.train.resume import reconcile

    rec = {"epochs": 2, "dtype": "float32", "batch_size": 4, "accum_iter": 1, "save_every_steps": 2,
           "keep_every_epochs": 1}
    ck = {"config": rec, "schedule": {"global_batch": 4}}
    cfg, notes, changed = reconcile(TrainConfig(dtype="bfloat16", explicit=("dtype",)), ck, "ck.pth", world_size=1)
    assert changed == {"dtype": ["float32", "bfloat16"]} and (cfg.save_every_steps, cfg.keep_every_epochs) == (2, 1)
    assert len(notes) == 1 and "--dtype float32 -> bfloat16" in notes[0] and "lr schedule" not in notes[0]
    assert "global batch" not in notes[0]
    # a short spelling is announced and recorded by its name, as the config records it (was "-> fp16")
    cfg, notes, changed = reconcile(TrainConfig(dtype="fp16", explicit=("dtype",)), ck, "ck.pth", world_size=1)
    assert changed == {"dtype": ["float32", "float16"]} and "--dtype float32 -> float16" in notes[0]
    cfg, notes, changed = reconcile(TrainConfig(epochs=3, save=False, explicit=("epochs", "save")), ck, "ck.pth", 1)
    assert changed == {"epochs": [2, 3]} and "--epochs 2 -> 3" in notes[0] and "lr schedule is recomputed" in notes[0]
    assert (cfg.epochs, cfg.save_every_steps, cfg.keep_every_epochs) == (3, 0, 0)


def test_resume_source(tmp_path):
    """--resume auto: the folder's checkpoint-last.pth if there is one; a path: itself; no --resume: a fresh
    start even over a folder holding a checkpoint (the folder rules refuse it later, by name)."""
    from maefast.train.config import TrainConfig
    from maefast.train.resume import resume_source

    auto = TrainConfig(resume="auto", output_dir=str(tmp_path))
    assert resume_source(auto) is None
    (tmp_path / "checkpoint-last.pth").write_bytes(b"")
    assert resume_source(auto) == str(tmp_path / "checkpoint-last.pth")
    assert resume_source(TrainConfig(output_dir=str(tmp_path))) is None
    assert resume_source(TrainConfig(resume="/x/ck.pth", output_dir=str(tmp_path))) == "/x/ck.pth"
    with pytest.raises(ValueError, match="--resume takes a checkpoint file or 'auto', got ''"):
        resume_source(TrainConfig(resume="", output_dir=str(tmp_path)))


def test_every_option_has_a_resume_rule():
    """A new TrainConfig field must be placed in the resume contract (maefast/train/resume.py), or a
    resumed run would take the new value silently (--decode was added without one)."""
    import dataclasses

    from maefast.train.config import INTERNAL_FIELDS, TrainConfig
    from maefast.train.resume import CHANGEABLE, PER_INVOCATION, RUN_DEFINING

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(INTERNAL_FIELDS)
    ruled = [*RUN_DEFINING, *CHANGEABLE, *PER_INVOCATION]
    assert len(ruled) == len(set(ruled)), "an option in two rules"
    assert fields == set(ruled), f"no rule: {sorted(fields - set(ruled))}; not an option: {sorted(set(ruled) - fields)}"


def test_a_run_recorded_with_the_removed_fused_on_says_how_to_continue():
    """--fused on was removed (issue 14); a checkpoint that recorded it resumes only with another mode,
    and says which: never a traceback, never a silent other mode."""
    from maefast.train.config import TrainConfig, resolve_config

    with pytest.raises(ValueError, match="--fused on was removed.*--fused off or --fused block"):
        resolve_config(TrainConfig(data="synthetic", fused="on", model="mae_vit_tiny_test"), cuda=False)


# -- in process (maefast.train.train): the log and the folder rules around a resume --------------------

def _cfg(out, **kw):
    from maefast.train import TrainConfig

    base = dict(model="mae_vit_tiny_test", data="synthetic", synthetic_size=12, batch_size=4, epochs=2, lr=1e-3,
                progress=False, workers=0, device="cpu", plot=False, export=False, log_every=1,
                output_dir=str(out))
    return TrainConfig(**{**base, **kw})


def test_an_epoch_line_a_crash_missed_is_written_on_resume(tmp_path, monkeypatch):
    """A stop between an epoch's checkpoint and its log.jsonl line lost the line for good (the resume
    starts at the next epoch): the checkpoint carries it and the resume writes it."""
    from maefast.train import loop, train

    real = loop._Trainer._write

    def crash(self, log, record):
        if record.get("epoch") == 0 and "train_loss" in record:
            raise RuntimeError("killed after the checkpoint, before the log line")
        return real(self, log, record)

    monkeypatch.setattr(loop._Trainer, "_write", crash)
    with pytest.raises(RuntimeError, match="killed after the checkpoint"):
        train(_cfg(tmp_path / "run"))
    monkeypatch.setattr(loop._Trainer, "_write", real)
    assert lines(str(tmp_path / "run" / "log.jsonl")) == []
    train(_cfg(tmp_path / "run", resume="auto"))
    train(_cfg(tmp_path / "straight"))
    got, want = (lines(str(tmp_path / d / "log.jsonl")) for d in ("run", "straight"))
    assert [(r["epoch"], r["step"]) for r in got] == [(0, 3), (1, 6)] == [(r["epoch"], r["step"]) for r in want]
    assert got[0]["train_loss"] == want[0]["train_loss"]


def test_folder_rules_around_a_resume(tmp_path):
    """--resume auto over a finished --no-save run (its logs, no checkpoint) is refused (it deleted the logs
    for a 'fresh start'); --no-save resumes a run recorded with --save-every-steps; a mid-epoch checkpoint
    resumed with --epochs equal to its epoch is refused (it ended the run past --epochs, 'finished')."""
    from maefast.train import train

    train(_cfg(tmp_path / "nosave", save=False))
    before = open(tmp_path / "nosave" / "log.jsonl").read()
    with pytest.raises(ValueError, match="no checkpoint-last.pth to continue from"):
        train(_cfg(tmp_path / "nosave", resume="auto", max_steps=2))
    with pytest.raises(ValueError, match="with no checkpoint-last.pth to continue from: pick another"):
        train(_cfg(tmp_path / "nosave"))
    assert open(tmp_path / "nosave" / "log.jsonl").read() == before
    run = tmp_path / "run"
    train(_cfg(run, max_steps=4, save_every_steps=2, keep_every_epochs=1))  # stops 1 step into epoch 1
    res = train(_cfg(run, resume="auto", save=False, max_steps=5))
    assert res is not None
    with pytest.raises(ValueError, match=r"trained 1 epochs and 4 samples of the next .*--epochs >= 2"):
        train(_cfg(run, resume="auto", epochs=1))


def test_a_damaged_checkpoint_is_refused_before_the_folder_is_touched(tmp_path):
    """A checkpoint lacking a weight resumed silently with that weight freshly initialised (torch's full-state
    loading fills it in), one lacking its optimizer state restarted AdamW's moments; one with a weight of another
    shape, or an extra one, failed with a traceback after --overwrite had deleted the old run. Each is one
    ValueError now, from the plan, with the old run left whole."""
    from maefast.train import train

    train(_cfg(tmp_path / "base", max_steps=2))
    ck = torch.load(tmp_path / "base" / "checkpoint-last.pth", weights_only=False)
    name = "blocks.0.attn.qkv.weight"
    damaged = {"lacks": ({k: v for k, v in ck["model"].items() if k != name}, None),
               "shape": ({**ck["model"], name: torch.zeros(5, 5)}, None),
               "extra": ({**ck["model"], "extra.weight": torch.zeros(2)}, None),
               "no optimizer state": (ck["model"], {**ck["optimizer"], "state": {}})}
    why = {"lacks": f"it lacks {name}", "shape": rf"its {name} has shape \(5, 5\), the model's",
           "extra": "it holds extra.weight, which the model has not",
           "no optimizer state": "its optimizer state is empty, though it records 2 steps"}
    run = tmp_path / "run"
    train(_cfg(run, max_steps=1))
    before = sorted(os.listdir(run))
    for what, (model, opt) in damaged.items():
        path = tmp_path / f"{what}.pth"
        torch.save({**ck, "model": model, "optimizer": opt or ck["optimizer"]}, path)
        with pytest.raises(ValueError, match=f"does not fit this run's model .*{why[what]}"):
            train(_cfg(run, resume=str(path), overwrite=True))
        assert sorted(os.listdir(run)) == before, what
    train(_cfg(tmp_path / "again", resume=str(tmp_path / "base" / "checkpoint-last.pth"), max_steps=3))


def test_a_sharded_checkpoints_names_and_shapes_are_checked_from_its_metadata(tmp_path):
    """A sharded checkpoint that does not fit was found only by torch.distributed.checkpoint's load, after the
    folder's --overwrite; its metadata (names, sizes; no tensor read) is checked in the plan now."""
    import torch.distributed.checkpoint as dcp

    from maefast.models import create_model
    from maefast.train.checkpoint import check_states_fit

    model = create_model("mae_vit_tiny_test")
    sd = model.state_dict()
    path = str(tmp_path / "checkpoint-last.pth")
    for name, (states, fits) in {"whole": (sd, True), "lacking": ({k: v for k, v in sd.items() if k != "norm.bias"},
                                                                     "it lacks norm.bias"),
                                 "reshaped": ({**sd, "norm.bias": torch.zeros(3)}, r"its norm.bias has shape \(3,\)")
                                 }.items():
        dcp.save({"model": states, "optimizer": {"state": {"x": {"exp_avg": torch.zeros(1)}}}},
                 checkpoint_id=str(tmp_path / name), no_dist=True)
        ck = {"shards": name, "step": 2, "model_name": "mae_vit_tiny_test"}
        if fits is True:
            check_states_fit(ck, path, model)
        else:
            with pytest.raises(ValueError, match=f"does not fit this run's model .*{fits}"):
                check_states_fit(ck, path, model)


def test_rewinding_in_place_keeps_the_log_lines_up_to_the_checkpoint(tmp_path):
    from maefast.train import train

    run = tmp_path / "run"
    train(_cfg(run, keep_every_epochs=1, epochs=3))
    assert all(os.path.exists(run / f"checkpoint-000{e}.pth") for e in (0, 1, 2))
    with pytest.raises(ValueError, match="is an earlier checkpoint of the run"):
        train(_cfg(run, resume=str(run / "checkpoint-0001.pth"), epochs=3))
    kept0 = os.stat(run / "checkpoint-0000.pth").st_mtime_ns
    train(_cfg(run, resume=str(run / "checkpoint-0001.pth"), epochs=3, overwrite=True))
    assert [r["step"] for r in lines(str(run / "steps.jsonl"))] == list(range(1, 10))
    assert [r["epoch"] for r in lines(str(run / "log.jsonl"))] == [0, 1, 2]
    assert os.stat(run / "checkpoint-0000.pth").st_mtime_ns == kept0  # the earlier kept checkpoint stays
    # checkpoint-last.pth gone: --resume auto names the kept checkpoint to go on from (not only --overwrite,
    # which alone deletes the kept checkpoints too), and that rewind continues the run
    os.replace(run / "checkpoint-last.pth", tmp_path / "last.pth")
    last = os.path.join(str(run), "checkpoint-0002.pth")
    with pytest.raises(ValueError, match=f"continue from its last kept checkpoint: --resume {last} --overwrite$"):
        train(_cfg(run, resume="auto", epochs=3))
    train(_cfg(run, resume=last, epochs=3, overwrite=True))
    assert [r["epoch"] for r in lines(str(run / "log.jsonl"))] == [0, 1, 2]
    # continuing in place from checkpoint-last.pth with --overwrite keeps the epochs' checkpoints too
    train(_cfg(run, resume=str(run / "checkpoint-last.pth"), epochs=4, overwrite=True))
    assert all(os.path.exists(run / f"checkpoint-000{e}.pth") for e in (0, 1, 2, 3))
    assert [r["epoch"] for r in lines(str(run / "log.jsonl"))] == [0, 1, 2, 3]


def test_a_resume_into_a_new_folder_writes_no_old_epoch_line(tmp_path):
    """The checkpoint's own epoch line is written back only into its own run's log (in place)."""
    from maefast.train import train

    train(_cfg(tmp_path / "a", epochs=1))
    train(_cfg(tmp_path / "b", epochs=2, resume=str(tmp_path / "a" / "checkpoint-last.pth")))
    assert [r["epoch"] for r in lines(str(tmp_path / "b" / "log.jsonl"))] == [1]


def test_a_start_with_nothing_to_train_still_leaves_the_runs_checkpoint(tmp_path):
    """A resume that trains nothing (its run has all its epochs, or --max-steps is reached) into a new folder
    writes checkpoint-last.pth there, the run as it stands (the result and the last line named a file that
    was not there), so --resume auto continues from that folder; it is not written again where it is."""
    from maefast.train import train

    train(_cfg(tmp_path / "a", epochs=1, max_steps=2))
    src = str(tmp_path / "a" / "checkpoint-last.pth")
    for out, kw in (("b", dict(epochs=1, max_steps=2)), ("c", dict(epochs=1, max_steps=1))):
        res = train(_cfg(tmp_path / out, resume=src, **kw))
        assert res["steps"] == 2 and res["checkpoint"] and os.path.isfile(res["checkpoint"]), out
        got, want = load_checkpoint(res["checkpoint"]), load_checkpoint(src)
        assert (got["epoch"], got["samples"], got["step"]) == (want["epoch"], want["samples"], 2) == (0, 8, 2)
        assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
        assert got["epoch_stats"] == want["epoch_stats"] and got["rng"][0]["torch"].equal(want["rng"][0]["torch"])
    mtime = os.stat(src).st_mtime_ns
    train(_cfg(tmp_path / "a", epochs=1, max_steps=2, resume="auto"))  # in place: the file is the source
    assert os.stat(src).st_mtime_ns == mtime
    train(_cfg(tmp_path / "b", epochs=1, resume="auto"))
    straight = train(_cfg(tmp_path / "straight", epochs=1))
    a, b = (load_checkpoint(os.path.join(d, "checkpoint-last.pth")) for d in (straight["output_dir"], tmp_path / "b"))
    assert a["step"] == b["step"] == 3 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # from an epoch's end: the copy keeps the log line a later in-place resume restores a missing log.jsonl from
    res = train(_cfg(tmp_path / "e", epochs=1, resume=os.path.join(straight["output_dir"], "checkpoint-last.pth")))
    got = load_checkpoint(res["checkpoint"])
    assert got["log_record"] is not None and got["log_record"] == a["log_record"]


def test_api_resume_is_exact_and_its_overrides_count_as_set(tmp_path):
    """In Python: a mid-epoch resume continues the straight run bit for bit, torch's RNG state included
    (the loader drew its workers' base seed from torch's global generator: one draw more per resume),
    and keyword overrides of a config that lists what was set (a run's result, the command line's)
    count as set (epochs=2 was dropped for the checkpoint's 1)."""
    from maefast.train import train

    straight = train(_cfg(tmp_path / "straight", epochs=None))  # synthetic data: 1 epoch of 3 steps
    cut = train(_cfg(tmp_path / "cut", epochs=None), max_steps=2)  # stopped inside it
    done = train(cut["config"], resume="auto", max_steps=None)
    a = load_checkpoint(os.path.join(straight["output_dir"], "checkpoint-last.pth"))
    b = load_checkpoint(os.path.join(done["output_dir"], "checkpoint-last.pth"))
    assert a["step"] == b["step"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert "epochs" not in done["config"].explicit
    more = train(done["config"], resume="auto", epochs=2)
    ck = load_checkpoint(os.path.join(more["output_dir"], "checkpoint-last.pth"), states=False)
    assert ck["step"] == 6 and ck["config"]["epochs"] == 2


def test_a_mid_epoch_resume_then_whole_epochs_is_exact(tmp_path):
    """Stopped inside epoch 1 of 3 and resumed: the rest of epoch 1 starts where the stop left it, and
    epoch 2 runs whole (the offset is the resumed epoch's only); the weights are the straight run's."""
    from maefast.train import train

    train(_cfg(tmp_path / "straight", epochs=3))
    train(_cfg(tmp_path / "cut", epochs=3, max_steps=4))  # 1 step into epoch 1 (3 steps an epoch)
    train(_cfg(tmp_path / "cut", epochs=3, resume="auto"))
    a, b = (load_checkpoint(str(tmp_path / d / "checkpoint-last.pth")) for d in ("straight", "cut"))
    assert a["step"] == b["step"] == 9
    assert [r["images"] for r in lines(str(tmp_path / "cut" / "log.jsonl"))] == [12, 12, 12]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_an_fp16_resume_restores_the_grad_scaler(tmp_path):
    """fp16 (GradScaler) stopped and resumed: the scaler's scale and growth tracker continue, as straight."""
    from maefast.train import train

    train(_cfg(tmp_path / "straight", epochs=1, synthetic_size=16, dtype="float16"))
    train(_cfg(tmp_path / "cut", epochs=1, synthetic_size=16, dtype="float16", max_steps=2))
    train(_cfg(tmp_path / "cut", epochs=1, synthetic_size=16, dtype="float16", resume="auto"))
    a, b = (load_checkpoint(str(tmp_path / d / "checkpoint-last.pth")) for d in ("straight", "cut"))
    assert a["scaler"] and a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_overwrite_never_deletes_the_checkpoint_it_resumes_from(tmp_path):
    """--overwrite with --resume of the folder's own checkpoint-last.pth (here a run with nothing left to
    train) clears the folder but keeps the checkpoint it continues from."""
    from maefast.train import train

    run = tmp_path / "run"
    train(_cfg(run, epochs=1, max_steps=2))
    ck = run / "checkpoint-last.pth"
    train(_cfg(run, epochs=1, max_steps=2, resume=str(ck), overwrite=True))
    assert ck.is_file() and load_checkpoint(str(ck))["step"] == 2


def test_a_rewind_with_nothing_to_train_redraws_the_loss_curve(tmp_path):
    """A rewind to a kept checkpoint at the run's last epoch (--overwrite: later files go) trains nothing;
    the loss curve it deleted is drawn again from the log lines kept up to it (the result named a missing
    file); a start that finds the curve in place leaves it as it is."""
    from maefast.train import train

    run = tmp_path / "run"
    train(_cfg(run, epochs=2, plot=True, keep_every_epochs=1))
    curve = run / "loss_curve.png"
    assert curve.is_file() and (run / "checkpoint-0001.pth").is_file()
    res = train(_cfg(run, epochs=2, plot=True, resume=str(run / "checkpoint-0001.pth"), overwrite=True))
    assert res["steps"] == 6 and res["loss_curve"] == str(curve) and curve.is_file()
    mtime = curve.stat().st_mtime_ns
    res = train(_cfg(run, epochs=2, plot=True, resume="auto"))
    assert res["loss_curve"] == str(curve) and curve.stat().st_mtime_ns == mtime


# a recorded value and another for each run-defining option
_OTHER = {"model": ("mae_vit_tiny_test", "mae_vit_small_cpu"), "input_size": (32, 48), "norm_pix_loss": (False, True),
          "seed": (0, 1), "mask_ratio": (0.75, 0.5), "synthetic_size": (16, 32), "blr": (1.5e-4, 1e-3),
          "lr": (1e-3, 2e-3), "min_lr": (0.0, 1e-6), "weight_decay": (0.05, 0.1), "warmup_epochs": (1.0, 2.0),
          "clip_grad": (1.0, 2.0)}


@pytest.mark.parametrize("name", sorted(_OTHER))
def test_every_run_defining_option_is_refused_on_resume(name):
    from maefast.train.config import TrainConfig
    from maefast.train.resume import RUN_DEFINING, reconcile

    assert set(_OTHER) == set(RUN_DEFINING)  # a new run-defining option gets its case here
    old, new = _OTHER[name]
    ck = {"config": {"batch_size": 4, "accum_iter": 1, name: old}, "schedule": {"global_batch": 4}}
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} {new} \\(the run's: {old}\\)"):
        reconcile(TrainConfig(**{name: new}, explicit=(name,)), ck, "ck.pth", world_size=1)


def test_a_position_at_the_end_of_an_epoch_continues_at_the_next_one():
    """A checkpoint whose position is the epoch's last full global batch (a format-1 checkpoint of the epoch's last
    micro-batch: 3 steps of 4 of 14 images) continues at the start of the next epoch, not with an empty rest of it."""
    from maefast.train.config import TrainConfig
    from maefast.train.resume import start_position

    cfg = TrainConfig(model="mae_vit_tiny_test", epochs=2)
    old = {"model_name": "mae_vit_tiny_test", "epoch": 0, "batch": 3, "step": 3, "schedule": {"batch_size": 4}}
    assert start_position(old, "ck.pth", cfg, {}, 14, 4) == (1, 0, 3)
    assert start_position({**old, "batch": 2}, "ck.pth", cfg, {}, 14, 4) == (0, 8, 3)
