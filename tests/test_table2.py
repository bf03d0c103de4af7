"""maefast/table2.py beyond tests/test_bench.py: the mask-token baseline written out from its definition,
what table2() records per row (the card's defaults, fused, the overridden model's FLOPs, error rows, the
decoder-8 column per model), and `maefast bench table2`'s main() in-process with the timing faked."""
from __future__ import annotations

import json

import pytest
import torch

from maefast import bench as mb
from maefast import flops as fl
from maefast import table2 as t2
from maefast.models.configs import model_config
from maefast.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

PEAK = {"matmul_dtype": "fp32", "matmul_tflops": 2.0, "copy_gbps": 1.0}
ENV = {"card": "X", "date": "2026-12-06", "torch": "t", "git_commit": "0" * 40}


def _cell(visible_ms=100.0, mask_ms=300.0, timing="eager"):
    return {"visible_ms": visible_ms, "mask_tokens_ms": mask_ms, "visible_timing": timing, "mask_tokens_timing": timing}


def test_mask_token_encoder_written_out():
    """Table 2's baseline from its definition: each removed patch's embedding is the learned mask token,
    kept ones keep theirs, all L + cls get their position rows, and the loss is the official one on the
    head's L patch rows (norm_pix on, so a dropped flag shows)."""
    from maefast.reference.loss import forward_loss
    from maefast.reference.masking import masking_ids

    torch.manual_seed(0)
    model = mb.build_model("tiny", "reference", "cpu", norm_pix_loss=True)
    wrapped = t2.MaskTokenEncoderMAE(model)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss, pred, mask = wrapped(imgs, mask_ratio=0.75, noise=noise)

    m = model
    x = m.patch_embed.proj(imgs).flatten(2).transpose(1, 2)
    want_mask = masking_ids(2, 16, 0.75, noise=noise).mask
    x = torch.where(want_mask.bool().unsqueeze(-1), wrapped.encoder_mask_token.expand_as(x), x) + m.pos_embed[:, 1:]
    x = torch.cat(((m.cls_token + m.pos_embed[:, :1]).expand(2, -1, -1), x), dim=1)
    for blk in m.blocks:
        x = blk(x)
    x = m.decoder_embed(m.norm(x)) + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        x = blk(x)
    want_pred = m.decoder_pred(m.decoder_norm(x))[:, 1:]
    assert torch.equal(mask, want_mask)
    assert_close(pred, want_pred, torch.float32, name="pred")
    assert_close(loss, forward_loss(imgs, want_pred, want_mask, 8, norm_pix_loss=True), torch.float32, name="loss")


def test_table2_defaults_on_a_cuda_device(monkeypatch):
    """On a card (faked: the cells are): each model's batch from GPU_TABLE2_BATCH (64 for the others),
    CUDA-graph steps unless the dtype is fp16, as the docstring says."""
    seen = []

    def cell(name, impl, dd, bs, dtype, device, mask_ratio, quick, progress, overrides, cuda_graph=False):
        seen.append((name, bs, device.type, cuda_graph))
        return _cell()

    monkeypatch.setattr(t2, "_time_table2_cell", cell)
    monkeypatch.setattr(mb, "free_memory", lambda: None)
    rows = t2.table2(["base", "large", "huge", "tiny"], (8,), device="cuda", dtype=torch.bfloat16, peak=PEAK)
    assert [s[1] for s in seen] == [256, 128, 64, 64] and all(s[2:] == ("cuda", True) for s in seen), seen
    assert all(r["cuda_graph"] is True and r["dtype"] == "bfloat16" for r in rows)
    seen.clear()
    (row,) = t2.table2(["large"], (8,), device="cuda", dtype=torch.float16, peak=PEAK)
    assert seen == [("mae_vit_large_patch16", 128, "cuda", False)] and row["cuda_graph"] is False


