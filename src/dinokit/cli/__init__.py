"""The ``dinokit`` command line: one sub-command per job, each in its own module.

Each module ``dinokit.cli.<name>`` exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit status. User errors
(:class:`dinokit.errors.DinokitError`, and file-system errors about a path) are printed as one line,
without a traceback. Each kind of warning is shown once per command and counted in a line at its end
(:mod:`dinokit.warning_summary`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import signal
import sys
import threading
import time
from collections.abc import Iterator

from ..errors import DinokitError, ProcessSpecificError, RelayedError
from ..warning_summary import summarised_warnings

# Listed first in ``dinokit --help``, in this order; any other module of this package that defines
# ``register`` is a sub-command too (so a new command is one new file).
_ORDER = ("models", "embed", "train", "distill", "eval", "dense", "viz", "curate", "convert", "export", "plot",
          "data", "demo")


def _command_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return [n for n in _ORDER if n in found] + sorted(found - set(_ORDER))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinokit", description="DINOv2 backbones, pretraining and evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _command_modules():
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


command_running = False  # while main runs a command (read by the engine's stop: engine/interrupts.py)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. A process that joined a ``torchrun``/SLURM group ends here instead of
    returning (:func:`dinokit.distributed.end_process`)."""
    guard = sys.modules.get("dinokit.engine.interrupts")  # loaded by the commands that train
    if guard is not None:
        guard.InterruptGuard.last_stop = None  # a stop of a run before this command (Python API) is not its own
    global command_running
    try:
        from .. import distributed

        command_running = True  # a stopped run's signal is handed over below, once the command said what it kept
        with _guarded_stdout():
            code = _run(argv)
    except KeyboardInterrupt:  # while torch and the commands load, before a command runs (it says what it kept)
        print("interrupted", file=sys.stderr)
        return 130
    except StdoutFailed as err:
        code = err.code
    finally:
        command_running = False
    guard = sys.modules.get("dinokit.engine.interrupts")
    if guard is not None:
        # a run stopped by SLURM's signal, its checkpoint saved: the program's own handler of it (submitit's
        # requeue in a --nodes job) gets it now, before a process of a group ends below without returning
        guard.InterruptGuard.hand_over()
    if distributed.joined_group():
        distributed.end_process(code)
    return code


class StdoutFailed(Exception):
    """Standard output could not be written: the reader went away (``| head``: exit status 141, as a shell reports
    SIGPIPE, silently) or the file it goes to failed (``> /dev/full``: one line on standard error, exit status 2)."""

    def __init__(self, err: OSError) -> None:
        super().__init__(err.strerror or str(err))
        self.code = 141 if isinstance(err, BrokenPipeError) else 2


class _Stdout:
    """``sys.stdout`` whose write errors raise :class:`StdoutFailed`, so that they are told apart from the errors of
    the files a command writes (an OSError without a file name is otherwise a real failure with its traceback)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            raise StdoutFailed(err) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            raise StdoutFailed(err) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _guarded_stdout() -> Iterator[None]:
    """Run a command with :class:`_Stdout` in place, its output flushed before the command ends. A failed output is
    one line (a traceback, or Python's exit status 120 at its last flush, before); the failed write drops what was
    buffered, so the interpreter's own last flush has nothing left to fail on. The caller's standard output is left
    as it was (``main`` used as a library goes on printing to it)."""
    stream = sys.stdout
    if stream is None:  # pythonw, or a closed descriptor 1
        yield
        return
    sys.stdout = _Stdout(stream)
    try:
        try:
            yield
        finally:
            if sys.stdout.__class__ is _Stdout:
                sys.stdout.flush()
    except StdoutFailed as err:
        if err.code != 141:
            print(f"error: standard output could not be written: {err} (free space where it goes, or send it "
                  "elsewhere)", file=sys.stderr)
        raise
    finally:
        sys.stdout = stream


def add_overrides(parser: argparse.ArgumentParser, dest: str, help: str) -> None:
    """The command's ``KEY=VALUE`` settings, given anywhere on its line: before, between or after its options (argparse
    alone takes only the first run of them and refuses the rest)."""
    parser.add_argument(dest, nargs="*", metavar="KEY=VALUE", help=help)
    parser.set_defaults(_overrides=dest)


def named(text: str) -> str:
    """An argparse ``type`` for a name or path that must not be empty (a quoted empty shell variable): an empty
    ``--config-file`` silently meant another model."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a preset name or a file, or leave the option out")
    return text


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that KEY=VALUE words after the command's options join its settings."""
    args, extra = parser.parse_known_args(argv)
    dest = getattr(args, "_overrides", None)
    if extra and dest and all("=" in a and not a.startswith("-") for a in extra):
        setattr(args, dest, [*(getattr(args, dest) or []), *extra])  # in the order given: a later value wins
    elif extra:  # said with the usage of the command given (e.g. 'dinokit eval knn'), not the top-level one
        _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    for name, value in vars(args).items():  # '--output-dir=~/run': the shell leaves '~' after '=' to the command
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list) and any(isinstance(v, str) and v.startswith("~") for v in value):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v
                                 for v in value])
    return args


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost sub-command's parser that ``args`` went through."""
    while True:
        found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, found[0].dest, None) if found else None
        if name not in (found[0].choices if found else {}):
            return parser
        parser = found[0].choices[name]


