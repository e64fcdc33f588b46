"""End-to-end denoising-step benchmark on production shapes (random weights, real configs).

Builds a full-size transformer from its published config, runs one denoising-step forward
(classifier-free-guidance batch 2) and reports ms/step for dense attention (SDPA cuDNN and flash,
FlexAttention) and for each sparse family at ~75% and ~90% sparsity, eager and (optionally)
``torch.compile``d, with the attention share of the step and peak memory.

    python benchmarks/model.py --model wan --json out.json [--compile] [--quick]
    vidattn bench model --model wan ...

Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def _sparse_configs(grid):
    """(name, pattern) pairs around 75% and 90% sparsity on a (T, H, W) token grid."""
    import vidattn

    T, H, W = grid
    out = [
        ("neighborhood-90", vidattn.Neighborhood(kernel_size=(min(T, 9), min(H, 15), min(W, 27)))),
        ("neighborhood-75", vidattn.Neighborhood(kernel_size=(min(T, 11), min(H, 21), min(W, 35)))),
    ]
    for name, cls, kwargs in (("radial", "Radial", {}),
                              ("rectified-75", "RectifiedSparse", dict(keep=0.25)),
                              ("rectified-90", "RectifiedSparse", dict(keep=0.10)),
                              ("grid", "PermutedGrid", {})):
        try:
            out.append((name, getattr(vidattn, cls)(**kwargs)))
        except Exception as e:  # family not available in this build
            print(f"skip {name}: {e}", flush=True)
    return out


def _time_ms(fn, warmup=1, reps=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def bench_wan(args, results):
    from diffusers import WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import vidattn

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    lat_t, lat_h, lat_w = (21, 60, 104) if not args.quick else (9, 30, 52)
    grid = (lat_t, lat_h // 2, lat_w // 2)
    model = WanTransformer3DModel(**WAN_1_3B).to(dev, dt).eval()
    x = torch.randn(2, 16, lat_t, lat_h, lat_w, device=dev, dtype=dt)
    ctx = torch.randn(2, 512, 4096, device=dev, dtype=dt)
    t = torch.tensor([500, 500], device=dev)
    S = math.prod(grid)
    label = f"wan1.3b-{lat_t}x{lat_h}x{lat_w}-cfg2"

    def step(m):
        with torch.no_grad():
            return m(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

    def rec(name, ms, **extra):
        r = dict(model=label, name=name, ms=round(ms, 1), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                 **extra)
        results.append(r)
        print(json.dumps(r), flush=True)

    # dense baselines, eager
    dense_ms = {}
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        torch.cuda.reset_peak_memory_stats()
        with sdpa_kernel([be]):
            dense_ms[be.name] = _time_ms(lambda: step(model))
        rec(f"dense-sdpa-{be.name}-eager", dense_ms[be.name])
    # attention alone (30 layers) with cuDNN: the Amdahl bound
    q = torch.randn(2, 12, S, 128, device=dev, dtype=dt)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        attn_ms = _time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), warmup=3, reps=10)
    rec("self-attn-30-layers-cudnn", 30 * attn_ms, share=round(30 * attn_ms / dense_ms["CUDNN_ATTENTION"], 3))
    del q

    configs = [("dense-flex", vidattn.Dense())] + _sparse_configs(grid)
    if args.patterns:
        keep = set(args.patterns.split(","))
        configs = [c for c in configs if c[0] in keep or c[0].split("-")[0] in keep]
    for name, pattern in configs:
        backend = "flex" if name == "dense-flex" else args.backend
        try:
            t0 = time.perf_counter()
            handle = vidattn.apply(model, pattern, backend=backend)
            torch.cuda.reset_peak_memory_stats()
            ms = _time_ms(lambda: step(model))
            td = getattr(handle, "token_densities", None) or []
            td = td() if callable(td) else td
            td = list(td.values()) if isinstance(td, dict) else list(td)
            dens = round(sum(td) / len(td), 4) if td else None
            rec(f"{name}-eager", ms, speedup_vs_cudnn=round(dense_ms["CUDNN_ATTENTION"] / ms, 3), density=dens,
                first_call_s=round(time.perf_counter() - t0, 2))
        except Exception as e:
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
        finally:
            vidattn.remove(model)

    if args.compile:
        torch._dynamo.config.cache_size_limit = 64
        for name, pattern in [("dense-cudnn", None)] + [c for c in configs if c[0] in args.compile.split(",")]:
            try:
                if pattern is not None:
                    vidattn.apply(model, pattern, backend=args.backend)
                cm = torch.compile(model)
                t0 = time.perf_counter()
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    step(cm)
                    compile_s = time.perf_counter() - t0
                    ms = _time_ms(lambda: step(cm))
                rec(f"{name}-compiled", ms, compile_s=round(compile_s, 1))
            except Exception as e:
                print(f"FAILED compiled {name}: {type(e).__name__}: {e}", flush=True)
            finally:
                vidattn.remove(model)
                torch._dynamo.reset()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vidattn bench model", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wan", choices=["wan"])
    p.add_argument("--patterns", default="", help="comma-separated config names to run (default: all)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--compile", default="", help="comma-separated config names to also run torch.compile'd")
    p.add_argument("--quick", action="store_true", help="smaller latent for a smoke run")
    p.add_argument("--json", default="", help="write results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("vidattn bench model needs a CUDA GPU", file=sys.stderr)
        return 2
    import diffusers
    import triton

    print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"diffusers {diffusers.__version__}", flush=True)
    results = []
    bench_wan(args, results)
    print("\n%-34s %10s %8s" % ("config", "ms/step", "vs cuDNN"))
    for r in results:
        print("%-34s %10.1f %8s" % (r["name"][:34], r["ms"], r.get("speedup_vs_cudnn", "")))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
