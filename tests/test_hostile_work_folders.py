"""Hostile inputs found by an audit: file names that are not UTF-8 in a .parquet, a damaged ``dinokit curate`` work
folder, a ``data shard --out`` that holds someone's files or lies in the source, a labels.txt listing a class twice.
Each is one line naming the file and the fix (or works), and nothing is lost or overwritten."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinokit.cli import main

# random-init vit_pico (the demo architecture) at 64 px; shards of 4 images: the 6-image pool has two
MODEL = ["--config-file", "demo", "--weights", "random", "--device", "cpu", "--no-progress",
         "embed.image_size=64", "embed.num_workers=0", "embed.shard_size=4"]


def _images(folder: Path, names, size: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        pixels = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, format="PNG")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err[len("error: "):-1]


# ---------------------------------------------------------------------------------------------- embed .parquet
def test_parquet_keeps_file_names_that_are_not_utf8_as_their_bytes(tmp_path, capsys):
    """A name that is not UTF-8 ended the .parquet output in a pyarrow UnicodeEncodeError traceback, after the
    embedding; the path column now holds every name's bytes, as <stem>.paths.txt of a .npy does."""
    pa = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "odd"
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    _images(folder, [odd, "plain.png"])
    common = ["--config-file", "demo", "--random-init", "--image-size", "28", "--num-workers", "0", "--device", "cpu",
              "--no-progress"]
    assert main(["embed", str(folder), "--out", str(tmp_path / "e.parquet"), "--patch-mean", *common]) == 0
    assert main(["embed", str(folder), "--out", str(tmp_path / "e.npz"), "--patch-mean", *common]) == 0
    table = pa.read_table(tmp_path / "e.parquet")
    ref = np.load(tmp_path / "e.npz")
    assert table.column_names == ["path", "cls", "patch_mean"] and str(table.schema.field("path").type) == "binary"
    names = table.column("path").to_pylist()
    assert names == [os.fsencode(p) for p in ref["paths"]] and os.fsencode(str(folder / odd)) in names
    assert [os.fsdecode(n) for n in names] == list(ref["paths"])  # the names to open, as Python spells them
    np.testing.assert_array_equal(np.array(table.column("cls").to_pylist(), dtype=np.float32), ref["cls"])
    np.testing.assert_array_equal(np.array(table.column("patch_mean").to_pylist(), dtype=np.float32),
                                  ref["patch_mean"])


