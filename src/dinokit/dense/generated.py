"""Built-in dense sets, generated in code: segmentation of texture mosaics and depth of rendered rooms.

* Segmentation: each image holds one elliptic object filled with one of the 8 sample textures
  (:mod:`dinokit.data.sample`: own period, grey levels, noise) on a flat noisy background; the mask holds
  0 for the background and 1 + the texture index inside (9 classes, names in ``classes.txt``). Written
  as a ``SegFolder`` (``images/``, ``masks/``).
* Depth: a pinhole camera (random height, yaw and pitch) inside a box-shaped room with 1-3 boxes standing
  on the floor, ray-cast per pixel. The surfaces carry a material pattern drawn in their own surface
  coordinates, so patterns shrink with distance as in a photograph; each material comes with its own
  room size (see :func:`render_room`). The depth map is the camera-frame z of the hit point, at most
  10 m (NYU's range). Written as a ``DepthFolder`` (``images/``, ``depth/`` uint16 mm).

Both are deterministic for a seed and take a few seconds for a few hundred 64-px images on two cores.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.sample import SAMPLE_CLASSES, default_sample_root, render_sample
from ..files import atomic_write

GENERATED_VERSION = 3
DEFAULT_SIZE = 64
DEFAULT_COUNTS = {"train": 160, "val": 40}
MAX_DEPTH = 10.0


def default_dense_root(kind: str) -> Path:
    """``<sample cache>/../dense-<kind>-v<version>``, beside the classification sample set."""
    return default_sample_root().parent / f"dense-{kind}-v{GENERATED_VERSION}"


# ---------------------------------------------------------------------------------------------- segmentation
SEG_CLASSES = ("background",) + SAMPLE_CLASSES


def render_mosaic(rng: np.random.Generator, size: int = DEFAULT_SIZE, *,
                  textured_background: bool = False) -> tuple[Image.Image, np.ndarray]:
    """One textured object on a plain background: (RGB image, (size, size) uint8 class map).

    The object is a random ellipse (25-60% of the image) filled with one of the 8 sample textures
    (class 1-8); the background is flat grey with noise (class 0), or with ``textured_background`` another
    of the sample textures (its class 1-8): then only texture tells the regions apart, which makes the
    images a test of patch features (``benchmarks/stages.py``).
    """
    texture = int(rng.integers(len(SAMPLE_CLASSES)))
    y, x = np.mgrid[0:size, 0:size] + 0.5
    cy, cx = rng.uniform(0.35, 0.65, size=2) * size
    ry, rx = rng.uniform(0.3, 0.5, size=2) * size
    angle = rng.uniform(0, np.pi)
    u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / rx
    v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / ry
    inside = u**2 + v**2 < 1
    if textured_background:
        other = (texture + 1 + int(rng.integers(len(SAMPLE_CLASSES) - 1))) % len(SAMPLE_CLASSES)
        image = np.asarray(render_sample(SAMPLE_CLASSES[other], rng, size)).copy()
        background = other + 1
    else:
        grey = np.clip(rng.uniform(40, 215) + rng.normal(0, 12, size=(size, size)), 0, 255)
        image = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
        background = 0
    image[inside] = np.asarray(render_sample(SAMPLE_CLASSES[texture], rng, size))[inside]
    mask = np.where(inside, texture + 1, background).astype(np.uint8)
    return Image.fromarray(image), mask


# ---------------------------------------------------------------------------------------------- depth
def _pattern(kind: str, a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    """Boolean pattern over surface coordinates (a, b) in metres."""
    half = period / 2
    if kind == "checker":
        return (a % period < half) ^ (b % period < half)
    if kind == "hstripes":
        return b % period < half
    if kind == "vstripes":
        return a % period < half
    if kind == "grid":
        width = 0.2 * period
        return (a % period < width) | (b % period < width)
    if kind == "dots":
        return (a % period - half) ** 2 + (b % period - half) ** 2 < (0.3 * period) ** 2
    raise ValueError(f"unknown material {kind!r}")  # pragma: no cover


MATERIALS = ("checker", "vstripes", "dots")
ROOM_SCALES = (1.0, 1.6, 0.5)  # room size per material: the picture's only cue to absolute depth


def render_room(rng: np.random.Generator, size: int = DEFAULT_SIZE) -> tuple[Image.Image, np.ndarray]:
    """One rendered room: (RGB image, (size, size) float32 depth in metres).

    Every surface of a room carries the same material (one of :data:`MATERIALS`, in its own grey levels),
    and the whole room (camera height, walls, boxes, texture period) is scaled by that material's
    :data:`ROOM_SCALES` entry. Perspective makes a scaled room look the same, so position alone gives
    relative depth and only recognising the material gives the absolute scale.
    """
    f = 1.6 * size  # focal length in pixels: about 35 degrees of field of view
    v, u = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    d_cam = np.stack([(u - size / 2) / f, (size / 2 - v) / f, np.ones_like(u)])  # (3, S, S), z = 1: t is z-depth
    yaw, pitch = rng.uniform(-0.3, 0.3), rng.uniform(-0.12, 0.12)
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    rot = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]) @ np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    dx, dy, dz = np.einsum("ij,jhw->ihw", rot, d_cam)
    material = int(rng.integers(len(MATERIALS)))
    scale = ROOM_SCALES[material]
    height, ceiling = scale * rng.uniform(1.2, 1.6), scale * rng.uniform(2.6, 3.0)
    left, right, back = scale * rng.uniform(1.5, 2.5), scale * rng.uniform(1.5, 2.5), scale * rng.uniform(4.5, 5.5)

    big = np.full_like(dx, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        hits = {  # distance along the ray (= camera z-depth) to each surface, and its surface coordinates
            "floor": np.where(dy < 0, -height / dy, big),
            "ceiling": np.where(dy > 0, (ceiling - height) / dy, big),
            "left": np.where(dx < 0, -left / dx, big),
            "right": np.where(dx > 0, right / dx, big),
            "back": np.where(dz > 0, back / dz, big),
        }
        for i in range(int(rng.integers(1, 4))):
            z0 = rng.uniform(0.3, 0.8) * back
            x0, w, h = rng.uniform(-left, right - 0.4 * scale), scale * rng.uniform(0.4, 1.2), scale * rng.uniform(0.3, 1.2)
            t = np.where(dz > 0, z0 / dz, big)
            px, py = t * dx, t * dy
            inside = (px >= x0) & (px <= x0 + w) & (py >= -height) & (py <= -height + h)
            hits[f"box{i}"] = np.where(inside, t, big)
    names = list(hits)
    stack = np.stack([hits[n] for n in names])
    nearest = stack.argmin(axis=0)
    depth = stack.min(axis=0)
    px, py, pz = depth * dx, depth * dy, depth * dz  # world coordinates of the hit points
    period = scale * rng.uniform(0.3, 0.5)
    grey = np.zeros_like(depth)
    for i, name in enumerate(names):
        sel = nearest == i
        a, b = {"floor": (px, pz), "ceiling": (px, pz), "left": (pz, py), "right": (pz, py)}.get(name, (px, py))
        low = rng.uniform(20, 150)
        high = min(low + rng.uniform(60, 120), 255)
        on = _pattern(MATERIALS[material], a + rng.uniform(0, period), b + rng.uniform(0, period), period)
        grey[sel] = np.where(on, high, low)[sel]
    grey += rng.normal(0, 8, size=grey.shape)
    image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")
    return image, np.clip(depth, 0.0, MAX_DEPTH).astype(np.float32)


# ---------------------------------------------------------------------------------------------- writing
def _save_png(image: Image.Image, path: Path) -> None:
    # atomic, with a hidden per-process temporary name: a killed run leaves no half-written or stray .png, and
    # processes writing the same set at once (torchrun ranks, parallel tests) do not take each other's file
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def write_dense_sample(
    kind: str,
    root: str | Path | None = None,
    *,
    counts: dict[str, int] | None = None,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
) -> Path:
    """Write the generated ``seg`` or ``depth`` set as ``root/<split>/{images,masks|depth}`` (idempotent).

    Without ``counts``, any complete set of this version already under ``root`` is kept (else 160/40 images).
    """
    if kind not in ("seg", "depth"):
        raise ValueError(f"kind must be seg or depth, not {kind!r}")
    root = Path(root) if root is not None else default_dense_root(kind)
    if counts is None and any(root.glob(f".complete-v{GENERATED_VERSION}-{kind}-*")):
        return root  # a complete set of this version is there (maybe of other counts): use it as it is
    counts = counts or DEFAULT_COUNTS
    tag = "-".join(f"{k}{v}" for k, v in sorted(counts.items()))
    marker = root / f".complete-v{GENERATED_VERSION}-{kind}-{size}-{seed}-{tag}"
    if marker.exists():
        return root
    label_dir = "masks" if kind == "seg" else "depth"
    for split, count in sorted(counts.items()):
        split_seed = zlib.crc32(split.encode())
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / label_dir).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, split_seed, i, 1 if kind == "seg" else 2])
            name = f"{kind}_{i:04d}.png"
            if kind == "seg":
                image, mask = render_mosaic(rng, size)
                label = Image.fromarray(mask)
            else:
                image, depth = render_room(rng, size)
                label = Image.fromarray(np.round(depth * 1000).astype(np.uint16))  # millimetres, 16-bit PNG
            _save_png(image, root / split / "images" / name)
            _save_png(label, root / split / label_dir / name)
    if kind == "seg":
        (root / "classes.txt").write_text("\n".join(SEG_CLASSES) + "\n")
    marker.touch()
    return root
