"""Clustered (Sparse VideoGen 2) cost split: k-means + plan build vs the attention call it serves.

Default shape: Wan 2.1 1.3B at 480p (grid 21 x 30 x 52 = 32,760 tokens, 12 heads, d=128, bf16,
batch 1). Timed separately with CUDA events (median of ``--repeats`` after ``--warmup``):

* ``kmeans_cold_ms``: Q and K k-means, ``iters_first`` iterations (first sparse step only);
* ``kmeans_warm_ms``: the same warm-started, ``iters_step`` iterations (every later step);
* ``plan_ms``: centroid scores + top-p map + orders + block lists (no host sync);
* ``attention_ms``: the block-sparse attention call on that plan (``--backend``);
* ``dense_ms``: dense SDPA on the same inputs;
* ``overhead_warm``: (kmeans_warm + plan) / attention, the issue's <= 10% target.

Also reports the plan's executed token density, the cluster mask's own density and the block
rounding cost (executed / cluster density) for every ``--block-sizes`` entry.

Inputs: ``structured`` (default; tokens' Q/K are smooth functions of their (t, h, w) position plus
noise, so attention is local and clusters exist), ``random`` (i.i.d. Gaussian, the worst case), or
``--qkv file.pt`` holding ``{"q", "k", "v"}`` ``[B, S, H, D]`` captured from a model.

    python benchmarks/clustered.py --out clustered.json                 # GPU, Wan-1.3B shape
    python benchmarks/clustered.py --device cpu --tiny --out tiny.json  # CPU smoke path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="21,30,52", help="T,H,W latent grid (default Wan 480p)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="triton", help="attention backend for the sparse call")
    p.add_argument("--inputs", default="structured", choices=["structured", "random"])
    p.add_argument("--qkv", default=None, help="torch.save'd dict with q, k, v [B, S, H, D]")
    p.add_argument("--q-clusters", type=int, default=None)
    p.add_argument("--k-clusters", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--block-k", type=int, default=None, help="key block (default: --block-size)")
    p.add_argument("--block-sizes", default="128x64,64x64,64x32,128x32,64x16,32x32",
                   help="QxK block pairs (or single sizes) for the rounding-cost table")
    p.add_argument("--iters-first", type=int, default=50)
    p.add_argument("--iters-step", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="small shape for a CPU smoke run (grid 4,8,8, 2 heads, d 32)")
    p.add_argument("--out", default=None, help="write the JSON result here (also printed)")
    return p.parse_args(argv)


def make_inputs(args, layout, dtype, dev):
    B, H, D = args.batch, args.heads, args.head_dim
    S = layout.seq_len
    if args.qkv:
        d = torch.load(args.qkv, map_location=dev)
        return tuple(d[n].to(dev, dtype) for n in ("q", "k", "v"))
    g = torch.Generator(device="cpu").manual_seed(0)
    if args.inputs == "random":
        return tuple(torch.randn(B, S, H, D, generator=g).to(dev, dtype) for _ in range(3))
    c = layout.coords().float()  # [N, 3]
    c = c / torch.tensor(layout.grid, dtype=torch.float32).clamp(min=1)
    freqs = torch.randn(H, 3, 16, generator=g) * 4.0
    feats = torch.cat([torch.sin(c @ freqs), torch.cos(c @ freqs)], -1)  # [H, N, 32]
    out = []
    for _ in range(3):
        proj = torch.randn(H, 32, D, generator=g) / math.sqrt(32) * 3.0
        x = torch.einsum("hnf,hfd->nhd", feats, proj)[None].expand(B, -1, -1, -1)
        x = x + 0.3 * torch.randn(B, x.shape[1], H, D, generator=g)
        full = torch.randn(B, S, H, D, generator=g)
        full[:, layout.grid_slice] = x
        out.append(full.to(dev, dtype))
    return tuple(out)


def timer(dev):
    """``run(fn, warmup, repeats)``: median ms per call (:func:`vidattn.bench.timing.time_ms`)."""
    from vidattn.bench.timing import time_ms

    return lambda fn, warmup, repeats: time_ms(fn, dev, warmup=warmup, reps=repeats)


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        args.grid, args.heads, args.head_dim = "4,8,8", 2, 32
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
        args.iters_first = min(args.iters_first, 10)
    import vidattn
    from vidattn import TokenLayout
    from vidattn.kernels.kmeans import batched_kmeans
    from vidattn.patterns.clustered import Clustered, cluster_keep_map

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --tiny for the CPU path")
    dtype = getattr(torch, args.dtype)
    if dev.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32
    backend = args.backend if dev.type == "cuda" else "reference"
    layout = TokenLayout(tuple(int(x) for x in args.grid.split(",")))
    q, k, v = make_inputs(args, layout, dtype, dev)
    B, S, H, D = q.shape
    pat = Clustered(q_clusters=args.q_clusters, k_clusters=args.k_clusters, top_p=args.top_p,
                    iters_first=args.iters_first, iters_step=args.iters_step, block_size=args.block_size,
                    block_k=args.block_k)
    Kq, Kk = pat.cluster_counts(layout)
    run = timer(dev)
    g = layout.grid_slice
    xq = q[:, g].permute(2, 1, 0, 3).reshape(H, -1, B * D)
    xk = k[:, g].permute(2, 1, 0, 3).reshape(H, -1, B * D)

    def kmeans(iters, init=None):
        return (batched_kmeans(xq, Kq, iters, init=None if init is None else init[0]),
                batched_kmeans(xk, Kk, iters, init=None if init is None else init[1]))

    cold_ms = run(lambda: kmeans(args.iters_first), min(args.warmup, 1), max(1, min(args.repeats, 3)))
    (lq, cq, nq), (lk, ck, nk) = kmeans(args.iters_first)
    warm_ms = run(lambda: kmeans(args.iters_step, (cq, ck)), args.warmup, args.repeats)
    split = lambda c: c.view(H, c.shape[1], B, D).permute(2, 0, 1, 3)  # noqa: E731
    scale = D ** -0.5

    def build(p=pat):
        keep = cluster_keep_map(split(cq), split(ck), nk[None], float(p.top_p), float(p.min_fraction), scale)
        return p._plan_from_clusters(layout, lq, lk, keep, dev)

    plan_ms = run(build, args.warmup, args.repeats)
    plan = build()
    attn_ms = run(lambda: vidattn.run_plan(q, k, v, plan, backend=backend), args.warmup, args.repeats)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    dense_ms = run(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh), args.warmup, args.repeats)
    rounding = {}
    for item in [x for x in args.block_sizes.split(",") if x]:
        bq, _, bk = item.partition("x")
        pb = build(Clustered(q_clusters=args.q_clusters, k_clusters=args.k_clusters, top_p=args.top_p,
                             block_size=int(bq), block_k=int(bk) if bk else None))
        rounding[item] = dict(token_density=round(float(pb.token_density), 5),
                                 cluster_density=round(float(pb.meta["cluster_density"]), 5),
                                 cost=round(float(pb.token_density) / max(float(pb.meta["cluster_density"]), 1e-12), 4))
    res = dict(
        shape=dict(grid=list(layout.grid), seq_len=S, heads=H, head_dim=D, batch=B, dtype=str(dtype).split(".")[-1]),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", backend=backend, inputs=args.inputs
        if not args.qkv else os.path.basename(args.qkv),
        kmeans_assign="triton" if (dev.type == "cuda" and os.environ.get("VIDATTN_KMEANS_TRITON", "1") != "0") else "torch",
        q_clusters=Kq, k_clusters=Kk, top_p=args.top_p, block_size=args.block_size, block_k=args.block_k or args.block_size,
        iters_first=args.iters_first, iters_step=args.iters_step,
        kmeans_cold_ms=round(cold_ms, 4), kmeans_warm_ms=round(warm_ms, 4), plan_ms=round(plan_ms, 4),
        attention_ms=round(attn_ms, 4), dense_ms=round(dense_ms, 4),
        overhead_warm=round((warm_ms + plan_ms) / attn_ms, 4),
        overhead_cold=round((cold_ms + plan_ms) / attn_ms, 4),
        token_density=round(float(plan.token_density), 5),
        cluster_density=round(float(plan.meta["cluster_density"]), 5), block_density=round(plan.block_density, 5),
        speedup_vs_dense=round(dense_ms / (attn_ms + warm_ms + plan_ms), 4),
        block_rounding=rounding,
    )
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
