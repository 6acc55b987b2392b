"""What every evaluation shares: the frozen backbone, the labelled datasets and a feature cache.

The backbone comes from an eval or training config (built as the official ``eval/setup.py`` does,
but loaded **strictly**, so a register/non-register mix-up fails loudly instead of scoring 42%:
issue #505), or from a hub name. Without weights it is evaluated at its random initialisation
(seed 0), the baseline every number should be read against.

Features and their cache: ``feature_cache.py``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from .. import distributed as du
from ..devices import resolve_device, resolve_dtype
from ..data import ImageDataset, make_classification_eval_transform, make_dataset
from ..data.datasets import absolute_dataset_str
from ..engine.run_dir import check_writable
from ..errors import DinokitError
from ..features import ExtractedFeatures, check_image_size, inference_dtype
from ..models import DinoVisionTransformer
from ..models.checkpoint import load_backbone_weights
from ..models import registry
from ..config import backbone_from_config, backbone_img_size, find_run_config, load_config
from .feature_cache import FeatureCache, extract_eval_features
from .results import shared_images_warning

RANDOM_INIT_SEED = 0
RAW_PIXELS = "raw pixels"  # what a result line says it came from when no network made the features


class RawPixels(nn.Module):
    """The baseline every network must beat: the eval-transformed image itself (resized, centre-cropped,
    normalised), flattened to one (3 * size * size,) vector per image, in place of a backbone's class token."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).float()


# ---------------------------------------------------------------------------------------------- model
def build_eval_backbone(config: DictConfig) -> DinoVisionTransformer:
    """The teacher backbone of a training or eval config, built as training built it (no drop path).

    ``img_size = crops.global_crops_size`` (518 in the eval presets, which sizes the position
    embedding of the released weights); LayerScale from ``student.layerscale`` (0 = none).
    """
    return backbone_from_config(config.student, img_size=backbone_img_size(config.crops))


def _weights_identity(weights: str) -> dict[str, Any]:
    """What identifies a weights file for the cache: its path, size and modification time."""
    path = Path(weights).expanduser()
    if not path.exists():
        return {"url": weights}  # a URL (or a missing file, which the loader reports)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _architecture(model: nn.Module) -> dict[str, Any]:
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    flags = [getattr(model, a, None) for a in ("patch_size", "interpolate_offset", "interpolate_antialias")]
    digest = hashlib.sha1(json.dumps([shapes, flags]).encode()).hexdigest()[:16]
    return {"params": sum(p.numel() for p in model.parameters()), "layout": digest}


DEFAULT_MODEL = "dinov2_vits14"  # the backbone of commands that need none named (embed, viz, export, curate)


def check_backbone_choice(*, config_file: str | None = None, model: str | None = None, random_init: bool = False,
                          pretrained_weights: str | None = None, opts: Sequence[str] = (),
                          weights_flag: str | None = None) -> None:
    """The backbone options agree, in every command (called before any work, and before a SLURM submission):
    ``--config-file`` or ``--model`` (each defines the architecture: embed, viz and export dropped --model),
    ``--random-init`` or weights (viz, export and dense loaded them; ``weights_flag`` names the command's option),
    ``--opts`` the backbone's keys only."""
    if config_file and model:
        raise DinokitError("give either --config-file or --model, not both: each defines the architecture")
    if random_init and pretrained_weights:
        weights = weights_flag or f"the weights {str(pretrained_weights)!r}"
        raise DinokitError(f"--random-init and {weights} contradict each other; give one")
    for opt in opts:  # other keys were accepted and did nothing (k-NN's, the optimiser's, the other crops')
        key = opt.partition("=")[0].strip()
        if not (key.startswith("student.") or key == "crops.global_crops_size"):
            raise DinokitError(f"--opts {opt!r}: --opts sets the backbone's keys of --config-file only (student.*, "
                               "crops.global_crops_size); the evaluation's settings are its own options (see --help)")


