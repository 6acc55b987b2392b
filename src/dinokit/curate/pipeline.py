"""The curation pipeline: embed -> dedup -> retrieve -> cluster -> sample -> report, in a work folder.

Every stage reads and writes files under ``WORK/<stage>/`` and finishes by writing ``WORK/<stage>/done.json``
(its settings' digest, its counts and its time). A rerun skips a stage whose ``done.json`` carries the same
digest (a stage's digest includes those of the stages it reads), so a killed run resumes at the stage
it was in, and a changed knob redoes that stage and the ones after it. The result is
``WORK/manifest.txt``: one absolute image path per line, i.e. ``FileList:path=WORK/manifest.txt``.

Under ``torchrun`` the heavy stages are shared: each rank embeds its shards, searches the neighbours of
its slice of the pool, and holds a slice of the points in the first k-means level; the light ones
(union-find, sampling, the report) run on rank 0 while the others wait.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .. import distributed as du
from ..data import make_classification_eval_transform, make_dataset
from ..data.datasets import parse_dataset_str
from ..data.listing import real_paths
from ..devices import usable_workers
from ..errors import DinokitError
from ..features import check_image_size
from ..files import atomic_write
from .config import CurateConfig
from .dedup import (centre_links, centre_tolerance, centred_unit_rows, choose_representatives,
                    connected_components, edges_above, relative_dedup)
from .embed import (PATHS_FILE, EmbeddingStore, clear_set, curation_feature_fn, embed_set, outdated,
                    reusable_store)
from .kmeans import hierarchical_kmeans
from .knn import knn_search
from .retrieve import retrieve_by_clusters, retrieve_by_samples
from .sampling import hierarchical_sample
from .work import Work, files_changed, image_sets, save_npy

STAGES = ("embed", "dedup", "retrieve", "cluster", "sample", "report")
EARLIER = ".earlier"  # WORK/embed/<set>.earlier: a set's earlier embedding while the set is embedded again
MANIFEST = "manifest.txt"


def _log(message: str) -> None:
    if du.is_main_process():
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------- embed
def build_models(config: CurateConfig, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    from ..eval.setup import DEFAULT_MODEL, setup_eval_model

    def build(model: str, config_file: str, weights: str, default_model: str | None = None) -> torch.nn.Module:
        random_init = weights == "random"
        backbone, _ = setup_eval_model(
            config_file=config_file or None, model=model or None,
            pretrained_weights=None if random_init else (weights or None), random_init=random_init, device=device,
            default_model=None if config_file else default_model,
        )
        check_image_size(config.embed.image_size, backbone, "embed.image_size")
        return backbone

    main = build(config.model, config.config_file, config.weights, default_model=DEFAULT_MODEL)
    copy = None
    if config.embed.copy == "model":
        copy = build(config.copy_model, config.copy_config_file, config.copy_weights)
    return main, copy


def open_sets(config: CurateConfig, transform=None) -> dict:
    """Every image set of the run, opened (listed); one line when a set is missing or the target too large. The
    command line calls it before writing anything into the work folder."""
    if parse_dataset_str(config.pool)[0] == "WebDataset":  # its manifest named members of tar files: unreadable
        raise DinokitError(f"--pool {config.pool!r} is shards, whose images are members of tar files that the "
                           "manifest cannot list; give the folder (or FileList) the shards were made from (their "
                           "sources.txt names each file); seed and evaluation sets may be shards")
    datasets = {name: make_dataset(s, transform=transform) for name, s in image_sets(config).items()}
    for name, dataset in datasets.items():  # the work folder's lists hold one name per line
        broken = next((p for p in dataset.paths if "\n" in str(p)), None)
        if broken is not None:
            raise DinokitError(f"the image name {str(broken)!r} ({_set_name(name)}) holds a line break, which curate's "
                               "lists of one name per line cannot hold; rename the file")
    pool = datasets["pool"]
    n_pool = len(pool)
    if config.target_size > n_pool:
        raise DinokitError(f"--target-size {config.target_size} is larger than the pool ({n_pool} images); lower it")
    for i in range(n_pool):  # decoded until one reads: one image for a good pool, the whole pool for an all-bad one
        try:
            pool.read_image(i)
            break
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    else:
        raise DinokitError(f"none of the {n_pool} pool images could be read (first: {pool.paths[0]}); check the files")
    return datasets


def _set_name(name: str) -> str:
    return {"pool": "the pool", "seed": "the seed set"}.get(name, f"evaluation set {name[5:]}")


def images_changed(work: Work, datasets: dict | None = None) -> str | None:
    """Why a finished embed stage is out of date with the same settings: the images of a set changed since (added,
    removed, renamed); None when none did. The main process lists the sets (``datasets``: those it opened) and says
    the same to every rank."""
    why = None
    if du.is_main_process():
        for name, dataset in (datasets or open_sets(work.config)).items():
            folder = work.folder("embed") / name
            paths = [os.path.abspath(p) for p in dataset.paths]
            if not (folder / PATHS_FILE).is_file() or outdated(folder, paths):  # settings: in the digest
                why = f"the images of {_set_name(name)} changed since (the details follow)"
                break
    return du.broadcast_object(why)


def check_ready(work: Work, stage: str) -> None:
    """One line when a stage before ``stage`` has not finished with these settings (``run`` and ``report``
    need none): the command line calls it before writing anything into the work folder."""
    order = list(STAGE_FUNCTIONS)
    if stage in order:
        for before in order[: order.index(stage)]:
            work.need(before)


def stage_embed(work: Work, *, device: torch.device, progress: bool = True,
                models: tuple[torch.nn.Module, torch.nn.Module | None] | None = None,
                datasets: dict | None = None) -> dict:
    """Embed every image set; ``datasets``: the sets already opened by :func:`open_sets` (a pool is listed once)."""
    config = work.config
    datasets = datasets or open_sets(config)
    for dataset in datasets.values():
        dataset.transform = make_classification_eval_transform(crop_size=config.embed.image_size)
    n_pool = len(datasets["pool"])
    model, copy_model = models or build_models(config, device)
    feature_fn = curation_feature_fn(config.embed.copy, config.embed.gem_p, copy_model)
    # at most one worker per usable core (said once); the stage's digest keeps the value asked for
    embedding = replace(config.embed, num_workers=usable_workers(config.embed.num_workers, key="embed.num_workers"))
    settings, files = work.feature_digest, work.model_files
    for name, dataset in datasets.items():
        folder, paths = work.folder("embed") / name, [os.path.abspath(p) for p in dataset.paths]
        # the earlier embedding of a set whose images changed, kept aside while it is embedded again: the images it
        # still holds are copied from it (one added image re-embedded the whole pool); other settings' go
        earlier = folder.with_name(f"{name}{EARLIER}")
        if du.is_main_process() and (why := outdated(folder, paths, settings, files)):
            aside = not earlier.exists() and reusable_store(folder, settings, files) is not None
            _log(f"[embed] {_set_name(name)}: {why}: embedding it again"
                 + (", with the embeddings of the images it still holds" if aside else ""))
            if aside:
                folder.rename(earlier)
            else:
                clear_set(folder)
        du.barrier()
        reuse = reusable_store(earlier, settings, files) if earlier.exists() else None
        reused = embed_set(dataset, paths, folder, model=model, feature_fn=feature_fn, config=embedding,
                           device=device, progress=progress, settings=settings, files=files, reuse=reuse)
        reused = sum(du.all_gather_object(reused))
        if du.is_main_process() and earlier.exists():
            _log(f"[embed] {_set_name(name)}: {reused} of {len(paths)} images taken from the earlier embedding")
            shutil.rmtree(earlier, ignore_errors=True)
        du.barrier()
    pool = EmbeddingStore(work.folder("embed") / "pool")
    if len(pool) == 0:
        raise DinokitError(f"none of the {n_pool} pool images could be read (first: {pool.paths[pool.bad[0]]}); check the files")
    return {"pool": n_pool, "unreadable": len(pool.bad), "embedded": len(pool)}


# ---------------------------------------------------------------------------------------------- dedup
def _rank_slice(n: int) -> slice:
    """This rank's contiguous block of ``n`` rows."""
    rank, world = du.get_rank(), du.get_world_size()
    return slice(n * rank // world, n * (rank + 1) // world)


def stage_dedup(work: Work, *, device: torch.device, progress: bool = True) -> dict:
    c = work.config.dedup
    pool = EmbeddingStore(work.folder("embed") / "pool")
    x = pool.load("copy").to(device)
    center = x.mean(0) if c.center else torch.zeros_like(x[0])
    x, relative = centred_unit_rows(x, center)
    tolerance = centre_tolerance(relative) if c.center else 0.0
    at_centre = relative <= tolerance
    n = len(x)
    # Links above the looser of the two thresholds, kept once: self-dedup cuts them again at its own.
    low = min(c.threshold, c.eval_threshold)
    mine = _rank_slice(n)
    sims, idx = knn_search(x[mine], x, min(c.k + 1, n), method=c.knn)  # + 1: an image finds itself
    parts = du.gather_object(edges_above(sims, idx, low, row_offset=mine.start))  # rank 0 joins the copies
    counts: dict = {}
    if du.is_main_process():
        centre_edges, centre_sims = centre_links(at_centre)
        edges = np.concatenate([p[0] for p in parts] + [centre_edges])
        edge_sims = np.concatenate([p[1] for p in parts] + [centre_sims.astype(parts[0][1].dtype)])
        labels = connected_components(n, edges[edge_sims > c.threshold])
        kept = choose_representatives(labels, keep=c.keep, sizes=pool.sizes, features=x.cpu())
        removed = np.zeros(n, dtype=bool)
        # the evaluation sets of these settings (the folders of sets given earlier, then left out, stay on disk)
        for name in (name for name in image_sets(work.config) if name.startswith("eval-")):
            evals, eval_relative = centred_unit_rows(EmbeddingStore(work.folder("embed") / name).load("copy")
                                                      .to(device), center)
            eval_at_centre = eval_relative <= tolerance
            e_sims, e_idx = knn_search(evals, x, min(c.k, n), method=c.knn)
            if at_centre.any():  # an evaluation image with the descriptor of the pool images on the centre: a copy
                e_sims, e_idx = (torch.as_tensor(a).cpu().numpy().copy() for a in (e_sims, e_idx))
                e_sims[eval_at_centre, 0], e_idx[eval_at_centre, 0] = 1.0, np.nonzero(at_centre)[0][0]
            removed |= relative_dedup(n, edges[edge_sims > c.eval_threshold], e_sims, e_idx, c.eval_threshold)
        final = kept[~removed[kept]]
        folder = work.folder("dedup")
        save_npy(folder / "components.npy", labels)
        save_npy(folder / "kept.npy", kept)
        save_npy(folder / "eval_removed.npy", np.nonzero(removed)[0])
        save_npy(folder / "after_eval.npy", final)
        copies = int((np.bincount(labels) > 1).sum())
        counts = {"after_dedup": len(kept), "after_eval_dedup": len(final), "groups_with_copies": copies,
                  "eval_removed": int(removed.sum())}
        dropped = n - len(kept)
        if dropped > n / 2:  # most of a pool as copies: often a descriptor that sees every image alike
            _log(f"note: dedup counts {dropped} of the {n} pool images ({100 * dropped / n:.0f}%) as "
                 f"near-copies (cosine > {c.threshold}); if the pool is not that redundant, check the weights of "
                 "the copy descriptor (a random init sees many images alike) or raise dedup.threshold")
    counts = du.broadcast_object(counts)
    if counts["after_eval_dedup"] == 0:  # every later stage would fail on an empty set, naming the wrong cause
        raise DinokitError(
            f"no pool image is left: all {counts['after_dedup']} left by dedup copy an image of the evaluation "
            f"sets (cosine > {c.eval_threshold}); give a pool that is not the --eval-set (or raise "
            "dedup.eval_threshold)")
    return counts


# ---------------------------------------------------------------------------------------------- retrieve
def stage_retrieve(work: Work, *, device: torch.device, progress: bool = True) -> dict:
    config, c = work.config, work.config.retrieve
    store = EmbeddingStore(work.folder("embed") / "pool")
    candidates = work.load("dedup", "after_eval.npy", rows_of=len(store))
    counts: dict = {"retrieved": None}
    if du.is_main_process():
        selected = candidates
        if config.seed_set:
            pool = store.load("cls", candidates).to(device)
            seed = EmbeddingStore(work.folder("embed") / "seed").load("cls").to(device)
            if c.mode == "sample":
                chosen = retrieve_by_samples(seed, pool, k=c.k, max_images=c.max_images, method=work.config.dedup.knn)
            else:
                chosen = retrieve_by_clusters(seed, pool, n_clusters=c.n_clusters, min_seed_images=c.min_seed_images,
                                              per_cluster=c.per_cluster, max_images=c.max_images)
            selected = candidates[chosen]
            counts["retrieved"] = len(selected)
        save_npy(work.folder("retrieve") / "selected.npy", selected)
    return du.broadcast_object(counts)


# ---------------------------------------------------------------------------------------------- cluster
def auto_levels(n: int) -> list[int]:
    """Two levels sized from the number of points: ~2·sqrt(n) clusters, then ~2·sqrt of that."""
    k1 = min(n, max(2, round(2 * math.sqrt(n))))
    if k1 < 3:
        return [max(k1, 1)]  # too few images for two levels
    return [k1, min(k1 - 1, round(2 * math.sqrt(k1)))]


def cluster_settings(config: CurateConfig, n: int) -> dict:
    c = config.cluster
    levels = list(c.n_clusters) or auto_levels(n)
    splits = list(c.n_splits) or [1] * len(levels)
    sizes = [n] + [k * split for k, split in zip(levels, splits)][:-1]  # each level's input (at most)
    return {
        "n_clusters": levels,
        "resampling_steps": list(c.resampling_steps) or [10] * len(levels),
        "sample_size": list(c.sample_size) or [max(1, s // (2 * k)) for s, k in zip(sizes, levels)],
        "n_splits": splits,
    }


def stage_cluster(work: Work, *, device: torch.device, progress: bool = True) -> dict:
    c = work.config.cluster
    pool = EmbeddingStore(work.folder("embed") / "pool")
    selected = work.load("retrieve", "selected.npy", rows_of=len(pool))
    settings = cluster_settings(work.config, len(selected))
    mine = _rank_slice(len(selected))
    x = pool.load("cls", selected[mine]).to(device)
    if c.float64:
        x = x.double()
    levels = hierarchical_kmeans(x, settings["n_clusters"], resampling_steps=settings["resampling_steps"],
                                 sample_size=settings["sample_size"], n_splits=settings["n_splits"],
                                 sampling=c.sampling, n_iters=c.n_iters, seed=c.seed, metric=c.metric, distributed=du.get_world_size() > 1)
    folder = work.folder("cluster")
    rank = du.get_rank()
    save_npy(folder / f"leaf.rank{rank}.npy",
              np.stack([levels[0].labels.cpu().double().numpy(), levels[0].distances.cpu().double().numpy()]))
    if du.is_main_process():
        for i, level in enumerate(levels, start=1):
            save_npy(folder / f"centroids{i}.npy", level.centroids.cpu().float().numpy())
            if i > 1:
                save_npy(folder / f"parents{i - 1}.npy", level.labels.cpu().numpy())
    return {**settings, "ranks": du.get_world_size()}


def load_leaves(work: Work, n_selected: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Leaf cluster and distance of each of the ``n_selected`` selected images, and each level's parent array
    (checked: an edited file is one line, not an IndexError in the sampling)."""
    record = work.need("cluster")["counts"]
    ranks = record["ranks"]
    # each level's clusters (cluster.n_splits may split them): its centroids
    sizes = [len(work.load("cluster", f"centroids{i}.npy", ndim=2)) for i in range(1, len(record["n_clusters"]) + 1)]
    leaves = np.concatenate([work.load("cluster", f"leaf.rank{r}.npy", ndim=2, rows_of=sizes[0],
                                       length=n_selected * (r + 1) // ranks - n_selected * r // ranks)
                             for r in range(ranks)], axis=1)
    parents = [work.load("cluster", f"parents{i}.npy", rows_of=sizes[i], length=sizes[i - 1])
               for i in range(1, len(sizes))]
    return leaves[0].astype(np.int64), leaves[1], parents


# ---------------------------------------------------------------------------------------------- sample
def stage_sample(work: Work, *, device: torch.device, progress: bool = True) -> dict:
    config = work.config
    counts: dict = {}
    if du.is_main_process():
        pool = EmbeddingStore(work.folder("embed") / "pool")  # checked before anything is written
        selected = work.load("retrieve", "selected.npy", rows_of=len(pool))
        leaf, distances, parents = load_leaves(work, len(selected))
        target = config.target_size or len(selected)
        room = len(selected) * config.sample.multiplier
        if target > room:
            times = f" x sample.multiplier {config.sample.multiplier}" if config.sample.multiplier > 1 else ""
            raise DinokitError(
                f"--target-size {target} is larger than the {len(selected)} images left after dedup and retrieve{times}; "
                f"lower it{'' if times else ', or repeat images with sample.multiplier=2'} (the finished stages "
                "are kept: the command goes on from there)")
        chosen = hierarchical_sample(leaf, parents, target, distances=distances, strategy=config.sample.strategy,
                                     seed=config.sample.seed, multiplier=config.sample.multiplier)
        save_npy(work.folder("sample") / "chosen.npy", chosen)
        paths = real_paths(pool.row_paths(selected[chosen]))
        with atomic_write(work.root / MANIFEST) as tmp:
            tmp.write_text("".join(f"{p}\n" for p in paths), errors="surrogateescape")  # names as their bytes
        counts = {"sampled": len(chosen), "sampled_distinct": len(np.unique(chosen))}
    return du.broadcast_object(counts)


# ---------------------------------------------------------------------------------------------- run
STAGE_FUNCTIONS: dict[str, Callable[..., dict]] = {
    "embed": stage_embed, "dedup": stage_dedup, "retrieve": stage_retrieve, "cluster": stage_cluster,
    "sample": stage_sample,
}


def run_stage(work: Work, stage: str, *, device: torch.device, progress: bool = True, force: bool = False,
              **kwargs) -> dict:
    """Run ``stage`` unless it finished with the same settings; the stages before it must have finished."""
    if stage == "report":
        from .report import write_report

        return write_report(work)
    check_ready(work, stage)
    record = work.done(stage)
    again = None
    if stage == "embed" and record and not force:  # the same settings, but other files behind them
        which = files_changed(record.get("files"), work.model_files)  # the record in hand: not read again
        again = f"its model files changed since ({which})" if which else images_changed(work, kwargs.get("datasets"))
    if record is not None and not force and not again:
        _log(f"[{stage}] finished earlier with these settings ({record['seconds']:.1f} s): skipped")
        return record
    again = again or (None if force else work.changed(stage))
    _log(f"[{stage}] running" + (f" again: {again}" if again else ""))
    start = time.perf_counter()
    with work.running(stage):  # it rewrites the files its record vouches for: a kill in it must redo it
        counts = STAGE_FUNCTIONS[stage](work, device=device, progress=progress, **kwargs)
    record = work.finish(stage, time.perf_counter() - start, counts)
    said = ", ".join(f"{k} {v}" for k, v in counts.items() if v is not None)  # None: not run (retrieve, no seed set)
    _log(f"[{stage}] done in {record['seconds']:.1f} s: " + (said or "nothing to do"))
    return record


def run_pipeline(config: CurateConfig, work_dir: str | Path, *, device: torch.device | str = "cpu",
                 progress: bool = True, models=None, datasets: dict | None = None) -> dict:
    """Every stage in order (finished ones skipped); returns the report's counts and times. ``models`` and
    ``datasets`` (from :func:`open_sets`) go to the embed stage."""
    work = Work(work_dir, config)
    device = torch.device(device)
    for stage in STAGES:
        given = {"models": models, "datasets": datasets} if stage == "embed" else {}
        extra = {k: v for k, v in given.items() if v is not None}
        run_stage(work, stage, device=device, progress=progress, **extra)
    return json.loads((work.root / "report.json").read_text())
