"""What a run is built from: the model, the data, the optimizer, and the checks on them that must
pass before anything is created (an unreadable image folder, a checkpoint that cannot resume)."""
from __future__ import annotations

import random

import numpy as np
import torch

from ..graphs import message_line
from .config import FUSED, IMAGE_DTYPES, TrainConfig
from .data import ImageFolderDataset, SyntheticDataset
from .schedule import BETAS, decay_split

PROBE_FILES = 16  # images tried before the first step: a folder where none of them reads is refused


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, dict]:
    """The MAE of ``cfg.model`` at ``cfg.input_size``; returns (model, constructor kwargs to record)."""
    from ..models import create_model

    kwargs = {"img_size": cfg.input_size, "norm_pix_loss": cfg.norm_pix_loss}
    model = create_model(cfg.model, **kwargs, impl=cfg.impl, fused=FUSED[cfg.fused],
                         grad_checkpointing=cfg.grad_checkpointing)
    return model, kwargs


# torch.compile's backend for --compile (None: torch's default, Inductor); tests set "aot_eager", which
# traces the same graphs without Inductor's minutes of code generation on a small CPU
COMPILE_BACKEND: str | None = None


# what --compile does under several processes (said at the start)
COMPILE_WRAPPED = {
    "DDP": "--compile under DDP: torch traces DDP's forward with graph breaks by design; the model's graph is "
           "split at DDP's gradient buckets (torch's DDPOptimizer), so the all-reduce overlaps the backward",
    "FSDP": "--compile under FSDP: torch does not trace FSDP's hooks; the model compiles as the graphs between "
            "them (one per sharded block)"}


def compile_model(model: torch.nn.Module, fullgraph: bool = True) -> torch.nn.Module:
    """``torch.compile(model, fullgraph=True, dynamic=False)``: maefast's ops are opaque custom ops
    inside one graph, and a batch has one shape (one process skips a batch left short by unreadable files;
    under DDP/FSDP each new short size compiles its own graph, up to torch's recompile limit, then runs
    eagerly). ``fullgraph=False`` is the fallback for a model that breaks the graph (see
    ``fullgraph_failure``) and what DDP/FSDP get."""
    kw = {"backend": COMPILE_BACKEND} if COMPILE_BACKEND else {}
    return torch.compile(model, fullgraph=fullgraph, dynamic=False, **kw)


def fullgraph_failure(exc: BaseException) -> str | None:
    """The one-line reason when ``exc`` is torch.compile refusing a graph break under fullgraph=True
    (dynamo's ``Unsupported``, also as the cause of another error), else None."""
    try:
        from torch._dynamo.exc import Unsupported
    except ImportError:  # pragma: no cover - a torch without dynamo compiles nothing
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Unsupported):
            return message_line(exc, 160)
        exc = exc.__cause__ or exc.__context__
    return None


def build_dataset(cfg: TrainConfig, num_patches: int):
    kw = dict(seed=cfg.seed, decode=cfg.decode, dtype=IMAGE_DTYPES[cfg.image_dtype])
    if cfg.data == "synthetic":
        return SyntheticDataset(cfg.synthetic_size, cfg.input_size, num_patches, **kw)
    dataset = ImageFolderDataset(cfg.data, cfg.input_size, num_patches, **kw)
    probe_readable(dataset)
    return dataset


def probe_readable(dataset, tries: int = PROBE_FILES) -> None:
    """ValueError when none of ``tries`` files spread over the folder decodes (a folder of unreadable
    files would otherwise fail only at the end of the first epoch). Some unreadable files are fine:
    they are skipped and counted while training."""
    n = len(dataset)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, min(tries, n))})
    errors = []
    for i in picks:
        try:
            dataset.load(i)
            return
        except Exception as exc:  # the same net as the dataset's own: any decode failure is "unreadable"
            errors.append(f"{dataset.name(i)}: {type(exc).__name__}")
    every = "any of its" if len(picks) == n else f"any of the {len(picks)} files tried of its"
    raise ValueError(f"--data {dataset.root!r}: cannot read {every} {n} image files as an image (e.g. {errors[0]})")


def build_optimizer(model: torch.nn.Module, wrapped: torch.nn.Module, cfg: TrainConfig, lr: float,
                    **kwargs) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) over ``wrapped``'s parameters, grouped by the names decided on the bare
    ``model`` (wrappers add prefixes / flatten): no decay on biases and 1-D tensors."""
    decayed = set(decay_split(model, cfg.weight_decay)[0])
    groups = [{"params": [], "weight_decay": 0.0}, {"params": [], "weight_decay": cfg.weight_decay}]
    for name, p in wrapped.named_parameters():
        if p.requires_grad:
            clean = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            clean = clean.removeprefix("module.")
            groups[1 if clean in decayed else 0]["params"].append(p)
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, **kwargs)


def checkpoint_bytes(model: torch.nn.Module, save: bool = True, export: bool = True) -> int:
    """Disk space one checkpoint (fp32 weights + AdamW's two moments; ``save``) and the encoder
    export (the weights again, an upper bound; ``export``) take, with 5% and 1 MiB of headroom: what
    must be free before the first step."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return int(1.05 * ((weights + 2 * trainable if save else 0) + (weights if export else 0))) + 2 ** 20
