"""Conversion: official <-> Hugging Face and timm (round trips bit for bit, equal outputs in their own models),
mmpretrain -> official and mmpretrain's get_model calls, and the ``dinokit convert`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dinokit

from dinokit.cli import main
from dinokit.convert import (
    BackboneSpec,
    hf_to_official,
    mmpretrain_to_official,
    official_to_hf,
    official_to_timm,
    read_backbone,
    save_hf_folder,
    spec_from_model_name,
    timm_model_kwargs,
    timm_model_name,
    timm_to_official,
)
from dinokit.errors import DinokitError
from dinokit.models import create_model, save_backbone

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

VARIANTS = {
    "plain": dict(),
    "reg4": dict(num_register_tokens=4),
    "swiglu": dict(ffn_layer="swiglufused"),
}


def tiny_spec(variant: str) -> BackboneSpec:
    return BackboneSpec(embed_dim=64, depth=2, num_heads=4, patch_size=14, img_size=56, **VARIANTS[variant])


def random_backbone(spec: BackboneSpec, seed: int = 0) -> torch.nn.Module:
    """Every tensor random (LayerScale, mask token and class position included), so no mapping hides behind a zero."""
    model = spec.build().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def tokens(model, x):
    with torch.no_grad():
        out = model.forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_folder_loads_strictly_and_matches(tmp_path: Path, variant: str) -> None:
    spec = tiny_spec(variant)
    model = random_backbone(spec)
    folder = save_hf_folder(model.state_dict(), tmp_path / "hf", spec=spec)
    hf, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == ("Dinov2WithRegistersModel" if variant == "reg4" else "Dinov2Model")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    r = spec.num_register_tokens
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    cls, patches = tokens(model, x)
    with torch.no_grad():
        out = hf(pixel_values=x)
    assert torch.allclose(out.pooler_output, cls, atol=1e-5, rtol=0)
    assert torch.allclose(out.last_hidden_state[:, 1 + r :], patches, atol=1e-5, rtol=0)
    # back: from the file, and from transformers' own in-memory names (q_proj, gate_proj/up_proj in v5)
    sd = model.state_dict()
    assert_bitwise_equal(read_backbone(folder)[0], sd)
    assert_bitwise_equal(hf_to_official(hf.state_dict()), sd)
    assert_bitwise_equal(hf_to_official(official_to_hf(sd)), sd)


def test_hf_image_classifier_keeps_its_head_as_an_official_linear_head(tmp_path: Path, capsys) -> None:
    """A Dinov2ForImageClassification converted to official also writes its classifier as a one-block linear head
    file (it was dropped without a word); dinokit's linear classifier with it gives the HF logits."""
    from dinokit.models.linear_classifier import LinearClassifier, load_linear_head

    spec = tiny_spec("plain")
    model = random_backbone(spec)
    folder = save_hf_folder(model.state_dict(), tmp_path / "hf", spec=spec)
    config = transformers.AutoConfig.from_pretrained(folder, num_labels=5)
    hf = transformers.Dinov2ForImageClassification.from_pretrained(folder, config=config).eval()
    with torch.no_grad():
        hf.classifier.weight.normal_(generator=torch.Generator().manual_seed(2))
    hf.save_pretrained(tmp_path / "clf")
    out = tmp_path / "backbone.pth"
    assert main(["convert", str(tmp_path / "clf"), str(out), "--to", "official"]) == 0
    assert "backbone_linear_head.pth: the classifier, as an official linear head (layers=1" in capsys.readouterr().out
    clf = LinearClassifier(spec.build(), layers=1, num_classes=5).eval()
    clf.backbone.load_state_dict(torch.load(out, weights_only=True))
    load_linear_head(clf, tmp_path / "backbone_linear_head.pth")
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(clf(x), hf(pixel_values=x).logits, atol=1e-5, rtol=0)
    assert main(["convert", str(tmp_path / "clf"), str(tmp_path / "again"), "--to", "hf"]) == 0
    assert "note: the classifier (5, 128) is not part of a Dinov2Model folder" in capsys.readouterr().out


