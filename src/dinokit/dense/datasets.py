"""Dense datasets (image + per-pixel label) named by strings (their transforms: :mod:`dinokit.dense.transforms`).

Strings, in dinokit's ``Name:key=value`` syntax:

* ``ADE20K:root=DIR:split=training|validation``: the ADEChallengeData2016 layout
  (``DIR/images/<split>/*.jpg``, ``DIR/annotations/<split>/*.png``); 150 classes, label 0 ("other")
  ignored and the others shifted down by one (reduce-zero-label).
* ``VOC2012:root=DIR:split=train|val``: ``DIR/JPEGImages``, ``DIR/SegmentationClass`` (palette PNGs,
  255 = border) and ``DIR/ImageSets/Segmentation/<split>.txt``; 21 classes.
* ``NYU:root=DIR:split=train|test``: either the list files of the common depth toolboxes
  (``DIR/nyu_<split>.txt``, lines ``rgb_path depth_path [focal]`` relative to DIR, depth PNGs in mm), or
  ``DIR/<split>/images`` + ``DIR/<split>/depth`` as for DepthFolder. Eigen crop at evaluation; training images
  are first cut to the fixed NYU box (x1, y1, x2, y2) = (43, 45, 608, 472) of 640x480, scaled to the image size.
* ``KITTI:root=DIR:split=train|test``: the Eigen split as the depth toolboxes list it (``DIR/kitti_eigen_<split>.txt``,
  lines ``rgb_path depth_path [focal]`` relative to DIR, ``None`` where an image has no ground truth; depth PNGs in
  1/256 m), or ``DIR/<split>/images`` + ``DIR/<split>/depth`` (the same 1/256 m PNGs). Every image and label is cut to
  the KB crop (bottom 352 rows, middle 1216 columns); evaluation keeps the Garg crop; depths reach 80 m.
* ``SegFolder:root=DIR``: ``DIR/images/<name>.<ext>`` with ``DIR/masks/<name>.png`` (one class index per
  pixel, 255 = ignore); the classes are ``DIR/classes.txt`` (one name per line; else ``DIR/../classes.txt``,
  shared by split folders) if present, else 0..max label.
* ``DepthFolder:root=DIR``: ``DIR/images/<name>.<ext>`` with ``DIR/depth/<name>.png`` (uint16 millimetres,
  0 = invalid) or ``DIR/depth/<name>.npy`` (float metres; NaN and inf = invalid).
* ``SegSample:split=train|val[:root=DIR]`` and ``DepthSample:...``: the generated sets of
  :mod:`dinokit.dense.generated` (written on first use), read as SegFolder / DepthFolder.

Items are dicts ``{"image": (3, H, W) normalised float, "label": (H, W) int64 class map or float32 metres,
"index": int}``. A missing label file, an image/label size mismatch or a class index out of range is a
one-line :class:`DinokitError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.datasets import parse_dataset_str
from ..data.images import load_image, warn_skipped
from ..data.listing import IMAGE_EXTENSIONS, read_user_text
from ..errors import DinokitError
from .metrics import IGNORE_INDEX, reduce_zero_label
from .transforms import image_to_tensor

DENSE_DATASET_NAMES = ("ADE20K", "VOC2012", "NYU", "KITTI", "SegFolder", "DepthFolder", "SegSample", "DepthSample")
ADE20K_CLASSES = 150
VOC_CLASSES = 21
NYU_TRAIN_CROP = (43, 45, 608, 472)  # (x1, y1, x2, y2) of 640x480: NYU's border without depth, cut before training
KB_CROP = (352, 1216)  # KITTI's benchmark crop: the bottom 352 rows and the middle 1216 columns, train and test


@dataclass
class DenseInfo:
    """What a dense dataset is: its task, classes (segmentation) or depth scale and crops (depth). The depth range
    of training and evaluation is the head's (the recipe's ``min_depth``/``max_depth``), not the dataset's."""

    task: str  # "seg" or "depth"
    num_classes: int = 0
    reduce_zero_label: bool = False
    depth_scale: float = 1000.0  # PNG value per metre
    eigen_crop: bool = False
    garg_crop: bool = False  # KITTI's evaluation crop (Garg et al.)
    kb_crop: bool = False  # KITTI: every image and label cut to KB_CROP when it reads them
    depth_range: float = 0.0  # the depth the data reaches (m; 0: unknown): a head's max_depth below it is said
    train_crop: tuple[int, int, int, int] | None = None  # (x1, y1, x2, y2) of a 640x480 frame, cut before training crops
    palette: str = ""  # "ade20k", "voc" or "" (generated)


