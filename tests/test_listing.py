"""Finding image files (data/listing.py): folders listed in path order, lists, single images; the compact path
column the datasets hold; resolving paths a folder at a time."""

import pytest

from dinokit.data import make_dataset, resolve_image_inputs
from dinokit.errors import DinokitError
from test_datasets import _png, folder  # noqa: F401  (a fixture)


def test_resolve_image_inputs(folder, tmp_path):
    from dinokit.data import find_images
    from dinokit.data.listing import PathColumn

    found = resolve_image_inputs(folder)  # a PathColumn, as the datasets hold (no path object per image)
    assert isinstance(found, PathColumn) and found == find_images(folder) and len(found) == 4
    assert resolve_image_inputs(folder / "extra.png") == [folder / "extra.png"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'cat' / '1.png'}\ndog/0.png\n")
    (tmp_path / "dog").mkdir()
    _png(tmp_path / "dog" / "0.png")
    assert resolve_image_inputs(listing) == [folder / "cat" / "1.png", tmp_path / "dog" / "0.png"]
    with pytest.raises(DinokitError, match="does not exist"):
        resolve_image_inputs(tmp_path / "nope")


def test_folders_are_listed_in_path_order(tmp_path):
    """The listing was rewritten without a path object per file (a 1.28M-image folder took about 40 s to list and
    label): the order is still that of the paths (component by component, not as plain strings, where 'a-b/x'
    would come before 'a/x'), hence the same data order, classes and targets as before."""
    from pathlib import Path

    from dinokit.data.datasets import make_dataset
    from dinokit.data.listing import find_images

    names = ["a/x.png", "a-b/y.png", "a.b/z.png", "A/w.png", "a/b/c.png", "a/b-c.png", "b/é.png", "b/e.png",
             "b/.hidden.png", "b/notes.txt", ".cache/q.png", "a0/0.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    expected = sorted(tmp_path / n for n in names if ".hidden" not in n and ".cache" not in n and n.endswith(".png"))
    assert find_images(tmp_path) == expected
    assert [str(p) for p in find_images(tmp_path)] != sorted(str(p) for p in expected)  # not string order
    assert [Path(p) for p in make_dataset(f"ImageFolder:root={tmp_path}").paths] == expected  # unlabelled
    data = make_dataset(f"ImageFolder:root={tmp_path}", labelled=True)
    assert data.classes == ["A", "a", "a-b", "a.b", "a0", "b"]
    assert [Path(p) for p in data.paths] == expected
    assert data.targets == [data.classes.index(p.relative_to(tmp_path).parts[0]) for p in expected]


def test_a_link_to_itself_is_passed_over_not_the_rest_of_its_folder(tmp_path):
    """The faster listing asked each entry its kind inside one try for the whole folder: a link to itself (ELOOP)
    ended its folder's listing, and the images after it were lost without a word (640 -> 80 on the sample set)."""
    from dinokit.data.listing import find_images

    for name in ("a/1.png", "a/2.png", "a/3.png", "b/4.png", "5.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "loopy").symlink_to(tmp_path / "loopy")  # a folder-level link to itself
    (tmp_path / "a" / "0.png").symlink_to(tmp_path / "a" / "0.png")  # an image-named one
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == [
        "5.png", "a/1.png", "a/2.png", "a/3.png", "b/4.png"]


def test_path_column_holds_paths_as_two_objects_and_gives_them_back(tmp_path):
    """Datasets keep their paths in a PathColumn (one bytes object and an array of ends, shared by DataLoader
    workers instead of copied page by page); every path comes back as it went in, names that are not UTF-8 too."""
    import os
    import pickle
    from pathlib import Path

    from dinokit.data import ImageFiles
    from dinokit.data.listing import PathColumn

    odd = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name on a UTF-8 file system: a surrogate escape
    names = [tmp_path / "a.png", str(tmp_path / "sub" / "b.jpg"), tmp_path / odd, Path("rel/c.png"),
             "/x/\u00e9t\u00e9.png"]
    column = PathColumn(names)
    expected = [Path(n) for n in names]
    assert len(column) == 5 and list(column) == expected and [column[i] for i in range(5)] == expected
    assert column[-1] == expected[-1] and column[1:4] == expected[1:4] and column[::-2] == expected[::-2]
    assert column == expected and column == [str(p) for p in expected] and column != expected[:4]
    assert column != "a.png" and column != expected[::-1]
    assert os.fsencode(column[2]) == os.fsencode(tmp_path) + b"/caf\xe9.png"
    with pytest.raises(IndexError, match="out of range for 5 paths"):
        column[5]
    with pytest.raises(IndexError):
        column[-6]
    assert pickle.loads(pickle.dumps(column)) == expected  # as spawned DataLoader workers receive it
    assert len(PathColumn([])) == 0 and list(PathColumn([])) == []
    dataset = ImageFiles(names)
    assert isinstance(dataset.paths, PathColumn) and dataset.paths == expected and len(dataset) == 5
    assert ImageFiles(column).paths is column  # not copied again
    assert vars(column).keys() == {"_names", "_ends"}  # two objects, whatever the number of paths


def test_folder_datasets_keep_a_path_column(folder):
    from dinokit.data.listing import PathColumn

    for ds in (make_dataset(str(folder), labelled=True), make_dataset(str(folder))):
        assert isinstance(ds.paths, PathColumn)


def test_real_paths_resolve_as_path_resolve_does(tmp_path, monkeypatch):
    """curate's manifest resolved every path whole (a status read per component of each: minutes for millions of
    paths on a network file system); folders are now resolved once, a linked file still to its target."""
    import os
    from pathlib import Path

    from dinokit.data.listing import real_paths

    real = tmp_path / "real"
    _png(real / "a.png")
    _png(real / "sub" / "b.png")
    (tmp_path / "linked").symlink_to(real)  # a linked folder
    (real / "c.png").symlink_to(real / "sub" / "b.png")  # a linked file
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")  # a link to itself
    monkeypatch.chdir(real)
    inputs = [tmp_path / "linked" / "a.png", str(tmp_path / "linked" / "sub" / ".." / "a.png"), real / "c.png",
              tmp_path / "linked" / "c.png", "sub/b.png", tmp_path / "missing" / "x.png", os.fsdecode(b"caf\xe9.png"),
              tmp_path / "linked" / "sub" / "."]
    (tmp_path / "deep").symlink_to(real / "sub")  # '..' after a linked folder is its target's parent (real), not
    inputs.append(tmp_path / "deep" / ".." / "a.png")  # the link's (tmp_path)
    assert real_paths(inputs) == [str(Path(p).resolve()) for p in inputs]
    assert real_paths([tmp_path / "loop.png"]) == [str(tmp_path / "loop.png")]  # (Path.resolve raised)
    from dinokit.data.listing import PathColumn, absolute_paths

    for given in (inputs, PathColumn(inputs)):  # each folder made absolute once, as os.path.abspath does it
        assert absolute_paths(given) == [os.path.abspath(p) for p in given]
    assert list(PathColumn(inputs).strings()) == [str(Path(p)) for p in inputs]
    assert real_paths(inputs)[:5] == [str(real / "a.png"), str(real / "a.png"), str(real / "sub" / "b.png"),
                                      str(real / "sub" / "b.png"), str(real / "sub" / "b.png")]
