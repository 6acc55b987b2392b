"""What a rerun of `dinokit curate` keeps and what it redoes (embeddings of changed settings or of a changed pool are
never reused, and the stages after a redone one follow it), and small pools: copies of one image, no seed set."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main
from dinokit.curate.embed import EmbeddingStore
from dinokit.curate.synthetic import write_copy_pairs
from dinokit.errors import DinokitError

MODEL = ["--config-file", "demo", "--weights", "random", "--device", "cpu", "--no-progress", "embed.num_workers=0",
         "embed.shard_size=8", "cluster.n_clusters=[4,2]"]
STAGES = ("embed", "dedup", "retrieve", "cluster", "sample")


def _run(pool, work, capsys, *extra) -> str:
    capsys.readouterr()
    assert main(["curate", "run", "--pool", str(pool), "--output-dir", str(work), "--target-size", "4", *MODEL,
                 *extra]) == 0
    return capsys.readouterr().out


def _features(work) -> np.ndarray:
    return EmbeddingStore(work / "embed" / "pool").load("cls").numpy()


def test_changed_settings_or_images_are_embedded_again_and_the_later_stages_follow(tmp_path, capsys):
    pool, work = tmp_path / "pool", tmp_path / "work"
    write_copy_pairs(pool, n_images=6, copies=1)
    _run(pool, work, capsys, "embed.image_size=56")
    first = _features(work)
    # another image size: other features (the finished shards of the first size were kept: the same features)
    out = _run(pool, work, capsys, "embed.image_size=70")
    assert "[embed] the pool: its shards were embedded with other settings: embedding it again" in out
    resized = _features(work)
    assert not np.allclose(resized, first)
    _run(pool, tmp_path / "fresh", capsys, "embed.image_size=70")
    np.testing.assert_array_equal(resized, _features(tmp_path / "fresh"))
    # the same settings, one image more: the embed stage was skipped and the manifest never held the new image
    Image.new("RGB", (64, 64), (250, 20, 20)).save(pool / "zz_new.png")
    out = _run(pool, work, capsys, "embed.image_size=70")
    assert "[embed] running again: the images of the pool changed since (the details follow)" in out
    assert "[embed] the pool: its images changed since they were embedded (1 added, 0 removed, 13 now)" in out
    for stage in STAGES[1:]:
        assert f"[{stage}] running again: the stage before it ran again" in out
    assert json.loads((work / "report.json").read_text())["counts"]["pool"] == 13
    assert str(pool / "zz_new.png") in EmbeddingStore(work / "embed" / "pool").paths
    # nothing changed: every stage kept; a stage redone on the same inputs (--force) keeps the ones after it
    out = _run(pool, work, capsys, "embed.image_size=70")
    assert all(f"[{stage}] finished earlier with these settings" in out for stage in STAGES)
    manifest = (work / "manifest.txt").read_text()
    assert main(["curate", "dedup", "--output-dir", str(work), "--force", "--device", "cpu", "--no-progress"]) == 0
    out = _run(pool, work, capsys, "embed.image_size=70")
    assert all(f"[{stage}] finished earlier with these settings" in out for stage in STAGES)
    assert (work / "manifest.txt").read_text() == manifest


def test_a_killed_embedding_of_a_pool_changed_since_is_redone_and_old_records_are_kept(tmp_path, capsys):
    pool, work = tmp_path / "pool", tmp_path / "work"
    write_copy_pairs(pool, n_images=6, copies=1)
    _run(pool, work, capsys)
    manifest = (work / "manifest.txt").read_text()
    # records of a dinokit before 2026-12-07 (no inputs, no upstream) and shards without settings: all kept
    for stage in STAGES:
        marker = work / stage / "done.json"
        record = json.loads(marker.read_text())
        marker.write_text(json.dumps({k: v for k, v in record.items() if k not in ("inputs", "after", "settings")}))
    for meta in (work / "embed" / "pool").glob("shard-*.json"):
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "settings"}))
    out = _run(pool, work, capsys)
    assert all(f"[{stage}] finished earlier with these settings" in out for stage in STAGES)
    assert (work / "manifest.txt").read_text() == manifest
    # an embedding killed before its record, then one image removed: embedded again (it was refused in one line,
    # 'holds embeddings of other images', for the user to delete the folder)
    (work / "embed" / "done.json").unlink()
    (pool / "scene_0000.png").unlink()
    shutil.rmtree(work / "embed" / "seed", ignore_errors=True)
    out = _run(pool, work, capsys)
    assert "[embed] the pool: its images changed since they were embedded (0 added, 1 removed, 11 now)" in out
    assert len(EmbeddingStore(work / "embed" / "pool")) == 11
    assert json.loads((work / "report.json").read_text())["counts"]["pool"] == 11


def test_re_saved_copies_of_one_image_are_copies_and_an_evaluation_re_save_of_it_is_removed(tmp_path, capsys):
    """A pool of one image saved five ways (PNG, JPEG 95 and 90, resized, a shade brighter) lies within a few
    hundredths of its mean: centring made noise of it (kept 5 of 5); and a JPEG of it as the evaluation image was
    kept. Rows within 0.05 of the mean (pairwise cosine >= 0.995) are copies."""
    from PIL import ImageDraw

    pool, evals = tmp_path / "pool", tmp_path / "eval"
    pool.mkdir(), evals.mkdir()
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (96, 96), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # a few shapes: a picture JPEG keeps close (a busy one lies further from its re-saves)
        (x, y), (w, h) = rng.integers(0, 76, 2), rng.integers(10, 40, 2)
        draw.ellipse([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image.save(pool / "a.png"), image.save(pool / "b.jpg", quality=95), image.save(pool / "c.jpg", quality=90)
    image.resize((94, 94)).save(pool / "d.png")
    Image.fromarray(np.clip(np.asarray(image).astype(int) + 2, 0, 255).astype(np.uint8)).save(pool / "e.png")
    image.save(evals / "e0.jpg", quality=95)
    out = _run(pool, tmp_path / "w", capsys, "--target-size", "1", "embed.image_size=64", "cluster.n_clusters=[1]")
    counts = json.loads((tmp_path / "w" / "report.json").read_text())["counts"]
    assert (counts["pool"], counts["after_dedup"]) == (5, 1), out
    capsys.readouterr()
    assert main(["curate", "run", "--pool", str(pool), "--output-dir", str(tmp_path / "w2"), "--eval-set", str(evals),
                 "--target-size", "1", *MODEL, "embed.image_size=64"]) == 2
    assert "no pool image is left: all 1 left by dedup copy an image of the evaluation sets" in capsys.readouterr().err


def test_a_killed_re_embedding_is_redone_and_new_sets_keep_the_pools_embeddings(tmp_path, capsys, monkeypatch):
    from dinokit.curate import pipeline

    pool, work = tmp_path / "pool", tmp_path / "work"
    write_copy_pairs(pool, n_images=6, copies=1)
    _run(pool, work, capsys)
    # another evaluation set (or seed set, workers, batch size): the pool's shards are kept (they were re-embedded)
    evals = tmp_path / "eval"
    evals.mkdir()
    shutil.copy(pool / "scene_0000.png", evals / "e.png")
    out = _run(pool, work, capsys, "--eval-set", str(evals), "embed.batch_size=7")
    assert "[embed] running again" in out and "the pool:" not in out
    # the pool changed, and the re-embedding killed after its listing was written: the rerun redoes it (it found
    # the listing current and the earlier record, and skipped every stage on the earlier embeddings)
    (pool / "scene_0001.png").rename(pool / "zz.png")
    real = pipeline.embed_set

    def killed(dataset, paths, folder, **kwargs):
        real(dataset, paths, folder, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "embed_set", killed)
    assert main(["curate", "run", "--pool", str(pool), "--output-dir", str(work), "--eval-set", str(evals),
                 "--target-size", "4", *MODEL]) == 130
    monkeypatch.undo()
    out = _run(pool, work, capsys, "--eval-set", str(evals))
    assert "[embed] finished earlier" not in out and "[dedup] finished earlier" not in out
    listed = (work / "manifest.txt").read_text().splitlines()
    assert str(pool / "scene_0001.png") not in listed and all(os.path.isfile(p) for p in listed)
    store = EmbeddingStore(work / "embed" / "pool")
    assert str(pool / "zz.png") in store.paths and store.paths == sorted(store.paths)
    assert json.loads((work / "dedup" / "done.json").read_text())["after"] is not None


def test_a_pool_of_copies_of_one_image_is_deduplicated_and_an_evaluation_copy_of_it_removed(tmp_path, capsys):
    """Copies of one image are the pool's mean: zero after centring, every cosine 0, so dedup kept all of them, and
    a pool image that is the evaluation image itself was kept too. Images on the centre are now copies."""
    pool = tmp_path / "pool"
    pool.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(pool / "p0.png")
    for i in range(1, 5):
        shutil.copy(pool / "p0.png", pool / f"p{i}.png")
    one = ("--target-size", "1", "embed.image_size=64", "cluster.n_clusters=[1]")
    _run(pool, tmp_path / "w", capsys, *one)
    counts = json.loads((tmp_path / "w" / "report.json").read_text())["counts"]
    assert (counts["pool"], counts["after_dedup"]) == (5, 1)
    assert main(["curate", "run", "--pool", str(pool), "--output-dir", str(tmp_path / "w2"), "--eval-set", str(pool),
                 *MODEL, *one]) == 2
    assert "no pool image is left: all 1 left by dedup copy an image of the evaluation sets" in capsys.readouterr().err


def test_retrieve_without_a_seed_set_says_it_had_nothing_to_do(tmp_path, capsys):
    """The stage's line read 'retrieved None' when no --seed-set was given."""
    pool = tmp_path / "pool"
    write_copy_pairs(pool, n_images=6, copies=1)
    out = _run(pool, tmp_path / "w", capsys)
    assert re.search(r"^\[retrieve\] done in \d+\.\d s: nothing to do$", out, re.MULTILINE), out
    assert "None" not in out
    assert json.loads((tmp_path / "w" / "report.json").read_text())["counts"]["retrieved"] is None


