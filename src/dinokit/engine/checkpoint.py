"""Resumable training checkpoints: portable across process counts, written atomically.

A checkpoint is one file, ``DIR/checkpoints/checkpoint_<iteration>.pth``, holding full (unsharded)
state dicts gathered with ``torch.distributed.checkpoint.state_dict`` (so a run saved on 8 GPUs
resumes on 1 GPU or on a CPU), the optimiser state keyed by parameter name, the iteration, and the
RNG states of every rank. It is written to a temporary name and renamed, so a kill during the write
never leaves a file that looks valid. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .. import distributed as dist_utils
from ..errors import DinokitError
from ..models.checkpoint import atomic_write

_NAME = re.compile(r"checkpoint_(\d{7,})\.pth$")


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, flushed to disk, then renamed over ``path``."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


class Checkpointer:
    """Saves and restores (model, optimizer, iteration, RNG) under ``directory``."""

    def __init__(self, directory: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: int = 3):
        self.directory = Path(directory)
        self.model = model
        self.optimizer = optimizer
        self.keep = keep
        self._options = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def save(self, iteration: int, **extra) -> Path:
        """Save the state *after* ``iteration`` steps (collective: every rank must call it)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options)
        rngs = dist_utils.all_gather_object(_rng_state())
        path = self.directory / f"checkpoint_{iteration:07d}.pth"
        if dist_utils.is_main_process():
            state = {
                "model": model_sd,
                "optimizer": optim_sd,
                "iteration": iteration,
                "world_size": dist_utils.get_world_size(),
                "rng": rngs,
                **extra,
            }
            atomic_torch_save(state, path)
            for _, old in list_checkpoints(self.directory)[: -self.keep]:
                old.unlink(missing_ok=True)
        dist_utils.barrier()
        return path

    def latest(self) -> tuple[int, Path] | None:
        found = list_checkpoints(self.directory)
        return found[-1] if found else None

    def load(self, path: Path) -> dict:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file
            raise DinokitError(f"cannot read checkpoint {str(path)!r} ({type(err).__name__}); delete it or pass --no-resume") from None
        # Every rank holds the full state dict; each keeps its own shard.
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        rngs = state.get("rng") or []
        rank = dist_utils.get_rank()
        if state.get("world_size") == dist_utils.get_world_size() and rank < len(rngs):
            torch.set_rng_state(rngs[rank]["cpu"])
            if "cuda" in rngs[rank] and torch.cuda.is_available():
                torch.cuda.set_rng_state(rngs[rank]["cuda"])
        return state

    def resume(self) -> dict | None:
        """Load the newest readable checkpoint, falling back to older ones; None when there is none."""
        for iteration, path in reversed(list_checkpoints(self.directory)):
            try:
                return self.load(path)
            except DinokitError as err:
                warnings.warn(f"{err}; trying an older checkpoint", stacklevel=2)
        return None
