"""maefast.flops (checked against torch's FlopCounterMode and MAE.md), `maefast bench table2` on tiny
configs (table, JSON, PNG), the Table 2 mask-token baseline, the step builders and the benchmark
harness's bookkeeping."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from maefast import bench as mb
from maefast import flops as fl
from maefast.models.configs import mlp_ratio_of
from maefast import table2 as t2
from maefast.models import create_model
from maefast.testing import assert_close
from cli_run import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAPER = ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- FLOP counter ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,ratio", [("tiny", 0.75), ("small", 0.75), ("tiny", 0.7)])  # 0.7: 16 * 0.3 = 4.8 kept
@pytest.mark.parametrize("mask_tokens", [False, True])
def test_flops_match_torch_flop_counter(name, ratio, mask_tokens):
    torch.manual_seed(0)
    model = mb.build_model(name, "reference", "cpu")  # the official computation
    imgs = torch.randn(2, 3, *model.patch_embed.img_size)
    fwd = t2.MaskTokenEncoderMAE(model) if mask_tokens else model
    with FlopCounterMode(display=False) as fc:
        loss = fwd(imgs, mask_ratio=ratio)[0]
    assert fc.get_total_flops() == 2 * fl.mae_flops(model, mask_ratio=ratio, encoder_mask_tokens=mask_tokens)["forward"]
    with FlopCounterMode(display=False) as fcb:
        loss.backward()
    f = fl.mae_flops(model, mask_ratio=ratio, encoder_mask_tokens=mask_tokens)
    # the images need no gradient: the backward has no patch-embedding input gradient, and neither has
    # the count every FLOP rate uses (train: bench_step, table2, maefast profile's MFU and stages)
    assert fcb.get_total_flops() == 2 * f["backward"] == 2 * (2 * f["forward"] - f["patch_embed"])
    assert fc.get_total_flops() + fcb.get_total_flops() == 2 * f["train"]


def test_mlp_ratio_of_gives_back_the_hidden_width():
    """int(width * ratio) is how the official model sizes its MLP: the ratio read off a model gives its width back,
    also where hidden / width lands a float just under the product (112 * (488 / 112) = 487.99999999999994)."""
    assert all(int(w * mlp_ratio_of(w, h)) == h for w in range(1, 200) for h in range(1, 5 * w))
    from maefast.reference.model import MaskedAutoencoderViT

    model = MaskedAutoencoderViT(img_size=16, patch_size=8, embed_dim=112, depth=1, num_heads=2,
                                 decoder_embed_dim=112, decoder_depth=1, decoder_num_heads=2,
                                 mlp_ratio=mlp_ratio_of(112, 488))
    assert model.blocks[0].mlp.fc1.out_features == 488
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 3, 16, 16))
    assert fc.get_total_flops() == fl.mae_flops(model)["forward"]  # one image


@pytest.mark.parametrize("name,dec8,dec1", [("mae_vit_base_patch16", 2.36, 3.58), ("mae_vit_large_patch16", 3.23, 3.88),
                                            ("mae_vit_huge_patch14", 3.60, 3.97)])
def test_table2_flop_ratios_match_mae_md(name, dec8, dec1):
    # The exact count of the official model (no patch-embedding input gradient: the images need none)
    # gives B 2.356/3.577, L 3.234/3.875, H 3.598/3.974: every one within 0.005 of MAE.md (the 3x-forward
    # count, with that gradient, left B and L decoder-1 0.02 / 0.014 off).
    r8, r1 = fl.table2_flop_ratio(name, 8), fl.table2_flop_ratio(name, 1)
    assert abs(r8 - dec8) <= 0.005, (name, r8)
    assert abs(r1 - dec1) <= 0.005, (name, r1)
    assert fl.PAPER_TABLE2[(name, 8)][2] == dec8 and fl.PAPER_TABLE2[(name, 1)][2] == dec1


@pytest.mark.parametrize("name,gflops", [("mae_vit_base_patch16", 58.5), ("mae_vit_large_patch16", 124.3),
                                         ("mae_vit_huge_patch14", 291.3)])
def test_training_flops_per_image_match_mae_md(name, gflops):
    assert abs(fl.mae_flops(name)["train"] / 1e9 - gflops) / gflops < 0.0015


def test_param_count_matches_the_model():
    for name in ("tiny", "small"):
        m = mb.build_model(name, "reference", "cpu")
        assert fl.param_count(m) == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert fl.dims_of(create_model("small")) == fl.dims_of("small")


def test_stage_flops_sum_to_forward():
    f = fl.mae_flops("mae_vit_large_patch16")
    assert sum(f["stage_fwd"].values()) == f["forward"]
    assert f["tokens"] == {"encoder": 50, "decoder": 197, "L": 196}
    assert fl.mae_flops("huge", encoder_mask_tokens=True)["tokens"]["encoder"] == 257


# -- Table 2 baseline and step builders -----------------------------------------------------------

def test_mask_token_encoder_sees_all_tokens_and_learns_its_token():
    torch.manual_seed(0)
    model = mb.build_model("tiny", "reference", "cpu")
    wrapped = t2.MaskTokenEncoderMAE(model)
    seen = []
    h = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask = wrapped(imgs, mask_ratio=0.75)
    h.remove()
    L = model.patch_embed.num_patches
    assert seen == [(3, L + 1, 64)]
    assert pred.shape == (3, L, 8 * 8 * 3) and mask.shape == (3, L)
    assert torch.equal(mask.sum(1), torch.full((3,), float(L - int(L * 0.25))))
    loss.backward()
    assert torch.isfinite(loss) and wrapped.encoder_mask_token.grad.abs().sum() > 0


def test_mask_token_encoder_on_the_fused_path_matches_the_reference_path():
    # impl="auto" on the CPU runs maefast's fused forward with each op's reference composition
    torch.manual_seed(0)
    ref = t2.MaskTokenEncoderMAE(mb.build_model("tiny", "reference", "cpu"))
    fast = t2.MaskTokenEncoderMAE(mb.build_model("tiny", "auto", "cpu"))
    fast.load_state_dict(ref.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    l_ref, _, m_ref = ref(imgs, noise=noise)
    l_fast, _, m_fast = fast(imgs, noise=noise)
    assert torch.equal(m_ref, m_fast)
    assert_close(l_fast, l_ref, torch.float32, name="loss")
    l_ref.backward()
    l_fast.backward()
    assert_close(fast.encoder_mask_token.grad, ref.encoder_mask_token.grad, torch.float32, name="token grad")
    assert_close(fast.model.blocks[0].attn.qkv.weight.grad, ref.model.blocks[0].attn.qkv.weight.grad,
                 torch.float32, name="qkv grad")


def test_sdpa_variant_matches_reference():
    torch.manual_seed(0)
    ref = mb.build_model("tiny", "reference", "cpu")
    sdpa = mb.use_sdpa(mb.build_model("tiny", "reference", "cpu"))
    sdpa.load_state_dict(ref.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    l1, p1, _ = ref(imgs, noise=noise)
    l2, p2, _ = sdpa(imgs, noise=noise)
    assert_close(p2, p1, torch.float32, name="pred")
    assert_close(l2, l1, torch.float32, name="loss")


def test_train_step_updates_parameters():
    row = mb.make_step("reference", "tiny", 2, device="cpu")
    assert row.step.mask_source == "model" and not row.step.captured  # the official model draws its mask
    before = row.model.blocks[0].mlp.fc1.weight.detach().clone()
    loss = row()
    assert torch.isfinite(loss)
    assert not torch.equal(before, row.model.blocks[0].mlp.fc1.weight)
    with pytest.raises(ValueError, match="provider"):
        mb.make_step("nope", "tiny", 2)


def test_build_model_impl():
    assert mb.build_model("tiny", "reference", "cpu").impl == "reference"
    with pytest.raises(ValueError, match="impl"):
        mb.build_model("tiny", "no-such-impl", "cpu")


def test_parse_dtype():
    assert mb.parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        mb.parse_dtype("int8")


# -- the CLI --------------------------------------------------------------------------------------

def test_table2_cli_tiny(tmp_path):
    out = tmp_path / "t2.json"
    r = run_cli("bench", "table2", "--models", "tiny", "--decoder-depths", "8,1", "--batch", "2", "--quick",
                "--threads", "1", "--json", str(out))
    text = r.stdout
    assert r.returncode == 0, r.stderr
    assert "Table 2 on CPU" in text and "tiny (test)" in text and "FLOP bound" in text
    # column names a reader understands without the source
    for name in ("visible-only", "mask-token", "encoder, ms", "speed-up vs", "mask-token dec 8", "paper's"):
        assert name in text, name
    for cryptic in ("w/[M]", "of bnd", "vs[M]d8", "MAE.md"):
        assert cryptic not in text, cryptic
    rec = json.loads(out.read_text())
    assert rec["kind"] == "maefast.table2" and rec["env"]["card"].startswith("CPU")
    assert {"torch", "git_commit", "date"} <= set(rec["env"]) and rec["peak"]["matmul_tflops"] > 0
    rows = rec["rows"]
    assert [(r["model"], r["decoder_depth"]) for r in rows] == [("mae_vit_tiny_test", 8), ("mae_vit_tiny_test", 1)]
    for r in rows:
        assert "error" not in r
        assert r["visible_ms"] > 0 and r["mask_tokens_ms"] > 0
        # every cell, the first one too, was warmed up until its time settled
        assert r["visible_warmup_calls"] >= 3 and r["mask_tokens_warmup_calls"] >= 3
        assert r["speedup"] == pytest.approx(r["mask_tokens_ms"] / r["visible_ms"])
        assert r["flop_ratio"] == pytest.approx(fl.table2_flop_ratio("tiny", r["decoder_depth"]))
        assert r["speedup_vs_mask_dec8"] > 0
    png = rec["png"]
    assert png == str(tmp_path / "t2.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_table2_chart_labels_read_without_the_source(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    labels = []
    real_savefig = plt.Figure.savefig

    def spy(fig, path, **kw):  # the legend and tick labels of the chart being saved
        ax = fig.axes[0]
        labels.extend(t.get_text() for t in ax.get_legend().get_texts())
        labels.extend(t.get_text() for t in ax.get_xticklabels())
        labels.append(ax.get_ylabel())
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    rows = [{"model": "mae_vit_large_patch16", "impl": "reference", "decoder_depth": 8, "speedup": 2.5,
             "paper_speedup": 2.8, "flop_ratio": 3.23}]
    t2.save_chart(rows, str(tmp_path / "c.png"), "title")
    text = " | ".join(labels)
    assert "mask-token encoder" in text and "8-block decoder" in text and "FLOP bound" in text, text
    assert not any(c in text for c in ("w/[M]", "[M]", "dec 8)")), text


def test_bench_usage_and_unknown_benchmark():
    r = run_cli("bench", timeout=120)
    assert r.returncode == 0 and "table2" in r.stdout
    r = run_cli("bench", "nope", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "unknown benchmark 'nope'" in r.stderr and "table2" in r.stderr, r.stderr


@pytest.mark.parametrize("args,needle", [(["--batch", "x"], "--batch"), (["--models", "nope"], "unknown model"),
                                         (["--decoder-depths", "0"], "--decoder-depths"),
                                         (["--dtype", "int8"], "dtype"), (["--override", "depth=two"], "--override"),
                                         (["--override", "nope=3"], "'nope' is not a model setting"),
                                         (["--override", "decoder_depth=2"], "--decoder-depths"),
                                         (["--impl", "foo"], "--impl takes"), (["--mask-ratio", "1.5"], "--mask-ratio"),
                                         (["--threads", "-1"], "--threads"), (["--bogus"], "unrecognized"),
                                         (["--png", "/no/such/dir/x.png"], "--png"),
                                         (["--decoder-depths", ","], "at least one depth"),
                                         (["--override", "patch_size=0"], "patch_size must be a positive integer"),
                                         (["--override", "num_heads=5"], "not divisible by num_heads=5"),
                                         (["--models", "tiny", "--mask-ratio", "0.99"], "= 0 patches")])
def test_table2_bad_arguments_are_one_line(args, needle):
    r = run_cli("bench", "table2", *args, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and needle in r.stderr, r.stderr


def test_warm_up_runs_until_the_step_time_settles():
    """A step that starts slow and speeds up over its first calls (as a cold CPU step does): the timed
    median is the settled time, not the cold start's."""
    import time

    cold = [0.080, 0.060, 0.045, 0.030, 0.020]
    calls = []

    def step():
        time.sleep(cold[len(calls)] if len(calls) < len(cold) else 0.010)
        calls.append(1)

    st = t2.time_step(step, torch.device("cpu"), quick=True)
    assert st["warmup_calls"] >= len(cold) + 1
    assert st["median_ms"] < 15.0, st


