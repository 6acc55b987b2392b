"""dinokit.viz on planted features: PCA pictures, explicit attention, patch matching (commands: test_viz_cli.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinokit.models import build_backbone
from dinokit.viz import (
    attention_maps,
    block_forward_with_attention,
    fit_foreground_classifier,
    fit_pca,
    foreground_masks,
    mass_mask,
    match_features,
    pca_colours,
)
from dinokit.viz.attention import cls_attention_and_norms
from dinokit.viz.pca import median_filter3
from dinokit.errors import DinokitError


# ------------------------------------------------------------------------------------------- synthetic features
def planted_features(seed: int = 0, n_images: int = 3, dim: int = 16):
    """Per image an (h, w, dim) grid: background around one cluster, a planted foreground rectangle made of
    two parts (so that the colour PCA has structure), with noise. The foreground is most of the interior."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=g) * 4  # background, foreground part 1, part 2
    features, masks = [], []
    for i in range(n_images):
        h, w = 9 + i, 12 - i
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[1 : h - 1, 2 : w - 1] = True
        part = torch.zeros(h, w, dtype=torch.long)
        part[mask] = 1
        part[mask & (torch.arange(w) >= w // 2)] = 2
        features.append(centres[part] + 0.3 * torch.randn(h, w, dim, generator=g))
        masks.append(mask)
    return features, masks


def test_pca_matches_numpy_svd():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 9)
    pca = fit_pca(x, k=3)
    xc = x.double().numpy() - x.double().numpy().mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(pca.variances.numpy(), s[:3] ** 2 / (len(x) - 1), rtol=1e-10)
    np.testing.assert_allclose(np.abs((pca.components.numpy() * vt[:3]).sum(1)), 1.0, atol=1e-10)


def test_foreground_recovers_planted_mask_and_colours_are_deterministic():
    features, planted = planted_features()
    assert sum(int(m.sum()) for m in planted) > sum(int((~m).sum()) for m in planted)  # fg is the majority
    masks, _ = foreground_masks(features)
    for mask, truth in zip(masks, planted):
        assert torch.equal(mask, truth)

    picture = pca_colours(features, mode="paper")
    for rgb, fg, truth in zip(picture.rgb, picture.foreground, planted):
        assert rgb.shape == (*truth.shape, 3) and np.array_equal(fg, truth.numpy())
        assert np.all(rgb[~fg] == 0) and rgb[fg].max() == pytest.approx(1.0) and rgb.min() >= 0
        # the two planted foreground parts get different colours
        w = truth.shape[1]
        left, right = rgb[fg & (np.arange(w) < w // 2)].mean(0), rgb[fg & (np.arange(w) >= w // 2)].mean(0)
        assert np.abs(left - right).max() > 0.5

    # any rotation and sign flip of the feature space gives the same picture (signs fixed, not arbitrary)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    for mode in ("paper", "plain", "dinov3"):
        base = pca_colours(features, mode=mode)
        turned = pca_colours([-(f.double() @ q).float() for f in features], mode=mode)
        for a, b in zip(base.rgb, turned.rgb):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_dinov3_mode_whitens_and_uses_sigmoid_colours():
    features, planted = planted_features(seed=3)
    picture = pca_colours(features, mode="dinov3")
    fg = np.concatenate([f.reshape(-1) for f in picture.foreground])
    rgb = np.concatenate([c.reshape(-1, 3) for c in picture.rgb])
    assert np.all(rgb[~fg] == 0)
    projection = np.log(rgb[fg] / (1 - rgb[fg])) / 2  # inverse of sigmoid(2x)
    np.testing.assert_allclose(projection.std(0, ddof=1), 1.0, rtol=1e-3)  # whitened
    np.testing.assert_allclose(projection.mean(0), 0.0, atol=1e-4)


def test_foreground_classifier_from_example_masks():
    features, planted = planted_features(seed=4)
    classifier = fit_foreground_classifier(features[:2], [m.float() for m in planted[:2]])
    # on an image it was not trained on: exact without the median filter; the 3x3 median rounds the corners
    assert torch.equal(classifier.predict(features[2], median=False), planted[2])
    assert torch.equal(classifier.predict(features[2]), median_filter3(planted[2].double()) > 0.5)
    assert int((classifier.predict(features[2]) != planted[2]).sum()) == 4


def test_mass_mask_keeps_the_requested_fraction():
    attention = np.array([[0.5, 0.3], [0.15, 0.05]])
    # sorted ascending 0.05, 0.15, 0.3, 0.5 -> cumulative 0.05, 0.2, 0.5, 1.0
    assert mass_mask(attention, 0.6).tolist() == [[True, True], [False, False]]  # cumulative > 0.4
    assert mass_mask(attention, 0.9).tolist() == [[True, True], [True, False]]  # cumulative > 0.1
    assert mass_mask(np.stack([attention, attention.T]), 0.6).shape == (2, 2, 2)


# ------------------------------------------------------------------------------------------- attention
def _peaked_model(*, registers_attract: bool = False) -> torch.nn.Module:
    """vit_pico, patch 8, 2 registers, with sharp attention (random init is nearly uniform)."""
    torch.manual_seed(0)
    model = build_backbone("vit_pico", patch_size=8, img_size=64, num_register_tokens=2, init_values=1.0)
    d = model.embed_dim
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(20)
        if registers_attract:  # the class token's attention goes partly to the registers in the last block
            qkv = model.blocks[-1].attn.qkv  # rows [q | k | v]
            qkv.weight[:d] /= 4
            qkv.weight[d : 2 * d] = qkv.weight[:d]  # keys = queries: tokens attend to tokens like themselves
            qkv.bias[d : 2 * d] = qkv.bias[:d]
            model.register_tokens.copy_(model.cls_token + model.pos_embed[:, :1])  # registers start as the cls token
    return model.eval()


def test_explicit_attention_equals_sdpa_block():
    model = _peaked_model()
    x = model.prepare_tokens_with_masks(torch.randn(2, 3, 70, 90))  # cropped to 64 x 88: 8 x 11 patches
    for blk in model.blocks:
        with torch.no_grad():
            expected = blk(x)  # scaled_dot_product_attention
            out, weights = block_forward_with_attention(blk, x)
        assert weights.shape == (2, 4, 1 + 2 + 88, 1 + 2 + 88)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 91))
        assert weights.max() > 0.5  # peaked: the comparison is not between two uniform averages
        x = expected


def test_attention_maps_exclude_registers():
    model = _peaked_model(registers_attract=True)
    images = torch.randn(2, 3, 70, 90)
    maps = attention_maps(model, images)
    assert maps.attention[0].shape == (4, 8, 11) and maps.patch_norms[0].shape == (8, 11)
    with torch.no_grad():
        x = model.prepare_tokens_with_masks(images)
        for blk in model.blocks[:-1]:
            x = blk(x)
        _, weights = block_forward_with_attention(model.blocks[-1], x)
        final = model.forward_features(images)["x_prenorm"]
    cls_and_registers = weights[:, :, 0, :3].sum(-1)  # (B, heads)
    assert cls_and_registers.min() > 0.1  # the registers hold attention that the maps must leave out
    for i in range(2):
        np.testing.assert_allclose(maps.attention[i].sum((1, 2)), 1 - cls_and_registers[i].numpy(), atol=1e-5)
        np.testing.assert_allclose(maps.patch_norms[i].reshape(-1), final[i, 3:].norm(dim=-1).numpy(), rtol=1e-5)
    block0 = cls_attention_and_norms(model, images, block=0)["attention"]
    assert not torch.allclose(block0, torch.as_tensor(np.stack(maps.attention)))


# ------------------------------------------------------------------------------------------- matching
def test_mutual_nearest_neighbours_find_a_shift_in_features():
    g = torch.Generator().manual_seed(5)
    big = torch.randn(14, 17, 32, generator=g)
    a = big[:12, :14]
    b = big[2:14, 3:17] + 0.05 * torch.randn(12, 14, 32, generator=g)  # b[i, j] = a[i + 2, j + 3]
    matches = match_features(a, b)
    overlap = 10 * 11  # every patch seen in both; the strongest matches, all with the shift
    assert np.all(matches.points_a[:overlap] - matches.points_b[:overlap] == [2, 3])
    assert len({tuple(p) for p in matches.points_a[:overlap]}) == overlap
    # anything after them pairs unrelated noise patches, at a far larger distance
    assert np.all(matches.distance[overlap:] > 10 * matches.distance[overlap - 1])
    assert np.all(np.diff(matches.distance) >= 0)
    spaced = match_features(a, b, max_matches=5, min_spacing=3)
    assert len(spaced.distance) == 5
    assert all(np.abs(p - q).max() >= 3 for i, p in enumerate(spaced.points_a) for q in spaced.points_a[:i])


def test_assignment_matching_pairs_one_to_one_at_least_total_distance():
    """The paper's assignment problem: min(Na, Nb) one-to-one pairs whose total distance is the least of all
    pairings (checked by brute force on 5 x 5), and the shifted grid found as by mutual nearest neighbours."""
    import itertools

    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 5, 4, generator=g), torch.randn(1, 5, 4, generator=g)
    matches = match_features(a, b, method="assignment")
    assert sorted(matches.points_a[:, 1].tolist()) == sorted(matches.points_b[:, 1].tolist()) == list(range(5))
    dist = torch.cdist(a[0].double(), b[0].double())
    best = min(sum(float(dist[i, j]) for i, j in enumerate(perm)) for perm in itertools.permutations(range(5)))
    assert float(matches.distance.sum()) == pytest.approx(best, rel=1e-6)
    big = torch.randn(14, 17, 32, generator=g)
    shifted = match_features(big[:12, :14], big[2:14, 3:17] + 0.05 * torch.randn(12, 14, 32, generator=g),
                             method="assignment")
    assert np.all(shifted.points_a[:110] - shifted.points_b[:110] == [2, 3])
    with pytest.raises(DinokitError, match="unknown matching method 'hungarian'; use mutual or assignment"):
        match_features(a, b, method="hungarian")


