"""``train.packed_crops``, ``train.head_chunk_rows`` and ``train.compile_loss`` in the training step: the same losses
and gradients as the plain student path (pretraining and distillation), whole runs that log the same losses, and
one-line refusals where they cannot work (compiled or checkpointed blocks, several processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinokit.cli.train import pretrain as train
from dinokit.config import check_step_levers, load_config
from dinokit.data import write_sample_dataset
from dinokit.errors import DinokitError
from dinokit.train.data import build_train_loader
from dinokit.train.ssl_meta_arch import SSLMetaArch

from tiny import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# drop path off: the packed forward draws its stochastic-depth subsets in another order (same distribution)
TINY = [*tiny_run(prototypes=64, hidden=32, bottleneck=16, local_crops=2, batch=4), "student.drop_path_rate=0"]
LEVERS = ["train.packed_crops=true", "train.head_chunk_rows=5"]  # 5 rows: several chunks, a ragged last one


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("sample"), counts={"train": 3, "val": 2}, image_size=40)


def _cfg(images: Path, *extra: str):
    return load_config("demo", [*TINY, f"train.dataset_path=ImageFolder:root={images / 'train'}", *extra])


def _step(cfg, batch, iteration: int = 4, task=None):
    """Loss terms and student gradients of one step of a freshly built (seeded) SSLMetaArch, or of ``task``."""
    torch.manual_seed(0)
    task = task if task is not None else SSLMetaArch(cfg)
    out = task.compute_losses(batch, iteration, {"teacher_temp": 0.06})
    out.total.backward()
    grads = {name: p.grad for name, p in task.student.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.terms.items()}, out.total.detach(), grads


def _assert_same_step(plain, levered):
    terms_a, total_a, grads_a = plain
    terms_b, total_b, grads_b = levered
    assert terms_a.keys() == terms_b.keys()
    for key in terms_a:  # fp32 sums in another order
        torch.testing.assert_close(terms_b[key], terms_a[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(total_b, total_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():  # to 1e-4 of each gradient's largest entry
        torch.testing.assert_close(grads_b[name], g, rtol=0, atol=1e-4 * float(g.abs().max()) + 1e-9, msg=name)


@pytest.mark.parametrize("separate_head", [False, True])
@pytest.mark.parametrize("levers", [LEVERS[:1], LEVERS[1:], LEVERS], ids=["packed", "chunked", "both"])
def test_levers_give_the_plain_losses_and_gradients(images, separate_head, levers):
    heads = [f"ibot.separate_head={str(separate_head).lower()}"]
    cfg = _cfg(images, *heads)
    batch = next(iter(build_train_loader(cfg, start_iteration=0, pin_memory=False)))
    assert batch.local_crops is not None and int(batch.n_masked_patches) > 5  # both crop sets, several iBOT chunks
    _assert_same_step(_step(cfg, batch), _step(_cfg(images, *heads, *levers), batch))


def test_levers_in_distillation(images, tmp_path):
    from test_distill import build_task, distill_cfg, make_teacher_run, one_batch

    from dinokit.train.train import compile_objective

    teacher = make_teacher_run(tmp_path / "teacher")

    def step(*extra):
        cfg = distill_cfg(images, teacher, *extra)
        torch.manual_seed(0)
        task = build_task(cfg)
        compile_objective(task, cfg.train)  # as dinokit distill does (train.compile_loss)
        out = task.compute_losses(one_batch(cfg, images), 4, {"teacher_temp": 0.06})
        out.total.backward()
        grads = {n: p.grad for n, p in task.students.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in out.terms.items()}, out.total.detach(), grads

    plain = step()
    _assert_same_step(plain, step(*LEVERS))
    _assert_same_step(plain, step("train.compile_loss=true"))


def test_a_run_with_both_levers_logs_the_plain_losses(images, tmp_path):
    def losses(out: Path, *extra: str) -> list[float]:
        train(_cfg(images, *extra), output_dir=out, device="cpu")
        return [json.loads(line)["total_loss"] for line in (out / "training_metrics.json").read_text().splitlines()]

    plain, levered = losses(tmp_path / "plain"), losses(tmp_path / "levers", *LEVERS)
    assert len(plain) == len(levered) == 6
    assert levered == pytest.approx(plain, rel=1e-4)  # six optimiser steps on the same batches
    # how the step is computed may change when a run resumes (as train.compile may)
    assert train(_cfg(images, *LEVERS, "optim.epochs=3"), output_dir=tmp_path / "plain", device="cpu")["iteration"] == 9


def test_compiled_loss_terms_give_the_plain_losses_and_gradients(images, tmp_path):
    """``train.compile_loss``: the DINO, iBOT and KoLeo terms run through torch.compile (inductor, here on the CPU)
    and give the eager values and gradients; the iBOT term keeps its graph as its row count changes, and a whole
    run logs the plain run's losses."""
    from dinokit.train.train import compile_objective

    torch._dynamo.reset()
    cfg, plain_cfg = _cfg(images, "train.compile_loss=true"), _cfg(images)
    tasks = []
    for c in (plain_cfg, cfg):
        torch.manual_seed(0)
        tasks.append(SSLMetaArch(c))
    compile_objective(tasks[1], cfg.train)  # as dinokit train does
    assert tasks[1].ibot_masked_loss is not tasks[1].ibot_patch_loss.forward_masked
    assert tasks[1].dino_loss._compiled_call_impl is not None and tasks[1].koleo_loss._compiled_call_impl is not None
    loader = iter(build_train_loader(cfg, start_iteration=0, pin_memory=False))
    counts = set()
    for _ in range(3):  # three batches, each with its own number of masked patches (the centres move on alike)
        batch = next(loader)
        counts.add(int(batch.n_masked_patches))
        for task in tasks:
            task.zero_grad(set_to_none=True)
        _assert_same_step(_step(plain_cfg, batch, task=tasks[0]), _step(cfg, batch, task=tasks[1]))
    assert len(counts) > 1

    def losses(out: Path, *extra: str) -> list[float]:
        train(_cfg(images, *extra), output_dir=out, device="cpu")
        return [json.loads(line)["total_loss"] for line in (out / "training_metrics.json").read_text().splitlines()]

    assert losses(tmp_path / "compiled", "train.compile_loss=true") == pytest.approx(losses(tmp_path / "plain"), rel=1e-4)


def test_refusals_are_one_line(images):
    with pytest.raises(DinokitError, match="train.compile_loss does not combine with train.head_chunk_rows"):
        _cfg(images, "train.compile_loss=true", "train.head_chunk_rows=8")
    with pytest.raises(DinokitError, match="train.packed_crops does not combine with train.activation_checkpointing"):
        _cfg(images, "train.packed_crops=true", "train.activation_checkpointing=true")
    assert _cfg(images, "train.packed_crops=true", "train.compile=true").train.compile  # compiles the packed blocks
    with pytest.raises(DinokitError, match=r"'train.head_chunk_rows' is -1; it must be at least 0"):
        _cfg(images, "train.head_chunk_rows=-1")
    cfg = _cfg(images, *LEVERS)
    check_step_levers(cfg.train, 1)
    with pytest.raises(DinokitError, match="train.packed_crops works in one process only .* has 2; remove it"):
        check_step_levers(cfg.train, 2)
    cfg.train.packed_crops = False
    with pytest.raises(DinokitError, match="train.head_chunk_rows works in one process only"):
        check_step_levers(cfg.train, 2)
