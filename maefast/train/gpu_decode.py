"""``--decode gpu``: JPEG batches decoded on the GPU with nvJPEG (``torchvision.io.decode_jpeg``),
cropped, resized and flipped there (issue 15, item 4).

The work is split so that every random choice stays where the other paths make it:

- a data-loader worker (`maefast.train.data`) reads the file, reads the size from its header and
  draws the box, the flip and the masking noise from (seed, epoch, index), in the order of the CPU
  paths: the same sample on every path, rank, worker and resume. A file nvJPEG is not given (not a
  JPEG, not RGB/greyscale, no end-of-image marker: truncated) gets the fast path's pixels in the
  worker, and fails there if it is corrupt (skipped and counted as on the other paths);
- `DeviceDecode`, called by `maefast.train.feed.DeviceFeed` on its side stream, decodes the batch's
  JPEGs in one call (``decode_jpegs``, the only GPU-only call: tests put a Pillow decode in its
  place), crops each from its box, resizes it with torch's antialiased bicubic (the fast path's
  filter, in float32 as CUDA has no uint8 kernel for it, with the uint8 kernel's rounding between
  its two passes: within 2 levels of it, nearly always equal; ``resized_crop``) and flips it. A
  JPEG nvJPEG rejects is decoded by Pillow with the fast path, and if that fails too, skipped and
  counted.

nvJPEG's pixels are not libjpeg-turbo's (another IDCT and chroma upsampling): ``maefast bench
data`` reports the difference to the exact path on the GPU machine.

``--decode auto`` picks the path that is faster on the record (``resolve_decode``).
"""
from __future__ import annotations

import functools
import io

import torch
import torch.nn.functional as F

from ..graphs import first_line, message_line
from .augment import crop_fast, normalize_uint8
from .jpeg import HUFFMAN_DCT_FRAMES, frame_marker

# `--decode auto` takes gpu (where it is available) only once a record shows it ahead of fast: `maefast
# bench data`'s gpu loader row against fast-uint8 on the GPU machine (scripts/gpu_check.py's data
# preset). No record has it yet (2026-12), so auto is fast; set this to True with the record's name.
GPU_DECODE_FASTER_ON_RECORD = False
GPU_MODES = ("RGB", "L")  # JPEG colour modes nvJPEG is given (CMYK/YCCK take the CPU path: Pillow's conversion)
EOI = b"\xff\xd9"  # a JPEG's end-of-image marker: a file without it near its end is truncated


def _indexed(device: torch.device) -> torch.device:
    """A CUDA device with its index ("cuda": the current one; any other device as it is). torchvision keeps
    one nvJPEG decoder and replaces it whenever a call names another device, "cuda" and "cuda:0" being two
    (the old one's resources are never freed): every call here names the device by its index."""
    device = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG files' bytes (each a uint8 (nbytes,) CPU tensor) -> their RGB pixels, uint8 (3, H, W) each on
    ``device``, decoded by nvJPEG in one batched call. Raises if any file fails (torchvision returns
    no partial results). The one GPU-only call of the path: tests substitute a CPU decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=_indexed(device))


def _probe_jpeg() -> torch.Tensor:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buf, "JPEG", quality=90)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


@functools.lru_cache(maxsize=None)
def _torchvision_reason(device: str) -> str | None:
    try:
        import torchvision
    except ImportError:
        return "torchvision is not installed (the GPU machines have it; pip install the torchvision of this torch)"
    except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
        return f"torchvision does not import ({first_line(exc, 120)})"
    try:
        out = decode_jpegs([_probe_jpeg()], torch.device(device))
        if out[0].shape != (3, 16, 16) or out[0].device.type != "cuda":
            return f"torchvision {torchvision.__version__}'s decode_jpeg gave {tuple(out[0].shape)} on {out[0].device}"
    except Exception as exc:  # noqa: BLE001 - e.g. "torchvision not compiled with nvJPEG support"
        text = message_line(exc, 160)
        return f"torchvision {torchvision.__version__} cannot decode JPEGs on {device} ({text})"
    return None


