"""`vidattn generate`: parse and check the arguments, then run :mod:`vidattn.pipelines.generate_job`.

The job (runs, timing, metrics, report and files) lives in the job module; this module only
turns the command line into a pattern, :class:`~vidattn.pipelines.generate_job.GenerateSettings`
and an :class:`~vidattn.pipelines.output_set.OutputSet` (checked writable before the model
loads), and prints the summary table.
"""

from __future__ import annotations

import json
import sys
import time

from . import UsageError, check_device

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


CACHE_HELP = ("Dense-baseline cache (--compare dense): the dense run's frames and latents are stored in "
              "--cache-dir (default $VIDATTN_CACHE_DIR or ~/.cache/vidattn/dense), keyed by the model's weights "
              "checksum, the call settings, the seed, device, dtype and torch version; a later run with the same "
              "key reuses them instead of generating dense again. Timings never come from the cache: the speed "
              "column is measured in this run (one warm-up step, then --timing-steps timed steps, dense and "
              "sparse the same way). Delete the folder to clear it; --no-cache neither reads nor writes it.")


def _pattern_names():
    from vidattn.config import PATTERN_NAMES

    return PATTERN_NAMES


def add_parser(sub):
    g = sub.add_parser("generate", help="generate a video with sparse attention, with a speed/quality report",
                       description="Generate a video (browser-playable mp4/webm + PNG frame grid) with sparse "
                                   "attention and write a report. With no --model the built-in reference video "
                                   "model v2 runs (trained weights, offline; CPU is fine at the default size).",
                       epilog=CACHE_HELP)
    g.add_argument("--model", default="reference",
                   help="reference (default: the shipped reference DiT v2), reference-v1, reference-v2, tiny "
                        "(random-weight tiny Wan pipeline, for tests), or a local diffusers checkpoint folder")
    g.add_argument("--pattern", default=None, choices=list(_pattern_names()),
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
    po.add_argument("--block-size", type=int, help="plan block size, a positive multiple of 16 (default: the "
                                                   "pattern's; 32 for the tiny model)")
    po.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other pattern field, e.g. --set tile_shape=1,4,4 (repeatable)")
    po.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "flex", "triton"],
                    help="vidattn backend (auto: triton on CUDA, reference on CPU); the report records the one "
                         "that ran")
    vo = g.add_argument_group("video")
    vo.add_argument("--prompt", default=None, help="text prompt (reference v2: '<scene> <motion>', e.g. 'cat pan', "
                                                   "scenes/motions in vidattn.quality.reference_model.photo_motion; "
                                                   "default: 'cat pan' for reference, a sentence for Wan)")
    vo.add_argument("--negative-prompt", default=None, help="negative prompt for classifier-free guidance")
    vo.add_argument("--frames", type=int, default=None, help="Wan: 4k+1 (default 17); reference: any >= 1 "
                                                             "(default 8 on CPU, 16 on CUDA)")
    vo.add_argument("--height", type=int, default=None, help="Wan: multiple of 16 (default 128); reference: multiple "
                                                             "of the patch (v2: 4; default 64 on CPU, 96 on CUDA)")
    vo.add_argument("--width", type=int, default=None, help="like --height")
    vo.add_argument("--steps", type=int, default=None, help="denoising steps (default: reference 10 on CPU, 20 on "
                                                            "CUDA; Wan 8)")
    vo.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale (default: "
                                                                      "the model's)")
    vo.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    vo.add_argument("--fps", type=int, default=8, help="frames per second of the written videos (default 8)")
    vo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights/activations dtype (default float32)")
    vo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--dense-steps", type=int, default=0, help="first N denoising steps stay dense")
    g.add_argument("--compare", default=None, choices=["dense"],
                   help="also run dense (once, or from the cache) and report quality and measured speed vs it")
    g.add_argument("--timing-steps", type=int, default=3,
                   help="--compare: timed denoising steps per side after 1 warm-up step (default 3; 0: no timing)")
    g.add_argument("--cache-dir", default=None, help="dense-baseline cache folder (see below)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the dense-baseline cache")
    g.add_argument("--out", required=True, help="output folder: new or empty (or a previous run's, with --overwrite)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's output folder as a whole (no stale file of it remains)")
    g.add_argument("--quiet", action="store_true", help="no progress bars, no loading messages, no table")
    g.add_argument("--json", action="store_true", help="print the report JSON on stdout")
    return g


WAN_DEFAULTS = dict(frames=17, height=128, width=128, steps=8, prompt="a red ball bouncing on a wooden floor")


