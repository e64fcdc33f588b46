"""The comparison runner: dense baseline (disk-cached videos), then each sparse config, on several seeds.

Same pipeline, same seeds, same inputs for every run. Seeds run as one batch where the pipeline
allows it (the reference pipeline: one initial-noise tensor per seed stacked on the batch axis;
diffusers pipelines: a list of generators with ``num_videos_per_prompt``), else one call per seed.

Quality phase (probes on): every config is sampled on every seed; recorded per step (through
``callback_on_step_end``) are the latents and the predicted clean sample
``x0 = x_{i+1} - sigma_{i+1} (x_{i+1} - x_i) / (sigma_{i+1} - sigma_i)`` (flow-matching Euler
schedulers with ``scheduler.sigmas``), compared with dense's at the same step (PSNR with the dense
tensor's peak-to-peak as data range: :func:`metrics.tensor_psnr`); per seed, the video metrics
against dense (:func:`metrics.video_metrics`, PSNR over the whole video), aggregated as mean /
std / min / max over seeds, next to the floors (:func:`metrics.floor_metrics`: flat colour, first
frame frozen, another seed's dense sample) and as dB above the strongest floor; the attention
probe summary (:class:`probes.AttentionProbe`, per model layer index).

Timing phase (probes and recorders off): :func:`timing.time_configs` times dense, every config's
sparse step, dense again, in this process (warm-up excluded). The dense cache stores videos and
latents only, never timings. Its key (:func:`dense_cache_key`) covers the pipeline class, the
transformer config and weights, the scheduler config, the call, the seeds, device/dtype and the
torch/diffusers/numpy/vidattn versions.

Writes the report via :func:`report.write_report`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from . import metrics as M
from .probes import AttentionProbe
from .report import REPORT_SCHEMA_VERSION, write_report

__all__ = ["run_comparison", "model_fingerprint", "dense_cache_key", "pattern_label", "as_config", "SeedBatch",
           "DEFAULT_NUM_SEEDS"]

DEFAULT_NUM_SEEDS = 4
_UNRELATED_OFFSET = 7919


def _transformers(pipe):
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]


def model_fingerprint(pipe) -> str:
    """Short hash of the pipeline class, transformer config(s) and parameter checksums."""
    h = hashlib.sha256(f"{type(pipe).__module__}.{type(pipe).__qualname__}".encode())
    for t in _transformers(pipe):
        h.update(json.dumps(dict(getattr(t, "config", {})), sort_keys=True, default=str).encode())
        with torch.no_grad():
            for n, p in t.named_parameters():
                h.update(n.encode())
                h.update(np.float64(p.detach().double().sum().item()).tobytes())
    return h.hexdigest()[:16]


def _versions() -> Dict[str, str]:
    import diffusers

    import vidattn

    return {"torch": str(torch.__version__), "diffusers": str(diffusers.__version__), "numpy": str(np.__version__),
            "vidattn": str(getattr(vidattn, "__version__", "?"))}


def dense_cache_key(pipe, settings: Mapping[str, Any]) -> str:
    """Cache key of the dense baseline: model fingerprint (pipeline class, transformer config,
    weights), scheduler class + config, ``settings`` (seeds, call, device, dtype, batching) and
    the library versions."""
    sch = getattr(pipe, "scheduler", None)
    sched = {"class": type(sch).__name__, "config": dict(getattr(sch, "config", {}) or {})} if sch is not None else None
    payload = [model_fingerprint(pipe), f"{type(pipe).__module__}.{type(pipe).__qualname__}", sched, dict(settings),
               _versions()]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def pattern_label(pattern) -> str:
    """Readable one-line description of a pattern / config (its dataclass repr) or ``"dense"``."""
    return "dense" if pattern is None else repr(pattern)


def as_config(value, apply_kwargs: Optional[Mapping[str, Any]] = None):
    """``SparseAttentionConfig`` from a pattern (with ``apply_kwargs``: dense_steps, dense_layers,
    heads, backend) or a config (returned as is)."""
    from vidattn.patterns.base import Pattern
    from vidattn.pipelines.apply import SparseAttentionConfig

    if isinstance(value, SparseAttentionConfig):
        return value
    if isinstance(value, Pattern):
        kw = dict(apply_kwargs or {})
        if "dense_layers" in kw:
            kw["dense_layers"] = tuple(kw["dense_layers"])
        if kw.get("heads") is not None:
            kw["heads"] = tuple(kw["heads"])
        return SparseAttentionConfig(value, **kw)
    raise TypeError(f"config values must be vidattn patterns, SparseAttentionConfig or None, got {type(value).__name__}")


def _plain_kwargs(kw: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in kw.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


# =============================================================================== seeds
class SeedBatch:
    """Pipeline call kwargs for a list of seeds, batched where the pipeline allows.

    ``calls(n_steps)`` yields ``(offset, kwargs, initial_latents or None)``: one call for the
    whole batch (``batched``) or one per seed; ``offset`` is the index of the call's first seed.
    """

    def __init__(self, pipe, call_kwargs: Mapping[str, Any], seeds: Sequence[int], batched: bool = True):
        from .reference_model.model import ReferenceVideoPipeline

        self.pipe, self.call, self.seeds = pipe, dict(call_kwargs), [int(s) for s in seeds]
        self.reference = isinstance(pipe, ReferenceVideoPipeline)
        prompt = self.call.get("prompt")
        self.batched = bool(batched) and len(self.seeds) > 1 and (self.reference or not isinstance(prompt, (list, tuple)))

    def _ref_latents(self, seeds):
        t = self.pipe.transformer
        shape = (1, t.config.in_channels, int(self.call.get("num_frames", 8)), int(self.call.get("height", 32)),
                 int(self.call.get("width", 32)))
        return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32)
                          for s in seeds])

    def _prompts(self, n):
        p = self.call.get("prompt")
        if isinstance(p, (list, tuple)):
            if len(p) == len(self.seeds):
                return list(p)
            return [p[i % len(p)] for i in range(n)]
        return [p or ""] * n

    def calls(self, n_steps: Optional[int] = None):
        groups = [(0, self.seeds)] if self.batched else [(i, [s]) for i, s in enumerate(self.seeds)]
        for off, ss in groups:
            kw = dict(self.call)
            if n_steps is not None:
                kw["num_inference_steps"] = int(n_steps)
            init = None
            if self.reference:
                init = self._ref_latents(ss)
                prompts = self._prompts(len(self.seeds))[off:off + len(ss)]
                kw.update(prompt=prompts, latents=init.clone())
                if isinstance(kw.get("negative_prompt"), (list, tuple)):
                    kw["negative_prompt"] = list(kw["negative_prompt"])[off:off + len(ss)]
            elif len(ss) > 1:
                kw.update(generator=[torch.Generator().manual_seed(s) for s in ss], num_videos_per_prompt=len(ss))
            else:
                kw["generator"] = torch.Generator().manual_seed(ss[0])
            yield off, kw, init

    def timing_kwargs(self, n_steps: int) -> Dict[str, Any]:
        """Kwargs of one call covering every seed (the first group when not batched)."""
        return next(iter(self.calls(n_steps)))[1]


# =============================================================================== one sampling pass
class _Recorder:
    """Per-step latents / predicted-clean samples: stores them (dense) or compares with dense's."""

    def __init__(self, n_seeds: int, n_steps: int, dense: Optional[Dict[str, List]] = None):
        self.n, self.steps = n_seeds, n_steps
        self.dense = dense
        self.lat: List[Optional[torch.Tensor]] = [None] * n_steps
        self.x0: List[Optional[torch.Tensor]] = [None] * n_steps
        self.err_lat = np.full((n_steps, n_seeds), np.nan)
        self.err_x0 = np.full((n_steps, n_seeds), np.nan)
        self.prev: Dict[int, torch.Tensor] = {}

    def start_call(self, offset: int, init: Optional[torch.Tensor]):
        self.offset = offset
        self.prev_t = init.float() if init is not None else None

    def step(self, pipe, i: int, latents: torch.Tensor):
        if i >= self.steps:
            return
        lat = latents.detach().float().cpu()
        x0 = None
        sch = getattr(pipe, "scheduler", None)
        sig = getattr(sch, "sigmas", None) if "FlowMatch" in type(sch).__name__ else None
        if sig is not None and self.prev_t is not None and len(sig) > i + 1:
            s0, s1 = float(sig[i]), float(sig[i + 1])
            if s1 != s0:
                x0 = lat - s1 * (lat - self.prev_t) / (s1 - s0)
        self.prev_t = lat
        sl = slice(self.offset, self.offset + lat.shape[0])
        if self.dense is None:
            for store, val in ((self.lat, lat), (self.x0, x0)):
                if val is None:
                    continue
                if store[i] is None:
                    store[i] = torch.zeros((self.n,) + tuple(val.shape[1:]))
                store[i][sl] = val
            return
        for b in range(lat.shape[0]):
            j = self.offset + b
            dl = self.dense["lat"][i]
            if dl is not None and tuple(dl.shape[1:]) == tuple(lat.shape[1:]):
                self.err_lat[i, j] = M.tensor_psnr(dl[j], lat[b])
            dx = self.dense["x0"][i] if self.dense["x0"] else None
            if x0 is not None and dx is not None:
                self.err_x0[i, j] = M.tensor_psnr(dx[j], x0[b])

    def summary(self) -> Dict[str, Any]:
        def col(a):
            return [None if not np.isfinite(r).any() else float(np.nanmean(r)) for r in a]

        return {"latent_psnr": col(self.err_lat), "x0_psnr": col(self.err_x0),
                "latent_psnr_per_seed": [[None if not np.isfinite(x) else float(x) for x in r] for r in self.err_lat.T]}


