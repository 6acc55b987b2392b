"""dinokit: DINOv2 backbones, pretraining, evaluation and feature extraction in PyTorch."""

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "get_model", "list_models", "load_backbone_weights"]


def __getattr__(name: str):
    """``create_model``, ``list_models`` and ``load_backbone_weights``, imported on first use: ``import dinokit`` (and
    the ``dinokit`` command before it parses its line) does not load torch, so a Ctrl-C in those seconds is no
    traceback."""
    if name in ("create_model", "list_models", "load_backbone_weights"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'dinokit' has no attribute {name!r}")


def get_model(name: str, **kwargs):
    """mmpretrain's ``get_model`` for its DINOv2 names (``vit-small-p14_dinov2-pre_3rdparty`` ...): a module
    whose ``model(inputs)`` and ``model.extract_feat(inputs)`` return ``(normalised class token,)``.
    Other names are :func:`create_model`'s. See :func:`dinokit.convert.get_model`."""
    from .convert.mmpretrain import get_model as _get_model  # imported on use: `import dinokit` stays light

    return _get_model(name, **kwargs)
