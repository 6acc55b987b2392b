"""Real-image decoding (transparency, 16-bit, CMYK, huge files, reduced-scale JPEGs) and the skip warnings: each
kind shown once, counted, one line, never glued to a progress bar."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main as cli_main
from dinokit.data.images import ImageFiles, load_image


# ---------------------------------------------------------------------------------------------- decoding
def _line_art(mode: str) -> Image.Image:
    """Black strokes on a fully transparent background (clip-art style)."""
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[4:12, 7:9] = (0, 0, 0, 255)  # a black bar, opaque
    return Image.fromarray(rgba, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(rgba, "RGBA")


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_line_art_is_composited_on_white(tmp_path, mode):
    path = tmp_path / f"art_{mode}.png"
    _line_art(mode).save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (16, 16, 3)
    assert (rgb[0, 0] == 255).all()  # transparent background -> white (was black before)
    assert (rgb[6, 7] == 0).all()  # the stroke stays black


def test_palette_transparency_and_configurable_background(tmp_path, monkeypatch):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((1, 1), 1)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no palette-transparency warning either
        rgb = np.asarray(load_image(path))
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[1, 1]) == (200, 10, 10)
    assert tuple(np.asarray(load_image(path, background="black"))[0, 0]) == (0, 0, 0)
    monkeypatch.setenv("DINOKIT_IMAGE_BACKGROUND", "10,20,30")
    assert tuple(np.asarray(load_image(path))[0, 0]) == (10, 20, 30)
    monkeypatch.setenv("DINOKIT_IMAGE_BACKGROUND", "purple")
    from dinokit.errors import DinokitError

    with pytest.raises(DinokitError) as err:
        load_image(path)
    assert str(err.value) == ("DINOKIT_IMAGE_BACKGROUND='purple' is not a colour; use white, black, grey or R,G,B "
                              "(0-255)")


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256, dtype=np.float64).round().astype(np.uint16).reshape(16, 16)
    path = tmp_path / "depth16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    expected = np.round(ramp / 257.0).astype(np.uint8)
    assert (rgb[..., 0] == expected).all() and (rgb[..., 1] == expected).all()
    assert (rgb == 255).mean() < 0.01  # was 99% white


def test_float_images_are_scaled_by_their_range(tmp_path):
    """A float TIFF in [0, 1.2] (a little over from resampling) was taken as 0..255: nearly black (mean 0.2)."""
    ramp = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    for factor, mean in ((1.0, 127.5), (1.2, 148.7), (255.0, 127.5), (1000.0, 127.5), (65535.0, 127.5)):
        Image.fromarray(ramp * factor, "F").save(tmp_path / "f.tif")
        assert Image.open(tmp_path / "f.tif").mode == "F"
        grey = np.asarray(load_image(tmp_path / "f.tif"))[..., 0].astype(float)
        assert abs(grey.mean() - mean) < 1.5, (factor, grey.mean())
    nan = ramp.copy()
    nan[0, :3] = [np.nan, np.inf, -np.inf]
    Image.fromarray(nan, "F").save(tmp_path / "n.tif")
    assert np.asarray(load_image(tmp_path / "n.tif"))[0, :3, 0].tolist() == [0, 255, 0]  # +inf: the brightest


def test_cmyk_grey_and_one_pixel_images_decode(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("L", (1, 1), 77).save(tmp_path / "one.png")
    red = np.asarray(load_image(tmp_path / "cmyk.jpg"))
    assert red.shape == (8, 8, 3) and red[..., 0].min() > 240 and red[..., 1:].max() < 15
    assert np.asarray(load_image(tmp_path / "one.png")).tolist() == [[[77, 77, 77]]]


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression-bomb sized file of a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_huge_image_is_skipped_with_its_size_and_the_setting(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(_huge_png_header(30000, 25000))
    ok = tmp_path / "ok.png"
    Image.new("RGB", (4, 4)).save(ok)
    ds = ImageFiles([path, ok])
    with pytest.warns(UserWarning) as record:
        assert ds[0][1] is None
    assert [str(w.message) for w in record] == [
        f"skipping too large image {path}: 30000x25000 image (750,000,000 pixels) is above the limit of "
        "200,000,000 pixels "
        "(raise it with DINOKIT_MAX_IMAGE_PIXELS=N, 0 for no limit)"
    ]
    monkeypatch.setenv("DINOKIT_MAX_IMAGE_PIXELS", "10")
    with pytest.warns(UserWarning, match=r"4x4 image \(16 pixels\) is above the limit of 10 pixels"):
        assert ds[1][1] is None
    monkeypatch.setenv("DINOKIT_MAX_IMAGE_PIXELS", "0")
    assert ds[1][1].size == (4, 4)
    from dinokit.data.images import max_image_pixels
    from dinokit.errors import DinokitError

    for text in ("inf", "1e400"):  # an OverflowError traceback before
        monkeypatch.setenv("DINOKIT_MAX_IMAGE_PIXELS", text)
        with pytest.raises(DinokitError, match=f"DINOKIT_MAX_IMAGE_PIXELS='{text}' is not a number of pixels"):
            max_image_pixels()


def test_large_jpeg_is_decoded_at_reduced_scale_when_the_target_is_small(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (30, 60, 90)).save(path)
    assert load_image(path).size == (1600, 1200)
    small = load_image(path, draft_size=224)
    assert small.size == (400, 300)  # 1/4 scale: still >= 224 on the short side
    assert abs(int(np.asarray(small)[150, 200, 2]) - 90) <= 3


def test_readers_decode_large_jpegs_at_the_size_their_transform_needs(tmp_path):
    from dinokit.data.augmentations import DataAugmentationDINO
    from dinokit.data.loaders import make_ssl_data_loader
    from dinokit.data.transforms import make_classification_eval_transform, make_classification_train_transform

    h, w = 1500, 2000
    y, x = np.mgrid[0:h, 0:w]
    pattern = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / 90) * np.cos(y / 70)], -1)
    Image.fromarray(pattern.astype(np.uint8)).save(tmp_path / "big.jpg", quality=95)
    evaluation = make_classification_eval_transform(crop_size=224)  # resize to 256, centre crop 224
    drafted, full = ImageFiles([tmp_path / "big.jpg"], transform=evaluation), ImageFiles([tmp_path / "big.jpg"],
                                                                                          transform=evaluation,
                                                                                          draft_size=0)
    assert drafted.draft_size == 256 and drafted.read_image(0).size == (500, 375)  # 1/4 scale: short side >= 256
    assert full.read_image(0).size == (2000, 1500)
    difference = (drafted[0][1] - full[0][1]).abs()  # normalised pixels (std ~0.23 per unit of 255 / 255)
    assert difference.mean() < 0.02 and difference.max() < 0.1
    # the linear probe's RandomResizedCrop (scale >= 0.08) needs 224 / sqrt(0.08) = 792 pixels
    drafted.transform = make_classification_train_transform(crop_size=224)
    assert drafted.draft_size == 792 and drafted.read_image(0).size == (2000, 1500)  # half would be too small
    # pretraining: the smallest local crop (96 px of 5% of the area) needs 96 / sqrt(0.05) = 430 pixels
    augmentation = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2)
    assert augmentation.draft_size == max(397, 430)
    loader = make_ssl_data_loader(f"ImageFolder:root={tmp_path}", transform=augmentation, collate=lambda b: b, seed=0,
                                  batch_size_per_rank=1, num_workers=0, rank=0, world_size=1)
    assert loader.dataset.base_dataset.draft_size == 430
    assert loader.dataset.base_dataset.read_image(0).size == (1000, 750)


def test_skip_warning_is_one_line_without_a_source_line(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ImageFiles([bad])[0]
    (w,) = record
    text = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
    assert text.count("\n") == 1 and "self.dataset" not in text and "warnings.warn" not in text


@pytest.mark.parametrize("workers", [0, 2])
def test_repeated_warnings_are_shown_once_and_summarised(tmp_path, capfd, real_warnings, workers):
    for i in range(2):
        Image.new("RGB", (16, 16), (90 * i, 0, 0)).save(tmp_path / f"good{i}.png")
    for i in range(5):
        (tmp_path / f"bad{i}.png").write_bytes(b"not an image %d" % i)
    config = tmp_path / "tiny.yaml"
    config.write_text("student:\n  arch: vit_pico\n  patch_size: 8\ncrops:\n  global_crops_size: 32\n")
    code = cli_main(["embed", str(tmp_path), "--out", str(tmp_path / "e.npz"), "--config-file", str(config),
                     "--random-init", "--image-size", "32", "--device", "cpu", "--no-progress", "--num-workers",
                     str(workers), "--batch-size", "2"])
    assert code == 0
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    skips = [line for line in err if "skipping unreadable image" in line]
    assert len(skips) == 5 and all("cannot identify image file" in line for line in skips)  # each, with its reason
    assert len({line.split(": ")[1] for line in skips}) == 5  # five different files, once each
    assert skips[0].startswith("warning: skipping unreadable image ")  # dinokit's warnings read like its errors
    assert err[-1] == ("warning: 5 image reads skipped in all (unreadable, not an image or too large); the first 5 "
                       "files are named above")
    assert len(np.load(tmp_path / "e.npz")["cls"]) == 2


def test_warning_kinds_mask_paths_and_numbers(capsys):
    from dinokit.data.images import SkippedImageWarning
    from dinokit.warning_summary import summarised_warnings, warning_kind

    assert warning_kind(SkippedImageWarning, "skipping too large image /a.png: 1x2") == "SkippedImageWarning"
    assert warning_kind(UserWarning, "iteration 12: no readable image in the batch") == warning_kind(
        UserWarning, "iteration 7: no readable image in the batch")
    assert warning_kind(UserWarning, "ignoring unreadable feature cache /x/a.pt (EOF); recomputing") == warning_kind(
        UserWarning, "ignoring unreadable feature cache /y/b.pt (EOF); recomputing")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with summarised_warnings():
            for i in range(4):
                warnings.warn(f"iteration {i}: no readable image in the batch; repeating the previous batch")
            warnings.warn("something else")
            warnings.warn("something else")  # the same text again: not summarised (a file list read twice)
    assert [str(w.message) for w in shown] == [
        "iteration 0: no readable image in the batch; repeating the previous batch", "something else"]
    assert capsys.readouterr().err == ("warning: 4 warnings of this kind in all, shown once: iteration 0: no readable "
                                       "image in the batch; repeating the previous batch\n")


def test_each_launched_process_says_its_count_is_its_own(capsys, monkeypatch):
    """Under torchrun each process counts its own warnings (and its workers'); both said "in all", read as totals."""
    from dinokit.data.images import SkippedImageWarning
    from dinokit.warning_summary import summarised_warnings

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings(record=True):
        with summarised_warnings():
            for name in ("a", "b", "c"):
                warnings.warn_explicit(f"skipping unreadable image /d/{name}.png: truncated", SkippedImageWarning,
                                       "dinokit", 0)
    assert capsys.readouterr().err.startswith("warning: 3 image reads skipped in process 1 (unreadable, ")


def test_warning_during_a_progress_bar_gets_its_own_line(capsys):
    """A warning raised while a tqdm bar is drawn (a skipped image during training) is written on its own line,
    not glued to the end of the bar's line."""
    from tqdm import tqdm

    from dinokit.data.images import SkippedImageWarning
    from dinokit.warning_summary import summarised_warnings

    with summarised_warnings():
        bar = tqdm(total=3, desc="train", file=sys.stderr, ascii=True)
        bar.update(1)
        warnings.warn_explicit("skipping unreadable image /d/a.png: truncated", SkippedImageWarning, "dinokit", 0)
        bar.update(2)
        bar.close()
    lines = capsys.readouterr().err.replace("\r", "\n").split("\n")
    assert "warning: skipping unreadable image /d/a.png: truncated" in lines
    assert not any("train" in x and "warning" in x for x in lines)


# ------------------------------------------------------------------------------------------- EXIF orientation
def _oriented(path, pixels: np.ndarray, orientation: int) -> None:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation  # what a phone writes instead of rotating the pixels
    image.save(path, exif=exif)


def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path):
    # a phone photo stored sideways came out sideways (the official pipeline reads the stored pixels)
    a = (np.random.default_rng(0).random((4, 6, 3)) * 255).astype(np.uint8)
    shown = {1: a, 2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: a.transpose(1, 0, 2), 6: np.rot90(a, -1),
             7: a[::-1, ::-1].transpose(1, 0, 2), 8: np.rot90(a, 1)}  # the EXIF specification's eight cases
    for orientation, expected in shown.items():
        _oriented(tmp_path / f"o{orientation}.png", a, orientation)
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / f"o{orientation}.png")), expected)
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / f"o{orientation}.png", exif=False)), a)


