"""Device selection shared by every command (``auto`` means this rank's CUDA device when there is one, else the
CPU), moving a batch onto it, and the CPU cores its data-loading workers may use."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from . import distributed as du
from .errors import DinokitError


def check_device_name(name: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, else one line (whether the GPU exists is not checked: a command
    submitted to SLURM checks the name on a host that may have none)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DinokitError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


def usable_device(device: torch.device | str, argument: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, checked for the Python functions that take one: a CUDA device where there is
    no GPU is one line naming ``argument`` (torch's own said "Found no NVIDIA driver" from deep in a model move)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DinokitError(f"{argument}={device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):  # mps, meta...: tracebacks from deep in the work
        raise DinokitError(f"{argument}={str(device)!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DinokitError(f"{argument}={str(device)!r} was asked for but no CUDA GPU is available; "
                           f"use {argument}='cpu'")
    return device


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a device; a bare ``cuda`` is this rank's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    check_device_name(name)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DinokitError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", du.get_local_rank())
    return device


DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str = "cpu", *, key: str = "--dtype") -> torch.dtype:
    """The compute (autocast) dtype: ``auto`` = bf16 on CUDA (fp16 where bf16 is missing), fp32 on the CPU.

    A torch dtype passes through and None means fp32; ``float32`` means "no autocast" to every consumer.
    bf16 rather than the official fp16 by default: it cannot overflow. ``key`` names the setting in errors.
    """
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise DinokitError(f"{key} is {name!r}; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one: a SLURM or container
    limit, ``taskset``), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """Data-loading workers when the user names none: 4, or fewer where fewer cores may be used."""
    return min(4, usable_cores())


def usable_workers(requested: int, *, key: str) -> int:
    """``requested`` data-loading workers, at most :func:`usable_cores` (one line, naming ``key``, when lowered):
    the official presets ask for 10, and on a laptop more workers than cores only compete for them (torch
    warns). What a batch holds never depends on the number of workers."""
    cores = usable_cores()
    if requested <= cores:
        return requested
    if du.is_main_process():
        print(f"note: {key}={requested} is more than the {cores} CPU core(s) this process may use: "
              f"{cores} data-loading worker(s)")
    return cores


def batch_to(batch: Any, device: torch.device) -> Any:
    """A dataclass batch (or a dict/tuple of tensors) with its tensors on ``device``; any other object with a
    ``to`` method (e.g. a batch whose crops are made on the device) moves itself."""
    move = lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v  # noqa: E731
    if not dataclasses.is_dataclass(batch) and not isinstance(batch, (dict, tuple, list)) and hasattr(batch, "to"):
        return batch.to(device, non_blocking=True)
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)})
    if isinstance(batch, dict):
        return {k: move(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move(v) for v in batch)
    return move(batch)
