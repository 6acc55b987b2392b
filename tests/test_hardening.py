"""Fault injection into training runs: every fault ends in one clear line, nothing is lost or mixed (run folders,
torn checkpoints, full disks). Signals and kills: ``test_hardening_signals.py``; checks before any work and the trust
of results: ``test_preflight.py``."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main as cli_main
from dinokit.cli.train import pretrain
from dinokit.config import load_config
from dinokit.data import write_sample_dataset
from dinokit.engine.run_dir import check_disk_space, open_run_dir
from dinokit.errors import DinokitError

from tiny import FullDisk, error_line, tiny_run


# ---------------------------------------------------------------------------------------------- run folders
TINY = tiny_run()  # 6 iterations of 2 images, a checkpoint each


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("sample"), counts={"train": 1, "val": 1}, image_size=32)


def _args(images: Path, *extra: str) -> list[str]:
    return [*TINY, f"train.dataset_path=ImageFolder:root={images / 'train'}", *extra]


def _cfg(images: Path, *extra: str):
    return load_config("demo", _args(images, *extra))


def _cli(out: Path, images: Path, *extra: str, flags=()) -> list[str]:
    return ["train", "--output-dir", str(out), "--device", "cpu", *flags, *_args(images, *extra)]


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory) -> Path:
    """An uninterrupted 6-iteration run (the reference of the resume tests)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    pretrain(_cfg(images), output_dir=out, device="cpu")
    return out


