"""Quality-budget search: the fastest pattern setting that stays within a quality target.

``find_fastest(pipe, candidates, target_psnr=30.0, ...)`` runs the dense baseline once (cached),
then every candidate through :func:`vidattn.quality.compare.run_comparison`, and returns the
fastest candidate (highest measured speedup; ties -> lower token density) whose PSNR vs dense is
``>= target_psnr`` (and SSIM ``>= target_ssim`` when given).  ``default_grid()`` gives a small grid
of settings for the four families.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

__all__ = ["default_grid", "select_fastest", "find_fastest"]


def default_grid(families=("neighborhood", "radial", "grid", "rectified"), levels=(0.5, 0.75, 0.9)) -> Dict[str, Any]:
    """``{"family@level": pattern}`` for each family and sparsity preset (see :func:`run.family_pattern`)."""
    from .run import family_pattern

    return {f"{f}@{lv:g}": family_pattern(f, lv) for f in families for lv in levels}


def select_fastest(report: Mapping[str, Any], target_psnr: float = 30.0,
                   target_ssim: Optional[float] = None) -> Dict[str, Any]:
    """Pick from a report dict: ``{"met": bool, "best": config name or None, "candidates": [{name,
    speedup, psnr, ssim, ok}]}`` (sorted fastest first)."""
    cands = []
    for c in report["configs"]:
        psnr, ssim = c["metrics"]["psnr"], c["metrics"]["ssim"]
        ok = psnr >= target_psnr and (target_ssim is None or ssim >= target_ssim)
        cands.append(dict(name=c["name"], speedup=c["speedup"] or 0.0, density=c["density"]["token"], psnr=psnr,
                          ssim=ssim, ok=bool(ok)))
    cands.sort(key=lambda d: (-d["speedup"], d["density"] if d["density"] is not None else 1.0))
    best = next((d["name"] for d in cands if d["ok"]), None)
    return {"met": best is not None, "best": best, "target_psnr": target_psnr, "target_ssim": target_ssim,
            "candidates": cands}


def find_fastest(pipe, candidates: Optional[Mapping[str, Any]] = None, *, call_kwargs: Mapping[str, Any],
                 target_psnr: float = 30.0, target_ssim: Optional[float] = None, seed: int = 0, out_dir: str,
                 cache_dir: Optional[str] = None, **kwargs) -> Dict[str, Any]:
    """Run every candidate (default :func:`default_grid`) and return :func:`select_fastest`'s dict plus
    ``"report"`` (the full comparison report, also written to ``out_dir``)."""
    from .compare import run_comparison

    if target_psnr <= 0:
        raise ValueError(f"target_psnr must be > 0 dB, got {target_psnr}")
    cands = dict(candidates) if candidates else default_grid()
    rep = run_comparison(pipe, cands, call_kwargs=call_kwargs, seed=seed, out_dir=out_dir, cache_dir=cache_dir, **kwargs)
    res = select_fastest(rep, target_psnr, target_ssim)
    res["report"] = rep
    return res
