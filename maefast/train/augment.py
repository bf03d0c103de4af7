"""The paper's augmentation: RandomResizedCrop(size, scale (0.2, 1.0), bicubic) + horizontal flip
+ ImageNet normalisation, with two ways to get the crop's pixels (``decode=``):

- ``"exact"``: the official pipeline's pixels, bit for bit: the whole image decoded (Pillow's
  pixels), cropped and resized with Pillow's bicubic filter (torchvision's ``RandomResizedCrop`` on a
  PIL image).
- ``"fast"``: the crop box is drawn first, from the size in the file's header (the same box the
  exact path draws for the same generator); a JPEG whose crop spans at least k x ``size`` pixels
  on both sides (k = 8, 4 or 2) is decoded at 1/k in the DCT domain (libjpeg-turbo's scaled IDCT)
  and resampled from the fractional box with Pillow's bicubic; any other crop is resampled by
  torch's antialiased bicubic on uint8 (Pillow's filter, a=-0.5, in AVX2, ~4x faster than Pillow's
  resize; it rounds differently by a level here and there). ``maefast bench data`` measures the
  speed and the per-pixel difference to the exact path.
- ``"gpu"``: the data-loader worker reads the file and draws the box, flip and noise as ``"fast"``
  does; the JPEG is decoded on the GPU with nvJPEG, then cropped, resized (the same antialiased
  bicubic, in float32) and flipped there (`maefast.train.gpu_decode`). Anything nvJPEG cannot take
  gets the fast path's pixels on the CPU.

Decoding, on both CPU paths: Pillow opens a file's bytes (`PretrainTransform.crop_encoded`: its
verdict on the header and its size, as before); a YCbCr or grey JPEG is then decoded by
libjpeg-turbo through ``simplejpeg`` (a dependency; ~30% faster than Pillow's reader, as it hands
numpy the pixels without Pillow's chunked reads and image copies), with the decoder settings Pillow
uses, so the pixels are Pillow's bit for bit at every scale (the tests check it, and each process
checks it once on a small JPEG before trusting it: `_readers_agree`). Any other file, a JPEG
libjpeg reports damage in, or a machine without ``simplejpeg`` (or with a Pillow not built on
libjpeg-turbo) goes through Pillow (``Image.draft`` for the scaled decode): the same box and pixels.

The CPU paths yield a uint8 (3, S, S) crop; ``dtype=torch.uint8`` stops there (4x fewer bytes to the
GPU: the model normalises), ``torch.float32`` normalises it on the CPU with torchvision's
``ToTensor`` + ``Normalize`` arithmetic (``normalize_uint8``), so the two outputs agree exactly.
Every random draw comes from the caller's generator, in a fixed order (box, then flip), on every path.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..reference.normalize import IMAGENET_MEAN, IMAGENET_STD

try:  # the faster JPEG reader (module docstring); Pillow gives the same pixels without it
    import simplejpeg
except ImportError:  # pragma: no cover - installed with maefast; absent on some GPU machines
    simplejpeg = None

SCALE = (0.2, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
DECODES = ("exact", "fast", "gpu")
# --decode auto: resolved by `maefast.train.gpu_decode.resolve_decode` (the path fastest on the record)
DECODE_CHOICES = (*DECODES, "auto")
DEFAULT_DECODE = "fast"  # the README's "Data loading" section gives the measured reason
DTYPES = (torch.float32, torch.uint8)
DRAFT_FACTORS = (8, 4, 2)  # the scales libjpeg's DCT decode offers through Pillow (1/8, 1/4, 1/2)


def _pil():
    from PIL import Image

    return Image


def random_resized_crop_params(width: int, height: int, rng: np.random.Generator, scale=SCALE,
                               ratio=RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop: torchvision's RandomResizedCrop.get_params algorithm.

    10 tries of an area fraction ~ U(scale) and a log-uniform aspect ratio; else a central crop
    clamped to the ratio range. Only the image size is needed, so the box can be drawn before the
    pixels are decoded.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return central_crop_params(width, height, ratio)


def central_crop_params(width: int, height: int, ratio=RATIO) -> tuple[int, int, int, int]:
    """RandomResizedCrop's fallback after 10 misses: the central crop clamped to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_factor(crop_w: int, crop_h: int, size: int) -> int:
    """The JPEG decode scale 1/k of the fast path: the largest k in (8, 4, 2) with both crop sides
    >= k x ``size`` (the reduced crop still has at least ``size`` pixels a side), else 1."""
    for k in DRAFT_FACTORS:
        if min(crop_w, crop_h) >= k * size:
            return k
    return 1


