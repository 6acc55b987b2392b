"""Where a training stage's weights come from: backbone files, teacher checkpoints and run folders.

``load_pretrained_backbone`` (any backbone layout, strict, position embedding resized), ``load_teacher_heads``
(the DINO/iBOT heads of a teacher checkpoint), ``teacher_checkpoint_path`` (a run folder's newest snapshot) and
``chunked_backbone_keys`` (the official chunked training layout of exported teachers).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import DinokitError
from ..models.checkpoint import backbone_state_dict_of_any_layout, load_backbone_weights, resize_pos_embed
from ..models.weight_files import is_url, load_state_dict_file, newest_snapshot, no_snapshot_fix


def chunked_backbone_keys(state_dict: dict[str, torch.Tensor], depth: int, block_chunks: int) -> dict[str, torch.Tensor]:
    """``backbone.blocks.i.*`` -> ``backbone.blocks.<chunk>.i.*`` (the official training layout when chunked)."""
    if block_chunks <= 0:
        return state_dict
    chunk = depth // block_chunks
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "backbone" and parts[1] == "blocks":
            parts.insert(2, str(int(parts[2]) // chunk))
        out[".".join(parts)] = value
    return out


def teacher_checkpoint_path(path: str) -> Path:
    """A ``teacher_checkpoint.pth`` named directly, or the newest snapshot of a ``dinokit train`` run folder."""
    found = Path(path).expanduser()
    if found.is_dir():
        snapshot = newest_snapshot(found)
        if snapshot is None:
            raise DinokitError(f"{path!r} has no eval/training_*/teacher_checkpoint.pth; {no_snapshot_fix(found)}")
        return snapshot
    return found


def check_weight_sources(sources: Mapping[str, str]) -> None:
    """Stop with one line if a weights key (``{config key: value}``) names a file or folder that is not there, before
    a run folder is written (URLs are fetched, and checked, when loaded)."""
    for key, value in sources.items():
        if not value or is_url(value):
            continue
        if not Path(value).expanduser().exists():
            raise DinokitError(f"config key '{key}' is {value!r}, which does not exist; give a teacher_checkpoint.pth, "
                               "a backbone file or a dinokit train run folder")
        try:
            teacher_checkpoint_path(value)  # a folder must hold a snapshot
        except DinokitError as err:
            raise DinokitError(f"config key '{key}': {err}") from None


def load_pretrained_backbone(backbone: nn.Module, path: str, checkpoint: Mapping | None = None) -> None:
    """Any backbone layout (or the newest snapshot of a run folder), strictly, with the position embedding resized
    to ``backbone``'s grid; heads in the file are ignored.

    Unlike the official ``student.pretrained_weights`` (non-strict, ``{"model": ...}`` files only).
    """
    sd = backbone_state_dict_of_any_layout(checkpoint or load_state_dict_file(teacher_checkpoint_path(path)),
                                           source=repr(path))
    load_backbone_weights(backbone, resize_pos_embed(sd, backbone.patch_embed.num_patches))


def load_teacher_heads(heads: Mapping[str, nn.Module], checkpoint: Mapping, path: str, ibot: bool = True) -> None:
    """The ``dino_head``/``ibot_head`` of a teacher checkpoint into ``heads`` (strict: same prototypes and widths);
    ``ibot``: this stage trains iBOT (then its head is separate in both runs or in neither)."""
    sd = checkpoint.get("teacher", checkpoint)
    in_file = {k.split(".", 1)[0] for k in sd}
    wanted = "ibot_head" in heads  # this stage's iBOT has its own head
    if "dino_head" in in_file and ibot and wanted != ("ibot_head" in in_file):
        raise DinokitError(f"{path} {'has no separate' if wanted else 'has a separate'} ibot_head (its run set "
                           f"ibot.separate_head={str(not wanted).lower()}); set ibot.separate_head="
                           f"{str(not wanted).lower()} to go on from it")
    for name, head in heads.items():
        part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(f"{name}.")}
        if not part:
            raise DinokitError(f"{path} holds no {name}; student.resume_from_teacher_chkpt needs a teacher_checkpoint.pth "
                               "of a dinokit train run (for a bare backbone use student.pretrained_weights)")
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in part.items()}
        if expected != found:
            raise DinokitError(f"the {name} in {path} does not match the config's ({_first_difference(expected, found)}); "
                               "set the dino.*/ibot.* head keys to the run's values")
        head.load_state_dict(part)


def _first_difference(expected: dict, found: dict) -> str:
    for key in sorted(set(expected) | set(found)):
        if expected.get(key) != found.get(key):
            return f"{key}: file {found.get(key, 'missing')}, config {expected.get(key, 'missing')}"
    return ""
