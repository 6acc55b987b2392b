"""``dinokit train``: DINOv2 self-supervised pretraining, the :class:`SSLMetaArch` task on the shared engine.

Runs unchanged on one CPU process, one GPU, or many GPUs/nodes under ``torchrun`` (FSDP2). This
module only translates the official config into the engine's settings, the schedules and the data
stream; the engine (``dinokit.engine``) owns the loop. Monitors such as the k-NN evaluation of each
snapshot are hooks passed in by the command (``dinokit.cli.train``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .. import distributed as du
from ..config import (apply_scaling_rules, check_idle_keys, check_koleo_group, check_step_levers, compute_dtype,
                      write_config)
from ..config.paths import make_paths_absolute
from ..config.schema import DistillationConfig
from ..devices import resolve_device
from ..engine import Engine, EngineConfig, Hook, build_schedulers, init_run
from ..engine.optim import CosineScheduler, scale_lr, warmup_cosine_schedule
from ..engine.run_dir import data_change_note, open_run_dir
from ..errors import DinokitError
from ..tracking import check_tracker
from ..data.images import decoding_settings
from .data import build_train_loader, check_output_outside_data
from .ssl_meta_arch import SSLMetaArch
from .weights import check_weight_sources


def engine_config(cfg: DictConfig, device: torch.device, *, progress: bool = True) -> EngineConfig:
    """The engine's settings from the official keys (``train``, ``optim``, ``compute_precision``, ``evaluation``);
    ``progress``: the console progress bar."""
    epoch_len = cfg.train.OFFICIAL_EPOCH_LENGTH
    precision = cfg.compute_precision
    reshard = {f"{role}.{name}": precision[role][name].sharding_strategy == "FULL_SHARD"
               for role in ("student", "teacher") for name in ("backbone", "dino_head", "ibot_head")}
    return EngineConfig(
        max_iter=cfg.optim.epochs * epoch_len,
        checkpoint_period=max(1, int(cfg.train.saveckp_freq) * epoch_len),
        snapshot_period=int(cfg.evaluation.eval_period_iterations),
        log_freq=cfg.train.log_freq,
        clip_grad=cfg.optim.clip_grad,
        dtype=compute_dtype(precision.dtype, device),
        grad_scaler=precision.grad_scaler,
        compile=cfg.train.compile,
        activation_checkpointing=cfg.train.activation_checkpointing,
        checkpoint_policy=cfg.train.activation_checkpointing_policy,
        reshard_after_forward=reshard,
        layerwise_decay=cfg.optim.layerwise_decay,
        patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
        betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
        tracker=cfg.train.tracker,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        progress=progress,
    )


def train(
    cfg: DictConfig,
    *,
    output_dir: str | Path,
    resume: bool = True,
    device: str = "auto",
    stop_after: int | None = None,
    hooks: Iterable[Hook] = (),
    banner: Callable[[], str] | None = None,
    eval_only: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain with ``cfg`` into ``output_dir``; returns a summary (last metrics, snapshot paths).

    ``stop_after`` ends the run after that many iterations as if it had been killed there (used by
    the resume tests); a normal run goes to ``optim.epochs * train.OFFICIAL_EPOCH_LENGTH``. ``banner``
    (main process) makes the line printed once the run folder is accepted, before anything is written in it.
    ``eval_only`` (official ``--eval-only``): the run's newest checkpoint (or ``MODEL.WEIGHTS``) is loaded, its
    teacher written to ``eval/manual_<iteration>/teacher_checkpoint.pth`` and the hooks run on it; no training.
    """
    if OmegaConf.to_container(cfg.distillation) != OmegaConf.to_container(OmegaConf.structured(DistillationConfig)):
        raise DinokitError("the distillation.* keys are read by dinokit distill, not dinokit train; remove them or "
                           "run dinokit distill")
    make_paths_absolute(cfg)  # saved in config.yaml: the same files from any working directory
    check_idle_keys(cfg, output_dir, resume)
    check_stage_weights(cfg)
    check_tracker(cfg.train.tracker)
    check_output_outside_data(output_dir, cfg.train.dataset_path)
    rank, world = init_run(cfg.train.seed)
    check_step_levers(cfg.train, world)
    check_koleo_group(cfg.dino, world)
    output_dir = Path(output_dir).expanduser()
    cfg.train.output_dir = str(output_dir)
    apply_scaling_rules(cfg, world)
    dev = resolve_device(device)
    weights = cfg.MODEL.WEIGHTS or None
    # checked before anything is written: a folder of its own, no other run in it, the same configuration
    with open_run_dir(output_dir, resume=resume, config=OmegaConf.to_container(cfg, resolve=True)):
        if banner is not None:  # the images are listed there: a missing folder stops every process, said once
            du.on_main_process(lambda: print(banner()))
        model = SSLMetaArch(cfg)  # loads the starting weights: a file that does not fit is one line, nothing written
        model.teacher.load_state_dict(model.student.state_dict())
        return run_on_ssl_data(model, engine_config(cfg, dev, progress=progress), cfg, output_dir=output_dir, device=dev, hooks=hooks,
                               resume=resume, weights=weights, stop_after=stop_after, eval_only=eval_only,
                               on_restored=lambda: write_config(cfg, output_dir) if rank == 0 else None)


