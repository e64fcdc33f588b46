"""Sparse VideoGen 1, as its authors' code defines it (Xi et al., "Sparse VideoGen: Accelerating
Video Diffusion Transformers with Spatial-Temporal Sparsity", arXiv:2502.01776). Follows
svg-project/Sparse-VideoGen at commit ``5ce7b0127c0d44383ee8b9e5512431feb625f621``:
``svg/models/wan/attention.py`` (``WanAttn_SVGAttn_Processor2_0.sample_mse`` /
``attention_core_logic``), ``svg/models/wan/utils.py`` (``generate_temporal_head_mask_mod``,
``sparsity_to_width``, ``get_attention_mask``), ``svg/models/wan/placement.py`` (head placement);
re-implemented from those definitions, no code copied.

Grid ``(F, H, W)``, ``tpf = H * W`` tokens per frame, ``N = F * tpf`` video tokens, ``C`` text
tokens, ``S = N + C``. Every head runs its video tokens in a *plan order*: spatial heads in the
natural (frame-major) order, temporal heads in position-major order (token ``f * tpf + p`` at
position ``p * F + f``); text tokens follow the video, unpermuted. In plan positions ``i, j`` of two
video tokens, both kinds of head use the same mask (their one FlexAttention ``BlockMask``)::

    allowed(i, j) = j < tpf  or  |i - j| <= ceil(width / 128) * 128

(``j < tpf``: the first-frame sink, in plan order), with the band from the target ``sparsity``
(their name; it is the *kept* fraction of the attention map): ``s' = (s S^2 - 2 S C) / S^2``,
``width = S (1 - sqrt(1 - s'))`` tokens. Text tokens attend and are attended densely.

Online profiling (every call): ``num_sampled_rows`` query rows among the first
``min(N, sample_max_row)`` tokens get exact attention against all keys, and against each of their
two *profiling* masks (hard-coded two frames, not the runtime band): the spatial mask
``k < tpf or |i // 128 - j // 128| < (2 tpf) // 128`` in natural order, and the temporal mask, the
same evaluated at position-major indices. Each head takes the mask with the lower output MSE
(ties: spatial).

Deliberate differences: (a) sampled rows are evenly spaced instead of ``torch.randint`` draws
(deterministic); (b) with batch > 1 (CFG) the MSE is summed over the batch, one choice per head
(their choice is per (cfg, head)); (c) text tokens are dense in the profiling masks too, and
prefix text is moved after the video in plan order (their Wan path has no text in self-attention,
HunyuanVideo puts it last); (d) the dense warm-up (first 20% of steps / 3% of layers in their
scripts) is the pipeline schedule's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..layout import TokenLayout, grid_position
from ..plan import EMPTY, FULL, PARTIAL, BlockPlan, TokenRule, plan_from_block_mask
from .base import Pattern

__all__ = ["SparseVideoGen", "SVGRule", "svg_band_width", "SPATIAL", "TEMPORAL"]

SPATIAL, TEMPORAL = 0, 1


def svg_band_width(sparsity: float, num_text: int, num_frames: int, tokens_per_frame: int) -> int:
    """Runtime band half-width in tokens: ``ceil(width / 128) * 128`` with the authors'
    ``sparsity_to_width`` (module docstring)."""
    S = num_text + num_frames * tokens_per_frame
    s = (sparsity * S * S - 2 * S * num_text) / (S * S)
    width = S * (1 - math.sqrt(max(0.0, 1 - s)))
    return int(math.ceil(width / 128) * 128)


def _plan_positions(g: torch.Tensor, kinds: torch.Tensor, F: int, tpf: int) -> torch.Tensor:
    """Plan position of grid token ``g`` for heads of kind ``kinds`` (broadcast)."""
    return torch.where(kinds == TEMPORAL, (g % tpf) * F + g // tpf, g)


class SVGRule(TokenRule):
    """Token rule of :class:`SparseVideoGen` (original indices in, module docstring's mask).

    Fields: ``prefix``, ``num_frames``, ``tokens_per_frame``, ``band`` (tokens), ``kinds`` tuple
    (per head, SPATIAL=0 / TEMPORAL=1).
    """

    def __init__(self, prefix: int, num_frames: int, tokens_per_frame: int, band: int, kinds: Tuple[int, ...]):
        self.prefix, self.num_frames, self.tokens_per_frame, self.band = prefix, num_frames, tokens_per_frame, band
        self.kinds = tuple(int(x) for x in kinds)
        self._dev = {}

    def _kinds(self, device):
        t = self._dev.get(str(device))
        if t is None:
            t = torch.tensor(self.kinds, dtype=torch.long, device=device)
            if not torch.compiler.is_compiling():
                self._dev[str(device)] = t
        return t

    def warm(self, device) -> "SVGRule":
        self._kinds(torch.device(device))
        return self

    def __call__(self, h, q_idx, k_idx):
        F, tpf = self.num_frames, self.tokens_per_frame
        gq, q_in = grid_position(q_idx, self.prefix, F * tpf)
        gk, k_in = grid_position(k_idx, self.prefix, F * tpf)
        kind = self._kinds(q_idx.device)[torch.as_tensor(h, device=q_idx.device)]
        pq = _plan_positions(gq, kind, F, tpf)
        pk = _plan_positions(gk, kind, F, tpf)
        ok = (pk < tpf) | ((pq - pk).abs() <= self.band)
        return (q_in & k_in & ok) | ~q_in | ~k_in

    def cache_key(self):
        return ("SVGRule", self.prefix, self.num_frames, self.tokens_per_frame, self.band, self.kinds)


@dataclass(frozen=True)
class SparseVideoGen(Pattern):
    """Sparse VideoGen 1 (module docstring). Build it with ``PermutedGrid.from_authors("svg")``.

    Args:
        sparsity: the authors' ``sparsity`` (kept fraction; their Wan 720p script 0.3, default 0.25).
        num_sampled_rows: profiled query rows per call (authors 64).
        sample_max_row: rows are sampled among the first this many tokens (authors 10000).
        block_size: plan block (authors' band rounding and profiling block: 128).
    """

    sparsity: float = 0.3
    num_sampled_rows: int = 64
    sample_max_row: int = 10000
    block_size: int = 128

    is_dynamic = True
    needs_frames = True

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity <= 1:
            raise ValueError(f"sparsity must be a float in (0, 1], got {self.sparsity!r}")
        for name in ("num_sampled_rows", "sample_max_row", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")

    def validate(self, layout: TokenLayout) -> None:
        if not isinstance(layout, TokenLayout):
            raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
        if layout.ndim != 3:
            raise ValueError(f"SparseVideoGen needs a (T, H, W) video grid, got grid={layout.grid}")

    # ------------------------------------------------------------ profiling
    def sample_rows(self, layout: TokenLayout) -> torch.Tensor:
        """LongTensor ``[n]`` grid-token indices of the profiled query rows."""
        N = layout.num_grid_tokens
        top = min(N, self.sample_max_row)
        n = min(self.num_sampled_rows, top)
        return (torch.arange(n) * top) // n

    def profiling_masks(self, layout: TokenLayout, rows: torch.Tensor, device=None) -> torch.Tensor:
        """BoolTensor ``[2, n, S]``: the spatial and temporal profiling masks on the sampled rows
        (original key order)."""
        T, Hh, W = layout.grid
        tpf, N, S, P = Hh * W, layout.num_grid_tokens, layout.seq_len, layout.prefix
        dev = torch.device(device) if device is not None else torch.device("cpu")
        rows = rows.to(dev)
        g = torch.arange(N, device=dev)
        thr = (2 * tpf) // 128
        out = torch.ones(2, rows.numel(), S, dtype=torch.bool, device=dev)
        for kind in (SPATIAL, TEMPORAL):
            kk = torch.full((), kind, device=dev)
            pr = _plan_positions(rows, kk, T, tpf)[:, None]
            pc = _plan_positions(g, kk, T, tpf)[None, :]
            out[kind, :, P:P + N] = (pc < tpf) | ((pr // 128 - pc // 128).abs() < thr)
        return out

    def classify(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: Optional[float] = None) -> Tuple[Tuple[int, ...], torch.Tensor]:
        """Per-head spatial / temporal choice by sampled output MSE.

        Args: q ``[B, S, H, D]``, k/v ``[B, S, Hk, D]``. Returns ``(kinds, mse)`` with ``kinds`` a
        tuple of H ints and ``mse`` float32 ``[2, H]`` (summed over the batch)."""
        B, S, H, D = q.shape
        s = D ** -0.5 if scale is None else scale
        rows = self.sample_rows(layout).to(q.device)
        with torch.no_grad():
            rep = H // k.shape[2]
            kk = k.float().repeat_interleave(rep, 2)
            vv = v.float().repeat_interleave(rep, 2)
            qs = q[:, layout.prefix + rows].float()
            logits = torch.einsum("bnhd,bshd->bhns", qs, kk) * s
            gold = torch.einsum("bhns,bshd->bhnd", torch.softmax(logits, -1), vv)
            masks = self.profiling_masks(layout, rows, q.device)
            mse = []
            for m in masks:
                o = torch.einsum("bhns,bshd->bhnd", torch.softmax(logits.masked_fill(~m, float("-inf")), -1), vv)
                mse.append(((o - gold) ** 2).mean((2, 3)).sum(0))
            mse = torch.stack(mse)  # [2, H]
        kinds = tuple(int(x) for x in torch.argmin(mse, 0).tolist())
        return kinds, mse

    # ------------------------------------------------------------ plan
    def head_permutation(self, layout: TokenLayout, kind: int, device=None) -> torch.Tensor:
        """LongTensor ``[S]``: video in the head's order, then prefix, then suffix tokens."""
        T, Hh, W = layout.grid
        P, N, S = layout.prefix, layout.num_grid_tokens, layout.seq_len
        g = torch.arange(N, device=device).reshape(T, Hh * W)
        vid = (g.t() if kind == TEMPORAL else g).reshape(-1) + P
        return torch.cat([vid, torch.arange(P, device=device), torch.arange(P + N, S, device=device)])

    def plan_for(self, layout: TokenLayout, kinds: Tuple[int, ...], device=None) -> BlockPlan:
        """Plan (Bp = 1, Hp = H) for fixed per-head kinds; blocks classified analytically."""
        self.validate(layout)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        T, Hh, W = layout.grid
        tpf, N, S, bs = Hh * W, layout.num_grid_tokens, layout.seq_len, self.block_size
        band = svg_band_width(float(self.sparsity), S - N, T, tpf)
        rule = SVGRule(layout.prefix, T, tpf, band, kinds).warm(dev)
        perm = torch.stack([self.head_permutation(layout, kd, dev) for kd in kinds])
        nb = -(-S // bs)
        st = torch.arange(nb, device=dev) * bs
        en = torch.clamp(st + bs, max=S)  # exclusive
        v0, v1 = st.clamp(max=N), en.clamp(max=N)  # video part [v0, v1) in plan positions
        has_v = v1 > v0
        has_t = en > v1
        a0, a1 = v0[:, None], (v1 - 1)[:, None]
        b0, b1 = v0[None, :], (v1 - 1)[None, :]
        maxd = torch.maximum((a1 - b0).abs(), (b1 - a0).abs())
        mind = torch.clamp(torch.maximum(b0 - a1, a0 - b1), min=0)
        full_v = (b1 < tpf) | (maxd <= band)
        empty_v = (b0 >= tpf) & (mind > band)
        both_v = has_v[:, None] & has_v[None, :]
        any_t = has_t[:, None] | has_t[None, :]
        cls = torch.where(~both_v | full_v, FULL, torch.where(empty_v & ~any_t, EMPTY, PARTIAL)).to(torch.int8)
        # exact token density: per video row, |[0, tpf) U [i - band, i + band]| within [0, N)
        i = torch.arange(N, device=dev, dtype=torch.float64)
        lo, hi = (i - band).clamp(min=0), (i + band).clamp(max=N - 1)
        cnt = (hi - lo + 1) + torch.minimum(lo, torch.full_like(lo, float(tpf))) + torch.clamp(tpf - 1 - hi, min=0)
        density = float((cnt.sum() + (S * S - N * N)) / (S * S))
        meta = dict(pattern="svg", sparsity=float(self.sparsity), band=band,
                    head_patterns=["temporal" if kd == TEMPORAL else "spatial" for kd in kinds])
        H = len(kinds)
        return plan_from_block_mask(cls[None, None].expand(1, H, nb, nb).contiguous(), seq_len=S, block_q=bs,
                                    block_k=bs, rule=rule, perm=perm, token_density=density, meta=meta)

    def plan(self, layout: TokenLayout, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
             v: Optional[torch.Tensor] = None, *, scale: Optional[float] = None, num_heads: int = 1,
             device=None) -> BlockPlan:
        """Profile heads on ``q``/``k``/``v`` and return the plan (cached per choice)."""
        if q is None or k is None or v is None:
            raise ValueError("SparseVideoGen profiles output MSE: plan() needs q, k and v [B, S, heads, D]")
        self.validate(layout)
        layout.check_seq_len(q.shape[1], "q")
        dev = torch.device(device) if device is not None else q.device
        kinds, mse = self.classify(layout, q, k, v, scale)
        cache = self.__dict__.setdefault("_plans", {})
        key = (layout, kinds, str(dev))
        plan = cache.get(key)
        if plan is None:
            if len(cache) > 16:
                cache.clear()
            plan = cache[key] = self.plan_for(layout, kinds, dev)
        return plan

