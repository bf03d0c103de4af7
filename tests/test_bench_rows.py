"""What the benchmark rows record, checked on the CPU: each case's torch.compile is static and fresh,
FLOP counts have no gradient no one computes, a step row's peak memory is its own and it says whether
it was captured, every step row and Table 2 cell runs with cudnn.benchmark on, and README's ops table
quotes its record."""
from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from maefast import bench as mb
from maefast import table2 as t2
from test_bench import _FakeBenchmark, harness  # noqa: F401 - the harness fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_step_row_peak_memory_excludes_the_card_peak_measurement(harness, monkeypatch):
    """A step row's peak memory is its own: the card's peak (timing.measure_peak: ~2.25 GiB of buffers,
    once per process, which run_bench needs) is measured before the row is built and the allocator's
    peaks reset, not while the row is resident; reserved memory is recorded beside allocated. (CPU: a
    stand-in allocator counting GiB.)"""
    mem = {"cur": 0.0, "peak": 0.0, "reserved": 0.0}
    measured = []

    def measure_peak(dev):  # like the real one: its buffers allocated on the first call only
        if not measured:
            mem["peak"] = max(mem["peak"], mem["cur"] + 2.25)
            measured.append(dev)
        return {"matmul_tflops": 1.0, "copy_gbps": 1.0}

    monkeypatch.setattr(harness.timing, "measure_peak", measure_peak)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev: mem.update(peak=mem["cur"], reserved=mem["cur"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev: mem["peak"] * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda dev: mem["reserved"] * 2**30)
    dev = torch.device("cuda")
    harness.reset_peak_memory(dev)
    assert measured == [dev]
    mem.update(cur=0.5, peak=1.0, reserved=1.5)  # the row built and stepped: 1 GiB at its peak
    harness.timing.measure_peak(dev)  # what run_bench calls with the row resident: measured already
    assert harness.peak_memory(dev) == {"peak_mem_gib": 1.0, "peak_mem_reserved_gib": 1.5}
    assert harness.peak_memory(torch.device("cpu")) == {}
    src = open(os.path.join(ROOT, "benchmarks", "bench_step.py")).read()
    assert "mb.make_step(" in src[src.index("def _build("):src.index("def _train_step_pair(")]
    for name in ("test_train_step", "_train_step_pair"):  # a row alone, and the pair (its two rows together)
        body = src[src.index(f"def {name}("):]
        end = body.find("\ndef ", 1)
        body = body if end < 0 else body[:end]
        read = re.search(r"(?<!reset_)peak_memory\(device\)", body)
        assert read and body.index("reset_peak_memory(device)") < body.index("_build(") < read.start(), name


def test_compile_static_compiles_each_case_with_static_shapes():
    """One torch.compile object reused for a second shape is recompiled by dynamo's automatic-dynamic
    rule with symbolic sizes (the bug the op benchmarks' compile rows had); `mb.compile_static`, called
    per case as the benchmarks do, compiles every shape static."""
    dynamic = []

    def backend(gm, example_inputs):  # records whether dynamo handed over symbolic sizes
        dynamic.append(any(isinstance(v, torch.SymInt) for t in example_inputs
                           for v in (t.shape if isinstance(t, torch.Tensor) else (t,))))
        return gm.forward

    def f(x):
        return (x * 2).sum(1)

    reused = torch.compile(f, backend=backend)
    for n in (4, 6):
        reused(torch.randn(n, 8))
    assert dynamic == [False, True]  # the reuse the benchmarks no longer do
    dynamic.clear()
    for n in (4, 6):
        mb.compile_static(f, backend)(torch.randn(n, 8))
    assert dynamic == [False, False]
    for name in ("bench_masking", "bench_unshuffle", "bench_loss", "bench_fused"):  # every op compile row uses it
        src = open(os.path.join(ROOT, "benchmarks", f"{name}.py")).read()
        assert "compile_static(" in src and "torch.compile(" not in src, name


def test_mask_embed_fwd_bwd_flops_count_no_input_gradient(monkeypatch):
    """bench_masking's fwd+bwd FLOP rate: the backward of the official composition computes the patch
    embedding's weight gradient and no image gradient, FlopCounterMode says 2x the forward (not 3x)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    sys.modules.pop("bench_masking", None)
    import bench_masking as bm

    imgs, weight, bias, pos, p, _, _, _ = bm._setup(bm.CASES[0], torch.device("cpu"), requires_grad=True)
    fwd = bm._fn("reference", imgs, weight, bias, pos, p, bm.RATIO)
    with FlopCounterMode(display=False) as fc:
        x = fwd()[0]
    with FlopCounterMode(display=False) as fcb:
        torch.autograd.grad(x, (weight, bias), torch.ones_like(x))
    assert not imgs.requires_grad and fcb.get_total_flops() > 0
    assert (fc.get_total_flops() + fcb.get_total_flops()) / fc.get_total_flops() == bm.FWD_BWD_FLOPS == 2
    sys.modules.pop("bench_masking", None)


def test_step_rows_record_whether_they_were_captured(harness, monkeypatch):
    """A step row's record says how the row stepped (`captured`, the TrainStep's flag) and carries no
    `cuda_graph` (run_bench's flag for a capture of its own, which it never makes of a step row: False
    read as "not captured" in a captured row); the ratios still compare the rows' step times. (CPU: a
    stand-in capture, tests/fake_capture.py.)"""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        import fake_capture
    finally:
        sys.path.remove(os.path.join(ROOT, "tests"))
    fake_capture.install(monkeypatch)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    sys.modules.pop("bench_step", None)
    import bench_step

    try:
        case = ("mae_vit_tiny_test", 2)
        for provider in ("reference", "maefast-graph"):
            try:  # a skip raised inside the row would skip this test: it must fail it
                bench_step.test_train_step(_FakeBenchmark(), torch.device("cpu"), case, provider)
            except pytest.skip.Exception as e:
                pytest.fail(f"{provider} skipped on the CPU: {e}")
    finally:
        sys.modules.pop("bench_step", None)
    ref, graph = harness.RESULTS
    assert (ref["captured"], graph["captured"]) == (False, True)
    assert "cuda_graph" not in ref and "cuda_graph" not in graph
    assert graph["speedup_vs_baseline"] == pytest.approx(ref["time_ms"] / graph["time_ms"])
    harness.RESULTS.clear()


def test_step_rows_and_table2_cells_set_cudnn_benchmark(monkeypatch):
    """Every step row and Table 2 cell runs with torch.backends.cudnn.benchmark on, as the official
    recipe and `maefast train` (the patch embedding's conv gets cuDNN's fastest algorithm in every row
    alike), and the record says so."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    row = mb.make_step("reference", "tiny", 2, device="cpu")
    assert torch.backends.cudnn.benchmark is True and row.describe()["cudnn_benchmark"] is True
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    (cell,) = t2.table2(["tiny"], (1,), device="cpu", batch=2, quick=True)
    assert cell["cudnn_benchmark"] is True and torch.backends.cudnn.benchmark is True


