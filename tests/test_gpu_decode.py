"""``--decode gpu`` (`maefast.train.gpu_decode`): the workers draw the same boxes, flips and noise as
the other paths; the device stage (decode, crop, resize, flip) gives the fast path's pixels for the
same decoded pixels; files nvJPEG is not given or rejects get the fast path's pixels; corrupt files
are skipped and counted; the same samples on every rank, worker and resume; the command line's
messages; the bench row.

On the CPU the one GPU-only call, ``gpu_decode.decode_jpegs``, is replaced by a Pillow decode with
torchvision's contract (a list in, a list out, no partial result on an error); the `cuda` tests run
nvJPEG itself."""
import io
import json
import os

import numpy as np
import pytest
import torch

from maefast import bench_data, bench_data_gpu
from maefast.train import gpu_decode, jpeg
from maefast.train.augment import draft_factor, normalize_uint8
from maefast.train.data import ImageFolderDataset, ResumableDistributedSampler, SyntheticDataset, collate
from maefast.train.feed import DeviceFeed
from test_data import _bogus_huffman, _box_and_flip, _corrupt_folder, _jpeg_folder, _photo, resumed_equals_straight

S = 32
CPU = torch.device("cpu")


def pillow_decode(data, device):
    """torchvision's decode_jpeg(list, mode=RGB, device=...) with Pillow (libjpeg-turbo) doing the decode."""
    from PIL import Image

    out = []
    for d in data:
        with Image.open(io.BytesIO(d.numpy().tobytes())) as im:
            if im.format != "JPEG":
                raise RuntimeError("Error while decoding JPEG images: not a JPEG")
            out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous().to(device))
    return out


@pytest.fixture
def calls(monkeypatch):
    """Pillow in nvJPEG's place, available on the CPU; records the size of every decode call."""
    seen = []

    def decode(data, device):
        seen.append(len(data))
        return pillow_decode(data, device)

    monkeypatch.setattr(gpu_decode, "decode_jpegs", decode)
    monkeypatch.setattr(gpu_decode, "unavailable_reason", lambda device: None)
    return seen


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _jpeg_folder(tmp_path_factory.mktemp("jpegs"))


def _batch(ds, keys):
    return collate([ds[k] for k in keys])


def _made(ds, keys, device=CPU):
    """The images ``decode="gpu"`` makes for ``keys``, through `DeviceFeed` as `maefast train` runs it."""
    return next(iter(DeviceFeed([_batch(ds, keys)], device, decode=ds.device_decode)))


# -- the workers' half ---------------------------------------------------------------------------------
def test_workers_draw_the_boxes_flips_and_noise_of_the_other_paths(folder):
    gpu = ImageFolderDataset(folder, S, 16, seed=4, decode="gpu")
    fast = ImageFolderDataset(folder, S, 16, seed=4, decode="fast")
    flips = 0
    for epoch in range(3):
        for i, path in enumerate(gpu.files):
            item = gpu[(epoch, i)]
            box, flip = _box_and_flip(path, 4, epoch, i)
            assert set(item) == {"jpeg", "size", "box", "flip", "noise", "name"}
            assert item["box"] == box and item["flip"] == flip and item["name"] == path
            assert torch.equal(item["noise"], fast[(epoch, i)]["noise"])
            assert item["jpeg"].dtype == torch.uint8 and item["jpeg"].numpy().tobytes() == open(path, "rb").read()
            flips += flip
    assert 0 < flips < 3 * len(gpu)
    assert gpu.device_decode is not None and fast.device_decode is None


