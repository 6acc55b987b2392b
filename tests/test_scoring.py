"""The official test metrics of ``eval linear`` (hand-computed values), class-mapping files and ImageNet-ReaL labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data import make_dataset
from dinokit.errors import DinokitError
from dinokit.eval.scoring import _renumber, metrics_of_test_sets, read_class_mapping, score_metric

# 5 images, 3 classes: predictions 0, 1, 1, 2, 0 against labels 0, 1, 2, 2, 2
LOGITS = torch.tensor([[3.0, 0, 0], [0, 2, 1], [0, 5, 1], [0, 0, 1], [4, 0, 1]])
LABELS = torch.tensor([0, 1, 2, 2, 2])


def test_accuracy_metrics_by_hand():
    assert score_metric(LOGITS, LABELS, "mean_accuracy") == pytest.approx(100 * 3 / 5)
    # class 0: 1/1, class 1: 1/1, class 2: 1/3
    assert score_metric(LOGITS, LABELS, "mean_per_class_accuracy") == pytest.approx(100 * (1 + 1 + 1 / 3) / 3)
    assert score_metric(LOGITS, LABELS, "per_class_accuracy") == pytest.approx([100.0, 100.0, 100 / 3])
    # a class without images is None, not 0
    assert score_metric(LOGITS[:2], LABELS[:2], "per_class_accuracy") == [100.0, 100.0, None]


def test_imagenet_real_accuracy_by_hand():
    """Right when the prediction is one of the image's real labels; images without any are left out."""
    real = [[0], [2], [1, 2], [], [1]]  # right, wrong, right, left out, wrong
    assert score_metric(LOGITS, LABELS, "imagenet_real_accuracy", real) == pytest.approx(100 * 2 / 4)
    assert math.isnan(score_metric(LOGITS, LABELS, "imagenet_real_accuracy", [[]] * 5))


def test_metric_and_mapping_counts_are_checked():
    assert metrics_of_test_sets(["a", "b"], ["per_class_accuracy"]) == ["per_class_accuracy"] * 2
    with pytest.raises(DinokitError, match="--test-class-mapping-fpaths gives 2 values for 3 --test-datasets"):
        metrics_of_test_sets(["a", "b", "c"], [], ["m.npy", "None"])
    with pytest.raises(DinokitError, match="imagenet_real_accuracy scores ImageNet's 1000 classes; give it no class"):
        metrics_of_test_sets(["a"], ["imagenet_real_accuracy"], ["m.npy"])


def test_class_mapping_files(tmp_path):
    path = tmp_path / "m.npy"
    np.save(path, np.array([4, 1]))
    assert read_class_mapping(str(path), 2, 5).tolist() == [4, 1]
    for array, message in ((np.array([4, 1, 0]), "it needs 2 integers, one per class of its test dataset"),
                           (np.array([0.5, 1.0]), "float64 values of shape (2,)"),
                           (np.array([5, 1]), "holds classes 1..5; the classifier has 5 (0..4)")):
        np.save(path, array)
        with pytest.raises(DinokitError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_class_mapping(str(path), 2, 5)
    what = f"--test-class-mapping-fpaths {str(path)!r}"
    for content, why in ((b"0: 1\n1: 0\n", "is not a NumPy .npy file; save one with numpy.save"),  # a YAML mapping
                         (None, "holds Python objects, which are not unpickled; save a numeric array with numpy.save"),
                         ("cut", "is cut short or damaged; save a numeric array with numpy.save")):
        if content is None:
            np.save(path, np.array([{"code": 1}], dtype=object))  # a pickle inside is refused, never run
        elif content == "cut":
            np.save(path, np.arange(100))
            path.write_bytes(path.read_bytes()[:150])
        else:
            path.write_bytes(content)
        with pytest.raises(DinokitError) as err:
            read_class_mapping(str(path), 2, 5)
        assert str(err.value) == f"{what} {why}"
    with pytest.raises(DinokitError) as err:
        read_class_mapping(str(tmp_path / "none.npy"), 2, 5)
    assert str(err.value) == (f"--test-class-mapping-fpaths {str(tmp_path / 'none.npy')!r} cannot be read (No such "
                              "file or directory); check the path")


def _imagenet_val(root, classes, per_class):
    """ImageNet's layout: val/<wnid>/ILSVRC2012_val_<n>.JPEG numbered from 1, and labels.txt."""
    n = 0
    for c, wnid in enumerate(classes):
        for _ in range(per_class):
            n += 1
            path = root / "val" / wnid / f"ILSVRC2012_val_{n:08d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (c, c, c)).save(path)
    (root / "labels.txt").write_text("".join(f"{w},name {w}\n" for w in classes))
    return n


def test_real_labels_follow_the_file_numbers(tmp_path):
    n = _imagenet_val(tmp_path, ["a", "b"], 2)
    real = tmp_path / "real.json"
    real.write_text(json.dumps([[0], [0, 1], [], [1], [1]]))  # one more than the images: the full file
    ds = make_dataset(f"ImageNet:split=VAL:root={tmp_path}:real_labels={real}")
    assert n == 4 and ds.real_labels == [[0], [0, 1], [], [1]]
    # the train classes in another order: renumbered by name
    assert _renumber(ds.real_labels, ["a", "b"], ["b", "a"], "t") == [[1], [1, 0], [], [0]]
    with pytest.raises(DinokitError, match="its ReaL labels name 1 classes the train dataset lacks"):
        _renumber(ds.real_labels, ["a", "b"], ["b", "c"], "t")
    for text, message in (("[[0], [0]]", "have 2 images; the validation set holds ILSVRC2012_val_00000003"),
                          ("[[0], [7]]", "are not a JSON list of lists of class indices 0..1"),
                          ("{", "cannot be read (JSONDecodeError")):
        real.write_text(text)
        with pytest.raises(DinokitError, match=message.replace("(", r"\(")):
            make_dataset(f"ImageNet:split=VAL:root={tmp_path}:real_labels={real}")
    with pytest.raises(DinokitError, match="real_labels= is ImageNet-ReaL's relabelling of the VAL split, not TRAIN"):
        make_dataset(f"ImageNet:split=TRAIN:root={tmp_path}:real_labels={real}")
