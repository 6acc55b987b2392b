"""Curation algorithms: union-find dedup, relative dedup, neighbour search, k-means, balanced sampling."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinokit.curate.kmeans import assign, hierarchical_kmeans, kmeans
from dinokit.curate.knn import knn_search
from dinokit.curate.retrieve import retrieve_by_clusters, retrieve_by_samples
from dinokit.curate.sampling import best_cut, hierarchical_sample, leaf_quotas, split_budget
from dinokit.errors import DinokitError


# ---------------------------------------------------------------------------------------------- neighbours
def test_exact_search_returns_the_true_neighbours_in_chunks():
    gen = torch.Generator().manual_seed(0)
    db = F.normalize(torch.randn(500, 16, generator=gen), dim=1)
    q = F.normalize(torch.randn(37, 16, generator=gen), dim=1)
    sims, idx = knn_search(q, db, 7, method="exact", batch_size=10, chunk_size=64)
    full = q @ db.T
    ref_sims, ref_idx = full.topk(7, dim=1)
    torch.testing.assert_close(sims, ref_sims)
    assert torch.equal(idx, ref_idx)
    short_sims, short_idx = knn_search(q[:2], db[:3], 5, method="exact")
    assert (short_idx[:, 3:] == -1).all() and torch.isinf(short_sims[:, 3:]).all()
    pytest.importorskip("faiss")
    f_sims, f_idx = knn_search(q, db, 7, method="faiss")
    assert torch.equal(f_idx, ref_idx)
    torch.testing.assert_close(f_sims, ref_sims, atol=1e-5, rtol=0)


def test_sample_retrieval_is_the_union_of_exact_neighbours():
    gen = torch.Generator().manual_seed(1)
    pool = F.normalize(torch.randn(300, 8, generator=gen), dim=1)
    seed = F.normalize(torch.randn(20, 8, generator=gen), dim=1)
    chosen = retrieve_by_samples(seed, pool, k=4, method="exact")
    expected = np.unique((seed @ pool.T).topk(4, dim=1).indices.numpy())
    np.testing.assert_array_equal(chosen, expected)
    assert len(retrieve_by_samples(seed, pool, k=4, max_images=10, method="exact")) == 10


def test_cluster_retrieval_takes_clusters_holding_seed_images():
    centres = torch.eye(4) * 10
    gen = torch.Generator().manual_seed(0)
    pool = torch.cat([c + torch.randn(50, 4, generator=gen) * 0.1 for c in centres])  # 4 blobs of 50
    seed = torch.cat([centres[1] + torch.randn(5, 4, generator=gen) * 0.1, centres[3][None]])  # 5 in blob 1, 1 in 3
    chosen = retrieve_by_clusters(seed, pool, n_clusters=4, min_seed_images=3, per_cluster=20)
    assert len(chosen) == 20 and ((chosen >= 50) & (chosen < 100)).all()


# ---------------------------------------------------------------------------------------------- k-means
def _lloyd_reference(x: np.ndarray, centroids: np.ndarray, n_iters: int) -> tuple[np.ndarray, np.ndarray]:
    for _ in range(n_iters):
        d = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
        labels = d.argmin(1)
        centroids = np.stack([x[labels == j].mean(0) if (labels == j).any() else centroids[j]
                              for j in range(len(centroids))])
    return centroids, ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)


def test_kmeans_matches_a_brute_force_lloyd_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    init = x[rng.choice(400, 6, replace=False)]
    ref_centroids, ref_labels = _lloyd_reference(x, init, 8)
    result = kmeans(torch.from_numpy(x), 6, init=torch.from_numpy(init), n_iters=8, chunk_elements=100)
    np.testing.assert_allclose(result.centroids.numpy(), ref_centroids, atol=1e-10)
    np.testing.assert_array_equal(result.labels.numpy(), ref_labels)
    assert result.inertia == pytest.approx(((x - ref_centroids[ref_labels]) ** 2).sum())


def test_kmeans_chunking_and_cached_norms_change_no_bit():
    """The rows' squared norms are computed once per k-means (k-means++ recomputed them for every centre: most of
    its time, and a copy of the points each time), and the high-precision sums are made a chunk of rows at a time:
    any chunk size gives the same centroids and labels, for both metrics, k-means++ included."""
    from dinokit.curate.kmeans import assign, squared_norms

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 16, generator=gen)
    x[:1000] += 4
    np.testing.assert_array_equal(squared_norms(x, chunk_elements=50), (x * x).sum(1, keepdim=True))
    for metric, points in (("l2", x), ("cos", torch.nn.functional.normalize(x, dim=1))):
        whole = kmeans(points, 12, n_iters=6, seed=5, metric=metric)
        chunked = kmeans(points, 12, n_iters=6, seed=5, metric=metric, chunk_elements=16 * 7)  # 7 rows at a time
        assert torch.equal(whole.centroids, chunked.centroids) and torch.equal(whole.labels, chunked.labels)
        # the distances are BLAS products of other shapes: equal to rounding
        torch.testing.assert_close(whole.distances, chunked.distances, rtol=1e-5, atol=1e-5)
        assert whole.inertia == pytest.approx(chunked.inertia, rel=1e-9)
    labels, dists = assign(x, whole.centroids[:5] * 0 + x[:5], chunk_elements=64, x_sq=squared_norms(x))
    d = ((x[:, None] - x[None, :5]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, d.argmin(1))
    # |x|^2 - 2 x.c + |c|^2 in float32 with norms near 300: its cancellation error is some 1e-4 (CPU-dependent)
    np.testing.assert_allclose(dists, d.min(1).values, atol=1e-3)


def test_cluster_retrieval_samples_each_chosen_cluster_among_its_own_rows():
    """Each cluster's rows are found by one sort of the labels (a scan per cluster was N^1.5): with per_cluster
    at least a cluster's size the whole cluster is taken, else a sample of exactly per_cluster of its rows."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.eye(6) * 10
    sizes = [30, 8, 40, 5, 25, 12]
    pool = torch.cat([centres[i] + torch.randn(n, 6, generator=gen) * 0.1 for i, n in enumerate(sizes)])
    blob = np.repeat(np.arange(6), sizes)
    perm = torch.randperm(len(pool), generator=gen)  # blobs interleaved in the pool
    pool, blob = pool[perm], blob[perm.numpy()]
    seed = torch.cat([centres[i] + torch.randn(4, 6, generator=gen) * 0.1 for i in (0, 1, 2, 5)])
    chosen = retrieve_by_clusters(seed, pool, n_clusters=6, min_seed_images=3, per_cluster=10)
    assert len(set(chosen.tolist())) == len(chosen) and (np.diff(chosen) > 0).all()
    taken = np.bincount(blob[chosen], minlength=6)
    assert taken.tolist() == [10, 8, 10, 0, 0, 10]


