"""`maefast.patch(model)`: run an existing MAE on maefast's ops, in place, sharing its parameters.

Recognises (duck-typed, nothing of theirs is imported):
- the official facebookresearch/mae `MaskedAutoencoderViT` layout (patch_embed.proj, blocks[i].attn.qkv,
  random_masking, forward_loss, decoder_* ...), maefast's own model included;
- transformers' `ViTMAEForPreTraining` (4.x and 5.x module names; separate q/k/v projections, whose
  weights are concatenated on the fly so their gradients reach the original parameters).
After patching, loss and gradients equal the unpatched model's for the same noise; `unpatch` undoes it.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from .models.fast import BlockView, MAEView, _official_block_view, fast_forward, official_view
from .ops._backend import IMPLS

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
    return miss


def _is_transformers_mae(model) -> bool:
    return type(model).__name__ == "ViTMAEForPreTraining" or (_has(model, "vit.embeddings.patch_embeddings")
                                                               and _has(model, "decoder.decoder_layers"))


# -- transformers ---------------------------------------------------------------------------------

def _hf_block_view(layer, num_heads: int) -> BlockView:
    att = layer.attention
    if hasattr(att, "q_proj"):  # transformers 5.x
        q, k, v, o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
        fc1, fc2, act = layer.mlp.fc1, layer.mlp.fc2, layer.mlp.activation_fn
    else:  # 4.x
        q, k, v, o = att.attention.query, att.attention.key, att.attention.value, att.output.dense
        fc1, fc2, act = layer.intermediate.dense, layer.output.dense, layer.intermediate.intermediate_act_fn
    if not isinstance(act, nn.Module):
        act = _Fn(act)

    def qkv():
        w = torch.cat([q.weight, k.weight, v.weight], 0)
        b = torch.cat([q.bias, k.bias, v.bias], 0) if q.bias is not None else None
        return w, b

    head_dim = q.out_features // num_heads
    return BlockView(norm1=layer.layernorm_before, qkv=qkv, num_heads=num_heads, scale=head_dim ** -0.5, proj=o,
                     norm2=layer.layernorm_after, fc1=fc1, act=act, fc2=fc2)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def transformers_view(model) -> MAEView:
    c = model.config
    emb = model.vit.embeddings
    layers = model.vit.layers if hasattr(model.vit, "layers") else model.vit.encoder.layer
    dec = model.decoder
    img = c.image_size if isinstance(c.image_size, (tuple, list)) else (c.image_size, c.image_size)
    return MAEView(patch_proj=emb.patch_embeddings.projection, pos_embed=emb.position_embeddings,
                   cls_token=emb.cls_token, blocks=[_hf_block_view(l, c.num_attention_heads) for l in layers],
                   norm=model.vit.layernorm, decoder_embed=dec.decoder_embed, mask_token=dec.mask_token,
                   decoder_pos_embed=dec.decoder_pos_embed,
                   decoder_blocks=[_hf_block_view(l, c.decoder_num_attention_heads) for l in dec.decoder_layers],
                   decoder_norm=dec.decoder_norm, decoder_pred=dec.decoder_pred, norm_pix_loss=bool(c.norm_pix_loss),
                   in_chans=c.num_channels, img_size=tuple(img))


def _hf_forward(self, pixel_values=None, noise=None, interpolate_pos_encoding=False, **kwargs):
    if pixel_values is None:
        raise ValueError("pixel_values must be given")
    if interpolate_pos_encoding:
        raise ValueError("interpolate_pos_encoding is not supported by maefast's patched forward (call "
                         "maefast.unpatch(model) for it)")
    st = self._maefast
    loss, pred, mask, ids_restore = fast_forward(transformers_view(self), pixel_values, self.config.mask_ratio, noise,
                                                 seed=kwargs.pop("seed", None), impl=st["impl"], fused=st["fused"],
                                                 grad_checkpointing=st["grad_checkpointing"], return_pred=True)
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEForPreTrainingOutput

    return ViTMAEForPreTrainingOutput(loss=loss, logits=pred, mask=mask, ids_restore=ids_restore)


# -- official -------------------------------------------------------------------------------------

def _official_forward(self, imgs, mask_ratio=0.75, noise=None, *, seed=None, return_pred=True):
    st = self._maefast
    loss, pred, mask, _ = fast_forward(official_view(self), imgs, mask_ratio, noise, seed=seed, impl=st["impl"],
                                       fused=st["fused"], grad_checkpointing=st["grad_checkpointing"],
                                       return_pred=return_pred)
    return loss, pred, mask


def patch(model: nn.Module, impl: str = "auto", *, fused: bool | str = False, grad_checkpointing: bool = False) -> nn.Module:
    """Makes `model` run on maefast's ops, in place; returns it (same object, same parameters).

    Official-style models: forward(imgs, mask_ratio=0.75, noise=None, *, seed=None, return_pred=True)
    -> (loss, pred, mask). transformers' ViTMAEForPreTraining: forward(pixel_values, noise=None)
    -> ViTMAEForPreTrainingOutput(loss, logits, mask, ids_restore), mask ratio from its config.
    Raises TypeError listing what is missing for a model it does not recognise.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .models.fast import check_fused

    fused = check_fused(fused)
    if _is_transformers_mae(model):
        fwd = _hf_forward
        if getattr(model.config, "hidden_act", "gelu") not in ("gelu",):
            fused = False  # only the exact GELU is fused; other activations run as they are
    else:
        missing = _missing_official(model)
        if missing:
            raise TypeError(f"maefast.patch does not recognise {type(model).__name__}: neither transformers' "
                            f"ViTMAEForPreTraining nor the official MAE layout; missing: {', '.join(missing)}")
        fwd = _official_forward
    model._maefast = {"impl": impl, "fused": fused, "grad_checkpointing": bool(grad_checkpointing)}
    model.forward = types.MethodType(fwd, model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undoes `patch` (the class's own forward runs again)."""
    if "forward" in model.__dict__:
        del model.__dict__["forward"]
    model.__dict__.pop("_maefast", None)
    return model


__all__ = ["patch", "unpatch", "official_view", "transformers_view", "_official_block_view"]
