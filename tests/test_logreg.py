"""Logistic regression: the scikit-learn (CPU) and torch L-BFGS (GPU) paths solve the same problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinokit.errors import DinokitError
from dinokit.eval.logreg import c_grid, evaluate_logreg, fit_logreg, holdout_split, resolve_backend
from test_knn import one_thread  # noqa: F401  (autouse fixture)

pytest.importorskip("sklearn")



def blobs(n, num_classes, *, dim=12, spread=1.5, seed=0):
    """Gaussian classes around fixed centres; ``seed`` draws the samples (train and val share centres)."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return (centres[y] + spread * torch.randn(n, dim, generator=g)).double(), y


def sklearn_objective_grad(model, x, y, C):
    """Gradient of C * sum CE + ||W||^2 / 2 (bias free), sklearn's multinomial objective, at ``model``."""
    coef = model.coef.clone().requires_grad_(True)
    intercept = model.intercept.clone().requires_grad_(True)
    logits = x @ coef.T + intercept
    loss = C * F.cross_entropy(logits, y, reduction="sum") + 0.5 * (coef * coef).sum()
    loss.backward()
    return coef.grad, intercept.grad


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("C", [1e-3, 10.0])
def test_torch_and_sklearn_agree(num_classes, C):
    x, y = blobs(160, num_classes)
    xv, yv = blobs(80, num_classes, seed=1)
    cpu = fit_logreg(x, y, C=C, backend="sklearn", max_iter=500, tol=1e-10)
    gpu_path = fit_logreg(x, y, C=C, backend="torch", max_iter=500, tol=1e-10)
    torch.testing.assert_close(gpu_path.predict_proba(xv), cpu.predict_proba(xv), rtol=0, atol=2e-5)
    assert gpu_path.accuracy(xv, yv) == cpu.accuracy(xv, yv)
    assert 100 / num_classes < cpu.accuracy(xv, yv) <= 100
    if num_classes > 2:  # both sit at the optimum of the same objective (binary uses one vector, as sklearn)
        for model in (cpu, gpu_path):
            g_coef, g_bias = sklearn_objective_grad(model, x, y, C)
            assert g_coef.abs().max() < 1e-3 * max(C, 1) and g_bias.abs().max() < 1e-3 * max(C, 1)


def test_labels_that_are_not_0_to_k_and_absent_classes():
    x, y = blobs(90, 3)
    y = torch.tensor([3, 7, 9])[y]  # sparse labels: the model predicts original labels
    for backend in ("sklearn", "torch"):
        model = fit_logreg(x, y, C=1.0, backend=backend, max_iter=300, tol=1e-8)
        assert model.classes.tolist() == [3, 7, 9]
        assert set(model.predict(x).tolist()) <= {3, 7, 9}


def test_protocol_picks_the_same_C_with_both_backends():
    x, y = blobs(200, 3)
    xv, yv = blobs(100, 3, seed=2)
    grid = c_grid(7)
    a = evaluate_logreg(x, y, xv, yv, c_values=grid, backend="sklearn", max_iter=300, tol=1e-10)
    b = evaluate_logreg(x, y, xv, yv, c_values=grid, backend="torch", max_iter=300, tol=1e-10)
    assert (a.best_C, a.top1, a.holdout_top1) == (b.best_C, b.top1, b.holdout_top1)
    assert a.holdout_top1["1e-06"] < max(a.holdout_top1.values())  # too much regularisation loses
    assert a.top1 > 60  # chance: 33%


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_path_on_cuda_agrees():
    x, y = blobs(160, 4)
    cpu = fit_logreg(x, y, C=0.1, backend="sklearn", max_iter=500, tol=1e-10)
    cuda = fit_logreg(x, y, C=0.1, backend="torch", max_iter=500, tol=1e-10, device="cuda")
    torch.testing.assert_close(cuda.predict_proba(x).cpu(), cpu.predict_proba(x), rtol=0, atol=2e-5)


