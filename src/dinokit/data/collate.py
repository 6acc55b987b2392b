"""Batching multi-crop samples and drawing the iBOT masks (the official ``collate_data_and_cast``).

Crops are stacked crop-major: all images' global crop 1, then all images' global crop 2 (likewise
for local crops), which is the order the losses chunk the teacher outputs in. Masks go to
``M = int(N_g * mask_probability)`` of the ``N_g`` global crops, with mask ratios stratified over
``mask_ratio_tuple``; the mask list is shuffled so which crop is masked is random.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .masking import MaskingGenerator
from .samplers import derive_seed


@dataclass
class SSLBatch:
    """One collated SSL batch. ``N_g = 2 * n_samples`` global crops, ``N`` = patch tokens per global crop."""

    global_crops: torch.Tensor
    """(N_g, 3, H_g, W_g), crop-major: rows ``[0, n)`` are crop 1 of every image, ``[n, 2n)`` crop 2."""
    local_crops: torch.Tensor
    """(n_local * n_samples, 3, H_l, W_l), crop-major; (0,) when there are no local crops."""
    masks: torch.Tensor
    """(N_g, N) bool: the patches of each global crop replaced by the mask token in the student."""
    mask_indices: torch.Tensor
    """(n_masked,) long: flat indices of the True entries of ``masks`` (into ``masks.flatten()``)."""
    masks_weight: torch.Tensor
    """(n_masked,) float: ``1 / (masked patches of that crop)`` per masked patch, so each crop weighs equally."""
    n_masked_patches: torch.Tensor
    """(1,) long: ``n_masked`` as a tensor (for the iBOT Sinkhorn-Knopp normalisation)."""
    upperbound: int
    """An upper bound of ``n_masked`` that depends only on the batch size, for static buffer sizes."""
    n_samples: int
    """Images in the batch (bad images excluded). 0 means every image failed to decode: skip the batch."""
    n_bad: int
    """Images dropped because they could not be read."""
    gram_crops: torch.Tensor | None = None
    """(N_g, 3, S, S), crop-major like ``global_crops``: their regions for the Gram teacher at
    ``crops.gram_teacher_crops_size`` (DINOv3's high-resolution Gram anchoring); None without them."""

    def _map_tensors(self, fn) -> SSLBatch:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        changes = {name: fn(value) for name, value in values.items() if isinstance(value, torch.Tensor)}
        return dataclasses.replace(self, **changes)

    def pin_memory(self) -> SSLBatch:
        """Called by ``DataLoader(pin_memory=True)`` on custom batch types."""
        return self._map_tensors(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> SSLBatch:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))


def _stack_crop_major(samples: Sequence[dict[str, Any]], key: str, dtype: torch.dtype) -> torch.Tensor:
    n_crops = len(samples[0][key])
    if n_crops == 0:
        return torch.empty(0, dtype=dtype)
    # crop index outer, image index inner: [img0_crop0, img1_crop0, ..., img0_crop1, ...]
    return torch.stack([sample[key][c] for c in range(n_crops) for sample in samples]).to(dtype)


def _empty_batch(n_bad: int, n_tokens: int, dtype: torch.dtype) -> SSLBatch:
    return SSLBatch(
        global_crops=torch.empty(0, dtype=dtype),
        local_crops=torch.empty(0, dtype=dtype),
        masks=torch.zeros(0, n_tokens, dtype=torch.bool),
        mask_indices=torch.empty(0, dtype=torch.long),
        masks_weight=torch.empty(0),
        n_masked_patches=torch.zeros(1, dtype=torch.long),
        upperbound=0,
        n_samples=0,
        n_bad=n_bad,
    )


