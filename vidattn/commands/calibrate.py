"""`vidattn calibrate`: search the fastest static sparse-attention plan meeting a quality target."""

from __future__ import annotations

import json

from vidattn.pipelines.generate import ModelError

from . import UsageError, check_device, preset_list
from .harness_options import add_reference_version, add_harness_model, add_quiet_json, add_size_options, check_harness_model, harness_imports

__all__ = ["add_parser", "run"]


def add_parser(sub):
    c = sub.add_parser("calibrate", help="find the fastest static plan meeting a PSNR/SSIM target (writes plan.yaml)",
                       description="Search dense first steps, dense layers, dense heads and per-layer family/sparsity "
                                   "for the fastest plan whose quality vs dense on held-out seeds meets the target; "
                                   "speed is measured (dense re-timed in the same process; dense wins unless beaten). "
                                   "Run the result with vidattn.apply(pipe, vidattn.load_plan(PATH)).")
    add_harness_model(c)
    add_reference_version(c)
    c.add_argument("--target-psnr", type=float, required=True, help="dB, PSNR over the whole video vs dense (mean of seeds)")
    c.add_argument("--target-ssim", type=float, default=None)
    c.add_argument("--out", default="plan.yaml", help="plan file to write (.yaml/.yml/.json)")
    c.add_argument("--families", default="neighborhood,radial,grid,rectified", help="comma-separated presets")
    c.add_argument("--levels", default="0.5,0.75,0.9", help="comma-separated sparsity levels of the base candidates")
    c.add_argument("--calib-seeds", default="0,1")
    c.add_argument("--heldout-seeds", default="100,101")
    add_size_options(c)
    c.add_argument("--max-evals", type=int, default=40, help="quality evaluations allowed in the search")
    c.add_argument("--max-measure", type=int, default=3, help="finalists checked on held-out seeds and timed")
    c.add_argument("--device", default=None)
    c.add_argument("--dtype", default="float32", choices=("float32", "bf16", "bfloat16", "fp16", "float16"))
    c.add_argument("--backend", default="auto")
    add_quiet_json(c, "print the result summary as JSON")
    return c


def run(a) -> int:
    with harness_imports("calibrate"):
        import torch

        from vidattn.quality.calibration import calibrate
        from vidattn.quality.run import default_call, load_model, parse_seeds
    if not a.target_psnr > 0:
        raise UsageError(f"--target-psnr must be > 0 dB, got {a.target_psnr}")
    if not str(a.out).lower().endswith((".yaml", ".yml", ".json")):
        raise UsageError(f"--out must end in .yaml, .yml or .json, got {a.out!r}")
    fams = preset_list(a.families, "--families")
    try:
        levels = [float(x) for x in a.levels.split(",")]
        cs, hs = parse_seeds(a.calib_seeds), parse_seeds(a.heldout_seeds)
    except ValueError:
        raise UsageError("--levels must be floats, --calib-seeds/--heldout-seeds ints (comma-separated)") from None
    if not all(0 < x < 1 for x in levels):
        raise UsageError(f"--levels must be in (0, 1), got {a.levels!r}")
    if set(cs) & set(hs):
        raise UsageError("--calib-seeds and --heldout-seeds must be disjoint")
    check_device(a.device)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16}[a.dtype]
    check_harness_model(a.model)
    try:
        pipe = load_model(a.model, device=device, dtype=dtype, version=a.version)
    except FileNotFoundError as e:
        raise ModelError(f"--model {a.model}: {str(e).splitlines()[0]}") from None
    call = default_call(a.model, pipe, device)
    for k, v in (("num_frames", a.frames), ("height", a.height), ("width", a.width), ("num_inference_steps", a.steps)):
        if v is not None:
            if v < 1:
                raise UsageError(f"--{k} must be >= 1, got {v}")
            call[k] = v
    log = None if (a.quiet or a.json) else print
    try:
        res = calibrate(pipe, target_psnr=a.target_psnr, target_ssim=a.target_ssim, call_kwargs=call, calib_seeds=cs,
                        heldout_seeds=hs, families=fams, levels=levels, max_evals=a.max_evals,
                        max_measure=a.max_measure, backend=a.backend, out=a.out, log=log)
    except ValueError as e:
        raise UsageError(f"vidattn calibrate: {str(e).splitlines()[0]}") from None
    summary = {k: res[k] for k in ("best", "beats_dense", "speedup", "heldout", "elapsed_s", "evals", "path")}
    if a.json:
        print(json.dumps(summary, indent=2, default=str))
    elif not a.quiet:
        print(f"wrote {a.out}: {res['best']} (measured speed-up {res['speedup']:.2f}x, held-out PSNR "
              f"{res['heldout']['psnr']:.2f} dB, {res['evals']} evaluations, {res['elapsed_s']:.0f} s)")
    return 0
