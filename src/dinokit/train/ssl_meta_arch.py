"""DINOv2's self-supervised meta-architecture: student, EMA teacher and heads, trained on the DINOv2 objective.

``SSLMetaArch`` is the pretraining :class:`~dinokit.engine.Task`: ``compute_losses`` turns one collated
batch into the total loss and the logged terms (the terms themselves: ``objective.SSLObjective``),
``after_step`` updates the EMA teacher. It never calls backward and knows nothing about distributed wrapping:
the engine owns the optimisation and applies sharding and compilation to the modules declared here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from ..config import backbone_from_config, backbone_img_size
from ..engine.task import Export, LossOutput, Task, ema_update
from ..losses.gram_loss import resize_patch_features
from ..models.weight_files import load_state_dict_file
from .health import CollapseCheck, teacher_health
from .objective import SSLObjective, build_head, ssl_heads
from .weights import (
    chunked_backbone_keys,
    load_pretrained_backbone,
    load_teacher_heads,
    teacher_checkpoint_path,
)

__all__ = ["SSLMetaArch", "SSLObjective", "build_head", "ssl_heads"]


class SSLMetaArch(SSLObjective, Task):
    """Student and teacher (same architecture) with DINO and optional separate iBOT heads, plus the losses.

    Built from the config's ``student``, ``dino``, ``ibot``, ``gram``, ``crops`` and ``train.centering`` sections
    (and the head warm-up length ``train.freeze_backbone_epochs``).

    Later stages start from earlier weights: ``student.pretrained_weights`` gives both backbones (the heads
    start fresh, usually with a head warm-up: the backbone runs without gradients for the first
    ``train.freeze_backbone_epochs``); ``student.resume_from_teacher_chkpt`` gives backbones and heads from a
    finished run's teacher (e.g. a high-resolution stage). Position embeddings are resized to the crop size.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        dino, ibot, gram = cfg.dino, cfg.ibot, cfg.gram
        self.configure_objective(dino, ibot, cfg.train.centering, gram, packed_crops=cfg.train.packed_crops,
                                 head_chunk_rows=cfg.train.head_chunk_rows)
        self.block_chunks = cfg.student.block_chunks
        self.freeze_backbone_iters = cfg.train.freeze_backbone_epochs * cfg.train.OFFICIAL_EPOCH_LENGTH

        backbone = backbone_from_config(cfg.student, img_size=backbone_img_size(cfg.crops), training=True)
        heads = ssl_heads(dino, ibot, backbone.embed_dim)
        if cfg.student.pretrained_weights:
            load_pretrained_backbone(backbone, cfg.student.pretrained_weights)
            self.initial_weights = f"the backbone {cfg.student.pretrained_weights} (new heads)"
        if cfg.student.resume_from_teacher_chkpt:
            path = teacher_checkpoint_path(cfg.student.resume_from_teacher_chkpt)
            checkpoint = load_state_dict_file(path)
            load_pretrained_backbone(backbone, str(path), checkpoint)
            load_teacher_heads(heads, checkpoint, str(path), ibot=ibot.loss_weight > 0)
            self.initial_weights = f"the teacher {path} (backbone and heads)"
        if not self.do_ibot:
            backbone.mask_token.requires_grad_(False)  # no masking without iBOT: it would get no gradient
        self.student = nn.ModuleDict({"backbone": backbone, **heads})
        # The teacher starts as an exact copy of the student, without drop path, and never gets gradients.
        self.teacher = copy.deepcopy(self.student)
        for blk in self.teacher.backbone.blocks:
            blk.drop_path_rate = 0.0
        self.teacher.requires_grad_(False)
        self._configure_gram_teacher(gram)
        # collapse is looked for after the lr warm-up (the targets may be near-uniform in the first steps)
        self.collapse_check = CollapseCheck(dino.head_n_prototypes,
                                            start=cfg.optim.warmup_epochs * cfg.train.OFFICIAL_EPOCH_LENGTH,
                                            centering=cfg.train.centering)

    def _configure_gram_teacher(self, gram) -> None:
        """A separate Gram teacher (a copy of the teacher backbone) unless the EMA teacher plays the part."""
        self.gram_load_iteration = 0  # the loss acts from this iteration on
        self.gram_teacher = None
        if not self.do_gram:
            return
        self.gram_cfg = gram
        if gram.ema_teacher:
            return
        self.gram_teacher = copy.deepcopy(self.teacher.backbone)
        if gram.ckpt:
            load_pretrained_backbone(self.gram_teacher, gram.ckpt)
        else:
            self.gram_load_iteration = gram.it_load_ema_teacher

    def gram_refreshes(self, iteration: int) -> bool:
        """Whether the Gram teacher is refreshed from the EMA teacher after ``iteration`` (DINOv3's rule)."""
        g = self.gram_cfg
        step = iteration + 1
        if self.gram_teacher is None or not g.rep_update or step < g.it_first_update or step % g.update_frequency:
            return False
        if step <= self.gram_load_iteration:
            return False  # not loaded yet: nothing to refresh
        earlier = sum(1 for m in range(g.update_frequency, step, g.update_frequency)
                      if m >= g.it_first_update and m > self.gram_load_iteration)
        return g.max_updates is None or earlier < g.max_updates

    @torch.no_grad()
    def copy_teacher_to_gram(self) -> None:
        """Gram teacher <- EMA teacher backbone, exactly (sharded or not), on the parameters themselves (see
        :func:`dinokit.engine.ema_update`)."""
        for gram, ema in zip(self.gram_teacher.parameters(), self.teacher.backbone.parameters()):
            gram.copy_(ema)  # rare (each refresh); DTensors have no foreach copy


    # ------------------------------------------------------------------ the Task contract
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {f"student.{name}": module for name, module in self.student.items()}

    def inference_modules(self) -> dict[str, nn.Module]:
        modules = {f"teacher.{name}": module for name, module in self.teacher.items()}
        if self.gram_teacher is not None:
            modules["gram_teacher"] = self.gram_teacher
        return modules

    def exports(self) -> list[Export]:
        """The teacher, in the official ``teacher_checkpoint.pth`` layout (chunked keys when block_chunks > 0)."""
        depth = self.teacher.backbone.n_blocks
        return [Export(self.teacher, layout=lambda sd: chunked_backbone_keys(sd, depth, self.block_chunks))]

    def batch_size(self, batch) -> int:
        return batch.global_crops.shape[0] // 2

    def after_step(self, iteration: int, sched: Mapping[str, float]) -> None:
        self.update_teacher(sched["momentum"])
        if self.do_gram and self.gram_refreshes(iteration):
            self.copy_teacher_to_gram()

    # ------------------------------------------------------------------ losses
    def compute_losses(self, batch, iteration: int, sched: Mapping[str, float]) -> LossOutput:
        """All DINOv2 loss terms for one batch, at this iteration's teacher temperature; no backward."""
        teacher_out = gram_targets = None
        if self.do_gram and iteration >= self.gram_load_iteration:
            with torch.no_grad():
                if self.gram_teacher is None:  # the EMA teacher is the Gram teacher: one forward for both
                    teacher_out = self.teacher.backbone(batch.global_crops, is_training=True)
                    gram_targets = teacher_out["x_norm_patchtokens"]
                else:
                    if iteration == self.gram_load_iteration and not self.gram_cfg.ckpt:
                        self.copy_teacher_to_gram()  # gram.it_load_ema_teacher reached
                    gram_targets = self._gram_teacher_patches(batch)
        dino_probs, ibot_probs = self.teacher_probs(
            self.teacher, batch.global_crops, batch.mask_indices, batch.n_masked_patches, sched["teacher_temp"],
            backbone_out=teacher_out,
        )
        out = self.student_losses(
            self.student, global_crops=batch.global_crops, local_crops=batch.local_crops,
            student_masks=batch.masks if self.do_ibot else None, patch_index=batch.mask_indices,
            ibot_masks_flat=batch.masks, masks_weight=batch.masks_weight,
            dino_probs=dino_probs, ibot_probs=ibot_probs,
            freeze_backbone=iteration < self.freeze_backbone_iters, gram_targets=gram_targets,
            gram_weight=sched.get("gram_weight"), dino_local_weight=sched.get("dino_local_loss_weight"),
        )
        if dino_probs is not None:
            out.terms.update(teacher_health(dino_probs))
        return out

    def _gram_teacher_patches(self, batch) -> torch.Tensor:
        """The Gram teacher's (2B, N, D) patch features of the global crops; from their high-resolution versions
        (``crops.gram_teacher_crops_size``) resized to the student's grid when the batch has them."""
        if batch.gram_crops is None:
            return self.gram_teacher(batch.global_crops, is_training=True)["x_norm_patchtokens"]
        patches = self.gram_teacher(batch.gram_crops, is_training=True)["x_norm_patchtokens"]
        grid = batch.global_crops.shape[-1] // self.teacher.backbone.patch_size
        return resize_patch_features(patches, grid, mode=self.gram_cfg.global_teacher_resize_method,
                                     antialias=self.gram_cfg.global_teacher_resize_antialias)

    def diagnose(self, record: Mapping[str, float], iteration: int) -> str | None:
        return self.collapse_check(record, iteration) if self.do_dino else None

    # ------------------------------------------------------------------ EMA
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student over every parameter (sharded or not)."""
        ema_update(self.teacher, self.student, momentum)
