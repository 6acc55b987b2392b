"""``dinokit export onnx``: a backbone as an ONNX graph, verified against PyTorch before it is written.

Examples::

    dinokit export onnx --model dinov2_vits14 --image-size 224 224 --out vits14_224.onnx
    dinokit export onnx --config-file run/config.yaml --weights run/eval/training_12499/teacher_checkpoint.pth \\
        --image-size 224 224 --dynamic --out mine.onnx

Outputs: cls_token (B, D), patch_tokens (B, h*w, D) and, for register models, register_tokens (B, R, D),
all after the final LayerNorm; the input "image" is a normalised (B, 3, H, W) float32 batch. A static export
(default) stores the position embedding for H x W; --dynamic resamples it in the graph for any size.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from ..errors import DinokitError
from ..eval.setup import DEFAULT_MODEL, setup_eval_model
from ..engine.run_dir import check_not_replacing, check_writable, main_process_lock, output_lock_file
from ..export.onnx import DEFAULT_TOLERANCE, check_output, export_onnx
from . import named


def _onnx(args: argparse.Namespace) -> int:
    h, w = args.image_size
    if h < 1 or w < 1:  # before building the model; the patch multiple is checked once its patch size is known
        raise DinokitError(f"--image-size must be positive multiples of the model's patch size, got {h}x{w}")
    if not args.tolerance >= 0:
        raise DinokitError(f"--tolerance is a relative error: it must be >= 0 (default {DEFAULT_TOLERANCE:g}), "
                           f"got {args.tolerance:g}")
    check_output(args.out)  # before building the model
    check_writable(args.out, "--out", is_file=True)  # a folder of that name, a link that loops: before the work
    check_not_replacing(args.out, overwrite=args.overwrite)
    model, description = setup_eval_model(
        config_file=args.config_file, pretrained_weights=args.weights, model=args.model,
        random_init=args.random_init, default_model=None if args.config_file else DEFAULT_MODEL,
    )
    out = Path(args.out).expanduser()
    # held until the graph is written; checked again under it: another export may have written --out meanwhile
    with main_process_lock(output_lock_file(out), out, check=lambda: check_not_replacing(out, overwrite=args.overwrite),
                           temporaries=f".{glob.escape(out.name)}.tmp-*"):
        report = export_onnx(model, out, image_size=tuple(args.image_size), dynamic=args.dynamic,
                             tolerance=args.tolerance)
    kind = "dynamic batch, height and width" if args.dynamic else f"static {args.image_size[0]}x{args.image_size[1]}"
    student = description.get("config", {}).get("student", {})  # a run's config (given, or found by its weights)
    name = description.get("model") or f"{student.get('arch')}/{student.get('patch_size')}"
    print(f"exported {name} ({kind}) to {report.path}")
    for name, error in report.errors.items():
        print(f"  onnxruntime vs PyTorch, {name}: max relative error {error:.2e}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a backbone for deployment (ONNX)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    formats = parser.add_subparsers(dest="export_format", metavar="FORMAT")
    formats.required = True
    p = formats.add_parser("onnx", help="ONNX graph checked with onnxruntime (pip install 'dinokit[onnx]')")
    p.add_argument("--model", default=None, help="hub name (default: dinov2_vits14, or the run's config.yaml found "
                   "beside a --weights teacher_checkpoint.pth)")
    p.add_argument("--config-file", type=named, help="use the backbone of a training config.yaml instead of --model")
    p.add_argument("--weights", "--pretrained-weights", help="backbone file (any layout dinokit loads); default: the official weights of --model")
    p.add_argument("--random-init", action="store_true", help="random weights (no download)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), required=True, help="input size in pixels")
    p.add_argument("--dynamic", action="store_true", help="free batch, height and width (position embedding resampled in the graph)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest accepted max|onnx - torch| / max|torch| (default: %(default)g)")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_onnx)
