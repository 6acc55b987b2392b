"""Patch embedding: a strided convolution turning (B, 3, H, W) images into (B, N, D) tokens."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = patch size, then flatten to tokens (official key ``patch_embed.proj``);
    ``flatten_embedding=False`` keeps the grid: (B, H/p, W/p, D), as the official option."""

    def __init__(self, *, img_size: int = 224, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768,
                 flatten_embedding: bool = True) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.patches_resolution = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        if not self.flatten_embedding:
            return x.permute(0, 2, 3, 1)  # (B, H/p, W/p, D)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), row-major over the patch grid
