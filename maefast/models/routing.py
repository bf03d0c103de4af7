"""Which calls the fast forward serves, for maefast's own model and for official-layout models
patched by `maefast.patch`.

The fast path serves exactly the calls it computes exactly. Any other call runs the model's original
forward (correct, slower: one `SlowPathWarning` per reason and process says why) or raises. What the
module tree says is checked on every call (`structure_reason`: dropout, hooks, replaced forwards). Methods
the fast forward would replace are checked, so that a user's override is never silently dropped:
- `random_masking`, `forward_encoder`, `forward_decoder` (and `forward`, for a patched model) of a
  user's subclass: refused with a TypeError naming them (the fast path cannot call into them);
- `forward_loss` or `patchify` (which the official `forward_loss` reads): the loss goes through the
  model's own `forward_loss(imgs, pred, mask)`, on the fast path's prediction of every patch.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from .._modules import hooked as _hooked
from .._modules import defining_class, package
from .._modules import plain_layer as _plain_layer
from .._validate import check_bool, check_mask_ratio, compiling
from ..reference.normalize import normalize, pixel_stats
from .fast import _RoutedBlockForward, fast_forward, official_view, trusted_class, unsupported_weights

# official-layout methods the fast forward replaces: a user's version would be dropped
REPLACED = ("forward_encoder", "forward_decoder", "random_masking")
# those the loss reads: a user's version is called (the loss then goes through model.forward_loss)
LOSS_PARTS = ("forward_loss", "patchify")


class SlowPathWarning(UserWarning):
    """A call the fast path cannot serve exactly ran the model's original (slower) forward."""


_WARNED: set[str] = set()


class _OwnDefault:
    """A patched forward's mask_ratio when the caller gives none: the original forward's own default."""

    def __repr__(self) -> str:
        return "<the original forward's default>"


OWN_DEFAULT = _OwnDefault()


def is_own_default(mask_ratio) -> bool:
    """Whether no mask_ratio was given (`OWN_DEFAULT`). isinstance, not `is`: dynamo in torch 2.11 cannot
    compare a traced float (a SymFloat once the ratio varies) with an object by identity."""
    return isinstance(mask_ratio, _OwnDefault)


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


# -- what the module tree says --------------------------------------------------------------------------

# where a module keeps its drop-path rate: timm's DropPath and maefast.nn.DropPath (drop_prob)
_DROP_PATH_ATTRS = ("drop_prob",)
# inside a block, the modules the unfused fast block calls (their hooks run); fused="block" calls none
_CALLED_IN_BLOCK = ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.act", "mlp.fc2")


def _drop_rate(m: nn.Module) -> float:
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p
    d = m.__dict__
    for a in _DROP_PATH_ATTRS:  # (a loop, not next() of a generator: asked of every module on every call)
        if a in d:
            return d[a]
    return 0.0


