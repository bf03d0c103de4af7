"""maefast/train/errors.py and `maefast train`'s main(): what counts as the user's error (one line, exit 2),
how a full disk is found in an exception chain, and which file system it names."""
import errno
import os
import shutil
import subprocess

import pytest

from maefast.train.errors import RunError, mount_point, no_space_cause


def _chained(inner: BaseException, outer: BaseException, *, explicit: bool) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            if explicit:
                raise outer from inner
            raise outer
    except BaseException as e:
        return e


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("explicit", [False, True], ids=["context", "cause"])
def test_a_full_disk_or_quota_is_found_down_the_chain(code, explicit):
    """torch.save reports a full disk as RuntimeError('unexpected pos ...') with the failed write's OSError as
    its __context__ (a wrapper may chain it as __cause__); a full quota is as full as a full disk."""
    err = OSError(code, os.strerror(code))
    assert no_space_cause(err) is err
    assert no_space_cause(_chained(err, RuntimeError("unexpected pos 64"), explicit=explicit)) is err
    deeper = _chained(_chained(err, ValueError("x"), explicit=explicit), RuntimeError("y"), explicit=not explicit)
    assert no_space_cause(deeper) is err


def test_a_full_disk_known_only_by_its_message_and_what_is_not_one():
    """An error that kept only the text of the failed write (a library re-raising a message) still says the
    disk is full; an I/O error, or an error chain that loops, is not a full disk."""
    for msg in ("write failed: No space left on device", "[Errno 122] Disk quota exceeded: '/x'"):
        found = no_space_cause(RuntimeError(msg))
        assert isinstance(found, OSError) and found.errno == errno.ENOSPC, msg
    assert no_space_cause(OSError(errno.EIO, "Input/output error")) is None
    assert no_space_cause(_chained(OSError(errno.EIO, "x"), RuntimeError("unexpected pos"), explicit=False)) is None
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert no_space_cause(a) is None


@pytest.mark.skipif(shutil.which("df") is None or not os.path.exists("/proc/self/mounts"), reason="needs df, Linux")
def test_mount_point_names_the_file_system_holding_a_path_not_yet_made(tmp_path):
    """The full-disk line names the file system (as df does) even for a folder the run has not made yet."""
    src, target = subprocess.run(["df", "--output=source,target", str(tmp_path)], capture_output=True, text=True,
                                 check=True).stdout.splitlines()[1].split()
    want = f"{src} mounted at {target}"
    assert mount_point(str(tmp_path)) == want
    assert mount_point(str(tmp_path / "run" / "not" / "made")) == want


@pytest.mark.parametrize("exc,rc,said", [
    (PermissionError(13, "Permission denied", "/data/x"), 2, "maefast train: error: [Errno 13] Permission denied: "
                                                             "'/data/x'"),
    (IsADirectoryError(21, "Is a directory", "/data"), 2, "maefast train: error: [Errno 21] Is a directory: '/data'"),
    (KeyboardInterrupt(), 130, "maefast train: stopped at once"),
    (RunError("interrupted", exit_code=143, label=""), 143, "maefast train: interrupted")])
def test_main_turns_users_errors_and_ctrl_c_into_one_line_and_an_exit_code(monkeypatch, capsys, exc, rc, said):
    """A folder the user cannot read is the user's to fix (one line, exit 2, no traceback); a Ctrl-C that
    reaches main (a second one, or before the run started) exits 130 as a shell expects after SIGINT."""
    import maefast.train as train_mod

    def raising(cfg):
        raise exc

    monkeypatch.setattr(train_mod, "train", raising)
    assert train_mod.main(["--device", "cpu"]) == rc
    err = capsys.readouterr().err
    assert err.startswith(said) and len(err.strip().splitlines()) == 1, err


def test_the_python_apis_name_an_argument_of_the_wrong_type(tmp_path):
    """train(5), visualize(None, ...), load_checkpoint(None): an AttributeError ('int' object has no attribute
    'explicit') or os.stat's TypeError before; a TypeError naming the argument now, before any work."""
    from maefast.train import train
    from maefast.train.checkpoint import load_checkpoint
    from maefast.visualize import visualize

    for bad in (5, "synthetic"):
        with pytest.raises(TypeError, match="config must be a maefast.train.TrainConfig"):
            train(bad)
    with pytest.raises(TypeError, match="path must be a checkpoint file's path"):
        load_checkpoint(None)
    img = str(tmp_path / "a.png")
    for args, kw, name in (((None, img), {}, "checkpoint"), (("ck.pth", img), {"out": None}, "out"),
                           (("ck.pth", [img, 3]), {}, "images"), (("ck.pth", 5), {}, "images")):
        with pytest.raises(TypeError, match=f"{name} must be "):
            visualize(*args, **kw)
    assert os.listdir(tmp_path) == []
