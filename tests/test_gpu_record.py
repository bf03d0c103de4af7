"""scripts/gpu_record.py's verdicts on made-up rows (the issue's targets and their thresholds, the
spreads, the baselines a verdict needs, the records of a run cut short) and scripts/profile_step.py's
kernel classes and table, without a GPU. The presets that produce the rows: tests/test_gpu_check.py."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_record as rec  # noqa: E402
import profile_step  # noqa: E402


def _row(group, provider, time_ms, shape, **kw):
    return dict(group=group, provider=provider, time_ms=time_ms, shape=shape,
                shape_key=json.dumps(shape, sort_keys=True), **kw)


def test_step_targets_read_the_fastest_rows():
    s = dict(model="mae_vit_huge_patch14", batch=128)
    rows = [_row("train-step", "reference", 180.0, s, peak_mem_gib=40.0),
            _row("train-step", "maefast-block-graph", 90.0, s, peak_mem_gib=18.0, frac_peak_flops=0.62, captured=True,
                 peak_mem_reserved_gib=21.0),
            _row("train-step", "maefast", 120.0, s, peak_mem_gib=20.0, frac_peak_flops=0.4, captured=False),
            _row("train-step", "torch-native-graph", 110.0, s), _row("train-step", "sdpa", 140.0, s)]
    t = rec.step_targets(rows)[json.dumps(s, sort_keys=True)]
    assert t["maefast_best"] == "maefast-block-graph" and t["torch_native_best"] == "torch-native-graph"
    assert t["step_vs_reference"] == {"value": 2.0, "target": ">= 2.0", "met": True}
    assert t["step_vs_torch_native"]["value"] == pytest.approx(110 / 90, abs=1e-4)
    assert t["step_vs_torch_native"]["met"] is True
    assert t["peak_mem_vs_reference"]["value"] == 0.45 and t["peak_mem_vs_reference"]["met"] is True
    assert t["mfu"]["met"] is True
    # how each row stepped, as the row says (bench_step's rows carry `captured`, not the harness's cuda_graph)
    assert t["rows"]["maefast-block-graph"]["captured"] is True and t["rows"]["maefast"]["captured"] is False
    assert t["rows"]["maefast-block-graph"]["peak_mem_reserved_gib"] == 21.0


def test_step_ratios_say_when_the_target_lies_inside_the_spread():
    """A ratio judged against its target also carries the range the two rows' p20-p80 spreads allow:
    a target inside it is not a result (`within_noise`)."""
    s = dict(model="mae_vit_huge_patch14", batch=128)

    def rows(ours_ms, ours_p20, ours_p80):
        return [_row("train-step", "reference", 216.0, s, time_p20_ms=215.0, time_p80_ms=217.0),
                _row("train-step", "maefast-block-graph", ours_ms, s, time_p20_ms=ours_p20, time_p80_ms=ours_p80),
                _row("train-step", "torch-native-graph", 104.0, s, time_p20_ms=103.5, time_p80_ms=104.5)]

    t = rec.step_targets(rows(88.0, 87.8, 88.2))[json.dumps(s, sort_keys=True)]  # 1.18x, spread 1.174-1.19
    native = t["step_vs_torch_native"]
    assert native["met"] is True and native["within_noise"] is False
    assert native["spread"] == [round(103.5 / 88.2, 4), round(104.5 / 87.8, 4)]
    t = rec.step_targets(rows(90.4, 88.0, 92.0))[json.dumps(s, sort_keys=True)]  # 1.1504x, spread 1.125-1.188
    assert t["step_vs_torch_native"]["met"] is True and t["step_vs_torch_native"]["within_noise"] is True
    # the summary (the last lines a card's call returns) says so: not "ok" (it printed "ok ... = 1.1504")
    lines = rec.short_lines({"preset": "step", "dry_run": False, "env": {"date": "d", "commit": "c"}, "steps": {},
                             "targets": {"step": {"k": t}}})
    (native,) = [ln for ln in lines if "step_vs_torch_native =" in ln]
    assert native.startswith("  ~  ") and "within noise, spread [1.125" in native, native
    # rows timed alone without a peak memory (a CPU run): said so, not "timed only in the interleaved pair"
    assert t["peak_mem_vs_reference"]["reason"] == "no peak_mem_gib in the rows", t["peak_mem_vs_reference"]
    assert t["step_vs_reference"]["within_noise"] is False  # 2.39x, far from 2.0
    assert "spread" not in rec.step_targets([_row("train-step", "reference", 2.0, s),
                                             _row("train-step", "maefast-graph", 1.0, s)])[
        json.dumps(s, sort_keys=True)]["step_vs_reference"]  # no percentiles: the value alone


def test_attention_route_decides_only_beyond_the_spread():
    """The profile preset's decision between maefast's attention and torch's SDPA in the same captured
    step: a backend wins only by 2% and where the two timings' p20-p80 spreads do not overlap."""
    h = dict(model="mae_vit_huge_patch14", batch=128)

    def rows(t, s):
        return [_row("train-step", "maefast-graph", t[1], h, time_p20_ms=t[0], time_p80_ms=t[2], captured=True),
                _row("train-step", "maefast-sdpa-graph", s[1], h, time_p20_ms=s[0], time_p80_ms=s[2], captured=True),
                _row("train-step", "maefast-sdpa-graph", 50.0, dict(h, batch=64))]  # another shape: not read

    r = rec.attention_route(rows((113.9, 114.0, 114.2), (110.8, 111.0, 111.3)), "huge:128")
    assert r["faster"] == "sdpa" and r["sdpa_speedup"] == round(114.0 / 111.0, 4) and "route auto" in r["decide"]
    assert r["rows"]["sdpa"]["time_ms"] == 111.0
    assert rec.attention_route(rows((113.9, 114.0, 114.2), (116.4, 116.5, 116.7)), "huge:128")["faster"] == "triton"
    tie = rec.attention_route(rows((113.0, 114.0, 115.0), (113.5, 113.8, 114.5)), "huge:128")
    assert tie["faster"] is None and tie["sdpa_speedup"] > 1 and "neither" in tie["decide"]
    close = rec.attention_route(rows((113.9, 114.0, 114.1), (112.4, 112.5, 112.6)), "huge:128")  # apart, but 1.3%
    assert close["faster"] is None
    gone = rec.attention_route(rows((113.9, 114.0, 114.2), (1, 1, 1))[:1], "huge:128")
    assert gone["faster"] is None and gone["decide"] == "missing row: maefast-sdpa-graph"
    lines = rec.short_lines({"env": {"date": "d", "commit": "c"}, "preset": "profile", "dry_run": True, "steps": {},
                             "attention_route": r})
    assert any("attention route huge:128: triton 114.0 ms, sdpa 111.0 ms" in x for x in lines), lines


