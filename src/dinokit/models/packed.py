"""Packed multi-crop forward: all crop sets (e.g. global and local crops) through each block in one pass.

:meth:`DinoVisionTransformer.forward_features_list` runs every block once per crop set. Here the
token-wise work of a block (LayerNorms, the qkv and output projections, the MLP, LayerScale, the
residual adds) runs once on the concatenation of every set's tokens, ``(T, D)`` with
``T = sum_i B_i * N_i``: fewer, larger matrix products. Attention stays block-diagonal, each crop
attending only to its own tokens: one ``scaled_dot_product_attention`` per crop size on a view of
the packed qkv, or one ``flex_attention`` call with a block-diagonal mask over all crops. The results equal the per-set forwards (same modules, same weights; fp32 differences
are rounding only), so this is a drop-in for ``forward_features_list`` that leaves the model untouched.

Stochastic depth follows the block's own rules per crop set: the batch-subset form draws a subset
of each set's samples (the subsets of all sets then go through the branch together), the classic form
a per-sample mask. The random draws happen in a different order than in the per-set forward, so
training-mode outputs have the same distribution, not the same values.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.block import Block
from ..layers.layer_scale import LayerScale
from .inputs import check_crop_sets
from .vision_transformer import DinoVisionTransformer, FeatureDict

Shapes = list[tuple[int, int]]  # (B_i, N_i) of each crop set, in packing order


def _split(flat: torch.Tensor, shapes: Shapes) -> list[torch.Tensor]:
    """(T, D) -> [(B_i, N_i, D)] views."""
    chunks = flat.split([b * n for b, n in shapes])
    return [chunk.view(b, n, -1) for chunk, (b, n) in zip(chunks, shapes)]


def crop_block_mask(shapes: Shapes, device: torch.device | str):
    """The ``flex_attention`` block mask of packed crops: token i attends to token j iff they share a crop."""
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.tensor([n for b, n in shapes for _ in range(b)], device=device)
    crop_of = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)  # (T,) crop index

    def same_crop(batch, head, q_index, kv_index):
        return crop_of[q_index] == crop_of[kv_index]

    total = int(lengths.sum())
    return create_block_mask(same_crop, None, None, total, total, device=device)


def packed_attention(attn: nn.Module, flat: torch.Tensor, shapes: Shapes, block_mask=None) -> torch.Tensor:
    """The block's ``Attention`` on packed tokens (T, D), each crop attending to its own tokens only.

    Without ``block_mask``: one ``scaled_dot_product_attention`` per crop size. With the mask of
    :func:`crop_block_mask`: one ``flex_attention`` call over all T tokens (a single fused kernel
    under ``torch.compile``; in eager mode it materialises T x T scores, for tests only).
    """
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(flat)  # (T, 3D): one projection for every crop set
    dropout = attn.attn_drop if attn.training else 0.0
    if block_mask is not None:
        if dropout:
            raise ValueError("flex attention has no attention dropout; use attention='sdpa'")
        from torch.nn.attention.flex_attention import flex_attention

        # (T, 3D) -> (3, 1, heads, T, head_dim): all crops as one sequence, the mask keeps them apart
        q, k, v = qkv.reshape(1, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = flex_attention(q, k, v, block_mask=block_mask)  # (1, heads, T, head_dim)
        return attn.proj_drop(attn.proj(out[0].transpose(0, 1).reshape(-1, heads * head_dim)))
    outputs = []
    for chunk in _split(qkv, shapes):
        b, n, _ = chunk.shape
        # (B, N, 3D) -> (3, B, heads, N, head_dim), the layout of Attention.forward
        q, k, v = chunk.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, heads, N, head_dim)
        outputs.append(out.transpose(1, 2).reshape(b * n, heads * head_dim))
    return attn.proj_drop(attn.proj(torch.cat(outputs)))  # (T, D)


def _packed_residual(
    block: Block,
    flat: torch.Tensor,
    shapes: Shapes,
    branch: Callable[[torch.Tensor, Shapes], torch.Tensor],
    layer_scale: nn.Module,
) -> torch.Tensor:
    """``flat + drop_path(layer_scale(branch(flat)))`` with the block's stochastic depth applied per crop set."""
    rate = block.drop_path_rate if block.training else 0.0
    if rate > 0:  # crop sets: the batch-subset form at any rate, as forward_features_list
        # Batch-subset stochastic depth (layers/drop_path.py), per set; the kept samples of all sets run together.
        groups = _split(flat, shapes)
        picks = []
        for x in groups:
            subset = max(int(x.shape[0] * (1.0 - rate)), 1)
            picks.append(torch.randperm(x.shape[0], device=x.device)[:subset])
        sub_shapes = [(len(idx), x.shape[1]) for idx, x in zip(picks, groups)]
        sub_flat = torch.cat([x[idx].flatten(0, 1) for idx, x in zip(picks, groups)])  # (T_kept, D)
        residuals = _split(layer_scale(branch(sub_flat, sub_shapes)).to(flat.dtype), sub_shapes)
        out = [
            torch.index_add(x.flatten(1), 0, idx, r.flatten(1), alpha=x.shape[0] / len(idx)).view_as(x)
            for x, idx, r in zip(groups, picks, residuals)
        ]
        return torch.cat([x.flatten(0, 1) for x in out])
    y = branch(flat, shapes)
    # x + gamma * y in one kernel, as Block.forward does in evaluation
    return torch.addcmul(flat, y, layer_scale.gamma) if isinstance(layer_scale, LayerScale) else flat + layer_scale(y)


