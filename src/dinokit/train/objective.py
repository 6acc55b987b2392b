"""The DINOv2 objective: its heads and loss terms from a teacher's and a student's modules.

``SSLObjective`` computes the teacher's targets (centring or Sinkhorn-Knopp) and the student's DINO, KoLeo,
iBOT and Gram terms; the pretraining task (``ssl_meta_arch.SSLMetaArch``) and distillation
(``distill.task``) both build on it. Its only state is the losses' centres; it never calls backward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..engine.task import LossOutput
from ..layers import DINOHead
from ..losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss
from ..losses.chunked import chunked_dino_loss, chunked_ibot_loss
from ..losses.ibot_patch_loss import default_masks_weight
from ..models.packed import forward_features_packed, packed_block


def build_head(head_cfg, embed_dim: int) -> DINOHead:
    """A projection head from the ``dino.*`` or ``ibot.*`` keys (prototypes, hidden, bottleneck, layers)."""
    return DINOHead(
        embed_dim,
        head_cfg.head_n_prototypes,
        hidden_dim=head_cfg.head_hidden_dim,
        bottleneck_dim=head_cfg.head_bottleneck_dim,
        nlayers=head_cfg.head_nlayers,
    )


def ssl_heads(dino_cfg, ibot_cfg, embed_dim: int) -> dict[str, DINOHead]:
    """The heads of one student: ``dino_head`` (also iBOT's unless ``ibot.separate_head``), ``ibot_head``."""
    heads = {}
    if dino_cfg.loss_weight > 0 or ibot_cfg.loss_weight > 0:
        heads["dino_head"] = build_head(dino_cfg, embed_dim)
    if ibot_cfg.loss_weight > 0 and ibot_cfg.separate_head:
        heads["ibot_head"] = build_head(ibot_cfg, embed_dim)
    return heads


class SSLObjective:
    """The DINOv2 loss terms from a teacher's and a student's modules (shared by pretraining and distillation).

    A mixin: the class sets ``dino_loss``, ``koleo_loss``, ``ibot_patch_loss`` (their centres are the only
    state), the flags ``do_dino``, ``do_koleo``, ``do_ibot``, ``ibot_separate_head``, ``centering`` and the
    weights ``dino_weight``, ``koleo_weight``, ``ibot_weight``. Teacher and student are ``ModuleDict``s
    with ``backbone``, ``dino_head`` and optionally ``ibot_head``.
    """

    def configure_objective(self, dino, ibot, centering: str, gram=None, *, packed_crops: bool = False,
                            head_chunk_rows: int = 0) -> None:
        """Set the flags, weights and loss modules from the ``dino``, ``ibot`` (and ``gram``) sections and
        ``train.centering``; ``packed_crops`` and ``head_chunk_rows`` (``train.*``) choose how the student's
        forward and heads are computed (same values; see :meth:`student_losses`)."""
        self.packed_crops, self.head_chunk_rows = packed_crops, head_chunk_rows
        self.packed_block_fn = packed_block  # the trainer may swap in a compiled one (train.compile)
        self.dino_weight, self.koleo_weight, self.ibot_weight = dino.loss_weight, dino.koleo_loss_weight, ibot.loss_weight
        self.do_dino = dino.loss_weight > 0
        self.do_koleo = dino.koleo_loss_weight > 0
        self.do_ibot = ibot.loss_weight > 0
        self.ibot_separate_head = ibot.separate_head
        self.centering = centering
        self.dino_loss = DINOLoss(dino.head_n_prototypes)
        self.koleo_loss = KoLeoLoss(distributed=dino.koleo_loss_distributed, group_size=dino.koleo_loss_group_size)
        self.ibot_patch_loss = iBOTPatchLoss(ibot.head_n_prototypes if ibot.separate_head else dino.head_n_prototypes)
        self.ibot_masked_loss = self.ibot_patch_loss.forward_masked  # the trainer may swap in a compiled one
        # a Gram teacher runs when the loss is used or only logged (gram.compute_stats)
        self.do_gram = bool(gram is not None and (gram.use_loss or gram.compute_stats))
        if self.do_gram:
            self.gram_in_loss, self.gram_stats = gram.use_loss, gram.compute_stats
            self.gram_weight, self.gram_tokens = gram.loss_weight, gram.tokens_used
            self.gram_loss = GramLoss(normalized=gram.normalized, img_level=gram.img_level, remove_neg=gram.remove_neg,
                                      remove_only_teacher_neg=gram.remove_only_teacher_neg)

    @torch.no_grad()
    def teacher_probs(self, teacher: nn.ModuleDict, global_crops: torch.Tensor, patch_index: torch.Tensor,
                      n_patches: torch.Tensor, teacher_temp: float,
                      backbone_out: dict | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Teacher probabilities: DINO (2, B, K) with the two global views swapped, iBOT (n_patches, K) for the
        patch tokens at ``patch_index`` (flat indices into the (2B * N) global-crop tokens).
        ``backbone_out``: the teacher backbone's output on ``global_crops`` when already computed."""
        n_images = global_crops.shape[0] // 2
        out = backbone_out if backbone_out is not None else teacher.backbone(global_crops, is_training=True)
        cls = out["x_norm_clstoken"]  # (2B, D)
        cls = torch.cat((cls[n_images:], cls[:n_images]))  # [crop2; crop1]: each student view meets the other view
        masked_patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, patch_index)  # (n_masked, D)
        n_cls = cls.shape[0]
        if self.do_ibot and not self.ibot_separate_head:
            logits = teacher.dino_head(torch.cat((cls, masked_patches)))
            cls_logits, patch_logits = logits[:n_cls], logits[n_cls:]
        else:
            cls_logits = teacher.dino_head(cls) if self.do_dino else None
            patch_logits = teacher.ibot_head(masked_patches) if self.do_ibot else None

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
                    patch_logits, teacher_temp, n_masked_patches_tensor=n_patches
                )
        if dino_probs is not None:
            dino_probs = dino_probs.view(2, n_images, -1)  # (2, B, K)
        return dino_probs, ibot_probs

    def student_losses(
        self,
        student: nn.ModuleDict,
        *,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None,
        student_masks: torch.Tensor | None,
        patch_index: torch.Tensor,
        ibot_masks_flat: torch.Tensor,
        masks_weight: torch.Tensor | None,
        dino_probs: torch.Tensor | None,
        ibot_probs: torch.Tensor | None,
        freeze_backbone: bool = False,
        gram_targets: torch.Tensor | None = None,
        gram_weight: float | None = None,
        dino_local_weight: float | None = None,
    ) -> LossOutput:
        """All loss terms of one student against the teacher's probabilities; no backward.

        ``student_masks`` masks the student's global-crop input (iBOT pretraining) or is None (distillation);
        the iBOT loss compares the student's tokens at ``patch_index`` with ``ibot_probs``, weighted per image
        by ``masks_weight`` (default: 1 / the selected tokens of the row's image, from ``ibot_masks_flat``).
        ``freeze_backbone`` runs the backbone without gradients (head warm-up). ``gram_targets``: the Gram
        teacher's (2B, N, D) patch features of the global crops (Gram anchoring; logged as 0 when None), weighted
        by ``gram_weight`` (this iteration's value of ``gram.loss_weight_schedule``; None: ``gram.loss_weight``).
        ``dino_local_weight`` (DINOv3's ``dino.local_loss_weight_schedule`` value; None: 1) scales the local-crop
        DINO term in the minimised loss; its logged term stays unweighted, as DINOv3 logs it.
        """
        n_images = global_crops.shape[0] // 2
        n_local = local_crops.shape[0] // n_images if local_crops is not None else 0
        crops = [global_crops]
        masks = [student_masks]
        if n_local:
            crops.append(local_crops)
            masks.append(None)
        with torch.no_grad() if freeze_backbone else contextlib.nullcontext():
            if self.packed_crops and len(crops) > 1:
                outs = forward_features_packed(student.backbone, crops, masks, block_fn=self.packed_block_fn)
            else:
                outs = student.backbone(crops, masks=masks, is_training=True)
        global_out = outs[0]
        global_cls = global_out["x_norm_clstoken"]  # (2B, D)
        local_cls = outs[1]["x_norm_clstoken"] if n_local else global_cls[:0]  # (n_l*B, D)
        masked_patches = global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, patch_index)

        # One head call over [local cls; global cls; (masked patches)] when the heads are shared.
        n_l_rows, n_g_rows = local_cls.shape[0], global_cls.shape[0]
        student_patch_logits = None
        chunked = self.head_chunk_rows > 0  # then the heads run inside the chunked losses below
        if not chunked and self.do_ibot and not self.ibot_separate_head:
            logits = student.dino_head(torch.cat((local_cls, global_cls, masked_patches)))
            local_logits, global_logits = logits[:n_l_rows], logits[n_l_rows : n_l_rows + n_g_rows]
            student_patch_logits = logits[n_l_rows + n_g_rows :]
        elif not chunked:
            if self.do_dino:
                logits = student.dino_head(torch.cat((local_cls, global_cls)))
                local_logits, global_logits = logits[:n_l_rows], logits[n_l_rows:]
            if self.do_ibot:
                student_patch_logits = student.ibot_head(masked_patches)

        n_global_terms = 2  # (n_global_crops - 1) * n_global_crops
        n_local_terms = max(n_local * 2, 1)
        denom = n_global_terms + n_local_terms
        loss_scales = 2
        terms: dict[str, torch.Tensor] = {}
        total = global_cls.new_zeros(())
        if self.do_dino:
            if n_local:
                if chunked:
                    local_loss = self._chunked_dino(student, list(local_cls.chunk(n_local)), list(dino_probs.unbind(0)))
                else:
                    local_loss = self.dino_loss(list(local_logits.chunk(n_local)), list(dino_probs.unbind(0)))
                local_loss = local_loss / denom
                terms["dino_local_crops_loss"] = local_loss
                local_weight = 1.0 if dino_local_weight is None else dino_local_weight  # DINOv3's reweighting
                total = total + self.dino_weight * local_weight * local_loss
            if chunked:
                global_loss = self._chunked_dino(student, [global_cls], [dino_probs.flatten(0, 1)])
            else:
                global_loss = self.dino_loss([global_logits], [dino_probs.flatten(0, 1)])
            global_loss = global_loss * loss_scales / denom
            terms["dino_global_crops_loss"] = global_loss
            total = total + self.dino_weight * global_loss
        if self.do_koleo:
            koleo = self.koleo_weight * sum(self.koleo_loss(p) for p in global_cls.chunk(2))
            terms["koleo_loss"] = koleo / loss_scales
            total = total + koleo
        if self.do_ibot:
            if chunked:
                ibot = self._chunked_ibot(student, masked_patches, ibot_probs, ibot_masks_flat, masks_weight)
            else:
                # n_masked_patches=None: the rows are exactly the selected tokens (index_select, never padded),
                # and slicing by a device tensor would make the host wait for the device every step
                ibot = self.ibot_masked_loss(
                    student_patch_logits,
                    ibot_probs,
                    student_masks_flat=ibot_masks_flat,
                    n_masked_patches=None,
                    masks_weight=masks_weight,
                )
            ibot = ibot * loss_scales * 0.5  # x loss_scales x 1/n_global_crops, as the official code
            terms["ibot_loss"] = ibot / loss_scales
            total = total + self.ibot_weight * ibot
        logged_only: dict[str, torch.Tensor] = {}  # gram.compute_stats: terms outside the loss and its logged total
        if self.do_gram:
            gram, stats = self._gram_terms(global_out["x_norm_patchtokens"], gram_targets, ibot_masks_flat,
                                           patch_index, total.new_zeros(()))
            if self.gram_in_loss:
                total = total + (self.gram_weight if gram_weight is None else gram_weight) * gram
                terms["gram_loss"] = gram
            else:
                stats["gram_loss"] = gram
            logged_only = stats
        # the official log's total_loss: the sum of the logged terms (not the minimised loss)
        logged_total = sum(terms.values(), total.new_zeros(()))
        return LossOutput(total=total, terms={**terms, **logged_only}, logged_total=logged_total)

    def _chunked_dino(self, student: nn.ModuleDict, tokens: list[torch.Tensor], probs: list[torch.Tensor]) -> torch.Tensor:
        """``self.dino_loss`` of ``dino_head(tokens)``, ``head_chunk_rows`` rows of logits at a time."""
        return chunked_dino_loss(student.dino_head, tokens, probs, student_temp=self.dino_loss.student_temp,
                                 chunk_rows=self.head_chunk_rows)

    def _chunked_ibot(self, student: nn.ModuleDict, patches: torch.Tensor, probs: torch.Tensor, masks: torch.Tensor,
                      masks_weight: torch.Tensor | None) -> torch.Tensor:
        """``ibot_patch_loss.forward_masked`` of the iBOT head on ``patches``, ``head_chunk_rows`` rows at a time."""
        if masks_weight is None:
            masks_weight = default_masks_weight(masks)  # forward_masked's default
        head = student.ibot_head if self.ibot_separate_head else student.dino_head
        return chunked_ibot_loss(head, patches, probs, masks_weight, masks.shape[0],
                                 student_temp=self.ibot_patch_loss.student_temp, chunk_rows=self.head_chunk_rows)

    def _gram_terms(self, student: torch.Tensor, teacher: torch.Tensor | None, masks: torch.Tensor,
                    masked_index: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The Gram loss over ``gram.tokens_used`` (with gradients when it is part of the loss) and, with
        ``gram.compute_stats``, its values over the masked and the unmasked patches (no gradients); zeros before the
        Gram teacher is loaded (``teacher`` None), so that every iteration logs the same terms."""
        stats = {"gram_loss_masked": zero, "gram_loss_unmasked": zero} if self.gram_stats else {}
        if teacher is None:
            return zero, stats
        with torch.enable_grad() if self.gram_in_loss else torch.no_grad():
            gram = self.gram_loss(*self._gram_tokens(student, teacher, masks, masked_index, self.gram_tokens))
        with torch.no_grad():
            for which in stats:
                stats[which] = self.gram_loss(*self._gram_tokens(student, teacher, masks, masked_index,
                                                                 which.removeprefix("gram_loss_")))
        return gram, stats

    def _gram_tokens(self, student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor,
                     masked_index: torch.Tensor, tokens: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The student and teacher patch features the Gram loss compares: ``tokens`` all, masked or unmasked.

        Rows are picked by index, never by a boolean mask: ``masked_index`` (the collate's flat indices of the
        masked patches) has a size the host knows, and the unmasked rows are the first ``numel - len(masked_index)``
        of a stable sort of the mask, so the host never waits for the device to learn how many rows there are.
        """
        if tokens == "all":
            return student, teacher
        if tokens == "masked":
            rows = masked_index
        else:
            flat = masks.flatten()
            rows = torch.argsort(flat.to(torch.uint8), stable=True)[: flat.numel() - masked_index.numel()]
        return student.flatten(0, 1).index_select(0, rows), teacher.flatten(0, 1).index_select(0, rows)
