"""``dinokit eval knn|linear|logreg``: the official classification protocols on a frozen backbone.

The arguments mirror the official ``dinov2/run/eval/{knn,linear,log_regression}.py`` scripts. Features
are cached under ``OUTPUT_DIR/features``, so running the three protocols on one model extracts once.
Multi-GPU: ``torchrun --nproc_per_node=N -m dinokit eval knn ...``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..devices import default_workers, usable_workers
from ..distributed.slurm import add_slurm_options, submit_if_asked
from . import named

if TYPE_CHECKING:
    from ..eval.setup import EvalContext

DESCRIPTION = (
    "Evaluate a frozen backbone. Architecture: --config-file (an eval preset such as eval/vits14_pretrain, or "
    "the config.yaml of a 'dinokit train' run) or --model (a hub name). Weights: --pretrained-weights (backbone "
    "file, teacher_checkpoint.pth, .safetensors or URL), else the official weights of --model, else random "
    "initialisation (a baseline)."
)


def _add_common(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    p.add_argument("--output-dir", required=True, help="results, saved heads and the feature cache go here")
    p.add_argument("--train-dataset", required=True, metavar="STR",
                   help="labelled training set: ImageFolder:root=DIR (DIR/<class>/<image>), ImageNet:split=TRAIN:"
                        "root=...:extra=..., FileList:path=LIST, Sample:split=TRAIN, or a folder path")
    p.add_argument("--val-dataset", required=True, metavar="STR", help="labelled validation set (same syntax)")
    p.add_argument("--config-file", type=named, default=None, help="eval preset or training config.yaml defining the backbone")
    p.add_argument("--pretrained-weights", "--weights", default=None, metavar="PATH",
                   help="backbone weights (any dinokit/official layout); a teacher_checkpoint.pth finds its run's "
                        "config.yaml by itself")
    p.add_argument("--model", default=None, metavar="NAME", help="hub name, e.g. dinov2_vits14 (see 'dinokit models')")
    p.add_argument("--random-init", action="store_true", help="with --model: evaluate random weights (a baseline)")
    p.add_argument("--image-size", type=int, default=224,
                   help="centre-crop size; images are first resized to size*256/224 (bicubic) [224, official]")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"images per batch and rank [{batch_size}]")
    p.add_argument("--num-workers", type=int, default=default_workers(),
                   help="data-loading worker processes, at most the usable CPU cores [min(4, cores)]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="backbone autocast dtype: auto = bf16 on CUDA, fp32 on CPU; the official code used fp16")
    p.add_argument("--no-cache", action="store_true", help="do not read or write OUTPUT_DIR/features")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --config-file keys")
    add_slurm_options(p, timeout_min=720)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="k-NN, linear-probe and logistic-regression evaluation",
                            description=DESCRIPTION)
    protocols = parser.add_subparsers(dest="protocol", metavar="PROTOCOL")
    protocols.required = True

    knn = protocols.add_parser("knn", help="weighted k-NN on L2-normalised class tokens", description=DESCRIPTION)
    _add_common(knn, batch_size=256)
    knn.add_argument("--nb-knn", "--nb_knn", dest="nb_knn", type=int, nargs="+", metavar="K",
                     default=[10, 20, 100, 200],
                     help="numbers of neighbours [10 20 100 200]")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weights exp(sim/T) [0.07]")
    knn.add_argument("--n-per-class-list", type=int, nargs="+", default=[-1], metavar="N",
                     help="training samples per class; -1 = all [-1]; e.g. -1 1 5 10 for few-shot")
    knn.add_argument("--n-tries", type=int, default=1, help="random subsets per few-shot size [1]")
    knn.add_argument("--raw-pixels", action="store_true",
                     help="k-NN on the flattened eval-transformed images instead of a backbone's features: the "
                          "baseline a network must beat (no backbone option; try --image-size 64 on large sets)")
    knn.add_argument("--chunk-size", type=int, default=65536,
                     help="training features compared per block; bounds memory (0 = all at once) [65536]")
    knn.add_argument("--gather-on-cpu", action="store_true",
                     help="keep the training features in CPU memory, copied to the device a --chunk-size block at "
                          "a time: for training sets larger than GPU memory (official option)")
    knn.set_defaults(func=run_knn)

    linear = protocols.add_parser("linear", help="linear probes on the last blocks' class tokens",
                                  description=DESCRIPTION)
    _add_common(linear, batch_size=128)
    linear.add_argument("--epochs", type=int, default=10, help="'epochs' of --epoch-length iterations [10]")
    linear.add_argument("--epoch-length", type=int, default=1250, help="iterations per epoch [1250]")
    linear.add_argument("--eval-period-iterations", type=int, default=None, metavar="N",
                        help="score the probes on val every N iterations (printed, kept in the result's 'periodic') "
                             "[--epoch-length; 0: only at the end]")
    linear.add_argument("--learning-rates", type=float, nargs="+", default=None, metavar="LR",
                        help="base lrs, scaled by batch*world/256 [the official 13, 1e-5 .. 0.1]")
    linear.add_argument("--n-last-blocks", type=int, nargs="+", default=[1, 4], metavar="N",
                        help="class tokens of [1 4] last blocks")
    linear.add_argument("--no-augment", action="store_true",
                        help="train on cached eval-transform features instead of running the backbone on "
                             "RandomResizedCrop+flip images each step: much faster, slightly less accurate")
    linear.add_argument("--seed", type=int, default=0)
    linear.add_argument("--val-metric-type", default="mean_accuracy",
                        choices=("mean_accuracy", "mean_per_class_accuracy"),
                        help="what ranks the classifiers on the val set: top-1, or the mean of the per-class top-1 "
                             "for unbalanced sets [mean_accuracy] (official option)")
    linear.add_argument("--no-resume", action="store_true",
                        help="start afresh over an unfinished evaluation in --output-dir instead of resuming it")
    linear.add_argument("--test-datasets", nargs="+", default=[], metavar="DATASET",
                        help="also score the best classifier on these labelled datasets (official option)")
    linear.add_argument("--test-metric-types", nargs="+", default=[], metavar="TYPE",
                        help="mean_accuracy, mean_per_class_accuracy, per_class_accuracy or imagenet_real_accuracy: "
                             "one for all test datasets or one each [mean_accuracy]")
    linear.add_argument("--test-class-mapping-fpaths", nargs="+", default=[], metavar="NPY",
                        help="the classifier's class of each test class (numpy.save of integers), or None: one for "
                             "all test datasets or one each [None: classes matched by name] (official option)")
    linear.set_defaults(func=run_linear)

    logreg = protocols.add_parser("logreg", help="logistic regression on class tokens, C chosen on held-out data",
                                  description=DESCRIPTION)
    _add_common(logreg, batch_size=256)
    logreg.add_argument("--c-grid-size", type=int, default=45, help="values of C in 1e-6 .. 1e5 [45, official]")
    logreg.add_argument("--backend", default="auto", choices=("auto", "sklearn", "torch"),
                        help="auto = torch (L-BFGS) on CUDA, scikit-learn on CPU [auto]")
    logreg.add_argument("--max-iter", "--max-train-iters", dest="max_iter", type=int, default=1000,
                        help="solver iterations per fit [1000]")
    logreg.add_argument("--tol", type=float, default=1e-12, help="solver gradient tolerance [1e-12, official]")
    logreg.add_argument("--holdout-fraction", type=float, default=0.1,
                        help="share of the training set used to choose C [0.1]")
    logreg.add_argument("--finetune-on-val", action="store_true",
                        help="choose C on the val set instead, fitting on all of train (official option)")
    logreg.set_defaults(func=run_logreg)


def check_options(args: argparse.Namespace) -> None:
    """The option values, each named when wrong, before any folder is written or any feature computed (the
    protocol's own checker, which its Python function calls too)."""
    from ..eval.setup import check_backbone_choice

    check_backbone_choice(config_file=args.config_file, model=args.model, random_init=args.random_init,
                          pretrained_weights=args.pretrained_weights, opts=args.opts,
                          weights_flag="--pretrained-weights")
    if args.pretrained_weights:
        from ..models.weight_files import check_weights_path

        check_weights_path(args.pretrained_weights, "--pretrained-weights")
    if args.protocol == "knn":
        from ..eval.knn import check_knn_options

        check_knn_options(ks=args.nb_knn, temperature=args.temperature, n_per_class_list=args.n_per_class_list,
                          n_tries=args.n_tries, chunk_size=args.chunk_size)
    elif args.protocol == "linear":
        from ..eval.linear import check_linear_options
        from ..eval.scoring import metrics_of_test_sets

        check_linear_options(**_linear_options(args))
        metrics_of_test_sets(args.test_datasets, args.test_metric_types, args.test_class_mapping_fpaths)
    elif args.protocol == "logreg":
        from ..eval.logreg import check_logreg_options

        check_logreg_options(**_logreg_options(args))


def _linear_options(args: argparse.Namespace) -> dict:
    from ..eval.linear import LEARNING_RATES

    return dict(epochs=args.epochs, epoch_length=args.epoch_length, batch_size=args.batch_size,
                learning_rates=args.learning_rates or LEARNING_RATES, n_last_blocks=args.n_last_blocks,
                eval_period=args.eval_period_iterations, seed=args.seed)


def _logreg_options(args: argparse.Namespace) -> dict:
    from ..eval.logreg import c_grid

    return dict(c_values=c_grid(args.c_grid_size) if args.c_grid_size >= 1 else [], backend=args.backend,
                holdout_fraction=args.holdout_fraction, max_iter=args.max_iter, tol=args.tol)


@contextlib.contextmanager
def _evaluation(args: argparse.Namespace, check_model=None, resize_size: int | None = None
                ) -> Iterator[EvalContext | None]:
    """The evaluation's context (None: submitted to SLURM), with the output folder's lock held for the ``with``
    block: two evaluations writing one folder both reported success, one resuming the other's running checkpoint
    or losing its result lines. Half-written files of killed evaluations there are deleted once it is held."""
    from .. import distributed
    from ..engine.run_dir import main_process_lock
    from ..eval import prepare_eval
    from ..files import LOCK_NAME

    check_options(args)
    if args.nodes > 0:
        from ..engine.run_dir import check_writable

        check_writable(args.output_dir)  # one line here, not in the job's log
    if submit_if_asked(args, Path(args.output_dir) / "slurm"):
        yield None  # the job evaluates
        return
    distributed.init_from_environment()
    out = Path(args.output_dir).expanduser()
    with main_process_lock(out / LOCK_NAME, out, "--output-dir"):  # a folder made for it and left empty goes again
        yield prepare_eval(
            output_dir=args.output_dir, train_dataset=args.train_dataset, val_dataset=args.val_dataset,
            config_file=args.config_file, pretrained_weights=args.pretrained_weights, model=args.model,
            random_init=args.random_init, opts=args.opts, image_size=args.image_size, resize_size=resize_size,
            batch_size=args.batch_size,
            num_workers=usable_workers(args.num_workers, key="--num-workers"), device=args.device, dtype=args.dtype,
            progress=not args.no_progress, cache=not args.no_cache, check_model=check_model,
            raw_pixels=getattr(args, "raw_pixels", False),
        )


def _report(ctx, title: str, table: str, results_file: str) -> None:
    from .. import distributed

    if distributed.is_main_process():
        print(f"{title}: {ctx.images_line()}, {ctx.num_classes} classes")
        print(table)
        print(f"results appended to {ctx.output_dir / results_file}")


def run_knn(args: argparse.Namespace) -> int:
    from ..eval.knn import RESULTS_FILE, format_knn_table, knn_protocol

    with _evaluation(args) as ctx:
        if ctx is None:
            return 0
        results = knn_protocol(ctx, ks=args.nb_knn, temperature=args.temperature,
                               n_per_class_list=args.n_per_class_list, n_tries=args.n_tries,
                               chunk_size=args.chunk_size or None, gather_on_cpu=args.gather_on_cpu)
        _report(ctx, f"k-NN (T={args.temperature})", format_knn_table(results), RESULTS_FILE)
        return 0


def run_linear(args: argparse.Namespace) -> int:
    from ..eval.linear import check_linear_options, linear_protocol
    from ..eval.linear_results import RESULTS_FILE, format_linear_table
    from ..eval.scoring import format_test_line

    options = _linear_options(args)
    # --n-last-blocks against the backbone's depth: right after it is built, before the output folder
    with _evaluation(args, check_model=lambda model: check_linear_options(**options, depth=len(model.blocks))) as ctx:
        if ctx is None:
            return 0
        result, probes, accuracies = linear_protocol(ctx, **options, augment=not args.no_augment,
                                                     test_datasets=args.test_datasets,
                                                     test_metric_types=args.test_metric_types,
                                                     test_class_mappings=args.test_class_mapping_fpaths,
                                                     val_metric_type=args.val_metric_type, resume=not args.no_resume)
        mode = "cached features" if args.no_augment else "augmented images"
        label = "top-1" if args.val_metric_type == "mean_accuracy" else "mAcc"
        _report(ctx, f"linear probes ({result.iterations if result else 0} iterations, {mode})",
                format_linear_table(probes, accuracies, label), RESULTS_FILE)
        if result is not None:
            chosen = "" if args.val_metric_type == "mean_accuracy" else f", {label} {result.val_value:.2f}"
            print(f"best: {result.best_classifier} top-1 {result.top1:.2f}{chosen}; heads: "
                  + ", ".join(str(ctx.output_dir / f) for f in result.head_files.values()))
            for name, test in result.tests.items():
                print(format_test_line(name, test))
        return 0


def run_logreg(args: argparse.Namespace) -> int:
    from ..eval.logreg import RESULTS_FILE, logreg_protocol

    with _evaluation(args, resize_size=args.image_size) as ctx:  # the official Resize(224) + CenterCrop(224)
        if ctx is None:
            return 0
        result = logreg_protocol(ctx, **_logreg_options(args), finetune_on_val=args.finetune_on_val)
        where = "the val set" if result.chosen_on == "val" else "held-out train images"
        table = (f"best C {result.best_C:.3g} (chosen on {where}; {result.backend}): top-1 {result.top1:.2f}, "
                 f"top-5 {result.top5:.2f}")
        scores = set(result.holdout_top1.values())
        if len(result.holdout_top1) > 1 and len(scores) == 1:  # e.g. one held-out image: C was not chosen
            more = "--holdout-fraction or more training images" if result.chosen_on == "holdout" else "more val images"
            table += (f"\nnote: all {len(result.holdout_top1)} values of C scored {scores.pop():.2f}% top-1 on {where}, "
                      f"so the smallest ({result.best_C:.3g}, the strongest regularisation) was taken; give {more} for "
                      "a choice")
        _report(ctx, "logistic regression", table, RESULTS_FILE)
        return 0
