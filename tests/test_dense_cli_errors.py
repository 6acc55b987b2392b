"""``dinokit dense`` user errors: bad inputs, colour masks, recipe settings out of range and bad inference numbers are
one line before any work; a shorter run keeps the recipe's warm-up fraction."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from dinokit.cli import main
from tiny import error_line
from test_dense_cli import dense_root  # noqa: F401  (a fixture)
from test_dense_heads import one_thread  # noqa: E402,F401  (autouse: one intra-op thread for this module too)


def test_bad_inputs_are_one_line_errors(dense_root, tmp_path, capsys):
    val = f"SegSample:split=val:root={dense_root / 'seg'}"
    assert main(["dense", "train", "--task", "seg", "--head", "dpt", "--model", "dinov2_vits14", "--random-init",
                 "--train-dataset", val, "--val-dataset", val, "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: --head dpt is not a seg head; use one of linear, ms, linear4"
    assert main(["dense", "train", "--task", "depth", "--head", "linear", "--model", "dinov2_vits14", "--random-init",
                 "--train-dataset", val, "--val-dataset", val, "--output-dir", str(tmp_path)]) == 2
    assert "is a seg dataset but --task is depth" in capsys.readouterr().err
    for dataset in (val, f"SegFolder:root={tmp_path / 'nosuch'}"):  # dataset errors leave no dense_config.json behind
        assert main(["dense", "train", "--task", "depth", "--head", "linear", "--model", "dinov2_vits14", "--random-init",
                     "--train-dataset", dataset, "--val-dataset", val, "--output-dir", str(tmp_path / "ds")]) == 2
        assert capsys.readouterr().err.count("\n") == 1
        assert not (tmp_path / "ds").exists()
    assert main(["dense", "train", "--task", "seg", "--head", "linear", "--model", "dinov2_vits14", "--random-init",
                 "--train-dataset", val, "--val-dataset", val, "--output-dir", str(tmp_path), "iters=5"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown setting 'iters=5'; known: iterations,")
    for setting in ("iterations=0", "batch_size=-1"):  # nothing would be trained: refused before the folder is made
        assert main(["dense", "train", "--task", "seg", "--head", "linear", "--model", "dinov2_vits14", "--random-init",
                     "--train-dataset", val, "--val-dataset", val, "--output-dir", str(tmp_path / "zero"), setting]) == 2
        key, value = setting.split("=")
        assert capsys.readouterr().err == f"error: dense setting '{key}' is {value}; it must be at least 1\n"
        assert not (tmp_path / "zero").exists()
    torch.save({"state_dict": {"decode_head.conv_depth.weight": torch.zeros(256, 10, 1, 1)}}, tmp_path / "h.pth")
    assert main(["dense", "eval", "--head-weights", str(tmp_path / "h.pth"), "--val-dataset", val,
                 "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not record its backbone" in err and err.count("\n") == 1


def test_a_colour_mask_is_one_line_before_training(tmp_path, capsys):
    # Found from the PNG headers when the folder opens; it used to surface when a loader worker met the file,
    # iterations into the run (torch wraps such an error in the worker's traceback: test_preflight.py).
    (tmp_path / "images").mkdir(), (tmp_path / "masks").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (90, 20, 20)).save(tmp_path / "images" / f"im{i}.jpg")
        Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "masks" / f"im{i}.png")  # colours, not class indices
    data = f"SegFolder:root={tmp_path}"
    assert main(["dense", "train", "--task", "seg", "--head", "linear", "--model", "dinov2_vits14", "--random-init",
                 "--train-dataset", data, "--val-dataset", data, "--output-dir", str(tmp_path / "out"), "--no-progress",
                 "iterations=1", "batch_size=2", "crop_size=28", "base_size=28", "num_workers=1"]) == 2
    assert error_line(capsys) == (f"error: mask '{tmp_path / 'masks' / 'im0.png'}' is RGB; "
                                  "masks must be single-channel PNGs of class indices")
    assert not (tmp_path / "out").exists()  # nothing was started


def test_a_shorter_run_keeps_the_recipes_warm_up_fraction():
    """iterations=400 alone once left the 1500-iteration warm-up unfinished: the lr never reached its value."""
    from dinokit.dense.train import lr_schedule, recipe_with_overrides

    assert recipe_with_overrides("seg", "linear", []).warmup_iters == 1500  # the published 1500 of 40000
    short = recipe_with_overrides("seg", "linear", ["iterations=400"])
    assert short.warmup_iters == 15
    # the peak is the first iteration after the warm-up, on the cosine over all 400 iterations: (1 + cos(π 16/400))/2
    schedule = lr_schedule(short)
    assert int(schedule.argmax()) == 15
    assert float(schedule.max()) == pytest.approx(1e-3 * (1 + math.cos(math.pi * 16 / 400)) / 2)  # 0.99606e-3
    assert recipe_with_overrides("depth", "dpt", ["iterations=3840"]).warmup_iters == 1280  # 12800 of 38400
    assert recipe_with_overrides("seg", "linear", ["iterations=400", "warmup_iters=300"]).warmup_iters == 300


@pytest.mark.parametrize("task", ["seg", "depth"])
def test_every_recipe_setting_out_of_range_is_one_line(task):
    """Each of these once trained (or started to) on nonsense: a negative lr or weight decay, a 13-px crop range,
    an evaluation mode that failed only at the first validation, thousands of iterations in."""
    from dinokit.dense.train import recipe_with_overrides
    from dinokit.errors import DinokitError

    cases = {
        "lr=-1": "dense setting 'lr' is -1.0; it must be above 0",
        "weight_decay=-1": "dense setting 'weight_decay' is -1.0; it must be at least 0",
        "warmup_iters=-5": "dense setting 'warmup_iters' is -5; it must be at least 0",
        "num_workers=-2": "dense setting 'num_workers' is -2; it must be at least 0",
        f"seed={2**64}": f"dense setting 'seed' is {2**64}; a seed must be from 0 to 2^32 - 1",
        "eval_stride=0": "dense setting 'eval_stride' is 0; it must be at least 1",
        "crop_size=0": "dense setting 'crop_size' is (0, 0); it must be one or two positive sizes, e.g. 512 or 416x544",
        "betas=0.9,1.5": "dense setting 'betas' is (0.9, 1.5); it must be two values in [0, 1), e.g. 0.9,0.999",
        "dropout=1": "dense setting 'dropout' is 1.0; it must be in [0, 1)",
        "final_lr_ratio=2": "dense setting 'final_lr_ratio' is 2.0; it must be in [0, 1]",
        "scale_min=3": "scale_min=3.0 and scale_max=",
        "max_depth=0": "min_depth=0.001 and max_depth=0.0 are out of range; give 0 <= min_depth < max_depth",
        "eval_mode=foo": "eval_mode='foo' is not a mode; use whole or slide",
        "warmup_mode=step": "warmup_mode='step' is not a mode; use linear or cosine",
        "eval_stride=600": "dense setting 'eval_stride' is 600; it must be at most eval_crop (512)",
        "checkpoint_period=0": "dense setting 'checkpoint_period' is 0; it must be at least 1",
    }
    del cases["max_depth=0" if task == "seg" else "dropout=1"]  # the other task's setting: refused as such
    for setting, message in cases.items():
        extra = ["eval_mode=slide"] if setting == "eval_stride=600" else []
        with pytest.raises(DinokitError) as info:
            recipe_with_overrides(task, "linear", [*extra, setting])
        assert str(info.value).startswith(message), (setting, str(info.value))
    # the limits themselves are accepted
    recipe_with_overrides(task, "linear", ["warmup_iters=0", "final_lr_ratio=1", "eval_stride=512", "eval_crop=512",
                                           "eval_period=0", "base_size=0", "scale_min=1", "scale_max=1",
                                           "dropout=0" if task == "seg" else "min_depth=0"])


def test_bad_inference_numbers_are_one_line_errors_before_any_work(tmp_path, capsys):
    """--scales 0, --crop 0, --eval-size -3, --size -1: one line, before the head file is even read."""
    missing_head = str(tmp_path / "no-head.pth")  # never opened: the options are checked first
    common = ["--head-weights", missing_head, "--val-dataset", "SegSample:split=val", "--output-dir", str(tmp_path / "o")]
    cases = {
        ("--scales", "1", "0"): "error: --scales must be ratios from 0.1 to 4 (e.g. 1.0 1.32 1.73), got 0\n",
        ("--scales", "1e9"): "error: --scales must be ratios from 0.1 to 4 (e.g. 1.0 1.32 1.73), got 1e+09\n",
        ("--mode", "slide", "--crop", "0"): "error: --crop must be at least 1 pixel, got 0\n",
        ("--stride", "-2"): "error: --stride must be at least 1 pixel, got -2\n",
        ("--eval-size", "-3"): "error: --eval-size must be >= 0 (0 = keep the images' size), got -3\n",
    }
    for extra, message in cases.items():
        assert main(["dense", "eval", *common, *extra]) == 2
        assert capsys.readouterr().err == message
    assert main(["dense", "predict", str(tmp_path), "--head", missing_head, "--out", str(tmp_path / "p"), "--size", "-1"]) == 2
    assert capsys.readouterr().err == "error: --size must be >= 0 (0 = keep the images' size), got -1\n"
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_a_run_started_before_the_recipe_changed_is_not_resumed_on_the_new_one(demo_teacher, dense_root, tmp_path,
                                                                                capsys):
    """A head-training run begun before the one-cycle lr schedule (its saved settings lack recipe.warmup_mode) was
    refused for another warm-up length (derived from iterations since), or, given that, resumed on the new schedule
    without a word. It is one line that says so."""
    import json

    data = f"SegSample:split=%s:root={dense_root / 'seg'}"
    argv = ["dense", "train", "--task", "seg", "--head", "linear", "--config-file", str(demo_teacher.config_file),
            "--train-dataset", data % "train", "--val-dataset", data % "val", "--output-dir", str(tmp_path / "run"),
            "--no-progress", "iterations=2", "batch_size=2", "crop_size=28", "eval_period=0", "checkpoint_period=1"]
    assert main(argv) == 0
    saved = tmp_path / "run" / "dense_config.json"
    settings = json.loads(saved.read_text())
    del settings["recipe"]["warmup_mode"]  # as an older dinokit saved it
    saved.write_text(json.dumps(settings))
    capsys.readouterr()
    assert main(argv) == 2
    assert error_line(capsys) == (
        f"error: {tmp_path / 'run'} holds a run started by an older dinokit, before the learning-rate schedule of "
        "2026-12-06 (DINOv3's warm-up one-cycle); resumed by this one it would go on with another recipe: finish it "
        "with the dinokit version that started it, or give a new --output-dir to start again")
    assert json.loads(saved.read_text()) == settings  # nothing rewritten


def test_a_batch_norm_head_on_a_single_patch_is_one_line(demo_teacher, dense_root, tmp_path, capsys):
    """A batch of one crop of one patch gave the BatchNorm head one value per channel: a traceback at the first
    step (torch's 'Expected more than 1 value per channel when training')."""
    data = f"SegSample:split=%s:root={dense_root / 'seg'}"
    assert main(["dense", "train", "--task", "seg", "--head", "linear", "--config-file", str(demo_teacher.config_file),
                 "--train-dataset", data % "train", "--val-dataset", data % "val", "--output-dir", str(tmp_path / "r"),
                 "--no-progress", "iterations=2", "batch_size=1", "crop_size=8", "base_size=8", "eval_size=8",
                 "eval_crop=8", "eval_stride=8"]) == 2
    assert error_line(capsys) == ("error: batch_size=1 crops of 8x8 px are 1 patch(es) of 8 px: the head's BatchNorm "
                                  "needs at least 2; raise batch_size or crop_size")


def test_a_val_set_with_nothing_to_score_is_one_line_not_nan_results(demo_teacher, tmp_path, capsys):
    """Masks that are all 255 (ignored) gave mIoU NaN, written as bare NaN (not JSON) in the results, no word."""
    (tmp_path / "images").mkdir(), (tmp_path / "masks").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (90, 20 * i, 20)).save(tmp_path / "images" / f"im{i}.jpg")
        Image.new("L", (32, 32), 255).save(tmp_path / "masks" / f"im{i}.png")
    data = f"SegFolder:root={tmp_path}"
    assert main(["dense", "train", "--task", "seg", "--head", "linear", "--config-file", str(demo_teacher.config_file),
                 "--train-dataset", data, "--val-dataset", data, "--output-dir", str(tmp_path / "out"), "--no-progress",
                 "iterations=1", "batch_size=2", "crop_size=32", "base_size=32", "eval_size=32", "eval_crop=32",
                 "eval_stride=16", "eval_period=0"]) == 2
    assert error_line(capsys) == (f"error: no pixel of the 2 readable image(s) of {data!r} has a label (every mask "
                                  "pixel is 255, ignored): nothing to score; check the labels")
    # before the first step (it came at the first evaluation, eval_period steps in, with nothing to resume from)
    assert not (tmp_path / "out").exists() or not any(p.name in ("eval", "checkpoints", "training_metrics.json")
                                                      for p in (tmp_path / "out").iterdir())


