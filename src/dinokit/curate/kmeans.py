"""k-means and hierarchical k-means with resampling, on CPU or GPU, one process or many.

Under ``torchrun`` each rank holds a slice of the points (the rows of the level being clustered);
only (k, D) sums, counts, potentials and a few candidate rows cross the network, through the
:mod:`dinokit.distributed` helpers, which do nothing in one process. The same seed gives the same
centroids on any number of ranks (up to floating-point summation order).

* k-means++ initialisation, greedy as in scikit-learn: ``2 + ln k`` candidates per new centre drawn
  with probability proportional to the squared distance to the nearest chosen centre; the candidate
  that most lowers the total potential is kept.
* Lloyd iterations with chunked assignment (at most ``chunk_elements`` distances in memory at once),
  sums and counts accumulated in ``high_precision`` (float64); an empty cluster keeps its centroid.
* Hierarchical k-means with resampling (Vo et al., 2024): each level clusters the centroids of the
  level below; within a level, after a first k-means, each resampling step takes ``sample_size`` points
  per cluster (closest to the centroid, or random), re-runs k-means on that sample alone and re-assigns
  every point. This pulls centroids off dense modes, so clusters spread evenly over the data's support,
  which balanced sampling then exploits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .. import distributed as du
from ..errors import DinokitError

METRICS = ("l2", "cos")
DEFAULT_CHUNK_ELEMENTS = 2**25  # distances held at once: 128 MiB in float32


@dataclass
class KMeansResult:
    centroids: torch.Tensor
    """(k, D) in the data's dtype."""
    labels: torch.Tensor
    """(n,) int64 cluster of each of this rank's points."""
    distances: torch.Tensor
    """(n,) distance of each point to its centroid (squared L2, or 1 - cosine)."""
    inertia: float
    """Sum of ``distances`` over all ranks."""


