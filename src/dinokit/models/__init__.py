"""Backbones: the DINOv2 vision transformer and its named architectures."""

from .vision_transformer import DinoVisionTransformer
from .architectures import ARCHITECTURES, build_backbone, vit_base, vit_giant2, vit_large, vit_small

__all__ = [
    "ARCHITECTURES",
    "DinoVisionTransformer",
    "build_backbone",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
]
