"""Strided neighborhood (GNA) and plan-construction benchmark: vidattn.na3d vs dense SDPA (and NATTEN).

For each case: plan construction time (CPU or GPU), the plan's block structure (full / partial
blocks, block vs token density, chosen tile and block) and, on CUDA, forward time of
``vidattn.na3d`` (Triton) against dense ``F.scaled_dot_product_attention`` (cuDNN/flash) and, when
installed, ``natten.na3d``; "useful TFLOP/s" counts only the allowed (query, key) pairs.

    python benchmarks/neighborhood_gna.py --out gna.json            # GPU: plans + timings
    python benchmarks/neighborhood_gna.py --plans-only --out p.json  # CPU: plan construction only
"""

from __future__ import annotations

import argparse
import os
import json
import math
import sys
import time

import torch

import vidattn
from vidattn import Neighborhood, TokenLayout
from vidattn.bench.timing import loop_ms

sys.path.insert(0, os.path.dirname(__file__))
from attention import _env  # noqa: E402  (sets environment variables for a block, restoring them)

# (name, grid, kernel_size, stride): Wan 480p latent grid (21, 30, 52) ~ 32k tokens
CASES = [
    ("wan_exact_9x15x27", (21, 30, 52), (9, 15, 27), (1, 1, 1)),
    ("wan_gna_9x15x27_s3x5x9", (21, 30, 52), (9, 15, 27), (3, 5, 9)),
    ("wan_gna_6x12x24_s2x4x8", (20, 32, 48), (6, 12, 24), (2, 4, 8)),   # stride-aligned: only full blocks
    ("wan_gna_12x12x24_s4x4x8", (20, 32, 48), (12, 12, 24), (4, 4, 8)),
    ("hunyuan_gna_6x24x24_s2x8x8", (32, 48, 80), (6, 24, 24), (2, 8, 8)),
]
PLAN_ONLY_1D = [("1d_65536_k127", (65536,), (127,), (1,))]


def _time_cuda(fn, iters):
    """Mean ms per call over ``iters`` back-to-back calls after one warm-up (CUDA events)."""
    return loop_ms(fn, "cuda", iters)