def test_readme_ops_table_quotes_its_record():
    """README's ops table: every time is the 2026-11-27 record's (as rounded there), each ratio is the
    record's, and a row where the same run's torch.compile beat maefast says so."""
    rec = json.load(open(os.path.join(ROOT, "benchmarks", "results", "2026-11-27-h200-bench-suite.json")))
    times = {}
    for b in rec["benchmarks"]:
        e, shape = b["extra_info"], b["extra_info"]["shape"]
        if isinstance(shape, dict) and "N" in shape:
            times[(e["group"], shape.get("model") or shape.get("case"), shape["N"], e["provider"])] = e["time_ms"]
    cases = {"masking + visible patch embed, fwd (": ("mask-embed-fwd", "vit_h14"),
             "masking + visible patch embed, fwd+bwd": ("mask-embed-fwd-bwd", "vit_h14"),
             "un-shuffle fwd (": ("unshuffle-fwd", "p14"), "un-shuffle fwd+bwd": ("unshuffle-fwd-bwd", "p14"),
             "norm-pix loss fwd+bwd": ("loss-masked-fwd-bwd", "p14")}
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme[readme.index("| op (shape) | maefast Triton |"):]
    rows = [ln.split("|")[1:-1] for ln in table.split("\n\n")[0].splitlines()[2:]]
    assert len(rows) == len(cases)
    for label, ours, base, speedup, comp, vs_comp in rows:
        (group, shape), = [v for k, v in cases.items() if label.strip().startswith(k)]
        t = {p: times[(group, shape, 256, p)] for p in ("triton", "reference", "compile")}
        for cell, ms in ((ours, t["triton"]), (base, t["reference"]), (comp, t["compile"])):
            shown = cell.strip().removesuffix(" ms")
            assert float(shown) == pytest.approx(ms, abs=0.51 * 10 ** -len(shown.split(".")[1])), (label, cell, ms)
        assert float(speedup.strip().rstrip("x")) == pytest.approx(t["reference"] / t["triton"], abs=0.051), label
        ratio = t["compile"] / t["triton"]
        assert float(vs_comp.strip(" *").split("x")[0]) == pytest.approx(ratio, abs=0.051), label
        assert ("compile faster" in vs_comp) == (ratio < 1), (label, vs_comp)


