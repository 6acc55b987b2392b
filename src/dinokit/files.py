"""Writing files so that a crash, a full disk or a denied folder never leaves a half-written file behind, and
reading the NumPy files a user may hand in without ever unpickling them.

Every file dinokit writes (checkpoints, weights, embeddings, results, figures) goes through :func:`atomic_write`:
the data lands in a hidden temporary file beside the target, which then replaces the target in one step. A failed
write is one line that says why (no space on which disk, permission denied) and what was kept.
"""

from __future__ import annotations

import errno as errno_codes
import hashlib
import os
import re
import shutil
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
    if path.is_symlink():  # the link names the file to write: that file is replaced, the link kept
        path = resolve_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temporary_name(path.name))
    try:
        tmp.touch()  # a folder that cannot be written fails here, as an OSError that says why (torch's would not)
        # the mode an output gets: the one of the file it replaces, else the folder's default (umask); some writers
        # (safetensors) make their file 0600, which other users of a shared machine could not read
        mode = (path.stat() if path.exists() else tmp.stat()).st_mode & 0o777
        yield tmp
        if tmp.stat().st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except DinokitError:  # a line of its own (an inner write's, naming its file): as it is
        raise
    except Exception as err:  # noqa: BLE001 (re-raised unless a full disk or a denied write is behind it)
        if (errno := _write_errno(err)) is None and not (_says_write_failed(err) and _disk_full(path.parent)):
            raise
        errno = errno or errno_codes.ENOSPC  # torch, NumPy and safetensors may fail with no errno to tell
        kept = "the previous file is intact" if path.exists() else "nothing else was changed"
        reason = f"no space left on {_mount_point(path)}" if errno == 28 else os.strerror(errno).lower()
        fix = ("write to a folder you may write to" if errno in _NOT_ALLOWED else
               "free some space (or use another disk) and rerun")
        release(tmp)
        partial = "the partial file was removed" if not tmp.exists() else f"the partial file {tmp} could not be removed"
        raise DinokitError(f"{reason} while writing {path}; {partial} and {kept}: {fix}") from None
    finally:
        release(tmp)


def resolve_link(path: Path) -> Path:
    """The file the symbolic link ``path`` names; one line when the link loops."""
    try:
        resolved, loops = path.resolve(), False
    except (RuntimeError, OSError):  # Python 3.11, 3.12: RuntimeError("Symlink loop ...")
        loops = True
    if not loops:
        try:
            os.stat(path)
        except OSError as err:  # Python 3.13 resolves a loop without a word
            loops = err.errno == errno_codes.ELOOP
    if loops:
        what = "is a symbolic link" if path.is_symlink() else "goes through a symbolic link"
        raise DinokitError(f"{str(path)!r} {what} that loops (it leads back to itself); remove it or give another "
                           "path") from None
    return resolved


def release(path: Path) -> None:
    """Delete a lock or temporary file of this process's, if it can be: in a folder made read-only meanwhile, the
    error that stopped the work is the one to say (it was replaced by this one's), and the lock left behind is taken
    over by the next command of this host (its process is gone)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def temporary_name(name: str) -> str:
    """The hidden name ``.NAME.tmp-PID`` of the temporary file of ``name`` (see :func:`hidden_name`)."""
    return hidden_name(name, f".tmp-{os.getpid()}")


def hidden_name(name: str, suffix: str, prefix: str = ".") -> str:
    """``prefix + name + suffix`` (a temporary file, a lock beside ``name``), ``name`` shortened by
    :func:`fitting_name` so that the result fits the 255 bytes a file name may have (a legal long name failed)."""
    room = 255 - len(os.fsencode(f"{prefix}{suffix}"))
    return f"{prefix}{fitting_name(name, room)}{suffix}"


def fitting_name(name: str, limit: int) -> str:
    """``name`` when its bytes on the file system are at most ``limit``, else its first bytes (not cutting a UTF-8
    character), ``~`` and a digest of it in ``limit`` bytes: names derived from a long one stay within the file
    system's limit and apart from one another. Decoded as the file system decodes names: under an ASCII locale a
    fixed UTF-8 gave a name it could not encode (a traceback)."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:12]
    cut = limit - len(digest) - 1
    while cut > 0 and raw[cut] & 0xC0 == 0x80:  # a continuation byte: the cut would split a character
        cut -= 1
    return f"{os.fsdecode(raw[:cut])}~{digest}"


# what the writers that give no errno say of a write cut short (torch: "unexpected pos", "iostream error"; NumPy's
# tofile: "N requested and M written"; safetensors: "I/O error: No space left on device (os error 28)")
_WRITE_FAILED = re.compile(r"unexpected pos|iostream|requested and \d+ written|i/o error|no space|os error 28",
                           re.IGNORECASE)


def _says_write_failed(err: BaseException) -> bool:
    """Whether ``err`` reads as a write cut short (a KeyError or an unrelated ValueError never does)."""
    if not _WRITE_FAILED.search(str(err)):
        return False
    return isinstance(err, (OSError, RuntimeError, ValueError)) or type(err).__name__ == "SafetensorError"


