"""``run_quality``: the entry point behind ``vidattn quality`` (and ``vidattn generate --compare``).

Builds the model (``"reference"`` = the trained reference DiT, ``"tiny-wan"`` = the random tiny
Wan pipeline, or a local diffusers checkpoint directory), builds one pattern per family at a target
sparsity (:func:`family_pattern`), and calls :func:`vidattn.quality.compare.run_comparison`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Optional, Sequence

import torch

__all__ = ["FAMILIES", "family_pattern", "load_model", "run_quality", "cli_entry", "DEFAULT_CALL"]

FAMILIES = ("neighborhood", "radial", "grid", "rectified")

# per family: sparsity level -> pattern kwargs, tuned for the reference grid (8 x 16 x 16 tokens);
# the achieved density is measured and reported, these are only the settings tried.
_LEVELS = {
    "neighborhood": {0.5: dict(kernel_size=(7, 11, 11)), 0.75: dict(kernel_size=(5, 9, 9)),
                     0.9: dict(kernel_size=(3, 7, 7))},
    "radial": {0.5: dict(decay_factor=1.0, block_size=64, sink_frames=0),
               0.75: dict(decay_factor=0.2, block_size=32, sink_frames=0),
               0.9: dict(decay_factor=0.05, block_size=16, sink_frames=0)},
    "grid": {0.5: dict(recall=0.95, block_size=64), 0.75: dict(recall=0.9, block_size=64),
             0.9: dict(recall=0.8, block_size=64)},
    "rectified": {0.5: dict(keep=0.5, block_size=64), 0.75: dict(keep=0.25, block_size=64),
                  0.9: dict(keep=0.1, block_size=64)},
}

DEFAULT_CALL = {"reference": dict(num_frames=8, height=32, width=32, num_inference_steps=20),
                "tiny-wan": dict(prompt="a red ball bouncing on a wooden floor", num_frames=9, height=64, width=64,
                                 num_inference_steps=4)}


def family_pattern(family: str, sparsity: float = 0.75, **overrides):
    """A pattern of ``family`` (one of :data:`FAMILIES`) with the preset closest to ``sparsity``
    (0.5, 0.75 or 0.9 presets; ``overrides`` replace preset fields)."""
    import vidattn
    from vidattn.patterns.neighborhood import Neighborhood

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity!r}")
    levels = _LEVELS[family]
    lvl = min(levels, key=lambda s: abs(s - float(sparsity)))
    kw = dict(levels[lvl], **overrides)
    cls = {"neighborhood": Neighborhood, "radial": vidattn.Radial, "grid": vidattn.PermutedGrid,
           "rectified": vidattn.RectifiedSparse}[family]
    return cls(**kw)


def load_model(model: str = "reference", device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``"reference"`` | ``"tiny-wan"`` | a local diffusers pipeline directory -> pipeline on device."""
    if model == "reference":
        from .reference_model import load_reference_pipeline

        return load_reference_pipeline(device=device, dtype=dtype)
    if model == "tiny-wan":
        from vidattn.pipelines.tiny import build_tiny_wan

        return build_tiny_wan(dtype=dtype, device=device)
    if os.path.isdir(model):
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    raise ValueError(f"model must be 'reference', 'tiny-wan' or an existing diffusers checkpoint directory, got {model!r}")


def run_quality(model: str = "reference", patterns: Sequence[str] = FAMILIES, out_dir: str = "quality_out", *,
                sparsity: float | Sequence[float] = 0.75, num_frames: Optional[int] = None,
                height: Optional[int] = None, width: Optional[int] = None, steps: Optional[int] = None,
                seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, prompt: Optional[str] = None,
                cache_dir: Optional[str] = None, probes: bool = True, progress: bool = True,
                apply_kwargs: Optional[Dict[str, Any]] = None, pipe=None) -> Dict[str, Any]:
    """Compare dense with one config per (family, sparsity) on ``model``; writes the report files.

    Args:
        patterns: family names from :data:`FAMILIES` (a comma-separated string is accepted).
        sparsity: one level or several (each family gets a config per level; names ``family@0.75``).
        num_frames/height/width/steps/prompt: override :data:`DEFAULT_CALL` for the model.
        cache_dir: dense-baseline cache folder (default ``~/.cache/vidattn/dense``).
        pipe: an already loaded pipeline (skips :func:`load_model`).
    Returns: the report dict (see :mod:`vidattn.quality.report`).
    """
    from .compare import run_comparison

    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    bad = [p for p in patterns if p not in FAMILIES]
    if bad or not patterns:
        raise ValueError(f"patterns must be a non-empty list from {FAMILIES}, got {list(patterns)!r}")
    levels = [sparsity] if isinstance(sparsity, (int, float)) else list(sparsity)
    if pipe is None:
        pipe = load_model(model, device=device, dtype=dtype)
    key = "tiny-wan" if model == "tiny-wan" else "reference" if model == "reference" else "tiny-wan"
    call = dict(DEFAULT_CALL[key])
    if key == "reference" and not str(device).startswith("cuda"):
        call["num_inference_steps"] = 4  # CPU default: keeps `vidattn quality` to a few minutes
    for k, v in (("num_frames", num_frames), ("height", height), ("width", width), ("num_inference_steps", steps),
                 ("prompt", prompt)):
        if v is not None:
            call[k] = v
    configs = {}
    for fam in patterns:
        for lv in levels:
            name = fam if len(levels) == 1 else f"{fam}@{lv:g}"
            configs[name] = family_pattern(fam, lv)
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "vidattn", "dense")
    return run_comparison(pipe, configs, call_kwargs=call, seed=seed, out_dir=out_dir, cache_dir=cache,
                          probes=probes, progress=progress, apply_kwargs=apply_kwargs, model_name=model)


def cli_entry(args) -> int:
    """For the CLI: ``args`` has ``model, patterns, out, sparsity, frames, height, width, steps, seed,
    device, quiet`` (missing attributes take defaults). Prints a summary table; returns 0."""
    g = lambda n, d=None: getattr(args, n, d)  # noqa: E731
    rep = run_quality(model=g("model", "reference") or "reference", patterns=g("patterns", FAMILIES) or FAMILIES,
                      out_dir=g("out", "quality_out"), sparsity=g("sparsity", 0.75) or 0.75, num_frames=g("frames"),
                      height=g("height"), width=g("width"), steps=g("steps"), seed=g("seed", 0) or 0,
                      device=g("device", "cpu") or "cpu", progress=not g("quiet", False))
    if not g("quiet", False):
        print(summary_table(rep))
    return 0


def summary_table(report: Dict[str, Any]) -> str:
    """Plain-text table of a report: one line per config."""
    lines = [f"{'config':<16}{'density':>9}{'speedup':>9}{'PSNR':>8}{'SSIM':>8}{'attn relL2':>12}{'recall':>8}",
             f"{'dense':<16}{1.0:>9.3f}{1.0:>9.2f}{'-':>8}{'-':>8}{'-':>12}{'-':>8}"]
    for c in report["configs"]:
        a = c.get("attention") or {}
        f = lambda x, w, p: f"{x:>{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"  # noqa: E731
        lines.append(f"{c['name']:<16}{f(c['density']['token'], 9, 3)}{f(c['speedup'], 9, 2)}"
                     f"{f(c['metrics']['psnr'], 8, 2)}{f(c['metrics']['ssim'], 8, 4)}{f(a.get('rel_l2'), 12, 4)}"
                     f"{f(a.get('recall'), 8, 4)}")
    return "\n".join(lines)
