"""Pictures of what a backbone's features hold: PCA colours, foreground, attention maps, patch matches.

Each operation is a function that returns numpy arrays (for notebooks) and a ``dinokit viz`` command
that draws them::

    from dinokit import create_model
    from dinokit.viz import attention_maps, match_patches, pca_rgb

    model = create_model("dinov2_vits14_reg", pretrained=True)  # the official weights (create_model's default: random)
    picture = pca_rgb(model, ["a.jpg", "b.jpg"])          # .rgb, .foreground: per image (h, w, 3), (h, w)
    maps = attention_maps(model, "a.jpg")                 # .attention (heads, h, w), .patch_norms (h, w)
    matches = match_patches(model, "a.jpg", "b.jpg")     # .points_a, .points_b (M, 2) patch rows/cols
"""

from .attention import AttentionMaps, attention_maps, block_forward_with_attention, mass_mask
from .figures import attention_figure, matches_figure, pca_figures
from .match import PatchMatches, match_features, match_patches, mutual_nearest_neighbours
from .pca import (
    Pca,
    PcaPicture,
    fit_foreground_classifier,
    fit_pca,
    foreground_masks,
    pca_colours,
    pca_rgb,
)
from .prepare import PreparedImage, patch_features, prepare_images

__all__ = [
    "AttentionMaps",
    "PatchMatches",
    "Pca",
    "PcaPicture",
    "PreparedImage",
    "attention_figure",
    "attention_maps",
    "block_forward_with_attention",
    "fit_foreground_classifier",
    "fit_pca",
    "foreground_masks",
    "mass_mask",
    "match_features",
    "matches_figure",
    "match_patches",
    "mutual_nearest_neighbours",
    "patch_features",
    "pca_colours",
    "pca_figures",
    "pca_rgb",
    "prepare_images",
]