def test_step_targets_say_which_baseline_row_is_missing():
    """A baseline row that did not run (capture skipped, out of memory, the deadline) leaves its target
    in the record with met None and the missing row named, and the printed summary says so: no target
    disappears and no row is taken from another record."""
    s = dict(model="mae_vit_huge_patch14", batch=128)
    key = json.dumps(s, sort_keys=True)
    rows = [_row("train-step", "maefast-block-graph", 90.0, s, peak_mem_gib=18.0, frac_peak_flops=0.62)]
    t = rec.step_targets(rows)[key]
    assert set(rec.STEP_TARGETS) <= set(t) and t["mfu"]["met"] is True
    for name in ("step_vs_reference", "peak_mem_vs_reference"):
        assert t[name]["met"] is None and t[name]["reason"] == "missing row: reference", t[name]
    assert t["step_vs_torch_native"]["met"] is None and "torch-native-graph" in t["step_vs_torch_native"]["reason"]
    lines = rec.short_lines({"preset": "step", "dry_run": False, "env": {"date": "d", "commit": "c"}, "steps": {},
                             "targets": {"step": rec.step_targets(rows)}})
    (native,) = [ln for ln in lines if "step_vs_torch_native =" in ln]
    assert native.startswith("  ?  ") and "missing row: no torch-native row" in native, native
    assert not any(ln.startswith("  ok ") and "step_vs_reference" in ln for ln in lines)
    # the reference there, the maefast rows missing: every target None, naming them
    t = rec.step_targets([_row("train-step", "reference", 180.0, s, peak_mem_gib=40.0)])[key]
    assert all(t[n]["met"] is None and t[n]["reason"] == "missing row: no maefast row" for n in rec.STEP_TARGETS
               if n != "step_vs_torch_native_paired")
    assert t["step_vs_torch_native_paired"]["reason"].startswith("missing row: no interleaved pair")
    t = rec.step_targets([])  # no train-step row at all: still every target, each saying so
    assert all(v["met"] is None and "no train-step row" in v["reason"] for e in t.values() for v in e.values())
    assert set(next(iter(t.values()))) == set(rec.STEP_TARGETS)


