"""The paper's optimisation recipe: AdamW parameter groups and the learning-rate schedule.

Same rules as the official facebookresearch/mae code (timm 0.3.2 ``add_weight_decay`` and
``util/lr_sched.adjust_learning_rate``), written here: no weight decay on biases and 1-D parameters
(LayerNorm weights), decay on every other trainable tensor (cls_token and mask_token are 3-D, so
they ARE decayed); frozen tensors (the sin-cos pos_embed) are left out. The learning rate is
``blr * effective_batch / 256``, linear warm-up per iteration, then a half-cycle cosine to min_lr.
"""
from __future__ import annotations

import math

import torch

from .._lrs import set_group_lrs
from .._validate import check_int, check_nonneg_number

BETAS = (0.9, 0.95)
BASE_LR = 1.5e-4
WEIGHT_DECAY = 0.05
# 40 warm-up epochs of the paper's 800: the default warm-up is this fraction of the run.
WARMUP_FRACTION = 40 / 800


def scaled_lr(blr: float, effective_batch: int) -> float:
    """Absolute lr = blr x effective batch / 256 (effective = per-rank batch x accum_iter x world)."""
    return check_nonneg_number("blr", blr) * check_int("effective_batch", effective_batch, 1) / 256


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float = WEIGHT_DECAY,
                              skip_list: tuple[str, ...] = ()) -> list[dict]:
    """AdamW groups [no-decay, decay] as timm 0.3.2 ``add_weight_decay`` (the official MAE call).

    A parameter gets no decay when it is 1-D (biases, LayerNorm weights), its name ends in ".bias",
    or it is in ``skip_list``; parameters with ``requires_grad=False`` are not optimised at all.
    """
    # (torch's AdamW checks only its default: a NaN group value filled the decayed weights with NaN)
    weight_decay = check_nonneg_number("weight_decay", weight_decay)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def decay_split(model: torch.nn.Module, weight_decay: float = WEIGHT_DECAY) -> tuple[list[str], list[str]]:
    """Names of the (decayed, not decayed) parameters, for logs and tests."""
    ids = {id(p) for p in param_groups_weight_decay(model, weight_decay)[1]["params"]}
    decayed, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decayed if id(param) in ids else plain).append(name)
    return decayed, plain


def lr_at(epoch: float, lr: float, warmup_epochs: float, epochs: float, min_lr: float = 0.0) -> float:
    """Learning rate at a fractional epoch (official ``adjust_learning_rate``).

    ``epoch = completed_epochs + batch_index / batches_per_epoch``. Warm-up: ``lr * epoch / warmup``
    (0 at the very first iteration, as in the official code); then
    ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (epoch - warmup) / (epochs - warmup)))``.
    """
    if not epoch >= 0:  # (a negative one gave a negative lr)
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = epochs - warmup_epochs
    if span <= 0:
        return lr
    progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, lr: float, warmup_epochs: float,
                         epochs: float, min_lr: float = 0.0) -> float:
    """Sets every group's lr for this iteration (times the group's ``lr_scale`` if present); returns it."""
    value = lr_at(epoch, lr, warmup_epochs, epochs, min_lr)
    set_group_lrs(optimizer, value)  # a tensor lr in place: a captured (CUDA-graph) step reads it there
    return value
