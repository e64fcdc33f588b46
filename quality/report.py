"""Comparison reports: ``report.json`` (versioned schema), ``report.html`` (self-contained) and
``side_by_side.mp4``.

Schema (version ``REPORT_SCHEMA_VERSION``), all times in seconds, memory in bytes::

    {
      "schema_version": 1,
      "created_utc": "2026-11-22T12:00:00Z",
      "model": {"name": str, "class": str, "fingerprint": str},
      "settings": {"seed": int, "device": str, "dtype": str, "call_kwargs": {...}},
      "environment": {"torch": str, "diffusers": str, "vidattn": str, ...},
      "dense": RUN,                      # the dense baseline
      "configs": [RUN + {"name", "pattern", "density", "speedup", "metrics", "latent_errors",
                         "attention"}],
      "lpips": {"skipped": bool, "reason"?: str}
    }
    RUN = {"wall_s": float, "step_times_s": [float], "attention_s": float|null,
           "attention_share": float|null, "peak_memory_bytes": int|null, "cached": bool,
           "temporal_warp_error": float}
    density   = {"token": float|null, "block": float|null}   (mean over layers; 1 = dense)
    metrics   = metrics.video_metrics(): psnr, psnr_per_frame, ssim, ssim_per_frame,
                temporal_warp_error, temporal_warp_error_ref, pixel_errors{mse,rel_l2,cosine,max_abs}, lpips
    latent_errors = metrics.tensor_errors() on the final latents (or null)
    attention = probes.AttentionProbe.summary() (or null when probes are off)

:func:`validate_report` checks this structure by hand (no jsonschema dependency); ``REPORT_SCHEMA``
is the same description as a JSON-Schema dict for external tools.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Any, Dict, Mapping, Optional

import numpy as np

from vidattn.pipelines.video_io import atomic_path, to_uint8, write_mp4

__all__ = ["REPORT_SCHEMA_VERSION", "REPORT_SCHEMA", "validate_report", "write_report", "write_side_by_side_mp4",
           "render_html"]

REPORT_SCHEMA_VERSION = 1

_NUM = {"type": ["number", "null"]}
_RUN = {
    "type": "object",
    "required": ["wall_s", "step_times_s", "attention_s", "attention_share", "peak_memory_bytes", "cached",
                 "temporal_warp_error"],
    "properties": {"wall_s": {"type": "number"}, "step_times_s": {"type": "array", "items": {"type": "number"}},
                   "attention_s": _NUM, "attention_share": _NUM, "peak_memory_bytes": {"type": ["integer", "null"]},
                   "cached": {"type": "boolean"}, "temporal_warp_error": {"type": "number"}},
}
_METRICS = {
    "type": "object",
    "required": ["psnr", "psnr_per_frame", "ssim", "ssim_per_frame", "temporal_warp_error", "pixel_errors", "lpips"],
    "properties": {"psnr": {"type": "number"}, "psnr_per_frame": {"type": "array", "items": {"type": "number"}},
                   "ssim": {"type": "number"}, "ssim_per_frame": {"type": "array", "items": {"type": "number"}},
                   "temporal_warp_error": {"type": "number"}, "pixel_errors": {"type": "object"},
                   "lpips": {"type": "object"}},
}
_CONFIG = {
    "type": "object",
    "required": ["name", "pattern", "density", "speedup", "metrics", "latent_errors", "attention"] + _RUN["required"],
    "properties": dict(_RUN["properties"], name={"type": "string"}, pattern={"type": "string"},
                       density={"type": "object", "required": ["token", "block"],
                                "properties": {"token": _NUM, "block": _NUM}},
                       speedup=_NUM, metrics=_METRICS, latent_errors={"type": ["object", "null"]},
                       attention={"type": ["object", "null"]}),
}
REPORT_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "vidattn quality report",
    "type": "object",
    "required": ["schema_version", "created_utc", "model", "settings", "environment", "dense", "configs", "lpips"],
    "properties": {
        "schema_version": {"const": REPORT_SCHEMA_VERSION},
        "created_utc": {"type": "string"},
        "model": {"type": "object", "required": ["name", "class", "fingerprint"],
                  "properties": {"name": {"type": "string"}, "class": {"type": "string"},
                                 "fingerprint": {"type": "string"}}},
        "settings": {"type": "object", "required": ["seed", "device", "dtype", "call_kwargs"],
                     "properties": {"seed": {"type": "integer"}, "device": {"type": "string"},
                                    "dtype": {"type": "string"}, "call_kwargs": {"type": "object"}}},
        "environment": {"type": "object"},
        "dense": _RUN,
        "configs": {"type": "array", "items": _CONFIG},
        "lpips": {"type": "object", "required": ["skipped"], "properties": {"skipped": {"type": "boolean"}}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _check(value: Any, schema: Mapping[str, Any], path: str) -> None:
    if "const" in schema:
        if value != schema["const"]:
            raise ValueError(f"report{path} must be {schema['const']!r}, got {value!r}")
        return
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = False
        for t in types:
            if t == "number":
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
            elif t == "integer":
                ok |= isinstance(value, int) and not isinstance(value, bool)
            else:
                ok |= isinstance(value, _TYPES[t])
        if not ok:
            raise ValueError(f"report{path} must be of type {'/'.join(types)}, got {type(value).__name__}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ValueError(f"report{path} is missing required key {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]")


def validate_report(report: Dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first offending field if ``report`` does not match
    :data:`REPORT_SCHEMA` (required keys, types, schema version)."""
    if not isinstance(report, dict):
        raise ValueError(f"report must be a dict, got {type(report).__name__}")
    _check(report, REPORT_SCHEMA, "")


