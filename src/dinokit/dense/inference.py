"""Evaluation of a dense model over a dataset, and pictures of its predictions.

:func:`evaluate` runs :meth:`DenseModel.predict` image by image (batch 1: evaluation images keep
their own size), at the label's resolution, and accumulates the protocol's metrics.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import distributed as du
from ..errors import DinokitError
from .datasets import DenseDataset
from .metrics import DepthMetrics, SegMetrics
from .model import DenseModel


@dataclass
class InferenceConfig:
    """How predictions are made at test time."""

    mode: str = "whole"  # "whole" or "slide"
    crop: int = 512  # slide window
    stride: int = 341  # slide stride
    flip: bool = False  # add the mirrored image
    scales: Sequence[float] = field(default_factory=lambda: (1.0,))  # image ratios (the "ms" heads: 1.0 1.32 1.73)


MS_SCALES = (1.0, 1.32, 1.73)  # the "ms" heads' test-time ratios (the first three of the config, as the notebook)


def official_inference(kind: str) -> dict:
    """How the official protocols evaluate a released head (a file without dinokit's record of its training):
    segmentation by sliding 512 px windows (stride 341) over images resized to a 512 px short side, the "ms" head
    with flip and the multi-scale ratios; depth on the whole image with flip."""
    if kind.startswith("seg"):
        ms = kind == "seg-ms"
        return {"mode": "slide", "crop": 512, "stride": 341, "flip": ms, "scales": list(MS_SCALES if ms else (1.0,)),
                "eval_size": 512}
    return {"mode": "whole", "flip": True, "scales": [1.0], "eval_size": 0}


def head_inference(meta: Mapping[str, Any], changes: InferenceConfig | Mapping[str, Any] | None = None
                   ) -> InferenceConfig:
    """The inference saved with a head (a released head's: its official protocol), changed by ``changes``: a
    mapping changes the settings it names (``mode``, ``crop``, ``stride``, ``flip``, ``scales``), an
    :class:`InferenceConfig` replaces it."""
    if isinstance(changes, InferenceConfig):
        return changes
    saved = meta.get("inference") or official_inference(meta["kind"])
    settings = {"mode": saved.get("mode", "whole"), "crop": saved.get("crop", 512), "stride": saved.get("stride", 341),
                "flip": saved.get("flip", False), "scales": tuple(saved.get("scales", (1.0,)))}
    unknown = sorted(set(changes or {}) - set(settings))
    if unknown:
        raise DinokitError(f"unknown inference setting {unknown[0]!r}; use {', '.join(settings)}")
    merged = {**settings, **dict(changes or {})}
    windows = [key for key in ("crop", "stride") if key in (changes or {})]
    if windows and merged["mode"] == "whole":  # they did nothing
        raise DinokitError(f"--{windows[0]} sets the sliding windows, and this inference is whole-image; add --mode "
                           f"slide, or drop --{windows[0]}")
    return InferenceConfig(**merged)


def saved_eval_size(meta: Mapping[str, Any]) -> int:
    """The short side a head's images are resized to for evaluation (0: kept)."""
    return int((meta.get("inference") or official_inference(meta["kind"])).get("eval_size") or 0)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on the device, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def predict_image(
    model: DenseModel, image: torch.Tensor, size: Sequence[int], cfg: InferenceConfig, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(H, W) class map or depth map for one normalised (3, h, w) image, predicted at ``size``."""
    device = next(model.parameters()).device
    with autocast(device, dtype):
        out = model.predict(
            image[None].to(device), size=size, mode=cfg.mode, crop=cfg.crop, stride=cfg.stride, flip=cfg.flip,
            scales=tuple(cfg.scales),
        ).float()
    if not torch.isfinite(out).all():  # a class map of NaN scores is a class map all the same: plausible scores
        raise PredictionsNotNumbers(not_numbers(""))
    return out[0].argmax(dim=0) if model.task == "seg" else out[0, 0]


class PredictionsNotNumbers(DinokitError):
    """A head's scores or depths that are NaN or infinite (its weights, or the backbone's, are)."""


def not_numbers(where: str) -> str:
    return (f"the predictions{where} are not numbers (NaN): the head or the backbone holds NaN or infinite weights; "
            "check the weights, or train the head again")


def evaluate(
    model: DenseModel,
    dataset: DenseDataset,
    cfg: InferenceConfig,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    shard: bool = False,
) -> dict:
    """Metrics of ``model`` on ``dataset``: mIoU/aAcc/IoU (segmentation) or rmse/abs_rel/delta1/... (depth).

    Depth is scored on the ground truth inside the head's (min_depth, max_depth), with predictions clamped to it.

    ``shard``: under ``torchrun`` rank r predicts images r, r + world, ... and the ranks' counts are pooled, giving
    the single-process numbers (depth rows are averaged in dataset order). Not for a backbone sharded with FSDP2,
    whose ranks must run the same forwards: training evaluates every image on every rank.
    """
    head = model.decode_head  # depth: the range the head was trained for (a recipe's min/max_depth)
    meter = make_meter(model.task, dataset, num_classes=getattr(head, "num_classes", 0),
                       depth_range=(getattr(head, "min_depth", 0.0), getattr(head, "max_depth", 0.0)))
    rank, world = (du.get_rank(), du.get_world_size()) if shard else (0, 1)
    was_training = model.training
    model.eval()
    skipped, row_index = 0, []  # row_index: the dataset index of each depth row
    for i in tqdm(range(rank, len(dataset), world), desc="evaluate", disable=not progress or rank != 0, leave=False):
        item = dataset[i]
        if item is None:  # unreadable image (named in a warning)
            skipped += 1
            continue
        label = item["label"]
        try:
            pred = predict_image(model, item["image"], label.shape[-2:], cfg, dtype).cpu()
        except PredictionsNotNumbers:
            raise PredictionsNotNumbers(not_numbers(f" on {dataset.name!r}")) from None
        rows_before = len(getattr(meter, "rows", ()))
        meter.update(pred, label)
        row_index += [i] * (len(getattr(meter, "rows", ())) - rows_before)
    model.train(was_training)
    if world > 1:
        meter, skipped = _pool_ranks(meter, skipped, row_index)
    if skipped == len(dataset):
        raise DinokitError(f"no image of {dataset.name!r} could be read; check the files")
    result = meter.compute()
    if not (meter.label_area.sum() > 0 if model.task == "seg" else meter.rows):  # NaN in every metric, as results
        raise _nothing_to_score(meter, model.task, len(dataset) - skipped, dataset.name)
    if math.isnan(result["mIoU"] if model.task == "seg" else result["rmse"]):  # pixels scored, predictions not numbers
        raise PredictionsNotNumbers(not_numbers(f" on {dataset.name!r}"))
    if model.task == "depth" and meter.empty:  # left out of the mean (they were not counted anywhere)
        result["images_without_valid_depth"] = meter.empty
    if model.task == "seg" and dataset.classes:
        result["classes"] = list(dataset.classes)[: model.decode_head.num_classes]
    result["images"] = len(dataset) - skipped
    result["skipped_images"] = skipped
    return result


def make_meter(task: str, dataset: DenseDataset, *, num_classes: int, depth_range: tuple[float, float]):
    """The metrics of ``task`` on ``dataset``: segmentation counts, or depth rows inside ``depth_range`` (and the
    dataset's evaluation crop)."""
    if task == "seg":
        return SegMetrics(num_classes)
    return DepthMetrics(min_depth=depth_range[0], max_depth=depth_range[1], eigen_crop=dataset.info.eigen_crop,
                        garg_crop=dataset.info.garg_crop)


def _nothing_to_score(meter, task: str, n_readable: int, name: str) -> DinokitError:
    what = ("has a label (every mask pixel is 255, ignored)" if task == "seg" else
            f"has a depth within the head's range ({meter.min_depth:g}-{meter.max_depth:g} m)")
    fix = "check the labels" if task == "seg" else "check the labels, or min_depth/max_depth"
    return DinokitError(f"no pixel of the {n_readable} readable image(s) of {name!r} {what}: nothing to score; {fix}")


def check_scorable(dataset: DenseDataset, meter) -> None:
    """One line when no pixel of ``dataset`` can be scored by ``meter`` (every mask pixel ignored, no depth in the
    range): a training run said so only at its first evaluation, thousands of steps in, with nothing to resume from.
    Reads labels until one pixel counts (the first image, for a usable set)."""
    readable = 0
    for i in range(len(dataset)):
        item = dataset[i]
        if item is None:
            continue
        readable += 1
        label = item["label"]
        if (label != meter.ignore_index).any() if isinstance(meter, SegMetrics) else meter.valid_mask(label).any():
            return
    if readable:  # none readable: the evaluation says so, as before
        raise _nothing_to_score(meter, "seg" if isinstance(meter, SegMetrics) else "depth", readable, dataset.name)


def _pool_ranks(meter, skipped: int, row_index: list[int]):
    """Every rank's meter merged into one (the same on every rank), and the total of skipped images."""
    parts = du.all_gather_object((meter, skipped, row_index))
    merged = parts[0][0]
    if isinstance(merged, SegMetrics):
        for other, _, _ in parts[1:]:
            merged.intersection += other.intersection
            merged.union += other.union
            merged.label_area += other.label_area
    else:
        indexed = [(i, row) for rank_meter, _, index in parts for i, row in zip(index, rank_meter.rows)]
        merged.rows = [row for _, row in sorted(indexed, key=lambda pair: pair[0])]
        merged.empty = sum(rank_meter.empty for rank_meter, _, _ in parts)
    return merged, sum(part[1] for part in parts)


def format_results(result: dict, task: str) -> str:
    """A short console table of the main numbers."""
    if task == "seg":
        rows = [("mIoU", result["mIoU"]), ("mAcc", result["mAcc"]), ("aAcc", result["aAcc"])]
        names = result.get("classes") or [str(i) for i in range(len(result["IoU"]))]
        rows += [(f"IoU {n}", v) for n, v in zip(names, result["IoU"])][:12]
        return "\n".join(f"  {k:<20} {v:8.2f}" for k, v in rows)
    keys = ("rmse", "abs_rel", "log10", "delta1", "delta2", "delta3")
    return "\n".join(f"  {k:<20} {result[k]:8.4f}" for k in keys)


# ---------------------------------------------------------------------------------------------- pictures
_DEPTH_ANCHORS = np.array(  # near = warm, far = dark blue (a perceptually ordered ramp)
    [[252, 253, 191], [252, 137, 97], [183, 55, 121], [81, 18, 124], [0, 0, 4]], dtype=np.float64
)


def colourise_depth(depth: np.ndarray, max_depth: float | None = None) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8, near bright, far dark, over [0, max_depth or the map's max]."""
    top = max_depth or float(np.nanmax(depth)) or 1.0
    t = np.clip(depth / top, 0, 1) * (len(_DEPTH_ANCHORS) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_DEPTH_ANCHORS) - 2)
    frac = (t - lo)[..., None]
    return (_DEPTH_ANCHORS[lo] * (1 - frac) + _DEPTH_ANCHORS[lo + 1] * frac).astype(np.uint8)


def palette(name: str, num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: VOC's bit-interleaved palette, or a fixed random one for others."""
    if name == "voc":
        colours = np.zeros((max(num_classes, 1), 3), dtype=np.uint8)
        for i in range(len(colours)):
            c, r, g, b = i, 0, 0, 0
            for j in range(8):
                r |= ((c >> 0) & 1) << (7 - j)
                g |= ((c >> 1) & 1) << (7 - j)
                b |= ((c >> 2) & 1) << (7 - j)
                c >>= 3
            colours[i] = (r, g, b)
        return colours
    rng = np.random.default_rng(3 if name == "ade20k" else 0)  # deterministic distinct colours
    colours = rng.integers(0, 256, size=(max(num_classes, 1), 3)).astype(np.uint8)
    if name != "ade20k":
        # few classes: well-separated hues from a fixed table
        table = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                          [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
                         dtype=np.uint8)
        colours[: min(len(table), len(colours))] = table[: len(colours)]
    return colours


def colourise_seg(classes: np.ndarray, palette_name: str, num_classes: int) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 with the dataset's palette (255 = black)."""
    colours = palette(palette_name, num_classes)
    out = colours[np.clip(classes, 0, len(colours) - 1)]
    out[classes == 255] = 0
    return out


def side_by_side(image: Image.Image, picture: np.ndarray) -> Image.Image:
    """The input and its prediction picture next to each other, at the input's size."""
    pred = Image.fromarray(picture).resize(image.size, Image.NEAREST)
    canvas = Image.new("RGB", (image.width * 2, image.height))
    canvas.paste(image.convert("RGB"), (0, 0))
    canvas.paste(pred, (image.width, 0))
    return canvas
