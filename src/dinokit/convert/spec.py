"""What a converter needs to know about a backbone beyond its tensors: the architecture read from shapes.

Every filter in this package maps one flat state dict to another. The target formats also need a
config (Hugging Face ``config.json``, a timm model name), and the number of attention heads is the
one fact the tensors do not hold: it comes from the named architecture with the same width and
depth, from ``--model``, or defaults to 64-wide heads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from ..errors import DinokitError
from ..layers.swiglu_ffn import swiglu_hidden_features
from ..models.architectures import ARCHITECTURES, build_backbone
from ..models.checkpoint import describe_backbone_state_dict
from ..models.vision_transformer import DinoVisionTransformer

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BackboneSpec:
    """The constructor settings of a DINOv2 backbone, as far as any of the converted formats needs them."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    num_register_tokens: int = 0
    ffn_layer: str = "mlp"  # "mlp" or "swiglufused"
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layerscale: bool = True

    @property
    def arch(self) -> str | None:
        """The key of ``ARCHITECTURES`` with this width and depth, if any (``vit_small`` ...)."""
        for name, dims in ARCHITECTURES.items():
            if (dims["embed_dim"], dims["depth"]) == (self.embed_dim, self.depth):
                return name
        return None

    def backbone_kwargs(self) -> dict[str, Any]:
        """Constructor settings for :class:`DinoVisionTransformer`, with the released interpolation convention.

        Register models interpolate with ``size=`` and antialiasing, plain models with the 0.1 offset,
        as the official releases do.
        """
        interp = (
            dict(interpolate_antialias=True, interpolate_offset=0.0)
            if self.num_register_tokens
            else dict(interpolate_antialias=False, interpolate_offset=0.1)
        )
        return dict(
            embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, patch_size=self.patch_size,
            img_size=self.img_size, num_register_tokens=self.num_register_tokens, ffn_layer=self.ffn_layer,
            mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, init_values=1.0 if self.layerscale else None, **interp,
        )

    def build(self, **overrides: Any) -> DinoVisionTransformer:
        return DinoVisionTransformer(**{**self.backbone_kwargs(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heads_for(embed_dim: int, depth: int) -> int:
    """Attention heads: those of the named architecture of this size, else 64-wide heads."""
    for dims in ARCHITECTURES.values():
        if (dims["embed_dim"], dims["depth"]) == (embed_dim, depth):
            return int(dims["num_heads"])
    return max(1, embed_dim // 64)


def spec_from_state_dict(sd: Mapping[str, torch.Tensor], *, num_heads: int | None = None) -> BackboneSpec:
    """Read a :class:`BackboneSpec` from an official-layout backbone state dict."""
    info = describe_backbone_state_dict(sd)
    needed = ("embed_dim", "depth", "patch_size", "img_size", "ffn_layer")
    missing = [k for k in needed if k not in info]
    if missing:
        raise DinokitError(f"the weights are not a complete DINOv2 backbone (cannot read {', '.join(missing)})")
    dim = info["embed_dim"]
    if info["ffn_layer"] == "mlp":
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    else:
        hidden = sd["blocks.0.mlp.w3.weight"].shape[1]
        mlp_ratio = 4.0  # the official SwiGLU width: 2/3 of a ratio-4 MLP, rounded up to a multiple of 8
        if swiglu_hidden_features(int(dim * mlp_ratio)) != hidden:
            raise DinokitError(f"SwiGLU hidden width {hidden} is not the one of mlp_ratio 4 for width {dim}; cannot convert")
    return BackboneSpec(
        embed_dim=dim, depth=info["depth"], num_heads=num_heads or heads_for(dim, info["depth"]),
        patch_size=info["patch_size"], img_size=info["img_size"], num_register_tokens=info["num_register_tokens"],
        ffn_layer=info["ffn_layer"], mlp_ratio=float(mlp_ratio), qkv_bias="blocks.0.attn.qkv.bias" in sd,
        layerscale=info["layerscale"],
    )


def spec_from_model_name(name: str) -> BackboneSpec:
    """The spec of a hub name (``dinov2_vits14_reg``) or mmpretrain alias."""
    from ..models.registry import model_info

    info = model_info(name)
    kwargs = dict(info.kwargs)
    with torch.device("meta"):
        model = build_backbone(info.arch, **kwargs)
    return spec_from_state_dict(model.state_dict(), num_heads=model.num_heads)


def with_layerscale(sd: Mapping[str, torch.Tensor], spec: BackboneSpec) -> StateDict:
    """Add LayerScale gammas of ones (an exact identity) for formats whose blocks always have LayerScale."""
    out = dict(sd)
    if not spec.layerscale:
        for i in range(spec.depth):
            for name in ("ls1", "ls2"):
                out[f"blocks.{i}.{name}.gamma"] = torch.ones(spec.embed_dim, dtype=sd["cls_token"].dtype)
    return out