def test_table2_rows_of_a_fused_and_an_overridden_model(monkeypatch):
    """fused only on the fast rows (the impl column says +block); the FLOP bound, MFU and images/s of
    the model as overridden and at the mask ratio run; a fused run keeps the paper's columns, an
    overridden one does not."""
    given = []

    def cell(name, impl, dd, bs, dtype, device, mask_ratio, quick, progress, overrides, cuda_graph=False):
        given.append((impl, overrides))
        return _cell()

    monkeypatch.setattr(t2, "_time_table2_cell", cell)
    rows = t2.table2(["large"], (8,), ("reference", "auto"), batch=4, device="cpu", peak=PEAK,
                     overrides={"fused": "block"})
    assert [r["fused"] for r in rows] == [False, "block"]
    # the reference row's model is built without it (maefast's model refuses impl="reference" with fused="block")
    assert given == [("reference", {}), ("auto", {"fused": "block"})]
    assert all("paper_speedup" in r for r in rows)  # fusing changes no model
    lines = t2.format_table2(rows, ENV, PEAK).splitlines()
    assert any(ln.startswith("ViT-L/16") and " auto+block " in ln for ln in lines), lines
    (row,) = t2.table2(["large"], (1,), batch=4, device="cpu", peak=PEAK, mask_ratio=0.5, overrides={"depth": 2})
    cfg = model_config("large", depth=2)
    assert row["flop_ratio"] == pytest.approx(fl.table2_flop_ratio(cfg, 1, 0.5))
    f = fl.mae_flops(model_config("large", depth=2, decoder_depth=1), mask_ratio=0.5)["train"] * 4
    assert row["mfu"] == pytest.approx(f / 0.1 / 1e12 / PEAK["matmul_tflops"])
    assert row["img_per_s"] == pytest.approx(40.0) and "paper_speedup" not in row


def test_table2_error_rows_and_partial_results(monkeypatch):
    """A cell that fails is a row saying so (its message's first line) and the run goes on: the
    decoder-8 column skips it, on_row sees every row as it lands; a capture that broke the allocator
    ends the run."""
    from maefast.graphs import CaptureError

    def cell(name, impl, dd, *a, **k):
        if dd == 1:
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
        return _cell()

    monkeypatch.setattr(t2, "_time_table2_cell", cell)
    seen = []
    rows = t2.table2(["large"], (1, 8), device="cpu", peak=PEAK, on_row=lambda rs: seen.append(len(rs)))
    assert seen == [1, 2]
    assert rows[0]["error"] == "RuntimeError: CUDA out of memory." and "speedup" not in rows[0]
    assert "speedup_vs_mask_dec8" not in rows[0] and rows[1]["speedup_vs_mask_dec8"] == pytest.approx(3.0)
    assert "RuntimeError: CUDA out of memory." in t2.format_table2(rows, ENV, PEAK)

    def broken(*a, **k):
        raise CaptureError("capture failed", broken=True)

    monkeypatch.setattr(t2, "_time_table2_cell", broken)
    with pytest.raises(CaptureError):
        t2.table2(["large"], (8,), device="cpu", peak=PEAK)


def test_table2_decoder8_column_per_model_and_the_row_order(monkeypatch):
    """Each model's rows divide by its own decoder-8 mask-token time; rows come impl-major (a time
    limit cuts the last impl short, not the last model)."""
    mask8 = {"mae_vit_large_patch16": 300.0, "mae_vit_base_patch16": 120.0}
    monkeypatch.setattr(t2, "_time_table2_cell",
                        lambda name, impl, dd, *a, **k: _cell(visible_ms=60.0, mask_ms=mask8[name] / (1 + (dd == 1))))
    rows = t2.table2(["large", "base"], (8, 1), ("reference", "auto"), device="cpu", peak=PEAK)
    assert [(r["impl"], r["model"], r["decoder_depth"]) for r in rows] == [
        (i, m, d) for i in ("reference", "auto") for m in mask8 for d in (8, 1)]
    for r in rows:
        assert r["speedup_vs_mask_dec8"] == pytest.approx(mask8[r["model"]] / 60.0), r


class _Clock:
    """A fake perf_counter: each step call advances it by the next of `ms` (then by its last)."""

    def __init__(self, ms):
        self.now, self.ms, self.calls = 0.0, list(ms), 0

    def perf_counter(self):
        return self.now

    def step(self):
        self.now += self.ms[min(self.calls, len(self.ms) - 1)] / 1e3
        self.calls += 1