def _disk_full(folder: Path) -> bool:
    """Whether the disk of ``folder`` has (almost) no space left: a failed write there was most likely for that."""
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


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
        # the exception it was raised from; the one it was raised while handling only unless that was suppressed
        err, seen = err.__cause__ or (None if err.__suppress_context__ else err.__context__), seen + 1
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
    except (ProcessLookupError, OverflowError, ValueError):  # gone, or no process could have that number
        return False
    except PermissionError:
        return True
    return True


_TEMPORARY = re.compile(r"\..+\.tmp-(\d+)")  # atomic_write's .NAME.tmp-PID


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`atomic_write` (``.NAME.tmp-PID``)."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_stale_temporaries(folder: Path, pattern: str = "**/.*.tmp-*") -> None:
    """Delete the temporary files of :func:`atomic_write` that a killed process left in ``folder`` (matching the glob
    ``pattern``); those of a live process of this host are kept (it is still writing them). Half-written files of
    killed runs otherwise stayed forever, hidden, some as large as a feature cache."""
    for path in folder.glob(pattern):
        match = _TEMPORARY.fullmatch(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def lock_holder(lock: Path) -> tuple[str, str, bool] | None:
    """(host, process id, alive) of the process holding ``lock``, None when there is no lock; a process of another
    host counts as alive (it cannot be checked from here)."""
    held = _holder(lock)
    return None if held is None else held[:3]


def _holder(lock: Path) -> tuple[str, str, bool, bytes] | None:
    """(host, pid, alive, the file's bytes) of the process named in ``lock``; None when the lock is gone. A lock that
    names no process (empty, garbage: dinokit writes it whole) counts as a killed run's."""
    try:
        raw = lock.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise DinokitError(f"the lock {lock} is a folder, not a dinokit lock file; remove it if no run is writing "
                           "there") from None
    except PermissionError:  # another user's (umask 077): its process cannot be told dead, so it is not taken over
        raise DinokitError(f"the lock {lock} cannot be read (permission denied): another user's run may be writing "
                           "there; wait for it to end, or ask its owner (or delete the lock if no run is)") from None
    except OSError:
        return "?", "?", False, b""
    try:
        host, pid = raw.decode().split()
        return host, pid, host != socket.gethostname() or _alive(int(pid)), raw
    except (ValueError, UnicodeDecodeError):
        return "?", "?", False, raw


def take_lock(lock: Path, target: str | Path, option: str = "--output-dir") -> Path:
    """Create the lock file ``lock`` (host and process id) for writing ``target`` (given by ``option``), or stop
    with one line when a live process holds it; a lock left by a killed process is taken over. The caller
    deletes the returned lock when done (see :func:`dinokit.engine.run_dir.main_process_lock`).

    The lock appears whole in one step (written aside, then hard-linked into place: a link never replaces a file),
    so no process reads a live lock half-written; a killed run's lock is first renamed aside, and only the process
    whose rename took that very lock (same content) deletes it: two processes taking over one stale lock cannot
    both end up holding the new one."""
    me = f"{socket.gethostname()} {os.getpid()}"
    mine = lock.with_name(hidden_name(lock.name, f".{os.getpid()}.new", prefix=""))
    try:
        try:
            mine.write_text(me)
        except (IsADirectoryError, PermissionError):
            raise DinokitError(f"{option} {str(target)!r} is not writable; give a folder you can write to") from None
        except OSError as err:  # a full disk, a read-only file system: one line, and no half-made lock left
            reason = (f"no space left on {_mount_point(lock)}" if err.errno == errno_codes.ENOSPC else
                      (err.strerror or type(err).__name__).lower())
            raise DinokitError(f"{reason} while taking the lock {lock} for {option} {str(target)!r}; nothing was "
                               "written: free some space or give another path") from None
        for _ in range(5):
            try:
                _place(mine, lock, me)
                return lock
            except FileExistsError:
                pass
            holder = _holder(lock)
            if holder is None:
                continue  # released meanwhile
            host, pid, alive, raw = holder
            if alive:
                raise DinokitError(
                    f"another run (process {pid} on {host}) is writing to {target}; wait for it to end or give "
                    f"another {option} (if that process is gone, delete {lock})"
                ) from None
            _remove_stale(lock, raw)
        raise DinokitError(f"cannot take the lock {lock}; delete it if no run is writing to {target}")
    finally:
        mine.unlink(missing_ok=True)


def _place(mine: Path, lock: Path, me: str) -> None:
    """``lock`` made from the written ``mine`` in one step (FileExistsError when there is one); where the file system
    has no hard links, created exclusively and written at once."""
    try:
        os.link(mine, lock)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network or FUSE file systems)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(me)


def _remove_stale(lock: Path, seen: bytes) -> None:
    """Delete the killed run's ``lock`` (whose bytes were ``seen``), unless another process replaced it meanwhile."""
    aside = lock.with_name(hidden_name(lock.name, f".{os.getpid()}.stale", prefix=""))
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another process took it over first
    try:
        taken = aside.read_bytes()
    except OSError:
        taken = None
    if taken != seen:  # a live lock made in between: put it back (a link: never over a newer one)
        try:
            os.link(aside, lock)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)
