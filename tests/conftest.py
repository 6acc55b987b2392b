"""Shared fixtures.

``demo_teacher``: the demo recipe pretrained for 200 iterations on a 320-image sample set (about 3 min on
one CPU thread), trained once per test session and shared by every test that needs a backbone that has
learnt something (the demo learning test, distillation, dense heads, visualisation). Set
``DINOKIT_TEST_CACHE=DIR`` to keep it between sessions while developing (CI never sets it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock  # a dependency of torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers), each worker computes on one thread: two workers of
    two threads each on a 2-core machine would fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by command-line subprocesses and data-loader workers
        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def subprocess_temp_dir(tmp_path_factory) -> None:
    """Command-line subprocesses make their temporary files under the session's pytest folder (which pytest
    prunes), not in /tmp: torchrun leaves a ``torchelastic_*`` folder behind at every launch. So does the shard
    cache."""
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("subprocess-tmp"))
    # copies of remote shards and shard indices go there too, not under the home folder
    os.environ["DINOKIT_SHARD_CACHE"] = str(tmp_path_factory.mktemp("shard-cache"))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """The tests that share the ``demo_teacher`` run go to one xdist worker (``--dist loadgroup``), so the
    session fixture is trained once, not once per worker."""
    for item in items:
        if "demo_teacher" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("demo_teacher"))


@dataclass(frozen=True)
class DemoTeacher:
    run_dir: Path  # the training output folder (config.yaml, training_metrics.json, checkpoints/, eval/)
    snapshot: Path  # eval/training_199/teacher_checkpoint.pth, with the run's config.yaml two folders up
    config_file: Path  # run_dir / "config.yaml"
    train_str: str  # ImageFolder dataset strings of the 320 training and 80 validation images
    val_str: str
    sample_root: Path
    iterations: int


@pytest.fixture(scope="session")
def demo_teacher(tmp_path_factory) -> DemoTeacher:
    from dinokit.data.sample import SAMPLE_VERSION

    cache = os.environ.get("DINOKIT_TEST_CACHE")
    if cache:
        base = Path(cache) / f"demo-teacher-v{SAMPLE_VERSION}"
    elif os.environ.get("PYTEST_XDIST_WORKER"):  # one folder for all workers: the session's common temp root
        base = tmp_path_factory.getbasetemp().parent / "demo-teacher"
    else:
        base = tmp_path_factory.mktemp("demo-teacher")
    base.mkdir(parents=True, exist_ok=True)
    # Workers take turns: the first trains, a later one finds the finished run and only resumes it (no work).
    # The xdist group above normally keeps every user of the teacher on one worker; the lock makes a lost
    # group (some pytest/xdist pairs drop it silently) cost waiting, not a second training.
    with FileLock(str(base / ".lock")):
        return _train_demo_teacher(base)


def _train_demo_teacher(base: Path) -> DemoTeacher:
    from dinokit.data import write_sample_dataset
    from dinokit.cli.train import pretrain
    from dinokit.config import load_config

    root = write_sample_dataset(base / "sample", counts={"train": 40, "val": 10})
    train_str, val_str = f"ImageFolder:root={root / 'train'}", f"ImageFolder:root={root / 'val'}"
    cfg = load_config("demo", [
        f"train.dataset_path={train_str}", "train.num_workers=1",
        # 200 iterations: 4 epochs of 50, warm-up shortened to match
        "optim.epochs=4", "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1",
        f"evaluation.knn_dataset.train={train_str}", f"evaluation.knn_dataset.val={val_str}",
        "evaluation.eval_period_iterations=200", "evaluation.knn_k=[10]",
    ])
    run = base / "run"
    pretrain(cfg, output_dir=run, resume=True, device="cpu")  # resumes (does nothing) when cached and finished
    return DemoTeacher(
        run_dir=run, snapshot=run / "eval" / "training_199" / "teacher_checkpoint.pth", config_file=run / "config.yaml",
        train_str=train_str, val_str=val_str, sample_root=root, iterations=200,
    )


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("small_data")``: the module ``benchmarks/small_data.py`` (not a package; its main not run)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # (dataclasses look their module up there)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def one_thread():
    """One intra-op thread, as in a data worker: on a busy machine, thread hand-offs dominate tiny tensors."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def real_warnings():
    """Warnings printed on stderr as the command line prints them (pytest would record them instead), in forked
    data-loader workers too."""
    import sys
    import warnings

    def to_stderr(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        sys.stderr.flush()  # a forked worker ends without flushing

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = to_stderr
        yield
