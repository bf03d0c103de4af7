"""`maefast train` on the fast path (issues 14 and 15), on the CPU with the tiny model: the step is a
`maefast.TrainStep` (captured through the CPU stand-in of tests/fake_capture.py: the same steps bit for
bit as eager ones, resumed exactly), batches travel as uint8 (the same run bit for bit as float32
batches on the CPU's reference ops), --compile is one graph or says why not, --no-save writes no
checkpoint, and the device feed hands out batches one ahead (its stream rules: the `cuda` test)."""
import functools
import json
import os

import fake_capture
import pytest
import torch

from maefast.train import TrainConfig, load_checkpoint, train
from maefast.train import loop as loop_mod
from maefast.train import setup as setup_mod
from maefast.train.config import config_from_args, resolve_config
from maefast.train.feed import DeviceFeed, bytes_per_image

TINY = dict(model="mae_vit_tiny_test", data="synthetic", batch_size=4, progress=False, workers=0, device="cpu",
            plot=False, export=False, log_every=1, lr=1e-3, epochs=1)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def _losses(folder):
    with open(os.path.join(folder, "steps.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def _assert_same_run(a, b):
    """Same losses, weights and AdamW state, bit for bit."""
    assert _losses(a) == _losses(b)
    ca, cb = (load_checkpoint(os.path.join(d, "checkpoint-last.pth")) for d in (a, b))
    assert ca["step"] == cb["step"]
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for i, st in ca["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[name], cb["optimizer"]["state"][i][name]), (i, name)


def _folder(root, n_good, n_bad, size=32):
    from maefast.train.data import SyntheticDataset

    src = SyntheticDataset(n_good, size, 4, data_seed=7)
    root.mkdir(parents=True)
    for i in range(n_good):
        src.load(i).save(root / f"{i}.jpg", quality=90)
    for i in range(n_bad):
        (root / f"bad{i}.jpg").write_bytes(os.urandom(200))
    return root


# -- uint8 batches ---------------------------------------------------------------------------------

def test_uint8_is_the_default_and_recorded():
    assert TrainConfig().image_dtype == "uint8" and config_from_args([]).image_dtype == "uint8"
    with pytest.raises(ValueError, match="--image-dtype must be one of uint8, float32"):
        resolve_config(TrainConfig(image_dtype="float16"), cuda=False)
    assert bytes_per_image(224, torch.uint8) == 150528 and bytes_per_image(224, torch.float32) == 602112


@pytest.mark.parametrize("data", ["synthetic", "jpeg-folder"])
def test_uint8_batches_train_like_float32_batches(tmp_path, data, capsys):
    """uint8 batches normalised inside the model train exactly as float32 batches normalised on the
    CPU (torchvision's arithmetic both ways): same losses, weights and optimizer state, bit for bit;
    a folder's unreadable file (a short batch) too."""
    kw = dict(synthetic_size=16) if data == "synthetic" else dict(data=str(_folder(tmp_path / "d", 15, 1)))
    runs = {}
    for dt in ("float32", "uint8"):
        res = train(_cfg(image_dtype=dt, **kw), output_dir=str(tmp_path / dt))
        assert res["config"].image_dtype == dt and res["steps"] == 4
        assert load_checkpoint(str(tmp_path / dt / "checkpoint-last.pth"), states=False)["config"]["image_dtype"] == dt
        runs[dt] = str(tmp_path / dt)
    _assert_same_run(runs["float32"], runs["uint8"])
    err = capsys.readouterr().err
    assert "batches: uint8 images, 3.1 KB each to the cpu (float32: 12.3 KB)" in err


def test_image_dtype_may_change_on_resume(tmp_path):
    """--image-dtype is changeable (the same steps either way), announced and recorded."""
    out = str(tmp_path / "run")
    train(_cfg(synthetic_size=16, image_dtype="float32"), output_dir=out, max_steps=2)
    res = train(_cfg(synthetic_size=16), output_dir=out, resume="auto", image_dtype="uint8")  # set: explicit
    assert res["steps"] == 4 and res["config"].image_dtype == "uint8"
    train(_cfg(synthetic_size=16), output_dir=str(tmp_path / "straight"))
    _assert_same_run(str(tmp_path / "straight"), out)
    ck = load_checkpoint(os.path.join(out, "checkpoint-last.pth"), states=False)
    assert ck["history"][-1]["changed"]["image_dtype"] == ["float32", "uint8"]


# -- the captured step (the CPU stand-in) -----------------------------------------------------------

@pytest.fixture
def capturable(monkeypatch):
    """TrainStep captures on the CPU (fake_capture) and the run's AdamW is capturable, with the lr a
    tensor in every run (a captured step's lrs are tensors: the eager twin computes the same way)."""
    real = loop_mod.build_optimizer

    def build(model, wrapped, cfg, lr, **kw):
        return real(model, wrapped, cfg, torch.tensor(lr), fused=True, capturable=True)

    monkeypatch.setattr(loop_mod, "build_optimizer", build)
    return fake_capture.install(monkeypatch)


@pytest.mark.parametrize("extra", [{}, dict(accum_iter=2, batch_size=2, clip_grad=0.05)], ids=["plain", "accum-clip"])
def test_captured_training_equals_eager_training(tmp_path, capturable, extra):
    """--cuda-graph auto captures where it can (here: the stand-in) and trains the same steps, bit for
    bit, as --cuda-graph off: the lr schedule written into the step's tensors, the returned loss read
    before the next replay, the gradients dropped at each epoch start."""
    cfg = _cfg(synthetic_size=12, epochs=2, warmup_epochs=0.5, **extra)
    eager = train(cfg, output_dir=str(tmp_path / "eager"), cuda_graph="off")
    graph = train(cfg, output_dir=str(tmp_path / "graph"))
    assert eager["train_step"] == {"captured": False, "eager_reason": "capture=False", "compiled": None}
    assert graph["train_step"] == {"captured": True, "eager_reason": None, "compiled": None}
    assert sum(g.replays for g in capturable.made) == 6 * cfg.accum_iter
    _assert_same_run(str(tmp_path / "eager"), str(tmp_path / "graph"))


def test_captured_training_resumes_exactly(tmp_path, capturable):
    cfg = _cfg(synthetic_size=16)
    train(cfg, output_dir=str(tmp_path / "straight"))
    out = str(tmp_path / "split")
    train(cfg, output_dir=out, max_steps=2)
    res = train(cfg, output_dir=out, resume="auto")
    assert res["steps"] == 4 and res["train_step"]["captured"]
    _assert_same_run(str(tmp_path / "straight"), out)


def test_captured_training_skips_short_batches(tmp_path, capturable, capsys):
    """A batch left short by unreadable files is skipped by a captured step (one batch shape), and
    counted; the eager step trains on it."""
    data = str(_folder(tmp_path / "d", 14, 2))
    eager = train(_cfg(data=data), output_dir=str(tmp_path / "eager"), cuda_graph="off")
    graph = train(_cfg(data=data), output_dir=str(tmp_path / "graph"))
    assert eager["steps"] == 4 and eager["skipped_files"] == graph["skipped_files"] == 2
    assert 2 <= graph["steps"] <= 3 and graph["train_step"]["captured"]
    assert "skipped 2 unreadable" in capsys.readouterr().err


def test_captured_accumulation_skipping_its_last_micro_batch_starts_the_next_from_zero(tmp_path, capturable,
                                                                                      monkeypatch):
    """accum_iter 2: a short batch at a cycle's end is skipped with the cycle's partial gradient dropped
    (its optimizer step is not taken); every later cycle starts from zero gradients, not from the skipped
    cycle's first micro-batch (the captured graphs accumulate in place)."""
    # micro-batch 1 (of 2 images): the end of the first accumulation cycle
    root, seed = _folder_of(tmp_path / "d", 12, {_epoch0(12)[2]}), 0
    starts, real = [], loop_mod._Trainer._micro_step

    def micro_step(self, batch, b):
        step = self.train_step
        if b % 2 == 0 and step.captured:  # a cycle's first micro-batch: the gradients it accumulates into
            starts.append(max(g.abs().max().item() for g in step._static_grads if g is not None))
        return real(self, batch, b)

    monkeypatch.setattr(loop_mod._Trainer, "_micro_step", micro_step)
    res = train(_cfg(data=root, batch_size=2, accum_iter=2, seed=seed), output_dir=str(tmp_path / "run"))
    assert res["train_step"]["captured"] and res["skipped_files"] == 1
    assert len(starts) == 2 and starts == [0.0, 0.0], starts  # micro-batches 2 and 4 (0: not yet captured)


def _cli(tmp_path, *extra):
    return ["--model", "mae_vit_tiny_test", "--data", "synthetic", "--synthetic-size", "8", "--batch-size", "4",
            "--epochs", "1", "--workers", "0", "--device", "cpu", "--no-progress", "--no-plot", "--no-export",
            "--output-dir", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("fixed_torch", [False, True], ids=["torch-2.11", "fixed-torch"])
def test_a_capture_that_fails_inside_the_graph_stops_the_run_in_one_line(tmp_path, monkeypatch, capsys, fixed_torch):
    """--cuda-graph auto, a forward that fails only under capture (a copy from pageable memory, which
    the warm-up's sync check cannot see; graphs.capture_cuda_graph's own code through the CPU stand-in
    of torch.cuda): no eager fallback in this process, one line that says to run with --cuda-graph
    off, exit 2, no step taken."""
    from maefast.models import MaskedAutoencoderViT
    from maefast.train import main

    cuda = fake_capture.FakeCuda(fixed_torch=fixed_torch).install(monkeypatch)
    real = loop_mod.build_optimizer

    def build(model, wrapped, cfg, lr, **kw):
        return real(model, wrapped, cfg, lr, fused=True, capturable=True)

    monkeypatch.setattr(loop_mod, "build_optimizer", build)
    forward = MaskedAutoencoderViT.forward

    @functools.wraps(forward)
    def copying(self, *args, **kwargs):
        cuda.pageable_copy()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MaskedAutoencoderViT, "forward", copying)
    assert main(_cli(tmp_path)) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and err[0].startswith("maefast train: error: --cuda-graph auto: the training step failed "
                                               "inside its CUDA-graph capture (RuntimeError: CUDA error: operation not "
                                               "permitted when stream is capturing); "), err
    assert err[0].endswith(": run again with --cuda-graph off")
    assert ("allocator is left unusable" in err[0]) is (not fixed_torch)
    assert not (tmp_path / "run" / "steps.jsonl").exists() or not _losses(tmp_path / "run")


def test_a_capture_failure_inside_the_graph_is_not_taken_for_a_compile_failure(tmp_path, capturable, aot_eager):
    """--compile: a capture failure whose cause is dynamo's (a recompile refused under capture) stops
    the run; it never rebuilds the step with graph breaks (its capture would meet the broken allocator)."""
    from torch._dynamo.exc import Unsupported

    from maefast import graphs

    try:
        raise Unsupported("data-dependent branching")
    except Unsupported as cause:
        err = graphs.CaptureError(f"Unsupported: {cause}", broken=True)
        err.__cause__ = cause
    capturable.fail = err
    with pytest.raises(loop_mod.RunError, match="failed inside its CUDA-graph capture .*--cuda-graph off"):
        train(_cfg(synthetic_size=8), output_dir=str(tmp_path / "run"), compile=True)


def test_cuda_graph_is_changeable_and_older_booleans_read(tmp_path):
    from maefast.train.resume import reconcile

    ck = {"config": {"cuda_graph": False, "batch_size": 4, "accum_iter": 1}, "schedule": {"global_batch": 4}}
    cfg, notes, changed = reconcile(TrainConfig(explicit=()), ck, "ck.pth", world_size=1)
    assert resolve_config(cfg, cuda=False).cuda_graph == "off" and not changed
    cfg, notes, changed = reconcile(TrainConfig(cuda_graph="off", explicit=("cuda_graph",)), ck, "ck.pth", 1)
    assert not changed  # False recorded is "off"
    cfg, notes, changed = reconcile(TrainConfig(cuda_graph="auto", explicit=("cuda_graph",)), ck, "ck.pth", 1)
    assert cfg.cuda_graph == "auto" and "cuda_graph" in changed


# -- --compile ------------------------------------------------------------------------------------

@pytest.fixture
def aot_eager(monkeypatch):
    """--compile with the aot_eager backend (Inductor's code generation takes minutes on this CPU),
    from a clean dynamo cache (each new model instance would count towards the recompile limit)."""
    torch._dynamo.reset()
    monkeypatch.setattr(setup_mod, "COMPILE_BACKEND", "aot_eager")
    yield
    torch._dynamo.reset()


def test_compile_is_one_graph(tmp_path, aot_eager):
    """--compile: torch.compile(fullgraph=True, dynamic=False) of the model, uint8 batches and all;
    the same run as eager up to the compiled graph's rounding."""
    cfg = _cfg(synthetic_size=8)
    res = train(cfg, output_dir=str(tmp_path / "compiled"), compile=True)
    assert res["train_step"]["compiled"] == "fullgraph" and res["steps"] == 2
    train(cfg, output_dir=str(tmp_path / "eager"))
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-5)


def test_compile_falls_back_to_graph_breaks_with_one_line(tmp_path, aot_eager, monkeypatch, capsys):
    """A model whose forward breaks the graph is compiled again with graph breaks: one line says so,
    the run trains."""
    from maefast.models import MaskedAutoencoderViT

    forward = MaskedAutoencoderViT.forward

    @functools.wraps(forward)
    def breaking(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MaskedAutoencoderViT, "forward", breaking)
    res = train(_cfg(synthetic_size=8), output_dir=str(tmp_path / "run"), compile=True)
    assert res["train_step"]["compiled"] == "graph breaks" and res["steps"] == 2
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "--compile" in ln]
    assert len(notes) == 1 and "does not compile as one graph" in notes[0] and "graph breaks" in notes[0], notes


def test_compiled_training_on_one_process_skips_short_batches(tmp_path, aot_eager, capsys):
    """--compile has static shapes: on one process a batch left short by unreadable files is skipped, as by a
    captured step, and said (before 2026-12-07 each new short size compiled the model again, and the ninth
    stopped the run at torch's recompile limit under fullgraph)."""
    data = str(_folder(tmp_path / "d", 14, 2))
    with torch._dynamo.config.patch(error_on_recompile=True):
        res = train(_cfg(data=data, epochs=2), output_dir=str(tmp_path / "run"), compile=True)
    assert res["train_step"]["compiled"] == "fullgraph" and res["skipped_files"] == 4
    assert 4 <= res["steps"] <= 6
    err = capsys.readouterr().err
    assert "left short skipped whole (a compiled step takes full batches only)" in err


def _epoch0(n, batch=4):
    """Epoch 0's order of a folder of n files at seed 0 (the dropped tail left out)."""
    from maefast.train.data import ResumableDistributedSampler

    return ResumableDistributedSampler(range(n), shuffle=True, seed=0, global_batch=batch).order()


def _folder_of(root, n, bad):
    """n files named by their dataset index, those in ``bad`` unreadable."""
    from maefast.train.data import SyntheticDataset

    root.mkdir()
    src = SyntheticDataset(n, 32, 4, data_seed=7)
    for i in range(n):
        if i in bad:
            (root / f"{i:02d}.jpg").write_bytes(os.urandom(200))
        else:
            src.load(i).save(root / f"{i:02d}.jpg", quality=90)
    return str(root)


@pytest.mark.parametrize("how", ["captured", "compiled"])
def test_an_epoch_of_only_short_batches_says_why_nothing_trained(tmp_path, how, request):
    """Every batch left short and skipped (one process, a step taking full batches only): the run stops
    saying so and how to train on them, not "no readable image" (6 of the 8 files were readable)."""
    from maefast.train.errors import RunError

    request.getfixturevalue("capturable" if how == "captured" else "aot_eager")
    data = _folder_of(tmp_path / "d", 8, set(_epoch0(8)[::4]))  # one unreadable file in each batch
    flags = "--cuda-graph off" if how == "captured" else "--no-compile"
    with pytest.raises(RunError, match=f"every batch of epoch 0 was left short by unreadable files \\(2, .*a {how} "
                                       f"step on one process takes full batches only: .* run with {flags}$"):
        train(_cfg(data=data, seed=0), output_dir=str(tmp_path / "run"), compile=how == "compiled")
    res = train(_cfg(data=data, seed=0), output_dir=str(tmp_path / "eager"), cuda_graph="off")
    assert res["steps"] == 2 and res["skipped_files"] == 2



@pytest.mark.parametrize("how", ["captured", "compiled"])
def test_an_epoch_without_a_readable_image_says_so_on_a_full_batch_step(tmp_path, how, request):
    """9 files, 8 unreadable, the readable one the epoch's dropped tail: each batch is skipped by a step taking
    full batches only, but no readable image was lost, so the run says there was none (not "left short")."""
    from maefast.train.errors import RunError

    request.getfixturevalue("capturable" if how == "captured" else "aot_eager")
    data = _folder_of(tmp_path / "d", 9, set(_epoch0(9)))
    with pytest.raises(RunError, match="no readable image in epoch 0 \\(8 files failed to load"):
        train(_cfg(data=data, seed=0), output_dir=str(tmp_path / "run"), compile=how == "compiled")


# -- --no-save --------------------------------------------------------------------------------------

def test_no_save_writes_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "bench"
    res = train(_cfg(synthetic_size=8, export=True), output_dir=str(out), save=False)
    assert res["checkpoint"] is None and res["steps"] == 2 and res["encoder"]
    assert sorted(os.listdir(out)) == ["log.jsonl", "mae_pretrain_vit_tiny_test.pth", "steps.jsonl"]
    assert "no checkpoint (--no-save)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--save-every-steps write checkpoints, --no-save writes none"):
        train(_cfg(synthetic_size=8), output_dir=str(tmp_path / "x"), save=False, save_every_steps=1)
    assert not (tmp_path / "x").exists()


