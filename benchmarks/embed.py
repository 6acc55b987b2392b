"""``dinokit embed`` end to end against the model alone: images/s of each on the same device and batch, and the
ratio (the speed target: end to end within 85% of the model alone).

* ``model only``: random (batch, 3, S, S) tensors already on the device through the embed feature function;
* ``end to end``: :func:`dinokit.features.extract_features` over real files, as ``dinokit embed`` runs it:
  decoding and the evaluation transform (resize, centre crop, normalisation) in DataLoader workers, pinned
  memory, non-blocking copies, the model, the class tokens back on the host.

Both run eagerly or both compiled (``--compile``: static shapes, as ``dinokit embed --compile``), after one
untimed pass that pays for compilation and worker start-up. The images are ``--folder``'s, or ``--images``
generated JPEGs of 500x375 px (photo-like sizes, so that decoding costs what it costs on real data).
All models are randomly initialised (no downloads). On a GPU machine, from the repo root:

    PYTHONPATH=src python benchmarks/embed.py --model dinov2_vitl14 --images 4096 --batch 256 --workers 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinokit.data import ImageFiles, make_classification_eval_transform
from dinokit.data.listing import resolve_image_inputs
from dinokit.devices import resolve_device, resolve_dtype
from dinokit.features import autocast_context, embedding_feature_fn, extract_features, feature_runner, inference_dtype
from dinokit.models import create_model


def write_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """``n`` JPEGs of smooth random colour fields (they compress like photos, unlike white noise)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, size=(size[1] // 25, size[0] // 25, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.BICUBIC)
        paths.append(root / f"{i:06d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def model_only(model, feature_fn, *, n: int, batch: int, size: int, device, dtype, compile_backend) -> float:
    """Images/s of the feature function alone on ``n`` images' worth of on-device batches."""
    run = feature_runner(feature_fn, model, batch, compile_backend)
    x = torch.randn(batch, 3, size, size, device=device)
    steps = max(1, n // batch)
    with autocast_context(device, dtype):
        run(x)  # warm-up (and compilation)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = run(x)
        _sync(device)
    assert out["cls"].shape[0] == batch
    return steps * batch / (time.perf_counter() - start)


def end_to_end(model, feature_fn, paths, *, batch: int, size: int, workers: int, device, dtype,
               compile_backend) -> float:
    """Images/s of ``extract_features`` over the files (the second of two passes: the first compiles)."""
    dataset = ImageFiles(paths, transform=make_classification_eval_transform(crop_size=size))
    kwargs = dict(feature_fn=feature_fn, batch_size=batch, num_workers=workers, device=device, dtype=dtype,
                  progress=False, distributed=False, compile_backend=compile_backend)
    extract_features(model, ImageFiles(paths[: 2 * batch], transform=dataset.transform), **kwargs)
    result = extract_features(model, dataset, **kwargs)
    assert len(result) == len(paths), "every generated image decodes"
    return len(result) / result.seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dinov2_vitl14", help="hub name (random init)")
    p.add_argument("--folder", help="images to embed (default: --images generated JPEGs)")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="both paths under torch.compile (static shapes)")
    p.add_argument("--tiny", action="store_true", help="a 2-block, 32-wide model of the same family (CPU checks)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    dtype = inference_dtype(device, resolve_dtype(args.dtype, device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    overrides = dict(embed_dim=32, depth=2, num_heads=2, img_size=args.image_size) if args.tiny else {}
    model = create_model(args.model, **overrides).to(device).eval()
    feature_fn = embedding_feature_fn(patch_mean=False, patch_tokens=False)
    backend = "inductor" if args.compile else None
    with tempfile.TemporaryDirectory(prefix="dinokit-embed-bench-") as tmp:
        paths = resolve_image_inputs(args.folder) if args.folder else write_jpegs(Path(tmp), args.images)
        alone = model_only(model, feature_fn, n=len(paths), batch=args.batch, size=args.image_size, device=device,
                           dtype=dtype, compile_backend=backend)
        whole = end_to_end(model, feature_fn, paths, batch=args.batch, size=args.image_size, workers=args.workers,
                           device=device, dtype=dtype, compile_backend=backend)
    result = {"model": args.model, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "compiled": args.compile, "images": len(paths), "batch": args.batch, "workers": args.workers,
              "model_only_images_per_s": round(alone, 1), "end_to_end_images_per_s": round(whole, 1),
              "ratio": round(whole / alone, 3)}
    print(f"{args.model} on {device} ({result['dtype']}{', compiled' if args.compile else ''}): model alone "
          f"{alone:.1f} images/s, dinokit embed end to end {whole:.1f} images/s, ratio {whole / alone:.2f} "
          "(target >= 0.85)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
