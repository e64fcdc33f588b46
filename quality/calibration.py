"""Calibration to a quality target: the fastest static plan whose quality on held-out seeds meets it.

``calibrate(pipe, target_psnr=..., call_kwargs=...)`` searches the knobs that matter and returns
(and optionally writes, :func:`vidattn.plan_file.save_plan`) a static
:class:`~vidattn.SparseAttentionConfig` that ``vidattn.apply(pipe, vidattn.load_plan(path))`` runs
with no online profiling. The search:

1. **Dense reference** on the calibration seeds and on separate held-out seeds (batched), and a
   timed dense step (probes off) giving the attention fraction ``a`` of a step.
2. **Base candidates**: every family preset (:mod:`.presets`) at every sparsity level, fitted to the
   model's token grid, evaluated on the calibration seeds (PSNR over the whole video vs dense, mean
   over seeds; SSIM too with a SSIM target) with a probe recording the attention error of every
   (layer, head).
3. **Repair** (greedy, per base, sparsest first): while a candidate misses the target and its
   estimated cost is below dense, try (a) more dense first steps, (b) the worst layer dense, (c)
   the worst head of the worst layer dense, (d) the worst layer on the next denser base pattern
   (any family: per-layer family and sparsity); keep the option with the largest PSNR gain per unit
   of estimated cost. Estimated cost of a plan, relative to a dense run of ``N`` steps with ``k``
   dense: ``k/N + (1 - k/N) ((1 - a) + a * mean_layers(effective density))`` with a layer's
   effective density ``h d + (1 - h)`` (``h`` = share of heads sparsified, ``d`` its token density).
4. **Finalists**: the feasible candidates (target met on the calibration seeds) with the lowest
   estimated cost (at most ``max_measure``) are checked on the held-out seeds, and the ones that
   still meet the target are **timed** (:func:`.timing.time_configs`: dense, each finalist, dense
   again, warm-up excluded, probes off). Dense is always a candidate: the answer is the fastest
   finalist whose measured end-to-end speed-up is > 1, else dense (a plan that keeps every layer
   dense, i.e. runs the model's own attention).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from . import metrics as M
from .report import jsonable

__all__ = ["calibrate", "estimated_cost", "dense_plan"]

FAMILIES = ("neighborhood", "radial", "grid", "rectified")


def dense_plan(num_layers: int):
    """A static plan that runs every self-attention layer with the model's own (dense) attention."""
    import vidattn
    from vidattn.pipelines.apply import SparseAttentionConfig

    return SparseAttentionConfig(vidattn.Dense(), dense_layers=tuple(range(int(num_layers))))


def estimated_cost(cfg, densities: Mapping[int, float], num_layers: int, num_heads: int, num_steps: int,
                   attention_fraction: float) -> float:
    """Estimated run time of ``cfg`` relative to dense (1.0): see the module docstring.

    ``densities``: layer -> token density of that layer's plan (layers missing run dense)."""
    eff = []
    for layer in range(num_layers):
        pat = cfg.pattern_for(layer)
        d = densities.get(layer)
        if pat is None or d is None:
            eff.append(1.0)
            continue
        hs = cfg.heads_for(layer)
        h = 1.0 if hs is None else min(1.0, len(hs) / max(num_heads, 1))
        eff.append(h * float(d) + (1.0 - h))
    k = min(cfg.dense_steps, num_steps) / max(num_steps, 1)
    a = float(attention_fraction)
    return float(k + (1.0 - k) * ((1.0 - a) + a * float(np.mean(eff))))


def _key(cfg) -> str:
    from vidattn.plan_file import config_to_dict
    import json

    return json.dumps(config_to_dict(cfg), sort_keys=True, default=str)


