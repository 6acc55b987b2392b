"""``dinokit curate``: from a folder of uncurated images to a balanced, deduplicated training manifest.

Examples::

    dinokit curate run --pool photos/ --output-dir work --target-size 100000
    dinokit curate run --pool photos/ --eval-set Sample:split=VAL --seed-set curated/ --output-dir work \\
        --config-file run/config.yaml --weights run/eval/training_12499/teacher_checkpoint.pth
    dinokit curate cluster --output-dir work cluster.n_clusters=[2000,200]   # redo clustering and after
    torchrun --nproc_per_node=8 -m dinokit curate run --pool ... --output-dir work

Every stage is also a sub-command (embed, dedup, retrieve, cluster, sample, report) that reads and
writes files in the work folder; finished stages are skipped, so a killed run resumes where it stopped.
Settings given once are saved in ``WORK/config.json`` and reused by later commands.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

from ..distributed.slurm import add_slurm_options, submit_if_asked
from . import add_overrides, named

CONFIG_FILE = "config.json"
STAGE_HELP = {
    "run": "every stage in order (finished ones are skipped)",
    "embed": "class-token and copy-detection features of the pool, seed and evaluation images",
    "dedup": "drop near-copies inside the pool and pool images that copy evaluation images",
    "retrieve": "keep the pool images close to the seed set (nothing to do without --seed-set)",
    "cluster": "hierarchical k-means with resampling of the remaining images",
    "sample": "balanced sampling of --target-size images; writes WORK/manifest.txt",
    "report": "WORK/report.json and WORK/report.html",
}
KNOBS = (
    "settings (key=value): embed.image_size=224 embed.batch_size=64 embed.num_workers=2 embed.shard_size=8192 "
    "embed.copy=gem|cls|model embed.gem_p=3 embed.storage=float16|float32; dedup.k=64 dedup.threshold=0.85 "
    "dedup.eval_threshold=0.75 dedup.center=true dedup.keep=largest|first|central dedup.knn=auto|exact|faiss|faiss-ivf; "
    "retrieve.mode=sample|cluster retrieve.k=0(auto) retrieve.n_clusters=0(auto) retrieve.min_seed_images=3 "
    "retrieve.per_cluster=10000 retrieve.max_images=1000000; cluster.n_clusters=[k1,k2,...] "
    "cluster.resampling_steps=[...] cluster.sample_size=[...] cluster.n_splits=[...] cluster.sampling=c|r cluster.n_iters=20 "
    "cluster.metric=l2|cos cluster.float64=false cluster.seed=0; sample.strategy=r|c sample.seed=0 sample.multiplier=1"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "curate", help="automatic data curation: embed, deduplicate, retrieve, cluster, sample",
        description="Curate a pool of uncurated images into a deduplicated, balanced training set "
        "(WORK/manifest.txt, usable as FileList:path=WORK/manifest.txt by 'dinokit train').",
    )
    stages = parser.add_subparsers(dest="stage", metavar="STAGE")
    stages.required = True
    for name, help_text in STAGE_HELP.items():
        p = stages.add_parser(name, help=help_text, description=help_text, epilog=KNOBS)
        p.add_argument("--output-dir", required=True, metavar="WORK", help="the work folder (resumable)")
        p.add_argument("--pool", help="uncurated images: a folder or a dataset string (FileList:path=..., ...)")
        p.add_argument("--seed-set", help="curated images to retrieve around (dataset string or folder)")
        p.add_argument("--eval-set", action="append", metavar="STR",
                       help="evaluation images no pretraining image may copy (repeatable)")
        p.add_argument("--target-size", type=int, help="images in the curated set (default: all that dedup leaves)")
        p.add_argument("--model", help="hub name of the embedding backbone (default dinov2_vits14, official weights)")
        p.add_argument("--config-file", type=named, help="embed with the backbone of a training config.yaml instead")
        p.add_argument("--weights", "--pretrained-weights", help="backbone weights (teacher_checkpoint.pth, ...)")
        p.add_argument("--random-init", action="store_true", help="random weights (a baseline; = --weights random)")
        p.add_argument("--copy-model", help="a hub backbone for the copy-detection descriptor (embed.copy=model)")
        p.add_argument("--copy-config-file", help="... or a training config.yaml")
        p.add_argument("--copy-weights", help="... and its weights")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda [auto]")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name != "run":
            p.add_argument("--force", action="store_true", help="rerun the stage even if it finished")
        add_slurm_options(p, timeout_min=720)
        add_overrides(p, "overrides", "stage settings (listed below)")
        p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from ..curate.config import make_config, to_dict
    from ..data.datasets import absolute_dataset_str
    from ..errors import DinokitError

    work = Path(args.output_dir)
    saved = work / CONFIG_FILE
    fix = "delete it and give the work folder's settings again: the stages that finished with them are kept"
    try:
        base = json.loads(saved.read_text()) if saved.is_file() else {}
    except (OSError, ValueError) as err:
        raise DinokitError(f"{saved} is not readable JSON ({type(err).__name__}); {fix}") from None
    if not isinstance(base, dict):
        raise DinokitError(f"{saved} is not a JSON object of settings (it holds a {type(base).__name__}); {fix}")
    given = {"pool": args.pool, "seed_set": args.seed_set, "eval_sets": args.eval_set, "target_size": args.target_size,
             "model": args.model, "config_file": args.config_file, "weights": args.weights,
             "copy_model": args.copy_model, "copy_config_file": args.copy_config_file, "copy_weights": args.copy_weights}
    if args.target_size is not None and args.target_size < 1:  # 0 in the settings means "all": not given here
        raise DinokitError(f"--target-size must be at least 1, not {args.target_size}; leave it out to keep every "
                           "image that dedup leaves")
    # saved as absolute paths: a later command from another folder must read (and list) the same images and files
    for key in ("pool", "seed_set"):
        given[key] = given[key] and absolute_dataset_str(given[key])
    given["eval_sets"] = given["eval_sets"] and [absolute_dataset_str(s) for s in given["eval_sets"]]
    for key in ("config_file", "weights", "copy_config_file", "copy_weights"):
        if given[key] and Path(given[key]).expanduser().exists():
            given[key] = os.path.abspath(Path(given[key]).expanduser())
    if args.random_init:
        if args.weights not in (None, "random"):
            raise DinokitError(f"--random-init and --weights {args.weights!r} contradict each other; give one")
        given["weights"] = "random"
    base.update({k: v for k, v in given.items() if v is not None})
    if args.overrides and any("=" not in o for o in args.overrides):
        bad = next(o for o in args.overrides if "=" not in o)
        raise DinokitError(f"unexpected argument {bad!r}; settings are key=value (e.g. dedup.threshold=0.9)")
    config = make_config(base, args.overrides, source=f"{saved}; edit it, or {fix}")
    copy_flags = [f"--{key.replace('_', '-')}" for key in ("copy_model", "copy_config_file", "copy_weights")
                  if getattr(args, key)]  # given now: a work folder's saved ones were accepted before, and stay
    if copy_flags and config.embed.copy != "model":  # accepted, and copy detection used embed.copy's features
        raise DinokitError(f"{copy_flags[0]} is the copy-detection model of embed.copy=model, but embed.copy is "
                           f"{config.embed.copy}; add embed.copy=model, or drop {copy_flags[0]}")
    if not config.pool:
        raise DinokitError("--pool is required (a folder of images or a dataset string) the first time in a work folder")
    if config.config_file and not config.weights:
        raise DinokitError("--config-file needs --weights (e.g. a teacher_checkpoint.pth) or --random-init")
    return config, to_dict(config)


def run(args: argparse.Namespace) -> int:
    from .. import distributed as du
    from ..curate.pipeline import Work, check_ready
    from ..engine.run_dir import check_writable, main_process_lock
    from ..files import LOCK_NAME

    du.init_from_environment()
    if du.is_main_process():
        check_writable(args.output_dir)  # one line before any work
    config, as_dict = _config(args)
    work = Path(args.output_dir)
    check_ready(Work(work, config), args.stage)  # e.g. dedup before embed: one line, nothing written
    if submit_if_asked(args, work / "slurm"):
        return 0
    # two commands on one work folder would both report success with one's stages lost or mixed
    with main_process_lock(work / LOCK_NAME, work, "--output-dir"):
        try:
            return _run(args, work, config, as_dict)
        except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM: say what is kept (a launcher's SIGTERM stays silent)
            from . import Terminated

            if isinstance(err, Terminated) and not err.args[0]:
                raise
            said = f"stopped by {signal.Signals(err.signum).name}" if isinstance(err, Terminated) else "interrupted"
            kept = (f"{said}: the finished stages and embedding shards are kept in {work}; run the same command again "
                    "to go on from there")
            raise (Terminated(kept, err.signum) if isinstance(err, Terminated) else KeyboardInterrupt(kept)) from None


def _run(args: argparse.Namespace, work: Path, config, as_dict: dict) -> int:
    from .. import distributed as du
    from ..curate.pipeline import STAGES, Work, build_models, open_sets, run_pipeline, run_stage
    from ..eval.setup import resolve_device
    from ..files import atomic_write

    device = resolve_device(args.device)
    # a missing set, a pool of which no image reads, a too large target, weights that do not load: one line before
    # the work folder is written (the sets, once listed, and the models go on to the embed stage, which compares the
    # listings with the embedded ones: a set whose images changed since is embedded again, its models built there)
    lists = args.stage in ("run", "embed")
    datasets = open_sets(config) if du.is_main_process() and lists else None
    embeds = lists and (getattr(args, "force", False) or Work(work, config).done("embed") is None)
    models = build_models(config, device) if embeds else None
    if du.is_main_process():
        with atomic_write(work / CONFIG_FILE) as tmp:  # a killed command leaves the old settings, not half of them
            tmp.write_text(json.dumps(as_dict, indent=1))
    if args.stage == "run":
        report = run_pipeline(config, work, device=device, progress=not args.no_progress, datasets=datasets,
                              models=models)
    else:
        assert args.stage in STAGES
        given = {"datasets": datasets, "models": models} if args.stage == "embed" else {}
        report = run_stage(Work(work, config), args.stage, device=device, progress=not args.no_progress,
                           force=args.force, **{k: v for k, v in given.items() if v is not None})
    if du.is_main_process() and args.stage in ("run", "report"):
        counts = report["counts"]
        print("counts: " + ", ".join(f"{k} {'-' if v is None else v}" for k, v in counts.items()))
        print(f"wrote {work / 'manifest.txt'} (train on it: dinokit train ... train.dataset_path=FileList:path="
              f"{work / 'manifest.txt'}), {work / 'report.json'}, {work / 'report.html'}")
    return 0
