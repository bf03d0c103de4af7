"""Which calls the fast forward serves, for maefast's own model and for official-layout models
patched by `maefast.patch`.

The fast path serves exactly the calls it computes exactly. Any other call runs the model's original
forward (correct, slower: one `SlowPathWarning` per reason and process says why) or raises. Methods
the fast forward would replace are checked, so that a user's override is never silently dropped:
- `random_masking`, `forward_encoder`, `forward_decoder` (and `forward`, for a patched model) of a
  user's subclass: refused with a TypeError naming them (the fast path cannot call into them);
- `forward_loss` or `patchify` (which the official `forward_loss` reads): the loss goes through the
  model's own `forward_loss(imgs, pred, mask)`, on the fast path's prediction of every patch.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from .._validate import check_mask_ratio, compiling
from ..reference.normalize import normalize, pixel_stats
from .fast import fast_forward, official_view, unsupported_weights

# official-layout methods the fast forward replaces: a user's version would be dropped
REPLACED = ("forward_encoder", "forward_decoder", "random_masking")
# those the loss reads: a user's version is called (the loss then goes through model.forward_loss)
LOSS_PARTS = ("forward_loss", "patchify")


class SlowPathWarning(UserWarning):
    """A call the fast path cannot serve exactly ran the model's original (slower) forward."""


_WARNED: set[str] = set()


def warn_slow(model: nn.Module, why: str, stacklevel: int = 7) -> None:
    """One SlowPathWarning per (model class, reason) and process; stacklevel: frames up to the user's
    model(...) call (through nn.Module's call wrappers)."""
    if compiling():
        return
    key = f"{type(model).__name__}: {why}"
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"{type(model).__name__}: this call runs the model's original forward, not maefast's fast path "
                  f"(slower, same result): {why}. Warned once per reason.", SlowPathWarning, stacklevel=stacklevel)


def image_grad_reason(imgs, name: str = "imgs") -> str | None:
    if torch.is_grad_enabled() and isinstance(imgs, torch.Tensor) and imgs.requires_grad:
        return f"{name} requires a gradient (the fast path reads the images as constants)"
    return None


# -- dropout -------------------------------------------------------------------------------------

# where a module keeps its drop-path rate: timm's DropPath (drop_prob), maefast.nn.Block (drop_path_prob)
_DROP_PATH_ATTRS = ("drop_prob", "drop_path_prob")


def dropout_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    """The dropout and drop-path modules of `model` (scanned once: a scan per call costs ~0.3 ms at ViT-H)."""
    return tuple(m for m in model.modules()
                 if isinstance(m, nn.modules.dropout._DropoutNd) or any(a in m.__dict__ for a in _DROP_PATH_ATTRS))


def dropout_reason(modules) -> str | None:
    """Why the fast path cannot run: a dropout (p) or drop-path module active in training."""
    for m in modules:
        p = m.p if isinstance(m, nn.modules.dropout._DropoutNd) else \
            next(m.__dict__[a] for a in _DROP_PATH_ATTRS if a in m.__dict__)
        if p and m.training:
            return f"{type(m).__name__}(p={p}) is active in training mode (the fast path has no dropout there)"
    return None


def fast_unsupported(weight: torch.Tensor, mask_ratio) -> str | None:
    """Why the fast path cannot take a call the model's own forward can: weights in a dtype maefast's
    kernels do not take, or a mask ratio outside (0, 1) keeping at least one patch."""
    if compiling():
        return None
    why = unsupported_weights(weight)
    if why is not None:
        return why
    try:
        check_mask_ratio(mask_ratio, weight.shape[1] - 1)
    except (TypeError, ValueError) as e:
        return f"the fast path's rule: {e}"
    return None


# -- overrides -------------------------------------------------------------------------------------

class Overrides(NamedTuple):
    refused: tuple[str, ...]  # replaced methods a user redefined: the fast path cannot serve the model
    loss: tuple[str, ...]     # loss parts a user redefined: the loss goes through model.forward_loss


def _layout_root(cls: type) -> type | None:
    """The most basic class in cls's MRO that defines forward_encoder: the official class (or a copy)."""
    root = None
    for c in cls.__mro__:
        if "forward_encoder" in c.__dict__:
            root = c
    return root


def _is_maefast(c: type) -> bool:
    return c.__module__.split(".")[0] == "maefast"


