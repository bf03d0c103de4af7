"""The paper's augmentation: RandomResizedCrop(size, scale (0.2, 1.0), bicubic) + horizontal flip
+ ImageNet normalisation, with two ways to get the crop's pixels (``decode=``):

- ``"exact"``: the official pipeline's pixels, bit for bit: the whole image decoded (Pillow's
  pixels), cropped and resized with Pillow's bicubic filter (torchvision's ``RandomResizedCrop`` on a
  PIL image).
- ``"fast"``: the crop box is drawn first, from the size in the file's header (the same box the
  exact path draws for the same generator); a JPEG whose crop spans at least k x ``size`` pixels
  on both sides (k = 8, 4 or 2) is decoded at 1/k in the DCT domain (libjpeg-turbo's scaled IDCT)
  and resampled from the fractional box with Pillow's bicubic; any other crop (and a lossless JPEG's:
  `scalable`) is resampled by torch's antialiased bicubic on uint8 (Pillow's filter, a=-0.5, in AVX2,
  ~4x faster than Pillow's resize; it rounds differently by a level here and there). ``maefast bench
  data`` measures the speed and the per-pixel difference to the exact path.
- ``"gpu"``: the data-loader worker reads the file and draws the box, flip and noise as ``"fast"``
  does; the JPEG is decoded on the GPU with nvJPEG, then cropped, resized (the same antialiased
  bicubic, in float32) and flipped there (`maefast.train.gpu_decode`). Anything nvJPEG cannot take
  gets the fast path's pixels on the CPU.

Decoding, on both CPU paths: Pillow opens a file's bytes (`PretrainTransform.crop_encoded`: its
verdict on the header and its size); a YCbCr or grey JPEG's pixels then come from the fastest reader
this process has (`maefast.train.jpeg`: libjpeg-turbo decoding only the crop's window, else the
whole image through ``simplejpeg``, else Pillow), each giving Pillow's pixels bit for bit at every
scale. The exact path reads the box, the fast path the pixels its resampling reads (`window`).

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

from .._validate import check_int
from ..reference.normalize import IMAGENET_MEAN, IMAGENET_STD
from . import jpeg

SCALE = (0.2, 1.0)
# seeds of the per-sample draws, default_rng([seed, epoch, index]): numpy takes no negative one, and from
# 2**32 on a seed is two 32-bit words, so streams alias others' ([2**32, 5, 0] = [0, 1, 5])
SEED_LIMIT = 2 ** 32
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


def crop_exact(img, box: tuple[int, int, int, int], size: int, origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The official pixels: full decode, crop, Pillow bicubic resize. ``img`` is a PIL image or decoded
    uint8 (H, W, 3) RGB pixels whose first pixel is the image's ``origin`` (row, column): a window
    holding the box. Returns uint8 (3, size, size) (a channels-last view). Mode conversion is per
    pixel, so converting the crop equals converting the image first (torchvision's ``pil_loader``)."""
    top, left, h, w = box
    if isinstance(img, np.ndarray):
        top, left = top - origin[0], left - origin[1]
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
    k = draft_factor(w, h, size) if scalable(img) else 1
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


def scalable(img) -> bool:
    """Whether ``img`` (a PIL image) is a JPEG opened and not decoded yet that libjpeg can decode at 1/k: a
    DCT-coded one (it has quantization tables). A lossless JPEG (SOF3) has none and decodes at full scale
    only: Pillow's ``draft`` accepts a scale for it, and its decode then fails ("broken data stream")."""
    undecoded = len(getattr(img, "tile", None) or ()) == 1  # opened, pixels not read yet
    return img.format in ("JPEG", "MPO") and undecoded and bool(getattr(img, "quantization", None))


