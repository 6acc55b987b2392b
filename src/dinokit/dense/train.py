"""Training dense heads on a frozen backbone: the recipes and the :class:`DenseHeadTask` the engine runs.

Recipes (:data:`RECIPES`, every field overridable as ``key=value``):

* segmentation (DINOv3's linear ADE20K recipe): AdamW lr 1e-3, wd 1e-3, 40,000 iterations, batch 16,
  warm-up over 1,500 iterations from 1e-6·lr, cosine to 0 over all the iterations (:func:`lr_schedule`);
  random scale (short side 512 x 0.5-2), 512 crops (no class over 75%), flip, photometric distortion;
  cross-entropy (ignore 255, mean over all pixels); dropout 0.1; evaluation by sliding windows of 512, stride 341;
* depth (DINOv3's linear NYU recipe): AdamW lr 3e-4, wd 1e-4, betas (0.9, 0.99), 38,400 iterations, batch 16,
  warm-up 12,800 from lr/1000, cosine to lr/25,000; crops 416x544 (after NYU's fixed crop), rotation, flip,
  colour jitter; SigLoss (warm-up 100 iterations); range 0.001-10 m; whole-image evaluation, the final one with flip;
* depth with the DPT head (DINOv2's DPT config): as depth, with lr 1e-4, wd 0.01, betas (0.9, 0.999), cosine
  to 1e-8·lr, + 0.5 x gradient loss (on log depth);
* depth with the ``linear-bn`` head (DINOv3's linear depth head): as depth, with the features after the final norm.

Opt-in, as DINOv3's code runs them: ``cycle_beta1`` (Adam beta1 0 during the warm-up, then 0.85 -> 0.95:
:func:`beta1_schedule`) and ``schedule_lag`` (the schedules one iteration late: :func:`lagged`). The linear depth
heads take ``n_bins``, ``bins_strategy`` and ``norm_strategy`` (:func:`dinokit.dense.heads.bins_to_depth`).

The backbone runs without gradients in eval mode (bf16 autocast on CUDA). With ``augment=False``
images are only resized to ``crop_size``, so the backbone features of the training set are computed
once and kept in memory (``cache_features``): training then costs only the head.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..config.validation import check_bounds, check_seeds
from ..data.loaders import init_worker
from ..data.samplers import SeededDraws, seeded_batches
from ..devices import default_workers, usable_workers
from ..engine import Export, LossOutput, Task
from ..errors import DinokitError
from .datasets import DenseDataset, collate_dense
from .transforms import DenseResizeTransform, DenseTrainTransform
from .heads import BIN_NORMS, BIN_SPACINGS, FeatureSpec
from .inference import autocast
from .losses import SigLoss, gradient_loss, seg_cross_entropy
from .model import backbone_features


@dataclass
class DenseRecipe:
    """The settings of one head-training run (defaults: the published recipe of its task)."""

    iterations: int = 40000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6  # the warm-up starts at lr * warmup_ratio
    warmup_mode: str = "linear"  # what the warm-up ramp multiplies: "linear" (1 - s/T) or the "cosine" (lr_schedule)
    final_lr_ratio: float = 0.0  # the cosine ends at lr * final_lr_ratio
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 0.0
    crop_size: tuple[int, int] = (512, 512)
    base_size: int = 512  # short side before the random scale (0: no resize)
    scale_min: float = 0.5
    scale_max: float = 2.0
    augment: bool = True  # False: resize to crop_size only (and cache the features)
    cache_features: bool = True
    dropout: float = 0.1
    class_token: bool = False  # segmentation: concatenate the CLS token to each patch (DINOv3 use_cls_token)
    norm: bool = True  # features after the backbone's final LayerNorm (DINOv2's depth heads: False)
    grad_loss_weight: float = 0.0  # gradient loss weight (depth)
    sig_warm_up: int = 100  # SigLoss warm-up iterations
    min_depth: float = 0.001
    max_depth: float = 10.0
    n_bins: int = 256  # linear depth heads: bins (1: regression, relu(x) + min_depth)
    bins_strategy: str = "linear"  # bin centres: "linear" or "log" spaced over [min_depth, max_depth]
    norm_strategy: str = "linear"  # bin probabilities: "linear" (relu + 0.1), "softmax" or "sigmoid"
    cycle_beta1: bool = False  # DINOv3's use_beta1: Adam beta1 0 during the warm-up, then 0.85 -> 0.95 (beta1_schedule)
    schedule_lag: bool = False  # DINOv3's trainer: the schedules advance only after iteration 0 (one-step lag)
    eval_mode: str = "slide"
    eval_crop: int = 512
    eval_stride: int = 341
    eval_size: int = 512  # short side of evaluation images (0: keep)
    eval_period: int = 5000  # iterations between validation runs (0: only at the end)
    checkpoint_period: int = 2000
    log_freq: int = 20
    num_workers: int = dataclasses.field(default_factory=default_workers)  # 4, or fewer usable cores (as eval, embed)
    seed: int = 0


RECIPES: dict[str, DenseRecipe] = {
    "seg": DenseRecipe(),
    "depth": DenseRecipe(  # lr/1000 at the start (final_div_factor 1000), lr/25/1000 at the end (div_factor 25)
        iterations=38400, lr=3e-4, weight_decay=1e-4, warmup_iters=12800, warmup_ratio=1e-3, warmup_mode="cosine",
        final_lr_ratio=4e-5, betas=(0.9, 0.99), clip_grad=35.0, crop_size=(416, 544), base_size=0, scale_min=1.0,
        scale_max=1.0, dropout=0.0, norm=False, eval_mode="whole", eval_size=0, eval_period=1600,
    ),
}


def recipe_with_overrides(task: str, head: str, overrides: list[str], *, saved_run: bool = False) -> DenseRecipe:
    """The recipe of ``task`` (+ the DPT gradient loss) with ``key=value`` overrides, type-checked. A setting of the
    other task is refused for a new run only (``saved_run``: resuming one an earlier version started with it)."""
    recipe = dataclasses.replace(RECIPES[task])
    if task == "depth" and head == "dpt":  # DINOv2's DPT config (DINOv3 released no DPT training recipe)
        recipe.grad_loss_weight, recipe.lr, recipe.weight_decay = 0.5, 1e-4, 0.01
        recipe.betas, recipe.final_lr_ratio = (0.9, 0.999), 1e-8
    if task == "depth" and head == "linear-bn":  # DINOv3's linear head reads the features after the final norm
        recipe.norm = True
    fields = {f.name: f for f in dataclasses.fields(DenseRecipe)}
    given = set()
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise DinokitError(f"unknown setting {item!r}; known: {', '.join(fields)} (as key=value)")
        setattr(recipe, key, _parse(key, value, getattr(recipe, key)))
        given.add(key)
    unused = sorted(given & set(_BIN_SETTINGS)) if task == "seg" or head == "dpt" else []
    if unused:
        raise DinokitError(f"setting {unused[0]!r} is for the linear depth heads; --task {task} --head {head} "
                           "does not use bins")
    other_task = {"seg": _DEPTH_SETTINGS, "depth": _SEG_SETTINGS}[task]  # accepted, and they did nothing
    if (unused := sorted(given & set(other_task))) and not saved_run:
        raise DinokitError(f"setting {unused[0]!r} is for {'depth' if task == 'seg' else 'segmentation'} heads; "
                           f"--task {task} does not use it")
    if "iterations" in given and "warmup_iters" not in given:  # a shorter run keeps the recipe's warm-up fraction
        published = RECIPES[task]
        recipe.warmup_iters = round(published.warmup_iters * recipe.iterations / published.iterations)
    check_recipe(recipe)
    return recipe


# the settings' ranges, checked before any image is read (iterations 0 would save the random head as trained)
_AT_LEAST_1 = ("iterations", "batch_size", "eval_crop", "eval_stride", "checkpoint_period", "log_freq", "n_bins")
_BIN_SETTINGS = ("n_bins", "bins_strategy", "norm_strategy")
_DEPTH_SETTINGS = ("grad_loss_weight", "sig_warm_up", "min_depth", "max_depth")
_SEG_SETTINGS = ("class_token", "dropout")
_AT_LEAST_0 = ("weight_decay", "warmup_iters", "clip_grad", "base_size", "grad_loss_weight", "sig_warm_up",
               "eval_size", "eval_period", "num_workers", "seed")


def check_recipe(recipe: DenseRecipe) -> None:
    """One line naming the first setting out of its range (the recipe is read from ``key=value`` overrides)."""
    def bad(key: str, wanted: str) -> DinokitError:
        return DinokitError(f"dense setting '{key}' is {getattr(recipe, key)}; it must be {wanted}")

    check_bounds({key: getattr(recipe, key) for key in _AT_LEAST_1}, what="dense setting", at_least=1)
    check_bounds({key: getattr(recipe, key) for key in _AT_LEAST_0}, what="dense setting", at_least=0)
    check_seeds({"seed": recipe.seed}, what="dense setting")
    for key in ("warmup_ratio", "final_lr_ratio"):
        if not 0 <= getattr(recipe, key) <= 1:
            raise bad(key, "in [0, 1]")
    if not 0 <= recipe.dropout < 1:
        raise bad("dropout", "in [0, 1)")
    check_bounds({"lr": recipe.lr}, what="dense setting", above=0)
    if len(recipe.crop_size) != 2 or min(recipe.crop_size) < 1:
        raise bad("crop_size", "one or two positive sizes, e.g. 512 or 416x544")
    if len(recipe.betas) != 2 or not all(0 <= b < 1 for b in recipe.betas):
        raise bad("betas", "two values in [0, 1), e.g. 0.9,0.999")
    if not 0 < recipe.scale_min <= recipe.scale_max:
        raise DinokitError(f"scale_min={recipe.scale_min} and scale_max={recipe.scale_max} are out of range; give "
                           "0 < scale_min <= scale_max")
    if not 0 <= recipe.min_depth < recipe.max_depth:
        raise DinokitError(f"min_depth={recipe.min_depth} and max_depth={recipe.max_depth} are out of range; give "
                           "0 <= min_depth < max_depth")
    if recipe.bins_strategy not in BIN_SPACINGS:
        raise DinokitError(f"bins_strategy={recipe.bins_strategy!r} is not a bin spacing; use linear or log")
    if recipe.norm_strategy not in BIN_NORMS:
        raise DinokitError(f"norm_strategy={recipe.norm_strategy!r} is not a bin normalisation; use linear, softmax "
                           "or sigmoid")
    if recipe.bins_strategy == "log" and not recipe.min_depth > 0:
        raise DinokitError(f"bins_strategy=log needs min_depth above 0 (log of the first bin), got {recipe.min_depth}")
    if recipe.warmup_mode not in ("linear", "cosine"):
        raise DinokitError(f"warmup_mode={recipe.warmup_mode!r} is not a mode; use linear or cosine")
    if recipe.eval_mode not in ("whole", "slide"):
        raise DinokitError(f"eval_mode={recipe.eval_mode!r} is not a mode; use whole or slide")
    if recipe.eval_mode == "slide" and recipe.eval_stride > recipe.eval_crop:  # windows would leave gaps
        raise bad("eval_stride", f"at most eval_crop ({recipe.eval_crop}) so that the windows cover every pixel")


def _parse(key: str, value: str, current: Any) -> Any:
    try:
        if isinstance(current, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if isinstance(current, tuple):
            parts = [p for p in value.replace("x", ",").strip("[]()").split(",") if p]
            items = [type(current[0])(p) for p in parts]
            return tuple(items * 2 if len(items) == 1 else items)
        return type(current)(value)
    except ValueError:
        raise DinokitError(f"{key}={value!r} is not a valid {type(current).__name__}") from None


def lr_schedule(recipe: DenseRecipe) -> torch.Tensor:
    """Per-iteration lr of DINOv3's ``WarmupOneCycleLR``: a cosine over *all* T iterations, scaled by the warm-up.

    With peak ``lr``, r = ``warmup_ratio``, W = ``warmup_iters``, T = ``iterations`` and the floor
    ``lr_min = lr · final_lr_ratio``, the lr of iteration s is

    * s < W, ``warmup_mode="linear"`` (segmentation): ``lr · (1 - (1 - s/W)(1 - r)) · (1 - s/T)``;
    * s < W, ``warmup_mode="cosine"`` (depth): ``lr · r + lr · (1 + cos(π s/T))/2 · s/W``;
    * s >= W: ``lr_min + (lr - lr_min) · (1 + cos(π (s + 1)/T))/2``, so the last iteration runs at ``lr_min``.

    The cosine is not restarted after the warm-up: at s = W it is already (1 + cos(π W/T))/2 of the way
    (0.75 for the depth recipe's W = T/3). With ``schedule_lag`` iteration s >= 1 runs at the value of s - 1
    (:func:`lagged`).
    """
    n, warm = recipe.iterations, min(recipe.warmup_iters, recipe.iterations)
    lr, r, low = recipe.lr, recipe.warmup_ratio, recipe.lr * recipe.final_lr_ratio
    s = torch.arange(n, dtype=torch.float64)
    after = low + (lr - low) * (1 + torch.cos(math.pi * (s + 1) / n)) / 2
    if recipe.warmup_mode == "linear":
        during = lr * (1 - (1 - s / max(warm, 1)) * (1 - r)) * (1 - s / n)
    else:
        during = lr * r + lr * (1 + torch.cos(math.pi * s / n)) / 2 * s / max(warm, 1)
    return lagged(torch.where(s < warm, during, after), recipe)


def beta1_schedule(recipe: DenseRecipe, *, low: float = 0.85, high: float = 0.95) -> torch.Tensor:
    """Per-iteration Adam beta1 of DINOv3's ``WarmupOneCycleLR`` with ``use_beta1`` (the ``cycle_beta1`` setting).

    As written there, the scheduler sets beta1 to ``high`` when it is built, and its first step (at construction)
    already overwrites it: s < W gives 0 (the momentum variable is never set during the warm-up), then
    ``high + (low - high) · (1 + cos(π (s - W)/(T - W)))/2``, from ``low`` at s = W towards ``high`` at s = T.
    So ``high`` "at init" reaches no optimiser step. ``schedule_lag`` delays it as the lr.
    """
    n, warm = recipe.iterations, min(recipe.warmup_iters, recipe.iterations)
    s = torch.arange(n, dtype=torch.float64)
    after = high + (low - high) * (1 + torch.cos(math.pi * (s - warm) / max(n - warm, 1))) / 2
    return lagged(torch.where(s < warm, torch.zeros_like(s), after), recipe)


def lagged(values: torch.Tensor, recipe: DenseRecipe) -> torch.Tensor:
    """``values`` as DINOv3's dense trainers apply them with ``schedule_lag``: their scheduler steps after every
    iteration but the first (``if global_step > 0``), so iterations 0 and 1 both run at value 0, and s at s - 1."""
    if not recipe.schedule_lag or len(values) < 2:
        return values
    return torch.cat((values[:1], values[:-1]))


# ---------------------------------------------------------------------------------------------- the task
class DenseHeadTask(Task):
    """A trainable dense head on a frozen backbone; batches hold images or cached backbone features."""

    divergence_fix = "lower lr or raise batch_size"  # the dense recipe's settings

    def __init__(self, backbone: nn.Module, head: nn.Module, spec: FeatureSpec, recipe: DenseRecipe, *, task: str,
                 backbone_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.backbone, self.head, self.spec = backbone, head, spec
        self.task_name, self.recipe, self.backbone_dtype = task, recipe, backbone_dtype
        self.sig_loss = SigLoss(warm_up_iters=recipe.sig_warm_up)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"head": self.head}

    def inference_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone}

    def frozen_modules(self) -> tuple[str, ...]:
        return ("backbone",)

    def exports(self) -> list[Export]:
        """Snapshots hold the head in the official layout: ``eval/training_<it>/head.pth``."""
        return [Export(self.head, filename="head.pth", layout=lambda sd: {f"decode_head.{k}": v for k, v in sd.items()})]

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        return int(batch["label"].shape[0])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list:
        """The frozen backbone's features for the head (no gradients, eval mode, optional autocast)."""
        with autocast(images.device, self.backbone_dtype):
            feats = backbone_features(self.backbone, self.spec, images)
        return _map_tensors(feats, lambda t: t.float())

    def compute_losses(self, batch: Mapping[str, Any], iteration: int, sched: Mapping[str, float]) -> LossOutput:
        label = batch["label"]
        if "features" in batch:
            feats = _map_tensors(batch["features"], lambda t: t.to(label.device, non_blocking=True))
        else:
            feats = self.features(batch["image"])
        out = F.interpolate(self.head(feats), size=label.shape[-2:], mode="bilinear", align_corners=False)
        if self.task_name == "seg":
            loss = seg_cross_entropy(out, label)
            return LossOutput(total=loss, terms={"ce_loss": loss.detach()})
        pred, valid = out[:, 0], (label > self.recipe.min_depth) & (label < self.recipe.max_depth)
        sig = self.sig_loss(pred, label, valid, iteration=iteration)
        terms = {"sig_loss": sig.detach()}
        total = sig
        if self.recipe.grad_loss_weight:
            grad = gradient_loss(pred, label, valid)
            terms["grad_loss"] = grad.detach()
            total = total + self.recipe.grad_loss_weight * grad
        return LossOutput(total=total, terms=terms)


def _map_tensors(feats: list, fn) -> list:
    """Apply ``fn`` to every tensor of a feature list (maps, or (map, CLS) pairs)."""
    return [tuple(fn(t) for t in f) if isinstance(f, (tuple, list)) else fn(f) for f in feats]


# ---------------------------------------------------------------------------------------------- data
def train_transform(recipe: DenseRecipe, task: str, fixed_crop: tuple[int, int, int, int] | None = None):
    """The joint training transform; with ``augment=False`` a plain resize to ``crop_size``. ``fixed_crop``: the
    dataset's box cut first (``DenseInfo.train_crop``: NYU's)."""
    if not recipe.augment:
        return DenseResizeTransform(recipe.crop_size, fixed_crop=fixed_crop)
    return DenseTrainTransform(
        task=task, crop_size=recipe.crop_size, base_size=recipe.base_size or None,
        scale_range=(recipe.scale_min, recipe.scale_max), fixed_crop=fixed_crop,
    )


def batch_indices(n: int, batch_size: int, seed: int, start_batch: int) -> Iterator[list[int]]:
    """Endless batches of a fresh permutation per epoch (seeded), starting at global batch ``start_batch``.

    Epochs drop their last partial batch, so a resumed run sees exactly the batches it would have seen.
    """
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(start_batch, per_epoch)
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        if n < batch_size:
            order = (order * math.ceil(batch_size / n))[:batch_size]
        for b in range(offset, per_epoch):
            yield order[b * batch_size:(b + 1) * batch_size]
        epoch, offset = epoch + 1, 0


def cache_training_features(task: DenseHeadTask, dataset: DenseDataset, device: torch.device, *,
                            batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """Backbone features and labels of every training item (fixed transform), on the CPU."""
    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_dense)
    feats: list[list] = []
    labels: list[torch.Tensor] = []
    for batch in tqdm(loader, desc="caching features", disable=not progress, leave=False):
        feats.append(_map_tensors(task.features(batch["image"].to(device)), lambda t: t.cpu()))
        labels.append(batch["label"])
    levels = []
    for i in range(len(feats[0])):
        parts = [f[i] for f in feats]
        levels.append(tuple(torch.cat(p) for p in zip(*parts)) if isinstance(parts[0], tuple) else torch.cat(parts))
    return {"features": levels, "label": torch.cat(labels)}


def make_batches(cached: dict[str, Any] | None, dataset: DenseDataset, recipe: DenseRecipe, start_iter: int, *,
                 rank: int = 0):
    """The engine's loader: batches from iteration ``start_iter`` on (cached features, or images via workers)."""
    n = len(cached["label"]) if cached is not None else len(dataset)
    indices = batch_indices(n, recipe.batch_size, recipe.seed + 7919 * rank, start_iter)
    if cached is not None:
        def from_cache():
            for idx in indices:
                index = torch.as_tensor(idx)
                yield {"features": _map_tensors(cached["features"], lambda t: t[index]), "label": cached["label"][index]}
        return from_cache()
    workers = usable_workers(recipe.num_workers, key="num_workers")
    keyed = seeded_batches(indices, recipe.seed + 7919 * rank, start_iter, "dense")
    # its own generator: the loader's worker seed drawn from the global one would shift the head's dropout masks
    # after a resume (the loader starts at iteration k there, at 0 in an unbroken run)
    return iter(DataLoader(SeededDraws(dataset), batch_sampler=keyed, num_workers=workers, collate_fn=collate_dense,
                           persistent_workers=workers > 0, generator=torch.Generator().manual_seed(recipe.seed),
                           worker_init_fn=init_worker if workers > 0 else None))
