"""One video generation run with timing: load a pipeline, run it, time every denoising step.

``load_pipeline(model, ...)`` accepts ``"reference"`` (default; the quality harness's trained
reference model, ``"reference-v1"``/``"reference-v2"`` for one version), ``"tiny"``/``"tiny-wan"``
(the built-in offline random-weight pipeline, for tests) or a local diffusers checkpoint folder (``DiffusionPipeline.from_pretrained``; family detected from the pipeline class).
``generate(pipe, ...)`` returns frames as float32 ``[F, H, W, C]`` in [0, 1], per-step wall times
(``callback_on_step_end``) and the mean plan density seen by ``vidattn.run_plan``.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["FAMILIES", "ModelError", "REFERENCE_MODELS", "TINY_MODELS", "reference_version", "detect_family", "load_pipeline", "token_grid", "default_call_kwargs", "generate"]

# pipeline class name prefix -> family. Only families with a vidattn integration are accepted.
FAMILIES = {"WanPipeline": "wan", "WanImageToVideoPipeline": "wan", "HunyuanVideoPipeline": "hunyuan",
            "CogVideoXPipeline": "cogvideox", "LTXPipeline": "ltx", "MochiPipeline": "mochi",
            "ReferenceVideoPipeline": "reference"}  # the quality harness's pixel-space reference model


class ModelError(ValueError):
    """A model argument that cannot be served (missing folder, unsupported family)."""


def detect_family(pipe) -> str:
    """Model family (``"wan"``, ...) from the pipeline class; raises :class:`ModelError` otherwise."""
    name = type(pipe).__name__
    if name in FAMILIES:
        return FAMILIES[name]
    raise ModelError(f"unsupported pipeline class {name}; supported: {', '.join(sorted(FAMILIES))}")


REFERENCE_MODELS = {"reference": None, "reference-v1": 1, "reference-v2": 2}  # name -> version (None: default)
TINY_MODELS = ("tiny", "tiny-wan")


def reference_version(model: Optional[str]) -> Optional[int]:
    """The reference-model version ``model`` names (``"reference"``: the default version), or
    None when ``model`` is not a reference-model name."""
    if model not in REFERENCE_MODELS:
        return None
    v = REFERENCE_MODELS[model]
    if v is None:
        from vidattn.quality.reference_model.model import latest_version

        v = latest_version()
    return v


def _load_reference(dtype, device, version):
    from vidattn.quality.reference_model import load_reference_pipeline

    try:
        return load_reference_pipeline(dtype=dtype, device=device, version=version)
    except FileNotFoundError as e:
        raise ModelError(f"--model reference: {str(e).splitlines()[0]}") from None


class _DropFp32CastNote:
    def filter(self, record) -> bool:
        return "should be kept in float32" not in record.getMessage()


@contextmanager
def _without_fp32_cast_note():
    """Hide diffusers' "modules that should be kept in float32 ... Casting directly with `to()`"
    note while the reference model is cast (it is built in float32, the note does not apply)."""
    import logging

    log = logging.getLogger("diffusers.models.modeling_utils")
    f = _DropFp32CastNote()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


@contextmanager
def _fp32_modules_without_accelerate(folder: str):
    """diffusers refuses to load models with ``_keep_in_fp32_modules`` (e.g. Wan) when
    ``accelerate`` is not installed. Without accelerate, clear that attribute on the folder's
    component classes for the duration of the load (dtype handling is then plain ``.to(dtype)``)."""
    import importlib
    import importlib.util
    import json

    from .diffusers_compat import FP32_MODULES_ATTR

    if importlib.util.find_spec("accelerate") is not None:
        yield
        return
    saved = []
    try:
        with open(os.path.join(folder, "model_index.json")) as fh:
            index = json.load(fh)
        for spec in index.values():
            if isinstance(spec, list) and len(spec) == 2 and spec[0] == "diffusers":
                cls = getattr(importlib.import_module("diffusers"), spec[1], None)
                if cls is not None and getattr(cls, FP32_MODULES_ATTR, None) is not None:
                    saved.append((cls, cls.__dict__.get(FP32_MODULES_ATTR, _MISSING)))
                    setattr(cls, FP32_MODULES_ATTR, None)
        yield
    finally:
        for cls, val in saved:
            if val is _MISSING:
                delattr(cls, FP32_MODULES_ATTR)
            else:
                setattr(cls, FP32_MODULES_ATTR, val)


_MISSING = object()


def load_pipeline(model: Optional[str] = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """Load a pipeline. Returns ``(pipe, family)``.

    Args:
        model: ``"tiny"``/``"tiny-wan"`` (random-weight tiny Wan), ``None``/``"reference"`` (the shipped
            reference DiT, default version), ``"reference-v1"``/``"reference-v2"``, or a local
            diffusers checkpoint folder.
        dtype: weights dtype (``torch.float32`` / ``bfloat16`` / ``float16``).
        device: torch device string.
        seed: weight seed of the tiny pipeline.
    Raises :class:`ModelError` (a ``ValueError``) with a one-line message for a missing folder, a
    folder that is not a diffusers pipeline, or an unsupported family.
    """
    if model in (None, ""):
        model = "reference"
    if model in TINY_MODELS:
        from .tiny import build_tiny_wan

        pipe = build_tiny_wan(seed=seed, dtype=dtype, device=device)
    elif model in REFERENCE_MODELS:
        with _without_fp32_cast_note():
            pipe = _load_reference(dtype, device, reference_version(model))
    else:
        if not os.path.isdir(model):
            raise ModelError(f"--model {model!r}: not reference, reference-v1, reference-v2, tiny, or an existing "
                             f"local checkpoint folder")
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ModelError(f"--model {model!r}: not a diffusers pipeline folder (no model_index.json)")
        from diffusers import DiffusionPipeline

        try:
            with _fp32_modules_without_accelerate(model), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
                pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"--model {model!r}: cannot load the pipeline: {msg}") from None
        pipe = pipe.to(device)
    return pipe, detect_family(pipe)


def token_grid(pipe, num_frames: int, height: int, width: int):
    """Video token grid ``(T, H, W)`` of a Wan-style pipeline for a given output size."""
    has_vae = getattr(pipe, "vae", None) is not None
    vt = getattr(pipe, "vae_scale_factor_temporal", 4) if has_vae else 1  # pixel-space pipelines: no VAE
    vs = getattr(pipe, "vae_scale_factor_spatial", 8) if has_vae else 1
    p = getattr(getattr(pipe, "transformer", None), "config", None)
    pt, ph, pw = tuple(getattr(p, "patch_size", (1, 2, 2))) if p is not None else (1, 2, 2)
    t = (num_frames - 1) // vt + 1 if has_vae else num_frames
    return (t // pt if has_vae else -(-t // pt), height // vs // ph, width // vs // pw)


def default_call_kwargs(pipe) -> Dict[str, Any]:
    """Extra pipeline call arguments for ``pipe``: the tiny pipeline (a Wan pipeline whose text
    encoder has ``d_model <= 64``) gets ``max_sequence_length=32`` (short prompts, fast encoder)."""
    te = getattr(pipe, "text_encoder", None)
    if type(pipe).__name__.startswith("Wan") and te is not None and getattr(te.config, "d_model", 4096) <= 64:
        return {"max_sequence_length": 32}
    return {}


def generate(pipe, *, prompt: str, num_frames: int, height: int, width: int, steps: int, seed: int,
             progress: bool = True, call_kwargs: Optional[Dict[str, Any]] = None, desc: str = "generate") -> Dict[str, Any]:
    """Run ``pipe`` once.

    Returns a dict: ``frames`` float32 ndarray ``[F, H, W, C]`` in [0, 1]; ``step_times_s`` (list
    of per-step wall seconds, step 0 timed from the first transformer call); ``total_s``;
    ``plan_density`` (mean ``token_density`` of the plans run by ``vidattn.run_plan`` during the
    call, 1.0 when none ran: dense SDPA); ``attention_calls``.
    """
    from vidattn.attention import add_observer

    dev = getattr(pipe, "device", torch.device("cpu"))
    sync = (lambda: torch.cuda.synchronize()) if getattr(dev, "type", "cpu") == "cuda" else (lambda: None)
    marks = []
    first_call = []

    def pre_hook(module, args, kwargs=None):
        if not first_call:
            sync()
            first_call.append(time.perf_counter())

    bar = None
    if progress:  # one bar for every pipeline (the reference pipeline draws none of its own)
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, leave=False, unit="step")

    def on_step_end(p, i, t, cb_kwargs):
        sync()
        marks.append(time.perf_counter())
        if bar is not None:
            bar.update(1)
        return {}

    densities = []

    def observer(q, k, v, plan, out, scale):
        densities.append(float(plan.token_density))

    hook = pipe.transformer.register_forward_pre_hook(pre_hook) if getattr(pipe, "transformer", None) is not None else None
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(default_call_kwargs(pipe), **(call_kwargs or {}))
    t0 = time.perf_counter()
    try:
        with add_observer(observer), torch.inference_mode():
            out = pipe(prompt=prompt, num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
                       generator=torch.Generator(device="cpu").manual_seed(seed), output_type="np",
                       callback_on_step_end=on_step_end, **kwargs)
    finally:
        if hook is not None:
            hook.remove()
        if bar is not None:
            bar.close()
    sync()
    total = time.perf_counter() - t0
    frames = out.frames[0] if hasattr(out, "frames") else out[0][0]
    frames = np.asarray(frames, dtype=np.float32)
    starts = (first_call[:1] or [t0]) + marks[:-1]
    step_times = [round(b - a, 6) for a, b in zip(starts, marks)]
    return dict(frames=frames, step_times_s=step_times, total_s=round(total, 6),
                plan_density=float(np.mean(densities)) if densities else 1.0, attention_calls=len(densities))
