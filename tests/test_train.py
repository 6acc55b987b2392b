"""End-to-end pretraining on CPU: a few steps, snapshots, bit-exact resume, NaN stop, CLI errors, torchrun."""

from __future__ import annotations

import json
import warnings
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinokit.cli import main as cli_main
from dinokit.data import write_sample_dataset
from dinokit.errors import DinokitError
from dinokit.cli.train import pretrain as train
from dinokit.config import load_config

from tiny import tiny_run

TINY = [*tiny_run(prototypes=64, hidden=32, bottleneck=16, local_crops=2, batch=4, eval_period=3),
        "student.drop_path_rate=0.2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = write_sample_dataset(tmp_path_factory.mktemp("sample"), counts={"train": 3, "val": 2}, image_size=40)
    return root


def tiny_cfg(images: Path, *extra: str):
    return load_config("demo", [*TINY, f"train.dataset_path=ImageFolder:root={images / 'train'}", *extra])


def test_dinov3_local_loss_reweighting_scales_the_local_term_of_the_minimised_loss(images, tmp_path):
    """dino.reweight_dino_local_loss with its v2 schedule (here 1 -> 0.5 by a half-cosine over iterations 2-4): the
    minimised loss takes w(i) x the local DINO term; the logged term and total_loss stay unweighted, as DINOv3 logs
    them, and w(i) is logged as dino_local_loss_weight."""
    cfg = tiny_cfg(images, "dino.reweight_dino_local_loss=true", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=3",
                   "dino.local_loss_weight_schedule={start: 1, peak: 1, end: 0.5, warmup_epochs: 1, cosine_epochs: 1}")
    out = tmp_path / "run"
    train(cfg, output_dir=out)
    lines = [json.loads(l) for l in (out / "training_metrics.json").read_text().splitlines()]
    weights = [l["dino_local_loss_weight"] for l in lines]
    assert weights == pytest.approx([1.0, 1.0, 1.0, 0.75, 0.5, 0.5])
    for l, w in zip(lines, weights):
        rest = l["dino_global_crops_loss"] + 2 * l["koleo_loss"] + 2 * l["ibot_loss"]
        assert l["objective_loss"] == pytest.approx(w * l["dino_local_crops_loss"] + rest, rel=1e-5)
        assert l["total_loss"] == pytest.approx(l["dino_local_crops_loss"] + l["dino_global_crops_loss"]
                                                + l["koleo_loss"] + l["ibot_loss"], rel=1e-5)


def full_state(out: Path) -> dict:
    ckpts = sorted((out / "checkpoints").glob("checkpoint_*.pth"))
    return torch.load(ckpts[-1], map_location="cpu", weights_only=True)


def test_few_steps_write_metrics_snapshots_and_checkpoints(images, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_cfg(images), output_dir=out)
    assert summary["iteration"] == 6
    lines = [json.loads(l) for l in (out / "training_metrics.json").read_text().splitlines()]
    assert [l["iteration"] for l in lines] == list(range(6))
    for key in ("lr", "wd", "mom", "last_layer_lr", "current_batch_size", "total_loss", "dino_local_crops_loss",
                "dino_global_crops_loss", "koleo_loss", "ibot_loss"):
        assert key in lines[-1]
    assert all(torch.isfinite(torch.tensor(l["total_loss"])) for l in lines)
    # total_loss as the official log: the sum of the logged terms (KoLeo and iBOT logged halved); objective_loss is
    # the minimised loss (loss weights 1 here, KoLeo and iBOT whole)
    terms = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
    for l in lines:
        assert l["total_loss"] == pytest.approx(sum(l[k] for k in terms), rel=1e-5)
        assert l["objective_loss"] == pytest.approx(l["total_loss"] + l["koleo_loss"] + l["ibot_loss"], rel=1e-5)
    # the last layer is frozen (lr 0) for the first epoch, and the lr warms up from 0
    assert lines[0]["last_layer_lr"] == 0 and lines[0]["lr"] == 0 and lines[3]["last_layer_lr"] > 0
    # teacher snapshots every 3 iterations, in the official layout, loadable as a backbone
    snaps = sorted((out / "eval").glob("training_*/teacher_checkpoint.pth"))
    assert [p.parent.name for p in snaps] == ["training_2", "training_5"]
    teacher = torch.load(snaps[-1], weights_only=True)["teacher"]
    assert "backbone.pos_embed" in teacher and "dino_head.last_layer.weight_g" in teacher
    from dinokit.models import load_backbone_weights
    from dinokit.config import backbone_from_config

    cfg = load_config(str(out / "config.yaml"))
    backbone = backbone_from_config(cfg.student, img_size=cfg.crops.global_crops_size)
    load_backbone_weights(backbone, snaps[-1])
    # the EMA moved the teacher away from its initial copy of the student, but not onto the student
    state = full_state(out)["model"]
    t, s = state["teacher.backbone.blocks.0.attn.qkv.weight"], state["student.backbone.blocks.0.attn.qkv.weight"]
    assert not torch.equal(t, s)
    assert (out / "config.yaml").is_file()


def test_kill_and_resume_is_bit_exact(images, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(images), output_dir=straight)
    train(tiny_cfg(images), output_dir=resumed, stop_after=4)  # "killed" after the checkpoint at iteration 4
    assert full_state(resumed)["iteration"] == 4
    summary = train(tiny_cfg(images), output_dir=resumed)
    assert summary["iteration"] == 6
    a, b = full_state(straight), full_state(resumed)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, sa in a["optimizer"]["state"].items():
        for name, value in sa.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][pid][name])), (pid, name)
    # the logged losses after the resume point are those of the uninterrupted run
    la = [json.loads(l) for l in (straight / "training_metrics.json").read_text().splitlines()]
    lb = [json.loads(l) for l in (resumed / "training_metrics.json").read_text().splitlines()]
    assert [l["total_loss"] for l in la][4:] == [l["total_loss"] for l in lb][4:]


