"""Segmentation and depth metrics, as the mmseg / DINOv3 protocols define them.

Segmentation (:class:`SegMetrics`): intersection and union per class are **pooled over the whole
dataset** (not averaged per image); label 255 is ignored; IoU = I / U per class, mIoU = mean over
the classes that occur (in the labels or the predictions: NaN classes are skipped), aAcc = correct /
labelled pixels. ADE20K's "reduce zero label" (0 = "other" -> 255, c -> c-1) is applied by the dataset.

Depth (:func:`depth_metrics`, :class:`DepthMetrics`): computed **per image** on its valid pixels (ground
truth inside (min, max), and inside the Eigen crop for NYU), then averaged over images:
δ_k = mean(max(gt/pred, pred/gt) < 1.25^k), AbsRel = mean(|gt-pred|/gt), SqRel = mean((gt-pred)²/gt),
RMSE = sqrt(mean((gt-pred)²)), RMSE_log, log10 = mean(|log10 gt - log10 pred|), SILog = 100·sqrt(mean(e²) - mean(e)²)
with e = log gt - log pred.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = 255
DEPTH_KEYS = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")


class SegMetrics:
    """Pixel-pooled confusion counts over a dataset; :meth:`compute` gives mIoU, aAcc and per-class IoU."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.intersection = torch.zeros(num_classes, dtype=torch.float64)
        self.union = torch.zeros(num_classes, dtype=torch.float64)
        self.label_area = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one batch: ``pred`` and ``label`` are integer maps of the same shape."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        valid = label != self.ignore_index
        pred, label = pred[valid].long().cpu(), label[valid].long().cpu()
        k = self.num_classes
        inter = pred[pred == label]
        area_inter = torch.bincount(inter, minlength=k)[:k].double()
        area_pred = torch.bincount(pred.clamp(0, k - 1), minlength=k)[:k].double()
        area_label = torch.bincount(label, minlength=k)[:k].double()
        self.intersection += area_inter
        self.union += area_pred + area_label - area_inter
        self.label_area += area_label

    def compute(self) -> dict[str, float | list[float]]:
        """``mIoU``, ``mAcc`` and ``aAcc`` in percent (2 decimals), ``IoU`` and ``Acc`` per class, as mmseg: a class
        absent everywhere is NaN in its IoU and left out of mIoU; one absent from the labels is NaN in its Acc and
        left out of mAcc (per-class accuracy: the share of its pixels predicted as it)."""
        iou = self.intersection / self.union  # 0/0 -> NaN for classes seen nowhere
        class_acc = self.intersection / self.label_area  # 0/0 -> NaN for classes absent from the labels
        total = float(self.label_area.sum())
        acc = float(self.intersection.sum()) / total if total else float("nan")
        return {
            "mIoU": _percent(_nanmean(iou)),
            "mAcc": _percent(_nanmean(class_acc)),
            "aAcc": _percent(acc),
            "IoU": [_percent(float(v)) for v in iou],
            "Acc": [_percent(float(v)) for v in class_acc],
        }


def _nanmean(values: torch.Tensor) -> float:
    seen = ~torch.isnan(values)
    return float(values[seen].mean()) if seen.any() else float("nan")


def _percent(value: float) -> float:
    return float("nan") if math.isnan(value) else round(100 * value, 2)


def reduce_zero_label(label: torch.Tensor) -> torch.Tensor:
    """ADE20K: class 0 ("other") becomes 255 (ignored), every other class c becomes c - 1."""
    label = label.long()
    return torch.where((label == 0) | (label == IGNORE_INDEX), torch.full_like(label, IGNORE_INDEX), label - 1)


def eigen_crop_mask(height: int, width: int) -> torch.Tensor:
    """NYU's Eigen crop (rows 45:471, columns 41:601 of a 480x640 image), scaled to (height, width)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    y1, y2 = int(45 / 480 * height), int(471 / 480 * height)
    x1, x2 = int(41 / 640 * width), int(601 / 640 * width)
    mask[y1:y2, x1:x2] = True
    return mask


def garg_crop_mask(height: int, width: int) -> torch.Tensor:
    """KITTI's Garg crop (rows 40.8%-99.2%, columns 3.6%-96.4% of the image), the depth toolboxes' fractions."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    y1, y2 = int(0.40810811 * height), int(0.99189189 * height)
    x1, x2 = int(0.03594771 * width), int(0.96405229 * width)
    mask[y1:y2, x1:x2] = True
    return mask


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float]:
    """The metrics of one image over its valid pixels (``valid`` default: gt > 0); NaN when none is valid."""
    pred, gt = pred.double().flatten(), gt.double().flatten()
    mask = (gt > 0) if valid is None else (valid.flatten() & (gt > 0))
    pred, gt = pred[mask], gt[mask]
    if gt.numel() == 0:
        return {k: float("nan") for k in DEPTH_KEYS}
    pred = pred.clamp_min(1e-6)
    ratio = torch.maximum(gt / pred, pred / gt)
    err = torch.log(gt) - torch.log(pred)
    return {
        "delta1": float((ratio < 1.25).double().mean()),
        "delta2": float((ratio < 1.25**2).double().mean()),
        "delta3": float((ratio < 1.25**3).double().mean()),
        "abs_rel": float(((gt - pred).abs() / gt).mean()),
        "sq_rel": float(((gt - pred) ** 2 / gt).mean()),
        "rmse": float(((gt - pred) ** 2).mean().sqrt()),
        "rmse_log": float((err**2).mean().sqrt()),
        "log10": float((torch.log10(gt) - torch.log10(pred)).abs().mean()),
        "silog": float(100 * ((err**2).mean() - err.mean() ** 2).clamp_min(0).sqrt()),
    }


class DepthMetrics:
    """Per-image depth metrics averaged over the images (images without valid pixels are skipped)."""

    def __init__(self, *, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False,
                 garg_crop: bool = False) -> None:
        self.min_depth, self.max_depth, self.eigen_crop, self.garg_crop = min_depth, max_depth, eigen_crop, garg_crop
        self.rows: list[dict[str, float]] = []
        self.empty = 0  # images without a valid pixel (left out of the mean)

    def valid_mask(self, gt: torch.Tensor) -> torch.Tensor:
        """Pixels whose ground truth lies strictly inside (min, max), within the Eigen (NYU) or Garg (KITTI) crop
        if asked."""
        mask = (gt > self.min_depth) & (gt < self.max_depth)
        if self.eigen_crop:
            mask &= eigen_crop_mask(*gt.shape[-2:]).to(gt.device)
        if self.garg_crop:
            mask &= garg_crop_mask(*gt.shape[-2:]).to(gt.device)
        return mask

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add a batch of (B, [1,] H, W) predictions and ground truths."""
        pred, gt = pred.reshape(-1, *gt.shape[-2:]), gt.reshape(-1, *gt.shape[-2:])
        for p, g in zip(pred, gt):
            mask = self.valid_mask(g)
            if not mask.any():  # nothing to score in this image
                self.empty += 1
                continue
            # a row of NaN predictions is kept: its NaN tells a broken head from a set with nothing to score
            self.rows.append(depth_metrics(p.clamp(self.min_depth, self.max_depth), g, mask))

    def compute(self) -> dict[str, float]:
        if not self.rows:
            return {k: float("nan") for k in DEPTH_KEYS}
        return {k: sum(r[k] for r in self.rows) / len(self.rows) for k in DEPTH_KEYS}
