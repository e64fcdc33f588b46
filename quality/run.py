"""``run_quality``: the entry point behind ``vidattn quality`` (and ``vidattn generate --compare``).

Builds the model (``"reference"`` = the trained reference DiT, ``"tiny-wan"`` = the random tiny
Wan pipeline, or a local diffusers checkpoint directory), builds one pattern per family at a target
sparsity (:func:`family_pattern`), and calls :func:`vidattn.quality.compare.run_comparison`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Optional, Sequence

import torch

__all__ = ["FAMILIES", "family_pattern", "load_model", "run_quality", "cli_entry", "DEFAULT_CALL", "discover_grid",
           "default_call", "parse_seeds"]

FAMILIES = ("neighborhood", "radial", "grid", "rectified")

DEFAULT_CALL = {"reference": dict(num_frames=8, height=32, width=32, num_inference_steps=20),
                "tiny-wan": dict(prompt="a red ball bouncing on a wooden floor", num_frames=9, height=64, width=64,
                                 num_inference_steps=4)}


def family_pattern(family: str, sparsity: float = 0.75, grid=(8, 16, 16), **overrides):
    """A pattern of preset ``family`` (:func:`vidattn.quality.presets.preset_names`) fitted to
    ``sparsity`` on the token ``grid`` (default: v1's 8 x 16 x 16); ``overrides`` replace fields."""
    from .presets import fit_pattern

    return fit_pattern(family, sparsity, tuple(grid), **overrides)


def discover_grid(pipe, call_kwargs: Dict[str, Any]):
    """The latent token grid (e.g. ``(T, H, W)``) the pipeline's self-attention runs on for
    ``call_kwargs``: one 1-step call, batch 1, with a dense vidattn processor recording the layout."""
    import vidattn

    kw = {k: v for k, v in call_kwargs.items() if k not in ("callback_on_step_end", "latents", "generator")}
    if isinstance(kw.get("prompt"), (list, tuple)):
        kw["prompt"] = kw["prompt"][0]
    kw.update(num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0))
    handle = vidattn.apply(pipe, vidattn.Dense())
    try:
        pipe(**kw)
        grid = handle.grid
    finally:
        vidattn.remove(pipe)
    if grid is None:
        raise RuntimeError("could not discover the token grid: no self-attention call was recorded")
    return tuple(int(g) for g in grid)


def parse_seeds(seeds) -> list:
    """``"0,1,2,3"`` / ``"0-3"`` / int n (-> 0..n-1) / list -> list of ints."""
    if seeds is None:
        return [0, 1, 2, 3]
    if isinstance(seeds, int):
        return list(range(seeds))
    if isinstance(seeds, str):
        out = []
        for part in seeds.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
        return out
    return [int(s) for s in seeds]


def load_model(model: str = "reference", device: str = "cpu", dtype: torch.dtype = torch.float32,
               version: Optional[int] = None):
    """``"reference"`` (``version`` 1/2, default the shipped default) | ``"tiny-wan"`` | a local
    diffusers pipeline directory -> pipeline on device."""
    if model == "reference":
        from .reference_model import load_reference_pipeline

        return load_reference_pipeline(device=device, dtype=dtype, version=version)
    if model == "tiny-wan":
        from vidattn.pipelines.tiny import build_tiny_wan

        return build_tiny_wan(dtype=dtype, device=device)
    if os.path.isdir(model):
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    raise ValueError(f"model must be 'reference', 'tiny-wan' or an existing diffusers checkpoint directory, got {model!r}")


