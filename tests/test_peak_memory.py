"""scripts/peak_memory.py: a step's peak memory counted on fake tensors (no GPU, no memory), and maefast's
ops under an eager FakeTensorMode (the value checks skip fake CPU tensors, as they skip compile's)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from maefast import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import peak_memory as pm  # noqa: E402

MB = 2 ** 20


def test_live_bytes_counts_storages_from_creation_to_free():
    with FakeTensorMode():
        c = pm.LiveBytes()
        with c:
            a = torch.empty(MB // 4)  # 1 MiB of float32
            b = torch.empty(MB // 2)  # 2 MiB: 3 live
            v = a.view(2, -1)  # a view: no new storage
            c.mark([b], "gradients")
            del a, v  # 2 live
            d = torch.empty(3 * MB // 8)  # 1.5 MiB: 3.5 live
            e = torch.empty(MB // 8)  # 0.5 MiB: 4 MiB live, the peak
            del d, e
    assert c.peak == 4 * MB and c.live == 2 * MB
    assert c.peak_by_kind["gradients"] == 2 * MB and c.peak_by_kind["activations and temporaries"] == 2 * MB
    assert sorted(g[1] for g in c.peak_activations.values()) == [MB // 2, 3 * MB // 2]


def test_tiny_rows_estimate_and_split():
    rows = {p: pm.peak_bytes(p, "tiny", 4) for p in ("reference", "maefast", "maefast-block")}
    model = pm.mb.STEP_PROVIDERS["reference"].build("tiny", "cpu")
    params = sum(p.numel() * 4 for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]  # not the fixed sin-cos position embeddings
    moments = 2 * sum(p.numel() * 4 for p in trained)
    for r in rows.values():
        k = r["at_peak"]
        assert sum(k.values()) == r["peak_bytes"] > 0
        assert k["parameters"] == params
        # AdamW's two moments (and a step count per parameter) once it has stepped
        assert k["optimizer"] == 0 or moments <= k["optimizer"] <= moments + 8 * len(trained), k
        assert r["activations_at_peak"] and r["end_bytes"] < r["peak_bytes"]


def test_vit_h_rows_as_a_card_measured_them():
    """ViT-H/14 b128 (fake tensors: seconds): the estimate beside the H200's peak_mem_gib of 2026-12-04
    (reference 33.54 GiB, maefast 25.37, maefast-block-graph 19.13), which it undershoots by 1.4-3.8%
    (the allocator's rounding, cuBLAS workspaces). A change to what the ops save moves these: since
    2026-12-05 the block keeps its bf16 attention projection instead of the fp32 mid-block residual,
    2 bytes less per token and width unit in each of the 32 encoder and 8 decoder blocks (unmeasured
    on a card: the band below is the 2026-12-04 figure less exactly that)."""
    gib = {p: pm.peak_bytes(p)["peak_bytes"] / 2 ** 30 for p in ("reference", "maefast", "maefast-block")}
    p_not_s = 2 * (32 * 128 * 65 * 1280 + 8 * 128 * 257 * 512) / 2 ** 30
    for p, card in (("reference", 33.54), ("maefast", 25.37), ("maefast-block", 19.13 - p_not_s)):
        assert 0.94 * card < gib[p] <= card, gib


def test_compiled_and_captured_rows_are_refused():
    with pytest.raises(ValueError, match="estimate its eager twin"):
        pm.peak_bytes("maefast-graph", "tiny", 2)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "peak_memory.py"), "--model", "tiny", "--batch",
                        "2", "--providers", "torch-native"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "estimate its eager twin" in r.stderr


def test_ops_run_on_eager_fake_cpu_tensors():
    """Before 2026-12-05 the value checks read fake CPU tensors (DataDependentOutputException): a
    FakeTensorMode memory estimate of any maefast model failed at its first op."""
    with FakeTensorMode():
        imgs = torch.randn(2, 3, 32, 32)
        ids = ops.random_masking(2, 4, 0.5, noise=torch.rand(2, 4))
        x = ops.masked_patch_embed(imgs, ids.ids_keep, torch.randn(8, 3, 16, 16), None, None, 16)
        y = ops.unshuffle(x, torch.randn(1, 1, 8), ids.ids_restore, torch.randn(1, 5, 8))
        loss = ops.norm_pix_loss(torch.randn(2, 4, 768, requires_grad=True), imgs, ids.mask, 16)
    assert x.shape == (2, 2, 8) and y.shape == (2, 5, 8) and loss.shape == ()


def test_live_bytes_groups_activations_by_shape():
    with FakeTensorMode():
        c = pm.LiveBytes()
        with c:
            xs = [torch.empty(MB // 4) for _ in range(3)]  # 3 x 1 MiB of one shape
            y = torch.empty(MB // 8, dtype=torch.float16)
    assert c.peak_activations == {((MB // 4,), "float32"): [3, 3 * MB], ((MB // 8,), "float16"): [1, MB // 4]}
    del xs, y
    with FakeTensorMode():
        c = pm.LiveBytes()
        with c:
            for c.phase in ("forward 0", "backward 0"):  # the same peak twice: the first phase keeps it
                x = torch.empty(MB // 4)
                del x
    assert (c.peak, c.peak_phase) == (MB, "forward 0")


def test_peak_split_and_the_state_after_the_steps():
    """The gradients at the peak are every trained parameter's (the reference row peaks in its optimizer
    step); the second step's peak holds AdamW's two moments; after the steps only the parameters, the
    optimizer state and the batch (images, noise) live (zero_grad frees the gradients); activations
    largest first; nn.Module.to is torch's again."""
    to = torch.nn.Module.to
    ref, fast = pm.peak_bytes("reference", "tiny", 4, steps=1), pm.peak_bytes("maefast", "tiny", 4, steps=2)
    assert torch.nn.Module.to is to
    model = pm.mb.STEP_PROVIDERS["reference"].build("tiny", "cpu")
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    params = sum(p.numel() * 4 for p in model.parameters())
    batch = 4 * 3 * 32 * 32 * 4 + 4 * 16 * 4
    assert ref["phase"] == "optimizer 0" and ref["at_peak"]["gradients"] == trained
    assert fast["phase"] == "backward 1" and fast["at_peak"]["optimizer"] >= 2 * trained
    n = sum(p.requires_grad for p in model.parameters())
    for r in (ref, fast):  # AdamW's state: two moments and a step count per trained parameter
        assert 2 * trained <= r["end_bytes"] - params - batch <= 2 * trained + 8 * n, r["end_bytes"]
    for r in (ref, fast):
        sizes = [g["bytes"] for g in r["activations_at_peak"]]
        assert sizes == sorted(sizes, reverse=True)


def test_peak_memory_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pm.main(["--providers", "reference,nope"])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err
    for bad in (["--steps", "0"], ["--batch", "0"]):
        with pytest.raises(SystemExit) as e:
            pm.main(["--model", "tiny", *bad])
        assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    out = tmp_path / "p.json"
    assert pm.main(["--model", "tiny", "--batch", "4", "--steps", "1", "--providers", "reference,maefast",
                    "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "x reference)" not in lines[0] and any(ln.startswith("maefast: ") and "x reference)" in ln for ln in lines)
    import json

    rec = json.loads(out.read_text())
    assert rec["model"] == "tiny" and [r["provider"] for r in rec["rows"]] == ["reference", "maefast"]
    assert rec["rows"][1]["phase"] == "optimizer 0"  # one step: the peak is in its optimizer step