def structure_reason(model: nn.Module, fused, return_pred: bool) -> str | None:
    """Why the fast path would not compute what this official-layout model's module tree says, or None.
    Checked on every call (a walk of the modules: ViT-H 1.5 ms of CPU time, 2.3 with fused="block", on the
    2-core development CPU, 2026-12-07; a captured TrainStep replays without it; modules added, replaced or hooked
    after the first call count):
    - a dropout or drop-path module active in training (each module's own flag: an eval() model may
      hold a block in train());
    - a block, its attention or MLP, or the patch embedding whose forward is an instance attribute or a
      class maefast does not know (the fast path replaces those forwards with the official computation);
      the head of a return_pred=False call that is not a Linear (its weight is read directly);
    - forward or backward hooks on a module the fast path does not call (global hooks excepted, see
      `skipped_hooks_reason`): inside the patch embedding or a block (with fused="block" all of a
      block; unfused, all but its norms, attention projection and MLP layers), or the head (called on
      the patch rows only, or not at all for return_pred=False). A block routed through its module
      (FSDP2, `route_blocks_through_modules`) runs its own hooks.
    Under torch.compile the same rules are traced into the graph (before, only the dropout rule was, and
    a compiled model skipped hooks that its eager calls ran); as for any compiled module, hooks added after
    the compile are seen only after a recompile (torch's `skip_nnmodule_hook_guards`)."""
    hooks = False
    for m in model.modules():
        rate = _drop_rate(m)
        if rate and m.training:
            return f"{type(m).__name__}(p={rate}) is active in training mode (the fast path has no dropout there)"
        hooks = hooks or (m is not model and _hooked(m))
    root = (_layout_root(type(model)) or type(model)).__module__
    head = model.decoder_pred
    if not return_pred and not _plain_layer(head, nn.Linear):
        return f"decoder_pred is {_not_plain(head, nn.Linear)} (the masked-only head reads a Linear's weight and bias)"
    found = replaced_forward(model, root, fused)
    if found is not None:
        return f"{found[0]} runs {found[1]}, which the fast path would replace"
    if hooks:
        # not the head: the fast path gives it the L patch rows without the cls row (its hooks would see that)
        called = [model.norm, model.decoder_embed, model.decoder_norm]
        for blk in (*model.blocks, *model.decoder_blocks):
            called += [blk] if getattr(blk, "_maefast_module_call", False) else []
            called += [] if fused == "block" else [_get_path(blk, a) for a in _CALLED_IN_BLOCK]
        return skipped_hooks_reason(model, called)
    return None


# block parts of newer timm versions the fast block does not compute: each must be an Identity (and the
# patch embedding's norm: the fast patch embedding has none)
BLOCK_IDENTITIES = ("ls1", "ls2", "attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm")
# inside a block, the layers whose weights the fast path reads instead of calling them: qkv always (the
# attention op takes its packed output), the rest with fused="block" (one op for the whole block), whose
# norms and activation are also computed, not called (their classes are checked by is_layer_norm and
# exact_gelu, their instance forwards here)
_READ_ALWAYS = ("attn.qkv",)
_READ_FUSED = ("attn.proj", "mlp.fc1", "mlp.fc2")
_COMPUTED_FUSED = ("norm1", "norm2", "mlp.act")


# the children whose parameters the fast path reads or calls, of the modules whose forwards it replaces (the
# patch embedding, each block, its attention and its MLP); any other parameter or buffer there (a fork's q/v
# bias, a relative position table, a learned scale) is one the fast path would drop
_READ_CHILDREN = {"": ("norm1", "attn", "norm2", "mlp"), "attn": ("qkv", "proj"), "mlp": ("fc1", "act", "fc2")}


def _unread_state(m: nn.Module, known) -> str | None:
    """The name of a parameter or buffer of `m` (its own, or in a child not in `known`) the fast path never
    reads, or None."""
    if m._parameters or m._buffers:  # (asked on every call: the common case, none, costs a dict test)
        for n, t in (*m._parameters.items(), *m._buffers.items()):
            if t is not None:
                return n
    for n, child in m._modules.items():
        if n not in known and child is not None and (child._parameters or child._buffers or child._modules):
            for sub, x in child.named_modules(prefix=n):
                for pn, t in (*x._parameters.items(), *x._buffers.items()):
                    if t is not None:
                        return f"{sub}.{pn}"
    return None


def _skipped_child(m: nn.Module, known, root_module: str) -> tuple[str, str] | None:
    """(name, what it is) of a child of `m` not in `known` (one the fast block never calls: a dropout, drop
    path or timm Identity slot) that is not an Identity, a dropout or a drop path (`_DROP_PATH_ATTRS`) of a
    class maefast knows without an instance forward (a user's dropout or noise there would be dropped), or None.
    A fork's own copy of timm's DropPath (a class of that name keeping `drop_prob`, from any module) counts as
    timm's. Their rates are `structure_reason`'s."""
    for n, c in m._modules.items():
        if n in known or c is None:
            continue
        if "forward" in c.__dict__:
            return n, "an instance forward"
        if not (isinstance(c, (nn.Identity, nn.modules.dropout._DropoutNd)) or any(a in c.__dict__ for a in
                                                                                   _DROP_PATH_ATTRS)):
            return n, f"a {type(c).__name__}, not an Identity, dropout or drop path"
        timm_copy = type(c).__name__ == "DropPath" and "drop_prob" in c.__dict__
        if not trusted_class(type(c), root_module) and not timm_copy:
            k = defining_class(type(c), "forward")
            return n, f"forward of {k.__module__}.{k.__qualname__}"
    return None