@pytest.mark.parametrize("ms,calls", [([10.0], 3),  # steady from the start: min_calls
                                      ([80, 60, 45, 30, 20, 10], 8),  # falling, then two calls not faster
                                      ([40, 30, 60, 25, 20, 20, 20], 7),  # one slow call does not end it
                                      ([100 * 0.9 ** i for i in range(20)], 12),  # 10% faster each call: max_calls
                                      ([6000.0], 3)])  # past the budget at once: still min_calls
def test_warm_up_cpu_stops_where_its_docstring_says(monkeypatch, ms, calls):
    import types

    clock = _Clock(ms)
    monkeypatch.setattr(t2, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    assert len(t2.warm_up_cpu(clock.step)) == calls == clock.calls


def test_time_step_quick_takes_fewer_reps(monkeypatch):
    import types

    for quick, reps in ((True, 5), (False, 10)):
        clock = _Clock([10.0])
        fake = types.SimpleNamespace(perf_counter=clock.perf_counter)
        monkeypatch.setattr(t2, "time", fake)
        monkeypatch.setattr(t2.timing, "time", fake)
        st = t2.time_step(clock.step, torch.device("cpu"), quick=quick)
        assert st["reps"] == reps and st["warmup_calls"] == 3 and st["median_ms"] == pytest.approx(10.0)


def test_table2_cell_eager_steps_take_the_official_optimizer(monkeypatch):
    """An eager cell's two steps run foreach AdamW (the official loop's), and the record says so."""
    made = []
    real = mb.adamw

    def adamw(model, **kw):
        made.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(mb, "adamw", adamw)
    out = t2._time_table2_cell("tiny", "reference", 1, 2, torch.float32, torch.device("cpu"), 0.75, True, None, {})
    assert made == [dict(fused=False, capturable=False)] * 2
    assert out["visible_optimizer"] == out["mask_tokens_optimizer"] == "AdamW foreach"


def test_table2_cell_times_a_captured_step_on_its_own_buffer(monkeypatch):
    """A captured step is timed on its static batch: no host-to-buffer copy in the replay's time. (CPU: the
    capture is a stand-in whose replay runs the step again, as in tests/test_bench.py.)"""
    from maefast import graphs
    from maefast import step as step_mod

    real_blocker, real_call = step_mod.capture_blocker, step_mod.TrainStep.__call__
    timed = []

    def fake_capture(fn, *, warmup_steps=3, warmup_fn=None, before_capture=None, device=None, pool=None):
        out = fn()
        return type("G", (), {"replay": lambda self: out.copy_(fn())})(), out

    def call(self, imgs, *a, **k):
        timed.append(imgs is self.static_imgs)
        return real_call(self, imgs, *a, **k)

    def time_step(fn, device, quick):
        monkeypatch.setattr(step_mod.TrainStep, "__call__", call)
        fn()
        monkeypatch.setattr(step_mod.TrainStep, "__call__", real_call)
        return {"median_ms": 1.0, "reps": 1, "warmup_calls": None}

    monkeypatch.setattr(graphs, "capture_cuda_graph", fake_capture)
    monkeypatch.setattr(step_mod, "capture_blocker", lambda m, o, s, d: real_blocker(m, o, s, torch.device("cuda")))
    monkeypatch.setattr(t2, "time_step", time_step)
    out = t2._time_table2_cell("tiny", "reference", 1, 2, torch.float32, torch.device("cpu"), 0.75, True, None, {},
                               cuda_graph=True)
    assert out["visible_timing"] == out["mask_tokens_timing"] == "cuda-graph" and timed == [True, True], (out, timed)
    assert out["visible_optimizer"] == "AdamW fused, capturable"


# -- main() in-process: the arguments as a card's run passes them --------------------------------

@pytest.fixture
def fake_run(monkeypatch):
    """main() with table2() recorded instead of run, and no peak or env measured; `device` fakes --device."""
    calls = []

    def table2(models, depths, impls, **kw):
        calls.append(dict(models=models, depths=depths, impls=impls, **kw))
        rows = [dict(model=m, impl=i, decoder_depth=d, batch=2, **_cell(), flop_ratio=2.0, of_flop_bound=1.5,
                     speedup=3.0, mfu=0.1) for i in impls for m in models for d in depths]
        kw["on_row"](rows[:1])
        return rows

    monkeypatch.setattr(t2, "table2", table2)
    monkeypatch.setattr(t2.timing, "env_info", lambda dev: dict(ENV, device=dev.type))
    monkeypatch.setattr(t2.timing, "measure_peak", lambda dev: PEAK)
    monkeypatch.setattr(t2, "save_chart", lambda rows, path, title: None)
    return calls


def test_table2_main_on_a_card(fake_run, monkeypatch, tmp_path):
    """`maefast bench table2` on a GPU: ViT-B/L/H, reference and auto, bf16, CUDA-graph steps by default;
    --eager times eager steps; --fused block reaches the fast rows; --models takes b/l/h."""
    monkeypatch.setattr(mb, "parse_device", lambda name: torch.device("cuda"))
    assert t2.main(["--json", str(tmp_path / "t.json")]) == 0
    (c,) = fake_run
    assert c["models"] == ["base", "large", "huge"] and c["impls"] == ["reference", "auto"] and c["depths"] == [8, 1]
    assert c["dtype"] is torch.bfloat16 and c["cuda_graph"] is None and c["overrides"] is None
    assert t2.main(["--eager", "--fused", "block", "--models", "B,l", "--impl", "auto"]) == 0
    c = fake_run[-1]
    assert c["cuda_graph"] is False and c["overrides"] == {"fused": "block"} and c["models"] == ["base", "large"]


def test_table2_main_records_and_exit_codes(fake_run, monkeypatch, tmp_path):
    """The JSON of a run cut short says partial; a failed row makes exit 1 (the table and JSON still written)."""
    out = tmp_path / "t.json"
    partial = {}
    real_write = t2.json.dumps

    def spy(obj, **kw):
        if obj.get("partial"):
            partial.update(obj)
        return real_write(obj, **kw)

    monkeypatch.setattr(t2.json, "dumps", spy)
    assert t2.main(["--models", "tiny", "--json", str(out)]) == 0
    assert partial["partial"] is True and len(partial["rows"]) == 1
    rec = json.loads(out.read_text())
    assert "partial" not in rec and len(rec["rows"]) == 2 and rec["kind"] == "maefast.table2"
    real = t2.table2  # fake_run's

    def failing(models, depths, impls, **kw):
        rows = real(models, depths, impls, **kw)
        rows[-1] = {k: v for k, v in rows[-1].items() if k not in ("visible_ms", "mask_tokens_ms")}
        rows[-1]["error"] = "RuntimeError: boom"
        return rows

    monkeypatch.setattr(t2, "table2", failing)
    assert t2.main(["--models", "tiny", "--json", str(out), "--overwrite"]) == 1
    assert json.loads(out.read_text())["rows"][-1]["error"] == "RuntimeError: boom"


def test_table2_cpu_note_names_the_batch_and_dtype_that_ran(fake_run, tmp_path):
    """The CPU default's note (printed and recorded in the JSON) gives the batch and dtype of the run, not the
    defaults it said whatever --batch / --dtype were."""
    out = tmp_path / "t.json"
    assert t2.main(["--batch", "small=3", "--dtype", "bf16", "--json", str(out)]) == 0
    assert "(mae_vit_small_cpu, batch 3, bfloat16)" in json.loads(out.read_text())["note"]


@pytest.mark.parametrize("args,needle", [(["--decoder-depths", "8,0"], "--decoder-depths"),
                                         (["--override", "norm_layer=1"], "'norm_layer' is not a model setting"),
                                         (["--png", "chart.jpg"], r"--png 'chart.jpg': .*end it in \.png")])
def test_table2_main_refuses_before_any_work(fake_run, args, needle):
    with pytest.raises(ValueError, match=needle):
        t2.main(["--models", "tiny", *args])
    assert not fake_run


@pytest.mark.parametrize("name", ["chart.png", "t.JPG", "t.svg", "t.pdf"])
def test_table2_json_refuses_an_image_name(fake_run, tmp_path, name):
    """--json with an image's ending is refused before any work, naming --json, also with --png elsewhere and
    --overwrite given: JSON text was written over the user's picture (`--json x.png` alone was refused as
    "--json and --png name the same file", a --png the user never gave)."""
    picture = tmp_path / name
    picture.write_bytes(b"\x89PNG user's own")
    for extra in ([], ["--png", str(tmp_path / "c.png"), "--overwrite"]):
        with pytest.raises(ValueError, match=rf"--json '.*{name}': the name's ending '\.[a-z]+' is an image's"):
            t2.main(["--models", "tiny", "--json", str(picture), *extra])
    assert picture.read_bytes() == b"\x89PNG user's own" and not fake_run
    assert not (tmp_path / "c.png").exists()
    assert t2.main(["--models", "tiny", "--json", str(tmp_path / "t.txt")]) == 0  # not an image's: any ending


def test_table2_json_keeps_an_existing_chart_beside_it(fake_run, tmp_path):
    """--json r.json writes its chart to r.png (--png's default): a user's r.png there is replaced only with
    --overwrite, and the refusal says where that name came from (it named a --png the user never gave)."""
    chart = tmp_path / "r.png"
    chart.write_bytes(b"user's chart")
    with pytest.raises(ValueError, match=r"--json '.*r\.json' also writes the chart '.*r\.png' \(--png's default\), "
                                         r"which exists: pass --overwrite"):
        t2.main(["--models", "tiny", "--json", str(tmp_path / "r.json")])
    assert chart.read_bytes() == b"user's chart" and not fake_run and not (tmp_path / "r.json").exists()
    assert t2.main(["--models", "tiny", "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "o.png")]) == 0
    assert chart.read_bytes() == b"user's chart"


def test_override_names_only_the_settings_it_takes(fake_run):
    """The list of settings in --override's refusal is the one it takes: decoder_depth (refused, a column of
    --decoder-depths) was offered in it."""
    with pytest.raises(ValueError, match="'x' is not a model setting") as e:
        t2.main(["--models", "tiny", "--override", "x=1"])
    assert "decoder_depth" not in str(e.value) and "norm_layer" not in str(e.value) and "depth" in str(e.value)
    assert not fake_run


def test_parse_batches_refuses_a_zero_batch_per_model():
    with pytest.raises(ValueError, match="--batch: 'huge=0'"):
        t2.parse_batches("large=2,huge=0")
    with pytest.raises(ValueError, match="--batch names 'h14' twice .as 'huge'."):  # the last one was taken
        t2.parse_batches("huge=2,large=4,h14=3")
    with pytest.raises(ValueError, match="--batch: '8' is not model=N"):  # not taken for a model's name
        t2.parse_batches("huge=2,8")


@pytest.mark.parametrize("name", ["base", "large", "huge"])
def test_flop_bound_of_the_paper_models_is_torchs_count(name):
    """The FLOP bound printed for the paper's ViT-B/16, L/16, H/14 (224 px: 196 / 256 patches, 49 / 64 kept),
    decoder depth 8 and 1: torch's FlopCounterMode over the full-size models' forward + backward (on the meta
    device: shapes only) of two images, visible-only and with mask tokens, per image exactly mae_flops' train
    counts, and their ratio table2_flop_ratio (tests/test_bench.py checks these sizes against MAE.md's figures
    only to 0.005)."""
    from torch.utils.flop_counter import FlopCounterMode
    from maefast.reference import MaskedAutoencoderViT

    for depth in (8, 1):
        with torch.device("meta"):
            m = MaskedAutoencoderViT(**model_config(name, decoder_depth=depth))
        counts = []
        for fwd, mask_tokens in ((m, False), (t2.MaskTokenEncoderMAE(m), True)):
            with FlopCounterMode(display=False) as fc:
                fwd(torch.empty(2, 3, 224, 224, device="meta"), mask_ratio=0.75)[0].backward()
            counts.append(fc.get_total_flops())
            assert counts[-1] == 2 * fl.mae_flops(name, decoder_depth=depth, encoder_mask_tokens=mask_tokens)["train"]
        assert fl.table2_flop_ratio(name, depth) == counts[1] / counts[0]
