"""`maefast bench data`: images/s of the paper's augmentation, maefast's loader beside the official one.

    maefast bench data [--quick] [--images N] [--folder DIR] [--workers N] [--batch B] [--json out.json]

The paper's augmentation is RandomResizedCrop(224, scale 0.2-1.0, bicubic) + horizontal flip +
ImageNet normalisation. Rows:

- ``official``: the official MAE loader (torchvision's ``ImageFolder`` + ``transforms``), written out
  here because torchvision is not installed next to the CPU torch: Pillow decodes the whole image
  (``pil_loader``: open + ``convert("RGB")``), ``RandomResizedCrop.get_params`` on the torch RNG,
  crop + Pillow bicubic resize, flip, ``ToTensor`` + ``Normalize``. The baseline.
- ``exact`` / ``fast``: `maefast.train.data.ImageFolderDataset` with ``decode="exact"`` (the
  official pixels bit for bit) or ``"fast"`` (box first, DCT-scaled JPEG decode where the crop
  allows, torch's uint8 antialiased bicubic; `maefast.train.augment`), float32 out, plus the
  masking noise each sample carries. ``fast-uint8``: the fast path handing uint8 to the GPU. Both
  read JPEGs with the fastest reader the process has (`maefast.train.jpeg`: the crop's window only,
  else the whole image with simplejpeg, else Pillow; the same pixels; the record names it).
- ``gpu``: ``decode="gpu"`` (`maefast.train.gpu_decode`): the workers read the files and draw the
  boxes, flips and noise; the batches are decoded by nvJPEG, cropped and resized on the GPU
  (`maefast.train.feed.DeviceFeed`), uint8 out. Where torchvision or CUDA is missing the row is
  skipped with the reason. Its per-worker figure is the workers' share only (read + header + draws);
  its loader figure is the whole path, to uint8 batches on the GPU; ``gpu_stage`` times the GPU
  half alone on batches made beforehand (``bench_data_gpu``).

Per worker: one process, one thread (as a DataLoader worker runs), the same images for every row,
the rows taking turns every 20 images; img/s is the median of the rounds, "vs official" the median
of the per-round ratios. At N workers: a DataLoader with N worker processes over the folder, timed
after the first wave of batches (one per worker, made at start-up), each row twice. On a machine
shared with other jobs the loader rows (run one after another) move with the load; the per-worker
ratios hold better. Also the bytes each batch moves to the GPU (for ``gpu``: the JPEG files), and
the per-pixel difference of the fast path (and of ``gpu``) to the exact one (same boxes and flips).

The folder is generated here, never downloaded: photographic-like JPEGs (smooth light and colour
fields, 1/f-like luma texture, hard-edged shapes, optics blur, sensor grain) at quality 90, sizes
around 500x375 (75% long side 500 in 4:3 / 3:2 / 1:1, a quarter portrait; 17% long side 250-499;
8% long side 501-1000). Image i depends only on (seed, i); the folder is cached and grows on demand.
A benchmark reports; it does not assert timings.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

from . import bench_data_gpu, timing
from .train import augment, jpeg
from .train.augment import IMAGENET_MEAN, IMAGENET_STD, RATIO, SCALE, draft_factor, random_resized_crop_params

GENERATOR_VERSION = 1
MANIFEST = "maefast-bench-data.json"
FULL_IMAGES, QUICK_IMAGES = 3000, 256
PATHS = ("official", "exact", "fast", "fast-uint8", "gpu")


# -- the benchmark folder ------------------------------------------------------------------------

def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of a generated image: around 500x375 (see the module docstring)."""
    u = rng.random()
    if u < 0.75:
        long_side = 500
    elif u < 0.92:
        long_side = int(rng.integers(250, 500))
    else:
        long_side = int(rng.integers(501, 1001))
    short_side = round(long_side * float(rng.choice([0.75, 0.75, 0.666, 1.0])))
    return (short_side, long_side) if rng.random() < 0.25 else (long_side, short_side)


def _field(rng: np.random.Generator, w: int, h: int, cell: float, amp: float, channels: int) -> np.ndarray:
    """Gaussian noise on a grid of ``cell``-pixel cells, bicubic-upsampled: (h, w, channels) float32."""
    from PIL import Image

    gw, gh = max(2, int(w / cell)), max(2, int(h / cell))
    low = rng.normal(0.0, amp, (gh, gw, channels)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(low[..., c], "F").resize((w, h), Image.BICUBIC))
                     for c in range(channels)], -1)


