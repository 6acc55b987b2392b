"""Tensor multi-crop augmentation: operations, distributions against the PIL path, determinism, resume."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dinokit.data import photometric
from dinokit.data import tensor_augment as ta
from dinokit.data.augmentations import DataAugmentationDINO
from dinokit.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _smooth_image(height=48, width=64, seed=0) -> Image.Image:
    # Low-frequency colour fields, so that crops, blur and jitter all change the pixels measurably.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(2 * math.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy + rng.uniform())) for _ in range(3)]
    return Image.fromarray(((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8))


def _pil_path(n_local=2, blur="official") -> DataAugmentationDINO:
    return DataAugmentationDINO(
        (0.32, 1.0), (0.05, 0.32), n_local, global_crops_size=16, local_crops_size=8, blur_probabilities=blur
    )


def _find(pipeline, kind):
    """The single transform of type ``kind`` inside nested Compose/RandomApply, with its RandomApply's p."""
    found = []

    def walk(t, p):
        if isinstance(t, kind):
            found.append((t, p))
        for child in getattr(t, "transforms", []):
            walk(child, t.p if isinstance(t, v2.RandomApply) else p)

    walk(pipeline, 1.0)
    assert len(found) == 1
    return found[0]


# ---------------------------------------------------------------- operations against torchvision