def test_step_rows_count_training_flops_and_img_per_s(harness, monkeypatch):
    """A step row's FLOPs are the training step's (forward + backward) for its batch; img/s is the batch
    over the median step time."""
    from maefast import timing
    from maefast.flops import mae_flops

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    sys.modules.pop("bench_step", None)
    import bench_step

    try:
        row = mb.make_step("sdpa", "mae_vit_tiny_test", 2, device="cpu")
        monkeypatch.setattr(timing, "time_fn", lambda fn, dev, **kw: timing._summary([4.0, 4.0, 4.0]))
        info = bench_step._time_alone(_FakeBenchmark(), torch.device("cpu"), row, "mae_vit_tiny_test", 2, 0.0, {})
    finally:
        sys.modules.pop("bench_step", None)
    assert info["flops"] == mae_flops("mae_vit_tiny_test")["train"] * 2 and info["img_per_s"] == pytest.approx(500.0)


# -- what each step row builds (README's rows, bench_step's names) ----------------------------------

def _sdpa_swapped(model) -> bool:
    from maefast.reference.model import Attention

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    return bool(attns) and all(getattr(m.forward, "__func__", None) is mb._sdpa_attention_forward for m in attns)


@pytest.mark.parametrize("provider", [p for p in mb.STEP_PROVIDERS if p != "maefast-patch-hf"])
def test_each_step_row_builds_what_its_name_says(provider):
    """The rows' names are the record's and README's: "-graph" rows capture the step, the torch-native and
    "-compile" rows compile the model (only the autotune row with Inductor's max-autotune), only the
    reference row takes the official fp16 recipe; the torch-native rows are the official model with
    torch's SDPA, maefast's rows its own model (sdpa / block where the name says so)."""
    recipe = mb.STEP_PROVIDERS[provider]
    assert recipe.capture == provider.endswith("-graph"), provider
    assert recipe.compile == (provider.startswith("torch-native") or "-compile" in provider), provider
    assert recipe.compile_mode == ("max-autotune-no-cudagraphs" if "autotune" in provider else None), provider
    assert recipe.official_amp == (provider == "reference"), provider
    assert (provider in mb.TORCH_NATIVE_ROWS) == (provider == "sdpa" or provider.startswith("torch-native"))
    model = recipe.build("tiny", "cpu")
    assert _sdpa_swapped(model) == (provider in mb.TORCH_NATIVE_ROWS), provider
    if provider == "reference" or provider in mb.TORCH_NATIVE_ROWS:
        assert model.impl == "reference", provider
    elif provider != "maefast-patch":  # maefast.patch on the official class: tests/test_step.py
        want = ("sdpa" if "sdpa" in provider else "auto", "block" if "block" in provider else False)
        assert (model.impl, model.fused) == want, provider


