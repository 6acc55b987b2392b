"""Writing files so that a crash, a full disk or a denied folder never leaves a half-written file behind, and
reading the NumPy files a user may hand in without ever unpickling them.

Every file dinokit writes (checkpoints, weights, embeddings, results, figures) goes through :func:`atomic_write`:
the data lands in a hidden temporary file beside the target, which then replaces the target in one step. A failed
write is one line that says why (no space on which disk, permission denied) and what was kept.
"""

from __future__ import annotations

import errno as errno_codes
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import DinokitError


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    A crash or an exception leaves no half-written file behind (and any old file untouched).
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.touch()  # a folder that cannot be written fails here, as an OSError that says why (torch's would not)
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if (errno := _write_errno(err)) is None:
            raise
        kept = "the previous file is intact" if path.exists() else "nothing else was changed"
        reason = f"no space left on {_mount_point(path)}" if errno == 28 else os.strerror(errno).lower()
        fix = ("write to a folder you may write to" if errno in _NOT_ALLOWED else
               "free some space (or use another disk) and rerun")
        raise DinokitError(f"{reason} while writing {path}; the partial file was removed and {kept}: {fix}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _mount_point(path: Path) -> str:
    """The mount point (the disk) that holds ``path``."""
    folder = path.resolve().parent
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return str(folder)


_NOT_ALLOWED = (errno_codes.EACCES, errno_codes.EPERM, errno_codes.EROFS)


def _write_errno(err: BaseException) -> int | None:
    """ENOSPC, EDQUOT, EIO, EROFS, EACCES or EPERM behind a failed write (torch wraps them in a RuntimeError), else
    None."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT, errno_codes.EIO,
                                                      *_NOT_ALLOWED):
            return err.errno
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def read_npy(path: str | Path, what: str, fix: str | None = None) -> Any:
    """Read the NumPy ``.npy`` file ``path`` (never unpickling); one line naming ``what`` (e.g. "class mapping
    'm.npy'") and ``fix`` when it is missing, not a ``.npy`` file, cut short, or an array of Python objects."""
    import numpy as np

    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise DinokitError(f"{what} is not a NumPy .npy file; {fix or 'save one with numpy.save'}")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except OSError as err:
        raise DinokitError(f"{what} cannot be read ({err.strerror or type(err).__name__}); "
                           f"{fix or 'check the path'}") from None
    except (ValueError, EOFError) as err:
        why = ("holds Python objects, which are not unpickled" if "allow_pickle" in str(err) else
               "is cut short or damaged")
        raise DinokitError(f"{what} {why}; {fix or 'save a numeric array with numpy.save'}") from None


LOCK_NAME = ".dinokit.lock"  # the lock file inside an output folder (run folder, shard folder, curate work folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def take_lock(lock: Path, target: str | Path, option: str = "--output-dir") -> Path:
    """Create the lock file ``lock`` (host and process id) for writing ``target`` (given by ``option``), or stop
    with one line when a live process holds it; a lock left by a killed process is taken over. The caller
    deletes the returned lock when done (see :func:`holding_lock`)."""
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
                owner_alive = host != socket.gethostname() or _alive(int(pid))
            except (OSError, ValueError):
                host, pid, owner_alive = "?", "?", False  # torn or vanished lock: a killed run's
            if owner_alive:
                raise DinokitError(
                    f"another run (process {pid} on {host}) is writing to {target}; wait for it to end or give "
                    f"another {option} (if that process is gone, delete {lock})"
                ) from None
            lock.unlink(missing_ok=True)  # left by a killed run
            continue
        except PermissionError:
            raise DinokitError(f"{option} {str(target)!r} is not writable; give a folder you can write to") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return lock
    raise DinokitError(f"cannot take the lock {lock}; delete it if no run is writing to {target}")


@contextmanager
def holding_lock(lock: str | Path, target: str | Path, option: str = "--out") -> Iterator[Path]:
    """Hold :func:`take_lock`'s lock for the ``with`` block; two commands writing the same output would otherwise
    both report success with one's work lost."""
    lock = Path(lock)
    held = take_lock(lock, target, option)
    try:
        yield held
    finally:
        held.unlink(missing_ok=True)
