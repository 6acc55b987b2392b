"""Pretraining beyond one stage: head warm-up, continued pretraining from backbone files, a high-resolution
stage from a finished run; the keys the stages share (missing files, what distillation refuses). Gram anchoring:
``test_gram.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dinokit.cli.train import pretrain as train
from dinokit.config import backbone_from_config, load_config
from dinokit.engine import build_schedulers
from dinokit.errors import DinokitError
from dinokit.models.checkpoint import resize_pos_embed, save_backbone
from dinokit.train.ssl_meta_arch import SSLMetaArch
from test_train import TINY, images, tiny_cfg  # noqa: F401  (images is a fixture)


def checkpoint_model(out: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted((out / "checkpoints").glob("checkpoint_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    return torch.load(ckpts[-1], map_location="cpu", weights_only=True)["model"]


def part(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]


def backbone_file(tmp_path: Path, img_size: int, **student) -> tuple[Path, dict[str, torch.Tensor]]:
    """A backbone in the official flat layout (as released), random weights, trained at ``img_size``."""
    cfg = load_config("demo", [*TINY, *(f"student.{k}={v}" for k, v in student.items())])
    torch.manual_seed(123)
    model = backbone_from_config(cfg.student, img_size=img_size)
    with torch.no_grad():  # visible values everywhere (LayerScale and biases start at constants)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_backbone(model, tmp_path / "released.pth")
    return path, {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- head warm-up
def test_backbone_lr_schedule_freezes_then_rewarms():
    cfg = load_config("demo", ["train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=6", "optim.warmup_epochs=1",
                               "train.freeze_backbone_epochs=2", "optim.backbone_lr_mult=0.5"])
    cfg.optim.lr = 1e-3
    s = build_schedulers(cfg)
    lr, backbone = s["lr"].schedule, s["backbone_lr"].schedule
    assert (backbone[:20] == 0).all() and backbone[20] > 0
    # re-warmed linearly over optim.warmup_epochs (10 iterations) after the freeze, at half the heads' lr
    np.testing.assert_allclose(backbone[20:30], lr[20:30] * 0.5 * np.arange(1, 11) / 10)
    np.testing.assert_allclose(backbone[30:], lr[30:] * 0.5)
    assert "backbone_lr" not in build_schedulers(load_config("demo"))  # default runs: one lr for everything


def test_head_warmup_freezes_exactly_the_backbone_then_unfreezes(images, tmp_path):
    path, released = backbone_file(tmp_path, img_size=32)
    cfg = lambda: tiny_cfg(images, f"student.pretrained_weights={path}", "train.freeze_backbone_epochs=1",  # noqa: E731
                           "optim.backbone_lr_mult=0.5", "student.drop_path_rate=0.0")
    out = tmp_path / "run"
    train(cfg(), output_dir=out, stop_after=3)  # the 3 iterations of the frozen epoch
    state = checkpoint_model(out)
    for role in ("student", "teacher"):
        backbone = part(state, f"{role}.backbone.")
        assert backbone.keys() == released.keys()
        assert all(torch.equal(backbone[k], released[k]) for k in released), role  # bit for bit
    # the heads learnt: the student's moved away from the teacher's (both started equal; the teacher is an EMA)
    assert not torch.equal(state["student.dino_head.mlp.0.weight"], state["teacher.dino_head.mlp.0.weight"])

    train(cfg(), output_dir=out)  # resumes; the backbone joins
    straight = tmp_path / "straight"
    train(cfg(), output_dir=straight)
    final, reference = checkpoint_model(out), checkpoint_model(straight)
    assert all(torch.equal(final[k], reference[k]) for k in reference)  # the resume across the freeze is exact
    after = part(final, "student.backbone.")
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], released["blocks.0.attn.qkv.weight"])
    lines = metrics(out)
    assert [l["backbone_lr"] == 0 for l in lines] == [True] * 3 + [False] * 3
    assert all(l["backbone_lr"] == pytest.approx(0.5 * l["lr"] * min(1, (l["iteration"] - 2) / 3)) for l in lines[3:])


# ---------------------------------------------------------------------------------------------- continued pretraining
@pytest.mark.parametrize("student", [{}, {"num_register_tokens": 4, "interpolate_antialias": True,
                                          "interpolate_offset": 0.0}, {"ffn_layer": "swiglufused"}],
                         ids=["plain", "registers", "swiglu"])
def test_continued_pretraining_from_an_official_file_with_a_size_change(images, tmp_path, student):
    path, released = backbone_file(tmp_path, img_size=24, **student)  # 3x3 grid in the file; training at 32 px: 4x4
    overrides = [f"student.{k}={v}" for k, v in student.items()]
    model = SSLMetaArch(tiny_cfg(images, *overrides, f"student.pretrained_weights={path}"))
    expected = resize_pos_embed(released, 16)
    for module in (model.student.backbone, model.teacher.backbone):
        got = module.state_dict()
        assert got["pos_embed"].shape == (1, 17, released["pos_embed"].shape[-1])
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    out = tmp_path / "run"
    summary = train(tiny_cfg(images, *overrides, f"student.pretrained_weights={path}"), output_dir=out, stop_after=2)
    assert summary["iteration"] == 2 and np.isfinite(metrics(out)[-1]["total_loss"])


def test_a_released_file_of_another_architecture_is_one_line(images, tmp_path, capsys):
    from dinokit.cli import main

    path, _ = backbone_file(tmp_path, img_size=32, num_register_tokens=4)
    with pytest.raises(DinokitError, match="register") as err:
        SSLMetaArch(tiny_cfg(images, f"student.pretrained_weights={path}"))
    assert "\n" not in str(err.value)
    # from the command: refused before config.yaml is written (the folder holds no run to resume by mistake)
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--device", "cpu", *TINY,
                 f"train.dataset_path=ImageFolder:root={images / 'train'}", f"student.pretrained_weights={path}"]) == 2
    assert "register" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (out / "config.yaml").exists()


# ---------------------------------------------------------------------------------------------- high-resolution stage
def test_high_resolution_stage_starts_from_a_finished_run(images, tmp_path, capsys):
    low = tmp_path / "low"
    train(tiny_cfg(images), output_dir=low)
    snapshot = torch.load(low / "eval" / "training_5" / "teacher_checkpoint.pth", weights_only=True)["teacher"]

    high_cfg = lambda: tiny_cfg(images, f"student.resume_from_teacher_chkpt={low}", "crops.global_crops_size=48",  # noqa: E731
                                "crops.local_crops_size=24", "optim.base_lr=0.001")
    model = SSLMetaArch(high_cfg())
    grid = (48 // 8) ** 2
    for role in (model.student, model.teacher):
        got = role.state_dict()
        assert got["backbone.pos_embed"].shape[1] == grid + 1  # 16 + 1 -> 36 + 1 positions, interpolated
        resized = resize_pos_embed({"pos_embed": snapshot["backbone.pos_embed"]}, grid)["pos_embed"]
        assert torch.equal(got["backbone.pos_embed"], resized)
        for key, value in snapshot.items():  # every other tensor, heads included, is the finished run's teacher
            if key != "backbone.pos_embed":
                assert torch.equal(got[key], value), key

    high = tmp_path / "high"
    capsys.readouterr()
    summary = train(high_cfg(), output_dir=high)
    start = low / "eval" / "training_5" / "teacher_checkpoint.pth"  # said, not "starting from scratch"
    assert (f"starting from the teacher {start} (backbone and heads): no checkpoint in {high / 'checkpoints'}"
            in capsys.readouterr().out.splitlines())
    lines = metrics(high)
    assert summary["iteration"] == 6 and lines[0]["iteration"] == 0  # a new run: iterations restart at 0
    assert lines[0]["lr"] == 0 and lines[0]["last_layer_lr"] == 0  # schedules restart: warm-up, frozen last layer
    low_lr = max(l["lr"] for l in metrics(low))
    assert max(l["lr"] for l in lines) == pytest.approx(low_lr * 0.001 / 0.02)  # the stage's lower base_lr


def test_resume_from_teacher_checks_heads_and_conflicts(images, tmp_path):
    path, _ = backbone_file(tmp_path, img_size=32)
    with pytest.raises(DinokitError, match="holds no dino_head; .*student.pretrained_weights"):
        SSLMetaArch(tiny_cfg(images, f"student.resume_from_teacher_chkpt={path}"))
    with pytest.raises(DinokitError, match="no eval/training_"):
        SSLMetaArch(tiny_cfg(images, f"student.resume_from_teacher_chkpt={tmp_path}"))
    with pytest.raises(DinokitError, match="not both"):
        tiny_cfg(images, f"student.resume_from_teacher_chkpt={path}", f"student.pretrained_weights={path}")


@pytest.mark.parametrize("separate", [True, False])
def test_resume_from_teacher_names_a_different_ibot_head_layout(images, tmp_path, separate):
    """A stage from a run whose iBOT had (or lacked) its own head: the one key to set, not 'not a teacher'."""
    earlier = SSLMetaArch(tiny_cfg(images, f"ibot.separate_head={separate}", "ibot.loss_weight=1.0"))
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": earlier.teacher.state_dict()}, path)
    other = str(not separate).lower()
    with pytest.raises(DinokitError, match=f"has {'a' if separate else 'no'} separate ibot_head \\(its run set "
                                           f"ibot.separate_head={str(separate).lower()}\\); set "
                                           f"ibot.separate_head={str(separate).lower()} to go on from it"):
        SSLMetaArch(tiny_cfg(images, f"student.resume_from_teacher_chkpt={path}", f"ibot.separate_head={other}",
                             "ibot.loss_weight=1.0"))
    # a stage without iBOT takes the DINO head of either layout
    stage = SSLMetaArch(tiny_cfg(images, f"student.resume_from_teacher_chkpt={path}", "ibot.loss_weight=0"))
    assert torch.equal(stage.student.dino_head.mlp[0].weight, earlier.teacher.dino_head.mlp[0].weight)


def test_highres_presets_load():
    for name in ("vitl14_highres", "vitg14_highres"):
        cfg = load_config(name, ["student.resume_from_teacher_chkpt=/some/run"])
        assert cfg.crops.global_crops_size == 518 and cfg.student.patch_size == 14
    cfg = load_config("continued", ["student.pretrained_weights=/some/file.pth"])
    assert cfg.train.freeze_backbone_epochs > 0 and cfg.optim.backbone_lr_mult < 1


def test_head_warmup_and_gram_under_two_process_fsdp(images, tmp_path):
    """The frozen backbone runs forward only (FSDP2 must reshard it), the Gram teacher is a sharded copy."""
    import os
    import subprocess
    import sys

    path, _ = backbone_file(tmp_path, img_size=24)
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node=2", "--master_port=29537", "-m", "dinokit", "train", "--config-file", "demo",
           "--output-dir", str(out), "--device", "cpu", *TINY, f"train.dataset_path=ImageFolder:root={images / 'train'}",
           "train.batch_size_per_gpu=2", "train.freeze_backbone_epochs=1", f"student.pretrained_weights={path}",
           "gram.use_loss=true", "gram.it_load_ema_teacher=1", "gram.update_frequency=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = metrics(out)
    assert [l["iteration"] for l in lines] == list(range(6))
    assert [l["backbone_lr"] == 0 for l in lines] == [True] * 3 + [False] * 3
    assert lines[0]["gram_loss"] == 0 and all(np.isfinite(l["total_loss"]) and l["gram_loss"] > 0 for l in lines[1:])


@pytest.mark.parametrize("key", ["student.pretrained_weights", "student.resume_from_teacher_chkpt", "gram.ckpt"])
def test_missing_start_weights_stop_before_the_run_folder(images, tmp_path, capsys, key):
    """A stage's starting file that is not there (or a folder without a snapshot): one line naming the key, and no
    run folder or config.yaml left behind (URLs are checked when fetched)."""
    from dinokit.cli import main

    gram = ["gram.use_loss=true", "gram.img_level=true"] if key == "gram.ckpt" else []
    for missing, said in ((tmp_path / "no" / "such.pth", "which does not exist"),
                          (tmp_path, "has no eval/training_*/teacher_checkpoint.pth")):
        out = tmp_path / "run"
        args = ["train", "--output-dir", str(out), "--device", "cpu", *TINY,
                f"train.dataset_path=ImageFolder:root={images / 'train'}", *gram, f"{key}={missing}"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: config key '{key}'") and said in err and "\n" not in err
        assert not out.exists()


def test_head_warm_up_without_a_backbone_stops_before_the_run_folder(images, tmp_path, capsys):
    """The continued preset without its weights file trained from scratch, its first epochs with a frozen random
    backbone; now one line, and no run folder."""
    from dinokit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--device", "cpu", *TINY, "train.freeze_backbone_epochs=1",
                 f"train.dataset_path=ImageFolder:root={images / 'train'}"]) == 2
    assert capsys.readouterr().err == (
        "error: train.freeze_backbone_epochs=1 is a head warm-up for a loaded backbone, but student.pretrained_weights "
        "is empty: give the backbone to continue (e.g. student.pretrained_weights=dinov2_vits14_pretrain.pth), or "
        "train.freeze_backbone_epochs=0 to train from scratch\n")
    assert not out.exists()


@pytest.mark.parametrize("key", ["gram.use_loss=true", "train.freeze_backbone_epochs=1",
                                 "student.resume_from_teacher_chkpt=/a/run"])
def test_distill_refuses_stage_keys(images, tmp_path, key):
    from dinokit.distill.run import distill

    cfg = tiny_cfg(images, key, *(["gram.ema_teacher=true"] if key.startswith("gram") else []))
    with pytest.raises(DinokitError, match=f"{key.split('=')[0]} is a pretraining-stage key that dinokit distill"):
        distill(cfg, output_dir=tmp_path / "d")
