"""The Pareto table: every family preset (+ a calibrated plan) at several sparsities, quality and speed
measured on the same configurations.

    python -m vidattn.quality.pareto --model reference --version 2 --levels 0.5,0.75,0.9 \\
        --seeds 0,1,2,3 --device cuda --dtype bf16 --plan plan_v2.yaml --out pareto_v2

For every preset in ``--families`` (default: every name :func:`.presets.preset_names` knows, i.e.
the built-in families and every pattern in the registry) at every level, fitted to the model's
token grid, plus the plan file given by ``--plan`` (row ``calibrated``): token density, PSNR and
SSIM (mean and std over the seeds, which run as one batch), dB above the strongest floor, temporal
warp error, the per-step divergence (latent and predicted-clean PSNR vs dense at every step), and
the attention-call, step and full-run speed-ups measured in the same process (dense re-timed,
warm-up excluded, probes off). Writes ``OUT/report.json|html``, ``OUT/side_by_side.mp4``,
``OUT/pareto.json`` (the rows) and ``OUT/pareto.md`` (the table, with the command that made it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["pareto_rows", "format_markdown", "run_pareto", "main"]


def _at(traj: Optional[List], frac: float):
    if not traj:
        return None
    i = min(len(traj) - 1, max(0, int(round(frac * (len(traj) - 1)))))
    return traj[i]


def pareto_rows(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per config of a comparison report (see the module docstring for the columns)."""
    rows = []
    for c in report["configs"]:
        m, t, tr = c["metrics"], c.get("timing") or {}, c.get("trajectory") or {}
        lat = tr.get("latent_psnr") or []
        x0 = tr.get("x0_psnr") or []
        fin = [v for v in lat if v is not None]
        rows.append(dict(
            name=c["name"], pattern=c["pattern"], token_density=c["density"]["token"],
            psnr=m["psnr"], psnr_std=m.get("psnr_std"), psnr_min=m.get("psnr_min"), ssim=m["ssim"],
            ssim_std=m.get("ssim_std"), above_floor_db=m.get("above_floor_db"),
            ssim_above_floor=m.get("ssim_above_floor"), temporal_warp_error=m["temporal_warp_error"],
            temporal_warp_error_dense=m.get("temporal_warp_error_ref"),
            latent_psnr_quarter=_at(lat, 0.25), latent_psnr_half=_at(lat, 0.5), latent_psnr_min=min(fin) if fin else None,
            x0_psnr_quarter=_at(x0, 0.25), latent_psnr_per_step=lat, x0_psnr_per_step=x0,
            attention_rel_l2=(c.get("attention") or {}).get("rel_l2"),
            attention_speedup=t.get("attention_speedup"), step_speedup=t.get("step_speedup"),
            run_speedup=c.get("speedup"), dense_steps=(c.get("config") or {}).get("dense_steps")))
    return rows


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def format_markdown(report: Dict[str, Any], rows: List[Dict[str, Any]], command: str = "") -> str:
    """The Pareto table as Markdown (plus the floors, settings and the command)."""
    s = report["settings"]
    fl = report["dense"].get("floors") or {}
    env = report.get("environment") or {}
    out = [f"Model {report['model']['name']} ({report['model']['class']}), grid {report.get('grid')}, "
           f"call {json.dumps(s['call_kwargs'], default=str)}, seeds {s['seeds']} (batched: {s['batched']}), "
           f"{s['device']} {s['dtype']} {env.get('cuda_device') or ''}".rstrip(), ""]
    if command:
        out += ["Command: `" + command + "`", ""]
    out += ["| config | token density | PSNR dB (mean ± std) | SSIM (mean ± std) | dB above floor | warp err "
            "(dense) | latent PSNR @25% / 50% steps | x0 PSNR @25% | attn speed-up | step speed-up | run speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {_f(r['token_density'], '.3f')} | {_f(r['psnr'], '.2f')} ± {_f(r['psnr_std'], '.2f')}"
                   f" | {_f(r['ssim'], '.3f')} ± {_f(r['ssim_std'], '.3f')} | {_f(r['above_floor_db'], '+.2f')}"
                   f" | {_f(r['temporal_warp_error'], '.4f')} ({_f(r['temporal_warp_error_dense'], '.4f')})"
                   f" | {_f(r['latent_psnr_quarter'], '.1f')} / {_f(r['latent_psnr_half'], '.1f')}"
                   f" | {_f(r['x0_psnr_quarter'], '.1f')} | {_f(r['attention_speedup'], '.2f')}x"
                   f" | {_f(r['step_speedup'], '.2f')}x | {_f(r['run_speedup'], '.2f')}x |")
    if fl:
        out += ["", "Floors (PSNR dB / SSIM of a trivial stand-in vs dense): "
                + ", ".join(f"{k} {v['psnr']:.2f} / {v['ssim']:.3f}" for k, v in fl.items())
                + "; dB above floor = PSNR - the highest floor PSNR."]
    return "\n".join(out) + "\n"


