"""``dinokit dense train|eval|predict`` end to end on the generated sets, and the proof that pretraining helps:
on the demo's pretrained teacher a linear segmentation head beats the same head on the randomly initialised
network, and a linear depth head beats both random init and predicting the training set's mean depth.

Single-threaded: on a loaded 2-core machine two intra-op threads make these small ops several times slower.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main

# Small-data settings: cached features (no augmentation), whole 64 px images, a short schedule.
COMMON = ["augment=false", "crop_size=64", "eval_size=0", "eval_mode=whole", "eval_period=0", "num_workers=0",
          "warmup_iters=10", "checkpoint_period=1000", "log_freq=50"]
SEG = ["iterations=400", "batch_size=16", "lr=3e-2", "dropout=0", "class_token=true"]
DEPTH = ["iterations=300", "batch_size=8", "lr=3e-2", "norm=true"]


from test_dense_heads import one_thread  # noqa: E402,F401  (autouse: one intra-op thread for this module too)


@pytest.fixture(scope="module")
def dense_root(tmp_path_factory):
    from dinokit.dense.generated import write_dense_sample

    root = tmp_path_factory.mktemp("dense")
    write_dense_sample("seg", root / "seg")
    write_dense_sample("depth", root / "depth")
    return root


def _train(out, task, backbone_args, root, extra):
    name = "SegSample" if task == "seg" else "DepthSample"
    args = ["dense", "train", "--task", task, "--head", "linear", *backbone_args,
            "--train-dataset", f"{name}:split=train:root={root / task}", "--val-dataset", f"{name}:split=val:root={root / task}",
            "--output-dir", str(out), "--no-progress", *COMMON, *extra]
    assert main(args) == 0
    return json.loads((out / ("results_eval_segmentation.json" if task == "seg" else "results_eval_depth.json")).read_text())


def test_segmentation_pretrained_beats_random_init_and_eval_predict(demo_teacher, dense_root, tmp_path, capsys):
    trained = _train(tmp_path / "seg", "seg", ["--pretrained-weights", str(demo_teacher.snapshot)], dense_root, SEG)
    random_init = _train(tmp_path / "seg-random", "seg", ["--config-file", str(demo_teacher.config_file)], dense_root, SEG)
    with capsys.disabled():  # the README's figures
        print(f"seg mIoU pretrained {trained['mIoU']} random init {random_init['mIoU']}")
    assert trained["mIoU"] > 1.5 * random_init["mIoU"] and trained["mIoU"] > random_init["mIoU"] + 6
    assert len(trained["IoU"]) == 9 and trained["classes"][0] == "background"
    assert (tmp_path / "seg" / "training_metrics.json").is_file() and (tmp_path / "seg" / "checkpoints").is_dir()
    snapshot = torch.load(tmp_path / "seg" / "eval" / "training_399" / "head.pth", weights_only=True)
    assert set(snapshot["teacher"]) == {f"decode_head.{k}" for k in ("bn.weight", "bn.bias", "bn.running_mean",
                                                                    "bn.running_var", "bn.num_batches_tracked",
                                                                    "conv_seg.weight", "conv_seg.bias")}
    # resuming a finished run does nothing and keeps the results
    assert _train(tmp_path / "seg", "seg", ["--pretrained-weights", str(demo_teacher.snapshot)], dense_root, SEG) == trained

    # eval: the saved head (it records its backbone) gives the same numbers; slide inference runs too
    head = tmp_path / "seg" / "head.pth"
    val = f"SegSample:split=val:root={dense_root / 'seg'}"
    assert main(["dense", "eval", "--head-weights", str(head), "--val-dataset", val, "--output-dir", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    again = json.loads((tmp_path / "ev" / "results_eval_segmentation.json").read_text())
    assert again["mIoU"] == trained["mIoU"]
    assert main(["dense", "eval", "--head-weights", str(head), "--val-dataset", val, "--output-dir", str(tmp_path / "ev2"),
                 "--no-progress", "--mode", "slide", "--crop", "48", "--stride", "16", "--flip"]) == 0
    slide = json.loads((tmp_path / "ev2" / "results_eval_segmentation.json").read_text())
    assert slide["mIoU"] > random_init["mIoU"]

    # predict: input | colourised prediction, beside each input name
    images = sorted((dense_root / "seg" / "val" / "images").iterdir())[:2]
    assert main(["dense", "predict", *map(str, images), "--head", str(head), "--out", str(tmp_path / "pred")]) == 0
    picture = Image.open(tmp_path / "pred" / f"{images[0].stem}_seg.png")
    assert picture.size == (128, 64)
    assert len(np.unique(np.asarray(picture.crop((64, 0, 128, 64))).reshape(-1, 3), axis=0)) >= 2  # background and the object in different colours
    assert "mIoU" in capsys.readouterr().out


def test_depth_pretrained_beats_random_init_and_the_mean(demo_teacher, dense_root, tmp_path):
    from dinokit.dense.datasets import make_dense_dataset
    from dinokit.dense.metrics import DepthMetrics

    trained = _train(tmp_path / "d", "depth", ["--pretrained-weights", str(demo_teacher.snapshot)], dense_root, DEPTH)
    random_init = _train(tmp_path / "d-random", "depth", ["--config-file", str(demo_teacher.config_file)], dense_root, DEPTH)
    train_set = make_dense_dataset(f"DepthSample:split=train:root={dense_root / 'depth'}")
    depths = torch.cat([train_set.read_label(i).flatten() for i in range(len(train_set))])
    mean_depth = float(depths[depths > 0].mean())
    val = make_dense_dataset(f"DepthSample:split=val:root={dense_root / 'depth'}")
    meter = DepthMetrics()
    for i in range(len(val)):
        gt = val.read_label(i)
        meter.update(torch.full_like(gt, mean_depth), gt)
    mean_rmse = meter.compute()["rmse"]
    print(f"depth RMSE pretrained {trained['rmse']:.3f} random init {random_init['rmse']:.3f} mean {mean_rmse:.3f}; "
          f"AbsRel / delta1 {trained['abs_rel']:.2f} / {trained['delta1']:.2f} vs {random_init['abs_rel']:.2f} / "
          f"{random_init['delta1']:.2f}")
    assert trained["rmse"] < 0.85 * random_init["rmse"] and trained["rmse"] < 0.8 * mean_rmse
    assert trained["abs_rel"] < random_init["abs_rel"] and trained["delta1"] > random_init["delta1"]
    head = tmp_path / "d" / "head.pth"
    image = sorted((dense_root / "depth" / "val" / "images").iterdir())[0]
    assert main(["dense", "predict", str(image), "--head", str(head), "--out", str(tmp_path / "pred")]) == 0
    assert Image.open(tmp_path / "pred" / f"{image.stem}_depth.png").size == (128, 64)


def _official_seg_head(path, num_classes=3):
    """An mmseg-layout linear segmentation head for dinov2_vits14 (384 channels), random weights."""
    g = torch.Generator().manual_seed(0)
    sd = {"decode_head.bn.weight": torch.ones(384), "decode_head.bn.bias": torch.zeros(384),
          "decode_head.bn.running_mean": torch.zeros(384), "decode_head.bn.running_var": torch.ones(384),
          "decode_head.bn.num_batches_tracked": torch.tensor(0),
          "decode_head.conv_seg.weight": torch.randn(num_classes, 384, 1, 1, generator=g),
          "decode_head.conv_seg.bias": torch.zeros(num_classes)}
    torch.save({"state_dict": sd, "meta": {}}, path)
    return path


def test_eval_of_an_official_segmentation_head_file(dense_root, tmp_path, monkeypatch):
    """An mmseg-layout file (no dinokit description) + a hub backbone: the head kind and levels come from the shapes;
    by default it is evaluated as the official protocol does (512 px short side, sliding 512 windows, stride 341)."""
    from dinokit.dense import inference as dense_inference, run

    _official_seg_head(tmp_path / "dinov2_vits14_ade20k_linear_head.pth", num_classes=150)
    val = f"SegSample:split=val:root={dense_root / 'seg'}"
    argv = ["dense", "eval", "--head-weights", str(tmp_path / "dinov2_vits14_ade20k_linear_head.pth"),
            "--model", "dinov2_vits14", "--random-init", "--val-dataset", val, "--output-dir", str(tmp_path),
            "--no-progress"]

    class Seen(Exception):
        pass

    def seen(model, dataset, inference, **kwargs):
        raise Seen(inference, dataset.transform.size)

    monkeypatch.setattr(run, "evaluate", seen)
    with pytest.raises(Seen) as official:
        main(argv)
    inference, size = official.value.args
    assert (inference.mode, inference.crop, inference.stride, inference.flip, size) == ("slide", 512, 341, False, 512)
    ms = dense_inference.official_inference("seg-ms")
    assert ms["flip"] and ms["scales"] == [1.0, 1.32, 1.73]
    assert dense_inference.official_inference("depth-linear") == {"mode": "whole", "flip": True, "scales": [1.0],
                                                                  "eval_size": 0}
    # one flag changes that setting only: --flip alone gave whole 512/341 without the saved sliding windows, and
    # --crop/--stride alone were ignored
    for flags, expected in ((["--flip"], ("slide", 512, 341, True)), (["--crop", "64"], ("slide", 64, 341, False)),
                            (["--stride", "32", "--no-flip"], ("slide", 512, 32, False))):
        with pytest.raises(Seen) as changed:
            main([*argv, *flags])
        got = changed.value.args[0]
        assert (got.mode, got.crop, got.stride, got.flip) == expected, flags
    monkeypatch.undo()
    assert main([*argv, "--mode", "whole", "--eval-size", "0"]) == 0  # whole 64 px images: quick on a CPU
    result = json.loads((tmp_path / "results_eval_segmentation.json").read_text())
    assert len(result["IoU"]) == 150 and 0 <= result["aAcc"] <= 100
    # where the numbers came from
    assert (result["weights"], result["dataset"]) == ("random-init (seed 0)", val)
    assert result["head"] == str((tmp_path / "dinov2_vits14_ade20k_linear_head.pth").resolve())


def test_augmented_training_validates_resumes_and_trains_dpt(demo_teacher, tmp_path, capsys):
    from dinokit.dense.generated import write_dense_sample

    write_dense_sample("seg", tmp_path / "seg", counts={"train": 4, "val": 2})
    write_dense_sample("depth", tmp_path / "depth", counts={"train": 4, "val": 2})
    backbone = ["--pretrained-weights", str(demo_teacher.snapshot)]
    seg = ["iterations=6", "batch_size=2", "crop_size=48", "base_size=64", "eval_period=3", "checkpoint_period=3",
           "eval_size=0", "eval_mode=slide", "eval_crop=48", "eval_stride=32", "num_workers=0", "warmup_iters=2"]
    common = ["dense", "train", "--task", "seg", "--head", "ms", *backbone, "--train-dataset",
              f"SegSample:split=train:root={tmp_path / 'seg'}", "--val-dataset", f"SegSample:split=val:root={tmp_path / 'seg'}",
              "--output-dir", str(tmp_path / "ms"), "--no-progress"]
    assert main([*common, *seg]) == 0
    captured = capsys.readouterr()
    assert "train:" not in captured.err  # --no-progress: no training progress bar either
    assert ("training a seg head 'ms' on 4 images: 6 iterations of batch 2, 48x48 crops, lr 0.001 after 2 warm-up, "
            "validation every 3") in captured.out
    lines = [json.loads(l) for l in (tmp_path / "ms" / "training_metrics.json").read_text().splitlines()]
    assert any("val_mIoU" in l for l in lines)  # validation at iteration 3 (the last one is the final evaluation)
    assert main([*common, *seg, "iterations=8"]) == 0  # a longer schedule resumes from the last checkpoint
    assert "resumed from iteration 6" in capsys.readouterr().out
    depth = ["iterations=2", "batch_size=2", "crop_size=32", "eval_period=0", "num_workers=0", "warmup_iters=1"]
    assert main(["dense", "train", "--task", "depth", "--head", "dpt", *backbone, "--train-dataset",
                 f"DepthSample:split=train:root={tmp_path / 'depth'}", "--val-dataset",
                 f"DepthSample:split=val:root={tmp_path / 'depth'}", "--output-dir", str(tmp_path / "dpt"), "--no-progress",
                 *depth]) == 0
    lines = [json.loads(l) for l in (tmp_path / "dpt" / "training_metrics.json").read_text().splitlines()]
    assert "grad_loss" in lines[-1] and "sig_loss" in lines[-1]
    result = json.loads((tmp_path / "dpt" / "results_eval_depth.json").read_text())
    assert result["images"] == 2 and result["rmse"] > 0


def test_two_process_torchrun_training(demo_teacher, tmp_path):
    """Under torchrun both ranks once took the run folder's lock (rank 1 failed), the sharded backbone, read
    through get_intermediate_layers rather than forward, mixed DTensor and Tensor parameters, and head.pth held the
    sharded head's DTensors (no other process could load it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dinokit.dense.generated import write_dense_sample

    write_dense_sample("seg", tmp_path / "seg", counts={"train": 4, "val": 2})
    data = tmp_path / "seg"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--master_port=29543", "-m", "dinokit",
           "dense", "train", "--task", "seg", "--head", "linear", "--pretrained-weights", str(demo_teacher.snapshot),
           "--device", "cpu", "--train-dataset", f"SegSample:split=train:root={data}",
           "--val-dataset", f"SegSample:split=val:root={data}", "--output-dir", str(tmp_path / "out"), "--no-progress",
           "iterations=3", "batch_size=2", "crop_size=48", "base_size=64", "eval_size=0", "eval_mode=whole",
           "num_workers=0", "checkpoint_period=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mIoU" in proc.stdout and (tmp_path / "out" / "head.pth").is_file()
    saved = torch.load(tmp_path / "out" / "head.pth", weights_only=True)["state_dict"]
    assert type(saved["decode_head.conv_seg.weight"]) is torch.Tensor and saved["decode_head.conv_seg.weight"].shape[0] == 9
    trained = json.loads((tmp_path / "out" / "results_eval_segmentation.json").read_text())
    assert trained["images"] == 2
    assert not (tmp_path / "out" / ".dinokit.lock").exists()
    # eval and predict share the images between the ranks (each rank once did all of them and wrote the same files)
    launch = lambda port: [cmd[0], "--nproc_per_node=2", f"--master_port={port}", "-m", "dinokit"]  # noqa: E731
    head = str(tmp_path / "out" / "head.pth")
    proc = subprocess.run([*launch(29544), "dense", "eval", "--head-weights", head, "--val-dataset",
                           f"SegSample:split=val:root={data}", "--output-dir", str(tmp_path / "ev"), "--no-progress",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("mIoU") == 1
    pooled = json.loads((tmp_path / "ev" / "results_eval_segmentation.json").read_text())
    assert (pooled["mIoU"], pooled["IoU"], pooled["images"]) == (trained["mIoU"], trained["IoU"], 2)
    proc = subprocess.run([*launch(29545), "dense", "predict", str(data / "val" / "images"), "--head", head, "--out",
                           str(tmp_path / "pred"), "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote 2 picture(s)") == 1 and len(list((tmp_path / "pred").iterdir())) == 2


def test_predict_keeps_images_of_the_same_name_from_different_folders(tmp_path, capsys):
    """a/x0.png and b/x0.png (and an input really named x0-2.png) give three pictures, none overwritten, each named
    after its folder where the file names clash (they were x0 and x0-3: which was which could not be told)."""
    rng = np.random.default_rng(0)
    for rel in ("a/x0.png", "b/x0.png", "b/x0-2.png"):
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((28, 28, 3)) * 255).astype(np.uint8)).save(tmp_path / "in" / rel)
    (tmp_path / "in" / "a" / "bad.png").write_bytes(b"not an image")
    head = _official_seg_head(tmp_path / "head.pth")
    out = tmp_path / "pred"
    assert main(["dense", "predict", str(tmp_path / "in"), "--head", str(head), "--out", str(out), "--size", "28",
                 "--model", "dinov2_vits14", "--random-init", "--device", "cpu"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a_x0_seg.png", "b_x0_seg.png", "x0-2_seg.png"]
    assert f"wrote 3 picture(s) to {out}; skipped 1 unreadable image(s)" in capsys.readouterr().out
    # each picture holds its own input (left half), so none was overwritten by another
    lefts = {name: np.asarray(Image.open(out / name))[:, :28] for name in written}
    assert len({v.tobytes() for v in lefts.values()}) == 3
    # nothing readable: one line, and no empty --out folder left behind
    assert main(["dense", "predict", str(tmp_path / "in" / "a" / "bad.png"), "--head", str(head), "--out",
                 str(tmp_path / "none"), "--model", "dinov2_vits14", "--random-init", "--device", "cpu"]) == 2
    # (the skip warning comes first when pytest does not capture warnings)
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: none of the 1 image(s) could be read")
    assert not (tmp_path / "none").exists()
    # one image: --out may name the picture itself (it made a folder called one.png); several: one line
    common = ["--head", str(head), "--size", "28", "--model", "dinov2_vits14", "--random-init", "--device", "cpu"]
    assert main(["dense", "predict", str(tmp_path / "in" / "b" / "x0.png"), "--out", str(tmp_path / "one.png"),
                 *common]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {tmp_path / 'one.png'}")
    assert (tmp_path / "one.png").read_bytes() == (out / "b_x0_seg.png").read_bytes()
    assert main(["dense", "predict", str(tmp_path / "in"), "--out", str(tmp_path / "all.png"), *common]) == 2
    assert "names one picture, but there are 4 images; give a folder instead" in capsys.readouterr().err
    assert not (tmp_path / "all.png").exists()


def test_predict_caps_a_panoramas_long_side(tmp_path, monkeypatch):
    """--size 28 on a 400x20 panorama predicts at 112x6 (long side at most 4x the size), not at 560x28; a 4000x50
    panorama at --size 448 used to become a 35840x448 input. Ordinary images keep the short side exactly."""
    import dinokit.dense.inference as inference
    from dinokit.data.transforms import short_side_size

    assert short_side_size(20, 400, 28, max_aspect=4) == (6, 112) and short_side_size(20, 400, 28) == (28, 560)
    assert short_side_size(50, 100, 28, max_aspect=4) == (28, 56)
    assert short_side_size(5, 4000, 448, max_aspect=4) == (2, 1792)
    Image.new("RGB", (400, 20), (90, 20, 20)).save(tmp_path / "pano.png")
    Image.new("RGB", (30, 40), (20, 90, 20)).save(tmp_path / "photo.png")
    seen = []
    original = inference.predict_image

    def spy(model, image, *args, **kwargs):
        seen.append(tuple(image.shape[-2:]))
        return original(model, image, *args, **kwargs)

    monkeypatch.setattr(inference, "predict_image", spy)
    head = _official_seg_head(tmp_path / "head.pth")
    assert main(["dense", "predict", str(tmp_path / "pano.png"), str(tmp_path / "photo.png"), "--head", str(head),
                 "--out", str(tmp_path / "pred"), "--size", "28", "--model", "dinov2_vits14", "--random-init",
                 "--device", "cpu"]) == 0
    assert seen == [(6, 112), (37, 28)]  # photo: 30x40 -> short side 28 (+0.5 rounding of 37.3)


def test_predict_uses_the_inference_saved_with_the_head(tmp_path, monkeypatch):
    """predict ran every head on the whole image at its own size, whatever the head was saved (or released) with;
    its --mode said "[as saved with the head]". A flag changes only its own setting."""
    import dinokit.dense.inference as inference

    Image.new("RGB", (40, 30), (90, 20, 20)).save(tmp_path / "photo.png")
    seen = []
    original = inference.predict_image

    def spy(model, image, size, cfg, *args, **kwargs):
        seen.append((tuple(image.shape[-2:]), cfg.mode, cfg.crop, cfg.stride, cfg.flip))
        return original(model, image, size, cfg, *args, **kwargs)

    monkeypatch.setattr(inference, "predict_image", spy)
    head = _official_seg_head(tmp_path / "head.pth")  # an official linear head: 512 px short side, 512/341 windows
    common = ["dense", "predict", str(tmp_path / "photo.png"), "--head", str(head), "--model", "dinov2_vits14",
              "--random-init", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "a.png"), "--size", "28"]) == 0
    assert main([*common, "--out", str(tmp_path / "b.png"), "--size", "28", "--mode", "whole", "--flip"]) == 0
    assert seen == [((28, 37), "slide", 512, 341, False), ((28, 37), "whole", 512, 341, True)]


def test_augmented_training_resumes_exactly_with_any_number_of_workers(demo_teacher, tmp_path, capsys):
    """Each item's augmentation once drew from its worker's running random state, and the loader's worker seed from
    the global generator (shifting the head's dropout masks): a resumed run trained another head (mIoU 5.63 against
    5.71-6.98). Draws now come from (seed, batch, position): 0 workers, 1 worker, and a resume agree to the bit."""
    from dinokit.dense.generated import write_dense_sample

    write_dense_sample("seg", tmp_path / "seg", counts={"train": 4, "val": 2})
    data = f"SegSample:split=%s:root={tmp_path / 'seg'}"

    def run(out, workers):
        assert main(["dense", "train", "--task", "seg", "--head", "linear",
                     "--config-file", str(demo_teacher.config_file),
                     "--train-dataset", data % "train", "--val-dataset", data % "val", "--output-dir", str(out),
                     "--no-progress", "iterations=6", "batch_size=2", "crop_size=28", "base_size=40", "eval_period=0",
                     "checkpoint_period=3", "eval_size=0", "eval_mode=whole", "warmup_iters=2", "dropout=0.5",
                     f"num_workers={workers}"]) == 0
        return torch.load(next(out.glob("eval/*/head.pth")), weights_only=True)["teacher"]

    straight = run(tmp_path / "a", 0)
    assert all(torch.equal(straight[k], v) for k, v in run(tmp_path / "b", 1).items())
    last = sorted((tmp_path / "b" / "checkpoints").iterdir())[-1]
    last.unlink()  # the run stopped after its checkpoint at iteration 3
    for stale in [*(tmp_path / "b").glob("results_*"), *(tmp_path / "b" / "eval").rglob("head.pth")]:
        stale.unlink()
    capsys.readouterr()
    resumed = run(tmp_path / "b", 0)
    assert "resumed from iteration 3" in capsys.readouterr().out
    assert all(torch.equal(straight[k], v) for k, v in resumed.items())


def test_a_resumed_depth_run_does_not_warm_its_loss_up_again(demo_teacher, tmp_path, capsys):
    """SigLoss counted its calls in memory: a depth run resumed after its warm-up went through the warm-up again
    (another head, RMSE 1.86 against 1.85). The warm-up now follows the iteration: a resume agrees to the bit."""
    from dinokit.dense.generated import write_dense_sample

    write_dense_sample("depth", tmp_path / "depth", counts={"train": 4, "val": 2})
    data = f"DepthSample:split=%s:root={tmp_path / 'depth'}"

    def run(out):
        assert main(["dense", "train", "--task", "depth", "--head", "linear",
                     "--config-file", str(demo_teacher.config_file),
                     "--train-dataset", data % "train", "--val-dataset", data % "val", "--output-dir", str(out),
                     "--no-progress", "iterations=6", "batch_size=2", "crop_size=28", "eval_period=0",
                     "checkpoint_period=3", "sig_warm_up=2", "num_workers=0"]) == 0
        return torch.load(next(out.glob("eval/*/head.pth")), weights_only=True)["teacher"]

    straight = run(tmp_path / "a")
    run(tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "checkpoint_0000006.pth").unlink()  # stopped after iteration 3's checkpoint
    for stale in [*(tmp_path / "b").glob("results_*"), *(tmp_path / "b" / "eval").rglob("head.pth")]:
        stale.unlink()
    capsys.readouterr()
    resumed = run(tmp_path / "b")
    assert "resumed from iteration 3" in capsys.readouterr().out
    assert all(torch.equal(straight[k], v) for k, v in resumed.items())