def test_hf_interpolation_differs_only_by_the_official_offset(tmp_path: Path) -> None:
    """At a non-native size HF's plain model resizes with size= (no +0.1 offset): the official model differs,
    and the same weights with offset 0 agree with HF. Register models use size= with antialias in both."""
    x = torch.randn(1, 3, 42, 70, generator=torch.Generator().manual_seed(2))
    for variant in ("plain", "reg4"):
        spec = tiny_spec(variant)
        model = random_backbone(spec)
        hf = transformers.AutoModel.from_pretrained(save_hf_folder(model.state_dict(), tmp_path / variant, spec=spec))
        with torch.no_grad():
            hf_cls = hf.eval()(pixel_values=x).pooler_output
        official_cls, _ = tokens(model, x)
        if variant == "reg4":
            assert torch.allclose(hf_cls, official_cls, atol=1e-5, rtol=0)
            continue
        no_offset = spec.build(interpolate_offset=0.0)
        no_offset.load_state_dict(model.state_dict())
        # the official 0.1 offset changes the position embedding; without it the models agree to rounding
        assert max_rel(hf_cls, tokens(no_offset.eval(), x)[0]) < 1e-5 < max_rel(hf_cls, official_cls)


def test_hf_config_of_a_released_model(tmp_path: Path) -> None:
    model = create_model("dinov2_vits14_reg")  # random init, the released architecture
    main(["convert", str(save_backbone(model, tmp_path / "s.pth")), str(tmp_path / "hf"), "--to", "hf"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "dinov2_with_registers" and config["num_register_tokens"] == 4
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (384, 12, 6)
    assert (config["image_size"], config["patch_size"], config["mlp_ratio"]) == (518, 14, 4)
    _, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values())
    assert config["torch_dtype"] == "float32"


# ------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_timm_constructor_expression_builds_a_model_the_weights_fit(variant: str) -> None:
    from dinokit.convert.timm import timm_constructor

    spec = tiny_spec(variant)
    tm = eval(timm_constructor(spec), {"timm": timm, "torch": torch})
    assert not any(tm.load_state_dict(official_to_timm(random_backbone(spec).state_dict()), strict=True))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_timm_strict_load_and_equal_outputs(variant: str) -> None:
    spec = tiny_spec(variant)
    model = random_backbone(spec)
    tm = timm.models.vision_transformer.VisionTransformer(**timm_model_kwargs(spec), dynamic_img_size=True).eval()
    tm.load_state_dict(official_to_timm(model.state_dict()), strict=True)
    r = spec.num_register_tokens
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    cls, patches = tokens(model, x)
    with torch.no_grad():
        out = tm.forward_features(x)
    assert torch.allclose(out[:, 0], cls, atol=1e-5, rtol=0)
    assert torch.allclose(out[:, 1 + r :], patches, atol=1e-5, rtol=0)
    # timm resamples with size= and antialias: equal to the official register models at other sizes too
    if variant == "reg4":
        x = torch.randn(1, 3, 42, 70)
        with torch.no_grad():
            assert torch.allclose(tm.forward_features(x)[:, 0], tokens(model, x)[0], atol=1e-5, rtol=0)
    # back to official: the same function always
    back = spec.build().eval()
    back.load_state_dict(timm_to_official(tm.state_dict()), strict=True)
    assert torch.allclose(tokens(back, x)[0], tokens(model, x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_timm_round_trip_bit_for_bit(variant: str) -> None:
    """timm stores no mask_token and, with registers, folds the class position into cls_token: the round
    trip is exact for weights that already have a zero mask token (its initial value) and class position."""
    sd = random_backbone(tiny_spec(variant)).state_dict()
    sd["mask_token"] = torch.zeros_like(sd["mask_token"])
    if variant == "reg4":
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = torch.cat((torch.zeros_like(sd["pos_embed"][:, :1]), sd["pos_embed"][:, 1:]), dim=1)
    assert_bitwise_equal(timm_to_official(official_to_timm(sd)), sd)


def test_timm_names_of_released_models() -> None:
    assert timm_model_name(tiny_spec("plain")) is None
    assert timm_model_name(spec_from_model_name("dinov2_vitb14_reg")) == "vit_base_patch14_reg4_dinov2"
    assert timm_model_name(spec_from_model_name("dinov2_vitg14")) == "vit_giant_patch14_dinov2"
    with torch.device("meta"):  # keys and shapes only: no memory, no initialisation
        tm = timm.create_model(timm_model_name(spec_from_model_name("dinov2_vits14")), pretrained=False, num_classes=0)
        sd = official_to_timm(create_model("dinov2_vits14").state_dict())
    tm.load_state_dict(sd, strict=True, assign=True)


# ------------------------------------------------------------------------------------------- mmpretrain
def to_mmpretrain_layout(sd: dict) -> dict:
    """The layout of mmpretrain's ``vit-*-p14_dinov2-pre_3rdparty`` files, written out by hand for the test."""
    names = {"norm1": "ln1", "norm2": "ln2", "mlp.fc1": "ffn.layers.0.0", "mlp.fc2": "ffn.layers.1",
             "mlp.w12": "ffn.w12", "mlp.w3": "ffn.w3", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj"}
    out = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            if rest == "ls1.gamma":
                new = f"layers.{i}.attn.gamma1.weight"
            elif rest == "ls2.gamma":
                new = f"layers.{i}.ffn.gamma2.weight"
            else:
                module, kind = rest.rsplit(".", 1)
                new = f"layers.{i}.{names[module]}.{kind}"
        else:
            new = {"patch_embed.proj.weight": "patch_embed.projection.weight", "patch_embed.proj.bias":
                   "patch_embed.projection.bias", "norm.weight": "ln1.weight", "norm.bias": "ln1.bias"}.get(key, key)
        out["backbone." + new] = value
    out["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    return {"meta": {"dataset_meta": {}}, "state_dict": out}


@pytest.mark.parametrize("variant", ["plain", "swiglu"])
def test_mmpretrain_to_official(tmp_path: Path, variant: str) -> None:
    sd = random_backbone(tiny_spec(variant)).state_dict()
    sd["mask_token"] = torch.zeros_like(sd["mask_token"])  # mmpretrain has none: it comes back as zeros
    torch.save(to_mmpretrain_layout(sd), tmp_path / "mm.pth")
    assert_bitwise_equal(mmpretrain_to_official(torch.load(tmp_path / "mm.pth")), sd)
    assert main(["convert", str(tmp_path / "mm.pth"), str(tmp_path / "o.safetensors"), "--to", "safetensors"]) == 0
    got, layout, _ = read_backbone(tmp_path / "o.safetensors")
    assert layout == "official"
    assert_bitwise_equal(got, sd)


def test_get_model_mmpretrain_usage(tmp_path: Path) -> None:
    """The seed-page calls: model(inputs) and model.extract_feat(inputs) give (normalised cls (B, 384),),
    with mmpretrain's size= position resize, which is also what HF's Dinov2Model computes."""
    with torch.device("meta"):  # shapes only; random values below are faster than the model's initialisation
        shapes = {k: v.shape for k, v in create_model("dinov2_vits14").state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    official = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in shapes.items()}
    torch.save(to_mmpretrain_layout(official), tmp_path / "mm.pth")
    model = dinokit.get_model("vit-small-p14_dinov2-pre_3rdparty", weights=tmp_path / "mm.pth")
    inputs = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        out, feats = model(inputs), model.extract_feat(inputs)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (1, 384)
    assert torch.equal(out[0], feats[0])
    hf = transformers.AutoModel.from_pretrained(save_hf_folder(official, tmp_path / "hf"))
    with torch.no_grad():
        assert torch.allclose(out[0], hf.eval()(pixel_values=inputs).pooler_output, atol=1e-4, rtol=0)
    with pytest.raises(DinokitError, match="has no head"):
        model(inputs, mode="predict")


def test_import_dinokit_stays_light() -> None:
    code = "import dinokit, dinokit.convert, sys; print(sorted({'transformers', 'timm', 'onnx', 'wandb'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------- CLI
PICO = BackboneSpec(embed_dim=64, depth=4, num_heads=4, patch_size=14, img_size=56)  # vit_pico's width and depth


def test_cli_round_trips_through_hf_and_timm(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = random_backbone(PICO)
    src = save_backbone(model, tmp_path / "src.pth")
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--model", "vit_pico"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.pth"), "--to", "official"]) == 0
    assert_bitwise_equal(torch.load(tmp_path / "back.pth"), model.state_dict())
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "t.safetensors"), "--to", "timm", "--model", "vit_pico"]) == 0
    # the printed way to load it runs as printed (it named an undefined `spec` for sizes timm has no name for)
    how = capsys.readouterr().out.strip().splitlines()[-1].split("; load with ", 1)[1]
    import safetensors.torch  # noqa: F401  (the printed expression reads the file with it)

    assert not any(eval(how, {"timm": timm, "torch": torch, "safetensors": safetensors}))  # no missing/unexpected keys
    got, layout, _ = read_backbone(tmp_path / "t.safetensors")
    assert layout == "timm" and torch.equal(got["blocks.1.attn.qkv.weight"], model.state_dict()["blocks.1.attn.qkv.weight"])
    assert main(["convert", str(src), str(tmp_path / "t.bin"), "--to", "timm"]) == 2
    assert "error: cannot save timm weights as 't.bin'; use a .pth or .safetensors file name" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_its_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = save_backbone(random_backbone(PICO), tmp_path / "mine.pth")
    (tmp_path / "sub").mkdir()
    before = src.read_bytes()
    for dst, to in ((src, "official"), (tmp_path / "sub" / ".." / "mine.pth", "safetensors"), (src, "timm")):
        assert main(["convert", str(src), str(dst), "--to", to]) == 2
        assert capsys.readouterr().err == f"error: the output '{dst}' is the input file; give another output path\n"
    assert src.read_bytes() == before
    # a Hugging Face folder converted onto itself, or onto its own weights file
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    weights = (tmp_path / "hf" / "model.safetensors").read_bytes()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "is the input folder; give another output path" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "hf" / "model.safetensors"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == weights


