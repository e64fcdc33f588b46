"""Forward time of a timm ViT: original dense attention (SDPA) vs vidattn Neighborhood 2-D swaps.

Default (issue 6): ViT-L/16 at 1024x1024 (4,096 patches) and 2048x2048 (16,384 patches), bf16,
batch 8, Neighborhood kernel 13 and 21 in every block, on one CUDA GPU::

    python benchmarks/timm_vit.py --json results_timm_vit.json

Every configuration runs on the same model object in the same process: dense first, then each
swap, then dense again after ``restore_attention`` (``dense_after_ms``, a drift check). Random
weights (``pretrained=False``); timings are medians over ``--iters`` CUDA-event-timed forwards
under ``torch.inference_mode()`` after ``--warmup`` untimed ones (the first of which builds and
caches the block plan; its time is reported as ``first_call_ms``).

A vidattn backend fallback (e.g. triton -> flex) is recorded in ``fallbacks``; a fallback all the
way to the pure-PyTorch reference backend on CUDA is not timed (it would only measure the
reference executor) unless ``--allow-reference``.

CPU smoke test::

    python benchmarks/timm_vit.py --device cpu --dtype fp32 --sizes 64 --batch 1 --depth 1 \
        --kernels 3 --iters 1 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    """Command line: see ``--help``."""
    p = argparse.ArgumentParser(prog="benchmarks/timm_vit.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_large_patch16_224", help="timm model name (default ViT-L/16)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="square image sizes in pixels")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kernels", type=int, nargs="+", default=[13, 21], help="Neighborhood 2-D kernel sizes")
    p.add_argument("--dilation", type=int, default=1)
    p.add_argument("--blocks", type=str, default="all", help="'all' or a python slice like '0:20'")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "triton", "flex", "reference"],
                   help="vidattn backends to time (each one per kernel size)")
    p.add_argument("--depth", type=int, default=None, help="override the number of blocks (smoke tests)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--allow-reference", action="store_true", help="also time a fallback to the reference backend")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write results as JSON to PATH ('-' or no value: stdout)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--batch and --iters must be >= 1, --warmup >= 0")
    return args


def _blocks(spec: str, depth: int):
    if spec == "all":
        return None
    parts = [int(x) if x else None for x in spec.split(":")]
    if len(parts) == 1:
        return [parts[0]]
    return range(depth)[slice(*parts)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_forward(model, img, iters: int, warmup: int, device) -> dict:
    """Median/min forward time in ms (CUDA events on GPU, perf_counter on CPU)."""
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        model(img)
        _sync(device)
        first = (time.perf_counter() - t0) * 1e3
        for _ in range(max(0, warmup - 1)):
            model(img)
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(img)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                model(img)
                times.append((time.perf_counter() - t0) * 1e3)
    return dict(first_call_ms=first, median_ms=statistics.median(times), min_ms=min(times), iters=iters)


def _run_config(model, img, args, device) -> dict:
    """Time one configuration; catches OOM and records vidattn backend fallbacks."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    import vidattn.attention as va

    getattr(va, "_warned", set()).clear()  # fallback warnings are once per process: re-arm them per config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.inference_mode():  # one probe call to learn which backend really runs
                model(img[:1])
            fallbacks = sorted({str(w.message) for w in caught if "vidattn" in str(w.message)})
            if device.type == "cuda" and any("to 'reference'" in f for f in fallbacks) and not args.allow_reference:
                return dict(skipped="fell back to the reference backend", fallbacks=fallbacks)
            res = _time_forward(model, img, args.iters, args.warmup, device)
        except torch.OutOfMemoryError as e:
            return dict(oom=str(e).split("\n")[0])
    res["fallbacks"] = sorted({str(w.message) for w in caught if "vidattn" in str(w.message)})
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    res["images_per_s"] = args.batch / (res["median_ms"] / 1e3)
    return res