# -- the device half -----------------------------------------------------------------------------------
def test_device_stage_is_the_fast_path_given_the_same_decoded_pixels(tmp_path, calls):
    # images of 60-130 px: most crops are under 2 x S, where the fast path decodes in full too
    root = _jpeg_folder(tmp_path / "small", sizes=[(60 + 11 * i, 130 - 9 * i) for i in range(8)] + [(640, 480)])
    u8 = {d: ImageFolderDataset(root, S, 16, seed=1, decode=d, dtype=torch.uint8) for d in ("gpu", "fast", "exact")}
    keys = [(e, i) for e in range(6) for i in range(len(u8["gpu"]))]
    batch = _made(u8["gpu"], keys)
    assert calls == [len(keys)]  # one batched call
    assert batch["images"].shape == (len(keys), 3, S, S) and batch["images"].dtype == torch.uint8
    full, vs_exact = [], []
    for row, ((e, i), img) in enumerate(zip(keys, batch["images"])):
        _, _, h, w = _box_and_flip(u8["gpu"].name(i), 1, e, i)[0]
        assert torch.equal(batch["noise"][row], u8["fast"][(e, i)]["noise"])
        d = (img.int() - u8["exact"][(e, i)]["image"].int()).abs()
        vs_exact.append((d.max().item(), d.float().mean().item()))
        if draft_factor(w, h, S) == 1:  # the fast path decodes in full too: only the resize's arithmetic differs
            full.append((img.int() - u8["fast"][(e, i)]["image"].int()).abs())
    assert len(full) >= 30
    full = torch.stack(full)
    # the same filter (antialiased bicubic, a=-0.5) and rounding between the passes, in float32 against the
    # CPU's uint8 kernel: 2 levels at most, nearly always equal (a single 2-D pass: up to 13 levels apart)
    assert full.max() <= 2 and (full == 0).float().mean() > 0.98, (full.max(), (full == 0).float().mean())
    # Pillow's resize (the exact path): a few levels at most (a box or flip gone wrong: tens of levels)
    assert max(m for m, _ in vs_exact) <= 6 and np.mean([a for _, a in vs_exact]) < 0.3, vs_exact


def test_resized_crop_rounds_between_its_passes_as_the_uint8_kernel():
    import torch.nn.functional as F

    rng = np.random.default_rng(5)
    worst, same = 0, []
    for w, h in ((151, 57), (51, 134), (366, 236), (202, 162)):
        img = torch.from_numpy(_photo(rng, w, h)).permute(2, 0, 1).contiguous()
        for size in (32, 48):
            want = F.interpolate(img[None], size=(size, size), mode="bicubic", antialias=True)[0]
            got = gpu_decode.resized_crop(img, (0, 0, h, w), size).round().clamp(0, 255).to(torch.uint8)
            d = (got.int() - want.int()).abs()
            worst, same = max(worst, d.max().item()), same + [(d == 0).float().mean().item()]
    assert worst <= 2 and min(same) > 0.97, (worst, same)


def test_resized_crop_of_the_output_size_is_the_crop():
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    out = gpu_decode.resized_crop(img, (5, 9, S, S), S)
    assert out.dtype == torch.float32 and torch.equal(out.round().to(torch.uint8), img[:, 5:5 + S, 9:9 + S])


def test_float32_output_is_the_normalised_uint8_output(folder, calls):
    keys = [(e, i) for e in range(2) for i in range(6)]
    a = _made(ImageFolderDataset(folder, S, 16, seed=2, decode="gpu", dtype=torch.uint8), keys)
    b = _made(ImageFolderDataset(folder, S, 16, seed=2, decode="gpu", dtype=torch.float32), keys)
    assert b["images"].dtype == torch.float32 and torch.equal(normalize_uint8(a["images"]), b["images"])


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "RGB-coded"])
def test_what_nvjpeg_is_not_given_gets_the_fast_path_in_the_worker(tmp_path, calls, mode):
    from PIL import Image

    img = Image.fromarray(_photo(np.random.default_rng(3), 300, 200)).convert(mode.split("-")[0])
    fmt = "JPEG" if mode in ("L", "CMYK", "RGB-coded") else "PNG"
    # RGB-coded: an Adobe marker with transform 0, no YCbCr conversion (not checked on nvJPEG: the CPU's)
    kw = dict(quality=90, keep_rgb=mode == "RGB-coded") if fmt == "JPEG" else {}
    img.save(tmp_path / f"x.{fmt.lower()}", fmt, **kw)
    gpu = ImageFolderDataset(str(tmp_path), S, 4, seed=6, decode="gpu", dtype=torch.uint8)
    fast = ImageFolderDataset(str(tmp_path), S, 4, seed=6, decode="fast", dtype=torch.uint8)
    exact = ImageFolderDataset(str(tmp_path), S, 4, seed=6, decode="exact", dtype=torch.uint8)
    for e in range(4):
        item = gpu[(e, 0)]
        want = fast[(e, 0)]
        if mode == "L":  # a greyscale JPEG goes to nvJPEG (decoded to RGB there): full decode, as the exact path
            assert "jpeg" in item
            assert (_made(gpu, [(e, 0)])["images"][0].int() - exact[(e, 0)]["image"].int()).abs().max() <= 6
        else:  # CMYK (Pillow's conversion) and other formats: the fast path's pixels, made in the worker
            assert set(item) == {"pixels", "noise"} and torch.equal(item["pixels"], want["image"])
            assert torch.equal(_made(gpu, [(e, 0)])["images"][0], want["image"])
        assert torch.equal(item["noise"], want["noise"])


