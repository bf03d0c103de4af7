"""`maefast profile` on the CPU with tiny configs: the per-stage table, JSON, trace, side-by-side impls."""
from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from maefast import profile as mp
from maefast import timing
from maefast.timing import torch_threads
from cli_run import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARGS = ["--model", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    with torch_threads(torch.get_num_threads()):  # --threads 1 sets it for the process
        yield


def test_profile_table_and_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert mp.main(ARGS + ["--impl", "reference", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for stage in mp.STAGES:
        assert stage in text
    assert "img/s" in text and "MFU" in text and "profiler overhead" in text and "peak memory" in text
    assert "side by side" not in text  # one impl
    rec = json.loads(out.read_text())
    assert rec["kind"] == "maefast.profile" and {"card", "date", "torch", "git_commit"} <= set(rec["env"])
    (r,) = rec["results"]
    assert [s["stage"] for s in r["stages"]] == mp.STAGES
    for s in r["stages"]:
        assert s["ms"] > 0, s  # every stage boundary fired
        assert s["bound"] in ("compute", "memory") and "note" in s
    assert sum(s["share"] for s in r["stages"]) == pytest.approx(1.0)
    assert r["img_per_s"] > 0 and 0 < r["mfu"] and r["peak_mem_gib"] > 0
    assert r["step_ms_plain"] > 0 and r["step_ms_staged"] > 0
    # the overhead: median of the staged/plain pair ratios (the ratio of the medians beside it)
    assert math.isfinite(r["profiler_overhead"]) and r["profiler_overhead"] > -1
    assert r["profiler_overhead_of_medians"] == pytest.approx(r["step_ms_staged"] / r["step_ms_plain"] - 1)
    assert r["model"] == "mae_vit_tiny_test" and r["dtype"] == "float32" and rec["complete"] is True
    # one FLOP rule (maefast.flops): the stages sum to its training count, which has no image gradient
    from maefast import flops

    f = flops.mae_flops(r["model"])
    assert sum(s["flops"] for s in r["stages"]) == r["train_flops"] == f["train"] * r["batch"]
    assert next(s["flops"] for s in r["stages"] if s["stage"] == "backward") == f["backward"] * r["batch"]


def test_profile_json_keeps_finished_impls(tmp_path, monkeypatch):
    # written after each impl: a run killed at a GPU preset's budget keeps the impls it finished
    out = tmp_path / "p.json"
    real = mp.profile_impl

    def second_killed(name, impl, **kw):
        if impl == "auto":
            raise KeyboardInterrupt
        return real(name, impl, **kw)

    monkeypatch.setattr(mp, "profile_impl", second_killed)
    with pytest.raises(KeyboardInterrupt):
        mp.main(ARGS + ["--impl", "reference,auto", "--json", str(out)])
    rec = json.loads(out.read_text())
    assert rec["complete"] is False and [r["impl"] for r in rec["results"]] == ["reference"]


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_stage_marks_follow_the_forward(impl):
    from maefast import bench as mb

    model = mb.build_model("tiny", impl, "cpu")
    clock = mp.StageClock(torch.device("cpu"))
    clock.switch("masking+embed")
    with mp.StageMarks(model, clock):
        model(torch.randn(2, 3, 32, 32))
    clock.switch(None)
    order = [label for label, _ in clock.marks if label is not None]
    # masking+embed, then per encoder block: norms (LN1), attention (qkv, attention, proj), norms
    # (LN2, MLP; the next block's LN1), then un-shuffle, decoder, head (+ loss)
    depth = len(model.blocks)
    assert order[0] == "masking+embed"
    assert order[1:2 + 2 * depth] == ["encoder MLP/norms", "encoder attention"] * depth + ["encoder MLP/norms"]
    assert order[2 + 2 * depth:] == ["decoder embed + un-shuffle", "decoder", "head+loss"]
    assert set(clock.durations()) == set(mp.STAGES[:6])
    import torch.nn.functional as F

    import maefast.ops

    assert not hasattr(F.linear, "__wrapped__") and not hasattr(maefast.ops.layer_norm, "__wrapped__")  # restored


def test_stage_of_param():
    assert mp.stage_of_param("blocks.3.attn.qkv.weight") == "encoder attention"
    assert mp.stage_of_param("blocks.3.norm1.weight") == "encoder MLP/norms"
    assert mp.stage_of_param("model.mask_token") == "decoder embed + un-shuffle"
    assert mp.stage_of_param("decoder_blocks.0.mlp.fc1.bias") == "decoder"
    assert mp.stage_of_param("decoder_pred.weight") == "head+loss"
    assert mp.stage_of_param("something_else") is None
    # a compiled model's names (torch.compile's _orig_mod.), the mask-token encoder's token, the decoder's
    # positions (the fused path passes them to its un-shuffle op)
    assert mp.stage_of_param("_orig_mod.blocks.0.attn.proj.bias") == "encoder attention"
    assert mp.stage_of_param("encoder_mask_token") == "masking+embed"
    assert mp.stage_of_param("decoder_pos_embed") == "decoder embed + un-shuffle"


def test_profile_side_by_side_and_trace(tmp_path, capsys):
    impls = ["reference", "auto"]
    trace = tmp_path / "trace.json"
    out = tmp_path / "p.json"
    assert mp.main(ARGS + ["--impl", ",".join(impls), "--trace", str(trace), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    # on the CPU every impl runs PyTorch ops: no speed-up row, and the table says why
    assert "side by side" in text and "speed-up vs" not in text and "no speed-up row" in text
    for r in json.loads(out.read_text())["results"]:
        assert all(s["ms"] > 0 for s in r["stages"]), (r["impl"], r["stages"])
    for impl_trace in {tmp_path / f"trace.{i}.json" for i in impls}:
        events = json.loads(impl_trace.read_text())["traceEvents"]
        names = {e.get("name") for e in events}
        assert "maefast::encoder attention" in names and "maefast::optimizer" in names
    # a derived trace file that exists is the user's: refused before any work unless --overwrite
    (tmp_path / "t2.auto.json").write_text("mine")
    with pytest.raises(ValueError, match="--trace .*t2.auto.json' exists: pass --overwrite"):
        mp.main(ARGS + ["--impl", ",".join(impls), "--trace", str(tmp_path / "t2.json")])
    assert (tmp_path / "t2.auto.json").read_text() == "mine" and not (tmp_path / "t2.reference.json").exists()
    assert mp.main(ARGS + ["--impl", "auto", "--trace", str(tmp_path / "t2.auto.json"), "--overwrite"]) == 0
    assert "traceEvents" in json.loads((tmp_path / "t2.auto.json").read_text())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_profile_traces_per_impl_keep_a_compressed_ending(tmp_path):
    """Several impls: each trace's label goes before the whole ending, so a .json.gz trace stays one
    (trace.json.gz -> trace.auto.json.gz, not trace.json.auto.gz); an existing derived file is refused."""
    from maefast.cli import labelled_path

    assert labelled_path("d.v1/t.json.gz", "auto") == "d.v1/t.auto.json.gz"
    assert labelled_path("t.gz", "auto") == "t.auto.gz" and labelled_path("t", "auto") == "t.auto.json"
    (tmp_path / "t.auto.json.gz").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"--trace .*t\.auto\.json\.gz' exists: pass --overwrite"):
        mp.main(ARGS + ["--impl", "reference,auto", "--trace", str(tmp_path / "t.json.gz")])
    assert (tmp_path / "t.auto.json.gz").read_bytes() == b"mine"


def test_profile_compile_path(monkeypatch, capsys, tmp_path):
    # the compiled path's bookkeeping, without paying for inductor on the CPU
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    out = tmp_path / "p.json"
    assert mp.main(ARGS + ["--compile", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "forward (compiled)" in text and "compiled" in text and len(compiled) == 1
    assert "what runs where: not recorded under --compile" in text
    (r,) = json.loads(out.read_text())["results"]
    assert r["backends"] is None and [s["stage"] for s in r["stages"]] == mp.COMPILED_STAGES
    from maefast import flops

    f = flops.mae_flops(r["model"])
    assert [s["flops"] for s in r["stages"]] == [f["forward"] * 2, f["backward"] * 2, 0]


def test_profile_bad_impl():
    with pytest.raises(ValueError, match="--impl takes a comma list of .* got 'no-such-impl'"):
        mp.main(ARGS + ["--impl", "no-such-impl"])  # `maefast profile` prints it as one line, exit 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="what the main job tells a user without a GPU")
def test_the_cpu_default_note_names_the_batch_and_dtype_that_run(monkeypatch, capsys):
    """The small model's note gives the --batch / --dtype given (it said batch 8, fp32 whatever they were)."""
    def stop(device):
        raise RuntimeError("stop before the work")

    monkeypatch.setattr(mp.timing, "use_device", stop)
    with pytest.raises(RuntimeError, match="stop before the work"):
        mp.main(["--batch", "3", "--dtype", "bf16", "--no-progress"])
    assert "(mae_vit_small_cpu, batch 3, bfloat16, synthetic batch)" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="what the main job tells a user without a GPU")
def test_default_profile_on_the_cpu_says_what_runs_where():
    # the README's main job, `maefast profile`, on the embedded default (small MAE, batch 8, synthetic):
    # quick, and on the CPU no "speed-up" that compares the reference ops with themselves
    t0 = time.perf_counter()
    r = run_cli("profile", "--threads", "1", "--no-progress", "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - t0 < 90
    out = r.stdout
    assert "mae_vit_small_cpu" in out and "CPU: small config by default" in r.stderr
    assert "impl=auto runs each maefast op's PyTorch reference" in out and "need a CUDA GPU" in out
    assert "speed-up" not in out.replace("no speed-up of maefast's kernels", "")
    where = [ln for ln in out.splitlines() if ln.startswith("what runs where")]
    assert len(where) == 1 and "attention reference" in where[0] and "loss reference" in where[0], out
    for stage in mp.STAGES:
        assert stage in out


def test_side_by_side_speed_up_only_on_a_gpu():
    def res(impl, ms, device):
        return {"impl": impl, "compile": False, "device": device, "step_ms_plain": ms, "img_per_s": 8 / ms,
                "stages": [{"stage": "backward", "ms": ms / 2}]}

    gpu = mp.format_side_by_side([res("reference", 20.0, "cuda"), res("auto", 10.0, "cuda")])
    assert "speed-up vs reference" in gpu and "2.00x" in gpu
    cpu = mp.format_side_by_side([res("reference", 20.0, "cpu"), res("auto", 10.0, "cpu")])
    assert "speed-up vs" not in cpu and "2.00x" not in cpu and "no speed-up row" in cpu


def test_side_by_side_names_compiled_columns_whole():
    """`maefast profile --compile --impl reference,auto`: the columns read "reference (compiled)" and
    "auto (compiled)" (they were cut to 14 characters: "reference (com"), each value under its name."""
    rows = [{"impl": impl, "compile": True, "device": "cuda", "step_ms_plain": ms, "img_per_s": 8 / ms,
             "stages": [{"stage": "backward", "ms": ms / 2}]} for impl, ms in (("reference", 20.0), ("auto", 10.0))]
    lines = mp.format_side_by_side(rows).splitlines()
    head = lines[1]
    assert head.endswith(" reference (compiled)      auto (compiled)"), head
    for line in lines[3:]:
        assert len(line) == len(head), (line, head)  # every value right-aligned under its column's name
    assert lines[-1].startswith("speed-up vs reference ") and lines[-1].endswith("2.00x")


def test_backend_log_records_what_the_ops_chose():
    from maefast import bench as mb

    model = mb.build_model("tiny", "auto", "cpu")
    with mp.BackendLog() as log:
        model(torch.randn(2, 3, 32, 32))[0].backward()
    assert set(log.ran) >= {"masking", "patch_embed", "attention", "unshuffle", "loss"}, log.ran
    assert all(set(c) == {"reference"} for c in log.ran.values()), log.ran  # auto on CPU tensors
    assert log.ran["masking"] == {"reference": 1}, log.ran  # one masking, counted once (not its checks)
    # each op call that resolves counts once: the embedding's forward and backward, not its argument checks
    assert log.ran["patch_embed"] == {"reference": 2}, log.ran
    import maefast.ops.attention as att

    assert not hasattr(att._resolve, "__wrapped__")  # restored
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs the Triton kernels on CPU tensors
        model = mb.build_model("tiny", "triton", "cpu")
        with mp.BackendLog() as log:
            model(torch.randn(2, 3, 32, 32))
        assert log.ran["attention"] == {"triton": len(model.blocks) + len(model.decoder_blocks)}, log.ran


def test_profile_fused_block(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert mp.main(ARGS + ["--impl", "auto", "--fused", "block", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fused=block" in text
    (r,) = json.loads(out.read_text())["results"]
    assert r["fused"] == "block" and r["step_ms_plain"] > 0
    ms = {s["stage"]: s["ms"] for s in r["stages"]}
    assert ms["encoder MLP/norms"] > 0 and ms["decoder"] > 0  # each block op lands in one stage


def test_profiler_overhead_pairs_are_warm():
    """--warmup 0: the first staged step is cold (first calls, backend choice): not an overhead pair;
    the plain step gets an untimed first call; one step alone has no pair to give."""
    for steps, pairs in ((1, 0), (3, 2)):
        r = mp.profile_impl("tiny", "auto", batch=1, dtype=torch.float32, device=torch.device("cpu"), steps=steps,
                            warmup=0)
        assert r["overhead_pairs"] == pairs and r["steps"] == steps
        assert (pairs == 0) == (r["profiler_overhead"] is None)


def test_a_device_index_selects_the_card_and_plain_cuda_keeps_the_current_one(monkeypatch):
    """`maefast profile` / `bench table2` on `--device cuda` (the default on a GPU) must not call
    torch.cuda.set_device (it needs an index); `cuda:1` makes that card current."""
    from maefast import timing

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    for d in ("cpu", "cuda"):
        timing.use_device(torch.device(d))
    assert calls == []
    timing.use_device(torch.device("cuda:1"))
    assert calls == [torch.device("cuda:1")]


def test_overhead_mfu_and_img_per_s_are_the_plain_steps(monkeypatch):
    """img/s and MFU come from the plain step (not the one with the stage clock), and the profiler's
    overhead is the staged step's extra time over the plain one (100 ms added to each staged step here: a
    shared CPU's noise stays below it; the tiny step itself takes a few ms)."""
    real = mp.StageClock.switch

    def slow(self, label):
        real(self, label)
        if self.enabled and label == "backward":
            time.sleep(0.1)

    monkeypatch.setattr(mp.StageClock, "switch", slow)
    with timing.torch_threads(1):  # one thread: oversubscribed OpenMP on a loaded CPU stalls a step for 100s of ms
        r = mp.profile_impl("tiny", "reference", batch=2, dtype=torch.float32, device=torch.device("cpu"), steps=5,
                            warmup=1, progress=False, peak={"matmul_tflops": 1.0, "copy_gbps": 1.0})
    assert r["overhead_pairs"] >= 3  # the median of several pairs: one stalled plain step does not decide it
    assert r["img_per_s"] == pytest.approx(2 / (r["step_ms_plain"] * 1e-3))
    assert r["mfu"] == pytest.approx(r["train_flops"] / (r["step_ms_plain"] * 1e-3) / 1e12)
    assert r["step_ms_staged"] >= 100 and r["profiler_overhead"] > 0


# -- the record's arithmetic, each step's settings and the defaults ---------------------------------

PEAK = {"matmul_dtype": "fp32", "matmul_tflops": 2.0, "copy_gbps": 1.0}


class _Ticks:
    """time's stand-in in maefast.profile: each perf_counter read 1 ms after the last, so a timed span
    is its number of reads and every step's times repeat exactly."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        self.t += 1e-3
        return self.t


def test_record_arithmetic_on_a_deterministic_clock(monkeypatch):
    """Every staged/plain pair but one (a stalled step) has one ratio here: the overhead is it minus 1
    (the ratio of the medians too); img/s, TFLOP/s and MFU are the plain step's against the measured
    peak (2 TFLOP/s, so a dropped division shows); a stage's bound is its intensity against the ridge
    point."""
    ticks, optimizer_ends = _Ticks(), []
    monkeypatch.setattr(mp, "time", ticks)
    real_switch = mp.StageClock.switch

    def switch(self, label):  # the first timed step's optimizer stalls for a second: the medians ignore it
        if label is None and self.enabled and self.current == "optimizer":
            optimizer_ends.append(1)
            ticks.t += 1.0 if len(optimizer_ends) == 2 else 0.0
        real_switch(self, label)

    monkeypatch.setattr(mp.StageClock, "switch", switch)
    peak = dict(PEAK, copy_gbps=1e5)  # ridge 20 FLOP/B: the tiny model's stages fall on both sides
    r = mp.profile_impl("tiny", "reference", batch=2, dtype=torch.float32, device=torch.device("cpu"), steps=3,
                        warmup=1, progress=False, peak=peak)
    assert r["step_ms_plain"] == pytest.approx(1.0)  # two reads around the plain step
    staged = r["step_ms_staged"]
    assert staged == pytest.approx(r["step_ms_stage_sum"]) and staged > 2
    assert r["overhead_pairs"] == 3
    assert {s["stage"]: s["ms"] for s in r["stages"]}["optimizer"] == pytest.approx(1.0)  # each step's own marks
    assert r["profiler_overhead"] == pytest.approx(staged - 1.0) == pytest.approx(r["profiler_overhead_of_medians"])
    assert r["img_per_s"] == pytest.approx(2000.0)
    assert r["tflops"] == pytest.approx(r["train_flops"] / 1e-3 / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops"] / 2.0)
    ridge = timing.ridge_point(peak)
    assert {s["bound"] for s in r["stages"]} == {"compute", "memory"}
    for s in r["stages"]:
        assert s["bound"] == ("compute" if s["intensity"] > ridge else "memory"), s
    by = {s["stage"]: s["bytes"] for s in r["stages"]}
    assert by["backward"] == 2 * sum(by[s] for s in mp.STAGES[:6])  # the backward reads and writes twice the forward's
    # getrusage's ru_maxrss is KiB on Linux: a process with torch loaded holds far more than 50 MiB
    assert r["peak_mem_gib"] > 0.05


def test_each_impl_steps_eagerly_with_the_official_optimizer(monkeypatch):
    """profile_impl's step: eager (stage marks need the Python between stages), the default AdamW
    (foreach, not fused or capturable: the official loop's), the dtype and mask ratio asked for, with
    cudnn.benchmark on; its bytes count dtype-sized activations and its FLOPs that mask ratio."""
    from maefast import flops

    seen = {}
    real = mp.TrainStep

    def spy(fwd, opt, **kw):
        seen.update(opt=opt, **kw)
        return real(fwd, opt, **kw)

    monkeypatch.setattr(mp, "TrainStep", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    r = mp.profile_impl("tiny", "auto", batch=1, dtype=torch.bfloat16, device=torch.device("cpu"), steps=1, warmup=0,
                        mask_ratio=0.5, progress=False, peak=PEAK)
    assert seen["capture"] is False and seen["dtype"] is torch.bfloat16 and seen["mask_ratio"] == 0.5
    assert all(not g.get("fused") and not g.get("capturable") and g["betas"] == (0.9, 0.95)
               for g in seen["opt"].param_groups)
    assert torch.backends.cudnn.benchmark is True
    byt = flops.stage_bytes(r["model"], 1, act_bytes=2, mask_ratio=0.5)
    assert {s["stage"]: s["bytes"] for s in r["stages"] if s["stage"] in mp.STAGES[:6]} == {
        k: v for k, v in byt.items() if k in mp.STAGES[:6]}
    assert r["train_flops"] == flops.mae_flops(r["model"], mask_ratio=0.5)["train"]
    assert set(r["backends"]["attention"]) == {"reference"}  # logged in the first step, even with one step


def test_staged_and_plain_steps_alternate():
    """The timed steps come in pairs, staged first in one, plain first in the next; the plain step's
    first (cold) call comes right after the first staged step, untimed."""
    order = []

    class Recorded(mp.TrainStep):
        def __call__(self, *a, **kw):
            order.append("plain")
            self._plain = True
            try:
                return super().__call__(*a, **kw)
            finally:
                self._plain = False

        def forward(self, *a, **kw):
            if not getattr(self, "_plain", False):
                order.append("staged")
            return super().forward(*a, **kw)

    import unittest.mock

    with unittest.mock.patch.object(mp, "TrainStep", Recorded):
        mp.profile_impl("tiny", "reference", batch=1, dtype=torch.float32, device=torch.device("cpu"), steps=2,
                        warmup=1, progress=False, peak=PEAK)
    assert order == ["staged", "plain"] + ["staged", "plain", "plain", "staged"]


def test_profile_reference_ignores_fused():
    """--fused block is the fast model's: the reference impl beside it runs the official computation."""
    r = mp.profile_impl("tiny", "reference", batch=1, dtype=torch.float32, device=torch.device("cpu"), steps=1,
                        warmup=0, progress=False, peak=PEAK, fused="block")
    assert r["fused"] is False and r["impl"] == "reference"


@pytest.mark.parametrize("gpu", [False, True])
def test_defaults_per_device(monkeypatch, gpu):
    """`maefast profile` with no options (README): the small config, batch 8, fp32, 5 steps, maefast's
    model alone on the CPU; ViT-B, batch 64, bf16, 10 steps, the official computation then maefast's on
    a GPU (a stand-in: the device, its peak and environment faked; profile_impl records its call)."""
    calls = []
    monkeypatch.setattr(mp, "profile_impl", lambda name, impl, **kw: calls.append((name, impl, kw)) or {})
    monkeypatch.setattr(mp, "format_profile", lambda r, peak: "")
    monkeypatch.setattr(mp, "format_side_by_side", lambda results: "")
    monkeypatch.setattr(mp.timing, "measure_peak", lambda dev=None: PEAK)
    if gpu:
        monkeypatch.setattr(mp.mb, "parse_device", lambda name: torch.device("cuda"))
        monkeypatch.setattr(mp.timing, "env_info", lambda dev=None: {"card": "GPU", "date": "d", "torch": "t",
                                                                     "git_commit": "0" * 40})
    assert mp.main(["--no-progress"]) == 0
    want = (("mae_vit_base_patch16" if gpu else "small"), 64 if gpu else 8, torch.bfloat16 if gpu else torch.float32,
            10 if gpu else 5)
    assert [c[1] for c in calls] == (["reference", "auto"] if gpu else ["auto"])
    for name, _, kw in calls:
        assert (mp.resolve_model_name(name), kw["batch"], kw["dtype"], kw["steps"]) == (
            mp.resolve_model_name(want[0]), *want[1:])
        assert kw["warmup"] == 2 and kw["mask_ratio"] == 0.75 and kw["compile"] is False and kw["fused"] is False


def test_options_reach_each_impl(monkeypatch):
    calls = []
    monkeypatch.setattr(mp, "profile_impl", lambda name, impl, **kw: calls.append(
        (kw, torch.get_num_threads())) or {})
    monkeypatch.setattr(mp, "format_profile", lambda r, peak: "")
    monkeypatch.setattr(mp.timing, "measure_peak", lambda dev=None: PEAK)
    torch.set_num_threads(2)  # the autouse fixture restores it
    assert mp.main(["--model", "tiny", "--mask-ratio", "0.5", "--threads", "1", "--no-progress"]) == 0
    ((kw, threads),) = calls
    assert kw["mask_ratio"] == 0.5 and threads == 1


@pytest.mark.parametrize("flag", ["--steps", "--threads"])
def test_profile_refuses_zero_counts(flag):
    # --steps 0 left no step to take a median of (a StatisticsError traceback after the peak measurement)
    with pytest.raises(ValueError, match=f"{flag} must be a finite number > 0"):
        mp.main([flag, "0", "--no-progress"])


def test_single_impl_prints_no_side_by_side(monkeypatch, capsys):
    monkeypatch.setattr(mp, "profile_impl", lambda name, impl, **kw: {"impl": impl})
    monkeypatch.setattr(mp, "format_profile", lambda r, peak: "")
    monkeypatch.setattr(mp.timing, "measure_peak", lambda dev=None: PEAK)
    assert mp.main(["--model", "tiny", "--no-progress"]) == 0
    assert "side by side" not in capsys.readouterr().out


def test_stage_marks_read_weights_passed_by_keyword():
    from maefast import bench as mb
    import torch.nn.functional as F

    model = mb.build_model("tiny", "reference", "cpu")
    fc1 = model.decoder_blocks[0].mlp.fc1
    clock = mp.StageClock(torch.device("cpu"))
    clock.switch("masking+embed")
    with mp.StageMarks(model, clock):
        F.linear(torch.randn(2, fc1.in_features), weight=fc1.weight, bias=fc1.bias)
    assert clock.current == "decoder"


def test_export_trace_keeps_a_replaced_files_mode(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("old")
    os.chmod(path, 0o640)

    class Prof:  # torch.profiler's writer stand-in
        def export_chrome_trace(self, p):
            with open(p, "w") as f:
                f.write('{"traceEvents": []}')

    mp._export_trace(Prof(), str(path))
    assert json.loads(path.read_text()) == {"traceEvents": []} and path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temporary left
