"""Sweep the Triton kernel's tile sizes and launch settings on the Wan shape (needs a CUDA GPU).

    python benchmarks/tune_kernel.py [--json out.json] [--quick]

For each plan (dense, random block-sparse at several densities, Neighborhood (9, 15, 27)) it
times every (BLOCK_M, BLOCK_N, warps, stages) candidate with ``triton.testing.do_bench`` and, in
the same run, cuDNN SDPA dense and compiled FlexAttention on the same BlockPlan, then prints the
best setting per plan with its effective TFLOP/s and ratio to flex. Settings are passed through
the kernel's environment overrides (see ``vidattn.kernels.sparse_flash.launch_config``).
"""
import argparse
import itertools
import json
import os
import sys

import torch
import triton

CANDIDATES = [  # (BLOCK_M, BLOCK_N, warps, stages)
    *[(128, 64, w, s) for w in (4, 8) for s in (2, 3)],
    *[(128, 128, 8, s) for s in (2, 3)],
    *[(64, 64, 4, s) for s in (2, 3)],
]
ENV = ("VIDATTN_TRITON_BLOCK_M", "VIDATTN_TRITON_BLOCK_N", "VIDATTN_TRITON_WARPS", "VIDATTN_TRITON_STAGES",
       "VIDATTN_TRITON_SCHED", "VIDATTN_TRITON_TMA")
VARIANTS = [(1, 1), (0, 0)]  # (sched, tma) tried on top of the best plain setting


def _set(cfg, sched=0, tma=1):
    for name, val in zip(ENV, (*cfg, sched, tma)):
        os.environ[name] = str(val)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "tune.json"))
    p.add_argument("--quick", action="store_true", help="fewer plans")
    p.add_argument("--only", default="", help="regex: only plans whose name matches")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--candidates", default="", help="override: 'BM,BN,W,S;...'")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import vidattn
    from attention import _bench, _random_block_plan
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from vidattn.kernels import sparse_flash
    from vidattn.kernels.flex import _compiled_flex, block_mask_from_plan, flex_kernel_options

    layout = vidattn.TokenLayout((21, 30, 52))
    S, H, D = layout.seq_len, 12, 128
    q, k, v = (torch.randn(args.batch, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    dense_flops = 4 * args.batch * H * S * S * D
    cands = CANDIDATES
    if args.candidates:
        cands = [tuple(int(x) for x in c.split(",")) for c in args.candidates.split(";")]
    rows = []

    def log(r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    log(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        cudnn = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh))
    log(dict(plan="sdpa-cudnn-dense", ms=round(cudnn, 3), tflops=round(dense_flops / cudnn / 1e9, 1)))
    plans = {"dense": vidattn.Dense().plan(layout, device="cuda")}
    for dens in ((0.5, 0.125) if args.quick else (0.5, 0.25, 0.125, 0.0625)):
        plans[f"rand{dens}"] = _random_block_plan(S, H, dens, 128)
    for kern in ((9, 15, 27), (3, 21, 52)):
        for block in (64, 128):
            plans[f"na{kern}-b{block}".replace(" ", "")] = vidattn.Neighborhood(kernel_size=kern, block_size=block).plan(
                layout, device="cuda")
    if args.only:
        import re

        plans = {n: p for n, p in plans.items() if re.search(args.only, n)}
    flex = _compiled_flex()
    best = {}
    for name, plan in plans.items():
        fl = plan.block_density * dense_flops
        try:  # flex's default tiles need plan blocks of 128
            if args.batch != 1:
                raise RuntimeError("flex comparison only at batch 1")
            bm = block_mask_from_plan(plan, H)
            f_ms = _bench(lambda: flex(qh, kh, vh, block_mask=bm, kernel_options=flex_kernel_options(plan)))
            log(dict(plan=name, kernel="flex", ms=round(f_ms, 3), tflops=round(fl / f_ms / 1e9, 1),
                     block_density=round(plan.block_density, 4)))
        except Exception as e:
            f_ms = float("nan")
            log(dict(plan=name, kernel="flex", error=repr(e)[:120]))
        for cfg, var in itertools.chain(((c, (0, 1)) for c in cands), ((None, v) for v in VARIANTS)):
            if cfg is None:  # the best setting so far, with a variant
                cfg = best[name][1]
            if cfg[0] > plan.block_q or cfg[1] > plan.block_k:
                continue
            sched = var
            _set(cfg, *var)
            try:
                fn = lambda: sparse_flash.block_sparse_attention_triton(q, k, v, plan)  # noqa: E731
                ms = _bench(fn)
            except Exception as e:
                log(dict(plan=name, cfg=cfg, sched=sched, error=repr(e)[:200]))
                continue
            log(dict(plan=name, cfg=cfg, sched=sched, ms=round(ms, 3), tflops=round(fl / ms / 1e9, 1),
                     vs_flex=round(f_ms / ms, 3), vs_cudnn=round(cudnn / ms, 3)))
            if name not in best or ms < best[name][0]:
                best[name] = (ms, cfg, sched, f_ms, fl)
    print("\nbest per plan:")
    for name, (ms, cfg, sched, f_ms, fl) in best.items():
        print(f"{name:22s} {ms:8.3f} ms  {fl / ms / 1e9:6.1f} TFLOP/s  vs flex {f_ms / ms:5.2f}  "
              f"cfg (BM, BN, warps, stages)={cfg} sched={sched}")
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
