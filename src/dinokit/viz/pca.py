"""PCA pictures of patch features: DINOv2's foreground-then-colour recipe, a plain PCA, DINOv3's variant.

``paper`` (DINOv2, Sec. 7.6): one PCA over the patch features of all images; the patches on the
foreground side of the first component are the foreground; a second PCA over the foreground patches
of all images; its first three components are red, green and blue; the background is black.
``plain``: one PCA over all patches, no foreground split. ``dinov3``: a whitened PCA fitted on the
foreground patches and applied to all, colours ``sigmoid(2 x)``, background black; the foreground comes
from a logistic-regression classifier on patch features when example masks are given (3x3 median
filter on its probability, foreground where it exceeds 0.5), else from the first component as above.

Signs. A PCA axis has no sign, so the pictures fix one deterministically:
- the foreground axis points away from the image border: it is flipped so that the mean projection
  of the border patches (the outer ring of every patch grid) is negative, i.e. the border is mostly
  background; the foreground is ``projection > threshold`` (0: the mean of all patches);
- each colour axis is flipped so that the projections' third moment is positive (the long tail of the
  distribution, usually the distinctive parts, gets the bright end of the channel).
The pictures are therefore the same for any rotation or sign flip of the feature space.

PCA is an eigen-decomposition of the float64 covariance (the SVD of the centred data, without
holding it twice); no scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..data.images import as_seen, upright
from ..errors import DinokitError
from .prepare import (
    DEFAULT_IMAGE_SIZE,
    ImageLike,
    PreparedImage,
    patch_features,
    prepare_image,
    prepare_images,
    resize_short_side,
)

PCA_MODES = ("paper", "plain", "dinov3")
FOREGROUND_C = 0.1  # inverse L2 strength of the foreground classifier (the value DINOv3's search chose)
LABEL_MARGIN = 0.01  # example patches count as labelled when their mask fraction is < 0.01 or > 0.99
COLOUR_QUANTILES = (0.01, 0.99)  # paper/plain colours: these quantiles of each channel map to 0 and 1
_CHUNK = 1 << 16


@dataclass
class Pca:
    """``k`` principal axes: ``project(x) = (x - mean) @ components.T`` (optionally divided by the std)."""

    mean: torch.Tensor  # (D,) float64
    components: torch.Tensor  # (k, D) float64, unit rows, largest variance first
    variances: torch.Tensor  # (k,) float64

    def project(self, x: torch.Tensor, *, whiten: bool = False) -> torch.Tensor:
        """(..., D) -> (..., k) float64."""
        out = (x.double() - self.mean) @ self.components.T
        return out / self.variances.clamp_min(1e-12).sqrt() if whiten else out

    def flip(self, signs: torch.Tensor) -> None:
        """Multiply each axis by its sign (+1/-1)."""
        self.components = self.components * signs.to(self.components).unsqueeze(1)


def fit_pca(x: torch.Tensor, k: int = 3) -> Pca:
    """The top ``k`` principal axes of the rows of ``x`` (N, D)."""
    n, d = x.shape
    if n <= k or d < k:
        raise DinokitError(f"PCA needs more than {k} patches with at least {k} feature dimensions, got {n} x {d}")
    total = torch.zeros(d, dtype=torch.float64)
    gram = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n, _CHUNK):  # chunks: a video's patches need not fit twice in float64
        chunk = x[start : start + _CHUNK].double().cpu()
        total += chunk.sum(0)
        gram += chunk.T @ chunk
    mean = total / n
    cov = (gram - n * torch.outer(mean, mean)) / (n - 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(values, descending=True)[:k]
    return Pca(mean=mean, components=vectors[:, order].T.contiguous(), variances=values[order].clamp_min(0))


def skew_signs(projections: torch.Tensor) -> torch.Tensor:
    """(N, k) -> (k,) signs that make each column's third moment non-negative."""
    third = (projections.double() ** 3).sum(0)
    return torch.where(third < 0, -1.0, 1.0).double()


