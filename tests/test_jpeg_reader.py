"""The CPU paths' JPEG readers (`maefast.train.jpeg`): Pillow opens every file; a YCbCr or grey JPEG
is decoded by maefast._jpeg (only the crop's window), else simplejpeg (the whole image), else Pillow,
and the choice never shows in a crop: the same box, the same pixels bit for bit at every decode
scale, the same verdict on a damaged file, on both the exact and the fast path."""
import io
import threading

import numpy as np
import pytest
import torch

from maefast.train import augment, jpeg
from maefast.train.augment import PretrainTransform, draft_factor

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


def _variant(name: str) -> bytes:
    kw = dict(VARIANTS[name])
    return _jpeg(**{k: kw.pop(k) for k in ("mode", "w", "h") if k in kw}, **kw)


def _boxes(w, h):
    """Crops decoded at each scale the image allows (1, 2, 4, 8), at odd offsets, and at the edges."""
    out = [(h // 7, w // 5, max(1, h // 9), max(1, w // 11)), (0, 0, h, w), (h - h // 3, w - w // 4, h // 3, w // 4)]
    for k in (2, 4, 8):
        side = k * S + 3
        if side <= min(w, h):
            out.append(((h - side) // 3, (w - side) // 2 + 1, side, side + (w > side)))
            out.append((h - side, w - side - (w > side), side, side + (w > side)))  # at the far corner
    return out


def _crop(data, decode, box):
    """The crop of ``box`` through `PretrainTransform.crop_encoded` (its box draw replaced)."""
    t = PretrainTransform(S, decode=decode, dtype=torch.uint8)
    t.draw_box = lambda width, height, rng: box
    return t.crop_encoded(data, np.random.default_rng(0)).contiguous()


def _opened(data):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def _use(monkeypatch, name):
    """Makes ``name`` this process's reader (skips where it is not installed)."""
    if name == "window" and jpeg._load_window_reader() is None:
        pytest.skip(f"maefast._jpeg is not built: {jpeg.load_error}")
    if name == "simplejpeg" and jpeg.simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    monkeypatch.setattr(jpeg, "_READER", name)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("decode", ["exact", "fast"])
@pytest.mark.parametrize("name", ["window", "simplejpeg"])
def test_each_reader_gives_pillows_pixels(name, variant, decode, monkeypatch):
    data = _variant(variant)
    _use(monkeypatch, name)
    with _opened(data) as img:
        assert jpeg.takes(img, data)  # this file takes the reader's route
        w, h = img.size
    scales = set()
    for box in _boxes(w, h):
        k = 1 if decode == "exact" else draft_factor(box[3], box[2], S)
        scales.add(draft_factor(box[3], box[2], S))
        win = augment.window(box, k, w, h)
        decoded = jpeg.decode(data, w, h, k, win)  # the route really decodes (no quiet fallback)
        assert decoded is not None and decoded.shape == (win[2] - win[0], win[3] - win[1], 3)
        fast = _crop(data, decode, box)
        with monkeypatch.context() as m:
            m.setattr(jpeg, "_READER", "pillow")
            with _opened(data) as img:
                assert not jpeg.takes(img, data)
            slow = _crop(data, decode, box)
        assert fast.shape == (3, S, S) and torch.equal(fast, slow), (name, variant, decode, box)
    assert scales == ({1, 2, 4, 8} if min(w, h) >= 8 * S + 3 else {1, 2})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_windows_are_the_whole_images_pixels(variant, monkeypatch):
    """maefast._jpeg's windows, anywhere (edges, one pixel, off the iMCU grid), at every scale: the same
    pixels as the whole image decoded (simplejpeg: libjpeg-turbo, all of it)."""
    _use(monkeypatch, "window")
    if jpeg.simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    data = _variant(variant)
    with _opened(data) as img:
        w, h = img.size
    rng = np.random.default_rng(len(variant))
    for k in (1, 2, 4, 8):
        full = jpeg._decode("simplejpeg", data, w, h, k, (0, 0, -(-h // k), -(-w // k)))
        H, W = full.shape[:2]
        wins = [(0, 0, H, W), (0, 0, 1, 1), (H - 1, W - 1, H, W), (0, W - 1, H, W), (H // 2, 0, H // 2 + 1, W)]
        for _ in range(12):
            y0, y1 = sorted(rng.choice(H + 1, 2, replace=False))
            x0, x1 = sorted(rng.choice(W + 1, 2, replace=False))
            wins.append((int(y0), int(x0), int(y1), int(x1)))
        for y0, x0, y1, x1 in wins:
            got = jpeg._decode("window", data, w, h, k, (y0, x0, y1, x1))
            assert got is not None and np.array_equal(got, full[y0:y1, x0:x1]), (variant, k, (y0, x0, y1, x1))


@pytest.mark.parametrize("subsampling", ["440", "411"])
def test_windows_of_rarer_samplings(subsampling, monkeypatch):
    """4:4:0 and 4:1:1 (Pillow does not write them; simplejpeg does): read from the first row at full
    width, stopping after the window, and still the whole image's pixels."""
    _use(monkeypatch, "window")
    if jpeg.simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    from PIL import Image

    rng = np.random.default_rng(3)
    w, h = 301, 203
    a = np.asarray(Image.open(io.BytesIO(_jpeg(w=w, h=h))).convert("RGB"))
    data = jpeg.simplejpeg.encode_jpeg(np.ascontiguousarray(a), quality=90, colorsubsampling=subsampling)
    for k in (1, 2, 4, 8):
        full = jpeg._decode("simplejpeg", data, w, h, k, (0, 0, -(-h // k), -(-w // k)))
        H, W = full.shape[:2]
        for _ in range(10):
            y0, y1 = sorted(int(v) for v in rng.choice(H + 1, 2, replace=False))
            x0, x1 = sorted(int(v) for v in rng.choice(W + 1, 2, replace=False))
            got = jpeg._decode("window", data, w, h, k, (y0, x0, y1, x1))
            assert got is not None and np.array_equal(got, full[y0:y1, x0:x1]), (subsampling, k, (y0, x0, y1, x1))
        with Image.open(io.BytesIO(data)) as img:  # and Pillow's pixels
            if k > 1:
                img.draft("RGB", (img.width // k, img.height // k))
            assert np.array_equal(np.asarray(img.convert("RGB")), full)


@pytest.mark.parametrize("name", ["window", "simplejpeg"])
def test_incomplete_progressive_files_get_pillows_pixels(name, monkeypatch):
    """A progressive file whose scans stop early (legal, EOI after the last scan: Pillow decodes it,
    smoothing the missing coefficients): libjpeg-turbo 2.1 and 3.x smooth differently (up to 3 levels),
    and the windowed reader links the system's, not Pillow's: it leaves such files to Pillow."""
    _use(monkeypatch, name)
    data = _jpeg(w=640, h=480, seed=1, progressive=True)
    sos = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    assert len(sos) >= 8
    box = (100, 150, 300, 400)
    for n in (2, 3, 5, 7):
        cut = data[:sos[n]] + b"\xff\xd9"
        with _opened(cut) as img:
            img.load()  # Pillow accepts it
        if name == "window":
            assert jpeg.decode(cut, 640, 480, 1, (0, 0, 480, 640)) is None
        for decode in ("exact", "fast"):
            got = _crop(cut, decode, box)
            with monkeypatch.context() as m:
                m.setattr(jpeg, "_READER", "pillow")
                assert torch.equal(got, _crop(cut, decode, box)), (name, n, decode)
    assert jpeg.decode(data, 640, 480, 1, (0, 0, 480, 640)) is not None  # the whole file: decoded


def test_window_reader_does_not_decode_below_the_window(monkeypatch):
    """The rows below the window are never decoded: damage there that libjpeg only warns about (Pillow
    decodes the file) leaves a window above it decodable, while a whole decode (simplejpeg, strict)
    reports it; both crops are Pillow's pixels."""
    _use(monkeypatch, "window")
    data = _jpeg(w=320, h=320, seed=2)
    eoi = len(data) - 2
    at = data.rindex(b"\xff\x00", 0, eoi - 40) + 2  # a data byte near the scan's end, not inside a stuffed pair
    damaged = data[:at] + b"\xff\xd3" + data[at:]  # a restart marker where none is due: a warning
    with _opened(damaged) as img:
        img.load()
    assert jpeg._decode("window", damaged, 320, 320, 1, (0, 0, 40, 320)) is not None
    assert jpeg.simplejpeg is None or jpeg._decode("simplejpeg", damaged, 320, 320, 1, (0, 0, 40, 320)) is None
    assert jpeg._decode("window", damaged, 320, 320, 1, (0, 0, 320, 320)) is None  # the damage's rows: reported
    top = (2, 3, 36, 300)
    for decode in ("exact", "fast"):
        got = _crop(damaged, decode, top)
        with monkeypatch.context() as m:
            m.setattr(jpeg, "_READER", "pillow")
            assert torch.equal(got, _crop(damaged, decode, top))


def test_window_reader_refuses_bad_arguments(monkeypatch):
    _use(monkeypatch, "window")
    data = _jpeg(w=64, h=48)
    with pytest.raises(ValueError, match="k must be 1, 2, 4 or 8, got 3"):
        jpeg._jpeg.decode_region(data, 3, 0, 0, 4, 4)
    with pytest.raises(ValueError, match="at least 1 x 1, got 0 x 4"):
        jpeg._jpeg.decode_region(data, 1, 0, 0, 0, 4)
    with pytest.raises(IndexError, match=r"outside the 24 x 32 image at 1/2"):  # our bug, not the file's
        jpeg._jpeg.decode_region(data, 2, 20, 0, 5, 4)
    for bad in ((-1, 0, 4, 4), (0, 0, 2**31 - 1, 2**31 - 1), (0, 0, 100000, 4), (2**31 - 2, 0, 4, 4)):
        with pytest.raises(IndexError, match="outside"):  # refused before the output is allocated
            jpeg._jpeg.decode_region(data, 1, *bad)
    with pytest.raises(TypeError):
        jpeg._jpeg.decode_region("not bytes", 1, 0, 0, 4, 4)
    for bad in (b"", b"\xff\xd8\xff", data[:200]):  # empty, no header, no scan
        with pytest.raises(ValueError, match="decode_region: "):
            jpeg._jpeg.decode_region(bad, 1, 0, 0, 4, 4)
    with pytest.raises(ValueError, match="colour space"):  # CMYK: Pillow's to convert
        jpeg._jpeg.decode_region(_jpeg("CMYK", w=64, h=48), 1, 0, 0, 4, 4)
    # memoryview and bytearray inputs read the same bytes
    want = jpeg._jpeg.decode_region(data, 1, 3, 5, 7, 9)
    assert jpeg._jpeg.decode_region(bytearray(data), 1, 3, 5, 7, 9) == want
    assert jpeg._jpeg.decode_region(memoryview(data), 1, 3, 5, 7, 9) == want


def test_window_reader_decodes_in_threads_alike(monkeypatch):
    """The GIL is released while decoding: threads decoding at once get what one thread gets."""
    _use(monkeypatch, "window")
    files = [_jpeg(w=300 + 7 * i, h=200 + 5 * i, seed=i) for i in range(4)]
    want = [jpeg._jpeg.decode_region(d, 1, 10, 20, 150, 200) for d in files]
    got = {}

    def work(t):
        got[t] = [jpeg._jpeg.decode_region(d, 1, 10, 20, 150, 200) for d in files * 5]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got[t] == want * 5 for t in range(4))


def test_routes(monkeypatch):
    from PIL import features

    def takes(data):
        with _opened(data) as img:
            return jpeg.takes(img, data)

    monkeypatch.setattr(jpeg, "_READER", None)
    name = jpeg.reader()
    assert name in jpeg.READERS and jpeg.describe()
    if name != "pillow":
        assert takes(_jpeg(w=300, h=200)) and takes(_jpeg("L", w=300, h=200))
    assert not takes(_jpeg("CMYK", w=300, h=200))  # Pillow converts CMYK itself: its route
    cmyk = _jpeg("CMYK", w=300, h=200)
    for decode in ("exact", "fast"):
        assert _crop(cmyk, decode, (10, 20, 150, 200)).shape == (3, S, S)
    # the readers are compared with Pillow once per process, the windowed one first
    if jpeg._load_window_reader() is not None:
        assert name == "window"
        monkeypatch.setattr(jpeg, "_READER", None)
        monkeypatch.setattr(jpeg, "_jpeg", None)  # not built: the whole-image reader
        monkeypatch.setattr(jpeg, "load_error", "ImportError: not built")
        assert jpeg.reader() == ("simplejpeg" if jpeg.simplejpeg is not None else "pillow")
        monkeypatch.undo()
    if jpeg._load_window_reader() is not None:  # a libjpeg-turbo older than the one the windows are tested on
        import types

        old = types.SimpleNamespace(LIBJPEG_TURBO_VERSION_NUMBER=2000006)
        monkeypatch.setattr(jpeg, "_READER", None)
        monkeypatch.setattr(jpeg, "_jpeg", None)
        monkeypatch.setattr(jpeg, "load_error", None)
        monkeypatch.setattr(jpeg.importlib, "import_module", lambda name: old)
        assert jpeg.reader() != "window" and "libjpeg-turbo 2.0.6, older than 2.1.0" in jpeg.load_error
        monkeypatch.undo()
    real = jpeg._decode
    for off in ("window", "simplejpeg"):  # a reader that is off at one scale is not trusted
        monkeypatch.setattr(jpeg, "_READER", None)
        monkeypatch.setattr(jpeg, "_decode", lambda n, *a, _off=off: None if n == _off and a[3] == 8 else real(n, *a))
        assert jpeg.reader() != off
    monkeypatch.setattr(jpeg, "_READER", None)
    monkeypatch.setattr(features, "check_feature", lambda name: False)  # a Pillow on another libjpeg
    assert jpeg.reader() == "pillow" and jpeg.describe() == "Pillow"
    assert not takes(_jpeg(w=300, h=200))
    monkeypatch.setattr(jpeg, "_READER", None)


def _assert_pillows_verdict(monkeypatch, data, decode, box):
    """The crop of ``box`` is what the Pillow reader gives: the same pixels, or the same OSError."""
    def crop():
        try:
            return _crop(data, decode, box)
        except OSError as exc:
            return exc

    with monkeypatch.context() as m:
        m.setattr(jpeg, "_READER", "pillow")
        want = crop()
    got = crop()
    assert type(got) is type(want)
    assert str(got) == str(want) if isinstance(want, OSError) else torch.equal(got, want)


@pytest.mark.parametrize("decode", ["exact", "fast"])
@pytest.mark.parametrize("name", ["window", "simplejpeg"])
def test_damaged_files_get_pillows_verdict(name, decode, monkeypatch):
    from PIL import Image

    _use(monkeypatch, name)
    data = _jpeg(w=300, h=300)
    sos = data.index(b"\xff\xda")
    stray = data[:sos] + b"\0\0" + data[sos:]  # libjpeg warns ("extraneous bytes"); Pillow decodes it
    box = (5, 7, 280, 290)  # decoded at 1/8 on the fast path
    k = draft_factor(290, 280, S)
    assert jpeg.decode(stray, 300, 300, k, augment.window(box, k, 300, 300)) is None
    got = _crop(stray, decode, box)
    with monkeypatch.context() as m:
        m.setattr(jpeg, "_READER", "pillow")
        assert torch.equal(got, _crop(stray, decode, box))
    truncated = data[: len(data) // 2]  # the header is whole: every reader fails in the decode
    with pytest.raises(OSError, match="truncated"):
        _crop(truncated, decode, box)
    # a crop above the damage: the window reader never decodes the rows that are missing, yet the file
    # gets Pillow's verdict (no end-of-image marker: Pillow decides), whatever the crop
    top = (3, 5, 60, 70)
    for cut in (len(data) * 3 // 4, len(data) - 2, len(data) - 1):
        assert jpeg.decode(data[:cut], 300, 300, 1, (3, 5, 63, 75)) is None
        with pytest.raises(OSError, match="truncated"):
            _crop(data[:cut], decode, top)
    assert data.endswith(b"\xff\xd9")
    junk = data[:-2] + b"\xff\xc4\x00\x02" + data[-2:]  # a marker between the scan and its end: Pillow's to judge
    if name == "window":  # (libjpeg reads this empty DHT whole: simplejpeg decodes the file)
        assert jpeg.decode(junk, 300, 300, 1, (3, 5, 63, 75)) is None
    _assert_pillows_verdict(monkeypatch, junk, decode, top)
    # trailing bytes after the end-of-image marker change nothing
    assert torch.equal(_crop(data + b"trailing", decode, top), _crop(data, decode, top))
    # a short JFIF segment: libjpeg decodes it, Pillow refuses the file, as the official loader
    assert data[2:4] == b"\xff\xe0"
    short_app0 = data[:2] + b"\xff\xe0\x00\x07JFIF\x00" + data[4 + int.from_bytes(data[4:6], "big"):]
    assert jpeg.decode(short_app0, 300, 300, 1, (0, 0, 300, 300)) is not None
    with pytest.raises(Image.UnidentifiedImageError, match=r"^cannot identify image file$"):
        _crop(short_app0, decode, box)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)  # Pillow's bomb check is still made
    with pytest.raises(Image.DecompressionBombError):
        _crop(data, decode, box)


@pytest.mark.parametrize("marker", [b"\xff\xd8", b"\xff\xc0\x00\x02", b"\xff\xc4\x00\x02", b"\xff\xfe\x00\x04ab"],
                         ids=["SOI", "SOF0", "DHT", "COM"])
@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_a_marker_after_the_scan_gets_pillows_verdict_for_a_window_reaching_the_last_rows(marker, decode,
                                                                                          monkeypatch):
    """A marker between the scan and the end-of-image marker, read by libjpeg only when the window reaches
    the last MCU rows: the window reader leaves the file to Pillow (which refuses some: a corrupt file is
    counted, not trained on)."""
    _use(monkeypatch, "window")
    data = _jpeg(w=300, h=300)
    junk = data[:-2] + marker + data[-2:]
    assert jpeg.decode(junk, 300, 300, 1, (240, 0, 300, 300)) is None
    _assert_pillows_verdict(monkeypatch, junk, decode, (200, 10, 100, 280))


def _drop_ac_scans(data: bytes, component: int) -> bytes:
    """A progressive JPEG without the AC scans of one component (with their tables): its AC coefficients
    are never sent, which libjpeg accepts and Pillow decodes."""
    sos = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    starts, prev = [], 0
    for s in sos:  # each scan with the tables (DHT) written just before it
        starts.append(next(q for q in range(prev, s + 1) if data[q] == 0xFF and data[q + 1] in (0xC4, 0xDA)))
        prev = s + 2
    out, last = [], 0
    for s, a, b in zip(sos, starts, starts[1:] + [len(data) - 2]):
        ns = data[s + 4]
        if ns == 1 and data[s + 5] == component and data[s + 5 + 2 * ns] > 0:  # one component, Ss > 0: AC
            out.append(data[last:a])
            last = b
    return b"".join(out + [data[last:]])


def test_a_progressive_file_with_coefficients_never_sent_is_left_to_pillow(monkeypatch):
    _use(monkeypatch, "window")
    data = _jpeg(w=320, h=240, seed=1, progressive=True)
    cut = _drop_ac_scans(data, component=3)
    assert len(cut) < len(data)
    with _opened(cut) as img:
        img.load()  # Pillow decodes it
    assert jpeg.decode(cut, 320, 240, 1, (0, 0, 240, 320)) is None
    assert jpeg.decode(data, 320, 240, 1, (0, 0, 240, 320)) is not None


def _kind(data: bytes) -> str:
    """Which of `jpeg._agrees`'s files ``data`` is: its sampling, grey or progressive."""
    from PIL import JpegImagePlugin

    with _opened(data) as img:
        if img.mode == "L":
            return "grey"
        if img.info.get("progressive"):
            return "progressive"
        return {0: "444", 1: "422", 2: "420"}[JpegImagePlugin.get_sampling(img)]


@pytest.mark.parametrize("off", ["420", "422", "444", "grey", "progressive", "window"])
@pytest.mark.parametrize("name", ["window", "simplejpeg"])
def test_a_reader_one_level_off_on_any_file_of_the_check_is_not_trusted(name, off, monkeypatch):
    """`reader` checks every sampling, grey, progressive, the whole image and a window off the iMCU grid:
    a reader off by one level on one of them only is not used (the next one is)."""
    _use(monkeypatch, name)
    real = jpeg._decode

    def decode(n, data, w, h, k, win):
        got = real(n, data, w, h, k, win)
        if n == name and got is not None and (win[:2] != (0, 0) if off == "window" else _kind(data) == off):
            got = got.copy()
            got[-1, -1, 0] ^= 1
        return got

    if name == "simplejpeg":  # the windowed reader, tried first, not built
        monkeypatch.setattr(jpeg, "_jpeg", None)
        monkeypatch.setattr(jpeg, "load_error", "ImportError: not built")
    monkeypatch.setattr(jpeg, "_READER", None)
    assert jpeg.reader() == name  # the check passes as it is
    monkeypatch.setattr(jpeg, "_decode", decode)
    monkeypatch.setattr(jpeg, "_READER", None)
    assert jpeg.reader() == ("simplejpeg" if name == "window" and jpeg.simplejpeg is not None else "pillow")


def test_the_reader_is_decided_once_per_process(monkeypatch):
    monkeypatch.setattr(jpeg, "_READER", None)
    first = jpeg.reader()
    monkeypatch.setattr(jpeg, "_agrees", lambda name: pytest.fail("the readers were compared again"))
    assert jpeg.reader() == first


def test_libjpeg_turbo_2_1_0_is_taken(monkeypatch):
    import types

    for version, taken in ((2001000, True), (3000090, True), (2000090, False)):
        built = types.SimpleNamespace(LIBJPEG_TURBO_VERSION_NUMBER=version)
        monkeypatch.setattr(jpeg, "_jpeg", None)
        monkeypatch.setattr(jpeg, "load_error", None)
        monkeypatch.setattr(jpeg.importlib, "import_module", lambda name, _m=built: _m)
        assert (jpeg._load_window_reader() is built) == taken, version
        assert (jpeg.load_error is None) == taken
    assert "libjpeg-turbo 2.0.90, older than 2.1.0" in jpeg.load_error


def test_a_size_libjpeg_reads_otherwise_than_pillow_is_left_to_pillow(monkeypatch):
    """The window reader refuses a window outside the image libjpeg reads (IndexError): where Pillow's
    header gave another size, `decode` answers None and Pillow judges the file."""
    _use(monkeypatch, "window")
    data = _jpeg(w=64, h=48)
    assert jpeg.decode(data, 64, 48, 1, (40, 0, 48, 64)) is not None
    assert jpeg.decode(data, 64, 56, 1, (40, 0, 56, 64)) is None  # Pillow's header said 56 rows
    assert jpeg.decode(data, 72, 48, 1, (0, 60, 8, 72)) is None


@pytest.mark.parametrize("name", ["window", "simplejpeg"])
def test_an_mpo_file_takes_the_readers_route_with_pillows_pixels(name, monkeypatch):
    """A camera's MPO (a JPEG followed by more images): Pillow and the readers decode its first image."""
    from PIL import Image

    _use(monkeypatch, name)
    buf = io.BytesIO()
    with _opened(_jpeg(w=300, h=200)) as first:
        first.save(buf, "MPO", save_all=True, append_images=[first.transpose(Image.Transpose.ROTATE_180)])
    data = buf.getvalue()
    with _opened(data) as img:
        assert img.format == "MPO" and jpeg.takes(img, data)
    for decode in ("exact", "fast"):
        _assert_pillows_verdict(monkeypatch, data, decode, (20, 30, 150, 240))
    if name == "simplejpeg":  # a header simplejpeg cannot read (no scan yet): Pillow's route
        cut = data[:data.index(b"\xff\xda")]
        with _opened(cut) as img:
            assert not jpeg.takes(img, cut)


def _lossless_jpeg(a: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> a lossless JPEG (SOF3, predictor 1: the left neighbour; one Huffman table
    giving each difference category a 5-bit code): a legal file Pillow cannot write, nor decode at 1/k."""
    import struct

    a = (a[..., None] if a.ndim == 2 else a).astype(np.int64)
    h, w, nc = a.shape
    pred = np.concatenate([a[:, :1], a[:, :-1]], 1)  # left; the first column predicts from above
    pred[1:, 0], pred[0, 0] = a[:-1, 0], 128
    bits = []
    for d in (a - pred).reshape(-1).tolist():
        s = abs(d).bit_length()
        bits.append(format(s, "05b") + (format(d if d > 0 else d - 1 + (1 << s), f"0{s}b") if s else ""))
    b = "".join(bits)
    b += "1" * (-len(b) % 8)
    scan = bytes(int(b[i:i + 8], 2) for i in range(0, len(b), 8)).replace(b"\xff", b"\xff\x00")

    def seg(marker, body):
        return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body

    comps = [bytes([c + 1, 0x11, 0]) for c in range(nc)]
    return (b"\xff\xd8" + seg(0xC3, struct.pack(">BHHB", 8, h, w, nc) + b"".join(comps))
            + seg(0xC4, bytes([0] + [0] * 4 + [17] + [0] * 11) + bytes(range(17)))
            + seg(0xDA, bytes([nc]) + b"".join(bytes([c + 1, 0]) for c in range(nc)) + bytes([1, 0, 0]))
            + scan + b"\xff\xd9")


@pytest.mark.parametrize("name", ["window", "simplejpeg", "pillow"])
def test_a_lossless_jpeg_is_decoded_at_full_scale_on_the_fast_path(name, monkeypatch):
    """A lossless JPEG has no scaled decode (Pillow's draft took a scale for it, then its decode failed: the fast
    path counted every such file with a crop of 2 x S or more as unreadable, the exact path read it)."""
    from PIL import Image

    if name != "pillow":
        _use(monkeypatch, name)
    else:
        monkeypatch.setattr(jpeg, "_READER", "pillow")
    rng = np.random.default_rng(0)
    a = np.asarray(Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize((90, 70), Image.BICUBIC))
    for image in (a[..., 1], a):
        data = _lossless_jpeg(image)
        try:
            with _opened(data) as img:
                full = np.asarray(img.convert("RGB"))
        except OSError as exc:  # libjpeg-turbo before 3.0: no lossless decoding (the official loader fails alike)
            pytest.skip(f"this Pillow's libjpeg decodes no lossless JPEG ({exc})")
        assert np.array_equal(full, np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image)
        for box in ((3, 5, 2 * S + 1, 2 * S + 3), (0, 0, 70, 90), (10, 20, 9, 11)):
            assert torch.equal(_crop(data, "exact", box), augment.crop_exact(full, box, S))
            assert torch.equal(_crop(data, "fast", box), augment.resample_fast(full, box, 1, S))
            with _opened(data) as img:
                assert not augment.scalable(img) and not jpeg.takes(img, data)  # Pillow's route
                assert torch.equal(augment.crop_fast(img, box, S), augment.resample_fast(full, box, 1, S))


@pytest.mark.parametrize("name", ["window", "simplejpeg"])
def test_an_arithmetic_coded_jpeg_takes_pillows_route(name, monkeypatch):
    """Pillow feeds libjpeg 64 KiB at a time and libjpeg's arithmetic decoder cannot resume across reads: Pillow
    (and the official loader) refuses an arithmetic-coded file over that size, which a reader decoding from memory
    read, so the reader decided whether the sample existed. The route is decided on the header: its frame marker
    (past an EXIF segment), whatever the data after it."""
    from PIL import Image

    _use(monkeypatch, name)
    exif = Image.Exif()
    exif[0x0112] = 6
    for progressive, frame in ((False, 0xC9), (True, 0xCA)):
        data = _jpeg(w=300, h=200, progressive=progressive, exif=exif.tobytes())
        with _opened(data) as img:
            assert jpeg.takes(img, data)
        sof = data.index(bytes([0xFF, 0xC2 if progressive else 0xC0]))
        arith = data[:sof + 1] + bytes([frame]) + data[sof + 2:]
        with _opened(arith) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and not jpeg.takes(img, arith)
        assert jpeg.frame_marker(data) == data[sof + 1] and jpeg.frame_marker(arith) == frame
