"""The training step never reads a tensor's value on the host (on a GPU each such read makes the CPU wait for the
device): the losses, backward, optimiser, clipping and EMA of pretraining and distillation, checked on the CPU
by watching for ``aten._local_scalar_dense``, the operation behind ``.item()``, ``float(t)``, ``int(t)``,
``bool(t)`` and slicing by a tensor, and for selections whose size depends on the data (``nonzero``, boolean-mask
indexing, ``masked_select``: on a GPU the host waits to learn the size). Logged values are read in batches at
logging time (engine/loop.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinokit.config import load_config
from dinokit.data import write_sample_dataset
from dinokit.engine import Engine
from dinokit.train.data import build_train_loader
from dinokit.train.ssl_meta_arch import SSLMetaArch
from dinokit.train.train import engine_config

from tiny import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = tiny_run(prototypes=64, hidden=32, bottleneck=16, local_crops=2, batch=4)
SCHED = {"lr": 1e-3, "wd": 0.04, "momentum": 0.99, "teacher_temp": 0.06, "last_layer_lr": 1e-3}


SIZED_BY_DATA = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default}


class HostReads(TorchDispatchMode):
    """Records every read of a tensor value by the host, except of the tensors in ``ignore``."""

    def __init__(self, ignore: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.reads = 0
        self.ignore = {t.data_ptr() for t in ignore}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].data_ptr() not in self.ignore:
            self.reads += 1
        elif func in SIZED_BY_DATA or (func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1])):
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("sample"), counts={"train": 3, "val": 2}, image_size=40)


def _engine_steps(task, cfg, batch, output_dir: Path, steps: int = 2) -> int:
    """Host reads during ``steps`` full engine steps (forward, backward, clipping, AdamW, EMA)."""
    engine = Engine(task, engine_config(cfg, torch.device("cpu")), output_dir=str(output_dir),
                    device=torch.device("cpu"), schedules={})
    engine.step(batch, 0, SCHED)  # the first step creates the optimiser state
    # AdamW's step counters: host tensors by design on a GPU (fused AdamW reads them there without a sync); the
    # CPU's foreach AdamW reads them each step
    counters = tuple(state["step"] for state in engine.optimizer.state.values())
    with HostReads(ignore=counters) as spy:
        for i in range(1, 1 + steps):
            engine.step(batch, i, SCHED)
    return spy.reads


@pytest.mark.parametrize("extra", [
    [],
    ["train.centering=sinkhorn_knopp", "ibot.separate_head=true"],
    ["train.packed_crops=true", "train.head_chunk_rows=5"],
    ["gram.use_loss=true", "gram.ema_teacher=true", "optim.clip_grad=0"],
    ["gram.use_loss=true", "gram.ema_teacher=true", "gram.img_level=false", "gram.tokens_used=masked"],
    ["gram.use_loss=true", "gram.ema_teacher=true", "gram.img_level=false", "gram.tokens_used=unmasked"],
], ids=["official", "sinkhorn-separate-head", "levers", "gram-no-clip", "gram-masked", "gram-unmasked"])
def test_a_pretraining_step_never_reads_a_tensor_on_the_host(images, extra, tmp_path):
    cfg = load_config("demo", [*TINY, f"train.dataset_path=ImageFolder:root={images / 'train'}", *extra])
    batch = next(iter(build_train_loader(cfg, start_iteration=0, pin_memory=False)))
    assert _engine_steps(SSLMetaArch(cfg), cfg, batch, tmp_path) == 0


def test_a_distillation_step_never_reads_a_tensor_on_the_host(images, tmp_path):
    from test_distill import build_task, distill_cfg, make_teacher_run, one_batch

    cfg = distill_cfg(images, make_teacher_run(tmp_path / "teacher"))
    assert _engine_steps(build_task(cfg), cfg, one_batch(cfg, images), tmp_path / "run") == 0


def test_the_spy_sees_host_reads():
    with HostReads() as spy:
        x = torch.arange(5.0)
        float(x.sum()), x[: torch.tensor(3)]
        x[x > 2], x.nonzero(), x.masked_select(x > 1)
    assert spy.reads == 5
