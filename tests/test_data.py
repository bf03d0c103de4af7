"""The data path (`maefast.train.augment`, the datasets of `maefast.train.data`; the loader
benchmark's datasets too, `maefast.bench_data`, whose own tests are in tests/test_bench_data.py): the
exact path gives the official pixels; the fast path draws the same boxes and flips and stays close;
uint8 output normalises to the float32 output bit for bit; crop boxes follow torchvision's get_params
distribution; samples are a function of (seed, epoch, index) on every worker, rank and resume;
unreadable files are skipped and counted."""
import itertools
import math
import os

import numpy as np
import pytest
import torch

from maefast import bench_data
from maefast.train import augment, jpeg
from maefast.train.augment import PretrainTransform, draft_factor, normalize_uint8, random_resized_crop_params
from maefast.train.data import ImageFolderDataset, ResumableDistributedSampler, SyntheticDataset, collate

S = 32  # output side: small images still reach the 1/2, 1/4 and 1/8 decode scales (crops >= 64, 128, 256)
PATHS = [("exact", torch.float32), ("exact", torch.uint8), ("fast", torch.float32), ("fast", torch.uint8)]


def _photo(rng, w, h):
    """A textured RGB image (smooth colour + fine detail + grain), uint8 (h, w, 3)."""
    from PIL import Image

    low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.asarray(low).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    a += 25 * np.sin(xx * rng.uniform(0.05, 0.5) + yy * rng.uniform(0.05, 0.5))[..., None]
    a += rng.normal(0, 6, (h, w, 1))
    a[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 256, 3)  # a hard edge
    return np.clip(a, 0, 255).astype(np.uint8)


def _jpeg_folder(root, sizes=((300, 220), (220, 300), (160, 120), (640, 480), (90, 70), (300, 300)), seed=0):
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(_photo(rng, w, h)).save(os.path.join(root, f"im{i}.jpg"), quality=90)
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _jpeg_folder(tmp_path_factory.mktemp("jpegs"))


@pytest.fixture(params=["window", "simplejpeg", "pillow"])
def reader(request, monkeypatch):
    """The JPEG reader of the CPU paths (`maefast.train.jpeg`): each gives the same pixels."""
    if request.param == "window" and jpeg._load_window_reader() is None:
        pytest.skip(f"maefast._jpeg is not built: {jpeg.load_error}")
    if request.param == "simplejpeg" and jpeg.simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    monkeypatch.setattr(jpeg, "_READER", request.param)
    return request.param


def _items(ds, epoch=0):
    return [ds[(epoch, i)] for i in range(len(ds))]


# -- exactness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_uint8_output_normalises_to_the_float32_output(folder, decode):
    f32 = ImageFolderDataset(folder, S, 16, seed=3, decode=decode)
    u8 = ImageFolderDataset(folder, S, 16, seed=3, decode=decode, dtype=torch.uint8)
    for epoch in (0, 1):
        for a, b in zip(_items(f32, epoch), _items(u8, epoch)):
            assert a["image"].dtype == torch.float32 and b["image"].dtype == torch.uint8
            assert b["image"].shape == (3, S, S) and b["image"].is_contiguous()
            assert torch.equal(normalize_uint8(b["image"]), a["image"])
            assert torch.equal(a["noise"], b["noise"])
    batch = collate(_items(u8))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (len(u8), 3, S, S)
    assert batch["images"][0].nbytes * 4 == collate(_items(f32))["images"][0].nbytes
    torch.testing.assert_close(normalize_uint8(batch["images"]), collate(_items(f32))["images"], rtol=0, atol=0)


def test_denormalize_undoes_the_normalisation():
    """`maefast visualize` shows images through denormalize: it must give back ToTensor's x / 255."""
    x = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(3, 16, 16)
    y = augment.denormalize(normalize_uint8(x))
    torch.testing.assert_close(y, x.to(torch.float32) / 255, rtol=0, atol=1e-6)
    assert y.dtype == torch.float32 and y.shape == (3, 16, 16)


