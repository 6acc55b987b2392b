"""Generated near-duplicates and an uncurated-looking pool, for calibration, tests and the demo of curation.

:func:`near_duplicate` applies one of the edits that web copies typically carry (resize, JPEG
re-compression, crop, flip, colour shift, text overlay). :func:`write_pool` writes a pool from the built-in
texture classes that is what curation is for: one class dominant, and many near-copies of a few images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from ..data.sample import DEFAULT_IMAGE_SIZE, SAMPLE_CLASSES, render_sample

EDITS = ("resize", "jpeg", "crop", "flip", "colour", "text")


def near_duplicate(image: Image.Image, edit: str, rng: np.random.Generator) -> Image.Image:
    """``image`` with one copy-like ``edit`` (JPEG is applied when saving as .jpg: see :func:`save_copy`)."""
    w, h = image.size
    if edit == "resize":
        scale = rng.uniform(0.5, 0.8)
        return image.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.BICUBIC)
    if edit == "crop":
        side = rng.uniform(0.75, 0.9)
        cw, ch = round(w * side), round(h * side)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.crop((x, y, x + cw, y + ch))
    if edit == "flip":
        return ImageOps.mirror(image)
    if edit == "colour":
        tint = np.asarray(image, dtype=np.float32) * rng.uniform(0.85, 1.15, size=3)  # per-channel gain
        shifted = Image.fromarray(np.clip(tint, 0, 255).astype(np.uint8))
        return ImageEnhance.Brightness(shifted).enhance(rng.uniform(0.85, 1.15))
    if edit == "text":
        out = image.copy()
        draw = ImageDraw.Draw(out)
        y = int(rng.integers(0, max(1, h - 12)))
        draw.text((2, y), "© dinokit", fill=(255, 255, 255) if rng.random() < 0.5 else (0, 0, 0))
        return out
    if edit == "jpeg":
        return image.copy()
    raise ValueError(f"unknown edit {edit!r}; use one of {', '.join(EDITS)}")


def save_copy(image: Image.Image, edit: str, path_stem: Path, rng: np.random.Generator) -> Path:
    """Save an edited copy: JPEG (quality 20-50) for the ``jpeg`` edit, PNG otherwise."""
    if edit == "jpeg":
        path = path_stem.with_suffix(".jpg")
        image.convert("RGB").save(path, quality=int(rng.integers(20, 51)))
    else:
        path = path_stem.with_suffix(".png")
        image.save(path)
    return path


@dataclass
class Pool:
    root: Path
    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    """Texture class of each image."""
    original: list[int] = field(default_factory=list)
    """Index (into ``paths``) of the image each one copies; its own index for an original."""


def write_pool(
    root: str | Path,
    *,
    dominant: str = "checker",
    n_dominant: int = 240,
    n_other: int = 20,
    n_copied: int = 60,
    copies: int = 4,
    seed: int = 5,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> Pool:
    """A flat folder of textures: ``n_dominant`` of one class, ``n_other`` of each other class, plus
    ``copies`` near-duplicates (random edits) of each of ``n_copied`` dominant-class images."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pool = Pool(root)
    for c, texture in enumerate(SAMPLE_CLASSES):
        n = n_dominant if texture == dominant else n_other
        for i in range(n):
            image = render_sample(texture, np.random.default_rng([seed, c, i]), image_size)
            path = root / f"{texture}_{i:04d}.png"
            image.save(path)
            index = len(pool.paths)
            pool.paths.append(path)
            pool.labels.append(c)
            pool.original.append(index)
            if texture == dominant and i < n_copied:
                rng = np.random.default_rng([seed, c, i, 1])
                for j in range(copies):
                    edit = EDITS[int(rng.integers(len(EDITS)))]
                    copy = save_copy(near_duplicate(image, edit, rng), edit, root / f"{texture}_{i:04d}_copy{j}_{edit}", rng)
                    pool.paths.append(copy)
                    pool.labels.append(c)
                    pool.original.append(index)
    return pool


def dead_leaves(rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE, n_shapes: int = 40) -> Image.Image:
    """A distinct random scene: overlapping discs and rectangles of random colours on a random background."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, size=3)))
    draw = ImageDraw.Draw(image)
    for _ in range(n_shapes):
        x, y = rng.uniform(-0.1, 1.1, size=2) * size
        r = size * rng.uniform(0.03, 0.25)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.rectangle((x - r, y - r * rng.uniform(0.3, 1), x + r, y + r), fill=colour)
    return image


def write_copy_pairs(root: str | Path, *, n_images: int = 100, copies: int = 2, seed: int = 0,
                     size: int = DEFAULT_IMAGE_SIZE) -> tuple[list[Path], list[int]]:
    """Distinct random scenes and edited copies of each (every edit in turn): paths and original index."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths, original = [], []
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        image = dead_leaves(rng, size)
        path = root / f"scene_{i:04d}.png"
        image.save(path)
        index = len(paths)
        paths.append(path)
        original.append(index)
        for j in range(copies):
            edit = EDITS[(i * copies + j) % len(EDITS)]
            paths.append(save_copy(near_duplicate(image, edit, rng), edit, root / f"scene_{i:04d}_copy{j}_{edit}", rng))
            original.append(index)
    return paths, original
