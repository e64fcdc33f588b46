"""GPU check of the core engine: plans on production shapes (build time, densities), flex and
reference backends on CUDA vs SDPA with the pattern's mask on small shapes, and FlexAttention
speed with vidattn's tiled neighborhood plan vs raw token order.

    python benchmarks/plan_check.py --json out.json
"""
import argparse
import json
import sys
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    import triton
    import vidattn
    from vidattn import Neighborhood, TokenLayout

    dev = "cuda"
    res = []

    def rec(**r):
        res.append(r)
        print(json.dumps(r), flush=True)

    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    # 1. correctness on CUDA (small)
    for grid, pre, suf, kern in (((6, 10, 12), 0, 7, (3, 5, 5)), ((20, 24), 3, 0, (7, 9))):
        layout = TokenLayout(grid, pre, suf)
        pat = Neighborhood(kernel_size=kern, dilation=1)
        S = layout.seq_len
        q, k, v = (torch.randn(2, S, 4, 64, device=dev) for _ in range(3))
        m = pat.mask(layout).to(dev)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2).double() for t in (q, k, v)), attn_mask=m[None]).transpose(1, 2)
        for be in ("reference", "flex"):
            out = vidattn.sparse_attention(q, k, v, pat, layout, backend=be)
            rec(check=be, grid=grid, max_abs_err=float((out.double() - ref).abs().max()))
    # 2. plan build on the Wan shape
    layout = TokenLayout((21, 30, 52))
    for kern in ((9, 15, 27), (11, 21, 35)):
        for tile in (None, False):
            pat = Neighborhood(kernel_size=kern, tile_shape=tile)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            plan = pat.plan(layout, device=dev)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            pat.plan(layout, device=dev)
            t2 = time.perf_counter()
            q, k, v = (torch.randn(1, layout.seq_len, 12, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
            fn = lambda: vidattn.run_plan(q, k, v, plan, backend="flex")  # noqa: E731
            fn()
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            rec(shape="wan", kernel=kern, tiled=tile is None, build_s=round(t1 - t0, 3), cached_s=round(t2 - t1, 6),
                token_density=round(plan.token_density, 4), block_density=round(plan.block_density, 4),
                partial_blocks=int(plan.kv_num_blocks.sum()), full_blocks=int(plan.full_kv_num_blocks.sum()),
                flex_ms=round(ms, 3))
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
