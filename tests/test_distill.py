"""Distillation: the paper's recipe piece by piece, heterogeneous students, several students per teacher forward,
feature distillation from a bare backbone file, exact resume, one-line errors, and the proof that it pays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinokit.cli import main
from dinokit.config import backbone_from_config, load_config, write_config
from dinokit.data import write_sample_dataset
from dinokit.distill import DistillationTask, build_teacher, distill, resolve_teacher, student_sections
from dinokit.engine import Engine, build_schedulers
from dinokit.errors import DinokitError
from dinokit.models import build_backbone
from dinokit.models.checkpoint import save_backbone
from dinokit.train.ssl_meta_arch import SSLMetaArch
from dinokit.train.train import engine_config, save_teacher_snapshot

from tiny import tiny_run

# the students come from the distillation presets
TINY = [*tiny_run(student=False, prototypes=64, hidden=32, bottleneck=16, local_crops=2, batch=4, eval_period=3),
        "optim.freeze_last_layer_epochs=0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("sample"), counts={"train": 3, "val": 2}, image_size=40)


def make_teacher_run(root: Path, *extra: str) -> Path:
    """A teacher 'run folder' (config.yaml + eval/training_9/teacher_checkpoint.pth) of a randomly initialised model."""
    cfg = load_config("demo", [*TINY, "student.arch=vit_pico", "student.patch_size=8", *extra])
    torch.manual_seed(1)
    model = SSLMetaArch(cfg).eval()
    write_config(cfg, root)
    save_teacher_snapshot(model, root / "eval" / "training_9" / "teacher_checkpoint.pth")
    return root


def distill_cfg(images: Path, teacher: Path, *extra: str):
    return load_config("distill_demo", [*TINY, f"train.dataset_path=ImageFolder:root={images / 'train'}",
                                        f"distillation.teacher={teacher}", *extra])


def build_task(cfg) -> DistillationTask:
    source = resolve_teacher(cfg.distillation.teacher, cfg.distillation.teacher_config)
    teacher, _ = build_teacher(source, with_heads=cfg.distillation.loss == "dino_ibot")
    return DistillationTask(cfg, teacher=teacher, students=student_sections(cfg))


def one_batch(cfg, images: Path):
    from dinokit.train.data import build_train_loader

    return next(iter(build_train_loader(cfg, start_iteration=0, pin_memory=False)))


def test_paper_recipe_pieces(images, tmp_path):
    teacher_dir = make_teacher_run(tmp_path / "teacher")
    cfg = distill_cfg(images, teacher_dir)
    task = build_task(cfg)
    student = task.students["student"]
    assert all(blk.drop_path_rate == 0 for blk in student.backbone.blocks)  # no stochastic depth
    assert set(student) == {"backbone", "dino_head"}  # own heads, the teacher's layout (shared iBOT head)
    assert student.dino_head.last_layer.weight_v.shape[0] == 64  # the teacher's prototype count

    calls = {}
    backbone_forward = type(student.backbone).forward

    def spy(self, x, masks=None, **kw):
        calls.setdefault(id(self), []).append(masks)
        return backbone_forward(self, x, masks=masks, **kw)

    original = task.ibot_masked_loss  # the objective's iBOT term (train.compile_loss may swap in a compiled one)

    def ibot_spy(logits, probs, student_masks_flat, n_masked_patches=None, masks_weight=None):
        calls["ibot"] = (logits.shape, probs.shape, student_masks_flat.clone(), masks_weight)
        return original(logits, probs, student_masks_flat, n_masked_patches, masks_weight)

    task.ibot_masked_loss = ibot_spy
    batch = one_batch(cfg, images)
    type(student.backbone).forward = spy
    try:
        out = task.compute_losses(batch, 0, {"teacher_temp": 0.04})
    finally:
        type(student.backbone).forward = backbone_forward
    # the student's crops are never masked (global and local crops in one call)
    assert calls[id(student.backbone)] == [[None, None]]
    # iBOT on all patch tokens of both global crops: 2 crops x 4 images x 16 patches, weights 1/16 each
    n_tokens = batch.global_crops.shape[0] * (32 // 8) ** 2
    logits_shape, probs_shape, masks_flat, weights = calls["ibot"]
    assert logits_shape == (n_tokens, 64) and probs_shape == (n_tokens, 64)
    assert bool(masks_flat.all()) and torch.equal(weights, torch.full((n_tokens,), 1 / 16))
    assert batch.masks.sum() < batch.masks.numel()  # while the collate's own masks cover only a part
    assert set(out.terms) == {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}


def test_frozen_teacher_and_ema_that_never_feeds_back(images, tmp_path):
    # Sinkhorn-Knopp targets carry no state between calls (a centre would move), so two calls can be compared
    cfg = distill_cfg(images, make_teacher_run(tmp_path / "teacher"), "train.centering=sinkhorn_knopp")
    task = build_task(cfg)
    teacher_before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    ema_before = {k: v.clone() for k, v in task.student_emas.state_dict().items()}
    student_before = {k: v.clone() for k, v in task.students.state_dict().items()}
    engine = Engine(task, engine_config(cfg, torch.device("cpu")), output_dir=tmp_path / "run",
                    device=torch.device("cpu"), schedules=build_schedulers(cfg))
    batch = one_batch(cfg, images)
    sched = {"lr": 1e-3, "wd": 0.04, "momentum": 0.9, "teacher_temp": 0.04, "last_layer_lr": 1e-3}
    for i in range(2):
        engine.step(batch, i, sched)
    assert all(torch.equal(v, teacher_before[k]) for k, v in task.teacher.state_dict().items())  # frozen
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert not any(torch.equal(v, student_before[k]) for k, v in task.students.state_dict().items()
                   if k.endswith("qkv.weight"))  # the students learn
    # EMA: m * ema + (1 - m) * student after each step, checked on one tensor by hand
    key = "student.backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(task.student_emas.state_dict()[key], ema_before[key])
    # ... and it never feeds back: the losses do not depend on the EMA
    task.eval()
    reference = task.compute_losses(batch, 0, {"teacher_temp": 0.04}).total
    with torch.no_grad():
        for p in task.student_emas.parameters():
            p.add_(1.0)
    assert torch.equal(task.compute_losses(batch, 0, {"teacher_temp": 0.04}).total, reference)


def test_ema_update_by_hand(images, tmp_path):
    cfg = distill_cfg(images, make_teacher_run(tmp_path / "teacher"))
    task = build_task(cfg)
    ema, student = task.student_emas["student"].backbone.cls_token, task.students["student"].backbone.cls_token
    with torch.no_grad():
        student.fill_(1.0)
        ema.fill_(0.0)
    task.after_step(0, {"momentum": 0.75})
    assert torch.allclose(ema, torch.full_like(ema, 0.25))


def test_heterogeneous_teacher_and_several_students_share_one_teacher_forward(images, tmp_path):
    # teacher: SwiGLU FFN, 4 registers, separate iBOT head; students: MLP, no registers, other widths and depths
    teacher_dir = make_teacher_run(tmp_path / "teacher", "student.ffn_layer=swiglufused", "student.num_register_tokens=4",
                                   "ibot.separate_head=true")
    students = "distillation.students=[{name: femto, arch: vit_femto}, {name: nano, arch: vit_nano, layerscale: 0}]"
    cfg = distill_cfg(images, teacher_dir, "ibot.separate_head=true", students)
    counted = {"n": 0}
    from dinokit.distill import task as task_module

    original_init = task_module.DistillationTask.__init__

    def counting_init(self, *a, **kw):
        original_init(self, *a, **kw)
        self.teacher.backbone.register_forward_hook(lambda *_: counted.__setitem__("n", counted["n"] + 1))

    task_module.DistillationTask.__init__ = counting_init
    try:
        summary = distill(cfg, output_dir=tmp_path / "run", device="cpu")
    finally:
        task_module.DistillationTask.__init__ = original_init
    assert summary["iteration"] == 6 and counted["n"] == 6  # one teacher forward per batch for both students
    lines = [json.loads(l) for l in (tmp_path / "run" / "training_metrics.json").read_text().splitlines()]
    assert {"femto/ibot_loss", "nano/dino_global_crops_loss"} <= set(lines[-1])
    for name, arch in (("femto", "vit_femto"), ("nano", "vit_nano")):
        run = tmp_path / "run" / name
        assert load_config(str(run / "config.yaml")).student.arch == arch
        snapshot = run / "eval" / "training_5" / "teacher_checkpoint.pth"
        # the student's snapshot loads as a plain backbone of its own architecture, found from its config.yaml
        student_cfg = load_config(str(run / "config.yaml"))
        from dinokit.models import load_backbone_weights

        load_backbone_weights(backbone_from_config(student_cfg.student, img_size=32), snapshot)
    assert not any("teacher" in k for k in torch.load(sorted((tmp_path / "run" / "checkpoints").glob("*.pth"))[-1],
                                                      weights_only=True)["model"])  # frozen teacher not checkpointed
    # the closing lines name every student's snapshot with its own config (only the first one was printed)
    from dinokit.cli.train import end_summary

    printed = end_summary(summary, 1.0, snapshot_label="student snapshot (EMA)").splitlines()
    for name in ("femto", "nano"):
        snap = tmp_path / "run" / name / "eval" / "training_5" / "teacher_checkpoint.pth"
        assert f"student snapshot (EMA): {snap}" in printed
        assert (f"next: dinokit embed IMAGES --config-file {tmp_path / 'run' / name / 'config.yaml'} --weights {snap} "
                "--out emb.npz") in printed


def test_feature_distillation_from_an_official_backbone_file(images, tmp_path, capsys):
    torch.manual_seed(0)
    official = build_backbone("vit_pico", patch_size=8, img_size=48, init_values=1.0, num_register_tokens=4,
                              interpolate_antialias=True, interpolate_offset=0.0)
    path = save_backbone(official, tmp_path / "dinov2_like_pretrain.pth")
    cfg = distill_cfg(images, path, "distillation.loss=features")
    task = build_task(cfg)
    assert task.teacher.backbone.num_register_tokens == 4 and task.teacher.backbone.embed_dim == 64
    assert isinstance(task.students["student"].projection, torch.nn.Linear)  # 48-d student -> 64-d teacher
    assert task.students["student"].projection.weight.shape == (64, 48)
    summary = distill(cfg, output_dir=tmp_path / "run", device="cpu")
    out = capsys.readouterr().out
    assert f"into the student (vit_femto), 24 images found in ImageFolder:root={images / 'train'}\n" in out
    local = cfg.crops.local_crops_number  # made, then never used: it said nothing (nor of packed crops, chunks...)
    assert ("note: distillation.loss=features matches the students' global-crop features to the teacher's, so "
            "crops.local_crops_number, " in out) == (local > 0)
    from dinokit.distill.run import features_loss_idle

    cfg.train.packed_crops, cfg.train.head_chunk_rows, cfg.crops.local_crops_number = True, 8, 2
    # and the head losses' settings given (the preset's teacher temperatures, a KoLeo weight): no heads, no targets
    cfg.dino.koleo_loss_weight = 5.0
    assert features_loss_idle(cfg) == ["crops.local_crops_number", "train.packed_crops", "train.head_chunk_rows",
                                       "dino.koleo_loss_weight", "teacher.teacher_temp",
                                       "teacher.warmup_teacher_temp_epochs"]
    cfg.distillation.loss, cfg.distillation.feature_patch_weight = "dino_ibot", 0.5  # a features setting, unused
    assert features_loss_idle(cfg) == ["distillation.feature_patch_weight"]
    cfg.distillation.loss = "features"
    lines = [json.loads(l) for l in (tmp_path / "run" / "training_metrics.json").read_text().splitlines()]
    assert summary["iteration"] == 6 and {"feature_cls_loss", "feature_patch_loss"} <= set(lines[-1])
    assert lines[-1]["feature_cls_loss"] < lines[0]["feature_cls_loss"]  # the student moves towards the teacher
    assert (tmp_path / "run" / "eval" / "training_5" / "teacher_checkpoint.pth").is_file()
    # a file that is not a backbone: one line naming it and what it holds
    wrong = tmp_path / "wrong.pth"
    torch.save({"optimizer": {}, "iteration": 3}, wrong)
    with pytest.raises(DinokitError) as err:
        distill(distill_cfg(images, wrong, "distillation.loss=features"), output_dir=tmp_path / "run2", device="cpu")
    assert str(err.value).startswith(f"'{wrong}' holds no ViT backbone tensors (its keys: optimizer, iteration)")


def test_cosine_feature_loss_by_hand():
    from dinokit.distill import feature_distillation_loss

    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert feature_distillation_loss(s, t, "cosine").item() == pytest.approx(0.5)  # (0 + 1) / 2


def test_kill_and_resume_is_bit_exact(images, tmp_path):
    teacher_dir = make_teacher_run(tmp_path / "teacher")
    cfg = lambda: distill_cfg(images, teacher_dir)  # noqa: E731
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    distill(cfg(), output_dir=straight, device="cpu")
    distill(cfg(), output_dir=resumed, device="cpu", stop_after=4)
    # the teacher run went on meanwhile: its newest snapshot is another one (the resume was refused, the teacher
    # path differing from the saved one); the students keep the teacher they started with
    started = sorted(teacher_dir.glob("eval/training_*/teacher_checkpoint.pth"))[-1]
    (teacher_dir / "eval" / "training_999").mkdir()
    later = teacher_dir / "eval" / "training_999" / "teacher_checkpoint.pth"
    later.write_bytes(started.read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        printed = []
        patch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
        assert distill(cfg(), output_dir=resumed, device="cpu")["iteration"] == 6
    assert (f"note: resuming with the teacher snapshot this distillation started from, {started} (the newest in "
            f"{teacher_dir} is now {later})") in printed
    a, b = (torch.load(sorted((d / "checkpoints").glob("*.pth"))[-1], weights_only=True) for d in (straight, resumed))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    la, lb = ([json.loads(l)["total_loss"] for l in (d / "training_metrics.json").read_text().splitlines()]
              for d in (straight, resumed))
    assert la[4:] == lb[4:]


def test_a_teacher_still_training_is_said(tmp_path, capsys):
    import os
    import socket

    teacher_dir = make_teacher_run(tmp_path / "teacher")
    (teacher_dir / ".dinokit.lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # a live process's lock
    source = resolve_teacher(str(teacher_dir))
    assert capsys.readouterr().out == (f"note: the teacher run {teacher_dir} is still training (process {os.getpid()} "
                                       f"on {socket.gethostname()}): its newest snapshot so far, {source.weights}, is "
                                       "the teacher\n")


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_a_training_checkpoint_is_a_teacher_with_its_heads(tmp_path):
    # Seen: --teacher RUN/checkpoints/checkpoint_N.pth said "has no dino_head"; the file holds the EMA teacher's.
    teacher_dir = make_teacher_run(tmp_path / "teacher")
    torch.manual_seed(2)
    model = SSLMetaArch(load_config(str(teacher_dir / "config.yaml")))
    ckpt = teacher_dir / "checkpoints" / "checkpoint_0000009.pth"
    ckpt.parent.mkdir()
    torch.save({"model": model.state_dict(), "optimizer": {}, "iteration": 9}, ckpt)
    teacher, _ = build_teacher(resolve_teacher(str(ckpt)), with_heads=True)
    assert set(teacher) == {"backbone", "dino_head"}  # iBOT shares the DINO head (ibot.separate_head false)
    for name, module in teacher.items():
        expected = getattr(model.teacher, name).state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in module.state_dict().items()), name


def test_one_line_errors(images, tmp_path, capsys):
    teacher_dir = make_teacher_run(tmp_path / "teacher")
    def base(teacher) -> list[str]:
        return ["distill", "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--teacher", str(teacher), *TINY,
                f"train.dataset_path=ImageFolder:root={images / 'train'}"]

    err = error_of(capsys, [*base(teacher_dir), "student.patch_size=16"])
    assert "patch size 16 but the teacher 8; set student.patch_size=8" in err
    err = error_of(capsys, [*base(teacher_dir), "dino.head_n_prototypes=32"])
    assert "set dino.head_n_prototypes=64" in err
    err = error_of(capsys, [*base(teacher_dir), "distillation.students=[{arhc: vit_femto}]"])
    assert "unknown student key 'distillation.students[0].arhc' (did you mean 'arch'?)" in err
    err = error_of(capsys, [*base(teacher_dir), "distillation.students=[{arch: vit_femto}, {arch: nosuch}]"])
    assert err.startswith("error: config key 'distillation.students[1].arch' is 'nosuch'; use one of: vit_pico, ")
    assert "vit_femto" in err and not (tmp_path / "out").exists()  # was a traceback after the folders were written
    lonely = tmp_path / "lonely" / "teacher_checkpoint.pth"
    lonely.parent.mkdir()
    lonely.write_bytes((teacher_dir / "eval" / "training_9" / "teacher_checkpoint.pth").read_bytes())
    err = error_of(capsys, [*base(lonely)])
    assert "no config.yaml found beside the teacher" in err and "distillation.teacher_config" in err
    err = error_of(capsys, [*base(tmp_path / "nowhere")])
    assert "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = error_of(capsys, [*base(tmp_path / "empty")])  # a folder with no snapshot
    assert "has no eval/training_*/teacher_checkpoint.pth" in err
    for name in ("vits", "vitb"):  # a distillation of several students: each student's snapshots in its folder
        snap = tmp_path / "several" / name / "eval" / "training_9" / "teacher_checkpoint.pth"
        snap.parent.mkdir(parents=True)
        snap.write_bytes(lonely.read_bytes())
    err = error_of(capsys, [*base(tmp_path / "several")])
    assert err.endswith("it holds the students vitb, vits of a distillation: give one student's folder, e.g. "
                        f"{str(tmp_path / 'several' / 'vitb')!r}")
    # a student's starting weights are checked before the run folder is written
    err = error_of(capsys, [*base(teacher_dir), "distillation.students=[{arch: vit_femto}, "
                            f"{{arch: vit_femto, pretrained_weights: {tmp_path / 'none.pth'}}}]"])
    assert f"config key 'distillation.students[1].pretrained_weights' is '{tmp_path / 'none.pth'}', which does not " \
           "exist" in err and not (tmp_path / "out").exists()
    # the teacher's own run folder as --output-dir: refused, the teacher's run unchanged
    before = {p: p.read_bytes() for p in teacher_dir.rglob("*") if p.is_file()}
    args = [*base(teacher_dir)]
    args[args.index("--output-dir") + 1] = str(teacher_dir)
    err = error_of(capsys, args)
    snapshot = teacher_dir / "eval" / "training_9" / "teacher_checkpoint.pth"
    assert err == (f"error: --output-dir {teacher_dir} holds the teacher ({snapshot}); give a new --output-dir for "
                   "the students")
    assert {p: p.read_bytes() for p in teacher_dir.rglob("*") if p.is_file()} == before
    # the dataset is listed before anything is written
    (tmp_path / "noimages").mkdir()
    err = error_of(capsys, [*base(teacher_dir), f"train.dataset_path=ImageFolder:root={tmp_path / 'noimages'}"])
    assert err.startswith("error: no images found under") and not (tmp_path / "out" / "config.yaml").exists()


def test_distillation_beats_training_from_scratch(demo_teacher, tmp_path):
    """The demo's pretrained teacher distilled into vit_femto vs vit_femto pretrained from scratch, same budget."""
    from dinokit.cli.distill import run_distillation
    from dinokit.cli.train import pretrain

    common = [f"train.dataset_path={demo_teacher.train_str}", "train.num_workers=1", "optim.epochs=2",
              "train.batch_size_per_gpu=16", "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1",
              f"evaluation.knn_dataset.train={demo_teacher.train_str}",
              f"evaluation.knn_dataset.val={demo_teacher.val_str}", "evaluation.eval_period_iterations=100",
              "evaluation.knn_k=[10]"]

    def knn(run: Path) -> float:
        lines = [json.loads(l) for l in (run / "training_metrics.json").read_text().splitlines()]
        return [l["knn_top1_k10"] for l in lines if "knn_top1_k10" in l][-1]

    run_distillation(load_config("distill_demo", [*common, f"distillation.teacher={demo_teacher.run_dir}"]),
                     output_dir=tmp_path / "distilled", resume=False, device="cpu")
    pretrain(load_config("demo", [*common, "student.arch=vit_femto"]), output_dir=tmp_path / "scratch",
             resume=False, device="cpu")
    distilled, scratch = knn(tmp_path / "distilled"), knn(tmp_path / "scratch")
    # batch 16 halves the time of the README comparison (batch 32): 52.5% vs 25.0% measured (56.3 vs 25.0 at 32)
    assert distilled >= scratch + 10, (distilled, scratch)


@pytest.mark.skipif(not (Path(__import__("sys").executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_process_torchrun_distillation(images, tmp_path):
    """Under torchrun distill stopped at once: each student's EMA went to FSDP2 as one ModuleDict, which has no
    forward ("fully_shard does not support containers"); the EMAs are now sharded by their parts, as the teacher."""
    import os
    import subprocess
    import sys

    teacher = make_teacher_run(tmp_path / "teacher")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--master_port=29547", "-m", "dinokit",
           "distill", "--config-file", "distill_demo", "--output-dir", str(tmp_path / "out"), "--device", "cpu",
           "--no-progress", *TINY, f"train.dataset_path=ImageFolder:root={images / 'train'}",
           f"distillation.teacher={teacher}", "train.batch_size_per_gpu=2", "optim.epochs=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    snapshots = list((tmp_path / "out").rglob("teacher_checkpoint.pth"))
    saved = torch.load(snapshots[0], weights_only=True)["teacher"] if snapshots else {}
    assert saved and all(type(v) is torch.Tensor for v in saved.values())
