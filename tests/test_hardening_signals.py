"""Signals and kills during training: SIGTERM, SLURM's preemption signal and Ctrl-C checkpoint or stop in one line and
resume bit-exact; a kill -9 loop resumes bit-exact; processes with loader workers still exit."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from dinokit.cli import main as cli_main
from test_hardening import _assert_same_weights, _cli, images, straight  # noqa: F401  (images, straight: fixtures)


def _signal_during_iteration_1(monkeypatch, sig) -> None:
    """Send ``sig`` to this process during iteration 1 of the next run (not at a checkpoint boundary)."""
    from dinokit.train.ssl_meta_arch import SSLMetaArch

    original, calls = SSLMetaArch.compute_losses, {"n": 0}

    def signalled(self, batch, iteration, sched):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), sig)
        return original(self, batch, iteration, sched)

    monkeypatch.setattr(SSLMetaArch, "compute_losses", signalled)


def test_sigterm_checkpoints_says_how_to_resume_and_resumes_bit_exact(images, straight, tmp_path, capsys,
                                                                      monkeypatch):
    _signal_during_iteration_1(monkeypatch, signal.SIGTERM)
    out = tmp_path / "run"
    assert cli_main(_cli(out, images)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM after iteration 2 of 6: checkpoint of iteration 2 kept in {out / 'checkpoints'}; "
        "rerun the same command to resume")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint_0000002.pth"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.undo()
    # a killed run logged two iterations past its checkpoint: the resumed log has each iteration once
    with open(out / "training_metrics.json", "a") as f:
        f.write(json.dumps({"iteration": 2, "total_loss": 0.0}) + "\n" + '{"iteration": 3, "tot')
    assert cli_main(_cli(out, images)) == 0
    assert "resumed from iteration 2" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == list(range(6))
    reference = [json.loads(line) for line in (straight / "training_metrics.json").read_text().splitlines()]
    assert [line["total_loss"] for line in lines] == [line["total_loss"] for line in reference]
    _assert_same_weights(straight, out)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="no SIGUSR1/SIGUSR2 on this platform")
@pytest.mark.parametrize("name", ["SIGUSR1", "SIGUSR2"])
def test_slurm_preemption_signal_checkpoints_like_sigterm(images, tmp_path, capsys, monkeypatch, name):
    """SIGUSR1: sbatch --signal=USR1@120. SIGUSR2: what submitit asks for in --nodes jobs, where its own handler
    (requeue, then exit) took it in the middle of the run: no checkpoint, the iterations since the last one lost.
    The run now saves first, then main hands the signal to that handler (in a job of several tasks main does not
    return: CommandJob handing it over after main never ran)."""
    from dinokit.engine.interrupts import InterruptGuard

    sig = getattr(signal, name)
    requeued = []
    previous = signal.signal(sig, lambda signum, frame: requeued.append(signum))  # as submitit's, in a job
    try:
        _signal_during_iteration_1(monkeypatch, sig)
        out = tmp_path / "run"
        assert cli_main(_cli(out, images)) == 130
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"stopped by {name} (SLURM pre-emption or time limit) after iteration 2 of 6: checkpoint of iteration 2 "
            f"kept in {out / 'checkpoints'}; rerun the same command to resume")
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint_0000002.pth"]
        assert requeued == [sig]  # handed over once the run had saved (main does, before a group's process ends)
        assert not InterruptGuard.hand_over()  # once
        InterruptGuard.last_stop = sig  # a stop left by a run of the Python API, never handed over
        assert cli_main(["models"]) == 0 and requeued == [sig]  # not this command's to hand over
    finally:
        signal.signal(sig, previous)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="no SIGUSR1/SIGUSR2 on this platform")
def test_the_python_api_hands_the_stop_signal_over_too(images, tmp_path, monkeypatch):
    """pretrain() in a submitit job (the Python API, no CLI around it): the run saved and raised, and submitit's
    handler never got the signal (the job was never requeued); only the CLI's main handed it over."""
    from test_hardening import _cfg

    from dinokit.cli.train import pretrain
    from dinokit.engine.interrupts import RunInterrupted

    requeued = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))  # submitit's
    try:
        _signal_during_iteration_1(monkeypatch, signal.SIGUSR2)
        with pytest.raises(RunInterrupted, match="checkpoint of iteration 2 kept"):
            pretrain(_cfg(images), output_dir=tmp_path / "run", device="cpu")
        assert requeued == [signal.SIGUSR2]  # once the checkpoint was saved
    finally:
        signal.signal(signal.SIGUSR2, previous)


