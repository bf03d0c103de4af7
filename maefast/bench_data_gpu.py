"""The ``gpu`` row of `maefast bench data` (``--decode gpu``, `maefast.train.gpu_decode`): the
DataLoader + GPU-decode path end to end, the GPU half alone, and its pixels against the exact path.

The device is CUDA when torch sees one; elsewhere the row is skipped with the reason (tests run it
on the CPU with a Pillow decode in place of nvJPEG).
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import torch

from .bench import default_device as device  # the benchmarks' device: cuda where present
from .timing import synchronize


def unavailable_reason() -> str | None:
    """Why the gpu row cannot run here (None: it can)."""
    from .train.gpu_decode import unavailable_reason as why

    return why(device())


def sync(dev: torch.device | None) -> None:
    """Waits for ``dev`` (nothing to wait for: None or the CPU)."""
    synchronize(dev if dev is not None else "cpu")


def env_extra(dev: torch.device) -> dict:
    """What the gpu row ran on: the card and torchvision's version."""
    out = {"gpu_decode_device": str(dev)}
    if dev.type == "cuda":
        out["gpu_card"] = torch.cuda.get_device_name(dev)
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except Exception:  # noqa: BLE001 - absent: the row ran with a substitute decode (tests)
        out["torchvision"] = None
    return out


def batch_bytes(batch: dict) -> int:
    """What one collated batch moves to the device: for ``decode="gpu"`` the JPEG files (+ the pixels
    the workers made for files nvJPEG is not given), plus the masking noise."""
    d = batch.get("deferred")
    noise = batch["noise"].nbytes if batch.get("noise") is not None else 0
    if d is None:
        return noise + (batch["images"].nbytes if batch.get("images") is not None else 0)
    return noise + d["data"].nbytes + (d["pixels"].nbytes if d["pixels"] is not None else 0)


def feed(loader: Iterable[dict], dataset, dev: torch.device, sizes: list) -> Iterator[dict]:
    """``loader``'s batches through `DeviceFeed` with the dataset's GPU decode; the first batch's
    bytes (``batch_bytes``) are appended to ``sizes``."""
    from .train.feed import DeviceFeed

    def counted():
        for b in loader:
            if not sizes:
                sizes.append(batch_bytes(b))
            yield b

    return iter(DeviceFeed(counted(), dev, decode=dataset.device_decode))


def _batches(dataset, batch: int, n: int) -> list[dict]:
    from .train.data import collate

    items = [dataset[(0, i)] for i in range(min(n, len(dataset)))]
    return [collate(items[k:k + batch]) for k in range(0, len(items) - batch + 1, batch)]


def stage_rate(dataset, batch: int, n: int, rounds: int = 3) -> dict:
    """images/s of the GPU half alone (decode + crop + resize + flip of batches the workers made
    beforehand), median of ``rounds`` passes over them after one warm-up batch."""
    dev = device()
    batches = _batches(dataset, batch, n)
    if dev.type == "cuda":
        batches = [{**b, "deferred": {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v)
                                      for k, v in b["deferred"].items()}} for b in batches]
    if not batches:
        return {"img_per_s": float("nan"), "batch": batch, "device": str(dev)}
    def decode(b) -> int:
        # drained first, as DeviceFeed drains its stream before each nvJPEG call (pytorch/vision#9606): the
        # decoder's output blocks may be ones the last batch's crops, still queued, read
        sync(dev)
        return int(dataset.device_decode(b["deferred"], dev)[1].sum())

    decode(batches[0])
    sync(dev)
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        count = sum(decode(b) for b in batches)
        sync(dev)
        rates.append(count / (time.perf_counter() - t0))
    return {"img_per_s": sorted(rates)[len(rates) // 2], "rounds": rates, "batch": batch, "device": str(dev),
            "images": sum(b["deferred"]["count"] for b in batches)}


def pixel_difference(root: str, n_images: int, size: int, batch: int, seed: int = 0) -> dict:
    """The gpu path against the exact one on the same samples (same boxes, flips): |difference| in
    0-255 levels, how many samples nvJPEG was not given (the fast path's pixels on the CPU), and how many
    it decoded where the exact path cannot (left out of the comparison)."""
    from .train.data import ImageFolderDataset, collate

    dev = device()
    exact = ImageFolderDataset(root, size, 1, seed=seed, decode="exact", dtype=torch.uint8)
    gpu = ImageFolderDataset(root, size, 1, seed=seed, decode="gpu", dtype=torch.uint8)
    exact.files, gpu.files = exact.files[:n_images], gpu.files[:n_images]
    n, same, total, worst, on_cpu, unreadable_exact = 0, 0, 0.0, 0, 0, 0
    for start in range(0, len(gpu), batch):
        items = {i: gpu[(0, i)] for i in range(start, min(start + batch, len(gpu)))}
        on_cpu += sum("pixels" in it for it in items.values())
        good = [i for i, it in items.items() if "bad" not in it]
        if not good:
            continue
        images, keep, _ = gpu.device_decode(collate(list(items.values()))["deferred"], dev)
        made = [i for i, k in zip(good, keep.tolist()) if k]
        for i, img in zip(made, images.cpu() if images is not None else []):
            ref = exact[(0, i)]
            if "bad" in ref:  # nvJPEG decoded a file libjpeg-turbo refuses: nothing to compare with
                unreadable_exact += 1
                continue
            d = (img.to(torch.int16) - ref["image"].to(torch.int16)).abs()
            n += 1
            same += int(d.max() == 0)
            total += d.double().mean().item()
            worst = max(worst, int(d.max()))
    return {"samples": n, "identical_samples": same, "mean_abs_255": total / max(n, 1), "max_abs_255": worst,
            "cpu_fallback_samples": on_cpu, "exact_unreadable_samples": unreadable_exact, "device": str(dev)}


def table_lines(res: dict) -> list[str]:
    """The gpu row's notes under `maefast bench data`'s table."""
    lines = []
    why = (res.get("skipped") or {}).get("gpu")
    if why:
        lines.append(f"gpu: skipped (the GPU decode cannot run here: {why})")
    if "gpu" in res.get("per_worker", {}):
        lines.append("gpu: img/s/worker is the workers' share (read + header + draws; nvJPEG decodes); img/s loader "
                     "is the whole path to uint8 batches on the GPU; bytes/img are the JPEG files'")
    st = res.get("gpu_stage")
    if st:
        lines.append(f"gpu half alone (decode + crop + resize + flip on {st['device']}, batch {st['batch']}): "
                     f"{st['img_per_s']:.1f} img/s")
    d = res.get("difference_gpu")
    if d:
        lines.append(f"gpu vs exact (same boxes and flips, on {d['device']}): {d['samples']} samples, "
                     f"{d['identical_samples']} identical, mean |d| {d['mean_abs_255']:.4f} of 255, max "
                     f"{d['max_abs_255']}; {d['cpu_fallback_samples']} made on the CPU (not given to nvJPEG)"
                     + (f"; {d['exact_unreadable_samples']} not compared (the exact path cannot read them)"
                        if d.get("exact_unreadable_samples") else ""))
    return lines
