"""The training configuration: official defaults and presets, overrides, errors, round trip, lr scaling."""

from __future__ import annotations

import math
from importlib import resources

import pytest
import torch
from omegaconf import OmegaConf

from dinokit.errors import DinokitError
from dinokit.config.loading import (
    SSLConfig,
    apply_scaling_rules,
    as_dataclass,
    compute_dtype,
    list_presets,
    load_config,
    write_config,
)
from dinokit.config.validation import validate

PRESETS = [
    "train/continued", "train/demo", "train/distill_demo", "train/small", "train/vitg14", "train/vitg14_highres",
    "train/vitl14",
    "train/vitl14_distilled", "train/vitl14_highres", "train/vitl16_short",
    "eval/vitb14_pretrain", "eval/vitb14_reg4_pretrain", "eval/vitg14_pretrain", "eval/vitg14_reg4_pretrain",
    "eval/vitl14_pretrain", "eval/vitl14_reg4_pretrain", "eval/vits14_pretrain", "eval/vits14_reg4_pretrain",
]  # fmt: skip


def test_defaults_are_the_official_ones() -> None:
    cfg = load_config(None)
    assert cfg.MODEL.WEIGHTS == ""
    precision = cfg.compute_precision
    assert precision.grad_scaler is True
    for role in ("teacher", "student"):
        for module in ("backbone", "dino_head", "ibot_head"):
            node = precision[role][module]
            assert node.sharding_strategy == "SHARD_GRAD_OP"
            reduce = "fp32" if role == "student" and module != "backbone" else "fp16"
            assert dict(node.mixed_precision) == {"param_dtype": "fp16", "reduce_dtype": reduce, "buffer_dtype": "fp32"}
    assert dict(cfg.dino) == {
        "loss_weight": 1.0, "head_n_prototypes": 65536, "head_bottleneck_dim": 256, "head_nlayers": 3,
        "head_hidden_dim": 2048, "koleo_loss_weight": 0.1,
        "reweight_dino_local_loss": False, "local_loss_weight_schedule": None,  # DINOv3's keys, off
        "koleo_loss_distributed": False, "koleo_loss_group_size": None,
    }  # fmt: skip
    assert cfg.ibot.mask_ratio_min_max == [0.1, 0.5] and cfg.ibot.mask_sample_probability == 0.5
    assert cfg.ibot.separate_head is False and cfg.ibot.head_n_prototypes == 65536
    train = cfg.train
    assert (train.batch_size_per_gpu, train.dataset_path, train.output_dir) == (64, "ImageNet:split=TRAIN", ".")
    assert (train.saveckp_freq, train.seed, train.num_workers, train.OFFICIAL_EPOCH_LENGTH) == (20, 0, 10, 1250)
    assert train.cache_dataset is True and train.centering == "centering" and train.log_freq == 10
    student = cfg.student
    assert (student.arch, student.patch_size) == ("vit_large", 16)
    assert (student.drop_path_rate, student.layerscale) == (0.3, 1e-5)
    assert student.drop_path_uniform is True and student.ffn_layer == "mlp" and student.block_chunks == 0
    assert (student.num_register_tokens, student.interpolate_antialias, student.interpolate_offset) == (0, False, 0.1)
    assert dict(cfg.teacher) == {
        "momentum_teacher": 0.992, "final_momentum_teacher": 1.0, "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30,
    }  # fmt: skip
    optim = cfg.optim
    assert (optim.epochs, optim.weight_decay, optim.weight_decay_end) == (100, 0.04, 0.4)
    assert (optim.base_lr, optim.lr) == (0.004, 0)
    assert (optim.warmup_epochs, optim.min_lr, optim.clip_grad, optim.freeze_last_layer_epochs) == (10, 1e-6, 3.0, 1)
    assert (optim.scaling_rule, optim.patch_embed_lr_mult, optim.layerwise_decay) == ("sqrt_wrt_1024", 0.2, 0.9)
    assert (optim.adamw_beta1, optim.adamw_beta2) == (0.9, 0.999)
    crops = cfg.crops
    assert crops.global_crops_scale == [0.32, 1.0] and crops.local_crops_scale == [0.05, 0.32]
    assert (crops.local_crops_number, crops.global_crops_size, crops.local_crops_size) == (8, 224, 96)
    assert crops.blur_probabilities == "official" and precision.dtype == "auto"
    assert cfg.evaluation.eval_period_iterations == 12500
    assert cfg.evaluation.knn_dataset.train is None and cfg.evaluation.knn_dataset.val is None


