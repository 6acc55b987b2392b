"""The SSL sample stream: positions, and seeds derived from positions.

Pretraining reads an infinite stream of samples. Sample ``p`` (``p = 0, 1, 2, ...``) is global
batch ``p // B_tot``, with ``B_tot = batch_size_per_rank * world_size``. Everything random about a
sample (which image, which crops, which masks) is a function of ``(seed, p)`` only, so:

* the data order does not depend on the number of DataLoader workers, and
* a run resumed at iteration ``k`` sees exactly the batches ``k, k+1, ...`` of an uninterrupted run,
  given ``start = k * B_tot``.

The official ``SHARDED_INFINITE`` sampler was seeded with the start iteration, so the data order was
not restored on resume; this design fixes that.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import DinokitError


def derive_seed(*keys: int | str) -> int:
    """A well-mixed 63-bit seed from a tuple of ints/strings (e.g. ``(seed, position, "crops")``).

    ``np.random.SeedSequence`` hashes the whole tuple, so nearby keys give unrelated streams, unlike
    ``seed + position``. Strings are hashed through their UTF-8 bytes (stable across processes,
    unlike ``hash()``).
    """
    entropy = []
    for key in keys:
        if isinstance(key, str):
            entropy.append(int.from_bytes(key.encode(), "little"))
        else:
            if key < 0:
                raise ValueError(f"seed keys must be non-negative, got {key}")
            entropy.append(int(key))
    # 63 bits: valid for torch.manual_seed, random.Random and numpy alike.
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed the global torch (CPU), Python ``random`` and numpy RNGs, restoring them on exit.

    torchvision transforms draw from the global torch generator; user transforms may use ``random``
    or ``np.random``. Restoring keeps the caller's streams untouched (no hidden global state).
    """
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    # The CPU generator only: torch.manual_seed would also seed every accelerator (0.4 ms per call).
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's legacy seed takes 32 bits
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class InfiniteStreamSampler(Sampler[int]):
    """Yields this rank's stream positions forever, starting at global position ``start``.

    Global batch ``b`` covers positions ``[b * B_tot, (b + 1) * B_tot)``; rank ``r`` takes the
    contiguous part ``[b * B_tot + r * B, b * B_tot + (r + 1) * B)`` with ``B = batch_size_per_rank``.
    Use it with ``DataLoader(batch_size=batch_size_per_rank)`` so each batch is one such part.

    Checkpoint state is just the iteration: resume with ``start = iteration * B_tot``
    (see :meth:`for_iteration`). A ``state_dict`` on the sampler would be wrong, since DataLoader
    workers prefetch and the sampler runs ahead of the batches actually consumed.
    """

    def __init__(self, *, start: int = 0, rank: int, world_size: int, batch_size_per_rank: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DinokitError(f"invalid rank {rank} for world size {world_size}; need 0 <= rank < world_size")
        if batch_size_per_rank < 1:
            raise DinokitError(f"batch_size_per_rank must be >= 1, got {batch_size_per_rank}")
        self.global_batch_size = batch_size_per_rank * world_size
        if start < 0 or start % self.global_batch_size:
            raise DinokitError(
                f"stream start {start} is not a multiple of the global batch size {self.global_batch_size}; "
                "resume with start = iteration * batch_size_per_rank * world_size"
            )
        super().__init__()
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.batch_size_per_rank = batch_size_per_rank

    @classmethod
    def for_iteration(
        cls, iteration: int, *, rank: int, world_size: int, batch_size_per_rank: int
    ) -> InfiniteStreamSampler:
        """The sampler whose first batch is global batch ``iteration``."""
        return cls(
            start=iteration * batch_size_per_rank * world_size,
            rank=rank,
            world_size=world_size,
            batch_size_per_rank=batch_size_per_rank,
        )

    def __iter__(self) -> Iterator[int]:
        first = self.start + self.rank * self.batch_size_per_rank
        while True:
            yield from range(first, first + self.batch_size_per_rank)
            first += self.global_batch_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(start={self.start}, rank={self.rank}, world_size={self.world_size}, "
            f"batch_size_per_rank={self.batch_size_per_rank})"
        )


def seeded_batches(batches: Iterator[list[int]], seed: int, start_batch: int,
                   tag: str) -> Iterator[list[tuple[int, int]]]:
    """Each item of each batch (numbered from ``start_batch``) with the seed of its random draws: a function of
    (seed, batch, position, ``tag``) only; for :class:`SeededDraws`."""
    for b, batch in enumerate(batches, start_batch):
        yield [(index, derive_seed(seed, b, j, tag)) for j, index in enumerate(batch)]


class SeededDraws(Dataset):
    """Items ``(index, seed)`` of ``dataset``: the augmentation of each draws from its own seed, not from a worker's
    running random state, so a run resumed at iteration k sees the crops, flips and colours an unbroken run saw (and
    the draws do not depend on the number of workers). The caller's random states are left as they were."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with seeded_rngs(seed):
            return self.dataset[index]
