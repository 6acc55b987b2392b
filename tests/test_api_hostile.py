"""The Python API refuses bad input with one line naming the problem and the fix (and still takes good input)."""

from __future__ import annotations

import copy
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from dinokit.errors import DinokitError, ModelInputError
from dinokit.models import create_model
from dinokit.models.checkpoint import load_backbone_weights
from dinokit.models.registry import hub_entry_point
from dinokit.models.vision_transformer import DinoVisionTransformer
from dinokit.viz.attention import attention_maps

TINY = dict(embed_dim=32, depth=4, num_heads=2, img_size=56)  # shrinks any hub backbone


@pytest.fixture(scope="module")
def model() -> DinoVisionTransformer:
    torch.manual_seed(0)
    return hub_entry_point("dinov2_vits14")(pretrained=False, **TINY).eval()


def refused(fn, *args, _kind: type[Exception] = ModelInputError, **kwargs) -> str:
    """The one-line message of the ModelInputError (a DinokitError and a ValueError, as Python callers expect of a
    wrong argument) that ``fn`` raises; ``_kind=DinokitError`` for a file or download that cannot be used."""
    with pytest.raises(_kind) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def refused_load(fn, *args, **kwargs) -> str:
    """:func:`refused` for a weights file, state dict or download that cannot be used (a DinokitError)."""
    return refused(fn, *args, _kind=DinokitError, **kwargs)


# ---------------------------------------------------------------------------------------------- images
def test_bad_images_are_one_line_naming_shape_dtype_and_fix(model: DinoVisionTransformer) -> None:
    x = torch.randn(2, 3, 56, 42)
    want = "expected a (B, 3, H, W) float32 tensor"
    assert refused(model, x[0]) == f"{want}, got shape (3, 56, 42): add the batch dimension with x.unsqueeze(0)"
    assert refused(model, x.double()) == (f"{want} (the model's dtype), got float64: convert it with "
                                          "x.to(torch.float32), or run under torch.autocast")
    assert refused(model, x.bfloat16()).startswith(f"{want} (the model's dtype), got bfloat16")
    assert refused(model, (x * 40).clamp(0, 255).to(torch.uint8)) == (
        f"{want}, got uint8: convert the pixels with x.float() / 255, then normalise them with the ImageNet mean "
        "and std (dinokit.data.transforms.make_normalize_transform)")
    assert refused(model, torch.zeros(2, 56, 42, dtype=torch.int64)).startswith(f"{want}, got shape (2, 56, 42)")
    assert refused(model, x[:, :1]) == (f"{want}, got 1 channel(s) (shape (2, 1, 56, 42)): repeat a grey channel "
                                        "with x.expand(-1, 3, -1, -1)")
    assert refused(model, x.permute(0, 2, 3, 1)).endswith(": channels come second, use x.permute(0, 3, 1, 2)")
    assert refused(model, x.numpy()) == f"{want}, got ndarray; convert it with torch.from_numpy(array)"
    assert refused(model, x.to("meta")) == "the input is on meta and the model on cpu: move the input with x.to('cpu')"
    # a float64 model: autocast would not help it (the advice led to a torch error), so it is not offered
    assert refused(model.double(), x) == (f"{want.replace('float32', 'float64')} (the model's dtype), got float32: "
                                          "convert it with x.to(torch.float64)")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "got float32" in refused(model, x)
    model.float()
    on_meta = copy.deepcopy(model).to("meta")
    assert refused(on_meta, x) == "the input is on cpu and the model on meta: move the input with x.to('meta')"
    assert refused(model, x[..., :10]) == "input of size 56x10 is smaller than one 14x14 patch; give images of at " \
                                          "least 14 px per side"
    assert refused(model.get_intermediate_layers, x[0]).startswith(f"{want}, got shape (3, 56, 42)")
    assert refused(model.forward_features, [x, x.double()]).startswith(f"{want} (the model's dtype), got float64")
    with pytest.raises(ValueError):  # still a ValueError, as the model's errors were before
        model(x[0])


def test_good_images_still_work(model: DinoVisionTransformer) -> None:
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: any of its dtypes goes in
            assert model(x.bfloat16()).shape == (2, 32) and model(x).shape == (2, 32)
        torch.testing.assert_close(model.double()(x.double()).float(), out, rtol=1e-4, atol=1e-4)
    model.float()


def test_checks_do_not_break_the_graph(model: DinoVisionTransformer) -> None:
    x = torch.randn(1, 3, 56, 56)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_a_list_of_crops_needs_is_training(model: DinoVisionTransformer) -> None:
    x = torch.randn(1, 3, 56, 56)
    assert refused(model, [x, x]) == ("a list of crop sets needs is_training=True (it returns their feature dicts); "
                                      "pass one (B, C, H, W) tensor for the class-token output")
    assert len(model([x, x], is_training=True)) == 2


