"""The DINOv2 objective's loss terms against hand values and direct calls of the loss modules.

The objective runs on stand-in modules: a "backbone" whose crops are already tokens ((n, 1 + P, D): the class token,
then the patch tokens) and identity heads, so every logit is a number the test chose.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dinokit.losses import GramLoss, KoLeoLoss, iBOTPatchLoss
from dinokit.train.objective import SSLObjective

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class TokenBackbone(nn.Module):
    """A backbone whose input crops are their own tokens: (n, 1 + P, D) -> class token and patch tokens."""

    @staticmethod
    def _out(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x_norm_clstoken": tokens[:, 0], "x_norm_patchtokens": tokens[:, 1:]}

    def forward(self, crops, masks=None, is_training=True):
        if isinstance(crops, list):
            return [self._out(c) for c in crops]
        return self._out(crops)


def make_objective(*, dino=1.0, koleo=0.0, ibot=0.0, k=8) -> SSLObjective:
    """An objective with centring, shared heads, ``k`` prototypes and the given loss weights."""
    obj = SSLObjective()
    dino_cfg = SimpleNamespace(loss_weight=dino, koleo_loss_weight=koleo, head_n_prototypes=k,
                               koleo_loss_distributed=False, koleo_loss_group_size=None)
    ibot_cfg = SimpleNamespace(loss_weight=ibot, separate_head=False, head_n_prototypes=k)
    obj.configure_objective(dino_cfg, ibot_cfg, "centering")
    return obj


def modules() -> nn.ModuleDict:
    return nn.ModuleDict({"backbone": TokenBackbone(), "dino_head": nn.Identity()})


def run_student(obj, *, global_crops, local_crops=None, masks=None, dino_probs=None, ibot_probs=None):
    n_global, n_patches = global_crops.shape[0], global_crops.shape[1] - 1
    masks = torch.zeros(n_global, n_patches, dtype=torch.bool) if masks is None else masks
    return obj.student_losses(
        modules(), global_crops=global_crops, local_crops=local_crops, student_masks=None,
        patch_index=masks.flatten().nonzero().flatten(), ibot_masks_flat=masks, masks_weight=None,
        dino_probs=dino_probs, ibot_probs=ibot_probs,
    )


# ---------------------------------------------------------------- the loss modules


def test_gram_remove_neg_clamps_the_students_negative_similarities_too():
    """remove_neg clamps the student's Gram matrix as well as the teacher's (hand value 0, not 0.5)."""
    student = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])  # cosine -1 between the two rows
    teacher = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # cosine 0
    # clamped: student [[1, 0], [0, 1]] == teacher [[1, 0], [0, 1]]
    assert GramLoss(remove_neg=True)(student, teacher).item() == 0.0
    # unclamped the off-diagonal -1 would count: (1 + 1) / 4
    assert GramLoss()(student, teacher).item() == pytest.approx(0.5)


def test_ibot_center_is_the_ema_of_the_mean_over_groups_of_the_per_group_token_means():
    """update_center on (A, n, K) moves the centre by (1 - m) * (sum_A mean_n t) / A, after the next softmax."""
    torch.manual_seed(0)
    loss = iBOTPatchLoss(4, center_momentum=0.9)
    first = torch.randn(2, 3, 4)
    loss.update_center(first)
    loss.softmax_center_teacher(torch.zeros(1, 4), 0.1)  # folds the update in
    batch1 = (first[0].mean(0) + first[1].mean(0)) / 2
    torch.testing.assert_close(loss.center.reshape(4), 0.1 * batch1)
    second = torch.randn(3, 5, 4)
    loss.update_center(second)
    loss.softmax_center_teacher(torch.zeros(1, 4), 0.1)
    batch2 = sum(second[a].mean(0) for a in range(3)) / 3
    torch.testing.assert_close(loss.center.reshape(4), 0.9 * 0.1 * batch1 + 0.1 * batch2)


# ---------------------------------------------------------------- teacher targets


def test_teacher_probabilities_of_each_global_crop_go_to_the_other_crop():
    """teacher_probs[0] (met by student crop 1) is the teacher's softmax of crop 2, and vice versa."""
    torch.manual_seed(0)
    obj = make_objective(k=6)
    n_images, temp = 3, 0.2
    crops = torch.randn(2 * n_images, 1 + 4, 6)
    teacher = modules()
    probs, _ = obj.teacher_probs(teacher, crops, torch.zeros(0, dtype=torch.long), torch.tensor(0), temp)
    cls = crops[:, 0]
    assert probs.shape == (2, n_images, 6)
    torch.testing.assert_close(probs[0], torch.softmax(cls[n_images:] / temp, dim=-1))  # crop 2's targets
    torch.testing.assert_close(probs[1], torch.softmax(cls[:n_images] / temp, dim=-1))  # crop 1's targets


