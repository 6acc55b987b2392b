"""Fault injection and real-image decoding: every fault ends in one clear line, nothing is lost or mixed."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

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


def test_large_jpeg_is_decoded_at_reduced_scale_when_the_target_is_small(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (30, 60, 90)).save(path)
    assert load_image(path).size == (1600, 1200)
    small = load_image(path, draft_size=224)
    assert small.size == (400, 300)  # 1/4 scale: still >= 224 on the short side
    assert abs(int(np.asarray(small)[150, 200, 2]) - 90) <= 3


def test_skip_warning_is_one_line_without_a_source_line(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ImageFiles([bad])[0]
    (w,) = record
    text = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
    assert text.count("\n") == 1 and "self.dataset" not in text and "warnings.warn" not in text
