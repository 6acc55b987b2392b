"""Labelled image sets for the small-data benchmark (``benchmarks/small_data.py``), none of them the sample set.

Each set is written under a root folder, deterministically, in the ImageFolder layout ``<set>/{train,val}/<class>/``:

- ``shapes``: 10 classes of filled shapes in random colours on random-colour backgrounds (generated);
- ``patterns``: 8 new two-colour texture families in random colours (waves, zigzag, bricks, ...; generated);
- ``families``: 8 grey texture families that the sample set does not hold (zigzag, waves, crosses, hex dots,
  squares, triangles, bricks, spiral; any orientation), rendered like it (generated; also
  ``benchmarks/stages.py``'s new data);
- ``clipart``: 8 top-level categories of the Open Clip Art Library (Debian ``openclipart-png``);
- ``tuxpaint``: 7 categories of Tux Paint's stamps (Debian ``tuxpaint-stamps-default``);
- ``emoji``: the 9 groups of Unicode's emoji list (smileys, people, animals, food, travel, activities, objects,
  symbols, flags) drawn from Google's Noto Color Emoji font (Debian ``fonts-noto-color-emoji`` and
  ``unicode-data``): one picture per fully-qualified emoji, skin-tone variants left out;
- ``icons``: 6 categories of two desktop icon themes by different artists (Debian ``oxygen-icon-theme``, 64 px, and
  ``tango-icon-theme``, 32 px): actions, apps, devices, mimetypes, places, status. Held out like ``emoji``.

The real images are composited onto white, padded to a square and stored at 96 px (as the generated ones),
so that training reads small files. ``prepare_set(name, root)`` writes one (if needed) and returns its folder.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dinokit.data.sample import render_grey_texture

IMAGE_SIZE = 96

# ---------------------------------------------------------------------------------------------- generated sets
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent", "arrow", "diamond")
# Upright, tilted by at most 20 degrees, as objects in photos are: DINO's augmentations (crops, flips, colour,
# blur) teach no rotation invariance, so with any rotation the classes are defined by something that no preset
# learns. (A first version with uniform rotations: teacher 11-13% on shapes, raw pixels 17%.)
MAX_TILT = math.radians(20)
UPRIGHT = {"triangle": -math.pi / 2, "star": -math.pi / 2, "arrow": -math.pi / 2}  # point up; others: angle 0
PATTERNS = ("waves", "zigzag", "bricks", "honeycomb", "spiral", "plaid", "concentric_squares", "polka_lattice")


def _random_colours(rng: np.random.Generator, min_distance: float = 90.0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two random RGB colours at least ``min_distance`` apart (so the foreground is always visible)."""
    while True:
        a, b = rng.integers(0, 256, size=(2, 3))
        if np.linalg.norm(a.astype(float) - b) >= min_distance:
            return tuple(int(v) for v in a), tuple(int(v) for v in b)


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [(cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n))
            for i, r in enumerate(radii)]


