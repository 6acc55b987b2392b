"""Repeated warnings shown once per command, then counted, and summarised when the command ends.

A folder with 500 unreadable files, a data set whose PNGs all carry the same odd metadata, or a batch of
unreadable images at every iteration would otherwise print hundreds of lines, once per file and once
per data-loading worker. Inside :func:`summarised_warnings` (the CLI runs every command in it):

- the first warning of each kind is shown, dinokit's own as one ``warning: ...`` line (others in Python's
  format, which names their source); later ones of that kind are only counted, except skipped images: the
  first :data:`SHOWN_FILES` different files are each named once (so that a few bad files are all named);
- a kind is the warning's category and its text with paths, quoted names and numbers masked, so that
  "skipping unreadable image a.png" and "... b.png" are one kind (every skipped image is one kind);
- the counts live in shared memory that forked data-loader workers inherit, so a warning shown by one
  worker is not shown again by another, and the summary counts the workers' warnings too;
- when the command ends, one line per kind that came more than once says how many there were (skipped
  images: every read; other kinds: when their texts differed, since the same text again says nothing new);
- while a progress bar is on screen, a warning is written through ``tqdm.write`` on its own line (not glued
  onto the bar's line).

Counters are updated without a lock (a killed worker can never hang the others); two processes
meeting a new kind at the same instant may each show it once.
"""

from __future__ import annotations

import re
import sys
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.sharedctypes import RawArray

_SLOTS = 64  # kinds tracked per command (more kinds are shown as usual)
SHOWN_FILES = 5  # skipped images named, one line each (a file read again is not named again)
_SKIPPED = "SkippedImageWarning"
_SKIPPED_KEY = zlib.crc32(_SKIPPED.encode()) or 1  # its key in _Counts
_TEXT = 240  # bytes of each kind's first message kept for the summary
_PYTHON_SHOWWARNING = warnings.showwarning


def _open_progress_bar():
    """tqdm's class when a progress bar of this process is open (tqdm is then imported), else None."""
    tqdm_module = sys.modules.get("tqdm")
    bar_class = getattr(tqdm_module, "tqdm", None)
    return bar_class if bar_class is not None and len(getattr(bar_class, "_instances", ())) else None


_MASK = re.compile(r"'[^']*'|\"[^\"]*\"|\S*[/\\]\S*|\d+(?:\.\d+)?")


class _Counts:
    def __init__(self) -> None:
        self.keys = RawArray("I", _SLOTS)  # crc32 of the kind (0: free slot)
        self.counts = RawArray("i", _SLOTS)
        self.texts = RawArray("c", _SLOTS * _TEXT)
        self.first = RawArray("I", _SLOTS)  # crc32 of the kind's first full text
        self.varied = RawArray("b", _SLOTS)  # whether a later text differed from the first

    def add(self, key: str, text: str) -> int | None:
        """Count one warning of kind ``key``; returns how many of that kind so far (None: no slot left)."""
        h = zlib.crc32(key.encode()) or 1
        full = zlib.crc32(text.encode(errors="replace"))
        for i in range(_SLOTS):
            slot = (h + i) % _SLOTS
            if self.keys[slot] == 0:
                self.keys[slot] = h
                encoded = text.encode(errors="replace")[: _TEXT - 1]
                self.texts[slot * _TEXT: slot * _TEXT + len(encoded)] = encoded
                self.first[slot] = full
            if self.keys[slot] == h:
                self.counts[slot] += 1
                if full != self.first[slot]:
                    self.varied[slot] = 1
                return self.counts[slot]
        return None

    def repeated(self) -> list[tuple[int, str]]:
        """``(count, first message)`` of every kind that came more than once: skipped images (each read counts),
        or other warnings with differing texts (the same text again, e.g. a file list checked twice, adds
        nothing to the one shown)."""
        out = []
        for slot in range(_SLOTS):
            if self.keys[slot] and self.counts[slot] > 1 and (self.varied[slot] or self.keys[slot] == _SKIPPED_KEY):
                raw = bytes(self.texts[slot * _TEXT: (slot + 1) * _TEXT]).split(b"\0", 1)[0]
                out.append((self.counts[slot], raw.decode(errors="replace")))
        return out


def warning_kind(category: type[Warning], text: str) -> str:
    """What makes two warnings "the same": every skipped image is one kind; otherwise the category and the text
    with paths, quoted names and numbers masked."""
    if any(c.__name__ == _SKIPPED for c in category.__mro__):  # dinokit.data.images (not imported
        return _SKIPPED  # here: the CLI starts without torch)
    return f"{category.__name__}: {_MASK.sub('#', text)}"


def is_dinokit_warning(filename: str) -> bool:
    """Whether a warning comes from dinokit itself (raised in its source, or by ``warn_explicit(..., "dinokit", 0)``)."""
    return filename == "dinokit" or "/dinokit/" in filename.replace("\\", "/")


def summary_line(count: int, first: str, files_named: int = 1, where: str = "in all") -> str:
    """The end-of-command line of a kind of warning that came ``count`` times (``first``: its first text;
    ``files_named``: for skipped images, how many different files were named; ``where``: whose count it is)."""
    if first.startswith("skipping "):
        named = (f"the first {files_named} files are named above" if files_named >= SHOWN_FILES
                 else "each file is named above" if files_named > 1 else "the file is named above")
        return f"warning: {count} image reads skipped {where} (unreadable, not an image or too large); {named}"
    short = first if len(first) <= 120 else first[:117] + "..."
    return f"warning: {count} warnings of this kind {where}, shown once: {short}"


def _whose_counts() -> str:
    """"in all", or under a launcher of several processes "in process R": each process counts its own (and its
    data workers'), so that the lines of two processes are not read as two totals."""
    from .distributed import launched_processes, launched_rank

    return "in all" if launched_processes() <= 1 else f"in process {launched_rank()}"


@contextmanager
def summarised_warnings() -> Iterator[None]:
    """Within the block, each kind of warning is shown once; at its end, one line per repeated kind (stderr)."""
    counts = _Counts()
    named_files = RawArray("I", SHOWN_FILES)  # crc32 of each skipped-image message shown (0: free)
    previous, previous_format = warnings.showwarning, warnings.formatwarning

    def name_file(text: str) -> bool:
        """Whether a skipped-image message is to be shown: a file not named yet, while slots are left."""
        h = zlib.crc32(text.encode(errors="replace")) or 1
        if h in named_files[:]:
            return False
        for slot in range(SHOWN_FILES):
            if named_files[slot] == 0:
                named_files[slot] = h
                return True
        return False

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        kind = warning_kind(category, text)
        seen = counts.add(kind, text)
        if seen is None or (name_file(text) if kind == _SKIPPED else seen == 1):
            bar = _open_progress_bar() if previous is _PYTHON_SHOWWARNING and file is None else None
            if bar is not None:
                bar.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"),
                          file=sys.stderr)
            else:
                previous(message, category, filename, lineno, file, line)

    def format_warning(message, category, filename, lineno, line=None):
        if is_dinokit_warning(str(filename)):  # our own warnings read like our errors: one plain line
            return f"warning: {message}\n"
        return previous_format(message, category, filename, lineno, line)  # a library's names its source

    warnings.showwarning, warnings.formatwarning = show, format_warning
    try:
        yield
    finally:
        warnings.showwarning, warnings.formatwarning = previous, previous_format
        repeated = counts.repeated()
        where = _whose_counts() if repeated else "in all"
        for count, first in repeated:
            print(summary_line(count, first, sum(1 for h in named_files if h), where), file=sys.stderr)
