"""The DINOv2 multi-crop augmentation, with torchvision transforms v2 on PIL images.

Two global crops and ``local_crops_number`` local crops of one image, each with random flips,
colour jitter, grayscale and Gaussian blur; the second global crop may also be solarised. The grayscale
probability (0.2 officially) is ``crops.grayscale_probability`` and ``crops.color_jitter_strength`` scales
the jitter (1 = official): small sets whose colours do not tell the classes apart need more (see the
``small`` preset).

Blur probabilities. The official code wraps the blur in ``RandomApply(p=1 - p)``, believing that
torchvision applies with probability ``1 - p``; it applies with ``p``. The released models were
therefore trained with *effective* probabilities 0.0 (global 1), 0.9 (global 2) and 0.5 (local),
not the written 1.0 / 0.1 / 0.5 (dinov2 PR #411, unmerged; dinov3 #286 kept the behaviour).
``blur_probabilities="official"`` (default) reproduces the released models; ``"intended"`` uses
the written values; ``"none"`` never blurs (the random draws stay the same).

All randomness comes from the global torch generator, so :class:`dinokit.data.loaders.SSLDataset`
makes a sample's crops a function of ``(seed, stream position)`` by seeding it per sample.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from ..errors import DinokitError
from .images import multi_crop_draft_size
from .transforms import make_normalize_transform

# Effective probabilities of blurring (global crop 1, global crop 2, local crops).
BLUR_PROBABILITIES: dict[str, tuple[float, float, float]] = {
    "official": (0.0, 0.9, 0.5),
    "intended": (1.0, 0.1, 0.5),
    "none": (0.0, 0.0, 0.0),  # dinokit: no blur (the official sigmas of 0.1-2 px are meant for 224 / 96 px crops)
}
SOLARIZE_PROBABILITY = 0.2  # global crop 2 only
FLIP_PROBABILITY = 0.5  # every crop; crops.horizontal_flips=false (DINOv3): 0
GRAYSCALE_PROBABILITY = 0.2  # official; crops.grayscale_probability changes it
# Official colour-jitter strengths (brightness, contrast, saturation, hue), scaled by crops.color_jitter_strength.
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)


def color_jitter_strengths(strength: float = 1.0) -> tuple[float, float, float, float]:
    """(brightness, contrast, saturation, hue) of the jitter at ``strength`` times the official values; the
    factors are drawn from ``[max(0, 1 - s), 1 + s]`` (torchvision's rule) and the hue shift is capped at half a turn."""
    brightness, contrast, saturation, hue = (strength * v for v in COLOR_JITTER)
    return brightness, contrast, saturation, min(hue, 0.5)


def check_crop_options(
    local_crops_number: int,
    blur_probabilities: str,
    grayscale_probability: float = GRAYSCALE_PROBABILITY,
    color_jitter_strength: float = 1.0,
) -> None:
    """Raise :class:`DinokitError` for options that no multi-crop augmentation accepts."""
    if color_jitter_strength < 0:
        raise DinokitError(f"crops.color_jitter_strength must be >= 0 (1 = official), got {color_jitter_strength}")
    if not 0.0 <= grayscale_probability <= 1.0:
        raise DinokitError(f"crops.grayscale_probability must be in [0, 1], got {grayscale_probability}")
    if blur_probabilities not in BLUR_PROBABILITIES:
        raise DinokitError(
            f"unknown blur_probabilities {blur_probabilities!r}; "
            "use 'official' (as the released models were trained), 'intended' or 'none'"
        )
    if local_crops_number < 0:
        raise DinokitError(f"local_crops_number must be >= 0, got {local_crops_number}")


def _blur(p: float) -> v2.RandomApply:
    return v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)


def resize_crop(crop: torch.Tensor, size: int) -> torch.Tensor:
    """A (…, C, H, W) float crop at ``size`` x ``size`` (bicubic, antialiased); a copy when it already is."""
    if crop.shape[-2:] == (size, size):
        return crop.clone()
    return v2.functional.resize(crop, [size, size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def _geometric(size: int, scale: tuple[float, float], flip: float = 0.5) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=flip),  # p = 0 still draws its number: the other draws do not move
        ]
    )


