"""`maefast bench`: the dispatcher of the `maefast bench <benchmark>` command, and the library the
training-step benchmarks share (`benchmarks/bench_step.py`, `maefast profile`, `maefast bench table2`):
`build_model`, `use_sdpa`, `TrainStep`, `GraphedTrainStep`, `STEP_PROVIDERS`.

    maefast bench table2 [options]      # the paper's Table 2 on this machine (maefast/table2.py)
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import sys
import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.configs import model_config

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


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


# -- the `maefast bench` command -------------------------------------------------------------------

# name -> (module whose main(argv) runs it, one line of help); modules import on use
BENCHMARKS = {"table2": ("maefast.table2", "the paper's Table 2: visible-only vs mask-token encoder step time"),
              "data": ("maefast.bench_data", "images/s of the paper's augmentation: maefast's loader vs the official one")}


def usage() -> str:
    lines = ["usage: maefast bench <benchmark> [options]   (maefast bench <benchmark> --help for its options)", "",
             "benchmarks:"]
    lines += [f"  {k:<8} {h}" for k, (_, h) in BENCHMARKS.items()]
    lines += ["", "the per-op and step suites: pytest benchmarks/ [--gpu] [--benchmark-json=out.json]"]
    return "\n".join(lines)


def main(argv=None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in BENCHMARKS:
        print(f"maefast bench: unknown benchmark {argv[0]!r} (known: {', '.join(BENCHMARKS)})\n\n{usage()}",
              file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[argv[0]][0]).main(argv[1:]) or 0)
