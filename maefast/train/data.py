"""Data for MAE pre-training: an image folder or deterministic synthetic images, the paper's
augmentation (`maefast.train.augment`: RandomResizedCrop 0.2-1.0 bicubic + horizontal flip +
ImageNet normalisation; ``decode="exact" | "fast" | "gpu"``, float32 or uint8 images), and a
resumable distributed sampler.

Every random choice for a sample (crop box, flip, and the masking noise handed to the model) comes
from a generator seeded by (seed, epoch, index). A sample is therefore the same whichever rank or
data-loader worker produces it: a 2-process run sees exactly the samples and masks of a 1-process
run with the same global batch, and a resumed run replays the data exactly.
"""
from __future__ import annotations

import hashlib
import os
import stat
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .._validate import check_int

# re-exported: these lived here before augment.py
from .augment import (DEFAULT_DECODE, IMAGENET_MEAN, IMAGENET_STD, RATIO, SCALE, SEED_LIMIT,  # noqa: F401
                      PretrainTransform, _pil, center_transform, denormalize, open_bytes, random_resized_crop_params, to_normalized_tensor)
from .errors import RunError
from .gpu_decode import DeviceDecode, gpu_decodable

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# -- datasets ----------------------------------------------------------------------------------
def _split_key(key) -> tuple[int, int]:
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return 0, int(key)


