"""Finding and decoding image files, robustly.

A bad file (unreadable, truncated, not an image) never stops a run: datasets return ``None`` for it
and :func:`collate_skip_bad` drops it from the batch while recording its index.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ..errors import DinokitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def find_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive), in sorted order; skips hidden files and folders."""
    root = Path(root)
    if not root.exists():
        raise DinokitError(f"input path {str(root)!r} does not exist; check the path")
    if root.is_file():
        return [root]
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return files


def read_path_list(list_file: str | Path) -> list[Path]:
    """Image paths from a text file, one per line; blank lines and ``#`` comments are ignored.

    Relative paths are taken relative to the list file's folder.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DinokitError(f"list file {str(list_file)!r} does not exist; check the path")
    base = list_file.parent
    paths = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        paths.append(p if p.is_absolute() else base / p)
    return paths


def resolve_image_inputs(input_path: str | Path) -> list[Path]:
    """A folder (recursive), a single image, or a ``.txt``/``.lst`` file listing image paths."""
    path = Path(input_path)
    if not path.exists():
        raise DinokitError(f"input path {str(path)!r} does not exist; give a folder, an image or a text file of paths")
    if path.is_dir():
        files = find_images(path)
        if not files:
            raise DinokitError(f"no images found under {str(path)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return files
    if is_image_file(path):
        return [path]
    if path.suffix.lower() in (".txt", ".lst", ".csv"):
        files = read_path_list(path)
        if not files:
            raise DinokitError(f"list file {str(path)!r} names no images")
        return files
    raise DinokitError(f"{str(path)!r} is neither a folder, an image, nor a .txt list of image paths")


def load_image(path: str | Path) -> Image.Image:
    """Decode an image fully as RGB; raises ``OSError``/``ValueError`` for unreadable or truncated files."""
    with Image.open(path) as img:
        img.load()  # force full decode so that truncation is detected here, not later
        return img.convert("RGB")


class ImageFiles(Dataset):
    """Images given by path, with optional integer targets; a bad file yields ``None``.

    Each item is ``(index, image_or_None, target)``; ``image`` is ``transform(PIL image)``.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Sequence[int] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.targets = list(targets) if targets is not None else [-1] * len(self.paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def read_image(self, index: int) -> Image.Image:
        """The decoded RGB image of item ``index`` (subclasses read from elsewhere, e.g. tar shards)."""
        return load_image(self.paths[index])

    def __getitem__(self, index: int):
        try:
            image = self.read_image(index)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            warnings.warn(f"skipping unreadable image {self.paths[index]}: {err}", stacklevel=2)
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
