"""Commands under launchers (torchrun, SLURM): messages from the first process only, one config error per node, a
process without its GPU, exit status after a process group, stray launcher variables."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dinokit.cli import main as cli_main
from dinokit.errors import DinokitError
from test_train import images  # noqa: F401  (a fixture)
from tiny import tiny_run


def test_end_process_runs_the_exit_handlers_flushes_and_exits_with_the_code():
    """How a torchrun/SLURM rank ends (dinokit.distributed.end_process): no interpreter finalisation, nothing lost."""
    code = ("import atexit, sys; from dinokit import distributed; atexit.register(lambda: print('handler ran')); "
            "print('buffered', end=''); sys.stderr.write('err'); distributed.end_process(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "bufferedhandler ran\n", "err")


def test_messages_before_the_group_starts_come_from_the_launchers_first_process(monkeypatch):
    """Notes printed before ``init_process_group`` (e.g. about the k-NN monitor) appear once per run, not per rank."""
    from dinokit import distributed

    for env, first in (({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False), ({"SLURM_PROCID": "3"}, False)):
        for key in ("RANK", "SLURM_PROCID"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert distributed.is_first_process() is first, env


def test_a_config_error_under_a_launcher_is_printed_once_per_node_not_once_per_rank(monkeypatch, tmp_path, capsys):
    """Before joining the group every rank fails alike on its arguments: the first process of each node says why."""
    from dinokit import cli

    monkeypatch.setattr(cli, "SILENT_RANK_EXIT_DELAY_S", 0.0)
    cases = (({}, True), ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, True),
             ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, False),
             ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, True),  # the second node's first process
             ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}, False))
    for env, prints in cases:
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert cli.main(["train", "--config-file", "small", "--output-dir", str(tmp_path / "run"), "optim.bogus_key=1"]) == 2, env
        err = capsys.readouterr().err
        assert (err.count("error: ") == 1 and "bogus_key" in err and len(err.splitlines()) == 1) if prints else err == "", (env, err)


def test_a_process_without_its_gpu_says_so_whatever_its_rank(monkeypatch, images, tmp_path, capsys):
    """torchrun --nproc_per_node 2 on a one-GPU node: local rank 1 has no GPU 1. That error is its own (rank 0 is
    fine and waits for it), so it prints it in one line although it is not the node's first process, and stops
    before asking CUDA for the device."""
    from dinokit import cli, distributed

    monkeypatch.setattr(cli, "SILENT_RANK_EXIT_DELAY_S", 0.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device called"))
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29743"}.items():  # as torchrun sets them
        monkeypatch.setenv(key, value)
    with pytest.raises(DinokitError, match=r"process 1 \(local rank 1\) needs GPU 1 but this node has 1 GPU; start one "
                                           r"process per GPU \(torchrun --nproc_per_node 1"):
        distributed.init_from_environment()
    args = ["train", "--config-file", "demo", "--output-dir", str(tmp_path / "run"), "--device", "cpu", *tiny_run(),
            f"train.dataset_path=ImageFolder:root={images / 'train'}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error: process 1 (local rank 1) needs GPU 1") == 1 and len(err.splitlines()) == 1, err
    assert not distributed.joined_group()


def test_a_command_that_joined_a_process_group_ends_its_process_with_its_status(monkeypatch, tmp_path, capsys):
    from dinokit import distributed

    ended = []

    def end_process(code):
        ended.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(distributed, "joined_group", lambda: True)
    monkeypatch.setattr(distributed, "end_process", end_process)
    with pytest.raises(SystemExit):
        cli_main(["train", "--config-file", "demo", "--output-dir", str(tmp_path), "optim.lrr=1"])
    assert ended == [2] and "unknown config key 'optim.lrr'" in capsys.readouterr().err


def test_stray_launcher_variables_are_one_line_or_say_what_the_process_waits_for(tmp_path, monkeypatch, capsys):
    """Seen: WORLD_SIZE=abc, WORLD_SIZE without RANK or MASTER_ADDR gave tracebacks; WORLD_SIZE=2 RANK=0 with no
    other process waited 30 minutes without a word."""
    import dinokit.distributed as du
    from dinokit.cli import main

    images = tmp_path / "img"
    images.mkdir()
    __import__("PIL.Image", fromlist=["Image"]).new("RGB", (32, 32)).save(images / "a.png")
    command = ["embed", str(images), "--out", str(tmp_path / "e.npz"), "--random-init", "--image-size", "28",
               "--device", "cpu", "--num-workers", "0", "--no-progress"]
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    launch = "launch with torchrun (or srun), or unset WORLD_SIZE"
    for env, line in (({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a number; " + launch),
                      ({"WORLD_SIZE": "2"}, f"WORLD_SIZE=2 is set but RANK is not set; {launch} to run one process"),
                      ({"WORLD_SIZE": "2", "RANK": "5"}, f"WORLD_SIZE=2 is set but RANK is 5; {launch} to run one "
                                                         "process"),
                      ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 is set but MASTER_ADDR and MASTER_PORT not; "
                                                         f"{launch} to run one process")):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert main(command) == 2
        assert capsys.readouterr().err == f"error: {line}\n"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29741")
    monkeypatch.setattr(du, "WAIT_NOTE_SECONDS", 0.3)
    with pytest.raises(Exception):  # the rendezvous times out: nobody else joins
        du.init_from_environment(timeout_minutes=0.05)
    assert not du.is_enabled()
    assert ("still waiting for the 2 processes of WORLD_SIZE=2 to join at 127.0.0.1:29741 (process 0); if this "
            "command was not started by torchrun or srun, stop it and unset WORLD_SIZE and RANK"
            ) in capsys.readouterr().err


def test_a_process_waiting_for_a_group_that_never_forms_stops_on_sigterm(tmp_path):
    """Stray RANK/WORLD_SIZE (a leftover salloc shell): the process waits for the others, and its Python signal
    handlers ran only when the C++ wait returned, 30 minutes on: Ctrl-C and SIGTERM did nothing."""
    import os
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import signal, dinokit.distributed as du\n"
            "signal.signal(signal.SIGTERM, lambda *a: print('handled'))\n"  # dinokit's CLI handlers stand in here
            "print('waiting', flush=True)\n"
            "du.init_from_environment()\n")
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"waiting\n"
        time.sleep(2)  # inside the wait
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == -signal.SIGTERM
    finally:
        process.kill()
        process.wait()