def test_kmeans_finds_separable_blobs_like_scikit_learn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16)) * 10
    truth = rng.integers(0, 8, size=2000)
    x = (centres[truth] + rng.normal(size=(2000, 16))).astype(np.float32)
    ours = kmeans(torch.from_numpy(x), 8, n_iters=20, seed=0)
    theirs = sklearn_cluster.KMeans(8, n_init=1, random_state=0).fit(x)
    assert adjusted_rand_score(truth, ours.labels.numpy()) == 1.0
    assert adjusted_rand_score(truth, theirs.labels_) == 1.0
    assert ours.inertia == pytest.approx(theirs.inertia_, rel=1e-4)
    with pytest.raises(DinokitError, match="cannot make 9 clusters of 8 points"):
        kmeans(torch.from_numpy(x[:8]), 9)


def test_hierarchical_kmeans_flattens_the_density_level_by_level():
    # points crowded near 0 (x = u^4): 16% lie above 0.5. k-means centroids follow the density only
    # partly, and clustering the centroids again flattens it further: the balanced sampler relies on this.
    x = torch.from_numpy(np.random.default_rng(0).random(3000) ** 4)[:, None]
    levels = hierarchical_kmeans(x, [20, 5], resampling_steps=[3, 3], sample_size=[10, 2], n_iters=20)
    assert [tuple(l.centroids.shape) for l in levels] == [(20, 1), (5, 1)]
    assert levels[1].labels.shape == (20,)  # level 2 clusters level 1's centroids
    share = [float((v > 0.5).double().mean()) for v in (x, levels[0].centroids, levels[1].centroids)]
    assert share[0] < 0.17 and share[1] >= 0.3 and share[2] >= share[1], share
    labels, _ = assign(x, levels[0].centroids)
    assert torch.equal(labels, levels[0].labels)  # final labels = assignment to the final (resampled) centroids