@pytest.mark.parametrize(
    "mine, reference, factors",
    [
        (photometric.adjust_brightness, TF.adjust_brightness, [0.6, 0.9, 1.0, 1.4]),
        (photometric.adjust_contrast, TF.adjust_contrast, [0.6, 0.9, 1.0, 1.4]),
        (photometric.adjust_saturation, TF.adjust_saturation, [0.8, 0.9, 1.0, 1.2]),
        (photometric.adjust_hue, TF.adjust_hue, [-0.1, -0.03, 0.0, 0.1]),
        (photometric.gaussian_blur, lambda t, s: TF.gaussian_blur(t, [9, 9], [s, s]), [0.1, 0.7, 1.3, 2.0]),
    ],
)
def test_per_crop_operations_equal_torchvision_per_image(mine, reference, factors):
    x = torch.rand(4, 3, 12, 15, generator=torch.Generator().manual_seed(0))
    x[:, :, :3] = x[:, :1, :3]  # grey pixels (no hue)
    x[:, 1, 3:5] = x[:, 0, 3:5]  # red and green tied for the largest channel
    out = mine(x.clone(), torch.tensor(factors))
    expected = torch.stack([reference(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)


def test_grayscale_and_solarize_equal_torchvision():
    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(photometric.grayscale(x), TF.rgb_to_grayscale(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(photometric.solarize(x), TF.solarize(x, 128 / 255), rtol=0, atol=0)


def test_crop_without_photometric_changes_matches_the_pil_resize():
    image = _smooth_image()
    params = ta.draw_crop_params(48, 64, global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=1)
    for name in ("flip", "jitter", "grayscale", "blur", "solarize"):
        getattr(params, name).zero_()
    global_crops, local_crops, _ = ta.TensorMultiCrop(global_crops_size=16, local_crops_size=8)(
        [TF.pil_to_tensor(image)], [params]
    )
    normalize = v2.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    for crop, box, size in zip([*global_crops, *local_crops], params.boxes.tolist(), [16, 16, 8]):
        pil = TF.resized_crop(image, *box, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        expected = normalize(TF.to_dtype(TF.pil_to_tensor(pil), torch.float32, scale=True))
        # uint8 bicubic on tensors and in PIL differ by at most one grey level.
        torch.testing.assert_close(crop, expected, rtol=0, atol=1.01 / 255 / 0.224)


# ---------------------------------------------------------------- distributions against the PIL path


def _histogram(values, edges):
    return np.histogram(values, bins=edges)[0] / len(values)


@pytest.mark.parametrize("scale", [(0.32, 1.0), (0.05, 0.32)])
def test_crop_area_and_aspect_histograms_match_torchvision(scale):
    height, width, n = 120, 180, 600
    torch.manual_seed(0)
    reference = np.array([RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ta.CROP_RATIO)) for _ in range(n)])
    mine = ta.random_resized_crop_boxes(height, width, n, scale=scale, generator=torch.Generator().manual_seed(1)).numpy()
    for boxes in (reference, mine):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)  # noqa: E731
    log_aspect = lambda b: np.log(b[:, 3] / b[:, 2])  # noqa: E731
    area_edges = np.linspace(scale[0] * 0.95, scale[1] * 1.05, 6)
    aspect_edges = np.linspace(math.log(0.74), math.log(1.36), 6)
    # 600 draws per side: a bin frequency has a standard deviation of at most 0.02.
    np.testing.assert_allclose(_histogram(area(mine), area_edges), _histogram(area(reference), area_edges), atol=0.07)
    np.testing.assert_allclose(
        _histogram(log_aspect(mine), aspect_edges), _histogram(log_aspect(reference), aspect_edges), atol=0.07
    )
    # Where the box sits: the top-left corner uniform over the free room, as in torchvision.
    free = lambda b: b[:, 0] / np.maximum(height - b[:, 2], 1)  # noqa: E731
    assert abs(free(mine).mean() - free(reference).mean()) < 0.06


def test_centre_crop_fallback_equals_torchvision():
    # No box of ratio in [3/4, 4/3] and area >= 0.9 fits a 10 x 1000 strip: the clamped centre crop.
    expected = RandomResizedCrop.get_params(torch.empty(3, 10, 1000), [0.9, 1.0], list(ta.CROP_RATIO))
    boxes = ta.random_resized_crop_boxes(10, 1000, 3, scale=(0.9, 1.0), generator=torch.Generator().manual_seed(0))
    assert boxes.tolist() == [list(expected)] * 3 == [[0, 493, 10, 13]] * 3


@pytest.mark.parametrize("blur", ["official", "intended", "none"])
def test_per_crop_frequencies_and_jitter_ranges_match_the_pil_path(blur):
    pil = _pil_path(n_local=2, blur=blur)
    n = 500
    generator = torch.Generator().manual_seed(2)
    draws = [
        ta.draw_crop_params(
            60, 80, global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=2,
            blur_probabilities=blur, generator=generator,
        )
        for _ in range(n)
    ]
    frequency = lambda name: torch.stack([getattr(d, name) for d in draws]).float().mean(0).numpy()  # noqa: E731
    crops_pipelines = [pil.global_transfo1, pil.global_transfo2, pil.local_transfo, pil.local_transfo]
    jitter, jitter_p = _find(pil.local_transfo, v2.ColorJitter)
    expected = {
        "flip": [pil.geometric_augmentation_global.transforms[1].p] * 2 + [pil.geometric_augmentation_local.transforms[1].p] * 2,
        "jitter": [jitter_p] * 4,
        "grayscale": [_find(p, v2.RandomGrayscale)[0].p for p in crops_pipelines],
        "blur": [_find(p, v2.GaussianBlur)[1] for p in crops_pipelines],
        "solarize": [0.0, _find(pil.global_transfo2, v2.RandomSolarize)[0].p, 0.0, 0.0],
    }
    for name, probabilities in expected.items():
        # Binomial standard deviation at n = 500 is at most 0.023.
        np.testing.assert_allclose(frequency(name), probabilities, atol=0.075, err_msg=name)
    factors = torch.stack([d.jitter_factors for d in draws]).flatten(0, 1)  # (n * 4 crops, 4)
    ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
    for column, (lo, hi) in zip(factors.T, ranges):
        assert lo <= float(column.min()) < lo + 0.02 and hi - 0.02 < float(column.max()) <= hi
        assert abs(float(column.mean()) - (lo + hi) / 2) < 0.02 * (hi - lo) * 5
    sigma = torch.stack([d.blur_sigma for d in draws])
    sigma_range = _find(pil.local_transfo, v2.GaussianBlur)[0].sigma
    assert sigma_range[0] <= float(sigma.min()) < 0.15 and 1.95 < float(sigma.max()) <= sigma_range[1]
    # All 24 orders of the four jitter operations occur, each about equally often.
    orders = torch.stack([d.jitter_order for d in draws]).flatten(0, 1)
    counts = torch.unique(orders, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and int(counts.min()) > 0.5 * len(orders) / 24


def _texture(height=48, width=64) -> Image.Image:
    # A stationary colour texture: every crop has about the same content, so crop statistics vary by augmentation.
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    waves = [np.sin(2 * math.pi * (xx / p1 + yy / p2)) for p1, p2 in ((5, 7), (6, -4), (-7, 5))]
    pixels = np.array([0.6, 0.45, 0.3]) + 0.25 * np.stack(waves, -1)
    return Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8))


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical distribution functions."""
    pooled = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, pooled, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, pooled, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def test_output_pixel_statistics_match_the_pil_path():
    # Per-crop channel means and contrasts over n samples of one image from both paths: same distributions.
    n = 400
    image = _texture()
    pil = _pil_path(n_local=2)
    source = ta.MultiCropSource((0.32, 1.0), (0.05, 0.32), 2)
    torch.manual_seed(0)
    pil_out = [pil(image) for _ in range(n)]
    samples = [source(image) for _ in range(n)]
    global_crops, local_crops, _ = ta.TensorMultiCrop(global_crops_size=16, local_crops_size=8)(
        [s["image"] for s in samples], [s["params"] for s in samples]
    )
    pairs = {
        "global 1": (torch.stack([o["global_crops"][0] for o in pil_out]), global_crops[:n]),
        "global 2": (torch.stack([o["global_crops"][1] for o in pil_out]), global_crops[n:]),
        "local": (torch.stack([c for o in pil_out for c in o["local_crops"]]), local_crops),
    }
    # Two samples of n from one distribution exceed this distance with probability 1e-5.
    critical = math.sqrt(-0.5 * math.log(1e-5 / 2)) * math.sqrt(2 / n)
    for name, (expected, mine) in pairs.items():
        statistics = [(f"channel {c} mean", lambda t, c=c: t[:, c].mean(dim=(1, 2))) for c in range(3)]
        statistics += [
            ("contrast", lambda t: t.std(dim=(1, 2, 3))),
            ("colourfulness", lambda t: t.std(dim=1).mean(dim=(1, 2))),  # 0 for grayscale crops
            ("sharpness", lambda t: (t[..., 1:] - t[..., :-1]).abs().mean(dim=(1, 2, 3))),  # lowered by blur
        ]
        for label, statistic in statistics:
            assert _ks_distance(statistic(expected), statistic(mine)) < critical, f"{name}: {label}"


# ---------------------------------------------------------------- determinism and resume


# ---------------------------------------------------------------- the config switch


# ---------------------------------------------------------------- Gram teacher crops (high-resolution Gram anchoring)


def test_gram_crops_are_the_global_regions_at_their_own_size_in_both_paths():
    """crops.gram_teacher_crops_size: the same region as each global crop, cut at the larger side, distorted there
    and resized to both (so the Gram crop resized to the global size IS the global crop); the draws are unchanged."""
    from dinokit.data.augmentations import resize_crop

    image = _smooth_image()
    kwargs = dict(global_crops_size=16, local_crops_size=8)
    gram = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, gram_crops_size=32, **kwargs)
    torch.manual_seed(0)
    out = gram(image)
    torch.manual_seed(0)
    plain = _pil_path()(image)
    assert [tuple(c.shape) for c in out["gram_crops"]] == [(3, 32, 32)] * 2 and "gram_crops" not in plain
    for crop, region in zip(out["global_crops"], out["gram_crops"]):
        torch.testing.assert_close(resize_crop(region, 16), crop, rtol=0, atol=0)
    for mine, reference in zip(out["local_crops"], plain["local_crops"]):  # the same random draws
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    # Undistorted Gram crops: with no colour change, global crop 1 (never blurred or solarised officially) is
    # the Gram crop 1 resized.
    undistorted = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, gram_crops_size=32, gram_no_distortions=True,
                                       color_jitter_strength=0, grayscale_probability=0, **kwargs)
    torch.manual_seed(0)
    out = undistorted(image)
    torch.testing.assert_close(resize_crop(out["gram_crops"][0], 16), out["global_crops"][0], rtol=0, atol=1e-5)

    # The tensor path: the same, from the drawn parameters.
    torch.manual_seed(0)
    params = ta.draw_crop_params(48, 64, global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32),
                                 local_crops_number=1)
    params.flip[:] = True  # flips are geometric: the undistorted Gram crops are flipped too
    pixels = [TF.pil_to_tensor(image)]
    global_crops, local_crops, gram_crops = ta.TensorMultiCrop(**kwargs, gram_crops_size=32)(pixels, [params])
    assert gram_crops.shape == (2, 3, 32, 32)
    torch.testing.assert_close(resize_crop(gram_crops, 16), global_crops, rtol=0, atol=0)
    reference_local = ta.TensorMultiCrop(**kwargs)(pixels, [params])[1]
    torch.testing.assert_close(local_crops, reference_local, rtol=0, atol=0)
    for name in ("jitter", "grayscale", "blur", "solarize"):
        getattr(params, name).zero_()
    global_crops, _, gram_crops = ta.TensorMultiCrop(**kwargs, gram_crops_size=32, gram_no_distortions=True)(
        pixels, [params])
    torch.testing.assert_close(resize_crop(gram_crops, 16), global_crops, rtol=0, atol=1e-5)


def test_horizontal_flips_off_in_both_paths():
    """crops.horizontal_flips=false (DINOv3's high-resolution stage): no crop is ever flipped, in the PIL and the
    tensor paths, and every other random draw stays the same."""
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = 120  # left half grey (below the solarize threshold): a flipped crop has it on the right
    image = Image.fromarray(pixels)
    for flips in (True, False):
        transform = DataAugmentationDINO((1.0, 1.0), (1.0, 1.0), 2, global_crops_size=16, local_crops_size=8,
                                         color_jitter_strength=0.0, grayscale_probability=0.0,
                                         blur_probabilities="none", horizontal_flips=flips)
        torch.manual_seed(0)
        sides = [crop[0, :, :4].mean() > crop[0, :, -4:].mean()
                 for _ in range(20) for out in [transform(image)]
                 for crop in (*out["global_crops"], *out["local_crops"])]
        assert all(sides) != flips  # flips on: some crops have the grey half on the right; off: none
    on = ta.draw_crop_params(40, 50, global_crops_scale=(0.3, 1), local_crops_scale=(0.05, 0.3), local_crops_number=8,
                             generator=torch.Generator().manual_seed(1))
    off = ta.draw_crop_params(40, 50, global_crops_scale=(0.3, 1), local_crops_scale=(0.05, 0.3), local_crops_number=8,
                              generator=torch.Generator().manual_seed(1), horizontal_flips=False)
    assert on.flip.any() and not off.flip.any()
    assert torch.equal(on.boxes, off.boxes) and torch.equal(on.jitter_factors, off.jitter_factors)
    assert ta.MultiCropSource((0.3, 1), (0.05, 0.3), 2, horizontal_flips=False)(image)["params"].flip.sum() == 0
