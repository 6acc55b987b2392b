"""Evaluation features: what each protocol reads from the frozen backbone (``cls`` for k-NN and logistic
regression, ``linear`` for the linear probe), their extraction, and their cache on disk.

Features are extracted once per (weights, architecture, image size, dtype, dataset, feature kind) and cached
under ``OUTPUT_DIR/features/<model key>/``, so ``knn``, ``logreg`` and ``linear`` on the same model and data
extract once. A cache file that cannot be read is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import distributed as du
from ..data import ImageDataset
from ..data.images import decoding_settings
from ..data.imagenet import EntryPaths
from ..data.listing import PathColumn
from ..errors import DinokitError
from ..features import ExtractedFeatures, cls_feature_fn, extract_features
from ..files import atomic_write
from ..models.linear_classifier import feature_parts


def linear_feature_parts(model: nn.Module, images: torch.Tensor, n_last_blocks: int = 4) -> dict[str, torch.Tensor]:
    """The linear probe's features: class tokens of the last blocks (B, n, D), oldest first, and the
    mean of the last block's patch tokens (B, D), all after the final norm (official layout)."""
    n = min(n_last_blocks, len(model.blocks))
    cls_tokens, patch_mean = feature_parts(model.get_intermediate_layers(images, n=n, return_class_token=True, norm=True))
    return {"cls_tokens": cls_tokens.float(), "patch_mean": patch_mean.float()}


FEATURE_KINDS: dict[str, Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]] = {
    "cls": cls_feature_fn,  # forward(): the normalised class token (k-NN, logistic regression)
    "linear": linear_feature_parts,
}


def extract_eval_features(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    kind: str,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "features",
) -> ExtractedFeatures:
    """Run ``dataset`` through ``model`` and return its features of ``kind`` (a key of ``FEATURE_KINDS``)."""
    result = extract_features(
        model, dataset, feature_fn=FEATURE_KINDS[kind], batch_size=batch_size, num_workers=num_workers,
        device=device, dtype=dtype, progress=progress and du.is_main_process(), desc=desc,
    )
    if result.bad and du.is_main_process():  # the gathered list: the same on every process
        print(f"{desc}: skipped {len(result.bad)} unreadable image(s), e.g. {dataset.paths[result.bad[0]]}")
    if len(result.targets) == 0:
        raise DinokitError(f"no image of {dataset.name!r} could be read; check the files")
    return result


class FeatureCache:
    """Features on disk: ``root/<model key>/<split>-<kind>-<dataset key>.pt``, plain tensors only.

    ``root=None`` disables caching. The model key hashes ``model_description`` (weights identity,
    architecture), the image size and the dtype; the dataset key hashes its string, file list (names, sizes and
    modification times) and labels, and the
    decoding settings of ``$DINOKIT_IMAGE_BACKGROUND``, ``$DINOKIT_EXIF_ORIENTATION`` and ``$DINOKIT_MAX_IMAGE_PIXELS``.
    """

    def __init__(self, root: str | Path | None, model_description: dict[str, Any]) -> None:
        self.model_description = model_description
        self.folder = None
        if root is not None:
            self.folder = Path(root) / _digest(model_description)
        # each path sequence's file digest, made once: it reads the status of every file (about 10 s for 1.28M
        # images on a local disk, minutes on a network one), and a split is looked up twice when its class tokens
        # are missing
        self._file_digests: dict[tuple[int, bytes], tuple[Any, str]] = {}

    def _files_digest(self, dataset: ImageDataset) -> str:
        """The digest of ``dataset``'s file names, labels, sizes and modification times. Kept for a path sequence
        that cannot change (a :class:`PathColumn`, ImageNet's entries) with the same labels; a shard member's
        sizes and times are its shard file's."""
        paths, labels = dataset.paths, repr(dataset.targets).encode()
        memo = (id(paths), hashlib.sha1(labels).digest())
        known = self._file_digests.get(memo)
        if known is not None and known[0] is paths:
            return known[1]
        names = "\n".join(map(str, paths)).encode(errors="surrogateescape")  # names that are not UTF-8 too
        files = hashlib.sha1(names + labels)
        containers: dict[str, bytes] = {}
        for path in paths:  # a file replaced by other pixels under its name gets new features
            try:
                stat = os.stat(path)
                files.update(f"{stat.st_size} {stat.st_mtime_ns}\n".encode())
            except (OSError, TypeError, ValueError):  # a shard member's "shard/key" name: its shard's status
                files.update(_container_status(os.path.dirname(path), containers))
        if isinstance(paths, (PathColumn, EntryPaths)):  # sequences that cannot change
            self._file_digests[memo] = (paths, files.hexdigest())
        return files.hexdigest()

    def _path(self, split: str, kind: str, dataset: ImageDataset) -> Path:
        key = _digest({"dataset": dataset.name, "files": self._files_digest(dataset), "decoding": decoding_settings()})
        return self.folder / f"{split}-{kind}-{key[:12]}.pt"

    def get(
        self, split: str, kind: str, dataset: ImageDataset, extract: Callable[[], ExtractedFeatures]
    ) -> ExtractedFeatures:
        """Cached features of ``dataset``, else ``extract()`` (a collective: every rank calls it) saved."""
        if self.folder is None:
            return extract()
        path = self._path(split, kind, dataset)
        loaded = _load(path)
        if loaded is None and kind == "cls":  # the linear probe's features hold the class tokens too
            loaded = _derive_cls(_load(self._path(split, "linear", dataset)))
        if all(du.all_gather_object(loaded is not None)):
            return loaded
        result = extract()
        if du.is_main_process():
            _save(result, path, self.model_description)
        du.barrier()
        return result


def _container_status(folder: str, known: dict[str, bytes]) -> bytes:
    """``size mtime`` of the file that holds a member (a tar shard), ``-`` when there is none (known: per file)."""
    if folder not in known:
        try:
            stat = os.stat(folder)
            known[folder] = f"in {stat.st_size} {stat.st_mtime_ns}\n".encode() if os.path.isfile(folder) else b"-\n"
        except (OSError, ValueError):
            known[folder] = b"-\n"
    return known[folder]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save(result: ExtractedFeatures, path: Path, description: dict[str, Any]) -> None:
    payload = {
        "features": {k: v.contiguous() for k, v in result.features.items()},
        "indices": result.indices,
        "targets": result.targets,
        "bad": torch.as_tensor(list(result.bad), dtype=torch.long),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "model.json").write_text(json.dumps(description, indent=1, default=str))
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def _load(path: Path) -> ExtractedFeatures | None:
    """The cached :class:`ExtractedFeatures` at ``path``, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        features = {str(k): v for k, v in payload["features"].items()}
        n = len(payload["targets"])
        if not features or any(not isinstance(v, torch.Tensor) or len(v) != n for v in features.values()):
            raise ValueError("inconsistent feature rows")
        return ExtractedFeatures(
            features=features, indices=payload["indices"], targets=payload["targets"], bad=payload["bad"].tolist()
        )
    except Exception as err:  # any damage (truncation, foreign file) means: extract again
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}".rstrip(": ")
        warnings.warn(f"ignoring unreadable feature cache {path} ({reason}); recomputing", stacklevel=2)
        return None


def _derive_cls(linear: ExtractedFeatures | None) -> ExtractedFeatures | None:
    """``cls`` features from cached ``linear`` ones: the last block's normalised class token is ``forward()``."""
    if linear is None:
        return None
    linear.features = {"cls": linear.features["cls_tokens"][:, -1].contiguous()}
    return linear
