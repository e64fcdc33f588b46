"""Comparison reports: ``report.json`` (versioned schema), ``report.html`` (self-contained) and
``side_by_side.mp4``.

Schema (version ``REPORT_SCHEMA_VERSION``), all times in seconds, memory in bytes::

    {
      "schema_version": 2,
      "created_utc": "2026-11-22T12:00:00Z",
      "model": {"name": str, "class": str, "fingerprint": str},
      "settings": {"seed": int (first), "seeds": [int], "batched": bool, "device": str, "dtype": str,
                   "call_kwargs": {...}},
      "environment": {"torch": str, "diffusers": str, "numpy": str, "vidattn": str, "cuda_device": str|null},
      "dense": RUN + {"floors": {"flat"|"frozen"|"unrelated": {"psnr", "ssim", "psnr_std"}}},
      "configs": [RUN + {"name", "pattern", "config" (plan-file dict), "density", "sparse_calls", "speedup",
                         "metrics", "latent_errors", "trajectory", "attention"}],
      "lpips": {"skipped": bool, "reason"?: str},
      "attention_stats"?: quality.attention_stats.attention_stats() dict
    }
    RUN = {"wall_s": float|null (estimated full run from the timed steps), "step_times_s": [float] (timed
           steps), "attention_s": float|null, "attention_share": float|null, "peak_memory_bytes": int|null,
           "cached": bool, "temporal_warp_error": float, "timing": timing.time_steps() dict|null
           (+ "step_speedup", "attention_speedup", "speedup" for configs)}
    density   = {"token": float|null, "block": float|null}   (mean over layers; 1 = dense)
    speedup   = end-to-end speed-up of a full run vs dense (timed in the same process) or null
    metrics   = mean over seeds: psnr (whole video), psnr_std/min/max, psnr_frame_mean, ssim, ssim_std,
                psnr_per_frame, ssim_per_frame, temporal_warp_error(_ref), pixel_errors, lpips (first seed),
                per_seed [{seed, psnr, ssim, psnr_frame_mean, temporal_warp_error}],
                psnr_above / ssim_above {floor: value - floor}, above_floor_db, ssim_above_floor
    trajectory = {"latent_psnr": [per step], "x0_psnr": [per step, null where unknown],
                  "latent_psnr_per_seed": [[per step] per seed]} (or null)
    latent_errors = metrics.tensor_errors() on the first seed's final latents (or null)
    attention = probes.AttentionProbe.summary() (or null when probes are off); per_layer uses the
                model's self-attention layer indices

:func:`validate_report` checks this structure by hand (no jsonschema dependency); ``REPORT_SCHEMA``
is the same description as a JSON-Schema dict for external tools.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

from vidattn.pipelines.video_io import atomic_path, to_uint8, write_mp4

__all__ = ["REPORT_SCHEMA_VERSION", "REPORT_SCHEMA", "validate_report", "write_report", "write_side_by_side_mp4",
           "side_by_side_frames", "render_html"]

REPORT_SCHEMA_VERSION = 2

_NUM = {"type": ["number", "null"]}
_RUN = {
    "type": "object",
    "required": ["wall_s", "step_times_s", "attention_s", "attention_share", "peak_memory_bytes", "cached",
                 "temporal_warp_error"],
    "properties": {"wall_s": _NUM, "step_times_s": {"type": "array", "items": {"type": "number"}},
                   "attention_s": _NUM, "attention_share": _NUM, "peak_memory_bytes": {"type": ["integer", "null"]},
                   "cached": {"type": "boolean"}, "temporal_warp_error": {"type": "number"}},
}
_METRICS = {
    "type": "object",
    "required": ["psnr", "psnr_per_frame", "psnr_frame_mean", "ssim", "ssim_per_frame", "temporal_warp_error",
                 "pixel_errors", "lpips"],
    "properties": {"psnr": {"type": "number"}, "psnr_frame_mean": {"type": "number"}, "psnr_per_frame": {"type": "array", "items": {"type": "number"}},
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
        "settings": {"type": "object", "required": ["seed", "seeds", "device", "dtype", "call_kwargs"],
                     "properties": {"seed": {"type": "integer"}, "seeds": {"type": "array", "items": {"type": "integer"}},
                                    "device": {"type": "string"},
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


def _label(panel: np.ndarray, text: str, bar: int) -> np.ndarray:
    """``panel`` uint8 ``[H, W, 3]`` with a black bar of ``bar`` px on top holding ``text`` (OpenCV)."""
    import cv2

    h, w = panel.shape[:2]
    top = np.zeros((bar, w, 3), np.uint8)
    scale = bar / 40.0
    txt = str(text)
    while len(txt) > 3 and cv2.getTextSize(txt, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > w - 6:
        txt = txt[:-2] + "~" if not txt.endswith("~") else txt[:-3] + "~"
    cv2.putText(top, txt, (3, int(bar * 0.72)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([top, panel], axis=0)


def side_by_side_frames(dense, sparse: Mapping[str, Any], diff_gain: float = 4.0, min_panel: int = 256,
                        max_rows: int = 8) -> np.ndarray:
    """uint8 ``[F, rows * (bar + h), 3 * w, 3]``: one row per sparse config (at most ``max_rows``):
    ``dense | config | |diff| x gain``, each panel upscaled (nearest) so it is at least ``min_panel``
    px tall and labelled above with its name (text drawn with OpenCV)."""
    import cv2

    d = _u8(dense)
    F, h0, w0 = d.shape[:3]
    up = max(1, int(np.ceil(min_panel / h0)))
    h, w = h0 * up, w0 * up
    bar = max(16, min(32, h // 10))

    def big(v):
        return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_NEAREST) for f in v])

    D = big(d)
    items = list(sparse.items())[:max_rows] or [("dense", dense)]
    rows = []
    for name, v in items:
        s = _u8(v)
        if s.shape != d.shape:
            raise ValueError(f"videos must all have the dense video's shape {d.shape}, got {s.shape}")
        diff = np.clip(np.abs(d.astype(np.int16) - s.astype(np.int16)) * diff_gain, 0, 255).astype(np.uint8)
        S, X = big(s), big(diff)
        rows.append(np.stack([np.concatenate([_label(D[f], "dense", bar), _label(S[f], name, bar),
                                              _label(X[f], f"|diff| x{diff_gain:g}", bar)], axis=1)
                              for f in range(F)]))
    return np.concatenate(rows, axis=1)


def write_side_by_side_mp4(path: str, dense, sparse: Mapping[str, Any], fps: int = 8, min_panel: int = 256) -> tuple:
    """Write :func:`side_by_side_frames` with OpenCV ``mp4v`` (even sizes); atomic (temp file +
    ``os.replace``). Returns (frames, height, width) written."""
    frames = side_by_side_frames(dense, sparse, min_panel=min_panel)
    F, H, W = frames.shape[:3]
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
    write_mp4(frames, path, fps=fps)
    return F, frames.shape[1], frames.shape[2]


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
    ax.set_xlabel("self-attention layer index")
    ax.set_ylabel("relative L2 vs dense")
    ax.set_title("Per-layer attention error" + ("" if any_layer else " (no probe data)"))
    if any_layer:
        ax.legend(fontsize=7)
    out["attention_error"] = _png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    any_traj = False
    for c in cfgs:
        tr = c.get("trajectory") or {}
        for ax, key in zip(axes, ("latent_psnr", "x0_psnr")):
            vals = [np.nan if x is None else min(x, 100.0) for x in tr.get(key) or []]
            if vals:
                any_traj = True
                ax.plot(np.arange(len(vals)), vals, "o-", ms=3, label=c["name"])
    for ax, t in zip(axes, ("latents vs dense", "predicted clean sample vs dense")):
        ax.set_xlabel("denoising step")
        ax.set_ylabel("PSNR (dB, capped at 100)")
        ax.set_title(t + ("" if any_traj else " (not recorded)"))
    if any_traj:
        axes[0].legend(fontsize=7)
    out["trajectory"] = _png(fig)

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
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    for c in report["configs"]:
        att = c.get("attention") or {}
        m = c["metrics"]
        t = c.get("timing") or {}
        pm = f"{f(m['psnr'], '.2f')} &plusmn; {f(m.get('psnr_std'), '.2f')}"
        sm = f"{f(m['ssim'], '.4f')} &plusmn; {f(m.get('ssim_std'), '.4f')}"
        rows.append("<tr>" + "".join(f"<td>{x}</td>" for x in (
            e(c["name"]), e(c["pattern"]), f(c["density"]["token"], ".3f"), pm, sm, f(m.get("above_floor_db"), "+.2f"),
            f(m["temporal_warp_error"], ".4f"), f(att.get("rel_l2"), ".4f"), f(att.get("recall"), ".4f"),
            f(t.get("attention_speedup"), ".2f"), f(t.get("step_speedup"), ".2f"), f(c["speedup"], ".2f"),
            f(c["attention_share"], ".2f"))) + "</tr>")
    floors = dense.get("floors") or {}
    frows = "".join(f"<tr><td>{e(k)}</td><td>{v['psnr']:.2f}</td><td>{v['ssim']:.4f}</td></tr>" for k, v in floors.items())
    ftable = ("<h2>floors (trivial stand-ins for the dense video)</h2><p>flat = each frame's mean colour, frozen = "
              "first frame held, unrelated = another seed's dense sample; &quot;above floor&quot; = PSNR minus the "
              "highest floor PSNR.</p><table><tr><th>floor</th><th>PSNR dB</th><th>SSIM</th></tr>"
              + frows + "</table>") if floors else ""
    ast = report.get("attention_stats")
    astxt = ""
    if ast:
        try:
            from .attention_stats import format_attention_stats

            astxt = f"<h2>attention statistics</h2><pre>{e(format_attention_stats(ast))}</pre>"
        except Exception:  # pragma: no cover
            astxt = ""
    lp = report["lpips"]
    imgs = "".join(f'<h2>{e(k.replace("_", " "))}</h2><img alt="{e(k)}" src="{v}"/>' for k, v in plots.items())
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>vidattn quality report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}</style>
</head><body><h1>vidattn quality report</h1>
<p>model <b>{e(report['model']['name'])}</b> ({e(report['model']['class'])}), seeds {e(str(report['settings'].get('seeds', [report['settings']['seed']])))},
device {e(report['settings']['device'])}, dtype {e(report['settings']['dtype'])}, schema v{report['schema_version']},
created {e(report['created_utc'])}</p>
<p>dense: step {f((dense.get('timing') or {}).get('step_s'), '.4f')} s (timed in this run){', video from the cache' if dense['cached'] else ''},
temporal warp error {dense['temporal_warp_error']:.4f}. PSNR over the whole video, mean &plusmn; std over seeds. Speed-ups: measured
in this process, warm-up excluded (attention call, denoising step, full run with its dense steps).
LPIPS: {e('skipped: ' + lp.get('reason', '') if lp['skipped'] else 'computed')}</p>
<table><tr><th>config</th><th>pattern</th><th>token density</th><th>PSNR dB</th><th>SSIM</th><th>dB above floor</th>
<th>warp err</th><th>attn rel L2</th><th>attn recall</th><th>attn speedup</th><th>step speedup</th><th>run speedup</th>
<th>attn share</th></tr>
{''.join(rows)}</table>{ftable}{imgs}{astxt}
<h2>raw report</h2><pre>{e(json.dumps(report, indent=1)[:20000])}</pre></body></html>"""


def _clip_nonfinite(x: float) -> float:
    return 1e9 if x > 0 else -1e9


def jsonable(o, nonfinite: Callable[[float], Any] = _clip_nonfinite):
    """``o`` (nested dicts / lists / tuples of scalars) as plain JSON data: keys as str, tuples as
    lists, numpy scalars as Python numbers, a non-finite Python float as ``nonfinite(x)`` (default
    +-1e9, as ``report.json`` stores it)."""
    if isinstance(o, dict):
        return {str(k): jsonable(v, nonfinite) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v, nonfinite) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return nonfinite(o)
    return o


def write_report(out_dir: str, report: Dict[str, Any], videos: Mapping[str, Any], fps: int = 8) -> Dict[str, str]:
    """Validate ``report`` and write ``report.json``, ``report.html`` and ``side_by_side.mp4`` into
    ``out_dir`` (created if needed), each atomically.

    Args:
        videos: name -> video ``[F,H,W,C]`` in [0,1] (float or uint8); must contain ``"dense"`` for the
            mp4 and the frame panel; other names are the configs.
    Returns: dict of the written paths.
    """
    report = jsonable(report)
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