# ---------------------------------------------------------------------------------------------- curate work folder
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished curation of 6 images (two embedding shards), and the command that made it."""
    root = tmp_path_factory.mktemp("hostile-curate")
    pool = _images(root / "pool", [f"p{i}.png" for i in range(6)])
    argv = ["curate", "run", "--pool", str(pool), "--output-dir", str(root / "work"), "--target-size", "3", *MODEL]
    assert main(argv) == 0
    return root / "work", argv


def _copy(work, tmp_path) -> tuple[Path, list[str]]:
    folder, argv = work
    shutil.copytree(folder, tmp_path / "w")
    return tmp_path / "w", [a if a != str(folder) else str(tmp_path / "w") for a in argv]


def _object_array(path: Path) -> None:
    np.save(path, np.array([1, "x", None], dtype=object))  # np.load refuses it without allow_pickle


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def _edit(path: Path, index: int, value: float) -> None:
    """An edited index file: entry ``index`` (of the first row of a 2-D array) set to ``value``."""
    array = np.load(path)
    (array if array.ndim == 1 else array[0])[index] = value
    np.save(path, array)


def _drop_count(path: Path, key: str) -> None:
    record = json.loads(path.read_text())
    del record["counts"][key]
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    "damage, stage, message",
    [
        (lambda w: (w / "config.json").write_text("{not json"), "report",
         "{w}/config.json is not readable JSON (JSONDecodeError); delete it and give the work folder's settings "
         "again: the stages that finished with them are kept"),
        (lambda w: (w / "config.json").write_text("[1, 2]"), "sample",
         "{w}/config.json is not a JSON object of settings (it holds a list); delete it and give the work folder's "
         "settings again: the stages that finished with them are kept"),
        (lambda w: (w / "config.json").write_text('{"pool": "x", "dedup": 3}'), "report",
         "curate key 'dedup' expects a section of keys (k, threshold, eval_threshold, center, keep, knn), got 3, in "
         "{w}/config.json; edit it, or delete it and give the work folder's settings again: the stages that "
         "finished with them are kept"),
        (lambda w: (w / "dedup" / "done.json").write_text("[1, 2]"), "sample",
         "{w}/dedup/done.json is damaged (not a stage record); delete it and rerun 'dinokit curate dedup' (or "
         "'dinokit curate run') to redo that stage"),
        (lambda w: _object_array(w / "dedup" / "kept.npy"), "report",
         "curate file {w}/dedup/kept.npy holds Python objects, which are not unpickled; rerun 'dinokit curate "
         "dedup --force' to recompute it"),
        (lambda w: _object_array(w / "sample" / "chosen.npy"), "report",
         "curate file {w}/sample/chosen.npy holds Python objects, which are not unpickled; rerun 'dinokit curate "
         "sample --force' to recompute it"),
        (lambda w: _object_array(w / "retrieve" / "selected.npy"), "cluster",
         "curate file {w}/retrieve/selected.npy holds Python objects, which are not unpickled; rerun 'dinokit curate "
         "retrieve --force' to recompute it"),
        (lambda w: np.save(w / "dedup" / "after_eval.npy", np.array(["a", "b"])), "retrieve",
         "curate file {w}/dedup/after_eval.npy holds a <U1 array of shape (2,), not 1-D numbers; rerun "
         "'dinokit curate dedup --force' to recompute it"),
        (lambda w: _truncate(w / "dedup" / "after_eval.npy"), "retrieve",
         "curate file {w}/dedup/after_eval.npy is cut short or damaged; rerun 'dinokit curate dedup --force' to "
         "recompute it"),
        (lambda w: _truncate(w / "cluster" / "leaf.rank0.npy"), "sample",
         "curate file {w}/cluster/leaf.rank0.npy is cut short or damaged; rerun 'dinokit curate cluster --force' "
         "to recompute it"),
        (lambda w: (w / "embed" / "pool" / "shard-00001.json").write_text("[]"), "dedup",
         "embeddings file {w}/embed/pool/shard-00001.json is damaged (not the record of a shard from image 4); "
         "delete it and rerun 'dinokit curate embed --force' to recompute that shard"),
        (lambda w: (w / "embed" / "pool" / "paths.txt").write_text(
            "".join((w / "embed" / "pool" / "paths.txt").read_text().splitlines(True)[:5])), "sample",
         "{w}/embed/pool/paths.txt lists 5 images, but the shard records beside it cover 6: it was edited or "
         "damaged; restore it, or delete {w}/embed/pool and rerun 'dinokit curate embed --force'"),
        (lambda w: (w / "embed" / "pool" / "paths.txt").write_text(
            "".join((w / "embed" / "pool" / "paths.txt").read_text().splitlines(True)[:3])), "report",
         "{w}/embed/pool/paths.txt lists 3 images, but the shard records beside it cover 4 and more: it was edited "
         "or damaged; restore it, or delete {w}/embed/pool and rerun 'dinokit curate embed --force'"),
        (lambda w: _edit(w / "dedup" / "after_eval.npy", 0, 99), "retrieve",
         "curate file {w}/dedup/after_eval.npy holds 1 index(es) outside 0..5 (first: 99): it was edited or damaged; "
         "rerun 'dinokit curate dedup --force' to recompute it"),
        (lambda w: _edit(w / "retrieve" / "selected.npy", 1, -1), "cluster",
         "curate file {w}/retrieve/selected.npy holds 1 index(es) outside 0..5 (first: -1): it was edited or "
         "damaged; rerun 'dinokit curate retrieve --force' to recompute it"),
        (lambda w: _edit(w / "cluster" / "leaf.rank0.npy", 0, 1000), "sample",
         "curate file {w}/cluster/leaf.rank0.npy holds 1 index(es) outside 0..4 (first: 1000): it was edited or "
         "damaged; rerun 'dinokit curate cluster --force' to recompute it"),
        (lambda w: _edit(w / "sample" / "chosen.npy", 0, 6), "report",
         "curate file {w}/sample/chosen.npy holds 1 index(es) outside 0..5 (first: 6): it was edited or damaged; "
         "rerun 'dinokit curate sample --force' to recompute it"),
        (lambda w: _edit(w / "dedup" / "kept.npy", 0, 7), "report",
         "curate file {w}/dedup/kept.npy holds 1 index(es) outside 0..5 (first: 7): it was edited or damaged; "
         "rerun 'dinokit curate dedup --force' to recompute it"),
        (lambda w: _drop_count(w / "cluster" / "done.json", "ranks"), "sample",
         "{w}/cluster/done.json is damaged (its counts lack 'ranks'); delete it and rerun 'dinokit curate cluster' "
         "(or 'dinokit curate run') to redo that stage"),
        (lambda w: _drop_count(w / "cluster" / "done.json", "n_clusters"), "report",
         "{w}/cluster/done.json is damaged (its counts lack 'n_clusters'); delete it and rerun 'dinokit curate "
         "cluster' (or 'dinokit curate run') to redo that stage"),
    ],
    ids=["config-not-json", "config-a-list", "config-bad-key", "done-a-list", "kept-pickle", "chosen-pickle",
         "selected-pickle", "after-eval-strings", "after-eval-truncated", "leaf-truncated", "shard-record-a-list",
         "paths-shorter", "paths-much-shorter", "after-eval-index", "selected-index", "leaf-index", "chosen-index",
         "kept-index", "cluster-done-no-ranks", "cluster-done-no-levels"],
)
def test_a_damaged_work_folder_is_one_line_naming_the_file_and_nothing_is_lost(work, tmp_path, capsys, damage, stage,
                                                                             message):
    """Each of these was a traceback (JSONDecodeError, AttributeError, ValueError from np.load, IndexError)."""
    w, _ = _copy(work, tmp_path)
    damage(w)
    before = _snapshot(w)
    force = ["--force"] if stage != "report" else []  # a stage reruns on the damaged file
    capsys.readouterr()
    assert main(["curate", stage, "--output-dir", str(w), "--device", "cpu", "--no-progress", *force]) == 2
    assert _one_line(capsys).startswith(message.format(w=w))
    assert _snapshot(w) == before  # nothing written, nothing deleted


def test_a_work_folder_another_command_is_writing_is_refused(work, tmp_path, capsys):
    """Two commands on one work folder both reported success, one's stages lost or mixed; a killed command's lock
    is taken over, and the lock goes when the command ends."""
    import socket
    import subprocess
    import sys

    w, argv = _copy(work, tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (w / ".dinokit.lock").write_text(f"{socket.gethostname()} {sleeper.pid}")
        before = _snapshot(w)
        capsys.readouterr()
        for command in (argv, ["curate", "report", "--output-dir", str(w)]):
            assert main(command) == 2
            assert _one_line(capsys) == (
                f"another run (process {sleeper.pid} on {socket.gethostname()}) is writing to {w}; wait for it to "
                f"end or give another --output-dir (if that process is gone, delete {w / '.dinokit.lock'})")
        assert _snapshot(w) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(["curate", "report", "--output-dir", str(w)]) == 0  # a killed command's lock: taken over
    assert not (w / ".dinokit.lock").exists()


def test_the_told_recoveries_work(work, tmp_path, capsys):
    """Following each message's advice finishes the curation with the first manifest."""
    w, argv = _copy(work, tmp_path)
    manifest = (w / "manifest.txt").read_text()
    kept = np.load(w / "dedup" / "kept.npy")
    # a damaged array: rerun its stage with --force
    _object_array(w / "dedup" / "kept.npy")
    assert main(["curate", "dedup", "--output-dir", str(w), "--force", "--device", "cpu", "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(w / "dedup" / "kept.npy"), kept)
    # a damaged stage record: delete it, rerun
    (w / "cluster" / "done.json").write_text('"x"')
    assert main(["curate", "sample", "--output-dir", str(w), "--device", "cpu", "--no-progress"]) == 2
    (w / "cluster" / "done.json").unlink()
    assert main(["curate", "cluster", "--output-dir", str(w), "--device", "cpu", "--no-progress"]) == 0
    # an edited paths.txt: delete the set's embeddings and embed again
    (w / "embed" / "pool" / "paths.txt").write_text("/nowhere.png\n")
    shutil.rmtree(w / "embed" / "pool")
    assert main(["curate", "embed", "--output-dir", str(w), "--force", "--device", "cpu", "--no-progress"]) == 0
    # damaged settings: delete them and give them again; every stage finished with them is kept
    (w / "config.json").write_text("[]")
    assert main(argv) == 2
    (w / "config.json").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"[{stage}] finished earlier with these settings" in out
               for stage in ("embed", "dedup", "retrieve", "cluster", "sample"))
    assert (w / "manifest.txt").read_text() == manifest
    assert json.loads((w / "config.json").read_text())["pool"] == argv[argv.index("--pool") + 1]


# ---------------------------------------------------------------------------------------------- data shard --out
def test_shard_refuses_a_folder_with_files_and_the_source_folder(tmp_path, capsys):
    """--out holding a user's classes.txt was written into (and the file replaced); --out equal to or inside the
    source folder was accepted, the shards written among the images."""
    src = tmp_path / "src"
    for c in ("a", "b"):
        _images(src / c, ["0.png", "1.png"], size=8)
    images = _snapshot(src)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "classes.txt").write_text("my notes\n")
    cases = [
        (str(src), mine, f"--out {str(mine)!r} is not empty (it holds 'classes.txt'); give a new or empty folder"),
        (str(src), src, f"--out {str(src)!r} is the source folder {str(src)!r}; give a folder outside it for the shards"),
        (str(src), src / "shards",
         f"--out {str(src / 'shards')!r} is inside the source folder {str(src)!r}; give a folder outside it for the "
         "shards"),
        (f"ImageFolder:root={src / 'a'}", src / "a",
         f"--out {str(src / 'a')!r} is the source folder {str(src / 'a')!r}; give a folder outside it for the shards"),
    ]
    for source, out, message in cases:
        assert main(["data", "shard", source, "--out", str(out)]) == 2
        assert _one_line(capsys) == message
    assert _snapshot(src) == images and not (src / "shards").exists()  # no shard among the images
    assert _snapshot(mine) == {"classes.txt": b"my notes\n"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "shard", str(src), "--out", str(empty)]) == 0  # an empty folder is a fine --out
    assert sorted(p.name for p in empty.iterdir()) == ["000000.tar", "classes.txt", "shards.json", "sources.txt"]