def default_call(model: str, pipe, device: str = "cpu") -> Dict[str, Any]:
    """Pipeline call arguments for ``model``: the reference version's own sampling settings (its CPU
    settings on CPU), the tiny Wan defaults, or the reference v1 defaults for a checkpoint."""
    if model == "tiny-wan":
        return dict(DEFAULT_CALL["tiny-wan"])
    if model == "reference":
        from .reference_model.model import load_config

        ver = getattr(pipe, "reference_version", 1)
        cfg = load_config(version=ver)
        vid, smp = cfg.get("video", {}), cfg.get("sampling", {})
        call = dict(num_frames=vid.get("frames", 8), height=vid.get("height", 32), width=vid.get("width", 32),
                    num_inference_steps=smp.get("num_inference_steps", 20))
        if not str(device).startswith("cuda"):
            call.update(smp.get("cpu") or dict(num_inference_steps=4))  # CPU: keeps `vidattn quality` to minutes
        if ver >= 2:
            call["prompt"] = ["astronaut pan", "cat zoom", "coffee rotate", "motorcycle zoom"]
            call["guidance_scale"] = float(smp.get("guidance_scale", 4.0))
        return call
    return dict(DEFAULT_CALL["tiny-wan"])


def run_quality(model: str = "reference", patterns: Sequence[str] = FAMILIES, out_dir: str = "quality_out", *,
                sparsity: float | Sequence[float] = 0.75, num_frames: Optional[int] = None,
                height: Optional[int] = None, width: Optional[int] = None, steps: Optional[int] = None,
                seeds=None, seed: Optional[int] = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                prompt: Optional[str] = None, cache_dir: Optional[str] = None, use_cache: bool = True,
                probes: bool = True, progress: bool = True, apply_kwargs: Optional[Dict[str, Any]] = None,
                pipe=None, version: Optional[int] = None, attention_stats: bool = False,
                extra_configs: Optional[Dict[str, Any]] = None, **compare_kwargs) -> Dict[str, Any]:
    """Compare dense with one config per (preset, sparsity) on ``model``; writes the report files.

    Args:
        patterns: preset names (:func:`vidattn.quality.presets.preset_names`; a comma-separated string is
            accepted), each fitted to ``sparsity`` on the model's actual token grid.
        sparsity: one level or several (each preset gets a config per level; names ``family@0.75``).
        num_frames/height/width/steps/prompt: override :func:`default_call` for the model.
        seeds: list / "0,1,2,3" / count (default 4 seeds from ``seed`` or 0), batched.
        cache_dir: dense-video cache folder (default ``~/.cache/vidattn/dense``); ``use_cache=False`` skips it.
        attention_stats: also measure :func:`vidattn.quality.attention_stats.attention_stats` (report key
            ``attention_stats``).
        extra_configs: more ``name -> pattern | SparseAttentionConfig`` entries (e.g. a calibrated plan).
        pipe: an already loaded pipeline (skips :func:`load_model`).
    Returns: the report dict (see :mod:`vidattn.quality.report`).
    """
    from .compare import run_comparison
    from .presets import preset_names

    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    known = preset_names()
    bad = [p for p in patterns if p not in known]
    if bad or (not patterns and not extra_configs):
        raise ValueError(f"patterns must be a non-empty list from {known}, got {list(patterns)!r}")
    levels = [sparsity] if isinstance(sparsity, (int, float)) else list(sparsity)
    if pipe is None:
        pipe = load_model(model, device=device, dtype=dtype, version=version)
    call = default_call(model, pipe, device)
    for k, v in (("num_frames", num_frames), ("height", height), ("width", width), ("num_inference_steps", steps),
                 ("prompt", prompt)):
        if v is not None:
            call[k] = v
    seed_list = parse_seeds(seeds) if seeds is not None else [int(seed or 0) + i for i in range(4)]
    grid = discover_grid(pipe, call)
    configs: Dict[str, Any] = {}
    for fam in patterns:
        for lv in levels:
            name = fam if len(levels) == 1 else f"{fam}@{lv:g}"
            configs[name] = family_pattern(fam, lv, grid)
    configs.update(extra_configs or {})
    extra = {}
    if attention_stats:
        from .attention_stats import attention_stats as _stats

        first = dict(call)
        if isinstance(first.get("prompt"), (list, tuple)):
            first["prompt"] = first["prompt"][0]
        extra["attention_stats"] = _stats(pipe, first, seeds=seed_list[:1])
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "vidattn", "dense")
    rep = run_comparison(pipe, configs, call_kwargs=call, seeds=seed_list, out_dir=out_dir, cache_dir=cache,
                         use_cache=use_cache, probes=probes, progress=progress, apply_kwargs=apply_kwargs,
                         model_name=model if model != "reference" else f"reference-v{getattr(pipe, 'reference_version', 1)}",
                         extra=dict(extra, grid=list(grid)), **compare_kwargs)
    return rep


