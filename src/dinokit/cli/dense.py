"""``dinokit dense train|eval|predict``: segmentation and depth heads on a frozen backbone.

``train`` fits a linear / multi-level / DPT head with the published recipe (any setting can be
overridden as ``key=value``, e.g. ``iterations=500 batch_size=8 crop_size=64``), evaluates it and saves
``OUTPUT_DIR/head.pth`` (official layout) with ``results_eval_{segmentation,depth}.json``. ``eval``
scores a saved or official head; ``predict`` writes input | prediction pictures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..distributed.slurm import add_slurm_options, submit_if_asked
from ..errors import DinokitError
from . import add_overrides, named

DATASETS_HELP = (
    "SegFolder:root=DIR (DIR/images + DIR/masks), DepthFolder:root=DIR (DIR/images + DIR/depth), "
    "ADE20K:root=DIR:split=training|validation, VOC2012:root=DIR:split=train|val, NYU:root=DIR:split=train|test, "
    "or the generated SegSample:split=train|val / DepthSample:split=train|val"
)


def _add_backbone(p: argparse.ArgumentParser, *, required: bool) -> None:
    note = "" if required else " (default: the backbone recorded in the head file)"
    p.add_argument("--config-file", type=named, default=None, help="eval preset or training run config.yaml defining the backbone" + note)
    p.add_argument("--pretrained-weights", "--weights", default=None, metavar="PATH",
                   help="backbone weights; a teacher_checkpoint.pth finds its run's config.yaml by itself")
    p.add_argument("--model", default=None, metavar="NAME", help="hub backbone name, e.g. dinov2_vits14")
    p.add_argument("--random-init", action="store_true", help="with --model: random weights (a baseline)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")


def _add_inference(p: argparse.ArgumentParser) -> None:
    saved = "[as saved with the head]"
    p.add_argument("--mode", choices=("whole", "slide"), default=None, help=f"inference mode {saved}")
    p.add_argument("--crop", type=int, default=None, help=f"slide window size {saved}")
    p.add_argument("--stride", type=int, default=None, help=f"slide stride {saved}")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help=f"add horizontally flipped predictions {saved}")
    p.add_argument("--scales", type=float, nargs="+", default=None, metavar="R",
                   help=f"multi-scale test-time ratios from 0.1 to 4, e.g. 1.0 1.32 1.73 {saved}")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("dense", help="semantic segmentation and depth heads on frozen features",
                            description=__doc__.split("\n\n")[1].replace("``", ""))
    commands = parser.add_subparsers(dest="dense_command", metavar="COMMAND")
    commands.required = True

    train = commands.add_parser("train", help="train a dense head on a frozen backbone")
    train.add_argument("--task", choices=("seg", "depth"), required=True)
    train.add_argument("--head", required=True,
                       help="seg: linear (last block), ms (last 4 blocks + multi-scale flip TTA), linear4; "
                            "depth: linear (last block), linear4 (4 blocks), linear-bn (DINOv3's linear head: "
                            "BatchNorm, last block after the final norm), dpt")
    _add_backbone(train, required=True)
    train.add_argument("--train-dataset", required=True, metavar="STR", help=DATASETS_HELP)
    train.add_argument("--val-dataset", required=True, metavar="STR", help="validation set (same syntax)")
    train.add_argument("--output-dir", required=True)
    train.add_argument("--no-resume", action="store_true", help="start a new run (refused where OUTPUT_DIR already holds checkpoints: they would mix)")
    train.add_argument("--no-progress", action="store_true")
    add_slurm_options(train, timeout_min=720)
    add_overrides(train, "opts",
                  help="recipe overrides: iterations, batch_size, lr, weight_decay, warmup_iters, crop_size, "
                       "base_size, augment, eval_mode, eval_size, eval_crop, eval_stride, num_workers, n_bins, "
                       "bins_strategy, norm_strategy, cycle_beta1, schedule_lag, ...")
    train.set_defaults(func=run_train)

    ev = commands.add_parser("eval", help="evaluate a saved (or official) head")
    ev.add_argument("--head-weights", required=True, metavar="FILE", help="head.pth of 'dense train', or an official head file")
    _add_backbone(ev, required=False)
    ev.add_argument("--val-dataset", required=True, metavar="STR", help=DATASETS_HELP)
    ev.add_argument("--output-dir", required=True)
    ev.add_argument("--eval-size", type=int, default=None, help="short side of the evaluation images (0: keep)")
    ev.add_argument("--no-progress", action="store_true")
    _add_inference(ev)
    ev.set_defaults(func=run_eval)

    pr = commands.add_parser("predict", help="write input | prediction pictures for images")
    pr.add_argument("images", nargs="+", metavar="IMAGES", help="images, folders or .txt lists of paths")
    pr.add_argument("--head", "--head-weights", dest="head_weights", required=True, metavar="FILE",
                    help="head.pth of 'dense train', or an official head file")
    pr.add_argument("--out", required=True, metavar="DIR", help="output folder, or a .png file for one image "
                     "(pictures of the same name are replaced)")
    pr.add_argument("--size", type=int, default=None,
                    help="resize the short side to SIZE before predicting (the long side at most 4x SIZE; 0: keep) "
                         "[the evaluation size saved with the head]")
    _add_backbone(pr, required=False)
    _add_inference(pr)
    pr.set_defaults(func=run_predict)


def _backbone_source(args: argparse.Namespace) -> dict:
    """The backbone options, checked before any work (dense train wrote dense_config.json first)."""
    from ..eval.setup import check_backbone_choice

    check_backbone_choice(config_file=args.config_file, model=args.model, random_init=args.random_init,
                          pretrained_weights=args.pretrained_weights)
    return {"config_file": args.config_file, "pretrained_weights": args.pretrained_weights, "model": args.model,
            "random_init": args.random_init}


def _inference(args: argparse.Namespace) -> dict:
    """The inference settings given on the command line: each changes that of the inference saved with the head
    (one given reset the others to the defaults, and predict never read the saved one)."""
    # checked before any work: a zero or negative value would fail deep inside torch
    for flag, value in (("--crop", args.crop), ("--stride", args.stride)):
        if value is not None and value < 1:
            raise DinokitError(f"{flag} must be at least 1 pixel, got {value}")
    bad = [r for r in args.scales or () if not 0.1 <= r <= 4]  # 1e9 overflowed the image size; 1e-9 made it empty
    if bad:
        raise DinokitError(f"--scales must be ratios from 0.1 to 4 (e.g. 1.0 1.32 1.73), got {bad[0]:g}")
    given = {"mode": args.mode, "crop": args.crop, "stride": args.stride, "flip": args.flip,
             "scales": tuple(args.scales) if args.scales else None}
    return {key: value for key, value in given.items() if value is not None}


def run_train(args: argparse.Namespace) -> int:
    from ..dense.run import resumes_saved_run, train_head
    from ..dense.train import recipe_with_overrides
    from ..engine.run_dir import check_new_run, check_writable

    # a bad setting: one line here, not in a job's log
    backbone_source = _backbone_source(args)
    recipe_with_overrides(args.task, args.head, list(args.opts),
                          saved_run=resumes_saved_run(args.output_dir, not args.no_resume))
    check_writable(args.output_dir)
    check_new_run(args.output_dir, resume=not args.no_resume)
    if submit_if_asked(args, Path(args.output_dir) / "slurm"):
        return 0
    train_head(task=args.task, head=args.head, backbone_source=backbone_source, train_dataset=args.train_dataset,
               val_dataset=args.val_dataset, output_dir=args.output_dir, overrides=args.opts, device=args.device,
               resume=not args.no_resume, progress=not args.no_progress)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..dense.run import eval_head

    if args.eval_size is not None and args.eval_size < 0:
        raise DinokitError(f"--eval-size must be >= 0 (0 = keep the images' size), got {args.eval_size}")

    eval_head(head_file=args.head_weights, val_dataset=args.val_dataset, output_dir=args.output_dir,
              backbone_source=_backbone_source(args), device=args.device, inference=_inference(args),
              eval_size=args.eval_size, progress=not args.no_progress)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..dense.run import predict_files

    if args.size is not None and args.size < 0:
        raise DinokitError(f"--size must be >= 0 (0 = keep the images' size), got {args.size}")

    predict_files(args.images, head_file=args.head_weights, out_dir=args.out, backbone_source=_backbone_source(args),
                  device=args.device, size=args.size, inference=_inference(args))
    return 0
