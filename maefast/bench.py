"""`maefast bench`: the dispatcher of the `maefast bench <benchmark>` command, and the library the
training-step benchmarks share (`benchmarks/bench_step.py`, `maefast profile`, `maefast bench table2`):
`build_model`, `use_sdpa`, `adamw`, `STEP_PROVIDERS` and `make_step` (every row steps through
`maefast.TrainStep`).

    maefast bench table2 [options]      # the paper's Table 2 on this machine (maefast/table2.py)
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import sys
import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import timing
from .models.configs import model_config

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"--dtype must be one of {sorted(set(DTYPES))}, got {name!r}") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(name: str | None) -> torch.device:
    """--device of the bench and profile commands: a device torch knows and this machine has (default:
    CUDA when there is a GPU, else the CPU)."""
    if name is None:
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must name a torch device (cpu, cuda, cuda:1), got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {name!r}")
    return dev


# -- models ---------------------------------------------------------------------------------------

def build_model(name: str, impl: str = "reference", device=None, **overrides) -> nn.Module:
    """A model by name (``base``, ``mae_vit_large_patch16``, ...) built directly on `device`.

    ``impl="reference"`` is the official computation; any other impl is maefast.models.MaskedAutoencoderViT's
    ``impl=`` (a ValueError names an unknown one).
    """
    from .models import MaskedAutoencoderViT

    device = torch.device(device) if device is not None else default_device()
    cfg = model_config(name, **overrides)
    with torch.device(device):  # initialise on the device: ViT-H on the CPU first would take seconds
        model = MaskedAutoencoderViT(**cfg, impl=impl)
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


def synthetic_batch(model: nn.Module, batch: int, device=None, seed: int = 0) -> torch.Tensor:
    """ImageNet-normalised-looking random images for `model`'s img_size."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    h, w = model.patch_embed.img_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(batch, model.patch_embed.proj.in_channels, h, w, generator=g).to(device)


def adamw(model: nn.Module, lr: float = 1.5e-4, *, fused: bool = False, capturable: bool = False) -> torch.optim.AdamW:
    """The paper's AdamW (betas 0.9/0.95, the official decay split). fused=False: the default
    implementation (foreach on CUDA), as the official loop; fused=True: one kernel over all
    parameters; capturable=True: step counts on the device (a captured step needs it)."""
    kw = {"fused": True} if fused else {}
    if capturable:
        kw["capturable"] = True
    from .train.schedule import param_groups_weight_decay  # the official split (tokens are decayed)

    return torch.optim.AdamW(param_groups_weight_decay(model), lr=lr, betas=(0.9, 0.95), **kw)


# -- step providers (the rows of the step benchmark) ----------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepRecipe:
    """How a step-benchmark row builds its model and steps it.

    build(model_name, device, **config_overrides) -> the model. official_amp: fp16 autocast +
    GradScaler on a GPU with the default (foreach) AdamW, the official recipe; otherwise bf16 and
    fused AdamW. compile: torch.compile of the whole model (compile_mode: Inductor's mode, e.g.
    "max-autotune-no-cudagraphs"). capture: the step captured in one CUDA graph
    (`maefast.TrainStep(capture=True)`); a row that cannot capture does not run.
    """

    build: Callable[..., nn.Module]
    compile: bool = False
    capture: bool = False
    compile_mode: str | None = None
    official_amp: bool = False
    what: str = ""


def _reference(name, device, **overrides):
    return build_model(name, "reference", device, **overrides)


def _sdpa(name, device, **overrides):
    return use_sdpa(build_model(name, "reference", device, **overrides))


def _maefast(name, device, **overrides):
    return build_model(name, "auto", device, **overrides)


def _maefast_sdpa(name, device, **overrides):
    # the same model with torch's SDPA (cuDNN / flash on a GPU) for the attention: maefast's attention
    # against torch's with everything else equal
    return build_model(name, "sdpa", device, **overrides)


def _maefast_block(name, device, **overrides):
    # each transformer block one op (fused="block"): one autograd node per block, LN/GELU recomputed
    return build_model(name, "auto", device, fused="block", **overrides)


def _maefast_patch(name, device, **overrides):
    # maefast.patch on an official-layout instance (the reference class: facebookresearch/mae's keys and
    # methods, not maefast's own class, whose forward is the fast path already): what a user of the
    # official code gets
    from .patching import patch
    from .reference import MaskedAutoencoderViT as OfficialLayout

    device = torch.device(device)
    with device:  # initialise on the device (ViT-H on the CPU first would take seconds)
        model = OfficialLayout(**model_config(name, **overrides))
    return patch(model.to(device), impl="auto")


class TransformersStepAdapter(nn.Module):
    """transformers' ViTMAEForPreTraining behind the official call convention TrainStep uses:
    forward(imgs, mask_ratio, noise=None) -> (loss, logits, mask); the mask ratio is the config's."""

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


def _maefast_patch_hf(name, device, **overrides):
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
    return TransformersStepAdapter(patch(hf.to(device), impl="auto"), img, chans)