def test_a_batch_mixing_jpegs_and_other_files_keeps_each_image_in_its_row(tmp_path, calls):
    """The device's images and the workers' pixels go back to their own rows, with their own noise."""
    from PIL import Image

    root = _jpeg_folder(tmp_path / "d", sizes=((120, 90), (90, 120), (100, 100)))
    Image.fromarray(_photo(np.random.default_rng(4), 110, 80)).save(os.path.join(root, "a.png"))  # sorted first
    gpu = ImageFolderDataset(root, S, 8, seed=5, decode="gpu", dtype=torch.uint8)
    keys = [(0, i) for i in range(len(gpu))]
    assert "pixels" in gpu[keys[0]] and all("jpeg" in gpu[k] for k in keys[1:])
    batch = _made(gpu, keys)
    for row, k in enumerate(keys):
        one = _made(gpu, [k])
        assert torch.equal(batch["images"][row], one["images"][0]) and torch.equal(batch["noise"][row], one["noise"][0])


def test_a_file_nvjpeg_rejects_gets_the_fast_path_pixels(folder, monkeypatch):
    gpu = ImageFolderDataset(folder, S, 16, seed=8, decode="gpu", dtype=torch.uint8)
    fast = ImageFolderDataset(folder, S, 16, seed=8, decode="fast", dtype=torch.uint8)
    rejected = open(gpu.files[2], "rb").read()
    seen = []

    def decode(data, device):  # e.g. a 12-bit or arithmetic-coded JPEG: the whole call fails
        seen.append(len(data))
        if any(d.numpy().tobytes() == rejected for d in data):
            raise RuntimeError("Error while decoding JPEG images: nvjpegDecode failed: 7")
        return pillow_decode(data, device)

    monkeypatch.setattr(gpu_decode, "decode_jpegs", decode)
    keys = [(1, i) for i in range(len(gpu))]
    batch = _made(gpu, keys)
    assert seen == [len(keys)] + [1] * len(keys)  # the batch, then one call per file to find the bad one
    assert batch["bad"] == [] and batch["images"].shape[0] == len(keys)
    assert torch.equal(batch["images"][2], fast[(1, 2)]["image"])
    other = _made(gpu, keys[:2] + keys[3:])["images"]  # the others as if the rejected file were not there
    assert torch.equal(torch.cat([batch["images"][:2], batch["images"][3:]]), other)


def test_files_nvjpeg_rejects_or_decodes_to_another_size_get_the_fast_paths_flips(folder, monkeypatch):
    """The fast path's pixels for each, flipped as drawn; a decode of another size than the header's is
    not cropped (its box would be off)."""
    gpu = ImageFolderDataset(folder, S, 16, seed=8, decode="gpu", dtype=torch.uint8)
    fast = ImageFolderDataset(folder, S, 16, seed=8, decode="fast", dtype=torch.uint8)
    keys = [(e, i) for e in range(2) for i in range(len(gpu))]
    assert 0 < sum(gpu[k]["flip"] for k in keys) < len(keys)

    def decode(data, device):  # a rejected batch, then each file decoded a row short
        if len(data) > 1:
            raise RuntimeError("Error while decoding JPEG images: nvjpegDecode failed: 7")
        return [img[:, 1:] for img in pillow_decode(data, device)]

    monkeypatch.setattr(gpu_decode, "decode_jpegs", decode)
    batch = _made(gpu, keys)
    assert batch["bad"] == [] and torch.equal(batch["images"], torch.stack([fast[k]["image"] for k in keys]))


def test_a_crop_the_cuda_resize_cannot_shrink_at_once_gets_the_fast_path_pixels(folder, calls, monkeypatch):
    """torch's CUDA antialiased bicubic refuses a pass that shrinks a side ~91x or more (at a small --input-size
    a large photo's crop): that file takes the fast path's pixels (the run went down with a traceback);
    another error of the resize is the run's."""
    gpu = ImageFolderDataset(folder, S, 16, seed=8, decode="gpu", dtype=torch.uint8)
    fast = ImageFolderDataset(folder, S, 16, seed=8, decode="fast", dtype=torch.uint8)
    keys = [(1, i) for i in range(len(gpu))]
    real, seen = gpu_decode.resized_crop, []

    def resize(image, b, size):
        seen.append(b)
        if len(seen) == 3:  # the third file's
            raise RuntimeError(resize.message)
        return real(image, b, size)

    monkeypatch.setattr(gpu_decode, "resized_crop", resize)
    resize.message = ("Provided interpolation parameters can not be handled with current algorithm implementation. "
                      "Please reduce the scale factor. Too much shared memory required: 90268 vs 49152")
    batch = _made(gpu, keys)
    assert batch["bad"] == [] and torch.equal(batch["images"][2], fast[keys[2]]["image"])
    assert torch.equal(torch.cat([batch["images"][:2], batch["images"][3:]]), _made(gpu, keys[:2] + keys[3:])["images"])
    seen.clear()
    resize.message = "CUDA error: an illegal memory access was encountered"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _made(gpu, keys)


