"""`maefast bench`: training-step benchmarks and the paper's Table 2 on this machine.

    maefast bench table2 [--models base,large,huge] [--decoder-depths 8,1] [--impl reference,auto] [--batch N]
                         [--dtype bf16] [--json out.json] [--png out.png]

Table 2 of the paper compares the training time of MAE (encoder on the visible 25% of the patches)
with an encoder that also processes the mask tokens (all L patches, a learned mask token in place
of the removed ones; the decoder is the same). We time one training step (forward, backward,
AdamW) of both, for each model, decoder depth and implementation, and print the measured speed-up
beside the paper's and the FLOP bound (`maefast.flops`). On the CPU the default is a small config
(the paper's models take minutes per step there) and the output says so.

Also the library the step benchmarks share (`benchmarks/bench_step.py`, `maefast profile`):
`build_model`, `use_sdpa`, `MaskTokenEncoderMAE`, `TrainStep`, `STEP_PROVIDERS`.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import sys
import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import flops as flops_mod
from . import timing
from .models.configs import model_config, resolve_model_name

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SHORT = {"mae_vit_base_patch16": "ViT-B/16", "mae_vit_large_patch16": "ViT-L/16", "mae_vit_huge_patch14": "ViT-H/14",
         "mae_vit_small_cpu": "small (CPU)", "mae_vit_tiny_test": "tiny (test)"}
# Measured on an H200 (2026-11-27, reference path): at 128 / 64 / 32 the visible-only step is launch-
# bound and reaches 40-80% of the FLOP bound; at 256 / 128 / 64, 74-92%, with peaks of 41 / 44 /
# 49 GiB (the mask-token encoder), which fit an 80 GB H100.
GPU_TABLE2_BATCH = {"mae_vit_base_patch16": 256, "mae_vit_large_patch16": 128, "mae_vit_huge_patch14": 64}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(set(DTYPES))}, got {name!r}") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- models ---------------------------------------------------------------------------------------

def model_class():
    """maefast.models.MaskedAutoencoderViT (the fast class once it exists; today the reference)."""
    from . import models

    return models.MaskedAutoencoderViT


def accepts_impl() -> bool:
    """Whether the model constructor takes ``impl=`` (explicitly; **kwargs does not count)."""
    try:
        return "impl" in inspect.signature(model_class().__init__).parameters
    except (TypeError, ValueError):
        return False


def build_model(name: str, impl: str = "reference", device=None, **overrides) -> nn.Module:
    """A model by name (``base``, ``mae_vit_large_patch16``, ...) built directly on `device`.

    ``impl="reference"`` is the official computation; any other impl is passed to the constructor's
    ``impl=`` and raises ValueError when the constructor does not take it.
    """
    device = torch.device(device) if device is not None else default_device()
    cfg = model_config(name, **overrides)
    cls = model_class()
    if accepts_impl():
        cfg["impl"] = impl
    elif impl != "reference":
        raise ValueError(f"impl={impl!r}: {cls.__module__}.{cls.__name__} does not take impl= (only the reference "
                         f"model exists in this checkout)")
    with torch.device(device):  # initialise on the device: ViT-H on the CPU first would take seconds
        model = cls(**cfg)
    return model.to(device)


def _sdpa_attention_forward(self, x):
    n, t, c = x.shape
    qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(n, t, c)))


def use_sdpa(model: nn.Module) -> nn.Module:
    """Swaps every reference Attention's forward for torch's scaled_dot_product_attention (in place)."""
    from .reference.model import Attention

    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            m.forward = types.MethodType(_sdpa_attention_forward, m)
            n += 1
    if n == 0:
        raise ValueError("use_sdpa: the model has no reference Attention modules")
    return model


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
        fused = getattr(m, "fused", True)
        dev = imgs.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        stream_dtype = torch.float32 if out_dtype is not None else imgs.dtype
        view = fast.official_view(m)
        x = fast._run_blocks(view.blocks, x.to(stream_dtype), impl, fused, out_dtype, False)
        x = fast._ln(x, view.norm, fused, impl, out_dtype)
        x = (view.decoder_embed(x).to(stream_dtype) + view.decoder_pos_embed.to(stream_dtype))
        x = fast._run_blocks(view.decoder_blocks, x, impl, fused, out_dtype, False)
        x = fast._ln(x, view.decoder_norm, fused, impl, out_dtype)
        len_keep = int(ids.ids_keep.shape[1])
        loss = ops.masked_prediction_loss(x, view.decoder_pred.weight, view.decoder_pred.bias, imgs, ids.ids_restore,
                                          len_keep, view.patch_size, norm_pix=view.norm_pix_loss,
                                          impl=fast.op_impl(impl, "loss"))
        return loss, None, ids.mask


def param_groups(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """The official split: no decay on biases and 1-D (norm) weights; tokens are decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TrainStep:
    """One MAE training step: forward under autocast(dtype), backward, AdamW (the paper's betas).

    fp16 uses a GradScaler (as the official AMP loop); fp32 runs without autocast. Call it to run
    a step; `forward`, `backward` and `optimizer_step` are the pieces `maefast profile` times.
    """

    def __init__(self, model: nn.Module, imgs: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                 mask_ratio: float = 0.75, lr: float = 1.5e-4, compile: bool = False, fused: bool = False,
                 params_of: nn.Module | None = None, capturable: bool = False):
        self.model = model
        self.imgs = imgs
        self.dtype = dtype
        self.mask_ratio = mask_ratio
        self.device = imgs.device
        owner = params_of if params_of is not None else model
        # foreach AdamW by default, like the official loop; fused=True is an option for fast rows
        kw = {"fused": True} if fused else {}
        if capturable:  # AdamW keeps its step counts on the device: a CUDA graph can capture it
            kw["capturable"] = True
        self.opt = torch.optim.AdamW(param_groups(owner), lr=lr, betas=(0.9, 0.95), **kw)
        self.scaler = torch.amp.GradScaler(self.device.type) if dtype == torch.float16 else None
        self.fwd = torch.compile(model) if compile else model
        # maefast's model can skip the full prediction a training step does not use
        try:
            takes = "return_pred" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes = False
        self.fwd_kwargs = {"return_pred": False} if takes and getattr(model, "impl", "reference") != "reference" else {}
        self.loss = None

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self):
        with self.autocast():
            loss = self.fwd(self.imgs, mask_ratio=self.mask_ratio, **self.fwd_kwargs)[0]
        self.loss = loss
        return loss

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self):
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self):
        self.backward(self.forward())
        self.optimizer_step()


