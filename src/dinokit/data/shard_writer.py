"""Writing a folder of images as WebDataset shards (``dinokit data shard``); reading them: :mod:`.shards`."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable

from PIL import Image

from ..engine.run_dir import check_writable, main_process_lock
from ..errors import DinokitError
from ..files import LOCK_NAME, atomic_write, is_temporary, resolve_link, take_lock
from .datasets import ImageDataset, parse_dataset_str
from .images import load_image
from .shards import CLASSES_FILE, PARTIAL, RECORD_FILE, SOURCES_FILE, interrupted_shards


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: identical inputs give identical shards
    tar.addfile(info, io.BytesIO(data))


def _source_folder(source: str | None) -> Path | None:
    """The folder that ``data shard`` reads: ``source`` itself, or a dataset string's ``root=`` (a list has none)."""
    if source is None:
        return None
    root = source if Path(source).expanduser().is_dir() else parse_dataset_str(source)[1].get("root")
    return Path(root).expanduser().resolve() if root and Path(root).expanduser().is_dir() else None


_PATTERN_SIGNS = ("{", "}", ",", "::")  # brace lists and ranges, pattern separator: see expand_urls


def check_shard_out(out_dir: str | Path, source: str | None = None, *, locked: bool = False) -> Path:
    """``out_dir`` as a Path, refusing a path that the urls pattern cannot name, a file, the ``source`` folder (a
    folder or a dataset string's ``root=``) or a folder inside it, a folder another run is writing (unless
    ``locked``: this process holds its lock), and a folder that is not empty: new shards beside stale ones would
    be read together by ``DIR/*.tar`` or an old brace range, and ``classes.txt`` would replace a file of that
    name. An interrupted run's folder is told as such."""
    out_dir = Path(out_dir).expanduser()
    if signs := [sign for sign in _PATTERN_SIGNS if sign in str(out_dir)]:
        raise DinokitError(f"--out {str(out_dir)!r} holds {' and '.join(map(repr, signs))}, which a WebDataset urls "
                           "pattern reads as a brace list or a separator, so the shards could not be named; give a "
                           "folder path without { } , or ::")
    if out_dir.exists() and not out_dir.is_dir():
        raise DinokitError(f"--out {str(out_dir)!r} is a file, not a folder; give a new or empty folder")
    root, out = _source_folder(source), resolve_link(out_dir)  # a link that loops: one line
    if root is not None and root in (out, *out.parents):
        where = "the" if root == out else "inside the"
        raise DinokitError(f"--out {str(out_dir)!r} is {where} source folder {str(root)!r}; give a folder outside it "
                           "for the shards")
    if not locked and (out_dir / LOCK_NAME).exists():  # a live run's lock: one line; a killed run's is removed
        take_lock(out_dir / LOCK_NAME, out_dir, "--out").unlink()
    if (n := interrupted_shards(out_dir)) is not None:
        raise DinokitError(f"an interrupted run left {n} shard(s) in {str(out_dir)!r}: delete the folder (or give "
                           "another --out) and rerun")
    if out_dir.is_dir() and any(p.suffix == ".tar" for p in out_dir.iterdir()):
        raise DinokitError(f"--out {str(out_dir)!r} already holds shards; give an empty folder")
    # a killed run's temporary files are removed under the lock (main_process_lock)
    held = [p for p in out_dir.iterdir() if not (p.name.startswith(LOCK_NAME) or is_temporary(p.name))
            ] if out_dir.is_dir() else []
    if (found := min(held, default=None)) is not None:
        raise DinokitError(f"--out {str(out_dir)!r} is not empty (it holds {found.name!r}); give a new or empty folder")
    return check_writable(out_dir, "--out")  # under a file, or read-only: one line too


def shrink(image: Image.Image, max_size: int, jpeg: bool) -> tuple[str, bytes]:
    """``image`` (RGB, as :func:`load_image` returns it) resized so that its short side is ``max_size`` (antialiased
    bicubic), encoded as JPEG at quality 95 when the source was a JPEG, else as PNG: ``(extension, bytes)``."""
    scale = max_size / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    if jpeg:
        small.save(buffer, format="JPEG", quality=95)
    else:
        small.save(buffer, format="PNG")
    return ("jpg" if jpeg else "png"), buffer.getvalue()


def _save_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        # names as the file system holds their bytes (UTF-8 under a UTF-8 locale), read back by os.fsdecode: the
        # class names then equal an ImageFolder's of the same folders under any locale
        tmp.write_bytes(os.fsencode(text))