def test_format_table2_shows_paper_columns():
    rows = [{"model": "mae_vit_large_patch16", "impl": "reference", "decoder_depth": 1, "batch": 64,
             "visible_ms": 10.0, "mask_tokens_ms": 35.0, "speedup": 3.5, "flop_ratio": 3.87, "of_flop_bound": 0.9,
             "speedup_vs_mask_dec8": 4.0, "paper_speedup": 3.7, "maemd_flop_ratio": 3.88, "mfu": 0.3},
            {"model": "mae_vit_huge_patch14", "impl": "auto", "decoder_depth": 8, "batch": 32, "error": "OOM"}]
    env = {"card": "X", "date": "d", "torch": "t", "git_commit": "c" * 40}
    text = t2.format_table2(rows, env, {"matmul_dtype": "bf16", "matmul_tflops": 700.0, "copy_gbps": 3000.0})
    assert "ViT-L/16" in text and "3.7x" in text and "4.00x" in text and "3.87x" in text and "90%" in text
    assert "OOM" in text
    header, sub = [ln for ln in text.splitlines() if ln.startswith("model")][0], None
    lines = text.splitlines()
    sub = lines[lines.index(header) + 1]
    row = [ln for ln in lines if ln.startswith("ViT-L/16")][0]
    # the two header lines and the row line up: each value sits under its own column
    assert len(header) <= len(row) and len(sub) <= len(row)
    assert row.index("4.00x") > header.index("speed-up vs") and row.index("3.7x") > header.index("paper's")


