"""`maefast train` options: one dataclass, its argparse front end, and the resolution of the
"auto" defaults (paper recipe on a GPU; a ~1-minute run on the CPU)."""
from __future__ import annotations

import argparse
import dataclasses
import numbers
import os
import sys
from dataclasses import dataclass, field

import torch

from ..cli import HelpFormatter, OneLineParser, positive  # noqa: F401 - the train and visualize parsers'

from .augment import DECODE_CHOICES, DECODES, DEFAULT_DECODE, SEED_LIMIT
from .schedule import BASE_LR, WARMUP_FRACTION, WEIGHT_DECAY, scaled_lr

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype's short spellings
GPU_MODEL, CPU_MODEL = "mae_vit_base_patch16", "mae_vit_small_cpu"
PAPER_EPOCHS, GPU_BATCH, CPU_BATCH = 800, 64, 32
SYNTHETIC_EPOCHS, CPU_SYNTHETIC_SIZE, GPU_SYNTHETIC_STEPS = 1, 4096, 200


@dataclass
class TrainConfig:
    """Options of ``maefast train`` (None = resolved by ``resolve_config``; see ``--help``)."""

    data: str = "synthetic"
    synthetic_size: int | None = None
    model: str | None = None
    input_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    accum_iter: int = 1
    blr: float = BASE_LR
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = WEIGHT_DECAY
    warmup_epochs: float | None = None
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    clip_grad: float | None = None
    dtype: str = "auto"
    impl: str = "auto"
    fused: str = "off"
    grad_checkpointing: bool = False
    cuda_graph: str = "auto"
    compile: bool = False
    fsdp: bool = False
    device: str | None = None
    workers: int | None = None
    decode: str = DEFAULT_DECODE
    image_dtype: str = "uint8"
    output_dir: str = "output_dir"
    resume: str | None = None
    overwrite: bool = False
    dist_timeout: float = 300.0
    seed: int = 0
    max_steps: int | None = None
    save_every_steps: int = 0
    keep_every_epochs: int = 0
    log_every: int = 10
    save: bool = True
    progress: bool = True
    export: bool = True
    plot: bool = True
    notes: list = field(default_factory=list)  # filled by resolve_config: which defaults were chosen
    # the options the user set (the command line's flags; in Python, the fields that differ from the
    # defaults): on --resume the others take the checkpoint's values (see maefast.train.resume)
    explicit: tuple | None = None


INTERNAL_FIELDS = ("notes", "explicit")  # not options: never recorded in a checkpoint's config


FUSED = {"off": False, "block": "block"}  # --fused -> the model's fused=
CUDA_GRAPH = ("auto", "on", "off")  # --cuda-graph -> TrainStep's capture= "auto" / True / False
# --image-dtype: what the data loader hands the model. uint8 (raw pixels, normalised inside the model's
# kernels) moves 4x fewer bytes to the GPU than float32 (normalised on the CPU) and trains the same
IMAGE_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}