# ---------------------------------------------------------------------------------------------- imagenet-extra
def _imagenet(root: Path, labels: str) -> Path:
    for wnid in ("n01440764", "n01443537"):
        (root / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / wnid / f"{wnid}_1.JPEG", format="JPEG")
    (root / "labels.txt").write_text(labels)
    return root


def test_imagenet_extra_refuses_a_class_listed_twice_and_shows_a_real_file_name(tmp_path, capsys):
    """A wnid listed twice in labels.txt shifted the class index of every later class without a word; an unexpected
    file name was told with the raw regular expression."""
    root = _imagenet(tmp_path / "in", "n01440764,tench\n\nn01443537,goldfish\nn01440764,tench again\n")
    extra = tmp_path / "extra"
    assert main(["data", "imagenet-extra", "--root", str(root), "--extra", str(extra)]) == 2
    assert _one_line(capsys) == (f"{str(root / 'labels.txt')!r} lists n01440764 twice (lines 1 and 4); keep one "
                                 "line per class")
    assert not extra.exists()
    (root / "labels.txt").write_text("n01440764,tench\nn01443537,goldfish\n")
    Image.new("RGB", (8, 8)).save(root / "train" / "n01440764" / "photo.JPEG", format="JPEG")
    assert main(["data", "imagenet-extra", "--root", str(root), "--extra", str(extra)]) == 2
    photo = root / "train" / "n01440764" / "photo.JPEG"
    assert _one_line(capsys) == (f"unexpected file {str(photo)!r} in the ImageNet TRAIN split (expected names like "
                                 "'n01440764_10026.JPEG'); remove it, or use 'ImageFolder:root=...' for other layouts")
    assert not extra.exists()


