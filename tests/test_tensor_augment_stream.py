"""Tensor multi-crop augmentation in the data stream: a function of (seed, position), resumed exactly, switched on
by the config, deferred to the device."""

import itertools

import pytest
import torch

from dinokit.data import tensor_augment as ta
from dinokit.data.collate import SSLCollate
from dinokit.data.loaders import make_ssl_data_loader
from test_tensor_augment import _smooth_image

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensor_aug_images")
    for i in range(5):
        _smooth_image(24 + 4 * i, 30, seed=i).save(root / f"im{i}.png")
    (root / "bad.png").write_bytes(b"broken")
    return root


def _loader(root, *, seed=5, start_iteration=0, num_workers=0):
    return make_ssl_data_loader(
        f"ImageFolder:root={root}",
        transform=ta.MultiCropSource((0.32, 1.0), (0.05, 0.32), 2),
        collate=ta.TensorAugmentCollate(
            SSLCollate(seed=seed, global_crops_size=16, patch_size=4),
            ta.TensorMultiCrop(global_crops_size=16, local_crops_size=8),
        ),
        seed=seed,
        batch_size_per_rank=3,
        num_workers=num_workers,
        start_iteration=start_iteration,
        pin_memory=False,
        rank=0,
        world_size=1,
    )


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_stream_is_a_function_of_seed_and_position_and_resumes_exactly(image_folder):
    reference = list(itertools.islice(iter(_loader(image_folder)), 5))
    # 15 positions over 6 images: two full passes (the broken image once in each) and 3 positions of a third.
    assert sum(b.n_bad + b.n_samples for b in reference) == 15 and sum(b.n_bad for b in reference) in (2, 3)
    first = next(b for b in reference if b.n_samples == 3)
    assert first.global_crops.shape == (6, 3, 16, 16) and first.local_crops.shape == (6, 3, 8, 8)
    again = list(itertools.islice(iter(_loader(image_folder, num_workers=2)), 5))  # parameters drawn in workers
    resumed = list(itertools.islice(iter(_loader(image_folder, start_iteration=3)), 2))
    for a, b in [*zip(reference, again), *zip(reference[3:], resumed)]:
        for name in ("global_crops", "local_crops", "masks"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    other_seed = next(iter(_loader(image_folder, seed=6)))
    assert not torch.equal(other_seed.global_crops[:1], reference[0].global_crops[:1])


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_config_switch_builds_the_tensor_stream(image_folder):
    from dinokit.config import load_config
    from dinokit.errors import DinokitError
    from dinokit.train.data import build_train_loader

    overrides = [
        f"train.dataset_path=ImageFolder:root={image_folder}", "train.batch_size_per_gpu=2", "train.num_workers=0",
        "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=3",
        "student.patch_size=4",
    ]
    assert load_config("demo", overrides).crops.augmentation == "pil"
    cfg = load_config("demo", [*overrides, "crops.augmentation=tensor"])
    loader = build_train_loader(cfg, start_iteration=0, pin_memory=False)
    assert isinstance(loader.dataset.transform, ta.MultiCropSource)
    batch = next(b for b in loader if b.n_samples == 2)
    assert batch.global_crops.shape == (4, 3, 16, 16) and batch.local_crops.shape == (6, 3, 8, 8)
    assert batch.masks.shape == (4, 16)
    # "device": the workers ship images + parameters; moving the batch makes the same crops on the device
    cfg_device = load_config("demo", [*overrides, "crops.augmentation=device"])
    pending = next(b for b in build_train_loader(cfg_device, start_iteration=0, pin_memory=False) if b.n_samples == 2)
    assert isinstance(pending, ta.PendingSSLBatch) and (pending.n_samples, pending.n_bad) == (batch.n_samples, batch.n_bad)
    moved = pending.to("cpu")
    for name in ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight"):
        torch.testing.assert_close(getattr(moved, name), getattr(batch, name), rtol=0, atol=0)
    cfg.crops.augmentation = "gpu"
    with pytest.raises(DinokitError, match="unknown crops.augmentation 'gpu'; use 'pil', 'tensor' or 'device'"):
        build_train_loader(cfg, start_iteration=0, pin_memory=False)


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_training_with_crops_made_on_the_device_equals_the_tensor_path(image_folder, tmp_path):
    """crops.augmentation=device trains exactly as =tensor (on CPU the 'device' is the CPU), bad images counted."""
    import json

    from dinokit.cli.train import pretrain
    from dinokit.config import load_config

    from tiny import tiny_run

    runs = {}
    for mode in ("tensor", "device"):
        cfg = load_config("demo", [*tiny_run(batch=3, epochs=1, epoch_length=3), f"crops.augmentation={mode}",
                                   f"train.dataset_path=ImageFolder:root={image_folder}", "crops.global_crops_size=16",
                                   "crops.local_crops_size=8", "student.patch_size=4"])
        summary = pretrain(cfg, output_dir=tmp_path / mode, device="cpu")
        metrics = [json.loads(line) for line in (tmp_path / mode / "training_metrics.json").read_text().splitlines()]
        state = torch.load(sorted((tmp_path / mode / "checkpoints").glob("*.pth"))[-1], weights_only=True)
        runs[mode] = metrics, state["model"], summary["bad_images"]
    (metrics_t, model_t, bad_t), (metrics_d, model_d, bad_d) = runs["tensor"], runs["device"]
    assert len(metrics_t) == 3 and [m["total_loss"] for m in metrics_d] == [m["total_loss"] for m in metrics_t]
    assert bad_d == bad_t >= 1  # the broken file is counted on both paths (9 reads of 6 files)
    assert model_d.keys() == model_t.keys() and all(torch.equal(model_d[k], model_t[k]) for k in model_t)


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_deferred_batches_make_the_same_crops_on_the_device(image_folder):
    # defer=True: the workers ship uint8 images + parameters; .to(device) makes the crops there (CPU in CI).
    immediate = list(itertools.islice(iter(_loader(image_folder)), 3))
    loader = _loader(image_folder)
    loader.collate_fn.defer = True
    for expected, pending in zip(immediate, itertools.islice(iter(loader), 3)):
        assert isinstance(pending, ta.PendingSSLBatch) and pending.images[0].dtype == torch.uint8
        batch = pending.pin_memory().to("cpu") if torch.cuda.is_available() else pending.to("cpu")
        for name in ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight"):
            torch.testing.assert_close(getattr(batch, name), getattr(expected, name), rtol=0, atol=0)
        assert (batch.n_samples, batch.n_bad, batch.upperbound) == (expected.n_samples, expected.n_bad, expected.upperbound)
