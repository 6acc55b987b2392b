"""``dinokit eval knn|linear|logreg`` end to end on a small built-in sample set with a tiny backbone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import dinokit.eval.feature_cache as feature_cache
from dinokit.cli import main
from dinokit.data import make_classification_eval_transform, write_sample_dataset
from dinokit.data.images import load_image
from dinokit.eval import build_eval_backbone
from dinokit.config import load_config, write_config
from test_knn import one_thread  # noqa: F401  (autouse fixture)

TINY_CONFIG = "student:\n  arch: vit_pico\n  patch_size: 8\ncrops:\n  global_crops_size: 32\n"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = write_sample_dataset(tmp_path_factory.mktemp("sample"), counts={"train": 6, "val": 3})
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    return root, config


def args(sample, out, *extra):
    root, config = sample
    return [
        "--output-dir", str(out), "--train-dataset", f"ImageFolder:root={root / 'train'}",
        "--val-dataset", str(root / "val"), "--config-file", str(config), "--image-size", "32",
        "--num-workers", "0", "--device", "cpu", "--no-progress", *extra,
    ]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_knn_and_logreg_extract_once_each_with_their_official_transforms(sample, tmp_path, capsys, monkeypatch):
    """k-NN reads Resize(256/224 x crop) + CenterCrop, logistic regression Resize(crop) + CenterCrop as the official
    code does, so each caches its own features; a second run of either reads its cache."""
    seen = []
    extract = feature_cache.extract_features

    def recorded(model, dataset, *a, **k):
        seen.append(next(t for t in dataset.transform.transforms if hasattr(t, "resize_size")).resize_size)
        return extract(model, dataset, *a, **k)

    monkeypatch.setattr(feature_cache, "extract_features", recorded)
    assert main(["eval", "knn", *args(sample, tmp_path, "--nb-knn", "1", "5", "--n-per-class-list", "-1", "2")]) == 0
    out = capsys.readouterr().out
    assert "random" in out and "48 train / 24 val images, 8 classes" in out and "top-1" in out
    lines = read_lines(tmp_path / "results_eval_knn.json")
    # few-shot rows, as the official code: the listed k up to n_per_class, and n_per_class itself
    assert [(r["n_per_class"], r["k"]) for r in lines] == [(-1, 1), (-1, 5), (2, 1), (2, 2)]
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in lines)
    assert len(list((tmp_path / "features").glob("*/*-cls-*.pt"))) == 2
    assert main(["eval", "logreg", *args(sample, tmp_path, "--c-grid-size", "3", "--max-iter", "50")]) == 0
    assert seen == [37, 37, 32, 32]  # --image-size 32: 32 x 256/224 for k-NN, 32 for logistic regression
    assert len(list((tmp_path / "features").glob("*/*-cls-*.pt"))) == 4
    (result,) = read_lines(tmp_path / "results_eval_logreg.json")
    assert result["backend"] == "sklearn" and len(result["holdout_top1"]) == 3 and 0 <= result["top1"] <= 100
    assert "best C" in capsys.readouterr().out

    def no_extraction(*a, **k):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(feature_cache, "extract_features", no_extraction)
    assert main(["eval", "logreg", *args(sample, tmp_path, "--c-grid-size", "3", "--max-iter", "50")]) == 0
    assert main(["eval", "knn", *args(sample, tmp_path, "--nb-knn", "1", "5", "--gather-on-cpu")]) == 0
    assert read_lines(tmp_path / "results_eval_knn.json")[-2:] == lines[:2]  # the same, the train features in CPU memory
    # other decoding settings decode other pixels: not the cached features (they were reused)
    monkeypatch.setenv("DINOKIT_IMAGE_BACKGROUND", "black")
    with pytest.raises(AssertionError, match="should come from the cache"):
        main(["eval", "logreg", *args(sample, tmp_path, "--c-grid-size", "3", "--max-iter", "50")])


def test_linear_saves_hub_heads_and_feeds_knn_cache(sample, tmp_path, capsys, monkeypatch):
    extra = ("--epochs", "2", "--epoch-length", "5", "--batch-size", "16", "--learning-rates", "0.01", "0.1")
    assert main(["eval", "linear", *args(sample, tmp_path, *extra, "--no-augment")]) == 0
    (result,) = read_lines(tmp_path / "results_eval_linear.json")
    assert result["iterations"] == 10 and result["augment"] is False and len(result["classifiers"]) == 8
    assert result["top1"] == max(result["classifiers"].values())
    # the official periodic evaluation, every --epoch-length iterations before the end: printed and recorded
    (periodic,) = result["periodic"]
    assert periodic["iteration"] == 5 and periodic["best_classifier"] in result["classifiers"]
    for name, layers in (("linear_head_1.pth", 1), ("linear_head_4.pth", 4)):
        head = torch.load(tmp_path / name, weights_only=True)
        assert head["weight"].shape == (8, (1 + layers) * 64) and head["bias"].shape == (8,)
    out = capsys.readouterr().out
    assert "best:" in out
    assert f"iteration 5 of 10: val top-1 {periodic['top1']:.2f} (best probe: {periodic['best_classifier']})\n" in out
    # what is trained is said first (the official 12,500 iterations run long on a CPU, silently with --no-progress)
    assert out.index("training 8 linear probes (2 learning rates x 4 feature layouts) for 10 iterations (2 epochs "
                     "of 5), batch 16 per process, on cached features\n") < out.index("best:")
    # k-NN after a cached-features probe reuses the cached class tokens: no second extraction.
    monkeypatch.setattr(feature_cache, "extract_features", lambda *a, **k: pytest.fail("extracted again"))
    assert main(["eval", "knn", *args(sample, tmp_path, "--nb-knn", "3")]) == 0
    monkeypatch.undo()
    assert main(["eval", "knn", *args(sample, tmp_path / "fresh", "--nb-knn", "3", "--no-cache")]) == 0
    cached, fresh = read_lines(tmp_path / "results_eval_knn.json"), read_lines(tmp_path / "fresh/results_eval_knn.json")
    assert cached == fresh


@pytest.mark.parametrize("augment", [False, True])
def test_a_killed_linear_evaluation_resumes_from_its_running_checkpoint(sample, tmp_path, capsys, monkeypatch, augment):
    """The official running checkpoint, each epoch: a run killed in its second epoch resumes at the end of the first.
    It ends with the uninterrupted run's heads, bit for bit, on cached features and on augmented images (each crop
    drawn from its own seed; the workers' running random states once gave a resumed run other crops). Another
    evaluation in the folder is one line."""
    from dinokit.eval import linear, linear_data

    extra = ["--epochs", "2", "--epoch-length", "4", "--batch-size", "8", "--learning-rates", "0.05", "0.1",
             *([] if augment else ["--no-augment"])]
    assert main(["eval", "linear", *args(sample, tmp_path / "whole", *extra)]) == 0
    stream = linear_data.cached_batches if not augment else linear_data.augmented_batches

    def killed(*a, **k):
        for i, batch in enumerate(stream(*a, **k)):
            if i == 6:  # two batches into the second epoch
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(linear, "cached_batches" if not augment else "augmented_batches", killed)
    assert main(["eval", "linear", *args(sample, tmp_path / "cut", *extra)]) == 130
    monkeypatch.undo()
    running = tmp_path / "cut" / "running_checkpoint_linear_eval.pth"
    assert running.is_file() and not (tmp_path / "cut" / "results_eval_linear.json").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / running.name).write_bytes(running.read_bytes())
    capsys.readouterr()
    # the periodic records so far were made every 4 iterations: another period would mix them
    assert main(["eval", "linear", *args(sample, tmp_path / "cut", *extra, "--eval-period-iterations", "1")]) == 2
    assert "with other settings (eval_period differ)" in capsys.readouterr().err
    older = torch.load(running, weights_only=True)  # a running checkpoint of a version that did not record them
    older["identity"] = {k: v for k, v in older["identity"].items()
                         if k not in ("eval_period", "val_metric_type", "crop_draws")}
    torch.save(older, running)
    assert main(["eval", "linear", *args(sample, tmp_path / "cut", *extra)]) == 0
    out = capsys.readouterr().out
    assert "resuming at iteration 4 of 8 from" in out
    # one without crop_draws drew its augmented crops otherwise (the workers' running states): said once
    assert out.count(f"note: {running} comes from an older dinokit, which drew the crops otherwise: the probes go on, "
                     "but they will not be those of an unbroken run") == int(augment)
    assert not running.exists()  # the results are the finished record: a rerun starts afresh
    whole, cut = read_lines(tmp_path / "whole/results_eval_linear.json"), read_lines(tmp_path / "cut/results_eval_linear.json")
    assert whole[0]["iterations"] == cut[0]["iterations"] == 8
    assert [p["iteration"] for p in cut[0]["periodic"]] == [4]  # kept by the running checkpoint, not done again
    assert whole[0]["classifiers"] == cut[0]["classifiers"] and whole[0]["periodic"] == cut[0]["periodic"]
    for name in ("linear_head_1.pth", "linear_head_4.pth"):
        a, b = (torch.load(tmp_path / run / name, weights_only=True) for run in ("whole", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # another evaluation where one is unfinished: one line, nothing overwritten
    assert main(["eval", "linear", *args(sample, tmp_path / "other", *extra, "--seed", "3")]) == 2
    assert "holds an unfinished linear evaluation with other settings (seed differ" in capsys.readouterr().err
    # another image size (or backbone, or dtype) is another evaluation too: it resumed and mixed the probes
    assert main(["eval", "linear", *args(sample, tmp_path / "other", *extra, "--image-size", "40")]) == 2
    assert "with other settings (backbone differ" in capsys.readouterr().err
    assert (tmp_path / "other" / running.name).is_file() and not (tmp_path / "other" / "linear_head_1.pth").exists()


def test_linear_scores_the_best_classifier_on_test_datasets(sample, tmp_path, capsys):
    """--test-datasets (official option): the best classifier on each, by its metric. The val set itself gives the
    val top-1 (its classes are balanced, so per-class mean too); a set of two classes is matched to train's by
    name. A wrong path or metric is one line before any training."""
    import shutil

    root, _ = sample
    two = tmp_path / "two"
    for name in sorted(p.name for p in (root / "val").iterdir())[-2:]:  # not a prefix: relabelled by name
        shutil.copytree(root / "val" / name, two / name)
    extra = ["--epochs", "1", "--epoch-length", "5", "--batch-size", "16", "--learning-rates", "0.1", "--no-augment",
             "--test-datasets", str(root / "val"), str(root / "val"), str(two),
             "--test-metric-types", "mean_accuracy", "mean_per_class_accuracy", "mean_accuracy"]
    assert main(["eval", "linear", *args(sample, tmp_path / "out", *extra)]) == 0
    (result,) = read_lines(tmp_path / "out" / "results_eval_linear.json")
    tests = result["tests"]  # keyed by dataset: the val set named twice is one entry, the last metric
    assert tests[str(root / "val")] == {"metric": "mean_per_class_accuracy", "value": pytest.approx(result["top1"]),
                                        "images": 24}
    assert tests[str(two)]["images"] == 6 and 0 <= tests[str(two)]["value"] <= 100
    out = capsys.readouterr().out
    assert f"test {two}: mean_accuracy" in out and "note: the test dataset has 2 of the train dataset's 8 classes" in out
    for bad, message in ((["--test-datasets", str(tmp_path / "none")], "does not exist"),
                         (["--test-datasets", str(two), "--test-metric-types", "top5"],
                          "--test-metric-types 'top5' is not one of mean_accuracy, mean_per_class_accuracy")):
        assert main(["eval", "linear", *args(sample, tmp_path / "bad", *extra[:9], *bad)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad" / "linear_head_best.pth").exists()


def test_linear_test_sets_with_class_mappings_and_imagenet_real_labels(sample, tmp_path, capsys):
    """--test-class-mapping-fpaths (official): the test set keeps its own labels and the best classifier's outputs
    are those its mapping names. On two classes, the right mapping can only gain on name matching, and the swapped
    one turns every right answer wrong: their accuracies sum to 100. ImageNet-ReaL: each image's own label as its
    real labels gives the plain accuracy; every class as real labels gives 100, the image without any left out."""
    import numpy as np

    root, _ = sample
    classes = sorted(p.name for p in (root / "val").iterdir())
    two = tmp_path / "two"
    for name in classes[-2:]:
        shutil.copytree(root / "val" / name, two / name)
    np.save(tmp_path / "right.npy", np.array([len(classes) - 2, len(classes) - 1]))
    np.save(tmp_path / "swapped.npy", np.array([len(classes) - 1, len(classes) - 2]))
    imagenet = tmp_path / "imagenet"  # the sample val set in ImageNet's layout, numbered in class order
    n = 0
    for name in classes:
        for image in sorted((root / "val" / name).iterdir()):
            n += 1
            (imagenet / "val" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, imagenet / "val" / name / f"ILSVRC2012_val_{n:08d}.JPEG")
    (imagenet / "labels.txt").write_text("".join(f"{c},{c}\n" for c in classes))
    own = [[c] for c in range(len(classes)) for _ in range(n // len(classes))]
    (tmp_path / "own.json").write_text(json.dumps(own))
    (tmp_path / "all.json").write_text(json.dumps([[]] + [list(range(len(classes)))] * (n - 1)))
    val = f"ImageNet:split=VAL:root={imagenet}"
    sets = [str(two), f"ImageFolder:root={two}", f"{two}/", val, f"{val}:real_labels={tmp_path / 'own.json'}",
            f"{val}:real_labels={tmp_path / 'all.json'}"]
    extra = ["--epochs", "1", "--epoch-length", "5", "--batch-size", "16", "--learning-rates", "0.1", "--no-augment",
             "--test-datasets", *sets,
             "--test-metric-types", *["mean_accuracy"] * 4, "imagenet_real_accuracy", "imagenet_real_accuracy",
             "--test-class-mapping-fpaths", "None", str(tmp_path / "right.npy"), str(tmp_path / "swapped.npy"),
             *["None"] * 3]
    assert main(["eval", "linear", *args(sample, tmp_path / "out", *extra)]) == 0
    (result,) = read_lines(tmp_path / "out" / "results_eval_linear.json")
    by_name, right, swapped, plain, own_real, all_real = (result["tests"][s]["value"] for s in sets)
    assert right >= by_name and right + swapped == pytest.approx(100.0)
    assert own_real == pytest.approx(plain) and all_real == 100.0 and n == 24
    assert result["tests"][sets[-1]]["images_with_real_labels"] == 23  # the first image has none: left out
    assert "imagenet_real_accuracy 100.00 (24 images)" in capsys.readouterr().out
    for bad, message in ((["--test-metric-types", "imagenet_real_accuracy"], "imagenet_real_accuracy needs the ReaL "
                           "labels; give the ImageNet validation set with them"),
                         (["--test-class-mapping-fpaths", str(tmp_path / "none.npy")],
                          "none.npy' cannot be read (No such file"),
                         (["--test-class-mapping-fpaths", str(tmp_path / "right.npy"), "None"],
                          "--test-class-mapping-fpaths gives 2 values for 1 --test-datasets")):
        assert main(["eval", "linear", *args(sample, tmp_path / "bad", *extra[:9], "--test-datasets", val, *bad)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad" / "linear_head_best.pth").exists()


def test_linear_ranks_by_the_val_metric_type_and_starts_afresh_with_no_resume(sample, tmp_path, capsys):
    """--val-metric-type mean_per_class_accuracy (official) chooses the classifiers by it: the result records it, and
    the val set scored as a test set by that metric gives the same value. --no-resume starts over an unfinished
    evaluation with other settings (which would otherwise be one line)."""
    root, _ = sample
    lopsided = tmp_path / "lopsided"  # 3 images of the first class, 1 of each other
    for i, folder in enumerate(sorted((root / "val").iterdir())):
        for image in sorted(folder.iterdir())[: 3 if i == 0 else 1]:
            (lopsided / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, lopsided / folder.name / image.name)
    extra = ["--epochs", "1", "--epoch-length", "5", "--batch-size", "16", "--learning-rates", "0.01", "0.1",
             "--no-augment", "--val-metric-type", "mean_per_class_accuracy", "--eval-period-iterations", "2",
             "--test-datasets", str(lopsided), "--test-metric-types", "mean_per_class_accuracy"]
    run = args(sample, tmp_path / "out", *extra)
    run[run.index("--val-dataset") + 1] = str(lopsided)
    (tmp_path / "out").mkdir()
    torch.save({"identity": {"seed": 99}}, tmp_path / "out" / "running_checkpoint_linear_eval.pth")
    assert main(["eval", "linear", *run]) == 2
    assert "holds an unfinished linear evaluation with other settings" in capsys.readouterr().err
    assert main(["eval", "linear", *run, "--no-resume"]) == 0
    (result,) = read_lines(tmp_path / "out" / "results_eval_linear.json")
    assert result["val_metric_type"] == "mean_per_class_accuracy"
    assert result["val_value"] == pytest.approx(result["tests"][str(lopsided)]["value"])
    assert [p["iteration"] for p in result["periodic"]] == [2, 4]  # chosen by the val metric type, which they record
    assert all(set(p) == {"iteration", "best_classifier", "top1", "mean_per_class_accuracy"} for p in result["periodic"])
    assert "mAcc" in capsys.readouterr().out
    assert not (tmp_path / "out" / "running_checkpoint_linear_eval.pth").exists()


def test_the_image_counts_leave_out_unreadable_images(sample, tmp_path, capsys):
    """The counts printed are the images read: an unreadable training file is named as skipped, not counted."""
    root, _ = sample
    shutil.copytree(root / "train", tmp_path / "train")
    (tmp_path / "train" / "dots" / "broken.png").write_bytes(b"not an image")
    run = args(sample, tmp_path / "out", "--nb-knn", "1")
    run[run.index("--train-dataset") + 1] = str(tmp_path / "train")
    assert main(["eval", "knn", *run]) == 0
    assert "k-NN (T=0.07): 48 train (1 unreadable skipped) / 24 val images, 8 classes" in capsys.readouterr().out
    # the augmented linear probes read the training images as they train: an epoch of 7 batches of 8 meets all 49
    linear = [*run[:run.index("--nb-knn")], "--epochs", "1", "--epoch-length", "7", "--batch-size", "8",
              "--learning-rates", "0.1", "--n-last-blocks", "1"]
    assert main(["eval", "linear", *linear]) == 0
    assert "48 train (1 unreadable skipped) / 24 val images" in capsys.readouterr().out  # it said 49 train


def test_linear_with_augmentation(sample, tmp_path, capsys):
    extra = ("--epochs", "1", "--epoch-length", "3", "--batch-size", "8", "--learning-rates", "0.1",
             "--n-last-blocks", "1", "50", "--eval-period-iterations", "0")
    # a value beyond the depth is left out, and said so (not silently)
    with pytest.warns(UserWarning, match="--n-last-blocks 50 left out: the backbone has 4 blocks"):
        assert main(["eval", "linear", *args(sample, tmp_path, *extra)]) == 0
    (result,) = read_lines(tmp_path / "results_eval_linear.json")
    assert result["augment"] is True and result["n_last_blocks"] == 1 and result["periodic"] == []  # only the end
    assert set(result["head_files"]) == {"best", "layers_1"}
    assert not list((tmp_path / "features").glob("*/train-*"))  # training images go through the backbone
    assert ("training 2 linear probes (1 learning rate x 2 feature layouts) for 3 iterations (1 epoch of 3), batch 8 "
            "per process, on augmented images (the backbone runs at every step; --no-augment trains on cached "
            "features, much faster)") in capsys.readouterr().out


def test_teacher_checkpoint_finds_its_run_config(sample, tmp_path, capsys):
    root, config_file = sample
    config = load_config(str(config_file))
    torch.manual_seed(7)
    backbone = build_eval_backbone(config).eval()
    write_config(config, tmp_path / "run")
    snapshot = tmp_path / "run" / "eval" / "training_99" / "teacher_checkpoint.pth"
    snapshot.parent.mkdir(parents=True)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, snapshot)
    out = tmp_path / "out"
    cli_args = ["--output-dir", str(out), "--train-dataset", str(root / "train"), "--val-dataset", str(root / "val"),
                "--pretrained-weights", str(snapshot), "--image-size", "32", "--num-workers", "0", "--device", "cpu",
                "--no-progress", "--nb-knn", "5"]
    assert main(["eval", "knn", *cli_args]) == 0
    assert "using the training config" in capsys.readouterr().out
    (val_file,) = (out / "features").glob("*/val-cls-*.pt")
    cached = torch.load(val_file, weights_only=True)
    first = sorted((root / "val").rglob("*.png"))[0]
    image = make_classification_eval_transform(crop_size=32)(load_image(first))
    with torch.no_grad():
        torch.testing.assert_close(cached["features"]["cls"][0], backbone(image[None])[0], rtol=1e-5, atol=1e-5)


def error_of(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_raw_pixels_baseline_is_a_one_nearest_neighbour_on_the_images(sample, tmp_path, capsys):
    root, _ = sample
    argv = [a for a in args(sample, tmp_path) if a not in ("--config-file", str(sample[1]))]
    assert main(["eval", "knn", *argv, "--raw-pixels", "--nb-knn", "1"]) == 0
    (line,) = read_lines(tmp_path / "results_eval_knn.json")
    assert line["weights"] == "raw pixels" and not (tmp_path / "features").exists()  # nothing cached
    # by hand: the eval transform (resize 36, centre crop 32, normalise), flattened, cosine 1-NN
    transform = make_classification_eval_transform(crop_size=32)
    classes = sorted(p.name for p in (root / "train").iterdir())

    def split(name):
        paths = sorted((root / name).glob("*/*"))
        feats = torch.stack([transform(load_image(p)).flatten() for p in paths])
        return torch.nn.functional.normalize(feats, dim=1), torch.tensor([classes.index(p.parent.name) for p in paths])

    (xt, yt), (xv, yv) = split("train"), split("val")
    expected = 100 * (yt[(xv @ xt.T).argmax(1)] == yv).float().mean().item()
    assert line["top1"] == pytest.approx(expected, abs=1e-4) and 0 < expected < 100
    # a backbone option with it is refused before any work (no output folder made)
    for extra in (["--model", "dinov2_vits14"], ["--config-file", str(sample[1])], ["--random-init"]):
        err = error_of(capsys, ["eval", "knn", *argv, "--raw-pixels", *extra])
        assert err == f"error: --raw-pixels evaluates the images themselves, without a backbone; drop {extra[0]}"
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "new")
    error_of(capsys, ["eval", "knn", *argv, "--raw-pixels", "--model", "dinov2_vits14"])
    assert not (tmp_path / "new").exists()
