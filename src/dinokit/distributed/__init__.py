"""Collective-communication helpers that do nothing in a single process.

Every collective used by losses, samplers and evaluation goes through these functions so that
the same code runs unchanged on one CPU process (no process group) and under ``torchrun``.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from datetime import timedelta
from typing import Callable, NoReturn, TypeVar

import torch
import torch.distributed as dist

from ..errors import DinokitError, ProcessSpecificError, RelayedError

T = TypeVar("T")


def is_enabled() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def is_first_process() -> bool:
    """Rank 0; before the process group starts, the process that the launcher numbers 0 (torchrun's ``RANK``,
    SLURM's ``SLURM_PROCID``): for messages printed once per run."""
    return launched_rank() == 0


def launched_rank() -> int:
    """This process's rank: the group's, or before it starts the launcher's number (0 for a plain process)."""
    return get_rank() if is_enabled() else _launcher_value("RANK", "SLURM_PROCID", 0)


def _launcher_value(torchrun_name: str, slurm_name: str, default: int) -> int:
    """A process number the launcher set before the group starts: torchrun's variable, else SLURM's."""
    value = _launcher_number(torchrun_name, None)
    return value if value is not None else _launcher_number(slurm_name, default)  # type: ignore[return-value]


def launched_processes() -> int:
    """How many processes the launcher started for this run (torchrun's ``WORLD_SIZE``, SLURM's ``SLURM_NTASKS``;
    1 for a plain process), known before any group starts."""
    return _launcher_value("WORLD_SIZE", "SLURM_NTASKS", 1)


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def reports_user_errors() -> bool:
    """Whether this process prints a user error (``error: ...``). A process that has not joined its launcher's
    group yet fails on its arguments and configuration, which every process of the run reads alike, so only
    the first process of each node prints (one line per node, not one per rank; a node whose files differ still
    says why). After joining, or in a single process, every process prints: the error may be its own."""
    if _joined_group or launched_processes() <= 1:
        return True
    return _launcher_value("LOCAL_RANK", "SLURM_LOCALID", 0) == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; identity in one process. Returns ``tensor``."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place element-wise max over ranks; identity in one process. Returns ``tensor``."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks; identity in one process. Returns ``tensor``."""
    world = get_world_size()
    if world > 1:
        all_reduce_sum(tensor)
        tensor.div_(world)
    return tensor


def all_reduce_mean_each(tensors: list[torch.Tensor]) -> None:
    """Every tensor of ``tensors`` averaged over ranks, in place, in one collective (flattened together, in float32);
    nothing in one process."""
    if not tensors or get_world_size() == 1:
        return
    flat = all_reduce_mean(torch.cat([t.detach().reshape(-1).float() for t in tensors]))
    for tensor, value in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(value.view_as(tensor))


def comm_device() -> torch.device:
    """Where tensors to send through a collective live: NCCL moves CUDA tensors only, gloo CPU ones."""
    if is_enabled() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) along dim 0 over ranks."""
    world = get_world_size()
    if world == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def exchange_rows(tensor: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of ``tensor`` sent to rank ``dest[i]``, in one all-to-all: the rows this rank receives, by sending rank
    and, within one sender, in that sender's order (``tensor`` itself in one process). Each rank holds only what it
    sends and receives, where a gather of pickled objects put every rank's rows for every destination on every rank.
    The rows travel on :func:`comm_device` and come back there."""
    world = get_world_size()
    if world == 1:
        return tensor
    device = comm_device()
    dest = dest.to(device="cpu", dtype=torch.long)
    order = torch.argsort(dest, stable=True)  # by destination, the sender's order within each
    send = tensor[order.to(tensor.device)].to(device).contiguous()
    sends = torch.bincount(dest, minlength=world)
    counts = all_gather_cat(sends[None].to(device)).cpu()  # (sender, receiver) row counts
    receives = counts[:, get_rank()]
    out = torch.empty((int(receives.sum()), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    dist.all_to_all_single(out, send, output_split_sizes=receives.tolist(), input_split_sizes=sends.tolist())
    return out


_SUBGROUPS: dict[int, object] = {}  # size -> this rank's group of that many consecutive ranks


def group_gather_cat(tensor: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, int]:
    """``tensor`` (same shape on every rank) concatenated along dim 0 over this rank's group of ``group_size``
    consecutive ranks (None, or at least the world: all ranks), without gradient, and this rank's place in the
    group; ``(tensor, 0)`` in one process. The world must be a multiple of ``group_size`` (checked by the
    caller's configuration). Every rank must call it (the first call for a size creates the groups)."""
    world = get_world_size()
    size = world if group_size is None else min(group_size, world)
    if size == 1:
        return tensor, 0
    if size == world:
        return all_gather_cat(tensor.detach()), get_rank()
    if size not in _SUBGROUPS:
        _SUBGROUPS[size], _ = dist.new_subgroups(group_size=size)
    group = _SUBGROUPS[size]
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.detach().contiguous(), group=group)
    return torch.cat(out, dim=0), get_rank() % size


def all_gather_object(obj: object) -> list:
    """Gather a picklable object from every rank (a one-element list in one process)."""
    world = get_world_size()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: object) -> list | None:
    """A picklable object from every rank, on the main process only (None on the others; a one-element list in one
    process): for results that only the main process writes, which every rank then need not receive."""
    world = get_world_size()
    if world == 1:
        return [obj]
    out: list | None = [None] * world if get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Broadcast a picklable object from ``src``; identity in one process."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main_process(fn: Callable[[], T]) -> T | None:
    """``fn()`` in the main process (None elsewhere); a :class:`DinokitError` it raises stops every process at once,
    printed by the main one (the others raise :class:`RelayedError`): they went on alone and died in a collective
    with a traceback. One process: ``fn()``."""
    result, refusal = None, None
    if is_main_process():
        try:
            result = fn()
        except DinokitError as err:
            refusal = str(err)
    refusal = broadcast_object(refusal)
    if refusal is not None:
        raise DinokitError(refusal) if is_main_process() else RelayedError(refusal)
    return result


def barrier() -> None:
    if is_enabled() and get_world_size() > 1:
        dist.barrier()


def init_from_environment(timeout_minutes: int = 30) -> bool:
    """Initialise the default process group from a ``torchrun``/SLURM environment.

    Returns True when a multi-process group was started. A plain single process (no ``RANK``
    / ``WORLD_SIZE`` in the environment) starts nothing. NCCL is used when CUDA is available,
    gloo otherwise, so the distributed path can be tested on CPUs.
    """
    if is_enabled():
        return True
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # srun without torchrun: translate SLURM's variables into torchrun's.
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_JOB_NODELIST", "127.0.0.1")
            env["MASTER_ADDR"] = _first_slurm_host(nodes)
    world = _launcher_number("WORLD_SIZE", 1)
    if world <= 1:
        return False
    launch = "launch with torchrun (or srun), or unset WORLD_SIZE to run one process"
    rank = _launcher_number("RANK", None)
    if rank is None or not 0 <= rank < world:
        raise ProcessSpecificError(f"WORLD_SIZE={world} is set but RANK is {env.get('RANK', 'not set')}; {launch}")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise ProcessSpecificError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} not; {launch}")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local_rank, n_gpus = get_local_rank(), torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise ProcessSpecificError(
                f"process {env.get('RANK', '?')} (local rank {local_rank}) needs GPU {local_rank} but this node has "
                f"{n_gpus} GPU{'s' if n_gpus != 1 else ''}; start one process per GPU "
                f"(torchrun --nproc_per_node {n_gpus}, or SLURM --ntasks-per-node {n_gpus})")
        torch.cuda.set_device(local_rank)
    waiting = threading.Timer(WAIT_NOTE_SECONDS, lambda: print(  # a stray WORLD_SIZE would wait without a word
        f"still waiting for the {world} processes of WORLD_SIZE={world} to join at {env['MASTER_ADDR']}:"
        f"{env['MASTER_PORT']} (process {rank}); if this command was not started by torchrun or srun, stop it and "
        "unset WORLD_SIZE and RANK", file=sys.stderr, flush=True))
    waiting.daemon = True
    waiting.start()
    # Python's signal handlers run only once the C++ wait returns (up to the 30-minute timeout): Ctrl-C and SIGTERM
    # did nothing. Nothing is written yet, so during the wait they end the process at once, as signals do by default.
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    finally:
        waiting.cancel()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    global _joined_group
    _joined_group = True
    return True


