"""The `maefast` command (also `python -m maefast`). Subcommands live in their own modules and are
imported only when used, so `maefast --help` is fast and works without triton or a GPU."""
from __future__ import annotations

import argparse
import importlib
import math
import numbers
import os
import sys

COMMANDS = {
    "profile": ("maefast.profile", "per-stage timing of an MAE training step (default: small model, synthetic batch)"),
    "bench": ("maefast.bench", "benchmarks, e.g. `maefast bench table2` (the paper's Table 2 on this machine)"),
    "train": ("maefast.train", "MAE pre-training (the paper's recipe) on an image folder or --data synthetic"),
    "visualize": ("maefast.visualize", "original / masked / reconstruction grid from a checkpoint (--out's format)"),
    "info": ("maefast.cli", "what can run here (reference, Triton, CUDA C++ kernels) and why not; --json"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only for a real default ("auto" options say what they resolve to themselves)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the whole usage block first); every
    subcommand's parser."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_out_file(flag: str, path: str | None, overwrite: bool = False) -> None:
    """An output file a command will write at its end: refused now (ValueError naming the flag) when it is
    a folder, its folder does not exist, or it exists and ``overwrite`` (the command's --overwrite) is not
    given: nothing a user made is replaced without their say."""
    if path is None:
        return
    if path == "":
        raise ValueError(f"{flag} is empty: give a file name")
    if path == "-":  # not stdout, as many tools read it: a file named "-" was written in the working folder
        raise ValueError(f"{flag} -: the output goes to a file, not to stdout: give a file name (./- for that one)")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder: give a file name")
    if os.path.exists(path) and not os.path.isfile(path):  # the write renames a new file onto it: /dev/null gone
        raise ValueError(f"{flag} {path!r} is not a regular file (a device or a pipe): give a file name")
    folder = os.path.dirname(os.path.realpath(path))  # a link's target is written (atomic_write_file)
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path!r}: the folder {folder!r} does not exist")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{flag} {path!r} exists: pass --overwrite to replace it, or another {flag}")
    import tempfile

    try:  # written at the end through a temporary beside it: a folder that takes no file fails now, not then
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".maefast-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path!r}: cannot write in {folder!r} ({e.strerror or e})") from None


# the image formats an output's name ending asks for (a name without one: PNG), those Pillow writes itself
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}


def image_format(flag: str, path: str, formats: dict = IMAGE_FORMATS) -> str:
    """The format of the image file ``path`` ({ending: format} ``formats``, the writer's): the one its name's
    ending says, PNG for a name without one; another ending is refused (ValueError naming the flag), not
    written as PNG bytes under a name that says otherwise."""
    ext = os.path.splitext(path)[1].lower()
    if not ext:
        return formats[".png"]
    if ext not in formats:
        raise ValueError(f"{flag} {path!r}: the name's ending {ext!r} is no image format written here: end it in "
                         f"{', '.join(formats)}")
    return formats[ext]


def check_json_name(flag: str, path: str | None) -> None:
    """A JSON output's name does not end as an image's (IMAGE_FORMATS, .gif, .svg, .pdf): JSON text is not
    written under a name that says otherwise, nor over a chart or picture that --overwrite was given for
    (ValueError naming the flag)."""
    ext = os.path.splitext(path or "")[1].lower()
    if ext in (*IMAGE_FORMATS, ".gif", ".svg", ".pdf"):
        raise ValueError(f"{flag} {path!r}: the name's ending {ext!r} is an image's, and {flag} writes JSON text: "
                         "give it a name ending in .json")


def check_distinct_outputs(paths: dict) -> None:
    """Output files of one command ({flag: path or None}) are distinct: one would replace another."""
    seen: dict = {}
    for flag, path in paths.items():
        if not path:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise ValueError(f"{seen[key]} and {flag} name the same file {path!r}: give each its own")
        seen[key] = flag


def labelled_path(path: str, label: str) -> str:
    """``path`` with ``label`` before its ending, a compressed one whole: trace.json -> trace.auto.json,
    trace.json.gz -> trace.auto.json.gz (not trace.json.auto.gz: the user's ending kept); none: trace.auto.json."""
    gz = ".gz" if path.endswith(".gz") else ""
    root, ext = os.path.splitext(path[:len(path) - len(gz)])
    return f"{root}.{label}{ext or ('' if gz else '.json')}{gz}"


