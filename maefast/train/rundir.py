"""The run folder (``--output-dir``): what counts as a run there, the checks made before anything is
created, and its upkeep while a run owns it (a lock, stale temporaries removed, logs that hold one
line per step).

Rules (README, Training): a folder that holds a run is never written over without ``--resume`` (to
continue it) or ``--overwrite`` (to start over); a run that fails before its first write leaves no
folder behind; a full or read-only disk is found before the first step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys

from .checkpoint import CHECKPOINT_NAME, SHARDS_SUFFIX, atomic_write_text
from .errors import RunError, mount_point, no_space_cause

LOCK_NAME = ".maefast-train.lock"
PROBE_NAME = ".maefast-write-test"
# Files and folders a run writes; any of them means "this folder holds a run".
RUN_FILE = re.compile(r"^(checkpoint-(last|\d{4,})\.pth|log\.jsonl|steps\.jsonl|loss_curve\.png|mae_pretrain_.+\.pth)$")
SHARDS_DIR = re.compile(r"^(?P<owner>checkpoint-(last|\d{4,})\.pth)" + re.escape(SHARDS_SUFFIX) + r"[0-9a-f]+$")
# Temporaries: ".<name>.<random>.tmp" (atomic writes), ".maefast-write-test.<pid>.tmp" (the probe).
TEMP = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")


_KEPT = re.compile(r"checkpoint-(\d+)\.pth")  # a kept epoch's checkpoint (--keep-every-epochs)


def run_files(folder: str) -> list[str]:
    """Names in ``folder`` that a ``maefast train`` run wrote (sorted; [] when it does not exist)."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if RUN_FILE.match(n) or SHARDS_DIR.match(n))


