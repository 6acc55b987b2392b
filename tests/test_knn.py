"""k-NN protocol: exact agreement with a brute-force reference, chunking, few-shot subsets, ranks."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dinokit import distributed as du
from dinokit.errors import DinokitError
from dinokit.eval.knn import evaluate_knn, knn_classify, local_topk, sample_per_class, write_knn_results


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: a second OpenMP thread only contends (10x slower on a busy 2-core machine).

    Also used by test_linear, test_logreg and the test_eval_* files (imported there).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force_knn(train, train_labels, test, test_labels, *, ks, temperature, num_classes):
    """The official vote written the slow, obvious way: full similarity matrix, per-query loops."""
    sims = test @ train.T  # (M, N)
    max_k = max(ks)
    top_sims, top_idx = sims.sort(dim=1, descending=True)
    top_sims, top_idx = top_sims[:, :max_k], top_idx[:, :max_k]
    weights = torch.softmax(top_sims / temperature, dim=1)
    out = {}
    for k in ks:
        hits1 = hits5 = 0
        for q in range(test.shape[0]):
            scores = torch.zeros(num_classes, dtype=train.dtype)
            for j in range(k):
                scores[train_labels[top_idx[q, j]]] += weights[q, j]
            ranked = scores.argsort(descending=True, stable=True).tolist()  # ties: lower class first
            hits1 += int(ranked[0] == test_labels[q])
            hits5 += int(test_labels[q] in ranked[: min(5, num_classes)])
        out[k] = (100.0 * hits1 / len(test_labels), 100.0 * hits5 / len(test_labels))
    return out


def random_problem(n_train=200, n_test=40, dim=16, num_classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = F.normalize(torch.randn(n_train, dim, generator=g, dtype=torch.float64), dim=1)
    test = F.normalize(torch.randn(n_test, dim, generator=g, dtype=torch.float64), dim=1)
    train_y = torch.randint(0, num_classes, (n_train,), generator=g)
    return train, train_y, test, torch.randint(0, num_classes, (n_test,), generator=g)


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_knn_matches_brute_force_exactly(chunk_size):
    train, train_y, test, test_y = random_problem()
    ks = (1, 5, 20, 50)
    expected = brute_force_knn(train, train_y, test, test_y, ks=ks, temperature=0.07, num_classes=7)
    got = knn_classify(train, train_y, test, test_y, num_classes=7, ks=ks, temperature=0.07,
                       chunk_size=chunk_size, batch_size=13)
    assert got == expected
    assert any(0 < top1 < 100 for top1, _ in got.values())  # a non-trivial problem


def test_chunked_neighbours_identical_to_unchunked():
    train, train_y, test, _ = random_problem(n_train=101)
    reference = local_topk(test, train, train_y, 20, None)
    for chunk in (1, 7, 100, 1000):
        sims, labels = local_topk(test, train, train_y, 20, chunk)
        assert torch.equal(labels, reference[1])
        torch.testing.assert_close(sims, reference[0], rtol=0, atol=1e-14)  # matmul shapes round differently
    # The similarities are the 20 largest of the full matrix, in descending order.
    full = (test @ train.T).sort(dim=1, descending=True)
    torch.testing.assert_close(reference[0], full.values[:, :20], rtol=0, atol=1e-14)
    assert torch.equal(reference[1], train_y[full.indices[:, :20]])


def test_well_separated_clusters_are_perfectly_classified():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(6, 32) * 10
    train_y = torch.arange(6).repeat_interleave(30)
    test_y = torch.arange(6).repeat(5)
    train = centres[train_y] + torch.randn(180, 32, generator=g)
    test = centres[test_y] + torch.randn(30, 32, generator=g)
    results = evaluate_knn(train, train_y, test, test_y, num_classes=6, ks=(10, 20, 100), chunk_size=16)
    assert [(r.k, r.top1, r.top5) for r in results] == [(10, 100.0, 100.0), (20, 100.0, 100.0), (100, 100.0, 100.0)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_training_features_kept_on_the_cpu_give_the_same_results(device):
    """--gather-on-cpu (official option): the training shard stays in CPU memory and meets the queries on the device
    a chunk at a time; the same results as with the shard on the device."""
    train, train_y, test, test_y = random_problem(n_train=150)
    options = dict(num_classes=7, ks=(1, 5, 20), chunk_size=16, device=device)
    on_device = evaluate_knn(train, train_y, test, test_y, **options)
    assert evaluate_knn(train, train_y, test, test_y, gather_on_cpu=True, **options) == on_device
    cpu = knn_classify(train, train_y, test, test_y, num_classes=7, ks=(1, 5, 20), chunk_size=16, device=device)
    assert cpu == brute_force_knn(train, train_y, test, test_y, ks=(1, 5, 20), temperature=0.07, num_classes=7)


def test_top5_with_fewer_than_five_classes_is_total():
    train, train_y, test, test_y = random_problem(num_classes=3)
    got = knn_classify(train, train_y % 3, test, test_y % 3, num_classes=3, ks=(5,))
    assert got[5][1] == 100.0


def test_few_shot_sampling_counts_and_seeds():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 7)
    picked = sample_per_class(labels, 5, seed=0)
    assert torch.bincount(labels[picked]).tolist() == [5, 4, 5]
    assert len(set(picked.tolist())) == len(picked) and torch.equal(picked, picked.sort().values)
    assert torch.equal(picked, sample_per_class(labels, 5, seed=0))
    assert not torch.equal(sample_per_class(labels, 2, seed=0), sample_per_class(labels, 2, seed=1))
    assert torch.bincount(labels[sample_per_class(labels, 1, seed=3)]).tolist() == [1, 1, 1]


def test_few_shot_results_average_the_tries(capsys):
    train, train_y, test, test_y = random_problem(n_train=140)
    results = evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(1, 3), n_per_class_list=[-1, 2], n_tries=3)
    assert "note:" not in capsys.readouterr().out
    smallest = int(torch.bincount(train_y).min())
    few = evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(1,), n_per_class_list=[smallest + 1])
    smaller = int((torch.bincount(train_y) < smallest + 1).sum())
    assert (f"note: {smaller} class(es) have fewer than {smallest + 1} training images: the {smallest + 1}-shot row "
            "uses all of theirs") in capsys.readouterr().out  # it was silent
    assert few[0].notes == (f"{smaller} class(es) have fewer than {smallest + 1} training images: the "
                            f"{smallest + 1}-shot row uses all of theirs",)
    # few-shot rows as in the official code: the listed k up to n_per_class, plus n_per_class (1-shot: k=1 alone)
    assert [(r.n_per_class, r.k, r.n_tries) for r in results] == [(-1, 1, 1), (-1, 3, 1), (2, 1, 3), (2, 2, 3)]
    one_shot = evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(10, 20), n_per_class_list=[1, 5])
    assert [(r.n_per_class, r.k) for r in one_shot] == [(1, 1), (5, 5)]
    by_hand = []
    for seed in range(3):
        idx = sample_per_class(train_y, 2, seed=seed)
        accuracy = knn_classify(train[idx].float(), train_y[idx], test.float(), test_y, num_classes=7, ks=(1,))
        by_hand.append(accuracy[1][0])
    assert results[2].top1 == pytest.approx(sum(by_hand) / 3)
    json.dumps([r.__dict__ for r in results])  # serialisable as written to results_eval_knn.json


def test_k_larger_than_the_training_set_uses_every_sample(capsys, tmp_path):
    train, train_y, test, test_y = random_problem(n_train=12)
    results = evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(12, 200))
    assert "note: k=200 exceeds the 12 training samples: all 12 vote in that row\n" in capsys.readouterr().out
    assert (results[0].top1, results[0].top5) == (results[1].top1, results[1].top5)
    # the note is recorded with the line it concerns (it was only printed)
    assert results[0].notes == () and results[1].notes == ("k=200 exceeds the 12 training samples: all 12 vote",)
    written = write_knn_results(results, tmp_path, {"warnings": ["w"]})
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert [line["warnings"] for line in lines] == [["w"], ["w", "k=200 exceeds the 12 training samples: all 12 vote"]]
    assert "notes" not in lines[0]
    # every k above the training set is named (only the largest was: the rows of k=20 and 100 looked measured)
    evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(10, 20, 100, 200))
    assert "note: k=20, k=100, k=200 exceed the 12 training samples: all 12 vote in those rows\n" \
        in capsys.readouterr().out


def test_bad_settings_are_user_errors():
    """Python callers get the same one-line wording as ``dinokit eval knn`` (one checker for both)."""
    train, train_y, test, test_y = random_problem(n_train=12)
    for bad, message in [
        (dict(ks=(5, 0)), "--nb-knn must be at least 1, got 0"),
        (dict(temperature=0.0), "--temperature must be positive, got 0"),
        (dict(temperature=float("nan")), "--temperature must be positive, got nan"),
        (dict(n_tries=0), "--n-tries must be at least 1, got 0"),
        (dict(n_per_class_list=(-1, -2)), "--n-per-class-list must hold positive numbers (or -1 = all), got -2"),
        (dict(chunk_size=-1), "--chunk-size must be >= 0 (0 = all at once), got -1"),
    ]:
        with pytest.raises(DinokitError) as err:
            evaluate_knn(train, train_y, test, test_y, num_classes=7, **bad)
        assert str(err.value) == message
    # labels outside 0..num_classes-1 were a scatter index error deep in torch; lists were "no attribute 'unique'"
    with pytest.raises(DinokitError, match=r"^train_labels hold classes 0\.\.6, not within 0\.\.4: give num_classes"):
        evaluate_knn(train, train_y, test, test_y, num_classes=5)
    listed = evaluate_knn(train, train_y.tolist(), test, test_y.tolist(), num_classes=7, ks=(3,))
    assert listed == evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(3,))
    assert knn_classify(F.normalize(train, dim=1), train_y.tolist(), F.normalize(test, dim=1), test_y.tolist(),
                        num_classes=7, ks=(3,)) == {3: (listed[0].top1, listed[0].top5)}
    # the -1 of unlabelled images (extract_features of bare images) was a traceback from bincount; 0.7 was taken as
    # class 0; a column of labels, a traceback; mps and meta devices, tracebacks from deep in torch
    for labels, message in [(torch.full_like(train_y, -1), "train_labels hold classes -1..-1, not within 0..6: give "
                             "num_classes, the number of classes, or labels 0..N-1 (images without a label have -1)"),
                            (train_y + 0.7, "train_labels holds fractions (torch.float32); give class indices 0..6"),
                            (train_y[:, None], "train_labels has shape (12, 1); give one class index per feature row "
                             "(12)"),
                            (train_y[:5], "train_labels has shape (5,); give one class index per feature row (12)")]:
        with pytest.raises(DinokitError) as err:
            evaluate_knn(train, labels, test, test_y, num_classes=7)
        assert str(err.value) == message
    for device in ("mps", "meta"):
        with pytest.raises(DinokitError, match=f"^device='{device}' is not supported; use 'cpu', 'cuda' or 'cuda:N'$"):
            evaluate_knn(train, train_y, test, test_y, num_classes=7, device=device)
    # chunk_size 0 (the CLI's "all at once") and None agree with a small chunk
    a = evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(3,), chunk_size=0)
    b = evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(3,), chunk_size=5)
    assert (a[0].top1, a[0].top5) == (b[0].top1, b[0].top5)


class _ThreadRanks:
    """Two ranks as two threads: rank from a thread-local, all_gather_cat through a barrier."""

    def __init__(self, world: int) -> None:
        self.world, self.local = world, threading.local()
        self.barrier, self.slots = threading.Barrier(world), [None] * world

    def get_rank(self) -> int:
        return self.local.rank

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[self.local.rank] = tensor
        self.barrier.wait()
        out = torch.cat(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out


def test_sharded_over_simulated_ranks_equals_one_process(monkeypatch):
    train, train_y, test, test_y = random_problem(n_train=57)
    single = evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(1, 5, 20))
    ranks = _ThreadRanks(3)
    monkeypatch.setattr(du, "get_world_size", lambda: ranks.world)
    monkeypatch.setattr(du, "get_rank", ranks.get_rank)
    monkeypatch.setattr(du, "all_gather_cat", ranks.all_gather_cat)
    results = [None] * ranks.world

    def run(rank: int) -> None:
        ranks.local.rank = rank
        results[rank] = evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(1, 5, 20), chunk_size=4)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks.world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results[0] == results[1] == results[2] == single


def _sharded_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        train, train_y, test, test_y = random_problem(n_train=57)
        results = evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(1, 5, 20), chunk_size=4)
        torch.save([(r.k, r.top1, r.top5) for r in results], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two real gloo processes: ~15 s of process start-up on 2 cores
def test_sharded_over_two_ranks_equals_one_process(tmp_path):
    out = str(tmp_path / "result")
    mp.start_processes(_sharded_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, start_method="spawn")
    train, train_y, test, test_y = random_problem(n_train=57)
    single = [(r.k, r.top1, r.top5) for r in evaluate_knn(train, train_y, test, test_y, num_classes=7, ks=(1, 5, 20))]
    assert torch.load(f"{out}.0") == single == torch.load(f"{out}.1")
