"""What a trainer must say about itself for the engine to run it: the :class:`Task` contract."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class LossOutput:
    """The loss to minimise and the terms to log (official names where there are official ones).

    ``logged_total``, when given, is logged as ``total_loss`` and ``total`` as ``objective_loss``: the official
    pretraining log sums its logged terms (KoLeo and iBOT halved, loss weights left out), not the minimised loss.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    logged_total: torch.Tensor | None = None

    @property
    def logged(self) -> torch.Tensor:
        """What the log calls ``total_loss``."""
        return self.total if self.logged_total is None else self.logged_total


@dataclass
class Export:
    """A module that snapshots write, as ``{"teacher": state_dict}`` in ``<subdir>/eval/training_<it>/``."""

    module: nn.Module
    subdir: str = ""  # "" = the run folder itself; one folder per student when a task trains several
    layout: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None  # e.g. official chunking
    filename: str = "teacher_checkpoint.pth"


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """``ema <- momentum * ema + (1 - momentum) * model`` over every parameter (sharded or not), in one foreach call,
    on the parameters themselves (not ``.data``, which leaves their version counters as they were)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - momentum)


class Task(nn.Module):
    """A training task: the modules it owns and what one step computes.

    Subclasses hold every module as an attribute (so ``state_dict`` sees them) and implement:

    - :meth:`trainable_modules`: name -> module whose parameters the optimiser updates. The engine
      builds the parameter groups (layer-wise decay for every submodule with ``n_blocks``, no weight
      decay on biases/norms, a flag on ``last_layer``), clips gradients per module, and applies
      activation checkpointing, compilation and FSDP2 to each.
    - :meth:`inference_modules`: name -> module that runs without gradients (an EMA teacher, a frozen
      teacher, a spare EMA of the student); compiled and sharded like the trainable ones.
    - :meth:`compute_losses` ``(batch, iteration, sched)`` -> :class:`LossOutput`; never calls backward.
      ``sched`` holds this iteration's value of every schedule (``lr``, ``wd``, ``momentum``, ...).
    - :meth:`after_step` ``(iteration, sched)``: after the optimiser step (an EMA update, or nothing).
    - :meth:`exports`: what snapshots write (:class:`Export`).
    - :meth:`frozen_modules`: names of inference modules left out of checkpoints (they never change).
    - :meth:`diagnose` ``(record, iteration)``: a one-line warning when a logged line shows a failing run
      (e.g. collapse), else None; the engine shows each kind once.

    ``initial_weights`` says where the weights of a new run come from when the task loaded files at construction
    (a later stage, pretrained students); the engine says it instead of "starting from scratch".
    """

    initial_weights: str = ""
    # what the engine advises when the loss stops being a number (the task's own setting names)
    divergence_fix: str = "lower optim.base_lr or raise train.batch_size_per_gpu"

    def trainable_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def inference_modules(self) -> dict[str, nn.Module]:
        return {}

    def frozen_modules(self) -> tuple[str, ...]:
        return ()

    def compute_losses(self, batch: Any, iteration: int, sched: Mapping[str, float]) -> LossOutput:
        raise NotImplementedError

    def after_step(self, iteration: int, sched: Mapping[str, float]) -> None:
        return None

    def exports(self) -> list[Export]:
        return []

    def diagnose(self, record: Mapping[str, float], iteration: int) -> str | None:
        return None

    def batch_size(self, batch: Any) -> int:
        """Images in this rank's batch (logged as ``current_batch_size``)."""
        return int(getattr(batch, "n_samples", 0) or len(batch))

    def train(self, mode: bool = True) -> "Task":
        super().train(mode)
        for module in self.inference_modules().values():
            module.eval()  # no dropout or drop path in teachers, whatever the task's mode
        return self

    def checkpointed(self) -> nn.ModuleDict:
        """The children that checkpoints hold: everything but the frozen modules (same names as in the task)."""
        frozen = set(self.frozen_modules())
        return nn.ModuleDict({name: child for name, child in self.named_children() if name not in frozen})
