"""Ring per-shard plans on one device: for each pattern and ring size R, the global plan is sliced
into its (query shard, key shard) plans (vidattn.context_parallel.ring_shards), every shard's
rows are computed step by step in diffusers' ring order and merged with diffusers' LSE formula,
and the result is compared with the global plan run in one call. Reports the slicing mode
(aligned / re-blocked / fallback reason), the time to build the shard plans, the kernel time of
one rank's R steps against the single-device call, and the max difference.

Needs no second GPU (the communication is not what is measured; tests/pipelines/test_context_parallel.py
covers it over gloo). GPU (the lead runs it):

    python benchmarks/ring_shards.py --json ring_shards.json

CPU smoke path: ``python benchmarks/ring_shards.py --tiny --json /tmp/ring_shards.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _patterns(tiny: bool):
    import vidattn
    from vidattn.patterns.radial import Radial
    from vidattn.patterns.rectified import RectifiedSparse

    bs = 8 if tiny else 128
    grid = (3, 4, 4) if tiny else (21, 30, 52)  # Wan 480p / 81 frames latent grid: 32760 tokens
    return grid, {
        "neighborhood": vidattn.Neighborhood(kernel_size=(1, 3, 3) if tiny else (3, 11, 21), block_size=bs),
        "radial": Radial(block_size=bs, decay_factor=0.5, sink_frames=0),
        "rectified_joint": RectifiedSparse(block_size=bs, keep=0.3, method="joint"),
        "dense": vidattn.Dense(),
    }


def _time(fn, dev, reps):
    """Mean seconds per call over ``reps`` back-to-back calls after one warm-up."""
    from vidattn.bench.timing import loop_ms

    return loop_ms(fn, dev, reps) / 1e3


def run(args) -> list:
    import vidattn
    from vidattn.attention import run_plan
    from vidattn.context_parallel import ring_shards

    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    backend = "auto"
    grid, pats = _patterns(args.tiny)
    lay = vidattn.TokenLayout(grid)
    S, H, D = lay.seq_len, (2 if args.tiny else args.heads), (8 if args.tiny else 128)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, S, H, D, generator=g).to(dev, dtype) for _ in range(3))
    rows = []
    for name, pat in pats.items():
        if pat.is_dynamic:
            plan = pat.plan(lay, q, k, v=v, num_heads=H, scale=None, device=dev)
        else:
            plan = pat.plan(lay, num_heads=H, device=dev)
        ref = run_plan(q, k, v, plan, backend=backend)
        t_global = _time(lambda: run_plan(q, k, v, plan, backend=backend), dev, args.reps)
        for R in args.ring:
            if S % R:
                continue
            t0 = time.perf_counter()
            shards = ring_shards(plan, lay, R, R, False, dev)
            subs = {(r, c): shards.sub(r, c) for r in range(R) for c in range(R)} if shards.reason is None else {}
            build_s = time.perf_counter() - t0
            row = dict(pattern=name, ring=R, tokens=S, heads=H, reason=shards.reason, build_s=build_s,
                       global_call_s=t_global)
            if shards.reason is None:
                s = S // R
                row["mode"] = "reblocked" if subs[(0, min(1, R - 1))].meta.get("ring_reblocked") else "aligned"
                worst = 0.0
                for r in range(R):
                    def steps(r=r):
                        out = lse = None
                        for i in range(R):
                            c = (r + i) % R
                            o, lo = run_plan(q[:, r * s:(r + 1) * s], k[:, c * s:(c + 1) * s], v[:, c * s:(c + 1) * s],
                                             subs[(r, c)], backend=backend, return_lse=True)
                            lo = lo.transpose(1, 2)[..., None]
                            o = torch.where(torch.isfinite(lo), o.float(), 0.0)
                            if out is not None:  # diffusers' TemplatedRingAttention merge
                                o = out - torch.sigmoid(lo - lse) * (out - o)
                                lo = lse - torch.nn.functional.logsigmoid(lse - lo)
                            out, lse = o, lo
                        return out
                    out = steps()
                    worst = max(worst, (out - ref[:, r * s:(r + 1) * s].float()).abs().max().item())
                    if r == 0:
                        row["rank0_steps_s"] = _time(steps, dev, args.reps)
                row["max_abs_diff"] = worst
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Ring per-shard plans vs the global plan on one device")
    ap.add_argument("--tiny", action="store_true", help="tiny CPU shapes (smoke path)")
    ap.add_argument("--ring", default="2,4,8", help="ring sizes, comma-separated")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="", help="write the rows here")
    a = ap.parse_args(argv)
    a.ring = [int(x) for x in a.ring.split(",")]
    if a.tiny:
        a.ring = [r for r in a.ring if r <= 4]
    rows = run(a)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() and not a.tiny else "cpu",
                           rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
