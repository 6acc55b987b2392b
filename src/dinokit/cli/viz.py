"""``dinokit viz``: pictures of what a backbone's features hold.

  dinokit viz pca INPUT... --out DIR         PCA of patch features as RGB, foreground on black; a video
                                             (file or --video FOLDER of frames) gives an animated GIF/MP4
  dinokit viz attention INPUT... --out DIR   class-token attention per head, their mean, patch norms
  (with one image, --out FILE.png writes that one picture instead of a folder)
  dinokit viz match IMAGE_A IMAGE_B --out FILE.png
                                             patch matches (mutual nearest neighbours or assignment), as lines

INPUT is an image, a folder (searched recursively) or a .txt list of image paths. Images are resized
so that their short side is --image-size pixels and centre-cropped to a multiple of the patch size.
The backbone is a hub name (--model), or a training run's config with its weights (--config-file
RUN/config.yaml --weights RUN/eval/training_N/teacher_checkpoint.pth), or either at --random-init.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from torch import nn

from ..data.listing import resolve_image_inputs
from ..devices import resolve_device, resolve_dtype
from ..engine.run_dir import check_writable
from ..errors import DinokitError
from ..features import check_image_size, inference_dtype
from ..viz.attention import DEFAULT_KEEP_MASS, attention_maps, resolve_block
from ..viz.drawing import (UPSAMPLE_MODES, check_not_an_input, check_one_picture, grid, picture_out, save_png,
                           unique_stems)
from ..viz.figures import attention_figure, matches_figure, pca_figures
from ..viz.match import DEFAULT_MAX_MATCHES, DEFAULT_MIN_SPACING, match_patches
from ..viz.pca import PCA_MODES, pca_rgb, read_foreground_example
from ..viz.prepare import DEFAULT_IMAGE_SIZE
from ..viz.video import ANIMATION_FORMATS, is_video_file, read_frames, require_pyav, write_animation
from . import named
from .embed import _build_model

GRID_FRAMES = 8  # frames of a video shown in pca_grid.png
ATTENTION_CHUNK = 64  # images read, mapped and drawn at a time by 'viz attention'


# ------------------------------------------------------------------------------------------- parsers
def _add_model_options(p: argparse.ArgumentParser, *, batches: bool = True) -> None:
    model = p.add_argument_group("backbone")
    model.add_argument("--model", default=None, help="hub name (default: dinov2_vits14, or the run's config.yaml found "
                       "beside a --weights teacher_checkpoint.pth; see 'dinokit models')")
    model.add_argument("--weights", "--pretrained-weights", help="backbone file or URL (hub layout, teacher_checkpoint.pth, .safetensors, ...)")
    model.add_argument("--config-file", type=named, help="use the backbone of a training config.yaml (or eval preset), not --model")
    model.add_argument("--random-init", action="store_true", help="random weights (a baseline picture)")
    model.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                       help="short side in pixels before the crop to a patch multiple (default: %(default)s)")
    if batches:  # match embeds its two images one at a time
        model.add_argument("--batch-size", type=int, default=8, help="images per forward (default: %(default)s)")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto: cuda if available]")
    model.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                       help="compute precision (default: bf16 autocast on CUDA, fp32 on CPU)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "viz", help="pictures of the features: PCA colours, attention maps, patch matches",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="viz_command", metavar="ACTION")
    actions.required = True

    pca = actions.add_parser("pca", help="PCA of patch features as RGB (images, frame folders, videos)",
                             description="One PCA over the patch features of all inputs, mapped to RGB.")
    pca.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders, .txt lists, or one video")
    pca.add_argument("--out", required=True, help="output folder, or a .png file for one image "
                     "(pictures of the same name are replaced)")
    pca.add_argument("--mode", choices=PCA_MODES, default="paper",
                     help="paper: foreground from the 1st component, 2nd PCA on it (default); plain: one PCA, "
                     "no foreground; dinov3: whitened PCA, sigmoid(2x) colours")
    pca.add_argument("--threshold", type=float, default=None,
                     help="foreground: first-component projection above this (default: 0, the mean)")
    pca.add_argument("--fg-examples", nargs="+", default=(), metavar="SPEC",
                     help="images with an alpha channel, or IMAGE=MASK pairs, to train a foreground classifier")
    pca.add_argument("--upsample", choices=UPSAMPLE_MODES, default="nearest", help="default: %(default)s")
    pca.add_argument("--columns", type=int, default=4, help="images per row of pca_grid.png (default: %(default)s)")
    video = pca.add_argument_group("video")
    video.add_argument("--video", action="store_true", help="treat the INPUT folder as the frames of one video")
    # None when not given: given for still images, one line (they did nothing); the defaults are VIDEO_DEFAULTS
    video.add_argument("--frame-step", type=int, default=None, help="use every N-th frame (default: 1)")
    video.add_argument("--max-frames", type=int, default=None, help="at most this many frames (default: 300)")
    video.add_argument("--fps", type=float, default=None, help="frames per second of the output (default: 10)")
    video.add_argument("--format", choices=ANIMATION_FORMATS, default=None,
                       help="animation file: gif (Pillow) or mp4 (needs PyAV) (default: gif)")
    _add_model_options(pca)
    pca.set_defaults(func=run_pca)

    att = actions.add_parser("attention", help="class-token attention per head, and patch-norm maps",
                             description="The class token's attention to the patches for every head of one "
                             "block (registers excluded), their mean, and the patch-token norm map.")
    att.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders or .txt lists")
    att.add_argument("--out", required=True, help="output folder, or a .png file for one image "
                     "(pictures of the same name are replaced)")
    att.add_argument("--block", type=int, default=-1, help="block index, negative from the end (default: last)")
    att.add_argument("--keep-mass", type=float, nargs="?", const=DEFAULT_KEEP_MASS, default=None, metavar="FRACTION",
                     help="also draw DINO's masks: the patches that hold this fraction of the attention "
                     f"(default {DEFAULT_KEEP_MASS})")
    att.add_argument("--upsample", choices=UPSAMPLE_MODES, default="nearest", help="default: %(default)s")
    _add_model_options(att)
    att.set_defaults(func=run_attention)

    match = actions.add_parser("match", help="patch correspondences between two images",
                               description="Mutual nearest neighbours between the foreground patches of two "
                               "images; the strongest drawn as lines between them.")
    match.add_argument("image_a", help="first image")
    match.add_argument("image_b", help="second image")
    match.add_argument("--out", required=True, help="output .png file (replaced if it exists)")
    match.add_argument("--max-matches", type=int, default=DEFAULT_MAX_MATCHES, help="default: %(default)s")
    match.add_argument("--min-spacing", type=int, default=DEFAULT_MIN_SPACING,
                       help="kept matches start at least this many patches apart in image A (default: %(default)s)")
    match.add_argument("--all-patches", action="store_true", help="match all patches, not only the foreground")
    match.add_argument("--threshold", type=float, default=None, help="foreground threshold, as for pca [0]")
    match.add_argument("--method", choices=("mutual", "assignment"), default="mutual",
                       help="mutual nearest neighbours, or the paper's assignment problem (needs SciPy) [mutual]")
    _add_model_options(match, batches=False)
    match.set_defaults(func=run_match)


# ------------------------------------------------------------------------------------------- shared
def _setup(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """The backbone and the keyword arguments of the viz functions."""
    for name in ("image_size", "batch_size"):
        if getattr(args, name, 1) < 1:
            raise DinokitError(f"--{name.replace('_', '-')} must be at least 1")
    device = resolve_device(args.device)
    model, description = _build_model(args, device)
    check_image_size(args.image_size, model)
    print(f"backbone: {description}")
    options = {"image_size": args.image_size, "batch_size": getattr(args, "batch_size", 1), "device": device,
               "dtype": inference_dtype(device, resolve_dtype(args.dtype, device))}
    return model, options


def _image_paths(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        if is_video_file(item) and not item.lower().endswith(".gif"):  # an animated GIF: its first frame, as in folders
            raise DinokitError(f"{item!r} is a video; give it alone to 'dinokit viz pca' (one video at a time)")
        paths.extend(resolve_image_inputs(item))
    return paths


def _out_dir(out: str) -> Path:
    path = Path(out).expanduser()
    if path.is_file():
        raise DinokitError(f"--out {out!r} is a file; give a folder")
    check_writable(out, "--out")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------- pca
def _check_pca_flags(args: argparse.Namespace, video: bool) -> None:
    """A flag that cannot act in this run is one line (each was accepted and did nothing); then the video flags'
    defaults are filled in."""
    given = {flag: getattr(args, key) for flag, key in (("--fps", "fps"), ("--format", "format"),
                                                        ("--max-frames", "max_frames"), ("--frame-step", "frame_step"))}
    if not video and (still := [flag for flag, value in given.items() if value is not None]):
        raise DinokitError(f"{still[0]} is for a video (a video file, or --video with a folder of frames); drop it "
                           "for images")
    if args.mode == "plain" and (args.threshold is not None or args.fg_examples):
        flag = "--threshold" if args.threshold is not None else "--fg-examples"
        raise DinokitError(f"{flag} chooses the foreground, which --mode plain does not use; use --mode paper or "
                           f"dinov3, or drop {flag}")
    if args.fg_examples and args.threshold is not None:
        raise DinokitError("--fg-examples and --threshold both choose the foreground (a classifier, or the first "
                           "component's threshold); give one")
    for key, value in VIDEO_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.threshold = 0.0 if args.threshold is None else args.threshold


VIDEO_DEFAULTS = {"fps": 10.0, "format": "gif", "max_frames": 300, "frame_step": 1}


def run_pca(args: argparse.Namespace) -> int:
    video_file = len(args.inputs) == 1 and is_video_file(args.inputs[0])
    if args.video and (len(args.inputs) != 1 or not Path(args.inputs[0]).is_dir()):
        raise DinokitError("--video takes one folder of frames (or give a video file without --video)")
    _check_pca_flags(args, video_file or args.video)
    if args.columns < 1 or args.fps <= 0 or args.max_frames < 1:
        raise DinokitError("--columns, --fps and --max-frames must be positive")
    if (video_file or args.video) and args.format == "mp4":
        require_pyav("writing MP4")  # a missing optional package: one line before any work
    one_picture = picture_out(args.out)  # before the frames are read
    if video_file or args.video:
        check_one_picture(one_picture, args.out, "a video's frames")
    for spec in args.fg_examples:  # a missing file or one without alpha: one line before the model is built
        read_foreground_example(spec)
    inputs = (read_frames(args.inputs[0], step=args.frame_step, max_frames=args.max_frames)
              if video_file or args.video else _image_paths(args.inputs))
    if len(inputs) != 1:
        check_one_picture(one_picture, args.out, f"{len(inputs)} images")
    if not (video_file or args.video):
        check_not_an_input(one_picture, inputs, args.out)
    model, options = _setup(args)
    # one image alone: its error line only (a warning that it is skipped said the same first)
    picture = pca_rgb(model, inputs, mode=args.mode, threshold=args.threshold,
                      foreground_examples=args.fg_examples, skip_unreadable=len(inputs) > 1, **options)
    panels = pca_figures(picture, upsample_mode=args.upsample)
    fg = float(np.mean(np.concatenate([f.reshape(-1) for f in picture.foreground])))
    if one_picture is not None:
        save_png(panels[0], one_picture)
        print(f"PCA ({args.mode}) of 1 image: foreground {100 * fg:.0f}% of the patches")
        print(f"wrote {one_picture}")
        return 0
    out = _out_dir(args.out)  # only now: unreadable inputs or too few foreground patches leave no empty folder
    written = []
    if video_file or args.video:
        written.append(write_animation(panels, out / f"pca.{args.format}", fps=args.fps))
        shown = [panels[i] for i in np.linspace(0, len(panels) - 1, min(GRID_FRAMES, len(panels))).round().astype(int)]
    else:
        for name, panel in zip(unique_stems([image.source or image.name for image in picture.images]), panels):
            written.append(save_png(panel, out / f"{name}_pca.png"))
        shown = panels
    written.append(save_png(grid(shown, args.columns), out / "pca_grid.png"))
    what = "frame(s)" if video_file or args.video else "image(s)"
    print(f"PCA ({args.mode}) of {len(panels)} {what}: foreground {100 * fg:.0f}% of the patches")
    print(f"wrote {len(written)} file(s) to {out}: " + ", ".join(p.name for p in written[:4])
          + (" ..." if len(written) > 4 else ""))
    return 0


# ------------------------------------------------------------------------------------------- attention
def run_attention(args: argparse.Namespace) -> int:
    if args.keep_mass is not None and not 0 < args.keep_mass <= 1:
        raise DinokitError("--keep-mass must be a fraction in (0, 1], e.g. 0.6")
    one_picture = picture_out(args.out)  # before the images are looked for
    paths = _image_paths(args.inputs)
    if len(paths) != 1:
        check_one_picture(one_picture, args.out, f"{len(paths)} images")
    check_not_an_input(one_picture, paths, args.out)
    model, options = _setup(args)
    resolve_block(model, args.block)  # out of range: one line before any image is read
    stems: dict[str, list[str]] = {}  # a path given twice has two stems, taken in order
    for path, stem in zip(paths, unique_stems(paths)):
        stems.setdefault(str(path), []).append(stem)
    names, out, heads, unreadable = [], None, 0, None
    # A chunk of images at a time, its pictures written before the next is read: memory stays bounded, and a stop
    # keeps the pictures done (every map is its image's own, unlike PCA's, which is fitted on all images at once).
    for start in range(0, len(paths), ATTENTION_CHUNK):
        try:
            maps = attention_maps(model, paths[start:start + ATTENTION_CHUNK], block=args.block,
                                  skip_unreadable=len(paths) > 1, **options)
        except DinokitError as err:
            if not isinstance(err.__cause__, (OSError, ValueError)):
                raise
            unreadable = unreadable or err  # a chunk of unreadable images only (each named): the others go on
            continue
        out = out or one_picture or _out_dir(args.out)  # only now: all-unreadable inputs leave no empty folder
        for image, attention, norms in zip(maps.images, maps.attention, maps.patch_norms):
            names.append(stems[image.source].pop(0))
            figure = attention_figure(image.pixels, attention, norms, keep_mass=args.keep_mass,
                                      upsample_mode=args.upsample)
            save_png(figure, one_picture or out / f"{names[-1]}_attention.png")
            heads = attention.shape[0]
    if not names:
        raise unreadable
    block = args.block if args.block >= 0 else len(model.blocks) + args.block
    print(f"attention of block {block} ({heads} heads, {model.num_register_tokens} registers excluded) "
          f"for {len(names)} image(s)")
    if one_picture is not None:
        print(f"wrote {one_picture}")
    else:
        print(f"wrote {len(names)} file(s) to {out}: " + ", ".join(f"{n}_attention.png" for n in names[:4])
              + (" ..." if len(names) > 4 else ""))
    return 0


# ------------------------------------------------------------------------------------------- match
def run_match(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".png":
        raise DinokitError(f"--out {args.out!r} must be a .png file")
    check_writable(args.out, "--out", is_file=True)
    if args.max_matches < 1:
        raise DinokitError("--max-matches must be at least 1")
    if args.all_patches and args.threshold is not None:  # accepted, and it did nothing
        raise DinokitError("--threshold chooses the foreground patches, and --all-patches matches all of them; give "
                           "one")
    images = _image_paths([args.image_a]) + _image_paths([args.image_b])
    if len(images) != 2:
        raise DinokitError("give two images (not folders or lists) to match")
    check_not_an_input(out, images, args.out)
    model, options = _setup(args)
    options.pop("batch_size")  # one image at a time
    matches = match_patches(model, images[0], images[1], foreground=not args.all_patches,
                            threshold=args.threshold or 0.0, max_matches=args.max_matches,
                            min_spacing=args.min_spacing, method=args.method, **options)
    save_png(matches_figure(matches, model.patch_size), out)
    median = float(np.median(matches.distance)) if len(matches.distance) else float("nan")
    kind = "mutual-nearest-neighbour" if args.method == "mutual" else "assignment"
    print(f"{len(matches.distance)} {kind} matches (median feature distance {median:.3f})")
    print(f"wrote {out}")
    return 0
