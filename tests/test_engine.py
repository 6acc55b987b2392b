"""The training engine's contract on a toy task, plus what the engine refactor fixed or added:
one backbone builder for training and evaluation, official keys that cannot act, sharding strategies,
temporary-file clean-up, the NaN message and trackers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dinokit.cli import main
from dinokit.config import load_config
from dinokit.data import write_sample_dataset
from dinokit.engine import CosineScheduler, Engine, EngineConfig, Export, LossOutput, Task, init_run
from dinokit.errors import DinokitError


class Regression(Task):
    """y = x @ w_true: a linear model learns w_true; an EMA copy is exported."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(4, 1, bias=False)
        self.ema = nn.Linear(4, 1, bias=False).requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())

    def trainable_modules(self):
        return {"model": self.model}

    def inference_modules(self):
        return {"ema": self.ema}

    def compute_losses(self, batch, iteration, sched):
        x, y = batch
        loss = ((self.model(x) - y) ** 2).mean()
        return LossOutput(total=loss, terms={"mse": loss})

    def after_step(self, iteration, sched):
        from dinokit.engine import ema_update

        ema_update(self.ema, self.model, sched["momentum"])

    def exports(self):
        return [Export(self.ema)]

    def batch_size(self, batch):
        return batch[0].shape[0]


W_TRUE = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def batches(start: int):
    """Batch i depends only on i: a resumed run sees exactly the batches it would have seen."""
    i = start
    while True:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(16, 4, generator=g)
        yield x, x @ W_TRUE
        i += 1


def run_toy(out: Path, *, stop_after=None, max_iter=40, dtype=torch.float32, task=Regression):
    init_run(0)
    cfg = EngineConfig(max_iter=max_iter, checkpoint_period=10, snapshot_period=20, log_freq=5, clip_grad=10.0,
                       dtype=dtype)
    schedules = {"lr": CosineScheduler(0.5, 0.01, max_iter), "wd": CosineScheduler(0.0, 0.0, max_iter),
                 "momentum": CosineScheduler(0.9, 0.9, max_iter)}
    engine = Engine(task(), cfg, output_dir=out, device=torch.device("cpu"), schedules=schedules)
    start = engine.restore(resume=True)
    return engine, engine.run(batches, start_iter=start, stop_after=stop_after)


