"""k-NN classification of frozen features, as the official ``eval/knn.py`` protocol.

Features are the L2-normalised class tokens. For each query, the ``max(ks)`` most cosine-similar
training samples vote with weights ``softmax(sim / T)`` taken over those ``max(ks)`` neighbours; the
class scores for a given k sum the first k weighted one-hot labels. Top-1 and top-5 accuracies are
micro-averaged, in percent; classes with equal scores rank by class index (deterministic top-5).

Memory stays bounded at any scale: queries go in batches and the training features in chunks,
keeping a running top-k, so the (queries x train) similarity matrix is never built. Under
``torchrun`` each rank holds a shard of the training features; the per-rank top-k lists are
gathered and merged into the global top-k, so every rank ends with the same, exact result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as du
from ..devices import usable_device
from ..errors import DinokitError
from .results import append_results, label_warnings, report_label_warnings
from .feature_cache import extract_eval_features
from .setup import EvalContext, load_eval_datasets

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
DEFAULT_CHUNK_SIZE = 65536  # training rows per similarity block: 256 queries x 65536 x 4 B = 64 MiB
RESULTS_FILE = "results_eval_knn.json"


@dataclass
class KnnResult:
    """One line of ``results_eval_knn.json``; accuracies in percent, averaged over ``n_tries`` subsets."""

    n_per_class: int  # training samples per class (-1: the whole training set)
    k: int
    top1: float
    top5: float
    n_tries: int = 1
    notes: tuple[str, ...] = ()  # what makes the line other than its name says; recorded in its "warnings"


# ---------------------------------------------------------------------------------------------- core
def local_topk(
    queries: torch.Tensor, train_features: torch.Tensor, train_labels: torch.Tensor, k: int, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar rows of ``train_features`` for each query, merged chunk by chunk.

    Returns (B, k) similarities (descending) and labels; missing neighbours (fewer than k rows)
    are padded with similarity -inf, which gives them zero vote weight.
    """
    b = queries.shape[0]
    best_sims = queries.new_full((b, k), float("-inf"))
    best_labels = torch.zeros((b, k), dtype=torch.long, device=queries.device)
    n = train_features.shape[0]
    step = n if not chunk_size else chunk_size
    for start in range(0, n, max(step, 1)):
        chunk = train_features[start : start + step].to(queries.device, non_blocking=True)
        sims = queries @ chunk.T  # (B, c)
        sims, idx = sims.topk(min(k, sims.shape[1]), dim=1)  # (B, <=k)
        labels = train_labels[start : start + step].to(queries.device)[idx]
        merged_sims = torch.cat((best_sims, sims), dim=1)  # (B, k + <=k)
        merged_labels = torch.cat((best_labels, labels), dim=1)
        best_sims, order = merged_sims.topk(k, dim=1)
        best_labels = merged_labels.gather(1, order)
    return best_sims, best_labels


