"""The DINOv2 multi-crop augmentation on batched tensors (CPU tensors or an accelerator).

Same distributions as :class:`dinokit.data.augmentations.DataAugmentationDINO` (the PIL path), split
in two so the pixel work can leave the data workers:

1. :class:`MultiCropSource`, per sample, in the data workers: decode to a uint8 tensor and draw every
   random parameter of the sample's crops (boxes, flips, jitter factors and order, grayscale, blur
   sigma, solarize) from the global torch generator. :class:`~dinokit.data.loaders.SSLDataset` seeds
   that generator from ``(seed, stream position)``, so the crops stay a function of the seed and the
   position, whichever device later applies them, and a resumed stream is exact.
2. :class:`TensorMultiCrop`, per batch, on any device: crops and resizes (bicubic, antialiased), then
   runs the photometric operations (:mod:`dinokit.data.photometric`) on all crops of a size at once, each crop
   with its own factors.

Every draw uses the PIL path's parameters: RandomResizedCrop's area ``scale`` and aspect ratio
``(3/4, 4/3)`` (log-uniform, ten attempts, centre-crop fallback), flip 0.5, colour jitter with
probability 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, times ``color_jitter_strength``,
in a random order), grayscale ``grayscale_probability`` (0.2), Gaussian blur (kernel 9, sigma 0.1-2.0) with the per-crop probabilities of
``blur_probabilities``, solarize 0.2 on the second global crop only. One deliberate difference: the
PIL path rounds to uint8 after each operation, the tensor path stays in float32 until the end.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from .augmentations import (
    BLUR_PROBABILITIES,
    FLIP_PROBABILITY,
    GRAYSCALE_PROBABILITY,
    SOLARIZE_PROBABILITY,
    check_crop_options,
    color_jitter_strengths,
    resize_crop,
)
from .collate import SSLBatch, SSLCollate
from .photometric import JITTER_OPS, gaussian_blur, grayscale, normalize, solarize

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop's default aspect-ratio range
CROP_ATTEMPTS = 10  # torchvision draws up to ten boxes before falling back to a centre crop
JITTER_PROBABILITY = 0.8
BLUR_SIGMA = (0.1, 2.0)


# ---------------------------------------------------------------------------------------------------
# Parameters (drawn per sample, on the CPU)
# ---------------------------------------------------------------------------------------------------


@dataclass
class CropParams:
    """Every random choice for the ``C = 2 + n_local`` crops of one image (crop 0, 1 global; then local)."""

    boxes: torch.Tensor
    """(C, 4) long: ``top, left, height, width`` of each crop in the source image."""
    flip: torch.Tensor
    """(C,) bool: horizontal flip."""
    jitter: torch.Tensor
    """(C,) bool: colour jitter applied."""
    jitter_order: torch.Tensor
    """(C, 4) long: the order of the four jitter operations (``photometric.OP_*`` indices)."""
    jitter_factors: torch.Tensor
    """(C, 4) float: brightness, contrast and saturation factors, then the hue shift."""
    grayscale: torch.Tensor
    """(C,) bool."""
    blur: torch.Tensor
    """(C,) bool."""
    blur_sigma: torch.Tensor
    """(C,) float: the Gaussian's standard deviation, in pixels."""
    solarize: torch.Tensor
    """(C,) bool."""


