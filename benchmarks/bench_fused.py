"""The memory-bound rest of a pre-norm ViT block (issue 6, item 2): residual add + LayerNorm and
bias + exact GELU, maefast's Triton kernels vs eager PyTorch vs torch.compile of the same PyTorch
composition. Decides which path the fast model uses for these ops.

Groups (speed-up = eager time / this, same run, same shape):
  add_ln-fwd        s = x + r; y = LN(s)                         (the block's `x + attn; norm2`)
  add_ln-fwdbwd     the same + backward to x, r, weight, bias with upstream grads for y and s
  ln-fwdbwd         plain LN forward + backward (norm1 of the first block, the final norms)
  bias_gelu-fwd     y = gelu(x + b), x the fc1 output without bias (rows x 4D)
  bias_gelu-fwdbwd  the same + backward to x and b
Providers: eager (baseline: `F.layer_norm(x + r)`, `F.gelu(x + b)`), compile (torch.compile of
that, static shapes, default mode), triton (maefast.ops with impl="triton": the custom ops with their
autograd), triton-raw (the same kernels through their launchers, no custom-op/autograd dispatch:
the kernels' own time; the difference to `triton` is per-call host overhead, which a GPU-bound
training step hides).

Shapes (GPU, --gpu; bf16, batch 256, mask ratio 0.75): encoder rows = 256 x (1 + 49) for ViT-B/16
and L/16, 256 x (1 + 64) for H/14, width D (LN) and 4D (GELU); decoder rows = 256 x 197 (p16) and
256 x 257 (p14), width 512 (LN) and 2048 (GELU). Select with -k, e.g. `-k "fwdbwd and H-enc"`.
CPU: one tiny case per group, Triton interpreted (its time means nothing there); torch.compile is
skipped on the CPU unless MAEFAST_BENCH_COMPILE_CPU=1.

GB/s counts the bytes a fused implementation must move (inputs read once, outputs written once,
bf16 activations, fp32 row statistics), the same figure for every provider, so extra traffic shows
as a lower GB/s; `frac_peak_bw` relates it to the measured device-to-device copy bandwidth.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from _harness import run_bench, sizes

from maefast._triton import HAS_TRITON
from maefast.bench import compile_static
from maefast.ops.bias_gelu import bias_gelu
from maefast.ops.layernorm import add_layer_norm

EPS = 1e-6
BATCH = 256
# (name, rows, D): LN width D, GELU width 4D (encoder) / 2048 (decoder)
CASES = sizes(cpu=[("tiny-enc", 2 * 50, 768)],
              gpu=[("B-enc", BATCH * 50, 768), ("L-enc", BATCH * 50, 1024), ("H-enc", BATCH * 65, 1280),
                   ("p16-dec", BATCH * 197, 512), ("p14-dec", BATCH * 257, 512)])
PROVIDERS = ["eager", "compile", "triton", "triton-raw"]
GROUPS = ["add_ln-fwd", "add_ln-fwdbwd", "ln-fwdbwd", "bias_gelu-fwd", "bias_gelu-fwdbwd"]


def _eager_add_ln(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b, EPS), s


def _eager_ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def _eager_bias_gelu(x, b):
    return F.gelu(x + b, approximate="none")


def _raw(group: str):
    """fn(inputs, grads) running the launchers of maefast.kernels directly (2-D inputs)."""
    from maefast.kernels.bias_gelu import bias_gelu_bwd, bias_gelu_fwd
    from maefast.kernels.layernorm import add_layer_norm_fwd, layer_norm_bwd

    op, kind = group.split("-")
    bwd = kind == "fwdbwd"

    def add_ln(inputs, grads):
        x, r, w, b = (t.detach() for t in inputs)
        y, s, mean, rstd = add_layer_norm_fwd(x, r, w, b, EPS)
        return layer_norm_bwd(grads[0], grads[1], s, w, mean, rstd) if bwd else (y, s)

    def ln(inputs, grads):
        x, w, b = (t.detach() for t in inputs)
        y, _, mean, rstd = add_layer_norm_fwd(x, None, w, b, EPS)
        return layer_norm_bwd(grads[0], None, x, w, mean, rstd) if bwd else y

    def bias_gelu_(inputs, grads):
        x, b = (t.detach() for t in inputs)
        y = bias_gelu_fwd(x, b)
        return bias_gelu_bwd(grads[0], x, b) if bwd else y

    return {"add_ln": add_ln, "ln": ln, "bias_gelu": bias_gelu_}[op]


def _fn(group: str, provider: str):
    """The callable that computes `group`'s forward for `provider`."""
    op = group.split("-")[0]
    if provider == "triton":
        return {"add_ln": lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS, impl="triton"),
                "ln": lambda x, w, b: add_layer_norm(x, None, w, b, EPS, impl="triton")[0],
                "bias_gelu": lambda x, b: bias_gelu(x, b, impl="triton")}[op]
    f = {"add_ln": _eager_add_ln, "ln": _eager_ln, "bias_gelu": _eager_bias_gelu}[op]
    return compile_static(f) if provider == "compile" else f


