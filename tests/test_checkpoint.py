"""Checkpoint I/O: formats, layouts, strict loading with useful errors, safe unpickling, URLs via the hub cache."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch

from dinokit.errors import DinokitError
from dinokit.models import (
    DinoVisionTransformer,
    backbone_state_dict_from_checkpoint,
    build_backbone,
    create_model,
    load_backbone_weights,
    load_state_dict_file,
    save_backbone,
)


def tiny_vit(seed: int = 0, **overrides) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    kwargs = dict(img_size=56, patch_size=14, embed_dim=32, depth=4, num_heads=2, init_values=1.0)
    return DinoVisionTransformer(**{**kwargs, **overrides}).eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch.hub cache; downloads are forbidden unless a test allows them."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "hub"


# ------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_and_load_round_trip(tmp_path: Path, suffix: str) -> None:
    model = tiny_vit(seed=1, num_register_tokens=4)
    path = save_backbone(model, tmp_path / "sub" / f"backbone{suffix}")
    assert sorted(os.listdir(path.parent)) == [path.name]  # written atomically: no temporary file left
    raw = load_state_dict_file(path)
    assert sorted(raw) == sorted(model.state_dict())  # flat official layout
    other = load_backbone_weights(tiny_vit(seed=2, num_register_tokens=4), path)
    assert_same_weights(model, other)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)


def test_save_rejects_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(DinokitError, match=r"use a \.safetensors or \.pth"):
        save_backbone(tiny_vit(), tmp_path / "weights.bin")


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 32), "payload": Payload()}, path)
    with pytest.raises(DinokitError, match="contains arbitrary Python objects .* will not be unpickled") as err:
        load_state_dict_file(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("garbage.pth", b"not a checkpoint at all" * 4, "corrupt or truncated"),
        ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "not a valid .safetensors"),
    ],
)
def test_corrupt_files_give_one_line_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DinokitError, match=message) as err:
        load_state_dict_file(path)
    assert "\n" not in str(err.value)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    good = save_backbone(tiny_vit(), tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DinokitError, match="corrupt or truncated"):
        load_state_dict_file(truncated)
    with pytest.raises(DinokitError, match="does not exist; check the path"):
        load_backbone_weights(tiny_vit(), tmp_path / "missing.pth")


# ------------------------------------------------------------------------------------------- URLs
def test_url_is_read_from_the_hub_cache_without_download(hub_dir: Path) -> None:
    model = tiny_vit(seed=3)
    save_backbone(model, hub_dir / "checkpoints" / "tiny_pretrain.pth")
    save_backbone(model, hub_dir / "checkpoints" / "tiny.safetensors")
    for url in ("https://example.invalid/dinov2/tiny_pretrain.pth", "https://example.invalid/tiny.safetensors"):
        assert_same_weights(model, load_backbone_weights(tiny_vit(seed=4), url))


def test_file_url_is_downloaded_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    model = tiny_vit(seed=5)
    source = save_backbone(model, tmp_path / "remote" / "tiny_file.pth")
    loaded = load_backbone_weights(tiny_vit(), source.as_uri())
    assert (tmp_path / "hub" / "checkpoints" / "tiny_file.pth").is_file()
    assert_same_weights(model, loaded)
    source.unlink()  # the second load must come from the cache
    assert_same_weights(model, load_backbone_weights(tiny_vit(), source.as_uri()))


def test_download_failure_is_a_one_line_error(hub_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DinokitError, match="could not download .*pass its local path") as info, torch.device("meta"):
        create_model("dinov2_vits14", pretrained=True)
    # the place named for a file fetched by other means is where the next load looks (Python callers have no --weights)
    cached = hub_dir / "checkpoints" / "dinov2_vits14_pretrain.pth"
    assert f"put it at {cached} (found there from then on)" in str(info.value)
    torch.save(create_model("dinov2_vits14", pretrained=False).state_dict(), cached)
    create_model("dinov2_vits14", pretrained=True)  # no download attempted: the monkeypatched one would raise
    with pytest.raises(DinokitError, match="could not download"):
        load_state_dict_file("https://example.invalid/weights.safetensors")


# ------------------------------------------------------------------------------------------- layouts
def chunked(sd: dict, chunks: int, depth: int) -> dict:
    """Training-time keys: block i lives at blocks.<i // chunk size>.<i>."""
    size = depth // chunks
    out = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            index, rest = key.split(".", 2)[1:]
            key = f"blocks.{int(index) // size}.{index}.{rest}"
        out[key] = value
    return out


