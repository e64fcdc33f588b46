"""Worker of ``benchmarks/parallel.py`` (``vidattn bench parallel``): one transformer step of a Wan2.1
transformer (random weights) under diffusers context parallelism, dense vs vidattn sparse.

Kept in an importable module because ``torch.multiprocessing.spawn`` pickles its target by module
name (``vidattn.context_parallel.bench_worker`` forwards here).

Each spawned rank: builds the same model and inputs (same seeds), enables
``ContextParallelConfig(ulysses_degree=W)`` or ``(ring_degree=W)`` (world size 1: no parallelism,
the single-GPU baseline), then for each pattern (``dense`` = diffusers' own attention, the others
= ``vidattn.apply``) runs ``warmup`` + ``reps`` forwards, and records the median step time, the
peak memory of every rank, and (world > 1) the difference of the output to the single-GPU output
saved by the world-size-1 run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import List, Optional

import torch

__all__ = ["WAN_14B", "WAN_TINY", "make_pattern", "run_worker", "latent_shape", "run", "parser", "main"]

# Wan-AI/Wan2.1-T2V-14B transformer config (diffusers port)
WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
CONFIGS = {"wan14b": WAN_14B, "tiny": WAN_TINY}


def latent_shape(cfg: dict, frames: int, height: int, width: int):
    """Wan VAE latents ``[1, C, (F - 1) / 4 + 1, H / 8, W / 8]`` and the token grid after patchify."""
    f, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    pt, ph, pw = cfg["patch_size"]
    return (1, cfg["in_channels"], f, h, w), (f // pt, h // ph, w // pw)


def make_pattern(name: str, grid, density: float = 0.1):
    """``radial`` (Radial Attention, Wan preset), ``neighborhood`` (3-D window covering ~``density``
    of the grid, e.g. (9, 21, 37) on 21 x 45 x 80), ``rectified`` (RectifiedSparse keep 0.25),
    ``permuted_grid``."""
    import vidattn

    if name == "radial":
        from vidattn.patterns.radial import Radial

        return Radial() if grid[1] * grid[2] >= 256 else Radial(block_size=8, decay_factor=0.5, sink_frames=0)
    if name == "neighborhood":  # window covering ~density of the grid (odd sizes, NATTEN-style)
        f = density ** (1.0 / 3.0)
        ks = tuple(min(g, max(1, int(round((g * f - 1) / 2)) * 2 + 1)) for g in grid)
        return vidattn.Neighborhood(kernel_size=ks, block_size=128 if grid[1] * grid[2] >= 256 else 8)
    if name == "rectified":
        from vidattn.patterns.rectified import RectifiedSparse

        return RectifiedSparse(keep=0.25, block_size=128 if grid[1] * grid[2] >= 256 else 8)
    if name == "permuted_grid":
        from vidattn.patterns.grid import PermutedGrid

        return PermutedGrid(block_size=128 if grid[1] * grid[2] >= 256 else 8)
    raise ValueError(f"unknown pattern {name!r}: dense, radial, neighborhood, rectified, permuted_grid")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_worker(rank: int, world: int, port: int, spec: dict, out_path: str) -> None:
    """One rank of one (world size, mode) configuration; rank 0 writes ``out_path`` (JSON)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = spec["device"] == "cuda"
    if not cuda:
        torch.accelerator.device_count = lambda: 1  # diffusers divides by it; 0 on a CPU-only machine
        torch.set_num_threads(max(1, spec.get("threads", 1)))
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    res = dict(world=world, mode=spec["mode"], results={})
    try:
        import vidattn
        from diffusers import WanTransformer3DModel

        cfg = CONFIGS[spec["config"]]
        dtype = getattr(torch, spec["dtype"])
        torch.manual_seed(0)
        with torch.device(dev):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # build in the target dtype: 14B params need no fp32 copy
            try:
                model = WanTransformer3DModel(**cfg)
            finally:
                torch.set_default_dtype(prev)
        model = model.eval().requires_grad_(False)
        shape, grid = latent_shape(cfg, spec["frames"], spec["height"], spec["width"])
        g = torch.Generator(device="cpu").manual_seed(1)
        B = int(spec.get("batch", 1))
        shape = (B,) + tuple(shape[1:])
        inputs = dict(hidden_states=torch.randn(shape, generator=g).to(dev, dtype),
                      encoder_hidden_states=torch.randn(B, spec["text_tokens"], cfg["text_dim"], generator=g).to(dev, dtype),
                      timestep=torch.full((B,), 500, device=dev), return_dict=False)
        if world > 1:
            from diffusers import ContextParallelConfig

            deg = dict(ulysses_degree=world) if spec["mode"] == "ulysses" else dict(ring_degree=world)
            model.enable_parallelism(config=ContextParallelConfig(**deg))
        if spec.get("dense_backend"):
            model.set_attention_backend(spec["dense_backend"])
        for name in spec["patterns"]:
            if name == "dense" and not cuda and world > 1 and spec["mode"] == "ring":
                # diffusers' native backend cannot return the LSE Ring needs on CPU: vidattn's exact
                # dense op (what vidattn.Dense() runs under context parallelism)
                vidattn.apply(model, vidattn.Dense())
                h = None
            else:
                h = None if name == "dense" else vidattn.apply(model, vidattn.SparseAttentionConfig(
                    make_pattern(name, grid, spec.get("density", 0.1)), backend=spec.get("kernel_backend", "auto")))
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            times = []
            with torch.no_grad():
                for i in range(spec["warmup"] + spec["reps"]):
                    dist.barrier()
                    _sync(dev)
                    t0 = time.perf_counter()
                    out = model(**inputs)[0]
                    _sync(dev)
                    if i >= spec["warmup"]:
                        times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None
            peaks = [None] * world
            dist.all_gather_object(peaks, peak)
            entry = dict(step_s=statistics.median(times), times_s=times, peak_gib_per_rank=peaks,
                         tokens=int(grid[0] * grid[1] * grid[2]), grid=list(grid))
            if h is not None:
                entry.update(sparse_calls=h.sparse_calls, dense_calls=h.dense_calls,
                             mean_density=h.stats.mean_density and float(h.stats.mean_density),
                             ring_shard_calls=h.stats.ring_shard_calls,  # Ring: per-shard plan steps
                             ring_gathered_calls=h.stats.ring_gathered_calls)  # Ring: all-gather fallbacks
                work = [None] * world
                dist.all_gather_object(work, {k: dict(v) for k, v in h.stats.head_work.items()})
                if spec["mode"] == "ulysses" and world > 1 and work[0]:
                    from vidattn.context_parallel import head_balance

                    layer = sorted(work[0])[0]
                    merged = {hd: w for wk in work for hd, w in wk.get(layer, {}).items()}
                    if len(merged) % world == 0 and len(merged) > 1:
                        entry["head_balance_layer0"] = head_balance(merged, world)
            base = os.path.join(spec["baseline_dir"], f"{name}.pt")
            if rank == 0:
                if world == 1:
                    torch.save(out.float().cpu(), base)
                elif os.path.exists(base):
                    ref = torch.load(base)
                    d = (out.float().cpu() - ref).abs().max().item()
                    entry.update(max_abs_diff_vs_1gpu=d, rel_diff_vs_1gpu=d / max(ref.abs().max().item(), 1e-12))
            res["results"][name] = entry
            vidattn.remove(model)
    except Exception:
        import traceback

        res["error"] = traceback.format_exc()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


