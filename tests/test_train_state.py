"""Model and optimizer state in and out of checkpoints (maefast/train/state.py), in one process: what a
checkpoint stores of the optimizer, what a resume keeps of this run's, and the sharded layout's folders
(written, named, copied, dropped) through success and failure. torch.distributed.checkpoint's writing
of shards across ranks: tests/test_train_resume.py (through the CLI)."""
import errno
import os

import pytest
import torch

from maefast.train import state as st
from maefast.train.checkpoint import atomic_save, load_checkpoint
from maefast.train.distributed import DistInfo
from maefast.train.errors import RunError

LAST = "checkpoint-last.pth"


def _stepped(**opt_kw):
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), **{"lr": 1e-3, **opt_kw})
    m(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    return m, opt


def _folders(path):
    return sorted(n for n in os.listdir(path) if st.SHARDS_SUFFIX in n)


@pytest.fixture
def fake_shards(monkeypatch):
    """save_shards as torch.distributed.checkpoint leaves it (a folder of files), one process for the ranks."""
    def save_shards(path, target, optimizer):
        os.makedirs(path)
        with open(os.path.join(path, "__0_0.distcp"), "wb") as f:
            f.write(b"shard")

    monkeypatch.setattr(st, "save_shards", save_shards)


def test_a_tensor_lr_is_saved_as_a_float():
    """--cuda-graph keeps each group's lr as a device tensor; the checkpoint stores a float (it is read
    by other runs, eager ones included) and the optimizer keeps its tensor."""
    m, opt = _stepped(lr=torch.tensor(1e-3), foreach=False)
    _, osd = st.full_states(m, opt)
    assert all(type(g["lr"]) is float and g["lr"] == pytest.approx(1e-3) for g in osd["param_groups"])
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)


# capturable with format 2 only on a GPU: loading by names steps the optimizer once (capturable needs a device)
@pytest.mark.parametrize("layout, flag", [("names", "fused"), ("ids", "fused"), ("ids", "capturable")])
def test_resume_keeps_this_runs_capturable_and_fused(layout, flag):
    """A checkpoint of an eager run resumed by a captured (capturable) or fused one keeps this run's
    flags, in either layout (format 2's names, format 1's ids); the state is the checkpoint's."""
    m, a = _stepped(foreach=False)
    if layout == "names":
        msd, osd = st.full_states(m, a)
        ck = {"model": msd, "optimizer": osd, "optimizer_format": "fqn"}
    else:
        ck = {"model": m.state_dict(), "optimizer": a.state_dict()}
    m2 = torch.nn.Linear(3, 2)
    b = torch.optim.AdamW(m2.parameters(), lr=1e-3, **{flag: True})
    st.restore_states(ck, None, m2, m2, b, sharded=False)
    assert b.param_groups[0][flag] is True and not ck["optimizer"]["param_groups"][0][flag]
    assert torch.equal(b.state[m2.weight]["exp_avg"], a.state[m.weight]["exp_avg"]) and torch.equal(m2.weight, m.weight)


def test_a_single_file_checkpoint_resumes_in_either_kind_of_run(tmp_path):
    """save_checkpoint's single file (format 2: names) is read back whole by a run that does not shard and
    by one that does (a single-file run resumes under --fsdp; only format 1 cannot)."""
    m, a = _stepped()
    st.save_checkpoint({"step": 1}, str(tmp_path), LAST, m, a, DistInfo(), sharded=False)
    ck = load_checkpoint(str(tmp_path / LAST))
    for sharded in (False, True):
        m2 = torch.nn.Linear(3, 2)
        b = torch.optim.AdamW(m2.parameters(), lr=1e-3)
        st.restore_states(ck, None, m2, m2, b, sharded=sharded)
        assert torch.equal(m2.weight, m.weight)
        assert torch.equal(b.state[m2.bias]["exp_avg_sq"], a.state[m.bias]["exp_avg_sq"])


def test_a_format_1_checkpoint_is_refused_by_a_sharded_run():
    """Format 1 keys the optimizer state by parameter ids, which FSDP cannot place: a sharded run says how
    to continue it (once without --fsdp) instead of loading it wrong."""
    m, a = _stepped()
    ck = {"model": m.state_dict(), "optimizer": a.state_dict()}
    with pytest.raises(ValueError, match="format 1 .*resume it once without --fsdp"):
        st.restore_states(ck, None, m, m, a, sharded=True)


def _previous(tmp_path):
    """The run's previous sharded checkpoint: step 3, its folder."""
    os.makedirs(tmp_path / f"{LAST}.dcp-0ld")
    atomic_save({"step": 3, "shards": f"{LAST}.dcp-0ld"}, str(tmp_path / LAST))