def write_shards(dataset: ImageDataset, out_dir: str | Path, *, shard_size: int,
                 max_size: int | None = None) -> tuple[list[Path], list[tuple[Path, str]], int]:
    """Write ``dataset``'s readable image files into ``out_dir/000000.tar``, ... (``shard_size`` samples each);
    return the shards, the ``(path, reason)`` of each file left out because it does not decode as an image (a text
    file named .jpg, a truncated or empty file) and how many images were resized.

    Sample ``i`` is ``%09d`` of its position among the written samples: ``.<ext>`` holds the original bytes, or,
    with ``max_size``, an image whose short side is above it resized to it (:func:`shrink`; stored as the readers
    see it: RGB, transparency composited), so that training decodes small files; ``.cls`` holds the label when
    there is one; ``classes.txt`` the class names, ``sources.txt`` each sample's file (line i, absolute). Nothing is
    written when no image is readable (a :class:`DinokitError` then names the first file).

    A killed run never leaves shards that look whole: ``shards.json`` says ``"complete": false`` from the first
    shard on, each shard is ``NNNNNN.tar.partial`` until the last one is written, then all are renamed and
    ``shards.json`` is rewritten, last, as the completion record (counts, urls pattern). Readers
    (:func:`dinokit.data.shards.make_shard_dataset`) and a rerun (:func:`check_shard_out`) refuse an interrupted
    run's folder in one line. The folder's lock (``.dinokit.lock``) keeps a second run out while this one writes.
    """
    if shard_size < 1:
        raise DinokitError(f"--shard-size must be >= 1, got {shard_size}")
    if max_size is not None and max_size < 1:
        raise DinokitError(f"--max-size must be at least 1 pixel, got {max_size}")
    for what, names in (("class folder", dataset.classes), ("image", map(str, dataset.paths))):
        if (odd := next((name for name in names if "\n" in name), None)) is not None:
            raise DinokitError(f"the {what} name {odd!r} holds a line feed, which {CLASSES_FILE} and {SOURCES_FILE} "
                               "cannot list one per line; rename it")
    out_dir = check_shard_out(out_dir)
    with main_process_lock(out_dir / LOCK_NAME, out_dir, "--out"):  # a folder made here and left empty goes again
        check_shard_out(out_dir, locked=True)  # again under the lock: another run may have written it meanwhile
        try:
            return _write_shards(dataset, out_dir, shard_size=shard_size, max_size=max_size)
        except DinokitError as err:  # a write failed (a full disk): the rerun would refuse an unfinished folder
            if interrupted_shards(out_dir) is None:
                raise
            raise DinokitError(f"{err}, after deleting {out_dir} (its shards so far are those of an unfinished run, "
                               "which the rerun refuses)") from None


def _write_shards(dataset: ImageDataset, out_dir: Path, *, shard_size: int,
                  max_size: int | None) -> tuple[list[Path], list[tuple[Path, str]], int]:
    written: list[Path] = []  # the shards, under their .partial names until the end
    unreadable: list[tuple[Path, str]] = []
    pending: list[tuple[str, bytes, int]] = []  # (extension, bytes, label) of the next shard's samples
    sources: list[str] = []  # the file of each sample, in key order
    count = resized = 0
    settings = {"shard_size": shard_size, "max_size": max_size}

    def flush() -> None:
        if not written:  # before the first shard: a kill from here on leaves a folder told as interrupted
            _save_text(out_dir / RECORD_FILE, json.dumps({"complete": False, **settings}, indent=1) + "\n")
        path = out_dir / f"{len(written):06d}.tar{PARTIAL}"
        with atomic_write(path) as tmp, tarfile.open(tmp, "w") as tar:
            for position, (ext, data, target) in enumerate(pending, start=count - len(pending)):
                key = f"{position:09d}"
                _add(tar, f"{key}.{ext}", data)
                if target >= 0:
                    _add(tar, f"{key}.cls", str(target).encode())
        written.append(path)
        pending.clear()

    for source, target in zip(dataset.paths, dataset.targets):
        ext = source.suffix.lstrip(".").lower() or "jpg"
        try:
            data = source.read_bytes()
            image = load_image(io.BytesIO(data), draft_size=max_size)  # a bad file is found now, not in training
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError for some malformed headers
            unreadable.append((source, " ".join(str(err).split()) or type(err).__name__))
            continue
        if max_size is not None and min(image.size) > max_size:
            ext, data = shrink(image, max_size, jpeg=Image.open(io.BytesIO(data)).format == "JPEG")
            resized += 1
        pending.append((ext, data, target))
        sources.append(os.path.abspath(source))
        count += 1
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not written:
        first = f" (first: {unreadable[0][0]})" if unreadable else ""
        raise DinokitError(f"none of the {len(dataset)} images could be read{first}; nothing was written")
    if dataset.classes:
        _save_text(out_dir / CLASSES_FILE, "\n".join(dataset.classes) + "\n")
    # line i: the file sample i (key %09d) came from, so that an embedding of the shards leads back to the images
    _save_text(out_dir / SOURCES_FILE, "".join(f"{p}\n" for p in sources))
    shards = [path.with_name(path.name.removesuffix(PARTIAL)) for path in written]
    for partial, shard in zip(written, shards):
        os.replace(partial, shard)
    record = {"complete": True, "images": count, "shards": len(shards), **settings,
              "classes": len(dataset.classes), "urls": shard_pattern([Path(os.path.abspath(p)) for p in shards])}
    _save_text(out_dir / RECORD_FILE, json.dumps(record, indent=1) + "\n")  # last: the run is complete
    return shards, unreadable, resized


def shard_pattern(paths: Iterable[Path]) -> str:
    """The brace pattern naming ``paths`` written by :func:`write_shards` (``DIR/{000000..000012}.tar``)."""
    paths = list(paths)
    if len(paths) == 1:
        return str(paths[0])
    return f"{paths[0].parent}/{{{paths[0].stem}..{paths[-1].stem}}}.tar"
