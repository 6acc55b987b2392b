"""Details of the evaluation protocols: k-NN feature normalisation, linear-probe SGD momentum, logreg C ties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinokit.eval.knn import evaluate_knn
from dinokit.eval.linear import LinearProbes, ProbeSetting, train_probes
from dinokit.eval.logreg import evaluate_logreg
from test_knn import brute_force_knn, random_problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- k-NN


def test_knn_votes_by_cosine_whatever_the_norm_of_the_training_rows():
    """evaluate_knn L2-normalises the training rows: a far-away long row of another class does not win."""
    train = torch.tensor([[0.1, 0.0], [60.0, 80.0]])  # class 0 along the query (norm 0.1); class 1 at cos 0.6
    test = torch.tensor([[1.0, 0.0]])
    (result,) = evaluate_knn(train, torch.tensor([0, 1]), test, torch.tensor([0]), num_classes=2, ks=(1,))
    assert result.top1 == 100.0  # by dot product the long class-1 row (60 > 0.1) would be the neighbour


def test_knn_results_do_not_change_when_training_rows_are_rescaled():
    """Rescaling each training row leaves every k-NN accuracy equal to the brute-force vote on unit rows."""
    train, train_y, test, test_y = random_problem(n_train=120, n_test=30, dim=8, num_classes=5, seed=3)
    scales = torch.exp(torch.randn(len(train), 1, generator=torch.Generator().manual_seed(1), dtype=train.dtype) * 2)
    ks = (1, 5, 20)
    expected = brute_force_knn(train, train_y, test, test_y, ks=ks, temperature=0.07, num_classes=5)
    for rows in (train, train * scales):
        results = evaluate_knn(rows, train_y, test, test_y, num_classes=5, ks=ks)
        assert {r.k: (r.top1, r.top5) for r in results} == expected


# ---------------------------------------------------------------- linear probes


def test_linear_probes_train_with_sgd_momentum_09_and_a_cosine_schedule():
    """train_probes takes the steps of hand-written SGD with momentum 0.9 and lr * (1 + cos(pi t / T)) / 2."""
    gen = torch.Generator().manual_seed(0)
    n, dim, classes, lr, iterations = 12, 4, 3, 0.5, 4
    cls_tokens, patch_mean = torch.randn(n, 1, dim, generator=gen), torch.randn(n, dim, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    torch.manual_seed(0)
    probes = LinearProbes([ProbeSetting(1, False, lr)], embed_dim=dim, num_classes=classes)
    (linear,) = probes.classifiers_dict.values()
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    train_probes(probes, iter([(cls_tokens, patch_mean, labels)] * iterations), iterations=iterations)

    buffers = None
    for t in range(iterations):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        F.cross_entropy(cls_tokens[:, 0] @ w.T + b, labels).backward()
        grads = (w.grad, b.grad)
        buffers = grads if buffers is None else tuple(0.9 * m + g for m, g in zip(buffers, grads))
        step = lr * (1 + math.cos(math.pi * t / iterations)) / 2
        weight, bias = weight - step * buffers[0], bias - step * buffers[1]
    torch.testing.assert_close(linear.weight.detach(), weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(linear.bias.detach(), bias, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- logistic regression


def test_logreg_ties_go_to_the_smallest_c():
    """When every C scores the same on the held-out part, the smallest C (strongest regularisation) is chosen."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = (torch.stack([y * 2.0 - 1.0, -(y * 2.0 - 1.0)], dim=1) * 3 + 0.1 * torch.randn(40, 2, generator=gen)).double()
    result = evaluate_logreg(x, y, x[:10], y[:10], c_values=[100.0, 0.01, 1.0], backend="torch", max_iter=50)
    assert set(result.holdout_top1.values()) == {100.0}  # a three-way tie
    assert result.best_C == 0.01
