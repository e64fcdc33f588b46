"""Training clips for reference model v2: real photographs under camera motion, with moving objects.

Everything is drawn here from the photographs that scikit-image ships inside its package
(``skimage.data``; no download) plus the procedural shapes of :mod:`.data`:

* **camera motion**: a photograph larger than the frame is viewed through a moving camera, pan
  (constant velocity), zoom (exponential scale change), rotation, or still; the view is resampled
  per frame with one affine warp from a copy of the photograph pre-scaled to the view's pixel size
  (so the warp never minifies by more than ~1.6x, no aliasing);
* **objects**: 0-2 textured cut-outs (soft-edged ellipses/polygons filled with a crop of another
  photograph) moving on straight lines over the scene, drawn in z-order, so they occlude the
  background and each other;
* **shapes**: the procedural gradient-and-shapes clips of :mod:`.data` (reference v1's training data).

Each clip comes with its prompt, two words ``"<scene> <motion>"`` (e.g. ``"astronaut zoom"``):
:data:`SCENES` x :data:`MOTIONS`, the class conditioning of the v2 model. Motion is continuous
across frames, so the dense model must track content across frames (temporal attention) and model
texture (local attention) to denoise.
"""

from __future__ import annotations

import functools
import math
from typing import List, Tuple

import cv2
import numpy as np

__all__ = ["SCENES", "MOTIONS", "VOCAB", "make_clip", "make_batch", "photo", "tokenize", "available_scenes"]

# scene word -> skimage.data loader name (all ship inside the scikit-image package)
_PHOTOS = {
    "astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket",
    "galaxy": "hubble_deep_field", "retina": "retina", "cells": "immunohistochemistry",
    "motorcycle": "stereo_motorcycle", "cameraman": "camera", "coins": "coins", "moon": "moon",
    "bricks": "brick", "grass": "grass", "gravel": "gravel",
}
SCENES: Tuple[str, ...] = tuple(_PHOTOS) + ("shapes",)
MOTIONS: Tuple[str, ...] = ("pan", "zoom", "rotate", "still")
NULL = "<null>"
VOCAB: Tuple[str, ...] = (NULL,) + SCENES + MOTIONS
# grayscale photographs get a colour tint per clip, drawn from these
_GRAY = ("cameraman", "coins", "moon", "bricks", "grass", "gravel")
_TINTS = np.array([[1.0, 0.85, 0.6], [0.7, 0.85, 1.0], [0.85, 1.0, 0.75], [1.0, 1.0, 1.0], [1.0, 0.75, 0.85]],
                  np.float32)


@functools.lru_cache(maxsize=None)
def photo(scene: str) -> np.ndarray:
    """The photograph of ``scene`` (a :data:`SCENES` entry except ``"shapes"``): float32
    ``[H, W, 3]`` in [0, 1] (grayscale photographs replicated to 3 channels). Cached."""
    if scene not in _PHOTOS:
        raise ValueError(f"scene must be one of {tuple(_PHOTOS)}, got {scene!r}")
    import skimage.data

    img = getattr(skimage.data, _PHOTOS[scene])()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.float32)
    elif img.dtype != np.float32:
        img = img.astype(np.float32) / (255.0 if img.max() > 1 else 1.0)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


@functools.lru_cache(maxsize=None)
def available_scenes() -> Tuple[str, ...]:
    """The :data:`SCENES` whose photograph loads with the installed scikit-image (all of them with
    scikit-image >= 0.19; a scene whose file is missing is left out of random draws, never faked)."""
    ok = []
    for s in SCENES:
        try:
            if s != "shapes":
                photo(s)
            ok.append(s)
        except Exception:  # noqa: BLE001 - a photograph this scikit-image build does not ship
            pass
    return tuple(ok)


def tokenize(prompt) -> List[int]:
    """Prompt ``"<scene> <motion>"`` -> ``[scene id, motion id]`` in :data:`VOCAB`; unknown or missing
    words (an empty prompt: the unconditional branch of classifier-free guidance) map to ``<null>``
    (id 0). Words are matched case-insensitively; extra words are ignored."""
    words = str(prompt or "").lower().split()
    scene = next((w for w in words if w in SCENES), NULL)
    motion = next((w for w in words if w in MOTIONS), NULL)
    return [VOCAB.index(scene), VOCAB.index(motion)]


def _camera(rng, motion: str, frames: int):
    """Per-frame (dx, dy) view-centre offset in view pixels, log-scale and angle (radians)."""
    t = np.arange(frames, dtype=np.float64) - (frames - 1) / 2
    speed = rng.uniform(0.8, 3.0)  # view pixels per frame
    ang = rng.uniform(0, 2 * math.pi)
    dx = dy = np.zeros(frames)
    log_s = np.zeros(frames)
    theta = np.full(frames, rng.uniform(-0.3, 0.3))
    if motion == "pan":
        dx, dy = speed * math.cos(ang) * t, speed * math.sin(ang) * t
    elif motion == "zoom":
        rate = rng.uniform(0.015, 0.03) * rng.choice([-1.0, 1.0])  # per frame
        log_s = rate * t
        dx, dy = 0.3 * speed * math.cos(ang) * t, 0.3 * speed * math.sin(ang) * t
    elif motion == "rotate":
        theta = theta + rng.uniform(0.015, 0.04) * rng.choice([-1.0, 1.0]) * t
    return dx, dy, log_s, theta


