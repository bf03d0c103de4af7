"""The loader benchmark's rows as a user reads them (`maefast.bench_data`, beside tests/test_bench_data.py): the
official row's random draws in torchvision's order, the DataLoader each row is timed through, the record and
table of a run without the official row, with the gpu row (its stage and difference stubbed), and of older
records, the folder's manifest and size mix, the CLI's defaults. Everything runs on stubs or a few small
files: seconds on the CPU."""
import json
import os

import numpy as np
import pytest
import torch

from maefast import bench_data, bench_data_gpu
from test_bench_data import _stub_folder


# -- the official row: torchvision's draws ---------------------------------------------------------------------
def test_official_crop_may_take_the_images_whole_width():
    """torchvision's get_params accepts a crop as wide as the image (``0 < w <= width``): a 100x200 image, scale
    0.5 and aspect 1 give a 100x100 box at a random height. A strict ``<`` misses 10 times and falls back to the
    centred box (top 50) on every draw."""
    tops = set()
    for seed in range(8):
        torch.manual_seed(seed)
        top, left, h, w = bench_data.official_crop_params(100, 200, scale=(0.5, 0.5), ratio=(1.0, 1.0))
        assert (left, h, w) == (0, 100, 100)
        tops.add(top)
    assert len(tops) > 3 and tops != {50}


def test_official_pipeline_draws_box_then_flip_from_the_torch_rng(tmp_path):
    """The official row's __call__ is RandomResizedCrop then RandomHorizontalFlip(0.5) on the torch global RNG:
    the same draws replayed give the same tensor, and about half the samples are flipped (a flip never or
    always drawn timed another pipeline)."""
    from PIL import Image

    from test_data import _photo

    path = str(tmp_path / "a.jpg")
    Image.fromarray(_photo(np.random.default_rng(0), 90, 70)).save(path, quality=90)
    pipe = bench_data.OfficialPipeline(16)
    with Image.open(path) as im:
        img = im.convert("RGB")
    flips = []
    for seed in range(16):
        torch.manual_seed(seed)
        got = pipe(path)
        torch.manual_seed(seed)
        box = bench_data.official_crop_params(90, 70)
        flip = bool(torch.rand(1) < 0.5)
        flips.append(flip)
        assert torch.equal(got, pipe.apply(img, box, flip)), seed
    assert 3 <= sum(flips) <= 13


# -- the loader each row is timed through ----------------------------------------------------------------------
@pytest.mark.parametrize("cuda", [False, True])
def test_loader_rows_run_as_the_official_loop(monkeypatch, cuda):
    """A DataLoader of ``workers`` processes and whole batches only (drop_last, as the official loop), pinned
    memory where CUDA is (the official loop's pin_mem; the bytes a step copies), the official row with the
    official collate on plain indices, maefast's rows with their collate on (epoch 0, index)."""
    from maefast.train.data import collate

    seen = []

    class Loader:
        def __init__(self, dataset, **kw):
            seen.append(kw)

        def __iter__(self):
            return iter([])

    monkeypatch.setattr(torch.utils.data, "DataLoader", Loader)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    bench_data.with_workers(list(range(10)), "official", workers=3, batch=4, n_images=8)
    bench_data.with_workers(list(range(10)), "fast", workers=2, batch=4, n_images=8)
    official, fast = seen
    for kw, workers in ((official, 3), (fast, 2)):
        assert (kw["num_workers"], kw["batch_size"], kw["drop_last"], kw["pin_memory"]) == (workers, 4, True, cuda)
    assert list(official["sampler"]) == list(range(8)) and official["collate_fn"] is bench_data._official_collate
    assert list(fast["sampler"]) == [(0, i) for i in range(8)] and fast["collate_fn"] is collate