def make_image(seed: int, index: int):
    """Image ``index`` of the benchmark set (a PIL RGB image), a function of (seed, index) only."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    w, h = image_size(rng)
    a = np.empty((h, w, 3), np.float32)
    a[:] = rng.uniform(40, 215, 3)
    a += _field(rng, w, h, max(w, h) / 3, 45, 3)  # light and colour over the scene
    a += _field(rng, w, h, 40, 12, 3)
    for cell, amp in ((24, 20), (8, 12), (3, 9), (1.5, 12)):  # 1/f-like detail, in luma as in photos
        a += _field(rng, w, h, cell, amp * rng.uniform(0.5, 1.5), 1)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 14))):  # objects: hard edges
        x, y, r = rng.random() * w, rng.random() * h, (0.04 + 0.25 * rng.random()) * min(w, h)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif kind == 1:
            angles = np.sort(rng.random(int(rng.integers(3, 8)))) * 2 * np.pi
            draw.polygon([(x + r * math.cos(t), y + r * math.sin(t)) for t in angles], fill=colour)
        else:
            draw.line((x, y, rng.random() * w, rng.random() * h), fill=colour, width=int(rng.integers(1, 6)))
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.2))))  # optics
    a = np.asarray(img).astype(np.float32)
    a += _field(rng, w, h, 2, 8, 1)  # texture on the objects too
    a += rng.normal(0.0, float(rng.uniform(1.5, 4.0)), (h, w, 1)).astype(np.float32)  # sensor grain
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _file_name(index: int) -> str:
    return f"img{index:05d}.jpg"


def _write_image(job: tuple[str, int, int]) -> None:
    root, seed, index = job
    path = os.path.join(root, _file_name(index))
    tmp = path + ".part"
    make_image(seed, index).save(tmp, "JPEG", quality=90)
    os.replace(tmp, path)  # a killed run leaves no half-written JPEG under the real name


def default_folder(seed: int = 0) -> str:
    base = os.environ.get("MAEFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "maefast")
    return os.path.join(base, f"bench-data-v{GENERATOR_VERSION}-seed{seed}")


def make_folder(root: str, n: int, seed: int = 0, processes: int | None = None, log=None) -> list[str]:
    """The first ``n`` images of the benchmark set in ``root`` (generated once, then reused; a
    larger ``n`` adds the missing ones). Returns their paths, in order.

    Raises:
        ValueError: ``root`` holds files but is not a benchmark folder of this generator and seed
            (nothing there is touched).
    """
    if n <= 0:
        raise ValueError(f"n (images) must be positive, got {n}")
    manifest_path = os.path.join(root, MANIFEST)
    want = {"kind": "maefast.bench_data.folder", "generator_version": GENERATOR_VERSION, "seed": seed}
    have = 0
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"--folder {root!r} is a file, not a folder")
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path) as fh:
                manifest = json.load(fh)
        except ValueError as e:
            raise ValueError(f"--folder {root!r}: its {MANIFEST} is unreadable ({e}); pass another --folder, or "
                             "delete that file to have the set written anew") from None
        if not isinstance(manifest, dict):
            raise ValueError(f"--folder {root!r}: its {MANIFEST} is unreadable (not a JSON object); pass another "
                             "--folder, or delete that file to have the set written anew")
        if {k: manifest.get(k) for k in want} != want:
            raise ValueError(f"--folder {root!r} holds a benchmark set of another generator or seed "
                             f"({ {k: manifest.get(k) for k in want} }, want {want}): pass another --folder")
        have = int(manifest.get("images", 0))
    elif os.path.isdir(root) and os.listdir(root):
        raise ValueError(f"--folder {root!r} is not empty and not a maefast benchmark folder (no {MANIFEST}); "
                         "pass an empty or new folder")
    paths = [os.path.join(root, _file_name(i)) for i in range(n)]
    missing = [i for i in range(n) if i >= have or not os.path.isfile(paths[i])]
    if missing:
        os.makedirs(root, exist_ok=True)
        if not os.path.isfile(manifest_path):  # claimed before the first image: a run killed while generating
            _write_manifest(manifest_path, {**want, "images": 0})  # left a folder the next run refused
        if log:
            log(f"generating {len(missing)} JPEGs in {root} (once; cached) ...")
        t0 = time.perf_counter()
        jobs = [(root, seed, i) for i in missing]
        processes = processes or os.cpu_count() or 1
        if processes > 1 and len(jobs) > 8:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(processes) as pool:
                pool.map(_write_image, jobs, chunksize=8)
        else:
            for job in jobs:
                _write_image(job)
        _write_manifest(manifest_path, {**want, "images": max(n, have)})
        if log:
            log(f"generated in {time.perf_counter() - t0:.0f} s")
    return paths


def _write_manifest(path: str, manifest: dict) -> None:
    with open(path + ".part", "w") as fh:
        json.dump(manifest, fh)
    os.replace(path + ".part", path)


def folder_stats(paths: list[str]) -> dict:
    from PIL import Image

    sizes = []
    for p in paths:
        with Image.open(p) as im:
            sizes.append(im.size)
    w, h = np.array(sizes).T
    return {"images": len(paths), "mean_width": float(w.mean()), "mean_height": float(h.mean()),
            "share_long_side_500": float(np.mean(np.maximum(w, h) == 500)),
            "mean_file_kb": float(np.mean([os.path.getsize(p) for p in paths]) / 1024)}


# -- the official pipeline, written out ----------------------------------------------------------

def official_crop_params(width: int, height: int, scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` as it runs: (top, left, h, w) from the torch
    global RNG (one tensor op per draw)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    return augment.central_crop_params(width, height, ratio)


class OfficialPipeline:
    """The official MAE pre-training loader for one file: ``pil_loader`` + RandomResizedCrop(size,
    (0.2, 1), bicubic) + RandomHorizontalFlip + ToTensor + Normalize, step by step as torchvision
    runs them on a PIL image. Returns float32 (3, size, size)."""

    def __init__(self, size: int = 224):
        self.size = int(size)
        self.mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, path: str) -> torch.Tensor:
        from PIL import Image

        with open(path, "rb") as f:  # torchvision.datasets.folder.pil_loader
            img = Image.open(f)
            img = img.convert("RGB")
        box = official_crop_params(img.width, img.height)
        return self.apply(img, box, bool(torch.rand(1) < 0.5))

    def apply(self, img, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        """The deterministic rest, given RandomResizedCrop's (top, left, h, w) and the flip."""
        from PIL import Image

        top, left, h, w = box
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BICUBIC)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))  # ToTensor
        x = x.view(img.size[1], img.size[0], 3).permute((2, 0, 1)).contiguous().to(torch.float32).div(255)
        return x.clone().sub_(self.mean).div_(self.std)  # Normalize(inplace=False)


