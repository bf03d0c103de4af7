"""A training step's peak memory, estimated without a GPU (and without the memory): the step benchmark's
model runs two eager training steps through `maefast.TrainStep`'s pieces, as the rows step it (forward under
bf16 autocast with the forward's return_pred=False, backward, AdamW, gradients set to None) on fake
tensors (torch's FakeTensorMode: shapes, dtypes and storages, no data), and every storage an op makes is
counted from its creation until it is freed. The peak of that count is what the caching allocator's
`max_memory_allocated` reports, short of its rounding and the workspaces of cuBLAS / cuDNN.

    python scripts/peak_memory.py                                   # ViT-H/14 b128: reference, maefast, maefast-block
    python scripts/peak_memory.py --model large --batch 256 --providers reference,maefast-block --json out.json

Checked against a card (H200, 2026-12-04, commit 82633e2; ViT-H/14 b128, the step record's
peak_mem_gib): reference 33.07 GiB estimated / 33.54 measured, maefast 24.94 / 25.37, maefast-block
18.40 / 19.13 (the graphed row; those estimates called the model's forward itself, pred on every row: the
step's head on the masked rows peaks 0.06 GiB higher at 2026-12-08's maefast-block, in the gather's
backward, which holds its zeros and its scatter_add's result at once). So issue 14's memory target (peak
<= 0.5x the reference's) can be worked on here: a change to what an op saves or frees shows in this
estimate before a card measures it.
Eager rows only (a compiled row saves what Inductor decides; a captured one replays the eager step's
allocations from its own pool). The breakdown at the peak: parameters, gradients, AdamW state, and the
rest (activations saved for the backward, and temporaries).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import weakref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# impl="triton" is usable on the CPU under the interpreter (no kernel runs on fake tensors: their fake
# implementations do; what an op saves for its backward can depend on the backend, e.g. the loss's residual)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from maefast import bench as mb  # noqa: E402
from maefast.step import TrainStep  # noqa: E402

DEFAULT_PROVIDERS = ("reference", "maefast", "maefast-block")
GIB = 2 ** 30


KINDS = ("parameters", "gradients", "optimizer", "activations and temporaries")


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op returns, from its first sight until it is freed; keeps
    the peak, the phase it fell in, and the live bytes by kind then (`mark` names the parameters, the
    gradients and the optimizer state; everything else is activations and temporaries)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.phase, self.peak_phase = 0, 0, "", ""
        self._sizes: dict[int, int] = {}
        self._kind: dict[int, str] = {}
        self._desc: dict[int, tuple] = {}  # (shape, dtype) of the tensor a storage was first seen as
        self.peak_by_kind: dict[str, int] = {}
        self.peak_activations: dict[tuple, list[int]] = {}  # (shape, dtype) -> [count, bytes] at the peak

    def track(self, t) -> int | None:
        if not isinstance(t, torch.Tensor):
            return None
        st = t.untyped_storage()
        key = id(st)
        if key not in self._sizes:
            n = st.nbytes()
            self._sizes[key] = n
            self._desc[key] = (tuple(t.shape), str(t.dtype).replace("torch.", ""))
            self.live += n
            weakref.finalize(st, self._free, key)
            if self.live > self.peak:
                self.peak, self.peak_phase = self.live, self.phase
                self.peak_by_kind = dict.fromkeys(KINDS, 0)
                self.peak_activations = {}
                for k, b in self._sizes.items():
                    kind = self._kind.get(k, KINDS[-1])
                    self.peak_by_kind[kind] += b
                    if kind == KINDS[-1]:
                        c = self.peak_activations.setdefault(self._desc[k], [0, 0])
                        c[0], c[1] = c[0] + 1, c[1] + b
        return key

    def mark(self, tensors, kind: str) -> None:
        """Counts `tensors` (if not yet) as `kind` from now on (a peak already passed keeps its split)."""
        for t in tensors:
            key = self.track(t)
            if key is not None:
                self._kind[key] = kind

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._kind.pop(key, None)
        self._desc.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


@contextlib.contextmanager
def _to_cpu_is_a_no_op():
    """The rows' builders end with `model.to(device)`; on fake parameters that already live on the CPU,
    nn.Module.to would swap each for itself, which a FakeTensorMode's weak references refuse."""
    to = torch.nn.Module.to

    def same(self, *args, **kwargs):
        if [str(a) for a in args] == ["cpu"] and not kwargs:
            return self
        return to(self, *args, **kwargs)

    torch.nn.Module.to = same
    try:
        yield
    finally:
        torch.nn.Module.to = to