def test_weights_retrained_at_the_same_path_are_embedded_again_and_the_later_stages_follow(tmp_path, capsys):
    from dinokit.eval.setup import setup_eval_model

    pool, work, weights = tmp_path / "pool", tmp_path / "work", tmp_path / "backbone.pth"
    write_copy_pairs(pool, n_images=4, copies=1)
    backbone, _ = setup_eval_model(config_file="demo", random_init=True)
    torch.save(backbone.state_dict(), weights)
    model = ["--weights", str(weights)]
    _run(pool, work, capsys, *model)
    first = _features(work)
    with torch.no_grad():  # retrained: other weights at the same path (they were kept, "finished earlier")
        for p in backbone.parameters():
            p.mul_(0.5)
    torch.save(backbone.state_dict(), weights)
    out = _run(pool, work, capsys, *model)
    assert "[embed] running again: its model files changed since (weights)" in out
    assert ("[embed] the pool: its shards were embedded with model files that changed since (same path, other "
            "contents): embedding it again") in out
    for stage in STAGES[1:]:
        assert f"[{stage}] running again: the stage before it ran again" in out
    retrained = _features(work)
    assert not np.allclose(retrained, first)
    _run(pool, tmp_path / "fresh", capsys, *model)
    np.testing.assert_array_equal(retrained, _features(tmp_path / "fresh"))
    out = _run(pool, work, capsys, *model)  # nothing changed since
    assert all(f"[{stage}] finished earlier with these settings" in out for stage in STAGES)


