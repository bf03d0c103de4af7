"""Where does the fast path's per-call time go on a GPU? (a step of scripts/gpu_check.sh)

On the H200 (2026-11-27) maefast's Triton LayerNorm ran 1.6-2.0x torch's through its raw launchers
but 0.11-0.45x through the custom op + autograd, and torch.compile's forward+backward was slow the
same way, while eager aten was not: the suspect is Python backward nodes (custom ops, compiled
graphs) run by autograd's device thread. This times one LayerNorm and one attention case, and the
ViT-B training step, each way:
  raw        the Triton launchers called directly (no autograd)
  op         maefast.ops through autograd (what the model runs: the direct autograd.Function route)
  op-custom  the same through the torch.library dispatcher (MAEFAST_EAGER_DISPATCH=custom_op, the
             route the H200 figures above were taken on)
  op-st      the same with torch.autograd.set_multithreading_enabled(False) (backward on this thread)
  eager      torch's own ops (C++ autograd nodes)
and the host wall time per call (perf_counter, synchronised after the loop), plus the Python
threads alive. Writes OUT/diagnose.json (argv[1]) and prints a table, both row by row.
"""
from __future__ import annotations

import json
import sys
import threading
import time

import torch
import torch.nn.functional as F


def host_us(fn, dev, n=50):
    from maefast import timing

    fn()
    timing.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    timing.synchronize(dev)
    return (time.perf_counter() - t0) / n * 1e6


