"""DINO, iBOT and KoLeo losses: golden parity with the official classes, hand-computed cases, robustness."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dinokit.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp, soft_cross_entropy

GOLDEN_DIR = Path(os.environ.get("DINOKIT_GOLDEN_DIR", Path(__file__).resolve().parent / "golden"))  # golden/README.md
GOLDEN = GOLDEN_DIR / "losses.pt"
RTOL = 1e-5


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN, weights_only=True)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    err = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert err < rtol, err


def naive_sinkhorn_f64(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """The official algorithm, literally, in float64 (finite for |logits / temp| up to ~700)."""
    q = torch.exp(logits.double() / temp).t()  # (K, B)
    n_prototypes, n_samples = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    return (q * n_samples).t()


# ------------------------------------------------------------------------------------------ golden parity


def test_dino_centering_golden_three_steps(golden):
    loss = DINOLoss(257)
    for step in range(3):
        teacher = golden[f"dino.{step}.teacher_logits"]
        probs = loss.softmax_center_teacher(teacher, teacher_temp=0.05)
        loss.update_center(teacher)
        value = loss(list(golden[f"dino.{step}.student_logits"]), list(probs.chunk(2)))
        assert_rel_close(probs, golden[f"dino.{step}.center_probs"])
        assert_rel_close(value, golden[f"dino.{step}.loss"])


def test_ibot_centering_golden_two_steps(golden):
    loss = iBOTPatchLoss(257)
    masks = golden["ibot.masks"]
    for step in range(2):
        teacher = golden[f"ibot.{step}.teacher_logits"]
        probs = loss.softmax_center_teacher(teacher.unsqueeze(0), teacher_temp=0.06)  # (1, n, K) as the official
        loss.update_center(teacher.unsqueeze(0))
        assert probs.shape == golden[f"ibot.{step}.center_probs"].shape
        value = loss.forward_masked(golden[f"ibot.{step}.student_logits"], probs, student_masks_flat=masks)
        assert_rel_close(probs, golden[f"ibot.{step}.center_probs"])
        assert_rel_close(value, golden[f"ibot.{step}.loss"])


@pytest.mark.parametrize("which", ["dino", "ibot"])
def test_sinkhorn_golden(golden, which):
    teacher = golden[f"{which}.sinkhorn.teacher_logits"]
    if which == "dino":
        probs = DINOLoss(257).sinkhorn_knopp_teacher(teacher, teacher_temp=0.07)
    else:
        count = torch.tensor([teacher.shape[0]])
        probs = iBOTPatchLoss(257).sinkhorn_knopp_teacher(teacher, 0.07, n_masked_patches_tensor=count)
        assert count.item() == teacher.shape[0]  # the caller's tensor is left alone
    expected = golden[f"{which}.sinkhorn.probs"]
    # The official fp32 exp flushes entries below ~1e-38 to 0; those are the atol part.
    torch.testing.assert_close(probs, expected, rtol=RTOL, atol=1e-12)
    significant = expected > 1e-10
    assert ((probs - expected).abs() / expected)[significant].max() < RTOL


def test_koleo_golden(golden):
    assert_rel_close(KoLeoLoss()(golden["koleo.input"]), golden["koleo.loss"])


# ------------------------------------------------------------------------------------------ hand-computed


def test_cross_entropy_uniform_student_is_log_k():
    student = torch.zeros(4, 3)
    teacher = torch.softmax(torch.randn(4, 3), dim=-1)
    torch.testing.assert_close(soft_cross_entropy(student, teacher, student_temp=0.1), torch.full((4,), math.log(3)))


def test_dino_forward_one_hot_teacher_sums_pairs():
    # s / 0.1 = [ln 2, 0, 0] -> softmax [1/2, 1/4, 1/4]
    student = torch.tensor([[0.1 * math.log(2), 0.0, 0.0]])
    one_hot = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])]
    value = DINOLoss(3)([student, student], one_hot)
    torch.testing.assert_close(value, torch.tensor(2 * (math.log(2) + math.log(4))))


def test_dino_forward_equals_the_official_per_pair_sum_with_its_gradient():
    """DINOLoss.forward computes one log-softmax per student view and reuses it for every teacher view, as the
    official code; the value is that of the per-pair form, its gradient too (to fp32 rounding)."""
    torch.manual_seed(0)
    students = [torch.randn(5, 64, requires_grad=True) for _ in range(3)]
    teachers = [torch.softmax(torch.randn(5, 64) / 0.04, dim=-1) for _ in range(2)]
    value = DINOLoss(64)(students, teachers)
    grads = torch.autograd.grad(value, students)
    official = torch.zeros(())
    for s in students:
        lsm = torch.log_softmax(s / 0.1, dim=-1)
        for t in teachers:
            official = official - torch.sum(t * lsm, dim=-1).mean()
    torch.testing.assert_close(value, official, rtol=0, atol=0)  # the same operations in the same order
    for got, expected in zip(grads, torch.autograd.grad(official, students)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_sanity_values_at_initialisation_k65536():
    """Spec "Sanity values": uniform predictions give local 16/18 log K and global 2/18 log K."""
    k, batch, n_local = 65536, 2, 8
    loss = DINOLoss(k)
    teacher = loss.softmax_center_teacher(torch.zeros(2 * batch, k), teacher_temp=0.04).view(2, batch, k)
    local = loss([torch.zeros(batch, k)] * n_local, list(teacher.unbind(0))) / 18
    global_ = loss([torch.zeros(2 * batch, k)], [teacher.flip(0).flatten(0, 1)]) * 2 / 18
    assert local.item() == pytest.approx(16 / 18 * math.log(k), rel=1e-6)  # 9.86
    assert global_.item() == pytest.approx(2 / 18 * math.log(k), rel=1e-6)  # 1.23
    # iBOT with half of the images masked: forward_masked gives log K / 2, logged as log K / 4.
    masks = torch.zeros(2 * batch, 4, dtype=torch.bool)
    masks[0, :3] = masks[2, 1] = True
    n = int(masks.sum())
    ibot = iBOTPatchLoss(k).forward_masked(torch.zeros(n, k), torch.full((n, k), 1 / k), student_masks_flat=masks)
    assert ibot.item() == pytest.approx(math.log(k) / 2, rel=1e-6)


def test_ibot_forward_masked_weights_and_padding():
    k = 5
    masks = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)  # 3 + 1 masked
    student = torch.randn(4, k)
    teacher = torch.softmax(torch.randn(4, k), dim=-1)
    ce = soft_cross_entropy(student, teacher, student_temp=0.1)
    expected = (ce[:3].sum() / 3 + ce[3]) / 3  # per-image weights, divided by all 3 images
    loss = iBOTPatchLoss(k)
    torch.testing.assert_close(loss.forward_masked(student, teacher, masks), expected)
    padded_s = torch.cat([student, torch.randn(3, k)])
    padded_t = torch.cat([teacher, torch.rand(3, k)])
    torch.testing.assert_close(loss.forward_masked(padded_s, padded_t, masks, n_masked_patches=4), expected)
    # dense variant: per-image masked mean, images without a mask contribute 0
    dense_s, dense_t = torch.randn(3, 4, k), torch.softmax(torch.randn(3, 4, k), dim=-1)
    dense_ce = soft_cross_entropy(dense_s, dense_t, student_temp=0.1)
    dense_expected = (dense_ce[1, :3].mean() + dense_ce[2, 1]) / 3
    torch.testing.assert_close(loss(dense_s, dense_t, masks), dense_expected)


# ------------------------------------------------------------------------------------------ centring


def test_center_update_is_applied_one_step_late():
    loss = DINOLoss(4, center_momentum=0.9)
    t1 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    loss.softmax_center_teacher(t1, 0.1)
    loss.update_center(t1)
    assert torch.equal(loss.center, torch.zeros(1, 4))  # recorded, not applied
    probs = loss.softmax_center_teacher(t1, 0.1)
    c1 = 0.1 * t1.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss.center, c1)
    torch.testing.assert_close(probs, torch.softmax((t1 - c1) / 0.1, dim=-1))
    t2 = torch.full((3, 4), 5.0)
    loss.update_center(t2)
    loss.softmax_center_teacher(t2, 0.1)
    torch.testing.assert_close(loss.center, 0.9 * c1 + 0.1 * 5.0)


def test_pending_center_update_survives_a_checkpoint():
    teacher = torch.randn(6, 8)
    original = DINOLoss(8)
    original.update_center(teacher)
    state = original.state_dict()
    assert list(state) == ["center"]  # the official checkpoint key, nothing else
    restored = DINOLoss(8)
    restored.load_state_dict(state)
    expected = original.softmax_center_teacher(teacher, 0.1)
    torch.testing.assert_close(restored.softmax_center_teacher(teacher, 0.1), expected)
    torch.testing.assert_close(restored.center, 0.1 * teacher.mean(dim=0, keepdim=True))


def test_loading_a_checkpoint_drops_the_pending_update():
    loss = DINOLoss(8)
    loss.update_center(torch.randn(6, 8))
    saved = {"center": torch.ones(1, 8)}
    loss.load_state_dict(saved)
    loss.softmax_center_teacher(torch.zeros(2, 8), 0.1)
    assert torch.equal(loss.center, saved["center"])


def test_ibot_center_is_the_mean_over_masked_rows():
    rows = torch.randn(7, 5)
    two_d, three_d = iBOTPatchLoss(5), iBOTPatchLoss(5)
    two_d.update_center(rows)
    three_d.update_center(rows.unsqueeze(0))
    two_d.apply_center_update()
    three_d.apply_center_update()
    assert two_d.center.shape == (1, 1, 5)
    torch.testing.assert_close(two_d.center, 0.1 * rows.mean(dim=0).view(1, 1, 5))
    torch.testing.assert_close(three_d.center, two_d.center)
    empty = iBOTPatchLoss(5)
    empty.update_center(torch.zeros(0, 5))  # no masked patch: no NaN (the official gives NaN)
    empty.apply_center_update()
    assert torch.equal(empty.center, torch.zeros(1, 1, 5))


# ------------------------------------------------------------------------------------------ Sinkhorn-Knopp


def test_sinkhorn_marginals():
    """Rows (samples) sum to 1 after the final column step; prototype totals converge to B/K."""
    torch.manual_seed(0)
    logits = torch.randn(16, 10)
    probs = sinkhorn_knopp(logits, 0.5, n_samples_total=16)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(16))
    errors = [
        (sinkhorn_knopp(logits, 0.5, n_samples_total=16, n_iterations=n).sum(dim=0) - 16 / 10).abs().max()
        for n in (1, 3, 30)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5
    torch.testing.assert_close(probs.double(), naive_sinkhorn_f64(logits, 0.5), rtol=1e-5, atol=1e-9)


def test_sinkhorn_exact_where_the_official_overflows():
    torch.manual_seed(0)
    logits = torch.rand(24, 50) * 400 - 200  # logits / T in [-200, 200]: exp overflows in fp32
    logits[3] = -200.0  # a sample far below every prototype's best one: its whole column underflows
    assert not torch.isfinite(torch.exp(logits)).all()
    probs = sinkhorn_knopp(logits, 1.0, n_samples_total=24)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(24))
    torch.testing.assert_close(probs.double(), naive_sinkhorn_f64(logits, 1.0), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ KoLeo


def test_koleo_three_points_by_hand():
    # unit vectors at 0, 60 and 180 degrees (with other norms: KoLeo normalises)
    angles = torch.tensor([0.0, math.pi / 3, math.pi])
    x = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [3.0], [0.5]])
    # nearest neighbours: 0<->60 at distance 1, 180 -> 60 at distance sqrt(3)
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(3) / 6, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_koleo_duplicates_are_finite(dtype):
    x = torch.randn(6, 16)
    x[1] = x[0]
    x = x.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = KoLeoLoss()(x)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(x.grad).all()


def test_koleo_single_sample_is_zero():
    assert KoLeoLoss()(torch.randn(1, 8)).item() == 0.0


# ------------------------------------------------------------------------------------------ two processes


def _two_rank_worker(rank: int, tmp_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_dir}/pg", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        cls_logits, patch_logits = torch.randn(8, 6) * 30, torch.randn(5, 6) * 30
        rows = slice(0, 4) if rank == 0 else slice(4, 8)
        patch_rows = slice(0, 5) if rank == 0 else slice(5, 5)  # rank 1 has no masked patch
        dino, ibot = DINOLoss(6), iBOTPatchLoss(6)
        cls_probs = dino.sinkhorn_knopp_teacher(cls_logits[rows], 0.1)
        n_masked = torch.tensor([patch_rows.stop - patch_rows.start])
        patch_probs = ibot.sinkhorn_knopp_teacher(patch_logits[patch_rows], 0.1, n_masked_patches_tensor=n_masked)
        dino.update_center(cls_logits[rows])
        dino.apply_center_update()
        torch.save((cls_probs, patch_probs, dino.center), f"{tmp_dir}/rank{rank}.pt")
        torch.save(_koleo_values(KOLEO_FEATURES[rows], (None, 2, 1)), f"{tmp_dir}/koleo{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


KOLEO_FEATURES = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))


def _koleo_values(rows: torch.Tensor, group_sizes) -> list:
    """Distributed KoLeo of this rank's ``rows`` for each group size, with the gradient of its own rows."""
    out = []
    for size in group_sizes:
        x = rows.clone().requires_grad_()
        loss = KoLeoLoss(distributed=True, group_size=size)(x)
        loss.backward()
        out.append((loss.detach(), x.grad))
    return out