# -- run(): the record and its table ---------------------------------------------------------------------------
def test_run_without_the_official_row_has_no_ratio(monkeypatch, tmp_path):
    """--paths fast,exact: nothing to compare with; the ratios are None ('-' in the table), not a TypeError
    after the whole run was measured."""
    _stub_folder(monkeypatch, 8)
    monkeypatch.setattr(bench_data, "per_worker", lambda ds, n, rounds: {
        p: {"img_per_s": 100.0, "rounds": [100.0]} for p in ds})
    monkeypatch.setattr(bench_data, "with_workers", lambda ds, p, w, b, n: dict(
        img_per_s=50.0, images_timed=4, batch_bytes=8, bytes_per_image=2.0))
    res = bench_data.run(str(tmp_path), 8, workers=1, batch=4, per_worker_images=8, rounds=1,
                         paths=("fast", "exact"), diff_images=0, log=lambda *a: None)
    assert res["complete"] is True
    for kind in ("per_worker", "loader"):
        assert {p: r["vs_official"] for p, r in res[kind].items()} == {"fast": None, "exact": None}
    row = next(line for line in res["table"] if line.startswith("fast "))
    assert row.split() == ["fast", "100.0", "-", "50.0", "-", "2"]


def test_run_with_the_gpu_row_times_its_stage_and_difference(monkeypatch, tmp_path):
    """The gpu row (its GPU half stubbed): the stage timed on at most 4 batches, the difference on --diff-images
    images, and no per-worker ratio (the workers' share of a path is no whole pipeline); the loader's ratio is."""
    _stub_folder(monkeypatch, 40)
    got = {}
    monkeypatch.setattr(bench_data_gpu, "unavailable_reason", lambda: None)
    monkeypatch.setattr(bench_data_gpu, "device", lambda: torch.device("cpu"))
    monkeypatch.setattr(bench_data_gpu, "env_extra", lambda dev: {"gpu_decode_device": str(dev)})
    monkeypatch.setattr(bench_data_gpu, "stage_rate", lambda ds, batch, n: got.setdefault("stage", (batch, n)) and {
        "img_per_s": 7.0, "device": "cpu", "batch": batch, "images": n})
    monkeypatch.setattr(bench_data_gpu, "pixel_difference", lambda root, n, size, batch: got.setdefault(
        "diff", (n, size, batch)) and {"device": "cpu", "samples": n, "identical_samples": 0, "mean_abs_255": 0.5,
                                       "max_abs_255": 3, "cpu_fallback_samples": 0})
    monkeypatch.setattr(bench_data, "per_worker", lambda ds, n, rounds: {
        "official": {"img_per_s": 100.0, "rounds": [100.0]}, "gpu": {"img_per_s": 400.0, "rounds": [400.0]}})
    rates = {"official": 10.0, "gpu": 30.0}
    monkeypatch.setattr(bench_data, "with_workers", lambda ds, p, w, b, n: dict(
        img_per_s=rates[p], images_timed=4, batch_bytes=8, bytes_per_image=2.0))
    res = bench_data.run(str(tmp_path), 40, workers=1, batch=4, per_worker_images=8, rounds=1,
                         paths=("official", "gpu"), size=32, diff_images=6, log=lambda *a: None)
    assert got == {"stage": (4, 16), "diff": (6, 32, 4)}
    assert res["per_worker"]["gpu"]["vs_official"] is None and res["loader"]["gpu"]["vs_official"] == 3.0
    assert res["env"]["gpu_decode_device"] == "cpu" and res["skipped"] == {}
    assert "gpu half alone (decode + crop + resize + flip on cpu, batch 4): 7.0 img/s" in res["table"]


