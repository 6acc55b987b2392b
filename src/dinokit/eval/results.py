"""What an evaluation's result lines say about their own trust, and how they are written.

Warnings about the data (val classes no training image represents, a top-5 that is 100% by construction, val
images that are also training images) are printed once and recorded in every result line; lines are appended
atomically, so a crash or a full disk leaves the earlier ones intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import distributed as du
from ..data import ImageDataset
from ..data.listing import PathColumn, absolute_paths
from ..files import atomic_write


def label_warnings(train_labels: torch.Tensor, test_labels: torch.Tensor, num_classes: int, *,
                   top5: bool = True, classes: Sequence[str] | None = None) -> list[str]:
    """Lines that say when accuracies cannot be trusted: val classes without a readable training image (present
    only in val, or whose training images are all unreadable), or a top-5 that is 100% by construction.
    ``classes``: the class names (folder names), shown beside the numbers."""
    lines = []
    in_train = set(train_labels.unique().tolist())
    only_val = sorted(set(test_labels.unique().tolist()) - in_train)
    if only_val:
        named = [f"{c} ({classes[c]!r})" if classes is not None and c < len(classes) else str(c) for c in only_val]
        shown = ", ".join(named[:5]) + (", ..." if len(only_val) > 5 else "")
        share = 100.0 * float(torch.isin(test_labels, torch.tensor(only_val)).float().mean())
        lines.append(f"warning: {len(only_val)} val class(es) have no readable training image (class {shown}): "
                     f"their {share:.1f}% of the val images can never be classified right")
    if num_classes == 1:  # every prediction is the one class
        lines.append("note: with 1 class top-1 and top-5 are 100% by construction and say nothing of the features; "
                     "give images of at least 2 classes")
    elif top5 and num_classes <= 5:
        lines.append(f"note: with {num_classes} classes top-5 is 100% by construction; read top-1 only")
    return lines


def report_label_warnings(train_labels: torch.Tensor, test_labels: torch.Tensor, num_classes: int, *,
                          top5: bool = True, classes: Sequence[str] | None = None) -> list[str]:
    """:func:`label_warnings`, printed once (main process); returned for the results file."""
    lines = label_warnings(train_labels, test_labels, num_classes, top5=top5, classes=classes)
    if du.is_main_process():
        for line in lines:
            print(line)
    return lines


def append_results(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """Append one JSON line per record to ``path``, atomically: a crash or a full disk leaves the old lines intact."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"  # a line torn by an older, non-atomic writer stays a line of its own
    with atomic_write(path) as tmp:
        tmp.write_text(old + "".join(json.dumps(r, default=str) + "\n" for r in records))
    return path


def shared_images_warning(train: ImageDataset, val: ImageDataset, *, train_name: str = "train",
                          val_name: str = "val") -> str | None:
    """A warning when some val images are also training images (the same files): each finds itself at distance 0,
    so the accuracies measure memory, not features. Lazy path sequences (ImageNet's splits, separate folders by
    construction) are compared only by their dataset strings."""
    if isinstance(train.paths, (list, PathColumn)) and isinstance(val.paths, (list, PathColumn)):
        train_files = set(absolute_paths(train.paths))
        shared = [path for path, name in zip(val.paths, absolute_paths(val.paths)) if name in train_files]
        count, first = len(shared), (shared[0] if shared else None)
    else:
        same = bool(train.name) and train.name == val.name
        count, first = (len(val), val.paths[0]) if same and len(val) else (0, None)
    if not count:
        return None
    return (f"warning: {count} of the {len(val)} {val_name} images are also {train_name} images (first: "
            f"{first}): every one of them finds itself, and the accuracies are inflated; hold the {val_name} "
            f"images out of the {train_name} set")
