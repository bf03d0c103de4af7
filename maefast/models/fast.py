"""The fast MAE forward on maefast's fused ops.

One forward for every model laid out like the official MAE — maefast's own model, an official
facebookresearch `MaskedAutoencoderViT`, or transformers' `ViTMAEForPreTraining` — reached through a
light *view* of its parameters (no copies: gradients land in the model's own parameters):

    masking (Philox, in-kernel ranking) -> patch embedding of the visible patches only ->
    encoder blocks (visible-token attention on the packed qkv; torch's LayerNorm, GELU and Linear,
    or each block as one `ops.vit_block` with fused="block") -> decoder embed -> un-shuffle (mask tokens + positions, one pass) -> decoder blocks
    -> prediction head on the masked rows only -> fused norm-pix loss.

Numerics follow the official code under autocast: the residual streams stay fp32, matmul inputs
are in the autocast dtype, every statistic (LayerNorm, softmax, loss) is fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..ops._backend import MODEL_IMPLS
from ..ops.attention import model_level_impl
from .._validate import FLOAT_DTYPES, autocast_dtype, check_images, check_mask_ratio, check_tensor, compiling
from ..reference.normalize import normalize, pixel_stats
from .._modules import KNOWN_PACKAGES, TIMM_CLASSES, is_layer_norm, trusted_class  # noqa: F401 - re-exported
from .._modules import defining_class, package, plain_layer, vit_block_computes

# ops that have a CUDA C++ backend; the others (LayerNorm, bias+GELU) map impl="cuda" to "auto".
_CUDA_OPS = {"masking", "patch_embed", "attention", "unshuffle", "loss"}


def op_impl(impl: str, op: str) -> str:
    """A model's impl as one op takes it: "cuda" for an op without a CUDA C++ kernel, and "sdpa" (attention
    only, `model_level_impl`) for every other op, are "auto"."""
    if (impl == "cuda" and op not in _CUDA_OPS) or impl == "sdpa":
        return "auto"
    return impl


@dataclass
class BlockView:
    norm1: nn.LayerNorm
    qkv: Callable[[], tuple[torch.Tensor, Optional[torch.Tensor]]]  # packed [3D, D] weight and bias
    num_heads: int
    scale: float
    proj: nn.Linear
    norm2: nn.LayerNorm
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear
    module: Optional[nn.Module] = None  # the block module itself (see route_blocks_through_modules)
    # dropout on the attention output (after proj) and on the MLP output (after fc2), as transformers'
    # ViTMAE layers apply it; 0 outside training. Drawn from torch's generator in the original's order.
    drop_attn: float = 0.0
    drop_mlp: float = 0.0
    checkpoint: bool = False  # checkpoint this block whatever grad_checkpointing says (transformers' flag)
    # what checkpoints it (transformers' per-layer function: torch's checkpoint, maybe offloading); None: torch's
    checkpoint_fn: Optional[Callable] = None

    @property
    def exact_gelu(self) -> bool:
        a = self.act
        if isinstance(a, nn.GELU):  # a subclass with its own forward (a QuickGELU) is not torch's GELU
            return a.approximate == "none" and trusted_class(type(a))
        # transformers' GELUActivation (exact erf GELU) for hidden_act="gelu"; not a class of another package
        # under that name (fused="block" computes the exact GELU in its place)
        return type(a).__name__ == "GELUActivation" and package(defining_class(type(a), "forward")) == "transformers" \
            and getattr(a, "act", None) in (None, F.gelu)


@dataclass
class MAEView:
    patch_proj: nn.Conv2d
    pos_embed: torch.Tensor
    cls_token: torch.Tensor
    blocks: list
    norm: nn.LayerNorm
    decoder_embed: nn.Linear
    mask_token: torch.Tensor
    decoder_pos_embed: torch.Tensor
    decoder_blocks: list
    decoder_norm: nn.LayerNorm
    decoder_pred: nn.Linear
    norm_pix_loss: bool
    in_chans: int
    img_size: tuple[int, int]

    @property
    def patch_size(self) -> int:
        return self.patch_proj.kernel_size[0]

    @property
    def num_patches(self) -> int:
        return self.pos_embed.shape[1] - 1


FUSED_MODES = (False, "block")


def check_fused(fused) -> bool | str:
    """fused: False (torch LayerNorm/GELU/Linear around maefast's attention: what Inductor fuses under
    torch.compile) or "block" (each block one `ops.vit_block` op). 0 is accepted for False."""
    if fused is True or (fused == 1 and not isinstance(fused, str)):
        raise ValueError("fused=True (maefast's eager residual+LayerNorm and bias+GELU ops between torch's "
                         "matmuls) was removed: it never beat torch's own ops in a measured step (H200, "
                         "2026-11-27) and under torch.compile Inductor fuses that work itself; use fused=False "
                         "(and torch.compile) or fused='block'")
    if fused == "block":
        return fused
    if fused is False or (fused == 0 and not isinstance(fused, str)):
        return False
    raise ValueError(f"fused must be False or 'block', got {fused!r}")


def check_model_impl(impl, fused, grad_checkpointing: bool = False, own: bool = False, together: bool = False) -> None:
    """A model's impl (MODEL_IMPLS) and its combination with `fused` (already checked) and, for maefast's own
    model (``own``: its impl="reference" runs the official forward as it is), with `grad_checkpointing`, and
    with fused="block" where both were given in one call (``together``: the constructor, maefast.patch). A
    fused model switched to impl="reference" later runs the official forward (how one compares with it)."""
    if not isinstance(impl, str) or impl not in MODEL_IMPLS:
        raise ValueError(f"impl must be one of {MODEL_IMPLS}, got {impl!r}")
    if impl == "sdpa" and fused == "block":
        raise ValueError("fused='block' runs maefast's own attention inside each block's one op; impl='sdpa' "
                         "(torch's SDPA) needs fused=False")
    if own and impl == "reference" and grad_checkpointing:
        raise ValueError("grad_checkpointing=True checkpoints the blocks of maefast's fast path; impl='reference' "
                         "runs the official forward as it is, without checkpointing: pass another impl, or "
                         "grad_checkpointing=False")
    if own and together and impl == "reference" and fused == "block":
        raise ValueError("fused='block' runs each block of maefast's fast path as one op; impl='reference' runs "
                         "the official forward as it is, without it: pass another impl, or fused=False")


def _block_op_ok(bv: BlockView, x: torch.Tensor, qkv_w: torch.Tensor) -> bool:
    """Whether `ops.vit_block` computes this block exactly: no dropout, `vit_block_computes`, and outside
    autocast weights of the stream's dtype (the op would cast others to it; the block's modules raise, as
    the official's do for a block cast to another dtype than the model's)."""
    return not (bv.drop_attn or bv.drop_mlp) and vit_block_computes((bv.norm1, bv.norm2), bv.exact_gelu, bv.proj,
                                                                      bv.fc1, bv.fc2) and \
        (autocast_dtype(x.device) is not None or all(w.dtype == x.dtype for w in (qkv_w, bv.proj.weight,
                                                                                   bv.fc1.weight, bv.fc2.weight)))


def block_forward(bv: BlockView, x: torch.Tensor, impl: str, fused) -> torch.Tensor:
    """One pre-norm block: x + attn(LN1(x)), then + mlp(LN2(.)); x is the fp32 (or input-dtype) stream."""
    w, b = bv.qkv()
    if fused == "block" and impl != "sdpa" and _block_op_ok(bv, x, w):  # the block op runs maefast's attention
        return ops.vit_block(x, bv.norm1.weight, bv.norm1.bias, w, b, bv.proj.weight, bv.proj.bias, bv.norm2.weight,
                             bv.norm2.bias, bv.fc1.weight, bv.fc1.bias, bv.fc2.weight, bv.fc2.bias,
                             num_heads=bv.num_heads, scale=bv.scale, eps1=bv.norm1.eps, eps2=bv.norm2.eps,
                             impl=impl)
    h = bv.norm1(x)
    qkv = F.linear(h, w, b)
    a = ops.visible_attention(qkv, bv.num_heads, scale=bv.scale, impl=model_level_impl(impl, qkv, bv.num_heads))
    a = bv.proj(a)
    if bv.drop_attn:
        a = F.dropout(a, bv.drop_attn, training=True)
    x = x + a
    m = bv.fc2(bv.act(bv.fc1(bv.norm2(x))))
    if bv.drop_mlp:
        m = F.dropout(m, bv.drop_mlp, training=True)
    return x + m


def _block_call(bv: BlockView, x, impl, fused):
    """block_forward, through the block module's __call__ when its hooks must run (FSDP2 per block)."""
    if bv.module is not None and getattr(bv.module, "_maefast_module_call", False):
        return bv.module(x, impl=impl, fused=fused)
    return block_forward(bv, x, impl, fused)


