"""``dinokit distill``: a frozen teacher into one or several students, on the shared training engine.

Outputs are those of ``dinokit train``: ``config.yaml`` describing the student, ``training_metrics.json``,
resumable checkpoints in ``checkpoints/`` (the frozen teacher is not saved in them: it is reloaded from
its file) and ``eval/training_<it>/teacher_checkpoint.pth`` snapshots of each student's EMA, which
``dinokit eval``, ``embed`` and the hub entry points load like any teacher snapshot. With several
students (``distillation.students``), each has its own subfolder with its ``config.yaml`` and snapshots;
checkpoints and metrics (terms prefixed with the student's name) stay in the run folder.

Under ``torchrun`` every student is sharded over all ranks, like the teacher: one teacher forward per
batch serves every student with no extra communication; the price is that each rank holds a shard of
every student, and the step takes the teacher's time plus the sum of the students' (DINOv3's disjoint
rank ranges per student balance step times instead, at the cost of all-gathers of inputs and targets).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .. import distributed as du
from ..config import apply_scaling_rules, check_koleo_group, check_step_levers, write_config
from ..config.paths import make_paths_absolute
from ..config.validation import changed_keys, check_block_chunks, check_idle_keys
from ..config.schema import StudentConfig
from ..data import make_dataset
from ..devices import resolve_device
from ..engine import Hook, init_run
from ..engine.run_dir import open_run_dir
from ..errors import DinokitError
from ..models.architectures import arch_dims
from ..tracking import check_tracker
from ..train.data import check_output_outside_data, small_images_note
from ..train.train import engine_config, run_on_ssl_data
from ..train.weights import check_weight_sources
from .task import DistillationTask, check_compatible
from .teacher import build_teacher, resolve_teacher

_STUDENT_KEYS = tuple(StudentConfig.__dataclass_fields__)


def _saved_teacher(output_dir: Path) -> str | None:
    """The teacher snapshot a distillation in ``output_dir`` started from (its saved ``distillation.teacher``)."""
    try:
        saved = OmegaConf.load(output_dir / "config.yaml")
        return str(OmegaConf.select(saved, "distillation.teacher") or "") or None
    except (OSError, ValueError, OmegaConfBaseException):  # none, or damaged: the run folder's checks tell
        return None


def student_sections(cfg: DictConfig) -> dict[str, DictConfig]:
    """name -> ``student`` section of every student: ``{"": cfg.student}`` for one, else each entry of
    ``distillation.students`` merged over ``student.*`` (entries may set ``name``, default ``student<i>_<arch>``)."""
    if not cfg.distillation.students:
        return {"": cfg.student}
    sections: dict[str, DictConfig] = {}
    for i, entry in enumerate(cfg.distillation.students):
        entry = dict(OmegaConf.to_container(entry) if OmegaConf.is_config(entry) else entry or {})
        name = entry.pop("name", "")
        for key in entry:
            if key not in _STUDENT_KEYS:
                close = difflib.get_close_matches(key, _STUDENT_KEYS, n=1)
                hint = f"did you mean '{close[0]}'?" if close else "keys: name, " + ", ".join(_STUDENT_KEYS)
                raise DinokitError(f"unknown student key 'distillation.students[{i}].{key}' ({hint})")
        arch = entry.get("arch", cfg.student.arch)
        arch_dims(arch, f"config key 'distillation.students[{i}].arch'")
        name = str(name or f"student{i}_{arch}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in sections:
            raise DinokitError(f"student name {name!r} (distillation.students[{i}]) must be unique and a plain "
                               "folder name (letters, digits, _ . -)")
        try:
            sections[name] = OmegaConf.merge(cfg.student, entry)
        except OmegaConfBaseException as err:
            raise DinokitError(f"distillation.students[{i}]: {str(err).splitlines()[0]}") from None
        check_block_chunks(sections[name], f"distillation.students[{i}]")
    return sections


def student_config(cfg: DictConfig, section: DictConfig) -> DictConfig:
    """The run's configuration as seen from one student (its ``config.yaml``): ``student`` = that student."""
    single = copy.deepcopy(cfg)
    single.student = section
    single.distillation.students = []
    return single


_HEAD_LOSS_KEYS = ("dino.loss_weight", "dino.koleo_loss_weight", "ibot.loss_weight", "ibot.mask_sample_probability",
                   "ibot.mask_ratio_min_max", "teacher.teacher_temp", "teacher.warmup_teacher_temp",
                   "teacher.warmup_teacher_temp_epochs", "distillation.ibot_positions", "dino.reweight_dino_local_loss")
_FEATURE_LOSS_KEYS = ("distillation.feature_loss", "distillation.feature_patch_weight")


def features_loss_idle(cfg) -> list[str]:
    """The settings given that the chosen ``distillation.loss`` does not use; they said nothing. ``features`` reads
    the global crops' features only (no heads, no local crops, no masks, no temperatures); ``dino_ibot`` no
    feature-loss setting."""
    if cfg.distillation.loss != "features":
        return changed_keys(cfg, _FEATURE_LOSS_KEYS)
    given = {"crops.local_crops_number": cfg.crops.local_crops_number > 0, "train.packed_crops": cfg.train.packed_crops,
             "train.head_chunk_rows": cfg.train.head_chunk_rows > 0, "train.compile_loss": cfg.train.compile_loss,
             "train.centering=sinkhorn_knopp": cfg.train.centering == "sinkhorn_knopp"}
    return [key for key, on in given.items() if on] + changed_keys(cfg, _HEAD_LOSS_KEYS)


