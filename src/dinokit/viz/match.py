"""Patch correspondences between two images in feature space.

The DINOv2 paper's matching figure: the foreground patches of each image (first principal component of the
two images' patches, as in :mod:`dinokit.viz.pca`), Euclidean distances between their features, and pairs
from an assignment problem (``method="assignment"``: the one-to-one pairing of least total distance, through
SciPy) or, by default and without SciPy, the pairs that are each other's nearest neighbour (``"mutual"``). The
pairs are ranked by distance and thinned by a greedy non-maximum suppression on image A's grid (a kept pair
removes the weaker pairs that start within ``min_spacing`` patches of it), and the strongest are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import DinokitError
from .pca import foreground_masks
from .prepare import DEFAULT_IMAGE_SIZE, ImageLike, PreparedImage, patch_features, prepare_images

DEFAULT_MAX_MATCHES = 40
DEFAULT_MIN_SPACING = 2


@dataclass
class PatchMatches:
    """Matched patches, strongest (smallest feature distance) first."""

    points_a: np.ndarray
    """(M, 2) int64 (row, col) patch coordinates in image A."""
    points_b: np.ndarray
    """(M, 2) int64 (row, col) patch coordinates in image B."""
    distance: np.ndarray
    """(M,) float32 Euclidean feature distances, ascending."""
    images: list[PreparedImage] | None = None
    """Images A and B as the model saw them, when the matches were computed from images."""


def mutual_nearest_neighbours(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``i`` of ``a`` (Na, D) and ``j`` of ``b`` (Nb, D) that are each other's nearest neighbour.

    Returns (ia, ib, distance), sorted by distance.
    """
    dist = torch.cdist(a.double(), b.double())  # (Na, Nb)
    nearest_b = dist.argmin(dim=1)  # (Na,)
    nearest_a = dist.argmin(dim=0)  # (Nb,)
    ia = torch.nonzero(nearest_a[nearest_b] == torch.arange(len(a))).flatten()
    ib = nearest_b[ia]
    d = dist[ia, ib]
    order = torch.argsort(d, stable=True)
    return ia[order], ib[order], d[order]


def optimal_assignment(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one-to-one pairing of rows of ``a`` (Na, D) and ``b`` (Nb, D) of least total Euclidean distance
    (min(Na, Nb) pairs; SciPy's ``linear_sum_assignment``). Returns (ia, ib, distance), sorted by distance."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise DinokitError("matching by assignment needs SciPy: pip install scipy (or use the default mutual "
                           "nearest neighbours)") from None
    dist = torch.cdist(a.double(), b.double())
    rows, cols = linear_sum_assignment(dist.numpy())
    ia, ib = torch.from_numpy(rows).long(), torch.from_numpy(cols).long()
    d = dist[ia, ib]
    order = torch.argsort(d, stable=True)
    return ia[order], ib[order], d[order]


MATCH_METHODS = {"mutual": mutual_nearest_neighbours, "assignment": optimal_assignment}


def _suppress(points: torch.Tensor, min_spacing: int) -> torch.Tensor:
    """Indices of ``points`` (M, 2), in order, that lie at least ``min_spacing`` (Chebyshev) from every
    earlier kept point."""
    kept: list[int] = []
    for i in range(len(points)):
        if all(int((points[i] - points[j]).abs().max()) >= min_spacing for j in kept):
            kept.append(i)
    return torch.as_tensor(kept, dtype=torch.long)


def match_features(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    *,
    foreground_a: torch.Tensor | np.ndarray | None = None,
    foreground_b: torch.Tensor | np.ndarray | None = None,
    max_matches: int | None = None,
    min_spacing: int = 0,
    method: str = "mutual",
) -> PatchMatches:
    """Matches between two (h, w, D) feature grids (``method``: ``mutual`` nearest neighbours or ``assignment``),
    optionally within foreground masks."""
    if method not in MATCH_METHODS:
        raise DinokitError(f"unknown matching method {method!r}; use {' or '.join(MATCH_METHODS)}")
    grids = []
    for features, mask in ((features_a, foreground_a), (features_b, foreground_b)):
        h, w, _ = features.shape
        keep = torch.ones(h * w, dtype=torch.bool) if mask is None else torch.as_tensor(mask).reshape(-1).bool()
        if not keep.any():
            raise DinokitError("an image has no foreground patches to match; use --all-patches")
        index = torch.nonzero(keep).flatten()
        grids.append((features.detach().reshape(h * w, -1)[index], index, w))
    (fa, index_a, wa), (fb, index_b, wb) = grids
    ia, ib, dist = MATCH_METHODS[method](fa, fb)
    flat_a, flat_b = index_a[ia], index_b[ib]
    points_a = torch.stack((flat_a // wa, flat_a % wa), dim=1)  # (M, 2) rows, cols
    points_b = torch.stack((flat_b // wb, flat_b % wb), dim=1)
    if min_spacing > 1:
        kept = _suppress(points_a, min_spacing)
        points_a, points_b, dist = points_a[kept], points_b[kept], dist[kept]
    if max_matches is not None:
        points_a, points_b, dist = points_a[:max_matches], points_b[:max_matches], dist[:max_matches]
    return PatchMatches(points_a=points_a.numpy(), points_b=points_b.numpy(), distance=dist.float().numpy())


def match_patches(
    model: nn.Module,
    image_a: ImageLike,
    image_b: ImageLike,
    *,
    foreground: bool = True,
    threshold: float = 0.0,
    max_matches: int | None = DEFAULT_MAX_MATCHES,
    min_spacing: int = DEFAULT_MIN_SPACING,
    image_size: int | None = DEFAULT_IMAGE_SIZE,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    method: str = "mutual",
) -> PatchMatches:
    """Patch correspondences between two images (foreground patches only unless ``foreground=False``; ``method``
    as :func:`match_features`)."""
    images = prepare_images(model, [image_a, image_b], image_size=image_size, skip_unreadable=False)
    features: Sequence[torch.Tensor] = patch_features(model, images, device=device, dtype=dtype)
    masks = foreground_masks(features, threshold=threshold)[0] if foreground else [None, None]
    matches = match_features(features[0], features[1], foreground_a=masks[0], foreground_b=masks[1],
                             max_matches=max_matches, min_spacing=min_spacing, method=method)
    matches.images = images
    return matches
