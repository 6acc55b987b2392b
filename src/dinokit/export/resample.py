"""Traceable bicubic resampling of the position-embedding grid, equal to ``F.interpolate``.

Exporters freeze ``F.interpolate``'s ``scale_factor`` into the graph (a traced size cannot be a Python
float), ONNX Runtime's cubic ``Resize`` has rejected 4-D inputs, and an antialiased resize does not
export at all. Bicubic resampling is linear and separable, so the resized grid is ``R_h @ grid @ R_w^T``
with (out, in) weight matrices built from the output size with tensor arithmetic only. The matrices
reproduce PyTorch's two conventions:

* ``antialias=False`` (plain official models): source coordinate ``(i + 0.5) / s - 0.5`` with
  ``s = (out + offset) / in``, four taps of the cubic kernel with ``a = -0.75``, indices clamped
  at the border;
* ``antialias=True`` (register models): a cubic filter with ``a = -0.5`` widened by ``in / out``
  when shrinking, centred at ``(i + 0.5) * in / out``, taps outside the grid dropped and the
  weights renormalised.
"""

from __future__ import annotations

import torch


def _cubic(x: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel at distance ``x`` (zero for |x| >= 2)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_matrix(
    out_size: torch.Tensor | int, in_size: int, *, antialias: bool, offset: float | torch.Tensor
) -> torch.Tensor:
    """The (out, in) float32 matrix that resamples a length-``in_size`` axis to ``out_size`` like ``F.interpolate``."""
    out_size = torch.as_tensor(out_size)
    src = torch.arange(in_size, dtype=torch.float32)  # (in,)
    i = torch.arange(out_size, dtype=torch.float32).unsqueeze(1)  # (out, 1)
    out_f = out_size.to(torch.float32)
    if antialias:
        scale = in_size / out_f  # > 1 when shrinking
        support = torch.clamp(scale, min=1.0)
        centre = (i + 0.5) * scale
        weights = _cubic((src + 0.5 - centre) / support, a=-0.5)  # (out, in)
        return weights / weights.sum(dim=1, keepdim=True)
    coord = (i + 0.5) * (in_size / (out_f + offset)) - 0.5  # PyTorch maps through the given scale factor
    base = torch.floor(coord)
    t = coord - base
    taps = []
    for k in (-1, 0, 1, 2):
        index = torch.clamp(base + k, 0, in_size - 1)  # border pixels repeat
        taps.append(_cubic(t - k, a=-0.75) * (index == src).to(torch.float32))  # (out, in)
    return taps[0] + taps[1] + taps[2] + taps[3]


def resample_grid(
    grid: torch.Tensor,
    out_h: torch.Tensor | int,
    out_w: torch.Tensor | int,
    *,
    antialias: bool,
    offset: float | torch.Tensor,
) -> torch.Tensor:
    """(1, D, M, M) -> (1, D, out_h, out_w), computed in float32."""
    m_h, m_w = grid.shape[-2:]
    r_h = resample_matrix(out_h, int(m_h), antialias=antialias, offset=offset)  # (out_h, M)
    r_w = resample_matrix(out_w, int(m_w), antialias=antialias, offset=offset)  # (out_w, M)
    return torch.einsum("hm,dmn,wn->dhw", r_h, grid[0].float(), r_w).unsqueeze(0)