# ---------------------------------------------------------------------------------------------- dataset
def _read_depth_array(path: Path) -> np.ndarray:
    """A ``.npy`` depth map in metres as (H, W) float32; (1, H, W) and (H, W, 1) are squeezed, NaN and inf become
    0 (invalid) so that no later resize or loss turns them into NaN."""
    try:
        depth = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DinokitError(f"depth {str(path)!r} cannot be read as a numpy array ({err}); save it with np.save") from None
    if depth.ndim == 3 and 1 in (depth.shape[0], depth.shape[-1]):
        depth = depth.reshape(depth.shape[1:] if depth.shape[0] == 1 else depth.shape[:-1])
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
        raise DinokitError(f"depth {str(path)!r} is a {depth.dtype} array of shape {depth.shape}; "
                           "save one (H, W) array of metres")
    return np.nan_to_num(depth.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


DEPTH_PNG_MODES = ("I;16", "I;16B", "I;16L", "I")  # Pillow's modes of a 16-bit single-channel PNG


class DenseDataset(Dataset):
    """(image, label) file pairs; labels are checked against the image size and the class count."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        info: DenseInfo,
        *,
        name: str,
        transform: Callable | None = None,
        classes: Sequence[str] = (),
    ) -> None:
        self.pairs = [(Path(a), Path(b)) for a, b in pairs]
        self.info, self.name, self.transform = info, name, transform
        self.classes = list(classes) or [str(i) for i in range(info.num_classes)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"DenseDataset({self.name!r}, {len(self)} {self.info.task} pairs)"

    def read_label(self, index: int) -> torch.Tensor:
        """The label of pair ``index``: int64 class map (reduced for ADE20K) or float32 depth in metres (0 = invalid)."""
        path = self.pairs[index][1]
        if not path.is_file():
            raise DinokitError(f"label file {str(path)!r} is missing for image {str(self.pairs[index][0])!r}")
        if self.info.task == "depth" and path.suffix == ".npy":
            return torch.from_numpy(_read_depth_array(path))
        with Image.open(path) as img:
            check_label_mode(path, img.mode, self.info.task)
            array = np.asarray(img)
        if self.info.task == "depth":
            return torch.from_numpy(array.astype(np.float32) / self.info.depth_scale)
        label = torch.from_numpy(array.astype(np.int64))
        if self.info.reduce_zero_label:
            label = reduce_zero_label(label)
        k = self.info.num_classes
        bad = (label >= k) & (label != IGNORE_INDEX) | (label < 0)
        if bool(bad.any()):
            raise DinokitError(
                f"mask {str(path)!r} holds class {int(label[bad].max())}, but the dataset has {k} classes "
                f"(0..{k - 1}, 255 = ignore); fix the mask or list the classes in classes.txt"
            )
        return label

    def __getitem__(self, index: int) -> dict | None:
        """``{"image", "label", "index"}``, or None (with a one-line warning) when the image cannot be read."""
        image_path = self.pairs[index][0]
        try:
            # the stored pixels, which the public sets' labels are drawn on (no EXIF rotation: it would turn the
            # image away from its label)
            image = image_to_tensor(load_image(image_path, exif=False))
        except (OSError, ValueError) as err:
            warn_skipped(image_path, err)
            return None
        label = self.read_label(index)
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise _size_mismatch(self.pairs[index][1], image_path, label.shape[::-1], image.shape[:0:-1])
        if self.info.kb_crop:
            image, label = kb_crop(image, label)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return {"image": image, "label": label, "index": index}


def kb_crop(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KITTI's benchmark crop of an image (C, H, W) and its label (H, W): the bottom 352 rows and the middle 1216
    columns (where the LiDAR depth lies); a smaller image is kept whole."""
    (ch, cw), (h, w) = KB_CROP, image.shape[-2:]
    if h < ch or w < cw:
        return image, label
    top, left = h - ch, (w - cw) // 2
    return image[:, top:, left : left + cw], label[top:, left : left + cw]


def check_label_mode(path: Path, mode: str, task: str) -> None:
    """One line when a label PNG's Pillow ``mode`` cannot be a mask of class indices / 16-bit depth."""
    if task == "seg" and mode not in ("L", "P", "I", "I;16"):
        raise DinokitError(f"mask {str(path)!r} is {mode}; masks must be single-channel PNGs of class indices")
    if task == "depth" and mode not in DEPTH_PNG_MODES:
        # an 8-bit or colour picture of depth would be read as 0-255 mm and train on nonsense
        raise DinokitError(
            f"depth {str(path)!r} is not 16-bit (Pillow mode {mode}); depth PNGs must be single-channel "
            f"16-bit millimetres (0 = invalid), or save float metres as '{path.stem}.npy'"
        )


def _size_mismatch(label: Path, image: Path, label_wh: Sequence[int], image_wh: Sequence[int]) -> DinokitError:
    return DinokitError(f"label {str(label)!r} is {label_wh[0]}x{label_wh[1]} but its image {str(image)!r} is "
                        f"{image_wh[0]}x{image_wh[1]}; they must have the same size")


def _check_labels(pairs: Sequence[tuple[Path, Path]], task: str) -> None:
    """Every label PNG of a user's folder, checked from the headers when the dataset opens (not thousands of
    iterations into training, when the loader meets it): its mode, and its size against its image's (the stored
    pixels, which the dataset reads: no EXIF rotation)."""
    for image, label in pairs:
        if label.suffix != ".png":
            continue
        try:
            with Image.open(label) as img:
                mode, size = img.mode, img.size
        except (OSError, ValueError) as err:
            raise DinokitError(f"label {str(label)!r} cannot be read ({err}); fix or remove it") from None
        check_label_mode(label, mode, task)
        try:
            with Image.open(image) as img:
                image_size = img.size
        except Exception:  # an unreadable image is skipped with a warning when it is read
            continue
        if size != image_size:
            raise _size_mismatch(label, image, size, image_size)


def _paired_folder(root: Path, label_dir: str, suffixes: Sequence[str], dataset_str: str) -> list[tuple[Path, Path]]:
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DinokitError(f"{str(images_dir)!r} does not exist (in {dataset_str!r}); put the images in ROOT/images/")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not images:
        raise DinokitError(f"no images in {str(images_dir)!r} (in {dataset_str!r})")
    pairs = []
    for image in images:
        candidates = [root / label_dir / f"{image.stem}{s}" for s in suffixes]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DinokitError(f"no label for {str(image)!r}: expected {str(candidates[0])!r}")
        pairs.append((image, found))
    return pairs


def _max_label(pairs: Sequence[tuple[Path, Path]]) -> int:
    top = 0
    for _, mask in pairs:
        with Image.open(mask) as img:
            values = np.unique(np.asarray(img))
        values = values[values != IGNORE_INDEX]
        if len(values):
            top = max(top, int(values.max()))
    return top


def _split(kwargs: dict[str, str], allowed: Sequence[str], default: str, name: str, dataset_str: str) -> str:
    split = kwargs.get("split", default)
    if split.lower() not in allowed:
        raise DinokitError(f"{name} split must be {' or '.join(allowed)}, not {split!r} (in {dataset_str!r})")
    return split.lower()


def _root(kwargs: dict[str, str], name: str, dataset_str: str) -> Path:
    if "root" not in kwargs:
        raise DinokitError(f"{name} needs root=DIR (in {dataset_str!r})")
    root = Path(kwargs["root"]).expanduser()
    if not root.is_dir():
        raise DinokitError(f"dataset folder {str(root)!r} does not exist (in {dataset_str!r})")
    return root


def make_dense_dataset(dataset_str: str, *, transform: Callable | None = None) -> DenseDataset:
    """The dense dataset named by ``dataset_str`` (see the module docstring for the names)."""
    name, kwargs = parse_dataset_str(dataset_str, names=DENSE_DATASET_NAMES)
    if name not in DENSE_DATASET_NAMES:
        raise DinokitError(
            f"{dataset_str!r} is not a dense dataset; use SegFolder:root=DIR, DepthFolder:root=DIR, "
            f"or one of {', '.join(DENSE_DATASET_NAMES)}"
        )
    extra = sorted(set(kwargs) - {"root", "split"})
    if extra:
        raise DinokitError(f"dataset {name} does not take {', '.join(extra)} (in {dataset_str!r}); use root= and split=")
    if name in ("SegSample", "DepthSample"):
        from .generated import write_dense_sample

        kind = "seg" if name == "SegSample" else "depth"
        split = _split(kwargs, ("train", "val"), "train", name, dataset_str)
        root = write_dense_sample(kind, kwargs.get("root") or None) / split
        name, kwargs = ("SegFolder" if kind == "seg" else "DepthFolder"), {"root": str(root)}
    root = _root(kwargs, name, dataset_str)
    if name == "SegFolder":
        pairs = _paired_folder(root, "masks", (".png",), dataset_str)
        _check_labels(pairs, "seg")
        classes_file = root / "classes.txt"
        if not classes_file.is_file():
            classes_file = root.parent / "classes.txt"  # shared by the splits of a generated set
        classes = [l.strip() for l in read_user_text(classes_file).splitlines() if l.strip()] if classes_file.is_file() else []
        num = len(classes) if classes else _max_label(pairs) + 1
        return DenseDataset(pairs, DenseInfo("seg", num_classes=num), name=dataset_str, transform=transform, classes=classes)
    if name == "DepthFolder":
        pairs = _paired_folder(root, "depth", (".png", ".npy"), dataset_str)
        _check_labels(pairs, "depth")
        return DenseDataset(pairs, DenseInfo("depth"), name=dataset_str, transform=transform)
    if name == "ADE20K":
        split = _split(kwargs, ("training", "validation"), "training", name, dataset_str)
        images = sorted((root / "images" / split).glob("*.jpg"))
        if not images:
            raise DinokitError(f"no images in {str(root / 'images' / split)!r}: ROOT must be the ADEChallengeData2016 folder")
        pairs = [(p, root / "annotations" / split / f"{p.stem}.png") for p in images]
        info = DenseInfo("seg", num_classes=ADE20K_CLASSES, reduce_zero_label=True, palette="ade20k")
        return DenseDataset(pairs, info, name=dataset_str, transform=transform)
    if name == "VOC2012":
        split = _split(kwargs, ("train", "val", "trainval"), "train", name, dataset_str)
        list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise DinokitError(f"{str(list_file)!r} does not exist: ROOT must be the VOC2012 folder (VOCdevkit/VOC2012)")
        ids = [l.strip() for l in read_user_text(list_file).splitlines() if l.strip()]
        pairs = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
        return DenseDataset(pairs, DenseInfo("seg", num_classes=VOC_CLASSES, palette="voc"), name=dataset_str, transform=transform)
    # NYU and KITTI: the list files of the common depth toolboxes, or paired folders
    split = _split(kwargs, ("train", "test"), "train", name, dataset_str)
    list_file = root / (f"nyu_{split}.txt" if name == "NYU" else f"kitti_eigen_{split}.txt")
    if list_file.is_file():
        pairs = []
        for line in read_user_text(list_file).splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] != "None":  # KITTI's lists name images without ground truth "None"
                pairs.append((root / parts[0].lstrip("/"), root / parts[1].lstrip("/")))
    elif (root / split / "images").is_dir():
        pairs = _paired_folder(root / split, "depth", (".png", ".npy"), dataset_str)
    else:
        raise DinokitError(f"{name} needs ROOT/{list_file.name} or ROOT/{split}/images + ROOT/{split}/depth (in "
                           f"{dataset_str!r})")
    if name == "KITTI":  # depth PNGs in 1/256 m, up to 80 m; the KB crop everywhere, the Garg crop at evaluation
        info = DenseInfo("depth", depth_scale=256.0, garg_crop=True, kb_crop=True, depth_range=80.0)
    else:
        info = DenseInfo("depth", eigen_crop=True, train_crop=NYU_TRAIN_CROP, depth_range=10.0)
    return DenseDataset(pairs, info, name=dataset_str, transform=transform)


def collate_dense(items: list[dict | None]) -> dict:
    """Stack images and labels of equal size (training crops; evaluation uses batches of one); unreadable
    images (None) are left out."""
    items = [it for it in items if it is not None]
    if not items:
        raise DinokitError("no image of a dense batch could be read; remove or fix the unreadable files named above")
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "index": torch.as_tensor([it["index"] for it in items]),
    }
