"""SLURM launch through submitit (optional extra): one task per GPU, requeued on timeout.

Each task runs the same ``train()`` as ``torchrun`` would; ``dinokit.distributed`` reads the SLURM
variables. Because every run resumes from its newest checkpoint, a requeued job simply continues.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import DinokitError


class _TrainJob:
    def __init__(self, cfg_yaml: str, output_dir: str, resume: bool) -> None:
        self.cfg_yaml, self.output_dir, self.resume = cfg_yaml, output_dir, resume

    def __call__(self) -> None:
        import submitit

        from ..cli.train import pretrain

        env = submitit.JobEnvironment()
        os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
        os.environ.setdefault("MASTER_PORT", str(20000 + int(env.job_id.split("_")[0]) % 40000))
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank))
        pretrain(OmegaConf.create(self.cfg_yaml), output_dir=self.output_dir, resume=self.resume)

    def checkpoint(self):  # called by submitit on timeout/preemption: requeue, resuming from the last checkpoint
        import submitit

        return submitit.helpers.DelayedSubmission(_TrainJob(self.cfg_yaml, self.output_dir, True))


def submit(cfg: DictConfig, *, output_dir: str, resume: bool, nodes: int, gpus_per_node: int,
           partition: str | None, timeout_min: int, comment: str | None = None):
    try:
        import submitit
    except ImportError:
        raise DinokitError("SLURM launch needs submitit: pip install 'dinokit[slurm]' (or use torchrun)") from None
    folder = Path(output_dir) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=str(folder), slurm_max_num_timeout=30)
    params = dict(
        nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=gpus_per_node, cpus_per_task=10,
        timeout_min=timeout_min, mem_gb=0, slurm_signal_delay_s=120, name="dinokit",
    )
    if partition:
        params["slurm_partition"] = partition
    if comment:
        params["slurm_comment"] = comment
    executor.update_parameters(**params)
    return executor.submit(_TrainJob(OmegaConf.to_yaml(cfg), str(output_dir), resume))