def test_layouts_are_normalised_to_the_official_one() -> None:
    sd = tiny_vit(seed=6).state_dict()
    head = {"mlp.0.weight": torch.zeros(8, 32), "last_layer.weight_g": torch.ones(16, 1)}
    teacher = {
        "teacher": {
            **{f"backbone.{k}": v for k, v in chunked(sd, chunks=2, depth=4).items()},
            **{f"dino_head.{k}": v for k, v in head.items()},
            **{f"ibot_head.{k}": v for k, v in head.items()},
        }
    }
    assert "backbone.blocks.1.3.ls2.gamma" in teacher["teacher"]
    layouts = {
        "flat": sd,
        "teacher_checkpoint": teacher,
        "model wrapper + DDP": {"model": {f"module.{k}": v for k, v in sd.items()}, "iteration": 10},
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "student and teacher": {
            **{f"student.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()},
            **{f"teacher.backbone.{k}": v for k, v in sd.items()},
        },
    }
    for name, checkpoint in layouts.items():
        out = backbone_state_dict_from_checkpoint(checkpoint)
        assert list(out) == list(sd), name
        assert all(out[k] is sd[k] for k in sd), name  # a filter: no copies
    assert "backbone.blocks.1.3.ls2.gamma" in teacher["teacher"]  # the input is not modified
    with pytest.raises(DinokitError) as err:
        backbone_state_dict_from_checkpoint({"optimizer": {"state": {}}, "iteration": 3})
    assert str(err.value) == ("the checkpoint holds no ViT backbone tensors (its keys: optimizer, iteration); give a "
                              "backbone file (hub layout, teacher_checkpoint.pth, .safetensors)")


def test_files_without_vit_tensors_and_folders_are_named(tmp_path: Path) -> None:
    """F11: no 'embed_dim None and None blocks', no 'does not exist' for a folder that exists."""
    from safetensors.torch import save_file

    from dinokit.models.weight_files import check_weights_path

    wrong = tmp_path / "wrong.safetensors"
    save_file({f"wrong.key{i}": torch.randn(2, 2) for i in range(6)}, str(wrong))
    with pytest.raises(DinokitError) as err:
        load_backbone_weights(tiny_vit(), wrong)
    assert str(err.value) == (f"'{wrong}' holds no ViT backbone tensors (its keys: wrong.key0, wrong.key1, wrong.key2, "
                              "wrong.key3 (+2 more)); give a backbone file (hub layout, teacher_checkpoint.pth, "
                              ".safetensors)")
    assert "None" not in str(err.value)

    run = tmp_path / "run"
    for iteration in (9, 10):  # the newest snapshot by number, not by name
        save_backbone(tiny_vit(), run / "eval" / f"training_{iteration}" / "teacher_checkpoint.pth")
    with pytest.raises(DinokitError) as err:
        check_weights_path(str(run), "--weights")
    assert str(err.value) == (f"--weights '{run}' is a folder, not a weights file; give the file, e.g. "
                              f"'{run / 'eval' / 'training_10' / 'teacher_checkpoint.pth'}'")
    with pytest.raises(DinokitError) as err:  # the loader itself, for every command
        load_backbone_weights(tiny_vit(), tmp_path / "run" / "eval")
    assert str(err.value) == (f"checkpoint '{run / 'eval'}' is a folder, not a weights file; give the weights file "
                              "(.pth, .pt or .safetensors)")
    assert check_weights_path(str(wrong)) == wrong
    # a distillation into several students keeps each one's snapshots in its own subfolder
    several = tmp_path / "distilled"
    for student in ("femto", "nano"):
        save_backbone(tiny_vit(), several / student / "eval" / "training_5" / "teacher_checkpoint.pth")
    with pytest.raises(DinokitError) as err:
        check_weights_path(str(several), "--weights")
    assert str(err.value).startswith(f"--weights '{several}' is a folder, not a weights file; it holds the students "
                                     f"femto, nano: give one's snapshot, e.g. '{several}")


def test_teacher_checkpoint_file_loads_strictly(tmp_path: Path) -> None:
    model = tiny_vit(seed=7)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in chunked(model.state_dict(), 4, 4).items()}}, path)
    assert_same_weights(model, load_backbone_weights(tiny_vit(), path))


# ------------------------------------------------------------------------------------------- mismatches
def mismatch_message(model: torch.nn.Module, sd: dict) -> str:
    with pytest.raises(DinokitError) as err:
        load_backbone_weights(model, sd)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_register_mismatch_says_which_model_to_use() -> None:
    message = mismatch_message(tiny_vit(), tiny_vit(num_register_tokens=4).state_dict())
    assert "1 unexpected key(s): register_tokens" in message
    assert "register model (4 register_tokens)" in message and "num_register_tokens=4" in message
    message = mismatch_message(tiny_vit(num_register_tokens=4), tiny_vit().state_dict())
    assert "1 missing key(s): register_tokens" in message and "has no register_tokens" in message