def run_pareto(model: str = "reference", version: Optional[int] = None, families: Optional[Sequence[str]] = None,
               levels: Sequence[float] = (0.5, 0.75, 0.9), seeds: Sequence[int] = (0, 1, 2, 3), out: str = "pareto",
               device: str = "cpu", dtype: str = "float32", plan: Optional[str] = None,
               calibrate_target: Optional[float] = None, frames: Optional[int] = None, height: Optional[int] = None,
               width: Optional[int] = None, steps: Optional[int] = None, use_cache: bool = True,
               probes: bool = True, progress: bool = True, timing_steps: int = 2, timing_repeats: int = 2,
               command: str = "") -> Dict[str, Any]:
    """Run the table (module docstring); returns ``{"report", "rows", "paths", "elapsed_s"}``."""
    import torch

    import vidattn

    from .presets import preset_names
    from .run import load_model, run_quality

    t0 = time.perf_counter()
    td = {"float32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
    if dtype not in td:
        raise ValueError(f"dtype must be one of {sorted(td)}, got {dtype!r}")
    fams = list(families) if families else list(preset_names())
    pipe = load_model(model, device=device, dtype=td[dtype], version=version)
    extra = {}
    if plan:
        extra["calibrated"] = vidattn.load_plan(plan)
    elif calibrate_target is not None:
        from .calibration import calibrate
        from .run import default_call

        call = default_call(model, pipe, device)
        for k, v in (("num_frames", frames), ("height", height), ("width", width), ("num_inference_steps", steps)):
            if v is not None:
                call[k] = v
        os.makedirs(out, exist_ok=True)
        res = calibrate(pipe, target_psnr=float(calibrate_target), call_kwargs=call,
                        out=os.path.join(out, "calibrated_plan.yaml"), log=print if progress else None)
        extra["calibrated"] = res["plan"]
    rep = run_quality(model, fams, out, sparsity=list(levels), num_frames=frames, height=height, width=width,
                      steps=steps, seeds=list(seeds), device=device, dtype=td[dtype], use_cache=use_cache,
                      probes=probes, progress=progress, pipe=pipe, extra_configs=extra,
                      timing_steps=timing_steps, timing_repeats=timing_repeats)
    rows = pareto_rows(rep)
    elapsed = time.perf_counter() - t0
    paths = {"json": os.path.join(out, "pareto.json"), "md": os.path.join(out, "pareto.md")}
    with open(paths["json"], "w") as fh:
        json.dump({"rows": rows, "settings": rep["settings"], "floors": rep["dense"].get("floors"),
                   "environment": rep.get("environment"), "grid": rep.get("grid"), "elapsed_s": elapsed,
                   "command": command}, fh, indent=2, default=str)
    with open(paths["md"], "w") as fh:
        fh.write(format_markdown(rep, rows, command))
    return {"report": rep, "rows": rows, "paths": paths, "elapsed_s": elapsed}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidattn.quality.pareto", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference", help="reference (default), tiny-wan or a local checkpoint dir")
    p.add_argument("--version", type=int, default=None, help="reference model version (1 or 2)")
    p.add_argument("--families", default=None, help="comma-separated presets (default: every known preset/pattern)")
    p.add_argument("--levels", default="0.5,0.75,0.9", help="comma-separated target sparsities")
    p.add_argument("--seeds", default="0,1,2,3", help="seeds, batched (e.g. 0,1,2,3 or 0-3)")
    p.add_argument("--plan", default=None, help="a plan file (vidattn calibrate) added as the row 'calibrated'")
    p.add_argument("--calibrate-target", type=float, default=None,
                   help="run vidattn.quality.calibrate first with this PSNR target (when no --plan)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32 | bf16 | fp16")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--timing-repeats", type=int, default=2)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-probes", action="store_true")
    p.add_argument("--precision", choices=("fp8", "int8", "int8_fp8"), default=None,
                   help="precision of vidattn's sparse calls (default: the model's dtype): triton on CUDA, compute "
                        "capability >= 8.9 (the dense reference is unchanged); fp8: e4m3 Q.K^T and P.V, int8: int8 "
                        "Q.K^T and 16-bit P.V, int8_fp8: int8 Q.K^T and e4m3 P.V")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default="pareto")
    a = p.parse_args(argv)
    from .run import parse_seeds

    levels = [float(x) for x in a.levels.split(",") if x.strip()]
    if not levels or not all(0 < x < 1 for x in levels):
        p.error(f"--levels must be floats in (0, 1), got {a.levels!r}")
    fams = [f.strip() for f in a.families.split(",") if f.strip()] if a.families else None
    cmd = "python -m vidattn.quality.pareto " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    from vidattn.attention import precision

    with precision(a.precision):
        res = run_pareto(a.model, a.version, fams, levels, parse_seeds(a.seeds), a.out, a.device, a.dtype, a.plan,
                         a.calibrate_target, a.frames, a.height, a.width, a.steps, use_cache=not a.no_cache,
                         probes=not a.no_probes, progress=not a.quiet, timing_repeats=a.timing_repeats, command=cmd)
    if not a.quiet:
        print(open(res["paths"]["md"]).read())
        print(f"wrote {res['paths']['md']}, {res['paths']['json']} and the report in {a.out} "
              f"({res['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
