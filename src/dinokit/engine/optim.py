"""Optimiser, per-parameter-group multipliers and the precomputed training schedules.

Schedules are data: every per-iteration value (lr, weight decay, teacher momentum, teacher
temperature, last-layer lr) is precomputed as an array by :func:`build_schedulers`. The optimiser's
parameter groups carry constant multipliers (layer-wise lr decay, patch-embedding lr, weight-decay
exemption, last-layer flag) from :func:`get_param_groups`, and :func:`apply_optim_schedule` combines
the two at each step::

    groups = [g for m in student.values() for g in get_param_groups(m, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)]
    optimizer = build_optimizer(groups)
    schedules = build_schedulers(ScheduleConfig.from_config(cfg))
    for it in range(max_iter):
        apply_optim_schedule(optimizer, lr=schedules["lr"][it], wd=schedules["wd"][it],
                             last_layer_lr=schedules["last_layer_lr"][it])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DinokitError

# ---------------------------------------------------------------------------------------------- schedules


def _half_cosine(start: float, end: float, n: int) -> np.ndarray:
    """``end + 0.5 (start - end) (1 + cos(pi i / n))`` for i in 0..n-1: from ``start`` towards ``end``."""
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * np.arange(n) / max(n, 1)))


class CosineScheduler:
    """Per-iteration values: ``freeze_iters`` zeros, a linear warm-up, then a cosine to ``final_value``.

    The warm-up is ``linspace(start_warmup_value, base_value, warmup_iters)`` (both endpoints); the
    remaining n iterations follow ``final + 0.5 (base - final) (1 + cos(pi i / n))`` for i in 0..n-1.
    Indexing at or past ``total_iters`` returns ``final_value``.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0,
        freeze_iters: int = 0,
    ) -> None:
        n_cosine = total_iters - warmup_iters - freeze_iters
        if min(total_iters, warmup_iters, freeze_iters, n_cosine) < 0:
            raise ValueError(
                f"CosineScheduler needs 0 <= warmup_iters + freeze_iters <= total_iters; got warmup {warmup_iters}, "
                f"freeze {freeze_iters}, total {total_iters}"
            )
        self.final_value = final_value
        self.total_iters = total_iters
        cosine = _half_cosine(base_value, final_value, n_cosine)
        self.schedule: np.ndarray = np.concatenate(
            (np.zeros(freeze_iters), np.linspace(start_warmup_value, base_value, warmup_iters), cosine)
        )

    @classmethod
    def from_values(cls, values: np.ndarray, final_value: float) -> CosineScheduler:
        """A schedule of the given per-iteration ``values``, ``final_value`` past their end."""
        scheduler = cls.__new__(cls)
        scheduler.schedule = np.asarray(values, dtype=np.float64)
        scheduler.total_iters, scheduler.final_value = len(scheduler.schedule), final_value
        return scheduler

    def __len__(self) -> int:
        return self.total_iters

    def __getitem__(self, it: int) -> float:
        if it >= self.total_iters:
            return self.final_value
        return float(self.schedule[it])


def warmup_cosine_schedule(start: float, peak: float, end: float, *, warmup_iters: int, total_iters: int,
                           cosine_iters: int | None = None) -> CosineScheduler:
    """DINOv3's "v2" schedule: ``start`` -> ``peak`` linearly over ``warmup_iters`` (``peak`` not included), a
    half-cosine ``peak`` -> ``end`` over ``cosine_iters`` (None: the rest of ``total_iters``), then ``end``."""
    if cosine_iters is None:
        cosine_iters = max(total_iters - warmup_iters, 0)
    if min(warmup_iters, cosine_iters, total_iters) < 0:
        raise ValueError(f"warmup_cosine_schedule needs iterations >= 0, got warmup {warmup_iters}, "
                         f"cosine {cosine_iters}, total {total_iters}")
    warmup = np.linspace(start, peak, warmup_iters, endpoint=False)
    cosine = _half_cosine(peak, end, cosine_iters)
    rest = np.full(max(total_iters - warmup_iters - cosine_iters, 0), float(end))
    return CosineScheduler.from_values(np.concatenate((warmup, cosine, rest)), float(end))


