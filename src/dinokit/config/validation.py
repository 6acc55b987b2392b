"""Validating a training configuration: what the schema's types cannot check (choices, ranges, consistency of
related keys, official keys that cannot act in dinokit, options that need one process). Every problem is one
:class:`DinokitError` naming the dotted key.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from ..devices import DTYPES
from ..engine.optim import SCALING_RULES
from ..errors import DinokitError
from ..models.architectures import arch_dims
from ..tracking import TRACKERS
from .crops import crop_resolutions

# FSDP1 strategies that FSDP2 expresses per module: FULL_SHARD = reshard parameters after forward,
# SHARD_GRAD_OP = keep them gathered until backward (more memory, fewer all-gathers).
ACTIVE_SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP")

_CHOICES: dict[str, Sequence[str]] = {
    "student.ffn_layer": ("mlp", "swiglu", "swiglufused", "identity"),
    "train.centering": ("centering", "sinkhorn_knopp"),
    "optim.scaling_rule": SCALING_RULES,
    "crops.blur_probabilities": ("official", "intended", "none"),
    "compute_precision.dtype": ("auto", *DTYPES),
    "train.tracker": TRACKERS,
    "train.activation_checkpointing_policy": ("full", "selective"),
    "crops.augmentation": ("pil", "tensor", "device"),
    "distillation.loss": ("dino_ibot", "features"),
    "distillation.ibot_positions": ("all", "masked"),
    "distillation.feature_loss": ("cosine", "smooth_l1"),
    "gram.tokens_used": ("all", "masked", "unmasked"),
    "gram.global_teacher_resize_method": ("bicubic", "bilinear", "nearest"),
}
for _role in ("teacher", "student"):
    for _module in ("backbone", "dino_head", "ibot_head"):
        _prefix = f"compute_precision.{_role}.{_module}"
        _CHOICES[f"{_prefix}.sharding_strategy"] = ACTIVE_SHARDING_STRATEGIES
        for _kind in ("param", "reduce", "buffer"):
            _CHOICES[f"{_prefix}.mixed_precision.{_kind}_dtype"] = tuple(DTYPES)

_POSITIVE = (
    "train.batch_size_per_gpu", "train.OFFICIAL_EPOCH_LENGTH", "train.saveckp_freq", "train.log_freq",
    "student.patch_size", "optim.epochs",
    "dino.head_n_prototypes", "dino.head_bottleneck_dim", "dino.head_nlayers", "dino.head_hidden_dim",
    "ibot.head_n_prototypes", "ibot.head_bottleneck_dim", "ibot.head_nlayers", "ibot.head_hidden_dim",
    "evaluation.eval_period_iterations", "evaluation.knn_temperature", "optim.layerwise_decay",
    "gram.update_frequency", "teacher.warmup_teacher_temp", "teacher.teacher_temp",
)  # fmt: skip
_NON_NEGATIVE = (
    "train.seed", "optim.weight_decay", "optim.weight_decay_end", "optim.clip_grad",
    "train.num_workers", "student.block_chunks", "student.num_register_tokens", "crops.local_crops_number",
    "optim.warmup_epochs", "optim.freeze_last_layer_epochs", "teacher.warmup_teacher_temp_epochs", "optim.base_lr",
    "optim.min_lr", "dino.loss_weight", "dino.koleo_loss_weight", "ibot.loss_weight",
    "train.freeze_backbone_epochs", "optim.backbone_lr_mult", "gram.loss_weight", "gram.it_first_update",
    "crops.color_jitter_strength", "student.layerscale", "train.head_chunk_rows",
)  # fmt: skip


def check_bounds(values: dict[str, Any], *, what: str, above: float | None = None,
                 at_least: float | None = None) -> None:
    """One line naming the first of ``values`` (key -> a number, or a list of numbers each checked) not ``above``
    / ``at_least`` its bound: the training config, the curation settings and the dense recipe are told alike,
    e.g. "config key 'optim.epochs' is 0; it must be above 0". ``what`` names the kind of key."""
    for key, value in values.items():
        is_list = isinstance(value, (list, tuple)) or OmegaConf.is_list(value)
        numbers = list(value) if is_list else [value]
        if any((above is not None and not v > above) or (at_least is not None and not v >= at_least)
               for v in numbers):
            wanted = f"above {above:g}" if above is not None else f"at least {at_least:g}"
            raise DinokitError(f"{what} '{key}' is {numbers if is_list else value}; "
                               f"{'every value' if is_list else 'it'} must be {wanted}")


SEED_LIMIT = 2**32  # seeds are 0 .. 2^32 - 1: every seed derived from one (x 100003, + rank...) fits torch's 64 bits


def check_seeds(values: dict[str, Any], *, what: str) -> None:
    """One line naming the first of ``values`` (key -> seed) outside ``0 .. 2^32 - 1`` (a seed of 2^64 was a
    traceback from ``torch.manual_seed``, after the work)."""
    for key, value in values.items():
        if not 0 <= value < SEED_LIMIT:
            raise DinokitError(f"{what} '{key}' is {value}; a seed must be from 0 to 2^32 - 1")


_FRACTION_PAIRS = ("crops.global_crops_scale", "crops.local_crops_scale", "ibot.mask_ratio_min_max")


def validate(cfg: DictConfig) -> None:
    """Check the values the schema's types cannot (choices, ranges, consistency); errors name the key."""
    arch_dims(cfg.student.arch, "config key 'student.arch'")
    check_block_chunks(cfg.student)
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise DinokitError(f"config key '{key}' is {value!r}; use one of: {', '.join(allowed)}")
    check_bounds({key: OmegaConf.select(cfg, key) for key in _POSITIVE}, what="config key", above=0)
    check_bounds({key: OmegaConf.select(cfg, key) for key in _NON_NEGATIVE}, what="config key", at_least=0)
    check_seeds({"train.seed": cfg.train.seed}, what="config key")
    for key in _FRACTION_PAIRS:
        pair = list(OmegaConf.select(cfg, key))
        crop = key.startswith("crops.")  # a crop of no area has no pixels (and no decoding size)
        if len(pair) != 2 or not (0 < pair[0] if crop else 0 <= pair[0]) or not pair[0] <= pair[1] <= 1:
            raise DinokitError(f"config key '{key}' is {pair}; give [low, high] with {'0 <' if crop else '0 <='} low "
                               "<= high <= 1")
    for key in ("ibot.mask_sample_probability", "crops.grayscale_probability", "teacher.momentum_teacher",
                "teacher.final_momentum_teacher"):
        if not 0 <= OmegaConf.select(cfg, key) <= 1:
            raise DinokitError(f"config key '{key}' is {OmegaConf.select(cfg, key)}; it must be in [0, 1]")
    if cfg.ibot.loss_weight > 0 and (cfg.ibot.mask_sample_probability <= 0 or max(cfg.ibot.mask_ratio_min_max) <= 0):
        raise DinokitError(  # the official code asserts both: no masked patch, an iBOT loss of 0 every step
            f"ibot.loss_weight is {cfg.ibot.loss_weight} but no patch would ever be masked (ibot.mask_sample_probability"
            f" {cfg.ibot.mask_sample_probability}, ibot.mask_ratio_min_max {list(cfg.ibot.mask_ratio_min_max)}); raise "
            "them (official 0.5 and [0.1, 0.5]) or set ibot.loss_weight=0")
    for key in ("optim.adamw_beta1", "optim.adamw_beta2"):
        if not 0 <= OmegaConf.select(cfg, key) < 1:
            raise DinokitError(f"config key '{key}' is {OmegaConf.select(cfg, key)}; it must be in [0, 1)")
    if cfg.optim.layerwise_decay > 1:  # > 0 above; above 1 the first blocks would learn faster than the last
        raise DinokitError(f"config key 'optim.layerwise_decay' is {cfg.optim.layerwise_decay}; it must be in (0, 1] "
                           "(1: no decay, 0.9: each block down from the top 0.9x the lr of the one above)")
    if not 0 <= cfg.student.drop_path_rate < 1:
        raise DinokitError("config key 'student.drop_path_rate' must be in [0, 1)")
    crop_resolutions(cfg.crops, cfg.student.patch_size)  # sizes (one, or DINOv3's mixed lists): one line each
    if cfg.optim.warmup_epochs > cfg.optim.epochs:
        warmup, epochs = cfg.optim.warmup_epochs, cfg.optim.epochs
        raise DinokitError(f"config key 'optim.warmup_epochs' ({warmup}) exceeds optim.epochs ({epochs}); lower it")
    if not cfg.evaluation.knn_k or min(cfg.evaluation.knn_k) <= 0:
        knn_k = list(cfg.evaluation.knn_k)
        raise DinokitError(f"config key 'evaluation.knn_k' is {knn_k}; give positive neighbour counts")
    size, patch = cfg.evaluation.knn_image_size, cfg.student.patch_size
    if size is not None and (size <= 0 or size % patch):
        raise DinokitError(f"config key 'evaluation.knn_image_size' is {size}; give a positive multiple of "
                           f"student.patch_size ({patch}), e.g. {patch * max(1, round(size / patch))} (or "
                           "null: the global crop size)")
    knn = cfg.evaluation.knn_dataset
    if knn is not None and (knn.train is None) != (knn.val is None):
        raise DinokitError("set both evaluation.knn_dataset.train and evaluation.knn_dataset.val, or neither")
    _validate_step_levers(cfg)
    _validate_dino_reweighting(cfg)
    _validate_koleo_group(cfg.dino)
    check_weight_schedule(cfg.optim.lr_schedule, "optim.lr_schedule")
    _validate_stages(cfg)
    check_inert_keys(cfg)


