"""Measured timings of a pipeline step, dense and sparse, in the same process.

``time_steps`` runs the pipeline for ``warmup + steps`` denoising steps (``repeats`` calls) with no
probes or recorders attached, and keeps the per-step wall time (``callback_on_step_end``, CUDA
synchronised) and the self-attention time of each step (forward hooks on the self-attention
modules: CUDA events on GPU, ``perf_counter`` on CPU) of the steps after the warm-up.
``time_configs`` times dense, then every config, then dense again, and derives the speed-ups:
``step_speedup = dense step / sparse step``, ``attention_speedup`` likewise for the attention time,
and the end-to-end ``speedup`` of a full run of ``N`` steps of which the first ``k`` are dense:
``N t_dense / (k t_dense + (N - k) t_sparse)``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch

__all__ = ["AttentionTimer", "time_steps", "time_configs", "end_to_end_speedup"]


def _transformers(pipe):
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]


class AttentionTimer:
    """Times every self-attention module forward of the given transformers (``total()`` seconds)."""

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


def _is_cuda(pipe) -> bool:
    for t in _transformers(pipe):
        return next(t.parameters()).device.type == "cuda"
    return False


def time_steps(pipe, make_kwargs: Callable[[int], Dict[str, Any]], *, steps: int = 2, warmup: int = 1,
               repeats: int = 1) -> Dict[str, Any]:
    """Time ``steps`` denoising steps after ``warmup`` ones, ``repeats`` pipeline calls.

    Args:
        make_kwargs: ``n_steps -> pipeline call kwargs`` (seeds/batch already filled in).
    Returns: ``{"step_s": median step seconds, "attention_s": median self-attention seconds per
    step, "step_times_s": [every timed step], "steps": steps, "warmup": warmup, "repeats": repeats}``.
    """
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"steps >= 1, warmup >= 0, repeats >= 1 required, got {steps}, {warmup}, {repeats}")
    cuda = _is_cuda(pipe)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step_t, attn_t = [], []
    for _ in range(repeats):
        timer = AttentionTimer(_transformers(pipe), cuda)
        marks = []

        def cb(p, i, t, kw):
            sync()
            marks.append((time.perf_counter(), timer.total() if not cuda else None, len(timer.events)))
            return {}

        kwargs = dict(make_kwargs(warmup + steps), callback_on_step_end=cb, callback_on_step_end_tensor_inputs=[],
                      output_type="np")
        try:
            sync()
            t0 = time.perf_counter()
            pipe(**kwargs)
            sync()
        finally:
            timer.remove()
        prev_t, prev_a, prev_e = t0, 0.0, 0
        evs = timer.events
        for i, (tt, a, ne) in enumerate(marks):
            if cuda:
                a = float(sum(x.elapsed_time(y) for x, y in evs[prev_e:ne]) / 1000.0)
                da = a
            else:
                da = a - prev_a
            if i >= warmup:
                step_t.append(tt - prev_t)
                attn_t.append(da)
            prev_t, prev_a, prev_e = tt, (a if not cuda else 0.0), ne
    return {"step_s": float(np.median(step_t)), "attention_s": float(np.median(attn_t)),
            "step_times_s": [float(x) for x in step_t], "steps": int(steps), "warmup": int(warmup),
            "repeats": int(repeats)}


def end_to_end_speedup(dense_step_s: float, sparse_step_s: float, num_steps: int, dense_steps: int = 0) -> float:
    """``N t_d / (k t_d + (N - k) t_s)`` for ``N`` steps with the first ``k`` dense."""
    k = min(max(int(dense_steps), 0), int(num_steps))
    den = k * dense_step_s + (num_steps - k) * sparse_step_s
    return float(num_steps * dense_step_s / den) if den > 0 else float("nan")


def time_configs(pipe, configs: Mapping[str, Any], make_kwargs: Callable[[int], Dict[str, Any]], *,
                 num_steps: int, steps: int = 2, warmup: int = 1, repeats: int = 1) -> Dict[str, Any]:
    """Time dense, every config (``name -> SparseAttentionConfig``; its sparse step, i.e. with
    ``dense_steps = 0``), then dense again.

    Returns ``{"dense": timing + {"step_s_before", "step_s_after"}, name: timing + {"step_speedup",
    "attention_speedup", "speedup"}}``; the dense ``step_s`` is the mean of its two timings.
    """
    import vidattn

    vidattn.remove(pipe)
    d0 = time_steps(pipe, make_kwargs, steps=steps, warmup=warmup, repeats=repeats)
    out: Dict[str, Any] = {}
    for name, cfg in configs.items():
        vidattn.apply(pipe, dataclasses.replace(cfg, dense_steps=0))
        try:
            out[name] = time_steps(pipe, make_kwargs, steps=steps, warmup=warmup, repeats=repeats)
        finally:
            vidattn.remove(pipe)
    d1 = time_steps(pipe, make_kwargs, steps=steps, warmup=warmup, repeats=repeats)
    dense = dict(d1, step_s=0.5 * (d0["step_s"] + d1["step_s"]), attention_s=0.5 * (d0["attention_s"] + d1["attention_s"]),
                 step_s_before=d0["step_s"], step_s_after=d1["step_s"],
                 step_times_s=d0["step_times_s"] + d1["step_times_s"])
    for name, cfg in configs.items():
        t = out[name]
        t["step_speedup"] = float(dense["step_s"] / t["step_s"]) if t["step_s"] > 0 else None
        t["attention_speedup"] = float(dense["attention_s"] / t["attention_s"]) if t["attention_s"] > 0 else None
        t["speedup"] = end_to_end_speedup(dense["step_s"], t["step_s"], num_steps, cfg.dense_steps)
    out["dense"] = dense
    return out
