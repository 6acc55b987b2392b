"""What ``dinokit dense train|eval|predict`` do, as functions (the command only parses arguments).

A trained head is saved as ``OUTPUT_DIR/head.pth`` in the official layout (``{"state_dict":
{"decode_head.*"}}``) with a ``"dinokit"`` entry recording the head kind, its features, classes or depth
range, the backbone it was trained on and the evaluation settings; ``eval`` and ``predict`` rebuild
everything from it (official head files work too, given the backbone).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .. import distributed as du
from ..config.paths import absolute_dataset, absolute_file
from ..errors import DinokitError
from ..engine.run_dir import check_writable
from ..files import atomic_write
from .datasets import make_dense_dataset
from .transforms import DenseEvalTransform
from .heads import FeatureSpec
from .inference import (MS_SCALES, InferenceConfig, check_scorable, evaluate, format_results, head_inference,
                        make_meter, saved_eval_size)
from .loading import head_kind_of, load_head, read_head_file, save_head
from .model import DenseModel, build_head
from .train import (DenseHeadTask, DenseRecipe, beta1_schedule, cache_training_features, lr_schedule, make_batches,
                    recipe_with_overrides, train_transform)

HEAD_CHOICES = {"seg": ("linear", "ms", "linear4"), "depth": ("linear", "linear4", "linear-bn", "dpt")}


def head_kind(task: str, head: str) -> str:
    """``--task/--head`` -> a kind of :func:`build_head` (segmentation "linear4" is the "ms" head's architecture)."""
    if head not in HEAD_CHOICES[task]:
        raise DinokitError(f"--head {head} is not a {task} head; use one of {', '.join(HEAD_CHOICES[task])}")
    if task == "seg":
        return "seg-linear" if head == "linear" else "seg-ms"
    return f"depth-{head}"


def _backbone(source: dict[str, Any], device: torch.device):
    from ..eval.setup import setup_eval_model

    return setup_eval_model(
        config_file=source.get("config_file"), pretrained_weights=source.get("pretrained_weights"),
        model=source.get("model"), random_init=bool(source.get("random_init")), opts=source.get("opts") or (),
        device=device,
    )


def _weights(source: dict[str, Any]) -> str:
    """Which backbone weights a result came from (a path, ``official NAME`` or the random init)."""
    from ..eval.setup import weights_label

    return weights_label(source.get("pretrained_weights"), source.get("model"), bool(source.get("random_init")))


def resumes_saved_run(output_dir: str | Path, resume: bool) -> bool:
    """Whether a run saved in ``output_dir`` (its ``dense_config.json``) would be resumed."""
    return resume and (Path(output_dir).expanduser() / "dense_config.json").is_file()


def _write_json(path: Path, payload: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, default=str))


def results_name(task: str) -> str:
    return "results_eval_segmentation.json" if task == "seg" else "results_eval_depth.json"


# ---------------------------------------------------------------------------------------------- train
# settings that came with a change of the training recipe: a saved run without one was started before it
DENSE_RECIPE_CHANGES = {"recipe.warmup_mode": "the learning-rate schedule of 2026-12-06 (DINOv3's warm-up one-cycle)"}
# settings that may change between two starts of one head-training run (the rest must match)
DENSE_RESUMABLE_CHANGES = ("val_dataset", "recipe.iterations", "recipe.num_workers", "recipe.eval_period",
                           "recipe.checkpoint_period", "recipe.log_freq")


