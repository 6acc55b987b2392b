"""The typed schema of the training configuration: the official DINOv2 key tree with its defaults.

One dataclass per section; every field carries its official default and a comment. dinokit
additions are marked. ``config.py`` loads, merges, validates and writes configs against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------------------
# Schema (official names and defaults)
# ---------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Official ``MODEL`` section."""

    WEIGHTS: str = ""  # training checkpoint to load when output_dir has none to resume (or with --no-resume)


@dataclass
class MixedPrecisionConfig:
    """FSDP ``MixedPrecision`` of one module (official)."""

    param_dtype: str = "fp16"  # dtype of the parameters during forward/backward: fp16, bf16 or fp32
    reduce_dtype: str = "fp16"  # dtype in which gradients are reduced across ranks
    buffer_dtype: str = "fp32"  # dtype of the module buffers


@dataclass
class ModulePrecisionConfig:
    """Sharding and precision of one wrapped module (official)."""

    sharding_strategy: str = "SHARD_GRAD_OP"  # FSDP ShardingStrategy name, e.g. FULL_SHARD or NO_SHARD
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)


@dataclass
class ModelPrecisionConfig:
    """Precision of the three submodules of the student or the teacher (official)."""

    backbone: ModulePrecisionConfig = field(default_factory=ModulePrecisionConfig)  # the ViT
    dino_head: ModulePrecisionConfig = field(default_factory=ModulePrecisionConfig)  # the DINO projection head
    ibot_head: ModulePrecisionConfig = field(default_factory=ModulePrecisionConfig)  # the separate iBOT head


@dataclass
class ComputePrecisionConfig:
    """Official ``compute_precision``; official training computes in FSDP's ``param_dtype``, without autocast."""

    grad_scaler: bool = True  # scale the loss (needed for fp16 gradients)
    teacher: ModelPrecisionConfig = field(default_factory=ModelPrecisionConfig)
    # The student's heads reduce their gradients in fp32 (official default).
    student: ModelPrecisionConfig = field(
        default_factory=lambda: ModelPrecisionConfig(dino_head=_fp32_reduce(), ibot_head=_fp32_reduce())
    )
    dtype: str = "auto"  # dinokit: autocast dtype, auto|bf16|fp16|fp32 (auto = bf16 on GPU, fp32 on CPU)


def _fp32_reduce() -> ModulePrecisionConfig:
    return ModulePrecisionConfig(mixed_precision=MixedPrecisionConfig(reduce_dtype="fp32"))


@dataclass
class DinoConfig:
    """Official ``dino``: the image-level (CLS) loss, its head and the KoLeo regulariser."""

    loss_weight: float = 1.0  # weight of the DINO loss (0 disables it)
    head_n_prototypes: int = 65536  # K, the output width of the head
    head_bottleneck_dim: int = 256  # width before the weight-normalised last layer
    head_nlayers: int = 3  # linear layers of the MLP, the last one giving the bottleneck
    head_hidden_dim: int = 2048  # hidden width of the MLP
    koleo_loss_weight: float = 0.1  # weight of the KoLeo loss on the student's global CLS tokens (0 disables it)
    koleo_loss_distributed: bool = False  # DINOv3: nearest neighbours searched over a group of ranks' samples
    koleo_loss_group_size: int | None = None  # dinokit: ranks per such group (DINOv3's stage: 16); null: all ranks
    reweight_dino_local_loss: bool = False  # DINOv3: weight the local-crop DINO loss by local_loss_weight_schedule
    local_loss_weight_schedule: WeightScheduleConfig | None = None  # DINOv3 (its v2 form); used when reweighting


@dataclass
class IBotConfig:
    """Official ``ibot``: the masked-patch loss and its head."""

    loss_weight: float = 1.0  # weight of the iBOT loss (0 disables it)
    mask_sample_probability: float = 0.5  # fraction of global crops that get a mask
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])  # range of masked patch ratios
    separate_head: bool = False  # own head for iBOT (below) instead of sharing the DINO head
    head_n_prototypes: int = 65536  # K of the separate head
    head_bottleneck_dim: int = 256  # bottleneck of the separate head
    head_nlayers: int = 3  # MLP layers of the separate head
    head_hidden_dim: int = 2048  # hidden width of the separate head


