"""dinokit data: prepare datasets.

  dinokit data imagenet-extra --root R --extra E
      write the ImageNet metadata files (entries-*.npy, class-ids-*.npy, class-names-*.npy)
      that the dataset string ImageNet:split=TRAIN:root=R:extra=E reads
  dinokit data sample [--out DIR]
      write the built-in sample image set (8 texture classes, train/ and val/)
"""

from __future__ import annotations

import argparse

from ..data.imagenet import dump_imagenet_extra
from ..data.images import find_images
from ..data.sample import default_sample_root, write_sample_dataset


def _imagenet_extra(args: argparse.Namespace) -> int:
    written = dump_imagenet_extra(args.root, args.extra)
    for path in written:
        print(f"wrote {path}")
    print(f"use it with: ImageNet:split=TRAIN:root={args.root}:extra={args.extra}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    root = write_sample_dataset(args.out or default_sample_root())
    for split in ("train", "val"):
        print(f"{len(find_images(root / split))} images in {root / split}")
    print(f"use it with: ImageFolder:root={root / 'train'} (or Sample:split=TRAIN:root={root})")
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