def setup_eval_model(
    *,
    config_file: str | None = None,
    pretrained_weights: str | None = None,
    model: str | None = None,
    random_init: bool = False,
    opts: Sequence[str] = (),
    device: torch.device | str = "cpu",
    default_model: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen backbone to evaluate (eval mode, on ``device``) and a description for cache keys.

    Architecture: ``config_file`` (an eval preset such as ``eval/vits14_pretrain``, or the
    ``config.yaml`` of a training run; found automatically next to a ``teacher_checkpoint.pth``) or
    ``model`` (a hub name), else ``default_model`` (commands with a default backbone; None: one line asking).
    Weights: ``pretrained_weights`` (backbone file, teacher checkpoint, safetensors or URL), else the official
    weights of ``model``, else random init (seed 0).
    """
    check_backbone_choice(config_file=config_file, model=model, random_init=random_init,
                          pretrained_weights=pretrained_weights, opts=opts)
    if not config_file and not model:
        found = find_run_config(pretrained_weights) if pretrained_weights else None
        if found is None and default_model:
            model = default_model
        elif found is None:
            raise DinokitError(
                "say which backbone to evaluate: --model NAME (e.g. dinov2_vits14) or --config-file "
                "(an eval preset such as eval/vits14_pretrain, or the config.yaml of a training run)"
            )
        else:
            config_file = str(found)
            if du.is_main_process():
                print(f"using the training config {found}")
    description: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # a reproducible random-init baseline (and cache key)
        if config_file:
            config = load_config(config_file, opts, to_train=False)  # the architecture only
            backbone = build_eval_backbone(config)
            description["config"] = {"student": dict(config.student), "img_size": backbone_img_size(config.crops)}
        else:
            if opts:
                raise DinokitError("--opts applies to --config-file only; drop it or give a config file")
            official = not pretrained_weights and not random_init
            backbone = registry.create_model(model, pretrained=official)
            description["model"] = model
    if pretrained_weights:
        try:
            load_backbone_weights(backbone, pretrained_weights)
        except DinokitError as err:  # --model given for a run's snapshot: the run says what it holds
            found = find_run_config(pretrained_weights) if model else None
            if found is None or "does not fit the model" not in str(err):
                raise
            raise DinokitError(f"{err}; the run's {found} describes the file's architecture: leave out --model "
                               "and it is used") from None
        description["weights"] = _weights_identity(pretrained_weights)
    elif model and not random_init:
        description["weights"] = "official"
    else:
        description["weights"] = f"random-init (seed {RANDOM_INIT_SEED})"
        if du.is_main_process():
            why = "random init asked for" if random_init else "no weights given"
            print(f"{why}: the randomly initialised backbone (seed {RANDOM_INIT_SEED}), a baseline")
    description["architecture"] = _architecture(backbone)
    return backbone.to(device).eval().requires_grad_(False), description


def weights_label(pretrained_weights: str | None, model: str | None, random_init: bool) -> str:
    """Which weights a result came from: the file's absolute path (or the URL), ``official NAME`` or the random init."""
    if pretrained_weights:
        path = Path(pretrained_weights).expanduser()
        return str(path.resolve()) if path.exists() else pretrained_weights
    if model and not random_init:
        return f"official {model}"
    return f"random-init (seed {RANDOM_INIT_SEED})"


# ---------------------------------------------------------------------------------------------- data
def load_eval_datasets(
    train_dataset_str: str, val_dataset_str: str, *, image_size: int = 224, resize_size: int | None = None
) -> tuple[ImageDataset, ImageDataset, int]:
    """Labelled train and val datasets with the eval transform (short side ``resize_size``, default ``image_size``
    x 256/224, then a centre crop of ``image_size``), and the number of classes.

    The class lists must agree (one may be a prefix of the other, e.g. numeric FileList labels), or val may hold
    some of train's classes (its labels are then renumbered by class name, as train numbers them).
    """
    transform = make_classification_eval_transform(resize_size=resize_size, crop_size=image_size)
    train = make_dataset(train_dataset_str, transform=transform, labelled=True)
    val = make_dataset(val_dataset_str, transform=transform, labelled=True)
    long = align_classes(train, val)
    num_classes = max(len(long), int(max(train.targets, default=-1)) + 1, int(max(val.targets, default=-1)) + 1)
    return train, val, num_classes


def align_classes(train: ImageDataset, other: ImageDataset, role: str = "val") -> list[str]:
    """Check that ``other`` (the ``role`` dataset) has train's classes (one list may be a prefix of the other), or
    some of them, whose labels are then renumbered by class name in place; returns the longer class list."""
    short, long = sorted((list(train.classes), list(other.classes)), key=len)
    if long[: len(short)] != short:
        unknown = [c for c in other.classes if c not in set(train.classes)]
        if unknown or not isinstance(getattr(other, "targets", None), list):
            raise DinokitError(
                f"the {role} dataset has classes the train dataset lacks ({len(unknown)} of {len(other.classes)}, "
                f"e.g. {unknown[0]!r}): no neighbour or probe can predict them; use the same class folders in both"
                if unknown else
                f"the train and {role} datasets have different classes ({len(train.classes)} vs "
                f"{len(other.classes)}, e.g. {_first_difference(train.classes, other.classes)}); use the same class "
                "folders in both")
        if du.is_main_process():
            print(f"note: the {role} dataset has {len(other.classes)} of the train dataset's {len(train.classes)} "
                  "classes; its labels follow the train classes' names")
        index = {name: i for i, name in enumerate(train.classes)}
        other.targets = [index[other.classes[t]] if t >= 0 else t for t in other.targets]
        other.classes = list(train.classes)
    return long


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x!r} vs {y!r}"
    return f"{len(a)} vs {len(b)} classes"


