"""``dinokit embed``: image embeddings from a DINOv2 backbone, written to .npz, .npy or .parquet.

Examples::

    dinokit embed photos/ --out photos.npz                         # official ViT-S/14 weights
    dinokit embed list.txt --model dinov2_vitb14_reg --patch-mean --out emb.parquet
    dinokit embed photos/ --config-file run/config.yaml \\
        --weights run/eval/training_12499/teacher_checkpoint.pth --out mine.npz

The model is a hub name (see ``dinokit models``) or, with ``--config-file``, the backbone of a
training config (``student.*`` keys, as the evaluations build it). Images get the official
evaluation transform: resize to ``image_size·256/224`` (bicubic), centre crop, ImageNet
normalisation. Unreadable images are skipped and listed in the output. A .parquet's ``path`` column holds
strings, or, when a file name is not UTF-8, every name's bytes (a binary column; ``os.fsdecode`` gives the name).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distributed as du
from ..config import find_run_config
from ..data.datasets import make_dataset
from ..data.images import ImageFiles
from ..data.listing import resolve_image_inputs
from ..data.transforms import make_classification_eval_transform
from ..errors import DinokitError
from ..devices import check_device_name, default_workers, resolve_device, resolve_dtype, usable_workers
from ..eval.setup import DEFAULT_MODEL, setup_eval_model
from ..features import ExtractedFeatures, check_image_size, embedding_feature_fn, extract_features, inference_dtype
from ..distributed.slurm import add_slurm_options, submit_if_asked
from ..engine.run_dir import check_not_replacing, check_writable, main_process_lock, output_lock_file
from ..models.weight_files import check_weights_path
from ..files import atomic_write
from ..models.registry import model_info
from . import named


OUTPUT_FORMATS = (".npz", ".npy", ".parquet")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="compute image embeddings (class token, patch mean, patch tokens)",
        description="Embed images with a DINOv2 backbone: the normalised class token, and optionally the mean "
        "patch token or all patch tokens. Images get the official evaluation transform (resize to "
        "image_size*256/224, centre crop, ImageNet normalisation); unreadable images are skipped and listed.",
        epilog="Output by extension: .npz (cls, patch_mean, patch_tokens, paths, bad_paths), "
        ".npy (cls only; paths in <stem>.paths.txt), .parquet (path, cls, patch_mean; needs pyarrow; path is a "
        "string column, or a binary one of the names' bytes when a file name is not UTF-8). "
        "Bad images are listed in the .npz, in the .parquet's metadata (bad_paths, JSON) or in <stem>.bad.txt.",
    )
    p.add_argument("input", help="a folder (searched recursively), one image, a .txt file listing image paths, "
                   "or WebDataset:urls=SHARDS/{000000..000009}.tar")
    p.add_argument("--out", required=True, help="output file: .npz, .npy or .parquet")
    p.add_argument("--model", default=None, help="hub name (default: dinov2_vits14, or the run's config.yaml found "
                   "beside a --weights teacher_checkpoint.pth; see 'dinokit models')")
    p.add_argument("--weights", "--pretrained-weights", help="backbone file or URL (hub layout, teacher_checkpoint.pth, .safetensors, ...)")
    p.add_argument("--random-init", action="store_true",
                   help="random weights; without it and without --weights, the official weights are downloaded "
                   "once into the torch.hub cache")
    p.add_argument("--config-file", type=named, help="use the backbone of a training config.yaml (or eval preset), not --model")
    p.add_argument("--patch-mean", action="store_true", help="also save the mean of the normalised patch tokens (N, D)")
    p.add_argument("--patch-tokens", action="store_true", help="also save the patch tokens (N, h*w, D); .npz only")
    p.add_argument("--image-size", type=int, default=224, help="centre-crop size in pixels (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=default_workers(),
                   help="image decoding processes, at most the usable CPU cores (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto: cuda if available]")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="compute precision (default: bf16 autocast on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model with static shapes (a short last batch is padded): faster on a GPU "
                   "for large sets once compiled; the first batch waits for the compilation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (without it: one line, "
                   "nothing computed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_slurm_options(p, timeout_min=720)
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------- options
def _check_output(args: argparse.Namespace) -> Path:
    from ..eval.setup import check_backbone_choice

    check_backbone_choice(config_file=args.config_file, model=args.model, random_init=args.random_init,
                          pretrained_weights=args.weights, weights_flag="--weights")  # before a job is submitted
    for name in ("image_size", "batch_size"):
        if getattr(args, name) < 1:
            raise DinokitError(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_workers < 0:
        raise DinokitError(f"--num-workers must be >= 0, got {args.num_workers}")
    out = Path(args.out).expanduser()
    if out.suffix not in OUTPUT_FORMATS:
        raise DinokitError(f"--out {args.out!r} has an unknown extension; use one of {', '.join(OUTPUT_FORMATS)}")
    if out.suffix == ".npy" and (args.patch_mean or args.patch_tokens):
        raise DinokitError("a .npy file holds the class tokens only; use a .npz file for --patch-mean/--patch-tokens")
    if out.suffix == ".parquet":
        if args.patch_tokens:
            raise DinokitError("--patch-tokens is too large for .parquet; use --out FILE.npz")
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise DinokitError("writing .parquet needs pyarrow: pip install 'dinokit[parquet]' (or use .npz)") from None
    if out.is_dir():
        raise DinokitError(f"--out {args.out!r} is a folder; give a file name such as {out / 'embeddings.npz'}")
    check_writable(args.out, "--out", is_file=True)
    _check_not_replacing(args, out)
    return out


def _check_not_replacing(args: argparse.Namespace, out: Path) -> None:
    check_not_replacing(args.out, overwrite=args.overwrite)
    # the lists beside a .npy (written, or deleted when no image is bad) are replaced only when asked too
    for side in [".paths.txt", ".bad.txt"] if out.suffix == ".npy" else []:
        if (listed := out.with_name(out.stem + side)).is_dir():  # it failed after the work, naming a temporary
            raise DinokitError(f"{str(listed)!r} is a folder, where the list beside --out {out.name!r} goes; move "
                               "it, or give another --out")
        if listed.is_file() and not out.exists() and not args.overwrite:
            raise DinokitError(f"{str(listed)!r} already exists, without {out.name!r} (an embed stopped before "
                               "writing it, which comes last, leaves that); pass --overwrite to replace it, or give "
                               "another name")
        check_not_replacing(listed, overwrite=args.overwrite)


def _build_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, str]:
    """The frozen backbone (built as the evaluations build it) and a short description for the summary."""
    if args.weights:
        check_weights_path(args.weights, "--weights")  # a folder or a missing file: one line naming the option
    if args.config_file:
        if not args.weights and not args.random_init:
            raise DinokitError("--config-file needs --weights (e.g. a teacher_checkpoint.pth), or --random-init")
        name = f"{args.config_file} backbone"
    elif args.model is None and args.weights and (found := find_run_config(args.weights)) is not None:
        name = f"{found} backbone"  # a training run's snapshot: its architecture is in the run's config.yaml
    else:
        args.model = args.model or DEFAULT_MODEL
        if model_info(args.model).is_classifier:
            backbone = args.model.removesuffix("_lc")
            raise DinokitError(f"{args.model} is a classifier; embed with its backbone: --model {backbone}")
        name = args.model
    model, _ = setup_eval_model(
        config_file=args.config_file,
        model=args.model,  # None: the run config found beside the weights
        pretrained_weights=args.weights,
        random_init=args.random_init,
        device=device,
    )
    weights = args.weights or ("random init" if args.random_init else "official weights")
    return model, f"{name} ({weights})"


# ------------------------------------------------------------------------------------------- writing
def _write_lines(path: Path, lines: list[str]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines), errors="surrogateescape")  # names as their bytes


def write_embeddings(out: Path, arrays: dict[str, np.ndarray], paths: list[str], bad_paths: list[str]) -> list[Path]:
    """Write ``arrays`` (``cls``, optional ``patch_mean``/``patch_tokens``) in ``out``'s format; returns the files."""
    written = [out]
    if out.suffix == ".npz":
        with atomic_write(out) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays, paths=np.array(paths, dtype=str), bad_paths=np.array(bad_paths, dtype=str))
        return written
    if out.suffix == ".npy":
        # the array is written aside first (the large file: a full disk stops here and keeps an earlier array and its
        # lists, which --overwrite deleted first), then its lists, then it replaces the earlier array: a .npy present
        # has its own paths beside it
        with atomic_write(out) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arrays["cls"])
            listed = False
            try:
                written.append(out.with_name(f"{out.stem}.paths.txt"))
                _write_lines(written[-1], paths)
                listed = True
                bad_file = out.with_name(f"{out.stem}.bad.txt")
                if bad_paths:
                    written.append(bad_file)
                    _write_lines(bad_file, bad_paths)
                elif bad_file.exists():
                    bad_file.unlink()  # left by an earlier run into the same file name
            except BaseException:
                if listed:  # the earlier array no longer matches the lists beside it
                    out.unlink(missing_ok=True)
                raise
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:  # a name that is not UTF-8: the whole column holds the names' bytes (as <stem>.paths.txt does)
            columns = {"path": pa.array(paths, type=pa.string())}
        except UnicodeEncodeError:
            columns = {"path": pa.array([os.fsencode(p) for p in paths], type=pa.binary())}
        for name, array in arrays.items():  # (N, D) -> a fixed_size_list<float32>[D] column: it has no offsets,
            # whose 32 bits a list column's N x D values overflowed past 2^31 (e.g. 1.4M x 1536), after the extraction
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
        table = pa.table(columns).replace_schema_metadata({"bad_paths": json.dumps(bad_paths)})  # names kept exact
        with atomic_write(out) as tmp:
            pq.write_table(table, tmp)
        # its bad images in its metadata: a .npy of the same stem keeps its own <stem>.bad.txt (never touched)
    return written


