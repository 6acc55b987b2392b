"""Normalising, strictly loading and writing backbone weights (files are read by ``weight_files.py``).

Every checkpoint layout a user meets (released ``*_pretrain.pth``, training-time chunked blocks,
``teacher_checkpoint.pth``, ``{"model": ...}`` wrappers, DDP ``module.`` prefixes, ``.safetensors``)
goes through one ``state_dict -> state_dict`` filter, :func:`backbone_state_dict_from_checkpoint`,
and is then loaded with ``strict=True``: a silent partial load is how the official evaluation
reported 42% k-NN for a register/non-register mix-up (issue #505). A mismatch raises a one-line
:class:`DinokitError` that says what differs and which model to build instead.

Files are read with ``weights_only=True`` only (``weight_files.py``): a file that needs arbitrary Python objects is refused.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import DinokitError
from ..files import atomic_write
from .architectures import ARCHITECTURES
from .weight_files import load_state_dict_file

StateDict = dict[str, torch.Tensor]

# Wrapper keys, in order of preference: the teacher is what the official evaluation loads.
_WRAPPER_KEYS = ("teacher", "model", "state_dict")
# Prefixes added by DDP, torch.compile, FSDP1 and activation checkpointing.
_NOISE_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Where a backbone lives inside a larger model's state dict, most preferred first.
_BACKBONE_PREFIXES = ("teacher.backbone.", "backbone.", "student.backbone.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # blocks.<chunk>.<index>.rest
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
_MAX_LISTED = 4


# ---------------------------------------------------------------------------------------------- normalising
def _strip_noise(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _NOISE_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
        key = key.replace("._fsdp_wrapped_module.", ".").replace("._checkpoint_wrapped_module.", ".")
    return key


def _unwrapped(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict inside ``{"teacher"|"model"|"state_dict": ...}`` wrappers, possibly nested."""
    sd = checkpoint
    for _ in range(len(_WRAPPER_KEYS)):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if wrapper is None:
            break
        sd = sd[wrapper]
    return sd


def unwrapped_tensors(checkpoint: Mapping[str, Any]) -> StateDict:
    """The tensors of a checkpoint's state dict, out of its wrappers and without the prefixes that DDP,
    ``torch.compile``, FSDP1 and activation checkpointing add (``module.``, ``_orig_mod.``, ...): what every layout
    (official, Hugging Face, timm, mmpretrain) is recognised and converted from."""
    return {_strip_noise(k): v for k, v in _unwrapped(checkpoint).items() if isinstance(v, torch.Tensor)}


def backbone_state_dict_from_checkpoint(checkpoint: Mapping[str, Any], *, source: str = "the checkpoint") -> StateDict:
    """Normalise any supported checkpoint layout to the flat official backbone layout.

    Handles ``{"teacher"|"model"|"state_dict": ...}`` wrappers, ``module.``/``_orig_mod.`` prefixes,
    ``teacher.backbone.``/``backbone.`` prefixes (heads such as ``dino_head.*``/``ibot_head.*`` are
    dropped), and training-time chunked keys ``blocks.<chunk>.<index>.*`` -> ``blocks.<index>.*``.
    A pure function: the input is not modified, tensors are not copied. No ViT tensor at all (neither
    ``cls_token`` nor ``blocks.N.*``) is a one-line error naming ``source`` and the keys it holds.
    """
    sd = _unwrapped(checkpoint)
    tensors = unwrapped_tensors(checkpoint)
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    out = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in tensors.items()}
    if not any(k == "cls_token" or _BLOCK_INDEX.match(k) for k in out):
        raise DinokitError(f"{source} holds no ViT backbone tensors (its keys: {_listing([str(k) for k in sd])}); "
                           "give a backbone file (hub layout, teacher_checkpoint.pth, .safetensors)")
    return out


# ---------------------------------------------------------------------------------------------- describing
def describe_backbone_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture facts readable from a backbone state dict's shapes (only those present)."""
    info: dict[str, Any] = {}
    if "cls_token" in sd:
        info["embed_dim"] = int(sd["cls_token"].shape[-1])
    depths = {int(m.group(1)) for k in sd if (m := _BLOCK_INDEX.match(k))}
    if depths:
        info["depth"] = max(depths) + 1
    info["num_register_tokens"] = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    if "patch_embed.proj.weight" in sd:
        info["patch_size"] = int(sd["patch_embed.proj.weight"].shape[-1])
    if "pos_embed" in sd:
        grid = math.isqrt(int(sd["pos_embed"].shape[1]) - 1)
        info["grid"] = grid
        if "patch_size" in info:
            info["img_size"] = grid * info["patch_size"]
    if any(k.endswith("mlp.w12.weight") for k in sd):
        info["ffn_layer"] = "swiglufused"
    elif any(k.endswith("mlp.fc1.weight") for k in sd):
        info["ffn_layer"] = "mlp"
    info["layerscale"] = any(k.endswith("ls1.gamma") for k in sd)
    return info


