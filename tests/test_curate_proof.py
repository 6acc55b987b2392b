"""Curated set vs a random subset of the same size, both pretrained with the demo recipe (see the caveat below).

Seed 0 of ``benchmarks/curation_proof.py`` with its default pool and curation settings, loaded from that file by
path so the benchmark and the test share one implementation: a pool of 424 sample textures, 80% of it one class
(checker: 40 distinct images, 10 of them with 30 edited copies each: resize, JPEG, crop, flip, colour shift,
text) beside 12 distinct images of each of the 7 other classes. ``dinokit curate run`` picks 64 images; a random
subset of 64 is the baseline. The benchmark embeds with the demo recipe trained in full (800 iterations, ~10 min
on one core); here the ``demo_teacher`` fixture (the same recipe at 200 iterations, already trained for other
tests) stands in, so the composition thresholds below are the ones measured with it. The README ("Data
curation") has the benchmark's k-NN numbers over eight seeds: curation wins on average but not on every seed at
this scale, so the default run checks what held on every seed (what the curated set holds, and that its
manifest trains) and the slow test runs the two 80-iteration trainings.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

from dinokit.cli import main

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "curation_proof.py"
SEED = 0


@pytest.fixture(scope="module")
def bench():
    return SimpleNamespace(**runpy.run_path(str(BENCHMARK)))  # its functions, without running its main


@pytest.fixture(scope="module")
def sets(bench, demo_teacher, tmp_path_factory):
    """The benchmark's seed-0 pool, curated set and random subset; the benchmark's settings, embedded by the
    200-iteration ``demo_teacher`` instead of the benchmark's 800-iteration run of the same recipe."""
    assert (bench.EMBEDDER_ITERATIONS, demo_teacher.iterations) == (800, 200)
    args = bench.parse_args(["--seeds", str(SEED)])
    root = tmp_path_factory.mktemp("curate-proof")
    return root, args, bench.build_sets(root / f"seed{SEED}", SEED, args, (demo_teacher.config_file, demo_teacher.snapshot))


def test_curated_set_is_less_dominated_and_more_diverse_and_its_manifest_trains(sets, tmp_path):
    root, args, row = sets
    assert (row["pool"], row["pool_dominant"]) == (424, 340)  # 80% of the pool is the dominant class
    curated, rand = row["curated_set"], row["random_set"]
    assert sum(curated["per_class"].values()) == sum(rand["per_class"].values()) == args.size == 64
    # measured with this 200-iteration embedder over seeds 0-4: dominant class 27-35 (curated) vs 48-55 (random),
    # distinct originals 45-54 vs 21-31 (seed 0: 35 vs 48, 45 vs 31); the benchmark's 800-iteration embedder,
    # seeds 0-7: 21-25 vs 48-56 and 51-56 vs 21-31. The margins leave room for a demo_teacher trained with other threads
    assert curated["dominant"] < rand["dominant"] - 8 and curated["distinct"] > rand["distinct"] + 8, (curated, rand)
    # the manifest is a dataset string that dinokit train reads (a few steps; the slow test trains for real)
    manifest = root / f"seed{SEED}" / "curate" / "manifest.txt"
    argv = ["train", "--config-file", "demo", "--output-dir", str(tmp_path / "run"), "--device", "cpu",
            f"train.dataset_path=FileList:path={manifest}", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=1",
            "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0", "train.num_workers=0",
            "evaluation.knn_dataset=null"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_0000002.pth").is_file()


@pytest.mark.slow
def test_curated_and_random_subsets_of_the_same_size_both_train(sets, bench):
    root, args, row = sets
    eval_root = bench.balanced_eval_set(root / "balanced", args)
    knn = {name: bench.train_knn(row[f"{name}_paths"], eval_root, root / f"train-{name}", args.iterations, SEED)
           for name in ("curated", "random")}
    # Which one wins is NOT settled at this scale (README: curated ahead on average over eight seeds, behind on
    # some, with either embedder and with two training seeds per set). Asserting "curated > random" at a seed
    # where it held would be a cherry-picked result, so this test pins what held on every run: both 80-iteration
    # runs learn (chance: 12.5%; measured 42-61% over 42 runs).
    print(f"k-NN top-1: curated {knn['curated']}%, random subset {knn['random']}%")
    assert knn["curated"] >= 35 and knn["random"] >= 35, knn
