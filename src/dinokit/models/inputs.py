"""The checks of what a backbone is built with and given: one line naming the setting or input and the fix
(:class:`dinokit.errors.ModelInputError`, also a ``ValueError``). Plain Python on shapes, dtypes and devices, once
per public call: no host-device synchronisation, nothing for ``torch.compile`` or the ONNX exporter to trace."""

from __future__ import annotations

import numbers
import operator
from typing import Any, Mapping, Sequence

import torch

from ..errors import ModelInputError

_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts to the compute dtype


def check_settings(settings: dict[str, Any]) -> None:
    """One line for a constructor setting that cannot build a working model."""
    whole = {"img_size": 1, "patch_size": 1, "in_chans": 1, "embed_dim": 1, "depth": 1, "num_heads": 1,
             "num_register_tokens": 0}
    for name, low in whole.items():
        value = settings[name]
        if not is_whole_number(value) or value < low:
            raise ModelInputError(f"{name}={value!r} is not usable: give a whole number >= {low}")
    img, patch = settings["img_size"], settings["patch_size"]
    if img < patch:
        raise ModelInputError(f"img_size={img} is smaller than one patch (patch_size={patch}): the position embedding "
                              f"needs at least one patch; give img_size >= {patch}, e.g. {patch * 16}")
    rate, ratio = settings["drop_path_rate"], settings["mlp_ratio"]
    if not _is_real(rate) or not 0 <= rate < 1:
        raise ModelInputError(f"drop_path_rate={rate!r} is not usable: give a number >= 0 and < 1")
    if not _is_real(ratio) or not ratio > 0:
        raise ModelInputError(f"mlp_ratio={ratio!r} is not usable: give a number > 0 (e.g. 4.0)")


def is_whole_number(value: Any) -> bool:
    """An int (or numpy integer), not a bool: what a count, a size or an index must be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_index(value: Any) -> int | None:
    """``value`` as an int index, or None for a bool, a float or anything else that is not a whole number."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _dtype_name(dtype: torch.dtype, prefix: str = "") -> str:
    return prefix + str(dtype).removeprefix("torch.")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_images(x: Any, weight: torch.Tensor, c: int) -> None:
    """One line unless ``x`` is a (B, ``c``, H, W) tensor of ``weight``'s dtype (or one autocast takes) and device.

    Plain Python on the shape, dtype and device: no host-device sync, nothing for ``torch.compile`` to trace.
    """
    want = f"a (B, {c}, H, W) {_dtype_name(weight.dtype)} tensor"
    if not isinstance(x, torch.Tensor):
        hint = "; convert it with torch.from_numpy(array)" if type(x).__module__ == "numpy" else ""
        raise ModelInputError(f"expected {want}, got {type(x).__name__}{hint}")
    shape = tuple(x.shape)
    if x.ndim != 4:
        hint = ": add the batch dimension with x.unsqueeze(0)" if x.ndim == 3 else ""
        raise ModelInputError(f"expected {want}, got shape {shape}{hint}")
    if shape[1] != c:
        hint = ""
        if shape[-1] == c:
            hint = ": channels come second, use x.permute(0, 3, 1, 2)"
        elif shape[1] == 1 and c == 3:
            hint = ": repeat a grey channel with x.expand(-1, 3, -1, -1)"
        raise ModelInputError(f"expected {want}, got {shape[1]} channel(s) (shape {shape}){hint}")
    if x.device != weight.device:
        raise ModelInputError(f"the input is on {x.device} and the model on {weight.device}: move the input "
                              f"with x.to({str(weight.device)!r})")
    if not x.is_floating_point():
        hint = f"convert it with x.to({_dtype_name(weight.dtype, 'torch.')})"
        if x.dtype == torch.uint8:
            hint = ("convert the pixels with x.float() / 255, then normalise them with the ImageNet mean and std "
                    "(dinokit.data.transforms.make_normalize_transform)")
        raise ModelInputError(f"expected {want}, got {_dtype_name(x.dtype)}: {hint}")
    autocast = weight.dtype in _AUTOCAST_DTYPES  # autocast casts these weights, not float64 ones
    if x.dtype != weight.dtype and not (autocast and x.dtype in _AUTOCAST_DTYPES
                                        and torch.is_autocast_enabled(x.device.type)):
        also = ", or run under torch.autocast" if autocast else ""
        raise ModelInputError(f"expected {want} (the model's dtype), got {_dtype_name(x.dtype)}: convert it with "
                              f"x.to({_dtype_name(weight.dtype, 'torch.')}){also}")


def check_masks(x: torch.Tensor, masks: Any, p: int) -> None:
    """One line unless ``masks`` is None or a (B, N) bool tensor for ``x``'s patch grid."""
    if masks is None:
        return
    b, n = x.shape[0], (x.shape[-2] // p) * (x.shape[-1] // p)
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or tuple(masks.shape) != (b, n):
        got = f"shape {tuple(masks.shape)} {_dtype_name(masks.dtype)}" if isinstance(masks, torch.Tensor) else (
            f"a {type(masks).__name__}")
        raise ModelInputError(f"masks must be a ({b}, {n}) bool tensor (one flag per patch of each image), "
                              f"got {got}")


def check_crop_sets(x: Sequence[torch.Tensor], masks: Any) -> None:
    """One line unless ``masks`` is None or a list with one entry (a mask or None) per crop set of ``x``: a shorter
    list dropped the crop sets it missed, silently."""
    if masks is not None and (not isinstance(masks, (list, tuple)) or len(masks) != len(x)):
        got = f"{len(masks)}" if isinstance(masks, (list, tuple)) else f"a {type(masks).__name__}"
        raise ModelInputError(f"{len(x)} crop sets need a list of {len(x)} masks (None for an unmasked set), got {got}")


def block_indices(n: Any, depth: int) -> list[int]:
    """The block indices ``n`` names (an int: the last ``n`` blocks; a sequence: those indices), sorted."""
    items = None
    if not isinstance(n, (bool, str, bytes, numbers.Integral, Mapping)) and hasattr(n, "__iter__"):
        try:
            items = list(n)
        except TypeError:  # a 0-d tensor or array
            pass
    if items is None and not is_whole_number(n):
        raise ModelInputError(f"n={n!r} is not usable: give the number of last blocks (1..{depth}) "
                              f"or a list of block indices (0..{depth - 1})")
    if items is None:
        if not 1 <= n <= depth:
            raise ModelInputError(f"n={n} must be between 1 and the depth {depth} (the number of last blocks), "
                                  f"or give a list of block indices (0..{depth - 1})")
        return list(range(depth - int(n), depth))
    indices = [_as_index(i) for i in items]
    if not indices:
        why = "is empty"
    elif any(i is None or not 0 <= i < depth for i in indices):
        why = f"must hold block indices in [0, {depth - 1}]"
    elif len(set(indices)) != len(indices):
        why = "repeats an index"
    else:
        return sorted(indices)
    raise ModelInputError(f"n={items!r} {why}: give distinct block indices 0..{depth - 1} (the model has {depth} "
                          "blocks), or an int n for the last n blocks")
