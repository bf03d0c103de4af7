"""The pre-training loop behind ``maefast train`` (see ``maefast.train.train``).

A run goes: plan (options, checkpoint, model, data: checked on every rank, nothing created) ->
folder (created, locked, checked for space) -> training state (wrapped, restored) -> steps. Every
failure before the first step stops every rank with one message (``distributed.agreed``); after it,
ranks stop together at a step boundary (``control.StopControl``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import torch

from ..graphs import first_line
from . import checkpoint as ckpt_lib
from . import distributed as dist_lib
from .config import DTYPES, IMAGE_DTYPES, INTERNAL_FIELDS, TrainConfig, as_config, check_dist_timeout, resolve_config
from .control import ERROR, EXIT_CODES, REASONS, StopControl, ignore_stop_signals_in_worker
from .data import ResumableDistributedSampler, collate
from .errors import Interrupted, RunError
from .feed import DeviceFeed, describe_batches, stop_workers
from .resume import reconcile, resume_source, start_position
from .rundir import JsonlLog, RunFolder, check_folder, say
from .schedule import adjust_learning_rate, scaled_lr
from .setup import (COMPILE_WRAPPED, build_dataset, build_model, build_optimizer, checkpoint_bytes, compile_model,
                    fullgraph_failure, seed_all)
from .state import EpochStats, full_model_state, restore_states, save_checkpoint

# kept importable from here (older callers and tests)
__all__ = ["train", "build_model"]
# The process group's timeout is --dist-timeout + this: the heartbeat (distributed.Heartbeat) fires
# first and names the rank that stopped answering; the group's timeout is the backstop.
GROUP_TIMEOUT_MARGIN_S = 30


def train(config: TrainConfig | dict | None = None, **overrides) -> dict:
    """Pre-trains an MAE with the paper's recipe; the Python form of ``maefast train``.

    Args:
        config: a ``TrainConfig`` (or a dict of its fields); ``overrides`` replace fields, e.g.
            ``train(data="synthetic", model="mae_vit_tiny_test", epochs=1, batch_size=8)``.
            Under torchrun each process calls this; the process group is joined from the env.

    Returns:
        dict with ``output_dir``, ``checkpoint`` (checkpoint-last.pth; None with --no-save),
        ``encoder`` (the ``mae_pretrain_*.pth`` export or None), ``loss_curve``, ``log``,
        ``final_loss`` (mean loss of the last log window), ``img_per_s`` (global, whole run),
        ``steps`` (optimizer steps done in total), ``epoch``, ``world_size``, ``skipped_files``,
        ``config`` (resolved), ``model`` (the trained module, unwrapped; sharded DTensors under
        FSDP) and ``train_step`` (``captured``, ``eager_reason``: how the `maefast.TrainStep` ran;
        ``compiled``: "fullgraph", "graph breaks" or None). Files are written by rank 0 only.

    Raises:
        ValueError (and FileNotFoundError & co.): a bad option or input, before anything is created.
        RunError: the run cannot start or go on (e.g. no space); ``Interrupted`` (a RunError) after
        SIGINT/SIGTERM, once the checkpoint of the step reached is saved.
    """
    config = as_config(config, overrides)
    check_dist_timeout(config.dist_timeout)  # before the process group is built with it
    # the group's own timeout a little after the heartbeat's: the heartbeat names the silent rank
    info = dist_lib.init_distributed(config.device, timeout_s=config.dist_timeout + GROUP_TIMEOUT_MARGIN_S)
    trainer = _Trainer(config, info)
    heartbeat = dist_lib.Heartbeat(info, config.dist_timeout)
    heartbeat.start()
    ok = False
    try:
        with trainer.ctl:
            result = trainer.run()
        ok = True
        return result
    except Interrupted:
        ok = True  # every rank stopped at the same step, after the same collectives
        raise
    except RuntimeError as exc:
        lost = dist_lib.lost_rank_error(exc, info, config.dist_timeout, GROUP_TIMEOUT_MARGIN_S)
        if lost is not None:
            raise lost from exc
        raise
    finally:
        heartbeat.stop()
        trainer.close()
        dist_lib.cleanup(info, sync=ok)


class _Trainer:
    def __init__(self, config: TrainConfig, info):
        self.config, self.info = config, info
        self.ctl = StopControl(info, timeout_s=config.dist_timeout + GROUP_TIMEOUT_MARGIN_S)
        self.folder: RunFolder | None = None
        self.pending: RunError | None = None  # a rank-local failure, raised once all ranks agree to stop

    def say(self, msg: str) -> None:
        say(self.info.is_main, msg)

    def close(self) -> None:
        if self.folder is not None:
            self.folder.close()

    # -- before the first step ------------------------------------------------------------------
    def run(self) -> dict:
        # every option is checked in _plan (validate_config), before the folder is touched: an --overwrite
        # that then failed on a bad option had already deleted the old run
        self._node = dist_lib.node_share_of_run(self.info)  # (a collective: outside `agreed`'s error exchange)
        dist_lib.agreed(self._plan, self.info)
        dist_lib.agreed(self._same_start, self.info)
        dist_lib.agreed(self._prepare_folder, self.info)  # takes the folder's lock before the restore reads
        dist_lib.agreed(self._build_state, self.info)
        self.ctl.setup()
        try:
            self._steps()
        finally:
            stop_workers(getattr(self, "_loader", None))
            self._loader = None
        return self._finish()

    def _plan(self) -> None:
        """Options, checkpoint, model and data, checked on every rank; nothing is created."""
        info = self.info
        cfg = self.config
        source = resume_source(cfg)
        ck, notes, self.changed = None, [], {}
        if source is not None:
            ck = ckpt_lib.load_checkpoint(source, states=False)  # a missing sharded folder raises here
            ckpt_lib.check_resumable(ck, source)
            cfg, notes, self.changed = reconcile(cfg, ck, source, info.world_size)
        cfg = resolve_config(cfg, world_size=info.world_size, cuda=info.device.type == "cuda",
                             node=self._node)
        cfg.notes += notes
        if cfg.resume == "auto":
            cfg.notes.append("--resume auto: " + (f"continuing from {source}" if source else
                                                  "no checkpoint, fresh start"))
        if info.is_main:
            check_folder(cfg.output_dir, cfg.resume, cfg.overwrite)
        # Same initial weights on every rank (FSDP does not broadcast them), then per-rank streams.
        seed_all(cfg.seed)
        model, model_kwargs = build_model(cfg)
        if ck is not None:
            ckpt_lib.check_states_fit(ck, source, model)
        model.to(info.device)
        seed_all(cfg.seed + info.rank)
        dataset = build_dataset(cfg, model.patch_embed.num_patches)
        files = dataset.fingerprint()  # (the file names: a resume on other files is refused)
        global_batch = cfg.batch_size * cfg.accum_iter * info.world_size
        steps_per_epoch = len(dataset) // global_batch
        if steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} images make no optimizer step: each step needs batch_size x "
                             f"accum_iter x world = {global_batch} images")
        epoch, samples, step = 0, 0, 0
        if ck is not None:
            epoch, samples, step = start_position(ck, source, cfg, model_kwargs, len(dataset), global_batch, files)
        self.cfg, self.ck, self.source = cfg, ck, source
        self.source_record = (ck or {}).get("log_record")  # (self.ck is dropped once its tensors are restored)
        self.model, self.model_kwargs, self.dataset, self.files = model, model_kwargs, dataset, files
        self.global_batch, self.steps_per_epoch = global_batch, steps_per_epoch
        self.start_epoch, self.start_samples, self.step = epoch, samples, step

    def _same_start(self) -> None:
        """Every rank continues from the same checkpoint and position (collective). Each rank looks for
        --resume auto's checkpoint itself: without a file system they all see, rank 0 would resume while
        the others started fresh (DDP would hand them rank 0's weights, not its optimizer or position). And
        every rank lists the same images (fingerprint), so index i is one file on every rank."""
        mine = (self.source, self.start_epoch, self.start_samples, self.step, len(self.dataset), self.files)
        starts = dist_lib.all_gather_object(mine, self.info)
        odd = [r for r, start in enumerate(starts) if start[:4] != starts[0][:4]]
        if odd:
            def where(start):
                return f"{start[0]} (epoch {start[1]}, step {start[3]})" if start[0] else "a fresh start"

            raise ValueError(f"the ranks disagree on where the run starts: rank 0 sees {where(starts[0])}, rank "
                             f"{odd[0]} {where(starts[odd[0]])}; every rank must see --output-dir (and --resume) on "
                             "one shared file system")
        # each rank lists --data itself: another node's copy trained other files in silence, or hung in a collective
        odd = [r for r, start in enumerate(starts) if start[4:] != starts[0][4:]]
        if odd:
            n0, n = starts[0][4], starts[odd[0]][4]
            raise ValueError(f"the ranks see other data in --data {self.cfg.data}: rank 0 lists {n0} images, rank "
                             f"{odd[0]} {n if n != n0 else 'as many with other file names'}; every rank must see "
                             "the same folder")

    def _prepare_folder(self) -> None:
        cfg = self.cfg
        self.folder = RunFolder(cfg.output_dir, self.info.is_main)
        self.folder.prepare(checkpoint_bytes(self.model, save=cfg.save, export=cfg.export), overwrite=cfg.overwrite,
                            keep=(self.source,) if self.source else (),
                            trim_to_step=self.step if cfg.resume is not None else None,
                            last_record=self.source_record, resume_epoch=self.start_epoch)

    def _build_state(self) -> None:
        """Wraps the model (DDP/FSDP), builds the optimizer and restores the checkpoint's state."""
        cfg, info, model = self.cfg, self.info, self.model
        self.lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, self.global_batch)
        self.wrapped = dist_lib.wrap_model(model, info, fsdp=cfg.fsdp)
        self.fsdp = cfg.fsdp and info.distributed
        opt_kw = {}
        if info.device.type == "cuda" and not self.fsdp:
            opt_kw["fused"] = True  # one kernel; it also takes the fp16 GradScaler on the device
            if cfg.cuda_graph != "off" and not info.distributed:
                opt_kw["capturable"] = True  # step counts and lrs on the device: a captured step replays them
        self.optimizer = build_optimizer(model, self.wrapped, cfg, self.lr, **opt_kw)
        self.amp_dtype = DTYPES[cfg.dtype]
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp_dtype == torch.float16)
        self.carry = EpochStats()
        self.history = []
        if self.ck is not None:
            self._restore()
        # DDP's forward and FSDP's hooks are graph breaks by torch's design: a fullgraph try always failed
        # (and a failed FSDP forward left its blocks' parameters gathered: the retry was refused)
        self.fullgraph = cfg.compile and not info.distributed
        if cfg.compile and info.distributed:
            cfg.notes.append(COMPILE_WRAPPED["FSDP" if self.fsdp else "DDP"])
        self.runner = compile_model(self.wrapped, fullgraph=self.fullgraph) if cfg.compile else self.wrapped
        self.train_step = self._make_step()  # after the restore: the step starts from the loaded state

    def _make_step(self):
        from ..step import TrainStep

        cfg = self.cfg
        # the masks come from the per-sample noise of the data (a function of seed, epoch and index: the
        # same at any world size), so TrainStep's own seed is never drawn from; given, it draws nothing
        # from torch's generator either (whose state the checkpoints carry)
        return TrainStep(self.runner, self.optimizer, dtype=self.amp_dtype, mask_ratio=cfg.mask_ratio,
                         scaler=self.scaler, accum_steps=cfg.accum_iter, clip_grad=cfg.clip_grad,
                         capture={"auto": "auto", "on": True, "off": False}[cfg.cuda_graph],
                         seed=cfg.seed % 2 ** 62)

    def _restore(self) -> None:
        """The checkpoint's model, optimizer, scaler, RNG and epoch state into this run."""
        cfg, info, model, ck = self.cfg, self.info, self.model, self.ck
        restore_states(ck, ckpt_lib.shards_dir(ck, self.source), model, self.wrapped, self.optimizer,
                       sharded=self.fsdp)
        for group in self.optimizer.param_groups:  # the recorded value by the resume contract; set, not assumed
            group["weight_decay"] = cfg.weight_decay if group["weight_decay"] else 0.0
        if ck.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ck["scaler"])
        rngs = ck.get("rng") or []
        if len(rngs) == info.world_size:
            ckpt_lib.set_rng_state(rngs[info.rank])
        if ck.get("epoch_stats") and self.start_samples > 0:
            self.carry = EpochStats.from_checkpoint(ck["epoch_stats"])
        self.say(f"resumed from {self.source}: epoch {self.start_epoch}, {self.start_samples} samples into it, "
                 f"step {self.step}")
        self.history = list(ck.get("history") or []) + [{"resumed_at_step": self.step, "world_size": info.world_size,
                                                          "changed": self.changed}]
        self.ck = None  # the tensors are in the model now

    # -- checkpoints ----------------------------------------------------------------------------
    def _save(self, epoch_next: int, samples_next: int, stats: EpochStats | None, keep: str | None = None,
              log_record: dict | None = None) -> None:
        """Checkpoint of the current step (collective): the position is the next sample to train on.
        Nothing with --no-save (on every rank alike: no collective either)."""
        cfg, info = self.cfg, self.info
        if not cfg.save:
            return
        rngs = dist_lib.all_gather_object(ckpt_lib.rng_state(), info)
        meta = {"scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "epoch": epoch_next, "samples": samples_next, "step": self.step, "rng": rngs,
                "epoch_stats": dataclasses.asdict(stats) if stats is not None and samples_next else None,
                "model_name": cfg.model, "model_kwargs": self.model_kwargs,
                "schedule": {"epochs": cfg.epochs, "lr": self.lr, "warmup_epochs": cfg.warmup_epochs,
                             "steps_per_epoch": self.steps_per_epoch, "global_batch": self.global_batch,
                             "dataset_size": len(self.dataset), "files": self.files, "world_size": info.world_size,
                             "batch_size": cfg.batch_size, "accum_iter": cfg.accum_iter},
                "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in INTERNAL_FIELDS},
                "history": self.history, "log_record": log_record, "format_version": ckpt_lib.FORMAT_VERSION}
        save_checkpoint(meta, cfg.output_dir, ckpt_lib.CHECKPOINT_NAME, self.wrapped, self.optimizer, info,
                        sharded=self.fsdp, keep=keep)

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.cfg.output_dir, ckpt_lib.CHECKPOINT_NAME)

    # -- the steps ------------------------------------------------------------------------------
    def _steps(self) -> None:
        cfg, info, device = self.cfg, self.info, self.info.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as the official main_pretrain.py (the patch-embed conv)
        for note in cfg.notes:
            self.say(note)
        model, optimizer = self.model, self.optimizer
        A, G = cfg.accum_iter, self.global_batch
        batches_used = self.steps_per_epoch * A  # micro-batches per rank and epoch
        total_steps = self.steps_per_epoch * cfg.epochs
        fsdp_desc = f" (FSDP, {'per block' if dist_lib.fsdp_per_block(model) else 'root only'})"
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.say(f"{cfg.model} ({n_params / 1e6:.1f}M trainable) at {cfg.input_size}px on {info.world_size} x "
                 f"{device.type}{fsdp_desc if self.fsdp else ' (DDP)' if info.distributed else ''}, {cfg.dtype}, "
                 f"impl {getattr(model, 'impl', 'reference')}; {len(self.dataset)} images, {self.steps_per_epoch} "
                 f"steps/epoch x {cfg.epochs} epochs; global batch {G}, lr {self.lr:.3g} (blr {cfg.blr:g}), "
                 f"warm-up {cfg.warmup_epochs:g} epochs")
        self.say(describe_batches(cfg.decode, cfg.image_dtype, cfg.input_size, device.type))
        log = JsonlLog(self.folder.join("log.jsonl") if info.is_main else None)
        step_log = JsonlLog(self.folder.join("steps.jsonl") if info.is_main else None)
        sampler = ResumableDistributedSampler(self.dataset, num_replicas=info.world_size, rank=info.rank,
                                              shuffle=True, seed=cfg.seed, global_batch=G)
        # the loader's own generator (seeded per epoch below) draws its workers' base seed: drawn from
        # torch's global one, a mid-epoch resume made one draw more than the run it continues
        loader_gen = torch.Generator()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
            generator=loader_gen,
            pin_memory=device.type == "cuda", drop_last=True, persistent_workers=cfg.workers > 0,
            prefetch_factor=4 if cfg.workers > 0 else None,
            worker_init_fn=ignore_stop_signals_in_worker if cfg.workers > 0 else None)
        self._loader = loader
        bar = None
        if info.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=min(self.step, total_steps), unit="step", dynamic_ncols=True,
                       mininterval=1.0, file=sys.stderr)
        self.final_loss, self.skipped_total, self.run_images, self.run_time = float("nan"), 0, 0, 0.0
        self.windows = []  # (images, seconds) per log window, for the steady-state speed
        self.epoch = self.start_epoch
        reason = self._agree()
        if reason is not None:  # a signal during the start: no step done, nothing to save
            raise Interrupted(f"interrupted by {self.ctl.describe(reason)} before the first step: no checkpoint "
                              "written", EXIT_CODES.get(reason, 2), quiet=not info.is_main)
        hit_max, start_step = False, self.step
        for epoch in range(self.start_epoch, cfg.epochs):
            self.epoch = epoch
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break  # resumed at (or past) --max-steps: nothing left to do
            first = self.start_samples // G * A if epoch == self.start_epoch else 0
            sampler.set_epoch(epoch)
            sampler.set_position(first // A * G)
            loader_gen.manual_seed(cfg.seed * 100003 + epoch)
            stats = self.carry if epoch == self.start_epoch else EpochStats()
            self.runner.train()
            self.train_step.zero_grad()
            loss_sum, win_sum = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(2))
            ep_images, ep_bad, bad_names, ep_short = 0, 0, [], 0
            t_epoch = t_win = time.perf_counter()
            win_images, lr_now, b, reason, saved_at = 0, 0.0, first, None, None
            if bar is not None:
                bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
            for batch in DeviceFeed(loader, device, decode=self.dataset.device_decode):
                if b >= batches_used:
                    break
                if b % A == 0:
                    lr_now = adjust_learning_rate(optimizer, epoch + b / batches_used, self.lr, cfg.warmup_epochs,
                                                  cfg.epochs, cfg.min_lr)
                if batch["bad"]:
                    ep_bad += len(batch["bad"])
                    bad_names += batch["bad"][: max(0, 5 - len(bad_names))]
                done, loss, n_img = self._micro_step(batch, b)
                b += 1
                if not done:  # a short batch the step takes no part of (one process)
                    ep_short += batch["images"] is not None  # (one of unreadable files only: no image lost)
                    continue
                if n_img:
                    loss_d = loss.detach().double() * n_img
                    loss_sum += loss_d
                    win_sum += loss_d
                    ep_images, win_images = ep_images + n_img, win_images + n_img
                if (b % A) != 0:
                    continue
                self.step += 1  # the step ran its optimizer update at this boundary
                if bar is not None:
                    bar.update(1)
                reason = self._agree()
                hit_max = cfg.max_steps is not None and self.step >= cfg.max_steps
                if (self.step % cfg.log_every == 0 or b >= batches_used or hit_max or reason is not None):
                    s, imgs = dist_lib.all_reduce_sum([win_sum.item(), win_images], info)
                    now = time.perf_counter()
                    ips = imgs / max(now - t_win, 1e-9)
                    self.windows.append((imgs, now - t_win))
                    if imgs > 0:
                        self.final_loss = s / imgs
                        self._check_loss(self.final_loss, epoch)
                        self._write(step_log, {"step": self.step, "epoch": epoch + b / batches_used,
                                               "loss": self.final_loss, "lr": lr_now, "img_per_s": ips})
                        if bar is not None:
                            bar.set_postfix(loss=f"{self.final_loss:.4f}", lr=f"{lr_now:.2e}", img_s=f"{ips:.0f}",
                                            refresh=False)
                    win_sum.zero_()
                    win_images, t_win = 0, now
                if reason is not None or hit_max:
                    break
                if cfg.save_every_steps and self.step % cfg.save_every_steps == 0 and b < batches_used:
                    partial = self._epoch_totals(stats, loss_sum, ep_images, ep_bad, bad_names, t_epoch)
                    # a NaN since the last log line: its weights (NaN in fp32/bf16) never replace the last good save
                    self._check_loss(partial.loss_sum, epoch, before_save=True)
                    self._save(epoch, b // A * G, partial)
                    # a stop asked for during the save stops on the checkpoint just written, not one step
                    # and one more checkpoint write later (torchrun's grace period may not hold both)
                    if (reason := self._agree()) is not None:
                        saved_at = self.step
                        break
            # -- end of the epoch, or of the run (--max-steps, a stop request) --------------------
            totals = self._epoch_totals(stats, loss_sum, ep_images, ep_bad, bad_names, t_epoch)
            ep_time = time.perf_counter() - t_epoch
            self.skipped_total += int(totals.bad - stats.bad)
            self.run_images += int(totals.images - stats.images)
            self.run_time += ep_time
            full_step = self._full_batches_only()
            if b > first and totals.images == 0 and ep_short:
                raise RunError(f"every batch of epoch {epoch} was left short by unreadable files ({int(totals.bad)}, "
                               f"e.g. {totals.bad_names[:3]}), and a {full_step} on one process takes full batches "
                               "only: remove the unreadable files, or run with " + " ".join(
                                   f for f, on in (("--cuda-graph off", "captured" in full_step),
                                                   ("--no-compile", cfg.compile)) if on), quiet=not info.is_main)
            if b > first and totals.images == 0:
                raise RunError(f"no readable image in epoch {epoch} ({int(totals.bad)} files failed to load, e.g. "
                               f"{totals.bad_names[:3]})", quiet=not info.is_main)
            if totals.bad > stats.bad:
                self.say(f"epoch {epoch}: skipped {int(totals.bad)} unreadable image file(s), e.g. "
                         f"{totals.bad_names[:3]}" + (f"; {ep_short} batch(es) they left short skipped whole (a "
                                                     f"{full_step} takes full batches only)" if ep_short else ""))
            finished = b >= batches_used
            keep = (f"checkpoint-{epoch:04d}.pth" if finished and cfg.keep_every_epochs
                    and (epoch + 1) % cfg.keep_every_epochs == 0 else None)
            record = {"epoch": epoch, "step": self.step, "train_loss": totals.loss_sum / max(totals.images, 1),
                      "train_lr": lr_now, "images": int(totals.images), "time_s": round(totals.time_s, 3),
                      "img_per_s": totals.images / max(totals.time_s, 1e-9), "skipped_files": int(totals.bad),
                      "skipped_examples": totals.bad_names, "complete": finished}
            # the checkpoint carries the record (a crash before the line below: the resume writes it)
            if saved_at != self.step:
                # a NaN since the last log line (an epoch whose last micro-batch a full-batch step skipped has none)
                self._check_loss(totals.loss_sum, epoch, before_save=True)
                self._save(epoch + 1 if finished else epoch, 0 if finished else b // A * G, totals, keep, record)
            # logged only once its checkpoint is written (if any): log.jsonl never claims a save that failed
            self._write(log, record)
            self._plot()
            if reason is None and finished and not hit_max and epoch + 1 < cfg.epochs:
                reason = self._agree()  # asked during the epoch's save: stop on it, not a step into the next
            if reason is not None:
                if bar is not None:
                    bar.close()
                if self.pending is not None:
                    raise self.pending
                where = f"epoch {epoch}, {100 * min(b, batches_used) / batches_used:.0f}% through it"
                kept = (f"checkpoint saved to {self.ckpt_path}; continue with --resume auto (same --output-dir)"
                        if cfg.save else "no checkpoint written (--no-save)")
                raise Interrupted(f"interrupted by {self.ctl.describe(reason)}: stopped after step {self.step} "
                                  f"({where}), {kept}", EXIT_CODES.get(reason, 2), quiet=not info.is_main)
            if hit_max:
                break
        if self.step == start_step and self.source is not None and cfg.save and dist_lib.broadcast_object(
                not os.path.exists(self.ckpt_path) if info.is_main else None, info):
            # nothing trained (a resume at --epochs or --max-steps) into a folder without the run's checkpoint
            # (a new one, or a rewind that deleted it): written, as a start that trained writes it
            self._save(self.start_epoch, self.start_samples, self.carry, log_record=self.source_record)
        if self.step == start_step and not os.path.exists(os.path.join(cfg.output_dir, "loss_curve.png")):
            self._plot()  # nothing trained: the curve a rewind deleted, drawn from the log lines kept
        if bar is not None:
            bar.close()
        self._agree()  # a log write that failed on one rank after the last step

    def _plot(self) -> None:
        """loss_curve.png from the folder's logs (--plot; rank 0)."""
        cfg = self.cfg
        if self.info.is_main and cfg.plot:
            from .plot import plot_loss_curve

            self._rank0(plot_loss_curve, cfg.output_dir,
                        title=f"maefast train: {cfg.model} {cfg.input_size}px, global batch {self.global_batch}")

    def _check_loss(self, loss: float, epoch: int, before_save: bool = False) -> None:
        """A non-finite loss (a window's mean, or the sum over the steps since the epoch began, checked before
        each save) stops the run, as the official loop does."""
        if not math.isfinite(loss):
            what, when = ("a step's loss since the last log line", ", before its checkpoint" if self.cfg.save else "") \
                if before_save else ("loss", "")
            raise RunError(f"{what} is {loss} at step {self.step} (epoch {epoch}{when}): with --dtype float16 try "
                           "bfloat16, or lower --blr", quiet=not self.info.is_main)

    def _agree(self) -> str | None:
        """All ranks' decision at a step boundary: None (go on) or the stop reason (collective)."""
        reason = self.ctl.agree(local_error=self.pending is not None)
        if reason == REASONS[ERROR]:
            raise self.pending if self.pending is not None else RunError("stopped: another rank failed", quiet=True)
        return reason

    def _write(self, log: JsonlLog, record: dict) -> None:
        """Rank 0 writes a log line; a failure (a full disk) stops every rank at the next agreement."""
        self._rank0(log.write, record)

    def _rank0(self, write, *args, **kwargs) -> None:
        """A write only rank 0 makes: its RunError (a full disk) stops every rank at the next agreement
        (at once when there is one process)."""
        try:
            write(*args, **kwargs)
        except RunError as exc:
            if not self.info.distributed:
                raise
            self.pending = self.pending or exc

    def _epoch_totals(self, stats, loss_sum, ep_images, ep_bad, bad_names, t_epoch) -> EpochStats:
        """This epoch's sums over ranks so far, plus what a resumed epoch carried (collective)."""
        s, imgs, bad = dist_lib.all_reduce_sum([loss_sum.item(), ep_images, ep_bad], self.info)
        names = [x for ns in dist_lib.all_gather_object(bad_names, self.info) for x in ns]
        return EpochStats(loss_sum=stats.loss_sum + s, images=stats.images + int(imgs),
                          bad=stats.bad + int(bad), time_s=stats.time_s + time.perf_counter() - t_epoch,
                          bad_names=(stats.bad_names + names)[:10])

    def _micro_step(self, batch: dict, b: int):
        """One micro-batch through the training step (forward, backward and, at the accumulation's end,
        the optimizer update); returns (counted, loss, images it averaged).

        The loss's weight in the gradient is its images / --batch-size: an unreadable file is a slot
        that contributes no gradient, so the step's gradient is the sum over the global batch's good
        images / G however G is split over ranks and accumulation (DDP and FSDP average the ranks'
        gradients whatever each one held; one process with the whole batch gets the same)."""
        cfg, device, step = self.cfg, self.info.device, self.train_step
        images, noise, weight = batch["images"], batch["noise"], 1.0
        boundary = (b + 1) % cfg.accum_iter == 0
        if self._full_batches_only() and (images is None or images.shape[0] != cfg.batch_size):
            # unreadable files left this batch short (or empty), and one process has nobody to keep in step:
            # skipped (compiled: each new size compiled again, the ninth graph hit torch's recompile limit). At
            # an accumulation's end the cycle's partial gradients are dropped: its optimizer step is not taken
            if boundary:
                step.zero_grad()
            return False, None, 0
        if images is None:  # every file of this batch was unreadable: a zero-weight step keeps ranks in step
            images = torch.zeros(1, 3, cfg.input_size, cfg.input_size, dtype=IMAGE_DTYPES[cfg.image_dtype],
                                 device=device)
            noise, weight = torch.rand(1, self.model.patch_embed.num_patches).to(device), 0.0
        elif images.shape[0] != cfg.batch_size:
            weight = images.shape[0] / cfg.batch_size
        loss = self._call_step(images, noise, weight, boundary)
        return True, loss, images.shape[0] if weight else 0

    def _full_batches_only(self) -> str | None:
        """The step that takes full batches only, said ("captured step", "compiled step"), or None."""
        compiled = "compiled step" if self.cfg.compile and not self.info.distributed else None
        return "captured step" if self.train_step.eager_reason is None else compiled

    def _call_step(self, images, noise, weight: float, update: bool) -> torch.Tensor:
        """``train_step(...)``; the first call also settles how every step runs: a model that does not
        compile as one graph is compiled again with graph breaks (said once), a step that
        ``--cuda-graph on`` cannot capture stops the run with the reason, and so does a capture that
        failed inside the graph (whatever --cuda-graph says: torch 2.11's CUDA allocator is left
        unusable by it, maefast/graphs.py)."""
        from ..graphs import CaptureError

        step = self.train_step
        if step.calls:
            return step(images, noise, weight=weight, update=update)
        try:
            loss = step(images, noise, weight=weight, update=update)
        except CaptureError as exc:
            state = ("this process's CUDA memory allocator is left unusable by it" if exc.broken
                     else "a failure inside a capture is not stepped past")
            raise RunError(f"--cuda-graph {self.cfg.cuda_graph}: the training step failed inside its CUDA-graph "
                           f"capture ({exc.reason}); {state}: run again with --cuda-graph off",
                           quiet=not self.info.is_main) from exc
        except RuntimeError as exc:
            failure = fullgraph_failure(exc) if self.fullgraph else None
            if failure is None:
                if step.eager_reason is None and not step.captured and self.cfg.cuda_graph == "on":
                    raise RunError(f"--cuda-graph on: the training step could not be captured ({first_line(exc)}); "
                                   "--cuda-graph auto steps eagerly when it cannot") from exc
                raise
            self.say(f"--compile: the model does not compile as one graph ({failure}); compiling it with graph breaks")
            self.fullgraph = False
            self.runner = compile_model(self.wrapped, fullgraph=False)
            self.train_step = step = self._make_step()
            return self._call_step(images, noise, weight, update)
        if self.info.device.type == "cuda" or self.cfg.cuda_graph == "on":
            self.say("training step: " + ("captured in CUDA graphs, replayed" if step.captured
                                          else f"eager ({step.eager_reason})"))
        return loss

    # -- after the last step --------------------------------------------------------------------
    def _finish(self) -> dict:
        cfg, info = self.cfg, self.info
        encoder = None
        if cfg.export:
            model_sd = full_model_state(self.wrapped)
            error = None
            if info.is_main:
                try:
                    encoder = ckpt_lib.export_encoder(model_sd, cfg.output_dir, cfg.model)
                except RunError as exc:
                    error = str(exc)
            error = dist_lib.broadcast_object(error, info)
            if error is not None:
                raise RunError(error, quiet=not info.is_main)
        img_per_s = self.run_images / max(self.run_time, 1e-9)
        steady = self.windows[1:] if len(self.windows) > 1 else self.windows  # the first holds start-up and warm-up
        steady_ips = sum(w[0] for w in steady) / max(sum(w[1] for w in steady), 1e-9) if steady else float("nan")
        trained = (f"last loss {self.final_loss:.4f}, {img_per_s:.1f} img/s over the run, {steady_ips:.1f} img/s "
                   f"after the first log window ({info.world_size} x {info.device.type})" if self.run_images else
                   "nothing left to train in this start")
        self.say(f"done: {self.step} steps, {trained}"
                 + (f"; checkpoint {self.ckpt_path}" if cfg.save else "; no checkpoint (--no-save)")
                 + (f", encoder {encoder}" if encoder else ""))
        step, curve = self.train_step, os.path.join(cfg.output_dir, "loss_curve.png")
        return {"output_dir": cfg.output_dir, "checkpoint": self.ckpt_path if cfg.save else None, "encoder": encoder,
                "loss_curve": curve if cfg.plot and os.path.isfile(curve) else None,
                "log": os.path.join(cfg.output_dir, "log.jsonl"), "final_loss": self.final_loss,
                "img_per_s": img_per_s, "img_per_s_steady": steady_ips, "steps": self.step, "epoch": self.epoch,
                "world_size": info.world_size, "skipped_files": self.skipped_total, "config": cfg,
                "model": self.model, "train_step": {"captured": step.captured, "eager_reason": step.eager_reason,
                                                    "compiled": ("fullgraph" if self.fullgraph else "graph breaks")
                                                    if cfg.compile else None}}