# =============================================================================== driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    """Run every configuration; returns the report dict (also written to ``args.json``)."""
    import torch
    import torch.multiprocessing as mp

    from vidattn.context_parallel import bench_worker

    cuda = not args.tiny and torch.cuda.is_available()
    if not args.tiny and not cuda:
        raise SystemExit("error: the full-size benchmark needs CUDA GPUs; use --tiny for the CPU path")
    spec = dict(config="tiny" if args.tiny else "wan14b", device="cuda" if cuda else "cpu",
                dtype="float32" if args.tiny else "bfloat16", frames=args.frames, height=args.height,
                width=args.width, text_tokens=args.text_tokens, patterns=args.patterns, warmup=args.warmup,
                reps=args.reps, kernel_backend=args.kernel_backend, threads=1, batch=args.batch,
                density=args.density,
                dense_backend=args.dense_backend if cuda else None)
    if cuda and max(args.world_sizes) > torch.cuda.device_count():
        raise SystemExit(f"error: world size {max(args.world_sizes)} > {torch.cuda.device_count()} GPUs")
    report = dict(spec=spec, runs=[])
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = args.baseline_dir or tmp
        os.makedirs(base_dir, exist_ok=True)
        spec["baseline_dir"] = base_dir
        sizes = sorted(set(args.world_sizes) | {1})
        single_json = os.path.join(base_dir, "single-1.json")
        for world in sizes:
            if world == 1 and args.baseline_dir and os.path.exists(single_json):
                with open(single_json) as f:  # single-GPU baseline of an earlier call
                    report["runs"].append(json.load(f))
                continue
            for mode in (args.modes if world > 1 else ["single"]):
                out = os.path.join(base_dir if world == 1 else tmp, f"{mode}-{world}.json")
                s = dict(spec, mode=mode)
                mp.spawn(bench_worker, args=(world, _free_port(), s, out), nprocs=world, join=True)
                with open(out) as f:
                    r = json.load(f)
                report["runs"].append(r)
                if "error" in r:
                    print(f"{mode} x{world}: ERROR\n{r['error']}", file=sys.stderr)
                    continue
                for name, e in r["results"].items():
                    print(f"{mode:8s} x{world}  {name:13s} step {e['step_s']:.3f} s  peak/GPU "
                          f"{e['peak_gib_per_rank']}  diff vs 1 GPU {e.get('rel_diff_vs_1gpu')}", flush=True)
    single = {n: e["step_s"] for r in report["runs"] if r["mode"] == "single" for n, e in r.get("results", {}).items()}
    for r in report["runs"]:
        for n, e in r.get("results", {}).items():
            if n in single and r["world"] > 1:
                e["scaling_efficiency"] = single[n] / (r["world"] * e["step_s"])
            if n != "dense" and "dense" in r.get("results", {}):
                e["speedup_vs_dense_same_world"] = r["results"]["dense"]["step_s"] / e["step_s"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidattn bench parallel", description="Wan2.1-14B-config step under diffusers context parallelism (Ulysses / Ring), dense vs vidattn sparse")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    strs = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--world-sizes", type=ints, default=[2, 4, 8], help="comma list (1 = single GPU, always run)")
    p.add_argument("--modes", type=strs, default=["ulysses", "ring"], help="ulysses,ring")
    p.add_argument("--patterns", type=strs, default=["dense", "radial"],
                   help="dense (diffusers attention), radial, neighborhood, rectified, permuted_grid")
    p.add_argument("--frames", type=int, default=81, help="video frames (4k+1)")
    p.add_argument("--height", type=int, default=720, help="pixels")
    p.add_argument("--width", type=int, default=1280, help="pixels")
    p.add_argument("--text-tokens", type=int, default=512, help="T5 text tokens")
    p.add_argument("--batch", type=int, default=2, help="batch (2 = CFG's conditional + unconditional)")
    p.add_argument("--density", type=float, default=0.1, help="neighborhood: fraction of the grid each query sees")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    p.add_argument("--reps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--kernel-backend", default="auto", help="vidattn kernel backend: auto|triton|flex|reference")
    p.add_argument("--dense-backend", default="_native_cudnn",
                   help="diffusers backend of dense attention on GPU (must support CP with LSE for Ring)")
    p.add_argument("--baseline-dir", default=None,
                   help="keep the single-GPU outputs / times here and reuse them in later calls (one call per "
                        "world size fits a 10-minute device limit)")
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU over gloo (CI smoke path)")
    p.add_argument("--json", default=None, help="write the report here")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.tiny:
        if args.world_sizes == [2, 4, 8]:
            args.world_sizes = [2]
        if (args.frames, args.height, args.width) == (81, 720, 1280):
            args.frames, args.height, args.width, args.text_tokens = 9, 64, 64, 8
        if args.patterns == ["dense", "radial"]:
            args.patterns = ["dense", "radial", "rectified"]
        args.reps, args.warmup, args.batch = min(args.reps, 1), 0, 1
    for m in args.modes:
        if m not in ("ulysses", "ring"):
            print(f"error: --modes takes ulysses,ring; got {m!r}", file=sys.stderr)
            return 2
    rep = run(args)
    return 1 if any("error" in r for r in rep["runs"]) else 0


