"""Turning maps into pictures with Pillow and numpy: colour ramp, upsampling, panels, grids, match lines."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..engine.run_dir import check_writable
from ..errors import DinokitError
from ..files import atomic_write, fitting_name, resolve_link

UPSAMPLE_MODES = ("nearest", "bilinear")
GAP = 4  # pixels between panels
BACKGROUND = 255
CAPTION_HEIGHT = 14
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # --out as one file

# A dark-to-bright ramp (black, indigo, magenta, orange, pale yellow) for single-channel maps,
# monotonic in brightness so it also reads in grey.
_RAMP = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
     [252, 255, 164]],
    dtype=np.float64,
) / 255


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8."""
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def colourise(values: np.ndarray, *, low: float | None = None, high: float | None = None) -> np.ndarray:
    """(h, w) values -> (h, w, 3) float in [0, 1] on the ramp; ``low``/``high`` default to the map's range."""
    values = np.asarray(values, dtype=np.float64)
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    t = np.clip((values - low) / max(high - low, 1e-12), 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(np.floor(t).astype(int), len(_RAMP) - 2)
    frac = (t - i)[..., None]
    return _RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac


def upsample(grid: np.ndarray, size: tuple[int, int], mode: str = "nearest") -> np.ndarray:
    """(h, w) or (h, w, C) map -> (H, W[, C]) with ``nearest`` or ``bilinear`` interpolation."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsampling {mode!r}; use one of {', '.join(UPSAMPLE_MODES)}")
    x = torch.as_tensor(np.asarray(grid, dtype=np.float32))
    squeeze = x.ndim == 2
    x = x[..., None] if squeeze else x
    x = x.permute(2, 0, 1)[None]  # (1, C, h, w)
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    y = F.interpolate(x, size=size, mode=mode, **kwargs)[0].permute(1, 2, 0).numpy()
    return y[..., 0] if squeeze else y


def overlay(pixels: np.ndarray, mask: np.ndarray, *, dim: float = 0.25) -> np.ndarray:
    """Darken ``pixels`` (H, W, 3) uint8 outside ``mask`` (H, W) bool."""
    out = pixels.astype(np.float64)
    out[~mask] *= dim
    return out.round().astype(np.uint8)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def caption(panel: np.ndarray, text: str) -> np.ndarray:
    """``panel`` (H, W, 3) uint8 with ``text`` written in a white strip below it."""
    strip = Image.new("RGB", (panel.shape[1], CAPTION_HEIGHT), (BACKGROUND,) * 3)
    ImageDraw.Draw(strip).text((2, 1), text, fill=(0, 0, 0), font=_font())
    return np.concatenate([panel, np.asarray(strip)], axis=0)


def hstack(panels: Sequence[np.ndarray], gap: int = GAP) -> np.ndarray:
    """Panels (H_i, W_i, 3) uint8 side by side, top-aligned, on white."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def grid(panels: Sequence[np.ndarray], columns: int, gap: int = GAP) -> np.ndarray:
    """Panels in rows of ``columns``, on white."""
    rows = [hstack(panels[i : i + columns], gap) for i in range(0, len(panels), columns)]
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=BACKGROUND) for r in rows]
    return np.concatenate(padded, axis=0)[:-gap]


