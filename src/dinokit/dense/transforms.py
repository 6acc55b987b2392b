"""Transforms of a dense item (image + per-pixel label) that keep both aligned: the training augmentation
(a dataset's fixed box, random scale, crop, flip, photometric distortion; the NYU recipe's rotation and colour
for depth), the evaluation resize and a fixed resize, each ending in ImageNet normalisation."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, short_side_size
from .metrics import IGNORE_INDEX


def image_to_tensor(pil: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of a (3, H, W) image in [0, 1] (= the official x255 and mean 123.675 ...)."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (image - mean) / std


def cut_fixed_box(image: torch.Tensor, label: torch.Tensor, box: tuple[int, int, int, int] | None) -> tuple:
    """Cut ``box`` = (x1, y1, x2, y2), given in a 640x480 frame and scaled to the image size, from both
    (NYU's training crop (43, 45, 608, 472): 565x427 of a 640x480 image). None: no cut."""
    if box is None:
        return image, label
    h, w = image.shape[-2:]
    x1, y1, x2, y2 = int(box[0] / 640 * w), int(box[1] / 480 * h), int(box[2] / 640 * w), int(box[3] / 480 * h)
    return image[:, y1:y2, x1:x2], label[y1:y2, x1:x2]


def resize_pair(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]) -> tuple:
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(label.dtype)
    return image, label


class DenseTrainTransform:
    """The dataset's ``fixed_crop`` box (NYU), random scale (short side ``base_size`` x U(scale_range)), random crop
    (with ``cat_max_ratio`` for segmentation), horizontal flip, photometric distortion (segmentation) or colour
    jitter (depth), normalisation, padding to the crop size (image 0, label 255 or 0). Depth adds the NYU recipe's
    ±2.5° rotation (p 0.5) after the fixed box. Image and label always receive the same geometry."""

    def __init__(
        self,
        *,
        task: str,
        crop_size: tuple[int, int],
        base_size: int | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: float = 0.5,
        cat_max_ratio: float = 0.75,
        photometric: bool = True,
        fixed_crop: tuple[int, int, int, int] | None = None,
    ) -> None:
        self.task, self.crop_size, self.base_size = task, tuple(crop_size), base_size
        self.scale_range, self.flip, self.cat_max_ratio, self.photometric = scale_range, flip, cat_max_ratio, photometric
        self.fixed_crop = fixed_crop

    def _crop_box(self, label: torch.Tensor, h: int, w: int) -> tuple[int, int]:
        ch, cw = self.crop_size
        for _ in range(10):
            top, left = random.randint(0, max(h - ch, 0)), random.randint(0, max(w - cw, 0))
            if self.task != "seg" or self.cat_max_ratio >= 1:
                break
            crop = label[top:top + ch, left:left + cw]
            counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten())
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = cut_fixed_box(image, label, self.fixed_crop)
        if self.task == "depth" and self.photometric and random.random() < 0.5:
            image, label = _rotate_pair(image, label, random.uniform(-2.5, 2.5))
        h, w = image.shape[-2:]
        if self.base_size:
            short = self.base_size * random.uniform(*self.scale_range)
            image, label = resize_pair(image, label, short_side_size(h, w, max(int(short), 1)))
            h, w = image.shape[-2:]
        top, left = self._crop_box(label, h, w)
        ch, cw = self.crop_size
        image, label = image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]
        if random.random() < self.flip:
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric:
            if self.task == "seg":
                image = photometric_distortion(image, draw_photometric())
            elif random.random() < 0.5:  # the depth recipe's colour jitter, with probability 0.5
                image = depth_colour(image, gamma=random.uniform(0.9, 1.1), brightness=random.uniform(0.75, 1.25),
                                     colour=torch.empty(3).uniform_(0.9, 1.1))
        image = normalise(image)
        pad_h, pad_w = ch - image.shape[-2], cw - image.shape[-1]
        if pad_h > 0 or pad_w > 0:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX if self.task == "seg" else 0)
        return image, label


