"""MAE models and factories for the paper's configs."""
from __future__ import annotations

from .mae import MaskedAutoencoderViT
from .configs import ALIASES, MODEL_CONFIGS, model_config, resolve_model_name


def create_model(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Builds a model by name (``mae_vit_base_patch16``, ``large``, ``h14``, ...); kwargs override."""
    return MaskedAutoencoderViT(**model_config(name, **kwargs))


def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    return create_model("mae_vit_base_patch16", **kwargs)


def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    return create_model("mae_vit_large_patch16", **kwargs)


def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    return create_model("mae_vit_huge_patch14", **kwargs)


def mae_vit_small_cpu(**kwargs) -> MaskedAutoencoderViT:
    return create_model("mae_vit_small_cpu", **kwargs)


def mae_vit_tiny_test(**kwargs) -> MaskedAutoencoderViT:
    return create_model("mae_vit_tiny_test", **kwargs)


# the official factory names
mae_vit_base_patch16_dec512d8b = mae_vit_base_patch16
mae_vit_large_patch16_dec512d8b = mae_vit_large_patch16
mae_vit_huge_patch14_dec512d8b = mae_vit_huge_patch14

__all__ = ["MaskedAutoencoderViT", "create_model", "model_config", "resolve_model_name", "MODEL_CONFIGS", "ALIASES",
           "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14", "mae_vit_small_cpu",
           "mae_vit_tiny_test", "mae_vit_base_patch16_dec512d8b", "mae_vit_large_patch16_dec512d8b",
           "mae_vit_huge_patch14_dec512d8b"]
