"""Sweep Triton launch settings (warps, stages, block sizes) for vidattn's kernel on the Wan shape.

    python benchmarks/tune_kernel.py
"""
import itertools
import json
import os
import sys

import torch
import triton


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    import vidattn
    from attention import _random_block_plan
    from vidattn.kernels import sparse_flash

    layout = vidattn.TokenLayout((21, 30, 52))
    S, H, D = layout.seq_len, 12, 128
    q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows = []
    for block in (128, 64):
        plans = {"rand0.125": _random_block_plan(S, H, 0.125, block),
                 "na(9,15,27)": vidattn.Neighborhood(kernel_size=(9, 15, 27), block_size=block).plan(layout, device="cuda")}
        for (name, plan), warps, stages in itertools.product(plans.items(), (4, 8), (1, 2, 3)):
            os.environ["VIDATTN_TRITON_WARPS"] = str(warps)
            os.environ["VIDATTN_TRITON_STAGES"] = str(stages)
            try:
                fn = lambda: sparse_flash.block_sparse_attention_triton(q, k, v, plan)  # noqa: E731
                fn()
                ms = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")
            except Exception as e:
                ms = None
                print("fail", name, block, warps, stages, repr(e)[:120], flush=True)
            r = dict(plan=name, block=block, warps=warps, stages=stages, ms=ms and round(ms, 3),
                     block_density=round(plan.block_density, 4))
            rows.append(r)
            print(json.dumps(r), flush=True)
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "tune.json"), "w"), indent=1)
