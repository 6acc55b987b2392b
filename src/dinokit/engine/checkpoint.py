"""Resumable training checkpoints: written atomically, loadable on any number of processes.

One process writes one portable file, ``DIR/checkpoint_<iteration>.pth``: full state dicts of the
checkpointed modules, the optimiser state keyed by parameter name, the iteration (the data position:
the data stream is seeded by iteration) and the RNG states. Several processes (FSDP2) write a folder
``DIR/checkpoint_<iteration>/`` with ``torch.distributed.checkpoint``: each rank saves and later loads
only its own shards, and the folder reloads on a different number of ranks, or in one process. Both
are written under a temporary name and renamed, so a kill during the write never leaves something
that looks valid; leftovers of such a kill are removed at the next start. Only the newest ``keep``
checkpoints are kept.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .. import distributed as dist_utils
from ..errors import DinokitError
from ..files import atomic_write
from ..models.weight_files import refused_object

_NAME = re.compile(r"checkpoint_(\d{7,})(\.pth)?$")
_META = "meta.pt"  # in a sharded folder: iteration, world size and every rank's RNG state


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, flushed to disk, then renamed over ``path``."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _cpu_threads(model: nn.Module) -> int | None:
    """The intra-op threads of a model that computes on the CPU (their number sets the order of its sums); None on
    an accelerator."""
    param = next(model.parameters(), None)
    return torch.get_num_threads() if param is not None and param.device.type == "cpu" else None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def fill_missing_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give AdamW's fresh state (step 0, zero moments) to trainable parameters that had no gradient yet.

    A frozen phase (e.g. the backbone during a head warm-up) leaves parameters without optimizer state,
    which checkpoints must still hold to load strictly; AdamW treats the filled state exactly as the
    state it would create at the parameter's first gradient.
    """
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if p.requires_grad and not optimizer.state.get(p):
                optimizer.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the finished checkpoints in ``directory``, oldest first (files and folders)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def _file_damage(path: Path) -> str | None:
    """Why the ``torch.save`` file ``path`` cannot be whole, found without reading it (None: it may be)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return f"unreadable ({err.strerror or type(err).__name__})"
    if size == 0:
        return "an empty file"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # a torch.save archive without its end record
        return "corrupt or truncated"
    return None


def checkpoint_damage(path: Path) -> str | None:
    """Why the checkpoint ``path`` (file or sharded folder) is unusable, found by a cheap look at its structure
    (an empty file, an archive cut short, a folder without its metadata); None when it may be whole."""
    if path.is_dir():
        return "incomplete (no meta.pt)" if not (path / _META).is_file() else _file_damage(path / _META)
    return _file_damage(path)


OTHER_MODEL = "not readable as a checkpoint of this model"  # a training checkpoint of another model (or a torn folder)


def no_readable_checkpoint(directory: Path, damaged: list[tuple[Path, str]]) -> DinokitError:
    """The refusal to start over in a run folder whose checkpoints (``(path, reason)``, newest first) all fail."""
    what = "; ".join(f"{p.name} is {reason}" for p, reason in damaged)
    them = "it" if len(damaged) == 1 else "them"
    if all(reason == OTHER_MODEL for _, reason in damaged):  # whole files of another model: nothing to delete
        return DinokitError(
            f"no checkpoint in {directory} fits the model these settings build ({what}); rerun with the settings the "
            "run was started with, or give a new --output-dir to start a new run")
    return DinokitError(
        f"no readable checkpoint in {directory} ({what}); delete {them} to restart this run from scratch, or give "
        "a new --output-dir"
    )


class UnreadableCheckpoint(DinokitError):
    """A checkpoint that could not be restored; ``reason`` says why ("corrupt or truncated", "an empty file"...)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read checkpoint {str(path)!r}: it is {reason}")
        self.path, self.reason = path, reason


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _checkpoint_exception() -> type[BaseException]:
    """torch.distributed.checkpoint's own error (a BaseException: ``except Exception`` misses it)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


# what a sharded checkpoint's .metadata may name: torch.distributed.checkpoint's records, dtypes, sizes and paths
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
                   ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                   ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = module in _METADATA_MODULES or (module, name) in _METADATA_NAMES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def check_sharded_metadata(path: Path) -> None:
    """Refuse a sharded checkpoint folder whose ``.metadata`` (which torch.distributed.checkpoint unpickles without
    restriction) names anything but its own records: a crafted file would run code when the run resumes."""
    try:
        with open(path / ".metadata", "rb") as f:
            _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise UnreadableCheckpoint(path, f"a sharded checkpoint whose .metadata names other Python objects ({err}), "
                                         "not unpickled") from None
    except Exception:
        raise UnreadableCheckpoint(path, "corrupt or truncated (its .metadata)") from None


class Checkpointer:
    """Saves and restores (model, optimizer, iteration, RNG, the fp16 loss scaler) under ``directory``."""

    def __init__(self, directory: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 keep: int = 3, scaler: torch.amp.GradScaler | None = None):
        self.directory = Path(directory)
        self.model = model
        self.optimizer = optimizer
        self.keep = keep
        self.scaler = scaler  # its scale and growth count: a resumed fp16 run started again from 65536

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, **extra) -> Path:
        """Save the state *after* ``iteration`` steps (collective: every rank must call it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # 0.5 s: when used

        rngs = dist_utils.all_gather_object(_rng_state())
        meta = {"iteration": iteration, "world_size": dist_utils.get_world_size(), "rng": rngs,
                "cpu_threads": _cpu_threads(self.model), **extra}
        if self.scaler is not None:
            meta["scaler"] = self.scaler.state_dict()
        fill_missing_optimizer_state(self.optimizer)
        if dist_utils.get_world_size() > 1:
            path = self._save_sharded(iteration, meta)
        else:
            path = self.directory / f"checkpoint_{iteration:07d}.pth"
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
            atomic_torch_save({"model": model_sd, "optimizer": optim_sd, **meta}, path)
        if dist_utils.is_main_process():
            for _, old in list_checkpoints(self.directory)[: -self.keep]:
                _remove(old)
        dist_utils.barrier()
        return path

    def _save_sharded(self, iteration: int, meta: dict) -> Path:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        import torch.distributed.checkpoint as dcp

        final = self.directory / f"checkpoint_{iteration:07d}"
        tmp = self.directory / f".checkpoint_{iteration:07d}.tmp"
        if dist_utils.is_main_process():
            _remove(tmp)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # this rank's shards (DTensors)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
        if dist_utils.is_main_process():
            torch.save(meta, tmp / _META)
            _remove(final)
            tmp.rename(final)
        dist_utils.barrier()
        return final

    def latest(self) -> tuple[int, Path] | None:
        found = list_checkpoints(self.directory)
        return found[-1] if found else None

    # ------------------------------------------------------------------ load
    def load(self, path: Path) -> dict:
        """Restore from a checkpoint file or sharded folder; returns its metadata (``iteration``...)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = Path(path)
        if (damage := checkpoint_damage(path)) is not None:
            raise UnreadableCheckpoint(path, damage)
        try:
            if path.is_dir():
                meta = self._load_sharded(path)
            else:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except DinokitError:
                    raise
                except Exception as err:  # a torn or foreign file
                    name = refused_object(err)
                    raise UnreadableCheckpoint(path, "corrupt or truncated" if name is None else
                                               f"a file of arbitrary Python objects ({name}), not unpickled") from None
                if not isinstance(state, dict) or not {"model", "optimizer"} <= state.keys():
                    raise UnreadableCheckpoint(path, "not a training checkpoint")
                set_state_dict(self.model, self.optimizer, model_state_dict=state.pop("model"),
                               optim_state_dict=state.pop("optimizer"), options=StateDictOptions(full_state_dict=True))
                meta = state
        except DinokitError:
            raise
        except (Exception, _checkpoint_exception()):  # readable, but not of this model (or a torn sharded folder)
            raise UnreadableCheckpoint(path, OTHER_MODEL) from None
        rngs = meta.get("rng") or []
        rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
        saved_world = meta.get("world_size")
        if saved_world is not None and saved_world != world and rank == 0:
            print(f"note: {path.name} was saved by {saved_world} process(es) and resumes in {world}: the total batch "
                  "(and the lr that follows it), the data order and the random streams differ from a run that was "
                  f"never stopped; resume in {saved_world} to continue it exactly")
        saved_threads, threads = meta.get("cpu_threads"), _cpu_threads(self.model)
        if saved_threads and threads and saved_threads != threads and rank == 0:
            print(f"note: {path.name} was saved computing on {saved_threads} CPU thread(s) and resumes on {threads}: "
                  "sums take another order, so the run no longer continues bit for bit; set "
                  f"OMP_NUM_THREADS={saved_threads} to continue it exactly")
        if self.scaler is not None and meta.get("scaler"):  # a checkpoint of an earlier version: the scale starts over
            self.scaler.load_state_dict(meta["scaler"])
        if saved_world == world and rank < len(rngs):
            torch.set_rng_state(rngs[rank]["cpu"])
            if "cuda" in rngs[rank] and torch.cuda.is_available():
                torch.cuda.set_rng_state(rngs[rank]["cuda"])
        return meta

    def _load_sharded(self, path: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        import torch.distributed.checkpoint as dcp

        meta = torch.load(path / _META, map_location="cpu", weights_only=True)
        check_sharded_metadata(path)  # torch reads .metadata with plain pickle: nothing else may be in it
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # the layout of this run: its shards only
        state = {"model": model_sd, "optimizer": optim_sd}
        with warnings.catch_warnings():  # one process reading a sharded checkpoint: torch says it assumes that
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.load(state, checkpoint_id=str(path))  # each rank reads the pieces of its own shards
            except (OSError, EOFError, _checkpoint_exception()) as err:  # a shard missing or cut short
                failures = [err, *(f[0] if isinstance(f, tuple) else f for f in getattr(err, "failures", {}).values())]
                if any(isinstance(f, (OSError, EOFError)) or "truncat" in str(f).lower() for f in failures):
                    raise UnreadableCheckpoint(path, "corrupt or truncated (a shard file)") from None
                raise
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return meta

    def resume(self) -> dict | None:
        """Load the newest readable checkpoint, falling back to older ones (with a one-line warning); None when
        there is none. Checkpoints that all fail stop the run: starting over would overwrite the run they hold."""
        self.remove_leftovers()
        damaged: list[tuple[Path, str]] = []
        for iteration, path in reversed(list_checkpoints(self.directory)):
            try:
                meta = self.load(path)
            except UnreadableCheckpoint as err:
                damaged.append((path, err.reason))
                continue
            if damaged and dist_utils.is_main_process():
                what = "; ".join(f"cannot read checkpoint {p}: it is {reason}" for p, reason in damaged)
                warnings.warn_explicit(  # one line, no source line
                    f"{what}; resuming from the older {path.name} (iteration {iteration})", UserWarning, "dinokit", 0)
            return meta
        if damaged:
            raise no_readable_checkpoint(self.directory, damaged)
        return None

    def remove_leftovers(self) -> None:
        """Delete half-written temporary checkpoints that a killed run left behind (main process)."""
        if dist_utils.is_main_process() and self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.startswith(".checkpoint_") and ".tmp" in path.name:
                    _remove(path)
        dist_utils.barrier()