def test_a_device_error_on_the_fast_path_fallback_is_the_runs_not_a_bad_file(folder, monkeypatch):
    """Only the CPU decode of a file nvJPEG rejects is guarded (a corrupt file is skipped and counted); moving
    its pixels to the device failing (out of memory, a CUDA error) was counted as an unreadable file."""
    gpu = ImageFolderDataset(folder, S, 16, seed=8, decode="gpu", dtype=torch.uint8)

    def reject(data, device):
        raise RuntimeError("Error while decoding JPEG images: nvjpegDecode failed: 7")

    class Pixels:
        def flip(self, dim):
            return self

        def to(self, device):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(gpu_decode, "decode_jpegs", reject)
    monkeypatch.setattr(gpu_decode, "crop_fast", lambda im, box, size: Pixels())
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _made(gpu, [(0, 0), (0, 1)])


def test_a_corrupt_file_after_the_workers_pixels_drops_its_own_row(tmp_path, calls):
    from PIL import Image

    root = _jpeg_folder(tmp_path / "d", sizes=((120, 90), (90, 120)))
    Image.fromarray(_photo(np.random.default_rng(4), 110, 80)).save(os.path.join(root, "a.png"))  # sorted first
    with open(os.path.join(root, "im0.jpg"), "rb") as f, open(os.path.join(root, "b.jpg"), "wb") as out:
        out.write(_bogus_huffman(f.read()))
    gpu = ImageFolderDataset(root, S, 8, seed=5, decode="gpu", dtype=torch.uint8)
    keys = [(0, i) for i in range(len(gpu))]  # a.png (the workers' pixels), b.jpg, im0.jpg, im1.jpg
    batch = _made(gpu, keys)
    assert len(batch["bad"]) == 1 and batch["bad"][0].split(":")[0].endswith("b.jpg")
    for row, k in enumerate([keys[0]] + keys[2:]):
        one = _made(gpu, [k])
        assert torch.equal(batch["images"][row], one["images"][0])
        assert torch.equal(batch["noise"][row], one["noise"][0])


def test_corrupt_files_are_skipped_and_counted_as_on_the_other_paths(tmp_path, calls):
    root = _corrupt_folder(tmp_path / "d")
    gpu = ImageFolderDataset(root, S, 8, decode="gpu", dtype=torch.uint8)
    fast = ImageFolderDataset(root, S, 8, decode="fast", dtype=torch.uint8)
    assert len(gpu) == 7
    for epoch in range(3):
        keys = [(epoch, i) for i in range(len(gpu))]
        loader = torch.utils.data.DataLoader(gpu, batch_size=7, sampler=keys, collate_fn=collate)
        batches = list(DeviceFeed(loader, CPU, decode=gpu.device_decode))
        assert len(batches) == 1
        b = batches[0]
        names = sorted(os.path.basename(x.split(":")[0]) for x in b["bad"])
        assert names == ["empty.png", "huffman.jpg", "noise.jpg", "truncated.jpg"], b["bad"]
        assert not any("BytesIO" in x for x in b["bad"]), b["bad"]  # the reasons read as on the CPU paths
        assert sorted(os.path.basename(x.split(":")[0]) for x in collate([fast[k] for k in keys])["bad"]) == names
        good = [k for k in keys if "bad" not in fast[k]]
        assert b["images"].shape == (3, 3, S, S) and b["noise"].shape[0] == 3
        for row, k in enumerate(good):  # the noise rows stay with their images
            assert torch.equal(b["noise"][row], fast[k]["noise"])
    # a batch whose every file is unreadable passes with no images, as on the other paths
    bad_keys = [(0, i) for i, f in enumerate(gpu.files) if os.path.basename(f) in ("huffman.jpg", "noise.jpg")]
    b = _made(gpu, bad_keys)
    assert b["images"] is None and b["noise"] is None and len(b["bad"]) == 2


