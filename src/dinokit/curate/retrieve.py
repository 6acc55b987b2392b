"""Retrieval around a seed set of curated images: pool images that look like them.

* ``sample``: every seed image takes its ``k`` most similar pool images (cosine of the class tokens);
  the LVD-142M pipeline used k = 4 for large seed sets and k = 32 for ImageNet-1k. An image retrieved
  by several seed images is kept once.
* ``cluster``: the pool is clustered (k-means); each seed image falls in its nearest cluster, and every
  cluster holding more than ``min_seed_images`` seed images gives ``per_cluster`` of its images (at
  random). This suits small seed sets (a few thousand images), whose nearest neighbours alone would be
  too few and too alike.

Both return sorted positions into the pool rows they were given, capped at ``max_images`` (a random
subset beyond it).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .kmeans import assign, kmeans
from .knn import knn_search

LARGE_SEED_SET = 1_500_000  # ImageNet-1k (1.28M) got k = 32, GLDv2 (1.58M) and ImageNet-22k k = 4


def auto_k(n_seed: int) -> int:
    return 32 if n_seed < LARGE_SEED_SET else 4


def _cap(chosen: np.ndarray, max_images: int, rng: np.random.Generator) -> np.ndarray:
    if len(chosen) > max_images:
        chosen = rng.choice(chosen, size=max_images, replace=False)
    return np.sort(chosen)


def retrieve_by_samples(seed: torch.Tensor, pool: torch.Tensor, *, k: int = 0, max_images: int = 10**6,
                        method: str = "auto", rng_seed: int = 0) -> np.ndarray:
    """Union of the ``k`` nearest pool rows of every seed row (both L2-normalised)."""
    k = min(k or auto_k(len(seed)), len(pool))
    _, idx = knn_search(seed, pool, k, method=method)
    chosen = np.unique(idx.numpy())
    return _cap(chosen[chosen >= 0], max_images, np.random.default_rng(rng_seed))


def retrieve_by_clusters(seed: torch.Tensor, pool: torch.Tensor, *, n_clusters: int = 0, min_seed_images: int = 3,
                         per_cluster: int = 10000, max_images: int = 10**6, n_iters: int = 20,
                         rng_seed: int = 0) -> np.ndarray:
    """Pool rows from the k-means clusters of ``pool`` that hold more than ``min_seed_images`` seed rows."""
    n_clusters = min(n_clusters or max(1, int(4 * math.sqrt(len(pool)))), len(pool))
    result = kmeans(pool, n_clusters, n_iters=n_iters, seed=rng_seed)
    seed_labels, _ = assign(seed, result.centroids)
    hits = torch.bincount(seed_labels, minlength=n_clusters)
    rng = np.random.default_rng(rng_seed)
    labels = result.labels.numpy()
    by_cluster = np.argsort(labels, kind="stable")  # each cluster's rows in order, by one sort rather than a scan of
    ends = np.cumsum(np.bincount(labels, minlength=n_clusters))  # every row per cluster (N^1.5 with k = 4 sqrt N)
    chosen = []
    for cluster in torch.nonzero(hits > min_seed_images).flatten().tolist():
        members = by_cluster[(ends[cluster - 1] if cluster else 0) : ends[cluster]]
        chosen.append(rng.choice(members, size=min(per_cluster, len(members)), replace=False))
    chosen = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    return _cap(chosen, max_images, rng)