def test_default_yaml_file_spells_out_the_schema() -> None:
    text = (resources.files("dinokit") / "configs" / "ssl_default_config.yaml").read_text()
    assert OmegaConf.create(text) == OmegaConf.structured(SSLConfig)
    assert load_config("ssl_default_config") == load_config(None)


def test_every_preset_loads() -> None:
    assert list_presets() == PRESETS
    for name in PRESETS:
        given = ["student.resume_from_teacher_chkpt=/runs/base"] if name.endswith("_highres") else []
        assert load_config(name, given) == load_config(name.split("/")[1] + ".yaml", given)


def test_a_value_marked_missing_must_be_given(tmp_path) -> None:
    """``???`` in a preset or file is mandatory: one line naming the key until an override gives it (a merge
    alone would keep the default, and the high-resolution stage would start from scratch)."""
    key = "student.resume_from_teacher_chkpt"
    with pytest.raises(DinokitError, match=rf"^preset 'train/vitl14_highres' needs a value for {key} "
                                           rf"\(marked \?\?\?\): add {key}=\.\.\. to the command$"):
        load_config("vitl14_highres")
    assert load_config("vitg14_highres", [f"{key}=/runs/base"]).student.resume_from_teacher_chkpt == "/runs/base"
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  epochs: ???\nstudent:\n  pretrained_weights: ???\n")
    with pytest.raises(DinokitError, match="needs a value for optim.epochs, student.pretrained_weights .*add "
                                           "optim.epochs=... student.pretrained_weights=..."):
        load_config(path, ["train.seed=1"])
    assert load_config(path, ["optim.epochs=30", "student.pretrained_weights=w.pth"]).optim.epochs == 30
    # read for its architecture only (evaluation, embed): the default stays, nothing is asked for
    assert load_config("vitl14_highres", to_train=False).student.resume_from_teacher_chkpt == ""


def test_vitl14_and_vitg14_presets() -> None:
    cfg = load_config("vitl14")
    assert (cfg.dino.head_n_prototypes, cfg.dino.head_bottleneck_dim) == (131072, 384)
    assert cfg.ibot.separate_head is True
    assert (cfg.ibot.head_n_prototypes, cfg.ibot.head_bottleneck_dim) == (131072, 256)
    assert (cfg.train.batch_size_per_gpu, cfg.train.dataset_path) == (32, "ImageNet22k")
    assert cfg.train.centering == "sinkhorn_knopp"
    student = cfg.student
    assert (student.arch, student.patch_size, student.drop_path_rate) == ("vit_large", 14, 0.4)
    assert (student.ffn_layer, student.block_chunks) == ("swiglufused", 4)
    assert cfg.teacher.momentum_teacher == 0.994
    optim = cfg.optim
    assert (optim.epochs, optim.weight_decay_end, optim.base_lr, optim.warmup_epochs) == (500, 0.2, 2e-4, 80)
    assert optim.layerwise_decay == 1.0 and cfg.crops.local_crops_size == 98
    vitg = load_config("train/vitg14")
    assert (vitg.student.arch, vitg.train.batch_size_per_gpu) == ("vit_giant2", 12)
    vitg.student.arch, vitg.train.batch_size_per_gpu = "vit_large", 32
    assert vitg == cfg  # otherwise identical
    short = load_config("vitl16_short")
    assert (short.train.batch_size_per_gpu, short.student.block_chunks, short.student.patch_size) == (64, 4, 16)


@pytest.mark.parametrize("size,arch", [("s", "vit_small"), ("b", "vit_base"), ("l", "vit_large"), ("g", "vit_giant2")])
def test_eval_presets(size: str, arch: str) -> None:
    plain, reg4 = load_config(f"eval/vit{size}14_pretrain"), load_config(f"vit{size}14_reg4_pretrain")
    for cfg in (plain, reg4):
        assert (cfg.student.arch, cfg.student.patch_size) == (arch, 14)
        assert (cfg.crops.global_crops_size, cfg.crops.local_crops_size) == (518, 98)
        assert cfg.student.ffn_layer == ("swiglufused" if size == "g" else "mlp")
    student = plain.student
    assert (student.num_register_tokens, student.interpolate_antialias, student.interpolate_offset) == (0, False, 0.1)
    student = reg4.student
    assert (student.num_register_tokens, student.interpolate_antialias, student.interpolate_offset) == (4, True, 0.0)