class _PretrainDataset(Dataset):
    """Common part: item (epoch, index) -> {"image": (3, S, S) float32 or uint8, "noise": (L,)
    float32}, or {"bad": reason} for an unreadable file.

    ``decode`` ("exact" | "fast" | "gpu") and ``dtype`` (torch.float32: normalised; torch.uint8:
    0-255) are `PretrainTransform`'s. The generator of (seed, epoch, index) draws the crop box, the
    flip, then the masking noise, whichever decode path and dtype.

    With ``decode="gpu"`` an item leaves the pixels to the device (`maefast.train.gpu_decode`):
    {"jpeg": the file's bytes, uint8 (nbytes,), "size": (W, H) from the header, "box", "flip",
    "noise", "name"}; a file nvJPEG is not given is cropped here by the fast path: {"pixels": uint8
    (3, S, S), flipped, "noise"}. `collate` gathers them in a ``deferred`` part and
    ``device_decode`` (a `DeviceDecode`, given to `maefast.train.feed.DeviceFeed`) makes the images.
    """

    def __init__(self, input_size: int, num_patches: int, seed: int = 0, decode: str = DEFAULT_DECODE,
                 dtype: torch.dtype = torch.float32):
        self.transform = PretrainTransform(input_size, decode=decode, dtype=dtype)
        self.num_patches = check_int("num_patches", num_patches, 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        self.seed = seed
        self.device_decode = DeviceDecode(input_size, dtype) if decode == "gpu" else None

    def load(self, index: int):  # -> PIL RGB image, decoded
        raise NotImplementedError

    def encoded(self, index: int) -> bytes | None:
        """The file's bytes (decoded inside the crop, on the CPU or the GPU), or None when the images
        are not files (then `load` gives them)."""
        return None

    def name(self, index: int) -> str:
        return str(index)

    def fingerprint(self) -> str | None:
        """A digest of which files the data set is (None: not files), recorded by checkpoints."""
        return None

    def __getitem__(self, key):
        epoch, index = _split_key(key)
        # checked before the try below, which would count the error as an unreadable file (or, for the synthetic
        # images, make one past the end: `for item in dataset` never stopped)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} images")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        rng = np.random.default_rng([self.seed, epoch, index])
        try:  # the box comes from the header; the pixels are decoded inside the crop
            if self.device_decode is not None:
                return self._deferred_item(index, rng)
            data = self.encoded(index)
            if data is not None:
                pixels = self.transform.crop_encoded(data, rng)
            else:
                with self.load(index) as img:
                    pixels = self.transform.crop(img, rng)
        except Exception as exc:  # corrupt / unreadable / vanished: skipped and counted by the loop
            return {"bad": f"{self.name(index)}: {type(exc).__name__}: {exc}"}
        image = self.transform.finish(pixels, rng)
        return {"image": image, "noise": self._noise(rng)}

    def _noise(self, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(rng.random(self.num_patches, dtype=np.float32))

    def _deferred_item(self, index: int, rng: np.random.Generator) -> dict:
        """``decode="gpu"``: the file's bytes and the sample's draws (box, flip, noise: the order of
        ``__getitem__``), or the fast path's uint8 pixels for a file nvJPEG is not given."""
        data = self.encoded(index)
        with (open_bytes(data) if data is not None else self.load(index)) as img:
            if data is not None and gpu_decodable(img, data):
                box = self.transform.draw_box(img.width, img.height, rng)
                flip = self.transform.draw_flip(rng)
                return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "size": img.size, "box": box,
                        "flip": flip, "noise": self._noise(rng), "name": self.name(index)}
            pixels = self.transform.crop(img, rng)
        return {"pixels": self.transform.flip(pixels, rng), "noise": self._noise(rng)}


def _unlisted(err: OSError):
    """os.walk's error for a folder it cannot list (no permission, an I/O error): the walk skipped it in
    silence, so a whole class sub-folder (or every image: the folder itself) was left out of the data set.
    A file system's own ``lost+found`` (root's alone) holds no data set: left out, as before."""
    if os.path.basename(err.filename or "") == "lost+found":
        return
    msg = (f"--data: cannot list the folder {err.filename!r} ({err.strerror}): its images would be left out of the "
           "data set")
    raise (PermissionError if isinstance(err, PermissionError) else RunError)(msg) from err  # one line either way


class ImageFolderDataset(_PretrainDataset):
    """Every image file under ``root`` (recursively: class sub-folders or a flat folder), sorted."""

    def __init__(self, root: str, input_size: int, num_patches: int, seed: int = 0, decode: str = DEFAULT_DECODE,
                 dtype: torch.dtype = torch.float32):
        super().__init__(input_size, num_patches, seed, decode, dtype)
        if not os.path.exists(root):
            raise FileNotFoundError(f"--data folder {root!r} does not exist")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"--data {root!r} is not a folder (pass a folder of images or 'synthetic')")
        files = []
        seen = set()  # each real folder walked once: a link back up (a loop) would list it again and again
        for dirpath, dirnames, filenames in os.walk(root, onerror=_unlisted, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
        if not files:
            raise ValueError(f"--data folder {root!r} holds no image files (looked recursively for "
                             f"{', '.join(IMG_EXTENSIONS)})")
        self.root, self.files = root, files

    # The paths live in one numpy buffer: a list of str would be copied into every worker process page by
    # page as reading a path touches its reference count (~140 MiB per worker for ImageNet's 1.28 M files).
    @property
    def files(self) -> list[str]:
        """The image paths (a new list each time: index with `name(i)` in a loop)."""
        return [os.fsdecode(p) for p in self._paths]

    @files.setter
    def files(self, paths) -> None:
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self._paths)

    def name(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def fingerprint(self) -> str:
        """SHA-1 of the file names relative to ``root``, in order: a moved copy of the folder keeps it, a
        file renamed, added or removed changes it."""
        cut, h = len(os.fsencode(os.path.join(self.root, ""))), hashlib.sha1()
        for p in self._paths:
            h.update(bytes(p)[cut:] + b"\0")
        return h.hexdigest()

    def load(self, index: int):
        Image = _pil()
        with _open_regular(self.name(index)) as f:  # a str: an OSError names it so, not as np.bytes_(b'...')
            img = Image.open(f)
            img.load()  # decode now so truncated files fail here
        return img.convert("RGB")

    def encoded(self, index: int) -> bytes:
        with _open_regular(self.name(index)) as f:
            return f.read()


def _open_regular(path: str):
    """``path`` opened for reading in binary; OSError (skipped and counted) unless it is a regular file: a named
    pipe called x.jpg blocked its worker, and the run, forever (opened here without blocking), a device never
    ends. Checked on the open file, not when listing: a stat per file of a large folder costs minutes."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file (a pipe, socket or device)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class SyntheticDataset(_PretrainDataset):
    """Deterministic synthetic images (no files): smooth random colour fields with a few shapes.

    Image ``i`` depends only on (``data_seed``, i): the set is fixed across epochs like a real
    dataset, and smooth enough that the reconstruction loss falls while training.
    """

    def __init__(self, size: int, input_size: int, num_patches: int, seed: int = 0, data_seed: int = 1234,
                 decode: str = DEFAULT_DECODE, dtype: torch.dtype = torch.float32):
        super().__init__(input_size, num_patches, seed, decode, dtype)
        # checked here: numpy refuses a negative seed inside every sample, each then counted as unreadable
        self.size, self.data_seed = check_int("size", size, 1), check_int("data_seed", data_seed, 0)
        self.image_size = int(input_size)

    def __len__(self) -> int:
        return self.size

    def load(self, index: int):
        Image = _pil()
        from PIL import ImageDraw

        rng = np.random.default_rng([self.data_seed, index])
        s = self.image_size
        k = int(rng.integers(2, 7))
        low = rng.integers(0, 256, (k, k, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((s, s), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):  # a few discs of flat colour
            cy, cx, r = rng.random() * s, rng.random() * s, (0.08 + 0.2 * rng.random()) * s
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        grain = rng.integers(0, 12, (s, s, 3), dtype=np.uint8)  # a little texture
        return Image.fromarray(np.asarray(img) // 16 * 15 + grain)


DEFERRED_KEYS = ("jpeg", "pixels")  # items of ``decode="gpu"``: the images are made on the device


def _stack(tensors: list) -> torch.Tensor:
    """torch.stack, straight into shared memory inside a DataLoader worker (as torch's default_collate):
    a batch stacked in the worker's own memory is copied once more into shared memory to reach the
    main process (38 MB per batch of 64 float32 images)."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        t = tensors[0]
        storage = t.untyped_storage()._new_shared(len(tensors) * t.numel() * t.element_size(), device=t.device)
        out = t.new(storage).view(len(tensors), *t.shape)
    return torch.stack(tensors, out=out)


def collate(items: list) -> dict:
    """Stacks the good samples (float32 or uint8 images, as the dataset made them); unreadable ones
    (``{"bad": reason}``) are dropped and listed.

    Items of ``decode="gpu"`` give ``images`` None and a ``deferred`` dict for
    `maefast.train.gpu_decode.DeviceDecode`: ``data`` (every JPEG's bytes, concatenated: one uint8
    tensor, one shared-memory block and one pinned copy per batch), ``offsets`` (J+1,), ``sizes`` (J, 2)
    header (W, H), ``boxes`` (J, 4), ``flips`` (J,), ``slots`` (J,) their places in the batch, ``names``;
    ``pixels`` (P, 3, S, S) uint8 made by the workers (or None) and ``pixel_slots`` (P,); ``count``.
    ``noise`` follows the batch's order either way."""
    good = [it for it in items if "bad" not in it]
    bad = [it["bad"] for it in items if "bad" in it]
    noise = _stack([it["noise"] for it in good]) if good else None
    if not any(k in it for it in good for k in DEFERRED_KEYS):
        images = _stack([it["image"] for it in good]) if good else None
        return {"images": images, "noise": noise, "bad": bad}
    jpegs = [(slot, it) for slot, it in enumerate(good) if "jpeg" in it]
    pixels = [(slot, it["pixels"]) for slot, it in enumerate(good) if "pixels" in it]
    lengths = [it["jpeg"].numel() for _, it in jpegs]
    deferred = {
        "count": len(good),
        "data": torch.cat([it["jpeg"] for _, it in jpegs]) if jpegs else torch.empty(0, dtype=torch.uint8),
        "offsets": torch.tensor(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]), dtype=torch.long),
        "sizes": torch.tensor([list(it["size"]) for _, it in jpegs], dtype=torch.long).view(-1, 2),
        "boxes": torch.tensor([list(it["box"]) for _, it in jpegs], dtype=torch.long).view(-1, 4),
        "flips": torch.tensor([bool(it["flip"]) for _, it in jpegs], dtype=torch.bool),
        "slots": torch.tensor([s for s, _ in jpegs], dtype=torch.long),
        "names": [it["name"] for _, it in jpegs],
        "pixels": torch.stack([p for _, p in pixels]) if pixels else None,
        "pixel_slots": torch.tensor([s for s, _ in pixels], dtype=torch.long)}
    return {"images": None, "noise": noise, "bad": bad, "deferred": deferred}


