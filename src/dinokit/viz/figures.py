"""The pictures ``dinokit viz`` writes, as (H, W, 3) uint8 arrays (also for notebooks)."""

from __future__ import annotations

import numpy as np

from .attention import mass_mask
from .drawing import caption, colourise, draw_matches, grid, hstack, overlay, to_uint8, upsample
from .match import PatchMatches
from .pca import PcaPicture


def pca_figures(picture: PcaPicture, *, upsample_mode: str = "nearest") -> list[np.ndarray]:
    """Per image, the image and its PCA colours (upsampled to the image) side by side."""
    if picture.images is None:
        raise ValueError("the picture holds no images; make it with pca_rgb(model, images)")
    figures = []
    for image, rgb in zip(picture.images, picture.rgb):
        colours = to_uint8(upsample(rgb, image.pixels.shape[:2], upsample_mode))
        figures.append(hstack([image.pixels, colours]))
    return figures


def attention_figure(pixels: np.ndarray, attention: np.ndarray, patch_norms: np.ndarray, *,
                     keep_mass: float | None = None, upsample_mode: str = "nearest") -> np.ndarray:
    """One row: the image, the heads' mean, each head, the patch-norm map (each map on its own colour
    range); with ``keep_mass``, a second row with the image dimmed outside each map's mass mask."""
    size = pixels.shape[:2]

    def panel(values: np.ndarray, text: str) -> np.ndarray:
        return caption(to_uint8(colourise(upsample(values, size, upsample_mode))), text)

    maps = np.concatenate([attention.mean(0, keepdims=True), attention])  # (1 + heads, h, w)
    titles = ["mean"] + [f"head {h}" for h in range(len(attention))]
    row = [caption(pixels, "image")] + [panel(m, t) for m, t in zip(maps, titles)]
    row.append(panel(patch_norms, f"norm {patch_norms.min():.0f}-{patch_norms.max():.0f}"))
    rows = [hstack(row)]
    if keep_mass is not None:
        masks = [upsample(m.astype(np.float32), size, "nearest") > 0.5 for m in mass_mask(maps, keep_mass)]
        label = caption(np.full_like(pixels, 255), f"{100 * keep_mass:.0f}% mass")
        rows.append(hstack([label] + [caption(overlay(pixels, m), t) for m, t in zip(masks, titles)]))
    return grid(rows, columns=1)  # one above the other


def matches_figure(matches: PatchMatches, patch_size: int) -> np.ndarray:
    """Images A and B side by side, a line between the centres of each matched pair of patches."""
    if matches.images is None:
        raise ValueError("the matches hold no images; make them with match_patches(model, image_a, image_b)")
    a, b = matches.images
    return draw_matches(a.pixels, b.pixels, matches.points_a, matches.points_b, patch_size)
