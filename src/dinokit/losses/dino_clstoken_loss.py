"""DINO loss on class tokens: cross-entropy between student and (centred or balanced) teacher views.

The student distribution is softmax(s / 0.1); the teacher targets come from
:meth:`DINOLoss.softmax_center_teacher` (momentum centring, one step late) or
:meth:`DINOLoss.sinkhorn_knopp_teacher`. ``forward`` sums the cross-entropy over every (student view,
teacher view) pair, exactly like the official ``DINOLoss.forward``; the caller divides by the number
of pairs (18 for 2 global + 8 local crops) and skips the same-view pairs, as the meta-architecture does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .teacher_normalization import DelayedCenter, sinkhorn_knopp
from ..distributed import get_world_size


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, *, student_temp: float
) -> torch.Tensor:
    """Per-row ``-sum_k t_k log softmax(s / T)_k`` over the last dim, computed in fp32.

    ``student_logits`` and ``teacher_probs`` broadcast against each other; the result has their
    broadcast shape without the last dim.
    """
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -torch.sum(teacher_probs.float() * log_probs, dim=-1)


class DINOLoss(DelayedCenter):
    """The DINO class-token loss with its teacher centre (buffer ``center``, shape (1, K))."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, out_dim), center_momentum=center_momentum)
        self.student_temp = student_temp

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t - center) / T) over K (fp32), after folding in the previous step's update."""
        return self._centered_softmax(teacher_output, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for the (n, K) teacher logits of this rank; B = n * world size."""
        n_total = teacher_output.shape[0] * get_world_size()
        return sinkhorn_knopp(teacher_output, teacher_temp, n_samples_total=n_total, n_iterations=n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Record this step's teacher logits (n, K); the centre moves at the next softmax."""
        self._record_batch_center(teacher_output.float().sum(dim=0, keepdim=True), len(teacher_output))

    def forward(
        self, student_output_list: Sequence[torch.Tensor], teacher_out_softmaxed_centered_list: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Sum over all (s, t) pairs of ``mean_b CE(t, softmax(s / T))``; each tensor is (B, K).

        As the official code: one log-softmax per student view, reused for every teacher view (the products and
        sums in the official order, so the values match it to the last bit where its inputs do).
        """
        total_loss = torch.zeros((), device=student_output_list[0].device)
        for s in student_output_list:
            log_probs = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total_loss = total_loss - torch.sum(t.float() * log_probs, dim=-1).mean()
        return total_loss
