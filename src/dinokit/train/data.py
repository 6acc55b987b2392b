"""The pretraining data stream described by the config's ``train.*`` and ``crops.*`` keys."""

from __future__ import annotations

from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ..data.augmentations import DataAugmentationDINO
from ..data.collate import SSLCollate
from ..data.loaders import make_ssl_data_loader
from ..data.tensor_augment import MultiCropSource, TensorAugmentCollate, TensorMultiCrop
from ..errors import DinokitError

AUGMENTATIONS = ("pil", "tensor", "device")


def build_train_loader(cfg: DictConfig, *, start_iteration: int, pin_memory: bool) -> DataLoader:
    """Batch ``i`` of the returned loader is global batch ``start_iteration + i`` (this rank's part)."""
    crops = cfg.crops
    augmentation = crops.augmentation
    if augmentation not in AUGMENTATIONS:
        raise DinokitError(f"unknown crops.augmentation {augmentation!r}; use 'pil', 'tensor' or 'device'")
    collate = SSLCollate(
        seed=cfg.train.seed,
        global_crops_size=crops.global_crops_size,
        patch_size=cfg.student.patch_size,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
    )
    if augmentation in ("tensor", "device"):
        # Workers decode and draw the crop parameters per image; the collate crops and colours the whole batch
        # ("tensor"), or ships the images and parameters as a PendingSSLBatch whose move to the training device
        # makes the crops there ("device": the engine's batch_to calls its .to(device)).
        transform = MultiCropSource(
            tuple(crops.global_crops_scale),
            tuple(crops.local_crops_scale),
            crops.local_crops_number,
            blur_probabilities=crops.blur_probabilities,
            grayscale_probability=crops.grayscale_probability,
            color_jitter_strength=crops.color_jitter_strength,
        )
        multi_crop = TensorMultiCrop(global_crops_size=crops.global_crops_size, local_crops_size=crops.local_crops_size,
                                     gram_crops_size=crops.gram_teacher_crops_size,
                                     gram_no_distortions=crops.gram_teacher_no_distortions)
        collate = TensorAugmentCollate(collate, multi_crop, defer=augmentation == "device")
    else:
        transform = DataAugmentationDINO(
            tuple(crops.global_crops_scale),
            tuple(crops.local_crops_scale),
            crops.local_crops_number,
            global_crops_size=crops.global_crops_size,
            local_crops_size=crops.local_crops_size,
            blur_probabilities=crops.blur_probabilities,
            grayscale_probability=crops.grayscale_probability,
            color_jitter_strength=crops.color_jitter_strength,
            gram_crops_size=crops.gram_teacher_crops_size,
            gram_no_distortions=crops.gram_teacher_no_distortions,
        )
    return make_ssl_data_loader(
        cfg.train.dataset_path,
        transform=transform,
        collate=collate,
        seed=cfg.train.seed,
        batch_size_per_rank=cfg.train.batch_size_per_gpu,
        num_workers=cfg.train.num_workers,
        start_iteration=start_iteration,
        pin_memory=pin_memory,
    )
