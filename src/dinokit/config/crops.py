"""Crop sizes of the ``crops`` section: one size each, or DINOv3's mixed resolutions.

DINOv3's high-resolution stage gives ``crops.global_crops_size``, ``crops.local_crops_size`` and
``crops.gram_teacher_crops_size`` as lists of equal length, and ``crops.global_local_crop_pairs_ratios`` the
probability of each (global, local, Gram) triple; every iteration trains on one triple (``data/resolutions.py``).
A single size (the official form) is a list of one triple of ratio 1. This module turns either form into the
triples, with one-line errors for the shapes the schema cannot check (its fields are ``Any`` to take both forms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import ListConfig

from ..errors import DinokitError


@dataclass(frozen=True)
class CropSizes:
    """One iteration's crop sides: global, local and the Gram teacher's (None: it sees the global crops)."""

    global_size: int
    local_size: int
    gram_size: int | None = None


def _as_list(value: Any, key: str, n: int | None, *, optional: bool = False, kind: type = int) -> list:
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if n is not None and len(values) == 1 and not isinstance(value, (list, tuple, ListConfig)):
        values = values * n  # a single value applies to every triple
    if not values and n is None:
        what = "positive integers" if kind is int else "positive numbers"
        raise DinokitError(f"config key 'crops.{key}' is []; give {what} (one, or a list)")
    if not values or (n is not None and len(values) != n):
        raise DinokitError(f"config key 'crops.{key}' has {len(values)} values but crops.global_crops_size has {n}; "
                           f"give one value per global crop size (or a single value for all)")
    for v in values:
        if v is None and optional:
            continue
        ok = isinstance(v, kind) or (kind is float and isinstance(v, int))
        if not ok or isinstance(v, bool) or v <= 0:
            what = "positive integers" if kind is int else "positive numbers"
            raise DinokitError(f"config key 'crops.{key}' is {_show(value)}; give {what} (one, or a list)")
    return values


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, ListConfig) else repr(value)


def crop_resolutions(crops, patch_size: int | None = None) -> list[tuple[CropSizes, float]]:
    """The (sizes, probability) triples of a ``crops`` section; probabilities normalised to sum to 1.

    With ``patch_size``, every global, local and Gram side must be a multiple of it."""
    globals_ = _as_list(crops.global_crops_size, "global_crops_size", None)
    n = len(globals_)
    locals_ = _as_list(crops.local_crops_size, "local_crops_size", n)
    grams = _as_list(crops.gram_teacher_crops_size, "gram_teacher_crops_size", n, optional=True)
    ratios = _as_list(getattr(crops, "global_local_crop_pairs_ratios", 1.0), "global_local_crop_pairs_ratios", n,
                      kind=float)
    if len({g is None for g in grams}) > 1:
        raise DinokitError(f"config key 'crops.gram_teacher_crops_size' is {_show(crops.gram_teacher_crops_size)}; "
                           "give a size for every triple or null for all")
    if patch_size is not None:
        for key, values in (("global_crops_size", globals_), ("local_crops_size", locals_),
                            ("gram_teacher_crops_size", grams)):
            for v in values:
                if v is not None and v % patch_size:
                    given = getattr(crops, key)
                    which = f"{_show(given)}: {v} is" if len(values) > 1 or isinstance(given, ListConfig) else f"{v},"
                    raise DinokitError(f"config key 'crops.{key}' is {which} not a multiple of student.patch_size "
                                       f"{patch_size}; use e.g. {max(v // patch_size, 1) * patch_size}")
    total = float(sum(ratios))
    return [(CropSizes(g, loc, gram), r / total) for g, loc, gram, r in zip(globals_, locals_, grams, ratios)]


def backbone_img_size(crops) -> int:
    """The ``img_size`` a backbone is built with (its position-embedding grid): the global crop side, the largest
    one under mixed resolutions (the others interpolate the embeddings, as every size does)."""
    return max(sizes.global_size for sizes, _ in crop_resolutions(crops))
