"""What a `maefast.TrainStep`'s settings may be: the constructor's checks, run again when an eager
step's setting is assigned between calls (a captured step's are frozen)."""
from __future__ import annotations

import torch

from ._validate import check_bool, check_int, check_mask_ratio

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# seeds are drawn below 2**62 so that seed + calls stays inside Philox's [0, 2**63)
SEED_LIMIT = 2 ** 62
RANK_STRIDE = 0x9E3779B97F4A7C15 % SEED_LIMIT  # up to 1024 ranks: their seed + k streams >= 2**49 calls apart


def check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    return dtype


def check_seed(seed):
    """An int in [0, 2**62); None draws one from torch's default generator (``torch.manual_seed`` reproduces it)."""
    if seed is None:
        return int(torch.randint(0, SEED_LIMIT, (1,)))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**62), got {seed!r}")
    return seed


def _check_clip(v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
        raise ValueError(f"clip_grad must be a number > 0 or None, got {v!r}")
    return v


def _check_ratio(v):
    check_mask_ratio(v)
    return v


# the constructor's checks, run again on an eager step's later assignments (a negative clip_grad reversed
# every update; accum_steps = 0 divided by zero at the next backward)
SETTING_CHECKS = {"dtype": check_dtype, "seed": check_seed, "clip_grad": _check_clip, "mask_ratio": _check_ratio,
                  "accum_steps": lambda v: check_int("accum_steps", v, 1),
                  "warmup_steps": lambda v: check_int("warmup_steps", v, 1),
                  "restore": lambda v: check_bool("restore", v)}


def checked_setting(step, name: str, value):
    """``value`` for ``step.<name>``: the constructor's check, and what the step's model and scaler allow."""
    value = SETTING_CHECKS[name](value)
    known = step.__dict__
    if name == "mask_ratio" and not known.get("_pass_ratio", True) and known["_config"] is None and value != 0.75:
        raise ValueError(f"mask_ratio={value}: the model's forward takes no mask_ratio (its own applies)")
    if name == "dtype" and value == torch.float16 and "scaler" in known and known["scaler"] is None:
        raise ValueError("dtype=torch.float16 set on a step without a GradScaler (its gradients would underflow): "
                         "build a TrainStep with dtype=torch.float16, which makes one")
    return value
