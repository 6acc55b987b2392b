"""The run folder of a training command: one run per folder, never mixed, never lost.

Every trainer (``dinokit train``, ``distill``, ``dense train``) opens its output folder with
:func:`open_run_dir` before writing anything. It checks, in this order, and stops with one line:

- the folder can be a folder and is writable;
- no other run is writing into it (a lock file, ``.dinokit.lock``, holding host and process id; a lock
  left by a killed process is taken over);
- starting again (``--no-resume``) in a folder that holds checkpoints is refused,
  since the two runs' checkpoints would interleave and a later start would "resume" the wrong one;
- resuming in a folder whose checkpoints are all unreadable (empty, cut short) is refused, since starting over
  would overwrite the run they hold;
- resuming a run started by an older dinokit whose recipe has changed since (a setting that came with the change
  is missing from the saved configuration) is refused;
- resuming with a configuration that differs from the saved one is refused, naming the differing keys
  (keys that may change between resumes, such as ``optim.epochs``, are only reported).

At each start, :func:`data_change_note` records what the run trains on (``data.json``) and says when a resumed
run's images or their decoding changed. The engine then uses :func:`check_disk_space` (and, from
``interrupts.py``, the guard that turns a signal into a checkpoint and one line on how to resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from .. import distributed as dist_utils
from ..config.paths import absolute_settings
from ..errors import DinokitError
from ..files import LOCK_NAME, hidden_name, release, remove_stale_temporaries, resolve_link, take_lock
from .checkpoint import checkpoint_damage, list_checkpoints, no_readable_checkpoint


# Keys of the training configuration that may change between two starts of one run: derived values
# (the lr follows the number of processes), the per-process batch (with the number of processes), the
# length of the run and of its warm-ups, how it is computed, and what is logged or evaluated.
RESUMABLE_CHANGES: tuple[str, ...] = (
    "train.output_dir", "train.num_workers", "train.log_freq", "train.tracker", "train.saveckp_freq",
    "train.batch_size_per_gpu", "train.compile", "train.activation_checkpointing",
    "train.activation_checkpointing_policy", "train.packed_crops",
    "train.head_chunk_rows", "train.compile_loss", "optim.lr", "optim.epochs",
    "optim.warmup_epochs", "teacher.warmup_teacher_temp_epochs", "MODEL.WEIGHTS", "evaluation", "compute_precision",
)


def flatten_settings(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"a.b": value}`` (an empty section is one entry of its own)."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten_settings(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _may_change(key: str, allowed: Sequence[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def _short(value: Any) -> str:
    """A saved or given value as the refusal shows it: text (paths, dataset strings: the fix may be to give the saved
    one back) in full up to 300 characters, lists and mappings up to 40."""
    text = json.dumps(value) if not isinstance(value, str) else value
    limit = 300 if isinstance(value, str) else 40
    return text if len(text) <= limit else text[:limit - 3] + "..."


def config_changes(saved: Mapping, current: Mapping, allowed: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between two configurations, as ``key (saved X, now Y)`` strings."""
    a, b = flatten_settings(saved), flatten_settings(current)
    refused, accepted = [], []
    for key in sorted(set(a) & set(b)):  # a key on one side only comes from another dinokit version: its default
        if a[key] != b[key]:
            text = f"{key} (saved {_short(a[key])}, now {_short(b[key])})"
            (accepted if _may_change(key, allowed) else refused).append(text)
    return refused, accepted