def positive(flag: str, value, allow_zero: bool = False, optional: bool = True):
    """``value`` when it is a finite number > 0 (>= 0 with allow_zero), an int torch takes as a size (< 2**63),
    or None where the flag is optional (not given); else ValueError naming the flag."""
    if value is None and optional:
        return None
    # finite too: NaN passes both comparisons, and an infinite rate or decay trains an epoch of NaN (an integer
    # is finite: math.isfinite raises OverflowError past ~1e308; numpy's numbers are no int or float)
    integer = isinstance(value, numbers.Integral)
    if value is None or (not integer and not math.isfinite(value)) or (value < 0 if allow_zero else value <= 0):
        raise ValueError(f"{flag} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    if integer and value >= 2 ** 63:  # torch's TypeError "Overflow when unpacking long", a traceback
        raise ValueError(f"{flag} must be < 2**63, got {value}")
    return value


def check_mask_ratio_flag(ratio, num_patches: int | None = None) -> None:
    """--mask-ratio by the model's own rule (maefast._validate.check_mask_ratio), the error naming the flag."""
    from ._validate import check_mask_ratio

    try:
        check_mask_ratio(ratio, num_patches)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e).replace("mask_ratio", "--mask-ratio", 1)) from None


def check_unique(flag: str, items: list, key=None) -> None:
    """A comma list's items are distinct (by ``key``, e.g. the model a name resolves to): one named twice
    would be run and reported twice (ValueError naming the flag)."""
    seen: dict = {}
    for item in items:
        k = key(item) if key else item
        if k in seen:
            same = "" if item == seen[k] else f" (as {seen[k]!r})"
            raise ValueError(f"{flag} names {item!r} twice{same}: give each once")
        seen[k] = item


def check_impls(impls: list[str], given, fused: str = "off", device=None) -> None:
    """--impl's comma list: every name one of the models' backends, none that --fused rules out, and
    with `device` each explicit backend able to run there (before any work, not at its turn)."""
    from .ops._backend import MODEL_IMPLS

    if not impls or any(i not in MODEL_IMPLS for i in impls):
        raise ValueError(f"--impl takes a comma list of {', '.join(MODEL_IMPLS)}, got {given!r}")
    check_unique("--impl", impls)
    if fused == "block" and "sdpa" in impls:
        raise ValueError("--impl sdpa (torch's SDPA for the attention) needs --fused off: --fused block runs "
                         "maefast's own attention inside each block's one op")
    if device is None:
        return
    import torch

    from .ops._backend import choose_impl

    for impl in impls:
        if impl in ("triton", "cuda"):  # auto, reference and sdpa run anywhere
            try:
                choose_impl(impl, torch.device(device), cuda_op="attention_fwd", what="the model")
            except ValueError as e:
                raise ValueError(f"--impl {impl}: {e}") from None


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or a stdout without a descriptor
        return False


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is the machine's memory running out (a batch or model too large for it: the user's to
    change, not our bug); torch's CPU allocator says so in a plain RuntimeError."""
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", MemoryError)
    # "Storage size calculation overflowed": a tensor of more bytes than an int64 counts (--batch 2**62)
    return isinstance(e, (MemoryError, oom)) or (isinstance(e, RuntimeError) and any(
        m in str(e) for m in ("DefaultCPUAllocator: can't allocate memory", "Storage size calculation overflowed")))


