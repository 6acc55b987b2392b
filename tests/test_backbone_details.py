"""Details of stochastic depth: DropPath's rescaling, the per-block rates, and where the batch-subset form starts."""

from __future__ import annotations

import pytest
import torch

from dinokit.layers.block import Block
from dinokit.layers.drop_path import DropPath
from dinokit.models import DinoVisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_drop_path_keeps_samples_rescaled_by_one_over_keep():
    """DropPath(0.25) in training zeroes whole samples and scales the kept ones by 1/0.75: values {0, 4/3}, mean ~1."""
    torch.manual_seed(0)
    module = DropPath(0.25).train()
    out = module(torch.ones(4000, 3, 2))
    per_sample = out.flatten(1)
    assert (per_sample == per_sample[:, :1]).all()  # one draw per sample
    assert sorted(set(per_sample[:, 0].tolist())) == pytest.approx([0.0, 4 / 3])
    kept = per_sample[:, 0] > 0
    torch.testing.assert_close(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.75))
    assert abs(out.mean().item() - 1.0) < 0.05
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    torch.testing.assert_close(module.eval()(torch.ones(5, 2)), torch.ones(5, 2))  # identity in eval


def test_drop_path_rates_grow_linearly_over_depth_unless_uniform():
    """drop_path_uniform=False: block i gets r * i / (depth - 1), from 0 at the first block to r at the last."""
    kwargs = dict(img_size=16, patch_size=8, embed_dim=8, depth=5, num_heads=2)
    linear = DinoVisionTransformer(**kwargs, drop_path_rate=0.4)
    assert [b.drop_path_rate for b in linear.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    uniform = DinoVisionTransformer(**kwargs, drop_path_rate=0.4, drop_path_uniform=True)
    assert [b.drop_path_rate for b in uniform.blocks] == pytest.approx([0.4] * 5)


def _attention_batch_sizes(rate: float, *, nested: bool = False, batch: int = 20) -> list[int]:
    """The batch sizes the attention branch of a training Block at ``rate`` sees in one forward."""
    torch.manual_seed(0)
    block = Block(8, num_heads=2, drop_path=rate).train()
    seen = []
    block.attn.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    block(torch.randn(batch, 3, 8), nested=nested)
    return seen


def test_batch_subset_drop_path_starts_above_0_1():
    """At exactly 0.1 a lone tensor takes per-sample DropPath (the branch sees the whole batch); above 0.1, and for a
    crop set of a list at any rate, the branch sees the subset of int(B * (1 - p)) samples."""
    assert _attention_batch_sizes(0.1) == [20]
    assert _attention_batch_sizes(0.1 + 1e-6) == [17]  # int(20 * 0.899999)
    assert _attention_batch_sizes(0.2) == [16]
    assert _attention_batch_sizes(0.1, nested=True) == [18]


def test_block_at_rate_0_1_drops_whole_samples_of_each_branch_with_rescaling():
    """At rate 0.1 (per-sample DropPath) each residual branch output is either dropped or scaled by 1/0.9."""
    torch.manual_seed(0)
    block = Block(8, num_heads=2, drop_path=0.1, ffn_layer="identity").train()
    branch = []
    block.attn.register_forward_hook(lambda module, args, out: branch.append(out.detach()))
    x = torch.randn(200, 3, 8)
    torch.manual_seed(1)
    after_attn = block._residual(x, block._attn_branch, block.drop_path1, False)
    (attn,) = branch
    delta = (after_attn - x).flatten(1)
    dropped = delta.abs().amax(dim=1) == 0
    assert 5 <= int(dropped.sum()) <= 40  # about 10% of 200, a binomial draw (not the subset's exactly 20)
    torch.testing.assert_close(delta[~dropped], attn.flatten(1)[~dropped] / 0.9)
