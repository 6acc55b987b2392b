"""DINOv2 ViT-L/14 training-step throughput on one GPU (2x224 + 8x98 crops, batch 64, bf16).

Run on a GPU machine from the repo root: ``PYTHONPATH=src python benchmarks/train_step.py [--compile]``.
Synthetic images, the official vitl14 recipe otherwise (heads, iBOT, KoLeo, Sinkhorn-Knopp, EMA).

``--data DIR`` feeds the step from the real data path instead: the images under DIR decoded and augmented as
``dinokit train`` does (``crops.augmentation=pil|tensor|device`` among the trailing ``KEY=VALUE`` overrides;
``device`` makes the crops on the GPU), with ``train.num_workers`` data workers; the timed steps then include
waiting for data. ``--device cpu`` runs it anywhere (the tests use it with a tiny config).

``--variants`` times the step eight times in one process, side by side: plain, with ``train.packed_crops``
(with ``--compile``: a compiled packed block function), with ``train.head_chunk_rows`` (``--chunk-rows``), with
both, with ``train.compile_loss`` (the loss terms compiled), with packed crops and the compiled loss, and with
activation checkpointing of the student's blocks, full and selective (speed for memory); each line carries its
speed relative to the plain step. ``--ac full|selective`` checkpoints every variant.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from dinokit.config import load_config
from dinokit.data.collate import SSLCollate
from dinokit.engine import Engine, batch_to
from dinokit.train.data import build_train_loader
from dinokit.train.ssl_meta_arch import SSLMetaArch
from dinokit.train.train import compile_objective, engine_config


def synthetic_batch(cfg, batch_size: int):
    crops = cfg.crops
    samples = [
        (i, {
            "global_crops": [torch.randn(3, crops.global_crops_size, crops.global_crops_size) for _ in range(2)],
            "local_crops": [torch.randn(3, crops.local_crops_size, crops.local_crops_size)
                            for _ in range(crops.local_crops_number)],
        })
        for i in range(batch_size)
    ]
    collate = SSLCollate(seed=0, global_crops_size=crops.global_crops_size, patch_size=cfg.student.patch_size)
    return collate(samples)


VARIANTS = {"plain": [], "packed": ["train.packed_crops=true"], "chunked": ["train.head_chunk_rows={rows}"],
            "packed+chunked": ["train.packed_crops=true", "train.head_chunk_rows={rows}"],
            "compiled loss": ["train.compile_loss=true"],
            "packed+compiled loss": ["train.packed_crops=true", "train.compile_loss=true"],
            "checkpointed full": ["train.activation_checkpointing=true"],
            "checkpointed selective": ["train.activation_checkpointing=true",
                                       "train.activation_checkpointing_policy=selective"]}


def measure(args, opts: list[str]) -> dict:
    """Images/s, step time and peak memory of the training step with the config overrides ``opts``."""
    with tempfile.TemporaryDirectory(prefix="dinokit-bench-") as output_dir:
        return _measure(args, opts, output_dir)


def _measure(args, opts: list[str], output_dir: str) -> dict:
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    data = [f"train.dataset_path=ImageFolder:root={args.data}"] if args.data else []
    wrap = [*(["train.compile=true"] if args.compile else []),
            *(["train.activation_checkpointing=true", f"train.activation_checkpointing_policy={args.ac}"]
              if args.ac else [])]
    cfg = load_config(args.config, [f"train.batch_size_per_gpu={args.batch}", *data, *wrap, *opts])
    torch.manual_seed(0)  # the same initial weights and synthetic crops for every variant
    model = SSLMetaArch(cfg)
    compile_objective(model, cfg.train)  # as dinokit train does
    model.teacher.load_state_dict(model.student.state_dict())
    settings = engine_config(cfg, dev)
    engine = Engine(model, settings, output_dir=output_dir, device=dev, schedules={})
    warmup = 5 if args.compile else 3
    if args.data:
        loader = iter(build_train_loader(cfg, start_iteration=0, pin_memory=cuda))
        next_batch = lambda i: batch_to(next(loader), dev)  # noqa: E731  (decode + augmentation, timed)
    else:
        batches = [batch_to(synthetic_batch(cfg, args.batch), dev) for _ in range(2)]
        next_batch = lambda i: batches[i % 2]  # noqa: E731
    sched = {"lr": 1e-4, "wd": 0.04, "momentum": 0.994, "teacher_temp": 0.07, "last_layer_lr": 1e-4}
    for i in range(warmup):
        engine.step(next_batch(i), i, sched)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        out = engine.step(next_batch(i), i, sched)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"images_per_s": round(args.batch * args.steps / dt, 1), "step_s": round(dt / args.steps, 4),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
            "compile": args.compile, "data": "synthetic" if not args.data else cfg.crops.augmentation,
            "num_workers": cfg.train.num_workers if args.data else 0, "loss": float(out.total.detach()),
            "checkpointing": cfg.train.activation_checkpointing_policy if cfg.train.activation_checkpointing else None}


def main(argv: list[str] | None = None) -> dict | list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="vitl14")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--ac", choices=["full", "selective"], help="activation checkpointing of the student's blocks")
    p.add_argument("--data", help="an image folder: real decoding + augmentation instead of synthetic crops")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", action="store_true",
                   help="plain, packed crops, chunked heads, both, compiled loss (alone, with packed crops), "
                        "checkpointed blocks (full, selective), side by side")
    p.add_argument("--chunk-rows", type=int, default=4096, help="train.head_chunk_rows of the chunked variants")
    p.add_argument("opts", nargs="*")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    if not args.variants:
        res = measure(args, args.opts)
        print(json.dumps(res), flush=True)
        return res
    results = []
    for name, extra in VARIANTS.items():
        checkpointed = args.ac or "train.activation_checkpointing=true" in extra
        if (checkpointed and "train.packed_crops=true" in extra) or (args.ac and name.startswith("checkpointed")):
            continue  # the packed forward bypasses checkpointed blocks (refused by the config); no double wrapping
        res = {"variant": name, **measure(args, [*args.opts, *(o.format(rows=args.chunk_rows) for o in extra)])}
        res["vs_plain"] = round(res["images_per_s"] / results[0]["images_per_s"], 2) if results else 1.0
        print(json.dumps(res), flush=True)
        results.append(res)
    return results


if __name__ == "__main__":
    main()
