"""Stopping a training run cleanly: the signals that ask for it (Ctrl-C, SIGTERM, SLURM's SIGUSR1/SIGUSR2), when
every process agrees to stop, and the line that says what was kept."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist_utils

# How long a process whose collective failed waits for the launcher's SIGTERM (another process ended) before it
# takes the failure as its own.
PEER_LOSS_WAIT_S = 5.0


class RunInterrupted(KeyboardInterrupt):
    """A signal (:attr:`InterruptGuard.SIGNALS`) stopped a run after it saved a checkpoint; the message says what was
    kept and how to resume."""


class InterruptGuard:
    """While active, SIGINT, SIGTERM, SIGUSR1 (what SLURM sends before pre-emption or the time limit with
    ``--signal=USR1@SECONDS``) and SIGUSR2 (the same, asked for by submitit for ``--nodes`` jobs) only set
    :attr:`requested` (a second signal acts as usual).

    The engine checks the flag after each step, saves a checkpoint and raises :class:`RunInterrupted`; then
    :meth:`hand_over` gives the signal to the handler the guard stood in for (submitit's requeue): at once under the
    Python API, after the command under the CLI (:func:`dinokit.cli.main`, while its ``command_running``).
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")
                    if hasattr(signal, name))
    _MEANING = {"SIGUSR1": "SIGUSR1 (SLURM pre-emption or time limit)",
                "SIGUSR2": "SIGUSR2 (SLURM pre-emption or time limit)"}
    last_stop: int | None = None  # the signal that stopped the last run of this process (for hand_over)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.requested = self._MEANING.get(name, name)
        InterruptGuard.last_stop = signum
        self._restore()  # a second Ctrl-C stops at once (checkpoints are written atomically)

    @staticmethod
    def hand_over() -> bool:
        """Signal this process again with the SIGUSR1/SIGUSR2 that stopped its last run, when a handler of the
        program's own takes it now (submitit's, which requeues the job: it was stood in for while the run saved
        its checkpoint, and a job stopped without it was never requeued). True when signalled."""
        sig, InterruptGuard.last_stop = InterruptGuard.last_stop, None
        if sig is None or signal.Signals(sig).name not in ("SIGUSR1", "SIGUSR2"):
            return False
        if not callable(handler := signal.getsignal(sig)) or handler is signal.default_int_handler:
            return False
        signal.raise_signal(sig)
        return True

    @staticmethod
    def hand_over_unless_cli() -> None:
        """:meth:`hand_over` now, unless dinokit's CLI runs this as a command: it hands over once the command has
        said what it kept (the flag is read from the CLI's module, if loaded: the CLI starts without torch)."""
        if not getattr(sys.modules.get("dinokit.cli"), "command_running", False):
            InterruptGuard.hand_over()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "InterruptGuard":
        InterruptGuard.last_stop = None  # a stop of an earlier run is not this one's to hand over
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def stop_requested(guard: InterruptGuard, window_end: bool, device: torch.device) -> bool:
    """Whether a signal asked to stop (every rank agrees, at logging windows, under torchrun)."""
    if dist_utils.get_world_size() == 1:
        return guard.requested is not None
    if not window_end:
        return False
    flag = torch.tensor([1.0 if guard.requested else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    guard.requested = guard.requested or ("SIGTERM" if flag.item() else None)
    return guard.requested is not None


def stopped_line(signal_name: str | None, completed: int, saved: int, max_iter: int, directory: Path,
                 can_save: bool = True) -> str:
    """What a stopped run kept: the checkpoint of ``completed`` iterations (just saved), or of ``saved`` when it
    could not save (``can_save`` False: another process ended)."""
    lost = ""
    if completed > saved and not can_save:
        lost = f"another process of the run ended, so the iterations after {saved} could not be saved; "
    last = completed if can_save else saved
    kept = lost + (f"checkpoint of iteration {last} kept in {directory}" if last > 0
                   else "no iteration was completed, nothing to keep" if completed == 0 else "nothing to keep")
    return f"stopped by {signal_name or 'a signal'} after iteration {completed} of {max_iter}: {kept}; rerun the " \
           "same command to resume"