class GraphedTrainStep:
    """A `TrainStep` (forward + backward + AdamW step) captured whole in one CUDA graph and replayed:
    the step's GPU time without Python dispatch or per-kernel launch cost — the way XLA ran the
    paper's TPU steps. For timing: the batch is fixed, and a model that draws its mask on the host
    (maefast's without a device seed) replays the mask drawn at capture; `maefast.graphs.
    CUDAGraphTrainStep` is the training-grade version (fresh mask per replay).

    The TrainStep must be on CUDA, built with capturable=True, and not fp16 (a GradScaler step syncs).
    Raises ValueError for those, RuntimeError (from CUDA) when something in the step cannot be
    captured (a host sync, a CPU tensor); the caller decides whether to fall back to eager.
    """

    def __init__(self, step: TrainStep, warmup_steps: int = 2):
        if step.device.type != "cuda":
            raise ValueError("a CUDA-graph step needs a CUDA device")
        if step.scaler is not None:
            raise ValueError("an fp16 step (GradScaler) cannot be captured; use bf16 or fp32")
        if not all(g.get("capturable") for g in step.opt.param_groups):
            raise ValueError("the TrainStep's optimizer must be built with capturable=True")
        from .graphs import capture_cuda_graph

        self.step = step

        def zero_grad():
            step.opt.zero_grad(set_to_none=True)

        def warm():
            self._body()
            zero_grad()

        self.graph, self.static_loss = capture_cuda_graph(self._body, warmup_steps=warmup_steps, warmup_fn=warm,
                                                          before_capture=zero_grad, device=step.device)

    def _body(self) -> torch.Tensor:
        s = self.step
        ctx = (torch.autocast("cuda", dtype=s.dtype, cache_enabled=False) if s.dtype != torch.float32
               else contextlib.nullcontext())
        with ctx:
            loss = s.fwd(s.imgs, mask_ratio=s.mask_ratio, **s.fwd_kwargs)[0]
        loss.backward()
        s.opt.step()
        return loss.detach()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.static_loss