class OfficialDataset(torch.utils.data.Dataset):
    """`OfficialPipeline` over a file list, items as the official loop receives them."""

    def __init__(self, paths: list[str], size: int = 224):
        self.paths, self.pipeline = list(paths), OfficialPipeline(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.pipeline(self.paths[index]), 0  # (sample, target)


# -- measurements --------------------------------------------------------------------------------

def build_dataset(path: str, root: str, size: int = 224, num_patches: int = 196, seed: int = 0):
    """The dataset of a row (``official``, ``exact``, ``fast``, ``fast-uint8``, ``gpu``: uint8)."""
    from .train.data import ImageFolderDataset

    if path == "official":
        return OfficialDataset(ImageFolderDataset(root, size, num_patches).files, size)
    decode, _, dtype = path.partition("-")
    return ImageFolderDataset(root, size, num_patches, seed=seed, decode=decode,
                              dtype=torch.uint8 if dtype == "uint8" or decode == "gpu" else torch.float32)


def item_getter(dataset, path: str):
    """index -> the row's sample: the official dataset's (image, label), maefast's dict for epoch 0."""
    return dataset.__getitem__ if path == "official" else (lambda i: dataset[(0, i)])


def per_worker(datasets: dict, n_images: int, rounds: int = 3, chunk: int = 20) -> dict:
    """images/s of each row in this process on one thread. Round r covers images [r*n, (r+1)*n)
    modulo the folder, every row on the same images, the rows taking turns every ``chunk`` images
    (a load spike on a shared machine then hits all rows alike); median of the rounds."""
    with timing.torch_threads(1):  # a DataLoader worker's setting
        size = len(next(iter(datasets.values())))
        getters = {p: item_getter(ds, p) for p, ds in datasets.items()}
        for get in getters.values():  # warm-up: imports, first calls
            get(0)
        # every timed file in the page cache first: otherwise the row that runs first in a chunk reads
        # the files from disk and the others find them cached (it overstated the ratios by ~10%)
        _read_files(next(iter(datasets.values())), {(r * n_images + i) % size for r in range(rounds)
                                                    for i in range(n_images)})
        rates = {p: [] for p in datasets}
        for r in range(rounds):
            idx = [(r * n_images + i) % size for i in range(n_images)]
            spent = dict.fromkeys(datasets, 0.0)
            for c in range(0, n_images, chunk):
                for p, get in getters.items():
                    t0 = time.perf_counter()
                    for i in idx[c:c + chunk]:
                        get(i)
                    spent[p] += time.perf_counter() - t0
            for p in datasets:
                rates[p].append(n_images / spent[p])
    return {p: {"img_per_s": statistics.median(v), "rounds": v} for p, v in rates.items()}


def _read_files(dataset, indices) -> None:
    """Reads the files of ``indices`` once (into the OS page cache): an `OfficialDataset`'s or an
    `ImageFolderDataset`'s (every row reads the same folder)."""
    for i in sorted(indices):
        path = dataset.paths[i] if isinstance(dataset, OfficialDataset) else dataset.name(i)
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def _official_collate(items):
    """The official loop's collate (default_collate, which stacks into shared memory inside a worker), the
    labels left out (the MAE loop drops them)."""
    from torch.utils.data import default_collate

    return default_collate(items)[0]


def with_workers(dataset, path: str, workers: int, batch: int, n_images: int) -> dict:
    """images/s through a DataLoader with ``workers`` processes and the bytes of one batch's tensors
    (what a training step copies to the GPU). The clock starts at the arrival of the last batch of
    the first wave (every worker makes one batch at start-up, in parallel): what comes after is the
    steady state."""
    from .train.data import collate

    n = min(n_images, len(dataset))
    if path == "official":
        sampler, fn = range(n), _official_collate
    else:
        sampler, fn = [(0, i) for i in range(n)], collate
    device = bench_data_gpu.device() if path == "gpu" else None
    # pinned on a GPU machine for every row, as the official loop (pin_mem) and `maefast train` do
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                         collate_fn=fn, drop_last=True, pin_memory=torch.cuda.is_available())
    sizes = []
    if device is not None:  # the whole GPU path: batches decoded on the device, one ahead on a side stream
        loader = bench_data_gpu.feed(loader, dataset, device, sizes)
    first_wave = max(1, workers)
    seen, t0, nbytes = 0, None, 0
    for k, b in enumerate(loader):
        tensors = [b] if isinstance(b, torch.Tensor) else [t for t in (b["images"], b["noise"]) if t is not None]
        nbytes = nbytes or (sizes[0] if sizes else sum(t.nbytes for t in tensors))
        if k + 1 == first_wave:
            bench_data_gpu.sync(device)
            t0 = time.perf_counter()
        elif t0 is not None:
            seen += tensors[0].shape[0]
    bench_data_gpu.sync(device)
    dt = time.perf_counter() - t0 if t0 is not None else float("nan")
    return {"img_per_s": seen / dt if seen else float("nan"), "images_timed": seen, "batch_bytes": nbytes,
            "bytes_per_image": nbytes / batch}