def train_head(
    *,
    task: str,
    head: str,
    backbone_source: dict[str, Any],
    train_dataset: str,
    val_dataset: str,
    output_dir: str | Path,
    overrides: Sequence[str] = (),
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train a head on the frozen backbone, evaluate it on ``val_dataset``, save ``head.pth`` and the results."""
    from ..engine import Engine, EngineConfig, full_state_dict, init_run
    from ..engine.run_dir import open_run_dir
    from ..eval.setup import resolve_device

    kind = head_kind(task, head)
    recipe = recipe_with_overrides(task, head, list(overrides), saved_run=resumes_saved_run(output_dir, resume))
    out = check_writable(output_dir)  # one line before any work (the datasets are listed next)
    device_ = resolve_device(device)
    # saved in dense_config.json and head.pth: the same files from any working directory (dense eval --head)
    backbone_source = {k: absolute_file(v) if k in ("config_file", "pretrained_weights") else v
                       for k, v in backbone_source.items()}
    train_dataset, val_dataset = absolute_dataset(train_dataset), absolute_dataset(val_dataset)
    settings = json.loads(json.dumps(  # plain values, as they read back from dense_config.json
        {"task": task, "head": head, "backbone": {k: v for k, v in backbone_source.items() if v},
         "train_dataset": train_dataset, "val_dataset": val_dataset, "recipe": dataclasses_asdict(recipe)}, default=str))
    # the datasets (a missing folder, a depth set for a seg head) are checked before anything is written too
    train_set = make_dense_dataset(train_dataset)
    train_set.transform = train_transform(recipe, task, fixed_crop=train_set.info.train_crop)  # NYU's box first
    val_set = make_dense_dataset(val_dataset, transform=DenseEvalTransform(recipe.eval_size or None))
    for ds in (train_set, val_set):
        if ds.info.task != task:
            raise DinokitError(f"{ds.name!r} is a {ds.info.task} dataset but --task is {task}")
    du.init_from_environment()  # under torchrun, before the run folder: only rank 0 takes its lock
    reach = train_set.info.depth_range if task == "depth" else 0.0
    if reach > recipe.max_depth and du.is_main_process():  # the head's bins stop there: every farther pixel clamped
        print(f"note: {train_dataset!r} holds depths up to {reach:g} m but the head's max_depth is "
              f"{recipe.max_depth:g}; set max_depth={reach:g}" + (" (KITTI's own settings: max_depth=80 "
              "crop_size=352,704)" if train_set.info.kb_crop else ""))
    # checked before anything is written: a folder of its own, no other run in it, the same settings
    with open_run_dir(out, resume=resume, config=settings, config_file="dense_config.json",
                      allowed_changes=DENSE_RESUMABLE_CHANGES, introduced=DENSE_RECIPE_CHANGES):
        if du.is_main_process():
            _write_json(out / "dense_config.json", settings)
        num_classes = max(train_set.info.num_classes, val_set.info.num_classes)
        init_run(recipe.seed)
        backbone, description = _backbone(backbone_source, device_)
        head_module, spec = build_head(
            kind, embed_dim=backbone.embed_dim, depth=len(backbone.blocks), num_classes=num_classes,
            min_depth=recipe.min_depth, max_depth=recipe.max_depth, dropout=recipe.dropout,
            class_token=recipe.class_token and task == "seg", norm=recipe.norm, **bin_options(recipe),
        )
        _check_batch_norm(head_module, recipe, backbone.patch_size)
        # an evaluation set with nothing to score: one line before the first step (it came at the first evaluation)
        check_scorable(val_set, make_meter(task, val_set, num_classes=num_classes,
                                           depth_range=(recipe.min_depth, recipe.max_depth)))
        backbone_dtype = torch.bfloat16 if device_.type == "cuda" else None
        dense_task = DenseHeadTask(backbone, head_module, spec, recipe, task=task, backbone_dtype=backbone_dtype)
        cached = None
        if not recipe.augment and recipe.cache_features:
            dense_task.to(device_)
            cached = cache_training_features(dense_task, train_set, device_, batch_size=recipe.batch_size, progress=progress)
        inference, final_inference = _inference_config(recipe, head, task)
        meta = {
            "task": task, "head": head, "kind": kind, "spec": {"indices": list(spec.indices), "norm": spec.norm,
                                                                "class_token": spec.class_token},
            "num_classes": num_classes, "classes": list(train_set.classes) if task == "seg" else [],
            "palette": train_set.info.palette, "min_depth": recipe.min_depth, "max_depth": recipe.max_depth,
            **({"bins": {"bins": recipe.bins_strategy, "bin_norm": recipe.norm_strategy}} if kind.startswith("depth-linear")
               else {}),
            "backbone": {k: v for k, v in backbone_source.items() if v}, "backbone_description": description,
            "inference": {"mode": final_inference.mode, "crop": final_inference.crop, "stride": final_inference.stride,
                          "flip": final_inference.flip, "scales": list(final_inference.scales), "eval_size": recipe.eval_size},
            "train_dataset": train_dataset, "recipe": dataclasses_asdict(recipe),
        }
        dense_model = DenseModel(backbone, head_module, spec)  # the same modules, for evaluation

        def eval_hook(iteration: int, snapshots: dict, log) -> None:
            if iteration + 1 < recipe.iterations:
                result = evaluate(dense_model, val_set, inference, progress=False)
                log({"iteration": iteration, **_headline(result, task)})

        engine = Engine(
            dense_task,
            EngineConfig(max_iter=recipe.iterations, checkpoint_period=recipe.checkpoint_period,
                         snapshot_period=recipe.eval_period, log_freq=recipe.log_freq, clip_grad=recipe.clip_grad,
                         betas=tuple(recipe.betas), progress=progress),
            output_dir=out, device=device_, schedules=schedules(recipe), hooks=[eval_hook],
        )
        if du.is_main_process():
            print(recipe_line(recipe, head, task, len(train_set)))
        start = engine.restore(resume=resume)
        rank = du.get_rank()  # each rank draws its own batches (seeded by rank), as a sharded sampler would
        engine.run(lambda start_iter: make_batches(cached, train_set, recipe, start_iter, rank=rank), start_iter=start)
        result = evaluate(dense_model, val_set, final_inference, progress=progress)
        result.update(dataset=val_dataset, train_dataset=train_dataset, weights=_weights(backbone_source))
        head_state = full_state_dict(head_module)  # whole tensors where FSDP2 shards the head (every rank)
        if du.is_main_process():
            save_head(head_state, out / "head.pth", meta)
            _write_json(out / results_name(task), result)
            print(f"{task} head '{head}' on {val_dataset}:\n{format_results(result, task)}")
            print(f"head saved to {out / 'head.pth'}; results in {out / results_name(task)}")
        return result


def _check_batch_norm(head: torch.nn.Module, recipe: DenseRecipe, patch_size: int) -> None:
    """One line when a head's BatchNorm would see one value per channel (a batch of 1 crop of 1 patch): torch's
    training-mode BatchNorm stops there with a traceback at the first step."""
    patches = (recipe.crop_size[0] // patch_size) * (recipe.crop_size[1] // patch_size)
    if recipe.batch_size * patches < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                               for m in head.modules()):
        raise DinokitError(f"batch_size={recipe.batch_size} crops of {recipe.crop_size[0]}x{recipe.crop_size[1]} px "
                           f"are {recipe.batch_size * patches} patch(es) of {patch_size} px: the head's BatchNorm needs "
                           "at least 2; raise batch_size or crop_size")


def schedules(recipe: DenseRecipe) -> dict[str, Any]:
    """The engine's per-iteration schedules: lr, wd, and Adam's beta1 with ``cycle_beta1``."""
    out: dict[str, Any] = {"lr": lr_schedule(recipe), "wd": [recipe.weight_decay] * recipe.iterations}
    if recipe.cycle_beta1:
        out["beta1"] = beta1_schedule(recipe)
    return out


def bin_options(recipe: DenseRecipe) -> dict[str, Any]:
    """:func:`build_head`'s bin arguments from the recipe (used by the linear depth heads only)."""
    return {"n_bins": recipe.n_bins, "bins": recipe.bins_strategy, "bin_norm": recipe.norm_strategy}


def dataclasses_asdict(recipe: DenseRecipe) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(recipe).items()}