# ---------------------------------------------------------------------------------------------- masks
def test_masks_must_match_the_crop_sets(model: DinoVisionTransformer) -> None:
    a, b = torch.randn(2, 3, 56, 56), torch.randn(1, 3, 28, 42)
    ma, mb = torch.rand(2, 16) > 0.5, torch.rand(1, 6) > 0.5
    need = "2 crop sets need a list of 2 masks (None for an unmasked set), got"
    assert refused(model.forward_features, [a, b], masks=[ma]) == f"{need} 1"  # it dropped the second set
    assert refused(model.forward_features, [a, b], masks=[ma, mb, None]) == f"{need} 3"
    assert refused(model.forward_features, [a, a], masks=torch.stack([ma, ma])) == f"{need} a Tensor"
    assert refused(model.forward_features, a, masks=ma.float()) == (
        "masks must be a (2, 16) bool tensor (one flag per patch of each image), got shape (2, 16) float32")
    assert refused(model.forward_features, b, masks=ma).startswith("masks must be a (1, 6) bool tensor")
    with torch.no_grad():
        together = model.forward_features([a, b], masks=[ma, None])
        alone = model.forward_features(b)
    assert len(together) == 2 and together[0]["masks"] is ma
    torch.testing.assert_close(together[1]["x_norm_clstoken"], alone["x_norm_clstoken"])


# ---------------------------------------------------------------------------------------------- intermediate layers
@pytest.mark.parametrize("n, why", [
    ([], "n=[] is empty"),
    ([1, 1], "n=[1, 1] repeats an index"),
    ([4], "n=[4] must hold block indices in [0, 3]"),
    ([-1, 2], "n=[-1, 2] must hold block indices in [0, 3]"),
    ([1.0], "n=[1.0] must hold block indices in [0, 3]"),
])
def test_bad_block_lists(model: DinoVisionTransformer, n, why: str) -> None:
    x = torch.randn(1, 3, 28, 28)
    assert refused(model.get_intermediate_layers, x, n=n) == (
        f"{why}: give distinct block indices 0..3 (the model has 4 blocks), or an int n for the last n blocks")


@pytest.mark.parametrize("n", [0, 5, -1])
def test_bad_block_counts(model: DinoVisionTransformer, n: int) -> None:
    assert refused(model.get_intermediate_layers, torch.randn(1, 3, 28, 28), n=n) == (
        f"n={n} must be between 1 and the depth 4 (the number of last blocks), or give a list of block indices (0..3)")


@pytest.mark.parametrize("n", [True, 1.5, "2", None, {0: 1}])
def test_block_arguments_of_the_wrong_type(model: DinoVisionTransformer, n) -> None:
    assert refused(model.get_intermediate_layers, torch.randn(1, 3, 28, 28), n=n) == (
        f"n={n!r} is not usable: give the number of last blocks (1..4) or a list of block indices (0..3)")


def test_good_block_arguments_still_work(model: DinoVisionTransformer) -> None:
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        last_two = model.get_intermediate_layers(x, n=2)
        listed = model.get_intermediate_layers(x, n=(3, np.int64(2)))  # any order, numpy ints too
        ranged = model.get_intermediate_layers(x, n=range(2, 4))
    assert len(last_two) == len(listed) == len(ranged) == 2
    for a, b, c in zip(last_two, listed, ranged):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("setting, value, message", [
    ("patch_size", 0, "patch_size=0 is not usable: give a whole number >= 1"),
    ("patch_size", -14, "patch_size=-14 is not usable: give a whole number >= 1"),
    ("img_size", 0, "img_size=0 is not usable: give a whole number >= 1"),
    ("img_size", 224.0, "img_size=224.0 is not usable: give a whole number >= 1"),
    ("img_size", True, "img_size=True is not usable: give a whole number >= 1"),
    ("img_size", 10, "img_size=10 is smaller than one patch (patch_size=14): the position embedding needs at least "
                     "one patch; give img_size >= 14, e.g. 224"),
    ("depth", 0, "depth=0 is not usable: give a whole number >= 1"),
    ("num_heads", 0, "num_heads=0 is not usable: give a whole number >= 1"),
    ("num_register_tokens", -1, "num_register_tokens=-1 is not usable: give a whole number >= 0"),
    ("drop_path_rate", 1.5, "drop_path_rate=1.5 is not usable: give a number >= 0 and < 1"),
    ("mlp_ratio", 0, "mlp_ratio=0 is not usable: give a number > 0 (e.g. 4.0)"),
])
def test_bad_settings_are_refused_when_building(setting: str, value, message: str) -> None:
    with torch.device("meta"):
        assert refused(create_model, "dinov2_vits14", pretrained=False, **{setting: value}) == message


