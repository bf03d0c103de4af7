"""Checkpoints: atomic writes, exact-resume state (RNG included), clear errors for files that are not
training checkpoints, and the encoder export in the official release layout
(``mae_pretrain_vit_base.pth`` & co.: ``{"model": encoder state dict}``).

Two layouts, one file name (``checkpoint-last.pth``), and either resumes the other's run:
  - single file (one process, DDP): model and optimizer state (full tensors, parameter names as keys)
    in the file itself;
  - sharded (FSDP): the file holds the run's position and settings, and names a folder beside it,
    ``checkpoint-last.pth.dcp-<id>/``, written by every rank with ``torch.distributed.checkpoint``
    (sharded, parallel, loadable at another world size and into an unsharded model).
The file is replaced atomically after its folder is complete, so a kill at any point leaves the
previous checkpoint whole.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import tempfile
import warnings

import numpy as np
import torch

from ..convert import ENCODER_PREFIXES, is_encoder_only, strip_wrapper_prefixes
from ..graphs import first_line, message_line
from .errors import RunError, mount_point, no_space_cause

CHECKPOINT_NAME = "checkpoint-last.pth"
FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter names, position in samples, optional shards
SHARDS_SUFFIX = ".dcp-"
# Keys of the encoder in the official release files (timm VisionTransformer names).
RELEASE_NAMES = {"mae_vit_base_patch16": "vit_base", "mae_vit_large_patch16": "vit_large",
                 "mae_vit_huge_patch14": "vit_huge"}


def _fsync_dir(folder: str) -> None:
    try:  # make a rename durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _no_space(path: str, exc: BaseException) -> RunError | None:
    if no_space_cause(exc) is None:
        return None
    return RunError(f"no space left on {mount_point(path)}: {os.path.basename(path)} not written, the previous one "
                    f"(if any) is intact in {os.path.dirname(os.path.abspath(path))}")


def _discard_and_reraise(tmp: str, path: str, exc: BaseException):
    """A write to ``tmp`` (meant for ``path``) failed: remove what it left, then re-raise, as a one-line
    RunError when the disk is full."""
    import shutil

    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
        os.unlink(tmp)
    full = _no_space(path, exc) if isinstance(exc, Exception) else None
    if full is not None:
        raise full from exc
    raise exc


def file_mode(path: str) -> int:
    """The permissions a file written to ``path`` under a temporary name (mkstemp makes 0600) should get:
    those of the file it replaces, else a new file's usual ones."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic_write(path: str, write) -> None:
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        _discard_and_reraise(tmp, path, exc)
    _fsync_dir(folder)


