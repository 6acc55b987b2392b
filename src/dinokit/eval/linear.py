"""Linear probing of a frozen backbone, as the official ``eval/linear.py`` protocol.

A grid of linear classifiers is trained at once on the same frozen features: the class tokens of
the last 1 or 4 blocks, with or without the mean of the last block's patch tokens (all after the
final norm), times 13 learning rates scaled by ``batch_size * world_size / 256``. Each classifier is
an ``nn.Linear`` with weight ~ N(0, 0.01) and zero bias; the loss is the sum of their
cross-entropies; SGD with momentum 0.9, no weight decay and a cosine schedule to 0, stepped every
iteration. The best classifier on the validation set is reported and saved in the hub head format
(``{"weight": (C, F), "bias": (C,)}``), which the ``dinov2_vit*14_lc`` entry points load.

Training images are augmented (RandomResizedCrop + flip) and go through the backbone at every
iteration, as officially. ``augment=False`` trains instead on cached eval-transform features: far
faster, usually a little less accurate.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import distributed as du
from ..config.validation import SEED_LIMIT
from ..data import make_classification_train_transform
from ..errors import DinokitError
from ..models.weight_files import load_state_dict_file
from ..files import atomic_write
from ..models.linear_classifier import probe_input
from .results import report_label_warnings
from .linear_data import FeatureBatch, StreamPosition, augmented_batches, cached_batches
from .linear_results import LinearResult, best_classifier, periodic_line, periodic_record, save_results, val_scores
from .scoring import VAL_METRICS, open_test_sets, score_test_sets
from .setup import EvalContext

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
N_LAST_BLOCKS = (1, 4)

@dataclass(frozen=True)
class ProbeSetting:
    n_last_blocks: int  # class tokens of this many last blocks
    avgpool: bool  # also the mean of the last block's patch tokens
    lr: float  # learning rate, already scaled by the batch size

    def name(self, lr_format: str = ".5f") -> str:
        """The official classifier name, e.g. ``classifier_4_blocks_avgpool_True_lr_0_00100``."""
        name = f"classifier_{self.n_last_blocks}_blocks_avgpool_{self.avgpool}_lr_{self.lr:{lr_format}}"
        return name.replace(".", "_")


def classifier_names(settings: Sequence[ProbeSetting]) -> list[str]:
    """Official names; with small batches, scaled lrs below 1e-5 collide in ``.5f``, so use 3 digits then."""
    names = [s.name() for s in settings]
    return names if len(set(names)) == len(names) else [s.name(".2e") for s in settings]


def probe_settings(
    *, learning_rates: Sequence[float] = LEARNING_RATES, n_last_blocks: Sequence[int] = N_LAST_BLOCKS, total_batch: int
) -> list[ProbeSetting]:
    """The official grid: n_last_blocks x avgpool x lr, with ``lr * total_batch / 256``."""
    scale = total_batch / 256.0
    layouts = [(n, avgpool) for n in n_last_blocks for avgpool in (False, True)]
    return [ProbeSetting(n, avgpool, lr * scale) for n, avgpool in layouts for lr in learning_rates]


class LinearProbes(nn.Module):
    """Every classifier of the grid, each an ``nn.Linear`` on its own view of the shared features."""

    def __init__(self, settings: Sequence[ProbeSetting], *, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.settings = dict(zip(classifier_names(settings), settings))
        self.classifiers_dict = nn.ModuleDict()
        for name, s in self.settings.items():
            linear = nn.Linear((s.n_last_blocks + int(s.avgpool)) * embed_dim, num_classes)
            nn.init.normal_(linear.weight, mean=0.0, std=0.01)
            nn.init.zeros_(linear.bias)
            self.classifiers_dict[name] = linear

    def forward(self, cls_tokens: torch.Tensor, patch_mean: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs: dict[tuple[int, bool], torch.Tensor] = {}
        logits = {}
        for name, s in self.settings.items():
            key = (s.n_last_blocks, s.avgpool)
            if key not in inputs:
                inputs[key] = probe_input(cls_tokens, patch_mean, n_last_blocks=s.n_last_blocks, avgpool=s.avgpool)
            logits[name] = self.classifiers_dict[name](inputs[key])
        return logits


# ---------------------------------------------------------------------------------------------- training
RUNNING_CHECKPOINT = "running_checkpoint_linear_eval.pth"  # the official name


# Settings an older running checkpoint does not record: it resumes all the same (it holds no periodic records to mix).
LATER_IDENTITY_KEYS = ("eval_period", "val_metric_type", "crop_draws")


class RunningCheckpoint:
    """``OUTPUT_DIR/running_checkpoint_linear_eval.pth``: the probes, SGD and schedule states, the iteration and each
    rank's stream position, written atomically each epoch. A rerun of the same evaluation (same weights, datasets
    and options, recorded as ``identity``) resumes from it; another evaluation in the same folder is one line."""

    def __init__(self, path: Path, identity: dict) -> None:
        self.path, self.identity = path, identity

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = load_state_dict_file(self.path)
        saved = state.get("identity", {})
        keys = (set(saved) | set(self.identity)) - {k for k in LATER_IDENTITY_KEYS if k not in saved}
        differ = sorted(k for k in keys if saved.get(k) != self.identity.get(k))
        if differ:
            raise DinokitError(
                f"{self.path} holds an unfinished linear evaluation with other settings ({', '.join(differ)} differ); "
                "use another --output-dir, or delete that file to start this one there")
        return state

    def save(self, state: dict, position: StreamPosition) -> None:
        streams = du.all_gather_object((position.batches, sorted(position.unreadable)))
        if du.is_main_process():
            with atomic_write(self.path) as tmp:
                torch.save({**state, "streams": streams, "identity": self.identity}, tmp)


def train_probes(
    probes: LinearProbes, batches: Iterator[FeatureBatch], *, iterations: int, progress: bool = False,
    state: dict | None = None, save: Callable[[int, dict], None] | None = None, save_every: int = 0,
    evaluate: Callable[[int], None] | None = None, eval_every: int = 0,
) -> float:
    """SGD (momentum 0.9, no weight decay), cosine lr to 0 over ``iterations``; returns the last loss.

    Gradients are averaged over ranks (the official code wraps the classifiers in DDP). ``state`` (``iteration``,
    ``probes``, ``optimizer``, ``scheduler``, as given to ``save``) resumes a run; ``save(done, state)`` is called
    every ``save_every`` iterations before the last, after ``evaluate(done)`` when both fall on one iteration
    (``evaluate`` every ``eval_every`` iterations before the last: the official periodic evaluation).
    """
    groups = [{"params": probes.classifiers_dict[name].parameters(), "lr": s.lr} for name, s in probes.settings.items()]
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0.0)
    start = 0
    if state is not None:
        probes.load_state_dict(state["probes"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["iteration"])
    bar = tqdm(total=iterations, initial=start, desc="linear probes", unit="it",
               disable=not (progress and du.is_main_process()))
    loss = torch.zeros(())
    params = list(probes.parameters())
    for done in range(start + 1, iterations + 1):
        cls_tokens, patch_mean, labels = next(batches)
        logits = probes(cls_tokens, patch_mean)
        loss = sum(F.cross_entropy(out, labels) for out in logits.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        du.all_reduce_mean_each([p.grad for p in params])  # one collective for all 104 weights and biases
        optimizer.step()
        scheduler.step()
        bar.update()
        if not bar.disable and (done % 50 == 0 or done == iterations):  # the loss read (a host sync) for the bar only
            bar.set_postfix(loss=f"{loss.item() / len(logits):.3f}", refresh=False)
        if evaluate is not None and eval_every and done % eval_every == 0 and done < iterations:
            evaluate(done)
        if save is not None and save_every and done % save_every == 0 and done < iterations:
            save(done, {"iteration": done, "probes": probes.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()})
    bar.close()
    return float(loss.item())


# ---------------------------------------------------------------------------------------------- protocol
def check_linear_options(
    *,
    epochs: int = 10,
    epoch_length: int = 1250,
    batch_size: int = 128,
    learning_rates: Sequence[float] = LEARNING_RATES,
    n_last_blocks: Sequence[int] = N_LAST_BLOCKS,
    depth: int | None = None,
    eval_period: int | None = None,
    seed: int = 0,
) -> None:
    """The linear-probe settings, the first wrong one named in one line (by its ``dinokit eval linear`` option).

    ``depth``, the backbone's number of blocks, when known: --n-last-blocks must leave at least one value within it
    (larger values are left out, with a warning). The command calls this before the model is built and again with
    ``depth`` right after, before any folder or feature is written; :func:`linear_protocol` calls it for Python
    callers.
    """
    for name, value in (("--epochs", epochs), ("--epoch-length", epoch_length), ("--batch-size", batch_size)):
        if value < 1:
            raise DinokitError(f"{name} must be at least 1, got {value}")
    if not 0 <= seed < SEED_LIMIT:  # the per-image crop seeds are derived from it
        raise DinokitError(f"--seed must be from 0 to 2^32 - 1, got {seed}")
    if eval_period is not None and eval_period < 0:
        raise DinokitError(f"--eval-period-iterations must be 0 (only at the end) or more, got {eval_period}")
    bad = [lr for lr in learning_rates if not lr > 0]  # NaN too
    if bad or not learning_rates:
        raise DinokitError(f"--learning-rates must be positive, got {format(bad[0], 'g') if bad else 'nothing'}")
    if not n_last_blocks or min(n_last_blocks) < 1:
        raise DinokitError(f"--n-last-blocks must be at least 1, got {min(n_last_blocks, default='nothing')}")
    if depth is not None and min(n_last_blocks) > depth:
        raise DinokitError(f"--n-last-blocks {' '.join(map(str, n_last_blocks))} exceeds the backbone's {depth} "
                           f"blocks; give at most {depth}")


def plan_line(settings: Sequence[ProbeSetting], *, epochs: int, epoch_length: int, batch_size: int,
              augment: bool) -> str:
    """What ``linear_protocol`` is about to train (printed first: the official length takes long on a CPU)."""
    lrs = len({s.lr for s in settings})
    layouts = len({(s.n_last_blocks, s.avgpool) for s in settings})
    data = ("augmented images (the backbone runs at every step; --no-augment trains on cached features, much "
            "faster)" if augment else "cached features")
    plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
    return (f"training {plural(len(settings), 'linear probe')} ({plural(lrs, 'learning rate')} x "
            f"{plural(layouts, 'feature layout')}) for {plural(epochs * epoch_length, 'iteration')} "
            f"({plural(epochs, 'epoch')} of {epoch_length}), batch {batch_size} per process, on {data}")


def linear_protocol(
    ctx: EvalContext,
    *,
    epochs: int = 10,
    epoch_length: int = 1250,
    batch_size: int = 128,
    learning_rates: Sequence[float] = LEARNING_RATES,
    n_last_blocks: Sequence[int] = N_LAST_BLOCKS,
    augment: bool = True,
    seed: int = 0,
    test_datasets: Sequence[str] = (),
    test_metric_types: Sequence[str] = (),
    test_class_mappings: Sequence[str] = (),
    val_metric_type: str = "mean_accuracy",
    resume: bool = True,
    eval_period: int | None = None,
) -> tuple[LinearResult | None, LinearProbes, dict[str, float]]:
    """``dinokit eval linear``: train the probe grid, pick the best on val, save heads and results.

    ``test_datasets`` (official ``--test-datasets``): each scored with the best classifier, by its metric of
    ``test_metric_types`` (one for all, or one per dataset; default ``mean_accuracy``), through its class mapping of
    ``test_class_mappings`` (official ``--test-class-mapping-fpaths``: .npy files, or None, likewise).

    ``val_metric_type`` (official ``--val-metric-type``) ranks the classifiers on val: ``mean_accuracy`` (top-1) or
    ``mean_per_class_accuracy``. ``resume=False`` (``--no-resume``) starts afresh over an unfinished evaluation.

    ``eval_period`` (official ``--eval-period-iterations``; default ``epoch_length``, 0: only at the end): every so
    many iterations the probes are scored on val, a line printed, and the record kept in the result's ``periodic``.

    Returns (the result written, None on ranks other than 0; the probes; every probe's val metric).
    """
    if val_metric_type not in VAL_METRICS:
        raise DinokitError(f"--val-metric-type {val_metric_type!r} is not one of {', '.join(VAL_METRICS)}")
    depth = len(ctx.model.blocks)
    check_linear_options(epochs=epochs, epoch_length=epoch_length, batch_size=batch_size, learning_rates=learning_rates,
                         n_last_blocks=n_last_blocks, depth=depth, eval_period=eval_period, seed=seed)
    usable = [n for n in n_last_blocks if n <= depth]
    if len(usable) < len(n_last_blocks):
        left_out = " ".join(str(n) for n in n_last_blocks if n > depth)
        warnings.warn(f"--n-last-blocks {left_out} left out: the backbone has {depth} blocks", stacklevel=2)
    # a wrong path, metric or mapping: one line before training
    test_sets = open_test_sets(ctx, test_datasets, test_metric_types, test_class_mappings)
    val = ctx.features("val", "linear")
    settings = probe_settings(learning_rates=learning_rates, n_last_blocks=usable,
                              total_batch=batch_size * du.get_world_size())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # identical initial classifiers on every rank
        probes = LinearProbes(settings, embed_dim=val.features["patch_mean"].shape[1], num_classes=ctx.num_classes)
    probes.to(ctx.device)
    iterations = epochs * epoch_length
    eval_every = epoch_length if eval_period is None else eval_period
    running = RunningCheckpoint(ctx.output_dir / RUNNING_CHECKPOINT, {
        # the backbone as the feature cache keys it (weights, architecture, image size, dtype), not only its label
        **ctx.provenance, "backbone": ctx.cache.model_description, "iterations": iterations,
        "epoch_length": epoch_length, "batch_size": batch_size,
        "world_size": du.get_world_size(), "classifiers": sorted(probes.settings), "augment": augment, "seed": seed,
        # the periodic records kept so far were made with these (a resume with others would mix them)
        "eval_period": eval_every, "val_metric_type": val_metric_type,
        "crop_draws": "per-image seeds"})  # since 2026-12-07 (before: the workers' running random states)
    state = running.load() if resume else None
    position = StreamPosition(*(state["streams"][du.get_rank()] if state else (0, ())))
    if augment:
        train_set = copy.copy(ctx.train)  # same files, training transform
        train_set.transform = make_classification_train_transform(crop_size=ctx.image_size)
        batches = augmented_batches(ctx.model, train_set, batch_size=batch_size, num_workers=ctx.num_workers,
                                    seed=seed, device=ctx.device, dtype=ctx.dtype, position=position)
        train_targets = ctx.train.targets
    else:
        train = ctx.features("train", "linear")
        batches = cached_batches(train.features["cls_tokens"], train.features["patch_mean"], train.targets,
                                 batch_size=batch_size, seed=seed, device=ctx.device, position=position)
        train_targets = train.targets.tolist()
    if du.is_main_process():
        print(plan_line(settings, epochs=epochs, epoch_length=epoch_length, batch_size=batch_size, augment=augment),
              flush=True)
        if state:
            print(f"resuming at iteration {state['iteration']} of {iterations} from {running.path}", flush=True)
        if state and augment and "crop_draws" not in state["identity"]:
            print(f"note: {running.path} comes from an older dinokit, which drew the crops otherwise: the probes go "
                  "on, but they will not be those of an unbroken run", flush=True)
    periodic = list(state.get("periodic", [])) if state else []  # the evaluations before the resumed iteration

    def evaluate(done: int) -> None:
        record = periodic_record(probes, val.features, val.targets, done, val_metric_type)
        periodic.append(record)
        if du.is_main_process():
            tqdm.write(f"iteration {done} of {iterations}: {periodic_line(record)}")

    try:
        train_probes(probes, batches, iterations=iterations, progress=ctx.progress, state=state,
                     save=lambda done, st: running.save({**st, "periodic": periodic}, position), save_every=epoch_length,
                     evaluate=evaluate, eval_every=eval_every)
    finally:
        batches.close()  # stops the data-loader workers
    # the classes the probes could learn: those with a training image read (the augmented stream met the others)
    unreadable = set().union(*du.all_gather_object(position.unreadable))
    if augment:  # the stream read the training images: those it met unreadable are out of the count
        ctx.images_read["train"] = len(train_targets) - len(unreadable)
    readable = torch.as_tensor([t for i, t in enumerate(train_targets) if i not in unreadable], dtype=torch.long)
    trust = report_label_warnings(readable, val.targets, ctx.num_classes, top5=False,  # the probes report top-1
                                  classes=ctx.class_names)
    accuracies, scores = val_scores(probes, val.features, val.targets, val_metric_type)
    tests = score_test_sets(ctx, probes, best_classifier(scores, probes.settings), test_sets)
    result = None
    if du.is_main_process():
        result = save_results(probes, accuracies, ctx.output_dir, iterations=iterations, augment=augment,
                              provenance=ctx.result_provenance(trust), tests=tests, scores=scores,
                              val_metric_type=val_metric_type, periodic=periodic)
        running.path.unlink(missing_ok=True)  # the results are the finished record
    return result, probes, scores