def check_block_chunks(student, where: str = "student") -> None:
    """The official FSDP chunks group ``depth // block_chunks`` blocks each: more chunks than blocks (chunks of no
    block) stopped the run at its first snapshot, its work lost."""
    depth = arch_dims(student.arch)["depth"]
    if student.block_chunks > depth:
        raise DinokitError(f"config key '{where}.block_chunks' is {student.block_chunks} but {student.arch} has "
                           f"{depth} blocks; set at most {depth} (0: one flat list of blocks)")


def check_weight_schedule(weight, key: str) -> None:
    """A v2 weight schedule (``start``, ``peak``, ``end``, ``warmup_epochs``, ``cosine_epochs``) with durations of 0
    or more; None passes."""
    if weight is not None and (weight.warmup_epochs < 0 or (weight.cosine_epochs is not None and weight.cosine_epochs < 0)):
        raise DinokitError(f"{key} has warmup_epochs {weight.warmup_epochs} and cosine_epochs {weight.cosine_epochs}; "
                           "set them to 0 or more (cosine_epochs null: the rest of the run)")


def _validate_dino_reweighting(cfg: DictConfig) -> None:
    """DINOv3's local-crop DINO weight: the switch needs its schedule, and the schedule the switch (else it would
    silently do nothing)."""
    dino = cfg.dino
    if dino.reweight_dino_local_loss and dino.local_loss_weight_schedule is None:
        raise DinokitError("dino.reweight_dino_local_loss needs dino.local_loss_weight_schedule ({start, peak, end, "
                           "warmup_epochs, cosine_epochs}), e.g. a constant 0.5: start 0.5, peak 0.5, end 0.5")
    if dino.local_loss_weight_schedule is not None and not dino.reweight_dino_local_loss:
        raise DinokitError("dino.local_loss_weight_schedule is set but dino.reweight_dino_local_loss is false: it "
                           "would do nothing; set dino.reweight_dino_local_loss=true or remove the schedule")
    check_weight_schedule(dino.local_loss_weight_schedule, "dino.local_loss_weight_schedule")