def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace onto ``path``.

    A crash or kill at any point leaves either the previous file or the new one, never a torn file.
    A full disk raises RunError("no space left on <mount>: ... the previous one is intact").
    """
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_file(path: str, write) -> None:
    """Replaces a file a user named (--json, --out, --png, ...) atomically with what ``write(f)`` writes to a
    binary file (same rules as ``atomic_save``); through a symbolic link, the file it points to (the link stays)."""
    _atomic_write(os.path.realpath(path), write)


def atomic_write_text(path: str, text: str) -> None:
    """Replaces a text file atomically (``atomic_write_file``: through a symbolic link, the file it points to)."""
    atomic_write_file(path, lambda f: f.write(text.encode()))


def link_or_copy(src: str, dst: str) -> None:
    """``dst`` (a new name) becomes a copy of the file or folder ``src``: hard links where the file
    system allows (no space used: checkpoint files are never modified in place), else a copy. Built
    under a temporary name and renamed, so ``dst`` is whole or absent."""
    import shutil

    folder = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(folder, f".{os.path.basename(dst)}.{os.getpid()}.tmp")
    try:
        if os.path.isdir(src):
            shutil.copytree(src, tmp, copy_function=_link_or_copy_file)
        else:
            _link_or_copy_file(src, tmp)
        os.replace(tmp, dst)
    except BaseException as exc:
        _discard_and_reraise(tmp, dst, exc)
    _fsync_dir(folder)


def _link_or_copy_file(src: str, dst: str) -> None:
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# -- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy, torch CPU and (if initialised) CUDA generator states of this process, as
    tensors / tuples of ints so the checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# -- reading -----------------------------------------------------------------------------------
def _torch_load(path: str, mmap: bool = False) -> dict:
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a folder: pass the checkpoint file (e.g. "
                                f"{os.path.join(path, CHECKPOINT_NAME)})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:  # torch's legacy (pre-zip) format cannot be memory-mapped
                if not (mmap and "mmap" in str(exc)):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise PermissionError(f"cannot read checkpoint {path!r}: {exc.strerror}") from None
    except Exception as exc:  # torch reports a torn / foreign file in many ways; all mean "not readable"
        why = message_line(exc, 120)
        if "Weights only load failed" in why or "weights_only" in why:
            # torch says the same first line for pickled objects and for bytes that are no pickle at all
            why = ("it holds Python objects, not only tensors and plain data" if "Unsupported global" in str(exc)
                   else "not a file torch.save wrote")
        raise ValueError(f"{path!r} is not a readable maefast/MAE checkpoint (truncated, corrupt or another kind "
                         f"of file: {why})") from None


def shards_dir(ck: dict, path: str) -> str | None:
    """The sharded-state folder a checkpoint file names (absolute), or None for a single file."""
    name = ck.get("shards")
    return os.path.join(os.path.dirname(os.path.abspath(path)), name) if name else None


def load_checkpoint(path: str, states: bool = True, optimizer: bool = True) -> dict:
    """Loads a checkpoint of ``maefast train`` or of the official code onto the CPU.

    ``weights_only=True`` (no arbitrary pickled code); the official files' ``args`` (an
    argparse.Namespace) is allowed explicitly. A file holding a plain state dict (``torch.save(
    model.state_dict(), path)``) reads as ``{"model": state dict}``. A sharded checkpoint's ``model`` and ``optimizer``
    are read from its folder when ``states`` (full tensors, one process, no process group needed).
    ``optimizer=False`` (a reader of the weights only): a single file is memory-mapped, so the
    optimizer's moments (twice the weights) are never read, and a sharded one's optimizer is not
    unsharded. A file that is not a checkpoint raises ValueError naming it (one line for the CLI).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a checkpoint file's path (str or os.PathLike), got {type(path).__name__}")
    ck = _torch_load(path, mmap=not optimizer)
    if isinstance(ck, dict) and ck and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ck.items()):
        ck = {"model": ck}  # a plain state dict (torch.save(model.state_dict(), path)): its weights, no run state
    if not isinstance(ck, dict) or ("model" not in ck and "shards" not in ck):
        raise ValueError(f"{path!r} is not a maefast/MAE checkpoint (no 'model' entry)")
    model = ck.get("model")
    if "model" in ck and not (isinstance(model, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                               for k, v in model.items())):
        what = type(model).__name__ if not isinstance(model, dict) else "dict with non-tensor entries"
        raise ValueError(f"{path!r} is not a maefast/MAE checkpoint ('model' is a {what}, not a state dict)")
    if isinstance(ck.get("model"), dict):  # saved through DDP / torch.compile: their key prefixes dropped
        ck["model"] = strip_wrapper_prefixes(ck["model"])
    folder = shards_dir(ck, path)
    if folder is not None and not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint {path!r} names its sharded state {folder!r}, which is missing")
    if folder is not None and states:
        full = _load_full_shards(folder, None if optimizer else {"model"})
        ck["model"], ck["optimizer"] = full["model"], full.get("optimizer")
    return ck


def _load_full_shards(folder: str, keys: set[str] | None = None) -> dict:
    """The tensors (under the top-level ``keys``, default all) of a torch.distributed.checkpoint
    folder, unsharded, in this process."""
    with warnings.catch_warnings(), reading_shards(folder):
        warnings.simplefilter("ignore")
        try:
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
        except ImportError:  # older torch: the public converter, through a temporary file
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            with tempfile.TemporaryDirectory() as tmp:
                dcp_to_torch_save(folder, os.path.join(tmp, "full.pth"))
                return torch.load(os.path.join(tmp, "full.pth"), map_location="cpu", weights_only=True)
        return _load_state_dict_from_keys(keys, checkpoint_id=folder)