def synthetic_batch(model: nn.Module, batch: int, device=None, seed: int = 0) -> torch.Tensor:
    """ImageNet-normalised-looking random images for `model`'s img_size."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    h, w = model.patch_embed.img_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(batch, model.patch_embed.proj.in_channels, h, w, generator=g).to(device)


# -- step providers (rows of the step benchmark; issue 6 appends maefast's) ----------------------

def _provider_reference(name, device, **overrides):
    return build_model(name, "reference", device, **overrides), False


def _provider_sdpa(name, device, **overrides):
    return use_sdpa(build_model(name, "reference", device, **overrides)), False


def compile_blocks(model: nn.Module) -> nn.Module:
    """Regional torch.compile: each transformer block compiled in place. Identical blocks share one
    compiled graph, so this compiles in seconds where the whole model takes minutes, and runs
    nearly as fast (the blocks are >95% of the FLOPs)."""
    for blk in list(getattr(model, "blocks", [])) + list(getattr(model, "decoder_blocks", [])):
        blk.compile()
    return model


def _provider_compile(name, device, **overrides):
    return compile_blocks(use_sdpa(build_model(name, "reference", device, **overrides))), False


def _provider_compile_full(name, device, **overrides):
    return use_sdpa(build_model(name, "reference", device, **overrides)), True


# name -> builder(model_name, device, **config_overrides) -> (model, compile the whole model?)
STEP_PROVIDERS: dict[str, Callable] = {"reference": _provider_reference, "sdpa": _provider_sdpa,
                                       "compile": _provider_compile, "compile-full": _provider_compile_full}


def _provider_maefast(name, device, **overrides):
    return build_model(name, "auto", device, **overrides), False


def _provider_maefast_fused(name, device, **overrides):
    # the same with maefast's Triton residual+LayerNorm and bias+GELU ops (fused=True): the row that
    # decides the model's `fused` default on a GPU
    return build_model(name, "auto", device, fused=True, **overrides), False


def _provider_maefast_block(name, device, **overrides):
    # each transformer block one op (fused="block"): one autograd node per block, LN/GELU recomputed
    return build_model(name, "auto", device, fused="block", **overrides), False


def _provider_maefast_patch(name, device, **overrides):
    # maefast.patch on an official-layout model (the reference class): what a user of the official code gets
    from .patching import patch

    model = build_model(name, "reference", device, **overrides)
    model.impl = "auto"  # TrainStep passes return_pred=False to the patched forward too
    return patch(model), False


class TransformersStepAdapter(nn.Module):
    """transformers' ViTMAEForPreTraining behind the official call convention TrainStep uses:
    forward(imgs, mask_ratio) -> (loss, logits, mask); the mask ratio is the model config's."""

    def __init__(self, hf: nn.Module, img_size, in_chans: int):
        super().__init__()
        self.hf = hf
        self.patch_embed = types.SimpleNamespace(img_size=tuple(img_size),  # what synthetic_batch reads
                                                 proj=types.SimpleNamespace(in_channels=in_chans))

    def forward(self, imgs, mask_ratio: float = 0.75, noise=None):
        if abs(mask_ratio - self.hf.config.mask_ratio) > 1e-9:
            raise ValueError(f"mask_ratio {mask_ratio} differs from the transformers config's "
                             f"{self.hf.config.mask_ratio}")
        out = self.hf(pixel_values=imgs, noise=noise)
        return out.loss, out.logits, out.mask


