"""``dinokit convert``: backbone weights between the official, Hugging Face, timm and mmpretrain layouts.

Examples::

    dinokit convert dinov2_vits14_pretrain.pth hf-vits14/ --to hf          # AutoModel.from_pretrained('hf-vits14')
    dinokit convert hf-vits14/ vits14.pth --to official
    dinokit convert run/eval/training_12499/teacher_checkpoint.pth t.pth --to timm --model vit_small
    dinokit convert vit-small-p14_dinov2-pre_3rdparty.pth vits14.safetensors --to safetensors
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from ..convert.formats import SOURCE_LAYOUTS, TARGETS, convert_checkpoint
from ..engine.run_dir import check_writable, main_process_lock, output_lock_file
from ..errors import DinokitError
from ..files import LOCK_NAME


def _destination(args: argparse.Namespace) -> str:
    """The output path, given as the second positional argument or as ``--out`` (as the other commands take it)."""
    if args.dst and args.out and args.dst != args.out:
        raise DinokitError(f"two outputs given ({args.dst!r} and --out {args.out!r}); give one")
    if not (args.dst or args.out):
        raise DinokitError("no output given: dinokit convert SRC DST --to ... (or --out DST)")
    return args.dst or args.out


def _run(args: argparse.Namespace) -> int:
    args.dst = _destination(args)
    dst = Path(args.dst).expanduser()
    # held while the output is checked and written: two conversions into one output both said they wrote it
    check_writable(dst, "the output", is_file=args.to != "hf")  # a file on the way: one line before the lock
    lock = dst / LOCK_NAME if args.to == "hf" else output_lock_file(dst)
    # once held, a killed conversion's temporary files of this output are deleted (they stayed forever)
    temporaries = ".*.tmp-*" if args.to == "hf" else f".{glob.escape(dst.name)}.tmp-*"
    with main_process_lock(lock, dst, option="output", temporaries=temporaries):
        done = convert_checkpoint(args.src, args.dst, to=args.to, model=args.model, layout=args.source_layout,
                                  overwrite=args.overwrite)
    spec = done["spec"]
    kind = f"embed_dim {spec.embed_dim}, {spec.depth} blocks, {spec.num_heads} heads"
    kind += f", {spec.num_register_tokens} registers" if spec.num_register_tokens else ""
    print(f"read {args.src} ({done['source']} layout; {kind})")
    if args.to == "hf":
        print(f"wrote {done['out']}/config.json and model.safetensors; load with transformers.AutoModel.from_pretrained")
    elif args.to == "timm":
        from ..convert.timm import timm_constructor

        name, out = done.get("timm_model"), str(done["out"])
        read = f"safetensors.torch.load_file({out!r})" if out.endswith(".safetensors") else f"torch.load({out!r})"
        how = f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={out!r}))" if name \
            else f"{timm_constructor(spec)}.load_state_dict({read}, strict=True)"
        print(f"wrote {out}; load with {how}")
    else:
        print(f"wrote {done['out']} (official layout)")
    if "linear_head" in done:
        print(f"wrote {done['linear_head']}: the classifier, as an official linear head (layers=1: class token and "
              "patch mean); load with dinokit.create_model(NAME_lc, layers=1, weights=HEAD, backbone_weights=BACKBONE)")
    if "dropped_classifier" in done:
        print(f"note: the classifier {done['dropped_classifier']} is not part of a Dinov2Model folder and was left out; "
              "convert --to official to keep it as a linear head file")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert backbone weights (official <-> Hugging Face, timm; mmpretrain -> official)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="weights file (any layout dinokit reads) or a Hugging Face model folder")
    p.add_argument("dst", nargs="?", help="output: a folder for --to hf, else a .pth or .safetensors file")
    p.add_argument("--out", help="the output, as the other commands take it (instead of DST)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--to", required=True, choices=TARGETS, help="output layout")
    p.add_argument("--model", help="hub name or architecture (vit_small, ...) for the facts the weights do not hold "
                   "(the number of heads); default: the architecture of the same width and depth")
    p.add_argument("--from", dest="source_layout", choices=SOURCE_LAYOUTS, help="source layout (default: detected)")
    p.set_defaults(func=_run)