def distill(
    cfg: DictConfig,
    *,
    output_dir: str | Path,
    resume: bool = True,
    device: str = "auto",
    stop_after: int | None = None,
    hooks: Iterable[Hook] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Distil ``cfg.distillation.teacher`` into the configured students in ``output_dir``; returns the summary."""
    for key, unused in (("gram.use_loss", cfg.gram.use_loss), ("gram.compute_stats", cfg.gram.compute_stats),
                        ("train.freeze_backbone_epochs", cfg.train.freeze_backbone_epochs),
                        ("student.resume_from_teacher_chkpt", cfg.student.resume_from_teacher_chkpt)):
        if unused:
            raise DinokitError(f"{key} is a pretraining-stage key that dinokit distill does not use; remove it "
                               "(distillation starts students from student.pretrained_weights)")
    make_paths_absolute(cfg)  # saved in config.yaml: the same teacher and files from any working directory
    check_idle_keys(cfg, output_dir, resume)
    rank, world = init_run(cfg.train.seed)
    if rank == 0 and (idle := features_loss_idle(cfg)):
        verb = "has" if len(idle) == 1 else "have"
        if cfg.distillation.loss == "features":
            print(f"note: distillation.loss=features matches the students' global-crop features to the teacher's, so "
                  f"{', '.join(idle)} {verb} no effect (local crops are made and not used: crops.local_crops_number=0 "
                  "saves their cost)")
        else:
            print(f"note: {', '.join(idle)} {verb} no effect with distillation.loss={cfg.distillation.loss} (they "
                  "set distillation.loss=features)")
    check_step_levers(cfg.train, world)
    check_koleo_group(cfg.dino, world)
    output_dir = Path(output_dir).expanduser()
    students = student_sections(cfg)
    check_weight_sources({f"distillation.students[{i}].pretrained_weights" if name else "student.pretrained_weights":
                          section.pretrained_weights for i, (name, section) in enumerate(students.items())})
    source = resolve_teacher(cfg.distillation.teacher, cfg.distillation.teacher_config,
                             started_with=_saved_teacher(Path(output_dir).expanduser()) if resume else None)
    teacher, teacher_cfg = build_teacher(source, with_heads=cfg.distillation.loss == "dino_ibot")
    check_compatible(cfg, teacher_cfg, students, teacher.backbone.patch_size)
    check_tracker(cfg.train.tracker)
    check_output_outside_data(output_dir, cfg.train.dataset_path)
    if output_dir.resolve() in Path(source.weights).resolve().parents:
        raise DinokitError(f"--output-dir {output_dir} holds the teacher ({source.weights}); give a new --output-dir "
                           "for the students")
    cfg.train.output_dir = str(output_dir)
    cfg.distillation.teacher = os.path.abspath(source.weights)
    apply_scaling_rules(cfg, world)
    dev = resolve_device(device)
    weights = cfg.MODEL.WEIGHTS or None
    # checked before anything is written: a folder of its own, no other run in it, the same configuration
    with open_run_dir(output_dir, resume=resume, config=OmegaConf.to_container(cfg, resolve=True)):
        def banner() -> None:  # the images are listed first: a missing or empty folder is one line, nothing written
            dataset = make_dataset(cfg.train.dataset_path)
            note = small_images_note(cfg.crops, dataset, cfg.student.patch_size)
            print(f"distilling {source.weights} ({type(teacher.backbone).__name__} {teacher.backbone.embed_dim}-d, "
                  f"{teacher.backbone.n_blocks} blocks) into " + ", ".join(
                      f"{name or 'the student'} ({s.arch})" for name, s in students.items())
                  + f", {len(dataset)} images found in {cfg.train.dataset_path}" + (f"\n{note}" if note else ""))

        du.on_main_process(banner)  # every process stops on its error (rank 1 went on and died in a collective)
        task = DistillationTask(cfg, teacher=teacher, students=students)  # starting weights that do not fit: one line

        def write_configs() -> None:  # once the checkpoint to resume from (if any) has loaded
            if rank == 0:
                write_config(cfg, output_dir)
                for name, section in students.items():
                    if name:
                        write_config(student_config(cfg, section), output_dir / name)
        settings = engine_config(cfg, dev, progress=progress)
        precision = cfg.compute_precision.student
        settings.reshard_after_forward = {f"{key}.{part}": precision[part].sharding_strategy == "FULL_SHARD"
                                          for key, student in task.students.items() for part in student
                                          if part in ("backbone", "dino_head", "ibot_head")}
        return run_on_ssl_data(task, settings, cfg, output_dir=output_dir, device=dev, hooks=hooks, resume=resume,
                               weights=weights, stop_after=stop_after, on_restored=write_configs)
