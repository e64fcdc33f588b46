"""Kernel variant probe on the Wan 480p/81f shape (needs a CUDA GPU): input layout (token- vs
head-major), TMA on/off, program order, and plan block shapes (block_q x block_k) for the
Neighborhood plans, each timed in the same run as cuDNN SDPA dense and compiled FlexAttention on
the same plan.

    python benchmarks/explore.py [--json out.json] [--only REGEX]
    python benchmarks/explore.py --ncu-case random-0.0625     # one plan, two calls (for ncu)

Settings go through the kernel's environment overrides (``vidattn.kernels.sparse_flash.launch_config``).
"""
import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tune_kernel import ENV  # noqa: E402  (the kernel's launch-setting overrides)


def _env(**kw):
    for name in ENV:
        os.environ.pop(name, None)
    for k, v in kw.items():
        os.environ["VIDATTN_TRITON_" + k.upper()] = str(v)


def _na_plan(layout, ks, bq, bk):
    import vidattn
    from vidattn.plan import plan_from_rule

    rule = vidattn.Neighborhood(kernel_size=ks, tile_shape=False).rule(layout)
    return plan_from_rule(rule, seq_len=layout.seq_len, block_q=bq, block_k=bk, device="cuda",
                          meta=dict(pattern="neighborhood", kernel_size=list(ks)))


def plans(layout, H):
    from attention import _random_block_plan
    import vidattn

    S = layout.seq_len
    out = [("dense", 1, lambda: vidattn.Dense().plan(layout, device="cuda"))]
    for d in (0.0625, 0.125, 0.25):
        out.append((f"random-{d}", 1, lambda d=d: _random_block_plan(S, H, d, 128)))
    for bq, bk in ((64, 64), (128, 64)):
        out.append((f"na(3,21,52)-{bq}x{bk}", 2, lambda bq=bq, bk=bk: _na_plan(layout, (3, 21, 52), bq, bk)))
    for bq, bk in ((64, 64), (128, 64), (64, 32)):
        out.append((f"na(9,15,27)-{bq}x{bk}", 1, lambda bq=bq, bk=bk: _na_plan(layout, (9, 15, 27), bq, bk)))
    return out


def variants(name):
    """(label, env settings, input layout) per plan."""
    v = [("default", {}, "token")]
    if name == "dense" or name.startswith("random"):
        v += [("noTMA", dict(tma=0), "token"), ("head-major", {}, "head"), ("head-major noTMA", dict(tma=0), "head"),
              ("w8 s2", dict(warps=8, stages=2), "token"), ("sched1", dict(sched=1), "token"),
              ("128x32 w4 s2", dict(block_n=32, warps=4, stages=2), "token"),
              ("128x32 w4 s3", dict(block_n=32, warps=4, stages=3), "token")]
    elif name.endswith("128x64"):
        v += [("w4 s2", dict(warps=4, stages=2), "token"), ("128x32 w4 s2", dict(block_n=32, warps=4, stages=2), "token"),
              ("128x32 w8 s3", dict(block_n=32, warps=8, stages=3), "token")]
    elif name.endswith("64x64"):
        v += [("sched1", dict(sched=1), "token"), ("sched2", dict(sched=2), "token")]
    elif name.endswith("64x32"):
        v += [("sched2", dict(sched=2), "token"), ("s3", dict(stages=3), "token")]
    return v


def _grid_plan(layout, H, device):
    """PermutedGrid plan with fixed per-head kinds (spatial / temporal / grid / dense, cycled)."""
    from vidattn.patterns.grid import DENSE, GRID, SPATIAL, TEMPORAL, PermutedGrid

    T, Hh, W = layout.grid
    kinds = [(SPATIAL, TEMPORAL, GRID, DENSE)[h % 4] for h in range(H)]
    return PermutedGrid().plan_for(layout, kinds, [Hh * W] * H, [h % 3 for h in range(H)], device=device)


