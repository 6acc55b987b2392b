"""Decoding image files, robustly (finding them: ``listing.py``).

A bad file (unreadable, truncated, not an image) never stops a run: datasets return ``None`` for it
and :func:`collate_skip_bad` drops it from the batch while recording its index.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from ..errors import DinokitError
from .listing import PathColumn

# Decoding settings, read from the environment so that every command and every data-loader worker
# (forked or spawned) decodes the same way.
BACKGROUND_ENV = "DINOKIT_IMAGE_BACKGROUND"  # white (default), black, grey, or R,G,B
MAX_PIXELS_ENV = "DINOKIT_MAX_IMAGE_PIXELS"  # pixels above which a file is skipped (0: no limit)
_ORIENTATION = 0x0112  # the EXIF tag of a camera's orientation (1: as stored; 2-8: flipped and/or rotated)
EXIF_ENV = "DINOKIT_EXIF_ORIENTATION"  # apply (default) or ignore: the official pipeline's stored pixels
DEFAULT_MAX_PIXELS = 200_000_000
_NAMED_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128), "gray": (128, 128, 128)}


def image_background(value: str | None = None) -> tuple[int, int, int]:
    """The colour transparent pixels are composited onto: ``value`` or ``$DINOKIT_IMAGE_BACKGROUND`` (white)."""
    text = (value if value is not None else os.environ.get(BACKGROUND_ENV, "")).strip().lower() or "white"
    if text in _NAMED_BACKGROUNDS:
        return _NAMED_BACKGROUNDS[text]
    try:
        rgb = tuple(int(v) for v in text.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise DinokitError(f"{BACKGROUND_ENV}={text!r} is not a colour; use white, black, grey or R,G,B (0-255)")
    return rgb  # type: ignore[return-value]


def apply_exif_orientation() -> bool:
    """Whether a camera's EXIF orientation is applied: ``$DINOKIT_EXIF_ORIENTATION`` apply (default) or ignore."""
    text = os.environ.get(EXIF_ENV, "").strip().lower() or "apply"
    if text not in ("apply", "ignore"):
        raise DinokitError(f"{EXIF_ENV}={text!r} is not a choice; use apply (as viewers show photos) or ignore (the "
                           "stored pixels, as the official pipeline reads them)")
    return text == "apply"


def decoding_settings() -> dict:
    """What the environment changes in decoded pixels (background, EXIF orientation, pixel limit): part of the key
    of anything computed from images and kept (the eval feature cache, curation's embeddings)."""
    return {"background": image_background(), "exif": apply_exif_orientation(), "max_pixels": max_image_pixels()}