def test_normalize_uint8_is_torchvision_totensor_normalize():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    # ToTensor: float / 255; Normalize: (x - mean) / std, all float32 (torchvision's ops, restated)
    mean = torch.as_tensor(augment.IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(augment.IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)
    want = x.to(torch.float32).div(255).sub(mean).div(std)
    assert torch.equal(normalize_uint8(x), want)
    # and the numpy formula the dataset used before uint8 existed
    arr = x.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255.0
    arr = (arr - np.asarray(augment.IMAGENET_MEAN, np.float32)) / np.asarray(augment.IMAGENET_STD, np.float32)
    assert torch.equal(normalize_uint8(x), torch.from_numpy(arr).permute(0, 3, 1, 2))
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(x.float())
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        normalize_uint8(x[:, :2])


def test_normalize_uint8_divides_by_tensors_on_the_images_device():
    """A Python-number divisor is a reciprocal multiply on CUDA (ATen's BinaryDivTrueKernel), not ToTensor's
    division: v / 255 came out 1 ulp off for 126 of the 256 values in --decode gpu's float32 images (normalised
    on the card). Every division takes a tensor on the images' device (meta here, as a CUDA tensor would), which
    CUDA divides exactly; a card runs test_gpu_decode.py's test of the bits themselves."""
    from torch.utils._python_dispatch import TorchDispatchMode

    divisors = []

    class Divisions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.div, torch.ops.aten.div_):
                divisors.append(args[1])
            return func(*args, **(kwargs or {}))

    x = torch.zeros(2, 3, 4, 5, dtype=torch.uint8, device="meta")
    with Divisions():
        y = normalize_uint8(x)
    assert y.dtype == torch.float32 and y.device == x.device and len(divisors) == 2
    assert all(isinstance(d, torch.Tensor) and d.device == x.device for d in divisors), divisors


def _box_and_flip(path, seed, epoch, index):
    from PIL import Image

    rng = np.random.default_rng([seed, epoch, index])
    with Image.open(path) as im:
        box = random_resized_crop_params(im.width, im.height, rng)
    return box, bool(rng.random() < 0.5)


def test_exact_path_is_the_official_pipeline_bit_for_bit(folder, reader):
    from PIL import Image

    official = bench_data.OfficialPipeline(S)
    ds = ImageFolderDataset(folder, S, 16, seed=5, decode="exact")
    flips = 0
    for epoch in (0, 1, 2):
        for i, path in enumerate(ds.files):
            box, flip = _box_and_flip(path, 5, epoch, i)
            flips += flip
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")
            assert torch.equal(ds[(epoch, i)]["image"], official.apply(img, box, flip)), (path, epoch)
    assert 0 < flips < 3 * len(ds)


def test_fast_path_same_boxes_and_flips_scaled_decode_close_to_exact(folder, reader, monkeypatch):
    from PIL import JpegImagePlugin

    boxes, drafts = {"exact": [], "fast": []}, []
    real_params, real_draft, real_decode = (augment.random_resized_crop_params, JpegImagePlugin.JpegImageFile.draft,
                                            jpeg.decode)

    def spy_draft(self, mode, size):
        out = real_draft(self, mode, size)
        drafts.append(self.size)
        return out

    def spy_decode(data, width, height, k, window):
        out = real_decode(data, width, height, k, window)
        if k > 1:
            drafts.append(out.shape)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy_draft)
    monkeypatch.setattr(jpeg, "decode", spy_decode)
    ds = {d: ImageFolderDataset(folder, S, 16, seed=1, decode=d, dtype=torch.uint8) for d in boxes}
    scales, diffs = [], []
    for epoch in range(6):
        for i in range(len(ds["exact"])):
            out = {}
            for d in boxes:
                monkeypatch.setattr(augment, "random_resized_crop_params",
                                    lambda *a, _d=d, **k: boxes[_d].append(real_params(*a, **k)) or boxes[_d][-1])
                out[d] = ds[d][(epoch, i)]
            assert boxes["exact"][-1] == boxes["fast"][-1]
            assert torch.equal(out["exact"]["noise"], out["fast"]["noise"])  # the generator advanced alike
            _, _, h, w = boxes["fast"][-1]
            scales.append(draft_factor(w, h, S))
            diffs.append((out["exact"]["image"].double() - out["fast"]["image"].double()).abs().mean().item())
    scales, diffs = np.array(scales), np.array(diffs)
    assert {1, 2, 4} <= set(scales.tolist())  # the folder exercises the scaled decodes
    assert len(drafts) == (scales > 1).sum()  # draft is asked for exactly when the crop allows it
    # a box mapped wrongly onto the reduced image would be off by tens of levels; the resampling
    # differences are below a level at full scale and a few levels from the DCT-scaled decode
    # (measured here: 0.005 at full scale; 1.2 mean, 2.1 worst image scaled; 2.2 and 5.9 with the
    # box rounded to whole reduced pixels)
    assert diffs[scales == 1].mean() < 0.3 and diffs[scales == 1].max() < 1.0
    assert diffs[scales > 1].mean() < 1.6 and diffs[scales > 1].max() < 3.0


