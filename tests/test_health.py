"""Collapse signs: the teacher statistics logged by pretraining, the diagnosis of logged lines, and the one
warning the engine shows (the `small` preset's strong colour jitter collapses to uniform targets on coloured
shapes: README, "Small-data recipe")."""

from __future__ import annotations

import json
import math
import warnings

import torch

from dinokit.config import load_config
from dinokit.data import write_sample_dataset
from dinokit.errors import TrainingHealthWarning
from dinokit.train import health
from dinokit.train.health import CollapseCheck, teacher_health

from tiny import tiny_run


def test_teacher_health_of_uniform_and_one_hot_targets():
    uniform = torch.full((2, 3, 8), 1 / 8)
    h = teacher_health(uniform)
    assert math.isclose(float(h["teacher_entropy"]), math.log(8), rel_tol=1e-6)
    assert float(h["prototypes_used"]) == 1  # every row's arg-max is prototype 0
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 0, 3], [5, 3, 0]]), 8).float()
    h = teacher_health(one_hot)
    assert float(h["teacher_entropy"]) == 0.0 and float(h["prototypes_used"]) == 3
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert math.isclose(float(teacher_health(half)["teacher_entropy"]), math.log(2), rel_tol=1e-6)


def test_collapse_check_waits_for_the_warm_up_and_three_lines():
    check = CollapseCheck(n_prototypes=256, start=10)
    flat = {"teacher_entropy": math.log(256) * 0.99, "prototypes_used": 40.0}
    healthy = {"teacher_entropy": 3.0, "prototypes_used": 40.0}
    assert check(flat, 9) is None  # during the warm-up: ignored
    assert check(flat, 19) is None and check(flat, 29) is None
    assert check(healthy, 39) is None  # the streak is broken
    assert [check(flat, it) for it in (49, 59)] == [None, None]
    message = check(flat, 69)
    assert message.startswith("the DINO targets have been uniform since iteration 49 (teacher entropy 5.490, "
                              "log K = 5.545)") and "crops.color_jitter_strength" in message and "\n" not in message
    assert check(flat, 79) is None  # said once
    one = CollapseCheck(n_prototypes=256, start=0)
    stuck = {"teacher_entropy": 0.01, "prototypes_used": 1.0, "current_batch_size": 32}
    assert CollapseCheck(256, 0)({**stuck, "current_batch_size": 4}, 0) is None
    assert [one(stuck, it) for it in (0, 10)] == [None, None]
    assert one(stuck, 20).startswith("every image has had the same DINO prototype since iteration 0")
    assert CollapseCheck(8, 0)({"total_loss": 1.0}, 100) is None  # a line without the statistics
    # the other teacher normalisation is advised: Sinkhorn-Knopp was advised to runs that used it
    assert "train.centering=sinkhorn_knopp" in message
    sinkhorn = CollapseCheck(256, 0, centering="sinkhorn_knopp")
    said = [sinkhorn(flat, it) for it in (0, 10, 20)][-1]
    assert "train.centering=centering" in said and "sinkhorn_knopp" not in said
    sinkhorn = CollapseCheck(256, 0, centering="sinkhorn_knopp")
    said = [sinkhorn(stuck, it) for it in (0, 10, 20)][-1]
    assert "train.centering=centering" in said and "sinkhorn_knopp" not in said and "hardly differ" in said


def test_engine_shows_a_task_diagnosis_once(tmp_path, monkeypatch):
    from test_engine import Regression, run_toy

    monkeypatch.setattr(Regression, "diagnose", lambda self, record, it: f"toy collapsed (line {it > 10})", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_toy(tmp_path / "run")
    shown = [str(w.message) for w in caught if issubclass(w.category, TrainingHealthWarning)]
    assert shown == ["toy collapsed (line False)", "toy collapsed (line True)"]  # each distinct text once


def test_pretraining_logs_the_statistics_and_warns_on_uniform_targets(tmp_path, monkeypatch):
    from dinokit.cli.train import pretrain as train

    images = write_sample_dataset(tmp_path / "sample", counts={"train": 3, "val": 1}, image_size=40)
    cfg = load_config("demo", [*tiny_run(local_crops=1, batch=4, epoch_length=3, epochs=3, warmup=1),
                               f"train.dataset_path=ImageFolder:root={images / 'train'}"])
    monkeypatch.setattr(health, "UNIFORM_FRACTION", 0.0)  # every line after the warm-up counts as uniform
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, output_dir=tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run" / "training_metrics.json").read_text().splitlines()]
    assert all(0 <= l["teacher_entropy"] <= math.log(32) + 1e-4 and 1 <= l["prototypes_used"] <= 8 for l in lines)
    shown = [str(w.message) for w in caught if issubclass(w.category, TrainingHealthWarning)]
    # lines at iterations 3, 4, 5 are the first three after the 3-iteration warm-up
    assert len(shown) == 1 and shown[0].startswith("the DINO targets have been uniform since iteration 3 ")