def compile_objective(task, train_cfg) -> None:
    """Compile what the engine's per-block compile does not reach, from outside the objective.

    With ``train.compile`` and ``train.packed_crops``, the student's packed forward runs a compiled block function
    (the engine compiles the blocks' own forward, which the packed forward does not call). With
    ``train.compile_loss``, the student's loss terms run compiled (the modules' ``forward`` only: the teacher's
    centring methods stay eager); the iBOT term's row count changes every step, so its graph is dynamic in it
    after the second size (``dynamic=None``) instead of recompiling each time."""
    if train_cfg.compile and train_cfg.packed_crops:
        from ..models.packed import packed_block

        task.packed_block_fn = torch.compile(packed_block, dynamic=False)
    if train_cfg.compile_loss:
        for name in ("dino_loss", "koleo_loss", "gram_loss"):
            if hasattr(task, name):
                getattr(task, name).compile(dynamic=None)
        task.ibot_masked_loss = torch.compile(task.ibot_patch_loss.forward_masked, dynamic=None)


def check_stage_weights(cfg: DictConfig) -> None:
    """The files a stage starts from (``student.*``, ``gram.ckpt``) are there: one line before anything is written.
    A head warm-up needs a backbone to keep: without one (the ``continued`` preset without its weights file) it
    would freeze a random initialisation and silently train from scratch."""
    freeze = cfg.train.freeze_backbone_epochs
    if freeze and not (cfg.student.pretrained_weights or cfg.student.resume_from_teacher_chkpt):
        raise DinokitError(f"train.freeze_backbone_epochs={freeze} is a head warm-up for a loaded backbone, but "
                           "student.pretrained_weights is empty: give the backbone to continue (e.g. student."
                           "pretrained_weights=dinov2_vits14_pretrain.pth), or train.freeze_backbone_epochs=0 to "
                           "train from scratch")
    check_weight_sources({"student.pretrained_weights": cfg.student.pretrained_weights,
                          "student.resume_from_teacher_chkpt": cfg.student.resume_from_teacher_chkpt,
                          "gram.ckpt": cfg.gram.ckpt if cfg.gram.use_loss or cfg.gram.compute_stats else ""})


def training_schedules(cfg: DictConfig) -> dict[str, CosineScheduler]:
    """The engine's schedules (:func:`dinokit.engine.build_schedulers`), plus ``gram_weight`` (the Gram loss's
    weight per iteration) when ``gram.loss_weight_schedule`` is set and ``dino_local_loss_weight`` (the local-crop
    DINO loss's) when ``dino.reweight_dino_local_loss`` is on: DINOv3's v2 schedules, in epochs. With
    ``optim.lr_schedule`` the lr is one too, its values scaled for the total batch by ``optim.scaling_rule``."""
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH

    def v2(weight, scale: float = 1.0) -> CosineScheduler:
        cosine = None if weight.cosine_epochs is None else round(weight.cosine_epochs * epoch)
        return warmup_cosine_schedule(scale * weight.start, scale * weight.peak, scale * weight.end,
                                      warmup_iters=round(weight.warmup_epochs * epoch),
                                      total_iters=cfg.optim.epochs * epoch, cosine_iters=cosine)

    lr = None
    if cfg.optim.lr_schedule is not None:
        total_batch = cfg.train.batch_size_per_gpu * du.get_world_size()
        lr = v2(cfg.optim.lr_schedule, scale_lr(1.0, total_batch, cfg.optim.scaling_rule))
    schedules = build_schedulers(cfg, lr=lr)
    if cfg.gram.use_loss and cfg.gram.loss_weight_schedule is not None:
        schedules["gram_weight"] = v2(cfg.gram.loss_weight_schedule)
    if cfg.dino.reweight_dino_local_loss:
        schedules["dino_local_loss_weight"] = v2(cfg.dino.local_loss_weight_schedule)
    return schedules


def run_on_ssl_data(task, settings: EngineConfig, cfg: DictConfig, *, output_dir: Path, device: torch.device,
                    hooks: Iterable[Hook], resume: bool, weights, stop_after: int | None,
                    on_restored: Callable[[], None] | None = None, eval_only: bool = False) -> dict[str, Any]:
    """Run ``task`` on the engine, fed by the multi-crop stream of ``cfg`` (pretraining and distillation alike).

    ``on_restored`` runs once the run's or ``weights``' checkpoint is loaded, before the first step: the caller
    writes its config.yaml there, so that a checkpoint that fails to load leaves the folder as it was.
    ``eval_only`` (official ``--eval-only``): no step; the restored teacher is written to ``eval/manual_<it>/``
    and the hooks run on it."""
    compile_objective(task, cfg.train)
    engine = Engine(task, settings, output_dir=output_dir, device=device, schedules=training_schedules(cfg), hooks=hooks)
    start = engine.restore(resume=resume, weights=weights)
    if eval_only and start == 0 and not task.initial_weights:
        raise DinokitError(f"--eval-only found nothing trained to evaluate: {output_dir}/checkpoints holds no "
                           "checkpoint and MODEL.WEIGHTS is empty; give the --output-dir of a run (or MODEL.WEIGHTS=a "
                           "training checkpoint)")
    if on_restored is not None:
        on_restored()
    if eval_only:
        return engine.evaluate_only(start)

    def make_loader(start_iter: int):
        loader = build_train_loader(cfg, start_iteration=start_iter, pin_memory=device.type == "cuda")
        if du.is_main_process() and start_iter == start:  # images added to or removed from the folder: said
            note = data_change_note(output_dir, cfg.train.dataset_path, loader.dataset.base_dataset.paths,
                                    resumed=start > 0, decoding=decoding_settings())
            if note:
                print(note)
        return loader

    return engine.run(make_loader, start_iter=start, stop_after=stop_after)


def save_teacher_snapshot(model: SSLMetaArch, path: str | Path) -> None:
    """Write ``model``'s teacher as the official ``teacher_checkpoint.pth`` (collective under torchrun)."""
    from ..engine import save_export

    save_export(model.exports()[0], Path(path))
