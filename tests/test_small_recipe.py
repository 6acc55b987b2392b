"""The ``small`` preset's colour knobs, and its learning proofs on sets that are not the sample set.

Both proofs run ``benchmarks/small_data.py``'s own code, loaded from that file by path so that the benchmark and
the tests share one implementation: the teacher must beat the same network at random initialisation and k-NN
on raw pixels.

- In the default run: the benchmark's ``families`` set (eight grey texture families that the sample set does
  not hold: zigzag, waves, crosses, hex dots, ...), the preset shortened to 300 iterations (its schedules
  compressed: 6 epochs of 50 iterations, warm-ups of one epoch), about 2.5 minutes.
- Slow (900 iterations, about 6 minutes on one idle core): the benchmark's coloured ``patterns`` run, where the
  preset must learn past random colours; it needs the whole run (no gain by 300 iterations).

The full table, with the sets where the preset does NOT win, is in the README ("Small-data recipe").
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def small_data(load_benchmark):
    return load_benchmark("small_data")


FAST_ITERATIONS = 300
FAST_SCHEDULE = ["optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1"]  # 6 epochs of 50 iterations


def test_small_preset_learns_new_texture_families_in_300_iterations(tmp_path, small_data):
    root = small_data.prepare_set("families", tmp_path)
    cfg, snapshot, _, iterations, _ = small_data.train_preset(root, "small", tmp_path / "run", FAST_ITERATIONS,
                                                              FAST_SCHEDULE)
    assert iterations == FAST_ITERATIONS and snapshot.parent.name == f"training_{FAST_ITERATIONS - 1}"
    assert (cfg.optim.epochs, cfg.crops.global_crops_size, cfg.student.arch) == (6, 64, "vit_pico")
    raw = small_data.raw_pixel_knn(root, cfg.crops.global_crops_size)
    random_init = small_data.network_knn(root, cfg, None)
    trained = small_data.network_knn(root, cfg, snapshot)
    print(f"k-NN top-1: raw pixels {raw:.1f}%, random init {random_init:.1f}%, trained {trained:.1f}%")
    # measured 2026-12-04 (one thread, chance 12.5%): 37.5% trained, 26.5% raw pixels, 20.5% random init. With
    # the preset's earlier lr (0.02), 200 iterations reached 39.0% (and 36.0 / 50.8 / 47.2% with seeds 0 / 1 / 2 on
    # another draw of the families); its lr of 0.005 learns slower (28.5% after 200), hence 300. The full
    # 900-iteration preset: 70.8 / 75.2% (seeds 0 / 1; README)
    assert trained >= random_init + 10, (trained, random_init)
    assert trained >= raw + 4, (trained, raw)


@pytest.mark.slow
def test_small_preset_learns_a_set_other_than_the_sample_set(tmp_path, small_data):
    """The benchmark's run of the preset on coloured patterns (900 iterations, about 6 minutes on one idle core)."""
    root = small_data.prepare_set("patterns", tmp_path)
    cfg, snapshot, _, iterations, _ = small_data.train_preset(root, "small", tmp_path / "run", None, [])
    assert iterations == 900 and snapshot.parent.name == "training_899"
    size = cfg.crops.global_crops_size
    raw = small_data.raw_pixel_knn(root, size)
    random_init = small_data.network_knn(root, cfg, None)
    trained = small_data.network_knn(root, cfg, snapshot)
    print(f"k-NN top-1: raw pixels {raw:.1f}%, random init {random_init:.1f}%, trained {trained:.1f}%")
    # measured 2026-12-04 (lr 0.005): 26.2% trained here (2 threads), 24.0 / 25.8% in the benchmark's runs (1 thread,
    # seeds 0 / 1, k-NN monitor every 300 iterations); 16.8% raw pixels, 11.8% random init (chance 12.5%). Room
    # of about 3 points for the trajectory's noise
    assert trained >= random_init + 9, (trained, random_init)
    assert trained >= raw + 4, (trained, raw)


# ---------------------------------------------------------------------------------------------- colour knobs
def _unnormalised(t: torch.Tensor) -> torch.Tensor:
    from dinokit.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return t * torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) + torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)


def test_grayscale_probability_one_makes_every_pil_crop_grey_and_zero_none():
    from PIL import Image

    from dinokit.data.augmentations import DataAugmentationDINO

    image = Image.new("RGB", (48, 48), (200, 30, 60))  # saturated red: a grey crop has R == G == B
    for p, grey in ((1.0, True), (0.0, False)):
        augment = DataAugmentationDINO((0.5, 1.0), (0.2, 0.5), 2, global_crops_size=16, local_crops_size=8,
                                       grayscale_probability=p, color_jitter_strength=0.0)
        torch.manual_seed(0)
        out = augment(image)
        for crop in out["global_crops"] + out["local_crops"]:
            rgb = _unnormalised(crop)
            spread = float((rgb.max(dim=0).values - rgb.min(dim=0).values).max())
            assert (spread < 0.02) == grey, (p, spread)