def test_fast_path_decodes_at_the_reduced_scale(folder):  # Pillow's reader (test_jpeg_reader: the other)
    from PIL import Image

    path = os.path.join(folder, "im3.jpg")  # 640x480
    box = (10, 20, 300, 400)  # crop >= 8 x 32 px
    assert draft_factor(400, 300, S) == 8
    with Image.open(path) as im:
        out = augment.crop_fast(im, box, S)
        assert im.size == (80, 60)  # decoded at 1/8
    with Image.open(path) as im:
        ref = augment.crop_exact(im, box, S)
    assert out.shape == ref.shape == (3, S, S) and out.dtype == torch.uint8
    assert (out.double() - ref.double()).abs().mean() < 3.0
    # an image already decoded is not re-decoded: full-scale path
    with Image.open(path) as im:
        im.load()
        assert torch.equal(augment.crop_fast(im, (10, 20, 30, 40), S), augment.crop_fast(im.copy(), (10, 20, 30, 40), S))


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_other_modes_and_formats(tmp_path, mode, reader):
    from PIL import Image

    rgb = Image.fromarray(_photo(np.random.default_rng(2), 300, 200))
    img = rgb.convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    for decode in ("exact", "fast"):
        ds = ImageFolderDataset(str(tmp_path), S, 4, decode=decode, dtype=torch.uint8)
        items = _items(ds) + _items(ds, 1)
        assert all(it["image"].shape == (3, S, S) for it in items)
    ex = ImageFolderDataset(str(tmp_path), S, 4, decode="exact", dtype=torch.uint8)
    fa = ImageFolderDataset(str(tmp_path), S, 4, decode="fast", dtype=torch.uint8)
    for e in range(4):
        d = (ex[(e, 0)]["image"].double() - fa[(e, 0)]["image"].double()).abs().mean()
        assert d < 3.0, (mode, e, d)


# -- the crop-box distribution -----------------------------------------------------------------------
def _ks(a, b) -> float:
    from scipy.stats import ks_2samp

    return ks_2samp(a, b).pvalue


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (64, 64), (300, 90)])
def test_crop_box_distribution_matches_torchvision_get_params(size):
    W, H = size
    n = 4000
    rng = np.random.default_rng(0)
    ours = np.array([random_resized_crop_params(W, H, rng) for _ in range(n)], dtype=np.float64)
    torch.manual_seed(0)
    theirs = np.array([bench_data.official_crop_params(W, H) for _ in range(n)], dtype=np.float64)

    def stats(b):
        top, left, h, w = b.T
        return {"area": h * w / (H * W), "log_aspect": np.log(w / h),
                "top": np.where(H > h, top / np.maximum(H - h, 1), 0.5),
                "left": np.where(W > w, left / np.maximum(W - w, 1), 0.5), "w": w, "h": h}

    a, b = stats(ours), stats(theirs)
    for k in a:
        p = _ks(a[k], b[k])
        assert p > 1e-3, (size, k, p)
    # a wrong scale or ratio range (e.g. 0.08-1, torchvision's default, or a linear ratio) is rejected
    rng = np.random.default_rng(1)
    wrong = np.array([random_resized_crop_params(W, H, rng, scale=(0.08, 1.0)) for _ in range(n)], np.float64)
    assert _ks(stats(wrong)["area"], b["area"]) < 1e-6
    assert (ours[:, 2] <= H).all() and (ours[:, 3] <= W).all() and (ours[:, :2] >= 0).all()


