"""DINO and iBOT losses through the student head in row chunks: the (rows, K) logits never exist at once.

With K = 65,536 (131,072 for the iBOT head of the larger recipes) prototypes, the student's logits,
their log-softmax and the gradients of both are each ``rows x K`` fp32: several GB for a ViT-L batch.
Here the head's MLP and L2 normalisation run on all rows (a small ``rows x 256`` code), and the
prototype layer plus the cross-entropy run ``chunk_rows`` rows at a time under activation
checkpointing: each chunk's logits are made, reduced to one loss per row and freed; backward makes
them again, one chunk at a time. Peak memory for the logits drops from ``rows x K`` to
``chunk_rows x K`` for one extra prototype matrix product per chunk.

The values equal the plain path (``DINOHead`` then :class:`DINOLoss` / :class:`iBOTPatchLoss`) up to
float rounding, and so do the gradients. Two identities make it cheap: the cross-entropy is linear in
the target, so the sum over the teacher views of ``CE(t_v, s)`` is ``CE(sum_v t_v, s)`` (one pass per
student row instead of one per pair), and the weight-normalised prototype matrix is formed once.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..layers.dino_head import DINOHead
from .dino_clstoken_loss import soft_cross_entropy

DEFAULT_CHUNK_ROWS = 1024


def _chunk_cross_entropy(code: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, student_temp: float) -> torch.Tensor:
    return soft_cross_entropy(F.linear(code, weight), target, student_temp=student_temp)  # (chunk,)


def _rows_cross_entropy(
    code: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, student_temp: float, chunk_rows: int
) -> torch.Tensor:
    """(n,) cross-entropy of ``F.linear(code, weight)`` against ``targets``, ``chunk_rows`` rows at a time."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    losses = [
        checkpoint(_chunk_cross_entropy, c, weight, t, student_temp, use_reentrant=False)
        for c, t in zip(code.split(chunk_rows), targets.split(chunk_rows))
    ]
    return torch.cat(losses) if losses else code.new_zeros(0)


def head_cross_entropy(
    head: DINOHead,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    student_temp: float = 0.1,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """(n,) ``soft_cross_entropy(head(tokens), targets)`` per row, with at most ``chunk_rows`` rows of logits alive.

    ``tokens`` is (n, D), ``targets`` (n, K) (teacher probabilities, no gradient needed).
    """
    code = head.bottleneck(tokens)  # (n, bottleneck_dim)
    weight = head.last_layer.effective_weight()  # (K, bottleneck_dim), formed once for every chunk
    return _rows_cross_entropy(code, weight, targets, student_temp, chunk_rows)


def chunked_dino_loss(
    head: DINOHead,
    student_tokens: Sequence[torch.Tensor],
    teacher_probs: Sequence[torch.Tensor],
    *,
    student_temp: float = 0.1,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """``DINOLoss(student_temp).forward([head(s) for s in student_tokens], teacher_probs)`` in chunks.

    Each student view is (B, D) class tokens, each teacher view (B, K) targets; the result is the
    sum over all (student, teacher) pairs of the batch-mean cross-entropy.
    """
    target = torch.stack(list(teacher_probs)).sum(dim=0)  # (B, K): CE is linear in the target
    # The head's MLP once for every view: (V * B, D) -> (V, B, bottleneck_dim); the prototypes once.
    codes = head.bottleneck(torch.cat(list(student_tokens))).unflatten(0, (len(student_tokens), -1))
    weight = head.last_layer.effective_weight()
    total = torch.zeros((), device=target.device)
    for code in codes:
        total = total + _rows_cross_entropy(code, weight, target, student_temp, chunk_rows).mean()
    return total


def chunked_ibot_loss(
    head: DINOHead,
    student_masked_tokens: torch.Tensor,
    teacher_probs: torch.Tensor,
    masks_weight: torch.Tensor,
    n_global_crops: int,
    *,
    student_temp: float = 0.1,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """``iBOTPatchLoss.forward_masked`` on ``head(student_masked_tokens)``, in chunks.

    Rows are the masked patches (n, D) with their (n, K) teacher targets and (n,) weights
    (1 / masked patches of the row's image); the weighted sum is divided by ``n_global_crops``.
    """
    loss = head_cross_entropy(head, student_masked_tokens, teacher_probs, student_temp=student_temp, chunk_rows=chunk_rows)
    return (loss * masks_weight).sum() / n_global_crops
