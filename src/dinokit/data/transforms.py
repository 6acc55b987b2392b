"""Evaluation and linear-probe transforms (torchvision transforms v2), with ImageNet normalisation."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


MAX_ASPECT = 4  # pictures of a user's images (viz, dense predict): the long side at most 4x the short side's size


def short_side_size(h: int, w: int, short: int, *, max_aspect: float | None = None) -> tuple[int, int]:
    """(H, W) with the short side ``short`` and the aspect ratio kept (+0.5 rounding); with ``max_aspect``, the long
    side at most ``max_aspect * short`` (a panorama then gets a shorter short side, at least 1 px)."""
    scale = short / min(h, w)
    if max_aspect is not None and max(h, w) * scale > max_aspect * short:
        scale = max_aspect * short / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def make_normalize_transform(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> v2.Normalize:
    return v2.Normalize(mean=mean, std=std)


def _to_float_tensor() -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def make_classification_eval_transform(
    *, resize_size: int | None = None, crop_size: int = 224, interpolation=v2.InterpolationMode.BICUBIC
) -> v2.Compose:
    """Official evaluation transform: resize the short side to ``crop_size * 256/224``, centre-crop, normalise.

    For the default ``crop_size=224`` this is Resize(256) -> CenterCrop(224).
    """
    if resize_size is None:
        resize_size = int(round(crop_size * 256 / 224))
    return v2.Compose(
        [
            v2.Resize(resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(crop_size),
            _to_float_tensor(),
            make_normalize_transform(),
        ]
    )


def make_classification_train_transform(
    *, crop_size: int = 224, interpolation=v2.InterpolationMode.BICUBIC, hflip_prob: float = 0.5
) -> v2.Compose:
    """Official linear-probe training transform: RandomResizedCrop (scale 0.08-1) + flip + normalise."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(crop_size, interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(hflip_prob),
            _to_float_tensor(),
            make_normalize_transform(),
        ]
    )