def test_model_files_stamp_weights_by_size_and_time_and_config_files_by_their_backbone(tmp_path):
    from dinokit.curate.config import CurateConfig
    from dinokit.curate.work import files_changed, model_files

    run = tmp_path / "run"
    (run / "eval" / "training_9").mkdir(parents=True)
    (run / "config.yaml").write_text("student: {arch: vit_pico}\n")
    weights = run / "eval" / "training_9" / "teacher_checkpoint.pth"
    weights.write_bytes(b"1234")
    config = CurateConfig(pool="p", weights=str(weights), copy_weights="random")
    first = model_files(config)
    assert set(first) == {"config_file", "weights"}  # the run's config.yaml, found beside the weights as the model is
    assert first["weights"]["size"] == 4
    os.utime(run / "config.yaml", ns=(0, 0))  # rewritten as a run resumes: the same contents
    assert files_changed(first, model_files(config)) is None
    (run / "config.yaml").write_text("optim: {epochs: 3}\nstudent: {arch: vit_pico}\n")  # resumed for longer
    assert files_changed(first, model_files(config)) is None
    (run / "config.yaml").write_text("student: {arch: vit_small}\n")
    assert files_changed(first, model_files(config)) == "config file"
    assert files_changed(None, model_files(config)) is None  # a record of an older dinokit does not say
    hub = model_files(CurateConfig(pool="p", model="dinov2_vits14"))
    assert hub == {}


