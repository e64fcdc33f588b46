"""Procedural motion videos for training the reference model (drawn with OpenCV, no downloads).

Each clip is ``[F, H, W, 3]`` float32 in [0, 1]: a smooth random background gradient with 1-3
objects (filled circles = "balls" bouncing off the walls, rotating squares/triangles moving on
straight lines).  Motion is continuous across frames, so a model trained on these clips learns
genuine spatio-temporal attention structure (local in space, coherent in time).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["make_clip", "make_batch"]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0 = rng.uniform(0.0, 0.35, size=3)
    c1 = rng.uniform(0.0, 0.35, size=3)
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (math.cos(ang) * xx / max(w - 1, 1) + math.sin(ang) * yy / max(h - 1, 1))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return (c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]).astype(np.float32)


def make_clip(rng: np.random.Generator, frames: int = 8, height: int = 32, width: int = 32,
              supersample: int = 4) -> np.ndarray:
    """Draw one random motion clip.

    Args:
        rng: numpy Generator (the only source of randomness).
        frames, height, width: clip size.
        supersample: objects are drawn at this factor and area-downsampled (anti-aliasing).
    Returns:
        float32 array ``[frames, height, width, 3]`` in [0, 1].
    """
    if frames < 1 or height < 4 or width < 4:
        raise ValueError(f"frames/height/width must be >= 1/4/4, got {frames}/{height}/{width}")
    s = int(supersample)
    H, W = height * s, width * s
    bg = cv2.resize(_background(rng, height, width), (W, H), interpolation=cv2.INTER_LINEAR)
    objs = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 3))  # 0 ball, 1 square, 2 triangle
        r = rng.uniform(0.12, 0.25) * min(H, W)
        pos = np.array([rng.uniform(r, W - r), rng.uniform(r, H - r)])
        speed = rng.uniform(0.03, 0.09) * min(H, W)
        ang = rng.uniform(0, 2 * math.pi)
        vel = speed * np.array([math.cos(ang), math.sin(ang)])
        color = rng.uniform(0.45, 1.0, size=3)
        color[int(rng.integers(0, 3))] *= rng.uniform(0.0, 0.5)
        objs.append(dict(kind=kind, r=r, pos=pos, vel=vel, color=color, rot=rng.uniform(0, 2 * math.pi),
                         spin=rng.uniform(-0.35, 0.35)))
    out = np.empty((frames, height, width, 3), np.float32)
    for f in range(frames):
        img = bg.copy()
        for o in objs:
            cx, cy = o["pos"]
            col = tuple(float(c) for c in o["color"])
            if o["kind"] == 0:
                cv2.circle(img, (int(round(cx)), int(round(cy))), int(round(o["r"])), col, -1, cv2.LINE_AA)
            else:
                n = 4 if o["kind"] == 1 else 3
                pts = [(cx + o["r"] * math.cos(o["rot"] + 2 * math.pi * i / n),
                        cy + o["r"] * math.sin(o["rot"] + 2 * math.pi * i / n)) for i in range(n)]
                cv2.fillPoly(img, [np.round(np.array(pts)).astype(np.int32)], col, cv2.LINE_AA)
            # advance: bounce off walls
            o["pos"] = o["pos"] + o["vel"]
            for d, lim in ((0, W), (1, H)):
                if o["pos"][d] < o["r"] or o["pos"][d] > lim - o["r"]:
                    o["vel"][d] = -o["vel"][d]
                    o["pos"][d] = float(np.clip(o["pos"][d], o["r"], lim - o["r"]))
            o["rot"] += o["spin"]
        out[f] = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    return np.clip(out, 0.0, 1.0)


def make_batch(rng: np.random.Generator, n: int, frames: int = 8, height: int = 32, width: int = 32) -> np.ndarray:
    """``n`` clips stacked: float32 ``[n, frames, height, width, 3]`` in [0, 1]."""
    return np.stack([make_clip(rng, frames, height, width) for _ in range(int(n))])
