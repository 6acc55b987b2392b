"""Does curation pay? The demo recipe pretrained on a curated set vs on a random subset of the same size.

The pool looks like web data to the pipeline: one texture class dominant and made mostly of near-copies
(``--n-dominant`` distinct images of it, ``--n-copied`` of which have ``--copies`` edited copies each: resize,
JPEG, crop, flip, colour shift, text) beside ``--n-other`` distinct images of each of the 7 other classes
(:func:`dinokit.curate.synthetic.write_pool`; the pool seed changes every image). The defaults give 382 images, 89%
of them checker, so that a random subset of 64 holds only 6-11 images of the 7 other classes (a milder pool, 12
per other class, left curation behind on one seed of eight: README). ``dinokit curate run`` picks
``--size`` images, embedded by a backbone trained on other, balanced images (as DINOv2 curated with a model
pretrained on curated data): the full demo recipe (800 iterations) on a 40-per-class sample set; the tests'
``demo_teacher`` is the same recipe at 200 iterations. A random subset of the pool of the same size is the
baseline. Both train the demo recipe for the same ``--iterations``, ``--repeats`` times each (training seeds
seed, seed + 1000, ...), and the mean of the last teachers' k-NN top-1 (k = 10, ``dinokit eval knn``) on a
balanced validation split (``--val`` per class, memory ``--memory`` per class, images the pool never saw) is
compared. One line per seed, then the mean and the smallest difference (README, "Data curation").

    OMP_NUM_THREADS=1 python benchmarks/curation_proof.py --seeds 0 1 2 3 4 5 6 7 --out runs/curation_proof

``--embedder RUN_DIR`` reuses a trained embedder (a run folder with config.yaml and eval/training_*/), else one is
trained for ``--embedder-iterations``; ``--repeats N`` trains each set N times (training seeds seed, seed + 1000,
...) and compares the means; ``--dedup-threshold`` and ``--curate-extra`` set ``curate run``. The pools, curated
sets and trainings of finished seeds are reused when the same ``--out`` is given again.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np

from dinokit.cli import main as dinokit
from dinokit.curate.synthetic import write_pool
from dinokit.data import write_sample_dataset

EMBEDDER_ITERATIONS = 800  # the demo recipe in full (80% k-NN on its sample split)


def train_embedder(out: Path, iterations: int = EMBEDDER_ITERATIONS) -> tuple[Path, Path]:
    """The demo recipe for ``iterations`` (a multiple of 50) on a balanced 40-per-class sample set: 200 is the
    tests' ``demo_teacher``, 800 the full demo recipe. (config.yaml, teacher weights)."""
    assert iterations % 50 == 0, iterations
    epochs = iterations // 50
    warmup = max(1, epochs // 8)  # 200 iterations: 4 epochs, 1 of warm-up (demo_teacher); 800: the demo's 16 and 2
    root = write_sample_dataset(out / "sample", counts={"train": 40, "val": 10})
    train, val = f"ImageFolder:root={root / 'train'}", f"ImageFolder:root={root / 'val'}"
    run = out / "run"
    weights = run / "eval" / f"training_{iterations - 1}" / "teacher_checkpoint.pth"
    if not weights.is_file():
        assert dinokit(["train", "--config-file", "demo", "--output-dir", str(run), "--device", "cpu",
                        f"train.dataset_path={train}", "train.num_workers=1", f"optim.epochs={epochs}",
                        f"optim.warmup_epochs={warmup}", f"teacher.warmup_teacher_temp_epochs={warmup}",
                        f"evaluation.knn_dataset.train={train}", f"evaluation.knn_dataset.val={val}",
                        f"evaluation.eval_period_iterations={iterations}", "evaluation.knn_k=[10]"]) == 0
    return run / "config.yaml", weights


def embedder_of(run: Path) -> tuple[Path, Path]:
    """(config.yaml, last teacher snapshot) of a training run folder."""
    snapshots = sorted(run.glob("eval/training_*/teacher_checkpoint.pth"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not snapshots:
        raise SystemExit(f"no eval/training_*/teacher_checkpoint.pth under {run}")
    return run / "config.yaml", snapshots[-1]


def curate(pool_root: Path, work: Path, size: int, embedder: tuple[Path, Path], threshold: float = 0.98,
           overrides: tuple[str, ...] = ()) -> list[str]:
    """``dinokit curate run`` of the pool to ``size`` images: the manifest's paths."""
    config, weights = embedder
    assert dinokit(["curate", "run", "--pool", str(pool_root), "--output-dir", str(work), "--target-size", str(size),
                    "--config-file", str(config), "--weights", str(weights), "--device", "cpu", "--no-progress",
                    "embed.image_size=64", "embed.num_workers=0",
                    # a texture's copies and its distinct siblings look alike to this small backbone: only
                    # near-identical pairs count as copies here (the default 0.85 is calibrated on scenes)
                    f"dedup.threshold={threshold}", *overrides]) == 0
    return (work / "manifest.txt").read_text().splitlines()


def random_subset(paths: list[Path], size: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(sorted(str(p.resolve()) for p in paths), size=size, replace=False))


def describe(paths: list[str], dominant: str) -> dict:
    """Images of the dominant class, distinct originals, and the per-class counts of a list of pool paths."""
    names = [Path(p).name for p in paths]
    per_class = Counter(n.split("_")[0] for n in names)
    return {"dominant": per_class[dominant], "distinct": len({re.sub(r"_copy.*", "", n.split(".")[0]) for n in names}),
            "per_class": dict(sorted(per_class.items()))}


def train_knn(paths: list[str], eval_root: Path, out: Path, iterations: int, seed: int,
              extra: tuple[str, ...] = ()) -> float:
    """The demo recipe for ``iterations`` on the images ``paths`` (4 epochs, 1 of warm-up), then the k-NN top-1
    (k = 10) of its last teacher on ``eval_root``'s val split, with its train split as memory."""
    snapshot = out / "eval" / f"training_{iterations - 1}" / "teacher_checkpoint.pth"
    if not snapshot.is_file():
        out.mkdir(parents=True, exist_ok=True)
        manifest = out / "images.txt"
        manifest.write_text("".join(f"{p}\n" for p in paths))
        assert iterations % 4 == 0, iterations
        assert dinokit(["train", "--config-file", "demo", "--output-dir", str(out), "--device", "cpu",
                        f"train.dataset_path=FileList:path={manifest}", f"train.OFFICIAL_EPOCH_LENGTH={iterations // 4}",
                        "optim.epochs=4", "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1",
                        "train.num_workers=1", f"train.seed={seed}",
                        # a faster teacher than the demo's 0.99, which still lags far behind in a run this short
                        "teacher.momentum_teacher=0.95",
                        "evaluation.knn_dataset=null", f"evaluation.eval_period_iterations={iterations}", *extra]) == 0
    results = out / "knn" / "results_eval_knn.json"
    if not results.is_file():
        assert dinokit(["eval", "knn", "--output-dir", str(out / "knn"), "--pretrained-weights", str(snapshot),
                        "--train-dataset", f"ImageFolder:root={eval_root / 'train'}",
                        "--val-dataset", f"ImageFolder:root={eval_root / 'val'}", "--image-size", "64",
                        "--nb-knn", "10", "--device", "cpu", "--num-workers", "0", "--no-progress"]) == 0
    return json.loads(results.read_text().splitlines()[-1])["top1"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/curation_proof"))
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--embedder", type=Path, help="a trained run folder to embed with (default: train one for --embedder-iterations)")
    p.add_argument("--embedder-iterations", type=int, default=EMBEDDER_ITERATIONS,
                   help="demo-recipe iterations of the embedder trained when --embedder is not given")
    p.add_argument("--dominant", default="checker")
    p.add_argument("--n-dominant", type=int, default=40)
    p.add_argument("--n-copied", type=int, default=10)
    p.add_argument("--copies", type=int, default=30)
    p.add_argument("--n-other", type=int, default=6)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=80)
    p.add_argument("--repeats", type=int, default=2, help="trainings per set (training seeds seed, seed+1000, ...): their mean counts")
    p.add_argument("--memory", type=int, default=60, help="k-NN memory images per class")
    p.add_argument("--val", type=int, default=60, help="validation images per class")
    p.add_argument("--dedup-threshold", type=float, default=0.98, help="dedup.threshold of curate run")
    p.add_argument("--curate-extra", nargs="*", default=[], help="more key=value settings for curate run")
    p.add_argument("--extra", nargs="*", default=[], help="more key=value settings for both trainings")
    return p.parse_args(argv)


def balanced_eval_set(root: Path, args: argparse.Namespace) -> Path:
    """The k-NN memory (train) and validation (val) splits: every class alike, images the pools never hold."""
    return write_sample_dataset(root, counts={"train": args.memory, "val": args.val}, seed=7)


def build_sets(out: Path, seed: int, args: argparse.Namespace, embedder: tuple[Path, Path]) -> dict:
    """One pool (seed 100 + ``seed``), its curated set and a random subset (seed ``seed``) of ``args.size``
    images: their paths and what they hold."""
    pool = write_pool(out / "pool", dominant=args.dominant, n_dominant=args.n_dominant, n_other=args.n_other,
                      n_copied=args.n_copied, copies=args.copies, seed=100 + seed)
    curated = curate(pool.root, out / "curate", args.size, embedder, args.dedup_threshold, tuple(args.curate_extra))
    rand = random_subset(pool.paths, args.size, seed)
    return {"seed": seed, "pool": len(pool.paths),
            "pool_dominant": sum(1 for p in pool.paths if p.name.startswith(args.dominant + "_")),
            "curated_paths": curated, "random_paths": rand,
            "curated_set": describe(curated, args.dominant), "random_set": describe(rand, args.dominant)}


def run_seed(out: Path, seed: int, args: argparse.Namespace, embedder: tuple[Path, Path], eval_root: Path) -> dict:
    """:func:`build_sets`, then both sets pretrained ``args.repeats`` times (training seeds ``seed``,
    ``seed`` + 1000, ...): the mean k-NN top-1 of each, and every run's."""
    start = time.perf_counter()
    row = build_sets(out, seed, args, embedder)
    for name in ("curated", "random"):
        paths = row.pop(f"{name}_paths")
        runs = [train_knn(paths, eval_root, out / (f"train-{name}" + (f"-r{r}" if r else "")), args.iterations,
                          seed + 1000 * r, tuple(args.extra)) for r in range(args.repeats)]
        row[name], row[f"{name}_runs"] = statistics.mean(runs), runs
    row["seconds"] = round(time.perf_counter() - start)
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    embedder = (embedder_of(args.embedder) if args.embedder
                else train_embedder(args.out / "embedder", args.embedder_iterations))
    eval_root = balanced_eval_set(args.out / "balanced", args)
    results = []
    for seed in args.seeds:
        row = run_seed(args.out / f"seed{seed}", seed, args, embedder, eval_root)
        results.append(row)
        c, r = row["curated_set"], row["random_set"]
        print(f"seed {seed}: k-NN top-1 curated {row['curated']:.2f}% vs random {row['random']:.2f}% "
              f"(difference {row['curated'] - row['random']:+.2f}); dominant class {c['dominant']} vs {r['dominant']}, "
              f"distinct originals {c['distinct']} vs {r['distinct']} of {args.size}; {row['seconds']} s", flush=True)
    diffs = [r["curated"] - r["random"] for r in results]
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "seeds": results,
               "mean_curated": statistics.mean(r["curated"] for r in results),
               "mean_random": statistics.mean(r["random"] for r in results),
               "mean_difference": statistics.mean(diffs), "min_difference": min(diffs)}
    print(f"mean: curated {summary['mean_curated']:.2f}% vs random {summary['mean_random']:.2f}% "
          f"(difference {summary['mean_difference']:+.2f}, smallest {summary['min_difference']:+.2f})")
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