@pytest.mark.parametrize("cause", ["io", "full", "dcp"])
def test_a_failed_shard_write_leaves_the_previous_checkpoint_and_no_folder(tmp_path, monkeypatch, cause):
    """The shards fail (an I/O error, a full disk, or torch.distributed.checkpoint's CheckpointException, a
    BaseException, carrying a rank's OSError): one RunError told to every rank, said by rank 0; no new file,
    the partial folder removed, the previous checkpoint and its folder untouched."""
    from torch.distributed.checkpoint.api import CheckpointException

    _previous(tmp_path)
    os_err = OSError(errno.ENOSPC if cause == "full" else errno.EIO, "write failed")
    exc = CheckpointException("failed", {1: (os_err, None)}) if cause == "dcp" else os_err

    def failing(path, target, optimizer):
        os.makedirs(path)
        raise exc

    told = []
    monkeypatch.setattr(st, "save_shards", failing)
    monkeypatch.setattr(st.dist_lib, "broadcast_object", lambda obj, info: told.append(obj) or obj)
    m, opt = _stepped()
    with pytest.raises(RunError) as info:
        st.save_checkpoint({"step": 4}, str(tmp_path), LAST, m, opt, DistInfo(), sharded=True)
    said = str(info.value)
    assert "checkpoint-last.pth not written" in said and "intact" in said
    assert ("no space left" in said) == (cause == "full")
    assert not info.value.quiet and told[-1] == said  # the shards' name, then the outcome, broadcast
    assert load_checkpoint(str(tmp_path / LAST), states=False)["step"] == 3
    assert _folders(tmp_path) == [f"{LAST}.dcp-0ld"]


def test_a_shard_writer_bug_is_not_reported_as_a_failed_write(tmp_path, monkeypatch):
    """An exception that is no write failure (a bug, a wrong argument) propagates as itself."""
    def buggy(path, target, optimizer):
        raise KeyError("optimizer")

    monkeypatch.setattr(st, "save_shards", buggy)
    m, opt = _stepped()
    with pytest.raises(KeyError, match="optimizer"):
        st.save_checkpoint({"step": 1}, str(tmp_path), LAST, m, opt, DistInfo(), sharded=True)
    assert not os.path.exists(tmp_path / LAST)


def test_sharded_saves_and_kept_copies_keep_only_the_folders_they_name(tmp_path, fake_shards):
    """Each checkpoint file names its own folder; a new save drops the folder the file named before, a kept
    copy (checkpoint-NNNN.pth) names a copy of the new folder (same suffix) and drops the one it named before."""
    _previous(tmp_path)
    m, opt = _stepped()
    meta = {"epoch": 1}
    st.save_checkpoint({**meta, "step": 4}, str(tmp_path), LAST, m, opt, DistInfo(), sharded=True)
    last = load_checkpoint(str(tmp_path / LAST), states=False)
    assert last["step"] == 4 and last["shards"].startswith(f"{LAST}.dcp-") and _folders(tmp_path) == [last["shards"]]
    for step in (5, 6):  # the kept copy written twice (a rewind in place writes it again)
        st.save_checkpoint({**meta, "step": step}, str(tmp_path), LAST, m, opt, DistInfo(), sharded=True,
                           keep="checkpoint-0001.pth")
    last, kept = (load_checkpoint(str(tmp_path / n), states=False) for n in (LAST, "checkpoint-0001.pth"))
    assert (last["step"], kept["step"], kept["epoch"]) == (6, 6, 1)
    suffix = last["shards"].rsplit(st.SHARDS_SUFFIX, 1)[1]
    assert kept["shards"] == f"checkpoint-0001.pth{st.SHARDS_SUFFIX}{suffix}"
    assert _folders(tmp_path) == sorted([kept["shards"], last["shards"]])
    assert os.listdir(tmp_path / kept["shards"]) == ["__0_0.distcp"]


@pytest.mark.parametrize("earlier", [False, True], ids=["first-copy", "over-an-earlier-copy"])
def test_a_failed_kept_file_leaves_no_copy_of_the_shards(tmp_path, fake_shards, monkeypatch, earlier):
    """The kept copy's folder is made, then its file fails: the checkpoint is written (and says so), the
    half-made copy's folder is removed, also where an earlier kept copy of that name stays (its folder kept)."""
    real = st.atomic_save

    def failing_keep(obj, path):
        if path.endswith("checkpoint-0001.pth"):
            raise OSError(errno.EIO, "Input/output error", path)
        return real(obj, path)

    m, opt = _stepped()
    if earlier:  # a kept copy of step 4 already there (written again after a rewind): it stays whole
        st.save_checkpoint({"step": 4}, str(tmp_path), LAST, m, opt, DistInfo(), sharded=True,
                           keep="checkpoint-0001.pth")
        kept = load_checkpoint(str(tmp_path / "checkpoint-0001.pth"), states=False)["shards"]
    monkeypatch.setattr(st, "atomic_save", failing_keep)
    with pytest.raises(RunError, match=r"checkpoint-last.pth \(step 5\) is written, but its copy checkpoint-0001.pth"):
        st.save_checkpoint({"step": 5}, str(tmp_path), LAST, m, opt, DistInfo(), sharded=True,
                           keep="checkpoint-0001.pth")
    last = load_checkpoint(str(tmp_path / LAST), states=False)
    assert last["step"] == 5 and _folders(tmp_path) == sorted([last["shards"]] + ([kept] if earlier else []))
    if earlier:
        assert load_checkpoint(str(tmp_path / "checkpoint-0001.pth"), states=False)["step"] == 4
    else:
        assert not os.path.exists(tmp_path / "checkpoint-0001.pth")
