"""The pre-training loop behind ``maefast train`` (see ``maefast.train.train``)."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

from . import checkpoint as ckpt_lib
from . import distributed as dist_lib
from .config import DTYPES, TrainConfig, resolve_config
from .data import ImageFolderDataset, ResumableDistributedSampler, SyntheticDataset, collate
from .schedule import adjust_learning_rate, decay_split, scaled_lr


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def model_accepts_impl() -> bool:
    """Whether this build's model constructor takes ``impl=`` (added by the kernels work)."""
    from .. import models

    for fn in (models.create_model, models.MaskedAutoencoderViT.__init__):
        if "impl" in inspect.signature(fn).parameters:
            return True
    return False


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, dict]:
    """The MAE of ``cfg.model`` at ``cfg.input_size``; returns (model, constructor kwargs to record)."""
    from ..models import create_model

    kwargs = {"img_size": cfg.input_size, "norm_pix_loss": cfg.norm_pix_loss}
    extra = {}
    if model_accepts_impl():
        from .config import FUSED

        extra.update(impl=cfg.impl, fused=FUSED[cfg.fused], grad_checkpointing=cfg.grad_checkpointing)
    elif cfg.impl not in ("auto", "reference"):
        raise ValueError(f"--impl {cfg.impl}: the model in this maefast build has no impl= option yet "
                         "(only the reference PyTorch path); use --impl auto")
    return create_model(cfg.model, **kwargs, **extra), kwargs


def forward_kwargs(model: torch.nn.Module) -> dict:
    """``return_pred=False`` when the model supports it (the fused path then skips the head on the
    visible rows: training needs only the loss)."""
    if "return_pred" in inspect.signature(model.forward).parameters:
        return {"return_pred": False}
    return {}


def build_dataset(cfg: TrainConfig, num_patches: int):
    if cfg.data == "synthetic":
        return SyntheticDataset(cfg.synthetic_size, cfg.input_size, num_patches, seed=cfg.seed, decode=cfg.decode)
    return ImageFolderDataset(cfg.data, cfg.input_size, num_patches, seed=cfg.seed, decode=cfg.decode)


class _Log:
    """Rank-0 JSONL writer (append; one JSON object per line)."""

    def __init__(self, path: str | None):
        self.path = path

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _say(info, msg: str) -> None:
    if info.is_main:
        print(f"maefast train: {msg}", file=sys.stderr, flush=True)


