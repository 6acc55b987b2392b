"""Datasets named by strings in the official syntax ``Name:key=value:...``.

* ``ImageFolder:root=PATH``: every image under PATH (recursive). First-level subfolders are the
  classes when labels are needed (evaluation); pretraining ignores them. A bare path means this.
* ``FileList:path=LIST.txt``: the images listed in a text file (relative to the file's folder);
  an optional second tab/comma-separated column gives an integer label.
* ``ImageNet:split=TRAIN|VAL|TEST:root=PATH:extra=PATH``: the official ImageNet-1k layout
  (see :mod:`dinokit.data.imagenet`).
* ``Sample:split=TRAIN|VAL[:root=PATH]``: the built-in generated set (:mod:`dinokit.data.sample`).
* ``WebDataset:urls=PATTERN``: tar shards, e.g. ``shards/{000000..000099}.tar`` (:mod:`dinokit.data.shards`).

Unlike the official parser, a value may contain ``:`` (``root=C:/data`` or URLs): the string is split
only before the known keys.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DinokitError
from .images import ImageFiles
from .listing import find_image_names, keep_existing, read_list_lines, read_path_list
from .sample import SAMPLE_CLASSES, check_sample_root, default_sample_root, write_sample_dataset

KNOWN_KEYS = ("root", "split", "extra", "path", "urls", "real_labels")
DATASET_NAMES = ("ImageFolder", "FileList", "ImageNet", "Sample", "WebDataset")
_SPLIT_RE = re.compile(r":(?=(?:%s)=)" % "|".join(KNOWN_KEYS))


class ImageDataset(ImageFiles):
    """Images with integer targets and class names; items are ``(index, image_or_None, target)``."""

    def __init__(self, paths, targets, classes: list[str], transform=None, name: str = "") -> None:
        super().__init__(paths, targets, transform)
        self.classes = classes
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images, {len(self.classes)} classes)"


# dataset names of the official code that dinokit does not read, and what they are
UNSUPPORTED_OFFICIAL = {"ImageNet22k": "the official ImageNet-22k reader (class tarballs indexed by its own scripts)"}


def parse_dataset_str(dataset_str: str, names: Sequence[str] = DATASET_NAMES) -> tuple[str, dict[str, str]]:
    """``"Name:k=v:..."`` -> (Name, {k: v}); a bare path -> ("ImageFolder", {"root": path}).

    ``names``: the dataset names accepted (other families of datasets, e.g. the dense ones, pass theirs).
    """
    text = dataset_str.strip()
    if not text:
        raise DinokitError("empty dataset string; use e.g. 'ImageFolder:root=/path/to/images'")
    head, sep, rest = text.partition(":")
    if head in UNSUPPORTED_OFFICIAL and not Path(text).exists():  # the official presets name it
        raise DinokitError(f"dataset {head!r} ({dataset_str!r}) is {UNSUPPORTED_OFFICIAL[head]}, which dinokit does not "
                           "read; give the images as a folder (ImageFolder:root=DIR), a list (FileList:path=LIST.txt) "
                           "or shards (WebDataset:urls=...; dinokit data shard makes them), e.g. "
                           "train.dataset_path=ImageFolder:root=/data/in22k")
    if head not in names:
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", head) and sep and "=" in rest.split(":")[0] and not Path(text).exists():
            raise DinokitError(
                f"unknown dataset {head!r} in {dataset_str!r}; known: {', '.join(names)} (or a bare folder path)"
            )
        return "ImageFolder", {"root": text}
    kwargs: dict[str, str] = {}
    if rest:
        for token in _SPLIT_RE.split(rest):
            key, eq, value = token.partition("=")
            if not eq or key not in KNOWN_KEYS:
                raise DinokitError(
                    f"bad item {token!r} in dataset string {dataset_str!r}; expected key=value with key in {KNOWN_KEYS}"
                )
            glued = re.search(r":([A-Za-z_]\w*)=", value)
            if glued and not Path(value).exists():  # e.g. 'root=/data:foo=1': an unknown option, not part of the path
                raise DinokitError(f"unknown option {glued.group(1)!r} in dataset string {dataset_str!r}; "
                                   f"options: {', '.join(KNOWN_KEYS)}")
            kwargs[key] = value
    return head, kwargs


def absolute_dataset_str(dataset_str: str) -> str:
    """``dataset_str`` with its relative paths (a bare folder, ``root=``, ``path=``, ``extra=``, ``real_labels=``) made
    absolute where they exist, so that it names the same images from any working directory (a saved setting)."""
    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return os.path.abspath(path) if path.exists() else value

    def absolute_urls(value: str) -> str:  # local shard patterns (shards/train-{000..009}.tar, a::b): their folders
        parts = []
        for part in value.split("::"):
            path = Path(part).expanduser()
            local = "://" not in part and not part.startswith("pipe:") and path.parent.is_dir()
            parts.append(os.path.join(os.path.abspath(path.parent), path.name) if local else part)
        return "::".join(parts)

    if Path(dataset_str).expanduser().exists():
        return absolute(dataset_str)
    if ":" not in dataset_str.strip():  # a bare path that does not exist: reported when the set is opened
        return dataset_str
    head = dataset_str.strip().partition(":")[0]
    try:  # any family's name (the dense sets too); a malformed string is reported when the set is opened
        name, kwargs = parse_dataset_str(dataset_str, names=(head,))
    except DinokitError:
        return dataset_str
    paths = ("root", "path", "extra", "real_labels")
    return name + "".join(f":{k}={absolute(v) if k in paths else absolute_urls(v) if k == 'urls' else v}"
                          for k, v in kwargs.items())


def _check_keys(name: str, kwargs: dict[str, str], allowed: tuple[str, ...], dataset_str: str) -> None:
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        raise DinokitError(f"dataset {name} does not take {', '.join(extra)} (in {dataset_str!r}); allowed: {', '.join(allowed)}")


def _image_folder(root: str, labelled: bool, transform, dataset_str: str) -> ImageDataset:
    path = Path(root).expanduser()
    if path.is_file():  # a list of paths or one image where a folder is expected: say what to write instead
        hint = (f"for the images it lists use FileList:path={root}" if path.suffix.lower() == ".txt"
                else f"give the folder that holds the images, e.g. {str(path.parent)!r}")
        raise DinokitError(f"dataset folder {root!r} is a file, not a folder (in {dataset_str!r}); {hint}")
    if not path.is_dir():
        raise DinokitError(f"dataset folder {root!r} does not exist or is not a folder (in {dataset_str!r})")
    files = find_image_names(path)  # strings: a path object per file is built once, by the dataset
    if not files:
        raise DinokitError(f"no images found under {root!r} (in {dataset_str!r})")
    if not labelled:
        return ImageDataset(files, [-1] * len(files), [], transform, dataset_str)
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DinokitError(f"{root!r} has no class subfolders; labelled evaluation needs ROOT/<class>/<image> files")
    index = {c: i for i, c in enumerate(classes)}
    by_class: dict[str, int] = {c: 0 for c in classes}
    paths, targets, loose = [], [], []
    start = len(os.path.join(os.fspath(path), ""))  # each file is the folder's path, a separator, then its own part
    for f in files:
        folder, sep, _ = f[start:].partition(os.sep)
        if not sep:
            loose.append(f)  # a file at the root has no class
            continue
        by_class[folder] += 1
        paths.append(f)
        targets.append(index[folder])
    if loose:
        warnings.warn_explicit(f"{len(loose)} image(s) directly in {str(path)!r} have no class folder and are left "
                               f"out (first: {os.path.basename(loose[0])}); move them into ROOT/<class>/", UserWarning,
                               "dinokit", 0)
    empty = [c for c, n in by_class.items() if n == 0]
    if empty:
        raise DinokitError(
            f"{len(empty)} class folder(s) of {str(path)!r} contain no images ({', '.join(empty[:3])}"
            f"{', ...' if len(empty) > 3 else ''}); add images or remove the folder"
        )
    return ImageDataset(paths, targets, classes, transform, dataset_str)


def _file_list(list_path: str, transform, dataset_str: str) -> ImageDataset:
    lines = read_list_lines(list_path) if Path(list_path).is_file() else None
    if lines is None:
        raise DinokitError(f"list file {list_path!r} does not exist (in {dataset_str!r})")
    has_labels = any(re.search(r"[\t,]\s*-?\d+\s*$", l) for l in lines if l.strip() and not l.startswith("#"))
    if not has_labels:
        paths = read_path_list(list_path)
        targets = [-1] * len(paths)
    else:
        base = Path(list_path).parent
        paths, targets = [], []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = re.match(r"(.*)[\t,]\s*(-?\d+)\s*$", line)
            if match is None:
                raise DinokitError(f"line {line!r} of {list_path!r} has no label; use 'path,<class index>' on every line")
            p = Path(match.group(1).strip())
            paths.append(p if p.is_absolute() else base / p)
            targets.append(int(match.group(2)))
    if not paths:
        raise DinokitError(f"list file {list_path!r} names no images")
    n_classes = max(targets) + 1 if has_labels else 0
    keep = keep_existing(paths, list_path)
    paths, targets = [paths[i] for i in keep], [targets[i] for i in keep]
    return ImageDataset(paths, targets, [str(i) for i in range(n_classes)], transform, dataset_str)


def make_dataset(
    dataset_str: str,
    *,
    transform: Callable | None = None,
    labelled: bool = False,
    **options: Any,
) -> ImageDataset:
    """Build the dataset named by ``dataset_str``.

    ``labelled=True`` requires class labels (evaluation); otherwise targets may be -1 (pretraining).
    """
    name, kwargs = parse_dataset_str(dataset_str)
    if name == "ImageFolder":
        _check_keys(name, kwargs, ("root",), dataset_str)
        if "root" not in kwargs:
            raise DinokitError(f"ImageFolder needs root=PATH (in {dataset_str!r})")
        return _image_folder(kwargs["root"], labelled, transform, dataset_str)
    if name == "FileList":
        _check_keys(name, kwargs, ("path",), dataset_str)
        if "path" not in kwargs:
            raise DinokitError(f"FileList needs path=LIST.txt (in {dataset_str!r})")
        ds = _file_list(kwargs["path"], transform, dataset_str)
        if labelled and ds.targets and ds.targets[0] < 0:
            raise DinokitError(f"{dataset_str!r} has no labels; add a ',<class index>' column to each line")
        return ds
    if name == "Sample":
        _check_keys(name, kwargs, ("split", "root"), dataset_str)
        split = kwargs.get("split", "TRAIN").upper()
        if split not in ("TRAIN", "VAL"):
            raise DinokitError(f"Sample split must be TRAIN or VAL, not {split!r}")
        root = kwargs.get("root") or default_sample_root()
        check_sample_root(root, "Sample root")  # never add the sample classes to someone's image folder
        root = write_sample_dataset(root)
        ds = _image_folder(str(root / split.lower()), True, transform, dataset_str)
        assert tuple(ds.classes) == SAMPLE_CLASSES
        return ds
    if name == "WebDataset":
        from .shards import make_shard_dataset

        _check_keys(name, kwargs, ("urls",), dataset_str)
        if "urls" not in kwargs:
            raise DinokitError(f"WebDataset needs urls=PATTERN, e.g. shards/{{000000..000009}}.tar (in {dataset_str!r})")
        return make_shard_dataset(kwargs["urls"], transform=transform, labelled=labelled, dataset_str=dataset_str)
    if name == "ImageNet":
        from .imagenet import make_imagenet_dataset

        _check_keys(name, kwargs, ("split", "root", "extra", "real_labels"), dataset_str)
        return make_imagenet_dataset(transform=transform, dataset_str=dataset_str, **kwargs)
    raise DinokitError(f"unknown dataset {name!r}")  # pragma: no cover