# -- the benchmark harness's bookkeeping ----------------------------------------------------------

class _FakeBenchmark:
    def __init__(self):
        self.extra_info, self.group, self.calls = {}, None, 0

    def pedantic(self, fn, rounds=1, iterations=1, warmup_rounds=0):
        self.calls += 1
        fn()


@pytest.fixture
def harness():
    """benchmarks/_harness.py, imported from the checkout, with an empty result list."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import _harness
    finally:
        sys.path.pop(0)
    _harness.RESULTS.clear()
    yield _harness
    _harness.RESULTS.clear()


def test_harness_records_and_ratios(harness):
    _harness = harness
    a = torch.randn(64, 64)
    b1, b2 = _FakeBenchmark(), _FakeBenchmark()
    _harness.run_bench(b2, lambda: torch.mm(a, a), group="g", provider="other", flops=2 * 64**3, shape=(64,),
                       budget_s=0.01)
    _harness.run_bench(b1, lambda: a @ a, group="g", provider="ref", baseline=True, flops=2 * 64**3,
                       bytes_moved=3 * 64 * 64 * 4, shape=(64,), dtype=torch.float32, budget_s=0.01)
    for b in (b1, b2):
        info = b.extra_info
        assert b.calls == 1 and b.group == "g"
        assert info["time_ms"] > 0 and info["tflops"] > 0 and info["baseline_provider"] == "ref"
        assert {"card", "date", "torch", "triton", "git_commit"} <= set(info)
    assert b1.extra_info["speedup_vs_baseline"] == 1.0 and b1.extra_info["gbps"] > 0 and b1.extra_info["dtype"] == "float32"
    assert b2.extra_info["speedup_vs_baseline"] == pytest.approx(b1.extra_info["time_ms"] / b2.extra_info["time_ms"])
    lines = _harness.summary_lines()
    assert any("ref" in ln for ln in lines) and "peak" in _harness.session_record()
    _harness.RESULTS.clear()


def test_harness_peak_memory_ratio(harness):
    _harness = harness
    b1, b2 = _FakeBenchmark(), _FakeBenchmark()
    a = torch.randn(16, 16)
    i1 = _harness.run_bench(b1, lambda: a @ a, group="s", provider="ref", baseline=True, shape=(1,), budget_s=0.01)
    i2 = _harness.run_bench(b2, lambda: a @ a, group="s", provider="fast", shape=(1,), budget_s=0.01)
    i1["peak_mem_gib"], i2["peak_mem_gib"] = 10.0, 5.5  # set after the run, as bench_step does
    _harness.update_ratios()
    assert i2["peak_mem_vs_baseline"] == pytest.approx(0.55) and i1["peak_mem_vs_baseline"] == 1.0
    _harness.RESULTS.clear()


def test_bench_step_sizes_from_env(harness, monkeypatch):
    """MAEFAST_BENCH_STEP_MODELS: `name:batch` takes every row, `name:batch@a+b` only those rows."""
    import importlib

    monkeypatch.setenv("MAEFAST_BENCH_STEP_MODELS", "huge:64, huge:192@reference+maefast-block")
    monkeypatch.setenv("MAEFAST_BENCH_STEP_PROVIDERS", "reference,sdpa")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.setattr(harness, "_GPU_MODE", True)
    sys.modules.pop("bench_step", None)
    try:
        bs = importlib.import_module("bench_step")
        assert bs.PARAMS == [(("mae_vit_huge_patch14", 64), "reference"), (("mae_vit_huge_patch14", 64), "sdpa"),
                             (("mae_vit_huge_patch14", 192), "reference"),
                             (("mae_vit_huge_patch14", 192), "maefast-block")]
        monkeypatch.setenv("MAEFAST_BENCH_STEP_MODELS", "huge:64@reference+nope")
        sys.modules.pop("bench_step", None)
        with pytest.raises(ValueError, match="unknown provider.*nope"):
            importlib.import_module("bench_step")
    finally:
        sys.modules.pop("bench_step", None)


def test_captured_rows_refuse_the_cpu():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        mb.make_step("maefast-graph", "tiny", 2, device="cpu")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        t2.table2(["tiny"], (1,), device="cpu", cuda_graph=True)


def test_step_rows_optimizers():
    """reference: the official loop's default (foreach) AdamW and fp16 + GradScaler on a GPU; every
    other row fused AdamW and bf16; the captured rows' AdamW capturable."""
    assert mb.step_dtype("reference", "cuda") is torch.float16 and mb.step_dtype("sdpa", "cuda") is torch.bfloat16
    assert mb.step_dtype("reference", "cpu") is torch.float32
    model = mb.build_model("tiny", "reference", "cpu")
    assert all(g["capturable"] and g["fused"] for g in mb.adamw(model, fused=True, capturable=True).param_groups)
    assert not any(g.get("capturable") or g.get("fused") for g in mb.adamw(model).param_groups)
    assert mb.adamw(model).defaults["betas"] == (0.9, 0.95)


