"""ImageNet in the official layout: scanning, the extra metadata files, targets, errors, the data CLI."""

import shutil

import numpy as np
import pytest
from PIL import Image

from dinokit.cli import main
from dinokit.data import make_dataset
from dinokit.data.imagenet import NO_CLASS, dump_imagenet_extra, make_imagenet_dataset, scan_entries
from dinokit.errors import DinokitError

WNIDS = ("n01440764", "n01443537")
NAMES = ("tench, Tinca tinca", "goldfish")


def _jpeg(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path, format="JPEG")


@pytest.fixture
def imagenet(tmp_path):
    """2 classes x 3 images in train and val, 6 test images, labels.txt with a quoted comma."""
    root = tmp_path / "imagenet"
    for c, wnid in enumerate(WNIDS):
        for k, n in enumerate((5, 12, 100)):
            _jpeg(root / "train" / wnid / f"{wnid}_{n}.JPEG", 10 * c + k)
            _jpeg(root / "val" / wnid / f"ILSVRC2012_val_{3 * c + k + 1:08d}.JPEG", 10 * c + k)
    for i in range(1, 7):
        _jpeg(root / "test" / f"ILSVRC2012_test_{i:08d}.JPEG", i)
    (root / "labels.txt").write_text("".join(f'{w},"{n}"\n' for w, n in zip(WNIDS, NAMES)))
    return root


def test_scan_train_entries(imagenet):
    entries = scan_entries(imagenet, "TRAIN")
    assert entries.dtype.names == ("actual_index", "class_index", "class_id", "class_name")
    assert entries.dtype["actual_index"] == np.dtype("<u4") and entries.dtype["class_index"] == np.dtype("<u4")
    # sorted file names within a class, as ImageFolder: "_100" < "_12" < "_5"
    assert entries["actual_index"].tolist() == [100, 12, 5, 100, 12, 5]
    assert entries["class_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert entries["class_id"].tolist() == [WNIDS[0]] * 3 + [WNIDS[1]] * 3
    assert entries["class_name"][0] == "tench, Tinca tinca"


def test_scan_test_entries(imagenet):
    entries = scan_entries(imagenet, "test")
    assert entries["actual_index"].tolist() == [1, 2, 3, 4, 5, 6]
    assert (entries["class_index"] == NO_CLASS).all() and NO_CLASS == np.uint32(4294967295)


def test_dump_and_load_round_trip(imagenet, tmp_path):
    extra = tmp_path / "extra"
    written = dump_imagenet_extra(imagenet, extra)
    assert sorted(p.name for p in written) == sorted(
        [f"entries-{s}.npy" for s in ("TRAIN", "VAL", "TEST")]
        + [f"class-{kind}-{s}.npy" for kind in ("ids", "names") for s in ("TRAIN", "VAL")]
    )
    for split in ("TRAIN", "VAL", "TEST"):
        np.testing.assert_array_equal(np.load(extra / f"entries-{split}.npy"), scan_entries(imagenet, split))
    assert np.load(extra / "class-ids-VAL.npy").tolist() == list(WNIDS)
    assert np.load(extra / "class-names-TRAIN.npy").tolist() == list(NAMES)

    from_extra = make_imagenet_dataset(split="VAL", root=str(imagenet), extra=str(extra))
    scanned = make_imagenet_dataset(split="VAL", root=str(imagenet))
    assert list(from_extra.paths) == list(scanned.paths) and from_extra.targets == scanned.targets
    assert from_extra.classes == list(WNIDS) and from_extra.class_names == list(NAMES)


def test_items_targets_and_paths(imagenet, tmp_path):
    dump_imagenet_extra(imagenet, tmp_path / "extra")
    ds = make_dataset(f"ImageNet:split=VAL:root={imagenet}:extra={tmp_path / 'extra'}")
    assert len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]
    assert ds.paths[4] == imagenet / "val" / WNIDS[1] / "ILSVRC2012_val_00000005.JPEG"
    index, image, target = ds[4]
    assert (index, target) == (4, 1) and image.size == (8, 8)
    train = make_dataset(f"ImageNet:split=TRAIN:root={imagenet}")
    assert train.paths[0] == imagenet / "train" / WNIDS[0] / f"{WNIDS[0]}_100.JPEG"
    assert all(p.is_file() for p in train.paths)
    test = make_dataset(f"ImageNet:split=TEST:root={imagenet}:extra={tmp_path / 'extra'}")
    assert test.targets == [-1] * 6 and test.paths[0].name == "ILSVRC2012_test_00000001.JPEG"


