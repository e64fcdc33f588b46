"""The ``vidattn generate`` job: runs, timing, metrics, report and output files (the command only parses).

:func:`run_generate` takes a loaded pipeline, a pattern and :class:`GenerateSettings` and writes
one complete output set into an :class:`~.output_set.OutputSet` (staged; the caller commits it):

* without ``compare``: one run with the pattern; ``video.<ext>``, ``frames.png``, ``report.json``;
* with ``compare`` (and a sparse pattern): the quality harness (:func:`vidattn.quality.compare.run_comparison`)
  runs dense once (or takes its frames from the dense-baseline cache) and the sparse pattern
  **once**; that run's frames are ``video.<ext>``; the harness writes ``report.json`` /
  ``report.html``; ``dense.<ext>`` and ``side_by_side.<ext>`` are written here and the side-by-side
  video is embedded in ``report.html``.

``<ext>`` is :func:`~.video_io.browser_video_ext` (``.mp4`` H.264 where OpenCV encodes it, else
``.webm`` VP8): the files play in a browser.

Speed (:func:`time_steps`): dense and the pattern are timed the same way in this process, never
from the cache: ``1`` warm-up step (plan building, compilation, allocator growth; not counted)
then ``timing_steps`` timed steps, each with the self-attention modules' time, so the report
shows the step speedup next to the attention share and the Amdahl bound ``1 / (1 - share)`` it
cannot exceed.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

from .output_set import OutputError, OutputSet

__all__ = ["GenerateSettings", "run_generate", "time_steps", "BackendRecorder", "embed_video_in_html",
           "default_cache_dir"]


@dataclass
class GenerateSettings:
    """What to generate. Sizes are pixels (``frames`` x ``height`` x ``width``)."""

    prompt: str
    frames: int
    height: int
    width: int
    steps: int
    seed: int = 0
    negative_prompt: Optional[str] = None
    guidance_scale: Optional[float] = None
    fps: int = 8
    dense_steps: int = 0
    backend: str = "auto"

    def call_kwargs(self) -> Dict[str, Any]:
        """Extra pipeline call arguments (negative prompt, guidance) the user set."""
        kw = {}
        if self.negative_prompt is not None:
            kw["negative_prompt"] = self.negative_prompt
        if self.guidance_scale is not None:
            kw["guidance_scale"] = self.guidance_scale
        return kw


def default_cache_dir() -> str:
    """Dense-baseline cache folder: ``$VIDATTN_CACHE_DIR`` or ``~/.cache/vidattn/dense``."""
    return os.environ.get("VIDATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vidattn", "dense")


# ----------------------------------------------------------------------------- backend that ran
_FALLBACK = re.compile(r"backend '(\w+)' cannot run .* falling back to '(\w+)'", re.S)


class BackendRecorder:
    """Counts which vidattn backend ran each attention call while active (``with``).

    The counts are the library's own (:data:`vidattn.backends.ran`, incremented by ``run_plan`` for
    the backend that actually ran each call), taken as the difference over the ``with`` block.
    """

    def __init__(self, requested: str, device):
        self.requested = requested
        self.device = torch.device(device)
        self.counts: Counter = Counter()
        self.calls = 0
        self._fallbacks = []

    def _observe(self, q, k, v, plan, out, scale, **kw):
        self.calls += 1

    def __enter__(self):
        from vidattn import backends
        from vidattn.attention import add_observer

        self._ran0 = dict(backends.ran)
        self._handle = add_observer(self._observe)
        self._warn = warnings.catch_warnings(record=True)
        self._seen = self._warn.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        from vidattn import backends

        self._warn.__exit__(*exc)
        self._handle.remove()
        self.counts = Counter({k: n - self._ran0.get(k, 0) for k, n in backends.ran.items() if n > self._ran0.get(k, 0)})
        for w in self._seen:
            m = _FALLBACK.search(str(w.message))
            if m and m.groups() not in self._fallbacks:
                self._fallbacks.append(m.groups())
        for w in self._seen:  # pass the other warnings on
            if not _FALLBACK.search(str(w.message)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False

    def summary(self) -> Dict[str, Any]:
        """``{"requested", "ran", "calls", "counts", "source", "fallbacks"}`` (JSON-ready); ``ran`` is
        the backend that ran most calls (``vidattn.backends.ran``), None when no vidattn attention
        call ran (dense SDPA)."""
        if self.calls == 0 or not self.counts:
            return dict(requested=self.requested, ran=None, calls=self.calls, counts={},
                        source="no vidattn attention call", fallbacks=[])
        return dict(requested=self.requested, ran=self.counts.most_common(1)[0][0], calls=self.calls,
                    counts=dict(self.counts), source="vidattn.backends.ran",
                    fallbacks=[f"{a} -> {b}" for a, b in self._fallbacks])


# ----------------------------------------------------------------------------- runs
def _apply(pipe, pattern, s: GenerateSettings):
    import vidattn
    from vidattn.pipelines.apply import SparseAttentionConfig

    if isinstance(pattern, SparseAttentionConfig):  # a plan file (vidattn calibrate): runs as written
        return vidattn.apply(pipe, pattern)
    return vidattn.apply(pipe, pattern, dense_steps=s.dense_steps, backend=s.backend)


def _device(pipe):
    t = getattr(pipe, "transformer", None)
    p = next(t.parameters()) if t is not None else None
    return p.device if p is not None else torch.device("cpu")


def _single_run(pipe, name: str, pattern, s: GenerateSettings, progress: bool) -> Dict[str, Any]:
    """One generation with ``pattern`` (None: dense). Returns the run record with ``frames``."""
    import vidattn

    from .generate import generate

    rec = BackendRecorder(s.backend, _device(pipe))
    if pattern is not None:
        _apply(pipe, pattern, s)
    try:
        with rec:
            res = generate(pipe, prompt=s.prompt, num_frames=s.frames, height=s.height, width=s.width, steps=s.steps,
                           seed=s.seed, progress=progress, call_kwargs=s.call_kwargs(), desc=name)
    finally:
        if pattern is not None:
            vidattn.remove(pipe)
    st = res["step_times_s"]
    res["name"] = name
    res["median_step_s"] = float(np.median(st[1:] if len(st) > 1 else st)) if st else 0.0  # step 1 warms up
    res["backend"] = rec.summary()
    return res


def time_steps(pipe, pattern, s: GenerateSettings, timing_steps: int, progress: bool = False,
               label: str = "") -> Dict[str, Any]:
    """Per-step time of ``pattern`` (None: dense) on ``pipe``: one untimed warm-up step, then
    ``timing_steps`` timed denoising steps in one pipeline call of ``1 + timing_steps`` steps.

    Returns ``{"step_ms": median, "step_ms_all": [...], "attention_ms": mean per step,
    "attention_share", "steps_timed", "warmup_steps": 1}``; the self-attention modules
    (``vidattn.pipelines.processors.attention_modules``) are timed by
    :class:`vidattn.bench.timing.ModuleTimer`, the steps by ``callback_on_step_end`` with a sync.
    """
    import vidattn
    from vidattn.bench.timing import ModuleTimer, median, sync

    from .processors import attention_modules, is_self_attention

    dev = _device(pipe)
    mods = [m for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if t is not None
            for n, m in attention_modules(t).items() if is_self_attention(n, m)]
    n = 1 + int(timing_steps)
    marks = []
    timer = ModuleTimer(mods, dev)
    attn = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"timing {label or ('dense' if pattern is None else 'sparse')}", leave=False,
                   unit="step")

    def on_step_end(p, i, t, kw):
        sync(dev)
        marks.append(time.perf_counter())
        attn.append(timer.total_ms())
        timer.reset()
        if bar is not None:
            bar.update(1)
        return {}

    if pattern is not None:
        _apply(pipe, pattern, s)
    try:
        from .generate import default_call_kwargs

        kwargs = dict(default_call_kwargs(pipe), **s.call_kwargs())
        with torch.inference_mode():
            sync(dev)
            t0 = time.perf_counter()
            pipe(prompt=s.prompt, num_frames=s.frames, height=s.height, width=s.width, num_inference_steps=n,
                 generator=torch.Generator(device="cpu").manual_seed(s.seed), output_type="np",
                 callback_on_step_end=on_step_end, **kwargs)
    finally:
        timer.remove()
        if bar is not None:
            bar.close()
        if pattern is not None:
            vidattn.remove(pipe)
    starts = [t0] + marks[:-1]
    steps_ms = [(b - a) * 1e3 for a, b in zip(starts, marks)][1:]  # step 1 is the warm-up
    attn_ms = attn[1:]
    step = median(steps_ms)
    a = float(np.mean(attn_ms)) if attn_ms else None
    return dict(step_ms=step, step_ms_all=[round(x, 3) for x in steps_ms], attention_ms=a,
                attention_share=(a / float(np.mean(steps_ms))) if a is not None and steps_ms else None,
                steps_timed=len(steps_ms), warmup_steps=1)


def _speed(dense: Dict[str, Any], sparse: Dict[str, Any]) -> Dict[str, Any]:
    """Step and attention speedups, and the Amdahl bound of the step speedup."""
    out = dict(dense=dense, sparse=sparse, step_speedup=None, attention_speedup=None, amdahl_bound=None)
    if dense.get("step_ms") and sparse.get("step_ms"):
        out["step_speedup"] = dense["step_ms"] / sparse["step_ms"]
    if dense.get("attention_ms") and sparse.get("attention_ms"):
        out["attention_speedup"] = dense["attention_ms"] / sparse["attention_ms"]
    share = dense.get("attention_share")
    if share is not None and share < 1:
        out["amdahl_bound"] = 1.0 / (1.0 - share)
    return out


# ----------------------------------------------------------------------------- files
def embed_video_in_html(html_text: str, video_path: str, title: str = "side by side") -> str:
    """``html_text`` with a ``<video>`` element (``video_path``'s bytes as a base64 ``data:`` URI, so
    the page stays self-contained) inserted after the first ``</h1>`` (else after ``<body>``)."""
    import base64

    ext = os.path.splitext(video_path)[1].lower().lstrip(".")
    mime = {"mp4": "video/mp4", "webm": "video/webm"}.get(ext, "video/" + ext)
    with open(video_path, "rb") as fh:
        data = base64.b64encode(fh.read()).decode("ascii")
    name = os.path.basename(video_path)
    block = (f'<h2>{title}</h2><video controls autoplay loop muted playsinline style="max-width:100%" '
             f'title="{name}"><source type="{mime}" src="data:{mime};base64,{data}"></video>'
             f'<p><a href="{name}">{name}</a></p>')
    for marker in ("</h1>", "<body>"):
        i = html_text.find(marker)
        if i >= 0:
            j = i + len(marker)
            return html_text[:j] + block + html_text[j:]
    return block + html_text


def _honest_speedup(report: Dict[str, Any], timing: Optional[Dict[str, Any]]) -> None:
    """Replace the harness's wall-clock ``speedup`` of each config (dense possibly from the cache,
    sparse timed with the attention probes on) by the step speedup measured by :func:`time_steps`,
    or by null when there is no such measurement and the dense run came from the cache."""
    for c in report.get("configs", []):
        if timing is not None:
            c["speedup"] = timing.get("step_speedup")
            c["speedup_source"] = "vidattn generate timing pass (1 warm-up step, same-way timed steps)"
        elif report.get("dense", {}).get("cached"):
            c["speedup"] = None
            c["speedup_source"] = "not measured (dense frames from the cache; --timing-steps 0)"


def _write(fn, *args, **kw):
    """Call a file writer; an ``OSError`` (full disk, permissions) becomes :class:`OutputError`."""
    try:
        return fn(*args, **kw)
    except OSError as e:
        raise OutputError(f"cannot write the output ({e.strerror or e})") from None


def _write_cache(fn, *args, **kw):
    """Call the harness (which writes only the dense-baseline cache here); an ``OSError`` becomes
    :class:`OutputError` naming the cache."""
    try:
        return fn(*args, **kw)
    except OSError as e:
        raise OutputError(f"cannot write the dense-baseline cache {kw.get('cache_dir')!r} "
                          f"({e.strerror or e}); --no-cache or --cache-dir DIR") from None


# ----------------------------------------------------------------------------- the job
def run_generate(pipe, family: str, pattern, s: GenerateSettings, out: OutputSet, *, pattern_name: str,
                 compare: bool = False, cache_dir: Optional[str] = None, timing_steps: int = 3,
                 progress: bool = True, model_name: str = "", load_s: float = 0.0, dtype_name: str = "float32",
                 token_grid=None, config: Optional[dict] = None) -> Dict[str, Any]:
    """Run the job and write every file into ``out.staging`` (the caller commits ``out``).

    Args:
        pipe, family: a loaded pipeline and its family (:func:`.generate.load_pipeline`).
        pattern: the vidattn pattern, or None for dense.
        compare: also compare with dense (quality harness) and time both sides.
        cache_dir: dense-baseline cache folder (frames only; None: no cache).
        timing_steps: timed steps per side after one warm-up step (0: no speed measurement).
    Returns the report dict written as ``report.json`` (the harness report with this job's
    record under ``"generate"`` when comparing, else the job's record).
    """
    from .video_io import atomic_write_json, atomic_write_text, browser_video_ext, write_png_grid, write_video

    ext = browser_video_ext()
    dev = _device(pipe)
    pipe.set_progress_bar_config(disable=True)  # the runs below show their own bar (or none)
    files = dict(video="video" + ext, frames="frames.png", report="report.json")
    gen = dict(schema="vidattn.generate/2", created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               model=model_name, family=family, device=str(dev), dtype=dtype_name, load_s=round(load_s, 3),
               settings=dict(asdict(s), token_grid=list(token_grid) if token_grid else None),
               config=config, compare="dense" if compare else None, files=files)
    harness_report = None
    if compare and pattern is not None:
        from vidattn.quality.compare import run_comparison

        from .generate import default_call_kwargs

        call_kwargs = dict(prompt=s.prompt, num_frames=s.frames, height=s.height, width=s.width,
                           num_inference_steps=s.steps, **default_call_kwargs(pipe), **s.call_kwargs())
        videos: Dict[str, Any] = {}
        rec = BackendRecorder(s.backend, dev)
        with rec:
            harness_report = _write_cache(run_comparison, pipe, {pattern_name: pattern}, call_kwargs=call_kwargs,
                                    seeds=[s.seed], out_dir=out.staging, cache_dir=cache_dir, progress=progress,
                                    apply_kwargs=None if not hasattr(pattern, "validate")
                                    else dict(dense_steps=s.dense_steps, backend=s.backend),
                                    model_name=model_name, videos_out=videos, write=False,
                                    timing=False)  # timed below, both sides the same way
        frames, dense_frames = videos[pattern_name], videos["dense"]
        c = harness_report["configs"][0]
        run = dict(name=pattern_name, plan_density=(c.get("density") or {}).get("token") or 1.0,
                   attention_calls=int(c.get("sparse_calls") or 0), backend=rec.summary(),
                   step_times_s=c.get("step_times_s"), total_s=c.get("wall_s"))
        runs = [dict(name="dense", plan_density=1.0, attention_calls=0, cached=bool(harness_report["dense"].get("cached")),
                     step_times_s=harness_report["dense"].get("step_times_s"), total_s=harness_report["dense"].get("wall_s")),
                run]
        files.update(dense_video="dense" + ext, side_by_side="side_by_side" + ext, html="report.html")
    else:
        run = _single_run(pipe, pattern_name, pattern, s, progress)
        frames = run.pop("frames")
        dense_frames = None
        runs = [run]
    gen["backend"] = run["backend"]
    if compare and pattern is not None and timing_steps > 0:
        d = time_steps(pipe, None, s, timing_steps, progress, "dense")
        sp = time_steps(pipe, pattern, s, timing_steps, progress, pattern_name)
        gen["timing"] = _speed(d, sp)
    gen["runs"] = runs

    _write(write_video, frames, out.path(files["video"]), fps=s.fps)
    _write(write_png_grid, frames, out.path(files["frames"]))
    if harness_report is not None:
        from vidattn.quality.report import write_report, write_side_by_side_mp4

        _honest_speedup(harness_report, gen.get("timing"))
        _write(write_report, out.staging, harness_report, videos, fps=s.fps)  # report.json/.html, side_by_side.mp4
        _write(write_video, dense_frames, out.path(files["dense_video"]), fps=s.fps)
        sbs = out.path(files["side_by_side"])
        if files["side_by_side"] != "side_by_side.mp4":
            _write(write_side_by_side_mp4, sbs, dense_frames, {pattern_name: frames}, fps=s.fps)
            if os.path.exists(out.path("side_by_side.mp4")):
                os.remove(out.path("side_by_side.mp4"))  # the harness's mp4v copy: not browser-playable
        html_path = out.path("report.html")
        if os.path.isfile(html_path) and os.path.isfile(sbs):
            with open(html_path) as fh:
                page = fh.read()
            _write(atomic_write_text, html_path, embed_video_in_html(page, sbs, "side by side: " + ", ".join(
                ["dense", pattern_name, "difference"])))
        with open(out.path("report.json")) as fh:
            report = json.load(fh)  # the harness's strict-JSON form
        report["generate"] = gen
    else:
        report = gen
    _write(atomic_write_json, out.path("report.json"), report, allow_nan=False)
    return report