def test_a_work_folder_started_with_relative_paths_resumes_from_another_folder(tmp_path, monkeypatch, capsys):
    """Seen: `--pool real` in /a, then a rerun from /b wrote a manifest of /b/real/... (files that do not exist),
    and `--pool /a/real` was told the work folder held 'other images'."""
    _images(tmp_path / "a" / "real", [f"p{i}.png" for i in range(6)])
    monkeypatch.chdir(tmp_path / "a")
    assert main(["curate", "run", "--pool", "real", "--output-dir", "cur", "--target-size", "4", *MODEL]) == 0
    saved = json.loads((tmp_path / "a" / "cur" / "config.json").read_text())
    assert saved["pool"] == str(tmp_path / "a" / "real")  # saved absolute
    monkeypatch.chdir(tmp_path)
    work = str(tmp_path / "a" / "cur")
    assert main(["curate", "run", "--output-dir", work, "--target-size", "3", *MODEL]) == 0
    listed = (tmp_path / "a" / "cur" / "manifest.txt").read_text().splitlines()
    assert len(listed) == 3 and all(Path(p).is_file() and Path(p).parent == tmp_path / "a" / "real" for p in listed)
    capsys.readouterr()
    assert main(["curate", "embed", "--pool", str(tmp_path / "a" / "real"), "--output-dir", work, *MODEL]) == 0
    assert "holds embeddings of other images" not in capsys.readouterr().err