@dataclass(frozen=True)
class ScheduleConfig:
    """The values the schedules need, in the official config's units (epochs of ``epoch_length`` iterations)."""

    epochs: int  # optim.epochs: length of the lr / wd / momentum cosines
    epoch_length: int = 1250  # train.OFFICIAL_EPOCH_LENGTH: iterations per "epoch", whatever the dataset size
    lr: float = 0.004  # optim.lr: peak lr, already scaled for the total batch (see scale_lr)
    min_lr: float = 1.0e-6  # optim.min_lr: lr at the end of the cosine
    warmup_epochs: int = 10  # optim.warmup_epochs: linear lr warm-up from 0
    weight_decay: float = 0.04  # optim.weight_decay: weight decay at the start
    weight_decay_end: float = 0.4  # optim.weight_decay_end: weight decay at the end (it increases)
    momentum_teacher: float = 0.992  # teacher.momentum_teacher: EMA momentum at the start
    final_momentum_teacher: float = 1.0  # teacher.final_momentum_teacher: EMA momentum at the end
    warmup_teacher_temp: float = 0.04  # teacher.warmup_teacher_temp: teacher temperature at iteration 0
    teacher_temp: float = 0.07  # teacher.teacher_temp: teacher temperature after the warm-up
    warmup_teacher_temp_epochs: int = 30  # teacher.warmup_teacher_temp_epochs: linear temperature warm-up
    freeze_last_layer_epochs: int = 1  # optim.freeze_last_layer_epochs: epochs with the heads' last layer at lr 0
    freeze_backbone_epochs: int = 0  # train.freeze_backbone_epochs (dinokit): epochs with the backbone at lr 0
    backbone_lr_mult: float = 1.0  # optim.backbone_lr_mult (dinokit): lr multiplier of the backbone

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise DinokitError(f"optim.epochs is {self.epochs}; set it to a positive number of epochs")
        if self.epoch_length <= 0:
            raise DinokitError(
                f"train.OFFICIAL_EPOCH_LENGTH is {self.epoch_length}; set it to a positive iteration count"
            )
        for key, value in (
            ("optim.warmup_epochs", self.warmup_epochs),
            ("optim.freeze_last_layer_epochs", self.freeze_last_layer_epochs),
            ("teacher.warmup_teacher_temp_epochs", self.warmup_teacher_temp_epochs),
        ):
            if value < 0:
                raise DinokitError(f"{key} is {value}; set it to 0 or more")
        if self.warmup_epochs > self.epochs:
            raise DinokitError(
                f"optim.warmup_epochs ({self.warmup_epochs}) exceeds optim.epochs ({self.epochs}); "
                "lower optim.warmup_epochs"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> ScheduleConfig:
        """Read the official keys (``optim.*``, ``teacher.*``, ``train.OFFICIAL_EPOCH_LENGTH``) from a config tree.

        ``cfg`` may be an OmegaConf ``DictConfig``, nested dicts, or any objects with those attributes;
        ``optim.lr`` must already be scaled for the total batch.
        """
        def get(path: str, default: Any) -> Any:
            node = cfg
            for key in path.split("."):
                try:
                    node = node[key] if isinstance(node, Mapping) else getattr(node, key)
                except (KeyError, AttributeError):
                    return default  # a tree without dinokit's own keys
            return node

        casts = {"int": int, "float": float}  # field types, as strings under postponed annotations
        return cls(**{f.name: casts[f.type](get(_official_key(f.name), f.default)) for f in fields(cls)})


_TEACHER_FIELDS = frozenset(
    {"momentum_teacher", "final_momentum_teacher", "warmup_teacher_temp", "teacher_temp", "warmup_teacher_temp_epochs"}
)


def _official_key(field_name: str) -> str:
    """The official config key of a :class:`ScheduleConfig` field."""
    if field_name == "epoch_length":
        return "train.OFFICIAL_EPOCH_LENGTH"
    if field_name == "freeze_backbone_epochs":
        return "train.freeze_backbone_epochs"
    return f"{'teacher' if field_name in _TEACHER_FIELDS else 'optim'}.{field_name}"


def build_schedulers(cfg: ScheduleConfig | Any, lr: CosineScheduler | None = None) -> dict[str, CosineScheduler]:
    """The training schedules, keyed ``lr``, ``wd``, ``momentum``, ``teacher_temp``, ``last_layer_lr``, and
    ``backbone_lr`` when the backbone has its own (a head warm-up or ``backbone_lr_mult`` != 1).

    ``lr``: the lr per iteration instead of the warm-up and cosine of ``optim.lr`` (e.g. DINOv3's v2 form,
    :func:`warmup_cosine_schedule`); the last layer's and the backbone's follow it.

    ``cfg`` is a :class:`ScheduleConfig` or a config tree with the official keys. Each value is
    indexed by iteration (``schedules["lr"][it]``) and holds its last value past the end.
    ``backbone_lr`` is ``lr * backbone_lr_mult``, 0 during the ``freeze_backbone_epochs`` of a head warm-up
    and then ramped linearly over ``warmup_epochs`` (a fresh warm-up for the backbone's new AdamW state).
    """
    c = cfg if isinstance(cfg, ScheduleConfig) else ScheduleConfig.from_config(cfg)
    total = c.epochs * c.epoch_length
    if lr is None:
        lr = CosineScheduler(c.lr, c.min_lr, total, warmup_iters=c.warmup_epochs * c.epoch_length)
    last_layer_lr = copy.deepcopy(lr)
    # The last layer is "frozen" by lr 0 only; AdamW moments still accumulate, as in the official code.
    last_layer_lr.schedule[: c.freeze_last_layer_epochs * c.epoch_length] = 0.0
    temp_iters = c.warmup_teacher_temp_epochs * c.epoch_length
    extra = {}
    if c.freeze_backbone_epochs or c.backbone_lr_mult != 1.0:
        freeze, warmup = c.freeze_backbone_epochs * c.epoch_length, c.warmup_epochs * c.epoch_length
        steps = np.arange(total) - freeze + 1  # 1 at the first iteration the backbone trains
        ramp = np.clip(steps / warmup, 0.0, 1.0) if (freeze and warmup) else (steps > 0).astype(np.float64)
        backbone_lr = copy.deepcopy(lr)
        backbone_lr.schedule = lr.schedule * c.backbone_lr_mult * ramp
        backbone_lr.final_value = lr.final_value * c.backbone_lr_mult
        extra["backbone_lr"] = backbone_lr
    return {
        "lr": lr,
        "wd": CosineScheduler(c.weight_decay, c.weight_decay_end, total),
        "momentum": CosineScheduler(c.momentum_teacher, c.final_momentum_teacher, total),
        # total == warmup: a linear ramp (both endpoints), then teacher_temp past the end
        "teacher_temp": CosineScheduler(
            c.teacher_temp,
            c.teacher_temp,
            temp_iters,
            warmup_iters=temp_iters,
            start_warmup_value=c.warmup_teacher_temp,
        ),
        "last_layer_lr": last_layer_lr,
        **extra,
    }


SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")


def scale_lr(base_lr: float, batch_size_total: int, rule: str = "sqrt_wrt_1024") -> float:
    """Peak lr for ``batch_size_total`` images per step (over all ranks).

    ``sqrt_wrt_1024`` (official): base_lr * sqrt(batch / 1024); ``linear_wrt_256``: base_lr * batch / 256;
    ``none``: base_lr.
    """
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(batch_size_total / 1024)
    if rule == "linear_wrt_256":
        return base_lr * batch_size_total / 256
    if rule == "none":
        return base_lr
    raise DinokitError(f"unknown optim.scaling_rule {rule!r}; use one of: {', '.join(SCALING_RULES)}")


# ---------------------------------------------------------------------------------------------- parameter groups

# Path components added by wrappers: torch.compile, activation checkpointing, FSDP1, DDP (leading only).
_WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
_LAYER_ZERO = frozenset({"pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens"})


def canonical_name(name: str) -> str:
    """``name`` without the path components that wrappers insert (``_orig_mod.``, ``module.``, ...)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_COMPONENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _indexed_blocks(backbone: nn.Module) -> Iterable[tuple[int, nn.Module]]:
    """(global block index, block) for ``backbone.blocks``, plain or chunked as the official training model.

    A chunked backbone (``chunked_blocks`` true) holds chunks padded with ``nn.Identity`` in front,
    so a block's position inside its chunk is its global index (``blocks.1.6`` is block 6).
    """
    if not getattr(backbone, "chunked_blocks", False):
        yield from enumerate(backbone.blocks)
        return
    for chunk in backbone.blocks:
        for index, block in enumerate(chunk):
            if not isinstance(block, nn.Identity):
                yield index, block


def _layer_ids(module: nn.Module, n_blocks: int | None) -> dict[int, tuple[int, int, bool]]:
    """id(param) -> (backbone depth, layer_id, is patch embedding) for every backbone parameter.

    Backbones are declared by an integer ``n_blocks`` attribute (``module`` itself with the
    ``n_blocks`` argument). layer_id is 0 for the embeddings and tokens, i + 1 for the parameters of
    block i (found by module identity, so wrapper prefixes do not matter), n_blocks + 1 otherwise.
    """
    backbones = [(sub, sub.n_blocks) for sub in module.modules() if isinstance(getattr(sub, "n_blocks", None), int)]
    if n_blocks is not None:
        backbones.insert(0, (module, n_blocks))
    ids: dict[int, tuple[int, int, bool]] = {}
    for backbone, depth in backbones:  # outer first, so that a nested backbone overrides its parent
        for name, param in backbone.named_parameters():
            first = canonical_name(name).split(".", 1)[0]
            ids[id(param)] = (depth, 0 if first in _LAYER_ZERO else depth + 1, first == "patch_embed")
        for index, block in _indexed_blocks(backbone):
            for param in block.parameters():
                ids[id(param)] = (depth, index + 1, False)
    return ids


def get_param_groups(
    module: nn.Module, *, lr_decay_rate: float, patch_embed_lr_mult: float, n_blocks: int | None = None
) -> list[dict[str, Any]]:
    """Optimiser parameter groups of ``module`` with the official multipliers (frozen parameters skipped).

    Backbones are the submodules with an ``n_blocks`` attribute (``module`` itself or any child); pass
    ``n_blocks`` to declare ``module`` a backbone of that depth when it has no such attribute. In a
    backbone, lr_multiplier = lr_decay_rate ** (n_blocks + 1 - layer_id) with layer_id 0 for
    ``pos_embed``, ``patch_embed``, ``mask_token``, ``cls_token``, ``register_tokens``, i + 1 for
    block i (also with official block chunking) and n_blocks + 1 otherwise (the final norm);
    ``patch_embed`` is further multiplied by ``patch_embed_lr_mult``. Other parameters (heads) get 1.
    wd_multiplier is 0 for names ending in ``.bias`` or containing ``norm`` or ``gamma``;
    ``is_last_layer`` marks names containing ``last_layer``. Names are matched without wrapper
    prefixes (``_orig_mod.``, ``_checkpoint_wrapped_module.``, ...); ``is_backbone`` marks backbone
    parameters (they follow the ``backbone_lr`` schedule when there is one). Groups with equal
    (lr_multiplier, wd_multiplier, is_last_layer, is_backbone) are fused, in order of first appearance.
    """
    layer_ids = _layer_ids(module, n_blocks)
    fused: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for raw_name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        name = canonical_name(raw_name)
        lr_mult, in_backbone = 1.0, id(param) in layer_ids
        if in_backbone:
            depth, layer_id, is_patch_embed = layer_ids[id(param)]
            lr_mult = lr_decay_rate ** (depth + 1 - layer_id)
            if is_patch_embed:
                lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        key = (lr_mult, wd_mult, "last_layer" in name, in_backbone)
        group = fused.setdefault(
            key, {"params": [], "lr_multiplier": key[0], "wd_multiplier": key[1], "is_last_layer": key[2],
                  "is_backbone": key[3]}
        )
        group["params"].append(param)
    return list(fused.values())


# ---------------------------------------------------------------------------------------------- optimiser


def apply_optim_schedule(optimizer: torch.optim.Optimizer, *, lr: float, wd: float, last_layer_lr: float,
                         backbone_lr: float | None = None, beta1: float | None = None) -> None:
    """Set each group's lr and weight decay for this iteration from the schedules and its multipliers
    (``backbone_lr``, when given, replaces ``lr`` for the backbone groups); ``beta1``, when given, is every
    group's Adam beta1 (a scheduled momentum, as the dense depth recipe's ``cycle_beta1``)."""
    for group in optimizer.param_groups:
        if group.get("is_last_layer", False):
            base = last_layer_lr
        elif backbone_lr is not None and group.get("is_backbone", False):
            base = backbone_lr
        else:
            base = lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)
        if beta1 is not None:
            group["betas"] = (beta1, group["betas"][1])


def build_optimizer(
    param_groups: Iterable[dict[str, Any]], betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW (eps 1e-8), fused when every parameter is on CUDA, ``foreach`` otherwise.

    lr and weight decay start at 0: :func:`apply_optim_schedule` sets them before every step.
    """
    groups = list(param_groups)
    all_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    kind = {"fused": True} if all_cuda and torch.cuda.is_available() else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=1e-8, weight_decay=0.0, **kind)