def test_usable_settings_still_build() -> None:
    model = create_model("dinov2_vits14", pretrained=False, **{**TINY, "img_size": 60})  # not a multiple: floored
    assert model.patch_embed.num_patches == 16
    with torch.no_grad():
        assert model(torch.randn(1, 3, 70, 70)).shape == (1, 32)


def test_unknown_arguments_name_the_closest() -> None:
    assert refused(create_model, "dinov2_vits14", pretrained=False, img_sise=224).startswith(
        "dinov2_vits14 takes no argument 'img_sise'; did you mean img_size? it takes pretrained, weights and the "
        "backbone settings (img_size, patch_size,")
    assert refused(hub_entry_point("dinov2_vits14_lc"), pretrained=False, layer=1).startswith(
        "dinov2_vits14_lc takes no argument 'layer'; did you mean layers? it takes pretrained, weights, layers, "
        "num_classes, backbone_weights and the backbone settings")


# ---------------------------------------------------------------------------------------------- depth hub
@pytest.mark.parametrize("depth_range", [(10, 1), (5, 5), (-1, 10), ("a", 10), (0.1,), (0.1, float("inf")), 10.0,
                                         (True, 10)])
def test_bad_depth_ranges(depth_range) -> None:
    for name in ("dinov2_vits14_ld", "dinov2_vits14_dd"):
        assert refused(hub_entry_point(name), pretrained=False, depth_range=depth_range, **TINY) == (
            f"depth_range={depth_range!r} is not usable: give (min, max) in metres with 0 <= min < max, e.g. "
            "(0.001, 10.0) for NYU or (0.001, 80.0) for KITTI")


def test_good_depth_range_and_bad_depth_options() -> None:
    model = hub_entry_point("dinov2_vits14_ld")(pretrained=False, depth_range=[0, 20], **TINY)
    assert (model.decode_head.min_depth, model.decode_head.max_depth) == (0.0, 20.0)
    ld = hub_entry_point("dinov2_vits14_ld")
    assert refused(ld, pretrained=False, layers=True, **TINY) == "dinov2_vits14_ld takes layers=1 or layers=4, not True"
    assert refused(ld, pretrained=False, weights=3, **TINY) == (
        "weights=3: use 'NYU', 'KITTI', a head file path or a head state dict")


# ---------------------------------------------------------------------------------------------- attention maps
def test_attention_map_arguments(model: DinoVisionTransformer) -> None:
    image = torch.zeros(3, 56, 56, dtype=torch.uint8)
    assert refused(attention_maps, model, image, block=1.5) == (
        "block=1.5 is not a block index: give a whole number in -4..3 (negative counts from the end)")
    assert refused(attention_maps, model, image, block=4) == (
        "block=4 is out of range: the model has 4 blocks; give -4..3 (negative counts from the end)")
    assert refused(attention_maps, model, image, batch_size=0) == "batch_size=0 is not usable: give a whole number >= 1"
    assert refused(attention_maps, model, image, image_size=0) == (
        "image_size=0 is not usable: give the short side in pixels, a whole number >= the patch size 14 (e.g. 448), "
        "or None to keep it")
    assert refused(attention_maps, model, image, dtype="bf16") == (
        "dtype='bf16' is not usable: give torch.bfloat16, torch.float16, torch.float32 or None (the model's precision)")
    assert refused(attention_maps, model, image, device="gpu") == (
        "device='gpu' is not a device: give e.g. 'cpu', 'cuda' or 'cuda:1'")
    assert refused(attention_maps, torch.nn.Linear(2, 2), image) == (
        "attention_maps needs a dinokit ViT backbone, got a Linear; pass the backbone itself (e.g. model.backbone of "
        "a classifier or dense model)")
    maps = attention_maps(model, image, block=-2, image_size=56)
    assert maps.attention[0].shape == (2, 4, 4) and maps.patch_norms[0].shape == (4, 4)


# ---------------------------------------------------------------------------------------------- weights
def test_numpy_state_dicts_name_torch_from_numpy(model: DinoVisionTransformer) -> None:
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    fix = "convert them first: {k: torch.from_numpy(v) for k, v in state_dict.items()}"
    assert refused_load(load_backbone_weights, model, sd) == (
        "the state dict holds numpy arrays, not torch tensors (cls_token, pos_embed, mask_token, "
        f"patch_embed.proj.weight (+{len(sd) - 4} more)); {fix}")
    mixed = {**model.state_dict(), "cls_token": sd["cls_token"]}  # one array among tensors: it is not dropped
    assert refused_load(load_backbone_weights, model, {"teacher": mixed}) == (
        f"the state dict holds numpy arrays, not torch tensors (cls_token); {fix}")
    assert refused_load(load_backbone_weights, model, {k: v.tolist() for k, v in model.state_dict().items()}) == (
        "the state dict holds no tensors (its values are list); give a state dict of torch tensors, e.g. "
        "model.state_dict(), or a backbone file")
    assert refused_load(load_backbone_weights, model, 5) == (
        "weights must be a file path, a URL or a state dict of tensors, got int")
    converted = {k: torch.from_numpy(v) for k, v in sd.items()}
    assert load_backbone_weights(hub_entry_point("dinov2_vits14")(pretrained=False, **TINY), converted) is not None


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch.hub cache and no network."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "hub" / "checkpoints"