def _headline(result: dict, task: str) -> dict:
    if task == "seg":
        return {"val_mIoU": result["mIoU"], "val_aAcc": result["aAcc"]}
    return {"val_rmse": result["rmse"], "val_abs_rel": result["abs_rel"], "val_delta1": result["delta1"]}


def recipe_line(recipe: DenseRecipe, head: str, task: str, n_images: int) -> str:
    """One line saying what will be trained (a short ``iterations=`` keeps the recipe's warm-up fraction)."""
    crops = "x".join(map(str, recipe.crop_size)) + (" crops" if recipe.augment else " resized images, features cached")
    evals = f"validation every {recipe.eval_period}" if 0 < recipe.eval_period < recipe.iterations else "validation at the end"
    world = du.get_world_size()
    batch = f"{recipe.batch_size}" + (f" per process ({recipe.batch_size * world} in all)" if world > 1 else "")
    return (f"training a {task} head '{head}' on {n_images} images: {recipe.iterations} iterations of batch "
            f"{batch}, {crops}, lr {recipe.lr:g} after {recipe.warmup_iters} warm-up, {evals}")


def _inference_config(recipe: DenseRecipe, head: str, task: str) -> tuple[InferenceConfig, InferenceConfig]:
    """The inference of the validations during training and of the final evaluation (recorded in head.pth).

    Segmentation's "ms" head uses flip and multi-scale TTA in both. Depth validates without TTA and tests with the
    horizontal flip (the mean of the prediction and the mirrored-back prediction of the mirrored image), as the
    official NYU protocols do.
    """
    during = InferenceConfig(
        mode=recipe.eval_mode, crop=recipe.eval_crop, stride=recipe.eval_stride,
        flip=head == "ms", scales=MS_SCALES if head == "ms" else (1.0,),
    )
    return during, dataclasses.replace(during, flip=during.flip or task == "depth")