def test_draft_factor_at_its_boundaries():
    """The largest k in (8, 4, 2, 1) with the crop's smaller side at least k times the output side."""
    assert draft_factor(8 * S, 8 * S, S) == 8 and draft_factor(8 * S - 1, 9 * S, S) == 4
    assert draft_factor(4 * S, 5 * S, S) == 4 and draft_factor(9 * S, 4 * S - 1, S) == 2
    assert draft_factor(2 * S, 2 * S, S) == 2 and draft_factor(2 * S - 1, 500, S) == 1


@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_a_decompression_bomb_is_skipped_and_counted(tmp_path, decode, monkeypatch):
    """Pillow's DecompressionBombError (not an OSError) marks the file unreadable, as a corrupt one."""
    from PIL import Image

    root = _jpeg_folder(tmp_path / "d", sizes=((300, 300), (64, 48)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)  # 2x over it: an error, not a warning
    ds = ImageFolderDataset(root, S, 4, decode=decode, dtype=torch.uint8)
    items = [ds[(0, i)] for i in range(len(ds))]
    assert "DecompressionBombError" in items[0]["bad"] and "image" in items[1]
    assert len(collate(items)["bad"]) == 1


class _Draws:
    """A generator whose uniform draws are given (fractions of their range); integers() gives the low end."""

    def __init__(self, fractions):
        self.fractions = list(fractions)

    def uniform(self, lo, hi):
        return lo + (hi - lo) * self.fractions.pop(0)

    def integers(self, lo, hi):
        return lo


def test_crop_size_is_rounded_as_torchvision():
    """torchvision's get_params rounds the crop's sides (int(round(...))), it does not truncate: a half-pixel
    bias the distribution test cannot see."""
    rounded_up = 0
    for W, H in ((500, 375), (97, 61), (224, 224)):
        for a, r in ((0.3, 0.2), (0.77, 0.9), (0.51, 0.5), (0.12, 0.66)):
            area = W * H * (0.2 + 0.8 * a)  # scale (0.2, 1.0); log-uniform aspect in (3/4, 4/3)
            aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r)
            w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if round(w) <= W and round(h) <= H:
                assert random_resized_crop_params(W, H, _Draws([a, r]))[2:] == (round(h), round(w)), (W, H, a, r)
                rounded_up += (round(w) != int(w)) + (round(h) != int(h))
    assert rounded_up >= 4  # the cases tell rounding from truncation


def test_crop_box_fallback_is_torchvisions():
    # an extreme aspect ratio never fits in 10 tries: the central crop clamped to the ratio range
    # (top, left, h, w) written out from torchvision's get_params: in_ratio > 4/3: h = H, w = round(H * 4/3);
    # < 3/4: w = W, h = round(W / (3/4)); centred with // 2 (the bench's official pipeline reuses maefast's
    # fallback, so it alone would not pin it)
    # 11 px: 11 * 4/3 = 14.67 and 11 / (3/4) = 14.67 round to 15 (truncation: 14)
    for (W, H), want in (((1000, 10), (0, 493, 10, 13)), ((10, 1000), (493, 0, 13, 10)),
                         ((1000, 11), (0, 492, 11, 15)), ((11, 1000), (492, 0, 15, 11))):
        torch.manual_seed(0)
        assert random_resized_crop_params(W, H, np.random.default_rng(1)) == want
        assert bench_data.official_crop_params(W, H) == want


