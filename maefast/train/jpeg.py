"""The CPU data paths' JPEG readers: which one decodes a file, and how little of it.

Pillow opens every file (`maefast.train.augment.PretrainTransform.crop_encoded`: its verdict on the
header, its size, its pixel-count limit). A YCbCr or grey JPEG's pixels then come from the first of
these readers that this process has, and that decodes as this Pillow does (`reader`):

- ``"window"``: ``maefast._jpeg`` (csrc/jpeg_region.c), libjpeg-turbo through the libjpeg API,
  decoding only the window the crop reads: the rows above it are entropy-decoded only (no IDCT,
  upsampling or colour conversion), the rows below it not at all, and only the iMCU columns it
  touches are converted. The window's pixels are those of a full decode, bit for bit (the decoder
  widens the window by an iMCU each side so that the smooth chroma upsampling sees the same
  neighbours). It links the system's libjpeg-turbo, not the copy inside Pillow's wheel: a file
  whose decode could depend on the version (a progressive file with incomplete coefficients, which
  libjpeg-turbo smooths differently across versions) it leaves to Pillow, as it does a file it
  cannot vouch for whole (no end-of-image marker after the scan). Built where libjpeg-turbo's
  headers are (setup.py; csrc/build.py ``--jpeg``).
  Measured on the benchmark folder (2-core CPU, 2026-12-05): 15-20% less time per decode than the
  whole image, the rows above the crop being most of what is left.
- ``"simplejpeg"``: the whole image decoded by libjpeg-turbo into numpy (a dependency; ~30% faster
  than Pillow's reader, which hands out pixels through chunked reads and image copies).
- ``"pillow"``: Pillow's own reader (``Image.draft`` for the scaled decodes), used for every other
  file too: CMYK, arithmetic-coded or lossless (`HUFFMAN_DCT_FRAMES`), a JPEG libjpeg reports damage in,
  a machine with neither reader above, or a Pillow not built on libjpeg-turbo.

Every reader decodes with Pillow's settings (accurate integer IDCT, smooth chroma upsampling, scaled
IDCT at 1/k), so the pixels are Pillow's at every scale; each process checks that once on a small
JPEG before trusting a reader (`_agrees`), and the tests check it on every subsampling and scale.
"""
from __future__ import annotations

import importlib
import io

import numpy as np

try:  # the whole-image reader; Pillow gives the same pixels without it
    import simplejpeg
except ImportError:  # pragma: no cover - installed with maefast; absent on some GPU machines
    simplejpeg = None

READERS = ("window", "simplejpeg", "pillow")
Window = tuple  # (y0, x0, y1, x1): rows [y0, y1) and columns [x0, x1) of the image decoded at 1/k

_jpeg = None
load_error: str | None = None  # why maefast._jpeg is not there (None: it loaded, or was not tried yet)
_READER: str | None = None


MIN_LIBJPEG_TURBO = 2001000  # 2.1: what the windows are tested on (older ones fixed skip/crop bugs since)


def _load_window_reader():
    global _jpeg, load_error
    if _jpeg is None and load_error is None:
        try:
            mod = importlib.import_module("maefast._jpeg")
        except ImportError as exc:
            load_error = f"{type(exc).__name__}: {exc} (build it: python csrc/build.py --inplace --jpeg)"
            return None
        v = mod.LIBJPEG_TURBO_VERSION_NUMBER
        if v < MIN_LIBJPEG_TURBO:
            load_error = (f"maefast._jpeg is built on libjpeg-turbo {_version(v)}, older than "
                          f"{_version(MIN_LIBJPEG_TURBO)} (its scanline skipping and cropping had bugs)")
        else:
            _jpeg = mod
    return _jpeg


def _version(v: int) -> str:
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