def _summary(result: ExtractedFeatures, *, model: str, device: torch.device, dtype: str, bad_paths: list[str],
             written: list[Path]) -> str:
    n = len(result)
    rate = n / result.seconds if result.seconds > 0 else float("inf")
    lines = [f"embedded {n} images in {result.seconds:.1f} s ({rate:.1f} images/s) with {model} on {device} ({dtype})"]
    lines.append("  " + "  ".join(f"{k}: {tuple(v.shape)}" for k, v in result.features.items()))
    if bad_paths:  # the warnings above name the files with their reasons: here, where the whole list is
        where = {".npz": f"{written[0]} ('bad_paths')", ".parquet": f"{written[0]} (metadata 'bad_paths', JSON)"}.get(
            written[0].suffix, str(written[-1]))
        lines.append(f"skipped {len(bad_paths)} unreadable image(s), all listed in {where}")
    lines.append("wrote " + ", ".join(str(p) for p in written))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    check_device_name(args.device)
    out = _check_output(args)
    transform = make_classification_eval_transform(crop_size=args.image_size)
    if args.input.startswith("WebDataset:"):  # tar shards (dinokit.data.shards)
        dataset = make_dataset(args.input, transform=transform)
        paths = dataset.paths
    else:
        paths = resolve_image_inputs(args.input)
        dataset = ImageFiles(paths, transform=transform)
    if out.suffix == ".npy" and (odd := next((p for p in map(str, paths) if "\n" in p), None)) is not None:
        raise DinokitError(f"the image name {odd!r} holds a line feed, which {out.stem}.paths.txt cannot list one per "
                           "line (row i of the array is line i); rename it, or write .npz or .parquet")
    if submit_if_asked(args, out.with_name(f"{out.stem}.slurm")):
        return 0
    du.init_from_environment()  # under torchrun each rank embeds a shard (extract_features gathers them)
    # held until the output is written; checked again under it: another run may have written --out meanwhile
    with main_process_lock(output_lock_file(out), out, check=lambda: _check_not_replacing(args, out),
                           temporaries=f".{glob.escape(out.stem)}.*.tmp-*"):  # a killed embed's, beside --out
        return _embed(args, out, dataset, paths)


