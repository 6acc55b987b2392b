"""Weight conversion between the official DINOv2 layout and Hugging Face, timm and mmpretrain.

Each mapping is a ``state_dict -> state_dict`` filter (the models are never changed); nothing here
imports transformers, timm or mmpretrain.
"""

from .formats import SOURCE_LAYOUTS, TARGETS, convert_checkpoint, detect_layout, read_backbone, resolve_spec
from .hf import hf_config, hf_to_official, official_to_hf, read_hf_folder, save_hf_folder
from .mmpretrain import HeadlessClassifier, get_model, mmpretrain_to_official
from .spec import BackboneSpec, spec_from_model_name, spec_from_state_dict
from .timm import official_to_timm, timm_model_kwargs, timm_model_name, timm_to_official

__all__ = [
    "BackboneSpec",
    "HeadlessClassifier",
    "SOURCE_LAYOUTS",
    "TARGETS",
    "convert_checkpoint",
    "detect_layout",
    "get_model",
    "hf_config",
    "hf_to_official",
    "mmpretrain_to_official",
    "official_to_hf",
    "official_to_timm",
    "read_backbone",
    "read_hf_folder",
    "resolve_spec",
    "save_hf_folder",
    "spec_from_model_name",
    "spec_from_state_dict",
    "timm_model_kwargs",
    "timm_model_name",
    "timm_to_official",
]
