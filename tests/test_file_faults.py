"""File-system faults at the writing helpers: a full disk behind a library's own error, long legal names, links that
loop, the mode of an output, a lock taken on a full disk (found by a file-system audit)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
import torch

from dinokit.cli import main
from dinokit.engine.run_dir import main_process_lock, output_lock_file
from dinokit.errors import DinokitError
from dinokit.files import atomic_write, take_lock


def _full(monkeypatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024"),
                                     OSError("3072 requested and 992 written"),  # numpy's tofile: no errno
                                     ValueError("I/O error: No space left on device (os error 28)")])
def test_a_full_disk_behind_a_writers_own_error_is_one_line_and_keeps_the_earlier_file(tmp_path, monkeypatch,
                                                                                    failure):
    target = tmp_path / "out.pth"
    target.write_text("earlier")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise failure

    with pytest.raises(type(failure)):  # room on the disk: the writer's own error, as it was
        with atomic_write(target) as tmp:
            write(tmp)
    _full(monkeypatch)
    with pytest.raises(DinokitError) as caught:
        with atomic_write(target) as tmp:
            write(tmp)
    assert str(caught.value).startswith("no space left on ") and str(caught.value).endswith(
        f"while writing {target}; the partial file was removed and the previous file is intact: free some space (or "
        "use another disk) and rerun")
    assert target.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["out.pth"]
    # a partial file that could not be removed (a folder made read-only meanwhile) is not said to be removed
    import dinokit.files

    monkeypatch.setattr(dinokit.files, "release", lambda path: None)
    with pytest.raises(DinokitError, match=r"; the partial file .*\.out\.pth\.tmp-\d+ could not be removed and the "
                                           "previous file is intact"):
        with atomic_write(target) as tmp:
            write(tmp)


def test_a_nearly_full_disk_does_not_turn_other_errors_into_no_space(tmp_path, monkeypatch):
    """Any error inside the write (a KeyError, a ValueError of its own, an inner write's one line) came out as 'no
    space left' on a disk with under a megabyte free; an inner line raised 'from None' was named after the outer
    file by the errno of what it had handled."""
    _full(monkeypatch)
    for failure in (KeyError("x"), ValueError("bad value"), DinokitError("permission denied while writing inner")):
        with pytest.raises(type(failure)) as caught:
            with atomic_write(tmp_path / "out.bin") as tmp:
                tmp.write_bytes(b"x")
                raise failure
        assert str(caught.value) == str(failure)
    monkeypatch.undo()

    def inner_line():
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError:
            raise RuntimeError("the inner file's own failure") from None

    with pytest.raises(RuntimeError, match="the inner file's own failure"):
        with atomic_write(tmp_path / "outer.bin"):
            inner_line()


def test_a_full_disk_in_torch_save_is_one_line(tmp_path, monkeypatch):
    _full(monkeypatch)

    def no_room(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 918")

    monkeypatch.setattr(torch, "save", no_room)
    with pytest.raises(DinokitError, match="^no space left on .* while writing .*w.pth; the partial file was removed"):
        with atomic_write(tmp_path / "w.pth") as tmp:
            torch.save({}, tmp)


def test_an_output_gets_the_mode_of_the_file_it_replaces_or_the_folders_default(tmp_path):
    """safetensors writes its files 0600: weights that other users of a shared machine could not read."""
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"x")
            os.chmod(tmp, 0o600)
        assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o644
        (tmp_path / "shared.bin").write_bytes(b"old")
        os.chmod(tmp_path / "shared.bin", 0o664)
        with atomic_write(tmp_path / "shared.bin") as tmp:
            tmp.write_bytes(b"new")
            os.chmod(tmp, 0o600)
        assert stat.S_IMODE((tmp_path / "shared.bin").stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_long_legal_names_are_written_and_locked(tmp_path):
    """A 250-byte name is legal; its hidden temporary (.NAME.tmp-PID) and lock (.NAME.lock.PID.new) were not."""
    target = tmp_path / ("n" * 246 + ".npz")
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    lock = output_lock_file(target)
    assert len(lock.name) <= 255 and lock.name.startswith(".nnn") and lock.name.endswith(".lock")
    with main_process_lock(lock, target):
        assert lock.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_lock_taken_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    real = Path.write_text

    def no_room(self, *args, **kwargs):
        if self.name.endswith(".new"):
            self.touch()  # the file is made, its bytes are not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", no_room)
    with pytest.raises(DinokitError) as caught:
        take_lock(tmp_path / ".dinokit.lock", tmp_path, "--output-dir")
    assert str(caught.value).startswith("no space left on ") and str(caught.value).endswith(
        f"while taking the lock {tmp_path / '.dinokit.lock'} for --output-dir {str(tmp_path)!r}; nothing was written: "
        "free some space or give another path")
    assert list(tmp_path.iterdir()) == []  # no .dinokit.lock.PID.new left for ever


def test_convert_removes_a_killed_conversions_temporaries(tmp_path, capsys):
    from dinokit import create_model
    from dinokit.models.checkpoint import save_backbone

    src = tmp_path / "s.pth"
    save_backbone(create_model("dinov2_vits14", embed_dim=32, depth=1, num_heads=2), str(src))
    dead = 2**22 + 12345  # above the pid range
    (tmp_path / f".o.safetensors.tmp-{dead}").write_text("junk")
    (tmp_path / ".o.safetensors.lock").write_text(f"{socket.gethostname()} {dead}")
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--to", "safetensors"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors", "s.pth"]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / f".model.safetensors.tmp-{dead}").write_text("junk")
    assert main(["convert", str(src), str(hf), "--to", "hf"]) == 0
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    assert stat.S_IMODE((hf / "model.safetensors").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_pipe_named_like_an_image_is_one_line_not_a_wait_for_ever(tmp_path):
    from dinokit.data.listing import resolve_image_inputs

    fifo = tmp_path / "ff.png"
    os.mkfifo(fifo)
    with pytest.raises(DinokitError, match=r"^'.*ff.png' is not a regular file \(a pipe, socket or device\); give an "
                                           r"image file$"):
        resolve_image_inputs(fifo)


def test_a_folder_that_cannot_be_read_is_named_not_passed_over_in_silence(tmp_path, monkeypatch):
    from PIL import Image

    from dinokit.data.listing import find_image_names

    for folder in ("a", "a/secret", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "x.png")
    real = os.scandir

    def denied(path):
        if os.path.basename(os.fspath(path)) in ("secret", "locked"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.warns(UserWarning, match=r"^skipping the folder .*secret \(it cannot be read: Permission denied\): its "
                                         r"images are left out; check its permissions$"):
        names = find_image_names(tmp_path)
    assert [os.path.relpath(n, tmp_path) for n in names] == ["a/x.png", "b/x.png"]
    (tmp_path / "locked").mkdir()
    with pytest.raises(DinokitError, match=r"^cannot read the folder '.*locked' \(permission denied\); check its "
                                           r"permissions$"):
        find_image_names(tmp_path / "locked")


def test_a_plot_on_a_full_disk_keeps_the_earlier_picture_and_a_finished_run_still_succeeds(tmp_path, monkeypatch,
                                                                                         capsys):
    pytest.importorskip("matplotlib")
    import json

    from matplotlib.figure import Figure

    from dinokit.cli.train import write_plot
    from dinokit.plot import plot_run

    (tmp_path / "training_metrics.json").write_text(json.dumps({"iteration": 9, "total_loss": 5.0}) + "\n")
    earlier = tmp_path / "training_metrics.png"
    earlier.write_bytes(b"an earlier picture")

    def no_room(fig, f, *args, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", no_room)
    with pytest.raises(DinokitError, match="^no space left on .* while writing .*training_metrics.png; the partial"):
        plot_run(tmp_path)
    assert earlier.read_bytes() == b"an earlier picture"  # it was cut short, in place
    write_plot(tmp_path)  # after a finished training: a warning, not a failed command
    assert capsys.readouterr().out.startswith("warning: the plot of the run was not written: no space left on ")


def test_a_metrics_line_that_cannot_be_appended_is_one_line(tmp_path):
    from dinokit.engine.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path / "gone" / "training_metrics.json", bar=False)
    with pytest.raises(DinokitError, match=r"^no such file or directory while appending to .*training_metrics.json: "
                                           r"free some space \(or use another disk\) and rerun the same command"):
        logger.write({"iteration": 0, "total_loss": 1.0})
    logger.close()


def test_curate_keeps_names_with_line_separators_and_refuses_a_line_feed_in_one_line(tmp_path, capsys):
    """A name holding U+2028 or a carriage return (legal on Linux) was split in two by str.splitlines: the work
    folder then failed for ever with lines that did not name the cause."""
    from dinokit.curate.embed import EmbeddingStore
    from dinokit.curate.synthetic import write_copy_pairs

    pool = tmp_path / "pool"
    write_copy_pairs(pool, n_images=4, copies=1)
    odd = [pool / "x\u2028y.png", pool / "c\rr.png", pool / "f\x0cf.png"]
    for path in odd:
        shutil.copy(pool / "scene_0000.png", path)
    argv = ["curate", "run", "--pool", str(pool), "--output-dir", str(tmp_path / "work"), "--target-size", "4",
            "--config-file", "demo", "--weights", "random", "--device", "cpu", "--no-progress", "embed.num_workers=0",
            "embed.image_size=28", "cluster.n_clusters=[3,2]"]
    assert main(argv) == 0
    assert set(map(str, odd)) <= set(EmbeddingStore(tmp_path / "work" / "embed" / "pool").paths)
    capsys.readouterr()
    assert main(argv) == 0  # reused as it is
    assert "[embed] finished earlier with these settings" in capsys.readouterr().out
    shutil.copy(pool / "scene_0000.png", pool / "line\nfeed.png")
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: the image name {str(pool / ('line' + chr(10) + 'feed.png'))!r} (the "
                                       "pool) holds a line break, which curate's lists of one name per line cannot "
                                       "hold; rename the file\n")


def test_data_shard_on_a_full_disk_says_to_delete_the_unfinished_folder(tmp_path, monkeypatch, capsys):
    """It said 'free some space and rerun', and the rerun refused the unfinished folder."""
    import tarfile

    from PIL import Image

    (tmp_path / "src").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / "src" / f"{i}.png")
    out = tmp_path / "shards"
    real = tarfile.TarFile.addfile
    calls = []

    def no_room(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", no_room)
    assert main(["data", "shard", str(tmp_path / "src"), "--out", str(out), "--shard-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on ") and err.endswith(
        f"free some space (or use another disk) and rerun, after deleting {out} (its shards so far are those of an "
        "unfinished run, which the rerun refuses)\n")
    monkeypatch.undo()
    shutil.rmtree(out)
    assert main(["data", "shard", str(tmp_path / "src"), "--out", str(out), "--shard-size", "2"]) == 0


def test_the_next_command_after_a_run_is_quoted_for_a_shell(tmp_path):
    """A run folder with a space gave a 'next:' command that did not work when pasted."""
    import shlex

    from dinokit.cli.train import end_summary

    out = tmp_path / "my runs" / "-r"
    snap = out / "eval" / "training_2" / "teacher_checkpoint.pth"
    lines = end_summary({"output_dir": str(out), "iteration": 3, "last_exports": {"": str(snap)}}, 1.0).splitlines()
    assert shlex.split(lines[-1]) == ["next:", "dinokit", "embed", "IMAGES", "--config-file", str(out / "config.yaml"),
                                      "--weights", str(snap), "--out", "emb.npz"]


def test_a_lock_another_user_cannot_read_is_not_taken_over(tmp_path, monkeypatch):
    """A live run's lock made under umask 077 was read as a killed run's by another user: renamed aside (and not put
    back: another user's file), and the second run wrote into the same folder."""
    lock = tmp_path / ".dinokit.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")
    real = Path.read_bytes

    def denied(self):
        if self == lock:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DinokitError, match=r"^the lock .*\.dinokit\.lock cannot be read \(permission denied\): "
                                           r"another user's run may be writing there; wait for it to end"):
        take_lock(lock, tmp_path, "--output-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dinokit.lock"]


