"""mmpretrain's DINOv2 checkpoints (``vit-*-p14_dinov2-pre_3rdparty``) and its headless classifier's calls.

mmpretrain stores the backbone of an ``ImageClassifier`` under ``backbone.`` with its own names:
``patch_embed.projection``, ``layers.i.ln1/ln2``, ``layers.i.attn.{qkv,proj}``, LayerScale as
``attn.gamma1.weight``/``ffn.gamma2.weight``, the MLP as ``ffn.layers.0.0``/``ffn.layers.1`` (SwiGLU:
``ffn.w12``/``ffn.w3``) and the final norm as ``ln1``; it has no ``mask_token`` (it becomes zeros).

:func:`get_model` returns a module called like mmpretrain's headless ``ImageClassifier``:
``model(inputs)`` and ``model.extract_feat(inputs)`` give a tuple holding the normalised class
token (B, D). mmpretrain resizes the position embedding with bicubic ``size=`` and no antialiasing
(not the official ``+0.1`` scale factor), and the wrapper's backbone does the same, so its outputs
are mmpretrain's at every input size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import DinokitError
from ..models.checkpoint import load_backbone_weights, unwrapped_tensors
from ..models.weight_files import load_state_dict_file
from ..models.registry import ALIASES, api_download_advice, create_model, model_info
from ..models.vision_transformer import DinoVisionTransformer
from .spec import StateDict

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "ln1": "norm1",
    "ln2": "norm2",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.proj",
    "ffn.layers.0.0": "mlp.fc1",
    "ffn.layers.1": "mlp.fc2",
    "ffn.w12": "mlp.w12",
    "ffn.w3": "mlp.w3",
}
_TOP_RENAMES = {
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "mask_token": "mask_token",
    "patch_embed.projection.weight": "patch_embed.proj.weight",
    "patch_embed.projection.bias": "patch_embed.proj.bias",
    "ln1.weight": "norm.weight",
    "ln1.bias": "norm.bias",
}
OUT_TYPES = ("cls_token", "featmap", "raw")


def _backbone_tensors(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    tensors = unwrapped_tensors(checkpoint)
    if any(k.startswith("backbone.") for k in tensors):
        tensors = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
    return tensors


def is_mmpretrain_state_dict(checkpoint: Mapping[str, Any]) -> bool:
    return "layers.0.ln1.weight" in _backbone_tensors(checkpoint)


def mmpretrain_to_official(checkpoint: Mapping[str, Any]) -> StateDict:
    """Filter an mmpretrain DINOv2 checkpoint (``{"state_dict": {"backbone.…"}}`` or flat) into the official layout."""
    out: StateDict = {}
    for key, value in _backbone_tensors(checkpoint).items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
            continue
        match = _LAYER.match(key)
        if match is None:
            raise DinokitError(f"unexpected key {key!r} in the mmpretrain checkpoint; expected a DINOv2 VisionTransformer")
        i, rest = match.groups()
        if rest == "attn.gamma1.weight":
            out[f"blocks.{i}.ls1.gamma"] = value
        elif rest == "ffn.gamma2.weight":
            out[f"blocks.{i}.ls2.gamma"] = value
        else:
            module, _, kind = rest.rpartition(".")
            if module not in _LAYER_RENAMES:
                raise DinokitError(f"unexpected key {key!r} in the mmpretrain checkpoint; expected a DINOv2 VisionTransformer")
            out[f"blocks.{i}.{_LAYER_RENAMES[module]}.{kind}"] = value
    if "cls_token" not in out:
        raise DinokitError("the mmpretrain checkpoint holds no backbone.cls_token; pass a vit-*-p14_dinov2 checkpoint")
    out.setdefault("mask_token", torch.zeros(1, out["cls_token"].shape[-1], dtype=out["cls_token"].dtype))
    return out


class HeadlessClassifier(nn.Module):
    """A DINOv2 backbone called as mmpretrain's headless ``ImageClassifier`` (no neck, no head).

    ``out_type``: ``cls_token`` (B, D), ``featmap`` (B, D, H/14, W/14) or ``raw`` (B, 1 + N, D), all after the
    final LayerNorm, each returned inside a one-element tuple as mmpretrain does.
    """

    def __init__(self, backbone: DinoVisionTransformer, *, out_type: str = "cls_token") -> None:
        super().__init__()
        if out_type not in OUT_TYPES:
            raise DinokitError(f"out_type {out_type!r} is not supported; use one of {', '.join(OUT_TYPES)}")
        self.backbone = backbone
        self.out_type = out_type

    def extract_feat(self, inputs: torch.Tensor, stage: str = "neck") -> tuple[torch.Tensor, ...]:
        feats = self.backbone.forward_features(inputs)
        if self.out_type == "cls_token":
            return (feats["x_norm_clstoken"],)
        if self.out_type == "raw":
            return (self.backbone.norm(feats["x_prenorm"]),)
        patches = feats["x_norm_patchtokens"]  # (B, h*w, D)
        h, w = (s // self.backbone.patch_size for s in self.backbone.crop_to_patch_multiple(inputs).shape[-2:])
        return (patches.reshape(patches.shape[0], h, w, -1).permute(0, 3, 1, 2),)  # (B, D, h, w)

    def forward(self, inputs: torch.Tensor, data_samples: Any = None, mode: str = "tensor") -> tuple[torch.Tensor, ...]:
        if mode != "tensor":
            raise DinokitError(f"the headless DINOv2 classifier has no head: mode={mode!r} is not available, use mode='tensor'")
        return self.extract_feat(inputs)


def get_model(
    name: str, *, pretrained: bool = False, weights: str | Path | Mapping[str, Any] | None = None, **kwargs: Any
) -> nn.Module:
    """mmpretrain's ``get_model`` for its DINOv2 names; other names are :func:`dinokit.create_model`'s.

    ``pretrained=True`` loads the official weights (the tensors mmpretrain's files were converted from);
    ``weights`` may be a file in the official, training or mmpretrain layout. ``out_type`` selects the output.
    """
    if name not in ALIASES:
        return create_model(name, pretrained=pretrained, weights=weights, **kwargs)
    out_type = kwargs.pop("out_type", "cls_token")
    info = model_info(name)
    # mmpretrain's resize_pos_embed: bicubic to size=(h, w), no antialiasing, no offset
    settings = {**info.kwargs, "interpolate_offset": 0.0, "interpolate_antialias": False, **kwargs}
    backbone = create_model(info.name, **settings)
    if weights is not None:
        checkpoint = weights if isinstance(weights, Mapping) else load_state_dict_file(weights)
        if is_mmpretrain_state_dict(checkpoint):
            checkpoint = mmpretrain_to_official(checkpoint)
        load_backbone_weights(backbone, checkpoint)
    elif pretrained:
        with api_download_advice("weights"):  # offline: the Python argument, not the commands' --weights
            load_backbone_weights(backbone, info.backbone_url)
    return HeadlessClassifier(backbone.eval(), out_type=out_type)
