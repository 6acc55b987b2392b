"""Paths saved in run records are absolute: a relative path in config.yaml, dense_config.json or head.pth was
resolved against the working directory of a later command, so from another folder a head was applied to another
backbone (or a distillation resumed with another teacher) without a word."""

from __future__ import annotations

import json
import os

import torch
import yaml

from dinokit.cli import main
from dinokit.config.paths import absolute_settings

from tiny import PICO_CONFIG, error_line, tiny_run, write_images


def test_absolute_settings_rewrites_existing_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "data")
    (tmp_path / "w.pth").write_bytes(b"x")
    tree = {"train": {"dataset_path": "ImageFolder:root=data:extra=gone"}, "MODEL": {"WEIGHTS": "w.pth"},
            "student": {"pretrained_weights": "missing.pth"}, "distillation": {
                "teacher": "https://example.org/t.pth", "students": [{"name": "s", "pretrained_weights": "w.pth"}]},
            "train_dataset": "SegSample:split=train:root=data", "val_dataset": "data",
            "backbone": {"config_file": "w.pth", "model": "dinov2_vits14"}}
    fixed = absolute_settings(tree)
    assert fixed["train"]["dataset_path"] == f"ImageFolder:root={tmp_path / 'data'}:extra=gone"
    assert fixed["MODEL"]["WEIGHTS"] == fixed["backbone"]["config_file"] == str(tmp_path / "w.pth")
    assert fixed["distillation"]["students"][0]["pretrained_weights"] == str(tmp_path / "w.pth")
    assert fixed["train_dataset"] == f"SegSample:split=train:root={tmp_path / 'data'}"
    assert fixed["val_dataset"] == str(tmp_path / "data")
    # what does not exist (reported where it is used), URLs and hub names are left as given; the input is not changed
    assert fixed["student"]["pretrained_weights"] == "missing.pth"
    assert fixed["distillation"]["teacher"] == "https://example.org/t.pth"
    assert fixed["backbone"]["model"] == "dinov2_vits14" and tree["MODEL"]["WEIGHTS"] == "w.pth"
    assert absolute_settings({"train": {"dataset_path": "WebDataset:urls=data/s-{0..3}.tar"}})["train"] == {
        "dataset_path": f"WebDataset:urls={tmp_path / 'data'}/s-{{0..3}}.tar"}
    # each part of a '::' list too (the list was kept relative: another folder's shards resumed the run silently)
    assert absolute_settings({"train": {"dataset_path": "WebDataset:urls=data/a.tar::https://h/b.tar::data/c.tar"}})[
        "train"]["dataset_path"] == f"WebDataset:urls={tmp_path / 'data'}/a.tar::https://h/b.tar::{tmp_path / 'data'}/c.tar"


def test_a_run_records_absolute_paths_and_old_relative_records_still_resume(tmp_path, monkeypatch, capsys):
    first, other = tmp_path / "first", tmp_path / "other"
    for folder, size in ((first, (32, 32)), (other, (40, 40))):
        write_images(folder / "data" / "c", names=("a.png", "b.png"), size=size)
    out = tmp_path / "run"
    argv = ["train", "--output-dir", str(out), "--device", "cpu", "--no-progress",
            *tiny_run(epochs=1, epoch_length=1, warmup=0), "train.dataset_path=ImageFolder:root=data"]
    monkeypatch.chdir(first)
    assert main(argv) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["dataset_path"] == f"ImageFolder:root={first / 'data'}"
    # from another folder the relative argument names other images: refused, not resumed on them
    monkeypatch.chdir(other)
    capsys.readouterr()
    assert main(argv) == 2
    # the saved path in full (it was cut to 37 characters), so that it can be given back
    assert (f"holds a run with another configuration: train.dataset_path (saved ImageFolder:root={first / 'data'}, "
            f"now ImageFolder:root={other / 'data'})") in error_line(capsys)
    # the absolute path of the run's own images resumes it from anywhere
    assert main([*argv[:-1], f"train.dataset_path=ImageFolder:root={first / 'data'}"]) == 0
    assert "training already complete" in capsys.readouterr().out
    # a run saved before paths were made absolute still resumes from the folder it was started in
    saved["train"]["dataset_path"] = "ImageFolder:root=data"
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.chdir(first)
    assert main(argv) == 0
    assert "another configuration" not in capsys.readouterr().out


def test_a_dense_head_keeps_its_backbone_from_any_folder(tmp_path, monkeypatch, capsys):
    from dinokit.dense.generated import write_dense_sample

    first, other = tmp_path / "first", tmp_path / "other"
    for folder, arch in ((first, "vit_pico"), (other, "vit_femto")):
        folder.mkdir()
        (folder / "backbone.yaml").write_text(PICO_CONFIG.replace("vit_pico", arch))
    write_dense_sample("seg", first / "seg", counts={"train": 2, "val": 2})
    monkeypatch.chdir(first)
    torch.manual_seed(0)
    assert main(["dense", "train", "--task", "seg", "--head", "linear", "--config-file", "backbone.yaml",
                 "--train-dataset", "SegSample:split=train:root=seg", "--val-dataset", "SegSample:split=val:root=seg",
                 "--output-dir", "run", "--no-progress", "iterations=2", "batch_size=2", "crop_size=28",
                 "augment=false", "eval_size=0", "eval_mode=whole", "num_workers=0", "warmup_iters=1"]) == 0
    head = first / "run" / "head.pth"
    record = json.loads((first / "run" / "dense_config.json").read_text())
    assert record["backbone"]["config_file"] == str(first / "backbone.yaml")
    assert record["train_dataset"] == f"SegSample:split=train:root={first / 'seg'}"
    trained = json.loads((first / "run" / "results_eval_segmentation.json").read_text())
    # from a folder whose backbone.yaml is another architecture, the head still finds its own backbone
    monkeypatch.chdir(other)
    capsys.readouterr()
    assert main(["dense", "eval", "--head", str(head), "--val-dataset", f"SegSample:split=val:root={first / 'seg'}",
                 "--output-dir", "eval", "--no-progress", "--mode", "whole", "--eval-size", "0"]) == 0
    again = json.loads((other / "eval" / "results_eval_segmentation.json").read_text())
    assert again["mIoU"] == trained["mIoU"] and os.path.isabs(again["dataset"].rpartition("root=")[2])