def main(out_path: str | None = None) -> int:
    from maefast import ops, timing
    from maefast.kernels.layernorm import add_layer_norm_fwd, layer_norm_bwd

    import os

    cpu_check = os.environ.get("MAEFAST_DIAG_CPU") == "1"  # tiny sizes under TRITON_INTERPRET=1: exercises the code
    if not torch.cuda.is_available() and not cpu_check:
        print("diagnose_dispatch: no CUDA device; nothing to measure")
        return 0
    dev = torch.device("cpu" if cpu_check else "cuda")
    s = 64 if cpu_check else 1  # shrink factor on the CPU
    rows = []
    env = timing.env_info(dev)
    print(f"{'case':<34} {'way':<16} {'device ms':>10} {'host us/call':>13}", flush=True)

    from maefast.ops._dispatch import eager_dispatch

    def record(case, way, fn, single_thread=False):
        if way.startswith("op-custom"):
            def routed(fn=fn):
                with eager_dispatch("custom_op"):
                    return fn()
            fn = routed
        prev = None
        if single_thread:
            prev = torch.autograd.is_multithreading_enabled()
            torch.autograd.set_multithreading_enabled(False)
        try:
            t = timing.time_fn(fn, dev) if cpu_check else timing.time_cuda(fn, warmup_ms=10, rep_ms=60)
            h = host_us(fn, dev, n=3 if cpu_check else (10 if case.startswith("ViT") else 50))
        finally:
            if prev is not None:
                torch.autograd.set_multithreading_enabled(prev)
        rows.append(dict(case=case, way=way, device_ms=round(t["median_ms"], 4), host_us_per_call=round(h, 1)))
        r = rows[-1]
        print(f"{r['case']:<34} {r['way']:<16} {r['device_ms']:>10.4f} {r['host_us_per_call']:>13.1f}", flush=True)
        save()  # row by row: a step cut short by its time budget keeps what it measured

    def save():
        if out_path:
            result = {"env": env, "rows": rows, "python_threads": [t.name for t in threading.enumerate()]}
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1, default=str)

    # LayerNorm fwd+bwd, ViT-B encoder rows (256 x 50), bf16
    M, D = 12800 // s, 768
    x = torch.randn(M, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(D, device=dev, requires_grad=True)
    b = torch.randn(D, device=dev, requires_grad=True)
    dy = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
    if cpu_check:
        x, dy = x.detach().float().requires_grad_(), dy.float()

    def ln_raw():
        y, _, mean, rstd = add_layer_norm_fwd(x.detach(), None, w.detach(), b.detach(), 1e-6)
        return layer_norm_bwd(dy, None, x.detach(), w.detach(), mean, rstd)

    def ln_op():
        y = ops.layer_norm(x, w, b, 1e-6, impl="triton")
        return torch.autograd.grad(y, (x, w, b), dy)

    def ln_eager():
        y = F.layer_norm(x, (D,), w.to(x.dtype), b.to(x.dtype), 1e-6)
        return torch.autograd.grad(y, (x, w, b), dy)

    record("layernorm 12800x768 fwd+bwd", "raw", ln_raw)
    record("layernorm 12800x768 fwd+bwd", "op", ln_op)
    record("layernorm 12800x768 fwd+bwd", "op-custom", ln_op)
    record("layernorm 12800x768 fwd+bwd", "op-st", ln_op, single_thread=True)
    record("layernorm 12800x768 fwd+bwd", "eager", ln_eager)
    record("layernorm 12800x768 fwd+bwd", "eager-st", ln_eager, single_thread=True)

    # attention fwd+bwd, ViT-L encoder (256 x 50, 16 heads x 64), bf16
    B = 256 // s
    adt = torch.float16 if cpu_check else torch.bfloat16  # interpreter: bf16 dots wrong (patched in tests only)
    qkv = torch.randn(B, 50, 3 * 1024, device=dev, dtype=adt, requires_grad=True)
    dout = torch.randn(B, 50, 1024, device=dev, dtype=adt)

    def attn_op():
        return torch.autograd.grad(ops.visible_attention(qkv, 16, impl="triton"), qkv, dout)

    def attn_sdpa():
        q, k, v = qkv.reshape(B, 50, 3, 16, 64).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 50, 1024)
        return torch.autograd.grad(o, qkv, dout)

    record("attention 256x50x16x64 fwd+bwd", "op", attn_op)
    record("attention 256x50x16x64 fwd+bwd", "op-custom", attn_op)
    record("attention 256x50x16x64 fwd+bwd", "op-st", attn_op, single_thread=True)
    record("attention 256x50x16x64 fwd+bwd", "eager-sdpa", attn_sdpa)

    # un-shuffle fwd+bwd (p16 decoder: 256 x 49 visible of 196, width 512): a tiny kernel each way,
    # so its fwd+bwd time is almost all dispatch
    from maefast.reference import masking_ids

    Nu = 256 // s
    ids_u = masking_ids(Nu, 196, 0.75).ids_restore.to(dev)
    xv = torch.randn(Nu, 50, 512, device=dev, requires_grad=True)
    tok = torch.randn(1, 1, 512, device=dev, requires_grad=True)
    pos_u = torch.randn(1, 197, 512, device=dev)
    gu = torch.randn(Nu, 197, 512, device=dev)

    def unshuffle_op():
        return torch.autograd.grad(ops.unshuffle(xv, tok, ids_u, pos_u, impl="triton"), (xv, tok), gu)

    record("unshuffle 256x196x512 fwd+bwd", "op", unshuffle_op)
    record("unshuffle 256x196x512 fwd+bwd", "op-custom", unshuffle_op)
    record("unshuffle 256x196x512 fwd+bwd", "op-st", unshuffle_op, single_thread=True)

    # the ViT-B training step, batch 128, bf16
    from maefast import bench as mb

    model, batch = ("mae_vit_tiny_test", 2) if cpu_check else ("mae_vit_base_patch16", 128)
    for provider in ("reference", "maefast", "maefast-custom-op", "maefast-block"):
        step = mb.make_step(provider, model, batch, device=dev, dtype=torch.float32 if cpu_check else torch.bfloat16)
        record("ViT-B/16 step b128", provider, step)
        if provider in ("reference", "maefast"):
            record("ViT-B/16 step b128", provider + "-st", step, single_thread=True)
        del step
        mb.free_memory()

    save()
    print("python threads:", [t.name for t in threading.enumerate()])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