def test_resuming_on_another_number_of_cpu_threads_says_the_run_is_no_longer_exact(images, tmp_path, capsys):
    """CPU sums take another order on another number of threads: a resumed run was silently not bit-exact."""
    out, threads = tmp_path / "run", torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(tiny_cfg(images), output_dir=out, stop_after=2)
        train(tiny_cfg(images), output_dir=out, stop_after=4)  # the same threads: nothing to say
        assert "CPU thread" not in capsys.readouterr().out
        torch.set_num_threads(2)
        train(tiny_cfg(images), output_dir=out)
    finally:
        torch.set_num_threads(threads)
    assert ("note: checkpoint_0000004.pth was saved computing on 1 CPU thread(s) and resumes on 2: sums take another "
            "order, so the run no longer continues bit for bit; set OMP_NUM_THREADS=1 to continue it exactly"
            ) in capsys.readouterr().out


def test_resuming_a_log_of_an_older_dinokit_says_what_total_loss_means_from_then_on(images, tmp_path, capsys):
    """Before 2026-12-06 total_loss was the minimised loss; it is now the official log's sum of terms, the minimised
    one objective_loss. A resumed older run's log changed meaning halfway without a word: one note now says so."""
    out = tmp_path / "run"
    train(tiny_cfg(images), output_dir=out, stop_after=4)
    capsys.readouterr()
    log = out / "training_metrics.json"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines and all("objective_loss" in line for line in lines)
    train(tiny_cfg(images), output_dir=out, stop_after=5)  # this version's log: nothing to say
    assert "older dinokit" not in capsys.readouterr().out
    older = [{**{k: v for k, v in line.items() if k != "objective_loss"}, "total_loss": line["objective_loss"]}
             for line in lines]  # as an older dinokit logged them
    log.write_text("".join(json.dumps(line) + "\n" for line in older))
    train(tiny_cfg(images), output_dir=out)
    printed = capsys.readouterr().out
    assert printed.count(f"note: the earlier lines of {log} come from an older dinokit, whose total_loss is the "
                         "minimised loss: from here on that is objective_loss, and total_loss the sum of the logged "
                         "terms, as in the official log") == 1


