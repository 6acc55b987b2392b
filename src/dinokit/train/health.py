"""Signs that a DINO run has collapsed: statistics of the teacher's targets, and the diagnosis of a logged line.

DINO has two ways to fail without a NaN. With centring (or Sinkhorn-Knopp) the targets can become
**uniform**: the head maps every image to the same code, the teacher's distribution over the K prototypes is
flat (entropy log K) and the DINO losses sit at exactly ``log K`` times their weights. Or every image gets
the **same prototype**. Either way the losses stop changing and the backbone learns nothing more, while the
run goes on looking healthy. On small sets this happens, e.g. when colour augmentation makes the two views of
an image impossible to match early on (the `small` preset's strong colour jitter on coloured shapes).

:func:`teacher_health` adds two metrics to each step's terms (no host synchronisation: tensors, reduced and
logged with the losses): ``teacher_entropy`` (mean entropy of the DINO targets, nats) and
``prototypes_used`` (distinct arg-max prototypes of the batch's targets). :class:`CollapseCheck` reads the
logged lines and returns one warning line when a failure has lasted several lines after the warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

UNIFORM_FRACTION = 0.97  # entropy at or above this fraction of log K counts as uniform (healthy demo runs: 85-91%)
WINDOWS = 3  # consecutive logged lines before a warning


@torch.no_grad()
def teacher_health(dino_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``teacher_entropy`` and ``prototypes_used`` of DINO targets ``(..., K)`` (each row sums to 1)."""
    probs = dino_probs.flatten(0, -2).float()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    used = torch.zeros(probs.shape[-1], device=probs.device).index_fill_(0, probs.argmax(-1), 1.0).sum()
    return {"teacher_entropy": entropy, "prototypes_used": used}


class CollapseCheck:
    """Reads logged lines (from iteration ``start`` on) and says, once the failure has lasted ``WINDOWS`` lines,
    that the DINO targets are uniform or all on one prototype (once per kind and run)."""

    def __init__(self, n_prototypes: int, start: int, centering: str = "centering") -> None:
        self.log_k = math.log(n_prototypes)
        self.start = start
        # the other teacher normalisation is worth a try (it was advised when the run already used it)
        self.other = "train.centering=" + ("centering" if centering == "sinkhorn_knopp" else "sinkhorn_knopp")
        self.streak: dict[str, int] = {"uniform": 0, "one": 0}
        self.since: dict[str, int] = {}
        self.warned: set[str] = set()

    def __call__(self, record: Mapping[str, float], iteration: int) -> str | None:
        if "teacher_entropy" not in record or iteration < self.start:
            return None
        entropy, used = record["teacher_entropy"], record.get("prototypes_used", 2.0)
        # one prototype for every image is a sign only in batches large enough to hold several
        many = record.get("current_batch_size", 0) >= 8
        flags = {"uniform": entropy >= UNIFORM_FRACTION * self.log_k, "one": many and used <= 1.0}
        for kind, bad in flags.items():
            self.streak[kind] = self.streak[kind] + 1 if bad else 0
            if bad and self.streak[kind] == 1:
                self.since[kind] = iteration
        kind = next((k for k in ("uniform", "one") if self.streak[k] >= WINDOWS and k not in self.warned), None)
        if kind is not None:
            self.warned.add(kind)
        if kind == "uniform":
            return (f"the DINO targets have been uniform since iteration {self.since['uniform']} (teacher entropy "
                    f"{entropy:.3f}, log K = {self.log_k:.3f}): the heads collapsed and the backbone stops learning; "
                    "try weaker colour augmentation (crops.color_jitter_strength, crops.grayscale_probability), "
                    f"a lower optim.base_lr or {self.other}")
        if kind == "one":
            return (f"every image has had the same DINO prototype since iteration {self.since['one']}: the "
                    f"teacher collapsed, or the training images hardly differ (copies of a few images); try a higher "
                    f"teacher.teacher_temp, {self.other} or a lower optim.base_lr")
        return None
