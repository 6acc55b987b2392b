"""Checks made before any work, and what results say about their own trust: read-only outputs, weights files
that are not state dicts, unknown devices, the sample set beside a user's files, the k-NN monitor's datasets,
classes that can never be classified right, where numbers came from, atomic appends, failed downloads."""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from dinokit.cli import main as cli_main
from dinokit.config import load_config
from dinokit.data import write_sample_dataset
from dinokit.errors import DinokitError

from tiny import FullDisk, error_line, tiny_run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("sample"), counts={"train": 1, "val": 1}, image_size=32)


def _train(out: Path, images: Path, *extra: str, device: str = "cpu") -> list[str]:
    return ["train", "--output-dir", str(out), "--device", device, *tiny_run(),
            f"train.dataset_path=ImageFolder:root={images / 'train'}", *extra]


# ---------------------------------------------------------------------------------------------- read-only outputs
def _read_only(folder: Path, monkeypatch) -> None:
    """Make ``folder`` read-only; as root (which writes anyway) the permission check is told so."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: (False if Path(p) == folder and mode & os.W_OK
                                                                else real(p, mode, **k)))


_FOLDER = "error: {opt} '{ro}' is not writable; give a folder you can write to"
_FILE = "error: --out '{ro}/out.{ext}' cannot be written: '{ro}' is not writable; give a path you can write to"
READ_ONLY_CASES = {
    "train": (["train", "--output-dir", "{ro}", "--device", "cpu", "train.dataset_path={images}"], _FOLDER),
    "distill": (["distill", "--teacher", "{images}", "--output-dir", "{ro}", "--device", "cpu"], _FOLDER),
    "embed": (["embed", "{images}", "--out", "{ro}/out.npz", "--model", "dinov2_vits14", "--random-init"], _FILE),
    "eval": (["eval", "knn", "--output-dir", "{ro}", "--train-dataset", "{images}", "--val-dataset", "{images}",
              "--model", "dinov2_vits14", "--random-init"], _FOLDER),
    "dense train": (["dense", "train", "--task", "seg", "--head", "linear", "--model", "dinov2_vits14",
                     "--random-init", "--train-dataset", "{images}", "--val-dataset", "{images}", "--output-dir", "{ro}"],
                    _FOLDER),
    "dense eval": (["dense", "eval", "--head-weights", "{images}/h.pth", "--val-dataset", "{images}", "--output-dir",
                    "{ro}"], _FOLDER),
    "dense predict": (["dense", "predict", "{images}", "--head", "{images}/h.pth", "--out", "{ro}"], _FOLDER),
    "viz pca": (["viz", "pca", "{images}", "--out", "{ro}", "--random-init"], _FOLDER),
    "viz attention": (["viz", "attention", "{images}", "--out", "{ro}", "--random-init"], _FOLDER),
    "viz match": (["viz", "match", "{images}/a.png", "{images}/b.png", "--out", "{ro}/out.png", "--random-init"],
                  _FILE),
    "curate": (["curate", "run", "--pool", "{images}", "--output-dir", "{ro}"], _FOLDER),
}


@pytest.mark.parametrize("command", list(READ_ONLY_CASES))
def test_read_only_output_is_one_line_before_any_work(command, tmp_path, capsys, monkeypatch):
    argv, message = READ_ONLY_CASES[command]
    ro = tmp_path / "ro"
    _read_only(ro, monkeypatch)
    fields = {"ro": ro, "images": tmp_path, "ext": argv[argv.index("--out") + 1][-3:] if "--out" in argv else "",
              "opt": "--out" if "--out" in argv else "--output-dir"}
    try:
        assert cli_main([a.format(**fields) for a in argv]) == 2
    finally:
        ro.chmod(0o755)
    assert capsys.readouterr().err.strip() == message.format(**fields)
    assert not list(ro.iterdir())


# ---------------------------------------------------------------------------------------------- weights files
def test_weights_files_that_are_not_state_dicts_are_one_line(tmp_path, capsys):
    import pickle

    bare, plain, torn = tmp_path / "bare.pth", tmp_path / "plain.pth", tmp_path / "torn.pth"
    torch.save(torch.zeros(3), bare)
    with open(plain, "wb") as f:
        pickle.dump({"w": [1.0, 2.0]}, f, protocol=4)
    torch.save({"w": torch.zeros(1000)}, torn)
    torn.write_bytes(torn.read_bytes()[:300])
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    expected = {
        bare: f"checkpoint '{bare}' holds a Tensor, not a dict of named tensors; save model.state_dict() (or a "
              ".safetensors file) instead",
        plain: f"checkpoint '{plain}' is a plain Python pickle, not a torch.save file, and will not be unpickled; "
               "save its tensors with torch.save(state_dict, path) or as .safetensors",
        torn: f"cannot read checkpoint '{torn}': the file is corrupt or truncated (PytorchStreamReader failed reading "
              "zip archive: failed finding central directory)",
    }
    for path, message in expected.items():
        code = cli_main(["embed", str(image), "--out", str(tmp_path / "e.npz"), "--model", "dinov2_vits14",
                         "--weights", str(path), "--device", "cpu", "--no-progress"])
        assert code == 2
        line = error_line(capsys)
        assert line == f"error: {message}" and "weights_only" not in line


def test_unknown_device_is_one_line(images, tmp_path, capsys):
    assert cli_main(_train(tmp_path / "run", images, device="gpu")) == 2
    assert error_line(capsys) == "error: unknown device 'gpu'; use auto, cpu, cuda or cuda:N"
    # embed and viz too (they listed argparse choices, which refused cuda:N), before anything is written
    image = next((images / "train").rglob("*.png"))
    for command in (["embed", str(image), "--out", str(tmp_path / "e.npz")],
                    ["viz", "pca", str(image), "--out", str(tmp_path / "viz")]):
        for device in ("gpu", "meta"):
            assert cli_main([*command, "--model", "dinov2_vits14", "--random-init", "--device", device]) == 2
            assert error_line(capsys) == f"error: unknown device '{device}'; use auto, cpu, cuda or cuda:N"
    assert not (tmp_path / "e.npz").exists() and not (tmp_path / "viz").exists()


# ---------------------------------------------------------------------------------------------- sample set
def test_sample_set_never_overwrites_a_users_file(tmp_path, capsys):
    mine = tmp_path / "train" / "blobs" / "blobs_0000.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own picture")
    assert cli_main(["data", "sample", "--out", str(tmp_path)]) == 2
    assert error_line(capsys) == (f"error: {mine} already exists and is not part of the sample set; it is left as it is: "
                              "give an empty or new folder")
    assert mine.read_bytes() == b"my own picture"
    # files of an interrupted earlier call are the sample set's own: completing the set keeps them
    mine.unlink()
    write_sample_dataset(tmp_path / "again", counts={"train": 1}, image_size=16)
    next((tmp_path / "again").glob(".complete-v*")).unlink()
    write_sample_dataset(tmp_path / "again", counts={"train": 1}, image_size=16)
    assert len(list((tmp_path / "again" / "train").rglob("*.png"))) == 8


# ---------------------------------------------------------------------------------------------- pre-flight
def test_unreadable_knn_dataset_stops_before_the_first_step(images, tmp_path, capsys):
    out, missing = tmp_path / "run", tmp_path / "nowhere"
    code = cli_main(_train(out, images, f"evaluation.knn_dataset.train=ImageFolder:root={images / 'train'}",
                          f"evaluation.knn_dataset.val=ImageFolder:root={missing}"))
    assert code == 2
    line = error_line(capsys)
    assert line.startswith("error: evaluation.knn_dataset.val: ") and str(missing) in line
    assert line.endswith("(or evaluation.knn_dataset=null to skip the k-NN monitor)")
    assert not out.exists()  # nothing was written
    # a val class that train lacks: said at start too (it stopped the run at its first evaluation, hours in)
    import shutil

    shutil.copytree(images / "val", tmp_path / "val")
    first = sorted(p for p in (tmp_path / "val").iterdir())[0]
    first.rename(first.with_name("zz_unknown"))
    code = cli_main(_train(out, images, f"evaluation.knn_dataset.train=ImageFolder:root={images / 'train'}",
                          f"evaluation.knn_dataset.val=ImageFolder:root={tmp_path / 'val'}"))
    assert code == 2
    line = error_line(capsys)
    assert line.startswith("error: evaluation.knn_dataset: the val dataset has classes the train dataset lacks (1 of ")
    assert line.endswith("(or evaluation.knn_dataset=null to skip the k-NN monitor)") and not out.exists()


def test_texture_knn_with_the_users_images_is_said_at_start(images, tmp_path, capsys):
    import shutil

    from dinokit.eval.monitor import check_knn_datasets

    check_knn_datasets("Sample:split=TRAIN", "Sample:split=VAL", f"ImageFolder:root={images / 'train'}")
    assert capsys.readouterr().out == ""  # the sample set itself, written out by `dinokit data sample`: no note
    shutil.copytree(images / "train" / "blobs", tmp_path / "mine" / "cats")
    mine = f"ImageFolder:root={tmp_path / 'mine'}"
    check_knn_datasets("Sample:split=TRAIN", "Sample:split=VAL", mine)
    assert capsys.readouterr().out.strip() == (
        f"note: evaluation.knn_dataset is the built-in texture set while train.dataset_path is {mine}: the logged "
        "knn_top1 describes textures; set evaluation.knn_dataset.train/val to labelled folders of yours, or "
        "evaluation.knn_dataset=null")
    check_knn_datasets("Sample:split=TRAIN", "Sample:split=VAL", "Sample:split=TRAIN")
    assert capsys.readouterr().out == ""
    for missing in (f"ImageFolder:root={tmp_path / 'typo'}", str(tmp_path / "typo"), "ImageNet:split=TRAIN"):
        check_knn_datasets("Sample:split=TRAIN", "Sample:split=VAL", missing)  # its own error follows, alone
        assert capsys.readouterr().out == ""


def test_val_images_that_are_training_images_are_a_warning(images, tmp_path, capsys):
    import shutil

    from dinokit.data import make_dataset
    from dinokit.eval.monitor import check_knn_datasets
    from dinokit.eval.results import shared_images_warning

    train = images / "train"
    check_knn_datasets(f"ImageFolder:root={train}", f"{train}/", f"ImageFolder:root={train}")  # the same files
    n, first = len(list(train.rglob("*.png"))), sorted(train.rglob("*.png"))[0]
    assert capsys.readouterr().out.strip() == (
        f"warning: {n} of the {n} evaluation.knn_dataset.val images are also evaluation.knn_dataset.train images "
        f"(first: {first}): every one of them finds itself, and the accuracies are inflated; hold the "
        "evaluation.knn_dataset.val images out of the evaluation.knn_dataset.train set")
    val = tmp_path / "val"
    shutil.copytree(train, val)  # copies are other files: curation's job, not this check
    assert shared_images_warning(make_dataset(str(train)), make_dataset(str(val))) is None
    listing = tmp_path / "val.txt"  # one training image listed among the val ones
    files = [first, *sorted(val.rglob("*.png"))]
    listing.write_text("".join(f"{p},{i % 2}\n" for i, p in enumerate(files)))
    assert shared_images_warning(make_dataset(str(train)), make_dataset(f"FileList:path={listing}")).startswith(
        f"warning: 1 of the {len(files)} val images are also train images (first: {first})")
    assert cli_main(["eval", "knn", "--random-init", "--model", "dinov2_vits14", "--train-dataset",
                     f"FileList:path={listing}", "--val-dataset", f"FileList:path={listing}", "--output-dir",
                     str(tmp_path / "knn"), "--image-size", "28", "--device", "cpu", "--no-progress",
                     "--nb-knn", "1"]) == 0
    assert f"warning: {len(files)} of the {len(files)} val images are also train images" in capsys.readouterr().out
    (line,) = [json.loads(line) for line in (tmp_path / "knn" / "results_eval_knn.json").read_text().splitlines()]
    assert line["warnings"][0].startswith(f"warning: {len(files)} of the {len(files)} val images")  # recorded


def test_many_empty_class_folders_are_one_short_line(tmp_path):
    from dinokit.data import make_dataset

    for i in range(40):
        (tmp_path / f"class_with_a_long_name_{i:02d}").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "class_with_a_long_name_00" / "a.png")
    with pytest.raises(DinokitError) as err:
        make_dataset(f"ImageFolder:root={tmp_path}", labelled=True)
    assert str(err.value) == (
        f"39 class folder(s) of '{tmp_path}' contain no images (class_with_a_long_name_01, class_with_a_long_name_02, "
        "class_with_a_long_name_03, ...); add images or remove the folder")


# ---------------------------------------------------------------------------------------------- evaluation trust
def test_knn_says_when_its_numbers_cannot_be_trusted(capsys):
    from dinokit.eval.knn import evaluate_knn

    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(12, 8, generator=g), torch.randn(8, 8, generator=g)
    train_y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2])  # class 3 has no (readable) training image
    test_y = torch.tensor([0, 1, 2, 3, 3, 0, 1, 2])
    evaluate_knn(train_x, train_y, test_x, test_y, num_classes=4, ks=(3,))
    assert capsys.readouterr().out.splitlines() == [
        "warning: 1 val class(es) have no readable training image (class 3): their 25.0% of the val images can never "
        "be classified right",
        "note: with 4 classes top-5 is 100% by construction; read top-1 only",
    ]
    evaluate_knn(train_x, train_y, test_x[test_y < 3], test_y[test_y < 3], num_classes=10, ks=(3,))
    assert capsys.readouterr().out == ""
    # one class: top-1 is 100% too (the note said "1 classes" and "read top-1 only")
    evaluate_knn(train_x, torch.zeros(12, dtype=torch.long), test_x, torch.zeros(8, dtype=torch.long), num_classes=1,
                 ks=(3,))
    assert capsys.readouterr().out.splitlines() == [
        "note: with 1 class top-1 and top-5 are 100% by construction and say nothing of the features; give images of "
        "at least 2 classes"]


@pytest.fixture(scope="module")
def untrusted(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Train classes a, b and c (c's images all unreadable); val classes a, b, c and d (d only in val); the weights
    of a tiny backbone and its config."""
    from dinokit.eval import build_eval_backbone

    root = tmp_path_factory.mktemp("untrusted")
    for split, classes in (("train", "abc"), ("val", "abcd")):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                if split == "train" and name == "c":
                    (root / split / name / f"{i}.png").write_bytes(b"not an image")
                else:
                    Image.new("RGB", (16, 16), (60 * c, 40 * i, 200)).save(root / split / name / f"{i}.png")
    config = root / "tiny.yaml"
    config.write_text("student:\n  arch: vit_pico\n  patch_size: 8\ncrops:\n  global_crops_size: 16\n")
    torch.manual_seed(0)
    weights = root / "w.pth"
    torch.save(build_eval_backbone(load_config(str(config))).state_dict(), weights)
    return root, config, weights