def border_ring(h: int, w: int) -> torch.Tensor:
    """(h, w) bool: the outer ring of a patch grid."""
    ring = torch.ones(h, w, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    return ring


def _grids(features: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """The (h, w, D) grids given: a sequence of them, one grid, or a (B, h, w, D) batch; detached (features that
    require grad failed at the first ``.numpy()``); anything else is one line."""
    if isinstance(features, (torch.Tensor, np.ndarray)):  # one grid, or a batch of them
        features = torch.as_tensor(features)
        features = [features] if features.ndim == 3 else list(features)
    grids = [torch.as_tensor(f).detach() for f in features]
    if not grids:  # a traceback from torch.cat
        raise DinokitError("no feature grid was given: give the (h, w, D) grids of patch_features, one per image")
    for f in grids:
        if f.ndim != 3:
            raise DinokitError(f"a feature grid has shape {tuple(f.shape)}, not (h, w, D): give the grids of "
                               "patch_features (one per image)")
    return grids


def _flatten(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image (h, w, D) grids -> (sum of h*w, D)."""
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])


def _split(values: torch.Tensor, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """(sum of h*w, ...) -> per-image (h, w, ...)."""
    sizes = [f.shape[0] * f.shape[1] for f in features]
    return [v.reshape(f.shape[0], f.shape[1], *v.shape[1:]) for v, f in zip(values.split(sizes), features)]


def foreground_masks(features: Sequence[torch.Tensor], *, threshold: float = 0.0) -> tuple[list[torch.Tensor], Pca]:
    """Per image, the (h, w) bool foreground from the first principal component of all patches.

    Returns the masks and the one-axis PCA, its sign fixed so that the border is mostly background.
    """
    features = _grids(features)
    x = _flatten(features)
    pca = fit_pca(x, k=1)
    score = pca.project(x)[:, 0]  # (N,)
    border = torch.cat([border_ring(f.shape[0], f.shape[1]).reshape(-1) for f in features])
    border_mean = score[border].mean() if border.any() else score.new_zeros(())
    if border.all() or abs(float(border_mean)) < 1e-12:  # no interior to compare with: fall back to the skew
        sign = skew_signs(score[:, None])
    else:
        sign = torch.where(border_mean > 0, -1.0, 1.0).double().reshape(1)
    pca.flip(sign)
    return [m for m in _split(score * sign > threshold, features)], pca


@dataclass
class PcaPicture:
    """Per image, the colours at patch resolution and the foreground used."""

    rgb: list[np.ndarray]
    """(h, w, 3) float32 in [0, 1]; background black."""
    foreground: list[np.ndarray]
    """(h, w) bool."""
    pca: Pca
    """The colour PCA (its axes are red, green, blue)."""
    images: list[PreparedImage] | None = None
    """The inputs as the model saw them, when the picture was made from images (``pixels`` for drawing)."""


def _quantile_scale(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Map each column's ``COLOUR_QUANTILES`` over ``reference`` (M, 3) to 0 and 1, clipped."""
    q = torch.tensor(COLOUR_QUANTILES, dtype=torch.float64)
    ref = reference[torch.linspace(0, len(reference) - 1, min(len(reference), 1 << 20)).long()]  # quantile's limit
    lo, hi = torch.quantile(ref, q, dim=0)  # (3,) each
    return ((values - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def pca_colours(
    features: Sequence[torch.Tensor],
    *,
    mode: str = "paper",
    threshold: float = 0.0,
    foreground: Sequence[torch.Tensor] | None = None,
) -> PcaPicture:
    """Colour every patch of every (h, w, D) feature grid by one PCA fitted over all of them.

    ``foreground`` (per-image (h, w) bool masks) replaces the first-component split of ``paper`` and
    ``dinov3``; ``plain`` ignores it.
    """
    if mode not in PCA_MODES:
        raise DinokitError(f"unknown PCA mode {mode!r}; use one of {', '.join(PCA_MODES)}")
    features = _grids(features)
    if not features:
        raise DinokitError("no images given")
    x = _flatten(features)
    if mode == "plain":
        fg = torch.ones(len(x), dtype=torch.bool)
    else:
        masks = foreground if foreground is not None else foreground_masks(features, threshold=threshold)[0]
        fg = torch.cat([torch.as_tensor(m).reshape(-1).bool() for m in masks])
        if int(fg.sum()) <= 3:
            raise DinokitError(
                f"only {int(fg.sum())} foreground patches were found; lower --threshold or use --mode plain"
            )
    pca = fit_pca(x[fg], k=3)
    whiten = mode == "dinov3"
    pca.flip(skew_signs(pca.project(x[fg], whiten=whiten)))
    proj = pca.project(x, whiten=whiten)  # (N, 3)
    if whiten:
        colours = torch.sigmoid(2 * proj)
    else:
        colours = _quantile_scale(proj, proj[fg])
    colours = colours * fg[:, None]  # background black
    rgb = [c.float().numpy() for c in _split(colours, features)]
    masks_out = [m.numpy() for m in _split(fg, features)]
    return PcaPicture(rgb=rgb, foreground=masks_out, pca=pca)


# ------------------------------------------------------------------------------------------- DINOv3 foreground
def read_foreground_example(spec: str | Path) -> tuple[Image.Image, Image.Image]:
    """The RGB image and its grey mask (white = foreground) of a foreground example ``spec``: an image with an
    alpha channel, or ``IMAGE=MASK``. A missing or unreadable file, or an image without alpha, is a one-line
    error (no model needed: the command checks its --fg-examples with this before any work)."""
    image_path, _, mask_path = str(spec).partition("=")
    for path in (image_path, mask_path):
        if path and Path(path).is_dir():
            raise DinokitError(f"foreground example {path!r} is a folder; give an image file (or IMAGE=MASK)")
    try:
        with Image.open(image_path) as opened:
            opened.load()
            img = upright(opened)  # as every command shows the photo; a mask is drawn on that view
            if mask_path:
                with Image.open(mask_path) as m:
                    mask = m.convert("L")
                if mask.size != img.size:
                    raise DinokitError(f"mask {mask_path!r} is {mask.size[0]}x{mask.size[1]} but its image is "
                                       f"{img.size[0]}x{img.size[1]}; give a mask of the image's size")
            elif "A" in img.getbands() or "transparency" in img.info:
                mask = img.convert("RGBA").getchannel("A")
            else:
                raise DinokitError(f"foreground example {image_path!r} has no alpha channel; give IMAGE=MASK instead")
            rgb = as_seen(img)  # transparent pixels over the background, as the commands decode images
    except FileNotFoundError as err:
        raise DinokitError(f"foreground example {err.filename!r} does not exist; check the path") from None
    except OSError as err:
        raise DinokitError(f"cannot read foreground example {str(spec)!r} ({err}); check the file") from None
    return rgb, mask


def load_foreground_example(model: nn.Module, spec: str | Path, *,
                            image_size: int | None = DEFAULT_IMAGE_SIZE) -> tuple[PreparedImage, torch.Tensor]:
    """An example image and its (h, w) foreground fraction per patch.

    ``spec`` is an image whose alpha channel marks the foreground, or ``IMAGE=MASK`` (a grey mask,
    white = foreground). The mask gets the image's resize and crop, then is averaged over each patch.
    """
    image_path = str(spec).partition("=")[0]
    rgb, mask = read_foreground_example(spec)
    prepared = prepare_image(model, rgb, image_size=image_size, name=Path(image_path).stem)
    mask_t = TF.to_dtype(TF.pil_to_tensor(mask), torch.float32, scale=True)  # (1, H, W) in [0, 1]
    mask_t = model.crop_to_patch_multiple(
        resize_short_side(mask_t, image_size, interpolation=v2.InterpolationMode.BILINEAR)
    )
    p = model.patch_size
    fraction = F.avg_pool2d(mask_t[None], kernel_size=p, stride=p)[0, 0]  # (h, w)
    return prepared, fraction


@dataclass
class ForegroundClassifier:
    """Logistic regression on patch features: ``p(fg) = sigmoid(x @ weight + bias)``."""

    weight: torch.Tensor  # (D,) float64
    bias: torch.Tensor  # () float64

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (...) float64."""
        return torch.sigmoid(features.double() @ self.weight + self.bias)

    def predict(self, features: torch.Tensor, *, median: bool = True) -> torch.Tensor:
        """(h, w, D) -> (h, w) bool: probability (3x3 median-filtered) above 0.5."""
        prob = self.probability(features)
        return (median_filter3(prob) if median else prob) > 0.5


def fit_foreground_classifier(features: Sequence[torch.Tensor], fractions: Sequence[torch.Tensor], *,
                              C: float = FOREGROUND_C) -> ForegroundClassifier:
    """Fit on the patches whose mask fraction is clearly background (< 0.01) or foreground (> 0.99)."""
    from ..eval.logreg import fit_logreg

    x = _flatten(features)
    y = torch.cat([f.reshape(-1) for f in fractions])
    keep = (y < LABEL_MARGIN) | (y > 1 - LABEL_MARGIN)
    labels = (y[keep] > 0.5).long()
    if labels.unique().numel() < 2:
        raise DinokitError("the foreground examples need both foreground and background patches; check the masks")
    model = fit_logreg(x[keep], labels, C=C, backend="torch")
    # binary fits hold a zero row for class 0 and the weights for class 1
    return ForegroundClassifier(weight=model.coef[1] - model.coef[0], bias=model.intercept[1] - model.intercept[0])


def median_filter3(x: torch.Tensor) -> torch.Tensor:
    """3x3 median of an (h, w) map, zero-padded as SciPy's ``medfilt2d`` (DINOv3's notebook): a corner's window
    holds five zeros, so a probability map's corners always come out as background."""
    padded = F.pad(x[None, None].double(), (1, 1, 1, 1), mode="constant", value=0.0)
    windows = F.unfold(padded, kernel_size=3)  # (1, 9, h*w)
    return windows.median(dim=1).values.reshape(x.shape).to(x.dtype)


# ------------------------------------------------------------------------------------------- from a model
def pca_rgb(
    model: nn.Module,
    images: ImageLike | Sequence[ImageLike],
    *,
    mode: str = "paper",
    threshold: float = 0.0,
    foreground_examples: Sequence[str | Path] = (),
    image_size: int | None = DEFAULT_IMAGE_SIZE,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    skip_unreadable: bool = True,
) -> PcaPicture:
    """One PCA picture over all ``images`` (paths, PIL images, tensors) from ``model``'s last-block patches. An
    unreadable or too elongated image is skipped with a warning (``skip_unreadable=False``: its one error line).

    ``foreground_examples`` (images with an alpha channel, or ``IMAGE=MASK``) train the foreground
    classifier, which then replaces the first-component split (``paper`` and ``dinov3`` modes).
    """
    if mode not in PCA_MODES:
        raise DinokitError(f"unknown PCA mode {mode!r}; use one of {', '.join(PCA_MODES)}")
    prepared = prepare_images(model, images, image_size=image_size, skip_unreadable=skip_unreadable)
    kwargs = {"batch_size": batch_size, "device": device, "dtype": dtype}
    features = patch_features(model, prepared, **kwargs)
    foreground = None
    if foreground_examples and mode != "plain":
        examples = [load_foreground_example(model, spec, image_size=image_size) for spec in foreground_examples]
        example_features = patch_features(model, [e[0] for e in examples], **kwargs)
        classifier = fit_foreground_classifier(example_features, [e[1] for e in examples])
        foreground = [classifier.predict(f) for f in features]
    picture = pca_colours(features, mode=mode, threshold=threshold, foreground=foreground)
    picture.images = prepared
    return picture
