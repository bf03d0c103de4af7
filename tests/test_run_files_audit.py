"""Edges of the run's files that the end-to-end tests pass over (found by mutation testing): kept copies
cost no space, a checkpoint of this format resumes, a bool --cuda-graph recorded before "auto" is the
same run, the lock file holds this run's pid alone, an export needs the encoder's blocks, exactly enough
free space is enough, a resume drops the partial record of the epoch it continues."""
import os

import pytest
import torch

from maefast.train import checkpoint as ckpt_lib


def test_kept_copies_are_hard_links_where_the_file_system_has_them(tmp_path):
    """--keep-every-epochs' copies of a checkpoint (a file, a sharded folder) take no space: hard links
    (checkpoint files are never modified in place), not copies of the bytes."""
    src_file, src_dir = tmp_path / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth.dcp-0a"
    src_file.write_bytes(b"ck")
    src_dir.mkdir()
    (src_dir / "__0_0.distcp").write_bytes(b"shard")
    try:
        os.link(src_file, tmp_path / "probe")
    except OSError:
        pytest.skip("no hard links on this file system")
    os.unlink(tmp_path / "probe")
    ckpt_lib.link_or_copy(str(src_file), str(tmp_path / "checkpoint-0001.pth"))
    ckpt_lib.link_or_copy(str(src_dir), str(tmp_path / "checkpoint-0001.pth.dcp-0a"))
    assert os.path.samefile(tmp_path / "checkpoint-0001.pth", src_file)
    assert os.path.samefile(tmp_path / "checkpoint-0001.pth.dcp-0a" / "__0_0.distcp", src_dir / "__0_0.distcp")
    assert not (tmp_path / "checkpoint-0001.pth.dcp-0a").samefile(src_dir)  # the folder itself is a new one


def test_a_checkpoint_of_this_format_resumes():
    """The boundary of the format check: this maefast's own format (written on every save) resumes; only a
    newer one is refused."""
    run = {"shards": "ck.pth.dcp-0a", "step": 3, "epoch": 1, "model_name": "mae_vit_tiny_test"}
    ckpt_lib.check_resumable({**run, "format_version": ckpt_lib.FORMAT_VERSION}, "ck.pth")
    with pytest.raises(ValueError, match="newer maefast"):
        ckpt_lib.check_resumable({**run, "format_version": ckpt_lib.FORMAT_VERSION + 1}, "ck.pth")


@pytest.mark.parametrize("recorded, given", [(True, "on"), (False, "off")])
def test_a_cuda_graph_recorded_as_a_bool_is_the_same_mode_spelled_otherwise(recorded, given):
    """Checkpoints from before --cuda-graph auto recorded a bool: --cuda-graph on/off given again on resume
    is that value (no change announced nor recorded), another mode is a change."""
    from maefast.train.config import TrainConfig
    from maefast.train.resume import reconcile

    ck = {"config": {"cuda_graph": recorded, "batch_size": 4, "accum_iter": 1}, "schedule": {"global_batch": 4}}
    _, notes, changed = reconcile(TrainConfig(cuda_graph=given, explicit=("cuda_graph",)), ck, "ck.pth", 1)
    assert (changed, notes) == ({}, [])
    _, notes, changed = reconcile(TrainConfig(cuda_graph="auto", explicit=("cuda_graph",)), ck, "ck.pth", 1)
    assert changed == {"cuda_graph": [recorded, "auto"]} and "--cuda-graph" in notes[0]


def test_the_lock_file_holds_this_runs_pid_alone(tmp_path):
    """The pid a refused second run names is this run's, whole: a longer pid a killed run left in the
    lock file is not read as part of it."""
    from maefast.train.rundir import LOCK_NAME, RunFolder

    pytest.importorskip("fcntl")
    (tmp_path / LOCK_NAME).write_text("9" * 12)  # a killed run's lock, never removed
    folder = RunFolder(str(tmp_path), is_main=True)
    folder.prepare(0, overwrite=False)
    try:
        assert (tmp_path / LOCK_NAME).read_text() == str(os.getpid())
    finally:
        folder.close()
    assert not (tmp_path / LOCK_NAME).exists()


def test_an_encoder_export_needs_the_encoders_blocks():
    """A state dict with a cls_token but no transformer blocks (another kind of model) is no MAE encoder:
    refused, not exported as a release file that loads nothing."""
    with pytest.raises(ValueError, match="no MAE encoder keys"):
        ckpt_lib.encoder_state_dict({"cls_token": torch.zeros(1, 1, 4), "pos_embed": torch.zeros(1, 2, 4),
                                     "head.weight": torch.zeros(2, 4)})