def _shape_outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon of ``shape`` centred at (cx, cy) with outer radius r, rotated by ``angle``."""
    if shape == "square":
        return _polygon(cx, cy, [r] * 4, angle + math.pi / 4)
    if shape == "diamond":  # a rhombus, twice as long as wide
        pts = [(r, 0.0), (0.0, r / 2), (-r, 0.0), (0.0, -r / 2)]
    elif shape == "triangle":
        return _polygon(cx, cy, [r] * 3, angle)
    elif shape == "hexagon":
        return _polygon(cx, cy, [r] * 6, angle)
    elif shape == "star":
        return _polygon(cx, cy, [r, 0.42 * r] * 5, angle)
    elif shape == "cross":
        w = 0.33 * r
        pts = [(w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r),
               (w, r)]
    elif shape == "arrow":
        w = 0.28 * r
        pts = [(-r, w), (0.1 * r, w), (0.1 * r, 2.2 * w), (r, 0.0), (0.1 * r, -2.2 * w), (0.1 * r, -w), (-r, -w)]
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def render_shape(shape: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One filled ``shape`` in a random colour, size, position and tilt, on a random-colour background."""
    fg, bg = _random_colours(rng)
    scale = 4  # drawn at 4x and reduced: smooth edges
    big = size * scale
    image = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(image)
    r = big * rng.uniform(0.2, 0.38)
    cx, cy = rng.uniform(r, big - r, size=2) if r < big / 2 else (big / 2, big / 2)
    angle = UPRIGHT.get(shape, 0.0) + rng.uniform(-MAX_TILT, MAX_TILT)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=bg)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        ox, oy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        draw.ellipse([cx + ox - 0.85 * r, cy + oy - 0.85 * r, cx + ox + 0.85 * r, cy + oy + 0.85 * r], fill=bg)
    else:
        draw.polygon(_shape_outline(shape, cx, cy, r, angle), fill=fg)
    image = image.resize((size, size), Image.BICUBIC)
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, 8, size=(size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _pattern_mask(pattern: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean (size, size) foreground of ``pattern`` with random period and phase, tilted by at most MAX_TILT."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(-MAX_TILT, MAX_TILT)
    u = x * math.cos(angle) + y * math.sin(angle) + rng.uniform(0, size)
    v = -x * math.sin(angle) + y * math.cos(angle) + rng.uniform(0, size)
    period = size * rng.uniform(1 / 7, 1 / 4)
    if pattern == "waves":  # sinusoidal stripes
        return np.sin(2 * math.pi * (u + 0.25 * period * np.sin(2 * math.pi * v / period)) / period) > 0
    if pattern == "zigzag":  # triangle-wave stripes
        tri = np.abs((v / period) % 1.0 - 0.5) * period
        return ((u + tri) % period) < period / 2
    if pattern == "bricks":  # mortar lines of a running bond
        row = np.floor(v / (period / 2))
        shifted = u + (row % 2) * period / 2
        width = max(0.12 * period, 1.5)
        return ((v % (period / 2)) < width) | ((shifted % period) < width)
    if pattern == "honeycomb":  # hexagonal lattice of dots
        a = period / 1.7
        row = np.floor(v / (a * math.sqrt(3) / 2))
        uu = u + (row % 2) * a / 2
        du = (uu % a) - a / 2
        dv = (v % (a * math.sqrt(3) / 2)) - a * math.sqrt(3) / 4
        return du**2 + dv**2 < (0.3 * a) ** 2
    if pattern == "spiral":
        cx, cy = rng.uniform(0.2 * size, 0.8 * size, size=2)
        theta = np.arctan2(y - cy, x - cx)
        radius = np.hypot(x - cx, y - cy)
        return ((radius / period + theta / (2 * math.pi)) % 1.0) < 0.5
    if pattern == "plaid":  # two crossing bands of different widths
        return ((u % period) < 0.3 * period) ^ ((v % (1.6 * period)) < 0.5 * period)
    if pattern == "concentric_squares":
        cx, cy = rng.uniform(0.2 * size, 0.8 * size, size=2)
        dx, dy = x - cx, y - cy
        c, s = math.cos(angle), math.sin(angle)
        cheb = np.maximum(np.abs(dx * c + dy * s), np.abs(-dx * s + dy * c))
        return (cheb % period) < period / 2
    if pattern == "polka_lattice":  # plus signs on a square lattice
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        arm, width = 0.35 * period, 0.1 * period
        return ((np.abs(du) < arm) & (np.abs(dv) < width)) | ((np.abs(dv) < arm) & (np.abs(du) < width))
    raise ValueError(pattern)  # pragma: no cover - guarded by PATTERNS


def render_pattern(pattern: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One two-colour ``pattern`` in random colours, with noise and sometimes blur."""
    mask = _pattern_mask(pattern, rng, size)
    fg, bg = _random_colours(rng)
    rgb = np.where(mask[..., None], np.array(fg, float), np.array(bg, float))
    rgb = rgb + rng.normal(0, 10, size=rgb.shape)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return image


NEW_FAMILIES = ("zigzag", "waves", "crosses", "hexdots", "squares", "triangles", "bricks", "spiral")


def new_texture_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Eight texture families that are not in the built-in sample set (random period, phase, orientation)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = size * rng.uniform(1 / 10, 1 / 5)
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle) + rng.uniform(0, period)
    v = -x * math.sin(angle) + y * math.cos(angle) + rng.uniform(0, period)
    if kind == "zigzag":
        return (u + np.abs((v % period) - period / 2)) % period < period / 2
    if kind == "waves":
        return (u + 0.25 * period * np.sin(2 * math.pi * v / period)) % period < period / 2
    if kind == "crosses":
        a, b = u % period - period / 2, v % period - period / 2
        arm = 0.12 * period
        return ((np.abs(a) < arm) & (np.abs(b) < 0.35 * period)) | ((np.abs(b) < arm) & (np.abs(a) < 0.35 * period))
    if kind == "hexdots":
        row = np.floor(v / period)
        a = (u + (row % 2) * period / 2) % period - period / 2
        b = v % period - period / 2
        return a**2 + b**2 < (0.22 * period) ** 2
    if kind == "squares":
        cx, cy = rng.uniform(0, size, size=2)
        return np.maximum(np.abs(x - cx), np.abs(y - cy)) % period < period / 2
    if kind == "triangles":
        a, b = u % period, v % period
        return a < b
    if kind == "bricks":
        row = np.floor(v / (period / 2))
        a = (u + (row % 2) * period / 2) % period
        return (a < 0.12 * period) | (v % (period / 2) < 0.12 * period)
    if kind == "spiral":
        cx, cy = rng.uniform(0, size, size=2)
        r, t = np.hypot(x - cx, y - cy), np.arctan2(y - cy, x - cx)
        return (r + period * t / (2 * math.pi)) % period < period / 2
    raise ValueError(kind)

def render_family(kind: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One texture of family ``kind`` rendered like the sample set (two grey tones, noise, sometimes blur)."""
    return render_grey_texture(new_texture_mask(kind, rng, size), rng)


def write_generated(root: Path, classes: tuple[str, ...], render, counts: dict[str, int], seed: int = 0) -> Path:
    """Write ``root/<split>/<class>/<class>_NNNN.png`` (idempotent: a complete set is kept)."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(counts.items()))
    marker = root / f".complete-{seed}-{tag}"
    if marker.exists():
        return root
    for split, count in sorted(counts.items()):
        split_seed = zlib.crc32(split.encode())
        for class_index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_seed, class_index, i])
                render(name, rng).save(folder / f"{name}_{i:04d}.png")
    marker.touch()
    return root


# ---------------------------------------------------------------------------------------------- real images
CLIPART_ROOT = Path("/usr/share/openclipart/png")
CLIPART_CLASSES = ("animals", "food", "people", "transportation", "tools", "office", "geography", "plants")
TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")
TUXPAINT_CLASSES = ("animals", "food", "household", "plants", "seasonal", "town", "vehicles")
ICON_ROOTS = (Path("/usr/share/icons/oxygen/base/64x64"), Path("/usr/share/icons/Tango/32x32"))
ICON_CLASSES = ("actions", "apps", "devices", "mimetypes", "places", "status")
REAL_SETS = {
    # name: (root or roots, classes, images per class at most)
    "clipart": (CLIPART_ROOT, CLIPART_CLASSES, 320),
    "tuxpaint": (TUXPAINT_ROOT, TUXPAINT_CLASSES, 150),
    "icons": (ICON_ROOTS, ICON_CLASSES, 240),
}
VAL_FRACTION = 0.25
MAX_PIXELS = 16_000_000  # a few clip-art PNGs are rendered at 10k+ px a side: skipped (slow to decode)


def to_small_rgb(path: Path, size: int = IMAGE_SIZE) -> Image.Image:
    """The image composited onto white, padded to a centred square and resized to ``size``."""
    with Image.open(path) as im:
        if im.width * im.height > MAX_PIXELS:
            raise OSError(f"{path}: {im.width}x{im.height} is too large to decode quickly")
        im.draft("RGB", (size, size))
        im.load()
        return square_on_white(im.convert("RGBA"), size)


def square_on_white(rgba: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """An RGBA picture composited onto white, padded to a centred square and resized to ``size``."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    return square.resize((size, size), Image.BICUBIC)


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.width * im.height <= MAX_PIXELS
    except (OSError, Image.DecompressionBombError):
        return False


def _write_class(root: Path, name: str, sources: list, picture, rng: np.random.Generator, per_class: int) -> None:
    """At most ``per_class`` of ``sources`` in a random order, the first ``VAL_FRACTION`` to ``val/name``, the
    rest to ``train/name``, each saved as ``picture(source)``."""
    chosen = [sources[i] for i in rng.permutation(len(sources))[:per_class]]
    n_val = max(1, round(VAL_FRACTION * len(chosen)))
    for split, part in (("val", chosen[:n_val]), ("train", chosen[n_val:])):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, source in enumerate(part):
            picture(source).save(folder / f"{name}_{i:04d}.png")


def write_real(root: Path, source: Path | tuple[Path, ...], classes: tuple[str, ...], per_class: int,
               seed: int = 0) -> Path:
    """Every class folder's PNGs (recursively, in each source root; sorted, shuffled with ``seed``, at most
    ``per_class``), split into train and val (``VAL_FRACTION``) and written at 96 px. Exact duplicates (same
    bytes, e.g. an icon theme's links) are kept once; unreadable and huge files are left out."""
    marker = root / f".complete-{seed}-{per_class}"
    if marker.exists():
        return root
    sources = (source,) if isinstance(source, Path) else source
    for folder in sources:
        if not folder.is_dir():
            raise SystemExit(f"{folder} is missing: install the Debian package (openclipart-png, "
                             "tuxpaint-stamps-default, oxygen-icon-theme, tango-icon-theme)")
    for class_index, name in enumerate(classes):
        seen, files = set(), []
        for f in sorted(f for folder in sources for f in (folder / name).rglob("*.png")):
            digest = zlib.crc32(f.read_bytes())
            if digest not in seen and _readable(f):
                seen.add(digest)
                files.append(f)
        _write_class(root, name, files, to_small_rgb, np.random.default_rng([seed, class_index]), per_class)
    marker.touch()
    return root


EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_LIST = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_GROUPS = {"Smileys & Emotion": "smileys", "People & Body": "people", "Animals & Nature": "animals",
                "Food & Drink": "food", "Travel & Places": "travel", "Activities": "activities",
                "Objects": "objects", "Symbols": "symbols", "Flags": "flags"}
SKIN_TONES = range(0x1F3FB, 0x1F400)


def emoji_by_group(listing: Path = EMOJI_LIST) -> dict[str, list[str]]:
    """Unicode's emoji-test.txt as {class name: [emoji, ...]} in its order: fully-qualified emoji only, no
    skin-tone variants, no components."""
    groups: dict[str, list[str]] = {name: [] for name in EMOJI_GROUPS.values()}
    group = None
    for line in listing.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = EMOJI_GROUPS.get(line.split(":", 1)[1].strip())
        elif group and line.strip() and not line.startswith("#"):
            codes, rest = line.split(";", 1)
            points = [int(c, 16) for c in codes.split()]
            if rest.split("#")[0].strip() == "fully-qualified" and not any(p in SKIN_TONES for p in points):
                groups[group].append("".join(map(chr, points)))
    return groups


def render_emoji(text: str, font, size: int = IMAGE_SIZE) -> Image.Image:
    canvas = Image.new("RGBA", (160 * len(text), 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((16, 16), text, font=font, embedded_color=True)
    return square_on_white(canvas.crop(canvas.getbbox()), size)


def write_emoji(root: Path, per_class: int = 320, seed: int = 0) -> Path:
    """One picture per emoji of each group, shuffled with ``seed``, split as the other real sets."""
    from PIL import ImageFont

    marker = root / f".complete-{seed}-{per_class}"
    if marker.exists():
        return root
    if not (EMOJI_FONT.is_file() and EMOJI_LIST.is_file()):
        raise SystemExit(f"{EMOJI_FONT} or {EMOJI_LIST} is missing: install the Debian packages "
                         "fonts-noto-color-emoji and unicode-data")
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the font's one bitmap size
    for class_index, (name, texts) in enumerate(emoji_by_group().items()):
        _write_class(root, name, texts, lambda text: render_emoji(text, font),
                     np.random.default_rng([seed, class_index]), per_class)
    marker.touch()
    return root


GENERATED_SETS = {
    "shapes": (SHAPES, render_shape, {"train": 200, "val": 50}),
    "patterns": (PATTERNS, render_pattern, {"train": 200, "val": 50}),
    "families": (NEW_FAMILIES, render_family, {"train": 200, "val": 50}),
}
ALL_SETS = (*GENERATED_SETS, *REAL_SETS, "emoji")


def prepare_set(name: str, root: Path) -> Path:
    """Write set ``name`` under ``root/name`` (if needed) and return that folder."""
    folder = root / name
    if name in GENERATED_SETS:
        classes, render, counts = GENERATED_SETS[name]
        return write_generated(folder, classes, render, counts)
    if name == "emoji":
        return write_emoji(folder)
    source, classes, per_class = REAL_SETS[name]
    return write_real(folder, source, classes, per_class)
