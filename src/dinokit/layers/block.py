"""Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(ffn(norm2(x)))``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import Attention
from .drop_path import DropPath, subset_residual
from .layer_scale import LayerScale
from .mlp import Mlp
from .swiglu_ffn import SwiGLUFFN

# Above this rate, training uses DINOv2's batch-subset stochastic depth (see drop_path.py); crop lists (the
# official nested forward) use it at any rate.
SUBSET_DROP_PATH_THRESHOLD = 0.1


def make_ffn(kind: str, dim: int, hidden: int, bias: bool, drop: float) -> nn.Module:
    """FFN by its official name: ``mlp``, ``swiglu``/``swiglufused`` (same module) or ``identity``."""
    if kind == "mlp":
        return Mlp(dim, hidden_features=hidden, bias=bias, drop=drop)
    if kind in ("swiglu", "swiglufused"):
        return SwiGLUFFN(dim, hidden_features=hidden, bias=bias)
    if kind == "identity":
        return nn.Identity()
    raise ValueError(f"unknown ffn_layer {kind!r}: use 'mlp', 'swiglu', 'swiglufused' or 'identity'")


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = make_ffn(ffn_layer, dim, int(dim * mlp_ratio), ffn_bias, 0.0)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path_rate = drop_path
        # The official block reuses drop_path1 for both branches (a FIXME there); each branch gets its own here.
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _residual(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], drop: nn.Module,
                  nested: bool) -> torch.Tensor:
        if nested or self.drop_path_rate > SUBSET_DROP_PATH_THRESHOLD:
            return subset_residual(x, branch, self.drop_path_rate)
        return x + drop(branch(x))

    @staticmethod
    def _add_scaled(x: torch.Tensor, y: torch.Tensor, ls: nn.Module) -> torch.Tensor:
        # x + gamma * y in one fused kernel (one pass over the activations instead of two)
        return torch.addcmul(x, y, ls.gamma) if isinstance(ls, LayerScale) else x + y

    def forward(self, x: torch.Tensor, *, nested: bool = False) -> torch.Tensor:
        """``nested``: ``x`` is one crop set of a list (the official nested forward), whose stochastic depth is the
        batch-subset form at any rate; a lone tensor takes it above 0.1 only, as in the official block."""
        if self.training and self.drop_path_rate > 0:
            x = self._residual(x, self._attn_branch, self.drop_path1, nested)
            return self._residual(x, self._ffn_branch, self.drop_path2, nested)
        x = self._add_scaled(x, self.attn(self.norm1(x)), self.ls1)
        return self._add_scaled(x, self.mlp(self.norm2(x)), self.ls2)
