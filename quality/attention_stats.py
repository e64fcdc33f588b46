"""Attention structure of a video DiT, per layer and head: is it local, temporal, uniform, content-based?

Sparse attention only works on heads whose attention mass is concentrated where a pattern looks,
so before trusting a quality number measured on a model, measure the model's attention (the same
statistics a user can run on their own pipeline: ``vidattn quality --attention-stats``).

:func:`attention_stats` runs the pipeline once with vidattn's exact dense attention in place
(``vidattn.apply(pipe, Dense())``, so the model computes exactly what it computes without vidattn),
and at a few denoising steps captures each self-attention call's ``q``/``k``. For ``query_blocks``
evenly spaced blocks of ``block_size`` grid query tokens it computes the exact softmax rows over
all keys (float32, memory ``O(rows * S)``) and from them, per (layer, head), averaged over the
sampled rows, steps, calls and batch elements:

* ``window_mass[f]``: attention mass inside a 3-D (or 2-D/1-D) neighborhood window whose size per
  axis is the fraction ``f`` of the axis (odd, >= 1, NATTEN window semantics: shifted inward at the
  borders), with ``window_tokens[f]``, the fraction of tokens such a window covers;
* ``temporal_profile[d]``: mass on keys ``d`` frames away (``d = 0 .. T-1``), and
  ``temporal_uniform[d]`` what a uniform head would give;
* ``tube_other_frames``: mass on keys at the same spatial position (within ``tube_radius``) in the
  *other* frames (Sparse VideoGen's temporal heads);
* ``blocks_for_90``: fraction of key blocks (``block_size`` tokens, natural order) needed to cover 90%
  of a query block's mass (a query block's attention averaged over its rows, largest blocks first);
* ``entropy_ratio``: mean row entropy divided by ``log(S)`` (1 = uniform);
* ``text_mass``: mass on non-grid (text) tokens.

Head types (first rule that applies, thresholds in :data:`HEAD_RULES`): ``uniform`` (entropy ratio
>= 0.99), ``temporal`` (tube mass in other frames >= 0.3), ``local`` (mass in the quarter-size
window >= 0.5), ``content`` (90% of the mass in <= half of the key blocks, but not local or temporal),
else ``diffuse``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from vidattn.layout import TokenLayout

__all__ = ["HEAD_RULES", "head_statistics", "classify_head", "attention_stats", "summarize", "format_attention_stats"]

HEAD_RULES = {"uniform_entropy": 0.99, "temporal_tube": 0.3, "local_window": 0.5, "local_fraction": 0.25,
              "content_blocks": 0.5}
WINDOW_FRACTIONS = (0.125, 0.25, 0.5)


def _window_len(g: int, f: float) -> int:
    k = max(1, int(round(f * g)))
    if k % 2 == 0:
        k += 1
    return min(k, g)


def _axis_window(xq: torch.Tensor, xk: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """NATTEN window (stride 1, dilation 1, non-causal) on one axis: Bool ``[len(xq), len(xk)]``."""
    start = torch.clamp(xq - k // 2, min=0)
    start = torch.minimum(start, torch.full_like(start, n - k))
    return (xk[None, :] >= start[:, None]) & (xk[None, :] < start[:, None] + k)


def head_statistics(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, rows: torch.Tensor, *,
                    scale: Optional[float] = None, block_size: int = 128,
                    window_fractions: Sequence[float] = WINDOW_FRACTIONS, tube_radius: int = 1) -> Dict[str, Any]:
    """Statistics of the exact softmax attention rows ``rows`` for every head.

    Args:
        q: ``[B, S, H, D]``; k: ``[B, S, Hk, D]`` (Hk divides H), any float dtype (computed in float32).
        layout: the token layout (``layout.seq_len == S``).
        rows: LongTensor ``[n]`` of grid query token indices (sequence indices), grouped in whole
            blocks of ``block_size`` consecutive tokens for ``blocks_for_90`` (a trailing partial
            group counts as one block).
        scale: softmax scale (default ``D ** -0.5``).
    Returns:
        dict of float64 numpy arrays with a leading head axis ``[H]`` (``window_mass`` ``[H, F]``,
        ``temporal_profile`` ``[H, T]``) plus ``window_tokens`` ``[F]``, ``temporal_uniform`` ``[T]``,
        ``window_fractions``; values averaged over rows and batch elements.
    """
    B, S, H, D = q.shape
    layout.check_seq_len(S, name="q")
    if k.shape[0] != B or k.shape[1] != S or H % k.shape[2]:
        raise ValueError(f"k must be [B={B}, S={S}, Hk, D] with Hk dividing {H}, got {tuple(k.shape)}")
    rows = rows.to(torch.long).cpu()
    g0, g1 = layout.prefix, layout.prefix + layout.num_grid_tokens
    if rows.numel() == 0 or int(rows.min()) < g0 or int(rows.max()) >= g1:
        raise ValueError(f"rows must be non-empty grid token indices in [{g0}, {g1}), got {rows.tolist()[:8]}...")
    s = D ** -0.5 if scale is None else float(scale)
    dev = q.device
    rep = H // k.shape[2]
    # probabilities [B, H, n, S]
    qr = q[:, rows.to(dev)].float().transpose(1, 2)
    kk = k.float().repeat_interleave(rep, 2).transpose(1, 2)
    p = torch.softmax(torch.einsum("bhnd,bhsd->bhns", qr, kk) * s, dim=-1)
    p = p.double().cpu()
    n = rows.numel()
    grid = layout.grid
    _, qc = layout.token_coords(rows)
    allk = torch.arange(S)
    k_in, kc = layout.token_coords(allk)
    k_in = k_in
    out: Dict[str, Any] = {}
    # entropy (natural log), text mass
    ent = -(p.clamp_min(1e-300).log() * p).sum(-1)  # [B, H, n]
    out["entropy_ratio"] = (ent / math.log(S)).mean((0, 2)).numpy()
    out["text_mass"] = (p * (~k_in).double()).sum(-1).mean((0, 2)).numpy()
    # windows
    wm, wt = [], []
    for f in window_fractions:
        ks = [_window_len(gdim, f) for gdim in grid]
        m = torch.ones(n, S, dtype=torch.bool)
        for a, (gdim, ka) in enumerate(zip(grid, ks)):
            m &= _axis_window(qc[a], kc[a], gdim, ka)
        m &= k_in[None]
        wm.append((p * m.double()).sum(-1).mean((0, 2)).numpy())
        wt.append(math.prod(ks) / layout.num_grid_tokens)
    out["window_fractions"] = np.array(window_fractions, np.float64)
    out["window_mass"] = np.stack(wm, -1)  # [H, F]
    out["window_tokens"] = np.array(wt, np.float64)
    # temporal profile and tube (3-D grids only: frames on axis 0)
    if len(grid) == 3:
        T = grid[0]
        dist = (qc[0][:, None] - kc[0][None, :]).abs()  # [n, S]
        prof = torch.zeros(B, H, n, T, dtype=torch.float64)
        idx = torch.where(k_in[None], dist, torch.full_like(dist, T))  # text keys -> bucket T (dropped)
        pk = torch.cat([p, torch.zeros(*p.shape[:-1], 1, dtype=p.dtype)], -1)
        prof = torch.zeros(B, H, n, T + 1, dtype=torch.float64).scatter_add_(
            -1, torch.cat([idx, torch.full((n, 1), T)], -1).expand(B, H, n, S + 1), pk)[..., :T]
        out["temporal_profile"] = prof.mean((0, 2)).numpy()
        cnt = torch.zeros(n, T + 1, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n, S, dtype=torch.float64))
        out["temporal_uniform"] = (cnt[:, :T] / S).mean(0).numpy()
        tube = ((qc[1][:, None] - kc[1][None, :]).abs() <= tube_radius) & \
               ((qc[2][:, None] - kc[2][None, :]).abs() <= tube_radius) & (dist > 0) & k_in[None]
        out["tube_other_frames"] = (p * tube.double()).sum(-1).mean((0, 2)).numpy()
    # key blocks for 90% of a query block's mass
    nkb = -(-S // block_size)
    kb = allk // block_size
    pb = torch.zeros(B, H, n, nkb, dtype=torch.float64).scatter_add_(-1, kb.expand(B, H, n, S), p)
    groups = [torch.arange(i, min(n, i + block_size)) for i in range(0, n, block_size)]
    fr = []
    for gi in groups:
        blk = pb[:, :, gi].mean(2)  # [B, H, NKB]
        srt = blk.sort(-1, descending=True).values.cumsum(-1)
        need = (srt < 0.9).sum(-1) + 1  # blocks to reach 90%
        fr.append((need.double() / nkb).mean(0))
    out["blocks_for_90"] = torch.stack(fr).mean(0).numpy()
    return out


def classify_head(stat: Mapping[str, float], rules: Mapping[str, float] = HEAD_RULES) -> str:
    """Head type from one head's scalar statistics (``entropy_ratio``, ``tube_other_frames``,
    ``local_window`` = mass in the window of fraction ``rules['local_fraction']``, ``blocks_for_90``);
    see the module docstring for the rule order."""
    if stat["entropy_ratio"] >= rules["uniform_entropy"]:
        return "uniform"
    if stat.get("tube_other_frames", 0.0) >= rules["temporal_tube"]:
        return "temporal"
    if stat["local_window"] >= rules["local_window"]:
        return "local"
    if stat["blocks_for_90"] <= rules["content_blocks"]:
        return "content"
    return "diffuse"


def _sample_rows(layout: TokenLayout, block_size: int, query_blocks: int) -> torch.Tensor:
    """Grid query rows: ``query_blocks`` evenly spaced whole blocks of ``block_size`` grid tokens."""
    N = layout.num_grid_tokens
    bs = min(block_size, N)
    nb = max(1, N // bs)
    picks = np.unique(np.linspace(0, nb - 1, min(query_blocks, nb)).round().astype(int))
    return torch.cat([torch.arange(b * bs, b * bs + bs) for b in picks]) + layout.prefix


def attention_stats(pipe, call_kwargs: Mapping[str, Any], *, seeds: Sequence[int] = (0,),
                    steps: Optional[Sequence[int]] = None, block_size: int = 128, query_blocks: int = 8,
                    window_fractions: Sequence[float] = WINDOW_FRACTIONS, tube_radius: int = 1,
                    max_batch: int = 2) -> Dict[str, Any]:
    """Measure the attention structure of ``pipe`` (a diffusers video pipeline supported by
    ``vidattn.apply``) on one generation per seed.

    Args:
        call_kwargs: pipeline call arguments (prompt, num_frames, height, width, num_inference_steps, ...).
        seeds: one run per seed (CPU generator).
        steps: denoising step indices at which to measure (default: first, middle and last).
        block_size, query_blocks: sampled query rows (see the module docstring).
        max_batch: at most this many batch elements of each call are measured (e.g. the
            conditional and unconditional halves of a CFG batch).
    Returns:
        JSON-able dict: ``layers`` (list per layer of ``heads``, each a dict of the statistics and
        its ``type``), ``summary`` (:func:`summarize`), ``layout`` (grid, prefix, suffix), ``settings``.
    """
    import vidattn
    from vidattn.attention import add_observer

    n_steps = int(call_kwargs.get("num_inference_steps", 20))
    want = sorted(set(steps)) if steps is not None else sorted({0, n_steps // 2, n_steps - 1})
    captured: List[dict] = []
    state = {"step": 0, "layer": 0}

    def observe(q, k, v, plan, out, scale):
        layer = state["layer"]
        state["layer"] += 1
        if state["step"] in want:
            b = min(max_batch, q.shape[0])
            captured.append(dict(step=state["step"], layer=layer, q=q[:b].detach().float().cpu(),
                                 k=k[:b].detach().float().cpu(), scale=scale))

    def on_step(p, i, t, kw):
        state["step"] = i + 1
        state["layer"] = 0
        return {}

    handle = vidattn.apply(pipe, vidattn.Dense())
    n_layers = len(handle.layer_names[0])
    layout = None
    try:
        with add_observer(observe):
            for sd in seeds:
                state.update(step=0, layer=0)
                kw = dict(call_kwargs, generator=torch.Generator().manual_seed(int(sd)), callback_on_step_end=on_step,
                          output_type="np")
                pipe(**kw)
                layout = handle.layout
    finally:
        vidattn.remove(pipe)
    if layout is None or not captured:
        raise RuntimeError("no self-attention call was captured: is this a pipeline vidattn.apply supports?")
    rows = _sample_rows(layout, block_size, query_blocks)
    per = {}
    for c in captured:
        layer = c["layer"] % n_layers  # several transformer calls per step (e.g. separate CFG calls)
        st = head_statistics(c["q"], c["k"], layout, rows, scale=c["scale"], block_size=block_size,
                             window_fractions=window_fractions, tube_radius=tube_radius)
        per.setdefault(layer, []).append(st)
    fi = list(window_fractions).index(HEAD_RULES["local_fraction"]) if HEAD_RULES["local_fraction"] in window_fractions else 1
    layers = []
    for layer in sorted(per):
        sts = per[layer]
        mean = {key: np.mean([s[key] for s in sts], axis=0) for key in sts[0]
                if key not in ("window_fractions", "window_tokens", "temporal_uniform")}
        heads = []
        for h in range(mean["entropy_ratio"].shape[0]):
            hd = {key: (val[h].tolist() if val.ndim > 1 else float(val[h])) for key, val in mean.items()}
            hd["local_window"] = float(mean["window_mass"][h, fi])
            hd["type"] = classify_head(hd)
            heads.append(hd)
        layers.append(dict(layer=layer, heads=heads))
    first = per[min(per)][0]
    res = dict(layers=layers,
               layout=dict(grid=list(layout.grid), prefix=layout.prefix, suffix=layout.suffix, seq_len=layout.seq_len),
               window_fractions=list(window_fractions), window_tokens=first["window_tokens"].tolist(),
               temporal_uniform=first["temporal_uniform"].tolist() if "temporal_uniform" in first else None,
               settings=dict(seeds=list(seeds), steps=want, block_size=block_size, query_blocks=query_blocks,
                             tube_radius=tube_radius, rules=dict(HEAD_RULES),
                             call_kwargs={k: v for k, v in call_kwargs.items()
                                          if isinstance(v, (int, float, str, bool, type(None)))}))
    res["summary"] = summarize(res)
    return res


def summarize(stats: Mapping[str, Any]) -> Dict[str, Any]:
    """Counts of head types and model-wide means of the statistics in an :func:`attention_stats` dict."""
    heads = [h for lay in stats["layers"] for h in lay["heads"]]
    types = {}
    for h in heads:
        types[h["type"]] = types.get(h["type"], 0) + 1
    n = len(heads)
    mean = lambda key: float(np.mean([h[key] for h in heads])) if heads and key in heads[0] else None  # noqa: E731
    return dict(heads=n, types=types,
                local_or_temporal=(types.get("local", 0) + types.get("temporal", 0)) / n if n else 0.0,
                mean_entropy_ratio=mean("entropy_ratio"), mean_blocks_for_90=mean("blocks_for_90"),
                mean_local_window=mean("local_window"), max_tube_other_frames=max(
                    (h.get("tube_other_frames", 0.0) for h in heads), default=0.0),
                mean_temporal_profile=np.mean([h["temporal_profile"] for h in heads], 0).tolist()
                if heads and "temporal_profile" in heads[0] else None)


def format_attention_stats(stats: Mapping[str, Any]) -> str:
    """Plain-text table: one line per (layer, head) and a summary line."""
    fr = stats["window_fractions"]
    tok = stats["window_tokens"]
    head = (f"{'layer':>5} {'head':>4} {'type':<9} {'entropy':>7} "
            + " ".join(f"{'win' + format(f, 'g'):>8}" for f in fr)
            + f" {'tube':>6} {'blk90':>6} {'dt=0':>6} {'dt=1':>6} {'dt>=2':>6}")
    lines = [f"layout {stats['layout']['grid']} (+{stats['layout']['prefix'] + stats['layout']['suffix']} text); "
             f"window token fractions " + ", ".join(f"{f:g}: {t:.3f}" for f, t in zip(fr, tok)), head]
    for lay in stats["layers"]:
        for h, hd in enumerate(lay["heads"]):
            prof = hd.get("temporal_profile") or [float("nan")] * 3
            far = float(np.sum(prof[2:])) if len(prof) > 2 else 0.0
            lines.append(f"{lay['layer']:>5} {h:>4} {hd['type']:<9} {hd['entropy_ratio']:>7.3f} "
                         + " ".join(f"{m:>8.3f}" for m in hd["window_mass"])
                         + f" {hd.get('tube_other_frames', float('nan')):>6.3f} {hd['blocks_for_90']:>6.3f}"
                         f" {prof[0]:>6.3f} {prof[1] if len(prof) > 1 else 0.0:>6.3f} {far:>6.3f}")
    s = stats["summary"]
    lines.append(f"heads {s['heads']}: " + ", ".join(f"{k} {v}" for k, v in sorted(s["types"].items()))
                 + f"; local or temporal {s['local_or_temporal']:.0%}; mean entropy ratio {s['mean_entropy_ratio']:.3f}; "
                 f"mean blocks for 90% {s['mean_blocks_for_90']:.3f}; max tube mass {s['max_tube_other_frames']:.3f}")
    return "\n".join(lines)
