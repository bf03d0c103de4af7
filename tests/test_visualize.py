"""`maefast visualize`: the PNG grid (sizes, panel contents), norm_pix_loss un-normalisation, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from maefast import visualize as vis
from maefast.models import create_model
from maefast.reference.patchify import patchify
from maefast.train.checkpoint import atomic_save, encoder_state_dict
from maefast.train.data import SyntheticDataset, center_transform


def _checkpoint(tmp_path, norm_pix_loss=False):
    model = create_model("mae_vit_tiny_test", norm_pix_loss=norm_pix_loss)
    path = tmp_path / f"ck_{int(norm_pix_loss)}.pth"
    atomic_save({"model": model.state_dict(), "model_name": "mae_vit_tiny_test",
                 "model_kwargs": {"img_size": 32, "norm_pix_loss": norm_pix_loss}}, str(path))
    return str(path)


def _image(tmp_path, i=0, size=57):
    path = tmp_path / f"img{i}.png"
    SyntheticDataset(10, size, 4, data_seed=11).load(i).resize((size + 9, size)).save(path)
    return str(path)


def test_out_never_replaces_an_input_nor_an_existing_file_unasked(tmp_path):
    ck, img = _checkpoint(tmp_path), _image(tmp_path)
    saved = {p: open(p, "rb").read() for p in (ck, img)}
    for out in (ck, img):  # even with --overwrite
        with pytest.raises(ValueError, match="is one of the inputs"):
            vis.visualize(ck, img, out, overwrite=True)
    with pytest.raises(ValueError, match="is a folder"):
        vis.visualize(ck, img, str(tmp_path))
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's")
    with pytest.raises(ValueError, match="exists: pass --overwrite"):
        vis.visualize(ck, img, str(out))
    assert out.read_bytes() == b"the user's" and all(open(p, "rb").read() == v for p, v in saved.items())
    with pytest.raises(ValueError, match="the folder .* does not exist"):  # before the model runs
        vis.visualize(ck, img, str(tmp_path / "no" / "such.png"))
    for bad in (-2 ** 63 - 1, 2 ** 64, 1.5):
        with pytest.raises(ValueError, match="--seed must be an int"):
            vis.visualize(ck, img, str(out), seed=bad, overwrite=True)
    vis.visualize(ck, img, str(out), overwrite=True)
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_out_is_written_in_the_format_its_name_ends_with(tmp_path, monkeypatch):
    """--out x.jpg is a JPEG (it held PNG bytes), .webp/.bmp/.tif the same, a name without an ending a PNG; an
    ending no image format has is refused before the checkpoint is read, and nothing is written."""
    ck, img = _checkpoint(tmp_path), _image(tmp_path)
    for name, fmt in (("g.jpg", "JPEG"), ("g.JPEG", "JPEG"), ("g.webp", "WEBP"), ("g.bmp", "BMP"), ("g.tiff", "TIFF"),
                      ("grid", "PNG")):
        vis.visualize(ck, img, str(tmp_path / name))
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt, name
    monkeypatch.setattr(vis, "load_model", lambda *a: pytest.fail("the checkpoint was read"))
    for name in ("g.txt", "g.gif", "g."):
        with pytest.raises(ValueError, match=f"--out .*{name}.* is no image format written here"):
            vis.visualize(ck, img, str(tmp_path / name))
        assert not (tmp_path / name).exists()
    monkeypatch.delitem(Image.SAVE, "WEBP")  # a Pillow built without WebP's encoder: said before any work
    with pytest.raises(ValueError, match="this Pillow cannot write WEBP"):
        vis.visualize(ck, img, str(tmp_path / "h.webp"))


def test_out_through_a_link_replaces_the_file_it_points_to(tmp_path):
    """--out naming a symbolic link with --overwrite: the grid goes to the file it points to, the link stays
    a link (as every --json; the link itself was replaced by a file)."""
    ck, img = _checkpoint(tmp_path), _image(tmp_path)
    target, link = tmp_path / "real.png", tmp_path / "link.png"
    target.write_bytes(b"old")
    link.symlink_to(target)
    vis.visualize(ck, img, str(link), overwrite=True)
    assert link.is_symlink()
    with Image.open(target) as im:
        assert im.format == "PNG"


def test_grid_png_size_and_panels(tmp_path):
    ck, img = _checkpoint(tmp_path), _image(tmp_path)
    out = str(tmp_path / "grid.png")
    res = vis.visualize(ck, [img, _image(tmp_path, 1)], out, mask_ratio=0.75, seed=3)
    panel = res["panel"]
    assert panel == (224, 224)  # 32 px upscaled 7x
    with Image.open(out) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("RGB")).astype(int)
    assert arr.shape[1] == 4 * panel[1] + 5 * vis.MARGIN
    assert arr.shape[0] > 2 * (panel[0] + vis.TITLE_H)
    assert len(res["boxes"]) == 2 and all(len(r) == 4 for r in res["boxes"])

    def crop(box):
        x0, y0, x1, y1 = box
        return arr[y0:y1, x0:x1]

    orig, masked, rec, pasted = (crop(b) for b in res["boxes"][0])
    # the original panel is the model's input (center crop), upscaled with nearest
    x = center_transform(Image.open(img).convert("RGB"), 32)
    ref = np.asarray(vis._to_pil(x, panel)).astype(int)
    assert np.array_equal(orig, ref)
    # 8 px patches at 7x: 56 px blocks; masked blocks are one flat colour (the ImageNet mean)
    blocks = [(r, c) for r in range(4) for c in range(4)]
    flat = [(r, c) for r, c in blocks
            if (masked[r * 56:(r + 1) * 56, c * 56:(c + 1) * 56] == masked[r * 56, c * 56]).all()]
    assert len(flat) == 12  # 75% of 16 patches
    for r, c in blocks:
        sl = np.s_[r * 56:(r + 1) * 56, c * 56:(c + 1) * 56]
        if (r, c) in flat:
            assert np.array_equal(pasted[sl], rec[sl])  # masked: the reconstruction
        else:
            assert np.array_equal(pasted[sl], orig[sl]) and np.array_equal(masked[sl], orig[sl])  # visible
    assert np.abs(rec - orig).mean() > 5  # an untrained model reconstructs badly
    assert res["losses"][0] > 0 and "pixel-loss model" in " ".join(res["caption"])


def test_caption_and_unnormalisation_for_norm_pix_loss(tmp_path):
    ck, img = _checkpoint(tmp_path, norm_pix_loss=True), _image(tmp_path)
    res = vis.visualize(ck, img, str(tmp_path / "npl.png"))
    text = " ".join(res["caption"])
    assert "norm_pix_loss" in text and "ORIGINAL image" in text
    with Image.open(tmp_path / "npl.png") as im:
        assert im.size[0] == 4 * res["panel"][1] + 5 * vis.MARGIN


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_perfect_prediction_reconstructs_the_original(norm_pix_loss):
    """A model that predicts its loss target exactly must show the original image back."""
    model = create_model("mae_vit_tiny_test", norm_pix_loss=norm_pix_loss).eval()
    x = torch.randn(3, 32, 32)
    original = model.forward

    def oracle(imgs, mask_ratio=0.75, noise=None):
        loss, pred, mask = original(imgs, mask_ratio, noise)
        t = patchify(imgs, 8)
        if norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        return loss, t, mask

    model.forward = oracle
    out = vis.reconstruct(model, x, 0.75, seed=0)
    torch.testing.assert_close(out["reconstruction"], x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pasted"], x, atol=1e-4, rtol=1e-4)
    assert out["mask"].mean().item() == pytest.approx(0.75)


def test_low_contrast_patches_unnormalise_with_the_losss_eps():
    """norm_pix_loss: the target is (x - mean) / sqrt(var + 1e-6); on patches of variance ~1e-4 another eps
    shows (a perfect prediction must still give the image back)."""
    model = create_model("mae_vit_tiny_test", norm_pix_loss=True).eval()
    x = 0.3 + 0.01 * torch.randn(3, 32, 32)
    original = model.forward

    def oracle(imgs, mask_ratio=0.75, noise=None):
        loss, _, mask = original(imgs, mask_ratio, noise)
        t = patchify(imgs, 8)
        return loss, (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5, mask

    model.forward = oracle
    torch.testing.assert_close(vis.reconstruct(model, x, 0.75, seed=0)["reconstruction"], x, atol=1e-5, rtol=1e-5)


def test_errors(tmp_path, capsys):
    model = create_model("mae_vit_tiny_test")
    enc = tmp_path / "enc.pth"
    atomic_save({"model": encoder_state_dict(model.state_dict())}, str(enc))
    img = _image(tmp_path)
    with pytest.raises(ValueError, match="no decoder"):
        vis.visualize(str(enc), img, str(tmp_path / "x.png"))
    ck = _checkpoint(tmp_path)
    assert vis.main(["--checkpoint", ck, "--image", str(tmp_path / "missing.png"), "--out",
                     str(tmp_path / "x.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert vis.main(["--checkpoint", ck, "--image", img, "--out", str(tmp_path / "ok.png"), "--seed", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(tmp_path / "ok.png") as im:
        assert im.size[0] == 4 * 224 + 5 * vis.MARGIN


def test_an_interrupted_write_keeps_the_previous_png(tmp_path, monkeypatch):
    """--overwrite replaces the file atomically: a write that fails half-way (a full disk) leaves the old one."""
    import errno

    ck, img = _checkpoint(tmp_path), _image(tmp_path)
    out = tmp_path / "keep.png"
    vis.visualize(ck, img, str(out))
    before = out.read_bytes()

    def half_written(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Image.Image, "save", half_written)
    with pytest.raises(ValueError, match="cannot write --out"):
        vis.visualize(ck, img, str(out), seed=1, overwrite=True)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))  == []


def test_an_image_too_large_for_pillow_is_a_user_error(tmp_path, monkeypatch):
    ck, img = _checkpoint(tmp_path), _image(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 66x57 image is now a "decompression bomb"
    with pytest.raises(ValueError, match="cannot read image .*exceeds limit"):
        vis.visualize(ck, img, str(tmp_path / "out.png"))


def test_rectangular_model(tmp_path):
    """A model of 32x48 images: the image is cropped to 32x48 (not 32x32), panels keep the aspect."""
    model = create_model("mae_vit_tiny_test", img_size=(32, 48))
    ck = tmp_path / "rect.pth"
    atomic_save({"model": model.state_dict(), "model_name": "mae_vit_tiny_test",
                 "model_kwargs": {"img_size": (32, 48)}}, str(ck))
    img = _image(tmp_path)
    res = vis.visualize(str(ck), img, str(tmp_path / "rect.png"))
    assert res["panel"] == (224, 336)  # 7x
    x0, y0, x1, y1 = res["boxes"][0][0]
    assert (y1 - y0, x1 - x0) == (224, 336)
    x = center_transform(Image.open(img).convert("RGB"), (32, 48))
    assert x.shape == (3, 32, 48)
    with Image.open(tmp_path / "rect.png") as im:
        arr = np.asarray(im.convert("RGB")).astype(int)
    assert np.array_equal(arr[y0:y1, x0:x1], np.asarray(vis._to_pil(x, (224, 336))).astype(int))


def test_square_center_crop_unchanged():
    """center_transform(img, S) and (S, S) are the square rule it always had: the short side resized to S
    (bicubic), then the centre crop."""
    from maefast.train.augment import to_normalized_tensor

    img = SyntheticDataset(4, 57, 4, data_seed=3).load(1).resize((70, 57))
    scale = 32 / min(img.width, img.height)  # the rule before rectangles
    w, h = max(32, round(img.width * scale)), max(32, round(img.height * scale))
    left, top = (w - 32) // 2, (h - 32) // 2
    want = to_normalized_tensor(img.resize((w, h), Image.BICUBIC).crop((left, top, left + 32, top + 32)))
    assert torch.equal(center_transform(img, 32), want) and torch.equal(center_transform(img, (32, 32)), want)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_center_transform_converts_to_rgb_before_resizing(mode):
    """It converted after the resize: Pillow resizes a palette image by nearest neighbour whatever the filter,
    an RGBA one premultiplied by its alpha (up to 3 normalised units off the RGB image's view, silently)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    img = img if mode == "RGBA" else img.convert("RGB").convert(mode)
    for size in (32, (24, 40)):
        assert torch.equal(center_transform(img, size), center_transform(img.convert("RGB"), size)), (mode, size)


def test_rows_are_the_checkpoints_model_on_mask_seed_plus_row(tmp_path):
    """Row i is the checkpoint's own weights on the mask of torch.Generator seeded seed + i (the caption's
    'mask seeds'): its loss is the model's, recomputed here without visualize's code."""
    ck, imgs = _checkpoint(tmp_path), [_image(tmp_path, 0), _image(tmp_path, 1)]
    res = vis.visualize(ck, imgs, str(tmp_path / "rows.png"), mask_ratio=0.5, seed=5)
    model = create_model("mae_vit_tiny_test").eval()
    model.load_state_dict(torch.load(ck, weights_only=True)["model"])
    for i, path in enumerate(imgs):
        x = center_transform(Image.open(path).convert("RGB"), 32).unsqueeze(0)
        noise = torch.rand(1, 16, generator=torch.Generator().manual_seed(5 + i))
        with torch.no_grad():
            loss = model(x, mask_ratio=0.5, noise=noise)[0]
        assert res["losses"][i] == pytest.approx(loss.item(), rel=1e-5)
    (ph, pw), m = res["panel"], vis.MARGIN  # panels apart by MARGIN, rows by MARGIN + a title line
    for r, row in enumerate(res["boxes"]):
        assert [b[0] for b in row] == [m + c * (pw + m) for c in range(4)]
        assert {b[1] for b in row} == {m + vis.TITLE_H + r * (vis.TITLE_H + ph + m)}


def test_official_checkpoint_with_args_and_norm_pix_loss_override(tmp_path, capsys):
    """An official training checkpoint records its model and norm_pix_loss in ``args`` (an argparse
    Namespace); --norm-pix-loss / --no-norm-pix-loss override what the checkpoint says."""
    import argparse

    model = create_model("mae_vit_tiny_test", norm_pix_loss=True)
    ck = str(tmp_path / "official.pth")
    atomic_save({"model": model.state_dict(), "args": argparse.Namespace(model="mae_vit_tiny_test",
                                                                           norm_pix_loss=True)}, ck)
    img = _image(tmp_path)
    res = vis.visualize(ck, img, str(tmp_path / "a.png"))
    assert res["caption"][0].startswith("mae_vit_tiny_test") and "norm_pix_loss model" in res["caption"][1]
    res = vis.visualize(ck, img, str(tmp_path / "b.png"), norm_pix_loss=False)
    assert "pixel-loss model" in res["caption"][1]
    plain = _checkpoint(tmp_path)  # records norm_pix_loss False; the flag changes the loss main prints
    npl = vis.visualize(plain, img, str(tmp_path / "d.png"), norm_pix_loss=True)
    assert npl["caption"][1].startswith("norm_pix")
    capsys.readouterr()
    assert vis.main(["--checkpoint", plain, "--image", img, "--out", str(tmp_path / "c.png"), "--norm-pix-loss"]) == 0
    assert f"(loss {npl['losses'][0]:.4f})" in capsys.readouterr().out


def test_refusals_before_any_work(tmp_path):
    ck, img = _checkpoint(tmp_path), _image(tmp_path)
    out = str(tmp_path / "o.png")
    with pytest.raises(ValueError, match="contradicts"):  # a name no model has contradicts the recorded one too
        vis.visualize(ck, img, out, model_name="no_such_model")
    with pytest.raises(ValueError, match="images"):
        vis.visualize(ck, [], out)
    for seed, images in ((True, [img]), (2 ** 64 - 1, [img, img])):  # image i draws seed + i: in range too
        with pytest.raises(ValueError, match="--seed must be an int"):
            vis.visualize(ck, images, out, seed=seed)
    with pytest.raises(ValueError, match="--mask-ratio"):  # 16 patches: 0.95 keeps none
        vis.visualize(ck, img, out, mask_ratio=0.95)
    assert not (tmp_path / "o.png").exists()
    assert vis.visualize(ck, img, out, seed=-2 ** 63)["losses"][0] > 0  # torch.Generator's range


def test_a_checkpoint_missing_a_weight_is_named(tmp_path):
    model = create_model("mae_vit_tiny_test")
    state = model.state_dict()
    del state["decoder_pred.bias"]
    ck = str(tmp_path / "partial.pth")
    atomic_save({"model": state, "model_name": "mae_vit_tiny_test"}, ck)
    with pytest.raises(ValueError, match="1 missing .*decoder_pred.bias"):
        vis.visualize(ck, _image(tmp_path), str(tmp_path / "o.png"))


def test_panel_pixels_are_the_image_pixels():
    """_to_pil undoes the normalisation to the very 0-255 values (a rectangle keeps its orientation), and
    clamps what a reconstruction overshoots instead of wrapping it around."""
    from maefast.train.augment import to_normalized_tensor

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = to_normalized_tensor(Image.fromarray(pixels))
    assert np.array_equal(np.asarray(vis._to_pil(x, (5, 7))), pixels)
    assert np.array_equal(np.asarray(vis._to_pil(x, (10, 14))), pixels.repeat(2, 0).repeat(2, 1))
    assert (np.asarray(vis._to_pil(torch.full((3, 2, 2), 9.0), (2, 2))) == 255).all()
    assert (np.asarray(vis._to_pil(torch.full((3, 2, 2), -9.0), (2, 2))) == 0).all()


def test_panels_are_at_least_panel_min_pixels(tmp_path):
    """48 px images: 224 / 48 rounds up to 5, 240 px panels (not 4, 192 px)."""
    model = create_model("mae_vit_tiny_test", img_size=48)
    ck = str(tmp_path / "48.pth")
    atomic_save({"model": model.state_dict(), "model_name": "mae_vit_tiny_test", "model_kwargs": {"img_size": 48}},
                ck)
    res = vis.visualize(ck, _image(tmp_path), str(tmp_path / "o.png"))
    assert res["panel"] == (240, 240) and min(res["panel"]) >= vis.PANEL_MIN


def test_checkpoint_without_model_kwargs_takes_the_image_size_of_its_weights(tmp_path):
    """A checkpoint that names its model but records no model_kwargs (an official one, a hand-made one): the image
    size is read off pos_embed and the patch size (48 px here, not the named model's default 32)."""
    model = create_model("mae_vit_tiny_test", img_size=48)
    ck = str(tmp_path / "48.pth")
    atomic_save({"model": model.state_dict(), "model_name": "mae_vit_tiny_test"}, ck)
    res = vis.visualize(ck, _image(tmp_path), str(tmp_path / "o.png"))
    assert res["panel"] == (240, 240) and res["losses"][0] > 0


def test_weights_of_another_model_are_named_not_a_load_error(tmp_path):
    """Weights that do not fit the named model are one ValueError saying how (a shape, an extra tensor), not
    load_state_dict's RuntimeError (a traceback from the CLI)."""
    state = create_model("mae_vit_tiny_test").state_dict()
    shaped = str(tmp_path / "shaped.pth")
    atomic_save({"model": {**state, "decoder_pred.bias": torch.zeros(5)}, "model_name": "mae_vit_tiny_test"}, shaped)
    extra = str(tmp_path / "extra.pth")
    atomic_save({"model": {**state, "head.weight": torch.zeros(3)}, "model_name": "mae_vit_tiny_test"}, extra)
    img = _image(tmp_path)
    with pytest.raises(ValueError, match=r"1 tensor\(s\) of another shape \(e.g. decoder_pred.bias: \(5,\) in the"):
        vis.visualize(shaped, img, str(tmp_path / "o.png"))
    with pytest.raises(ValueError, match=r"do not fit mae_vit_tiny_test: 1 unexpected \(e.g. head.weight\)"):
        vis.visualize(extra, img, str(tmp_path / "o.png"))
    assert not (tmp_path / "o.png").exists()


def test_out_spelled_another_way_is_still_the_checkpoint(tmp_path):
    """--out naming the checkpoint by another path (./, a symlink) is the same file: refused, the checkpoint kept
    (a string comparison let --overwrite replace the training run's weights with a PNG)."""
    ck, img = _checkpoint(tmp_path), _image(tmp_path)
    saved = open(ck, "rb").read()
    link = tmp_path / "link.pth"
    link.symlink_to(ck)
    for out in (str(tmp_path / "." / "ck_0.pth"), str(link)):
        with pytest.raises(ValueError, match="is one of the inputs"):
            vis.visualize(ck, img, out, overwrite=True)
    assert open(ck, "rb").read() == saved


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_images_of_other_modes_are_shown_as_rgb(tmp_path, mode):
    """A grayscale, RGBA or palette image is converted to RGB as the data path does: its original panel is the
    RGB conversion's centre crop."""
    ck = _checkpoint(tmp_path)
    path = str(tmp_path / f"img.{mode}.png")
    Image.open(_image(tmp_path)).convert(mode).save(path)
    res = vis.visualize(ck, path, str(tmp_path / "o.png"))
    with Image.open(tmp_path / "o.png") as im:
        arr = np.asarray(im.convert("RGB")).astype(int)
    x0, y0, x1, y1 = res["boxes"][0][0]
    x = center_transform(Image.open(path).convert("RGB"), 32)
    assert np.array_equal(arr[y0:y1, x0:x1], np.asarray(vis._to_pil(x, res["panel"])).astype(int))


def test_titles_and_caption_are_drawn_inside_the_grid(tmp_path, monkeypatch):
    """Each panel's title over it (the loss on the reconstruction's), the caption under the rows wrapped to the
    grid's width, every line inside the PNG."""
    from PIL import ImageDraw

    drawn = []
    real = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append((xy, text))
                        or real(self, xy, text, *a, **k))
    ck, img = _checkpoint(tmp_path), _image(tmp_path)
    res = vis.visualize(ck, img, str(tmp_path / "o.png"), mask_ratio=0.5)
    boxes = res["boxes"][0]
    titles = [(xy, t) for xy, t in drawn if xy[1] < boxes[0][1]]
    assert [t for _, t in titles] == ["original", "masked 50%", f"reconstruction (loss {res['losses'][0]:.3f})",
                                      "reconstruction + visible"]
    assert [xy[0] for xy, _ in titles] == [b[0] for b in boxes]
    lines = [(xy, t) for xy, t in drawn if xy[1] >= boxes[0][3]]
    assert " ".join(t for _, t in lines) == " ".join(" ".join(c.split()) for c in res["caption"])
    with Image.open(tmp_path / "o.png") as im:
        width, height = im.size
    chars = max(len(t) for _, t in lines)
    assert len(lines) <= 2 * len(res["caption"]) + 1 and chars * 6 <= width - vis.MARGIN
    assert lines[-1][0][1] + vis.LINE_H <= height


