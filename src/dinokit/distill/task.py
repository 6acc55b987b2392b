"""Distillation as a training :class:`~dinokit.engine.Task`: one frozen teacher, one or several students.

The DINOv2 paper's recipe (``distillation.loss=dino_ibot``): "the same training loop with a few
exceptions": the teacher is a larger, **frozen** model whose DINO and iBOT heads give the targets
(centring or Sinkhorn-Knopp, as ``train.centering`` says); each student has its own heads with the
teacher's prototype counts; the students' inputs are **not masked**; the iBOT loss covers **all patch
tokens of both global crops** (``distillation.ibot_positions=masked``: DINOv3's random subset, chosen
by the mask generator, student still unmasked); KoLeo and the DINO loss over all crop pairs are those
of pretraining. A **spare EMA of each student**, which never feeds back into training, is what
snapshots export and what users evaluate. Stochastic depth is whatever ``student.drop_path_rate``
says: the distillation presets set it to 0, as the paper does.

``distillation.loss=features`` distils a head-less teacher (e.g. an official backbone file): each
student's normalised class and patch tokens, through a learned linear projection where the widths
differ, are pulled to the teacher's with a cosine or smooth-L1 loss.

The teacher runs once per batch for all students, on the global crops only, without gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import backbone_from_config, backbone_img_size
from ..engine.task import Export, LossOutput, Task, ema_update
from ..errors import DinokitError
from ..train.objective import SSLObjective, ssl_heads
from ..train.weights import load_pretrained_backbone


def feature_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over tokens of ``1 - cos(student, teacher)`` (``cosine``) or of the smooth-L1 distance."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return F.smooth_l1_loss(student.float(), teacher.float())


def check_compatible(cfg, teacher_cfg, students: Mapping[str, object], teacher_patch_size: int) -> None:
    """One-line errors for what must match between teacher and students (the key to change in each)."""
    for name, student in students.items():
        who = f"student {name!r}" if name else "the student"
        if student.patch_size != teacher_patch_size:
            key = f"distillation.students[].patch_size of {name!r}" if name else "student.patch_size"
            raise DinokitError(f"{who} has patch size {student.patch_size} but the teacher {teacher_patch_size}; "
                               f"set {key}={teacher_patch_size}")
    if teacher_cfg is None or cfg.distillation.loss != "dino_ibot":
        return
    t_dino, t_ibot, s_dino, s_ibot = teacher_cfg.dino, teacher_cfg.ibot, cfg.dino, cfg.ibot
    if s_ibot.loss_weight > 0 and s_ibot.separate_head != t_ibot.separate_head:
        raise DinokitError(f"the teacher has {'a separate' if t_ibot.separate_head else 'no separate'} iBOT head; "
                           f"set ibot.separate_head={str(t_ibot.separate_head).lower()}")
    if s_dino.head_n_prototypes != t_dino.head_n_prototypes:
        raise DinokitError(f"the students' DINO head has {s_dino.head_n_prototypes} prototypes but the teacher's "
                           f"{t_dino.head_n_prototypes}; set dino.head_n_prototypes={t_dino.head_n_prototypes}")
    if s_ibot.loss_weight > 0 and s_ibot.separate_head and s_ibot.head_n_prototypes != t_ibot.head_n_prototypes:
        raise DinokitError(f"the students' iBOT head has {s_ibot.head_n_prototypes} prototypes but the teacher's "
                           f"{t_ibot.head_n_prototypes}; set ibot.head_n_prototypes={t_ibot.head_n_prototypes}")
    for loss, weight, has in (("dino", s_dino.loss_weight, t_dino.loss_weight > 0 or t_ibot.loss_weight > 0),
                              ("ibot", s_ibot.loss_weight, t_ibot.loss_weight > 0)):
        if weight > 0 and not has:
            raise DinokitError(f"the teacher was trained without the {loss} loss, so it has no head for it; "
                               f"set {loss}.loss_weight=0")


class DistillationTask(SSLObjective, Task):
    """Frozen ``teacher`` (a ``ModuleDict`` from :func:`~dinokit.distill.teacher.build_teacher`) into ``students``
    (name -> ``student`` section; the single student of a plain run has the name "")."""

    def __init__(self, cfg, *, teacher: nn.ModuleDict, students: Mapping[str, object]) -> None:
        super().__init__()
        dist = cfg.distillation
        self.loss_kind, self.ibot_positions = dist.loss, dist.ibot_positions
        self.feature_loss, self.feature_patch_weight = dist.feature_loss, dist.feature_patch_weight
        dino, ibot = cfg.dino, cfg.ibot
        self.configure_objective(dino, ibot, cfg.train.centering, packed_crops=cfg.train.packed_crops,
                                 head_chunk_rows=cfg.train.head_chunk_rows)

        self.teacher = teacher.requires_grad_(False)
        t_dim = teacher.backbone.embed_dim
        built = {}
        for name, section in students.items():
            backbone = backbone_from_config(section, img_size=backbone_img_size(cfg.crops), training=True)
            if section.pretrained_weights:
                load_pretrained_backbone(backbone, section.pretrained_weights)
                loaded = f"{f'student {name}' if name else 'the student'}'s backbone {section.pretrained_weights}"
                self.initial_weights = f"{self.initial_weights}, {loaded}" if self.initial_weights else loaded
            backbone.mask_token.requires_grad_(False)  # students are never masked: it would get no gradient
            if self.loss_kind == "features":
                s_dim = backbone.embed_dim
                parts = {"backbone": backbone, "projection": nn.Linear(s_dim, t_dim) if s_dim != t_dim else nn.Identity()}
            else:
                parts = {"backbone": backbone, **ssl_heads(dino, ibot, backbone.embed_dim)}
            built[name or "student"] = nn.ModuleDict(parts)
        self.students = nn.ModuleDict(built)
        self.subdirs = {key: name for key, name in zip(built, students)}  # module key -> output subfolder
        # The spare EMA of each student: starts as its copy, without drop path, and never feeds back.
        self.student_emas = copy.deepcopy(self.students)
        for ema in self.student_emas.values():
            for blk in ema.backbone.blocks:
                blk.drop_path_rate = 0.0
        self.student_emas.requires_grad_(False)

    # ------------------------------------------------------------------ the Task contract
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {f"{key}.{part}": m for key, student in self.students.items() for part, m in student.items()}

    def inference_modules(self) -> dict[str, nn.Module]:
        teacher = {f"teacher.{part}": m for part, m in self.teacher.items()}
        # each EMA student by its parts, as the teacher: FSDP2 shards modules that have a forward, not a ModuleDict
        emas = {f"{key}.ema.{part}": m for key, ema in self.student_emas.items() for part, m in ema.items()}
        return {**teacher, **emas}

    def frozen_modules(self) -> tuple[str, ...]:
        return ("teacher",)  # reloaded from its file at every start: not in checkpoints

    def exports(self) -> list[Export]:
        return [Export(self.student_emas[key], subdir=self.subdirs[key]) for key in self.students]

    def batch_size(self, batch) -> int:
        return batch.global_crops.shape[0] // 2

    def after_step(self, iteration: int, sched: Mapping[str, float]) -> None:
        """student EMA <- m * EMA + (1 - m) * student, with the ``momentum`` schedule."""
        for key, student in self.students.items():
            ema_update(self.student_emas[key], student, sched["momentum"])

    # ------------------------------------------------------------------ losses
    def compute_losses(self, batch, iteration: int, sched: Mapping[str, float]) -> LossOutput:
        if self.loss_kind == "features":
            with torch.no_grad():  # one teacher forward per batch, whatever the number of students
                out = self.teacher.backbone(batch.global_crops, is_training=True)
            targets = (out["x_norm_clstoken"], out["x_norm_patchtokens"])
            outs = {key: self._feature_losses(student, batch, targets) for key, student in self.students.items()}
        else:
            outs = self._ssl_losses(batch, sched["teacher_temp"], sched.get("dino_local_loss_weight"))
        if len(outs) == 1:
            return next(iter(outs.values()))
        total = sum(out.total for out in outs.values())  # independent students: each gets its own gradient
        terms = {f"{self.subdirs[key]}/{name}": value for key, out in outs.items() for name, value in out.terms.items()}
        logged = None if all(out.logged_total is None for out in outs.values()) else sum(o.logged for o in outs.values())
        return LossOutput(total=total, terms=terms, logged_total=logged)

    def _ssl_losses(self, batch, teacher_temp: float, local_weight: float | None = None) -> dict[str, LossOutput]:
        global_crops = batch.global_crops
        if self.ibot_positions == "all":  # every patch token of both global crops
            masks_flat = torch.ones_like(batch.masks)
            patch_index = torch.arange(masks_flat.numel(), device=masks_flat.device)
            n_patches = torch.tensor(masks_flat.numel(), device=masks_flat.device)
            # 1 / N for each token (computed here: the loss's default selects by the mask, a host sync)
            masks_weight = torch.full((masks_flat.numel(),), 1.0 / masks_flat.shape[1], device=masks_flat.device)
        else:  # DINOv3: the positions the mask generator chose
            masks_flat, patch_index = batch.masks, batch.mask_indices
            n_patches, masks_weight = batch.n_masked_patches, batch.masks_weight
        dino_probs, ibot_probs = self.teacher_probs(self.teacher, global_crops, patch_index, n_patches, teacher_temp)
        return {
            key: self.student_losses(
                student, global_crops=global_crops, local_crops=batch.local_crops, student_masks=None,
                patch_index=patch_index, ibot_masks_flat=masks_flat, masks_weight=masks_weight,
                dino_probs=dino_probs, ibot_probs=ibot_probs, dino_local_weight=local_weight,
            )
            for key, student in self.students.items()
        }

    def _feature_losses(self, student: nn.ModuleDict, batch, targets: tuple[torch.Tensor, torch.Tensor]) -> LossOutput:
        t_cls, t_patch = targets
        out = student.backbone(batch.global_crops, is_training=True)
        s_cls, s_patch = student.projection(out["x_norm_clstoken"]), student.projection(out["x_norm_patchtokens"])
        if s_patch.shape[1] != t_patch.shape[1]:
            raise DinokitError(f"the student sees {s_patch.shape[1]} patches per crop and the teacher {t_patch.shape[1]}; "
                               "use the teacher's patch size for the students")
        cls_loss = feature_distillation_loss(s_cls, t_cls, self.feature_loss)
        patch_loss = feature_distillation_loss(s_patch, t_patch, self.feature_loss)
        total = cls_loss + self.feature_patch_weight * patch_loss
        return LossOutput(total=total, terms={"feature_cls_loss": cls_loss, "feature_patch_loss": patch_loss})
