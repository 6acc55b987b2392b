"""Details of feature distillation and curation: smooth-L1 and patch weight, cosine k-means, k-means++, budgets."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinokit.curate.kmeans import assign, kmeans, kmeans_plus_plus
from dinokit.curate.sampling import split_budget
from dinokit.distill.task import DistillationTask, feature_distillation_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- feature distillation


def test_smooth_l1_feature_loss_hand_value():
    """smooth_l1: 0.5 d^2 below |d| = 1 and |d| - 0.5 above, averaged (MSE would give (9 + 0.25 + 4 + 0) / 4)."""
    student = torch.tensor([[3.0, 0.5], [-2.0, 1.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    expected = (2.5 + 0.125 + 1.5 + 0.0) / 4
    assert feature_distillation_loss(student, teacher, "smooth_l1").item() == pytest.approx(expected)
    cosine = feature_distillation_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), "cosine")
    assert cosine.item() == pytest.approx(1 - 1 / math.sqrt(2))


class TokenBackbone(nn.Module):
    """(n, 1 + P, D) crops that are their own tokens: the class token, then the patch tokens."""

    def forward(self, crops, is_training=True):
        return {"x_norm_clstoken": crops[:, 0], "x_norm_patchtokens": crops[:, 1:]}


@pytest.mark.parametrize("kind", ["cosine", "smooth_l1"])
def test_feature_patch_weight_scales_the_patch_term(kind):
    """The feature-distillation total is cls + feature_patch_weight * patch (weight 0.25 here)."""
    gen = torch.Generator().manual_seed(0)
    crops = torch.randn(4, 1 + 3, 5, generator=gen)
    t_cls, t_patch = torch.randn(4, 5, generator=gen), torch.randn(4, 3, 5, generator=gen)
    task = SimpleNamespace(feature_loss=kind, feature_patch_weight=0.25)
    student = nn.ModuleDict({"backbone": TokenBackbone(), "projection": nn.Identity()})
    out = DistillationTask._feature_losses(task, student, SimpleNamespace(global_crops=crops), (t_cls, t_patch))
    cls_loss = feature_distillation_loss(crops[:, 0], t_cls, kind)
    patch_loss = feature_distillation_loss(crops[:, 1:], t_patch, kind)
    torch.testing.assert_close(out.terms["feature_cls_loss"], cls_loss)
    torch.testing.assert_close(out.terms["feature_patch_loss"], patch_loss)
    torch.testing.assert_close(out.total, cls_loss + 0.25 * patch_loss)


# ---------------------------------------------------------------- k-means


def _unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def test_cosine_assignment_is_the_most_similar_centroid():
    """assign(metric='cos') picks argmax x.c with distance 1 - x.c."""
    x, centroids = _unit_rows(50, 6, 0), _unit_rows(7, 6, 1)
    labels, dists = assign(x, centroids, metric="cos")
    sims = x @ centroids.T
    assert torch.equal(labels, sims.argmax(dim=1))
    torch.testing.assert_close(dists, 1 - sims.max(dim=1).values)


def test_cosine_kmeans_centroids_are_unit_mean_directions():
    """Cosine k-means centroids are the normalised means of their members (unit norm)."""
    x = _unit_rows(80, 5, 2)
    result = kmeans(x, 4, n_iters=30, metric="cos", seed=0)
    torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(4, dtype=x.dtype))
    for c in range(4):
        members = x[result.labels == c]
        if len(members):
            torch.testing.assert_close(result.centroids[c], F.normalize(members.mean(0), dim=0))
    torch.testing.assert_close(result.distances, 1 - (x * result.centroids[result.labels]).sum(1))


def _greedy_kmeans_pp_reference(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ written out (scikit-learn's scheme): 2 + int(ln k) candidates per new centre, each drawn with
    probability proportional to the squared distance to the nearest centre; keep the one of lowest potential."""
    rng = np.random.default_rng(seed)
    n_trials = 2 + int(math.log(k))
    chosen = [int(rng.integers(len(x)))]
    closest = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        draws = rng.random(n_trials) * closest.sum()
        picks = np.minimum(np.searchsorted(np.cumsum(closest), draws, side="right"), len(x) - 1)
        d = np.minimum(closest[:, None], ((x[:, None, :] - x[picks][None]) ** 2).sum(2))
        best = int(np.argmin(d.sum(0)))
        chosen.append(int(picks[best]))
        closest = d[:, best]
    return x[chosen]


@pytest.mark.parametrize("k", [3, 8])
def test_kmeans_plus_plus_equals_the_greedy_reference(k):
    """k-means++ draws 2 + int(ln k) candidates per centre and keeps the best: same centroids as the reference."""
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    for seed in range(3):
        mine = kmeans_plus_plus(x, k, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(mine.numpy(), _greedy_kmeans_pp_reference(x.numpy(), k, seed))


# ---------------------------------------------------------------- balanced sampling


def test_split_budget_remainder_goes_only_to_clusters_above_the_cut():
    """split_budget([2, 5, 5], 7): cut 2, the remaining one image goes to a cluster of 5, never the full one of 2."""
    sizes = np.array([2, 5, 5])
    seen = set()
    for seed in range(30):
        quotas = split_budget(sizes, 7, np.random.default_rng(seed))
        assert quotas.sum() == 7 and (quotas <= sizes).all()
        assert quotas[0] == 2
        seen.add(tuple(quotas.tolist()))
    assert seen == {(2, 3, 2), (2, 2, 3)}
