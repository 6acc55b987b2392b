"""Dense-head files: the official mmcv/mmseg layout in, the same layout out, strict loading.

Official head files are ``{"state_dict": {"decode_head.<name>": tensor, ...}, "meta": {...}}`` (the
segmentation files may also carry ``backbone.*`` keys, which belong to the backbone and are skipped).
:func:`head_state_dict` is the state_dict -> state_dict filter; :func:`load_head` loads strictly, and any
mismatch is one line naming the file, the key and the fix. Heads trained by dinokit are saved the same
way (:func:`save_head`), plus a ``"dinokit"`` entry describing the head, so either kind of file can be
given wherever a head file is expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import DinokitError
from ..models.weight_files import load_state_dict_file
from ..files import atomic_write
from .heads import DPTHead, LinearDepthHead, LinearSegHead

PREFIX = "decode_head."


def _source(weights: Any) -> str:
    return "the state dict" if isinstance(weights, Mapping) else repr(str(weights))


def read_head_file(weights: str | Path | Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(head state dict without the ``decode_head.`` prefix, dinokit metadata or {}) of a file, URL or dict."""
    raw = weights if isinstance(weights, Mapping) else load_state_dict_file(weights)
    meta = dict(raw.get("dinokit") or {}) if isinstance(raw.get("dinokit"), Mapping) else {}
    return head_state_dict(raw, source=_source(weights)), meta


def head_state_dict(checkpoint: Mapping[str, Any], *, source: str = "the state dict") -> dict[str, torch.Tensor]:
    """The ``decode_head.*`` tensors of an mmcv/mmseg checkpoint (or a bare head state dict), prefix removed."""
    sd: Mapping[str, Any] = checkpoint
    for key in ("state_dict", "model", "teacher"):  # "teacher": the training snapshots of the engine
        if isinstance(sd.get(key), Mapping):
            sd = sd[key]
    tensors = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(PREFIX) for k in tensors):
        other = [k for k in tensors if not k.startswith((PREFIX, "backbone."))]
        if other:
            raise DinokitError(
                f"{source} holds keys that belong to neither the head nor the backbone (e.g. {other[0]}); "
                "give a file with decode_head.* keys only"
            )
        return {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    if not tensors or any(k.startswith(("blocks.", "backbone.", "patch_embed.")) for k in tensors):
        found = ", ".join(list(tensors)[:3]) or "no tensors"
        raise DinokitError(f"{source} is not a dense-head file (expected decode_head.* keys, found {found})")
    return tensors


def head_kind_of(sd: Mapping[str, torch.Tensor]) -> str:
    """``seg``, ``linear-depth`` or ``dpt`` from a head state dict's keys ("" when unrecognised)."""
    if "conv_seg.weight" in sd:
        return "seg"
    if any(k.startswith("reassemble_blocks.") for k in sd):
        return "dpt"
    if "conv_depth.weight" in sd:
        return "linear-depth"
    return ""


_KIND_OF_HEAD = {LinearSegHead: "seg", LinearDepthHead: "linear-depth", DPTHead: "dpt"}
_KIND_NAMES = {"seg": "a linear segmentation head", "linear-depth": "a linear depth head", "dpt": "a DPT depth head"}


def _levels_hint(head: nn.Module, key: str, have: tuple[int, ...], levels_known: bool) -> str:
    """Why a shape differs, in terms of the arguments to change (levels/layers, classes, embed_dim); with
    ``levels_known`` (a file that records its head) a differing input width can only be the backbone's."""
    want = tuple(head.state_dict()[key].shape)
    dim = head.embed_dim
    if levels_known and len(have) >= 2 and have[1] != want[1] and key.endswith("weight"):
        width = f" ({have[1] * dim // want[1]})" if have[1] * dim % want[1] == 0 else ""
        return (f": the file was trained on a backbone of another width{width}; this one has embed_dim {dim}; give "
                "the backbone it was trained with")
    if isinstance(head, LinearSegHead) and key == "conv_seg.weight":
        if have[0] != want[0] and have[1:] == want[1:]:
            return f": the file has {have[0]} classes, build the head with num_classes={have[0]}"
        if have[1] % dim == 0:
            return f": the file reads {have[1] // dim} level(s) of {dim} channels (use the 'ms' head for 4, 'linear' for 1)"
    if isinstance(head, LinearDepthHead) and key == "conv_depth.weight":
        per_level = dim * (2 if head.class_token else 1)  # [patch, CLS] or the patch map only
        if have[0] != want[0] and have[1:] == want[1:]:
            return f": the file has {have[0]} bins, build the head with n_bins={have[0]}"
        if have[1] % per_level == 0:
            return f": the file is for layers={have[1] // per_level}"
    if len(have) >= 2 and have[1] != want[1] and key.endswith("weight"):
        return f": the file was trained on a backbone of another width (this one has embed_dim {dim})"
    return ""


def _batch_norm_hint(head: nn.Module, sd: Mapping[str, torch.Tensor]) -> str:
    """Which linear depth head a file with (or without) ``bn.*`` keys is for."""
    if not isinstance(head, LinearDepthHead) or ("bn.weight" in sd) == head.batch_norm:
        return ""
    if head.batch_norm:
        return ": the file is a DINOv2 linear depth head (no BatchNorm), --head linear or linear4"
    return ": the file is DINOv3's linear depth head (with BatchNorm), --head linear-bn"


def load_head(head: nn.Module, weights: str | Path | Mapping[str, Any], *, source: str | None = None,
              levels_known: bool = False) -> nn.Module:
    """Strictly load a head file (official or dinokit) into ``head``; every mismatch is a one-line error that names
    ``source`` (default: the file). ``levels_known``: the file records its head (dinokit's), so only the backbone's
    width can differ."""
    sd, _ = read_head_file(weights)
    source = source or _source(weights)
    expected_kind = _KIND_OF_HEAD[type(head)]
    kind = head_kind_of(sd)
    if kind != expected_kind:
        found = _KIND_NAMES.get(kind, f"no known head (keys {', '.join(list(sd)[:3])})")
        raise DinokitError(f"{source} holds {found}, but {_KIND_NAMES[expected_kind]} was asked for; pick the matching head")
    own = head.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(PREFIX + k for k in missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(PREFIX + k for k in unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise DinokitError(f"{source} does not match the {type(head).__name__} layout ({'; '.join(parts)})"
                           f"{_batch_norm_hint(head, sd)}")
    main_first = sorted(sd.items(), key=lambda kv: kv[0] not in ("conv_seg.weight", "conv_depth.weight"))  # best hints
    for key, value in main_first:
        have, want = tuple(value.shape), tuple(own[key].shape)
        if have != want:
            raise DinokitError(
                f"{PREFIX}{key} is {have} in {source} but the head expects {want}{_levels_hint(head, key, have, levels_known)}"
            )
    head.load_state_dict(sd, strict=True)
    return head


def save_head(head: nn.Module | Mapping[str, torch.Tensor], path: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``head`` (a module, or its full state dict) as an official-layout file (``{"state_dict":
    {"decode_head.*"}}``) plus dinokit's description."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = head.state_dict() if isinstance(head, nn.Module) else head
    payload = {
        "state_dict": {PREFIX + k: v.detach().cpu() for k, v in state.items()},
        "dinokit": dict(meta),
    }
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path
