"""The k-NN evaluation of the training loop (``run_knn_eval``, the monitor): the same as ``dinokit eval knn`` on a snapshot,
the backbone's mode left as it was."""

from __future__ import annotations

import pytest
import torch

from dinokit.cli import main
from dinokit.config import load_config, write_config
from dinokit.eval import build_eval_backbone, run_knn_eval
from test_eval_cli import read_lines, sample  # noqa: F401  (sample: a fixture)
from test_knn import one_thread  # noqa: F401  (autouse fixture)


def test_run_knn_eval_for_the_training_loop(sample, tmp_path):
    root, config_file = sample
    backbone = build_eval_backbone(load_config(str(config_file))).train()
    metrics = run_knn_eval(backbone, train_dataset_str=str(root / "train"), val_dataset_str=str(root / "val"),
                           output_dir=tmp_path, ks=(10, 20), image_size=32)
    assert set(metrics) == {"knn_top1_k10", "knn_top5_k10", "knn_top1_k20", "knn_top5_k20"}
    assert backbone.training and not (tmp_path / "results_eval_knn.json").exists()


def test_the_training_monitor_evaluates_at_evaluation_knn_image_size(sample, tmp_path):
    """evaluation.knn_image_size (null: the crop size, as before) makes the in-training k-NN the one of
    `dinokit eval knn --image-size N` on the same snapshot; sizes that are not a multiple of the patch: one line."""
    from dinokit.config import backbone_from_config, backbone_img_size
    from dinokit.errors import DinokitError
    from dinokit.eval.monitor import knn_monitor
    from dinokit.models import save_backbone

    root, _ = sample
    knn = [f"evaluation.knn_dataset.train=ImageFolder:root={root / 'train'}",
           f"evaluation.knn_dataset.val=ImageFolder:root={root / 'val'}", "evaluation.knn_k=[3]"]
    cfg = load_config("demo", [*knn, "evaluation.knn_image_size=48"])
    crops = backbone_img_size(cfg.crops)
    torch.manual_seed(0)
    snapshot = save_backbone(backbone_from_config(cfg.student, img_size=crops), tmp_path / "snapshot.pth")
    logged = []
    monitor = knn_monitor(cfg, torch.device("cpu"))
    assert (monitor.image_size, monitor.backbone_size) == (48, crops) != (crops, crops)
    monitor(0, {"": snapshot}, logged.append)
    write_config(cfg, tmp_path)
    assert main(["eval", "knn", "--output-dir", str(tmp_path / "eval"), "--train-dataset", str(root / "train"),
                 "--val-dataset", str(root / "val"), "--config-file", str(tmp_path / "config.yaml"),
                 "--pretrained-weights", str(snapshot), "--image-size", "48", "--nb-knn", "3", "--num-workers", "0",
                 "--device", "cpu", "--no-progress"]) == 0
    (result,) = read_lines(tmp_path / "eval" / "results_eval_knn.json")
    assert result["k"] == 3 and logged[0]["knn_top1_k3"] == pytest.approx(result["top1"])
    assert logged[0]["knn_top5_k3"] == pytest.approx(result["top5"])
    assert knn_monitor(load_config("demo", knn), torch.device("cpu")).image_size == crops  # null: the crop size
    with pytest.raises(DinokitError, match=r"^config key 'evaluation.knn_image_size' is 50; give a positive multiple "
                                           r"of student.patch_size \(8\), e.g. 48 \(or null: the global crop size\)$"):
        load_config("demo", [*knn, "evaluation.knn_image_size=50"])
