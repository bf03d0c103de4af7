"""The data path per worker: the paper's augmentation on generated ImageNet-like JPEGs, maefast's
loader (``exact``, ``fast``, ``fast-uint8``) beside the official pipeline (the baseline), one
thread as in a DataLoader worker. ``maefast bench data`` (`maefast.bench_data`, where the folder
generator, the written-out official pipeline and the rows live) is the full benchmark: more images,
interleaved rounds, N workers, the bytes per batch and the pixel difference fast vs exact; this
file puts the per-worker rows into the pytest suite's JSON and summary.

CPU: 64 images of the cached folder per call; GPU machines (--gpu): 256 (their CPUs feed the card).
Each row's record carries img_per_s and bytes_per_image (what one image costs the host-to-GPU copy;
for ``gpu``, whose workers only read the file and draw the crop, the JPEG's bytes).
"""
from __future__ import annotations

import pytest

from _harness import run_bench, sizes

from maefast import bench_data as bd
from maefast.timing import torch_threads

N_IMAGES = sizes(cpu=[64], gpu=[256])[0]


@pytest.fixture(scope="module")
def folder():
    root = bd.default_folder()
    bd.make_folder(root, N_IMAGES, log=print)
    return root


@pytest.fixture(scope="module")
def one_thread():
    with torch_threads(1):  # a DataLoader worker's setting
        yield


@pytest.mark.parametrize("path", bd.PATHS)
def test_augment_per_worker(benchmark, folder, one_thread, path):
    ds = bd.build_dataset(path, folder)
    if path == "official":
        ds.paths = ds.paths[:N_IMAGES]
    else:
        ds.files = ds.files[:N_IMAGES]
    get = bd.item_getter(ds, path)
    item = get(0)
    # what crosses to the GPU for one image: the pixels, or for `gpu` the JPEG file (decoded there)
    image = item[0] if path == "official" else next(item[k] for k in ("image", "jpeg", "pixels") if k in item)

    def fn():
        for i in range(N_IMAGES):
            get(i)

    info = run_bench(benchmark, fn, group="data-augment-per-worker", provider=path, baseline=path == "official",
                     shape=dict(images=N_IMAGES, size=224), dtype=image.dtype, device="cpu",
                     warmup=1, min_reps=3, max_reps=5, budget_s=2.0)
    info["img_per_s"] = N_IMAGES / (info["time_ms"] / 1e3)
    info["bytes_per_image"] = image.nbytes