def _not_plain(m, cls: type) -> str:
    if "forward" in getattr(m, "__dict__", {}):
        return "an instance forward"
    if isinstance(m, cls) and trusted_class(type(m)):
        return f"a {cls.__name__} with child modules ({', '.join(n for n, _ in m.named_children())})"
    return f"a {type(m).__module__}.{type(m).__qualname__}"


def patch_conv_reason(conv: nn.Conv2d) -> str | None:
    """Why the fast patch embedding, which embeds non-overlapping square patches of the kernel's size, does not
    compute this torch Conv2d (stride other than the kernel, padding, dilation, groups), or None."""
    k = tuple(conv.kernel_size)
    if k[0] == k[1] and tuple(conv.stride) == k and conv.padding in ((0, 0), "valid") and \
            tuple(conv.dilation) == (1, 1) and conv.groups == 1:
        return None
    return (f"a Conv2d with kernel_size={k}, stride={tuple(conv.stride)}, padding={conv.padding}, dilation="
            f"{tuple(conv.dilation)}, groups={conv.groups} (the fast patch embedding takes square patches the "
            "kernel's size: stride = kernel_size, no padding, dilation 1, groups 1)")


def replaced_forward(model: nn.Module, root_module: str, fused=False) -> tuple[str, str] | None:
    """The first module whose forward the fast path replaces with the official computation (the patch
    embedding; each block, its attention and its MLP) that runs an instance forward or a class maefast
    does not know (`trusted_class`), a layer whose weights it reads instead of calling it (the patch
    projection, each qkv; with fused="block" each attention projection and MLP layer) that is not a plain
    torch layer (`_plain_layer`), a newer timm part that is not an Identity (`BLOCK_IDENTITIES`, the patch
    embedding's norm), a dropout or drop-path slot holding anything else (`_skipped_child`), or with
    fused="block" a norm or activation with an instance forward, as (path, what it runs); None when there
    is none. Paths are built only for the answer (it runs on every call)."""
    pe = model.patch_embed
    norm = _get_path(pe, "norm")
    if norm is not None and not isinstance(norm, nn.Identity):
        return "patch_embed.norm", f"a {type(norm).__name__} (the fast patch embedding has no norm)"
    found = _replaced("patch_embed", pe, root_module)
    unread = _unread_state(pe, ("proj",)) if found is None else None
    if unread is not None:
        return "patch_embed", f"a forward with its own {unread!r} (a parameter or buffer the fast path never reads)"
    if found is None and not _plain_layer(getattr(pe, "proj", None), nn.Conv2d):
        found = "patch_embed.proj", _not_plain(getattr(pe, "proj", None), nn.Conv2d) + \
            " (the fast path reads its weights and never calls it)"
    if found is None and (why := patch_conv_reason(pe.proj)) is not None:
        found = "patch_embed.proj", why
    if found is not None:
        return found
    read = _READ_ALWAYS + (_READ_FUSED if fused == "block" else ())
    for name in ("blocks", "decoder_blocks"):
        for i, blk in enumerate(getattr(model, name)):
            for extra in BLOCK_IDENTITIES:
                m = _get_path(blk, extra)
                if m is not None and not isinstance(m, nn.Identity):
                    return f"{name}.{i}.{extra}", f"a {type(m).__name__} (the fast block computes an Identity there)"
            for part, m in (("", blk), (".attn", blk.attn), (".mlp", blk.mlp)):
                found = _replaced(f"{name}.{i}{part}", m, root_module)
                if found is not None:
                    return found
                unread = _unread_state(m, _READ_CHILDREN[part[1:]])
                if unread is not None:
                    return f"{name}.{i}{part}", f"a forward with its own {unread!r} (a parameter or buffer the fast " \
                        "block never reads)"
                skipped = _skipped_child(m, _READ_CHILDREN[part[1:]], root_module)
                if skipped is not None:
                    return f"{name}.{i}{part}.{skipped[0]}", f"{skipped[1]} (the fast block never calls it: put an " \
                        "nn.Identity, a torch Dropout or timm's DropPath there)"
            for attr in read:
                m = _get_path(blk, attr)
                if not _plain_layer(m, nn.Linear):
                    return f"{name}.{i}.{attr}", _not_plain(m, nn.Linear) + \
                        " (the fast path reads its weights and never calls it)"
            if fused == "block":
                for attr in _COMPUTED_FUSED:
                    if "forward" in getattr(_get_path(blk, attr), "__dict__", {}):
                        return f"{name}.{i}.{attr}", "an instance forward (fused='block' computes it, never calls it)"
    return None


