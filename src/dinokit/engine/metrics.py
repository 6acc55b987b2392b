"""Training metrics: smoothed values, one JSON line per logged iteration, a console progress bar, and an
optional tracker (TensorBoard, Weights & Biases) that receives every line too; a resumed run's log goes back to
its iteration (:func:`truncate_metrics`)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from ..errors import DinokitError
from ..files import atomic_write


class MetricsLogger:
    """Collects values per metric and appends their medians since the last line to ``training_metrics.json``.

    Field names follow the official file: iteration, iter_time, data_time, lr, wd, mom,
    last_layer_lr, current_batch_size, total_loss and each loss term.
    """

    def __init__(self, path: Path | None, *, total: int = 0, initial: int = 0, enabled: bool = True, tracker=None,
                 bar: bool = True):
        self.path = Path(path) if path is not None else None
        self.tracker = tracker  # anything with log(metrics, step) and close()
        self.values: dict[str, list[float]] = defaultdict(list)
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True,
                        disable=not (enabled and bar))

    def update(self, **values: float) -> None:
        for key, value in values.items():
            self.values[key].append(float(value))

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.values.items() if v}

    def log(self, iteration: int) -> dict[str, float]:
        record = {"iteration": iteration, **self.medians()}
        self.values.clear()
        if self.enabled:
            self.write(record)
            self.bar.set_postfix(loss=f"{record.get('total_loss', float('nan')):.3f}", lr=f"{record.get('lr', 0):.2e}")
        return record

    def write(self, record: dict) -> None:
        if self.enabled and self.path is not None:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:  # a full disk mid-run: one line (a resume drops a torn last line)
                raise DinokitError(f"{(err.strerror or type(err).__name__).lower()} while appending to {self.path}: "
                                   "free some space (or use another disk) and rerun the same command to resume from "
                                   "the newest checkpoint") from None
        if self.enabled and self.tracker is not None:
            self.tracker.log({k: v for k, v in record.items() if k != "iteration"}, step=int(record.get("iteration", 0)))

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self.tracker is not None:
            self.tracker.close()


def truncate_metrics(path: Path, start_iter: int) -> list[dict]:
    """Drop the lines of ``training_metrics.json`` at or after ``start_iter`` (a resumed run logs them again); returns
    the records kept."""
    if not path.is_file():
        return []
    kept, records = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if int(record.get("iteration", -1)) < start_iter:
                kept.append(line)
                records.append(record)
        except (ValueError, AttributeError):
            continue  # a line torn by a kill
    with atomic_write(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
    return records
