"""SLURM launch (``--nodes``): every long command submits its own command line through submitit after its checks;
the job's tasks rerun it and submit nothing; a requeued job drops ``--no-resume``. submitit is faked."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dinokit.cli import main
from dinokit.distributed.slurm import IN_JOB_ENV, LOCAL_EXECUTOR_ENV, CommandJob
from tiny import PICO_CONFIG, write_images

SLURM = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu"]


@pytest.fixture
def submitted(monkeypatch) -> list[dict]:
    """A fake submitit: each submission's executor folder, parameters and job; nothing runs."""
    calls: list[dict] = []

    class FakeExecutor:
        def __init__(self, folder, slurm_max_num_timeout):
            calls.append({"folder": Path(folder), "max_timeout": slurm_max_num_timeout})

        def update_parameters(self, **params):
            calls[-1]["params"] = params

        def submit(self, job):
            calls[-1]["job"] = job
            return types.SimpleNamespace(job_id=str(100 + len(calls)))

    class JobEnvironment:
        hostnames, job_id, global_rank, num_tasks, local_rank = ["node7"], "42", 0, 1, 0

    fake = types.SimpleNamespace(AutoExecutor=FakeExecutor, JobEnvironment=JobEnvironment,
                                 helpers=types.SimpleNamespace(DelayedSubmission=lambda job: job))
    monkeypatch.setitem(sys.modules, "submitit", fake)
    monkeypatch.delenv(IN_JOB_ENV, raising=False)
    return calls


def test_every_long_command_submits_its_own_command_line(tmp_path, submitted, capsys) -> None:
    images = write_images(tmp_path / "images")
    out, teacher = tmp_path / "out", tmp_path / "teacher.pth"
    teacher.write_bytes(b"weights")  # found, not read: the job loads it
    commands = {
        "train": ["train", "--config-file", "demo", "--output-dir", str(out / "t")],
        "distill": ["distill", "--teacher", str(teacher), "--output-dir", str(out / "d")],
        "eval": ["eval", "knn", "--train-dataset", "Sample:split=TRAIN", "--val-dataset", "Sample:split=VAL",
                 "--model", "dinov2_vits14", "--output-dir", str(out / "e")],
        "dense": ["dense", "train", "--task", "seg", "--head", "linear", "--model", "dinov2_vits14",
                  "--train-dataset", "SegSample:split=train", "--val-dataset", "SegSample:split=val",
                  "--output-dir", str(out / "s"), "iterations=10"],
        "embed": ["embed", str(images), "--out", str(out / "emb.npz")],
        "curate": ["curate", "run", "--pool", str(images), "--output-dir", str(out / "c")],
    }
    logs = {"train": out / "t" / "slurm", "distill": out / "d" / "slurm", "eval": out / "e" / "slurm",
            "dense": out / "s" / "slurm", "embed": out / "emb.slurm", "curate": out / "c" / "slurm"}
    for name, argv in commands.items():
        assert main([*argv, *SLURM]) == 0, name
        call = submitted[-1]
        assert call["job"].argv == [*argv, *SLURM] and call["folder"] == logs[name]
        p = call["params"]
        assert (p["nodes"], p["gpus_per_node"], p["tasks_per_node"], p["slurm_partition"]) == (2, 4, 4, "gpu")
        assert p["timeout_min"] == (2800 if name in ("train", "distill") else 720), name  # each command's default
        assert p["name"] == f"dinokit-{name}" and call["max_timeout"] == 30
        assert f"submitted SLURM job {100 + len(submitted)} (2 node(s) x 4 task(s))" in capsys.readouterr().out
    assert len(submitted) == len(commands)
    assert not (out / "emb.npz").exists() and not (out / "t" / "checkpoints").exists()  # the jobs do the work


