"""Curated set vs a random subset of the same size, both pretrained with the demo recipe.

Seed 0 of ``benchmarks/curation_proof.py`` with its default pool and curation settings, loaded from that file by
path so the benchmark and the test share one implementation: a pool of 382 sample textures, 89% of it one class
(checker: 40 distinct images, 10 of them with 30 edited copies each: resize, JPEG, crop, flip, colour shift,
text) beside 6 distinct images of each of the 7 other classes, so that a random subset of 64 holds only 6-11
images of the other seven classes. ``dinokit curate run`` picks 64 images; a random subset of 64 is the
baseline. The benchmark embeds with the demo recipe trained in full (800 iterations, ~10 min on one core); here
the ``demo_teacher`` fixture (the same recipe at 200 iterations, already trained for other tests) stands in, so
the composition thresholds below are the ones measured with it. The default run checks what the curated set
holds and that its manifest trains; the slow test pretrains both sets as the benchmark does (two 80-iteration
trainings each) and asserts that the curated one gives the better k-NN top-1, by a margin that held on every
seed of the benchmark (README, "Data curation").
"""

from __future__ import annotations

import statistics

import pytest

from dinokit.cli import main
from dinokit.config import load_config

SEED = 0


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("curation_proof")  # its functions, without running its main


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
    assert (row["pool"], row["pool_dominant"]) == (382, 340)  # 89% of the pool is the dominant class
    curated, rand = row["curated_set"], row["random_set"]
    assert sum(curated["per_class"].values()) == sum(rand["per_class"].values()) == args.size == 64
    # measured with this 200-iteration embedder over seeds 0-7: dominant class 37-46 (curated) vs 53-58 (random),
    # distinct originals 35-45 vs 19-26 (seed 0: 37 vs 53, 43 vs 24); the benchmark's 800-iteration embedder,
    # seeds 0-7: 31-40 vs 53-58 and 40-51 vs 19-26. The margins held on every seed with either embedder
    assert curated["dominant"] < rand["dominant"] - 8 and curated["distinct"] > rand["distinct"] + 8, (curated, rand)
    # the manifest is a dataset string that dinokit train reads (a few steps; the slow test trains for real)
    manifest = root / f"seed{SEED}" / "curate" / "manifest.txt"
    # a file of a few keys over the demo preset (--config-file twice), then overrides
    short = tmp_path / "short.yaml"
    short.write_text("train:\n  OFFICIAL_EPOCH_LENGTH: 2\n  num_workers: 0\noptim:\n  epochs: 1\n  warmup_epochs: 0\n"
                     "teacher:\n  warmup_teacher_temp_epochs: 0\nevaluation:\n  knn_dataset: null\n")
    argv = ["train", "--config-file", "demo", "--config-file", str(short), "--output-dir", str(tmp_path / "run"),
            "--device", "cpu", f"train.dataset_path=FileList:path={manifest}"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_0000002.pth").is_file()
    written = load_config(tmp_path / "run" / "config.yaml")
    assert (written.student.arch, written.train.OFFICIAL_EPOCH_LENGTH) == ("vit_pico", 2)  # the preset + the file


@pytest.mark.slow
def test_curated_set_pretrains_a_better_backbone_than_a_random_subset_of_the_same_size(sets, bench):
    root, args, row = sets
    eval_root = bench.balanced_eval_set(root / "balanced", args)
    assert args.repeats == 2
    runs = {name: [bench.train_knn(row[f"{name}_paths"], eval_root, root / f"train-{name}-r{r}", args.iterations,
                                   SEED + 1000 * r) for r in range(args.repeats)]
            for name in ("curated", "random")}
    knn = {name: statistics.mean(values) for name, values in runs.items()}
    print(f"k-NN top-1 (mean of {args.repeats} trainings): curated {knn['curated']:.2f}% {runs['curated']}, "
          f"random subset {knn['random']:.2f}% {runs['random']}")
    # measured (README): curated ahead on every one of eight seeds with either embedder, by 2.4-14.9 points
    # (800-iteration embedder) and 2.4-11.9 (this one); this seed: 48.65% (45.62 / 51.67) vs 46.25% (47.29 /
    # 45.21), +2.40, the smallest of both series. The margin of 1 point stays below it; one training alone is
    # noisier (one set's two runs differ by up to 11 points), hence the mean of two as in the benchmark
    assert knn["curated"] > knn["random"] + 1.0, runs