def test_split_level_splits_each_cluster_by_its_own_kmeans():
    """cluster.n_splits (the paper's 10M-cluster level): each cluster of a k-means is split by a k-means of its own
    points, in min(n_splits, size) sub-clusters numbered cluster by cluster; the next level clusters those."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 4)) * 20
    x = torch.from_numpy(np.concatenate([centres[i] + rng.normal(size=(n, 4)) for i, n in enumerate((50, 40, 3))]))
    plain = hierarchical_kmeans(x, [3], n_iters=20)[0]
    levels = hierarchical_kmeans(x, [3, 2], n_splits=[4, 1], n_iters=20)
    split = levels[0]
    assert split.centroids.shape == (4 + 4 + 3, 4) and levels[1].labels.shape == (11,)  # the 3-point blob: 3
    parent_of_sub = {}
    for c in range(3):
        members = torch.nonzero(plain.labels == c)[:, 0]
        subs = torch.unique(split.labels[members])
        assert len(subs) == min(4, len(members)) and subs.tolist() == list(range(subs.min(), subs.max() + 1))
        parent_of_sub.update({int(s): c for s in subs})
        for s in subs:  # a converged k-means of c's points: each sub-centroid is the mean of its points
            torch.testing.assert_close(split.centroids[s], x[split.labels == s].mean(0))
        own, _ = assign(x[members], split.centroids[subs])  # each point: the nearest sub-centroid of its cluster
        assert torch.equal(split.labels[members], subs[own])
    assert sorted(parent_of_sub) == list(range(11))
    labels, dists = assign(x, split.centroids)  # sub-clusters are tight: the nearest overall is the own one here
    assert torch.equal(labels, split.labels) and torch.allclose(dists, split.distances)
    assert hierarchical_kmeans(x, [3, 5], n_splits=[2, 1])[1].centroids.shape == (5, 4)  # 5 < 3 x 2
    with pytest.raises(DinokitError, match=r"must decrease level after level \(a level split by cluster.n_splits"):
        hierarchical_kmeans(x, [3, 6], n_splits=[2, 1])


# ---------------------------------------------------------------------------------------------- sampling
def test_water_filling_cut_and_remainder():
    assert best_cut(np.array([10, 1, 5]), 7) == 3  # 3 + 1 + 3
    assert best_cut(np.array([2, 3]), 10) == 3  # everything fits
    quotas = split_budget(np.array([5, 5, 5]), 7, np.random.default_rng(0))
    assert sorted(quotas.tolist()) == [2, 2, 3]
    np.testing.assert_array_equal(split_budget(np.array([1, 8, 3]), 7, np.random.default_rng(0)), [1, 3, 3])


def test_hierarchical_sampler_gives_exact_quotas_on_a_planted_hierarchy():
    # leaves of sizes [10, 1, 5 | 1, 8, 3] under two top clusters (16 and 12 images); 14 to draw:
    # top: 7 + 7; first: cut 3 -> 3, 1, 3; second: cut 3 -> 1, 3, 3
    sizes = [10, 1, 5, 1, 8, 3]
    leaf = np.repeat(np.arange(6), sizes)
    leaf = leaf[np.random.default_rng(0).permutation(len(leaf))]
    parents = [np.array([0, 0, 0, 1, 1, 1])]
    chosen = hierarchical_sample(leaf, parents, 14, strategy="r", seed=3)
    assert len(chosen) == 14 and len(np.unique(chosen)) == 14
    np.testing.assert_array_equal(leaf_quotas(leaf, chosen, 6), [3, 1, 3, 1, 3, 3])
    distances = np.random.default_rng(1).random(len(leaf))
    closest = hierarchical_sample(leaf, parents, 14, distances=distances, strategy="c")
    members = np.nonzero(leaf == 0)[0]
    np.testing.assert_array_equal(np.intersect1d(closest, members), np.sort(members[np.argsort(distances[members])[:3]]))
    assert len(hierarchical_sample(leaf, parents, 28)) == 28  # everything
    with pytest.raises(DinokitError, match="--target-size 29 is larger than the 28 images left to sample from; lower"):
        hierarchical_sample(leaf, parents, 29)


def test_empty_clusters_at_the_end_of_a_level_are_sampled_around():
    """k-means may leave the last clusters of a level empty (43 images in 13 leaves): the leaf labels then stop
    before the parent array does, and the sampler raised "weights and list don't have the same length"."""
    sizes = [10, 1, 5, 1, 8, 3]
    leaf = np.repeat(np.arange(6), sizes)
    parents = [np.array([0, 0, 0, 1, 1, 1, 1, 2]), np.array([0, 0, 1, 1])]  # leaves 6, 7 and level-2 cluster 2, 3
    chosen = hierarchical_sample(leaf, parents, 14, seed=3)  # empty: no point in them
    assert len(np.unique(chosen)) == 14
    # the same quotas as without the empty clusters (the top level's 2 clusters share as before)
    np.testing.assert_array_equal(leaf_quotas(leaf, chosen, 6), leaf_quotas(
        leaf, hierarchical_sample(leaf, [np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0])], 14, seed=3), 6))


def test_multiplier_repeats_the_images_of_clusters_below_their_share():
    """sample.multiplier m: each cluster may give m times its size. The same planted hierarchy, m = 2, 40 images:
    top 20 + 20; first: cut 9 -> 9, 2, 9; second: cut 12 -> 2, 12, 6. A leaf gives each image quota // size
    times and quota % size of them (closest first with 'c') once more."""
    sizes = [10, 1, 5, 1, 8, 3]
    leaf = np.repeat(np.arange(6), sizes)
    leaf = leaf[np.random.default_rng(0).permutation(len(leaf))]
    parents = [np.array([0, 0, 0, 1, 1, 1])]
    distances = np.random.default_rng(1).random(len(leaf))
    chosen = hierarchical_sample(leaf, parents, 40, distances=distances, strategy="c", multiplier=2)
    assert len(chosen) == 40 and np.all(np.diff(chosen) >= 0)
    np.testing.assert_array_equal(leaf_quotas(leaf, chosen, 6), [9, 2, 9, 2, 12, 6])
    times = np.bincount(chosen, minlength=len(leaf))
    assert times.max() == 2 and (times[leaf == 0] <= 1).all() and (times[leaf == 5] == 2).all()
    members = np.nonzero(leaf == 2)[0]  # 9 from 5 images: all once, the 4 closest twice
    twice = members[np.argsort(distances[members])[:4]]
    assert (times[twice] == 2).all() and times[members].sum() == 9
    # m = 1 is the plain sampler; the bound names the multiplier
    np.testing.assert_array_equal(hierarchical_sample(leaf, parents, 14, seed=3, multiplier=1),
                                  hierarchical_sample(leaf, parents, 14, seed=3))
    assert len(hierarchical_sample(leaf, parents, 56, multiplier=2)) == 56
    with pytest.raises(DinokitError, match=r"--target-size 57 is larger than the 28 images left to sample from x "
                                           r"sample.multiplier 2; lower it$"):
        hierarchical_sample(leaf, parents, 57, multiplier=2)
    with pytest.raises(DinokitError, match="or repeat images with sample.multiplier=2$"):
        hierarchical_sample(leaf, parents, 29)


# ---------------------------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _blobs() -> torch.Tensor:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)) * 5
    return torch.from_numpy(centres[rng.integers(0, 6, 601)] + rng.normal(size=(601, 8))).float()


def _hkmeans(x: torch.Tensor, distributed: bool, n_splits=None):
    return hierarchical_kmeans(x, [20, 5], resampling_steps=[3, 2], sample_size=[8, 2], n_splits=n_splits,
                               sampling="r", n_iters=10, seed=1, distributed=distributed)


SPLITS = (None, [2, 1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    # a forked child: its OpenMP team would wait for ever on the parent's threads, which the fork did not copy
    # (pytest -n0 after a test that computed on several threads)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x = _blobs()
    part = slice(len(x) * rank // world, len(x) * (rank + 1) // world)
    for splits in SPLITS:
        levels = _hkmeans(x[part], True, splits)
        torch.save([(l.centroids, l.labels) for l in levels], f"{out}.{splits}.{rank}")
    dist.destroy_process_group()


def test_two_process_gloo_clustering_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "levels")
    # fork: the children need no fresh interpreter (spawn re-imports torch, ~15 s each on a loaded CPU)
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
    for splits in SPLITS:  # plain, and level 1 split in two (each cluster's points travel to one rank)
        ranks = [torch.load(f"{out}.{splits}.{r}") for r in range(2)]
        single = _hkmeans(_blobs(), False, splits)
        for level, ref in enumerate(single):
            for r in range(2):
                torch.testing.assert_close(ranks[r][level][0], ref.centroids, atol=1e-5, rtol=0)
            if level == 0:  # each rank labels its own slice of the points
                assert torch.equal(torch.cat([ranks[0][0][1], ranks[1][0][1]]), ref.labels)
            else:
                assert torch.equal(ranks[0][level][1], ref.labels)
        assert len(single[0].centroids) == (20 if splits is None else 40)


def _exchange_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from dinokit import distributed as du

    torch.set_num_threads(1)  # a forked child (see _worker)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = 4 + rank  # uneven row counts; rank 2 sends nothing to rank 0
    rows = torch.stack([torch.arange(n) + 100 * rank, torch.arange(n) * 0 + rank], 1)  # (n, 2) int64
    dest = torch.tensor([(i + rank) % world if rank < 2 else 1 + i % 2 for i in range(n)])
    torch.save(du.exchange_rows(rows, dest), f"{out}.{rank}")
    dist.destroy_process_group()


def test_exchange_rows_sends_each_row_to_its_rank_in_sender_order(tmp_path):
    """``distributed.exchange_rows`` (one all-to-all, uneven counts, a sender with nothing for a rank): each rank gets
    its rows by sending rank, each sender's in its own order; one process gets its tensor back."""
    import torch.multiprocessing as mp

    from dinokit import distributed as du

    out = str(tmp_path / "got")
    mp.start_processes(_exchange_worker, args=(3, _free_port(), out), nprocs=3, join=True, start_method="fork")
    sent = {r: [(100 * r + i, (i + r) % 3 if r < 2 else 1 + i % 2) for i in range(4 + r)] for r in range(3)}
    for rank in range(3):
        want = [[value, r] for r in range(3) for value, d in sent[r] if d == rank]
        assert torch.load(f"{out}.{rank}").tolist() == want
    x = torch.randn(5, 3)
    assert du.exchange_rows(x, torch.zeros(5, dtype=torch.long)) is x


def test_shards_that_did_not_record_their_model_files_are_never_reused(tmp_path, capsys):
    """A work folder of a dinokit before the model files were recorded, its weights retrained in place since: its
    features were copied into the new embedding of a changed pool, mixed with features of the new weights."""
    import json

    from dinokit.curate.embed import reusable_store
    from dinokit.curate.synthetic import write_copy_pairs
    from test_curate_reuse import _run
    from dinokit.eval.setup import setup_eval_model

    pool, work, weights = tmp_path / "pool", tmp_path / "work", tmp_path / "backbone.pth"
    write_copy_pairs(pool, n_images=3, copies=1)
    torch.save(setup_eval_model(config_file="demo", random_init=True)[0].state_dict(), weights)
    _run(pool, work, capsys, "--weights", str(weights))
    folder = work / "embed" / "pool"
    meta = json.loads((folder / "shard-00000.json").read_text())
    assert meta["files"] and reusable_store(folder, meta["settings"], meta["files"]) is not None
    for record in folder.glob("shard-*.json"):
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "files"}))
    assert reusable_store(folder, meta["settings"], meta["files"]) is None
