"""Quality-budget search: the fastest pattern setting that stays within a quality target.

``find_fastest(pipe, candidates, target_psnr=30.0, ...)`` runs the dense baseline once (cached),
then every candidate through :func:`vidattn.quality.compare.run_comparison` (speed measured in the
same process), and returns the fastest configuration (highest measured speed-up; ties -> lower token
density) whose PSNR vs dense is ``>= target_psnr`` (and SSIM ``>= target_ssim`` when given), dense
included: a sparse candidate must also be faster than dense, else the answer is ``"dense"``.
``default_grid()`` gives a small grid of settings for the four families. For the full search
(dense steps / layers / heads, per-layer families) see :mod:`.calibration`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

__all__ = ["default_grid", "select_fastest", "find_fastest"]


def default_grid(families=("neighborhood", "radial", "grid", "rectified"), levels=(0.5, 0.75, 0.9),
                 grid=(8, 16, 16)) -> Dict[str, Any]:
    """``{"family@level": pattern}`` for each family and sparsity, fitted to the token ``grid``
    (see :func:`run.family_pattern`)."""
    from .run import family_pattern

    return {f"{f}@{lv:g}": family_pattern(f, lv, grid) for f in families for lv in levels}


def select_fastest(report: Mapping[str, Any], target_psnr: float = 30.0,
                   target_ssim: Optional[float] = None) -> Dict[str, Any]:
    """Pick the fastest configuration meeting the quality target, dense included.

    Dense is always a candidate (speed-up 1.0, identical to itself, so it always meets the target);
    a sparse config wins only if it meets the target **and** its measured speed-up is > 1 (a config
    without a measured speed-up never wins). Ties in speed go to the lower token density.

    Returns ``{"met": True, "best": name ("dense" when nothing beats it), "beats_dense": bool,
    "speedup": best's speed-up, "target_psnr", "target_ssim", "candidates": [{name, speedup, density,
    psnr, ssim, ok}]}`` (sorted fastest first, dense among them)."""
    cands = [dict(name="dense", speedup=1.0, density=1.0, psnr=float("inf"), ssim=1.0, ok=True)]
    for c in report["configs"]:
        psnr, ssim = c["metrics"]["psnr"], c["metrics"]["ssim"]
        ok = psnr >= target_psnr and (target_ssim is None or ssim >= target_ssim)
        sp = c.get("speedup")
        cands.append(dict(name=c["name"], speedup=float(sp) if sp is not None else None, density=c["density"]["token"],
                          psnr=psnr, ssim=ssim, ok=bool(ok)))
    key = lambda d: (-(d["speedup"] if d["speedup"] is not None else 0.0),  # noqa: E731
                     d["density"] if d["density"] is not None else 1.0)
    cands.sort(key=key)
    winners = [d for d in cands if d["ok"] and (d["name"] == "dense" or (d["speedup"] is not None and d["speedup"] > 1.0))]
    best = winners[0]
    return {"met": True, "best": best["name"], "beats_dense": best["name"] != "dense", "speedup": best["speedup"],
            "target_psnr": target_psnr, "target_ssim": target_ssim, "candidates": cands}


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
