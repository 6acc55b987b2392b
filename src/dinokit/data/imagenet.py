"""ImageNet-1k in the official layout, readable with or without the ``extra`` metadata.

Files under ``root``::

    train/<wnid>/<wnid>_<n>.JPEG
    val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG
    test/ILSVRC2012_test_<8 digits>.JPEG
    labels.txt            # "<wnid>,<class name>" per line, in class-index (sorted wnid) order

``dump_imagenet_extra(root, extra)`` (CLI: ``dinokit data imagenet-extra``) writes the official
metadata files under ``extra``: ``entries-{SPLIT}.npy`` (structured: actual_index <u4, class_index
<u4, class_id U*, class_name U*), ``class-ids-{SPLIT}.npy`` and ``class-names-{SPLIT}.npy``; files
written by the official ``dump_extra()`` load too. Without ``extra`` the split folder is scanned
instead (slower to start on the full set, no preparation step). Subsets of ImageNet work: sizes are
not checked, and class indices come from ``labels.txt`` so they match the full 1000-class set.
Without ``labels.txt`` the classes are the sorted ``train/`` folders, named by their wnid. ``real_labels=PATH``
(VAL) reads ImageNet-ReaL's ``real.json`` (the reassessed labels of each validation image) for the
``imagenet_real_accuracy`` test metric of ``dinokit eval linear``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DinokitError
from .datasets import ImageDataset
from .listing import read_user_text

SPLITS = ("TRAIN", "VAL", "TEST")
NO_CLASS = 2**32 - 1  # class_index of TEST entries: uint32(-1), as in the official files
_FILE_PATTERNS = {
    "TRAIN": re.compile(r"(?P<wnid>n\d+)_(?P<index>\d+)\.JPEG"),
    "VAL": re.compile(r"ILSVRC2012_val_(?P<index>\d{8})\.JPEG"),
    "TEST": re.compile(r"ILSVRC2012_test_(?P<index>\d{8})\.JPEG"),
}
_FILE_EXAMPLES = {"TRAIN": "{wnid}_10026.JPEG", "VAL": "ILSVRC2012_val_00000001.JPEG",
                  "TEST": "ILSVRC2012_test_00000001.JPEG"}


class EntryPaths(Sequence[Path]):
    """The image paths of an entries array, built on access.

    A list of 1.28M ``Path`` objects would take ~10 s to build and ~400 MB that every DataLoader worker
    ends up copying; the (memory-mapped) entries array is shared instead.
    """

    def __init__(self, root: Path, split: str, entries: np.ndarray) -> None:
        self.root, self.split, self.entries = root, split, entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int | slice) -> Path | list[Path]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        entry = self.entries[index]
        return self.root / _relative_path(self.split, int(entry["actual_index"]), str(entry["class_id"]))


class ImageNetDataset(ImageDataset):
    """An :class:`ImageDataset` with the ImageNet metadata: ``entries`` and human-readable ``class_names``.

    ``classes`` holds the wnids (class ids) in class-index order; TEST targets are -1. ``paths`` is a
    lazy :class:`EntryPaths` sequence rather than a list.
    """

    def __init__(
        self,
        *,
        split: str,
        root: Path,
        entries: np.ndarray,
        class_ids: list[str],
        class_names: list[str],
        transform: Callable | None,
        name: str,
    ) -> None:
        super().__init__([], [], class_ids, transform, name)
        self.paths = EntryPaths(root, split, entries)
        self.targets = [-1] * len(entries) if split == "TEST" else entries["class_index"].astype(np.int64).tolist()
        self.split = split
        self.entries = entries
        self.class_names = class_names
        self.real_labels: list[list[int]] | None = None  # VAL with real_labels=: each image's ImageNet-ReaL classes


def _relative_path(split: str, index: int, wnid: str) -> str:
    if split == "TRAIN":
        return f"train/{wnid}/{wnid}_{index}.JPEG"
    if split == "VAL":
        return f"val/{wnid}/ILSVRC2012_val_{index:08d}.JPEG"
    return f"test/ILSVRC2012_test_{index:08d}.JPEG"


def _check_split(split: str | None) -> str:
    normalised = (split or "").upper()
    if normalised not in SPLITS:
        raise DinokitError(
            f"ImageNet split must be one of {', '.join(SPLITS)}, not {split!r} (e.g. 'ImageNet:split=TRAIN:root=...')"
        )
    return normalised


def read_labels(root: Path) -> tuple[list[str], list[str]]:
    """(wnids, class names) in class-index order, from ``root/labels.txt`` or else the ``train/`` folders.

    ``labels.txt`` lines are ``wnid,class name`` (a name may itself contain commas); the
    ``wnid class name`` form of ``LOC_synset_mapping.txt`` is accepted too.
    """
    labels = root / "labels.txt"
    if labels.is_file():
        wnids, names, lines = [], [], {}
        for number, line in enumerate(read_user_text(labels).splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            if len(line.split(",", 1)[0].split()) > 1:  # "wnid class name" (LOC_synset_mapping.txt)
                row = line.split(maxsplit=1)
            else:  # CSV: "wnid,class name" or 'wnid,"name, with commas"'
                row = next(csv.reader([line]))
            wnid = row[0].strip()
            if wnid in lines:  # it would shift the class index of every class after it
                raise DinokitError(f"{str(labels)!r} lists {wnid} twice (lines {lines[wnid]} and {number}); keep one "
                                   "line per class")
            lines[wnid] = number
            wnids.append(wnid)
            names.append(",".join(row[1:]).strip())
        return wnids, names
    for folder in ("train", "val"):
        if (root / folder).is_dir():
            wnids = sorted(e.name for e in os.scandir(root / folder) if e.is_dir() and not e.name.startswith("."))
            return wnids, list(wnids)
    raise DinokitError(f"{str(root)!r} has neither labels.txt nor a train/ or val/ folder; is it an ImageNet root?")


def _image_names(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))


def _parse_index(split: str, folder: Path, name: str) -> int:
    match = _FILE_PATTERNS[split].fullmatch(name)
    if match is None:
        raise DinokitError(
            f"unexpected file {str(folder / name)!r} in the ImageNet {split} split (expected names like "
            f"{_FILE_EXAMPLES[split].format(wnid=folder.name)!r}); remove it, or use 'ImageFolder:root=...' for other "
            "layouts"
        )
    if split == "TRAIN" and match.group("wnid") != folder.name:
        raise DinokitError(
            f"{str(folder / name)!r} is in the folder of another class; move it to train/{match.group('wnid')}/"
        )
    return int(match.group("index"))


def scan_entries(root: str | Path, split: str) -> np.ndarray:
    """The ``entries-{SPLIT}`` structured array of one split, by listing its folder (sorted, as ImageFolder)."""
    root, split = Path(root), _check_split(split)
    folder = root / split.lower()
    if not folder.is_dir():
        raise DinokitError(f"ImageNet {split} folder {str(folder)!r} does not exist; check root=")
    rows: list[tuple[int, int, str, str]] = []
    if split == "TEST":
        rows = [(_parse_index(split, folder, n), NO_CLASS, "", "") for n in _image_names(folder)]
    else:
        wnids, names = read_labels(root)
        class_index = {wnid: i for i, wnid in enumerate(wnids)}
        for wnid in sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")):
            if wnid not in class_index:
                raise DinokitError(
                    f"class folder {str(folder / wnid)!r} is not listed in labels.txt; add '{wnid},<name>' to it"
                )
            i = class_index[wnid]
            rows += [(_parse_index(split, folder / wnid, n), i, wnid, names[i]) for n in _image_names(folder / wnid)]
    if not rows:
        raise DinokitError(f"no images found in the ImageNet {split} folder {str(folder)!r}")
    id_len = max(1, max(len(r[2]) for r in rows))
    name_len = max(1, max(len(r[3]) for r in rows))
    dtype = np.dtype(
        [("actual_index", "<u4"), ("class_index", "<u4"), ("class_id", f"U{id_len}"), ("class_name", f"U{name_len}")]
    )
    return np.array(rows, dtype=dtype)


def dump_imagenet_extra(root: str | Path, extra: str | Path) -> list[Path]:
    """Write the metadata files of every split folder present under ``root`` into ``extra``; returns them."""
    root, extra = Path(root), Path(extra)
    if not root.is_dir():
        raise DinokitError(f"ImageNet root {str(root)!r} does not exist or is not a folder; check --root")
    splits = [s for s in SPLITS if (root / s.lower()).is_dir()]
    if not splits:
        raise DinokitError(f"{str(root)!r} has no train/, val/ or test/ folder; give the ImageNet root with --root")
    if extra.exists() and not extra.is_dir():
        raise DinokitError(f"--extra {str(extra)!r} is a file, not a folder; give a folder for the metadata files")
    from ..engine.run_dir import check_writable

    check_writable(extra, "--extra")  # under a file, or read-only: one line before the splits are scanned
    wnids, names = read_labels(root) if splits != ["TEST"] else ([], [])
    files = {}  # every split scanned before anything is written: a bad root leaves no half-filled --extra
    for split in splits:
        files[f"entries-{split}.npy"] = scan_entries(root, split)
        if split != "TEST":  # the official files have no class lists for TEST
            files[f"class-ids-{split}.npy"] = np.array(wnids, dtype=f"U{max(map(len, wnids), default=1)}")
            files[f"class-names-{split}.npy"] = np.array(names, dtype=f"U{max(map(len, names), default=1)}")
    extra.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, array in files.items():
        np.save(extra / filename, array)
        written.append(extra / filename)
    return written


def _load_extra(extra: Path, split: str, root: Path) -> tuple[np.ndarray, list[str], list[str]]:
    def load(filename: str) -> np.ndarray:
        path = extra / filename
        if not path.is_file():
            raise DinokitError(
                f"ImageNet metadata {str(path)!r} is missing; "
                f"run 'dinokit data imagenet-extra --root {shlex.quote(str(root))} --extra {shlex.quote(str(extra))}'"
            )
        return np.load(path, mmap_mode="r")

    entries = load(f"entries-{split}.npy")
    if split == "TEST":
        return entries, [], []
    return entries, [str(c) for c in load(f"class-ids-{split}.npy")], [str(c) for c in load(f"class-names-{split}.npy")]


def make_imagenet_dataset(
    *,
    split: str | None = None,
    root: str | None = None,
    extra: str | None = None,
    real_labels: str | None = None,
    transform: Callable | None = None,
    dataset_str: str = "",
) -> ImageNetDataset:
    """The ImageNet ``split`` under ``root``; metadata from ``extra`` when given, else from scanning the folders;
    ``real_labels`` (VAL only): the ImageNet-ReaL ``real.json`` of the images' reassessed labels."""
    split = _check_split(split)
    if real_labels and split != "VAL":
        raise DinokitError(f"real_labels= is ImageNet-ReaL's relabelling of the VAL split, not {split} "
                           f"(in {dataset_str!r})")
    if not root:
        raise DinokitError(f"ImageNet needs root=PATH (in {dataset_str!r})")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DinokitError(f"ImageNet root {root!r} does not exist or is not a folder (in {dataset_str!r})")
    if extra:
        entries, class_ids, class_names = _load_extra(Path(extra).expanduser(), split, root_path)
    else:
        entries = scan_entries(root_path, split)
        class_ids, class_names = read_labels(root_path) if split != "TEST" else ([], [])
    dataset = ImageNetDataset(
        split=split,
        root=root_path,
        entries=entries,
        class_ids=class_ids,
        class_names=class_names,
        transform=transform,
        name=dataset_str or f"ImageNet:split={split}:root={root}",
    )
    if real_labels:
        dataset.real_labels = read_real_labels(real_labels, entries["actual_index"], len(class_ids))
    return dataset


def read_real_labels(path: str | Path, val_indices: Sequence[int], n_classes: int) -> list[list[int]]:
    """The ImageNet-ReaL labels of the validation images numbered ``val_indices`` (``ILSVRC2012_val_<n>``, from 1),
    from its ``real.json``: one list of class indices per validation image, in file-number order (JSON only: no
    code runs)."""
    path = Path(path).expanduser()
    try:
        real = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DinokitError(f"ImageNet-ReaL labels {str(path)!r} cannot be read ({type(e).__name__}: {e}); give the "
                           "real.json of the ReaL release (a JSON list of label lists)") from None
    if not isinstance(real, list) or not all(
            isinstance(r, list) and all(isinstance(c, int) and 0 <= c < n_classes for c in r) for r in real):
        raise DinokitError(f"ImageNet-ReaL labels {str(path)!r} are not a JSON list of lists of class indices "
                           f"0..{n_classes - 1}")
    beyond = [int(i) for i in val_indices if not 1 <= int(i) <= len(real)]
    if beyond:
        raise DinokitError(f"ImageNet-ReaL labels {str(path)!r} have {len(real)} images; the validation set holds "
                           f"ILSVRC2012_val_{beyond[0]:08d}")
    return [real[int(i) - 1] for i in val_indices]
