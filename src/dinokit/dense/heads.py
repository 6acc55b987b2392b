"""Dense heads on frozen ViT features, with the parameter names of the released DINOv2 head files.

* :class:`LinearSegHead`: the mmseg ``BNHead`` of the linear / "ms" segmentation heads:
  levels resized to the first one, concatenated, (dropout), BatchNorm, 1x1 conv to the classes
  (``bn.*``, ``conv_seg.*``).
* :class:`LinearDepthHead`: the depth ``BNHead`` of the ``_ld`` hub models: each level's patch map
  concatenated with its CLS token broadcast over the grid (2·D channels), levels resized to 4x the
  first level's grid and concatenated, a 1x1 conv to 256 bins (``conv_depth.*``), AdaBins' linear
  normalisation ``relu + 0.1``, depth = Σ p · bin centre. With ``batch_norm=True, upsample=1,
  class_token=False`` it is DINOv3's linear depth head (``bn.*`` + ``conv_depth.*``: BatchNorm, 1x1 conv,
  depth at token resolution); :func:`bins_to_depth` holds DINOv3's bin options (log bins, softmax and
  sigmoid normalisations, 1-channel regression).
* :class:`DPTHead`: the DPT decoder of the ``_dd`` hub models (``reassemble_blocks``, ``convs``,
  ``fusion_blocks``, ``project``, ``conv_depth.head``).

Inputs are what :class:`FeatureSpec` asks the backbone for: a list of (B, D, h, w) maps (segmentation,
DINOv3's depth head) or of ((B, D, h, w), (B, D)) (patch map, CLS) pairs (DINOv2's depth heads), oldest block first. The official files
wrap these names in an mmcv ``{"state_dict": {"decode_head.<name>": ...}}``; :mod:`.loading` unwraps them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Level = tuple[torch.Tensor, torch.Tensor]  # ((B, D, h, w) patch map, (B, D) class token)

# 0-based block indices of the official 4-level depth heads ("layers=4"), by depth.
OFFICIAL_FOUR_LEVELS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}


def four_level_indices(depth: int) -> tuple[int, ...]:
    """The official 4-level block indices for a backbone of ``depth`` blocks (evenly spaced, ending at the last).

    ViT-S/B/L/g use the table above (ViT-L's [4, 11, 17, 23] is not evenly spaced; the paper says so);
    other depths take every ``depth/4``-th block, as the official 12- and 40-block choices do.
    """
    if depth in OFFICIAL_FOUR_LEVELS:
        return OFFICIAL_FOUR_LEVELS[depth]
    if depth < 4:
        return tuple(range(depth))
    step = depth / 4
    return tuple(int(round((k + 1) * step)) - 1 for k in range(4))


@dataclass(frozen=True)
class FeatureSpec:
    """What a head reads from the backbone's ``get_intermediate_layers``."""

    indices: tuple[int, ...]
    """0-based block indices, oldest first."""
    norm: bool
    """Apply the backbone's final LayerNorm (segmentation and DINOv3's depth heads: yes; DINOv2's depth heads: no)."""
    class_token: bool
    """Pass (patch map, CLS) pairs instead of patch maps (DINOv2's depth heads, segmentation with ``class_token``)."""


def _resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


# ---------------------------------------------------------------------------------------------- segmentation
class LinearSegHead(nn.Module):
    """mmseg ``BNHead``: resize-concat of the levels, dropout, BatchNorm, 1x1 conv (``bn``, ``conv_seg``).

    ``levels=1`` is the "linear" head (last block), ``levels=4`` the "ms" head (last 4 blocks).
    With ``class_token`` each level is [patch map, CLS broadcast] (2·D channels; DINOv3's ``use_cls_token``
    option; the released heads do not use it). Logits are at the first level's grid: (B, num_classes, h, w).
    Dropout comes before the BatchNorm, as in DINOv3's ``LinearHead`` (Dropout2d -> BN -> conv; mmseg drops out
    after the BN, but the released DINOv2 heads use no dropout): in training the BN statistics are those of the
    dropped-out features; in eval mode dropout is the identity, so the order does not change a head's predictions.
    """

    def __init__(
        self, *, embed_dim: int, levels: int = 1, num_classes: int = 150, dropout: float = 0.0, class_token: bool = False
    ) -> None:
        super().__init__()
        self.embed_dim, self.levels, self.num_classes, self.class_token = embed_dim, levels, num_classes, class_token
        channels = embed_dim * levels * (2 if class_token else 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()  # no parameters: keys unchanged
        self.bn = nn.BatchNorm2d(channels)  # SyncBatchNorm in the official runs: the same state-dict keys
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's cls_seg init
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor] | Sequence[Level]) -> torch.Tensor:
        if self.class_token:
            features = [torch.cat((p, c[:, :, None, None].expand_as(p)), dim=1) for p, c in features]
        size = features[0].shape[-2:]
        x = torch.cat([_resize(f, size) for f in features], dim=1)  # L x (B, D, h, w) -> (B, L·D, h, w)
        return self.conv_seg(self.bn(self.dropout(x)))


