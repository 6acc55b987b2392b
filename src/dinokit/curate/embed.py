"""Embedding a pool: features of every image, written as memory-mapped shards, resumable, per rank.

A folder ``WORK/<name>/`` holds ``paths.txt`` (every image of the set, in order) and, per shard of
``shard_size`` images, ``shard-NNNNN.<key>.npy`` arrays (one row per readable image: ``cls``, the
normalised class token for retrieval and clustering, and ``copy``, the copy-detection descriptor) and
``shard-NNNNN.json`` (which images the rows are, their file sizes, the unreadable ones). The JSON is
written last, so a shard with a JSON is complete: a killed run redoes only unfinished shards. Under
``torchrun`` rank ``r`` embeds shards ``r, r + world, ...`` and writes them itself; no rank ever holds the
features of the others.

The copy-detection descriptor: DINOv2 has no SSCD (the copy-detection network of the LVD-142M
pipeline; not installable here), so by default it is the GeM-pooled (p = 3, as SSCD pools) normalised
patch tokens of the same backbone, L2-normalised; ``cls`` uses the class token, and any other backbone
can be plugged in. Patch tokens keep the spatial layout that a crop or a text overlay disturbs only
locally, which is what copy detection needs; the class token is more semantic (two different photos of
one landmark score high).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from .. import distributed as du
from ..errors import DinokitError
from ..features import extract_features
from ..files import atomic_write
from .config import EmbedConfig

PATHS_FILE = "paths.txt"


def gem(tokens: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """Generalised mean over tokens (B, N, D) -> (B, D), signed so that negative activations count.

    ``sign(m)·|m|^(1/p)`` of ``m = mean(sign(x)·|x|^p)``: p = 1 is the mean, large p tends to the extreme
    activation. (SSCD pools non-negative ReLU maps; a ViT's tokens are signed.) Computed relative to each feature's
    largest magnitude, which is factored out and back in: ``|x|^p`` itself overflowed float32 for a large ``p``
    (every descriptor NaN, and dedup found no copy without a word).
    """
    magnitude = tokens.abs().clamp_min(1e-6)
    scale = magnitude.amax(dim=1, keepdim=True)  # (B, 1, D)
    mean = (tokens.sign() * (magnitude / scale).pow(p)).mean(dim=1)  # (B, N, D) -> (B, D)
    return mean.sign() * mean.abs().pow(1.0 / p) * scale[:, 0]


def curation_feature_fn(copy: str = "gem", gem_p: float = 3.0, copy_model: nn.Module | None = None) -> Callable:
    """``(model, images) -> {"cls": (B, D), "copy": (B, D')}``, both L2-normalised (no ``copy`` for ``cls``)."""

    def features(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model.forward_features(images)
        result = {"cls": F.normalize(out["x_norm_clstoken"].float(), dim=1)}
        if copy == "gem":
            result["copy"] = F.normalize(gem(out["x_norm_patchtokens"].float(), gem_p), dim=1)
        elif copy == "model":
            result["copy"] = F.normalize(copy_model.to(images.device).eval()(images).float(), dim=1)
        return result

    return features


# ---------------------------------------------------------------------------------------------- writing
def _shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def embed_set(
    dataset: Dataset,
    paths: list[str],
    folder: str | Path,
    *,
    model: nn.Module,
    feature_fn: Callable,
    config: EmbedConfig,
    device: torch.device,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    settings: str | None = None,
    files: dict | None = None,
    reuse: EmbeddingStore | None = None,
) -> int:
    """Embed every image of ``dataset`` (whose items are ``paths``) into shards under ``folder``; how many images
    this process took from ``reuse`` instead.

    Finished shards are kept; a different path list in an existing folder is an error. ``settings`` (a digest of
    what changes the features) and ``files`` (the model files' stamps) are recorded in each shard's JSON, for
    :func:`outdated` to compare. ``reuse``: the earlier embeddings of the set (same settings, see
    :func:`reusable_store`); an image listed there with the same file size is copied from it, not embedded again
    (one added image re-embedded the whole pool: shards are cut by position).
    """
    folder = Path(folder)
    rank, world = du.get_rank(), du.get_world_size()
    data = b"".join(os.fsencode(p) + b"\n" for p in paths)  # the names' bytes, whatever the locale
    listing = folder / PATHS_FILE
    if listing.is_file() and listing.read_bytes() != data:
        raise DinokitError(f"{folder} holds embeddings of other images; use a new --output-dir or delete {folder}")
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(listing) as tmp:
            tmp.write_bytes(data)
    du.barrier()
    n_shards = -(-len(paths) // config.shard_size)
    storage = np.float16 if config.storage == "float16" else np.float32
    earlier = {} if reuse is None else {reuse.paths[r]: j for j, r in enumerate(reuse.rows.tolist())}
    reused = 0
    for s in range(rank, n_shards, world):
        meta_file = folder / f"{_shard_name(s)}.json"
        if meta_file.is_file():
            continue  # finished in an earlier run
        start, stop = s * config.shard_size, min((s + 1) * config.shard_size, len(paths))
        sizes = {i: _file_size(paths[i]) for i in range(start, stop)}
        kept = {i: j for i in range(start, stop) if (j := earlier.get(paths[i])) is not None
                and sizes[i] and int(reuse.sizes[j]) == sizes[i]}  # type: ignore[union-attr]
        todo = [i for i in range(start, stop) if i not in kept]
        # skipped images are listed in the shard's JSON; the command line names the first and counts them all
        result = extract_features(
            model, Subset(dataset, todo), feature_fn=feature_fn, batch_size=config.batch_size,
            num_workers=config.num_workers, device=device, dtype=dtype, progress=progress,
            desc=f"embed {folder.name} {s + 1}/{n_shards}", distributed=False,
        ) if todo else None
        new = [] if result is None else result.indices.tolist()  # the dataset's own indices (a Subset passes them)
        rows = sorted([*kept, *new])
        # the keys and widths: of the new features, else of the earlier ones (every image to embed unreadable)
        keys = sorted(result.features) if new else reuse.keys if kept else []  # type: ignore[union-attr]
        at = {i: n for n, i in enumerate(rows)}
        for key in keys:
            value = np.empty((len(rows), result.features[key].shape[1] if new else reuse.dim(key)),  # type: ignore
                             dtype=np.float32)
            if new:
                value[[at[i] for i in new]] = result.features[key].numpy()  # type: ignore[union-attr]
            if kept:
                value[[at[i] for i in kept]] = reuse.load(key, np.array(list(kept.values()))).numpy()  # type: ignore
            with atomic_write(folder / f"{_shard_name(s)}.{key}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, value.astype(storage))
        reused += len(kept)
        meta = {"start": start, "stop": stop, "rows": rows, "keys": keys,
                "bad": [] if result is None else list(result.bad), "bytes": [sizes[i] for i in rows],
                "settings": settings, "files": files}
        with atomic_write(meta_file) as tmp:
            tmp.write_text(json.dumps(meta))
    du.barrier()
    return reused


def read_paths(listing: Path) -> list[str]:
    """The paths of a ``paths.txt``: one name's bytes per line, decoded as the file system does (under an ASCII
    locale a fixed UTF-8 gave names the file system could not encode); split at line feeds only (a name may hold a
    carriage return, a form feed or a Unicode line separator, where ``str.splitlines`` split it in two)."""
    return [os.fsdecode(name) for name in listing.read_bytes().split(b"\n")[:-1]]


def outdated(folder: str | Path, paths: list[str], settings: str | None = None,
             files: dict | None = None) -> str | None:
    """Why the embeddings in ``folder`` are not those of ``paths`` (images added, removed or reordered since) with
    ``settings`` (shards of other settings; not checked when None) and the model ``files`` (shards of other
    weights at the same path; not checked when None, nor for shards that did not record them); None when they
    are, or when there are none. Unreadable shard records are left to :class:`EmbeddingStore` to name."""
    folder = Path(folder)
    listing = folder / PATHS_FILE
    if not listing.is_file():
        return None
    before = read_paths(listing)
    if before != paths:
        old, new = set(before), set(paths)
        if old == new:
            return "its images are listed in another order than when they were embedded"
        return (f"its images changed since they were embedded ({len(new - old)} added, {len(old - new)} removed, "
                f"{len(new)} now)")
    for meta_file in sorted(folder.glob("shard-*.json")) if settings is not None else ():
        try:
            meta = json.loads(meta_file.read_text())
            earlier, earlier_files = meta.get("settings", ""), meta.get("files")
        except (OSError, ValueError, AttributeError):
            continue
        if earlier != settings:
            return ("its shards were embedded with other settings" if earlier else
                    "its shards were embedded by a dinokit before 2026-12-07, which did not record their settings")
        if files is not None and isinstance(earlier_files, dict) and earlier_files != files:
            return "its shards were embedded with model files that changed since (same path, other contents)"
    return None


def reusable_store(folder: str | Path, settings: str, files: dict) -> EmbeddingStore | None:
    """The finished embeddings in ``folder`` when they were made with ``settings`` and ``files`` (recorded: shards
    that did not record their model files are never reused), whatever images they list (the earlier embedding of a
    set whose images changed); None otherwise."""
    folder = Path(folder)
    if not (folder / PATHS_FILE).is_file():
        return None
    try:
        store = EmbeddingStore(folder)
    except DinokitError:  # unfinished or damaged: nothing to take from it
        return None
    if files and any(not isinstance(m.get("files"), dict) for m in store.shards):
        return None  # shards of a dinokit that did not record the model files: their weights cannot be told apart
    return None if outdated(folder, store.paths, settings, files) else store


def clear_set(folder: str | Path) -> None:
    """Delete the embeddings in ``folder`` (the files :func:`embed_set` writes), to embed the set again."""
    for path in Path(folder).glob("shard-*"):
        path.unlink(missing_ok=True)
    (Path(folder) / PATHS_FILE).unlink(missing_ok=True)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------- reading
class EmbeddingStore:
    """The embeddings in a folder written by :func:`embed_set`, read through memory maps.

    Rows are the readable images in path order; ``rows[i]`` is row i's index in ``paths``.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        listing = self.folder / PATHS_FILE
        if not listing.is_file():
            raise DinokitError(f"no embeddings in {self.folder}; run 'dinokit curate embed --force' to compute them")
        self.paths = read_paths(listing)
        self.shards: list[dict] = []
        while (stop := self.shards[-1]["stop"] if self.shards else 0) < len(self.paths):
            self.shards.append(self._meta(len(self.shards), stop))
        beyond = self.folder / f"{_shard_name(len(self.shards))}.json"
        if stop != len(self.paths) or beyond.exists():  # an edited paths.txt: its rows would name other images
            more = " and more" if beyond.exists() else ""
            raise DinokitError(f"{listing} lists {len(self.paths)} images, but the shard records beside it cover {stop}"
                               f"{more}: it was edited or damaged; restore it, or delete {self.folder} and rerun "
                               "'dinokit curate embed --force'")
        self.rows = np.array([r for m in self.shards for r in m["rows"]], dtype=np.int64)
        self.bad = [b for m in self.shards for b in m["bad"]]
        self.sizes = np.array([b for m in self.shards for b in m["bytes"]], dtype=np.int64)
        self._ends = np.cumsum([len(m["rows"]) for m in self.shards])
        self.keys = next((m["keys"] for m in self.shards if m["rows"]), ["cls"])

    def _meta(self, s: int, start: int) -> dict:
        """The record of shard ``s``, checked: it starts at image ``start`` and its rows are its images."""
        meta_file = self.folder / f"{_shard_name(s)}.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as err:
            raise DinokitError(f"embeddings file {meta_file} is missing or unreadable ({type(err).__name__}); "
                               "rerun 'dinokit curate embed --force' to finish the embedding (finished shards are "
                               "kept)") from None
        try:
            ok = (meta["start"] == start < meta["stop"] and len(meta["bytes"]) == len(meta["rows"])
                  and all(start <= i < meta["stop"] for i in [*meta["rows"], *meta["bad"]])
                  and isinstance(meta["keys"], list) and (meta["keys"] or not meta["rows"]))  # rows without arrays
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise DinokitError(f"embeddings file {meta_file} is damaged (not the record of a shard from image "
                               f"{start}); delete it and rerun 'dinokit curate embed --force' to recompute that shard")
        return meta

    def __len__(self) -> int:
        return len(self.rows)

    def _array(self, s: int, key: str) -> np.ndarray:
        if key not in self.shards[s]["keys"]:
            key = "cls"  # embed.copy=cls: the class token is the copy descriptor
        path = self.folder / f"{_shard_name(s)}.{key}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DinokitError(f"embeddings file {path} is unreadable ({type(err).__name__}: {err}); delete it and "
                               f"{_shard_name(s)}.json and rerun 'dinokit curate embed --force' to recompute that shard") from None
        if array.ndim != 2 or len(array) != len(self.shards[s]["rows"]):
            raise DinokitError(f"embeddings file {path} has shape {array.shape}, not ({len(self.shards[s]['rows'])}, D); "
                               f"delete it and {_shard_name(s)}.json and rerun 'dinokit curate embed --force'")
        return array

    def load(self, key: str, rows: np.ndarray | slice | None = None) -> torch.Tensor:
        """float32 (n, D) features ``key`` (``cls`` or ``copy``) of ``rows`` (row indices, in the order given; default
        all), read shard by shard straight into the output (no second copy of the rows while they are gathered)."""
        if rows is None:
            rows = slice(0, len(self))
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim(key)), dtype=np.float32)
        starts = np.concatenate([[0], self._ends[:-1]])
        shard_of = np.searchsorted(self._ends, rows, side="right")
        for s in np.unique(shard_of):
            chosen = shard_of == s
            out[chosen] = self._array(int(s), key)[rows[chosen] - starts[s]]
        return torch.from_numpy(out)

    def dim(self, key: str) -> int:
        filled = [s for s, m in enumerate(self.shards) if m["rows"]]
        return int(self._array(filled[0], key).shape[1]) if filled else 0

    def row_paths(self, rows: np.ndarray) -> list[str]:
        return [self.paths[i] for i in self.rows[np.asarray(rows, dtype=np.int64)]]
