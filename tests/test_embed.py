"""``dinokit embed`` end to end (the feature extraction under it: ``test_features.py``)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dinokit.cli import main
from dinokit.data import make_classification_eval_transform
from dinokit.models import create_model, save_backbone
from dinokit.models import registry


TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=56)
GOOD = ("a.png", "b.jpg", "sub/c.png", "sub/d.bmp", "sub/deeper/e.png")
BAD = ("broken.png", "sub/fake.jpg")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """5 readable images (various sizes and modes), a truncated PNG, a text file named .jpg, and a .txt."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i, name in enumerate(GOOD):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, size=(40 + 10 * i, 70 - 5 * i, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        (image.convert("L") if i == 3 else image).save(path)
    png = (root / "a.png").read_bytes()
    (root / "broken.png").write_bytes(png[: len(png) // 2])
    (root / "sub" / "fake.jpg").write_text("this is not an image")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


@pytest.fixture
def weights(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model("dinov2_vits14", **TINY).eval()
    return model, save_backbone(model, tmp_path / "tiny.safetensors")


@pytest.fixture(autouse=True)
def tiny_hub_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub names build a tiny backbone here (the architecture under test is the same, only smaller)."""
    real = registry.create_model
    monkeypatch.setattr(registry, "create_model", lambda name, **kwargs: real(name, **kwargs, **TINY))


def embed(*args: str) -> int:
    return main(["embed", *args, "--image-size", "56", "--num-workers", "0", "--device", "cpu", "--no-progress"])


def expected_cls(model: torch.nn.Module, root: Path, names) -> np.ndarray:
    transform = make_classification_eval_transform(crop_size=56)
    batch = torch.stack([transform(Image.open(root / n).convert("RGB")) for n in names])
    with torch.no_grad():
        return model(batch).numpy()


def test_npz_holds_every_output_and_lists_bad_images(images, weights, tmp_path, capsys) -> None:
    model, weights_file = weights
    out = tmp_path / "out" / "emb.npz"
    assert embed(str(images), "--weights", str(weights_file), "--out", str(out), "--patch-mean", "--patch-tokens") == 0
    data = np.load(out)
    assert sorted(data.files) == ["bad_paths", "cls", "patch_mean", "patch_tokens", "paths"]
    assert list(data["paths"]) == [str(images / n) for n in sorted(GOOD)]
    assert sorted(data["bad_paths"]) == sorted(str(images / n) for n in BAD)
    assert data["cls"].shape == (5, 32) and data["cls"].dtype == np.float32
    assert data["patch_mean"].shape == (5, 32)
    assert data["patch_tokens"].shape == (5, 16, 32)  # 56 px / 14 = 4 x 4 patches
    np.testing.assert_allclose(data["patch_tokens"].mean(axis=1), data["patch_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data["cls"], expected_cls(model, images, sorted(GOOD)), rtol=1e-4, atol=1e-5)
    summary = capsys.readouterr().out
    assert "embedded 5 images" in summary and "images/s" in summary
    assert "cls: (5, 32)  patch_mean: (5, 32)  patch_tokens: (5, 16, 32)" in summary
    # the warnings named each file with its reason; the summary says where the whole list is, without repeating it
    assert f"skipped 2 unreadable image(s), all listed in {out} ('bad_paths')" in summary
    assert "broken.png" not in summary
    assert f"wrote {out}" in summary


def test_npy_and_parquet_outputs_agree(images, weights, tmp_path, capsys) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _, weights_file = weights
    common = ("--weights", str(weights_file))
    assert embed(str(images), *common, "--out", str(tmp_path / "e.npz"), "--patch-mean") == 0
    assert embed(str(images), *common, "--out", str(tmp_path / "e.npy")) == 0
    assert f"skipped 2 unreadable image(s), all listed in {tmp_path / 'e.bad.txt'}" in capsys.readouterr().out
    # the .parquet keeps its bad images in its metadata: the .npy's e.bad.txt is neither refused nor touched
    # (it was shared, and an --overwrite parquet run with no bad image deleted it)
    before = (tmp_path / "e.bad.txt").read_bytes()
    assert embed(str(images), *common, "--out", str(tmp_path / "e.parquet"), "--patch-mean") == 0
    assert f"all listed in {tmp_path / 'e.parquet'} (metadata 'bad_paths', JSON)" in capsys.readouterr().out
    assert embed(str(images / "a.png"), *common, "--out", str(tmp_path / "e.parquet"), "--overwrite") == 0
    assert (tmp_path / "e.bad.txt").read_bytes() == before
    assert embed(str(images), *common, "--out", str(tmp_path / "e.parquet"), "--patch-mean", "--overwrite") == 0
    ref = np.load(tmp_path / "e.npz")
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), ref["cls"])
    assert (tmp_path / "e.paths.txt").read_text().splitlines() == list(ref["paths"])
    assert sorted((tmp_path / "e.bad.txt").read_text().splitlines()) == sorted(ref["bad_paths"])
    table = pq.read_table(tmp_path / "e.parquet")
    assert sorted(json.loads(table.schema.metadata[b"bad_paths"])) == sorted(ref["bad_paths"])
    assert table.column_names == ["path", "cls", "patch_mean"]
    assert table.column("path").to_pylist() == list(ref["paths"])
    np.testing.assert_array_equal(np.array(table.column("cls").to_pylist(), dtype=np.float32), ref["cls"])
    np.testing.assert_array_equal(np.array(table.column("patch_mean").to_pylist(), dtype=np.float32), ref["patch_mean"])
    # fixed-size lists: no 32-bit offsets, which a list column of more than 2^31 values overflowed (pyarrow refused it
    # after the whole extraction)
    for name in ("cls", "patch_mean"):
        kind = table.schema.field(name).type
        assert str(kind.value_type) == "float" and kind.list_size == ref[name].shape[1], kind
    # a <stem>.bad.txt beside a .parquet (a .npy's, moved away, an older dinokit's parquet list, a user's file) is
    # never deleted (it was, from 2f0dd84 to 5c4c19b); one note says it is not this run's list
    (tmp_path / "old.bad.txt").write_text("mine\n")
    capsys.readouterr()
    assert embed(str(images / "a.png"), *common, "--out", str(tmp_path / "old.parquet")) == 0
    assert (tmp_path / "old.bad.txt").read_text() == "mine\n"
    assert (f"note: {tmp_path / 'old.bad.txt'} is not this run's list of unreadable images (those are in the "
            ".parquet's metadata 'bad_paths'); it was left as it was") in capsys.readouterr().out


def test_the_lists_beside_a_npy_are_replaced_only_when_asked(images, weights, tmp_path, capsys) -> None:
    """A .npy's <stem>.paths.txt and <stem>.bad.txt were written (or the .bad.txt deleted) over a user's files of
    those names without --overwrite, e.g. the input list itself."""
    _, weights_file = weights
    listing = tmp_path / "l.paths.txt"
    listing.write_text("# my list\n" + "".join(f"{images / name}\n" for name in GOOD))
    notes = tmp_path / "q.bad.txt"
    notes.write_text("my notes")
    for source, out in ((str(listing), "l.npy"), (str(images / GOOD[0]), "q.npy")):
        assert embed(source, "--weights", str(weights_file), "--out", str(tmp_path / out)) == 2
        err = capsys.readouterr().err
        assert "already exists" in err and "; pass --overwrite to replace it, or give another name" in err
    assert listing.read_text().startswith("# my list") and notes.read_text() == "my notes"
    assert not (tmp_path / "l.npy").exists() and not (tmp_path / "q.npy").exists()
    assert embed(str(images / GOOD[0]), "--weights", str(weights_file), "--out", str(tmp_path / "q.npy"), "--overwrite") == 0
    assert not notes.exists()  # asked: no bad image, so the stale list goes
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(images / GOOD[0], odd / "a\nb.png")  # its name was two lines of paths.txt: rows no longer matched
    assert embed(str(odd), "--weights", str(weights_file), "--out", str(tmp_path / "o.npy")) == 2
    assert capsys.readouterr().err == (f"error: the image name {str(odd) + '/a' + chr(10) + 'b.png'!r} holds a line "
                                       "feed, which o.paths.txt cannot list one per line (row i of the array is line "
                                       "i); rename it, or write .npz or .parquet\n")
    assert not (tmp_path / "o.npy").exists()
    (tmp_path / "f.paths.txt").mkdir()  # failed after the work, naming a hidden temporary
    for extra in ((), ("--overwrite",)):
        assert embed(str(images / GOOD[0]), "--weights", str(weights_file), "--out", str(tmp_path / "f.npy"),
                     *extra) == 2
        assert capsys.readouterr().err == (f"error: {str(tmp_path / 'f.paths.txt')!r} is a folder, where the list "
                                           "beside --out 'f.npy' goes; move it, or give another --out\n")
    assert not (tmp_path / "f.npy").exists()


def test_a_npy_replaces_the_earlier_one_only_once_it_and_its_lists_are_written(images, weights, tmp_path, capsys,
                                                                              monkeypatch) -> None:
    """Killed between its two files, an embed left a complete .npy without its paths (rows nobody could map back to
    images); later --overwrite deleted the earlier array first, so a full disk in the new one lost both. The array is
    now written aside first, then its lists, then it replaces the earlier one."""
    _, weights_file = weights
    out = tmp_path / "k.npy"
    with monkeypatch.context() as stopped:
        stopped.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert embed(str(images), "--weights", str(weights_file), "--out", str(out)) == 130
    assert not list(tmp_path.glob("*k.*"))  # nothing half-done
    assert embed(str(images), "--weights", str(weights_file), "--out", str(out)) == 0
    earlier = np.load(out)
    assert len(earlier) == len((tmp_path / "k.paths.txt").read_text().splitlines())
    # replaced (--overwrite) by one image's and stopped in the array: the earlier array and its list are kept
    with monkeypatch.context() as stopped:
        stopped.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        assert embed(str(images / GOOD[0]), "--weights", str(weights_file), "--out", str(out), "--overwrite") == 2
    assert "no space left on" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(out), earlier)
    assert len((tmp_path / "k.paths.txt").read_text().splitlines()) == len(earlier)
    # a list without its array (left by an older dinokit killed between them) is not replaced without --overwrite
    out.unlink()
    capsys.readouterr()
    assert embed(str(images), "--weights", str(weights_file), "--out", str(out)) == 2
    assert capsys.readouterr().err == (f"error: {str(tmp_path / 'k.paths.txt')!r} already exists, without 'k.npy' (an "
                                       "embed stopped before writing it, which comes last, leaves that); pass "
                                       "--overwrite to replace it, or give another name\n")
    assert embed(str(images / GOOD[0]), "--weights", str(weights_file), "--out", str(out), "--overwrite") == 0
    assert len(np.load(out)) == len((tmp_path / "k.paths.txt").read_text().splitlines()) == 1


def test_more_workers_than_cores_are_lowered_with_one_line(images, weights, tmp_path, monkeypatch, capsys) -> None:
    """--num-workers above the cores this process may use is lowered as train.num_workers is; same embeddings."""
    import os

    _, weights_file = weights
    assert embed(str(images), "--weights", str(weights_file), "--out", str(tmp_path / "a.npz")) == 0
    capsys.readouterr()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert main(["embed", str(images), "--weights", str(weights_file), "--out", str(tmp_path / "b.npz"),
                 "--image-size", "56", "--num-workers", "3", "--device", "cpu", "--no-progress"]) == 0
    assert ("note: --num-workers=3 is more than the 1 CPU core(s) this process may use: 1 data-loading worker(s)"
            in capsys.readouterr().out)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["cls"], np.load(tmp_path / "b.npz")["cls"])


def test_list_file_and_single_image_inputs(images, weights, tmp_path) -> None:
    _, weights_file = weights
    listing = tmp_path / "list.txt"
    listing.write_text("# two images\nimages/a.png\n\nimages/sub/c.png\n")
    assert embed(str(listing), "--weights", str(weights_file), "--out", str(tmp_path / "l.npz")) == 0
    assert np.load(tmp_path / "l.npz")["cls"].shape == (2, 32)
    assert embed(str(images / "a.png"), "--weights", str(weights_file), "--out", str(tmp_path / "one.npz")) == 0
    one = np.load(tmp_path / "one.npz")
    np.testing.assert_array_equal(one["cls"][0], np.load(tmp_path / "l.npz")["cls"][0])
    assert one["bad_paths"].shape == (0,)


def test_official_weights_come_from_the_hub_cache(images, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, *a, **k: pytest.fail(f"download of {url}"))
    torch.manual_seed(3)
    cached = create_model("dinov2_vits14_reg", **TINY).eval()
    save_backbone(cached, tmp_path / "hub" / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth")
    assert embed(str(images / "a.png"), "--model", "dinov2_vits14_reg", "--out", str(tmp_path / "o.npz")) == 0
    np.testing.assert_allclose(np.load(tmp_path / "o.npz")["cls"], expected_cls(cached, images, ["a.png"]), atol=1e-5)
    assert "dinov2_vits14_reg (official weights)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing_dir"], "error: input path 'missing_dir' does not exist"),
        (["{empty}"], "error: no images found under"),
        (["{images}", "--model", "dinov2_vitz14"], "error: unknown model 'dinov2_vitz14'; did you mean dinov2_vits14"),
        (["{images}", "--patch-tokens", "--out", "x.npy"], "error: a .npy file holds the class tokens only"),
        (["{images}", "--out", "x.h5"], "error: --out 'x.h5' has an unknown extension"),
        (["{images}", "--model", "dinov2_vits14_lc"], "error: dinov2_vits14_lc is a classifier"),
    ],
)
def test_user_errors_are_one_line(images, tmp_path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    args = [a.format(images=images, empty=tmp_path / "empty") for a in args]
    if "--out" not in args:
        args += ["--out", "emb.npz"]
    assert embed(*args, "--random-init") == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "emb.npz").exists()


def test_all_images_unreadable_is_an_error(images, tmp_path, capsys) -> None:
    listing = tmp_path / "bad.txt"
    listing.write_text("".join(f"{images / n}\n" for n in BAD))
    assert embed(str(listing), "--random-init", "--out", str(tmp_path / "x.npz")) == 2
    assert "none of the 2 images could be read" in capsys.readouterr().err


def test_embed_compile_option_writes_the_eager_embeddings(images, weights, tmp_path, monkeypatch) -> None:
    from torch._dynamo.testing import CompileCounter

    _, path = weights
    assert embed(str(images), "--weights", str(path), "--out", str(tmp_path / "eager.npz")) == 0
    counter, real_compile = CompileCounter(), torch.compile
    seen = {}

    def counting_compile(fn, **kwargs):  # inductor would take a minute on a CPU: count the graphs instead
        seen.update(kwargs)
        return real_compile(fn, **{**kwargs, "backend": counter})

    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()
    assert embed(str(images), "--weights", str(path), "--out", str(tmp_path / "compiled.npz"), "--compile",
                 "--batch-size", "3") == 0
    assert seen == {"backend": "inductor", "dynamic": False} and counter.frame_count == 1
    eager, compiled = np.load(tmp_path / "eager.npz"), np.load(tmp_path / "compiled.npz")
    assert compiled["paths"].tolist() == eager["paths"].tolist()
    np.testing.assert_allclose(compiled["cls"], eager["cls"], rtol=1e-5, atol=1e-5)


def test_config_file_builds_the_backbone_of_a_training_run(images, tmp_path, capsys) -> None:
    config_mod = pytest.importorskip("dinokit.config")
    from dinokit.eval.setup import build_eval_backbone

    config = tmp_path / "run" / "config.yaml"
    config.parent.mkdir()
    config.write_text(
        "student:\n  arch: vit_pico\n  patch_size: 14\ncrops:\n  global_crops_size: 56\n  local_crops_size: 28\n"
    )
    torch.manual_seed(4)
    model = build_eval_backbone(config_mod.load_config(str(config))).eval()
    checkpoint = tmp_path / "run" / "eval" / "training_9" / "teacher_checkpoint.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    out = tmp_path / "run.npz"
    run = ("--config-file", str(config), "--weights", str(checkpoint), "--out", str(out))
    assert embed(str(images / "a.png"), *run) == 0
    np.testing.assert_allclose(np.load(out)["cls"], expected_cls(model, images, ["a.png"]), rtol=1e-4, atol=1e-5)
    assert embed(str(images), "--config-file", str(config), "--out", str(tmp_path / "other.npz")) == 2
    assert "--config-file needs --weights" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "w.pth", "--random-init"], "error: --random-init and --weights contradict each other; give one"),
        (["--random-init", "--num-workers", "-1"], "error: --num-workers must be >= 0, got -1"),
        (["--random-init", "--image-size", "7"],  # was a ValueError traceback from the patch crop
         "error: --image-size 7 is smaller than the model's 14-pixel patch; use at least 14"),
        (["--weights", "."], "error: --weights '.' is a folder, not a weights file; give the file, e.g. 'w.pth'"),
        (["--weights", "nosuch.pth"], "error: --weights 'nosuch.pth' does not exist; check the path"),
        (["--weights", "wrong.safetensors"], "error: 'wrong.safetensors' holds no ViT backbone tensors (its keys: "
         "wrong.key); give a backbone file (hub layout, teacher_checkpoint.pth, .safetensors)"),
    ],
)
def test_contradicting_or_negative_options_are_one_line(images, tmp_path, monkeypatch, capsys, extra, message) -> None:
    """F9: --random-init was silently ignored beside --weights; F27: --num-workers -1 gave a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pth").write_bytes(b"")
    save_file({"wrong.key": torch.zeros(2, 2)}, str(tmp_path / "wrong.safetensors"))
    assert main(["embed", str(images), "--out", "emb.npz", "--image-size", "56", "--device", "cpu", "--no-progress",
                 *extra]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "emb.npz").exists()


def test_fp16_on_cpu_is_one_warning_line(images, tmp_path, capsys) -> None:
    """F28: not Python's warning format with a stray source line; the features are computed in fp32."""
    out = tmp_path / "fp16.npz"
    assert embed(str(images / "a.png"), "--random-init", "--dtype", "fp16", "--out", str(out)) == 0
    captured = capsys.readouterr()
    assert captured.err == "warning: fp16 is not supported on CPU; running in fp32\n"
    assert "on cpu (fp32)" in captured.out
    assert embed(str(images / "a.png"), "--random-init", "--out", str(tmp_path / "fp32.npz")) == 0
    np.testing.assert_array_equal(np.load(out)["cls"], np.load(tmp_path / "fp32.npz")["cls"])


def test_a_stage_preset_describes_its_architecture_without_the_run_it_starts_from(tmp_path, capsys):
    """The high-resolution presets mark the run they start from ``???`` (training must give it); reading one for
    the architecture of a 518-px ViT-L/14 asks for nothing."""
    Image.new("RGB", (40, 40), (0, 128, 255)).save(tmp_path / "a.png")
    out = tmp_path / "e.npz"
    assert main(["embed", str(tmp_path / "a.png"), "--config-file", "vitl14_highres", "--random-init",
                 "--image-size", "28", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert np.load(out)["cls"].shape == (1, 1024)


def test_torchrun_ranks_embed_shards_and_one_writes(images, tmp_path) -> None:
    """Under torchrun every process once embedded every image alone and all wrote the same file."""
    import os
    import subprocess
    import sys

    args = ["embed", str(images), "--model", "dinov2_vits14", "--random-init", "--image-size", "28",
            "--num-workers", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "dinokit", *args, "--out", str(tmp_path / "one.npz"), "--no-progress"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = Path(sys.executable).parent / "torchrun"
    ranks = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29547", "-m", "dinokit", *args, "--out",
                            str(tmp_path / "two.npz")], capture_output=True, text=True, timeout=300, env=env)
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    assert ranks.stdout.count("embedded 5 images") == 1 and ranks.stdout.count("wrote ") == 1
    bar = ranks.stderr.replace("\r", "\n")  # rank 0's bar counts the job's 7 files, not its own share (4)
    assert re.search(r"\b7/7 \[", bar) and not re.search(r"\b\d+/4 \[", bar), bar[-2000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert two["paths"].tolist() == one["paths"].tolist() and sorted(two["bad_paths"]) == sorted(one["bad_paths"])
    np.testing.assert_allclose(two["cls"], one["cls"], atol=1e-5)


def test_file_names_that_are_not_utf8(images, weights, tmp_path) -> None:
    """A file name that is not UTF-8 (Linux keeps its bytes) broke the .npy's paths list, the feature cache's key
    and the run's data record with UnicodeEncodeError; its bytes are written back as they are."""
    from dinokit.data import ImageDataset
    from dinokit.engine.run_dir import data_change_note
    from dinokit.eval.feature_cache import FeatureCache

    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / name).write_bytes((images / GOOD[0]).read_bytes())
    _, weights_file = weights
    assert embed(str(folder), "--weights", str(weights_file), "--out", str(tmp_path / "o.npy")) == 0
    assert (tmp_path / "o.paths.txt").read_bytes() == os.fsencode(str(folder / name)) + b"\n"
    dataset = ImageDataset([folder / name], [0], ["a"], name="odd")
    assert FeatureCache(tmp_path / "cache", {"m": 1})._path("train", "cls", dataset).suffix == ".pt"
    assert data_change_note(tmp_path, "odd", [folder / name], resumed=False) is None