def _run_blocks(blocks, x, impl, fused, grad_checkpointing):
    for bv in blocks:
        if (grad_checkpointing or bv.checkpoint) and torch.is_grad_enabled():
            # without dropout the block draws no random numbers: no RNG state to save, which also keeps
            # the step capturable in a CUDA graph on torch builds that cannot read the RNG state there;
            # with dropout the recompute must draw the forward's masks again
            x = (bv.checkpoint_fn or checkpoint)(_block_call, bv, x, impl, fused, use_reentrant=False,
                                                 preserve_rng_state=bool(bv.drop_attn or bv.drop_mlp))
        else:
            x = _block_call(bv, x, impl, fused)
    return x


def route_blocks_through_modules(model: nn.Module) -> None:
    """Makes the fast path call each block *module* (its forward becomes the fused block forward), so
    that hooks on the blocks run — FSDP2's `fully_shard(block)` gathers a block's parameters in its
    pre-forward hook and frees them after. Called without the fast-path arguments the block runs
    its original forward, so the reference path is unchanged. Official-layout models (ours included)."""
    for blk in list(model.blocks) + list(model.decoder_blocks):
        # an object holding the block (not a closure over it): deep copies and pickles of the model
        # keep running on their own parameters
        blk.forward = _RoutedBlockForward(blk)
        blk._maefast_module_call = True


