"""Loss-curve PNG from the training logs (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import json
import os


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def plot_loss_curve(output_dir: str, out: str | None = None, title: str | None = None) -> str | None:
    """Plots loss per logged step (steps.jsonl) and per epoch (log.jsonl) into loss_curve.png.

    Returns the PNG path, or None when there is nothing to plot yet.
    """
    steps = read_jsonl(os.path.join(output_dir, "steps.jsonl"))
    epochs = read_jsonl(os.path.join(output_dir, "log.jsonl"))
    if not steps and not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="tab:blue", lw=1.2,
                label="train loss (mean over log window)")
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-", color="tab:orange",
                lw=1.5, ms=5, label="epoch mean")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reconstruction loss (masked patches)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = out or os.path.join(output_dir, "loss_curve.png")
    tmp = out + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