def _provider_maefast_patch_hf(name, device, **overrides):
    # maefast.patch on transformers' ViTMAEForPreTraining (same weights as the reference model)
    try:
        from .convert import to_transformers_model
    except ImportError as e:  # pragma: no cover
        raise ValueError(f"transformers is not importable ({e})") from None
    from .patching import patch

    device = torch.device(device)
    ref = build_model(name, "reference", device, **overrides)
    try:
        with device:  # transformers builds and initialises its model right there (ViT-H: seconds, not a minute)
            hf = to_transformers_model(ref, mask_ratio=0.75)
    except ImportError as e:
        raise ValueError(f"transformers is not importable ({e})") from None
    img, chans = ref.patch_embed.img_size, ref.patch_embed.proj.in_channels
    del ref
    return TransformersStepAdapter(patch(hf.to(device), impl="auto"), img, chans), False


def _provider_maefast_custom_op(name, device, **overrides):
    # the same model with every op called through the torch.library dispatcher (the route before
    # 2026-11-27's direct autograd.Functions): the row that measures what the direct route saves
    from .ops._dispatch import eager_dispatch

    model = build_model(name, "auto", device, **overrides)
    forward = model.forward

    def forward_via_custom_ops(*args, **kwargs):
        with eager_dispatch("custom_op"):  # the backward follows the route its forward took
            return forward(*args, **kwargs)

    model.forward = forward_via_custom_ops
    return model, False


def _provider_maefast_compile(name, device, **overrides):
    # torch.compile of the whole fast model (the maefast ops stay opaque): removes the Python glue
    # between the ops, the suspected limit of the eager fast path at launch-bound batch sizes
    return build_model(name, "auto", device, **overrides), True


if accepts_impl():  # maefast's own model (impl="auto": its fused path; the reference ops on the CPU)
    STEP_PROVIDERS["maefast"] = _provider_maefast
    STEP_PROVIDERS["maefast-compile"] = _provider_maefast_compile
    STEP_PROVIDERS["maefast-graph"] = _provider_maefast  # the same model, its step captured (GraphTrainStep)
    STEP_PROVIDERS["maefast-fused"] = _provider_maefast_fused
    STEP_PROVIDERS["maefast-patch"] = _provider_maefast_patch
    STEP_PROVIDERS["maefast-custom-op"] = _provider_maefast_custom_op
    STEP_PROVIDERS["maefast-patch-hf"] = _provider_maefast_patch_hf
    STEP_PROVIDERS["maefast-block"] = _provider_maefast_block
    STEP_PROVIDERS["maefast-block-graph"] = _provider_maefast_block  # fused="block", step captured


def register_step_provider(name: str, builder: Callable) -> None:
    """Adds a row to the step benchmark: builder(model_name, device, **overrides) -> (model, compile)."""
    STEP_PROVIDERS[name] = builder


class GraphTrainStep:
    """The fast model's step captured in a CUDA graph (`maefast.graphs.CUDAGraphTrainStep`), AdamW
    with capturable=True and the paper's betas; replays on a fixed batch."""

    def __init__(self, model: nn.Module, imgs: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16,
                 mask_ratio: float = 0.75, lr: float = 1.5e-4):
        from .graphs import CUDAGraphTrainStep

        if imgs.device.type != "cuda":
            raise ValueError("the CUDA-graph step needs a CUDA device")
        if dtype == torch.float16:
            raise ValueError("the CUDA-graph step takes no GradScaler: use bf16 or fp32")
        self.model, self.imgs = model, imgs
        # fused AdamW: one kernel over all parameters (foreach makes ~5 passes); capturable for the graph
        self.opt = torch.optim.AdamW(param_groups(model), lr=lr, betas=(0.9, 0.95), capturable=True, fused=True)
        self.step = CUDAGraphTrainStep(model, self.opt, imgs, mask_ratio=mask_ratio,
                                       autocast_dtype=None if dtype == torch.float32 else dtype,
                                       restore=False)  # timing only: no need to undo the warm-up

    def __call__(self):
        return self.step(self.step.static_imgs)  # the captured buffer itself: no copy in the timed step


