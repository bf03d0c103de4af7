"""`maefast.patch(model)`: run an existing MAE on maefast's ops, in place, sharing its parameters.

Recognises (duck-typed, nothing of theirs is imported):
- the official facebookresearch/mae `MaskedAutoencoderViT` layout (patch_embed.proj, blocks[i].attn.qkv,
  random_masking, forward_loss, decoder_* ...), maefast's reference class included;
- maefast's own `maefast.models.MaskedAutoencoderViT` (its forward already is the fast path: patch
  sets its impl / fused / grad_checkpointing, so `model.impl` says what runs);
- transformers' `ViTMAEForPreTraining` (4.x and 5.x module names; separate q/k/v projections, whose
  weights are concatenated on the fly so their gradients reach the original parameters).

What a patched model promises (tests/test_patching.py):
- The fast path serves exactly the calls it computes exactly: same loss, prediction, mask and
  gradients as the unpatched model for the same noise. Any other call runs the model's original
  forward, with one `SlowPathWarning` per reason naming why (images that require a gradient; for
  transformers: output_hidden_states / output_attentions, attention_mask / head_mask,
  interpolate_pos_encoding, attention dropout in training, an attention function registered with its
  AttentionInterface, an argument the fast path does not know;
  official layout: a dropout module in training mode; both: float64 weights, a mask ratio that keeps
  no patch or masks none), or raises. Served fast: transformers' return_dict=False, hidden dropout in
  training (drawn from torch's generator in the original's order), gradient_checkpointing_enable() and 5.x's
  activation_checkpointing_enable(every_n_layers, offload) (maefast's blocks checkpointed where the
  original's layers are, through each layer's own checkpoint function); maefast's `seed=` (the slow
  path turns it into the equivalent noise).
- Methods of the user's that the fast path would replace are never dropped (maefast.models.routing):
  refused with a TypeError naming them, or, for forward_loss / patchify, the loss runs through the
  model's own forward_loss. A copy of the official file with another random_masking, forward_loss,
  forward_encoder / forward_decoder / forward or block class (no subclass to see) is found by probes
  on small tensors at patch time (maefast.models.probes: the whole forward on one image, through a
  float32 copy for a meta or half model). What changes after patching (methods set on the instance,
  parts replaced, adapters on layers whose weights the fast path reads) is seen on every call and
  runs the original forward. A torch.compile wrapper is refused: patch the model, then compile it.
- torch.save / torch.load(weights_only=False) and copy.deepcopy give a patched model that trains
  its own parameters (the forward is an object holding the model, not a closure).
`unpatch` undoes it.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from ._modules import defining_class, own_forward, package
from ._validate import check_bool
from .models.fast import MAEView, _official_block_view, check_fused, check_model_impl, fast_forward, official_view
from .models.hf_view import _hf_called, _hf_layers, _hf_linears, _p, _transformers_view, transformers_view
from .models.probes import forward_differs, hooks_off, loss_differs, masking_differs
from .models.routing import (OWN_DEFAULT, SlowPathWarning, _hooked, _layout_root, _plain_layer, class_overrides,
                             fast_unsupported, image_grad_reason, instance_overrides, is_own_default, official_call,
                             original_inputs, patch_conv_reason, refuse, replaced_forward, skipped_hooks_reason,
                             warn_slow)

_OFFICIAL_ATTRS = ("patch_embed.proj", "pos_embed", "cls_token", "blocks", "norm", "decoder_embed", "mask_token",
                   "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "random_masking",
                   "forward_loss")
_BLOCK_ATTRS = ("norm1", "attn.qkv", "attn.proj", "attn.num_heads", "norm2", "mlp.fc1", "mlp.act", "mlp.fc2")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has(obj, path: str) -> bool:
    try:
        _get(obj, path)
        return True
    except AttributeError:
        return False


def _missing_official(model) -> list[str]:
    miss = [a for a in _OFFICIAL_ATTRS if not _has(model, a)]
    if not miss:
        for i, blk in enumerate(list(model.blocks)[:1] + list(model.decoder_blocks)[:1]):
            miss += [f"{'blocks' if i == 0 else 'decoder_blocks'}[0].{a}" for a in _BLOCK_ATTRS if not _has(blk, a)]
        if getattr(model.patch_embed, "img_size", None) is None:  # the image size the fast path takes and probes
            miss.append("patch_embed.img_size")
    return miss


def _is_transformers_mae(model) -> bool:
    return type(model).__name__ == "ViTMAEForPreTraining" or (_has(model, "vit.embeddings.patch_embeddings")
                                                               and _has(model, "decoder.decoder_layers"))


def _is_own_model(model) -> bool:
    from .models.mae import MaskedAutoencoderViT

    return isinstance(model, MaskedAutoencoderViT)


@dataclass
class PatchState:
    """What `patch` decided, kept on the model as `model._maefast` (plain data: it pickles)."""
    impl: str
    fused: bool | str
    grad_checkpointing: bool
    loss_via_model: bool = False  # the loss runs through the model's own forward_loss
    takes_noise: bool = True      # the original forward takes noise= (facebookresearch's does not)
    # the original forward's default mask_ratio (a fork may have another). None: one that is not a Python
    # number (None then `self.mask_ratio`, a numpy float32, a sentinel): calls without a ratio run the original
    # forward without one, which applies its own
    mask_ratio: float | None = 0.75
    # the original forward takes uint8 images with mean=/std= itself (maefast.reference's model: a declined call
    # hands them as they are, as its fast path takes them; normalised fp32 images fail a bf16 model's input check)
    takes_uint8: bool = False
    # transformers: its forward calls forward_loss (4.x; 5.x computes the loss inline). Decided at patch time,
    # not per call: a lookup a compiled forward made would guard on a global
    calls_loss: bool = True


# -- official layout -------------------------------------------------------------------------------

class _OfficialForward:
    """The forward `patch` installs on an official-layout model: an object holding the model (a
    deep copy or a pickle of the model runs on its own parameters)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, imgs, mask_ratio=OWN_DEFAULT, noise=None, *, seed=None, return_pred=True, mean=None, std=None):
        m = self.model
        st = m._maefast
        if is_own_default(mask_ratio) and st.mask_ratio is not None:  # its default (0.75 in the official code)
            mask_ratio = st.mask_ratio
        # functools.partial, not forward.__get__(m): dynamo in torch 2.11 cannot trace the latter
        return official_call(m, functools.partial(type(m).forward, m), imgs, mask_ratio, noise, seed, return_pred,
                             impl=st.impl, fused=st.fused, grad_checkpointing=st.grad_checkpointing,
                             loss_via_model=st.loss_via_model, takes_noise=st.takes_noise,
                             mean=mean, std=std, takes_uint8=st.takes_uint8)


