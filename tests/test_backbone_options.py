"""The backbone options mean the same in every command: --config-file and --model each define the architecture (one
of them), --random-init and weights contradict each other; embed, eval and curate refused those, while viz, export
and dense took the config's architecture and dropped --model, or loaded the weights despite --random-init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from dinokit.cli import main
from dinokit.models import create_model, save_backbone
from test_dense_cli import _official_seg_head


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("options")
    Image.new("RGB", (28, 28), (120, 40, 40)).save(root / "a.png")
    save_backbone(create_model("dinov2_vits14", pretrained=False, depth=1), root / "w.safetensors")
    _official_seg_head(root / "head.pth")
    return root


def _commands(root: Path) -> dict[str, list[str]]:
    return {
        "embed": ["embed", str(root / "a.png"), "--out", str(root / "o.npz")],
        "viz": ["viz", "pca", str(root / "a.png"), "--out", str(root / "viz")],
        "export": ["export", "onnx", "--image-size", "28", "28", "--out", str(root / "m.onnx")],
        "dense": ["dense", "eval", "--head-weights", str(root / "head.pth"), "--val-dataset", "SegSample:split=val",
                  "--output-dir", str(root / "dense")],
    }


@pytest.mark.parametrize("command", ["embed", "viz", "export", "dense"])
def test_config_file_with_model_and_random_init_with_weights_are_refused(inputs, capsys, command) -> None:
    torch.manual_seed(0)
    argv = _commands(inputs)[command]
    weights = "--pretrained-weights" if command == "dense" else "--weights"
    config = ["--config-file", "eval/vits14_pretrain", "--model", "dinov2_vitb14", "--random-init"]
    assert main([*argv, *config]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: give either --config-file or --model, not both: each defines the architecture")
    assert main([*argv, "--model", "dinov2_vits14", "--random-init", weights, str(inputs / "w.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --random-init and") and err.endswith("contradict each other; give one"), err
    assert not any((inputs / name).exists() for name in ("o.npz", "viz", "m.onnx", "dense"))


def test_dense_train_refuses_them_before_writing_its_folder(inputs, capsys) -> None:
    """dense train wrote dense_config.json before building the backbone, and left it with the refusal."""
    out = inputs / "dense_train"
    assert main(["dense", "train", "--task", "seg", "--head", "linear", "--model", "dinov2_vits14", "--random-init",
                 "--pretrained-weights", str(inputs / "w.safetensors"), "--train-dataset", "SegSample:split=train",
                 "--val-dataset", "SegSample:split=val", "--output-dir", str(out)]) == 2
    assert "contradict each other; give one" in capsys.readouterr().err
    assert not out.exists()
