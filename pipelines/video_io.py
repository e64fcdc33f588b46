"""Video and report files: browser-playable video (OpenCV), PNG frame grid, atomic text/JSON writes.

Videos: :func:`write_video` writes the container its path names: ``.mp4`` as H.264 (``avc1``)
when this OpenCV build can encode it (else MPEG-4 Part 2 ``mp4v``, which browsers do not play),
``.webm`` as VP8. :func:`browser_video_ext` says which extension gives a browser-playable file
with the installed OpenCV (``".mp4"`` with H.264, else ``".webm"``; pip's ``opencv-python``
wheels ship no H.264 encoder, so there it is WebM).

Every writer goes to a temporary file in the target folder and ``os.replace``s it into place,
so an interrupted run (Ctrl-C) never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Iterator

import numpy as np

__all__ = ["to_uint8", "write_video", "write_mp4", "read_mp4", "read_video", "iter_video_frames", "browser_video_ext", "video_codec", "frame_grid", "write_png_grid", "atomic_write_text",
           "atomic_write_json", "atomic_path"]


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path (same folder, same extension) and move it to ``path`` on success;
    the temporary file is removed on any error or KeyboardInterrupt."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    ext = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ext, dir=d)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


def atomic_write_json(path: str, obj, allow_nan: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (``allow_nan=False``: strict JSON,
    ``ValueError`` on NaN/inf, checked before anything is written)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=allow_nan) + "\n")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def to_uint8(frames) -> np.ndarray:
    """float frames ``[F, H, W, C]`` (C = 1 or 3) in [0, 1] (numpy or torch) -> uint8 RGB
    ``[F, H, W, 3]``. Raises ``ValueError`` on a wrong shape."""
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    a = np.asarray(frames)
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be [F, H, W, C] with C in (1, 3), got shape {a.shape}")
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a


@contextmanager
def _quiet_native_stderr():
    """Silence OpenCV/FFmpeg's native stderr messages (codec probing prints warnings at fd 2)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


_FOURCCS = {".mp4": ("avc1", "mp4v"), ".webm": ("VP80",)}
_CODEC_CACHE = {}


def _open_writer(path: str, fps: float, size):
    """An opened ``cv2.VideoWriter`` for ``path`` (codec by extension, best first) and its fourcc."""
    import cv2

    ext = os.path.splitext(path)[1].lower()
    if ext not in _FOURCCS:
        raise ValueError(f"video path must end in .mp4 or .webm, got {path!r}")
    for fourcc in _FOURCCS[ext]:
        if _CODEC_CACHE.get((ext, fourcc)) is False:
            continue
        with _quiet_native_stderr():
            w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), float(fps), size)
        ok = w.isOpened()
        _CODEC_CACHE[(ext, fourcc)] = ok
        if ok:
            return w, fourcc
        w.release()
    raise RuntimeError(f"OpenCV cannot open a {ext} video writer for {path} (tried {', '.join(_FOURCCS[ext])})")


def video_codec(ext: str) -> str:
    """The fourcc :func:`write_video` uses for extension ``ext`` (``".mp4"``/``".webm"``) with the
    installed OpenCV (probed once with a 16x16 test file), or ``""`` when none works."""
    ext = ext.lower()
    key = ("probe", ext)
    if key not in _CODEC_CACHE:
        d = tempfile.mkdtemp(prefix=".vidattn-codec-")
        try:
            w, fourcc = _open_writer(os.path.join(d, "probe" + ext), 8.0, (16, 16))
            w.release()
        except (RuntimeError, ValueError):
            fourcc = ""
        finally:
            import shutil

            shutil.rmtree(d, ignore_errors=True)
        _CODEC_CACHE[key] = fourcc
    return _CODEC_CACHE[key]


def browser_video_ext() -> str:
    """``".mp4"`` when OpenCV encodes H.264 here, else ``".webm"`` (VP8): both play in browsers."""
    return ".mp4" if video_codec(".mp4") == "avc1" else ".webm"


def write_video(frames, path: str, fps: int = 8) -> str:
    """Write ``frames`` (float ``[F, H, W, C]`` in [0, 1], RGB, or uint8) as the video ``path``
    names (``.mp4``: H.264, else mp4v; ``.webm``: VP8), atomically. Returns the fourcc used.
    Raises ``ValueError`` on a bad shape, fps or extension."""
    import cv2

    a = to_uint8(frames)
    if not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    F, H, W, _ = a.shape
    with atomic_path(path) as tmp:
        writer, fourcc = _open_writer(tmp, fps, (W, H))
        try:
            for f in a:
                writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        if not os.path.getsize(tmp):
            raise OSError(f"the video writer wrote nothing to {path} (disk full?)")
    return fourcc


def write_mp4(frames, path: str, fps: int = 8) -> None:
    """:func:`write_video` for an ``.mp4`` path (H.264 where OpenCV has it, else ``mp4v``)."""
    write_video(frames, path, fps=fps)


def iter_video_frames(path: str) -> Iterator[np.ndarray]:
    """Decode a video (mp4 or webm) with OpenCV, one uint8 RGB frame ``[H, W, 3]`` at a time (the
    capture is released when the frames run out or the iterator is closed)."""
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        while True:
            ok, f = cap.read()
            if not ok:
                break
            yield cv2.cvtColor(f, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def read_video(path: str) -> np.ndarray:
    """Decode a video (mp4 or webm) with OpenCV -> uint8 RGB ``[F, H, W, 3]``."""
    frames = list(iter_video_frames(path))
    if not frames:
        raise ValueError(f"no frames decoded from {path}")
    return np.stack(frames)


read_mp4 = read_video  # the older name


def frame_grid(frames, cols: int = 0) -> np.ndarray:
    """Tile frames ``[F, H, W, C]`` into one uint8 RGB image ``[rows*H, cols*W, 3]`` (row-major,
    empty cells black). ``cols=0``: ``ceil(sqrt(F))``."""
    a = to_uint8(frames)
    F, H, W, _ = a.shape
    cols = int(cols) if cols else int(np.ceil(np.sqrt(F)))
    rows = -(-F // cols)
    out = np.zeros((rows * H, cols * W, 3), dtype=np.uint8)
    for i, f in enumerate(a):
        r, c = divmod(i, cols)
        out[r * H:(r + 1) * H, c * W:(c + 1) * W] = f
    return out


def write_png_grid(frames, path: str, cols: int = 0) -> None:
    """Write :func:`frame_grid` of ``frames`` as a PNG, atomically."""
    import cv2

    img = frame_grid(frames, cols)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(tmp, cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
            raise RuntimeError(f"OpenCV could not write {path}")