def unavailable_reason(device: str | torch.device) -> str | None:
    """Why ``--decode gpu`` cannot run on ``device``, one phrase (None: it can). Decodes a small JPEG on
    the device once to find out (cached; "cuda" is the current device)."""
    device = torch.device(device)
    why = []
    if device.type != "cuda":
        why.append(f"a CUDA device (this run is on the {device.type})")
    elif not torch.cuda.is_available():
        why.append("a CUDA device (torch sees none)")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        why.append("torchvision (not installed; the GPU machines have it)")
    except Exception:  # noqa: BLE001 - reported below with the details
        pass
    if why:
        return "it needs " + " and ".join(why)
    return _torchvision_reason(str(_indexed(device)))  # (one probe per device, however it is named)


def resolve_decode(decode: str, device: str | torch.device) -> tuple[str, str | None]:
    """``--decode`` with "auto" decided: (decode, the note saying why, or None when not auto)."""
    if decode != "auto":
        return decode, None
    if not GPU_DECODE_FASTER_ON_RECORD:
        return "fast", ("--decode auto: fast (the GPU decode has no record of being faster yet; --decode gpu "
                        "uses it where torchvision and CUDA are present)")
    reason = unavailable_reason(device)
    if reason is None:
        return "gpu", "--decode auto: gpu (nvJPEG; faster than fast on the record)"
    return "fast", f"--decode auto: fast (the GPU decode cannot run here: {reason})"


def gpu_decodable(img, data: bytes) -> bool:
    """Whether the file ``data`` (``img``: its header, opened by Pillow) goes to nvJPEG: a Huffman-coded DCT
    JPEG (as the CPU readers take: an arithmetic-coded or lossless one goes to Pillow, whose verdict decides,
    `maefast.train.jpeg.HUFFMAN_DCT_FRAMES`) in RGB or greyscale, its three components coded as YCbCr
    (`ycbcr_or_grey`), with an end-of-image marker in its last bytes (a truncated file has none: it takes the
    CPU path, where the decode fails and the file is counted)."""
    return (img.format == "JPEG" and img.mode in GPU_MODES and ycbcr_or_grey(img) and EOI in data[-64:]
            and frame_marker(data) in HUFFMAN_DCT_FRAMES)


