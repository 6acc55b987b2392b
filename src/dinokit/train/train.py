"""``dinokit train``: DINOv2 self-supervised pretraining, as one story from set-up to the last snapshot.

Runs unchanged on one CPU process, one GPU, or many GPUs/nodes under ``torchrun`` (FSDP2). The step
function computes the losses (``SSLMetaArch.compute_losses``), does backward, clips, steps the
optimiser and updates the EMA teacher; everything else here is bookkeeping around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from .. import distributed as dist_utils
from ..distributed.parallelize import parallelize_ssl_model
from ..errors import DinokitError
from .checkpointing import Checkpointer, atomic_torch_save
from .config import apply_scaling_rules, compute_dtype, write_config
from .logging import MetricsLogger
from .optim import apply_optim_schedule, build_optimizer, build_schedulers, get_param_groups
from .ssl_meta_arch import SSLMetaArch, build_student_backbone
from .data import build_train_loader

# ---------------------------------------------------------------------------------------------- helpers
def select_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DinokitError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
        return torch.device("cuda", dist_utils.get_local_rank())
    return torch.device(requested)


def chunked_backbone_keys(state_dict: dict[str, torch.Tensor], depth: int, block_chunks: int) -> dict[str, torch.Tensor]:
    """``backbone.blocks.i.*`` -> ``backbone.blocks.<chunk>.i.*`` (the official training layout when chunked)."""
    if block_chunks <= 0:
        return state_dict
    chunk = depth // block_chunks
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "backbone" and parts[1] == "blocks":
            parts.insert(2, str(int(parts[2]) // chunk))
        out[".".join(parts)] = value
    return out


def save_teacher_snapshot(model: SSLMetaArch, cfg: DictConfig, path: Path) -> None:
    """``{"teacher": state_dict}`` in the official ``teacher_checkpoint.pth`` layout (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model.teacher, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_utils.is_main_process():
        sd = chunked_backbone_keys(sd, model.teacher.backbone.n_blocks, cfg.student.block_chunks)
        atomic_torch_save({"teacher": sd}, path)
    dist_utils.barrier()


def batch_to(batch: Any, device: torch.device) -> Any:
    moved = {
        f.name: (v.to(device, non_blocking=True) if isinstance(v := getattr(batch, f.name), torch.Tensor) else v)
        for f in dataclasses.fields(batch)
    }
    return dataclasses.replace(batch, **moved)


# ---------------------------------------------------------------------------------------------- step
def train_step(model: SSLMetaArch, optimizer, batch, *, sched: dict[str, float], clip_grad: float, autocast, scaler):
    """One optimisation step: losses -> backward -> clip per student module -> step -> EMA."""
    apply_optim_schedule(optimizer, lr=sched["lr"], wd=sched["wd"], last_layer_lr=sched["last_layer_lr"])
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        out = model.compute_losses(batch, teacher_temp=sched["teacher_temp"])
    if scaler is not None:
        scaler.scale(out.total).backward()
        scaler.unscale_(optimizer)
    else:
        out.total.backward()
    if clip_grad:
        for module in model.student.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    model.update_teacher(sched["momentum"])
    return out


# ---------------------------------------------------------------------------------------------- train
def train(
    cfg: DictConfig,
    *,
    output_dir: str | Path,
    resume: bool = True,
    device: str = "auto",
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Pretrain with ``cfg`` into ``output_dir``; returns a summary (last metrics, snapshot paths).

    ``stop_after`` ends the run after that many iterations as if it had been killed there (used by
    the resume tests); a normal run goes to ``optim.epochs * train.OFFICIAL_EPOCH_LENGTH``.
    """
    # ------------------------------------------------------------------ set-up
    dist_utils.init_from_environment()
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    is_main = rank == 0
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg.train.output_dir = str(output_dir)
    apply_scaling_rules(cfg, world)
    if is_main:
        write_config(cfg, output_dir)
    dev = select_device(device)
    torch.manual_seed(cfg.train.seed + rank)
    dtype = compute_dtype(cfg.compute_precision.dtype, dev)

    # ------------------------------------------------------------------ model
    model = SSLMetaArch(cfg).to(dev)
    model.teacher.load_state_dict(model.student.state_dict())
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (world,))
    parallelize_ssl_model(
        model,
        mesh=mesh,
        compile_blocks=cfg.train.compile,
        activation_checkpointing=cfg.train.activation_checkpointing,
        param_dtype=dtype if (mesh is not None and dev.type == "cuda") else None,
    )
    model.train()

    # ------------------------------------------------------------------ optimiser and schedules
    param_groups = []
    for module in model.student.values():
        param_groups += get_param_groups(
            module, lr_decay_rate=cfg.optim.layerwise_decay, patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult
        )
    optimizer = build_optimizer(param_groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    schedules = build_schedulers(cfg)
    epoch_len = cfg.train.OFFICIAL_EPOCH_LENGTH
    max_iter = cfg.optim.epochs * epoch_len
    scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    # ------------------------------------------------------------------ resume
    checkpointer = Checkpointer(output_dir / "checkpoints", model=model, optimizer=optimizer)
    start_iter = 0
    if cfg.MODEL.WEIGHTS:  # an explicit checkpoint to start from (official key)
        start_iter = int(checkpointer.load(Path(cfg.MODEL.WEIGHTS))["iteration"])
    elif resume and (state := checkpointer.resume()) is not None:
        start_iter = int(state["iteration"])
        if is_main:
            print(f"resumed from iteration {start_iter} ({checkpointer.directory})")
    if start_iter >= max_iter:
        if is_main:
            print(f"training already complete ({max_iter} iterations) in {output_dir}")
        return {"iteration": start_iter, "output_dir": str(output_dir), "resumed": True}

    # ------------------------------------------------------------------ data
    loader = build_train_loader(cfg, start_iteration=start_iter, pin_memory=dev.type == "cuda")

    # ------------------------------------------------------------------ loop
    log_freq = max(1, cfg.train.log_freq)
    ckpt_period = max(1, int(cfg.train.saveckp_freq) * epoch_len)
    eval_period = int(cfg.evaluation.eval_period_iterations)
    logger = MetricsLogger(output_dir / "training_metrics.json", total=max_iter, initial=start_iter, enabled=is_main)
    pending: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    last_record: dict[str, Any] = {}
    snapshots: list[str] = []
    n_bad_total = 0
    end_iter = max_iter if stop_after is None else min(max_iter, stop_after)
    iteration = start_iter
    last_batch = None
    t_data = time.perf_counter()
    for iteration, batch in zip(range(start_iter, end_iter), loader):
        data_time = time.perf_counter() - t_data
        n_bad_total += batch.n_bad
        if batch.n_samples == 0:  # every image of this batch was unreadable: repeat the last good one
            if last_batch is None:
                raise DinokitError(f"no readable image in the first batch of {cfg.train.dataset_path!r}; check the dataset")
            warnings.warn(f"iteration {iteration}: no readable image in the batch; repeating the previous batch", stacklevel=1)
            batch = last_batch
        last_batch = batch
        batch = batch_to(batch, dev)
        sched = {name: float(values[iteration]) for name, values in schedules.items()}
        out = train_step(model, optimizer, batch, sched=sched, clip_grad=cfg.optim.clip_grad, autocast=autocast, scaler=scaler)
        pending.append((out.total.detach(), {k: v.detach() for k, v in out.terms.items()}))
        logger.update(
            lr=sched["lr"], wd=sched["wd"], mom=sched["momentum"], last_layer_lr=sched["last_layer_lr"],
            current_batch_size=batch.global_crops.shape[0] // 2, data_time=data_time,
            iter_time=time.perf_counter() - t_data,
        )
        logger.step()
        done = iteration + 1
        is_last = done == max_iter
        if done % log_freq == 0 or is_last or done == end_iter or done % ckpt_period == 0:
            # One host sync per logging window: losses are reduced over ranks and checked for NaN/inf here.
            _flush_losses(pending, logger, iteration, cfg)
            pending.clear()
            last_record = logger.log(iteration)
            last_record["bad_images"] = n_bad_total
        if eval_period > 0 and done % eval_period == 0 or is_last:
            snapshots.append(_snapshot_and_eval(model, cfg, output_dir, iteration, dev, logger))
        if done % ckpt_period == 0 or is_last or done == end_iter:
            checkpointer.save(done)
        t_data = time.perf_counter()
    logger.close()
    return {"iteration": iteration + 1, "output_dir": str(output_dir), "metrics": last_record, "snapshots": snapshots,
            "bad_images": n_bad_total}


def _flush_losses(pending, logger: MetricsLogger, iteration: int, cfg: DictConfig) -> None:
    if not pending:
        return
    totals = torch.stack([t for t, _ in pending]).float()
    names = sorted(pending[-1][1])
    terms = torch.stack([torch.stack([d[n].float() for n in names]) for _, d in pending]) if names else None
    dist_utils.all_reduce_mean(totals)
    if terms is not None:
        dist_utils.all_reduce_mean(terms)
    if not torch.isfinite(totals).all():
        bad = iteration - len(pending) + 1 + int((~torch.isfinite(totals)).nonzero()[0])
        raise DinokitError(
            f"loss became {totals[~torch.isfinite(totals)][0].item()} at iteration {bad}; the last good checkpoint "
            f"is kept in {cfg.train.output_dir}/checkpoints; lower optim.base_lr or raise train.batch_size_per_gpu"
        )
    for i in range(totals.shape[0]):
        logger.update(total_loss=totals[i].item())
        if terms is not None:
            logger.update(**{n: terms[i, j].item() for j, n in enumerate(names)})


def _snapshot_and_eval(model: SSLMetaArch, cfg: DictConfig, output_dir: Path, iteration: int, dev, logger) -> str:
    """Write the teacher snapshot; with ``evaluation.knn_dataset`` set, log its k-NN accuracy."""
    path = output_dir / "eval" / f"training_{iteration}" / "teacher_checkpoint.pth"
    save_teacher_snapshot(model, cfg, path)
    knn = cfg.evaluation.knn_dataset
    if knn is not None and knn.train and knn.val:
        from ..eval import run_knn_eval
        from ..models import load_backbone_weights

        # A plain (unsharded, uncompiled) copy of the snapshot on every rank: the evaluation then runs the same
        # way in one process and under FSDP, where ranks may see different numbers of batches.
        backbone = build_student_backbone(cfg.student, img_size=cfg.crops.global_crops_size, only_teacher=True)
        load_backbone_weights(backbone, path)
        metrics = run_knn_eval(
            backbone.to(dev).eval(),
            train_dataset_str=knn.train,
            val_dataset_str=knn.val,
            device=dev,
            image_size=cfg.crops.global_crops_size,
            ks=tuple(cfg.evaluation.knn_k),
            temperature=cfg.evaluation.knn_temperature,
            progress=False,
        )
        logger.write({"iteration": iteration, **metrics})
    return str(path)
