"""``dinokit distill``: distil a frozen teacher into one or several students (one process, ``torchrun``, SLURM)."""

from __future__ import annotations

import argparse

from ..distributed.slurm import add_slurm_options, submit_if_asked
from . import add_overrides, named


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a trained teacher (a dinokit run or an official backbone) into smaller students",
        description="Distil TEACHER (a dinokit train output folder, a teacher_checkpoint.pth beside its run's "
        "config.yaml, or with distillation.loss=features any backbone file) into the student(s) of the config. "
        "Resumes automatically from OUTPUT_DIR/checkpoints. Multi-GPU: torchrun --nproc_per_node=8 -m dinokit "
        "distill ...",
    )
    p.add_argument("--config-file", type=named, action="append",
                   help="preset name (see dinokit train --list-presets) or a YAML file; repeat it to merge several "
                   "in turn [distill_demo]")
    p.add_argument("--teacher", required=False, help="the teacher: run folder, teacher_checkpoint.pth or backbone file")
    p.add_argument("--output-dir", required=False, help="where checkpoints, logs and the students' snapshots go")
    p.add_argument("--no-resume", action="store_true", help="start a new run (refused where OUTPUT_DIR already holds checkpoints: they would mix)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the metrics lines are written as usual)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda [auto]")
    add_slurm_options(p)
    add_overrides(p, "opts", "config overrides, e.g. student.arch=vit_small")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from .. import distributed
    from ..config import check_idle_keys, load_config
    from ..errors import DinokitError
    from .train import end_summary, write_plot

    started = time.perf_counter()

    if not args.output_dir:
        raise DinokitError("--output-dir is required (where checkpoints and the students' snapshots go)")
    from ..engine.run_dir import check_writable

    check_writable(args.output_dir)  # one line before any work
    overrides = [*args.opts] + ([f"distillation.teacher={args.teacher}"] if args.teacher else [])
    cfg = load_config(args.config_file or ["distill_demo"], overrides)
    check_idle_keys(cfg, args.output_dir, resume=not args.no_resume)  # a new run's; before a job is submitted
    if args.nodes > 0:  # a teacher that is not there, a new run over an old one: one line here, not in a job's log
        from ..distill.teacher import resolve_teacher
        from ..engine.run_dir import check_new_run

        resolve_teacher(cfg.distillation.teacher, cfg.distillation.teacher_config)
        check_new_run(args.output_dir, resume=not args.no_resume)
    if submit_if_asked(args, f"{args.output_dir}/slurm"):
        return 0
    summary = run_distillation(cfg, output_dir=args.output_dir, resume=not args.no_resume, device=args.device,
                               progress=not args.no_progress)
    if distributed.is_main_process():
        print(end_summary(summary, time.perf_counter() - started, snapshot_label="student snapshot (EMA)"))
        write_plot(args.output_dir)
    return 0


def run_distillation(cfg, *, output_dir, resume: bool = True, device: str = "auto", stop_after: int | None = None,
                     progress: bool = True) -> dict:
    """``dinokit distill`` as a function: distillation with a k-NN monitor of every student's EMA snapshots."""
    from ..devices import resolve_device
    from ..distill import distill, student_sections
    from ..eval import knn_monitor

    monitor = knn_monitor(cfg, resolve_device(device), students=student_sections(cfg))
    return distill(cfg, output_dir=output_dir, resume=resume, device=device, stop_after=stop_after,
                   hooks=[monitor] if monitor else [], progress=progress)
