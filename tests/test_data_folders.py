"""Image folders as data (`maefast.train.data.ImageFolderDataset`'s listing): links walked once, dot names
skipped, a folder that cannot be listed refused in one line, the paths kept in one buffer."""
import os
import re

import numpy as np
import pytest

from maefast.train.data import ImageFolderDataset

S = 32


def test_a_link_loop_lists_each_image_once(tmp_path):
    """Links back up the tree (torchvision's walk follows them too) listed each file ~40 times, and two
    of them in one folder made the walk run forever."""
    from PIL import Image

    (tmp_path / "cls").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(tmp_path / "cls" / f"{i}.png")
    os.symlink("..", tmp_path / "cls" / "up")
    os.symlink(".", tmp_path / "cls" / "a")
    os.symlink(".", tmp_path / "cls" / "b")
    ds = ImageFolderDataset(str(tmp_path), S, 16)
    assert sorted(os.path.basename(f) for f in ds.files) == ["0.png", "1.png", "2.png"]


def test_hidden_files_and_folders_are_not_images(tmp_path):
    """Dot folders (.git, .ipynb_checkpoints, a trash folder) and dot files are not training images; the
    extension is matched whatever its case."""
    from PIL import Image

    for rel in ("cls/a.png", "cls/B.JPG", "cls/.c.png", ".hidden/d.png", "cls/.ipynb_checkpoints/e.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (9, 0, 0)).save(tmp_path / rel, "PNG")
    ds = ImageFolderDataset(str(tmp_path), S, 16)
    want = [os.path.join("cls", "B.JPG"), os.path.join("cls", "a.png")]  # sorted: upper case first
    assert [os.path.relpath(f, tmp_path) for f in ds.files] == want


def test_a_folder_that_cannot_be_listed_is_refused(tmp_path, monkeypatch):
    """A sub-folder os.walk cannot list (no read permission: chmod 000) was skipped in silence, a whole class
    left out of the data set; the folder itself unreadable said it "holds no image files". Now one line
    naming the folder (a PermissionError: the command line's user error); a file system's lost+found aside."""
    from PIL import Image

    for rel in ("a/1.png", "locked/2.png", "lost+found/3.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20)).save(tmp_path / rel)
    scandir, blocked = os.scandir, []

    def no_permission(path="."):  # chmod 000 (the tests may run as root, which reads it anyway)
        if os.fspath(path) in blocked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission)
    assert len(ImageFolderDataset(str(tmp_path), S, 16)) == 3
    blocked[:] = [os.path.join(tmp_path, "lost+found")]  # a file system's own, root's alone: left out
    assert len(ImageFolderDataset(str(tmp_path), S, 16)) == 2
    for folder in (os.path.join(tmp_path, "locked"), str(tmp_path)):
        blocked[:] = [folder]
        with pytest.raises(PermissionError, match=rf"^--data: cannot list the folder '{re.escape(folder)}' "
                                                  r"\(Permission denied\): its images would be left out"):
            ImageFolderDataset(str(tmp_path), S, 16)
    from maefast.train.errors import RunError

    def io_error(path="."):  # another failure (EIO): the run's own one-line error, not a traceback
        if os.fspath(path) == os.path.join(tmp_path, "a"):
            raise OSError(5, "Input/output error", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", io_error)
    with pytest.raises(RunError, match=r"cannot list the folder .*\(Input/output error\)"):
        ImageFolderDataset(str(tmp_path), S, 16)


def test_paths_live_in_one_buffer_and_round_trip(tmp_path):
    """The paths are one numpy buffer (a list of str is copied into every worker as reading a path touches
    its reference count: ~140 MiB per worker for ImageNet); names round-trip exactly, odd bytes included."""
    from PIL import Image

    names = ["a.png", "\u00e9t\u00e9.png", os.fsdecode(b"raw\xff.png")]  # non-ASCII, not UTF-8 at all
    for i, n in enumerate(names):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / n)
    ds = ImageFolderDataset(str(tmp_path), S, 16)
    assert isinstance(ds._paths, np.ndarray) and ds._paths.dtype.kind == "S"
    want = sorted(str(tmp_path / n) for n in names)
    assert [ds.name(i) for i in range(len(ds))] == ds.files == want
    assert ds.load(2).getpixel((0, 0)) == Image.open(want[2]).convert("RGB").getpixel((0, 0))
    with open(want[2], "rb") as f:  # opened by its str name (undecodable bytes escaped)
        assert ds.encoded(2) == f.read()
    ds.files = ds.files[:2]
    assert len(ds) == 2 and ds.files == want[:2]