# ---------------------------------------------------------------------------------------------- linear depth
BIN_SPACINGS = ("linear", "log")
BIN_NORMS = ("linear", "softmax", "sigmoid")


def check_bin_options(bins: str, norm: str, min_depth: float) -> None:
    """ValueError naming the first unknown bin option (log bins need ``min_depth > 0``)."""
    if bins not in BIN_SPACINGS:
        raise ValueError(f"unknown bin spacing {bins!r}; use linear or log")
    if norm not in BIN_NORMS:
        raise ValueError(f"unknown bin normalisation {norm!r}; use linear, softmax or sigmoid")
    if bins == "log" and not min_depth > 0:
        raise ValueError(f"log bins need min_depth > 0, got {min_depth}")


def bin_centres(min_depth: float, max_depth: float, n_bins: int, *, bins: str = "linear",
                dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """K depth bin centres over [min, max]: ``linear`` = linspace(min, max, K), ``log`` = exp(linspace(log min, log max, K))."""
    if bins == "log":
        return torch.linspace(math.log(min_depth), math.log(max_depth), n_bins, dtype=dtype, device=device).exp()
    return torch.linspace(min_depth, max_depth, n_bins, dtype=dtype, device=device)


def bins_to_depth(logits: torch.Tensor, min_depth: float, max_depth: float, *, norm: str = "linear",
                  bins: str = "linear") -> torch.Tensor:
    """(B, K, h, w) bin logits -> (B, 1, h, w) depth: Σ p_k · c_k over the K :func:`bin_centres` (DINOv3's
    ``FeaturesToDepth``); one channel (K = 1) is a regression, depth = relu(x) + min_depth.

    ``norm``: ``"linear"`` is AdaBins' p = (relu(x) + 0.1) / Σ(relu(x) + 0.1), ``"softmax"`` p = softmax(x),
    ``"sigmoid"`` p = sigmoid(x) / Σ sigmoid(x).
    """
    if logits.shape[1] == 1:
        return torch.relu(logits) + min_depth
    check_bin_options(bins, norm, min_depth)
    centres = bin_centres(min_depth, max_depth, logits.shape[1], bins=bins, dtype=logits.dtype, device=logits.device)
    if norm == "linear":
        weights = torch.relu(logits) + 0.1
    elif norm == "softmax":
        weights = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    else:
        weights = torch.sigmoid(logits)
    # Σ_k (w_k / Σ w) c_k as one 1x1 convolution over the bins divided by Σ w: no (B, K, H, W) probability copy
    return F.conv2d(weights, centres.view(1, -1, 1, 1)) / weights.sum(dim=1, keepdim=True)


class LinearDepthHead(nn.Module):
    """Linear depth head: the depth ``BNHead`` of the ``_ld`` models by default, DINOv3's ``LinearHead`` as an option.

    * default (DINOv2): [patch, CLS] per level, x4 bilinear, concat, 1x1 conv to bins (``conv_depth.*``); output
      (B, 1, 4h, 4w) in metres. The official hub builds it with ``min_depth=0.001, max_depth=80`` whatever the
      weights; the head itself takes any range.
    * ``batch_norm=True, upsample=1, class_token=False`` (DINOv3): patch maps only (the backbone's final norm
      applied, see :class:`FeatureSpec`), levels resized to the first one's grid and concatenated, BatchNorm
      (``bn.*``), 1x1 conv (weight N(0, 0.01), bias 0); depth is formed at token resolution, (B, 1, h, w), and
      resized bilinearly to the target by the caller.

    ``n_bins``, ``bins`` and ``norm`` are :func:`bins_to_depth`'s options (``n_bins=1``: regression).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        levels: int = 4,
        n_bins: int = 256,
        min_depth: float = 0.001,
        max_depth: float = 10.0,
        upsample: int = 4,
        norm: str = "linear",
        bins: str = "linear",
        batch_norm: bool = False,
        class_token: bool = True,
    ) -> None:
        super().__init__()
        check_bin_options(bins, norm, min_depth)
        self.embed_dim, self.levels, self.n_bins = embed_dim, levels, n_bins
        self.min_depth, self.max_depth, self.upsample, self.norm = float(min_depth), float(max_depth), upsample, norm
        self.bins, self.batch_norm, self.class_token = bins, batch_norm, class_token
        channels = embed_dim * levels * (2 if class_token else 1)
        self.bn = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()  # Identity: no keys (DINOv2's layout)
        self.conv_depth = nn.Conv2d(channels, n_bins, kernel_size=1)
        if batch_norm:  # DINOv3's LinearHead init
            nn.init.normal_(self.conv_depth.weight, std=0.01)
            nn.init.zeros_(self.conv_depth.bias)

    def forward(self, features: Sequence[Level] | Sequence[torch.Tensor]) -> torch.Tensor:
        if self.class_token:
            maps = [torch.cat((p, c[:, :, None, None].expand_as(p)), dim=1) for p, c in features]  # (B, 2D, h, w)
        else:
            maps = list(features)
        h, w = maps[0].shape[-2:]
        size = (h * self.upsample, w * self.upsample)
        if self.batch_norm or all(m.shape[-2:] == (h, w) for m in maps):
            # Bilinear resizing mixes neighbours with weights summing to 1, so it commutes with the 1x1 conv
            # (bias included): convolve at token resolution, then resize the K bin maps (upsample² x fewer MACs).
            x = torch.cat([_resize(m, (h, w)) for m in maps], dim=1)
            logits = _resize(self.conv_depth(self.bn(x)), size)  # (B, C, h, w) -> (B, K, 4h, 4w)
        else:
            logits = self.conv_depth(torch.cat([_resize(m, size) for m in maps], dim=1))  # (B, 2DL, 4h, 4w) -> (B, K, ..)
        return bins_to_depth(logits, self.min_depth, self.max_depth, norm=self.norm, bins=self.bins)


# ---------------------------------------------------------------------------------------------- DPT
class ConvUnit(nn.Module):
    """A convolution stored as ``<name>.conv`` (mmcv ``ConvModule`` layout), optionally followed by ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int, *, bias: bool = True, relu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return torch.relu(x) if self.relu else x


class ReassembleBlocks(nn.Module):
    """Per level: readout projection of [patch, CLS] (Linear 2D -> D + GELU), 1x1 conv, resize x4/x2/x1/x0.5."""

    def __init__(self, embed_dim: int, out_channels: Sequence[int]) -> None:
        super().__init__()
        self.readout_projects = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU()) for _ in out_channels
        )
        self.projects = nn.ModuleList(ConvUnit(embed_dim, c, 1) for c in out_channels)
        c0, c1, _, c3 = out_channels
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c0, c0, kernel_size=4, stride=4),
            nn.ConvTranspose2d(c1, c1, kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),
        ])

    def forward(self, features: Sequence[Level]) -> list[torch.Tensor]:
        out = []
        for i, (x, cls) in enumerate(features):
            b, d, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, hw, D)
            tokens = self.readout_projects[i](torch.cat((tokens, cls[:, None].expand_as(tokens)), dim=-1))
            x = tokens.transpose(1, 2).reshape(b, d, h, w)  # (B, hw, D) -> (B, D, h, w)
            out.append(self.resize_layers[i](self.projects[i](x)))
        return out


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv2(relu(conv1(relu(x)))), 3x3 convs without bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvUnit(channels, channels, 3, bias=False)
        self.conv2 = ConvUnit(channels, channels, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class FeatureFusionBlock(nn.Module):
    """(x [+ unit1(skip)]) -> unit2 -> x2 bilinear (align_corners) -> 1x1 conv. The first block has no skip."""

    def __init__(self, channels: int, *, with_skip: bool = True) -> None:
        super().__init__()
        self.project = ConvUnit(channels, channels, 1)
        self.res_conv_unit1 = ResidualConvUnit(channels) if with_skip else None
        self.res_conv_unit2 = ResidualConvUnit(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.res_conv_unit1(_resize(skip, x.shape[-2:]))
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class DepthOutput(nn.Module):
    """``conv_depth.head``: conv3x3 -> C/2, x2 bilinear (align_corners), conv3x3 -> 32, ReLU, conv1x1 -> 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(channels // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class DPTHead(nn.Module):
    """DPT depth decoder on 4 levels of (patch map, CLS): reassemble, 3x3 convs, 4 fusion blocks, head.

    The reassembled maps are at 4h, 2h, h and h/2 for an (h, w) token grid; each fusion block upsamples x2
    and the head once more, so the output is (B, 1, 16h, 16w) for an even grid. depth = relu(out) + min_depth.
    """

    def __init__(
        self, *, embed_dim: int, channels: int = 256, min_depth: float = 0.001, max_depth: float = 10.0
    ) -> None:
        super().__init__()
        self.embed_dim, self.levels = embed_dim, 4
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        post = [embed_dim // 2 ** (3 - i) for i in range(4)]  # ViT-L: [128, 256, 512, 1024]
        self.reassemble_blocks = ReassembleBlocks(embed_dim, post)
        self.convs = nn.ModuleList(ConvUnit(c, channels, 3, bias=False) for c in post)
        self.fusion_blocks = nn.ModuleList(FeatureFusionBlock(channels, with_skip=i > 0) for i in range(4))
        self.project = ConvUnit(channels, channels, 3, relu=True)
        self.conv_depth = DepthOutput(channels)

    def forward(self, features: Sequence[Level]) -> torch.Tensor:
        maps = [conv(x) for conv, x in zip(self.convs, self.reassemble_blocks(features))]
        out = self.fusion_blocks[0](maps[-1])
        for i in range(1, 4):
            out = self.fusion_blocks[i](out, maps[-(i + 1)])
        return torch.relu(self.conv_depth(self.project(out))) + self.min_depth
