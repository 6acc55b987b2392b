"""The training loop every dinokit trainer runs: a :class:`~dinokit.engine.task.Task` from set-up to the last snapshot.

The engine owns what is the same for pretraining, distillation and head training: the precomputed
schedules applied to parameter groups, gradient clipping, mixed precision, FSDP2/compile/activation
checkpointing applied from outside, atomic checkpoints that resume exactly (data position included),
metrics lines and the progress bar, the NaN stop, snapshots, and hooks called after each snapshot
(e.g. a k-NN monitor, passed in by the command). It runs unchanged in one CPU process, on one GPU, or
under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from .. import distributed as dist_utils
from ..devices import batch_to
from ..errors import DinokitError, TrainingHealthWarning
from ..tracking import make_tracker
from .checkpoint import Checkpointer, UnreadableCheckpoint
from .metrics import MetricsLogger, truncate_metrics
from .interrupts import PEER_LOSS_WAIT_S, InterruptGuard, RunInterrupted, stop_requested, stopped_line
from .run_dir import check_disk_space
from .optim import apply_optim_schedule, build_optimizer, get_param_groups
from .parallel import average_buffers, parallelize, reshard
from .snapshots import save_export
from .task import Task


# steps an fp16 run may skip (the loss scale halved from 65536 to 256) before most skipped is a warning
SKIPPED_STEPS_ALLOWED = 8


@dataclass
class EngineConfig:
    """The engine's own settings (a command fills them from its config's ``train``/``optim``/... keys)."""

    max_iter: int  # iterations of the whole run
    checkpoint_period: int  # iterations between resumable checkpoints
    snapshot_period: int = 0  # iterations between snapshots (0: only the last iteration)
    log_freq: int = 10  # iterations between metrics lines
    clip_grad: float = 0.0  # gradient-norm clip per trainable module (0: none)
    dtype: torch.dtype = torch.float32  # autocast dtype (float32: no autocast)
    grad_scaler: bool = True  # scale the loss when dtype is float16
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute block activations of trainable modules in backward
    checkpoint_policy: str = "full"  # what checkpointed blocks keep: full (their input) or selective (+ matmuls)
    reshard_after_forward: Mapping[str, bool] | None = None  # FSDP2 flag per module name (default True)
    layerwise_decay: float = 1.0  # lr multiplier per block below the top of each backbone
    patch_embed_lr_mult: float = 1.0  # extra lr multiplier of patch embeddings
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    keep_checkpoints: int = 3
    tracker: str = "none"  # also log to tensorboard or wandb
    run_config: dict | None = None  # recorded by trackers
    progress: bool = True  # the console progress bar (the metrics lines are written either way)


class Hook(Protocol):
    """Called on every rank after each snapshot; ``log`` appends a line to ``training_metrics.json``."""

    def __call__(self, iteration: int, snapshots: dict[str, Path], log: Callable[[dict], None]) -> None: ...


def init_run(seed: int) -> tuple[int, int]:
    """Join the process group (if launched by torchrun/SLURM) and seed this rank; returns (rank, world size).

    Call it before building the task, so that initialisation is reproducible. fp32 matrix products may use TF32
    on GPUs, as the official training sets (no effect on the CPU; bf16 autocast products are unaffected).
    """
    torch.backends.cuda.matmul.allow_tf32 = True
    dist_utils.init_from_environment()
    rank = dist_utils.get_rank()
    torch.manual_seed(seed + rank)
    return rank, dist_utils.get_world_size()


class Engine:
    """Runs ``task`` into ``output_dir`` on ``device`` with the given schedules and hooks."""

    def __init__(
        self,
        task: Task,
        cfg: EngineConfig,
        *,
        output_dir: str | Path,
        device: torch.device,
        schedules: Mapping[str, Any],
        hooks: Iterable[Hook] = (),
    ) -> None:
        self.task, self.cfg, self.device = task, cfg, device
        self.output_dir = Path(output_dir)
        self.schedules = dict(schedules)
        self.hooks = list(hooks)
        self.is_main = dist_utils.is_main_process()
        self._older_log = False  # the resumed metrics file holds lines of a dinokit with another total_loss
        self.output_dir.mkdir(parents=True, exist_ok=True)

        task.to(device)
        mesh = None
        if dist_utils.get_world_size() > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (dist_utils.get_world_size(),))
        self.sharded = mesh is not None
        for module in task.inference_modules().values():
            module.requires_grad_(False)
        parallelize(
            task.trainable_modules(),
            task.inference_modules(),
            mesh=mesh,
            compile_blocks=cfg.compile,
            activation_checkpointing=cfg.activation_checkpointing,
            checkpoint_policy=cfg.checkpoint_policy,
            param_dtype=cfg.dtype if (mesh is not None and device.type == "cuda" and cfg.dtype != torch.float32) else None,
            reshard_after_forward=dict(cfg.reshard_after_forward or {}),
        )
        task.train()
        self.averaged = [m for m in task.trainable_modules().values() if self.sharded and any(  # found once: their
            b.is_floating_point() for b in m.buffers())]  # BatchNorm statistics are averaged after each step

        groups = []
        for module in task.trainable_modules().values():
            groups += get_param_groups(module, lr_decay_rate=cfg.layerwise_decay, patch_embed_lr_mult=cfg.patch_embed_lr_mult)
        self.optimizer = build_optimizer(groups, betas=cfg.betas)
        use_scaler = cfg.dtype == torch.float16 and cfg.grad_scaler
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        self.steps_taken = 0  # by the optimiser in this process: the loss scaler skips steps of overflowed gradients
        self.skipped_in_a_row, self._skips_said = 0, False
        self.optimizer.register_step_post_hook(lambda *_: setattr(self, "steps_taken", self.steps_taken + 1))
        # selective checkpointing replays the block's operators in backward: autocast's cache of cast weights made
        # the replay differ from the forward (a RuntimeError in every bf16/fp16 run), so it goes without the cache
        selective = cfg.activation_checkpointing and cfg.checkpoint_policy == "selective"
        self.autocast = (torch.autocast(device.type, dtype=cfg.dtype, cache_enabled=not selective)
                         if cfg.dtype != torch.float32 else contextlib.nullcontext())
        self.checkpointer = Checkpointer(
            self.output_dir / "checkpoints", model=task.checkpointed(), optimizer=self.optimizer, keep=cfg.keep_checkpoints,
            scaler=self.scaler,
        )

    # ------------------------------------------------------------------ one step
    def step(self, batch: Any, iteration: int, sched: Mapping[str, float]):
        """losses -> backward -> clip per trainable module -> optimiser step -> ``task.after_step``."""
        apply_optim_schedule(self.optimizer, lr=sched["lr"], wd=sched["wd"], last_layer_lr=sched.get("last_layer_lr", sched["lr"]),
                             backbone_lr=sched.get("backbone_lr"), beta1=sched.get("beta1"))
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            out = self.task.compute_losses(batch, iteration, sched)
        if self.scaler is not None:
            self.scaler.scale(out.total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            out.total.backward()
        if self.sharded:
            for module in self.task.trainable_modules().values():
                reshard(module)  # a module that ran without gradients keeps gathered parameters otherwise
        if self.cfg.clip_grad:
            for module in self.task.trainable_modules().values():
                torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.clip_grad)
        if self.scaler is not None:
            taken = self.steps_taken
            self.scaler.step(self.optimizer)  # it skips the step when a gradient is not finite (it knows: no sync)
            self.scaler.update()
            self.skipped_in_a_row = 0 if self.steps_taken > taken else self.skipped_in_a_row + 1
        else:
            self.optimizer.step()
        if self.averaged:  # BatchNorm statistics equal on every process (checkpoints hold one copy)
            average_buffers(self.averaged)
        self.task.after_step(iteration, sched)
        return out

    # ------------------------------------------------------------------ resume
    def restore(self, *, resume: bool, weights: str | Path | None = None) -> int:
        """The iteration to start from: the newest checkpoint of the run (``resume``), else an explicit training
        checkpoint ``weights`` (a new run starting from it), else 0."""
        if resume and (state := self.checkpointer.resume()) is not None:
            start = int(state["iteration"])
            if self.is_main:
                print(f"resumed from iteration {start} ({self.checkpointer.directory})"
                      + (f"; {weights} is used by new runs only" if weights else ""))
            return start
        if weights:
            try:
                return int(self.checkpointer.load(Path(weights))["iteration"])
            except UnreadableCheckpoint as err:
                raise DinokitError(f"cannot start from the training checkpoint {str(weights)!r}: it is {err.reason}; "
                                   "check the path, or copy the file again") from None
        if resume and self.is_main:
            origin = self.task.initial_weights or "scratch"
            print(f"starting from {origin}: no checkpoint in {self.checkpointer.directory}")
        return 0

    def checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: the checkpointed tensors plus AdamW's two moments per trainable weight."""
        model = self.task.checkpointed()
        size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        return size + sum(2 * p.numel() * 4 for m in self.task.trainable_modules().values() for p in m.parameters()
                          if p.requires_grad)

    # ------------------------------------------------------------------ the run
    def run(
        self, make_loader: Callable[[int], Iterable], *, start_iter: int = 0, stop_after: int | None = None
    ) -> dict[str, Any]:
        """Train from ``start_iter``; ``make_loader(i)`` gives the batches from global batch ``i`` on.

        ``stop_after`` ends the run after that many iterations as if it had been killed there (resume tests).
        """
        cfg, output_dir = self.cfg, self.output_dir
        max_iter = cfg.max_iter
        if start_iter >= max_iter:
            if self.is_main:
                print(f"training already complete ({max_iter} iterations) in {output_dir}")
            return {"iteration": start_iter, "output_dir": str(output_dir), "resumed": True}
        if self.is_main:
            check_disk_space(self.checkpointer.directory.parent, self.checkpoint_bytes(), cfg.keep_checkpoints)
            # a resumed run logs the later lines again
            earlier = truncate_metrics(output_dir / "training_metrics.json", start_iter)
            # lines of a dinokit before 2026-12-06: their total_loss is the minimised loss (now objective_loss)
            self._older_log = any("total_loss" in r and "objective_loss" not in r for r in earlier)
        loader = make_loader(start_iter)
        tracker = make_tracker(cfg.tracker, output_dir, cfg.run_config, start_iter) if self.is_main else None
        logger = MetricsLogger(
            output_dir / "training_metrics.json", total=max_iter, initial=start_iter, enabled=self.is_main, tracker=tracker,
            bar=cfg.progress,
        )
        log_freq, ckpt_period = max(1, cfg.log_freq), max(1, cfg.checkpoint_period)
        pending: list[tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]] = []
        last_record: dict[str, Any] = {}
        snapshots: list[str] = []
        exports: dict[str, str] = {}  # the newest snapshot's file of each export (several students: one each)
        n_bad_total = 0
        diagnosed: set[str] = set()  # warnings of Task.diagnose already shown
        end_iter = max_iter if stop_after is None else min(max_iter, stop_after)
        iteration = start_iter
        last_batch = None
        t_data = time.perf_counter()
        completed, saved = start_iter, start_iter  # iterations done, and the newest checkpoint
        guard = InterruptGuard()
        try:
            guard.__enter__()
            for iteration, batch in zip(range(start_iter, end_iter), loader):
                data_time = time.perf_counter() - t_data
                n_bad = int(getattr(batch, "n_bad", 0))
                n_bad_total += n_bad
                if getattr(batch, "n_samples", 1) == 0:  # every image of this batch was unreadable: repeat the last one
                    if last_batch is None:
                        raise DinokitError("no readable image in the first batch of the dataset; check the dataset")
                    warnings.warn(f"iteration {iteration}: no readable image in the batch; repeating the previous batch",
                                  stacklevel=1)
                    batch = last_batch
                last_batch = batch
                batch = batch_to(batch, self.device)
                sched = {name: float(values[iteration]) for name, values in self.schedules.items()}
                out = self.step(batch, iteration, sched)
                completed = iteration + 1
                logged = None if out.logged_total is None else out.logged_total.detach()
                pending.append((out.total.detach(), logged, {k: v.detach() for k, v in out.terms.items()}))
                logger.update(**_schedule_fields(sched), current_batch_size=self.task.batch_size(batch),
                              data_time=data_time, iter_time=time.perf_counter() - t_data)
                logger.step()
                done = iteration + 1
                is_last = done == max_iter
                if done % log_freq == 0 or is_last or done == end_iter or done % ckpt_period == 0:
                    # One host sync per logging window: losses are reduced over ranks and checked for NaN/inf here.
                    self._flush_losses(pending, logger, iteration)
                    pending.clear()
                    last_record = logger.log(iteration)
                    last_record["bad_images"] = self._sum_over_processes(n_bad_total)  # every process's batches
                    problem = self.task.diagnose(last_record, iteration) if self.is_main else None
                    problem = problem or self._skipped_steps(done - start_iter)
                    if problem and problem not in diagnosed:
                        diagnosed.add(problem)
                        warnings.warn_explicit(problem, TrainingHealthWarning, "dinokit", 0)  # one line, no source
                if (cfg.snapshot_period > 0 and done % cfg.snapshot_period == 0) or is_last:
                    exports = {subdir: str(path) for subdir, path in self._snapshot(iteration, logger.write).items()}
                    snapshots.append(next(iter(exports.values()), str(self.output_dir)))
                if done % ckpt_period == 0 or is_last or done == end_iter:
                    self.checkpointer.save(done)
                    saved = done
                if stop_requested(guard, done % log_freq == 0, self.device):
                    raise RunInterrupted(self._interrupted(guard.requested, completed, saved))
                t_data = time.perf_counter()
        except (RunInterrupted, DinokitError):
            raise
        except BaseException as err:
            # Stopped meanwhile: e.g. data workers killed by the same Ctrl-C. With several processes, a collective
            # that failed as another process ended, before or as the launcher stops this one: a traceback of the
            # backend's, and no checkpoint can be saved (it takes every process)
            several = dist_utils.get_world_size() > 1
            if several and isinstance(err, RuntimeError):
                deadline = time.monotonic() + PEER_LOSS_WAIT_S
                while not guard.requested and time.monotonic() < deadline:
                    time.sleep(0.1)
            if guard.requested:
                raise RunInterrupted(self._interrupted(guard.requested, completed, saved, can_save=not several)) \
                    from None
            raise
        finally:
            guard.__exit__()
            logger.close()
            if isinstance(sys.exc_info()[1], RunInterrupted):
                InterruptGuard.hand_over_unless_cli()  # the program's own handler of the signal (submitit's requeue)
        return {"iteration": iteration + 1, "output_dir": str(output_dir), "metrics": last_record,
                "snapshots": snapshots, "last_exports": exports,
                "bad_images": last_record.get("bad_images", n_bad_total)}

    def _skipped_steps(self, steps: int) -> str | None:
        """One line (once) when the fp16 loss scaler skipped most of the ``steps`` run in this process, or more than
        the first few that find the scale in a row (a run that stopped stepping partway): their gradients were not
        finite at the scales tried, and the run was training nothing."""
        skipped = steps - self.steps_taken
        stalled = self.skipped_in_a_row > SKIPPED_STEPS_ALLOWED
        if self.scaler is None or not self.is_main or self._skips_said or not (
                stalled or (skipped > SKIPPED_STEPS_ALLOWED and 2 * skipped > steps)):
            return None
        self._skips_said = True
        return (f"the optimiser skipped {skipped} of the {steps} steps so far ({self.skipped_in_a_row} in a row): their "
                f"fp16 gradients were not finite at the loss scales tried (now {self.scaler.get_scale():g}); train in "
                "bf16 (compute_precision.dtype=bf16) or fp32, or lower the lr")

    def _sum_over_processes(self, count: int) -> int:
        """``count`` summed over the processes (at a logging window, where every process already waits)."""
        if dist_utils.get_world_size() == 1:
            return count
        return int(dist_utils.all_reduce_sum(torch.tensor([count], dtype=torch.int64, device=self.device)).item())

    def _interrupted(self, signal_name: str | None, completed: int, saved: int, can_save: bool = True) -> str:
        """Save the state after ``completed`` iterations (unless just saved, or it ``can_save`` no longer: another
        process ended) and say what was kept."""
        if completed > saved and can_save:
            self.checkpointer.save(completed)
        return stopped_line(signal_name, completed, saved, self.cfg.max_iter, self.checkpointer.directory, can_save)

    def _flush_losses(self, pending, logger: MetricsLogger, iteration: int) -> None:
        if not pending:
            return
        totals = torch.stack([t for t, _, _ in pending]).float()
        official = pending[-1][1] is not None  # a task whose log has the official total_loss (see LossOutput)
        if official and self._older_log:
            self._older_log = False
            log = self.output_dir / "training_metrics.json"
            tqdm.write(f"note: the earlier lines of {log} come from an older dinokit, whose total_loss is the "
                       "minimised loss: from here on that is objective_loss, and total_loss the sum of the logged "
                       "terms, as in the official log")
        logged = torch.stack([t for _, t, _ in pending]).float() if official else totals
        names = sorted(pending[-1][2])
        terms = torch.stack([torch.stack([d[n].float() for n in names]) for _, _, d in pending]) if names else None
        dist_utils.all_reduce_mean(totals)
        if official:
            dist_utils.all_reduce_mean(logged)
        if terms is not None:
            dist_utils.all_reduce_mean(terms)
        if not torch.isfinite(totals).all():
            bad = iteration - len(pending) + 1 + int((~torch.isfinite(totals)).nonzero()[0])
            latest = self.checkpointer.latest()
            kept = (f"the last good checkpoint (iteration {latest[0]}) is kept in {self.checkpointer.directory}"
                    if latest else "no checkpoint had been written yet")
            value = totals[~torch.isfinite(totals)][0].item()
            raise DinokitError(f"loss became {value} at iteration {bad}; {kept}; {self.task.divergence_fix}")
        for i in range(totals.shape[0]):
            logger.update(total_loss=logged[i].item(), **({"objective_loss": totals[i].item()} if official else {}))
            if terms is not None:
                logger.update(**{n: terms[i, j].item() for j, n in enumerate(names)})

    def _snapshot(self, iteration: int, log: Callable[[dict], None], name: str | None = None) -> dict[str, Path]:
        """Write every export of the task into ``eval/<name>/`` (default ``training_<iteration>``), then run the
        hooks on them; {subdir: file}."""
        paths: dict[str, Path] = {}
        for export in self.task.exports():
            path = self.output_dir / export.subdir / "eval" / (name or f"training_{iteration}") / export.filename
            save_export(export, path)
            paths[export.subdir] = path
        for hook in self.hooks:
            hook(iteration, paths, log)
        return paths

    def evaluate_only(self, iteration: int) -> dict[str, Any]:
        """The official ``--eval-only``: the exports of the restored state as ``eval/manual_<iteration>/``, and the
        hooks (the k-NN monitor) on them, their figures printed; no step, no checkpoint, no metrics line."""
        records: dict[str, Any] = {}
        exports = self._snapshot(iteration, records.update, name=f"manual_{iteration}")
        return {"iteration": iteration, "output_dir": str(self.output_dir), "metrics": records,
                "last_exports": {k: str(v) for k, v in exports.items()}, "evaluated": True}


def _schedule_fields(sched: Mapping[str, float]) -> dict[str, float]:
    """Schedule values under the official metric names (``momentum`` is logged as ``mom``)."""
    return {("mom" if name == "momentum" else name): value for name, value in sched.items()}

