"""dinokit: DINOv2 backbones, pretraining, evaluation and feature extraction in PyTorch."""

__version__ = "0.1.0"

from .models import create_model, list_models, load_backbone_weights  # noqa: E402

__all__ = ["__version__", "create_model", "list_models", "load_backbone_weights"]
