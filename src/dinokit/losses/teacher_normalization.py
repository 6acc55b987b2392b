"""The two ways DINOv2 turns teacher logits into targets: momentum centring and Sinkhorn-Knopp.

Both are shared by the DINO (class-token) and iBOT (patch-token) losses.

Centring: the centre is an EMA of the mean teacher logits, updated **one step late**:
``update_center(t)`` only records the (all-reduced) batch statistics, and the next
``softmax_center_teacher`` applies ``center <- m * center + (1 - m) * global_sum / (count * world)``
before using the centre. The official code launches an async all-reduce in ``update_center``; here
the reduction runs there synchronously through :func:`dinokit.distributed.all_reduce_sum` (on NCCL
that only enqueues the collective, so the host is not blocked either way).

Checkpointing between ``update_center`` and the next softmax must not lose the recorded update, and
the checkpoint must keep the official single key ``center``. So a ``state_dict`` pre-hook applies the
pending update before the buffer is saved (the result is the same: nothing else reads or writes the
centre in between), and a ``load_state_dict`` pre-hook drops any pending update of the replaced state.

Sinkhorn-Knopp (SwAV): the official code exponentiates ``t / T`` directly, which overflows
in fp32 once ``t / T`` exceeds ~88 (PR #583). :func:`sinkhorn_knopp` starts in the log domain, so it
is exact for any finite logits and equal to the official result (up to fp32 rounding) wherever that
one is finite.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce_max, all_reduce_sum, get_world_size


class DelayedCenter(nn.Module):
    """Base class holding the ``center`` buffer and its one-step-delayed momentum update."""

    def __init__(self, center_shape: tuple[int, ...], *, center_momentum: float) -> None:
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))
        # (global sum of the per-rank batch centres, number of rows they average over, world size)
        self._pending: tuple[torch.Tensor, int, int] | None = None
        self.register_state_dict_pre_hook(_apply_pending_before_save)
        self.register_load_state_dict_pre_hook(_drop_pending_before_load)

    def _record_batch_center(self, batch_sum: torch.Tensor, count: int) -> None:
        """Reduce ``batch_sum`` over ranks now; it is folded into the centre at the next softmax."""
        all_reduce_sum(batch_sum)
        self._pending = (batch_sum, count, get_world_size())

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold the recorded batch statistics into ``center`` (a no-op when nothing is pending)."""
        if self._pending is None:
            return
        batch_sum, count, world = self._pending
        self._pending = None
        batch_center = (batch_sum / (count * world)).to(self.center).reshape(self.center.shape)
        m = self.center_momentum
        self.center.copy_(self.center * m + batch_center * (1 - m))

    def _centered_softmax(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        self.apply_center_update()
        # fp32 like the official (its centre is fp32, so an fp16 input is promoted)
        return torch.softmax((teacher_output.float() - self.center) / teacher_temp, dim=-1)


def _apply_pending_before_save(module: DelayedCenter, prefix: str, keep_vars: bool) -> None:
    module.apply_center_update()


def _drop_pending_before_load(module: DelayedCenter, *args: Any) -> None:
    module._pending = None


def _logsumexp(x: torch.Tensor, dim: int, *, across_ranks: bool) -> torch.Tensor:
    """``logsumexp`` over ``dim`` (keepdim), over the rows of every rank when ``across_ranks``.

    Written out (rather than ``torch.logsumexp``) to reduce across ranks and to hold a single
    temporary of the size of ``x``.
    """
    if x.shape[dim] > 0:
        peak = x.amax(dim=dim, keepdim=True)
    else:  # a rank without samples (e.g. no masked patch) still joins the collectives
        peak = x.new_full([1 if d == dim else n for d, n in enumerate(x.shape)], -math.inf)
    if across_ranks:
        all_reduce_max(peak)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = (x - peak).exp_().sum(dim=dim, keepdim=True)
    if across_ranks:
        all_reduce_sum(total)
    return total.log_() + peak


@torch.no_grad()
def sinkhorn_knopp(
    teacher_output: torch.Tensor,
    teacher_temp: float,
    *,
    n_samples_total: int | torch.Tensor,
    n_iterations: int = 3,
) -> torch.Tensor:
    """Balanced soft assignment of samples (rows of ``teacher_output``, shape (n, K)) to K prototypes.

    The official steps on Q = exp(t / T)ᵀ (K, n): divide by the global total; ``n_iterations``
    times divide each prototype row by its global sum and by K, then each sample column by its
    (local) sum and by B = ``n_samples_total`` (samples over all ranks); return B·Qᵀ. Returns (n, K)
    fp32 probabilities whose rows sum to 1.

    To stay exact where exp overflows or whole rows/columns underflow, the first iteration runs in
    the log domain (the global division is absorbed by the first row division). Afterwards, in the
    scale of P = B·Q, every row and column sum stays at least 1/K, so the remaining iterations run in
    the linear domain, which keeps fp32 rounding as small as the official's.
    """
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs n_iterations >= 1, got {n_iterations}")
    # In-place from here on (no autograd): the (K, n) buffers are large for iBOT (n ~ 10^4, K ~ 10^5).
    log_p = (teacher_output.float() / teacher_temp).t()  # (K, n), a new tensor
    n_prototypes = log_p.shape[0]
    n_total = torch.as_tensor(n_samples_total, dtype=torch.float32, device=log_p.device)
    # Track P = B·Q: rows then sum to B/K and columns to 1, so nothing is rescaled at the end.
    log_ratio = torch.log(n_total.double() / n_prototypes).float()  # log(B/K) rounded once
    log_p -= _logsumexp(log_p, dim=1, across_ranks=True)  # rows: global, (K, 1)
    log_p += log_ratio
    log_p -= _logsumexp(log_p, dim=0, across_ranks=False)  # columns: local, (1, n)
    p = log_p.exp_()
    for _ in range(n_iterations - 1):
        p /= all_reduce_sum(p.sum(dim=1, keepdim=True))  # rows: global, (K, 1)
        p *= n_total / n_prototypes
        p /= p.sum(dim=0, keepdim=True)  # columns: local, (1, n)
    return p.t()  # (n, K)
