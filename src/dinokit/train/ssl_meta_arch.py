"""DINOv2's self-supervised meta-architecture: student, EMA teacher, heads, and the loss computation.

``SSLMetaArch.compute_losses`` turns one collated batch into the total loss and the logged terms
(spec §1.6). It never calls backward and knows nothing about distributed wrapping: the training
loop (``train/train.py``) owns the optimisation, ``distributed/parallelize.py`` the sharding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import DINOHead
from ..losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from ..models import DinoVisionTransformer, build_backbone
from ..models.checkpoint import (
    backbone_state_dict_from_checkpoint,
    load_backbone_weights,
    load_state_dict_file,
    resize_pos_embed,
)


def build_student_backbone(student_cfg, *, img_size: int, only_teacher: bool = False) -> DinoVisionTransformer:
    """The backbone described by the official ``student.*`` keys (drop path only for the student)."""
    kwargs = dict(
        img_size=img_size,
        patch_size=student_cfg.patch_size,
        init_values=student_cfg.layerscale,
        ffn_layer=student_cfg.ffn_layer,
        qkv_bias=student_cfg.qkv_bias,
        proj_bias=student_cfg.proj_bias,
        ffn_bias=student_cfg.ffn_bias,
        num_register_tokens=student_cfg.num_register_tokens,
        interpolate_offset=student_cfg.interpolate_offset,
        interpolate_antialias=student_cfg.interpolate_antialias,
    )
    if not only_teacher:
        kwargs.update(drop_path_rate=student_cfg.drop_path_rate, drop_path_uniform=student_cfg.drop_path_uniform)
    return build_backbone(student_cfg.arch, **kwargs)


def build_head(head_cfg, embed_dim: int) -> DINOHead:
    """A projection head from the ``dino.*`` or ``ibot.*`` keys (prototypes, hidden, bottleneck, layers)."""
    return DINOHead(
        embed_dim,
        head_cfg.head_n_prototypes,
        hidden_dim=head_cfg.head_hidden_dim,
        bottleneck_dim=head_cfg.head_bottleneck_dim,
        nlayers=head_cfg.head_nlayers,
    )


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]  # logged values, official names


class SSLMetaArch(nn.Module):
    """Student and teacher (same architecture) with DINO and optional separate iBOT heads, plus the losses."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = cfg.ibot.separate_head
        self.centering = cfg.train.centering

        backbone = build_student_backbone(cfg.student, img_size=cfg.crops.global_crops_size)
        if cfg.student.pretrained_weights:
            # Unlike the official (non-strict, {"model": ...} files only): any backbone layout, strict, with the
            # position embedding resized to the training grid.
            sd = backbone_state_dict_from_checkpoint(load_state_dict_file(cfg.student.pretrained_weights))
            load_backbone_weights(backbone, resize_pos_embed(sd, backbone.patch_embed.num_patches))
        embed_dim = backbone.embed_dim
        student = {"backbone": backbone}
        if self.do_dino or self.do_ibot:
            student["dino_head"] = build_head(cfg.dino, embed_dim)
        if self.do_ibot and self.ibot_separate_head:
            student["ibot_head"] = build_head(cfg.ibot, embed_dim)
        self.student = nn.ModuleDict(student)
        # The teacher starts as an exact copy of the student, without drop path, and never gets gradients.
        self.teacher = copy.deepcopy(self.student)
        for blk in self.teacher.backbone.blocks:
            blk.drop_path_rate = 0.0
        self.teacher.requires_grad_(False)

        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.koleo_loss = KoLeoLoss()
        ibot_k = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_k)

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()  # the teacher never uses drop path
        return self

    # ------------------------------------------------------------------ teacher targets
    @torch.no_grad()
    def teacher_targets(self, batch, teacher_temp: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Teacher probabilities: DINO (2, B, K) with the two global views swapped, iBOT (n_masked, K)."""
        n_images = batch.global_crops.shape[0] // 2
        out = self.teacher.backbone(batch.global_crops, is_training=True)
        cls = out["x_norm_clstoken"]  # (2B, D)
        cls = torch.cat((cls[n_images:], cls[:n_images]))  # [crop2; crop1]: each student view meets the other view
        masked_patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch.mask_indices)  # (n_masked, D)
        n_cls = cls.shape[0]
        if self.do_ibot and not self.ibot_separate_head:
            logits = self.teacher.dino_head(torch.cat((cls, masked_patches)))
            cls_logits, patch_logits = logits[:n_cls], logits[n_cls:]
        else:
            cls_logits = self.teacher.dino_head(cls) if self.do_dino else None
            patch_logits = self.teacher.ibot_head(masked_patches) if self.do_ibot else None

        dino_probs = ibot_probs = None
        if self.centering == "centering":
            if cls_logits is not None:
                dino_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
                self.dino_loss.update_center(cls_logits)
            if self.do_ibot:
                ibot_probs = self.ibot_patch_loss.softmax_center_teacher(patch_logits.unsqueeze(0), teacher_temp)[0]
                self.ibot_patch_loss.update_center(patch_logits.unsqueeze(0))
        else:  # sinkhorn_knopp
            if cls_logits is not None:
                dino_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            if self.do_ibot:
                ibot_probs = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    patch_logits, teacher_temp, n_masked_patches_tensor=batch.n_masked_patches
                )
        if dino_probs is not None:
            dino_probs = dino_probs.view(2, n_images, -1)  # (2, B, K)
        return dino_probs, ibot_probs

    # ------------------------------------------------------------------ losses
    def compute_losses(self, batch, teacher_temp: float) -> LossOutput:
        """All DINOv2 loss terms for one batch (spec §1.6); no backward."""
        cfg = self.cfg
        n_images = batch.global_crops.shape[0] // 2
        n_local = batch.local_crops.shape[0] // n_images if batch.local_crops is not None else 0
        dino_probs, ibot_probs = self.teacher_targets(batch, teacher_temp)

        crops = [batch.global_crops]
        masks = [batch.masks if self.do_ibot else None]
        if n_local:
            crops.append(batch.local_crops)
            masks.append(None)
        outs = self.student.backbone(crops, masks=masks, is_training=True)
        global_out = outs[0]
        global_cls = global_out["x_norm_clstoken"]  # (2B, D)
        local_cls = outs[1]["x_norm_clstoken"] if n_local else global_cls[:0]  # (n_l*B, D)
        masked_patches = global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch.mask_indices)

        # One head call over [local cls; global cls; (masked patches)] when the heads are shared.
        n_l_rows, n_g_rows = local_cls.shape[0], global_cls.shape[0]
        student_patch_logits = None
        if self.do_ibot and not self.ibot_separate_head:
            logits = self.student.dino_head(torch.cat((local_cls, global_cls, masked_patches)))
            local_logits, global_logits = logits[:n_l_rows], logits[n_l_rows : n_l_rows + n_g_rows]
            student_patch_logits = logits[n_l_rows + n_g_rows :]
        else:
            if self.do_dino:
                logits = self.student.dino_head(torch.cat((local_cls, global_cls)))
                local_logits, global_logits = logits[:n_l_rows], logits[n_l_rows:]
            if self.do_ibot:
                student_patch_logits = self.student.ibot_head(masked_patches)

        n_global_terms = 2  # (n_global_crops - 1) * n_global_crops
        n_local_terms = max(n_local * 2, 1)
        denom = n_global_terms + n_local_terms
        loss_scales = 2
        terms: dict[str, torch.Tensor] = {}
        total = global_cls.new_zeros(())
        if self.do_dino:
            if n_local:
                local_loss = self.dino_loss(list(local_logits.chunk(n_local)), list(dino_probs.unbind(0))) / denom
                terms["dino_local_crops_loss"] = local_loss
                total = total + cfg.dino.loss_weight * local_loss
            global_loss = self.dino_loss([global_logits], [dino_probs.flatten(0, 1)]) * loss_scales / denom
            terms["dino_global_crops_loss"] = global_loss
            total = total + cfg.dino.loss_weight * global_loss
        if self.do_koleo:
            koleo = cfg.dino.koleo_loss_weight * sum(self.koleo_loss(p) for p in global_cls.chunk(2))
            terms["koleo_loss"] = koleo / loss_scales
            total = total + koleo
        if self.do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(
                student_patch_logits,
                ibot_probs,
                student_masks_flat=batch.masks,
                n_masked_patches=batch.n_masked_patches,
                masks_weight=batch.masks_weight,
            )
            ibot = ibot * loss_scales * 0.5  # x loss_scales x 1/n_global_crops, as the official code
            terms["ibot_loss"] = ibot / loss_scales
            total = total + cfg.ibot.loss_weight * ibot
        return LossOutput(total=total, terms=terms)

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student over every parameter (sharded or not)."""
        student = [p.data for p in self.student.parameters()]
        teacher = [p.data for p in self.teacher.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)
