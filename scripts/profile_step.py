"""The kernel table of one training step (torch.profiler): where the GPU time of a step goes, kernel
by kernel, with the GEMM share and the attention time per step, so the next change is chosen from
data (issue 14: "attention kernel time per step vs cuDNN's inside the compiled torch-native step").

    python scripts/profile_step.py --providers maefast-block-graph,torch-native-graph --model huge --batch 128 \\
        --json profile.json

Each provider is a row of benchmarks/bench_step.py (`maefast.bench.make_step`): built, warmed up
(graph capture and torch.compile happen there, outside the profile), then `--steps` steps run under
torch.profiler (CUDA activity). A captured step (`*-graph`) is profiled as its graph replay, which
is what it runs; if the profiler sees no kernel inside the replay, the eager step of the same model is
profiled instead and the record says so (`profiled`). Kernel times are the profiler's self device
times divided by the number of steps. Categories (attention, gemm, optimizer, norm, maefast,
inductor, elementwise, copy, other) come from kernel names: `classify`.

--dry-run: checks the arguments and the classifier, no GPU. Writes the JSON (--json) and prints a
table per provider.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from maefast.graphs import first_line, process_broken  # noqa: E402

# Inductor's generated kernels first, by prefix: it names a kernel after the ops fused into it, so a
# layout copy or cast feeding SDPA reads `triton_poi_fused__scaled_dot_product_efficient_attention_clone_0`
# and a substring rule would count it as attention time.
INDUCTOR_PREFIXES = (
    ("gemm", ("triton_tem_",)),  # Inductor's matmul templates
    ("inductor", ("triton_poi", "triton_red", "triton_per", "triton_for", "triton_unk")),  # fused pointwise/reductions
)
# Then substrings, first match wins: attention before gemm (cuDNN's and CUTLASS's attention kernels name
# wgmma/cutlass). Attention = the kernels themselves: cuDNN's sdpa, flash_fwd/bwd, the mem-efficient
# fmha_cutlass* / attention_kernel_batched_impl / attention_backward_kernel, maefast's Triton `_attn_*`
# and its CUDA C++ `attention_fwd_wmma_kernel`.
CATEGORIES = (
    ("attention", ("_attn_", "attention", "flash", "fmha", "sdpa", "mha_", "_mha")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "_mm_", "splitk", "sm90_",
              "sm80_", "wgmma", "hmma")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("maefast", ("_bias_gelu", "_colsum", "norm_pix_loss", "unshuffle", "random_masking", "patch_embed",
                 "patch_gather")),
    ("norm", ("layer_norm", "layernorm", "_ln_")),
    ("copy", ("copy", "memcpy", "memset", "cast", "fill", "catarray")),
    ("elementwise", ("elementwise", "vectorized", "reduce_kernel", "softmax", "gelu", "unrolled")),
)
# Kernel names as the profiler reports them -> their category: the dry run and tests/test_gpu_check.py check it.
PROBE = {
    "_attn_fwd_kernel": "attention", "_attn_bwd_dkdv_kernel": "attention",
    "void (anonymous namespace)::attention_fwd_wmma_kernel<__nv_bfloat16, 64>((anonymous namespace)::AttnFwdParams)":
        "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0": "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, false, false>(Flash_fwd_params)":
        "attention",
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>(Flash_bwd_params)":
        "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",
    "void attention_kernel_batched_impl<AttentionKernel<cutlass::bfloat16_t, cutlass::arch::Sm80, true, 64, 64, 64>>":
        "attention",
    "triton_poi_fused__scaled_dot_product_efficient_attention_clone_0": "inductor",
    "triton_poi_fused__scaled_dot_product_cudnn_attention_permute_view_3": "inductor",
    "triton_red_fused__scaled_dot_product_flash_attention_backward_sum_7": "inductor",
    "triton_per_fused_native_layer_norm_3": "inductor", "triton_poi_fused_add_gelu_0": "inductor",
    "triton_tem_fused_addmm_0": "gemm",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "gemm", "nvjet_tst_128x256": "gemm",
    "multi_tensor_apply_kernel": "optimizer", "_norm_pix_loss_fwd_kernel": "maefast", "_ln_bwd_kernel": "norm",
    "_colsum_kernel": "maefast",
    "void at::native::vectorized_elementwise_kernel<4>": "elementwise",
}


def classify(name: str) -> str:
    """The category of a kernel, from its name (lower-cased): Inductor's prefixes, then substrings, first
    match wins."""
    low = name.lower()
    for cat, prefixes in INDUCTOR_PREFIXES:
        if low.startswith(prefixes):
            return cat
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _self_device_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):  # newer / older torch
        v = getattr(evt, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def kernel_table(prof, steps: int, top: int = 25) -> dict:
    """Per-step kernel times from a finished torch.profiler.profile."""
    import torch

    kernels = []
    for evt in prof.key_averages():
        dev = getattr(evt, "device_type", None)
        if dev != torch.autograd.DeviceType.CUDA:
            continue
        us = _self_device_us(evt)
        if us <= 0:
            continue
        kernels.append(dict(name=evt.key, category=classify(evt.key), calls_per_step=evt.count / steps,
                            ms_per_step=us / 1e3 / steps))
    return summarise(kernels, top)


def summarise(kernels: list[dict], top: int = 25) -> dict:
    """{total_ms_per_step, kernels_per_step, categories: {cat: ms, share}, gemm_share,
    attention_ms_per_step, top: [...]} from per-kernel rows (name, category, calls_per_step, ms_per_step)."""
    total = sum(k["ms_per_step"] for k in kernels)
    cats: dict = {}
    for k in kernels:
        cats[k["category"]] = cats.get(k["category"], 0.0) + k["ms_per_step"]
    kernels = sorted(kernels, key=lambda k: -k["ms_per_step"])
    return dict(total_ms_per_step=round(total, 3), kernels_per_step=round(sum(k["calls_per_step"] for k in kernels), 1),
                categories={c: dict(ms=round(v, 3), share=round(v / total, 4) if total else None)
                            for c, v in sorted(cats.items(), key=lambda kv: -kv[1])},
                gemm_share=round(cats.get("gemm", 0.0) / total, 4) if total else None,
                attention_ms_per_step=round(cats.get("attention", 0.0), 3),
                top=[dict(k, name=k["name"][:160], ms_per_step=round(k["ms_per_step"], 4),
                          calls_per_step=round(k["calls_per_step"], 2),
                          share=round(k["ms_per_step"] / total, 4) if total else None) for k in kernels[:top]])


def eager_twin(provider: str) -> str:
    """The step row a captured row's profile falls back to: the same row uncaptured where there is one
    (maefast-block-graph -> maefast-block), else the nearest eager row by name (torch-native-autotune-graph ->
    torch-native, maefast-sdpa-graph -> maefast: no uncaptured row of theirs exists)."""
    from maefast import bench as mb

    name = provider.removesuffix("-graph")
    while name not in mb.STEP_PROVIDERS and "-" in name:
        name = name.rsplit("-", 1)[0]
    return name


def profile_provider(provider: str, model: str, batch: int, steps: int, top: int, device) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from maefast import bench as mb

    t0 = time.time()
    mb.free_memory()
    step = mb.make_step(provider, model, batch, device=device)  # the row's own dtype (maefast.bench.step_dtype)
    dtype = step.step.dtype
    for _ in range(2):  # warm-up: compile, capture, autotune, allocator
        step()
    torch.cuda.synchronize(device)
    build_s = time.time() - t0

    def run(fn) -> dict:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize(device)
        return kernel_table(prof, steps, top)

    table = run(step)
    captured = step.step.captured
    eager_row = eager_twin(provider)  # the same row, not captured (or the nearest)
    profiled = "graph replay" if captured else "eager step"
    if table["kernels_per_step"] == 0 and captured:
        del step
        mb.free_memory()
        step = mb.make_step(eager_row, model, batch, device=device, dtype=dtype)
        for _ in range(2):
            step()
        table = run(step)
        profiled = f"eager step of {eager_row} (the profiler saw no kernel inside the graph replay)"
    del step
    mb.free_memory()
    return dict(provider=provider, model=model, batch=batch, dtype=str(dtype).replace("torch.", ""), steps=steps,
                profiled=profiled, build_and_warmup_s=round(build_s, 1), **table)


def format_table(r: dict) -> str:
    lines = [f"{r['provider']} {r['model']} b{r['batch']} ({r['profiled']}): {r['total_ms_per_step']} ms of kernels "
             f"per step, {r['kernels_per_step']} kernels, GEMM share {r['gemm_share']}, attention "
             f"{r['attention_ms_per_step']} ms"]
    lines.append("  " + ", ".join(f"{c} {v['ms']} ms ({(v['share'] or 0) * 100:.0f}%)" for c, v in r["categories"].items()))
    for k in r["top"][:15]:
        lines.append(f"  {k['ms_per_step']:>8.3f} ms {(k['share'] or 0) * 100:>5.1f}% x{k['calls_per_step']:<6g} "
                     f"{k['category']:<11} {k['name'][:90]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--providers", default="maefast-block-graph,torch-native-graph",
                    help="comma list of maefast.bench step providers, profiled in this order")
    ap.add_argument("--model", default="huge")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    from maefast import bench as mb
    from maefast.models.configs import resolve_model_name

    providers = [p.strip() for p in a.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in mb.STEP_PROVIDERS]
    if unknown:
        print(f"profile_step: unknown provider(s) {unknown}; known {sorted(mb.STEP_PROVIDERS)}", file=sys.stderr)
        return 2
    if min(a.batch, a.steps, a.top) < 1:  # refused here, not by every provider after its build on the card
        print(f"profile_step: --batch, --steps and --top must be >= 1, got {a.batch}, {a.steps}, {a.top}",
              file=sys.stderr)
        return 2
    try:
        model = resolve_model_name(a.model)
    except ValueError as e:
        print(f"profile_step: --model: {e}", file=sys.stderr)
        return 2
    # complete: False until every provider is done (gpu_check notes a profile cut short as partial)
    out = dict(model=model, batch=a.batch, steps=a.steps, providers=providers, results=[], complete=False)

    def save():  # atomically: a kill at the preset's budget leaves the last whole file
        if a.json:
            from maefast.train.checkpoint import atomic_write_text
            atomic_write_text(a.json, json.dumps(out, indent=1, default=str))

    if a.dry_run:
        bad = {k: (classify(k), v) for k, v in PROBE.items() if classify(k) != v}
        out.update(dry_run=True, complete=True)
        out["classifier_check"] = "ok" if not bad else bad
        save()
        print(f"profile_step (dry run): {providers} on {model} b{a.batch}; classifier {out['classifier_check']}")
        return 1 if bad else 0
    import torch

    if not torch.cuda.is_available():
        print("profile_step: needs a CUDA GPU (use --dry-run to check the arguments)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    for p in providers:  # each saved as it finishes: a run cut short keeps what it has
        try:
            r = profile_provider(p, model, a.batch, a.steps, a.top, dev)
        except Exception as e:  # noqa: BLE001 - one provider failing (out of memory, no capture) is a fact
            if process_broken(e):  # the CUDA allocator is unusable: the next providers could not be trusted
                raise
            r = dict(provider=p, error=first_line(e, 300))
        out["results"].append(r)
        save()
        print(format_table(r) if "error" not in r else f"{p}: FAILED {r['error']}", flush=True)
    att = {r["provider"]: r.get("attention_ms_per_step") for r in out["results"] if "error" not in r}
    ours = [v for k, v in att.items() if k.startswith("maefast") and v]
    theirs = [v for k, v in att.items() if not k.startswith("maefast") and v]
    if ours and theirs:
        out["attention_ms_ratio"] = round(min(ours) / min(theirs), 3)  # target <= 0.67
        print(f"attention kernel time per step, maefast / torch-native: {out['attention_ms_ratio']}")
    out["complete"] = True
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