def test_resuming_on_a_folder_that_changed_says_the_run_is_no_longer_exact(images, tmp_path, capsys):
    # images added to the folder between two starts changed the data order without a word
    folder = tmp_path / "images"
    shutil.copytree(images / "train", folder)
    cfg = lambda: load_config("demo", [*TINY, f"train.dataset_path=ImageFolder:root={folder}"])  # noqa: E731
    out = tmp_path / "run"
    train(cfg(), output_dir=out, stop_after=2)
    n = len([p for p in folder.rglob("*.png")])
    assert json.loads((out / "data.json").read_text())["images"] == n
    train(cfg(), output_dir=out, stop_after=3)  # unchanged: no note
    assert "note:" not in capsys.readouterr().out
    extra = sorted(folder.rglob("*.png"))[0]
    shutil.copy(extra, extra.with_name("added.png"))
    train(cfg(), output_dir=out, stop_after=4)
    assert (f"note: ImageFolder:root={folder} now holds {n + 1} images ({n} when this run last started): the run "
            "goes on, but its data order differs from here on from a run that was never stopped") in capsys.readouterr().out
    extra.with_name("added.png").rename(extra.with_name("other.png"))  # as many images, other files
    train(cfg(), output_dir=out, stop_after=5)
    assert "holds other files than when this run last started" in capsys.readouterr().out
    os.environ["DINOKIT_IMAGE_BACKGROUND"] = "black"  # other pixels for every transparent image
    try:
        train(cfg(), output_dir=out, stop_after=6)
    finally:
        del os.environ["DINOKIT_IMAGE_BACKGROUND"]
    assert ("note: the images are decoded otherwise than when this run last started (background [255, 255, 255] -> "
            "[0, 0, 0]; DINOKIT_* variables)") in capsys.readouterr().out


def test_torn_checkpoint_falls_back_to_older(images, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(images), output_dir=out, stop_after=3)
    good = out / "checkpoints" / "checkpoint_0000003.pth"
    (out / "checkpoints" / "checkpoint_0000005.pth").write_bytes(good.read_bytes()[:100])  # a torn write
    with pytest.warns(UserWarning, match="cannot read checkpoint"):
        summary = train(tiny_cfg(images), output_dir=out)
    assert summary["iteration"] == 6


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(images, tmp_path, monkeypatch):
    from dinokit.train.ssl_meta_arch import SSLMetaArch

    original = SSLMetaArch.compute_losses
    calls = {"n": 0}

    def poisoned(self, batch, iteration, sched):
        out = original(self, batch, iteration, sched)
        calls["n"] += 1
        if calls["n"] == 5:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(SSLMetaArch, "compute_losses", poisoned)
    out = tmp_path / "run"
    with pytest.raises(DinokitError, match=r"loss became nan at iteration 4; the last good checkpoint"):
        train(tiny_cfg(images), output_dir=out)
    assert [p.name for p in (out / "checkpoints").glob("*.pth")] == ["checkpoint_0000003.pth"]