def test_size_mismatch_names_the_hub_model() -> None:
    with torch.device("meta"):  # shapes only: no memory, no init
        vitl_reg = create_model("dinov2_vitl14_reg").state_dict()
        vits = create_model("dinov2_vits14")
    message = mismatch_message(vits, vitl_reg)
    assert message.endswith(
        "the file holds a ViT with embed_dim 1024 and 24 blocks; the model has 384 and 12: use dinov2_vitl14_reg"
    )
    assert "(+" in message  # long key lists are truncated with a count
    assert "shape mismatch(es): cls_token (1, 1, 1024) in file vs (1, 1, 384) in model" in message


def test_other_mismatch_hints() -> None:
    assert "build with img_size=56" in mismatch_message(tiny_vit(img_size=98), tiny_vit().state_dict())
    assert "build with init_values=1.0" in mismatch_message(tiny_vit(init_values=None), tiny_vit().state_dict())
    assert "ffn_layer='swiglufused'" in mismatch_message(tiny_vit(), tiny_vit(ffn_layer="swiglufused").state_dict())
    sd = dict(tiny_vit().state_dict())
    del sd["mask_token"]  # released files have it; strict loading insists
    assert "1 missing key(s): mask_token" in mismatch_message(tiny_vit(), sd)


def test_build_backbone_on_meta_device_is_cheap() -> None:
    with torch.device("meta"):
        model = build_backbone("vit_giant2", patch_size=14, img_size=518, ffn_layer="swiglufused", init_values=1.0)
    assert model.blocks[0].mlp.w12.weight.shape == (8192, 1536)


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """A denied write (convert into a read-only place) ended in torch's RuntimeError; the temporary file is opened
    first, so the OSError says why, and the advice fits the cause."""
    import errno
    from pathlib import Path

    from dinokit.errors import DinokitError
    from dinokit.files import atomic_write

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "touch", denied)
    with pytest.raises(DinokitError, match=r"permission denied while writing .*x\.pth; the partial file was removed "
                                           r"and nothing else was changed: write to a folder you may write to"):
        with atomic_write(tmp_path / "x.pth") as tmp:
            torch.save({}, tmp)
    assert not (tmp_path / "x.pth").exists()


def test_a_failed_download_prints_nothing_but_the_error(hub_dir: Path, tmp_path: Path,
                                                        capfd: pytest.CaptureFixture) -> None:
    """torch.hub's loader printed 'Downloading: ...' before the one-line error; a damaged download names the cache."""
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as m:
        m.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("off")))
        with pytest.raises(DinokitError, match="could not download"):
            load_state_dict_file("https://example.invalid/dinov2/w.pth")
    assert capfd.readouterr() == ("", "")
    damaged = tmp_path / "remote" / "damaged.pth"
    damaged.parent.mkdir()
    damaged.write_bytes(b"PK\x03\x04 not a checkpoint")
    with monkeypatch.context() as m:
        m.setattr(torch.hub, "download_url_to_file", lambda url, dst, **k: Path(dst).write_bytes(damaged.read_bytes()))
        with pytest.raises(DinokitError) as info:
            load_state_dict_file(damaged.as_uri())
    cached = hub_dir / "checkpoints" / "damaged.pth"
    assert str(info.value).startswith(f"cannot read checkpoint {str(cached)!r}: the file is corrupt or truncated")
    assert str(info.value).endswith(f"it was downloaded from {damaged.as_uri()}: delete {str(cached)!r} to download it again")


def test_a_url_given_from_python_is_advised_in_python_terms(hub_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL the caller gave (not an official file) was advised '--weights FILE (or use --random-init)' in Python."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(
        urllib.error.URLError("offline")))
    url = "https://example.invalid/mine.pth"
    advice = "give the local file's path instead of the URL (or build random weights with pretrained=False)"
    for load in (lambda: create_model("dinov2_vits14", weights=url), lambda: load_backbone_weights(tiny_vit(), url)):
        with pytest.raises(DinokitError) as info:
            load()
        assert str(info.value).startswith(f"could not download {url} (") and str(info.value).endswith(advice)
    from dinokit.models.weight_files import COMMAND_LINE

    command = COMMAND_LINE.set(True)  # as the commands run: their options
    try:
        with pytest.raises(DinokitError, match=r"or pass its local path with --weights FILE \(or use --random-init\)$"):
            load_backbone_weights(tiny_vit(), url)
    finally:
        COMMAND_LINE.reset(command)