def test_cli_refuses_a_model_of_another_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = save_backbone(random_backbone(PICO), tmp_path / "pico.pth")
    for model, size in (("vit_large", "1024 and 24"), ("dinov2_vits14", "384 and 12"), ("vit_femto", "48 and 3")):
        assert main(["convert", str(src), str(tmp_path / "out.pth"), "--to", "official", "--model", model]) == 2
        assert capsys.readouterr().err == (f"error: --model {model} has embed_dim {size} blocks but the weights have 64 "
                                           "and 4; give the matching architecture (vit_pico) or leave --model out\n")
    # a width no named architecture has: no name to suggest
    odd = save_backbone(random_backbone(tiny_spec("plain")), tmp_path / "odd.pth")  # 64 wide, 2 blocks
    assert main(["convert", str(odd), str(tmp_path / "hf"), "--to", "hf", "--model", "vit_pico"]) == 2
    assert capsys.readouterr().err.endswith("give an architecture of that size or leave --model out\n")
    # a name that is neither a hub model nor an architecture: the same line as every other arch key
    assert main(["convert", str(src), str(tmp_path / "out.pth"), "--to", "official", "--model", "vit_huge"]) == 2
    assert capsys.readouterr().err.startswith("error: --model is 'vit_huge'; use one of: vit_pico, vit_nano, ")
    assert not (tmp_path / "out.pth").exists() and not (tmp_path / "hf").exists()
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--model", "vit_pico"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_attention_heads"] == 4


