"""How a training run stops for a reason the user can act on (not a bug of ours): one exception type
that the CLI turns into one line on stderr and an exit code, instead of a traceback."""
from __future__ import annotations

import errno
import os

# What a user's mistake or environment raises below us (config, files, folders): one line, exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class RunError(Exception):
    """A run that cannot start or go on, with a message for the user.

    Attributes:
        exit_code: the CLI's exit status (2: the user can fix it; 130/143: interrupted by a signal).
        quiet: True on the ranks that only follow another rank's error (under torchrun the message
            is printed once, by rank 0, not once per process).
        label: the word after ``maefast train:`` ("error", or "" for an interruption, which is no error).
    """

    def __init__(self, message: str, exit_code: int = 2, quiet: bool = False, label: str = "error"):
        super().__init__(message)
        self.exit_code, self.quiet, self.label = exit_code, quiet, label

    def line(self, prog: str) -> str:
        return f"{prog}: {self.label + ': ' if self.label else ''}{self}"


class Interrupted(RunError):
    """SIGINT / SIGTERM / the launcher gone: the run stopped at a step boundary with its checkpoint saved."""

    def __init__(self, message: str, exit_code: int, quiet: bool = False):
        super().__init__(message, exit_code=exit_code, quiet=quiet, label="")


def mount_point(path: str) -> str:
    """The file system holding ``path``, as "DEVICE mounted at MOUNT" (or MOUNT where /proc says nothing)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    try:
        with open("/proc/self/mounts") as f:
            devices = {fields[1]: fields[0] for fields in (line.split() for line in f) if len(fields) > 1}
    except OSError:
        devices = {}
    device = devices.get(path)
    return f"{device} mounted at {path}" if device else path


def no_space_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError in ``exc``'s chain, if any (torch.save reports a full disk as a
    RuntimeError 'unexpected pos' with the OSError of the failed write as its context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        exc = exc.__cause__ or exc.__context__
    return None
