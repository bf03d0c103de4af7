"""Loss-curve PNG from the training logs (matplotlib's Figure drawn straight to PNG: no display, no pyplot)."""
from __future__ import annotations

import os

from .checkpoint import _atomic_write
from .rundir import read_jsonl

__all__ = ["plot_loss_curve", "read_jsonl"]


def plot_loss_curve(output_dir: str, out: str | None = None, title: str | None = None) -> str | None:
    """Plots loss per logged step (steps.jsonl) and per epoch (log.jsonl) into loss_curve.png.

    The per-step line is drawn last, above the epoch means, with a marker on every reading: on a
    short run its few points fall on the epoch points, and it must stay visible there.
    Returns the PNG path, or None when there is nothing to plot yet. Written atomically; a full disk
    raises RunError.
    """
    steps = read_jsonl(os.path.join(output_dir, "steps.jsonl"))
    epochs = [r for r in read_jsonl(os.path.join(output_dir, "log.jsonl")) if "train_loss" in r]
    if not steps and not epochs:
        return None
    # a Figure of its own, not pyplot's: no backend switched or figure left open in a caller's session
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o--", color="tab:orange",
                lw=1.0, ms=9, mfc="none", mew=1.5, zorder=2, label="epoch mean")
    if steps:
        few = len(steps) <= 50
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], "o-" if few else "-", color="tab:blue",
                lw=1.2, ms=3.5, zorder=3, label="train loss (mean over log window)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reconstruction loss (masked patches)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = out or os.path.join(output_dir, "loss_curve.png")
    # a full disk: RunError, one line, no temporary left
    _atomic_write(out, lambda f: fig.savefig(f, format="png"))
    return out
