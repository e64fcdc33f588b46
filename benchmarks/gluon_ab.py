"""A/B of the triton backend's two forward kernels on the same plans: the Hopper Gluon kernel
(warp-specialised, ``VIDATTN_GLUON=1``; on request also with ``VIDATTN_GLUON_PINGPONG=1`` or
``VIDATTN_GLUON_PERSISTENT=1``) against the portable Triton kernel (``VIDATTN_GLUON=0``),
with cuDNN SDPA dense as the ceiling, on the Wan / HunyuanVideo shapes of
``benchmarks/attention.py`` (random full-block plans at several densities, the dense plan, and a
fully block-sparse strided neighborhood). Needs a Hopper GPU.

    python benchmarks/gluon_ab.py [--json out.json] [--quick] [--variants pingpong,persistent] [--stages 2,3]
                                  [--precisions int8,int8_fp8,fp8] [--i2f-bits] [--no-bf16] [--no-splitacc]
                                  [--gluon-env poly=VIDATTN_GLUON_EXP_POLY:1,qin0=VIDATTN_Q_IN_KERNEL:0]
                                  [--no-neighborhood]

``--precisions``: also time both kernels in these quantised precisions (``{precision}-portable`` /
``{precision}-gluon``, and ``{precision}-gluon-splitacc`` with ``VIDATTN_GLUON_PV_SPLIT_ACC=1`` for
8-bit P.V; with ``--i2f-bits`` also ``{precision}-{kernel}-i2fbits``, ``VIDATTN_INT8_I2F=bits``, for the
int8 ones), each with its relative L2 difference from the bf16 portable kernel's output.
``--gluon-env``: also time each precision's Gluon kernel (``{precision}-gluon-{name}``, bf16:
``gluon-{name}``) under these environment settings (``name=VAR:VALUE[+VAR:VALUE...]``);
``--portable-env`` the same for the portable kernel (``{precision}-portable-{name}``). Each such row
says whether its output equals its base row's (``equal_to_base``: same kernel and precision
without the settings) bit for bit.

Effective TFLOP/s = 4 * B * H * D * computed-block tokens / time (as in attention.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from attention import SHAPES, _bench, _env, _random_block_plan  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="")
    p.add_argument("--quick", action="store_true", help="Wan shape, dense and d 0.25 only")
    p.add_argument("--variants", default="", help="also time these Gluon variants: pingpong, persistent")
    p.add_argument("--stages", default="", help="also time these VIDATTN_GLUON_STAGES values, e.g. 2,3")
    p.add_argument("--precisions", default="", help="also time these quantised precisions, e.g. int8,int8_fp8,fp8")
    p.add_argument("--i2f-bits", action="store_true",
                   help="with int8 precisions: also time VIDATTN_INT8_I2F=bits (no int -> float conversion instruction)")
    p.add_argument("--no-bf16", action="store_true", help="with --precisions: skip the bf16 Gluon variants")
    p.add_argument("--shapes", default="", help="only these shapes (name prefixes, comma-separated), e.g. wan")
    p.add_argument("--densities", default="0.5,0.25,0.125,0.0625", help="random block densities")
    p.add_argument("--gluon-env", default="",
                   help="Gluon variants as name=VAR:VALUE[+VAR:VALUE], comma-separated, e.g. poly=VIDATTN_GLUON_EXP_POLY:1")
    p.add_argument("--portable-env", default="", help="portable-kernel variants, as --gluon-env")
    p.add_argument("--no-splitacc", action="store_true", help="skip the PV_SPLIT_ACC rows")
    p.add_argument("--no-neighborhood", action="store_true", help="skip the neighborhood plans")
    args = p.parse_args(argv)
    precisions = [x for x in args.precisions.split(",") if x]
    def variants(spec):  # [(name, {VAR: VALUE})]
        out = []
        for item in (x for x in spec.split(",") if x):
            name, _, settings = item.partition("=")
            out.append((name, dict(kv.split(":", 1) for kv in settings.split("+"))))
        return out

    env_variants, portable_variants = variants(args.gluon_env), variants(args.portable_env)
    import vidattn
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton as tri, last_launch

    recs = []

    def log(r):
        recs.append(r)
        print(json.dumps(r), flush=True)

    log(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__))
    only = tuple(x for x in args.shapes.split(",") if x) or (("wan",) if args.quick else ())
    shapes = {k: v for k, v in SHAPES.items() if not only or k.startswith(only)}
    for label, (B, H, grid, text, D) in shapes.items():
        layout = vidattn.TokenLayout(grid, suffix=text)
        S = layout.seq_len
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        dense = 4 * B * H * S * S * D
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            c_ms = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh))
        log(dict(shape=label, name="sdpa-cudnn", ms=round(c_ms, 3), tflops=round(dense / c_ms / 1e9, 1)))
        plans = [("dense", vidattn.Dense().plan(layout, device="cuda"))]
        for d in ((0.25,) if args.quick else [float(x) for x in args.densities.split(",") if x]):
            plans.append((f"d{d}", _random_block_plan(S, H, d, 128)))
        if not args.quick and not args.no_neighborhood and label.startswith("wan"):
            plans.append(("gna(9,15,27)s(3,5,9)", vidattn.Neighborhood(kernel_size=(9, 15, 27), stride=(3, 5, 9))
                          .plan(layout, device="cuda")))
            plans.append(("na(9,15,27)", vidattn.Neighborhood(kernel_size=(9, 15, 27)).plan(layout, device="cuda")))
        for name, plan in plans:
            fl = plan.block_density * dense
            ref = None
            row = dict(shape=label, name=name, block_density=round(plan.block_density, 4))
            extra = {"pingpong": ("gluon-pingpong", dict(VIDATTN_GLUON="1", VIDATTN_GLUON_PINGPONG="1")),
                     "persistent": ("gluon-persistent", dict(VIDATTN_GLUON="1", VIDATTN_GLUON_PERSISTENT="1"))}
            modes = [("portable", dict(VIDATTN_GLUON="0"), None)]
            if not args.no_bf16:
                modes += [("gluon", dict(VIDATTN_GLUON="1"), None)] + [
                    extra[v] + (None, ) for v in args.variants.split(",") if v] + [
                    (f"gluon-st{s}", dict(VIDATTN_GLUON="1", VIDATTN_GLUON_STAGES=s), None)
                    for s in args.stages.split(",") if s] + [
                    (f"gluon-{name}", dict(VIDATTN_GLUON="1", **env), None) for name, env in env_variants]
            for prec in precisions:
                modes += [(f"{prec}-portable", dict(VIDATTN_GLUON="0"), prec),
                          (f"{prec}-gluon", dict(VIDATTN_GLUON="1"), prec)]
                modes += [(f"{prec}-gluon-{name}", dict(VIDATTN_GLUON="1", **env), prec) for name, env in env_variants]
                modes += [(f"{prec}-portable-{name}", dict(VIDATTN_GLUON="0", **env), prec)
                          for name, env in portable_variants]
                if prec != "int8" and not args.no_splitacc:  # 8-bit P.V: each tile's added in fp32 registers instead of in the MMA
                    modes.append((f"{prec}-gluon-splitacc", dict(VIDATTN_GLUON="1", VIDATTN_GLUON_PV_SPLIT_ACC="1"),
                                  prec))
                if prec.startswith("int8") and args.i2f_bits:  # int32 logits to fp32 by bit arithmetic
                    modes += [(f"{prec}-portable-i2fbits", dict(VIDATTN_GLUON="0", VIDATTN_INT8_I2F="bits"), prec),
                              (f"{prec}-gluon-i2fbits", dict(VIDATTN_GLUON="1", VIDATTN_INT8_I2F="bits"), prec)]
            outs = {}  # base mode -> output (for equal_to_base)
            names = {n for n, _ in env_variants + portable_variants}
            for mode, env, prec in modes:
                try:
                    with _env(**env):
                        out = tri(q, k, v, plan, precision=prec)
                        ms = _bench(lambda: tri(q, k, v, plan, precision=prec))
                    if ref is None:
                        ref = out.float()
                        err = 0.0
                    else:
                        err = float((out.float() - ref).norm() / ref.norm())
                    row[mode] = dict(ms=round(ms, 3), tflops=round(fl / ms / 1e9, 1), path=last_launch.get("path"),
                                     rel_diff_vs_portable=round(err, 5))
                    base, _, tail = mode.rpartition("-")
                    if tail in names and base in outs:
                        row[mode]["equal_to_base"] = bool(torch.equal(out, outs[base]))
                    elif tail not in names:
                        outs[mode] = out
                except Exception as e:
                    row[mode] = dict(skipped=repr(e)[:300])
            for prec in precisions:
                g, pt = row.get(f"{prec}-gluon", {}), row.get(f"{prec}-portable", {})
                if "ms" in g and "ms" in pt:
                    row[f"{prec}_gluon_speedup"] = round(pt["ms"] / g["ms"], 3)
            if "ms" in row.get("gluon", {}) and "ms" in row.get("portable", {}):
                row["gluon_speedup"] = round(row["portable"]["ms"] / row["gluon"]["ms"], 3)
                row["gluon_vs_cudnn_efficiency"] = round(row["gluon"]["tflops"] / (dense / c_ms / 1e9), 3)
            log(row)
        del q, k, v
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