def test_make_step_builds_the_row_it_is_asked_for(monkeypatch):
    """make_step hands TrainStep the compiled model for a compiled row (the backend and the row's mode
    passed on), the batch size and mask ratio asked for, and keeps the warm-up's updates (restore=False:
    a benchmark needs no pristine weights, and ViT-H would hold a second copy of them)."""
    compiled = []
    monkeypatch.setattr(mb, "compile_static", lambda m, backend=None, mode=None: compiled.append((backend, mode)) or m)
    row = mb.make_step("maefast", "tiny", 3, device="cpu", mask_ratio=0.5)
    assert compiled == [] and row.imgs.shape == (3, 3, 32, 32) and row.step.mask_ratio == 0.5
    assert row.step.restore is False
    row = mb.make_step("maefast-compile", "tiny", 2, device="cpu", compile_backend="aot_eager")
    assert compiled == [("aot_eager", None)]
    compiled.clear()
    monkeypatch.setitem(mb.STEP_PROVIDERS, "compiled-mode", mb.StepRecipe(mb._maefast, compile=True, compile_mode="m"))
    mb.make_step("compiled-mode", "tiny", 2, device="cpu")
    assert compiled == [(None, "m")]


def test_compile_static_is_one_graph_with_the_mode_asked_for(monkeypatch):
    """fullgraph=True: a graph break fails the row instead of timing a split graph; Inductor's mode goes
    to torch.compile, and not with another backend (it would refuse a mode)."""
    def broken(x):
        torch._dynamo.graph_break()
        return x + 1

    with pytest.raises(Exception, match="(?i)graph.?break"):
        mb.compile_static(broken, "eager")(torch.randn(2))
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    mb.compile_static(broken, None, "max-autotune-no-cudagraphs")
    mb.compile_static(broken, "aot_eager", "max-autotune-no-cudagraphs")
    assert [kw.get("mode") for kw in seen] == ["max-autotune-no-cudagraphs", None]
    assert [kw.get("backend") for kw in seen] == [None, "aot_eager"]


