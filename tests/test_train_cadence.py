"""The training loop's bookkeeping, in process with the tiny model: the lr --blr scales to, what
steps.jsonl and log.jsonl record (fractional epochs, the epoch's last window, the epoch's lr), when
checkpoints are written and kept (--save-every-steps, --keep-every-epochs), what a resumed start counts,
and the data that is refused before the first step (too few images, another folder than the run's)."""
import os

import pytest
import torch

from train_cli_helpers import lines

from maefast.train import load_checkpoint, loop, train
from maefast.train.config import TrainConfig
from maefast.train.errors import RunError


def _cfg(out, **kw) -> TrainConfig:
    base = dict(model="mae_vit_tiny_test", data="synthetic", synthetic_size=12, batch_size=4, epochs=1, lr=1e-3,
                progress=False, workers=0, device="cpu", plot=False, export=False, log_every=1, output_dir=str(out))
    return TrainConfig(**{**base, **kw})


def _saves(monkeypatch) -> list:
    """Records each checkpoint write as (epoch it continues at, samples into it, step, kept file)."""
    calls = []
    real = loop._Trainer._save

    def save(self, epoch_next, samples_next, stats, keep=None, log_record=None):
        calls.append((epoch_next, samples_next, self.step, keep))
        return real(self, epoch_next, samples_next, stats, keep, log_record)

    monkeypatch.setattr(loop._Trainer, "_save", save)
    return calls


def _folder(root, n_good, n_bad, size=32):
    from maefast.train.data import SyntheticDataset

    src = SyntheticDataset(n_good, size, 4, data_seed=7)
    root.mkdir(parents=True)
    for i in range(n_good):
        src.load(i).save(root / f"{i}.png")
    for i in range(n_bad):
        (root / f"bad{i}.jpg").write_bytes(os.urandom(200))
    return root


def test_blr_scales_with_the_global_batch_accumulation_included(tmp_path):
    """lr = blr x batch x accum x world / 256 (the official rule): accumulation counts as batch."""
    res = train(_cfg(tmp_path / "run", lr=None, blr=1e-3, synthetic_size=16, batch_size=2, accum_iter=4))
    ck = load_checkpoint(res["checkpoint"], states=False)
    assert ck["schedule"]["lr"] == pytest.approx(1e-3 * 8 / 256, rel=1e-12)
    assert res["loss_curve"] is None and res["encoder"] is None  # --no-plot, --no-export: nothing named


def test_step_lines_carry_fractional_epochs_and_each_epochs_last_window(tmp_path):
    """steps.jsonl: a line every --log-every steps and at each epoch's end (3 steps an epoch, every 2:
    steps 2, 3 | 4, 6), its epoch the fraction of the micro-batches done (accumulation of 2); log.jsonl's
    lr is the epoch's last step's."""
    out = tmp_path / "run"
    train(_cfg(out, synthetic_size=12, batch_size=2, accum_iter=2, epochs=2, log_every=2, warmup_epochs=1))
    steps = lines(str(out / "steps.jsonl"))
    assert [r["step"] for r in steps] == [2, 3, 4, 6]
    assert [r["epoch"] for r in steps] == pytest.approx([2 / 3, 1, 1 + 1 / 3, 2])
    epochs = lines(str(out / "log.jsonl"))
    assert [r["train_lr"] for r in epochs] == [steps[1]["lr"], steps[3]["lr"]]


def test_save_every_steps_writes_the_position_in_samples(tmp_path, monkeypatch):
    """--save-every-steps 2 with 4 steps of 2 x 2 micro-batches: a mid-epoch checkpoint after step 2 at
    sample 8 (not micro-batch 4 x the batch), then the epoch's end; none twice."""
    calls = _saves(monkeypatch)
    train(_cfg(tmp_path / "run", synthetic_size=16, batch_size=2, accum_iter=2, save_every_steps=2))
    assert calls == [(0, 8, 2, None), (1, 0, 4, None)]