def _hub_name(info: Mapping[str, Any]) -> str | None:
    """The official hub name of an architecture, e.g. ``dinov2_vitl14_reg``, if there is one."""
    for arch, dims in ARCHITECTURES.items():
        if (dims["embed_dim"], dims["depth"]) == (info.get("embed_dim"), info.get("depth")):
            name = f"dinov2_{arch.replace('_', '')[:4]}{info.get('patch_size', 14)}"
            name += "_reg" if info.get("num_register_tokens") else ""
            from .registry import list_models  # registry imports this module

            return name if name in list_models() else None
    return None


def _mismatch_hint(file_info: Mapping[str, Any], model_info: Mapping[str, Any]) -> str:
    """The most useful single fix for a file/model mismatch, or ''."""
    f, m = file_info, model_info
    if f.get("embed_dim") is None or f.get("depth") is None:  # a partial state dict: the key lists say it all
        return ""
    if (f.get("embed_dim"), f.get("depth")) != (m.get("embed_dim"), m.get("depth")):
        hint = (
            f"the file holds a ViT with embed_dim {f.get('embed_dim')} and {f.get('depth')} blocks; "
            f"the model has {m.get('embed_dim')} and {m.get('depth')}"
        )
        name = _hub_name(f)
        return hint + (f": use {name}" if name else "")
    if f["num_register_tokens"] != m["num_register_tokens"]:
        if f["num_register_tokens"]:
            name = _hub_name(f)
            use = f"use {name}" if name else f"build the model with num_register_tokens={f['num_register_tokens']}"
            n = f["num_register_tokens"]
            return f"the file is a register model ({n} register_tokens), the model has none: {use}"
        name = _hub_name(f)
        use = f"use {name}" if name else "build the model with num_register_tokens=0"
        return f"the file has no register_tokens but the model has {m['num_register_tokens']}: {use}"
    if f.get("ffn_layer") != m.get("ffn_layer") and f.get("ffn_layer"):
        ffn = f["ffn_layer"]
        return f"the file uses ffn_layer {ffn!r} and the model {m.get('ffn_layer')!r}: build with ffn_layer={ffn!r}"
    if f["layerscale"] != m["layerscale"]:
        if f["layerscale"]:
            return "the file has LayerScale (ls1.gamma) and the model none: build with init_values=1.0"
        return "the file has no LayerScale (ls1.gamma): build with init_values=None"
    if f.get("patch_size") != m.get("patch_size"):
        patch = f.get("patch_size")
        return f"the file uses patch size {patch} and the model {m.get('patch_size')}: build with patch_size={patch}"
    if f.get("grid") != m.get("grid") and "img_size" in f:
        return (
            f"the file's pos_embed is for a {f['grid']}x{f['grid']} grid, "
            f"the model's for {m.get('grid')}x{m.get('grid')}: "
            f"build with img_size={f['img_size']} (any input size still works, the position embedding is interpolated)"
        )
    return ""


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return shown + more


