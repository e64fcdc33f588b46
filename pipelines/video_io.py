"""Video and report files: mp4 (OpenCV), PNG frame grid, atomic text/JSON writes.

Every writer goes to a temporary file in the target folder and ``os.replace``s it into place,
so an interrupted run (Ctrl-C) never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager

import numpy as np

__all__ = ["to_uint8", "write_mp4", "read_mp4", "frame_grid", "write_png_grid", "atomic_write_text",
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


def write_mp4(frames, path: str, fps: int = 8) -> None:
    """Write ``frames`` (float ``[F, H, W, C]`` in [0, 1], RGB) as an mp4 (OpenCV ``mp4v``), atomically."""
    import cv2

    a = to_uint8(frames)
    if not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    F, H, W, _ = a.shape
    with atomic_path(path) as tmp:
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (W, H))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot open an mp4 writer for {path}")
        try:
            for f in a:
                writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()


def read_mp4(path: str) -> np.ndarray:
    """Decode an mp4 with OpenCV -> uint8 RGB ``[F, H, W, 3]``."""
    import cv2

    cap = cv2.VideoCapture(path)
    frames = []
    try:
        while True:
            ok, f = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if not frames:
        raise ValueError(f"no frames decoded from {path}")
    return np.stack(frames)


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
