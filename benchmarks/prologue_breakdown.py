"""Time the parts of the 8-bit quantisation prologue (``vidattn/kernels/quant_fp8.py``) on the GPU.

For each shape (Wan2.1-1.3B and HunyuanVideo attention) and K/V layout (token-major in place, as
dense plans read them; head-major contiguous, as permuted plans read them), times with CUDA events
(median of repeats): the Q quantisation, the K/V statistics (K token mean, V channel amax and
scales, finished in the kernel), the fused K smoothing/quantisation and V^T quantisation, and the
whole prologue of each precision, next to the HBM
floor of the bytes each step must move (``--bw`` GB/s). Prints one JSON line per row; ``--json``
also writes them to a file. ``--sweep`` also times each prologue kernel over a set of launch
settings (``quant_fp8.TUNING`` keys) and the whole prologue with the fastest of each;
``--baseline FILE`` times the ``quantize_operands`` of another copy of ``quant_fp8.py`` (an A/B
against an earlier prologue in the same run).

    python benchmarks/prologue_breakdown.py --sweep --json prologue.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import torch

SHAPES = {"wan": (1, 32760, 12, 128), "hunyuan": (1, 119056, 24, 128)}
# launch settings swept per kernel (quant_fp8.TUNING keys)
SWEEP = {
    "q": [dict(q_rows=r, q_warps=w) for r, w in ((64, 4), (32, 4), (16, 2), (128, 8), (32, 2))],
    "kv": [dict(v_tile=t, kv_warps=w) for t, w in ((64, 4), (32, 4), (128, 8), (64, 8), (32, 2), (128, 4), (64, 2))],
    "stats": [dict(stats_chunk=c, stats_tile=t, stats_warps=w) for c, t, w in
              ((512, 32, 4), (1024, 32, 4), (512, 16, 4), (256, 16, 2), (512, 64, 8), (1024, 64, 8), (512, 32, 8),
               (512, 32, 2))],
}


def _time(fn, reps=40, warm=10):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def _with_tuning(qf, tuning, fn):
    saved = dict(qf.TUNING)
    qf.TUNING.update(tuning)
    try:
        return fn()
    finally:
        qf.TUNING.clear()
        qf.TUNING.update(saved)


def main(argv=None):
    from vidattn.bench.timing import host_us
    from vidattn.kernels import quant_fp8 as qf

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="wan,hunyuan")
    ap.add_argument("--bw", type=float, default=4300.0, help="HBM bandwidth for the floor, GB/s")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--kernels", default=",".join(SWEEP), help="which kernels --sweep sweeps")
    ap.add_argument("--check", action="store_true",
                    help="also check the Triton prologue against the torch one bit for bit (given its K mean)")
    ap.add_argument("--baseline", default=None, help="another quant_fp8.py to time in the same run")
    args = ap.parse_args(argv)
    rows = []
    base = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_quant_fp8", args.baseline)
        base = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = base  # dataclasses look the module up
        spec.loader.exec_module(base)

    def log(r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    for name in args.shapes.split(","):
        B, S, H, D = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        nbytes = B * S * H * D * 2  # one bf16 tensor
        for layout in ("token_major", "head_major"):
            if layout == "token_major":
                kb, vb = k.transpose(1, 2), v.transpose(1, 2)
            else:
                kb, vb = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            floor = lambda reads, writes: round((reads + writes) * nbytes / (args.bw * 1e6), 4)  # noqa: E731
            parts = {
                "q_quant": (lambda: qf._quantize_q_triton(q, "e4m3"), floor(1, 0.5)),
                "kv_stats": (lambda: qf._kv_stats_triton(kb, vb), floor(2, 0)),
                "kv_quant": (lambda: qf._quantize_kv_triton(kb, vb, 128, "e4m3", stats), floor(2, 1)),
            }
            stats = qf._kv_stats_triton(kb, vb)[3]
            if args.check:
                for prec in ("fp8", "int8_fp8", "int8"):
                    a = qf.quantize_operands(q, kb, vb, 128, prec, impl="triton")
                    t = qf.quantize_operands(q, kb, vb, 128, prec, impl="torch", k_mean=a.k_mean)
                    same = {f: bool(getattr(a, f) is None and getattr(t, f) is None) or bool(
                        torch.equal(getattr(a, f).float(), getattr(t, f).float()))
                            for f in ("q8", "q_scale", "k8", "k_scale", "k_mean", "vt8", "v_scale")}
                    mean_err = ((a.k_mean.double() - kb.double().mean(2)).abs().max()
                                / kb.double().abs().amax(2).max()).item()
                    log(dict(shape=name, layout=layout, check=prec, bit_identical=all(same.values()), fields=same,
                             k_mean_rel_err=mean_err))
                    del a, t
            best = {}
            if args.sweep:
                fns = {"q": lambda t: qf._quantize_q_triton(q, "e4m3", tuning=t),
                       "kv": lambda t: qf._quantize_kv_triton(kb, vb, 128, "e4m3", stats, tuning=t),
                       "stats": lambda t: qf._kv_stats_triton(kb, vb, tuning=t)}
                for kern, settings in SWEEP.items():
                    if kern not in args.kernels.split(",") or (kern == "q" and layout != "token_major"):
                        continue
                    res = []
                    for t in settings:
                        try:
                            ms = _time(lambda: fns[kern](t))
                            res.append((ms, t))
                            log(dict(shape=name, layout=layout, sweep=kern, tuning=t, ms=round(ms, 4)))
                        except Exception as e:  # noqa: BLE001
                            log(dict(shape=name, layout=layout, sweep=kern, tuning=t, error=repr(e)[:300]))
                    if res:
                        best.update(min(res, key=lambda r: r[0])[1])
                log(dict(shape=name, layout=layout, best_tuning=best))
            if base is not None:
                for prec in ("fp8", "int8_fp8", "int8"):
                    parts[f"prologue_{prec}_baseline"] = (
                        lambda prec=prec: base.quantize_operands(q, kb, vb, 128, prec, impl="triton"),
                        floor(5 if prec != "int8" else 3, 1.5 if prec != "int8" else 1.0))
            for prec in ("fp8", "int8_fp8", "int8"):
                parts[f"prologue_{prec}"] = (
                    lambda prec=prec: qf.quantize_operands(q, kb, vb, 128, prec, impl="triton"),
                    floor(5 if prec != "int8" else 3, 1.5 if prec != "int8" else 1.0))
            if best:
                for prec in ("fp8", "int8"):
                    parts[f"prologue_{prec}_best"] = (
                        lambda prec=prec, best=best: _with_tuning(qf, best, lambda: qf.quantize_operands(
                            q, kb, vb, 128, prec, impl="triton")),
                        floor(5 if prec != "int8" else 3, 1.5 if prec != "int8" else 1.0))
            for part, (fn, fl) in parts.items():
                try:
                    ms = _time(fn)
                    log(dict(shape=name, layout=layout, part=part, ms=round(ms, 4), floor_ms=fl,
                             x_floor=round(ms / fl, 2), host_us=host_us(fn, 20)))
                except Exception as e:  # noqa: BLE001 - report and go on
                    log(dict(shape=name, layout=layout, part=part, error=repr(e)[:300]))
        del q, k, v
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