def test_a_bad_setting_is_one_line_before_anything_is_submitted(tmp_path, submitted, capsys) -> None:
    bad = {
        ("train", "--config-file", "demo", "--output-dir", str(tmp_path / "t"), "optim.epochs=0"): "optim.epochs",
        ("dense", "train", "--task", "seg", "--head", "linear", "--model", "dinov2_vits14", "--train-dataset",
         "SegSample:split=train", "--val-dataset", "SegSample:split=val", "--output-dir", str(tmp_path / "s"),
         "lr=-1"): "dense setting 'lr' is -1.0",
        ("embed", str(tmp_path / "missing"), "--out", str(tmp_path / "e.npz")): "missing",
        ("train", "--output-dir", str(tmp_path / "t"), "--gpus-per-node", "0"): "--gpus-per-node",
        ("distill", "--teacher", str(tmp_path / "nothere"), "--output-dir", str(tmp_path / "d")): "does not exist",
        ("eval", "knn", "--train-dataset", "Sample:split=TRAIN", "--val-dataset", "Sample:split=VAL", "--model",
         "dinov2_vits14", "--output-dir", str(tmp_path / "f" / "x")): "is a file",
    }
    (tmp_path / "f").write_bytes(b"")
    (tmp_path / "old" / "checkpoints" / "checkpoint_0000009.pth").parent.mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "checkpoint_0000009.pth").write_bytes(b"")
    old = ["--output-dir", str(tmp_path / "old"), "--no-resume"]  # a new run over an old one: they would mix
    bad[("train", "--config-file", "demo", *old)] = "already holds a run (checkpoint of iteration 9)"
    bad[("distill", "--teacher", str(tmp_path / "f"), *old)] = "already holds a run"
    bad[("dense", "train", "--task", "seg", "--head", "linear", "--model", "dinov2_vits14", "--train-dataset",
         "SegSample:split=train", "--val-dataset", "SegSample:split=val", *old)] = "already holds a run"
    for argv, message in bad.items():
        assert main([*argv, "--nodes", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    # a job setting without --nodes: the command ran here, and the setting did nothing
    images = write_images(tmp_path / "images")
    for flag in (["--partition", "gpu"], ["--timeout", "60"], ["--gpus-per-node", "4"], ["--slurm-comment", "x"]):
        assert main(["embed", str(images), "--random-init", "--out", str(tmp_path / "e.npz"), *flag]) == 2
        assert capsys.readouterr().err == (f"error: {flag[0]} is a setting of the SLURM job that --nodes submits; add "
                                           f"--nodes N to submit the command, or drop {flag[0]}\n")
    assert submitted == [] and not (tmp_path / "e.npz").exists()


def test_the_job_reruns_the_command_and_a_requeue_resumes(tmp_path, submitted, monkeypatch) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", IN_JOB_ENV):
        monkeypatch.setenv(name, "")  # set here so that the job's values are undone after the test
        monkeypatch.delenv(name)
    images = write_images(tmp_path / "images")
    config = tmp_path / "config.yaml"
    config.write_text(PICO_CONFIG)
    argv = ["embed", str(images), "--config-file", str(config), "--random-init", "--image-size", "28",
            "--num-workers", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "e.npz"), *SLURM]
    assert main(argv) == 0 and not (tmp_path / "e.npz").exists()
    submitted[0]["job"]()  # a task of the job: it embeds, and submits nothing
    assert np.load(tmp_path / "e.npz")["cls"].shape == (1, 64) and len(submitted) == 1
    import os

    assert (os.environ["MASTER_ADDR"], os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("node7", "0", "1")
    train = CommandJob(["train", "--no-resume", "--output-dir", "x", *SLURM])
    assert train.checkpoint().argv == ["train", "--output-dir", "x", *SLURM]  # its own checkpoints: resumed


def test_nodes_under_a_launcher_is_refused(tmp_path, submitted, monkeypatch, capsys) -> None:
    """torchrun ... --nodes 2 would have submitted one job per launched process."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--config-file", "demo", "--output-dir", str(tmp_path), "--nodes", "2"]) == 2
    assert "run it once, without torchrun or srun" in capsys.readouterr().err and submitted == []


def test_slurm_without_submitit_is_a_clear_error(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)
    monkeypatch.delenv(IN_JOB_ENV, raising=False)
    assert main(["train", "--config-file", "demo", "--output-dir", str(tmp_path), "--nodes", "1"]) == 2
    assert "pip install 'dinokit[slurm]'" in capsys.readouterr().err


def test_a_real_submitit_job_runs_the_command(tmp_path, monkeypatch, capsys) -> None:
    """submitit itself (its local executor where there is no SLURM, as here): the job is pickled, started in
    another process with submitit's job environment, and that process runs the command and writes its output."""
    import time

    submitit = pytest.importorskip("submitit")
    if submitit.AutoExecutor.which() != "local":
        pytest.skip("a SLURM cluster is reachable: its executor would queue the job")
    monkeypatch.delenv(IN_JOB_ENV, raising=False)
    images = write_images(tmp_path / "images")
    config = tmp_path / "config.yaml"
    config.write_text(PICO_CONFIG)
    out = tmp_path / "e.npz"
    command = ["embed", str(images), "--config-file", str(config), "--random-init", "--image-size", "28",
               "--num-workers", "0", "--device", "cpu", "--no-progress", "--out", str(out),
               "--nodes", "1", "--gpus-per-node", "1", "--timeout", "5"]
    # no SLURM here: one line, rather than submitit's local executor running the tasks while "submitted"
    for value in (None, "0", "false"):  # 0 and false said "on" too
        if value is None:
            monkeypatch.delenv(LOCAL_EXECUTOR_ENV, raising=False)
        else:
            monkeypatch.setenv(LOCAL_EXECUTOR_ENV, value)
        assert main(command) == 2 and not (tmp_path / "e.slurm").exists()
        err = capsys.readouterr().err
        assert "--nodes submits the command to SLURM, and no SLURM cluster is reachable from here" in err
    monkeypatch.setenv(LOCAL_EXECUTOR_ENV, "1")
    assert main(command) == 0
    deadline = time.monotonic() + 300
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    logs = "".join(p.read_text() for p in (tmp_path / "e.slurm").glob("*.out"))
    assert out.exists(), logs
    assert np.load(out)["cls"].shape == (1, 64) and "wrote" in logs