def _maefast_custom_op(name, device, **overrides):
    # every op called through the torch.library dispatcher (the route before 2026-11-27's direct
    # autograd.Functions): the row that measures what the direct route saves
    from .ops._dispatch import eager_dispatch

    model = build_model(name, "auto", device, **overrides)
    forward = model.forward

    @functools.wraps(forward)  # TrainStep reads the signature: seed= and return_pred= as the maefast row
    def forward_via_custom_ops(*args, **kwargs):
        with eager_dispatch("custom_op"):  # the backward follows the route its forward took
            return forward(*args, **kwargs)

    model.forward = forward_via_custom_ops
    return model


# name -> recipe, in the order the step benchmark runs them (the baselines first)
STEP_PROVIDERS: dict[str, StepRecipe] = {
    "reference": StepRecipe(_reference, official_amp=True,
                            what="the official computation, eager, fp16 autocast + GradScaler, foreach AdamW"),
    "sdpa": StepRecipe(_sdpa, what="torch-native, not compiled: the reference with scaled_dot_product_attention"),
    "torch-native": StepRecipe(_sdpa, compile=True, what="SDPA model under torch.compile (whole model), eager step"),
    "torch-native-graph": StepRecipe(_sdpa, compile=True, capture=True, what="torch-native, the step captured"),
    # the best variant a strong engineer would also try: Inductor's GEMM autotuning (its own Triton GEMM
    # templates against cuBLAS, epilogues fused), the graphs left to the captured step. Compiles for
    # minutes (not in the GPU check's presets; MAEFAST_BENCH_STEP_PROVIDERS runs it)
    "torch-native-autotune-graph": StepRecipe(_sdpa, compile=True, capture=True,
                                              compile_mode="max-autotune-no-cudagraphs",
                                              what="torch-native-graph compiled with mode='max-autotune-no-cudagraphs'"),
}
# the rows whose fastest is "best torch-native": what a strong engineer writes with torch alone
TORCH_NATIVE_ROWS = ("sdpa", "torch-native", "torch-native-graph", "torch-native-autotune-graph")

STEP_PROVIDERS.update({  # maefast's own model (impl="auto": its fused path; the reference ops on the CPU)
    "maefast": StepRecipe(_maefast, what="maefast's model (fused=False), eager step"),
    "maefast-graph": StepRecipe(_maefast, capture=True, what="maefast, the step captured"),
    "maefast-sdpa-graph": StepRecipe(_maefast_sdpa, capture=True,
                                     what='impl="sdpa": maefast\'s model with torch\'s SDPA attention, the step captured'),
    "maefast-block": StepRecipe(_maefast_block, what='fused="block", eager step'),
    "maefast-block-graph": StepRecipe(_maefast_block, capture=True, what='fused="block", the step captured'),
    "maefast-compile": StepRecipe(_maefast, compile=True, what="maefast's model under torch.compile, eager step"),
    "maefast-compile-graph": StepRecipe(_maefast, compile=True, capture=True,
                                        what="maefast's model under torch.compile, the step captured"),
    "maefast-patch": StepRecipe(_maefast_patch, what="maefast.patch on the official class, eager step"),
    "maefast-patch-hf": StepRecipe(_maefast_patch_hf, what="maefast.patch on transformers' ViTMAE, eager step"),
    "maefast-custom-op": StepRecipe(_maefast_custom_op, what="ops through the torch.library dispatcher"),
})


def register_step_provider(name: str, recipe: StepRecipe) -> None:
    """Adds a row to the step benchmark."""
    if not isinstance(recipe, StepRecipe):
        raise TypeError(f"recipe must be a maefast.bench.StepRecipe, got {type(recipe).__name__}")
    STEP_PROVIDERS[name] = recipe


