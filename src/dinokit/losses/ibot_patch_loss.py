"""iBOT loss on masked patch tokens: the student predicts the teacher's target for each masked patch.

Each masked patch contributes the cross-entropy between the teacher target and
softmax(student / 0.1), weighted by 1 / (number of masked patches in its image); the weighted sum is
divided by the number of global images (images without any masked patch still count).
"""

from __future__ import annotations

import torch

from .dino_clstoken_loss import soft_cross_entropy
from .teacher_normalization import DelayedCenter, sinkhorn_knopp
from ..distributed import all_reduce_sum


def default_masks_weight(masks: torch.Tensor) -> torch.Tensor:
    """(n_masked,) weights of the masked patches of a (B, N) boolean mask: 1 / (masked patches of the row's image)."""
    per_image = 1 / masks.sum(dim=-1).clamp(min=1.0)  # (B,)
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class iBOTPatchLoss(DelayedCenter):  # noqa: N801 (the official class name)
    """The iBOT patch loss with its teacher centre (buffer ``center``, shape (1, 1, K))."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, 1, patch_out_dim), center_momentum=center_momentum)
        self.student_temp = student_temp

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t - center) / T) over K (fp32), after folding in the previous step's update.

        The result has the shape of ``teacher_patch_tokens`` ((n, K) or (1, n, K)); the official one
        broadcasts an (n, K) input to (1, n, K).
        """
        return self._centered_softmax(teacher_patch_tokens, teacher_temp).reshape(teacher_patch_tokens.shape)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor | int,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for this rank's (n, K) masked-patch logits.

        ``n_masked_patches_tensor`` holds this rank's number of masked patches (a tensor or an int);
        B is its sum over ranks. Unlike the official, the caller's tensor is not modified.
        """
        n_local = torch.as_tensor(n_masked_patches_tensor, device=teacher_output.device)
        n_total = all_reduce_sum(n_local.detach().clone())
        return sinkhorn_knopp(teacher_output, teacher_temp, n_samples_total=n_total, n_iterations=n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        """Record this step's masked-patch teacher logits, (n, K) or (A, n, K) as the official.

        The batch centre is the sum over A of the mean over the n rows, divided by A * world size.
        A rank without masked patches contributes zeros instead of the official NaN.
        """
        tokens = teacher_patch_tokens.float()
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)  # (n, K) -> (1, n, K)
        if tokens.shape[1] == 0:
            per_group_mean = tokens.new_zeros(tokens.shape[0], tokens.shape[2])
        else:
            per_group_mean = tokens.mean(dim=1)  # (A, K)
        self._record_batch_center(per_group_mean.sum(dim=0, keepdim=True), len(tokens))

    def forward(
        self, student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor, student_masks_flat: torch.Tensor
    ) -> torch.Tensor:
        """Dense variant (unused in training): per-image masked mean of the CE over (B, N, K) maps."""
        loss = soft_cross_entropy(student_patch_tokens, teacher_patch_tokens, student_temp=self.student_temp)  # (B, N)
        masks = student_masks_flat.float()
        per_image = (loss * masks).sum(dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return per_image.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss over the masked patches only (rows in mask order; may be padded past ``n_masked_patches``).

        ``student_masks_flat`` is the (B_global, N) boolean mask; ``masks_weight`` defaults to
        1 / (masked patches of the row's image) for each masked patch.
        """
        loss = soft_cross_entropy(
            student_patch_tokens_masked, teacher_patch_tokens_masked, student_temp=self.student_temp
        ).reshape(-1)  # (n,) whether the teacher came as (n, K) or (1, n, K)
        if masks_weight is None:
            masks_weight = default_masks_weight(student_masks_flat)
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        return (loss * masks_weight).sum() / student_masks_flat.shape[0]
