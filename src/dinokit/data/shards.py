"""WebDataset tar shards as a random-access dataset: ``WebDataset:urls=shards/{000000..000099}.tar``.

A shard is a tar file whose members are grouped into samples by key (the member name up to the first
dot of its file name): ``000042.jpg`` and ``000042.cls`` form sample ``000042`` with an image and an
integer label. This module indexes every member's byte range once (and caches the index, see
:func:`cached_index`), so that sample ``i`` of the concatenated shards is one ``seek`` + ``read``. That
keeps the design of the rest of the data pipeline: pretraining draws stream position ``p`` from
``(seed, p)`` (see :mod:`dinokit.data.samplers`), positions are split between ranks and DataLoader
workers by the sampler (each sample once per pass, on exactly one rank and worker), and a resumed run
continues at its exact data position with no extra state. Reading a sample costs what reading one file of an
``ImageFolder`` costs.

URLs: local paths, brace ranges (``{000..099}``, zero-padded) and lists (``{a,b}``), several patterns
joined by ``::``. Anything else the ``webdataset`` library opens (``http://``, ``s3://`` via ``pipe:``...)
is copied once into a local cache (``DINOKIT_SHARD_CACHE``, default ``~/.cache/dinokit/shards``) and
then read like a local shard; that needs ``pip install 'dinokit[webdataset]'``.

Labels come from a ``cls`` (or ``label``) member; class names from ``classes.txt`` beside the shards
(written by ``dinokit data shard``, :mod:`dinokit.data.shard_writer`). A sample without an image, or whose
image does not decode, yields ``None`` and is skipped and counted by the collate functions, as a bad file is elsewhere.

``data shard`` writes ``shards.json`` beside the shards, last, with ``"complete": true``; a folder whose record
says otherwise (or that holds ``NNNNNN.tar.partial`` files) is an interrupted run's, refused in one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import DinokitError
from ..files import LOCK_NAME, atomic_write, lock_holder
from .datasets import ImageDataset
from .images import load_image
from .listing import IMAGE_EXTENSIONS, PathColumn

_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_LABEL_EXTS = ("cls", "label")
_BRACE = re.compile(r"\{([^{}]*)\}")
CLASSES_FILE = "classes.txt"
SOURCES_FILE = "sources.txt"
RECORD_FILE = "shards.json"  # written first as {"complete": false}, rewritten last as the completion record
PARTIAL = ".partial"  # a shard is NNNNNN.tar.partial until every shard of the run is written


# ---------------------------------------------------------------------------------------------- URLs
def expand_urls(pattern: str) -> list[str]:
    """``a/{000..002}.tar::b.tar`` -> ``[a/000.tar, a/001.tar, a/002.tar, b.tar]`` (brace ranges keep zero padding)."""
    urls: list[str] = []
    for part in pattern.split("::"):
        match = _BRACE.search(part)
        if match is None:
            urls.append(part)
            continue
        body = match.group(1)
        ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if ranged:
            lo, hi = ranged.groups()
            width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
            choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            choices = body.split(",")
        for choice in choices:
            urls.extend(expand_urls(part[: match.start()] + choice + part[match.end() :]))
    return urls


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


PIPE_ENV = "DINOKIT_ALLOW_PIPE"


def _cache_dir() -> Path:
    """``$DINOKIT_SHARD_CACHE`` (empty or unset: ``~/.cache/dinokit/shards``)."""
    return Path(os.environ.get("DINOKIT_SHARD_CACHE", "").strip() or Path.home() / ".cache" / "dinokit" / "shards"
                ).expanduser()


def local_shard(url: str) -> Path:
    """The local file of a shard URL: the path itself, or a cached copy of a remote shard."""
    if _is_local(url):
        path = Path(url.removeprefix("file:")).expanduser()
        if not path.is_file():
            raise DinokitError(f"shard {url!r} does not exist; check the WebDataset urls pattern")
        return path
    if url.startswith("pipe:") and os.environ.get(PIPE_ENV, "").strip().lower() not in ("1", "true", "yes"):
        # a shell command: a dataset string in a config file must not run one unasked
        raise DinokitError(f"shard URL {url[:60]!r} runs a shell command; set {PIPE_ENV}=1 if you trust the "
                           "configuration it comes from")
    cached = _cache_dir() / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{Path(url.split('?')[0]).name or 'shard.tar'}"
    if cached.parent.exists() and not cached.parent.is_dir():
        raise DinokitError(f"DINOKIT_SHARD_CACHE {str(cached.parent)!r} is not a folder; give a folder for the copies "
                           "of remote shards")
    if not cached.is_file():
        try:
            import webdataset
        except ImportError:
            raise DinokitError(f"reading {url!r} needs webdataset: pip install 'dinokit[webdataset]'") from None
        with webdataset.gopen(url, "rb") as src, atomic_write(cached) as tmp, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return cached


# ---------------------------------------------------------------------------------------------- index
@dataclass(frozen=True)
class ShardSample:
    shard: int  # index into the shard list
    key: str
    image: tuple[int, int] | None  # (byte offset, size) of the image member, None if the sample has none
    target: int


def _split_name(name: str) -> tuple[str, str]:
    """``dir/000042.seg.png`` -> (``dir/000042``, ``seg.png``): the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_shard(path: Path, shard: int) -> list[ShardSample]:
    """The samples of one tar, in member order, with the byte range of each image (a header scan only)."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            labels = {}
            for m in members:
                key, ext = _split_name(m.name)
                if ext in _LABEL_EXTS:
                    labels[key] = tar.extractfile(m).read().decode().strip()
    except (tarfile.TarError, OSError) as err:
        raise DinokitError(f"cannot read shard {str(path)!r}: not an uncompressed tar file ({err})") from None
    samples: dict[str, ShardSample] = {}
    for m in members:
        key, ext = _split_name(m.name)
        if key.rpartition("/")[2].startswith("__") or ext in _LABEL_EXTS:
            continue  # __key__-style metadata
        sample = samples.get(key) or ShardSample(shard, key, None, _label(labels.get(key), key, path))
        if sample.image is None and ext.rpartition(".")[2] in _IMAGE_EXTS:
            sample = ShardSample(shard, key, (m.offset_data, m.size), sample.target)
        samples[key] = sample
    for key in labels.keys() - samples.keys():
        samples[key] = ShardSample(shard, key, None, _label(labels[key], key, path))
    return list(samples.values())


INDEX_VERSION = 1  # of the cached indices' layout


def _index_file(path: Path) -> Path:
    """Where the index of the shard ``path`` is cached: named by its real path and its file's identity, size,
    modification and change times, so that a shard written again is indexed again (also one copied over with
    ``cp -p`` or ``rsync -t``, which keep the modification time but make a new change time, or a new file)."""
    st = path.stat()
    key = (f"{INDEX_VERSION}\n{os.path.realpath(path)}\n{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} "
           f"{st.st_ctime_ns}")
    return _cache_dir() / "index" / f"{hashlib.sha1(key.encode(errors='surrogateescape')).hexdigest()[:20]}.json"


_INT64 = 2**63


def _read_index(cache: Path, shard: int) -> list[ShardSample]:
    """The samples of a cached index; ValueError when it is not one that :func:`cached_index` writes (a damaged
    or edited file: the shard is scanned instead)."""
    try:
        rows = json.loads(cache.read_text())
    except RecursionError:
        raise ValueError("too deeply nested") from None
    if not isinstance(rows, list):
        raise ValueError("not a list")
    samples = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)
                and all(type(v) is int for v in row[1:])):
            raise ValueError("not a [key, offset, size, target] row")
        key, offset, size, target = row
        if not (0 <= offset < _INT64 and -1 <= size < _INT64 and -1 <= target < _INT64):
            raise ValueError("a number out of range")
        os.fsencode(key)  # a name a file system can hold (UnicodeEncodeError, a ValueError, otherwise)
        samples.append(ShardSample(shard, key, (offset, size) if size >= 0 else None, target))
    return samples


def cached_index(path: Path, shard: int) -> list[ShardSample]:
    """:func:`index_shard`, read from the index cache (``$DINOKIT_SHARD_CACHE/index``) once the shard has been
    indexed: scanning a tar's headers and reading its labels took about 40 ms per 1000 samples (a minute for
    ImageNet's 1.28M, at every command), its cached index well under a millisecond. The cache holds numbers and
    names only (JSON); one that cannot be read, or is not what this function writes, is passed over and the shard
    scanned; one that cannot be written (no permission, a full disk) is left unwritten."""
    cache: Path | None = None
    try:
        cache = _index_file(path)
        return _read_index(cache, shard)
    except (OSError, ValueError):  # not indexed yet, or a damaged index
        pass
    samples = index_shard(path, shard)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(cache) as tmp:
                tmp.write_text(json.dumps([[s.key, *(s.image or (0, -1)), s.target] for s in samples]))
        except (OSError, DinokitError):  # atomic_write says why in a DinokitError: the shard is scanned next time
            pass
    return samples


def _stamp(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _label(text: str | None, key: str, path: Path) -> int:
    if text is None:
        return -1
    try:
        return int(text)
    except ValueError:
        raise DinokitError(f"sample {key!r} of {str(path)!r} has label {text!r}; labels must be class indices") from None


class ShardDataset(ImageDataset):
    """The samples of a list of tar shards; items are ``(index, image_or_None, target)`` like every dataset.

    Open files are kept per process (DataLoader workers each open their own).
    """

    def __init__(self, shards: Sequence[Path], samples: list[ShardSample], classes: list[str], transform=None,
                 name: str = "") -> None:
        names = (f"{shards[s.shard]}/{s.key}" for s in samples)  # display names: shard/key
        super().__init__(PathColumn(names), [s.target for s in samples], classes, transform, name)
        self.shards = list(shards)
        # each sample's shard and image byte range as numpy columns (size -1: no image), not an object per sample,
        # which every DataLoader worker came to copy as it read them (about 250 bytes per sample)
        self._shard = np.fromiter((s.shard for s in samples), dtype=np.int64, count=len(samples))
        self._offset = np.fromiter((s.image[0] if s.image else 0 for s in samples), dtype=np.int64, count=len(samples))
        self._size = np.fromiter((s.image[1] if s.image else -1 for s in samples), dtype=np.int64, count=len(samples))
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()
        # each shard as it was indexed: a shard replaced or rewritten since (a rerun of 'data shard' into the folder)
        # would give other images under the indexed keys and byte ranges
        self._stamps = [_stamp(os.stat(path)) for path in self.shards]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            f = open(self.shards[shard], "rb")
            if _stamp(os.fstat(f.fileno())) != self._stamps[shard]:
                f.close()
                raise DinokitError(f"shard {str(self.shards[shard])!r} changed since it was indexed (it was replaced "
                                   "or rewritten while this command ran): its samples are no longer those read at "
                                   "the start; rerun the command once the shards stay as they are")
            self._files[shard] = f
        return self._files[shard]

    def read_image(self, index: int) -> Image.Image:
        offset, size = int(self._offset[index]), int(self._size[index])
        if size < 0:
            raise ValueError("the sample has no image member")
        f = self._file(int(self._shard[index]))
        f.seek(offset)
        return load_image(io.BytesIO(f.read(size)), draft_size=self.draft_size)  # decoded like any image file


def make_shard_dataset(urls: str, *, transform: Callable | None = None, labelled: bool = False,
                       dataset_str: str = "") -> ShardDataset:
    """The dataset of ``WebDataset:urls=PATTERN`` (see the module notes)."""
    expanded = expand_urls(urls)
    for folder in dict.fromkeys(Path(u.removeprefix("file:")).expanduser().parent for u in expanded if _is_local(u)):
        check_complete(folder)
    shards = [local_shard(u) for u in expanded]
    if not shards:
        raise DinokitError(f"WebDataset urls {urls!r} name no shard")
    samples = [s for i, path in enumerate(shards) for s in cached_index(path, i)]
    if not samples:
        raise DinokitError(f"the shards of {urls!r} hold no samples")
    targets = [s.target for s in samples]
    if labelled and min(targets) < 0:
        raise DinokitError(f"{dataset_str or urls!r} has samples without a label; labelled use needs a .cls member per sample")
    names_file = shards[0].parent / CLASSES_FILE
    if names_file.is_file():
        # as data shard wrote it: the names' bytes, one per line (split at line feeds only: a name may hold a
        # carriage return), decoded as the file system decodes names, as an ImageFolder's classes are; a file
        # written by hand may end without a line feed, or in CRLF
        lines = names_file.read_bytes().split(b"\n")
        if lines[-1] == b"":  # after the last line's end
            lines.pop()
        classes = [os.fsdecode(line.removesuffix(b"\r")) for line in lines]
    else:
        classes = [str(i) for i in range(max(targets) + 1)]
    return ShardDataset(shards, samples, classes, transform, dataset_str or f"WebDataset:urls={urls}")


def _record(folder: Path) -> dict | None:
    """The record ``data shard`` left in ``folder`` (None: none, or not one of its records)."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("complete"), bool) else None