def _decode(name: str, data: bytes, width: int, height: int, k: int, window: Window) -> np.ndarray | None:
    y0, x0, y1, x1 = window
    try:
        if name == "window":
            out = _jpeg.decode_region(data, k, y0, x0, y1 - y0, x1 - x0)
            return np.frombuffer(out, dtype=np.uint8).reshape(y1 - y0, x1 - x0, 3)
        full = simplejpeg.decode_jpeg(data, "RGB", min_factor=k, min_height=-(-height // k),
                                      min_width=-(-width // k), strict=True)
        return full[y0:y1, x0:x1]
    except ValueError:  # libjpeg reported damage (or, for "window", a colour space it does not take)
        return None
    except IndexError:  # "window": libjpeg's size is not the one Pillow read from the header (a file that
        return None     # odd is Pillow's to judge)


def _agrees(name: str) -> bool:
    """Whether reader ``name`` decodes as this Pillow does: small JPEGs with a hard chroma edge (4:2:0,
    4:2:2, 4:4:4, grey, progressive) at 1/1, 1/2, 1/4 and 1/8, whole and in a window off the iMCU grid."""
    from PIL import Image

    yy, xx = np.mgrid[0:67, 0:93]
    a = np.stack([xx * 2, yy * 3, (xx * yy) % 256], -1).astype(np.uint8)
    a[20:40, 30:60] = (250, 10, 120)
    for image, save in ((a, {"subsampling": 2}), (a, {"subsampling": 1}), (a, {"subsampling": 0}), (a[..., 1], {}),
                        (a, {"progressive": True})):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=90, **save)
        data = buf.getvalue()
        for k in (1, 2, 4, 8):
            with Image.open(io.BytesIO(data)) as img:
                if k > 1:
                    img.draft(img.mode, (img.width // k, img.height // k))
                want = np.asarray(img.convert("RGB"))
            h, w = want.shape[:2]
            for y0, x0, y1, x1 in ((0, 0, h, w), (h // 3, w // 3 + 1, h - h // 4, w - 1)):
                got = _decode(name, data, 93, 67, k, (y0, x0, y1, x1))
                if got is None or not np.array_equal(got, want[y0:y1, x0:x1]):
                    return False
    return True


def reader() -> str:
    """The reader of this process's YCbCr and grey JPEGs: "window", "simplejpeg" or "pillow" (module
    docstring), decided once: the first that is installed and decodes as Pillow does."""
    global _READER
    if _READER is None:
        from PIL import features

        _READER = "pillow"
        if features.check_feature("libjpeg_turbo"):  # another libjpeg under Pillow (IJG's) rounds otherwise
            if _load_window_reader() is not None and _agrees("window"):
                _READER = "window"
            elif simplejpeg is not None and _agrees("simplejpeg"):
                _READER = "simplejpeg"
    return _READER


def describe() -> str:
    """The reader in words, for records: its name and version."""
    name = reader()
    if name == "window":
        return f"maefast._jpeg (windowed, libjpeg-turbo {_version(_jpeg.LIBJPEG_TURBO_VERSION_NUMBER)})"
    if name == "simplejpeg":
        return f"simplejpeg {simplejpeg.__version__}"
    return "Pillow"


# the frame markers of the Huffman-coded DCT processes (baseline, extended, progressive): the files the readers
# are checked on. Arithmetic coding (SOF9-15) is left to Pillow, whose chunked reads libjpeg's arithmetic decoder
# cannot resume from ("broken data stream" on any such file over Pillow's 64 KiB read: Pillow refuses what a
# reader decoding from memory accepts), and so is a lossless JPEG (SOF3: no DCT, no scaled decode).
HUFFMAN_DCT_FRAMES = (0xC0, 0xC1, 0xC2)


def frame_marker(data: bytes) -> int | None:
    """The JPEG's first start-of-frame marker (its second byte, 0xC0-0xCF but DHT, JPG and DAC), walking the
    segments from the start; None if there is none to find."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
        elif 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            return m
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def takes(img, data: bytes) -> bool:
    """Whether `decode` reads this file (Pillow opened ``img`` from ``data``, not decoded yet): a Huffman-coded
    DCT JPEG (`HUFFMAN_DCT_FRAMES`) Pillow sees as RGB or grey, and a reader other than Pillow's; simplejpeg
    also wants the header's colour space to be YCbCr or grey ("window" checks it itself, `decode` then
    answering None)."""
    if img.format not in ("JPEG", "MPO") or img.mode not in ("RGB", "L"):
        return False
    if frame_marker(data) not in HUFFMAN_DCT_FRAMES:
        return False
    name = reader()
    if name == "simplejpeg":
        try:
            return simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray")
        except ValueError:
            return False
    return name == "window"


def decode(data: bytes, width: int, height: int, k: int, window: Window) -> np.ndarray | None:
    """uint8 (y1 - y0, x1 - x0, 3) RGB: ``window`` of the ``width`` x ``height`` JPEG decoded at 1/k
    (a ceil(height/k) x ceil(width/k) image), by the reader `takes` chose. Maybe a read-only or
    strided array. None when libjpeg reports damage (a truncated file, stray bytes) or a colour space
    it does not convert: Pillow then decides, refusing or accepting the file as it always did."""
    return _decode(reader(), data, width, height, k, window)
