"""Mixed crop resolutions (DINOv3): every iteration's batch at one of several crop-size triples.

DINOv3 combines one data loader per (global, local, Gram) size triple and picks a loader per iteration. Here one
loader serves them all: the triple of global batch ``b`` is drawn from ``(seed, b)`` alone, so the per-image
transform (``crops.augmentation=pil``, in the data workers) and the batch collate (``tensor``/``device``) pick the
same triple without talking, every rank agrees, the data order is the single-resolution one, and a resumed run
sees the triples of an uninterrupted one. The options (one transform or collate per triple) are built by the
caller (``train/data.py``).
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from .samplers import derive_seed


class ResolutionMix:
    """Which of ``len(ratios)`` options stream position ``p`` (global batch ``p // global_batch_size``) uses."""

    def __init__(self, ratios: Sequence[float], *, seed: int, global_batch_size: int) -> None:
        self.ratios = [float(r) for r in ratios]
        self.seed = seed
        self.global_batch_size = global_batch_size

    def for_iteration(self, iteration: int) -> int:
        if len(self.ratios) == 1:
            return 0
        rng = random.Random(derive_seed(self.seed, iteration, "resolution"))
        return rng.choices(range(len(self.ratios)), weights=self.ratios)[0]

    def for_position(self, position: int) -> int:
        return self.for_iteration(position // self.global_batch_size)


class MixedTransform:
    """A per-image transform that applies the option of the image's iteration (``SSLDataset`` asks
    :meth:`for_position` first). Picklable, for data workers."""

    def __init__(self, options: Sequence[Any], mix: ResolutionMix) -> None:
        self.options, self.mix = list(options), mix

    def for_position(self, position: int) -> Any:
        return self.options[self.mix.for_position(position)]


class MixedCollate:
    """A collate that hands a batch of ``(position, sample)`` pairs to the option of its iteration (all positions
    of a batch belong to one global batch)."""

    def __init__(self, options: Sequence[Any], mix: ResolutionMix) -> None:
        self.options, self.mix = list(options), mix

    def __call__(self, batch: Sequence[tuple[int, Any]]) -> Any:
        return self.options[self.mix.for_position(min(position for position, _ in batch))](batch)
