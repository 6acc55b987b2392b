"""DINOv3's mixed crop resolutions: the crops keys as lists, one (global, local, Gram) triple per iteration drawn
from (seed, iteration) with the given ratios, the same triple on every rank and after a resume, in every
augmentation path; one-line errors for lists that do not fit; a run that trains on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinokit.cli.train import pretrain as train
from dinokit.config import backbone_img_size, crop_resolutions, load_config
from dinokit.config.crops import CropSizes
from dinokit.data import write_sample_dataset
from dinokit.data.resolutions import ResolutionMix
from dinokit.errors import DinokitError
from dinokit.train.data import build_train_loader
from dinokit.train.ssl_meta_arch import SSLMetaArch

from tiny import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MIXED = ["crops.global_crops_size=[32,48]", "crops.local_crops_size=[16,24]",
         "crops.global_local_crop_pairs_ratios=[0.5,0.5]"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("sample"), counts={"train": 3, "val": 2}, image_size=64)


def _cfg(images: Path, *extra: str):
    return load_config("demo", [*tiny_run(prototypes=32, local_crops=2, batch=4),
                                f"train.dataset_path=ImageFolder:root={images / 'train'}", *MIXED, *extra])


def test_the_crop_keys_give_triples():
    cfg = load_config("demo", [])
    assert crop_resolutions(cfg.crops) == [(CropSizes(cfg.crops.global_crops_size, cfg.crops.local_crops_size), 1.0)]
    # DINOv3's high-resolution stage (sizes / 2 here, patch 8): five triples, ratios normalised
    cfg = load_config("demo", ["crops.global_crops_size=[256,384,384,384,384]",
                               "crops.local_crops_size=[56,56,80,112,168]",
                               "crops.global_local_crop_pairs_ratios=[0.3,0.3,0.3,0.05,0.05]"])
    triples = crop_resolutions(cfg.crops, cfg.student.patch_size)
    assert [t.global_size for t, _ in triples] == [256, 384, 384, 384, 384]
    assert [t.local_size for t, _ in triples] == [56, 56, 80, 112, 168]
    assert [r for _, r in triples] == pytest.approx([0.3, 0.3, 0.3, 0.05, 0.05])
    assert backbone_img_size(cfg.crops) == 384  # the position-embedding grid: the largest global side
    # one local size (or one ratio) for every global size
    cfg = load_config("demo", ["crops.global_crops_size=[64,96]", "crops.local_crops_size=32"])
    assert crop_resolutions(cfg.crops) == [(CropSizes(64, 32), 0.5), (CropSizes(96, 32), 0.5)]


@pytest.mark.parametrize("overrides, message", [
    (["crops.global_crops_size=[64,96]", "crops.local_crops_size=[32,48,64]"],
     "'crops.local_crops_size' has 3 values but crops.global_crops_size has 2"),
    (["crops.global_crops_size=[64,100]"], r"'crops.global_crops_size' is \[64, 100\]: 100 is not a multiple of "
                                           "student.patch_size 8; use e.g. 96"),
    (["crops.global_crops_size=[64,96]", "crops.global_local_crop_pairs_ratios=[1,-1]"],
     "'crops.global_local_crop_pairs_ratios' is \\[1, -1\\]; give positive numbers"),
    (["crops.global_crops_size=abc"], "'crops.global_crops_size' is 'abc'; give positive integers"),
    (["crops.global_crops_size=[64,96]", "gram.use_loss=true", "gram.it_load_ema_teacher=0",
      "crops.gram_teacher_crops_size=[128,null]"], "give a size for every triple or null for all"),
])
def test_lists_that_do_not_fit_are_refused_in_one_line(overrides, message):
    with pytest.raises(DinokitError, match=message) as info:
        load_config("demo", overrides)
    assert "\n" not in str(info.value)


def test_the_mix_draws_one_triple_per_iteration_with_the_ratios():
    mix = ResolutionMix([0.6, 0.3, 0.1], seed=0, global_batch_size=8)
    choices = [mix.for_iteration(i) for i in range(6000)]
    for k, ratio in enumerate([0.6, 0.3, 0.1]):
        share = choices.count(k) / len(choices)
        assert abs(share - ratio) < 4 * (ratio * (1 - ratio) / len(choices)) ** 0.5  # within 4 standard errors
    # every position of a global batch (any rank's part of it) gets its iteration's triple; another seed differs
    assert all(mix.for_position(i * 8 + offset) == choices[i] for i in range(50) for offset in range(8))
    assert [ResolutionMix([0.6, 0.3, 0.1], seed=1, global_batch_size=8).for_iteration(i) for i in range(50)] != \
        choices[:50]


@pytest.mark.parametrize("augmentation", ["pil", "tensor", "device"])
def test_each_batch_has_its_iterations_sizes_and_a_resume_sees_the_same(images, augmentation):
    cfg = _cfg(images, f"crops.augmentation={augmentation}", "crops.gram_teacher_crops_size=[64,96]",
               "gram.use_loss=true", "gram.it_load_ema_teacher=0")
    mix = ResolutionMix([0.5, 0.5], seed=cfg.train.seed, global_batch_size=4)
    loader = iter(build_train_loader(cfg, start_iteration=0, pin_memory=False))
    batches = [next(loader).to("cpu") for _ in range(8)]
    chosen = [mix.for_iteration(i) for i in range(8)]
    assert set(chosen) == {0, 1}  # both triples within these iterations
    for batch, k in zip(batches, chosen):
        glob, loc, gram = (32, 16, 64) if k == 0 else (48, 24, 96)
        assert batch.global_crops.shape == (8, 3, glob, glob) and batch.local_crops.shape == (8, 3, loc, loc)
        assert batch.gram_crops.shape == (8, 3, gram, gram)
        assert batch.masks.shape == (8, (glob // 8) ** 2)  # the iBOT masks on that grid
    resumed = next(iter(build_train_loader(cfg, start_iteration=5, pin_memory=False))).to("cpu")
    for name in ("global_crops", "local_crops", "gram_crops", "masks"):
        assert torch.equal(getattr(resumed, name), getattr(batches[5], name)), name


def test_images_are_decoded_large_enough_for_the_largest_crops(images):
    """A JPEG may be decoded at reduced scale (``draft_size``): it must stay large enough for every triple's crops,
    the Gram teacher's included, in every augmentation path (the tensor paths once missed the Gram crops)."""
    from dinokit.data.images import crop_draft_size

    extra = ("crops.gram_teacher_crops_size=[64,96]", "gram.use_loss=true", "gram.it_load_ema_teacher=0")
    sizes = []
    for augmentation in ("pil", "tensor", "device"):
        cfg = _cfg(images, f"crops.augmentation={augmentation}", *extra)
        sizes.append(build_train_loader(cfg, start_iteration=0, pin_memory=False).dataset.base_dataset.draft_size)
    g_min, l_min = cfg.crops.global_crops_scale[0], cfg.crops.local_crops_scale[0]
    assert sizes == [max(crop_draft_size(96, g_min), crop_draft_size(24, l_min))] * 3