def window(box: tuple[int, int, int, int], k: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1): the pixels of the ``width`` x ``height`` image decoded at 1/k that the fast
    path's resampling of ``box`` (full-scale pixels) reads: the box itself at k = 1, else its
    integer hull (a reduced pixel i covers original pixels [i*k, (i+1)*k)), inside the reduced image."""
    top, left, h, w = box
    if k == 1:
        return top, left, top + h, left + w
    return (top // k, left // k, min(-(-(top + h) // k), -(-height // k)), min(-(-(left + w) // k), -(-width // k)))


def resample_fast(pixels: np.ndarray, box: tuple[int, int, int, int], k: int, size: int,
                  origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The fast path's resampling of ``box`` (in full-scale pixels) from uint8 RGB decoded at 1/k: the
    reduced image, or a window of it holding `window`'s pixels whose first pixel is the reduced
    image's ``origin`` (row, column). Returns uint8 (3, size, size), possibly a strided view."""
    top, left, h, w = box
    oy, ox = origin
    if k == 1:
        crop = _hwc_tensor(pixels[top - oy:top - oy + h, left - ox:left - ox + w]).permute(2, 0, 1)
        return F.interpolate(crop[None], size=(size, size), mode="bicubic", antialias=True)[0]
    # the box in reduced pixels is fractional: crop its integer hull and let Pillow resample the exact
    # fractional box
    y0, x0, y1, x1 = window(box, k, (ox + pixels.shape[1]) * k, (oy + pixels.shape[0]) * k)
    img = _pil().fromarray(np.ascontiguousarray(pixels[y0 - oy:y1 - oy, x0 - ox:x1 - ox]))
    img = img.resize((size, size), _pil().BICUBIC,
                     box=(left / k - x0, top / k - y0, (left + w) / k - x0, (top + h) / k - y0))
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
    # 255 as a tensor on x's device: a Python-number divisor is a reciprocal multiply on CUDA (ATen's
    # BinaryDivTrueKernel; 126 of the 256 values 1 ulp off ToTensor's v / 255), e.g. --decode gpu's float32 images
    x = x.to(torch.float32)
    return x.div_(torch.full((), 255.0, dtype=torch.float32, device=x.device)).sub_(mean).div_(std)


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


def _check_range(name: str, v) -> tuple[float, float]:
    """(lo, hi): two finite numbers with 0 < lo <= hi (RandomResizedCrop's scale and ratio ranges)."""
    ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    if not ok or not 0 < v[0] <= v[1]:
        raise ValueError(f"{name} must be two numbers (lo, hi) with 0 < lo <= hi, got {v!r}")
    return float(v[0]), float(v[1])


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
        # checked here: inside a dataset a bad value failed every sample, counted as unreadable files
        self.size = check_int("size", size, 1)
        self.scale, self.ratio = _check_range("scale", scale), _check_range("ratio", ratio)
        if not isinstance(hflip, (int, float)) or not 0 <= hflip <= 1:  # False / True: never / always
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        self.hflip = float(hflip)
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
        verdict on the header, its size, its pixel-count limit); a JPEG `maefast.train.jpeg` `takes`
        is then decoded by its reader (at the fast path's scale, only the window the crop reads where
        the reader can), anything else, or a JPEG libjpeg reports damage in, by Pillow. A file Pillow
        cannot read raises (the datasets count it as bad)."""
        with open_bytes(data) as img:
            if not jpeg.takes(img, data):
                return self.crop(img, rng)
            box = self.draw_box(img.width, img.height, rng)
            exact = self.decode == "exact"
            k = 1 if exact else draft_factor(box[3], box[2], self.size)
            win = window(box, k, img.width, img.height)
            pixels = jpeg.decode(data, img.width, img.height, k, win)
            if pixels is None:  # damaged: Pillow's verdict and pixels, for the same box
                return (crop_exact if exact else crop_fast)(img, box, self.size)
        if exact:
            return crop_exact(pixels, box, self.size, win[:2])
        return resample_fast(pixels, box, k, self.size, win[:2])

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
    to S for a square), center crop, normalise. ``img`` is converted to RGB first, as the official loader does
    (a palette image resized as such is resampled by nearest neighbour, an RGBA one premultiplied by its alpha)."""
    Image = _pil()
    img = _rgb(img)
    sh, sw = (size, size) if isinstance(size, int) else size
    scale = max(sw / img.width, sh / img.height)
    w, h = max(sw, round(img.width * scale)), max(sh, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - sw) // 2, (h - sh) // 2
    return to_normalized_tensor(img.crop((left, top, left + sw, top + sh)))
