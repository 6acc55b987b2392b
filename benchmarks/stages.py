"""Later pretraining stages at demo scale, on a CPU: continued pretraining, a high-resolution stage, Gram anchoring.

    python benchmarks/stages.py --out runs/stages            # about 25 min on 2 CPU cores

1. base: the demo recipe on the built-in sample set (grey textures) for --base-iters iterations.
2. continued: the base teacher's backbone continued on a *different* folder (eight new texture families, drawn
   here) with fresh heads, with the head warm-up (backbone frozen, then at a lower lr) and without it.
   k-NN top-1 is reported on both the original and the new validation images, before and after.
3. high-res: the base run continued at 96-px instead of 64-px global crops (student.resume_from_teacher_chkpt,
   position embeddings interpolated, schedules restarted, lower lr); k-NN at 96 px before and after; the same
   stage at 64 px (control) and with DINOv3's mixed resolutions (each iteration at 64 or 96 px, half and half).
   ``--highres-only`` runs steps 1 and 3 alone (about 10 minutes of one core).
4. Gram: the base run continued on the sample set with and without Gram anchoring to the base teacher (same
   budget); patch-level quality = mIoU of the official patch-only linear segmentation head on the generated
   dense set (dinokit dense train ... class_token=false), patch k-NN (below), and k-NN as a check of the
   image level.

    python benchmarks/stages.py --out runs/gram_probe --gram-base runs/demo/train-v4/eval/training_399/teacher_checkpoint.pth \
        --gram-strong runs/demo/train-v4/eval/training_799/teacher_checkpoint.pth   # after make demo; ~45 min, one core

    python benchmarks/stages.py --out runs/gram_long --gram-long        # about 75 minutes of one core

runs 3200 iterations of the demo recipe (schedules stretched) without and with Gram anchoring (the EMA teacher of
iteration 400, refreshed every 800 iterations, weight 2), patch k-NN and image k-NN of both teachers every 400.

The --gram-base form runs only a Gram probe from an existing run's snapshots (the demo's, trained on the same sample set): (a) the
base snapshot continued for 400 iterations with the iBOT loss off, a setting meant to let patch features drift,
without and with Gram anchoring to the base; (b) a new run from scratch for 200 iterations, without and with
Gram anchoring (weight 2 and 10, and weight 2 with the Gram teacher on 128-px crops: crops.gram_teacher_crops_size) to
the stronger (later) snapshot, for two training seeds. Patch-level quality is patch k-NN:
the texture of single patches of texture-on-texture mosaics, found by their nearest patches (cosine).
Prints one JSON object per measurement and a Markdown summary; every run writes into --out (rerun resumes).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinokit.cli.train import pretrain
from dinokit.config import backbone_from_config, backbone_img_size, load_config
from dinokit.data import write_sample_dataset
from dinokit.data.transforms import make_normalize_transform
from dinokit.dense.generated import render_mosaic
from dinokit.eval.knn import knn_classify, run_knn_eval
from dinokit.models import load_backbone_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_sets import NEW_FAMILIES, render_family  # noqa: E402  (the texture families: one implementation)


def write_new_families(root: Path, counts: dict[str, int], size: int = 96) -> Path:
    """ImageFolder train/val sets of the new families, rendered like the sample set (grey tones, noise, blur)."""
    if (root / ".complete").exists():
        return root
    for split, count in counts.items():
        for index, kind in enumerate(NEW_FAMILIES):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = render_family(kind, np.random.default_rng([7, len(split), index, i]), size)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                (folder / f"{kind}_{i:04d}.png").write_bytes(buffer.getvalue())
    (root / ".complete").touch()
    return root


def load_backbone(cfg, weights: Path | None) -> torch.nn.Module:
    """The run's backbone at its own crop size, in eval mode: a snapshot's weights, or random init (seed 0)."""
    torch.manual_seed(0)
    backbone = backbone_from_config(cfg.student, img_size=backbone_img_size(cfg.crops))
    if weights is not None:
        load_backbone_weights(backbone, weights)
    return backbone.eval()


def knn(run_or_cfg, weights: Path | None, train: str, val: str, image_size: int) -> float:
    """k-NN top-1 (k=10) of a snapshot (or of the random-init network when weights is None)."""
    cfg = load_config(str(run_or_cfg)) if not hasattr(run_or_cfg, "student") else run_or_cfg
    metrics = run_knn_eval(load_backbone(cfg, weights), train_dataset_str=train, val_dataset_str=val, device=torch.device("cpu"),
                           image_size=image_size, ks=(10,), temperature=0.07)
    return round(float(metrics["knn_top1_k10"]), 2)


def last_snapshot(run: Path) -> Path:
    from dinokit.engine import newest_snapshot

    return newest_snapshot(run)


def seg_miou(snapshot: Path, dense_root: Path, out: Path) -> float:
    """mIoU of the official patch-only linear head (last block) trained on the generated segmentation set."""
    if not (out / "results_eval_segmentation.json").exists():
        subprocess.run([sys.executable, "-m", "dinokit", "dense", "train", "--task", "seg", "--head", "linear",
                        "--pretrained-weights", str(snapshot), "--device", "cpu", "--no-progress",
                        "--train-dataset", f"SegSample:split=train:root={dense_root}",
                        "--val-dataset", f"SegSample:split=val:root={dense_root}", "--output-dir", str(out),
                        "iterations=400", "batch_size=16", "lr=3e-2", "dropout=0", "class_token=false",
                        # cached features of whole 64-px images (no augmentation), as tests/test_dense_cli.py
                        "augment=false", "crop_size=64", "eval_size=0", "eval_mode=whole", "eval_period=0",
                        "num_workers=0", "warmup_iters=10", "checkpoint_period=1000", "log_freq=50"],
                       check=True, stdout=subprocess.DEVNULL)
    return round(float(json.loads((out / "results_eval_segmentation.json").read_text())["mIoU"]), 2)


def texture_mosaics(n: int, seed: int, size: int = 64, patch: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images of one sample texture inside an ellipse and another outside (eval-normalised (n, 3, S, S)),
    the texture (1-8) of each patch (n, P) and whether the patch lies wholly in one region (n, P)."""
    rng = np.random.default_rng([11, seed])
    images, masks = zip(*(render_mosaic(rng, size, textured_background=True) for _ in range(n)))
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    g = size // patch
    pixels = torch.from_numpy(np.stack(masks)).long().view(n, g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(n, g * g, -1)
    return make_normalize_transform()(x), pixels[..., 0], (pixels == pixels[..., :1]).all(-1)


@torch.no_grad()
def patch_knn(snapshot: Path | None, cfg, seeds: tuple[int, ...] = (1, 2, 3), counts: tuple[int, int] = (400, 200)) -> float:
    """Patch-level quality: texture k-NN of single patches (k=20, T=0.07, as dinokit eval knn) on
    texture-on-texture mosaics; the pure patches of ``counts`` = (train, val) images, mean over ``seeds``
    (one draw of images each). Only texture tells a patch's region apart here, and the
    neighbours are found by cosine similarity, which is what Gram anchoring constrains."""
    backbone = load_backbone(cfg, snapshot)
    scores = []
    for seed in seeds:
        sets = [texture_mosaics(count, 2 * seed + i, cfg.crops.global_crops_size, cfg.student.patch_size)
                for i, count in enumerate(counts)]
        feats = [torch.cat([F.normalize(backbone.forward_features(x[j:j + 100])["x_norm_patchtokens"], dim=-1)
                            for j in range(0, len(x), 100)]) for x, _, _ in sets]
        train, val = [(f[m], y[m]) for f, (_, y, m) in zip(feats, sets)]  # pure patches only
        scores.append(knn_classify(*train, *val, num_classes=9, ks=(20,), temperature=0.07)[20][0])
    return round(float(np.mean(scores)), 2)


def gram_probe(out: Path, base: Path, strong: Path, train: str, val: str, only: list[str] | None = None) -> dict:
    """The runs of the Gram probe (module docstring); patch k-NN and image k-NN of every teacher. ``only``: just
    these runs (without the reference measurements of random init, base and strong)."""
    epoch = 50
    common = ["train.num_workers=1", "evaluation.knn_dataset=null", f"train.OFFICIAL_EPOCH_LENGTH={epoch}",
              f"train.dataset_path={train}", "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1"]
    gram = ["gram.use_loss=true", "gram.rep_update=false", "gram.img_level=true"]
    runs = {  # name: (iterations, overrides)
        "ibot_off": (400, [f"student.resume_from_teacher_chkpt={base}", "optim.freeze_last_layer_epochs=0",
                           "ibot.loss_weight=0"]),
        "scratch_s0": (200, []),
        "scratch_s1": (200, ["train.seed=1"]),
    }
    runs["ibot_off_gram"] = (400, runs["ibot_off"][1] + gram + [f"gram.ckpt={base}", "gram.loss_weight=1.0"])
    for seed in (0, 1):
        for weight in (2, 10):  # DINOv3's ViT-7B used 2; 10: does a stronger pull move patch quality further?
            runs[f"scratch_s{seed}_gram{weight}"] = (200, runs[f"scratch_s{seed}"][1] + gram
                                                     + [f"gram.ckpt={strong}", f"gram.loss_weight={weight}"])
        # the high-resolution Gram teacher (DINOv3's L_HRef): the same anchor, seeing the crops at 2x (128 px)
        runs[f"scratch_s{seed}_gram2_hr"] = (200, runs[f"scratch_s{seed}_gram2"][1]
                                             + ["crops.gram_teacher_crops_size=128"])
    unknown = sorted(set(only or ()) - set(runs))
    if unknown:
        raise SystemExit(f"unknown Gram probe runs {unknown}; the runs are {sorted(runs)}")
    results = {}
    if not only:
        demo = load_config("demo")
        results["random"] = {"patch_knn": patch_knn(None, demo), "knn": knn(demo, None, train, val, 64)}
        for name, snap in (("base", base), ("strong", strong)):
            cfg = load_config(str(snap.parents[2] / "config.yaml"))
            results[name] = {"patch_knn": patch_knn(snap, cfg), "knn": knn(cfg, snap, train, val, 64)}
    for name, (iters, extra) in runs.items():
        if only and name not in only:
            continue
        cfg = load_config("demo", [*common, f"optim.epochs={iters // epoch}",
                                   f"evaluation.eval_period_iterations={iters}", *extra])
        pretrain(cfg, output_dir=out / name, device="cpu")
        snap = last_snapshot(out / name)
        results[name] = {"patch_knn": patch_knn(snap, cfg), "knn": knn(cfg, snap, train, val, 64)}
        print(json.dumps({name: results[name]}), flush=True)
    return results


def gram_long_run(out: Path, train: str, val: str, iterations: int = 3200, every: int = 400) -> dict:
    """A long demo-recipe run (schedules stretched to ``iterations``) without and with Gram anchoring, patch k-NN
    and image k-NN of the teacher every ``every`` iterations. With Gram: the EMA teacher of iteration ``every`` is
    copied in as the Gram teacher and refreshed every ``2 * every`` iterations (DINOv3's scheme, scaled down),
    image level, weight 2."""
    epoch = 50
    common = ["train.num_workers=1", "evaluation.knn_dataset=null", f"train.OFFICIAL_EPOCH_LENGTH={epoch}",
              f"train.dataset_path={train}", f"optim.epochs={iterations // epoch}",
              f"evaluation.eval_period_iterations={every}"]
    gram = ["gram.use_loss=true", "gram.img_level=true", f"gram.it_load_ema_teacher={every - 1}",
            "gram.rep_update=true", f"gram.update_frequency={2 * every}", "gram.loss_weight=2"]
    results: dict[str, dict] = {}
    for name, extra in (("long", []), ("long_gram", gram)):
        cfg = load_config("demo", [*common, *extra])
        pretrain(cfg, output_dir=out / name, device="cpu")
        for snap in sorted((out / name).glob("eval/training_*/teacher_checkpoint.pth"),
                           key=lambda p: int(p.parent.name.split("_")[1])):
            it = int(snap.parent.name.split("_")[1]) + 1
            results.setdefault(name, {})[it] = {"patch_knn": patch_knn(snap, cfg), "knn": knn(cfg, snap, train, val, 64)}
            print(json.dumps({name: {it: results[name][it]}}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/stages"))
    parser.add_argument("--base-iters", type=int, default=400)
    parser.add_argument("--stage-iters", type=int, default=200)
    parser.add_argument("--gram-base", type=Path, help="only the Gram probe, from this teacher snapshot")
    parser.add_argument("--gram-strong", type=Path, help="the Gram probe's stronger snapshot (with --gram-base)")
    parser.add_argument("--gram-runs", nargs="+", metavar="NAME", help="with --gram-base: only these runs of the probe")
    parser.add_argument("--gram-long", action="store_true", help="only the long run without and with Gram anchoring")
    parser.add_argument("--highres-only", action="store_true", help="only the base and the high-resolution stages")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}

    sample = write_sample_dataset(out / "data" / "sample")
    s_train, s_val = f"ImageFolder:root={sample / 'train'}", f"ImageFolder:root={sample / 'val'}"
    if args.gram_long:
        results = gram_long_run(out, s_train, s_val)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        return
    if args.gram_base:
        if args.gram_strong is None:
            parser.error("--gram-base needs --gram-strong (a later snapshot of the same run)")
        results = gram_probe(out, args.gram_base, args.gram_strong, s_train, s_val, only=args.gram_runs)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
        return
    fam = write_new_families(out / "data" / "new", {"train": 80, "val": 20})
    n_train, n_val = f"ImageFolder:root={fam / 'train'}", f"ImageFolder:root={fam / 'val'}"
    epoch = 50
    common = ["train.num_workers=1", "evaluation.knn_dataset=null", f"train.OFFICIAL_EPOCH_LENGTH={epoch}"]

    # 1. base
    base_cfg = load_config("demo", [*common, f"train.dataset_path={s_train}", f"optim.epochs={args.base_iters // epoch}",
                                    f"evaluation.eval_period_iterations={args.base_iters}"])
    pretrain(base_cfg, output_dir=out / "base", device="cpu")
    base = last_snapshot(out / "base")
    results["base"] = {"orig": knn(base_cfg, base, s_train, s_val, 64), "new": knn(base_cfg, base, n_train, n_val, 64),
                       "orig_random": knn(base_cfg, None, s_train, s_val, 64),
                       "new_random": knn(base_cfg, None, n_train, n_val, 64)}
    print(json.dumps({"base": results["base"]}), flush=True)

    # 2. continued pretraining on the new families: fresh heads, with and without the head warm-up
    epochs = args.stage_iters // epoch
    variants = {} if args.highres_only else {
        "continued_warmup": ["train.freeze_backbone_epochs=1", "optim.backbone_lr_mult=0.1"],
        "continued_warmup_full_lr": ["train.freeze_backbone_epochs=1"],
        "continued_no_warmup": [],
    }
    for name, extra in variants.items():
        cfg = load_config("demo", [*common, f"train.dataset_path={n_train}", f"student.pretrained_weights={base}",
                                   f"optim.epochs={epochs}", "optim.warmup_epochs=1",
                                   "teacher.warmup_teacher_temp_epochs=1",
                                   f"evaluation.eval_period_iterations={args.stage_iters}", *extra])
        pretrain(cfg, output_dir=out / name, device="cpu")
        snap = last_snapshot(out / name)
        results[name] = {"orig": knn(cfg, snap, s_train, s_val, 64), "new": knn(cfg, snap, n_train, n_val, 64)}
        print(json.dumps({name: results[name]}), flush=True)

    # 3. high-resolution stage: 64 -> 96 px global crops (32 -> 48 local), lr / 4
    hr_cfg = load_config("demo", [*common, f"train.dataset_path={s_train}", f"student.resume_from_teacher_chkpt={base}",
                                  "crops.global_crops_size=96", "crops.local_crops_size=48", f"optim.epochs={epochs}",
                                  "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1",
                                  "optim.freeze_last_layer_epochs=0", "optim.base_lr=0.005",
                                  f"evaluation.eval_period_iterations={args.stage_iters}"])
    pretrain(hr_cfg, output_dir=out / "highres", device="cpu")
    hr = last_snapshot(out / "highres")
    # control: the same stage at the base resolution (same iterations and lr), evaluated at both sizes
    lr_cfg = load_config(str(out / "highres" / "config.yaml"), ["crops.global_crops_size=64", "crops.local_crops_size=32"])
    pretrain(lr_cfg, output_dir=out / "lowres_control", device="cpu")
    lr = last_snapshot(out / "lowres_control")
    # DINOv3's mixed resolutions: each iteration at 64 / 32 or 96 / 48 px, half and half
    mixed_cfg = load_config(str(out / "highres" / "config.yaml"), [
        "crops.global_crops_size=[64,96]", "crops.local_crops_size=[32,48]", "crops.global_local_crop_pairs_ratios=[1,1]"])
    pretrain(mixed_cfg, output_dir=out / "highres_mixed", device="cpu")
    mixed = last_snapshot(out / "highres_mixed")
    results["highres"] = {"base_at_96": knn(base_cfg, base, s_train, s_val, 96), "base_at_64": results["base"]["orig"],
                          "highres_at_96": knn(hr_cfg, hr, s_train, s_val, 96),
                          "highres_at_64": knn(hr_cfg, hr, s_train, s_val, 64),
                          "control_at_96": knn(lr_cfg, lr, s_train, s_val, 96),
                          "control_at_64": knn(lr_cfg, lr, s_train, s_val, 64),
                          "mixed_at_96": knn(mixed_cfg, mixed, s_train, s_val, 96),
                          "mixed_at_64": knn(mixed_cfg, mixed, s_train, s_val, 64)}
    print(json.dumps({"highres": results["highres"]}), flush=True)
    if args.highres_only:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        return

    # 4. Gram anchoring to the base teacher, same budget, on the sample set
    dense_root = out / "data" / "seg"
    for name, extra in {"gram_off": [], "gram_on": ["gram.use_loss=true", f"gram.ckpt={base}",
                                                    "gram.rep_update=false", "gram.img_level=true",
                                                    "gram.loss_weight=1.0"]}.items():
        cfg = load_config("demo", [*common, f"train.dataset_path={s_train}", f"student.resume_from_teacher_chkpt={base}",
                                   f"optim.epochs={epochs}", "optim.warmup_epochs=1",
                                   "teacher.warmup_teacher_temp_epochs=1", "optim.freeze_last_layer_epochs=0",
                                   f"evaluation.eval_period_iterations={args.stage_iters}", *extra])
        pretrain(cfg, output_dir=out / name, device="cpu")
        snap = last_snapshot(out / name)
        results[name] = {"seg_miou_patch_linear": seg_miou(snap, dense_root, out / f"{name}_seg"),
                         "patch_knn": patch_knn(snap, cfg), "knn": knn(cfg, snap, s_train, s_val, 64)}
        print(json.dumps({name: results[name]}), flush=True)
    results["base"]["seg_miou_patch_linear"] = seg_miou(base, dense_root, out / "base_seg")
    results["base"]["patch_knn"] = patch_knn(base, base_cfg)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
