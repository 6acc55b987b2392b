"""Dataset strings and image files: ImageFolder, FileList, Sample, bad items, user errors, ``dinokit data sample``."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main
from dinokit.data import SAMPLE_CLASSES, collate_skip_bad, make_dataset, parse_dataset_str, resolve_image_inputs
from dinokit.errors import DinokitError


def _png(path, value=0, size=(6, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """root/cat/{0,1}.png, root/dog/0.png, a loose root/extra.png."""
    root = tmp_path / "images"
    _png(root / "cat" / "0.png", 10)
    _png(root / "cat" / "1.png", 11)
    _png(root / "dog" / "0.png", 20)
    _png(root / "extra.png", 30)
    return root


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    from dinokit.data import write_sample_dataset

    return write_sample_dataset(tmp_path_factory.mktemp("sample"))


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ImageFolder:root=/data/x", ("ImageFolder", {"root": "/data/x"})),
        ("/data/x", ("ImageFolder", {"root": "/data/x"})),
        ("C:/data/x", ("ImageFolder", {"root": "C:/data/x"})),
        ("ImageNet:split=VAL:root=C:/in1k:extra=/e", ("ImageNet", {"split": "VAL", "root": "C:/in1k", "extra": "/e"})),
        ("ImageFolder:root=s3://bucket/x", ("ImageFolder", {"root": "s3://bucket/x"})),
        ("WebDataset:urls=http://h/{0..9}.tar", ("WebDataset", {"urls": "http://h/{0..9}.tar"})),
    ],
)
def test_parse_dataset_str(text, expected):
    assert parse_dataset_str(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty dataset string"),
        ("Places:root=/x", "unknown dataset 'Places'"),
        ("ImageFolder:colour=red", "bad item"),
        ("ImageFolder:root=/data/x:foo=1", "unknown option 'foo' in dataset string 'ImageFolder:root=/data/x:foo=1'"),
        ("ImageFolder:path=/x", "does not take path"),
        ("FileList:root=/x", "does not take root"),
        ("ImageFolder", "needs root"),
        ("FileList", "needs path"),
        # the official vitl14/vitg14 presets name it: one line that says what to give instead
        ("ImageNet22k", r"dataset 'ImageNet22k' \('ImageNet22k'\) is the official ImageNet-22k reader .* which "
                        r"dinokit does not read; give the images as a folder \(ImageFolder:root=DIR\)"),
    ],
)
def test_bad_dataset_strings(text, match):
    with pytest.raises(DinokitError, match=match):
        make_dataset(text)


# ---------------------------------------------------------------- ImageFolder


def test_image_folder_labelled_and_unlabelled(folder):
    with pytest.warns(UserWarning) as said:  # the loose file has no class: left out, and said so (it was silent)
        labelled = make_dataset(f"ImageFolder:root={folder}", labelled=True)
    assert labelled.classes == ["cat", "dog"] and labelled.targets == [0, 0, 1]
    assert [str(w.message) for w in said] == [f"1 image(s) directly in {str(folder)!r} have no class folder and are "
                                              "left out (first: extra.png); move them into ROOT/<class>/"]
    index, image, target = labelled[2]
    assert (index, target) == (2, 1) and image.getpixel((0, 0)) == (20, 20, 20)
    unlabelled = make_dataset(str(folder))  # bare path
    assert len(unlabelled) == 4 and set(unlabelled.targets) == {-1} and unlabelled.classes == []


def test_image_folder_transform_is_applied(folder):
    ds = make_dataset(str(folder), transform=lambda im: torch.tensor(im.getpixel((0, 0))))
    assert ds[0][1].tolist() == [10, 10, 10]


def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(DinokitError, match="does not exist"):
        make_dataset(str(tmp_path / "missing"))
    listed = tmp_path / "list.txt"  # a file where a folder is expected: the line says what to write instead
    listed.write_text("a.png\n")
    hint = f"is a file, not a folder .*; for the images it lists use FileList:path={listed}$"
    with pytest.raises(DinokitError, match=hint):
        make_dataset(str(listed))
    image = next(folder.rglob("*.png"))
    with pytest.raises(DinokitError, match=f"give the folder that holds the images, e.g. '{image.parent}'$"):
        make_dataset(f"ImageFolder:root={image}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DinokitError, match="no images found"):
        make_dataset(f"ImageFolder:root={tmp_path / 'empty'}")
    (folder / "bird").mkdir()
    with pytest.raises(DinokitError, match="contain no images"):
        make_dataset(str(folder), labelled=True)
    flat = tmp_path / "flat"
    _png(flat / "a.png")
    with pytest.raises(DinokitError, match="no class subfolders"):
        make_dataset(str(flat), labelled=True)


def test_bad_image_is_none_and_skipped_by_collate(folder):
    (folder / "dog" / "1.png").write_bytes(b"\x89PNG truncated")
    ds = make_dataset(str(folder), labelled=True, transform=lambda im: torch.zeros(3))
    assert ds.targets == [0, 0, 1, 1]
    with pytest.warns(UserWarning, match="unreadable"):
        items = [ds[i] for i in range(len(ds))]
    assert items[3] == (3, None, 1)
    batch = collate_skip_bad(items)
    assert batch["index"].tolist() == [0, 1, 2] and batch["bad"] == [3]
    assert batch["image"].shape == (3, 3) and batch["target"].tolist() == [0, 0, 1]
    empty = collate_skip_bad([items[3]])
    assert empty["image"] is None and empty["bad"] == [3]


def test_hidden_files_are_ignored(folder):
    _png(folder / ".thumbs" / "x.png")
    _png(folder / "cat" / ".hidden.png")
    assert len(make_dataset(str(folder))) == 4


def test_linked_class_folders_are_followed_once(folder, tmp_path):
    # A set assembled from links to class folders (torchvision's ImageFolder follows them too; they were not found:
    # "no images found"); a link back to a folder it lies in is not followed round and round.
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "cat").symlink_to(folder / "cat", target_is_directory=True)
    (linked / "dog").symlink_to(folder / "dog", target_is_directory=True)
    (linked / "dog" / "again").symlink_to(folder, target_is_directory=True)  # inside dog: back to images/
    ds = make_dataset(str(linked), labelled=True)
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 1, 1, 1, 1]
    again = linked / "dog" / "again"  # images/ through the link; its dog/ would be a loop (dog/again/dog/again/...)
    assert ds.paths == [linked / "cat" / "0.png", linked / "cat" / "1.png", linked / "dog" / "0.png",
                        again / "cat" / "0.png", again / "cat" / "1.png", again / "extra.png"]


# ---------------------------------------------------------------- FileList


def test_file_list_without_labels(folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\nimages/cat/0.png\n\n{folder / 'dog' / '0.png'}\n")
    ds = make_dataset(f"FileList:path={listing}")
    assert ds.paths == [folder / "cat" / "0.png", folder / "dog" / "0.png"]  # relative to the list's folder
    assert ds.targets == [-1, -1]
    with pytest.raises(DinokitError, match="has no labels"):
        make_dataset(f"FileList:path={listing}", labelled=True)


def test_file_list_with_labels(folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("images/cat/0.png,0\nimages/dog/0.png\t2\n")
    ds = make_dataset(f"FileList:path={listing}", labelled=True)
    assert ds.targets == [0, 2] and ds.classes == ["0", "1", "2"]
    assert ds[1][1].getpixel((0, 0)) == (20, 20, 20)
    listing.write_text("images/cat/0.png,0\nimages/dog/0.png\n")
    with pytest.raises(DinokitError, match="has no label"):
        make_dataset(f"FileList:path={listing}")


def test_file_list_errors(tmp_path):
    with pytest.raises(DinokitError, match="does not exist"):
        make_dataset(f"FileList:path={tmp_path / 'nope.txt'}")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DinokitError, match="names no images"):
        make_dataset(f"FileList:path={tmp_path / 'empty.txt'}")


def test_file_list_missing_files_are_named_once_when_read(folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("images/cat/0.png,0\nimages/cat/gone.png,1\nimages/dog/0.png,1\n/nowhere/x.png,0\n")
    with pytest.warns(UserWarning) as caught:
        ds = make_dataset(f"FileList:path={listing}", labelled=True)
    assert [str(w.message) for w in caught] == [
        f"2 of the 4 files listed in {listing} do not exist and are left out (first: {tmp_path / 'images/cat/gone.png'})"]
    assert ds.paths == [folder / "cat" / "0.png", folder / "dog" / "0.png"] and ds.targets == [0, 1]
    assert ds.classes == ["0", "1"]  # the labels of the list, kept as written
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading the kept files warns no more: nothing is retried per epoch
        assert all(ds[i][1] is not None for i in range(len(ds)))
    # a list none of whose files exists: one line, for a bare list (embed, viz) too
    listing.write_text("gone/a.png\ngone/b.png\n")
    for call in (lambda: make_dataset(f"FileList:path={listing}"), lambda: resolve_image_inputs(listing)):
        with pytest.raises(DinokitError, match=r"none of the 2 files listed in .* exists \(first: .*gone/a.png'\); relative"):
            call()


# ---------------------------------------------------------------- Sample


def test_sample_dataset(sample_root):
    train = make_dataset(f"Sample:split=TRAIN:root={sample_root}", labelled=True)
    val = make_dataset(f"Sample:split=val:root={sample_root}")
    assert len(train) == 8 * 80 and len(val) == 8 * 20
    assert tuple(train.classes) == SAMPLE_CLASSES
    assert np.bincount(train.targets).tolist() == [80] * 8
    _, image, target = val[0]
    assert image.size == (96, 96) and target == 0
    with pytest.raises(DinokitError, match="TRAIN or VAL"):
        make_dataset(f"Sample:split=TEST:root={sample_root}")


def test_sample_images_are_grey_textures_and_deterministic(sample_root, tmp_path):
    from dinokit.data.sample import MIN_CONTRAST, write_sample_dataset

    again = write_sample_dataset(tmp_path / "again", counts={"val": 2})
    for texture in SAMPLE_CLASSES:
        first = sample_root / "val" / texture / f"{texture}_0000.png"
        assert first.read_bytes() == (again / "val" / texture / first.name).read_bytes()  # same seed, same bytes
        pixels = np.asarray(Image.open(first).convert("RGB"), dtype=np.int32)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()  # grey
        low, high = np.percentile(pixels[..., 0], [10, 90])
        assert high - low > MIN_CONTRAST / 2, texture  # two tones, not a flat image


def test_sample_rewrite_replaces_an_older_version_but_keeps_user_files(tmp_path):
    from dinokit.data.sample import write_sample_dataset

    root = tmp_path / "sample"
    old_class = root / "train" / "circle"
    _png(old_class / "circle_0000.png")
    _png(old_class / "mine.png")  # not named as the writer names files: the user's
    _png(root / "val" / "square" / "square_0003.png")
    (root / ".complete-v3-96-0-train80-val20").touch()
    write_sample_dataset(root, counts={"train": 1, "val": 1})
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted([*SAMPLE_CLASSES, "circle"])
    assert [p.name for p in old_class.iterdir()] == ["mine.png"]
    assert sorted(p.name for p in (root / "val").iterdir()) == sorted(SAMPLE_CLASSES)
    assert not list(root.glob(".complete-v3*"))


def _write_sample_when_released(root: str, start, out) -> None:
    from dinokit.data.sample import write_sample_dataset

    start.wait()
    try:
        write_sample_dataset(root, counts={"train": 6, "val": 2}, image_size=24)
        out.put("ok")
    except Exception as err:  # reported to the test, which names it
        out.put(f"{type(err).__name__}: {err}")


def test_processes_writing_the_sample_set_at_once_all_succeed(tmp_path):
    """torchrun ranks (or parallel test workers) may write the same sample set together: a shared temporary
    file name made one of them fail with FileNotFoundError; each now writes its own."""
    import multiprocessing as mp

    from dinokit.data.sample import write_sample_dataset

    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    for attempt in range(3):
        root = tmp_path / f"sample{attempt}"
        procs = [ctx.Process(target=_write_sample_when_released, args=(str(root), start, out)) for _ in range(3)]
        for p in procs:
            p.start()
        start.set()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        start.clear()
        assert results == ["ok"] * 3
        assert not [p for p in root.rglob("*") if ".tmp" in p.name]
        reference = write_sample_dataset(tmp_path / "one", counts={"train": 6, "val": 2}, image_size=24)
        written = sorted(p.relative_to(root) for p in root.rglob("*.png"))
        assert written == sorted(p.relative_to(reference) for p in reference.rglob("*.png")) and len(written) == 64
        assert all((root / p).read_bytes() == (reference / p).read_bytes() for p in written)


def test_cli_sample_reports_counts(sample_root, capsys):
    assert main(["data", "sample", "--out", str(sample_root)]) == 0
    out = capsys.readouterr().out
    assert f"640 images in {sample_root / 'train'}" in out and f"160 images in {sample_root / 'val'}" in out


def test_cli_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = _png(tmp_path / "a_file.png")  # a file where a folder is needed
    assert main(["data", "sample", "--out", str(blocker / "sample")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err and len(err.splitlines()) == 1
    # F25: named as the option, not as a raw OSError about a class folder deep inside
    assert err == (f"error: --out {str(blocker / 'sample')!r} cannot be created: {str(blocker)!r} is a file; "
                   "give a folder you can write to\n")
    assert main(["data", "sample", "--out", str(blocker)]) == 2
    assert capsys.readouterr().err == f"error: --out {str(blocker)!r} is a file, not a folder; give a new or empty folder\n"
    assert blocker.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["a_file.png"]


def test_cli_sample_refuses_a_folder_that_is_not_a_sample_set(folder, tmp_path, capsys):
    """F24: ``data sample --out`` an existing image folder added eight class folders to it without a word."""
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert main(["data", "sample", "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "not a dinokit sample set" in err and len(err.splitlines()) == 1
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing written
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    assert main(["data", "sample", "--out", str(notes)]) == 2
    assert [p.name for p in notes.iterdir()] == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["data", "sample", "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and len(err.splitlines()) == 2  # one line per refusal above


def test_sample_root_check_accepts_new_empty_complete_and_interrupted_sets(tmp_path):
    from dinokit.data.sample import check_sample_root, write_sample_dataset

    check_sample_root(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_sample_root(tmp_path / "empty")
    done = write_sample_dataset(tmp_path / "done", counts={"train": 1, "val": 1}, image_size=16)
    check_sample_root(done)
    (tmp_path / "partial" / "train" / SAMPLE_CLASSES[0]).mkdir(parents=True)  # a first write cut short
    check_sample_root(tmp_path / "partial")
    (tmp_path / "partial" / "train" / "cat").mkdir()
    with pytest.raises(DinokitError, match="not a dinokit sample set"):
        check_sample_root(tmp_path / "partial")


def test_sample_dataset_string_refuses_a_users_folder(folder):
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(DinokitError, match=r"^Sample root '.*' is not empty and is not a dinokit sample set"):
        make_dataset(f"Sample:split=TRAIN:root={folder}")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_a_val_folder_with_some_of_the_classes_is_labelled_by_class_name(sample_root, tmp_path, capsys):
    # it was refused ("different classes"); numbering its two folders 0, 1 would have scored against the wrong ones
    import shutil

    from dinokit.eval.setup import load_eval_datasets

    root = sample_root
    for name in ("rings", "dots"):
        shutil.copytree(root / "val" / name, tmp_path / "some" / name)
    full_train, full_val, n = load_eval_datasets(str(root / "train"), str(root / "val"), image_size=28)
    train, val, n_some = load_eval_datasets(str(root / "train"), str(tmp_path / "some"), image_size=28)
    assert "the val dataset has 2 of the train dataset's 8 classes" in capsys.readouterr().out
    assert n_some == n == 8 and val.classes == full_val.classes
    by_name = {path.relative_to(root / "val"): t for path, t in zip(full_val.paths, full_val.targets)}
    assert [t for path, t in zip(val.paths, val.targets)] == [by_name[p.relative_to(tmp_path / "some")]
                                                              for p in val.paths]
    assert sorted(set(val.targets)) == sorted(full_val.classes.index(c) for c in ("dots", "rings"))
