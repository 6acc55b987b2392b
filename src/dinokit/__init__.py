"""dinokit: DINOv2 backbones, pretraining, evaluation and feature extraction in PyTorch."""

__version__ = "0.1.0"
