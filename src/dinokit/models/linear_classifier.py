"""Linear classifiers on frozen backbone features, in the official hub layout (``*_lc`` models).

The feature layout is the one of the official linear evaluation and of the released heads:
the class tokens of the last ``layers`` blocks (oldest first, after the final norm), followed by
the mean of the last block's patch tokens (``avgpool``). ``layers=1`` gives ``2·D`` features,
``layers=4`` gives ``5·D``. The head is a bare ``nn.Linear`` whose state dict is exactly the
released ``*_linear_head.pth`` / ``*_linear4_head.pth`` file (``{"weight", "bias"}``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import DinokitError
from .weight_files import load_state_dict_file

# (patch tokens (B, N, D), class token (B, D)) per block, as returned by
# ``get_intermediate_layers(x, n, return_class_token=True)``.
Intermediates = Sequence[tuple[torch.Tensor, torch.Tensor]]


def linear_features_from_intermediates(
    intermediates: Intermediates, *, layers: int, avgpool: bool = True
) -> torch.Tensor:
    """Concatenate the CLS tokens of the last ``layers`` blocks (+ the last patch-token mean): (B, (layers+avgpool)·D).

    ``intermediates`` may hold more blocks than ``layers`` (compute n=4 once, derive n=1 and n=4).
    The result is fp32, like the official linear evaluation's inputs.
    """
    if not 1 <= layers <= len(intermediates):
        raise ValueError(f"layers={layers} needs between 1 and {len(intermediates)} intermediate outputs")
    cls_tokens, patch_mean = feature_parts(intermediates)
    return probe_input(cls_tokens, patch_mean, n_last_blocks=layers, avgpool=avgpool)


def feature_parts(intermediates: Intermediates) -> tuple[torch.Tensor, torch.Tensor]:
    """The class tokens of the given blocks (B, n, D), oldest first, and the last block's patch-token mean (B, D)."""
    cls_tokens = torch.stack([cls for _, cls in intermediates], dim=1)  # n x (B, D) -> (B, n, D)
    return cls_tokens, intermediates[-1][0].mean(dim=1)  # (B, N, D) -> (B, D)


