"""dinokit: DINOv2 backbones, pretraining, evaluation and feature extraction in PyTorch."""

__version__ = "0.1.0"

from .models import create_model, list_models, load_backbone_weights  # noqa: E402

__all__ = ["__version__", "create_model", "get_model", "list_models", "load_backbone_weights"]


def get_model(name: str, **kwargs):
    """mmpretrain's ``get_model`` for its DINOv2 names (``vit-small-p14_dinov2-pre_3rdparty`` ...): a module
    whose ``model(inputs)`` and ``model.extract_feat(inputs)`` return ``(normalised class token,)``.
    Other names are :func:`create_model`'s. See :func:`dinokit.convert.get_model`."""
    from .convert.mmpretrain import get_model as _get_model  # imported on use: `import dinokit` stays light

    return _get_model(name, **kwargs)
