"""The training engine shared by every dinokit trainer (pretraining, distillation, dense heads).

A trainer is a :class:`Task` (``task.py``): its trainable and inference modules, ``compute_losses``,
``after_step`` and what snapshots export. The :class:`Engine` (``loop.py``) runs it: schedules applied to
parameter groups (``optim.py``), clipping, mixed precision, FSDP2/compile/activation checkpointing
(``parallel.py``), checkpoints and resume (``checkpoint.py``), metrics and trackers (``metrics.py``),
the NaN stop, snapshots (``snapshots.py``) and hooks. A command builds the task, the schedules and the data loader::

    rank, world = init_run(seed)                      # process group + seed, before building the task
    task = MyTask(...)                                # a Task subclass
    engine = Engine(task, EngineConfig(max_iter=1000, checkpoint_period=100), output_dir=out,
                    device=resolve_device("auto"), schedules={"lr": ..., "wd": ...}, hooks=[...])
    start = engine.restore(resume=True)
    summary = engine.run(lambda start_iter: make_loader(start_iter), start_iter=start)

Schedules are indexable per iteration (``CosineScheduler`` or anything with ``__getitem__``); ``lr`` and
``wd`` are required, ``last_layer_lr`` and ``backbone_lr`` optional; all of them reach ``compute_losses`` in ``sched``.
"""

from ..devices import batch_to
from ..models.weight_files import newest_snapshot
from .checkpoint import Checkpointer, atomic_torch_save, list_checkpoints
from .loop import Engine, EngineConfig, Hook, init_run
from .snapshots import full_state_dict, save_export
from .metrics import MetricsLogger
from .optim import CosineScheduler, ScheduleConfig, build_schedulers, get_param_groups
from .task import Export, LossOutput, Task, ema_update

__all__ = [
    "Checkpointer",
    "CosineScheduler",
    "Engine",
    "EngineConfig",
    "Export",
    "Hook",
    "LossOutput",
    "MetricsLogger",
    "ScheduleConfig",
    "Task",
    "atomic_torch_save",
    "batch_to",
    "build_schedulers",
    "ema_update",
    "get_param_groups",
    "init_run",
    "list_checkpoints",
    "newest_snapshot",
    "save_export",
    "full_state_dict",
]
