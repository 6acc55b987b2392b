"""Parity matrix: the same random weights in dinokit (official layout), Hugging Face transformers and timm.

For each variant (ViT-S/14, ViT-S/14 with 4 registers, ViT-g/14 with SwiGLU), input size (224, 518 and a
non-square 280x420) and dtype (fp32, bf16), the weights of one randomly initialised dinokit backbone are
converted with ``dinokit.convert`` and loaded strictly into ``transformers.AutoModel`` and a timm
``VisionTransformer`` (``dynamic_img_size=True``); the table gives ``max|x - ref| / max|ref|`` of the
normalised class token and of the patch tokens, ``ref`` being dinokit in the same dtype. A last column
compares dinokit bf16 with dinokit fp32, the scale of rounding to read the others against.

Run from the repo root (no downloads): ``PYTHONPATH=src python benchmarks/parity.py [--g-depth 40]``.
ViT-g keeps its width, heads and SwiGLU but only ``--g-depth`` of its 40 blocks by default (CPU memory).
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

from dinokit.convert import official_to_timm, save_hf_folder, spec_from_model_name, timm_model_kwargs
from dinokit.convert.spec import BackboneSpec

VARIANTS = {"S": "dinov2_vits14", "S-reg": "dinov2_vits14_reg", "g": "dinov2_vitg14"}
SIZES = [(224, 224), (518, 518), (280, 420)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max())


def build_all(spec: BackboneSpec, seed: int):
    import timm
    import transformers

    torch.manual_seed(seed)
    official = spec.build().eval()
    with torch.no_grad():  # LayerScale and tokens away from their init values, so that every mapping shows
        for name, p in official.named_parameters():
            if name.endswith(("gamma", "cls_token", "register_tokens", "mask_token")):
                p.normal_(0, 0.1 if name.endswith("gamma") else 0.5)
    sd = official.state_dict()
    with tempfile.TemporaryDirectory(prefix="parity-hf-") as folder:
        hf = transformers.AutoModel.from_pretrained(save_hf_folder(sd, folder, spec=spec),
                                                    attn_implementation="eager").eval()
    tm = timm.models.vision_transformer.VisionTransformer(**timm_model_kwargs(spec), dynamic_img_size=True).eval()
    tm.load_state_dict(official_to_timm(sd), strict=True)
    return official, hf, tm


def tokens(kind: str, model, x: torch.Tensor, registers: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        if kind == "dinokit":
            out = model.forward_features(x)
            return out["x_norm_clstoken"], out["x_norm_patchtokens"]
        seq = model(pixel_values=x).last_hidden_state if kind == "hf" else model.forward_features(x)
        return seq[:, 0], seq[:, 1 + registers :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--g-depth", type=int, default=2, help="blocks of ViT-g to build (40 = the full model)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| variant | size | dtype | HF cls | HF patch | timm cls | timm patch | dinokit bf16 vs fp32 cls |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in args.variants:
        spec = spec_from_model_name(VARIANTS[variant])
        if variant == "g":
            spec = BackboneSpec(**{**spec.to_dict(), "depth": args.g_depth})
        models = dict(zip(("dinokit", "hf", "timm"), build_all(spec, seed=0)))
        generator = torch.Generator().manual_seed(1)
        for h, w in SIZES:
            x = torch.randn(args.batch, 3, h, w, generator=generator)
            fp32_cls = None
            for dtype_name, dtype in DTYPES.items():
                out = {}
                for kind, model in models.items():
                    # a copy: casting back from bf16 would round the fp32 weights (timm's folded class token visibly)
                    cast = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
                    out[kind] = tokens(kind, cast, x.to(dtype), spec.num_register_tokens)
                ref_cls, ref_patch = out["dinokit"]
                fp32_cls = ref_cls if dtype_name == "fp32" else fp32_cls
                cells = [rel(out[k][i], ref) for k in ("hf", "timm") for i, ref in enumerate((ref_cls, ref_patch))]
                base = rel(ref_cls, fp32_cls) if dtype_name == "bf16" else 0.0
                name = f"{variant}" + (f" ({args.g_depth} blocks)" if variant == "g" and args.g_depth != 40 else "")
                row = [name, f"{h}x{w}", dtype_name] + [f"{c:.1e}" for c in cells] + [f"{base:.1e}" if base else "-"]
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
