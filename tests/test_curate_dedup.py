"""Curation deduplication: union-find components, representatives, relative dedup against evaluation sets, and the
centring of the copy descriptors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinokit.curate.dedup import choose_representatives, connected_components, edges_above, relative_dedup
from dinokit.errors import DinokitError


# ---------------------------------------------------------------------------------------------- union-find
def test_components_of_a_planted_graph_whatever_the_edge_order():
    # components {0, 3, 7, 9}, {1}, {2, 5}, {4, 6, 8} (a chain, a pair, a star), node 1 alone
    edges = np.array([[9, 7], [3, 7], [0, 9], [5, 2], [8, 4], [6, 4], [4, 8]])
    expected = np.array([0, 1, 2, 0, 4, 2, 4, 0, 4, 0])
    for seed in range(5):
        shuffled = np.random.default_rng(seed).permutation(edges)
        flipped = np.where(np.random.default_rng(seed).random((len(edges), 1)) < 0.5, shuffled, shuffled[:, ::-1])
        np.testing.assert_array_equal(connected_components(10, flipped), expected)
    np.testing.assert_array_equal(connected_components(3, np.empty((0, 2))), [0, 1, 2])


def test_components_of_a_long_chain_and_a_random_graph_match_a_plain_search():
    n = 2000
    chain = np.stack([np.arange(n - 1), np.arange(1, n)], 1)[::-1]  # worst case for naive hooking
    assert (connected_components(n, chain) == 0).all()
    rng = np.random.default_rng(0)
    edges = rng.integers(0, n, size=(1500, 2))
    labels = connected_components(n, edges)
    # reference: breadth-first search
    neighbours = [[] for _ in range(n)]
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    reference = -np.ones(n, dtype=int)
    for start in range(n):
        if reference[start] < 0:
            reference[start], queue = start, [start]
            while queue:
                node = queue.pop()
                for m in neighbours[node]:
                    if reference[m] < 0:
                        reference[m] = start
                        queue.append(m)
    np.testing.assert_array_equal(labels, reference)


def test_representative_rules():
    labels = connected_components(6, np.array([[0, 2], [2, 4], [1, 5]]))  # {0, 2, 4}, {1, 5}, {3}
    sizes = np.array([10, 7, 30, 5, 30, 9])
    np.testing.assert_array_equal(choose_representatives(labels, keep="largest", sizes=sizes), [2, 3, 5])  # 30 = 30: index 2
    np.testing.assert_array_equal(choose_representatives(labels, keep="first"), [0, 1, 3])
    features = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.2, 1.0]]), dim=1)
    # {0, 2, 4}: their mean points along (1, 1) -> image 2; {1, 5}: two members are always equally close to
    # their mean -> the smaller index, 1
    np.testing.assert_array_equal(choose_representatives(labels, keep="central", features=features), [1, 2, 3])
    with pytest.raises(DinokitError, match="unknown dedup.keep 'best'"):
        choose_representatives(labels, keep="best")


def test_edges_above_drop_self_links_and_missing_neighbours():
    sims = np.array([[1.0, 0.9, 0.5], [1.0, 0.95, -np.inf]])
    idx = np.array([[0, 3, 2], [1, 0, -1]])
    edges, values = edges_above(sims, idx, 0.8, row_offset=0)
    np.testing.assert_array_equal(edges, [[0, 3], [1, 0]])
    np.testing.assert_allclose(values, [0.9, 0.95])


def test_relative_dedup_removes_whole_components_touching_evaluation_images():
    # pool components at the eval threshold: {0, 1, 2} (chain), {3, 4}, {5}, {6}
    pool_edges = np.array([[0, 1], [1, 2], [3, 4]])
    # eval image 0 is a copy of pool 2 (sim 0.8); eval image 1 is only weakly like pool 5 (0.3)
    eval_sims = np.array([[0.8, 0.2], [0.3, 0.1]])
    eval_idx = np.array([[2, 6], [5, 3]])
    removed = relative_dedup(7, pool_edges, eval_sims, eval_idx, threshold=0.45)
    np.testing.assert_array_equal(np.nonzero(removed)[0], [0, 1, 2])  # the whole chain, not just image 2


def test_dedup_normalises_the_descriptors_in_place_with_the_same_bits():
    """The pool, its centred copy and its normalised copy were three (n, D) arrays at once; the descriptors are now
    centred and normalised in their own array, bit for bit as F.normalize(x - center)."""
    from dinokit.curate.dedup import EXACT_TOLERANCE, centre_tolerance, centred_unit_rows

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 32, generator=gen) * 3 + 1
    x[7] = x.mean(0)  # a row at the centre: zero after centring, left zero
    center = x.mean(0)
    expected = torch.nn.functional.normalize(x - center, dim=1)
    data = x.data_ptr()
    out, relative = centred_unit_rows(x, center)
    assert out.data_ptr() == data and torch.equal(out, expected)
    assert centre_tolerance(relative) == EXACT_TOLERANCE and np.nonzero(relative <= EXACT_TOLERANCE)[0].tolist() == []
    # copies of one image are the pool's mean: zero after centring (every cosine 0), so they are told apart
    same = torch.randn(1, 32, generator=gen).repeat(6, 1)
    same[5] += 1.0
    _, relative = centred_unit_rows(same.clone(), same[:5].mean(0))
    assert (relative <= centre_tolerance(relative)).tolist() == [True] * 5 + [False]
    # re-saves of one image: every row a few hundredths from the mean, all on the centre; one far row among
    # near-identical ones (frames of a still scene): only the exact mean counts, their centred cosines decide
    unit = torch.nn.functional.normalize(torch.randn(1, 32, generator=gen), dim=1)
    resaved = torch.nn.functional.normalize(unit + 0.005 * torch.randn(5, 32, generator=gen), dim=1)
    _, relative = centred_unit_rows(resaved.clone(), resaved.mean(0))
    assert relative.max() < 0.05 and (relative <= centre_tolerance(relative)).all()
    frames = torch.cat([resaved, torch.nn.functional.normalize(unit + 0.2 * torch.randn(1, 32, generator=gen), dim=1)])
    _, relative = centred_unit_rows(frames.clone(), frames.mean(0))
    assert centre_tolerance(relative) == EXACT_TOLERANCE and not (relative <= EXACT_TOLERANCE).any()


def test_gem_is_the_signed_generalised_mean_and_stays_finite_for_a_large_p():
    """|x|^p overflowed float32 for a large embed.gem_p: every copy descriptor was NaN and dedup found no copy."""
    from dinokit.curate.embed import gem

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 9, 5, generator=g) * 100
    for p in (1.0, 3.0, 20.0, 100.0):
        x = tokens.double()
        powered = (x.sign() * x.abs().clamp_min(1e-6) ** p).mean(1)  # the definition, in float64
        expected = powered.sign() * powered.abs() ** (1 / p)
        got = gem(tokens, p)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gem(tokens, 1.0), tokens.mean(1), rtol=1e-5, atol=1e-4)
    assert torch.allclose(gem(tokens.abs(), 1000.0), tokens.abs().amax(1), rtol=0.01)  # towards the maximum
