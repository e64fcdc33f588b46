"""A/B of the triton backend's two forward kernels on the same plans: the Hopper Gluon kernel
(warp-specialised, ``VIDATTN_GLUON=1``; on request also with ``VIDATTN_GLUON_PINGPONG=1`` or
``VIDATTN_GLUON_PERSISTENT=1``) against the portable Triton kernel (``VIDATTN_GLUON=0``),
with cuDNN SDPA dense as the ceiling, on the Wan / HunyuanVideo shapes of
``benchmarks/attention.py`` (random full-block plans at several densities, the dense plan, and a
fully block-sparse strided neighborhood). Needs a Hopper GPU.

    python benchmarks/gluon_ab.py [--json out.json] [--quick] [--variants pingpong,persistent] [--stages 2,3]

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
    args = p.parse_args(argv)
    import vidattn
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton as tri, last_launch

    recs = []

    def log(r):
        recs.append(r)
        print(json.dumps(r), flush=True)

    log(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__))
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("wan")}
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
        for d in ((0.25,) if args.quick else (0.5, 0.25, 0.125, 0.0625)):
            plans.append((f"d{d}", _random_block_plan(S, H, d, 128)))
        if not args.quick and label.startswith("wan"):
            plans.append(("gna(9,15,27)s(3,5,9)", vidattn.Neighborhood(kernel_size=(9, 15, 27), stride=(3, 5, 9))
                          .plan(layout, device="cuda")))
            plans.append(("na(9,15,27)", vidattn.Neighborhood(kernel_size=(9, 15, 27)).plan(layout, device="cuda")))
        for name, plan in plans:
            fl = plan.block_density * dense
            ref = None
            row = dict(shape=label, name=name, block_density=round(plan.block_density, 4))
            extra = {"pingpong": ("gluon-pingpong", dict(VIDATTN_GLUON="1", VIDATTN_GLUON_PINGPONG="1")),
                     "persistent": ("gluon-persistent", dict(VIDATTN_GLUON="1", VIDATTN_GLUON_PERSISTENT="1"))}
            for mode, env in [("portable", dict(VIDATTN_GLUON="0")), ("gluon", dict(VIDATTN_GLUON="1"))] + [
                    extra[v] for v in args.variants.split(",") if v] + [
                    (f"gluon-st{s}", dict(VIDATTN_GLUON="1", VIDATTN_GLUON_STAGES=s))
                    for s in args.stages.split(",") if s]:
                try:
                    with _env(**env):
                        out = tri(q, k, v, plan)
                        ms = _bench(lambda: tri(q, k, v, plan))
                    if ref is None:
                        ref = out.float()
                        err = 0.0
                    else:
                        err = float((out.float() - ref).norm() / ref.norm())
                    row[mode] = dict(ms=round(ms, 3), tflops=round(fl / ms / 1e9, 1), path=last_launch.get("path"),
                                     rel_diff_vs_portable=round(err, 5))
                except Exception as e:
                    row[mode] = dict(skipped=repr(e)[:300])
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
