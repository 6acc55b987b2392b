"""collate_data_and_cast / SSLCollate: crop-major stacking, mask counts and ratios, weights, bad samples."""

import pickle
import random

import pytest
import torch

from dinokit.data.collate import SSLBatch, SSLCollate, collate_data_and_cast
from dinokit.data.masking import MaskingGenerator

GRID = 8
N_TOKENS = GRID * GRID


def _sample(i: int, n_local: int = 3) -> dict:
    """Image i: global crop c is filled with 10*i + c, local crop c with 100 + 10*i + c."""
    return {
        "global_crops": [torch.full((3, 4, 4), 10.0 * i + c) for c in range(2)],
        "local_crops": [torch.full((3, 2, 2), 100.0 + 10 * i + c) for c in range(n_local)],
        "global_crops_teacher": [],
        "offsets": (),
    }


def _collate(samples, *, seed=0, mask_probability=0.5, dtype=torch.float32) -> SSLBatch:
    return collate_data_and_cast(
        samples,
        mask_ratio_tuple=(0.1, 0.5),
        mask_probability=mask_probability,
        n_tokens=N_TOKENS,
        mask_generator=MaskingGenerator((GRID, GRID), max_num_patches=0.5 * N_TOKENS),
        dtype=dtype,
        rng=random.Random(seed),
    )


def test_crop_major_order_and_shapes():
    batch = _collate([_sample(i) for i in range(4)])
    assert batch.global_crops.shape == (8, 3, 4, 4)
    assert batch.local_crops.shape == (12, 3, 2, 2)
    for c in range(2):
        for i in range(4):
            assert (batch.global_crops[c * 4 + i] == 10 * i + c).all()
    for c in range(3):
        for i in range(4):
            assert (batch.local_crops[c * 4 + i] == 100 + 10 * i + c).all()
    assert batch.n_samples == 4 and batch.n_bad == 0


def test_dtype_cast():
    batch = _collate([_sample(0), _sample(1)], dtype=torch.float16)
    assert batch.global_crops.dtype == torch.float16 and batch.local_crops.dtype == torch.float16


def test_upperbound_matches_hand_computation():
    # N_g = 8, M = 4, probs = [0.1, 0.2, 0.3, 0.4, 0.5]: int(64*0.2) + int(64*0.3) + int(64*0.4) + int(64*0.5)
    batch = _collate([_sample(i) for i in range(4)])
    assert batch.upperbound == 12 + 19 + 25 + 32


@pytest.mark.parametrize("seed", range(5))
def test_masks_counts_ratios_and_weights(seed):
    batch = _collate([_sample(i) for i in range(4)], seed=seed)
    assert batch.masks.shape == (8, N_TOKENS) and batch.masks.dtype == torch.bool
    per_image = batch.masks.sum(1)
    assert int((per_image > 0).sum()) == 4  # M = int(8 * 0.5) masked crops
    # Masked crop i has at most int(N * U(probs[i], probs[i+1])) <= N * probs[i+1] patches; the shuffle hides i,
    # so compare sorted counts with the sorted per-stratum maxima.
    maxima = [12, 19, 25, 32]
    counts = sorted(per_image[per_image > 0].tolist())
    assert all(c <= m for c, m in zip(counts, maxima))
    assert int(per_image.sum()) <= batch.upperbound
    # indices, count, weights
    torch.testing.assert_close(batch.mask_indices, batch.masks.flatten().nonzero().flatten())
    assert batch.n_masked_patches.shape == (1,) and batch.n_masked_patches.dtype == torch.long
    assert int(batch.n_masked_patches) == int(batch.masks.sum()) == batch.mask_indices.numel()
    assert batch.masks_weight.shape == batch.mask_indices.shape
    torch.testing.assert_close(batch.masks_weight.sum(), torch.tensor(4.0))
    rows = batch.mask_indices // N_TOKENS
    torch.testing.assert_close(batch.masks_weight, 1.0 / per_image[rows].float())


def test_shuffle_spreads_masks_over_crops():
    masked_rows = set()
    for seed in range(20):
        batch = _collate([_sample(i) for i in range(4)], seed=seed)
        masked_rows |= set(torch.nonzero(batch.masks.any(1)).flatten().tolist())
    assert masked_rows == set(range(8))


def test_no_masks_with_zero_probability():
    batch = _collate([_sample(i) for i in range(3)], mask_probability=0.0)
    assert not batch.masks.any() and batch.upperbound == 0 and int(batch.n_masked_patches) == 0
    assert batch.masks_weight.numel() == 0


def test_bad_samples_dropped_and_counted():
    batch = _collate([_sample(0), None, _sample(2), None])
    assert batch.n_samples == 2 and batch.n_bad == 2
    assert batch.global_crops.shape[0] == 4 and batch.masks.shape == (4, N_TOKENS)
    assert [float(batch.global_crops[k, 0, 0, 0]) for k in range(4)] == [0.0, 20.0, 1.0, 21.0]


def test_all_bad_gives_empty_batch():
    batch = _collate([None, None])
    assert batch.n_samples == 0 and batch.n_bad == 2 and batch.global_crops.numel() == 0
    assert int(batch.n_masked_patches) == 0


def test_grid_mismatch_is_an_error():
    with pytest.raises(ValueError, match="n_tokens"):
        collate_data_and_cast(
            [_sample(0)], mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, n_tokens=10,
            mask_generator=MaskingGenerator((GRID, GRID)),
        )


def test_ssl_collate_is_picklable_and_deterministic_by_position():
    collate = SSLCollate(seed=3, global_crops_size=32, patch_size=4)
    assert collate.n_tokens == 64 and collate.mask_generator.max_num_patches == 32
    # the official cap, 0.5 * size // patch * size // patch, floors and all: 666 at 518 px (half the grid: 684.5)
    caps = {(size, patch): SSLCollate(seed=0, global_crops_size=size, patch_size=patch).mask_generator.max_num_patches
            for size, patch in ((518, 14), (224, 14), (224, 16), (98, 14))}
    assert caps == {(518, 14): 666, (224, 14): 128, (224, 16): 98, (98, 14): 21}
    batch = [(pos, _sample(i)) for i, pos in enumerate(range(40, 44))]
    a = collate(batch)
    b = pickle.loads(pickle.dumps(collate))(list(reversed(batch[:1])) + batch[1:])
    torch.testing.assert_close(a.masks, b.masks)
    c = collate([(pos + 4, s) for pos, s in batch])  # another batch position: other masks
    assert not torch.equal(a.masks, c.masks)


def test_batch_to_device_keeps_fields():
    batch = _collate([_sample(0), _sample(1)])
    moved = batch.to("cpu")
    assert isinstance(moved, SSLBatch) and moved.upperbound == batch.upperbound
    torch.testing.assert_close(moved.global_crops, batch.global_crops)