# -- reproducibility -----------------------------------------------------------------------------------
@pytest.mark.parametrize("decode,dtype", PATHS)
def test_samples_are_a_function_of_seed_epoch_index(folder, decode, dtype):
    ds = ImageFolderDataset(folder, S, 16, seed=7, decode=decode, dtype=dtype)
    again = ImageFolderDataset(folder, S, 16, seed=7, decode=decode, dtype=dtype)
    ref = {(e, i): ds[(e, i)] for e in (0, 1) for i in range(len(ds))}
    for key in reversed(list(ref)):  # another instance, another order
        got = again[key]
        assert torch.equal(got["image"], ref[key]["image"]) and torch.equal(got["noise"], ref[key]["noise"])
    assert not torch.equal(ref[(0, 0)]["noise"], ref[(1, 0)]["noise"])
    assert not torch.equal(ref[(0, 0)]["image"], ref[(1, 0)]["image"])
    other_seed = ImageFolderDataset(folder, S, 16, seed=8, decode=decode, dtype=dtype)
    assert not torch.equal(other_seed[(0, 0)]["noise"], ref[(0, 0)]["noise"])

    # two ranks, each with 2 data-loader workers, mid-epoch resume on rank 1: the same samples
    def loader(sampler, workers):
        return torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers, collate_fn=collate)

    seen = {}
    for rank in (0, 1):
        sampler = ResumableDistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(1)
        keys = list(iter(sampler))
        for pos in ((0, 2) if rank == 1 else (0,)):  # position in samples of the epoch (global batch 2)
            sampler.set_position(pos)
            images = torch.cat([b["images"] for b in loader(sampler, 2)])
            for k, img in zip(keys[pos // 2:], images):
                assert torch.equal(img, ref[k]["image"]), (rank, pos, k)
                seen[k] = True
    assert len(seen) == len(ds)


def test_an_index_alone_is_epoch_0():
    """ds[i] (a plain DataLoader's key) is the sample (epoch 0, i); a bool seed is refused as any non-int."""
    ds = SyntheticDataset(4, S, 16, seed=3, dtype=torch.uint8)
    for i in range(2):
        a, b = ds[i], ds[(0, i)]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["noise"], b["noise"])
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
        SyntheticDataset(4, S, 16, seed=True)
    # and each index its own image (not a few repeated): the set is fixed by (data_seed, index)
    imgs = [np.asarray(ds.load(i)).tobytes() for i in range(6)]
    assert len(set(imgs)) == 6


def test_an_index_out_of_range_is_an_index_error(tmp_path):
    """The synthetic set made images past its end (`for item in dataset` never stopped); a folder's raised
    from inside the handler of its own IndexError, a negative index or epoch numpy's "expected non-negative
    integer"."""
    from PIL import Image

    Image.new("RGB", (40, 30), (9, 0, 0)).save(tmp_path / "a.png")
    for ds in (SyntheticDataset(3, S, 4), ImageFolderDataset(str(tmp_path), S, 4, decode="gpu")):
        assert len(list(itertools.islice(ds, len(ds) + 5))) == len(ds)  # iteration ends at the end
        for key in (len(ds), -1, (2, len(ds))):
            with pytest.raises(IndexError, match=f"index -?[0-9]+ is out of range .* {len(ds)} images"):
                ds[key]
        with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
            ds[(-1, 0)]


def test_synthetic_dataset_both_paths(tmp_path):
    for decode in ("exact", "fast"):
        ds = SyntheticDataset(6, S, 16, seed=2, decode=decode)
        u8 = SyntheticDataset(6, S, 16, seed=2, decode=decode, dtype=torch.uint8)
        for i in range(6):
            assert torch.equal(normalize_uint8(u8[(0, i)]["image"]), ds[(0, i)]["image"])
    # exact and fast differ only by the resampler's rounding on these (full-scale) images
    a, b = SyntheticDataset(6, S, 16, decode="exact"), SyntheticDataset(6, S, 16, decode="fast")
    d = max((a[(0, i)]["image"] - b[(0, i)]["image"]).abs().max().item() for i in range(6))
    assert d < 0.1  # 0.1 normalised ~ 6 levels


# -- unreadable files ------------------------------------------------------------------------------------
def _corrupt_folder(root):
    """3 good JPEGs and 4 bad files, each failing in another place."""
    data = _jpeg_folder(root, sizes=((300, 220), (640, 480), (100, 80)))
    good = open(os.path.join(data, "im1.jpg"), "rb").read()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])  # no end-of-image marker: the worker's decode fails
    (root / "noise.jpg").write_bytes(os.urandom(300))  # not an image: the header fails
    (root / "empty.png").write_bytes(b"")
    (root / "huffman.jpg").write_bytes(_bogus_huffman(good))
    return data


def _bogus_huffman(jpeg: bytes) -> bytes:
    """`jpeg` with its first Huffman table's code counts all 255: header and end marker fine, the decode
    fails (on the device and the CPU)."""
    bogus = bytearray(jpeg)
    at = bogus.find(b"\xff\xc4")
    bogus[at + 5: at + 21] = b"\xff" * 16
    return bytes(bogus)


