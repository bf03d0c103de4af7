"""`maefast visualize`: a grid image (PNG, or what --out's ending names) of MAE reconstructions from a checkpoint.

One row per image: original | masked | reconstruction | reconstruction with the visible patches
pasted back. For a norm_pix_loss model the prediction is per-patch normalised pixels; it is shown
un-normalised with the mean and variance of each patch of the ORIGINAL image (the masked patches'
statistics are ones the model never saw), and the caption says so.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

import numpy as np
import torch

PANEL_MIN = 224  # panels are upscaled (nearest, so patches stay visible) by a whole factor to at least this size
MARGIN, TITLE_H, LINE_H = 8, 18, 14
TITLES = ("original", "masked {ratio}", "reconstruction", "reconstruction + visible")


def load_model(checkpoint: str, model_name: str | None = None, norm_pix_loss: bool | None = None):
    """(model in eval mode, model name, norm_pix_loss) from a ``maefast train`` checkpoint (or an
    official full MAE checkpoint with a decoder, given ``model_name``).

    The model is the one the checkpoint records; ``model_name`` only names it for a checkpoint that
    records none, and a ``model_name`` that contradicts the recorded one is refused (ValueError).
    """
    from .models import create_model, resolve_model_name
    from .convert import is_encoder_only
    from .train.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint, optimizer=False)  # the weights only
    state = ck["model"]
    if is_encoder_only(state):
        raise ValueError(f"{checkpoint!r} has no decoder weights (an encoder export such as mae_pretrain_*.pth?); "
                         "visualize needs a full training checkpoint such as OUTPUT_DIR/checkpoint-last.pth")
    kwargs = dict(ck.get("model_kwargs") or {})
    args = ck.get("args")
    recorded = ck.get("model_name") or (getattr(args, "model", None) if args is not None else None)
    if recorded is not None and model_name is not None:
        try:
            same = resolve_model_name(model_name) == resolve_model_name(recorded)
        except ValueError:
            same = False
        if not same:
            raise ValueError(f"--model {model_name} contradicts the model recorded in {checkpoint!r} ({recorded}): "
                             "drop --model (the recorded model is used)")
    name = recorded or model_name
    if name is None:
        raise ValueError(f"{checkpoint!r} does not record its model: pass --model")
    if "img_size" not in kwargs and "pos_embed" in state and "patch_embed.proj.weight" in state:
        kwargs["img_size"] = int(round((state["pos_embed"].shape[1] - 1) ** 0.5)) * \
            int(state["patch_embed.proj.weight"].shape[-1])
    if norm_pix_loss is not None:
        kwargs["norm_pix_loss"] = norm_pix_loss
    elif "norm_pix_loss" not in kwargs and args is not None:
        kwargs["norm_pix_loss"] = bool(getattr(args, "norm_pix_loss", False))
    name = resolve_model_name(name)
    model = create_model(name, **kwargs)
    mismatch = _mismatch(model.state_dict(), state)
    if mismatch:  # the weights are another model's (a name given for an unlabelled file)
        raise ValueError(f"the weights in {checkpoint!r} do not fit {name}: {mismatch}")
    model.load_state_dict(state)
    return model.eval(), name, bool(kwargs.get("norm_pix_loss", False))


def _mismatch(want: dict, got: dict) -> str:
    """'' when ``got`` loads into a model with state ``want``, else a short account of why not."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [k for k in want if k in got and tuple(want[k].shape) != tuple(got[k].shape)]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) of another shape (e.g. {k}: {tuple(got[k].shape)} in the file, "
                     f"{tuple(want[k].shape)} in the model)")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return "; ".join(parts)


@torch.no_grad()
def reconstruct(model, image: torch.Tensor, mask_ratio: float = 0.75, seed: int = 0) -> dict:
    """Runs the MAE on one image (3, S, S), ImageNet-normalised float or uint8 0-255 (normalised here, as the
    model's own uint8 path does); returns normalised (3, S, S) panels + loss.

    Keys: original, masked (masked patches at 0 = the ImageNet mean colour), reconstruction,
    pasted (reconstruction with the visible patches of the original), mask (S, S) 1 = removed, loss.
    """
    from .reference.patchify import patchify, unpatchify
    from .train.augment import normalize_uint8

    # a uint8 image (the data loader's default dtype) taken as float would be 0-255 pixels, not normalised ones
    x = (normalize_uint8(image) if image.dtype == torch.uint8 else image).unsqueeze(0).float().cpu()
    p = model.patch_size
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, model.patch_embed.num_patches, generator=gen)  # on the CPU: one mask for a seed anywhere
    # the model runs where its weights are, in their dtype (a CUDA or half model); the panels are made on the CPU
    w = model._embed_weight()  # (the weight the model casts its images to: a wrapped proj's conv, ...)
    w = next(model.parameters()) if w is None else w
    loss, pred, mask = model(x.to(w.device, w.dtype), mask_ratio=mask_ratio, noise=noise.to(w.device))
    pred, mask = pred.float().cpu(), mask.float().cpu()
    if model.norm_pix_loss:
        target = patchify(x, p)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in the loss
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    grid = model.patch_embed.grid_size
    rec = unpatchify(pred, p, grid, 3)
    m = unpatchify(mask.unsqueeze(-1).repeat(1, 1, p * p * 3), p, grid, 3)
    return {"original": x[0], "masked": (x * (1 - m))[0], "reconstruction": rec[0],
            "pasted": (x * (1 - m) + rec * m)[0], "mask": m[0, 0], "loss": float(loss)}