def test_caption_names_the_mask_seed_of_each_row():
    assert "mask seed 4;" in vis.caption_for("m", False, 0.75, 4)[0]
    assert "mask seeds 4..6 (one per row)" in vis.caption_for("m", False, 0.75, 4, rows=3)[0]


def test_cli_defaults_overwrite_and_interrupt(tmp_path, monkeypatch, capsys):
    """The flags' defaults (reconstruction.png, 75%, seed 0, the checkpoint's norm_pix_loss); an existing --out
    kept without --overwrite, replaced with it; Ctrl-C is exit 130 and one line, not a traceback."""
    a = vis.build_parser().parse_args(["--checkpoint", "c.pth", "--image", "i.png"])
    assert (a.out, a.mask_ratio, a.seed, a.model, a.norm_pix_loss, a.overwrite) == (
        "reconstruction.png", 0.75, 0, None, None, False)
    # --image repeated adds rows (the last one alone was drawn): as --image a b
    for images in (["--image", "a", "--image", "b", "c"], ["--image", "a", "b", "c"]):
        assert vis.build_parser().parse_args(["--checkpoint", "c.pth", *images]).image == ["a", "b", "c"]
    ck, img = _checkpoint(tmp_path), _image(tmp_path)
    out = tmp_path / "o.png"
    out.write_bytes(b"mine")
    args = ["--checkpoint", ck, "--image", img, "--out", str(out)]
    assert vis.main(args) == 2 and out.read_bytes() == b"mine"
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert vis.main(args + ["--overwrite"]) == 0 and out.read_bytes().startswith(b"\x89PNG")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(vis, "visualize", interrupted)
    try:
        rc = vis.main(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main: a traceback, not exit 130")
    assert rc == 130 and capsys.readouterr().err == "maefast visualize: interrupted\n"


def test_a_bad_mask_ratio_is_refused_before_the_checkpoint_is_read(tmp_path):
    """--mask-ratio outside (0, 1) is named first, before a (slow, large) checkpoint is loaded."""
    with pytest.raises(ValueError, match="--mask-ratio"):
        vis.visualize(str(tmp_path / "missing.pth"), _image(tmp_path), str(tmp_path / "o.png"), mask_ratio=1.5)


def test_a_missing_image_is_named_before_the_checkpoint_is_read(tmp_path, monkeypatch):
    """An image that cannot be read is refused before the (slow, large) checkpoint loads, not after."""
    def loaded(*a, **k):
        raise AssertionError("the checkpoint was loaded before the images were read")

    monkeypatch.setattr(vis, "load_model", loaded)
    with pytest.raises(ValueError, match="cannot read image .*missing.png"):
        vis.visualize(_checkpoint(tmp_path), [_image(tmp_path), str(tmp_path / "missing.png")],
                      str(tmp_path / "o.png"))


def test_a_16_bit_grayscale_image_is_refused_not_clipped_white(tmp_path):
    """Pillow's RGB conversion clips a 16-bit PNG (mode I;16) to 255: the original panel came out white, the
    loss meaningless, without a word. Such an image is refused; one of those modes with 8-bit values is shown."""
    ck = _checkpoint(tmp_path)
    rng = np.random.default_rng(0)
    deep = str(tmp_path / "deep.png")
    Image.fromarray(rng.integers(0, 65536, (40, 40)).astype(np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    with pytest.raises(ValueError, match="cannot read image .*deep.png.*clips them"):
        vis.visualize(ck, deep, str(tmp_path / "o.png"))
    assert not (tmp_path / "o.png").exists()
    shallow = str(tmp_path / "shallow.png")
    Image.fromarray(rng.integers(0, 256, (40, 40)).astype(np.uint16)).save(shallow)
    assert vis.visualize(ck, shallow, str(tmp_path / "o.png"))["losses"][0] > 0


@pytest.mark.parametrize("kwargs", [dict(norm_pix_loss=False), dict(norm_pix_loss=True, img_size=(32, 48))])
def test_panels_are_the_official_demos(kwargs):
    """The official demo's run_one_image, restated (norm_pix_loss: the prediction un-normalised with each patch's
    mean and unbiased variance + 1e-6, the loss's target): the same four panels and loss, to the bit."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_test", **kwargs).eval()
    (h, w), p = model.patch_embed.grid_size, 8
    x = torch.randn(1, 3, h * p, w * p)
    noise = torch.rand(1, h * w, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        loss, y, mask = model(x, mask_ratio=0.75, noise=noise)
    if kwargs["norm_pix_loss"]:
        t = x.reshape(1, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(1, h * w, p * p * 3)
        y = y * (t.var(-1, keepdim=True) + 1.0e-6) ** 0.5 + t.mean(-1, keepdim=True)

    def unpatchify(z):  # (row, col, p_row, p_col, channel) -> image
        return z.reshape(1, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(1, 3, h * p, w * p)

    y, m = unpatchify(y), unpatchify(mask.unsqueeze(-1).repeat(1, 1, p ** 2 * 3))
    want = {"original": x, "masked": x * (1 - m), "reconstruction": y, "pasted": x * (1 - m) + y * m}
    got = vis.reconstruct(model, x[0], 0.75, seed=5)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value[0], atol=0, rtol=0, msg=key)
    assert got["loss"] == float(loss)


def test_a_uint8_image_is_normalised_not_taken_as_0_255_floats():
    """reconstruct takes the data loader's uint8 images as the model does: normalised, the same panels and loss
    as the float image (a uint8 image went in as 0-255 floats)."""
    from maefast.train.augment import normalize_uint8

    model = create_model("mae_vit_tiny_test", norm_pix_loss=True).eval()
    pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b = vis.reconstruct(model, pixels, seed=1), vis.reconstruct(model, normalize_uint8(pixels), seed=1)
    for key in ("original", "masked", "reconstruction", "pasted", "mask"):
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    assert a["loss"] == b["loss"]


def test_a_model_of_other_than_3_channels_is_refused_in_words(tmp_path):
    model = create_model("mae_vit_tiny_test", in_chans=1)
    ck = str(tmp_path / "gray.pth")
    atomic_save({"model": model.state_dict(), "model_name": "mae_vit_tiny_test",
                 "model_kwargs": {"img_size": 32, "in_chans": 1}}, ck)
    with pytest.raises(ValueError, match="takes 1-channel images; visualize shows RGB"):
        vis.visualize(ck, _image(tmp_path), str(tmp_path / "o.png"))
    assert not (tmp_path / "o.png").exists()


def test_a_half_model_runs_in_its_own_dtype_with_the_same_mask():
    """reconstruct() feeds the model in its weights' dtype and device (a bf16 model refused float32 images)
    and draws the mask on the CPU, so a seed shows the same patches whatever the model's dtype or device."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_test").eval()
    x = torch.randn(3, 32, 32)
    full = vis.reconstruct(model, x, 0.75, seed=3)
    half = vis.reconstruct(model.to(torch.bfloat16), x, 0.75, seed=3)
    assert torch.equal(half["mask"], full["mask"]) and half["reconstruction"].dtype == torch.float32
    torch.testing.assert_close(half["reconstruction"], full["reconstruction"], atol=0.05, rtol=0.05)
    assert half["loss"] == pytest.approx(full["loss"], rel=0.02)


def test_a_bf16_model_with_an_adapted_patch_projection_is_fed_in_the_projections_dtype():
    """A LoRA-style adapter on the patch projection (its own fp32 factors come first among the embedding's
    parameters) of a bf16 model: reconstruct() casts the image to the wrapped conv's dtype, the one the model's
    forward checks (the embedding's first parameter, fp32 there, was refused as the image's dtype)."""
    import warnings

    from test_model_wiring import _LoRAConv

    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_test").eval().to(torch.bfloat16)
    plain = vis.reconstruct(model, torch.randn(3, 32, 32), 0.75, seed=3)
    model.patch_embed.proj = _LoRAConv(model.patch_embed.proj)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fast path declines the wrapped projection: SlowPathWarning)
        got = vis.reconstruct(model, torch.randn(3, 32, 32), 0.75, seed=3)
    assert torch.equal(got["mask"], plain["mask"]) and got["reconstruction"].dtype == torch.float32


def test_the_largest_seed_in_range_is_taken(tmp_path):
    """The seed's bound is inclusive: image i draws seed + i, so 2**64 - n (n images) is the last seed whose every row
    is in torch.Generator's range."""
    ck, img = _checkpoint(tmp_path), _image(tmp_path)
    res = vis.visualize(ck, [img, img], str(tmp_path / "o.png"), seed=2 ** 64 - 2)
    assert len(res["losses"]) == 2 and f"mask seeds {2 ** 64 - 2}..{2 ** 64 - 1}" in res["caption"][0]


def test_a_float_image_with_negative_pixels_is_refused_not_clipped_black(tmp_path):
    """A float image (Pillow's mode F, e.g. a TIFF of normalised pixels) with values below 0: the RGB conversion clips
    them to 0 as it clips those past 255, so it is refused the same way."""
    path = str(tmp_path / "signed.tif")
    Image.fromarray(np.linspace(-1.0, 1.0, 1600, dtype=np.float32).reshape(40, 40)).save(path)
    assert Image.open(path).mode == "F"
    with pytest.raises(ValueError, match=r"cannot read image .*signed\.tif.*span -1\.0\.\.1\.0"):
        vis.read_image(path)