def test_a_toy_task_trains_through_the_same_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    engine, summary = run_toy(tmp_path / "run")
    assert torch.backends.cuda.matmul.allow_tf32  # set by init_run, as the official training does
    lines = [json.loads(l) for l in (tmp_path / "run" / "training_metrics.json").read_text().splitlines()]
    assert [l["iteration"] for l in lines] == [4, 9, 14, 19, 24, 29, 34, 39]
    assert lines[-1]["mse"] < 0.02 * lines[0]["mse"]  # it learns
    assert lines[0]["current_batch_size"] == 16 and "lr" in lines[0] and "mom" in lines[0]
    assert torch.allclose(engine.task.model.weight.T, W_TRUE, atol=0.3)
    snaps = sorted((tmp_path / "run" / "eval").glob("training_*/teacher_checkpoint.pth"))
    assert [p.parent.name for p in snaps] == ["training_19", "training_39"]
    exported = torch.load(snaps[-1], weights_only=True)["teacher"]
    assert torch.equal(exported["weight"], engine.task.ema.weight)  # the EMA, not the trained model
    assert not torch.equal(engine.task.ema.weight, engine.task.model.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_toy_kill_and_resume_is_bit_exact(tmp_path, dtype):
    """fp16: the loss scaler's state was not saved; a resumed run started again from a scale of 65536, skipping the
    steps whose gradients overflowed there (here the first steps overflow, so the scale is below it at 20)."""
    straight, _ = run_toy(tmp_path / "a", dtype=dtype)
    run_toy(tmp_path / "b", stop_after=20, dtype=dtype)
    resumed, summary = run_toy(tmp_path / "b", dtype=dtype)
    assert summary["iteration"] == 40
    for a, b in zip(straight.task.state_dict().values(), resumed.task.state_dict().values()):
        assert torch.equal(a, b)
    if dtype == torch.float16:
        assert resumed.scaler.get_scale() == straight.scaler.get_scale() < 65536


def test_half_written_checkpoints_of_a_killed_run_are_removed(tmp_path):
    run_toy(tmp_path / "run", stop_after=10)
    leftover = tmp_path / "run" / "checkpoints" / ".checkpoint_0000020.pth.tmp-99999999"
    leftover.write_bytes(b"torn")
    run_toy(tmp_path / "run")
    assert not leftover.exists()


@pytest.mark.parametrize("content, reason", [
    (b"torn", "is corrupt or truncated"),  # not even an archive: torch.load fails
    (None, "is not a training checkpoint"),  # a whole torch.save file of something else
    ("object", "is a file of arbitrary Python objects (argparse.Namespace), not unpickled"),  # refused, not damaged
])
def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path, content, reason):
    out = tmp_path / "run"
    run_toy(out, stop_after=10)
    ckpt = out / "checkpoints" / "checkpoint_0000010.pth"
    if content is None:
        torch.save({"something": torch.zeros(2)}, ckpt)
    elif content == "object":
        torch.save({"model": __import__("argparse").Namespace(a=1), "optimizer": {}}, ckpt)
    else:
        ckpt.write_bytes(content)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DinokitError) as err:
        run_toy(out)
    assert str(err.value) == (f"no readable checkpoint in {out / 'checkpoints'} (checkpoint_0000010.pth {reason}); "
                              "delete it to restart this run from scratch, or give a new --output-dir")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_checkpoint_of_another_model_is_not_called_damaged(tmp_path):
    # Seen: a run resumed with another architecture was told its checkpoints were unreadable and to delete them.
    out = tmp_path / "run"
    run_toy(out, stop_after=10)
    ckpt = out / "checkpoints" / "checkpoint_0000010.pth"
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {k: torch.zeros(3, 8) for k in state["model"]}  # the same keys, another shape
    torch.save(state, ckpt)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DinokitError) as err:
        run_toy(out)
    assert str(err.value) == (
        f"no checkpoint in {out / 'checkpoints'} fits the model these settings build (checkpoint_0000010.pth is not "
        "readable as a checkpoint of this model); rerun with the settings the run was started with, or give a new "
        "--output-dir to start a new run")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_nan_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(Regression, "compute_losses",
                        lambda self, b, i, s: LossOutput(total=self.model(b[0]).sum() * float("nan"), terms={}))
    with pytest.raises(DinokitError, match="loss became nan at iteration 0; no checkpoint had been written yet; lower "
                                           "optim.base_lr or raise train.batch_size_per_gpu$"):
        run_toy(tmp_path / "run")
    # a task names its own settings (a dense head was told of pretraining's optim.base_lr)
    monkeypatch.setattr(Regression, "divergence_fix", "lower lr", raising=False)
    with pytest.raises(DinokitError, match="; no checkpoint had been written yet; lower lr$"):
        run_toy(tmp_path / "run2")
    from dinokit.dense.train import DenseHeadTask

    assert DenseHeadTask.divergence_fix == "lower lr or raise batch_size"


from tiny import tiny_run  # noqa: E402

TINY = tiny_run(local_crops=2, batch=4, epoch_length=2, epochs=1, warmup=0, eval_period=2, log_freq=None)


def test_a_run_without_layerscale_is_evaluated_with_its_own_architecture(tmp_path, capsys):
    """Evaluation used to build LayerScale 1.0 for a run trained with student.layerscale=0, so its teacher failed."""
    from dinokit.cli.train import pretrain

    root = write_sample_dataset(tmp_path / "sample", counts={"train": 3, "val": 2}, image_size=40)
    cfg = load_config("demo", [*TINY, "student.layerscale=0", f"train.dataset_path=ImageFolder:root={root / 'train'}"])
    pretrain(cfg, output_dir=tmp_path / "run", device="cpu")
    snapshot = tmp_path / "run" / "eval" / "training_1" / "teacher_checkpoint.pth"
    assert not any("ls1" in k for k in torch.load(snapshot, weights_only=True)["teacher"])
    argv = ["eval", "knn", "--pretrained-weights", str(snapshot), "--train-dataset", f"ImageFolder:root={root / 'train'}",
            "--val-dataset", f"ImageFolder:root={root / 'val'}", "--output-dir", str(tmp_path / "eval"),
            "--image-size", "32", "--nb-knn", "1", "--device", "cpu", "--no-progress", "--num-workers", "0"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "eval" / "results_eval_knn.json").is_file()


