"""Input validation shared by every public function (user errors -> ValueError/TypeError naming
the argument). Validation is skipped while torch.compile traces (the fake tensors carry shapes
only, and the checks were already made eagerly)."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None,
                 device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_mask_ratio(mask_ratio, num_patches: int | None = None) -> int | None:
    """Returns len_keep = floor(L*(1-r)) when num_patches is given."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float in (0, 1), got {type(mask_ratio).__name__}")
    if not (0.0 < float(mask_ratio) < 1.0):
        raise ValueError(f"mask_ratio must be in the open interval (0, 1), got {mask_ratio}")
    if num_patches is None:
        return None
    len_keep = int(num_patches * (1 - float(mask_ratio)))
    if len_keep < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} keeps floor({num_patches}*(1-{mask_ratio})) = 0 patches; "
            "at least one patch must stay visible")
    return len_keep


def check_patch_size(patch_size) -> int:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise TypeError(f"patch_size must be an int, got {type(patch_size).__name__}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    return patch_size


def check_images(name: str, imgs, patch_size: int, *, channels: int | None = None) -> tuple[int, int]:
    """Validates an NCHW image batch; returns the patch grid (h, w)."""
    check_tensor(name, imgs, ndim=4)
    if not imgs.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {imgs.dtype}")
    n, c, H, W = imgs.shape
    if channels is not None and c != channels:
        raise ValueError(f"{name} must have {channels} channels (shape (N, {channels}, H, W)), got shape {tuple(imgs.shape)}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"{name} height and width ({H}, {W}) must be multiples of patch_size={patch_size}")
    if H == 0 or W == 0 or n == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(imgs.shape)}")
    return H // patch_size, W // patch_size


def to_2tuple(name: str, v) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