def test_exif_orientation_can_be_ignored_as_the_official_pipeline_does(tmp_path, monkeypatch):
    from dinokit.errors import DinokitError

    a = (np.random.default_rng(0).random((4, 6, 3)) * 255).astype(np.uint8)
    _oriented(tmp_path / "o6.png", a, 6)
    monkeypatch.setenv("DINOKIT_EXIF_ORIENTATION", "ignore")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "o6.png")), a)
    monkeypatch.setenv("DINOKIT_EXIF_ORIENTATION", "sideways")
    with pytest.raises(DinokitError, match="DINOKIT_EXIF_ORIENTATION='sideways' is not a choice; use apply"):
        load_image(tmp_path / "o6.png")


def test_a_sideways_photo_embeds_as_its_upright_copy(tmp_path):
    a = (np.random.default_rng(1).random((40, 60, 3)) * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    _oriented(tmp_path / "in" / "sideways.png", a, 6)
    Image.fromarray(np.ascontiguousarray(np.rot90(a, -1))).save(tmp_path / "in" / "upright.png")
    out = tmp_path / "e.npz"
    assert cli_main(["embed", str(tmp_path / "in"), "--out", str(out), "--random-init", "--image-size", "28",
                     "--device", "cpu", "--no-progress"]) == 0
    cls = np.load(out)["cls"]
    np.testing.assert_allclose(cls[0], cls[1], atol=2e-5)  # the same pixels (fp32 rounding of two batch rows)


def test_pil_images_gif_frames_and_foreground_examples_decode_as_files_do(tmp_path, monkeypatch):
    """Seen: the viz API's PIL inputs, a GIF's frames and --fg-examples used PIL's plain convert('RGB'): transparency
    came out black, 16-bit white, a sideways photo sideways, unlike the same file read by every command."""
    from dinokit.viz.pca import read_foreground_example
    from dinokit.viz.prepare import prepare_image
    from dinokit.viz.video import read_frames

    model = __import__("dinokit.models", fromlist=["build_backbone"]).build_backbone("vit_pico", patch_size=8,
                                                                                     img_size=32)
    _line_art("RGBA").save(tmp_path / "art.png")
    Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)).save(tmp_path / "deep.png")
    photo = (np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)
    _oriented(tmp_path / "side.png", photo, 6)
    for name in ("art.png", "deep.png", "side.png"):
        from_path = prepare_image(model, tmp_path / name, image_size=16)
        with Image.open(tmp_path / name) as opened:
            from_pil = prepare_image(model, opened, image_size=16)
        assert torch.equal(from_pil.tensor, from_path.tensor), name
    # an animated GIF with a transparent colour: its frames as the same picture read as a still
    frames = []
    for shift in range(3):  # a moving black bar on a transparent (palette index 0) background
        pixels = np.zeros((16, 16), dtype=np.uint8)
        pixels[4:12, 4 + 2 * shift : 6 + 2 * shift] = 1
        frame = Image.fromarray(pixels, "P")
        frame.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
        frames.append(frame)
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], transparency=0, disposal=2)
    monkeypatch.setenv("DINOKIT_IMAGE_BACKGROUND", "grey")
    still, video = np.asarray(load_image(tmp_path / "anim.gif")), read_frames(tmp_path / "anim.gif")
    assert len(video) == 3 and (still[0, 0] == 128).all() and np.array_equal(still, np.asarray(video[0]))
    assert all((np.asarray(f)[0, 0] == 128).all() for f in video)  # was black (the transparent colour dropped)
    # a foreground example: its mask is drawn on the photo as shown (upright), and it is seen as the commands see it
    Image.new("L", (16, 24), 255).save(tmp_path / "mask.png")  # the upright photo is 16 wide, 24 high
    rgb, mask = read_foreground_example(f"{tmp_path / 'side.png'}={tmp_path / 'mask.png'}")
    assert rgb.size == mask.size == (16, 24)
    assert np.array_equal(np.asarray(rgb), np.asarray(load_image(tmp_path / "side.png")))
    rgb, mask = read_foreground_example(tmp_path / "art.png")
    assert np.array_equal(np.asarray(rgb), np.asarray(load_image(tmp_path / "art.png"))) and mask.getpixel((0, 0)) == 0