@dataclass
class TrainConfig:
    """Official ``train``, plus dinokit keys."""

    batch_size_per_gpu: int = 64  # images per process and step
    dataset_path: str = "ImageNet:split=TRAIN"  # dataset string, e.g. ImageFolder:root=/data or Sample:split=TRAIN
    output_dir: str = "."  # run folder (set by --output-dir)
    saveckp_freq: int = 20  # unused officially (3 epochs hard-coded); dinokit: epochs between resumable checkpoints
    seed: int = 0  # unused officially; dinokit: base random seed (each rank adds its rank)
    num_workers: int = 10  # data-loading worker processes per rank
    OFFICIAL_EPOCH_LENGTH: int = 1250  # iterations per "epoch", whatever the dataset size
    cache_dataset: bool = True  # unused (official and dinokit)
    centering: str = "centering"  # teacher normalisation: centering (EMA centre + softmax) or sinkhorn_knopp
    log_freq: int = 10  # dinokit: iterations between training_metrics.json lines (official: fixed 10)
    compile: bool = False  # dinokit: torch.compile each transformer block (GPU training; slower start-up)
    activation_checkpointing: bool = False  # dinokit: recompute block activations in backward to save memory
    # dinokit: what a checkpointed block keeps for backward: full (only its input) or selective (also the outputs
    # of its matmuls and attention: recomputes only the elementwise work, less compute, more memory than full)
    activation_checkpointing_policy: str = "full"
    tracker: str = "none"  # dinokit: also log metrics to tensorboard or wandb (optional extras), or none
    # dinokit: head warm-up of continued pretraining: for this many epochs the student backbone is frozen (run
    # without gradients) and only the heads learn; then it joins, its lr re-warmed over optim.warmup_epochs
    freeze_backbone_epochs: int = 0
    # dinokit: the student's global and local crops through each block in one pass (models/packed.py; one
    # process, without train.activation_checkpointing); same losses up to float rounding
    packed_crops: bool = False
    # dinokit: the student heads' prototype layer and cross-entropy this many rows at a time (losses/chunked.py),
    # so that the (rows x prototypes) logits never exist at once; 0 = in one piece (one process only)
    head_chunk_rows: int = 0
    # dinokit: torch.compile the student's loss terms (DINO and iBOT cross-entropies, KoLeo, Gram): the
    # log-softmax, product and sum become one fused kernel that never stores the (rows x prototypes)
    # log-probabilities; same values up to float rounding; not with train.head_chunk_rows
    compile_loss: bool = False


@dataclass
class StudentConfig:
    """Official ``student``: the backbone shared by student and teacher (only the student has drop path)."""

    arch: str = "vit_large"  # vit_pico, vit_nano, vit_tiny, vit_small, vit_base, vit_large, vit_giant2, vit_femto (_memeff ok)
    patch_size: int = 16  # patch size in pixels
    drop_path_rate: float = 0.3  # stochastic-depth rate of the student
    layerscale: float = 1.0e-5  # initial LayerScale value (0 = no LayerScale)
    drop_path_uniform: bool = True  # same rate in every block (else linear from 0)
    # dinokit: any backbone file or checkpoint (official, registers, SwiGLU, a training checkpoint), loaded strictly
    # into both backbones with the position embedding resized; the heads start fresh (see train.freeze_backbone_epochs)
    pretrained_weights: str = ""
    # DINOv3 name: a teacher_checkpoint.pth (or a run folder: its newest snapshot) whose backbone AND heads start
    # both student and teacher, position embedding resized; iterations, schedules and optimiser start at 0
    # (a new stage, e.g. high-resolution adaptation, unlike MODEL.WEIGHTS which continues a run)
    resume_from_teacher_chkpt: str = ""
    ffn_layer: str = "mlp"  # mlp, swiglu, swiglufused (same as swiglu) or identity
    block_chunks: int = 0  # blocks grouped in this many chunks (official FSDP units; keys blocks.<chunk>.<i>)
    qkv_bias: bool = True  # bias in the attention qkv projection
    proj_bias: bool = True  # bias in the attention output projection
    ffn_bias: bool = True  # biases in the FFN
    num_register_tokens: int = 0  # register tokens (4 for the _reg4 models)
    interpolate_antialias: bool = False  # antialias when resizing the position embedding
    interpolate_offset: float = 0.1  # offset of the position-embedding scale factor (0 = resize to size)


@dataclass
class TeacherConfig:
    """Official ``teacher``: EMA momentum and temperature schedules."""

    momentum_teacher: float = 0.992  # EMA momentum at the start (cosine to final_momentum_teacher)
    final_momentum_teacher: float = 1.0  # EMA momentum at the end of training
    warmup_teacher_temp: float = 0.04  # teacher temperature at iteration 0
    teacher_temp: float = 0.07  # teacher temperature after the warm-up
    warmup_teacher_temp_epochs: int = 30  # length of the linear temperature warm-up, in epochs