def interrupted_shards(folder: Path) -> int | None:
    """How many shards an interrupted ``data shard`` run left in ``folder`` (None: no such run's leftovers)."""
    if not folder.is_dir():
        return None
    record = _record(folder)
    partial = [p for p in folder.iterdir() if p.name.endswith(".tar" + PARTIAL)]
    if not partial and (record is None or record["complete"]):  # finished, or not written by data shard
        return None
    return len(partial) + sum(1 for p in folder.iterdir() if p.suffix == ".tar")


def check_complete(folder: Path) -> None:
    """One line when ``folder`` holds the shards of a ``data shard`` run that was interrupted: some of them are
    missing, though those there look whole; or when a live ``data shard`` still writes there (also before its
    first shard, when the folder holds only its lock)."""
    holder = lock_holder(folder / LOCK_NAME) if folder.is_dir() else None
    if holder is not None and holder[2]:  # its writer is alive: it is not interrupted, and must not be deleted
        n = interrupted_shards(folder) or 0
        raise DinokitError(f"'dinokit data shard' (process {holder[1]} on {holder[0]}) is still writing the shards "
                           f"in {str(folder)!r} ({n} so far); wait for it to end (if that process is gone, delete "
                           f"{folder / LOCK_NAME})")
    if (n := interrupted_shards(folder)) is not None:
        raise DinokitError(f"the shards in {str(folder)!r} are those of an interrupted 'dinokit data shard' run "
                           f"({n} shard(s) written, {RECORD_FILE} does not say complete); delete the folder and run "
                           "'dinokit data shard' again")