def test_browser_and_phone_extensions_are_images(tmp_path):
    """Seen: .jfif (a browser's JPEG download), .jpe, .apng and .avif files in a folder were left out without a word."""
    from PIL import features

    from dinokit.data.listing import find_images

    picture = Image.fromarray((np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8))
    formats = {"a.jpg": "JPEG", "b.JFIF": "JPEG", "c.jpe": "JPEG", "d.apng": "PNG"}
    if features.check("avif"):
        formats["e.avif"] = "AVIF"
    for name, fmt in formats.items():
        picture.save(tmp_path / name, format=fmt)
    found = find_images(tmp_path)
    assert sorted(p.name for p in found) == sorted(formats)
    assert all(load_image(p).size == (20, 20) for p in found)


def test_pillows_warnings_about_a_file_are_one_line_naming_it(tmp_path, capsys, real_warnings):
    """Seen: a photo with damaged EXIF printed Pillow's two-line warning (its own source line), without the file."""
    import struct

    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x010F, 2, 12, 200) + struct.pack("<I", 0)  # data past the end
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cam.jpg",
                                                        exif=b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_image(tmp_path / "cam.jpg").size == (8, 8)  # the picture itself is fine
    line = f"{tmp_path / 'cam.jpg'}: Truncated File Read"
    assert [(w.filename, str(w.message)) for w in caught] == [("dinokit", line)]
    assert cli_main(["embed", str(tmp_path / "cam.jpg"), "--model", "dinov2_vits14", "--random-init", "--image-size",
                     "28", "--device", "cpu", "--no-progress", "--num-workers", "0", "--out",
                     str(tmp_path / "e.npz")]) == 0
    assert capsys.readouterr().err == f"warning: {line}\n"