# ---------------------------------------------------------------- atomic writes
def _atomic_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _u8(video) -> np.ndarray:
    from .metrics import to_video

    v = to_video(video)
    return to_uint8(v[..., None] if v.ndim == 3 else v)


def _side_by_side_frames(dense, sparse: Mapping[str, Any], diff_gain: float = 4.0) -> np.ndarray:
    """uint8 ``[F, H * n_rows, W * 3, 3]``: one row per sparse config: dense | sparse | |diff| * gain."""
    d = _u8(dense)
    rows = []
    for v in sparse.values():
        s = _u8(v)
        if s.shape != d.shape:
            raise ValueError(f"videos must all have the dense video's shape {d.shape}, got {s.shape}")
        diff = np.clip(np.abs(d.astype(np.int16) - s.astype(np.int16)) * diff_gain, 0, 255).astype(np.uint8)
        rows.append(np.concatenate([d, s, diff], axis=2))
    if not rows:
        rows = [d]
    return np.concatenate(rows, axis=1)


def write_side_by_side_mp4(path: str, dense, sparse: Mapping[str, Any], fps: int = 8, min_size: int = 64) -> tuple:
    """Write the side-by-side video (see :func:`_side_by_side_frames`) with OpenCV ``mp4v``, upscaled
    (nearest) so the short side is at least ``min_size``; atomic (temp file + ``os.replace``).
    Returns (frames, height, width) written."""
    import cv2

    frames = _side_by_side_frames(dense, sparse)
    h, w = frames.shape[1:3]
    up = max(1, int(np.ceil(min_size / min(h, w))))
    H, W = h * up, w * up
    H += H % 2
    W += W % 2
    write_mp4(np.stack([cv2.resize(f, (W, H), interpolation=cv2.INTER_NEAREST) for f in frames]), path, fps=fps)
    return frames.shape[0], H, W


