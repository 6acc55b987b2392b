"""Block-wise patch masks for the iBOT masked-image-modelling loss.

A mask is built from random rectangles on the patch grid. Each rectangle has an area drawn uniformly
in ``[min_num_patches, max_mask]`` and a log-uniform aspect ratio; it is kept only if it adds between
1 and ``max_mask`` new patches. Rectangles are added until the requested count is reached or a round
of 10 tries adds nothing, so the final count is at most the request and often below it.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

import numpy as np

MAX_TRIES = 10


class UniformRNG(Protocol):
    """What the generator needs from an RNG: ``random.Random`` or the ``random`` module itself."""

    def uniform(self, a: float, b: float) -> float: ...

    def randint(self, a: int, b: int) -> int: ...


class MaskingGenerator:
    """Draws boolean ``(height, width)`` masks over a patch grid.

    ``max_num_patches`` caps the size of a single rectangle (official: half the grid);
    ``max_aspect`` defaults to ``1 / min_aspect``.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches or 0
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if self.max_num_patches is None:
            self.max_num_patches = self.num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        lo, hi = self.log_aspect_ratio
        return (
            f"{type(self).__name__}({self.height}x{self.width}, "
            f"patches={self.min_num_patches}..{self.max_num_patches}, "
            f"aspect={math.exp(lo):.3f}..{math.exp(hi):.3f})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_rectangle(self, mask: np.ndarray, max_mask_patches: float, rng: UniformRNG) -> int:
        """Try up to ``MAX_TRIES`` rectangles; return how many new patches the accepted one masked (0 if none)."""
        for _ in range(MAX_TRIES):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if h >= self.height or w >= self.width:
                continue  # the rectangle must be strictly smaller than the grid
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            window = mask[top : top + h, left : left + w]  # a view: assigning to it edits ``mask``
            new = h * w - int(window.sum())
            if 0 < new <= max_mask_patches:
                window[...] = True
                return new
        return 0

    def __call__(self, num_masking_patches: int | None = None, *, rng: UniformRNG | None = None) -> np.ndarray:
        """A ``(height, width)`` bool mask with at most ``num_masking_patches`` True entries.

        ``rng`` makes the draw reproducible (the SSL collate passes a per-batch ``random.Random``);
        without it the global ``random`` module is used, as in the official code.
        """
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches
        rng = rng if rng is not None else random
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_rectangle(mask, max_mask_patches, rng)
            if added == 0:
                break  # no progress in MAX_TRIES tries: accept a smaller mask
            count += added
        return mask