# ---------------------------------------------------------------- student terms


def test_local_dino_term_divides_by_all_crop_pairs_with_two_terms_per_local_crop():
    """Uniform student logits: each cross-entropy is log K; local term = 2 n_l log K / (2 + 2 n_l)."""
    k, n_images, n_local = 8, 2, 3
    obj = make_objective(k=k)
    probs = torch.softmax(torch.randn(2, n_images, k, generator=torch.Generator().manual_seed(0)), dim=-1)
    out = run_student(obj, global_crops=torch.zeros(2 * n_images, 1 + 4, k),
                      local_crops=torch.zeros(n_local * n_images, 1 + 1, k), dino_probs=probs)
    denom = 2 + 2 * n_local
    assert out.terms["dino_local_crops_loss"].item() == pytest.approx(2 * n_local * math.log(k) / denom, rel=1e-6)
    # the global term: one (2B, K) pair, mean CE log K, x 2 loss scales; both terms add up to log K
    assert out.terms["dino_global_crops_loss"].item() == pytest.approx(2 * math.log(k) / denom, rel=1e-6)
    assert out.total.item() == pytest.approx(math.log(k), rel=1e-6)


def test_koleo_is_computed_within_each_global_crop_and_averaged():
    """The KoLeo term is w * (KoLeo(crop 1 cls) + KoLeo(crop 2 cls)) / 2, not KoLeo of all 2B tokens at once."""
    torch.manual_seed(0)
    n_images, weight = 4, 0.3
    obj = make_objective(dino=0.0, koleo=weight)
    crops = torch.randn(2 * n_images, 1 + 4, 5)
    out = run_student(obj, global_crops=crops)
    cls = crops[:, 0]
    koleo = KoLeoLoss()
    per_chunk = (koleo(cls[:n_images]) + koleo(cls[n_images:])) / 2
    assert abs(per_chunk.item() - koleo(cls).item()) > 0.05  # the two readings differ on this batch
    torch.testing.assert_close(out.terms["koleo_loss"], weight * per_chunk)
    torch.testing.assert_close(out.total, 2 * weight * per_chunk)


def test_ibot_term_is_half_the_masked_loss_summed_over_both_global_crops():
    """The logged iBOT term is 0.5 x forward_masked (x 2 loss scales x 1/2 crops, / 2 for the log)."""
    gen = torch.Generator().manual_seed(0)
    n_images, n_patches, k, weight = 2, 6, 5, 0.7
    obj = make_objective(dino=0.0, ibot=weight, k=k)
    crops = torch.randn(2 * n_images, 1 + n_patches, k, generator=gen)
    masks = torch.rand(2 * n_images, n_patches, generator=gen) < 0.5
    masks[0, 0] = True
    n_masked = int(masks.sum())
    ibot_probs = torch.softmax(torch.randn(n_masked, k, generator=gen), dim=-1)
    out = run_student(obj, global_crops=crops, masks=masks, ibot_probs=ibot_probs)
    student_logits = crops[:, 1:].flatten(0, 1)[masks.flatten()]
    direct = iBOTPatchLoss(k).forward_masked(student_logits, ibot_probs, masks)
    torch.testing.assert_close(out.terms["ibot_loss"], 0.5 * direct)
    torch.testing.assert_close(out.total, weight * direct)
