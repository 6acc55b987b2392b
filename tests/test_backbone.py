"""The backbone contract: numerical parity with the official code (golden outputs), hub shapes,
position-embedding interpolation and cache, intermediate layers, list input, cropping and masks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinokit.models import DinoVisionTransformer, create_model, load_backbone_weights

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("DINOKIT_GOLDEN_DIR", REPO / "tests" / "golden"))  # tests/golden/README.md
GOLDEN_NAMES = ("tiny", "tiny_reg4", "tiny_swiglu")
SIZE_TAGS = ("224x224", "280x364", "518x518", "98x98")
FEATURE_KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")

def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def tiny_vit(**overrides) -> DinoVisionTransformer:
    torch.manual_seed(0)
    kwargs = dict(img_size=98, patch_size=14, embed_dim=32, depth=3, num_heads=2, init_values=1.0)
    return DinoVisionTransformer(**{**kwargs, **overrides}).eval()


# ------------------------------------------------------------------------------------------- golden parity
def golden_outputs_of(model: DinoVisionTransformer, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every output named in the golden README, computed by dinokit."""
    out: dict[str, torch.Tensor] = {}
    for tag in SIZE_TAGS:
        x, masks = inputs[f"{tag}.input"].float(), inputs[f"{tag}.masks"]
        out[f"{tag}.forward"] = model(x)
        for prefix, m in (("forward_features", None), ("masked", masks)):
            feats = model.forward_features(x, masks=m)
            for key in FEATURE_KEYS:
                out[f"{tag}.{prefix}.{key}"] = feats[key]
        pairs = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, norm=True)
        for i, (patch, cls) in enumerate(pairs):
            out[f"{tag}.intermediate_n2_reshape_cls_norm.{i}.patch"] = patch
            out[f"{tag}.intermediate_n2_reshape_cls_norm.{i}.cls"] = cls
        (patch0,) = model.get_intermediate_layers(x, n=[0], reshape=False, norm=False)
        out[f"{tag}.intermediate_idx0_nonorm.0.patch"] = patch0
    crops = model.forward_features([inputs["list.0.input"].float(), inputs["list.1.input"].float()])
    for j, feats in enumerate(crops):
        out[f"list.{j}.x_norm_clstoken"] = feats["x_norm_clstoken"]
        out[f"list.{j}.x_norm_patchtokens"] = feats["x_norm_patchtokens"]
    return out


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_parity(name: str) -> None:
    kwargs = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    model = DinoVisionTransformer(**kwargs).eval()
    load_backbone_weights(model, GOLDEN_DIR / f"{name}.pth")
    inputs = torch.load(GOLDEN_DIR / "inputs.pt", weights_only=True)
    expected = torch.load(GOLDEN_DIR / f"{name}_outputs.pt", weights_only=True)
    with torch.no_grad():
        actual = golden_outputs_of(model, inputs)
    assert set(actual) == set(expected)
    for key, want in expected.items():
        got = actual[key]
        assert got.shape == want.shape, key
        if want.numel():
            assert relative_error(got, want) < 1e-5, key


# ------------------------------------------------------------------------------------------- hub shapes
@pytest.mark.parametrize("name, registers", [("dinov2_vits14", 0), ("dinov2_vits14_reg", 4)])
def test_hub_small_output_shapes_at_56px(name: str, registers: int) -> None:
    model = create_model(name).eval()  # random init at img_size 518, as the released model
    assert model.pos_embed.shape == (1, 1370, 384)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        feats = model.forward_features(x)
        cls = model(x)
    assert cls.shape == (2, 384)
    assert torch.equal(cls, feats["x_norm_clstoken"])
    assert feats["x_norm_regtokens"].shape == (2, registers, 384)
    assert feats["x_norm_patchtokens"].shape == (2, 16, 384)
    assert feats["x_prenorm"].shape == (2, 1 + registers + 16, 384)


# ------------------------------------------------------------------------------------------- position embedding
@pytest.mark.parametrize("height, width", [(56, 84), (126, 126), (98, 98)])
def test_pos_embed_interpolation_uses_scale_factor_with_offset(height: int, width: int) -> None:
    model = tiny_vit(interpolate_offset=0.1, interpolate_antialias=False)
    m = 7  # 98 px / 14
    h0, w0 = height // 14, width // 14
    tokens = torch.zeros(1, 1 + h0 * w0, 32)
    with torch.no_grad():
        got = model.interpolate_pos_encoding(tokens, height, width)
        grid = model.pos_embed[:, 1:].reshape(1, m, m, 32).permute(0, 3, 1, 2)  # (1, D, M, M)
        want = F.interpolate(grid, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False)
        want = torch.cat([model.pos_embed[:, :1], want.permute(0, 2, 3, 1).reshape(1, h0 * w0, 32)], dim=1)
        by_size = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=False)
    if (h0, w0) == (m, m):
        assert got is model.pos_embed  # same grid, square image: the stored embedding unchanged
        return
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the offset matters: a size= interpolation gives other values
    assert not torch.allclose(want[:, 1:], by_size.permute(0, 2, 3, 1).reshape(1, h0 * w0, 32))


