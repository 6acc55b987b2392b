"""L2-regularised multinomial logistic regression on frozen class tokens (official ``log_regression.py``).

The features are ``forward()``'s class tokens, not L2-normalised, in float64. C is chosen over a
grid (official: 45 values, 10^-6 .. 10^5) by top-1 on a held-out 10% of the training set (seed 0),
then the model is refit on the whole training set and scored on the validation set.

Two solvers minimise the same objective, scikit-learn's ``C * sum_i CE_i + ||W||^2 / 2`` (bias
unpenalised; one weight vector for two classes, one per class otherwise), and agree to solver
tolerance: scikit-learn's L-BFGS on the CPU (``backend="sklearn"``), and ``torch.optim.LBFGS`` on
any device (``backend="torch"``, the GPU path; the official code needs cuML instead).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed as du
from ..devices import usable_device
from ..errors import DinokitError
from .results import append_results, report_label_warnings
from .setup import EvalContext

RESULTS_FILE = "results_eval_logreg.json"
DEFAULT_MAX_ITER = 1000
DEFAULT_TOL = 1e-12  # official (cuML); in practice the iteration budget stops the solver first
_NEEDS_SKLEARN = "the sklearn backend needs scikit-learn: pip install 'dinokit[eval]', or use --backend torch"
# Below this many multiply-adds per product of the features with the weights, scikit-learn's fits run on one BLAS
# thread: on a 2-core machine a second OpenBLAS thread made a 1294 x 64 x 8-class fit 20x slower (13 minutes for
# the 45 values of C), and it never paid up to 20,000 x 384 x 100 there.
SINGLE_THREAD_BLAS_BELOW = 1e9


def c_grid(size: int = 45, low: float = -6.0, high: float = 5.0) -> list[float]:
    """``size`` values of C evenly spaced in log10 between 10^low and 10^high (official: 45)."""
    return [float(c) for c in np.logspace(low, high, size)]


@dataclass
class LogregModel:
    """A fitted model: ``logits = x @ coef.T + intercept`` over ``classes`` (labels present in training)."""

    coef: torch.Tensor  # (K, D) float64
    intercept: torch.Tensor  # (K,)
    classes: torch.Tensor  # (K,) the original labels of the K outputs

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.coef.device, self.coef.dtype)
        return torch.softmax(x @ self.coef.T + self.intercept, dim=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classes.to(self.coef.device)[self.predict_proba(x).argmax(dim=1)]

    def accuracy(self, x: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
        """Top-``k`` accuracy in percent (every image right when the model knows at most ``k`` classes)."""
        top = self.predict_proba(x).topk(min(k, len(self.classes)), dim=1).indices
        hits = (self.classes.to(self.coef.device)[top] == y.to(self.coef.device)[:, None]).any(dim=1)
        return 100.0 * float(hits.double().mean())


# ---------------------------------------------------------------------------------------------- solvers
def check_logreg_options(
    *,
    c_values: Sequence[float] | None = None,
    backend: str = "auto",
    holdout_fraction: float = 0.1,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
) -> None:
    """The logistic-regression settings, the first wrong one named in one line (by its ``dinokit eval logreg``
    option). ``c_values`` None: the official grid; empty: no --c-grid-size values.

    The command calls this before any folder or feature is written; :func:`evaluate_logreg` calls it for Python
    callers.
    """
    if c_values is not None and not c_values:
        raise DinokitError("--c-grid-size must be at least 1: there is no value of C to try")
    bad = [c for c in c_values or () if not c > 0]  # NaN too
    if bad:
        raise DinokitError(f"the values of C must be positive, got {bad[0]:g}")
    if backend not in ("auto", "sklearn", "torch"):
        raise DinokitError(f"unknown logistic-regression backend {backend!r}; use auto, sklearn or torch")
    if backend == "sklearn":  # a missing optional package: one line before any feature is computed
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise DinokitError(_NEEDS_SKLEARN) from None
    if not 0 < holdout_fraction < 1:
        raise DinokitError(f"--holdout-fraction is {holdout_fraction:g}; it must be between 0 and 1 (exclusive)")
    if max_iter < 1:
        raise DinokitError(f"--max-iter must be at least 1, got {max_iter}")
    if not tol > 0:
        raise DinokitError(f"--tol must be positive (the solver's gradient tolerance), got {tol:g}")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``auto`` = torch on CUDA, else scikit-learn when installed, else torch on the CPU."""
    if backend == "auto":
        if torch.device(device).type == "cuda":
            return "torch"
        try:
            import sklearn  # noqa: F401
        except ImportError:
            return "torch"
        return "sklearn"
    if backend not in ("sklearn", "torch"):
        raise DinokitError(f"unknown logistic-regression backend {backend!r}; use auto, sklearn or torch")
    return backend


