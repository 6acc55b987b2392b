"""Outputs that never mix or look whole when they are not: two commands writing one ``embed --out`` file or one
``data shard --out`` folder (one refused in one line, the first one's output intact, the lock gone afterwards on
success, on an error and on Ctrl-C), an interrupted ``data shard`` (told as such by a rerun and by the readers),
and a ``data shard --out`` path that a urls pattern cannot name. The ``curate`` work folder's lock is tested in
test_hostile_work_folders.py, on its finished curation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinokit.cli import main
from dinokit.data.datasets import make_dataset
from dinokit.errors import DinokitError

EMBED = ["--config-file", "demo", "--random-init", "--image-size", "28", "--num-workers", "0", "--device", "cpu",
         "--no-progress"]


def _images(folder: Path, n: int, size: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png", format="PNG")
    return folder


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err[len("error: "):-1]


@pytest.fixture
def live_pid():
    """The id of a live process of this host (a sleeping one), as a run holding a lock would be."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def _lock(path: Path, pid: int) -> Path:
    path.write_text(f"{socket.gethostname()} {pid}")
    return path


def _refusal(pid: int, target: Path, option: str, lock: Path) -> str:
    return (f"another run (process {pid} on {socket.gethostname()}) is writing to {target}; wait for it to end or "
            f"give another {option} (if that process is gone, delete {lock})")


