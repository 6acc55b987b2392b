"""The depth hub models ``dinov2_vit{s,b,l,g}14_ld`` (linear heads) and ``_dd`` (DPT heads).

Same arguments as the official entry points: ``layers`` (``_ld``: 4 or 1), ``pretrained``,
``weights`` ("NYU" or "KITTI", or a head file / URL / state dict) and ``depth_range``; plus
``backbone_weights`` (a local backbone file). The head files are the official ones,
``{BASE}/{name}/{name}_{nyu|kitti}_{linear|linear4|dpt}_head.pth``, loaded strictly.

What the official hub does, reproduced by default (``depth_range=None``):

* the linear heads are built with bins over 0.001-80 m whatever the weights (NYU included, whose depth
  range is 0.001-10 m), and the output is clamped to that range;
* the DPT heads use 0.001-10 m for NYU and untrained models, 0.001-80 m for KITTI.

Giving ``depth_range=(min, max)`` sets both heads' range (the official linear depthers ignore it).
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import ModelInputError
from ..models.inputs import is_whole_number
from ..models.registry import BASE_URL, api_download_advice, create_model
from .heads import DPTHead, FeatureSpec, LinearDepthHead, four_level_indices
from .loading import load_head
from .model import DenseModel

DATASETS = ("NYU", "KITTI")
OFFICIAL_LINEAR_RANGE = (0.001, 80.0)  # what the official _ld entry points build, for any weights


def depth_range_of(pretrained: bool, dataset: str | None) -> tuple[float, float]:
    """The official ``_get_depth_range``: (0.001, 80) for KITTI weights, else (0.001, 10)."""
    return (0.001, 80.0) if pretrained and dataset == "KITTI" else (0.001, 10.0)


def check_depth_range(depth_range: Any) -> tuple[float, float]:
    """``depth_range`` as (min, max) floats, or one line unless it is two finite numbers with 0 <= min < max."""
    pair = tuple(depth_range) if isinstance(depth_range, (tuple, list)) else ()
    numbers_ok = len(pair) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
    if not numbers_ok or not all(math.isfinite(v) for v in pair) or not 0 <= pair[0] < pair[1]:
        raise ModelInputError(f"depth_range={depth_range!r} is not usable: give (min, max) in metres with "
                           "0 <= min < max, e.g. (0.001, 10.0) for NYU or (0.001, 80.0) for KITTI")
    return float(pair[0]), float(pair[1])


def head_url(backbone_name: str, dataset: str, head: str) -> str:
    """Official head file URL; ``head`` is ``linear``, ``linear4`` or ``dpt``."""
    return f"{BASE_URL}/{backbone_name}/{backbone_name}_{dataset.lower()}_{head}_head.pth"


def create_depther(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | Path | Mapping[str, Any] | None = "NYU",
    layers: int = 4,
    depth_range: tuple[float, float] | None = None,
    backbone_weights: str | Path | Mapping[str, Any] | None = None,
    **overrides: Any,
) -> DenseModel:
    """Build ``dinov2_vit?14_ld`` or ``_dd``: a backbone plus its depth head, as the official hub does."""
    backbone_name, kind = name.rsplit("_", 1)
    if kind not in ("ld", "dd"):
        raise ModelInputError(f"{name} is not a depth model (names end in _ld or _dd)")
    dataset = None
    head_file = None
    if weights is None:
        dataset = "NYU"
    elif isinstance(weights, str) and weights.upper() in DATASETS:
        dataset = weights.upper()
    elif isinstance(weights, str) and weights.isalpha() and not Path(weights).exists():
        raise ModelInputError(f"weights={weights!r}: use 'NYU', 'KITTI' or a head file path")
    elif isinstance(weights, (str, os.PathLike, Mapping)):
        head_file = weights
    else:
        raise ModelInputError(f"weights={weights!r}: use 'NYU', 'KITTI', a head file path or a head state dict")
    whole = is_whole_number(layers)
    if kind == "ld" and not (whole and layers in (1, 4)):
        raise ModelInputError(f"{name} takes layers=1 or layers=4, not {layers!r}")
    if kind == "dd" and not (whole and layers == 4):
        raise ModelInputError(f"{name} reads 4 blocks (its DPT head has no layers option); leave layers out")
    if depth_range is not None:
        depth_range = check_depth_range(depth_range)

    with api_download_advice("backbone_weights"):
        backbone = create_model(backbone_name, pretrained=pretrained, weights=backbone_weights, **overrides)
    depth = len(backbone.blocks)
    if kind == "ld":
        low, high = depth_range if depth_range is not None else OFFICIAL_LINEAR_RANGE
        indices = four_level_indices(depth) if layers == 4 else (depth - 1,)
        head = LinearDepthHead(embed_dim=backbone.embed_dim, levels=len(indices), min_depth=low, max_depth=high)
        file_tag = "linear4" if layers == 4 else "linear"
    else:
        official = depth_range_of(pretrained or head_file is not None, dataset)
        low, high = depth_range if depth_range is not None else official
        indices = four_level_indices(depth)
        head = DPTHead(embed_dim=backbone.embed_dim, min_depth=low, max_depth=high)
        file_tag = "dpt"
    model = DenseModel(backbone, head, FeatureSpec(tuple(indices), norm=False, class_token=True))
    if head_file is not None:
        load_head(head, head_file)
    elif pretrained:
        with api_download_advice("weights"):
            load_head(head, head_url(backbone_name, dataset, file_tag))
    return model


def count_depther_parameters(name: str, *, layers: int = 4) -> int:
    """Parameters of a depth hub model (backbone + head), counted on the meta device."""
    import torch

    with torch.device("meta"):
        model = create_depther(name, pretrained=False, weights=None, layers=layers)
    return sum(p.numel() for p in model.parameters())