def test_run_seeds_the_official_rows_draws(monkeypatch, tmp_path):
    """The official row draws its boxes and flips from the torch global RNG: run() seeds it (0) before the rows,
    so every run times the same crops, whatever the process drew before."""
    _stub_folder(monkeypatch, 8)
    drawn = []

    def per_worker(ds, n, rounds):
        drawn.append(torch.rand(3))
        return {"official": {"img_per_s": 1.0, "rounds": [1.0]}}

    monkeypatch.setattr(bench_data, "per_worker", per_worker)
    for seed in (1, 2):
        torch.manual_seed(seed)
        bench_data.run(str(tmp_path), 8, workers=0, batch=4, per_worker_images=8, rounds=1, paths=("official",),
                       diff_images=0, log=lambda *a: None)
    torch.manual_seed(0)
    assert torch.equal(drawn[0], torch.rand(3)) and torch.equal(drawn[1], drawn[0])


def test_pixel_difference_compares_the_same_draws(tmp_path, monkeypatch):
    """Both datasets of the fast-vs-exact difference take the seed asked for and hand out uint8: with another
    seed the fast path would crop other boxes and the difference would measure the boxes, not the decode."""
    from PIL import Image

    from maefast.train import data

    Image.new("RGB", (64, 48)).save(tmp_path / "a.jpg")
    built = []

    class Fake:
        def __init__(self, root, size, num_patches, seed=0, decode="fast", dtype=None):
            built.append((decode, seed, dtype, size))

        def __len__(self):
            return 1

        def name(self, i):
            return str(tmp_path / "a.jpg")

        def __getitem__(self, key):
            return {"image": torch.zeros(3, 16, 16, dtype=torch.uint8)}

    monkeypatch.setattr(data, "ImageFolderDataset", Fake)
    res = bench_data.pixel_difference(str(tmp_path), 1, 16, seed=3)
    assert sorted(built) == [("exact", 3, torch.uint8, 16), ("fast", 3, torch.uint8, 16)]
    assert res["all"]["samples"] == res["all"]["identical_samples"] == 1


def _record(**env):
    """A finished record as `run` writes it (no rows), with ``env`` over a recent CPU run's."""
    env = {"card": "CPU: x", "cpus": 2, "date": "2026-12-06T00:00:00Z", "torch": "2.13", "pillow": "12.0",
           "libjpeg": "6.2", "libjpeg_turbo": "3.1.0", "jpeg_reader": "window (libjpeg-turbo 3.1.0)",
           "git_commit": "0123456789abcdef", **env}
    return {"env": env, "folder": {"images": 12, "mean_width": 470.2, "mean_height": 380.6, "mean_file_kb": 61.4,
                                   "share_long_side_500": 0.75, "path": "/f"},
            "size": 224, "batch": 64, "workers": 4, "per_worker": {}, "skipped": {}}


def test_table_header_names_the_jpeg_libraries_of_new_and_old_records():
    """The header names Pillow's libjpeg-turbo and the CPU rows' JPEG reader; records before 2026-12-05 held
    a bool for libjpeg-turbo and only simplejpeg's version: they read as they did."""
    head = bench_data.format_result(_record()).splitlines()
    assert "libjpeg-turbo 3.1.0" in head[0] and "JPEG reader window (libjpeg-turbo 3.1.0)" in head[0]
    assert "commit 0123456789ab)" in head[0]
    assert head[1] == "folder: 12 JPEGs q90, mean 470x381, 61 KB/file, 75% long side 500 (/f)"
    old = _record(libjpeg_turbo=True, simplejpeg="1.8.1")
    del old["env"]["jpeg_reader"]
    assert "libjpeg-turbo (API 6.2), JPEG reader simplejpeg 1.8.1," in bench_data.format_result(old)
    older = _record(libjpeg_turbo=False)
    del older["env"]["jpeg_reader"]
    assert "libjpeg (API 6.2), JPEG reader Pillow," in bench_data.format_result(older)