def _model_names() -> str:
    from ..models.configs import ALIASES, MODEL_CONFIGS

    return ", ".join(MODEL_CONFIGS) + " (aliases: " + ", ".join(ALIASES) + ")"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="maefast train",
        description="MAE pre-training with the paper's recipe (AdamW 0.9/0.95, wd 0.05, lr = blr x batch / 256, "
                    "warm-up + cosine per iteration, RandomResizedCrop 0.2-1 + flip). Multi-GPU: "
                    "torchrun --nproc_per_node=N -m maefast train ... On --resume, options you leave out keep "
                    "the checkpoint's values (README, Training: the resume contract).",
        formatter_class=HelpFormatter)
    a = p.add_argument
    on_off = argparse.BooleanOptionalAction
    a("--data", default="synthetic", help="image folder (flat or class sub-folders) or 'synthetic'")
    a("--synthetic-size", type=int, default=None, help=f"images in the synthetic set (auto: {CPU_SYNTHETIC_SIZE} on "
                                                       f"the CPU, ~20 s on 2 idle cores; {GPU_SYNTHETIC_STEPS} "
                                                       "global batches on a GPU)")
    a("--model", default=None, help=f"one of {_model_names()} (auto: {GPU_MODEL} on a GPU, {CPU_MODEL} on the CPU)")
    a("--input-size", type=int, default=None, help="image size (auto: the model's img_size)")
    a("--epochs", type=int, default=None, help=f"auto: {PAPER_EPOCHS} (paper) for a folder, 1 for synthetic")
    a("--batch-size", type=int, default=None, help=f"per-process batch (auto: {GPU_BATCH} GPU, {CPU_BATCH} CPU)")
    a("--accum-iter", type=int, default=1, help="gradient accumulation steps")
    a("--blr", type=float, default=BASE_LR, help="base lr: lr = blr x batch x accum x world / 256")
    a("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    a("--min-lr", type=float, default=0.0, help="floor of the cosine schedule")
    a("--weight-decay", type=float, default=WEIGHT_DECAY,
      help="AdamW weight decay, on weights only (not biases, norm weights or the frozen pos_embed)")
    a("--warmup-epochs", type=float, default=None, help="auto: epochs x 40/800 (the paper's proportion)")
    a("--mask-ratio", type=float, default=0.75,
      help="fraction of the patches removed from each image, in (0, 1), at least one patch kept and one removed")
    a("--norm-pix-loss", action=on_off, default=False,
      help="per-patch normalised pixel targets (the official release recipe uses it)")
    a("--clip-grad", type=float, default=None, help="max grad norm (the paper: none)")
    a("--dtype", default="auto", choices=["auto", *DTYPES], help="autocast dtype (auto: bf16 on GPU, fp32 on CPU)")
    a("--impl", default="auto", help="kernel implementation handed to the model (auto|triton|cuda|reference|sdpa)")
    a("--fused", default="off", choices=["off", "block"],
      help="transformer blocks on the fast path: off (torch LayerNorm/GELU/Linear around maefast's attention; "
           "what --compile fuses), block (each block one op, LayerNorm/GELU recomputed in backward: ~40%% less "
           "activation memory)")
    a("--grad-checkpointing", action=on_off, default=False,
      help="activation checkpointing per block (same mask on recompute)")
    a("--cuda-graph", default="auto", choices=CUDA_GRAPH,
      help="capture the whole training step (forward, backward, AdamW, GradScaler, clipping, accumulation) in "
           "CUDA graphs and replay them: no Python or launch cost per step. auto: on one GPU when the step "
           "captures, else eager with the reason (several processes step eagerly); on: capture or stop; off: eager")
    a("--compile", action=on_off, default=False,
      help="torch.compile the model (fullgraph, static shapes; a model that breaks the graph is compiled with "
           "graph breaks, said once; under DDP/FSDP with the graph breaks of torch's wrappers)")
    a("--fsdp", action=on_off, default=False, help="shard with torch FSDP instead of DDP (under torchrun)")
    a("--device", default=None, choices=["cuda", "cpu"], help="auto: cuda when available")
    a("--workers", type=int, default=None, help="data-loader workers per process (auto)")
    a("--decode", default=DEFAULT_DECODE, choices=DECODE_CHOICES,
      help="how an image folder's crops are made: exact (the official pixels: full Pillow decode + Pillow bicubic), "
           "fast (crop box first, JPEG decoded at 1/2-1/8 where the crop allows, torch's uint8 bicubic), gpu (JPEGs "
           "decoded by nvJPEG through torchvision, cropped and resized on the GPU; needs torchvision and CUDA) or "
           "auto (the faster of gpu and fast on the record: fast until a record shows gpu ahead). Same boxes, "
           "flips and masks on every path; pixels within a level or so (README, Data loading)")
    a("--image-dtype", default="uint8", choices=list(IMAGE_DTYPES),
      help="images as the loader hands them to the model: uint8 (raw pixels, 150 KB per 224px image, normalised "
           "inside the model) or float32 (normalised on the CPU, 602 KB; for a model that cannot take uint8)")
    a("--output-dir", default="output_dir", help="checkpoints, logs, loss curve, exported encoder")
    a("--resume", default=None,
      help="checkpoint to continue exactly from, or 'auto' (OUTPUT_DIR/checkpoint-last.pth if there is one)")
    a("--overwrite", action="store_true",
      help="start over in an --output-dir that holds a run: its checkpoints, logs and export are deleted")
    a("--dist-timeout", type=float, default=300.0,
      help="seconds before a rank that stopped answering stops the run (named in the message); 30 s more is the "
           "wait limit of every collective, so the slowest step, a checkpoint write and a first --compile step "
           "must fit")
    a("--seed", type=int, default=0, help="seed of the initial weights, the data order, crops, flips and masks "
                                          "(0 <= seed < 2**32)")
    a("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many optimizer steps in total")
    a("--save-every-steps", type=int, default=0, help="also checkpoint every N optimizer steps (0: epoch ends only)")
    a("--keep-every-epochs", type=int, default=0, help="keep checkpoint-EPOCH.pth every N epochs (0: only the last)")
    a("--log-every", type=int, default=10, help="optimizer steps between loss readings (steps.jsonl, bar)")
    a("--save", action=on_off, default=True,
      help="write checkpoints (--no-save: a benchmark run; nothing to resume from, an interrupt loses the run)")
    a("--progress", action=on_off, default=True, help="progress bar on stderr")
    a("--export", action=on_off, default=True,
      help="write the encoder at the end (mae_pretrain_vit_base.pth etc.: the official release's names and layout)")
    a("--plot", action=on_off, default=True, help="draw loss_curve.png after every epoch")
    return p


def explicit_options(argv: list[str]) -> tuple[str, ...]:
    """The TrainConfig fields set on the command line ``argv`` (whatever their value)."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return tuple(sorted(vars(quiet.parse_args(argv))))


def config_from_args(argv=None) -> TrainConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    return TrainConfig(**vars(ns), explicit=explicit_options(argv))


def cpu_mask() -> set[int]:
    """The CPUs this process may run on (a container's share, or a launcher's binding), else all the machine's."""
    try:
        return set(os.sched_getaffinity(0)) or {0}
    except AttributeError:  # (no sched_getaffinity: macOS, Windows)
        return set(range(os.cpu_count() or 1))


def node_share(entries: list, host: str) -> tuple[int, int]:
    """(CPUs, processes) of the run on machine `host`, from every process's (host name, CPU mask): the union of
    the masks there (processes in one container share one mask; a launcher that binds each process, torchrun's
    --numa-binding, srun --cpus-per-task, gives each its own) and how many processes share it."""
    masks = [set(m) for h, m in entries if h == host]  # (two machines of one host name count as one: fewer workers)
    return len(set().union(*masks)), len(masks)


def resolve_config(cfg: TrainConfig, world_size: int = 1, cuda: bool | None = None,
                   node: tuple[int, int] | None = None) -> TrainConfig:
    """A copy of ``cfg`` with every None/"auto" default decided and validated; ``notes`` says which."""
    from ..models import model_config, resolve_model_name

    cfg = dataclasses.replace(cfg, notes=list(cfg.notes))
    if cuda is None:
        cuda = torch.cuda.is_available() if cfg.device is None else cfg.device == "cuda"
    cfg.device = cfg.device or ("cuda" if cuda else "cpu")
    on_gpu = cfg.device == "cuda"
    synthetic = cfg.data == "synthetic"
    cpu_auto = []
    if cfg.model is None:
        cfg.model = GPU_MODEL if on_gpu else CPU_MODEL
        if not on_gpu:
            cpu_auto.append(f"model {CPU_MODEL}")
    cfg.model = resolve_model_name(cfg.model)
    if cfg.input_size is None:
        cfg.input_size = int(model_config(cfg.model)["img_size"])
        if cpu_auto:
            cpu_auto.append(f"input {cfg.input_size}")
    if cfg.batch_size is None:
        cfg.batch_size = GPU_BATCH if on_gpu else CPU_BATCH
    if cfg.epochs is None:
        cfg.epochs = SYNTHETIC_EPOCHS if synthetic else PAPER_EPOCHS
        if synthetic:
            cpu_auto.append(f"{cfg.epochs} epoch")
    if synthetic and cfg.synthetic_size is None:
        cfg.synthetic_size = (GPU_SYNTHETIC_STEPS * cfg.batch_size * cfg.accum_iter * world_size if on_gpu
                              else CPU_SYNTHETIC_SIZE)
        cpu_auto.append(f"{cfg.synthetic_size} synthetic images")
    if cfg.warmup_epochs is None:
        cfg.warmup_epochs = cfg.epochs * WARMUP_FRACTION
    if cfg.dtype == "auto":
        bf16_ok = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
        cfg.dtype = "bfloat16" if on_gpu and bf16_ok else "float32"
    cfg.dtype = DTYPE_NAMES.get(cfg.dtype, cfg.dtype)
    cfg.cuda_graph = cuda_graph_mode(cfg.cuda_graph)
    if cfg.decode == "auto":
        from .gpu_decode import resolve_decode

        cfg.decode, note = resolve_decode(cfg.decode, cfg.device)
        cfg.notes.append(note)
    if cfg.workers is None:
        # node: (CPUs, processes) of the run on this machine (`node_share`); one process alone: its own mask
        cpus, procs = node if node is not None else (len(cpu_mask()), world_size)
        share = min(cpus // procs, len(cpu_mask()))  # (a process bound to fewer CPUs than the average: its own)
        cfg.workers = min(10, max(1, share - 1)) if on_gpu else (0 if cpus <= 4 else 2)
    if cpu_auto and not on_gpu:
        cfg.notes.append("no GPU: CPU defaults (" + ", ".join(cpu_auto) + "); pass --model/--input-size/--epochs/"
                         "--synthetic-size to change them")
    elif synthetic and (cfg.epochs == SYNTHETIC_EPOCHS):
        cfg.notes.append(f"synthetic data: {cfg.synthetic_size} images, {cfg.epochs} epoch(s)")
    if cfg.fsdp and world_size == 1:
        cfg.notes.append("--fsdp: one process, nothing to shard; the model trains unsharded (run it under torchrun)")
    if not synthetic and cfg.synthetic_size is not None and "synthetic_size" in (cfg.explicit or ()):
        raise ValueError(f"--synthetic-size is the size of --data synthetic; --data {cfg.data!r} has its own images")
    if cfg.overwrite and cfg.resume == "auto":
        raise ValueError("--overwrite starts the run in --output-dir over, --resume auto continues it: pass one")
    validate_config(cfg, world_size)
    if not synthetic:  # the checkpoint records where the images are, not where they were from the cwd
        cfg.data = os.path.abspath(cfg.data)
    return cfg


def cuda_graph_mode(value) -> str:
    """--cuda-graph's value as "auto" | "on" | "off" (a bool: the Python API and checkpoints before 'auto')."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


# what a distributed timeout can hold: torch passes it on in milliseconds as a 64-bit count
# (~9e12 s), Python's timedelta up to ~8.6e13 s; inf overflowed either (a traceback per rank)
MAX_DIST_TIMEOUT_S = 1e9


def check_dist_timeout(value) -> None:
    positive("--dist-timeout", value, optional=False)
    if value > MAX_DIST_TIMEOUT_S:
        raise ValueError(f"--dist-timeout must be at most {MAX_DIST_TIMEOUT_S:.0e} seconds, got {value}")


_KINDS = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,), "str": (str,)}


def check_types(cfg: TrainConfig) -> None:
    """Each option's type as its field declares it (the Python API; the command line's parser gives
    these): TypeError naming the option. A str "no" for a bool option was true, a float epoch count
    ran, an int option given as a str failed deep inside with a message naming nothing."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in INTERNAL_FIELDS:
            continue
        kinds = [k.strip() for k in str(f.type).split("|")]
        if f.name == "cuda_graph":
            kinds.append("bool")  # --cuda-graph's value as the Python API and older checkpoints give it
        v = getattr(cfg, f.name)
        if v is None and "None" in kinds:
            continue
        if not any(isinstance(v, _KINDS[k]) and (k == "bool" or not isinstance(v, bool)) for k in kinds if k in _KINDS):
            want = " or ".join(k for k in kinds if k != "None") + (" or None" if "None" in kinds else "")
            raise TypeError(f"--{f.name.replace('_', '-')} must be {want}, got {type(v).__name__} {v!r}")


def _check_geometry(cfg: TrainConfig) -> None:
    """--input-size against the model's patch size, and --mask-ratio by the model's own rule (one rule,
    one message: the one the model would raise at its first step)."""
    from ..cli import check_mask_ratio_flag
    from ..models import model_config

    patch = int(model_config(cfg.model)["patch_size"])
    if cfg.input_size % patch:
        raise ValueError(f"--input-size must be a multiple of {cfg.model}'s patch size {patch}, got {cfg.input_size}")
    patches = (cfg.input_size // patch) ** 2
    if patches >= 2 ** 31:  # (the position table alone would not fit in memory)
        raise ValueError(f"--input-size {cfg.input_size} makes {patches} patches per image; at most 2**31 - 1")
    check_mask_ratio_flag(cfg.mask_ratio, patches)


def validate_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Every option's rule, before anything is created (ValueError naming the option)."""
    from ..ops._dispatch import get_eager_dispatch

    get_eager_dispatch()  # a bad MAEFAST_EAGER_DISPATCH, before --overwrite empties a folder (not at a first step)
    if not isinstance(cfg.data, str) or not cfg.data.strip():  # "" would be the working folder once made absolute
        raise ValueError(f"--data must be an image folder or 'synthetic', got {cfg.data!r}")
    for name in ("epochs", "batch_size", "accum_iter", "input_size", "log_every", "blr"):  # (lr 0: nothing learnt)
        positive("--" + name.replace("_", "-"), getattr(cfg, name), optional=False)
    for name in ("min_lr", "weight_decay", "warmup_epochs", "save_every_steps", "keep_every_epochs",
                 "workers"):
        positive("--" + name.replace("_", "-"), getattr(cfg, name), allow_zero=True, optional=False)
    positive("--lr", cfg.lr)
    batch = cfg.batch_size * cfg.accum_iter * world_size
    peak, how = ((cfg.lr, "--lr") if cfg.lr is not None else
                 (scaled_lr(cfg.blr, batch), f"--blr {cfg.blr:g} x {batch} / 256"))
    if not peak < torch.finfo(torch.float32).max:  # AdamW keeps its lr in float32: a RuntimeError at its first step
        raise ValueError(f"the peak learning rate {peak:g} ({how}) is beyond float32's range")
    if cfg.min_lr > peak:  # the cosine "to min_lr" would climb after the warm-up, to min_lr at the end
        raise ValueError(f"--min-lr {cfg.min_lr:g} is above the peak learning rate {peak:g} ({how}): the cosine "
                         "decays from the peak to --min-lr")
    if cfg.warmup_epochs > cfg.epochs:  # (equal: a run that warms up throughout, then holds the peak)
        raise ValueError(f"--warmup-epochs {cfg.warmup_epochs:g} is beyond --epochs {cfg.epochs}: the learning rate "
                         "would never reach its peak")
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:  # inf is allowed: no clipping (NaN is not)
        raise ValueError(f"--clip-grad must be a number > 0, got {cfg.clip_grad}")
    check_dist_timeout(cfg.dist_timeout)
    if not 0 <= cfg.seed < SEED_LIMIT:  # the per-sample draws' range (maefast.train.augment)
        raise ValueError(f"--seed must be in [0, 2**32), got {cfg.seed}")
    positive("--max-steps", cfg.max_steps)
    positive("--synthetic-size", cfg.synthetic_size)
    _check_geometry(cfg)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)} or auto, got {cfg.dtype!r}")
    from ..ops._backend import MODEL_IMPLS

    if cfg.impl not in MODEL_IMPLS:
        raise ValueError(f"--impl must be one of {', '.join(MODEL_IMPLS)}, got {cfg.impl!r}")
    from ..cli import check_impls

    # what --fused rules out, and whether the backend runs on --device, in the other CLIs' words
    check_impls([cfg.impl], cfg.impl, cfg.fused, device=cfg.device)
    if cfg.impl == "reference" and cfg.fused == "block":
        raise ValueError("--fused block runs maefast's fast path in one op per block; --impl reference runs the "
                         "official forward as it is, without it: pick one")
    if cfg.impl == "reference" and cfg.grad_checkpointing:
        raise ValueError("--grad-checkpointing checkpoints the blocks of maefast's fast path; --impl reference runs "
                         "the official forward as it is, without checkpointing: pick one")
    if cfg.data != "synthetic" and cfg.data and os.path.isdir(cfg.data):
        data, out = os.path.realpath(cfg.data), os.path.realpath(cfg.output_dir)
        if out == data or out.startswith(data.rstrip(os.sep) + os.sep):
            raise ValueError(f"--output-dir {cfg.output_dir!r} is inside --data {cfg.data!r}: the run's own files "
                             "(its loss curve PNG) would become training images; put it elsewhere")
    if cfg.decode not in DECODES:
        raise ValueError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {cfg.decode!r}")
    if cfg.decode == "gpu":
        from .gpu_decode import unavailable_reason

        why = unavailable_reason(cfg.device)
        if why is not None:
            raise ValueError(f"--decode gpu (JPEGs decoded by nvJPEG through torchvision) cannot run here: {why}; "
                             "--decode fast decodes on the CPU with the same boxes, flips and masks")
    if cfg.fused == "on":  # a run recorded before it was removed
        raise ValueError("--fused on was removed (it never beat torch's LayerNorm/GELU in a measured step): "
                         "pass --fused off or --fused block")
    if cfg.fused not in FUSED:
        raise ValueError(f"--fused must be one of {sorted(FUSED)}, got {cfg.fused!r}")
    if cfg.cuda_graph not in CUDA_GRAPH:
        raise ValueError(f"--cuda-graph must be one of {', '.join(CUDA_GRAPH)}, got {cfg.cuda_graph!r}")
    if cfg.cuda_graph == "on":  # what TrainStep cannot capture whatever the model (auto steps these eagerly)
        bad = [why for cond, why in (
            (cfg.device != "cuda", "a CUDA device"),
            (world_size > 1, f"one process (DDP/FSDP step eagerly; this run has {world_size})")) if cond]
        if bad:
            raise ValueError("--cuda-graph on needs " + " and ".join(bad) + "; --cuda-graph auto falls back to eager")
    if cfg.image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"--image-dtype must be one of {', '.join(IMAGE_DTYPES)}, got {cfg.image_dtype!r}")
    if not cfg.save:
        said = [f"--{n.replace('_', '-')}" for n in ("save_every_steps", "keep_every_epochs") if getattr(cfg, n)]
        if said:
            raise ValueError(f"{' and '.join(said)} write checkpoints, --no-save writes none: pass one")
    if cfg.fsdp and cfg.dtype == "float16":
        raise ValueError("--fsdp with --dtype float16 is not supported (no sharded grad scaler here): use bfloat16")


