"""What maefast knows about module classes and hooks: which forwards the fast paths may compute in a
module's place (`trusted_class`, `is_layer_norm`) and whether a module has hooks a skipped call would
not fire (`hooked`). Shared by the drop-in modules (maefast.nn) and the model routing (maefast.models)."""
from __future__ import annotations

import torch.nn as nn

from ._validate import compiling

# packages whose module classes maefast knows (a forward defined elsewhere may compute anything)
KNOWN_PACKAGES = ("maefast", "torch")
# timm's classes whose forwards the fast path computes (the official model's Block, Attention, Mlp,
# PatchEmbed, and the layers they hold), by module and name: timm's other blocks (post-norm, LayerScale,
# relative position bias, ...) compute something else and are not trusted by their package alone
TIMM_CLASSES = {"timm.models.vision_transformer": ("Block", "Attention", "Mlp", "PatchEmbed"),
                "timm.models.layers": ("Mlp", "PatchEmbed", "DropPath", "LayerNorm", "GELU"),
                "timm.layers": ("Attention", "Mlp", "PatchEmbed", "DropPath", "LayerNorm", "GELU")}
_TRUST: dict = {}


def package(cls: type) -> str:
    """The top-level package that defines `cls` ("transformers" for transformers.models.vit_mae's classes)."""
    return cls.__module__.split(".")[0]


def defining_class(cls: type, name: str) -> type | None:
    """The class in `cls`'s MRO whose body defines `name` (None: none does)."""
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def own_forward(m: nn.Module) -> bool:
    """Whether `m` has a forward set on its instance that may compute something else than its class's. Not
    its class's own method bound to `m`: transformers 4.56-4.57's output capturing (output_hidden_states /
    output_attentions) puts each captured layer's `layer.forward` back on the instance when the call ends."""
    f = m.__dict__.get("forward")
    return f is not None and not (getattr(f, "__self__", None) is m
                                  and getattr(f, "__func__", None) is getattr(type(m), "forward", None))


def trusted_class(cls: type, root_module: str = "") -> bool:
    """Whether the forward `cls` runs is one maefast knows: defined in maefast or torch, one of timm's
    `TIMM_CLASSES`, or in `root_module` (the module of the model's official-layout class: its Block
    copy). Cached per class, except while dynamo traces: a cache filled by the first trace would fail
    that trace's guards at the next call (a recompile of a model compiled before any eager call)."""
    key = (cls, root_module)
    ok = None if compiling() else _TRUST.get(key)
    if ok is None:
        c = defining_class(cls, "forward")
        ok = (c is None or package(c) in KNOWN_PACKAGES or c.__module__ == root_module
              or _timm_class(c))
        if not compiling():
            _TRUST[key] = ok
    return ok


def _timm_class(c: type) -> bool:
    """Whether c is one of `TIMM_CLASSES` (timm.layers' submodules included: timm.layers.mlp.Mlp)."""
    mod = c.__module__
    return any(c.__qualname__ in names
               and (mod == m or (m != "timm.models.vision_transformer" and mod.startswith(m + ".")))
               for m, names in TIMM_CLASSES.items())


def plain_layer(m: nn.Module, cls: type) -> bool:
    """Whether a layer whose weight and bias a fast path reads computes cls's forward on them alone: a
    torch ``cls`` (a parametrized one reads its weight through the parametrization), no instance forward,
    no child modules (a LoRA adapter's would be skipped)."""
    return (isinstance(m, cls) and trusted_class(type(m)) and "forward" not in m.__dict__
            and all(name == "parametrizations" for name, _ in m.named_children()))


def is_layer_norm(n) -> bool:
    """A torch LayerNorm, or a subclass whose forward maefast knows (timm's LayerNorm computes the same):
    what `ops.vit_block` computes as its norms. Another norm with a weight, bias and eps does not."""
    return isinstance(n, nn.LayerNorm) and trusted_class(type(n))


def vit_block_computes(norms, exact_gelu: bool, proj: nn.Module, fc1: nn.Module, fc2: nn.Module) -> bool:
    """Whether `ops.vit_block` computes a pre-norm block with these parts exactly (dropout and the parts'
    classes checked by the caller): affine LayerNorms (`is_layer_norm`), torch's exact GELU, biases on
    the attention projection and both MLP layers, an attention as wide as the block (heads x head dim =
    width; a config may differ)."""
    return (exact_gelu and None not in (proj.bias, fc1.bias, fc2.bias) and proj.in_features == proj.out_features
            and all(is_layer_norm(n) and n.weight is not None and n.bias is not None for n in norms))


# hooks that act only in calls the fast path never serves: transformers 5.x installs its output-capturing
# hooks for good at the first output_hidden_states / output_attentions call (that call runs the original)
_INERT_HOOK_MODULES = ("transformers.utils.output_capturing",)


def hooked(m: nn.Module) -> bool:
    """Whether `m` has forward or backward hooks (a gradient monitor's full backward hook never fires on
    a module the fast path does not call either)."""
    for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks):
        # (an empty dict is the common case: asked of every module on every patched call)
        if hooks and any(getattr(h, "__module__", None) not in _INERT_HOOK_MODULES for h in hooks.values()):
            return True
    return False