def _case(group: str, rows: int, d: int, name: str, device, dtype):
    """(inputs, upstream grads or None, bytes moved, shape record) for one group and case."""
    e = torch.finfo(dtype).bits // 8
    op, kind = group.split("-")
    bwd = kind == "fwdbwd"
    decoder = name.endswith("dec")
    width = d if op != "bias_gelu" else (2048 if decoder else 4 * d)
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).to(dtype)  # noqa: E731
    param = lambda v: v.requires_grad_(bwd)  # noqa: E731
    if op == "add_ln":
        inputs = [mk(rows, width).requires_grad_(bwd), mk(rows, width).requires_grad_(bwd),
                  param(1 + 0.1 * mk(width)), param(0.1 * mk(width))]
        grads = [mk(rows, width), mk(rows, width)] if bwd else None
        # fwd: read x, r; write y, s (+ fp32 mean, rstd). bwd: read dy, ds, s (+ stats); write dx.
        n_bytes = rows * width * e * (8 if bwd else 4) + rows * 8 * (2 if bwd else 1)
    elif op == "ln":
        inputs = [mk(rows, width).requires_grad_(bwd), param(1 + 0.1 * mk(width)), param(0.1 * mk(width))]
        grads = [mk(rows, width)] if bwd else None
        n_bytes = rows * width * e * (5 if bwd else 2) + rows * 8 * (2 if bwd else 1)
    else:
        inputs = [mk(rows, width, scale=2.0).requires_grad_(bwd), param(mk(width))]
        grads = [mk(rows, width)] if bwd else None
        # fwd: read x, write y. bwd: read dy, x; write dx.
        n_bytes = rows * width * e * (5 if bwd else 2)
    return inputs, grads, n_bytes, dict(case=name, rows=rows, width=width)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused(benchmark, device, case, group, provider):
    name, rows, d = case
    if provider.startswith("triton") and not HAS_TRITON:
        pytest.skip("triton is not importable")
    if provider == "compile" and device.type == "cpu" and os.environ.get("MAEFAST_BENCH_COMPILE_CPU") != "1":
        pytest.skip("torch.compile on the CPU compiles for ~20 s; set MAEFAST_BENCH_COMPILE_CPU=1 to include it")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs, grads, n_bytes, shape = _case(group, rows, d, name, device, dtype)
    if provider == "triton-raw":
        raw = _raw(group)

        def fn():
            return raw(inputs, grads)
    elif grads is None:
        f = _fn(group, provider)

        def fn():
            with torch.no_grad():
                return f(*inputs)
    else:
        f = _fn(group, provider)

        def fn():
            out = f(*inputs)
            outs = list(out) if isinstance(out, tuple) else [out]
            return torch.autograd.grad(outs, inputs, grads)

    kw = {} if device.type == "cuda" else dict(warmup=1, min_reps=2, max_reps=5, budget_s=0.5)
    run_bench(benchmark, fn, group=group, provider=provider, baseline=provider == "eager",
              bytes_moved=n_bytes, shape=shape, dtype=dtype, cuda_graph=True, **kw)
