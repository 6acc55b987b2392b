"""KoLeo regulariser: spread the batch features uniformly on the sphere.

Kozachenko-Leonenko differential entropy estimator (Sablayrolles et al., "Spreading vectors for
similarity search", ICLR 2019), used by DINOv2 on the student backbone class tokens:
``-mean_i log(d(x_i, nearest neighbour of x_i) + eps)`` on L2-normalised rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as du


class KoLeoLoss(nn.Module):
    """KoLeo loss of a (n, D) batch, always computed in fp32.

    The official code receives fp16 features, where eps = 1e-8 underflows: duplicate rows then give
    ``inf`` (#143, #307, #492). Here the input is cast to fp32 with autocast disabled, so duplicates
    give a large but finite loss. A batch with fewer than 2 rows has no neighbour: it returns 0
    (the official gives NaN, #314).

    ``distributed`` (DINOv3's distributed KoLeo): each row's nearest neighbour is searched among the rows of
    every rank of its group of ``group_size`` ranks (None: all), not only its own; the other ranks' rows enter
    as constants. In one process it is the per-GPU loss.
    """

    def __init__(self, distributed: bool = False, group_size: int | None = None) -> None:
        super().__init__()
        self.distributed, self.group_size = distributed, group_size

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        n = student_output.shape[0]
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), p=2, dim=-1, eps=eps)
            candidates, place = x, 0
            if self.distributed:
                gathered, place = du.group_gather_cat(x, self.group_size)
                # this rank's own rows keep their gradient, as in the per-GPU loss
                candidates = torch.cat((gathered[: place * n], x, gathered[(place + 1) * n :]))
            if candidates.shape[0] < 2:
                return torch.zeros((), device=student_output.device)
            with torch.no_grad():
                dots = x @ candidates.t()  # (n, group rows) cosine similarities
                rows = torch.arange(n, device=x.device)
                dots[rows, place * n + rows] = -1  # a row is never its own neighbour
                nearest = dots.argmax(dim=1)  # (n,)
            # pairwise_distance adds eps to the difference, as the official nn.PairwiseDistance does
            distances = F.pairwise_distance(x, candidates[nearest], p=2, eps=eps)  # (n,)
            return -torch.log(distances + eps).mean()
