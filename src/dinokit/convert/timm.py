"""Official DINOv2 layout <-> timm ``vit_*_patch14_dinov2`` / ``vit_*_patch14_reg4_dinov2``.

timm keeps the official block names (``blocks.i.attn.qkv``, ``ls1.gamma``, ``norm``) and differs in three
places: the SwiGLU projections are ``mlp.fc1``/``mlp.fc2`` (the same packed halves as ``w12``/``w3``),
``mask_token`` is not stored, and register models use timm's no-embed-class layout: ``reg_token``, the
class position added into ``cls_token``, and ``pos_embed`` without the class position. The way back
therefore yields ``mask_token`` zeros and, for register models, a zero class position with the sum in
``cls_token``: the same function, and bit-for-bit the same tensors when the original already had them so.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from ..errors import DinokitError
from ..layers.swiglu_ffn import swiglu_hidden_features
from .spec import BackboneSpec, StateDict, spec_from_state_dict, with_layerscale

_SIZE_NAMES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
_DEPTHS = {"small": 12, "base": 12, "large": 24, "giant": 40}


def is_timm_state_dict(sd: Mapping[str, Any]) -> bool:
    """timm's DINOv2 layout: official-looking blocks, no ``mask_token`` (or a ``reg_token``)."""
    return "reg_token" in sd or ("blocks.0.attn.qkv.weight" in sd and "cls_token" in sd and "mask_token" not in sd)


def official_to_timm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Filter an official backbone state dict into timm's layout (``strict=True`` loadable)."""
    out: StateDict = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue  # timm has no masked-image modelling: the token is not part of its model
        out[re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key))] = value
    if "register_tokens" in out:
        pos = out.pop("pos_embed")  # (1, 1 + N, D)
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]  # no-embed-class: the class position lives in the token
        out["pos_embed"] = pos[:, 1:]
    return out


def timm_to_official(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Filter a timm DINOv2 state dict into the official layout (``mask_token`` zeros; see the module notes)."""
    out: StateDict = {}
    swiglu = "blocks.0.mlp.fc1.weight" in sd and sd["blocks.0.mlp.fc1.weight"].shape[0] == 2 * sd["blocks.0.mlp.fc2.weight"].shape[1]
    for key, value in sd.items():
        if key.startswith(("head.", "fc_norm.", "norm_pre.")):
            if value.numel():
                raise DinokitError(f"the timm weights have a {key.split('.')[0]!r} layer, which a DINOv2 backbone has not")
            continue
        if swiglu:
            key = re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", key))
        out[key] = value
    if "reg_token" in out:
        pos = out.pop("pos_embed")  # (1, N, D)
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat((torch.zeros_like(pos[:, :1]), pos), dim=1)
    if "cls_token" not in out or "pos_embed" not in out:
        raise DinokitError("the timm weights lack cls_token or pos_embed; pass a vit_*_dinov2 state dict")
    out["mask_token"] = torch.zeros(1, out["cls_token"].shape[-1], dtype=out["cls_token"].dtype)
    return out


def timm_model_name(spec: BackboneSpec) -> str | None:
    """timm's name for this architecture (``vit_small_patch14_reg4_dinov2``), or None for other sizes."""
    size = _SIZE_NAMES.get(spec.embed_dim)
    if size is None or _DEPTHS[size] != spec.depth or spec.patch_size != 14 or spec.num_register_tokens not in (0, 4):
        return None
    return f"vit_{size}_patch14_{'reg4_' if spec.num_register_tokens else ''}dinov2"


def timm_model_kwargs(spec: BackboneSpec) -> dict[str, Any]:
    """``timm.models.vision_transformer.VisionTransformer`` arguments that fit these weights (any size).

    Pass ``dynamic_img_size=True`` as well to run at other resolutions (timm then resamples the position
    embedding with bicubic ``size=`` and antialiasing).
    """
    kwargs: dict[str, Any] = dict(
        img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=spec.qkv_bias, init_values=1e-5, num_classes=0,
    )
    if spec.num_register_tokens:
        kwargs.update(reg_tokens=spec.num_register_tokens, no_embed_class=True)
    if spec.ffn_layer != "mlp":
        from timm.layers import SwiGLUPacked

        hidden = swiglu_hidden_features(int(spec.embed_dim * spec.mlp_ratio))
        # timm's packed fc1 has 2 * hidden rows and takes int(embed_dim * mlp_ratio): +0.5 keeps int() off a rounding edge
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=(2 * hidden + 0.5) / spec.embed_dim)
    return kwargs


def timm_constructor(spec: BackboneSpec) -> str:
    """:func:`timm_model_kwargs` as a Python expression that builds the model (printed by ``dinokit convert``)."""
    def literal(key: str, value: Any) -> str:
        if key == "mlp_layer":  # SwiGLUPacked, a functools.partial: its public name
            return "timm.layers.SwiGLUPacked"
        return f"{value.__module__}.{value.__qualname__}" if isinstance(value, type) else repr(value)

    args = ", ".join(f"{k}={literal(k, v)}" for k, v in timm_model_kwargs(spec).items())
    return f"timm.models.vision_transformer.VisionTransformer({args})"


def official_to_timm_checked(sd: Mapping[str, torch.Tensor], spec: BackboneSpec | None = None) -> StateDict:
    """:func:`official_to_timm` after adding LayerScale ones to a backbone without LayerScale (timm's always has it)."""
    spec = spec or spec_from_state_dict(sd)
    return official_to_timm(with_layerscale(sd, spec))
