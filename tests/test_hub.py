"""Registry and torch.hub contract: names, settings, parameter counts, key sets, weights URLs, ``_lc`` heads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dinokit.cli import main
from dinokit.errors import DinokitError
from dinokit.models import (
    DinoVisionTransformer,
    LinearClassifier,
    create_model,
    linear_features,
    list_models,
    model_info,
    save_backbone,
)
from dinokit.models.registry import ALIASES, count_parameters

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=4, num_heads=2, img_size=56)  # overrides that shrink any hub backbone

OFFICIAL_PARAMS = {
    "dinov2_vits14": 22_056_576,
    "dinov2_vitb14": 86_580_480,
    "dinov2_vitl14": 304_368_640,
    "dinov2_vitg14": 1_136_480_768,
    "dinov2_vits14_reg": 22_058_112,
    "dinov2_vitb14_reg": 86_583_552,
    "dinov2_vitl14_reg": 304_372_736,
    "dinov2_vitg14_reg": 1_136_486_912,
}
DIMS = {"s": (384, 12), "b": (768, 12), "l": (1024, 24), "g": (1536, 40)}


def official_keys(depth: int, *, registers: bool, swiglu: bool) -> list[str]:
    """The released checkpoint's keys (spec §2.1), in state-dict order."""
    keys = ["cls_token", "pos_embed"] + (["register_tokens"] if registers else []) + ["mask_token"]
    keys += ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    ffn = ["mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias"] if swiglu else [
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "ls1.gamma", "norm2.weight", "norm2.bias", *ffn, "ls2.gamma"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in block]
    return keys + ["norm.weight", "norm.bias"]


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_backbone_variants_match_the_released_checkpoints(name: str) -> None:
    size, registers = name[len("dinov2_vit")], name.endswith("_reg")
    dim, depth = DIMS[size]
    with torch.device("meta"):
        model = create_model(name)
    sd = model.state_dict()
    assert list(sd) == official_keys(depth, registers=registers, swiglu=size == "g")
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name] == count_parameters(name)
    assert sd["pos_embed"].shape == (1, 1370, dim)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * dim, dim)
    assert sd["patch_embed.proj.weight"].shape == (dim, 3, 14, 14)
    if size == "g":
        assert sd["blocks.0.mlp.w12.weight"].shape == (8192, 1536)
        assert sd["blocks.0.mlp.w3.weight"].shape == (1536, 4096)
    if registers:
        assert sd["register_tokens"].shape == (1, 4, dim)
    assert (model.num_register_tokens, model.interpolate_antialias, model.interpolate_offset) == (
        (4, True, 0.0) if registers else (0, False, 0.1)
    )
    assert model.patch_size == 14


def test_names_urls_and_aliases() -> None:
    names = list_models()
    assert len(names) == 24 and len(set(names)) == 24  # 16 backbones and classifiers, 8 depthers
    base = "https://dl.fbaipublicfiles.com/dinov2"
    assert model_info("dinov2_vits14").backbone_url == f"{base}/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert model_info("dinov2_vitl14_reg").backbone_url == f"{base}/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"
    lc = model_info("dinov2_vitg14_reg_lc")  # the README misspells this one; the code builds this name
    assert lc.head_urls == {
        1: f"{base}/dinov2_vitg14/dinov2_vitg14_reg4_linear_head.pth",
        4: f"{base}/dinov2_vitg14/dinov2_vitg14_reg4_linear4_head.pth",
    }
    assert model_info("dinov2_vitb14_lc").head_urls[4] == f"{base}/dinov2_vitb14/dinov2_vitb14_linear4_head.pth"
    assert set(ALIASES) <= set(list_models(include_aliases=True))
    with torch.device("meta"):
        model = create_model("vit-large-p14_dinov2-pre_3rdparty")
    assert (model.embed_dim, model.n_blocks, model.num_register_tokens) == (1024, 24, 0)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(DinokitError, match=r"unknown model 'dinov2_vits16'; did you mean dinov2_vits14"):
        create_model("dinov2_vits16")
    with pytest.raises(DinokitError, match="run 'dinokit models' for the list"):
        create_model("resnet50")


def test_overrides_reach_the_constructor() -> None:
    model = create_model("dinov2_vits14_reg", img_size=224, drop_path_rate=0.1, **{"depth": 2})
    assert model.pos_embed.shape == (1, 257, 384) and model.n_blocks == 2
    assert model.blocks[1].drop_path_rate == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------- torch.hub
def test_torch_hub_load_local() -> None:
    model = torch.hub.load(str(REPO), "dinov2_vitb14", source="local", pretrained=False)
    assert isinstance(model, DinoVisionTransformer)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS["dinov2_vitb14"]


