"""`vidattn generate`: one video with sparse attention (and a dense comparison), with a speed/quality report."""

from __future__ import annotations

import json
import os
import sys
import time


from . import UsageError, check_device, check_out

__all__ = ["add_parser", "run", "PATTERN_FLAGS"]


PATTERN_FLAGS = {
    # flag dest -> (pattern field, parser, patterns that take it)
    "kernel_size": ("kernel_size", "ints", ("neighborhood",)),
    "dilation": ("dilation", "ints", ("neighborhood",)),
    "stride": ("stride", "ints", ("neighborhood",)),
    "decay_factor": ("decay_factor", float, ("radial",)),
    "sink_frames": ("sink_frames", int, ("radial",)),
    "dense_near_frames": ("dense_near_frames", int, ("radial",)),
    "keep": ("keep", float, ("rectified",)),
    "mass": ("mass", float, ("rectified",)),
    "no_rectify": ("rectify", "false", ("rectified",)),
    "recall": ("recall", float, ("grid",)),
    "spatial_frames": ("spatial_frames", int, ("grid",)),
    "block_size": ("block_size", int, None),
}


def add_parser(sub):
    g = sub.add_parser("generate", help="generate a video with sparse attention, with a speed/quality report",
                       description="Generate a video (mp4 + PNG frame grid) with sparse attention and write a report. "
                                   "With no --model, a built-in tiny random-weight Wan pipeline runs offline on CPU.")
    g.add_argument("--model", default="tiny-wan", help="tiny-wan (default), reference, or a local diffusers checkpoint dir")
    g.add_argument("--pattern", default=None, choices=["dense", "neighborhood", "radial", "grid", "rectified"],
                   help="attention pattern (default: neighborhood, or the one in --config)")
    g.add_argument("--config", default=None, help="pattern config file (.yaml/.yml/.json), same schema as the pattern "
                                                  "dataclasses: {pattern: neighborhood, kernel_size: [3, 5, 5]}")
    po = g.add_argument_group("pattern options (override --config)")
    po.add_argument("--kernel-size", help="neighborhood: int or per-axis T,H,W (default: about half of each token-grid axis, odd, >= 3)")
    po.add_argument("--dilation", help="neighborhood: int or T,H,W")
    po.add_argument("--stride", help="neighborhood: int or T,H,W")
    po.add_argument("--decay-factor", type=float, help="radial: band decay (Wan 0.2)")
    po.add_argument("--sink-frames", type=int, help="radial: frames visible to every query")
    po.add_argument("--dense-near-frames", type=int, help="radial: frame distances with the full band")
    po.add_argument("--keep", type=float, help="rectified: fraction of key blocks kept")
    po.add_argument("--mass", type=float, help="rectified: cumulative pooled-mass threshold")
    po.add_argument("--no-rectify", action="store_true", help="rectified: no pooled rectification")
    po.add_argument("--recall", type=float, help="grid: minimum sampled attention-mass recall of a sparse head")
    po.add_argument("--spatial-frames", type=int, help="grid: frame radius of the spatial candidate")
    po.add_argument("--block-size", type=int, help="plan block size (default: pattern's; 32 for the tiny model)")
    po.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other pattern field, e.g. --set tile_shape=1,4,4 (repeatable)")
    po.add_argument("--backend", default="auto", choices=["auto", "reference", "flex", "triton"])
    vo = g.add_argument_group("video")
    vo.add_argument("--prompt", default="a red ball bouncing on a wooden floor")
    vo.add_argument("--negative-prompt", default=None)
    vo.add_argument("--frames", type=int, default=None, help="Wan: 4k+1 (default 17; reference model: 8)")
    vo.add_argument("--height", type=int, default=None, help="Wan: multiple of 16 (default 128; reference: 32)")
    vo.add_argument("--width", type=int, default=None, help="Wan: multiple of 16 (default 128; reference: 32)")
    vo.add_argument("--steps", type=int, default=8)
    vo.add_argument("--guidance-scale", type=float, default=None)
    vo.add_argument("--seed", type=int, default=0)
    vo.add_argument("--fps", type=int, default=8)
    vo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    vo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--dense-steps", type=int, default=0, help="first N denoising steps stay dense")
    g.add_argument("--compare", default=None, choices=["dense"], help="also run dense and report quality vs it")
    g.add_argument("--out", required=True, help="output folder (must be empty or new unless --overwrite)")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bars, no table")
    g.add_argument("--json", action="store_true", help="print the report JSON on stdout")
    return g



