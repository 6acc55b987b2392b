"""Dense heads: parity with the official hub depthers' formulas, strict loading of official-layout files,
the segmentation head on a hand-computed case, and sliding-window inference.

The reference below restates the official computation functionally, straight from the parameter names of
the released files (``decode_head.conv_depth.*``, ``decode_head.reassemble_blocks.*`` ...): centre padding
to a multiple of 14, ``get_intermediate_layers(n=indices, reshape=True, return_class_token=True,
norm=False)``, the head, clamping to the head's range and a bilinear resize to the unpadded input size.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dinokit.dense.heads import DPTHead, FeatureSpec, LinearSegHead
from dinokit.dense.loading import load_head, save_head
from dinokit.dense.model import CenterPadding, DenseModel, build_dense_model, centre_pad, sliding_windows
from dinokit.errors import DinokitError
from dinokit.models.registry import create_model

SMALL = dict(embed_dim=32, num_heads=2)  # ViT-S/14 layout (12 blocks), narrow so that 518 px runs in a second


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small ops on a loaded 2-core machine run several times faster on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- reference
def ref_pad(x, multiple=14):
    h, w = x.shape[-2:]
    ph, pw = math.ceil(h / multiple) * multiple - h, math.ceil(w / multiple) * multiple - w
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def ref_linear_depth(levels, sd, min_depth, max_depth):
    cat = [torch.cat([x, cls[:, :, None, None].expand(-1, -1, *x.shape[-2:])], 1) for x, cls in levels]
    size = [4 * s for s in cat[0].shape[-2:]]
    x = torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=False) for c in cat], 1)
    logit = F.conv2d(x, sd["conv_depth.weight"], sd["conv_depth.bias"])
    logit = torch.relu(logit) + 0.1
    logit = logit / logit.sum(1, keepdim=True)
    bins = torch.linspace(min_depth, max_depth, logit.shape[1])
    return torch.einsum("ikmn,k->imn", logit, bins).unsqueeze(1)


def ref_dpt(levels, sd, min_depth):
    def conv(x, name, **kw):
        return F.conv2d(x, sd[name + ".weight"], sd.get(name + ".bias"), **kw)

    def rcu(x, name):
        y = conv(torch.relu(x), f"{name}.conv1.conv", padding=1)
        return conv(torch.relu(y), f"{name}.conv2.conv", padding=1) + x

    feats = []
    for i, (x, cls) in enumerate(levels):
        shape = x.shape
        t = x.flatten(2).permute(0, 2, 1)
        t = torch.cat([t, cls.unsqueeze(1).expand_as(t)], -1)
        t = F.gelu(F.linear(t, sd[f"reassemble_blocks.readout_projects.{i}.0.weight"], sd[f"reassemble_blocks.readout_projects.{i}.0.bias"]))
        x = t.permute(0, 2, 1).reshape(shape)
        x = conv(x, f"reassemble_blocks.projects.{i}.conv")
        r = f"reassemble_blocks.resize_layers.{i}"
        if i == 0:
            x = F.conv_transpose2d(x, sd[r + ".weight"], sd[r + ".bias"], stride=4)
        elif i == 1:
            x = F.conv_transpose2d(x, sd[r + ".weight"], sd[r + ".bias"], stride=2)
        elif i == 3:
            x = conv(x, r, stride=2, padding=1)
        feats.append(conv(x, f"convs.{i}.conv", padding=1))
    out = None
    for i in range(4):
        b = f"fusion_blocks.{i}"
        if i == 0:
            x = feats[-1]
        else:
            skip = feats[-(i + 1)]
            if skip.shape != out.shape:
                skip = F.interpolate(skip, size=out.shape[-2:], mode="bilinear", align_corners=False)
            x = out + rcu(skip, f"{b}.res_conv_unit1")
        x = rcu(x, f"{b}.res_conv_unit2")
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        out = conv(x, f"{b}.project.conv")
    out = torch.relu(conv(out, "project.conv", padding=1))
    out = conv(out, "conv_depth.head.0", padding=1)
    out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
    out = torch.relu(conv(out, "conv_depth.head.2", padding=1))
    out = conv(out, "conv_depth.head.4")
    return torch.relu(out) + min_depth


def ref_whole_inference(backbone, head_fn, x, indices, min_depth, max_depth):
    levels = backbone.get_intermediate_layers(ref_pad(x), n=indices, reshape=True, return_class_token=True, norm=False)
    out = head_fn(levels).clamp(min_depth, max_depth)
    return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def random_head_file(path, shapes: dict[str, tuple], seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {f"decode_head.{k}": torch.randn(s, generator=g) * (0.5 if k.endswith("weight") else 0.1) for k, s in shapes.items()}
    torch.save({"state_dict": sd, "meta": {"mmcv_version": "1.5.0"}}, path)
    return {k.removeprefix("decode_head."): v for k, v in sd.items()}


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


SIZES = [(224, 224), (518, 518), (230, 300)]


@pytest.mark.parametrize("layers", [1, 4])
def test_linear_depther_matches_the_official_formula(tmp_path, layers):
    torch.manual_seed(0)
    model = create_model("dinov2_vits14_ld", pretrained=False, layers=layers, **SMALL).eval()
    indices = [2, 5, 8, 11] if layers == 4 else [11]
    assert model.spec == FeatureSpec(tuple(indices), norm=False, class_token=True)
    shapes = {"conv_depth.weight": (256, 2 * 32 * layers, 1, 1), "conv_depth.bias": (256,)}
    sd = random_head_file(tmp_path / "head.pth", shapes)
    load_head(model.decode_head, tmp_path / "head.pth")
    # the official hub builds its linear heads over 0.001-80 m for any weights, and clamps to that range
    assert (model.decode_head.min_depth, model.decode_head.max_depth) == (0.001, 80.0)
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ours = model.whole_inference(x)
            ref = ref_whole_inference(model.backbone, lambda lv: ref_linear_depth(lv, sd, 0.001, 80.0), x, indices, 0.001, 80.0)
        assert ours.shape == (1, 1, *size)
        assert _rel_err(ours, ref) < 1e-5, size


def test_dpt_head_matches_the_official_formula(tmp_path):
    torch.manual_seed(0)
    backbone = create_model("dinov2_vits14", pretrained=False, **SMALL)
    head = DPTHead(embed_dim=32, channels=8, min_depth=0.001, max_depth=10.0)  # official: 256 channels (see below)
    model = DenseModel(backbone, head, FeatureSpec((2, 5, 8, 11), False, True)).eval()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    sd = random_head_file(tmp_path / "dpt.pth", shapes, seed=1)
    load_head(head, tmp_path / "dpt.pth")
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ours = model.whole_inference(x)
            ref = ref_whole_inference(backbone, lambda lv: ref_dpt(lv, sd, 0.001), x, [2, 5, 8, 11], 0.001, 10.0)
        assert ours.shape == (1, 1, *size)
        assert _rel_err(ours, ref) < 1e-5, size


def test_dpt_hub_model_has_the_official_parameter_layout():
    model = create_model("dinov2_vitl14_dd", pretrained=False, depth=4, embed_dim=64, num_heads=2)  # ViT-L/14 width scaled down
    keys = set(model.decode_head.state_dict())
    for i in range(4):
        assert f"reassemble_blocks.projects.{i}.conv.weight" in keys
        assert f"reassemble_blocks.readout_projects.{i}.0.weight" in keys
        assert f"convs.{i}.conv.weight" in keys and f"convs.{i}.conv.bias" not in keys
        assert f"fusion_blocks.{i}.project.conv.bias" in keys
        assert f"fusion_blocks.{i}.res_conv_unit2.conv2.conv.weight" in keys
    assert not any(k.startswith("fusion_blocks.0.res_conv_unit1") for k in keys)
    assert {"reassemble_blocks.resize_layers.0.weight", "reassemble_blocks.resize_layers.3.weight", "project.conv.weight",
            "conv_depth.head.0.weight", "conv_depth.head.2.weight", "conv_depth.head.4.weight"} <= keys
    assert model.decode_head.state_dict()["convs.0.conv.weight"].shape == (256, 8, 3, 3)  # post channels D/8 .. D
    assert model.decode_head.state_dict()["convs.3.conv.weight"].shape == (256, 64, 3, 3)
    assert (model.decode_head.min_depth, model.decode_head.max_depth) == (0.001, 10.0)  # untrained: the NYU range
    with torch.no_grad():
        assert model(torch.randn(1, 3, 28, 42)).shape == (1, 1, 28, 42)


def test_hub_depth_range_and_names():
    kitti = create_model("dinov2_vits14_dd", pretrained=False, depth_range=(0.5, 40.0), **SMALL)
    assert (kitti.decode_head.min_depth, kitti.decode_head.max_depth) == (0.5, 40.0)
    linear = create_model("dinov2_vits14_ld", pretrained=False, depth_range=(0.001, 10.0), **SMALL)
    assert linear.decode_head.max_depth == 10.0  # an explicit range is honoured (the official hub ignores it)
    with pytest.raises(DinokitError, match="layers=1 or layers=4"):
        create_model("dinov2_vits14_ld", pretrained=False, layers=2, **SMALL)
    with pytest.raises(DinokitError, match="'NYU', 'KITTI' or a head file"):
        create_model("dinov2_vits14_ld", pretrained=False, weights="SUNRGBD", **SMALL)
    from dinokit.dense.hub import head_url

    base = "https://dl.fbaipublicfiles.com/dinov2"
    assert head_url("dinov2_vitb14", "NYU", "linear4") == f"{base}/dinov2_vitb14/dinov2_vitb14_nyu_linear4_head.pth"
    assert head_url("dinov2_vitg14", "KITTI", "dpt") == f"{base}/dinov2_vitg14/dinov2_vitg14_kitti_dpt_head.pth"
    import hubconf

    for size in "sblg":
        for kind in ("ld", "dd"):
            assert callable(getattr(hubconf, f"dinov2_vit{size}14_{kind}"))


# ---------------------------------------------------------------------------------------------- loading
def test_strict_loading_errors_are_one_line(tmp_path):
    torch.manual_seed(0)
    head = build_dense_model(create_model("dinov2_vits14", pretrained=False, **SMALL), "depth-linear4").decode_head
    random_head_file(tmp_path / "l1.pth", {"conv_depth.weight": (256, 64, 1, 1), "conv_depth.bias": (256,)})
    with pytest.raises(DinokitError) as err:
        load_head(head, tmp_path / "l1.pth")
    assert str(err.value) == (
        f"decode_head.conv_depth.weight is (256, 64, 1, 1) in {str(tmp_path / 'l1.pth')!r} but the head expects "
        "(256, 256, 1, 1): the file is for layers=1"
    )
    # a file that records its head (dinokit's): the levels are known, so the width is what differs
    with pytest.raises(DinokitError) as err:
        load_head(head, tmp_path / "l1.pth", source="'head.pth'", levels_known=True)
    assert str(err.value) == (
        "decode_head.conv_depth.weight is (256, 64, 1, 1) in 'head.pth' but the head expects (256, 256, 1, 1): the "
        "file was trained on a backbone of another width (8); this one has embed_dim 32; give the backbone it was "
        "trained with")
    random_head_file(tmp_path / "partial.pth", {"conv_depth.weight": (256, 256, 1, 1)})
    with pytest.raises(DinokitError, match=r"does not match the LinearDepthHead layout \(missing decode_head.conv_depth.bias\)"):
        load_head(head, tmp_path / "partial.pth")
    random_head_file(tmp_path / "seg.pth", {"bn.weight": (32,), "conv_seg.weight": (150, 32, 1, 1), "conv_seg.bias": (150,)})
    with pytest.raises(DinokitError, match="holds a linear segmentation head, but a linear depth head was asked for"):
        load_head(head, tmp_path / "seg.pth")
    torch.save({"state_dict": {"backbone.blocks.0.norm1.weight": torch.ones(3)}}, tmp_path / "bb.pth")
    with pytest.raises(DinokitError, match="is not a dense-head file"):
        load_head(head, tmp_path / "bb.pth")
    for e in (err.value,):
        assert "\n" not in str(e)


def test_official_segmentation_file_loads_with_batchnorm_statistics(tmp_path):
    seg = LinearSegHead(embed_dim=32, levels=4, num_classes=150)
    g = torch.Generator().manual_seed(0)
    sd = {
        "decode_head.bn.weight": torch.rand(128, generator=g), "decode_head.bn.bias": torch.rand(128, generator=g),
        "decode_head.bn.running_mean": torch.rand(128, generator=g), "decode_head.bn.running_var": torch.rand(128, generator=g) + 0.5,
        "decode_head.bn.num_batches_tracked": torch.tensor(40000),
        "decode_head.conv_seg.weight": torch.randn(150, 128, 1, 1, generator=g), "decode_head.conv_seg.bias": torch.randn(150, generator=g),
        "backbone.blocks.0.norm1.weight": torch.ones(32),  # mmseg files may carry the backbone: skipped
    }
    torch.save({"state_dict": sd, "meta": {"CLASSES": ["wall"] * 150}}, tmp_path / "ade20k_ms_head.pth")
    load_head(seg, tmp_path / "ade20k_ms_head.pth")
    assert torch.equal(seg.bn.running_var, sd["decode_head.bn.running_var"])
    assert int(seg.bn.num_batches_tracked) == 40000
    one = LinearSegHead(embed_dim=32, levels=1, num_classes=150)
    with pytest.raises(DinokitError, match=r"reads 4 level\(s\) of 32 channels \(use the 'ms' head for 4"):
        load_head(one, tmp_path / "ade20k_ms_head.pth")
    # round trip through dinokit's own file format (official layout + description)
    save_head(seg, tmp_path / "mine.pth", {"kind": "seg-ms"})
    raw = torch.load(tmp_path / "mine.pth", weights_only=True)
    assert set(raw["state_dict"]) == {k for k in sd if k.startswith("decode_head.")}
    other = LinearSegHead(embed_dim=32, levels=4, num_classes=150)
    load_head(other, tmp_path / "mine.pth")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), seg.state_dict().values()))


# ---------------------------------------------------------------------------------------------- segmentation head
def test_segmentation_head_hand_computed():
    head = LinearSegHead(embed_dim=2, levels=2, num_classes=2).eval()
    with torch.no_grad():
        head.bn.running_mean.copy_(torch.tensor([1.0, 0.0, 0.0, 2.0]))
        head.bn.running_var.copy_(torch.tensor([4.0, 1.0, 1.0, 1.0]) - head.bn.eps)
        head.bn.weight.copy_(torch.tensor([1.0, 1.0, 2.0, 1.0]))
        head.bn.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
        head.conv_seg.weight.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]]).view(2, 4, 1, 1))
        head.conv_seg.bias.copy_(torch.tensor([0.5, -0.5]))
    level1 = torch.tensor([[[[3.0, 1.0]], [[2.0, 0.0]]]])  # (1, 2, 1, 2)
    level2 = torch.tensor([[[[1.0]], [[4.0]]]])  # (1, 2, 1, 1): resized (bilinear) to 1x2 = constant
    out = head([level1, level2])
    # bn: ch0 (x-1)/2, ch1 x, ch2 2x, ch3 (x-2)+1; then conv
    # pixel 0: [1, 2, 2, 3] -> [1+2+0.5, 2-3-0.5] = [3.5, -1.5]; pixel 1: [0, 0, 2, 3] -> [2.5, -3.5]
    assert torch.allclose(out, torch.tensor([[[[3.5, 2.5]], [[-1.5, -3.5]]]]))


# ---------------------------------------------------------------------------------------------- inference
def test_centre_padding_and_windows():
    x = torch.ones(1, 1, 15, 20)
    padded = centre_pad(x, 14)
    assert padded.shape == (1, 1, 28, 28)
    assert padded[0, 0, 6:21, 4:24].sum() == 300 and padded.sum() == 300  # 13 rows: 6 before, 7 after; 8 cols: 4 + 4
    assert torch.equal(CenterPadding(14)(x), padded)  # the official name, as a module (a pre-hook)
    assert sliding_windows(10, 7, (4, 4), (3, 3)) == [
        (0, 4, 0, 4), (0, 4, 3, 7), (3, 7, 0, 4), (3, 7, 3, 7), (6, 10, 0, 4), (6, 10, 3, 7)
    ]


def test_slide_inference_equals_whole_inference_when_windows_cover_the_image_once():
    torch.manual_seed(0)
    model = build_dense_model(create_model("dinov2_vits14", pretrained=False, depth=2, **SMALL), "seg-linear", num_classes=5)
    model.eval()
    x = torch.randn(1, 3, 56, 84)
    with torch.no_grad():
        whole = model.whole_inference(x)
        assert torch.allclose(model.slide_inference(x, crop=(56, 84), stride=(56, 84)), whole, atol=1e-6)
        assert torch.allclose(model.slide_inference(x, crop=(64, 96), stride=(30, 30)), whole, atol=1e-6)  # crop > image
        tiles = model.slide_inference(x, crop=28, stride=28)  # 2 x 3 tiles, each predicted on its own
        assert torch.allclose(tiles[..., 28:, 56:], model.whole_inference(x[..., 28:, 56:]), atol=1e-6)
        # flip TTA: the mean of the probabilities of the image and of the mirrored image, mirrored back
        probs = model.predict(x, flip=True)
        manual = (whole.softmax(1) + model.whole_inference(x.flip(-1)).softmax(1).flip(-1)) / 2
        assert torch.allclose(probs, manual, atol=1e-6)
        assert torch.allclose(probs.sum(1), torch.ones(1, 56, 84), atol=1e-5)
        assert model.predict(x, scales=(1.0, 1.5), size=(20, 30)).shape == (1, 5, 20, 30)


@pytest.mark.parametrize("kind", ["seg-linear", "depth-linear"])
def test_sharded_evaluation_pools_to_the_single_process_numbers(tmp_path, monkeypatch, kind):
    """``evaluate(shard=True)`` under two ranks (simulated): each predicts every other image, the pooled metrics
    equal one process's exactly (segmentation counts summed, depth rows averaged in dataset order)."""
    import dinokit.distributed as du
    from dinokit.dense.datasets import make_dense_dataset
    from dinokit.dense.transforms import DenseEvalTransform
    from dinokit.dense.generated import write_dense_sample
    from dinokit.dense.inference import InferenceConfig, evaluate

    task = kind.split("-")[0]
    write_dense_sample(task, tmp_path, counts={"train": 1, "val": 5})
    name = "SegSample" if task == "seg" else "DepthSample"
    dataset = make_dense_dataset(f"{name}:split=val:root={tmp_path}", transform=DenseEvalTransform(None))
    torch.manual_seed(0)
    model = build_dense_model(create_model("dinov2_vits14", pretrained=False, depth=2, **SMALL), kind, num_classes=9)
    single = evaluate(model, dataset, InferenceConfig(), progress=False, shard=True)  # one process: no sharding
    shares = {}

    def gather(part, rank):
        shares[rank] = part
        return [shares[0], shares[1]] if rank == 0 else [part]

    monkeypatch.setattr(du, "get_world_size", lambda: 2)
    for rank in (1, 0):  # rank 1 runs first and keeps its share, rank 0 gathers both
        monkeypatch.setattr(du, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(du, "all_gather_object", lambda part, rank=rank: gather(part, rank))
        pooled = evaluate(model, dataset, InferenceConfig(), progress=False, shard=True)
    if task == "depth":
        assert shares[1][2] == [1, 3] and shares[0][2] == [0, 2, 4]  # the dataset index of each rank's rows
    else:
        assert float(shares[1][0].label_area.sum()) == 2 * 64 * 64  # two 64 px images' pixels on rank 1
    # NaN (a class absent from the labels) equals NaN here: compare the JSON text the results file would hold
    assert json.dumps(pooled, sort_keys=True) == json.dumps(single, sort_keys=True) and pooled["images"] == 5