@dataclass
class OptimConfig:
    """Official ``optim``: AdamW and its schedules."""

    epochs: int = 100  # training length, in epochs of OFFICIAL_EPOCH_LENGTH iterations
    weight_decay: float = 0.04  # weight decay at the start (cosine schedule)
    weight_decay_end: float = 0.4  # weight decay at the end
    base_lr: float = 0.004  # learning rate for a total batch of 1024 (sqrt_wrt_1024)
    lr: float = 0.0  # peak learning rate, computed from base_lr by apply_scaling_rules
    warmup_epochs: int = 10  # linear lr warm-up from 0, in epochs
    min_lr: float = 1.0e-6  # learning rate at the end of the cosine
    clip_grad: float = 3.0  # gradient-norm clip, per student submodule (0: no clipping)
    freeze_last_layer_epochs: int = 1  # epochs with lr 0 for the heads' last layers
    scaling_rule: str = "sqrt_wrt_1024"  # sqrt_wrt_1024 (official), linear_wrt_256 or none (lr = base_lr)
    patch_embed_lr_mult: float = 0.2  # lr multiplier of the patch embedding
    layerwise_decay: float = 0.9  # lr multiplier per block below the top (1.0 = off)
    backbone_lr_mult: float = 1.0  # dinokit: lr multiplier of the student backbone (on top of layer-wise decay)
    adamw_beta1: float = 0.9  # AdamW beta1
    adamw_beta2: float = 0.999  # AdamW beta2
    # DINOv3's schedules.lr (v2 form; start, peak and end scaled by scaling_rule as base_lr), in place of the
    # warm-up from 0 to lr and the cosine to min_lr (warmup_epochs and min_lr then unused); null: those
    lr_schedule: WeightScheduleConfig | None = None


@dataclass
class CropsConfig:
    """Official ``crops``: multi-crop augmentation."""

    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])  # RandomResizedCrop area range
    local_crops_number: int = 8  # local crops per image (0 = none)
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])  # area range of local crops
    # global crop side; also the backbone img_size (518 in the eval presets). DINOv3: a list (with local_crops_size,
    # gram_teacher_crops_size and global_local_crop_pairs_ratios lists of the same length) mixes resolutions, one
    # (global, local, Gram) triple per iteration; the backbone's img_size is then the largest (config/crops.py)
    global_crops_size: Any = 224
    local_crops_size: Any = 96  # local crop side (a list: one per global_crops_size entry)
    global_local_crop_pairs_ratios: Any = 1.0  # DINOv3: the probability of each triple (normalised to sum to 1)
    # dinokit: "official" = the blur the released models were trained with (global 1: 0, global 2: 0.9,
    # local: 0.5; the official code inverts its p, PR #411); "intended" = as written (1.0, 0.1, 0.5).
    blur_probabilities: str = "official"
    # dinokit: probability that a crop is turned grey (official 0.2, in the code, not a key); more stops a small
    # run from matching crops by their colour when colour does not tell the classes apart (the small preset)
    grayscale_probability: float = 0.2
    # dinokit: colour jitter at this many times the official strengths (brightness 0.4, contrast 0.4, saturation 0.2,
    # hue 0.1 capped at 0.5; factors in [max(0, 1 - s), 1 + s]); 1 = official
    color_jitter_strength: float = 1.0
    # dinokit: "pil" = per-image PIL transforms in the data workers; "tensor" = the same distributions on
    # batched uint8/float tensors (dinokit.data.tensor_augment), applied by the collate in the workers;
    # "device" = the workers only decode and draw the crop parameters, and the training loop makes the crops
    # on the training device (the GPU) when it moves the batch there: the same crops as "tensor".
    augmentation: str = "pil"
    # DINOv3: the Gram teacher's own crops (high-resolution Gram anchoring, L_HRef): each global crop's region also
    # at this side (e.g. twice the global size); the Gram teacher's patch features are resized to the student's
    # grid (gram.global_teacher_resize_method). null: the Gram teacher sees the global crops.
    gram_teacher_crops_size: Any = None  # (a list under mixed resolutions: one per global_crops_size entry)
    gram_teacher_no_distortions: bool = False  # DINOv3: the Gram crops without colour, blur and solarize
    horizontal_flips: bool = True  # DINOv3: false turns the crops' random horizontal flips off (its high-res stage)


@dataclass
class KnnDatasetConfig:
    """dinokit: datasets of the k-NN evaluation run during training (either null = no k-NN)."""

    train: str | None = None  # dataset string of the k-NN memory bank, e.g. Sample:split=TRAIN
    val: str | None = None  # dataset string of the queries, e.g. Sample:split=VAL


