"""Paths in saved settings are absolute, so that a run means the same files from any working directory.

A run folder's settings (``config.yaml`` of ``train``/``distill``, ``dense_config.json`` and ``head.pth`` of
``dense train``) are read again later: on resume, by ``dense eval|predict --head``, by ``distill`` reading a
teacher run. A relative path saved there is resolved against the working directory of that later command, so from
another folder it named other files, silently (another teacher, another backbone under the head). The trainers
therefore save every path of an existing file or folder absolute (:func:`absolute_settings`). Runs saved before
kept relative paths; the resume check compares both sides through the same function, so resuming such a run from
the folder it was started in still matches.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# dotted keys of single files or folders (training configs, then dense settings)
FILE_KEYS = (
    "MODEL.WEIGHTS", "student.pretrained_weights", "student.resume_from_teacher_chkpt", "gram.ckpt",
    "distillation.teacher", "distillation.teacher_config",
    "backbone.config_file", "backbone.pretrained_weights",
)
# dotted keys of dataset strings, whose root=/path= parts are paths
DATASET_KEYS = ("train.dataset_path", "evaluation.knn_dataset.train", "evaluation.knn_dataset.val",
                "train_dataset", "val_dataset")


def absolute_file(value: Any) -> Any:
    """``value`` made absolute when it is the path of an existing file or folder (a URL, a hub name, an empty or
    missing path are returned unchanged: they are reported where they are used)."""
    if not isinstance(value, str) or not value.strip() or "://" in value:
        return value
    path = Path(value).expanduser()
    return os.path.abspath(path) if path.exists() else value


def absolute_dataset(value: Any) -> Any:
    from ..data.datasets import absolute_dataset_str

    return absolute_dataset_str(value) if isinstance(value, str) and value.strip() else value


def _lookup(tree: Mapping, dotted: str) -> tuple[Mapping | None, str]:
    *parents, last = dotted.split(".")
    node: Any = tree
    for key in parents:
        node = node.get(key) if isinstance(node, Mapping) else None
    return (node if isinstance(node, Mapping) else None), last


def absolute_settings(tree: Mapping) -> dict:
    """A copy of the nested settings ``tree`` with the paths of :data:`FILE_KEYS` and :data:`DATASET_KEYS` (and of
    each ``distillation.students`` entry's ``pretrained_weights``) absolute where they exist."""
    out = copy.deepcopy(dict(tree))
    for keys, fix in ((FILE_KEYS, absolute_file), (DATASET_KEYS, absolute_dataset)):
        for dotted in keys:
            node, last = _lookup(out, dotted)
            if node is not None and last in node:
                node[last] = fix(node[last])
    node, _ = _lookup(out, "distillation.students")
    students = node.get("students") if node is not None else None
    for entry in students if isinstance(students, list) else ():
        if isinstance(entry, dict) and "pretrained_weights" in entry:
            entry["pretrained_weights"] = absolute_file(entry["pretrained_weights"])
    return out


def make_paths_absolute(cfg) -> None:
    """Rewrite, in the OmegaConf config ``cfg``, the paths :func:`absolute_settings` makes absolute."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    fixed = absolute_settings(plain)
    for dotted in (*FILE_KEYS, *DATASET_KEYS, "distillation.students"):
        before, _ = _lookup(plain, dotted)
        after, last = _lookup(fixed, dotted)
        if after is not None and last in after and before[last] != after[last]:
            OmegaConf.update(cfg, dotted, after[last], merge=False)
