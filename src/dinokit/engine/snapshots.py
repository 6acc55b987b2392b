"""Snapshots: the exported modules of a run (e.g. the EMA teacher) written as whole state dicts under
``eval/training_<iteration>/``, for evaluation, distillation and continued stages (found again by
:func:`dinokit.models.weight_files.newest_snapshot`)."""

from __future__ import annotations

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