GRAPH_PROVIDERS = {"maefast-graph", "maefast-block-graph"}
# rows timed as GraphedTrainStep replays of another provider's step (e.g. the reference's)
GRAPHED_PROVIDERS = {"reference-graph": "reference"}
STEP_PROVIDERS["reference-graph"] = _provider_reference


def make_step(provider: str, name: str, batch: int, *, device=None, dtype=torch.float32, mask_ratio=0.75,
              **overrides) -> TrainStep:
    if provider not in STEP_PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(STEP_PROVIDERS)}, got {provider!r}")
    device = torch.device(device) if device is not None else default_device()
    if provider in GRAPH_PROVIDERS:
        if device.type != "cuda":
            raise ValueError("the CUDA-graph step needs a CUDA device")
        model, _ = STEP_PROVIDERS[provider](name, device, **overrides)
        return GraphTrainStep(model, synthetic_batch(model, batch, device), dtype=dtype, mask_ratio=mask_ratio)
    if provider in GRAPHED_PROVIDERS:
        if device.type != "cuda":
            raise ValueError("the CUDA-graph step needs a CUDA device")
        model, compile_ = STEP_PROVIDERS[GRAPHED_PROVIDERS[provider]](name, device, **overrides)
        return GraphedTrainStep(TrainStep(model, synthetic_batch(model, batch, device), dtype=dtype,
                                          mask_ratio=mask_ratio, compile=compile_, capturable=True, fused=True))
    model, compile_ = STEP_PROVIDERS[provider](name, device, **overrides)
    return TrainStep(model, synthetic_batch(model, batch, device), dtype=dtype, mask_ratio=mask_ratio,
                     compile=compile_)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- Table 2 --------------------------------------------------------------------------------------

def _time_step(step: TrainStep, device, quick: bool) -> dict:
    if device.type == "cuda":
        return timing.time_cuda(step, warmup_ms=1.0, rep_ms=0.0 if quick else 500.0, min_reps=3, max_reps=20,
                                flush_l2=False, device=device)
    return timing.time_cpu(step, warmup=1, min_reps=2 if quick else 3, max_reps=5, budget_s=0.2 if quick else 1.0)