def test_step_row_helpers():
    # use_sdpa on a model without the official Attention would change nothing: a torch-native row would
    # time the model it was meant to replace
    with pytest.raises(ValueError, match="no reference Attention"):
        mb.use_sdpa(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    model = mb.build_model("tiny", "reference", "cpu", img_size=(32, 48))  # rectangular: (H, W)
    imgs = mb.synthetic_batch(model, 2, seed=1)
    assert imgs.shape == (2, 3, 32, 48) and torch.equal(imgs, mb.synthetic_batch(model, 2, seed=1))
    assert not torch.equal(imgs, mb.synthetic_batch(model, 2, seed=2))
    assert mb.parse_dtype("fp16") is torch.float16 and mb.parse_dtype("BF16") is torch.bfloat16
    assert mb.parse_dtype("float32") is torch.float32
    for bad in ("meta", "xla"):  # devices torch knows that the commands cannot run on
        with pytest.raises(ValueError, match="--device must be cpu or cuda"):
            mb.parse_device(bad)


def test_custom_op_row_goes_through_the_dispatcher():
    """maefast-custom-op measures the torch.library route: its ops reach the dispatcher as maefast::
    ops (the maefast row's direct autograd.Functions do not), and its forward keeps the signature
    TrainStep reads (seed=, return_pred=) as the maefast row's does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Namespaces(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.namespace)
            return func(*args, **(kwargs or {}))

    for provider, via_dispatcher in (("maefast-custom-op", True), ("maefast", False)):
        row = mb.make_step(provider, "tiny", 2, device="cpu")
        assert row.step._takes_seed and row.step._fwd_kwargs == {"return_pred": False}, provider
        with Namespaces() as mode:
            row()
        assert ("maefast" in mode.seen) == via_dispatcher, (provider, mode.seen)


def test_adamw_is_the_papers_and_rows_are_recipes():
    from maefast.train.schedule import param_groups_weight_decay

    model = mb.build_model("tiny", "reference", "cpu")
    opt = mb.adamw(model)
    assert opt.defaults["lr"] == 1.5e-4  # the paper's base lr
    # the official decay split (no decay for biases and norms), not one group decayed alike
    want = [({id(p) for p in g["params"]}, g["weight_decay"]) for g in param_groups_weight_decay(model)]
    assert [({id(p) for p in g["params"]}, g["weight_decay"]) for g in opt.param_groups] == want
    assert len({wd for _, wd in want}) == 2
    with pytest.raises(TypeError, match="StepRecipe"):
        mb.register_step_provider("mine", lambda name, device: None)
    assert "mine" not in mb.STEP_PROVIDERS


def test_torch_native_rows_run_torchs_sdpa(monkeypatch):
    """The torch-native rows' attention is F.scaled_dot_product_attention (issue 14), one call per block:
    in the eager row (a spy counts the calls) and inside the graph torch.compile traces of the whole model
    (dynamo follows the swapped forward; no softmax left); the reference row calls it nowhere."""
    import torch.nn.functional as F

    real, calls = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    blocks = 2 + 1  # tiny: depth 2, decoder_depth 1
    for provider, want in (("reference", 0), ("sdpa", blocks)):
        calls.clear()
        mb.make_step(provider, "tiny", 2, device="cpu")()
        assert len(calls) == want, provider
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    row = mb.make_step("torch-native", "tiny", 2, device="cpu", compile_backend=backend)
    row()
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
    assert len(graphs) == 1 and row.describe()["graph_breaks"] == 0
    assert sum("scaled_dot_product_attention" in t for t in targets) == blocks
    assert not any("softmax" in t for t in targets)


def test_every_step_row_steps_with_the_same_adamw_batch_and_mask_ratio(fake_capture):
    """Every row steps the same data at the same mask ratio with the paper's AdamW (lr, betas, eps, the
    official decay split over the same parameters); only the optimizer's kernel differs as the row's
    recipe says: foreach for the official recipe (`reference`), fused elsewhere, capturable where the step
    is captured. (CPU: a stand-in capture, compiled rows with aot_eager.)"""
    def groups(opt):  # (a captured step's lr is a float32 device tensor: compared as one)
        f32 = lambda v: torch.tensor(float(v), dtype=torch.float32).item()  # noqa: E731
        return [(f32(g["lr"]), g["betas"], g["eps"], g["weight_decay"], sum(p.numel() for p in g["params"]))
                for g in opt.param_groups]

    ref = mb.make_step("reference", "tiny", 2, device="cpu")
    for provider, recipe in mb.STEP_PROVIDERS.items():
        if provider == "maefast-patch-hf":  # transformers' layout: tests/test_bench.py
            continue
        row = mb.make_step(provider, "tiny", 2, device="cpu", compile_backend="aot_eager")
        row()
        opt, g0 = row.step.optimizer, row.step.optimizer.param_groups[0]
        assert groups(opt) == groups(ref.step.optimizer), provider
        want = (not recipe.official_amp, recipe.capture)
        assert (bool(g0.get("fused")), bool(g0.get("capturable"))) == want, provider
        assert row.step.captured == recipe.capture and row.step.mask_ratio == 0.75, provider
        assert torch.equal(row.imgs, ref.imgs), provider


def test_torch_native_ratios():
    recs = [dict(group="train-step", shape_key="a", provider="reference", time_ms=200.0),
            dict(group="train-step", shape_key="a", provider="torch-native", time_ms=120.0),
            dict(group="train-step", shape_key="a", provider="torch-native-graph", time_ms=100.0),
            dict(group="train-step", shape_key="a", provider="maefast-graph", time_ms=80.0),
            dict(group="train-step", shape_key="b", provider="maefast", time_ms=10.0),
            dict(group="other", shape_key="a", provider="x", time_ms=1.0)]
    mb.torch_native_ratios(recs)
    assert recs[3]["best_torch_native_provider"] == "torch-native-graph" and recs[3]["best_torch_native_ms"] == 100.0
    assert recs[3]["speedup_vs_best_torch_native"] == pytest.approx(1.25)
    assert recs[0]["speedup_vs_best_torch_native"] == pytest.approx(0.5)
    assert "best_torch_native_ms" not in recs[4] and "best_torch_native_ms" not in recs[5]


def test_free_memory_releases_the_l2_flush_buffer():
    """The 256 MiB L2-flush buffer per-op rows leave behind counted in the peak memory of every step row measured
    after them in one process (`pytest benchmarks/ --gpu`), pulling its ratio to the reference row towards 1."""
    from maefast import timing

    timing._flush_buffer(torch.device("cpu"))
    assert timing._L2_FLUSH
    mb.free_memory()
    assert timing._L2_FLUSH == {}