def _final_state(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "checkpoint_0000006.pth", map_location="cpu", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _final_state(a)["model"], _final_state(b)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_output_dir_that_is_a_file_is_one_line(images, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert cli_main(_cli(target, images)) == 2
    assert error_line(capsys) == f"error: --output-dir '{target}' is a file, not a folder; give a folder path"
    assert target.read_text() == "mine"


def test_output_dir_inside_the_training_images_is_refused_before_anything_is_written(tmp_path, capsys):
    # Seen: the run's own training_metrics.png became the 41st of 40 training images when the run resumed.
    import shutil

    data = tmp_path / "mine"
    shutil.copytree(write_sample_dataset(tmp_path / "s", counts={"train": 1, "val": 0}, image_size=32) / "train", data)
    before = sorted(data.rglob("*"))
    for dataset in (str(data), f"ImageFolder:root={data}"):
        assert cli_main(["train", *TINY, "--output-dir", str(data / "run"), f"train.dataset_path={dataset}"]) == 2
        assert error_line(capsys) == (
            f"error: --output-dir {data / 'run'} lies inside the training images' folder {data}: the run's own "
            "files (plots, snapshots) would become training images when it resumes; give an output folder outside it")
        assert sorted(data.rglob("*")) == before
    # the built-in sample set too (the run folder became an empty "class folder" there, after being made)
    sample = write_sample_dataset(tmp_path / "sample", counts={"train": 1, "val": 0}, image_size=32)
    before = sorted(sample.rglob("*"))
    out = sample / "train" / "run"
    dataset = f"train.dataset_path=Sample:split=TRAIN:root={sample}"
    assert cli_main(["train", *TINY, "--output-dir", str(out), dataset]) == 2
    assert error_line(capsys).startswith(f"error: --output-dir {out} lies inside the training images' folder {sample}:")
    assert sorted(sample.rglob("*")) == before


def test_no_resume_in_an_existing_run_is_refused_and_changes_nothing(images, straight, capsys, tmp_path):
    before = {p: p.read_bytes() for p in straight.rglob("*") if p.is_file()}
    assert cli_main(_cli(straight, images, flags=["--no-resume"])) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no banner announcing the refused run
    assert captured.err.strip() == (
        f"error: {straight} already holds a run (checkpoint of iteration 6); starting another one there would mix "
        f"the two: give a new --output-dir, or delete {straight / 'checkpoints'} to start again here")
    assert {p: p.read_bytes() for p in straight.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_one_line_before_anything_is_written(images, tmp_path, capsys, monkeypatch,
                                                                          tracker):
    monkeypatch.setitem(sys.modules, {"tensorboard": "torch.utils.tensorboard"}.get(tracker, tracker), None)
    out = tmp_path / "run"
    assert cli_main(_cli(out, images, f"train.tracker={tracker}")) == 2
    assert error_line(capsys) == f"error: train.tracker={tracker} needs {tracker}: pip install 'dinokit[tracking]'"
    assert not out.exists()


def test_a_dataset_without_images_is_one_line_before_the_config_is_written(images, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    assert cli_main(["train", "--output-dir", str(out), "--device", "cpu",
                     *_args(images, f"train.dataset_path=ImageFolder:root={empty}")]) == 2
    assert error_line(capsys).startswith(f"error: no images found under '{empty}'")
    assert not out.exists()  # not even an empty run folder


def test_changed_configuration_is_refused_before_anything_is_written(images, straight, capsys):
    saved = (straight / "config.yaml").read_bytes()
    assert cli_main(_cli(straight, images, "student.arch=vit_femto", "dino.head_hidden_dim=24")) == 2
    assert error_line(capsys) == (
        f"error: {straight} holds a run with another configuration: dino.head_hidden_dim (saved 16, now 24), "
        "student.arch (saved vit_pico, now vit_femto); rerun with the saved settings to resume it, or give a new "
        "--output-dir to start a new run")
    assert (straight / "config.yaml").read_bytes() == saved
    # keys that may change between starts are only reported: a finished run stays finished
    assert cli_main(_cli(straight, images, "train.log_freq=2")) == 0
    out = capsys.readouterr().out
    assert "resuming with changed settings: train.log_freq (saved 1, now 2)" in out
    assert "training already complete (6 iterations)" in out


@pytest.mark.parametrize("damage", ["missing", "a list", "not YAML"])
def test_a_run_without_its_saved_settings_is_not_resumed_unchecked(images, straight, tmp_path, capsys, damage):
    # Seen: with config.yaml gone, any changed setting resumed the run (a mixed run), and a changed architecture
    # was told to delete its good checkpoints.
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    saved = out / "config.yaml"
    if damage == "missing":
        saved.unlink()
    else:
        saved.write_text("- 1\n- 2\n" if damage == "a list" else "student: [unclosed\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    why = {"missing": "is missing", "a list": "does not hold settings", "not YAML": "is not readable"}[damage]
    for extra in ((), ("student.arch=vit_femto",)):
        assert cli_main(_cli(out, images, *extra)) == 2
        assert error_line(capsys) == (
            f"error: {out} holds checkpoints but its config.yaml {why}, so this run's settings cannot be checked "
            "against them; put back config.yaml (the settings the run started with) to resume it, or give a new "
            "--output-dir")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    shutil.copy(straight / "config.yaml", saved)  # put back: the run resumes (finished, here)
    assert cli_main(_cli(out, images)) == 0
    assert "training already complete (6 iterations)" in capsys.readouterr().out


def test_a_data_record_that_is_not_an_object_is_replaced(tmp_path):
    from dinokit.engine.run_dir import data_change_note

    for text in ("[1, 2]", '{"images": 3, "sampled_paths_sha1": "x", "decoding": [1]}'):
        (tmp_path / "data.json").write_text(text)
        note = data_change_note(tmp_path, "set", ["a.png", "b.png"], resumed=True)
        assert note is None if text.startswith("[") else note.startswith("note: set now holds 2 images (3 when")
        assert json.loads((tmp_path / "data.json").read_text())["images"] == 2


def test_a_second_run_in_the_same_folder_is_refused(images, tmp_path, capsys):
    out = tmp_path / "run"
    with open_run_dir(out, resume=True):
        assert (out / ".dinokit.lock").read_text() == f"{socket.gethostname()} {os.getpid()}"
        assert cli_main(_cli(out, images)) == 2
        assert error_line(capsys) == (
            f"error: another run (process {os.getpid()} on {socket.gethostname()}) is writing to {out}; wait for it "
            f"to end or give another --output-dir (if that process is gone, delete {out / '.dinokit.lock'})")
    assert not (out / ".dinokit.lock").exists()
    # a lock left by a killed process is taken over
    proc = __import__("subprocess").run(["true"])
    (out / ".dinokit.lock").write_text(f"{socket.gethostname()} {2 ** 22 + 12345}")
    assert proc.returncode == 0
    with open_run_dir(out, resume=True):
        assert (out / ".dinokit.lock").read_text().endswith(str(os.getpid()))


def test_fresh_run_says_starting_from_scratch(images, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)  # temporaries of process ids no process has
    (out / "checkpoints" / ".checkpoint_0000003.pth.tmp-99999999").write_bytes(b"x" * 100)  # a kill's leftovers
    (out / "eval" / "training_2").mkdir(parents=True)
    (out / "eval" / "training_2" / ".teacher_checkpoint.pth.tmp-99999998").write_bytes(b"x" * 100)
    (out / "notes.tmp-1").write_text("mine")  # not a hidden temporary name: kept
    (out / "training_metrics.json").write_text(json.dumps({"iteration": 0, "total_loss": 1.0}) + "\n")
    pretrain(_cfg(images, "optim.epochs=1"), output_dir=out, device="cpu", stop_after=1)
    assert f"starting from scratch: no checkpoint in {out / 'checkpoints'}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_0000001.pth"]
    assert not list((out / "eval" / "training_2").iterdir()) and (out / "notes.tmp-1").read_text() == "mine"
    assert [json.loads(line)["iteration"] for line in (out / "training_metrics.json").read_text().splitlines()] == [0]


def _copy_with_torn_checkpoints(straight: Path, out: Path, torn: dict[str, bytes]) -> dict:
    """A copy of the finished run ``straight`` whose named checkpoints hold ``torn`` bytes (None: deleted);
    returns the copy's files and their bytes."""
    import shutil

    shutil.copytree(straight, out)
    for name, data in torn.items():
        path = out / "checkpoints" / name
        path.unlink() if data is None else path.write_bytes(data)
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_unreadable_last_checkpoint_is_refused_not_overwritten(images, straight, tmp_path, capsys, how):
    """A torn or zero-byte checkpoint used to start the run over in its folder, overwriting it and the metrics."""
    last = (straight / "checkpoints" / "checkpoint_0000006.pth").read_bytes()
    out = tmp_path / "run"
    torn = last[:1000] if how == "truncated" else b""
    before = _copy_with_torn_checkpoints(straight, out,
                                         {"checkpoint_0000003.pth": None, "checkpoint_0000006.pth": torn})
    assert cli_main(_cli(out, images)) == 2
    reason = "is corrupt or truncated" if how == "truncated" else "is an empty file"
    assert error_line(capsys) == (f"error: no readable checkpoint in {out / 'checkpoints'} (checkpoint_0000006.pth "
                              f"{reason}); delete it to restart this run from scratch, or give a new --output-dir")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # config, metrics, checkpoints kept


def test_unreadable_last_checkpoint_falls_back_to_the_older_one_with_one_line(images, straight, tmp_path, capfd,
                                                                               real_warnings):
    last = (straight / "checkpoints" / "checkpoint_0000006.pth").read_bytes()
    out = tmp_path / "run"
    _copy_with_torn_checkpoints(straight, out, {"checkpoint_0000006.pth": last[: len(last) // 2]})
    assert cli_main(_cli(out, images)) == 0
    captured = capfd.readouterr()
    warned = [line for line in captured.err.splitlines() if "checkpoint" in line]
    assert warned == [f"warning: cannot read checkpoint {out / 'checkpoints' / 'checkpoint_0000006.pth'}"
                      ": it is corrupt or truncated; resuming from the older checkpoint_0000003.pth (iteration 3)"]
    assert "resumed from iteration 3" in captured.out and "starting from scratch" not in captured.out
    _assert_same_weights(straight, out)  # the rewritten last checkpoint is the uninterrupted run's
    lines = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == list(range(6))


def test_disk_space_is_checked_before_the_first_step(tmp_path, monkeypatch, capsys):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=50 * 2**20))
    with pytest.raises(DinokitError) as err:
        check_disk_space(tmp_path, 80 * 2**20, keep=3)
    assert str(err.value) == (f"only 50 MB free on the disk of {tmp_path}, and one checkpoint needs about 80 MB; "
                              "free some space or give another --output-dir")
    check_disk_space(tmp_path, 20 * 2**20, keep=3)
    assert capsys.readouterr().out.strip() == (
        f"warning: only 50 MB free on the disk of {tmp_path}; keeping 3 checkpoints needs 4 x 20 MB at peak: the run "
        "may stop at a checkpoint")
    # below a megabyte: kilobytes (a small head on a full disk read "only 0 MB free ..., needs about 0 MB")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=12 * 2**10))
    with pytest.raises(DinokitError, match="^only 12 KB free on the disk of .*, and one checkpoint needs about 600 KB;"):
        check_disk_space(tmp_path, 600 * 2**10, keep=3)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_disk_full_during_a_checkpoint_is_one_line_and_the_previous_one_resumes(images, straight, tmp_path, capsys,
                                                                                monkeypatch, code):
    import dinokit.engine.checkpoint as ckpt_module
    from dinokit.files import _mount_point

    out = tmp_path / "run"
    pretrain(_cfg(images), output_dir=out, device="cpu", stop_after=3)

    def full_open(path, mode="r", *a, **k):
        return FullDisk(path, mode.replace("b", "")) if "w" in mode else open(path, mode, *a, **k)

    monkeypatch.setattr(FullDisk, "code", code)
    # room for the teacher snapshot, not for the (larger) checkpoint written after it
    monkeypatch.setattr(FullDisk, "room", (straight / "eval" / "training_5" / "teacher_checkpoint.pth").stat().st_size + 4096)
    monkeypatch.setattr(ckpt_module, "open", full_open, raising=False)
    assert cli_main(_cli(out, images)) == 2
    target = out / "checkpoints" / "checkpoint_0000006.pth"
    reason = f"no space left on {_mount_point(target)}" if code == errno.ENOSPC else "input/output error"
    assert error_line(capsys) == (f"error: {reason} while writing {target}; the partial file was removed and nothing "
                              "else was changed: free some space (or use another disk) and rerun")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_0000003.pth"]
    assert not [p for p in out.rglob(".*tmp*")]  # no hidden temporary file left behind
    if code == errno.ENOSPC:  # the kept checkpoint resumes to the same weights (the same for EIO)
        monkeypatch.undo()
        assert cli_main(_cli(out, images)) == 0
        _assert_same_weights(straight, out)


def test_train_says_what_it_will_do_and_what_it_did(images, tmp_path, capsys):
    import re

    out = tmp_path / "run"
    knn = [f"evaluation.knn_dataset.train=ImageFolder:root={images / 'train'}",
           f"evaluation.knn_dataset.val=ImageFolder:root={images / 'val'}", "evaluation.knn_k=[3]"]
    assert cli_main(_cli(out, images, "optim.epochs=1", *knn)) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (
        f"training vit_pico: 3 iterations (1 epoch of 3) on cpu, 8 images found in ImageFolder:root={images / 'train'}, "
        f"into {out}; k-NN on ImageFolder:root={images / 'val'} (neighbours from ImageFolder:root={images / 'train'}) "
        "at 32 px at each snapshot")
    assert not printed[1].startswith("note:")  # 32-px images under 32-px crops: nothing to say about their size
    lines = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    top1 = [line["knn_top1_k3"] for line in lines if "knn_top1_k3" in line][-1]
    snap = out / "eval" / "training_2" / "teacher_checkpoint.pth"
    done = next(i for i, line in enumerate(printed) if line.startswith("done: "))
    assert re.fullmatch(rf"done: 3 iterations in {re.escape(str(out))} \(\d+ s\), final loss \d+\.\d{{4}}, "
                        rf"knn_top1_k3 {top1:.1f}%, unreadable images skipped in trained batches: 0", printed[done])
    assert printed[done + 1:done + 3] == [
        f"teacher snapshot: {snap}",
        f"next: dinokit embed IMAGES --config-file {out / 'config.yaml'} --weights {snap} --out emb.npz"]


def test_embed_finds_the_runs_config_beside_a_teacher_snapshot(straight, tmp_path, capsys):
    snap = straight / "eval" / "training_5" / "teacher_checkpoint.pth"
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (0, 128, 255)).save(image)
    out = tmp_path / "e.npz"
    assert cli_main(["embed", str(image), "--weights", str(snap), "--out", str(out), "--image-size", "32",
                     "--device", "cpu", "--no-progress"]) == 0
    assert f"using the training config {straight / 'config.yaml'}" in capsys.readouterr().out
    assert np.load(out)["cls"].shape == (1, 64)  # vit_pico's width, not ViT-S/14's 384


@pytest.mark.parametrize("command", ["viz", "export", "curate"])
def test_other_commands_find_the_runs_config_beside_a_teacher_snapshot(straight, tmp_path, capsys, command):
    # They defaulted to --model dinov2_vits14 and refused the file ("does not fit the model").
    snap = straight / "eval" / "training_5" / "teacher_checkpoint.pth"
    (tmp_path / "pics").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (0, 128 * i, 255)).save(tmp_path / "pics" / f"{i}.png")
    args = {"viz": ["viz", "match", str(tmp_path / "pics" / "0.png"), str(tmp_path / "pics" / "1.png"),
                    "--out", str(tmp_path / "m.png"), "--image-size", "32", "--device", "cpu", "--all-patches"],
            "export": ["export", "onnx", "--image-size", "32", "32", "--out", str(tmp_path / "m.onnx")],
            "curate": ["curate", "embed", "--pool", str(tmp_path / "pics"), "--output-dir", str(tmp_path / "cur"),
                       "embed.image_size=32", "--no-progress"]}[command]
    if command == "export":
        pytest.importorskip("onnxruntime")
    assert cli_main([*args, "--weights", str(snap)]) == 0
    assert f"using the training config {straight / 'config.yaml'}" in capsys.readouterr().out


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_an_error_under_torchrun_is_one_line_once(tmp_path):
    """train on a missing folder: rank 0 found it while listing the images, rank 1 went on and died in a collective
    (39 lines of gloo traceback) and left an empty run folder; eval on a missing folder printed the line once per
    rank. Now each stops at once, said once (the other ranks wait before saying an error: the launcher stops them
    first when the main process failed too)."""
    import subprocess

    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--master_port=29549", "-m",
                "dinokit"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    for argv in (["train", "--output-dir", str(out), "--device", "cpu", *TINY,
                  f"train.dataset_path=ImageFolder:root={tmp_path / 'nosuch'}"],
                 ["eval", "knn", "--output-dir", str(tmp_path / "ev"), "--model", "dinov2_vits14", "--random-init",
                  "--device", "cpu", "--train-dataset", str(tmp_path / "nosuch"), "--val-dataset", str(tmp_path)]):
        proc = subprocess.run([*torchrun, *argv], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode != 0
        lines = [line for line in proc.stderr.splitlines() if "error: " in line and "nosuch" in line]
        assert len(lines) == 1 and "does not exist" in lines[0], proc.stderr[-3000:]
        # no traceback from a dinokit process (torchrun's own report of the failed child follows any failure)
        frames = [line for line in proc.stderr.splitlines() if line.strip().startswith("File ") and "dinokit" in line]
        assert "[rank1]" not in proc.stderr and not frames, proc.stderr[-3000:]
    assert not out.exists()
