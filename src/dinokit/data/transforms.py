"""Evaluation and linear-probe transforms (torchvision transforms v2), with ImageNet normalisation."""

from __future__ import annotations

import torch
from PIL import Image
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


class ResizeCentreCrop(torch.nn.Module):
    """``Resize(resize_size)`` then ``CenterCrop(crop_size)``, as torchvision computes them. A PIL image whose long
    side exceeds ``max_aspect`` times its short side is resampled only inside the source box of the crop (PIL's
    ``resize(box=...)``: the same sampling grid and filter support): a 60000x10 panorama was resized whole (1.5
    million x 256 pixels, over 1 GB) for a crop that reads its middle. Other images take the two transforms."""

    def __init__(self, resize_size: int, crop_size: int, interpolation=v2.InterpolationMode.BICUBIC,
                 max_aspect: float = 8) -> None:
        super().__init__()
        self.resize = v2.Resize(resize_size, interpolation=interpolation, antialias=True)
        self.crop = v2.CenterCrop(crop_size)
        self.resize_size, self.crop_size, self.max_aspect = resize_size, crop_size, max_aspect
        self.draft_size = resize_size  # the short side it reads: a JPEG may be decoded at a reduced scale down to it
        self.pil_filter = {v2.InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
                           v2.InterpolationMode.BILINEAR: Image.Resampling.BILINEAR}.get(interpolation)

    def forward(self, image):
        if (not isinstance(image, Image.Image) or self.pil_filter is None or self.crop_size > self.resize_size
                or max(image.size) <= self.max_aspect * min(image.size)):
            return self.crop(self.resize(image))
        w, h = image.size
        short, long = min(w, h), max(w, h)
        size = (self.resize_size, int(self.resize_size * long / short))  # torchvision's (short, long) sizes
        new_w, new_h = (size[1], size[0]) if w > h else size
        top, left = (int(round((n - self.crop_size) / 2.0)) for n in (new_h, new_w))  # CenterCrop's offsets
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + self.crop_size) * sx, (top + self.crop_size) * sy)
        return image.resize((self.crop_size, self.crop_size), self.pil_filter, box=box)


def make_normalize_transform(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> v2.Normalize:
    return v2.Normalize(mean=mean, std=std)


def _to_float_tensor() -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def make_classification_eval_transform(
    *, resize_size: int | None = None, crop_size: int = 224, interpolation=v2.InterpolationMode.BICUBIC
) -> v2.Compose:
    """Official evaluation transform: resize the short side to ``crop_size * 256/224``, centre-crop, normalise.

    For the default ``crop_size=224`` this is Resize(256) -> CenterCrop(224) (:class:`ResizeCentreCrop`).
    """
    if resize_size is None:
        resize_size = int(round(crop_size * 256 / 224))
    return v2.Compose(
        [
            ResizeCentreCrop(resize_size, crop_size, interpolation),
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