# ---------------------------------------------------------------------------------------------- context
@dataclass
class EvalContext:
    """A frozen backbone with its labelled datasets, extraction settings and feature cache."""

    model: nn.Module
    train: ImageDataset
    val: ImageDataset
    num_classes: int
    cache: FeatureCache
    output_dir: Path
    image_size: int = 224
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True
    # what every result line says it came from: {"weights": ..., "train_dataset": ..., "val_dataset": ...}
    provenance: dict[str, str] = field(default_factory=dict)
    # lines about the datasets that every result line records (e.g. val images that are also training images)
    data_warnings: list[str] = field(default_factory=list)
    # images whose features were read, per split ("train", "val"), once extracted (unreadable ones are skipped)
    images_read: dict[str, int] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        """The name of each class index (train's, or val's when train's are a prefix of them)."""
        return max(list(self.train.classes), list(self.val.classes), key=len)

    def images_line(self) -> str:
        """``N train / M val images``: those read where features were extracted (with the unreadable ones named)."""
        parts = []
        for split, dataset in (("train", self.train), ("val", self.val)):
            read = self.images_read.get(split, len(dataset))
            skipped = f" ({len(dataset) - read} unreadable skipped)" if read < len(dataset) else ""
            parts.append(f"{read} {split}{skipped}")
        return " / ".join(parts) + " images"

    def result_provenance(self, trust: Sequence[str]) -> dict[str, Any]:
        """What a result line records besides its numbers: the provenance and every warning about its trust."""
        return {**self.provenance, "warnings": [*self.data_warnings, *trust]}

    def features(self, split: str, kind: str, dataset: ImageDataset | None = None) -> ExtractedFeatures:
        """``kind`` features of the ``train`` or ``val`` split (or of ``dataset``, named ``split``), from the cache
        or extracted (and cached)."""
        dataset = dataset if dataset is not None else self.train if split == "train" else self.val
        features = self.cache.get(
            split, kind, dataset,
            lambda: extract_eval_features(
                self.model, dataset, kind=kind, batch_size=self.batch_size, num_workers=self.num_workers,
                device=self.device, dtype=self.dtype, progress=self.progress, desc=f"{split} features",
            ),
        )
        self.images_read[split] = len(features.indices)
        return features


def prepare_eval(
    *,
    output_dir: str | Path,
    train_dataset: str,
    val_dataset: str,
    config_file: str | None = None,
    pretrained_weights: str | None = None,
    model: str | None = None,
    random_init: bool = False,
    opts: Sequence[str] = (),
    image_size: int = 224,
    resize_size: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    cache: bool = True,
    check_model: Callable[[nn.Module], None] | None = None,
    raw_pixels: bool = False,
) -> EvalContext:
    """Everything an evaluation command needs; the datasets are checked before the model is loaded.

    The images are resized to ``resize_size`` (short side) and centre-cropped to ``image_size``; None resizes to
    ``image_size * 256 / 224`` (k-NN and linear: Resize(256) + CenterCrop(224)); logistic regression resizes to
    the crop size, as the official code does.

    With ``raw_pixels`` the features are the flattened eval-transformed images (:class:`RawPixels`; no backbone
    option may be given, and nothing is cached: they cost less to recompute than to store).

    ``check_model(backbone)``, when given, runs once the backbone is built and before the output folder is made
    (settings that depend on the model, e.g. its depth, refused without writing anything).
    """
    if image_size < 1 or batch_size < 1 or num_workers < 0:
        raise DinokitError("--image-size and --batch-size must be positive and --num-workers non-negative")
    given = [name for name, value in (("--config-file", config_file), ("--pretrained-weights", pretrained_weights),
             ("--model", model), ("--random-init", random_init), ("--opts", opts)) if value and raw_pixels]
    if given:
        raise DinokitError(f"--raw-pixels evaluates the images themselves, without a backbone; drop {given[0]}")
    if du.is_main_process():
        check_writable(output_dir)  # one line before any work
    device_ = resolve_device(device)
    dtype_ = inference_dtype(device_, resolve_dtype(dtype, device_), say=du.is_main_process())  # fp16 on CPU: fp32
    train, val, num_classes = load_eval_datasets(train_dataset, val_dataset, image_size=image_size,
                                                 resize_size=resize_size)
    data_warnings = [line for line in [shared_images_warning(train, val)] if line]
    for line in data_warnings if du.is_main_process() else []:
        print(line)
    if raw_pixels:
        backbone, description = RawPixels().eval(), {"model": RAW_PIXELS}
    else:
        backbone, description = setup_eval_model(
            config_file=config_file, pretrained_weights=pretrained_weights, model=model, random_init=random_init,
            opts=opts, device=device_,
        )
    check_image_size(image_size, backbone)
    if check_model is not None:
        check_model(backbone)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    key = {**description, "image_size": image_size, "dtype": str(dtype_)}
    if resize_size is not None:  # features of another resize are other features (the default keeps older caches)
        key["resize_size"] = resize_size
    return EvalContext(
        model=backbone, train=train, val=val, num_classes=num_classes,
        cache=FeatureCache(output_dir / "features" if cache and not raw_pixels else None, key), output_dir=output_dir,
        image_size=image_size, device=device_, dtype=dtype_, batch_size=batch_size, num_workers=num_workers,
        progress=progress,
        provenance={"weights": RAW_PIXELS if raw_pixels else weights_label(pretrained_weights, model, random_init),
                    "train_dataset": absolute_dataset_str(train_dataset),  # the same images from any folder
                    "val_dataset": absolute_dataset_str(val_dataset)},
        data_warnings=data_warnings,
    )
