"""MAE pre-training with the paper's recipe: ``maefast train`` and its Python entry ``train(config)``.

Example (CPU, about a minute)::

    from maefast.train import TrainConfig, train
    result = train(TrainConfig(data="synthetic", output_dir="runs/demo"))
    print(result["final_loss"], result["encoder"])   # .../mae_pretrain_vit_small_cpu.pth

Multi-GPU: ``torchrun --nproc_per_node=8 -m maefast train --data /imagenet/train --norm-pix-loss``.
"""
from __future__ import annotations

import sys

from .checkpoint import atomic_save, export_encoder, load_checkpoint, release_filename
from .config import TrainConfig, build_parser, config_from_args, resolve_config
from .errors import USER_ERRORS, Interrupted, RunError
from .loop import build_model, train
from .plot import plot_loss_curve
from .schedule import adjust_learning_rate, lr_at, param_groups_weight_decay, scaled_lr

PROG = "maefast train"


def main(argv=None) -> int:
    """``maefast train [options]`` (argv without the subcommand). An expected failure (a bad option, a
    file that is not what it should be, a full disk) is one line on stderr and exit code 2; an
    interruption (SIGINT/SIGTERM) saves the step reached and exits 130/143; a traceback means a bug."""
    cfg = config_from_args(sys.argv[1:] if argv is None else argv)
    try:
        train(cfg)
    except RunError as exc:
        if not exc.quiet:
            print(exc.line(PROG), file=sys.stderr, flush=True)
        return exc.exit_code
    except USER_ERRORS as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: stopped at once (Ctrl-C again, or before the run started): the step in progress is lost, "
              "the last checkpoint is intact", file=sys.stderr, flush=True)
        return 130
    return 0


__all__ = ["TrainConfig", "train", "main", "build_parser", "config_from_args", "resolve_config", "build_model",
           "atomic_save", "export_encoder", "load_checkpoint", "release_filename", "plot_loss_curve",
           "adjust_learning_rate", "lr_at", "param_groups_weight_decay", "scaled_lr", "RunError", "Interrupted"]
