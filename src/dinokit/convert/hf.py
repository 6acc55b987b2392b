"""Official DINOv2 layout <-> Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel``.

The Hugging Face layout splits the fused ``attn.qkv`` into ``query``/``key``/``value`` (row blocks
in q, k, v order), renames LayerScale ``gamma`` to ``lambda1`` and the SwiGLU ``w12``/``w3`` to
``weights_in``/``weights_out``, and keeps every other tensor as it is (the class position inside
``position_embeddings``, registers without position, ``mask_token`` of shape (1, D)). That is the
layout of the ``facebook/dinov2-*`` files; transformers 5 renames it to ``q_proj``/``gate_proj``...
when it loads a model and back when it saves one, and :func:`hf_to_official` reads both.

A folder written by :func:`save_hf_folder` (``config.json`` + ``model.safetensors``) loads with
``transformers.AutoModel.from_pretrained(folder)``; nothing here imports transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import DinokitError
from ..models.checkpoint import unwrapped_tensors
from ..models.weight_files import load_state_dict_file
from ..files import atomic_write
from .spec import BackboneSpec, StateDict, spec_from_state_dict, with_layerscale

# official suffix inside a block -> Hugging Face suffix inside encoder.layer.i
_BLOCK_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
}
_TOP_RENAMES = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_QKV = ("query", "key", "value")
# transformers >= 5 in-memory names -> the file names above
_V5_NAMES = (
    (re.compile(r"\.attention\.(q|k|v)_proj\."), lambda m: ".attention.attention." + _QKV["qkv".index(m.group(1))] + "."),
    (re.compile(r"\.attention\.o_proj\."), lambda m: ".attention.output.dense."),
    (re.compile(r"\.mlp\.down_proj\."), lambda m: ".mlp.weights_out."),
)
_HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_OFFICIAL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$")


def is_hf_state_dict(sd: Mapping[str, Any]) -> bool:
    """Whether a loaded file (possibly wrapped, or saved from a DDP/compiled model) holds a Hugging Face Dinov2."""
    return any(k.startswith(("embeddings.", "dinov2.embeddings.", "encoder.layer.")) for k in unwrapped_tensors(sd))


# ---------------------------------------------------------------------------------------------- official -> HF
def official_to_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Filter an official backbone state dict into the Hugging Face file layout (tensors are views)."""
    out: StateDict = {}
    for key, value in sd.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
            continue
        match = _OFFICIAL_BLOCK.match(key)
        if match is None:
            raise DinokitError(f"cannot convert {key!r} to the Hugging Face layout: not a DINOv2 backbone key")
        i, module, kind = match.groups()
        kind = "lambda1" if kind == "gamma" else kind
        prefix = f"encoder.layer.{i}."
        if module == "attn.qkv":
            # (3D, D) rows [q | k | v] -> three (D, D); biases likewise
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{name}.{kind}"] = part
            continue
        suffix = _BLOCK_RENAMES.get(f"{module}.gamma" if kind == "lambda1" else module)
        if suffix is None:
            raise DinokitError(f"cannot convert {key!r} to the Hugging Face layout: unknown block parameter")
        out[prefix + (suffix if kind == "lambda1" else f"{suffix}.{kind}")] = value
    return out