def _validate_step_levers(cfg: DictConfig) -> None:
    """A checkpointing policy needs checkpointing on; ``train.packed_crops`` runs the blocks' parts outside the blocks'
    own forward, so it misses their activation checkpointing (``train.compile`` compiles the packed block function
    instead: train/train.py); ``train.compile_loss`` compiles the plain loss terms, which the chunked heads replace."""
    policy = cfg.train.activation_checkpointing_policy
    if policy != "full" and not cfg.train.activation_checkpointing:
        raise DinokitError(f"train.activation_checkpointing_policy={policy} has no effect without "
                           f"train.activation_checkpointing=true; set that too, or remove the policy")
    if cfg.train.packed_crops and cfg.train.activation_checkpointing:
        raise DinokitError("train.packed_crops does not combine with train.activation_checkpointing (the packed "
                           "forward bypasses the checkpointed blocks); set one of them to false")
    if cfg.train.compile_loss and cfg.train.head_chunk_rows:
        raise DinokitError("train.compile_loss does not combine with train.head_chunk_rows (the chunked heads compute "
                           "their own loss, chunk by chunk); set one of them off")


def check_step_levers(train_cfg, world_size: int) -> None:
    """``train.packed_crops`` and ``train.head_chunk_rows`` call the modules' parts directly, which FSDP2's
    sharded modules do not allow: one process only."""
    if world_size > 1:
        for key, value in (("packed_crops", train_cfg.packed_crops), ("head_chunk_rows", train_cfg.head_chunk_rows)):
            if value:
                raise DinokitError(f"train.{key} works in one process only (FSDP2 shards the modules it calls "
                                   f"piecewise) and this run has {world_size}; remove it")