def test_exactly_enough_free_space_for_a_checkpoint_is_enough(tmp_path, monkeypatch):
    """The free-space check before the first step refuses less than one checkpoint, not exactly one."""
    import shutil

    from maefast.train.errors import RunError
    from maefast.train.rundir import RunFolder

    usage = shutil._ntuple_diskusage(10 * 2 ** 20, 7 * 2 ** 20, 3 * 2 ** 20)  # exactly 3 MiB free
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage)
    folder = RunFolder(str(tmp_path / "run"), is_main=True)
    try:
        folder.prepare(3 * 2 ** 20, overwrite=False)
    finally:
        folder.close()
    folder = RunFolder(str(tmp_path / "run"), is_main=True)
    try:
        with pytest.raises(RunError, match="not enough space"):
            folder.prepare(3 * 2 ** 20 + 1, overwrite=False)
    finally:
        folder.close()
    assert not (tmp_path / "run").exists()  # the folder the start created, left empty, goes


def test_a_resume_drops_the_record_of_the_epoch_it_continues(tmp_path):
    """A run stopped mid-epoch logged that epoch's partial record (complete: false): the resume continues the
    epoch and writes its full record, so the partial one goes, even at the resumed step; steps.jsonl keeps
    every step up to it."""
    import json

    from maefast.train.rundir import RunFolder, read_jsonl

    log = [{"epoch": 0, "step": 3, "complete": True}, {"epoch": 1, "step": 4, "complete": False},
           {"epoch": 1, "step": 6, "complete": True}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 7)))
    RunFolder(str(tmp_path), is_main=True).trim_logs(4)
    assert read_jsonl(str(tmp_path / "log.jsonl")) == log[:1]
    assert [r["step"] for r in read_jsonl(str(tmp_path / "steps.jsonl"))] == [1, 2, 3, 4]


def test_an_output_file_that_is_a_dangling_link_exists(tmp_path):
    """A symbolic link whose target is gone is still the user's file: an output named by it is refused
    without --overwrite (the write at the end would replace the link), taken with it."""
    from maefast.cli import check_out_file

    link = tmp_path / "grid.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(ValueError, match="exists: pass --overwrite"):
        check_out_file("--out", str(link))
    check_out_file("--out", str(link), overwrite=True)


def test_an_output_named_dash_is_refused_not_written_as_a_file_named_dash(tmp_path, monkeypatch):
    """`--json -` (stdout, as many tools read it) wrote a file named "-" in the working folder; refused, one
    line naming the flag. ./- is that file, taken."""
    from maefast.cli import check_out_file

    monkeypatch.chdir(tmp_path)
    for flag in ("--json", "--trace", "--png", "--out"):
        with pytest.raises(ValueError, match=f"^{flag} -: the output goes to a file, not to stdout"):
            check_out_file(flag, "-", overwrite=True)
    check_out_file("--json", "./-")
    assert os.listdir(tmp_path) == []


def test_every_output_file_writes_through_a_link(tmp_path):
    """An output named by a symbolic link (table2's chart, profile --trace; visualize --out in test_visualize):
    the file it points to is replaced and the link stays a link, as every --json (these replaced the link
    itself); a link into a folder that does not exist, and a device (/dev/null, which a root user's rename
    replaced), are refused before any work."""
    from maefast.cli import check_out_file
    from maefast.profile import _export_trace
    from maefast.table2 import save_chart

    class Prof:
        def export_chrome_trace(self, path):
            open(path, "w").write("{}")

    row = dict(model="tiny", decoder_depth=1, impl="auto", speedup=2.0)
    writers = {"chart.png": lambda p: save_chart([row], p, "t"), "trace.json": lambda p: _export_trace(Prof(), p)}
    for name, write in writers.items():
        target, link = tmp_path / f"real-{name}", tmp_path / name
        target.write_text("old")
        link.symlink_to(target)
        write(str(link))
        assert link.is_symlink() and target.read_bytes() != b"old", name
    assert sorted(os.listdir(tmp_path)) == sorted([*writers, *(f"real-{n}" for n in writers)])
    for special in ("/dev/null", str(tmp_path / "null-link")):  # written by a rename: the device itself replaced
        if special != "/dev/null":
            os.symlink("/dev/null", special)
        with pytest.raises(ValueError, match="is not a regular file"):
            check_out_file("--json", special, overwrite=True)
    (tmp_path / "far.png").symlink_to(tmp_path / "no" / "such.png")
    with pytest.raises(ValueError, match="the folder .*no' does not exist"):
        check_out_file("--out", str(tmp_path / "far.png"), overwrite=True)