# ---------------------------------------------------------------------------------------------- embed --out
@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_embed_refuses_an_output_another_run_is_writing_and_takes_over_a_killed_runs_lock(
        tmp_path, capsys, live_pid, suffix):
    """Two `embed --out X` at once both reported success, one's embeddings lost."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    src = _images(tmp_path / "src", 3)
    out = tmp_path / f"e{suffix}"
    assert main(["embed", str(src), "--out", str(out), *EMBED]) == 0
    first = out.read_bytes()
    lock = _lock(tmp_path / f".e{suffix}.lock", live_pid)
    capsys.readouterr()
    assert main(["embed", str(src), "--out", str(out), "--overwrite", *EMBED]) == 2
    assert _one_line(capsys) == _refusal(live_pid, out, "--out", lock)
    assert out.read_bytes() == first and lock.is_file()  # the writer's output and lock untouched
    _lock(lock, _dead_pid())  # a killed run's lock: taken over
    assert main(["embed", str(src), "--out", str(out), "--overwrite", *EMBED]) == 0
    assert not lock.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_embed_removes_its_lock_on_an_error_and_on_ctrl_c(tmp_path, capsys, monkeypatch):
    src = _images(tmp_path / "src", 2)
    out = tmp_path / "new" / "deeper" / "e.npz"
    assert main(["embed", str(src), "--out", str(out), *EMBED[:2], "--weights", str(tmp_path / "no.pth"),
                 *EMBED[3:]]) == 2
    capsys.readouterr()
    assert not (tmp_path / "new").exists()  # neither a lock nor the folders made for it are left

    import dinokit.cli.embed as embed_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_cli, "extract_features", interrupted)
    (tmp_path / "kept").mkdir()
    assert main(["embed", str(src), "--out", str(tmp_path / "kept" / "e.npz"), *EMBED]) == 130  # Ctrl-C
    assert capsys.readouterr().err == "interrupted\n"
    assert list((tmp_path / "kept").iterdir()) == []


def test_embed_rechecks_the_output_once_it_holds_the_lock(tmp_path, capsys, monkeypatch):
    """A run that finished while this one waited would otherwise be replaced without --overwrite."""
    src = _images(tmp_path / "src", 2)
    out = tmp_path / "e.npz"
    import dinokit.engine.run_dir as run_dir

    taken = run_dir.take_lock

    def take_after_another_run(lock, target, option):
        out.write_bytes(b"another run's embeddings")
        return taken(lock, target, option)

    monkeypatch.setattr(run_dir, "take_lock", take_after_another_run)
    assert main(["embed", str(src), "--out", str(out), *EMBED]) == 2
    assert _one_line(capsys) == (f"--out {str(out)!r} already exists; pass --overwrite to replace it, or give "
                                 "another name")
    assert out.read_bytes() == b"another run's embeddings" and not (tmp_path / ".e.npz.lock").exists()


# ---------------------------------------------------------------------------------------------- data shard --out
def test_shard_refuses_a_folder_another_run_is_writing(tmp_path, capsys, live_pid):
    src = _images(tmp_path / "src" / "a", 3).parent
    out = tmp_path / "shards"
    out.mkdir()
    lock = _lock(out / ".dinokit.lock", live_pid)
    assert main(["data", "shard", str(src), "--out", str(out)]) == 2
    assert _one_line(capsys) == _refusal(live_pid, out, "--out", lock)
    assert [p.name for p in out.iterdir()] == [".dinokit.lock"]
    _lock(lock, _dead_pid())
    assert main(["data", "shard", str(src), "--out", str(out), "--shard-size", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000001.tar", "classes.txt", "shards.json",
                                                      "sources.txt"]
    record = json.loads((out / "shards.json").read_text())
    assert record == {"complete": True, "images": 3, "shards": 2, "shard_size": 2, "max_size": None, "classes": 1,
                      "urls": f"{out}/{{000000..000001}}.tar"}


def test_an_interrupted_shard_run_is_told_by_the_rerun_and_by_the_readers(tmp_path, capsys, monkeypatch):
    """A killed `data shard` left whole-looking shards that a rerun called 'already holds shards' and training
    read as the whole data set."""
    import dinokit.data.shard_writer as data_cli

    src = _images(tmp_path / "src" / "a", 5).parent
    out = tmp_path / "shards"
    load, calls = data_cli.load_image, []

    def killed_at_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return load(*args, **kwargs)

    monkeypatch.setattr(data_cli, "load_image", killed_at_the_fourth)
    assert main(["data", "shard", str(src), "--out", str(out), "--shard-size", "2"]) == 130  # Ctrl-C
    monkeypatch.undo()
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar.partial", "shards.json"]  # no .tar, no lock
    assert json.loads((out / "shards.json").read_text())["complete"] is False
    message = f"an interrupted run left 1 shard(s) in {str(out)!r}: delete the folder (or give another --out) and rerun"
    assert main(["data", "shard", str(src), "--out", str(out)]) == 2
    assert _one_line(capsys) == message
    # killed while renaming: a shard looks whole, the record still says incomplete
    (out / "000000.tar.partial").rename(out / "000000.tar")
    assert main(["data", "shard", str(src), "--out", str(out)]) == 2
    assert _one_line(capsys) == message
    with pytest.raises(DinokitError, match=r"^the shards in .* are those of an interrupted 'dinokit data shard' run "
                       r"\(1 shard\(s\) written, shards.json does not say complete\); delete the folder and run "
                       r"'dinokit data shard' again$"):
        make_dataset(f"WebDataset:urls={out}/000000.tar")
    # the same files while a live `data shard` holds the folder's lock: still being written, not to be deleted (the
    # message said to delete the folder a live run was writing into)
    lock = _lock(out / ".dinokit.lock", os.getpid())
    with pytest.raises(DinokitError) as err:
        make_dataset(f"WebDataset:urls={out}/000000.tar")
    assert str(err.value) == (f"'dinokit data shard' (process {os.getpid()} on {socket.gethostname()}) is still "
                              f"writing the shards in {str(out)!r} (1 so far); wait for it to end (if that process "
                              f"is gone, delete {lock})")
    # before its first shard the folder holds only the lock: also being written (it said the urls named no shard)
    early = tmp_path / "early"
    early.mkdir()
    _lock(early / ".dinokit.lock", os.getpid())
    with pytest.raises(DinokitError, match=r"is still writing the shards in .*early' \(0 so far\); wait for it"):
        make_dataset(f"WebDataset:urls={early}/000000.tar")
    lock.unlink()
    # following the advice
    for p in out.iterdir():
        p.unlink()
    out.rmdir()
    assert main(["data", "shard", str(src), "--out", str(out), "--shard-size", "2"]) == 0
    assert len(make_dataset(f"WebDataset:urls={out}/{{000000..000002}}.tar")) == 5


def test_shard_removes_its_lock_and_empty_folder_when_nothing_is_readable(tmp_path, capsys):
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    (bad / "x.png").write_bytes(b"not an image")
    assert main(["data", "shard", str(bad.parent), "--out", str(tmp_path / "new")]) == 2
    capsys.readouterr()
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    assert main(["data", "shard", str(bad.parent), "--out", str(tmp_path / "mine")]) == 2
    assert list((tmp_path / "mine").iterdir()) == []  # a folder given empty stays, empty


@pytest.mark.parametrize("name, signs", [("a{b", "'{'"), ("a}b", "'}'"), ("x,y", "','"), ("x::y", "'::'"),
                                         ("o{x,y}", "'{' and '}' and ','")])
def test_shard_refuses_an_out_that_a_urls_pattern_cannot_name(tmp_path, capsys, name, signs):
    """Such a folder was written and printed as an unusable urls pattern (o{x,y}/000000.tar)."""
    src = _images(tmp_path / "src" / "a", 2).parent
    out = tmp_path / name
    assert main(["data", "shard", str(src), "--out", str(out)]) == 2
    assert _one_line(capsys) == (f"--out {str(out)!r} holds {signs}, which a WebDataset urls pattern reads as a brace "
                                 "list or a separator, so the shards could not be named; give a folder path without "
                                 "{ } , or ::")
    assert not out.exists()


def test_shard_lists_are_written_atomically(tmp_path, monkeypatch):
    """sources.txt and classes.txt went through a plain write_text: a kill could leave half of one."""
    import dinokit.data.shard_writer as data_cli

    seen = []
    real = data_cli.atomic_write

    def spy(path):
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(data_cli, "atomic_write", spy)
    src = _images(tmp_path / "src" / "a", 2).parent
    assert main(["data", "shard", str(src), "--out", str(tmp_path / "s")]) == 0
    assert {"classes.txt", "sources.txt", "shards.json", "000000.tar.partial"} <= set(seen)
    assert os.listdir(tmp_path / "s") and not any(p.name.startswith(".") for p in (tmp_path / "s").iterdir())


# ---------------------------------------------------------------------------------------------- the lock itself
def _racer(lock: str, stale: str, barrier, held) -> None:
    from dinokit.files import take_lock

    barrier.wait()
    try:
        take_lock(Path(lock), "out")
        held.put(os.getpid())
    except DinokitError:
        pass


@pytest.mark.parametrize("stale", ["", "dead", "garbage"])
def test_one_process_holds_a_lock_whatever_the_race(tmp_path, stale):
    """The lock was created empty, then written: a process reading it in between took it for a killed run's,
    deleted it and made its own; two taking over one stale lock both held the new one (26 and 21 trials of 30
    with four processes). Now it appears whole at once, and a stale one is renamed aside before it goes."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    dead = _dead_pid()
    for trial in range(12):
        lock = tmp_path / f"{trial}.lock"
        if stale == "dead":
            _lock(lock, dead)
        elif stale == "garbage":
            lock.write_bytes(b"\x00 not a lock")
        barrier, held = ctx.Barrier(4), ctx.Queue()
        racers = [ctx.Process(target=_racer, args=(str(lock), stale, barrier, held)) for _ in range(4)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(30)
        holders = []
        while not held.empty():
            holders.append(held.get())
        assert len(holders) == 1, (trial, holders)
        assert lock.read_text() == f"{socket.gethostname()} {holders[0]}"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f"{trial}.")) == [f"{trial}.lock"]


