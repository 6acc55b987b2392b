"""The built-in sample image set: small, deterministic, generated in code (no downloads).

Eight texture classes (blobs, checker, diagonal stripes, dots, grid, horizontal stripes, rings, vertical
stripes) in two random grey levels, with random period, phase and contrast, sensor-like noise and
occasional blur, written as PNG files in ``<root>/{train,val}/<class>/`` folders.

Why textures in grey: every crop of a texture shows its class, so DINO's multi-crop objective (match a
small local crop to the global views of the same image) can be learnt by a tiny ViT within minutes on a
CPU, while a randomly initialised network is near chance (its features follow grey levels and noise).
Colour is left out on purpose: a run this short learns whatever tells images apart most cheaply, and with
random colours that is the colour (k-NN then groups images by colour, not by class); the
grey levels still vary, so brightness and contrast must be ignored. Drawn shapes were tried first and
were too slow to learn: even trained with labels, vit_pico reached only ~32% on them in the same budget.
Generating the default set takes about three seconds on two CPU cores.
"""

from __future__ import annotations

import io
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..errors import DinokitError
from ..files import atomic_write

SAMPLE_CLASSES = ("blobs", "checker", "diagonal", "dots", "grid", "hstripes", "rings", "vstripes")
SAMPLE_VERSION = 4
DEFAULT_IMAGE_SIZE = 96
DEFAULT_COUNTS = {"train": 80, "val": 20}
MIN_CONTRAST = 60  # grey levels of the two tones differ by at least this much (of 255)


def default_sample_root() -> Path:
    """Where the sample set is written when no root is given: ``$XDG_CACHE_HOME/dinokit`` or ``~/.cache/dinokit``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "dinokit" / f"sample-v{SAMPLE_VERSION}"


def _texture_mask(texture: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean (size, size) mask of the foreground tone of ``texture``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = size * rng.uniform(1 / 12, 1 / 6)
    x = x + rng.uniform(0, period)
    y = y + rng.uniform(0, period)
    half = period / 2
    if texture == "hstripes":
        return y % period < half
    if texture == "vstripes":
        return x % period < half
    if texture == "diagonal":
        sign = 1.0 if rng.random() < 0.5 else -1.0
        return ((x + sign * y) / math.sqrt(2)) % period < half
    if texture == "checker":
        return (x % period < half) ^ (y % period < half)
    if texture == "dots":
        return (x % period - half) ** 2 + (y % period - half) ** 2 < (0.3 * period) ** 2
    if texture == "grid":
        width = max(0.2 * period, 1.5)
        return (x % period < width) | (y % period < width)
    if texture == "rings":
        cx, cy = rng.uniform(0, size, size=2)
        return np.hypot(x - cx, y - cy) % period < half
    if texture == "blobs":  # smooth random noise, thresholded at its median
        cells = size // 8 + 2
        noise = rng.normal(size=(cells, cells))
        noise = ((noise - noise.min()) / (np.ptp(noise) + 1e-9) * 255).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(noise).resize((size + 16, size + 16), Image.BICUBIC), dtype=np.float64)
        smooth = smooth[8 : 8 + size, 8 : 8 + size]
        return smooth > np.median(smooth)
    raise ValueError(f"unknown sample texture {texture!r}")  # pragma: no cover - guarded by SAMPLE_CLASSES


def render_sample(texture: str, rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """One RGB image of ``texture``: random period, phase and two grey levels, noise, sometimes blur."""
    return render_grey_texture(_texture_mask(texture, rng, size), rng)


def render_grey_texture(mask: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A boolean (H, W) texture mask as the sample set renders it: two random grey levels at least
    ``MIN_CONTRAST`` apart, Gaussian noise (std 12), and a light blur in 30% of the images."""
    size = mask.shape
    low, high = np.sort(rng.uniform(0, 255, size=2))
    if high - low < MIN_CONTRAST:
        middle = (low + high) / 2
        low, high = max(middle - MIN_CONTRAST / 2, 0.0), min(middle + MIN_CONTRAST / 2, 255.0)
    fg, bg = (low, high) if rng.random() < 0.5 else (high, low)
    grey = np.where(mask, fg, bg) + rng.normal(0, 12, size=size)
    image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return image


def _remove_stale_classes(root: Path) -> None:
    """Delete the class folders that an older sample version wrote under ``root`` and this one does not.

    Only when ``root`` holds an older version's completion marker, and only files named as the sample
    writer names them (``<class>_<4 digits>.png`` in ``<split>/<class>/``): nothing of the user's is touched.
    """
    old_markers = [m for m in root.glob(".complete-v*") if not m.name.startswith(f".complete-v{SAMPLE_VERSION}-")]
    if not old_markers:
        return
    for split in DEFAULT_COUNTS:
        for folder in (root / split).glob("*"):
            if not folder.is_dir() or folder.name in SAMPLE_CLASSES:
                continue
            ours = [f for f in folder.iterdir() if re.fullmatch(rf"{re.escape(folder.name)}_\d{{4}}\.png", f.name)]
            for f in ours:
                f.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    for m in old_markers:
        m.unlink()


def check_sample_root(root: str | Path, option: str = "--out") -> None:
    """Refuse to write the sample set into ``root`` unless it is new, empty, or already a sample set.

    A sample set is a folder with a ``.complete-v*`` marker, or (an interrupted first write) one that holds
    nothing but ``train/`` and ``val/`` with sample class folders in them. Anything else is someone's data:
    adding eight class folders to it would silently change what it trains and evaluates on.
    """
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DinokitError(f"{option} {str(root)!r} is a file, not a folder; give a new or empty folder")
    if root.is_dir() and any(root.glob(".complete-v*")):
        return
    from ..engine.run_dir import check_writable

    check_writable(root, option)  # to be written: under a file, or read-only, is one line too
    if not root.is_dir():
        return
    entries = list(root.iterdir())
    ours = all(
        e.name in DEFAULT_COUNTS and e.is_dir() and all(c.name in SAMPLE_CLASSES and c.is_dir() for c in e.iterdir())
        for e in entries
    )
    if entries and not ours:
        raise DinokitError(f"{option} {str(root)!r} is not empty and is not a dinokit sample set; "
                           "give a new or empty folder")


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
    _remove_stale_classes(root)
    for split, count in sorted(counts.items()):
        split_seed = zlib.crc32(split.encode())  # an image depends on its split's name, not on the other splits
        for class_index, texture in enumerate(SAMPLE_CLASSES):
            folder = root / split / texture
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_seed, class_index, i])
                path = folder / f"{texture}_{i:04d}.png"
                buffer = io.BytesIO()
                render_sample(texture, rng, image_size).save(buffer, format="PNG")
                data = buffer.getvalue()
                if path.exists():
                    if path.is_file() and path.read_bytes() == data:
                        continue  # written by an earlier, interrupted call
                    raise DinokitError(f"{path} already exists and is not part of the sample set; it is left as it "
                                       "is: give an empty or new folder")
                with atomic_write(path) as tmp:  # a per-process temporary: processes writing the set at once
                    tmp.write_bytes(data)        # (torchrun ranks) never take each other's file
    marker.touch()
    return root
