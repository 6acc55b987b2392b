"""Parameter groups (layer decay, exemptions, fusion), schedules, lr scaling and the optimiser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from dinokit.errors import DinokitError
from dinokit.layers import DINOHead
from dinokit.models.architectures import build_backbone, vit_large
from dinokit.engine.optim import (
    CosineScheduler,
    ScheduleConfig,
    apply_optim_schedule,
    build_optimizer,
    build_schedulers,
    canonical_name,
    get_param_groups,
    scale_lr,
)


def tiny_backbone(**kwargs) -> nn.Module:
    return build_backbone("vit_pico", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, **kwargs)


def backbone_and_head(**kwargs) -> nn.ModuleDict:
    head = DINOHead(32, 16, hidden_dim=8, bottleneck_dim=4)
    return nn.ModuleDict({"backbone": tiny_backbone(**kwargs), "head": head})


def multipliers_by_name(module: nn.Module, **kwargs) -> dict[str, tuple[float, float, bool]]:
    groups = get_param_groups(module, **{"lr_decay_rate": 0.9, "patch_embed_lr_mult": 0.2, **kwargs})
    owner = {id(p): canonical_name(n) for n, p in module.named_parameters()}
    out = {}
    for group in groups:
        for param in group["params"]:
            assert owner[id(param)] not in out, "a parameter in two groups"
            out[owner[id(param)]] = (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"])
    return out


# ------------------------------------------------------------------------------------------ parameter groups


def test_vit_large_layer_decay_example():
    """Spec §1.8: ViT-L, decay 0.9: block 23 x0.9, block 0 x0.0798, tokens x0.0718, patch_embed x0.01436, norm x1."""
    with torch.device("meta"):
        model = vit_large(patch_size=14)
    mult = multipliers_by_name(model)
    assert mult["blocks.23.attn.qkv.weight"][0] == pytest.approx(0.9)
    assert mult["blocks.0.mlp.fc1.weight"][0] == pytest.approx(0.9**24) == pytest.approx(0.0798, abs=1e-4)
    for token in ("cls_token", "pos_embed", "mask_token"):
        assert mult[token][0] == pytest.approx(0.9**25) == pytest.approx(0.0718, abs=1e-4)
    assert mult["patch_embed.proj.weight"][0] == pytest.approx(0.2 * 0.9**25) == pytest.approx(0.01436, abs=1e-5)
    assert mult["norm.weight"][0] == 1.0
    groups = get_param_groups(model, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    # 24 blocks x (decayed, exempt) + tokens + patch_embed weight and bias + final norm
    assert len(groups) == 52
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_weight_decay_exemptions_and_last_layer_flag():
    model = backbone_and_head(num_register_tokens=2)
    mult = multipliers_by_name(model)
    exempt = {name for name, (_, wd, _) in mult.items() if wd == 0.0}
    assert exempt == {n for n in mult if n.endswith(".bias") or "norm" in n or "gamma" in n}
    assert "backbone.blocks.0.ls1.gamma" in exempt
    for decayed in ("pos_embed", "cls_token", "mask_token", "register_tokens", "patch_embed.proj.weight"):
        assert mult[f"backbone.{decayed}"][1] == 1.0
    assert mult["head.last_layer.weight_g"] == (1.0, 1.0, True)
    assert mult["head.last_layer.weight_v"] == (1.0, 1.0, True)
    assert {n for n, m in mult.items() if m[2]} == {"head.last_layer.weight_g", "head.last_layer.weight_v"}
    assert all(m[0] == 1.0 for n, m in mult.items() if n.startswith("head."))  # heads have no layer decay
    assert mult["backbone.register_tokens"][0] == pytest.approx(0.9**4)


def test_groups_are_fused_by_multipliers():
    model = tiny_backbone()
    groups = get_param_groups(model, lr_decay_rate=1.0, patch_embed_lr_mult=1.0)
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert sorted(keys) == [(1.0, 0.0, False), (1.0, 1.0, False)]


def test_chunked_blocks_use_the_global_index():
    """Official training layout: blocks.<chunk>.<i> with Identity padding at the front of each chunk."""
    plain = tiny_backbone()
    chunked = tiny_backbone()
    blocks = list(chunked.blocks)
    padded = nn.ModuleList([nn.Identity(), nn.Identity(), blocks[2]])
    chunked.blocks = nn.ModuleList([nn.ModuleList(blocks[:2]), padded])
    chunked.chunked_blocks = True
    mult = multipliers_by_name(chunked)
    assert "blocks.1.2.attn.qkv.weight" in mult
    assert mult["blocks.1.2.attn.qkv.weight"] == multipliers_by_name(plain)["blocks.2.attn.qkv.weight"]
    assert mult["blocks.1.2.attn.qkv.weight"][0] == pytest.approx(0.9)


def test_wrapper_prefixes_are_ignored():
    reference = multipliers_by_name(tiny_backbone())
    wrapped = tiny_backbone()
    for i, block in enumerate(wrapped.blocks):
        wrapped.blocks[i] = checkpoint_wrapper(block)
    compiled = torch.compile(wrapped)  # lazy: nothing compiles until a forward
    names = [n for n, _ in compiled.named_parameters()]
    assert any(n.startswith("_orig_mod.blocks.0._checkpoint_wrapped_module.") for n in names)
    assert multipliers_by_name(compiled) == reference


def test_declared_depth_and_frozen_parameters():
    class Blocks(nn.Module):  # a backbone without an n_blocks attribute
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 4))
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)

    mult = multipliers_by_name(Blocks(), n_blocks=2)
    assert mult["cls_token"][0] == pytest.approx(0.9**3)
    assert mult["blocks.0.weight"][0] == pytest.approx(0.9**2)
    assert mult["blocks.1.bias"] == (pytest.approx(0.9), 0.0, False)
    assert "frozen" not in mult


# ------------------------------------------------------------------------------------------ optimiser


def test_apply_schedule_and_step():
    model = backbone_and_head()
    optimizer = build_optimizer(get_param_groups(model, lr_decay_rate=0.5, patch_embed_lr_mult=0.2))
    assert all(g["foreach"] and not g["fused"] for g in optimizer.param_groups)
    assert optimizer.defaults["eps"] == 1e-8 and optimizer.defaults["betas"] == (0.9, 0.999)
    apply_optim_schedule(optimizer, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else 1e-3 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.04 * group["wd_multiplier"])
    model["head"](model["backbone"](torch.randn(2, 3, 32, 32))).sum().backward()
    last_layer = model["head"].last_layer.weight_v.detach().clone()
    optimizer.step()
    assert torch.equal(model["head"].last_layer.weight_v, last_layer)  # lr 0: frozen


# ------------------------------------------------------------------------------------------ schedules


def test_cosine_scheduler_by_hand():
    sched = CosineScheduler(1.0, 0.0, total_iters=6, warmup_iters=2, start_warmup_value=0.5, freeze_iters=1)
    np.testing.assert_allclose(sched.schedule, [0.0, 0.5, 1.0, 1.0, 0.75, 0.25])
    assert len(sched) == 6
    assert sched[5] == pytest.approx(0.25)
    assert sched[6] == 0.0 and sched[10**6] == 0.0  # past the end: final_value
    with pytest.raises(ValueError, match="warmup_iters"):
        CosineScheduler(1.0, 0.0, total_iters=2, warmup_iters=3)


def small_config(**overrides) -> ScheduleConfig:
    values = dict(
        epochs=4, epoch_length=3, lr=0.01, min_lr=0.001, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4,
        momentum_teacher=0.992, final_momentum_teacher=1.0, warmup_teacher_temp=0.04, teacher_temp=0.07,
        warmup_teacher_temp_epochs=2, freeze_last_layer_epochs=1,
    )
    return ScheduleConfig(**{**values, **overrides})


def test_build_schedulers_by_hand():
    s = build_schedulers(small_config())
    assert set(s) == {"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}
    np.testing.assert_allclose(s["lr"].schedule[:3], [0.0, 0.005, 0.01])  # warm-up with both endpoints
    cosine = 0.001 + 0.5 * 0.009 * (1 + np.cos(np.pi * np.arange(9) / 9))
    np.testing.assert_allclose(s["lr"].schedule[3:], cosine)
    assert s["lr"][12] == 0.001
    np.testing.assert_allclose(s["last_layer_lr"].schedule, np.r_[np.zeros(3), s["lr"].schedule[3:]])
    np.testing.assert_allclose(s["teacher_temp"].schedule, np.linspace(0.04, 0.07, 6))
    assert s["teacher_temp"][6] == 0.07 and s["teacher_temp"][100] == 0.07
    assert s["wd"][0] == pytest.approx(0.04) and np.all(np.diff(s["wd"].schedule) > 0) and s["wd"][12] == 0.4
    assert s["momentum"][0] == pytest.approx(0.992) and s["momentum"][12] == 1.0


def test_official_schedule_lengths_and_freeze():
    s = build_schedulers(small_config(epochs=100, epoch_length=1250, warmup_epochs=10, warmup_teacher_temp_epochs=30))
    assert len(s["lr"]) == 125_000 and len(s["teacher_temp"]) == 37_500
    assert s["last_layer_lr"][1249] == 0.0 and s["last_layer_lr"][1250] == s["lr"][1250] > 0
    assert s["lr"][12_499] == pytest.approx(0.01)


def test_schedule_config_from_official_keys():
    tree = {
        "optim": {"epochs": 4, "lr": 0.01, "min_lr": 0.001, "warmup_epochs": 1, "weight_decay": 0.04,
                  "weight_decay_end": 0.4, "freeze_last_layer_epochs": 1, "base_lr": 0.004},
        "teacher": {"momentum_teacher": 0.992, "final_momentum_teacher": 1, "warmup_teacher_temp": 0.04,
                    "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 2},
        "train": {"OFFICIAL_EPOCH_LENGTH": 3},
    }
    assert ScheduleConfig.from_config(tree) == small_config()
    from_omegaconf = build_schedulers(OmegaConf.create(tree))
    np.testing.assert_allclose(from_omegaconf["lr"].schedule, build_schedulers(small_config())["lr"].schedule)


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [({"epochs": 0}, "optim.epochs"), ({"warmup_epochs": 5}, "optim.warmup_epochs"),
     ({"warmup_teacher_temp_epochs": -1}, "teacher.warmup_teacher_temp_epochs")],
)
def test_schedule_config_errors_name_the_flag(overrides, flag):
    with pytest.raises(DinokitError, match=flag):
        small_config(**overrides)


def test_scale_lr_examples():
    # vitl16_short
    assert scale_lr(0.004, 2048) == pytest.approx(0.004 * math.sqrt(2)) == pytest.approx(5.66e-3, abs=1e-5)
    assert scale_lr(2e-4, 3072) == pytest.approx(2e-4 * math.sqrt(3)) == pytest.approx(3.46e-4, abs=1e-6)  # vitl14
    assert scale_lr(0.004, 512, rule="linear_wrt_256") == pytest.approx(0.008)
    assert scale_lr(0.004, 512, rule="none") == 0.004
    with pytest.raises(DinokitError, match="optim.scaling_rule"):
        scale_lr(0.004, 1024, rule="cubic")


def test_dinov3_lr_schedule_replaces_the_warmup_and_cosine():
    """optim.lr_schedule (DINOv3's schedules.lr, v2 form): its values scaled for the total batch by
    optim.scaling_rule; the last layer's (frozen for its first epoch) and the backbone's lr follow it. DINOv3's
    high-resolution stage: a half-cosine up from 0 over some epochs, then constant."""
    from dinokit.config import apply_scaling_rules, load_config
    from dinokit.train.train import training_schedules

    ramp = "optim.lr_schedule={start: 0, peak: 0, end: 4.0e-3, warmup_epochs: 0, cosine_epochs: 2}"
    cfg = load_config("demo", ["train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=4", "train.batch_size_per_gpu=256",
                               "optim.freeze_last_layer_epochs=1", "optim.backbone_lr_mult=0.5", ramp])
    schedules = training_schedules(apply_scaling_rules(cfg, world_size=1))
    # sqrt(256 / 1024) = 0.5: 0 -> 2e-3 along a half-cosine over 4 iterations, then 2e-3
    expected = [1e-3 * (1 - math.cos(math.pi * i / 4)) for i in range(4)] + [2e-3] * 5
    np.testing.assert_allclose([schedules["lr"][i] for i in range(9)], expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose([schedules["last_layer_lr"][i] for i in range(9)], [0, 0, *expected[2:]], atol=1e-15)
    np.testing.assert_allclose([schedules["backbone_lr"][i] for i in range(9)], np.array(expected) / 2, atol=1e-15)
    plain = training_schedules(apply_scaling_rules(load_config("demo", ["train.OFFICIAL_EPOCH_LENGTH=2",
                                                                         "optim.epochs=4"]), world_size=1))
    assert plain["lr"][0] == 0 and plain["lr"].final_value == cfg.optim.min_lr  # without it: warm-up and cosine
    with pytest.raises(DinokitError, match="optim.lr_schedule has warmup_epochs -1"):
        load_config("demo", [ramp.replace("warmup_epochs: 0", "warmup_epochs: -1")])