def test_harness_without_cuda_records_eager_only(harness):
    _harness = harness
    b = _FakeBenchmark()
    a = torch.randn(16, 16)
    _harness.run_bench(b, lambda: a @ a, group="g", provider="ref", baseline=True, shape=(16,), cuda_graph=True,
                       budget_s=0.01)
    assert b.extra_info["cuda_graph"] is False and b.extra_info["eager_time_ms"] is None
    _harness.RESULTS.clear()


@pytest.mark.cuda
def test_table2_graph_rows_on_gpu():
    rows = t2.table2(["tiny"], (1,), ["reference", "auto"], batch=4, dtype=torch.bfloat16, device="cuda", quick=True)
    for r in rows:
        assert "error" not in r, r
        assert r["cuda_graph"] and r["visible_timing"] == "cuda-graph" and r["mask_tokens_timing"] == "cuda-graph", r


def test_patched_transformers_step_row():
    """The step row of maefast.patch on transformers' ViTMAE: same weights as the reference model, and
    its step trains (fp32, CPU)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    row = mb.make_step("maefast-patch-hf", "tiny", 2, device="cpu")
    torch.manual_seed(0)
    ref = mb.build_model("tiny", "reference", "cpu")  # what the row converted (built first, same seed)
    assert isinstance(row.model, mb.TransformersStepAdapter) and row.step._fwd_kwargs == {}
    w = row.model.hf.vit.embeddings.patch_embeddings.projection.weight  # the same name in 4.x and 5.x
    assert torch.equal(w, ref.patch_embed.proj.weight)  # same seed, same init
    before = w.detach().clone()
    assert torch.isfinite(row()) and not torch.equal(before, w)
    with pytest.raises(ValueError, match="differs from the transformers config"):
        row.model(row.imgs, mask_ratio=0.5)


@pytest.mark.parametrize("fails", ["mask_tokens", "visible"])
def test_table2_cell_times_both_steps_alike_when_one_cannot_be_captured(monkeypatch, fails):
    """A row whose mask-token (or visible) step cannot be captured times both steps eagerly: a ratio
    of a graph replay to an eager step would mean nothing. (CPU: the capture is a stand-in whose
    replay runs the step again; the failing one raises as a real capture does.)"""
    from maefast import graphs
    from maefast import step as step_mod

    real_blocker = step_mod.capture_blocker
    captures = []

    def fake_capture(fn, *, warmup_steps=3, warmup_fn=None, before_capture=None, device=None, pool=None):
        captures.append(fn)
        if len(captures) == (1 if fails == "visible" else 2):  # visible is captured first, mask-token second
            raise RuntimeError("cannot capture this one")
        out = fn()
        return type("G", (), {"replay": lambda self: out.copy_(fn())})(), out

    monkeypatch.setattr(graphs, "capture_cuda_graph", fake_capture)
    monkeypatch.setattr(step_mod, "capture_blocker", lambda m, o, s, d: real_blocker(m, o, s, torch.device("cuda")))
    out = t2._time_table2_cell("tiny", "reference", 1, 2, torch.float32, torch.device("cpu"), 0.75, True, None, {},
                               cuda_graph=True)
    assert out["visible_timing"] == out["mask_tokens_timing"] == "eager", out
    assert out[f"{fails}_graph_error"] == "capture failed: RuntimeError: cannot capture this one"
    assert out["visible_ms"] > 0 and out["mask_tokens_ms"] > 0
    assert ("visible_graph_ms" in out) == (fails == "mask_tokens")


def test_harness_ratio_is_like_with_like_when_one_side_was_not_captured(harness):
    _harness = harness
    base = dict(group="g", shape_key="k", provider="ref", baseline=True, time_ms=1.0, cuda_graph=True, eager_time_ms=3.0)
    other = dict(group="g", shape_key="k", provider="x", baseline=False, time_ms=2.0, cuda_graph=False,
                 eager_time_ms=2.0)
    _harness.RESULTS.extend([base, other])
    _harness.update_ratios()
    assert other["speedup_vs_baseline"] == pytest.approx(1.5) and other["speedup_timing"].startswith("eager")
    assert base["speedup_vs_baseline"] == 1.0
    _harness.RESULTS.clear()


def test_table2_batches_per_model():
    assert t2.parse_batches(None) is None and t2.parse_batches("64") == 64
    assert t2.parse_batches("large=256, huge=192") == {"mae_vit_large_patch16": 256, "mae_vit_huge_patch14": 192}
    for bad in ("0", "x", "large=", "huge=-1", "large=2.5"):
        with pytest.raises(ValueError, match="--batch"):
            t2.parse_batches(bad)
    rows = t2.table2(["tiny", "small"], (1,), batch={"tiny": 2}, device="cpu", quick=True)
    assert [r["batch"] for r in rows] == [2, 8]  # tiny as asked, small at the CPU default


def test_git_commit_comes_from_maefast_commit_where_there_is_no_git(monkeypatch, tmp_path):
    """The GPU machine's copy of the tree has no .git: gpu_check.sh is run with MAEFAST_COMMIT=<sha>,
    and every benchmark row must record that commit, as the preset's record does. In a git checkout the
    checkout's HEAD wins (a MAEFAST_COMMIT left set in a shell must not name another commit); a copy
    inside some other repository is not a checkout of its own."""
    from maefast import _commit, timing

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import gpu_record
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    monkeypatch.setenv("MAEFAST_COMMIT", "ab" * 20)
    assert timing.git_commit is _commit.git_commit
    if _commit._git("rev-parse", "--show-toplevel") == ROOT:  # a git checkout (CI's clean clone is one)
        assert timing.git_commit()[:40] == gpu_record.git_commit()[:40] == _commit._git("rev-parse", "HEAD")
    copy = tmp_path / "copy"
    (copy / "maefast").mkdir(parents=True)
    src = os.path.join(ROOT, "maefast", "_commit.py")
    (copy / "maefast" / "_commit.py").write_text(open(src).read())
    for outer_git in (False, True):
        if outer_git:  # the copy sits inside another repository
            subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        ns = {"__file__": str(copy / "maefast" / "_commit.py"), "__name__": "copied_commit"}
        exec(compile(open(src).read(), src, "exec"), ns)
        assert ns["git_commit"]() == "ab" * 20
        monkeypatch.delenv("MAEFAST_COMMIT")
        assert ns["git_commit"]() == "unknown"
        monkeypatch.setenv("MAEFAST_COMMIT", "ab" * 20)


def test_check_config():
    from maefast.models.configs import check_config, model_config

    assert check_config(model_config("base")) == 196 and check_config(model_config("huge")) == 256
    for bad, needle in (({"patch_size": 0}, "patch_size must be"), ({"depth": 2.0}, "depth must be"),
                        ({"mlp_ratio": 0}, "mlp_ratio must be"), ({"img_size": 100}, "whole number"),
                        ({"decoder_num_heads": 3}, "decoder_embed_dim=512 is not divisible")):
        with pytest.raises(ValueError, match=needle):
            check_config(model_config("base", **bad))


def test_table2_compares_like_with_like_and_the_paper_at_its_ratio(monkeypatch):
    """The decoder-8 column divides times taken the same way (a replay by a replay); the paper's
    columns only at its mask ratio; each step's optimizer is recorded."""
    cells = {8: {"visible_ms": 100.0, "mask_tokens_ms": 300.0, "visible_timing": "eager", "mask_tokens_timing": "eager"},
             1: {"visible_ms": 40.0, "mask_tokens_ms": 150.0, "visible_timing": "cuda-graph",
                 "mask_tokens_timing": "cuda-graph"}}
    monkeypatch.setattr(t2, "_time_table2_cell", lambda name, impl, dd, *a, **k: dict(cells[dd]))
    peak = {"matmul_dtype": "fp32", "matmul_tflops": 1.0, "copy_gbps": 1.0}
    rows = t2.table2(["large"], (8, 1), device="cpu", peak=peak)
    assert rows[0]["speedup_vs_mask_dec8"] == pytest.approx(3.0)
    assert rows[1]["speedup_vs_mask_dec8"] is None and "not comparable" in rows[1]["speedup_vs_mask_dec8_note"]
    assert "paper_speedup" in rows[0]
    cells[1].update(visible_timing="eager", mask_tokens_timing="eager")
    rows = t2.table2(["large"], (8, 1), device="cpu", peak=peak, mask_ratio=0.5)
    assert rows[1]["speedup_vs_mask_dec8"] == pytest.approx(7.5)
    assert not any("paper_speedup" in r for r in rows)  # the paper measured 0.75
    assert "-" in t2.format_table2(rows, {"card": "CPU", "date": "2026-12-05", "torch": "x", "git_commit": "0" * 12},
                                   peak)