def test_cli_takes_the_output_as_out_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # every other command names its output with --out; typing it here was argparse's "unrecognized arguments"
    model = random_backbone(PICO)
    src = save_backbone(model, tmp_path / "src.pth")
    assert main(["convert", str(src), "--out", str(tmp_path / "a.safetensors"), "--to", "safetensors"]) == 0
    got, _, _ = read_backbone(tmp_path / "a.safetensors")
    assert_bitwise_equal(got, model.state_dict())
    assert main(["convert", str(src), str(tmp_path / "a.pth"), "--out", str(tmp_path / "a.pth"), "--to", "official"]) == 0
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "b.pth"), "--out", str(tmp_path / "c.pth"), "--to", "official"]) == 2
    assert capsys.readouterr().err == f"error: two outputs given ('{tmp_path / 'b.pth'}' and --out '{tmp_path / 'c.pth'}'); give one\n"
    assert main(["convert", str(src), "--to", "official"]) == 2
    assert capsys.readouterr().err == "error: no output given: dinokit convert SRC DST --to ... (or --out DST)\n"
    assert not (tmp_path / "b.pth").exists() and not (tmp_path / "c.pth").exists()


def test_cli_refuses_a_file_at_odds_with_itself_and_a_file_in_the_output_path(tmp_path: Path, capsys) -> None:
    # Seen: a file missing one block's MLP converted with exit 0 into an HF folder transformers could not load; an
    # output under a file ('e1.npz/c.pth') said "File exists".
    sd = random_backbone(PICO).state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.2.mlp.")}, tmp_path / "holed.pth")
    torch.save({**sd, "blocks.1.attn.qkv.weight": torch.zeros(192, 10)}, tmp_path / "odd.pth")
    for name, what in (("holed.pth", "4 missing key(s): blocks.2.mlp.fc1.weight, blocks.2.mlp.fc1.bias, "
                                     "blocks.2.mlp.fc2.weight, blocks.2.mlp.fc2.bias"),
                       ("odd.pth", "1 shape mismatch(es): blocks.1.attn.qkv.weight (192, 10) in file vs (192, 64) in "
                                   "model")):
        for to in ("hf", "official"):
            out = tmp_path / f"out_{to}"
            assert main(["convert", str(tmp_path / name), str(out), "--to", to, "--model", "vit_pico"]) == 2
            assert capsys.readouterr().err == (f"error: '{tmp_path / name}', read as embed_dim 64 with 4 blocks, does "
                                               f"not fit the model ({what})\n")
            assert not out.exists()
    (tmp_path / "e1.npz").write_text("mine")
    assert main(["convert", str(tmp_path / "odd.pth"), str(tmp_path / "e1.npz" / "c.pth"), "--to", "official"]) == 2
    assert capsys.readouterr().err == (f"error: the output '{tmp_path / 'e1.npz' / 'c.pth'}' cannot be created: "
                                       f"'{tmp_path / 'e1.npz'}' is a file; give a path you can write to\n")
    assert (tmp_path / "e1.npz").read_text() == "mine"


@pytest.mark.parametrize("to", ["safetensors", "hf"])
def test_a_conversion_into_an_output_another_one_is_writing_is_one_line(tmp_path: Path, capsys, to) -> None:
    """Two conversions into one output both said they wrote it, one's weights lost: the second is now refused while
    the first holds the output's lock (here: this live process), and the output is left as it was."""
    import os
    import socket

    src = save_backbone(create_model("dinov2_vits14", embed_dim=32, depth=1, num_heads=2), tmp_path / "s.pth")
    out = tmp_path / ("o.safetensors" if to == "safetensors" else "hf")
    lock = out / ".dinokit.lock" if to == "hf" else tmp_path / ".o.safetensors.lock"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")
    assert main(["convert", str(src), str(out), "--to", to]) == 2
    assert capsys.readouterr().err == (f"error: another run (process {os.getpid()} on {socket.gethostname()}) is "
                                       f"writing to {out}; wait for it to end or give another output (if that "
                                       f"process is gone, delete {lock})\n")
    assert lock.is_file() and sorted(p.name for p in lock.parent.iterdir() if p.name.startswith(("o.", "model",
                                                                                                  "config"))) == []
