"""The SSL stream: sampler positions, derived seeds, and loader reproducibility across workers and resumes."""

import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data.augmentations import DataAugmentationDINO
from dinokit.data.collate import SSLBatch, SSLCollate
from dinokit.data.loaders import make_ssl_data_loader
from dinokit.data.samplers import InfiniteStreamSampler, derive_seed, seeded_rngs
from dinokit.errors import DinokitError


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_ranks_take_contiguous_parts_of_each_global_batch():
    r0 = InfiniteStreamSampler(rank=0, world_size=2, batch_size_per_rank=3)
    r1 = InfiniteStreamSampler(rank=1, world_size=2, batch_size_per_rank=3)
    assert _take(r0, 6) == [0, 1, 2, 6, 7, 8]
    assert _take(r1, 6) == [3, 4, 5, 9, 10, 11]


def test_start_and_for_iteration():
    sampler = InfiniteStreamSampler.for_iteration(5, rank=1, world_size=2, batch_size_per_rank=3)
    assert sampler.start == 30
    assert _take(sampler, 4) == [33, 34, 35, 39]
    with pytest.raises(DinokitError, match="multiple of the global batch size 6"):
        InfiniteStreamSampler(start=4, rank=0, world_size=2, batch_size_per_rank=3)
    with pytest.raises(DinokitError, match="rank"):
        InfiniteStreamSampler(rank=2, world_size=2, batch_size_per_rank=3)


def test_derive_seed_is_stable_and_mixes():
    assert derive_seed(0, 1, "crops") == derive_seed(0, 1, "crops")
    seeds = {derive_seed(0, p, "crops") for p in range(100)} | {derive_seed(0, 0, "masks"), derive_seed(1, 0, "crops")}
    assert len(seeds) == 102
    assert all(0 <= s < 2**63 for s in seeds)


def test_seeded_rngs_is_repeatable_and_restores_global_state():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    draws = []
    for _ in range(2):
        with seeded_rngs(123):
            draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    after = (random.random(), np.random.rand(), torch.rand(1))
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])


# ---------------------------------------------------------------- loader: workers and resume


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl_images")
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    (root / "bad.png").write_bytes(b"broken")
    return root


def _loader(root, *, start_iteration=0, num_workers=0, rank=0, world_size=1):
    return make_ssl_data_loader(
        f"ImageFolder:root={root}",
        transform=DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, global_crops_size=16, local_crops_size=8),
        collate=SSLCollate(seed=5, global_crops_size=16, patch_size=4),
        seed=5,
        batch_size_per_rank=3,
        num_workers=num_workers,
        start_iteration=start_iteration,
        pin_memory=False,
        rank=rank,
        world_size=world_size,
    )


def _batches(loader, n):
    return list(itertools.islice(iter(loader), n))


def _assert_same(a: SSLBatch, b: SSLBatch):
    for name in ("global_crops", "local_crops", "masks", "masks_weight"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert (a.n_samples, a.n_bad, a.upperbound) == (b.n_samples, b.n_bad, b.upperbound)


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_same_batches_with_and_without_workers_and_after_resume(image_folder):
    # 8 images (one unreadable), batches of 3: 6 batches span more than two passes.
    reference = _batches(_loader(image_folder), 6)
    assert all(isinstance(b, SSLBatch) for b in reference)
    # 18 samples = passes 0 and 1 (the bad image once in each) + 2 samples of pass 2 (good ones, for this seed)
    assert sum(b.n_bad for b in reference) == 2
    assert sum(b.n_samples for b in reference) == 16
    with_workers = _batches(_loader(image_folder, num_workers=2), 6)
    for a, b in zip(reference, with_workers):
        _assert_same(a, b)
    resumed = _batches(_loader(image_folder, start_iteration=4), 2)
    for a, b in zip(reference[4:], resumed):
        _assert_same(a, b)


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_two_ranks_split_each_global_batch(image_folder):
    # world 2 x 3 per rank == the first two single-rank batches of size 3, in rank order.
    single = _batches(_loader(image_folder), 2)
    rank0 = _batches(_loader(image_folder, rank=0, world_size=2), 1)[0]
    rank1 = _batches(_loader(image_folder, rank=1, world_size=2), 1)[0]
    _assert_same(single[0], rank0)
    _assert_same(single[1], rank1)


def test_more_workers_than_cores_are_lowered_with_one_line(monkeypatch, capsys):
    """The official presets ask for 10 workers; on a machine with fewer cores the loader makes one per core
    (the batches do not depend on it: test above) and says so, instead of torch's two-line warning."""
    import os

    from dinokit.devices import default_workers, usable_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    key = "train.num_workers"
    assert usable_workers(2, key=key) == 2 and usable_workers(0, key=key) == 0 and capsys.readouterr().out == ""
    assert usable_workers(10, key=key) == 2
    assert capsys.readouterr().out == ("note: train.num_workers=10 is more than the 2 CPU core(s) this process may "
                                       "use: 2 data-loading worker(s)\n")
    # the defaults of embed, eval and dense count the same cores (the affinity mask, not the machine's count)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert default_workers() == 2