def _backends(vidattn, device) -> dict:
    try:
        return vidattn.available_backends(device)
    except Exception as e:  # never let a diagnostics helper stop the benchmark
        return {"error": f"{type(e).__name__}: {e}"}


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; returns a JSON-able dict (environment + one entry per size)."""
    import timm
    from timm.layers import use_fused_attn

    import vidattn
    from vidattn.pipelines.timm import restore_attention, swap_attention

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    out = dict(model=args.model, dtype=args.dtype, batch=args.batch, device=str(device), backends=args.backends,
               torch=torch.__version__, timm=timm.__version__, timm_fused_attn=bool(use_fused_attn()),
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               available_backends=_backends(vidattn, device), results=[])
    for size in args.sizes:
        kw = dict(pretrained=False, img_size=size)
        if args.depth is not None:
            kw["depth"] = args.depth
        torch.manual_seed(0)
        model = timm.create_model(args.model, **kw).eval().to(device=device, dtype=dtype)
        grid = tuple(model.patch_embed.grid_size)
        img = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
        entry = dict(size=size, grid=list(grid), tokens=grid[0] * grid[1] + model.num_prefix_tokens,
                     depth=len(model.blocks), configs={})
        entry["configs"]["dense_sdpa"] = _run_config(model, img, args, device)
        blocks = _blocks(args.blocks, len(model.blocks))
        for k in args.kernels:
            for backend in args.backends:
                name = f"neighborhood_k{k}" + (f"_d{args.dilation}" if args.dilation > 1 else "")
                name += f"[{backend}]" if len(args.backends) > 1 else ""
                try:
                    swap_attention(model, vidattn.Neighborhood(kernel_size=k, dilation=args.dilation), blocks=blocks,
                                   backend=backend)
                except ValueError as e:
                    entry["configs"][name] = dict(error=str(e))
                    continue
                entry["configs"][name] = _run_config(model, img, args, device)
                restore_attention(model)
        after = _run_config(model, img, args, device)
        entry["configs"]["dense_sdpa"]["dense_after_ms"] = after.get("median_ms")
        dense_ms = entry["configs"]["dense_sdpa"].get("median_ms")
        for name, r in entry["configs"].items():
            if dense_ms and r.get("median_ms"):
                r["speedup_vs_dense"] = dense_ms / r["median_ms"]
        out["results"].append(entry)
        del model, img
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _print_table(res: dict, file=sys.stdout) -> None:
    print(f"{res['model']} {res['dtype']} batch {res['batch']} on {res['gpu'] or res['device']} "
          f"(backends {res['backends']}, timm fused attn {res['timm_fused_attn']})", file=file)
    print(f"{'size':>6} {'tokens':>7} {'config':<24} {'median ms':>10} {'speedup':>8} {'img/s':>8}  notes", file=file)
    for e in res["results"]:
        for name, r in e["configs"].items():
            ms = r.get("median_ms")
            note = r.get("oom") or r.get("skipped") or r.get("error") or "; ".join(r.get("fallbacks", []))
            if name == "dense_sdpa" and r.get("dense_after_ms"):
                note = f"dense again after restore: {r['dense_after_ms']:.1f} ms " + note
            ms_s = "-" if ms is None else f"{ms:.1f}"
            print(f"{e['size']:>6} {e['tokens']:>7} {name:<24} {ms_s:>10} "
                  f"{r.get('speedup_vs_dense', float('nan')):8.2f} {r.get('images_per_s', float('nan')):8.2f}  {note}",
                  file=file)


def main(argv=None) -> int:
    """Entry point: parse ``argv``, run, print a table (and JSON with ``--json``); returns an exit
    code (0 ok, 2 no CUDA GPU for ``--device cuda``). Use :func:`run` to get the results dict."""
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/timm_vit.py: --device cuda needs a CUDA GPU (use --device cpu for a smoke run)",
              file=sys.stderr)
        return 2
    res = run(args)
    if args.json is None:
        _print_table(res)
    else:
        text = json.dumps(res, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            _print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