class DataAugmentationDINO:
    """Callable: PIL RGB image -> ``{"global_crops", "global_crops_teacher", "local_crops", "offsets"}``.

    ``global_crops`` is ``[g1, g2]`` of shape (3, global_crops_size, global_crops_size);
    ``global_crops_teacher`` is the same two tensors; ``local_crops`` holds ``local_crops_number``
    tensors of shape (3, local_crops_size, local_crops_size); ``offsets`` is ``()``.

    With ``gram_crops_size`` (DINOv3's high-resolution Gram teacher) the output also has ``gram_crops``: each
    global crop's region at that side. As DINOv3 does, the region is cut at the larger of the two sides, distorted
    there, and resized to both (the global crops are then resized after the distortions); with
    ``gram_no_distortions`` the Gram crop is the undistorted region, only normalised. The random draws are the
    same as without Gram crops.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float],
        local_crops_scale: tuple[float, float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        blur_probabilities: str = "official",
        grayscale_probability: float = GRAYSCALE_PROBABILITY,
        color_jitter_strength: float = 1.0,
        gram_crops_size: int | None = None,
        gram_no_distortions: bool = False,
        horizontal_flips: bool = True,
    ) -> None:
        check_crop_options(local_crops_number, blur_probabilities, grayscale_probability, color_jitter_strength)
        self.horizontal_flips = horizontal_flips
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.blur_probabilities = blur_probabilities
        self.grayscale_probability = grayscale_probability
        self.color_jitter_strength = color_jitter_strength
        blur_global1, blur_global2, blur_local = BLUR_PROBABILITIES[blur_probabilities]

        self.gram_crops_size, self.gram_no_distortions = gram_crops_size, gram_no_distortions
        # With Gram crops, the global regions are cut at the larger side and resized after the distortions.
        flip = FLIP_PROBABILITY if horizontal_flips else 0.0  # DINOv3's crops.horizontal_flips=false: none
        self.geometric_augmentation_global = _geometric(max(global_crops_size, gram_crops_size or 0),
                                                        self.global_crops_scale, flip)
        self.geometric_augmentation_local = _geometric(local_crops_size, self.local_crops_scale, flip)
        # One definition, drawn independently for every crop.
        color_jittering = v2.Compose(
            [
                v2.RandomApply([v2.ColorJitter(*color_jitter_strengths(color_jitter_strength))], p=0.8),
                v2.RandomGrayscale(p=grayscale_probability),
            ]
        )
        self.normalize = normalize = v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), make_normalize_transform(), v2.ToPureTensor()]
        )
        # Solarize acts on the uint8 PIL image (threshold 128 of 255), before the float conversion.
        self.global_transfo1 = v2.Compose([color_jittering, _blur(blur_global1), normalize])
        self.global_transfo2 = v2.Compose(
            [color_jittering, _blur(blur_global2), v2.RandomSolarize(threshold=128, p=SOLARIZE_PROBABILITY), normalize]
        )
        self.local_transfo = v2.Compose([color_jittering, _blur(blur_local), normalize])

    @property
    def draft_size(self) -> int:
        """The short side an image needs so that no crop is upsampled (larger JPEGs are decoded smaller)."""
        return multi_crop_draft_size(self.global_crops_size, self.local_crops_size, self.gram_crops_size,
                                     self.global_crops_scale, self.local_crops_scale)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global {self.global_crops_size}px scale={self.global_crops_scale}, "
            f"{self.local_crops_number} x local {self.local_crops_size}px scale={self.local_crops_scale}, "
            f"blur={self.blur_probabilities}, grayscale={self.grayscale_probability}, "
            f"jitter x{self.color_jitter_strength})"
        )

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        # Draw order: global 1, global 2, then the local crops (each geometric, then photometric).
        global_crops, gram_crops = [], []
        for transfo in (self.global_transfo1, self.global_transfo2):
            region = self.geometric_augmentation_global(image)
            crop = transfo(region)
            if self.gram_crops_size is not None:
                undistorted = self.normalize(region) if self.gram_no_distortions else crop
                gram_crops.append(resize_crop(undistorted, self.gram_crops_size))
                crop = resize_crop(crop, self.global_crops_size)
            global_crops.append(crop)
        local_crops = [
            self.local_transfo(self.geometric_augmentation_local(image)) for _ in range(self.local_crops_number)
        ]
        out = {"global_crops": global_crops, "global_crops_teacher": global_crops, "local_crops": local_crops,
               "offsets": ()}
        if self.gram_crops_size is not None:
            out["gram_crops"] = gram_crops
        return out
