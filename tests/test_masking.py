"""MaskingGenerator: counts, rectangle shapes, the acceptance rule, reproducibility."""

import math
import random

import numpy as np
import pytest

from dinokit.data.masking import MAX_TRIES, MaskingGenerator


class ScriptedRNG:
    """Returns pre-set values in order, recording which method consumed each."""

    def __init__(self, uniforms, randints):
        self.uniforms = list(uniforms)
        self.randints = list(randints)
        self.randint_calls = []

    def uniform(self, a, b):
        return self.uniforms.pop(0)

    def randint(self, a, b):
        self.randint_calls.append((a, b))
        return self.randints.pop(0)


def test_shape_dtype_and_zero_request():
    gen = MaskingGenerator((6, 8), max_num_patches=24)
    assert gen.get_shape() == (6, 8)
    mask = gen(0)
    assert mask.shape == (6, 8) and mask.dtype == bool and not mask.any()
    assert MaskingGenerator(5).get_shape() == (5, 5)


def test_scripted_rectangle_is_placed_exactly():
    gen = MaskingGenerator((8, 8), max_num_patches=32)
    # area 6, aspect exp(0)=1 -> h = w = round(sqrt(6)) = 2, top 1, left 3 -> 4 new patches, request met.
    rng = ScriptedRNG(uniforms=[6.0, 0.0], randints=[1, 3])
    mask = gen(4, rng=rng)
    expected = np.zeros((8, 8), dtype=bool)
    expected[1:3, 3:5] = True
    np.testing.assert_array_equal(mask, expected)
    assert rng.randint_calls == [(0, 6), (0, 6)]  # top in [0, H - h], left in [0, W - w]


def test_acceptance_rule_rejects_too_many_new_patches():
    gen = MaskingGenerator((8, 8), max_num_patches=32)
    # Try 1: area 9 -> 3x3 = 9 new > max_mask 4: rejected. Try 2: 2x2 at (0, 0): accepted.
    rng = ScriptedRNG(uniforms=[9.0, 0.0, 4.0, 0.0], randints=[5, 5, 0, 0])
    mask = gen(4, rng=rng)
    assert mask.sum() == 4 and mask[:2, :2].all()


def test_rectangle_must_be_strictly_smaller_than_grid():
    gen = MaskingGenerator((3, 3), max_num_patches=9)
    # area 9, aspect 1 -> 3x3 == the grid: refused without drawing a position; then 2x2 fits.
    rng = ScriptedRNG(uniforms=[9.0, 0.0, 4.0, 0.0], randints=[1, 1])
    mask = gen(4, rng=rng)
    assert rng.randint_calls == [(0, 1), (0, 1)]
    assert mask.sum() == 4 and mask[1:, 1:].all()


def test_gives_up_after_max_tries_without_progress():
    gen = MaskingGenerator((3, 3), max_num_patches=9)
    rng = ScriptedRNG(uniforms=[9.0, 0.0] * MAX_TRIES, randints=[])
    assert gen(9, rng=rng).sum() == 0  # every try is the full grid: no rectangle, empty mask
    assert rng.uniforms == []


def _single_rectangle(gen, max_mask, rng):
    mask = np.zeros(gen.get_shape(), dtype=bool)
    added = gen._add_rectangle(mask, max_mask, rng)
    return mask, added


def test_single_rectangles_respect_limits():
    rng = random.Random(0)
    gen = MaskingGenerator((14, 10), max_num_patches=70)
    for _ in range(300):
        mask, added = _single_rectangle(gen, 70, rng)
        if added == 0:
            continue
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == added == h * w  # one solid rectangle
        assert h < 14 and w < 10 and added <= 70
        # h = round(sqrt(A * a)), w = round(sqrt(A / a)) with a in [0.3, 1/0.3]: h/w within rounding of the limits
        assert h - 0.5 <= (w + 0.5) / 0.3 and h + 0.5 >= 0.3 * (w - 0.5)


@pytest.mark.parametrize("grid", [(16, 16), (7, 7)])
def test_counts_bounded_and_mostly_reached(grid):
    rng = random.Random(1)
    n_patches = grid[0] * grid[1]
    gen = MaskingGenerator(grid, max_num_patches=0.5 * n_patches)
    ratios = []
    for n in range(1, n_patches // 2 + 1):
        count = int(gen(n, rng=rng).sum())
        assert count <= n
        if n >= gen.min_num_patches:
            assert count >= 1
        ratios.append(count / n)
    assert np.mean(ratios) > 0.7  # "often smaller", but close to the request on average


def test_reproducible_with_seeded_rng():
    gen = MaskingGenerator((16, 16), max_num_patches=128)
    a = gen(60, rng=random.Random(42))
    b = gen(60, rng=random.Random(42))
    c = gen(60, rng=random.Random(43))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_defaults_follow_spec():
    gen = MaskingGenerator((16, 16), max_num_patches=128)
    assert gen.min_num_patches == 4 and gen.max_num_patches == 128
    assert gen.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))
    assert "16x16" in repr(gen)