def test_subset_keeps_full_set_class_indices(imagenet):
    # labels.txt lists a class with no folder: the indices follow labels.txt, not the folders present.
    (imagenet / "labels.txt").write_text(f"{WNIDS[0]},tench\nn01443000,other\n{WNIDS[1]},goldfish\n")
    ds = make_imagenet_dataset(split="TRAIN", root=str(imagenet))
    assert sorted(set(ds.targets)) == [0, 2] and len(ds.classes) == 3


def test_without_labels_txt_classes_are_the_train_folders(imagenet):
    (imagenet / "labels.txt").unlink()
    ds = make_imagenet_dataset(split="VAL", root=str(imagenet))
    assert ds.classes == list(WNIDS) and ds.class_names == list(WNIDS)


def test_synset_mapping_format_is_accepted(imagenet):
    (imagenet / "labels.txt").write_text(f"{WNIDS[0]} tench\n{WNIDS[1]} goldfish, Carassius auratus\n")
    ds = make_imagenet_dataset(split="TRAIN", root=str(imagenet))
    assert ds.class_names == ["tench", "goldfish, Carassius auratus"]


def test_missing_extra_files_name_the_command(imagenet, tmp_path):
    with pytest.raises(DinokitError, match="dinokit data imagenet-extra --root .* --extra "):
        make_imagenet_dataset(split="TRAIN", root=str(imagenet), extra=str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: _jpeg(r / "train" / WNIDS[0] / "photo.JPEG", 0), "unexpected file"),
        (lambda r: _jpeg(r / "train" / WNIDS[0] / f"{WNIDS[1]}_1.JPEG", 0), "folder of another class"),
        (lambda r: _jpeg(r / "train" / "n09999999" / "n09999999_1.JPEG", 0), "not listed in labels.txt"),
    ],
)
def test_layout_errors(imagenet, mutate, match):
    mutate(imagenet)
    with pytest.raises(DinokitError, match=match):
        make_imagenet_dataset(split="TRAIN", root=str(imagenet))


def test_argument_errors(imagenet, tmp_path):
    with pytest.raises(DinokitError, match="split must be one of"):
        make_imagenet_dataset(split="DEV", root=str(imagenet))
    with pytest.raises(DinokitError, match="split must be one of"):
        make_dataset(f"ImageNet:root={imagenet}")
    with pytest.raises(DinokitError, match="needs root"):
        make_dataset("ImageNet:split=TRAIN")
    with pytest.raises(DinokitError, match="does not exist"):
        make_imagenet_dataset(split="TRAIN", root=str(tmp_path / "missing"))


def test_cli_imagenet_extra(imagenet, tmp_path, capsys):
    extra = tmp_path / "extra"
    assert main(["data", "imagenet-extra", "--root", str(imagenet), "--extra", str(extra)]) == 0
    assert (extra / "entries-TRAIN.npy").is_file()
    assert "ImageNet:split=TRAIN" in capsys.readouterr().out
    assert main(["data", "imagenet-extra", "--root", str(tmp_path / "missing"), "--extra", str(extra)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_imagenet_extra_refuses_a_file_and_writes_nothing_on_a_bad_root(imagenet, tmp_path, capsys):
    """F25/F28: --extra a file gave a raw OSError; a bad root left a half-filled --extra folder."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["data", "imagenet-extra", "--root", str(imagenet), "--extra", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --extra {str(afile)!r} is a file, not a folder; give a folder for the metadata files\n"
    assert main(["data", "imagenet-extra", "--root", str(imagenet), "--extra", str(afile / "sub")]) == 2
    assert capsys.readouterr().err == (f"error: --extra {str(afile / 'sub')!r} cannot be created: {str(afile)!r} is "
                                       "a file; give a folder you can write to\n")
    assert afile.read_text() == "x"
    not_imagenet = tmp_path / "not_imagenet"
    shutil.copytree(imagenet, not_imagenet)
    first = next((not_imagenet / "val").rglob("*.JPEG"))
    first.rename(first.with_name("x0.png"))  # not named as ImageNet names files: found after TRAIN was scanned
    assert main(["data", "imagenet-extra", "--root", str(not_imagenet), "--extra", str(tmp_path / "ie2")]) == 2
    assert "unexpected file" in capsys.readouterr().err and not (tmp_path / "ie2").exists()