# -- sampling ----------------------------------------------------------------------------------
class ResumableDistributedSampler(Sampler):
    """The epoch's samples for one rank, the same set per optimizer step at every world size.

    The epoch's order is a permutation of the dataset seeded by ``seed + epoch`` (DistributedSampler's
    shuffle), cut to whole global batches: the same tail (``len % global_batch`` samples) is dropped
    at every world size, so every world size runs the same number of steps on the same samples and
    the same lr schedule. Rank ``r`` of ``W`` takes ``order[start + r], order[start + r + W], ...``
    where ``start`` is the position (samples of the epoch already trained on, a multiple of the
    global batch): optimizer step ``s`` then trains on ``order[s*G:(s+1)*G]`` whatever the split of
    G = batch x accumulation x world, which makes a resume at another world size exact in samples.

    Yields ``(epoch, index)`` so each sample's augmentation is seeded by its epoch even inside
    persistent data-loader workers.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 global_batch: int | None = None):
        check_int("num_replicas", num_replicas, 1)
        if not 0 <= check_int("rank", rank, 0) < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if global_batch is not None:
            check_int("global_batch", global_batch, 1)
        self.size, self.num_replicas, self.rank = len(dataset), num_replicas, rank
        self.shuffle, self.seed = shuffle, int(seed)
        self.global_batch = global_batch or num_replicas
        if self.global_batch % self.num_replicas:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of num_replicas {num_replicas}")
        self.used = self.size // self.global_batch * self.global_batch  # samples per epoch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_position(self, samples: int) -> None:
        """Start this epoch after its first ``samples`` samples (a resume; a multiple of the global batch)."""
        if samples % self.global_batch or not 0 <= samples <= self.used:
            raise ValueError(f"position {samples} is not a whole number of global batches of {self.global_batch} "
                             f"within the epoch's {self.used} samples")
        self.start = int(samples)

    def order(self) -> list[int]:
        """This epoch's global order (every rank's samples, interleaved), tail dropped."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(self.size, generator=g)[: self.used].tolist()
        return list(range(self.used))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self.order()[self.start + self.rank: self.used: self.num_replicas]
        return iter([(self.epoch, i) for i in mine])

    def __len__(self) -> int:
        return (self.used - self.start) // self.num_replicas
