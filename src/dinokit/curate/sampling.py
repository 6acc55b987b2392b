"""Hierarchical balanced sampling: a target number of images spread as evenly as possible over clusters.

The budget is split top-down. At every level the clusters' shares are "water-filled": the largest cut
``x`` with ``sum(min(x, size_i)) <= budget`` gives each cluster ``min(x, size_i)`` images (sizes counted in
original points), and what is left of the budget goes one image each to randomly chosen clusters still
larger than ``x``. A small cluster is taken whole; big ones are capped at the same level. Within a leaf
cluster the images are drawn at random, or the closest to the centroid first.

With a ``multiplier`` m > 1 every cluster may give up to m times its size: a leaf whose quota exceeds its size
gives every image ``quota // size`` times and ``quota % size`` of them once more, so small clusters are repeated
rather than left behind, and the sample may be up to m times the images.
"""

from __future__ import annotations

import numpy as np

from ..errors import DinokitError

STRATEGIES = ("r", "c")


def best_cut(sizes: np.ndarray, budget: int) -> int:
    """The largest integer ``x`` with ``sum(min(x, sizes)) <= budget`` (``max(sizes)`` when all fit)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.sum() <= budget:
        return int(sizes.max(initial=0))
    lo, hi = 0, int(sizes.max())  # sum(min(lo, .)) <= budget < sum(min(hi, .))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def split_budget(sizes: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Per-cluster quotas summing to ``min(budget, sum(sizes))``, each at most its cluster's size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.sum() <= budget:
        return sizes.copy()
    cut = best_cut(sizes, budget)
    quotas = np.minimum(sizes, cut)
    remainder = budget - int(quotas.sum())
    larger = np.nonzero(sizes > cut)[0]  # more than `remainder` of them, or cut + 1 would have fitted
    quotas[rng.choice(larger, size=remainder, replace=False)] += 1
    return quotas


def hierarchical_sample(
    leaf_labels: np.ndarray,
    parents: list[np.ndarray],
    target_size: int,
    *,
    distances: np.ndarray | None = None,
    strategy: str = "r",
    seed: int = 0,
    multiplier: int = 1,
) -> np.ndarray:
    """Sorted indices of ``target_size`` points drawn top-down through the cluster hierarchy (an index repeats when
    ``multiplier`` > 1 lets a cluster give more than its size).

    ``leaf_labels`` (N,) is each point's level-1 cluster; ``parents[l]`` maps each level-(l+1) cluster
    to its level-(l+2) cluster (empty list: one level). ``distances`` (N,) to the leaf centroid are
    needed by ``strategy='c'`` (closest first); ``'r'`` draws at random.
    """
    if strategy not in STRATEGIES:
        raise DinokitError(f"unknown sample.strategy {strategy!r}; use r (random) or c (closest to the centroid)")
    leaf_labels = np.asarray(leaf_labels, dtype=np.int64)
    n = len(leaf_labels)
    if multiplier < 1:
        raise DinokitError(f"sample.multiplier must be at least 1, not {multiplier}")
    if target_size > n * multiplier:
        times = f" x sample.multiplier {multiplier}" if multiplier > 1 else ""
        raise DinokitError(f"--target-size {target_size} is larger than the {n} images left to sample from{times}; "
                           "lower it" + ("" if multiplier > 1 else " or repeat images with sample.multiplier=2"))
    if strategy == "c" and distances is None:
        raise ValueError("strategy 'c' needs the distances to the centroids")
    rng = np.random.default_rng(seed)
    # a level's clusters are those of its parent array (the last ones may hold no point: not in the labels)
    counts = [len(parent) for parent in parents]
    n_leaves = max(int(leaf_labels.max()) + 1 if n else 0, counts[0] if counts else 0)
    # flat sizes (original points under each cluster) at every level, bottom-up
    sizes = [np.bincount(leaf_labels, minlength=n_leaves)]
    for level, parent in enumerate(parents):
        parent = np.asarray(parent, dtype=np.int64)
        above = max(int(parent.max()) + 1, counts[level + 1] if level + 1 < len(counts) else 0)
        sizes.append(np.bincount(parent, weights=sizes[-1], minlength=above).astype(np.int64))
    # top-down: the top level's clusters share the whole budget, then each cluster its own quota
    sizes = [level_sizes * multiplier for level_sizes in sizes]  # what each cluster may give
    quotas = split_budget(sizes[-1], target_size, rng)
    for level in range(len(parents) - 1, -1, -1):
        parent = np.asarray(parents[level], dtype=np.int64)
        child_quotas = np.zeros(len(parent), dtype=np.int64)
        by_parent = np.argsort(parent, kind="stable")  # children grouped by parent, in index order
        ends = np.cumsum(np.bincount(parent, minlength=len(quotas)))
        for cluster in np.nonzero(quotas)[0]:
            children = by_parent[(ends[cluster - 1] if cluster else 0) : ends[cluster]]
            child_quotas[children] = split_budget(sizes[level][children], int(quotas[cluster]), rng)
        quotas = child_quotas
    # within each leaf: every image quota // size times, then the rest at random or closest to the centroid first
    keys = rng.random(n) if strategy == "r" else np.asarray(distances, dtype=np.float64)
    order = np.lexsort((np.arange(n), keys, leaf_labels))  # by leaf, then key, then index
    leaf_sizes = sizes[0] // multiplier
    starts = np.cumsum(leaf_sizes) - leaf_sizes
    rank_in_leaf = np.empty(n, dtype=np.int64)
    rank_in_leaf[order] = np.arange(n) - starts[leaf_labels[order]]
    full, rest = np.divmod(quotas, np.maximum(leaf_sizes, 1))
    times = full[leaf_labels] + (rank_in_leaf < rest[leaf_labels])
    return np.repeat(np.arange(n), times)


def leaf_quotas(leaf_labels: np.ndarray, chosen: np.ndarray, n_leaves: int) -> np.ndarray:
    """How many of ``chosen`` fell in each leaf cluster (for reports and tests)."""
    return np.bincount(np.asarray(leaf_labels)[chosen], minlength=n_leaves)
