"""Stochastic depth.

Two forms, both with the same expected residual:

* :class:`DropPath`: the classic per-sample Bernoulli(1 - p) mask, rescaled by 1/(1 - p).
* :func:`subset_residual`: DINOv2's "batch-subset" form, used for rates above 0.1, and at any rate for the crop
  sets of a multi-crop forward (the official nested forward). A random subset of
  exactly ``max(int(B * (1 - p)), 1)`` samples goes through the branch, and the result is added
  back scaled by ``B / subset``. It skips the branch's compute for the dropped samples, which makes
  heavily regularised training (p = 0.3-0.4) markedly cheaper. Shapes stay static (the subset size
  depends only on B), so it compiles.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


def subset_residual(
    x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], drop_prob: float
) -> torch.Tensor:
    """``x + branch(x)`` computed on a random subset of the batch, rescaled (batch-subset drop path)."""
    b = x.shape[0]
    subset = max(int(b * (1.0 - drop_prob)), 1)
    idx = torch.randperm(b, device=x.device)[:subset]
    residual = branch(x[idx])  # (subset, N, D)
    scale = b / subset
    # on (B, N, D) directly: the same sums as on flattened rows, and a new tensor rather than a view of one (FSDP2
    # warns about modules that return views: an in-place op on one would skip its pre-backward hook)
    return torch.index_add(x, 0, idx, residual.to(x.dtype), alpha=scale)