# Commands that work in one process: launched as several (torchrun, srun), the first does the job and the others end
# at once, instead of each repeating it and writing the same files.
ONE_PROCESS_COMMANDS = ("models", "convert", "export", "plot", "data", "viz")


def _run(argv: list[str] | None) -> int:
    from .. import distributed

    parser = build_parser()
    args = parse_command_line(parser, argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # what a SLURM job reruns (distributed.slurm)
    try:
        launched = distributed.launched_processes()  # a launcher variable that is not a number: one line
        if args.command in ONE_PROCESS_COMMANDS and launched > 1:
            if not distributed.is_first_process():
                return 0
            print(f"note: '{args.command}' works in one process; the other {launched - 1} launched process(es) did "
                  "nothing", flush=True)
        from ..models.weight_files import COMMAND_LINE

        command_line = COMMAND_LINE.set(True)  # a failed download advises the command's options, not Python's
        try:
            with summarised_warnings(), _sigterm_as_interrupt(launched):  # a repeated warning: once, counted at the end
                return int(args.func(args) or 0)
        finally:
            COMMAND_LINE.reset(command_line)
    except DinokitError as err:  # a RelayedError is the main process's, which prints it
        _report(f"error: {err}", own=isinstance(err, ProcessSpecificError), silent=isinstance(err, RelayedError))
        return 2
    except OSError as err:
        if err.filename is None:  # not about a path the user gave: a real failure, keep the traceback
            raise
        _report(f"error: {err.strerror}: '{err.filename}' (check the path and its permissions)")
        return 2
    except KeyboardInterrupt as err:  # a training run says what it kept and how to resume (the first process)
        if isinstance(err, Terminated):
            if err.args[0]:  # not a launcher's (silent)
                print(err.args[0], file=sys.stderr)
            return 128 + err.signum
        if not distributed.joined_group() or distributed.is_main_process():
            print(str(err) or "interrupted", file=sys.stderr)
        return 130


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGUSR1/SIGUSR2), raised where the command is: it ends as a Ctrl-C does (a KeyboardInterrupt,
    which data-loader workers also take as the sign to end quietly), with exit status 128 + ``signum``."""

    def __init__(self, message: str = "", signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)


@contextlib.contextmanager
def _sigterm_as_interrupt(launched: int) -> Iterator[None]:
    """While a command runs, SIGTERM (``timeout``, ``kill``, a scheduler's time limit) stops it as Ctrl-C does: its
    locks released, its temporary files removed, one line, exit status 143. Python's default died at once and left
    them (a stale lock is taken over, but temporary files stayed). Training runs catch it themselves to save a
    checkpoint first. Under a launcher, which sends SIGTERM to the other processes when one failed, they stop
    silently. The same stop signalled again within a moment (to the process and to its group) is ignored: the
    first one's clean-up goes on (a traceback in it said nothing); a later one stops again (a stop raised where
    Python discards it, in a finaliser, left the command running)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopped_at: list[float] = []

    def stop(signum, frame) -> None:
        if stopped_at and time.monotonic() - stopped_at[0] < SIGTERM_REPEAT_S:
            return
        stopped_at[:] = [time.monotonic()]
        # under a launcher, its SIGTERM to the others after one failed is silent; SLURM's SIGUSR1/2 reach every
        # process of the job alike: the first says it (every one was silent)
        first = (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0"
        quiet = launched > 1 and (signum == signal.SIGTERM or not first)
        raise Terminated("" if quiet else f"stopped by {signal.Signals(signum).name}", signum)

    # SLURM's --signal=USR1@SECONDS (or USR2) killed a command at once, its lock left (a requeued job on another
    # node was refused); taken like SIGTERM unless the program handles it (submitit's requeue)
    signals = [signal.SIGTERM, *(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2") if hasattr(signal, name)
                                 and signal.getsignal(getattr(signal, name)) is signal.SIG_DFL)]
    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# A SIGTERM this soon after the one that stops a command is the same stop, signalled twice.
SIGTERM_REPEAT_S = 2.0

# A rank that stays silent about an error waits this long before it exits: the launcher stops every rank when the
# first one fails, and the rank that prints the line must not be stopped before it has.
SILENT_RANK_EXIT_DELAY_S = 5.0


def _report(line: str, *, own: bool = False, silent: bool = False) -> None:
    """Print a user error, once per node under a launcher (:func:`dinokit.distributed.reports_user_errors`), or by
    this process whatever its rank when the error is its ``own`` (:class:`dinokit.errors.ProcessSpecificError`).

    After joining the group an error may be one process's alone (a file it could not read), or every process's (a
    missing dataset all read alike): a process other than the first says it after the delay, by which time the
    launcher has stopped it if the first process failed too (then the first one's line is the only one)."""
    from ..distributed import get_rank, joined_group, reports_user_errors

    if silent or not (own or reports_user_errors()):
        time.sleep(SILENT_RANK_EXIT_DELAY_S)
        return
    if not own and joined_group() and get_rank() > 0:
        time.sleep(SILENT_RANK_EXIT_DELAY_S)
    print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
