"""Odd image files through every command that reads images: each command completes, skips the corrupt, empty,
huge and non-image files with a one-line reason (shown once, then counted), and decodes the 16-bit, CMYK,
transparent, greyscale and 1x1 ones as a person sees them."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main
from tiny import tiny_run

SIZE = 40


def _huge_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def _odd_files(folder: Path) -> dict[str, np.ndarray]:
    """Write the odd files into ``folder``; returns the good ones' pixels as a person sees them (RGB uint8)."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    expected = {}
    rgb = np.stack([x * 6, y * 6, 255 - x * 6], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    expected["rgb"] = rgb
    art = np.zeros((SIZE, SIZE, 4), np.uint8)
    art[8:32, 18:22] = (0, 0, 0, 255)  # black strokes on a transparent background
    Image.fromarray(art, "RGBA").save(folder / "transparent.png")
    on_white = np.full((SIZE, SIZE, 3), 255, np.uint8)
    on_white[8:32, 18:22] = 0
    expected["transparent"] = on_white
    ramp = (x * SIZE + y).astype(np.float64) * (65535 / (SIZE * SIZE - 1))
    Image.fromarray(ramp.round().astype(np.uint16)).save(folder / "gray16.png")
    expected["gray16"] = np.repeat(np.round(ramp.round() / 257)[..., None], 3, -1).astype(np.uint8)
    Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    expected["cmyk"] = np.asarray(Image.open(folder / "cmyk.jpg").convert("RGB"))  # what PIL's CMYK conversion gives
    assert expected["cmyk"][..., 0].min() > 240 and expected["cmyk"][..., 1:].max() < 15  # red stays red
    grey = (x * 5 + y).astype(np.uint8)
    Image.fromarray(grey, "L").save(folder / "gray.png")
    expected["gray"] = np.repeat(grey[..., None], 3, -1)
    Image.new("L", (1, 1), 77).save(folder / "one.png")
    expected["one"] = np.full((1, 1, 3), 77, np.uint8)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    noise.save(folder / "corrupt.png")
    (folder / "corrupt.png").write_bytes((folder / "corrupt.png").read_bytes()[:400])  # truncated
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "huge.png").write_bytes(_huge_png(30000, 25000))  # 750 Mpixels: above the limit
    (folder / "notimage.png").write_bytes(b"just some text, not an image")
    return expected


BAD = ["corrupt.png", "empty.jpg", "huge.png", "notimage.png"]


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """``root/a``: the odd files; ``root/b``: two plain images (a second class); ``refs``: the good odd ones as
    plain RGB PNGs; ``tiny.yaml``: a tiny backbone."""
    base = tmp_path_factory.mktemp("odd")
    root = base / "images"
    expected = _odd_files(root / "a")
    (root / "b").mkdir()
    for i in range(2):
        Image.new("RGB", (SIZE, SIZE), (200, 40 * i, 10)).save(root / "b" / f"plain{i}.png")
    (root / "readme.txt").write_text("not an image file: never read")
    (base / "refs").mkdir()
    for name, pixels in expected.items():
        Image.fromarray(pixels).save(base / "refs" / f"{name}.png")
    config = base / "tiny.yaml"
    config.write_text("student:\n  arch: vit_pico\n  patch_size: 8\ncrops:\n  global_crops_size: 32\n")
    return base, root, config, sorted(expected)


def _stderr_lines(capfd) -> tuple[list[str], str]:
    captured = capfd.readouterr()
    return [line for line in captured.err.splitlines() if line.strip()], captured.out


def _assert_skips_said_once(err: list[str], reads: int) -> None:
    skips = [line for line in err if "skipping " in line]
    # each bad file named once with its reason (the first five files; here four), however often it is read ...
    assert sorted(next(name for name in BAD if f"{name}: " in line) for line in skips) == BAD, err
    # ... and the reads counted once, at the end of the command
    assert (f"warning: {reads} image reads skipped in all (unreadable, not an image or too large); each file is "
            "named above") in err