def test_corrupt_files_are_skipped_and_counted_on_each_path(tmp_path, reader):
    root = _corrupt_folder(tmp_path / "d")
    for decode, dtype in PATHS:
        ds = ImageFolderDataset(root, S, 8, decode=decode, dtype=dtype)
        assert len(ds) == 7
        for epoch in range(4):  # some epochs draw crops the 1/8 decode takes
            items = _items(ds, epoch)
            bad = [it["bad"] for it in items if "bad" in it]
            assert len(bad) == 4, (decode, bad)
            assert all(any(name in b for b in bad) for name in ("truncated.jpg", "noise.jpg", "huffman.jpg"))
            batch = collate(items)
            assert batch["images"].shape == (3, 3, S, S) and batch["images"].dtype == dtype
            assert len(batch["bad"]) == 4


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_called_an_image_is_skipped_not_waited_on(tmp_path):
    """A FIFO named b.jpg (or a link to a device) is listed by its name; reading it blocked the worker, and the
    run, forever. It is an unreadable file now: skipped and counted, on every path."""
    root = _jpeg_folder(tmp_path / "d", sizes=((90, 70),))
    os.mkfifo(os.path.join(root, "b.jpg"))
    for decode in ("exact", "fast"):
        items = _items(ImageFolderDataset(root, S, 8, decode=decode))
        assert [it.get("bad") for it in items] == [  # (b.jpg sorts before im0.jpg)
            f"{os.path.join(root, 'b.jpg')}: OSError: not a regular file (a pipe, socket or device)", None], items


def test_a_file_gone_or_a_dangling_link_is_named_as_a_path(tmp_path):
    """The reason a file is skipped names it as the str path it is: the paths live as numpy bytes, and an
    OSError of opening one showed "np.bytes_(b'...')" in the run's skipped-file messages."""
    root = _jpeg_folder(tmp_path / "d", sizes=((90, 70),))
    os.symlink("nowhere.jpg", os.path.join(root, "dangling.jpg"))
    (tmp_path / "d" / "gone.png").write_bytes(b"")
    listed = ImageFolderDataset(root, S, 8).files
    os.remove(os.path.join(root, "gone.png"))  # removed after the listing (a folder changed during a run)
    want = [f"{p}: FileNotFoundError: [Errno 2] No such file or directory: {p!r}" for p in listed[:2]]
    for decode in ("exact", "fast"):
        ds = ImageFolderDataset(root, S, 8, decode=decode)
        ds.files = listed
        assert [it.get("bad") for it in _items(ds)] == [*want, None]
        with pytest.raises(FileNotFoundError) as err:
            ds.load(0)
        assert err.value.filename == listed[0]


def test_options_are_checked(folder):
    with pytest.raises(ValueError, match="decode must be one of exact, fast, gpu, got 'auto'"):
        ImageFolderDataset(folder, S, 4, decode="auto")  # auto is the command line's, resolved there
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.uint8, got torch.float16"):
        PretrainTransform(S, dtype=torch.float16)
    # each was accepted, then failed every sample inside the dataset (counted as unreadable files),
    # or aliased another sample's draws (seed >= 2**32), or yielded fewer samples than len() said
    for kw, err, match in ((dict(size=0), ValueError, "size must be an int >= 1"),
                           (dict(size=224.7), ValueError, "size must be an int"),
                           (dict(scale=(0.2,)), ValueError, r"scale must be two numbers \(lo, hi\)"),
                           (dict(ratio=(0, 1)), ValueError, "ratio must be two numbers"),
                           (dict(scale=(1.0, 0.2)), ValueError, "0 < lo <= hi"),
                           (dict(hflip=7), ValueError, r"hflip must be a probability in \[0, 1\]")):
        with pytest.raises(err, match=match):
            PretrainTransform(**kw)
    assert (PretrainTransform(hflip=False).hflip, PretrainTransform(hflip=True).hflip) == (0.0, 1.0)
    for kw, match in ((dict(seed=-1), r"seed must be an int in \[0, 2\*\*32\)"), (dict(seed=2 ** 32), "seed must be"),
                      (dict(num_patches=-1), "num_patches must be an int >= 0"), (dict(input_size=0), "size must be"),
                      # numpy refused a negative data_seed inside every sample, each counted as an unreadable file;
                      # a fractional size was cut to an int
                      (dict(data_seed=-1), "data_seed must be an int >= 0"), (dict(size=2.5), "^size must be an int")):
        with pytest.raises(ValueError, match=match):
            SyntheticDataset(**{**dict(size=4, input_size=S, num_patches=4), **kw})
    for kw, match in ((dict(global_batch=-4, num_replicas=2), "global_batch must be an int >= 1"),
                      (dict(global_batch=0), "global_batch must be an int >= 1"),
                      (dict(num_replicas=0), "num_replicas must be an int >= 1"),
                      (dict(global_batch=3, num_replicas=2), "not a multiple of num_replicas")):
        with pytest.raises(ValueError, match=match):
            ResumableDistributedSampler(range(10), **kw)
    from maefast.train.config import TrainConfig, config_from_args, resolve_config

    assert config_from_args([]).decode == augment.DEFAULT_DECODE
    assert config_from_args(["--decode", "exact"]).decode == "exact"
    assert config_from_args(["--decode", "gpu"]).decode == "gpu"
    with pytest.raises(SystemExit):
        config_from_args(["--decode", "nvjpeg"])
    with pytest.raises(ValueError, match="--decode"):
        resolve_config(TrainConfig(decode="draft"), cuda=False)


