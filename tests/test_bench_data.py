"""The loader benchmark (`maefast.bench_data`, `maefast bench data`): the generated folder (sizes, aspects,
quality, determinism, repair, never over foreign files), its statistics, the rates' and ratios' arithmetic on
a fake clock, the fast-vs-exact summary, the CLI's rows, JSON, defaults and validation, the GPU row's
arithmetic. The pipeline it measures: tests/test_data.py."""
import io
import json
import os

import numpy as np
import pytest
import torch

from maefast import bench_data, bench_data_gpu
from maefast.train.augment import PretrainTransform, draft_factor, normalize_uint8
from maefast.train.data import collate
from test_data import S, _bogus_huffman, _jpeg_folder, _photo


def test_generated_sizes_keep_the_documented_aspects_and_portrait_share():
    sizes = [bench_data.image_size(np.random.default_rng([0, i])) for i in range(400)]
    portrait = np.mean([w < h for w, h in sizes])
    assert 0.15 < portrait < 0.35  # a quarter portrait
    for w, h in sizes:  # 4:3, 3:2 or 1:1, the short side rounded
        short, long = min(w, h), max(w, h)
        assert any(abs(short - round(long * r)) == 0 for r in (0.75, 0.666, 1.0)), (w, h)


def test_image_i_depends_on_both_seed_and_index():
    a, b, c = (np.asarray(bench_data.make_image(s, i)) for s, i in ((0, 1), (0, 2), (1, 1)))
    assert not (a.shape == b.shape and np.array_equal(a, b))
    assert not (a.shape == c.shape and np.array_equal(a, c))
    assert np.array_equal(a, np.asarray(bench_data.make_image(0, 1)))


def test_folder_is_q90_repaired_and_refused_when_not_a_folder(tmp_path):
    from PIL import Image

    with pytest.raises(ValueError, match="must be positive"):
        bench_data.make_folder(str(tmp_path / "none"), 0, processes=1)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        bench_data.make_folder(str(tmp_path / "file"), 1, processes=1)
    root = str(tmp_path / "set")
    paths = bench_data.make_folder(root, 4, processes=1)
    q90 = io.BytesIO()
    bench_data.make_image(0, 0).save(q90, "JPEG", quality=90)
    with Image.open(paths[0]) as im, Image.open(q90) as ref:  # "JPEGs at quality 90": the same tables
        assert im.quantization == ref.quantization
    inodes = [os.stat(p).st_ino for p in paths]
    os.remove(paths[1])  # a file lost from the cache is written again, the others kept
    assert bench_data.make_folder(root, 2, processes=1) == paths[:2] and os.path.isfile(paths[1])
    assert [os.stat(p).st_ino for p in paths[2:]] == inodes[2:]
    with open(os.path.join(root, bench_data.MANIFEST)) as fh:  # a smaller n never shrinks the set on record
        assert json.load(fh)["images"] == 4
    bench_data.make_folder(root, 4, processes=1)
    assert [os.stat(p).st_ino for p in paths[2:]] == inodes[2:]


def test_folder_stats(tmp_path):
    from PIL import Image

    paths = []
    for i, (w, h) in enumerate(((500, 375), (300, 500), (200, 100))):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.new("RGB", (w, h), (10 * i, 50, 90)).save(paths[-1], quality=90)
    st = bench_data.folder_stats(paths)
    assert st["images"] == 3 and st["mean_width"] == pytest.approx(1000 / 3) and st["mean_height"] == pytest.approx(325)
    assert st["share_long_side_500"] == pytest.approx(2 / 3)  # the portrait 300x500 counts too
    assert st["mean_file_kb"] == pytest.approx(np.mean([os.path.getsize(p) for p in paths]) / 1024)