def probe_input(cls_tokens: torch.Tensor, patch_mean: torch.Tensor, *, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """(B, n*D [+ D]) fp32 features of the official linear heads: the last ``n_last_blocks`` class tokens oldest
    first, then (``avgpool``) the patch-token mean. The one place this layout is written."""
    parts = [cls_tokens[:, -n_last_blocks:].flatten(1)]  # (B, n, D) -> (B, n*D)
    if avgpool:
        parts.append(patch_mean)
    return torch.cat(parts, dim=1).float()


def linear_features(backbone: nn.Module, x: torch.Tensor, *, layers: int = 4, avgpool: bool = True) -> torch.Tensor:
    """Features of the official linear heads for images ``x`` (B, 3, H, W): (B, (layers+avgpool)·D)."""
    intermediates = backbone.get_intermediate_layers(x, n=layers, return_class_token=True, norm=True)
    return linear_features_from_intermediates(intermediates, layers=layers, avgpool=avgpool)


class LinearClassifier(nn.Module):
    """``backbone`` + ``linear_head`` (an ``nn.Linear`` over :func:`linear_features`), as the official ``_lc`` models.

    The state dict is ``backbone.*`` plus ``linear_head.{weight,bias}``, so a released head file loads
    with ``model.linear_head.load_state_dict(torch.load(file))`` or :func:`load_linear_head`.
    """

    def __init__(self, backbone: nn.Module, *, layers: int = 4, num_classes: int = 1000) -> None:
        super().__init__()
        if layers < 1:
            raise DinokitError(f"layers={layers} must be at least 1 (the released heads use 1 or 4)")
        self.backbone = backbone
        self.layers = layers
        self.linear_head = nn.Linear((1 + layers) * backbone.embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = linear_features(self.backbone, x, layers=self.layers)  # fp32
        return self.linear_head(features.to(self.linear_head.weight.dtype))  # a model cast with .half(), .bfloat16()


def linear_head_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The flat ``{"weight", "bias"}`` of a head file; also accepts a ``linear_head.``-prefixed or wrapped one."""
    sd: Mapping[str, Any] = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(sd.get(key), Mapping):
            sd = sd[key]
    for prefix in ("linear_head.", "module.", "linear."):
        if f"{prefix}weight" in sd:
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


_EVAL_CLASSIFIER = re.compile(r"^(?:module\.)?classifiers_dict\.(classifier_\w+)\.linear\.(weight|bias)$")


def _linear_eval_classifier(sd: Mapping[str, Any], name: str | None, path: str | None) -> dict[str, torch.Tensor] | None:
    """One classifier of an official linear-evaluation checkpoint (``classifiers_dict.<name>.linear.*``, the grid of
    52), as a head: the one named, or the only one; None when ``sd`` is no such checkpoint."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        match = _EVAL_CLASSIFIER.match(key)
        if match and isinstance(value, torch.Tensor):
            found.setdefault(match.group(1), {})[match.group(2)] = value
    if not found:
        return None
    if name is None and len(found) == 1:
        name = next(iter(found))
    if name not in found:
        example = sorted(n for n in found if "_avgpool_True_" in n) or sorted(found)
        where = f"{path!r}" if path else "the state dict"
        how = f"name one after a '#', e.g. {path}#{example[0]}" if path else "pass one classifier's weight and bias"
        missing = f" (it has no {name!r})" if name else ""
        raise DinokitError(f"{where} holds the {len(found)} classifiers of an official linear evaluation{missing}; "
                           f"{how} (the _lc models take the avgpool_True ones)")
    return found[name]


def read_linear_head(weights: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Read a head file or URL (or take a state dict); check it is ``{"weight": (C, F), "bias": (C,)}``.

    An official linear-evaluation checkpoint (its ``classifiers_dict``) gives the classifier named after a ``#``
    (``model_final.pth#classifier_4_blocks_avgpool_True_lr_0_00100``), or its only one."""
    name = None
    if not isinstance(weights, Mapping) and "#" in str(weights) and not Path(weights).exists():
        weights, name = str(weights).rsplit("#", 1)
    raw = weights if isinstance(weights, Mapping) else load_state_dict_file(weights)
    source = "the state dict" if isinstance(weights, Mapping) else repr(str(weights))
    flat = raw["model"] if isinstance(raw.get("model"), Mapping) else raw
    path = None if isinstance(weights, Mapping) else str(weights)
    sd = _linear_eval_classifier(flat, name, path) or linear_head_state_dict(raw)
    if set(sd) != {"weight", "bias"} or sd["weight"].ndim != 2:
        found = ", ".join(list(sd)[:4]) or "nothing"
        raise DinokitError(f"{source} is not a linear head (expected the keys weight and bias, found {found})")
    return sd


def load_linear_head(model: LinearClassifier, weights: str | Path | Mapping[str, Any]) -> LinearClassifier:
    """Strictly load a head file into ``model.linear_head``; a size mismatch names the ``layers`` to use."""
    sd = read_linear_head(weights)
    want = tuple(model.linear_head.weight.shape)
    have = tuple(sd["weight"].shape)
    if have != want:
        dim = model.backbone.embed_dim
        hint = ""
        if have[1] % dim == 0 and have[1] // dim >= 2 and have[1] // dim - 1 != model.layers:
            hint = f": the file is for layers={have[1] // dim - 1}"
        elif have[0] != want[0] and have[1] == want[1]:
            hint = f": build with num_classes={have[0]}"
        raise DinokitError(
            f"linear head weight is {have} but the classifier expects {want} "
            f"(num_classes x (1 + layers={model.layers}) * embed_dim {dim}){hint}"
        )
    model.linear_head.load_state_dict(sd, strict=True)
    return model