def offline_advice(cache: Path, file: str, argument: str) -> str:
    return (f"(<urlopen error no network>); check the network connection, or fetch the file another way and put it "
            f"at {cache / file} (found there from then on), or pass its local path with {argument}=FILE (command "
            "line: --weights FILE), or build random weights with pretrained=False (--random-init)")


def test_offline_commands_keep_their_own_advice(offline: Path, tmp_path: Path, capsys) -> None:
    """A command builds its official model through create_model too: its line names --weights, not weights=FILE."""
    from PIL import Image

    from dinokit.cli import main

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert main(["embed", str(tmp_path / "a.png"), "--out", str(tmp_path / "e.npz"), "--device", "cpu"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: could not download ") and line.endswith(
        "or pass its local path with --weights FILE (or use --random-init)")
    with torch.device("meta"):  # and Python callers after a command still get theirs
        assert refused_load(hub_entry_point("dinov2_vits14")).endswith(
            offline_advice(offline, "dinov2_vits14_pretrain.pth", "weights"))


def test_offline_pretrained_names_the_python_arguments(offline: Path) -> None:
    base = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14"
    with torch.device("meta"):
        assert refused_load(hub_entry_point("dinov2_vits14")) == (
            f"could not download {base}/dinov2_vits14_pretrain.pth "
            + offline_advice(offline, "dinov2_vits14_pretrain.pth", "weights"))
        assert refused_load(hub_entry_point("dinov2_vits14_lc")) == (
            f"could not download {base}/dinov2_vits14_linear4_head.pth "
            + offline_advice(offline, "dinov2_vits14_linear4_head.pth", "weights"))
        head = {"weight": torch.zeros(1000, 5 * 384), "bias": torch.zeros(1000)}
        assert refused_load(hub_entry_point("dinov2_vits14_lc"), weights=head).endswith(
            offline_advice(offline, "dinov2_vits14_pretrain.pth", "backbone_weights"))
        assert refused_load(hub_entry_point("dinov2_vits14_ld")).endswith(
            offline_advice(offline, "dinov2_vits14_pretrain.pth", "backbone_weights"))
        backbone = create_model("dinov2_vits14", pretrained=False).state_dict()
        assert refused_load(hub_entry_point("dinov2_vits14_dd"), backbone_weights=backbone).endswith(
            offline_advice(offline, "dinov2_vits14_nyu_dpt_head.pth", "weights"))


def test_model_errors_stay_value_errors() -> None:
    assert issubclass(ModelInputError, DinokitError) and issubclass(ModelInputError, ValueError)


@pytest.mark.parametrize("call, message", [
    (lambda: create_model(5), "the model name must be a string such as 'dinov2_vits14', got 5"),
    (lambda: create_model("dinov2_vits14_lc", pretrained=False, num_classes=1.5, **TINY),
     "num_classes=1.5 is not usable: give a whole number >= 1"),
    (lambda: create_model("dinov2_vits14_lc", pretrained=False, num_classes=0, **TINY),
     "num_classes=0 is not usable: give a whole number >= 1"),
    (lambda: create_model("dinov2_vits14_lc", pretrained=False, weights=123, **TINY),
     "weights=123: give a head file path, URL or state dict (or leave it out for the official head)"),
    (lambda: create_model("dinov2_vits14_dd", pretrained=False, layers=3, **TINY),
     "dinov2_vits14_dd reads 4 blocks (its DPT head has no layers option); leave layers out"),
    (lambda: create_model("dinov2_vits14_dd", pretrained=False, layers=4.0, **TINY),
     "dinov2_vits14_dd reads 4 blocks (its DPT head has no layers option); leave layers out"),
    (lambda: create_model("dinov2_vits14_lc", pretrained=False, layers=4.0, **TINY),
     "dinov2_vits14_lc takes layers=1 or layers=4, not 4.0"),
    (lambda: create_model("dinov2_vits14_ld", pretrained=False, layers=1.0, **TINY),
     "dinov2_vits14_ld takes layers=1 or layers=4, not 1.0"),
])
def test_more_wrong_model_arguments(call, message) -> None:
    """A raw TypeError (name 5, num_classes 1.5), silently accepted (num_classes 0, a DPT depther's layers=3), or a
    plain DinokitError (weights=123): each is now one ModelInputError line."""
    assert refused(call) == message
