"""Finding image files: a folder (recursive, in path order, links followed except loops), a single image, or a
text file listing paths; and reading the text files users write."""

from __future__ import annotations

import codecs
import operator
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import DinokitError

# torchvision's list, GIF, and what browsers and phones also save (.jfif/.jpe are JPEG, .apng PNG; .avif needs a
# Pillow built with it, else each is skipped as unreadable, with its reason, rather than ignored without a word)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif", ".jfif", ".jpe",
                    ".apng", ".avif")


def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def find_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive), in sorted order; skips hidden files and folders. Linked folders
    are followed, as torchvision's ImageFolder does (a set assembled from links to class folders), except a link
    back to a folder it lies in (a loop)."""
    root = Path(root)
    if not root.exists():
        raise DinokitError(f"input path {str(root)!r} does not exist; check the path")
    if root.is_file():
        return [root]
    return [Path(name) for name in find_image_names(root)]


def find_image_names(root: Path) -> list[str]:
    """:func:`find_images` of the folder ``root`` as strings, in the same order (a path's components compared in
    turn, as paths sort), listed with one directory read per folder and no path object or extra file status per
    image: a 1.28M-image folder took about 40 s to list and label. A folder that cannot be read is passed over with a
    warning naming it (its images were missing without a word), and so is an entry whose kind cannot be told (a
    link to itself, or into a folder that cannot be read)."""
    files: list[str] = []
    top = os.fspath(root)
    folders = [(top, frozenset({os.path.realpath(top)}))]  # a folder and the real folders it lies in (itself too)
    while folders:
        folder, inside = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = [entry for entry in listing if not entry.name.startswith(".")]
        except OSError as err:
            if folder == top and isinstance(err, PermissionError):  # the folder given: nothing to list
                raise DinokitError(f"cannot read the folder {top!r} (permission denied); check its permissions")
            warnings.warn(f"skipping the folder {folder} (it cannot be read: {err.strerror or type(err).__name__}): "
                          "its images are left out; check its permissions", UserWarning, stacklevel=2)
            continue
        for entry in entries:
            try:
                if entry.is_dir():  # a linked folder too, unless it leads back to one it lies in (a loop)
                    if (real := os.path.realpath(entry.path)) not in inside:
                        folders.append((entry.path, inside | {real}))
                elif is_image_file(entry.name) and entry.is_file():
                    files.append(entry.path)
            except OSError:
                continue
    return sorted(files, key=lambda path: path.split(os.sep))


class PathColumn(Sequence[Path]):
    """Many file paths held as one bytes object (the names back to back, encoded as the file system does) and a
    numpy array of where each ends, instead of a list of ``Path`` objects. A 1.28M-image folder took about 6 s and
    280 MB to hold as paths, and each DataLoader worker came to copy about 125 MB of them: reading an item changes
    its path object's reference count, and so the memory page it lies in. Here the paths are two objects, which
    the workers share, and an item's ``Path`` is built when it is read. Compares equal to a list of the same paths.
    """

    def __init__(self, paths: Iterable[str | os.PathLike]) -> None:
        encoded = [os.fsencode(path) for path in paths]  # names that are not UTF-8 come back unchanged
        self._names = b"".join(encoded)
        self._ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"path index {index} out of range for {len(self)} paths")
        start = int(self._ends[i - 1]) if i else 0
        return Path(os.fsdecode(self._names[start:int(self._ends[i])]))

    def __iter__(self) -> Iterator[Path]:
        return map(Path, self.strings())

    def strings(self) -> Iterator[str]:
        """The paths as strings, without building a ``Path`` for each (which takes most of the time of a pass)."""
        start = 0
        for end in self._ends.tolist():
            yield os.fsdecode(self._names[start:end])
            start = end

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == Path(b) for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequences are not hashed, as lists are not

    def __repr__(self) -> str:
        return f"PathColumn({len(self)} paths)"


def absolute_paths(paths: Iterable[str | os.PathLike]) -> list[str]:
    """``os.path.abspath`` of each path, each folder made absolute once (a folder of a million images: seconds)."""
    return _by_folder(paths, os.path.abspath, follow_file_links=False)


def real_paths(paths: Iterable[str | os.PathLike]) -> list[str]:
    """``str(Path(p).resolve())`` of each path (absolute, every link followed), each folder resolved once: resolving
    every path whole reads the status of each of its components (minutes for millions of paths on a network file
    system); here a file costs one status read, and a second resolution when it is itself a link."""
    return _by_folder(paths, os.path.realpath, follow_file_links=True)


def _by_folder(paths: Iterable[str | os.PathLike], resolve: Callable[[str], str], follow_file_links: bool) -> list[str]:
    """``resolve(path)`` of each path, computed as ``resolve(folder)`` once per folder joined with the file's name
    (and, with ``follow_file_links``, resolved whole when the file is itself a link)."""
    folders: dict[str, str] = {}
    out = []
    here = os.getcwd()
    for path in paths.strings() if isinstance(paths, PathColumn) else map(os.fspath, paths):
        folder, name = os.path.split(os.path.join(here, path))  # '..' left to resolve: across links it is physical
        if name in ("", ".", ".."):
            out.append(resolve(path))
            continue
        if (done := folders.get(folder)) is None:
            done = folders[folder] = resolve(folder)
        joined = os.path.join(done, name)
        out.append(resolve(joined) if follow_file_links and os.path.islink(joined) else joined)
    return out


def read_user_text(path: str | Path) -> str:
    """A text file a user wrote (a path list, labels, class names): UTF-8, a byte-order mark (Windows editors)
    dropped; anything else is one line naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DinokitError(f"{str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); "
                           "save it as UTF-8 (or check that it is the text file meant)") from None