def perm_check(layout, H, D, tri, bench):
    import vidattn
    from vidattn.kernels.reference import block_sparse_attention_reference as ref_fn
    from vidattn.kernels.reference import from_plan_order, to_plan_order

    small = vidattn.TokenLayout((6, 12, 16), suffix=9)
    cases = [("na-tile(2,4,4)", vidattn.Neighborhood(kernel_size=(3, 5, 7), tile_shape=(2, 4, 4)).plan(small, device="cuda")),
             ("grid-per-head", _grid_plan(small, 4, "cuda"))]
    for name, plan in cases:
        for dt, (h, hk) in ((torch.bfloat16, (4, 4)), (torch.float32, (4, 2)), (torch.float16, (4, 1))):
            q = torch.randn(2, small.seq_len, h, 128, device="cuda", dtype=dt)
            k = torch.randn(2, small.seq_len, hk, 128, device="cuda", dtype=dt)
            v = torch.randn(2, small.seq_len, hk, 128, device="cuda", dtype=dt)
            out, lse = tri(q, k, v, plan, return_lse=True)
            ref, ref_lse = ref_fn(q.float(), k.float(), v.float(), plan, return_lse=True)
            rel = float((out.float() - ref).norm() / ref.norm())
            fin = torch.isfinite(ref_lse)
            lse_err = float((lse[fin] - ref_lse[fin]).abs().max())
            print(json.dumps(dict(check=name, dtype=str(dt), heads=[h, hk], rel_err=rel, lse_max_err=lse_err)), flush=True)
    B = 1
    q, k, v = (torch.randn(B, layout.seq_len, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for name, plan in (("na(9,15,27)-tile(2,8,8)", vidattn.Neighborhood(kernel_size=(9, 15, 27), tile_shape=(2, 8, 8))
                        .plan(layout, device="cuda")), ("grid-per-head", _grid_plan(layout, H, "cuda"))):
        out = tri(q, k, v, plan)
        ms = bench(lambda: tri(q, k, v, plan))
        out_hm = out.transpose(1, 2).contiguous()
        g_ms = bench(lambda: to_plan_order(q.transpose(1, 2), plan.perm).contiguous())
        s_ms = bench(lambda: from_plan_order(out_hm, plan.perm).transpose(1, 2))
        print(json.dumps(dict(plan=name, B=B, block_density=round(plan.block_density, 4), triton_ms=round(ms, 3),
                              removed_q_gather_ms=round(g_ms, 3), removed_o_scatter_ms=round(s_ms, 3))), flush=True)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "explore.json"))
    p.add_argument("--only", default="")
    p.add_argument("--ncu-case", default="")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention on the plans")
    p.add_argument("--ab-sched", action="store_true", help="interleaved A/B of program orders 0 and 1 (5 rounds)")
    p.add_argument("--perm-check", action="store_true", help="permuted plans: triton vs reference on small cases, "
                   "then kernel time and the cost of the Q gather / O scatter it no longer needs")
    args = p.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import vidattn
    from attention import _bench
    from vidattn.bench.records import environment_record, record_logger
    from vidattn.kernels.flex import _compiled_flex, block_mask_from_plan, flex_kernel_options
    from vidattn.kernels import sparse_flash
    from vidattn.kernels.sparse_flash import block_sparse_attention_triton as tri

    layout = vidattn.TokenLayout((21, 30, 52))
    S, H, D = layout.seq_len, 12, 128
    data = {}

    def inputs(B):
        if B not in data:
            q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            data[B] = (q, k, v, *(t.transpose(1, 2).contiguous() for t in (q, k, v)))
        return data[B]

    if args.ncu_case:
        for name, B, mk in plans(layout, H):
            if name == args.ncu_case:
                plan = mk()
                q, k, v, *_ = inputs(B)
                tri(q, k, v, plan)
                tri(q, k, v, plan)
                torch.cuda.synchronize()
                return 0
        raise SystemExit(f"no case {args.ncu_case}")

    if args.perm_check:
        return perm_check(layout, H, D, tri, _bench)
    if args.ab_sched:
        from attention import _random_block_plan

        cases = [("dense", lambda: vidattn.Dense().plan(layout, device="cuda"))]
        cases += [(f"random-{d}", lambda d=d: _random_block_plan(S, H, d, 128)) for d in (0.25, 0.125, 0.0625)]
        cases += [("radial-block", lambda: vidattn.Radial(granularity="block").plan(layout, device="cuda"))]
        q, k, v, *_ = inputs(1)
        for name, mk in cases:
            plan = mk()
            times = {0: [], 1: []}
            for _ in range(5):
                for mode in (0, 1):
                    _env(sched=mode)
                    times[mode].append(_bench(lambda: tri(q, k, v, plan)))
            med = {m: sorted(t)[2] for m, t in times.items()}
            print(json.dumps(dict(plan=name, sched0_ms=round(med[0], 3), sched1_ms=round(med[1], 3),
                                  sched0_all=[round(x, 3) for x in times[0]], sched1_all=[round(x, 3) for x in times[1]])),
                  flush=True)
        _env()
        return 0

    rows = []
    log = record_logger(rows)
    log(environment_record())
    flex = _compiled_flex()
    for B in (1, 2):
        q, k, v, qh, kh, vh = inputs(B)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ms = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh))
        log(dict(plan="dense-cudnn", B=B, ms=round(ms, 3), tflops=round(4 * B * H * S * S * D / ms / 1e9, 1)))
    for name, B, mk in plans(layout, H):
        if args.only and not re.search(args.only, name):
            continue
        plan = mk()
        q, k, v, qh, kh, vh = inputs(B)
        fl = 4 * B * H * S * S * D * plan.block_density
        base = dict(plan=name, B=B, block_density=round(plan.block_density, 4),
                    token_density=round(plan.token_density, 4))
        try:
            if args.no_flex:
                raise RuntimeError("--no-flex")
            bm = block_mask_from_plan(plan, H)
            ms = _bench(lambda: flex(qh, kh, vh, block_mask=bm, kernel_options=flex_kernel_options(plan)))
            log(dict(base, variant="flex", ms=round(ms, 3), tflops=round(fl / ms / 1e9, 1)))
        except Exception as e:  # noqa: BLE001
            log(dict(base, variant="flex", skipped=repr(e)[:200]))
        ref = None
        for label, env, lay in variants(name):
            _env(**env)
            qq, kk, vv = (q, k, v) if lay == "token" else (t.transpose(1, 2) for t in (qh, kh, vh))
            try:
                out = tri(qq, kk, vv, plan)
                if ref is None:
                    ref = out
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                ms = _bench(lambda: tri(qq, kk, vv, plan))
                log(dict(base, variant=label, ms=round(ms, 3), tflops=round(fl / ms / 1e9, 1), rel_vs_default=err,
                         regs_spills=sparse_flash.last_launch.get("regs_spills")))
            except Exception as e:  # noqa: BLE001
                log(dict(base, variant=label, skipped=repr(e)[:200]))
        _env()
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    print("\n%-22s %2s %-18s %8s %7s %6s %s" % ("plan", "B", "variant", "ms", "TFLOP/s", "bdens", "regs/spills"))
    for r in rows:
        if "ms" in r:
            print("%-22s %2d %-18s %8.3f %7.1f %6s %s" % (r["plan"], r["B"], r.get("variant", ""), r["ms"], r["tflops"],
                                                        r.get("block_density", ""), r.get("regs_spills", "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