def _rotate_pair(image: torch.Tensor, label: torch.Tensor, degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate both about the centre (image bilinear, depth nearest; uncovered depth becomes 0 = invalid)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    image = TF.rotate(image, degrees, interpolation=InterpolationMode.BILINEAR)
    label = TF.rotate(label[None], degrees, interpolation=InterpolationMode.NEAREST)[0]
    return image, label


def depth_colour(image: torch.Tensor, *, gamma: float, brightness: float, colour: torch.Tensor) -> torch.Tensor:
    """The NYU recipe's colour jitter of a (3, H, W) image in [0, 1], computed on the 0-255 scale as the recipe does:
    ``clip((255·x)^gamma · brightness · colour_c, 0, 255) / 255`` (the recipe draws gamma U(0.9, 1.1), brightness
    U(0.75, 1.25), colour U(0.9, 1.1) per channel). On that scale gamma brightens or darkens strongly: 0.5 with
    gamma 1.1 becomes 127.5^1.1 / 255 = 0.812."""
    out = (image * 255).clamp_min(0) ** gamma * brightness * colour.view(3, 1, 1).to(image)
    return out.clamp(0, 255) / 255


@dataclass(frozen=True)
class Photometric:
    """One draw of the segmentation recipe's photometric distortion; None = that operation is skipped."""

    brightness: float | None  # added, on the 0-255 scale
    contrast: float | None  # factor
    saturation: float | None  # factor (torchvision adjust_saturation)
    hue: float | None  # fraction of the hue circle (torchvision adjust_hue)
    contrast_last: bool  # contrast after saturation and hue (else before them)


def draw_photometric() -> Photometric:
    """Each operation with probability 0.5: brightness U(-32, 32), contrast and saturation U(0.5, 1.5), hue U(-0.5, 0.5)
    (DINOv3's range: up to half the hue circle, far wider than mmseg's ±18/180); contrast first or last at random."""
    def maybe(low: float, high: float) -> float | None:
        return random.uniform(low, high) if random.random() < 0.5 else None

    brightness = maybe(-32, 32)
    contrast_last = random.random() < 0.5
    return Photometric(brightness=brightness, contrast=maybe(0.5, 1.5), saturation=maybe(0.5, 1.5), hue=maybe(-0.5, 0.5),
                       contrast_last=contrast_last)


def photometric_distortion(image: torch.Tensor, p: Photometric) -> torch.Tensor:
    """mmseg's ``PhotoMetricDistortion`` on a (3, H, W) image in [0, 1], each step clipped to [0, 1]: brightness,
    contrast (unless last), saturation, hue, contrast (if last)."""
    from torchvision.transforms.v2 import functional as TF

    if p.brightness is not None:
        image = (image + p.brightness / 255).clamp(0, 1)
    if p.contrast is not None and not p.contrast_last:
        image = (image * p.contrast).clamp(0, 1)
    if p.saturation is not None:
        image = TF.adjust_saturation(image, p.saturation)
    if p.hue is not None:
        image = TF.adjust_hue(image, p.hue)
    if p.contrast is not None and p.contrast_last:
        image = (image * p.contrast).clamp(0, 1)
    return image.clamp(0, 1)


class DenseEvalTransform:
    """Resize the image so its short side is ``size`` (None: keep it); the label keeps its full resolution."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size:
            image, _ = resize_pair(image, None, short_side_size(*image.shape[-2:], self.size))
        return normalise(image), label


class DenseResizeTransform:
    """Cut the dataset's ``fixed_crop`` box (NYU), resize image (bilinear) and label (nearest) to one fixed size,
    then normalise: deterministic, so the backbone features of a training set can be computed once (training
    without augmentation)."""

    def __init__(self, size: tuple[int, int], fixed_crop: tuple[int, int, int, int] | None = None) -> None:
        self.size, self.fixed_crop = tuple(size), fixed_crop

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = cut_fixed_box(image, label, self.fixed_crop)
        if tuple(image.shape[-2:]) != self.size:
            image, label = resize_pair(image, label, self.size)
        return normalise(image), label
