"""The CPU paths' JPEG reader (`maefast.train.augment`): Pillow opens every file; a YCbCr or grey
JPEG is decoded by simplejpeg (libjpeg-turbo into numpy), anything else by Pillow, and the choice
never shows in a crop: the same box, the same pixels bit for bit at every decode scale, the same
verdict on a damaged file, on both the exact and the fast path."""
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


def _opened(data):
    from PIL import Image

    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_simplejpeg_and_pillow_give_the_same_pixels(variant, decode, monkeypatch):
    kw = dict(VARIANTS[variant])
    data = _jpeg(**{k: kw.pop(k) for k in ("mode", "w", "h") if k in kw}, **kw)
    with _opened(data) as img:
        assert augment.simplejpeg_takes(img, data)  # this file takes the simplejpeg route
        w, h = img.size
    scales = set()
    for box in _boxes(w, h):
        k = 1 if decode == "exact" else draft_factor(box[3], box[2], S)
        scales.add(draft_factor(box[3], box[2], S))
        decoded = augment.decode_jpeg(data, w, h, k)  # the route really decodes (no quiet fallback)
        assert decoded is not None and decoded.shape == (-(-h // k), -(-w // k), 3)
        fast = _crop(data, decode, box)
        with monkeypatch.context() as m:
            m.setattr(augment, "simplejpeg", None)
            with _opened(data) as img:
                assert not augment.simplejpeg_takes(img, data)
            slow = _crop(data, decode, box)
        assert fast.shape == (3, S, S) and torch.equal(fast, slow), (variant, decode, box)
    assert scales == ({1, 2, 4, 8} if min(w, h) >= 8 * S + 3 else {1, 2})


def test_routes(monkeypatch):
    from PIL import features

    def takes(data):
        with _opened(data) as img:
            return augment.simplejpeg_takes(img, data)

    assert takes(_jpeg(w=300, h=200)) and takes(_jpeg("L", w=300, h=200))
    assert not takes(_jpeg("CMYK", w=300, h=200))  # Pillow converts CMYK itself: its route
    cmyk = _jpeg("CMYK", w=300, h=200)
    for decode in ("exact", "fast"):
        assert _crop(cmyk, decode, (10, 20, 150, 200)).shape == (3, S, S)
    # the readers are compared once per process before simplejpeg is trusted
    assert augment._readers_agree()
    monkeypatch.setattr(augment, "_AGREE", None)
    monkeypatch.setattr(features, "check_feature", lambda name: False)  # a Pillow on another libjpeg
    assert not takes(_jpeg(w=300, h=200))
    monkeypatch.undo()
    real = augment.decode_jpeg
    monkeypatch.setattr(augment, "_AGREE", None)
    monkeypatch.setattr(augment, "decode_jpeg", lambda *a: None if a[3] == 8 else real(*a))  # off at one scale
    assert not takes(_jpeg(w=300, h=200))
    monkeypatch.setattr(augment, "_AGREE", None)


@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_damaged_files_get_pillows_verdict(decode, monkeypatch):
    from PIL import Image

    data = _jpeg(w=300, h=300)
    sos = data.index(b"\xff\xda")
    stray = data[:sos] + b"\0\0" + data[sos:]  # libjpeg warns ("extraneous bytes"); Pillow decodes it
    box = (5, 7, 280, 290)  # decoded at 1/8 on the fast path
    assert augment.decode_jpeg(stray, 300, 300, draft_factor(290, 280, S)) is None
    got = _crop(stray, decode, box)
    with monkeypatch.context() as m:
        m.setattr(augment, "simplejpeg", None)
        assert torch.equal(got, _crop(stray, decode, box))
    truncated = data[: len(data) // 2]  # the header is whole: both readers fail in the decode
    with pytest.raises(OSError, match="truncated"):
        _crop(truncated, decode, box)
    # a short JFIF segment: libjpeg decodes it, Pillow refuses the file, as the official loader
    assert data[2:4] == b"\xff\xe0"
    short_app0 = data[:2] + b"\xff\xe0\x00\x07JFIF\x00" + data[4 + int.from_bytes(data[4:6], "big"):]
    assert augment.decode_jpeg(short_app0, 300, 300) is not None
    with pytest.raises(Image.UnidentifiedImageError, match=r"^cannot identify image file$"):
        _crop(short_app0, decode, box)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)  # Pillow's bomb check is still made
    with pytest.raises(Image.DecompressionBombError):
        _crop(data, decode, box)