def ycbcr_or_grey(img) -> bool:
    """Whether a JPEG's samples are grey or YCbCr as libjpeg reads the header (jdapimin.c): a JFIF marker
    means YCbCr; else an Adobe marker's transform 0 means RGB; else component ids 'R', 'G', 'B' mean RGB.
    RGB-coded files (Pillow saves them with keep_rgb=True) go to the CPU path, which decodes them as
    Pillow does, as the windowed CPU reader leaves them to Pillow: whether nvJPEG honours the marker
    has not been checked on a card."""
    if img.mode == "L" or "jfif" in img.info:
        return True
    if "adobe" in img.info:
        return img.info.get("adobe_transform") != 0
    return [c[0] for c in getattr(img, "layer", ())] not in ([82, 71, 66], [b"R", b"G", b"B"])


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The crop ``box`` = (top, left, h, w) of a uint8 (3, H, W) image, resized to (size, size) by
    torch's antialiased bicubic as the fast path's uint8 CPU kernel runs it: the width, rounded and
    clamped to 0-255, then the height. In float32 (CUDA has no uint8 kernel for it); the last pass is
    not rounded: float32 (3, size, size) on the image's device.

    The rounding between the passes matters: a single 2-D pass keeps the bicubic's overshoot at hard
    edges that the uint8 kernel (and Pillow) clamp, up to 13 levels apart on a few pixels; two passes
    agree with the uint8 kernel on 99.6% of the pixels, within 2 levels on all (tests/test_gpu_decode.py).
    """
    top, left, h, w = box
    crop = image[None, :, top:top + h, left:left + w].to(torch.float32)
    wide = F.interpolate(crop, size=(h, size), mode="bicubic", antialias=True, align_corners=False)
    wide = wide.round_().clamp_(0, 255)
    return F.interpolate(wide, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]


class DeviceDecode:
    """The device half of ``--decode gpu``: a collated batch's ``deferred`` part -> its images.

    Args:
        size: output side S.
        dtype: torch.uint8 (0-255) or torch.float32 (ImageNet-normalised, as `normalize_uint8`).
    """

    def __init__(self, size: int, dtype: torch.dtype = torch.uint8):
        self.size, self.dtype = int(size), dtype

    def decode(self, data: list[torch.Tensor], device: torch.device) -> list:
        """Each file's pixels on ``device``, or the error nvJPEG gave for it: one batched call; if it
        fails (one bad file fails them all), one call per file."""
        if not data:
            return []
        try:
            return list(decode_jpegs(data, device))
        except Exception:  # noqa: BLE001 - which file failed is found one by one
            pass
        out = []
        for d in data:
            try:
                out.append(decode_jpegs([d], device)[0])
            except Exception as exc:  # noqa: BLE001 - this file takes the CPU path
                out.append(exc)
        return out

    def __call__(self, deferred: dict, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
        """Decodes, crops, resizes and flips the batch's JPEGs on ``device`` and puts them with the
        pixels the workers made, in the batch's order.

        Args:
            deferred: `maefast.train.data.collate`'s ``deferred`` dict (the JPEG bytes, header sizes,
                boxes, flips and batch slots; the workers' uint8 (P, 3, S, S) pixels and their slots).
            device: where the images go (and are decoded, on CUDA).

        Returns:
            (images, keep, bad): images (K, 3, S, S) ``dtype`` on ``device`` (None if K = 0), keep a bool
            (N,) CPU mask of the batch's samples that made it, bad the "name: error" of those that did not.
        """
        n, size = int(deferred["count"]), self.size
        offsets = deferred["offsets"].tolist()
        data = [deferred["data"][offsets[j]:offsets[j + 1]] for j in range(len(offsets) - 1)]
        decoded = self.decode(data, device)
        boxes, sizes = deferred["boxes"].tolist(), deferred["sizes"].tolist()
        flips, slots = deferred["flips"].tolist(), deferred["slots"].tolist()
        out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
        keep = torch.ones(n, dtype=torch.bool)
        bad, done, res = [], [], []
        for j, img in enumerate(decoded):
            if isinstance(img, torch.Tensor) and tuple(img.shape) == (3, sizes[j][1], sizes[j][0]):
                try:
                    r = resized_crop(img, boxes[j], size)
                except RuntimeError as exc:  # torch's CUDA antialiased resize refuses a pass that shrinks a side
                    if "shared memory" not in str(exc):  # ~91x or more ("Too much shared memory required")
                        raise
                else:
                    res.append(r.flip(-1) if flips[j] else r)
                    done.append(slots[j])
                    continue
            # nvJPEG rejected the file, decoded another size than its header's, or the resize cannot shrink it
            # that much at once: the fast path's pixels (a device error on the way there is the run's, not the file's)
            try:
                from .augment import open_bytes

                with open_bytes(data[j].numpy().tobytes()) as im:
                    pixels = crop_fast(im, tuple(boxes[j]), size)
            except Exception as exc:  # noqa: BLE001 - corrupt: skipped and counted, as on the other paths
                keep[slots[j]] = False
                bad.append(f"{deferred['names'][j]}: {first_line(exc, 160)}")
                continue
            out[slots[j]] = (pixels.flip(-1) if flips[j] else pixels).to(device)
        if res:  # the last rounding, one pass for the batch
            u8 = torch.stack(res).round_().clamp_(0, 255).to(torch.uint8)
            out.index_copy_(0, torch.tensor(done, dtype=torch.long).to(device), u8)
        if deferred.get("pixels") is not None:
            out.index_copy_(0, deferred["pixel_slots"].to(device), deferred["pixels"].to(device, non_blocking=True))
        if not bool(keep.all()):
            out = out[keep.nonzero()[:, 0].to(device)]
        images = None if out.shape[0] == 0 else (out if self.dtype == torch.uint8 else normalize_uint8(out))
        return images, keep, bad