def test_odd_locks_are_one_line(tmp_path):
    from dinokit.files import take_lock

    huge = tmp_path / "huge.lock"
    huge.write_text(f"{socket.gethostname()} 99999999999999999999")  # no process has that number: a killed run's
    assert take_lock(huge, "out") == huge and huge.read_text().split()[1] == str(os.getpid())
    folder = tmp_path / "folder.lock"
    folder.mkdir()
    with pytest.raises(DinokitError, match=f"^the lock {folder} is a folder, not a dinokit lock file; remove it if no "
                                           "run is writing there$"):
        take_lock(folder, "out")


def test_a_symlinked_output_writes_the_file_it_names(tmp_path):
    """`--out link.npz --overwrite` replaced the link by a new file and left the file it named as it was."""
    from dinokit.files import atomic_write

    real, link = tmp_path / "real.npz", tmp_path / "link.npz"
    real.write_text("old")
    link.symlink_to(real)
    with atomic_write(link) as tmp:
        tmp.write_text("new")
    assert link.is_symlink() and real.read_text() == "new"
    dangling = tmp_path / "dangling.npz"
    dangling.symlink_to(tmp_path / "target.npz")
    with atomic_write(dangling) as tmp:
        tmp.write_text("made")
    assert dangling.is_symlink() and (tmp_path / "target.npz").read_text() == "made"


