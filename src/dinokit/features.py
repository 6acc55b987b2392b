"""Batched feature extraction over an image dataset, shared by ``dinokit embed`` and the evaluations.

Bad images never stop a run: the dataset yields ``None`` for them, they are dropped from the batch
and their indices are returned. With several processes each rank embeds a strided shard and the
results are gathered on every rank, back in dataset order.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm import tqdm

from .data.images import collate_skip_bad
from .data.indexed import IndexedItems, IndexedStream
from .data.loaders import init_worker
from .devices import resolve_dtype, usable_device
from .distributed import all_gather_cat, all_gather_object, comm_device, get_rank, get_world_size
from .errors import DinokitError

FeatureFn = Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class ExtractedFeatures:
    """Features of the readable images, in dataset order."""

    features: dict[str, torch.Tensor]
    """Each (N_ok, ...) float32 on the CPU, one row per readable image."""
    indices: torch.Tensor
    """(N_ok,) dataset indices of the rows."""
    targets: torch.Tensor
    """(N_ok,) int64 targets from the dataset items (-1 when unlabelled)."""
    bad: list[int]
    """Dataset indices of the images that could not be read."""
    seconds: float = field(default=0.0, compare=False)
    """Wall time of the extraction (this rank), for throughput reports."""

    def __len__(self) -> int:
        return len(self.indices)


def cls_feature_fn(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The default: ``model(images)``, the normalised class token of a DINOv2 backbone."""
    return {"cls": model(images)}


