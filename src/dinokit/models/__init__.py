"""Backbones: the DINOv2 vision transformer, its named architectures, hub variants and checkpoint I/O."""

from .vision_transformer import DinoVisionTransformer
from .architectures import ARCHITECTURES, build_backbone, vit_base, vit_giant2, vit_large, vit_small
from .checkpoint import backbone_state_dict_from_checkpoint, load_backbone_weights, save_backbone
from .weight_files import load_state_dict_file
from .linear_classifier import LinearClassifier, linear_features, linear_features_from_intermediates
from .registry import create_model, list_models, model_info

__all__ = [
    "ARCHITECTURES",
    "DinoVisionTransformer",
    "LinearClassifier",
    "backbone_state_dict_from_checkpoint",
    "build_backbone",
    "create_model",
    "linear_features",
    "linear_features_from_intermediates",
    "list_models",
    "load_backbone_weights",
    "load_state_dict_file",
    "model_info",
    "save_backbone",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
]
