"""The SSL data loader: a reproducible, resumable stream of augmented, collated batches.

``SSLDataset[p]`` is the sample at stream position ``p``: the image is chosen by a per-pass
permutation of the dataset and the crops by RNGs seeded from ``(seed, p)``. With the
:class:`~dinokit.data.samplers.InfiniteStreamSampler` and :class:`~dinokit.data.collate.SSLCollate`
this makes every batch a pure function of ``(seed, iteration)``: independent of the number of
workers, and restored exactly when a run resumes at ``start_iteration``.
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import signal

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..errors import DinokitError
from .datasets import make_dataset
from .images import draft_size_for, multi_crop_draft_size
from .samplers import InfiniteStreamSampler, derive_seed, seeded_rngs

_CACHED_PASSES = 2  # a batch can straddle two passes


class SSLDataset(Dataset):
    """Maps a stream position to ``(position, transform(image) or None)``.

    ``base_dataset`` items are ``(index, PIL_image_or_None, target)`` (an ``ImageFiles`` with no
    transform). Pass ``k`` covers positions ``[k * len(base), (k + 1) * len(base))`` and visits every
    image once, in the order of ``torch.randperm`` seeded from ``(seed, k)``. A bad image gives
    ``None``, which the collate drops and counts.
    """

    def __init__(self, base_dataset: Dataset, transform: Callable[[Any], Any], *, seed: int) -> None:
        if len(base_dataset) == 0:
            raise DinokitError("the pretraining dataset is empty; check the dataset string")
        self.base_dataset = base_dataset
        self.transform = transform
        self.seed = seed
        self._permutations: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        """Images per pass (the stream itself is infinite)."""
        return len(self.base_dataset)

    def permutation(self, pass_index: int) -> torch.Tensor:
        """The dataset order of pass ``pass_index`` (cached: computing it costs O(len) per call)."""
        if pass_index not in self._permutations:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, pass_index, "order"))
            self._permutations[pass_index] = torch.randperm(len(self.base_dataset), generator=generator)
            while len(self._permutations) > _CACHED_PASSES:
                self._permutations.popitem(last=False)
        return self._permutations[pass_index]

    def dataset_index(self, position: int) -> int:
        pass_index, offset = divmod(position, len(self.base_dataset))
        return int(self.permutation(pass_index)[offset])

    def __getitem__(self, position: int) -> tuple[int, Any]:
        _, image, _ = self.base_dataset[self.dataset_index(position)]
        if image is None:
            return position, None
        # A mixed-resolution transform (data/resolutions.py) applies the crop sizes of the position's iteration.
        transform = self.transform.for_position(position) if hasattr(self.transform, "for_position") else self.transform
        with seeded_rngs(derive_seed(self.seed, position, "crops")):
            return position, transform(image)


def init_worker(worker_id: int) -> None:
    """A data-loading worker (training, feature extraction, probes): one intra-op thread (it decodes and augments
    one sample at a time; more would only oversubscribe the CPUs), and deaf to SIGTERM, SIGUSR1 and SIGUSR2 (the
    stop signals: engine/interrupts.py; a worker also ran a handler it inherited, e.g. submitit's requeue). They reach
    the whole process group (``timeout``, SLURM); the main process then stops (a training run saves a checkpoint
    first) and stops its workers, but a worker killed by the signal first made the loader's teardown print a
    "DataLoader worker ... is killed by signal" traceback after the stop line. Workers still end with the main
    process (they watch it)."""
    torch.set_num_threads(1)
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _stop_leftover_workers() -> None:
    """At exit, stop the workers of data loaders still alive (kept by a traceback, e.g. of a stopped run) as an
    ended loader does. They ignore SIGTERM (:func:`init_worker`), and multiprocessing's own exit handler would
    terminate them with SIGTERM and then wait for them, forever. Other children are left to it."""
    if not multiprocessing.active_children():
        return  # the usual exit: every loader ended with its workers
    import gc

    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    for loader in [o for o in gc.get_objects() if issubclass(type(o), _MultiProcessingDataLoaderIter)]:
        try:
            loader._shutdown_workers()  # each worker told to stop and waited for a moment; no longer watched
        except Exception:  # noqa: BLE001 - a loader stopped half-built (its workers are killed below)
            pass
    # What is left: workers of loaders stopped half-built (a stop as they started) or already collected, whose
    # objects no longer say what they run. multiprocessing's exit handler sends its daemonic children SIGTERM and
    # waits for them: those that ignore it (ours) are killed here; the others (a Pool's, a program's own, with their
    # clean-up on SIGTERM) are left to it. Where a child's signal dispositions cannot be read (no /proc), it gets
    # SIGTERM here and is killed a moment later.
    for child in multiprocessing.active_children():
        if not child.daemon or "PoolWorker" in child.name:
            continue
        deaf = _ignores_sigterm(child.pid)
        try:
            if deaf is None:
                child.terminate()
                child.join(timeout=LEFTOVER_GRACE_S)
            if deaf or (deaf is None and child.is_alive()):
                child.kill()
                child.join(timeout=5)
        except Exception:  # noqa: BLE001 - at exit, a child that cannot be stopped is left to the system
            pass


def _ignores_sigterm(pid: int | None) -> bool | None:
    """Whether process ``pid`` ignores SIGTERM (Linux: its ``SigIgn`` mask); None when that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


# Where a child's signal dispositions cannot be read: how long it has to end on SIGTERM before it is killed.
LEFTOVER_GRACE_S = 1.0


atexit.register(_stop_leftover_workers)  # after multiprocessing.util's exit handler (imported above): runs before it


def _draft_size(transform: Any, collate: Any) -> int | None:
    """The short side the crops need of an image: from the transform, or (batched tensor crops) from the
    collate's crop sizes and the transform's crop scales; under mixed resolutions, the largest of the options'."""
    options = getattr(collate, "options", None)
    if options is not None:
        transforms = getattr(transform, "options", [transform] * len(options))
        sizes = [_draft_size(t, c) for t, c in zip(transforms, options)]
        return None if None in sizes else max(sizes)
    size = draft_size_for(transform)
    multi_crop = getattr(collate, "multi_crop", None)
    if size is None and multi_crop is not None and hasattr(transform, "global_crops_scale"):
        size = multi_crop_draft_size(multi_crop.global_crops_size, multi_crop.local_crops_size,
                                     multi_crop.gram_crops_size, transform.global_crops_scale,
                                     transform.local_crops_scale)
    return size


def make_ssl_data_loader(
    dataset_str: str,
    *,
    transform: Callable[[Any], Any],
    collate: Callable[[list], Any],
    seed: int,
    batch_size_per_rank: int,
    num_workers: int,
    start_iteration: int = 0,
    pin_memory: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """An endless DataLoader whose ``i``-th batch is global batch ``start_iteration + i``, this rank's part.

    ``transform`` is usually a :class:`~dinokit.data.augmentations.DataAugmentationDINO` and
    ``collate`` an :class:`~dinokit.data.collate.SSLCollate` (both picklable, for workers).
    ``rank``/``world_size`` default to the current process group's. ``pin_memory`` defaults to
    whether CUDA is available.
    """
    if num_workers < 0:
        raise DinokitError(f"num_workers must be >= 0, got {num_workers}")
    rank = distributed.get_rank() if rank is None else rank
    world_size = distributed.get_world_size() if world_size is None else world_size
    base = make_dataset(dataset_str, transform=None, labelled=False)
    base.draft_size = _draft_size(transform, collate)
    sampler = InfiniteStreamSampler.for_iteration(
        start_iteration, rank=rank, world_size=world_size, batch_size_per_rank=batch_size_per_rank
    )
    return DataLoader(
        SSLDataset(base, transform, seed=seed),
        batch_size=batch_size_per_rank,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=False,  # the stream is infinite: every batch is full
        persistent_workers=num_workers > 0,
        worker_init_fn=init_worker if num_workers > 0 else None,
        # Its own generator: creating the iterator must not draw from the global RNG, or a resumed run's
        # model randomness (drop path) would be shifted by one draw relative to an uninterrupted run.
        generator=torch.Generator().manual_seed(seed),
    )