def test_data_targets_read_the_train_windows_and_the_step_record():
    """img/s from steps.jsonl windows after the prefetched ones; JPEG vs synthetic; train vs the step
    row of the same configuration (and the loader vs the ViT-B row) when a step record has them."""
    steps = [dict(step=s, img_per_s=ips) for s, ips in ((10, 50.0), (20, 100.0), (30, 200.0), (40, 100.0))]
    # windows of 10 steps x batch 10 = 100 images: 2 s, 1 s, 0.5 s, 1 s
    assert rec.window_rate(steps, 10) == pytest.approx(400 / 4.5)
    assert rec.window_rate(steps, 10, after_step=20) == pytest.approx(200 / 1.5)  # windows (20, 30], (30, 40]
    assert rec.window_rate(steps, 10, after_step=40) is None and rec.window_rate([], 10) is None
    record = {"bench_data": {"loader": {"official": {"img_per_s": 1500.0}, "fast-uint8": {"img_per_s": 3000.0}}},
              "train": {"train-jpeg": {"img_per_s": 1800.0}, "train-synthetic": {"img_per_s": 2000.0},
                        "train-huge": {"img_per_s": 1100.0}}}
    t = rec.data_targets(record, None)
    assert t["train_jpeg_vs_synthetic"] == {"value": 0.9, "target": ">= 0.9", "met": True}
    assert t["train_vs_step"]["met"] is None and t["loader_vs_step"]["met"] is None  # no step record
    assert "maefast-graph" in t["train_vs_step"]["reason"] and "base:128" in t["loader_vs_step"]["reason"]
    assert t["loader_img_per_s"] == {"official": 1500.0, "fast-uint8": 3000.0}
    step = {"rows": [_row("train-step", "maefast-graph", 110.0, dict(model="huge", batch=128), img_per_s=1150.0),
                     _row("train-step", "maefast-block-graph", 100.0, dict(model="huge", batch=128), img_per_s=1280.0),
                     _row("train-step", "maefast-graph", 40.0, dict(model="base", batch=128), img_per_s=3200.0)]}
    t = rec.data_targets(record, step)
    assert t["train_vs_step"]["value"] == pytest.approx(1100 / 1150, abs=1e-4) and t["train_vs_step"]["met"] is True
    assert t["train_vs_best_step_row"]["row"] == "maefast-block-graph"
    assert t["loader_vs_step"]["value"] == pytest.approx(3000 / 3200, abs=1e-4) and t["loader_vs_step"]["met"] is False


def test_attention_targets_take_the_best_sdpa_backend():
    s = dict(N=256, L=65, H=16, Dh=80)
    rows = [_row("attention-fwdbwd", p, ms, s) for p, ms in
            (("triton", 0.2), ("sdpa-cudnn", 0.35), ("sdpa-flash", 0.3), ("sdpa-efficient", 0.5), ("official", 2.0))]
    rows.append(_row("attention-fwd", "triton", 0.12, s))
    rows.append(_row("attention-fwd", "sdpa-cudnn", 0.1, s, out_layout="blhd"))
    t = rec.attention_targets(rows)["L65 Dh80 H16 N256"]
    assert t["fwdbwd"]["best_sdpa"] == "sdpa-flash"
    assert t["fwdbwd"]["triton_vs_best_sdpa"]["value"] == 1.5 and t["fwdbwd"]["triton_vs_best_sdpa"]["met"]
    assert t["fwd"]["triton_vs_best_sdpa"]["met"] is False and t["fwd"]["best_sdpa_out_layout"] == "blhd"
    lines = rec.short_lines({"preset": "ops", "dry_run": False, "env": {"date": "d", "commit": "c"}, "steps": {},
                             "targets": {"attention": {"L65 Dh80 H16 N256": t}}})
    assert any(ln.startswith("  NO ") and "fwd / triton_vs_best_sdpa" in ln for ln in lines)


def test_attention_targets_compare_like_with_like():
    """A backend that could not be captured is timed eagerly (with Python dispatch): it is set against
    triton's eager time, not its graph replay."""
    s = dict(N=256, L=50, H=16, Dh=64)
    rows = [_row("attention-fwdbwd", "triton", 0.2, s, cuda_graph=True, eager_time_ms=0.4),
            _row("attention-fwdbwd", "sdpa-flash", 0.5, s, cuda_graph=True, eager_time_ms=0.7),
            _row("attention-fwdbwd", "sdpa-cudnn", 0.45, s, cuda_graph=False)]  # capture failed: eager time
    t = rec.attention_targets(rows)["L50 Dh64 H16 N256"]["fwdbwd"]
    assert t["best_sdpa"] == "sdpa-cudnn" and t["triton_vs_best_sdpa"]["value"] == pytest.approx(0.45 / 0.4)
    rows[2]["cuda_graph"] = True  # all captured: the replay times
    t = rec.attention_targets(rows)["L50 Dh64 H16 N256"]["fwdbwd"]
    assert t["best_sdpa"] == "sdpa-cudnn" and t["triton_vs_best_sdpa"]["value"] == pytest.approx(0.45 / 0.2)


