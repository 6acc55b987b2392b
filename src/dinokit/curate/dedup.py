"""Copy-detection deduplication: a thresholded k-NN graph, its connected components, one image kept each.

Self-deduplication links every pool image to its ``k`` (64) nearest neighbours whose cosine similarity
exceeds ``threshold`` (0.6 in the LVD-142M pipeline) and keeps one representative per connected
component. Relative deduplication against evaluation sets uses a stricter (lower) threshold (0.45) and
drops every pool component that touches an evaluation image, so that no near-copy of a test image is
pretrained on.

Connected components come from a disjoint-set forest (union-find) processed a whole edge list at a time:
each round finds the root of both ends of every edge, hooks the larger root under the smaller one, then
compresses paths by pointer jumping, until no edge joins two trees. A component's root is therefore its
smallest index, whatever the edge order. The rounds are numpy array operations, so 10^7 edges take
seconds; there is no per-edge Python loop.

The descriptors are compared centred on the pool's mean (:func:`centred_unit_rows`); images on the mean itself
(:func:`centre_tolerance`) are joined as copies (:func:`centre_links`), since their centred cosines say nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DinokitError

KEEP_RULES = ("largest", "first", "central")


# ---------------------------------------------------------------------------------------------- union-find
def _compress(parent: np.ndarray) -> np.ndarray:
    """Point every node straight at its root (pointer jumping until the forest is flat)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    """(n,) component label of each node: the smallest node index of its component.

    ``edges`` is an (E, 2) integer array of undirected links between nodes ``0 .. n-1``.
    """
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    parent = np.arange(n, dtype=np.int64)
    u, v = edges[:, 0], edges[:, 1]
    while len(u):
        ru, rv = parent[u], parent[v]  # roots: the forest is flat after each round
        cross = ru != rv
        u, v, ru, rv = u[cross], v[cross], ru[cross], rv[cross]  # edges inside one tree are done for good
        if not len(u):
            break
        # Hook each larger root under the smallest root it is linked to; roots only move to smaller
        # indices, so no cycle can form.
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        parent = _compress(parent)
    return parent


def edges_above(sims: torch.Tensor | np.ndarray, idx: torch.Tensor | np.ndarray, threshold: float,
                row_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(E, 2) edges (row, neighbour) of a k-NN list whose similarity exceeds ``threshold``, and their (E,) similarities.

    ``sims``/``idx`` are (M, k) from :func:`~dinokit.curate.knn.knn_search`; row ``r`` is node
    ``row_offset + r``. Self-links and missing neighbours (-1) are dropped.
    """
    sims, idx = np.asarray(sims), np.asarray(idx)
    rows = np.broadcast_to(np.arange(len(idx))[:, None] + row_offset, idx.shape)
    keep = (sims > threshold) & (idx >= 0) & (idx != rows)
    return np.stack([rows[keep], idx[keep]], axis=1).astype(np.int64), sims[keep]


# ---------------------------------------------------------------------------------------------- representatives
def choose_representatives(
    labels: np.ndarray,
    *,
    keep: str = "largest",
    sizes: np.ndarray | None = None,
    features: torch.Tensor | None = None,
) -> np.ndarray:
    """Sorted indices of the one image kept per component (``labels`` from :func:`connected_components`).

    ``largest``: the biggest file (``sizes``, bytes: the least re-compressed, highest-resolution copy);
    ``first``: the smallest index; ``central``: the member most similar to its component's mean
    ``features`` (L2-normalised rows). Ties go to the smallest index.
    """
    if keep not in KEEP_RULES:
        raise DinokitError(f"unknown dedup.keep {keep!r}; use one of {', '.join(KEEP_RULES)}")
    labels = np.asarray(labels)
    n = len(labels)
    if keep == "first":
        return np.unique(labels)  # a root is its component's smallest index
    if keep == "largest":
        if sizes is None:
            raise ValueError("keep='largest' needs the file sizes")
        score = np.asarray(sizes, dtype=np.float64)
    else:
        if features is None:
            raise ValueError("keep='central' needs the features")
        x = features.float()
        means = torch.zeros(n, x.shape[1]).index_add_(0, torch.from_numpy(labels), x)  # (n, D), rows at roots
        score = (x * means[torch.from_numpy(labels)]).sum(1).double().numpy()
    # Best score first, then smallest index; the first row of each component in that order wins.
    order = np.lexsort((np.arange(n), -score, labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    return np.sort(order[first])


# ---------------------------------------------------------------------------------------------- relative dedup
def relative_dedup(n_pool: int, pool_edges: np.ndarray, eval_sims, eval_idx, threshold: float) -> np.ndarray:
    """Boolean (n_pool,) mask of the pool images to drop: all members of a component holding an eval image.

    ``pool_edges`` are pool-pool links already cut at ``threshold``; ``eval_sims``/``eval_idx`` (M, k)
    are each evaluation image's nearest pool images. Evaluation image ``j`` is node ``n_pool + j``.
    """
    eval_sims, eval_idx = np.asarray(eval_sims), np.asarray(eval_idx)
    n_eval = len(eval_idx)
    keep = (eval_sims > threshold) & (eval_idx >= 0)
    rows = np.broadcast_to(np.arange(n_eval)[:, None] + n_pool, eval_idx.shape)
    cross = np.stack([rows[keep], eval_idx[keep]], axis=1)
    labels = connected_components(n_pool + n_eval, np.concatenate([pool_edges.reshape(-1, 2), cross]))
    touched = np.zeros(n_pool + n_eval, dtype=bool)
    touched[labels[n_pool:]] = True  # the roots of the components that hold an evaluation image
    return touched[labels[:n_pool]]


# ---------------------------------------------------------------------------------------------- centring
# a pool image within this of the mean (relative to its norm) sits on the centre; within the looser one, when every
# image of the pool does (a pool of one image, also re-saved or resized)
EXACT_TOLERANCE, CENTRE_TOLERANCE = 1e-3, 0.05


def centred_unit_rows(x: torch.Tensor, center: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """``F.normalize(x - center, dim=1)`` computed in ``x`` itself (a fresh array): the pool, its centred copy and
    its normalised copy were three (n, D) arrays at once (30 GB for 10M images of 256-wide descriptors). Also each
    row's distance to the centre relative to its norm, to find the rows whose cosines after centring say nothing."""
    before = torch.linalg.vector_norm(x, dim=1)
    x.sub_(center)
    after = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    relative = (after[:, 0] / before.clamp_min(1e-12)).cpu().numpy()
    return x.div_(after.clamp_min_(1e-12)), relative


def centre_tolerance(relative: np.ndarray) -> float:
    """How near the pool's mean a row sits on the centre, given every pool row's ``relative`` distance to it. A row
    on the mean itself (a pool of copies of one image) is 0 after centring, every cosine 0. When every row lies
    within ``CENTRE_TOLERANCE`` (unit rows then pairwise at a cosine of at least 0.995: re-saved or resized copies of
    one image, which centring turns into noise), all sit on it; otherwise only the exact mean does: in a pool of
    near-identical but distinct images (frames of a still scene) the centred cosines are what tell them apart."""
    return CENTRE_TOLERANCE if len(relative) and (relative <= CENTRE_TOLERANCE).all() else EXACT_TOLERANCE


def centre_links(at_centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (similarity 1) joining the pool images that sat on the centre: the same descriptor, so copies."""
    nodes = np.nonzero(at_centre)[0]
    edges = np.stack([np.full(max(len(nodes) - 1, 0), nodes[0] if len(nodes) else 0), nodes[1:]], axis=1)
    return edges.astype(np.int64), np.ones(len(edges), dtype=np.float32)
