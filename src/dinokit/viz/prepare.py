"""Images in, per-image tensors out: the preprocessing and batched forward every picture shares.

An image is resized so that its short side is ``image_size`` pixels (bicubic, aspect ratio kept; its long side
at most ``MAX_ASPECT`` times that, so that a panorama does not become tens of thousands of patches), then
centre-cropped to a multiple of the patch size exactly as the backbone crops its input
(:meth:`DinoVisionTransformer.crop_to_patch_multiple`), so that the pixels drawn next to a map are the
pixels the map describes. Images of different sizes are batched by shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..data.images import as_seen, load_image, warn_skipped
from ..data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    MAX_ASPECT,
    make_normalize_transform,
    short_side_size,
)
from ..devices import usable_device
from ..errors import DinokitError
from ..features import autocast_context

DEFAULT_IMAGE_SIZE = 448  # 32 patches of 14 on the short side


class TooElongatedError(ValueError):
    """An image whose short side is under one patch once its long side is capped."""


ImageLike = Union[str, Path, Image.Image, torch.Tensor]


@dataclass
class PreparedImage:
    """One image as the backbone sees it, and as it is drawn."""

    tensor: torch.Tensor
    """(3, H, W) float, ImageNet-normalised; H and W are multiples of the patch size."""
    pixels: np.ndarray
    """(H, W, 3) uint8: the same crop, for drawing."""
    name: str
    """A short name for output files (the file stem, or ``image<i>``)."""
    source: str = ""
    """The file it was read from ("" for a PIL image or a tensor): output names tell same-stem inputs apart by it."""


def _denormalise(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised -> (H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    rgb = (x.float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def resize_short_side(image: torch.Tensor, image_size: int | None, *, interpolation=v2.InterpolationMode.BICUBIC):
    """(C, H, W) -> short side ``image_size``, long side at most ``MAX_ASPECT * image_size`` (aspect ratio kept);
    ``None`` keeps the size."""
    if image_size is None:
        return image
    h, w = image.shape[-2:]
    if max(h, w) <= MAX_ASPECT * min(h, w):
        return TF.resize(image, image_size, interpolation=interpolation, antialias=True)
    size = short_side_size(h, w, image_size, max_aspect=MAX_ASPECT)  # a panorama: the long side capped
    return TF.resize(image, list(size), interpolation=interpolation, antialias=True)


def prepare_image(model: nn.Module, image: ImageLike, *, image_size: int | None = DEFAULT_IMAGE_SIZE,
                  name: str = "image") -> PreparedImage:
    """A path, PIL image or (3, H, W) tensor (uint8 pixels, or floats already ImageNet-normalised)."""
    source = ""
    if isinstance(image, (str, Path)):
        name, source = Path(image).stem, str(image)
        try:
            image = load_image(image, draft_size=image_size)  # large JPEGs decoded nearer the size used
        except FileNotFoundError:
            raise DinokitError(f"input image {str(image)!r} does not exist; check the path") from None
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DinokitError(f"cannot read image {str(image)!r} ({err}); check the file") from err
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(as_seen(image))  # (3, H, W) uint8, decoded as the commands decode files
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise DinokitError(f"expected an image path, a PIL image or a (3, H, W) tensor, got {type(image).__name__}")
    if not image.is_floating_point() and image.dtype != torch.uint8:  # raw pixels taken as normalised values
        raise DinokitError(f"a {image.dtype} image tensor is ambiguous: give uint8 pixels (0..255) or float values "
                           "already ImageNet-normalised (e.g. tensor.to(torch.uint8) for 8-bit pixels)")
    if image.dtype == torch.uint8:
        image = resize_short_side(image, image_size)
        tensor = make_normalize_transform()(TF.to_dtype(image, torch.float32, scale=True))
    else:  # already normalised
        tensor = resize_short_side(image.float(), image_size)
    try:
        tensor = model.crop_to_patch_multiple(tensor)
    except ValueError:  # too elongated for one patch on its short side (skipped like an unreadable file)
        why = (f"{tensor.shape[-1]}x{tensor.shape[-2]} px after resizing (the long side capped at {MAX_ASPECT}x the "
               f"size), under one {model.patch_size}-px patch on its short side; crop it or pass a larger --image-size")
        raise DinokitError(f"image {name!r} is {why}") from TooElongatedError(why)
    return PreparedImage(tensor=tensor, pixels=_denormalise(tensor), name=name, source=source)


def prepare_images(model: nn.Module, images: ImageLike | Sequence[ImageLike], *,
                   image_size: int | None = DEFAULT_IMAGE_SIZE, skip_unreadable: bool = True) -> list[PreparedImage]:
    """Paths, PIL images, (3, H, W) tensors, or one (B, 3, H, W) normalised batch -> prepared images.

    Tensors are taken as they are (no resize) unless they are uint8 pixels. An unreadable file is skipped with
    a warning naming it and why (``skip_unreadable=False``: one error line instead); none readable is an error.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, (str, Path, Image.Image, torch.Tensor)):
        images = [images]
    prepared: list[PreparedImage] = []
    first_error = None
    for i, image in enumerate(images):
        size = None if isinstance(image, torch.Tensor) and image.is_floating_point() else image_size
        try:
            prepared.append(prepare_image(model, image, image_size=size, name=f"image{i}"))
        except DinokitError as err:
            if not skip_unreadable or not isinstance(err.__cause__, (OSError, ValueError)):
                raise
            elongated = isinstance(err.__cause__, TooElongatedError)
            warn_skipped(image, err.__cause__, "too elongated" if elongated else None)
            first_error = first_error or err
    if not prepared:
        raise first_error or DinokitError("no images given")
    return prepared


def run_batched(
    model: nn.Module,
    images: Sequence[PreparedImage],
    fn: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]],
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``fn(model, batch)`` over ``images`` batched by shape; per image, a dict of float32 CPU tensors.

    ``device`` defaults to the model's; ``dtype`` bf16/fp16 runs under autocast. The model is put in
    eval mode for the call (its training flag is restored afterwards).
    """
    device = usable_device(device) if device is not None else next(model.parameters()).device
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.tensor.shape), []).append(i)
    results: list[dict[str, torch.Tensor] | None] = [None] * len(images)
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.inference_mode(), autocast_context(device, dtype):
            for indices in by_shape.values():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start : start + batch_size]
                    batch = torch.stack([images[i].tensor for i in chunk]).to(device)  # (b, 3, H, W)
                    out = fn(model, batch)
                    for j, i in enumerate(chunk):
                        results[i] = {k: v[j].float().cpu() for k, v in out.items()}
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def last_patch_features(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The last block's patch tokens after the final norm, as a (b, h, w, D) grid (registers excluded)."""
    (patches,) = model.get_intermediate_layers(batch, n=1, reshape=True, norm=True)  # (b, D, h, w)
    return {"features": patches.permute(0, 2, 3, 1)}


def patch_features(model: nn.Module, images: Sequence[PreparedImage], *, batch_size: int = 8,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Per image, the (h, w, D) float32 grid of normalised last-block patch features."""
    out = run_batched(model, images, last_patch_features, batch_size=batch_size, device=device, dtype=dtype)
    return [o["features"] for o in out]