def test_table_shows_a_rate_that_timed_nothing_as_a_dash():
    """A loader row that timed no image (its rate NaN: the first wave was all there was) reads '-', not 'nan';
    the bytes/img note comes with the loader columns."""
    res = _record()
    res["per_worker"] = {"official": {"img_per_s": 90.0, "vs_official": 1.0}}
    res["loader"] = {"official": {"img_per_s": float("nan"), "vs_official": None, "bytes_per_image": 602112.0}}
    lines = bench_data.format_result(res).splitlines()
    row = next(line for line in lines if line.startswith("official "))
    assert row.split() == ["official", "90.0", "1.00x", "-", "-", "602112"] and "nan" not in row
    assert any(line.startswith("bytes/img: one batch's images") for line in lines)
    res.pop("loader")
    assert not any(line.startswith("bytes/img") for line in bench_data.format_result(res).splitlines())


# -- the folder ---------------------------------------------------------------------------------------------------
def test_generated_long_sides_follow_the_documented_mix():
    """75% long side 500, 17% spread over 250-499, 8% over 501-1000 (the module docstring: the rates depend on
    the image sizes, so a narrower spread benchmarks another data set)."""
    longs = np.array([max(bench_data.image_size(np.random.default_rng([0, i]))) for i in range(2000)])
    small, large = longs[longs < 500], longs[longs > 500]
    assert 0.13 < len(small) / len(longs) < 0.21 and 0.05 < len(large) / len(longs) < 0.11
    assert small.min() >= 250 and 340 < small.mean() < 410 and small.max() > 480
    assert large.max() <= 1000 and 680 < large.mean() < 820 and large.min() < 530


def test_a_folder_of_another_generator_version_or_an_unreadable_manifest_is_refused(tmp_path):
    """The manifest pins the generator version as well as the seed (another version's images are other
    images); a manifest that is not JSON is one clear error naming the file, and nothing is written."""
    root = tmp_path / "set"
    root.mkdir()
    manifest = root / bench_data.MANIFEST
    manifest.write_text(json.dumps({"kind": "maefast.bench_data.folder", "seed": 0, "images": 4,
                                    "generator_version": bench_data.GENERATOR_VERSION + 1}))
    with pytest.raises(ValueError, match="another generator or seed"):
        bench_data.make_folder(str(root), 2, processes=1)
    manifest.write_text("{torn")
    with pytest.raises(ValueError, match=f"its {bench_data.MANIFEST} is unreadable .*delete that file"):
        bench_data.make_folder(str(root), 2, processes=1)
    assert os.listdir(root) == [bench_data.MANIFEST]


# -- the CLI ------------------------------------------------------------------------------------------------------
def test_cli_default_workers_batch_and_size(monkeypatch, tmp_path):
    """Without flags: as many workers as CPUs, batch 64, 224 px output (the paper's), a cache folder."""
    calls = []
    monkeypatch.setattr(bench_data, "run", lambda root, n, **kw: calls.append(dict(root=root, **kw)) or {"table": []})
    monkeypatch.setattr(bench_data.os, "cpu_count", lambda: 3)
    monkeypatch.setenv("MAEFAST_CACHE", str(tmp_path / "cache"))
    assert bench_data.main([]) == 0
    (kw,) = calls
    assert (kw["workers"], kw["batch"], kw["size"]) == (3, 64, 224)
    assert kw["root"] == str(tmp_path / "cache" / f"bench-data-v{bench_data.GENERATOR_VERSION}-seed0")


def test_cli_zero_skips_the_difference_and_the_loader(monkeypatch, tmp_path):
    """--diff-images 0 and --workers 0 are the documented ways to skip a section: accepted and passed on as 0
    (--workers 0 then needs no batch beyond a first wave)."""
    calls = []
    monkeypatch.setattr(bench_data, "run", lambda root, n, **kw: calls.append(dict(n=n, **kw)) or {"table": []})
    assert bench_data.main(["--folder", str(tmp_path), "--images", "4", "--workers", "0", "--diff-images", "0"]) == 0
    (kw,) = calls
    assert (kw["n"], kw["workers"], kw["diff_images"]) == (4, 0, 0)