def _embed(args: argparse.Namespace, out: Path, dataset, paths: list) -> int:
    device = resolve_device(args.device)
    dtype = inference_dtype(device, resolve_dtype(args.dtype, device))  # float32: no autocast; fp16 on CPU: a warning
    model, description = _build_model(args, device)
    check_image_size(args.image_size, model)

    # skipped images: the first few are named with their reasons as they come (dinokit.warning_summary), all of
    # them in the output
    result = extract_features(
        model,
        dataset,
        feature_fn=embedding_feature_fn(patch_mean=args.patch_mean, patch_tokens=args.patch_tokens),
        batch_size=args.batch_size,
        num_workers=usable_workers(args.num_workers, key="--num-workers"),
        device=device,
        dtype=dtype,
        progress=not args.no_progress,
        desc="embed",
        compile_backend="inductor" if args.compile else None,
    )
    bad_paths = [str(paths[i]) for i in result.bad]
    if len(result) == 0:
        raise DinokitError(f"none of the {len(paths)} images could be read (first: {bad_paths[0]}); check the files")

    if not du.is_main_process():  # every rank holds the gathered result: one writes it
        return 0
    arrays = {k: v.numpy() for k, v in result.features.items()}
    ok_paths = [str(paths[i]) for i in result.indices.tolist()]
    written = write_embeddings(out, arrays, ok_paths, bad_paths)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    print(_summary(result, model=description, device=device, dtype=precision, bad_paths=bad_paths, written=written))
    beside = out.with_name(f"{out.stem}.bad.txt")
    if out.suffix == ".parquet" and beside.exists():  # a .npy's list, or an older dinokit's of its parquet output
        print(f"note: {beside} is not this run's list of unreadable images (those are in the .parquet's metadata "
              "'bad_paths'); it was left as it was")
    return 0
