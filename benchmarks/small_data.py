"""Does a small-data preset learn on images it was not tuned on? k-NN on several labelled sets.

For each image set (none of them dinokit's built-in sample set) this script reports the weighted k-NN
top-1 (k=20, T=0.07, the official protocol of ``dinokit eval knn``) of the validation split against the
training split, at the preset's evaluation resolution (its ``crops.global_crops_size``), for:

- raw pixels: the eval-transformed image (resize, centre crop, normalise), flattened;
- the preset's backbone at random initialisation (seed 0, as ``dinokit eval knn`` without weights);
- the teacher after ``dinokit train`` on the training split's images (labels unused), with each preset.

The sets (shapes, patterns, families: generated; clipart, tuxpaint: real images from Debian packages) are
written under ``--root`` by ``benchmarks/image_sets.py``, which describes them. Usage (one training at a time;
OMP_NUM_THREADS=1 leaves a core free)::

    OMP_NUM_THREADS=1 python benchmarks/small_data.py --sets shapes patterns families clipart tuxpaint \\
        --presets demo small --root runs/small_data

``--opts KEY=VALUE ...`` overrides preset keys (ablations; the tag ``--tag`` names the variant in the
results). Results are appended to ``ROOT/results.jsonl`` and printed as a table. This file is not part
of the package; ``tests/test_small_recipe.py`` loads it by path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_sets import ALL_SETS, prepare_set  # noqa: E402  (the sets: benchmarks/image_sets.py)

KNN_K = 20


# ---------------------------------------------------------------------------------------------- measurements
def raw_pixel_knn(folder: Path, image_size: int) -> float:
    """k-NN top-1 on flattened eval-transformed pixels (``dinokit eval knn --raw-pixels``)."""
    from dinokit.eval import RawPixels, run_knn_eval

    metrics = run_knn_eval(RawPixels(), train_dataset_str=f"ImageFolder:root={folder}/train",
                           val_dataset_str=f"ImageFolder:root={folder}/val", image_size=image_size, ks=[KNN_K])
    return float(metrics[f"knn_top1_k{KNN_K}"])


def network_knn(folder: Path, cfg, weights: Path | None, image_size: int = 0) -> float:
    """k-NN top-1 of the preset's backbone: random initialisation (seed 0) or ``weights``, on images of
    ``image_size`` (0: the preset's global crop size; the position embeddings are interpolated to other sizes)."""
    import torch

    from dinokit.config import backbone_from_config, backbone_img_size
    from dinokit.eval.knn import run_knn_eval
    from dinokit.models import load_backbone_weights

    torch.manual_seed(0)
    backbone = backbone_from_config(cfg.student, img_size=backbone_img_size(cfg.crops))
    if weights is not None:
        load_backbone_weights(backbone, weights)
    metrics = run_knn_eval(backbone.eval(), train_dataset_str=f"ImageFolder:root={folder}/train",
                           val_dataset_str=f"ImageFolder:root={folder}/val",
                           image_size=image_size or backbone_img_size(cfg.crops), ks=[KNN_K])
    return float(metrics[f"knn_top1_k{KNN_K}"])


def supervised_knn(folder: Path, cfg, steps: int, seed: int = 0, sizes: tuple[int, ...] = (0,)) -> dict[int, float]:
    """The control WITH labels: the preset's backbone (random init, seed ``seed``) and a linear classifier on its
    class token, trained by cross-entropy on the train split (AdamW lr 1e-3, weight decay 0.05, batch 32,
    ``steps`` steps, random resized crops of [0.5, 1], flips, the official colour jitter); then the same k-NN
    as :func:`network_knn` on the class token, at each of ``sizes`` (0: the crop size): {size: top-1}. It bounds
    what the network reaches in that budget."""
    import torch
    from torch import nn
    from torchvision import datasets
    from torchvision.transforms import v2

    from dinokit.config import backbone_from_config, backbone_img_size
    from dinokit.data.transforms import make_normalize_transform
    from dinokit.eval.knn import run_knn_eval

    torch.manual_seed(seed)
    size = backbone_img_size(cfg.crops)
    backbone = backbone_from_config(cfg.student, img_size=size)
    augment = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
                          v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.2, 0.1),
                          v2.ToDtype(torch.float32, scale=True), make_normalize_transform()])
    data = datasets.ImageFolder(folder / "train", transform=augment)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, num_workers=1, drop_last=True)
    classifier = nn.Linear(backbone.embed_dim, len(data.classes))
    optimizer = torch.optim.AdamW([*backbone.parameters(), *classifier.parameters()], lr=1e-3, weight_decay=0.05)
    step = 0
    while step < steps:
        for images, labels in loader:
            loss = nn.functional.cross_entropy(classifier(backbone(images)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    backbone.eval()
    return {at: float(run_knn_eval(backbone, train_dataset_str=f"ImageFolder:root={folder}/train",
                                   val_dataset_str=f"ImageFolder:root={folder}/val", image_size=at or size,
                                   ks=[KNN_K])[f"knn_top1_k{KNN_K}"]) for at in sizes}


def train_preset(folder: Path, preset: str, out: Path, iterations: int | None, opts: list[str], eval_every: int = 0):
    """``dinokit train`` of ``preset`` on ``folder/train``, with the k-NN monitor on the set every ``eval_every``
    iterations (0: none); returns (cfg, last teacher snapshot, seconds, iterations, {iteration: k-NN top-1})."""
    from dinokit.cli.train import pretrain
    from dinokit.config import load_config

    monitor = ([f"evaluation.knn_dataset.train=ImageFolder:root={folder}/train",
                f"evaluation.knn_dataset.val=ImageFolder:root={folder}/val", f"evaluation.knn_k=[{KNN_K}]"]
               if eval_every else ["evaluation.knn_dataset=null"])
    overrides = [f"train.dataset_path=ImageFolder:root={folder}/train", *monitor, "train.num_workers=1"]
    cfg = load_config(preset, overrides + list(opts))
    if iterations is not None:  # keep the preset's epoch length; the last epoch may be partial
        epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
        cfg = load_config(preset, overrides + list(opts) + [f"optim.epochs={math.ceil(iterations / epoch)}"])
    total = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    cfg = load_config(preset, overrides + list(opts) + [f"optim.epochs={cfg.optim.epochs}",
                                                       f"evaluation.eval_period_iterations={eval_every or total}"])
    started = time.perf_counter()
    summary = pretrain(cfg, output_dir=out, resume=False, device="cpu")
    seconds = time.perf_counter() - started
    snapshots = summary.get("snapshots") or sorted((out / "eval").glob("training_*/teacher_checkpoint.pth"))
    curve = {}
    for line in (out / "training_metrics.json").read_text().splitlines():
        record = json.loads(line)
        if f"knn_top1_k{KNN_K}" in record:
            curve[record["iteration"] + 1] = record[f"knn_top1_k{KNN_K}"]
    return cfg, Path(snapshots[-1]), seconds, total, curve


def finished_run(out: Path):
    """What :func:`train_preset` returns, read from a finished run folder (None if it is not one)."""
    from dinokit.config import load_config

    snapshots = sorted((out / "eval").glob("training_*/teacher_checkpoint.pth"),
                       key=lambda p: int(p.parent.name.split("_")[1]))
    if not (out / "config.yaml").is_file() or not snapshots:
        return None
    cfg = load_config(str(out / "config.yaml"))
    total = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    if int(snapshots[-1].parent.name.split("_")[1]) + 1 != total:
        return None
    return cfg, snapshots[-1], 0.0, total, {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(ALL_SETS), choices=ALL_SETS)
    parser.add_argument("--presets", nargs="+", default=["demo", "small"],
                        help="training presets to compare (the first also gives the baselines' network)")
    parser.add_argument("--no-training", action="store_true", help="only the baselines and controls")
    parser.add_argument("--root", type=Path, default=Path("runs/small_data"), help="data, runs and results")
    parser.add_argument("--iterations", type=int, default=None, help="override the presets' length")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of every preset")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also log the teacher's k-NN on the set every N iterations (learning curves) [0: no]")
    parser.add_argument("--tag", default="", help="name of this variant in the results (for ablations)")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure raw pixels and random init [yes]")
    parser.add_argument("--eval-size", type=int, nargs="+", default=[0],
                        help="k-NN image sizes (0: the preset's global crop size; others add columns NAME@SIZE) [0]")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="a run folder that holds a finished run is evaluated, not trained again")
    parser.add_argument("--supervised-steps", type=int, default=0,
                        help="also train the first preset's network WITH the labels for N steps (the supervised "
                             "control; README: 1000) [0: no]")
    args = parser.parse_args(argv)

    from dinokit.config import backbone_img_size, load_config

    args.root.mkdir(parents=True, exist_ok=True)
    results_file = args.root / "results.jsonl"
    first = load_config(args.presets[0], list(args.opts))  # the network of the baselines and the control
    rows = []
    for name in args.sets:
        folder = prepare_set(name, args.root / "data")
        n_train = sum(1 for _ in (folder / "train").rglob("*.png"))
        n_val = sum(1 for _ in (folder / "val").rglob("*.png"))
        n_classes = sum(1 for d in (folder / "train").iterdir() if d.is_dir())
        row = {"set": name, "train": n_train, "val": n_val, "classes": n_classes, "k": KNN_K}
        sized = lambda key, size: key if size == 0 else f"{key}@{size}"  # noqa: E731
        if args.baselines:
            for size in args.eval_size:
                row[sized("raw_pixels", size)] = raw_pixel_knn(folder, size or backbone_img_size(first.crops))
                row[sized("random_init", size)] = network_knn(folder, first, None, size)
        if args.supervised_steps:
            control = supervised_knn(folder, first, args.supervised_steps, sizes=tuple(args.eval_size))
            row.update({sized(f"supervised_{args.supervised_steps}", size): v for size, v in control.items()})
        for preset in ([] if args.no_training else args.presets):
            label = f"{preset}{'+' + args.tag if args.tag else ''}"
            out = args.root / "runs" / f"{name}-{label}"
            finished = finished_run(out) if args.reuse_runs else None
            cfg, snapshot, seconds, total, curve = finished or train_preset(folder, preset, out, args.iterations,
                                                                            args.opts, args.eval_every)
            for size in args.eval_size:
                row[sized(label, size)] = network_knn(folder, cfg, snapshot, size)
            row[f"{label}_iterations"] = total
            if finished is None:
                row[f"{label}_seconds"] = round(seconds)
            if curve:
                row[f"{label}_curve"] = curve
        row["opts"] = list(args.opts)
        rows.append(row)
        with open(results_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if k not in ("set", "train", "val", "classes", "k", "opts")
            and not k.endswith(("_iterations", "_seconds", "_curve"))]
    print(f"\nk-NN top-1 (k={KNN_K}) on the val split, %")
    print("| set | train / val images | classes | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['set']} | {r['train']} / {r['val']} | {r['classes']} | "
              + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
