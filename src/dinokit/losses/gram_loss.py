"""Gram anchoring (DINOv3): keep the student's patch-to-patch similarities close to an earlier teacher's.

For the (L2-normalised) patch features X_S of the student and X_G of the Gram teacher, the loss is the
mean squared difference between the Gram matrices X_S X_S^T and X_G X_G^T. The Gram matrix spans the
patches of one image (``img_level``: one P x P matrix per image) or every patch of the local batch
(a (B P) x (B P) matrix, image pairs included). Only similarities are anchored, not the features
themselves, so the features may keep moving while their local structure stays clean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def resize_patch_features(tokens: torch.Tensor, grid: int, *, mode: str = "bicubic",
                          antialias: bool = False) -> torch.Tensor:
    """(B, N, D) patch features of a square grid resampled to ``grid`` x ``grid``: (B, grid², D).

    DINOv3's high-resolution Gram teacher sees larger crops than the student; its feature map is resized to the
    student's grid (``gram.global_teacher_resize_method``, ``gram.global_teacher_resize_antialias``).
    """
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"resize_patch_features needs a square grid of patches, got {tokens.shape[1]}")
    if side == grid:
        return tokens
    maps = tokens.unflatten(1, (side, side)).permute(0, 3, 1, 2)  # (B, D, side, side)
    corners = {} if mode == "nearest" else {"align_corners": False}
    resized = F.interpolate(maps.float(), size=(grid, grid), mode=mode, antialias=antialias, **corners)
    return resized.flatten(2).transpose(1, 2).to(tokens.dtype)


class GramLoss(nn.Module):
    """``mean((F_s F_s^T - F_g F_g^T)^2)`` over all Gram entries, in float32.

    ``normalized``: L2-normalise features first. ``img_level``: one Gram matrix per image (inputs
    (B, P, D)); otherwise one over all rows (inputs (B, P, D) are flattened, or (N, D) given as is).
    ``remove_neg``: clamp negative similarities of both matrices to 0. ``remove_only_teacher_neg``:
    clamp the teacher's negatives to 0 and zero the student's entries where both are negative
    (the two options exclude each other).
    """

    def __init__(self, *, normalized: bool = True, img_level: bool = False, remove_neg: bool = False,
                 remove_only_teacher_neg: bool = False) -> None:
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg exclude each other")
        self.normalized, self.img_level = normalized, img_level
        self.remove_neg, self.remove_only_teacher_neg = remove_neg, remove_only_teacher_neg

    def gram(self, features: torch.Tensor) -> torch.Tensor:
        """The Gram matrix of ``features``: (B, P, P) at image level, else (N, N) over all rows; in float32 with
        autocast off (under bf16 autocast the product ran in bf16: close to the anchor, where the loss matters, its
        gradient was mostly rounding)."""
        with torch.autocast(features.device.type, enabled=False):
            x = features.float()
            if self.normalized:
                x = nn.functional.normalize(x, dim=-1)
            if not self.img_level and x.dim() == 3:
                x = x.flatten(0, 1)
            return x @ x.transpose(-1, -2)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = self.gram(student), self.gram(teacher.detach())
        if self.remove_neg:
            s, t = s.clamp(min=0), t.clamp(min=0)
        elif self.remove_only_teacher_neg:
            both_negative = (s < 0) & (t < 0)
            t = t.clamp(min=0)
            s = torch.where(both_negative, torch.zeros_like(s), s)
        return nn.functional.mse_loss(s, t)
