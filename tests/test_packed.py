"""Packed multi-crop forward: equal to the per-crop-set forward (fp32, atol 1e-5), values and gradients."""

import pytest
import torch

from dinokit.models import build_backbone
from dinokit.models.packed import forward_features_packed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")


def _model(**kwargs):
    torch.manual_seed(0)
    model = build_backbone("vit_pico", patch_size=8, img_size=32, **kwargs)
    model.init_weights()
    with torch.no_grad():  # LayerScale away from 1 and a non-zero mask token, so that both matter
        for block in model.blocks:
            for ls in (block.ls1, block.ls2):
                if hasattr(ls, "gamma"):
                    ls.gamma.uniform_(0.2, 1.5)
        model.mask_token.normal_()
    return model


def _crops():
    generator = torch.Generator().manual_seed(1)
    global_crops = torch.randn(4, 3, 32, 32, generator=generator)
    local_crops = torch.randn(6, 3, 16, 16, generator=generator)
    masks = torch.rand(4, 16, generator=generator) < 0.4
    return [global_crops, local_crops], [masks, None]


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(num_register_tokens=2, ffn_layer="swiglu"), dict(init_values=None)],
    ids=["mlp", "registers-swiglu", "no-layerscale"],
)
def test_packed_equals_per_crop_set_forward_values_and_gradients(kwargs):
    model = _model(**kwargs).eval()
    x_list, masks_list = _crops()
    expected = model.forward_features_list(x_list, masks_list)
    packed = forward_features_packed(model, x_list, masks_list)
    assert len(packed) == 2
    for a, b in zip(expected, packed):
        for key in KEYS:
            assert a[key].shape == b[key].shape
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
        assert b["masks"] is a["masks"]

    def grads(outputs):
        model.zero_grad()
        loss = sum((out["x_norm_clstoken"] ** 2).sum() + out["x_norm_patchtokens"].mean() for out in outputs)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    reference = grads(model.forward_features_list(x_list, masks_list))
    mine = grads(forward_features_packed(model, x_list, masks_list))
    assert reference.keys() == mine.keys() and "blocks.0.attn.qkv.weight" in mine
    for name in reference:
        torch.testing.assert_close(mine[name], reference[name], rtol=0, atol=1e-4, msg=name)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.filterwarnings("ignore:.*without torch.compile")
def test_flex_attention_packing_equals_per_crop_set_forward():
    # One flex_attention call per block over all crops, block-diagonal mask (eager here: exact but unfused).
    # Forward only: this torch has no flex_attention backward on CPU.
    model = _model(num_register_tokens=1).eval().requires_grad_(False)
    x_list, masks_list = _crops()
    expected = model.forward_features_list(x_list, masks_list)
    for a, b in zip(expected, forward_features_packed(model, x_list, masks_list, attention="flex")):
        for key in KEYS:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    # Training with batch-subset drop path packs a subset of the crops: the mask follows.
    model = _model(drop_path_rate=0.5, drop_path_uniform=True).train().requires_grad_(False)
    outputs = forward_features_packed(model, x_list, masks_list, attention="flex")
    assert [o["x_prenorm"].shape for o in outputs] == [(4, 17, 64), (6, 5, 64)]
    with pytest.raises(ValueError, match="unknown attention 'xformers'"):
        forward_features_packed(model, x_list, masks_list, attention="xformers")


def test_packed_training_with_stochastic_depth():
    # Training mode without drop path: still equal. With DINOv2's batch-subset drop path (rate 0.5 > 0.1):
    # for a block whose branches are switched off (LayerScale 0), exactly the identity; otherwise finite
    # and different from evaluation (the branches of a subset of samples were skipped).
    x_list, masks_list = _crops()
    model = _model().train()
    expected = model.forward_features_list(x_list, masks_list)
    for a, b in zip(expected, forward_features_packed(model, x_list, masks_list)):
        torch.testing.assert_close(b["x_prenorm"], a["x_prenorm"], rtol=0, atol=1e-5)

    for rate in (0.05, 0.5):  # crop sets take the batch-subset form at any rate, as forward_features_list
        model = _model(drop_path_rate=rate, drop_path_uniform=True).train()
        with torch.no_grad():
            for block in model.blocks:
                block.ls1.gamma.zero_()
                block.ls2.gamma.zero_()
        tokens = [model.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        for out, t in zip(forward_features_packed(model, x_list, masks_list), tokens):
            torch.testing.assert_close(out["x_prenorm"], t, rtol=0, atol=0)

        model = _model(drop_path_rate=rate, drop_path_uniform=True).train()
        torch.manual_seed(3)
        train_out = forward_features_packed(model, x_list, masks_list)
        eval_out = forward_features_packed(model.eval(), x_list, masks_list)
        for a, b in zip(train_out, eval_out):
            assert torch.isfinite(a["x_prenorm"]).all() and not torch.allclose(a["x_prenorm"], b["x_prenorm"])


def test_the_packed_block_compiles_as_one_graph_for_every_block():
    """``train.compile`` with ``train.packed_crops`` runs ``torch.compile(packed_block)``: dynamo must capture a
    block whole (fullgraph: no graph break) and reuse that graph for every block of the same structure."""
    from torch._dynamo.testing import CompileCounter

    from dinokit.models.packed import packed_block

    model = _model().eval()
    x_list, masks_list = _crops()
    expected = model.forward_features_list(x_list, masks_list)
    counter = CompileCounter()  # a backend that counts the graphs it is given and runs them eagerly
    torch._dynamo.reset()
    compiled = torch.compile(packed_block, backend=counter, fullgraph=True, dynamic=False)
    for a, b in zip(expected, forward_features_packed(model, x_list, masks_list, block_fn=compiled)):
        for key in KEYS:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    assert counter.frame_count == 1 and len(model.blocks) == 4  # one graph for the four blocks


def test_compile_with_packed_crops_swaps_in_a_compiled_block_function():
    from types import SimpleNamespace

    from dinokit.models.packed import packed_block
    from dinokit.train.train import compile_objective

    for compile_, packed, swapped in ((True, True, True), (True, False, False), (False, True, False)):
        task = SimpleNamespace(packed_block_fn=packed_block)
        compile_objective(task, SimpleNamespace(compile=compile_, packed_crops=packed, compile_loss=False))
        assert (task.packed_block_fn is not packed_block) == swapped
