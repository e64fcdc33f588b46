"""The comparison runner: dense baseline once (disk-cached), then each sparse config.

Same pipeline, same seed, same inputs for every run.  For each run it records wall time per
denoising step (``callback_on_step_end``), total self-attention time and its share of the run
(forward pre/post hooks on the transformer's self-attention modules: CUDA events on GPU,
``perf_counter`` on CPU), peak memory (``torch.cuda.max_memory_allocated`` on GPU, null on CPU),
plan density (from the ``vidattn.apply`` handle), the final latents, and then all metrics against
dense: video metrics (:func:`metrics.video_metrics`), latent tensor errors and the attention probe
summary (:class:`probes.AttentionProbe`).  Writes the report via :func:`report.write_report`.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch

from . import metrics as M
from .probes import AttentionProbe
from .report import REPORT_SCHEMA_VERSION, write_report

__all__ = ["run_comparison", "model_fingerprint", "pattern_label"]


def _transformers(pipe):
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]


def model_fingerprint(pipe) -> str:
    """Short hash of the pipeline class, transformer config(s) and parameter checksums."""
    h = hashlib.sha256(type(pipe).__name__.encode())
    for t in _transformers(pipe):
        h.update(json.dumps(dict(getattr(t, "config", {})), sort_keys=True, default=str).encode())
        with torch.no_grad():
            for n, p in t.named_parameters():
                h.update(n.encode())
                h.update(np.float64(p.detach().double().sum().item()).tobytes())
    return h.hexdigest()[:16]


def pattern_label(pattern) -> str:
    """Readable one-line description of a pattern (its dataclass repr) or ``"dense"``."""
    return "dense" if pattern is None else repr(pattern)


def _plain_kwargs(kw: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in kw.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


class _AttnTimer:
    """Times every self-attention module forward of the given transformers."""

    def __init__(self, models, cuda: bool):
        from vidattn.pipelines.processors import attention_modules, is_self_attention

        self.cuda = cuda
        self.events = []
        self.cpu_total = 0.0
        self._t0 = None
        self._handles = []
        for m in models:
            for name, mod in attention_modules(m).items():
                if is_self_attention(name, mod):
                    self._handles.append(mod.register_forward_pre_hook(self._pre))
                    self._handles.append(mod.register_forward_hook(self._post))

    def _pre(self, mod, args):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._t0 = e
        else:
            self._t0 = time.perf_counter()

    def _post(self, mod, args, out):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append((self._t0, e))
        else:
            self.cpu_total += time.perf_counter() - self._t0

    def total(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return float(sum(a.elapsed_time(b) for a, b in self.events) / 1000.0)
        return float(self.cpu_total)

    def remove(self):
        for h in self._handles:
            h.remove()


def _run_once(pipe, call_kwargs: Dict[str, Any], seed: int, device: str, probe: Optional[AttentionProbe],
              progress: bool, label: str) -> Dict[str, Any]:
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = _AttnTimer(_transformers(pipe), cuda)
    step_times = []
    final = {}
    user_cb = call_kwargs.get("callback_on_step_end")
    n_steps = call_kwargs.get("num_inference_steps")
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_steps, desc=label, leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    last = [0.0]

    def cb(p, i, t, kw):
        sync()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        if "latents" in kw:
            final["latents"] = kw["latents"].detach().float().cpu().clone()
        if probe is not None:
            probe.start_step(i + 1)
        if bar is not None:
            bar.update(1)
        out = user_cb(p, i, t, kw) if user_cb is not None else None
        return out if out is not None else {}

    kwargs = dict(call_kwargs)
    kwargs.update(callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"], output_type="np",
                  generator=torch.Generator(device="cpu").manual_seed(int(seed)))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if probe is not None:
        probe.start_step(0)
    try:
        sync()
        t0 = last[0] = time.perf_counter()
        out = pipe(**kwargs)
        sync()
        wall = time.perf_counter() - t0
        attn = timer.total()
    finally:
        timer.remove()
        if bar is not None:
            bar.close()
    frames = out.frames if hasattr(out, "frames") else out[0]
    video = np.asarray(frames[0] if not isinstance(frames, list) else frames[0], dtype=np.float32)
    return dict(video=video, latents=final.get("latents"), wall_s=float(wall), step_times_s=[float(x) for x in step_times],
                attention_s=attn, attention_share=float(attn / wall) if wall > 0 else None,
                peak_memory_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None)


def _device_dtype(pipe):
    for t in _transformers(pipe):
        p = next(t.parameters())
        return str(p.device), str(p.dtype).replace("torch.", "")
    return "cpu", "float32"


def run_comparison(pipe, configs: Mapping[str, Any], *, call_kwargs: Mapping[str, Any], seed: int = 0,
                   out_dir: str, cache_dir: Optional[str] = None, probes: bool = True, progress: bool = True,
                   apply_kwargs: Optional[Mapping[str, Any]] = None, model_name: Optional[str] = None,
                   probe_kwargs: Optional[Mapping[str, Any]] = None, write: bool = True,
                   videos_out: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run dense once and every sparse config on ``pipe``; write and return the report dict.

    Args:
        pipe: diffusers video pipeline accepting ``callback_on_step_end``, ``generator`` and
            ``output_type="np"`` (frames ``[B, F, H, W, C]`` in [0, 1]); e.g. WanPipeline or the reference.
        configs: name -> vidattn pattern (or None = dense; such entries are reported as the dense run).
        call_kwargs: pipeline call arguments (prompt, num_frames, height, width, num_inference_steps...).
        seed: seed of the CPU generator given to every run.
        out_dir: where report.json / report.html / side_by_side.mp4 go.
        cache_dir: dense-baseline cache folder (key = model fingerprint + call kwargs + seed + device/dtype).
        probes: sample attention errors with :class:`AttentionProbe` during sparse runs.
        apply_kwargs: extra keyword arguments for ``vidattn.apply`` (dense_steps, backend, ...).
        probe_kwargs: arguments of :class:`AttentionProbe` (default: all layers, 2 heads, 64 queries).
        videos_out: if given, filled with name -> video float32 ``[F, H, W, C]`` in [0, 1] ("dense"
            and every config), so a caller can write its own files without re-running a config.
    Returns: the report dict (schema in :mod:`.report`), with ``"_videos"`` removed.
    """
    import vidattn

    if not isinstance(configs, Mapping) or not configs:
        raise ValueError("configs must be a non-empty mapping name -> pattern (or None for dense)")
    if "dense" in configs and configs["dense"] is not None:
        raise ValueError("the config name 'dense' is reserved for the dense baseline")
    call_kwargs = dict(call_kwargs)
    for k in ("generator", "output_type", "callback_on_step_end_tensor_inputs"):
        call_kwargs.pop(k, None)
    device, dtype = _device_dtype(pipe)
    fp = model_fingerprint(pipe)
    settings = {"seed": int(seed), "device": device, "dtype": dtype, "call_kwargs": _plain_kwargs(call_kwargs)}

    # ---------------------------------------------------------- dense (cached)
    key = hashlib.sha256(json.dumps([fp, settings, torch.__version__], sort_keys=True, default=str).encode()).hexdigest()[:20]
    dense = None
    cpath = os.path.join(cache_dir, f"dense_{key}.npz") if cache_dir else None
    if cpath and os.path.isfile(cpath):
        z = np.load(cpath, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        dense = dict(meta, video=z["video"], latents=torch.from_numpy(z["latents"]) if z["latents"].size else None,
                     cached=True)
    if dense is None:
        vidattn.remove(pipe)
        dense = _run_once(pipe, call_kwargs, seed, device, None, progress, "dense")
        dense["cached"] = False
        if cpath:
            os.makedirs(cache_dir, exist_ok=True)
            meta = {k: dense[k] for k in ("wall_s", "step_times_s", "attention_s", "attention_share", "peak_memory_bytes")}
            tmp = cpath + ".tmp.npz"
            lat = dense["latents"].numpy() if dense["latents"] is not None else np.zeros(0, np.float32)
            np.savez(tmp, video=dense["video"], latents=lat, meta=np.array(json.dumps(meta)))
            os.replace(tmp, cpath)
    dense_run = {k: dense[k] for k in ("wall_s", "step_times_s", "attention_s", "attention_share", "peak_memory_bytes",
                                       "cached")}
    dense_run["temporal_warp_error"] = M.temporal_warp_error(dense["video"])
    videos = {"dense": dense["video"]}

    # ---------------------------------------------------------- sparse configs
    rows = []
    pk = dict(sample_layers=None, sample_heads=2, max_queries=64)
    pk.update(probe_kwargs or {})
    for name, pattern in configs.items():
        if pattern is None:
            continue
        handle = vidattn.apply(pipe, pattern, **dict(apply_kwargs or {}))
        probe = AttentionProbe(**pk) if probes else None
        try:
            if probe is not None:
                with probe:
                    run = _run_once(pipe, call_kwargs, seed, device, probe, progress, name)
            else:
                run = _run_once(pipe, call_kwargs, seed, device, None, progress, name)
            tok = handle.token_densities
            blk = handle.densities
            sparse_calls = handle.sparse_calls
        finally:
            vidattn.remove(pipe)
        videos[name] = run["video"]
        lat = None
        if run["latents"] is not None and dense["latents"] is not None and run["latents"].shape == dense["latents"].shape:
            lat = M.tensor_errors(dense["latents"], run["latents"])
        rows.append(dict(
            name=str(name), pattern=pattern_label(pattern),
            density={"token": float(np.mean(list(tok.values()))) if tok else None,
                     "block": float(np.mean(list(blk.values()))) if blk else None},
            sparse_calls=int(sparse_calls),
            speedup=float(dense["wall_s"] / run["wall_s"]) if run["wall_s"] > 0 else None,
            **{k: run[k] for k in ("wall_s", "step_times_s", "attention_s", "attention_share", "peak_memory_bytes")},
            cached=False, temporal_warp_error=M.temporal_warp_error(run["video"]),
            metrics=M.video_metrics(dense["video"], run["video"]), latent_errors=lat,
            attention=probe.summary() if probe is not None else None))

    import diffusers

    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"name": model_name or getattr(pipe, "name_or_path", None) or type(pipe).__name__,
                  "class": type(pipe).__name__, "fingerprint": fp},
        "settings": settings,
        "environment": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                        "cuda_device": torch.cuda.get_device_name() if device.startswith("cuda") else None},
        "dense": dense_run,
        "configs": rows,
        "lpips": M.lpips_distance(videos["dense"], videos["dense"]) if M.lpips_available() is None
        else {"skipped": False},
    }
    if videos_out is not None:
        videos_out.update(videos)
    if write:
        write_report(out_dir, report, videos)
    return report