def peak_bytes(provider: str, model: str = "huge", batch: int = 128, steps: int = 2,
               dtype: torch.dtype = torch.bfloat16, mask_ratio: float = 0.75) -> dict:
    """{"peak_bytes", "phase" (e.g. "backward 1"), "at_peak": {parameters, gradients, optimizer, rest}
    bytes, "end_bytes" (live after the last step)} of `steps` eager steps of a step-benchmark row."""
    recipe = mb.STEP_PROVIDERS[provider]
    if recipe.compile or recipe.capture:
        raise ValueError(f"{provider}: a compiled or captured row allocates as Inductor or its graph pool decide; "
                         "estimate its eager twin")
    with FakeTensorMode():
        with _to_cpu_is_a_no_op():
            net = recipe.build(model, "cpu")  # built under the fake mode: no memory, no initialisation cost
        if getattr(net, "impl", None) == "auto":
            net.impl = "triton"  # what "auto" runs on a GPU (on the CPU it runs the reference ops)
        params = [p for p in net.parameters()]
        opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                                foreach=recipe.official_amp, fused=not recipe.official_amp)
        # the step rows' own step, eager: its forward kwargs (return_pred=False: the head on the masked rows
        # only), autocast and update. bf16 for every row: fp16 (the reference's) makes tensors of the same
        # sizes, and its GradScaler's check for infs reads a value (a fake tensor has none)
        step = TrainStep(net, opt, dtype=dtype, mask_ratio=mask_ratio, capture=False, seed=0)
        h, w = net.patch_embed.img_size
        imgs = torch.randn(batch, net.patch_embed.proj.in_channels, h, w)
        num_patches = (h // net.patch_embed.patch_size[0]) * (w // net.patch_embed.patch_size[1])
        noise = torch.rand(batch, num_patches)
        counter = LiveBytes()
        trained = [p for p in params if p.requires_grad]
        for p in trained:  # a gradient is counted as one from the moment it is accumulated
            p.register_post_accumulate_grad_hook(lambda q: counter.mark([q.grad], "gradients"))
        with counter:
            counter.mark(params, "parameters")
            for x in (imgs, noise):
                counter.track(x)
            for i in range(steps):
                counter.phase = f"forward {i}"
                loss = step.forward(imgs, noise)
                counter.phase = f"backward {i}"
                step.backward(loss)
                del loss
                counter.phase = f"optimizer {i}"
                step.optimizer_step()  # (gradients set to None)
                counter.mark((t for s in opt.state.values() for t in s.values()), "optimizer")
            end = counter.live
    top = sorted(counter.peak_activations.items(), key=lambda kv: -kv[1][1])
    return {"provider": provider, "model": model, "batch": batch, "peak_bytes": counter.peak,
            "phase": counter.peak_phase, "end_bytes": end, "at_peak": counter.peak_by_kind,
            "activations_at_peak": [{"shape": list(s), "dtype": d, "count": c, "bytes": b} for (s, d), (c, b) in top]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="huge")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS))
    ap.add_argument("--steps", type=int, default=2, help="eager steps (the second has the optimizer state)")
    ap.add_argument("--top", type=int, default=6, help="the largest activation groups (shape, dtype) at the peak")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    providers = [p.strip() for p in a.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in mb.STEP_PROVIDERS]
    if unknown:
        ap.error(f"unknown provider(s) {unknown}; rows: {', '.join(mb.STEP_PROVIDERS)}")
    if a.steps < 1 or a.batch < 1:
        ap.error("--steps and --batch must be >= 1")
    out, ref = [], None
    for p in providers:
        try:
            r = peak_bytes(p, a.model, a.batch, a.steps)
        except ValueError as e:
            print(f"peak_memory: {e}", file=sys.stderr)
            return 2
        out.append(r)
        ref = r if p == "reference" else ref
        vs = f" ({r['peak_bytes'] / ref['peak_bytes']:.2f}x reference)" if ref is not None and r is not ref else ""
        split = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["at_peak"].items())
        print(f"{p}: peak {r['peak_bytes'] / GIB:.2f} GiB{vs} in {r['phase']} ({split})", flush=True)
        for g in r["activations_at_peak"][:a.top]:
            print(f"    {g['bytes'] / GIB:7.3f} GiB  {g['count']:>4} x {tuple(g['shape'])} {g['dtype']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "rows": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
