"""``dinokit viz`` end to end on the demo teacher: pca (images, videos, foreground examples), attention, match, and
their one-line errors; and patch matching with a trained backbone."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main
from dinokit.data.sample import render_sample
from dinokit.viz import match_patches
from dinokit.viz.pca import load_foreground_example


def test_trained_backbone_matches_a_shifted_image(demo_model):
    image = np.asarray(render_sample("blobs", np.random.default_rng(0), size=160))
    p, dy, dx = 8, 2, 3
    a = torch.from_numpy(image[:128, :128].copy()).permute(2, 0, 1)
    b = torch.from_numpy(image[dy * p : dy * p + 128, dx * p : dx * p + 128].copy()).permute(2, 0, 1)
    matches = match_patches(demo_model, a, b, image_size=None, max_matches=None, min_spacing=0)
    shift = matches.points_a - matches.points_b
    assert len(shift) > 30
    assert np.mean(np.all(shift == [dy, dx], axis=1)) > 0.9


# ------------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def demo_model(demo_teacher):
    from dinokit.eval.setup import setup_eval_model

    model, _ = setup_eval_model(config_file=str(demo_teacher.config_file),
                                pretrained_weights=str(demo_teacher.snapshot))
    return model


@pytest.fixture(scope="module")
def sample_images(demo_teacher):
    root = demo_teacher.sample_root / "val"
    return [sorted((root / c).iterdir())[0] for c in ("blobs", "rings", "dots")]


def _backbone_args(demo_teacher) -> list[str]:
    return ["--config-file", str(demo_teacher.config_file), "--weights", str(demo_teacher.snapshot)]


def _size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def test_viz_pca_command(demo_teacher, sample_images, tmp_path, capsys):
    out = tmp_path / "pca"
    # 70 px is not a multiple of the patch (8): the images are cropped to 64 x 64, as the backbone crops
    args = ["viz", "pca", *map(str, sample_images), "--out", str(out), "--image-size", "70", "--columns", "2"]
    assert main(args + _backbone_args(demo_teacher)) == 0
    assert "PCA (paper) of 3 image(s)" in capsys.readouterr().out
    for path in sample_images:
        assert _size(out / f"{path.stem}_pca.png") == (64 + 4 + 64, 64)  # image | colours
    assert _size(out / "pca_grid.png") == (2 * 132 + 4, 2 * 64 + 4)
    with Image.open(out / f"{sample_images[0].stem}_pca.png") as img:
        colours = np.asarray(img.convert("RGB"))[:, 68:]
    assert len(np.unique(colours.reshape(-1, 3), axis=0)) > 8  # a picture, not a flat fill

    plain = tmp_path / "plain"
    args = ["viz", "pca", str(sample_images[0]), "--out", str(plain), "--mode", "plain", "--image-size", "64",
            "--upsample", "bilinear"]
    assert main(args + _backbone_args(demo_teacher)) == 0
    with Image.open(plain / f"{sample_images[0].stem}_pca.png") as img:
        assert np.asarray(img.convert("RGB"))[:, 68:].min(axis=2).max() > 0  # no black background in plain mode


def test_viz_pca_video_from_frames_and_gif(demo_teacher, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    image = np.asarray(render_sample("rings", np.random.default_rng(1), size=120))
    for t in range(5):  # a camera panning right by 4 px per frame
        Image.fromarray(image[:64, 4 * t : 4 * t + 80]).save(frames / f"frame_{t:03d}.png")
    out = tmp_path / "video"
    args = ["viz", "pca", str(frames), "--video", "--out", str(out), "--image-size", "64", "--fps", "5"]
    assert main(args + _backbone_args(demo_teacher)) == 0
    assert "PCA (paper) of 5 frame(s)" in capsys.readouterr().out
    with Image.open(out / "pca.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (80 + 4 + 80, 64)
        assert gif.info["duration"] == 200

    clip = tmp_path / "clip.gif"  # an animated GIF is a video too (decoded by Pillow)
    first, *rest = [Image.open(f).convert("RGB") for f in sorted(frames.iterdir())]
    first.save(clip, save_all=True, append_images=rest, duration=100, loop=0)
    out2 = tmp_path / "video2"
    args = ["viz", "pca", str(clip), "--out", str(out2), "--image-size", "64", "--frame-step", "2"]
    assert main(args + _backbone_args(demo_teacher)) == 0
    with Image.open(out2 / "pca.gif") as gif:
        assert gif.n_frames == 3
    assert _size(out2 / "pca_grid.png") == (3 * 164 + 2 * 4, 64)  # the 3 frames in one row
    # attention maps take the GIF as one image (its first frame), as they do inside a folder; it was refused
    args = ["viz", "attention", str(clip), "--out", str(tmp_path / "att"), "--image-size", "64"]
    assert main(args + _backbone_args(demo_teacher)) == 0
    assert (tmp_path / "att" / "clip_attention.png").is_file()


def test_foreground_examples_from_alpha_or_mask_file(demo_teacher, demo_model, tmp_path, capsys):
    left = np.asarray(render_sample("rings", np.random.default_rng(2), size=64))
    right = np.asarray(render_sample("dots", np.random.default_rng(3), size=64))
    pixels = np.concatenate([left[:, :32], right[:, 32:]], axis=1)  # rings on the left, dots on the right
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, :24] = 255  # 3 of the 8 patch columns are foreground
    rgba, plain, mask = tmp_path / "rgba.png", tmp_path / "plain.png", tmp_path / "mask.png"
    Image.fromarray(np.dstack([pixels, alpha])).save(rgba)
    Image.fromarray(pixels).save(plain)
    Image.fromarray(alpha).save(mask)
    expected = torch.zeros(8, 8)
    expected[:, :3] = 1
    for spec in (str(rgba), f"{plain}={mask}"):
        image, fraction = load_foreground_example(demo_model, spec, image_size=64)
        assert image.pixels.shape == (64, 64, 3) and torch.equal(fraction, expected)

    out = tmp_path / "dinov3"
    args = ["viz", "pca", str(plain), "--out", str(out), "--mode", "dinov3", "--fg-examples", str(rgba),
            "--image-size", "64"]
    assert main(args + _backbone_args(demo_teacher)) == 0
    assert "PCA (dinov3) of 1 image(s): foreground" in capsys.readouterr().out
    assert _size(out / "plain_pca.png") == (132, 64)
    assert main(args[:-4] + ["--fg-examples", str(plain), "--image-size", "64"] + _backbone_args(demo_teacher)) == 2
    assert "has no alpha channel; give IMAGE=MASK instead" in capsys.readouterr().err


def test_viz_attention_command(demo_teacher, sample_images, tmp_path, capsys):
    out = tmp_path / "attention"
    args = ["viz", "attention", str(sample_images[1]), "--out", str(out), "--image-size", "64", "--keep-mass"]
    assert main(args + _backbone_args(demo_teacher)) == 0
    assert "attention of block 3 (4 heads, 0 registers excluded)" in capsys.readouterr().out
    # row 1: image, mean, 4 heads, norm (7 panels with captions); row 2: label, mean, 4 heads masked
    assert _size(out / f"{sample_images[1].stem}_attention.png") == (7 * 64 + 6 * 4, 2 * (64 + 14) + 4)
    assert main(["viz", "attention", str(sample_images[1]), "--out", str(out), "--block", "9"]
                + _backbone_args(demo_teacher)) == 2
    assert "error: --block 9 is out of range: the model has 4 blocks" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["pca", "attention"])
def test_out_png_writes_one_picture_for_one_image(demo_teacher, sample_images, tmp_path, capsys, action):
    # --out one.png made a folder called one.png
    common = ["--image-size", "64", *_backbone_args(demo_teacher)]
    folder = tmp_path / "folder"
    assert main(["viz", action, str(sample_images[0]), "--out", str(folder), *common]) == 0
    one = tmp_path / "one.png"
    assert main(["viz", action, str(sample_images[0]), "--out", str(one), *common]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {one}")
    assert one.is_file() and one.read_bytes() == (folder / f"{sample_images[0].stem}_{action}.png").read_bytes()
    assert main(["viz", action, *map(str, sample_images[:2]), "--out", str(tmp_path / "two.png"), *common]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {str(tmp_path / 'two.png')!r} names one picture, but "
                                               f"there are 2 images; give a folder instead, e.g. --out {tmp_path / 'two'}")
    assert main(["viz", action, str(sample_images[0]), "--out", str(tmp_path / "a.jpg"), *common]) == 2
    assert "pictures are written as PNG" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "one.png"]
    (tmp_path / "old.png").mkdir()  # a folder named like a picture stays a folder
    assert main(["viz", action, str(sample_images[0]), "--out", str(tmp_path / "old.png"), *common]) == 0
    assert (tmp_path / "old.png" / f"{sample_images[0].stem}_{action}.png").is_file()


def test_viz_match_command(demo_teacher, sample_images, tmp_path, capsys):
    out = tmp_path / "match.png"
    args = ["viz", "match", str(sample_images[0]), str(sample_images[0]), "--out", str(out), "--image-size", "64"]
    assert main(args + _backbone_args(demo_teacher) + ["--max-matches", "10"]) == 0
    assert "10 mutual-nearest-neighbour matches" in capsys.readouterr().out  # an image against itself
    pytest.importorskip("scipy")
    assert main(args + _backbone_args(demo_teacher) + ["--max-matches", "10", "--method", "assignment"]) == 0
    assert "10 assignment matches (median feature distance 0.000)" in capsys.readouterr().out
    assert _size(out) == (64 + 8 + 64, 64)


@pytest.mark.parametrize("command", ["pca", "attention"])
def test_viz_one_picture_never_replaces_its_input_image(command, demo_teacher, sample_images, tmp_path, capsys):
    """--out naming the input image itself was overwritten by the picture (rc 0): refused in one line."""
    image = tmp_path / "photo.png"
    image.write_bytes(sample_images[1].read_bytes())
    before = image.read_bytes()
    assert main(["viz", command, str(image), "--out", str(image), "--image-size", "64"] + _backbone_args(demo_teacher)) == 2
    assert capsys.readouterr().err == f"error: --out '{image}' is one of the input images; give another file name\n"
    assert image.read_bytes() == before


def test_viz_match_refuses_to_overwrite_an_input(demo_teacher, sample_images, tmp_path, capsys):
    image = tmp_path / "photo.png"
    image.write_bytes(sample_images[1].read_bytes())
    before = image.read_bytes()
    # the same file, spelled another way: still refused
    same = tmp_path / "sub" / ".." / "photo.png"
    (tmp_path / "sub").mkdir()
    assert main(["viz", "match", str(sample_images[0]), str(image), "--out", str(same), "--image-size", "64"]
                + _backbone_args(demo_teacher)) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out '{same}' is one of the input images; give another file name\n"
    assert image.read_bytes() == before


def test_viz_errors(demo_teacher, sample_images, tmp_path, capsys):
    def error(args: list[str]) -> str:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    backbone = _backbone_args(demo_teacher)
    assert "does not exist" in error(["viz", "pca", str(tmp_path / "missing.png"), "--out", str(tmp_path)] + backbone)
    broken = tmp_path / "broken.gif"
    broken.write_bytes(b"GIF89a this is not a picture")
    assert f"cannot read video '{broken}'" in error(["viz", "pca", str(broken), "--out", str(tmp_path)] + backbone)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    message = error(["viz", "pca", str(clip), "--out", str(tmp_path)] + backbone)
    try:
        import av  # noqa: F401

        assert f"cannot read video '{clip}'" in message
    except ImportError:
        assert "needs PyAV: pip install 'dinokit[video]'" in message
    mismatch = ["viz", "attention", str(sample_images[0]), "--out", str(tmp_path), "--model", "dinov2_vits14",
                "--weights", str(demo_teacher.snapshot)]
    message = error(mismatch)  # the file holds vit_pico, the model is ViT-S/14; the run's config says so
    assert "does not fit the model" in message and message.rstrip().endswith(
        f"; the run's {demo_teacher.config_file} describes the file's architecture: leave out --model and it is used")
    # flags that could not act were accepted and did nothing; match had a --batch-size it never used
    image = str(sample_images[0])
    for extra, expected in [
        (["--fps", "5"], "--fps is for a video (a video file, or --video with a folder of frames); drop it for images"),
        (["--mode", "plain", "--threshold", "1"],
         "--threshold chooses the foreground, which --mode plain does not use"),
        (["--threshold", "1", "--fg-examples", image], "--fg-examples and --threshold both choose the foreground"),
    ]:
        assert error(["viz", "pca", image, "--out", str(tmp_path / "p"), *extra] + backbone).startswith(
            f"error: {expected}"), extra
    assert "--threshold chooses the foreground patches, and --all-patches matches all of them" in error(
        ["viz", "match", image, image, "--out", str(tmp_path / "m.png"), "--all-patches", "--threshold", "1"]
        + backbone)
    with pytest.raises(SystemExit):  # argparse's usage error
        main(["viz", "match", image, image, "--out", str(tmp_path / "m.png"), "--batch-size", "4"] + backbone)
    assert "unrecognized arguments: --batch-size" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "m.png").exists()


def test_image_size_below_one_patch_is_one_line_before_the_out_folder(demo_teacher, sample_images, tmp_path, capsys):
    for action in ("pca", "attention"):
        out = tmp_path / action
        assert main(["viz", action, str(sample_images[0]), "--out", str(out), "--image-size", "5"]
                    + _backbone_args(demo_teacher)) == 2
        patch = capsys.readouterr().err  # the demo backbone's patch size is in the message
        assert patch.startswith("error: --image-size 5 is smaller than the model's ") and patch.count("\n") == 1
        assert patch.endswith("-pixel patch; use at least " + patch.split("model's ")[1].split("-")[0] + "\n")
        assert not out.exists()
    assert main(["viz", "match", str(sample_images[0]), str(sample_images[1]), "--out", str(tmp_path / "m.png"),
                 "--image-size", "5"] + _backbone_args(demo_teacher)) == 2
    assert "--image-size 5 is smaller than the model's" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_panoramas_are_capped_and_slivers_skipped(demo_teacher, sample_images, tmp_path, capsys):
    """A 400x50 panorama at --image-size 32 is drawn with its long side capped at 4x the short (not 256x32); a
    4000x20 sliver, under one patch once capped (128x1), is skipped with a one-line warning naming it, and alone
    it is a one-line error. (A 4000x50 panorama at the default size used to become 35840x448 px: a hang.)"""
    from dinokit.data.images import SkippedImageWarning
    from dinokit.data.transforms import MAX_ASPECT

    pano, sliver = tmp_path / "pano.png", tmp_path / "sliver.png"
    Image.new("RGB", (400, 50), (200, 30, 30)).save(pano)
    Image.new("RGB", (4000, 20), (200, 30, 30)).save(sliver)
    out = tmp_path / "out"
    with pytest.warns(SkippedImageWarning, match=f"skipping too elongated image {sliver}: 128x1 px .* under one"):
        assert main(["viz", "pca", str(pano), str(sliver), str(sample_images[0]), "--out", str(out),
                     "--image-size", "32"] + _backbone_args(demo_teacher)) == 0
    assert _size(out / "pano_pca.png") == (2 * MAX_ASPECT * 32 + 4, 16)  # image | colours, each 400x50 -> 128x16
    assert not (out / "sliver_pca.png").exists()
    with warnings.catch_warnings(record=True) as caught:  # alone: the error only (a warning said it first)
        warnings.simplefilter("always")
        assert main(["viz", "attention", str(sliver), "--out", str(tmp_path / "alone"), "--image-size", "32"]
                    + _backbone_args(demo_teacher)) == 2
    assert not [w for w in caught if issubclass(w.category, SkippedImageWarning)]
    err = capsys.readouterr().err
    assert err.startswith("error: image 'sliver' is 128x1 px after resizing (the long side capped at 4x the size)")
    assert "larger --image-size" in err and err.count("\n") == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["viz", "pca", str(sliver), "--out", str(tmp_path / "alone"), "--image-size", "32"]
                    + _backbone_args(demo_teacher)) == 2
    assert not [w for w in caught if issubclass(w.category, SkippedImageWarning)]
    assert capsys.readouterr().err.startswith("error: image 'sliver' is 128x1 px after resizing")


def test_failing_viz_leaves_no_out_folder(demo_teacher, sample_images, tmp_path, capsys):
    """Every refusal is one line and --out is made only once the inputs are known good (F19)."""
    backbone = _backbone_args(demo_teacher)
    unreadable = tmp_path / "text.png"
    unreadable.write_text("not an image")
    out = tmp_path / "out"

    def error(args: list[str]) -> str:
        assert main(args + ["--out", str(out)] + backbone) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the skipped-image warnings
        assert not out.exists()
        return err

    image = str(sample_images[0])
    missing = str(tmp_path / "nosuch.png")
    assert error(["viz", "pca", image, "--fg-examples", missing]) == \
        f"error: foreground example '{missing}' does not exist; check the path"
    assert error(["viz", "pca", image, "--fg-examples", image]) == \
        f"error: foreground example '{image}' has no alpha channel; give IMAGE=MASK instead"
    for action in ("pca", "attention"):
        assert error(["viz", action, str(unreadable), "--image-size", "64"]).startswith(
            f"error: cannot read image '{unreadable}'")
    # 16 pixels = 2 x 2 patches of the demo backbone: too few foreground patches for a PCA
    assert error(["viz", "pca", image, "--image-size", "16"]).startswith("error: only ")
    for block in ("4", "-5"):  # the demo backbone has 4 blocks: -4..3 are accepted
        assert error(["viz", "attention", image, "--block", block]) == \
            f"error: --block {block} is out of range: the model has 4 blocks; give -4..3 (negative counts from the end)"
    assert main(["viz", "attention", image, "--block", "-4", "--image-size", "64", "--out", str(out)] + backbone) == 0
    assert "attention of block 0 " in capsys.readouterr().out and out.is_dir()


def test_mp4_without_pyav_is_refused_before_any_work(demo_teacher, tmp_path, capsys, monkeypatch):
    """F23: --format mp4 without PyAV is one line before the frames are read or the backbone is built."""
    import sys

    import dinokit.cli.viz as viz_cli

    frames = tmp_path / "frames"
    frames.mkdir()
    for t in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * t, dtype=np.uint8)).save(frames / f"f{t}.png")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError

    def no_model(*a, **k):
        raise AssertionError("the backbone should not be built")

    monkeypatch.setattr(viz_cli, "_setup", no_model)
    out = tmp_path / "out"
    assert main(["viz", "pca", str(frames), "--video", "--format", "mp4", "--out", str(out)]
                + _backbone_args(demo_teacher)) == 2
    assert capsys.readouterr().err == ("error: writing MP4 needs PyAV: pip install 'dinokit[video]' (or use a folder "
                                       "of frames / a .gif)\n")
    assert not out.exists()


def test_attention_of_a_folder_is_drawn_a_chunk_at_a_time(demo_teacher, demo_model, sample_images, tmp_path, capsys,
                                                          monkeypatch):
    """viz attention on a folder held every image's map, each a view keeping its batch's whole (B, heads, T, T)
    attention matrix alive (about 190 MB per image at 448 px: 160 small images ran out of 24 GB), and wrote nothing
    before the last image. The maps are copies now, and each chunk of images is drawn before the next is read:
    a chunk of unreadable files only is skipped (each named), and a stop keeps the pictures done."""
    from dinokit.cli import viz as viz_cli
    from dinokit.viz.attention import cls_attention_and_norms

    maps = cls_attention_and_norms(demo_model, torch.zeros(2, 3, 32, 32))["attention"]
    assert maps.untyped_storage().nbytes() == maps.numel() * maps.element_size()  # not a view of the whole matrix

    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.png", "d.png", "e.png"]):
        if name in ("c.png", "d.png"):  # the second chunk of two: unreadable only
            (folder / name).write_bytes(b"not an image")
        else:
            Image.open(sample_images[i % 3]).save(folder / name)
    monkeypatch.setattr(viz_cli, "ATTENTION_CHUNK", 2)
    out = tmp_path / "out"
    assert main(["viz", "attention", str(folder), "--out", str(out), "--image-size", "32"]
                + _backbone_args(demo_teacher)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_attention.png", "b_attention.png", "e_attention.png"]
    assert "for 3 image(s)" in capsys.readouterr().out
    twice = tmp_path / "twice"  # one file given twice: two pictures, as before the chunks
    assert main(["viz", "attention", str(folder / "a.png"), str(folder / "a.png"), "--out", str(twice),
                 "--image-size", "32"] + _backbone_args(demo_teacher)) == 0
    assert sorted(p.name for p in twice.iterdir()) == ["a-2_attention.png", "a_attention.png"]

    drawn = []
    real_save = viz_cli.save_png

    def save_then_stop(figure, path):
        if len(drawn) == 2:  # stopped while drawing the third picture
            raise KeyboardInterrupt
        drawn.append(path)
        real_save(figure, path)

    monkeypatch.setattr(viz_cli, "save_png", save_then_stop)
    assert main(["viz", "attention", str(folder), "--out", str(tmp_path / "cut"), "--image-size", "32"]
                + _backbone_args(demo_teacher)) == 130
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["a_attention.png", "b_attention.png"]