class _Evaluator:
    def __init__(self, pipe, batch, dense_videos, need_ssim: bool, num_layers: int, num_heads: int, num_steps: int,
                 attn_frac: float, progress: bool):
        self.pipe, self.batch, self.dense = pipe, batch, dense_videos
        self.need_ssim = need_ssim
        self.L, self.H, self.N, self.a = num_layers, num_heads, num_steps, attn_frac
        self.cache: Dict[str, Dict[str, Any]] = {}
        self.progress = progress
        self.evals = 0

    def __call__(self, cfg, probe: bool = True) -> Dict[str, Any]:
        import vidattn

        from .compare import _sample
        from .probes import AttentionProbe

        k = _key(cfg)
        if k in self.cache:
            return self.cache[k]
        self.evals += 1
        handle = vidattn.apply(self.pipe, cfg)
        pr = AttentionProbe(sample_layers=None, sample_heads=None, max_queries=32) if probe else None
        try:
            if pr is not None:
                with pr:
                    run = _sample(self.pipe, self.batch, pr, None, False, "calibrate")
            else:
                run = _sample(self.pipe, self.batch, None, None, False, "calibrate")
            dens = dict(handle.token_densities)
        finally:
            vidattn.remove(self.pipe)
        v = run["videos"]
        psnrs = [M.psnr_video(self.dense[i], v[i]) for i in range(len(v))]
        ssims = [M.ssim(self.dense[i], v[i]) for i in range(len(v))] if self.need_ssim else None
        err: Dict[tuple, List[float]] = {}
        if pr is not None:
            for r in pr.records:
                err.setdefault((r["layer"], r["head"]), []).append(r["rel_l2"])
        res = dict(cfg=cfg, psnr=float(np.mean(psnrs)), psnr_min=float(np.min(psnrs)),
                   ssim=float(np.mean(ssims)) if ssims else None, densities=dens,
                   head_error={kk: float(np.mean(vv)) for kk, vv in err.items()},
                   cost=estimated_cost(cfg, dens, self.L, self.H, self.N, self.a))
        layer_err: Dict[int, List[float]] = {}
        for (layer, _h), e in res["head_error"].items():
            layer_err.setdefault(layer, []).append(e)
        res["layer_error"] = {kk: float(np.mean(vv)) for kk, vv in layer_err.items()}
        self.cache[k] = res
        return res


def _ok(res, target_psnr, target_ssim) -> bool:
    return res["psnr"] >= target_psnr and (target_ssim is None or (res["ssim"] is not None and res["ssim"] >= target_ssim))


def _describe(cfg) -> str:
    from vidattn.config import pattern_to_dict

    def pat(p):
        try:
            d = pattern_to_dict(p, only_changed=True)
        except TypeError:
            return type(p).__name__
        return d.pop("pattern") + "(" + ",".join(f"{k}={v}" for k, v in d.items()) + ")"

    parts = [pat(cfg.pattern)]
    if cfg.dense_steps:
        parts.append(f"dense_steps={cfg.dense_steps}")
    if cfg.dense_layers:
        parts.append(f"dense_layers={list(cfg.dense_layers)}")
    if cfg.layer_patterns:
        parts.append("layers{" + ",".join(f"{k}:{'dense' if v is None else pat(v)}" for k, v in cfg.layer_patterns.items()) + "}")
    if cfg.layer_heads:
        parts.append("heads{" + ",".join(f"{k}:{list(v) if v else v}" for k, v in cfg.layer_heads.items()) + "}")
    return " ".join(parts)