def test_a_run_trains_on_mixed_resolutions(images, tmp_path):
    cfg = _cfg(images)
    assert SSLMetaArch(cfg).student.backbone.pos_embed.shape[1] == 1 + (48 // 8) ** 2  # built at the largest side
    result = train(cfg, output_dir=tmp_path / "run", device="cpu")
    assert result["iteration"] == 6
    lines = [json.loads(line) for line in (tmp_path / "run" / "training_metrics.json").read_text().splitlines()]
    assert len(lines) == 6 and all(torch.isfinite(torch.tensor(line["total_loss"])) for line in lines)


def test_compiled_blocks_keep_a_graph_for_every_crop_size(monkeypatch):
    """``train.compile`` compiles blocks with static shapes: one graph per token count and grad mode. DINOv3's
    five triples need more than dynamo's default 8 per function, past which it silently ran the rest eagerly."""
    import torch._dynamo
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    from dinokit.engine.parallel import apply_compile
    from dinokit.models.architectures import build_backbone

    monkeypatch.setattr(dynamo_config, "recompile_limit", 8)  # dynamo's default, restored after the test
    torch._dynamo.reset()
    counters.clear()
    backbone = build_backbone("vit_pico", patch_size=8, img_size=32)
    apply_compile(backbone)
    with torch.no_grad():
        for rows in range(1, 11):  # ten token counts: 1 to 10 patches
            backbone(torch.randn(1, 3, 8 * rows, 8))
    assert counters["stats"]["unique_graphs"] == 10  # 8 (then eager) with dynamo's default limit
    torch._dynamo.reset()