def step_dtype(provider: str, device) -> torch.dtype:
    """A row's autocast dtype: the official fp16 for `reference` on a GPU, bf16 for the others; fp32 on the CPU."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.float16 if STEP_PROVIDERS[provider].official_amp else torch.bfloat16


class StepRow:
    """A step-benchmark row: `step` (a `maefast.TrainStep`) bound to a fixed synthetic batch; calling
    it runs one training step (a captured step reads its own input buffer: no copy is timed)."""

    def __init__(self, provider: str, step, imgs: torch.Tensor, model: nn.Module, recipe: StepRecipe):
        from torch._dynamo.utils import counters

        self.provider, self.step, self.model, self.recipe = provider, step, model, recipe
        counters["graph_break"].clear()  # this row's compile counts from here (`describe`)
        step.prepare(imgs)  # a captured row's warm-up compiles; an eager one compiles at its first call
        self.imgs = step.static_imgs if step.captured else imgs

    def __call__(self) -> torch.Tensor:
        return self.step(self.imgs)

    def describe(self) -> dict:
        """What the record says about how this row stepped."""
        s = self.step
        from torch._dynamo.utils import counters

        # a compiled row's graph breaks since it was built (0: compiled with fullgraph=True, a break raises);
        # read after the row ran (its first eager call compiles)
        breaks = sum(counters["graph_break"].values()) if self.recipe.compile and s.calls else None
        return {"captured": s.captured, "eager_reason": s.eager_reason, "compiled": self.recipe.compile,
                "graph_breaks": breaks,
                "mask_source": s.mask_source, "amp": str(s.dtype).replace("torch.", "")
                + (" + GradScaler" if s.scaler is not None and s.scaler.is_enabled() else ""),
                "optimizer": "AdamW " + ("fused" if s.optimizer.param_groups[0].get("fused") else
                                         "default (foreach)" if s.device.type == "cuda" else "default (for-loop)")
                + (", capturable" if s.optimizer.param_groups[0].get("capturable") else ""),
                "recipe": self.recipe.what, "cudnn_benchmark": torch.backends.cudnn.benchmark}


def cudnn_benchmark() -> bool:
    """Sets torch.backends.cudnn.benchmark = True, as the official main_pretrain.py and `maefast train` do
    (cuDNN times its algorithms for the patch embedding's conv and keeps the fastest), and returns the
    setting for the record. Every step row (`make_step`), every Table 2 cell and every `maefast profile` impl
    sets it: all rows alike."""
    torch.backends.cudnn.benchmark = True
    return torch.backends.cudnn.benchmark


def make_step(provider: str, name: str, batch: int, *, device=None, dtype: torch.dtype | None = None,
              mask_ratio: float = 0.75, compile_backend: str | None = None, **overrides) -> StepRow:
    """The step of one benchmark row, prepared (captured where the row captures) on a synthetic batch.

    Raises ValueError when the row cannot run here (unknown provider, no fast model, a captured row
    off a GPU) and RuntimeError when its capture fails. compile_backend: torch.compile's backend
    (default inductor; tests use "aot_eager").
    """
    if provider not in STEP_PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(STEP_PROVIDERS)}, got {provider!r}")
    from .step import TrainStep

    device = torch.device(device) if device is not None else default_device()
    recipe = STEP_PROVIDERS[provider]
    cudnn_benchmark()
    dtype = dtype if dtype is not None else step_dtype(provider, device)
    model = recipe.build(name, device, **overrides)
    fwd = compile_static(model, compile_backend, recipe.compile_mode) if recipe.compile else model
    opt = adamw(model, fused=not recipe.official_amp, capturable=recipe.capture)
    # the warm-up's updates are kept (restore=False): a benchmark needs no pristine weights
    step = TrainStep(fwd, opt, dtype=dtype, mask_ratio=mask_ratio, capture=recipe.capture, restore=False)
    return StepRow(provider, step, synthetic_batch(model, batch, device), model, recipe)


def compile_static(fn, backend=None, mode: str | None = None):
    """torch.compile of `fn` for one benchmark case (a step row, an op's compile row): dynamo's caches
    reset first and static shapes. Rows and sizes share code objects: without the reset dynamo guards
    each new case into a recompile (falling back to eager past its limit), and its automatic-dynamic
    rule compiles a size after the first with symbolic shapes, so a later case (ViT-H/14 b256) would
    time dynamic-shape code. fullgraph=True, as a strong engineer compiles a model: a graph break fails
    the row (its record says why) instead of timing a split, weaker graph. backend: torch.compile's (a
    name or a callable; default inductor; `mode` is Inductor's, ignored for another backend)."""
    torch._dynamo.reset()
    kw = {"backend": backend} if backend else ({"mode": mode} if mode else {})
    return torch.compile(fn, dynamic=False, fullgraph=True, **kw)


def torch_native_ratios(records: list[dict]) -> None:
    """Adds, in place, to every train-step record (and the interleaved pair's, `train-step-pair`): the
    best torch-native row of its shape in either group (`best_torch_native_provider`,
    `best_torch_native_ms`) and `speedup_vs_best_torch_native` (that time / this one)."""
    groups = ("train-step", "train-step-pair")
    best: dict[str, dict] = {}
    for r in records:
        if r.get("group") in groups and r.get("provider") in TORCH_NATIVE_ROWS and r.get("time_ms"):
            b = best.get(r["shape_key"])
            if b is None or r["time_ms"] < b["time_ms"]:
                best[r["shape_key"]] = r
    for r in records:
        b = best.get(r.get("shape_key")) if r.get("group") in groups else None
        if b is not None and r.get("time_ms"):
            r.update(best_torch_native_provider=b["provider"], best_torch_native_ms=b["time_ms"],
                     speedup_vs_best_torch_native=b["time_ms"] / r["time_ms"])

def free_memory() -> None:
    timing.release_flush_buffers()
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
        print(f"maefast bench: error: unknown benchmark {argv[0]!r} (known: {', '.join(BENCHMARKS)}; see maefast "
              "bench --help)", file=sys.stderr)
        return 2
    from .cli import guarded

    return guarded(f"maefast bench {argv[0]}", importlib.import_module(BENCHMARKS[argv[0]][0]).main, argv[1:])