def calibrate(pipe, *, target_psnr: float, call_kwargs: Mapping[str, Any], target_ssim: Optional[float] = None,
              calib_seeds: Sequence[int] = (0, 1), heldout_seeds: Sequence[int] = (100, 101),
              families: Sequence[str] = FAMILIES, levels: Sequence[float] = (0.5, 0.75, 0.9),
              max_dense_steps: Optional[int] = None, max_evals: int = 40, max_measure: int = 3,
              timing_steps: int = 2, timing_warmup: int = 1, timing_repeats: int = 2, backend: str = "auto",
              batch_seeds: bool = True, out: Optional[str] = None, progress: bool = False,
              log=None) -> Dict[str, Any]:
    """Find the fastest static plan meeting ``target_psnr`` (and ``target_ssim``) on held-out seeds.

    Args:
        pipe: a diffusers video pipeline ``vidattn.apply`` supports (or the reference pipeline).
        target_psnr: dB, PSNR over the whole video vs dense, mean over seeds.
        call_kwargs: pipeline call (prompt, num_frames, height, width, num_inference_steps, ...).
        calib_seeds / heldout_seeds: seeds searched on / seeds the finalists must also pass (disjoint).
        families, levels: base presets (names from :func:`.presets.preset_names`) and sparsities.
        max_dense_steps: cap on dense first steps (default: half the steps).
        max_evals: quality evaluations allowed in the search (each = one batched sampling run).
        max_measure: finalists checked on held-out seeds and timed.
        timing_*: see :func:`.timing.time_steps`.
        out: write the plan file there (YAML/JSON) with the search summary as ``meta``.
    Returns: ``{"plan": SparseAttentionConfig, "best": description or "dense", "beats_dense": bool,
    "speedup": measured end-to-end speed-up (1.0 for dense), "heldout": {"psnr", "psnr_min", "ssim"},
    "finalists": [...], "searched": [...], "dense_timing": {...}, "attention_fraction": float,
    "grid": [...], "elapsed_s": float, "evals": int}``.
    """
    import vidattn

    from .compare import SeedBatch, _sample
    from .presets import fit_pattern
    from .run import discover_grid
    from .timing import time_configs, time_steps

    t_start = time.perf_counter()
    say = log or (lambda *a: None)
    if not target_psnr > 0:
        raise ValueError(f"target_psnr must be > 0 dB, got {target_psnr!r}")
    if set(calib_seeds) & set(heldout_seeds):
        raise ValueError(f"calib_seeds and heldout_seeds must be disjoint, got {list(calib_seeds)} and {list(heldout_seeds)}")
    call = {k: v for k, v in dict(call_kwargs).items() if k not in ("generator", "latents", "callback_on_step_end")}
    N = int(call.get("num_inference_steps", 20))
    max_k = N // 2 if max_dense_steps is None else int(max_dense_steps)
    grid = discover_grid(pipe, call)
    h0 = vidattn.apply(pipe, vidattn.Dense())
    L = len(h0.layer_names[0])
    vidattn.remove(pipe)
    H = int(getattr(pipe.transformer.config, "num_attention_heads", 1))
    cb, hb = SeedBatch(pipe, call, calib_seeds, batch_seeds), SeedBatch(pipe, call, heldout_seeds, batch_seeds)
    vidattn.remove(pipe)
    dense_c = _sample(pipe, cb, None, None, progress, "dense calib")["videos"]
    dense_h = _sample(pipe, hb, None, None, progress, "dense held-out")["videos"]
    td = time_steps(pipe, cb.timing_kwargs, steps=timing_steps, warmup=timing_warmup, repeats=timing_repeats)
    a = td["attention_s"] / td["step_s"] if td["step_s"] > 0 else 0.5
    say(f"grid {grid}, {L} layers x {H} heads, {N} steps; dense step {td['step_s']:.4f} s, attention {a:.0%} of it")
    ev = _Evaluator(pipe, cb, dense_c, target_ssim is not None, L, H, N, a, progress)

    from vidattn.pipelines.apply import SparseAttentionConfig

    bases = []
    for fam in families:
        for lv in levels:
            try:
                pat = fit_pattern(fam, lv, grid)
            except ValueError:
                continue
            cfg = SparseAttentionConfig(pat, backend=backend)
            r = ev(cfg)
            r["name"] = f"{fam}@{lv:g}"
            bases.append(r)
            say(f"  base {r['name']:<18} density {np.mean(list(r['densities'].values()) or [1]):.3f} "
                f"PSNR {r['psnr']:.2f} est.cost {r['cost']:.3f}")
    searched = list(bases)
    feasible = [r for r in bases if _ok(r, target_psnr, target_ssim) and r["cost"] < 1.0]

    def upgrades(res):
        cfg = res["cfg"]
        opts = []
        if cfg.dense_steps < max_k:
            inc = max(1, N // 10)
            opts.append(dataclasses.replace(cfg, dense_steps=min(max_k, cfg.dense_steps + inc)))
        le = {l: e for l, e in res["layer_error"].items() if cfg.pattern_for(l) is not None}
        if le:
            worst = max(le, key=le.get)
            opts.append(dataclasses.replace(cfg, dense_layers=tuple(sorted(set(cfg.dense_layers) | {worst}))))
            hs = cfg.heads_for(worst)
            cur = list(range(H)) if hs is None else list(hs)
            herr = {h: e for (l, h), e in res["head_error"].items() if l == worst and h in cur}
            if len(cur) > 1 and herr:
                wh = max(herr, key=herr.get)
                opts.append(dataclasses.replace(cfg, layer_heads={**cfg.layer_heads, worst: tuple(h for h in cur if h != wh)}))
            d_now = res["densities"].get(worst, 1.0)
            denser = [b for b in bases if np.mean(list(b["densities"].values()) or [1.0]) > d_now + 1e-6]
            if denser:
                best_b = max(denser, key=lambda b: b["psnr"])
                opts.append(dataclasses.replace(cfg, layer_patterns={**cfg.layer_patterns, worst: best_b["cfg"].pattern}))
        return opts

    for base in sorted(bases, key=lambda r: r["cost"]):
        cur = base
        while not _ok(cur, target_psnr, target_ssim) and cur["cost"] < 1.0 and ev.evals < max_evals:
            best, best_gain = None, None
            for cfg in upgrades(cur):
                if ev.evals >= max_evals:
                    break
                r = ev(cfg)
                r["name"] = _describe(cfg)
                searched.append(r)
                gain = (r["psnr"] - cur["psnr"]) / max(r["cost"] - cur["cost"], 1e-3)
                if best_gain is None or gain > best_gain:
                    best, best_gain = r, gain
            if best is None:
                break
            cur = best
            say(f"  repair {cur['name']:<60} PSNR {cur['psnr']:.2f} est.cost {cur['cost']:.3f}")
        if _ok(cur, target_psnr, target_ssim) and cur["cost"] < 1.0 and cur not in feasible:
            feasible.append(cur)
        if ev.evals >= max_evals:
            break

    # ------------------------------------------------------------------ finalists: held out, then timed
    uniq = {}
    for r in sorted(feasible, key=lambda r: r["cost"]):
        uniq.setdefault(_key(r["cfg"]), r)
    feasible = list(uniq.values())
    finalists = []
    evh = _Evaluator(pipe, hb, dense_h, target_ssim is not None, L, H, N, a, progress)
    for r in feasible:
        if len(finalists) >= max_measure:
            break
        h = evh(r["cfg"], probe=False)
        entry = dict(name=r.get("name") or _describe(r["cfg"]), cfg=r["cfg"], calib_psnr=r["psnr"], cost=r["cost"],
                     heldout_psnr=h["psnr"], heldout_psnr_min=h["psnr_min"], heldout_ssim=h["ssim"],
                     heldout_ok=_ok(h, target_psnr, target_ssim))
        finalists.append(entry)
    timed = [f for f in finalists if f["heldout_ok"]]
    timing = {}
    if timed:
        timing = time_configs(pipe, {f"f{i}": f["cfg"] for i, f in enumerate(timed)}, cb.timing_kwargs, num_steps=N,
                              steps=timing_steps, warmup=timing_warmup, repeats=timing_repeats)
        for i, f in enumerate(timed):
            t = timing[f"f{i}"]
            f.update(speedup=t["speedup"], step_speedup=t["step_speedup"], attention_speedup=t["attention_speedup"])
    winners = sorted([f for f in timed if (f.get("speedup") or 0) > 1.0], key=lambda f: -f["speedup"])
    if winners:
        w = winners[0]
        plan, best, speedup = w["cfg"], w["name"], w["speedup"]
        held = dict(psnr=w["heldout_psnr"], psnr_min=w["heldout_psnr_min"], ssim=w["heldout_ssim"])
    else:
        plan, best, speedup = dense_plan(L), "dense", 1.0
        held = dict(psnr=M.PSNR_CAP, psnr_min=M.PSNR_CAP, ssim=1.0)
    say(f"best: {best} (measured speed-up {speedup:.2f}x, held-out PSNR {held['psnr']:.2f} dB)")
    elapsed = time.perf_counter() - t_start

    def row(r):
        return dict(name=r.get("name") or _describe(r["cfg"]), psnr=r["psnr"], ssim=r["ssim"], cost=r["cost"],
                    density=float(np.mean(list(r["densities"].values()))) if r["densities"] else None)

    fin = [{k: v for k, v in f.items() if k != "cfg"} for f in finalists]
    result = dict(plan=plan, best=best, beats_dense=best != "dense", speedup=float(speedup), heldout=held,
                  target_psnr=float(target_psnr), target_ssim=target_ssim, finalists=fin,
                  searched=[row(r) for r in searched], dense_timing=timing.get("dense", td), attention_fraction=a,
                  grid=list(grid), elapsed_s=float(elapsed), evals=ev.evals + evh.evals,
                  calib_seeds=list(calib_seeds), heldout_seeds=list(heldout_seeds))
    if out:
        from vidattn.plan_file import save_plan

        meta = {k: result[k] for k in ("best", "beats_dense", "speedup", "heldout", "target_psnr", "target_ssim",
                                       "attention_fraction", "grid", "elapsed_s", "evals", "calib_seeds",
                                       "heldout_seeds")}
        meta["call_kwargs"] = {k: v for k, v in call.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
        meta["finalists"] = [{k: v for k, v in f.items() if isinstance(v, (int, float, str, bool, type(None)))} for f in fin]
        save_plan(plan, out, meta=jsonable(meta, nonfinite=lambda x: None))
        result["path"] = out
    return result