# -- the device feed --------------------------------------------------------------------------------

def _batches(n, device_pin=False):
    out = []
    for i in range(n):
        imgs = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
        noise = torch.rand(2, 4)
        if device_pin:
            imgs, noise = imgs.pin_memory(), noise.pin_memory()
        out.append({"images": imgs, "noise": noise, "bad": []})
    out.insert(1, {"images": None, "noise": None, "bad": ["x.jpg: OSError"]})
    return out


def test_feed_is_one_batch_ahead_on_the_cpu():
    """The next batch is fetched (its copy issued) before the current one is handed out; tensors
    pass unchanged on the CPU, an empty batch passes with None."""
    src = _batches(3)
    pulled = []

    def loader():
        for i, b in enumerate(src):
            pulled.append(i)
            yield b

    feed = DeviceFeed(type("L", (), {"__iter__": lambda self: loader(), "__len__": lambda self: len(src)})(), "cpu")
    assert len(feed) == 4
    for k, batch in enumerate(feed):
        assert pulled[-1] == min(k + 1, len(src) - 1)
        if src[k]["images"] is None:
            assert batch["images"] is None and batch["bad"] == src[k]["bad"]
        else:
            assert torch.equal(batch["images"], src[k]["images"]) and torch.equal(batch["noise"], src[k]["noise"])