def test_feed_refuses_a_deferred_batch_without_a_decoder(folder):
    gpu = ImageFolderDataset(folder, S, 4, decode="gpu")
    with pytest.raises(RuntimeError, match="no decode= given"):
        next(iter(DeviceFeed([_batch(gpu, [(0, 0)])], CPU)))


# -- reproducibility -----------------------------------------------------------------------------------
def test_same_samples_on_every_rank_worker_and_resume(folder, calls):
    ds = ImageFolderDataset(folder, S, 16, seed=7, decode="gpu", dtype=torch.uint8)
    ref = {(e, i): _made(ds, [(e, i)]) for e in (0, 1) for i in range(len(ds))}
    assert not torch.equal(ref[(0, 0)]["images"], ref[(1, 0)]["images"])
    seen = {}
    for rank in (0, 1):
        sampler = ResumableDistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(1)
        keys = list(iter(sampler))
        for pos in ((0, 2) if rank == 1 else (0,)):  # a mid-epoch resume on rank 1
            sampler.set_position(pos)
            loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2, collate_fn=collate)
            batches = list(DeviceFeed(loader, CPU, decode=ds.device_decode))
            images = torch.cat([b["images"] for b in batches])
            noise = torch.cat([b["noise"] for b in batches])
            for k, img, nz in zip(keys[pos // 2:], images, noise):
                assert torch.equal(img, ref[k]["images"][0]) and torch.equal(nz, ref[k]["noise"][0]), (rank, pos, k)
                seen[k] = True
    assert len(seen) == len(ds)


def test_synthetic_images_take_the_fast_path(calls):
    gpu = SyntheticDataset(4, S, 16, seed=2, decode="gpu", dtype=torch.uint8)
    fast = SyntheticDataset(4, S, 16, seed=2, decode="fast", dtype=torch.uint8)
    b = _made(gpu, [(0, i) for i in range(4)])
    assert torch.equal(b["images"], torch.stack([fast[(0, i)]["image"] for i in range(4)])) and calls == []  # nothing for nvJPEG


def test_train_resumes_bit_exactly_with_gpu_decode(tmp_path, calls):
    resumed_equals_straight(tmp_path, "gpu")
    assert calls and max(calls) == 3  # batches went through the batched decode


# -- availability, --decode auto, the command line -----------------------------------------------------
def test_unavailable_says_why(monkeypatch):
    why = gpu_decode.unavailable_reason("cpu")
    assert why.startswith("it needs a CUDA device (this run is on the cpu)")
    with monkeypatch.context() as m:  # a cuda device torch does not see (a CPU build, no driver)
        m.setattr(torch.cuda, "is_available", lambda: False)
        assert gpu_decode.unavailable_reason("cuda").startswith("it needs a CUDA device (torch sees none)")
    assert "torch sees none" not in why  # a CPU run: the one reason for the device
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert "torchvision (not installed" in why


def test_a_torchvision_that_does_not_decode_on_the_card_is_the_reason(monkeypatch):
    """Where CUDA and torchvision are present, a small JPEG decoded on the device decides, once per device
    ("cuda" is the current device, cuda:2 here, as a run's cuda:<local rank> is by then)."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(__version__="0.99"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    on_card = types.SimpleNamespace(shape=(3, 16, 16), device=torch.device("cuda"))
    seen = []

    def decoder(result):
        def decode(data, device):
            seen.append(str(device))
            if isinstance(result, Exception):
                raise result
            return [result if result is not None else pillow_decode(data, CPU)[0]]
        return decode

    for result, want in ((on_card, None), (None, "torchvision 0.99's decode_jpeg gave (3, 16, 16) on cpu"),
                         (RuntimeError("torchvision not compiled with nvJPEG support\nmore"),
                          "torchvision 0.99 cannot decode JPEGs on cuda:2 "
                          "(torchvision not compiled with nvJPEG support)"),
                         (RuntimeError(), "torchvision 0.99 cannot decode JPEGs on cuda:2 (RuntimeError)")):
        gpu_decode._torchvision_reason.cache_clear()
        monkeypatch.setattr(gpu_decode, "decode_jpegs", decoder(result))
        seen.clear()
        assert gpu_decode.unavailable_reason("cuda") == want and gpu_decode.unavailable_reason("cuda:2") == want
        assert seen == ["cuda:2"]  # decoded once (cached), on the device the run decodes on
    gpu_decode._torchvision_reason.cache_clear()


def test_every_nvjpeg_call_names_its_device_by_index(monkeypatch):
    """torchvision keeps one nvJPEG decoder, replaced (the old one never freed) by a call naming another
    device, "cuda" and "cuda:0" being two: the probe ("cuda") then a run's decodes (cuda:<rank>) made one."""
    import sys
    import types

    asked = []
    io_mod = types.SimpleNamespace(ImageReadMode=types.SimpleNamespace(RGB="RGB"),
                                   decode_jpeg=lambda data, mode, device: asked.append(device) or [])
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(io=io_mod))
    monkeypatch.setitem(sys.modules, "torchvision.io", io_mod)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for given in ("cuda", torch.device("cuda"), "cuda:1", torch.device("cuda", 3), "cpu"):
        gpu_decode.decode_jpegs([], given)
    assert asked == [torch.device("cuda", 1)] * 3 + [torch.device("cuda", 3), torch.device("cpu")]


def _encoded(**save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_photo(np.random.default_rng(5), 96, 64)).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def test_what_nvjpeg_is_given_reads_the_header_as_libjpeg():
    """YCbCr-coded or not as libjpeg decides it (jdapimin.c): a JFIF marker, else an Adobe marker's transform,
    else the component ids; and an end-of-image marker in the last bytes (trailing bytes are fine)."""
    from PIL import Image

    ycc, rgb = _encoded(), _encoded(keep_rgb=True)
    assert ycc[2:4] == b"\xff\xe0" and rgb[2:4] == b"\xff\xee" and rgb[6:11] == b"Adobe"
    app0, after_app0, after_app14 = ycc[2:20], 20, 18  # the segments Pillow writes: JFIF (16 bytes), Adobe (14)
    cases = {"JFIF, ids 1 2 3": (ycc, True), "no marker, ids 1 2 3": (ycc[:2] + ycc[after_app0:], True),
             "Adobe transform 0, ids R G B": (rgb, False),
             "Adobe transform 1 (YCbCr)": (rgb[:17] + b"\x01" + rgb[18:], True),
             "no marker, ids R G B": (rgb[:2] + rgb[after_app14:], False),
             "JFIF, ids R G B": (rgb[:2] + app0 + rgb[after_app14:], True)}
    for case, (data, ycbcr) in cases.items():
        with Image.open(io.BytesIO(data)) as img:
            assert img.mode == "RGB" and gpu_decode.ycbcr_or_grey(img) == ycbcr, case
            assert gpu_decode.gpu_decodable(img, data) == ycbcr, case
        if jpeg.simplejpeg is not None:  # libjpeg-turbo's own reading of the header
            assert jpeg.simplejpeg.decode_jpeg_header(data)[2] == ("YCbCr" if ycbcr else "RGB"), case
    with Image.open(io.BytesIO(ycc)) as img:
        assert gpu_decode.gpu_decodable(img, ycc + b"\0" * 40)  # a camera's trailing bytes
        assert not gpu_decode.gpu_decodable(img, ycc[:-2]) and not gpu_decode.gpu_decodable(img, ycc[:len(ycc) // 2])
        # an arithmetic-coded (SOF9) or lossless (SOF3) frame: Pillow's verdict, as on the CPU paths
        sof = ycc.index(b"\xff\xc0")
        for frame in (0xC9, 0xC3):
            assert not gpu_decode.gpu_decodable(img, ycc[:sof + 1] + bytes([frame]) + ycc[sof + 2:])


def test_decode_gpu_without_torchvision_or_cuda_is_one_line_exit_2(tmp_path):
    from maefast.train.config import TrainConfig, resolve_config
    from train_cli_helpers import TINY, cli

    with pytest.raises(ValueError, match=r"^--decode gpu \(JPEGs decoded by nvJPEG through torchvision\) cannot run "
                                         r"here: it needs a CUDA device \(this run is on the cpu\)"):
        resolve_config(TrainConfig(decode="gpu", model="mae_vit_tiny_test"), cuda=False)
    r = cli("train", *TINY, "--decode", "gpu", "--output-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maefast train: error: --decode gpu (JPEGs decoded by nvJPEG"), lines
    assert "--decode fast" in lines[0] and not os.path.exists(tmp_path / "run" / "checkpoint-last.pth")


def test_decode_auto_is_fast_until_a_record_says_gpu(monkeypatch):
    from maefast.train.config import TrainConfig, config_from_args, resolve_config

    assert config_from_args(["--decode", "auto"]).decode == "auto"
    assert config_from_args([]).decode == "fast"  # the default is unchanged
    for cuda in (False, True):
        cfg = resolve_config(TrainConfig(decode="auto", model="mae_vit_tiny_test"), cuda=cuda)
        assert cfg.decode == "fast"
        assert any(n.startswith("--decode auto: fast (the GPU decode has no record of being faster yet") for n in cfg.notes)
    assert resolve_config(TrainConfig(model="mae_vit_tiny_test"), cuda=False).notes == \
        resolve_config(TrainConfig(model="mae_vit_tiny_test", decode="fast"), cuda=False).notes  # no note unless auto
    # once a record shows it ahead: gpu where it runs, fast with the reason where it does not
    monkeypatch.setattr(gpu_decode, "GPU_DECODE_FASTER_ON_RECORD", True)
    assert gpu_decode.resolve_decode("auto", "cpu")[0] == "fast"
    assert "cannot run here: it needs a CUDA device" in gpu_decode.resolve_decode("auto", "cpu")[1]
    monkeypatch.setattr(gpu_decode, "unavailable_reason", lambda device: None)
    assert gpu_decode.resolve_decode("auto", "cuda")[0] == "gpu"
    assert gpu_decode.resolve_decode("exact", "cuda") == ("exact", None)


# -- the bench row -------------------------------------------------------------------------------------
def test_bench_data_gpu_row(tmp_path, calls, capsys):
    out = tmp_path / "r.json"
    rc = bench_data.main(["--images", "12", "--folder", str(tmp_path / "f"), "--workers", "1", "--batch", "4",
                          "--per-worker-images", "6", "--rounds", "1", "--size", "64", "--paths", "official,gpu",
                          "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["skipped"] == {} and set(res["loader"]) == {"official", "gpu"}
    assert res["loader"]["gpu"]["img_per_s"] > 0 and res["per_worker"]["gpu"]["vs_official"] is None
    files = bench_data.make_folder(str(tmp_path / "f"), 12)
    mean_file = np.mean([os.path.getsize(f) for f in files[:4]])  # the first batch: its JPEG files + noise
    assert res["loader"]["gpu"]["bytes_per_image"] == pytest.approx(mean_file + 196 * 4)
    assert res["gpu_stage"]["img_per_s"] > 0 and res["gpu_stage"]["images"] == 12
    d = res["difference_gpu"]
    assert d["samples"] == 12 and d["max_abs_255"] <= 4 and d["cpu_fallback_samples"] == 0
    assert "gpu half alone" in text and "gpu vs exact" in text and "difference" not in res  # no fast/exact row asked


def test_bench_data_gpu_row_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_data_gpu, "unavailable_reason", lambda: "it needs a CUDA device (this run is on the cpu)")
    args = ["--images", "12", "--folder", str(tmp_path / "f"), "--workers", "0", "--batch", "4",
            "--per-worker-images", "4", "--rounds", "1", "--size", "64", "--paths"]
    assert bench_data.main(args + ["fast,gpu"]) == 0
    assert "gpu: skipped (the GPU decode cannot run here: it needs a CUDA device" in capsys.readouterr().out
    # the gpu row alone would measure nothing: an error, before the folder is written
    with pytest.raises(ValueError, match="--paths gpu: the GPU decode cannot run here: it needs a CUDA device"):
        bench_data.main(args + ["gpu"] + ["--folder", str(tmp_path / "g")])
    assert not (tmp_path / "g").exists()


# -- on a GPU: nvJPEG itself ---------------------------------------------------------------------------
def _needs_nvjpeg():
    why = gpu_decode.unavailable_reason("cuda")
    if why is not None:
        pytest.skip(f"the GPU decode cannot run here: {why}")


@pytest.mark.cuda
def test_cuda_nvjpeg_pixels_close_to_libjpeg_turbo(folder):
    _needs_nvjpeg()
    files = ImageFolderDataset(folder, S, 4).files
    data = [torch.frombuffer(bytearray(open(f, "rb").read()), dtype=torch.uint8) for f in files]
    gpu = gpu_decode.decode_jpegs(data, torch.device("cuda"))
    cpu = pillow_decode(data, CPU)
    for f, a, b in zip(files, gpu, cpu):
        assert a.device.type == "cuda" and a.shape == b.shape, f
        d = (a.cpu().int() - b.int()).abs().float()
        # another IDCT and chroma upsampling: about a level on average (bench data reports the figure)
        assert d.mean() < 2.0, (f, d.mean().item(), d.max().item())


@pytest.mark.cuda
def test_cuda_nvjpeg_pixels_do_not_depend_on_the_batch(folder, tmp_path):
    """A sample is the same on every rank and world size only if nvJPEG decodes a file to the same
    pixels whatever else is in its batch (batches differ by rank; a failed batch is decoded file by
    file), and an RGB-coded JPEG (Adobe transform 0), which the loader keeps from nvJPEG, is shown
    here against Pillow so a record can say whether nvJPEG honours the marker."""
    _needs_nvjpeg()
    from PIL import Image

    cuda = torch.device("cuda")
    files = ImageFolderDataset(folder, S, 4).files
    data = [torch.frombuffer(bytearray(open(f, "rb").read()), dtype=torch.uint8) for f in files]
    whole = gpu_decode.decode_jpegs(data, cuda)
    for i, d in enumerate(data):
        alone = gpu_decode.decode_jpegs([d], cuda)[0]
        assert torch.equal(alone, whole[i]), files[i]
    assert torch.equal(gpu_decode.decode_jpegs(data[::-1], cuda)[-1], whole[0])
    buf = io.BytesIO()
    Image.fromarray(_photo(np.random.default_rng(5), 96, 64)).save(buf, "JPEG", quality=90, keep_rgb=True)
    rgb = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    got = gpu_decode.decode_jpegs([rgb], cuda)[0].cpu().int()
    want = pillow_decode([rgb], CPU)[0].int()
    print(f"RGB-coded JPEG: nvJPEG vs Pillow mean |diff| {(got - want).abs().float().mean().item():.2f} levels")


@pytest.mark.cuda
def test_cuda_stage_is_the_cpu_stage_within_a_level(folder, monkeypatch):
    _needs_nvjpeg()
    monkeypatch.setattr(gpu_decode, "decode_jpegs", pillow_decode)  # the same decoded pixels on both devices
    ds = ImageFolderDataset(folder, S, 16, seed=3, decode="gpu", dtype=torch.uint8)
    keys = [(e, i) for e in range(6) for i in range(len(ds))]
    a = _made(ds, keys, torch.device("cuda"))
    b = _made(ds, keys, CPU)
    assert a["images"].device.type == "cuda" and a["noise"].device.type == "cuda"
    assert (a["images"].cpu().int() - b["images"].int()).abs().max() <= 1  # float32 rounding of the two kernels
    assert torch.equal(a["noise"].cpu(), b["noise"])


@pytest.mark.cuda
def test_cuda_normalisation_is_the_cpus_bit_for_bit():
    """The float32 images of --decode gpu are normalised on the card (`normalize_uint8`): ToTensor + Normalize's
    CPU bits for every (value, channel) pair (a Python-number divisor is a reciprocal multiply on CUDA)."""
    u = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(1, 3, 16, 16)
    assert torch.equal(normalize_uint8(u.to("cuda")).cpu(), normalize_uint8(u))


@pytest.mark.cuda
def test_cuda_end_to_end_with_nvjpeg(tmp_path, folder):
    _needs_nvjpeg()
    cuda = torch.device("cuda")
    root = _corrupt_folder(tmp_path / "d")
    gpu = ImageFolderDataset(root, S, 8, decode="gpu", dtype=torch.uint8)
    keys = [(e, i) for e in range(3) for i in range(len(gpu))]
    loader = torch.utils.data.DataLoader(gpu, batch_size=7, sampler=keys, collate_fn=collate, num_workers=2,
                                         pin_memory=True)
    batches = list(DeviceFeed(loader, cuda, decode=gpu.device_decode))
    assert [len(b["bad"]) for b in batches] == [4, 4, 4]  # nvJPEG refuses the bogus Huffman table, as Pillow does
    exact = ImageFolderDataset(root, S, 8, decode="exact", dtype=torch.uint8)
    good = [k for k in keys if "bad" not in exact[k]]
    images = torch.cat([b["images"] for b in batches]).cpu()
    diffs = [(img.int() - exact[k]["image"].int()).abs().float().mean().item() for k, img in zip(good, images)]
    assert np.mean(diffs) < 2.0, diffs  # nvJPEG's decode + the float resize against Pillow's pixels
    # the stage again, one batch after the other on the side stream: the same result (no stream race)
    again = torch.cat([b["images"] for b in DeviceFeed(torch.utils.data.DataLoader(
        gpu, batch_size=7, sampler=keys, collate_fn=collate), cuda, decode=gpu.device_decode)]).cpu()
    assert torch.equal(images, again)