@pytest.mark.parametrize("task", ["depth", "seg"])
def test_a_head_of_nan_weights_is_told_apart_from_a_set_with_nothing_to_score(demo_teacher, dense_root, tmp_path,
                                                                                capsys, task):
    """NaN predictions on valid labels were reported as 'no pixel ... has a depth within the head's range'; a
    segmentation head of NaN weights scored a plausible mIoU (the class map of NaN scores is a class map)."""
    import torch

    data = f"{task.capitalize()}Sample:split=%s:root={dense_root / task}"
    recipe = ["iterations=1", "batch_size=2", "crop_size=16", "eval_size=16", "eval_period=0"]
    assert main(["dense", "train", "--task", task, "--head", "linear", "--config-file",
                 str(demo_teacher.config_file), "--train-dataset", data % "train", "--val-dataset", data % "val",
                 "--output-dir", str(tmp_path / "out"), "--no-progress", *recipe]) == 0
    saved = torch.load(tmp_path / "out" / "head.pth", weights_only=True)
    saved["state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                           for k, v in saved["state_dict"].items()}
    torch.save(saved, tmp_path / "nan_head.pth")
    capsys.readouterr()
    assert main(["dense", "eval", "--head-weights", str(tmp_path / "nan_head.pth"), "--val-dataset", data % "val",
                 "--output-dir", str(tmp_path / "e"), "--no-progress"]) == 2
    assert error_line(capsys) == (f"error: the predictions on {data % 'val'!r} are not numbers (NaN): the head or the "
                                  "backbone holds NaN or infinite weights; check the weights, or train the head again")
    assert main(["dense", "predict", "--head-weights", str(tmp_path / "nan_head.pth"), "--out", str(tmp_path / "p"),
                 str(next((dense_root / task).rglob("*.jpg"), None) or next((dense_root / task).rglob("*.png")))]) == 2
    assert error_line(capsys) == ("error: the predictions are not numbers (NaN): the head or the backbone holds NaN "
                                  "or infinite weights; check the weights, or train the head again")
    assert not (tmp_path / "p").exists()