def _replaced(path: str, m: nn.Module, root_module: str) -> tuple[str, str] | None:
    own = m.__dict__.get("forward")
    if own is not None and not isinstance(own, _RoutedBlockForward):
        return path, "an instance forward"
    if not trusted_class(type(m), root_module):
        c = defining_class(type(m), "forward")
        return path, f"forward of {c.__module__}.{c.__qualname__}"
    return None


def skipped_hooks_reason(model: nn.Module, called) -> str | None:
    """Why hooks would be skipped: hooks on a submodule of `model` that is not in `called` (the modules
    the fast path calls as modules, so their hooks run), or None. Global module hooks do not count: they
    are observers (torch's ModuleTracker, so FlopCounterMode) that see the modules the fast path calls."""
    ids = {id(m) for m in called if m is not None}
    for name, m in model.named_modules():
        if m is not model and _hooked(m) and id(m) not in ids:
            return f"{name} has hooks, which the fast path would not run (it does not call {name})"
    return None


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def fast_unsupported(weight: torch.Tensor, mask_ratio) -> str | None:
    """Why the fast path cannot take a call the model's own forward can: weights in a dtype maefast's
    kernels do not take, or a mask ratio outside maefast's rule ((0, 1) keeping at least one patch and masking
    one; the official code also takes 0 and ratios keeping none, and a ratio that is not a Python number)."""
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
    return package(c) == "maefast"


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

    return philox_noise(batch, num_patches, seed, 0, device=device)  # a device seed is not read on the host


def original_inputs(imgs, noise, seed, num_patches: int, mean=None, std=None, normalize_uint8: bool = True):
    """(images, noise) for an original forward serving a call the fast path cannot: uint8 images
    normalised (with mean/std, default ImageNet's), as the original code takes them (not with
    normalize_uint8=False: an original that takes them itself), and a `seed` turned into the noise that
    gives the fast path's mask."""
    if isinstance(imgs, torch.Tensor) and normalize_uint8:
        stats = pixel_stats(imgs, mean, std)
        if stats is not None:
            imgs = normalize(imgs, *stats)
    if seed is not None:
        if noise is not None:
            raise ValueError("pass either noise or seed, not both")
        noise = seed_noise(seed, imgs.shape[0], num_patches, imgs.device)
    return imgs, noise


# > 0 while `maefast.TrainStep` calls the model: its seed only asks for a fresh mask per call (the fast
# path's device seed), which an original forward without noise gives by drawing its own (torch's
# generator: fresh on every CUDA-graph replay too). A seed the caller passed is refused there instead.
_STEP_SEEDS = 0


@contextlib.contextmanager
def step_seed():
    """The model calls inside take `seed=` as TrainStep's (see ``_STEP_SEEDS``): process-wide and dynamically
    scoped (a seed another thread passes meanwhile is taken as the step's; a recompute in the backward is
    outside it)."""
    global _STEP_SEEDS
    _STEP_SEEDS += 1
    try:
        yield
    finally:
        _STEP_SEEDS -= 1