def _check_blocks(model, fused) -> None:
    """Refuses parts the fast path would silently skip (a user's block forward, layer scale, qk norm, an
    adapter on a layer whose weights it reads): `replaced_forward`, which every call checks again."""
    root = _layout_root(type(model)) or type(model)
    found = replaced_forward(model, root.__module__, fused)
    if found is not None:
        raise TypeError(f"maefast.patch: {found[0]} runs {found[1]}, which maefast's fast path would replace with "
                        f"the official computation (it knows timm's and {root.__module__}'s classes); refusing "
                        "rather than dropping it")


def _check_forward_parameters(model, params) -> None:
    """Refuses an original forward whose parameters the patched one, (imgs, mask_ratio, noise, *, seed,
    return_pred, mean, std), would not hand on: a fork's third positional parameter would be taken as
    noise, a keyword of its own would fail or be dropped (``*args``/``**kwargs`` of a wrapper pass through)."""
    named = [(n, p) for n, p in list(params.items())[2:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    extra = [n for n, _ in named if n not in ("mask_ratio", "noise", "mean", "std")]
    positional = [n for n, p in named if p.kind is not p.KEYWORD_ONLY][:2]
    if extra or positional != ["mask_ratio", "noise"][:len(positional)]:
        got = ", ".join(n for n, _ in named)
        raise TypeError(f"maefast.patch: {type(model).__name__}.forward takes (imgs, {got}); the patched forward takes "
                        "(imgs, mask_ratio, noise, *, seed, return_pred, mean, std) and would not hand "
                        f"{', '.join(extra) or 'its arguments'} on as the original takes them: run it unpatched")


def _official_state(model, impl, fused, grad_checkpointing) -> PatchState:
    ov = class_overrides(type(model), forward=True)
    inst = instance_overrides(model)
    refused, loss = ov.refused + inst.refused, ov.loss + inst.loss
    if "forward" in model.__dict__:  # set on the instance (patch's own was removed by unpatch)
        refused += ("forward",)
    if refused:
        refuse(model, refused, "maefast.patch cannot serve this model (run it unpatched)")
    _check_forward_parameters(model, inspect.signature(type(model).forward).parameters)  # (before the probes)
    _check_blocks(model, fused)
    device = model.pos_embed.device
    # probes need a real device and a generator state to replay: a meta model's run on the CPU (its methods
    # on CPU tensors; its forward on a copy with random weights)
    device = device if device.type in ("cpu", "cuda") else torch.device("cpu")
    with hooks_off(model):
        why = masking_differs(model, device)
        if why is not None:
            raise TypeError(f"maefast.patch: {type(model).__name__}.random_masking is not the official masking "
                            f"({why}); maefast's fast path draws its own mask and would drop it")
        loss = loss or (("forward_loss",) if loss_differs(model, device) else ())
        why = forward_differs(model, device, bool(loss))
    if why is not None:
        raise TypeError(f"maefast.patch: {type(model).__name__} does not compute the official MAE ({why}); "
                        "maefast's fast path would replace its forward, so run it unpatched")
    params = inspect.signature(type(model).forward).parameters
    takes_noise = "noise" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    default = params["mask_ratio"].default if "mask_ratio" in params else inspect.Parameter.empty
    if default is inspect.Parameter.empty:
        mask_ratio = 0.75  # the original needs one: the patched forward keeps the official default
    else:
        mask_ratio = default if isinstance(default, (int, float)) and not isinstance(default, bool) else None
    return PatchState(impl, fused, bool(grad_checkpointing), loss_via_model=bool(loss), takes_noise=takes_noise,
                      mask_ratio=mask_ratio, takes_uint8="mean" in params and "std" in params)


# -- transformers ------------------------------------------------------------------------------------

# what transformers' Trainer passes (the original's loss ignores it too)
_HF_IGNORED = ("num_items_in_batch", "return_dict")


def _hf_slow_reason(model, pixel_values, args, kwargs) -> str | None:
    if args:
        return f"{len(args)} positional argument(s) after noise"
    for k, v in kwargs.items():
        if k in _HF_IGNORED or k in ("output_hidden_states", "output_attentions"):
            continue
        if k == "interpolate_pos_encoding":
            if v:
                return "interpolate_pos_encoding=True"
        elif k in ("attention_mask", "head_mask"):
            if v is not None:
                return f"{k} is given"
        else:
            return f"argument {k}= (the fast path does not implement it)"
    for k in ("output_hidden_states", "output_attentions"):
        v = kwargs.get(k)
        if v if v is not None else getattr(model.config, k, False):
            return f"{k}=True (the fast path computes neither hidden states nor attention probabilities)"
    return image_grad_reason(pixel_values, "pixel_values")


class _TransformersForward:
    """The forward `patch` installs on transformers' ViTMAEForPreTraining (see the module docstring)."""

    def __init__(self, model: nn.Module):
        import transformers
        from transformers import modeling_utils
        from transformers.models.vit_mae.modeling_vit_mae import ViTMAEForPreTrainingOutput

        self.model = model
        # imported here, not in the call: dynamo in torch 2.11 cannot trace `import transformers` (a _LazyModule)
        self.output_cls = ViTMAEForPreTrainingOutput
        # the rule its forward picks return_dict's default by: 4.56+ (can_return_tuple) reads config.return_dict
        # alone, older 4.x config.use_return_dict (False under torchscript)
        self.return_dict_only = _version(transformers.__version__) >= (4, 56)
        # what each layer's config._attn_implementation names (4.48+; None before): the installed transformers'
        self.attention_functions = getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None)

    def __getstate__(self) -> dict:
        return {"model": self.model}  # the rest is the installed transformers', resolved again on loading

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"])  # also a pickle of an older maefast's forward (the model and more, or less)

    def __call__(self, pixel_values=None, noise=None, *args, seed=None, mask_ratio=None, mean=None, std=None,
                 **kwargs):
        m = self.model
        st = m._maefast
        if mask_ratio is not None and mask_ratio != m.config.mask_ratio:  # the original would drop it silently
            raise ValueError(f"mask_ratio={mask_ratio}, but this model takes its ratio from model.config.mask_ratio "
                             f"({m.config.mask_ratio}): set that instead")
        why = _hf_slow_reason(m, pixel_values, args, kwargs) or \
            fast_unsupported(m.vit.embeddings.position_embeddings, m.config.mask_ratio)
        if why is None:  # layers whose weights are read checked first: the view reads their sizes
            why = _hf_read_reason(m, st.fused)
        if why is None:
            view, attn_p = _transformers_view(m)
            if attn_p:
                why = f"attention dropout (p={attn_p}) is active in training mode"
            elif any(_hooked(x) for x in m.modules() if x is not m):  # traced under torch.compile too
                why = skipped_hooks_reason(m, _hf_called(view, st.fused))
            why = why or _hf_changed_reason(m, st, view, self.attention_functions)
        if why is not None:
            warn_slow(m, why, stacklevel=5)
            pixel_values, noise = original_inputs(pixel_values, noise, seed,
                                                  m.vit.embeddings.position_embeddings.shape[1] - 1, mean, std)
            return type(m).forward(m, pixel_values, noise, *args, **kwargs)
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        if isinstance(noise, torch.Tensor) and not noise.is_floating_point() and not noise.is_complex():
            noise = noise.double()  # integer noise (a permutation) sorts alike in float64, as the original takes it
        loss, pred, mask, ids_restore = fast_forward(view, pixel_values, m.config.mask_ratio, noise, seed=seed,
                                                     impl=st.impl, fused=st.fused,
                                                     grad_checkpointing=st.grad_checkpointing, return_pred=True,
                                                     loss_fn=m.forward_loss if st.loss_via_model else None,
                                                     mean=mean, std=std)
        out = self.output_cls(loss=loss, logits=pred, mask=mask, ids_restore=ids_restore)
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = _config_return_dict(m.config, self.return_dict_only)
        return out if return_dict else out.to_tuple()


def _version(version: str) -> tuple[int, int]:
    """(major, minor) of a version string ("4.57.6", "5.0.0.dev0" -> (4, 57), (5, 0))."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def _config_return_dict(config, return_dict_only: bool) -> bool:
    """The config's default return_dict as the original forward decides it: before 4.56 `use_return_dict`
    (False under torchscript); 4.56+ and 5.x `return_dict` alone (their can_return_tuple has no torchscript
    mode: a config's `torchscript` attribute changes nothing there)."""
    return bool(getattr(config, "return_dict", True)) if return_dict_only else bool(config.use_return_dict)


def _from_library(cls: type | None) -> bool:
    """Whether a method's defining class (`defining_class`) is transformers' or torch's (or none defines it)."""
    return cls is None or package(cls) in ("transformers", "torch")


# (class, method name) -> _from_library of that method (per class and name, once: it is asked on every call)
_KNOWN_FORWARD: dict = {}


def _library_calls_forward_loss(cls: type) -> bool:
    """Whether transformers' forward calls forward_loss (4.x; it reads patchify): 5.x's computes the loss
    inline (and calls patchify), so a subclass's forward_loss is never called."""
    return any("forward_loss" in c.__dict__ for c in cls.__mro__ if package(c) == "transformers")


def _known_forward(cls: type, name: str = "forward") -> bool:
    ok = _KNOWN_FORWARD.get((cls, name))
    if ok is None:
        ok = _KNOWN_FORWARD[(cls, name)] = _from_library(defining_class(cls, name))
    return ok


# the implementations of transformers' own that compute plain softmax attention, as the fast path does (another
# key, say a block-sparse kernel registered from the hub, computes something else even when transformers ships it)
_HF_DENSE_ATTENTION = ("sdpa", "flex_attention", "paged|eager", "flash_attention_2", "flash_attention_3",
                       "flash_attention_4")


def _hf_attention_reason(layer, functions) -> str | None:
    """Why a layer's attention computes something else than the fast path's: the implementation its config
    names (`_attn_implementation`, set at construction or by set_attn_implementation) dispatching to a function
    that is not transformers' own plain attention (one registered with AttentionInterface, or under a key not
    in `_HF_DENSE_ATTENTION`), or None. `functions`: transformers' ALL_ATTENTION_FUNCTIONS (None: a transformers
    without it, whose attention classes `_known_forward` checks)."""
    att = layer.attention
    name = getattr(getattr(getattr(att, "attention", att), "config", None), "_attn_implementation", None)
    if functions is None or not isinstance(name, str):
        return None
    key = name.removeprefix("paged|") if name != "paged|eager" else name  # as get_interface looks it up
    fn = functions.get(key)  # None: "eager", the model file's own function
    if fn is None or (key in _HF_DENSE_ATTENTION and getattr(fn, "__module__", "").split(".")[0] == "transformers"):
        return None
    return (f"its attention implementation {name!r} is {getattr(fn, '__qualname__', fn)!r}, not one of transformers' "
            "own plain attentions")


def _hf_changed_reason(model, st: PatchState, view: MAEView, attention_functions=None) -> str | None:
    """What a user changed since patching that the fast path would drop, seen on every call: a method
    set on the model or its parts' instances, a part replaced by one of a class whose forward (or the
    embeddings' random_masking) is not transformers', a layer part the fast path does not call as a module
    (`_hf_called`) of a class outside transformers and torch or with an instance forward, an attention
    implementation of the user's (`_hf_attention_reason`); the layers whose weights it reads: `_hf_read_reason`."""
    emb = model.vit.embeddings
    loss_parts = ("forward_loss", "patchify") if st.calls_loss else ("patchify",)
    owners = [("", model, () if st.loss_via_model else loss_parts), ("vit", model.vit, ("forward",)),
              ("vit.embeddings", emb, ("forward", "random_masking")),
              ("vit.embeddings.patch_embeddings", emb.patch_embeddings, ("forward",)),
              ("decoder", model.decoder, ("forward",))]
    for path, obj, names in owners:
        for name in names:
            if name in obj.__dict__:
                return f"{path + '.' if path else ''}{name} is set on the instance (the fast path would not call it)"
            if path and not _known_forward(type(obj), name):  # a part replaced by one of the user's classes
                c = defining_class(type(obj), name)
                return f"{path}.{name} is {c.__module__}.{c.__qualname__}.{name} (the fast path would not call it)"
    enc, dec_layers = _hf_layers(model)
    called = {id(c) for c in _hf_called(view, st.fused)}  # their own forwards run
    for prefix, layers in (("encoder layer", enc), ("decoder layer", dec_layers)):
        for i, layer in enumerate(layers):
            for n, sub in layer.named_modules():
                if "parametrizations" in n and "parametrizations" in n.split("."):  # computes a tensor the fast
                    # path reads (it runs then); the substring first: this loop runs on every call
                    continue
                if id(sub) not in called and (own_forward(sub) or not _known_forward(type(sub))):
                    return f"{prefix} {i}{'.' + n if n else ''} runs its own forward, which the fast path would replace"
                if type(sub) is not nn.Dropout and _p(sub, True):  # the fast path applies nn.Dropout's rates only
                    return f"{prefix} {i}.{n} is a {type(sub).__name__}(p={sub.p}) in training mode (the fast path " \
                        "applies torch's Dropout only)"
            why = _hf_attention_reason(layer, attention_functions)
            if why is not None:
                return f"{prefix} {i}: {why} (the fast path would replace it)"
    return None


def _hf_read_reason(model, fused) -> str | None:
    """Why a layer whose weights the fast path reads (the patch projection, each q/k/v; with fused="block"
    every layer Linear) is not a plain torch layer (a LoRA adapter, a wrapper) or the projection has another
    geometry; None when all are fine."""
    read = [("vit.embeddings.patch_embeddings.projection", model.vit.embeddings.patch_embeddings.projection,
             nn.Conv2d)]
    enc, dec_layers = _hf_layers(model)
    for prefix, layers in (("encoder layer", enc), ("decoder layer", dec_layers)):
        for i, layer in enumerate(layers):
            lin = _hf_linears(layer)
            lin = lin if fused == "block" else lin[:3]  # q, k, v are read always; the rest by the one op
            read += [(f"{prefix} {i} linear {j}", x, nn.Linear) for j, x in enumerate(lin)]
    for path, m, cls in read:
        if not _plain_layer(m, cls):
            return f"{path} is not a plain {cls.__name__} (the fast path reads its weights and never calls it)"
    why = patch_conv_reason(read[0][1])
    if why is not None:
        return f"{read[0][0]} is {why}"
    return None


def _hf_state(model, impl, fused, grad_checkpointing) -> PatchState:
    """Refuses a transformers model whose classes a user changed where the fast path replaces them."""
    emb = model.vit.embeddings
    enc, dec_layers = _hf_layers(model)
    # what the fast path calls as modules (their own forwards run, a LoRA adapter's too; with fused="block" the
    # layers' are read instead, which the per-call check meets with the original forward): not refused here
    called = set() if _hf_read_reason(model, fused) else {  # (a layer read that is no plain one: no view to build)
        id(m) for c in _hf_called(_transformers_view(model)[0], fused) for m in c.modules()}
    parts = [("", model, ("forward", "forward_loss", "patchify")), ("vit", model.vit, ("forward",)),
             ("vit.embeddings", emb, ("forward", "random_masking")),
             ("vit.embeddings.patch_embeddings", emb.patch_embeddings, ("forward",)),
             ("decoder", model.decoder, ("forward",))]
    for prefix, layers in (("encoder layer", enc), ("decoder layer", dec_layers)):
        for i, layer in enumerate(layers):
            for n, sub in layer.named_modules():
                _known_forward(type(sub))  # the per-call check's cache filled now: a compiled first call must
                # not guard on it half-filled; a parametrization computes a tensor the fast path reads (it runs)
                if not type(sub).__module__.startswith("torch.") and "parametrizations" not in n.split(".") \
                        and id(sub) not in called:
                    parts.append((f"{prefix} {i}{'.' + n if n else ''}", sub, ("forward",)))
    calls_loss = _library_calls_forward_loss(type(model))
    refused, loss = [], False
    for path, obj, names in parts:
        for name in names:
            if path:
                _known_forward(type(obj), name)  # filled now for the per-call check (as the layers' above)
            if name not in obj.__dict__ and _from_library(defining_class(type(obj), name)):
                continue
            if path == "" and name == "forward_loss" and not calls_loss:
                continue  # a subclass's forward_loss that 5.x's forward never calls: neither does the fast path
            if path == "" and name in ("forward_loss", "patchify") and calls_loss:
                loss = True  # the loss goes through the model's forward_loss
            else:
                refused.append(f"{path + '.' if path else ''}{name}")
    if refused:
        refuse(model, refused, "maefast.patch cannot serve this model (run it unpatched)")
    return PatchState(impl, fused, bool(grad_checkpointing), loss_via_model=loss, calls_loss=calls_loss)


# -- patch / unpatch -------------------------------------------------------------------------------

def _wrapper(model: nn.Module) -> str | None:
    """What a distributed wrapper `model` is (DDP, FSDP1, DataParallel: the model is inside it; FSDP2's
    fully_shard on it or on its blocks: their parameters are sharded DTensors), or None."""
    inner = model._modules.get("module", model._modules.get("_fsdp_wrapped_module"))
    if isinstance(inner, nn.Module) and (hasattr(model, "no_sync") or isinstance(model, nn.DataParallel)):
        return f"is a wrapper of {type(inner).__name__} (its forward calls the model it wraps)"
    fsdp2 = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in model.modules()):
        return "is sharded by FSDP2's fully_shard (its parameters are DTensors)"
    return None


def patch(model: nn.Module, impl: str = "auto", *, fused: bool | str = False, grad_checkpointing: bool = False) -> nn.Module:
    """Makes `model` run on maefast's ops, in place; returns it (same object, same parameters).

    Official-style models: forward(imgs, mask_ratio=<default>, noise=None, *, seed=None, return_pred=True)
    (mask_ratio not given: the original forward's default, 0.75 in the official code; a default the
    model decides, such as None, and an explicit None run the original forward)
    -> (loss, pred, mask). transformers' ViTMAEForPreTraining: forward(pixel_values, noise=None, ...,
    *, seed=None, mask_ratio=None, mean=None, std=None) -> ViTMAEForPreTrainingOutput(loss, logits, mask,
    ids_restore) (a tuple for return_dict=False), mask ratio from its config (a mask_ratio= that differs
    from it raises: the original forward would drop it); uint8 pixel_values are normalised with
    mean/std (None: ImageNet's), as for the official layout. maefast's own model: its impl, fused and
    grad_checkpointing are set (its forward is the fast path). Patching again replaces the settings.

    Raises TypeError listing what is missing for a model it does not recognise, naming a method of the
    user's that the fast path would drop (see the module docstring), or for a torch.compile, DDP, FSDP or
    DataParallel wrapper (or a model fully_shard has sharded): patch the model before wrapping it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fused = check_fused(fused)
    check_model_impl(impl, fused)
    check_bool("grad_checkpointing", grad_checkpointing)
    if isinstance(model._modules.get("_orig_mod"), nn.Module):  # torch.compile's OptimizedModule
        raise TypeError("maefast.patch: this is a torch.compile wrapper (its forward is the compiled one); patch the "
                        "model, then compile it: maefast.patch(model); model = torch.compile(model)")
    if _is_own_model(model):
        check_model_impl(impl, fused, grad_checkpointing, own=True, together=True)
        ov = class_overrides(type(model), forward=False)
        refused = ov.refused + instance_overrides(model).refused
        if refused:
            refuse(model, refused, "maefast.patch cannot serve this model (run it with impl='reference')")
        model.__dict__.setdefault("_maefast_unpatch", (model.impl, model.fused, model.grad_checkpointing))
        model.impl, model.fused, model.grad_checkpointing = impl, fused, bool(grad_checkpointing)
        return model
    why = _wrapper(model)
    if why is not None:  # else: "does not recognise ...; missing: <every part>", or a probe failing on DTensors
        raise TypeError(f"maefast.patch: {type(model).__name__} {why}; patch the model before wrapping or sharding "
                        "it: maefast.patch(model), then DDP(model) / fully_shard(model)")
    unpatch(model)  # patching again starts from the model's own forward
    if _is_transformers_mae(model):
        if getattr(model.config, "hidden_act", "gelu") not in ("gelu",):
            fused = False  # only the exact GELU is fused; other activations run as they are
        state, fwd = _hf_state(model, impl, fused, grad_checkpointing), _TransformersForward(model)
    else:
        missing = _missing_official(model)
        if missing:
            raise TypeError(f"maefast.patch does not recognise {type(model).__name__}: neither transformers' "
                            f"ViTMAEForPreTraining nor the official MAE layout; missing: {', '.join(missing)}")
        state, fwd = _official_state(model, impl, fused, grad_checkpointing), _OfficialForward(model)
    model._maefast = state
    model.forward = fwd
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undoes `patch` (the class's own forward runs again; maefast's own model gets back the impl,
    fused and grad_checkpointing it had before the first patch)."""
    if isinstance(model.__dict__.get("forward"), (_OfficialForward, _TransformersForward)):
        del model.__dict__["forward"]
    model.__dict__.pop("_maefast", None)
    saved = model.__dict__.pop("_maefast_unpatch", None)
    if saved is not None:
        model.impl, model.fused, model.grad_checkpointing = saved
    return model


__all__ = ["patch", "unpatch", "official_view", "transformers_view", "_official_block_view", "SlowPathWarning",
           "PatchState"]
