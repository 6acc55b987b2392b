"""Scoring the linear probes and saving their results: every classifier's val predictions and metric, the best
classifiers' heads in the hub format, and the line of ``results_eval_linear.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..files import atomic_write
from .results import append_results
from .scoring import score_predictions

if TYPE_CHECKING:
    from .linear import LinearProbes, ProbeSetting

RESULTS_FILE = "results_eval_linear.json"


@torch.no_grad()
def probe_predictions(probes: LinearProbes, cls_tokens: torch.Tensor, patch_mean: torch.Tensor, *,
                      batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Every classifier's predicted class of each row of the given features (on the CPU)."""
    device = next(probes.parameters()).device
    predicted: dict[str, list[torch.Tensor]] = {name: [] for name in probes.settings}
    for start in range(0, len(cls_tokens), batch_size):
        rows = slice(start, start + batch_size)
        for name, out in probes(cls_tokens[rows].to(device), patch_mean[rows].to(device)).items():
            predicted[name].append(out.argmax(dim=1).cpu())
    return {name: torch.cat(p) if p else torch.zeros(0, dtype=torch.long) for name, p in predicted.items()}


def score_probes(predicted: dict[str, torch.Tensor], labels: torch.Tensor, metric: str = "mean_accuracy"
                 ) -> dict[str, float]:
    """Every classifier's ``metric`` (percent): top-1 (``mean_accuracy``), or the official ``mean_per_class_accuracy``
    (``--val-metric-type``, for unbalanced sets)."""
    if not len(labels):
        return dict.fromkeys(predicted, 0.0)
    return {name: float(score_predictions(p, labels, metric)) for name, p in predicted.items()}


# ---------------------------------------------------------------------------------------------- results
@dataclass
class LinearResult:
    """The line written to ``results_eval_linear.json``."""

    best_classifier: str
    top1: float  # percent, on the validation set
    n_last_blocks: int
    avgpool: bool
    lr: float
    iterations: int
    augment: bool
    head_files: dict[str, str] = field(default_factory=dict)  # "best", "layers_1", "layers_4" -> file name
    classifiers: dict[str, float] = field(default_factory=dict)  # every classifier's top-1
    # the best classifier on each --test-datasets set: {dataset: {"metric": type, "value": percent, "images": n}}
    tests: dict[str, dict] = field(default_factory=dict)
    val_metric_type: str = "mean_accuracy"  # what chose the best classifiers (official --val-metric-type)
    val_value: float | None = None  # the best classifier's val_metric_type on the val set, percent
    # the periodic evaluations during training (--eval-period-iterations): {"iteration", "best_classifier", "top1", ...}
    periodic: list[dict] = field(default_factory=list)


def best_classifier(accuracies: dict[str, float], settings: dict[str, ProbeSetting], **require: object) -> str | None:
    """Name of the most accurate classifier whose setting matches ``require`` (first one on ties)."""
    names = [n for n, s in settings.items() if all(getattr(s, k) == v for k, v in require.items())]
    return max(names, key=lambda n: accuracies[n]) if names else None


def save_linear_head(linear: nn.Linear, path: str | Path) -> Path:
    """Write ``linear`` as a hub head file: a flat ``{"weight": (C, F), "bias": (C,)}``."""
    state = {"weight": linear.weight.detach().cpu().contiguous(), "bias": linear.bias.detach().cpu().contiguous()}
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def save_results(
    probes: LinearProbes, accuracies: dict[str, float], output_dir: str | Path, *, iterations: int, augment: bool,
    provenance: dict | None = None, tests: dict[str, dict] | None = None, scores: dict[str, float] | None = None,
    val_metric_type: str = "mean_accuracy", periodic: list[dict] | None = None,
) -> LinearResult:
    """Save the best head (``linear_head_best.pth``), the best ``_lc``-compatible heads
    (avgpool, ``linear_head_1.pth`` / ``linear_head_4.pth``) and append the result line (with ``provenance``).
    The best are those of the highest ``scores`` (the ``val_metric_type`` of each classifier; default: top-1)."""
    output_dir = Path(output_dir)
    scores = accuracies if scores is None else scores
    best = best_classifier(scores, probes.settings)
    s = probes.settings[best]
    files = {"best": "linear_head_best.pth"}
    for n in (1, 4):
        name = best_classifier(scores, probes.settings, n_last_blocks=n, avgpool=True)
        if name is not None:
            files[f"layers_{n}"] = f"linear_head_{n}.pth"
            save_linear_head(probes.classifiers_dict[name], output_dir / files[f"layers_{n}"])
    save_linear_head(probes.classifiers_dict[best], output_dir / files["best"])
    result = LinearResult(
        best_classifier=best, top1=accuracies[best], n_last_blocks=s.n_last_blocks, avgpool=s.avgpool, lr=s.lr,
        iterations=iterations, augment=augment, head_files=files, classifiers=accuracies, tests=tests or {},
        val_metric_type=val_metric_type, val_value=scores[best], periodic=list(periodic or []),
    )
    append_results(output_dir / RESULTS_FILE, [{**asdict(result), **(provenance or {})}])
    return result


def val_scores(probes: LinearProbes, features: dict[str, torch.Tensor], labels: torch.Tensor,
               val_metric_type: str = "mean_accuracy") -> tuple[dict[str, float], dict[str, float]]:
    """Every classifier's top-1 and its ``val_metric_type`` (the same dict for top-1), from one prediction pass."""
    predicted = probe_predictions(probes, features["cls_tokens"], features["patch_mean"])
    top1 = score_probes(predicted, labels)
    return top1, (top1 if val_metric_type == "mean_accuracy" else score_probes(predicted, labels, val_metric_type))


def periodic_record(probes: LinearProbes, features: dict[str, torch.Tensor], labels: torch.Tensor, iteration: int,
                    val_metric_type: str = "mean_accuracy") -> dict:
    """One periodic evaluation: the best classifier on val at ``iteration`` by ``val_metric_type``, its top-1 and
    (another metric) that metric's value."""
    top1, scores = val_scores(probes, features, labels, val_metric_type)
    best = best_classifier(scores, probes.settings)
    record = {"iteration": iteration, "best_classifier": best, "top1": top1[best]}
    return record if scores is top1 else {**record, val_metric_type: scores[best]}


def periodic_line(record: dict) -> str:
    """The printed line of a periodic evaluation."""
    other = [f"{k} {v:.2f}" for k, v in record.items() if k not in ("iteration", "best_classifier", "top1")]
    return f"val top-1 {record['top1']:.2f}{''.join(', ' + o for o in other)} (best probe: {record['best_classifier']})"


def format_linear_table(probes: LinearProbes, accuracies: dict[str, float], label: str = "top-1") -> str:
    """The best learning rate and its value (``label``: top-1, or the val metric) for each feature layout."""
    lines = [f"{'blocks':>6}  {'avgpool':>7}  {'best lr':>8}  {label:>6}"]
    layouts = sorted({(s.n_last_blocks, s.avgpool) for s in probes.settings.values()})
    for n, avgpool in layouts:
        name = best_classifier(accuracies, probes.settings, n_last_blocks=n, avgpool=avgpool)
        lines.append(f"{n:>6}  {str(avgpool):>7}  {probes.settings[name].lr:8.2e}  {accuracies[name]:6.2f}")
    return "\n".join(lines)