def _time_table2_cell(name, impl, dd, bs, dtype, device, mask_ratio, quick, progress, overrides,
                      cuda_graph=False) -> dict:
    # a function of its own: everything it allocates is freed when it returns (or raises)
    out = {}
    model = build_model(name, impl, device, decoder_depth=dd, **overrides)
    imgs = synthetic_batch(model, bs, device)
    graph_ok = cuda_graph  # both steps of a row are timed the same way: a speed-up of graph vs eager means nothing

    def time_mode(mode, graph):
        nonlocal graph_ok
        fwd = model if mode == "visible" else MaskTokenEncoderMAE(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = TrainStep(fwd, imgs, dtype=dtype, mask_ratio=mask_ratio, capturable=cuda_graph, fused=cuda_graph)
        out[f"{mode}_timing"] = "eager"
        if graph:
            try:
                step = GraphedTrainStep(step)
                out[f"{mode}_timing"] = "cuda-graph"
            except (RuntimeError, ValueError) as e:  # time it eagerly and say why
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                graph_ok = False
                out[f"{mode}_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        st = _time_step(step, device, quick)
        out[f"{mode}_ms"] = st["median_ms"]
        out[f"{mode}_reps"] = st["reps"]
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
           on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Times visible-only vs mask-token encoders; one row per (model, impl, decoder depth).

    cuda_graph (default: on a CUDA device, unless the dtype is fp16): time each step as a CUDA-graph
    replay (`GraphedTrainStep`), the GPU time without host dispatch, as XLA ran the paper's TPU steps;
    a step that cannot be captured is timed eagerly, and so is the other step of its row (a ratio of
    a replay to an eager step would mean nothing); the row says why. False: eager steps.
    on_row(rows so far) is called after each row (e.g. to save partial results under a time limit).
    batch: one for every model, or {model name: batch} (the others at GPU_TABLE2_BATCH / 8 on the CPU).
    """
    device = torch.device(device) if device is not None else default_device()
    if isinstance(batch, dict):
        batch = {resolve_model_name(k): v for k, v in batch.items()}
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and dtype != torch.float16
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs a CUDA device")
    peak = timing.measure_peak(device)
    rows = []
    # impl-major: each impl's rows for every model come together (the first impl's finish first when a
    # time limit cuts the run short)
    for impl, name in [(i, resolve_model_name(m)) for i in impls for m in models]:
        bs = (batch.get(name) if isinstance(batch, dict) else batch) or \
            (GPU_TABLE2_BATCH.get(name, 64) if device.type == "cuda" else 8)
        t_mask_by_depth = {}
        for dd in decoder_depths:
            row = {"model": name, "impl": impl, "decoder_depth": dd, "batch": bs, "mask_ratio": mask_ratio,
                   "dtype": str(dtype).replace("torch.", ""), "cuda_graph": bool(cuda_graph),
                   "fused": (overrides or {}).get("fused", False) if impl != "reference" else False,
                   "flop_ratio": flops_mod.table2_flop_ratio(name, dd, mask_ratio) if not overrides else
                   flops_mod.table2_flop_ratio(model_config(name, **overrides), dd, mask_ratio)}
            paper = flops_mod.PAPER_TABLE2.get((name, dd))
            if paper:
                row.update(paper_hours=paper[0], paper_speedup=paper[1], maemd_flop_ratio=paper[2])
            try:
                row.update(_time_table2_cell(name, impl, dd, bs, dtype, device, mask_ratio, quick, progress,
                                             overrides or {}, cuda_graph))
            except Exception as e:  # noqa: BLE001 - OOM or an impl that cannot run: a row that says so
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            free_memory()
            if "visible_ms" in row and "mask_tokens_ms" in row:
                row["speedup"] = row["mask_tokens_ms"] / row["visible_ms"]
                row["of_flop_bound"] = row["speedup"] / row["flop_ratio"]
                f = flops_mod.mae_flops(model_config(name, decoder_depth=dd, **(overrides or {})),
                                        mask_ratio=mask_ratio)["train"] * bs
                row["img_per_s"] = bs / (row["visible_ms"] * 1e-3)
                row["tflops"] = f / (row["visible_ms"] * 1e-3) / 1e12
                row["mfu"] = row["tflops"] / peak["matmul_tflops"]
                t_mask_by_depth[dd] = row["mask_tokens_ms"]
            rows.append(row)
            if on_row is not None:
                on_row(rows)
        # the paper's definition: every row against the mask-token encoder with decoder depth 8
        if 8 in t_mask_by_depth:
            for row in rows[-len(decoder_depths):]:
                if "visible_ms" in row:
                    row["speedup_vs_mask_dec8"] = t_mask_by_depth[8] / row["visible_ms"]
    return rows


def _f(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def _x(v, spec):
    return "-" if v is None else format(v, spec) + "x"


def format_table2(rows: list[dict], env: dict, peak: dict, note: str = "") -> str:
    lines = [f"Table 2 on {env['card']} ({env['date']}, torch {env['torch']}, commit {env['git_commit'][:12]})",
             f"measured peak: {peak['matmul_dtype']} matmul {peak['matmul_tflops']:.3g} TFLOP/s, "
             f"copy {peak['copy_gbps']:.0f} GB/s"]
    if note:
        lines.append(note)
    lines.append("speed-up = step time of the encoder with mask tokens / visible-only, same decoder depth; "
                 "FLOP bound = training-FLOP ratio (maefast.flops)")
    if any(r.get("cuda_graph") for r in rows):
        lines.append("steps timed as CUDA-graph replays with fused AdamW (GPU time without host dispatch, as XLA ran "
                     "the paper's TPU steps; --eager for eager steps, foreach AdamW as the official loop); * = a step "
                     "that could not be captured: both steps of that row timed eagerly")
    head = (f"{'model':<12} {'dec':>3} {'impl':<10} {'batch':>5} {'visible ms':>10} {'w/[M] ms':>9} "
            f"{'speed-up':>8} {'FLOP bnd':>8} {'of bnd':>6} {'vs[M]d8':>7} {'paper':>5} {'MAE.md':>6} {'MFU':>5}")
    lines += [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{SHORT.get(r['model'], r['model']):<12} {r['decoder_depth']:>3} {r['impl']:<10} "
                         f"{r['batch']:>5} {r['error']}")
            continue
        star = "*" if any(r.get(f"{m}_graph_error") for m in ("visible", "mask_tokens")) else ""
        impl = r["impl"] + {True: "+fused", "block": "+block"}.get(r.get("fused"), "")
        lines.append(f"{SHORT.get(r['model'], r['model']) + star:<12} {r['decoder_depth']:>3} {impl:<10} {r['batch']:>5} "
                     f"{r['visible_ms']:>10.2f} {r['mask_tokens_ms']:>9.2f} {r['speedup']:>7.2f}x "
                     f"{r['flop_ratio']:>7.2f}x {100 * r['of_flop_bound']:>5.0f}% "
                     f"{_x(r.get('speedup_vs_mask_dec8'), '.2f'):>7} {_x(r.get('paper_speedup'), '.1f'):>5} "
                     f"{_x(r.get('maemd_flop_ratio'), '.2f'):>6} {100 * r['mfu']:>4.0f}%")
    lines.append("paper = Table 2 (128 TPU-v3 cores, 800 epochs), measured against the mask-token encoder with "
                 "decoder depth 8 (compare with our vs[M]d8 column); MAE.md = its FLOP ratio at the same depth.")
    return "\n".join(lines)


def save_chart(rows: list[dict], path: str, title: str) -> None:
    """Grouped bars per (model, decoder depth): measured speed-up per impl, the paper's, the FLOP bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = []
    for r in rows:
        k = (r["model"], r["decoder_depth"])
        if k not in keys:
            keys.append(k)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    series = [(f"measured ({i}; vs w/[M], same depth)", {(r["model"], r["decoder_depth"]): r.get("speedup") for r in rows if r["impl"] == i})
              for i in impls]
    series.append(("paper (vs w/[M] dec 8)", {(r["model"], r["decoder_depth"]): r.get("paper_speedup") for r in rows}))
    series.append(("FLOP bound", {(r["model"], r["decoder_depth"]): r.get("flop_ratio") for r in rows}))
    series = [(label, vals) for label, vals in series if any(v for v in vals.values())]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys) + 2), 4.2))
    for j, (label, vals) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(keys))]
        ys = [vals.get(k) or 0.0 for k in keys]
        bars = ax.bar(xs, ys, width, label=label)
        for b, y in zip(bars, ys):
            if y:
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{SHORT.get(m, m)}\ndec {d}" for m, d in keys])
    ax.set_ylabel("speed-up of visible-only encoder (x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


_LETTERS = {"b": "base", "l": "large", "h": "huge"}


def _models(s: str) -> list[str]:
    return [_LETTERS.get(v.lower(), v) for v in _csv(s)]


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
    out = {}
    for item in _csv(text):
        name, _, n = item.partition("=")
        if not n.strip().isdigit() or int(n) < 1:
            raise ValueError(f"--batch: {item!r} is not model=N with N >= 1")
        out[resolve_model_name(name.strip())] = int(n)
    return out


def table2_main(argv) -> int:
    p = argparse.ArgumentParser(prog="maefast bench table2", description=__doc__.split("\n\n")[1])
    p.add_argument("--models", default=None, help="comma list (base,large,huge / small / tiny / full names); "
                   "default: base,large,huge on a GPU, small on the CPU")
    p.add_argument("--decoder-depths", default="8,1")
    p.add_argument("--impl", default=None, help="comma list of impls (reference, auto, triton, cuda); default: "
                   "reference, plus auto on a GPU when the model takes impl=")
    p.add_argument("--batch", default=None, help=f"N for every model, or per model: large=256,huge=192 (the others "
                   f"at their default); default: {GPU_TABLE2_BATCH} on a GPU, 8 on the CPU")
    p.add_argument("--dtype", default=None, help="bf16 (GPU default) / fp16 / fp32 (CPU default)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="fewer timed steps (3 per cell on a GPU)")
    p.add_argument("--eager", action="store_true", help="GPU: time eager steps (Python dispatch included) instead of "
                   "CUDA-graph replays (the default on a GPU: the paper's TPU steps ran XLA-compiled)")
    p.add_argument("--fused", default="off", choices=["off", "on", "block"],
                   help="the fast model's blocks (maefast train --fused); the reference rows ignore it")
    p.add_argument("--override", action="append", default=[], metavar="KEY=INT",
                   help="model config override (e.g. depth=2, embed_dim=128) for small experiments")
    p.add_argument("--json", default=None, help="write rows + environment to this file")
    p.add_argument("--png", default=None, help="save the chart here (default: next to --json, else none)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (1 is steadier on a busy machine)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device) if a.device else default_device()
    on_cpu = device.type == "cpu"
    models = _models(a.models) if a.models else (["small"] if on_cpu else ["base", "large", "huge"])
    impls = _csv(a.impl) if a.impl else (["reference"] + (["auto"] if accepts_impl() and not on_cpu else []))
    dtype = parse_dtype(a.dtype) if a.dtype else (torch.float32 if on_cpu else torch.bfloat16)
    depths = [int(v) for v in _csv(a.decoder_depths)]
    overrides = {}
    for kv in a.override:
        k, _, v = kv.partition("=")
        overrides[k] = float(v) if "." in v else int(v)
    if a.fused != "off":
        overrides["fused"] = {"on": True, "block": "block"}[a.fused]
    note = ""
    if on_cpu and not a.models:
        note = ("CPU: small config by default (mae_vit_small_cpu, batch 8, fp32); the paper's ViT-B/L/H take "
                "minutes per step here: pass --models base,large,huge to run them anyway")
    if note:
        print(note, file=sys.stderr)
    progress = (lambda msg: print(f"  timing {msg} ...", file=sys.stderr, flush=True))
    env, peak = timing.env_info(device), timing.measure_peak(device)

    def save_partial(rows_so_far):  # a run cut short (a time limit) still leaves its finished rows
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"kind": "maefast.table2", "env": env, "peak": peak, "note": note, "rows": rows_so_far,
                           "partial": True}, fh, indent=2, default=str)

    rows = table2(models, depths, impls, batch=parse_batches(a.batch), dtype=dtype, device=device, mask_ratio=a.mask_ratio,
                  quick=a.quick, progress=progress, overrides=overrides or None,
                  cuda_graph=False if (a.eager or on_cpu) else None, on_row=save_partial)
    text = format_table2(rows, env, peak, note)
    print(text)
    png = a.png or (a.json.rsplit(".", 1)[0] + ".png" if a.json else None)
    if png:
        try:
            save_chart(rows, png, f"MAE Table 2 on {env['card']} ({env['date'][:10]}, "
                                  f"{str(dtype).replace('torch.', '')})")
            print(f"chart: {png}")
        except ImportError as e:  # matplotlib is optional: the table and JSON still stand
            print(f"no chart ({e})", file=sys.stderr)
            png = None
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"kind": "maefast.table2", "env": env, "peak": peak, "note": note, "rows": rows,
                       "table": text.splitlines(), "png": png}, fh, indent=2)
        print(f"json: {a.json}")
    return 0 if all("error" not in r for r in rows) else 1


def data_main(argv) -> int:  # the loader benchmark is its own module (maefast/bench_data.py)
    from .bench_data import main as bench_data_main

    return bench_data_main(argv)


SUBCOMMANDS = {"table2": (table2_main, "the paper's Table 2: visible-only vs mask-token encoder step time"),
               "data": (data_main, "images/s of the paper's augmentation: maefast's loader vs the official one")}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: maefast bench <benchmark> [options]\n\nbenchmarks:")
        for k, (_, h) in SUBCOMMANDS.items():
            print(f"  {k:<8} {h}")
        print("\nthe per-op and step suites: pytest benchmarks/ [--gpu] [--benchmark-json=out.json]")
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    return SUBCOMMANDS[argv[0]][0](argv[1:])
