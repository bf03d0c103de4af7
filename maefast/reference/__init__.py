"""Pure-PyTorch reference of MAE: the semantics every maefast kernel must reproduce.

Runs on the CPU and imports no triton. Checked against transformers' ViTMAEForPreTraining.
"""
from .attention import attention
from .loss import NORM_PIX_EPS, forward_loss, forward_loss_masked, masked_patch_ids, norm_pix_target
from .masking import MaskIds, masking_ids, random_masking
from .model import Attention, Block, MaskedAutoencoderViT, Mlp, PatchEmbed
from .patch_embed import masked_patch_embed, patch_embed
from .patchify import patchify, unpatchify
from .pos_embed import get_2d_sincos_pos_embed
from .unshuffle import unshuffle

__all__ = ["attention", "NORM_PIX_EPS", "forward_loss", "forward_loss_masked", "masked_patch_ids", "norm_pix_target",
           "MaskIds", "masking_ids",
           "random_masking", "Attention", "Block", "MaskedAutoencoderViT", "Mlp", "PatchEmbed",
           "masked_patch_embed", "patch_embed", "patchify", "unpatchify", "get_2d_sincos_pos_embed", "unshuffle"]
