"""Snapshots: the exported modules of a run (e.g. the EMA teacher) written as whole state dicts under
``eval/training_<iteration>/``, for evaluation, distillation and continued stages."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .. import distributed as dist_utils
from .checkpoint import atomic_torch_save
from .task import Export


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with whole tensors on the CPU, also where FSDP2 shards it (collective: every rank
    calls it; plain tensors in one process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_export(export: Export, path: Path) -> None:
    """Write ``{"teacher": full state dict}`` of ``export.module`` (collective: every rank calls it)."""
    sd = full_state_dict(export.module)
    if dist_utils.is_main_process():
        atomic_torch_save({"teacher": export.layout(sd) if export.layout else sd}, path)
    dist_utils.barrier()


def newest_snapshot(run_dir: str | Path, filename: str = "teacher_checkpoint.pth") -> Path | None:
    """The snapshot of the highest iteration in ``run_dir/eval/training_<it>/`` (None if there is none)."""
    def iteration(path: Path) -> int:
        match = re.fullmatch(r"training_(\d+)", path.parent.name)
        return int(match.group(1)) if match else -1

    snapshots = sorted(Path(run_dir).glob(f"eval/training_*/{filename}"), key=iteration)
    return snapshots[-1] if snapshots else None


def student_folders(run_dir: str | Path, filename: str = "teacher_checkpoint.pth") -> list[Path]:
    """The students' subfolders of a distillation of several students (each with its own snapshots), by name."""
    return sorted({p.parents[2] for p in Path(run_dir).glob(f"*/eval/training_*/{filename}")})


def no_snapshot_fix(run_dir: str | Path) -> str:
    """What to give instead of a folder without snapshots: one student's folder if it holds several students."""
    students = student_folders(run_dir)
    if students:
        return (f"it holds the students {', '.join(p.name for p in students)} of a distillation: give one student's "
                f"folder, e.g. {str(students[0])!r}")
    return "give a dinokit train run folder with at least one snapshot, or the checkpoint file itself"
