"""Outputs that took long to make are never replaced unasked: ``embed``, ``convert`` and ``export onnx`` refuse an
existing output with one line (before any work) unless ``--overwrite`` is given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dinokit.cli import main
from dinokit.convert import BackboneSpec
from dinokit.models import save_backbone
from tiny import PICO_CONFIG, write_images


def test_embed_keeps_an_existing_output_unless_told(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(PICO_CONFIG)
    images, out = write_images(tmp_path / "images", ("a.png", "b.png"), (40, 50)), tmp_path / "e.npz"
    embed = ["embed", str(images), "--config-file", str(config), "--random-init", "--image-size", "28",
             "--num-workers", "0", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(embed) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main([*embed, "--patch-mean"]) == 2
    assert capsys.readouterr().err == (f"error: --out {str(out)!r} already exists; pass --overwrite to replace it, "
                                       "or give another name\n")
    assert out.read_bytes() == before
    assert main([*embed, "--patch-mean", "--overwrite"]) == 0
    assert set(np.load(out)) >= {"cls", "patch_mean"}


def test_convert_keeps_an_existing_file_or_hf_folder_unless_told(tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers")
    spec = BackboneSpec(embed_dim=64, depth=2, num_heads=4, patch_size=14, img_size=56)
    torch.manual_seed(0)
    src = save_backbone(spec.build(), tmp_path / "a.pth")
    dst, folder = tmp_path / "b.safetensors", tmp_path / "hf"
    dst.write_bytes(b"a result worth keeping")
    assert main(["convert", str(src), str(dst), "--to", "safetensors"]) == 2
    assert capsys.readouterr().err == (f"error: the output {str(dst)!r} already exists; pass --overwrite to "
                                       "replace it, or give another name\n")
    assert dst.read_bytes() == b"a result worth keeping"
    assert main(["convert", str(src), str(dst), "--to", "safetensors", "--overwrite"]) == 0
    assert dst.read_bytes() != b"a result worth keeping"
    folder.mkdir()  # an empty or unrelated folder is fine; one holding a model is kept
    assert main(["convert", str(src), str(folder), "--to", "hf"]) == 0
    weights = (folder / "model.safetensors").read_bytes()
    assert main(["convert", str(src), "--out", str(folder), "--to", "hf"]) == 2
    assert "already holds config.json; pass --overwrite" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == weights
    assert main(["convert", str(src), str(folder), "--to", "hf", "--overwrite"]) == 0


def test_export_onnx_keeps_an_existing_file_before_building_the_model(tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an exported graph")
    export = ["export", "onnx", "--model", "dinov2_vits14", "--weights", str(tmp_path / "missing.pth"),
              "--image-size", "28", "28", "--out", str(out)]
    assert main(export) == 2  # the missing weights are never opened: the output is checked first
    assert capsys.readouterr().err == (f"error: --out {str(out)!r} already exists; pass --overwrite to replace it, "
                                       "or give another name\n")
    assert out.read_bytes() == b"an exported graph"
    assert main([*export, "--overwrite"]) == 2
    assert "missing.pth" in capsys.readouterr().err  # past the output check, stopped by the weights