def embedding_feature_fn(*, patch_mean: bool = False, patch_tokens: bool = False) -> FeatureFn:
    """What ``dinokit embed`` computes: ``cls`` (= ``model(images)``), and optionally ``patch_mean`` (the mean of
    the normalised patch tokens, (B, D)) and ``patch_tokens`` ((B, N, D))."""

    def embed(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model.forward_features(images)
        features = {"cls": out["x_norm_clstoken"]}
        if patch_mean:
            features["patch_mean"] = out["x_norm_patchtokens"].mean(dim=1)
        if patch_tokens:
            features["patch_tokens"] = out["x_norm_patchtokens"]
        return features

    return embed


FP16_ON_CPU = "fp16 is not supported on CPU; running in fp32"


def check_image_size(image_size: int, model: nn.Module, option: str = "--image-size") -> None:
    """One line when ``image_size`` is under one patch of ``model`` (the crop of the input to a patch multiple would
    leave nothing): every command that resizes images for a backbone checks it before any image is read."""
    patch = getattr(model, "patch_size", None)
    if isinstance(patch, int) and image_size < patch:
        raise DinokitError(f"{option} {image_size} is smaller than the model's {patch}-pixel patch; use at least "
                           f"{patch}")


def inference_dtype(device: torch.device, dtype: torch.dtype, *, say: bool = True) -> torch.dtype:
    """The dtype the features are computed in: ``dtype``, except fp16 on the CPU, which runs in fp32.

    For commands: with ``say``, the fp32 fallback is one line on stderr (``warning: ...``, as dinokit's other
    warnings end a command), once, when the options are resolved, rather than a Python warning with a source line.
    """
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        if say:
            print(f"warning: {FP16_ON_CPU}", file=sys.stderr)
        return torch.float32
    return dtype


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast for bf16/fp16 where supported; fp16 on the CPU runs in fp32 (with a warning: the commands pass
    :func:`inference_dtype`'s result, so this one is for Python callers)."""
    if dtype in (None, torch.float32):
        return nullcontext()
    if device.type == "cpu" and dtype == torch.float16:
        warnings.warn(FP16_ON_CPU, stacklevel=3)
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


GATHER_CHUNK_BYTES = 64 << 20  # sent per rank and collective by the feature gather


def _gather(parts: dict[str, list[torch.Tensor]], indices: list[torch.Tensor], targets: list[torch.Tensor],
            bad: list[int], distributed: bool = True
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, list[int]]:
    """Every rank's rows (if ``distributed`` under torchrun; else this process's) as tensors in dataset-index order;
    a repeated index (a ConcatDataset, a Subset) keeps each of its rows, in the order they were read.

    Each output is allocated once and filled: in one process batch by batch, each batch released once copied (the
    batches, their concatenation and its reordered copy were alive together: 3.5x the features); across ranks by
    tensor collectives of at most :data:`GATHER_CHUNK_BYTES` per rank, not pickled objects (which NCCL stages whole
    on every GPU: the 26 GB of ViT-L's linear-probe features of ImageNet, on each).
    """
    local_index = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long)
    if not (distributed and get_world_size() > 1):
        index, place = _order(local_index)
        rows = list(torch.split(place, [len(i) for i in indices]))
        features = {k: _fill(batches, rows) for k, batches in parts.items() if batches}
        target = _fill(targets, rows) if targets else torch.empty(0, dtype=torch.long)
        return features, index, target, sorted(bad)
    shapes = {k: (tuple(v[0].shape[1:]), v[0].dtype) for k, v in parts.items() if v}
    meta = all_gather_object((len(local_index), shapes, bad))
    sizes = [m[0] for m in meta]
    shapes = {k: v for m in meta for k, v in m[1].items()}
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    gathered = _gather_rows(local_index, sizes, (), torch.long, [torch.arange(a, a + n) for a, n in zip(starts, sizes)])
    index, place = _order(gathered)
    places = [place[a : a + n] for a, n in zip(starts, sizes)]  # where each rank's rows go
    features = {}
    for key, (shape, dtype) in shapes.items():
        local = torch.cat(parts.pop(key)) if parts.get(key) else torch.empty((0, *shape), dtype=dtype)
        features[key] = _gather_rows(local, sizes, shape, dtype, places)
        del local
    local_targets = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
    target = _gather_rows(local_targets, sizes, (), torch.long, places)
    return features, index, target, sorted(i for m in meta for i in m[2])


def _order(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the indices sorted, stably; where each gathered row goes in that order)."""
    order = torch.argsort(gathered, stable=True)
    place = torch.empty_like(order)
    place[order] = torch.arange(len(order))
    return gathered[order], place


def _fill(batches: list[torch.Tensor], rows: list[torch.Tensor]) -> torch.Tensor:
    """One tensor whose rows ``rows[j]`` are batch ``j``; each batch released (set to None) once copied."""
    out = batches[0].new_empty((sum(len(r) for r in rows), *batches[0].shape[1:]))
    for j, at in enumerate(rows):
        out[at] = batches[j]
        batches[j] = None
    return out


def _gather_rows(local: torch.Tensor, sizes: list[int], shape: tuple, dtype: torch.dtype,
                 places: list[torch.Tensor]) -> torch.Tensor:
    """Rank r's ``sizes[r]`` rows of ``shape`` gathered on every rank, in chunks, into rows ``places[r]`` of one
    tensor."""
    device = comm_device()
    row_bytes = max(1, math.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    step = max(1, min(GATHER_CHUNK_BYTES // row_bytes, max(sizes)))  # the same on every rank
    out = torch.empty((sum(sizes), *shape), dtype=dtype)
    for begin in range(0, max(sizes), step):
        piece = torch.zeros((step, *shape), dtype=dtype, device=device)
        mine = local[begin : begin + step]
        piece[: len(mine)] = mine.to(device)
        received = all_gather_cat(piece).cpu().view(len(sizes), step, *shape)
        for r, n in enumerate(sizes):
            count = max(0, min(step, n - begin))
            if count:
                out[places[r][begin : begin + count]] = received[r, :count]
    return out


class _CompletedEvent:
    """A CPU stand-in for ``torch.cuda.Event``: work on the CPU is done when it returns."""

    def record(self) -> None: ...

    def synchronize(self) -> None: ...


class HostCopies:
    """Collects each batch's outputs as float32 host tensors, in order, without making the host wait for the device.

    On a GPU a batch's copy is queued behind its compute (non-blocking, into pinned memory) with an event, and
    collected only after the next batch has been queued: the GPU never idles while the host decodes, moves and
    launches the next batch, and at most two batches of pinned memory are held (each collected batch is copied
    out into ordinary memory). On a CPU the outputs are kept as they are. Call :meth:`flush` after the last batch.
    """

    def __init__(self, device: torch.device, asynchronous: bool | None = None) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}
        cuda = device.type == "cuda"
        self.asynchronous = cuda if asynchronous is None else asynchronous  # (tests run the queue on a CPU)
        self._pin, self._event = cuda, (torch.cuda.Event if cuda else _CompletedEvent)
        self._pending: tuple[dict[str, torch.Tensor], object] | None = None

    def add(self, out: dict[str, torch.Tensor]) -> None:
        if not self.asynchronous:
            self._keep({key: value.float().cpu() for key, value in out.items()})
            return
        staged = {}
        for key, value in out.items():
            staged[key] = torch.empty(value.shape, dtype=torch.float32, pin_memory=self._pin)
            staged[key].copy_(value.float(), non_blocking=True)
        event = self._event()
        event.record()
        self.flush()  # the previous batch: its copy finished while this batch was being queued
        self._pending = (staged, event)

    def flush(self) -> None:
        if self._pending is not None:
            staged, event = self._pending
            self._pending = None
            event.synchronize()
            self._keep({key: value.clone() for key, value in staged.items()})  # out of pinned memory

    def _keep(self, out: dict[str, torch.Tensor]) -> None:
        for key, value in out.items():
            self.parts.setdefault(key, []).append(value)


def feature_runner(feature_fn: FeatureFn, model: nn.Module, batch_size: int, backend: str | Callable | None = None):
    """``images -> feature_fn(model, images)``; with a compile ``backend``, compiled for ``batch_size`` images:
    shorter batches are padded with zeros and their outputs cut back (the images are independent, so padding
    does not change the real rows)."""
    if backend is None:
        return lambda images: feature_fn(model, images)
    compiled = torch.compile(lambda images: feature_fn(model, images), backend=backend, dynamic=False)

    def run(images: torch.Tensor) -> dict[str, torch.Tensor]:
        n = images.shape[0]
        if n < batch_size:
            images = torch.cat([images, images.new_zeros((batch_size - n, *images.shape[1:]))])
        return {key: value[:n] for key, value in compiled(images).items()}

    return run


def _model_input(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float images in the model's dtype (fp16 images of an fp32 model); integer images are one line: they are
    pixels before the transform that normalises them."""
    if not images.is_floating_point():
        raise DinokitError(f"the dataset's images are {str(images.dtype).removeprefix('torch.')} tensors: give "
                           "normalised float images, e.g. with dinokit.data.make_classification_eval_transform()")
    return images.to(dtype)


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    feature_fn: FeatureFn | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    desc: str = "features",
    distributed: bool = True,
    compile_backend: str | Callable | None = None,
) -> ExtractedFeatures:
    """Run ``feature_fn(model, images)`` over ``dataset`` (items ``(index, image_or_None, target)``; those of a
    dataset of ``(image, target)`` pairs or bare images, such as torchvision's, are numbered in order).

    ``feature_fn`` returns a dict of (B, ...) tensors; the default gives ``{"cls": model(images)}``.
    ``distributed=False``: this process embeds all of ``dataset`` alone and keeps the result (no
    sharding over ranks, no gather), for callers that already split the work per rank.
    ``dtype`` bf16/fp16 runs under autocast. The model is moved to ``device`` and put in eval mode
    for the duration (its training flag is restored afterwards).
    ``compile_backend`` (e.g. "inductor"): ``feature_fn`` runs under ``torch.compile`` with static shapes; every
    batch is padded to ``batch_size`` (a short last batch, or one that lost bad images) and its outputs cut back,
    so one graph serves the whole dataset.
    """
    device = usable_device(device)
    amp = autocast_context(device, resolve_dtype(dtype, device, key="dtype"))
    dataset = IndexedStream(dataset) if isinstance(dataset, IterableDataset) else IndexedItems(dataset)
    sized = hasattr(dataset.base, "__len__")  # a stream may not know its length
    feature_fn = feature_fn or cls_feature_fn
    rank, world = (get_rank(), get_world_size()) if distributed else (0, 1)
    if world > 1 and isinstance(dataset, IndexedStream):
        raise DinokitError("extract_features shards a dataset over the processes by index, which a stream has not: "
                           "give each process its own share and distributed=False")
    shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
        collate_fn=collate_skip_bad,
        pin_memory=device.type == "cuda",
        worker_init_fn=init_worker if num_workers > 0 else None,  # a SIGTERM to the group: the main process stops
        generator=torch.Generator().manual_seed(0),  # the loader's seed draw leaves the caller's generator alone
    )
    outputs = HostCopies(device)
    indices: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    bad: list[int] = []
    was_training = model.training
    model.to(device).eval()
    param_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    run = feature_runner(feature_fn, model, batch_size, compile_backend)
    start = time.perf_counter()
    # Shown by rank 0 for the whole dataset: its own share's progress times the number of processes (shares
    # differ by one image at most), so that the count and the rate are the job's.
    bar = tqdm(total=len(dataset) if sized else None, desc=desc, unit="img", disable=not progress or rank != 0,
               dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for batch in loader:
                done = world * (len(batch["index"]) + len(batch["bad"]))
                bar.update(done if bar.total is None else min(done, bar.total - bar.n))
                bad.extend(batch["bad"])
                if batch["image"] is None:
                    continue
                images = batch["image"].to(device, non_blocking=True)
                if images.dtype != param_dtype:  # uint8: unnormalised; half: a dtype-mismatch traceback
                    images = _model_input(images, param_dtype)
                with amp:
                    outputs.add(run(images))
                indices.append(batch["index"])
                targets.append(batch["target"])
            outputs.flush()
        if bar.total is not None:
            bar.update(bar.total - bar.n)
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    # Outside inference mode, so the gathered tensors are ordinary ones (usable to train probes).
    features, index, target, bad = _gather(outputs.parts, indices, targets, bad, distributed)
    return ExtractedFeatures(features=features, indices=index, targets=target, bad=bad, seconds=seconds)
