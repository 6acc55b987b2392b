"""The pretraining data stream described by the config's ``train.*`` and ``crops.*`` keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import DataLoader

from .. import distributed
from ..config.crops import CropSizes, crop_resolutions
from ..data.augmentations import DataAugmentationDINO
from ..data.collate import SSLCollate
from ..data.datasets import parse_dataset_str
from ..data.images import typical_short_side
from ..data.loaders import make_ssl_data_loader
from ..data.resolutions import MixedCollate, MixedTransform, ResolutionMix
from ..data.sample import default_sample_root
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


def check_output_outside_data(output_dir: str | Path, dataset_path: str) -> None:
    """One line when the run folder lies inside the image folder it trains on: its own plots and snapshots would join
    the training images when the folder is listed again (on resume), changing the data under the run."""
    name, kwargs = parse_dataset_str(dataset_path)
    given = kwargs.get("root") or (str(default_sample_root()) if name == "Sample" else None)  # folder sets only
    if not given:
        return
    root, out = Path(given).expanduser().resolve(), Path(output_dir).expanduser().resolve()
    if out == root or root in out.parents:
        raise DinokitError(f"--output-dir {output_dir} lies inside the training images' folder {given}: the "
                           "run's own files (plots, snapshots) would become training images when it resumes; give "
                           "an output folder outside it")


def small_images_note(crops: DictConfig, dataset: Any, patch_size: int) -> str | None:
    """A note when the training images are much smaller than the global crops (e.g. 64-px icons under 224-px crops):
    every crop then enlarges interpolated pixels, at many times the cost of crops near the images' size."""
    paths = getattr(dataset, "paths", None)
    side = typical_short_side(paths) if paths is not None else None
    sizes = [size for size, _ in crop_resolutions(crops)]
    global_size, local_size = max(s.global_size for s in sizes), max(s.local_size for s in sizes)
    if side is None or 3 * side > global_size:
        return None
    near = max(patch_size, side // patch_size * patch_size)  # the largest multiple of the patch size within the image
    return (f"note: these images are small (median short side {side} px of those sampled): the {global_size}-px "
            f"global crops enlarge them at least {global_size / side:.1f}x, most of each crop is interpolated; crops "
            f"near the images' size, e.g. crops.global_crops_size={near} crops.local_crops_size="
            f"{max(patch_size, near // 2 // patch_size * patch_size)} (now {global_size} and {local_size}), cost "
            f"about {(global_size / near) ** 2:.0f}x less per step")


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
                   color_jitter_strength=crops.color_jitter_strength, horizontal_flips=crops.horizontal_flips)
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