# ---------------------------------------------------------------------------------------------- loading a trained head
def load_dense_model(
    head_file: str | Path,
    *,
    backbone_source: dict[str, Any] | None = None,
    device: str = "auto",
    depth_range: tuple[float, float] | None = None,
) -> tuple[DenseModel, dict[str, Any]]:
    """A :class:`DenseModel` from a head file (dinokit or official) and a backbone (given, or the one recorded)."""
    from ..eval.setup import resolve_device

    sd, meta = read_head_file(head_file)
    recorded = bool(meta.get("kind"))  # dinokit's file records its head: only the backbone's width can differ
    source = {k: v for k, v in (backbone_source or {}).items() if v} or meta.get("backbone")
    if not source:
        raise DinokitError(f"{str(head_file)!r} does not record its backbone; give --model or --config-file/--pretrained-weights")
    meta = {**meta, "backbone": source}  # the backbone actually used
    device_ = resolve_device(device)
    backbone, _ = _backbone(source, device_)
    dim, depth = backbone.embed_dim, len(backbone.blocks)
    if meta.get("kind"):
        kind = meta["kind"]
    else:  # an official file: the kind and the levels follow from the keys and shapes
        found = head_kind_of(sd)
        if found == "seg":
            kind = "seg-ms" if sd["conv_seg.weight"].shape[1] == 4 * dim else "seg-linear"
        elif found == "linear-depth" and "bn.weight" in sd:
            kind = "depth-linear-bn"
        elif found == "linear-depth":
            kind = "depth-linear4" if sd["conv_depth.weight"].shape[1] == 8 * dim else "depth-linear"
        elif found == "dpt":
            kind = "depth-dpt"
        else:
            raise DinokitError(f"{str(head_file)!r} is not a dense-head file (keys {', '.join(list(sd)[:3])})")
        meta = {**meta, "kind": kind, "task": kind.split("-")[0], "head": kind.split("-", 1)[1]}
    # without dinokit's record: the releases' ranges (DINOv2's linear heads 80 m, its DPT and DINOv3's linear head 10 m)
    official_max = 10.0 if kind in ("depth-dpt", "depth-linear-bn") else 80.0
    low, high = depth_range or (meta.get("min_depth", 0.001), meta.get("max_depth", official_max))
    num_classes = int(sd["conv_seg.weight"].shape[0]) if "conv_seg.weight" in sd else 0
    class_token = bool(meta.get("spec", {}).get("class_token")) and kind.startswith("seg")
    bins = {"n_bins": int(sd["conv_depth.weight"].shape[0])} if "conv_depth.weight" in sd else {}
    bins.update(meta.get("bins") or {})  # bins, bin_norm: as trained (an official file: linear, linear)
    head, spec = build_head(kind, embed_dim=dim, depth=depth, num_classes=num_classes or 1, min_depth=low, max_depth=high,
                            class_token=class_token, **bins)
    if "spec" in meta:
        spec = FeatureSpec(tuple(meta["spec"]["indices"]), bool(meta["spec"]["norm"]), bool(meta["spec"]["class_token"]))
    load_head(head, {"state_dict": {f"decode_head.{k}": v for k, v in sd.items()}}, source=repr(str(head_file)),
              levels_known=recorded)
    model = DenseModel(backbone, head.to(device_), spec).eval()
    return model, meta