def _full_state(model, optimizer, fsdp: bool):
    """(model state, optimizer state) on every rank (FSDP: gathered, full on rank 0 only)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    return model.state_dict(), optimizer.state_dict()


def _load_state(model, optimizer, ckpt: dict, fsdp: bool) -> None:
    if ckpt.get("optimizer_format", "torch") != ("fqn" if fsdp else "torch"):
        raise ValueError("--resume: the checkpoint was written " + ("with" if not fsdp else "without")
                         + " --fsdp; resume it the same way")
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, ckpt["model"], options=opts)
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=opts)
        return
    model.load_state_dict(ckpt["model"])
    # the checkpoint's implementation flags are how *that* run stepped; keep this run's (a checkpoint
    # of an eager run resumed with --cuda-graph must come back capturable, and the other way round)
    sd = dict(ckpt["optimizer"])
    sd["param_groups"] = [dict(g) for g in sd["param_groups"]]
    for g, mine in zip(sd["param_groups"], optimizer.param_groups):
        for key in ("capturable", "fused", "foreach"):
            if key in mine:
                g[key] = mine[key]
    optimizer.load_state_dict(sd)


def train(config: TrainConfig | dict | None = None, **overrides) -> dict:
    """Pre-trains an MAE with the paper's recipe; the Python form of ``maefast train``.

    Args:
        config: a ``TrainConfig`` (or a dict of its fields); ``overrides`` replace fields, e.g.
            ``train(data="synthetic", model="mae_vit_tiny_test", epochs=1, batch_size=8)``.
            Under torchrun each process calls this; the process group is joined from the env.

    Returns:
        dict with ``output_dir``, ``checkpoint`` (checkpoint-last.pth), ``encoder`` (the
        ``mae_pretrain_*.pth`` export or None), ``loss_curve``, ``log``, ``final_loss`` (mean
        loss of the last log window), ``img_per_s`` (global, whole run), ``steps`` (optimizer
        steps done in total), ``epoch``, ``world_size``, ``skipped_files``, ``config`` (resolved)
        and ``model`` (the trained module, unwrapped; sharded DTensors under FSDP). Files are
        written by rank 0 only.
    """
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig(**config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    info = dist_lib.init_distributed(config.device)
    ok = False
    try:
        cfg = resolve_config(config, world_size=info.world_size, cuda=info.device.type == "cuda")
        result = _run(cfg, info)
        ok = True
        return result
    finally:
        dist_lib.cleanup(info, sync=ok)


def _run(cfg: TrainConfig, info) -> dict:
    device = info.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official main_pretrain.py (the patch-embed conv)
    for note in cfg.notes:
        _say(info, note)
    # Same initial weights on every rank (FSDP does not broadcast them), then per-rank streams.
    _seed_all(cfg.seed)
    model, model_kwargs = build_model(cfg)
    model.to(device)
    _seed_all(cfg.seed + info.rank)
    num_patches = model.patch_embed.num_patches
    dataset = build_dataset(cfg, num_patches)

    sampler = ResumableDistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=cfg.seed)
    batches_per_epoch = sampler.num_samples // cfg.batch_size
    steps_per_epoch = batches_per_epoch // cfg.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images make no optimizer step: each step needs batch_size x accum_iter x "
                         f"world = {cfg.batch_size * cfg.accum_iter * info.world_size} images per step")
    batches_used = steps_per_epoch * cfg.accum_iter  # a trailing partial accumulation is dropped
    eff_batch = cfg.batch_size * cfg.accum_iter * info.world_size
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, eff_batch)
    total_steps = steps_per_epoch * cfg.epochs

    decayed = set(decay_split(model, cfg.weight_decay)[0])
    wrapped = dist_lib.wrap_model(model, info, fsdp=cfg.fsdp)
    fsdp = cfg.fsdp and info.distributed
    # groups by the names decided on the bare model (wrappers add prefixes / flatten)
    groups = [{"params": [], "weight_decay": 0.0}, {"params": [], "weight_decay": cfg.weight_decay}]
    for name, p in wrapped.named_parameters():
        if p.requires_grad:
            clean = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            clean = clean.removeprefix("module.")
            groups[1 if clean in decayed else 0]["params"].append(p)
    if cfg.cuda_graph:
        if info.distributed:
            raise ValueError("--cuda-graph runs on one GPU (not under torchrun with several processes)")
        opt_kw = {"capturable": True, "fused": True}  # step counts and lr on the device: the graph captures them
    else:
        opt_kw = {"fused": True} if device.type == "cuda" and not fsdp else {}
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **opt_kw)
    amp_dtype = DTYPES[cfg.dtype]
    use_amp = amp_dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    runner = torch.compile(wrapped) if cfg.compile else wrapped

    start_epoch, start_batch, step = 0, 0, 0
    if cfg.resume:
        ck = ckpt_lib.load_checkpoint(cfg.resume)
        if ck.get("model_name") not in (None, cfg.model) or ck.get("model_kwargs", model_kwargs) != model_kwargs:
            raise ValueError(f"--resume {cfg.resume}: checkpoint is {ck.get('model_name')} {ck.get('model_kwargs')}, "
                             f"this run is {cfg.model} {model_kwargs}")
        _load_state(wrapped if fsdp else model, optimizer, ck, fsdp)
        if "scaler" in ck and ck["scaler"]:
            scaler.load_state_dict(ck["scaler"])
        start_epoch, start_batch, step = int(ck["epoch"]), int(ck["batch"]), int(ck["step"])
        old = ck.get("schedule", {})
        now = {"epochs": cfg.epochs, "lr": lr, "warmup_epochs": cfg.warmup_epochs, "steps_per_epoch": steps_per_epoch,
               "world_size": info.world_size, "batch_size": cfg.batch_size, "accum_iter": cfg.accum_iter}
        changed = {k: (old[k], v) for k, v in now.items() if k in old and old[k] != v}
        if changed:
            _say(info, f"warning: resuming with a different setup {changed}: the continuation is not exact")
        if old.get("world_size", info.world_size) != info.world_size or old.get("batch_size") != cfg.batch_size:
            seen = start_batch * old.get("batch_size", cfg.batch_size) * old.get("world_size", info.world_size)
            start_batch = min(seen // (cfg.batch_size * info.world_size), batches_used)
            start_batch -= start_batch % cfg.accum_iter
        rngs = ck.get("rng") or []
        if len(rngs) == info.world_size:
            ckpt_lib.set_rng_state(rngs[info.rank])
        if start_batch >= batches_used:
            start_epoch, start_batch = start_epoch + 1, 0
        _say(info, f"resumed from {cfg.resume}: epoch {start_epoch}, batch {start_batch}, step {step}")
        del ck

    if info.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
    log = _Log(os.path.join(cfg.output_dir, "log.jsonl") if info.is_main else None)
    step_log = _Log(os.path.join(cfg.output_dir, "steps.jsonl") if info.is_main else None)
    fsdp_desc = f" (FSDP, {'per block' if dist_lib.fsdp_per_block(model) else 'root only'})"
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _say(info, f"{cfg.model} ({n_params / 1e6:.1f}M trainable) at {cfg.input_size}px on {info.world_size} x "
               f"{device.type}{fsdp_desc if fsdp else ' (DDP)' if info.distributed else ''}, {cfg.dtype}, "
               f"impl {getattr(model, 'impl', 'reference')}; "
               f"{len(dataset)} images, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs; effective batch "
               f"{eff_batch}, lr {lr:.3g} (blr {cfg.blr:g}), warm-up {cfg.warmup_epochs:g} epochs")

    ckpt_path = os.path.join(cfg.output_dir, ckpt_lib.CHECKPOINT_NAME)

    def save(epoch_next: int, batch_next: int, keep: str | None = None) -> None:
        model_sd, optim_sd = _full_state(wrapped if fsdp else model, optimizer, fsdp)
        for g in optim_sd.get("param_groups", []):  # --cuda-graph keeps lr as a device tensor: save a float
            if isinstance(g.get("lr"), torch.Tensor):
                g["lr"] = float(g["lr"])
        rngs = dist_lib.all_gather_object(ckpt_lib.rng_state(), info)
        if info.is_main:
            state = {"model": model_sd, "optimizer": optim_sd, "optimizer_format": "fqn" if fsdp else "torch",
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "epoch": epoch_next, "batch": batch_next, "step": step, "rng": rngs,
                     "model_name": cfg.model, "model_kwargs": model_kwargs,
                     "schedule": {"epochs": cfg.epochs, "lr": lr, "warmup_epochs": cfg.warmup_epochs,
                                  "steps_per_epoch": steps_per_epoch, "world_size": info.world_size,
                                  "batch_size": cfg.batch_size, "accum_iter": cfg.accum_iter},
                     "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "notes"},
                     "format_version": ckpt_lib.FORMAT_VERSION}
            ckpt_lib.atomic_save(state, ckpt_path)
            if keep:
                ckpt_lib.atomic_save(state, os.path.join(cfg.output_dir, keep))
        dist_lib.barrier(info)

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers > 0 else None)
    bar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=min(step, total_steps), unit="step", dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)

    ddp = wrapped if info.distributed and not fsdp else None
    graph_step = None  # --cuda-graph: built on the first batch (maefast.graphs.CUDAGraphTrainStep)
    fwd_kwargs = forward_kwargs(model)
    final_loss, skipped_total, run_images, run_time = float("nan"), 0, 0, 0.0
    windows = []  # (images, seconds) per log window, for the steady-state speed
    stop = False
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break  # resumed at (or past) --max-steps: nothing left to do
        sampler.set_epoch(epoch)
        first = start_batch if epoch == start_epoch else 0
        sampler.set_start(first * cfg.batch_size)
        runner.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        win_sum = torch.zeros((), dtype=torch.float64, device=device)
        win_n, ep_n, ep_images, ep_bad, bad_names = 0, 0, 0, 0, []
        t_epoch = t_win = time.perf_counter()
        win_images, lr_now, b = 0, 0.0, first
        if bar is not None:
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
        for batch in loader:
            if b >= batches_used:
                break
            if b % cfg.accum_iter == 0:
                lr_now = adjust_learning_rate(optimizer, epoch + b / batches_used, lr, cfg.warmup_epochs, cfg.epochs,
                                              cfg.min_lr)
            if batch["bad"]:
                ep_bad += len(batch["bad"])
                bad_names += batch["bad"][: max(0, 5 - len(bad_names))]
            images, noise, weight = batch["images"], batch["noise"], 1.0
            if images is None:  # every file of this batch was unreadable: a zero-weight step keeps ranks in step
                images = torch.zeros(1, 3, cfg.input_size, cfg.input_size)
                noise, weight = torch.rand(1, num_patches), 0.0
            images = images.to(device, non_blocking=True)
            noise = noise.to(device, non_blocking=True)
            if cfg.cuda_graph and (weight == 0.0 or images.shape[0] != cfg.batch_size):
                # unreadable files left this batch short (or empty): the captured step takes full batches
                # only, and one process has nobody to keep in step, so the batch is skipped
                b += 1
                continue
            ep_images += int(weight) * images.shape[0]
            win_images += int(weight) * images.shape[0]
            boundary = (b + 1) % cfg.accum_iter == 0
            if ddp is not None and not boundary:
                sync = ddp.no_sync()
            else:
                sync = contextlib.nullcontext()
            if fsdp and hasattr(wrapped, "set_requires_gradient_sync"):
                wrapped.set_requires_gradient_sync(boundary)
            if cfg.cuda_graph:
                if graph_step is None:
                    from ..graphs import CUDAGraphTrainStep

                    graph_step = CUDAGraphTrainStep(model, optimizer, images, mask_ratio=cfg.mask_ratio,
                                                    autocast_dtype=amp_dtype if use_amp else None,
                                                    example_noise=noise)
                loss = graph_step(images, noise)  # forward, backward and AdamW, replayed
            else:
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        loss, _, _ = runner(images, mask_ratio=cfg.mask_ratio, noise=noise, **fwd_kwargs)
                    scaler.scale(loss * (weight / cfg.accum_iter)).backward()
            loss_d = loss.detach().double() * weight
            loss_sum += loss_d
            win_sum += loss_d
            ep_n += int(weight)
            win_n += int(weight)
            b += 1
            if not boundary:
                continue
            if not cfg.cuda_graph:
                if cfg.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            if bar is not None:
                bar.update(1)
            last_of_run = b >= batches_used and epoch == cfg.epochs - 1
            hit_max = cfg.max_steps is not None and step >= cfg.max_steps
            if step % cfg.log_every == 0 or last_of_run or hit_max or b >= batches_used:
                s, n, imgs = dist_lib.all_reduce_sum([win_sum.item(), win_n, win_images], info)
                now = time.perf_counter()
                ips = imgs / max(now - t_win, 1e-9)
                windows.append((imgs, now - t_win))
                if n > 0:
                    final_loss = s / n
                    if not math.isfinite(final_loss):
                        raise FloatingPointError(f"loss is {final_loss} at step {step} (epoch {epoch}); with "
                                                 "--dtype float16 try bfloat16, or lower --blr")
                    step_log.write({"step": step, "epoch": epoch + b / batches_used, "loss": final_loss, "lr": lr_now,
                                    "img_per_s": ips})
                    if bar is not None:
                        bar.set_postfix(loss=f"{final_loss:.4f}", lr=f"{lr_now:.2e}", img_s=f"{ips:.0f}",
                                        refresh=False)
                win_sum.zero_()
                win_n, win_images, t_win = 0, 0, now
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 and not hit_max:
                save(epoch, b)
            if hit_max:
                stop = True
                break
        # -- end of epoch (or of the run at --max-steps) ------------------------------------------
        ep_time = time.perf_counter() - t_epoch
        s, n, imgs, bad = dist_lib.all_reduce_sum([loss_sum.item(), ep_n, ep_images, ep_bad], info)
        bad_all = [x for names in dist_lib.all_gather_object(bad_names, info) for x in names][:10]
        skipped_total += int(bad)
        run_images += int(imgs)
        run_time += ep_time
        if b > first and n == 0:
            raise RuntimeError(f"no readable image in epoch {epoch} ({int(bad)} files failed to load), e.g. {bad_all}")
        if bad:
            _say(info, f"epoch {epoch}: skipped {int(bad)} unreadable image file(s), e.g. {bad_all[:3]}")
        finished = b >= batches_used
        record = {"epoch": epoch, "step": step, "train_loss": s / max(n, 1), "train_lr": lr_now,
                  "images": int(imgs), "time_s": round(ep_time, 3), "img_per_s": imgs / max(ep_time, 1e-9),
                  "skipped_files": int(bad), "skipped_examples": bad_all, "complete": finished}
        log.write(record)
        keep = (f"checkpoint-{epoch:04d}.pth" if finished and cfg.keep_every_epochs
                and (epoch + 1) % cfg.keep_every_epochs == 0 else None)
        save(epoch + 1 if finished else epoch, 0 if finished else b, keep)
        if info.is_main and cfg.plot:
            from .plot import plot_loss_curve

            plot_loss_curve(cfg.output_dir, title=f"maefast train: {cfg.model} {cfg.input_size}px, "
                                                  f"effective batch {eff_batch}")
        if stop:
            break
    if bar is not None:
        bar.close()

    encoder = None
    if cfg.export:
        model_sd, _ = (_full_state(wrapped, optimizer, True) if fsdp else (model.state_dict(), None))
        if info.is_main:
            encoder = ckpt_lib.export_encoder(model_sd, cfg.output_dir, cfg.model)
        dist_lib.barrier(info)
    img_per_s = run_images / max(run_time, 1e-9)
    steady = windows[1:] if len(windows) > 1 else windows  # the first window holds start-up and warm-up
    steady_ips = sum(w[0] for w in steady) / max(sum(w[1] for w in steady), 1e-9) if steady else float("nan")
    result = {"output_dir": cfg.output_dir, "checkpoint": ckpt_path, "encoder": encoder,
              "loss_curve": os.path.join(cfg.output_dir, "loss_curve.png") if cfg.plot else None,
              "log": os.path.join(cfg.output_dir, "log.jsonl"), "final_loss": final_loss, "img_per_s": img_per_s,
              "img_per_s_steady": steady_ips,
              "steps": step, "epoch": epoch, "world_size": info.world_size, "skipped_files": skipped_total,
              "config": cfg, "model": model}
    _say(info, f"done: {step} steps, last loss {final_loss:.4f}, {img_per_s:.1f} img/s over the run, "
               f"{steady_ips:.1f} img/s after the first log window ({info.world_size} x {device.type}); "
               f"checkpoint {ckpt_path}"
               + (f", encoder {encoder}" if encoder else ""))
    return result