def packed_block(block: Block, flat: torch.Tensor, shapes: Shapes, block_mask=None) -> torch.Tensor:
    """One :class:`~dinokit.layers.block.Block` on packed tokens (T, D)."""

    def attention(x: torch.Tensor, s: Shapes) -> torch.Tensor:
        # The batch-subset drop path packs fewer crops: the full mask no longer fits, so it makes its own.
        mask = block_mask if s == shapes or block_mask is None else crop_block_mask(s, x.device)
        return packed_attention(block.attn, block.norm1(x), s, mask)

    flat = _packed_residual(block, flat, shapes, attention, block.ls1)
    return _packed_residual(block, flat, shapes, lambda x, s: block.mlp(block.norm2(x)), block.ls2)


def forward_features_packed(
    model: DinoVisionTransformer,
    x_list: Sequence[torch.Tensor],
    masks_list: Sequence[torch.Tensor | None] | None = None,
    *,
    attention: str = "sdpa",
    block_fn: Callable[..., torch.Tensor] = packed_block,
) -> list[FeatureDict]:
    """What ``model.forward_features_list(x_list, masks_list)`` returns, with the crop sets packed per block.

    ``attention``: ``"sdpa"`` (one attention call per crop size) or ``"flex"`` (one ``flex_attention``
    call over all crops with a block-diagonal mask; compile the caller for speed). ``block_fn``:
    :func:`packed_block` or a compiled version of it (``torch.compile(packed_block)``: one graph serves every
    block of the same structure), applied from outside as the per-block compile of the plain forward is.
    """
    if attention not in ("sdpa", "flex"):
        raise ValueError(f"unknown attention {attention!r}; use 'sdpa' or 'flex'")
    check_crop_sets(x_list, masks_list)
    masks_list = list(masks_list) if masks_list is not None else [None] * len(x_list)
    tokens = [model.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]  # [(B_i, N_i, D)]
    shapes = [(t.shape[0], t.shape[1]) for t in tokens]
    flat = torch.cat([t.flatten(0, 1) for t in tokens])  # (T, D)
    block_mask = crop_block_mask(shapes, flat.device) if attention == "flex" else None
    for block in model.blocks:
        flat = block_fn(block, flat, shapes, block_mask)
    return [model._output_dict(x, m) for x, m in zip(_split(flat, shapes), masks_list)]
