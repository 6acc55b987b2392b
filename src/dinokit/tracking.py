"""Experiment trackers: every metrics line of a run also goes to TensorBoard or Weights & Biases.

``make_tracker(kind, output_dir, config)`` returns an object with ``log(metrics, step)`` and ``close()``:

* ``tensorboard``: event files in ``OUTPUT_DIR/tensorboard`` (``tensorboard --logdir OUTPUT_DIR``);
* ``wandb``: a run whose files live in ``OUTPUT_DIR/wandb``; the usual environment variables apply
  (``WANDB_PROJECT``, default ``dinokit``; ``WANDB_MODE=offline`` to log without an account and
  ``wandb sync`` later);
* ``none``: nothing.

Both packages are optional (``pip install 'dinokit[tracking]'``) and imported only when asked for.
Only finite numbers are logged; the step is the training iteration. A resumed run (``start_step`` > 0) continues
the killed run's lines: TensorBoard drops the killed run's points from ``start_step`` on (``purge_step``; all of
them for a run started again from 0 in the same folder), and
Weights & Biases resumes the same run (its id is kept in ``OUTPUT_DIR/wandb/run-id``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Mapping, Protocol

from .errors import DinokitError

TRACKERS = ("none", "tensorboard", "wandb")


def check_tracker(kind: str) -> None:
    """One line if the package of tracker ``kind`` is missing: called before a run writes anything."""
    modules = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}
    try:
        if kind in modules:
            importlib.import_module(modules[kind])
    except ImportError:
        raise DinokitError(f"train.tracker={kind} needs {kind}: pip install 'dinokit[tracking]'") from None


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class NoTracker:
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """One scalar series per metric name, in ``OUTPUT_DIR/tensorboard``; the run config as a text entry."""

    def __init__(self, output_dir: str | Path, config: Mapping[str, Any] | None = None, start_step: int = 0) -> None:
        check_tracker("tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir = Path(output_dir) / "tensorboard"
        # the readers drop the points of a killed run at and after start_step, logged again now (all of them when it
        # starts again from 0: killed before its first checkpoint)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_step)
        if config and not start_step:
            text = json.dumps(dict(config), indent=2, default=str)
            self.writer.add_text("config", "```\n" + text + "\n```", global_step=0)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run named after the output folder, with the run config attached; a resumed training run
    (``start_step`` > 0) goes on in the W&B run of the killed one, whose id ``OUTPUT_DIR/wandb/run-id`` keeps."""

    def __init__(self, output_dir: str | Path, config: Mapping[str, Any] | None = None, start_step: int = 0) -> None:
        check_tracker("wandb")
        import wandb
        output_dir = Path(output_dir).resolve()
        id_file = output_dir / "wandb" / "run-id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(6)  # W&B run ids: lowercase letters and digits
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dinokit"),
            name=output_dir.name,
            dir=str(output_dir),
            id=run_id,
            resume="allow",
            config=dict(config) if config else None,
            reinit="finish_previous",
        )
        self.dir = Path(self.run.dir).parent  # OUTPUT_DIR/wandb/<run folder>
        # W&B keeps the first value logged at a step: the killed run's lines past the checkpoint stay (a resumed
        # run repeats them exactly), and a step below the run's own is not sent (W&B would warn at every line)
        self.first_step = int(self.run.step or 0) if self.run.resumed else 0

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if step >= self.first_step:
            self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def make_tracker(
    kind: str, output_dir: str | Path, config: Mapping[str, Any] | None = None, start_step: int = 0
) -> Tracker:
    """The tracker named ``kind`` (``none``, ``tensorboard`` or ``wandb``) writing under ``output_dir``;
    ``start_step`` > 0: a resumed run, whose lines from that step on replace the killed run's."""
    if kind in ("", "none"):
        return NoTracker()
    if kind == "tensorboard":
        return TensorBoardTracker(output_dir, config, start_step)
    if kind == "wandb":
        return WandbTracker(output_dir, config, start_step)
    raise DinokitError(f"unknown tracker {kind!r}; use train.tracker=none, tensorboard or wandb")
