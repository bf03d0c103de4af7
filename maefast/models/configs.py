"""The paper's model configs (decoder 8 x 512, 16 heads) and small configs for CPU tests."""
from __future__ import annotations

import math
from functools import partial

import torch.nn as nn

from ..reference.model import LN_EPS

# the official factories pass LayerNorm eps 1e-6 (the class's own default, nn.LayerNorm, is 1e-5)
PAPER_NORM = partial(nn.LayerNorm, eps=LN_EPS)
PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_layer=PAPER_NORM)

MODEL_CONFIGS: dict[str, dict] = {
    "mae_vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                 mlp_ratio=4.0, **PAPER_DECODER),
    "mae_vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                  mlp_ratio=4.0, **PAPER_DECODER),
    "mae_vit_huge_patch14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                                 mlp_ratio=4.0, **PAPER_DECODER),
    # CPU-sized: head dims 64 and 32 like the paper's encoder/decoder, 8x8 = 64 patches.
    "mae_vit_small_cpu": dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3,
                              decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0,
                              norm_layer=PAPER_NORM),
    "mae_vit_tiny_test": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0,
                              norm_layer=PAPER_NORM),
}

ALIASES = {"base": "mae_vit_base_patch16", "b16": "mae_vit_base_patch16", "vit_b": "mae_vit_base_patch16",
           "large": "mae_vit_large_patch16", "l16": "mae_vit_large_patch16", "vit_l": "mae_vit_large_patch16",
           "huge": "mae_vit_huge_patch14", "h14": "mae_vit_huge_patch14", "vit_h": "mae_vit_huge_patch14",
           "small": "mae_vit_small_cpu", "tiny": "mae_vit_tiny_test",
           # the paper's spelling: ViT-B/16, ViT-L/16, ViT-H/14
           "vit_b16": "mae_vit_base_patch16", "vit_l16": "mae_vit_large_patch16", "vit_h14": "mae_vit_huge_patch14"}


def mlp_ratio_of(width: int, hidden: int) -> float:
    """The mlp_ratio for which the official int(width * mlp_ratio) gives ``hidden``: hidden / width, one ulp up
    where floating point lands just under the integer (112 * (488 / 112) is 487.99999999999994)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else math.nextafter(ratio, math.inf)


def resolve_model_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"the model name must be a str, got {type(name).__name__}; choose one of "
                        f"{sorted(MODEL_CONFIGS)} or {sorted(ALIASES)}")
    key = name.lower().replace("-", "_").replace("/", "")
    key = ALIASES.get(key, key)
    for suffix in ("_dec512d8b",):
        key = key.removesuffix(suffix)
    if key not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)} or {sorted(ALIASES)}")
    return key


_POSITIVE_INTS = ("patch_size", "in_chans", "embed_dim", "num_heads", "decoder_embed_dim", "decoder_num_heads")
_DEPTHS = ("depth", "decoder_depth")  # 0 blocks is a model too (the official loops over none)


def _is_int(v, least: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= least


def check_config(cfg: dict) -> int:
    """A config's sizes are a model (positive sizes, depths >= 0, whole patches, widths split evenly among
    heads), else ValueError naming the setting; returns the number of patches L. img_size: an int or, as the
    model takes it, (height, width)."""
    for k in _POSITIVE_INTS + _DEPTHS:
        if k in cfg and not _is_int(cfg[k], 0 if k in _DEPTHS else 1):
            raise ValueError(f"{k} must be a {'non-negative' if k in _DEPTHS else 'positive'} integer, got {cfg[k]!r}")
    r = cfg.get("mlp_ratio", 4.0)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
        raise ValueError(f"mlp_ratio must be a positive number, got {r!r}")
    img = cfg["img_size"]
    hw = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
    if len(hw) != 2 or not all(_is_int(v, 1) for v in hw):
        raise ValueError(f"img_size must be a positive integer or (height, width) of them, got {img!r}")
    if hw[0] % cfg["patch_size"] or hw[1] % cfg["patch_size"]:
        raise ValueError(f"img_size={img} is not a whole number of patch_size={cfg['patch_size']} patches")
    for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
        if cfg[width] % cfg[heads]:
            raise ValueError(f"{width}={cfg[width]} is not divisible by {heads}={cfg[heads]}")
        if cfg[width] % 4:  # (the model's constructor refused it, after the work before it)
            raise ValueError(f"{width}={cfg[width]} is not a multiple of 4 (the 2-D sin-cos position embedding)")
    return (hw[0] // cfg["patch_size"]) * (hw[1] // cfg["patch_size"])


def model_config(name: str, **overrides) -> dict:
    cfg = dict(MODEL_CONFIGS[resolve_model_name(name)])
    cfg.update(overrides)
    return cfg