def test_cli_unknown_key_is_one_line_error(tmp_path, capsys):
    assert cli_main(["train", "--config-file", "demo", "--output-dir", str(tmp_path), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'optim.lrr'") and "\n" not in err


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_process_gloo_run_and_resume_on_one_process(images, tmp_path, capsys):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node=2", "--master_port=29531", "-m", "dinokit", "train", "--config-file", "demo",
           "--output-dir", str(out), "--device", "cpu", *TINY, f"train.dataset_path=ImageFolder:root={images / 'train'}",
           "train.batch_size_per_gpu=2", "optim.epochs=1", "optim.warmup_epochs=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 3 iterations" in proc.stdout and "teacher snapshot:" in proc.stdout  # flushed by end_process
    assert "returned a view tensor" not in proc.stderr  # FSDP2's warning about views (engine/parallel.py)
    # two processes write one sharded folder (torch.distributed.checkpoint), each rank its own shards
    folder = out / "checkpoints" / "checkpoint_0000003"
    assert folder.is_dir() and not list((out / "checkpoints").glob("*.pth"))
    meta = torch.load(folder / "meta.pt", weights_only=True)
    assert meta["iteration"] == 3 and meta["world_size"] == 2
    assert len(list(folder.glob("*.distcp"))) == 2
    lines = [json.loads(l) for l in (out / "training_metrics.json").read_text().splitlines()]
    assert len(lines) == 3 and all(l["current_batch_size"] == 2 for l in lines)
    # a refusal found by rank 0 stops rank 1 too, printed once (rank 1 went on into training and died in a collective
    # with a traceback); torchrun's own failure report follows, as for any command that exits non-zero
    refused = subprocess.run([*cmd, "--no-resume"], capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0 and "[rank1]" not in refused.stderr and "RuntimeError" not in refused.stderr
    assert refused.stderr.count(f"error: {out} already holds a run (checkpoint of iteration 3)") == 1, refused.stderr
    # the sharded run's checkpoint resumes in a single process (world-size independent), saying that it is then not
    # the run it would have been, and without torch's warning that it assumes one process
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(tiny_cfg(images, "train.batch_size_per_gpu=4", "optim.epochs=2"), output_dir=out)
    assert summary["iteration"] == 6
    assert ("note: checkpoint_0000003 was saved by 2 process(es) and resumes in 1: the total batch (and the lr that "
            "follows it)") in capsys.readouterr().out
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]


def test_knn_is_logged_for_each_snapshot(images, tmp_path):
    out = tmp_path / "run"
    knn = [f"evaluation.knn_dataset.train=ImageFolder:root={images / 'train'}",
           f"evaluation.knn_dataset.val=ImageFolder:root={images / 'val'}", "evaluation.knn_k=[3]"]
    train(tiny_cfg(images, *knn), output_dir=out)
    lines = [json.loads(l) for l in (out / "training_metrics.json").read_text().splitlines()]
    knn_lines = [l for l in lines if "knn_top1_k3" in l]
    assert [l["iteration"] for l in knn_lines] == [2, 5]
    assert all(0 <= l["knn_top1_k3"] <= 100 and 0 <= l["knn_top5_k3"] <= 100 for l in knn_lines)
    # the monitor leaves the run alone: the same weights without it (its loader drew from the global generator,
    # which shifted the drop-path masks of every later iteration)
    train(tiny_cfg(images, "student.drop_path_rate=0.5"), output_dir=tmp_path / "plain")
    train(tiny_cfg(images, "student.drop_path_rate=0.5", *knn), output_dir=tmp_path / "monitored")
    a, b = full_state(tmp_path / "plain")["model"], full_state(tmp_path / "monitored")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_weights_starts_from_an_explicit_checkpoint(images, tmp_path):
    first = tmp_path / "first"
    train(tiny_cfg(images), output_dir=first, stop_after=3)
    ckpt = first / "checkpoints" / "checkpoint_0000003.pth"
    # a checkpoint that fails to load stops the run before it writes anything: no config.yaml, no folder
    torn = tmp_path / "torn.pth"
    torn.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(DinokitError, match="torn.pth': it is corrupt or truncated"):
        train(tiny_cfg(images, f"MODEL.WEIGHTS={torn}"), output_dir=tmp_path / "second")
    assert not (tmp_path / "second").exists()
    summary = train(tiny_cfg(images, f"MODEL.WEIGHTS={ckpt}"), output_dir=tmp_path / "second")
    assert summary["iteration"] == 6
    lines = [json.loads(l) for l in (tmp_path / "second" / "training_metrics.json").read_text().splitlines()]
    assert [l["iteration"] for l in lines] == [3, 4, 5]


def test_student_pretrained_weights_are_loaded_with_resized_position_embedding(images, tmp_path):
    from dinokit.models import build_backbone
    from dinokit.models.checkpoint import save_backbone
    from dinokit.train.ssl_meta_arch import SSLMetaArch

    source = build_backbone("vit_pico", patch_size=8, img_size=64, init_values=1.0)  # 8x8 grid
    path = save_backbone(source, tmp_path / "backbone.safetensors")
    model = SSLMetaArch(tiny_cfg(images, f"student.pretrained_weights={path}"))  # 32 px crops: 4x4 grid
    student = model.student.backbone
    assert student.pos_embed.shape == (1, 17, 64)
    assert torch.equal(student.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)
    assert torch.equal(student.pos_embed[:, 0], source.pos_embed[:, 0])
    assert torch.equal(model.teacher.backbone.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)


def test_teacher_snapshot_loads_through_the_hub_entry_point(tmp_path):
    import hubconf
    from dinokit.train.ssl_meta_arch import SSLMetaArch
    from dinokit.train.train import save_teacher_snapshot

    cfg = load_config("vitl14", ["student.arch=vit_small", "student.ffn_layer=mlp", "dino.head_n_prototypes=32",
                                 "ibot.head_n_prototypes=32", "dino.head_hidden_dim=16", "ibot.head_hidden_dim=16"])
    model = SSLMetaArch(cfg).eval()
    path = tmp_path / "teacher_checkpoint.pth"
    save_teacher_snapshot(model, path)
    keys = torch.load(path, weights_only=True)["teacher"].keys()
    assert "backbone.blocks.1.3.attn.qkv.weight" in keys  # official chunked layout (block_chunks=4)
    hub = hubconf.dinov2_vits14(pretrained=False, weights=str(path), img_size=cfg.crops.global_crops_size).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(hub(x), model.teacher.backbone(x), rtol=0, atol=0)


def test_eval_only_writes_the_restored_teacher_and_runs_the_monitor(images, tmp_path, capsys):
    """The official --eval-only: no step; the teacher of the newest checkpoint goes to eval/manual_<iteration>/ (the
    same tensors as the last training snapshot) and the k-NN monitor runs on it; nothing else in the run changes.
    With nothing trained it is one line and no folder is left."""
    from dinokit.cli import main as cli_main

    out = tmp_path / "run"
    base = ["train", "--output-dir", str(out), "--device", "cpu", *TINY,
            f"train.dataset_path=ImageFolder:root={images / 'train'}"]
    assert cli_main([*base, "--eval-only"]) == 2
    assert "--eval-only found nothing trained to evaluate" in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(base) == 0
    metrics, checkpoints = (out / "training_metrics.json").read_text(), sorted((out / "checkpoints").iterdir())
    capsys.readouterr()
    knn = [f"evaluation.knn_dataset.train=ImageFolder:root={images / 'train'}",
           f"evaluation.knn_dataset.val=ImageFolder:root={images / 'val'}"]
    assert cli_main([*base, *knn, "--eval-only"]) == 0
    printed = capsys.readouterr().out
    assert "evaluated iteration 6: knn_top1_k" in printed and f"teacher snapshot: {out / 'eval/manual_6'}" in printed
    manual = torch.load(out / "eval/manual_6/teacher_checkpoint.pth", weights_only=True)["teacher"]
    last = torch.load(out / "eval/training_5/teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert manual.keys() == last.keys() and all(torch.equal(manual[k], last[k]) for k in last)
    assert (out / "training_metrics.json").read_text() == metrics
    assert sorted((out / "checkpoints").iterdir()) == checkpoints


def test_no_progress_leaves_out_the_bar_only(images, tmp_path, capfd):
    """`train --no-progress` (as embed, eval, dense train and curate have it): no bar, the metrics lines as usual."""
    from dinokit.cli import main

    args = ["--output-dir", str(tmp_path / "run"), "--device", "cpu", *TINY,
            f"train.dataset_path=ImageFolder:root={images / 'train'}", "optim.epochs=1"]
    assert main(["train", "--no-progress", *args]) == 0
    err = capfd.readouterr().err
    assert "it/s" not in err and "s/it" not in err
    assert (tmp_path / "run" / "training_metrics.json").read_text().count("\n") >= 1
