"""Named models: the official hub variants (``dinov2_vit{s,b,l,g}14[_reg][_lc]``) and their aliases.

This file is variant metadata plus one factory, :func:`create_model`; the architecture lives in
``vision_transformer.py``. Every variant uses the released settings (img_size 518, patch 14,
LayerScale), so the official weights load with ``strict=True``:

* plain models interpolate the position embedding with ``scale_factor`` and offset 0.1;
* ``_reg`` models have 4 register tokens and use ``size=`` with antialiasing (offset 0);
* ViT-g uses the SwiGLU FFN (``mlp.w12``/``mlp.w3``);
* ``_lc`` models add a linear ImageNet-1k head over 1 or 4 blocks (:mod:`.linear_classifier`);
* ``_ld`` / ``_dd`` models add a linear / DPT depth head (NYU or KITTI), built by :mod:`dinokit.dense.hub`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..errors import ModelInputError
from .architectures import build_backbone
from .checkpoint import load_backbone_weights
from .inputs import is_whole_number
from .weight_files import COMMAND_LINE, DownloadError
from .linear_classifier import LinearClassifier, load_linear_head, read_linear_head
from .vision_transformer import DinoVisionTransformer

BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
# The official entry points also take ``weights="LVD142M"`` / ``"IMAGENET1K"`` (an enum); both mean "official".
OFFICIAL_WEIGHT_TAGS = ("LVD142M", "IMAGENET1K")
IMAGENET_CLASSES = 1000

_ARCH_BY_SIZE = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}
_RELEASED = dict(img_size=518, patch_size=14, init_values=1.0)
_PLAIN = dict(num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
_REGISTERS = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)


@dataclass(frozen=True)
class ModelInfo:
    """One named model: its architecture, constructor settings and official weight files."""

    name: str
    """Hub name, e.g. ``dinov2_vits14_reg`` or ``dinov2_vitb14_lc``."""
    arch: str
    """Key of :data:`dinokit.models.ARCHITECTURES` (``vit_small`` ...)."""
    kwargs: Mapping[str, Any] = field(repr=False)
    """Backbone constructor settings of the released weights."""
    backbone_url: str
    """Official backbone weights (``*_pretrain.pth``)."""
    head_urls: Mapping[int, str] = field(default_factory=dict, repr=False)
    """``_lc`` only: official head file per number of blocks (1 and 4)."""
    depth_head: str = ""
    """``ld`` (linear depth head) or ``dd`` (DPT depth head) for the depth models, else empty."""

    @property
    def is_classifier(self) -> bool:
        return bool(self.head_urls)

    @property
    def num_register_tokens(self) -> int:
        return int(self.kwargs["num_register_tokens"])


def _build_table() -> dict[str, ModelInfo]:
    table: dict[str, ModelInfo] = {}
    for lc in (False, True):
        for reg in (False, True):
            for size, arch in _ARCH_BY_SIZE.items():
                base = f"dinov2_vit{size}14"  # the weights folder, also for the register files
                stem = f"{base}_reg4" if reg else base
                name = base + ("_reg" if reg else "") + ("_lc" if lc else "")
                kwargs = {**_RELEASED, **(_REGISTERS if reg else _PLAIN)}
                if size == "g":
                    kwargs["ffn_layer"] = "swiglufused"
                heads = {n: f"{BASE_URL}/{base}/{stem}_linear{'4' if n == 4 else ''}_head.pth" for n in (1, 4)}
                table[name] = ModelInfo(
                    name=name,
                    arch=arch,
                    kwargs=kwargs,
                    backbone_url=f"{BASE_URL}/{base}/{stem}_pretrain.pth",
                    head_urls=heads if lc else {},
                )
    for size, arch in _ARCH_BY_SIZE.items():  # depth models: no register variants, as in the official hub
        base = f"dinov2_vit{size}14"
        for head in ("ld", "dd"):
            table[f"{base}_{head}"] = dataclasses.replace(table[base], name=f"{base}_{head}", depth_head=head)
    return table


MODELS: dict[str, ModelInfo] = _build_table()
# mmpretrain's names for the same released (non-register) backbones.
ALIASES: dict[str, str] = {
    "vit-small-p14_dinov2-pre_3rdparty": "dinov2_vits14",
    "vit-base-p14_dinov2-pre_3rdparty": "dinov2_vitb14",
    "vit-large-p14_dinov2-pre_3rdparty": "dinov2_vitl14",
    "vit-giant-p14_dinov2-pre_3rdparty": "dinov2_vitg14",
}


def list_models(*, include_aliases: bool = False) -> list[str]:
    """Names accepted by :func:`create_model` (hub names; with ``include_aliases`` also mmpretrain's)."""
    return list(MODELS) + (list(ALIASES) if include_aliases else [])


# official hub names that dinokit does not provide, and why (their entry points raise one line)
NOT_PROVIDED = {
    "dinov2_vitl14_reg4_dinotxt_tet1280d20h24l": "dino.txt, the official image-text model: its text encoder and "
    "vision head are not part of dinokit (its ViT-L/14 backbone is dinov2_vitl14_reg)",
}


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a hub name or alias; unknown names raise a :class:`~dinokit.errors.ModelInputError` with suggestions."""
    if not isinstance(name, str):
        raise ModelInputError(f"the model name must be a string such as 'dinov2_vits14', got {name!r}")
    canonical = ALIASES.get(name, name)
    if canonical in NOT_PROVIDED:
        raise ModelInputError(f"{name!r} is {NOT_PROVIDED[canonical]}; use the official repository for it")
    if canonical not in MODELS:
        close = difflib.get_close_matches(name, list_models(include_aliases=True), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run 'dinokit models' for the list"
        raise ModelInputError(f"unknown model {name!r}; {hint}")
    return MODELS[canonical]


@functools.lru_cache(maxsize=None)
def _backbone_size(name: str) -> tuple[int, int]:
    """(parameter count, embed_dim) of a named backbone, built on the meta device (no memory, no init cost)."""
    info = model_info(name)
    with torch.device("meta"):
        backbone = build_backbone(info.arch, **info.kwargs)
    return sum(p.numel() for p in backbone.parameters()), backbone.embed_dim


def count_parameters(name: str, *, layers: int = 4) -> int:
    """Parameter count of a named model, as in the official tables (``mask_token`` included)."""
    info = model_info(name)
    if info.depth_head:
        from ..dense.hub import count_depther_parameters

        return count_depther_parameters(info.name, layers=layers)
    n, dim = _backbone_size(info.name.removesuffix("_lc"))
    if info.is_classifier:
        n += (1 + layers) * dim * IMAGENET_CLASSES + IMAGENET_CLASSES
    return n


def _is_official_tag(weights: Any) -> bool:
    return isinstance(weights, str) and weights.upper() in OFFICIAL_WEIGHT_TAGS


def create_model(
    name: str,
    *,
    pretrained: bool | None = None,
    weights: str | Path | Mapping[str, Any] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a named model; ``weights`` (path, URL or state dict) or ``pretrained`` loads weights strictly.

    Backbones: ``weights`` is a backbone file in any supported layout; else ``pretrained=True``
    fetches the official file through torch.hub's cache (as does ``weights="LVD142M"``, the official tag, unless
    ``pretrained=False``); else random init. ``overrides`` replace
    constructor settings (e.g. ``img_size=224``, ``drop_path_rate=0.1``).

    ``_lc`` classifiers take ``layers`` (4 or 1), ``num_classes`` (default: from the head file, else
    1000), ``backbone_weights`` (a backbone file) and ``weights`` (the head file); with
    ``pretrained=True`` any file not given is the official one.
    """
    info = model_info(name)
    _check_overrides(info, overrides)
    if _is_official_tag(weights):  # official semantics: the tag names the official file; asking for it without
        weights, pretrained = None, pretrained is not False  # pretrained= means it (it gave random weights)
    pretrained = bool(pretrained)
    if info.is_classifier:
        return _create_classifier(info, pretrained=pretrained, head_weights=weights, **overrides)
    if info.depth_head:
        from ..dense.hub import create_depther  # backbone + depth head; weights = "NYU", "KITTI" or a head file

        return create_depther(info.name, pretrained=pretrained, weights=weights, **overrides)
    backbone = build_backbone(info.arch, **{**info.kwargs, **overrides})
    if weights is not None:
        load_backbone_weights(backbone, weights)
    elif pretrained:
        with api_download_advice("weights"):
            load_backbone_weights(backbone, info.backbone_url)
    return backbone


# keyword arguments of the classifiers and depthers besides the backbone settings
_HEAD_ARGUMENTS = {"classifier": ("layers", "num_classes", "backbone_weights"),
                   "depther": ("layers", "depth_range", "backbone_weights")}


def _check_overrides(info: ModelInfo, overrides: Mapping[str, Any]) -> None:
    """One line for a keyword argument that neither the model nor the backbone constructor takes."""
    kind = "classifier" if info.is_classifier else "depther" if info.depth_head else ""
    own = ["pretrained", "weights", *_HEAD_ARGUMENTS.get(kind, ())]
    settings = [k for k in inspect.signature(DinoVisionTransformer.__init__).parameters if k != "self"]
    unknown = [k for k in overrides if k not in own + settings]
    if unknown:
        close = difflib.get_close_matches(unknown[0], own + settings, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ModelInputError(f"{info.name} takes no argument {unknown[0]!r}; {hint}it takes {', '.join(own)} and the "
                           f"backbone settings ({', '.join(settings)})")


# set while a `dinokit` command runs (dinokit.cli): a failed download then keeps the commands' advice (--weights)


@contextlib.contextmanager
def api_download_advice(argument: str = "weights") -> Iterator[None]:
    """Reword a failed download of an official file for Python callers: the file goes to ``argument=FILE``.

    :func:`dinokit.models.weight_files.load_state_dict_file` advises the commands' ``--weights``; its first part
    ("could not download URL (reason)") is kept. The outermost use wins (a classifier's backbone is
    ``backbone_weights``, not the ``weights`` of the inner :func:`create_model` call).
    """
    try:
        yield
    except DownloadError as err:  # an outer use rewords an inner one's again: the outermost names the argument
        if COMMAND_LINE.get():  # a command's model: its options are the advice (the message as it was raised)
            raise
        raise DownloadError(err.url, err.reason, f"pass its local path with {argument}=FILE (command line: "
                            "--weights FILE), or build random weights with pretrained=False (--random-init)") from None


def _create_classifier(
    info: ModelInfo,
    *,
    pretrained: bool,
    head_weights: str | Path | Mapping[str, Any] | None,
    layers: int = 4,
    num_classes: int | None = None,
    backbone_weights: str | Path | Mapping[str, Any] | None = None,
    **overrides: Any,
) -> LinearClassifier:
    if not is_whole_number(layers) or layers not in info.head_urls:
        raise ModelInputError(f"{info.name} takes layers=1 or layers=4, not {layers!r}")
    if num_classes is not None and not (is_whole_number(num_classes) and num_classes >= 1):
        raise ModelInputError(f"num_classes={num_classes!r} is not usable: give a whole number >= 1")
    if head_weights is not None and not isinstance(head_weights, (str, os.PathLike, Mapping)):
        raise ModelInputError(f"weights={head_weights!r}: give a head file path, URL or state dict (or leave it out "
                              "for the official head)")
    head_sd = None
    if head_weights is not None:
        head_sd = read_linear_head(head_weights)
    elif pretrained:
        if num_classes not in (None, IMAGENET_CLASSES):
            raise ModelInputError(
                f"the official {info.name} head has {IMAGENET_CLASSES} classes, not {num_classes}; "
                "pass weights=HEAD_FILE or pretrained=False"
            )
        with api_download_advice("weights"):
            head_sd = read_linear_head(info.head_urls[layers])
    if num_classes is None:
        num_classes = int(head_sd["weight"].shape[0]) if head_sd is not None else IMAGENET_CLASSES
    backbone_name = info.name.removesuffix("_lc")
    with api_download_advice("backbone_weights"):
        backbone = create_model(backbone_name, pretrained=pretrained, weights=backbone_weights, **overrides)
    model = LinearClassifier(backbone, layers=layers, num_classes=num_classes)
    if head_sd is not None:
        load_linear_head(model, head_sd)
    return model


def hub_entry_point(name: str) -> Callable[..., nn.Module]:
    """The torch.hub function for ``name``: ``fn(*, pretrained=True, weights=None, **kwargs)``.

    Unlike :func:`create_model`, hub entry points default to the official weights, as the official ones do. A name
    of :data:`NOT_PROVIDED` gives an entry point that raises one line saying why.
    """
    if name in NOT_PROVIDED:
        def not_provided(*args: Any, **kwargs: Any) -> nn.Module:
            return model_info(name)  # raises: what the model is and where to find it

        not_provided.__name__ = not_provided.__qualname__ = name
        not_provided.__doc__ = f"Not provided by dinokit: {NOT_PROVIDED[name]}."
        return not_provided
    info = model_info(name)

    def entry_point(*, pretrained: bool = True, weights: Any = None, **kwargs: Any) -> nn.Module:
        return create_model(info.name, pretrained=pretrained, weights=weights, **kwargs)

    kind = "linear classifier (backbone + ImageNet-1k head)" if info.is_classifier else "backbone"
    if info.depth_head:
        kind = f"{'linear' if info.depth_head == 'ld' else 'DPT'} depther (backbone + depth head, weights NYU or KITTI)"
    entry_point.__name__ = entry_point.__qualname__ = info.name
    entry_point.__doc__ = (
        f"DINOv2 {info.arch} /14 {kind}{' with 4 registers' if info.num_register_tokens else ''}, "
        f"official weights {info.backbone_url}. See dinokit.models.create_model for the arguments."
    )
    return entry_point