def _koleo_by_hand(rows: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Mean over ``rows`` of -log(distance to the nearest other row of ``group``), on unit vectors."""
    x, g = torch.nn.functional.normalize(rows, dim=1), torch.nn.functional.normalize(group, dim=1)
    d = torch.cdist(x, g)
    d[d < 1e-6] = float("inf")  # the row itself
    return -torch.log(d.min(dim=1).values + 1e-8).mean()


def _four_rank_koleo_worker(rank: int, tmp_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_dir}/pg4", rank=rank, world_size=4)
    try:
        torch.save(_koleo_values(KOLEO_FEATURES[2 * rank : 2 * rank + 2], (2,)), f"{tmp_dir}/koleo4_{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # four gloo processes (the two-rank test covers the gather over all ranks)
def test_distributed_koleo_over_groups_of_two_of_four_ranks(tmp_path):
    """Group size 2 of 4 ranks: ranks 0-1 search the rows of both, as do ranks 2-3, never the other pair's."""
    mp.spawn(_four_rank_koleo_worker, args=(str(tmp_path),), nprocs=4)
    for rank in range(4):
        ((loss, _),) = torch.load(tmp_path / f"koleo4_{rank}.pt", weights_only=True)
        pair = KOLEO_FEATURES[4 * (rank // 2) : 4 * (rank // 2) + 4]
        assert loss.item() == pytest.approx(_koleo_by_hand(KOLEO_FEATURES[2 * rank : 2 * rank + 2], pair).item(), rel=1e-5)


def test_two_ranks_match_one_process(tmp_path):
    """Global row sums and B over ranks: two ranks with half the batch each give the one-process result."""
    mp.spawn(_two_rank_worker, args=(str(tmp_path),), nprocs=2)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    torch.manual_seed(0)
    cls_logits, patch_logits = torch.randn(8, 6) * 30, torch.randn(5, 6) * 30
    cls_probs = torch.cat([results[0][0], results[1][0]])
    torch.testing.assert_close(cls_probs, sinkhorn_knopp(cls_logits, 0.1, n_samples_total=8))
    torch.testing.assert_close(results[0][1], sinkhorn_knopp(patch_logits, 0.1, n_samples_total=5))
    assert results[1][1].shape == (0, 6)
    for rank in range(2):
        torch.testing.assert_close(results[rank][2], 0.1 * cls_logits.mean(dim=0, keepdim=True))
    # DINOv3's distributed KoLeo: neighbours among both ranks' rows (one group: null or 2), or the rank's own (1)
    for rank in range(2):
        own = KOLEO_FEATURES[4 * rank : 4 * rank + 4]
        (whole, whole_grad), (two, _), (alone, alone_grad) = torch.load(tmp_path / f"koleo{rank}.pt", weights_only=True)
        assert whole.item() == pytest.approx(_koleo_by_hand(own, KOLEO_FEATURES).item(), rel=1e-5)
        assert two.item() == whole.item() and whole_grad.abs().sum() > 0
        x = own.clone().requires_grad_()
        KoLeoLoss()(x).backward()
        assert alone.item() == pytest.approx(_koleo_by_hand(own, own).item(), rel=1e-5)
        torch.testing.assert_close(alone_grad, x.grad)  # a group of one rank: the per-GPU loss


def test_distributed_koleo_in_one_process_is_the_per_gpu_loss():
    x = KOLEO_FEATURES.clone().requires_grad_()
    y = KOLEO_FEATURES.clone().requires_grad_()
    a, b = KoLeoLoss(distributed=True, group_size=16)(x), KoLeoLoss()(y)
    a.backward(), b.backward()
    assert a.item() == b.item() and torch.equal(x.grad, y.grad)
    assert b.item() == pytest.approx(_koleo_by_hand(KOLEO_FEATURES, KOLEO_FEATURES).item(), rel=1e-5)