def test_pos_embed_interpolation_register_mode_uses_size_and_antialias() -> None:
    model = tiny_vit(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    h0, w0 = 4, 6
    with torch.no_grad():
        got = model.interpolate_pos_encoding(torch.zeros(1, 1 + h0 * w0, 32), 56, 84)
        grid = model.pos_embed[:, 1:].reshape(1, 7, 7, 32).permute(0, 3, 1, 2)  # (1, D, M, M)
        want = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=True)
        no_aa = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=False)
    torch.testing.assert_close(got[:, 1:], want.permute(0, 2, 3, 1).reshape(1, h0 * w0, 32), rtol=0, atol=0)
    torch.testing.assert_close(got[:, :1], model.pos_embed[:, :1], rtol=0, atol=0)
    assert not torch.allclose(want, no_aa)


def test_interpolated_pos_embed_follows_every_change_of_the_weights_and_settings() -> None:
    """A cache keyed on the weights' version counter kept the first interpolation through writes via ``.data`` (an
    EMA teacher updated the way many training loops do) and through changed interpolation settings."""
    torch.manual_seed(0)
    model, x = tiny_vit().eval(), torch.randn(1, 3, 56, 70)

    def fresh(m):
        other = tiny_vit().eval()
        other.load_state_dict(m.state_dict())
        other.interpolate_offset, other.interpolate_antialias = m.interpolate_offset, m.interpolate_antialias
        return other(x)

    with torch.no_grad():
        model(x)
        model.pos_embed.data.add_(torch.randn_like(model.pos_embed))  # the version counter does not move
        torch.testing.assert_close(model(x), fresh(model), rtol=0, atol=0)
        model.interpolate_offset, model.interpolate_antialias = 0.0, True
        torch.testing.assert_close(model(x), fresh(model), rtol=0, atol=0)


def test_a_model_built_under_inference_mode_runs_at_any_size() -> None:
    """Its tensors have no version counter: reading it for the cache key was a RuntimeError at a non-native size."""
    with torch.inference_mode():
        model = tiny_vit()
        x = torch.randn(1, 3, 56, 70)
        out = model(x)
    reference = tiny_vit()
    reference.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)

# ------------------------------------------------------------------------------------------- intermediate layers
def test_get_intermediate_layers_contract() -> None:
    model = tiny_vit(num_register_tokens=4)
    x = torch.randn(2, 3, 70, 98)  # 5 x 7 patches
    with torch.no_grad():
        last_two = model.get_intermediate_layers(x, n=2)
        by_index = model.get_intermediate_layers(x, n=[2, 1])  # listed indices come back in block order
        raw = model.get_intermediate_layers(x, n=[1, 2], norm=False)
        maps = model.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True)
        feats = model.forward_features(x)
    assert len(last_two) == 2 and all(t.shape == (2, 35, 32) for t in last_two)  # registers never returned
    for a, b in zip(last_two, by_index):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for normed, plain in zip(last_two, raw):
        torch.testing.assert_close(normed, model.norm(plain), rtol=0, atol=0)
    torch.testing.assert_close(last_two[-1], feats["x_norm_patchtokens"], rtol=0, atol=0)
    torch.testing.assert_close(raw[-1], feats["x_prenorm"][:, 5:], rtol=0, atol=0)
    ((patch_map, cls),) = maps
    assert patch_map.shape == (2, 32, 5, 7)
    torch.testing.assert_close(cls, feats["x_norm_clstoken"], rtol=0, atol=0)
    # (B, D, h, w) map: position (i, j) is patch token i * w + j
    torch.testing.assert_close(patch_map[:, :, 3, 2], feats["x_norm_patchtokens"][:, 3 * 7 + 2], rtol=0, atol=0)
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, n=4)
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, n=[3])


