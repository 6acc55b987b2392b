"""WebDataset tar shards as a random-access dataset: ``WebDataset:urls=shards/{000000..000099}.tar``.

A shard is a tar file whose members are grouped into samples by key (the member name up to the first
dot of its file name): ``000042.jpg`` and ``000042.cls`` form sample ``000042`` with an image and an
integer label. This module indexes every member's byte range once, so that sample ``i`` of the
concatenated shards is one ``seek`` + ``read``. That keeps the design of the rest of the data
pipeline: pretraining draws stream position ``p`` from ``(seed, p)`` (see :mod:`dinokit.data.samplers`),
positions are split between ranks and DataLoader workers by the sampler (each sample once per pass,
on exactly one rank and worker), and a resumed run continues at its exact data position with no
extra state. Reading a sample costs what reading one file of an ``ImageFolder`` costs.

URLs: local paths, brace ranges (``{000..099}``, zero-padded) and lists (``{a,b}``), several patterns
joined by ``::``. Anything else the ``webdataset`` library opens (``http://``, ``s3://`` via ``pipe:``...)
is copied once into a local cache (``DINOKIT_SHARD_CACHE``, default ``~/.cache/dinokit/shards``) and
then read like a local shard; that needs ``pip install 'dinokit[webdataset]'``.

Labels come from a ``cls`` (or ``label``) member; class names from ``classes.txt`` beside the shards
(written by :func:`write_shards`). A sample without an image, or whose image does not decode, yields
``None`` and is skipped and counted by the collate functions, as a bad file is elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from ..errors import DinokitError
from .datasets import ImageDataset, parse_dataset_str
from .images import IMAGE_EXTENSIONS, load_image

_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_LABEL_EXTS = ("cls", "label")
_BRACE = re.compile(r"\{([^{}]*)\}")
CLASSES_FILE = "classes.txt"
SOURCES_FILE = "sources.txt"


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
        from ..files import atomic_write

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
        paths = [Path(f"{shards[s.shard]}/{s.key}") for s in samples]  # display names: shard/key
        super().__init__(paths, [s.target for s in samples], classes, transform, name)
        self.shards = list(shards)
        self.samples = samples
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(self.shards[shard], "rb")
        return self._files[shard]

    def read_image(self, index: int) -> Image.Image:
        sample = self.samples[index]
        if sample.image is None:
            raise ValueError("the sample has no image member")
        offset, size = sample.image
        f = self._file(sample.shard)
        f.seek(offset)
        return load_image(io.BytesIO(f.read(size)), draft_size=self.draft_size)  # decoded like any image file


def make_shard_dataset(urls: str, *, transform: Callable | None = None, labelled: bool = False,
                       dataset_str: str = "") -> ShardDataset:
    """The dataset of ``WebDataset:urls=PATTERN`` (see the module notes)."""
    shards = [local_shard(u) for u in expand_urls(urls)]
    if not shards:
        raise DinokitError(f"WebDataset urls {urls!r} name no shard")
    samples = [s for i, path in enumerate(shards) for s in index_shard(path, i)]
    if not samples:
        raise DinokitError(f"the shards of {urls!r} hold no samples")
    targets = [s.target for s in samples]
    if labelled and min(targets) < 0:
        raise DinokitError(f"{dataset_str or urls!r} has samples without a label; labelled use needs a .cls member per sample")
    names_file = shards[0].parent / CLASSES_FILE
    if names_file.is_file():
        classes = names_file.read_text().splitlines()
    else:
        classes = [str(i) for i in range(max(targets) + 1)]
    return ShardDataset(shards, samples, classes, transform, dataset_str or f"WebDataset:urls={urls}")


# ---------------------------------------------------------------------------------------------- writing
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


def check_shard_out(out_dir: str | Path, source: str | None = None) -> Path:
    """``out_dir`` as a Path, refusing a file, the ``source`` folder (a folder or a dataset string's ``root=``) or a
    folder inside it, and a folder that is not empty: new shards beside stale ones would be read together by
    ``DIR/*.tar`` or an old brace range, and ``classes.txt`` would replace a file of that name."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise DinokitError(f"--out {str(out_dir)!r} is a file, not a folder; give a new or empty folder")
    root, out = _source_folder(source), out_dir.resolve()
    if root is not None and root in (out, *out.parents):
        where = "the" if root == out else "inside the"
        raise DinokitError(f"--out {str(out_dir)!r} is {where} source folder {str(root)!r}; give a folder outside it "
                           "for the shards")
    if out_dir.is_dir() and any(p.suffix == ".tar" for p in out_dir.iterdir()):
        raise DinokitError(f"--out {str(out_dir)!r} already holds shards; give an empty folder")
    if out_dir.is_dir() and (found := min(out_dir.iterdir(), default=None)) is not None:
        raise DinokitError(f"--out {str(out_dir)!r} is not empty (it holds {found.name!r}); give a new or empty folder")
    from ..engine.run_dir import check_writable

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


def write_shards(dataset: ImageDataset, out_dir: str | Path, *, shard_size: int,
                 max_size: int | None = None) -> tuple[list[Path], list[tuple[Path, str]], int]:
    """Write ``dataset``'s readable image files into ``out_dir/000000.tar``, ... (``shard_size`` samples each);
    return the shards, the ``(path, reason)`` of each file left out because it does not decode as an image (a text
    file named .jpg, a truncated or empty file) and how many images were resized.

    Sample ``i`` is ``%09d`` of its position among the written samples: ``.<ext>`` holds the original bytes, or,
    with ``max_size``, an image whose short side is above it resized to it (:func:`shrink`; stored as the readers
    see it: RGB, transparency composited), so that training decodes small files; ``.cls`` holds the label when
    there is one; ``classes.txt`` the class names, ``sources.txt`` each sample's file (line i, absolute). Shards
    are written atomically; nothing is written when no image is readable (a :class:`DinokitError` then names the
    first file).
    """
    if shard_size < 1:
        raise DinokitError(f"--shard-size must be >= 1, got {shard_size}")
    if max_size is not None and max_size < 1:
        raise DinokitError(f"--max-size must be at least 1 pixel, got {max_size}")
    out_dir = check_shard_out(out_dir)
    written: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    pending: list[tuple[str, bytes, int]] = []  # (extension, bytes, label) of the next shard's samples
    sources: list[str] = []  # the file of each sample, in key order
    count = resized = 0

    def flush() -> None:
        from ..files import atomic_write

        path = out_dir / f"{len(written):06d}.tar"
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
        (out_dir / CLASSES_FILE).write_text("\n".join(dataset.classes) + "\n")
    # line i: the file sample i (key %09d) came from, so that an embedding of the shards leads back to the images
    (out_dir / SOURCES_FILE).write_text("".join(f"{p}\n" for p in sources), errors="surrogateescape")
    return written, unreadable, resized


def shard_pattern(paths: Iterable[Path]) -> str:
    """The brace pattern naming ``paths`` written by :func:`write_shards` (``DIR/{000000..000012}.tar``)."""
    paths = list(paths)
    if len(paths) == 1:
        return str(paths[0])
    return f"{paths[0].parent}/{{{paths[0].stem}..{paths[-1].stem}}}.tar"
