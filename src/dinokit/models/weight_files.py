"""Reading weight files: local ``.pth``/``.pt``/``.safetensors`` files and http(s)/file URLs (cached by torch.hub).

Pickles are read with ``weights_only=True`` only: a file that needs arbitrary Python objects is refused, and a
damaged, plain-pickle or non-dict file is one line naming it. A download that fails (offline) is a
:class:`DownloadError` saying where a file fetched by other means is found.
"""

from __future__ import annotations

import contextvars
import os
import pickle
import re
import urllib.error
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import DinokitError


def is_url(path_or_url: str | Path) -> bool:
    return isinstance(path_or_url, str) and path_or_url.startswith(("http://", "https://", "file://"))


def _hub_cache_path(url: str) -> Path:
    """Where torch.hub keeps a downloaded checkpoint: ``<torch.hub.get_dir()>/checkpoints/<basename>``."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


# Set while a command runs (the CLI): a failed download then advises the commands' options, else Python's arguments.
COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar("dinokit_command_line", default=False)


class DownloadError(DinokitError):
    """A file that could not be fetched (offline): where a file fetched by other means is found by every command and
    by ``torch.hub.load`` alike. The message advises the commands' options under a command, else to give a local
    file; ``advice`` words the end for a caller that knows its argument
    (:func:`dinokit.models.registry.api_download_advice`)."""

    def __init__(self, url: str, reason: str, advice: str | None = None) -> None:
        if advice is None:
            advice = ("pass its local path with --weights FILE (or use --random-init)" if COMMAND_LINE.get() else
                      "give the local file's path instead of the URL (or build random weights with pretrained=False)")
        self.url, self.reason, self.cached = url, reason, _hub_cache_path(url)
        super().__init__(f"could not download {url} ({reason}); check the network connection, or fetch the file "
                         f"another way and put it at {self.cached} (found there from then on), or {advice}")


def _download_error(url: str, err: Exception) -> DownloadError:
    return DownloadError(url, " ".join(str(err).split())[:100])


def refused_object(err: BaseException) -> str | None:
    """The name of the Python object that ``torch.load(weights_only=True)`` refused to rebuild, else None (damage)."""
    # torch names objects it will not rebuild "GLOBAL module.name"; a cut-off tensor-rebuild name means damage.
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if isinstance(err, pickle.UnpicklingError) and found and "_rebuild_tens" not in found.group(1):
        return found.group(1)
    return None


def _unreadable_error(source: str, err: Exception) -> DinokitError:
    """One line for a pickle that ``torch.load(weights_only=True)`` refused: unsafe objects, or damage."""
    if (name := refused_object(err)) is not None:
        return DinokitError(
            f"checkpoint {source} contains arbitrary Python objects ({name}) and will not be unpickled; "
            "save a plain state dict of tensors (or .safetensors) instead"
        )
    text = str(err).split("WeightsUnpickler error:")[-1]  # torch's own advice before it is never the fix here
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    reason = lines[0].split(". ")[0][:120] if lines else type(err).__name__
    return DinokitError(f"cannot read checkpoint {source}: the file is corrupt or truncated ({reason})")


_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError)


def newest_snapshot(run_dir: str | Path, filename: str = "teacher_checkpoint.pth") -> Path | None:
    """The snapshot of the highest iteration in ``run_dir/eval/training_<it>/`` (None if there is none)."""
    def iteration(path: Path) -> int:
        match = re.fullmatch(r"training_(\d+)", path.parent.name)
        return int(match.group(1)) if match else -1

    snapshots = sorted(Path(run_dir).glob(f"eval/training_*/{filename}"), key=iteration)
    return snapshots[-1] if snapshots else None


def student_folders(run_dir: str | Path, filename: str = "teacher_checkpoint.pth") -> list[Path]:
    """The students' subfolders of a distillation of several students (each with its own snapshots), by name."""
    return sorted({p.parents[2] for p in Path(run_dir).glob(f"*/eval/training_*/{filename}")})