@pytest.mark.parametrize("protocol, extra", [
    ("knn", ["--nb-knn", "2"]),
    ("linear", ["--epochs", "1", "--epoch-length", "2", "--batch-size", "4", "--learning-rates", "0.1",
                "--n-last-blocks", "1"]),
    ("logreg", ["--c-grid-size", "2", "--max-iter", "20"]),
])
def test_eval_says_when_its_numbers_cannot_be_trusted_and_where_they_came_from(untrusted, tmp_path, capsys,
                                                                              protocol, extra):
    root, config, weights = untrusted
    out = tmp_path / "out"
    argv = ["eval", protocol, "--output-dir", str(out), "--train-dataset", str(root / "train"), "--val-dataset",
            f"ImageFolder:root={root / 'val'}", "--config-file", str(config), "--pretrained-weights", str(weights),
            "--image-size", "16", "--num-workers", "0", "--device", "cpu", "--no-progress", *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped images' own lines
        assert cli_main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    unusable = ("warning: 2 val class(es) have no readable training image (class 2 ('c'), 3 ('d')): their 50.0% of "
                "the val images can never be classified right")  # named by folder too (the numbers alone were opaque)
    assert unusable in printed
    top5 = "note: with 4 classes top-5 is 100% by construction; read top-1 only"
    assert (top5 in printed) == (protocol != "linear")  # the linear probes report top-1 only
    (line,) = [json.loads(x) for x in (out / f"results_eval_{protocol}.json").read_text().splitlines()]
    assert line["weights"] == str(weights.resolve())
    assert (line["train_dataset"], line["val_dataset"]) == (str(root / "train"), f"ImageFolder:root={root / 'val'}")
    assert line["warnings"] == [unusable] + ([top5] if protocol != "linear" else [])


def test_results_are_appended_atomically(tmp_path, monkeypatch):
    from dinokit.eval.results import append_results
    from dinokit.files import _mount_point

    path = tmp_path / "results_eval_knn.json"
    append_results(path, [{"top1": 1.0}])
    append_results(path, [{"top1": 2.0}, {"top1": 3.0}])
    assert [json.loads(x)["top1"] for x in path.read_text().splitlines()] == [1.0, 2.0, 3.0]

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(DinokitError) as err:
        append_results(path, [{"top1": 4.0}])
    monkeypatch.undo()
    assert str(err.value) == (f"no space left on {_mount_point(path)} while writing {path}; the partial file was "
                              "removed and the previous file is intact: free some space (or use another disk) and rerun")
    assert [json.loads(x)["top1"] for x in path.read_text().splitlines()] == [1.0, 2.0, 3.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results_eval_knn.json"]


def test_download_failure_names_weights_and_random_init():
    from dinokit.models.weight_files import COMMAND_LINE, load_state_dict_file

    command = COMMAND_LINE.set(True)  # as under a command (Python callers: test_checkpoint)
    try:
        with pytest.raises(DinokitError) as err:
            load_state_dict_file("http://127.0.0.1:9/w.pth")  # nothing listens on port 9: refused at once
    finally:
        COMMAND_LINE.reset(command)
    assert str(err.value).startswith("could not download http://127.0.0.1:9/w.pth (")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "w.pth"
    assert str(err.value).endswith(f"); check the network connection, or fetch the file another way and put it at "
                                   f"{cached} (found there from then on), or pass its local path with --weights FILE "
                                   "(or use --random-init)")


def test_images_much_smaller_than_the_crops_get_a_note(tmp_path):
    from dinokit.cli.train import start_banner
    from dinokit.data import make_dataset
    from dinokit.train.data import small_images_note

    for i, side in enumerate((30, 40, 45, 300)):  # median short side: 45 (the upper middle)
        Image.new("RGB", (side + 7, side)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")  # unreadable: left out of the median, no error
    cfg = load_config(None, [f"train.dataset_path={tmp_path}", "crops.global_crops_size=224", "crops.local_crops_size=98",
                             "student.patch_size=14", "evaluation.knn_dataset=null"])
    assert start_banner(cfg, tmp_path / "out", "cpu").splitlines()[1] == (
        "note: these images are small (median short side 45 px of those sampled): the 224-px global crops enlarge "
        "them at least 5.0x, most of each crop is interpolated; crops near the images' size, e.g. "
        "crops.global_crops_size=42 crops.local_crops_size=14 (now 224 and 98), cost about 28x less per step")
    dataset = make_dataset(str(tmp_path), labelled=False)
    cfg.crops.global_crops_size = 134  # enlarged less than 3x: no note
    assert small_images_note(cfg.crops, dataset, 14) is None
    cfg.crops.global_crops_size = [224, 140]  # DINOv3's mixed resolutions: the largest counts
    cfg.crops.local_crops_size = [98, 56]
    assert "the 224-px global crops enlarge them at least 5.0x" in small_images_note(cfg.crops, dataset, 14)


class _Refuses(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise DinokitError(f"image {i} is bad; fix it")


def test_a_user_error_raised_in_a_loader_worker_keeps_its_one_line():
    # torch re-raises it with the worker's traceback as the message; DinokitError unwraps it.
    with pytest.raises(DinokitError) as err:
        next(iter(torch.utils.data.DataLoader(_Refuses(), num_workers=1)))
    assert str(err.value) == "image 0 is bad; fix it"
    assert str(DinokitError("Caught nothing")) == "Caught nothing"  # other text unchanged


def test_disk_full_while_writing_embeddings_is_one_line(tmp_path, capsys, monkeypatch):
    import dinokit.cli.embed as embed_module
    from dinokit.files import _mount_point

    for i in range(3):
        Image.new("RGB", (16, 16), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    out = tmp_path / "emb.npz"
    monkeypatch.setattr(FullDisk, "room", 100)
    monkeypatch.setattr(embed_module, "open", lambda path, mode="r", *a, **k: FullDisk(path, mode.replace("b", "")),
                        raising=False)
    code = cli_main(["embed", str(tmp_path), "--out", str(out), "--model", "dinov2_vits14", "--random-init",
                     "--image-size", "28", "--device", "cpu", "--no-progress"])
    assert code == 2
    assert error_line(capsys) == (f"error: no space left on {_mount_point(out)} while writing {out}; the partial file was "
                              "removed and nothing else was changed: free some space (or use another disk) and rerun")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png", "1.png", "2.png"]