def test_the_guard_of_every_command(monkeypatch, capsys):
    """An error with no message is named by its kind (never an empty line); Ctrl-C is exit 130; `maefast info`
    runs under a bad MAEFAST_EAGER_DISPATCH (it shows it) where every other command refuses it first."""
    from maefast.cli import guarded

    def fail(argv):
        raise ValueError()

    assert guarded("maefast x", fail, []) == 2
    assert capsys.readouterr().err == "maefast x: error: ValueError\n"

    def interrupted(argv):
        raise KeyboardInterrupt

    assert guarded("maefast x", interrupted, []) == 130  # a shell's code for SIGINT
    assert capsys.readouterr().err == "maefast x: interrupted\n"
    from maefast.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_mode", None)  # what a bad MAEFAST_EAGER_DISPATCH leaves
    assert guarded("maefast info", lambda argv: 0, []) == 0
    assert guarded("maefast profile", lambda argv: 0, []) == 2 and "error:" in capsys.readouterr().err


def test_running_out_of_memory_is_one_line(capsys):
    """A batch too large for the machine (`maefast profile --batch 10000000`): the allocator's error is one
    line and exit 2, not a traceback; another RuntimeError stays a traceback (a bug of ours)."""
    from maefast.cli import guarded

    cpu = "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 B"
    # (`--batch 4611686018427387904`: more bytes than an int64 counts, torch says so before allocating)
    for exc in (RuntimeError(cpu), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                MemoryError(), RuntimeError("Storage size calculation overflowed with sizes=[4611686018427387904, 3]")):
        def fail(argv, exc=exc):
            raise exc

        assert guarded("maefast profile", fail, []) == 2
        err = capsys.readouterr().err
        assert err.startswith("maefast profile: error: out of memory (") and err.count("\n") == 1, err
    with pytest.raises(RuntimeError, match="boom"):
        guarded("maefast profile", lambda argv: (_ for _ in ()).throw(RuntimeError("boom")), [])


def test_options_without_a_command_go_to_profile(monkeypatch):
    """`maefast --model tiny` is `maefast profile --model tiny` (no command: the default one)."""
    import maefast.profile as mp
    from maefast.cli import main

    seen = []
    monkeypatch.setattr(mp, "main", lambda argv: seen.append(argv) or 0)
    assert main(["--model", "tiny"]) == 0 and seen == [["--model", "tiny"]]
    assert main(["profile", "--steps", "1"]) == 0 and seen[-1] == ["--steps", "1"]


def test_a_start_removes_what_a_killed_save_left(tmp_path):
    """prepare (every start and resume) removes a killed run's half-written checkpoint and write probe, not a
    user's file that merely looks like a temporary."""
    from maefast.train.rundir import RunFolder

    stale = [".checkpoint-last.pth.k2j4.tmp", ".maefast-write-test.1234.tmp"]
    for name in (*stale, ".notes.draft.tmp"):
        (tmp_path / name).write_text("x")
    folder = RunFolder(str(tmp_path), is_main=True)
    folder.prepare(0, overwrite=False)
    folder.close()
    assert sorted(os.listdir(tmp_path)) == [".notes.draft.tmp"]


def test_output_names_are_compared_as_files_and_an_empty_impl_list_is_refused(tmp_path, monkeypatch):
    """Two outputs spelled differently (./, a symbolic link) are the same file: refused; `--impl ,` (no
    backend at all) is refused, not a run of nothing."""
    from maefast.cli import check_distinct_outputs, check_impls

    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.json").symlink_to(tmp_path / "r.json")
    for other in ("./r.json", str(tmp_path / "r.json"), "link.json"):
        with pytest.raises(ValueError, match="--json and --trace name the same file"):
            check_distinct_outputs({"--json": "r.json", "--trace": other})
    check_distinct_outputs({"--json": "r.json", "--trace": "t.json", "--png": None})
    with pytest.raises(ValueError, match="--impl takes a comma list of"):
        check_impls([], ",")


def test_an_error_with_a_blank_message_is_still_said_in_one_line(tmp_path):
    """An exception with no message (OSError(), a bare RuntimeError("\\n")): the one-line forms name its type
    and the save's error path reports it, rather than failing with an IndexError of its own that hides it."""
    from maefast.graphs import first_line, message_line
    from maefast.train.state import _save_failure

    for exc in (OSError(), RuntimeError("\n "), ValueError("")):
        assert message_line(exc) == first_line(exc) == type(exc).__name__
    assert first_line(RuntimeError("\n  first\nsecond"), width=3) == "RuntimeError: fir"
    assert message_line(RuntimeError("\n  first\nsecond")) == "first"
    path = str(tmp_path / "checkpoint-last.pth")
    assert _save_failure(path, OSError()) == "checkpoint-last.pth not written (OSError); the previous one is intact"
    assert _save_failure(path, OSError(5, "Input/output error")) == (
        "checkpoint-last.pth not written ([Errno 5] Input/output error); the previous one is intact")
