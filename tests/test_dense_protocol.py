"""The dense recipes' details, value for value: the warm-up + cosine lr schedule (DINOv3's WarmupOneCycleLR), the
DPT preset (DINOv2's DPT config), the segmentation head's dropout before its BatchNorm, the depth range of
evaluation (the head's), the depth colour jitter on the 0-255 scale, the photometric distortion (hue, contrast
first or last), NYU's fixed training box and the final depth evaluation with flip.

Expected values are computed by hand in the comments.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.dense.heads import FeatureSpec, LinearDepthHead, LinearSegHead
from dinokit.dense.train import lr_schedule, recipe_with_overrides

from test_dense_heads import one_thread  # noqa: F401  (autouse: one intra-op thread for this module too)


# ---------------------------------------------------------------------------------------------- lr schedule
def test_depth_lr_is_the_one_cycle_closed_form():
    """NYU: lr 3e-4, T = 38400, W = 12800; warm-up lr/1000 + lr (1 + cos(π s/T))/2 · s/W, then the same cosine
    (not restarted) to lr/25/1000."""
    lr = lr_schedule(recipe_with_overrides("depth", "linear", []))
    assert len(lr) == 38400
    assert float(lr[0]) == pytest.approx(3e-7)  # 3e-4 / 1000
    # s = 6400: cos(π/6) = √3/2 -> 3e-7 + 3e-4 · (1 + √3/2)/2 · 1/2 = 3e-7 + 1.39952e-4
    assert float(lr[6400]) == pytest.approx(3e-7 + 3e-4 * (1 + math.sqrt(3) / 2) / 4, rel=1e-12)
    # after the warm-up the cosine is at (s + 1)/T: s = 12800 is ~1/3 of the way, 0.75 of the peak (2.25e-4), not 3e-4
    assert float(lr[12800]) == pytest.approx(2.25e-4, rel=1e-4)
    # s = 25599: (s + 1)/T = 2/3, cos(2π/3) = -1/2 -> 1.2e-8 + (3e-4 - 1.2e-8) · 1/4 = 7.5009e-5
    assert float(lr[25599]) == pytest.approx(1.2e-8 + (3e-4 - 1.2e-8) / 4, rel=1e-12)
    assert float(lr[-1]) == pytest.approx(1.2e-8, rel=1e-12)  # 3e-4 / 25 / 1000 at the last iteration


def test_segmentation_lr_is_the_one_cycle_closed_form():
    """ADE20K: lr 1e-3, T = 40000, W = 1500, r = 1e-6; warm-up lr (1 - (1 - s/W)(1 - r)) (1 - s/T), then cosine to 0
    at (s + 1)/T."""
    lr = lr_schedule(recipe_with_overrides("seg", "linear", []))
    assert float(lr[0]) == pytest.approx(1e-9, rel=1e-9)  # 1e-3 · 1e-6 · 1
    # s = 750: 1e-3 · (1 - 0.5 (1 - 1e-6)) · (1 - 750/40000) = 1e-3 · 0.5000005 · 0.98125
    assert float(lr[750]) == pytest.approx(1e-3 * 0.5000005 * 0.98125, rel=1e-12)
    # s = 1499: the warm-up ends below the peak, at 1e-3 · (1 - (1/1500)(1 - 1e-6)) · (1 - 1499/40000) = 0.96188e-3
    assert float(lr[1499]) == pytest.approx(1e-3 * (1 - (1 - 1e-6) / 1500) * (1 - 1499 / 40000), rel=1e-12)
    assert float(lr[19999]) == pytest.approx(0.5e-3, rel=1e-12)  # (s + 1)/T = 1/2: cos(π/2) = 0
    assert float(lr[-1]) == 0.0


def test_dpt_preset_follows_dinov2s_dpt_config():
    recipe = recipe_with_overrides("depth", "dpt", [])
    assert (recipe.lr, recipe.weight_decay, recipe.betas, recipe.grad_loss_weight) == (1e-4, 0.01, (0.9, 0.999), 0.5)
    assert (recipe.iterations, recipe.warmup_iters, recipe.clip_grad) == (38400, 12800, 35.0)
    lr = lr_schedule(recipe)
    assert float(lr[0]) == pytest.approx(1e-7)  # warmup_ratio 1e-3
    assert float(lr[-1]) == pytest.approx(1e-12)  # min_lr_ratio 1e-8
    linear = recipe_with_overrides("depth", "linear", [])
    assert linear.betas == (0.9, 0.99) and linear.grad_loss_weight == 0.0  # DINOv3's linear NYU recipe


def test_gradient_loss_is_on_log_depth():
    """One row of 3 pixels, gt 1: d = log(p + 1e-3) - log(1.001) is 0 and 2; only the scale-1 pair (0, 2) exists:
    |0 - 2| / 3 valid pixels = 2/3 (on depth itself it would be (1.001 e² - 1.001) / 3 = 2.13)."""
    from dinokit.dense.losses import gradient_loss

    pred = torch.tensor([[[1.0, 5.0, 1.001 * math.e**2 - 1e-3]]], dtype=torch.float64)
    loss = gradient_loss(pred, torch.ones_like(pred), torch.ones_like(pred, dtype=torch.bool))
    assert loss.item() == pytest.approx(2 / 3, rel=1e-9)


# ---------------------------------------------------------------------------------------------- segmentation head
def test_segmentation_dropout_comes_before_the_batchnorm():
    torch.manual_seed(0)
    head = LinearSegHead(embed_dim=16, levels=1, num_classes=2, dropout=0.5).train()
    head.bn.momentum = None  # cumulative average: after one batch the running statistics are that batch's
    head([torch.ones(8, 16, 1, 1)])  # constant 1: BN first would see mean 1 and variance 0 in every channel
    # Dropout2d keeps each (sample, channel) with p 0.5, scaled to 2: with k of 8 kept, mean k/4 and unbiased
    # variance (k (2 - k/4)² + (8 - k) (k/4)²) / 7
    mean, var = head.bn.running_mean, head.bn.running_var
    kept = torch.round(mean * 4)
    assert torch.allclose(mean, kept / 4)
    expected = (kept * (2 - kept / 4) ** 2 + (8 - kept) * (kept / 4) ** 2) / 7
    assert torch.allclose(var, expected, atol=1e-6)
    assert ((kept > 0) & (kept < 8)).any() and (var > 0.1).any()

    # eval mode: no dropout, so the order changes no prediction. 1 channel: bn (3 - 1)/2 = 1, conv 2 · 1 + 0.5 = 2.5
    for p in (0.0, 0.5):
        one = LinearSegHead(embed_dim=1, levels=1, num_classes=1, dropout=p).eval()
        with torch.no_grad():
            one.bn.running_mean.fill_(1.0)
            one.bn.running_var.fill_(4.0 - one.bn.eps)
            one.conv_seg.weight.fill_(2.0)
            one.conv_seg.bias.fill_(0.5)
        assert one([torch.full((1, 1, 1, 1), 3.0)]).item() == pytest.approx(2.5)
    assert set(LinearSegHead(embed_dim=4, dropout=0.1).state_dict()) == {
        "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "conv_seg.weight",
        "conv_seg.bias"}


# ---------------------------------------------------------------------------------------------- depth range
def _depth_folder(root, depth: np.ndarray):
    (root / "images").mkdir(parents=True)
    (root / "depth").mkdir()
    Image.new("RGB", depth.shape[::-1], (90, 60, 30)).save(root / "images" / "a.png")
    np.save(root / "depth" / "a.npy", depth.astype(np.float32))


def test_depth_is_scored_over_the_heads_range(tmp_path):
    """Ground truth 40 m (left half) and 4 m (right half); the head predicts the mean bin centre everywhere
    (zero logits: equal weights), (0.001 + max)/2. A head trained to 80 m is scored on both halves; one trained
    to 10 m on the 4 m half only (the range once came from the dataset: 10 m whatever the head)."""
    from dinokit.dense.datasets import make_dense_dataset
    from dinokit.dense.inference import InferenceConfig, evaluate
    from dinokit.dense.model import DenseModel
    from dinokit.dense.transforms import DenseEvalTransform
    from dinokit.models.registry import create_model

    depth = np.full((28, 28), 4.0)
    depth[:, :14] = 40.0
    _depth_folder(tmp_path / "d", depth)
    dataset = make_dense_dataset(f"DepthFolder:root={tmp_path / 'd'}", transform=DenseEvalTransform(None))
    torch.manual_seed(0)
    backbone = create_model("dinov2_vits14", pretrained=False, depth=1, embed_dim=32, num_heads=2)
    for top in (80.0, 10.0):
        head = LinearDepthHead(embed_dim=32, levels=1, min_depth=0.001, max_depth=top)
        torch.nn.init.zeros_(head.conv_depth.weight)
        torch.nn.init.zeros_(head.conv_depth.bias)
        model = DenseModel(backbone, head, FeatureSpec((0,), False, True))
        result = evaluate(model, dataset, InferenceConfig(), progress=False)
        p = (0.001 + top) / 2
        if top == 80.0:  # both halves: errors 0.0005 and 36.0005
            assert result["rmse"] == pytest.approx(math.sqrt(((40 - p) ** 2 + (p - 4) ** 2) / 2), rel=1e-5)
            assert result["abs_rel"] == pytest.approx(((p - 40) / 40 + (p - 4) / 4) / 2, rel=1e-5)
            assert result["delta1"] == pytest.approx(0.5)
        else:  # 40 m is outside (0.001, 10): the 4 m half only, error 1.0005
            assert result["rmse"] == pytest.approx(p - 4, rel=1e-5)
            assert result["abs_rel"] == pytest.approx((p - 4) / 4, rel=1e-5)


# ---------------------------------------------------------------------------------------------- augmentations
def test_depth_colour_jitter_is_on_the_0_255_scale():
    from dinokit.dense.transforms import depth_colour

    half = torch.full((3, 1, 1), 0.5)
    out = depth_colour(half, gamma=1.1, brightness=1.0, colour=torch.ones(3))
    assert torch.allclose(out, torch.full((3, 1, 1), 127.5**1.1 / 255))  # 0.8119, not 0.5^1.1 = 0.4665
    # 0.2 -> 51^0.9 · 1.25 · (0.9, 1.0, 1.1) / 255 per channel
    out = depth_colour(torch.full((3, 1, 1), 0.2), gamma=0.9, brightness=1.25, colour=torch.tensor([0.9, 1.0, 1.1]))
    assert out.flatten().tolist() == pytest.approx([51**0.9 * 1.25 * c / 255 for c in (0.9, 1.0, 1.1)], rel=1e-5)
    # 0.9 -> 229.5^1.1 = 394.9 > 255: clipped to 1
    assert depth_colour(torch.full((3, 1, 1), 0.9), gamma=1.1, brightness=1.0, colour=torch.ones(3)).eq(1).all()


def test_photometric_distortion_by_hand():
    from dinokit.dense.transforms import Photometric, photometric_distortion

    def apply(pixel, **kw):
        params = dict(brightness=None, contrast=None, saturation=None, hue=None, contrast_last=False) | kw
        return photometric_distortion(torch.tensor(pixel).view(3, 1, 1), Photometric(**params)).flatten().tolist()

    assert apply([0.5, 0.2, 0.0], brightness=25.5) == pytest.approx([0.6, 0.3, 0.1])  # +25.5/255
    red = [1.0, 0.0, 0.0]
    assert apply(red, hue=1 / 3) == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)  # a third of the circle: green
    assert apply(red, hue=-1 / 3) == pytest.approx([0.0, 0.0, 1.0], abs=1e-6)  # blue
    assert apply(red, hue=0.5) == pytest.approx([0.0, 1.0, 1.0], abs=1e-6)  # cyan
    # contrast before or after saturation (0: grey = 0.2989 r + 0.587 g + 0.114 b) differ through the clipping:
    # first: (0.8, 0.4, 0.4) x 1.5 = (1.2 -> 1, 0.6, 0.6) -> grey 0.2989 + 0.701 · 0.6 = 0.7195
    # last: grey(0.8, 0.4, 0.4) = 0.23912 + 0.2804 = 0.51952 -> x 1.5 = 0.77928
    pixel = [0.8, 0.4, 0.4]
    assert apply(pixel, contrast=1.5, saturation=0.0) == pytest.approx([0.7195] * 3, abs=1e-4)
    assert apply(pixel, contrast=1.5, saturation=0.0, contrast_last=True) == pytest.approx([0.77928] * 3, abs=1e-4)


def test_photometric_draws_each_operation_half_the_time_over_the_recipes_ranges():
    from dinokit.dense.transforms import draw_photometric

    random.seed(0)
    draws = [draw_photometric() for _ in range(4000)]
    for name, (low, high) in {"brightness": (-32, 32), "contrast": (0.5, 1.5), "saturation": (0.5, 1.5),
                              "hue": (-0.5, 0.5)}.items():
        values = [getattr(d, name) for d in draws if getattr(d, name) is not None]
        assert abs(len(values) / 4000 - 0.5) < 0.03, name  # p 0.5 each (std 0.008)
        assert low <= min(values) < low + 0.05 * (high - low) and high - 0.05 * (high - low) < max(values) <= high, name
    hues = [d.hue for d in draws if d.hue is not None]
    assert abs(sum(abs(h) > 0.25 for h in hues) / len(hues) - 0.5) < 0.04  # uniform over half the circle, not ±0.1
    assert abs(sum(d.contrast_last for d in draws) / 4000 - 0.5) < 0.03


def test_segmentation_training_shifts_hue():
    """A reddish image (r > g = b: hue 0) comes out of the training transform with green above red when the hue step
    turns it by 1/6 to 1/2 of the circle (h in (1/6, 1/2)) or by -1/2 to -1/3: probability 0.5 x (1/3 + 1/6) = 1/4."""
    from dinokit.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from dinokit.dense.transforms import DenseTrainTransform

    random.seed(1)
    torch.manual_seed(1)
    image = torch.tensor([0.6, 0.3, 0.3]).view(3, 1, 1).expand(3, 8, 8).clone()
    t = DenseTrainTransform(task="seg", crop_size=(8, 8), flip=0.0)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    greener = 0
    for _ in range(1000):
        out, _ = t(image, torch.zeros(8, 8, dtype=torch.long))
        rgb = (out * std + mean)[:, 0, 0]
        greener += int(rgb[1] > rgb[0] + 1e-3)
    assert abs(greener / 1000 - 0.25) < 0.05  # std 0.014; without the hue step: 0


def test_nyu_training_box():
    from dinokit.dense.transforms import DenseTrainTransform, cut_fixed_box

    box = (43, 45, 608, 472)
    image, label = cut_fixed_box(torch.zeros(3, 480, 640), torch.zeros(480, 640), box)
    assert image.shape == (3, 427, 565) and label.shape == (427, 565)
    # scaled to 320x240: columns int(21.5) = 21 .. int(304) = 304, rows int(22.5) = 22 .. int(236) = 236
    marked = torch.zeros(240, 320)
    marked[22:236, 21:304] = 1.0
    image, label = cut_fixed_box(marked.expand(3, 240, 320), marked, box)
    assert label.shape == (214, 283) and bool((label == 1).all()) and bool((image == 1).all())
    # training crops of 416x544 from a 640x480 NYU image never reach the border outside the box
    depth = torch.zeros(480, 640)
    depth[45:472, 43:608] = torch.rand(427, 565) + 1
    t = DenseTrainTransform(task="depth", crop_size=(416, 544), photometric=False, fixed_crop=box)
    random.seed(0)
    for _ in range(10):
        _, crop = t(depth.expand(3, 480, 640).clone() / 2, depth)
        assert crop.shape == (416, 544) and bool((crop >= 1).all())


# ---------------------------------------------------------------------------------------------- training run
def test_depth_training_cuts_nyus_box_and_tests_with_flip(tmp_path, monkeypatch):
    """On an NYU-layout set: the training transform cuts NYU's box first, the final evaluation averages each
    prediction with the mirrored-back prediction of the mirrored image, and head.pth records it for dense eval."""
    import dinokit.dense.transforms as transforms
    from dinokit.cli import main
    from dinokit.dense.datasets import make_dense_dataset
    from dinokit.dense.generated import write_dense_sample
    from dinokit.dense.inference import InferenceConfig, evaluate
    from dinokit.dense.loading import read_head_file
    from dinokit.dense.run import load_dense_model
    from dinokit.dense.transforms import DenseEvalTransform

    root = tmp_path / "nyu"
    write_dense_sample("depth", root, counts={"train": 2, "val": 2})
    (root / "val").rename(root / "test")  # ROOT/<split>/images + depth
    boxes = []
    original = transforms.cut_fixed_box

    def spy(image, label, box):
        boxes.append(box)
        return original(image, label, box)

    monkeypatch.setattr(transforms, "cut_fixed_box", spy)
    out = tmp_path / "out"
    assert main(["dense", "train", "--task", "depth", "--head", "linear", "--model", "dinov2_vits14", "--random-init",
                 "--device", "cpu", "--train-dataset", f"NYU:root={root}:split=train",
                 "--val-dataset", f"NYU:root={root}:split=test", "--output-dir", str(out), "--no-progress",
                 "iterations=2", "batch_size=2", "crop_size=32", "eval_period=0", "num_workers=0", "warmup_iters=1",
                 "checkpoint_period=2"]) == 0
    assert boxes and set(boxes) == {(43, 45, 608, 472)}  # every training item (evaluation images are not cut)
    saved = json.loads((out / "results_eval_depth.json").read_text())
    assert read_head_file(out / "head.pth")[1]["inference"]["flip"] is True
    model, _ = load_dense_model(out / "head.pth", device="cpu")
    test_set = make_dense_dataset(f"NYU:root={root}:split=test", transform=DenseEvalTransform(None))
    flipped = evaluate(model, test_set, InferenceConfig(flip=True), progress=False)
    plain = evaluate(model, test_set, InferenceConfig(flip=False), progress=False)
    assert saved["rmse"] == pytest.approx(flipped["rmse"], rel=1e-6)
    assert saved["abs_rel"] == pytest.approx(flipped["abs_rel"], rel=1e-6)
    assert abs(plain["rmse"] - flipped["rmse"]) > 1e-6  # the flip changed the numbers: it was used
