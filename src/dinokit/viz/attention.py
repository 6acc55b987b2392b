"""Attention maps of the class token, and patch-token norms, for pictures only.

The model's attention runs through ``scaled_dot_product_attention``, which never materialises the
attention weights. To draw them, one block is recomputed here from its own weights with an explicit
``softmax(q k^T / sqrt(d))``; the model and its normal forward are untouched. The other blocks run as
usual.

Maps are the class token's row (query = CLS) over the patch columns, one per head; register tokens are
left out of the columns. "Keep a fraction of the mass" masks follow DINO v1: per head, the smallest set
of patches that holds that fraction of the attention. The patch-norm map shows the norms of the last
block's output patch tokens (before the final norm): without registers, large models put a few
high-norm "artefact" tokens in uninformative background, the tokens that registers were added to absorb.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import DinokitError
from .prepare import DEFAULT_IMAGE_SIZE, ImageLike, PreparedImage, prepare_images, run_batched

DEFAULT_KEEP_MASS = 0.6  # DINO v1's choice


def block_forward_with_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``block(x)`` in eval mode, with the attention weights (B, heads, T, T) computed explicitly.

    Same parameters and order as the block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.
    The softmax runs in float32 whatever the autocast dtype.
    """
    attn = block.attn
    b, t, d = x.shape
    # (B, T, 3D) -> (3, B, heads, T, head_dim)
    qkv = attn.qkv(block.norm1(x)).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    with torch.autocast(x.device.type, enabled=False):  # logits and softmax in float32 under any autocast
        weights = torch.softmax((q.float() * attn.scale) @ k.float().transpose(-2, -1), dim=-1)  # (B, heads, T, T)
    mixed = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(b, t, d)  # (B, T, D)
    x = x + block.ls1(attn.proj(mixed))
    x = x + block.ls2(block.mlp(block.norm2(x)))
    return x, weights


def resolve_block(model: nn.Module, block: int) -> int:
    """The index in ``model.blocks`` of ``block`` (negative: from the end), or a one-line error naming the range."""
    depth = len(model.blocks)
    index = block + depth if block < 0 else block
    if not 0 <= index < depth:
        raise DinokitError(f"--block {block} is out of range: the model has {depth} blocks; give -{depth}..{depth - 1} "
                           "(negative counts from the end)")
    return index


def cls_attention_and_norms(model: nn.Module, batch: torch.Tensor, *, block: int = -1) -> dict[str, torch.Tensor]:
    """For a (B, 3, H, W) batch: ``attention`` (B, heads, h, w), the class token's attention to the
    patches in ``block``; ``patch_norms`` (B, h, w), the output patch tokens' norms before the final norm."""
    index = resolve_block(model, block)
    x = model.crop_to_patch_multiple(batch)
    h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    first_patch = 1 + model.num_register_tokens  # tokens are [cls, registers, patches]
    x = model.prepare_tokens_with_masks(x)
    for i, blk in enumerate(model.blocks):
        if i == index:
            x, weights = block_forward_with_attention(blk, x)
        else:
            x = blk(x)
    attention = weights[:, :, 0, first_patch:]  # (B, heads, h*w): CLS query, patch keys
    norms = x[:, first_patch:].float().norm(dim=-1)  # (B, h*w)
    return {"attention": attention.reshape(len(x), -1, h, w), "patch_norms": norms.reshape(len(x), h, w)}


@dataclass
class AttentionMaps:
    """Per image, at patch resolution."""

    attention: list[np.ndarray]
    """(heads, h, w) float32: each head's CLS attention over the patches (registers excluded)."""
    patch_norms: list[np.ndarray]
    """(h, w) float32: norms of the last block's output patch tokens."""
    images: list[PreparedImage]
    """The inputs as the model saw them (``pixels`` for drawing)."""


def attention_maps(
    model: nn.Module,
    images: ImageLike | Sequence[ImageLike],
    *,
    block: int = -1,
    image_size: int | None = DEFAULT_IMAGE_SIZE,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> AttentionMaps:
    """The class token's attention per head in ``block`` (default: the last) and the patch-norm map."""
    prepared = prepare_images(model, images, image_size=image_size)
    resolve_block(model, block)  # a one-line error before any work

    def fn(m: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return cls_attention_and_norms(m, batch, block=block)

    out = run_batched(model, prepared, fn, batch_size=batch_size, device=device, dtype=dtype)
    return AttentionMaps(
        attention=[o["attention"].numpy() for o in out],
        patch_norms=[o["patch_norms"].numpy() for o in out],
        images=prepared,
    )


def mass_mask(attention: np.ndarray | torch.Tensor, keep: float = DEFAULT_KEEP_MASS) -> np.ndarray:
    """Per map (the last two axes), the patches that together hold ``keep`` of the attention mass.

    DINO v1's rule: sort ascending, normalise to sum 1, cumulate, keep where the sum exceeds 1 - keep.
    """
    a = torch.as_tensor(np.asarray(attention), dtype=torch.float64)
    flat = a.reshape(*a.shape[:-2], -1)  # (..., h*w)
    values, order = torch.sort(flat, dim=-1)
    cumulative = torch.cumsum(values / values.sum(-1, keepdim=True).clamp_min(1e-30), dim=-1)
    keep_sorted = cumulative > 1 - keep
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return mask.reshape(a.shape).numpy()
