"""The pretraining data stream described by the config's ``train.*`` and ``crops.*`` keys."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torch.utils.data import DataLoader

from .. import distributed
from ..config.crops import CropSizes, crop_resolutions
from ..data.augmentations import DataAugmentationDINO
from ..data.collate import SSLCollate
from ..data.loaders import make_ssl_data_loader
from ..data.resolutions import MixedCollate, MixedTransform, ResolutionMix
from ..data.tensor_augment import MultiCropSource, TensorAugmentCollate, TensorMultiCrop
from ..devices import usable_workers
from ..errors import DinokitError

AUGMENTATIONS = ("pil", "tensor", "device")


def build_train_loader(cfg: DictConfig, *, start_iteration: int, pin_memory: bool) -> DataLoader:
    """Batch ``i`` of the returned loader is global batch ``start_iteration + i`` (this rank's part).

    Under DINOv3's mixed resolutions (lists in ``crops.*_crops_size``) each batch is made at the crop sizes its
    iteration draws (``data/resolutions.py``): one transform and collate per size triple."""
    if cfg.crops.augmentation not in AUGMENTATIONS:
        raise DinokitError(f"unknown crops.augmentation {cfg.crops.augmentation!r}; use 'pil', 'tensor' or 'device'")
    resolutions = crop_resolutions(cfg.crops)
    pipelines = [_pipeline(cfg, sizes) for sizes, _ in resolutions]
    transform, collate = pipelines[0]
    if len(pipelines) > 1:
        mix = ResolutionMix([ratio for _, ratio in resolutions], seed=cfg.train.seed,
                            global_batch_size=cfg.train.batch_size_per_gpu * distributed.get_world_size())
        if cfg.crops.augmentation == "pil":  # the tensor paths draw size-free crop parameters: one transform
            transform = MixedTransform([t for t, _ in pipelines], mix)
        collate = MixedCollate([c for _, c in pipelines], mix)
    return make_ssl_data_loader(
        cfg.train.dataset_path,
        transform=transform,
        collate=collate,
        seed=cfg.train.seed,
        batch_size_per_rank=cfg.train.batch_size_per_gpu,
        num_workers=usable_workers(cfg.train.num_workers, key="train.num_workers"),
        start_iteration=start_iteration,
        pin_memory=pin_memory,
    )


def _pipeline(cfg: DictConfig, sizes: CropSizes) -> tuple[Any, Any]:
    """The per-image transform and the batch collate that make crops of ``sizes``."""
    crops = cfg.crops
    collate = SSLCollate(
        seed=cfg.train.seed,
        global_crops_size=sizes.global_size,
        patch_size=cfg.student.patch_size,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
    )
    # the crop areas and photometric distributions: the same in every path
    areas = (tuple(crops.global_crops_scale), tuple(crops.local_crops_scale), crops.local_crops_number)
    colours = dict(blur_probabilities=crops.blur_probabilities, grayscale_probability=crops.grayscale_probability,
                   color_jitter_strength=crops.color_jitter_strength)
    if crops.augmentation in ("tensor", "device"):
        # Workers decode and draw the crop parameters per image; the collate crops and colours the whole batch
        # ("tensor"), or ships the images and parameters as a PendingSSLBatch whose move to the training device
        # makes the crops there ("device": the engine's batch_to calls its .to(device)).
        multi_crop = TensorMultiCrop(global_crops_size=sizes.global_size, local_crops_size=sizes.local_size,
                                     gram_crops_size=sizes.gram_size,
                                     gram_no_distortions=crops.gram_teacher_no_distortions)
        return MultiCropSource(*areas, **colours), TensorAugmentCollate(collate, multi_crop,
                                                                      defer=crops.augmentation == "device")
    transform = DataAugmentationDINO(*areas, global_crops_size=sizes.global_size, local_crops_size=sizes.local_size,
                                     gram_crops_size=sizes.gram_size,
                                     gram_no_distortions=crops.gram_teacher_no_distortions, **colours)
    return transform, collate