@dataclass
class EvaluationConfig:
    """Official ``evaluation``, plus dinokit's k-NN monitor."""

    eval_period_iterations: int = 12500  # iterations between teacher snapshots in output_dir/eval/
    knn_dataset: KnnDatasetConfig | None = field(default_factory=KnnDatasetConfig)  # dinokit (null = no k-NN)
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # dinokit: neighbour counts (official)
    knn_temperature: float = 0.07  # dinokit: temperature of the k-NN vote weights (official)
    knn_image_size: int | None = None  # dinokit: side of the k-NN images (null: the global crop size; eval knn: 224)


@dataclass
class WeightScheduleConfig:
    """DINOv3's "v2" schedule of a loss weight (``linear_warmup_cosine_decay``): linear from ``start`` towards
    ``peak`` over ``warmup_epochs`` (``peak`` itself not reached), a half-cosine from ``peak`` to ``end`` over
    ``cosine_epochs`` (null: the rest of the run), then ``end``. ``peak: 0, end: w`` is a ramp up to w."""

    start: float = 0.0
    peak: float = 0.0
    end: float = 0.0
    warmup_epochs: float = 0.0  # epochs of train.OFFICIAL_EPOCH_LENGTH iterations
    cosine_epochs: float | None = None  # null: every epoch after the warm-up


@dataclass
class GramConfig:
    """DINOv3's Gram anchoring (dinokit implements the keys below; off by default).

    The loss compares Gram matrices of the L2-normalised patch features of the student's (masked) global crops
    with those of a Gram teacher on the same crops: an earlier EMA teacher, refreshed every
    ``update_frequency`` iterations, or the EMA teacher itself (``ema_teacher``).
    """

    use_loss: bool = False  # add w * L_gram to the loss
    compute_stats: bool = False  # also log it over the masked and unmasked patches (without use_loss: only logged)
    loss_weight: float = 1.0  # w
    loss_weight_schedule: WeightScheduleConfig | None = None  # w per iteration instead (DINOv3); null: loss_weight
    ema_teacher: bool = False  # the EMA teacher is the Gram teacher (no copy; ckpt/rep_update unused)
    ckpt: str = ""  # teacher_checkpoint.pth (or run folder) of the first Gram teacher (heads ignored)
    it_load_ema_teacher: int = -1  # without ckpt: iteration at which the EMA teacher is copied in (loss off before)
    rep_update: bool = True  # refresh the Gram teacher from the EMA teacher ...
    update_frequency: int = 50000  # ... when (it + 1) % update_frequency == 0 ...
    it_first_update: int = 0  # ... and it + 1 >= it_first_update ...
    max_updates: int | None = None  # ... at most this many times (null: no limit)
    normalized: bool = True  # L2-normalise patch features before the Gram matrix
    img_level: bool = False  # one Gram matrix per image (else one over all patches of the local batch)
    remove_neg: bool = False  # clamp negative similarities (both matrices) to 0
    remove_only_teacher_neg: bool = False  # clamp the teacher's negatives; zero the student's where both are negative
    tokens_used: str = "all"  # all, masked or unmasked student patches (masked/unmasked need img_level false)
    global_teacher_resize_method: str = "bicubic"  # resizing the Gram teacher's features to the student's grid
    global_teacher_resize_antialias: bool = False  # ... with antialiasing (bilinear and bicubic only)


@dataclass
class DistillationConfig:
    """dinokit: ``dinokit distill``, a frozen teacher distilled into one or several students.

    The students are described by ``student.*`` (and the heads by ``dino.*``/``ibot.*``); each entry of
    ``students`` overrides some ``student.*`` keys for one more student sharing the teacher's forward pass.
    """

    teacher: str = ""  # a dinokit train run folder, a teacher_checkpoint.pth beside its run's config.yaml, or a backbone file
    teacher_config: str = ""  # the teacher run's config.yaml when it is not found beside the teacher file
    loss: str = "dino_ibot"  # dino_ibot: the teacher's DINO/iBOT heads give the targets (paper); features: its tokens
    ibot_positions: str = "all"  # all patch tokens of both global crops (DINOv2 paper) or masked (DINOv3 subset)
    feature_loss: str = "cosine"  # loss=features: cosine or smooth_l1 between projected student and teacher tokens
    feature_patch_weight: float = 1.0  # loss=features: weight of the patch-token term (the class-token term has 1)
    students: list[dict[str, Any]] = field(default_factory=list)  # more: [{name: s, arch: vit_small, ...}, ...]


@dataclass
class SSLConfig:
    """The whole training configuration, in the official section order."""

    MODEL: ModelConfig = field(default_factory=ModelConfig)
    compute_precision: ComputePrecisionConfig = field(default_factory=ComputePrecisionConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IBotConfig = field(default_factory=IBotConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    gram: GramConfig = field(default_factory=GramConfig)  # DINOv3
    distillation: DistillationConfig = field(default_factory=DistillationConfig)  # dinokit
