"""Read a backbone in any supported layout and write it in another: what ``dinokit convert`` runs.

Layouts: ``official`` (any file dinokit loads: released ``*_pretrain.pth``, a run's
``teacher_checkpoint.pth``, ``.safetensors``), ``hf`` (a Hugging Face folder or its weights file),
``timm`` and ``mmpretrain`` (read only). Everything goes through the official layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..engine.run_dir import check_not_replacing, check_writable
from ..errors import DinokitError
from ..models.architectures import arch_dims
from ..files import atomic_write
from ..models.checkpoint import backbone_state_dict_from_checkpoint, check_backbone_state_dict, save_backbone
from ..models.weight_files import load_state_dict_file
from .hf import is_hf_state_dict, hf_to_official, read_hf_classifier, read_hf_folder, save_hf_folder
from .mmpretrain import is_mmpretrain_state_dict, mmpretrain_to_official
from .spec import BackboneSpec, StateDict, spec_from_model_name, spec_from_state_dict
from .timm import is_timm_state_dict, official_to_timm_checked, timm_model_name, timm_to_official

SOURCE_LAYOUTS = ("official", "hf", "timm", "mmpretrain")
TARGETS = ("official", "hf", "timm", "safetensors")


def detect_layout(checkpoint: Mapping[str, Any]) -> str:
    """Which of :data:`SOURCE_LAYOUTS` a loaded checkpoint is in."""
    if is_mmpretrain_state_dict(checkpoint):
        return "mmpretrain"
    if is_hf_state_dict(checkpoint):
        return "hf"
    flat = backbone_state_dict_from_checkpoint(checkpoint)
    return "timm" if is_timm_state_dict(flat) else "official"


def read_backbone(path: str | Path, *, layout: str | None = None) -> tuple[StateDict, str, dict[str, Any] | None]:
    """``(official state dict, source layout, Hugging Face config or None)`` of a file or Hugging Face folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        if layout not in (None, "hf"):
            raise DinokitError(f"{str(path)!r} is a folder; only the hf layout is a folder (pass a weights file)")
        sd, config = read_hf_folder(path)
        return sd, "hf", config
    checkpoint = load_state_dict_file(path)
    layout = layout or detect_layout(checkpoint)
    return to_official(checkpoint, layout), layout, None


def to_official(checkpoint: Mapping[str, Any], layout: str | None = None) -> StateDict:
    """The official backbone state dict of a loaded checkpoint in ``layout`` (default: :func:`detect_layout`)."""
    layout = layout or detect_layout(checkpoint)
    if layout not in SOURCE_LAYOUTS:
        raise DinokitError(f"unknown source layout {layout!r}; use one of {', '.join(SOURCE_LAYOUTS)}")
    if layout == "mmpretrain":
        return mmpretrain_to_official(checkpoint)
    if layout == "hf":
        return hf_to_official(checkpoint)
    flat = backbone_state_dict_from_checkpoint(checkpoint)
    return timm_to_official(flat) if layout == "timm" else flat


def resolve_spec(sd: StateDict, *, model: str | None = None, config: Mapping[str, Any] | None = None) -> BackboneSpec:
    """The architecture of ``sd``; heads from ``model`` (a hub name or an architecture key), ``config`` or the table."""
    spec = spec_from_state_dict(sd)
    heads = None
    if config and "num_attention_heads" in config:
        heads = int(config["num_attention_heads"])
    elif model is not None:
        try:
            named = spec_from_model_name(model)
            heads, size = named.num_heads, (named.embed_dim, named.depth)
        except DinokitError:
            dims = arch_dims(model, "--model")  # an architecture key, or one line if unknown
            heads = int(dims["num_heads"])
            size = (dims["embed_dim"], dims["depth"])
        if size != (spec.embed_dim, spec.depth):  # its head count would be stamped on another network
            fix = f"give the matching architecture ({spec.arch})" if spec.arch else "give an architecture of that size"
            raise DinokitError(f"--model {model} has embed_dim {size[0]} and {size[1]} blocks but the weights have "
                               f"{spec.embed_dim} and {spec.depth}; {fix} or leave --model out")
    return BackboneSpec(**{**spec.to_dict(), "num_heads": heads or spec.num_heads})


def convert_checkpoint(
    src: str | Path, dst: str | Path, *, to: str, model: str | None = None, layout: str | None = None,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Convert ``src`` into ``dst`` in the ``to`` layout; returns what was done (for the CLI to print). Without
    ``overwrite``, an existing ``dst`` (for ``to="hf"``: a folder holding its files) is one line."""
    if to not in TARGETS:
        raise DinokitError(f"unknown target {to!r}; use one of {', '.join(TARGETS)}")
    source_path, out_path = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    written = {out_path, out_path / "model.safetensors", out_path / "config.json"} if to == "hf" else {out_path}
    if source_path in written:
        raise DinokitError(f"the output {str(dst)!r} is the input {'folder' if source_path.is_dir() else 'file'}; "
                           "give another output path")
    hf_files = ("config.json", "model.safetensors") if to == "hf" else ()
    check_writable(dst, "the output", is_file=to != "hf")  # e.g. a file on the way: one line, not "File exists"
    check_not_replacing(dst, "the output", overwrite=overwrite, inside=hf_files)
    sd, source, config = read_backbone(src, layout=layout)
    spec = resolve_spec(sd, model=model, config=config)
    with torch.device("meta"):  # the keys and shapes the spec's network has, without its memory
        check_backbone_state_dict(spec.build(), sd, source=f"{str(src)!r}, read as embed_dim {spec.embed_dim} "
                                  f"with {spec.depth} blocks,")  # a file at odds with itself: no output
    dst = Path(dst).expanduser()
    head = read_hf_classifier(src) if source == "hf" else None
    head_path = dst.with_name(f"{dst.stem}_linear_head.pth") if head is not None and to != "hf" else None
    if head_path is not None:
        check_not_replacing(head_path, "the linear head", overwrite=overwrite)
    report: dict[str, Any] = {"source": source, "target": to, "spec": spec, "out": dst}
    if to == "hf":
        save_hf_folder(sd, dst, spec=spec)
    elif to == "timm":
        if dst.suffix not in (".pth", ".pt", ".safetensors"):
            raise DinokitError(f"cannot save timm weights as {dst.name!r}; use a .pth or .safetensors file name")
        save_backbone(official_to_timm_checked(sd, spec), dst)  # a flat state dict in any layout saves as is
        report["timm_model"] = timm_model_name(spec)
    else:
        if to == "safetensors" and dst.suffix != ".safetensors":
            raise DinokitError(f"--to safetensors writes a .safetensors file, not {dst.name!r}")
        save_backbone(sd, dst)
    if head is not None:  # Dinov2ForImageClassification: its classifier is the official one-block linear head
        if head_path is None:
            report["dropped_classifier"] = tuple(head["weight"].shape)
        else:
            with atomic_write(head_path) as tmp:
                torch.save({k: v.contiguous() for k, v in head.items()}, tmp)
            report["linear_head"] = head_path
    return report

