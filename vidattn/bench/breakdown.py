"""Profiler breakdown of one benchmark step: attention / linear (GEMM) / other time, and vidattn's
sparse overhead outside the attention kernel.

:func:`profile_step` runs one step under ``torch.profiler`` and :func:`breakdown_from_profile`
classifies it. vidattn's own time is found through ``record_function`` ranges named
:data:`REGION_CALL` (the processor call) and :data:`REGION_RUN` (the backend run). The library
emits these ranges itself (``vidattn.attention.PROFILER_RANGES``): nothing here patches library
globals.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter

import torch

from vidattn.bench.timing import sync as _sync

__all__ = ["ATTN_KERNEL", "LINEAR_KERNEL", "ATTN_OP", "LINEAR_OPS", "REGION_CALL", "REGION_RUN", "breakdown_from_profile", "profile_step"]


ATTN_KERNEL = re.compile(r"sparse_flash|flash|fmha|sdpa|attention|flex", re.I)
LINEAR_KERNEL = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|ampere_|hopper_|sm90_|sm80_|splitk|matmul|"
                           r"(^|_)(add|b)?mm(_|$)", re.I)
ATTN_OP = re.compile(r"scaled_dot_product|_flash_attention|_efficient_attention|_cudnn_attention|flex_attention")
LINEAR_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::addmv", "aten::mv", "aten::_scaled_mm"}
REGION_CALL = ("vidattn::sparse_call", "vidattn::sparse_attn")  # vidattn processor call / compiled custom op
REGION_RUN = "vidattn::run_plan"  # the backend run (attention kernel + permutation gathers)


def _chain(e):
    names = []
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    return names


def _kernel_category(name, chain):
    if name.startswith("_sparse_flash_fwd"):  # vidattn's attention kernel, eager or inside a compiled graph
        return "attention"
    in_run = REGION_RUN in chain
    if any(ATTN_OP.search(c) for c in chain):
        return "attention"
    if in_run and (ATTN_KERNEL.search(name) or name.startswith("triton_tem")):
        return "attention"
    if not in_run and not any(c.startswith("vidattn::") for c in chain) and ATTN_KERNEL.search(name):
        return "attention"
    if LINEAR_KERNEL.search(name) or any(c in LINEAR_OPS for c in chain):
        return "linear"
    return "other"


def breakdown_from_profile(prof, wall_ms, dev):
    """Attention / linear / other split of one profiled step.

    CUDA: every GPU kernel is classified by its name and the CPU ops / vidattn ranges that
    launched it; ``idle_ms`` = step wall time - GPU busy time (host-bound gaps, syncs).
    CPU: op times (inclusive, outermost op of each category); ``other`` = wall - attention - linear.
    ``sparse_overhead_ms``: vidattn time that is not the attention kernel (plan lookup/build,
    permutation gathers, pooling, profiling); kernels on CUDA, host time on CPU.
    ``vidattn_host_ms``: host time inside vidattn's processor calls, including time blocked on
    host-device syncs there (close to the step time when every call syncs).
    """
    from torch.autograd import DeviceType

    evs = list(prof.events())
    cats = Counter()
    top = {"attention": Counter(), "linear": Counter(), "other": Counter()}
    overhead_us = 0.0
    out = dict(method="cuda-kernels" if dev.type == "cuda" else "cpu-ops", wall_ms=round(wall_ms, 3))
    if dev.type == "cuda":
        # record_function ranges are mirrored on the GPU timeline as "gpu_user_annotation" events
        # (and linked to their CPU range like kernels): not kernels, leave them out
        notes = {e.name for e in evs if getattr(e, "is_user_annotation", False)}

        def is_note(e_or_name):
            name = e_or_name if isinstance(e_or_name, str) else e_or_name.name
            if name in notes or name.startswith(("bench::", "vidattn::", "## ")) or "CompiledFxGraph" in name:
                return True
            return not isinstance(e_or_name, str) and (getattr(e_or_name, "is_user_annotation", False)
                                                       or "annotation" in str(getattr(e_or_name, "activity_type", "")))

        all_k = Counter()
        busy = 0.0
        for e in evs:
            if e.device_type == DeviceType.CUDA and not is_note(e):
                d = e.time_range.elapsed_us()
                all_k[(e.name, round(d, 3))] += 1
                busy += d
        # each GPU kernel once: the CPU-side links give its launching op chain (category and
        # vidattn region); a kernel linked twice or not at all is capped / classified by name
        left = Counter(all_k)
        for e in evs:
            if e.device_type != DeviceType.CPU or not e.kernels:
                continue
            chain = _chain(e)
            in_vid = any(c.startswith("vidattn::") for c in chain)
            for k in e.kernels:
                key = (k.name, round(k.duration, 3))
                if is_note(k.name) or left[key] <= 0:
                    continue
                left[key] -= 1
                c = _kernel_category(k.name, chain)
                cats[c] += k.duration
                top[c][k.name] += k.duration
                if in_vid and c != "attention":
                    overhead_us += k.duration
        for (name, d), n in left.items():  # kernels the profiler did not link to an op
            if n > 0:
                c = _kernel_category(name, [])
                cats[c] += d * n
                top[c][name] += d * n
        busy_ms = busy / 1e3
        out.update(busy_ms=round(busy_ms, 3), idle_ms=round(max(0.0, wall_ms - busy_ms), 3))
        host = [e for e in evs if e.device_type == DeviceType.CPU and e.name in REGION_CALL
                and not any(c in REGION_CALL for c in _chain(e.cpu_parent))]
        out["vidattn_host_ms"] = round(sum(e.cpu_time_total for e in host) / 1e3, 3) if host else None
        att, lin, oth = (cats[c] / 1e3 for c in ("attention", "linear", "other"))
    else:
        def outermost(pred):
            sel = []
            for e in evs:
                if e.device_type == DeviceType.CPU and pred(e.name) and not any(pred(c) for c in _chain(e.cpu_parent)):
                    sel.append(e)
            return sel

        is_att = lambda n: n == REGION_RUN or bool(ATTN_OP.search(n))  # noqa: E731
        att_evs = outermost(is_att)
        att_ids = {id(e) for e in att_evs}

        def under_att(e):
            p = e.cpu_parent
            while p is not None:
                if id(p) in att_ids:
                    return True
                p = p.cpu_parent
            return False

        lin_evs = [e for e in outermost(lambda n: n in LINEAR_OPS) if not under_att(e)]
        for e in att_evs:
            top["attention"][e.name] += e.cpu_time_total
        for e in lin_evs:
            top["linear"][e.name] += e.cpu_time_total
        att = sum(e.cpu_time_total for e in att_evs) / 1e3
        lin = sum(e.cpu_time_total for e in lin_evs) / 1e3
        oth = max(0.0, wall_ms - att - lin)
        calls = outermost(lambda n: n in REGION_CALL)
        runs_in_calls = [e for e in evs if e.name == REGION_RUN and any(c in REGION_CALL for c in _chain(e.cpu_parent))]
        overhead_us = max(0.0, sum(e.cpu_time_total for e in calls) - sum(e.cpu_time_total for e in runs_in_calls))
        out.update(busy_ms=None, idle_ms=None,
                   vidattn_host_ms=round(sum(e.cpu_time_total for e in calls) / 1e3, 3) if calls else None)
        if not calls:
            overhead_us = None
    denom = wall_ms if wall_ms > 0 else 1.0
    out.update(attention_ms=round(att, 3), linear_ms=round(lin, 3), other_ms=round(oth, 3),
               attention_share=round(att / denom, 4), linear_share=round(lin / denom, 4),
               other_share=round(oth / denom, 4))
    if out.get("idle_ms") is not None:
        out["idle_share"] = round(out["idle_ms"] / denom, 4)
    if overhead_us is None or (overhead_us == 0 and out.get("vidattn_host_ms") is None):
        out.update(sparse_overhead_ms=None, sparse_overhead_pct=None)
    else:
        out.update(sparse_overhead_ms=round(overhead_us / 1e3, 3),
                   sparse_overhead_pct=round(100 * overhead_us / 1e3 / denom, 2))
    out["top"] = {c: [[n[:120], round(t / 1e3, 3)] for n, t in top[c].most_common(3)] for c in top}
    return out


def profile_step(step_fn, dev):
    """Run one step under torch.profiler and return its breakdown (or ``{"error": ...}``)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    try:
        _sync(dev)
        with contextlib.ExitStack() as stack:
            prof = stack.enter_context(profile(activities=acts))
            t0 = time.perf_counter()
            with record_function("bench::step"):
                step_fn()
            _sync(dev)
            wall = (time.perf_counter() - t0) * 1e3
        return breakdown_from_profile(prof, wall, dev)
    except Exception as e:  # profiling must never take the benchmark down
        return dict(error=f"{type(e).__name__}: {e}"[:300])


