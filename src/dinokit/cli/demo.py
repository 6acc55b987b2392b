"""``dinokit demo``: pretrain on the built-in sample set, then compare k-NN accuracy with random init and raw pixels."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import add_overrides


def register(sub: argparse._SubParsersAction) -> None:
    what = "pretrain a tiny ViT on the built-in sample images and show the k-NN gain over random init"
    p = sub.add_parser(
        "demo", help=what,
        description=f"{what[0].upper()}{what[1:]} and raw pixels: the demo preset (800 iterations, a few minutes "
                    "on 2 CPU cores), then k-NN top-1 at k=10 and 20 on the sample set's val split. A rerun resumes "
                    "the run.",
    )
    p.add_argument("--output-dir", default="runs/demo", help="folder of the sample images, the run and the k-NN "
                   "results [runs/demo]")
    p.add_argument("--no-resume", action="store_true",
                   help="start a new run (refused where --output-dir already holds one: give a new --output-dir)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    add_overrides(p, "opts", "overrides of the demo preset, e.g. optim.epochs=2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import backbone_from_config, backbone_img_size, load_config
    from ..data import write_sample_dataset
    from ..data.sample import SAMPLE_VERSION, check_sample_root
    from ..devices import resolve_device
    from ..engine.run_dir import check_writable
    from ..eval import RawPixels, run_knn_eval
    from ..models import load_backbone_weights
    from ..models.weight_files import newest_snapshot
    from ..train.train import check_stage_weights
    from .train import pretrain

    out = Path(args.output_dir)
    root = out / "sample"
    train_str, val_str = f"Sample:split=TRAIN:root={root}", f"Sample:split=VAL:root={root}"
    overrides = [f"train.dataset_path={train_str}", f"evaluation.knn_dataset.train={train_str}",
                 f"evaluation.knn_dataset.val={val_str}", *args.opts]
    # Every check that needs no computation comes before the 800 sample images are written: the output
    # folder, the overrides (an unknown key, a bad value, missing weights) and the device each stop with one line.
    check_writable(out)
    cfg = load_config("demo", overrides)
    device = resolve_device(args.device)
    check_stage_weights(cfg)  # a student.pretrained_weights override that is not there
    check_sample_root(root, option="the sample folder of --output-dir")
    root = write_sample_dataset(root)
    n_iter = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    # measured: about 0.3 s per iteration of the preset on 2 CPU cores (800 iterations in 4 minutes)
    minutes = "" if device.type != "cpu" else f"; about {max(1, round(n_iter * 0.3 / 60))} minute(s) on 2 CPU cores"
    print(f"dinokit demo: pretraining {cfg.student.arch} (patch {cfg.student.patch_size}) for {n_iter} iterations "
          f"on the built-in sample set ({root}){minutes}")
    # One training folder per sample-set version: a finished run on an older set is never resumed as if
    # it had seen this one (and is kept, not overwritten).
    train_dir = out / f"train-v{SAMPLE_VERSION}"
    t0 = time.time()
    summary = pretrain(cfg, output_dir=train_dir, resume=not args.no_resume, device=args.device)
    train_minutes = (time.time() - t0) / 60

    image_size = backbone_img_size(cfg.crops)
    results = {}
    torch.manual_seed(0)
    random_backbone = backbone_from_config(cfg.student, img_size=image_size)
    snapshot = newest_snapshot(train_dir)
    trained_backbone = backbone_from_config(cfg.student, img_size=image_size)
    load_backbone_weights(trained_backbone, snapshot)
    for name, backbone in (("raw pixels", RawPixels()), ("random init", random_backbone),
                           ("pretrained", trained_backbone)):
        backbone.to(device).eval()
        results[name] = run_knn_eval(
            backbone, train_dataset_str=train_str, val_dataset_str=val_str, output_dir=out / "knn" / name.replace(" ", "_"),
            device=device, image_size=image_size, ks=(10, 20), progress=False,
        )
    print()
    when = (f"of the finished run in {train_dir}" if "metrics" not in summary  # nothing left to train
            else f"after {train_minutes:.1f} min of training")
    print(f"k-NN accuracy on the sample set's val split (8 classes, chance 12.5%), {when}:")
    keys = sorted(results["pretrained"])
    print(f"  {'backbone':<14}" + "".join(f"{k:>16}" for k in keys))
    for name, metrics in results.items():
        print(f"  {name:<14}" + "".join(f"{metrics[k]:>15.1f}%" for k in keys))
    print(f"\nteacher snapshot: {snapshot}\nmetrics log: {train_dir / 'training_metrics.json'}")
    return 0
