"""Curated set vs a random subset of the same size, both pretrained with the demo recipe (see the caveat below).

The pool is what web data looks like to the pipeline: one texture class dominant, and that class made
mostly of near-copies (10 images with 30 edited copies each: resize, JPEG, crop, flip, colour shift, text),
beside 20 distinct images of each other class (450 images). ``dinokit curate run`` (embedded by the
``demo_teacher`` backbone) picks 96 images; a random subset of 96 is the baseline. Both train the demo
recipe for the same 120 iterations (batch 32; teacher momentum 0.95), and the teacher's k-NN top-1 on a
balanced validation split (8 classes x 10, with a balanced memory of 8 x 20) is compared.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dinokit.cli import main
from dinokit.curate.synthetic import write_pool
from dinokit.data import write_sample_dataset

SIZE = 96
ITERATIONS = 120  # 4 epochs of 30


def _train_knn(manifest: Path, eval_root: Path, out: Path) -> float:
    argv = ["train", "--config-file", "demo", "--output-dir", str(out), "--device", "cpu",
            f"train.dataset_path=FileList:path={manifest}", f"train.OFFICIAL_EPOCH_LENGTH={ITERATIONS // 4}", "optim.epochs=4",
            "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1", "train.num_workers=1", "train.seed=0",
            # a faster teacher than the demo's 0.99: with 0.99 the teacher still lags far behind after 120 steps
            "teacher.momentum_teacher=0.95",
            f"evaluation.knn_dataset.train=ImageFolder:root={eval_root / 'train'}",
            f"evaluation.knn_dataset.val=ImageFolder:root={eval_root / 'val'}",
            f"evaluation.eval_period_iterations={ITERATIONS}", "evaluation.knn_k=[10]"]
    assert main(argv) == 0
    logged = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    return [line["knn_top1_k10"] for line in logged if "knn_top1_k10" in line][-1]


def _describe(paths: list[str]) -> tuple[int, int]:
    """(images of the dominant class, distinct originals) of a list of pool paths."""
    names = [Path(p).name for p in paths]
    distinct = {re.sub(r"_copy.*", "", n.split(".")[0]) for n in names}
    return Counter(n.split("_")[0] for n in names)["checker"], len(distinct)


@pytest.fixture(scope="module")
def curated(demo_teacher, tmp_path_factory):
    """The pool curated to SIZE images, a random subset of the same size, and a balanced evaluation set."""
    tmp_path = tmp_path_factory.mktemp("curate-proof")
    pool = write_pool(tmp_path / "pool", dominant="checker", n_dominant=10, n_other=20, n_copied=10, copies=30)
    eval_root = write_sample_dataset(tmp_path / "balanced", counts={"train": 20, "val": 10}, seed=7)
    work = tmp_path / "work"
    assert main(["curate", "run", "--pool", str(pool.root), "--output-dir", str(work), "--target-size", str(SIZE),
                 "--config-file", str(demo_teacher.config_file), "--weights", str(demo_teacher.snapshot),
                 "--device", "cpu", "--no-progress", "embed.image_size=64", "embed.num_workers=0",
                 # a texture's copies and its distinct siblings look alike to this small backbone: only
                 # near-identical pairs count as copies here (the default 0.85 is calibrated on scenes)
                 "dedup.threshold=0.98"]) == 0
    rng = np.random.default_rng(0)
    random_subset = sorted(rng.choice(sorted(str(p.resolve()) for p in pool.paths), size=SIZE, replace=False))
    (tmp_path / "random.txt").write_text("".join(f"{p}\n" for p in random_subset))
    return tmp_path, work / "manifest.txt", tmp_path / "random.txt", eval_root


def test_curated_set_is_less_dominated_and_its_manifest_trains(curated, tmp_path):
    root, manifest, random_list, _ = curated
    curated_paths, random_subset = manifest.read_text().splitlines(), random_list.read_text().splitlines()
    # what curation changed: fewer copies of the dominant class, more distinct images
    (cur_dominant, cur_distinct), (rnd_dominant, rnd_distinct) = _describe(curated_paths), _describe(random_subset)
    assert len(curated_paths) == SIZE and cur_dominant < rnd_dominant - 15 and cur_distinct > rnd_distinct + 15, (
        cur_dominant, rnd_dominant, cur_distinct, rnd_distinct)
    # the manifest is a dataset string that dinokit train reads (a few steps; the slow test trains for real)
    argv = ["train", "--config-file", "demo", "--output-dir", str(tmp_path / "run"), "--device", "cpu",
            f"train.dataset_path=FileList:path={manifest}", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=1",
            "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0", "train.num_workers=0",
            "evaluation.knn_dataset=null"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_0000002.pth").is_file()


@pytest.mark.slow
def test_curated_and_random_subsets_of_the_same_size_both_train(curated):
    root, manifest, random_list, eval_root = curated
    knn_curated = _train_knn(manifest, eval_root, root / "train-curated")
    knn_random = _train_knn(random_list, eval_root, root / "train-random")
    # Both sets train (random init: 15.0%). Which one wins is NOT settled: measured 47.5% (curated) vs 42.5%
    # (random) with seed 0, but 43.75% vs 51.25% with seed 1 (README). Asserting "curated > random" at the one
    # seed where it held would be a cherry-picked result, so this test pins only what held on every run:
    # the manifest trains, the curated set is more diverse and less dominated, and both runs learn.
    print(f"k-NN top-1: curated {knn_curated}%, random subset {knn_random}%")
    assert knn_curated >= 30 and knn_random >= 30, (knn_curated, knn_random)