def check_backbone_state_dict(
    model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str = "the checkpoint"
) -> None:
    """Raise a one-line :class:`DinokitError` unless ``sd`` fits ``model`` exactly (keys and shapes)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} {tuple(sd[k].shape)} in file vs {tuple(expected[k].shape)} in model"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {_listing(shapes)}")
    hint = _mismatch_hint(describe_backbone_state_dict(sd), describe_backbone_state_dict(expected))
    message = f"{source} does not fit the model ({'; '.join(parts)})"
    raise DinokitError(message + (f": {hint}" if hint else ""))


def resize_pos_embed(state_dict: StateDict, num_patches: int) -> StateDict:
    """Filter: bicubic-resize ``pos_embed`` to a square grid of ``num_patches`` (class position kept).

    Used to start training at one crop size from weights trained at another (e.g. the released
    518-px backbones, 37x37 grid, into a 224-px student, 16x16 grid). Other keys are unchanged.
    """
    pos = state_dict.get("pos_embed")
    if pos is None or pos.shape[1] - 1 == num_patches:
        return state_dict
    src, dst = math.isqrt(pos.shape[1] - 1), math.isqrt(num_patches)
    if pos.ndim != 3 or pos.shape[0] != 1 or src * src != pos.shape[1] - 1:
        raise DinokitError(f"the position embedding has shape {tuple(pos.shape)}, not (1, 1 + a square grid, dim) "
                           "with the class token first: not an official-layout backbone")
    grid = pos[:, 1:].float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # (1, D, src, src)
    grid = torch.nn.functional.interpolate(grid, size=(dst, dst), mode="bicubic", antialias=dst < src)
    grid = grid.permute(0, 2, 3, 1).reshape(1, dst * dst, -1)  # (1, dst*dst, D)
    return {**state_dict, "pos_embed": torch.cat((pos[:, :1].float(), grid), dim=1).to(pos.dtype)}


# ---------------------------------------------------------------------------------------------- loading
def load_backbone_weights(model: nn.Module, weights: str | Path | Mapping[str, Any]) -> nn.Module:
    """Load a backbone file, URL or state dict into ``model``, always with ``strict=True``.

    Any layout accepted by :func:`backbone_state_dict_from_checkpoint` works, and a file in the layout of Hugging
    Face, timm or mmpretrain (what ``dinokit convert`` writes: its ``model.safetensors`` said "no ViT backbone
    tensors", a timm file "1 missing key(s): mask_token"). Returns ``model``.
    """
    if not isinstance(weights, (str, os.PathLike, Mapping)):
        raise DinokitError(f"weights must be a file path, a URL or a state dict of tensors, got "
                           f"{type(weights).__name__}")
    source = "the state dict" if isinstance(weights, Mapping) else repr(str(weights))
    checkpoint = weights if isinstance(weights, Mapping) else load_state_dict_file(weights)
    _refuse_non_tensors(checkpoint, source)
    sd = backbone_state_dict_from_checkpoint(checkpoint, source=source) if isinstance(weights, Mapping) else \
        backbone_state_dict_of_any_layout(checkpoint, source=source)
    check_backbone_state_dict(model, sd, source=source)
    model.load_state_dict(sd, strict=True)
    return model


def backbone_state_dict_of_any_layout(checkpoint: Mapping[str, Any], source: str = "the checkpoint") -> StateDict:
    """:func:`backbone_state_dict_from_checkpoint` of a loaded file in any layout dinokit reads: official, or that of
    Hugging Face, timm or mmpretrain (what ``dinokit convert`` writes), converted to the official one."""
    from ..convert.formats import detect_layout, to_official  # convert builds on this module

    try:
        layout = detect_layout(checkpoint)
    except DinokitError:  # no backbone in it: said below, naming the file
        layout = "official"
    if layout != "official":
        checkpoint = to_official(checkpoint, layout)
    return backbone_state_dict_from_checkpoint(checkpoint, source=source)


_BACKBONE_KEY = re.compile(r"(^|\.)(cls_token|pos_embed|mask_token|register_tokens|patch_embed\.|blocks\.|norm\.)")


def _refuse_non_tensors(checkpoint: Mapping[str, Any], source: str) -> None:
    """One line for a state dict whose backbone values are numpy arrays (or hold no tensors at all), which the
    key-based normalisation would otherwise report as 'no ViT backbone tensors'."""
    sd = _unwrapped(checkpoint)  # the level that backbone_state_dict_from_checkpoint reads
    has_tensors = any(isinstance(v, torch.Tensor) for v in sd.values())
    arrays = [str(k) for k, v in sd.items() if type(v).__module__ == "numpy"]
    if arrays and (not has_tensors or any(_BACKBONE_KEY.search(k) for k in arrays)):
        raise DinokitError(f"{source} holds numpy arrays, not torch tensors ({_listing(arrays)}); convert them "
                           "first: {k: torch.from_numpy(v) for k, v in state_dict.items()}")
    if sd and not has_tensors and not any(isinstance(v, Mapping) for v in sd.values()):
        kinds = ", ".join(sorted({type(v).__name__ for v in sd.values()}))
        raise DinokitError(f"{source} holds no tensors (its values are {kinds}); give a state dict of torch tensors, "
                           "e.g. model.state_dict(), or a backbone file")


# ---------------------------------------------------------------------------------------------- writing
def save_backbone(model_or_state_dict: nn.Module | Mapping[str, Any], path: str | Path) -> Path:
    """Write a backbone in the official flat layout: ``.safetensors`` or ``.pth`` (atomically).

    A module or any checkpoint layout is accepted (it is normalised first), so a file written here
    loads into ``dinov2_*`` hub models and into the official code alike.
    """
    path = Path(path).expanduser()
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise DinokitError(f"cannot save weights as {path.name!r}; use a .safetensors or .pth file name")
    raw = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    sd = {k: v.detach().to("cpu").contiguous() for k, v in backbone_state_dict_from_checkpoint(raw).items()}
    with atomic_write(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(sd, tmp)
    return path