def _to_pil(x: torch.Tensor, size: tuple[int, int]):
    """A normalised (3, H, W) image as a Pillow image of ``size`` = (height, width), upscaled with nearest."""
    from PIL import Image

    from .train.data import denormalize

    arr = (denormalize(x).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(arr))
    return img.resize((size[1], size[0]), Image.NEAREST) if (size[1], size[0]) != img.size else img


def caption_for(model_name: str, norm_pix_loss: bool, mask_ratio: float, seed: int, rows: int = 1) -> list[str]:
    seeds = f"mask seed {seed}" if rows == 1 else f"mask seeds {seed}..{seed + rows - 1} (one per row)"
    lines = [f"{model_name}, mask ratio {mask_ratio:g}, {seeds}; loss = mean squared error on masked patches."]
    if norm_pix_loss:
        lines.append("norm_pix_loss model: the prediction (per-patch normalised pixels) is un-normalised with the "
                     "mean and variance of each patch of the ORIGINAL image, masked patches included (statistics "
                     "the model never saw).")
    else:
        lines.append("pixel-loss model: the prediction is shown as is (ImageNet normalisation undone).")
    return lines


def render(rows: list[dict], caption: list[str], mask_ratio: float, panel: tuple[int, int]):
    """Pillow grid: one row per image, 4 panels of ``panel`` = (height, width) pixels; returns (image,
    boxes[row][col] = (x0, y0, x1, y1))."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    ph, pw = panel
    chars = max(40, (4 * pw + 3 * MARGIN) // 6)
    wrapped = [w for line in caption for w in textwrap.wrap(line, chars)]
    width = 4 * pw + 5 * MARGIN
    row_h = TITLE_H + ph + MARGIN
    height = MARGIN + len(rows) * row_h + len(wrapped) * LINE_H + MARGIN
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for r, row in enumerate(rows):
        y = MARGIN + r * row_h
        row_boxes = []
        for c, key in enumerate(("original", "masked", "reconstruction", "pasted")):
            x = MARGIN + c * (pw + MARGIN)
            title = TITLES[c].format(ratio=f"{mask_ratio:.0%}")
            if c == 2:
                title += f" (loss {row['loss']:.3f})"
            draw.text((x, y + 2), title, fill=(0, 0, 0), font=font)
            canvas.paste(_to_pil(row[key], panel), (x, y + TITLE_H))
            row_boxes.append((x, y + TITLE_H, x + pw, y + TITLE_H + ph))
        boxes.append(row_boxes)
    y = MARGIN + len(rows) * row_h
    for i, line in enumerate(wrapped):
        draw.text((MARGIN, y + i * LINE_H), line, fill=(40, 40, 40), font=font)
    return canvas, boxes


def _check_out(out: str, inputs: list[str], overwrite: bool) -> None:
    """--out must not be one of the inputs, nor a folder, nor in a missing folder, nor a file that exists
    unless ``overwrite`` says so."""
    from .cli import check_out_file

    for path in inputs:
        if os.path.exists(path) and os.path.exists(out) and os.path.samefile(path, out):
            raise ValueError(f"--out {out!r} is one of the inputs ({path!r}): pick another --out")
    check_out_file("--out", out, overwrite)


def read_image(path: str):
    """The image file ``path`` as an RGB Pillow image, converted as the data path does (ValueError naming it when
    it cannot be read). A grayscale image of more than 8 bits (Pillow's modes I;16, I, F) with values past 255 is
    refused: Pillow's RGB conversion clips each pixel to 255 (a 16-bit PNG came out white), not rescales it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            lo, hi = im.getextrema() if im.mode.startswith(("I", "F")) else (0, 255)
            if not 0 <= lo <= hi <= 255:
                raise ValueError(f"its pixels (mode {im.mode}) span {lo}..{hi}: an RGB conversion clips them to "
                                 "0..255; save it as an 8-bit image")
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path!r}: {exc}") from exc


