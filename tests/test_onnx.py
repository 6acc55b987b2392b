"""ONNX export: static graphs equal PyTorch, dynamic graphs within the stated tolerance at any size, broken models
refused, and the resampling that makes the dynamic graph exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinokit.cli import main
from dinokit.errors import DinokitError
from dinokit.export.onnx import DEFAULT_TOLERANCE, ExportableBackbone, export_onnx
from dinokit.export.resample import resample_grid
from dinokit.models import build_backbone

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def pico(registers: int = 0, seed: int = 0):
    """vit_pico with patch 8 and random weights everywhere, in the released interpolation convention."""
    interp = dict(interpolate_antialias=True, interpolate_offset=0.0) if registers else {}
    model = build_backbone("vit_pico", patch_size=8, img_size=64, num_register_tokens=registers, init_values=1.0, **interp)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def run_onnx(path: Path, image: torch.Tensor) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {"image": image.numpy()})]


def reference(model, image: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.forward_features(image)
    refs = [out["x_norm_clstoken"], out["x_norm_patchtokens"]]
    return refs + [out["x_norm_regtokens"]] if model.num_register_tokens else refs


@pytest.mark.parametrize(("size", "offset", "antialias"), [
    ((16, 16), 0.1, False), ((5, 9), 0.1, False), ((37, 37), 0.1, False), ((60, 44), 0.0, True), ((5, 9), 0.0, True),
])
def test_resample_grid_equals_interpolate(size, offset, antialias) -> None:
    grid = torch.randn(1, 8, 37, 37, generator=torch.Generator().manual_seed(0))
    kwargs = {"scale_factor": tuple((s + offset) / 37 for s in size)} if offset else {"size": size}
    expected = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    got = resample_grid(grid, *size, antialias=antialias, offset=offset)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=5e-5, rtol=0)  # float32 rounding of the source coordinates


@pytest.mark.parametrize("registers", [0, 4])
def test_static_export_is_exact(tmp_path: Path, registers: int) -> None:
    model = pico(registers)
    report = export_onnx(model, tmp_path / "m.onnx", image_size=(48, 80))
    assert report.max_error < 2e-6
    image = torch.randn(3, 3, 48, 80)  # another batch size: the batch stays free in a static graph
    for got, expected in zip(run_onnx(tmp_path / "m.onnx", image), reference(model, image)):
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("registers", [0, 4])
def test_dynamic_export_within_tolerance_at_other_sizes(tmp_path: Path, registers: int) -> None:
    model = pico(registers)
    report = export_onnx(model, tmp_path / "d.onnx", image_size=(64, 64), dynamic=True)
    assert set(report.errors) >= {"cls_token@64x64", "cls_token@80x56", "patch_tokens@69x71"}
    assert report.max_error <= DEFAULT_TOLERANCE
    # the native square grid (no interpolation in PyTorch), shrinking and stretching; sizes that are not whole
    # patches are centre-cropped as the model does (the graph kept the top-left corner: relative error 1.4)
    for shape in [(1, 3, 64, 64), (2, 3, 32, 96), (1, 3, 120, 40), (1, 3, 37, 45), (2, 3, 70, 66)]:
        image = torch.randn(*shape)
        for got, expected in zip(run_onnx(tmp_path / "d.onnx", image), reference(model, image)):
            assert got.shape == expected.shape
            assert (got - expected).abs().max() <= DEFAULT_TOLERANCE * expected.abs().max()


def test_export_refuses_a_broken_model(tmp_path: Path) -> None:
    model = pico()
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[0, 0] = float("nan")
    with pytest.raises(DinokitError, match=r"the exported graph differs from PyTorch .*m\.onnx was not written"):
        export_onnx(model, tmp_path / "m.onnx", image_size=(64, 64))
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(DinokitError, match="not a multiple of the patch size 8; use e.g. 72x64"):  # the nearest
        ExportableBackbone(pico(), (70, 64))
    with pytest.raises(DinokitError, match="not a multiple of the patch size 8; use e.g. 8x8"):  # it said 0x0
        ExportableBackbone(pico(), (5, 5))


def test_cli_exports_a_training_run(tmp_path: Path, demo_teacher, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo.onnx"
    code = main(["export", "onnx", "--config-file", str(demo_teacher.config_file), "--weights", str(demo_teacher.snapshot),
                 "--image-size", "64", "64", "--out", str(out)])
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "onnxruntime vs PyTorch, cls_token@64x64: max relative error" in printed
    assert f"exported vit_pico/8 (static 64x64) to {out}" in printed  # the run's architecture (it said None)
    out.unlink()  # the config found beside the weights: the same line
    assert main(["export", "onnx", "--weights", str(demo_teacher.snapshot), "--image-size", "64", "64", "--out",
                 str(out)]) == 0
    assert f"exported vit_pico/8 (static 64x64) to {out}" in capsys.readouterr().out
    assert main(["export", "onnx", "--model", "dinov2_vits14", "--random-init", "--image-size", "64", "64",
                 "--out", str(tmp_path / "x.txt")]) == 2
    assert "error: the output must be a .onnx file, not 'x.txt'" in capsys.readouterr().err
    # another export writing --out (its lock names a live process: this one) is one line, the file left alone; two
    # exports at once both said they wrote it, one graph lost
    import os
    import socket

    lock = tmp_path / ".demo.onnx.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")
    before = out.read_bytes()
    assert main(["export", "onnx", "--weights", str(demo_teacher.snapshot), "--image-size", "32", "32", "--out",
                 str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"error: another run (process {os.getpid()} on {socket.gethostname()}) is "
                                       f"writing to {out}; wait for it to end or give another --out (if that process "
                                       f"is gone, delete {lock})\n")
    assert out.read_bytes() == before and lock.is_file()


def test_cli_refuses_bad_sizes_and_tolerance_up_front(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Checked before the model is built (a missing weights file is never opened) and nothing is written."""
    common = ["export", "onnx", "--model", "dinov2_vits14", "--weights", str(tmp_path / "missing.pth"),
              "--out", str(tmp_path / "sub" / "x.onnx")]
    assert main([*common, "--image-size", "0", "32"]) == 2
    assert capsys.readouterr().err == "error: --image-size must be positive multiples of the model's patch size, got 0x32\n"
    assert main([*common, "--image-size", "28", "-14"]) == 2
    assert "got 28x-14" in capsys.readouterr().err
    assert main([*common, "--image-size", "28", "28", "--tolerance", "-1"]) == 2
    assert capsys.readouterr().err == (f"error: --tolerance is a relative error: it must be >= 0 (default "
                                       f"{DEFAULT_TOLERANCE:g}), got -1\n")
    assert not (tmp_path / "sub").exists()