def _validate_koleo_group(dino_cfg) -> None:
    """The group size of DINOv3's distributed KoLeo: 1 or more, and only with the distributed loss (else inert)."""
    size = dino_cfg.koleo_loss_group_size
    if size is not None and size < 1:
        raise DinokitError(f"dino.koleo_loss_group_size is {size}; set it to 1 or more (null: all ranks)")
    if size is not None and not dino_cfg.koleo_loss_distributed:
        raise DinokitError(f"dino.koleo_loss_group_size={size} does nothing without dino.koleo_loss_distributed=true; "
                           "set that too, or remove the group size")


def check_koleo_group(dino_cfg, world_size: int) -> None:
    """DINOv3's distributed KoLeo splits the ranks into groups of ``dino.koleo_loss_group_size``: the world must be
    a multiple of it (a size of the world or more is one group of all ranks)."""
    size = dino_cfg.koleo_loss_group_size
    if dino_cfg.koleo_loss_distributed and size is not None and size < world_size and world_size % size:
        raise DinokitError(f"dino.koleo_loss_group_size={size} does not divide the {world_size} processes into groups; "
                           f"give a divisor of {world_size}, or null for one group of all")


def _validate_stages(cfg: DictConfig) -> None:
    """The keys of continued pretraining, later stages and Gram anchoring that must agree with each other."""
    if cfg.train.freeze_backbone_epochs >= cfg.optim.epochs:
        raise DinokitError(f"config key 'train.freeze_backbone_epochs' ({cfg.train.freeze_backbone_epochs}) must be "
                           f"below optim.epochs ({cfg.optim.epochs}): the backbone would never train")
    if cfg.student.pretrained_weights and cfg.student.resume_from_teacher_chkpt:
        raise DinokitError("set student.pretrained_weights (a backbone, fresh heads) or student.resume_from_teacher_chkpt "
                           "(a teacher with its heads), not both")
    gram = cfg.gram
    gram_size = crop_resolutions(cfg.crops)[0][0].gram_size  # all set or all null (crop_resolutions checks)
    if gram_size is not None and not (gram.use_loss or gram.compute_stats):
        raise DinokitError("crops.gram_teacher_crops_size makes crops for the Gram teacher; set gram.use_loss=true "
                           "or remove the key")
    if not (gram.use_loss or gram.compute_stats):  # either builds a Gram teacher
        return
    if gram_size is not None and gram.ema_teacher:
        raise DinokitError("crops.gram_teacher_crops_size needs a separate Gram teacher (the EMA teacher sees the "
                           "global crops); set gram.ckpt or gram.it_load_ema_teacher instead of gram.ema_teacher")
    if gram.global_teacher_resize_antialias and gram.global_teacher_resize_method == "nearest":
        raise DinokitError("gram.global_teacher_resize_antialias works with bilinear or bicubic resizing; set "
                           "gram.global_teacher_resize_method=bicubic or the antialias to false")
    if gram.ema_teacher and (gram.ckpt or gram.it_load_ema_teacher >= 0):
        raise DinokitError("gram.ema_teacher uses the EMA teacher itself; remove gram.ckpt and gram.it_load_ema_teacher")
    if not gram.ema_teacher and not gram.ckpt and gram.it_load_ema_teacher < 0:
        key = "gram.use_loss" if gram.use_loss else "gram.compute_stats"
        raise DinokitError(f"{key} needs a Gram teacher: set gram.ckpt, gram.it_load_ema_teacher >= 0 or "
                           "gram.ema_teacher=true")
    check_weight_schedule(gram.loss_weight_schedule, "gram.loss_weight_schedule")
    if gram.remove_neg and gram.remove_only_teacher_neg:
        raise DinokitError("gram.remove_neg and gram.remove_only_teacher_neg exclude each other; keep one")
    if gram.tokens_used != "all" and gram.img_level:
        raise DinokitError(f"gram.tokens_used={gram.tokens_used} selects a different number of patches per image; "
                           "set gram.img_level=false")
    if gram.tokens_used != "all" and cfg.ibot.loss_weight <= 0:
        raise DinokitError(f"gram.tokens_used={gram.tokens_used} needs the iBOT masks; set ibot.loss_weight > 0 or "
                           "gram.tokens_used=all")