def _sample(pipe, batch: SeedBatch, probe: Optional[AttentionProbe], rec: Optional[_Recorder], progress: bool,
            label: str) -> Dict[str, Any]:
    n_steps = int(batch.call.get("num_inference_steps", 20))
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_steps * (1 if batch.batched else len(batch.seeds)), desc=label, leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    videos, finals = [None] * len(batch.seeds), [None] * len(batch.seeds)
    try:
        for off, kw, init in batch.calls():
            if rec is not None:
                rec.start_call(off, init)
            last = {}

            def cb(p, i, t, ckw):
                if "latents" in ckw:
                    last["latents"] = ckw["latents"]
                    if rec is not None:
                        rec.step(p, i, ckw["latents"])
                if probe is not None:
                    probe.start_step(i + 1)
                if bar is not None:
                    bar.update(1)
                return {}

            if probe is not None:
                probe.start_step(0)
            kw.update(callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"], output_type="np")
            out = pipe(**kw)
            frames = out.frames if hasattr(out, "frames") else out[0]
            frames = np.asarray(frames, dtype=np.float32)
            lat = last.get("latents")
            for b in range(frames.shape[0]):
                videos[off + b] = frames[b]
                finals[off + b] = lat[b].detach().float().cpu() if lat is not None else None
    finally:
        if bar is not None:
            bar.close()
    return {"videos": np.stack(videos), "latents": finals}


# =============================================================================== cache
def _save_cache(path: str, dense: Dict[str, Any], settings: Mapping[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    arrays = {"videos": dense["videos"]}
    if all(x is not None for x in dense["latents"]):
        arrays["latents"] = torch.stack(dense["latents"]).numpy()
    rec = dense["rec"]
    for key in ("lat", "x0"):
        vals = getattr(rec, key)
        if vals and all(v is not None for v in vals):
            arrays[f"traj_{key}"] = torch.stack(vals).to(torch.float16).numpy()  # [steps, seeds, ...]
    tmp = path + ".tmp.npz"
    np.savez(tmp, meta=np.array(json.dumps({"settings": dict(settings)}, default=str)), **arrays)
    os.replace(tmp, path)


def _load_cache(path: str, n_seeds: int, n_steps: int) -> Dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        rec = _Recorder(n_seeds, n_steps)
        for key in ("lat", "x0"):
            if f"traj_{key}" in z.files:
                arr = torch.from_numpy(z[f"traj_{key}"].astype(np.float32))
                setattr(rec, key, [arr[i] for i in range(arr.shape[0])])
        lat = [torch.from_numpy(x) for x in z["latents"]] if "latents" in z.files else [None] * n_seeds
        return {"videos": z["videos"].copy(), "latents": lat, "rec": rec}


# =============================================================================== main
def _device_dtype(pipe):
    for t in _transformers(pipe):
        p = next(t.parameters())
        return str(p.device), str(p.dtype).replace("torch.", "")
    return "cpu", "float32"


def _per_seed_metrics(dense_v, test_v, seeds) -> List[Dict[str, Any]]:
    out = []
    for i, s in enumerate(seeds):
        m = M.video_metrics(dense_v[i], test_v[i])
        m["seed"] = int(s)
        out.append(m)
    return out


def _aggregate_metrics(per_seed: List[Dict[str, Any]], floors: Mapping[str, Mapping[str, float]]) -> Dict[str, Any]:
    agg = lambda key: M.aggregate([m[key] for m in per_seed])  # noqa: E731
    p, s = agg("psnr"), agg("ssim")
    out = {
        "psnr": p["mean"], "psnr_std": p["std"], "psnr_min": p["min"], "psnr_max": p["max"],
        "psnr_video": p["mean"], "psnr_frame_mean": agg("psnr_frame_mean")["mean"],
        "ssim": s["mean"], "ssim_std": s["std"], "ssim_min": s["min"],
        "psnr_per_frame": np.mean([m["psnr_per_frame"] for m in per_seed], axis=0).tolist(),
        "ssim_per_frame": np.mean([m["ssim_per_frame"] for m in per_seed], axis=0).tolist(),
        "temporal_warp_error": agg("temporal_warp_error")["mean"],
        "temporal_warp_error_ref": agg("temporal_warp_error_ref")["mean"],
        "pixel_errors": per_seed[0]["pixel_errors"], "lpips": per_seed[0]["lpips"],
        "per_seed": [{"seed": m["seed"], "psnr": m["psnr"], "ssim": m["ssim"], "psnr_frame_mean": m["psnr_frame_mean"],
                      "temporal_warp_error": m["temporal_warp_error"]} for m in per_seed],
    }
    if floors:
        out["psnr_above"] = {k: out["psnr"] - f["psnr"] for k, f in floors.items()}
        out["ssim_above"] = {k: out["ssim"] - f["ssim"] for k, f in floors.items()}
        out["above_floor_db"] = out["psnr"] - max(f["psnr"] for f in floors.values())
        out["ssim_above_floor"] = out["ssim"] - max(f["ssim"] for f in floors.values())
    return out


def run_comparison(pipe, configs: Mapping[str, Any], *, call_kwargs: Mapping[str, Any], seeds: Optional[Sequence[int]] = None,
                   seed: int = 0, out_dir: str, cache_dir: Optional[str] = None, use_cache: bool = True,
                   probes: bool = True, progress: bool = True, apply_kwargs: Optional[Mapping[str, Any]] = None,
                   model_name: Optional[str] = None, probe_kwargs: Optional[Mapping[str, Any]] = None,
                   write: bool = True, batch_seeds: bool = True, timing: bool = True, timing_steps: int = 2,
                   timing_warmup: int = 1, timing_repeats: int = 1, trajectory: bool = True,
                   save_videos: bool = False, extra: Optional[Mapping[str, Any]] = None,
                   videos_out: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run dense and every sparse config on ``pipe`` over several seeds; write and return the report.

    Args:
        pipe: diffusers video pipeline accepting ``callback_on_step_end``, ``generator`` and
            ``output_type="np"`` (frames ``[B, F, H, W, C]`` in [0, 1]); e.g. WanPipeline or the reference.
        configs: name -> vidattn pattern, ``SparseAttentionConfig`` or None (None entries are skipped:
            dense is always the baseline).
        call_kwargs: pipeline call arguments (prompt, num_frames, height, width, num_inference_steps...).
        seeds: the seeds (default: ``DEFAULT_NUM_SEEDS`` seeds from ``seed``); batched when ``batch_seeds``.
        out_dir: where report.json / report.html / side_by_side.mp4 (/ videos.npz) go.
        cache_dir: dense-video cache folder (key: :func:`dense_cache_key`); ``use_cache=False`` ignores it.
        probes: sample attention errors with :class:`AttentionProbe` during the quality runs.
        apply_kwargs: extra ``SparseAttentionConfig`` fields for pattern entries (dense_steps, backend, ...).
        probe_kwargs: arguments of :class:`AttentionProbe` (default: all layers, 2 heads, 64 queries).
        timing: run the timing phase (``timing_steps`` steps after ``timing_warmup``, ``timing_repeats`` calls).
        trajectory: record the per-step latents / predicted clean samples.
        save_videos: also write ``videos.npz`` (every video, float32 ``[seeds, F, H, W, C]``).
        extra: added to the report as is (e.g. ``{"attention_stats": ...}``).
        videos_out: if given, filled with name -> video float32 ``[F, H, W, C]`` in [0, 1] ("dense"
            and every config; the first seed), so a caller can write its own files without re-running a config.
    Returns: the report dict (schema in :mod:`.report`).
    """
    import vidattn

    if not isinstance(configs, Mapping) or not configs:
        raise ValueError("configs must be a non-empty mapping name -> pattern (or None for dense)")
    if "dense" in configs and configs["dense"] is not None:
        raise ValueError("the config name 'dense' is reserved for the dense baseline")
    cfgs = {str(k): as_config(v, apply_kwargs) for k, v in configs.items() if v is not None}
    seeds = [int(seed) + i for i in range(DEFAULT_NUM_SEEDS)] if seeds is None else [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct ints, got {seeds!r}")
    call_kwargs = dict(call_kwargs)
    for k in ("generator", "output_type", "callback_on_step_end_tensor_inputs", "callback_on_step_end", "latents"):
        call_kwargs.pop(k, None)
    n_steps = int(call_kwargs.get("num_inference_steps", 20))
    device, dtype = _device_dtype(pipe)
    dense_seeds = seeds + ([seeds[0] + _UNRELATED_OFFSET] if len(seeds) == 1 else [])
    dbatch = SeedBatch(pipe, call_kwargs, dense_seeds, batch_seeds)
    batch = SeedBatch(pipe, call_kwargs, seeds, batch_seeds)
    settings = {"seed": seeds[0], "seeds": seeds, "device": device, "dtype": dtype,
                "call_kwargs": _plain_kwargs(call_kwargs), "batched": batch.batched or len(seeds) == 1}

    # ---------------------------------------------------------- dense (cached videos)
    key_settings = dict(settings, dense_seeds=dense_seeds, trajectory=bool(trajectory))
    cpath = None
    if cache_dir and use_cache:
        cpath = os.path.join(cache_dir, f"dense_{dense_cache_key(pipe, key_settings)}.npz")
    dense = None
    if cpath and os.path.isfile(cpath):
        try:
            dense = _load_cache(cpath, len(dense_seeds), n_steps)
            dense["cached"] = True
        except (OSError, ValueError, KeyError):
            dense = None
    if dense is None:
        vidattn.remove(pipe)
        rec = _Recorder(len(dense_seeds), n_steps) if trajectory else None
        dense = _sample(pipe, dbatch, None, rec, progress, "dense")
        dense["rec"], dense["cached"] = rec or _Recorder(len(dense_seeds), n_steps), False
        if cpath:
            _save_cache(cpath, dense, key_settings)
    dv = dense["videos"]
    n = len(seeds)
    unrelated = [dv[(i + 1) % len(dense_seeds)] for i in range(n)]
    per_floor = [M.floor_metrics(dv[i], unrelated[i]) for i in range(n)]
    floors = {k: {"psnr": float(np.mean([f[k]["psnr"] for f in per_floor])),
                  "ssim": float(np.mean([f[k]["ssim"] for f in per_floor])),
                  "psnr_std": float(np.std([f[k]["psnr"] for f in per_floor]))} for k in per_floor[0]}
    dense_run = {"cached": bool(dense["cached"]), "temporal_warp_error": float(np.mean([M.temporal_warp_error(dv[i])
                                                                                         for i in range(n)])),
                 "floors": floors}
    videos = {"dense": dv[0]}
    all_videos = {"dense": dv[:n]}
    dtraj = {"lat": dense["rec"].lat, "x0": dense["rec"].x0}

    # ---------------------------------------------------------- sparse configs (quality)
    rows = []
    pk = dict(sample_layers=None, sample_heads=2, max_queries=64)
    pk.update(probe_kwargs or {})
    for name, cfg in cfgs.items():
        handle = vidattn.apply(pipe, cfg)
        probe = AttentionProbe(**pk) if probes else None
        rec = _Recorder(n, n_steps, dense=dtraj) if trajectory else None
        try:
            if probe is not None:
                with probe:
                    run = _sample(pipe, batch, probe, rec, progress, name)
            else:
                run = _sample(pipe, batch, None, rec, progress, name)
            tok, blk, sparse_calls = handle.token_densities, handle.densities, handle.sparse_calls
        finally:
            vidattn.remove(pipe)
        videos[name] = run["videos"][0]
        all_videos[name] = run["videos"]
        lat = None
        dl, sl = dense["latents"][0], run["latents"][0]
        if dl is not None and sl is not None and dl.shape == sl.shape:
            lat = M.tensor_errors(dl, sl)
        per_seed = _per_seed_metrics(dv, run["videos"], seeds)
        from vidattn.plan_file import config_to_dict

        rows.append(dict(
            name=name, pattern=pattern_label(cfg.pattern), config=_jsonable_config(config_to_dict, cfg),
            density={"token": float(np.mean(list(tok.values()))) if tok else None,
                     "block": float(np.mean(list(blk.values()))) if blk else None},
            sparse_calls=int(sparse_calls), speedup=None, timing=None,
            wall_s=None, step_times_s=[], attention_s=None, attention_share=None, peak_memory_bytes=None,
            cached=False, temporal_warp_error=float(np.mean([m["temporal_warp_error"] for m in per_seed])),
            metrics=_aggregate_metrics(per_seed, floors), latent_errors=lat,
            trajectory=rec.summary() if rec is not None else None,
            attention=probe.summary() if probe is not None else None))

    # ---------------------------------------------------------- timing (probes off, same process)
    dense_run.update(wall_s=None, step_times_s=[], attention_s=None, attention_share=None, peak_memory_bytes=None,
                     timing=None)
    if timing and cfgs:
        from .timing import time_configs

        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        tm = time_configs(pipe, cfgs, batch.timing_kwargs, num_steps=n_steps, steps=timing_steps,
                          warmup=timing_warmup, repeats=timing_repeats)
        td = tm["dense"]
        dense_run.update(timing=td, wall_s=td["step_s"] * n_steps, step_times_s=td["step_times_s"],
                         attention_s=td["attention_s"] * n_steps,
                         attention_share=td["attention_s"] / td["step_s"] if td["step_s"] > 0 else None,
                         peak_memory_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None)
        for r in rows:
            t = tm[r["name"]]
            k = cfgs[r["name"]].dense_steps
            r.update(timing=t, speedup=t["speedup"], step_times_s=t["step_times_s"],
                     wall_s=k * td["step_s"] + (n_steps - k) * t["step_s"],
                     attention_s=k * td["attention_s"] + (n_steps - k) * t["attention_s"],
                     attention_share=t["attention_s"] / t["step_s"] if t["step_s"] > 0 else None)

    import diffusers

    env = _versions()
    env["cuda_device"] = torch.cuda.get_device_name() if device.startswith("cuda") else None
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"name": model_name or getattr(pipe, "name_or_path", None) or type(pipe).__name__,
                  "class": type(pipe).__name__, "fingerprint": model_fingerprint(pipe)},
        "settings": settings,
        "environment": env,
        "dense": dense_run,
        "configs": rows,
        "lpips": M.lpips_distance(videos["dense"], videos["dense"]) if M.lpips_available() is None
        else {"skipped": False},
    }
    del diffusers
    if extra:
        report.update(dict(extra))
    if videos_out is not None:
        videos_out.update(videos)
    if write:
        write_report(out_dir, report, videos)
        if save_videos:
            np.savez(os.path.join(out_dir, "videos.npz"), **all_videos)
    return report


def _jsonable_config(fn, cfg):
    try:
        return fn(cfg)
    except TypeError:  # a pattern class outside the registry
        return {"repr": repr(cfg)}