def test_names_that_are_not_utf8_survive_shards_and_the_curate_report(tmp_path, capsys):
    """A class folder named in Latin-1 bytes: data shard wrote classes.txt in the locale's encoding, the reader read
    it strictly (a traceback); curate's report.html was a traceback after the sample stage."""
    from PIL import Image

    from dinokit.data import make_dataset

    latin = tmp_path / os.fsdecode(b"src_\xe9")
    for name in (os.fsdecode(b"cls_\xe9"), "cls_b"):
        (latin / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (i * 90, 40, 0)).save(latin / name / f"{i}.png")
    assert main(["data", "shard", str(latin), "--out", str(tmp_path / "sh")]) == 0
    shards = make_dataset(f"WebDataset:urls={tmp_path / 'sh'}/000000.tar", labelled=True)
    assert sorted(shards.classes) == sorted([os.fsdecode(b"cls_\xe9"), "cls_b"])
    assert main(["curate", "run", "--pool", str(latin), "--output-dir", str(tmp_path / "w"), "--target-size", "2",
                 "--config-file", "demo", "--weights", "random", "--device", "cpu", "--no-progress",
                 "embed.num_workers=0", "embed.image_size=28", "cluster.n_clusters=[2]"]) == 0
    assert (tmp_path / "w" / "report.html").read_bytes().startswith(b"<html>")


