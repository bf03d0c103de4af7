"""Input validation shared by every public function (user errors -> ValueError/TypeError naming
the argument). The same checks run while torch.compile traces, on its fake tensors (shapes, dtypes,
devices; a compiled function may never have run eagerly, and a kernel handed a tensor of the wrong
shape would read or write outside it); the checks of values are skipped there (fake tensors have
none; under fullgraph=True torch reports the error as an "Observed exception" quoting ours).

What is checked where (the README's "The ops" states the same contracts):

- Shapes, dtypes and devices: always, on the host (metadata only, no device work).
- Values of index tensors (cu_seqlens, ids_restore, ids_keep): only where reading them is free, i.e.
  on CPU tensors (`values_on_host`). On a GPU a check would be a host sync (and would break a CUDA
  graph capture), so values there are trusted, and every kernel stays inside its tensors whatever
  they hold (clamped or masked indices; see each op).
- Index tensors reach every backend dense (`dense_index`): one rule, so no kernel ever reads a
  strided view as contiguous memory.
- Meta tensors carry no values: the checks of values are skipped and the ops run their fake
  implementations (shapes, dtypes) through the dispatcher (`maefast.ops._dispatch.call`).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor  # imported by torch itself: costs nothing here

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def transform_level() -> int | None:
    """The innermost active torch.func transform's level (grad, vmap, jvp, ...), None outside every one."""
    return torch._C._functorch.maybe_current_level()


# Read while Dynamo traces (inside a compiled transform it returns a level, an int Dynamo cannot put in a
# graph: "torch.* op returned non-Tensor"): what torch.compiler.assume_constant_result
# sets (torch 2.11-2.13), without its import of torch._dynamo (and Triton: ~1 s) at `import maefast`.
# tests/test_func_transforms.py compiles a transform through it.
transform_level._dynamo_marked_constant = True


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


def check_mask_ratio(mask_ratio, num_patches: int | None = None, *, official: bool = False) -> int | None:
    """Returns len_keep = floor(L*(1-r)) when num_patches is given. maefast's rule (training, the fast
    path, the ops): r in (0, 1) keeping at least one patch and masking at least one (a ratio so small that
    1 - r rounds to 1.0 masks none: the loss over masked patches would be 0/0). official=True: the official
    code's domain, r in [0, 1] (r = 0 keeps every patch, e.g. `forward_encoder(imgs, 0.0)` for features, and its loss
    over no masked patch is 0/0 = NaN; a ratio that keeps none leaves the encoder the cls token alone)."""
    interval = "[0, 1]" if official else "(0, 1)"
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float in {interval}, got {type(mask_ratio).__name__}")
    r = float(mask_ratio)
    if not ((0.0 <= r <= 1.0) if official else (0.0 < r < 1.0)):
        raise ValueError(f"mask_ratio must be in {'the interval' if official else 'the open interval'} {interval}, "
                         f"got {mask_ratio}")
    if num_patches is None:
        return None
    len_keep = int(num_patches * (1 - r))
    if len_keep < 1 and not official:
        raise ValueError(
            f"mask_ratio={mask_ratio} keeps floor({num_patches}*(1-{mask_ratio})) = 0 patches; "
            "at least one patch must stay visible")
    if len_keep >= num_patches and not official:
        raise ValueError(f"mask_ratio={mask_ratio} masks none of the {num_patches} patches (1 - {mask_ratio} rounds "
                         "to 1.0); at least one patch must be masked")
    return len_keep


def check_bool(name: str, v) -> bool:
    """``v`` itself when it is a bool, else a TypeError naming ``name`` (a string such as "no" would be
    true, a tensor would sync)."""
    if isinstance(v, bool):
        return v
    t = type(v)
    if t.__module__ == "numpy" and t.__name__ in ("bool_", "bool"):  # numpy's bool scalar
        return bool(v)
    where = "" if t.__module__ == "builtins" else t.__module__ + "."
    raise TypeError(f"{name} must be True or False, got {where}{t.__qualname__} {v!r}")


def check_scale(scale) -> None:
    """An attention scale: None (1/sqrt(head dim)) or a finite number. Its value is not read while compiling."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not compiling() and not -math.inf < scale < math.inf:  # NaN fails both
        raise ValueError(f"scale must be finite, got {scale}")  # (a NaN or infinite one: every output NaN)


def check_int(name: str, v, low: int) -> int:
    """``v`` as given: an int (not a bool) >= low, else a ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return v