def test_hubconf_exposes_every_model() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dinokit_hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dependencies == ["torch"]
    for name in list_models():
        assert getattr(hubconf, name).__name__ == name
    # the official image-text entry point exists by name and says in one line that dinokit does not provide it
    dinotxt = "dinov2_vitl14_reg4_dinotxt_tet1280d20h24l"
    with pytest.raises(DinokitError, match=rf"^'{dinotxt}' is dino.txt, the official image-text model: .* use the "
                                           "official repository for it$"):
        getattr(hubconf, dinotxt)()
    with pytest.raises(DinokitError, match="is dino.txt"):
        create_model(dinotxt)


def test_hub_weights_argument_loads_a_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model("dinov2_vits14", **TINY)
    path = save_backbone(source, tmp_path / "tiny.safetensors")
    model = torch.hub.load(str(REPO), "dinov2_vits14", source="local", weights=str(path), **TINY)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------- linear classifiers
def manual_class_tokens(model: DinoVisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Normalised class token after each block, computed step by step."""
    tokens = model.prepare_tokens_with_masks(x)
    out = []
    for block in model.blocks:
        tokens = block(tokens)
        out.append(model.norm(tokens)[:, 0])
    return out


def test_linear_feature_layouts() -> None:
    torch.manual_seed(0)
    model = create_model("dinov2_vits14_reg", **TINY).eval()
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        cls_per_block = manual_class_tokens(model, x)
        feats = model.forward_features(x)
        one = linear_features(model, x, layers=1)
        four = linear_features(model, x, layers=4)
    patch_mean = feats["x_norm_patchtokens"].mean(dim=1)
    torch.testing.assert_close(one, torch.cat([feats["x_norm_clstoken"], patch_mean], dim=1))
    torch.testing.assert_close(four, torch.cat([*cls_per_block[-4:], patch_mean], dim=1))  # oldest block first
    assert one.shape == (2, 64) and four.shape == (2, 160) and four.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_classifier_cast_to_half_precision_runs(dtype: torch.dtype) -> None:
    """The features reached the head as fp32 while .half()/.to(bfloat16) had cast the head: a dtype RuntimeError."""
    torch.manual_seed(0)
    model = create_model("dinov2_vits14_lc", pretrained=False, **TINY).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        full = model(x)
        half = model.to(dtype)(x.to(dtype))
    assert half.dtype == dtype and half.shape == full.shape
    torch.testing.assert_close(half.float(), full, rtol=0.1, atol=0.1)


def write_head(path: Path, *, layers: int, num_classes: int, dim: int = 32) -> dict:
    torch.manual_seed(layers)
    head = {"weight": torch.randn(num_classes, (1 + layers) * dim), "bias": torch.randn(num_classes)}
    torch.save(head, path)
    return head


def test_classifier_loads_head_and_backbone_files(tmp_path: Path) -> None:
    torch.manual_seed(1)
    backbone = create_model("dinov2_vits14", **TINY).eval()
    backbone_file = save_backbone(backbone, tmp_path / "backbone.pth")
    head = write_head(tmp_path / "head.pth", layers=4, num_classes=8)
    model = create_model("dinov2_vits14_lc", weights=tmp_path / "head.pth", backbone_weights=backbone_file, **TINY)
    assert isinstance(model, LinearClassifier) and model.layers == 4
    assert model.linear_head.out_features == 8  # taken from the head file
    assert sorted(k for k in model.state_dict() if not k.startswith("backbone.")) == ["linear_head.bias",
                                                                                      "linear_head.weight"]
    official_format = torch.load(tmp_path / "head.pth", weights_only=True)
    model.linear_head.load_state_dict(official_format, strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        want = linear_features(backbone, x, layers=4) @ head["weight"].T + head["bias"]
        torch.testing.assert_close(model.eval()(x), want)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> None:
    """torch.hub's folder is ``tmp_path`` (official files go in its checkpoints/), and nothing is downloaded."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, *a, **k: pytest.fail(f"download of {url}"))


def test_classifier_pretrained_uses_the_official_files_from_the_hub_cache(tmp_path, offline_hub) -> None:
    torch.manual_seed(2)
    backbone = create_model("dinov2_vits14_reg", **TINY)
    save_backbone(backbone, tmp_path / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth")
    head = write_head(tmp_path / "checkpoints" / "dinov2_vits14_reg4_linear_head.pth", layers=1, num_classes=1000)
    model = torch.hub.load(str(REPO), "dinov2_vits14_reg_lc", source="local", layers=1, **TINY)
    assert torch.equal(model.linear_head.weight, head["weight"])
    with pytest.raises(DinokitError, match="has 1000 classes, not 10"):
        create_model("dinov2_vits14_reg_lc", pretrained=True, num_classes=10, **TINY)


def test_classifier_errors(tmp_path: Path) -> None:
    write_head(tmp_path / "head1.pth", layers=1, num_classes=5)
    with pytest.raises(DinokitError, match=r"expects \(5, 160\).*the file is for layers=1"):
        create_model("dinov2_vits14_lc", weights=tmp_path / "head1.pth", layers=4, **TINY)
    with pytest.raises(DinokitError, match="takes layers=1 or layers=4, not 2"):
        create_model("dinov2_vits14_lc", layers=2, **TINY)
    torch.save({"something": torch.zeros(3)}, tmp_path / "not_a_head.pth")
    with pytest.raises(DinokitError, match="is not a linear head"):
        create_model("dinov2_vits14_lc", weights=tmp_path / "not_a_head.pth", **TINY)


# ------------------------------------------------------------------------------------------- CLI
def test_models_command_lists_names_sizes_and_urls(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("dinov2_")}
    assert set(rows) == set(list_models())
    assert rows["dinov2_vitg14_reg"][1:4] == ["vit_giant2", "1,136,486,912", "4"]
    assert rows["dinov2_vits14"][4].endswith("/dinov2_vits14/dinov2_vits14_pretrain.pth")
    assert "vit-small-p14_dinov2-pre_3rdparty = dinov2_vits14" in out


def test_the_official_weights_tag_means_the_official_file(tmp_path, offline_hub) -> None:
    """Seen: create_model(name, weights="LVD142M") gave random weights without a word (pretrained defaulted False)."""
    torch.manual_seed(3)
    official = create_model("dinov2_vits14", **TINY)
    save_backbone(official, tmp_path / "checkpoints" / "dinov2_vits14_pretrain.pth")
    for tag in ("LVD142M", "lvd142m"):
        loaded = create_model("dinov2_vits14", weights=tag, **TINY)
        assert torch.equal(loaded.cls_token, official.cls_token)
    random_init = create_model("dinov2_vits14", weights="LVD142M", pretrained=False, **TINY)  # as officially
    assert not torch.equal(random_init.cls_token, official.cls_token)


def test_torch_hub_load_of_a_checkout_uses_its_own_code(tmp_path: Path) -> None:
    """hubconf imported an installed dinokit first: torch.hub ran another copy than the checkout it was given."""
    import subprocess
    import sys

    checkout = tmp_path / "checkout"
    (checkout / "src" / "dinokit" / "models").mkdir(parents=True)
    (checkout / "hubconf.py").write_text((REPO / "hubconf.py").read_text())
    (checkout / "src" / "dinokit" / "__init__.py").write_text("")
    (checkout / "src" / "dinokit" / "models" / "__init__.py").write_text("")
    (checkout / "src" / "dinokit" / "models" / "registry.py").write_text(
        "def hub_entry_point(name):\n    return lambda **kwargs: 'this checkout: ' + name\n")
    code = f"import torch; print(torch.hub.load({str(checkout)!r}, 'dinov2_vits14', source='local'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout == "this checkout: dinov2_vits14\n", done.stderr[-2000:]


def test_the_official_constructor_arguments_build_the_backbone_and_its_chunked_weights_load() -> None:
    """The official build_model passes block_chunks to vit_small & co.: it was a TypeError."""
    from dinokit.models import load_backbone_weights, vit_small
    from dinokit.train.weights import chunked_backbone_keys

    torch.manual_seed(0)
    model = vit_small(patch_size=14, img_size=56, block_chunks=4, depth=4)
    chunked = chunked_backbone_keys({f"backbone.{k}": v for k, v in model.state_dict().items()}, depth=4,
                                    block_chunks=4)
    assert "backbone.blocks.1.1.attn.qkv.weight" in chunked  # the official FSDP layout
    other = vit_small(patch_size=14, img_size=56, depth=4)
    load_backbone_weights(other, {k.removeprefix("backbone."): v for k, v in chunked.items()})
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)


def test_hub_through_a_link_to_the_checkout_it_runs_from_says_nothing(tmp_path: Path) -> None:
    """The checkout reached through a symbolic link warned that dinokit was 'already imported from' its own files;
    a dinokit namespace package (a folder without __init__.py on the path) was a TypeError traceback."""
    import types
    import warnings

    (tmp_path / "link").symlink_to(REPO)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning fails
        torch.hub.load(str(tmp_path / "link"), "dinov2_vits14", source="local", pretrained=False, **TINY)
    real = sys.modules["dinokit"]
    sys.modules["dinokit"] = types.ModuleType("dinokit")  # a namespace package's __file__ is None
    sys.modules["dinokit"].__file__ = None
    try:
        with pytest.warns(UserWarning, match="dinokit is already imported from a namespace package"):
            import importlib.util

            spec = importlib.util.spec_from_file_location("hubconf_ns", REPO / "hubconf.py")
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        sys.modules["dinokit"] = real