def test_keep_every_epochs_keeps_every_nth_finished_epoch(tmp_path, monkeypatch):
    """--keep-every-epochs 2 over 3 epochs keeps epoch 1's checkpoint (the 2nd) only; an epoch cut short by
    --max-steps is not kept, even at a multiple, and its log.jsonl line says it is not complete."""
    out = tmp_path / "run"
    train(_cfg(out, epochs=3, keep_every_epochs=2))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-0")) == ["checkpoint-0001.pth"]
    assert [r["complete"] for r in lines(str(out / "log.jsonl"))] == [True, True, True]
    calls = _saves(monkeypatch)
    cut = tmp_path / "cut"
    train(_cfg(cut, epochs=3, keep_every_epochs=1, max_steps=2))
    assert calls == [(0, 8, 2, None)] and not any(n.startswith("checkpoint-0") for n in os.listdir(cut))
    assert [r["complete"] for r in lines(str(cut / "log.jsonl"))] == [False]  # the epoch's line so far


def test_the_starts_of_a_run_count_what_each_trained(tmp_path):
    """A run stopped mid-epoch and resumed: each start reports the files it skipped itself, so the starts
    add up to the straight run's (the resumed epoch's carried count is not counted again)."""
    data = str(_folder(tmp_path / "data", 10, 6))
    kw = dict(data=data, synthetic_size=None, batch_size=4, lr=1e-3)
    straight = train(_cfg(tmp_path / "straight", **kw))
    first = train(_cfg(tmp_path / "cut", **kw, max_steps=2))
    rest = train(_cfg(tmp_path / "cut", **kw, resume="auto"))
    assert straight["skipped_files"] == 6 and first["skipped_files"] > 0
    # the examples each rank sends round are 5 at most (its first ones)
    assert len(lines(str(tmp_path / "straight" / "log.jsonl"))[0]["skipped_examples"]) == 5
    assert first["skipped_files"] + rest["skipped_files"] == 6


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    real = loop._Trainer._call_step

    def nan_at_step_2(self, images, noise, weight, update):
        loss = real(self, images, noise, weight, update)
        return loss * float("nan") if self.step == 1 else loss

    monkeypatch.setattr(loop._Trainer, "_call_step", nan_at_step_2)
    with pytest.raises(RunError, match="loss is nan at step 2 \\(epoch 0\\)"):
        train(_cfg(tmp_path / "run"))


def _nan_loss_at_step(monkeypatch, k: int) -> None:
    """The model's loss is NaN in optimizer step k (1-based), so are its gradients and, in fp32/bf16, its weights."""
    real = loop._Trainer._call_step

    def call(self, images, noise, weight, update):
        hook = self.model.register_forward_hook(lambda m, i, out: (out[0] * float("nan"), *out[1:])) \
            if self.step == k - 1 else None
        try:
            return real(self, images, noise, weight, update)
        finally:
            if hook is not None:
                hook.remove()

    monkeypatch.setattr(loop._Trainer, "_call_step", call)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_non_finite_loss_between_log_lines_is_never_saved_over_the_last_checkpoint(tmp_path, monkeypatch, dtype):
    """A NaN loss at step 3, --save-every-steps 2, --log-every 6: the run stops at step 4's save, naming it, and
    checkpoint-last.pth stays step 2's. Before 2026-12-07 the loss was read at the log lines only: step 4's checkpoint
    replaced it, with NaN weights in fp32 (in fp16 GradScaler skipped the update, and the run went on)."""
    _nan_loss_at_step(monkeypatch, 3)
    run = tmp_path / "run"
    with pytest.raises(RunError, match=r"a step's loss since the last log line is nan at step 4 \(epoch 0, before its "
                                       r"checkpoint\)"):
        train(_cfg(run, synthetic_size=24, log_every=6, save_every_steps=2, dtype=dtype))
    ck = load_checkpoint(str(run / "checkpoint-last.pth"))
    assert ck["step"] == 2 and all(v.isfinite().all() for v in ck["model"].values() if v.is_floating_point())