def test_list_input_equals_separate_calls() -> None:
    model = tiny_vit(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    a, b = torch.randn(2, 3, 98, 98), torch.randn(3, 3, 42, 56)
    masks = torch.rand(2, 49) > 0.5
    with torch.no_grad():
        together = model.forward_features([a, b], masks=[masks, None])
        alone = [model.forward_features(a, masks=masks), model.forward_features(b)]
    for joint, single in zip(together, alone):
        for key in FEATURE_KEYS:
            torch.testing.assert_close(joint[key], single[key], rtol=1e-6, atol=1e-6)


def test_input_is_centre_cropped_to_a_patch_multiple() -> None:
    model = tiny_vit()
    x = torch.randn(1, 3, 230, 240)
    with torch.no_grad():
        got = model.forward_features(x)
        want = model.forward_features(x[:, :, 3:227, 1:239])  # 230 -> 224 (3 off the top), 240 -> 238 (1 off the left)
    assert got["x_norm_patchtokens"].shape == (1, 16 * 17, 32)
    torch.testing.assert_close(got["x_prenorm"], want["x_prenorm"], rtol=0, atol=0)


def test_masked_patches_take_the_mask_token_before_the_position_embedding() -> None:
    model = tiny_vit()
    with torch.no_grad():
        model.mask_token.normal_()
        x = torch.randn(2, 3, 56, 56)
        masks = torch.zeros(2, 16, dtype=torch.bool)
        masks[0, [0, 5, 15]] = True
        tokens = model.prepare_tokens_with_masks(x, masks)
        patches = model.patch_embed(x)  # (B, N, D)
        patches[masks] = model.mask_token.to(patches.dtype)
        want = torch.cat([model.cls_token.expand(2, -1, -1), patches], dim=1)
        want = want + model.interpolate_pos_encoding(want, 56, 56)
        unmasked = model.forward_features(x, masks=torch.zeros_like(masks))
        plain = model.forward_features(x)
        masked = model.forward_features(x, masks=masks)
    torch.testing.assert_close(tokens, want, rtol=0, atol=0)
    torch.testing.assert_close(unmasked["x_prenorm"], plain["x_prenorm"], rtol=0, atol=0)
    # image 1 has no masked patch, so only image 0 changes
    torch.testing.assert_close(masked["x_prenorm"][1], plain["x_prenorm"][1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(masked["x_prenorm"][0], plain["x_prenorm"][0])
    assert masked["masks"] is masks


def test_batch_subset_drop_path_adds_the_rescaled_branch_to_the_drawn_samples_only() -> None:
    """The official stochastic depth above rate 0.1: the branch runs on a random subset of the batch and is added to
    those samples, scaled by batch / subset; the result is a new tensor, not a view (FSDP2 warns about views)."""
    from dinokit.layers.drop_path import subset_residual

    torch.manual_seed(0)
    x, w = torch.randn(8, 5, 6), torch.randn(6, 6)
    torch.manual_seed(1)
    out = subset_residual(x, lambda t: t @ w, 0.4)
    torch.manual_seed(1)
    drawn = torch.randperm(8)[:4]  # int(8 * 0.6) = 4 samples
    want = x.clone()
    want[drawn] += 2.0 * (x[drawn] @ w)
    torch.testing.assert_close(out, want)
    assert not out._is_view()


def test_crop_lists_take_the_batch_subset_drop_path_at_any_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The official nested (crop list) forward uses the batch-subset form whenever the rate is above 0; a lone
    tensor only above 0.1 (classic per-sample drop path below)."""
    from dinokit.layers import block as block_module

    sizes = []
    real = block_module.subset_residual

    def counted(x, branch, rate):
        sizes.append(x.shape[0])
        return real(x, branch, rate)

    monkeypatch.setattr(block_module, "subset_residual", counted)
    model = tiny_vit(drop_path_rate=0.05, drop_path_uniform=True).train()
    crops = [torch.randn(10, 3, 28, 28), torch.randn(4, 3, 14, 14)]
    model.forward_features(crops)
    assert sizes == [10, 10, 4, 4] * len(model.blocks)  # two residuals per block, per crop set
    sizes.clear()
    model.forward_features(crops[0])  # a lone tensor at 0.05: the per-sample Bernoulli form
    assert sizes == []


def test_patch_embed_keeps_the_grid_without_flattening() -> None:
    """The official flatten_embedding=False: (B, H/p, W/p, D), the same numbers as the flat (B, N, D) tokens."""
    from dinokit.layers.patch_embed import PatchEmbed

    flat = PatchEmbed(img_size=28, patch_size=14, embed_dim=8)
    grid = PatchEmbed(img_size=28, patch_size=14, embed_dim=8, flatten_embedding=False)
    grid.load_state_dict(flat.state_dict())
    x = torch.randn(2, 3, 28, 42)
    tokens, maps = flat(x), grid(x)
    assert tokens.shape == (2, 6, 8) and maps.shape == (2, 2, 3, 8)
    torch.testing.assert_close(maps.flatten(1, 2), tokens, rtol=0, atol=0)
