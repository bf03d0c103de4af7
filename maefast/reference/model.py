"""The reference MAE: the official facebookresearch/mae `MaskedAutoencoderViT`, written here in
plain PyTorch (no timm) with the official constructor, initialisation and state-dict keys."""
from __future__ import annotations

import torch
import torch.nn as nn

from .._validate import check_images, check_input_dtype, check_int, check_tensor, compiling, to_2tuple
from .attention import attention
from .loss import forward_loss
from .masking import random_masking
from .normalize import normalize, pixel_stats
from .patchify import patchify, unpatchify
from .pos_embed import get_2d_sincos_pos_embed

LN_EPS = 1e-6  # what the official paper factories pass; the class's own default is nn.LayerNorm's 1e-5


class PatchEmbed(nn.Module):
    """Conv2d patch embedding (timm layout: `proj` is the Conv2d)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = to_2tuple("img_size", img_size)
        self.patch_size = to_2tuple("patch_size", patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"patch_size must be square, got {self.patch_size}")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size[0]}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        # timm's: attn_drop called on the probabilities (its own mode decides; an identity in eval)
        x = attention(self.qkv(x), self.num_heads, scale=self.scale, dropout=self.attn_drop)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with timm 0.3.2's attribute names."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        if drop_path:
            raise ValueError("drop_path is not used in MAE pre-training and is not supported here")
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a ViT backbone (official semantics and state-dict keys).

    forward(imgs (N, C, H, W), mask_ratio=0.75, noise=None (N, L)) -> (loss, pred (N, L, p*p*C), mask (N, L)).
    imgs are ImageNet-normalised floats (official), or uint8 raw pixels: forward(..., mean=, std=) then
    normalises them first (`reference.normalize`, ImageNet's statistics by default) and runs on those.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        for name, v, low in (("in_chans", in_chans, 1), ("embed_dim", embed_dim, 1), ("depth", depth, 0),
                             ("num_heads", num_heads, 1), ("decoder_embed_dim", decoder_embed_dim, 1),
                             ("decoder_depth", decoder_depth, 0), ("decoder_num_heads", decoder_num_heads, 1)):
            check_int(name, v, low)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.in_chans = in_chans
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                                                   norm_layer=norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_embed.patch_size[0] ** 2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    # -- official initialisation -------------------------------------------------------------
    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):  # (the official code assumed an affine one with a bias)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
            if m.weight is not None:
                nn.init.constant_(m.weight, 1.0)

    # -- official helpers ----------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def patchify(self, imgs):
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x):
        return unpatchify(x, self.patch_size, self.patch_embed.grid_size, self.in_chans)

    def random_masking(self, x, mask_ratio, noise=None):
        return random_masking(x, mask_ratio, noise=noise)

    def _embed_weight(self) -> torch.Tensor | None:
        """The weight images are checked against and cast to: the projection's; in a wrapped projection (an
        nn.Sequential, a LoRA adapter, whose own fp32 factors come first among its parameters) the first
        Conv2d's (also a plain tensor attribute: FSDP1 without use_orig_params sets one while it runs); else
        the embedding's first floating parameter; None when it holds none: nothing to check or cast to."""
        w = getattr(self.patch_embed.proj, "weight", None)
        if isinstance(w, torch.Tensor):
            return w
        conv = next((m for m in self.patch_embed.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is not None and isinstance(conv.weight, torch.Tensor):
            return conv.weight
        return next((p for p in self.patch_embed.parameters() if p.is_floating_point()), None)

    def check_inputs(self, imgs, noise=None):
        if compiling():
            return
        check_images("imgs", imgs, self.patch_size, channels=self.in_chans, uint8=True)
        w = self._embed_weight()
        if imgs.is_floating_point() and w is not None:  # uint8: normalised, then cast to the weight's dtype
            check_input_dtype("imgs", imgs, w, "the model's patch embedding weight")
        if tuple(imgs.shape[-2:]) != tuple(self.patch_embed.img_size):
            raise ValueError(f"imgs must be {self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]} "
                             f"(img_size of this model), got {tuple(imgs.shape[-2:])}")
        if noise is not None:
            check_tensor("noise", noise, ndim=2)
            L = self.patch_embed.num_patches
            if tuple(noise.shape) != (imgs.shape[0], L):
                raise ValueError(f"noise must have shape (N, L) = {(imgs.shape[0], L)}, got {tuple(noise.shape)}")

    # -- official forward ----------------------------------------------------------------------
    def forward_encoder(self, x, mask_ratio, noise=None):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        return forward_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss)

    def forward(self, imgs, mask_ratio=0.75, noise=None, *, mean=None, std=None):
        self.check_inputs(imgs, noise)
        x = imgs
        stats = pixel_stats(imgs, mean, std)
        if stats is not None:
            # uint8: the official input is the normalised fp32 image; the patch embedding reads it in its
            # weight's dtype (as the kernels do), the loss target stays fp32
            imgs = normalize(imgs, *stats)
            w = self._embed_weight()
            x = imgs if w is None else imgs.to(w.dtype)
        latent, mask, ids_restore = self.forward_encoder(x, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask
