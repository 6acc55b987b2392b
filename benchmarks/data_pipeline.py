"""Multi-crop data pipeline throughput per CPU core: decode + PIL multi-crop vs decode + tensor multi-crop.

Run from the repo root on a folder of real photos (JPEG/PNG of a few hundred pixels):
``PYTHONPATH=src python benchmarks/data_pipeline.py --images DIR``.

Everything runs in one process on one intra-op thread (a data worker's setting), on the same encoded
images held in memory, so decoding is measured too. Throughput is images per CPU-second of this
process (``time.process_time``), i.e. per core, which a busy machine distorts less than wall time.
Rows:

* ``decode``: ``load_image`` only, the floor of any path.
* ``decode + one resize``: plus one bicubic resize of the short side to the global crop size (PIL), the
  budget a worker should stay within when the augmentation runs on the accelerator.
* ``decode + PIL multi-crop``: :class:`DataAugmentationDINO`, the default path.
* ``decode + official composition``: the official ``DataAugmentationDINO``'s transforms as it composes them
  (torchvision's v1 transforms on PIL images, its published parameters and effective blur probabilities),
  rebuilt here for timing: the peer of the PIL path.
* ``decode + crop parameters``: :class:`MultiCropSource`, the worker's share when the pixels are
  augmented on an accelerator (decode, uint8 tensor, parameter draws).
* ``decode + tensor multi-crop on CPU``: the same plus :class:`TensorMultiCrop` on CPU tensors in
  batches, i.e. ``crops.augmentation=tensor`` with the collate in the workers.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from dinokit.data.augmentations import DataAugmentationDINO
from dinokit.data.images import load_image
from dinokit.data.listing import find_images
from dinokit.data.tensor_augment import MultiCropSource, TensorMultiCrop


def cpu_seconds(fn, n_images: int, min_seconds: float) -> float:
    """Images per CPU-second of ``fn(k)`` (which handles images ``k, k+1, ...``), repeated for ``min_seconds``."""
    fn(0)  # warm-up
    done, start = 0, time.process_time()
    while time.process_time() - start < min_seconds:
        done += fn(done)
    return done / (time.process_time() - start)


def official_composition(global_size: int, local_size: int, local_crops: int):
    """The official multi-crop as the official code composes it, from its published parameters (v1 transforms):
    crops of (0.32, 1) and (0.05, 0.32) with bicubic resizing and flips, colour jitter (0.4, 0.4, 0.2, 0.1) with
    p 0.8, grayscale 0.2, a 9-pixel Gaussian blur with the effective probabilities 0 / 0.9 / 0.5 (global 1 /
    global 2 / local), solarize (128, p 0.2) on global 2, then ToTensor and the ImageNet normalisation."""
    from torchvision import transforms as T

    def crop(size: int, scale: tuple[float, float]):
        return [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(p=0.5)]

    colour = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    blur = lambda p: T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)  # noqa: E731
    finish = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    global_1 = T.Compose([*crop(global_size, (0.32, 1.0)), *colour, blur(0.0), *finish])
    global_2 = T.Compose([*crop(global_size, (0.32, 1.0)), *colour, blur(0.9), T.RandomSolarize(128, p=0.2), *finish])
    local = T.Compose([*crop(local_size, (0.05, 0.32)), *colour, blur(0.5), *finish])
    return lambda image: {"global_crops": [global_1(image), global_2(image)],
                          "local_crops": [local(image) for _ in range(local_crops)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder of photos")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="images per tensor multi-crop call")
    parser.add_argument("--seconds", type=float, default=10.0, help="CPU seconds per row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    if not Path(args.images).expanduser().is_dir():
        parser.error(f"--images {args.images!r} is not a folder")
    encoded = [io.BytesIO(path.read_bytes()) for path in find_images(args.images)]
    if not encoded:
        raise SystemExit(f"no images in {args.images}")
    sizes = [load_image(data).size for data in encoded]

    def decode(k: int):
        data = encoded[k % len(encoded)]
        data.seek(0)
        return load_image(data)

    scales = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=args.local_crops)
    pil = DataAugmentationDINO(
        scales["global_crops_scale"], scales["local_crops_scale"], args.local_crops,
        global_crops_size=args.global_size, local_crops_size=args.local_size,
    )
    source = MultiCropSource(scales["global_crops_scale"], scales["local_crops_scale"], args.local_crops)
    multi_crop = TensorMultiCrop(global_crops_size=args.global_size, local_crops_size=args.local_size)

    def one(transform):
        def run(k: int) -> int:
            transform(decode(k))
            return 1

        return run

    def tensor_batch(k: int) -> int:
        samples = [source(decode(k + i)) for i in range(args.batch)]
        multi_crop([s["image"] for s in samples], [s["params"] for s in samples])
        return args.batch

    rows = {
        "decode": one(lambda image: image),
        "decode + one resize": one(
            lambda image: TF.resize(image, args.global_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        ),
        "decode + PIL multi-crop": one(pil),
        "decode + official composition": one(official_composition(args.global_size, args.local_size, args.local_crops)),
        "decode + crop parameters": one(source),
        "decode + tensor multi-crop on CPU": tensor_batch,
    }
    results = {name: cpu_seconds(fn, len(encoded), args.seconds) for name, fn in rows.items()}
    mean_w = sum(w for w, _ in sizes) / len(sizes)
    mean_h = sum(h for _, h in sizes) / len(sizes)
    print(f"{len(encoded)} images, mean {mean_w:.0f}x{mean_h:.0f} px; crops 2x{args.global_size} + "
          f"{args.local_crops}x{args.local_size}; torch {torch.__version__}; {platform.processor() or platform.machine()}")
    base = results["decode + PIL multi-crop"]
    for name, value in results.items():
        print(f"{name:36s} {value:8.1f} images/s per core  ({value / base:.2f}x PIL path)")
    print(json.dumps({name: round(value, 1) for name, value in results.items()}))


if __name__ == "__main__":
    main()
