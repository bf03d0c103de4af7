"""The CPU paths' JPEG reader (`maefast.train.augment`): a YCbCr or grey JPEG goes through
simplejpeg (libjpeg-turbo into numpy), anything else through Pillow, and the choice never shows in
a crop: the same box, the same pixels bit for bit at every decode scale, the same verdict on a
damaged file, on both the exact and the fast path."""
import io

import numpy as np
import pytest
import torch

from maefast.train import augment
from maefast.train.augment import PretrainTransform, draft_factor

pytest.importorskip("simplejpeg")

S = 32


def _jpeg(mode="RGB", w=641, h=479, seed=0, **save) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.asarray(low).astype(np.float32) + rng.normal(0, 8, (h, w, 1))
    a[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 256, 3)  # a hard edge: chroma upsampling shows
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert(mode).save(buf, "JPEG", **{"quality": 90, **save})
    return buf.getvalue()


VARIANTS = {
    "420": {}, "444": {"subsampling": 0}, "422": {"subsampling": 1}, "progressive": {"progressive": True},
    "grey": {"mode": "L"}, "odd-size": {"w": 255, "h": 97}, "restarts": {"restart_marker_blocks": 3},
}


def _boxes(w, h):
    """Crops decoded at each scale the image allows (1, 2, 4, 8), at odd offsets."""
    out = [(h // 7, w // 5, max(1, h // 9), max(1, w // 11)), (0, 0, h, w)]
    for k in (2, 4, 8):
        side = k * S + 3
        if side <= min(w, h):
            out.append(((h - side) // 3, (w - side) // 2 + 1, side, side + (w > side)))
    return out


def _crop(data, decode, box):
    """The crop of ``box`` through `PretrainTransform.crop_encoded` (its box draw replaced)."""
    t = PretrainTransform(S, decode=decode, dtype=torch.uint8)
    t.draw_box = lambda width, height, rng: box
    return t.crop_encoded(data, np.random.default_rng(0)).contiguous()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_simplejpeg_and_pillow_give_the_same_pixels(variant, decode, monkeypatch):
    kw = dict(VARIANTS[variant])
    data = _jpeg(**{k: kw.pop(k) for k in ("mode", "w", "h") if k in kw}, **kw)
    header = augment.jpeg_header(data)
    assert header is not None  # this file takes the simplejpeg route
    w, h = header
    scales = set()
    for box in _boxes(w, h):
        scales.add(draft_factor(box[3], box[2], S))
        fast = _crop(data, decode, box)
        with monkeypatch.context() as m:
            m.setattr(augment, "simplejpeg", None)
            assert augment.jpeg_header(data) is None
            slow = _crop(data, decode, box)
        assert fast.shape == (3, S, S) and torch.equal(fast, slow), (variant, decode, box)
    assert scales == ({1, 2, 4, 8} if min(w, h) >= 8 * S + 3 else {1, 2})


def test_routes(monkeypatch):
    from PIL import Image

    assert augment.jpeg_header(_jpeg("CMYK")) is None  # Pillow converts CMYK itself: its route
    assert augment.jpeg_header(b"\x89PNG\r\n\x1a\n" + b"\0" * 64) is None
    assert augment.jpeg_header(b"\xff\xd8\xff" + b"x" * 64) is None  # an unreadable header: Pillow says why
    data = _jpeg(w=300, h=200)
    assert augment.jpeg_header(data) == (300, 200)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200 - 1)  # Pillow's bomb check stays Pillow's
    assert augment.jpeg_header(data) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert augment.jpeg_header(data) == (300, 200)
    cmyk = _jpeg("CMYK", w=300, h=200)
    for decode in ("exact", "fast"):
        assert _crop(cmyk, decode, (10, 20, 150, 200)).shape == (3, S, S)


@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_damaged_files_get_pillows_verdict(decode, monkeypatch):
    data = _jpeg(w=300, h=300)
    sos = data.index(b"\xff\xda")
    stray = data[:sos] + b"\0\0" + data[sos:]  # libjpeg warns ("extraneous bytes"); Pillow decodes it
    box = (5, 7, 280, 290)  # decoded at 1/8 on the fast path
    assert augment.decode_jpeg(stray, 300, 300, draft_factor(290, 280, S)) is None
    got = _crop(stray, decode, box)
    monkeypatch.setattr(augment, "simplejpeg", None)
    assert torch.equal(got, _crop(stray, decode, box))
    monkeypatch.undo()
    truncated = data[: len(data) // 2]  # the header is whole: both readers fail in the decode
    assert augment.jpeg_header(truncated) == (300, 300)
    with pytest.raises(OSError, match="truncated"):
        _crop(truncated, decode, box)