@pytest.mark.parametrize("override, message", [
    ("train.cache_dataset=false", "config key 'train.cache_dataset' is False but has no effect in dinokit"),
    ("compute_precision.student.backbone.mixed_precision.param_dtype=bf16",
     "has no effect in dinokit: FSDP2 computes in compute_precision.dtype"),
    ("compute_precision.teacher.dino_head.mixed_precision.buffer_dtype=fp16", "set that key"),
    ("compute_precision.student.backbone.sharding_strategy=NO_SHARD", "use one of: FULL_SHARD, SHARD_GRAD_OP"),
])
def test_official_keys_that_cannot_act_stop_with_one_line(override, message):
    with pytest.raises(DinokitError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config("demo", [override])
    load_config("demo", ["compute_precision.student.dino_head.mixed_precision.reduce_dtype=fp32"])  # what dinokit does


def test_sharding_strategy_sets_reshard_after_forward():
    from dinokit.train.train import engine_config

    cfg = load_config("demo", ["compute_precision.student.backbone.sharding_strategy=FULL_SHARD"])
    reshard = engine_config(cfg, torch.device("cpu")).reshard_after_forward
    assert reshard["student.backbone"] is True and reshard["student.dino_head"] is False  # SHARD_GRAD_OP: kept


def test_tensorboard_tracker_receives_the_metrics_lines(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dinokit.cli.train import pretrain

    root = write_sample_dataset(tmp_path / "sample", counts={"train": 3, "val": 2}, image_size=40)
    cfg = load_config("demo", [*TINY, "train.tracker=tensorboard", "train.log_freq=1",
                               f"train.dataset_path=ImageFolder:root={root / 'train'}"])
    pretrain(cfg, output_dir=tmp_path / "run", device="cpu")
    events = EventAccumulator(str(next((tmp_path / "run").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"total_loss", "lr", "ibot_loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("total_loss")] == [0, 1]


def test_distillation_keys_in_a_pretraining_run_are_refused(tmp_path):
    from dinokit.train.train import train

    cfg = load_config("demo", [*TINY, "distillation.loss=features"])
    with pytest.raises(DinokitError, match="the distillation.\\* keys are read by dinokit distill, not dinokit train"):
        train(cfg, output_dir=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_batches_that_move_themselves_are_asked_to():
    from dinokit.engine import batch_to

    class Deferred:  # e.g. a batch whose crops are made on the device it is moved to
        def to(self, device, non_blocking=False):
            return ("made on", str(device), non_blocking)

    assert batch_to(Deferred(), torch.device("cpu")) == ("made on", "cpu", True)
    moved = batch_to({"x": torch.ones(2)}, torch.device("cpu"))
    assert torch.equal(moved["x"], torch.ones(2))


def test_unknown_augmentation_is_refused_at_load():
    with pytest.raises(DinokitError, match="config key 'crops.augmentation' is 'gpu'; use one of: pil, tensor"):
        load_config("demo", ["crops.augmentation=gpu"])


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_never_unpickles_foreign_objects_and_a_torn_one_falls_back(tmp_path):
    """Seen: torch.distributed.checkpoint reads .metadata with plain pickle, so resuming a crafted run folder ran
    code; a torn sharded checkpoint gave tracebacks instead of the fallback to the older one."""
    import pickle

    from dinokit.engine.checkpoint import Checkpointer

    task = Regression()
    optimizer = torch.optim.AdamW(task.model.parameters())
    checkpoints = Checkpointer(tmp_path / "checkpoints", model=task, optimizer=optimizer)
    for iteration in (3, 6):
        checkpoints._save_sharded(iteration, {"iteration": iteration, "world_size": 1, "rng": []})
    assert checkpoints.resume()["iteration"] == 6  # whole: the newest
    newest = tmp_path / "checkpoints" / "checkpoint_0000006"
    whole = (newest / ".metadata").read_bytes()
    marker = tmp_path / "ran"
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.warns(UserWarning, match=r"checkpoint_0000006: it is a sharded checkpoint whose \.metadata names other "
                                         r"Python objects \(io\.open\), not unpickled; resuming from the older "
                                         r"checkpoint_0000003"):
        assert checkpoints.resume()["iteration"] == 3
    assert not marker.exists()  # nothing ran
    (newest / ".metadata").write_bytes(whole)
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:40])  # torn
    with pytest.warns(UserWarning, match=r"it is corrupt or truncated \(a shard file\); resuming from the older "
                                         "checkpoint_0000003"):
        assert checkpoints.resume()["iteration"] == 3


def _buffers_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    # a forked child: its OpenMP team would wait for ever on the parent's threads, which the fork did not copy
    # (pytest -n0 after a test that computed on several threads)
    torch.set_num_threads(1)
    from dinokit.engine.parallel import average_buffers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    bn = nn.BatchNorm2d(3)
    bn.train()
    bn(torch.full((2, 3, 4, 4), float(rank * 4)) + torch.arange(32.0).view(2, 1, 4, 4))  # each rank its own batch
    torch.save({k: v.clone() for k, v in bn.state_dict().items()}, f"{out}.before.{rank}")
    average_buffers([nn.Linear(2, 2), bn])  # a module without buffers is fine
    torch.save(bn.state_dict(), f"{out}.{rank}")
    dist.destroy_process_group()


def test_batchnorm_statistics_are_averaged_over_processes(tmp_path):
    """Each process's BatchNorm statistics followed its own batches, and a sharded checkpoint kept one copy: a
    two-process dense run resumed with rank 0's statistics on both ranks (mIoU 11.44 -> 11.65 against the unbroken
    run). After each step they are now the mean over the processes, equal everywhere."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "bn")
    mp.start_processes(_buffers_worker, args=(port, out), nprocs=2, join=True, start_method="fork")
    before = [torch.load(f"{out}.before.{r}") for r in range(2)]
    after = [torch.load(f"{out}.{r}") for r in range(2)]
    assert not torch.equal(before[0]["running_mean"], before[1]["running_mean"])
    for key in ("running_mean", "running_var"):
        expected = (before[0][key] + before[1][key]) / 2
        assert torch.allclose(after[0][key], expected) and torch.equal(after[0][key], after[1][key])
    assert after[0]["num_batches_tracked"] == after[1]["num_batches_tracked"] == 1


class _CountedBatch(tuple):
    n_bad = 0  # unreadable images the collate left out of this batch


def _bad_images_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def counted(start: int):
        for batch in batches(start):
            batch = _CountedBatch(batch)
            batch.n_bad = rank + 1  # rank 0 skips 1 image per batch, rank 1 skips 2
            yield batch

    cfg = EngineConfig(max_iter=6, checkpoint_period=6, log_freq=3, progress=False)
    schedules = {name: CosineScheduler(v, v, 6) for name, v in (("lr", 0.1), ("wd", 0.0), ("momentum", 0.9))}
    engine = Engine(Regression(), cfg, output_dir=out, device=torch.device("cpu"), schedules=schedules)
    summary = engine.run(counted)
    torch.save(summary["bad_images"], f"{out}.{rank}")
    dist.destroy_process_group()


def test_skipped_images_are_counted_over_every_process(tmp_path):
    """Under torchrun the closing summary ('unreadable images skipped in trained batches') counted the images of the
    printing process's batches only."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "run")
    # spawn: the workers train, and autograd refuses to run in a child forked after the parent used it (as another
    # test of this pytest worker may have)
    mp.start_processes(_bad_images_worker, args=(port, out), nprocs=2, join=True, start_method="spawn")
    assert torch.load(f"{out}.0") == torch.load(f"{out}.1") == 18  # (1 + 2) per iteration, 6 iterations


def test_the_command_line_starts_without_the_distributed_checkpoint_modules():
    """torch.distributed.checkpoint takes about 0.5 s to import; it is loaded when a checkpoint is saved or loaded,
    not by every command (``dinokit --help``, a one-line error)."""
    import subprocess
    import sys

    code = ("import sys; from dinokit.cli import build_parser; build_parser(); "
            "print('torch.distributed.checkpoint' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
