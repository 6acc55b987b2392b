"""A frozen backbone plus a dense head, with the official encoder-decoder's inference.

:class:`DenseModel` holds ``backbone`` and ``decode_head`` (the state-dict layout of the official
mmseg/mmcv ``EncoderDecoder``), reads the features its head needs (:class:`FeatureSpec`), and
predicts like the official code:

* the image is centre-padded with zeros to a multiple of the patch size before the backbone;
* ``encode_decode`` resizes the head output (which covers the padded image) bilinearly to the
  *unpadded* input size, as the official hub depthers and mmseg segmentors do, and clamps depth to
  ``[min_depth, max_depth]``;
* ``slide_inference`` averages overlapping crops (mmseg's grid: last window flush with the border);
* :meth:`DenseModel.predict` adds flip and multi-scale test-time augmentation, averaging class
  probabilities (segmentation, as mmseg's ``aug_test``) or depths.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import DPTHead, FeatureSpec, LinearDepthHead, LinearSegHead, four_level_indices


def centre_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) on both sides (the extra pixel at the end) so H and W are multiples of ``multiple``."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dimension first
        total = math.ceil(size / multiple) * multiple - size
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class CenterPadding(nn.Module):
    """The official name of :func:`centre_pad` as a module (hub utils; a pre-hook of the segmentation backbones):
    zero-pads H and W up to multiples of ``multiple``, half on each side."""

    def __init__(self, multiple: int) -> None:
        super().__init__()
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return centre_pad(x, self.multiple)


def sliding_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) windows of mmseg's slide inference: a stride grid, the last window flush with the border."""
    (ch, cw), (sh, sw) = crop, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


def backbone_features(backbone: nn.Module, spec: FeatureSpec, x: torch.Tensor) -> list:
    """A head's inputs for normalised images (B, 3, H, W): centre-padded, through the blocks ``spec`` lists."""
    x = centre_pad(x, backbone.patch_size)
    return list(backbone.get_intermediate_layers(
        x, n=list(spec.indices), reshape=True, return_class_token=spec.class_token, norm=spec.norm
    ))