def hue_colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct saturated colours around the hue circle."""
    hsv = np.stack([np.linspace(0, 255, n, endpoint=False), np.full(n, 230), np.full(n, 255)], axis=1)
    rgb = Image.fromarray(hsv.astype(np.uint8)[None], mode="HSV").convert("RGB")
    return [tuple(int(c) for c in px) for px in np.asarray(rgb)[0]]


def draw_matches(pixels_a: np.ndarray, pixels_b: np.ndarray, points_a: np.ndarray, points_b: np.ndarray,
                 patch_size: int, *, gap: int = 8) -> np.ndarray:
    """A and B side by side with a line between the centres of each matched pair of patches."""
    canvas = hstack([pixels_a, pixels_b], gap=gap)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    offset = pixels_a.shape[1] + gap
    centre = (patch_size - 1) / 2
    for (ra, ca), (rb, cb), colour in zip(points_a, points_b, hue_colours(len(points_a))):
        xa, ya = ca * patch_size + centre, ra * patch_size + centre
        xb, yb = cb * patch_size + centre + offset, rb * patch_size + centre
        draw.line([(xa, ya), (xb, yb)], fill=colour, width=max(1, patch_size // 8))
        for x, y in ((xa, ya), (xb, yb)):
            r = max(2, patch_size // 4)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=1)
    return np.asarray(image)


def unique_stems(inputs: Sequence[str | Path]) -> list[str]:
    """Output-file stems, one per input file (or name): its stem, or where inputs share one, a stem that says which
    input it was: the extension added (``a.png``, ``a.jpg`` -> ``a_png``, ``a_jpg``), else the folder's name
    (``x/a.png``, ``y/a.png`` -> ``x_a``, ``y_a``); a name still taken gets ``-2``, ``-3``, ... Without this the
    outputs of such inputs would overwrite each other, or be told apart only by their order. A stem over 200 bytes
    is shortened (its first bytes and a digest of it): with ``_attention.png`` added it must fit a 255-byte name."""
    paths = [Path(str(p)) for p in inputs]
    folder = [Path(os.path.abspath(p)).parent.name for p in paths]  # 'x' of x/a.png, also given as a.png in x
    stems = [p.stem for p in paths]
    ext = [p.suffix.lstrip('.').lower() for p in paths]
    wanted = list(stems)
    for stem in set(stems):
        group = [i for i, s in enumerate(stems) if s == stem]
        if len(group) < 2:
            continue
        for tell in (lambda i: f"{stems[i]}_{ext[i]}", lambda i: f"{folder[i]}_{stems[i]}",
                     lambda i: f"{folder[i]}_{stems[i]}_{ext[i]}"):
            names = [tell(i) for i in group]
            if len(set(names)) == len(names):
                for i, name in zip(group, names):
                    wanted[i] = name
                break
    wanted = [fitting_name(stem, 200) for stem in wanted]
    taken = set(wanted)
    used: set[str] = set()
    out = []
    for stem in wanted:
        name, n = stem, 1
        while name in used or (name != stem and name in taken):
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        out.append(name)
    return out


def save_png(image: np.ndarray | Image.Image, path: str | Path) -> Path:
    """Write (H, W, 3) uint8 (or a PIL image) as PNG, atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(tmp, format="PNG", optimize=True)
    return path


# ------------------------------------------------------------------------------------------- where they go
def picture_out(out: str | Path) -> Path | None:
    """``--out`` as one picture: a path ending in .png that is not an existing folder (checked writable); None: a
    folder (checked writable)."""
    path = Path(out).expanduser()
    if path.suffix.lower() in PICTURE_SUFFIXES and not path.is_dir():
        if path.suffix.lower() != ".png":
            raise DinokitError(f"--out {str(out)!r}: pictures are written as PNG; give a .png file (one image) or a folder")
        check_writable(out, "--out", is_file=True)
        return path
    check_writable(out, "--out")
    return None


def check_not_an_input(picture: Path | None, inputs, out: str | Path) -> None:
    """The one picture ``--out`` names is not one of the ``inputs`` (it would replace the image): one line."""
    if picture is not None and resolve_link(picture) in {Path(str(p)).expanduser().resolve() for p in inputs}:
        raise DinokitError(f"--out {str(out)!r} is one of the input images; give another file name")


def check_one_picture(picture: Path | None, out: str | Path, what: str) -> None:
    """``what`` (e.g. "3 images") does not fit in the one picture that ``--out`` names: one line."""
    if picture is not None:
        raise DinokitError(f"--out {str(out)!r} names one picture, but there are {what}; give a folder instead, e.g. "
                           f"--out {picture.with_suffix('')}")