def test_eval_refuses_a_folder_another_evaluation_is_writing_and_clears_killed_ones_temporaries(tmp_path, capsys,
                                                                                                live_pid):
    """Two evaluations into one folder both reported success: the second resumed the first's running checkpoint, or
    one's result lines were lost. And a killed evaluation's half-written files (a feature cache's, as large as the
    features) stayed forever. The folder's lock refuses the second; once held, killed processes' temporaries go."""
    for split in ("train", "val"):
        for label in ("a", "b"):
            _images(tmp_path / split / label, 2)
    out = tmp_path / "ev"
    out.mkdir()
    lock = _lock(out / ".dinokit.lock", live_pid)
    knn = ["eval", "knn", "--output-dir", str(out), "--train-dataset", str(tmp_path / "train"), "--val-dataset",
           str(tmp_path / "val"), "--nb-knn", "1", *EMBED]
    assert main(knn) == 2
    assert _one_line(capsys) == _refusal(live_pid, out, "--output-dir", lock)
    dead = _dead_pid()
    _lock(lock, dead)
    (out / "features").mkdir()
    stale = [out / f".results_eval_knn.json.tmp-{dead}", out / "features" / f".train-cls.pt.tmp-{dead}"]
    writing = out / f".results_eval_linear.json.tmp-{live_pid}"  # a live process's: it is still writing it
    for path in [*stale, writing]:
        path.write_bytes(b"half")
    assert main(knn) == 0
    assert not any(p.exists() for p in [*stale, lock]) and writing.exists()


def test_killed_runs_temporaries_do_not_make_a_shard_folder_non_empty_nor_stay_beside_an_embedding(tmp_path, capsys):
    """A data shard killed at its first write left '.shards.json.tmp-PID', and the rerun said the folder is not
    empty; an embed killed while writing left its hidden temporaries beside --out for good."""
    src = _images(tmp_path / "src" / "a", 2).parent
    out = tmp_path / "shards"
    out.mkdir()
    dead = _dead_pid()
    (out / f".shards.json.tmp-{dead}").write_text("{")
    assert main(["data", "shard", str(src), "--out", str(out)]) == 0
    assert not (out / f".shards.json.tmp-{dead}").exists()
    beside = [tmp_path / f".emb.npy.tmp-{dead}", tmp_path / f".emb.paths.txt.tmp-{dead}"]
    other = tmp_path / f".other.npy.tmp-{dead}"  # another output's: not this command's to judge
    for path in [*beside, other]:
        path.write_bytes(b"half")
    assert main(["embed", str(src), "--out", str(tmp_path / "emb.npy"), *EMBED]) == 0
    assert not any(p.exists() for p in beside) and other.exists()


def test_a_stop_while_a_run_folder_is_cleaned_leaves_no_lock(tmp_path, monkeypatch):
    """A SIGTERM (or Ctrl-C) after train took its run folder's lock, while it deleted a killed run's temporaries,
    left the lock behind (the caller did not hold it yet)."""
    from dinokit.engine import run_dir

    def stopped(folder, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_dir, "remove_stale_temporaries", stopped)
    with pytest.raises(KeyboardInterrupt):
        with run_dir.open_run_dir(tmp_path / "run", resume=True):
            pass
    assert not (tmp_path / "run" / ".dinokit.lock").exists()


def test_a_folder_made_read_only_meanwhile_says_the_error_that_stopped_the_work(tmp_path, monkeypatch):
    """Removing the lock (or a temporary file) in a folder made read-only during the run failed too, and its
    'Permission denied: .dinokit.lock' replaced the error that had stopped the work."""
    import errno

    from dinokit.engine.run_dir import main_process_lock
    from dinokit.files import atomic_write

    lock, target = tmp_path / ".dinokit.lock", tmp_path / "out.npz"
    real = Path.unlink

    def read_only(self, *args, **kwargs):
        if self.parent == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    with pytest.raises(DinokitError, match="the snapshot could not be written"):
        with main_process_lock(lock, target):
            monkeypatch.setattr(Path, "unlink", read_only)
            raise DinokitError("the snapshot could not be written")
    with pytest.raises(ValueError, match="the work failed"):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("the work failed")
    assert lock.exists()  # left behind: the next command of this host takes it over once this process is gone
