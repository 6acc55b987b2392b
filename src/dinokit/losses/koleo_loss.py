"""KoLeo regulariser: spread the batch features uniformly on the sphere.

Kozachenko-Leonenko differential entropy estimator (Sablayrolles et al., "Spreading vectors for
similarity search", ICLR 2019), used by DINOv2 on the student backbone class tokens:
``-mean_i log(d(x_i, nearest neighbour of x_i) + eps)`` on L2-normalised rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """KoLeo loss of a (n, D) batch, always computed in fp32.

    The official code receives fp16 features, where eps = 1e-8 underflows: duplicate rows then give
    ``inf`` (#143, #307, #492). Here the input is cast to fp32 with autocast disabled, so duplicates
    give a large but finite loss. A batch with fewer than 2 rows has no neighbour: it returns 0
    (the official gives NaN, #314).
    """

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        n = student_output.shape[0]
        if n < 2:
            return torch.zeros((), device=student_output.device)
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), p=2, dim=-1, eps=eps)
            with torch.no_grad():
                dots = x @ x.t()  # (n, n) cosine similarities
                dots.fill_diagonal_(-1)  # a row is never its own neighbour
                nearest = dots.argmax(dim=1)  # (n,)
            # pairwise_distance adds eps to the difference, as the official nn.PairwiseDistance does
            distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)  # (n,)
            return -torch.log(distances + eps).mean()
