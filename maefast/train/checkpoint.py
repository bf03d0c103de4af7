"""Checkpoints: atomic writes, exact-resume state (RNG included), and the encoder export in the
official release layout (``mae_pretrain_vit_base.pth`` & co.: ``{"model": encoder state dict}``)."""
from __future__ import annotations

import argparse
import os
import random
import tempfile

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint-last.pth"
FORMAT_VERSION = 1
# Keys of the encoder in the official release files (timm VisionTransformer names).
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
RELEASE_NAMES = {"mae_vit_base_patch16": "vit_base", "mae_vit_large_patch16": "vit_large",
                 "mae_vit_huge_patch14": "vit_huge"}


def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace onto ``path``.

    A crash or kill at any point leaves either the previous file or the new one, never a torn file.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


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


def load_checkpoint(path: str) -> dict:
    """Loads a checkpoint of ``maefast train`` or of the official code onto the CPU.

    ``weights_only=True`` (no arbitrary pickled code); the official files' ``args`` (an
    argparse.Namespace) is allowed explicitly.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path!r} is not a maefast/MAE checkpoint (no 'model' entry)")
    return ckpt


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
