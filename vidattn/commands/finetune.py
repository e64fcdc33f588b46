"""`vidattn finetune`: LoRA fine-tuning with sparse attention in the loop (:mod:`vidattn.pipelines.finetune`)."""

from __future__ import annotations

import json
import os
import sys

from . import UsageError, check_device, check_out
from .harness_options import add_reference_version, add_size_options

__all__ = ["add_parser", "run"]


def add_parser(sub):
    p = sub.add_parser("finetune", help="LoRA fine-tune a video transformer with sparse attention in the loop",
                       description="Fine-tune peft LoRA adapters on the attention projections with a sparse pattern "
                                   "active (flow-matching objective on the pipeline's scheduler; dense-teacher "
                                   "distillation by default), save them in the diffusers format "
                                   "(pipe.load_lora_weights(OUT)) and report PSNR vs dense before and after.")
    p.add_argument("--model", default="reference", help="reference (default) or a local diffusers checkpoint dir")
    add_reference_version(p)
    p.add_argument("--pattern", required=True, help="pattern name (neighborhood, radial, grid, rectified, ...)")
    p.add_argument("--kernel-size", default=None, help="neighborhood: int or T,H,W")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any pattern field (repeatable)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--loss", default="distill", choices=["distill", "flow"],
                   help="distill: match the dense model's prediction (default); flow: data velocity noise - x0")
    p.add_argument("--data", default="reference", help="reference (the model's data generator), noise, or a folder of .mp4")
    add_size_options(p, "--inference-steps", "sampling steps (training sigmas and evaluation)")
    p.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--eval-seeds", default="0,1,2,3", help="comma list of seeds for PSNR vs dense ('' = no evaluation)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "flex", "triton"])
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="adapter folder (must be empty or new unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def _pattern(a):
    from vidattn.config import parse_int_tuple, parse_value, pattern_from_dict

    cfg = {"pattern": a.pattern}
    if a.kernel_size:
        try:
            cfg["kernel_size"] = parse_int_tuple(a.kernel_size, "--kernel-size")
        except ValueError as e:
            raise UsageError(str(e)) from None
    for kv in a.set:
        if "=" not in kv:
            raise UsageError(f"--set takes KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        cfg[k.strip().replace("-", "_")] = parse_value(v)
    try:
        return pattern_from_dict(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"--pattern: {e}") from None


def run(a) -> int:
    import torch

    check_device(a.device)
    check_out(a.out, a.overwrite)
    if a.lora_rank < 1 or a.steps < 0:
        raise UsageError("--lora-rank must be >= 1 and --steps >= 0")
    try:
        seeds = [int(s) for s in a.eval_seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--eval-seeds must be a comma list of ints, got {a.eval_seeds!r}") from None
    pattern = _pattern(a)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.model == "reference":
        from vidattn.quality.reference_model import load_reference_pipeline

        pipe = load_reference_pipeline(device=device, version=a.version)
    elif os.path.isdir(a.model):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(a.model).to(device)
    else:
        raise UsageError(f"--model must be 'reference' or a diffusers checkpoint folder, got {a.model!r}")
    from vidattn.pipelines.finetune import finetune

    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    res = finetune(pipe, pattern, lora_rank=a.lora_rank, steps=a.steps, lr=a.lr, data=a.data, batch_size=a.batch_size,
                   loss=a.loss, num_frames=a.frames, height=a.height, width=a.width,
                   num_inference_steps=a.inference_steps, time_budget_s=a.time_budget, eval_seeds=seeds,
                   out_dir=a.out, backend=a.backend, seed=a.seed, log=log)
    report = res.as_dict()
    report.pop("losses")
    report["loss_first"] = res.losses[0] if res.losses else None
    report["loss_last10"] = sum(res.losses[-10:]) / max(1, len(res.losses[-10:])) if res.losses else None
    with open(os.path.join(a.out, "finetune_report.json"), "w") as f:
        json.dump(dict(report, losses=res.losses), f, indent=1)
    print(json.dumps(report))
    return 0