def visualize(checkpoint: str, images: list[str] | str, out: str = "reconstruction.png", mask_ratio: float = 0.75,
              seed: int = 0, model_name: str | None = None, norm_pix_loss: bool | None = None,
              overwrite: bool = False) -> dict:
    """Writes the reconstruction grid (a PNG, or the format ``out``'s ending names: .jpg, .webp, .bmp, .tif;
    another ending is refused before any work); returns {"out", "boxes", "caption", "losses", "panel" (height,
    width)}. An existing ``out`` is replaced only with ``overwrite`` (never when it is the checkpoint or an
    image), and atomically: an interrupted write leaves the previous file."""
    from PIL import Image

    from .cli import check_mask_ratio_flag, image_format
    from .train.checkpoint import atomic_write_file
    from .train.data import center_transform

    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be an image file's path or a list of them, got {type(images).__name__}")
    for name, v in [("checkpoint", checkpoint), ("out", out)] + [("images", i) for i in images]:
        if not isinstance(v, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(v).__name__} {v!r}")
    if not images:
        raise ValueError("images: give at least one image file")
    _check_out(out, [checkpoint, *images], overwrite)
    fmt = image_format("--out", out)
    Image.init()
    if fmt not in Image.SAVE:  # a Pillow built without that encoder (WebP's is optional)
        raise ValueError(f"--out {out!r}: this Pillow cannot write {fmt}; end the name in .png")
    # torch.Generator's range; image i is drawn with seed + i
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed <= 2 ** 64 - len(images):
        raise ValueError(f"--seed must be an int in [-2**63, 2**64 - {len(images)}], got {seed!r}")
    check_mask_ratio_flag(mask_ratio)
    pictures = [read_image(path) for path in images]  # an unreadable image named before the (large) checkpoint loads
    model, name, npl = load_model(checkpoint, model_name, norm_pix_loss)
    check_mask_ratio_flag(mask_ratio, model.patch_embed.num_patches)  # the model's own rule, before any work
    chans = model.patch_embed.proj.in_channels
    if chans != 3:  # the images are read, shown and normalised as RGB
        raise ValueError(f"the model in {checkpoint!r} takes {chans}-channel images; visualize shows RGB (3-channel) "
                         "models only")
    size = tuple(model.patch_embed.img_size)  # (height, width)
    rows = [reconstruct(model, center_transform(img, size), mask_ratio, seed + i) for i, img in enumerate(pictures)]
    k = -(-PANEL_MIN // min(size))  # the smallest whole factor giving at least PANEL_MIN pixels
    panel = (size[0] * k, size[1] * k)
    caption = caption_for(name, npl, mask_ratio, seed, len(rows))
    canvas, boxes = render(rows, caption, mask_ratio, panel)
    try:
        atomic_write_file(out, lambda f: canvas.save(f, format=fmt))
    except OSError as exc:
        raise ValueError(f"cannot write --out {out!r}: {exc.strerror or exc}") from None
    return {"out": out, "boxes": boxes, "caption": caption, "losses": [r["loss"] for r in rows], "panel": panel}


def build_parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter, OneLineParser

    p = OneLineParser(prog="maefast visualize", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a maefast train checkpoint (OUTPUT_DIR/checkpoint-last.pth)")
    p.add_argument("--image", required=True, nargs="+", action="extend",
                   help="image file(s); one row each (--image a.png b.png, or --image repeated)")
    p.add_argument("--out", default="reconstruction.png",
                   help="image to write, in the format its name ends with (.png, .jpg, .webp, .bmp, .tif)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of the patches removed, in (0, 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--model", default=None,
                   help="model name, for a checkpoint that does not record it (one that does uses its own)")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="override the checkpoint's norm_pix_loss setting")
    return p


def main(argv=None) -> int:
    from .train.errors import USER_ERRORS

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        res = visualize(args.checkpoint, args.image, args.out, args.mask_ratio, args.seed, args.model,
                        args.norm_pix_loss, overwrite=args.overwrite)
    except USER_ERRORS as exc:  # a traceback only for our own bugs
        print(f"maefast visualize: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maefast visualize: interrupted", file=sys.stderr)
        return 130
    print(f"maefast visualize: wrote {res['out']} (loss {', '.join(f'{v:.4f}' for v in res['losses'])})")
    return 0