def guarded(prog: str, fn, argv) -> int:
    """Runs a subcommand's main: a user's error (bad value, missing or unwritable file, a batch too large for
    the memory) is one line on stderr and exit 2, Ctrl-C one line and 130; a traceback only for our own bugs."""
    import errno

    from .train.errors import USER_ERRORS

    # a folder or file the user named that cannot be written (full, read-only, in the way): their fix
    env_errnos = (errno.EEXIST, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.ENOTDIR, errno.EISDIR)
    try:
        if prog not in ("maefast info", "maefast"):  # info shows it (and --help needs none); every other command
            # would fail at its first op, after work
            from .ops._dispatch import get_eager_dispatch

            get_eager_dispatch()  # a bad MAEFAST_EAGER_DISPATCH: ValueError, one line below
        return int(fn(argv) or 0)
    except BrokenPipeError:  # the reader of stdout went away (`maefast profile | head`): stop quietly
        if not _stdout_reader_gone():
            raise  # another pipe (a worker's, a socket): not ours to hide
        try:  # the interpreter's last flush of stdout must not raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is the user's
        oom = _out_of_memory(e)
        if not oom and not isinstance(e, USER_ERRORS) and not (isinstance(e, OSError) and e.errno in env_errnos):
            raise
        msg = str(e).strip().splitlines()
        msg = msg[0] if msg else type(e).__name__
        print(f"{prog}: error: " + (f"out of memory ({msg}): a smaller batch or model may fit" if oom else msg),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def format_info(info: dict) -> str:
    """`maefast.backends()` for a person: what is installed, what can run here, what impl="auto" runs."""
    import maefast

    cuda_build = info.get("torch_cuda_build")
    lines = [f"maefast {maefast.__version__}: what can run here", "",
             f"  torch   {info['torch']}" + (f" (CUDA {cuda_build})" if cuda_build else " (a CPU-only build)"),
             f"  GPU     {info['gpu'] or 'none (torch.cuda.is_available() is False)'}", "",
             f"  {'impl':<10} {'runs here':<9}  what"]
    what = {"reference": "PyTorch ops (the official computation), on CPU and CUDA tensors",
            "triton": f"maefast's Triton kernels (triton {info.get('triton_version')})",
            "cuda": "maefast's CUDA C++ kernels (maefast._C: " + (", ".join(info["_C_ops"]) or "built") + ")"}
    for impl, ok in info["can_run"].items():
        lines.append(f"  {impl:<10} {'yes' if ok else 'no':<9}  {what[impl] if ok else info['why_not'][impl]}")
    lines += ["", f'impl="auto" here: {info["auto"]}.']
    if info.get("triton_interpreter"):
        lines.append("TRITON_INTERPRET=1 is set: impl=\"triton\" runs the Triton kernels on CPU tensors through the "
                     "interpreter (slow; for tests).")
    if "jpeg_reader" in info:
        lines.append(f"JPEG reader of the data loader: {info['jpeg_reader']}"
                     + (f" (not the windowed one: {info['jpeg_window_error']})" if info.get("jpeg_window_error") else ""))
    lines += [f"eager calls reach the ops: {info['eager_dispatch']} (MAEFAST_EAGER_DISPATCH)",
              "machine-readable: maefast info --json (= maefast.backends())"]
    return "\n".join(lines)


def info_main(argv=None) -> int:
    import json

    import maefast

    p = OneLineParser(prog="maefast info", description="What can run here: torch, the GPU, and which "
                      "of maefast's backends (reference, triton, cuda) run on this machine, and why not.")
    p.add_argument("--json", action="store_true", help="print maefast.backends() as JSON")
    a = p.parse_args(argv)
    info = maefast.backends()
    print(json.dumps(info, indent=2) if a.json else format_info(info))
    return 0


def usage() -> str:
    lines = ["usage: maefast <command> [options]   (no command: `maefast profile` on the embedded default)",
             "       maefast --version", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # (through `guarded`: `maefast --help | head` stops quietly, as the commands do)
    if argv and argv[0] in ("-h", "--help"):
        return guarded("maefast", lambda _: print(usage(), flush=True), argv)
    if argv and argv[0] in ("-V", "--version"):  # (else read as an option of the default command, profile)
        from . import __version__

        return guarded("maefast", lambda _: print(f"maefast {__version__}", flush=True), argv)
    cmd = "profile"
    if argv and not argv[0].startswith("-"):
        cmd = argv.pop(0)
    if cmd not in COMMANDS:
        print(f"maefast: error: unknown command {cmd!r} (commands: {', '.join(COMMANDS)}; see maefast --help)",
              file=sys.stderr)
        return 2
    try:
        fn = info_main if cmd == "info" else importlib.import_module(COMMANDS[cmd][0]).main
    except KeyboardInterrupt:  # while importing torch
        print(f"maefast {cmd}: interrupted", file=sys.stderr)
        return 130
    return guarded(f"maefast {cmd}", fn, argv)


if __name__ == "__main__":
    sys.exit(main())