def run_case(name, grid, kernel, stride, args):
    layout = TokenLayout(grid)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.plans_only else "cpu")
    t0 = time.perf_counter()
    plan = Neighborhood(kernel_size=kernel, stride=stride).plan(layout, device=dev)
    build_s = time.perf_counter() - t0
    rec = dict(name=name, grid=list(grid), kernel_size=list(kernel), stride=list(stride), seq_len=layout.seq_len,
               plan_build_s=round(build_s, 4), block=plan.block_q, tile_shape=plan.meta.get("tile_shape"),
               full_blocks=int(plan.full_kv_num_blocks.sum()), partial_blocks=int(plan.kv_num_blocks.sum()),
               token_density=round(float(plan.token_density), 6), block_density=round(plan.block_density, 6))
    if dev.type != "cuda" or len(grid) != 3:
        return rec
    B, H, D = args.batch, args.heads, args.head_dim
    q, k, v = (torch.randn(B, *grid, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    S = layout.seq_len
    useful = 4 * B * H * D * S * S * float(plan.token_density)
    from vidattn.kernels.sparse_flash_launch import last_launch

    ms = _time_cuda(lambda: vidattn.na3d(q, k, v, kernel_size=kernel, stride=stride), args.iters)
    rec.update(vidattn_ms=round(ms, 4), vidattn_useful_tflops=round(useful / ms / 1e9, 1),
               kernel_path=last_launch.get("path"), gluon_refused=last_launch.get("gluon_refused"))
    if last_launch.get("path") == "gluon-hopper":  # the portable kernel on the same call, same run
        with _env(VIDATTN_GLUON="0"):
            ms_p = _time_cuda(lambda: vidattn.na3d(q, k, v, kernel_size=kernel, stride=stride), args.iters)
        rec.update(portable_ms=round(ms_p, 4), portable_useful_tflops=round(useful / ms_p / 1e9, 1))
    if args.variants:
        _variants(rec, plan, layout, kernel, stride, q, k, v, useful, args)
    qd, kd, vd = (t.reshape(B, S, H, D).transpose(1, 2) for t in (q, k, v))
    ms_d = _time_cuda(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd), args.iters)
    rec.update(sdpa_dense_ms=round(ms_d, 4), dense_tflops=round(4 * B * H * D * S * S / ms_d / 1e9, 1),
               density_x_dense_ms=round(ms_d * float(plan.token_density), 4))
    try:
        import natten

        ms_n = _time_cuda(lambda: natten.na3d(q, k, v, kernel_size=kernel, stride=stride), args.iters)
        rec.update(natten_ms=round(ms_n, 4), natten_useful_tflops=round(useful / ms_n / 1e9, 1))
    except Exception as e:  # not installed / no kernel for this case
        rec.update(natten_skipped=f"{type(e).__name__}: {e}"[:200])
    return rec


def _variants(rec, plan, layout, kernel, stride, q, k, v, useful, args):
    """Where the time goes (``--variants``): the same call without the finiteness pass, the kernel
    on the plan directly (no API layer), the 64-token-block plan, and a random full-block plan of
    the same block density and block size without a token permutation."""
    from vidattn.kernels.sparse_flash import block_sparse_attention_triton
    from vidattn.plan import FULL, plan_from_block_mask

    B, H, D = args.batch, args.heads, args.head_dim
    S = layout.seq_len
    qs, ks, vs = (t.reshape(B, S, H, D) for t in (q, k, v))
    with _env(VIDATTN_CHECK_FINITE="0"):
        ms = _time_cuda(lambda: vidattn.na3d(q, k, v, kernel_size=kernel, stride=stride), args.iters)
    rec.update(nocheck_ms=round(ms, 4))
    ms = _time_cuda(lambda: block_sparse_attention_triton(qs, ks, vs, plan), args.iters)
    rec.update(kernel_ms=round(ms, 4), kernel_useful_tflops=round(useful / ms / 1e9, 1))
    if plan.block_q != 64:
        p64 = Neighborhood(kernel_size=kernel, stride=stride, block_size=64).plan(layout, device=q.device)
        ms = _time_cuda(lambda: block_sparse_attention_triton(qs, ks, vs, p64), args.iters)
        rec.update(block64_ms=round(ms, 4), block64_tile=p64.meta.get("tile_shape"),
                   block64_partial=int(p64.kv_num_blocks.sum()))
    b = plan.block_q
    nb = -(-S // b)
    g = torch.Generator().manual_seed(0)
    keep = max(1, round(plan.block_density * nb))
    idx = torch.argsort(torch.rand(nb, nb, generator=g), -1)[:, :keep]
    cls = torch.zeros(nb, nb, dtype=torch.int8).scatter_(1, idx, FULL)[None, None]
    rnd = plan_from_block_mask(cls, seq_len=S, block_q=b, block_k=b, rule=None, token_density=keep / nb).to(q.device)
    ms = _time_cuda(lambda: block_sparse_attention_triton(qs, ks, vs, rnd), args.iters)
    rec.update(random_same_density_ms=round(ms, 4))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="write the JSON records here")
    p.add_argument("--plans-only", action="store_true", help="plan construction and structure only (CPU is fine)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--variants", action="store_true",
                   help="also time: no finiteness pass, the kernel on the plan directly, 64-token blocks, "
                        "a random full-block plan of the same density")
    args = p.parse_args(argv)
    recs = []
    for case in PLAN_ONLY_1D + CASES:
        rec = run_case(*case, args)
        print(json.dumps(rec), flush=True)
        recs.append(rec)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                           records=recs), f, indent=1)


if __name__ == "__main__":
    main()
