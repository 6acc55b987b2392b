"""File names and paths: long names beyond ASCII under any locale, and links that loop on an output's path."""

from __future__ import annotations

import os

import pytest

from dinokit.cli import main
from dinokit.engine.run_dir import check_writable
from dinokit.errors import DinokitError
from dinokit.files import atomic_write


def test_long_names_beyond_ascii_are_shortened_to_names_the_file_system_takes_under_any_locale(tmp_path):
    """Under LC_ALL=C (no UTF-8 mode) a shortened long name was decoded as UTF-8: 'é', which an ASCII file system
    encoding cannot encode (a traceback writing the temporary or the lock of viz's and embed's outputs)."""
    import subprocess
    import sys

    code = ("import os, sys; from pathlib import Path; from dinokit.files import atomic_write, fitting_name\n"
            "target = Path(os.fsdecode(sys.argv[1])) / os.fsdecode('\\u00e9'.encode() * 122 + b'.npz')\n"
            "with atomic_write(target) as tmp:\n    tmp.write_bytes(b'x')\n"
            "short = os.fsencode(fitting_name(target.name, 100))\n"
            "print(target.read_bytes(), len(short) <= 100, short.decode('utf-8')[:2] == '\\u00e9' * 2)")
    for locale in ({"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}, {"LC_ALL": "C.UTF-8"}):
        done = subprocess.run([sys.executable, "-c", code, os.fsencode(str(tmp_path))], env={**os.environ, **locale},
                              capture_output=True)
        assert done.stdout == b"b'x' True True\n", done.stderr.decode(errors="replace")


def test_a_picture_out_through_a_link_that_loops_is_one_line(tmp_path, capsys):
    """viz's --out LOOP/x.png was a traceback (RuntimeError: Symlink loop) in the check that it is not an input."""
    from PIL import Image

    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "img.png")
    assert main(["viz", "pca", str(tmp_path / "img.png"), "--out", str(tmp_path / "loopA" / "x.png"), "--config-file",
                 "demo", "--random-init"]) == 2
    assert capsys.readouterr().err == (f"error: {str(tmp_path / 'loopA' / 'x.png')!r} goes through a symbolic link "
                                       "that loops (it leads back to itself); remove it or give another path\n")
    # the same in train's run folder and viz match's picture (tracebacks: RuntimeError: Symlink loop)
    for argv, given in ((["train", "--output-dir", str(tmp_path / "loopA" / "run"), "--config-file", "demo",
                          f"train.dataset_path={tmp_path}"], tmp_path / "loopA" / "run"),
                        (["viz", "match", str(tmp_path / "img.png"), str(tmp_path / "img.png"), "--out",
                          str(tmp_path / "loopA" / "m.png"), "--config-file", "demo", "--random-init"],
                         tmp_path / "loopA" / "m.png")):
        assert main(argv) == 2
        assert capsys.readouterr().err == (f"error: {str(given)!r} goes through a symbolic link that loops (it leads "
                                           "back to itself); remove it or give another path\n")


def test_a_link_that_loops_is_one_line_before_any_work(tmp_path):
    loop = tmp_path / "loop.npz"
    loop.symlink_to(loop.name)
    expected = f"{str(loop)!r} is a symbolic link that loops (it leads back to itself); remove it or give another path"
    with pytest.raises(DinokitError) as caught:
        check_writable(loop, "--out", is_file=True)
    assert str(caught.value) == expected
    with pytest.raises(DinokitError) as caught:
        with atomic_write(loop):
            pass
    assert str(caught.value) == expected
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    with pytest.raises(DinokitError, match=r"^--out '.*folder.onnx' is a folder, not a file; give a file path$"):
        check_writable(folder, "--out", is_file=True)


def test_a_link_that_loops_is_found_where_path_resolve_returns_a_path(tmp_path, monkeypatch):
    """Python 3.13's Path.resolve returns a path through a loop without an error: the check relied on the error."""
    from pathlib import Path

    from dinokit.files import resolve_link

    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    (tmp_path / "ok").symlink_to(tmp_path / "target.npz")  # a link to a file still to be written
    monkeypatch.setattr(Path, "resolve", lambda self, strict=False: Path(os.path.abspath(self)))  # as Python 3.13
    with pytest.raises(DinokitError, match="goes through a symbolic link that loops"):
        resolve_link(tmp_path / "loopA" / "x.png")
    with pytest.raises(DinokitError, match="is a symbolic link that loops"):
        resolve_link(tmp_path / "loopA")
    assert resolve_link(tmp_path / "ok") == tmp_path / "ok"  # what the stand-in resolve gives: no error
