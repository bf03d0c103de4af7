"""The `maefast` command (also `python -m maefast`). Subcommands live in their own modules and are
imported only when used, so `maefast --help` is fast and works without triton or a GPU."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "profile": ("maefast.profile", "per-stage timing of an MAE training step (default: small model, synthetic batch)"),
    "bench": ("maefast.bench", "benchmarks, e.g. `maefast bench table2` (the paper's Table 2 on this machine)"),
    "train": ("maefast.train", "MAE pre-training (the paper's recipe) on an image folder or --data synthetic"),
    "visualize": ("maefast.visualize", "PNG grid of original / masked / reconstruction from a checkpoint"),
    "info": ("maefast.cli", "what can run here: torch, triton, the CUDA extension, the GPU"),
}


def info_main(argv=None) -> int:
    import json

    import maefast

    print(json.dumps(maefast.backends(), indent=2))
    return 0


def usage() -> str:
    lines = ["usage: maefast <command> [options]   (no command: `maefast profile` on the embedded default)", "",
             "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    cmd = "profile"
    if argv and not argv[0].startswith("-"):
        cmd = argv.pop(0)
    if cmd not in COMMANDS:
        print(f"maefast: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if cmd == "info":
        return info_main(argv)
    module = importlib.import_module(COMMANDS[cmd][0])
    rc = module.main(argv)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
