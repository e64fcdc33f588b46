"""End-to-end denoising-step benchmark on production shapes (random weights, real configs).

Builds a full-size diffusers transformer from its published config (Wan2.1-T2V-1.3B,
HunyuanVideo, FLUX.1-dev) with random weights directly on the GPU, runs one denoising-step forward
and reports ms/step for dense attention (SDPA cuDNN and flash, FlexAttention) and for each sparse
family at ~75% and ~90% sparsity, eager and optionally ``torch.compile``d / CUDA-graphed, with the
density achieved, the attention share of the step and peak memory. ``--breakdown`` profiles one
step per config (torch.profiler) and splits it into attention / linear (GEMM) / other kernels,
plus the sparse overhead outside the attention kernel (plan lookup, permutation gathers, pooling,
profiling).

    python benchmarks/model.py --model wan --json out.json [--compile NAMES] [--cuda-graphs NAMES]
    python benchmarks/model.py --model hunyuan [--frames 129 --height 720 --width 1280]
    python benchmarks/model.py --model flux [--height 1024 --width 1024]
    python benchmarks/model.py --tiny --model flux --breakdown --json out.json   # CPU, seconds
    vidattn bench model --model wan ...          # the same: this module, vidattn.bench.model

Full-size configs need a CUDA GPU; ``--tiny`` runs every model path on CPU with tiny configs.
Timing: :mod:`vidattn.bench.timing` (one CUDA-event/wall-clock timer for every benchmark); the
profiler split: :mod:`vidattn.bench.breakdown`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import logging
import math
import os
import sys
import time

import torch

from vidattn.bench.breakdown import breakdown_from_profile, profile_step  # noqa: F401
from vidattn.bench.timing import sync, time_ms

# ----------------------------------------------------------------------------- configs
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# tencent/HunyuanVideo (diffusers port): 20 dual-stream + 40 single-stream blocks, 24 x 128, 13B
HUNYUAN_VIDEO = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                     num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                     qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                     rope_theta=256.0, rope_axes_dim=(16, 56, 56))
# black-forest-labs/FLUX.1-dev: 19 double + 38 single blocks, 24 x 128, 12B, guidance-distilled
FLUX_1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))

# same structure (patch sizes, joint text, guidance embeds), tiny widths: CPU in milliseconds
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
HUNYUAN_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                    num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
                    text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))

# per model: diffusers class, configs, pixel-space defaults (frames, height, width), text tokens,
# batch (Wan: classifier-free guidance = 2 forwards batched; HunyuanVideo and FLUX.1-dev are
# guidance-distilled: one forward per step), and the smaller --quick / --tiny shapes
MODELS = {
    "wan": dict(cls="WanTransformer3DModel", full=WAN_1_3B, tiny=WAN_TINY, name="wan2.1-1.3b",
                shape=(81, 480, 832), quick=(33, 240, 416), tiny_shape=(9, 64, 64), text=512, tiny_text=8, batch=2),
    "hunyuan": dict(cls="HunyuanVideoTransformer3DModel", full=HUNYUAN_VIDEO, tiny=HUNYUAN_TINY, name="hunyuanvideo",
                    shape=(129, 720, 1280), quick=(33, 360, 640), tiny_shape=(9, 64, 64), text=256, tiny_text=8,
                    batch=1),
    "flux": dict(cls="FluxTransformer2DModel", full=FLUX_1_DEV, tiny=FLUX_TINY, name="flux.1-dev",
                 shape=(1, 1024, 1024), quick=(1, 512, 512), tiny_shape=(1, 128, 128), text=512, tiny_text=8,
                 batch=1),
}
VAE_T, VAE_S = 4, 8  # Wan / HunyuanVideo VAEs: 4x temporal (causal: 4k+1 frames), 8x spatial; FLUX VAE 8x

# Neighborhood kernels kept from earlier RESULTS.md runs (Wan 480p/81f grid), so numbers stay comparable
_NBHD_PRESETS = {(21, 30, 52): {0.10: (9, 15, 27), 0.25: (11, 21, 35)}}


# ----------------------------------------------------------------------------- shapes and inputs
class Setup:
    """Everything shape-related about one benchmark run (model kind, grid, text, inputs)."""

    def __init__(self, kind, cfg, frames, height, width, batch, text, text_pad, device, dtype):
        self.kind, self.cfg, self.batch, self.text = kind, cfg, batch, text
        self.device, self.dtype = device, dtype
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype)

        heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
        self.heads, self.head_dim = heads, hd
        if kind in ("wan", "hunyuan"):
            if (frames - 1) % VAE_T:
                raise ValueError(f"--frames must be 4k+1 for the {kind} VAE, got {frames}")
            lt, lh, lw = (frames - 1) // VAE_T + 1, height // VAE_S, width // VAE_S
            if kind == "wan":
                pt, ph, pw = cfg["patch_size"]
            else:
                pt, ph, pw = cfg["patch_size_t"], cfg["patch_size"], cfg["patch_size"]
            if lt % pt or lh % ph or lw % pw:
                raise ValueError(f"latent {lt}x{lh}x{lw} is not divisible by the patch ({pt}, {ph}, {pw}); "
                                 f"height/width must be multiples of {VAE_S * ph}")
            self.latent = (lt, lh, lw)
            self.grid = (lt // pt, lh // ph, lw // pw)
            x = rnd(batch, cfg["in_channels"], lt, lh, lw)
            if kind == "wan":
                self.joint_text = 0  # text enters through cross-attention
                self.layers = cfg["num_layers"]
                self.inputs = dict(hidden_states=x, timestep=torch.full((batch,), 500, device=device),
                                   encoder_hidden_states=rnd(batch, text, cfg["text_dim"]), return_dict=False)
            else:
                self.joint_text = text  # joint attention: [video tokens, text tokens]
                self.layers = cfg["num_layers"] + cfg["num_single_layers"]
                mask = torch.ones(batch, text, dtype=torch.long, device=device)
                if text_pad:
                    mask[:, text - text_pad:] = 0
                self.inputs = dict(hidden_states=x, timestep=torch.full((batch,), 500, device=device),
                                   encoder_hidden_states=rnd(batch, text, cfg["text_embed_dim"]),
                                   encoder_attention_mask=mask,
                                   pooled_projections=rnd(batch, cfg["pooled_projection_dim"]),
                                   guidance=torch.full((batch,), 6000.0, device=device, dtype=dtype),
                                   return_dict=False)
            self.shape_label = f"{frames}f-{height}x{width}"
        elif kind == "flux":
            if height % (2 * VAE_S) or width % (2 * VAE_S):
                raise ValueError(f"FLUX height/width must be multiples of {2 * VAE_S}, got {height}x{width}")
            gh, gw = height // (2 * VAE_S), width // (2 * VAE_S)  # VAE 8x, then 2x2 latent packing
            self.latent = (height // VAE_S, width // VAE_S)
            self.grid = (gh, gw)
            self.joint_text = text  # joint attention: [text tokens, image tokens]
            self.layers = cfg["num_layers"] + cfg["num_single_layers"]
            img_ids = torch.zeros(gh, gw, 3)
            img_ids[..., 1] = torch.arange(gh)[:, None]
            img_ids[..., 2] = torch.arange(gw)[None, :]
            self.inputs = dict(hidden_states=rnd(batch, gh * gw, cfg["in_channels"]),
                               encoder_hidden_states=rnd(batch, text, cfg["joint_attention_dim"]),
                               pooled_projections=rnd(batch, cfg["pooled_projection_dim"]),
                               timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                               img_ids=img_ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(text, 3, device=device),
                               return_dict=False)
            if cfg.get("guidance_embeds"):
                self.inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
            self.shape_label = f"{height}x{width}"
        else:
            raise ValueError(kind)
        self.grid_tokens = math.prod(self.grid)
        self.seq = self.grid_tokens + self.joint_text  # self-attention sequence length

    def describe(self):
        return dict(model=self.kind, grid=list(self.grid), latent=list(self.latent), grid_tokens=self.grid_tokens,
                    joint_text_tokens=self.joint_text, text_tokens=self.text, attention_seq=self.seq,
                    batch=self.batch, self_attention_layers=self.layers, heads=self.heads, head_dim=self.head_dim,
                    dtype=str(self.dtype).replace("torch.", ""), device=str(self.device))


def build_model(kind, cfg, device, dtype):
    """The transformer with random weights, initialized on ``device`` (no slow CPU init of 12-13B
    fp32 parameters), then cast to ``dtype``. Peak during the build: the fp32 model (~52 GB for
    HunyuanVideo), freed before anything is measured."""
    import diffusers

    cls = getattr(diffusers, MODELS[kind]["cls"])
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**cfg)
    model = model.to(dtype).eval().requires_grad_(False)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    return model


# ----------------------------------------------------------------------------- patterns
def _odd_options(g, center, spread=4):
    lo, hi = max(1, int(round(center)) - spread), min(g, int(round(center)) + spread)
    opts = [k for k in range(lo, hi + 1) if k % 2 == 1]
    return opts or [min(g, 1 if g < 3 else 3)]


def neighborhood_kernel(grid, target):
    """Odd per-axis kernel sizes (<= grid) whose window covers ~``target`` of the grid's tokens
    (each query attends exactly prod(kernel) grid keys: NATTEN windows shift inside the borders)."""
    preset = _NBHD_PRESETS.get(tuple(grid), {}).get(target)
    if preset is not None:
        return preset
    n = math.prod(grid)
    f = target ** (1.0 / len(grid))
    axes = [_odd_options(g, g * f) for g in grid]
    best, best_key = None, None
    for ks in itertools.product(*axes):
        dens = math.prod(ks) / n
        shape_err = sum(abs(k / g - f) for k, g in zip(ks, grid)) / len(grid)
        key = abs(dens - target) / target + shape_err
        if best_key is None or key < best_key:
            best, best_key = ks, key
    return tuple(best)


def wide_window_kernel(grid, target):
    """A video neighborhood that is short in time and wide in space: the fewest (odd) frames
    ``kT >= 3`` whose window can still reach ~``target`` of the grid with a full-width band of
    ``kH`` rows (``(kT, kH, W)``). In row-major token order its windows are long contiguous runs,
    so nearly all computed blocks are full (Wan 480p: (3, 21, 52), token density 0.10, block
    density 0.11 at 64-token blocks)."""
    T, H, W = grid
    for kt in range(min(3, T - (1 - T % 2)), T + 1, 2):
        kh = int(round(target * T * H / kt))
        kh = max(1, kh - (1 - kh % 2))  # odd
        if kh <= H:
            return (kt, kh, W)
    return (T if T % 2 else T - 1, H if H % 2 else H - 1, W)


def sparse_configs(setup, tiny):
    """(name, pattern, note) for the sparse families at ~90% and ~75% sparsity on the grid. For
    joint-text models the text rows/columns stay dense, so the density over all (q, k) pairs is
    higher than the grid target (printed as ``density``; ``grid_density`` is the window share)."""
    import vidattn

    out = []
    bs = dict(block_size=32) if tiny else {}
    video = len(setup.grid) == 3
    for sp, target in ((90, 0.10), (75, 0.25)):
        ks = neighborhood_kernel(setup.grid, target)
        out.append((f"neighborhood-{sp}", lambda ks=ks: vidattn.Neighborhood(kernel_size=ks, **bs),
                    dict(kernel_size=list(ks), grid_density=round(math.prod(ks) / setup.grid_tokens, 4))))
    if video:
        ks = wide_window_kernel(setup.grid, 0.10)
        out.append(("neighborhood-wide-90", lambda ks=ks: vidattn.Neighborhood(kernel_size=ks, **bs),
                    dict(kernel_size=list(ks), grid_density=round(math.prod(ks) / setup.grid_tokens, 4))))
    if video:
        # the authors' settings: Wan decay 0.2 / 1 sink frame / half band at d=1; HunyuanVideo
        # decay 0.95 / no sink / full band at d=1 (vidattn.patterns.radial)
        rk = dict(decay_factor=0.95, sink_frames=0, dense_near_frames=1) if setup.kind == "hunyuan" else {}
        out.append(("radial", lambda rk=rk: vidattn.Radial(**rk, **bs), dict(radial=rk or "defaults")))
        out.append(("radial-block", lambda rk=rk: vidattn.Radial(**rk, granularity="block", **bs),
                    dict(radial=rk or "defaults", granularity="block")))
    else:
        print("skip radial: Radial needs a (T, H, W) video grid (FLUX has a 2-D image grid)", flush=True)
    out.append(("rectified-75", lambda: vidattn.RectifiedSparse(keep=0.25, **bs), dict(keep=0.25)))
    out.append(("rectified-90", lambda: vidattn.RectifiedSparse(keep=0.10, **bs), dict(keep=0.10)))
    if video:
        out.append(("grid", lambda: vidattn.PermutedGrid(**bs), {}))
    else:
        print("skip grid: PermutedGrid needs a (T, H, W) video grid", flush=True)
    return out


def preset_configs(setup, spec: str):
    """(name, pattern, note) for ``spec`` = comma-separated ``preset@sparsity`` (e.g.
    ``neighborhood@0.75,svg@0.9``): the quality harness's presets (:mod:`vidattn.quality.presets`)
    fitted to this model's token grid, so a configuration measured for quality on the reference
    model is timed here at the same family and sparsity."""
    from vidattn.quality.presets import fit_pattern

    out = []
    for item in [x.strip() for x in (spec or "").split(",") if x.strip()]:
        name, _, lv = item.partition("@")
        if not lv:
            raise ValueError(f"--presets entries are preset@sparsity, e.g. neighborhood@0.75; got {item!r}")
        out.append((f"{name}@{lv}", lambda n=name, s=float(lv): fit_pattern(n, s, setup.grid),
                    dict(preset=name, target_sparsity=float(lv))))
    return out


# ----------------------------------------------------------------------------- timing (shared helpers)
def _sync(dev):
    sync(dev)


def _time_ms(fn, dev, warmup=1, reps=3):
    """Median ms of ``reps`` calls after ``warmup`` calls (:func:`vidattn.bench.timing.time_ms`)."""
    return time_ms(fn, dev, warmup=warmup, reps=reps)


def _peak_gib(dev):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None


def _reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _sdpa_ctx(dev, which):
    """SDPA backend context: ``which`` first, with fallbacks for calls it cannot take (e.g. the
    HunyuanVideo text refiner's masked attention), where torch supports priorities."""
    if dev.type != "cuda" or which == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[which]
    rest = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    try:
        return sdpa_kernel([first] + rest, set_priority=True)
    except TypeError:  # torch without set_priority: the chosen backend only
        return sdpa_kernel([first])


_DENSE_NAMES = {"cudnn": "dense-sdpa-CUDNN_ATTENTION", "flash": "dense-sdpa-FLASH_ATTENTION",
                "default": "dense-sdpa-default"}


@contextlib.contextmanager
def hunyuan_unmasked_dense(active):
    """HunyuanVideo always passes a [B, 1, 1, S] bool mask to its self-attention; with unpadded
    text it is all True. SDPA with any mask cannot use the flash kernel (and cuDNN may refuse it),
    so for the dense baselines drop it (exact: all True). vidattn drops an all-True mask itself."""
    if not active:
        yield
        return
    import diffusers.models.transformers.transformer_hunyuan_video as hv

    orig = hv.dispatch_attention_fn

    def dispatch(query, key, value, attn_mask=None, *args, **kwargs):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = None
        return orig(query, key, value, attn_mask, *args, **kwargs)

    hv.dispatch_attention_fn = dispatch
    try:
        yield
    finally:
        hv.dispatch_attention_fn = orig


# ----------------------------------------------------------------------------- compile / CUDA graphs
class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        try:
            msg = record.getMessage()
        except Exception:
            return
        if "cudagraph" in msg.lower() or "skipping cudagraphs" in msg.lower():
            self.messages.append(msg.splitlines()[0][:300])


@contextlib.contextmanager
def compile_diagnostics():
    """Count dynamo graph breaks and inductor CUDA-graph skips (with their reasons) in the block."""
    from torch._dynamo.utils import counters

    counters.clear()
    cap = _LogCapture()
    loggers = [logging.getLogger(n) for n in ("torch", "torch._inductor", "torch._inductor.cudagraph_utils")]
    for lg in loggers:
        lg.addHandler(cap)
    info = {}
    try:
        yield info
    finally:
        for lg in loggers:
            lg.removeHandler(cap)
        info["graph_breaks"] = int(sum(counters["graph_break"].values()))
        info["graph_break_reasons"] = [str(k)[:200] for k in list(counters["graph_break"])[:5]]
        info["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
        info["cudagraph_messages"] = list(dict.fromkeys(cap.messages))[:5]


# ----------------------------------------------------------------------------- the benchmark
def _density(handle):
    def mean(d):
        d = d() if callable(d) else d
        vals = list(d.values()) if isinstance(d, dict) else list(d or [])
        return round(sum(vals) / len(vals), 4) if vals else None

    return mean(getattr(handle, "token_densities", None)), mean(getattr(handle, "densities", None))


def run_benchmark(args, setup, model, results, notes):
    import vidattn

    dev = setup.device
    label = f"{MODELS[setup.kind]['name']}{'-tiny' if args.tiny else ''}-{setup.shape_label}-b{setup.batch}"
    inputs = setup.inputs
    dense_ref = {}

    def step(m):
        with torch.no_grad():
            return m(**inputs)[0]

    def rec(name, ms, status="ok", **extra):
        r = dict(model=label, name=name, status=status, ms=None if ms is None else round(ms, 3 if args.tiny else 1),
                 peak_gib=_peak_gib(dev), **extra)
        if ms is not None and dense_ref and "speedup_vs_dense" not in extra and not name.startswith("self-attn"):
            r["speedup_vs_dense"] = round(dense_ref["ms"] / ms, 3)
        results.append(r)
        print(json.dumps(r), flush=True)
        return r

    def timed(fn, name, **extra):
        """First call (timed alone), remaining warmup, timed reps, optional profiled step."""
        _reset_peak(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        first = time.perf_counter() - t0
        ms = _time_ms(fn, dev, warmup=max(0, args.warmup - 1), reps=args.reps)
        peak = _peak_gib(dev)
        bd = profile_step(fn, dev) if args.breakdown else None
        r = rec(name, ms, first_call_s=round(first, 2), **extra)
        r["peak_gib"] = peak
        if bd is not None:
            r["breakdown"] = bd
        return r

    # ---- dense baselines (eager, diffusers' own attention processors)
    dense_kinds = [d for d in args.dense.split(",") if d and d != "none"]
    if dev.type != "cuda":
        dense_kinds = ["default"] if dense_kinds else []
    for dk in dense_kinds:
        name = f"{_DENSE_NAMES[dk]}-eager"
        try:
            with _sdpa_ctx(dev, dk):
                r = timed(lambda: step(model), name, density=1.0)
            if not dense_ref:
                dense_ref.update(name=name, ms=r["ms"])
                r["speedup_vs_dense"] = 1.0
        except Exception as e:
            rec(name, None, status="failed", error=f"{type(e).__name__}: {e}"[:300])
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
    if dense_ref:
        notes.append(f"speedup_vs_dense is relative to {dense_ref['name']}")

    # ---- attention alone (all self-attention layers, no projections): the Amdahl bound
    if dense_kinds:
        try:
            q = torch.randn(setup.batch, setup.heads, setup.seq, setup.head_dim, device=dev, dtype=setup.dtype)
            with _sdpa_ctx(dev, dense_kinds[0]):
                f = lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)  # noqa: E731
                attn_ms = _time_ms(f, dev, warmup=1 if args.tiny else 3, reps=3 if args.tiny else 10)
            del q
            tot = setup.layers * attn_ms
            rec(f"self-attn-{setup.layers}-layers-{dense_kinds[0]}", tot, per_call_ms=round(attn_ms, 3),
                share=round(tot / dense_ref["ms"], 3) if dense_ref else None)
        except Exception as e:
            print(f"FAILED attention-alone: {type(e).__name__}: {e}", flush=True)

    # ---- vidattn: dense (FlexAttention) and the sparse families
    dense_backend = "flex" if dev.type == "cuda" else args.backend
    configs = [(f"dense-{'flex' if dense_backend == 'flex' else 'vidattn'}", lambda: vidattn.Dense(),
                dict(backend=dense_backend))]
    configs += sparse_configs(setup, args.tiny)
    if args.patterns:
        keep = set(p.strip() for p in args.patterns.split(",") if p.strip())
        configs = [c for c in configs if c[0] in keep or c[0].split("-")[0] in keep]
    configs += preset_configs(setup, args.presets)
    for name, make, meta in configs:
        backend = meta.get("backend", args.backend)
        try:
            pattern = make()
            t0 = time.perf_counter()
            handle = vidattn.apply(model, pattern, backend=backend)
            apply_s = time.perf_counter() - t0
            r = timed(lambda: step(model), f"{name}-eager",
                      **{k: v for k, v in meta.items() if k != "backend"})
            r["density"], r["block_density"] = _density(handle)
            r["backend"] = backend
            r["apply_s"] = round(apply_s, 3)
            if r["density"] is not None:
                print(f"  {name}: token density {r['density']} (block density {r['block_density']})", flush=True)
        except Exception as e:
            rec(f"{name}-eager", None, status="failed", error=f"{type(e).__name__}: {e}"[:300])
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
        finally:
            vidattn.remove(model)
            pattern = handle = None
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    # ---- torch.compile (default mode) and CUDA graphs (mode="reduce-overhead")
    all_cfg = {c[0]: c for c in sparse_configs(setup, args.tiny)} if (args.compile or args.cuda_graphs) else {}
    for mode, names, suffix in ((None, args.compile, "compiled"), ("reduce-overhead", args.cuda_graphs, "cudagraphs")):
        if not names:
            continue
        wanted = ["dense"] + [n for n in names.split(",") if n and n != "dense"]
        if mode == "reduce-overhead" and dev.type != "cuda":
            for n in wanted:
                rec(f"{n}-{suffix}", None, status="skipped", reason="CUDA graphs need a CUDA device")
            notes.append("cuda-graphs: skipped (no CUDA device)")
            continue
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        for n in wanted:
            row = f"{n}-{suffix}"
            if n != "dense" and n not in all_cfg:
                rec(row, None, status="skipped", reason=f"unknown config {n!r} (choose from {sorted(all_cfg)})")
                continue
            dk = dense_kinds[0] if dense_kinds else ("cudnn" if dev.type == "cuda" else "default")
            try:
                with compile_diagnostics() as diag:
                    if n != "dense":
                        vidattn.apply(model, all_cfg[n][1](), backend=args.backend)
                        # one eager step first: plans and kernel-side caches are built outside the
                        # compiled graph (and outside the CUDA-graph memory pool, which must not
                        # hold tensors that outlive a replay)
                        step(model)
                    cm = torch.compile(model, mode=mode)
                    with _sdpa_ctx(dev, dk):
                        _reset_peak(dev)
                        t0 = time.perf_counter()
                        step(cm)
                        step(cm)  # reduce-overhead records the CUDA graph on the 2nd/3rd call
                        _sync(dev)
                        compile_s = time.perf_counter() - t0
                        ms = _time_ms(lambda: step(cm), dev, warmup=1, reps=args.reps)
                        peak = _peak_gib(dev)
                        bd = profile_step(lambda: step(cm), dev) if args.breakdown else None
                extra = dict(compile_s=round(compile_s, 1), graph_breaks=diag["graph_breaks"], sdpa=dk)
                if mode == "reduce-overhead":
                    skips = diag["cudagraph_skips"]
                    extra.update(cudagraph_skips=skips, cudagraph_messages=diag["cudagraph_messages"],
                                 graph_break_reasons=diag["graph_break_reasons"],
                                 cudagraphs=("not used: " + "; ".join(diag["cudagraph_messages"][:2])) if skips else
                                 ("whole step" if not diag["graph_breaks"] else
                                  f"per graph segment ({diag['graph_breaks']} graph breaks run eagerly between)"))
                    print(f"  cudagraphs {n}: {extra['cudagraphs']}", flush=True)
                    notes.append(f"cuda-graphs {n}: {extra['cudagraphs']}")
                r = rec(row, ms, **extra)
                r["peak_gib"] = peak
                if bd is not None:
                    r["breakdown"] = bd
            except Exception as e:
                full = f"{type(e).__name__}: {e}"
                msg = full.splitlines()[0][:300]
                detail = [ln.strip() for ln in full.splitlines()[1:] if ln.strip()]
                rec(row, None, status="failed", error=msg, error_detail=" | ".join(detail[-6:])[-800:] or None)
                why = ""
                if mode and "captur" in full.lower():
                    why = (" -> CUDA graphs cannot capture this path: a host-device sync or host read of a device "
                           "value runs inside the captured region (eager/compiled rows still apply)")
                rec_note = f"cuda-graphs {n}: failed: {msg}{why}" if mode else f"compile {n}: failed: {msg}"
                notes.append(rec_note)
                print(f"FAILED {row}: {msg}{why}", flush=True)
            finally:
                vidattn.remove(model)
                cm = None
                torch._dynamo.reset()
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()


def _fmt(v, f="%.1f"):
    return "" if v is None else (f % v if isinstance(v, (int, float)) else str(v))


def print_tables(results, tiny):
    f = "%.3f" if tiny else "%.1f"
    print("\n%-36s %10s %8s %8s %8s" % ("config", "ms/step", "speedup", "density", "peak GiB"))
    for r in results:
        ms = _fmt(r["ms"], f) if r["status"] == "ok" else r["status"].upper()
        print("%-36s %10s %8s %8s %8s" % (r["name"][:36], ms, _fmt(r.get("speedup_vs_dense"), "%.3f"),
                                          _fmt(r.get("density"), "%.3f"), _fmt(r.get("peak_gib"), "%.2f")))
    rows = [r for r in results if isinstance(r.get("breakdown"), dict)]
    if rows:
        print("\n%-36s %10s %16s %16s %16s %16s %16s" % ("breakdown (1 profiled step)", "wall ms", "attention",
                                                          "linear", "other", "GPU idle", "sparse overhead"))
        for r in rows:
            b = r["breakdown"]
            if "error" in b:
                print("%-36s profiler failed: %s" % (r["name"][:36], b["error"]))
                continue

            def cell(ms, share):
                return "" if ms is None else f"{ms:.1f} ({100 * share:.0f}%)" if share is not None else f"{ms:.1f}"

            idle = b.get("idle_ms")
            oh = b.get("sparse_overhead_ms")
            print("%-36s %10.1f %16s %16s %16s %16s %16s" % (
                r["name"][:36], b["wall_ms"], cell(b["attention_ms"], b["attention_share"]),
                cell(b["linear_ms"], b["linear_share"]), cell(b["other_ms"], b["other_share"]),
                cell(idle, b.get("idle_share")),
                "" if oh is None else f"{oh:.1f} ({b['sparse_overhead_pct']:.1f}%)"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vidattn bench model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="wan", choices=sorted(MODELS), help="wan (Wan2.1-1.3B), hunyuan "
                   "(HunyuanVideo 13B), flux (FLUX.1-dev 12B)")
    p.add_argument("--frames", type=int, default=None, help="video frames, 4k+1 (wan 81, hunyuan 129)")
    p.add_argument("--height", type=int, default=None, help="pixels (wan 480, hunyuan 720, flux 1024)")
    p.add_argument("--width", type=int, default=None, help="pixels (wan 832, hunyuan 1280, flux 1024)")
    p.add_argument("--batch", type=int, default=None, help="batch (wan 2 = CFG; hunyuan, flux 1: guidance-distilled)")
    p.add_argument("--text-tokens", type=int, default=None, help="text tokens (wan 512, hunyuan 256, flux 512)")
    p.add_argument("--text-pad", type=int, default=0, help="hunyuan: mask out the last N text tokens (padded prompt)")
    p.add_argument("--presets", default="", help="comma-separated preset@sparsity (quality presets fitted to the grid), "
                   "e.g. neighborhood@0.75,svg@0.9: the configurations of the quality Pareto table")
    p.add_argument("--patterns", default="", help="comma-separated vidattn config names (or families) to run: "
                   "dense-flex, neighborhood-90, neighborhood-75, neighborhood-wide-90, radial, radial-block, rectified-75, rectified-90, "
                   "grid (default: all that fit the model)")
    p.add_argument("--dense", default="cudnn,flash", help="dense SDPA baselines: cudnn,flash or none "
                   "(the first one is the speed-up reference)")
    p.add_argument("--backend", default="auto", help="vidattn backend for the sparse configs")
    p.add_argument("--compile", default="", help="comma-separated config names to also run torch.compile'd "
                   "(dense cuDNN always included)")
    p.add_argument("--cuda-graphs", default="", help="comma-separated config names to also run with "
                   "torch.compile(mode='reduce-overhead') (CUDA graphs); dense always included")
    p.add_argument("--breakdown", action="store_true", help="profile one step per config: attention / linear / "
                   "other and sparse overhead")
    p.add_argument("--warmup", type=int, default=None, help="steps before timing, incl. the first (default 1)")
    p.add_argument("--reps", type=int, default=None, help="timed steps, median reported (default 3; hunyuan 2)")
    p.add_argument("--quick", action="store_true", help="smaller shape for a smoke run")
    p.add_argument("--tiny", action="store_true", help="tiny configs and shapes; CPU unless --device cuda (CI)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (--tiny only)")
    p.add_argument("--json", default="", help="write results here")
    args = p.parse_args(argv)

    spec = MODELS[args.model]
    dev = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("vidattn bench model needs a CUDA GPU (or --tiny for the CPU smoke run)", file=sys.stderr)
        return 2
    if dev.type != "cuda" and not args.tiny:
        print("full-size configs need a CUDA GPU; use --tiny on CPU", file=sys.stderr)
        return 2
    if args.warmup is None:
        args.warmup = 0 if args.tiny else 1
    if args.reps is None:
        args.reps = 1 if args.tiny else (2 if args.model == "hunyuan" and not args.quick else 3)
    if args.tiny and args.backend == "auto" and dev.type == "cpu":
        args.backend = "reference"
    shape = spec["tiny_shape"] if args.tiny else spec["quick"] if args.quick else spec["shape"]
    frames = args.frames if args.frames is not None else shape[0]
    height = args.height if args.height is not None else shape[1]
    width = args.width if args.width is not None else shape[2]
    text = args.text_tokens if args.text_tokens is not None else (spec["tiny_text"] if args.tiny else spec["text"])
    batch = args.batch if args.batch is not None else spec["batch"]
    if args.text_pad and (args.model != "hunyuan" or not 0 <= args.text_pad < text):
        print("--text-pad is for --model hunyuan, 0 <= N < text tokens", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = spec["tiny"] if args.tiny else spec["full"]
    try:
        setup = Setup(args.model, cfg, frames, height, width, batch, text, args.text_pad, dev, dtype)
    except ValueError as e:
        print(f"bad shape: {e}", file=sys.stderr)
        return 2

    import diffusers

    env = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
               diffusers=diffusers.__version__)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    print(" ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    desc = setup.describe()
    print(f"{spec['name']}{' (tiny)' if args.tiny else ''}: {json.dumps(desc)}", flush=True)
    t0 = time.perf_counter()
    model = build_model(args.model, cfg, dev, dtype)
    build_s = time.perf_counter() - t0
    nparams = sum(p.numel() for p in model.parameters())
    print(f"built {MODELS[args.model]['cls']} ({nparams / 1e9:.2f}B params) in {build_s:.1f} s; weights "
          f"{_fmt(torch.cuda.memory_allocated() / 2**30 if dev.type == 'cuda' else None, '%.1f')} GiB", flush=True)

    results, notes = [], []
    with hunyuan_unmasked_dense(args.model == "hunyuan" and args.text_pad == 0):
        if args.model == "hunyuan" and args.text_pad == 0:
            notes.append("hunyuan: the all-True text mask is dropped before SDPA (exact); vidattn drops it itself")
        run_benchmark(args, setup, model, results, notes)
    print_tables(results, args.tiny)
    for n in notes:
        print("note:", n)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(env, gpu=env["device"], config=dict(desc, name=spec["name"], tiny=args.tiny,
                                                               params_b=round(nparams / 1e9, 3),
                                                               build_s=round(build_s, 1)),
                           settings=dict(warmup=args.warmup, reps=args.reps, backend=args.backend,
                                         dense=args.dense, breakdown=args.breakdown),
                           notes=notes, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