def test_c_grid_and_holdout_split():
    grid = c_grid()
    assert len(grid) == 45 and grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
    assert np.allclose(np.diff(np.log10(grid)), 0.25)
    fit, held = holdout_split(50, 0.1, seed=0)
    assert len(held) == 5 and len(fit) == 45 and not set(fit.tolist()) & set(held.tolist())
    assert torch.equal(held, holdout_split(50, 0.1, seed=0)[1])
    # the official split: torch.manual_seed(0); randperm(n)[: n // 10] (ImageNet: 128,116 held out, not 128,117)
    for n in (59, 1_281_167):
        torch.manual_seed(0)
        official = torch.randperm(n)[: n // 10]
        assert torch.equal(holdout_split(n, 0.1, seed=0)[1], official.sort().values)


def test_top5_and_choosing_C_on_val():
    """Top-5 as the official result; --finetune-on-val chooses C on val and fits on all of train."""
    x, y = blobs(200, 6)
    xv, yv = blobs(100, 6, seed=2)
    model = fit_logreg(x, y, C=1e-6, backend="sklearn", max_iter=300, tol=1e-10)
    proba = model.predict_proba(xv)
    top5 = (model.classes[proba.topk(5, dim=1).indices] == yv[:, None]).any(1).double().mean() * 100
    assert model.accuracy(xv, yv, k=5) == pytest.approx(float(top5)) and model.accuracy(xv, yv, k=6) == 100.0
    grid = c_grid(5)
    held = evaluate_logreg(x, y, xv, yv, c_values=grid, backend="sklearn", max_iter=300, tol=1e-10)
    on_val = evaluate_logreg(x, y, xv, yv, c_values=grid, backend="sklearn", max_iter=300, tol=1e-10,
                             finetune_on_val=True)
    assert held.chosen_on == "holdout" and on_val.chosen_on == "val"
    assert held.top1 <= held.top5 <= 100 and on_val.top1 <= on_val.top5
    # on val, the chosen C's score is the final val top-1 (the same fit on all of train)
    assert on_val.holdout_top1[f"{on_val.best_C:.3g}"] == pytest.approx(on_val.top1)
    assert on_val.top1 == max(on_val.holdout_top1.values())


def test_errors():
    x, y = blobs(20, 2)
    with pytest.raises(DinokitError, match="holdout"):
        evaluate_logreg(x, y, x, y, c_values=[1.0], holdout_fraction=1.5, backend="torch")
    # the same checker and wording as ``dinokit eval logreg`` (tests/test_eval_cli_options.py)
    for bad, message in [
        (dict(c_values=[]), "--c-grid-size must be at least 1: there is no value of C to try"),
        (dict(c_values=[1.0, -2.0]), "the values of C must be positive, got -2"),
        (dict(max_iter=0), "--max-iter must be at least 1, got 0"),
        (dict(tol=-1.0), "--tol must be positive (the solver's gradient tolerance), got -1"),
        (dict(tol=0.0, backend="sklearn"), "--tol must be positive (the solver's gradient tolerance), got 0"),
        (dict(backend="cuml"), "unknown logistic-regression backend 'cuml'; use auto, sklearn or torch"),
    ]:
        with pytest.raises(DinokitError) as err:
            evaluate_logreg(x, y, x, y, **{"c_values": [1.0], "backend": "torch", **bad})
        assert str(err.value) == message
    # two images of two classes: the fit part holds one class once one image is held out (sklearn: a traceback)
    for backend in ("sklearn", "torch"):
        with pytest.raises(DinokitError) as err:
            evaluate_logreg(x[:2], torch.tensor([0, 1]), x, y, c_values=[1.0], backend=backend)
        assert str(err.value) == ("logistic regression needs at least 2 classes among the images it fits on; the 1 "
                                  "training image(s) left after holding out 1 to choose C have 1; add training images "
                                  "of more classes")
    with pytest.raises(DinokitError, match="have 1; add"):  # one class in all
        evaluate_logreg(x, torch.zeros(20, dtype=torch.long), x, y, c_values=[1.0], backend="torch")
    with pytest.raises(DinokitError) as err:  # --finetune-on-val holds nothing out (it was a TypeError traceback)
        evaluate_logreg(x, torch.zeros(20, dtype=torch.long), x, y, c_values=[1.0], backend="torch",
                        finetune_on_val=True)
    assert str(err.value) == ("logistic regression needs at least 2 classes among the images it fits on; the 20 "
                              "training image(s) have 1; add training images of more classes")
    with pytest.raises(DinokitError, match="backend"):
        resolve_backend("cuml", "cpu")
    assert resolve_backend("auto", "cpu") == "sklearn"


def test_small_sklearn_fits_run_on_one_blas_thread(monkeypatch):
    """A 1294 x 64 fit (8 classes) took 13 minutes for the 45 values of C on a 2-core machine: a second OpenBLAS
    thread made every fit 20x slower. Small fits now run on one BLAS thread; large ones keep the default."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_info, threadpool_limits

    import dinokit.eval.logreg as logreg

    seen = []
    fit = LogisticRegression.fit

    def recording_fit(self, *args, **kwargs):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", recording_fit)
    x, y = blobs(200, 4)
    with threadpool_limits(2, user_api="blas"):  # as on a 2-core machine, whatever the test machine has
        fit_logreg(x, y, C=1.0, backend="sklearn", max_iter=50)
        monkeypatch.setattr(logreg, "SINGLE_THREAD_BLAS_BELOW", 100)  # this fit counts as large
        fit_logreg(x, y, C=1.0, backend="sklearn", max_iter=50)
    assert seen[0] == {1} and 1 not in seen[1], seen


def test_the_fitting_set_is_taken_once_and_kept_in_its_own_dtype(monkeypatch):
    """The features were made float64 up front (a copy twice their size) and the fitting set indexed again for each
    C (45 copies made in turn): now one fitting set, in the features' dtype, which each solver converts as it reads."""
    import dinokit.eval.logreg as logreg

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 4, generator=gen), torch.arange(60) % 3
    x[torch.arange(60), y] += 3
    seen = []
    fit = logreg.fit_logreg
    monkeypatch.setattr(logreg, "fit_logreg", lambda fx, fy, **kw: seen.append(fx) or fit(fx, fy, **kw))
    result = logreg.evaluate_logreg(x, y, x[:30], y[:30], c_values=[0.1, 1.0, 10.0], backend="torch", max_iter=20)
    assert len(seen) == 4 and seen[0] is seen[1] is seen[2] and len(seen[0]) == 54 and len(seen[3]) == 60
    assert all(f.dtype == torch.float32 for f in seen) and result.top1 > 90
    reference = logreg._fit_torch(x.double(), y, C=1.0, max_iter=20, tol=1e-4, device="cpu", chunk_size=7)
    model = logreg._fit_torch(x, y, C=1.0, max_iter=20, tol=1e-4, device="cpu")  # float32 in, float64 inside
    torch.testing.assert_close(model.coef, reference.coef, rtol=1e-6, atol=1e-8)


def test_features_held_under_inference_mode_or_with_grad_fit_as_plain_ones():
    """The torch solver needs autograd: inside inference_mode (where a notebook holds its features) it failed with
    'element 0 of tensors does not require grad', features made there failed outside, and features that require
    grad failed in both backends."""
    torch.manual_seed(0)
    x = torch.randn(120, 6)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    plain = fit_logreg(x, y, C=1.0, backend="torch")
    with torch.inference_mode():
        inside = fit_logreg(x, y, C=1.0, backend="torch")
        made_inside = x.clone()
    for model in (inside, fit_logreg(made_inside, y, C=1.0, backend="torch"),
                  fit_logreg(x.clone().requires_grad_(), y, C=1.0, backend="torch")):
        torch.testing.assert_close(model.coef, plain.coef, rtol=0, atol=0)
    pytest.importorskip("sklearn")
    torch.testing.assert_close(fit_logreg(x.clone().requires_grad_(), y, C=1.0, backend="sklearn").coef,
                               fit_logreg(x, y, C=1.0, backend="sklearn").coef, rtol=0, atol=0)
