"""ONNX export of a DINOv2 backbone, checked against PyTorch with ONNX Runtime before the file is written.

The graph takes one input, ``image`` (B, 3, H, W), already normalised, and returns the normalised
``cls_token`` (B, D), ``patch_tokens`` (B, h*w, D) and, for register models, ``register_tokens``
(B, R, D): the ``x_norm_*`` outputs of ``forward_features``.

* Static (default): the position embedding is interpolated once, by the model's own code, and stored
  as a constant for the exported size: the graph computes what PyTorch computes.
* Dynamic (``dynamic=True``): batch, height and width are free; the position embedding is resampled in
  the graph by :mod:`dinokit.export.resample`, which reproduces the official interpolation (the 0.1
  offset of plain models, the antialiased resize of register models) up to float32 rounding.

Attention runs through ``scaled_dot_product_attention``, which the TorchScript exporter writes as plain
MatMul/Softmax; xFormers is never used. After export, ONNX Runtime (CPU) runs the file on random images
at the export size (and, when dynamic, at a second size) and the largest difference to PyTorch is
measured; above ``tolerance`` (or on a non-finite output) nothing is written.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import DinokitError
from ..files import atomic_write
from ..models.vision_transformer import DinoVisionTransformer
from .resample import resample_grid

DEFAULT_TOLERANCE = 1e-4  # max |onnx - torch| relative to max |torch|, per output
OPSET = 17


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise DinokitError(f"ONNX export needs {module}: pip install 'dinokit[onnx]'") from None


class ExportableBackbone(nn.Module):
    """``image -> (cls_token, patch_tokens[, register_tokens])`` with export-friendly position embeddings.

    ``image_size=(H, W)`` freezes the position embedding for that size (static export); ``None``
    resamples it from the input's size inside the graph (dynamic export).
    """

    def __init__(self, backbone: DinoVisionTransformer, image_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.static = image_size is not None
        if self.static:
            h, w = image_size
            p = backbone.patch_size
            if h % p or w % p:
                near = "x".join(str(max(p, round(s / p) * p)) for s in (h, w))  # the nearest multiples, at least one patch
                raise DinokitError(f"image size {h}x{w} is not a multiple of the patch size {p}; use e.g. {near}")
            tokens = torch.zeros(1, 1 + (h // p) * (w // p), backbone.embed_dim)
            with torch.no_grad():
                pos = backbone.interpolate_pos_encoding(tokens, h, w).detach().clone()
            self.register_buffer("pos_embed", pos, persistent=False)  # (1, 1 + h*w, D)

    def _position_embedding(self, h0: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        pos = b.pos_embed.float()
        m = math.isqrt(pos.shape[1] - 1)
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        # The official code skips interpolation on the native grid; at equal sizes the resampling matrices are
        # exactly the identity once the offset is zero, so the skip becomes data instead of a Python branch.
        offset = torch.where((h0 == m) & (w0 == m), torch.tensor(0.0), torch.tensor(float(b.interpolate_offset)))
        resized = resample_grid(grid, h0, w0, antialias=b.interpolate_antialias, offset=offset)
        resized = resized.permute(0, 2, 3, 1).flatten(1, 2)  # (1, h0*w0, D)
        return torch.cat((pos[:, :1], resized), dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = self.backbone
        if not self.static:  # the model's centre crop to whole patches, with the sizes as graph values
            p = b.patch_size
            height, width = torch.as_tensor(image.shape[-2]), torch.as_tensor(image.shape[-1])
            h0, w0 = height // p, width // p
            rows = torch.arange(h0 * p) + (height - h0 * p) // 2
            cols = torch.arange(w0 * p) + (width - w0 * p) // 2
            image = image.index_select(2, rows).index_select(3, cols)
        x = b.patch_embed(image)  # (B, N, D)
        x = torch.cat((b.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        pos = self.pos_embed if self.static else self._position_embedding(h0, w0)
        x = x + pos.to(x.dtype)
        if b.register_tokens is not None:
            x = torch.cat((x[:, :1], b.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        for blk in b.blocks:
            x = blk(x)
        x = b.norm(x)
        r = b.num_register_tokens
        outputs = (x[:, 0], x[:, r + 1 :])
        return outputs + (x[:, 1 : r + 1],) if r else outputs


@dataclass
class ExportReport:
    path: Path
    dynamic: bool
    image_size: tuple[int, int]
    errors: dict[str, float] = field(default_factory=dict)  # "<output>@HxW" -> max relative error
    """Largest ``max|onnx - torch| / max|torch|`` per output and checked size."""

    @property
    def max_error(self) -> float:
        return max(self.errors.values())


def output_names(backbone: DinoVisionTransformer) -> list[str]:
    names = ["cls_token", "patch_tokens"]
    return names + ["register_tokens"] if backbone.num_register_tokens else names


def _check_sizes(image_size: tuple[int, int], patch: int, dynamic: bool) -> list[tuple[int, int, int]]:
    """(batch, H, W) inputs to check: the export size, plus, when dynamic, a second batch and non-square size and
    one that is not a multiple of the patch (centre-cropped to whole patches, as the model does)."""
    h, w = image_size
    sizes = [(2, h, w)]
    if dynamic:
        sizes += [(1, h + 2 * patch, max(patch, w - patch)), (1, h + patch // 2 + 1, w + patch - 1)]
    return sizes


def verify_onnx(path: Path, backbone: DinoVisionTransformer, image_size: tuple[int, int], dynamic: bool) -> dict[str, float]:
    """Run ``path`` in ONNX Runtime and PyTorch on the same random images; the largest relative error per output."""
    ort = _need("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = output_names(backbone)
    keys = {"cls_token": "x_norm_clstoken", "patch_tokens": "x_norm_patchtokens", "register_tokens": "x_norm_regtokens"}
    generator = torch.Generator().manual_seed(0)
    errors: dict[str, float] = {}
    for batch, h, w in _check_sizes(image_size, backbone.patch_size, dynamic):
        image = torch.randn(batch, 3, h, w, generator=generator)
        got = session.run(names, {"image": image.numpy()})
        with torch.no_grad():
            ref = backbone.forward_features(image)
        for name, value in zip(names, got):
            expected = ref[keys[name]].float()
            diff = (torch.from_numpy(value) - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
            errors[f"{name}@{h}x{w}"] = float(diff) if torch.isfinite(diff) else math.inf
    return errors


def check_output(out: str | Path) -> Path:
    """The output path, once the exporter's packages are importable and the name ends in .onnx."""
    _need("onnx")
    _need("onnxruntime")
    out = Path(out).expanduser()
    if out.suffix != ".onnx":
        raise DinokitError(f"the output must be a .onnx file, not {out.name!r}")
    return out


