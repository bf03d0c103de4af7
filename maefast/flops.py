"""Analytic FLOP counts of MAE (matmul FLOPs: 2 per multiply-add), per image.

Counts what the official model computes: the patch-embedding conv over all L patches (the
official embeds, then masks), every Linear (qkv, proj, fc1, fc2, decoder_embed, decoder_pred) and
the two attention matmuls (QK^T, PV) with the cls token in both encoder and decoder. LayerNorm,
GELU, softmax and the loss are a fraction of a percent of the FLOPs and are left out (they are
memory-bound: `stage_bytes` estimates their traffic instead). Training = forward + backward, the
backward 2x the forward less the patch embedding's input gradient (the images need no gradient: no
one computes it; tests/test_bench.py checks both against torch's FlopCounterMode).

These are model FLOPs as an MFU counts them: the official computation's matmuls once each, whatever
an implementation re-does (a flash-attention backward recomputes QK^T, which is not counted; torch's
FlopCounterMode counts a CUDA SDPA backward as 2.5x its forward, recompute included, and the CPU's SDPA
as 0, so it matches this count on the explicit attention of `maefast.reference`, or on the meta
device). They are not the fewest the loss needs: the masked patches' embeddings (masking discards
them) and the head's cls and visible rows (outside the loss) are counted, and maefast's fast path
skips both. Without them a training image is 0.80% / 0.47% / 0.24% fewer FLOPs for ViT-B / L / H
(decoder 8; 1.5% for ViT-B with decoder 1): an MFU by that stricter count is that much lower, and
the Table 2 ratios 0.2-1.1% higher.

`encoder_mask_tokens=True` gives the paper's Table 2 baseline: an encoder that also processes the
mask tokens (all L+1 tokens), same decoder. `table2_flop_ratio` divides the two at the same
decoder depth.

Exact counts of the official model give ViT-B 2.356x / 3.577x, ViT-L 3.234x / 3.875x, ViT-H 3.598x /
3.974x (decoder 8 / 1) and 58.46 / 124.23 / 290.99 GFLOPs per training image; MAE.md quotes 2.36 /
3.58, 3.23 / 3.88, 3.60 / 3.97 and 58.5 / 124.3 / 291.3 (every ratio within 0.005, the FLOPs within
0.11%; counting the patch embedding's input gradient, 3x forward, left the B and L decoder-1 ratios
0.02 and 0.014 off).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from .models.configs import mlp_ratio_of, model_config

# the paper's Table 2 (800 epochs, 128 TPU-v3 cores) and MAE.md's FLOP ratios
PAPER_TABLE2 = {
    # (model, decoder depth): (hours, speed-up as printed in the paper, MAE.md FLOP ratio)
    ("mae_vit_large_patch16", 8): (15.4, 2.8, 3.23),
    ("mae_vit_large_patch16", 1): (11.6, 3.7, 3.88),
    ("mae_vit_huge_patch14", 8): (34.5, 3.5, 3.60),
    ("mae_vit_huge_patch14", 1): (29.3, 4.1, 3.97),
    ("mae_vit_base_patch16", 8): (None, None, 2.36),
    ("mae_vit_base_patch16", 1): (None, None, 3.58),
}
PAPER_MASK_TOKEN_HOURS = {"mae_vit_large_patch16": 42.4, "mae_vit_huge_patch14": 119.6}  # decoder 8, "w/ [M]"


@dataclasses.dataclass(frozen=True)
class MAEDims:
    img_size: int | tuple = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0

    @property
    def num_patches(self) -> int:
        h, w = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        return (h // self.patch_size) * (w // self.patch_size)

    def len_keep(self, mask_ratio: float) -> int:
        return int(self.num_patches * (1 - mask_ratio))


def dims_of(model_or_cfg, **overrides) -> MAEDims:
    """MAEDims from a model name, a config dict or a MaskedAutoencoderViT instance."""
    if isinstance(model_or_cfg, MAEDims):
        cfg = dataclasses.asdict(model_or_cfg)
    elif isinstance(model_or_cfg, str):
        cfg = model_config(model_or_cfg)
    elif isinstance(model_or_cfg, Mapping):
        cfg = dict(model_or_cfg)
    else:
        m = model_or_cfg
        blk, dblk = (b[0] if len(b) else None for b in (m.blocks, m.decoder_blocks))  # depth 0 has none
        cfg = dict(img_size=tuple(m.patch_embed.img_size), patch_size=m.patch_embed.patch_size[0],
                   in_chans=m.patch_embed.proj.in_channels, embed_dim=m.pos_embed.shape[-1], depth=len(m.blocks),
                   num_heads=blk.attn.num_heads if blk is not None else 1,
                   decoder_embed_dim=m.decoder_embed.out_features, decoder_depth=len(m.decoder_blocks),
                   decoder_num_heads=dblk.attn.num_heads if dblk is not None else 1,
                   mlp_ratio=_mlp_ratio_of_blocks(blk, dblk))
    cfg.update(overrides)
    if isinstance(cfg.get("img_size"), int):
        cfg["img_size"] = (cfg["img_size"], cfg["img_size"])
    if "img_size" in cfg:
        cfg["img_size"] = tuple(int(v) for v in cfg["img_size"])
    cfg["mlp_ratio"] = float(cfg.get("mlp_ratio", 4.0))
    fields = {f.name for f in dataclasses.fields(MAEDims)}
    return MAEDims(**{k: v for k, v in cfg.items() if k in fields})


def _mlp_ratio_of_blocks(*blocks) -> float:
    """The one mlp_ratio that gives every block's MLP width as the official int(width * mlp_ratio): the
    encoder's width alone does not pin the decoder's (mlp_ratio 2.2: 64 -> 140 and 128 -> 281, but 140 / 64
    gives 280)."""
    widths = [(b.mlp.fc1.in_features, b.mlp.fc1.out_features) for b in blocks if b is not None]
    ratio = max((mlp_ratio_of(w, h) for w, h in widths), default=4.0)  # no blocks: no MLP to count
    if any(int(w * ratio) != h for w, h in widths):
        raise ValueError(f"the model's MLP widths {[h for _, h in widths]} (of widths {[w for w, _ in widths]}) "
                         f"come from no single mlp_ratio, which maefast.flops counts with")
    return ratio


def _block(tokens: int, width: int, mlp_ratio: float) -> dict:
    hidden = int(width * mlp_ratio)
    return {"attn_linear": 2 * tokens * 4 * width * width,        # qkv (3 D^2) + proj (D^2)
            "attn_matmul": 2 * 2 * tokens * tokens * width,       # QK^T and PV over all heads
            "mlp": 2 * 2 * tokens * width * hidden}               # fc1 + fc2


def mae_flops(model_or_cfg, *, mask_ratio: float = 0.75, encoder_mask_tokens: bool = False,
              **overrides) -> dict:
    """Forward matmul FLOPs per image, by component, plus ``forward``, ``backward`` (2x forward less the
    patch embedding's input gradient) and ``train`` (forward + backward) totals.

    Components: patch_embed, enc_attn_linear, enc_attn_matmul, enc_mlp, decoder_embed,
    dec_attn_linear, dec_attn_matmul, dec_mlp, decoder_pred. Also the stage groups used by
    `maefast profile`: ``stage_fwd`` {masking+embed, encoder attention, encoder MLP/norms,
    decoder embed + un-shuffle, decoder, head+loss}.
    """
    d = dims_of(model_or_cfg, **overrides)
    L = d.num_patches
    enc_tokens = (L if encoder_mask_tokens else d.len_keep(mask_ratio)) + 1
    dec_tokens = L + 1
    pdim = d.patch_size * d.patch_size * d.in_chans
    enc = _block(enc_tokens, d.embed_dim, d.mlp_ratio)
    dec = _block(dec_tokens, d.decoder_embed_dim, d.mlp_ratio)
    c = {"patch_embed": 2 * L * pdim * d.embed_dim,
         "enc_attn_linear": d.depth * enc["attn_linear"], "enc_attn_matmul": d.depth * enc["attn_matmul"],
         "enc_mlp": d.depth * enc["mlp"],
         "decoder_embed": 2 * enc_tokens * d.embed_dim * d.decoder_embed_dim,
         "dec_attn_linear": d.decoder_depth * dec["attn_linear"],
         "dec_attn_matmul": d.decoder_depth * dec["attn_matmul"], "dec_mlp": d.decoder_depth * dec["mlp"],
         "decoder_pred": 2 * dec_tokens * d.decoder_embed_dim * pdim}
    fwd = sum(c.values())
    c["forward"] = fwd
    # backward = 2x forward (input and weight gradients of every matmul) less the patch embedding's
    # input gradient, which no one computes: the images need no gradient
    c["backward"] = 2 * fwd - c["patch_embed"]
    c["train"] = fwd + c["backward"]
    c["stage_fwd"] = {"masking+embed": c["patch_embed"],
                      "encoder attention": c["enc_attn_linear"] + c["enc_attn_matmul"],
                      "encoder MLP/norms": c["enc_mlp"],
                      "decoder embed + un-shuffle": c["decoder_embed"],
                      "decoder": c["dec_attn_linear"] + c["dec_attn_matmul"] + c["dec_mlp"],
                      "head+loss": c["decoder_pred"]}
    c["tokens"] = {"encoder": enc_tokens, "decoder": dec_tokens, "L": L}
    return c


def table2_flop_ratio(model_or_cfg, decoder_depth: int | None = None, mask_ratio: float = 0.75) -> float:
    """Training FLOPs of the mask-token encoder / visible-only encoder, same decoder depth."""
    kw = {} if decoder_depth is None else {"decoder_depth": decoder_depth}
    with_m = mae_flops(model_or_cfg, mask_ratio=mask_ratio, encoder_mask_tokens=True, **kw)["train"]
    vis = mae_flops(model_or_cfg, mask_ratio=mask_ratio, encoder_mask_tokens=False, **kw)["train"]
    return with_m / vis


def param_count(model_or_cfg, **overrides) -> int:
    """Trainable parameters (the fixed sin-cos position embeddings excluded), analytically."""
    d = dims_of(model_or_cfg, **overrides)
    pdim = d.patch_size * d.patch_size * d.in_chans

    def block(w):
        h = int(w * d.mlp_ratio)
        return 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * h + h) + (h * w + w)

    return (pdim * d.embed_dim + d.embed_dim + d.embed_dim + d.depth * block(d.embed_dim) + 2 * d.embed_dim
            + d.embed_dim * d.decoder_embed_dim + d.decoder_embed_dim + d.decoder_embed_dim
            + d.decoder_depth * block(d.decoder_embed_dim) + 2 * d.decoder_embed_dim
            + d.decoder_embed_dim * pdim + pdim)


def stage_bytes(model_or_cfg, batch: int, *, act_bytes: int = 2, weight_bytes: int = 4, mask_ratio: float = 0.75,
                **overrides) -> dict:
    """Minimum forward memory traffic per stage for a batch (bytes): each stage's input read, output
    write and weights, as a fused implementation would move them. A lower bound: the GB/s it gives
    is what the stage achieved at least. ``optimizer`` is AdamW over fp32 parameters (param, grad,
    exp_avg, exp_avg_sq read; param, exp_avg, exp_avg_sq written).

    masking+embed and head+loss each count the whole fp32 image read, and head+loss all L+1 decoder
    rows, as the official computation reads them (its conv and patchify read every pixel). maefast's
    fast path reads the K visible patches' pixels in the one and the L-K masked patches' pixels and
    rows in the other: for it these two stages' bytes (and `mae_flops`' FLOPs) are not lower bounds."""
    d = dims_of(model_or_cfg, **overrides)
    L, N = d.num_patches, batch
    T = d.len_keep(mask_ratio) + 1
    D, Dd = d.embed_dim, d.decoder_embed_dim
    pdim = d.patch_size * d.patch_size * d.in_chans
    h, hd = int(D * d.mlp_ratio), int(Dd * d.mlp_ratio)
    img = N * L * pdim * 4
    return {"masking+embed": img + N * T * D * act_bytes + pdim * D * weight_bytes,
            "encoder attention": d.depth * (2 * N * T * D * act_bytes + 4 * D * D * weight_bytes),
            "encoder MLP/norms": d.depth * (2 * N * T * D * act_bytes + 2 * D * h * weight_bytes),
            "decoder embed + un-shuffle": N * T * D * act_bytes + N * (L + 1) * Dd * act_bytes + D * Dd * weight_bytes,
            "decoder": d.decoder_depth * (2 * N * (L + 1) * Dd * act_bytes + (4 * Dd * Dd + 2 * Dd * hd) * weight_bytes),
            "head+loss": N * (L + 1) * Dd * act_bytes + img + Dd * pdim * weight_bytes,
            "optimizer": 28 * param_count(d)}