# Official keys that dinokit reads but that cannot act in it: their official value is accepted, any other value stops
# the run with what to use instead (a setting must never silently do nothing).
_INERT: dict[str, tuple[tuple[Any, ...], str]] = {
    "train.cache_dataset": ((True,), "dinokit reads images from disk every epoch; remove the key"),
}
for _role in ("teacher", "student"):
    for _module in ("backbone", "dino_head", "ibot_head"):
        _prefix = f"compute_precision.{_role}.{_module}.mixed_precision"
        _use_dtype = "FSDP2 computes in compute_precision.dtype (auto|bf16|fp16|fp32) under autocast; set that key"
        _INERT[f"{_prefix}.param_dtype"] = (("fp16",), _use_dtype)
        _INERT[f"{_prefix}.buffer_dtype"] = (("fp32",), _use_dtype)
        _INERT[f"{_prefix}.reduce_dtype"] = (("fp16", "fp32"), "dinokit always reduces gradients in fp32; remove the key")


def check_inert_keys(cfg: DictConfig) -> None:
    """Stop on an official key that has no effect in dinokit but was set to a non-default value."""
    for key, (accepted, instead) in _INERT.items():
        value = OmegaConf.select(cfg, key)
        if value not in accepted:
            raise DinokitError(f"config key '{key}' is {value!r} but has no effect in dinokit: {instead}")


@functools.cache
def _defaults() -> DictConfig:
    from .schema import SSLConfig

    return OmegaConf.structured(SSLConfig)


def changed_keys(cfg: DictConfig, keys: Iterable[str]) -> list[str]:
    """Those of ``keys`` set to another value than the default (an empty path and null alike mean none)."""
    def value(tree: DictConfig, key: str) -> Any:
        found = OmegaConf.select(tree, key)
        return None if found == "" else found

    return [key for key in keys if value(cfg, key) != value(_defaults(), key)]


_GRAM_KEYS = tuple(f"gram.{key}" for key in (
    "loss_weight", "loss_weight_schedule", "ema_teacher", "ckpt", "it_load_ema_teacher", "rep_update",
    "update_frequency", "it_first_update", "max_updates", "normalized", "img_level", "remove_neg",
    "remove_only_teacher_neg", "tokens_used", "global_teacher_resize_method", "global_teacher_resize_antialias",
)) + ("crops.gram_teacher_no_distortions",)


def check_idle_keys(cfg: DictConfig, output_dir: str | Path | None = None, resume: bool = True) -> None:
    """A key given a value that a switch elsewhere keeps from acting is one line naming both (it did nothing), for
    a new run: a run in ``output_dir`` that saved its config.yaml resumes (an earlier version accepted the key), and
    reading a run's architecture never checks this."""
    if resume and output_dir is not None and (Path(output_dir).expanduser() / "config.yaml").is_file():
        return
    gram = cfg.gram
    rules = [
        (not (gram.use_loss or gram.compute_stats), _GRAM_KEYS,
         "without gram.use_loss=true (or gram.compute_stats=true); set that too"),
        (gram.compute_stats and not gram.use_loss, ("gram.loss_weight", "gram.loss_weight_schedule"),
         "without gram.use_loss=true (gram.compute_stats only logs the Gram loss); set that too"),
        (gram.ema_teacher, ("gram.update_frequency", "gram.it_first_update", "gram.max_updates"),
         "with gram.ema_teacher=true (the EMA teacher itself is the Gram teacher: nothing is refreshed)"),
    ]
    for applies, keys, reason in rules:
        if applies and (idle := changed_keys(cfg, keys)):
            raise DinokitError(f"config key '{idle[0]}' does nothing {reason}, or remove the key")
