"""DINOv2 inference throughput (ViT-S/B/L/g, patch 14, 224 px by default), bf16 autocast, eager and compiled:
dinokit vs timm vs Hugging Face, same architecture and shapes, in one process.

Run on a GPU machine from the repo root: ``PYTHONPATH=src python benchmarks/inference.py --arch vitl14`` (targets:
ViT-S/14 >= 25,000, ViT-L/14 >= 3,000, ViT-g/14 >= 800 images/s on one H100).
All models are randomly initialised with the same architecture (no downloads); ``--device cpu`` runs in fp32 for
checks (``tests/test_speed_benchmarks.py`` builds every size of each peer and compares their parameter counts).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

# width, depth, heads and FFN of each official backbone (ViT-g: SwiGLU, hidden 4096 as the official "swiglufused")
ARCHS = {
    "vits14": dict(dinokit="vit_small", timm="vit_small_patch14_dinov2", width=384, depth=12, heads=6, swiglu=False),
    "vitb14": dict(dinokit="vit_base", timm="vit_base_patch14_dinov2", width=768, depth=12, heads=12, swiglu=False),
    "vitl14": dict(dinokit="vit_large", timm="vit_large_patch14_dinov2", width=1024, depth=24, heads=16, swiglu=False),
    "vitg14": dict(dinokit="vit_giant2", timm="vit_giant_patch14_dinov2", width=1536, depth=40, heads=24, swiglu=True),
}


def build(name: str, arch: str = "vitl14"):
    a = ARCHS[arch]
    if name == "dinokit":
        from dinokit import models

        ffn = {"ffn_layer": "swiglufused"} if a["swiglu"] else {}
        return getattr(models, a["dinokit"])(patch_size=14, img_size=518, init_values=1.0, **ffn)
    if name == "timm":
        import timm

        return timm.create_model(a["timm"], pretrained=False, img_size=518, num_classes=0, dynamic_img_size=True)
    if name == "hf":
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(hidden_size=a["width"], num_hidden_layers=a["depth"], num_attention_heads=a["heads"],
                           image_size=518, patch_size=14, layerscale_value=1.0, use_swiglu_ffn=a["swiglu"],
                           attn_implementation="sdpa")
        return Dinov2Model(cfg)
    raise ValueError(name)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def throughput(model, batch: int, steps: int, warmup: int, size: int, device: str = "cuda") -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with amp:
        for _ in range(warmup):
            model(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        sync()
    return batch * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="vitl14", choices=sorted(ARCHS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--impls", default="dinokit,timm,hf")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--modes", default="eager,compiled")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = {}
    for name in args.impls.split(","):
        for mode in args.modes.split(","):
            model = build(name, args.arch).to(args.device).eval()
            if mode == "compiled":
                model = torch.compile(model)
            ips = throughput(model, args.batch, args.steps, warmup=5 if mode == "eager" else 10, size=args.size,
                             device=args.device)
            results[f"{name}/{mode}"] = round(ips, 1)
            print(f"{args.arch} {name:>8} {mode:>9}: {ips:8.1f} images/s", flush=True)
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps({"arch": args.arch, **results}))
    return results


if __name__ == "__main__":
    main()