def test_median_filter_pads_with_zeros_as_scipy_medfilt2d():
    ones = torch.ones(4, 5)
    filtered = median_filter3(ones)
    corners = [(0, 0), (0, 4), (3, 0), (3, 4)]
    assert all(filtered[c] == 0 for c in corners) and int((filtered == 1).sum()) == 20 - 4  # edges: 6 ones of 9
    x = torch.rand(6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scipy_signal = pytest.importorskip("scipy.signal")
    np.testing.assert_array_equal(median_filter3(x).numpy(), scipy_signal.medfilt2d(x.numpy(), 3))


def test_an_integer_tensor_other_than_uint8_is_one_line_not_raw_pixels_taken_as_normalised():
    """int64, int32 or uint16 tensors went into the model as if ImageNet-normalised (values up to 65535)."""
    from dinokit.viz.prepare import prepare_image

    model = build_backbone("vit_pico", patch_size=8, img_size=32)
    pixels = torch.randint(0, 256, (3, 16, 16), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.int64, torch.int32, torch.uint16):
        with pytest.raises(DinokitError, match=rf"^a {dtype} image tensor is ambiguous: give uint8 pixels"):
            prepare_image(model, pixels.to(dtype), image_size=16)
    eight_bit = prepare_image(model, pixels.to(torch.uint8), image_size=16).tensor
    assert -2.2 < eight_bit.min() and eight_bit.max() < 2.7  # normalised
    assert torch.equal(prepare_image(model, eight_bit, image_size=16).tensor, eight_bit)  # floats: as they are


def test_pca_and_matching_take_one_grid_a_batch_or_grids_that_require_grad():
    """One (h, w, D) grid was 'Boolean value of Tensor ... is ambiguous', and grids that require grad (features of
    a model being trained) failed at the first .numpy()."""
    from dinokit.viz.match import match_features
    from dinokit.viz.pca import pca_colours

    torch.manual_seed(0)
    grids = torch.randn(2, 4, 5, 8)
    reference = pca_colours(list(grids), mode="plain")
    for given in (grids, list(grids.clone().requires_grad_())):
        picture = pca_colours(given, mode="plain")
        assert all(np.array_equal(a, b) for a, b in zip(picture.rgb, reference.rgb))
    assert pca_colours(grids[0], mode="plain").rgb[0].shape == (4, 5, 3)
    one = pca_colours(grids[0], mode="plain").rgb[0]
    assert np.array_equal(pca_colours(grids[0].numpy(), mode="plain").rgb[0], one)
    with pytest.raises(DinokitError, match=r"^no feature grid was given: give the \(h, w, D\) grids"):
        pca_colours([], mode="plain")  # a traceback from torch.cat; a numpy grid was taken as h grids of (w, D)
    with pytest.raises(DinokitError, match=r"a feature grid has shape \(20, 8\), not \(h, w, D\)"):
        pca_colours([grids[0].reshape(20, 8)], mode="plain")
    matches = match_features(grids[0].clone().requires_grad_(), grids[1])
    assert np.array_equal(matches.points_a, match_features(grids[0], grids[1]).points_a)


def test_unique_stems_suffix_clashing_names():
    """Output names of pca/attention (and dense predict): a clash gets -2, -3, ..., never another input's own name."""
    from dinokit.viz.drawing import unique_stems

    assert unique_stems(["x0", "x1"]) == ["x0", "x1"]
    assert unique_stems(["x0", "x0", "x0"]) == ["x0", "x0-2", "x0-3"]
    assert unique_stems(["x0", "x0", "x0-2"]) == ["x0", "x0-3", "x0-2"]  # x0-2 belongs to the third input
    assert unique_stems(["x0-2", "x0", "x0"]) == ["x0-2", "x0", "x0-3"]
    # inputs sharing a stem are told apart by what differs (both wrote a_pca.png and a-2_pca.png, untraceable)
    assert unique_stems(["d/a.png", "d/a.JPG", "d/b.png"]) == ["a_png", "a_jpg", "b"]
    assert unique_stems(["x/a.png", "y/a.png"]) == ["x_a", "y_a"]
    assert unique_stems(["x/a.png", "x/a.jpg", "y/a.png"]) == ["x_a_png", "x_a_jpg", "y_a_png"]
    # a legal 251-byte name: its stem shortened, so that NAME_attention.png fits 255 bytes (it failed the command)
    long = unique_stems(["n" * 247 + "a.png", "n" * 247 + "b.png", "é" * 150 + ".png"])
    assert all(len(f"{s}_attention.png".encode()) <= 255 for s in long) and len(set(long)) == 3
    assert long[0].startswith("n" * 150) and long[2].startswith("é" * 90)