def test_record_row_keeps_the_spread_and_the_flop_rate(harness, monkeypatch):
    from maefast import timing

    monkeypatch.setattr(timing, "measure_peak", lambda dev=None: {"matmul_tflops": 1.0, "copy_gbps": 1.0})
    info = harness.record_row({}, {"median_ms": 2.0, "min_ms": 1.0, "p20_ms": 1.5, "p80_ms": 3.0, "reps": 5},
                              group="g", provider="p", flops=2e9, shape=(1,), device="cpu", timer="t")
    assert (info["time_p20_ms"], info["time_p80_ms"]) == (1.5, 3.0) and info["tflops"] == pytest.approx(1.0)


def test_table2_fraction_of_the_flop_bound_and_mfu(monkeypatch):
    from maefast.models.configs import model_config

    monkeypatch.setattr(t2, "_time_table2_cell", lambda *a, **k: {"visible_ms": 100.0, "mask_tokens_ms": 300.0,
                                                                   "visible_timing": "eager",
                                                                   "mask_tokens_timing": "eager"})
    (row,) = t2.table2(["large"], (8,), device="cpu", batch=4,
                       peak={"matmul_dtype": "fp32", "matmul_tflops": 2.0, "copy_gbps": 1.0})
    assert row["speedup"] == pytest.approx(3.0) and row["of_flop_bound"] == pytest.approx(3.0 / row["flop_ratio"])
    f = fl.mae_flops(model_config("mae_vit_large_patch16", decoder_depth=8))["train"] * 4
    assert row["mfu"] == pytest.approx(f / 0.1 / 1e12 / 2.0)
