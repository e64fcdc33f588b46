"""Where the time of one attention call goes, on the GPU: the CUDA kernels it launches (name,
count, GPU microseconds per call, from ``torch.profiler``), their sum, the call's time as
``attention.py`` measures it (``triton.testing.do_bench`` median, L2 flushed between calls), the
host time per call (``time.perf_counter`` over back-to-back calls, no synchronisation inside) and
the gap ``do_bench - sum of kernels`` (idle GPU: launch overhead or dependencies the GPU waits on).

For each shape (``attention.py`` SHAPES), plan (dense, random 128-block plans at ``--densities``)
and precision (``--precisions``: bf16 and the quantised ones), one JSON line:

    python benchmarks/kernel_profile.py --shapes wan1.3b-480p-81f --densities 1,0.0625 --json prof.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from benchmarks.attention import SHAPES, _bench, _fp8_inputs, _random_block_plan
from vidattn.bench.timing import host_us


def _kernels(fn, calls: int = 5):
    """``{kernel name: [launches per call, GPU us per call]}`` of ``fn`` (averaged over ``calls``)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = defaultdict(lambda: [0.0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.device_time_total > 0:
            row = out[e.name[:80]]
            row[0] += 1 / calls
            row[1] += e.device_time_total / calls
    return {k: [round(c, 2), round(us, 1)] for k, (c, us) in sorted(out.items(), key=lambda kv: -kv[1][1])}


def _host_profile(fn, top: int, calls: int = 30):
    """The ``top`` functions by own host time of ``calls`` calls of ``fn``: ``[[name, calls per
    call, own us per call, cumulative us per call]]``."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append([f"{file.rsplit('/', 2)[-1]}:{line}:{name}", round(nc / calls, 2), round(tt / calls * 1e6, 1),
                     round(ct / calls * 1e6, 1)])
    return sorted(rows, key=lambda r: -r[2])[:top]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="wan1.3b-480p-81f")
    ap.add_argument("--densities", default="1,0.0625")
    ap.add_argument("--precisions", default="bf16,fp8,int8")
    ap.add_argument("--json", default=None)
    ap.add_argument("--host-profile", type=int, default=0,
                    help="also print this many functions of a cProfile (by own time) of 30 calls per row")
    args = ap.parse_args(argv)
    import vidattn
    from vidattn.kernels.sparse_flash import block_sparse_attention_triton as tri_fn
    from vidattn.kernels.sparse_flash import last_launch

    rows = []
    for label in args.shapes.split(","):
        B, H, grid, text, D = SHAPES[label]
        layout, q, k, v = _fp8_inputs(label)
        for dens in (float(x) for x in args.densities.split(",")):
            plan = (vidattn.Dense().plan(layout, device="cuda") if dens >= 1.0
                    else _random_block_plan(layout.seq_len, H, dens, 128))
            flops = plan.block_density * 4 * B * H * D * layout.seq_len ** 2
            for prec in args.precisions.split(","):
                p = None if prec == "bf16" else prec

                def fn(p=p, plan=plan):
                    return tri_fn(q, k, v, plan, precision=p)

                ms = _bench(fn)
                ker = _kernels(fn)
                busy_us = sum(us for _, us in ker.values())
                r = dict(shape=label, density=dens, precision=prec, path=last_launch.get("path"),
                         ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 1),
                         kernels_us=round(busy_us, 1), gap_us=round(ms * 1e3 - busy_us, 1),
                         host_us=host_us(fn), kernels=ker)
                if args.host_profile:
                    r["host_profile"] = _host_profile(fn, args.host_profile)
                print(json.dumps(r), flush=True)
                rows.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
