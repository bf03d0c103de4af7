"""`maefast bench table2`: the paper's Table 2 (visible-only encoder vs an encoder with mask tokens)
on this machine.

    maefast bench table2 [--models base,large,huge] [--decoder-depths 8,1] [--impl reference,auto] [--batch N]
                         [--dtype bf16] [--json out.json] [--png out.png]

Table 2 of the paper compares the training time of MAE (encoder on the visible 25% of the patches)
with an encoder that also processes the mask tokens (all L patches, a learned mask token in place
of the removed ones; the decoder is the same). We time one training step (forward, backward,
AdamW) of both, for each model, decoder depth and implementation, and print the measured speed-up
beside the paper's and the FLOP bound (`maefast.flops`). On the CPU the default is a small config
(the paper's models take minutes per step there) and the output says so.

Every step is warmed up before it is timed: on the CPU until its time stops falling (the first
calls of a cold step pay for allocator growth, page faults and thread start-up: the first cell of a
small-config run took 1.3x its settled time over its first calls on this project's 2-core CPU,
2026-12-04, and one warm-up call was not enough); on a GPU `timing.time_cuda` runs it 5 times first.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import torch
import torch.nn as nn

from . import bench as mb
from . import flops as flops_mod
from . import graphs
from . import timing
from .models.configs import check_config, model_config, resolve_model_name

SHORT = {"mae_vit_base_patch16": "ViT-B/16", "mae_vit_large_patch16": "ViT-L/16", "mae_vit_huge_patch14": "ViT-H/14",
         "mae_vit_small_cpu": "small (CPU)", "mae_vit_tiny_test": "tiny (test)"}
# Measured on an H200 (2026-11-27, reference path): at 128 / 64 / 32 the visible-only step is launch-
# bound and reaches 40-80% of the FLOP bound; at 256 / 128 / 64, 74-92%, with peaks of 41 / 44 /
# 49 GiB (the mask-token encoder), which fit an 80 GB H100.
GPU_TABLE2_BATCH = {"mae_vit_base_patch16": 256, "mae_vit_large_patch16": 128, "mae_vit_huge_patch14": 64}


class MaskTokenEncoderMAE(nn.Module):
    """Table 2's baseline: the encoder also processes the mask tokens (all L patches + cls).

    Removed patches are replaced by a learned encoder mask token (+ their position embedding) and
    the encoder runs over all L+1 tokens; the decoder gets every token from the encoder (no mask
    tokens to append, no un-shuffle). Same loss on the masked patches. Wraps `model` and uses its
    modules (so a fast model's blocks run here too).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        d = model.pos_embed.shape[-1]
        p = next(model.parameters())
        self.encoder_mask_token = nn.Parameter(torch.empty(1, 1, d, device=p.device, dtype=p.dtype).normal_(std=0.02))

    def forward(self, imgs, mask_ratio: float = 0.75, noise=None):
        from .reference.masking import masking_ids

        m = self.model
        # the conv itself (state-dict key patch_embed.proj): a fused patch_embed module may take other args
        x = m.patch_embed.proj(imgs).flatten(2).transpose(1, 2)
        n, L, _ = x.shape
        ids = masking_ids(n, L, mask_ratio, noise=noise, device=imgs.device)
        keep = (1.0 - ids.mask).unsqueeze(-1).to(x.dtype)
        x = x * keep + self.encoder_mask_token.to(x.dtype) * (1.0 - keep)
        x = x + m.pos_embed[:, 1:, :]
        cls = m.cls_token + m.pos_embed[:, :1, :]
        x = torch.cat((cls.expand(n, -1, -1), x), dim=1)
        impl = getattr(m, "impl", "reference")
        if impl != "reference":
            return self._fast_rest(x, imgs, ids, impl)
        for blk in m.blocks:
            x = blk(x)
        x = m.norm(x)
        x = m.decoder_embed(x) + m.decoder_pos_embed
        for blk in m.decoder_blocks:
            x = blk(x)
        pred = m.decoder_pred(m.decoder_norm(x))[:, 1:, :]
        from .reference.loss import forward_loss

        return forward_loss(imgs, pred, ids.mask, m.patch_embed.patch_size[0], m.norm_pix_loss), pred, ids.mask

    def _fast_rest(self, x, imgs, ids, impl):
        # maefast's model: the same fused blocks, head and loss as its visible-only forward, here over
        # all L+1 tokens, so the two modes differ only in what the encoder processes
        from . import ops
        from .models import fast

        m = self.model
        fused = getattr(m, "fused", False)
        dev = imgs.device.type
        stream_dtype = torch.float32 if torch.is_autocast_enabled(dev) else imgs.dtype
        view = fast.official_view(m)
        x = fast._run_blocks(view.blocks, x.to(stream_dtype), impl, fused, False)
        x = view.norm(x)
        x = (view.decoder_embed(x).to(stream_dtype) + view.decoder_pos_embed.to(stream_dtype))
        x = fast._run_blocks(view.decoder_blocks, x, impl, fused, False)
        x = view.decoder_norm(x)
        len_keep = int(ids.ids_keep.shape[1])
        loss = ops.masked_prediction_loss(x, view.decoder_pred.weight, view.decoder_pred.bias, imgs, ids.ids_restore,
                                          len_keep, view.patch_size, norm_pix=view.norm_pix_loss,
                                          impl=fast.op_impl(impl, "loss"))
        return loss, None, ids.mask


# -- timing ---------------------------------------------------------------------------------------

def warm_up_cpu(step: Callable[[], object], *, min_calls: int = 3, max_calls: int = 12, settle: float = 0.05,
                patience: int = 2, budget_s: float = 5.0) -> list[float]:
    """Calls `step` until its time stops falling; returns the warm-up times (ms).

    A cold step on the CPU runs 20-50% slower for its first few calls (allocator growth, page faults,
    thread start-up, first-use of a GEMM shape), more in the first cell of a run. Warm-up ends once
    `patience` calls in a row fail to beat the fastest so far by more than `settle` (a single slow
    call from other load on the machine does not end it), after `min_calls` at least and
    `max_calls` or `budget_s` at most.
    """
    times: list[float] = []
    stale = 0
    t_end = time.perf_counter() + budget_s
    while len(times) < max_calls:
        t0 = time.perf_counter()
        step()
        ms = (time.perf_counter() - t0) * 1e3
        stale = stale + 1 if times and ms >= (1.0 - settle) * min(times) else 0
        times.append(ms)
        if len(times) >= min_calls and (stale >= patience or time.perf_counter() > t_end):
            break
    return times


def time_step(step: Callable[[], object], device: torch.device, quick: bool) -> dict:
    """Median step time (ms) after warm-up; `warmup_calls` says how many calls the warm-up took
    (on a GPU `timing.time_cuda` warms up itself: 5 calls at least)."""
    if device.type == "cuda":
        # quick: 6 timed steps (3 spread a few % on the 2026-12-04 H200); else ~2 s of them
        st = timing.time_cuda(step, warmup_ms=1.0, rep_ms=0.0 if quick else 2000.0, min_reps=6 if quick else 10,
                              max_reps=40, flush_l2=False, device=device)
        return {**st, "warmup_calls": None}
    warm = warm_up_cpu(step)
    st = timing.time_cpu(step, warmup=0, min_reps=3, max_reps=5 if quick else 10, budget_s=0.2 if quick else 1.0)
    return {**st, "warmup_calls": len(warm)}


# -- the table ------------------------------------------------------------------------------------

def _time_table2_cell(name, impl, dd, bs, dtype, device, mask_ratio, quick, progress, overrides,
                      cuda_graph=False) -> dict:
    # a function of its own: everything it allocates is freed when it returns (or raises)
    out = {"cudnn_benchmark": mb.cudnn_benchmark()}  # as the official recipe (and the step rows)
    from .step import TrainStep

    model = mb.build_model(name, impl, device, decoder_depth=dd, **overrides)
    imgs = mb.synthetic_batch(model, bs, device)
    graph_ok = cuda_graph  # both steps of a row are timed the same way: a speed-up of graph vs eager means nothing

    def time_mode(mode, graph):
        nonlocal graph_ok
        fwd = model if mode == "visible" else MaskTokenEncoderMAE(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # a graph run's steps take fused, capturable AdamW (a step that then fails to capture keeps it: both
        # steps of a row are timed alike); an eager run's the official loop's default (foreach)
        opt = mb.adamw(fwd, fused=cuda_graph, capturable=cuda_graph)
        out[f"{mode}_optimizer"] = "AdamW fused, capturable" if cuda_graph else "AdamW foreach"
        step = TrainStep(fwd, opt, dtype=dtype, mask_ratio=mask_ratio, capture="auto" if graph else False,
                         restore=False)
        step.prepare(imgs)
        out[f"{mode}_timing"] = "cuda-graph" if step.captured else "eager"
        if graph and not step.captured:  # timed eagerly, and the record says why
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            graph_ok = False
            out[f"{mode}_graph_error"] = step.eager_reason
        x = step.static_imgs if step.captured else imgs  # a captured step reads its own buffer: no copy timed
        st = time_step(lambda: step(x), device, quick)
        out[f"{mode}_ms"] = st["median_ms"]
        out[f"{mode}_reps"] = st["reps"]
        out[f"{mode}_warmup_calls"] = st["warmup_calls"]
        if device.type == "cuda":
            out[f"{mode}_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    for mode in ("visible", "mask_tokens"):
        if progress:
            progress(f"{SHORT.get(name, name)} dec{dd} {impl} {mode}")
        time_mode(mode, graph_ok)
    if out.get("visible_timing") == "cuda-graph" and out.get("mask_tokens_timing") == "eager":
        # the mask-token step could not be captured: the visible one is timed eagerly too (its replay time kept)
        out["visible_graph_ms"] = out["visible_ms"]
        if progress:
            progress(f"{SHORT.get(name, name)} dec{dd} {impl} visible (eager, like the mask-token step)")
        time_mode("visible", False)
    return out


def table2(models, decoder_depths=(8, 1), impls=("reference",), *, batch=None, dtype=torch.float32, device=None,
           mask_ratio=0.75, quick=False, progress=None, overrides=None, cuda_graph: bool | None = None,
           on_row: Callable[[list[dict]], None] | None = None, peak: dict | None = None) -> list[dict]:
    """Times visible-only vs mask-token encoders; one row per (model, impl, decoder depth).

    cuda_graph (default: on a CUDA device, unless the dtype is fp16): time each step as a CUDA-graph
    replay (`maefast.TrainStep`, captured), the GPU time without host dispatch, as XLA ran the paper's TPU steps;
    a step that cannot be captured is timed eagerly, and so is the other step of its row (a ratio of
    a replay to an eager step would mean nothing); the row says why. False: eager steps.
    on_row(rows so far) is called after each row (e.g. to save partial results under a time limit).
    peak: `timing.measure_peak`'s result for the MFU column (measured here when None).
    batch: one for every model, or {model name: batch} (the others at GPU_TABLE2_BATCH / 8 on the CPU).
    """
    device = torch.device(device) if device is not None else mb.default_device()
    if isinstance(batch, dict):
        batch = {resolve_model_name(k): v for k, v in batch.items()}
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and dtype != torch.float16
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs a CUDA device")
    peak = peak or timing.measure_peak(device)
    rows = []
    # impl-major: each impl's rows for every model come together (the first impl's finish first when a
    # time limit cuts the run short)
    for impl, name in [(i, resolve_model_name(m)) for i in impls for m in models]:
        bs = (batch.get(name) if isinstance(batch, dict) else batch) or \
            (GPU_TABLE2_BATCH.get(name, 64) if device.type == "cuda" else 8)
        t_mask_by_depth = {}
        # the reference rows run the official forward: fused is the fast rows' (the model refuses both at once)
        own = {k: v for k, v in (overrides or {}).items() if k != "fused" or impl != "reference"}
        for dd in decoder_depths:
            row = {"model": name, "impl": impl, "decoder_depth": dd, "batch": bs, "mask_ratio": mask_ratio,
                   "dtype": str(dtype).replace("torch.", ""), "cuda_graph": bool(cuda_graph),
                   "fused": own.get("fused", False),
                   "flop_ratio": flops_mod.table2_flop_ratio(name, dd, mask_ratio) if not overrides else
                   flops_mod.table2_flop_ratio(model_config(name, **overrides), dd, mask_ratio)}
            # the paper's figures only for the paper's setting: its mask ratio, its model (fused is not a change)
            changed = {k for k in (overrides or {}) if k != "fused"}
            paper = flops_mod.PAPER_TABLE2.get((name, dd)) if mask_ratio == 0.75 and not changed else None
            if paper:
                row.update(paper_hours=paper[0], paper_speedup=paper[1], maemd_flop_ratio=paper[2])
            try:
                row.update(_time_table2_cell(name, impl, dd, bs, dtype, device, mask_ratio, quick, progress, own,
                                             cuda_graph))
            except Exception as e:  # noqa: BLE001 - OOM or an impl that cannot run: a row that says so
                if graphs.process_broken(e):  # the CUDA allocator is unusable: no later row can be trusted
                    raise
                row["error"] = graphs.first_line(e)
            mb.free_memory()
            if "visible_ms" in row and "mask_tokens_ms" in row:
                row["speedup"] = row["mask_tokens_ms"] / row["visible_ms"]
                row["of_flop_bound"] = row["speedup"] / row["flop_ratio"]
                f = flops_mod.mae_flops(model_config(name, decoder_depth=dd, **(overrides or {})),
                                        mask_ratio=mask_ratio)["train"] * bs
                row["img_per_s"] = bs / (row["visible_ms"] * 1e-3)
                row["tflops"] = f / (row["visible_ms"] * 1e-3) / 1e12
                row["mfu"] = row["tflops"] / peak["matmul_tflops"]
                t_mask_by_depth[dd] = (row["mask_tokens_ms"], row.get("mask_tokens_timing"))
            rows.append(row)
            if on_row is not None:
                on_row(rows)
        # the paper's definition: every row against the mask-token encoder with decoder depth 8
        if 8 in t_mask_by_depth:
            t8, how8 = t_mask_by_depth[8]
            for row in rows[-len(decoder_depths):]:
                if "visible_ms" not in row:
                    continue
                if row.get("visible_timing") == how8:  # a replay against a replay, an eager step against one
                    row["speedup_vs_mask_dec8"] = t8 / row["visible_ms"]
                else:
                    row["speedup_vs_mask_dec8"] = None
                    row["speedup_vs_mask_dec8_note"] = (f"the decoder-8 mask-token step was timed {how8}, this row's "
                                                        f"visible step {row.get('visible_timing')}: not comparable")
    return rows


def _x(v, spec):
    return "-" if v is None else format(v, spec) + "x"


# (header line 1, header line 2, width, align, cell(row)); the headers read without the source
_COLUMNS = [
    ("model", "", 12, "<", lambda r: SHORT.get(r["model"], r["model"])
     + ("*" if any(r.get(f"{m}_graph_error") for m in ("visible", "mask_tokens")) else "")),
    ("decoder", "blocks", 7, ">", lambda r: str(r["decoder_depth"])),
    ("impl", "", 10, "<", lambda r: r["impl"] + {True: "+fused", "block": "+block"}.get(r.get("fused"), "")),
    ("batch", "", 5, ">", lambda r: str(r["batch"])),
    ("visible-only", "encoder, ms", 12, ">", lambda r: f"{r['visible_ms']:.2f}"),
    ("mask-token", "encoder, ms", 11, ">", lambda r: f"{r['mask_tokens_ms']:.2f}"),
    ("speed-up", "same decoder", 12, ">", lambda r: _x(r["speedup"], ".2f")),
    ("FLOP bound", "(FLOP ratio)", 12, ">", lambda r: _x(r["flop_ratio"], ".2f")),
    ("speed-up /", "FLOP bound", 10, ">", lambda r: f"{100 * r['of_flop_bound']:.0f}%"),
    ("speed-up vs", "mask-token dec 8", 16, ">", lambda r: _x(r.get("speedup_vs_mask_dec8"), ".2f")),
    ("paper's", "speed-up", 8, ">", lambda r: _x(r.get("paper_speedup"), ".1f")),
    ("MFU", "", 5, ">", lambda r: f"{100 * r['mfu']:.0f}%"),
]


def format_table2(rows: list[dict], env: dict, peak: dict, note: str = "") -> str:
    """The rows of `table2()` as the printed table: a header saying what is compared, two-line
    column names, one line per row (an error row says what failed), and how to read the paper's column."""
    lines = [f"Table 2 on {env['card']} ({env['date']}, torch {env['torch']}, commit {env['git_commit'][:12]})",
             f"measured peak: {peak['matmul_dtype']} matmul {peak['matmul_tflops']:.3g} TFLOP/s, "
             f"copy {peak['copy_gbps']:.0f} GB/s"]
    if note:
        lines.append(note)
    lines += ["One training step (forward, backward, AdamW) of MAE's visible-only encoder (it sees the 25% visible "
              "patches) and of the paper's baseline, the mask-token encoder (it also processes a mask token for each "
              "removed patch: all L patches), same decoder.",
              "speed-up = mask-token step time / visible-only step time; FLOP bound = the ratio of their training "
              "FLOPs (maefast.flops), the speed-up if both ran at the same FLOP rate."]
    if env.get("device") == "cpu" and any(r["impl"] != "reference" for r in rows):
        lines.append("CPU: maefast's Triton and CUDA C++ kernels need a CUDA GPU; here every impl runs PyTorch ops "
                     "(impl=auto: each op's reference).")
    if any(r.get("cuda_graph") for r in rows):
        lines.append("steps timed as CUDA-graph replays with fused AdamW (GPU time without host dispatch, as XLA ran "
                     "the paper's TPU steps; --eager for eager steps, foreach AdamW as the official loop); * = a step "
                     "that could not be captured: both steps of that row timed eagerly")
    for k in (0, 1):
        lines.append(" ".join(format(c[k], f"{c[3]}{c[2]}") for c in _COLUMNS).rstrip())
    lines.append("-" * len(lines[-2]))
    for r in rows:
        if "error" in r:
            lines.append(" ".join(format(c[4](r), f"{c[3]}{c[2]}") for c in _COLUMNS[:4]) + f" {r['error']}")
            continue
        lines.append(" ".join(format(c[4](r), f"{c[3]}{c[2]}") for c in _COLUMNS))
    lines.append("paper's speed-up = the paper's Table 2 (128 TPU-v3 cores, 800 epochs), always against the mask-token "
                 "encoder with an 8-block decoder: compare it with 'speed-up vs mask-token dec 8'. MFU = the "
                 "visible-only step's model FLOPs per second / the measured matmul peak.")
    return "\n".join(lines)


def save_chart(rows: list[dict], path: str, title: str) -> None:
    """Grouped bars per (model, decoder depth): measured speed-up per impl, the paper's, the FLOP bound."""
    from matplotlib.figure import Figure  # not pyplot: no backend switched in a caller's session

    keys = []
    for r in rows:
        k = (r["model"], r["decoder_depth"])
        if k not in keys:
            keys.append(k)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    series = [(f"measured, impl {i} (vs the mask-token encoder, same decoder)",
               {(r["model"], r["decoder_depth"]): r.get("speedup") for r in rows if r["impl"] == i}) for i in impls]
    series.append(("paper (vs the mask-token encoder with an 8-block decoder)",
                   {(r["model"], r["decoder_depth"]): r.get("paper_speedup") for r in rows}))
    series.append(("FLOP bound (ratio of training FLOPs, same decoder)",
                   {(r["model"], r["decoder_depth"]): r.get("flop_ratio") for r in rows}))
    series = [(label, vals) for label, vals in series if any(v for v in vals.values())]
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 1.6 * len(keys) + 2), 4.2))
    ax = fig.subplots()
    for j, (label, vals) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(keys))]
        ys = [vals.get(k) or 0.0 for k in keys]
        bars = ax.bar(xs, ys, width, label=label)
        for b, y in zip(bars, ys):
            if y:
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{SHORT.get(m, m)}\n{d}-block decoder" for m, d in keys])
    ax.set_ylabel("speed-up of the visible-only encoder (x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    from .train.checkpoint import atomic_write_file

    # under a temporary name, then renamed: an interrupted write leaves the previous chart
    atomic_write_file(path, lambda f: fig.savefig(f, format="png", dpi=120))


def _csv(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


_LETTERS = {"b": "base", "l": "large", "h": "huge"}


def _models(s: str) -> list[str]:
    return [_LETTERS.get(v.lower(), v) for v in _csv(s)]


def _positive_int(flag: str, text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{flag} takes positive integers, got {text!r}")
    return int(text)


def parse_batches(text: str | None) -> int | dict | None:
    """`--batch`: "64" (every model) or "large=256,huge=192" (per model, names resolved)."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    if "=" not in text:
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"--batch must be an int or model=N pairs (large=256,huge=192), got {text!r}") from None
        if n < 1:
            raise ValueError(f"--batch must be >= 1, got {n}")
        return n
    from .cli import check_unique

    pairs = []
    for item in _csv(text):
        name, _, n = item.partition("=")
        if not n.strip().isdigit() or int(n) < 1:
            raise ValueError(f"--batch: {item!r} is not model=N with N >= 1")
        pairs.append((name.strip(), int(n)))
    check_unique("--batch", [name for name, _ in pairs], key=resolve_model_name)  # else the later value wins
    return {resolve_model_name(name): n for name, n in pairs}


def main(argv=None) -> int:
    """`maefast bench table2`: prints the table, writes --json / --png; exit 1 when a row failed, 2 on a
    user error (one line on stderr)."""
    from .cli import OneLineParser

    p = OneLineParser(prog="maefast bench table2", description=__doc__.split("\n\n")[2])
    p.add_argument("--models", default=None, help="comma list (base,large,huge / small / tiny / full names); "
                   "default: base,large,huge on a GPU, small on the CPU")
    p.add_argument("--decoder-depths", default="8,1", help="comma list of decoder depths (default 8,1: the paper's)")
    p.add_argument("--impl", default=None, help="comma list of impls (reference, auto, triton, cuda, sdpa); default: "
                   "reference, plus auto on a GPU")
    p.add_argument("--batch", default=None, help=f"N for every model, or per model: large=256,huge=192 (the others "
                   f"at their default); default: {GPU_TABLE2_BATCH} on a GPU, 8 on the CPU")
    p.add_argument("--dtype", default=None, help="bf16 (GPU default) / fp16 / fp32 (CPU default)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of the patches removed (default 0.75)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="fewer timed steps (6 per cell on a GPU)")
    p.add_argument("--eager", action="store_true", help="GPU: time eager steps (Python dispatch included) instead of "
                   "CUDA-graph replays (the default on a GPU: the paper's TPU steps ran XLA-compiled)")
    p.add_argument("--fused", default="off", choices=["off", "block"],
                   help="the fast model's blocks (maefast train --fused); the reference rows ignore it")
    p.add_argument("--override", action="append", default=[], metavar="KEY=NUMBER",
                   help="model config override (e.g. depth=2, embed_dim=128) for small experiments")
    p.add_argument("--json", default=None, help="write rows + environment to this JSON file (not an image's name: "
                   "the chart is --png)")
    p.add_argument("--png", default=None, help="save the chart here (default: next to --json, else none)")
    p.add_argument("--overwrite", action="store_true", help="replace --json / --png files that exist")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (1 is steadier on a busy machine)")
    a = p.parse_args(argv)
    from .cli import (check_distinct_outputs, check_impls, check_json_name, check_mask_ratio_flag, check_out_file,
                      check_unique, image_format, positive)

    # every option checked before any work: a user's error is one line, exit 2 (maefast.cli.guarded)
    positive("--threads", a.threads)
    device = mb.parse_device(a.device)
    on_cpu = device.type == "cpu"
    models = _models(a.models) if a.models else (["small"] if on_cpu else ["base", "large", "huge"])
    if not models:
        raise ValueError(f"--models must name at least one model, got {a.models!r}")
    check_unique("--models", models, key=resolve_model_name)
    impls = _csv(a.impl) if a.impl else (["reference"] + ([] if on_cpu else ["auto"]))
    check_impls(impls, a.impl, a.fused, device=device)
    check_mask_ratio_flag(a.mask_ratio)
    dtype = mb.parse_dtype(a.dtype) if a.dtype else (torch.float32 if on_cpu else torch.bfloat16)
    depths = [_positive_int("--decoder-depths", v) for v in _csv(a.decoder_depths)]
    if not depths:
        raise ValueError(f"--decoder-depths must name at least one depth, got {a.decoder_depths!r}")
    check_unique("--decoder-depths", depths)
    batch = parse_batches(a.batch)
    overrides = {}
    known = set(model_config(models[0])) - {"norm_layer", "decoder_depth"}
    check_unique("--override", [kv.partition("=")[0] for kv in a.override])  # else the last one silently won
    for kv in a.override:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = float(v) if "." in v else int(v)
        except ValueError:
            raise ValueError(f"--override takes KEY=NUMBER (e.g. depth=2), got {kv!r}") from None
        if k == "decoder_depth":
            raise ValueError(f"--override {kv!r}: the decoder depths are --decoder-depths (each is a column)")
        if k not in known:
            raise ValueError(f"--override {kv!r}: {k!r} is not a model setting (one of {', '.join(sorted(known))})")
    for m in models:  # each model's config with the overrides, and the mask ratio on its patch count
        where = f" (with --override {' '.join(a.override)})" if a.override else ""
        try:
            num_patches = check_config(model_config(m, **overrides))
        except ValueError as e:
            raise ValueError(f"{m}{where}: {e}") from None
        check_mask_ratio_flag(a.mask_ratio, num_patches)
    check_json_name("--json", a.json)
    check_out_file("--json", a.json, a.overwrite)
    png = a.png or (os.path.splitext(a.json)[0] + ".png" if a.json else None)
    if png and not a.png and os.path.lexists(png) and not a.overwrite:  # a file the user did not name here
        raise ValueError(f"--json {a.json!r} also writes the chart {png!r} (--png's default), which exists: pass "
                         "--overwrite to replace it, or --png with another name")
    check_out_file("--png", png, a.overwrite)
    check_distinct_outputs({"--json": a.json, "--png": png})
    if png:  # the chart is a PNG: a name ending otherwise would hold PNG bytes under another format's name
        image_format("--png", png, {".png": "png"})
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.fused != "off":
        overrides["fused"] = "block"
    note = ""
    if on_cpu and not a.models:
        bs = (batch.get("mae_vit_small_cpu") if isinstance(batch, dict) else batch) or 8  # as table2() takes it
        note = (f"CPU: small config by default (mae_vit_small_cpu, batch {bs}, {str(dtype).replace('torch.', '')}); "
                "the paper's ViT-B/L/H take minutes per step here: pass --models base,large,huge to run them anyway")
    if note:
        print(note, file=sys.stderr)
    progress = (lambda msg: print(f"  timing {msg} ...", file=sys.stderr, flush=True))
    timing.use_device(device)  # --device cuda:N: events, synchronisations and the peak on that card
    env, peak = timing.env_info(device), timing.measure_peak(device)

    def save_partial(rows_so_far):  # a run cut short (a time limit) still leaves its finished rows
        if a.json:
            from .train.checkpoint import atomic_write_text

            atomic_write_text(a.json, json.dumps({"kind": "maefast.table2", "env": env, "peak": peak, "note": note,
                                                  "rows": rows_so_far, "partial": True}, indent=2, default=str))

    rows = table2(models, depths, impls, batch=batch, dtype=dtype, device=device, mask_ratio=a.mask_ratio,
                  quick=a.quick, progress=progress, overrides=overrides or None,
                  cuda_graph=False if (a.eager or on_cpu) else None, on_row=save_partial, peak=peak)
    text = format_table2(rows, env, peak, note)
    print(text)
    if png:
        try:
            save_chart(rows, png, f"MAE Table 2 on {env['card']} ({env['date'][:10]}, "
                                  f"{str(dtype).replace('torch.', '')})")
            print(f"chart: {png}")
        except ImportError as e:  # matplotlib is optional: the table and JSON still stand
            print(f"no chart ({e})", file=sys.stderr)
            png = None
    if a.json:
        from .train.checkpoint import atomic_write_text

        atomic_write_text(a.json, json.dumps({"kind": "maefast.table2", "env": env, "peak": peak, "note": note,
                                              "rows": rows, "table": text.splitlines(), "png": png}, indent=2))
        print(f"json: {a.json}")
    return 0 if all("error" not in r for r in rows) else 1