# ---------------------------------------------------------------------------------------------- distances
def _rows_per_chunk(chunk_elements: int, row_elements: int) -> int:
    """How many rows of ``row_elements`` values fit in ``chunk_elements`` (at least one)."""
    return max(1, chunk_elements // max(row_elements, 1))


def squared_norms(x: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """(n, 1) ``||x||^2`` of each row, computed a chunk of rows at a time (``x * x`` whole is another copy of
    the points). Computed once per set of points and passed to :func:`_distances`: k-means++ spent three quarters
    of its time, and its memory growth, recomputing it for each new centre."""
    out = torch.empty(len(x), 1, dtype=x.dtype, device=x.device)
    step = _rows_per_chunk(chunk_elements, x.shape[1])
    for start in range(0, len(x), step):
        rows = x[start : start + step]
        out[start : start + step] = (rows * rows).sum(1, keepdim=True)
    return out


def _distances(x: torch.Tensor, centroids: torch.Tensor, metric: str, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """(n, k) squared L2 distances (||x||^2 - 2 x.c + ||c||^2), or 1 - cosine for normalised rows. ``x_sq``: the
    rows' :func:`squared_norms`, when known."""
    if metric == "cos":
        return torch.addmm(torch.ones(1, dtype=x.dtype, device=x.device), x, centroids.T, alpha=-1)
    # one BLAS call: ||c||^2 - 2 x.c, then + ||x||^2 (clamped: rounding can dip below 0)
    partial = torch.addmm((centroids * centroids).sum(1)[None], x, centroids.T, alpha=-2)
    return partial.add_(squared_norms(x) if x_sq is None else x_sq).clamp_min_(0)


def assign(x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "l2",
           chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
           x_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of ``x`` and the distance to it, ``chunk_elements`` distances at a time.
    ``x_sq``: the rows' :func:`squared_norms`, when known (L2)."""
    step = _rows_per_chunk(chunk_elements, len(centroids))
    labels = torch.empty(len(x), dtype=torch.long, device=x.device)
    dists = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for start in range(0, len(x), step):
        rows_sq = None if x_sq is None else x_sq[start : start + step]
        d = _distances(x[start : start + step], centroids, metric, rows_sq)  # (chunk, k)
        dists[start : start + step], labels[start : start + step] = d.min(dim=1)
    return labels, dists


# ---------------------------------------------------------------------------------------------- helpers
def _gather_scalars(value: float, distributed: bool, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(world,) one value per rank (a tensor collective: far cheaper than pickled objects over gloo)."""
    local = torch.tensor([value], dtype=dtype)
    return du.all_gather_cat(local.to(du.comm_device())).cpu() if distributed else local


def _global_sizes(n_local: int, distributed: bool) -> list[int]:
    return _gather_scalars(n_local, distributed, torch.long).tolist()


def _sum(t: torch.Tensor, distributed: bool) -> torch.Tensor:
    return du.all_reduce_sum(t) if distributed else t


def _rows(x: torch.Tensor, positions: list[int], offset: int, distributed: bool) -> torch.Tensor:
    """Rows at global ``positions`` (each owned by one rank), on every rank."""
    out = torch.zeros(len(positions), x.shape[1], dtype=torch.float64, device=x.device)
    for j, p in enumerate(positions):
        if offset <= p < offset + len(x):
            out[j] = x[p - offset].double()
    return _sum(out, distributed).to(x.dtype)  # exact: one rank adds the value, the others zeros


def _sample_positions(weights: torch.Tensor, n: int, rng: np.random.Generator, offset: int,
                      distributed: bool) -> list[int]:
    """``n`` global positions drawn with probability proportional to ``weights`` (this rank's slice)."""
    totals = _gather_scalars(weights.sum().item(), distributed).numpy()
    ends = np.cumsum(totals)
    draws = rng.random(n) * ends[-1]  # the same numbers on every rank
    rank = du.get_rank() if distributed else 0
    owners = np.minimum(np.searchsorted(ends, draws, side="right"), len(ends) - 1)
    local = torch.zeros(n, dtype=torch.long)
    mine = np.nonzero(owners == rank)[0]
    if len(mine):
        cumsum = torch.cumsum(weights.double(), 0).cpu().numpy()
        within = draws[mine] - (ends[rank] - totals[rank])
        hits = np.minimum(np.searchsorted(cumsum, within, side="right"), len(cumsum) - 1)
        local[torch.from_numpy(mine)] = torch.from_numpy(hits + offset).long()
    return _sum(local.to(du.comm_device()) if distributed else local, distributed).tolist()


# ---------------------------------------------------------------------------------------------- k-means
def kmeans_plus_plus(x: torch.Tensor, k: int, *, rng: np.random.Generator, metric: str = "l2",
                     distributed: bool = False) -> torch.Tensor:
    """(k, D) initial centroids by greedy k-means++ over the rows of every rank."""
    sizes = _global_sizes(len(x), distributed)
    offset = sum(sizes[: du.get_rank()]) if distributed else 0
    n_trials = 2 + int(math.log(k))
    first = int(rng.integers(sum(sizes)))
    centroids = [_rows(x, [first], offset, distributed)]
    x_sq = squared_norms(x) if metric == "l2" else None
    closest = _distances(x, centroids[0], metric, x_sq)[:, 0].double()  # (n,) to the nearest chosen centre
    for _ in range(1, k):
        positions = _sample_positions(closest, n_trials, rng, offset, distributed)
        candidates = _rows(x, positions, offset, distributed)  # (trials, D)
        d = torch.minimum(closest[:, None], _distances(x, candidates, metric, x_sq).double())  # (n, trials)
        potentials = _sum(d.sum(0), distributed)
        best = int(torch.argmin(potentials))
        centroids.append(candidates[best : best + 1])
        closest = d[:, best]
    return torch.cat(centroids)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    n_iters: int = 20,
    seed: int = 0,
    metric: str = "l2",
    init: torch.Tensor | None = None,
    high_precision: torch.dtype = torch.float64,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    distributed: bool = False,
) -> KMeansResult:
    """Lloyd's k-means of the rows of ``x`` (this rank's slice when ``distributed``).

    ``x`` stays in its own dtype (float32, or float64 for exactness) on its own device. ``init`` gives
    starting centroids; otherwise k-means++ with a generator seeded by ``seed``.
    """
    if metric not in METRICS:
        raise DinokitError(f"unknown k-means metric {metric!r}; use one of {', '.join(METRICS)}")
    n_total = sum(_global_sizes(len(x), distributed))
    if k < 1 or n_total < k:
        raise DinokitError(f"cannot make {k} clusters of {n_total} points; lower the number of clusters")
    rng = np.random.default_rng(seed)
    centroids = init.to(x) if init is not None else kmeans_plus_plus(x, k, rng=rng, metric=metric, distributed=distributed)
    x_sq = squared_norms(x, chunk_elements) if metric == "l2" else None
    labels, dists = assign(x, centroids, metric=metric, chunk_elements=chunk_elements, x_sq=x_sq)
    step = _rows_per_chunk(chunk_elements, x.shape[1])  # rows converted to high precision at once
    for _ in range(n_iters):
        sums = torch.zeros(k, x.shape[1], dtype=high_precision, device=x.device)
        for start in range(0, len(x), step):  # a chunk at a time: a high-precision copy of every point was 2x them
            sums.index_add_(0, labels[start : start + step], x[start : start + step].to(high_precision))
        counts = torch.bincount(labels, minlength=k).to(high_precision)
        _sum(sums, distributed)
        _sum(counts, distributed)
        filled = counts > 0
        new = centroids.to(high_precision).clone()
        new[filled] = sums[filled] / counts[filled, None]
        if metric == "cos":
            new[filled] = torch.nn.functional.normalize(new[filled], dim=1)
        centroids = new.to(x.dtype)
        new_labels, dists = assign(x, centroids, metric=metric, chunk_elements=chunk_elements, x_sq=x_sq)
        changed = _sum(torch.tensor([(new_labels != labels).sum().item()], device=x.device), distributed)
        labels = new_labels
        if changed.item() == 0:
            break  # converged: the next update would give the same centroids
    inertia = _sum(dists.double().sum().reshape(1), distributed).item()
    return KMeansResult(centroids=centroids, labels=labels, distances=dists, inertia=inertia)


# ---------------------------------------------------------------------------------------------- hierarchy
@dataclass
class Level:
    """One level of the hierarchy: ``centroids`` (k, D) and the cluster of each input row."""

    centroids: torch.Tensor
    labels: torch.Tensor
    """(n,) for level 1 this rank's points; for higher levels, the previous level's clusters."""
    distances: torch.Tensor


def _resample(x: torch.Tensor, result: KMeansResult, sample_size: int, sampling: str, seed: int, offset: int,
              distributed: bool) -> torch.Tensor:
    """Up to ``sample_size`` points per cluster (closest to the centroid, or random), on every rank."""
    if sampling == "c":
        keys = result.distances.double().cpu()
    else:  # a random key per point from its global position: the same draw on any number of ranks
        positions = torch.arange(offset, offset + len(x), dtype=torch.float64)
        keys = torch.frac(torch.sin(positions * 12.9898 + seed * 78.233) * 43758.5453).abs()
    labels = result.labels.cpu()
    order = torch.argsort(keys, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]  # by cluster, then by key
    # rank of each point within its cluster
    counts = torch.bincount(labels, minlength=len(result.centroids))
    starts = torch.cumsum(counts, 0) - counts
    within = torch.arange(len(order)) - starts[labels[order]]
    chosen = order[within < sample_size]
    local = (labels[chosen], keys[chosen], x[chosen.to(x.device)].cpu())
    parts = du.all_gather_object(local) if distributed else [local]
    lab = torch.cat([p[0] for p in parts])
    key = torch.cat([p[1] for p in parts])
    rows = torch.cat([p[2] for p in parts])
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(lab[order], stable=True)]
    counts = torch.bincount(lab, minlength=len(result.centroids))
    within = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[lab[order]]
    return rows[order[within < sample_size]].to(x.device)


def _assign_within(x: torch.Tensor, parent: torch.Tensor, sub: torch.Tensor, starts: torch.Tensor,
                   counts: torch.Tensor, metric: str, chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest of the sub-centroids ``sub[starts[c] : starts[c] + counts[c]]`` of each row's cluster ``c = parent``."""
    width = max(int(counts.max()), 1)
    slots = starts[:, None] + torch.arange(width, device=starts.device)  # (k, width) rows of sub, padded
    valid = torch.arange(width, device=starts.device) < counts[:, None]
    step = _rows_per_chunk(chunk_elements, width * x.shape[1])
    labels = torch.empty(len(x), dtype=torch.long, device=x.device)
    dists = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for start in range(0, len(x), step):
        rows, c = x[start : start + step], parent[start : start + step]
        cand = sub[slots[c].clamp_max(len(sub) - 1)]  # (chunk, width, D)
        dots = torch.einsum("nd,nwd->nw", rows, cand)
        if metric == "cos":
            d = 1 - dots
        else:
            d = ((cand * cand).sum(-1) - 2 * dots + (rows * rows).sum(1, keepdim=True)).clamp_min_(0)
        d = d.masked_fill(~valid[c], float("inf"))
        best, which = d.min(dim=1)
        dists[start : start + step], labels[start : start + step] = best, slots[c].gather(1, which[:, None])[:, 0]
    return labels, dists


def split_clusters(x: torch.Tensor, result: KMeansResult, n_splits: int, *, n_iters: int, seed: int, metric: str,
                   chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, distributed: bool = False) -> KMeansResult:
    """Each cluster of ``result`` split in ``min(n_splits, size)`` by a k-means of its own points (k-means++ init):
    the paper's way to reach millions of clusters, as one k-means of that many centroids could not.

    Sub-clusters are numbered cluster by cluster. Under ``torchrun`` cluster ``c`` is split by rank ``c % world``,
    which receives its points from every rank in their global order, so the result is the one-process result; every
    rank then labels its own points with the nearest sub-centroid of their cluster.
    """
    k = len(result.centroids)
    labels = result.labels
    counts = _sum(torch.bincount(labels, minlength=k).to(du.comm_device()), distributed).cpu()
    world, rank = (du.get_world_size(), du.get_rank()) if distributed else (1, 0)
    if distributed:  # the points of cluster c go to rank c % world, in their global order (ranks in order)
        own_labels = du.exchange_rows(labels, labels % world).cpu()
        own_rows = du.exchange_rows(x, labels % world).to(x.device)
    else:
        own_labels, own_rows = labels.cpu(), x
    order = torch.argsort(own_labels, stable=True)  # by cluster, global order within each
    bounds = torch.cumsum(torch.bincount(own_labels, minlength=k), 0).tolist()
    subs: dict[int, torch.Tensor] = {}
    for c in range(rank, k, world):
        members = order[(bounds[c - 1] if c else 0) : bounds[c]]
        if len(members):
            points = own_rows[members.to(own_rows.device)]
            m = min(n_splits, len(points))
            subs[c] = kmeans(points, m, n_iters=n_iters, seed=seed * 1_000_003 + c, metric=metric,
                             chunk_elements=chunk_elements).centroids.cpu()
    if distributed:
        for part in du.all_gather_object(subs):
            subs.update(part)
    sizes = torch.tensor([len(subs[c]) if c in subs else 0 for c in range(k)])
    assert torch.equal(sizes, torch.minimum(counts, torch.tensor(n_splits))), "split sizes disagree"
    centroids = torch.cat([subs[c] for c in sorted(subs)]).to(x.device, x.dtype)
    starts = (torch.cumsum(sizes, 0) - sizes).to(x.device)
    new_labels, dists = _assign_within(x, labels, centroids, starts, sizes.to(x.device), metric, chunk_elements)
    inertia = _sum(dists.double().sum().reshape(1), distributed).item()
    return KMeansResult(centroids=centroids, labels=new_labels, distances=dists, inertia=inertia)


def check_level_sizes(n_clusters: Sequence[int], n_splits: Sequence[int]) -> None:
    """Each level must hold fewer clusters than the one below it gives (its clusters times its splits)."""
    if any(b >= a * split for a, split, b in zip(n_clusters, n_splits, list(n_clusters)[1:])):
        raise DinokitError(f"cluster.n_clusters {list(n_clusters)} must decrease level after level (a level split "
                           "by cluster.n_splits counts its clusters times its splits)")


def hierarchical_kmeans(
    x: torch.Tensor,
    n_clusters: list[int],
    *,
    resampling_steps: list[int] | None = None,
    sample_size: list[int] | None = None,
    n_splits: list[int] | None = None,
    sampling: str = "c",
    n_iters: int = 20,
    seed: int = 0,
    metric: str = "l2",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    distributed: bool = False,
) -> list[Level]:
    """Levels bottom-up: level 1 clusters the rows of ``x`` (sliced over ranks when ``distributed``),
    level ``l + 1`` clusters the centroids of level ``l`` (small: replicated on every rank).

    ``resampling_steps[l]`` rounds of resampling follow the first k-means of level ``l`` (0: plain k-means; the
    paper's code counts the first k-means too, so its ``n_resampling_steps`` is one more),
    each with ``sample_size[l]`` points per cluster, chosen by ``sampling``: ``c`` closest, ``r`` random. Then, where
    ``n_splits[l] > 1``, each cluster is split in up to that many (:func:`split_clusters`), and the next level
    clusters the sub-clusters.
    """
    depth = len(n_clusters)
    resampling_steps = list(resampling_steps or [0] * depth)
    sample_size = list(sample_size or [1] * depth)
    n_splits = list(n_splits or [1] * depth)
    if len(resampling_steps) != depth or len(sample_size) != depth or len(n_splits) != depth:
        raise DinokitError("cluster.resampling_steps, cluster.sample_size and cluster.n_splits need one value per "
                           "level of cluster.n_clusters")
    if sampling not in ("c", "r"):
        raise DinokitError(f"unknown cluster.sampling {sampling!r}; use c (closest to the centroid) or r (random)")
    check_level_sizes(n_clusters, n_splits)
    levels: list[Level] = []
    points, dist = x, distributed
    for level, k in enumerate(n_clusters):
        offset = sum(_global_sizes(len(points), dist)[: du.get_rank()]) if dist else 0
        level_seed = seed * 1000 + level * 100
        result = kmeans(points, k, n_iters=n_iters, seed=level_seed, metric=metric, chunk_elements=chunk_elements,
                        distributed=dist)
        for step in range(resampling_steps[level]):
            sample = _resample(points, result, sample_size[level], sampling, level_seed + step + 1, offset, dist)
            if len(sample) < k:
                break  # too few points left to hold k clusters: keep the current centroids
            sub = kmeans(sample, k, n_iters=n_iters, seed=level_seed + step + 1, metric=metric,
                         chunk_elements=chunk_elements)
            labels, dists = assign(points, sub.centroids, metric=metric, chunk_elements=chunk_elements)
            inertia = _sum(dists.double().sum().reshape(1), dist).item()
            result = KMeansResult(centroids=sub.centroids, labels=labels, distances=dists, inertia=inertia)
        if n_splits[level] > 1:
            result = split_clusters(points, result, n_splits[level], n_iters=n_iters, seed=level_seed + 99,
                                    metric=metric, chunk_elements=chunk_elements, distributed=dist)
        levels.append(Level(centroids=result.centroids, labels=result.labels, distances=result.distances))
        points, dist = result.centroids, False
    return levels