DEFAULT_SIZES = {"wan": (17, 128, 128), "reference": (8, 32, 32)}


def _check_video_args(a, family):
    """Fill size defaults for ``family`` and check sizes (family None: generic checks only)."""
    if family is not None:
        for name, v in zip(("frames", "height", "width"), DEFAULT_SIZES.get(family, DEFAULT_SIZES["wan"])):
            if getattr(a, name) is None:
                setattr(a, name, v)
    for name in ("frames", "height", "width"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be >= 1, got {v}")
    if family == "wan":
        if (a.frames - 1) % 4:
            raise UsageError(f"--frames must be 4k+1 (1, 5, 9, 13, 17, ...), got {a.frames}")
        for name in ("height", "width"):
            v = getattr(a, name)
            if v < 16 or v % 16:
                raise UsageError(f"--{name} must be a positive multiple of 16, got {v}")
    elif family == "reference":
        for name in ("height", "width"):
            if getattr(a, name) % 2:
                raise UsageError(f"--{name} must be even for the reference model (2x2 patches), got {getattr(a, name)}")
    if a.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {a.steps}")
    if not 0 <= a.dense_steps <= a.steps:
        raise UsageError(f"--dense-steps must be in [0, --steps={a.steps}], got {a.dense_steps}")
    if a.fps < 1:
        raise UsageError(f"--fps must be >= 1, got {a.fps}")
    check_device(a.device)


def _pattern_config(a, grid, tiny: bool) -> dict:
    """Config dict ``{"pattern": name, ...}`` from --config and the pattern flags."""
    from vidattn.config import load_configs, parse_int_tuple, parse_value

    cfg = {}
    if a.config:
        cfgs = load_configs(a.config)
        if len(cfgs) != 1:
            raise UsageError(f"--config {a.config}: generate takes one config, the file holds {len(cfgs)}")
        cfg = dict(cfgs[0])
    name = a.pattern or cfg.get("pattern", "neighborhood")
    if a.pattern and cfg and cfg.get("pattern") != a.pattern:
        raise UsageError(f"--pattern {a.pattern} conflicts with pattern {cfg.get('pattern')!r} in --config {a.config}")
    cfg["pattern"] = name
    for dest, (field, kind, owners) in PATTERN_FLAGS.items():
        v = getattr(a, dest)
        if v is None or v is False:
            continue
        flag = "--" + dest.replace("_", "-")
        if owners is not None and name not in owners:
            raise UsageError(f"{flag} applies to --pattern {'/'.join(owners)}, not {name}")
        if kind == "ints":
            v = parse_int_tuple(v, flag)
        elif kind == "false":
            v = False
        cfg[field] = v
    for item in a.set:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        cfg[k.strip().replace("-", "_")] = parse_value(v)
    # defaults that fit the run's token grid when the user gave none
    if name == "neighborhood" and "kernel_size" not in cfg and grid is not None:
        cfg["kernel_size"] = [min(g, max(3, (g // 2) | 1)) for g in grid]  # ~half of each axis, odd, >= 3
    if tiny and name != "dense" and "block_size" not in cfg:
        cfg["block_size"] = 32  # the tiny grid has a few hundred tokens: 128-token blocks would be all-dense
    return cfg


def _explicit_fields(a) -> set:
    """Pattern fields the user set on the command line or in --config."""
    from vidattn.config import load_configs

    fields = {PATTERN_FLAGS[d][0] for d in PATTERN_FLAGS if getattr(a, d) not in (None, False)}
    fields |= {item.split("=", 1)[0].strip().replace("-", "_") for item in a.set}
    if a.config:
        fields |= set(load_configs(a.config)[0])
    return fields


def _summary_rows(report: dict):
    rows = []
    for r in report.get("runs", []):
        m = r.get("metrics") or {}
        psnr = ("inf" if m.get("identical") else f"{m['psnr_db']:.2f}") if "psnr_db" in m else "-"
        sp = r.get("speedup_vs_dense")
        rows.append((r["name"], f"{r.get('plan_density', 1.0):.3f}", f"{r.get('median_step_s', 0) * 1e3:.1f}",
                     f"{sp:.2f}x" if sp else "-", f"{r.get('total_s', 0):.2f}", psnr,
                     f"{m['ssim']:.4f}" if "ssim" in m else "-"))
    return rows


def _print_table(report: dict, file=None):
    file = file or sys.stdout
    head = ("config", "density", "ms/step (median)", "speedup", "total s", "PSNR dB", "SSIM")
    rows = [head] + _summary_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)


def _metrics(dense_frames, frames) -> dict:
    """PSNR/SSIM of ``frames`` vs ``dense_frames`` (float [F,H,W,C] in [0,1]); the harness's metrics
    when available, else PSNR from its definition and no SSIM."""
    import numpy as np

    try:
        from vidattn.quality.metrics import psnr_per_frame, ssim_per_frame

        p = [float(x) for x in np.asarray(psnr_per_frame(dense_frames, frames)).reshape(-1)]
        s = [float(x) for x in np.asarray(ssim_per_frame(dense_frames, frames)).reshape(-1)]
        out = dict(psnr_per_frame=p, ssim_per_frame=s, ssim=float(np.mean(s)), metrics_source="vidattn.quality.metrics")
    except ImportError:
        mse = ((dense_frames.astype(np.float64) - frames.astype(np.float64)) ** 2).reshape(len(frames), -1).mean(1)
        p = [float(10 * np.log10(1.0 / m)) if m > 0 else float("inf") for m in mse]
        out = dict(psnr_per_frame=p, metrics_source="vidattn.cli (harness metrics not available)")
    finite = [x for x in p if x != float("inf")]
    out["psnr_per_frame"] = [x if x != float("inf") else None for x in p]  # None: identical frame (strict JSON)
    out["psnr_db"] = float(np.mean(finite)) if finite else None
    out["identical"] = not finite
    return out


def _run_one(pipe, name, pattern, a, *, progress):
    from vidattn.pipelines.generate import generate

    handle = None
    if pattern is not None:
        import vidattn

        try:
            apply = vidattn.apply
        except (ImportError, AttributeError) as e:
            raise UsageError(f"--pattern {name}: the diffusers integration (vidattn.apply) is not available in this "
                             f"build ({e})") from None
        try:
            handle = apply(pipe, pattern, dense_steps=a.dense_steps, backend=a.backend)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--pattern {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        kw = {}
        if a.negative_prompt is not None:
            kw["negative_prompt"] = a.negative_prompt
        if a.guidance_scale is not None:
            kw["guidance_scale"] = a.guidance_scale
        res = generate(pipe, prompt=a.prompt, num_frames=a.frames, height=a.height, width=a.width, steps=a.steps,
                       seed=a.seed, progress=progress, call_kwargs=kw)
    finally:
        if handle is not None:
            import vidattn

            vidattn.remove(pipe)
    import numpy as np

    st = res["step_times_s"]
    res["name"] = name
    res["mean_step_s"] = float(np.mean(st)) if st else 0.0
    res["median_step_s"] = float(np.median(st)) if st else 0.0  # robust to the first step's warm-up
    return res


def run(a) -> int:
    import torch

    guess = "wan" if a.model in (None, "", "tiny", "tiny-wan") else "reference" if a.model == "reference" else None
    _check_video_args(a, guess)
    check_out(a.out, a.overwrite)
    from vidattn.config import pattern_from_dict, pattern_to_dict
    from vidattn.pipelines.generate import load_pipeline, token_grid
    from vidattn.pipelines.video_io import atomic_write_json, write_mp4, write_png_grid

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype)
    tiny = a.model in (None, "", "tiny", "tiny-wan")
    # validate the pattern config before the (slow) model load, on the expected grid
    grid_guess = ((a.frames - 1) // 4 + 1, a.height // 16, a.width // 16) if guess == "wan" else \
        (a.frames, a.height // 2, a.width // 2) if guess == "reference" else None
    try:
        cfg = _pattern_config(a, grid_guess, tiny)
    except (ValueError, TypeError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(str(e)) from None
    try:
        pattern = pattern_from_dict(cfg)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--pattern {cfg['pattern']}: {e}") from None
    t_load = time.perf_counter()
    pipe, family = load_pipeline(a.model, dtype=dtype, device=device, seed=0)
    load_s = time.perf_counter() - t_load
    if guess is None:
        _check_video_args(a, family)
    grid = token_grid(pipe, a.frames, a.height, a.width)
    if cfg["pattern"] == "neighborhood" and grid_guess is None and "kernel_size" not in _explicit_fields(a):
        cfg["kernel_size"] = [min(g, max(3, (g // 2) | 1)) for g in grid]
        pattern = pattern_from_dict(cfg)
    from vidattn.layout import TokenLayout

    try:
        pattern.validate(TokenLayout(grid))
    except (ValueError, TypeError) as e:
        raise UsageError(f"--pattern {cfg['pattern']} on token grid {grid}: {e}") from None
    progress = not (a.quiet or a.json)
    is_dense = cfg["pattern"] == "dense"
    harness = _harness() if a.compare == "dense" and not is_dense else None
    runs = []
    if a.compare == "dense" and not is_dense and harness is None:
        runs.append(_run_one(pipe, "dense", None, a, progress=progress))  # fallback: the CLI compares itself
    main_run = _run_one(pipe, cfg["pattern"], None if is_dense else pattern, a, progress=progress)
    runs.append(main_run)
    if len(runs) == 2:
        base = runs[0]["frames"]
        runs[1]["metrics"] = _metrics(base, runs[1]["frames"])
        runs[1]["speedup_vs_dense"] = runs[0]["median_step_s"] / max(runs[1]["median_step_s"], 1e-12)
    os.makedirs(a.out, exist_ok=True)
    write_mp4(main_run["frames"], os.path.join(a.out, "video.mp4"), fps=a.fps)
    write_png_grid(main_run["frames"], os.path.join(a.out, "frames.png"))
    files = dict(video="video.mp4", frames="frames.png", report="report.json")
    if len(runs) == 2:
        write_mp4(runs[0]["frames"], os.path.join(a.out, "dense.mp4"), fps=a.fps)
        files["dense_video"] = "dense.mp4"
    gen = dict(
        schema="vidattn.generate/1", created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=a.model, family=family, device=device, dtype=a.dtype, load_s=round(load_s, 3),
        settings=dict(prompt=a.prompt, frames=a.frames, height=a.height, width=a.width, steps=a.steps, seed=a.seed,
                      dense_steps=a.dense_steps, backend=a.backend, token_grid=list(grid)),
        config=pattern_to_dict(pattern), compare=a.compare, files=files,
        runs=[{k: v for k, v in r.items() if k != "frames"} for r in runs])
    if harness is not None:
        report = _harness_report(harness, pipe, a, cfg["pattern"], pattern, progress)
        files.update(html="report.html", side_by_side="side_by_side.mp4")
        report["generate"] = gen  # extra key: the harness schema allows it
        harness[1](report)
        table = _harness_table(report, main_run)
    else:
        report = gen
        table = report
    atomic_write_json(os.path.join(a.out, "report.json"), report, allow_nan=False)
    if a.json:
        print(json.dumps(report, indent=2))
    elif not a.quiet:
        _print_table(table)
        print(f"wrote {a.out}: " + ", ".join(files.values()))
    return 0


def _harness():
    """``(run_comparison, validate_report)`` of the quality harness, or None when not installed."""
    try:
        from vidattn.quality.compare import run_comparison
        from vidattn.quality.report import validate_report
    except ImportError:
        return None
    return run_comparison, validate_report


def _harness_report(harness, pipe, a, name, pattern, progress) -> dict:
    """Dense baseline and ``pattern`` through the quality harness; it writes report.json,
    report.html and side_by_side.mp4 into ``--out`` and returns the report dict."""
    from vidattn.pipelines.generate import default_call_kwargs

    call_kwargs = dict(prompt=a.prompt, num_frames=a.frames, height=a.height, width=a.width,
                       num_inference_steps=a.steps, **default_call_kwargs(pipe))
    if a.negative_prompt is not None:
        call_kwargs["negative_prompt"] = a.negative_prompt
    if a.guidance_scale is not None:
        call_kwargs["guidance_scale"] = a.guidance_scale
    return harness[0](pipe, {name: pattern}, call_kwargs=call_kwargs, seed=a.seed, out_dir=a.out, progress=progress,
                      apply_kwargs=dict(dense_steps=a.dense_steps, backend=a.backend), model_name=a.model)


def _harness_table(report: dict, main_run: dict) -> dict:
    """The summary table's rows from a harness report."""
    import numpy as np

    d = report["dense"]
    runs = [dict(name="dense", plan_density=1.0, median_step_s=float(np.median(d["step_times_s"] or [0])),
                 total_s=d["wall_s"])]
    for c in report["configs"]:
        m = c.get("metrics") or {}
        med = float(np.median(c["step_times_s"] or [0]))
        runs.append(dict(name=c["name"], plan_density=(c.get("density") or {}).get("token") or 1.0, median_step_s=med,
                         total_s=c["wall_s"], speedup_vs_dense=runs[0]["median_step_s"] / max(med, 1e-12),
                         metrics=dict(psnr_db=m.get("psnr"), ssim=m.get("ssim"),
                                      identical=m.get("psnr") in (None, float("inf")))))
    return dict(runs=runs)
