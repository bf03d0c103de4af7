"""The learning rates of an optimizer's param groups as maefast.TrainStep and the official schedule
(maefast.train.schedule.adjust_learning_rate) write them: ``lr`` times each group's ``lr_scale``, a tensor lr
(what a captured step's CUDA graphs read) in place, and the tensors torch.optim shares between groups."""
from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["set_group_lrs", "own_lr_per_scale", "mark_read_by_graphs"]


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate: ``lr`` times the group's ``lr_scale`` if present. A tensor lr (what a
    captured step's graph reads) is written in place, with no host sync (`own_lr_per_scale` first)."""
    own_lr_per_scale(optimizer)
    for group in optimizer.param_groups:
        v = lr * group["lr_scale"] if "lr_scale" in group else lr
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(v)
        else:
            group["lr"] = v


# lr tensor -> the steps whose graphs may read it (weakly: a step or tensor dropped is forgotten)
_READ_BY_GRAPHS = WeakIdKeyDictionary()


def _read_by_graphs(t: torch.Tensor) -> bool:
    return any(step.captured for step in _READ_BY_GRAPHS.get(t, ()))


def own_lr_per_scale(optimizer: torch.optim.Optimizer) -> None:
    """torch.optim gives every group the same tensor when the default lr is a tensor: groups of the first
    sharer's ``lr_scale`` keep sharing it (a caller writing it steers them all), each group of another scale
    gets its own copy (else the last group's scaled value would be every group's). A tensor a captured step's
    graphs read is never replaced: groups sharing one that no longer agree on lr_scale are a ValueError,
    nothing changed."""
    first, split = {}, []
    for i, group in enumerate(optimizer.param_groups):
        t, scale = group["lr"], group.get("lr_scale", 1.0)
        if isinstance(t, torch.Tensor):
            j = first.setdefault(id(t), i)
            if optimizer.param_groups[j].get("lr_scale", 1.0) != scale:
                split.append((j, i))
    for j, i in split:
        if _read_by_graphs(optimizer.param_groups[i]["lr"]):
            scales = [optimizer.param_groups[k].get("lr_scale", 1.0) for k in (j, i)]
            raise ValueError(f"param groups {j} and {i} share one lr tensor, which a captured step's graphs read, "
                             f"but not one lr_scale ({scales[0]}, {scales[1]}): set lr_scale before the step's "
                             "first call")
    for _, i in split:
        group = optimizer.param_groups[i]
        group["lr"] = group["lr"].detach().clone()


def mark_read_by_graphs(optimizer: torch.optim.Optimizer, step) -> None:
    """Each group's lr tensor is read by ``step``'s graphs (while ``step`` lives and is captured; several
    steps on one optimizer each count): `own_lr_per_scale` never replaces it."""
    for group in optimizer.param_groups:
        steps = _READ_BY_GRAPHS.get(group["lr"])
        if steps is None:
            steps = _READ_BY_GRAPHS[group["lr"]] = weakref.WeakSet()
        steps.add(step)
