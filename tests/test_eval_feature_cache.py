"""The evaluation feature cache: a damaged cache is recomputed, an image replaced under its name is extracted again,
and each file's status is read once per dataset."""

from __future__ import annotations

import pytest

from dinokit.cli import main
from test_eval_cli import args, read_lines, sample  # noqa: F401  (sample: a fixture)
from test_knn import one_thread  # noqa: F401  (autouse fixture)


def test_corrupt_cache_is_recomputed(sample, tmp_path):
    assert main(["eval", "knn", *args(sample, tmp_path, "--nb-knn", "2")]) == 0
    for path in (tmp_path / "features").glob("*/*.pt"):
        path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="recomputing") as caught:
        assert main(["eval", "knn", *args(sample, tmp_path, "--nb-knn", "2")]) == 0
    assert all("\n" not in str(w.message) for w in caught)  # torch's many-line load error cut to its first line
    first, second = read_lines(tmp_path / "results_eval_knn.json")
    assert first == second


def test_an_image_replaced_under_its_name_is_extracted_again(tmp_path):
    """Seen: the feature cache keyed the files by name only, so images replaced by others kept their old features
    (a stale accuracy)."""
    from PIL import Image

    from dinokit.data import make_dataset
    from dinokit.eval.feature_cache import FeatureCache

    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in (("a.png", (0, 0, 0)), ("b.png", (255, 0, 0))):
        Image.new("RGB", (8, 8), colour).save(folder / name)
    cache = FeatureCache(tmp_path / "cache", {"model": "m"})
    before = cache._path("val", "cls", make_dataset(str(folder)))
    Image.new("RGB", (9, 9), (0, 255, 0)).save(folder / "a.png")  # other pixels, the same name
    assert cache._path("val", "cls", make_dataset(str(folder))) != before


def test_the_feature_cache_reads_each_files_status_once_per_dataset(tmp_path, monkeypatch):
    """The cache key reads the status of every file (about 10 s at 1.28M images); it was read again for each lookup,
    and a split whose class tokens are missing is looked up twice. Relabelling the dataset still gives a new key."""
    import os

    from PIL import Image

    from dinokit.data import make_dataset
    from dinokit.eval import feature_cache
    from dinokit.eval.feature_cache import FeatureCache

    folder = tmp_path / "images"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / name / "0.png")
    dataset = make_dataset(str(folder), labelled=True)
    stats = []
    monkeypatch.setattr(feature_cache.os, "stat", lambda path: stats.append(path) or os.lstat(path))
    cache = FeatureCache(tmp_path / "cache", {"model": "m"})
    cls, linear = cache._path("val", "cls", dataset), cache._path("val", "linear", dataset)
    assert len(stats) == 2 and cls != linear and cache._path("val", "cls", dataset) == cls and len(stats) == 2
    dataset.targets = [1, 0]  # a class mapping applied: other labels, another key
    relabelled = cache._path("val", "cls", dataset)
    assert relabelled != cls and len(stats) == 4
    dataset.targets[0] = 0  # changed in place (from Python): another key too
    assert cache._path("val", "cls", dataset) not in (cls, relabelled)