def class_overrides(cls: type, *, forward: bool) -> Overrides:
    """Methods that classes between `cls` and its official root (maefast's own excepted) redefine.

    forward: also count `forward` (a patched model's forward is replaced; maefast's own model is not
    patched through its forward, so a subclass's forward that calls ours stays).
    """
    root = _layout_root(cls)
    if root is None:
        return Overrides((), ())
    mro = cls.__mro__
    users = [c for c in mro[:mro.index(root)] if not _is_maefast(c)]
    names = (("forward",) if forward else ()) + REPLACED
    defined = [n for n in names + LOSS_PARTS if any(n in c.__dict__ for c in users)]
    return Overrides(tuple(n for n in defined if n in names), tuple(n for n in defined if n in LOSS_PARTS))


def instance_overrides(model: nn.Module) -> Overrides:
    """Methods set on the instance itself (model.random_masking = ...)."""
    d = model.__dict__
    return Overrides(tuple(n for n in REPLACED if n in d), tuple(n for n in LOSS_PARTS if n in d))


def refuse(model: nn.Module, names, where: str) -> None:
    raise TypeError(f"{type(model).__name__} overrides {', '.join(names)}, which maefast's fast forward replaces "
                    f"(it would be silently dropped); {where}")


# -- the call --------------------------------------------------------------------------------------

def seed_noise(seed, batch: int, num_patches: int, device) -> torch.Tensor:
    """The (N, L) noise whose official masking is the mask the fast path draws from `seed`."""
    from ..reference.philox import philox_noise

    if isinstance(seed, torch.Tensor):
        seed = int(seed.reshape(-1)[0])  # a device seed is read on the host: the slow path may sync
    return philox_noise(batch, num_patches, seed, 0, device=device)


def original_inputs(imgs, noise, seed, num_patches: int, mean=None, std=None):
    """(images, noise) for an original forward serving a call the fast path cannot: uint8 images
    normalised (with mean/std, default ImageNet's), as the original code takes them, and a `seed`
    turned into the noise that gives the fast path's mask."""
    if isinstance(imgs, torch.Tensor):
        stats = pixel_stats(imgs, mean, std)
        if stats is not None:
            imgs = normalize(imgs, *stats)
    if seed is not None:
        if noise is not None:
            raise ValueError("pass either noise or seed, not both")
        noise = seed_noise(seed, imgs.shape[0], num_patches, imgs.device)
    return imgs, noise


def run_original(model: nn.Module, original: Callable, why: str, imgs, mask_ratio, noise, seed, return_pred: bool,
                 takes_noise: bool, mean=None, std=None):
    """The official-layout forward original(imgs, mask_ratio[, noise]) for a call the fast path cannot
    serve (inputs by `original_inputs`)."""
    warn_slow(model, why)
    imgs, noise = original_inputs(imgs, noise, seed, model.pos_embed.shape[1] - 1, mean, std)
    if noise is None:
        loss, pred, mask = original(imgs, mask_ratio)
    elif takes_noise:
        loss, pred, mask = original(imgs, mask_ratio, noise)
    else:
        raise TypeError(f"{type(model).__name__}'s original forward takes no noise (nor seed), and this call needs "
                        f"it because {why}; call without noise= and seed= (it then draws its own mask)")
    return loss, (pred if return_pred else None), mask


def official_call(model: nn.Module, original: Callable, imgs, mask_ratio, noise, seed, return_pred: bool, *,
                  impl: str, fused, grad_checkpointing: bool, loss_via_model: bool, takes_noise: bool,
                  dropouts: tuple = (), mean=None, std=None):
    """(loss, pred, mask) of an official-layout model: the fast path, or the original forward for a
    call the fast path cannot serve (see the module docstring). uint8 images (with mean/std) reach the
    original forward normalised first, as the official code takes them."""
    # each dropout module's own training flag decides (a model in eval() may hold a block in train())
    why = image_grad_reason(imgs) or dropout_reason(dropouts) or fast_unsupported(model.pos_embed, mask_ratio)
    if why is not None:
        return run_original(model, original, why, imgs, mask_ratio, noise, seed, return_pred, takes_noise, mean, std)
    loss, pred, mask, _ = fast_forward(official_view(model), imgs, mask_ratio, noise, seed=seed, impl=impl, fused=fused,
                                       grad_checkpointing=grad_checkpointing, return_pred=return_pred,
                                       loss_fn=model.forward_loss if loss_via_model else None, mean=mean, std=std)
    return loss, pred, mask


__all__ = ["SlowPathWarning", "fast_unsupported", "official_call", "original_inputs", "run_original", "class_overrides", "instance_overrides",
           "dropout_modules", "dropout_reason", "image_grad_reason", "seed_noise", "warn_slow", "Overrides"]