def test_tensor_path_draws_the_configured_grayscale_and_jitter_ranges():
    from dinokit.data.augmentations import color_jitter_strengths
    from dinokit.data.tensor_augment import draw_crop_params

    assert color_jitter_strengths(1.0) == (0.4, 0.4, 0.2, 0.1)  # official
    assert color_jitter_strengths(2.0) == (0.8, 0.8, 0.4, 0.2)
    assert color_jitter_strengths(10.0)[3] == 0.5  # the hue shift stops at half a turn
    torch.manual_seed(0)
    params = [draw_crop_params(64, 64, global_crops_scale=(0.3, 1), local_crops_scale=(0.05, 0.3), local_crops_number=6,
                               grayscale_probability=1.0, color_jitter_strength=3.0) for _ in range(200)]
    assert all(bool(p.grayscale.all()) for p in params)
    factors = torch.cat([p.jitter_factors for p in params])  # (1600, 4): brightness, contrast, saturation, hue
    assert float(factors[:, :3].min()) >= 0.0 and float(factors[:, 0].max()) > 2.0  # [max(0, 1 - 1.2), 2.2]
    assert float(factors[:, 3].abs().max()) <= 0.3 and float(factors[:, 3].abs().max()) > 0.25
    torch.manual_seed(0)
    none = draw_crop_params(64, 64, global_crops_scale=(0.3, 1), local_crops_scale=(0.05, 0.3), local_crops_number=6,
                            grayscale_probability=0.0, color_jitter_strength=0.0)
    assert not bool(none.grayscale.any()) and torch.equal(none.jitter_factors, torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 8))


@pytest.mark.parametrize("override, message", [
    ("crops.grayscale_probability=1.5", "config key 'crops.grayscale_probability' is 1.5; it must be in [0, 1]"),
    ("crops.color_jitter_strength=-1", "config key 'crops.color_jitter_strength' is -1.0; it must be at least 0"),
])
def test_bad_colour_settings_are_one_line_errors_at_config_loading(override, message, tmp_path, capsys):
    from dinokit.cli import main
    from dinokit.config import load_config
    from dinokit.errors import DinokitError

    with pytest.raises(DinokitError) as err:
        load_config("small", [override])
    assert str(err.value) == message
    # the command stops before it starts anything: one line on stderr, nothing on stdout, no run folder
    assert main(["train", "--config-file", "small", "--output-dir", str(tmp_path / "run"), override]) == 2
    out, errors = capsys.readouterr()
    assert out == "" and errors.strip().splitlines() == [f"error: {message}"], (out, errors)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"grayscale_probability": 1.5}, "crops.grayscale_probability must be in [0, 1], got 1.5"),
    ({"color_jitter_strength": -1.0}, "crops.color_jitter_strength must be >= 0 (1 = official), got -1.0"),
])
def test_the_augmentation_refuses_bad_colour_settings_given_in_python(kwargs, message):
    from dinokit.data.augmentations import DataAugmentationDINO
    from dinokit.errors import DinokitError

    with pytest.raises(DinokitError) as err:
        DataAugmentationDINO((0.5, 1.0), (0.15, 0.5), 4, **kwargs)
    assert str(err.value) == message


# ---------------------------------------------------------------------------------------------- the emoji set
def test_emoji_listing_keeps_fully_qualified_emoji_without_skin_tones_by_group(tmp_path, load_benchmark):
    image_sets = load_benchmark("image_sets")
    listing = tmp_path / "emoji-test.txt"
    listing.write_text(
        "# group: Smileys & Emotion\n# subgroup: face-smiling\n"
        "1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face\n"
        "263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face\n"
        "263A                                                   ; unqualified         # ☺ E0.6 smiling face\n"
        "# group: People & Body\n"
        "1F44B 1F3FD                                            ; fully-qualified     # 👋🏽 E1.0 waving hand\n"
        "1F468 200D 1F469 200D 1F467                            ; fully-qualified     # 👨‍👩‍👧 E2.0 family\n"
        "# group: Component\n1F3FB                                                  ; component           # 🏻\n"
        "# group: Flags\n1F1EB 1F1F7                                            ; fully-qualified     # 🇫🇷 France\n",
        encoding="utf-8")
    groups = image_sets.emoji_by_group(listing)
    assert list(groups) == ["smileys", "people", "animals", "food", "travel", "activities", "objects", "symbols",
                            "flags"]
    assert groups["smileys"] == ["\U0001F600", "\u263A\uFE0F"]
    assert groups["people"] == ["\U0001F468\u200D\U0001F469\u200D\U0001F467"]  # the skin-tone variant left out
    assert groups["flags"] == ["\U0001F1EB\U0001F1F7"] and groups["animals"] == []