def _fit_sklearn(x: torch.Tensor, y: torch.Tensor, *, C: float, max_iter: int, tol: float) -> LogregModel:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise DinokitError(_NEEDS_SKLEARN) from err
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    estimator = LogisticRegression(C=C, max_iter=max_iter, tol=tol)
    work = x.shape[0] * x.shape[1] * len(torch.unique(y))
    with warnings.catch_warnings(), threadpool_limits(1 if work < SINGLE_THREAD_BLAS_BELOW else None, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)  # hitting max_iter is the official stopping rule
        estimator.fit(x.detach().cpu().double().numpy(), y.detach().cpu().numpy())
    coef = torch.from_numpy(estimator.coef_).double()
    intercept = torch.from_numpy(estimator.intercept_).double()
    if coef.shape[0] == 1:  # binary: one vector for class 1; class 0 has logit 0
        coef = torch.cat((torch.zeros_like(coef), coef))
        intercept = torch.cat((torch.zeros_like(intercept), intercept))
    return LogregModel(coef, intercept, torch.from_numpy(estimator.classes_).long())


@torch.inference_mode(False)  # features made (and fitted) under inference_mode, as a notebook often holds them
@torch.enable_grad()
def _fit_torch(
    x: torch.Tensor, y: torch.Tensor, *, C: float, max_iter: int, tol: float, device: torch.device | str,
    init: LogregModel | None = None, chunk_size: int | None = None,
) -> LogregModel:
    """L-BFGS (strong Wolfe line search) on ``mean CE + ||W||^2 / (2 C n)``, sklearn's scaled objective. The rows
    go through in chunks of ``chunk_size`` (default: 65536, fewer with more than 256 classes, so that each
    (rows x classes) float64 array of a chunk stays within 128 MB)."""
    classes, targets = torch.unique(y.cpu(), return_inverse=True)
    n, d = x.shape
    binary = len(classes) == 2
    rows = 1 if binary else len(classes)
    chunk_size = chunk_size or max(1024, min(1 << 16, (1 << 24) // rows))
    x = x.detach().to(device)  # its own dtype: each chunk is made float64 when used (a float64 copy is twice float32)
    if x.is_inference():  # it cannot take part in a graph outside inference_mode
        x = x.clone()
    targets = targets.to(device)
    weight = torch.zeros(rows, d, dtype=torch.float64, device=device)
    bias = torch.zeros(rows, dtype=torch.float64, device=device)
    if init is not None and torch.equal(init.classes, classes):  # warm start from a neighbouring C
        weight.copy_(init.coef[1:] if binary else init.coef)
        bias.copy_(init.intercept[1:] if binary else init.intercept)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25), tolerance_grad=tol,
        tolerance_change=64 * torch.finfo(torch.float64).eps, history_size=10, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = (weight * weight).sum() / (2 * C * n)
        total.backward()
        total = total.detach()
        for start in range(0, n, chunk_size):  # chunks bound the (rows x classes) logits in memory
            logits = x[start : start + chunk_size].double() @ weight.T + bias
            t = targets[start : start + chunk_size]
            if binary:
                loss = F.binary_cross_entropy_with_logits(logits[:, 0], t.double(), reduction="sum") / n
            else:
                loss = F.cross_entropy(logits, t, reduction="sum") / n
            loss.backward()
            total = total + loss.detach()
        return total

    optimizer.step(closure)
    coef, intercept = weight.detach(), bias.detach()
    if binary:
        coef = torch.cat((torch.zeros_like(coef), coef))
        intercept = torch.cat((torch.zeros_like(intercept), intercept))
    return LogregModel(coef, intercept, classes)


def fit_logreg(
    x: torch.Tensor, y: torch.Tensor, *, C: float, backend: str = "sklearn", max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL, device: torch.device | str = "cpu", init: LogregModel | None = None,
) -> LogregModel:
    """Fit one model with inverse regularisation strength ``C`` (``init`` warm-starts the torch solver)."""
    if backend == "sklearn":
        return _fit_sklearn(x, y, C=C, max_iter=max_iter, tol=tol)
    return _fit_torch(x, y, C=C, max_iter=max_iter, tol=tol, device=device, init=init)


# ---------------------------------------------------------------------------------------------- protocol
@dataclass
class LogregResult:
    """The line written to ``results_eval_logreg.json``."""

    top1: float  # percent, on the validation set, after the refit with best_C
    best_C: float
    backend: str
    holdout_top1: dict[str, float] = field(default_factory=dict)  # C (as text) -> top-1 where C was chosen
    top5: float = 0.0  # percent, as top1
    chosen_on: str = "holdout"  # where C was chosen: "holdout" (part of train) or "val" (--finetune-on-val)


def holdout_split(n: int, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): the first ``floor(n * fraction)`` of a permutation seeded with ``seed`` held
    out (the official ``randperm(n)[: n // 10]``), at least one."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = min(max(1, int(n * fraction + 1e-9)), n - 1)
    return order[n_held:].sort().values, order[:n_held].sort().values


def evaluate_logreg(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, *,
    c_values: Sequence[float] | None = None, backend: str = "auto", holdout_fraction: float = 0.1, seed: int = 0,
    max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL, device: torch.device | str = "cpu",
    finetune_on_val: bool = False,
) -> LogregResult:
    """Choose C on a held-out part of train, refit on all of train, report val top-1 and top-5.

    ``finetune_on_val`` (official ``--finetune-on-val``): choose C on val itself, fitting on all of train (no refit).
    Under ``torchrun`` the C values are spread over the ranks and the held-out scores gathered.
    """
    check_logreg_options(c_values=c_values, backend=backend, holdout_fraction=holdout_fraction, max_iter=max_iter,
                         tol=tol)
    device = usable_device(device)
    backend = resolve_backend(backend, device)
    c_values = sorted(c_values if c_values is not None else c_grid())
    if len(train_y) < 2:
        raise DinokitError("logistic regression needs at least 2 training images")
    # Computed in float64 as officially, each solver converting what it uses when it uses it: the features stay in
    # their own dtype (a float64 copy of ImageNet's is 4 GB at D=384). The torch solver gets them on its device once,
    # not once per C; the fitting set is taken once, not once per C.
    data_device = device if backend == "torch" else "cpu"
    train_x, val_x = train_x.to(data_device), val_x.to(data_device)
    if finetune_on_val:
        fit_idx, held_idx = torch.arange(len(train_y)), None
        fit_x, fit_y = train_x, train_y
    else:
        fit_idx, held_idx = holdout_split(len(train_y), holdout_fraction, seed)
        fit_x, fit_y = train_x[fit_idx.to(train_x.device)], train_y[fit_idx]
    held_x, held_y = (val_x, val_y) if held_idx is None else (train_x[held_idx.to(train_x.device)], train_y[held_idx])
    n_fit_classes = int(torch.unique(fit_y).numel())
    if n_fit_classes < 2:  # the solvers need two classes (sklearn raised a ValueError traceback)
        which = (f"{len(fit_idx)} training image(s)" if held_idx is None else  # --finetune-on-val: all of them
                 f"{len(fit_idx)} training image(s) left after holding out {len(held_idx)} to choose C")
        raise DinokitError(f"logistic regression needs at least 2 classes among the images it fits on; the {which} "
                           f"have {n_fit_classes}; add training images of more classes")
    scores: dict[float, float] = {}
    previous = None
    for C in c_values[du.get_rank() :: du.get_world_size()]:  # increasing C: warm starts follow the path
        previous = fit_logreg(fit_x, fit_y, C=C, backend=backend, max_iter=max_iter, tol=tol, device=device,
                              init=previous)
        scores[C] = previous.accuracy(held_x, held_y)
    del fit_x, held_x  # before the refit on all of train
    for part in du.all_gather_object(scores):
        scores.update(part)
    best_C = max(c_values, key=lambda c: scores[c])  # the smallest C among equals: the strongest regularisation
    final = fit_logreg(train_x, train_y, C=best_C, backend=backend, max_iter=max_iter, tol=tol, device=device)
    return LogregResult(
        top1=final.accuracy(val_x, val_y), top5=final.accuracy(val_x, val_y, k=5), best_C=best_C, backend=backend,
        holdout_top1={f"{c:.3g}": scores[c] for c in c_values}, chosen_on="val" if finetune_on_val else "holdout",
    )


def write_logreg_result(result: LogregResult, output_dir: str | Path, provenance: dict | None = None) -> Path:
    """Append the result line (with ``provenance``) to ``output_dir/results_eval_logreg.json``, atomically."""
    return append_results(Path(output_dir) / RESULTS_FILE, [{**asdict(result), **(provenance or {})}])


def logreg_protocol(
    ctx: EvalContext,
    *,
    c_values: Sequence[float] | None = None,
    backend: str = "auto",
    holdout_fraction: float = 0.1,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    finetune_on_val: bool = False,
) -> LogregResult:
    """``dinokit eval logreg``: cached class tokens, C selection and refit, ``results_eval_logreg.json``.

    The official protocol reads Resize(crop) + CenterCrop images: make ``ctx`` with ``prepare_eval(...,
    resize_size=image_size)``, as the command does."""
    if len(set(ctx.train.targets)) < 2:  # told before the extraction (it came after it)
        raise DinokitError(f"logistic regression needs at least 2 classes among the images it fits on; the "
                           f"{len(ctx.train)} training image(s) have 1; add training images of more classes")
    train = ctx.features("train", "cls")
    val = ctx.features("val", "cls")
    trust = report_label_warnings(train.targets, val.targets, ctx.num_classes, classes=ctx.class_names)
    result = evaluate_logreg(
        train.features["cls"], train.targets, val.features["cls"], val.targets, c_values=c_values,
        backend=backend, holdout_fraction=holdout_fraction, max_iter=max_iter, tol=tol, device=ctx.device,
        finetune_on_val=finetune_on_val,
    )
    if du.is_main_process():
        write_logreg_result(result, ctx.output_dir, ctx.result_provenance(trust))
    return result