def test_feed_moves_the_batch_tensors_to_its_device():
    """Off CUDA the tensors go with ``.to(device)``: both the images and the noise reach the device (the
    meta device here stands in for one that is not the CPU); the file list and an empty batch pass as given."""
    src = _batches(2)
    got = list(DeviceFeed(src, torch.device("meta")))
    assert [b["images"] is None for b in got] == [b["images"] is None for b in src]
    for b, want in zip(got, src):
        assert b["bad"] == want["bad"]
        if want["images"] is not None:
            assert (b["images"].device.type, b["noise"].device.type) == ("meta", "meta")
            assert (b["images"].dtype, b["images"].shape) == (torch.uint8, want["images"].shape)


def test_feed_decodes_a_deferred_batch_with_the_noise_of_the_samples_that_made_it():
    """A ``deferred`` batch (--decode gpu): the decoder's images, the noise rows of the files it kept (in
    order), the workers' unreadable files then the decoder's; a batch whose every file fails has no noise."""
    noise = torch.rand(3, 4)
    calls = []

    def decode(deferred, device):
        calls.append((deferred, device))
        keep = torch.tensor(deferred["keep"])
        images = torch.full((int(keep.sum()), 3, 8, 8), 7, dtype=torch.uint8) if keep.any() else None
        return images, keep, [f"{n}: nvjpeg" for n, k in zip("abc", deferred["keep"]) if not k]

    batches = [{"images": None, "noise": noise, "bad": ["w.jpg: OSError"], "deferred": {"keep": keep}}
               for keep in ([True, False, True], [True] * 3, [False] * 3)]
    out = list(DeviceFeed(batches, "cpu", decode=decode))
    assert [d["keep"] for d, _ in calls] == [b["deferred"]["keep"] for b in batches]
    assert all(dev == torch.device("cpu") for _, dev in calls) and all("deferred" not in b for b in out)
    assert torch.equal(out[0]["noise"], noise[[0, 2]]) and out[0]["images"].shape[0] == 2
    assert out[0]["bad"] == ["w.jpg: OSError", "b: nvjpeg"]
    assert torch.equal(out[1]["noise"], noise) and out[1]["bad"] == ["w.jpg: OSError"]
    assert out[2]["images"] is None and out[2]["noise"] is None
    assert out[2]["bad"] == ["w.jpg: OSError", "a: nvjpeg", "b: nvjpeg", "c: nvjpeg"]
    assert batches[0]["bad"] == ["w.jpg: OSError"]  # the loader's batch is not modified


