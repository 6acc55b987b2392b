"""The tiny pretraining configuration the tests share: a vit_pico on 32-pixel crops, small heads, no k-NN monitor.

``tiny_run(...)`` returns the overrides (for ``load_config("demo", ...)`` or a command line); each test file
passes what it needs to differ (run length, batch, heads) by keyword. Also: the one error line a command printed,
a file on a disk that fills up, and a few images with a backbone config for the commands that embed them.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path


def tiny_run(
    *,
    student: bool = True,
    prototypes: int = 32,
    hidden: int = 16,
    bottleneck: int = 8,
    local_crops: int = 1,
    batch: int = 2,
    epoch_length: int = 3,
    epochs: int = 2,
    warmup: int = 1,
    eval_period: int = 100,
    log_freq: int | None = 1,
) -> list[str]:
    """Overrides of a tiny run: ``epochs`` x ``epoch_length`` iterations of ``batch`` images, a checkpoint each
    iteration; ``student=False`` leaves the student to the preset (distillation presets define their own)."""
    return [
        *(["student.arch=vit_pico", "student.patch_size=8"] if student else []),
        "crops.global_crops_size=32", "crops.local_crops_size=16", f"crops.local_crops_number={local_crops}",
        *(f"{head}.head_n_prototypes={prototypes}" for head in ("dino", "ibot")),
        *(f"{head}.head_hidden_dim={hidden}" for head in ("dino", "ibot")),
        *(f"{head}.head_bottleneck_dim={bottleneck}" for head in ("dino", "ibot")),
        f"train.batch_size_per_gpu={batch}", "train.num_workers=0", f"train.OFFICIAL_EPOCH_LENGTH={epoch_length}",
        "train.saveckp_freq=1", *([f"train.log_freq={log_freq}"] if log_freq else []), f"optim.epochs={epochs}",
        f"optim.warmup_epochs={warmup}", f"teacher.warmup_teacher_temp_epochs={warmup}",
        f"evaluation.eval_period_iterations={eval_period}", "evaluation.knn_dataset=null",
    ]


def error_line(capsys) -> str:
    """The one error line a command printed (after the progress bar, if training started), with no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err) and not any(line.startswith("error:") for line in err[:-1]), err
    return err[-1]


class FullDisk(io.FileIO):
    """A file on a disk that fills up after ``room`` bytes (``code``: ENOSPC or EIO)."""

    room, code = 2000, errno.ENOSPC

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(self.code, os.strerror(self.code))
        return super().write(data)


# `--config-file` of a tiny backbone (vit_pico, patch 14) for embed and the commands built like it
PICO_CONFIG = "student:\n  arch: vit_pico\n  patch_size: 14\ncrops:\n  local_crops_size: 28\n"


def write_images(root: Path, names=("a.png",), size=(32, 32)) -> Path:
    """``root`` with one random RGB image (height, width = ``size``) per name."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    return root