def pixel_difference(root: str, n_images: int, size: int = 224, seed: int = 0) -> dict:
    """The fast path against the exact one on the same samples (same boxes, flips): mean / max
    absolute difference in 0-255 levels (uint8 output) and in normalised units (float32 output),
    over all samples and split by the JPEG decode scale the fast path used."""
    from PIL import Image

    from .train.augment import normalize_uint8
    from .train.data import ImageFolderDataset

    exact = ImageFolderDataset(root, size, 1, seed=seed, decode="exact", dtype=torch.uint8)
    fast = ImageFolderDataset(root, size, 1, seed=seed, decode="fast", dtype=torch.uint8)
    groups: dict = {}
    for i in range(min(n_images, len(exact))):
        with Image.open(exact.name(i)) as im:
            _, _, h, w = random_resized_crop_params(im.width, im.height, np.random.default_rng([seed, 0, i]))
        k = draft_factor(w, h, size)
        a, b = exact[(0, i)]["image"], fast[(0, i)]["image"]
        d8 = (a.to(torch.int16) - b.to(torch.int16)).abs()
        dn = (normalize_uint8(a) - normalize_uint8(b)).abs()
        g = groups.setdefault(k, {"n": 0, "sum8": 0.0, "max8": 0, "sumn": 0.0, "maxn": 0.0, "same": 0})
        g["n"] += 1
        g["sum8"] += d8.double().mean().item()
        g["max8"] = max(g["max8"], int(d8.max()))
        g["sumn"] += dn.double().mean().item()
        g["maxn"] = max(g["maxn"], float(dn.max()))
        g["same"] += int(d8.max() == 0)

    def summary(gs):
        n = sum(g["n"] for g in gs)
        return {"samples": n, "mean_abs_255": sum(g["sum8"] for g in gs) / n, "max_abs_255": max(g["max8"] for g in gs),
                "mean_abs_norm": sum(g["sumn"] for g in gs) / n, "max_abs_norm": max(g["maxn"] for g in gs),
                "identical_samples": sum(g["same"] for g in gs)}

    return {"all": summary(list(groups.values())),
            "by_decode_scale": {f"1/{k}": summary([g]) for k, g in sorted(groups.items())}}