def _reference_defaults(version: int, cuda: bool) -> dict:
    """Sizes, steps and prompt of the reference model ``version``: its training size on CUDA,
    its config's ``sampling.cpu`` size on CPU (v2: 8 x 64 x 64, 10 steps)."""
    from vidattn.quality.reference_model.model import load_config

    cfg = load_config(version=version)
    smp = cfg.get("sampling", {})
    video = cfg.get("video", {})
    d = dict(frames=video.get("frames", 8), height=video.get("height", 32), width=video.get("width", 32),
             steps=smp.get("num_inference_steps", 20))
    if not cuda and "cpu" in smp:
        c = smp["cpu"]
        d.update(frames=c.get("num_frames", d["frames"]), height=c.get("height", d["height"]),
                 width=c.get("width", d["width"]), steps=c.get("num_inference_steps", d["steps"]))
    d["prompt"] = "cat pan" if cfg.get("text") else ""
    d["patch"] = tuple(cfg["transformer"]["patch_size"])
    return d


def _defaults(family, model, cuda):
    from vidattn.pipelines.generate import reference_version

    if family == "wan":
        return dict(WAN_DEFAULTS, patch=(1, 2, 2))
    if family == "reference":
        return _reference_defaults(reference_version(model) or 1, cuda)
    return dict(WAN_DEFAULTS, patch=None)


def _check_video_args(a, family, cuda=False):
    """Fill defaults for ``family`` and check sizes (family None: generic checks only)."""
    if family is not None:
        d = _defaults(family, a.model, cuda)
        for name in ("frames", "height", "width", "steps", "prompt"):
            if getattr(a, name) is None:
                setattr(a, name, d[name])
        a._patch = d["patch"]
    for name in ("frames", "height", "width", "steps"):
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
        ph, pw = a._patch[1:]
        for name, p in (("height", ph), ("width", pw)):
            if getattr(a, name) % p:
                raise UsageError(f"--{name} must be a multiple of {p} for this reference model ({p}x{p} patches), "
                                 f"got {getattr(a, name)}")
    if a.steps is not None and not 0 <= a.dense_steps <= a.steps:
        raise UsageError(f"--dense-steps must be in [0, --steps={a.steps}], got {a.dense_steps}")
    if a.fps < 1:
        raise UsageError(f"--fps must be >= 1, got {a.fps}")
    if a.timing_steps < 0:
        raise UsageError(f"--timing-steps must be >= 0, got {a.timing_steps}")
    check_device(a.device)


