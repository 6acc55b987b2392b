"""ViT-L/14 inference throughput at 224 px, bf16 autocast, eager and compiled: dinokit vs timm vs Hugging Face.

Run on a GPU machine from the repo root: ``PYTHONPATH=src python benchmarks/inference.py``.
All models are randomly initialised with the same architecture (no downloads).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(name: str):
    if name == "dinokit":
        from dinokit.models import vit_large

        return vit_large(patch_size=14, img_size=518, init_values=1.0)
    if name == "timm":
        import timm

        return timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=518, num_classes=0, dynamic_img_size=True)
    if name == "hf":
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518,
                           patch_size=14, layerscale_value=1.0, attn_implementation="sdpa")
        return Dinov2Model(cfg)
    raise ValueError(name)


@torch.inference_mode()
def throughput(model, batch: int, steps: int, warmup: int, size: int) -> float:
    x = torch.randn(batch, 3, size, size, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impls", default="dinokit,timm,hf")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--modes", default="eager,compiled")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = {}
    for name in args.impls.split(","):
        for mode in args.modes.split(","):
            model = build(name).cuda().eval()
            if mode == "compiled":
                model = torch.compile(model)
            ips = throughput(model, args.batch, args.steps, warmup=5 if mode == "eager" else 10, size=args.size)
            results[f"{name}/{mode}"] = round(ips, 1)
            print(f"{name:>8} {mode:>9}: {ips:8.1f} images/s", flush=True)
            del model
            torch.cuda.empty_cache()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
