"""Pretraining beyond one stage: head warm-up, continued pretraining from backbone files, a high-resolution
stage from a finished run, and Gram anchoring (loss values and teacher refresh schedule)."""

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
from dinokit.losses import GramLoss
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
def test_high_resolution_stage_starts_from_a_finished_run(images, tmp_path):
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
    summary = train(high_cfg(), output_dir=high)
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


def test_highres_presets_load():
    for name in ("vitl14_highres", "vitg14_highres"):
        cfg = load_config(name, ["student.resume_from_teacher_chkpt=/some/run"])
        assert cfg.crops.global_crops_size == 518 and cfg.student.patch_size == 14
    cfg = load_config("continued", ["student.pretrained_weights=/some/file.pth"])
    assert cfg.train.freeze_backbone_epochs > 0 and cfg.optim.backbone_lr_mult < 1


# ---------------------------------------------------------------------------------------------- Gram anchoring
def test_gram_loss_by_hand():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [1.0, 1.0]]])  # (B=2, P=2, D=2)
    t = torch.tensor([[[1.0, 1.0], [1.0, -1.0]], [[0.0, 1.0], [0.0, 2.0]]])
    # normalised rows: s -> [1,0],[0,1] | [.6,.8],[.7071,.7071]; t -> [.7071,.7071],[.7071,-.7071] | [0,1],[0,1]
    # image level: Gram_s = [[1,0],[0,1]] and [[1,.98995],[.98995,1]]; Gram_t = [[1,0],[0,1]] and [[1,1],[1,1]]
    r = 0.6 * 0.70710678 + 0.8 * 0.70710678
    expected = 2 * (r - 1) ** 2 / 8  # two off-diagonal entries differ, mean over 2 x 2 x 2 entries
    assert GramLoss(img_level=True)(s, t).item() == pytest.approx(expected, rel=1e-5)
    # batch level: one 4x4 Gram over all patches, compared with numpy
    def gram(x):
        x = x.reshape(-1, 2).numpy()
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return x @ x.T
    assert GramLoss()(s, t).item() == pytest.approx(((gram(s) - gram(t)) ** 2).mean(), rel=1e-5)
    # unnormalised, image level: raw dot products
    raw = ((s @ s.transpose(1, 2) - t @ t.transpose(1, 2)) ** 2).mean()
    assert GramLoss(normalized=False, img_level=True)(s, t).item() == pytest.approx(raw.item())
    # remove_neg clamps both Gram matrices; remove_only_teacher_neg zeroes the student where both are negative
    gs, gt = gram(s), gram(t)
    clamped = ((np.clip(gs, 0, None) - np.clip(gt, 0, None)) ** 2).mean()
    assert GramLoss(remove_neg=True)(s, t).item() == pytest.approx(clamped, rel=1e-5)
    only = ((np.where((gs < 0) & (gt < 0), 0, gs) - np.clip(gt, 0, None)) ** 2).mean()
    assert GramLoss(remove_only_teacher_neg=True)(s, t).item() == pytest.approx(only, rel=1e-5)
    # gradients reach the student only
    s.requires_grad_(True)
    GramLoss()(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_gram_tokens_pick_the_masked_or_unmasked_rows_by_index():
    """gram.tokens_used=masked/unmasked: the rows a boolean mask would select, in the same order, picked by index."""
    from types import SimpleNamespace

    from dinokit.train.objective import SSLObjective

    student, teacher = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    masks = torch.tensor([[True, False, True, False, False], [False, False, False, True, False]])
    masked_index = masks.flatten().nonzero().flatten()  # as the collate gives it
    for mode, keep in (("masked", masks.flatten()), ("unmasked", ~masks.flatten()), ("all", None)):
        s, t = SSLObjective._gram_tokens(SimpleNamespace(gram_tokens=mode), student, teacher, masks, masked_index)
        if keep is None:
            assert s is student and t is teacher
        else:
            assert torch.equal(s, student.flatten(0, 1)[keep]) and torch.equal(t, teacher.flatten(0, 1)[keep])


def gram_cfg(images, *extra):
    return tiny_cfg(images, "gram.use_loss=true", "gram.img_level=true", *extra)


def test_gram_teacher_refresh_schedule(images):
    model = SSLMetaArch(gram_cfg(images, "gram.it_load_ema_teacher=0", "gram.update_frequency=3",
                                 "gram.it_first_update=4", "gram.max_updates=2"))
    # refreshed after the iterations whose count (it + 1) is a multiple of 3, from 4 on, twice at most
    assert [it for it in range(20) if model.gram_refreshes(it)] == [5, 8]
    unlimited = SSLMetaArch(gram_cfg(images, "gram.it_load_ema_teacher=0", "gram.update_frequency=3"))
    assert [it for it in range(10) if unlimited.gram_refreshes(it)] == [2, 5, 8]
    fixed = SSLMetaArch(gram_cfg(images, "gram.it_load_ema_teacher=0", "gram.rep_update=false"))
    assert not any(fixed.gram_refreshes(it) for it in range(10))
    ema = SSLMetaArch(gram_cfg(images, "gram.ema_teacher=true"))
    assert ema.gram_teacher is None and "gram_teacher" not in ema.inference_modules()


def test_gram_training_loads_refreshes_and_resumes(images, tmp_path):
    """Loaded from the EMA teacher at iteration 1, refreshed after iteration 3 (count 4), then fixed."""
    cfg = lambda: gram_cfg(images, "gram.it_load_ema_teacher=1", "gram.update_frequency=4",  # noqa: E731
                           "gram.loss_weight_schedule.start=1", "gram.loss_weight_schedule.peak=3",
                           "gram.loss_weight_schedule.end=2", "gram.loss_weight_schedule.warmup_epochs=1",
                           "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=3", "train.saveckp_freq=1")
    out = tmp_path / "run"
    train(cfg(), output_dir=out, stop_after=4)
    state = checkpoint_model(out)  # after iteration 3: the Gram teacher was just refreshed
    gram, teacher = part(state, "gram_teacher."), part(state, "teacher.backbone.")
    assert gram.keys() == teacher.keys() and all(torch.equal(gram[k], teacher[k]) for k in gram)
    train(cfg(), output_dir=out)  # resumed: the copy survives, and moves no more
    state = checkpoint_model(out)
    assert torch.equal(part(state, "gram_teacher.")["blocks.0.attn.qkv.weight"], gram["blocks.0.attn.qkv.weight"])
    lines = metrics(out)
    assert lines[0]["gram_loss"] == 0  # not loaded yet at iteration 0
    assert all(l["gram_loss"] > 0 for l in lines[1:])
    # the weight schedule, logged: 1 -> 3 linearly over one epoch (3 excluded), a half-cosine 3 -> 2 over the rest
    cosine = [2 + 0.5 * (1 + np.cos(np.pi * i / 4)) for i in range(4)]  # 3, 2.854, 2.5, 2.146
    np.testing.assert_allclose([l["gram_weight"] for l in lines], [1, 2, *cosine], rtol=1e-6)


def test_warmup_cosine_schedule_by_hand():
    """DINOv3's v2 schedule: linear start -> peak (peak excluded), half-cosine peak -> end, then end."""
    from dinokit.engine.optim import warmup_cosine_schedule

    sched = warmup_cosine_schedule(1.0, 3.0, 0.5, warmup_iters=2, total_iters=8, cosine_iters=4)
    cosine = [0.5 + 1.25 * (1 + np.cos(np.pi * i / 4)) for i in range(4)]  # 3, 2.634, 1.75, 0.866
    np.testing.assert_allclose([sched[i] for i in range(10)], [1.0, 2.0, *cosine, 0.5, 0.5, 0.5, 0.5])
    rest = warmup_cosine_schedule(0.0, 2.0, 0.0, warmup_iters=1, total_iters=3)  # cosine over the remaining 2
    np.testing.assert_allclose([rest[i] for i in range(4)], [0.0, 2.0, 1.0, 0.0])


def test_gram_loss_weight_schedule_sets_the_weight_of_each_iteration(images):
    """gram.loss_weight_schedule (DINOv3's 7B Gram stage: 0, then a half-cosine up to w) replaces gram.loss_weight."""
    from dinokit.train.data import build_train_loader
    from dinokit.train.train import training_schedules

    schedule = ["gram.loss_weight_schedule.peak=0", "gram.loss_weight_schedule.end=2",
                "gram.loss_weight_schedule.warmup_epochs=1", "gram.loss_weight_schedule.cosine_epochs=1"]
    cfg = gram_cfg(images, "gram.ema_teacher=true", "gram.loss_weight=5", "train.OFFICIAL_EPOCH_LENGTH=2",
                   "optim.epochs=3", *schedule)
    weights = training_schedules(cfg)["gram_weight"]
    np.testing.assert_allclose([weights[i] for i in range(7)], [0, 0, 0, 1, 2, 2, 2])
    assert "gram_weight" not in training_schedules(gram_cfg(images, "gram.ema_teacher=true"))
    assert "gram_weight" not in training_schedules(tiny_cfg(images, *schedule))  # no Gram loss: no schedule

    batch = next(iter(build_train_loader(cfg, start_iteration=0, pin_memory=False)))
    totals = {}
    for weight in (None, 0.0, 3.0):
        torch.manual_seed(0)
        out = SSLMetaArch(cfg).compute_losses(batch, 0, {"teacher_temp": 0.06, **({} if weight is None else
                                                                                  {"gram_weight": weight})})
        totals[weight], gram = out.total.item(), out.terms["gram_loss"].item()
    assert gram > 0
    assert totals[3.0] - totals[0.0] == pytest.approx(3 * gram, rel=1e-4)
    assert totals[None] - totals[0.0] == pytest.approx(5 * gram, rel=1e-4)  # without the schedule: gram.loss_weight
    with pytest.raises(DinokitError, match="warmup_epochs -1.0"):
        gram_cfg(images, "gram.ema_teacher=true", "gram.loss_weight_schedule.warmup_epochs=-1")


def test_resize_patch_features_by_hand():
    from dinokit.losses.gram_loss import resize_patch_features

    ramp = torch.arange(4.0).repeat(4, 1)  # 4 x 4 grid, value = column
    tokens = torch.stack([ramp, 10 * ramp], dim=-1).flatten(0, 1)[None]  # (1, 16, 2)
    # bilinear, align_corners=False: output columns sit at input coordinates 0.5 and 2.5
    out = resize_patch_features(tokens, 2, mode="bilinear")
    torch.testing.assert_close(out, torch.tensor([[[0.5, 5.0], [2.5, 25.0], [0.5, 5.0], [2.5, 25.0]]]))
    assert resize_patch_features(tokens, 4) is tokens
    assert resize_patch_features(tokens, 8, mode="nearest").unflatten(1, (8, 8))[0, :, :, 0][0].tolist() == \
        [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="square grid"):
        resize_patch_features(tokens[:, :15], 2)


def test_high_resolution_gram_teacher_sees_its_own_crops_resized_to_the_student_grid(images, tmp_path):
    """crops.gram_teacher_crops_size (DINOv3's L_HRef): the Gram teacher runs on 2x crops, its patch features are
    resized to the student's grid; a run with it trains and its Gram loss is logged."""
    from dinokit.losses.gram_loss import resize_patch_features
    from dinokit.train.data import build_train_loader

    cfg = gram_cfg(images, "gram.it_load_ema_teacher=0", "crops.gram_teacher_crops_size=64",
                   "gram.global_teacher_resize_method=bilinear", "gram.global_teacher_resize_antialias=true")
    batch = next(iter(build_train_loader(cfg, start_iteration=0, pin_memory=False)))
    assert batch.gram_crops.shape == (batch.global_crops.shape[0], 3, 64, 64)
    model = SSLMetaArch(cfg)
    seen = []
    model.gram_teacher.register_forward_hook(lambda module, args, out: seen.append(out["x_norm_patchtokens"]))
    with torch.no_grad():
        targets = model._gram_teacher_patches(batch)
    assert seen[0].shape[1] == 64 and targets.shape[1] == 16  # 8 x 8 patches of 8 px, resized to the 4 x 4 grid
    torch.testing.assert_close(targets, resize_patch_features(seen[0], 4, mode="bilinear", antialias=True))

    out = tmp_path / "run"
    train(cfg, output_dir=out)
    lines = metrics(out)
    assert all(np.isfinite(l["total_loss"]) and l["gram_loss"] > 0 for l in lines)


def test_gram_config_errors(images):
    for extra, message in [
        ((), "gram.use_loss needs a Gram teacher"),
        (("gram.ema_teacher=true", "gram.it_load_ema_teacher=0"), "remove gram.ckpt and gram.it_load_ema_teacher"),
        (("gram.ema_teacher=true", "gram.remove_neg=true", "gram.remove_only_teacher_neg=true"), "exclude each other"),
        (("gram.ema_teacher=true", "gram.tokens_used=masked", "gram.img_level=true"), "gram.img_level=false"),
        (("gram.ema_teacher=true", "crops.gram_teacher_crops_size=64"), "needs a separate Gram teacher"),
        (("gram.it_load_ema_teacher=0", "crops.gram_teacher_crops_size=60"), "positive multiple of student.patch_size"),
        (("gram.it_load_ema_teacher=0", "gram.global_teacher_resize_method=nearest",
          "gram.global_teacher_resize_antialias=true"), "bilinear or bicubic"),
        (("gram.it_load_ema_teacher=0", "gram.global_teacher_resize_method=area"), "bicubic, bilinear, nearest"),
    ]:
        with pytest.raises(DinokitError, match=message):
            tiny_cfg(images, "gram.use_loss=true", *extra)
    with pytest.raises(DinokitError, match="set gram.use_loss=true or remove the key"):
        tiny_cfg(images, "crops.gram_teacher_crops_size=64")


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


@pytest.mark.parametrize("key", ["gram.use_loss=true", "train.freeze_backbone_epochs=1",
                                 "student.resume_from_teacher_chkpt=/a/run"])
def test_distill_refuses_stage_keys(images, tmp_path, key):
    from dinokit.distill.run import distill

    cfg = tiny_cfg(images, key, "gram.ema_teacher=true")
    with pytest.raises(DinokitError, match=f"{key.split('=')[0]} is a pretraining-stage key that dinokit distill"):
        distill(cfg, output_dir=tmp_path / "d")


def test_patch_knn_of_the_gram_probe(load_benchmark, tmp_path):
    """The README's patch-level measure: labels of whole patches; a random network, whose patch tokens carry
    pixel statistics, scores well above the most frequent texture, a network whose tokens are all equal does not."""
    stages = load_benchmark("stages")
    x, labels, pure = stages.texture_mosaics(6, seed=0, size=32, patch=8)
    assert x.shape == (6, 3, 32, 32) and labels.shape == pure.shape == (6, 16)
    assert pure.any() and (~pure).any() and set(labels[pure].unique().tolist()) <= set(range(1, 9))
    cfg = load_config("demo", [*TINY, "crops.global_crops_size=32"])
    _, val_labels, val_pure = stages.texture_mosaics(30, seed=1, size=32, patch=cfg.student.patch_size)  # seed 0's val
    majority = 100 * val_labels[val_pure].bincount().max().item() / val_pure.sum().item()
    random_init = stages.patch_knn(None, cfg, seeds=(0,), counts=(60, 30))
    assert random_init > majority + 10
    torch.manual_seed(0)
    model = backbone_from_config(cfg.student, img_size=32)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every patch token the same: one fixed vote for every patch
    zeros = save_backbone(model, tmp_path / "zeros.pth")
    assert stages.patch_knn(zeros, cfg, seeds=(0,), counts=(60, 30)) <= majority + 1e-6
