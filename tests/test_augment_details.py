"""Details of the augmentation and mask collation: mask counts and ratios, jitter order, solarize, crop boxes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from dinokit.data import photometric
from dinokit.data import tensor_augment as ta
from dinokit.data.collate import collate_data_and_cast
from dinokit.data.masking import MaskingGenerator
from test_collate import _sample

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class RecordingMasks:
    """A mask generator that masks exactly the first ``n`` patches asked for, and records each ``n``."""

    def __init__(self, grid: int) -> None:
        self.grid, self.asked = grid, []

    def get_shape(self) -> tuple[int, int]:
        return self.grid, self.grid

    def __call__(self, n: int, rng=None) -> np.ndarray:
        self.asked.append(n)
        return (np.arange(self.grid * self.grid) < n).reshape(self.grid, self.grid)


# ---------------------------------------------------------------- iBOT masks


def test_masked_crop_count_is_truncated_not_rounded():
    """8 global crops with mask_probability 0.35 give int(2.8) = 2 masked crops (rounding would give 3)."""
    for seed in range(3):
        batch = collate_data_and_cast(
            [_sample(i, n_local=0) for i in range(4)], mask_ratio_tuple=(0.1, 0.5), mask_probability=0.35,
            n_tokens=64, mask_generator=MaskingGenerator((8, 8), max_num_patches=32), rng=random.Random(seed),
        )
        assert batch.masks.shape == (8, 64)
        assert int(batch.masks.any(dim=1).sum()) == 2


def test_mask_ratios_are_drawn_across_each_stratum():
    """Masked crop i asks for int(N * u) patches, u uniform in [probs[i], probs[i + 1]], not always the low end."""
    n_tokens, strata = 100, [(0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5)]
    asked = []
    for seed in range(20):
        generator = RecordingMasks(10)
        batch = collate_data_and_cast(
            [_sample(i, n_local=0) for i in range(4)], mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5,
            n_tokens=n_tokens, mask_generator=generator, rng=random.Random(seed),
        )
        assert sorted(batch.masks.sum(dim=1).tolist()) == sorted(generator.asked + [0] * 4)
        asked.append(generator.asked)
    asked = np.array(asked)  # (seeds, strata), in stratum order (the shuffle comes after)
    for i, (lo, hi) in enumerate(strata):
        column = asked[:, i]
        assert column.min() >= int(n_tokens * lo) and column.max() <= n_tokens * hi
        assert len(set(column.tolist())) >= 4  # spread over the stratum's ten values
        assert n_tokens * lo + 2 < column.mean() < n_tokens * hi - 2  # about its middle (expected ~ lo + 4.5)


# ---------------------------------------------------------------- photometric operations


def test_colour_jitter_runs_in_each_crops_drawn_order():
    """Each crop's jitter runs brightness/contrast/saturation/hue in its own drawn order (torchvision reference)."""
    gen = torch.Generator().manual_seed(0)
    params = ta.draw_crop_params(16, 16, global_crops_scale=(0.5, 1.0), local_crops_scale=(0.1, 0.3),
                                 local_crops_number=0, generator=gen)
    for name in ("flip", "grayscale", "blur", "solarize"):
        getattr(params, name).zero_()
    params.jitter[:] = True
    params.jitter_order = torch.tensor([[3, 2, 1, 0], [1, 3, 0, 2]])
    params.jitter_factors = torch.tensor([[1.6, 0.5, 1.8, 0.1], [1.5, 1.6, 0.3, -0.1]])
    x = torch.rand(2, 3, 8, 8, generator=gen)
    out = ta.TensorMultiCrop._distort(x.clone(), [params], range(0, 2))
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for crop, order, factors in zip(x, params.jitter_order.tolist(), params.jitter_factors.tolist()):
        for op in order:
            crop = ops[op](crop, factors[op])
        expected.append(crop)
    expected = photometric.normalize(torch.stack(expected))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


def test_solarize_inverts_from_128_up_as_pil():
    """Solarize inverts every grey level >= 128, 128 itself included, exactly as PIL's ImageOps.solarize(128)."""
    levels = np.arange(256, dtype=np.uint8)
    pil = np.asarray(ImageOps.solarize(Image.fromarray(levels[None]), threshold=128))[0]
    assert pil[128] == 127 and pil[127] == 127
    mine = photometric.solarize(torch.from_numpy(levels).float() / 255)
    np.testing.assert_array_equal((mine * 255).round().to(torch.uint8).numpy(), pil)


# ---------------------------------------------------------------- crop boxes


def test_crop_as_wide_as_the_image_fits():
    """A box exactly as wide as the image fits (w <= width): a 10 x 10 box of a 20 x 10 image is drawn at every top
    offset 0..10, not only at the centre-crop fallback's 5."""
    boxes = ta.random_resized_crop_boxes(20, 10, 300, scale=(0.5, 0.5), ratio=(1.0, 1.0),
                                         generator=torch.Generator().manual_seed(0))
    assert (boxes[:, 1:] == torch.tensor([0, 10, 10])).all()  # left 0, height 10, width 10
    assert set(boxes[:, 0].tolist()) == set(range(11))