def test_files_merge_in_turn(tmp_path) -> None:
    """Several files (``--config-file small --config-file mine.yaml``): each merges over the ones before, so a file of
    a few keys extends a preset; a later file fills a key an earlier one marks ``???``; errors name their file."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("optim:\n  epochs: 30\ntrain:\n  dataset_path: /data/photos\n")
    cfg = load_config(["small", mine])
    small = load_config("small")
    assert (cfg.optim.epochs, cfg.train.dataset_path) == (30, "/data/photos")
    assert cfg.student.arch == small.student.arch and cfg.optim.base_lr == small.optim.base_lr  # the rest: the preset
    assert cfg.student.arch != load_config(mine).student.arch  # alone, the file extends the defaults
    assert load_config(["small", mine], ["optim.epochs=50"]).optim.epochs == 50  # overrides come last
    base = tmp_path / "base.yaml"
    base.write_text("student:\n  resume_from_teacher_chkpt: /runs/base\n")
    assert load_config(["vitl14_highres", base]).student.resume_from_teacher_chkpt == "/runs/base"
    with pytest.raises(DinokitError, match=r"^preset 'train/vitl14_highres' \+ config file '.*mine.yaml' needs a "
                                           r"value for student.resume_from_teacher_chkpt"):
        load_config(["vitl14_highres", mine])
    mine.write_text("optim:\n  epoch: 3\n")
    with pytest.raises(DinokitError, match=r"unknown config key 'optim.epoch' \(did you mean 'optim.epochs'\?\), in "
                                           r"config file '.*mine.yaml'$"):
        load_config(["small", mine])


def test_demo_preset() -> None:
    cfg = load_config("demo")
    assert (cfg.student.arch, cfg.student.patch_size, cfg.student.drop_path_rate) == ("vit_pico", 8, 0.0)
    assert (cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number) == (64, 32, 4)
    assert (cfg.dino.head_n_prototypes, cfg.ibot.head_hidden_dim, cfg.ibot.head_bottleneck_dim) == (256, 256, 64)
    assert (cfg.train.dataset_path, cfg.train.OFFICIAL_EPOCH_LENGTH, cfg.optim.epochs) == ("Sample:split=TRAIN", 50, 16)
    assert (cfg.student.layerscale, cfg.teacher.momentum_teacher, cfg.teacher.teacher_temp) == (0.1, 0.99, 0.04)
    assert dict(cfg.evaluation.knn_dataset) == {"train": "Sample:split=TRAIN", "val": "Sample:split=VAL"}


def test_official_style_partial_yaml_loads_unchanged(tmp_path) -> None:
    path = tmp_path / "custom.yaml"
    path.write_text(
        "dino:\n  head_n_prototypes: 131072\n  head_bottleneck_dim: 384\n"
        "ibot:\n  separate_head: true\n"
        "train:\n  batch_size_per_gpu: 32\n  dataset_path: ImageNet:split=TRAIN:root=/data/in1k:extra=/data/extra\n"
        "student:\n  arch: vit_large_memeff\n  layerscale: 1e-5\n"
        "optim:\n  base_lr: 2.0e-04\n  epochs: 500\n  warmup_epochs: 80\n"
        "crops:\n  global_crops_scale:\n  - 0.32\n  - 1.0\n"
        "evaluation:\n  # eval_period_iterations: 12500\n"  # an empty section
    )
    cfg = load_config(str(path))
    assert cfg.dino.head_n_prototypes == 131072 and cfg.ibot.separate_head is True
    assert cfg.train.dataset_path == "ImageNet:split=TRAIN:root=/data/in1k:extra=/data/extra"
    assert cfg.student.arch == "vit_large_memeff" and cfg.student.layerscale == 1e-5
    assert cfg.optim.base_lr == 2e-4 and cfg.optim.weight_decay == 0.04  # untouched keys keep their defaults
    assert cfg.ibot.head_bottleneck_dim == 256


def test_overrides_with_lists_and_dataset_strings() -> None:
    cfg = load_config(
        "vitl14",
        [
            "optim.epochs=2",
            "optim.warmup_epochs=1",
            "optim.base_lr=1e-3",
            "crops.global_crops_scale=[0.3,1.0]",
            "evaluation.knn_dataset.train=Sample:split=TRAIN",
            "evaluation.knn_dataset.val=ImageFolder:root=/data/a=b:c",
            "MODEL.WEIGHTS=",
            "student.pretrained_weights=/ckpt/true.pth",
            "train.dataset_path=123",
        ],
    )
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.base_lr) == (2, 1, 1e-3)
    assert cfg.crops.global_crops_scale == [0.3, 1.0]
    assert cfg.evaluation.knn_dataset.train == "Sample:split=TRAIN"
    assert cfg.evaluation.knn_dataset.val == "ImageFolder:root=/data/a=b:c"
    assert cfg.MODEL.WEIGHTS == "" and cfg.student.pretrained_weights == "/ckpt/true.pth"
    assert cfg.train.dataset_path == "123"
    off = load_config("demo", ["evaluation.knn_dataset.train=null", "evaluation.knn_dataset.val=~"])
    assert off.evaluation.knn_dataset.val is None
    assert load_config("demo", ["evaluation.knn_dataset=null"]).evaluation.knn_dataset is None  # k-NN off


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("train.epochs=3", "unknown config key 'train.epochs' (did you mean 'optim.epochs'?)"),
        ("model.weights=x", "unknown config key 'model' (did you mean 'MODEL'?)"),
        ("foo=1", "unknown config key 'foo' (sections: MODEL, compute_precision,"),
        ("optim.epochs.x=1", "unknown config key 'optim.epochs.x' ('optim.epochs' is a value, not a section)"),
        ("optim.epochs=ten", "config key 'optim.epochs' expects int, got 'ten', in override 'optim.epochs=ten'"),
        ("train.seed=1.5", "config key 'train.seed' expects int, got 1.5"),
        ("ibot.separate_head=maybe", "config key 'ibot.separate_head' expects bool, got 'maybe'"),
        ("crops.global_crops_scale=0.3", "config key 'crops.global_crops_scale' expects a list of float, got 0.3"),
        ("crops.local_crops_scale=[0.1,x]", "config key 'crops.local_crops_scale[1]' expects float, got 'x'"),
        ("MODEL.WEIGHTS=null", "config key 'MODEL.WEIGHTS' expects str, got null"),
        ("optim=3", "config key 'optim' expects a section of keys (epochs, weight_decay,"),
        ("optim.epochs", "override 'optim.epochs' is not key=value"),
        ("student.arch=vit_huge", "config key 'student.arch' is 'vit_huge'; use one of: vit_pico, vit_nano, vit_tiny,"),
        ("student.ffn_layer=gelu", "config key 'student.ffn_layer' is 'gelu'; use one of: mlp, swiglu, swiglufused"),
        ("train.centering=sk", "config key 'train.centering' is 'sk'; use one of: centering, sinkhorn_knopp"),
        ("optim.scaling_rule=cubic", "config key 'optim.scaling_rule' is 'cubic'; use one of: sqrt_wrt_1024"),
        ("compute_precision.dtype=fp8", "config key 'compute_precision.dtype' is 'fp8'; use one of: auto, fp16"),
        (
            "compute_precision.teacher.ibot_head.sharding_strategy=ZERO3",
            "config key 'compute_precision.teacher.ibot_head.sharding_strategy' is 'ZERO3'; use one of: FULL_SHARD",
        ),
        (
            "compute_precision.student.dino_head.mixed_precision.reduce_dtype=half",
            "config key 'compute_precision.student.dino_head.mixed_precision.reduce_dtype' is 'half'",
        ),
        ("crops.blur_probabilities=fixed", "config key 'crops.blur_probabilities' is 'fixed'; use one of: official"),
        ("crops.global_crops_size=60", "key 'crops.global_crops_size' is 60, not a multiple of student.patch_size"),
        ("crops.local_crops_scale=[0.5,0.1]", "config key 'crops.local_crops_scale' is [0.5, 0.1]; give [low, high]"),
        ("crops.global_crops_scale=[0,1]",  # a ZeroDivisionError after config.yaml was written
         "config key 'crops.global_crops_scale' is [0.0, 1.0]; give [low, high] with 0 < low <= high <= 1"),
        ("train.batch_size_per_gpu=0", "config key 'train.batch_size_per_gpu' is 0; it must be above 0"),
        ("optim.warmup_epochs=30", "config key 'optim.warmup_epochs' (30) exceeds optim.epochs (16)"),
        ("evaluation.knn_k=[10,0]", "config key 'evaluation.knn_k' is [10, 0]; give positive neighbour counts"),
        ("evaluation.knn_dataset=3", "key 'evaluation.knn_dataset' expects a section of keys (train, val) or null"),
        ("evaluation.knn_dataset.val=null", "set both evaluation.knn_dataset.train and evaluation.knn_dataset.val"),
        # used to end in a traceback from torch (seed, betas) or to train silently on nonsense (temperatures...)
        ("train.seed=-1", "config key 'train.seed' is -1; it must be at least 0"),
        # 2^64 was a traceback from torch.manual_seed, once every process had started
        (f"train.seed={2**64}", f"config key 'train.seed' is {2**64}; a seed must be from 0 to 2^32 - 1"),
        ("student.layerscale=-1", "config key 'student.layerscale' is -1.0; it must be at least 0"),
        ("optim.adamw_beta1=1.5", "config key 'optim.adamw_beta1' is 1.5; it must be in [0, 1)"),
        ("optim.adamw_beta2=-1", "config key 'optim.adamw_beta2' is -1.0; it must be in [0, 1)"),
        ("optim.adamw_beta2=1", "config key 'optim.adamw_beta2' is 1.0; it must be in [0, 1)"),
        ("teacher.teacher_temp=0", "config key 'teacher.teacher_temp' is 0.0; it must be above 0"),
        ("teacher.warmup_teacher_temp=-1", "config key 'teacher.warmup_teacher_temp' is -1.0; it must be above 0"),
        ("teacher.momentum_teacher=2", "config key 'teacher.momentum_teacher' is 2.0; it must be in [0, 1]"),
        ("teacher.final_momentum_teacher=-0.5", "key 'teacher.final_momentum_teacher' is -0.5; it must be in [0, 1]"),
        ("optim.weight_decay=-5", "config key 'optim.weight_decay' is -5.0; it must be at least 0"),
        ("optim.weight_decay_end=-0.1", "config key 'optim.weight_decay_end' is -0.1; it must be at least 0"),
        ("optim.clip_grad=-1", "config key 'optim.clip_grad' is -1.0; it must be at least 0"),
        ("optim.layerwise_decay=1.5", "config key 'optim.layerwise_decay' is 1.5; it must be in (0, 1]"),
        # DINOv3's local-crop reweighting: the switch and its schedule go together (neither silently does nothing)
        ("dino.reweight_dino_local_loss=true", "dino.reweight_dino_local_loss needs dino.local_loss_weight_schedule"),
        ("dino.local_loss_weight_schedule={start: 1, peak: 1, end: 0.5, warmup_epochs: 0}",
         "dino.local_loss_weight_schedule is set but dino.reweight_dino_local_loss is false"),
        # iBOT on, but no patch ever masked: its loss was 0 every step (the official code asserts both)
        ("ibot.mask_sample_probability=0", "ibot.loss_weight is 1.0 but no patch would ever be masked"),
        ("ibot.mask_ratio_min_max=[0,0]", "ibot.mask_ratio_min_max [0.0, 0.0]); raise them (official 0.5 and"),
        # scaling overwrote it silently, as the official code does
        ("optim.lr=5", "override 'optim.lr=5': optim.lr is computed from optim.base_lr for the total batch"),
    ],
)
def test_override_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(DinokitError) as info:
        load_config("demo", [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_range_limits_are_accepted() -> None:
    cfg = load_config("demo", ["train.seed=0", "optim.adamw_beta1=0", "optim.adamw_beta2=0.9999", "optim.clip_grad=0",
                               "teacher.momentum_teacher=0", "teacher.final_momentum_teacher=1", "optim.weight_decay=0",
                               "optim.weight_decay_end=0", "teacher.teacher_temp=0.01"])
    assert (cfg.optim.clip_grad, cfg.optim.adamw_beta2, cfg.teacher.final_momentum_teacher) == (0.0, 0.9999, 1.0)


def test_file_errors(tmp_path) -> None:
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(DinokitError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\), in config"):
        load_config(str(bad_key))
    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("student:\n  patch_size: fourteen\n")
    with pytest.raises(DinokitError, match="config key 'student.patch_size' expects int, got 'fourteen'"):
        load_config(str(bad_type))
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [1,\n")
    with pytest.raises(DinokitError, match="is not valid YAML"):
        load_config(str(broken))
    with pytest.raises(DinokitError, match=r"neither a YAML file nor a preset; presets: .*demo, distill_demo, .*vitg14, .*vits14_"):
        load_config("vitl99")
    with pytest.raises(DinokitError, match="neither a YAML file nor a preset"):
        load_config(str(tmp_path / "missing.yaml"))


def test_binary_config_file_is_one_line(tmp_path) -> None:
    """A checkpoint or other binary file given as --config-file used to end in a UnicodeDecodeError traceback."""
    import torch

    ckpt = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(3)}, ckpt)
    with pytest.raises(DinokitError) as info:
        load_config(str(ckpt))
    assert str(info.value) == (f"config file '{ckpt}' is not a text YAML file; it looks like a checkpoint: weights go "
                               "to --weights, --pretrained-weights or student.pretrained_weights, not --config-file")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("optim:\n  epochs: 30  # r\xe9glage\n".encode("latin-1"))  # not UTF-8, no NUL byte
    with pytest.raises(DinokitError) as info:
        load_config(str(latin))
    assert str(info.value) == (f"config file '{latin}' is not a text YAML file (not UTF-8: byte 0xe9 at position 24); "
                               "give a YAML file saved as UTF-8")
    utf8 = tmp_path / "utf8.yaml"
    utf8.write_text("optim:\n  epochs: 30  # r\xe9glage\n", encoding="utf-8")
    assert load_config(str(utf8)).optim.epochs == 30


def test_config_yaml_round_trip(tmp_path) -> None:
    cfg = load_config("demo", ["evaluation.knn_dataset.val=ImageFolder:root=/x:y", "train.output_dir=" + str(tmp_path)])
    apply_scaling_rules(cfg, world_size=2)
    path = write_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    again = load_config(str(path))
    assert again == cfg
    assert as_dataclass(again).optim.lr == pytest.approx(0.02 * math.sqrt(64 / 1024))
    assert write_config(again, tmp_path / "run2").read_text() == path.read_text()


def test_scaling_rules() -> None:
    short = apply_scaling_rules(load_config("vitl16_short"), world_size=32)  # 2048 images per step
    assert short.optim.lr == pytest.approx(0.004 * math.sqrt(2))
    vitl = apply_scaling_rules(load_config("vitl14"), world_size=96)  # 3072
    vitg = apply_scaling_rules(load_config("vitg14"), world_size=256)  # 3072
    assert vitl.optim.lr == pytest.approx(2e-4 * math.sqrt(3)) and vitg.optim.lr == pytest.approx(3.4641e-4, rel=1e-4)
    linear = apply_scaling_rules(load_config("demo", ["optim.scaling_rule=linear_wrt_256"]), world_size=16)  # 512
    assert linear.optim.lr == pytest.approx(0.02 * 2)
    assert apply_scaling_rules(load_config("demo", ["optim.scaling_rule=none"]), world_size=16).optim.lr == 0.02
    cfg = load_config("demo")
    cfg.optim.scaling_rule = "cubic"
    with pytest.raises(DinokitError, match="optim.scaling_rule"):
        apply_scaling_rules(cfg, world_size=1)
    with pytest.raises(DinokitError, match="optim.scaling_rule"):
        validate(cfg)


def test_compute_dtype() -> None:
    assert compute_dtype("auto", "cpu") is torch.float32
    assert compute_dtype("bf16", "cpu") is torch.bfloat16 and compute_dtype("fp16", "cuda") is torch.float16
    with pytest.raises(DinokitError, match="compute_precision.dtype"):
        compute_dtype("int8", "cpu")


def test_distributed_koleo_group_size_is_checked():
    """DINOv3's distributed KoLeo: a group size of 1 or more, only with the distributed loss, dividing the world."""
    from dinokit.config import check_koleo_group

    for overrides, message in ((["dino.koleo_loss_distributed=true", "dino.koleo_loss_group_size=0"],
                                "dino.koleo_loss_group_size is 0; set it to 1 or more"),
                               (["dino.koleo_loss_group_size=16"],
                                "dino.koleo_loss_group_size=16 does nothing without dino.koleo_loss_distributed=true")):
        with pytest.raises(DinokitError, match=message):
            load_config("demo", overrides)
    cfg = load_config("demo", ["dino.koleo_loss_distributed=true", "dino.koleo_loss_group_size=16"])
    check_koleo_group(cfg.dino, 8)  # more than the world: one group of all
    check_koleo_group(cfg.dino, 32)
    with pytest.raises(DinokitError, match="dino.koleo_loss_group_size=16 does not divide the 24 processes"):
        check_koleo_group(cfg.dino, 24)
