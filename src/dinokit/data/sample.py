"""The built-in sample image set: small, deterministic, generated in code (no downloads).

Eight shape classes (circle, square, triangle, cross, ring, star, diamond, bars) drawn upright with
random size and position, in one of a few colours, over a noisy grey gradient, written as PNG files
in ``<root>/{train,val}/<class>/`` folders. Colour carries no class information, so features have to
encode shape to classify well: a randomly initialised network is near chance. Colours and background
levels come from small palettes on purpose: with continuous random colours, colour alone would tell
images apart, and self-supervised training would learn colour instead of shape.
Generating the default set takes about a second on two CPU cores.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SAMPLE_CLASSES = ("bars", "circle", "cross", "diamond", "ring", "square", "star", "triangle")
SAMPLE_VERSION = 3
DEFAULT_IMAGE_SIZE = 96
DEFAULT_COUNTS = {"train": 80, "val": 20}
PALETTE = ((230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (220, 60, 220), (40, 210, 220))
GREY_LEVELS = (30, 90, 150, 210)


def default_sample_root() -> Path:
    """Where the sample set is written when no root is given: ``$XDG_CACHE_HOME/dinokit`` or ``~/.cache/dinokit``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "dinokit" / f"sample-v{SAMPLE_VERSION}"


def _polygon(cx: float, cy: float, r: float, n: int, angle: float, inner: float | None = None) -> list[tuple]:
    pts = []
    steps = 2 * n if inner else n
    for i in range(steps):
        rad = r if (inner is None or i % 2 == 0) else r * inner
        a = angle + 2 * math.pi * i / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(int(r * 0.3), 2))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, angle + math.pi / 4), fill=color)
    elif shape == "diamond":
        pts = _polygon(cx, cy, r, 4, angle)
        pts = [(cx + (x - cx) * 0.55, y) if i % 2 == 0 else (x, y) for i, (x, y) in enumerate(pts)]
        draw.polygon(pts, fill=color)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle), fill=color)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, angle, inner=0.4), fill=color)
    elif shape == "cross":
        w = r * 0.35
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            draw.polygon(
                [(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                 (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)],
                fill=color,
            )
    elif shape == "bars":
        w = r * 0.22
        dx, dy = math.cos(angle), math.sin(angle)
        for off in (-0.6, 0.0, 0.6):
            ox, oy = -dy * off * r, dx * off * r
            px, py = -dy * w / 2, dx * w / 2
            draw.polygon(
                [(cx + ox - dx * r + px, cy + oy - dy * r + py), (cx + ox + dx * r + px, cy + oy + dy * r + py),
                 (cx + ox + dx * r - px, cy + oy + dy * r - py), (cx + ox - dx * r - px, cy + oy - dy * r - py)],
                fill=color,
            )
    else:  # pragma: no cover - guarded by SAMPLE_CLASSES
        raise ValueError(shape)


def render_sample(shape: str, rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """One image of ``shape``: random colours, scale, position and rotation, noisy background."""
    bg1, bg2 = (np.full(3, GREY_LEVELS[i]) for i in rng.integers(0, len(GREY_LEVELS), size=2))
    t = np.linspace(0.0, 1.0, size)[None, :, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    background = bg1 * (1 - t) + bg2 * t + rng.normal(0, 18, size=(size, size, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    fg = np.array(PALETTE[rng.integers(0, len(PALETTE))])
    r = size * rng.uniform(0.2, 0.34)
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    # Shapes stay (nearly) upright: DINO's augmentations teach invariance to crops, flips and colour, not
    # to rotation, so randomly rotated shapes could not be grouped by class from self-supervision alone.
    angle = rng.uniform(-0.15, 0.15) - math.pi / 2
    _draw_shape(draw, shape, cx, cy, r, angle, tuple(int(c) for c in fg))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    return image


def write_sample_dataset(
    root: str | Path | None = None,
    *,
    counts: dict[str, int] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> Path:
    """Write the sample set under ``root`` (idempotent: an existing complete set is kept) and return root."""
    root = Path(root) if root is not None else default_sample_root()
    counts = counts or DEFAULT_COUNTS
    tag = "-".join(f"{k}{v}" for k, v in sorted(counts.items()))
    marker = root / f".complete-v{SAMPLE_VERSION}-{image_size}-{seed}-{tag}"
    if marker.exists():
        return root
    for split_index, (split, count) in enumerate(sorted(counts.items())):
        for class_index, shape in enumerate(SAMPLE_CLASSES):
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_index, class_index, i])
                path = folder / f"{shape}_{i:04d}.png"
                tmp = path.with_suffix(".tmp.png")
                render_sample(shape, rng, image_size).save(tmp)
                os.replace(tmp, path)  # atomic: a killed run never leaves a half-written image
    marker.touch()
    return root
