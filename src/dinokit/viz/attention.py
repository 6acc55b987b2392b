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

from ..errors import ModelInputError
from ..models.inputs import is_whole_number
from .prepare import DEFAULT_IMAGE_SIZE, ImageLike, PreparedImage, prepare_images, run_batched

DEFAULT_KEEP_MASS = 0.6  # DINO v1's choice
_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


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


def resolve_block(model: nn.Module, block: int, option: str = "--block") -> int:
    """The index in ``model.blocks`` of ``block`` (negative: from the end), or a one-line error naming the range.

    ``option`` names the setting in the message: ``--block`` (a command's option) or ``block`` (an argument)."""
    depth = len(model.blocks)
    given = f"{option} {block!r}" if option.startswith("-") else f"{option}={block!r}"
    if not is_whole_number(block):
        raise ModelInputError(f"{given} is not a block index: give a whole number in -{depth}..{depth - 1} "
                           "(negative counts from the end)")
    index = int(block) + depth if block < 0 else int(block)
    if not 0 <= index < depth:
        raise ModelInputError(f"{given} is out of range: the model has {depth} blocks; give -{depth}..{depth - 1} "
                           "(negative counts from the end)")
    return index


def _check_options(model: nn.Module, *, image_size: int | None, batch_size: int, device: object,
                   dtype: object) -> None:
    """One line for an argument of :func:`attention_maps` it cannot use (before any image is read)."""
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList) or not hasattr(model, "prepare_tokens_with_masks"):
        raise ModelInputError(f"attention_maps needs a dinokit ViT backbone, got a {type(model).__name__}; pass the "
                           "backbone itself (e.g. model.backbone of a classifier or dense model)")
    if image_size is not None and (not is_whole_number(image_size) or image_size < model.patch_size):
        raise ModelInputError(f"image_size={image_size!r} is not usable: give the short side in pixels, a whole number "
                           f">= the patch size {model.patch_size} (e.g. {DEFAULT_IMAGE_SIZE}), or None to keep it")
    if not is_whole_number(batch_size) or batch_size < 1:
        raise ModelInputError(f"batch_size={batch_size!r} is not usable: give a whole number >= 1")
    if dtype not in _DTYPES:
        raise ModelInputError(f"dtype={dtype!r} is not usable: give torch.bfloat16, torch.float16, torch.float32 "
                           "or None (the model's precision)")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise ModelInputError(f"device={device!r} is not a device: give e.g. 'cpu', 'cuda' or 'cuda:1'") from None


def cls_attention_and_norms(model: nn.Module, batch: torch.Tensor, *, block: int = -1) -> dict[str, torch.Tensor]:
    """For a (B, 3, H, W) batch: ``attention`` (B, heads, h, w), the class token's attention to the
    patches in ``block``; ``patch_norms`` (B, h, w), the output patch tokens' norms before the final norm."""
    index = resolve_block(model, block, "block")
    if hasattr(model, "check_images"):
        model.check_images(batch)  # one line for a wrong shape, dtype or device
    x = model.crop_to_patch_multiple(batch)
    h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    first_patch = 1 + model.num_register_tokens  # tokens are [cls, registers, patches]
    x = model.prepare_tokens_with_masks(x)
    for i, blk in enumerate(model.blocks):
        if i == index:
            x, weights = block_forward_with_attention(blk, x)
        else:
            x = blk(x)
    # (B, heads, h*w): CLS query, patch keys; a copy, not a view keeping the whole (B, heads, T, T) matrix alive
    attention = weights[:, :, 0, first_patch:].clone()
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
    skip_unreadable: bool = True,
) -> AttentionMaps:
    """The class token's attention per head in ``block`` (default: the last) and the patch-norm map. An unreadable
    or too elongated image is skipped with a warning (``skip_unreadable=False``: its one error line)."""
    _check_options(model, image_size=image_size, batch_size=batch_size, device=device, dtype=dtype)
    resolve_block(model, block, "block")  # a one-line error before any work
    prepared = prepare_images(model, images, image_size=image_size, skip_unreadable=skip_unreadable)

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
