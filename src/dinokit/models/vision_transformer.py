"""The DINOv2 vision transformer: one implementation for every official variant and any training shape.

Parameter names and shapes are those of the official checkpoints (``cls_token``, ``pos_embed``,
``register_tokens``, ``mask_token``, ``patch_embed.proj``, ``blocks.N.*``, ``norm``), so the released
``*_pretrain.pth`` files load with strict key matching. This file holds architecture only:
activation checkpointing, compilation and sharding are applied from outside (``dinokit.distributed``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelInputError
from ..layers import Block, PatchEmbed
from .inputs import block_indices, check_crop_sets, check_images, check_masks, check_settings

FeatureDict = dict[str, torch.Tensor | None]
class DinoVisionTransformer(nn.Module):
    """Vision transformer with class token, optional register tokens and a learned position embedding.

    Inputs whose height or width is not a multiple of the patch size are centre-cropped to the
    closest smaller multiple (the official code raises an assertion instead).
    """

    def __init__(
        self,
        *,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = 1.0,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ) -> None:
        super().__init__()
        check_settings(dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, num_register_tokens=num_register_tokens,
                             drop_path_rate=drop_path_rate, mlp_ratio=mlp_ratio))
        self.embed_dim = self.num_features = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens > 0 else None
        )
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: works under `meta` too
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                ffn_layer=ffn_layer,
                drop_path=rates[i],
                init_values=init_values,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    # ------------------------------------------------------------------ initialisation
    def init_weights(self) -> None:
        """The official scheme: trunc-normal(0.02) Linears, tiny class/register tokens, zero mask token."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ tokens
    def crop_to_patch_multiple(self, x: torch.Tensor) -> torch.Tensor:
        """Centre-crop (B, C, H, W) so that H and W are multiples of the patch size."""
        p = self.patch_size
        h, w = x.shape[-2:]
        h2, w2 = h - h % p, w - w % p
        if h2 == 0 or w2 == 0:
            raise ModelInputError(f"input of size {h}x{w} is smaller than one {p}x{p} patch; give images of at least "
                                  f"{p} px per side")
        if (h2, w2) == (h, w):
            return x
        top, left = (h - h2) // 2, (w - w2) // 2
        return x[..., top : top + h2, left : left + w2]

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position embedding for an (h, w)-pixel image, interpolated exactly as the official code does.

        Non-zero ``interpolate_offset`` (plain models): bicubic with ``scale_factor=((h0+off)/M, (w0+off)/M)``,
        which PyTorch also uses for the source-coordinate mapping, so the values differ from ``size=``.
        Zero offset (register models): bicubic with ``size=(h0, w0)`` and ``antialias``. Computed at each call, as
        the official code and timm do: a cache keyed on the weights' version missed writes through ``.data`` (an EMA
        teacher's, in many training loops) and changes of the interpolation settings, and saved little (the
        interpolation takes about 0.1% of a ViT-L/14 forward on the CPU).
        """
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and h == w:
            return self.pos_embed
        h0, w0 = h // self.patch_size, w // self.patch_size
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        m = int(math.sqrt(n))
        if m * m != n:
            raise ValueError(f"pos_embed holds {n} patch positions, which is not a square grid")
        patch_pos = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        if self.interpolate_offset:
            sx = (h0 + self.interpolate_offset) / m
            sy = (w0 + self.interpolate_offset) / m
            kwargs = {"scale_factor": (sx, sy)}
        else:
            kwargs = {"size": (h0, w0)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.interpolate_antialias, **kwargs)
        assert patch_pos.shape[-2:] == (h0, w0)
        patch_pos = patch_pos.permute(0, 2, 3, 1).flatten(1, 2)  # (1, h0*w0, D)
        return torch.cat((cls_pos, patch_pos), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + R + N, D) tokens ordered [cls, registers, patches]."""
        x = self.crop_to_patch_multiple(x)
        b, _, h, w = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            # Masked patches take mask_token before the position embedding is added (official order).
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(b, -1, -1).to(x.dtype), x), dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1).to(x.dtype)
            x = torch.cat((x[:, :1], regs, x[:, 1:]), dim=1)  # registers get no position embedding
        return x

    # ------------------------------------------------------------------ input checks (shapes and dtypes only)
    def check_images(self, x: Any) -> None:
        """One line unless ``x`` is a (B, C, H, W) tensor of the model's dtype (or one autocast takes) and device."""
        check_images(x, self.patch_embed.proj.weight, self.patch_embed.in_chans)

    # ------------------------------------------------------------------ forward
    def _output_dict(self, x: torch.Tensor, masks: torch.Tensor | None) -> FeatureDict:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features_list(
        self, x_list: Sequence[torch.Tensor], masks_list: Sequence[torch.Tensor | None]
    ) -> list[FeatureDict]:
        """Several crop sets through the same blocks, block by block (each set independent; in training, each
        set's stochastic depth is the batch-subset form at any rate, as in the official nested forward)."""
        xs = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        for blk in self.blocks:
            xs = [blk(x, nested=True) for x in xs]
        return [self._output_dict(x, m) for x, m in zip(xs, masks_list)]

    def forward_features(
        self, x: torch.Tensor | Sequence[torch.Tensor], masks: torch.Tensor | Sequence | None = None
    ) -> FeatureDict | list[FeatureDict]:
        if isinstance(x, (list, tuple)):
            check_crop_sets(x, masks)
            masks_list = list(masks) if masks is not None else [None] * len(x)
            for crops, crop_masks in zip(x, masks_list):
                self.check_images(crops)
                check_masks(crops, crop_masks, self.patch_size)
            return self.forward_features_list(x, masks_list)
        self.check_images(x)
        check_masks(x, masks, self.patch_size)
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self._output_dict(x, masks)

    def forward(self, *args, is_training: bool = False, **kwargs):
        if not is_training and isinstance(args[0] if args else kwargs.get("x"), (list, tuple)):
            raise ModelInputError("a list of crop sets needs is_training=True (it returns their feature dicts); "
                                  "pass one (B, C, H, W) tensor for the class-token output")
        out = self.forward_features(*args, **kwargs)
        if is_training:
            return out
        return self.head(out["x_norm_clstoken"])

    # ------------------------------------------------------------------ intermediate layers
    def _block_indices(self, n: Any) -> list[int]:
        """The block indices ``n`` names (an int: the last ``n`` blocks; a sequence: those indices), sorted."""
        return block_indices(n, len(self.blocks))

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (or of the listed block indices), oldest first.

        Patch tokens drop the class and register tokens; ``norm`` applies the final LayerNorm;
        ``reshape`` gives (B, D, H/p, W/p) maps; ``return_class_token`` pairs each with its (B, D) CLS.
        """
        self.check_images(x)
        wanted = set(self._block_indices(n))
        h, w = self.crop_to_patch_multiple(x).shape[-2:]
        grid_h, grid_w = h // self.patch_size, w // self.patch_size
        x = self.prepare_tokens_with_masks(x)
        last = max(wanted)
        outputs = []
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = blk(x)
            if i in wanted:
                outputs.append(x)
        if norm:
            outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        patches = [o[:, 1 + self.num_register_tokens :] for o in outputs]
        if reshape:
            # (B, N, D) -> (B, D, H/p, W/p)
            patches = [p.reshape(p.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)