def test_plot_reads_a_config_whatever_its_bytes(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from dinokit.plot import plot_run

    (tmp_path / "training_metrics.json").write_text(json.dumps({"iteration": 9, "total_loss": 5.0}) + "\n")
    (tmp_path / "config.yaml").write_bytes(b"train:\n  dataset_path: ImageFolder:root=/data_\xe9\ndino:\n"
                                           b"  head_n_prototypes: 256\n")
    assert plot_run(tmp_path).is_file()


def test_curate_names_read_back_under_an_ascii_locale_are_names_the_file_system_opens(tmp_path):
    """paths.txt was read as UTF-8 whatever the locale: under LC_ALL=C (no UTF-8 mode) the names came back as
    'é', which an ASCII file system encoding cannot encode (a traceback at the sample stage)."""
    import subprocess
    import sys

    (tmp_path / "café.png").write_bytes(b"x")
    (tmp_path / "paths.txt").write_bytes(os.fsencode(str(tmp_path / "café.png")) + b"\n")
    code = ("import os, sys; from pathlib import Path; from dinokit.curate.embed import read_paths\n"
            "(name,) = read_paths(Path(sys.argv[1]) / 'paths.txt'); print(os.path.isfile(name))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-c", code, os.fsencode(str(tmp_path))], env=env, capture_output=True)
    assert done.stdout == b"True\n", done.stderr.decode(errors="replace")


def test_a_setting_with_a_name_that_is_not_utf8_is_one_line_not_a_traceback(tmp_path):
    from omegaconf import OmegaConf

    from dinokit.config import write_config

    cfg = OmegaConf.create({"train": {"dataset_path": "ImageFolder:root=/data/" + os.fsdecode(b"lat_\xe9")}})
    with pytest.raises(DinokitError) as caught:
        write_config(cfg, tmp_path)
    assert str(caught.value) == ("train.dataset_path holds a file name that is not UTF-8 (ImageFolder:root=/data/"
                                 "lat_\\udce9), which config.yaml cannot hold; rename it to UTF-8 (e.g. with convmv) "
                                 "or give a path without it")
    assert list(tmp_path.iterdir()) == []
