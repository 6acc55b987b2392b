"""Gram anchoring (DINOv3): the loss by hand, the rows it compares, the Gram teacher's load and refresh schedule,
the weight schedule, the high-resolution Gram teacher's crops and feature resizing, config errors, and the Gram
probe's patch-level measure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinokit.cli.train import pretrain as train
from dinokit.config import backbone_from_config, load_config
from dinokit.errors import DinokitError
from dinokit.losses import GramLoss
from dinokit.models.checkpoint import save_backbone
from dinokit.train.ssl_meta_arch import SSLMetaArch
from test_stages import checkpoint_model, metrics, part
from test_train import TINY, images, tiny_cfg  # noqa: F401  (images is a fixture)


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
        s, t = SSLObjective._gram_tokens(SimpleNamespace(), student, teacher, masks, masked_index, mode)
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
    from dinokit.config import check_idle_keys

    with pytest.raises(DinokitError, match="'gram.loss_weight_schedule' does nothing without gram.use_loss=true"):
        check_idle_keys(tiny_cfg(images, *schedule))  # no Gram loss: the schedule would do nothing (a new run)

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


def test_gram_compute_stats_logs_masked_and_unmasked_gram_losses_outside_the_loss(images):
    """gram.compute_stats (DINOv3): gram_loss_masked/_unmasked are logged, never added to the loss or to the logged
    total_loss; without gram.use_loss the Gram loss itself is only logged."""
    from dinokit.train.data import build_train_loader

    stats = ("gram.compute_stats=true", "gram.img_level=true", "gram.ema_teacher=true")
    batch = next(iter(build_train_loader(tiny_cfg(images), start_iteration=0, pin_memory=False)))
    outs = {}
    for name, cfg in (("plain", tiny_cfg(images)), ("logged", tiny_cfg(images, *stats)),
                      ("used", gram_cfg(images, *stats))):
        torch.manual_seed(0)
        outs[name] = SSLMetaArch(cfg).compute_losses(batch, 0, {"teacher_temp": 0.06})
    plain, logged, used = outs["plain"], outs["logged"], outs["used"]
    assert logged.total.item() == plain.total.item() and logged.logged_total.item() == plain.logged_total.item()
    gram = logged.terms["gram_loss"].item()
    assert gram > 0 and used.terms["gram_loss"].item() == pytest.approx(gram, rel=1e-6)
    assert used.total.item() - plain.total.item() == pytest.approx(gram, rel=1e-4)  # gram.loss_weight 1
    assert used.logged_total.item() - plain.logged_total.item() == pytest.approx(gram, rel=1e-4)
    for out in (logged, used):
        masked, unmasked = out.terms["gram_loss_masked"].item(), out.terms["gram_loss_unmasked"].item()
        assert masked > 0 and unmasked > 0 and masked != unmasked
    with pytest.raises(DinokitError, match="gram.compute_stats needs a Gram teacher"):
        tiny_cfg(images, "gram.compute_stats=true")


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
        (("gram.it_load_ema_teacher=0", "crops.gram_teacher_crops_size=60"),
         "'crops.gram_teacher_crops_size' is 60, not a multiple of student.patch_size 8"),
        (("gram.it_load_ema_teacher=0", "crops.gram_teacher_crops_size=0"), "'crops.gram_teacher_crops_size' is 0; give "
                                                                             "positive integers"),
        (("gram.it_load_ema_teacher=0", "gram.global_teacher_resize_method=nearest",
          "gram.global_teacher_resize_antialias=true"), "bilinear or bicubic"),
        (("gram.it_load_ema_teacher=0", "gram.global_teacher_resize_method=area"), "bicubic, bilinear, nearest"),
    ]:
        with pytest.raises(DinokitError, match=message):
            tiny_cfg(images, "gram.use_loss=true", *extra)
    with pytest.raises(DinokitError, match="set gram.use_loss=true or remove the key"):
        tiny_cfg(images, "crops.gram_teacher_crops_size=64")


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


def test_the_gram_loss_is_float32_under_bf16_autocast():
    """'in float32': features.float() did not leave autocast, so under bf16 the Gram products ran in bf16; near the
    anchor (a student close to its teacher) the loss was off by up to 168% and its gradient mostly rounding."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 64, 96, generator=g)
    student = (teacher + 0.002 * torch.randn(2, 64, 96, generator=g)).requires_grad_()
    loss = GramLoss(img_level=True)
    plain = loss(student, teacher)
    (plain_grad,) = torch.autograd.grad(plain, student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss.gram(student).dtype == torch.float32
        mixed = loss(student, teacher)
    (mixed_grad,) = torch.autograd.grad(mixed, student)
    assert torch.equal(mixed, plain) and torch.equal(mixed_grad, plain_grad)
