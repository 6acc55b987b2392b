"""Chunked head + cross-entropy: equal to the plain DINOHead + DINOLoss / iBOTPatchLoss (values and gradients),
and never keeping a full (rows, K) tensor for backward."""

import pytest
import torch

from dinokit.layers.dino_head import DINOHead
from dinokit.losses import DINOLoss, iBOTPatchLoss
from dinokit.losses.chunked import chunked_dino_loss, chunked_ibot_loss, head_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

K, D, B = 512, 32, 6


def _head() -> DINOHead:
    torch.manual_seed(0)
    head = DINOHead(D, K, hidden_dim=48, bottleneck_dim=16, nlayers=3)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)  # non-trivial norms, so that g's gradient is tested too
    return head


def _probs(rows: int, seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, K, generator=torch.Generator().manual_seed(seed)) * 3, dim=-1)


def _grads(head: DINOHead, inputs: list[torch.Tensor], loss: torch.Tensor) -> list[torch.Tensor]:
    return torch.autograd.grad(loss, [*head.parameters(), *inputs])


def _assert_grads_close(chunked: list[torch.Tensor], plain: list[torch.Tensor]) -> None:
    # fp32 sums in another order: equal to 1e-4 of each gradient's largest entry.
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("chunk_rows", [4, 1000])
def test_chunked_dino_loss_equals_the_plain_one(chunk_rows):
    head = _head()
    generator = torch.Generator().manual_seed(1)
    students = [torch.randn(B, D, generator=generator, requires_grad=True) for _ in range(3)]  # e.g. local crops
    teachers = [_probs(B, 2), _probs(B, 3)]
    plain = DINOLoss(K).forward([head(s) for s in students], teachers)
    chunked = chunked_dino_loss(head, students, teachers, chunk_rows=chunk_rows)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    plain = DINOLoss(K).forward([head(s) for s in students], teachers)
    _assert_grads_close(_grads(head, students, chunked), _grads(head, students, plain))


@pytest.mark.parametrize("chunk_rows", [3, 64])
def test_chunked_ibot_loss_equals_forward_masked(chunk_rows):
    head = _head()
    masks = torch.rand(4, 9, generator=torch.Generator().manual_seed(4)) < 0.5
    masks[3] = False  # an image without masked patches still counts in the division
    n = int(masks.sum())
    tokens = torch.randn(n, D, generator=torch.Generator().manual_seed(5), requires_grad=True)
    targets = _probs(n, 6)
    weights = (1 / masks.sum(-1, keepdim=True).clamp(min=1)).expand_as(masks)[masks]

    def plain():
        return iBOTPatchLoss(K).forward_masked(head(tokens), targets, masks, masks_weight=weights)

    chunked = chunked_ibot_loss(head, tokens, targets, weights, masks.shape[0], chunk_rows=chunk_rows)
    torch.testing.assert_close(chunked, plain(), rtol=1e-6, atol=1e-6)
    _assert_grads_close(_grads(head, [tokens], chunked), _grads(head, [tokens], plain()))


def test_no_full_logit_matrix_is_kept_for_backward():
    # Record every tensor autograd saves: the plain path keeps (rows, K) logits, the chunked one only chunks.
    head = _head()
    rows, chunk = 40, 8
    tokens = torch.randn(rows, D, requires_grad=True)
    targets = _probs(rows, 7)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head_cross_entropy(head, tokens, targets, chunk_rows=chunk).sum().backward()
    assert max(saved) < rows * K and max(saved) >= K * 16  # the (K, bottleneck) prototype matrix is the largest
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        from dinokit.losses import soft_cross_entropy

        soft_cross_entropy(head(tokens), targets, student_temp=0.1).sum().backward()
    assert max(saved) == rows * K
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        head_cross_entropy(head, tokens, targets, chunk_rows=0)
