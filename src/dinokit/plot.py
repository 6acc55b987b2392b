"""``training_metrics.json`` as one PNG: losses, schedules, teacher, k-NN accuracy and collapse signals.

Each line of the file is one JSON object with an ``iteration`` (training lines: ``total_loss`` and each
loss term, ``lr``, ``wd``, ``mom``...; evaluation lines: ``knn_top1_k*``...). Panels appear only when their
metrics do, so the same function draws pretraining, distillation and dense-head runs:

* losses: every ``*_loss`` field;
* optimiser: ``lr`` and ``last_layer_lr``, with ``wd`` on a second axis;
* teacher: the EMA momentum ``mom`` and, if logged, ``teacher_temp``;
* k-NN: ``knn_top1_k*`` and ``knn_top5_k*`` (and any ``*_acc``/``*_miou`` evaluation field);
* health: ``teacher_entropy`` against ``log K`` (K from the run's ``config.yaml``; a teacher whose output
  entropy falls towards 0 is collapsing onto few prototypes, one that stays at ``log K`` is uniform),
  ``prototypes_used`` and ``cls_effective_rank`` (collapse drives both towards 1).

matplotlib is optional (``pip install 'dinokit[plot]'``); nothing here touches pyplot's global state.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .errors import DinokitError
from .files import atomic_write

METRICS_FILE = "training_metrics.json"
Series = dict[str, tuple[list[int], list[float]]]

_PANELS: list[tuple[str, str, re.Pattern]] = [
    ("losses", "loss", re.compile(r".*_loss$")),
    ("optimiser", "learning rate", re.compile(r"^(lr|last_layer_lr|backbone_lr)$")),
    ("teacher", "teacher momentum / temperature", re.compile(r"^(mom|teacher_temp)$")),
    # a distillation into several students logs these per student, as "<student>/knn_top1_k20"
    ("knn", "accuracy (%)", re.compile(r"^([^/]+/)?(knn_top\d+_k\d+|.*_acc|.*_miou|val_aacc)$", re.IGNORECASE)),
    # dense heads' validation lines: segmentation in %, depth errors (metres, ratios) and the delta1 ratio
    ("depth", "depth validation", re.compile(r"^val_(rmse|abs_rel|delta1)$")),
    ("entropy", "teacher output entropy (nats)", re.compile(r"^([^/]+/)?teacher_entropy$")),
    ("collapse", "count", re.compile(r"^([^/]+/)?(prototypes_used|cls_effective_rank)$")),
]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/training_metrics.json`` (a path to the file itself also works)."""
    path = Path(run_dir).expanduser()
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise DinokitError(f"no {METRICS_FILE} at {str(path)!r}; pass the output folder of a training run")
    not_metrics = (f"{str(path)!r} is not a JSON-lines metrics file (one JSON object with an 'iteration' per "
                   "line); pass the output folder of a dinokit training run")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:  # binary content
        raise DinokitError(not_metrics) from None
    records = []
    partial = False  # the only content is a JSON object cut short: the run is writing its first line
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                partial = line.lstrip().startswith("{")
                continue  # a run stopped while writing its last line
            if not records:  # another file (a config.yaml, a log): not "damaged"
                raise DinokitError(not_metrics) from None
            raise DinokitError(f"line {number} of {str(path)!r} is not JSON; the metrics file is damaged") from None
        if isinstance(record, dict) and "iteration" in record:
            step = record["iteration"]
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
                raise DinokitError(f"line {number} of {str(path)!r} has iteration {step!r}, not a number; the metrics "
                                   "file is damaged")
            records.append(record)
    if not records:
        content = [line for line in lines if line.strip()]
        if content and not (partial and len(content) == 1):  # something, but not metrics: not "empty"
            raise DinokitError(not_metrics)
        raise DinokitError(f"{str(path)!r} holds no metrics yet; plot it once the run has logged")
    return records


def collect_series(records: list[dict[str, Any]]) -> dict[str, Series]:
    """Panel name -> metric name -> (iterations, values), finite numbers only, in file order."""
    panels: dict[str, Series] = {}
    for record in records:
        step = int(record["iteration"])
        for key, value in record.items():
            if key == "iteration" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            panel = next((name for name, _, pattern in _PANELS if pattern.match(key)), None)
            if key == "wd":
                panel = "optimiser"
            if panel is None:
                continue
            xs, ys = panels.setdefault(panel, {}).setdefault(key, ([], []))
            xs.append(step)
            ys.append(float(value))
    return panels


def _prototypes(run_dir: Path) -> int | None:
    """K of the DINO head, from the run's config.yaml (None when unknown)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    text = config.read_text(encoding="utf-8", errors="replace")  # written as UTF-8 (a strict locale read failed)
    match = re.search(r"^dino:\s*\n(?:[ \t]+.*\n)*?[ \t]+head_n_prototypes:\s*(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's metrics into one PNG (default ``RUN_DIR/training_metrics.png``); returns its path."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DinokitError("plotting needs matplotlib: pip install 'dinokit[plot]'") from None
    run_dir = Path(run_dir).expanduser()
    panels = collect_series(read_metrics(run_dir))
    order = [(name, label) for name, label, _ in _PANELS if name in panels]
    if not order:
        raise DinokitError(f"{METRICS_FILE} in {str(run_dir)!r} has no metric to plot (losses, lr, mom, knn_*)")
    out = Path(out).expanduser() if out is not None else (run_dir if run_dir.is_dir() else run_dir.parent) / "training_metrics.png"
    if out.suffix.lower() != ".png":
        raise DinokitError(f"the plot is a PNG: name the output *.png, not {out.name!r}")
    cols = 2 if len(order) > 1 else 1
    rows = math.ceil(len(order) / cols)
    fig = Figure(figsize=(6.5 * cols, 3.6 * rows), layout="constrained")
    k = _prototypes(run_dir if run_dir.is_dir() else run_dir.parent)
    iterations = [x for name, _ in order for xs, _ in panels[name].values() for x in xs]
    # every panel spans the run from its start (a k-NN at the last snapshot is a point at the end; a short run that
    # logged once is that point at its iteration, not alone on an axis of its own)
    first, last = min(0, min(iterations)), max(iterations)
    margin = 0.03 * (last - first) or 1.0
    for index, (name, label) in enumerate(order, start=1):
        ax = fig.add_subplot(rows, cols, index)
        ax.set_xlim(first - margin, last + margin)
        for key, (xs, ys) in panels[name].items():
            if name == "optimiser" and key == "wd":
                continue
            marker = "o" if len(xs) < 20 else None
            ax.plot(xs, ys, label=key, marker=marker, linewidth=1.2)
        if name == "losses" and all(v > 0 for _, ys in panels[name].values() for v in ys):
            ax.set_yscale("log")
        if name == "optimiser" and "wd" in panels[name]:
            twin = ax.twinx()
            xs, ys = panels[name]["wd"]
            twin.plot(xs, ys, color="tab:gray", linestyle="--", label="wd", marker="o" if len(xs) < 20 else None)
            twin.set_ylabel("weight decay")
            twin.legend(loc="center right", fontsize="small")
        if name == "entropy" and k:
            ax.axhline(math.log(k), color="tab:red", linestyle=":", label=f"log K (K={k})")
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(str(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp, open(tmp, "wb") as f:  # a full disk keeps an earlier picture (it was cut short)
        fig.savefig(f, dpi=100, format=out.suffix.lstrip(".").lower() or "png")
    return out
