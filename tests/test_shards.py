"""WebDataset shards: written and read back, split across ranks and workers without loss or duplication,
exact resume at a data position, bad samples skipped and counted, and ``embed`` over shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinokit.cli import main
from dinokit.data import make_dataset, make_ssl_data_loader
from dinokit.data.shards import expand_urls
from dinokit.errors import DinokitError

CLASSES = ("a", "b", "c")
N_GOOD = 23  # + 1 corrupt file = 24 samples: 4 global batches of 2 ranks x 3


def colour(i: int) -> tuple[int, int, int]:
    return (i, 255 - i, 7)


def identify(image: Image.Image) -> int:
    """The sample number painted into the image (a picklable transform for the workers)."""
    return image.getpixel((0, 0))[0]


def keep(batch: list) -> list:
    return list(batch)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, Path]:
    """23 solid-colour PNGs in 3 class folders plus one more, written as shards of 5 by the CLI; that one is
    then damaged in its shard (and in the folder), as bytes may be damaged after the shards were written."""
    root = tmp_path_factory.mktemp("images")
    for i in range(N_GOOD):
        folder = root / CLASSES[i % 3]
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (16, 12), colour(i)).save(folder / f"img{i:02d}.png")
    broken = root / "b" / "broken.png"
    Image.new("RGB", (16, 12), (1, 2, 3)).save(broken)
    out = tmp_path_factory.mktemp("shards")
    assert main(["data", "shard", str(root), "--out", str(out), "--shard-size", "5"]) == 0
    position = [p.name for p in make_dataset(f"ImageFolder:root={root}").paths].index("broken.png")
    shard = out / f"{position // 5:06d}.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{position:09d}.png")
    with open(shard, "r+b") as f:  # same length, so the tar itself stays valid
        f.seek(member.offset_data)
        f.write(b"\x89PNG not really".ljust(member.size, b"\0"))
    broken.write_bytes(b"\x89PNG not really")
    return f"WebDataset:urls={out}/{{000000..000004}}.tar", root


def test_expand_urls() -> None:
    assert expand_urls("s/{008..011}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    assert expand_urls("{a,b}/x{1..2}.tar::c.tar") == ["a/x1.tar", "a/x2.tar", "b/x1.tar", "b/x2.tar", "c.tar"]


def test_written_and_read_back(shards, capsys: pytest.CaptureFixture) -> None:
    dataset_str, root = shards
    assert sorted(p.name for p in Path(dataset_str.split("=")[1]).parent.iterdir()) == \
        ["000000.tar", "000001.tar", "000002.tar", "000003.tar", "000004.tar", "classes.txt", "shards.json",
         "sources.txt"]
    folder = make_dataset(f"ImageFolder:root={root}", labelled=True)
    sources = (Path(dataset_str.split("=")[1]).parent / "sources.txt").read_text().splitlines()
    assert sources == [str(p.resolve()) for p in folder.paths]  # sample i came from line i (keys lead back to files)
    ds = make_dataset(dataset_str, labelled=True)
    assert len(ds) == len(folder) == N_GOOD + 1 and ds.classes == list(CLASSES)
    assert ds.targets == folder.targets
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        items = [ds[i] for i in range(len(ds))]
    for (index, image, target), path in zip(items, folder.paths):
        assert target == folder.targets[index]
        if path.name == "broken.png":
            assert image is None  # skipped like a bad file, counted by the collate
        else:
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))
    # the samples are held as numpy columns and a path column, not an object per sample (which every data-loading
    # worker came to copy as it read them)
    from dinokit.data.listing import PathColumn

    assert isinstance(ds.paths, PathColumn) and str(ds.paths[0]).endswith("000000.tar/000000000")
    assert not any(isinstance(v, list) and len(v) == len(ds) for k, v in vars(ds).items() if k != "targets")


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_split_across_two_ranks_and_two_workers(shards) -> None:
    dataset_str, _ = shards
    seen, positions = [], []
    for rank in range(2):
        loader = make_ssl_data_loader(dataset_str, transform=identify, collate=keep, seed=3, batch_size_per_rank=3,
                                      num_workers=2, rank=rank, world_size=2)
        batches = iter(loader)
        for _ in range(4):  # one pass: 4 global batches of 6 = 24 samples
            batch = next(batches)
            positions += [p for p, _ in batch]
            seen += [x for _, x in batch]
        del batches, loader
    assert sorted(positions) == list(range(24))
    # every sample exactly once in the pass (the corrupt one as None), whatever rank and worker read it
    assert sorted(x for x in seen if x is not None) == list(range(N_GOOD)) and seen.count(None) == 1


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_exact_resume_over_shards(shards) -> None:
    dataset_str, _ = shards
    kwargs = dict(transform=identify, collate=keep, seed=5, batch_size_per_rank=4, rank=1, world_size=2)
    full = iter(make_ssl_data_loader(dataset_str, num_workers=0, **kwargs))
    uninterrupted = [next(full) for _ in range(8)]  # crosses into the second pass (another order)
    resumed = iter(make_ssl_data_loader(dataset_str, num_workers=1, start_iteration=5, **kwargs))
    assert [next(resumed) for _ in range(3)] == uninterrupted[5:]


def test_embed_reads_shards(shards, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset_str, root = shards
    out = tmp_path / "emb.npz"
    assert main(["embed", dataset_str, "--model", "dinov2_vits14", "--random-init", "--image-size", "28",
                 "--out", str(out), "--no-progress"]) == 0
    saved = np.load(out)
    assert saved["cls"].shape == (N_GOOD, 384) and len(saved["bad_paths"]) == 1
    broken = [p.name for p in make_dataset(f"ImageFolder:root={root}").paths].index("broken.png")
    assert str(saved["bad_paths"][0]).endswith(f"{broken // 5:06d}.tar/{broken:09d}")  # shard/key of the corrupt file


def test_other_urls_are_fetched_once_through_webdataset(shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("webdataset")
    dataset_str, _ = shards
    monkeypatch.setenv("DINOKIT_SHARD_CACHE", str(tmp_path / "cache"))
    local = make_dataset(dataset_str, labelled=True)
    # a pipe: URL runs a shell command: refused unless asked for (a config file could otherwise run one)
    with pytest.raises(DinokitError, match="runs a shell command; set DINOKIT_ALLOW_PIPE=1 if you trust the "):
        make_dataset(dataset_str.replace("urls=", "urls=pipe:cat "), labelled=True)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["index"]  # the local shards' indices, no copy
    monkeypatch.setenv("DINOKIT_ALLOW_PIPE", "1")
    piped = make_dataset(dataset_str.replace("urls=", "urls=pipe:cat "), labelled=True)  # a URL webdataset opens
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_file()]) == 5  # one cached copy per shard
    assert piped.targets == local.targets and piped.classes == [str(i) for i in range(3)]  # names live beside local shards
    assert np.array_equal(np.asarray(piped.read_image(3)), np.asarray(local.read_image(3)))
    monkeypatch.setenv("DINOKIT_SHARD_CACHE", "")  # set but empty: the default folder, not the working directory
    from dinokit.data.shards import _cache_dir

    assert _cache_dir() == Path.home() / ".cache" / "dinokit" / "shards"


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_shard_indices_are_cached_and_renewed_when_a_shard_changes(shards, tmp_path, monkeypatch) -> None:
    """Each command scanned every tar's headers and read its labels (about 40 ms per 1000 samples: a minute for
    ImageNet); the index is now cached by the shard's real path, size and time. A shard written again is indexed
    again; a damaged cached index, or a cache that cannot be written, falls back to the scan."""
    import shutil

    import dinokit.data.shards as shard_module

    dataset_str, _ = shards
    folder = tmp_path / "shards"
    shutil.copytree(Path(dataset_str.split("=")[1]).parent, folder)
    urls = f"WebDataset:urls={folder}/{{000000..000004}}.tar"
    monkeypatch.setenv("DINOKIT_SHARD_CACHE", str(tmp_path / "cache"))
    first = make_dataset(urls, labelled=True)
    assert len(list((tmp_path / "cache" / "index").iterdir())) == 5
    scans = []
    scan = shard_module.index_shard
    monkeypatch.setattr(shard_module, "index_shard", lambda path, shard: scans.append(path.name) or scan(path, shard))
    again = make_dataset(urls, labelled=True)
    assert scans == [] and again.targets == first.targets and list(again.paths) == list(first.paths)

    def pixels(dataset, i):  # None for the damaged sample
        image = dataset[i][1]
        return None if image is None else np.asarray(image).tolist()

    before = [pixels(first, i) for i in range(len(first))]
    assert [pixels(again, i) for i in range(len(first))] == before and before[7] is not None
    # shard 1 written again with its samples in reverse order: indexed again, its images found at their new places
    import tarfile

    import os

    with tarfile.open(folder / "000001.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    times = os.stat(folder / "000001.tar")
    with tarfile.open(folder / "000001.tar", "w") as tar:
        for member, data in reversed(members):
            tar.addfile(member, io.BytesIO(data))
    os.utime(folder / "000001.tar", ns=(times.st_atime_ns, times.st_mtime_ns))  # as cp -p or rsync -t leave it
    assert os.stat(folder / "000001.tar").st_size == times.st_size  # the same size and time: only ctime tells
    renewed = make_dataset(urls, labelled=True)
    assert scans == ["000001.tar"] and renewed.targets[5:10] == first.targets[5:10][::-1]
    assert [pixels(renewed, i) for i in range(5, 10)] == before[5:10][::-1]
    damaged = ['[["000000000", "x"', '[["k", 0, Infinity, 0]]', '[["k", 1e300, 5, 0]]', "[" * 100000, '{"a": 1}',
               f'[["k", {2**64}, 5, 0]]', '[["k", -3, 5, 0]]', '[["k", 0, 5, true]]', '[["k", 0, 5, 1.5]]',
               '[["\\ud800", 0, 5, 0]]', '[["k", 0, 5]]']
    for text in damaged:  # damaged or edited: scanned again, never a traceback or a wrong sample
        for cached in (tmp_path / "cache" / "index").iterdir():
            cached.write_text(text)
        scans.clear()
        assert make_dataset(urls, labelled=True).targets == renewed.targets and len(scans) == 5, text
    for cached in (tmp_path / "cache" / "index").iterdir():
        cached.unlink()

    def refused(path):  # atomic_write's one-line error: no permission, a full disk
        raise DinokitError(f"permission denied while writing {path}")

    with monkeypatch.context() as patch:
        patch.setattr(shard_module, "atomic_write", refused)
        scans.clear()
        assert make_dataset(urls, labelled=True).targets == renewed.targets and len(scans) == 5
    monkeypatch.setenv("DINOKIT_SHARD_CACHE", str(folder / "000000.tar"))  # a file: no cache can be made there
    scans.clear()
    assert make_dataset(urls, labelled=True).targets == renewed.targets and len(scans) == 5


def test_cached_features_of_shards_follow_the_shard_files(shards, tmp_path) -> None:
    """The feature cache keyed each file by its size and time, but a shard member has no file of its own: shards
    written again with other pixels under the same keys kept their old features. Members now count as their shard."""
    import os
    import shutil

    from dinokit.eval.feature_cache import FeatureCache

    dataset_str, _ = shards
    folder = tmp_path / "shards"
    shutil.copytree(Path(dataset_str.split("=")[1]).parent, folder)
    urls = f"WebDataset:urls={folder}/{{000000..000004}}.tar"
    cache = FeatureCache(tmp_path / "cache", {"model": "m"})
    before = cache._path("val", "cls", make_dataset(urls, labelled=True))
    assert cache._path("val", "cls", make_dataset(urls, labelled=True)) == before
    stat = os.stat(folder / "000002.tar")
    os.utime(folder / "000002.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # written again
    assert cache._path("val", "cls", make_dataset(urls, labelled=True)) != before


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DinokitError, match=r"shard '.*missing/000\.tar' does not exist; check the WebDataset urls"):
        make_dataset(f"WebDataset:urls={tmp_path}/missing/{{000..001}}.tar")
    (tmp_path / "x.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(DinokitError, match="not an uncompressed tar file"):
        make_dataset(f"WebDataset:urls={tmp_path}/x.tar")
    with pytest.raises(DinokitError, match="WebDataset does not take root"):
        make_dataset(f"WebDataset:root={tmp_path}")


def _unreadable_files(folder: Path) -> None:
    """Three files named as images that are not: text renamed .jpg, a truncated PNG, a zero-byte PNG."""
    folder.mkdir(parents=True)
    (folder / "text.jpg").write_text("not an image")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "whole.png")
    (folder / "truncated.png").write_bytes((folder / "whole.png").read_bytes()[:60])
    (folder / "whole.png").unlink()
    (folder / "empty.png").write_bytes(b"")


def test_shard_skips_unreadable_files_and_refuses_when_none_is_readable(tmp_path: Path, capsys) -> None:
    """F25: unreadable files were packed as images and only surfaced as skipped reads in training."""
    _unreadable_files(tmp_path / "bad")
    assert main(["data", "shard", str(tmp_path / "bad"), "--out", str(tmp_path / "sh_bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: none of the 3 images could be read (first: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "sh_bad").exists()  # nothing written

    mixed = tmp_path / "mixed"
    _unreadable_files(mixed / "x")
    for i in range(4):
        Image.new("RGB", (8, 8), colour(i)).save(mixed / "x" / f"good{i}.png")
    assert main(["data", "shard", str(mixed), "--out", str(tmp_path / "sh_mixed"), "--shard-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "skipped 3 unreadable image(s) (first: " in out and "wrote 4 images" in out and "2 shard(s)" in out
    assert "BytesIO" not in out and " at 0x" not in out  # the reason names no in-memory stream
    ds = make_dataset(f"WebDataset:urls={tmp_path}/sh_mixed/{{000000..000001}}.tar", labelled=True)
    assert len(ds) == 4 and sorted(ds[i][1].getpixel((0, 0)) for i in range(4)) == [colour(i) for i in range(4)]


def test_shard_refuses_an_out_that_holds_shards_or_is_a_file(shards, tmp_path: Path, capsys) -> None:
    _, root = shards
    out = tmp_path / "sh"
    assert main(["data", "shard", str(root / "a"), "--out", str(out), "--shard-size", "3"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["data", "shard", str(root / "a"), "--out", str(out), "--shard-size", "10"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {str(out)!r} already holds shards; give an empty folder\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the first set, untouched
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["data", "shard", str(root / "a"), "--out", str(afile)]) == 2
    assert capsys.readouterr().err == f"error: --out {str(afile)!r} is a file, not a folder; give a new or empty folder\n"
    assert main(["data", "shard", str(root / "a"), "--out", str(afile / "sub")]) == 2  # under a file: one line too
    assert capsys.readouterr().err == (f"error: --out {str(afile / 'sub')!r} cannot be created: {str(afile)!r} is a "
                                       "file; give a folder you can write to\n")
    assert afile.read_text() == "x"


def test_max_size_shrinks_large_images_only_as_the_readers_see_them(tmp_path: Path, capsys) -> None:
    """--max-size stores images whose short side is above it resized to it (JPEG as JPEG, others as PNG, RGB with
    transparency composited), smaller ones byte for byte; bad values are one line before anything is written."""
    from dinokit.data.images import load_image

    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    yy, xx = np.mgrid[0:120, 0:200]
    gradient = np.stack([xx * 255 // 199, yy * 255 // 119, np.full_like(xx, 90)], -1).astype(np.uint8)
    Image.fromarray(gradient).save(src / "big.jpg", quality=98)  # 200x120 -> 80x48
    rgba = np.concatenate([gradient, np.full((120, 200, 1), 255, np.uint8)], -1)
    rgba[:, :100, 3] = 0  # left half transparent: white once composited
    Image.fromarray(rgba, "RGBA").save(src / "clear.png")  # 200x120 -> 80x48 PNG
    Image.new("RGB", (40, 30), (10, 200, 30)).save(src / "small.png")  # short side 30 <= 48: unchanged
    out = tmp_path / "sh"
    assert main(["data", "shard", str(tmp_path / "src"), "--out", str(out), "--max-size", "48"]) == 0
    assert "wrote 3 images, 1 class (2 resized to a short side of 48 px) into 1 shard(s)" in capsys.readouterr().out
    with tarfile.open(out / "000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".cls")}
    names = [p.name for p in make_dataset(f"ImageFolder:root={tmp_path / 'src'}").paths]  # big, clear, small
    assert sorted(members) == ["000000000.jpg", "000000001.png", "000000002.png"] and names[2] == "small.png"
    assert members["000000002.png"] == (src / "small.png").read_bytes()
    ds = make_dataset(f"WebDataset:urls={out}/000000.tar")
    big, clear = np.asarray(ds[0][1], dtype=float), np.asarray(ds[1][1], dtype=float)
    assert big.shape == clear.shape == (48, 80, 3)
    expected = np.asarray(load_image(src / "big.jpg").resize((80, 48), Image.Resampling.BICUBIC), dtype=float)
    assert np.abs(big - expected).mean() < 2.0  # one more JPEG generation at quality 95
    assert (clear[:, :38] == 255).all() and np.abs(clear[:, 42:] - expected[:, 42:]).mean() < 2.0

    for value in ("0", "-5"):
        assert main(["data", "shard", str(tmp_path / "src"), "--out", str(tmp_path / f"bad{value}"),
                     "--max-size", value]) == 2
        assert capsys.readouterr().err == f"error: --max-size must be at least 1 pixel, got {value}\n"
        assert not any((tmp_path / f"bad{value}").glob("*.tar"))


def test_a_shard_replaced_under_a_reader_is_one_line_not_other_images(shards, tmp_path) -> None:
    """The index is read at the start and the tars opened as their samples come: a shard replaced meanwhile (a rerun
    of 'data shard' into the folder) gave other images under the indexed keys, without a word."""
    import shutil

    dataset_str, _ = shards
    folder = tmp_path / "shards"
    shutil.copytree(Path(dataset_str.split("=")[1]).parent, folder)
    dataset = make_dataset(f"WebDataset:urls={folder}/{{000000..000004}}.tar", labelled=True)
    assert dataset[0][1] is not None  # shard 0 opened: kept open, its bytes the indexed ones
    replaced = folder / "000002.tar"
    replaced.write_bytes((folder / "000003.tar").read_bytes())
    with pytest.raises(DinokitError, match=r"^shard '.*000002.tar' changed since it was indexed \(it was replaced or "
                                           r"rewritten while this command ran\)"):
        dataset[10]


def test_class_names_read_back_as_the_folder_gives_them_and_odd_outs_are_one_line(tmp_path: Path, capsys) -> None:
    """classes.txt was split by str.splitlines (a class 'a\\rb' came back as 'a' and 'b') and read as UTF-8 whatever
    the locale (under LC_ALL=C a UTF-8 class 'café' differed from the folder's, and every evaluation refused the
    pair); a name with a line feed misaligned the lists; an --out link that loops was a traceback."""
    import os
    import subprocess
    import sys

    src = tmp_path / "src"
    for name in ("a\rb", "caf\u00e9", "c"):
        (src / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), (len(name) * 40, 0, 0)).save(src / name / "0.png")
    assert main(["data", "shard", str(src), "--out", str(tmp_path / "sh")]) == 0
    urls = f"WebDataset:urls={tmp_path / 'sh'}/000000.tar"
    assert make_dataset(urls, labelled=True).classes == make_dataset(str(src), labelled=True).classes
    code = ("import sys; from dinokit.data import make_dataset\n"
            "a, b = (make_dataset(s, labelled=True).classes for s in sys.argv[1:])\nprint(a == b, len(a))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", code, urls, str(src)], env=env, capture_output=True, text=True)
    assert done.stdout == "True 3\n", done.stderr
    (src / "n\nl").mkdir()
    Image.new("RGB", (16, 16)).save(src / "n\nl" / "0.png")
    capsys.readouterr()
    assert main(["data", "shard", str(src), "--out", str(tmp_path / "nl")]) == 2
    assert capsys.readouterr().err == ("error: the class folder name 'n\\nl' holds a line feed, which classes.txt and "
                                       "sources.txt cannot list one per line; rename it\n")
    assert not (tmp_path / "nl").exists()
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    assert main(["data", "shard", str(src / "c"), "--out", str(tmp_path / "loopA")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {str(tmp_path / 'loopA')!r} is a symbolic link that loops")


def test_curate_refuses_a_pool_of_shards_in_one_line(shards, tmp_path: Path, capsys) -> None:
    """Its manifest listed members of tar files ('.../000000.tar/000000001'), which nothing could read."""
    pool = shards[0]
    capsys.readouterr()
    assert main(["curate", "run", "--pool", pool, "--output-dir", str(tmp_path / "w"), "--config-file", "demo",
                 "--weights", "random", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --pool {pool!r} is shards, whose images are members of tar files")
    assert err.count("\n") == 1
    assert not (tmp_path / "w").exists()
