"""Lists of image paths (FileList, .txt inputs): Windows editors, encodings, and the names curate's manifest
holds."""

from __future__ import annotations

import os
import warnings

import pytest

from dinokit.data import make_dataset, resolve_image_inputs
from dinokit.errors import DinokitError

from test_datasets import folder  # noqa: F401  (a fixture)


def test_file_lists_from_a_windows_editor_and_not_utf8(folder, tmp_path):
    listing = tmp_path / "list.txt"
    for text, kind in (("images/cat/0.png,0\r\nimages/dog/0.png,1\r\n", "FileList:path="), ("images/cat/0.png\r\n", "")):
        listing.write_bytes(b"\xef\xbb\xbf" + text.encode())  # a byte-order mark and CRLF line ends
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no file may look missing
            paths = make_dataset(f"{kind}{listing}").paths if kind else resolve_image_inputs(listing)
        assert paths[0] == folder / "cat" / "0.png"
    listing.write_bytes(b"images/cat/0.png\n\xff\xfe\n")
    for read in (lambda: make_dataset(f"FileList:path={listing}"), lambda: resolve_image_inputs(listing)):
        with pytest.raises(DinokitError, match=rf"^'{listing}' is not UTF-8 text \(byte 17: invalid start byte\); save it"):
            read()


def test_a_list_of_the_names_curate_writes_reads_back_every_file(tmp_path):
    """curate's manifest.txt lists each name's bytes on a line: a Latin-1 name refused the whole list ("not UTF-8
    text"), and a name with a carriage return was split in two and left out as missing."""
    from PIL import Image

    names = [os.fsdecode(b"caf\xe9.png"), "a\rb.png", "\u00e9t\u00e9 \u00fc.png", "x\u2028y.png"]
    for name in names:
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    listing = tmp_path / "manifest.txt"
    listing.write_bytes(b"".join(os.fsencode(tmp_path / name) + b"\n" for name in names))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no file may look missing
        assert make_dataset(f"FileList:path={listing}").paths == [tmp_path / name for name in names]
        assert list(resolve_image_inputs(listing)) == [tmp_path / name for name in names]
    # a label after a Latin-1 name; a Latin-1 name of no file is the editor's encoding: one line asking for UTF-8
    listing.write_bytes(b"caf\xe9.png,1\n")
    assert make_dataset(f"FileList:path={listing}").targets == [1]
    listing.write_bytes(b"a.png\nn\xe9e.png\n")
    with pytest.raises(DinokitError, match=rf"^'{listing}' is not UTF-8 text \(byte 7: invalid continuation byte\)"):
        make_dataset(f"FileList:path={listing}")
    # one of curate's Latin-1 names deleted since: left out with the missing files' warning, not the whole list
    listing.write_bytes(b"gone_\xe9.png\n" + os.fsencode(tmp_path / names[0]) + b"\n")
    with pytest.warns(UserWarning, match="1 of the 2 files listed in .* do not exist and are left out"):
        assert make_dataset(f"FileList:path={listing}").paths == [tmp_path / names[0]]
    # under an ASCII locale a UTF-8 name is the file system's bytes too (it was decoded as UTF-8: left out)
    import subprocess
    import sys

    listing.write_bytes(b"".join(os.fsencode(tmp_path / name) + b"\n" for name in names))
    code = ("import sys, warnings; warnings.simplefilter('error'); from dinokit.data import make_dataset\n"
            "print(all(p.is_file() for p in make_dataset('FileList:path=' + sys.argv[1]).paths))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", code, os.fsencode(listing)], env=env, capture_output=True)
    assert done.stdout == b"True\n", done.stderr.decode(errors="replace")
    # old Mac line ends (carriage returns only), as Excel for Mac's CSV writes them
    listing.write_bytes(f"{names[2]},0\r{names[3]},1\r".encode())
    assert make_dataset(f"FileList:path={listing}", labelled=True).targets == [0, 1]