def cli_entry(args) -> int:
    """For the CLI: ``args`` has ``model, patterns, out, sparsity, frames, height, width, steps, seeds,
    device, quiet, attention_stats, no_cache, version`` (missing attributes take defaults). Prints a
    summary table (and the attention-statistics summary); returns 0."""
    g = lambda n, d=None: getattr(args, n, d)  # noqa: E731
    seeds = g("seeds")
    if seeds is None and g("seed") is not None:
        seeds = [int(g("seed")) + i for i in range(4)]
    rep = run_quality(model=g("model", "reference") or "reference", patterns=g("patterns", FAMILIES) or FAMILIES,
                      out_dir=g("out", "quality_out"), sparsity=g("sparsity", 0.75) or 0.75, num_frames=g("frames"),
                      height=g("height"), width=g("width"), steps=g("steps"), seeds=seeds,
                      device=g("device", "cpu") or "cpu", progress=not g("quiet", False),
                      use_cache=not g("no_cache", False), attention_stats=bool(g("attention_stats", False)),
                      version=g("version"))
    if not g("quiet", False):
        if rep.get("attention_stats"):
            from .attention_stats import format_attention_stats

            print(format_attention_stats(rep["attention_stats"]))
        print(summary_table(rep))
    return 0


def summary_table(report: Dict[str, Any]) -> str:
    """Plain-text table of a report: one line per config (PSNR/SSIM mean +- std over seeds, dB above
    the strongest floor, measured speed-ups), then the floors."""
    f = lambda x, w, p: f"{x:>{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"  # noqa: E731
    lines = [f"{'config':<18}{'density':>8}{'PSNR':>7}{'+-':>6}{'SSIM':>7}{'>floor':>8}{'warp':>7}{'attnL2':>8}"
             f"{'attn x':>8}{'step x':>8}{'run x':>7}",
             f"{'dense':<18}{1.0:>8.3f}{'-':>7}{'-':>6}{'-':>7}{'-':>8}{f(report['dense']['temporal_warp_error'], 7, 4)}"
             f"{'-':>8}{1.0:>8.2f}{1.0:>8.2f}{1.0:>7.2f}"]
    for c in report["configs"]:
        a = c.get("attention") or {}
        m = c["metrics"]
        t = c.get("timing") or {}
        lines.append(f"{c['name'][:17]:<18}{f(c['density']['token'], 8, 3)}{f(m['psnr'], 7, 2)}{f(m.get('psnr_std'), 6, 2)}"
                     f"{f(m['ssim'], 7, 3)}{f(m.get('above_floor_db'), 8, 2)}{f(m['temporal_warp_error'], 7, 4)}"
                     f"{f(a.get('rel_l2'), 8, 4)}{f(t.get('attention_speedup'), 8, 2)}{f(t.get('step_speedup'), 8, 2)}"
                     f"{f(c['speedup'], 7, 2)}")
    fl = report["dense"].get("floors") or {}
    if fl:
        lines.append("floors (PSNR dB / SSIM vs dense): " + ", ".join(f"{k} {v['psnr']:.2f}/{v['ssim']:.3f}"
                                                                   for k, v in fl.items()))
    lines.append(f"seeds {report['settings'].get('seeds')}; speed-ups measured in this process (warm-up excluded)")
    return "\n".join(lines)
