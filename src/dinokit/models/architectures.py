"""Named architectures (width, depth, heads) as in the official ``vit_*`` constructors, plus small ones.

The official constructors default to ``patch_size=16, img_size=224``; the released weights use patch
14 at 518 px. Callers pass what they need (the hub entry points pass the released settings).
"""

from __future__ import annotations

from typing import Any

from ..errors import DinokitError
from .vision_transformer import DinoVisionTransformer

# name -> (embed_dim, depth, num_heads, default ffn_layer)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "vit_pico": dict(embed_dim=64, depth=4, num_heads=4),  # for CPU demos and tests
    "vit_nano": dict(embed_dim=128, depth=6, num_heads=4),  # for CPU demos
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24),
    "vit_femto": dict(embed_dim=48, depth=3, num_heads=3),  # a CPU distillation student (under half of vit_pico)
}


def arch_dims(arch: Any, key: str = "architecture") -> dict[str, Any]:
    """Width, depth and heads of ``arch`` (an ``_memeff`` suffix is ignored); one line naming ``key`` if unknown."""
    name = arch.removesuffix("_memeff") if isinstance(arch, str) else None
    if name not in ARCHITECTURES:
        raise DinokitError(f"{key} is {arch!r}; use one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_backbone(arch: str, **kwargs: Any) -> DinoVisionTransformer:
    """Build ``arch`` (a key of :data:`ARCHITECTURES`; an ``_memeff`` suffix is ignored) with ``kwargs``.

    The official ``block_chunks`` (how its FSDP wrapped the blocks; the official ``build_model`` always passes it)
    is taken and changes nothing: the blocks are one flat list here, and chunked checkpoints load into it."""
    kwargs.pop("block_chunks", None)
    params = {"patch_size": 16, "img_size": 224, "mlp_ratio": 4.0, **arch_dims(arch), **kwargs}
    return DinoVisionTransformer(**params)


def vit_small(**kwargs: Any) -> DinoVisionTransformer:
    return build_backbone("vit_small", **kwargs)


def vit_base(**kwargs: Any) -> DinoVisionTransformer:
    return build_backbone("vit_base", **kwargs)


def vit_large(**kwargs: Any) -> DinoVisionTransformer:
    return build_backbone("vit_large", **kwargs)


def vit_giant2(**kwargs: Any) -> DinoVisionTransformer:
    return build_backbone("vit_giant2", **kwargs)