def test_embed_skips_the_bad_and_decodes_the_odd_ones_as_seen(odd, tmp_path, capfd, real_warnings):
    base, root, config, good = odd
    common = ["--config-file", str(config), "--random-init", "--image-size", "32", "--device", "cpu", "--no-progress",
              "--num-workers", "0", "--batch-size", "4"]
    assert main(["embed", str(root), "--out", str(tmp_path / "odd.npz"), *common]) == 0
    err, out = _stderr_lines(capfd)
    _assert_skips_said_once(err, 4)
    odd_file = np.load(tmp_path / "odd.npz")
    assert sorted(Path(p).name for p in odd_file["bad_paths"]) == BAD
    assert "skipped 4 unreadable image(s)" in out
    assert main(["embed", str(base / "refs"), "--out", str(tmp_path / "refs.npz"), *common]) == 0
    refs = np.load(tmp_path / "refs.npz")
    by_name = {Path(p).stem: v for p, v in zip(odd_file["paths"], odd_file["cls"])}
    for name, ref in zip((Path(p).stem for p in refs["paths"]), refs["cls"]):
        np.testing.assert_allclose(by_name[name], ref, atol=1e-5, err_msg=name)  # the same pixels went in
    assert sorted(Path(p).stem for p in refs["paths"]) == good


@pytest.mark.parametrize("protocol, extra", [
    ("knn", ["--nb-knn", "2"]),
    ("linear", ["--epochs", "1", "--epoch-length", "2", "--batch-size", "4", "--learning-rates", "0.1",
                "--n-last-blocks", "1"]),
    ("logreg", ["--c-grid-size", "2", "--max-iter", "20"]),
])
def test_eval_completes_and_counts_the_bad_files(odd, tmp_path, capfd, real_warnings, protocol, extra):
    _, root, config, _ = odd
    argv = ["eval", protocol, "--output-dir", str(tmp_path), "--train-dataset", str(root), "--val-dataset", str(root),
            "--config-file", str(config), "--image-size", "32", "--num-workers", "0", "--device", "cpu",
            "--no-progress", *extra]
    assert main(argv) == 0
    err, out = _stderr_lines(capfd)
    skipped = [line for line in out.splitlines() if "skipped 4 unreadable image(s)" in line]
    assert len(skipped) == (1 if protocol == "linear" else 2)  # val (and train, when its features are extracted)
    assert len((tmp_path / f"results_eval_{protocol}.json").read_text().splitlines()) == 1
    reads = int(err[-1].split()[1])
    assert reads >= (4 if protocol == "linear" else 8)  # the probes' training stream may not meet every file
    _assert_skips_said_once(err, reads)


def test_train_completes_and_counts_the_bad_files(odd, tmp_path, capfd, real_warnings):
    _, root, _, _ = odd
    # 6 iterations of 2 images: each of the 12 files once
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--device", "cpu", *tiny_run(),
                 f"train.dataset_path=ImageFolder:root={root}"]) == 0
    err, out = _stderr_lines(capfd)
    assert "12 images found in" in out.splitlines()[0]
    assert "unreadable images skipped in trained batches: 4" in next(line for line in out.splitlines() if line.startswith("done: "))
    _assert_skips_said_once(err, 4)


def test_distill_completes_and_counts_the_bad_files(odd, tmp_path, capfd, real_warnings):
    from dinokit.models import build_backbone
    from dinokit.models.checkpoint import save_backbone

    _, root, _, _ = odd
    torch.manual_seed(0)
    teacher = save_backbone(build_backbone("vit_pico", patch_size=8, img_size=32), tmp_path / "teacher.pth")
    assert main(["distill", "--teacher", str(teacher), "--output-dir", str(tmp_path / "run"), "--device", "cpu",
                 *tiny_run(student=False), "distillation.loss=features",
                 f"train.dataset_path=ImageFolder:root={root}"]) == 0
    err, out = _stderr_lines(capfd)
    assert "12 images found in" in out
    assert "unreadable images skipped in trained batches: 4" in next(line for line in out.splitlines() if line.startswith("done: "))
    _assert_skips_said_once(err, 4)