def test_a_non_finite_loss_after_the_last_log_line_is_never_saved_at_the_epochs_end(tmp_path, monkeypatch):
    """A NaN loss at the epoch's last step, whose window gets no log line (the epoch's last micro-batch left short by
    unreadable files: a captured or compiled step skips it, so no step ends the epoch): the end-of-epoch checkpoint
    is not written. Before 2026-12-07 only the log lines and the mid-epoch saves read the loss."""
    real_micro = loop._Trainer._micro_step
    _nan_loss_at_step(monkeypatch, 2)

    def last_batch_short(self, batch, b):  # as `_micro_step` answers a short batch a full-batch step skips
        return (False, None, 0) if b == 2 else real_micro(self, batch, b)

    monkeypatch.setattr(loop._Trainer, "_micro_step", last_batch_short)
    run = tmp_path / "run"
    with pytest.raises(RunError, match=r"a step's loss since the last log line is nan at step 2 \(epoch 0, before "
                                       r"its checkpoint\)"):
        train(_cfg(run, log_every=10))
    assert not (run / "checkpoint-last.pth").exists()
    with pytest.raises(RunError, match=r"a step's loss since the last log line is nan at step 2 \(epoch 0\):"):
        train(_cfg(tmp_path / "nosave", log_every=10, save=False))  # (--no-save: no checkpoint to name)


def test_data_refused_before_the_first_step(tmp_path):
    """Too few images for one global batch; a resume on a folder that is not the run's size, or not its
    file names (another data set; a moved copy is the run's); a checkpoint whose position is not a whole
    number of global batches (an edited file)."""
    with pytest.raises(ValueError, match="6 images make no optimizer step: .* = 8 images"):
        train(_cfg(tmp_path / "few", synthetic_size=6, batch_size=4, accum_iter=2))
    assert not (tmp_path / "few").exists()
    data = _folder(tmp_path / "data", 8, 0)
    run = tmp_path / "run"
    kw = dict(data=str(data), synthetic_size=None)
    train(_cfg(run, **kw, max_steps=1))
    path = run / "checkpoint-last.pth"
    ck = torch.load(path, weights_only=False)
    (data / "extra.png").write_bytes((data / "0.png").read_bytes())
    with pytest.raises(ValueError, match="the run trained on 8 images, --data .* has 9"):
        train(_cfg(run, **kw, resume="auto"))
    (data / "extra.png").unlink()
    (data / "0.png").rename(data / "zero.png")  # as many images, another file name
    with pytest.raises(ValueError, match="has as many images as the run trained on, but other file names"):
        train(_cfg(run, **kw, resume="auto"))
    (data / "zero.png").rename(data / "0.png")
    moved = tmp_path / "moved"  # a moved copy of the folder: the same file names under it
    data.rename(moved)
    res = train(_cfg(run, **{**kw, "data": os.path.relpath(moved)}, resume="auto"))
    assert res["steps"] == 2 and res["config"].data == str(moved)
    # the change is recorded as the folder it names (a relative name would point elsewhere from another cwd)
    assert load_checkpoint(str(path), states=False)["history"][-1]["changed"]["data"] == [str(data), str(moved)]
    moved.rename(data)
    ck["samples"] = 2
    torch.save(ck, path)
    with pytest.raises(ValueError, match="stopped 2 samples into epoch 0, not a whole number .* global batches of 4"):
        train(_cfg(run, **kw, resume="auto"))


def test_a_relative_data_path_is_recorded_as_the_folder_it_names(tmp_path, monkeypatch):
    """--data relative to the start's cwd: the checkpoint records the folder it names, so --resume auto from
    another cwd (no --data given) continues on the same images (the name pointed elsewhere: a missing folder,
    or another with the same file names); giving the same folder again, as a relative name, is no change."""
    data = _folder(tmp_path / "data", 8, 0)
    (tmp_path / "elsewhere").mkdir()
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    res = train(_cfg(run, data="data", synthetic_size=None, epochs=2, max_steps=1))
    assert res["config"].data == str(data)
    assert load_checkpoint(str(run / "checkpoint-last.pth"), states=False)["config"]["data"] == str(data)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train(_cfg(run, data="../data", synthetic_size=None, epochs=2, explicit=("data",), max_steps=2,
                      resume="auto"))["steps"] == 2
    res = train(TrainConfig(output_dir=str(run), resume="auto", explicit=(), device="cpu", progress=False, workers=0))
    assert res["steps"] == 4 and res["config"].data == str(data)
    assert not any("--data" in n for n in res["config"].notes)


