"""Later pretraining stages at demo scale, on a CPU: continued pretraining, a high-resolution stage, Gram anchoring.

    python benchmarks/stages.py --out runs/stages            # about 25 min on 2 CPU cores

1. base: the demo recipe on the built-in sample set (grey textures) for --base-iters iterations.
2. continued: the base teacher's backbone continued on a *different* folder (eight new texture families, drawn
   here) with fresh heads, with the head warm-up (backbone frozen, then at a lower lr) and without it.
   k-NN top-1 is reported on both the original and the new validation images, before and after.
3. high-res: the base run continued at 96-px instead of 64-px global crops (student.resume_from_teacher_chkpt,
   position embeddings interpolated, schedules restarted, lower lr); k-NN at 96 px before and after.
4. Gram: the base run continued on the sample set with and without Gram anchoring to the base teacher (same
   budget); patch-level quality = mIoU of the official patch-only linear segmentation head on the generated
   dense set (dinokit dense train ... class_token=false), and k-NN as a check of the image level.
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

from dinokit.cli.train import pretrain
from dinokit.config import backbone_from_config, load_config
from dinokit.data import write_sample_dataset
from dinokit.eval.knn import run_knn_eval
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


def knn(run_or_cfg, weights: Path | None, train: str, val: str, image_size: int) -> float:
    """k-NN top-1 (k=10) of a snapshot (or of the random-init network when weights is None)."""
    cfg = load_config(str(run_or_cfg)) if not hasattr(run_or_cfg, "student") else run_or_cfg
    torch.manual_seed(0)
    backbone = backbone_from_config(cfg.student, img_size=cfg.crops.global_crops_size)  # its own grid
    if weights is not None:
        load_backbone_weights(backbone, weights)
    metrics = run_knn_eval(backbone.eval(), train_dataset_str=train, val_dataset_str=val, device=torch.device("cpu"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/stages"))
    parser.add_argument("--base-iters", type=int, default=400)
    parser.add_argument("--stage-iters", type=int, default=200)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}

    sample = write_sample_dataset(out / "data" / "sample")
    s_train, s_val = f"ImageFolder:root={sample / 'train'}", f"ImageFolder:root={sample / 'val'}"
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
    variants = {
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
    results["highres"] = {"base_at_96": knn(base_cfg, base, s_train, s_val, 96), "base_at_64": results["base"]["orig"],
                          "highres_at_96": knn(hr_cfg, hr, s_train, s_val, 96),
                          "highres_at_64": knn(hr_cfg, hr, s_train, s_val, 64),
                          "control_at_96": knn(lr_cfg, lr, s_train, s_val, 96),
                          "control_at_64": knn(lr_cfg, lr, s_train, s_val, 64)}
    print(json.dumps({"highres": results["highres"]}), flush=True)

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
                         "knn": knn(cfg, snap, s_train, s_val, 64)}
        print(json.dumps({name: results[name]}), flush=True)
    results["base"]["seg_miou_patch_linear"] = seg_miou(base, dense_root, out / "base_seg")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
