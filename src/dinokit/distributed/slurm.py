"""SLURM launch through submitit (optional extra): a dinokit command line submitted as a job of one task per GPU,
requeued on timeout or pre-emption.

Every task reruns the same command line (``dinokit.cli.main``) as ``torchrun`` would start it: the command's own
checks, banner and summary run in the job, and ``dinokit.distributed`` reads the launcher variables set here.
The training commands resume from their newest checkpoint, so a requeued job simply continues; the others start
again. ``--no-resume`` is dropped from a requeued job's command line (its own checkpoints would be refused).
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from ..errors import DinokitError

# Set in a job's tasks: the command they run is the submitted one, and submits nothing itself.
IN_JOB_ENV = "DINOKIT_SLURM_JOB"
LOCAL_EXECUTOR_ENV = "DINOKIT_SLURM_LOCAL"  # 1: where no SLURM is reachable, run a job with submitit's local executor


def add_slurm_options(parser: argparse.ArgumentParser, *, timeout_min: int = 2800) -> None:
    """``--nodes`` (submit when > 0), ``--gpus-per-node``, ``--partition``, ``--timeout``, ``--slurm-comment``."""
    slurm = parser.add_argument_group("SLURM (needs the 'slurm' extra: pip install dinokit[slurm])")
    slurm.add_argument("--nodes", type=int, default=0, help="submit this command to SLURM on this many nodes")
    # None when not given: without --nodes, a given one is told (it did nothing); the defaults apply in submit_if_asked
    slurm.add_argument("--gpus-per-node", type=int, default=None, help=f"one task per GPU [{GPUS_PER_NODE}]")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--timeout", type=int, default=None,
                       help=f"job time limit in minutes (requeued on timeout) [{timeout_min}]")
    slurm.add_argument("--slurm-comment", default=None)
    parser.set_defaults(slurm_timeout_min=timeout_min)


GPUS_PER_NODE = 8
_JOB_FLAGS = ("gpus_per_node", "partition", "timeout", "slurm_comment")


class CommandJob:
    """One SLURM task of a submitted command line (pickled by submitit)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> None:
        import submitit

        from ..cli import main

        env = submitit.JobEnvironment()
        os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
        os.environ.setdefault("MASTER_PORT", str(20000 + int(env.job_id.split("_")[0]) % 40000))
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank))
        os.environ[IN_JOB_ENV] = "1"
        # a task of a process group ends in there (dinokit.distributed.end_process); a run stopped by the time
        # limit's signal saves its checkpoint, then main hands the signal to submitit's handler, which requeues
        code = main(self.argv)
        if code:
            raise SystemExit(code)

    def checkpoint(self):  # called by submitit on timeout/pre-emption: requeue, resuming from the last checkpoint
        import submitit

        return submitit.helpers.DelayedSubmission(CommandJob([a for a in self.argv if a != "--no-resume"]))


def submit_if_asked(args: argparse.Namespace, log_dir: str | Path) -> bool:
    """Submit the command line ``args`` came from when ``--nodes`` > 0 (not inside a job already); True when
    submitted (the command then ends: the job does the work). Job logs go to ``log_dir``."""
    if os.environ.get(IN_JOB_ENV):
        return False
    if args.nodes <= 0:
        given = [f"--{key.replace('_', '-')}" for key in _JOB_FLAGS if getattr(args, key, None) is not None]
        if given:  # the command ran here, and the setting did nothing
            raise DinokitError(f"{given[0]} is a setting of the SLURM job that --nodes submits; add --nodes N to "
                               f"submit the command, or drop {given[0]}")
        return False
    gpus = GPUS_PER_NODE if args.gpus_per_node is None else args.gpus_per_node
    timeout = args.slurm_timeout_min if args.timeout is None else args.timeout
    if gpus < 1 or timeout < 1:
        raise DinokitError("--gpus-per-node and --timeout must be at least 1")
    from . import launched_processes

    if launched_processes() > 1:  # every launched process would submit its own job
        raise DinokitError("--nodes submits the command to SLURM, which starts its processes: run it once, "
                           "without torchrun or srun")
    try:
        import submitit
    except ImportError:
        raise DinokitError("SLURM launch needs submitit: pip install 'dinokit[slurm]' (or use torchrun)") from None
    where = submitit.AutoExecutor.which() if hasattr(submitit.AutoExecutor, "which") else "slurm"
    if where != "slurm" and os.environ.get(LOCAL_EXECUTOR_ENV, "").strip().lower() not in ("1", "true", "yes"):
        # submitit would run the job's tasks here, one process per "GPU", while saying it was submitted
        raise DinokitError(f"--nodes submits the command to SLURM, and no SLURM cluster is reachable from here (no "
                           f"sbatch); run it without --nodes (torchrun for several processes), or set "
                           f"{LOCAL_EXECUTOR_ENV}=1 to run the job's tasks on this machine with submitit's local executor")
    folder = Path(log_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=str(folder), slurm_max_num_timeout=30)
    params = dict(
        nodes=args.nodes, gpus_per_node=gpus, tasks_per_node=gpus, cpus_per_task=10, timeout_min=timeout, mem_gb=0,
        slurm_signal_delay_s=120, name=f"dinokit-{args.command}",
    )
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.slurm_comment:
        params["slurm_comment"] = args.slurm_comment
    executor.update_parameters(**params)
    job = executor.submit(CommandJob(args.command_line))
    print(f"submitted SLURM job {job.job_id} ({args.nodes} node(s) x {gpus} task(s)): "
          f"dinokit {shlex.join(args.command_line)}; logs in {folder}")
    return True
