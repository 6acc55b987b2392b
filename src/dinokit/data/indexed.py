"""The items a feature extraction reads, ``(index, image_or_None, target)``, from the datasets users bring: those of
dinokit's datasets as they are, ``(image, target)`` pairs (torchvision's ``ImageFolder``, a ``TensorDataset``) and
bare images, numbered in order; any other kind of item is one line saying what is read."""

from __future__ import annotations

import numbers

import torch
from torch.utils.data import Dataset, IterableDataset

from ..errors import DinokitError


def is_index(value: object) -> bool:
    """An integer of Python, numpy or torch (a ``Subset`` with numpy or tensor indices passes those on)."""
    if isinstance(value, torch.Tensor):  # one element: a 0-d index, or a row of a (N, 1) column of labels
        return value.numel() == 1 and not value.is_floating_point() and not value.is_complex() \
            and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_indexed(item: object, i: int) -> tuple:
    """One item as ``(index, image_or_None, target)``: dinokit's items as they are, ``(image, target)`` pairs and bare
    images numbered ``i``; any other kind of item, or a target that is not a class index, is one line."""
    if isinstance(item, dict):
        raise DinokitError(f"the dataset's items are dicts (keys {', '.join(map(str, item))}): extract_features reads "
                           "(image, target) pairs or bare images; give a dataset that returns those")
    if isinstance(item, (tuple, list)) and len(item) == 3 and is_index(item[0]):
        index, image, target = int(item[0]), item[1], item[2]
    elif isinstance(item, (tuple, list)) and len(item) in (1, 2):
        index, image, target = i, item[0], item[1] if len(item) > 1 else -1
    elif isinstance(item, (tuple, list)):
        kinds = ", ".join(type(v).__name__ for v in item)
        raise DinokitError(f"the dataset's items are ({kinds}): extract_features reads (index, image, target) "
                           "items with an integer index, (image, target) pairs or bare images")
    else:
        index, image, target = i, item, -1
    if is_index(image) and isinstance(target, torch.Tensor):
        raise DinokitError(f"the dataset's items are ({type(image).__name__}, Tensor): extract_features reads "
                           "(image, target) pairs, the image first")
    if image is not None and not isinstance(image, torch.Tensor):
        raise DinokitError(f"the dataset's images are {type(image).__name__} objects, not tensors: give it a "
                           "transform that makes them, e.g. dinokit.data.make_classification_eval_transform()")
    if not is_index(target):  # a path or a name: a traceback from the collate; 0.5 was taken as class 0
        shown = f"{type(target).__name__} {tuple(target.shape)}" if isinstance(target, torch.Tensor) else \
            type(target).__name__
        raise DinokitError(f"the dataset's targets are {shown} objects, not class indices: give (image, int) pairs, "
                           "or bare images (target -1)")
    return index, image, int(target)


class IndexedItems(Dataset):
    """The items of ``base`` as the ``(index, image_or_None, target)`` that extract_features reads
    (:func:`as_indexed`). Item by item: looking at a first item read its image twice."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple:
        return as_indexed(self.base[i], i)


class IndexedStream(IterableDataset):
    """The items of an iterable dataset (e.g. WebDataset's) as :class:`IndexedItems` gives a dataset's, numbered in the
    order they come (in one worker: with several, a stream's items come in no order the numbers could follow)."""

    def __init__(self, base: IterableDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for i, item in enumerate(self.base):
            numbered = not (isinstance(item, (tuple, list)) and len(item) == 3 and is_index(item[0]))
            if numbered and info is not None and info.num_workers > 1:
                raise DinokitError("the stream's items carry no index, and with several workers their order is "
                                   "unknown: give (index, image, target) items or num_workers=1")
            yield as_indexed(item, i)