def test_dense_train_eval_and_predict_skip_the_bad_files(odd, tmp_path, capfd, real_warnings):
    base, root, config, good = odd
    dense = tmp_path / "seg"
    (dense / "masks").mkdir(parents=True)
    images = dense / "images"
    images.symlink_to(root / "a", target_is_directory=True)
    for path in (root / "a").iterdir():
        if path.name in BAD:
            Image.new("L", (SIZE, SIZE), 0).save(dense / "masks" / f"{path.stem}.png")
        else:
            with Image.open(path) as img:
                mask = np.zeros((img.height, img.width), np.uint8)
            mask[: img.height // 2] = 1
            Image.fromarray(mask).save(dense / "masks" / f"{path.stem}.png")
    data = f"SegFolder:root={dense}"
    backbone = ["--config-file", str(config), "--random-init"]
    assert main(["dense", "train", "--task", "seg", "--head", "linear", *backbone, "--train-dataset", data,
                 "--val-dataset", data, "--output-dir", str(tmp_path / "head"), "--no-progress", "iterations=2",
                 "batch_size=2", "augment=false", "crop_size=32", "eval_size=32", "eval_mode=whole", "eval_period=0",
                 "num_workers=0", "warmup_iters=1"]) == 0
    result = json.loads((tmp_path / "head" / "results_eval_segmentation.json").read_text())
    assert (result["images"], result["skipped_images"]) == (len(good), len(BAD))
    err, _ = _stderr_lines(capfd)
    _assert_skips_said_once(err, int(err[-1].split()[1]))  # training (cached features) and evaluation
    assert main(["dense", "predict", str(root / "a"), "--head", str(tmp_path / "head" / "head.pth"), *backbone,
                 "--out", str(tmp_path / "pred"), "--size", "32"]) == 0
    err, out = _stderr_lines(capfd)
    assert f"wrote {len(good)} picture(s) to {tmp_path / 'pred'}; skipped 4 unreadable image(s)" in out
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(f"{g}_seg.png" for g in good)
    _assert_skips_said_once(err, 4)


@pytest.mark.parametrize("action", ["pca", "attention"])
def test_viz_skips_the_bad_files(odd, tmp_path, capfd, real_warnings, action):
    _, root, config, good = odd
    assert main(["viz", action, str(root / "a"), "--out", str(tmp_path), "--config-file", str(config),
                 "--random-init", "--image-size", "32", "--device", "cpu"]) == 0
    err, _ = _stderr_lines(capfd)
    _assert_skips_said_once(err, 4)
    assert sorted(p.name for p in tmp_path.glob(f"*_{action}.png")) == sorted(f"{g}_{action}.png" for g in good)


def test_curate_counts_the_bad_files(odd, tmp_path, capfd, real_warnings):
    _, root, _, _ = odd
    assert main(["curate", "run", "--pool", str(root), "--output-dir", str(tmp_path / "work"), "--target-size", "4",
                 "--config-file", "demo", "--weights", "random", "--device", "cpu", "--no-progress",
                 "embed.image_size=32", "embed.num_workers=0", "cluster.n_clusters=[2]"]) == 0
    err, _ = _stderr_lines(capfd)
    counts = json.loads((tmp_path / "work" / "report.json").read_text())["counts"]
    assert (counts["pool"], counts["unreadable"]) == (12, 4)
    _assert_skips_said_once(err, 4)


def test_eval_transform_reads_only_the_crop_of_a_panorama():
    """A 60000x10 panorama was resized whole by the evaluation transform (1.5 million x 256 pixels, over 1 GB) for
    a centre crop of its middle. Beyond an aspect ratio of 8 only the crop's source box is resampled: the same
    grid, so the pixels of Resize -> CenterCrop up to one level of rounding; within it, the same transforms."""
    from torchvision.transforms import v2

    from dinokit.data.transforms import make_classification_eval_transform

    rng = np.random.default_rng(0)
    for crop in (224, 98):
        transform = make_classification_eval_transform(crop_size=crop)
        both = transform.transforms[0]
        plain = v2.Compose([both.resize, both.crop, *transform.transforms[1:]])
        for w, h in ((500, 375), (2048, 256), (4000, 300), (333, 9001)):
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            got, expected = transform(image), plain(image)
            assert got.shape == expected.shape == (3, crop, crop)
            level = 1 / 255 / 0.224  # one uint8 step after normalisation (the smallest std)
            if max(w, h) <= 8 * min(w, h):
                assert torch.equal(got, expected)  # untouched: every ordinary photo
            else:
                assert (got - expected).abs().max() <= level * 1.01
                assert ((got - expected).abs() > 0).float().mean() < 0.05
    panorama = Image.fromarray(rng.integers(0, 256, (10, 60000, 3), dtype=np.uint8))
    transform = make_classification_eval_transform()
    resized = []
    transform.transforms[0].resize.register_forward_hook(lambda module, args, out: resized.append(out.size))
    assert transform(panorama).shape == (3, 224, 224) and resized == []  # the whole-image resize never ran
    transform(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)))
    assert resized == [(341, 256)]