class DenseModel(nn.Module):
    """``backbone`` + ``decode_head`` for segmentation (logits) or depth (metres)."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, spec: FeatureSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.spec = spec

    @property
    def task(self) -> str:
        return "seg" if isinstance(self.decode_head, LinearSegHead) else "depth"

    @property
    def out_channels(self) -> int:
        return self.decode_head.num_classes if self.task == "seg" else 1

    # ------------------------------------------------------------------ features and head
    def extract_features(self, x: torch.Tensor) -> list:
        return backbone_features(self.backbone, self.spec, x)

    def decode(self, features: list, size: Sequence[int]) -> torch.Tensor:
        """Head output for ``features``, clamped (depth) and resized bilinearly to ``size``."""
        out = self.decode_head(features)
        if self.task == "depth":
            out = out.clamp(self.decode_head.min_depth, self.decode_head.max_depth)
        return F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)

    def encode_decode(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """(B, K, H, W) logits or (B, 1, H, W) depth for images x, at ``size`` (default: x's own size)."""
        return self.decode(self.extract_features(x), size if size is not None else x.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_decode(x)

    # ------------------------------------------------------------------ inference
    def whole_inference(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        return self.encode_decode(x, size)

    def slide_inference(
        self, x: torch.Tensor, crop: int | tuple[int, int], stride: int | tuple[int, int], size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Average of the outputs of overlapping ``crop`` windows every ``stride`` pixels, then resized to ``size``."""
        crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        b, _, h, w = x.shape
        total = x.new_zeros((b, self.out_channels, h, w))
        count = x.new_zeros((1, 1, h, w))
        for y1, y2, x1, x2 in sliding_windows(h, w, crop, stride):
            total[:, :, y1:y2, x1:x2] += self.encode_decode(x[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
        out = total / count
        if size is not None and tuple(size) != (h, w):
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return out

    def predict(
        self,
        x: torch.Tensor,
        *,
        size: Sequence[int] | None = None,
        mode: str = "whole",
        crop: int | tuple[int, int] = 512,
        stride: int | tuple[int, int] = 341,
        flip: bool = False,
        scales: Sequence[float] = (1.0,),
    ) -> torch.Tensor:
        """Test-time prediction at ``size``: class probabilities (B, K, H, W) or depth (B, 1, H, W).

        Each scale resizes the image (bilinear) before ``mode`` inference ("whole" or "slide"); with
        ``flip`` the mirrored image is predicted too and mirrored back; all results are averaged.
        """
        if mode not in ("whole", "slide"):
            raise ValueError(f"unknown inference mode {mode!r}; use whole or slide")
        size = tuple(size) if size is not None else tuple(x.shape[-2:])
        outputs = []
        for scale in scales:
            xs = x
            if scale != 1.0:
                new = (int(round(x.shape[-2] * scale)), int(round(x.shape[-1] * scale)))
                xs = F.interpolate(x, size=new, mode="bilinear", align_corners=False)
            for flipped in ((False, True) if flip else (False,)):
                xi = xs.flip(-1) if flipped else xs
                if mode == "whole":
                    out = self.whole_inference(xi, size)
                else:
                    out = self.slide_inference(xi, crop, stride, size)
                if self.task == "seg":
                    out = out.softmax(dim=1)
                outputs.append(out.flip(-1) if flipped else out)
        return torch.stack(outputs).mean(dim=0)


def build_head(
    kind: str,
    *,
    embed_dim: int,
    depth: int,
    num_classes: int = 150,
    min_depth: float = 0.001,
    max_depth: float = 10.0,
    dropout: float = 0.0,
    class_token: bool = False,
    norm: bool | None = None,
    n_bins: int = 256,
    bins: str = "linear",
    bin_norm: str = "linear",
) -> tuple[nn.Module, FeatureSpec]:
    """A head and the features it reads, for ``kind`` in ``seg-linear``, ``seg-ms``, ``depth-linear``,
    ``depth-linear4``, ``depth-linear-bn`` (DINOv3's linear depth head), ``depth-dpt`` (``depth`` = the backbone's
    number of blocks; ``class_token``: segmentation heads also read the CLS token; ``norm`` overrides the head's
    usual final-LayerNorm choice; ``n_bins``, ``bins``, ``bin_norm``: the linear depth heads' bin options)."""
    head, spec = _build_head(kind, embed_dim=embed_dim, depth=depth, num_classes=num_classes, min_depth=min_depth,
                             max_depth=max_depth, dropout=dropout, class_token=class_token,
                             bin_options={"n_bins": n_bins, "bins": bins, "norm": bin_norm})
    if norm is not None:
        spec = FeatureSpec(spec.indices, norm, spec.class_token)
    return head, spec


def _build_head(kind: str, *, embed_dim: int, depth: int, num_classes: int, min_depth: float, max_depth: float,
                dropout: float, class_token: bool, bin_options: dict) -> tuple[nn.Module, FeatureSpec]:
    last = (depth - 1,)
    last4 = tuple(range(max(depth - 4, 0), depth))
    if kind in ("seg-linear", "seg-ms"):
        indices = last if kind == "seg-linear" else last4
        head = LinearSegHead(
            embed_dim=embed_dim, levels=len(indices), num_classes=num_classes, dropout=dropout, class_token=class_token
        )
        return head, FeatureSpec(indices, True, class_token)
    if kind in ("depth-linear", "depth-linear4"):
        indices = last if kind == "depth-linear" else four_level_indices(depth)
        head = LinearDepthHead(embed_dim=embed_dim, levels=len(indices), min_depth=min_depth, max_depth=max_depth,
                               **bin_options)
        return head, FeatureSpec(indices, False, True)
    if kind == "depth-linear-bn":  # DINOv3: last block after the final norm, no CLS, BatchNorm, no x4
        head = LinearDepthHead(embed_dim=embed_dim, levels=1, min_depth=min_depth, max_depth=max_depth,
                               batch_norm=True, upsample=1, class_token=False, **bin_options)
        return head, FeatureSpec(last, True, False)
    if kind == "depth-dpt":
        indices = four_level_indices(depth)
        if len(indices) != 4:
            raise ValueError(f"the DPT head needs 4 levels; this backbone has {depth} blocks")
        head = DPTHead(embed_dim=embed_dim, min_depth=min_depth, max_depth=max_depth)
        return head, FeatureSpec(indices, False, True)
    raise ValueError(f"unknown head kind {kind!r}")


def build_dense_model(backbone: nn.Module, kind: str, **head_kwargs) -> DenseModel:
    """``backbone`` (any dinokit ViT) + a fresh head of ``kind`` (see :func:`build_head`)."""
    head, spec = build_head(kind, embed_dim=backbone.embed_dim, depth=len(backbone.blocks), **head_kwargs)
    return DenseModel(backbone, head, spec)