def read_list_lines(list_file: str | Path) -> list[str]:
    """The lines of a list of file names (a ``FileList``, curate's ``manifest.txt``), each decoded as the file system
    decodes names, so that every name dinokit lists reads back as the same file under any locale. Split at line
    feeds only (a name may hold a carriage return or a Unicode line separator, which ``str.splitlines`` split it at),
    at carriage returns in a file that has no line feed (old Mac line ends); a CRLF line end and a byte-order mark
    dropped. Lines that are not UTF-8 are names' bytes when one of them names a file that exists (curate lists a
    Latin-1 name as its bytes: the whole list was refused); when none does, the list is one line asking for UTF-8
    (an editor's Latin-1 or UTF-16)."""
    raw = Path(list_file).read_bytes()
    skipped = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    end = b"\n" if b"\n" in raw or b"\r" not in raw else b"\r"
    lines, offset, first_foreign, names_a_file = [], skipped, None, False
    for whole in raw[skipped:].split(end):
        line = whole.removesuffix(b"\r")
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            first_foreign = first_foreign or f"byte {offset + err.start}: {err.reason}"
            if not names_a_file and b"\0" not in line:
                name = os.fsdecode(line).strip()
                unlabelled = re.sub(r"[\t,]\s*-?\d+$", "", name).rstrip()  # 'path,3' of a labelled list
                names_a_file = any(os.path.lexists(Path(list_file).parent / n) for n in (name, unlabelled))
        lines.append(os.fsdecode(line))
        offset += len(whole) + len(end)
    if first_foreign and not names_a_file:  # the list's own encoding is not UTF-8
        raise DinokitError(f"{str(list_file)!r} is not UTF-8 text ({first_foreign}); save it as UTF-8 (or check "
                           "that it is the text file meant)")
    return lines


def read_path_list(list_file: str | Path) -> list[Path]:
    """Image paths from a text file, one per line (:func:`read_list_lines`); blank lines and ``#`` comments are
    ignored.

    Relative paths are taken relative to the list file's folder.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DinokitError(f"list file {str(list_file)!r} does not exist; check the path")
    base = list_file.parent
    paths = []
    for line in read_list_lines(list_file):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        paths.append(p if p.is_absolute() else base / p)
    return paths


def keep_existing(paths: list[Path], list_file: str | Path) -> list[int]:
    """Indices of the ``paths`` listed in ``list_file`` that exist; the missing ones are named once, here.

    Checked when the list is read, so that a missing file is reported once rather than skipped (and
    retried) at every epoch; one line if none exists.
    """
    exists = [p.is_file() for p in paths]
    keep = [i for i, ok in enumerate(exists) if ok]
    if paths and not keep:
        raise DinokitError(f"none of the {len(paths)} files listed in {str(list_file)!r} exists (first: "
                           f"{str(paths[0])!r}); relative paths are read from the list file's folder")
    if len(keep) < len(paths):
        message = (f"{len(paths) - len(keep)} of the {len(paths)} files listed in {list_file} do not exist and are "
                   f"left out (first: {paths[exists.index(False)]})")
        warnings.warn_explicit(message, UserWarning, "dinokit", 0)  # one message about the list, not per image
    return keep


def resolve_image_inputs(input_path: str | Path) -> PathColumn:
    """A folder (recursive), a single image, or a ``.txt``/``.lst`` file listing image paths."""
    path = Path(input_path)
    if not path.exists():
        raise DinokitError(f"input path {str(path)!r} does not exist; give a folder, an image or a text file of paths")
    if path.is_dir():
        names = find_image_names(path)  # no path object per image (a million images: seconds and memory)
        if not names:
            raise DinokitError(f"no images found under {str(path)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return PathColumn(names)
    if is_image_file(path):
        if not path.is_file():  # a pipe or a device named like an image: reading it waited for ever
            raise DinokitError(f"{str(path)!r} is not a regular file (a pipe, socket or device); give an image file")
        return PathColumn([path])
    if path.suffix.lower() in (".txt", ".lst", ".csv"):
        files = read_path_list(path)
        if not files:
            raise DinokitError(f"list file {str(path)!r} names no images")
        return PathColumn(files[i] for i in keep_existing(files, path))
    raise DinokitError(f"{str(path)!r} is neither a folder, an image, nor a .txt list of image paths")
