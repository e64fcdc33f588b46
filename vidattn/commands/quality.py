"""`vidattn quality`: the sparse-vs-dense quality harness on a model."""

from __future__ import annotations

import os

from vidattn.pipelines.generate import ModelError

from . import UsageError, check_device, check_out, preset_list
from .harness_options import add_reference_version, add_harness_model, add_quiet_json, add_size_options, check_harness_model, harness_imports

__all__ = ["add_parser", "run"]


def add_parser(sub):
    q = sub.add_parser("quality", help="sparse vs dense quality harness (report.json/report.html/side_by_side.mp4)",
                       description="Run dense once and one config per pattern family at a target sparsity, with "
                                   "PSNR/SSIM/temporal/attention-level errors and timings (the quality harness).")
    add_harness_model(q)
    q.add_argument("--patterns", default="neighborhood,radial,grid,rectified",
                   help="comma-separated presets (pattern families, fitted to the model's token grid; default: the four "
                        "built-in families)")
    q.add_argument("--sparsity", default="0.75", help="target sparsity, or comma-separated levels (e.g. 0.5,0.75,0.9)")
    add_size_options(q)
    q.add_argument("--seed", type=int, default=None, help="first seed (4 seeds from it) unless --seeds is given")
    q.add_argument("--seeds", default=None, help="seeds, e.g. 0,1,2,3 or 0-3 (default 0-3), batched")
    add_reference_version(q)
    q.add_argument("--attention-stats", action="store_true",
                   help="also measure the attention structure (quality/attention_stats.py) into the report and print it")
    q.add_argument("--no-cache", action="store_true", help="do not read or write the dense-video cache")
    q.add_argument("--precision", choices=("fp8", "int8", "int8_fp8"), default=None,
                   help="precision of vidattn's sparse calls (default: the model's dtype, fp32 accumulate), on the "
                        "triton backend, compute capability >= 8.9 (the dense reference is unchanged): fp8: e4m3 "
                        "Q.K^T and P.V; int8: int8 Q.K^T, 16-bit P.V; int8_fp8: int8 Q.K^T, e4m3 P.V")
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    q.add_argument("--out", default="quality_out", help="output folder (must be empty or new unless --overwrite)")
    q.add_argument("--overwrite", action="store_true")
    add_quiet_json(q, "print report.json on stdout")
    return q



def run(a) -> int:
    with harness_imports("quality"):
        from vidattn.quality.run import cli_entry, parse_seeds
    pats = preset_list(a.patterns, "--patterns")
    if a.seeds is not None:
        try:
            a.seeds = parse_seeds(a.seeds)
        except ValueError:
            raise UsageError(f"--seeds must be comma-separated ints or a range like 0-3, got {a.seeds!r}") from None
        if not a.seeds or len(set(a.seeds)) != len(a.seeds):
            raise UsageError(f"--seeds must list distinct seeds, got {a.seeds!r}")
    a.patterns = pats
    try:
        levels = [float(x) for x in a.sparsity.split(",")]
    except ValueError:
        raise UsageError(f"--sparsity must be a float or comma-separated floats in (0, 1), got {a.sparsity!r}") from None
    if not all(0 < x < 1 for x in levels):
        raise UsageError(f"--sparsity levels must be in (0, 1), got {a.sparsity!r}")
    a.sparsity = levels[0] if len(levels) == 1 else levels
    for name in ("frames", "height", "width", "steps"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be >= 1, got {v}")
    check_device(a.device)
    check_harness_model(a.model)
    check_out(a.out, a.overwrite)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.precision is not None and not str(a.device).startswith("cuda"):
        raise UsageError(f"--precision {a.precision} needs a CUDA GPU (compute capability >= 8.9), "
                         f"got --device {a.device}")
    quiet = a.quiet
    a.quiet = a.quiet or a.json
    from vidattn.attention import precision

    try:
        with precision(a.precision):
            rc = int(cli_entry(a) or 0)
    except FileNotFoundError as e:
        raise ModelError(f"--model {a.model}: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # a family setting that does not fit this model's token grid, bad sizes, ...
        raise UsageError(f"vidattn quality: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if a.json and not quiet:
        with open(os.path.join(a.out, "report.json")) as fh:
            print(fh.read())
    return rc