def _listing(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_writable(path: str | Path, option: str = "--output-dir", *, is_file: bool = False) -> Path:
    """Stop with one line, before any work and without writing anything, when the output ``path`` (a folder, or
    with ``is_file`` a file) cannot be written: a file where a folder is wanted, or a read-only folder (``path``'s
    own, or the nearest existing folder above it, where it would be created)."""
    target = Path(path).expanduser()
    resolve_link(target)  # a link that loops, on the path or above it: one line before any work (a traceback)
    if not is_file and target.exists() and not target.is_dir():
        raise DinokitError(f"{option} {str(path)!r} is a file, not a folder; give a folder path")
    if is_file and target.is_dir():
        raise DinokitError(f"{option} {str(path)!r} is a folder, not a file; give a file path")
    existing = target.parent if is_file else target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    kind = "path" if is_file else "folder"
    if not existing.is_dir():
        raise DinokitError(f"{option} {str(path)!r} cannot be created: {str(existing)!r} is a file; give a {kind} "
                           "you can write to")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == target:
            raise DinokitError(f"{option} {str(path)!r} is not writable; give a folder you can write to")
        raise DinokitError(f"{option} {str(path)!r} cannot be written: {str(existing)!r} is not writable; give a "
                           f"{kind} you can write to")
    return target


def check_not_replacing(
    path: str | Path, option: str = "--out", *, overwrite: bool, inside: tuple[str, ...] = ()
) -> None:
    """Stop with one line when the output file ``path`` exists (for a folder output: when it holds one of the
    files ``inside``) and ``--overwrite`` was not given: a result that took hours is replaced only when asked."""
    target = Path(path).expanduser()
    found = [name for name in inside if (target / name).exists()] if inside else [target.name] * target.is_file()
    if found and not overwrite:
        what = f"already holds {found[0]}" if inside else "already exists"
        raise DinokitError(f"{option} {str(path)!r} {what}; pass --overwrite to replace it, or give another name")


def check_new_run(output_dir: str | Path, *, resume: bool) -> list[tuple[int, Path]]:
    """The finished checkpoints in ``output_dir``; one line when a new run (``resume=False``, ``--no-resume``) would
    mix with the one they hold. Also called before a SLURM submission, so that the refusal is not in a job's log."""
    out = Path(output_dir).expanduser()
    found = list_checkpoints(out / "checkpoints")
    if found and not resume:
        raise DinokitError(
            f"{out} already holds a run (checkpoint of iteration {found[-1][0]}); starting another one there would "
            f"mix the two: give a new --output-dir, or delete {out / 'checkpoints'} to start again here"
        )
    return found


def _check_folder(out: Path) -> None:
    check_writable(out)
    _make_folder(out, out, "--output-dir")


def _make_folder(folder: Path, target: Path, option: str) -> None:
    """Make ``folder`` (and its parents) for the output ``target`` that ``option`` gave; one line when it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DinokitError(f"cannot create {option} {str(target)!r} ({err.strerror}); give a writable folder") from None


def _load_saved(path: Path) -> Mapping:
    """The settings a run saved in ``path``; one line when they are missing or unreadable: without them a changed
    setting would resume the run unnoticed and mix two runs (the checkpoints alone cannot tell)."""
    from omegaconf import OmegaConf

    why = "is missing"
    if path.is_file():
        try:
            saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            if isinstance(saved, dict):
                return saved
            why = "does not hold settings"
        except Exception:
            why = "is not readable"
    raise DinokitError(
        f"{path.parent} holds checkpoints but its {path.name} {why}, so this run's settings cannot be checked against "
        f"them; put back {path.name} (the settings the run started with) to resume it, or give a new --output-dir")


@contextmanager
def open_run_dir(
    output_dir: str | Path,
    *,
    resume: bool,
    config: Mapping | None = None,
    config_file: str = "config.yaml",
    allowed_changes: Sequence[str] = RESUMABLE_CHANGES,
    introduced: Mapping[str, str] | None = None,
) -> Iterator[Path]:
    """Check ``output_dir`` and hold its lock for the ``with`` block (main process); yields the folder.

    ``resume=False`` means "start a new run" (``--no-resume``). ``config``
    (a plain nested dict) is compared with ``output_dir/config_file`` when resuming; the caller writes
    its configuration afterwards. ``introduced``: setting (dotted key) -> the change of recipe that came with it; a
    saved run without that setting was started before the change, and resuming it would mix two recipes: refused.
    """
    out = Path(output_dir)

    def check() -> tuple[Path, bool]:
        created = not out.exists()
        return _check_and_lock(out, resume, config, config_file, allowed_changes, introduced or {}), created

    # every process stops on the main one's refusal (the others went on into training, then died in a collective)
    lock, created = dist_utils.on_main_process(check) or (None, False)
    failed = True
    try:
        yield out
        failed = False
    finally:
        if lock is not None:
            release(lock)
            if failed and created and not any(out.iterdir()):  # stopped before writing anything: no folder left
                out.rmdir()


def output_lock_file(out: Path) -> Path:
    """The lock of the output file ``out``: ``.NAME.lock`` beside it."""
    return out.with_name(hidden_name(out.name, ".lock"))


@contextmanager
def main_process_lock(lock: Path, target: Path, option: str = "--out", check: Callable[[], None] | None = None,
                      temporaries: str | None = "**/.*.tmp-*") -> Iterator[None]:
    """The main process holds ``lock`` (:func:`dinokit.files.take_lock`) for the ``with`` block, and runs ``check``
    once it holds it (e.g. "the output does not exist yet": a run that ended meanwhile). Two commands writing one
    output would otherwise both report success with one's work lost. A refusal stops every process at once (under
    torchrun the others would wait in a collective). The lock goes on success, on an error and on Ctrl-C; so do the
    folders made for it when nothing else was written into them. Once it holds the lock, the main process deletes
    the temporary files killed processes left in the lock's folder (``temporaries``, a glob there; None: none)."""
    made: list[Path] = []  # the folders made for the lock, deepest first

    def take() -> Path:
        folder, held = lock.parent, None
        while not folder.exists() and folder != folder.parent:
            made.append(folder)
            folder = folder.parent
        try:
            _make_folder(lock.parent, target, option)
            held = take_lock(lock, target, option)
            if temporaries:
                remove_stale_temporaries(lock.parent, temporaries)
            if check is not None:
                check()
            return held
        except BaseException:
            _release(held, made)
            raise

    held = dist_utils.on_main_process(take)
    try:
        yield
    finally:
        _release(held, made)