def _hwc_tensor(img) -> torch.Tensor:
    """PIL RGB image -> uint8 (H, W, 3) tensor over the array Pillow hands out (read-only: we only
    read it; the later steps copy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable NumPy array"
        return torch.from_numpy(np.asarray(img))


def _rgb(img):
    return img if img.mode == "RGB" else img.convert("RGB")


def _readers_agree() -> bool:
    """Whether simplejpeg decodes as this Pillow does: Pillow built on libjpeg-turbo, and a small
    4:2:0 JPEG with a hard chroma edge decoded alike at 1/1, 1/2, 1/4 and 1/8 (checked once per
    process; another libjpeg under Pillow, e.g. IJG's, rounds otherwise and keeps Pillow's reader)."""
    global _AGREE
    if _AGREE is None:
        from PIL import features

        _AGREE = False
        if simplejpeg is not None and features.check_feature("libjpeg_turbo"):
            Image = _pil()
            yy, xx = np.mgrid[0:67, 0:93]
            a = np.stack([xx * 2, yy * 3, (xx * yy) % 256], -1).astype(np.uint8)
            a[20:40, 30:60] = (250, 10, 120)
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, "JPEG", quality=90)
            data = buf.getvalue()
            agree = True
            for k in (1, 2, 4, 8):
                with Image.open(io.BytesIO(data)) as img:
                    if k > 1:
                        img.draft("RGB", (img.width // k, img.height // k))
                    want = np.asarray(img.convert("RGB"))
                got = decode_jpeg(data, 93, 67, k)
                agree = agree and got is not None and np.array_equal(got, want)
            _AGREE = agree
    return _AGREE


_AGREE = None


def simplejpeg_takes(img, data: bytes) -> bool:
    """Whether `decode_jpeg` decodes this file (Pillow opened ``img`` from ``data``, not decoded yet):
    a YCbCr or grey JPEG (Pillow's RGB or L), with ``simplejpeg`` installed and decoding as Pillow
    does (`_readers_agree`). Anything else is Pillow's to decode."""
    if simplejpeg is None or img.format not in ("JPEG", "MPO") or img.mode not in ("RGB", "L"):
        return False
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
    except ValueError:
        return False
    return colorspace in ("YCbCr", "Gray") and _readers_agree()


def decode_jpeg(data: bytes, width: int, height: int, k: int = 1) -> np.ndarray | None:
    """uint8 (ceil(H/k), ceil(W/k), 3) RGB of a `simplejpeg_takes` file, decoded at 1/k: libjpeg-turbo's
    accurate integer IDCT and smooth chroma upsampling, as Pillow decodes (and ``Image.draft``
    scales). None when libjpeg reports damage (a truncated file, stray bytes): Pillow then decides,
    refusing or accepting the file as it always did."""
    try:
        return simplejpeg.decode_jpeg(data, "RGB", min_factor=k, min_height=-(-height // k),
                                      min_width=-(-width // k), strict=True)
    except ValueError:
        return None


def crop_exact(img, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The official pixels: full decode, crop, Pillow bicubic resize. ``img`` is a PIL image or the
    decoded uint8 (H, W, 3) RGB pixels. Returns uint8 (3, size, size) (a channels-last view). Mode
    conversion is per pixel, so converting the crop equals converting the image first
    (torchvision's ``pil_loader``)."""
    top, left, h, w = box
    if isinstance(img, np.ndarray):
        img = _pil().fromarray(np.ascontiguousarray(img[top:top + h, left:left + w]))
    else:
        img = _rgb(img.crop((left, top, left + w, top + h)))
    return _hwc_tensor(img.resize((size, size), _pil().BICUBIC)).permute(2, 0, 1)


def crop_fast(img, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The fast path's pixels for the same box (see the module docstring) from a PIL image. ``img``
    should not be decoded yet (``Image.open``): a JPEG is then decoded at the scale the crop allows,
    in place (its ``size`` becomes the reduced one). Returns uint8 (3, size, size), possibly a
    strided view."""
    top, left, h, w = box
    undecoded = len(getattr(img, "tile", None) or ()) == 1  # opened, pixels not read yet
    k = draft_factor(w, h, size) if img.format in ("JPEG", "MPO") and undecoded else 1
    if k > 1:
        full_w = img.width
        # Pillow picks the largest of 1/8, 1/4, 1/2 keeping at least the requested size; read the
        # scale it chose back rather than assume it
        drafted = img.draft("RGB", (img.width // k, img.height // k))
        k = round(full_w / drafted[1][2]) if drafted else 1
    if k > 1:
        return resample_fast(np.asarray(_rgb(img)), box, k, size)
    crop = _hwc_tensor(_rgb(img.crop((left, top, left + w, top + h)))).permute(2, 0, 1)
    return F.interpolate(crop[None], size=(size, size), mode="bicubic", antialias=True)[0]


def resample_fast(pixels: np.ndarray, box: tuple[int, int, int, int], k: int, size: int) -> torch.Tensor:
    """The fast path's resampling of ``box`` (in full-scale pixels) from uint8 (H', W', 3) RGB
    decoded at 1/k. Returns uint8 (3, size, size), possibly a strided view."""
    top, left, h, w = box
    if k == 1:
        crop = _hwc_tensor(pixels[top:top + h, left:left + w]).permute(2, 0, 1)
        return F.interpolate(crop[None], size=(size, size), mode="bicubic", antialias=True)[0]
    # a reduced pixel i covers original pixels [i*k, (i+1)*k): the box in reduced pixels is
    # fractional; crop its integer hull and let Pillow resample the exact fractional box
    x0, y0, x1, y1 = left / k, top / k, (left + w) / k, (top + h) / k
    X0, Y0 = math.floor(x0), math.floor(y0)
    X1, Y1 = min(math.ceil(x1), pixels.shape[1]), min(math.ceil(y1), pixels.shape[0])
    img = _pil().fromarray(np.ascontiguousarray(pixels[Y0:Y1, X0:X1]))
    img = img.resize((size, size), _pil().BICUBIC, box=(x0 - X0, y0 - Y0, x1 - X0, y1 - Y0))
    return _hwc_tensor(img).permute(2, 0, 1)


def normalize_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) in 0-255 -> float32 ImageNet-normalised, as torchvision's ``ToTensor``
    (``/255``) then ``Normalize`` (``-mean``, ``/std``) compute it in float32 (bit for bit)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_uint8: x must be uint8, got {x.dtype}")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"normalize_uint8: x must be (..., 3, H, W), got shape {tuple(x.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def to_uint8_tensor(img) -> torch.Tensor:
    """PIL image -> uint8 (3, H, W), contiguous, in RGB."""
    return _hwc_tensor(_rgb(img)).permute(2, 0, 1).contiguous()


def to_normalized_tensor(img) -> torch.Tensor:
    """PIL image -> float32 (3, H, W): ToTensor (/255) then ImageNet normalisation."""
    return normalize_uint8(to_uint8_tensor(img))


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the ImageNet normalisation on (..., 3, H, W); result in [0, 1] before clamping."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * std + mean


def check_decode(decode: str) -> str:
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    return decode


class PretrainTransform:
    """RandomResizedCrop(size, scale (0.2, 1.0), bicubic) + RandomHorizontalFlip + ImageNet norm.

    ``__call__(img, rng)`` draws from ``rng`` (a numpy Generator: the box, then the flip) so the
    result is reproducible. Datasets call its two halves: ``crop`` (draws the box from the header's
    size and decodes: a bad file fails here) and ``finish`` (flip, layout, dtype); the GPU decode
    draws with ``draw_box`` and ``draw_flip`` (the same draws) and leaves the pixels to the GPU.

    Args:
        size: output side S.
        scale, ratio: RandomResizedCrop's area fraction and aspect ratio ranges.
        hflip: flip probability.
        decode: "exact", "fast" or "gpu" (module docstring; a PIL image given to a "gpu" transform
            gets the fast path's pixels).
        dtype: torch.float32 (normalised) or torch.uint8 (0-255, not normalised).
    """

    def __init__(self, size: int = 224, scale=SCALE, ratio=RATIO, hflip: float = 0.5,
                 decode: str = DEFAULT_DECODE, dtype: torch.dtype = torch.float32):
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
        self.size, self.scale, self.ratio, self.hflip = int(size), scale, ratio, hflip
        self.decode, self.dtype = check_decode(decode), dtype

    def draw_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The crop box (top, left, h, w) of an image of ``width`` x ``height`` (the first draws)."""
        return random_resized_crop_params(width, height, rng, self.scale, self.ratio)

    def draw_flip(self, rng: np.random.Generator) -> bool:
        """Whether to flip (the draw after the box)."""
        return bool(rng.random() < self.hflip)

    def crop(self, img, rng: np.random.Generator) -> torch.Tensor:
        """PIL image (decoded or only opened) -> uint8 (3, S, S) crop, maybe a strided view."""
        box = self.draw_box(img.width, img.height, rng)
        return (crop_exact if self.decode == "exact" else crop_fast)(img, box, self.size)

    def crop_encoded(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        """A file's bytes -> `crop`'s result (the same draws and pixels). Pillow opens the file (its
        verdict on the header, its size, its pixel-count limit); a JPEG `simplejpeg_takes` is then
        decoded by simplejpeg (at the fast path's scale), anything else, or a JPEG libjpeg reports
        damage in, by Pillow. A file Pillow cannot read raises (the datasets count it as bad)."""
        with open_bytes(data) as img:
            if not simplejpeg_takes(img, data):
                return self.crop(img, rng)
            box = self.draw_box(img.width, img.height, rng)
            exact = self.decode == "exact"
            k = 1 if exact else draft_factor(box[3], box[2], self.size)
            pixels = decode_jpeg(data, img.width, img.height, k)
            if pixels is None:  # damaged: Pillow's verdict and pixels, for the same box
                return (crop_exact if exact else crop_fast)(img, box, self.size)
        return crop_exact(pixels, box, self.size) if exact else resample_fast(pixels, box, k, self.size)

    def flip(self, pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """uint8 (3, S, S) crop -> uint8 (3, S, S) contiguous, flipped with probability hflip."""
        if self.draw_flip(rng):
            pixels = pixels.flip(-1)
        return pixels.contiguous()

    def finish(self, pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """uint8 (3, S, S) crop -> (3, S, S) contiguous ``dtype``, flipped with probability hflip."""
        pixels = self.flip(pixels, rng)
        return pixels if self.dtype == torch.uint8 else normalize_uint8(pixels)

    def __call__(self, img, rng: np.random.Generator) -> torch.Tensor:
        return self.finish(self.crop(img, rng), rng)


def open_bytes(data: bytes):
    """Pillow's image of a file's bytes; one it cannot read raises UnidentifiedImageError("cannot identify
    image file"), as for a path (Pillow's own message would name the BytesIO object)."""
    Image = _pil()
    try:
        return Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise Image.UnidentifiedImageError("cannot identify image file") from None


def center_transform(img, size: int | tuple[int, int]) -> torch.Tensor:
    """Deterministic eval view: resize (bicubic) to cover ``size`` = S or (height, width) (the short side
    to S for a square), center crop, normalise."""
    Image = _pil()
    sh, sw = (size, size) if isinstance(size, int) else size
    scale = max(sw / img.width, sh / img.height)
    w, h = max(sw, round(img.width * scale)), max(sh, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - sw) // 2, (h - sh) // 2
    return to_normalized_tensor(img.crop((left, top, left + sw, top + sh)))