def _merge_across_ranks(sims: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k from each rank's (B, k) top-k lists (identity in one process)."""
    world = du.get_world_size()
    if world == 1:
        return sims, labels
    b, k = sims.shape
    all_sims = du.all_gather_cat(sims).view(world, b, k).permute(1, 0, 2).reshape(b, world * k)
    all_labels = du.all_gather_cat(labels).view(world, b, k).permute(1, 0, 2).reshape(b, world * k)
    sims, order = all_sims.topk(k, dim=1)
    return sims, all_labels.gather(1, order)


def checked_labels(name: str, labels: Any, rows: int, num_classes: int) -> torch.Tensor:
    """``labels`` (a tensor, array or list) as a 1-D long tensor of one class in 0..num_classes-1 per feature row, else
    one line naming ``name`` (-1, what unlabelled images get, was a traceback from bincount; 0.7 was taken as 0)."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or len(labels) != rows:
        raise DinokitError(f"{name} has shape {tuple(labels.shape)}; give one class index per feature row ({rows})")
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise DinokitError(f"{name} holds fractions ({labels.dtype}); give class indices 0..{num_classes - 1}")
    labels = labels.long()
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:  # once per call
        unlabelled = " (images without a label have -1)" if int(labels.min()) < 0 else ""
        raise DinokitError(f"{name} hold classes {int(labels.min())}..{int(labels.max())}, not within "
                           f"0..{num_classes - 1}: give num_classes, the number of classes, or labels 0..N-1"
                           f"{unlabelled}")
    return labels


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[int, tuple[float, float]]:
    """Weighted k-NN top-1 / top-5 accuracy (percent) for each k in ``ks``.

    ``train_features`` (N, D) and ``test_features`` (M, D) must already be L2-normalised; queries
    run on ``device`` (None: ``train_features``' device), to which the training features are copied
    ``chunk_size`` rows at a time. Under ``torchrun``, pass this rank's shard of the training
    set and the full test set (the same on every rank). Top-5 becomes top-``num_classes`` when there
    are fewer than five classes (always 100%).
    """
    device = usable_device(device) if device is not None else train_features.device
    train_labels = checked_labels("train_labels", train_labels, len(train_features), num_classes)
    test_labels = checked_labels("test_labels", test_labels, len(test_features), num_classes)
    max_k = max(ks)
    n_top = min(5, num_classes)
    correct = {k: torch.zeros(2, dtype=torch.long) for k in ks}
    for start in range(0, test_features.shape[0], batch_size):
        queries = test_features[start : start + batch_size].to(device, train_features.dtype)
        targets = test_labels[start : start + batch_size].to(device)
        sims, labels = local_topk(queries, train_features, train_labels, max_k, chunk_size)
        sims, labels = _merge_across_ranks(sims, labels)
        weights = torch.softmax(sims / temperature, dim=1)  # over the max_k neighbours, as official
        for k in ks:
            scores = torch.zeros(queries.shape[0], num_classes, dtype=weights.dtype, device=device)
            scores.scatter_add_(1, labels[:, :k], weights[:, :k])  # (B, C) summed weighted one-hots
            # Stable sort: equal scores (e.g. classes with no neighbour) rank by class index, so the
            # result never depends on how topk breaks ties.
            top = scores.sort(dim=1, descending=True, stable=True).indices[:, :n_top]  # (B, n_top)
            hits = top == targets[:, None]
            correct[k] += torch.stack((hits[:, 0].sum(), hits.any(dim=1).sum())).cpu()
    total = max(test_features.shape[0], 1)
    return {k: (100.0 * correct[k][0].item() / total, 100.0 * correct[k][1].item() / total) for k in ks}


def sample_per_class(labels: torch.Tensor, n_per_class: int, *, seed: int) -> torch.Tensor:
    """Sorted indices of ``n_per_class`` random samples of each class (all of a smaller class)."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:n_per_class]])
    return torch.cat(chosen).sort().values


# ---------------------------------------------------------------------------------------------- protocol
def check_knn_options(
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    n_per_class_list: Sequence[int] = (-1,),
    n_tries: int = 1,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> None:
    """The k-NN settings, the first wrong one named in one line (by its ``dinokit eval knn`` option).

    The command calls this before any folder or feature is written; :func:`evaluate_knn` calls it for Python callers.
    """
    if not ks or min(ks) < 1:
        raise DinokitError(f"--nb-knn must be at least 1, got {min(ks, default='nothing')}")
    if not temperature > 0:  # NaN too
        raise DinokitError(f"--temperature must be positive, got {temperature:g}")
    if n_tries < 1:
        raise DinokitError(f"--n-tries must be at least 1, got {n_tries}")
    bad = [n for n in n_per_class_list if n == 0 or n < -1]
    if bad or not n_per_class_list:
        raise DinokitError(f"--n-per-class-list must hold positive numbers (or -1 = all), got {bad[0] if bad else 'nothing'}")
    if chunk_size is not None and chunk_size < 0:
        raise DinokitError(f"--chunk-size must be >= 0 (0 = all at once), got {chunk_size}")


def evaluate_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    n_per_class_list: Sequence[int] = (-1,),
    n_tries: int = 1,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    gather_on_cpu: bool = False,
    classes: Sequence[str] | None = None,
) -> list[KnnResult]:
    """The full protocol on raw class tokens: normalise, subsample, shard over ranks, classify.

    Every rank passes the full feature sets; each keeps its shard of the training set on ``device``, or in CPU
    memory with ``gather_on_cpu`` (official option: for training sets larger than the accelerator's memory; each
    batch of queries then meets the shard ``chunk_size`` rows at a time on ``device``).
    Few-shot subsets (``n_per_class > 0``) use seeds 0 .. ``n_tries - 1``; accuracies are averaged.
    ``classes``: the class names, shown in the warnings.
    """
    check_knn_options(ks=ks, temperature=temperature, n_per_class_list=n_per_class_list, n_tries=n_tries,
                      chunk_size=chunk_size)
    device = usable_device(device)
    train_labels = checked_labels("train_labels", train_labels, len(train_features), num_classes)
    test_labels = checked_labels("test_labels", test_labels, len(test_features), num_classes)
    report_label_warnings(train_labels, test_labels, num_classes, classes=classes)
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float(), dim=1)
    rank, world = du.get_rank(), du.get_world_size()
    results = []
    class_sizes = torch.bincount(train_labels.cpu())[torch.unique(train_labels.cpu())]  # of the classes present
    for n_per_class in n_per_class_list:
        tries = [None] if n_per_class < 0 else list(range(n_tries))
        smaller = int((class_sizes < n_per_class).sum())
        row_notes = [f"{smaller} class(es) have fewer than {n_per_class} training images: the {n_per_class}-shot row "
                     "uses all of theirs"] if smaller else []  # not the few-shot figure its name says for those
        k_notes: dict[int, str] = {}
        if smaller and du.is_main_process():
            print(f"note: {row_notes[0]}")
        # few-shot, as the official code: the k of the list up to n_per_class, and n_per_class itself
        row_ks = list(ks) if n_per_class < 0 else sorted({k for k in [*ks, n_per_class] if k <= n_per_class})
        runs = []
        for seed in tries:
            subset = slice(None) if seed is None else sample_per_class(train_labels, n_per_class, seed=seed)
            feats, labels = train_features[subset], train_labels[subset]
            n_train = len(labels)
            above = sorted(k for k in set(row_ks) if k > n_train)
            if above and seed in (None, 0):
                k_notes = {k: f"k={k} exceeds the {n_train} training samples: all {n_train} vote" for k in above}
                if du.is_main_process():
                    named = ", ".join(f"k={k}" for k in above)
                    print(f"note: {named} {'exceeds' if len(above) == 1 else 'exceed'} the {n_train} training "
                          f"samples: all {n_train} vote in {'that row' if len(above) == 1 else 'those rows'}")
            shard = slice(rank, None, world)  # rank r holds rows r, r + world, ...
            kept = _kept_on_cpu(feats[shard], device) if gather_on_cpu else feats[shard].to(device)
            accuracy = knn_classify(
                kept, labels[shard].to(device), test_features, test_labels,
                num_classes=num_classes, ks=sorted({min(k, n_train) for k in row_ks}), temperature=temperature,
                chunk_size=chunk_size, batch_size=batch_size, device=device,
            )
            runs.append({k: accuracy[min(k, n_train)] for k in row_ks})
        for k in row_ks:
            top1 = sum(r[k][0] for r in runs) / len(runs)
            top5 = sum(r[k][1] for r in runs) / len(runs)
            notes = tuple(row_notes + ([k_notes[k]] if k in k_notes else []))
            results.append(KnnResult(n_per_class=n_per_class, k=k, top1=top1, top5=top5, n_tries=len(runs),
                                     notes=notes))
    return results


def _kept_on_cpu(features: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``features`` in CPU memory, page-locked when they go to a CUDA device chunk by chunk (asynchronous copies)."""
    features = features.cpu()
    return features.pin_memory() if torch.device(device).type == "cuda" else features


def write_knn_results(results: Sequence[KnnResult], output_dir: str | Path, provenance: dict | None = None) -> Path:
    """Append one JSON line per (n_per_class, k) to ``output_dir/results_eval_knn.json`` (atomically), each with
    ``provenance`` (weights, datasets, warnings); a line's own notes join its warnings."""
    lines = []
    for r in results:
        line = {**asdict(r), **(provenance or {})}
        if notes := line.pop("notes"):
            line["warnings"] = [*line.get("warnings", []), *notes]
        lines.append(line)
    return append_results(Path(output_dir) / RESULTS_FILE, lines)


def format_knn_table(results: Sequence[KnnResult]) -> str:
    lines = [f"{'n_per_class':>11}  {'k':>4}  {'top-1':>6}  {'top-5':>6}"]
    for r in results:
        shots = "all" if r.n_per_class < 0 else str(r.n_per_class)
        lines.append(f"{shots:>11}  {r.k:>4}  {r.top1:6.2f}  {r.top5:6.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- training hook
def run_knn_eval(
    backbone: nn.Module,
    *,
    train_dataset_str: str,
    val_dataset_str: str,
    output_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    image_size: int = 224,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: torch.dtype | None = None,
    write_results: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """k-NN accuracy of ``backbone`` as it is now (the training loop calls this on teacher snapshots).

    Returns ``{"knn_top1_k20": ..., "knn_top5_k20": ..., ...}``; nothing is cached (the weights
    change between calls) and nothing is written unless ``write_results``. The module's train/eval
    mode is restored afterwards.
    """
    train_ds, val_ds, num_classes = load_eval_datasets(train_dataset_str, val_dataset_str, image_size=image_size)
    extract = dict(kind="cls", batch_size=batch_size, num_workers=num_workers, device=device, dtype=dtype,
                   progress=progress)
    train = extract_eval_features(backbone, train_ds, desc="k-NN train", **extract)
    val = extract_eval_features(backbone, val_ds, desc="k-NN val", **extract)
    results = evaluate_knn(
        train.features["cls"], train.targets, val.features["cls"], val.targets,
        num_classes=num_classes, ks=ks, temperature=temperature, device=device,
    )
    if write_results and output_dir is not None and du.is_main_process():
        write_knn_results(results, output_dir, {"train_dataset": train_dataset_str, "val_dataset": val_dataset_str})
    metrics = {}
    for r in results:
        metrics[f"knn_top1_k{r.k}"] = r.top1
        metrics[f"knn_top5_k{r.k}"] = r.top5
    return metrics


def knn_protocol(
    ctx: EvalContext,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    n_per_class_list: Sequence[int] = (-1,),
    n_tries: int = 1,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    gather_on_cpu: bool = False,
) -> list[KnnResult]:
    """``dinokit eval knn``: cached class tokens, the k-NN protocol, ``results_eval_knn.json``."""
    train = ctx.features("train", "cls")
    val = ctx.features("val", "cls")
    results = evaluate_knn(
        train.features["cls"], train.targets, val.features["cls"], val.targets,
        num_classes=ctx.num_classes, ks=ks, temperature=temperature, n_per_class_list=n_per_class_list,
        n_tries=n_tries, chunk_size=chunk_size, device=ctx.device, gather_on_cpu=gather_on_cpu,
        classes=ctx.class_names,
    )
    if du.is_main_process():
        trust = label_warnings(train.targets, val.targets, ctx.num_classes, classes=ctx.class_names)
        write_knn_results(results, ctx.output_dir, ctx.result_provenance(trust))
    return results
