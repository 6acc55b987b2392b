"""Curation at scale on a CPU: dedup + 2-level clustering of 100k x 384-d embeddings, and k-means vs FAISS/sklearn.

Run from the repo root: ``PYTHONPATH=src python benchmarks/kmeans.py [--n 100000 --dim 384 --threads 2]``.

The embeddings are synthetic but shaped like real ones: L2-normalised points around ``n/100`` centres of
random sizes (a long tail), plus 5% near-copies of other points (tiny noise). Three parts, in one run:

1. **dedup**: the k = 64 cosine neighbour graph (the method ``auto`` picks), edges above 0.85,
   union-find components, one image kept each;
2. **cluster**: dinokit's 2-level hierarchical k-means with resampling on the kept points;
3. **k-means comparison** on the same points and k: dinokit (k-means++ init, Lloyd), FAISS's
   ``faiss.Kmeans`` and scikit-learn's ``MiniBatchKMeans``, each for the same number of iterations;
   time and inertia (sum of squared distances) as ratios to dinokit's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F


def synthetic_embeddings(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    n_centres = max(2, n // 100)
    centres = rng.normal(size=(n_centres, dim)).astype(np.float32)
    weights = rng.pareto(1.5, n_centres) + 1  # a long tail of cluster sizes
    n_copies = n // 20
    owner = rng.choice(n_centres, size=n - n_copies, p=weights / weights.sum())
    x = centres[owner] + 0.8 * rng.normal(size=(n - n_copies, dim)).astype(np.float32)
    copies = x[rng.integers(0, len(x), n_copies)] + 0.02 * rng.normal(size=(n_copies, dim)).astype(np.float32)
    return F.normalize(torch.from_numpy(np.concatenate([x, copies])), dim=1)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    from dinokit.curate.kmeans import assign

    _, d = assign(torch.from_numpy(x).double(), torch.from_numpy(centroids).double())
    return float(d.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=None, help="clusters per level [auto: 2 levels]")
    parser.add_argument("--k", type=int, default=1000, help="clusters in the k-means comparison")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--knn", default="auto", help="neighbour search for dedup: auto, exact, faiss, faiss-ivf")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dinokit.curate.dedup import choose_representatives, connected_components, edges_above
    from dinokit.curate.kmeans import hierarchical_kmeans, kmeans
    from dinokit.curate.knn import knn_search, resolve_method
    from dinokit.curate.pipeline import auto_levels

    x = synthetic_embeddings(args.n, args.dim)
    print(f"{args.n} x {args.dim} embeddings, {args.threads} threads")

    # ------------------------------------------------------------------ dedup
    method = resolve_method(args.knn, len(x), x.device)
    (sims, idx), t_knn = timed(knn_search, x, x, 65, method=args.knn)
    edges, _ = edges_above(sims, idx, 0.85)
    labels, t_uf = timed(connected_components, len(x), edges)
    kept = choose_representatives(labels, keep="first")
    print(f"dedup: {method} 64-NN graph {t_knn:.1f} s, union-find over {len(edges)} edges {t_uf:.2f} s, "
          f"kept {len(kept)} of {len(x)}")

    # ------------------------------------------------------------------ cluster
    points = x[kept]
    levels = args.levels or auto_levels(len(points))
    sizes = [len(points)] + levels[:-1]
    sample = [max(1, s // (2 * k)) for s, k in zip(sizes, levels)]
    _, t_h = timed(hierarchical_kmeans, points, levels, resampling_steps=[2] * len(levels), sample_size=sample,
                   n_iters=args.iters)
    print(f"cluster: levels {levels}, 2 resampling steps each, {args.iters} iterations: {t_h:.1f} s")
    print(f"dedup + cluster: {t_knn + t_uf + t_h:.1f} s")

    # ------------------------------------------------------------------ k-means comparison
    data = points.numpy().astype(np.float32)
    ours, t_ours = timed(kmeans, points, args.k, n_iters=args.iters, seed=0)
    rows = [("dinokit", t_ours, inertia(data, ours.centroids.numpy()))]
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        km = faiss.Kmeans(args.dim, args.k, niter=args.iters, seed=0, max_points_per_centroid=10**9)
        _, t_f = timed(km.train, data)
        rows.append(("faiss", t_f, inertia(data, km.centroids)))
    except ImportError:
        print("faiss not installed: pip install 'dinokit[faiss]'")
    try:
        from sklearn.cluster import MiniBatchKMeans

        mb = MiniBatchKMeans(args.k, max_iter=args.iters, batch_size=4096, n_init=1, random_state=0)
        _, t_s = timed(mb.fit, data)
        rows.append(("sklearn MiniBatchKMeans", t_s, inertia(data, mb.cluster_centers_)))
    except ImportError:
        print("scikit-learn not installed")
    print(f"\nk-means, k = {args.k}, {args.iters} iterations, {len(data)} points:")
    print(f"{'method':<26}{'seconds':>9}{'time/dinokit':>14}{'inertia/dinokit':>17}")
    for name, seconds, value in rows:
        print(f"{name:<26}{seconds:>9.1f}{seconds / t_ours:>14.2f}{value / rows[0][2]:>17.4f}")


if __name__ == "__main__":
    main()