def run(root: str, n_images: int, *, workers: int, batch: int, per_worker_images: int, rounds: int,
        loader_rounds: int = 1, paths=PATHS, size: int = 224, diff_images: int | None = None, log=print,
        save=None) -> dict:
    """Everything `maefast bench data` measures, as a JSON-able dict. ``save(result)``, when given, is
    called after each section with what is measured so far (``"complete": False`` until the end), so a
    run killed at a deadline keeps its finished rows."""
    from PIL import features

    from . import timing

    gpu_why = bench_data_gpu.unavailable_reason() if "gpu" in paths else None
    if gpu_why is not None and all(p == "gpu" for p in paths):  # nothing to measure: an error, not an empty record
        raise ValueError(f"--paths gpu: the GPU decode cannot run here: {gpu_why}")
    files = make_folder(root, n_images, log=log)
    skipped = {}
    if gpu_why is not None:
        log(f"gpu row skipped: the GPU decode cannot run here: {gpu_why}")
        skipped["gpu"] = gpu_why
        paths = tuple(p for p in paths if p != "gpu")
    datasets = {p: build_dataset(p, root, size) for p in paths}
    for p, ds in datasets.items():  # only the first n_images of a larger cached folder
        if p == "official":
            ds.paths = ds.paths[:n_images]
        else:
            ds.files = ds.files[:n_images]
    env = timing.env_info("cpu")
    # "libjpeg" is Pillow's libjpeg API level (6.2), "libjpeg_turbo" the version of the libjpeg-turbo inside it
    env.update(pillow=__import__("PIL").__version__, libjpeg=features.version("jpg"),
               libjpeg_turbo=features.version("libjpeg_turbo") if features.check_feature("libjpeg_turbo") else False,
               cpus=os.cpu_count(),
               jpeg_reader=jpeg.describe())  # the CPU paths' JPEG reader
    if "gpu" in paths:
        env.update(bench_data_gpu.env_extra(bench_data_gpu.device()))
    result = {"kind": "maefast.bench_data", "env": env, "folder": {"path": root, **folder_stats(files)},
              "size": size, "batch": batch, "workers": workers, "skipped": skipped, "complete": False}
    save = save or (lambda res: None)
    torch.manual_seed(0)
    log(f"per worker: {len(paths)} rows x {rounds} rounds x {per_worker_images} images ...")
    result["per_worker"] = per_worker(datasets, min(per_worker_images, n_images), rounds) if paths else {}
    save(result)
    if workers > 0:
        runs = {p: [] for p in paths}
        for r in range(loader_rounds):  # rows in turn, the order reversed every other round
            for p in (paths if r % 2 == 0 else paths[::-1]):
                log(f"{workers} workers, round {r + 1}/{loader_rounds}: {p} ...")
                runs[p].append(with_workers(datasets[p], p, workers, batch, n_images))
                result["loader"] = {q: {**v[0], "img_per_s": statistics.median(x["img_per_s"] for x in v),
                                        "rounds": [x["img_per_s"] for x in v]} for q, v in runs.items() if v}
                save(result)
    if "gpu" in paths:
        log("the GPU half alone ...")
        result["gpu_stage"] = bench_data_gpu.stage_rate(datasets["gpu"], batch, min(n_images, 4 * batch))
        save(result)
    diff = min(diff_images or n_images, n_images)  # the benchmark's images: not more of a larger cached folder
    if diff_images != 0 and any(p in ("exact", "fast", "fast-uint8") for p in paths):
        log("pixel difference fast vs exact ...")
        result["difference"] = pixel_difference(root, diff, size)
        save(result)
    if diff_images != 0 and "gpu" in paths:
        log("pixel difference gpu vs exact ...")
        result["difference_gpu"] = bench_data_gpu.pixel_difference(root, diff, size, batch)
    for kind in ("per_worker", "loader"):  # ratio per round (same conditions), median over the rounds
        base = result.get(kind, {}).get("official")
        for r in result.get(kind, {}).values():
            r["vs_official"] = (statistics.median(a / b for a, b in zip(r["rounds"], base["rounds"]))
                                if base else None)
    if "gpu" in result["per_worker"]:  # the workers' share of the gpu path (no decode): no ratio to a whole pipeline
        result["per_worker"]["gpu"]["vs_official"] = None
    result["table"] = format_result(result).splitlines()
    result["complete"] = True
    save(result)
    return result