def export_onnx(
    backbone: DinoVisionTransformer,
    out: str | Path,
    *,
    image_size: tuple[int, int],
    dynamic: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = OPSET,
) -> ExportReport:
    """Export ``backbone`` to ``out`` and verify it with ONNX Runtime; raises :class:`DinokitError` (and writes
    nothing) if the export fails or differs from PyTorch by more than ``tolerance``."""
    out = check_output(out)
    backbone = backbone.eval().float()
    module = ExportableBackbone(backbone, None if dynamic else tuple(image_size)).eval()
    h, w = image_size
    example = torch.zeros(1, 3, h, w)
    names = output_names(backbone)
    # the batch is always free; height, width and the number of patches only in a dynamic export
    axes: dict[str, dict[int, str]] = {"image": {0: "batch"}, **{name: {0: "batch"} for name in names}}
    if dynamic:
        axes["image"].update({2: "height", 3: "width"})
        axes["patch_tokens"][1] = "patches"
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / out.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter; the result is verified below
            try:
                # The TorchScript exporter: the dynamo one needs onnxscript and gains nothing for this graph.
                torch.onnx.export(module, (example,), str(candidate), input_names=["image"], output_names=names,
                                  dynamic_axes=axes, opset_version=opset, dynamo=False)
            except Exception as err:  # noqa: BLE001 - any exporter failure is reported in one line
                raise DinokitError(f"ONNX export failed: {type(err).__name__}: {str(err).splitlines()[0]}") from None
        report = ExportReport(out, dynamic, (h, w), verify_onnx(candidate, backbone, (h, w), dynamic))
        worst = max(report.errors, key=report.errors.get)
        if not report.errors[worst] <= tolerance:
            raise DinokitError(
                f"the exported graph differs from PyTorch ({worst}: max relative error {report.errors[worst]:.3g} > "
                f"{tolerance:g}); {out} was not written"
            )
        with atomic_write(out) as final:
            shutil.move(candidate, final)  # a copy where the temporary folder is on another disk than --out
    return report