_joined_group = False  # init_from_environment started a process group in this process
WAIT_NOTE_SECONDS = 30.0  # when the group has not formed by then, say what it waits for


def _launcher_number(name: str, default: int | None) -> int | None:
    """The integer a launcher put in ``$name`` (``default`` when unset); one line when it is not a number."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ProcessSpecificError(f"{name}={text!r} is not a number; launch with torchrun (or srun), or unset "
                                   f"{name}") from None


def joined_group() -> bool:
    """True once :func:`init_from_environment` has started a process group in this process."""
    return _joined_group


def _first_slurm_host(nodelist: str) -> str:
    # "node[01-03,07],other" -> "node01"; "node7,node8" -> "node7"
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        return "127.0.0.1"
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def shutdown() -> None:
    """Leave the process group together: each rank waits for the others (rank 0 may still be writing its summary
    and plot), then destroys it."""
    if is_enabled():
        barrier()
        dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """End a process that joined a ``torchrun``/SLURM group without the interpreter's finalisation.

    Gloo's worker threads outlive ``destroy_process_group`` while FSDP2 state still references the group, and one
    that releases its last collective's tensors during interpreter finalisation aborts the process ("terminate
    called without an active exception", pytorch/pytorch#190489; 2 two-process CPU runs in 10 under load did).
    So the process ends here, after what finalisation would have done that matters: the exit handlers and
    flushing the standard streams. After a success (``code`` 0) the ranks first leave the group together
    (:func:`shutdown`); after a failure they do not wait for each other (another rank may never get there).
    """
    import atexit

    try:
        if code == 0:
            shutdown()
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
