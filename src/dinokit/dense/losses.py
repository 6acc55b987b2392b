"""Training losses of the dense heads.

* :func:`seg_cross_entropy`: cross-entropy with ignore index 255, averaged over **all** pixels
  (ignored ones count in the denominator: mmseg's default ``avg_non_ignore=False``).
* :class:`SigLoss`: scale-invariant log loss, g = log(pred + 1e-3) - log(gt + 1e-3) on valid pixels,
  loss = sqrt(var(g) + 0.15 · mean(g)²) (``torch.var``, unbiased); during the first ``warm_up_iters``
  iterations only sqrt(0.15 · mean(g)²).
* :func:`gradient_loss`: MegaDepth's multi-scale gradient matching on log(pred + 1e-3) - log(gt + 1e-3), 4 scales
  (DINOv2's ``GradientLoss``, the one its DPT and linear depth configs weight by 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import IGNORE_INDEX


def seg_cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits upsampled to the (B, H', W') labels, CE summed over labelled pixels / all pixels."""
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits.float(), label.long(), ignore_index=IGNORE_INDEX, reduction="none")
    return per_pixel.sum() / label.numel()


class SigLoss:
    """Scale-invariant log loss with the official warm-up: its first ``warm_up_iters`` training iterations (the
    official loss counts its calls, one per iteration) use only sqrt(lam · mean(g)²). The warm-up follows the
    iteration given, not a count of calls, so a resumed run does not warm up again."""

    def __init__(self, *, warm_up_iters: int = 100, eps: float = 1e-3, lam: float = 0.15) -> None:
        self.warm_up_iters, self.eps, self.lam = warm_up_iters, eps, lam

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, *, iteration: int) -> torch.Tensor:
        """The loss at training iteration ``iteration`` (0 = the first)."""
        g = torch.log(pred[valid] + self.eps) - torch.log(gt[valid] + self.eps)
        if g.numel() < 2:
            return pred.sum() * 0.0  # nothing to compare: no gradient, no NaN
        if iteration < self.warm_up_iters:
            radicand = self.lam * g.mean() ** 2
        else:
            radicand = torch.var(g) + self.lam * g.mean() ** 2
        return torch.sqrt(radicand.abs() + 1e-12)


def gradient_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, *, scales: int = 4,
                  eps: float = 1e-3) -> torch.Tensor:
    """Σ over scales (stride 1, 2, 4, 6) of |Δd| across 2-pixel steps where both ends are valid, per valid pixel, with
    d = log(pred + eps) - log(gt + eps) on valid pixels (0 elsewhere): it matches relative depth changes, so a
    constant factor between prediction and ground truth costs (nearly) nothing."""
    total = pred.new_zeros(())
    for s in range(scales):
        step = 1 if s == 0 else 2 * s
        p, g, m = pred[..., ::step, ::step], gt[..., ::step, ::step], valid[..., ::step, ::step].to(pred.dtype)
        # invalid pixels are zeroed by the mask, which cannot undo a NaN: clamp keeps every log finite
        d = (torch.log(p.clamp_min(0) + eps) - torch.log(g.clamp_min(0) + eps)) * m
        n = m.sum().clamp_min(1.0)
        dy = (d[..., 2:, :] - d[..., :-2, :]).abs() * m[..., 2:, :] * m[..., :-2, :]
        dx = (d[..., :, 2:] - d[..., :, :-2]).abs() * m[..., :, 2:] * m[..., :, :-2]
        total = total + (dy.sum() + dx.sum()) / n
    return total