def test_range_and_flip_edges_are_checked():
    """scale and ratio: two finite non-bool numbers with 0 < lo <= hi (lo == hi allowed: a fixed crop area
    or shape); hflip a probability in [0, 1]. Unchecked, an infinite bound, a bool or a negative hflip would be
    accepted and fail every sample (inf: counted as unreadable) or quietly never flip."""
    t = PretrainTransform(S, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # a whole-image square crop of a square
    assert (t.scale, t.ratio) == ((1.0, 1.0), (1.0, 1.0))
    assert random_resized_crop_params(40, 40, np.random.default_rng(0), t.scale, t.ratio) == (0, 0, 40, 40)
    for kw, match in ((dict(scale=(0.2, math.inf)), "scale must be two numbers"),
                      (dict(ratio=(0.75, math.inf)), "ratio must be two numbers"),
                      (dict(scale=(0.5, True)), "scale must be two numbers"),
                      (dict(ratio=(True, True)), "ratio must be two numbers"),
                      (dict(hflip=-0.5), r"hflip must be a probability in \[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            PretrainTransform(S, **kw)


def test_the_flip_is_drawn_whatever_its_probability():
    """Box, then flip, then (in the datasets) the noise: the flip's draw is made at hflip 0 and 1 too, so
    what follows in the generator does not depend on hflip."""
    from PIL import Image

    img = Image.fromarray(_photo(np.random.default_rng(0), 60, 50))
    after = []
    for p in (0.0, 0.5, 1.0):
        rng = np.random.default_rng(3)
        PretrainTransform(S, hflip=p, dtype=torch.uint8)(img, rng)
        after.append(rng.random())
    assert after[0] == after[1] == after[2]


def resumed_equals_straight(tmp_path, decode: str) -> None:
    """A 4-step run on a JPEG folder, once straight and once stopped after 2 steps and resumed: the
    same weights bit for bit."""
    from maefast.train import TrainConfig, load_checkpoint, train

    data = _jpeg_folder(tmp_path / "data", sizes=[(140 + 13 * i, 100 + 7 * i) for i in range(12)])
    cfg = TrainConfig(model="mae_vit_tiny_test", data=data, batch_size=3, epochs=1, lr=1e-3, progress=False,
                      workers=0, device="cpu", plot=False, export=False, decode=decode)
    train(cfg, output_dir=str(tmp_path / "straight"))
    train(cfg, output_dir=str(tmp_path / "split"), max_steps=2)
    train(cfg, output_dir=str(tmp_path / "split"), resume=str(tmp_path / "split" / "checkpoint-last.pth"))
    a = load_checkpoint(str(tmp_path / "straight" / "checkpoint-last.pth"))
    b = load_checkpoint(str(tmp_path / "split" / "checkpoint-last.pth"))
    assert a["step"] == b["step"] == 4 and a["config"]["decode"] == decode
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_train_resumes_bit_exactly_on_a_jpeg_folder(tmp_path):
    resumed_equals_straight(tmp_path, "fast")