def test_stop_workers_shuts_a_persistent_iterator_down_now():
    """The workers stop at the call (not whenever the iterator is collected) and the loader forgets the
    iterator (its next epoch starts new workers); a loader without one, or a single-process iterator, is left."""
    from maefast.train.feed import stop_workers

    class Workers:
        shut = 0

        def _shutdown_workers(self):
            Workers.shut += 1

    loader = type("Loader", (), {})()
    loader._iterator = Workers()
    stop_workers(loader)
    assert Workers.shut == 1 and loader._iterator is None
    stop_workers(loader)  # again: nothing left to stop
    stop_workers(object())
    single = type("Loader", (), {})()
    single._iterator = it = object()  # no workers to stop
    stop_workers(single)
    assert Workers.shut == 1 and single._iterator is it


@pytest.mark.cuda
def test_feed_copies_on_a_side_stream_and_the_step_reads_them_complete():
    """On CUDA: pinned uint8 batches arrive on the device intact although a long kernel occupies the
    consumer's stream while the next copy is issued (wait_stream), and a freed batch's memory is not
    handed to the next copy while a step still reads it (record_stream)."""
    src = _batches(6, device_pin=True)
    feed = DeviceFeed(src, "cuda")
    big = torch.randn(4096, 4096, device="cuda")
    sums = []
    for batch in feed:
        if batch["images"] is None:
            continue
        assert batch["images"].device.type == "cuda" and batch["images"].dtype == torch.uint8
        for _ in range(3):
            big = big @ big / 4096  # keeps the consumer's stream busy
        sums.append(batch["images"].double().sum() + batch["noise"].double().sum())
        del batch
    want = [b["images"].double().sum() + b["noise"].double().sum() for b in src if b["images"] is not None]
    assert [float(s) for s in sums] == [float(w) for w in want]