# ---------------------------------------------------------------------------------------------- kill -9 loop
@pytest.mark.slow
def test_random_kill_9_loop_then_resume_is_bit_exact(images, tmp_path):
    """``kill -9`` at random moments (inside checkpoint writes too), again and again; the run still ends bit for bit
    equal to an uninterrupted one, with each iteration logged once and no temporary file left."""
    import random
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    # 160 iterations with a checkpoint every 2, so that kills land inside checkpoint writes often
    cmd = [sys.executable, "-m", "dinokit", *_cli(out, images, "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=80")]
    ref = tmp_path / "ref"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads for both runs: the same float sums
    assert subprocess.run([*cmd[:5], str(ref), *cmd[6:]], capture_output=True, env=env).returncode == 0
    rng = random.Random(0)
    kills = 0
    for _ in range(8):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(3.0, 8.0))  # start-up takes a few seconds: most kills land during training
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 3
    assert subprocess.run(cmd, capture_output=True, env=env).returncode == 0
    a = torch.load(ref / "checkpoints" / "checkpoint_0000160.pth", weights_only=True)["model"]
    b = torch.load(out / "checkpoints" / "checkpoint_0000160.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == list(range(160))
    assert not list(out.rglob(".*tmp*")) and not (out / ".dinokit.lock").exists()


def test_sigterm_to_the_whole_process_group_with_workers_is_one_line(images, tmp_path):
    """`timeout -s TERM` (and SLURM) signal the whole group: a data-loading worker killed by it first made the
    loader's teardown print a "DataLoader worker ... is killed by signal" traceback after the stop line. Workers
    now ignore SIGTERM; the main process checkpoints and stops them."""
    import subprocess
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dinokit", *_cli(out, images, "optim.epochs=200", "train.num_workers=1",
                                                  flags=["--no-progress"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("checkpoint_*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its worker alike
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM after iteration") and "Traceback" not in err, err


def test_sigterm_stops_a_command_as_ctrl_c_does(images, tmp_path):
    """SIGTERM (`timeout`, `kill`) killed a non-training command at once: its output lock and half-written temporary
    files stayed behind. It now ends as a Ctrl-C does: one line, exit status 143, lock and temporary files gone."""
    import shutil
    import subprocess
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(64):
        shutil.copy(next((images / "train").rglob("*.png")), folder / f"{i:02d}.png")
    out = tmp_path / "emb.npz"
    cmd = [sys.executable, "-m", "dinokit", "embed", str(folder), "--model", "dinov2_vits14", "--random-init",
           "--image-size", "224", "--batch-size", "4", "--num-workers", "1", "--device", "cpu", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    lock = tmp_path / ".emb.npz.lock"
    while not lock.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(3.0)  # embedding, with its data-loading worker
    # the group's signal as it may land: the worker first (killed by it, it made the main process's loader raise)
    for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        os.kill(int(child), signal.SIGTERM)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)  # then the main process and its worker alike
    time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # a second one, during the first one's clean-up, is ignored
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "stopped by SIGTERM", err
    assert "Traceback" not in err and "Exception ignored" not in err and "killed by signal" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many"]  # no lock, no temporary file, no output


def test_a_process_exits_while_a_loader_keeps_its_workers(tmp_path):
    """Workers ignore SIGTERM (a signal to the whole group is the main process's to handle), and multiprocessing's
    exit handler terminates daemonic children with SIGTERM and then waits: a loader still alive at exit (kept by a
    traceback, as pytest keeps a stopped run's) hung the process for ever. Leftover workers are now killed."""
    import subprocess
    import time

    script = tmp_path / "leftover.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader\n"
        "from dinokit.data.loaders import init_worker\n"
        "kept = iter(DataLoader(list(range(100)), batch_size=2, num_workers=2, worker_init_fn=init_worker))\n"
        "next(kept)\n"
        "import multiprocessing, signal, sys, time\n"
        "def mine():\n"  # a daemonic child of the user's keeps its SIGTERM (and its clean-up)
        "    signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.5), open(sys.argv[1], 'w').write('clean'),\n"
        "                                              sys.exit(0)))\n"
        "    signal.pause()\n"
        "child = multiprocessing.Process(target=mine, daemon=True)\n"
        "child.start()\n"
        "print('exiting', flush=True)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "mine")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout == "exiting\n" and proc.stderr == "", proc.stderr  # no traceback
    assert (tmp_path / "mine").read_text() == "clean"
    assert time.monotonic() - start < 50


def test_a_sigterm_lost_in_a_finaliser_does_not_leave_a_command_unstoppable(monkeypatch):
    """A SIGTERM raised where Python discards the exception (a finaliser, e.g. a data loader's) was followed by
    ignoring SIGTERM for good: the command ran on and could not be stopped. A repeat within a moment is still
    taken as the same stop (ignored); a later one stops the command."""
    import time

    from dinokit import cli

    monkeypatch.setattr(cli, "SIGTERM_REPEAT_S", 0.2)
    with pytest.raises(cli.Terminated, match="stopped by SIGTERM"):
        with cli._sigterm_as_interrupt(launched=1):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            except cli.Terminated:
                pass  # lost, as in a finaliser
            os.kill(os.getpid(), signal.SIGTERM)  # the same stop signalled again at once: ignored
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGTERM)  # later: stops
            time.sleep(5)
            pytest.fail("not stopped")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored on the way out


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_slurms_signal_to_a_launched_command_is_said_once(monkeypatch, rank, said):
    """Under srun or torchrun a command stopped by SLURM's SIGUSR1 was silent on every process (as a launcher's
    SIGTERM to the others is): nothing said why the job ended. The first process says it."""
    import time

    from dinokit import cli

    monkeypatch.setenv("RANK", rank)
    with pytest.raises(cli.Terminated) as stop:
        with cli._sigterm_as_interrupt(launched=2):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)
    assert stop.value.args[0] == ("stopped by SIGUSR1" if said else "")
    with pytest.raises(cli.Terminated) as stop:
        with cli._sigterm_as_interrupt(launched=2):
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher's, after another process failed: silent
            time.sleep(5)
    assert stop.value.args[0] == ""


def test_a_stop_while_a_loader_starts_its_workers_does_not_hang_the_exit(tmp_path):
    """A Ctrl-C (or SIGTERM) just after a loader's first worker started left a half-built iterator, which could not
    be shut down (or was already collected): the exit clean-up stopped at it, and multiprocessing's exit handler
    waited for ever for the worker, which ignores SIGTERM. The stop line was printed, then the process hung."""
    import subprocess

    script = tmp_path / "half_built.py"
    script.write_text(
        "import time, multiprocessing.process as mpp\n"
        "from torch.utils.data import DataLoader\n"
        "from dinokit.data.loaders import init_worker\n"
        "start = mpp.BaseProcess.start\n"
        "def interrupted(self):\n"
        "    start(self)\n"
        "    time.sleep(1)\n"  # the worker has set SIGTERM aside by now
        "    raise KeyboardInterrupt\n"
        "mpp.BaseProcess.start = interrupted\n"
        "try:\n"
        "    iter(DataLoader(list(range(8)), num_workers=2, worker_init_fn=init_worker))\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout == "interrupted\n", proc.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="no SIGUSR1/SIGUSR2 on this platform")
def test_slurm_signals_stop_other_commands_as_sigterm_does_unless_the_program_takes_them(monkeypatch, capsys):
    """sbatch --signal=USR1@120 killed eval, embed, curate (and train before its loop) at once: no line, status 138,
    the lock left behind (a job requeued on another node was refused). A handler of the program's own (submitit's
    SIGUSR2 requeue in a --nodes job) is left to it."""
    from dinokit import cli
    from dinokit.cli import models as models_command

    monkeypatch.setattr(models_command, "run", lambda args: signal.raise_signal(signal.SIGUSR1) or 0)
    assert cli_main(["models"]) == 128 + signal.SIGUSR1
    assert capsys.readouterr().err == "stopped by SIGUSR1\n"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored
    requeued = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))
    try:
        with cli._sigterm_as_interrupt(launched=1):
            signal.raise_signal(signal.SIGUSR2)
        assert requeued == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_pool_left_open_by_a_script_that_imports_dinokit_still_exits():
    """The exit clean-up of leftover loader workers killed a Pool's idle workers (daemonic too) while one held the
    Pool's queue lock, before the Pool's own finaliser ran: the script hung at exit. Running multiprocessing's
    finalisers first instead shut down a Manager before the program's own exit handler could read it."""
    import subprocess

    code = ("import atexit, multiprocessing as mp\n"
            "def square(x):\n    return x * x\n"
            "if __name__ == '__main__':\n"
            "    shared = mp.Manager().dict(main=2)\n"  # read by the program's own exit handler, registered first
            "    atexit.register(lambda: print('at exit', dict(shared), flush=True))\n"
            "    import dinokit.data.loaders\n"
            "    pool = mp.Pool(2)\n    print(pool.map(square, range(4)), flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout == "[0, 1, 4, 9]\nat exit {'main': 2}\n", proc.stderr


def test_a_run_whose_other_process_ended_says_which_checkpoint_is_kept_without_saving(tmp_path):
    """Under torchrun, a process whose collective failed as another one ended printed the backend's traceback (about
    60 lines), or tried to save a checkpoint, itself a collective, and failed again. It now waits for the launcher's
    SIGTERM and says in one line what is kept (checked by hand with a killed rank; the collective part is here)."""
    from dinokit.engine import loop
    from test_engine import run_toy

    engine, _ = run_toy(tmp_path / "run", stop_after=10)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert engine._interrupted("SIGTERM", 15, 10, can_save=False) == (
        "stopped by SIGTERM after iteration 15 of 40: another process of the run ended, so the iterations after 10 "
        f"could not be saved; checkpoint of iteration 10 kept in {tmp_path / 'run' / 'checkpoints'}; rerun the same "
        "command to resume")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert 0 < loop.PEER_LOSS_WAIT_S < 30  # the launcher stops the others at once; torchrun kills after 30 s


def test_loader_workers_ignore_every_stop_signal():
    """SIGUSR2 (a stop signal like SIGTERM and SIGUSR1) reached the workers of a loader too: a worker killed by it
    made the loader's teardown print a traceback, and one that inherited submitit's handler requeued the job."""
    from torch.utils.data import DataLoader

    from dinokit.data.loaders import init_worker

    def dispositions(_):
        return [signal.getsignal(getattr(signal, name)) == signal.SIG_IGN for name in ("SIGTERM", "SIGUSR1", "SIGUSR2")]

    loader = DataLoader([0], num_workers=1, worker_init_fn=init_worker, collate_fn=lambda items: dispositions(items))
    assert next(iter(loader)) == [True, True, True]
