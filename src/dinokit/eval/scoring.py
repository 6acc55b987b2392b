"""Scoring a trained linear probe on extra test sets (the official ``--test-datasets``, ``--test-metric-types`` and
``--test-class-mapping-fpaths``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..data import ImageDataset, make_dataset
from ..errors import DinokitError
from ..files import read_npy
from ..models.linear_classifier import probe_input
from .setup import EvalContext, align_classes

# the official metric types
TEST_METRICS = ("mean_accuracy", "mean_per_class_accuracy", "per_class_accuracy", "imagenet_real_accuracy")
VAL_METRICS = ("mean_accuracy", "mean_per_class_accuracy")  # those that rank the classifiers on the val set
NO_MAPPING = ("", "none", "None")  # the official placeholder of a test set without a class mapping


@dataclass
class TestSet:
    """An opened test dataset: its metric, and the classifier outputs it is scored on (``class_mapping``: the
    classifier's class of each of the dataset's classes, or None when its labels follow the train classes)."""

    name: str
    metric: str
    dataset: ImageDataset
    class_mapping: torch.Tensor | None = None


def score_metric(logits: torch.Tensor, labels: torch.Tensor, metric: str,
                 real_labels: Sequence[Sequence[int]] | None = None) -> float | list[float | None]:
    """The official test metrics, in percent: ``mean_accuracy`` (top-1 over the images), ``mean_per_class_accuracy``
    (the mean over the classes present in ``labels`` of their top-1), ``per_class_accuracy`` (each class's top-1,
    None for a class without images), ``imagenet_real_accuracy`` (ImageNet-ReaL: a prediction is right when it is
    one of the image's ``real_labels``; images without any are left out)."""
    return score_predictions(logits.argmax(dim=1), labels, metric, num_classes=logits.shape[1], real_labels=real_labels)


def score_predictions(predicted: torch.Tensor, labels: torch.Tensor, metric: str, *, num_classes: int = 0,
                      real_labels: Sequence[Sequence[int]] | None = None) -> float | list[float | None]:
    """:func:`score_metric` of predicted classes (``num_classes``: the length of ``per_class_accuracy``'s list)."""
    if metric == "imagenet_real_accuracy":
        if real_labels is None or len(real_labels) != len(predicted):
            raise ValueError("imagenet_real_accuracy needs the real labels of every image")
        right = [int(p) in set(real) for p, real in zip(predicted.tolist(), real_labels) if len(real)]
        return 100.0 * sum(right) / len(right) if right else math.nan
    labels = labels.cpu()
    right = (predicted.cpu() == labels).double()
    if metric == "mean_accuracy":
        return 100.0 * float(right.mean())
    per_class = {int(c): 100.0 * float(right[labels == c].mean()) for c in labels.unique()}
    if metric == "mean_per_class_accuracy":
        return sum(per_class.values()) / len(per_class)
    return [per_class.get(c) for c in range(num_classes)]


def metrics_of_test_sets(test_datasets: Sequence[str], test_metric_types: Sequence[str],
                         class_mappings: Sequence[str] = ()) -> list[str]:
    """The metric of each test dataset: ``test_metric_types`` has one for all, one per dataset, or none
    (``mean_accuracy``); ``class_mappings`` likewise (paths, or None); anything else is one line."""
    bad = [m for m in test_metric_types if m not in TEST_METRICS]
    if bad:
        raise DinokitError(f"--test-metric-types {bad[0]!r} is not one of {', '.join(TEST_METRICS)}")
    for flag, values in (("--test-metric-types", test_metric_types), ("--test-class-mapping-fpaths", class_mappings)):
        if len(values) not in (0, 1, len(test_datasets)):
            raise DinokitError(f"{flag} gives {len(values)} values for {len(test_datasets)} --test-datasets; give "
                               "one for all, or one per dataset")
    metrics = _per_dataset(test_metric_types, len(test_datasets), "mean_accuracy")
    for name, metric, mapping in zip(test_datasets, metrics, _per_dataset(class_mappings, len(test_datasets), "")):
        if metric == "imagenet_real_accuracy" and mapping not in NO_MAPPING:
            raise DinokitError(f"test dataset {name!r}: imagenet_real_accuracy scores ImageNet's 1000 classes; give "
                               "it no class mapping (None)")
    return metrics


def _per_dataset(values: Sequence[str], n: int, default: str) -> list[str]:
    return list(values) if len(values) > 1 else [values[0] if values else default] * n


def read_class_mapping(path: str, n_test_classes: int, n_classes: int) -> torch.Tensor:
    """An official class-mapping file (``np.save`` of the classifier's class index of each test class, in the test
    set's class order), checked against both class counts."""
    mapping = read_npy(path, f"--test-class-mapping-fpaths {path!r}")
    if mapping.ndim != 1 or not np.issubdtype(mapping.dtype, np.integer) or len(mapping) != n_test_classes:
        raise DinokitError(f"class mapping {path!r} holds {mapping.dtype} values of shape {tuple(mapping.shape)}; it "
                           f"needs {n_test_classes} integers, one per class of its test dataset")
    if len(mapping) and (mapping.min() < 0 or mapping.max() >= n_classes):
        raise DinokitError(f"class mapping {path!r} holds classes {int(mapping.min())}..{int(mapping.max())}; the "
                           f"classifier has {n_classes} (0..{n_classes - 1})")
    return torch.as_tensor(mapping, dtype=torch.long)


def open_test_sets(ctx: EvalContext, test_datasets: Sequence[str], test_metric_types: Sequence[str] = (),
                   class_mappings: Sequence[str] = ()) -> list[TestSet]:
    """Each test dataset, read with the val transform, with its metric and class mapping; opened before training,
    so that a wrong path, metric or mapping is one line at once. Without a mapping, its classes are matched to
    train's by name; with one (official), its labels stay its own and the classifier's outputs are those the
    mapping names."""
    metrics = metrics_of_test_sets(test_datasets, test_metric_types, class_mappings)
    opened = []
    for name, metric, mapping in zip(test_datasets, metrics,
                                      _per_dataset(class_mappings, len(test_datasets), "")):
        dataset = make_dataset(name, transform=ctx.val.transform, labelled=True)
        if metric == "imagenet_real_accuracy" and getattr(dataset, "real_labels", None) is None:
            raise DinokitError(f"test dataset {name!r}: imagenet_real_accuracy needs the ReaL labels; give the ImageNet "
                               "validation set with them, e.g. ImageNet:split=VAL:root=DIR:real_labels=real.json")
        if mapping in NO_MAPPING:
            own_classes = list(dataset.classes)
            align_classes(ctx.train, dataset, role="test")
            if metric == "imagenet_real_accuracy":
                dataset.real_labels = _renumber(dataset.real_labels, own_classes, dataset.classes, name)
            opened.append(TestSet(name, metric, dataset))
        else:
            opened.append(TestSet(name, metric, dataset,
                                  read_class_mapping(mapping, len(dataset.classes), ctx.num_classes)))
    return opened


def _renumber(real_labels: list[list[int]], own: list[str], new: list[str], name: str) -> list[list[int]]:
    """ReaL labels (indices into ``own`` classes) as indices into ``new`` (the train classes)."""
    if own == new:
        return real_labels
    index = {c: i for i, c in enumerate(new)}
    missing = sorted({own[r] for real in real_labels for r in real if own[r] not in index})
    if missing:
        raise DinokitError(f"test dataset {name!r}: its ReaL labels name {len(missing)} classes the train dataset "
                           f"lacks (e.g. {missing[0]!r}); train on ImageNet's 1000 classes")
    return [[index[own[r]] for r in real] for real in real_labels]


def score_test_sets(ctx: EvalContext, probes, best: str, test_sets: Sequence[TestSet],
                    batch: int = 1024) -> dict[str, dict]:
    """Each opened test set scored with the ``best`` classifier of ``probes``: ``{dataset: {"metric", "value",
    "images"}}``."""
    setting, classifier = probes.settings[best], probes.classifiers_dict[best]
    device = next(classifier.parameters()).device
    tests: dict[str, dict] = {}
    for i, test in enumerate(test_sets):
        feats = ctx.features(f"test{i}", "linear", test.dataset)
        cls_tokens, patch_mean = feats.features["cls_tokens"], feats.features["patch_mean"]
        with torch.no_grad():  # the best classifier alone, a batch at a time
            logits = torch.cat([
                classifier(probe_input(cls_tokens[s : s + batch].to(device), patch_mean[s : s + batch].to(device),
                                       n_last_blocks=setting.n_last_blocks, avgpool=setting.avgpool)).cpu()
                for s in range(0, len(cls_tokens), batch)])
        if test.class_mapping is not None:
            logits = logits[:, test.class_mapping]  # the official LinearPostprocessor's preds[:, class_mapping]
        real = getattr(test.dataset, "real_labels", None)
        real = [real[int(j)] for j in feats.indices] if test.metric == "imagenet_real_accuracy" else None
        labels = torch.as_tensor(feats.targets)
        tests[test.name] = {"metric": test.metric, "value": score_metric(logits, labels, test.metric, real),
                            "images": len(labels)}
        if real is not None:  # ReaL leaves out the images without a reassessed label
            tests[test.name]["images_with_real_labels"] = sum(1 for r in real if len(r))
    return tests


def format_test_line(name: str, test: dict) -> str:
    """One printed line of a scored test set."""
    value = test["value"]
    if isinstance(value, list):
        scored = [v for v in value if v is not None]
        text = (f"{len(scored)} classes, mean {sum(scored) / len(scored):.2f}, lowest {min(scored):.2f}"
                if scored else "no class with images")
    else:
        text = f"{value:.2f}"
    return f"test {name}: {test['metric']} {text} ({test['images']} images)"