@contextlib.contextmanager
def reading_shards(folder: str):
    """Around a read of a torch.distributed.checkpoint folder: a torn, partial or foreign one is one
    ValueError naming it (torch's CheckpointException derives from BaseException, not Exception)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        raise ValueError(f"sharded checkpoint folder {folder!r} is not readable (damaged or incomplete: "
                         f"{first_line(exc, 120)})") from None



def check_resumable(ck: dict, path: str) -> None:
    """ValueError (one line) unless ``ck`` is a ``maefast train`` checkpoint that can continue a run."""
    if "shards" not in ck and is_encoder_only(ck.get("model", {})):
        raise ValueError(f"{path!r} is an encoder-only file (an export such as mae_pretrain_*.pth: no decoder, "
                         "no optimizer state): it cannot resume training; pass OUTPUT_DIR/checkpoint-last.pth")
    missing = [k for k in ("optimizer", "step", "epoch", "model_name") if k not in ck and
               not (k == "optimizer" and "shards" in ck)]
    if missing:
        raise ValueError(f"{path!r} holds model weights but not a maefast train run's state (no "
                         f"{', '.join(missing)}): it cannot resume a run (maefast.convert.load_official_state_dict "
                         "loads its weights into a model)")
    if int(ck.get("format_version", 1)) > FORMAT_VERSION:
        raise ValueError(f"{path!r} was written by a newer maefast (checkpoint format {ck['format_version']}, this "
                         f"one reads up to {FORMAT_VERSION})")


def check_states_fit(ck: dict, path: str, model: torch.nn.Module) -> None:
    """ValueError (one line) unless a checkpoint's weights are the model's, name for name and shape for
    shape, and it holds optimizer state once it records a step. Before the run's folder is touched
    (an --overwrite run deleted the old run, then failed); and torch's full-state loading fills a weight the
    file lacks with the model's own fresh one, silently. A sharded one's names and shapes are read from its
    folder's metadata (no tensor is read)."""
    saved, has_state = ck.get("model"), bool((ck.get("optimizer") or {}).get("state"))
    folder = shards_dir(ck, path)
    if folder is not None:
        from torch.distributed.checkpoint import FileSystemReader

        with reading_shards(folder):
            meta = FileSystemReader(folder).read_metadata().state_dict_metadata
        saved = {k[len("model."):]: v for k, v in meta.items() if k.startswith("model.") and hasattr(v, "size")}
        has_state = any(k.startswith("optimizer.state.") for k in meta)
    if not isinstance(saved, dict):
        return
    mine = model.state_dict()
    missing, extra = [k for k in mine if k not in saved], [k for k in saved if k not in mine]

    def shape(t) -> tuple:  # (a sharded one's metadata has .size)
        return tuple(t.size if folder is not None else t.shape)

    odd = [k for k in mine if k in saved and shape(saved[k]) != tuple(mine[k].shape)]
    why = (f"it lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") if missing
           else f"it holds {extra[0]}, which the model has not" if extra else
           f"its {odd[0]} has shape {shape(saved[odd[0]])}, the model's {tuple(mine[odd[0]].shape)}" if odd
           else None)
    if why is None and int(ck.get("step", 0)) > 0 and not has_state:
        why = f"its optimizer state is empty, though it records {int(ck['step'])} steps"
    if why is not None:
        raise ValueError(f"{path!r} does not fit this run's model ({ck.get('model_name', 'its model')}): {why}; "
                         "a damaged or edited checkpoint cannot resume exactly")


def referenced_shards(folder: str, only: str | None = None) -> set[str]:
    """Names of the sharded-state folders that checkpoint files in ``folder`` refer to (``only``: that
    file's). Files are read memory-mapped: a large single-file checkpoint costs nothing here."""
    from .rundir import SHARDS_DIR

    if not os.path.isdir(folder):
        return set()
    names = os.listdir(folder)
    owners = {m.group("owner") for n in names for m in [SHARDS_DIR.match(n)] if m}
    if only is not None:
        owners &= {only}
    live = set()
    for owner in owners:
        try:
            ck = _torch_load(os.path.join(folder, owner), mmap=True)
        except (OSError, ValueError, RuntimeError):
            continue  # the owner file is gone or torn: its folders are stale
        if isinstance(ck, dict) and ck.get("shards"):
            live.add(ck["shards"])
    return live


# -- encoder export ----------------------------------------------------------------------------
def encoder_state_dict(model_state: dict) -> dict:
    """The encoder part of a full MAE state dict, with the official release keys
    (cls_token, pos_embed, patch_embed.proj.*, blocks.*, norm.*), tensors cloned to the CPU."""
    out = {k: v.detach().to("cpu").clone() for k, v in model_state.items() if k.startswith(ENCODER_PREFIXES)}
    if "cls_token" not in out or not any(k.startswith("blocks.") for k in out):
        raise ValueError("model_state has no MAE encoder keys (cls_token, blocks.*)")
    return out


def release_filename(model_name: str) -> str:
    """``mae_pretrain_vit_base.pth`` (the official names) or ``mae_pretrain_<model>.pth``."""
    short = RELEASE_NAMES.get(model_name, model_name.removeprefix("mae_"))
    return f"mae_pretrain_{short}.pth"


def export_encoder(model_state: dict, out_dir: str, model_name: str) -> str:
    """Writes ``{"model": encoder state dict}`` (the official release layout) atomically; returns the path.

    Loads into the official ``models_vit`` / timm ``VisionTransformer`` with ``strict=False`` (the
    head and fc_norm are the fine-tuning additions), as the official ``main_finetune.py`` does.
    """
    path = os.path.join(out_dir, release_filename(model_name))
    atomic_save({"model": encoder_state_dict(model_state)}, path)
    return path
