"""Checkpoints: official-format state dicts (full or the released encoder-only files) and
conversion to and from transformers' `ViTMAEForPreTraining` (q/k/v split, key names of 4.x and 5.x).

Missing or unexpected keys are reported by name; a shape mismatch is a clear ValueError.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Iterable, Mapping

import torch

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")

# transformers names of the pieces inside one layer: (official suffix) -> candidates (5.x first, then 4.x)
_LAYER_NAMES = {
    "norm1": ("layernorm_before",),
    "norm2": ("layernorm_after",),
    "attn.proj": ("attention.o_proj", "attention.output.dense"),
    "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
    "mlp.fc2": ("mlp.fc2", "output.dense"),
}
_QKV_NAMES = (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
              ("attention.attention.query", "attention.attention.key", "attention.attention.value"))
_ENC_LAYER = ("vit.layers.{i}.", "vit.encoder.layer.{i}.")
_DEC_LAYER = ("decoder.decoder_layers.{i}.",)
_TOP = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}


# what wrappers put before every key of a state dict saved through them: DDP, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state_dict: Mapping) -> dict:
    """``state_dict`` without the prefix a DDP or torch.compile wrapper put before every key (repeatedly:
    a compiled DDP model's keys start with both)."""
    sd = dict(state_dict)
    while sd:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def unwrap_checkpoint(obj) -> dict:
    """Accepts a state dict or a checkpoint holding one under 'model' / 'state_dict' (keys saved through
    a DDP or torch.compile wrapper lose its prefix)."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], Mapping):
                return strip_wrapper_prefixes(obj[key])
        if isinstance(obj.get("shards"), str):  # `maefast train --fsdp`'s file read with torch.load: no weights
            raise ValueError(f"a sharded maefast train checkpoint (--fsdp): its weights are in the folder "
                             f"{obj['shards']!r} beside the file; read it with "
                             "maefast.train.checkpoint.load_checkpoint(path), which gathers them")
        return strip_wrapper_prefixes(obj)
    raise TypeError(f"checkpoint must be a state dict (a mapping), got {type(obj).__name__}")


def is_encoder_only(state_dict: Mapping) -> bool:
    return not any(k.startswith(DECODER_PREFIXES) for k in state_dict)


def load_official_state_dict(model: torch.nn.Module, checkpoint, strict: bool = True) -> dict:
    """Loads an official-format checkpoint (full, or the released encoder-only `mae_pretrain_vit_*.pth`) into
    `model` (or the model a DDP, DataParallel or torch.compile wrapper `model` holds; one sharded by FSDP2's
    fully_shard takes its shards, on every rank).

    Returns {"missing": [...], "unexpected": [...], "encoder_only": bool}. With strict=True, any
    missing (beyond the decoder, for an encoder-only file) or unexpected key raises ValueError naming them.
    """
    sd = unwrap_checkpoint(checkpoint)
    full = model.state_dict()
    own = strip_wrapper_prefixes(full)  # a DDP / DataParallel / torch.compile wrapper's model: its keys' prefix
    first = next(iter(full), "")
    prefix = first[:len(first) - len(next(iter(own), ""))]  # the wrapper's, put back on the keys loaded
    encoder_only = is_encoder_only(sd)
    for k, v in sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"shape mismatch for '{k}': checkpoint has {tuple(v.shape)}, model has {tuple(own[k].shape)}")
    unexpected = sorted(k for k in sd if k not in own)
    missing = sorted(k for k in own if k not in sd)
    if encoder_only:
        missing = [k for k in missing if not k.startswith(DECODER_PREFIXES)]
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match the model: missing keys {missing}, unexpected keys {unexpected}")
    fsdp2 = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in model.modules()):
        # sharded by fully_shard (DTensor parameters): torch's loader gives each rank its shards of the full tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, {k: v for k, v in sd.items() if k in own},
                             options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict({prefix + k: v for k, v in sd.items() if k in own}, strict=False)
    return {"missing": missing, "unexpected": unexpected, "encoder_only": encoder_only}


def encoder_state_dict(state_dict: Mapping) -> dict:
    """The encoder part of an official state dict (the release format's keys)."""
    return {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIXES)}


def _pick(keys: set, candidates: Iterable[str], fmt: dict | None = None) -> str:
    cands = [c.format(**(fmt or {})) for c in candidates]
    for c in cands:
        if any(k.startswith(c) for k in keys):
            return c
    return cands[0]


def _layer_count(keys: Iterable[str], pattern: str) -> int:
    rx = re.compile(pattern)
    idx = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(idx) + 1 if idx else 0


class _Reader:
    """Reads a source state dict key by key: a missing key is a ValueError naming it (not a bare KeyError),
    and `check_all_read` refuses keys the conversion has no place for (they were silently dropped)."""

    def __init__(self, sd: Mapping, what: str):
        self.sd, self.what, self.read = sd, what, set()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise ValueError(f"{self.what}: the state dict has no {key!r} (another model, or a partial file?)")
        self.read.add(key)
        return self.sd[key]

    def check_all_read(self) -> None:
        left = sorted(set(self.sd) - self.read)
        if left:
            raise ValueError(f"{self.what}: {len(left)} key(s) with no counterpart, e.g. {left[:5]} (drop them "
                             "first if they are not the MAE's)")


def to_transformers(state_dict: Mapping, target_keys: Iterable[str] | None = None) -> dict:
    """Official MAE state dict -> transformers ViTMAEForPreTraining state dict.

    `target_keys` (the HF model's state_dict keys) selects its naming (4.x `encoder.layer.N.attention.
    attention.query`, or 5.x `layers.N.attention.q_proj`); default: the newest naming. A layer key that is
    missing, or a key with no transformers counterpart, raises ValueError naming it; the top-level tensors
    (e.g. the decoder's, for an encoder-only file) are converted where present.
    """
    sd = unwrap_checkpoint(state_dict)
    if not any(k in sd for k in _TOP):
        raise ValueError(f"not an official MAE state dict: none of its keys (e.g. {sorted(_TOP)[:3]}) is here; "
                         f"got keys like {sorted(sd)[:3]}")
    tk = set(target_keys) if target_keys is not None else {"vit.layers.0.attention.q_proj.weight"}
    src_sd, sd = sd, _Reader(sd, "to_transformers")
    out = {}
    for k, hk in _TOP.items():
        if k in src_sd:
            out[hk] = sd[k]
    for which, layer_fmts in (("blocks", _ENC_LAYER), ("decoder_blocks", _DEC_LAYER)):
        n = _layer_count(src_sd, rf"{which}\.(\d+)\.")
        for i in range(n):
            src = f"{which}.{i}."
            dst = _pick(tk, layer_fmts, {"i": i})
            qkv_names = _QKV_NAMES[0] if any(k.startswith(dst + _QKV_NAMES[0][0]) for k in tk) or target_keys is None \
                else _QKV_NAMES[1]
            for ours, cands in _LAYER_NAMES.items():
                theirs = _pick({k[len(dst):] for k in tk if k.startswith(dst)}, cands) if target_keys is not None else cands[0]
                for p in ("weight", "bias"):
                    out[f"{dst}{theirs}.{p}"] = sd[f"{src}{ours}.{p}"]
            for p in ("weight", "bias"):
                for name, chunk in zip(qkv_names, sd[f"{src}attn.qkv.{p}"].chunk(3, dim=0)):
                    out[f"{dst}{name}.{p}"] = chunk.clone()
    sd.check_all_read()
    return out


def from_transformers(hf_state_dict: Mapping) -> dict:
    """transformers ViTMAEForPreTraining state dict (4.x or 5.x names) -> official MAE state dict. A layer
    key that is missing, q/k/v of unequal shapes, or a key with no official counterpart raise ValueError."""
    hf_state_dict = unwrap_checkpoint(hf_state_dict)  # as to_transformers: under 'model', a wrapper's prefix
    keys = set(hf_state_dict)
    hf = _Reader(hf_state_dict, "from_transformers")
    inv_top = {v: k for k, v in _TOP.items()}
    out = {inv_top[k]: hf[k] for k in keys if k in inv_top}
    for which, layer_fmts in (("blocks", _ENC_LAYER), ("decoder_blocks", _DEC_LAYER)):
        fmt = _pick(keys, [f.replace("{i}", "0") for f in layer_fmts])
        base = [f for f in layer_fmts if f.replace("{i}", "0") == fmt][0]
        n = _layer_count(keys, re.escape(base).replace(re.escape("{i}"), r"(\d+)"))
        for i in range(n):
            src = base.format(i=i)
            inner = {k[len(src):] for k in keys if k.startswith(src)}
            for ours, cands in _LAYER_NAMES.items():
                theirs = _pick(inner, cands)
                for p in ("weight", "bias"):
                    out[f"{which}.{i}.{ours}.{p}"] = hf[f"{src}{theirs}.{p}"]
            qkv = _QKV_NAMES[0] if any(k.startswith(_QKV_NAMES[0][0]) for k in inner) else _QKV_NAMES[1]
            for p in ("weight", "bias"):
                parts = [hf[f"{src}{n_}.{p}"] for n_ in qkv]
                if len({tuple(t.shape) for t in parts}) != 1:
                    raise ValueError(f"from_transformers: {src}{{{','.join(qkv)}}}.{p} have unequal shapes "
                                     f"{[tuple(t.shape) for t in parts]}")
                out[f"{which}.{i}.attn.qkv.{p}"] = torch.cat(parts, dim=0)
    if not out:
        raise ValueError("not a transformers ViTMAEForPreTraining state dict: none of its keys (e.g. "
                         f"{sorted(_TOP.values())[:3]}) is here; got keys like {sorted(keys)[:3]}")
    hf.check_all_read()
    return out


def _computed_state_dict(module: torch.nn.Module) -> dict:
    """``module.state_dict()`` with each parametrized tensor (torch.nn.utils.parametrize: weight norm, a pruning
    mask, ...) as the tensor the module computes with, under its plain name (``fc1.weight``, not
    ``fc1.parametrizations.weight.original0``)."""
    from torch.nn.utils import parametrize

    sd = module.state_dict()
    for name, m in module.named_modules():
        if parametrize.is_parametrized(m):
            pre = f"{name}." if name else ""
            for t in m.parametrizations:
                for k in [k for k in sd if k.startswith(f"{pre}parametrizations.{t}.")]:
                    del sd[k]
                with torch.no_grad():
                    sd[pre + t] = getattr(m, t).detach()
    return sd


def _inexpressible(model, overrides) -> str | None:
    """A part of `model` that transformers' ViTMAE config cannot express, so a converted model would silently
    compute something else, or None. The config has one activation (written as hidden_act="gelu": the exact
    GELU), one LayerNorm eps, q.k scaled by head_dim ** -0.5, and dropout in other places than timm's blocks
    (so none is taken). hidden_act or layer_norm_eps given in `overrides` is the caller's choice and not checked;
    a dropout or drop path is refused whatever the overrides (set its rate to 0 to convert the weights anyway)."""
    from .models.routing import _drop_rate  # a dropout's p or a drop path's drop_prob
    eps, dn = model.norm.eps, model.decoder_norm
    if "layer_norm_eps" not in overrides and isinstance(dn, torch.nn.LayerNorm) and dn.eps != eps:
        return f"decoder_norm.eps is {dn.eps:g}, norm.eps {eps:g} (the config has one layer_norm_eps)"
    for name in ("blocks", "decoder_blocks"):
        for i, blk in enumerate(getattr(model, name)):
            act = blk.mlp.act
            if "hidden_act" not in overrides and not (type(act) is torch.nn.GELU and act.approximate == "none"):
                return f"{name}.{i}.mlp.act is {act!r}, not the exact GELU the config's hidden_act='gelu' names"
            scale, head_dim = getattr(blk.attn, "scale", None), blk.attn.qkv.out_features // 3 // blk.attn.num_heads
            if scale is not None and not math.isclose(float(scale), head_dim ** -0.5, rel_tol=1e-6):
                return f"{name}.{i}.attn.scale is {float(scale):g}, not head_dim ** -0.5 = {head_dim ** -0.5:g}"
            for sub, m in blk.named_modules():
                if isinstance(m, torch.nn.LayerNorm) and "layer_norm_eps" not in overrides and m.eps != eps:
                    return f"{name}.{i}.{sub}.eps is {m.eps:g}, norm.eps {eps:g} (the config has one layer_norm_eps)"
                if _drop_rate(m):
                    return (f"{name}.{i}.{sub} is a {type(m).__name__} (rate {_drop_rate(m):g}; the config's dropout "
                            "sits elsewhere, and it has no drop path: set the rate to 0 to convert the weights anyway)")
    return None


def transformers_config(model, **overrides):
    """A transformers ViTMAEConfig equal to `model`'s architecture (square images only; a block part the config
    cannot express, such as another activation, is a ValueError naming it)."""
    from transformers import ViTMAEConfig

    pe = model.patch_embed
    if pe.img_size[0] != pe.img_size[1]:
        raise ValueError(f"transformers' ViTMAE supports square images only; the model has img_size {pe.img_size}")
    why = _inexpressible(model, overrides)
    if why is not None:
        raise ValueError(f"transformers' ViTMAE config cannot express this model: {why}")
    blk = model.blocks[0] if len(model.blocks) else None
    dblk = model.decoder_blocks[0] if len(model.decoder_blocks) else None
    embed = model.pos_embed.shape[-1]
    dec = model.decoder_pos_embed.shape[-1]
    kw = dict(hidden_size=embed, num_hidden_layers=len(model.blocks),
              num_attention_heads=blk.attn.num_heads if blk is not None else 16,
              intermediate_size=blk.mlp.fc1.out_features if blk is not None else 4 * embed, hidden_act="gelu",
              layer_norm_eps=model.norm.eps,
              image_size=pe.img_size[0], patch_size=pe.patch_size[0], num_channels=pe.proj.in_channels, qkv_bias=True,
              decoder_hidden_size=dec, decoder_num_hidden_layers=len(model.decoder_blocks),
              decoder_num_attention_heads=dblk.attn.num_heads if dblk is not None else 16,
              decoder_intermediate_size=dblk.mlp.fc1.out_features if dblk is not None else 4 * dec,
              norm_pix_loss=bool(getattr(model, "norm_pix_loss", False)),
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kw.update(overrides)
    return ViTMAEConfig(**kw)


def to_transformers_model(model, mask_ratio: float = 0.75):
    """Builds transformers' ViTMAEForPreTraining holding `model`'s weights; `mask_ratio` becomes its
    config.mask_ratio (transformers' model masks by its config, maefast's by its forward's argument)."""
    from transformers import ViTMAEForPreTraining

    from ._validate import check_mask_ratio

    check_mask_ratio(mask_ratio, official=True)  # transformers takes any number (1.5 silently masked half the patches)
    hf = ViTMAEForPreTraining(transformers_config(model, mask_ratio=mask_ratio))
    target = hf.state_dict()
    sd = to_transformers(_computed_state_dict(model), target.keys())
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    if missing or unexpected:
        raise ValueError(f"conversion to transformers failed: missing {missing}, unexpected {unexpected}")
    for k, v in sd.items():
        if tuple(target[k].shape) != tuple(v.shape):
            raise ValueError(f"shape mismatch for '{k}': {tuple(v.shape)} vs transformers' {tuple(target[k].shape)}")
    hf.load_state_dict(sd, strict=True)
    return hf


def from_transformers_model(hf_model, **model_kwargs):
    """Builds maefast's MaskedAutoencoderViT from transformers' ViTMAEForPreTraining (weights copied).

    The config's mask_ratio is not part of maefast's model, which takes it per call (as the official MAE):
    pass ``mask_ratio=hf_model.config.mask_ratio`` to its forward or to TrainStep (their default is 0.75)."""
    from .models import MaskedAutoencoderViT
    from .models.configs import mlp_ratio_of

    c = hf_model.config
    # what maefast's model computes: the exact GELU, biased q/k/v (the released MAE configs)
    if getattr(c, "hidden_act", "gelu") != "gelu" or not getattr(c, "qkv_bias", True):
        raise ValueError(f"maefast's MAE has the exact GELU and q/k/v biases; this config has hidden_act="
                         f"{getattr(c, 'hidden_act', None)!r}, qkv_bias={getattr(c, 'qkv_bias', None)!r} "
                         "(maefast.patch runs such a model as it is)")
    drops = {k: getattr(c, k, 0.0) or 0.0 for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
    if any(drops.values()):  # the official MAE pre-trains without dropout, and maefast's MAE has none
        have = ", ".join(f"{k}={v}" for k, v in drops.items())
        raise ValueError(f"maefast's MAE has no dropout; this config has {have} (maefast.patch runs such a model "
                         "as it is; set them to 0 in hf_model.config to convert the weights anyway)")
    # maefast's MAE builds every MLP as int(width * mlp_ratio), one ratio for encoder and decoder
    ratio = mlp_ratio_of(c.hidden_size, c.intermediate_size)
    dec_inter = getattr(c, "decoder_intermediate_size", None) or c.intermediate_size
    if int(c.hidden_size * ratio) != c.intermediate_size or int(c.decoder_hidden_size * ratio) != dec_inter:
        raise ValueError(f"maefast's MAE has one MLP ratio for encoder and decoder (hidden = int(width * ratio)); "
                         f"this config has intermediate_size {c.intermediate_size} for hidden_size {c.hidden_size} "
                         f"and decoder_intermediate_size {dec_inter} for decoder_hidden_size "
                         f"{c.decoder_hidden_size} (maefast.patch runs such a model as it is)")
    img = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
    patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
    kw = dict(img_size=img, patch_size=patch, in_chans=c.num_channels, embed_dim=c.hidden_size,
              depth=c.num_hidden_layers, num_heads=c.num_attention_heads, decoder_embed_dim=c.decoder_hidden_size,
              decoder_depth=c.decoder_num_hidden_layers, decoder_num_heads=c.decoder_num_attention_heads,
              mlp_ratio=ratio, norm_pix_loss=bool(c.norm_pix_loss),
              norm_layer=functools.partial(torch.nn.LayerNorm, eps=c.layer_norm_eps))
    kw.update(model_kwargs)
    model = MaskedAutoencoderViT(**kw)
    load_official_state_dict(model, from_transformers(_computed_state_dict(hf_model)), strict=True)
    return model