# ---------------------------------------------------------------- html
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(report: Dict[str, Any], videos: Mapping[str, Any]) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = {}
    cfgs = report["configs"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    any_layer = False
    for c in cfgs:
        att = c.get("attention") or {}
        pl = att.get("per_layer") or []
        if pl:
            any_layer = True
            ax.plot([p["layer"] for p in pl], [p["rel_l2"] for p in pl], "o-", label=c["name"])
    ax.set_xlabel("attention call (layer) index")
    ax.set_ylabel("relative L2 vs dense")
    ax.set_title("Per-layer attention error" + ("" if any_layer else " (no probe data)"))
    if any_layer:
        ax.legend(fontsize=7)
    out["attention_error"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for c in cfgs:
        p = np.minimum(np.array(c["metrics"]["psnr_per_frame"], dtype=float), 100.0)
        ax.plot(np.arange(len(p)), p, "o-", label=c["name"])
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR vs dense (dB, capped at 100)")
    ax.set_title("PSNR per frame")
    if cfgs:
        ax.legend(fontsize=7)
    out["psnr_per_frame"] = _png(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for c in cfgs:
        sp = c.get("speedup") or 0.0
        ax.scatter([sp], [min(c["metrics"]["psnr"], 100.0)])
        ax.annotate(c["name"], (sp, min(c["metrics"]["psnr"], 100.0)), fontsize=7)
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("end-to-end speedup vs dense (x)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title("Speed vs quality")
    out["speed_quality"] = _png(fig)

    if "dense" in videos:
        d = _u8(videos["dense"])
        mid = d.shape[0] // 2
        names = [c["name"] for c in cfgs if c["name"] in videos]
        if names:
            fig, axes = plt.subplots(len(names), 3, figsize=(6, 2.1 * len(names)), squeeze=False)
            for r, n in enumerate(names):
                s = _u8(videos[n])
                diff = np.clip(np.abs(d[mid].astype(int) - s[mid].astype(int)) * 4, 0, 255).astype(np.uint8)
                for a, img, title in zip(axes[r], (d[mid], s[mid], diff), ("dense", n, "|diff| x4")):
                    a.imshow(img, interpolation="nearest")
                    a.set_title(title, fontsize=8)
                    a.axis("off")
            out["frames"] = _png(fig)
    return out


def render_html(report: Dict[str, Any], videos: Mapping[str, Any]) -> str:
    """Self-contained HTML (plots as base64 PNG ``data:`` URIs, no external resources)."""
    e = html.escape
    plots = _plots(report, videos)
    dense = report["dense"]
    rows = []
    for c in report["configs"]:
        att = c.get("attention") or {}
        f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
        rows.append("<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in (
            c["name"], c["pattern"], f(c["density"]["token"], ".3f"), f(c["speedup"], ".2f"),
            f(c["metrics"]["psnr"], ".2f"), f(c["metrics"]["ssim"], ".4f"),
            f(c["metrics"]["temporal_warp_error"], ".4f"), f(att.get("rel_l2"), ".4f"), f(att.get("recall"), ".4f"),
            f(c["attention_share"], ".2f"), f(c["wall_s"], ".2f"))) + "</tr>")
    lp = report["lpips"]
    imgs = "".join(f'<h2>{e(k.replace("_", " "))}</h2><img alt="{e(k)}" src="{v}"/>' for k, v in plots.items())
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>vidattn quality report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}</style>
</head><body><h1>vidattn quality report</h1>
<p>model <b>{e(report['model']['name'])}</b> ({e(report['model']['class'])}), seed {report['settings']['seed']},
device {e(report['settings']['device'])}, dtype {e(report['settings']['dtype'])}, schema v{report['schema_version']},
created {e(report['created_utc'])}</p>
<p>dense: {dense['wall_s']:.2f} s ({len(dense['step_times_s'])} steps{', cached' if dense['cached'] else ''}),
temporal warp error {dense['temporal_warp_error']:.4f}. LPIPS: {e('skipped: ' + lp.get('reason', '') if lp['skipped'] else 'computed')}</p>
<table><tr><th>config</th><th>pattern</th><th>token density</th><th>speedup</th><th>PSNR dB</th><th>SSIM</th>
<th>warp err</th><th>attn rel L2</th><th>attn recall</th><th>attn share</th><th>wall s</th></tr>
{''.join(rows)}</table>{imgs}
<h2>raw report</h2><pre>{e(json.dumps(report, indent=1)[:20000])}</pre></body></html>"""


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return 1e9 if o > 0 else -1e9
    return o


def write_report(out_dir: str, report: Dict[str, Any], videos: Mapping[str, Any], fps: int = 8) -> Dict[str, str]:
    """Validate ``report`` and write ``report.json``, ``report.html`` and ``side_by_side.mp4`` into
    ``out_dir`` (created if needed), each atomically.

    Args:
        videos: name -> video ``[F,H,W,C]`` in [0,1] (float or uint8); must contain ``"dense"`` for the
            mp4 and the frame panel; other names are the configs.
    Returns: dict of the written paths.
    """
    report = _jsonable(report)
    validate_report(report)
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in
             (("json", "report.json"), ("html", "report.html"), ("mp4", "side_by_side.mp4"))}
    _atomic_bytes(paths["json"], json.dumps(report, indent=2).encode())
    _atomic_bytes(paths["html"], render_html(report, videos).encode())
    if "dense" in videos:
        write_side_by_side_mp4(paths["mp4"], videos["dense"], {k: v for k, v in videos.items() if k != "dense"},
                               fps=fps)
    else:
        paths.pop("mp4")
    return paths
