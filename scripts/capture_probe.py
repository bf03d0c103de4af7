"""On a CUDA card (~1 minute): a host sync in the forward is refused before any capture begins
(maefast/graphs.py), and the process stays whole: no failed capture left torch's allocator broken.
gpu_check's verify preset runs it in a process of its own, before the `cuda` tests.

    python scripts/capture_probe.py OUT.json

Checks, in order (one process: a failure inside a capture ends the probe, recorded as such):
  refused      a tiny MAE (224 px, batch 16) whose forward calls ``loss.item()``:
               ``TrainStep(capture="auto").prepare()`` steps eagerly with the HostSyncError reason (found
               by the last warm-up step), the weights as before it, the sync debug mode restored
  memory       50 eager steps of that step, the batches copied through `maefast train`'s DeviceFeed
               (pinned, side stream, record_stream): ``memory_reserved`` after step 50 within 64 MiB of
               after step 10 (a broken allocator defers every record_stream'ed free: ~10 MB a step here)
  empty_cache  ``torch.cuda.empty_cache()`` works, and leaves no more reserved than before
  captures     the same model without ``.item()`` is captured in this process (capture=True) and its
               replays train
Writes OUT.json (torch, card, each check with its figures); exit 0 when every check passed, 1 when
one failed, 2 without a GPU.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maefast import bench as mb  # noqa: E402
from maefast import graphs  # noqa: E402
from maefast.step import TrainStep  # noqa: E402
from maefast.train.feed import DeviceFeed  # noqa: E402

BATCH, SIZE, STEPS, SETTLED = 16, 224, 50, 10
GROWTH_LIMIT = 64 * 2 ** 20


class Syncing(nn.Module):
    """The MAE with a logging line in its forward: ``loss.item()``, a host sync."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        out = self.inner(imgs, mask_ratio, noise)
        out[0].item()
        return out


def _batches(model, n):
    """n loader batches (`data.collate` dicts) in pinned host memory (two sources, alternated)."""
    src = [{"images": torch.randn(BATCH, 3, SIZE, SIZE).pin_memory(),
            "noise": torch.rand(BATCH, model.patch_embed.num_patches).pin_memory(), "bad": []} for _ in range(2)]
    return [dict(src[i % 2]) for i in range(n)]


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)


def run(checks: dict, dev: torch.device) -> None:
    torch.manual_seed(0)
    model = mb.build_model("tiny", "auto", dev, img_size=SIZE)
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(Syncing(model), _adamw(model), dtype=torch.bfloat16, seed=1)
    first = _batches(model, 1)[0]
    imgs, noise = first["images"].to(dev), first["noise"].to(dev)
    try:
        step.prepare(imgs, noise)
    except graphs.CaptureError as e:
        checks["refused"] = {"ok": False, "error": str(e), "allocator_broken": e.broken,
                             "note": "the sync was not found before the capture: the process is broken, probe ended"}
        return
    torch.cuda.synchronize()
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    mode = torch.cuda.get_sync_debug_mode()
    checks["refused"] = {"ok": (not step.captured and "HostSyncError" in (step.eager_reason or "") and same
                                and mode == 0),
                         "captured": step.captured, "eager_reason": step.eager_reason, "weights_as_before": same,
                         "sync_debug_mode_after": mode}
    del imgs, noise

    reserved = {}
    for i, batch in enumerate(DeviceFeed(_batches(model, STEPS), dev)):
        step(batch["images"], batch["noise"])
        del batch
        if i + 1 in (SETTLED, STEPS):
            torch.cuda.synchronize()
            reserved[i + 1] = torch.cuda.memory_reserved()
    growth = reserved[STEPS] - reserved[SETTLED]
    checks["memory"] = {"ok": growth <= GROWTH_LIMIT, "reserved_mib": {k: v / 2 ** 20 for k, v in reserved.items()},
                        "growth_mib": growth / 2 ** 20, "limit_mib": GROWTH_LIMIT / 2 ** 20,
                        "batch_mib": BATCH * 3 * SIZE * SIZE * 4 / 2 ** 20}

    del step
    r0 = torch.cuda.memory_reserved()
    try:
        torch.cuda.empty_cache()
        checks["empty_cache"] = {"ok": torch.cuda.memory_reserved() <= r0, "reserved_mib_before": r0 / 2 ** 20,
                                 "reserved_mib_after": torch.cuda.memory_reserved() / 2 ** 20}
    except RuntimeError as e:
        checks["empty_cache"] = {"ok": False, "error": str(e)[:400]}
        return

    torch.manual_seed(0)
    clean = mb.build_model("tiny", "auto", dev, img_size=SIZE)
    step = TrainStep(clean, _adamw(clean), dtype=torch.bfloat16, capture=True, seed=1)
    w = clean.blocks[0].mlp.fc1.weight.detach().clone()
    try:
        losses = [float(step(b["images"], b["noise"])) for b in DeviceFeed(_batches(clean, 3), dev)]
    except graphs.CaptureError as e:
        checks["captures"] = {"ok": False, "error": str(e), "allocator_broken": e.broken}
        return
    torch.cuda.synchronize()
    moved = not torch.equal(w, clean.blocks[0].mlp.fc1.weight)
    checks["captures"] = {"ok": step.captured and moved and all(map(math.isfinite, losses)),
                          "captured": step.captured, "losses": losses, "weights_moved": moved}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python scripts/capture_probe.py OUT.json", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("capture_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    record = {"kind": "maefast capture_probe", "torch": torch.__version__, "cuda": torch.version.cuda,
              "card": torch.cuda.get_device_name(), "checks": {}}
    t0 = time.time()
    try:
        run(record["checks"], torch.device("cuda"))
    except Exception as e:  # noqa: BLE001 - recorded: the record says what broke
        record["error"] = f"{type(e).__name__}: {e}"[:2000]
    record["seconds"] = round(time.time() - t0, 1)
    record["ok"] = "error" not in record and len(record["checks"]) == 4 and all(
        c["ok"] for c in record["checks"].values())
    with open(argv[0], "w") as f:
        json.dump(record, f, indent=1, default=str)
    for name, c in record["checks"].items():
        print(f"capture_probe {name}: {'ok' if c['ok'] else 'FAILED'} {json.dumps(c, default=str)[:300]}")
    if "error" in record:
        print(f"capture_probe error: {record['error'][:500]}")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