def _view(img: np.ndarray, rng, motion: str, frames: int, height: int, width: int) -> np.ndarray:
    """Frames ``[F, height, width, 3]`` of ``img`` seen through a moving camera."""
    ph, pw = img.shape[:2]
    side = max(height, width)
    view = rng.uniform(0.3, 0.75) * min(ph, pw)  # photo pixels covered by the frame's long side
    f = side / view
    small = cv2.resize(img, (max(side + 2, int(round(pw * f))), max(side + 2, int(round(ph * f)))),
                       interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    dx, dy, log_s, theta = _camera(rng, motion, frames)
    travel = np.abs(dx).max() + np.abs(dy).max() + side * (math.exp(np.abs(log_s).max()) - 1) * 0.7 + side * 0.75
    cx = rng.uniform(min(travel, sw / 2), max(sw - travel, sw / 2))
    cy = rng.uniform(min(travel, sh / 2), max(sh - travel, sh / 2))
    out = np.empty((frames, height, width, 3), np.float32)
    for i in range(frames):
        s = math.exp(log_s[i])
        c, si = math.cos(theta[i]) / s, math.sin(theta[i]) / s
        # output pixel p -> source point  centre_i + R(theta) (p - centre_out) / s
        ox, oy = (width - 1) / 2, (height - 1) / 2
        tx, ty = cx + dx[i], cy + dy[i]
        M = np.array([[c, -si, tx - c * ox + si * oy], [si, c, ty - si * ox - c * oy]], np.float32)
        out[i] = cv2.warpAffine(small, M, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REFLECT101)
    return out


def _objects(rng, clip: np.ndarray, scene: str) -> None:
    """Draw 0-2 textured cut-outs moving over ``clip`` (in place, z-ordered, soft edges)."""
    frames, height, width = clip.shape[:3]
    n = int(rng.choice([0, 1, 1, 2]))
    others = [s for s in available_scenes() if s not in (scene, "shapes")]
    for _ in range(n):
        tex_img = photo(str(rng.choice(others)))
        r = rng.uniform(0.12, 0.24) * min(height, width)
        size = int(math.ceil(2 * r)) + 2
        th, tw = tex_img.shape[:2]
        scale = rng.uniform(0.2, 0.5) * min(th, tw) / size
        y0 = int(rng.integers(0, max(1, th - int(size * scale))))
        x0 = int(rng.integers(0, max(1, tw - int(size * scale))))
        tex = cv2.resize(tex_img[y0:y0 + int(size * scale) + 1, x0:x0 + int(size * scale) + 1], (size, size),
                         interpolation=cv2.INTER_AREA)
        ss = 4  # supersampled mask for anti-aliased edges
        mask = np.zeros((size * ss, size * ss), np.float32)
        ctr = (size * ss // 2, size * ss // 2)
        if rng.random() < 0.5:
            axes = (int(r * ss), int(r * ss * rng.uniform(0.6, 1.0)))
            cv2.ellipse(mask, ctr, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        else:
            k = int(rng.integers(3, 7))
            a0 = rng.uniform(0, 2 * math.pi)
            pts = [(ctr[0] + r * ss * math.cos(a0 + 2 * math.pi * j / k), ctr[1] + r * ss * math.sin(a0 + 2 * math.pi * j / k))
                   for j in range(k)]
            cv2.fillPoly(mask, [np.round(np.array(pts)).astype(np.int32)], 1.0)
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
        pos = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        speed = rng.uniform(0.8, 3.0)
        ang = rng.uniform(0, 2 * math.pi)
        vel = speed * np.array([math.cos(ang), math.sin(ang)])
        for i in range(frames):
            x, y = pos + vel * (i - (frames - 1) / 2)
            # paste with sub-pixel placement: warp the sprite into frame coordinates
            M = np.array([[1, 0, x - size / 2], [0, 1, y - size / 2]], np.float32)
            a = cv2.warpAffine(mask, M, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            t = cv2.warpAffine(tex, M, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            clip[i] = clip[i] * (1 - a[..., None]) + t * a[..., None]


def make_clip(rng: np.random.Generator, frames: int = 16, height: int = 96, width: int = 96,
              scene: str = None, motion: str = None) -> Tuple[np.ndarray, str]:
    """One random training clip and its prompt.

    Args:
        rng: numpy Generator (the only source of randomness).
        frames, height, width: clip size (>= 1, >= 8, >= 8).
        scene, motion: fix the scene (:data:`SCENES`) / motion (:data:`MOTIONS`); None draws them
            (the ``"shapes"`` scene is always ``"still"``: its objects move, its camera does not).
    Returns:
        ``(clip, prompt)``: float32 ``[frames, height, width, 3]`` in [0, 1] and ``"<scene> <motion>"``.
    """
    if frames < 1 or height < 8 or width < 8:
        raise ValueError(f"frames/height/width must be >= 1/8/8, got {frames}/{height}/{width}")
    scene = str(rng.choice(available_scenes())) if scene is None else scene
    motion = str(rng.choice(MOTIONS)) if motion is None else motion
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {SCENES}, got {scene!r}")
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    if scene == "shapes":  # objects move, the camera does not: the prompt says so
        from .data import make_clip as shapes_clip

        motion = "still"
        clip = shapes_clip(rng, frames, height, width, supersample=2)
    else:
        img = photo(scene)
        if scene in _GRAY:
            img = img * _TINTS[int(rng.integers(len(_TINTS)))]
        clip = _view(img, rng, motion, frames, height, width)
    _objects(rng, clip, scene)
    return np.clip(clip, 0.0, 1.0).astype(np.float32), f"{scene} {motion}"


def make_batch(rng: np.random.Generator, n: int, frames: int = 16, height: int = 96,
               width: int = 96) -> Tuple[np.ndarray, List[str]]:
    """``n`` clips: ``(float32 [n, frames, height, width, 3] in [0, 1], list of n prompts)``."""
    clips, prompts = zip(*(make_clip(rng, frames, height, width) for _ in range(int(n))))
    return np.stack(clips), list(prompts)
