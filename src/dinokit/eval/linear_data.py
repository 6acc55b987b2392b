"""The endless training streams of the linear probes: cached features or augmented images through the frozen
backbone, each rank its share of a fresh permutation per pass."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .. import distributed as du
from ..data import ImageDataset, collate_skip_bad
from ..data.loaders import init_worker
from ..data.samplers import SeededDraws, seeded_batches
from ..features import autocast_context
from .feature_cache import linear_feature_parts

# One training batch of frozen features: class tokens (B, n, D), patch-token mean (B, D), labels (B,).
FeatureBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class InfiniteShuffle(Sampler[int]):
    """Endless passes over ``n`` indices, a fresh permutation per pass; rank r takes every world-th. ``start``
    skips that many of this rank's indices (a resumed run continues the stream where it stopped)."""

    def __init__(self, n: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        skip = self.start
        while True:
            share = torch.randperm(self.n, generator=generator)[self.rank :: self.world_size]
            if skip >= len(share):  # a whole pass consumed before: its permutation only advances the generator
                skip -= len(share)
                continue
            yield from share[skip:].tolist()
            skip = 0


class StreamPosition:
    """How many batches a stream has handed out (counted from a resumed run's start) and the images it found
    unreadable: what a running checkpoint records to continue the stream."""

    def __init__(self, batches: int = 0, unreadable: set[int] | None = None) -> None:
        self.batches, self.unreadable = batches, set(unreadable or ())


def cached_batches(
    cls_tokens: torch.Tensor, patch_mean: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int = 0,
    device: torch.device | str = "cpu", position: StreamPosition | None = None,
) -> Iterator[FeatureBatch]:
    """Endless shuffled batches of precomputed features (this rank's share), from ``position`` on (counted)."""
    position = position if position is not None else StreamPosition()
    order = iter(InfiniteShuffle(len(labels), seed=seed, rank=du.get_rank(), world_size=du.get_world_size(),
                                 start=position.batches * batch_size))
    while True:
        idx = torch.tensor([next(order) for _ in range(batch_size)])
        position.batches += 1
        yield cls_tokens[idx].to(device), patch_mean[idx].to(device), labels[idx].to(device)


def augmented_batches(
    backbone: nn.Module, dataset: ImageDataset, *, batch_size: int, num_workers: int = 0, seed: int = 0,
    device: torch.device | str = "cpu", dtype: torch.dtype | None = None, position: StreamPosition | None = None,
) -> Iterator[FeatureBatch]:
    """Endless batches of frozen features of augmented images (``dataset`` carries the train transform), from
    ``position`` on; the batches are counted and the indices of unreadable images recorded in ``position``.

    Each image's random crop and flip draw from a seed of (``seed``, rank, batch, place in the batch), so the stream
    is the same with any number of workers, a resumed stream continues with the draws of an unbroken one, and the
    caller's random states are left as they were."""
    device = torch.device(device)
    position = position if position is not None else StreamPosition()
    rank = du.get_rank()
    order = iter(InfiniteShuffle(len(dataset), seed=seed, rank=rank, world_size=du.get_world_size(),
                                 start=position.batches * batch_size))
    batches = iter(lambda: [next(order) for _ in range(batch_size)], None)  # endless
    keyed = seeded_batches(batches, seed + 7919 * rank, position.batches, "linear")
    loader = DataLoader(
        SeededDraws(dataset), batch_sampler=keyed, num_workers=num_workers, collate_fn=collate_skip_bad,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed),
        worker_init_fn=init_worker if num_workers > 0 else None,  # a SIGTERM to the group: the main process stops
    )
    for batch in loader:
        position.batches += 1
        position.unreadable.update(batch["bad"])
        if batch["image"] is None:
            continue  # every image of the batch was unreadable
        with torch.no_grad(), autocast_context(device, dtype):
            parts = linear_feature_parts(backbone, batch["image"].to(device, non_blocking=True))
        yield parts["cls_tokens"], parts["patch_mean"], batch["target"].to(device)