def _f(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _x(v) -> str:
    return f"{_f(v, '10.2f')}x" if v is not None else f"{'-':>11}"


def _pillow_jpeg(env: dict) -> str:
    """Pillow's JPEG library in words (records before 2026-12-05 hold a bool and the API level, 6.2)."""
    turbo = env.get("libjpeg_turbo")
    if isinstance(turbo, str):
        return f"libjpeg-turbo {turbo}"
    return f"libjpeg{'-turbo' if turbo else ''} (API {env['libjpeg']})"


def _reader(env: dict) -> str:
    """The record's JPEG reader in words (records before 2026-12-05 name only simplejpeg's version)."""
    if "jpeg_reader" in env:
        return env["jpeg_reader"]
    return f"simplejpeg {env['simplejpeg']}" if env.get("simplejpeg") else "Pillow"


def format_result(res: dict) -> str:
    env, fold = res["env"], res["folder"]
    lines = [f"maefast bench data on {env['card']} ({env['cpus']} CPUs, {env['date']}, torch {env['torch']}, "
             f"Pillow {env['pillow']} / {_pillow_jpeg(env)}, "
             f"JPEG reader {_reader(env)}, "
             f"commit {env['git_commit'][:12]})",
             f"folder: {fold['images']} JPEGs q90, mean {fold['mean_width']:.0f}x{fold['mean_height']:.0f}, "
             f"{fold['mean_file_kb']:.0f} KB/file, {100 * fold['share_long_side_500']:.0f}% long side 500 ({fold['path']})",
             f"output {res['size']}x{res['size']}; per worker = 1 process, 1 thread; "
             f"loader = DataLoader, {res['workers']} workers, batch {res['batch']}"]
    head = f"{'row':<12} {'img/s/worker':>12} {'vs official':>11} {'img/s loader':>12} {'vs official':>11} {'bytes/img':>10}"
    lines += ["", head, "-" * len(head)]
    for p, r in res["per_worker"].items():
        ld = res.get("loader", {}).get(p, {})
        lines.append(f"{p:<12} {_f(r['img_per_s'], '12.1f')} {_x(r.get('vs_official'))} "
                     f"{_f(ld.get('img_per_s'), '12.1f'):>12} {_x(ld.get('vs_official'))} "
                     f"{_f(ld.get('bytes_per_image'), '10.0f'):>10}")
    if "loader" in res:
        lines.append("bytes/img: one batch's images + masking noise (what a step copies to the GPU) / batch")
    lines += bench_data_gpu.table_lines(res)
    diff = res.get("difference")
    if diff:
        lines += ["", "fast vs exact (same boxes and flips):",
                  f"{'decode scale':<12} {'samples':>8} {'identical':>9} {'mean |d| 0-255':>14} {'max':>5} "
                  f"{'mean |d| norm':>13} {'max':>7}"]
        for name, d in [("all", diff["all"]), *diff["by_decode_scale"].items()]:
            lines.append(f"{name:<12} {d['samples']:>8} {d['identical_samples']:>9} {d['mean_abs_255']:>14.4f} "
                         f"{d['max_abs_255']:>5} {d['mean_abs_norm']:>13.5f} {d['max_abs_norm']:>7.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .cli import HelpFormatter, OneLineParser, check_json_name, check_out_file, positive

    p = OneLineParser(prog="maefast bench data", description=__doc__.split("\n\n")[0],
                      formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images, 1 round, fewer loader images")
    p.add_argument("--images", type=int, default=None, help=f"images in the folder (default {FULL_IMAGES})")
    p.add_argument("--folder", default=None, help="where the generated JPEGs live (default: a cache folder)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the CPUs, at most as many "
                   "as leave a batch to time after the first wave; 0: skip)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--per-worker-images", type=int, default=1000, help="images per row and round, per worker")
    p.add_argument("--rounds", type=int, default=None, help="per-worker rounds (default 3; --quick 1)")
    p.add_argument("--loader-rounds", type=int, default=None, help="DataLoader runs per row (default 2; --quick 1)")
    p.add_argument("--paths", default=",".join(PATHS), help="rows, comma-separated: " + ", ".join(PATHS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--diff-images", type=int, default=None, help="images for the fast-vs-exact difference "
                   "(default: all; 0: skip)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    a = p.parse_args(argv)
    n = a.images if a.images is not None else (QUICK_IMAGES if a.quick else FULL_IMAGES)
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    loader_rounds = a.loader_rounds if a.loader_rounds is not None else (1 if a.quick else 2)
    paths = [s.strip() for s in a.paths.split(",") if s.strip()]
    bad = [s for s in paths if s not in PATHS]
    errors = [msg for cond, msg in (
        (bool(bad), f"--paths: unknown row(s) {bad}; known {list(PATHS)}"),
        (not paths, f"--paths names no row; known {list(PATHS)}"),
        (len(set(paths)) < len(paths), f"--paths names a row twice ({paths}): give each once")) if cond]
    for flag, v, zero in (("--images", n, False), ("--workers", a.workers, True), ("--batch", a.batch, False),
                          ("--rounds", rounds, False), ("--loader-rounds", loader_rounds, False),
                          ("--size", a.size, False), ("--per-worker-images", a.per_worker_images, False),
                          ("--diff-images", a.diff_images, True)):
        try:
            positive(flag, v, allow_zero=zero)
        except ValueError as e:
            errors.append(str(e))
    if errors:
        print(f"maefast bench data: error: {errors[0]}", file=sys.stderr)
        return 2
    workers = a.workers
    if workers is None:  # the CPUs, at most as many as leave a batch to time (--quick, batch 64: 3 workers)
        workers = max(1, min(os.cpu_count() or 1, n // a.batch - 1))
    if workers > 0 and n < (workers + 1) * a.batch:
        print(f"maefast bench data: error: --images {n} gives the loader no batch after the first wave "
              f"({workers} workers x batch {a.batch}); pass more --images or a smaller --batch", file=sys.stderr)
        return 2
    check_json_name("--json", a.json)
    check_out_file("--json", a.json, a.overwrite)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    save = None
    if a.json:  # written as each section finishes (atomically): a run killed at a deadline keeps its rows
        from .train.checkpoint import atomic_write_text
        save = lambda res: atomic_write_text(a.json, json.dumps(res, indent=2))  # noqa: E731
    # a ValueError or a folder that cannot be written is one line, exit 2 (maefast.cli.guarded)
    res = run(a.folder or default_folder(), n, workers=workers, batch=a.batch,
              per_worker_images=min(a.per_worker_images, n), rounds=rounds, loader_rounds=loader_rounds,
              paths=paths, size=a.size, diff_images=a.diff_images, log=log, save=save)
    print("\n".join(res["table"]))
    if a.json:
        print(f"json: {a.json}")
    return 0
