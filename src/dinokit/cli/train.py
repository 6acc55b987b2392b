"""``dinokit train``: self-supervised pretraining (one process, ``torchrun``, or SLURM through submitit)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..distributed.slurm import add_slurm_options, submit_if_asked
from . import add_overrides, named


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="DINOv2 self-supervised pretraining",
        description="Pretrain with the DINOv2 recipe. Resumes automatically from OUTPUT_DIR/checkpoints. "
        "Multi-GPU: torchrun --nproc_per_node=8 -m dinokit train ...; SLURM: add --nodes/--gpus-per-node.",
    )
    p.add_argument("--config-file", type=named, action="append", help="preset name (see --list-presets) or a YAML file; "
                   "repeat it to merge several in turn, e.g. --config-file small --config-file mine.yaml [demo]")
    p.add_argument("--output-dir", required=False, help="where checkpoints, logs and snapshots go")
    p.add_argument("--no-resume", action="store_true", help="start a new run (refused where OUTPUT_DIR already holds checkpoints: they would mix)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the metrics lines are written as usual)")
    p.add_argument("--eval-only", action="store_true",
                   help="train nothing: write the teacher of OUTPUT_DIR's newest checkpoint (or MODEL.WEIGHTS) to "
                        "OUTPUT_DIR/eval/manual_<iteration>/ and run the configured k-NN on it (official option)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda [auto]")
    p.add_argument("--list-presets", action="store_true", help="print the shipped presets and exit")
    add_slurm_options(p)
    add_overrides(p, "opts", "config overrides, e.g. optim.epochs=10")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import check_idle_keys, list_presets, load_config
    from ..errors import DinokitError

    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    if not args.output_dir:
        raise DinokitError("--output-dir is required (where checkpoints and logs go)")
    from ..engine.run_dir import check_writable

    check_writable(args.output_dir)  # one line before any work
    cfg = load_config(args.config_file or ["demo"], args.opts)
    check_idle_keys(cfg, args.output_dir, resume=not args.no_resume)  # a new run's; before a job is submitted
    if args.nodes > 0:  # here, not in the job's log
        from ..engine.run_dir import check_new_run

        check_new_run(args.output_dir, resume=not args.no_resume)
    if submit_if_asked(args, Path(args.output_dir) / "slurm"):
        return 0
    import time

    from .. import distributed

    started = time.perf_counter()
    from ..train.train import check_stage_weights

    check_stage_weights(cfg)  # before the banner, which announces the run
    summary = pretrain(cfg, output_dir=args.output_dir, resume=not args.no_resume, device=args.device,
                       banner=None if args.eval_only else lambda: start_banner(cfg, args.output_dir, args.device),
                       eval_only=args.eval_only, progress=not args.no_progress)
    if distributed.is_main_process():
        if args.eval_only:
            print(eval_only_summary(summary))
            return 0
        print(end_summary(summary, time.perf_counter() - started))
        write_plot(args.output_dir)
    return 0


def eval_only_summary(summary: dict) -> str:
    """The lines after ``--eval-only``: the teacher written, and the k-NN figures of the monitor."""
    knn = ", ".join(f"{k} {v:.1f}%" for k, v in summary["metrics"].items() if k != "iteration")
    lines = [f"evaluated iteration {summary['iteration']}: "
             + (knn or "no k-NN monitor (evaluation.knn_dataset is unset)")]
    lines += [f"teacher snapshot: {path}" for path in summary["last_exports"].values()]
    return "\n".join(lines)


def start_banner(cfg, output_dir, device: str) -> str:
    """One line before the first step: the run's length, device, data, output folder and what is evaluated."""
    from ..data import make_dataset
    from ..devices import resolve_device
    from ..eval.monitor import knn_image_size
    from ..train.data import small_images_note

    knn, size = cfg.evaluation.knn_dataset, knn_image_size(cfg)
    evaluated = (f"k-NN on {knn.val} (neighbours from {knn.train}) at {size} px at each snapshot"
                 if knn and knn.train and knn.val else "no k-NN monitor (evaluation.knn_dataset is unset)")
    dataset = make_dataset(cfg.train.dataset_path, labelled=False)  # a missing or empty folder: one line, here
    note = small_images_note(cfg.crops, dataset, cfg.student.patch_size)
    epochs, length = cfg.optim.epochs, cfg.train.OFFICIAL_EPOCH_LENGTH
    return (f"training {cfg.student.arch}: {epochs * length} iterations "
            f"({epochs} epoch{'s' if epochs != 1 else ''} of {length}) on {resolve_device(device)}, "
            f"{len(dataset)} images found in {cfg.train.dataset_path}, into {output_dir}; {evaluated}"
            + (f"\n{note}" if note else ""))


def end_summary(summary: dict, seconds: float, *, snapshot_label: str = "teacher snapshot") -> str:
    """The lines after a run: iterations and time, loss, the last k-NN figure (of each student, when several),
    skipped images, and per snapshot of the last iteration where it is and how to use it."""
    import json
    import shlex
    from pathlib import Path

    out = Path(summary["output_dir"])
    loss = (summary.get("metrics") or {}).get("total_loss")
    knn: dict[str, float] = {}
    metrics_file = out / "training_metrics.json"
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            record = json.loads(line)
            knn.update({k: v for k, v in record.items() if k.rpartition("/")[2].startswith("knn_top1")})
    last_per_model = {k.rpartition("/")[0]: k for k in sorted(knn)}  # one figure per model ("" or a student)
    lines = [f"done: {summary['iteration']} iterations in {out} ({seconds:.0f} s)"
             + (f", final loss {loss:.4f}" if loss is not None else "")
             + "".join(f", {k} {knn[k]:.1f}%" for k in last_per_model.values())
             + f", unreadable images skipped in trained batches: {summary.get('bad_images', 0)}"]
    for snap in summary.get("last_exports", {}).values():
        config = Path(snap).parents[2] / "config.yaml"  # RUN[/student]/eval/training_N/teacher_checkpoint.pth
        lines.append(f"{snapshot_label}: {snap}")
        # quoted for a shell: a folder with spaces or a leading dash gave a command that did not work when pasted
        lines.append(f"next: dinokit embed IMAGES --config-file {shlex.quote(str(config))} --weights "
                     f"{shlex.quote(str(snap))} --out emb.npz")
    return "\n".join(lines)


def pretrain(cfg, *, output_dir, resume: bool = True, device: str = "auto", stop_after: int | None = None,
             banner=None, eval_only: bool = False, progress: bool = True) -> dict:
    """``dinokit train`` as a function: pretraining with the monitors the config asks for (k-NN on each snapshot)."""
    from ..devices import resolve_device
    from ..eval import knn_monitor
    from ..train.train import train

    monitor = knn_monitor(cfg, resolve_device(device))
    return train(cfg, output_dir=output_dir, resume=resume, device=device, stop_after=stop_after,
                 hooks=[monitor] if monitor else [], banner=banner, eval_only=eval_only, progress=progress)


def write_plot(run_dir) -> None:
    """The run's metrics as ``RUN_DIR/training_metrics.png`` when matplotlib is installed (else nothing)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return
    from ..errors import DinokitError
    from ..plot import plot_run

    try:
        print(f"plot: {plot_run(run_dir)}")
    except DinokitError as err:  # e.g. a full disk: the run itself finished, and says so with its exit status
        print(f"warning: the plot of the run was not written: {err}")