def hf_config(spec: BackboneSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) with this architecture, its
    weights stored in ``dtype`` (what ``from_pretrained(..., torch_dtype="auto")`` loads them as)."""
    registers = spec.num_register_tokens > 0
    config: dict[str, Any] = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        # integral ratios as ints: transformers 5 validates the field as an int
        "mlp_ratio": int(spec.mlp_ratio) if float(spec.mlp_ratio).is_integer() else spec.mlp_ratio,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": spec.img_size,
        "patch_size": spec.patch_size,
        "num_channels": 3,
        "qkv_bias": spec.qkv_bias,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": spec.ffn_layer != "mlp",
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if registers:
        config["num_register_tokens"] = spec.num_register_tokens
    else:
        config["use_mask_token"] = True
    return config


def save_hf_folder(sd: Mapping[str, torch.Tensor], folder: str | Path, *, spec: BackboneSpec | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for an official backbone state dict."""
    from safetensors.torch import save_file

    spec = spec or spec_from_state_dict(sd)
    biases = ("blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.bias" if spec.ffn_layer == "mlp" else "blocks.0.mlp.w12.bias")
    if not spec.qkv_bias or any(k not in sd for k in biases):
        raise DinokitError("Hugging Face Dinov2Model has biases in every linear layer; this backbone lacks some")
    hf = official_to_hf(with_layerscale(sd, spec))
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DinokitError(f"{str(folder)!r} is a file; the Hugging Face output is a folder (config.json + model.safetensors)")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in hf.items()}
    with atomic_write(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_write(folder / "config.json") as tmp:  # a whole file or the previous one, as every output
        # the weights' own dtype: fp16 or bf16 weights said float32, and "auto" loaded them as float32
        stored = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
        tmp.write_text(json.dumps(hf_config(spec, stored), indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------- HF -> official
def _file_names(key: str) -> str:
    for pattern, repl in _V5_NAMES:
        key = pattern.sub(repl, key)
    return key


def hf_to_official(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Filter a Hugging Face ``Dinov2Model`` state dict (file or transformers-5 names) into the official layout.

    A ``dinov2.`` prefix (``Dinov2ForImageClassification``) is removed and its ``classifier.*`` dropped.
    """
    flat = {}
    for key, value in unwrapped_tensors(sd).items():
        key = key.removeprefix("dinov2.")
        if key.startswith("classifier."):
            continue
        flat[_file_names(key)] = value
    # transformers 5 splits the SwiGLU input projection into gate and up halves: fuse them back, gate first
    for key in [k for k in flat if ".mlp.gate_proj." in k]:
        up = key.replace(".gate_proj.", ".up_proj.")
        flat[key.replace(".gate_proj.", ".weights_in.")] = torch.cat((flat.pop(key), flat.pop(up)), dim=0)
    inverse_top = {v: k for k, v in _TOP_RENAMES.items()}
    inverse_block = {v: k for k, v in _BLOCK_RENAMES.items()}
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key in inverse_top:
            out[inverse_top[key]] = value
            continue
        match = _HF_BLOCK.match(key)
        if match is None:
            raise DinokitError(f"unexpected key {key!r} in the Hugging Face weights; expected a Dinov2Model")
        i, rest = match.groups()
        attn = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if attn:
            qkv.setdefault((i, attn.group(2)), {})[attn.group(1)] = value
            continue
        if rest.endswith(".lambda1"):
            out[f"blocks.{i}.{inverse_block[rest]}"] = value
            continue
        module, _, kind = rest.rpartition(".")
        if module not in inverse_block:
            raise DinokitError(f"unexpected key {key!r} in the Hugging Face weights; expected a Dinov2Model")
        out[f"blocks.{i}.{inverse_block[module]}.{kind}"] = value
    for (i, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise DinokitError(f"layer {i} of the Hugging Face weights lacks one of query/key/value {kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in _QKV], dim=0)  # rows [q | k | v]
    return out


def read_hf_classifier(path: str | Path) -> StateDict | None:
    """The ``classifier`` of a ``Dinov2ForImageClassification`` file or folder as an official linear head
    (``{"weight": (C, 2D), "bias": (C,)}``: the class token and patch mean of the last block, the official
    one-block head), or None when there is none."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), path)
    sd = load_state_dict_file(path)
    head = {name: sd[f"classifier.{name}"] for name in ("weight", "bias") if f"classifier.{name}" in sd}
    return head if len(head) == 2 else None


def read_hf_folder(path: str | Path) -> tuple[StateDict, dict[str, Any] | None]:
    """An official state dict and the ``config.json`` (if any) from a Hugging Face folder or weights file."""
    path = Path(path).expanduser()
    config = None
    if path.is_dir():
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return hf_to_official(load_state_dict_file(path / name)), config
        raise DinokitError(f"{str(path)!r} holds no model.safetensors or pytorch_model.bin; pass a Hugging Face model folder")
    return hf_to_official(load_state_dict_file(path)), config

