"""The k-NN monitor: a hook that commands pass to the training engine to evaluate each snapshot.

It builds a plain (unsharded, uncompiled) backbone on every rank from the run's ``student`` section,
loads the snapshot from disk and runs the k-NN protocol on ``evaluation.knn_dataset``; the same code
then runs in one process and under FSDP, where ranks may see different numbers of batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import backbone_from_config, backbone_img_size
from ..models import load_backbone_weights
from .knn import run_knn_eval
from .results import shared_images_warning
from .setup import align_classes


class KnnMonitor:
    """``hook(iteration, {subdir: snapshot}, log)``: logs ``knn_top1_k*``/``knn_top5_k*`` for each snapshot.

    ``students`` maps each snapshot's subdir ("" for a single model) to the ``student`` section that
    describes it; with several, the metrics of each are logged as ``<subdir>/knn_top1_k10``.
    """

    def __init__(self, *, train: str, val: str, students: Mapping[str, Any], image_size: int, ks, temperature: float,
                 device: torch.device, backbone_size: int | None = None) -> None:
        self.train, self.val = train, val
        self.students = dict(students)
        self.image_size, self.ks, self.temperature, self.device = image_size, tuple(ks), temperature, device
        self.backbone_size = backbone_size or image_size  # the size the backbone is built at (its training crops)

    def __call__(self, iteration: int, snapshots: dict[str, Path], log: Callable[[dict], None]) -> None:
        for subdir, path in snapshots.items():
            # the backbone's initialisation (overwritten by the snapshot) draws from the CPU generator: on a fork of
            # it, so a run trains the same weights with or without its monitor (the drop-path masks drew after it)
            with torch.random.fork_rng(devices=[]):
                backbone = backbone_from_config(self.students[subdir], img_size=self.backbone_size)
            load_backbone_weights(backbone, path)
            metrics = run_knn_eval(
                backbone.to(self.device).eval(), train_dataset_str=self.train, val_dataset_str=self.val,
                device=self.device, image_size=self.image_size, ks=self.ks, temperature=self.temperature,
            )
            prefix = f"{subdir}/" if subdir else ""
            log({"iteration": iteration, **{prefix + k: v for k, v in metrics.items()}})


def knn_image_size(cfg) -> int:
    """The side of the monitor's k-NN images: ``evaluation.knn_image_size``, else the global crop size."""
    return cfg.evaluation.knn_image_size or backbone_img_size(cfg.crops)


def knn_monitor(cfg, device: torch.device, students: Mapping[str, Any] | None = None) -> KnnMonitor | None:
    """The monitor described by ``cfg.evaluation`` (None when ``evaluation.knn_dataset`` is unset)."""
    evaluation = cfg.evaluation
    knn = evaluation.knn_dataset
    if knn is None or not knn.train or not knn.val:
        return None
    check_knn_datasets(knn.train, knn.val, cfg.train.dataset_path)
    return KnnMonitor(train=knn.train, val=knn.val, students=students or {"": cfg.student},
                      image_size=knn_image_size(cfg), backbone_size=backbone_img_size(cfg.crops), ks=evaluation.knn_k,
                      temperature=evaluation.knn_temperature, device=device)


def check_knn_datasets(train: str, val: str, pretraining: str) -> None:
    """Before the first step: both k-NN datasets open with labels (else one line naming the key), and a
    note when they are the built-in sample set while pretraining reads other images."""
    from ..data import make_dataset
    from ..data.datasets import parse_dataset_str
    from ..distributed import is_first_process
    from ..errors import DinokitError

    datasets = {}
    for key, value in (("train", train), ("val", val)):
        try:
            datasets[key] = make_dataset(value, labelled=True)
        except DinokitError as err:
            raise DinokitError(f"evaluation.knn_dataset.{key}: {err} (or evaluation.knn_dataset=null to skip the "
                               "k-NN monitor)") from None
    try:  # val classes that train lacks: one line now, not at the first evaluation, hours into the run
        align_classes(datasets["train"], datasets["val"])
    except DinokitError as err:
        raise DinokitError(f"evaluation.knn_dataset: {err} (or evaluation.knn_dataset=null to skip the k-NN "
                           "monitor)") from None
    shared = shared_images_warning(datasets["train"], datasets["val"], train_name="evaluation.knn_dataset.train",
                                   val_name="evaluation.knn_dataset.val")
    if shared and is_first_process():
        print(shared)
    names = {parse_dataset_str(s)[0] for s in (train, val)}
    kind, kwargs = parse_dataset_str(pretraining)
    root = kwargs.get("root") or kwargs.get("path")
    source = Path(root).expanduser() if root else None
    there = kind == "WebDataset" or (source is not None and source.exists())  # else its own error comes first, alone
    # the sample set itself, written out by `dinokit data sample`: no note
    textures = kind == "ImageFolder" and there and source.is_dir() and sorted(
        d.name for d in source.iterdir() if d.is_dir()) == sorted(datasets["train"].classes)
    if names == {"Sample"} and kind != "Sample" and there and not textures and is_first_process():  # once per run
        print("note: evaluation.knn_dataset is the built-in texture set while train.dataset_path is "
              f"{pretraining}: the logged knn_top1 describes textures; set evaluation.knn_dataset.train/val to "
              "labelled folders of yours, or evaluation.knn_dataset=null")
