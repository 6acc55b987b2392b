"""Every GPU figure of the speed work in one call, most important first, within a time budget.

A GPU session has minutes, not hours: this runs the speed scripts one after the other, each in its own process
(its own compile caches and CUDA memory) with its own time limit, skips what no longer fits in ``--budget-s``,
keeps going when one fails, and writes everything under ``--out``: ``results.jsonl`` (one line per result, with
the step's name), one log per step, and ``summary.txt`` (the table to paste into the README). Steps, in order:

1. ``train_step``: the DINOv2 ViT-L/14 step (2x224 + 8x98 crops, batch 64, bf16), eager, side by side with packed
   crops, chunked heads, compiled loss terms and full/selective activation checkpointing (target >= 280 images/s,
   <= 52 GB);
2. ``train_step_compiled``: the same step with ``train.compile=true`` (and the packed/chunked variants);
3. ``inference_vitl14``: ViT-L/14 at 224 px, dinokit vs timm vs Hugging Face, eager and compiled (target 3,000);
4. ``inference_vits14`` / ``inference_vitg14``: the other targets (25,000 and 800 images/s);
5. ``embed``: ``dinokit embed`` end to end vs the model alone, compiled (target: within 85%);
6. ``train_step_data``: the step fed by decoding + augmentation on the GPU (``crops.augmentation=device``) from
   photo-sized JPEGs, with ``--workers`` data workers;
7. ``train_step_vits14`` / ``train_step_vitb14`` / ``train_step_vitg14``: the other recipes' steps;
8. ``data_pipeline``: images per CPU core for the PIL, tensor and GPU-bound worker paths and the official one;
9. ``train_pieces``: the packed forward (SDPA and flex attention), the chunked heads and the compiled loss terms
   alone, against the plain ones, with peak memory.

On a GPU machine, from the repository root. dinokit needs OmegaConf, which an image with PyTorch, timm and
transformers may lack: fetch its wheel where pip works (``pip download --no-deps --only-binary=:all: -d .whl
omegaconf==2.4.0``; it needs only PyYAML) and install it there first::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
    PYTHONPATH=src:$PYTHONPATH python3 benchmarks/gpu_suite.py --out $OUT --budget-s 480

``--only NAME ...`` runs some steps; ``--device cpu --smoke`` runs every step at toy sizes (a check of the
commands, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class Step:
    name: str
    argv: list[str]  # a script of benchmarks/ and its arguments
    timeout_s: int  # the most this step may take
    min_s: int = 60  # skipped when less than this is left of the budget


def write_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` photo-like JPEGs (500x375, q90) cut from scikit-image's sample photos (or noise without it),
    under ``folder/photos/`` (an ImageFolder with one class)."""
    import numpy as np
    from PIL import Image

    target = folder / "photos"
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    try:
        from skimage import data

        sources = [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
        sources = [Image.fromarray(s).convert("RGB") for s in sources]
    except ImportError:  # any RGB image will do for timing
        sources = [Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8))]
    for i in range(count):
        src = sources[i % len(sources)]
        scale = rng.uniform(1.0, 1.6)
        big = src.resize((int(src.width * scale) + 500, int(src.height * scale) + 375))
        x, y = int(rng.integers(0, big.width - 500)), int(rng.integers(0, big.height - 375))
        big.crop((x, y, x + 500, y + 375)).save(target / f"photo_{i:05d}.jpg", quality=90)
    return folder