def no_snapshot_fix(run_dir: str | Path) -> str:
    """What to give instead of a folder without snapshots: one student's folder if it holds several students."""
    students = student_folders(run_dir)
    if students:
        return (f"it holds the students {', '.join(p.name for p in students)} of a distillation: give one student's "
                f"folder, e.g. {str(students[0])!r}")
    return "give a dinokit train run folder with at least one snapshot, or the checkpoint file itself"


def _weights_in_folder(folder: Path) -> str:
    """The fix for a folder given as weights: its newest teacher snapshot (a training run), else a weights file in it."""
    snapshot = newest_snapshot(folder)
    students = student_folders(folder)
    if snapshot is None and len(students) > 1:
        example = newest_snapshot(students[-1])
        names = ", ".join(p.name for p in students)
        return f"it holds the students {names}: give one's snapshot, e.g. {str(example)!r}"
    snapshot = snapshot or (newest_snapshot(students[0]) if students else None)
    if snapshot is not None:
        return f"give the file, e.g. {str(snapshot)!r}"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".pth", ".pt", ".safetensors"))
    if files:
        return f"give the file, e.g. {str(files[0])!r}"
    return "give the weights file (.pth, .pt or .safetensors)"


def check_weights_path(path_or_url: str | Path, option: str = "checkpoint") -> Path:
    """The weights file's path; a folder or a missing file is a one-line error naming ``option`` (e.g. ``--weights``),
    which a command calls before any work. URLs are not checked here."""
    path = Path(path_or_url).expanduser()
    if is_url(path_or_url):
        return path
    if path.is_dir():
        raise DinokitError(f"{option} {str(path_or_url)!r} is a folder, not a weights file; {_weights_in_folder(path)}")
    if not path.is_file():
        hint = "; for random weights give --random-init instead" if str(path_or_url) == "random" else ""
        raise DinokitError(f"{option} {str(path)!r} does not exist; check the path{hint}")
    return path


def load_state_dict_file(path_or_url: str | Path) -> dict[str, Any]:
    """Read a ``.safetensors`` or ``.pth``/``.pt`` file (or an http(s)/file URL) onto the CPU.

    URLs are cached in torch.hub's folder (``torch.hub.get_dir()/checkpoints``) and never downloaded
    twice. The result may be nested (``{"teacher": {...}}``); pass it through
    :func:`backbone_state_dict_from_checkpoint` to get a flat backbone state dict.
    """
    if is_url(path_or_url):
        url = str(path_or_url)
        cached = _hub_cache_path(url)
        if not cached.exists():  # torch.hub's own loader would print a "Downloading:" line even when it then fails
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(cached), progress=True)  # atomic: a temporary file, then moved
            except (urllib.error.URLError, OSError) as err:
                raise _download_error(url, err) from None
        try:
            return load_state_dict_file(cached)
        except DinokitError as err:
            raise DinokitError(f"{err}; it was downloaded from {url}: delete {str(cached)!r} to download it again") from None
    path = check_weights_path(path_or_url)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise DinokitError(f"cannot read {str(path)!r}: not a valid .safetensors file ({err})") from None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # the file is refused below anyway
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as err:
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80" and isinstance(err, pickle.UnpicklingError) and "GLOBAL" not in str(err):
            raise DinokitError(f"checkpoint {str(path)!r} is a plain Python pickle, not a torch.save file, and will not "
                               "be unpickled; save its tensors with torch.save(state_dict, path) or as .safetensors") from None
        raise _unreadable_error(repr(str(path)), err) from None
    if not isinstance(loaded, Mapping):
        raise DinokitError(f"checkpoint {str(path)!r} holds a {type(loaded).__name__}, not a dict of named tensors; "
                           "save model.state_dict() (or a .safetensors file) instead")
    return loaded
