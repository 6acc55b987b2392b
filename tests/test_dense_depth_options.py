"""DINOv3's linear depth protocol as options of the dense heads and recipes: the ``linear-bn`` head (BatchNorm,
features after the final norm, no CLS, no x4 upsampling), the bin options of ``FeaturesToDepth`` (log bins,
softmax and sigmoid normalisations, 1-channel regression), the Adam beta1 cycling of ``use_beta1`` and the
schedulers' one-step lag. Expected values are computed by hand in the comments.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dinokit.dense.heads import FeatureSpec, LinearDepthHead, bins_to_depth
from dinokit.dense.loading import load_head, save_head
from dinokit.dense.model import build_dense_model
from dinokit.dense.train import beta1_schedule, lr_schedule, recipe_with_overrides
from dinokit.errors import DinokitError
from dinokit.models.registry import create_model

from test_dense_heads import SMALL, one_thread, ref_pad  # noqa: F401  (one_thread: autouse for this module too)

# two pixels of 3 bin logits: (1, 3, 1, 2); pixel 0 [1, 0, -1], pixel 1 all zero
LOGITS = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]], dtype=torch.float64).view(1, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- bins
def test_linear_and_log_bins_with_the_linear_normalisation():
    """Bins over [1, 4]: linear [1, 2.5, 4], log exp(linspace(0, log 4)) = [1, 2, 4]. Pixel 0: relu + 0.1 =
    [1.1, 0.1, 0.1] / 1.3; pixel 1: 1/3 each."""
    linear = bins_to_depth(LOGITS, 1.0, 4.0)
    assert linear.shape == (1, 1, 1, 2)
    assert linear.flatten().tolist() == pytest.approx([(1.1 + 0.25 + 0.4) / 1.3, 2.5], rel=1e-12)
    log = bins_to_depth(LOGITS, 1.0, 4.0, bins="log")
    assert log.flatten().tolist() == pytest.approx([(1.1 + 0.2 + 0.4) / 1.3, 7 / 3], rel=1e-12)


def test_softmax_and_sigmoid_normalisations():
    """softmax of [log 3, 0, 0] = [3, 1, 1]/5 -> (3 + 2.5 + 4)/5 = 1.9; sigmoid of [0, log 3, -log 3] =
    [1/2, 3/4, 1/4], normalised by their sum 3/2 -> [1/3, 1/2, 1/6] -> 1/3 + 1.25 + 4/6 = 2.25 (linear bins [1, 2.5, 4])."""
    l3 = math.log(3)
    soft = torch.tensor([l3, 0.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    assert float(bins_to_depth(soft, 1.0, 4.0, norm="softmax")) == pytest.approx(1.9, rel=1e-12)
    sig = torch.tensor([0.0, l3, -l3], dtype=torch.float64).view(1, 3, 1, 1)
    assert float(bins_to_depth(sig, 1.0, 4.0, norm="sigmoid")) == pytest.approx(2.25, rel=1e-12)
    # zero logits: every normalisation gives equal weights, the mean bin centre
    for norm in ("linear", "softmax", "sigmoid"):
        assert float(bins_to_depth(torch.zeros(1, 3, 1, 1), 1.0, 4.0, norm=norm)) == pytest.approx(2.5)


def test_one_channel_is_a_regression():
    """depth = relu(x) + min_depth: [-2, 3] -> [0.5, 3.5] over [0.5, 10] (no bins, no normalisation)."""
    out = bins_to_depth(torch.tensor([-2.0, 3.0]).view(1, 1, 1, 2), 0.5, 10.0, norm="softmax", bins="log")
    assert out.flatten().tolist() == [0.5, 3.5]
    head = LinearDepthHead(embed_dim=2, levels=1, n_bins=1, min_depth=0.5, max_depth=10.0, upsample=1)
    with torch.no_grad():
        head.conv_depth.weight.copy_(torch.tensor([1.0, 0.0, 0.0, -1.0]).view(1, 4, 1, 1))
        head.conv_depth.bias.fill_(1.0)
    # [patch, CLS]: patch [2, 0] and [-3, 0], CLS [0, 1]: x = p0 - cls1 + 1 = 2 and -3 -> 2.5 and 0.5
    patch, cls = torch.tensor([[[[2.0, -3.0]], [[0.0, 0.0]]]]), torch.tensor([[0.0, 1.0]])
    assert head([(patch, cls)]).flatten().tolist() == [2.5, 0.5]


def test_bad_bin_options():
    with pytest.raises(ValueError, match="unknown bin spacing 'cubic'; use linear or log"):
        LinearDepthHead(embed_dim=2, levels=1, bins="cubic")
    with pytest.raises(ValueError, match="unknown bin normalisation 'tanh'; use linear, softmax or sigmoid"):
        bins_to_depth(LOGITS, 1.0, 4.0, norm="tanh")
    with pytest.raises(ValueError, match="log bins need min_depth > 0"):
        LinearDepthHead(embed_dim=2, levels=1, bins="log", min_depth=0.0)


# ---------------------------------------------------------------------------------------------- DINOv3's head
def _hand_head() -> LinearDepthHead:
    head = LinearDepthHead(embed_dim=2, levels=1, n_bins=2, min_depth=1.0, max_depth=3.0, batch_norm=True,
                           upsample=1, class_token=False).eval()
    with torch.no_grad():
        head.bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
        head.bn.running_var.copy_(torch.tensor([4.0, 1.0]) - head.bn.eps)
        head.bn.weight.copy_(torch.tensor([1.0, 2.0]))
        head.bn.bias.copy_(torch.tensor([0.0, 1.0]))
        head.conv_depth.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        head.conv_depth.bias.copy_(torch.tensor([0.0, 0.5]))
    return head


def test_dinov3_linear_depth_head_by_hand():
    """BN: ch0 (x - 1)/2, ch1 2x + 1; conv: bin0 = ch0, bin1 = ch1 + 0.5; bins [1, 3].
    Pixel 0 [3, 1] -> BN [1, 3] -> logits [1, 3.5] -> w [1.1, 3.6] -> (1.1 + 10.8)/4.7;
    pixel 1 [1, -1] -> BN [0, -1] -> logits [0, -0.5] -> w [0.1, 0.1] -> 2. At token resolution (no x4)."""
    head = _hand_head()
    patch = torch.tensor([[[[3.0, 1.0]], [[1.0, -1.0]]]])  # (1, 2, 1, 2): patch map only, no CLS
    out = head([patch])
    assert out.shape == (1, 1, 1, 2)
    assert out.flatten().tolist() == pytest.approx([11.9 / 4.7, 2.0], rel=1e-6)
    assert set(head.state_dict()) == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                      "bn.num_batches_tracked", "conv_depth.weight", "conv_depth.bias"}
    assert set(LinearDepthHead(embed_dim=2, levels=1).state_dict()) == {"conv_depth.weight", "conv_depth.bias"}
    torch.manual_seed(0)
    fresh = LinearDepthHead(embed_dim=32, levels=1, batch_norm=True, upsample=1, class_token=False)
    assert float(fresh.conv_depth.weight.detach().std()) == pytest.approx(0.01, rel=0.05)  # N(0, 0.01), bias 0
    assert not fresh.conv_depth.bias.any()


def test_linear_bn_model_reads_the_last_normed_block_and_resizes_depth():
    """DenseModel('depth-linear-bn'): features after the final norm, no CLS; depth at the token grid, clamped,
    resized bilinearly to the image (restated functionally from the parameters)."""
    torch.manual_seed(0)
    model = build_dense_model(create_model("dinov2_vits14", pretrained=False, **SMALL), "depth-linear-bn").eval()
    assert model.spec == FeatureSpec((11,), norm=True, class_token=False)
    head = model.decode_head
    assert (head.batch_norm, head.upsample, head.class_token, head.conv_depth.in_channels) == (True, 1, False, 32)
    with torch.no_grad():
        head.bn.running_mean.uniform_(-1, 1)
        head.bn.running_var.uniform_(0.5, 2)
        head.conv_depth.weight.normal_()
        x = torch.randn(1, 3, 40, 60)
        ours = model.whole_inference(x)
        (feat,) = model.backbone.get_intermediate_layers(ref_pad(x), n=[11], reshape=True, norm=True)
        assert feat.shape[-2:] == (3, 5)  # 42 x 70 padded: 3 x 5 tokens
        bn = F.batch_norm(feat, head.bn.running_mean, head.bn.running_var, head.bn.weight, head.bn.bias, eps=head.bn.eps)
        w = torch.relu(F.conv2d(bn, head.conv_depth.weight, head.conv_depth.bias)) + 0.1
        depth = (w * torch.linspace(0.001, 10.0, 256).view(1, -1, 1, 1)).sum(1, keepdim=True) / w.sum(1, keepdim=True)
        ref = F.interpolate(depth.clamp(0.001, 10.0), size=(40, 60), mode="bilinear", align_corners=False)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_linear_bn_head_files_load_strictly_and_apart_from_dinov2s(tmp_path):
    head = _hand_head()
    save_head(head, tmp_path / "v3.pth", {"kind": "depth-linear-bn"})
    other = LinearDepthHead(embed_dim=2, levels=1, n_bins=2, min_depth=1.0, max_depth=3.0, batch_norm=True,
                            upsample=1, class_token=False)
    load_head(other, tmp_path / "v3.pth")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), head.state_dict().values()))
    v2 = LinearDepthHead(embed_dim=1, levels=1, n_bins=2)  # [patch, CLS]: the same 2 input channels
    with pytest.raises(DinokitError) as err:
        load_head(v2, tmp_path / "v3.pth")
    assert str(err.value).endswith("(unexpected decode_head.bn.weight, decode_head.bn.bias, decode_head.bn.running_mean "
                                   "...): the file is DINOv3's linear depth head (with BatchNorm), --head linear-bn")
    save_head(v2, tmp_path / "v2.pth", {})
    with pytest.raises(DinokitError, match=r"\(missing decode_head.bn.weight, .*: the file is a DINOv2 linear depth "
                                           r"head \(no BatchNorm\), --head linear or linear4$"):
        load_head(other, tmp_path / "v2.pth")
    save_head(LinearDepthHead(embed_dim=1, levels=1, n_bins=3), tmp_path / "k3.pth", {})
    with pytest.raises(DinokitError, match=r"is \(3, 2, 1, 1\) in .* expects \(2, 2, 1, 1\): the file has 3 bins, "
                                           r"build the head with n_bins=3$"):
        load_head(v2, tmp_path / "k3.pth")


# ---------------------------------------------------------------------------------------------- recipe
def test_linear_bn_recipe_and_bin_settings():
    base, bn = recipe_with_overrides("depth", "linear", []), recipe_with_overrides("depth", "linear-bn", [])
    assert (base.norm, bn.norm) == (False, True)  # DINOv3 reads the features after the final norm
    assert {k: v for k, v in vars(bn).items() if k != "norm"} == {k: v for k, v in vars(base).items() if k != "norm"}
    assert (base.n_bins, base.bins_strategy, base.norm_strategy, base.cycle_beta1, base.schedule_lag) == (
        256, "linear", "linear", False, False)  # the documented defaults
    cases = {
        ("depth", "linear", "bins_strategy=cubic"): "bins_strategy='cubic' is not a bin spacing; use linear or log",
        ("depth", "linear", "norm_strategy=tanh"): "norm_strategy='tanh' is not a bin normalisation; use linear, "
                                                   "softmax or sigmoid",
        ("depth", "linear-bn", "n_bins=0"): "dense setting 'n_bins' is 0; it must be at least 1",
        ("depth", "dpt", "n_bins=64"): "setting 'n_bins' is for the linear depth heads; --task depth --head dpt does "
                                       "not use bins",
        ("seg", "linear", "norm_strategy=softmax"): "setting 'norm_strategy' is for the linear depth heads",
        # the other task's settings were accepted and did nothing
        ("seg", "ms", "max_depth=80"): "setting 'max_depth' is for depth heads; --task seg does not use it",
        ("seg", "linear", "grad_loss_weight=0.5"): "setting 'grad_loss_weight' is for depth heads",
        ("depth", "dpt", "class_token=true"): "setting 'class_token' is for segmentation heads; --task depth does not",
        ("depth", "linear", "dropout=0.1"): "setting 'dropout' is for segmentation heads",
    }
    for (task, head, setting), message in cases.items():
        with pytest.raises(DinokitError) as info:
            recipe_with_overrides(task, head, [setting])
        assert str(info.value).startswith(message) and "\n" not in str(info.value), setting
    # a run an earlier version started with the other task's setting resumes with it (refused for a new run only)
    assert recipe_with_overrides("depth", "linear", ["dropout=0.2"], saved_run=True).dropout == 0.2
    from dinokit.dense.inference import head_inference

    with pytest.raises(DinokitError, match="^--crop sets the sliding windows, and this inference is whole-image; add "
                                           "--mode slide, or drop --crop$"):
        head_inference({"kind": "depth-linear"}, {"crop": 32})  # a depth head infers on the whole image
    assert head_inference({"kind": "depth-linear"}, {"crop": 32, "mode": "slide"}).crop == 32
    with pytest.raises(DinokitError, match="^bins_strategy=log needs min_depth above 0"):
        recipe_with_overrides("depth", "linear", ["bins_strategy=log", "min_depth=0"])
    assert recipe_with_overrides("depth", "linear4", ["bins_strategy=log", "n_bins=1"]).n_bins == 1


# ---------------------------------------------------------------------------------------------- beta1 and lag
def test_beta1_cycles_as_dinov3_writes_it():
    """T = 10, W = 4: 0 during the warm-up, then 0.95 - 0.05 (1 + cos(π (s - 4)/6)): s = 4 -> 0.85,
    s = 5 -> 0.95 - 0.05 (1 + √3/2) = 0.856699, s = 7 -> 0.90, s = 9 -> 0.95 - 0.05 (1 - √3/2) = 0.943301."""
    recipe = recipe_with_overrides("depth", "linear-bn", ["iterations=10", "warmup_iters=4", "cycle_beta1=true"])
    r3 = math.sqrt(3) / 2
    expected = [0, 0, 0, 0, 0.85, 0.95 - 0.05 * (1 + r3), 0.875, 0.90, 0.925, 0.95 - 0.05 * (1 - r3)]
    assert beta1_schedule(recipe).tolist() == pytest.approx(expected, rel=1e-12)
    nyu = beta1_schedule(recipe_with_overrides("depth", "linear", ["cycle_beta1=true"]))  # W = 12800, T = 38400
    assert (float(nyu[12799]), float(nyu[12800]), float(nyu[25600])) == pytest.approx((0.0, 0.85, 0.90))
    lag = recipe_with_overrides("depth", "linear-bn", ["iterations=10", "warmup_iters=4", "schedule_lag=true"])
    assert beta1_schedule(lag).tolist() == pytest.approx([0] + expected[:-1], rel=1e-12)


def test_schedule_lag_delays_the_lr_by_one_iteration():
    """Segmentation, T = 4, W = 2, r = 0: lr (1 - (1 - s/2)) (1 - s/4) = 0, 0.375e-3; then (1 + cos(π (s + 1)/4))/2:
    s = 2 -> (1 - √2/2)/2 = 0.146447e-3, s = 3 -> 0. Lagged: iterations 0 and 1 at the value of 0, s at s - 1."""
    on_time = [0.0, 0.375e-3, (1 - math.sqrt(2) / 2) / 2 * 1e-3, 0.0]
    settings = ["iterations=4", "warmup_iters=2", "warmup_ratio=0"]
    assert lr_schedule(recipe_with_overrides("seg", "linear", settings)).tolist() == pytest.approx(on_time, abs=1e-15)
    lagged = lr_schedule(recipe_with_overrides("seg", "linear", [*settings, "schedule_lag=true"]))
    assert lagged.tolist() == pytest.approx([0.0, 0.0, 0.375e-3, on_time[2]], abs=1e-15)


def test_a_beta1_schedule_sets_adams_beta1_of_every_group():
    """The engine applies a "beta1" schedule (the depth recipe's cycle_beta1) to every group before each step;
    without one, beta1 is left alone."""
    from dinokit.engine.optim import apply_optim_schedule

    head = _hand_head()
    optimizer = torch.optim.AdamW([{"params": [head.conv_depth.weight]}, {"params": [head.conv_depth.bias]}],
                                  betas=(0.9, 0.99))
    for beta1 in (0.0, 0.85):
        apply_optim_schedule(optimizer, lr=1e-3, wd=0.0, last_layer_lr=1e-3, beta1=beta1)
        assert [g["betas"] for g in optimizer.param_groups] == [(beta1, 0.99)] * 2
    apply_optim_schedule(optimizer, lr=1e-3, wd=0.0, last_layer_lr=1e-3)
    assert [g["betas"] for g in optimizer.param_groups] == [(0.85, 0.99)] * 2


# ---------------------------------------------------------------------------------------------- end to end
def test_linear_bn_training_with_dinov3s_schedule_and_reload(tmp_path):
    """4 iterations, W = 2, beta1 cycling and lag: beta1 0, 0, 0, 0.85 and lr lagged in the metrics lines, beta1
    0.85 in the last checkpoint's optimiser; head.pth (BatchNorm, log bins, sigmoid) reloads strictly, with and
    without dinokit's description."""
    from dinokit.cli import main
    from dinokit.dense.generated import write_dense_sample
    from dinokit.dense.loading import read_head_file
    from dinokit.dense.run import load_dense_model

    write_dense_sample("depth", tmp_path / "d", counts={"train": 2, "val": 1})
    data = f"DepthSample:root={tmp_path / 'd'}"
    out = tmp_path / "out"
    settings = ["iterations=4", "warmup_iters=2", "batch_size=2", "crop_size=28", "augment=false", "eval_size=0",
                "eval_period=0", "num_workers=0", "log_freq=1", "checkpoint_period=4", "cycle_beta1=true",
                "schedule_lag=true", "bins_strategy=log", "norm_strategy=sigmoid"]
    assert main(["dense", "train", "--task", "depth", "--head", "linear-bn", "--model", "dinov2_vits14",
                 "--random-init", "--device", "cpu", "--train-dataset", f"{data}:split=train", "--val-dataset",
                 f"{data}:split=val", "--output-dir", str(out), "--no-progress", *settings]) == 0
    lines = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    assert [line["beta1"] for line in lines] == pytest.approx([0.0, 0.0, 0.0, 0.85])
    # depth warm-up: lr/1000 + lr (1 + cos(π s/4))/2 · s/2 at s = 0, 1: 3e-7, 3e-7 + 3e-4 (1 + √2/2)/4
    assert [line["lr"] for line in lines[:3]] == pytest.approx([3e-7, 3e-7, 3e-7 + 3e-4 * (1 + math.sqrt(2) / 2) / 4])
    ckpt = torch.load(out / "checkpoints" / "checkpoint_0000004.pth", weights_only=False)
    assert [g["betas"] for g in ckpt["optimizer"]["param_groups"]] == [(0.85, 0.99)] * len(ckpt["optimizer"]["param_groups"])
    sd, meta = read_head_file(out / "head.pth")
    assert {k.split(".")[0] for k in sd} == {"bn", "conv_depth"} and sd["conv_depth.weight"].shape == (256, 384, 1, 1)
    assert meta["spec"] == {"indices": [11], "norm": True, "class_token": False} and meta["kind"] == "depth-linear-bn"
    model, _ = load_dense_model(out / "head.pth", device="cpu")
    assert (model.decode_head.bins, model.decode_head.norm, model.decode_head.batch_norm) == ("log", "sigmoid", True)
    assert model.spec == FeatureSpec((11,), True, False)
    # without the description (an official-style file): the BatchNorm keys say which head it is
    torch.save({"state_dict": {f"decode_head.{k}": v for k, v in sd.items()}}, tmp_path / "bare.pth")
    bare, meta = load_dense_model(tmp_path / "bare.pth", backbone_source={"model": "dinov2_vits14", "random_init": True},
                                  device="cpu")
    assert (meta["kind"], meta["head"], bare.decode_head.batch_norm, bare.decode_head.upsample) == (
        "depth-linear-bn", "linear-bn", True, 1)
    assert (bare.decode_head.min_depth, bare.decode_head.max_depth) == (0.001, 10.0)  # DINOv3's range (not 80 m)