def check_patch_size(patch_size) -> int:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise TypeError(f"patch_size must be an int, got {type(patch_size).__name__}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    return patch_size


def check_images(name: str, imgs, patch_size: int, *, channels: int | None = None,
                 uint8: bool = False) -> tuple[int, int]:
    """Validates an NCHW image batch (float; or raw uint8 pixels where `uint8`, see
    `check_pixel_stats`); returns the patch grid (h, w)."""
    check_tensor(name, imgs, ndim=4)
    if not imgs.is_floating_point() and not (uint8 and imgs.dtype == torch.uint8):
        raise TypeError(f"{name} must be a floating point tensor{' or uint8 (raw pixels)' if uint8 else ''}, "
                        f"got {imgs.dtype}")
    n, c, H, W = imgs.shape
    if channels is not None and c != channels:
        raise ValueError(f"{name} must have {channels} channels (shape (N, {channels}, H, W)), got shape {tuple(imgs.shape)}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"{name} height and width ({H}, {W}) must be multiples of patch_size={patch_size}")
    if H == 0 or W == 0 or n == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(imgs.shape)}")
    return H // patch_size, W // patch_size


def check_pixel_stats(name: str, imgs: torch.Tensor, mean, std) -> None:
    """mean/std (per channel) normalise uint8 images: both None (ImageNet's, 3 channels) or both
    sequences of C finite reals, std > 0. Float images are already normalised (the official
    convention): mean and std must be None for them."""
    if imgs.dtype != torch.uint8:
        if mean is not None or std is not None:
            raise ValueError(f"mean/std normalise uint8 {name}, but {name} has dtype "
                             f"{str(imgs.dtype).replace('torch.', '')} and is taken as already normalised (the "
                             "official convention): pass mean=None and std=None, or the raw uint8 pixels")
        return
    c = imgs.shape[1]
    if (mean is None) != (std is None):
        given, missing = ("mean", "std") if std is None else ("std", "mean")
        raise ValueError(f"{missing} must be given with {given} (both per channel, or neither for ImageNet's)")
    if mean is None:
        if c != 3:
            raise ValueError(f"uint8 {name} with {c} channels need mean= and std= ({c} values each); the default "
                             "is ImageNet's, for 3 channels")
        return
    for arg, values in (("mean", mean), ("std", std)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"{arg} must be a sequence of {c} floats (one per channel of {name}), "
                            f"got {type(values).__name__}")
        if len(values) != c:
            raise ValueError(f"{arg} must have {c} values (one per channel of {name}, shape "
                             f"{tuple(imgs.shape)}), got {len(values)}: {tuple(values)}")
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{arg} must hold real numbers, got {tuple(values)}")
        # (comparisons, not math.isfinite: torch.compile(dynamic=True) traces these floats as symbolic ones,
        # which Dynamo's math.isfinite does not take: a graph break, an error under fullgraph=True)
        if not all(-math.inf < v < math.inf for v in values):
            raise ValueError(f"{arg} must be finite, got {tuple(values)}")
    if not all(v > 0 for v in std):
        raise ValueError(f"std must be > 0 for every channel, got {tuple(std)}")


def to_2tuple(name: str, v) -> tuple[int, int]:
    """A size (image, patch, grid): an int > 0 or a pair of them."""
    pair = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be > 0, got {v!r}")
    return (int(pair[0]), int(pair[1]))


# -- index tensors ---------------------------------------------------------------------------------

def check_pixel_stat_args(mean, std) -> tuple:
    """mean/std given ahead of the images (a TrainStep's): checked as `check_pixel_stats` checks them, their
    count against the images' channels left to each call. Returns them as tuples of floats, or (None, None)."""
    if mean is None and std is None:
        return None, None
    c = len(mean) if isinstance(mean, Sequence) and not isinstance(mean, (str, bytes)) else 3
    check_pixel_stats("uint8 images", torch.empty(1, c, 1, 1, dtype=torch.uint8, device="meta"), mean, std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def values_on_host(t: torch.Tensor) -> bool:
    """Whether t's values can be read without a device sync: a CPU tensor (not meta, not CUDA), and not
    while torch.compile traces, nor a fake tensor met eagerly (a FakeTensorMode memory estimate): they
    have no values; the shapes are still checked. Nor a tensor vmap batches (at any level of a torch.func
    transform's wrappers): it has no single value to read."""
    return (t.device.type == "cpu" and not compiling() and not isinstance(t, FakeTensor)
            and (transform_level() is None or not _batched(t)))


def _batched(t: torch.Tensor) -> bool:
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t):
        if f.is_batchedtensor(t):
            return True
        t = f.get_unwrapped(t)
    return False


def dense_index(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An index tensor as every backend reads it: contiguous (and in `dtype` when given).

    The one rule for cu_seqlens, ids_keep, ids_restore, the loss mask and the masked patch ids:
    made dense before any kernel sees them (a no-op for what masking returns), so no kernel reads a
    strided view as contiguous memory. Applied in each custom op's implementation, so the direct
    route, the dispatcher and torch.compile all pass through it.
    """
    t = t.contiguous()
    return t if dtype is None else t.to(dtype)


def _show(values: list) -> str:
    return str(values if len(values) <= 12 else values[:6] + ["..."] + values[-6:])


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen) -> int | None:
    """Validates varlen offsets for `total` packed rows; returns the max_seqlen to launch with.

    Contract: cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == total; max_seqlen >= the
    longest sequence. Checked on the host: max_seqlen's type and range against T and B (always:
    B sequences of at most max_seqlen rows must hold T rows, so max_seqlen >= ceil(T / B)); the
    offsets themselves when they are on the CPU (free) or when max_seqlen is None (then computed,
    one host sync). Offsets on a GPU with a given max_seqlen are trusted (no sync) and checked on
    the device instead, never silently wrong: every kernel program reads the whole array, and
    offsets that do not start at 0, decrease or end beyond T make every row NaN (out, lse, dqkv;
    sequences they make overlap would otherwise race on shared rows); a sequence longer than
    max_seqlen comes out as NaN rows; rows after cu_seqlens[-1] (padding) are NaN. Offsets are
    also clamped into [0, T]: no access leaves the tensors. A max_seqlen above T is lowered to T
    (no sequence can be longer).
    """
    nseq = cu_seqlens.numel() - 1
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
        least = -(-total // nseq)
        if max_seqlen < least:
            raise ValueError(f"max_seqlen={max_seqlen} is too small: T={total} rows in B={nseq} sequences need one "
                             f"of at least ceil(T/B) = {least} rows")
        max_seqlen = min(max_seqlen, total)
    if cu_seqlens.device.type == "meta" or compiling() or (max_seqlen is not None and not values_on_host(cu_seqlens)):
        return max_seqlen  # no values to read, or trusted on the device (see above)
    cu = cu_seqlens.tolist()  # free on the CPU; one sync on a GPU (max_seqlen was not given)
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if cu[0] != 0 or cu[-1] != total or min(lens) < 0:
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at the number of rows T={total}; "
                         f"got {_show(cu)}")
    longest = max(lens)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence in cu_seqlens ({longest} rows)")
    return longest if max_seqlen is None else max_seqlen


def check_permutation(name: str, ids: torch.Tensor) -> None:
    """Each row of `ids` (N, L) must be a permutation of 0..L-1 (as random_masking returns).

    Checked when free (a CPU tensor); on a GPU the values are trusted (a check would sync), and
    the ops that read them stay inside their tensors whatever they hold.
    """
    if not values_on_host(ids) or ids.numel() == 0:
        return
    L = ids.shape[-1]
    ok = (ids.sort(dim=-1).values == torch.arange(L, dtype=ids.dtype)).all(dim=-1)
    if not bool(ok.all()):
        row = int((~ok).nonzero()[0, 0])
        raise ValueError(f"{name} must hold a permutation of 0..{L - 1} in every row (as random_masking returns); "
                         f"row {row} is {_show(ids[row].tolist())}")


def check_index_range(name: str, ids: torch.Tensor, high: int, high_name: str = "L") -> None:
    """Every value of `ids` must lie in [0, high); checked when free (a CPU tensor)."""
    if values_on_host(ids) and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= high:
            raise ValueError(f"{name} values must be in [0, {high_name}={high}), got values in [{lo}, {hi}]")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for `device`'s type, or None (off; or a device type autocast
    does not know, such as meta, where torch.is_autocast_enabled would raise)."""
    if device.type == "meta":
        return None
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def check_input_dtype(name: str, x: torch.Tensor, weight: torch.Tensor, weight_name: str) -> None:
    """Outside autocast, `x` must have the dtype of the `weight` it meets (F.conv2d / F.linear would
    raise an error naming neither); under autocast the op casts both itself."""
    if x.dtype != weight.dtype and autocast_dtype(x.device) is None:
        dt = str(weight.dtype).replace("torch.", "")
        raise TypeError(f"{name} dtype {str(x.dtype).replace('torch.', '')} must match {weight_name} dtype {dt}: "
                        f"cast {name} (e.g. {name}.to(torch.{dt})) or the model, or run under torch.autocast")


def check_nonneg_number(name: str, v) -> float:
    """``v`` as a float: a real number (or a one-element tensor), finite and >= 0 (a NaN weight or
    learning rate would fill every parameter with NaN)."""
    if isinstance(v, bool) or not (isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1
                                                                   and not v.dtype.is_complex)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    f = float(v)
    if not (math.isfinite(f) and f >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return f