def _release(lock: Path | None, made: list[Path]) -> None:
    if lock is not None:
        release(lock)
    for folder in made:  # deepest first; one that holds an output stays
        try:
            folder.rmdir()
        except OSError:
            break


def _check_and_lock(out: Path, resume: bool, config: Mapping | None, config_file: str,
                    allowed_changes: Sequence[str], introduced: Mapping[str, str]) -> Path:
    """The main process's checks of :func:`open_run_dir`, then its lock (returned)."""
    _check_folder(out)
    found = check_new_run(out, resume=resume)
    damaged = [(path, reason) for _, path in reversed(found) if (reason := checkpoint_damage(path)) is not None]
    if found and resume and len(damaged) == len(found):  # starting over would overwrite the run they hold
        raise no_readable_checkpoint(out / "checkpoints", damaged)
    if found and config is not None:
        saved = _load_saved(out / config_file)
        older = [change for key, change in introduced.items() if key not in flatten_settings(saved)]
        if older:
            raise DinokitError(
                f"{out} holds a run started by an older dinokit, before {older[0]}; resumed by this one it would go on "
                "with another recipe: finish it with the dinokit version that started it, or give a new --output-dir "
                "to start again")
        # both through absolute_settings: a run saved with relative paths still matches from the folder it began in
        refused, accepted = config_changes(absolute_settings(saved), absolute_settings(config), allowed_changes)
        if refused:
            raise DinokitError(
                f"{out} holds a run with another configuration: {_listing(refused)}; rerun with the saved "
                f"settings to resume it, or give a new --output-dir to start a new run"
            )
        if accepted:
            print(f"resuming with changed settings: {_listing(accepted, 5)}")
    lock = take_lock(out / LOCK_NAME, out)
    try:
        remove_stale_temporaries(out)  # a killed run's half-written snapshots, logs and configs
    except BaseException:  # e.g. a SIGTERM meanwhile: the lock is not the caller's yet
        release(lock)
        raise
    return lock


DATA_RECORD = "data.json"


def data_change_note(out: Path, dataset_name: str, paths: Sequence, *, resumed: bool,
                     decoding: Mapping | None = None) -> str | None:
    """Record in ``out/data.json`` what the run trains on (the image count, a digest of up to ~1000 evenly spaced
    paths, the ``decoding`` settings) and, on a resumed run, the note to print when that changed since the run last
    started: images added to or removed from the folder change the data order, other decoding other pixels, so the
    run no longer continues exactly."""
    n = len(paths)
    picks = sorted({*range(0, n, max(1, n // 1000)), n - 1}) if n else []
    digest = hashlib.sha1("\n".join(str(paths[i]) for i in picks).encode(errors="surrogateescape")).hexdigest()
    record = {"dataset": dataset_name, "images": n, "sampled_paths_sha1": digest,
              "decoding": json.loads(json.dumps(dict(decoding or {})))}  # as read back: tuples become lists
    path = out / DATA_RECORD
    try:
        saved = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        saved = None  # unreadable: replaced by the current record
    saved = saved if isinstance(saved, dict) else None  # so is a record that is not an object
    path.write_text(json.dumps(record, indent=1) + "\n")
    if not resumed or saved is None:
        return None
    if (saved.get("images"), saved.get("sampled_paths_sha1")) != (n, digest):
        what = (f"now holds {n} images ({saved.get('images')} when this run last started)" if saved.get("images") != n
                else "holds other files than when this run last started")
        return (f"note: {dataset_name} {what}: the run goes on, but its data order differs from here on from a run "
                "that was never stopped")
    before = saved.get("decoding") if isinstance(saved.get("decoding"), dict) else None
    changed = [f"{k} {before.get(k)} -> {v}" for k, v in record["decoding"].items()
               if before is not None and before.get(k) != v]
    if changed:
        return (f"note: the images are decoded otherwise than when this run last started ({', '.join(changed)}; "
                "DINOKIT_* variables): the run goes on, but on other pixels than a run that was never stopped")
    return None


def _megabytes(n: float) -> str:
    if n < 2**20:  # a small head's checkpoint on a nearly full disk read "only 0 MB free ..., needs about 0 MB"
        return f"{n / 2**10:,.0f} KB"
    return f"{n / 2**20:,.0f} MB" if n < 2**30 else f"{n / 2**30:,.1f} GB"


def check_disk_space(directory: Path, checkpoint_bytes: int, keep: int) -> None:
    """Stop when not even one checkpoint fits on the disk; warn when the ``keep`` newest ones may not."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    peak = (keep + 1) * checkpoint_bytes  # the newest are kept while the next one is written
    if free < checkpoint_bytes:
        raise DinokitError(
            f"only {_megabytes(free)} free on the disk of {directory}, and one checkpoint needs about "
            f"{_megabytes(checkpoint_bytes)}; free some space or give another --output-dir"
        )
    if free < peak:
        print(f"warning: only {_megabytes(free)} free on the disk of {directory}; keeping {keep} checkpoints needs "
              f"{keep + 1} x {_megabytes(checkpoint_bytes)} at peak: the run may stop at a checkpoint")