class _RoutedBlockForward:
    """The forward route_blocks_through_modules installs on a block."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, x, impl=None, fused=False):
        blk = self.block
        if impl is None:  # called as the official block (the reference path)
            return type(blk).forward(blk, x)
        return block_forward(_official_block_view(blk), x, impl, fused)


def unsupported_weights(weight: torch.Tensor) -> str | None:
    """Why maefast's kernels cannot take a model's weights (the official forward runs any float), or None."""
    if weight.dtype not in FLOAT_DTYPES:
        return f"{str(weight.dtype).replace('torch.', '')} weights (maefast's kernels take float32, bfloat16, float16)"
    return None


def check_inputs(view: MAEView, imgs, mask_ratio, noise) -> None:
    """The model-level checks, also while torch.compile traces (on fake tensors): skipped there, a wrong
    image size or channel count was reported by an op as its pos_embed's or weight's shape."""
    p = view.patch_size
    check_images("imgs", imgs, p, channels=view.in_chans, uint8=True)
    if tuple(imgs.shape[-2:]) != tuple(view.img_size):
        raise ValueError(f"imgs must be {view.img_size[0]}x{view.img_size[1]} (img_size of this model), "
                         f"got {tuple(imgs.shape[-2:])}")
    w = view.patch_proj.weight
    why = unsupported_weights(w)
    if why is not None:
        raise TypeError(f"maefast's fast forward cannot take {why}")
    if imgs.device != w.device:
        raise ValueError(f"imgs must be on the model's device {w.device}, got {imgs.device}")
    if not compiling():  # (a traced ratio may be symbolic: random_masking checks it then)
        check_mask_ratio(mask_ratio, view.num_patches)
    if noise is not None:
        check_tensor("noise", noise, ndim=2, device=imgs.device)
        if tuple(noise.shape) != (imgs.shape[0], view.num_patches):
            raise ValueError(f"noise must have shape (N, L) = {(imgs.shape[0], view.num_patches)}, "
                             f"got {tuple(noise.shape)}")


def fast_forward(view: MAEView, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None, *,
                 seed: int | None = None, impl: str = "auto", fused: bool = False, grad_checkpointing: bool = False,
                 return_pred: bool = True, loss_fn: Callable | None = None, mean=None, std=None):
    """The MAE training forward on maefast's ops.

    imgs: float (already normalised, official) or uint8 raw pixels, which the patch embedding and
    the loss normalise with mean/std (per channel; None: ImageNet's) where they read them: the same
    as normalising first (`maefast.reference.normalize`) and passing the fp32 images.

    Returns (loss, pred, mask, ids_restore). With return_pred=True, pred is (N, L, p*p*C) for every
    patch (the official output; the head then runs on all rows, the loss still reads only masked
    patches); with return_pred=False the head runs on the masked rows only and pred is None.
    loss_fn: the model's own loss, called as loss_fn(imgs, pred (N, L, p*p*C), mask (N, L)) in place of
    maefast's fused one (pred is then computed for every patch, and returned only with return_pred).
    Raises ValueError when imgs requires a gradient under grad mode: the fast path reads the images
    as constants (the model's original forward gives them a gradient).
    """
    check_inputs(view, imgs, mask_ratio, noise)
    if torch.is_grad_enabled() and imgs.requires_grad:  # checked while compiling too: never a silent None
        raise ValueError("imgs requires a gradient, which maefast's fast forward does not compute (it reads the "
                         "images as constants); detach them, or run the official forward for an image gradient")
    n, L, p = imgs.shape[0], view.num_patches, view.patch_size
    stats = pixel_stats(imgs, mean, std)
    px = dict(mean=stats[0], std=stats[1]) if stats is not None else {}

    ids_keep, ids_restore, mask = ops.random_masking(n, L, mask_ratio, noise=noise, seed=seed, device=imgs.device,
                                                     impl=op_impl(impl, "masking"))
    # the residual stream's dtype is the official one's, the promotions of `x + pos_embed` (the op's
    # output) and of torch.cat with the cls token: fp32 under autocast with fp32 parameters, the
    # parameters' dtype for a model cast to bf16/fp16 (uint8 images are read in the patch weight's)
    x = ops.masked_patch_embed(imgs.detach(), ids_keep, view.patch_proj.weight, view.patch_proj.bias,
                               view.pos_embed, p, impl=op_impl(impl, "patch_embed"), **px)
    cls = view.cls_token + view.pos_embed[:, :1, :]
    stream_dtype = torch.promote_types(x.dtype, cls.dtype)
    x = torch.cat([cls.to(stream_dtype).expand(n, -1, -1), x.to(stream_dtype)], dim=1)
    x = _run_blocks(view.blocks, x, impl, fused, grad_checkpointing)
    x = view.norm(x)

    # decoder_embed's output as it is: unshuffle promotes with the fp32 mask_token / pos_embed (the fp32 stream)
    x = view.decoder_embed(x)
    x = ops.unshuffle(x, view.mask_token, ids_restore, view.decoder_pos_embed, impl=op_impl(impl, "unshuffle"))
    x = _run_blocks(view.decoder_blocks, x, impl, fused, grad_checkpointing)
    x = view.decoder_norm(x)

    head = view.decoder_pred
    if loss_fn is not None:
        pred = _head_on_patches(head, x)
        # the model's own loss reads images as the official code gives them: normalised floats
        loss = loss_fn(normalize(imgs, *stats) if stats is not None else imgs, pred, mask)
        pred = pred if return_pred else None
    elif return_pred:
        pred = _head_on_patches(head, x)
        loss = ops.norm_pix_loss(pred, imgs, mask, p, norm_pix=view.norm_pix_loss, pred_on="all",
                                 impl=op_impl(impl, "loss"), **px)
    else:
        pred = None
        loss = ops.masked_prediction_loss(x, head.weight, head.bias, imgs, ids_restore, ids_keep.shape[1], p,
                                          norm_pix=view.norm_pix_loss, impl=op_impl(impl, "loss"), **px)
    return loss, pred, mask, ids_restore


def _head_on_patches(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The head's prediction of the patch rows of x (N, 1+L, D): a plain Linear (row by row) on those rows
    alone; any other head as the official code calls it, on every row with the cls row dropped after (a
    head of one's own may mix rows: on the patch rows alone it gave another result, silently)."""
    if plain_layer(head, nn.Linear):
        return head(x[:, 1:, :])
    return head(x)[:, 1:, :]


# -- views ------------------------------------------------------------------------------------------

def _official_block_view(blk) -> BlockView:
    attn = blk.attn
    return BlockView(norm1=blk.norm1, qkv=lambda q=attn.qkv: (q.weight, q.bias), num_heads=attn.num_heads,
                     scale=float(attn.scale), proj=attn.proj, norm2=blk.norm2, fc1=blk.mlp.fc1, act=blk.mlp.act,
                     fc2=blk.mlp.fc2, module=blk)


def official_view(model) -> MAEView:
    """View of a model with the official facebookresearch/mae layout (ours or theirs, duck-typed)."""
    pe = model.patch_embed
    img = getattr(pe, "img_size", None)
    img = (img, img) if isinstance(img, int) else tuple(img)
    in_chans = pe.proj.in_channels
    return MAEView(patch_proj=pe.proj, pos_embed=model.pos_embed, cls_token=model.cls_token,
                   blocks=[_official_block_view(b) for b in model.blocks], norm=model.norm,
                   decoder_embed=model.decoder_embed, mask_token=model.mask_token,
                   decoder_pos_embed=model.decoder_pos_embed,
                   decoder_blocks=[_official_block_view(b) for b in model.decoder_blocks],
                   decoder_norm=model.decoder_norm, decoder_pred=model.decoder_pred,
                   norm_pix_loss=bool(getattr(model, "norm_pix_loss", False)), in_chans=in_chans, img_size=img)