def _grid_guess(a, family):
    """Token grid expected for the run before the model loads (None when unknown)."""
    if family == "wan":
        return ((a.frames - 1) // 4 + 1, a.height // 16, a.width // 16)
    if family == "reference":
        pt, ph, pw = a._patch
        return (-(-a.frames // pt), a.height // ph, a.width // pw)
    return None


def _plan_file(a):
    """The :class:`~vidattn.SparseAttentionConfig` of ``--config`` when it is a plan file written by
    ``vidattn calibrate`` / ``vidattn.save_plan`` (a ``version`` key and a nested ``pattern``
    mapping), else None (a plain pattern config)."""
    if not a.config:
        return None
    import yaml

    try:
        with open(a.config) as fh:
            doc = yaml.safe_load(fh)  # JSON is YAML
    except (OSError, yaml.YAMLError):
        return None  # reported by the pattern-config reader with its own message
    if not (isinstance(doc, dict) and "version" in doc and isinstance(doc.get("pattern"), dict)):
        return None
    from vidattn.plan_file import load_plan

    if a.pattern or a.dense_steps:
        raise UsageError(f"--config {a.config} is a plan file (it sets the pattern and dense steps itself): "
                         "drop --pattern / --dense-steps")
    try:
        return load_plan(a.config)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _plan_dict(plan) -> dict:
    from vidattn.plan_file import config_to_dict

    return {"pattern": "plan", "plan": config_to_dict(plan)}


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
    if cfg.get("block_size") is not None and (not isinstance(cfg["block_size"], int) or cfg["block_size"] < 16
                                              or cfg["block_size"] % 16):
        raise UsageError(f"--block-size must be a positive multiple of 16, got {cfg['block_size']!r}")
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


def _fmt(x, f):
    return "-" if x is None else format(x, f)


def _table_rows(report: dict):
    """(config, density, ms/step, attention ms/step, speedup, Amdahl bound, PSNR, SSIM) rows."""
    gen = report.get("generate", report)
    timing = gen.get("timing")
    by_name = {c["name"]: c for c in report.get("configs", [])}
    rows = []
    for r in gen.get("runs", []):
        side = None
        if timing:
            side = timing["dense"] if r["name"] == "dense" else timing["sparse"]
        step_ms = side["step_ms"] if side else (r.get("median_step_s") or 0) * 1e3 or None
        m = (by_name.get(r["name"]) or {}).get("metrics") or {}
        sp = timing.get("step_speedup") if timing and r["name"] != "dense" else None
        bound = timing.get("amdahl_bound") if timing and r["name"] != "dense" else None
        rows.append((r["name"] + (" (cached video)" if r.get("cached") else ""), _fmt(r.get("plan_density"), ".3f"),
                     _fmt(step_ms, ".1f"), _fmt(side.get("attention_ms") if side else None, ".1f"),
                     f"{sp:.2f}x" if sp else "-", f"{bound:.2f}x" if bound else "-",
                     _fmt(m.get("psnr"), ".2f"), _fmt(m.get("ssim"), ".4f")))
    return rows


def _print_table(report: dict, file=None):
    file = file or sys.stdout
    head = ("config", "density", "ms/step", "attn ms/step", "speedup", "Amdahl max", "PSNR dB", "SSIM")
    rows = [head] + _table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)
    gen = report.get("generate", report)
    t = gen.get("timing")
    if t:
        print(f"speed: median of {t['sparse']['steps_timed']} steps after {t['sparse']['warmup_steps']} warm-up step, "
              f"dense and sparse timed the same way in this run (never from the cache); Amdahl max = "
              f"1 / (1 - dense attention share)", file=file)
        if t.get("step_speedup") and t.get("amdahl_bound") and t["step_speedup"] > 1.05 * t["amdahl_bound"]:
            print(f"note: the step speedup {t['step_speedup']:.2f}x exceeds its Amdahl bound "
                  f"{t['amdahl_bound']:.2f}x: timing noise (a busy machine?); try more --timing-steps", file=file)
    b = gen.get("backend") or {}
    if b.get("ran"):
        print(f"backend: {b['ran']} (requested {b['requested']})", file=file)


def _quiet_libraries() -> None:
    """Silence diffusers' / transformers' loading bars and info messages (--quiet, --json)."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def run(a) -> int:
    import torch

    from vidattn.pipelines.generate import REFERENCE_MODELS, TINY_MODELS
    from vidattn.pipelines.output_set import OutputError, OutputSet

    model = a.model or "reference"
    a.model = model
    tiny = model in TINY_MODELS
    guess = "wan" if tiny else "reference" if model in REFERENCE_MODELS else None
    cuda = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    _check_video_args(a, guess, cuda)
    try:
        out = OutputSet(a.out, a.overwrite)  # writable? checked before the model loads
    except OutputError as e:
        raise UsageError(str(e)) from None
    with out:
        report = _run_staged(a, out, tiny, guess, cuda)
        out.commit()
    if a.json:
        print(json.dumps(report, indent=2))
    elif not a.quiet:
        _print_table(report)
        print(f"wrote {a.out}: " + ", ".join(report.get("generate", report)["files"].values()))
    return 0


def _run_staged(a, out, tiny, guess, cuda) -> dict:
    import torch

    from vidattn.config import pattern_from_dict, pattern_to_dict
    from vidattn.layout import TokenLayout
    from vidattn.pipelines.generate import load_pipeline, token_grid
    from vidattn.pipelines.generate_job import GenerateSettings, default_cache_dir, run_generate
    from vidattn.pipelines.output_set import OutputError

    device = a.device or ("cuda" if cuda else "cpu")
    dtype = getattr(torch, a.dtype)
    grid_guess = _grid_guess(a, guess)
    plan = _plan_file(a)
    try:  # validate the pattern config before the (slow) model load, on the expected grid
        if plan is not None:
            cfg, pattern = {"pattern": "plan"}, plan
        else:
            cfg = _pattern_config(a, grid_guess, tiny)
            pattern = pattern_from_dict(cfg)
    except UsageError:
        raise
    except (ValueError, TypeError) as e:
        raise UsageError(f"--pattern {a.pattern or 'neighborhood'}: {e}") from None
    if a.quiet or a.json:
        _quiet_libraries()
    t_load = time.perf_counter()
    pipe, family = load_pipeline(a.model, dtype=dtype, device=device, seed=0)
    load_s = time.perf_counter() - t_load
    if guess is None:
        _check_video_args(a, family, cuda)
    grid = token_grid(pipe, a.frames, a.height, a.width)
    if cfg["pattern"] == "neighborhood" and grid_guess is None and "kernel_size" not in _explicit_fields(a):
        cfg["kernel_size"] = [min(g, max(3, (g // 2) | 1)) for g in grid]
        pattern = pattern_from_dict(cfg)
    try:
        for p_ in (plan.patterns() if plan is not None else [pattern]):
            p_.validate(TokenLayout(grid))
    except (ValueError, TypeError) as e:
        raise UsageError(f"--pattern {cfg['pattern']} on token grid {grid}: {e}") from None
    s = GenerateSettings(prompt=a.prompt, frames=a.frames, height=a.height, width=a.width, steps=a.steps, seed=a.seed,
                         negative_prompt=a.negative_prompt, guidance_scale=a.guidance_scale, fps=a.fps,
                         dense_steps=a.dense_steps, backend=a.backend)
    is_dense = cfg["pattern"] == "dense"
    try:
        return run_generate(pipe, family, None if is_dense else pattern, s, out, pattern_name=cfg["pattern"],
                            compare=a.compare == "dense", cache_dir=None if a.no_cache else (a.cache_dir or default_cache_dir()),
                            timing_steps=a.timing_steps, progress=not (a.quiet or a.json), model_name=a.model,
                            load_s=load_s, dtype_name=a.dtype, token_grid=grid,
                            config=_plan_dict(plan) if plan is not None else pattern_to_dict(pattern))
    except OutputError as e:
        raise UsageError(str(e)) from None
