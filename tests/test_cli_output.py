"""Standard output that cannot be written: a reader that went away (``| head``) ends the command silently with exit
status 141, as a shell reports SIGPIPE; a failing file (``> /dev/full``) is one line on standard error, exit status 2.
Both were a traceback (or Python's exit status 120 at its last flush)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _dinokit(*args: str, stdout) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinokit", *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=120)


def test_a_reader_that_went_away_ends_the_command_silently_with_status_141():
    read_end, write_end = os.pipe()
    os.close(read_end)  # as 'dinokit models | head -c 1' once head has exited
    try:
        done = _dinokit("models", stdout=write_end)
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert done.stderr == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [("models",), ("--help",)], ids=["table", "help"])
def test_a_full_output_file_is_one_line_with_status_2(args):
    with open("/dev/full", "w") as full:
        done = _dinokit(*args, stdout=full)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: standard output could not be written: No space left on device (free space where it goes, or send it "
        "elsewhere)"]


def test_an_output_that_works_is_unchanged(tmp_path):
    with open(tmp_path / "out.txt", "w") as out:
        done = _dinokit("models", stdout=out)
    assert done.returncode == 0 and done.stderr == ""
    assert (tmp_path / "out.txt").read_text().startswith("name ")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir() or not Path("/dev/full").exists(), reason="Linux only")
def test_main_used_as_a_library_leaves_the_callers_output_as_it_was(tmp_path):
    """After a failed output, main() had pointed descriptor 1 at /dev/null for good: the caller's later prints were
    lost."""
    code = ("import os, sys\nfrom dinokit.cli import main\n"
            "callers, sys.stdout = sys.stdout, open('/dev/full', 'w')\ncode = main(['models'])\n"
            "print('after', code, os.readlink(f'/proc/self/fd/{sys.stdout.fileno()}'), file=callers)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout == "after 2 /dev/full\n", done.stderr