def random_resized_crop_boxes(
    height: int,
    width: int,
    n: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n, 4) long boxes ``top, left, height, width`` drawn as torchvision's ``RandomResizedCrop``.

    Area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``; the first of ten
    attempts that fits the image wins; when none fits, the centre crop with the ratio clamped.
    All attempts are drawn at once (the distribution is the same as drawing them one by one).
    """
    area = height * width
    target = area * torch.empty(n, CROP_ATTEMPTS, dtype=torch.float64).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, CROP_ATTEMPTS, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect)).long()  # (n, attempts)
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # index of the first fitting attempt (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    # Centre-crop fallback with the aspect ratio clamped into ``ratio``.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    found = fits.any(dim=1)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    # torch.randint(0, H - h + 1) per row, as floor(u * (H - h + 1)).
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(found, (u[:, 1] * (width - w + 1)).long(), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def draw_crop_params(
    height: int,
    width: int,
    *,
    global_crops_scale: tuple[float, float],
    local_crops_scale: tuple[float, float],
    local_crops_number: int,
    blur_probabilities: str = "official",
    grayscale_probability: float = GRAYSCALE_PROBABILITY,
    color_jitter_strength: float = 1.0,
    generator: torch.Generator | None = None,
    horizontal_flips: bool = True,
) -> CropParams:
    """Draw all random parameters of one image's crops (default: the global torch generator). Without
    ``horizontal_flips`` no crop is flipped; every other draw is the same."""
    n_crops = 2 + local_crops_number
    blur_global1, blur_global2, blur_local = BLUR_PROBABILITIES[blur_probabilities]
    boxes = torch.cat(
        [
            random_resized_crop_boxes(height, width, 2, scale=global_crops_scale, generator=generator),
            random_resized_crop_boxes(height, width, local_crops_number, scale=local_crops_scale, generator=generator),
        ]
    )
    u = torch.rand(n_crops, 6, generator=generator)  # flip, jitter, grayscale, blur, solarize, sigma
    # Ranks of i.i.d. uniforms: a uniformly random order per crop, in one call instead of one randperm per crop.
    jitter_order = torch.rand(n_crops, 4, generator=generator).argsort(dim=1)
    # Factor ranges [max(0, 1 - s), 1 + s] (hue: [-s, s]), as in torchvision.
    *factor_strengths, hue = color_jitter_strengths(color_jitter_strength)
    ranges = torch.tensor([[max(0.0, 1 - v), 1 + v] for v in factor_strengths] + [[-hue, hue]])
    factors = ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * torch.rand(n_crops, 4, generator=generator)
    blur_p = torch.tensor([blur_global1, blur_global2] + [blur_local] * local_crops_number)
    solarize_p = torch.tensor([0.0, SOLARIZE_PROBABILITY] + [0.0] * local_crops_number)
    return CropParams(
        boxes=boxes,
        flip=u[:, 0] < (FLIP_PROBABILITY if horizontal_flips else 0.0),
        jitter=u[:, 1] < JITTER_PROBABILITY,
        jitter_order=jitter_order,
        jitter_factors=factors,
        grayscale=u[:, 2] < grayscale_probability,
        blur=u[:, 3] < blur_p,
        blur_sigma=BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 5],
        solarize=u[:, 4] < solarize_p,
    )


# ---------------------------------------------------------------------------------------------------
# The two halves: per sample (workers) and per batch (any device)
# ---------------------------------------------------------------------------------------------------


class MultiCropSource:
    """Callable, per sample: PIL image -> ``{"image": uint8 (3, H, W), "params": CropParams}``.

    ``max_size`` (optional) first shrinks images whose shorter side is larger, so that workers ship
    less data; the crop distribution is then relative to the shrunk image. Crops never leave the
    image, so the resize is the only pixel work done here besides decoding.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float],
        local_crops_scale: tuple[float, float],
        local_crops_number: int,
        *,
        blur_probabilities: str = "official",
        grayscale_probability: float = GRAYSCALE_PROBABILITY,
        color_jitter_strength: float = 1.0,
        max_size: int | None = None,
        horizontal_flips: bool = True,
    ) -> None:
        check_crop_options(local_crops_number, blur_probabilities, grayscale_probability, color_jitter_strength)
        self.horizontal_flips = horizontal_flips
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.blur_probabilities = blur_probabilities
        self.grayscale_probability = grayscale_probability
        self.color_jitter_strength = color_jitter_strength
        self.max_size = max_size

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        if self.max_size is not None and min(image.size) > self.max_size:
            image = TF.resize(image, self.max_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        pixels = TF.pil_to_tensor(image.convert("RGB"))  # (3, H, W) uint8
        params = draw_crop_params(
            pixels.shape[1],
            pixels.shape[2],
            global_crops_scale=self.global_crops_scale,
            local_crops_scale=self.local_crops_scale,
            local_crops_number=self.local_crops_number,
            blur_probabilities=self.blur_probabilities,
            grayscale_probability=self.grayscale_probability,
            color_jitter_strength=self.color_jitter_strength,
            horizontal_flips=self.horizontal_flips,
        )
        return {"image": pixels, "params": params}


class TensorMultiCrop:
    """Per batch: apply drawn :class:`CropParams` to uint8 images on ``images[0].device``.

    Returns ``(global_crops, local_crops, gram_crops)``, float32 and ImageNet-normalised, crop-major as in
    :class:`~dinokit.data.collate.SSLBatch`: ``(2 * n, 3, G, G)``, ``(n_local * n, 3, L, L)`` and, with
    ``gram_crops_size`` S (DINOv3's high-resolution Gram teacher), the global crops' regions ``(2 * n, 3, S, S)``
    (else None). As in the PIL path, the global regions are then cut at max(G, S), distorted there and resized to
    both; ``gram_no_distortions`` keeps the Gram crops undistorted (only normalised).
    """

    def __init__(self, *, global_crops_size: int = 224, local_crops_size: int = 96, gram_crops_size: int | None = None,
                 gram_no_distortions: bool = False) -> None:
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.gram_crops_size = gram_crops_size
        self.gram_no_distortions = gram_no_distortions

    def __call__(
        self, images: Sequence[torch.Tensor], params: Sequence[CropParams]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n_crops = params[0].boxes.shape[0]
        gram_crops = None
        if self.gram_crops_size is None:
            global_crops = self._distort(self._regions(images, params, range(0, 2), self.global_crops_size), params,
                                         range(0, 2))
        else:
            regions = self._regions(images, params, range(0, 2), max(self.global_crops_size, self.gram_crops_size))
            if self.gram_no_distortions:
                gram_crops = normalize(resize_crop(regions, self.gram_crops_size))
            distorted = self._distort(regions, params, range(0, 2))
            global_crops = resize_crop(distorted, self.global_crops_size)
            if gram_crops is None:
                gram_crops = resize_crop(distorted, self.gram_crops_size)
        if n_crops > 2:
            local_ids = range(2, n_crops)
            local_crops = self._distort(self._regions(images, params, local_ids, self.local_crops_size), params,
                                        local_ids)
        else:
            local_crops = torch.empty(0, device=images[0].device)
        return global_crops, local_crops, gram_crops

    @staticmethod
    def _regions(images: Sequence[torch.Tensor], params: Sequence[CropParams], crop_ids: range,
                 size: int) -> torch.Tensor:
        """The crops' boxes at ``size``, flipped where drawn, crop-major (crop c of every image, then c + 1):
        (N, 3, size, size) in [0, 1]."""
        # Resize in uint8 (the fast, PIL-like kernel on CPUs); the flags are CPU tensors, so no device wait.
        crops = []
        for c in crop_ids:
            for image, p in zip(images, params):
                crop = TF.resized_crop(image, *p.boxes[c].tolist(), [size, size],
                                       interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
                crops.append(crop.flip(-1) if p.flip[c] else crop)
        return torch.stack(crops).float().div_(255)

    @staticmethod
    def _distort(x: torch.Tensor, params: Sequence[CropParams], crop_ids: range) -> torch.Tensor:
        """Colour, blur and solarize of the crops ``crop_ids`` (rows of ``x``, in place), then normalised."""
        device = x.device

        def gather(field: str) -> torch.Tensor:
            # The per-crop parameter in the same crop-major order, on the CPU: (N, ...).
            return torch.stack([getattr(p, field)[c] for c in crop_ids for p in params])

        def apply(mask: torch.Tensor, fn, *args: torch.Tensor) -> None:
            # Index lists are built on the CPU, so selecting a subset never waits for the device.
            rows = mask.nonzero().flatten()
            if len(rows):
                dev_rows = rows.to(device, non_blocking=True)
                x[dev_rows] = fn(x[dev_rows], *(a[rows].to(device, non_blocking=True) for a in args))

        jitter, order, factors = gather("jitter"), gather("jitter_order"), gather("jitter_factors")
        for slot in range(4):
            for op, fn in JITTER_OPS.items():
                apply(jitter & (order[:, slot] == op), fn, factors[:, op])
        apply(gather("grayscale"), lambda t: grayscale(t).expand_as(t).contiguous())
        apply(gather("blur"), gaussian_blur, gather("blur_sigma"))
        apply(gather("solarize"), solarize)
        return normalize(x)


class PendingSSLBatch:
    """A collated batch whose crops are not made yet: uint8 images, their crop parameters, and the masks.

    ``to(device)`` moves the images and makes the crops there, returning the finished
    :class:`~dinokit.data.collate.SSLBatch`: with a CUDA device, the pixel work of the augmentation
    runs on the GPU while the data workers only decode and draw parameters.
    """

    def __init__(
        self, batch: SSLBatch, images: list[torch.Tensor], params: list[CropParams], multi_crop: TensorMultiCrop
    ) -> None:
        self.batch = batch
        self.images = images
        self.params = params
        self.multi_crop = multi_crop

    @property
    def n_samples(self) -> int:  # read by the training loop before the batch moves (readable images)
        return self.batch.n_samples

    @property
    def n_bad(self) -> int:  # unreadable images skipped in this batch
        return self.batch.n_bad

    def pin_memory(self) -> PendingSSLBatch:
        """Called by ``DataLoader(pin_memory=True)``."""
        self.images = [image.pin_memory() for image in self.images]
        self.batch = self.batch.pin_memory()
        return self

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> SSLBatch:
        batch = self.batch.to(device, non_blocking=non_blocking)
        if not self.images:
            return batch
        images = [image.to(device, non_blocking=non_blocking) for image in self.images]
        global_crops, local_crops, gram_crops = self.multi_crop(images, self.params)
        dtype = self.batch.global_crops.dtype
        return dataclasses.replace(batch, global_crops=global_crops.to(dtype), local_crops=local_crops.to(dtype),
                                   gram_crops=None if gram_crops is None else gram_crops.to(dtype))


class TensorAugmentCollate:
    """Picklable collate for ``SSLDataset`` batches of ``(position, MultiCropSource output or None)``.

    Applies :class:`TensorMultiCrop` on ``device`` (``"cpu"`` in DataLoader workers), then batches
    and masks exactly as :class:`~dinokit.data.collate.SSLCollate`: the masks do not depend on the
    augmentation path. With ``defer=True`` it returns a :class:`PendingSSLBatch` instead, whose
    ``to(device)`` makes the crops on that device (for the training loop, not the workers).
    """

    def __init__(
        self,
        collate: SSLCollate,
        multi_crop: TensorMultiCrop,
        *,
        device: str | torch.device = "cpu",
        defer: bool = False,
    ) -> None:
        self.collate = collate
        self.multi_crop = multi_crop
        self.device = torch.device(device)
        self.defer = defer

    def __call__(self, batch: Sequence[tuple[int, dict[str, Any] | None]]) -> SSLBatch | PendingSSLBatch:
        good = [sample for _, sample in batch if sample is not None]
        if self.defer:
            # Crop-less stand-ins: the collate only needs the number of global crops to draw the masks.
            stand_in = {"global_crops": [torch.empty(0)] * 2, "local_crops": []}
            masked = self.collate([(position, stand_in if s is not None else None) for position, s in batch])
            return PendingSSLBatch(masked, [s["image"] for s in good], [s["params"] for s in good], self.multi_crop)
        crops_per_sample: dict[int, dict[str, Any]] = {}
        if good:
            images = [sample["image"].to(self.device, non_blocking=True) for sample in good]
            global_crops, local_crops, gram_crops = self.multi_crop(images, [sample["params"] for sample in good])
            n = len(good)
            n_local = len(local_crops) // n
            # Back to per-sample lists of views; SSLCollate stacks them crop-major again.
            for k, sample in enumerate(good):
                crops_per_sample[id(sample)] = {
                    "global_crops": [global_crops[c * n + k] for c in range(2)],
                    "local_crops": [local_crops[c * n + k] for c in range(n_local)],
                }
                if gram_crops is not None:
                    crops_per_sample[id(sample)]["gram_crops"] = [gram_crops[c * n + k] for c in range(2)]
        return self.collate([(position, crops_per_sample.get(id(s)) if s is not None else None) for position, s in batch])
