"""``dinokit plot RUN_DIR [--out FILE.png]``: a training run's metrics as one PNG.

Losses, learning rate and weight decay, teacher momentum, k-NN accuracy and the collapse signals
(teacher entropy against log K, prototypes in use, class-token effective rank), against the iteration,
read from RUN_DIR/training_metrics.json. Needs matplotlib (pip install 'dinokit[plot]').
"""

from __future__ import annotations

import argparse

from ..plot import plot_run


def _run(args: argparse.Namespace) -> int:
    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="plot a training run's metrics (losses, lr, momentum, k-NN) as a PNG",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the output folder of dinokit train / distill / dense train")
    p.add_argument("--out", help="output .png (default: RUN_DIR/training_metrics.png)")
    p.set_defaults(func=_run)
