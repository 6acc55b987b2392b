"""Trackers: what a run logs reaches a TensorBoard event file and an offline Weights & Biases run."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from dinokit.errors import DinokitError
from dinokit.tracking import NoTracker, make_tracker

# what the training loop sends: training lines, then an evaluation line at the same iteration
LINES = [
    (9, {"total_loss": 7.5, "dino_local_crops_loss": 3.25, "lr": 3.2e-4, "mom": 0.99, "current_batch_size": 32.0}),
    (19, {"total_loss": 7.0, "dino_local_crops_loss": 3.0, "lr": 1e-3, "mom": 0.995, "note": "text is skipped",
          "koleo_loss": float("nan")}),
    (19, {"knn_top1_k10": 45.0, "knn_top5_k10": 90.0}),
]


def expected_scalars() -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in LINES:
        for key, value in metrics.items():
            if isinstance(value, float) and value == value:
                out.setdefault(key, []).append((step, value))
    return out


def test_tensorboard_event_file_holds_every_metric(tmp_path: Path) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tracker = make_tracker("tensorboard", tmp_path, {"optim": {"lr": 0.004}})
    for step, metrics in LINES:
        tracker.log(metrics, step)
    tracker.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    expected = expected_scalars()
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)  # no text, no NaN
    for key, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in points]
    assert "config/text_summary" in acc.Tags()["tensors"]


def wandb_history(run_file: Path) -> tuple[list[dict], bool]:
    """History rows of a ``run-*.wandb`` file (a 7-byte header, then LevelDB-log records of protobuf Records),
    and whether the run's exit record has been written."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, rows, finished = 32768, 7, b"", [], False
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one record complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            kind = record.WhichOneof("record_type")
            finished |= kind == "exit"
            if kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows, finished


def test_wandb_offline_run_holds_every_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = make_tracker("wandb", tmp_path / "run", {"optim": {"lr": 0.004}})
    for step, metrics in LINES:
        tracker.log(metrics, step)
    tracker.close()
    assert tracker.dir.parent == tmp_path / "run" / "wandb" and tracker.dir.name.startswith("offline-run-")
    run_file = next(tracker.dir.glob("run-*.wandb"))
    for _ in range(100):  # the wandb service may still be flushing the file when finish() returns
        rows, finished = wandb_history(run_file)
        if finished:
            break
        time.sleep(0.1)
    got: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_"):
                got.setdefault(key, []).append((row["_step"], value))
    assert got == expected_scalars()


def test_none_and_unknown_trackers(tmp_path: Path) -> None:
    tracker = make_tracker("none", tmp_path)
    assert isinstance(tracker, NoTracker)
    tracker.log({"total_loss": 1.0}, 0)
    tracker.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DinokitError, match="unknown tracker 'mlflow'; use train.tracker=none, tensorboard or wandb"):
        make_tracker("mlflow", tmp_path)


def test_tensorboard_resumed_run_replaces_the_killed_runs_points(tmp_path: Path) -> None:
    """A run killed after step 7 and resumed from its checkpoint at step 5: one point per step, the resumed ones."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    killed = make_tracker("tensorboard", tmp_path, {"optim": {"lr": 0.004}})
    for step in range(8):
        killed.log({"total_loss": float(step)}, step)
    killed.close()
    time.sleep(1.1)  # a second event file (its name holds the time in seconds)
    resumed = make_tracker("tensorboard", tmp_path, {"optim": {"lr": 0.004}}, start_step=5)
    for step in range(5, 10):
        resumed.log({"total_loss": 100.0 + step}, step)
    resumed.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("total_loss")]
    assert got == [(s, float(s)) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 10)]
    # killed before its first checkpoint, the run starts again from 0 in the folder: its points replace all of them
    time.sleep(1.1)
    again = make_tracker("tensorboard", tmp_path, {"optim": {"lr": 0.004}}, start_step=0)
    for step in range(3):
        again.log({"total_loss": -1.0 - step}, step)
    again.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("total_loss")] == [(s, -1.0 - s) for s in range(3)]


def test_wandb_resumed_run_goes_on_in_the_killed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = make_tracker("wandb", tmp_path / "run")
    first.log({"total_loss": 1.0}, 0)
    first.close()
    run_id = (tmp_path / "run" / "wandb" / "run-id").read_text().strip()
    assert first.run.id == run_id
    resumed = make_tracker("wandb", tmp_path / "run", start_step=5)
    resumed.log({"total_loss": 0.5}, 5)
    resumed.close()
    assert resumed.run.id == run_id  # the same W&B run, not a second one
    fresh = make_tracker("wandb", tmp_path / "run")  # a run started again from scratch in the folder: a new W&B run
    fresh.close()
    assert fresh.run.id != run_id
    assert (tmp_path / "run" / "wandb" / "run-id").read_text().strip() == fresh.run.id
