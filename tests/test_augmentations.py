"""DataAugmentationDINO: output structure, blur/solarize probabilities, seeding through SSLDataset."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dinokit.data.augmentations import DataAugmentationDINO
from dinokit.data.images import ImageFiles
from dinokit.data.loaders import SSLDataset
from dinokit.errors import DinokitError


def _image(size=(20, 24), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _aug(n_local=2, blur="official") -> DataAugmentationDINO:
    return DataAugmentationDINO(
        (0.32, 1.0), (0.05, 0.32), n_local, global_crops_size=16, local_crops_size=8, blur_probabilities=blur
    )


def test_output_structure_and_shapes():
    out = _aug(n_local=3)(_image())
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert [t.shape for t in out["global_crops"]] == [(3, 16, 16)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, 8, 8)] * 3
    assert all(a is b for a, b in zip(out["global_crops"], out["global_crops_teacher"]))
    assert out["offsets"] == ()
    assert type(out["global_crops"][0]) is torch.Tensor and out["global_crops"][0].dtype == torch.float32


def test_outputs_are_imagenet_normalised():
    # Every output value is (v - mean) / std for some v in [0, 1]: scaled to [0, 1], then ImageNet-normalised.
    out = _aug()(_image())
    lo = (0 - 0.485) / 0.229
    hi = (1 - 0.406) / 0.225
    for crop in out["global_crops"] + out["local_crops"]:
        assert lo - 1e-4 <= float(crop.min()) and float(crop.max()) <= hi + 1e-4


class _Recorder(torch.nn.Module):
    """Stands in for a transform: counts the calls, returns the input unchanged."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def _swap(pipeline: v2.Compose, kind: type) -> _Recorder:
    """Replace the (single) ``kind`` transform inside ``pipeline``'s nested Compose/RandomApply with a recorder."""
    recorder = _Recorder()
    found = []

    def walk(container):
        for i, t in enumerate(container.transforms):
            if isinstance(t, kind):
                container.transforms[i] = recorder
                found.append(t)
            elif hasattr(t, "transforms"):
                walk(t)

    walk(pipeline)
    assert len(found) == 1
    return recorder


def _frequencies(blur: str, draws: int = 200, n_local: int = 2) -> dict[str, float]:
    aug = _aug(n_local=n_local, blur=blur)
    names = ("global_transfo1", "global_transfo2", "local_transfo")
    blurs = {name: _swap(getattr(aug, name), v2.GaussianBlur) for name in names}
    image = _image((12, 12))
    torch.manual_seed(0)
    for _ in range(draws):
        aug(image)
    freq = {name: r.calls / draws for name, r in blurs.items()}
    freq["local_transfo"] /= n_local
    return freq


def test_official_blur_probabilities_are_the_effective_ones():
    freq = _frequencies("official")
    assert freq["global_transfo1"] == 0.0
    assert 0.83 <= freq["global_transfo2"] <= 0.96
    assert 0.40 <= freq["local_transfo"] <= 0.60


def test_intended_blur_probabilities():
    freq = _frequencies("intended")
    assert freq["global_transfo1"] == 1.0
    assert 0.04 <= freq["global_transfo2"] <= 0.17
    assert 0.40 <= freq["local_transfo"] <= 0.60


def test_no_blur():
    assert _frequencies("none") == {"global_transfo1": 0.0, "global_transfo2": 0.0, "local_transfo": 0.0}


def test_solarize_only_on_global_crop_2_with_p_02():
    aug = _aug()
    others = aug.global_transfo1.transforms + aug.local_transfo.transforms
    assert not any(isinstance(t, v2.RandomSolarize) for t in others)
    solarize = [t for t in aug.global_transfo2.transforms if isinstance(t, v2.RandomSolarize)]
    assert len(solarize) == 1 and solarize[0].p == 0.2 and solarize[0].threshold == 128


def test_unknown_blur_mode_is_a_user_error():
    with pytest.raises(DinokitError, match="blur_probabilities"):
        _aug(blur="fixed")


@pytest.fixture
def tiny_images(tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / f"img{i}.png"
        _image((20, 20), seed=i).save(path)
        paths.append(path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return ImageFiles(paths + [tmp_path / "broken.png"])


def test_ssl_dataset_is_a_function_of_seed_and_position(tiny_images):
    a = SSLDataset(tiny_images, _aug(), seed=7)
    b = SSLDataset(tiny_images, _aug(), seed=7)
    c = SSLDataset(tiny_images, _aug(), seed=8)
    state = torch.get_rng_state()
    for position in (0, 3, 13):  # 13: second pass (6 images per pass)
        pa, sa = a[position]
        pb, sb = b[position]
        assert pa == pb == position
        if sa is None:
            assert sb is None
            continue
        for x, y in zip(sa["global_crops"] + sa["local_crops"], sb["global_crops"] + sb["local_crops"]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert [a.dataset_index(p) for p in range(12)] != [c.dataset_index(p) for p in range(12)]


def test_ssl_dataset_visits_every_image_once_per_pass(tiny_images):
    ds = SSLDataset(tiny_images, _aug(), seed=0)
    passes = [[ds.dataset_index(p) for p in range(k * 6, (k + 1) * 6)] for k in range(3)]
    assert all(sorted(order) == list(range(6)) for order in passes)
    assert len({tuple(order) for order in passes}) > 1  # reshuffled every pass


def test_ssl_dataset_bad_image_gives_none(tiny_images):
    ds = SSLDataset(tiny_images, _aug(), seed=0)
    position = [ds.dataset_index(p) for p in range(6)].index(5)  # where broken.png comes in pass 0
    with pytest.warns(UserWarning, match="unreadable"):
        assert ds[position] == (position, None)
