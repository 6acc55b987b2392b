"""Per-crop photometric operations on float batches (N, 3, H, W) in [0, 1], one factor per crop.

The tensor multi-crop path (:mod:`dinokit.data.tensor_augment`) applies these to all crops of a size at once; each
equals torchvision's per-image function (``tests/test_tensor_augment.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

BLUR_KERNEL_SIZE = 9
SOLARIZE_THRESHOLD = 128 / 255  # the PIL path's threshold of 128 on uint8 pixels
# Indices of the jitter operations in ``CropParams.jitter_order`` / ``jitter_factors``.
OP_BRIGHTNESS, OP_CONTRAST, OP_SATURATION, OP_HUE = range(4)
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale




def _per_crop(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)  # (N,) -> (N, 1, 1, 1), broadcast over channels and pixels


def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    ratio = _per_crop(factor)
    return (ratio * image + (1 - ratio) * other).clamp_(0, 1)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = image.unbind(dim=-3)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def adjust_brightness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (image * _per_crop(factor)).clamp_(0, 1)


def adjust_contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(image).mean(dim=(-3, -2, -1), keepdim=True)  # (N, 1, 1, 1)
    return _blend(image, mean, factor)


def adjust_saturation(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(image, grayscale(image), factor)


def adjust_hue(image: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` (fraction of a turn, per crop), keeping HSV saturation and value.

    Equal to converting to HSV, shifting H and converting back (torchvision's ``adjust_hue``), without
    forming S: each output channel is ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 * H) mod 6`` and ``n = 5, 3, 1`` for red, green, blue.
    """
    r, g, b = image.unbind(dim=-3)
    maxc = image.amax(dim=-3)
    delta = maxc - image.amin(dim=-3)
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    # Hue in sixths of a turn, by the largest channel (ties: red, then green, then blue, as torchvision).
    hue = torch.where(
        maxc == r, (g - b) / safe_delta, torch.where(maxc == g, 2.0 + (b - r) / safe_delta, 4.0 + (r - g) / safe_delta)
    )
    hue = hue + 6.0 * shift.view(-1, 1, 1)  # (N, H, W)
    n = torch.tensor([5.0, 3.0, 1.0], device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + hue.unsqueeze(-3), 6.0)  # (N, 3, H, W)
    return maxc.unsqueeze(-3) - delta.unsqueeze(-3) * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per crop, reflect padding (torchvision's kernel and border)."""
    n, c, height, width = image.shape
    x = torch.arange(kernel_size, device=image.device, dtype=image.dtype) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (x / sigma.to(image).view(-1, 1)) ** 2)  # (N, k)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N * C, k)
    pad = kernel_size // 2
    # Each (crop, channel) plane is its own group of a depthwise convolution: (1, N * C, H, W).
    planes = F.pad(image.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    planes = F.conv2d(planes, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    planes = F.conv2d(planes, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return planes.view(n, c, height, width)


def solarize(image: torch.Tensor) -> torch.Tensor:
    return torch.where(image >= SOLARIZE_THRESHOLD, 1.0 - image, image)


JITTER_OPS = {  # CropParams.jitter_order index -> operation
    OP_BRIGHTNESS: adjust_brightness,
    OP_CONTRAST: adjust_contrast,
    OP_SATURATION: adjust_saturation,
    OP_HUE: adjust_hue,
}


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) pixels in [0, 1] ImageNet-normalised, in place."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)
