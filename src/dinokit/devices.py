"""Device selection shared by every command: ``auto`` means this rank's CUDA device when there is one, else the CPU."""

from __future__ import annotations

import torch

from . import distributed as du
from .errors import DinokitError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a device; a bare ``cuda`` is this rank's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DinokitError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DinokitError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", du.get_local_rank())
    elif device.type != "cpu":
        raise DinokitError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return device