def test_profile_kernel_classes_and_summary():
    bad = {k: (profile_step.classify(k), v) for k, v in profile_step.PROBE.items() if profile_step.classify(k) != v}
    assert not bad, bad  # the dry run's probe: every attention kernel named, and no Inductor kernel among them
    # Inductor names a layout copy feeding SDPA after it: that is element-wise work, not attention time
    assert profile_step.classify("triton_poi_fused__scaled_dot_product_efficient_attention_clone_0") == "inductor"
    assert profile_step.classify("triton_poi_fused__scaled_dot_product_flash_attention_cat_2") == "inductor"
    assert profile_step.classify("void (anonymous namespace)::attention_fwd_wmma_kernel<float, 64>(P)") == "attention"
    assert profile_step.classify("void pytorch_flash::flash_bwd_convert_dq_kernel<T>(P)") == "attention"
    assert profile_step.classify("_attn_bwd_dkdv_kernel") == "attention"
    assert profile_step.classify("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == "attention"
    assert profile_step.classify("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT") == "gemm"
    assert profile_step.classify("triton_per_fused_native_layer_norm_3") == "inductor"
    assert profile_step.classify("_norm_pix_loss_fwd_kernel") == "maefast"
    assert profile_step.classify("void at::native::vectorized_elementwise_kernel<4>") == "elementwise"
    s = profile_step.summarise([dict(name="sm90_xmma_gemm", category="gemm", calls_per_step=10, ms_per_step=6.0),
                                dict(name="_attn_fwd_kernel", category="attention", calls_per_step=4, ms_per_step=3.0),
                                dict(name="copy", category="copy", calls_per_step=2, ms_per_step=1.0)])
    assert s["total_ms_per_step"] == 10.0 and s["gemm_share"] == 0.6 and s["attention_ms_per_step"] == 3.0
    assert [k["name"] for k in s["top"]] == ["sm90_xmma_gemm", "_attn_fwd_kernel", "copy"]
    assert s["kernels_per_step"] == 16


def test_runtime_is_recorded():
    """The machine's runtime goes into every record: gpu_check's env and every benchmark row's
    (maefast.timing.env_info), from one implementation (maefast/_commit.py, torch-free)."""
    from maefast import _commit, timing

    r = rec.runtime()
    assert r["uname_r"] and r["runtime"] in ("gvisor", "firecracker", "unknown")
    assert timing.runtime is _commit.runtime
    assert rec.runtime.__code__.co_filename == _commit.runtime.__code__.co_filename
    env = timing.env_info("cpu")
    assert {k: env[k] for k in r} == r


def test_kernel_table_reads_the_profilers_device_events():
    import types

    import torch

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    evts = [types.SimpleNamespace(key="_attn_fwd_kernel", count=8, device_type=cuda, self_device_time_total=4000.0),
            types.SimpleNamespace(key="nvjet_tst_gemm", count=40, device_type=cuda, self_device_time_total=16000.0),
            types.SimpleNamespace(key="aten::mm", count=40, device_type=cpu, self_device_time_total=0.0)]
    prof = types.SimpleNamespace(key_averages=lambda: evts)
    t = profile_step.kernel_table(prof, steps=2)
    assert t["total_ms_per_step"] == 10.0 and t["attention_ms_per_step"] == 2.0 and t["gemm_share"] == 0.8
    assert t["top"][0]["name"] == "nvjet_tst_gemm" and t["top"][0]["calls_per_step"] == 20


def test_records_judge_the_issues_shapes_and_say_what_is_missing():
    """The step targets judge the issue's shape only (the loader's ViT-B/16 rows are information); ops and
    table2 records with no row still carry every target as `?`; a data record compares with a step record
    only of the same card and commit; pytest's deadline skips are counted apart (not_run)."""
    h, b = dict(model="mae_vit_huge_patch14", batch=128), dict(model="mae_vit_base_patch16", batch=128)
    rows = [_row("train-step", "reference", 180.0, h, peak_mem_gib=40.0),
            _row("train-step", "maefast-graph", 100.0, h, peak_mem_gib=18.0, frac_peak_flops=0.6),
            _row("train-step", "maefast-graph", 40.0, b)]
    t = rec.step_targets(rows, "huge:128")
    assert set(t[json.dumps(h, sort_keys=True)]) >= set(rec.STEP_TARGETS)
    assert set(t[json.dumps(b, sort_keys=True)]) == {"rows"}  # no "? step_vs_reference" for the loader's rows
    assert all(v["met"] is None for v in rec.step_targets(rows[2:], "huge:128")["(huge:128)"].values())
    att = rec.attention_targets([])
    assert {k for k in att} == {"L50", "L65", "L197", "L257"}
    assert att["L65"]["fwd"]["triton_vs_best_sdpa"]["met"] is None
    ops = rec.op_targets([])
    assert {k for k in ops} == {"mask_embed_fwd_bwd_vs_reference", "memory_bound_frac_peak_bw"}
    t2 = rec.table2_targets({"rows": []})
    assert len(t2) == 4 and all(v["met"] is None for v in t2.values())
    record = {"env": {"card": "NVIDIA H200", "commit": "abc1234"}, "bench_data": {},
              "train": {"train-huge": {"img_per_s": 1100.0}}}
    step = {"env": {"card": "NVIDIA H100 80GB HBM3", "commit": "abc1234"},
            "rows": [_row("train-step", "maefast-graph", 110.0, dict(model="huge", batch=128), img_per_s=1150.0)]}
    t = rec.data_targets(record, step)
    assert t["train_vs_step"]["met"] is None and "another run's" in t["train_vs_step"]["reason"]
    assert "card" in t["step_record_differs"]
    step["env"]["card"] = "NVIDIA H200"
    assert rec.data_targets(record, step)["train_vs_step"]["met"] is True


def test_junit_counts_deadline_skips_apart(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuite><testcase classname="a" name="t1"/>'
                   '<testcase classname="a" name="t2"><skipped message="needs a CUDA GPU"/></testcase>'
                   '<testcase classname="a" name="t3"><skipped message="gpu_check: this step\'s time budget is spent"/>'
                   '</testcase></testsuite>')
    s = rec.junit_summary(str(xml))
    assert (s["passed"], s["skipped"], s["not_run"]) == (1, 1, 1)


# -- the verdicts' numbers (from a mutation audit: each of these passed a wrong threshold or comparison) --

_H = dict(model="mae_vit_huge_patch14", batch=128)


def test_targets_thresholds_are_the_issues():
    assert rec.TARGETS["mfu"] == (">=", 0.60) and rec.TARGETS["peak_mem_vs_reference"] == ("<=", 0.5)
    assert rec.judge("mfu", 0.59)["met"] is False and rec.judge("peak_mem_vs_reference", 0.51)["met"] is False
    assert rec.judge("profile_overhead", 0.05)["met"] is False
    assert rec.judge("table2_of_flop_bound", 0.94)["met"] is False
    assert rec.judge("mfu", 0.60)["met"] and rec.judge("peak_mem_vs_reference", 0.5)["met"]


def test_attention_route_needs_apart_spreads_even_past_the_gain():
    """A gain above ROUTE_MIN_GAIN whose rows' p20-p80 spreads overlap decides nothing."""
    rows = [_row("train-step", "maefast-graph", 114.0, _H, time_p20_ms=108.0, time_p80_ms=118.0),
            _row("train-step", "maefast-sdpa-graph", 110.0, _H, time_p20_ms=106.0, time_p80_ms=115.0)]
    r = rec.attention_route(rows, "huge:128")
    assert r["sdpa_speedup"] > rec.ROUTE_MIN_GAIN and r["faster"] is None


def test_a_clearly_missed_target_is_not_within_noise():
    key = json.dumps(_H, sort_keys=True)
    pair = [_row("train-step-pair", "torch-native-graph", 104.0, _H, baseline=True),
            _row("train-step-pair", "maefast-block-graph", 98.0, _H, paired_with="torch-native-graph",
                 pair_ratio=1.06, pair_ratio_range=[1.04, 1.08], pair_ratio_rounds=[1.04, 1.06, 1.08])]
    p = rec.step_targets(pair, "huge:128")[key]["step_vs_torch_native_paired"]
    assert p["met"] is False and p["within_noise"] is False
    alone = [_row("train-step", "torch-native-graph", 104.0, _H, time_p20_ms=103.5, time_p80_ms=104.5),
             _row("train-step", "maefast-graph", 98.0, _H, time_p20_ms=97.5, time_p80_ms=98.5)]
    assert rec.step_targets(alone, "huge:128")[key]["step_vs_torch_native"]["within_noise"] is False


def test_table2_targets_judge_the_fraction_of_the_flop_bound():
    rows = [dict(model="mae_vit_large_patch16", decoder_depth=8, impl=i, speedup=s, flop_ratio=3.5,
                 of_flop_bound=s / 3.5) for i, s in (("auto", 3.2), ("reference", 3.4))]
    t = rec.table2_targets({"rows": rows})
    assert t["mae_vit_large_patch16 dec8 auto"]["value"] == round(3.2 / 3.5, 4)
    assert not any(k.endswith(" reference") for k in t)  # the official computation is not judged


def test_op_targets_read_the_graphed_speedup():
    s = dict(N=256, L=256)
    rows = [_row("mask-embed-fwd-bwd", "reference", 1.0, s, baseline=True, speedup_vs_baseline=1.0),
            _row("mask-embed-fwd-bwd", "triton", 0.2, s, speedup_vs_baseline=5.0, eager_speedup_vs_baseline=2.0)]
    t = rec.op_targets(rows)["mask_embed_fwd_bwd_vs_reference"]
    assert list(t) == [f"{rows[1]['shape_key']} triton"] and t[list(t)[0]]["value"] == 5.0


def test_loader_vs_step_reads_the_fastest_step_row():
    record = {"bench_data": {"loader": {"official": {"img_per_s": 9000.0}, "fast-uint8": {"img_per_s": 3000.0}}},
              "train": {}}
    b = dict(model="mae_vit_base_patch16", batch=128)
    step = {"rows": [_row("train-step", "maefast-graph", 40.0, b, img_per_s=3200.0),
                     _row("train-step", "maefast-block-graph", 50.0, b, img_per_s=2500.0)]}
    assert rec.data_targets(record, step)["loader_vs_step"]["value"] == round(3000 / 3200, 4)


def test_profile_kernel_classes_of_copies_norms_and_reductions():
    """Kernel names as torch's CUDA ops report them: copies (memcpy, memset, a copy kernel named elementwise),
    the LayerNorm kernel named vectorized, reductions and softmax; the names' case does not matter."""
    names = {"Memcpy DtoD (Device -> Device)": "copy", "Memset (Device)": "copy",
             "void at::native::elementwise_kernel<128, 2, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
             "::{lambda()#3}>": "copy",
             "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>": "norm",
             "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>>>":
                 "elementwise",
             "void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, float, float, float>": "elementwise",
             "triton_for_fused_0": "inductor", "triton_unk_fused_mul_1": "inductor"}
    assert {n: profile_step.classify(n) for n in names} == names


def test_profile_summary_categories_top_and_an_empty_profile():
    """Categories largest first with their shares, `top` kernels only; a profile that saw no kernel (a graph
    replay the profiler cannot see into: profile_provider then profiles the eager step) summarises to zeros."""
    rows = [dict(name="copy", category="copy", calls_per_step=2, ms_per_step=1.0),
            dict(name="_attn_fwd_kernel", category="attention", calls_per_step=4, ms_per_step=3.0),
            dict(name="sm90_xmma_gemm", category="gemm", calls_per_step=10, ms_per_step=6.0)]
    s = profile_step.summarise(rows, top=2)
    assert s["categories"] == {"gemm": {"ms": 6.0, "share": 0.6}, "attention": {"ms": 3.0, "share": 0.3},
                               "copy": {"ms": 1.0, "share": 0.1}}
    assert list(s["categories"]) == ["gemm", "attention", "copy"]
    assert [(k["name"], k["share"]) for k in s["top"]] == [("sm90_xmma_gemm", 0.6), ("_attn_fwd_kernel", 0.3)]
    text = profile_step.format_table(dict(provider="p", model="m", batch=2, profiled="graph replay", **s))
    assert "gemm 6.0 ms (60%)" in text and "sm90_xmma_gemm" in text and "_attn_fwd_kernel" in text, text
    empty = profile_step.summarise([])
    assert empty == dict(total_ms_per_step=0, kernels_per_step=0, categories={}, gemm_share=None,
                         attention_ms_per_step=0.0, top=[])
    assert "0 kernels" in profile_step.format_table(dict(provider="p", model="m", batch=2, profiled="x", **empty))


def test_kernel_table_counts_device_kernels_only():
    """A CPU op's self device time is its kernels' (counted once, as kernels); an event timed at 0 is no kernel."""
    import types

    import torch

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    evts = [types.SimpleNamespace(key="nvjet_tst_gemm", count=40, device_type=cuda, self_device_time_total=16000.0),
            types.SimpleNamespace(key="aten::mm", count=40, device_type=cpu, self_device_time_total=16000.0),
            types.SimpleNamespace(key="Memset (Device)", count=6, device_type=cuda, self_device_time_total=0.0)]
    t = profile_step.kernel_table(types.SimpleNamespace(key_averages=lambda: evts), steps=2)
    assert t["total_ms_per_step"] == 8.0 and t["kernels_per_step"] == 20 and [k["name"] for k in t["top"]] == [
        "nvjet_tst_gemm"]


class _FakeStepRow:
    """maefast.bench.make_step's row, counting its calls."""

    def __init__(self, provider, dtype, captured):
        self.provider, self.calls = provider, 0
        self.step = type("S", (), {"dtype": dtype, "captured": captured})()

    def __call__(self):
        self.calls += 1


@pytest.mark.parametrize("captured", [True, False])
def test_profile_provider_falls_back_to_the_eager_step(monkeypatch, captured):
    """A captured row whose replay shows no kernel is profiled as its eager twin, in the row's dtype, and the
    record says so; each step is warmed up twice, then profiled `steps` times; an eager row is not rebuilt."""
    import contextlib

    import torch
    import torch.profiler

    from maefast import bench as mb

    built = []

    def make_step(provider, model, batch, device=None, dtype=None):
        built.append((provider, dtype))
        built_row = _FakeStepRow(provider, dtype or torch.bfloat16, captured and provider.endswith("-graph"))
        rows.append(built_row)
        return built_row

    rows = []
    tables = [profile_step.summarise([]), profile_step.summarise(
        [dict(name="_attn_fwd_kernel", category="attention", calls_per_step=4, ms_per_step=3.0)])]
    monkeypatch.setattr(mb, "make_step", make_step)
    monkeypatch.setattr(torch.profiler, "profile", lambda **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(profile_step, "kernel_table", lambda prof, steps, top: tables.pop(0))
    r = profile_step.profile_provider("maefast-block-graph", "tiny", 2, 3, 25, torch.device("cpu"))
    if captured:
        assert built == [("maefast-block-graph", None), ("maefast-block", torch.bfloat16)]
        assert r["profiled"].startswith("eager step of maefast-block ") and r["attention_ms_per_step"] == 3.0
        assert [row.calls for row in rows] == [2 + 3, 2 + 3]
    else:
        assert built == [("maefast-block-graph", None)] and r["profiled"] == "eager step"
        assert r["kernels_per_step"] == 0 and rows[0].calls == 2 + 3
    assert r["dtype"] == "bfloat16" and r["provider"] == "maefast-block-graph"


def test_profile_step_main_arguments_dry_run_and_no_gpu(monkeypatch, tmp_path, capsys):
    import torch

    assert profile_step.main(["--providers", "reference,nope", "--dry-run"]) == 2
    assert "nope" in capsys.readouterr().err
    out = tmp_path / "d.json"
    assert profile_step.main(["--dry-run", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["classifier_check"] == "ok"
    monkeypatch.setitem(profile_step.PROBE, "_attn_fwd_kernel", "gemm")  # a classifier that went wrong
    assert profile_step.main(["--dry-run", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["classifier_check"] == {"_attn_fwd_kernel": ["attention", "gemm"]}
    for bad in (["--model", "nope"], ["--steps", "0"], ["--batch", "-1"], ["--top", "0"]):  # before any GPU work
        assert profile_step.main(["--dry-run", *bad]) == 2
        assert bad[0] in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert profile_step.main(["--providers", "reference"]) == 2


def test_profile_step_eager_twins_are_step_rows():
    """Every captured row's fallback is a row make_step builds: its own uncaptured row, else the nearest."""
    from maefast import bench as mb

    twins = {p: profile_step.eager_twin(p) for p in mb.STEP_PROVIDERS if p.endswith("-graph")}
    assert all(t in mb.STEP_PROVIDERS and not mb.STEP_PROVIDERS[t].capture for t in twins.values()), twins
    assert twins["maefast-block-graph"] == "maefast-block" and twins["torch-native-graph"] == "torch-native"
    assert twins["torch-native-autotune-graph"] == "torch-native" and twins["maefast-sdpa-graph"] == "maefast"


def test_profile_step_main_keeps_going_after_a_failed_provider(monkeypatch, tmp_path):
    """A provider that fails is a record with its error's first line, saved before the next one runs; a
    torch-native row with no attention kernel gives no ratio (no division by zero); a capture that broke the
    allocator ends the run."""
    import torch

    from maefast.graphs import CaptureError

    out = tmp_path / "p.json"
    seen = []

    def fake(p, *a, **k):
        if p == "reference":
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
        saved = json.loads(out.read_text())  # so far: partial (gpu_check's step note says so when cut there)
        seen.append([r["provider"] for r in saved["results"]])
        assert saved["complete"] is False
        return dict(provider=p, attention_ms_per_step={"maefast": 2.0, "sdpa": 0.0}[p])

    monkeypatch.setattr(profile_step, "profile_provider", fake)
    monkeypatch.setattr(profile_step, "format_table", lambda r: "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert profile_step.main(["--providers", "reference,maefast,sdpa", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert seen == [["reference"], ["reference", "maefast"]]
    assert rec["results"][0] == {"provider": "reference", "error": "RuntimeError: CUDA out of memory."}
    assert "attention_ms_ratio" not in rec and rec["complete"] is True

    def broken(p, *a, **k):
        raise CaptureError("capture failed", broken=True)

    monkeypatch.setattr(profile_step, "profile_provider", broken)
    with pytest.raises(CaptureError):
        profile_step.main(["--providers", "reference,maefast", "--json", str(out)])


@pytest.mark.parametrize("name, met, missed", [
    ("attention_profile_ratio", 0.67, 0.6701), ("attention_fwdbwd_vs_best_sdpa", 1.5, 1.4999),
    ("attention_fwd_vs_best_sdpa", 1.0, 0.9999), ("mask_embed_fwd_bwd_vs_reference", 4.0, 3.9999),
    ("memory_bound_frac_peak_bw", 0.8, 0.7999), ("train_vs_step", 0.95, 0.9499),
    ("train_jpeg_vs_synthetic", 0.9, 0.8999), ("loader_vs_step", 1.0, 0.9999), ("step_vs_reference", 2.0, 1.9999),
    ("step_vs_torch_native", 1.15, 1.1499), ("profile_overhead", 0.0499, 0.05)])
def test_every_target_is_met_at_its_threshold_and_missed_past_it(name, met, missed):
    """Each of the issues' targets at its threshold (4 decimals, as recorded) and one step the wrong side."""
    assert rec.judge(name, met)["met"] is True and rec.judge(name, missed)["met"] is False


# -- profile_step's figures (from a second mutation audit: each passed a wrong step count or row) --

def test_kernel_table_keeps_the_asked_number_of_top_kernels():
    import types

    import torch

    evts = [types.SimpleNamespace(key=f"k{i}", count=2, device_type=torch.autograd.DeviceType.CUDA,
                                  self_device_time_total=1000.0 * (i + 1)) for i in range(30)]
    t = profile_step.kernel_table(types.SimpleNamespace(key_averages=lambda: evts), steps=1, top=3)
    assert [k["name"] for k in t["top"]] == ["k29", "k28", "k27"] and t["kernels_per_step"] == 60

def test_profile_classes_every_maefast_kernel():
    """Every kernel maefast launches (the Triton `*_kernel`s of kernels/, the CUDA `__global__`s of csrc/)
    is counted as maefast's own, attention or norm time, never `other` or a generic class."""
    import re

    names = set()
    cuda = r"__global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)"
    for d, pat in (("kernels", r"^def (\w+_kernel)\("), ("csrc", cuda)):
        for f in os.listdir(os.path.join(ROOT, d)):
            if f.endswith((".py", ".cu")):
                with open(os.path.join(ROOT, d, f)) as fh:
                    names |= set(re.findall(pat, fh.read(), re.M))
    assert {"patch_gather_kernel", "_unshuffle_fwd_kernel", "_random_masking_fwd_kernel",
            "_masked_patch_embed_fwd_kernel", "_bias_gelu_fwd_kernel"} <= names, names
    got = {n: profile_step.classify(n) for n in names}
    assert all(c in ("maefast", "attention", "norm") for c in got.values()), got


def test_profile_provider_divides_by_the_profiled_steps(monkeypatch):
    """The kernel table is per step: it is given the number of profiled steps (a replay's and the eager
    fallback's alike), not one."""
    import contextlib

    import torch
    import torch.profiler

    from maefast import bench as mb

    seen = []
    monkeypatch.setattr(mb, "make_step", lambda p, m, b, device=None, dtype=None: _FakeStepRow(p, torch.float32, True))
    monkeypatch.setattr(torch.profiler, "profile", lambda **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(profile_step, "kernel_table",
                        lambda prof, steps, top: seen.append((steps, top)) or profile_step.summarise([]))
    r = profile_step.profile_provider("maefast-graph", "tiny", 2, 3, 7, torch.device("cpu"))
    assert seen == [(3, 7), (3, 7)] and r["steps"] == 3


@pytest.mark.parametrize("att, ratio", [
    ({"maefast-block-graph": 2.0, "torch-native-graph": 4.0, "sdpa": 5.0}, 0.5),
    ({"maefast-block-graph": 3.0, "maefast-graph": 2.0, "torch-native-graph": 4.0, "sdpa": 3.2}, 0.625),
    ({"maefast-block-graph": 0.0, "maefast-graph": 2.0, "torch-native-graph": 4.0}, 0.5)])
def test_profile_step_attention_ratio_is_best_against_best(monkeypatch, tmp_path, att, ratio):
    """maefast's fastest attention time against the fastest torch-native one (`sdpa` counts as torch's);
    a maefast row with no attention kernel seen (0 ms) is no figure, not a ratio of 0 that meets <= 0.67."""
    import torch

    monkeypatch.setattr(profile_step, "profile_provider",
                        lambda p, *a, **k: dict(provider=p, attention_ms_per_step=att[p]))
    monkeypatch.setattr(profile_step, "format_table", lambda r: "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "p.json"
    assert profile_step.main(["--providers", ",".join(att), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["attention_ms_ratio"] == ratio