def run_original(model: nn.Module, original: Callable, why: str, imgs, mask_ratio, noise, seed, return_pred: bool,
                 takes_noise: bool, mean=None, std=None, takes_uint8: bool = False):
    """The official-layout forward original(imgs, mask_ratio[, noise]) for a call the fast path cannot
    serve (inputs by `original_inputs`). takes_uint8: the original takes uint8 images with mean/std itself
    (maefast's reference forward: the fp32 loss target, the embedding in its weight's dtype, as the fast path)."""
    warn_slow(model, why)
    if seed is not None and noise is None and not takes_noise and _STEP_SEEDS:
        seed = None  # TrainStep's: the original draws the call's mask itself
    imgs, noise = original_inputs(imgs, noise, seed, model.pos_embed.shape[1] - 1, mean, std,
                                  normalize_uint8=not takes_uint8)
    ratio = () if is_own_default(mask_ratio) else (mask_ratio,)  # not given: the original applies its default
    stats = {"mean": mean, "std": std} if takes_uint8 else {}
    if noise is None:
        loss, pred, mask = original(imgs, *ratio, **stats)
    elif takes_noise:  # by keyword: a forward that takes it through **kwargs has no third positional
        loss, pred, mask = original(imgs, *ratio, noise=noise, **stats)
    else:
        raise TypeError(f"{type(model).__name__}'s original forward takes no noise (nor seed), and this call needs "
                        f"it because {why}; call without noise= and seed= (it then draws its own mask)")
    return loss, (pred if return_pred else None), mask


def _late_override(model: nn.Module, loss_via_model: bool) -> str | None:
    """A method set on the instance after maefast.patch (one set before is refused, or its loss routed
    through model.forward_loss there): the call runs the original forward, which calls it."""
    ov = instance_overrides(model)
    late = ov.refused + (() if loss_via_model else ov.loss)
    return f"model.{', model.'.join(late)} set on the instance (the fast path would not call it)" if late else None


def official_call(model: nn.Module, original: Callable, imgs, mask_ratio, noise, seed, return_pred: bool, *,
                  impl: str, fused, grad_checkpointing: bool, loss_via_model: bool, takes_noise: bool,
                  mean=None, std=None, takes_uint8: bool = False):
    """(loss, pred, mask) of an official-layout model: the fast path, or the original forward for a
    call the fast path cannot serve (see the module docstring and `structure_reason`). uint8 images
    (with mean/std) reach the original forward normalised first, as the official code takes them (as
    they are with takes_uint8: maefast's own model's forward normalises them itself)."""
    check_bool("return_pred", return_pred)
    if isinstance(mask_ratio, (int, float)):  # a number outside the official code's [0, 1]: refused, whichever
        check_mask_ratio(mask_ratio, official=True)  # forward the call would run (a tensor or numpy one: theirs)
    why = ("mask_ratio is None (the model's own forward decides it)" if mask_ratio is None else None) or (
        "no mask_ratio given, and the original forward's default is not a number (it decides)"
        if is_own_default(mask_ratio) else None) or (
        image_grad_reason(imgs) or structure_reason(model, fused, return_pred) or _late_override(model, loss_via_model)
        or fast_unsupported(model.pos_embed, mask_ratio))
    if why is not None:
        return run_original(model, original, why, imgs, mask_ratio, noise, seed, return_pred, takes_noise, mean, std,
                            takes_uint8)
    loss, pred, mask, _ = fast_forward(official_view(model), imgs, mask_ratio, noise, seed=seed, impl=impl, fused=fused,
                                       grad_checkpointing=grad_checkpointing, return_pred=return_pred,
                                       loss_fn=model.forward_loss if loss_via_model else None, mean=mean, std=std)
    return loss, pred, mask


__all__ = ["SlowPathWarning", "fast_unsupported", "official_call", "original_inputs", "run_original", "class_overrides",
           "instance_overrides", "structure_reason", "replaced_forward", "patch_conv_reason", "skipped_hooks_reason",
           "trusted_class", "image_grad_reason", "seed_noise", "warn_slow", "Overrides"]