def as_config(config: TrainConfig | dict | None, overrides: dict) -> TrainConfig:
    """`maefast.train.train`'s arguments as one TrainConfig; in the Python API the fields that differ from
    the defaults (or are overridden) count as set (`explicit`: the resume contract's "options you set")."""
    import dataclasses

    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig(**config)
    elif not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a maefast.train.TrainConfig, a dict of its fields or None, got "
                        f"{type(config).__name__} {config!r}")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    if config.explicit is None:
        default = TrainConfig()
        config = dataclasses.replace(config, explicit=tuple(sorted(
            f.name for f in dataclasses.fields(TrainConfig) if f.name not in INTERNAL_FIELDS
            and (getattr(config, f.name) != getattr(default, f.name) or f.name in overrides))))
    elif overrides:  # a config that says what was set (the command line's, a run's result): overrides are set too
        config = dataclasses.replace(config, explicit=tuple(sorted(
            set(config.explicit) | {k for k in overrides if k not in INTERNAL_FIELDS})))
    # paths as pathlib gives them, a torch.device: the strings the command line gives
    given = {k: os.fspath(getattr(config, k)) for k in ("data", "output_dir", "resume")
             if isinstance(getattr(config, k), os.PathLike)}
    if isinstance(config.device, torch.device):
        given["device"] = str(config.device)
    for f in dataclasses.fields(TrainConfig):  # numpy's numbers (np.int64(8)) as Python's, as the rest expects
        v = getattr(config, f.name)
        if isinstance(v, numbers.Number) and not isinstance(v, (bool, int, float)) and hasattr(v, "item"):
            given[f.name] = v.item()
    if given:
        config = dataclasses.replace(config, **given)
    check_types(config)
    return config