def test_an_epoch_without_a_readable_image_stops_the_run(tmp_path):
    """9 files, 8 of them unreadable, and the readable one the epoch's dropped tail: the folder passes
    the start's probe, but the epoch trains on nothing, which is said, not logged as a loss."""
    from maefast.train.data import ResumableDistributedSampler

    sampler = ResumableDistributedSampler(range(9), shuffle=True, seed=0, global_batch=4)
    sampler.set_epoch(0)
    dropped = ({*range(9)} - {i for _, i in sampler}).pop()
    data = _folder(tmp_path / "data", 1, 0)
    (data / "0.png").rename(data / f"{dropped}.png")
    for i in {*range(9)} - {dropped}:  # sorted by name: file i is the dataset's index i
        (data / f"{i}.jpg").write_bytes(os.urandom(200))
    with pytest.raises(RunError, match="no readable image in epoch 0 \\(8 files failed to load"):
        train(_cfg(tmp_path / "run", data=str(data), synthetic_size=None))


def test_a_resume_into_an_epoch_past_the_new_epochs_is_refused_naming_the_least(tmp_path):
    """A run stopped 1 step into its 2nd epoch (3 steps an epoch): --epochs 1 would end it before that (it
    trained into epoch 1, not only its 1 epoch) and is refused before anything is touched, naming --epochs 2."""
    run = tmp_path / "run"
    train(_cfg(run, epochs=2, max_steps=4))
    before = sorted(os.listdir(run))
    with pytest.raises(ValueError, match=r"has trained 1 epochs and 4 samples of the next \(step 4\); --epochs 1 "
                                         r"would end it before that: pass --epochs >= 2$"):
        train(_cfg(run, epochs=1, resume="auto"))
    assert sorted(os.listdir(run)) == before and load_checkpoint(str(run / "checkpoint-last.pth"))["step"] == 4


def test_the_steady_rate_leaves_out_the_first_window_alone(tmp_path):
    """img_per_s_steady is every log window's images over their time except the first (start-up, warm-up),
    as steps.jsonl's windows give them (each window's time is its images over its img_per_s)."""
    res = train(_cfg(tmp_path / "run", epochs=1, save=False))
    steps = lines(str(tmp_path / "run" / "steps.jsonl"))
    assert len(steps) == 3 and res["steps"] == 3
    later = steps[1:]
    want = sum(4 for _ in later) / sum(4 / s["img_per_s"] for s in later)
    assert res["img_per_s_steady"] == pytest.approx(want, rel=1e-9)
    with_first = sum(4 for _ in steps) / sum(4 / s["img_per_s"] for s in steps)
    assert res["img_per_s_steady"] != pytest.approx(with_first, rel=1e-9)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_an_infinite_loss_stops_the_run_as_a_nan_does(tmp_path, monkeypatch, bad):
    """Not only NaN: an infinite loss (an fp16 overflow) stops the run at the log line that reads it, naming the step,
    as the official loop's math.isfinite check does."""
    real = loop._Trainer._call_step

    def inf_at_step_2(self, images, noise, weight, update):
        loss = real(self, images, noise, weight, update)
        return loss * 0 + bad if self.step == 1 else loss

    monkeypatch.setattr(loop._Trainer, "_call_step", inf_at_step_2)
    with pytest.raises(RunError, match=rf"loss is {bad} at step 2 \(epoch 0\)"):
        train(_cfg(tmp_path / "run"))