def test_a_record_without_model_files_keeps_the_identity_an_older_dinokit_gave_it():
    from dinokit.curate.work import _digest, _identity

    old = {"digest": "d", "counts": {"pool": 3}, "inputs": {"pool": "i"}, "after": None, "seconds": 1.0}
    assert _identity(old) == _digest(["d", {"pool": 3}, {"pool": "i"}, None])  # the stages after it are kept
    assert _identity({**old, "files": {}}) != _identity(old)


def test_an_evaluation_set_left_out_no_longer_removes_pool_images(tmp_path, capsys):
    """dedup read every WORK/embed/eval-* folder on disk: the pool images copying a set given earlier, then left
    out, were still dropped."""
    pool, work = tmp_path / "pool", tmp_path / "work"
    write_copy_pairs(pool, n_images=6, copies=1)
    sets = {}
    for name, scenes in (("ev1", (0,)), ("ev2", (3,))):
        sets[name] = tmp_path / name
        sets[name].mkdir()
        for i in scenes:
            shutil.copy(pool / f"scene_{i:04d}.png", sets[name] / f"e{i}.png")

    def removed(folder):
        return json.loads((folder / "dedup" / "done.json").read_text())["counts"]["eval_removed"]

    _run(pool, work, capsys, "--eval-set", str(sets["ev1"]), "--eval-set", str(sets["ev2"]))
    both = removed(work)
    _run(pool, work, capsys, "--eval-set", str(sets["ev1"]))
    _run(pool, tmp_path / "fresh", capsys, "--eval-set", str(sets["ev1"]))
    assert removed(work) == removed(tmp_path / "fresh") < both
    assert (work / "manifest.txt").read_text() == (tmp_path / "fresh" / "manifest.txt").read_text()
    assert "scene_0000" not in (work / "manifest.txt").read_text()