def collate_data_and_cast(
    samples_list: Sequence[dict[str, Any] | None],
    *,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    n_tokens: int,
    mask_generator: MaskingGenerator,
    dtype: torch.dtype = torch.float32,
    rng: random.Random | None = None,
) -> SSLBatch:
    """Collate augmentation outputs (``DataAugmentationDINO`` dicts, ``None`` for bad images) into an :class:`SSLBatch`.

    ``rng`` drives the mask ratios, shapes and shuffle; without it the global ``random`` module is
    used, as in the official code.
    """
    height, width = mask_generator.get_shape()
    if height * width != n_tokens:
        raise ValueError(f"mask grid {height}x{width} does not match n_tokens={n_tokens}")
    rng = rng if rng is not None else random
    samples = [s for s in samples_list if s is not None]
    n_bad = len(samples_list) - len(samples)
    if not samples:
        return _empty_batch(n_bad, n_tokens, dtype)

    global_crops = _stack_crop_major(samples, "global_crops", dtype)
    local_crops = _stack_crop_major(samples, "local_crops", dtype)
    gram_crops = _stack_crop_major(samples, "gram_crops", dtype) if "gram_crops" in samples[0] else None

    n_global = len(global_crops)
    n_masked_images = int(n_global * mask_probability)
    # Stratified ratios: masked image i draws its ratio from [probs[i], probs[i + 1]).
    probs = torch.linspace(*mask_ratio_tuple, n_masked_images + 1)
    # float32 products truncated, exactly as the official int(N * probs[i + 1]) on tensors.
    upperbound = int((n_tokens * probs[1:]).long().sum())
    masks = []
    for lo, hi in zip(probs[:-1].tolist(), probs[1:].tolist()):
        masks.append(torch.from_numpy(mask_generator(int(n_tokens * rng.uniform(lo, hi)), rng=rng)))
    empty = torch.zeros(height, width, dtype=torch.bool)
    masks += [empty] * (n_global - n_masked_images)
    rng.shuffle(masks)
    collated_masks = torch.stack(masks).flatten(1)  # (N_g, H, W) -> (N_g, N)

    mask_indices = collated_masks.flatten().nonzero().flatten()
    per_image = collated_masks.sum(-1, keepdim=True).clamp(min=1)  # (N_g, 1)
    masks_weight = (1.0 / per_image).expand_as(collated_masks)[collated_masks]  # (n_masked,)
    return SSLBatch(
        global_crops=global_crops,
        local_crops=local_crops,
        masks=collated_masks,
        mask_indices=mask_indices,
        masks_weight=masks_weight,
        n_masked_patches=torch.tensor([mask_indices.numel()], dtype=torch.long),
        upperbound=upperbound,
        n_samples=len(samples),
        n_bad=n_bad,
        gram_crops=gram_crops,
    )


class SSLCollate:
    """Picklable collate for ``SSLDataset`` batches of ``(position, sample_or_None)``.

    The mask randomness comes from ``random.Random(derive_seed(seed, first position, "masks"))``, so
    it depends only on which stream positions form the batch, never on workers or on history.
    The mask grid is ``global_crops_size // patch_size`` square; a single rectangle covers at most about half of
    it, by the official expression, whose floors differ from half the grid where the crop size is not an even
    multiple of the patch (518 px, patch 14: 666 patches, not 684.5).
    """

    def __init__(
        self,
        *,
        seed: int,
        global_crops_size: int,
        patch_size: int,
        mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        grid = global_crops_size // patch_size
        self.seed = seed
        self.n_tokens = grid * grid
        size = global_crops_size  # the official ((0.5 * size) // patch * size) // patch, floors included
        cap = 0.5 * size // patch_size * size // patch_size
        self.mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=cap)
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = mask_probability
        self.dtype = dtype

    def __call__(self, batch: Sequence[tuple[int, dict[str, Any] | None]]) -> SSLBatch:
        first_position = min(position for position, _ in batch)
        return collate_data_and_cast(
            [sample for _, sample in batch],
            mask_ratio_tuple=self.mask_ratio_tuple,
            mask_probability=self.mask_probability,
            n_tokens=self.n_tokens,
            mask_generator=self.mask_generator,
            dtype=self.dtype,
            rng=random.Random(derive_seed(self.seed, first_position, "masks")),
        )