def eval_head(
    *, head_file: str | Path, val_dataset: str, output_dir: str | Path, backbone_source: dict[str, Any] | None = None,
    device: str = "auto", inference: InferenceConfig | Mapping[str, Any] | None = None, eval_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate a saved head on ``val_dataset``; writes ``results_eval_{segmentation,depth}.json``. ``inference``
    and ``eval_size``: as saved with the head unless given (:func:`head_inference`)."""
    check_writable(output_dir)  # one line before any work
    du.init_from_environment()  # under torchrun the ranks share the images (device: this rank's GPU)
    model, meta = load_dense_model(head_file, backbone_source=backbone_source, device=device)
    inference = head_inference(meta, inference)
    size = eval_size if eval_size is not None else saved_eval_size(meta)
    dataset = make_dense_dataset(val_dataset, transform=DenseEvalTransform(size or None))
    if dataset.info.task != model.task:
        raise DinokitError(f"{val_dataset!r} is a {dataset.info.task} dataset but the head predicts {model.task}")
    result = evaluate(model, dataset, inference, progress=progress, shard=True)
    result.update(dataset=val_dataset, head=str(Path(head_file).resolve()), weights=_weights(meta["backbone"]))
    if du.is_main_process():
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / results_name(model.task), result)
        print(f"{model.task} head {str(head_file)!r} on {val_dataset}:\n{format_results(result, model.task)}")
    return result


# ---------------------------------------------------------------------------------------------- predict
def predict_files(
    images: Sequence[str], *, head_file: str | Path, out_dir: str | Path, backbone_source: dict[str, Any] | None = None,
    device: str = "auto", size: int | None = None, inference: InferenceConfig | Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``OUT/<name>_<seg|depth>.png`` (input | colourised prediction) for every input image (or, for one
    image, to ``out_dir`` itself when it names a .png file); returns the pictures this process wrote (under
    ``torchrun`` each rank draws a share). ``inference`` and ``size``: as saved with the head unless given."""
    from ..data.images import load_image, warn_skipped
    from ..data.listing import resolve_image_inputs
    from ..data.transforms import MAX_ASPECT, short_side_size
    from ..viz.drawing import check_not_an_input, check_one_picture, picture_out, save_png, unique_stems
    from .transforms import image_to_tensor, normalise, resize_pair
    from .inference import colourise_depth, colourise_seg, predict_image, side_by_side

    one_picture = picture_out(out_dir)  # one line before any work
    files = [f for item in images for f in resolve_image_inputs(item)]
    if len(files) != 1:
        check_one_picture(one_picture, out_dir, f"{len(files)} images")
    check_not_an_input(one_picture, files, out_dir)
    du.init_from_environment()  # under torchrun rank r draws pictures r, r + world, ...
    model, meta = load_dense_model(head_file, backbone_source=backbone_source, device=device)
    inference = head_inference(meta, inference)
    size = size if size is not None else saved_eval_size(meta)
    out = Path(out_dir)
    written, skipped = [], 0
    # inputs may share a file stem (a.png, a.jpg; x/a.png, y/a.png): told apart, so that no output overwrites another
    jobs = list(zip(files, unique_stems(files)))
    for path, name in jobs[du.get_rank()::du.get_world_size()]:
        try:
            pil = load_image(path, draft_size=size)
        except (OSError, ValueError) as err:
            warn_skipped(path, err)
            skipped += 1
            continue
        image = image_to_tensor(pil)
        if size:
            image, _ = resize_pair(image, None, short_side_size(*image.shape[-2:], size, max_aspect=MAX_ASPECT))
        pred = predict_image(model, normalise(image), (pil.height, pil.width), inference).cpu().numpy()
        if model.task == "seg":
            picture = colourise_seg(pred.astype(np.int64), meta.get("palette", ""), model.decode_head.num_classes)
        else:
            picture = colourise_depth(pred, model.decode_head.max_depth if meta.get("max_depth") else None)
        if one_picture is None:
            out.mkdir(parents=True, exist_ok=True)  # here: no empty folder where no image could be read
        target = one_picture or out / f"{name}_{model.task}.png"
        save_png(side_by_side(pil, picture), target)  # atomic: an interrupted run leaves no half file
        written.append(target)
    n_written, skipped = (sum(counts) for counts in zip(*du.all_gather_object((len(written), skipped))))
    if not n_written:
        raise DinokitError(f"none of the {len(files)} image(s) could be read (first: {files[0]}); check the files")
    if du.is_main_process():
        print((f"wrote {one_picture}" if one_picture else f"wrote {n_written} picture(s) to {out}")
              + (f"; skipped {skipped} unreadable image(s)" if skipped else ""))
    return written