def max_image_pixels() -> int | None:
    """The pixel limit of one image (``$DINOKIT_MAX_IMAGE_PIXELS``, default 200 million; 0 = none)."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except (ValueError, OverflowError):  # also inf, 1e400
        raise DinokitError(f"{MAX_PIXELS_ENV}={text!r} is not a number of pixels; e.g. 500000000, or 0 for no limit") from None
    return value if value > 0 else None


class ImageTooLargeError(ValueError):
    """An image above the pixel limit (it is skipped like an unreadable file, with this reason)."""


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB as a person sees the image: transparency over ``background``, 16-bit and float data scaled to 8 bits."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency, then composited like any alpha
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        data = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or data.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(data * (255.0 / top)), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        data = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(data)
        top = float(data[finite].max(initial=0.0))  # +inf: the brightest value there is; NaN, -inf: black
        data = np.where(finite, data, np.where(np.isposinf(data), top, 0.0))
        img = Image.fromarray(np.clip(np.round(data * _float_scale(data)), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _float_scale(data: np.ndarray) -> float:
    """What brings a float image to 0..255: values in [0, 1] (up to 2: a little over from resampling or HDR, which a
    scale of 1 made nearly black), in [0, 255] as they are, and larger ones (16-bit or HDR ranges) by their maximum."""
    top = float(data.max(initial=0.0))
    return 255.0 if top <= 2.0 else 1.0 if top <= 255.0 else 255.0 / top


def upright(img: Image.Image, exif: bool | None = None) -> Image.Image:
    """``img`` turned as its camera's EXIF orientation says (as viewers show it), unless ``exif`` is False (None:
    ``$DINOKIT_EXIF_ORIENTATION``, apply by default)."""
    exif = apply_exif_orientation() if exif is None else exif
    if exif and img.getexif().get(_ORIENTATION, 1) in range(2, 9):
        return ImageOps.exif_transpose(img)
    return img


def as_seen(img: Image.Image, *, background: str | None = None, exif: bool | None = None) -> Image.Image:
    """An opened image as :func:`load_image` decodes it (upright, RGB, transparency over the background, 16 bits
    scaled): for PIL images a caller passes in instead of a path."""
    return _to_rgb(upright(img, exif), image_background(background))


def load_image(path: str | Path | IO[bytes], *, draft_size: int | None = None, background: str | None = None,
               exif: bool | None = None) -> Image.Image:
    """Decode an image fully as RGB, as a person sees it; raises ``OSError``/``ValueError`` for unreadable,
    truncated or too large files (:class:`ImageTooLargeError`, whose message gives the size and the limit).

    Transparent pixels are composited onto white (``background`` or ``$DINOKIT_IMAGE_BACKGROUND``),
    16-bit greyscale is scaled to 8 bits, and a JPEG is decoded at a reduced scale (at least
    ``draft_size`` pixels on its short side) when ``draft_size`` is given. A camera's EXIF orientation is
    applied (a phone photo stored sideways comes out upright, as viewers show it; the official pipeline reads
    the stored pixels) unless ``exif`` is False (None: ``$DINOKIT_EXIF_ORIENTATION``, apply by default).
    """
    limit = max_image_pixels()
    image_background(background)  # a wrong $DINOKIT_IMAGE_BACKGROUND (or EXIF setting) is one line before decoding
    exif = apply_exif_orientation() if exif is None else exif
    with warnings.catch_warnings(record=True) as caught:  # Pillow's about this file (e.g. "Corrupt EXIF data")
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is the one that counts
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with _open(path) as img:
                pixels = img.width * img.height
                if limit is not None and pixels > limit:
                    raise ImageTooLargeError(
                        f"{img.width}x{img.height} image ({pixels:,} pixels) is above the limit of {limit:,} pixels "
                        f"(raise it with {MAX_PIXELS_ENV}=N, 0 for no limit)"
                    )
                if draft_size and img.format == "JPEG":
                    scale = max(1, min(img.width, img.height) // int(draft_size))
                    if scale > 1:
                        img.draft("RGB", (img.width // scale, img.height // scale))
                img.load()  # force full decode so that truncation is detected here, not later
                seen = as_seen(img, background=background, exif=exif)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    for w in caught:  # one line naming the file (Pillow's names its own source line, not the image)
        where = path if isinstance(path, (str, Path)) else "an image"
        warnings.warn_explicit(f"{where}: {' '.join(str(w.message).split())}", w.category, "dinokit", 0)
    return seen


def _open(source: str | Path | IO[bytes]) -> Image.Image:
    """``Image.open``; an unidentifiable stream of bytes says so without the stream object's repr (a memory address
    where the caller names the file)."""
    if isinstance(source, (str, Path)):
        return Image.open(source)
    try:
        return Image.open(source)
    except UnidentifiedImageError:
        raise UnidentifiedImageError("cannot identify image file (not an image, or an unknown format)") from None


def crop_draft_size(size: int | Sequence[int], min_scale: float = 1.0) -> int:
    """The short side an image needs so that a crop of ``min_scale`` of its area still has ``size`` pixels across
    (a random-resized crop is then never upsampled): ``ceil(size / sqrt(min_scale))``."""
    side = max(size) if isinstance(size, Sequence) else int(size)
    return math.ceil(side / math.sqrt(min_scale) - 1e-9)


def multi_crop_draft_size(global_size: int, local_size: int, gram_size: int | None,
                          global_scale: Sequence[float], local_scale: Sequence[float]) -> int:
    """The short side the multi-crop augmentation needs of an image (either path): its smallest global crop at the
    larger of the global and Gram sides (a Gram crop is cut from its global crop's region), its smallest local
    crop at the local side."""
    return max(crop_draft_size(max(global_size, gram_size or 0), global_scale[0]),
               crop_draft_size(local_size, local_scale[0]))


def draft_size_for(transform: Any) -> int | None:
    """The short side ``transform`` needs of its input (so larger JPEGs may be decoded at reduced scale), or None
    when it cannot tell: a ``draft_size`` attribute (of the transform or of a step), else the first resize or crop of
    a torchvision ``Compose``."""
    from torchvision.transforms import v2

    declared = getattr(transform, "draft_size", None)
    if declared is not None:
        return int(declared)
    steps = getattr(transform, "transforms", None) if isinstance(transform, v2.Compose) else [transform]
    for step in steps or ():
        if getattr(step, "draft_size", None) is not None:  # e.g. data.transforms.ResizeCentreCrop
            return int(step.draft_size)
        if isinstance(step, v2.RandomResizedCrop):
            return crop_draft_size(step.size, step.scale[0])
        if isinstance(step, (v2.Resize, v2.CenterCrop)) and step.size is not None:
            return crop_draft_size(step.size)
        if isinstance(step, v2.Compose):
            return draft_size_for(step)
    return None


def typical_short_side(paths: Sequence[str | Path], samples: int = 32) -> int | None:
    """The median short side, in pixels, of up to ``samples`` images spread evenly over ``paths`` (headers only:
    nothing is decoded); None when none of them can be read."""
    step = max(1, len(paths) // samples)
    sides = []
    for index in range(0, len(paths), step)[:samples]:
        try:
            with Image.open(paths[index]) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return sorted(sides)[len(sides) // 2] if sides else None


class SkippedImageWarning(UserWarning):
    """An image left out of a run, with the reason (shown once per file, without a source line)."""


def warn_skipped(path: str | Path, err: Exception, kind: str | None = None) -> None:
    """Warn that ``path`` is skipped and why (one line: no source line of the data loader under it); ``kind``
    says what is wrong with it (default: "too large" or "unreadable")."""
    kind = kind or ("too large" if isinstance(err, ImageTooLargeError) else "unreadable")
    reason = " ".join(str(err).split()) or type(err).__name__
    warnings.warn_explicit(f"skipping {kind} image {path}: {reason}", SkippedImageWarning, "dinokit", 0)


class ImageFiles(Dataset):
    """Images given by path, with optional integer targets; a bad file yields ``None``.

    Each item is ``(index, image_or_None, target)``; ``image`` is ``transform(PIL image)``. Large JPEGs are
    decoded at reduced scale, down to :attr:`draft_size` pixels on their short side: the one set, else the
    one ``transform`` needs (:func:`draft_size_for`), else full size.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Sequence[int] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        draft_size: int | None = None,
    ) -> None:
        self.paths: Sequence[Path] = paths if isinstance(paths, PathColumn) else PathColumn(paths)
        self.targets = list(targets) if targets is not None else [-1] * len(self.paths)
        self.transform = transform
        self._draft_size = draft_size

    @property
    def draft_size(self) -> int | None:
        return self._draft_size if self._draft_size is not None else draft_size_for(self.transform)

    @draft_size.setter
    def draft_size(self, value: int | None) -> None:
        self._draft_size = value

    def __len__(self) -> int:
        return len(self.paths)

    def read_image(self, index: int) -> Image.Image:
        """The decoded RGB image of item ``index`` (subclasses read from elsewhere, e.g. tar shards)."""
        return load_image(self.paths[index], draft_size=self.draft_size)

    def __getitem__(self, index: int):
        try:
            image = self.read_image(index)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            warn_skipped(self.paths[index], err)
            return index, None, self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        return index, image, self.targets[index]


def collate_skip_bad(batch: list[tuple]) -> dict[str, Any]:
    """Collate ``(index, image_or_None, target)`` items, dropping bad ones.

    Returns ``{"index": (n,), "image": (n, ...) or None, "target": (n,), "bad": [indices]}``.
    """
    good = [item for item in batch if item[1] is not None]
    bad = [int(item[0]) for item in batch if item[1] is None]
    if not good:
        return {"index": torch.empty(0, dtype=torch.long), "image": None, "target": torch.empty(0, dtype=torch.long), "bad": bad}
    index, images, targets = zip(*good)
    return {
        "index": torch.as_tensor(index, dtype=torch.long),
        "image": default_collate(list(images)),
        "target": torch.as_tensor(targets, dtype=torch.long),
        "bad": bad,
    }
