"""Scoring a trained linear probe on extra test sets (the official ``--test-datasets``/``--test-metric-types``)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..data import ImageDataset, make_dataset
from ..errors import DinokitError
from ..models.linear_classifier import probe_input
from .setup import EvalContext, align_classes

TEST_METRICS = ("mean_accuracy", "mean_per_class_accuracy")  # the official metric types that apply here


def score_metric(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """``mean_accuracy`` (top-1 over the images) or ``mean_per_class_accuracy`` (the mean over the classes present
    in ``labels`` of their top-1), in percent."""
    right = (logits.argmax(dim=1) == labels).double()
    if metric == "mean_accuracy":
        return 100.0 * float(right.mean())
    per_class = [right[labels == c].mean() for c in labels.unique()]
    return 100.0 * float(torch.stack(per_class).mean())


def metrics_of_test_sets(test_datasets: Sequence[str], test_metric_types: Sequence[str]) -> list[str]:
    """The metric of each test dataset: ``test_metric_types`` has one for all, one per dataset, or none
    (``mean_accuracy``); anything else is one line."""
    bad = [m for m in test_metric_types if m not in TEST_METRICS]
    if bad:
        raise DinokitError(f"--test-metric-types {bad[0]!r} is not one of {', '.join(TEST_METRICS)}")
    if len(test_metric_types) not in (0, 1, len(test_datasets)):
        raise DinokitError(f"--test-metric-types gives {len(test_metric_types)} types for {len(test_datasets)} "
                           "--test-datasets; give one for all, or one per dataset")
    if len(test_metric_types) > 1:
        return list(test_metric_types)
    return [test_metric_types[0] if test_metric_types else "mean_accuracy"] * len(test_datasets)


def open_test_sets(ctx: EvalContext, test_datasets: Sequence[str],
                   test_metric_types: Sequence[str] = ()) -> list[tuple[str, str, ImageDataset]]:
    """(name, metric, dataset) of each test dataset, read with the val transform, its classes matched to train's by
    name; opened before training, so that a wrong path or metric is one line at once. ``test_metric_types``: one for
    all, one per dataset, or none (``mean_accuracy``)."""
    metrics = metrics_of_test_sets(test_datasets, test_metric_types)
    opened = []
    for name, metric in zip(test_datasets, metrics):
        dataset = make_dataset(name, transform=ctx.val.transform, labelled=True)
        align_classes(ctx.train, dataset, role="test")
        opened.append((name, metric, dataset))
    return opened


def score_test_sets(ctx: EvalContext, probes, best: str, test_sets: Sequence[tuple[str, str, ImageDataset]],
                    batch: int = 1024) -> dict[str, dict]:
    """Each opened test set scored with the ``best`` classifier of ``probes``: ``{dataset: {"metric", "value",
    "images"}}``."""
    setting, classifier = probes.settings[best], probes.classifiers_dict[best]
    device = next(classifier.parameters()).device
    tests: dict[str, dict] = {}
    for i, (name, metric, dataset) in enumerate(test_sets):
        feats = ctx.features(f"test{i}", "linear", dataset)
        cls_tokens, patch_mean = feats.features["cls_tokens"], feats.features["patch_mean"]
        with torch.no_grad():  # the best classifier alone, a batch at a time
            logits = torch.cat([
                classifier(probe_input(cls_tokens[s : s + batch].to(device), patch_mean[s : s + batch].to(device),
                                       n_last_blocks=setting.n_last_blocks, avgpool=setting.avgpool)).cpu()
                for s in range(0, len(cls_tokens), batch)])
        labels = torch.as_tensor(feats.targets)
        tests[name] = {"metric": metric, "value": score_metric(logits, labels, metric), "images": len(labels)}
    return tests
