"""Video in and out: frames from a video file or a folder of frames; animated GIF (Pillow) or MP4 (PyAV).

Animated GIFs are decoded by Pillow; other video files (.mp4, .mov, ...) by PyAV, an optional extra
(``pip install 'dinokit[video]'``). A folder of frames, taken in file-name order, always works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageSequence

from ..data.images import as_seen, load_image
from ..data.listing import find_images
from ..errors import DinokitError
from ..files import atomic_write

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".gif")
ANIMATION_FORMATS = ("gif", "mp4")
_NEEDS_PYAV = "needs PyAV: pip install 'dinokit[video]' (or use a folder of frames / a .gif)"


def is_video_file(path: str | Path) -> bool:
    """A file with a video extension; a .gif only when it has several frames (else it is an image)."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_EXTENSIONS or not path.is_file():
        return False
    if path.suffix.lower() != ".gif":
        return True
    try:
        with Image.open(path) as gif:
            return getattr(gif, "n_frames", 1) > 1
    except OSError:
        return True  # unreadable: reported as a video that cannot be read


def require_pyav(what: str):
    """The ``av`` module, or a one-line error: ``what`` (e.g. "writing MP4") needs PyAV and how to get it.

    ``dinokit viz pca --format mp4`` calls this with its option checks, before the backbone runs."""
    try:
        import av
    except ImportError:
        raise DinokitError(f"{what} {_NEEDS_PYAV}") from None
    return av


def _decode_with_pyav(path: Path) -> list[Image.Image]:
    av = require_pyav(f"decoding {path.suffix} video")
    with av.open(str(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def read_frames(path: str | Path, *, step: int = 1, max_frames: int | None = None) -> list[Image.Image]:
    """Every ``step``-th frame (RGB) of a video file or of a folder of frame images, at most ``max_frames``."""
    path = Path(path)
    if not path.exists():
        raise DinokitError(f"video {str(path)!r} does not exist; give a video file or a folder of frames")
    if step < 1:
        raise DinokitError("--frame-step must be at least 1")
    if path.is_dir():
        files = find_images(path)[::step][:max_frames]
        if not files:
            raise DinokitError(f"no frame images found in {str(path)!r}")
        try:
            return [load_image(f) for f in files]
        except (OSError, ValueError) as err:
            raise DinokitError(f"cannot read a frame of {str(path)!r} ({err}); check the files") from None
    try:
        if path.suffix.lower() == ".gif":
            with Image.open(path) as gif:
                frames = [as_seen(f) for f in ImageSequence.Iterator(gif)]  # transparency as still images get it
        else:
            frames = [as_seen(f) for f in _decode_with_pyav(path)]
    except DinokitError:
        raise
    except Exception as err:  # decoders raise many types (OSError, av.error.InvalidDataError, ...)
        raise DinokitError(f"cannot read video {str(path)!r} ({type(err).__name__}: {err}); check the file") from None
    frames = frames[::step][:max_frames]
    if not frames:
        raise DinokitError(f"cannot read video {str(path)!r} (no frames decoded); check the file")
    return frames


def write_animation(frames: Sequence[np.ndarray], path: str | Path, *, fps: float = 10.0) -> Path:
    """Frames (H, W, 3) uint8 as an animated ``.gif`` (looping) or ``.mp4`` (H.264 through PyAV)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ANIMATION_FORMATS:
        raise DinokitError(f"cannot write {path.name!r}; use a .gif or .mp4 file")
    if fmt == "gif":
        images = [Image.fromarray(f) for f in frames]
        with atomic_write(path) as tmp:
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=round(1000 / fps), loop=0, optimize=False)
        return path
    av = require_pyav("writing MP4")
    h, w = frames[0].shape[:2]
    with atomic_write(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = w - w % 2, h - h % 2  # H.264 wants even sizes
        stream.pix_fmt = "yuv420p"
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: h - h % 2, : w - w % 2]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
