"""dinokit data: prepare datasets.

  dinokit data imagenet-extra --root R --extra E
      write the ImageNet metadata files (entries-*.npy, class-ids-*.npy, class-names-*.npy)
      that the dataset string ImageNet:split=TRAIN:root=R:extra=E reads
  dinokit data sample [--out DIR]
      write the built-in sample image set (8 texture classes, train/ and val/)
  dinokit data shard SRC --out DIR --shard-size N [--max-size PX]
      write WebDataset tar shards (DIR/000000.tar, ...) from a folder, a file list or a dataset string;
      read them back with the dataset string WebDataset:urls=DIR/{000000..0000NN}.tar
"""

from __future__ import annotations

import argparse

from ..data.imagenet import dump_imagenet_extra
from ..data.listing import find_images
from ..data.sample import check_sample_root, default_sample_root, write_sample_dataset
from ..data.shard_writer import check_shard_out, shard_pattern, write_shards
from ..errors import DinokitError


def _imagenet_extra(args: argparse.Namespace) -> int:
    written = dump_imagenet_extra(args.root, args.extra)
    for path in written:
        print(f"wrote {path}")
    print(f"use it with: ImageNet:split=TRAIN:root={args.root}:extra={args.extra}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    root = args.out or default_sample_root()
    check_sample_root(root)  # never add the sample classes to someone's image folder
    root = write_sample_dataset(root)
    for split in ("train", "val"):
        print(f"{len(find_images(root / split))} images in {root / split}")
    print(f"use it with: ImageFolder:root={root / 'train'} (or Sample:split=TRAIN:root={root})")
    return 0


def _shard(args: argparse.Namespace) -> int:
    from ..data.datasets import make_dataset

    check_shard_out(args.out, args.src)  # before the source is listed: a wrong --out is told at once
    src = f"FileList:path={args.src}" if args.src.lower().endswith((".txt", ".lst", ".csv")) else args.src
    try:  # keep the labels of a class-per-folder layout or a labelled list, when there are any
        dataset = make_dataset(src, labelled=True)
    except DinokitError:
        dataset = make_dataset(src, labelled=False)
    shards, unreadable, resized = write_shards(dataset, args.out, shard_size=args.shard_size, max_size=args.max_size)
    if unreadable:
        path, reason = unreadable[0]
        print(f"skipped {len(unreadable)} unreadable image(s) (first: {path}: {reason})")
    n_classes = len(dataset.classes)
    labels = f", {n_classes} class{'' if n_classes == 1 else 'es'}" if dataset.classes else ""
    shrunk = f" ({resized} resized to a short side of {args.max_size} px)" if args.max_size is not None else ""
    print(f"wrote {len(dataset) - len(unreadable)} images{labels}{shrunk} into {len(shards)} shard(s) in {args.out}")
    print(f"use it with: WebDataset:urls={shard_pattern(shards)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="prepare datasets (ImageNet metadata, the sample set)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True

    extra = actions.add_parser("imagenet-extra", help="write the ImageNet metadata files (entries, class ids, names)")
    extra.add_argument("--root", required=True, help="ImageNet root holding train/, val/, test/ and labels.txt")
    extra.add_argument("--extra", required=True, help="folder to write the .npy metadata files into")
    extra.set_defaults(func=_imagenet_extra)

    sample = actions.add_parser("sample", help="write the built-in sample image set")
    sample.add_argument("--out", default=None, help=f"output folder (default: {default_sample_root()})")
    sample.set_defaults(func=_sample)

    shard = actions.add_parser("shard", help="write WebDataset tar shards from a folder or a file list")
    shard.add_argument("src", help="image folder (class subfolders become labels), .txt file list, or a dataset string")
    shard.add_argument("--out", required=True, help="output folder for 000000.tar, 000001.tar, ...")
    shard.add_argument("--shard-size", type=int, default=1000, help="images per shard (default: %(default)s)")
    shard.add_argument("--max-size", type=int, default=None, metavar="PX",
                       help="store images whose short side is above PX pixels resized to PX (JPEG stays JPEG at "
                            "quality 95, others become PNG): less to decode in every epoch; the official crops need "
                            "439 to never upsample, the demo preset 144, small 91 (default: the files unchanged)")
    shard.set_defaults(func=_shard)
