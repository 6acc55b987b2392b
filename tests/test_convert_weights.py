"""Converted files as weights and configs: what dinokit convert writes loads back, and says its dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinokit.cli import main
from dinokit.convert import save_hf_folder
from dinokit.models import create_model, save_backbone

from test_convert import assert_bitwise_equal, random_backbone, tiny_spec, transformers


def test_converted_files_load_back_as_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A converted model.safetensors said 'holds no ViT backbone tensors' and a timm file '1 missing key(s):
    mask_token' when given back as weights to eval, embed or viz."""
    from dinokit.models.checkpoint import load_backbone_weights

    model = create_model("dinov2_vits14")  # random init
    official = save_backbone(model, tmp_path / "s.pth")
    for to, written in (("hf", tmp_path / "hf" / "model.safetensors"), ("timm", tmp_path / "timm.pth")):
        assert main(["convert", str(official), str(written.parent if to == "hf" else written), "--to", to]) == 0
        loaded = load_backbone_weights(create_model("dinov2_vits14", pretrained=False), written)
        assert_bitwise_equal(loaded.state_dict(), model.state_dict())


def test_hf_config_says_the_dtype_the_weights_are_stored_in(tmp_path: Path) -> None:
    """fp16 or bf16 weights were written with "torch_dtype": "float32": torch_dtype="auto" loaded them as float32."""
    spec = tiny_spec("plain")
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in random_backbone(spec).state_dict().items()}
    folder = save_hf_folder(half, tmp_path / "hf", spec=spec)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = transformers.AutoModel.from_pretrained(folder, torch_dtype="auto")
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_converted_files_start_a_stage_and_teach_a_distillation(tmp_path: Path) -> None:
    """student.pretrained_weights and a distillation's teacher read only the official layout: a timm file was a
    traceback (resizing its position embedding), a Hugging Face file 'holds no ViT backbone tensors'."""
    from dinokit.distill.teacher import TeacherSource, build_teacher
    from dinokit.errors import DinokitError
    from dinokit.models.checkpoint import resize_pos_embed
    from dinokit.train.weights import load_pretrained_backbone

    model = create_model("dinov2_vits14")  # random init, trained at 518 px
    official = save_backbone(model, tmp_path / "s.pth")
    expected = resize_pos_embed(model.state_dict(), 16 * 16)
    for to, written in (("hf", tmp_path / "hf" / "model.safetensors"), ("timm", tmp_path / "timm.safetensors")):
        assert main(["convert", str(official), str(written.parent if to == "hf" else written), "--to", to]) == 0
        stage = create_model("dinov2_vits14", pretrained=False, img_size=224)
        load_pretrained_backbone(stage, str(written))  # the position embedding resized to the stage's 16x16 grid
        assert_bitwise_equal(stage.state_dict(), expected)
        teacher, _ = build_teacher(TeacherSource(weights=written, config=None), with_heads=False)
        assert_bitwise_equal(teacher.backbone.state_dict(), model.state_dict())
    with pytest.raises(DinokitError, match=r"the position embedding has shape \(1, 30, 384\), not \(1, 1 \+ a square"):
        resize_pos_embed({"pos_embed": torch.zeros(1, 30, 384)}, 16 * 16)


def test_wrapped_or_prefixed_files_of_every_layout_load_as_weights(tmp_path: Path) -> None:
    """A Hugging Face state dict saved from a DDP-wrapped or compiled model (``module.``/``_orig_mod.`` keys) or inside
    ``{"state_dict": ...}`` said 'holds no ViT backbone tensors'; the official layout already read them."""
    from dinokit.convert import official_to_hf
    from dinokit.models.checkpoint import backbone_state_dict_of_any_layout

    from test_convert import to_mmpretrain_layout

    sd = random_backbone(tiny_spec("plain")).state_dict()
    hf = official_to_hf(sd)
    mm = to_mmpretrain_layout(sd)["state_dict"]
    for layout, flat, inner in (("hf", hf, "dinov2."), ("mmpretrain", mm, "")):
        for wrapped in ({f"module.{k}": v for k, v in flat.items()}, {f"_orig_mod.{k}": v for k, v in flat.items()},
                        {"state_dict": dict(flat)}, {"model": {f"module.{inner}{k}": v for k, v in flat.items()}}):
            got = backbone_state_dict_of_any_layout(wrapped)
            assert set(got) == set(sd), layout
            assert all(torch.equal(got[k], sd[k]) for k in got if k != "mask_token"), layout  # mmpretrain has none