def steps(device: str, smoke: bool, photos: Path, workers: int) -> list[Step]:
    """The suite's steps; ``smoke`` swaps every size for a toy one (a CPU check of the commands)."""
    dev = ["--device", device]

    def train(config: str, *flags: str, opts: tuple[str, ...] = ()) -> list[str]:
        """``train_step.py``: its flags first, then its KEY=VALUE overrides (argparse takes one run of those)."""
        if smoke:
            return ["train_step.py", *dev, "--config", "demo", "--batch", "2", "--steps", "1", *flags,
                    "student.arch=vit_pico", "student.patch_size=8", "crops.global_crops_size=32",
                    "crops.local_crops_size=16", "crops.local_crops_number=2", "train.num_workers=0", *opts]
        return ["train_step.py", *dev, "--config", config, *flags, *opts]

    def inference(arch: str) -> list[str]:
        if smoke:  # ViT-S whatever the size asked: building a ViT-g on a CPU takes long
            return ["inference.py", "--arch", "vits14", *dev, "--batch", "2", "--steps", "1", "--size", "28",
                    "--modes", "eager"]
        return ["inference.py", "--arch", arch, *dev]

    embed_size = (["--tiny", "--images", "8", "--batch", "4", "--workers", "0", "--image-size", "28"] if smoke
                  else ["--model", "dinov2_vitl14", "--images", "4096", "--batch", "256", "--workers", str(workers)])
    augmentation = "device" if device == "cuda" else "tensor"
    data_opts = (f"crops.augmentation={augmentation}", f"train.num_workers={0 if smoke else workers}")
    return [
        Step("train_step", train("vitl14", "--variants"), 420),
        Step("train_step_compiled", train("vitl14", "--variants", "--compile"), 480, min_s=180),
        Step("inference_vitl14", inference("vitl14"), 420, min_s=120),
        Step("inference_vits14", inference("vits14"), 300),
        Step("inference_vitg14", inference("vitg14"), 420, min_s=120),
        Step("embed", ["embed.py", *dev, *embed_size, "--compile"], 420, min_s=120),
        Step("train_step_data", train("vitl14", "--data", str(photos / "photos"), opts=data_opts), 300),
        Step("train_step_vits14", train("vits14"), 240),
        Step("train_step_vitb14", train("vitb14"), 240),
        Step("train_step_vitg14", train("vitg14", "--ac", "selective"), 360, min_s=120),
        Step("data_pipeline", ["data_pipeline.py", "--images", str(photos / "photos"),
                               "--seconds", "0.5" if smoke else "10"], 300),
        Step("train_pieces", ["train_pieces.py", *dev, *(
            ["--arch", "vit_pico", "--patch", "8", "--batch", "2", "--global-size", "32", "--local-size", "16",
             "--local", "2", "--prototypes", "64", "--chunk-rows", "8", "--steps", "1"] if smoke else ["--flex"])], 300),
    ]


def run_steps(selected: list[Step], out: Path, budget_s: float, python: str = sys.executable) -> list[dict]:
    """Run ``selected`` in order within ``budget_s``; every JSON line a step prints becomes a result (with its
    step's name); returns one status record per step (ran / failed / timed out / skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    started, statuses = time.monotonic(), []
    with open(out / "results.jsonl", "a") as results:
        for step in selected:
            left = budget_s - (time.monotonic() - started)
            if left < step.min_s:
                statuses.append({"step": step.name, "status": "skipped", "seconds": 0})
                continue
            t0 = time.monotonic()
            log = out / f"{step.name}.log"
            cmd = [python, str(HERE / step.argv[0]), *step.argv[1:]]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(step.timeout_s, left), env=env)
                status = "ran" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                stdout, stderr = proc.stdout, proc.stderr
            except subprocess.TimeoutExpired as err:
                status = "timed out"
                stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
                stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
            log.write_text(f"$ {' '.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}")
            for line in stdout.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                for item in record if isinstance(record, list) else [record]:
                    if isinstance(item, dict):
                        results.write(json.dumps({"step": step.name, **item}) + "\n")
            results.flush()
            statuses.append({"step": step.name, "status": status, "seconds": round(time.monotonic() - t0)})
            print(json.dumps(statuses[-1]), flush=True)
    return statuses


def summary(out: Path, statuses: list[dict]) -> str:
    """The steps' statuses and every result line, as text."""
    lines = [f"{s['step']}: {s['status']} ({s['seconds']} s)" for s in statuses]
    path = out / "results.jsonl"
    lines += ["", *(path.read_text().splitlines() if path.exists() else [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.jsonl, logs and summary.txt")
    p.add_argument("--budget-s", type=float, default=540, help="stop starting steps after this many seconds")
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=12, help="data workers of the embed and data-fed steps")
    p.add_argument("--photos", type=int, default=512, help="photo-like JPEGs written for the data steps")
    p.add_argument("--only", nargs="*", help="run only these steps")
    p.add_argument("--smoke", action="store_true", help="toy sizes: check the commands (e.g. on a CPU)")
    args = p.parse_args(argv)
    import torch

    if not args.budget_s > 0:  # every step would be skipped
        p.error(f"--budget-s must be above 0, got {args.budget_s:g}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):  # every step failed on it, one after the other
        p.error(f"--device {args.device!r} is not cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():  # every step would fail the same way
        p.error("no CUDA GPU here: pass --device cpu (with --smoke for toy sizes)")
    photos = args.out / "data"
    all_steps = steps(args.device, args.smoke, photos, args.workers)
    unknown = set(args.only or []) - {s.name for s in all_steps}
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; choose from {[s.name for s in all_steps]}")
    selected = [s for s in all_steps if not args.only or s.name in args.only]
    if any(s.name in ("train_step_data", "data_pipeline") for s in selected):
        write_photos(photos, 16 if args.smoke else args.photos)
    header = {"machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(header), flush=True)
    statuses = run_steps(selected, args.out, args.budget_s)
    text = json.dumps(header) + "\n" + summary(args.out, statuses)
    (args.out / "summary.txt").write_text(text)
    print(text, flush=True)
    return statuses


if __name__ == "__main__":
    main()
