"""What each step row's forward keeps for its backward, counted without a GPU (and without memory):
the model is built on the meta device and run once, and every tensor autograd saves is tallied by
storage (a view of a storage already saved costs nothing more). Saved activations are what sets a
training step's peak memory above its weights, gradients and AdamW state, so this is where the
memory target of issue 14 (peak <= 0.5x the official recipe's) is won or lost, and a change to what
an op saves shows here before a card measures it.

    python scripts/saved_activations.py                          # ViT-H/14 b128, bf16
    python scripts/saved_activations.py --model large --batch 256 --providers reference,maefast-block --json out.json

The model runs in --dtype directly (autocast does not run on meta tensors): as under autocast, the
GEMMs save half-precision activations and weights (the count includes the weights, as autocast keeps
its half-precision copies of the fp32 ones for the backward). Rows that compile or capture step the
same model, and Inductor decides anew what to save, so they are not counted.
Weights, gradients and AdamW's two moments (fp32 parameters: 16 bytes each) are listed beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from maefast import bench as mb  # noqa: E402

DEFAULT_PROVIDERS = ("reference", "maefast", "maefast-block")


def saved_bytes(provider: str, model: str = "huge", batch: int = 128, dtype: torch.dtype = torch.bfloat16,
                mask_ratio: float = 0.75) -> dict:
    """{"saved_bytes", "by_shape": [(shape, dtype, bytes)] largest first, "param_state_bytes"} of one
    forward of the row's model on the meta device."""
    recipe = mb.STEP_PROVIDERS[provider]
    if recipe.compile or recipe.capture:
        raise ValueError(f"{provider}: a compiled or captured row saves what Inductor chooses; count its eager twin")
    net = recipe.build(model, "meta")
    n_params = sum(p.numel() for p in net.parameters())
    net = net.to(dtype)
    h, w = net.patch_embed.img_size
    imgs = torch.empty(batch, net.patch_embed.proj.in_channels, h, w, device="meta", dtype=dtype)
    seen: set = set()
    by_shape: Counter = Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata  # the storage, not the view: stable across calls, also on meta
        if key not in seen:
            seen.add(key)
            by_shape[(tuple(t.shape), str(t.dtype).replace("torch.", ""))] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(imgs, mask_ratio=mask_ratio)
    ranked = [(list(s), d, n) for (s, d), n in by_shape.most_common()]
    return {"provider": provider, "model": model, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
            "saved_bytes": sum(by_shape.values()), "by_shape": ranked, "param_state_bytes": 16 * n_params}


def format_result(res: list[dict], top: int = 6) -> str:
    base = next((r for r in res if r["provider"] == "reference"), None)
    lines = []
    for r in res:
        gib = r["saved_bytes"] / 2**30
        vs = f" ({r['saved_bytes'] / base['saved_bytes']:.2f}x reference)" if base and r is not base else ""
        lines.append(f"{r['provider']}: {gib:.2f} GiB saved for backward{vs}; weights + grads + AdamW "
                     f"{r['param_state_bytes'] / 2**30:.2f} GiB")
        for shape, dt, n in r["by_shape"][:top]:
            lines.append(f"    {n / 2**30:7.3f} GiB  {tuple(shape)} {dt}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="huge")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS))
    p.add_argument("--top", type=int, default=6, help="largest saved shapes listed per row")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    try:
        dtype = mb.parse_dtype(a.dtype)
        providers = [s.strip() for s in a.providers.split(",") if s.strip()]
        unknown = [s for s in providers if s not in mb.STEP_PROVIDERS]
        if unknown:
            raise ValueError(f"--providers: unknown row(s) {unknown}; known {sorted(mb.STEP_PROVIDERS)}")
        if a.batch <= 0:
            raise ValueError(f"--batch must be > 0, got {a.batch}")
        res = [saved_bytes(s, a.model, a.batch, dtype) for s in providers]
    except ValueError as e:
        print(f"saved_activations: {e}", file=sys.stderr)
        return 2
    print(format_result(res, a.top))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
