"""transformers' ViTMAEForPreTraining (4.x and 5.x module names) seen as a `MAEView`: the layers whose
weights maefast's fast path reads, the ones it calls, and the dropout and checkpointing settings in effect
(`maefast.patch`'s transformers route; duck-typed, nothing of transformers is imported)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .fast import BlockView, MAEView


def _hf_attention_dropout(att) -> float:
    inner = getattr(att, "attention", att)  # 4.x: ViTMAEAttention.attention is the self-attention
    p = getattr(inner, "attention_dropout", None)  # 5.x
    if p is None:
        p = getattr(inner, "dropout_prob", None)  # 4.4x-4.5x
    if p is None:
        d = getattr(inner, "dropout", None)  # older 4.x: a Dropout on the probabilities
        p = d.p if isinstance(d, nn.Dropout) else 0.0
    return float(p) if inner.training else 0.0


def _p(d, any_kind: bool = False) -> float:
    """An nn.Dropout's rate in training (any_kind: any torch dropout's, AlphaDropout, Dropout1d, ...), else 0."""
    kind = nn.modules.dropout._DropoutNd if any_kind else nn.Dropout
    return float(d.p) if isinstance(d, kind) and d.training else 0.0


def _hf_linears(layer) -> tuple:
    """(q, k, v, o, fc1, fc2) of one ViTMAELayer (transformers 5.x or 4.x names)."""
    att = layer.attention
    if hasattr(att, "q_proj"):  # transformers 5.x
        return att.q_proj, att.k_proj, att.v_proj, att.o_proj, layer.mlp.fc1, layer.mlp.fc2
    return (att.attention.query, att.attention.key, att.attention.value, att.output.dense, layer.intermediate.dense,
            layer.output.dense)


def _hf_block_view(layer, num_heads: int, stack_checkpointing: bool) -> tuple[BlockView, float]:
    """(view of one ViTMAELayer, its attention dropout in effect). num_heads: the config's, for a layer that
    keeps no head size of its own (a config changed after building does not change the layer's)."""
    att = layer.attention
    q, k, v, o, fc1, fc2 = _hf_linears(layer)
    if hasattr(att, "q_proj"):  # transformers 5.x
        act = layer.mlp.activation_fn
        drop_attn = drop_mlp = _p(layer.dropout)
    else:  # 4.x
        act = layer.intermediate.intermediate_act_fn
        drop_attn, drop_mlp = _p(att.output.dropout), _p(layer.output.dropout)
    if not isinstance(act, nn.Module):
        act = _Fn(act)

    def qkv():
        w = torch.cat([q.weight, k.weight, v.weight], 0)
        have = [x.bias for x in (q, k, v) if x.bias is not None]
        if not have:
            return w, None
        # one of them without a bias (a user's k_proj, say): zeros there, as that projection adds none
        b = torch.cat([x.bias if x.bias is not None else have[0].new_zeros(x.out_features) for x in (q, k, v)], 0)
        return w, b

    # a layer with its own flag (transformers' GradientCheckpointingLayer, late 4.x and 5.x) obeys it
    # alone: 5.x's activation_checkpointing_enable(every_n_layers=n) sets every n-th; older layers
    # follow their stack's flag. Checkpointing goes through the layer's own function when it has one
    # (offload=True wraps it in save_on_cpu; the user's checkpoint kwargs ride along, except
    # use_reentrant and preserve_rng_state, which maefast's blocks set: fast.py's _run_blocks).
    ckpt = getattr(layer, "gradient_checkpointing", stack_checkpointing) and layer.training
    ckpt_fn = getattr(layer, "_gradient_checkpointing_func", None) if ckpt else None
    # the head size the layer splits q/k/v by (5.x head_dim, 4.x attention_head_size; the config's when built)
    inner = getattr(att, "attention", att)
    head_dim = getattr(inner, "head_dim", None) or getattr(inner, "attention_head_size", None) or \
        q.out_features // num_heads
    num_heads = q.out_features // head_dim
    # 5.x (and late 4.x, on the self-attention) keep the scale they multiply by (a user may set it); older 4.x
    # divides by sqrt(head_dim)
    scale = float(getattr(att, "scaling", getattr(inner, "scaling", head_dim ** -0.5)))
    return BlockView(norm1=layer.layernorm_before, qkv=qkv, num_heads=num_heads, scale=scale, proj=o,
                     norm2=layer.layernorm_after, fc1=fc1, act=act, fc2=fc2, drop_attn=drop_attn, drop_mlp=drop_mlp,
                     checkpoint=bool(ckpt), checkpoint_fn=ckpt_fn), _hf_attention_dropout(att)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _hf_layers(model):
    enc = model.vit.layers if hasattr(model.vit, "layers") else model.vit.encoder.layer
    return enc, model.decoder.decoder_layers


def transformers_view(model) -> MAEView:
    """View of transformers' ViTMAEForPreTraining (dropout and checkpointing flags as its modules say now)."""
    return _transformers_view(model)[0]


def _transformers_view(model) -> tuple[MAEView, float]:
    c = model.config
    emb = model.vit.embeddings
    enc, dec_layers = _hf_layers(model)
    enc_ckpt = bool(getattr(getattr(model.vit, "encoder", None), "gradient_checkpointing", False))  # older 4.x
    dec_ckpt = bool(getattr(model.decoder, "gradient_checkpointing", False))
    blocks = [_hf_block_view(l, c.num_attention_heads, enc_ckpt) for l in enc]
    dblocks = [_hf_block_view(l, c.decoder_num_attention_heads, dec_ckpt) for l in dec_layers]
    dec = model.decoder
    # the size the original checks images against: its patch embedding's (set from the config when built)
    img = getattr(emb.patch_embeddings, "image_size", c.image_size)
    img = img if isinstance(img, (tuple, list)) else (img, img)
    view = MAEView(patch_proj=emb.patch_embeddings.projection, pos_embed=emb.position_embeddings,
                   cls_token=emb.cls_token, blocks=[b for b, _ in blocks], norm=model.vit.layernorm,
                   decoder_embed=dec.decoder_embed, mask_token=dec.mask_token, decoder_pos_embed=dec.decoder_pos_embed,
                   decoder_blocks=[b for b, _ in dblocks], decoder_norm=dec.decoder_norm,
                   decoder_pred=dec.decoder_pred, norm_pix_loss=bool(c.norm_pix_loss),
                   in_chans=emb.patch_embeddings.projection.in_channels,
                   img_size=tuple(img))
    # not max(..., default=0.0): dynamo has no handler for max's default= once the rates are symbolic floats
    # (torch.compile(dynamic=True) traces module float attributes as such)
    return view, max([0.0] + [p for _, p in blocks + dblocks])


def _hf_called(view: MAEView, fused) -> list:
    """The modules the fast path calls as modules on what the original gives them (their hooks run): the
    final norms, the decoder's embedding, and unless fused="block" each layer's norms, attention output
    and MLP layers (not the head: the fast path gives it the L patch rows without the cls row)."""
    called = [view.norm, view.decoder_embed, view.decoder_norm]
    if fused != "block":
        for b in (*view.blocks, *view.decoder_blocks):
            called += [b.norm1, b.norm2, b.proj, b.fc1, b.act, b.fc2]
    return called