def test_a_stage_killed_while_rewriting_its_files_is_redone_when_its_earlier_settings_come_back(tmp_path, capsys,
                                                                                                monkeypatch):
    """Only the embed stage deleted its record as it began: a cluster stage killed while writing the labels of
    other settings was skipped when the earlier settings came back, its files half of each."""
    from dinokit.curate import pipeline

    pool, work = tmp_path / "pool", tmp_path / "work"
    write_copy_pairs(pool, n_images=6, copies=1)
    _run(pool, work, capsys)
    manifest = (work / "manifest.txt").read_text()
    leaf = (work / "cluster" / "leaf.rank0.npy").read_bytes()
    real = pipeline.save_npy

    def killed(path, array):
        real(path, array)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "save_npy", killed)
    capsys.readouterr()
    assert main(["curate", "run", "--pool", str(pool), "--output-dir", str(work), "--target-size", "4", *MODEL,
                 "cluster.n_clusters=[2]"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (f"interrupted: the finished stages and embedding shards are "
                                                        f"kept in {work}; run the same command again to go on from "
                                                        "there")
    monkeypatch.undo()
    assert (work / "cluster" / "leaf.rank0.npy").read_bytes() != leaf  # the other settings' labels
    out = _run(pool, work, capsys)
    assert "[cluster] running" in out and "[cluster] finished earlier" not in out
    assert (work / "cluster" / "leaf.rank0.npy").read_bytes() == leaf
    assert (work / "manifest.txt").read_text() == manifest


def test_how_the_embedding_runs_redoes_no_stage_and_records_of_earlier_digests_are_kept(tmp_path, capsys):
    """embed.batch_size and embed.num_workers were in the embed stage's digest: a change to them kept the shards but
    redid every later stage (k-means over the whole pool)."""
    from dinokit.curate.config import make_config
    from dinokit.curate.work import Work, _identity

    pool, work = tmp_path / "pool", tmp_path / "work"
    write_copy_pairs(pool, n_images=4, copies=1)
    _run(pool, work, capsys)
    out = _run(pool, work, capsys, "embed.batch_size=3", "embed.num_workers=1")
    assert all(f"[{stage}] finished earlier with these settings" in out for stage in STAGES), out
    # records of a dinokit before 2026-12-08: digests that hold how the embedding ran, each the next one's "after"
    legacy = Work(work, make_config(json.loads((work / "config.json").read_text()))).legacy_digests
    upstream = None
    for stage in STAGES:
        marker = work / stage / "done.json"
        record = {**json.loads(marker.read_text()), "digest": legacy[stage]}
        if upstream is not None:
            record["after"] = _identity(upstream)
        marker.write_text(json.dumps(record))
        upstream = record
    out = _run(pool, work, capsys, "embed.batch_size=3", "embed.num_workers=1")
    assert all(f"[{stage}] finished earlier with these settings" in out for stage in STAGES), out


def test_a_changed_pool_embeds_only_its_new_images_and_a_kill_meanwhile_keeps_the_earlier_embedding(
        tmp_path, capsys, monkeypatch):
    """Shards are cut by position: one added image re-embedded the whole pool. The images a changed set still holds
    (same name, same size) are now copied from its earlier embedding, kept aside until the new one is whole."""
    from dinokit.curate import embed as embed_module

    pool, work = tmp_path / "pool", tmp_path / "work"
    write_copy_pairs(pool, n_images=6, copies=1)
    _run(pool, work, capsys)
    embedded: list[int] = []
    real = embed_module.extract_features

    def counted(model, dataset, **kwargs):
        embedded.append(len(dataset))
        return real(model, dataset, **kwargs)

    monkeypatch.setattr(embed_module, "extract_features", counted)
    Image.new("RGB", (64, 64), (250, 20, 20)).save(pool / "scene_0002a.png")  # sorts in the middle: shifts shards
    Image.new("RGB", (64, 64), (20, 20, 250)).save(pool / "scene_0004.png")  # replaced: another size
    (pool / "scene_0005.png").unlink()
    out = _run(pool, work, capsys)
    assert ("[embed] the pool: its images changed since they were embedded (1 added, 1 removed, 12 now): embedding "
            "it again, with the embeddings of the images it still holds") in out
    assert "[embed] the pool: 10 of 12 images taken from the earlier embedding" in out
    assert sum(embedded) == 2 and not (work / "embed" / "pool.earlier").exists()
    monkeypatch.undo()
    _run(pool, tmp_path / "fresh", capsys)
    for key in ("cls", "copy"):
        fresh = EmbeddingStore(tmp_path / "fresh" / "embed" / "pool").load(key).numpy()
        np.testing.assert_allclose(EmbeddingStore(work / "embed" / "pool").load(key).numpy(), fresh, atol=2e-3)
    assert (work / "manifest.txt").read_text() == (tmp_path / "fresh" / "manifest.txt").read_text()
    # killed while embedding a changed pool again: the rerun still takes the images from the earlier embedding
    (pool / "scene_0000.png").unlink()
    monkeypatch.setattr(embed_module.EmbeddingStore, "load", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["curate", "run", "--pool", str(pool), "--output-dir", str(work), "--target-size", "4", *MODEL]) == 130
    assert (work / "embed" / "pool.earlier").is_dir()
    monkeypatch.undo()
    out = _run(pool, work, capsys)
    assert "[embed] the pool: 11 of 11 images taken from the earlier embedding" in out
    assert not (work / "embed" / "pool.earlier").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_unreadable_image_added_to_an_embedded_pool_keeps_the_reused_features(tmp_path, capsys):
    """A shard whose only image to embed was unreadable was written without feature keys: its reused rows had no
    arrays, dedup failed, and every rerun found the embed stage finished (the earlier embedding already deleted)."""
    pool, work = tmp_path / "pool", tmp_path / "work"
    write_copy_pairs(pool, n_images=3, copies=1)
    _run(pool, work, capsys)
    before = EmbeddingStore(work / "embed" / "pool")
    (pool / "zz_broken.png").write_bytes(b"not an image at all")
    out = _run(pool, work, capsys)
    assert "[embed] the pool: 6 of 7 images taken from the earlier embedding" in out
    store = EmbeddingStore(work / "embed" / "pool")
    assert [store.paths[i] for i in store.bad] == [str(pool / "zz_broken.png")]
    for key in ("cls", "copy"):
        np.testing.assert_array_equal(store.load(key).numpy(), before.load(key).numpy())
    assert "[dedup]" in out and "finished earlier" in _run(pool, work, capsys)
    # a shard record of that defect (rows without arrays) is named as damaged, with the fix
    record = work / "embed" / "pool" / "shard-00000.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "keys": []}))
    with pytest.raises(DinokitError, match="shard-00000.json is damaged .* rerun 'dinokit curate embed --force'"):
        EmbeddingStore(work / "embed" / "pool")