def _same_path(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or (os.path.exists(a) and os.path.exists(b)
                                                         and os.path.samefile(a, b))


def _in_folder(path: str, folder: str) -> bool:
    """Whether the file ``path`` lies in ``folder`` (a resume from the run's own checkpoints)."""
    return _same_path(os.path.dirname(os.path.abspath(path)), folder)


def check_folder(output_dir: str, resume: str | None, overwrite: bool) -> None:
    """Refuses (ValueError, nothing touched) an ``output_dir`` whose run this start would write over.

    Args:
        output_dir: --output-dir.
        resume: None (fresh start), "auto" (continue the run in ``output_dir``, if any) or the
            checkpoint to continue from.
        overwrite: --overwrite: the user agreed to replace the run in ``output_dir``.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"--output-dir {output_dir!r} is a file, not a folder")
    files = run_files(output_dir)
    shown = ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")
    no_checkpoint = not os.path.isfile(os.path.join(output_dir, CHECKPOINT_NAME))
    # log.jsonl gets an epoch's record only after its checkpoint is written: records without a checkpoint
    # are a finished --no-save run's (or the checkpoint was removed): nothing to continue, and a fresh
    # start would delete them
    finished_unsaved = no_checkpoint and bool(read_jsonl(os.path.join(output_dir, "log.jsonl")))
    if resume == "auto" and no_checkpoint:
        # nothing to continue: a fresh start trims the logs to step 0, which is right for a run stopped
        # before its first checkpoint, but would replace what a finished --no-save run left (its export)
        # (a shards folder without its checkpoint file is a first save cut short: a stale temporary)
        results = [f for f in files if f not in ("log.jsonl", "steps.jsonl", "loss_curve.png")
                   and not SHARDS_DIR.match(f)]
        if not results and finished_unsaved:
            results = ["log.jsonl"]
        if results:
            # --overwrite alone deletes the epochs' kept checkpoints too: name the one the run can go on from
            kept = sorted((n for n in files if _KEPT.fullmatch(n)), key=lambda n: int(_KEPT.fullmatch(n).group(1)))
            rewind = (f", or continue from its last kept checkpoint: --resume {os.path.join(output_dir, kept[-1])} "
                      "--overwrite" if kept else "")
            raise ValueError(f"--resume auto: --output-dir {output_dir!r} holds a run ({shown}) but no "
                             f"{CHECKPOINT_NAME} to continue from, and a fresh start would write over it: pick "
                             f"another --output-dir, or start over with --overwrite instead of --resume auto{rewind}")
    if resume == "auto" or not files or overwrite:
        return
    if resume is None:
        if finished_unsaved:
            raise ValueError(f"--output-dir {output_dir!r} already holds a run ({shown}) with no {CHECKPOINT_NAME} "
                             "to continue from: pick another --output-dir, or --overwrite to start over (deletes "
                             "its logs and export)")
        raise ValueError(f"--output-dir {output_dir!r} already holds a run ({shown}): pass --resume auto to "
                         "continue it, or --overwrite to start over (deletes its checkpoints, logs and export)")
    if not _same_path(resume, os.path.join(output_dir, CHECKPOINT_NAME)):
        if _in_folder(resume, output_dir):  # rewinding the run to a kept epoch
            # name what comes after it (it and the epochs kept before it stay, their shard folders too)
            at = _kept_epoch(os.path.basename(resume))
            later = [f for f in files if at is None or (e := _kept_epoch(f)) is None or e > at]
            if not later:  # nothing of the run comes after it: continuing in place writes over nothing
                return
            later = ", ".join(later[:4]) + (", ..." if len(later) > 4 else "")
            raise ValueError(f"--resume {resume!r} is an earlier checkpoint of the run in --output-dir: "
                             f"continuing from it in place would write over its later checkpoints and logs "
                             f"({later}): pass another --output-dir (the run stays as it is), or add --overwrite "
                             "(deletes the later checkpoints and export, keeps the earlier ones and the log lines "
                             "up to it)")
        raise ValueError(f"--output-dir {output_dir!r} holds another run ({shown}) that continuing from "
                         f"--resume {resume!r} would write over: pick another --output-dir, or add --overwrite")


def _kept_epoch(name: str) -> int | None:
    """The epoch of a kept checkpoint (``checkpoint-0003.pth``) or of its shard folder, else None."""
    shards = SHARDS_DIR.match(name)
    m = _KEPT.fullmatch(shards.group("owner") if shards else name)
    return int(m.group(1)) if m else None


class JsonlLog:
    """Rank 0's JSON-lines writer (append, one object per line); a no-op where ``path`` is None."""

    def __init__(self, path: str | None):
        self.path = path

    def write(self, record: dict) -> None:
        if not self.path:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise _os_error(f"cannot write {self.path}", exc) from exc


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file ([] when absent); a torn last line (a kill mid-write) is skipped."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def _os_error(what: str, exc: OSError) -> RunError:
    full = no_space_cause(exc)
    if full is not None:
        return RunError(f"{what}: no space left on {mount_point(exc.filename or '.')}")
    return RunError(f"{what}: {exc.strerror or exc}")


class RunFolder:
    """The output folder of this run, owned from ``prepare`` to ``close`` (rank 0 does the file work)."""

    def __init__(self, path: str, is_main: bool):
        self.path, self.is_main = path, is_main
        self.created = False
        self._lock = None

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def prepare(self, need_bytes: int, overwrite: bool, keep: tuple[str, ...] = (),
                trim_to_step: int | None = None, last_record: dict | None = None,
                resume_epoch: int | None = None) -> None:
        """Creates and locks the folder, checks it can take a checkpoint, removes stale temporaries.

        Args:
            need_bytes: the size of one checkpoint (free space needed before the first step).
            overwrite: delete the run files there (--overwrite), except ``keep`` (the checkpoint
                being resumed from, when it lies in this folder).
            trim_to_step: on a resume, the logs keep only the lines up to this step (None: fresh).
            last_record: the log.jsonl record the resumed checkpoint was saved with: written when the
                log lacks it (the run in this folder stopped between its checkpoint and its log line).
            resume_epoch: the epoch the resume continues from: with ``overwrite`` and the checkpoint in this
                folder (a rewind), the epochs' kept checkpoints before it stay.
        """
        if not self.is_main:
            return
        if not os.path.isdir(self.path):
            try:
                os.makedirs(self.path)
            except OSError as exc:
                raise _os_error(f"cannot create --output-dir {self.path!r}", exc) from exc
            self.created = True
        self._take_lock()
        probe = self.join(f"{PROBE_NAME}.{os.getpid()}.tmp")
        try:
            with open(probe, "wb") as f:
                f.write(b"maefast")
                f.flush()
                os.fsync(f.fileno())
            os.unlink(probe)
        except OSError as exc:
            raise _os_error(f"cannot write to --output-dir {self.path!r}", exc) from exc
        self.remove_stale_temporaries()
        in_place = any(_in_folder(k, self.path) for k in keep)
        if overwrite:
            self._delete_run_files(keep, resume_epoch if in_place else None)
        free = shutil.disk_usage(self.path).free
        if free < need_bytes:
            digits = 1 if need_bytes < 100 * 2 ** 20 else 0  # never "3 MiB needed, 3 MiB free"
            raise RunError(f"not enough space for a checkpoint in --output-dir {self.path!r}: about "
                           f"{need_bytes / 2**20:.{digits}f} MiB needed, {free / 2**20:.{digits}f} MiB free on "
                           f"{mount_point(self.path)}")
        if trim_to_step is not None:
            self.trim_logs(trim_to_step)
            if in_place and last_record is not None and last_record.get("complete", True):
                path = self.join("log.jsonl")
                if not any(r.get("epoch") == last_record["epoch"] and r.get("step") == last_record["step"]
                           for r in read_jsonl(path)):
                    JsonlLog(path).write(last_record)

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no protection against two runs in one folder
            return
        path = self.join(LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _os_error(f"cannot write to --output-dir {self.path!r}", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"another maefast train (pid {other}) is running in --output-dir {self.path!r}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock = fd

    def remove_stale_temporaries(self) -> list[str]:
        """Deletes the temporaries a killed run of this folder left (half-written checkpoints, logs, the
        write probe) and sharded-checkpoint folders no checkpoint file refers to. Safe under the lock:
        no other run writes here."""
        from .checkpoint import referenced_shards

        removed = []
        names = os.listdir(self.path)
        live = referenced_shards(self.path)
        for name in names:
            m = TEMP.match(name)
            stale = bool(m) and (RUN_FILE.match(m.group("name")) or SHARDS_DIR.match(m.group("name"))
                                 or m.group("name") == PROBE_NAME.lstrip("."))  # TEMP's name has no dot
            stale = stale or (SHARDS_DIR.match(name) is not None and name not in live)
            if stale:
                _remove(self.join(name))
                removed.append(name)
        return removed

    def _delete_run_files(self, keep: tuple[str, ...], resume_epoch: int | None = None) -> None:
        from .checkpoint import referenced_shards

        keep_names = {os.path.basename(k) for k in keep if _in_folder(k, self.path)}
        if resume_epoch is not None:  # continuing in place from one of its checkpoints (a rewind): its logs
            # up to it (trimmed later) and the epochs' checkpoints kept before it still apply; the later ones
            # and the export go
            keep_names |= {"log.jsonl", "steps.jsonl"}
            keep_names |= {n for n in run_files(self.path)
                           if (m := _KEPT.fullmatch(n)) and int(m.group(1)) < resume_epoch}
        keep_names |= {d for k in list(keep_names) for d in referenced_shards(self.path, only=k)}
        for name in run_files(self.path):
            if name not in keep_names:
                _remove(self.join(name))

    def trim_logs(self, step: int) -> None:
        """Keeps the log lines that count for a run continuing from ``step``: steps.jsonl up to it,
        log.jsonl's complete epochs up to it (the resumed epoch writes its own full record). A torn
        last line (a kill mid-write) goes too."""
        for name, keep in (("steps.jsonl", lambda r: r.get("step", 0) <= step),
                           ("log.jsonl", lambda r: r.get("step", 0) <= step and r.get("complete", True))):
            path = self.join(name)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                raw = [line for line in f if line.strip()]
            kept = [r for r in read_jsonl(path) if keep(r)]
            if len(kept) != len(raw):
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        """Releases the lock; a folder this run created and left empty is removed."""
        if self._lock is not None:
            try:
                os.unlink(self.join(LOCK_NAME))
            except OSError:
                pass
            os.close(self._lock)
            self._lock = None
        if self.created:
            try:
                os.rmdir(self.path)  # only succeeds when empty: nothing of the user's is removed
            except OSError:
                pass


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def say(is_main: bool, msg: str) -> None:
    """One line on stderr from rank 0, prefixed like every message of the command."""
    if is_main:
        print(f"maefast train: {msg}", file=sys.stderr, flush=True)