def test_each_row_builds_its_decode_and_dtype(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    want = {"exact": ("exact", torch.float32), "fast": ("fast", torch.float32), "fast-uint8": ("fast", torch.uint8),
            "gpu": ("gpu", torch.uint8)}  # the gpu row hands uint8 batches to the device
    for row, (decode, dtype) in want.items():
        t = bench_data.build_dataset(row, str(tmp_path), 16, 4).transform
        assert (t.decode, t.dtype, t.size) == (decode, dtype, 16), row
    assert bench_data.build_dataset("official", str(tmp_path), 16, 4).pipeline.size == 16


# -- the arithmetic, on a fake clock -------------------------------------------------------------------
def test_per_worker_rounds_cover_their_images_and_take_the_median(monkeypatch):
    clock, calls = {"t": 0.0}, []
    per_round = [4e-3, 2e-3, 8e-3]  # seconds an image of the official row, by round (images 10r .. 10r+9)

    def getter(ds, p):
        def get(i):
            calls.append((p, i))
            clock["t"] += per_round[(i // 10) % 3] / (1 if p == "official" else 2)
        return get

    monkeypatch.setattr(bench_data.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(bench_data, "_read_files", lambda ds, idx: None)
    monkeypatch.setattr(bench_data, "item_getter", getter)
    res = bench_data.per_worker({"official": list(range(40)), "fast": list(range(40))}, 10, rounds=3, chunk=4)
    assert res["official"]["rounds"] == pytest.approx([250.0, 500.0, 125.0])  # every chunk's time summed
    assert res["official"]["img_per_s"] == pytest.approx(250.0) and res["fast"]["img_per_s"] == pytest.approx(500.0)
    timed = calls[2:]  # after the warm-up's get(0) of each row
    assert [i for p, i in timed if p == "fast"] == list(range(30))  # round r: images [10r, 10r + 10)
    assert timed[:8] == [("official", i) for i in range(4)] + [("fast", i) for i in range(4)]  # rows take turns


def test_with_workers_times_after_the_first_wave(monkeypatch):
    """6 batches of 4, one every 0.5 s, 2 workers: the clock starts at batch 2; 16 images in 2 s."""
    clock = {"t": 0.0}

    class Loader:
        def __init__(self, dataset, batch_size, sampler, **kw):
            self.n = len(sampler) // batch_size
            self.batch = batch_size

        def __iter__(self):
            for _ in range(self.n):
                clock["t"] += 0.5
                yield {"images": torch.zeros(self.batch, 3, 4, 4, dtype=torch.uint8),
                       "noise": torch.zeros(self.batch, 16)}

    monkeypatch.setattr(bench_data.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(torch.utils.data, "DataLoader", Loader)
    res = bench_data.with_workers(list(range(30)), "fast", workers=2, batch=4, n_images=24)
    assert res["images_timed"] == 16 and res["img_per_s"] == pytest.approx(8.0)
    assert res["batch_bytes"] == 4 * 48 + 4 * 16 * 4 and res["bytes_per_image"] == 48 + 16 * 4


def _stub_folder(monkeypatch, n_files=0):
    """bench_data.run's folder, its statistics and datasets replaced: datasets of n_files names."""
    monkeypatch.setattr(bench_data, "make_folder", lambda root, n, log=None: [])
    monkeypatch.setattr(bench_data, "folder_stats", lambda f: dict(images=8, mean_width=500, mean_height=375,
                                                                   mean_file_kb=1.0, share_long_side_500=0.75))
    names = list(range(n_files))
    monkeypatch.setattr(bench_data, "build_dataset",
                        lambda p, root, size: type("D", (), {"paths": names, "files": names})())


def test_vs_official_is_ours_over_the_official(monkeypatch, tmp_path):
    _stub_folder(monkeypatch)
    monkeypatch.setattr(bench_data, "per_worker", lambda ds, n, rounds: {
        "official": {"img_per_s": 100.0, "rounds": [100.0, 120.0, 80.0]},
        "fast": {"img_per_s": 300.0, "rounds": [300.0, 300.0, 320.0]}})
    res = bench_data.run(str(tmp_path), 8, workers=0, batch=4, per_worker_images=8, rounds=3,
                         paths=("official", "fast"), diff_images=0, log=lambda *a: None)
    assert res["per_worker"]["fast"]["vs_official"] == pytest.approx(3.0)


def test_run_medians_slices_and_difference_arguments(monkeypatch, tmp_path):
    seen = {}
    _stub_folder(monkeypatch, 12)

    def per_worker(ds, n, rounds):
        seen["per_worker"] = n, {p: len(d.paths if p == "official" else d.files) for p, d in ds.items()}
        return {"official": {"img_per_s": 100.0, "rounds": [100.0, 200.0, 50.0]},
                "fast": {"img_per_s": 300.0, "rounds": [300.0, 500.0, 400.0]}}

    rates, order = {"official": iter([10.0, 20.0, 30.0]), "fast": iter([50.0, 40.0, 60.0])}, []
    monkeypatch.setattr(bench_data, "per_worker", per_worker)
    monkeypatch.setattr(bench_data, "with_workers", lambda ds, p, w, b, n: order.append(p) or dict(
        img_per_s=next(rates[p]), images_timed=4, batch_bytes=8, bytes_per_image=2.0))
    monkeypatch.setattr(bench_data, "pixel_difference", lambda root, n, size: seen.setdefault("diff", n) and {
        "all": dict(samples=n, identical_samples=0, mean_abs_255=0.0, max_abs_255=0, mean_abs_norm=0.0,
                    max_abs_norm=0.0), "by_decode_scale": {}})
    res = bench_data.run(str(tmp_path), 8, workers=1, batch=4, per_worker_images=20, rounds=3, loader_rounds=3,
                         paths=("official", "fast"), diff_images=5, log=lambda *a: None)
    assert seen["per_worker"] == (8, {"official": 8, "fast": 8})  # only the first 8 of the cached 12
    assert seen["diff"] == 5
    assert order == ["official", "fast", "fast", "official", "official", "fast"]  # reversed every other round
    lo = res["loader"]
    assert lo["official"]["img_per_s"] == 20.0 and lo["fast"]["img_per_s"] == 50.0  # medians of the rounds
    # median of the per-round ratios (3, 2.5, 8 -> 3), not the ratio of the medians (400 / 100 = 4)
    assert res["per_worker"]["fast"]["vs_official"] == pytest.approx(3.0)
    assert lo["fast"]["vs_official"] == pytest.approx(2.0)  # 5, 2, 2
    assert res["complete"] is True


def test_difference_stays_within_the_benchmarks_images(tmp_path):
    """--diff-images beyond --images took the difference over further images of a larger cached folder: a
    record whose folder line says 3 JPEGs had its difference from 6."""
    root = str(tmp_path / "set")
    bench_data.make_folder(root, 6, processes=1)
    res = bench_data.run(root, 3, workers=0, batch=2, per_worker_images=3, rounds=1, paths=("fast",), size=16,
                         diff_images=6, log=lambda *a: None)
    assert res["folder"]["images"] == 3 and res["difference"]["all"]["samples"] == 3


def test_run_without_a_cpu_decode_row_has_no_difference(monkeypatch, tmp_path):
    _stub_folder(monkeypatch)
    monkeypatch.setattr(bench_data, "per_worker", lambda ds, n, rounds: {
        "official": {"img_per_s": 100.0, "rounds": [100.0]}})

    def no_difference(*a, **k):
        raise AssertionError("the official row alone has no fast-vs-exact difference to measure")

    monkeypatch.setattr(bench_data, "pixel_difference", no_difference)
    res = bench_data.run(str(tmp_path), 8, workers=0, batch=4, per_worker_images=8, rounds=1,
                         paths=("official",), log=lambda *a: None)
    assert "difference" not in res and res["complete"] is True


def test_pixel_difference_sums_by_decode_scale(tmp_path, monkeypatch):
    """Sample i differs from the exact one by 5 - i levels everywhere: each figure is known, and the group a
    sample falls in is the decode scale of the box its generator (seed, epoch 0, i) draws."""
    from PIL import Image

    from maefast.train import data

    sizes = ((640, 480), (300, 220), (90, 70), (400, 400), (160, 120), (500, 300))
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (i, 2 * i, 3 * i)).save(tmp_path / f"im{i}.jpg")
    S = 32

    class Fake:
        def __init__(self, root, size, num_patches, seed=0, decode="fast", dtype=None):
            self.files, self.decode = sorted(os.listdir(root)), decode

        def __len__(self):
            return len(self.files)

        def name(self, i):
            return str(tmp_path / self.files[i])

        def __getitem__(self, key):
            _, i = key
            return {"image": torch.full((3, S, S), 0 if self.decode == "exact" else 5 - i, dtype=torch.uint8)}

    monkeypatch.setattr(data, "ImageFolderDataset", Fake)
    res = bench_data.pixel_difference(str(tmp_path), len(sizes), S, seed=0)
    box = PretrainTransform(S).draw_box
    groups = {}
    for i, (w, h) in enumerate(sizes):
        b = box(w, h, np.random.default_rng([0, 0, i]))
        groups.setdefault(f"1/{draft_factor(b[3], b[2], S)}", []).append(i)
    assert len(groups) > 1 and sorted(res["by_decode_scale"]) == sorted(groups)

    def norm(i):  # normalised units of a difference of i levels, averaged over the channels
        return (normalize_uint8(torch.full((3, 1, 1), i, dtype=torch.uint8))
                - normalize_uint8(torch.zeros(3, 1, 1, dtype=torch.uint8))).abs()

    for name, idx in [("all", list(range(len(sizes)))), *groups.items()]:
        got = res["all"] if name == "all" else res["by_decode_scale"][name]
        d = [5 - i for i in idx]  # the largest first in each group
        assert got["samples"] == len(idx) and got["identical_samples"] == int(0 in d)
        assert got["mean_abs_255"] == pytest.approx(np.mean(d)) and got["max_abs_255"] == max(d)
        assert got["mean_abs_norm"] == pytest.approx(np.mean([norm(v).double().mean().item() for v in d]))
        assert got["max_abs_norm"] == pytest.approx(max(norm(v).max().item() for v in d))


# -- the CLI -------------------------------------------------------------------------------------------------
@pytest.fixture
def runs(monkeypatch):
    """bench_data.run replaced: the CLI's arguments to it, recorded."""
    calls = []
    monkeypatch.setattr(bench_data, "run", lambda root, n, **kw: calls.append(dict(n=n, **kw)) or {"table": []})
    return calls


def test_cli_defaults_and_quick(runs, tmp_path):
    assert bench_data.main(["--folder", str(tmp_path), "--workers", "1"]) == 0  # --workers: any machine's CPUs
    quick = ["--quick", "--workers", "1", "--folder", str(tmp_path), "--paths", " official , fast "]
    assert bench_data.main(quick) == 0
    full, quick = runs
    assert (full["n"], full["rounds"], full["loader_rounds"], full["per_worker_images"]) == (3000, 3, 2, 1000)
    assert full["paths"] == list(bench_data.PATHS) and full["size"] == 224 and full["diff_images"] is None
    assert (quick["n"], quick["rounds"], quick["loader_rounds"]) == (256, 1, 1)
    assert quick["paths"] == ["official", "fast"]


def test_cli_quick_runs_on_a_machine_of_many_cpus(runs, tmp_path, monkeypatch):
    """The default --workers (the CPUs) made --quick's 256 images refused on any machine of 4 CPUs or more (no
    batch of 64 left after the first wave): the default is now capped to what --images leaves a batch to time."""
    monkeypatch.setattr(bench_data.os, "cpu_count", lambda: 16)
    assert bench_data.main(["--quick", "--folder", str(tmp_path)]) == 0
    assert bench_data.main(["--folder", str(tmp_path)]) == 0
    assert bench_data.main(["--images", "100", "--folder", str(tmp_path)]) == 2  # 1 worker leaves no batch either
    assert [(r["n"], r["workers"]) for r in runs] == [(256, 3), (3000, 16)]


@pytest.mark.parametrize("args, flag", [
    (["--workers", "-1"], "--workers"), (["--batch", "0"], "--batch"), (["--rounds", "0"], "--rounds"),
    (["--loader-rounds", "0"], "--loader-rounds"), (["--size", "0"], "--size"), (["--images", "0"], "--images"),
    (["--per-worker-images", "0"], "--per-worker-images"), (["--diff-images", "-1"], "--diff-images"),
    (["--paths", " , "], "--paths"), (["--images", "11", "--workers", "2", "--batch", "4"], "--images 11"),
    (["--paths", "fast, exact,fast"], "--paths names a row twice"),  # it was timed twice, one row reported
])
def test_cli_refuses_bad_flags_before_any_work(runs, tmp_path, capsys, args, flag):
    assert bench_data.main(["--folder", str(tmp_path / "f"), "--workers", "1", *args]) == 2
    assert flag in capsys.readouterr().err and runs == [] and not (tmp_path / "f").exists()


def test_cli_first_wave_boundary_and_existing_json(runs, tmp_path):
    # 2 workers x batch 4 make the first wave; 12 images leave one batch to time
    assert bench_data.main(["--folder", str(tmp_path), "--images", "12", "--workers", "2", "--batch", "4"]) == 0
    out = tmp_path / "r.json"
    out.write_text("mine")
    with pytest.raises(ValueError, match="--json"):
        bench_data.main(["--folder", str(tmp_path), "--images", "12", "--workers", "1", "--batch", "4",
                        "--json", str(out)])
    assert out.read_text() == "mine" and len(runs) == 1


# -- the gpu row's arithmetic (bench_data_gpu), with Pillow in nvJPEG's place ---------------------------------
def _gpu_folder(root):
    """2 JPEGs nvJPEG is given, a JPEG that fails on the device and the CPU (a bogus Huffman table: dropped
    and counted), a PNG nvJPEG is not given (the workers' pixels), sorted in that order."""
    from PIL import Image

    _jpeg_folder(root, sizes=((120, 90), (90, 130)))
    (root / "im2.jpg").write_bytes(_bogus_huffman((root / "im0.jpg").read_bytes()))
    Image.fromarray(_photo(np.random.default_rng(4), 110, 80)).save(root / "im3.png")
    return str(root)


@pytest.fixture
def pillow_for_nvjpeg(monkeypatch):
    from maefast.train import gpu_decode
    from test_gpu_decode import pillow_decode

    monkeypatch.setattr(gpu_decode, "decode_jpegs", pillow_decode)
    return gpu_decode


def test_gpu_batch_bytes_are_the_files_the_workers_pixels_and_the_noise(tmp_path, pillow_for_nvjpeg):
    from maefast import bench_data_gpu
    from maefast.train.data import ImageFolderDataset, collate

    ds = ImageFolderDataset(_gpu_folder(tmp_path), 32, 16, decode="gpu", dtype=torch.uint8)
    batch = collate([ds[(0, i)] for i in range(4)])
    files = sum(os.path.getsize(f) for f in ds.files[:3])
    assert bench_data_gpu.batch_bytes(batch) == files + 3 * 32 * 32 + 4 * 16 * 4  # 3 files, 1 PNG's pixels
    fast = ImageFolderDataset(ds.root, 32, 16, decode="fast", dtype=torch.uint8)
    plain = collate([fast[(0, i)] for i in range(4)])  # the bogus file fails in the worker: 3 samples
    assert bench_data_gpu.batch_bytes(plain) == 3 * 3 * 32 * 32 + 3 * 16 * 4


def test_gpu_stage_rate_is_the_median_round_of_whole_batches_after_a_warm_up(tmp_path, pillow_for_nvjpeg,
                                                                             monkeypatch):
    from maefast import bench_data_gpu
    from maefast.train.data import ImageFolderDataset

    root = _gpu_folder(tmp_path)
    for i in range(4, 10):  # 10 files: 2 whole batches of 4, the last 2 files left out
        (tmp_path / f"im{i}.jpg").write_bytes((tmp_path / "im1.jpg").read_bytes())
    ds = ImageFolderDataset(root, 32, 16, decode="gpu", dtype=torch.uint8)
    clock, seconds, calls = {"t": 0.0}, iter([5.0, 1.0, 1.0, 3.0, 3.0, 2.0, 2.0]), []
    real = pillow_for_nvjpeg.decode_jpegs

    def decode(data, device):  # the batched call takes the time; the one-by-one retries after a failure none
        calls.append(len(data))
        if len(data) > 1:
            clock["t"] += next(seconds)
        return real(data, device)

    monkeypatch.setattr(pillow_for_nvjpeg, "decode_jpegs", decode)
    monkeypatch.setattr(bench_data_gpu.time, "perf_counter", lambda: clock["t"])
    res = bench_data_gpu.stage_rate(ds, 4, 10, rounds=3)
    # each round: 7 images made of 8 (the bogus file dropped) in 2, 6 and 4 s
    assert res["rounds"] == [3.5, 7 / 6, 1.75] and res["img_per_s"] == 1.75 and res["images"] == 8
    assert [c for c in calls if c > 1] == [3] + [3, 4] * 3  # a warm-up batch, then 3 rounds of both batches


def test_gpu_stage_rate_drains_before_each_decode_as_the_feed_does(tmp_path, pillow_for_nvjpeg, monkeypatch):
    """nvJPEG writes its outputs without waiting for the work queued on the stream: the blocks it is handed may be
    ones the last batch's crops still read (pytorch/vision#9606). DeviceFeed drains its stream before each call;
    the stage's own timing did not (corrupting pixels it never looks at, and timing a decode the feed never runs)."""
    from maefast import bench_data_gpu
    from maefast.train.data import ImageFolderDataset

    ds = ImageFolderDataset(_gpu_folder(tmp_path), 32, 16, decode="gpu", dtype=torch.uint8)
    log, real = [], pillow_for_nvjpeg.decode_jpegs
    monkeypatch.setattr(bench_data_gpu, "sync", lambda dev: log.append("sync"))
    monkeypatch.setattr(pillow_for_nvjpeg, "decode_jpegs", lambda data, dev: log.append(len(data)) or real(data, dev))
    bench_data_gpu.stage_rate(ds, 2, 4, rounds=2)
    # each device_decode call: one nvJPEG call for the batch (+ one a file after a failure), after a drain
    firsts = [i for i, e in enumerate(log) if e != "sync" and (i == 0 or log[i - 1] == "sync")]
    assert len(firsts) == 1 + 2 * 2 and log[0] == "sync", log  # a warm-up batch, then 2 rounds of 2 batches


def test_gpu_pixel_difference_leaves_out_samples_the_exact_path_cannot_read(tmp_path, pillow_for_nvjpeg,
                                                                           monkeypatch):
    """A file nvJPEG decodes but libjpeg-turbo refuses: not compared, counted (a KeyError traceback before)."""
    from maefast import bench_data_gpu
    from maefast.train.data import ImageFolderDataset

    real = ImageFolderDataset.__getitem__

    def getitem(self, key):
        if self.transform.decode == "exact" and key == (0, 1):
            return {"bad": "im1.jpg: OSError: broken data stream"}
        return real(self, key)

    monkeypatch.setattr(ImageFolderDataset, "__getitem__", getitem)
    res = bench_data_gpu.pixel_difference(_gpu_folder(tmp_path), 4, 32, batch=2, seed=1)
    assert res["samples"] == 2 and res["exact_unreadable_samples"] == 1  # im0, im3 compared; im2 bogus for both
    assert "1 not compared" in "".join(bench_data_gpu.table_lines({"difference_gpu": res}))


def test_gpu_pixel_difference_counts_each_sample_once(tmp_path, pillow_for_nvjpeg):
    from maefast import bench_data_gpu
    from maefast.train.data import ImageFolderDataset, collate
    from maefast.train.feed import DeviceFeed

    root = _gpu_folder(tmp_path)
    for i in (4, 5):  # the 6th beyond n_images: not compared
        (tmp_path / f"im{i}.jpg").write_bytes((tmp_path / "im0.jpg").read_bytes())
    res = bench_data_gpu.pixel_difference(root, 5, 32, batch=2, seed=1)
    gpu = ImageFolderDataset(root, 32, 1, seed=1, decode="gpu", dtype=torch.uint8)
    exact = ImageFolderDataset(root, 32, 1, seed=1, decode="exact", dtype=torch.uint8)
    diffs = []
    for i in (0, 1, 3, 4):  # the bogus file (im2) is dropped
        img = next(iter(DeviceFeed([collate([gpu[(0, i)]])], torch.device("cpu"), decode=gpu.device_decode)))
        diffs.append((img["images"][0].int() - exact[(0, i)]["image"].int()).abs())
    assert res["samples"] == 4 and res["cpu_fallback_samples"] == 1
    assert res["identical_samples"] == sum(int(d.max() == 0) for d in diffs) < 4
    assert res["max_abs_255"] == max(int(d.max()) for d in diffs) > int(diffs[-1].max())  # the worst: not the last
    assert res["mean_abs_255"] == pytest.approx(np.mean([d.double().mean().item() for d in diffs]))


# -- the benchmark folder, the CLI, the batches --------------------------------------------------------------
def test_bench_folder_is_generated_once_and_never_over_foreign_files(tmp_path):
    root = str(tmp_path / "set")
    paths = bench_data.make_folder(root, 4, processes=1)
    assert [os.path.basename(p) for p in paths] == [f"img{i:05d}.jpg" for i in range(4)]
    stamp = [os.path.getmtime(p) for p in paths]
    assert bench_data.make_folder(root, 3, processes=1) == paths[:3]  # cached
    more = bench_data.make_folder(root, 6, processes=1)  # grows
    assert more[:4] == paths and [os.path.getmtime(p) for p in paths] == stamp
    from PIL import Image

    with Image.open(more[5]) as im:  # image i depends on (seed, i) only
        assert np.array_equal(np.asarray(im), np.asarray(Image.open(bench_data.make_folder(
            str(tmp_path / "again"), 6, processes=1)[5])))
        assert im.format == "JPEG" and 250 <= max(im.size) <= 1000
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="not a maefast benchmark folder"):
        bench_data.make_folder(str(foreign), 2)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious" and os.listdir(foreign) == ["holiday.jpg"]
    with pytest.raises(ValueError, match="another generator or seed"):
        bench_data.make_folder(root, 2, seed=1)


def test_a_generation_killed_midway_is_resumed_not_refused(tmp_path, monkeypatch):
    """The manifest was written after the last image only: a first run stopped while generating (Ctrl-C, a
    deadline) left images without it, and every later run refused the (default, cached) folder as foreign."""
    root = str(tmp_path / "set")
    real, count = bench_data._write_image, []

    def stopped_at_the_third(job):
        count.append(job)
        if len(count) == 3:
            raise KeyboardInterrupt
        real(job)

    monkeypatch.setattr(bench_data, "_write_image", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        bench_data.make_folder(root, 5, processes=1)
    monkeypatch.setattr(bench_data, "_write_image", real)
    paths = bench_data.make_folder(root, 5, processes=1)
    assert all(os.path.isfile(p) for p in paths)
    with open(os.path.join(root, bench_data.MANIFEST)) as fh:
        assert json.load(fh)["images"] == 5


def test_generated_images_look_photographic():
    sizes = [bench_data.image_size(np.random.default_rng([0, i])) for i in range(400)]
    longs = np.array([max(s) for s in sizes])
    assert 0.6 < np.mean(longs == 500) < 0.9 and longs.min() >= 250 and longs.max() <= 1000
    img = np.asarray(bench_data.make_image(0, 3)).astype(np.float32)
    assert img.std() > 20  # not flat colour
    grad = np.abs(np.diff(img, axis=1)).mean()
    assert 1.5 < grad < 40  # texture and edges, not white noise


def test_bench_data_cli(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = bench_data.main(["--images", "12", "--folder", str(tmp_path / "f"), "--workers", "1", "--batch", "4",
                          "--per-worker-images", "6", "--rounds", "2", "--size", "64", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    cpu_rows = [p for p in bench_data.PATHS if p != "gpu"]
    for row in cpu_rows:
        assert row in text
    res = json.loads(out.read_text())
    # without torchvision + CUDA the gpu row is skipped with the reason (tests/test_gpu_decode.py runs it on the CPU)
    why = bench_data_gpu.unavailable_reason()
    if why is not None:
        assert f"gpu: skipped (the GPU decode cannot run here: {why})" in text
        assert res["skipped"] == {"gpu": why} and "gpu" not in res["per_worker"]
    else:
        assert res["skipped"] == {} and res["loader"]["gpu"]["img_per_s"] > 0
    assert set(res["per_worker"]) - {"gpu"} == set(cpu_rows) and res["per_worker"]["official"]["vs_official"] == 1.0
    assert all(r["img_per_s"] > 0 and len(r["rounds"]) == 2 for r in res["per_worker"].values())
    lo = res["loader"]
    assert lo["official"]["bytes_per_image"] == 3 * 64 * 64 * 4
    assert lo["fast-uint8"]["bytes_per_image"] == 3 * 64 * 64 + 196 * 4  # uint8 image + fp32 noise (L=196)
    assert res["difference"]["all"]["samples"] == 12 and res["difference"]["all"]["max_abs_255"] >= 0
    assert res["folder"]["images"] == 12 and res["env"]["pillow"] and res["complete"] is True


def test_bench_data_json_keeps_finished_rows(tmp_path, monkeypatch):
    # the GPU presets kill a step at its budget: the JSON is rewritten (atomically) as each section ends
    out = tmp_path / "r.json"

    def killed(*a, **k):
        assert json.loads(out.read_text())["loader"]["fast-uint8"]["img_per_s"] > 0  # written before the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_data, "pixel_difference", killed)
    with pytest.raises(KeyboardInterrupt):
        bench_data.main(["--images", "12", "--folder", str(tmp_path / "f"), "--workers", "1", "--batch", "4",
                         "--per-worker-images", "4", "--rounds", "1", "--size", "32", "--paths", "official,fast-uint8",
                         "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"] is False and set(res["per_worker"]) == set(res["loader"]) == {"official", "fast-uint8"}
    assert "difference" not in res and sorted(p.name for p in tmp_path.iterdir()) == ["f", "r.json"]  # no temp file left


def test_bench_data_cli_errors(tmp_path, capsys):
    assert bench_data.main(["--paths", "official,nope", "--folder", str(tmp_path)]) == 2
    assert "unknown row" in capsys.readouterr().err
    assert bench_data.main(["--images", "10", "--batch", "8", "--folder", str(tmp_path)]) == 2
    assert "no batch after the first wave" in capsys.readouterr().err
    from maefast.cli import main

    if bench_data_gpu.unavailable_reason() is not None:  # a run measuring nothing: an error, and no folder made
        assert main(["bench", "data", "--paths", "gpu", "--folder", str(tmp_path / "g")]) == 2
        assert "--paths gpu: the GPU decode cannot run here" in capsys.readouterr().err
        assert not (tmp_path / "g").exists()
    (tmp_path / "m").mkdir()  # a manifest that is JSON but no object: one line (was an AttributeError)
    (tmp_path / "m" / bench_data.MANIFEST).write_text("[1, 2]")
    assert main(["bench", "data", "--quick", "--images", "8", "--workers", "0", "--folder", str(tmp_path / "m")]) == 2
    assert "unreadable (not a JSON object)" in capsys.readouterr().err
    from maefast import bench

    assert bench.BENCHMARKS["data"][0] == "maefast.bench_data"


def test_batches_are_stacked_into_shared_memory_inside_a_worker(monkeypatch):
    """Inside a DataLoader worker the batch is stacked straight into shared memory, as torch's default_collate
    does (a batch stacked in the worker's memory was copied once more to reach the main process); the official
    row of `bench data` collates as the official loop does."""
    items = [{"image": torch.full((3, 4, 4), i, dtype=torch.uint8), "noise": torch.rand(16)} for i in range(3)]
    plain = collate(items)
    assert not plain["images"].is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    shared = collate(items)
    assert shared["images"].is_shared() and shared["noise"].is_shared()
    assert torch.equal(shared["images"], plain["images"]) and torch.equal(shared["noise"], plain["noise"])
    official = [(torch.rand(3, 4, 4), 0) for _ in range(2)]
    got = bench_data._official_collate(official)
    assert got.is_shared() and torch.equal(got, torch.stack([x for x, _ in official]))


def test_per_worker_reads_every_timed_file_before_timing(tmp_path, monkeypatch):
    """Every row times files already in the page cache (the first row of a chunk read them from disk)."""
    folder = _jpeg_folder(tmp_path)
    datasets = {p: bench_data.build_dataset(p, folder, S, 16) for p in ("official", "fast")}
    for ds in datasets.values():  # both kinds of dataset name their files
        bench_data._read_files(ds, {0, 1})
    read = []
    monkeypatch.setattr(bench_data, "_read_files", lambda ds, idx: read.append(sorted(idx)))
    bench_data.per_worker(datasets, 3, rounds=1)
    assert read == [[0, 1, 2]]
