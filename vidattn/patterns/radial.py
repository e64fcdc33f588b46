"""Radial attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay
for Long Video Generation", arXiv:2506.19852; mask as read in mit-han-lab/radial-attention,
``radial_attn/attn_mask.py``: ``get_window_width`` / ``get_diagonal_split_mask``).

Definition (grid ``(T, H, W)``, ``tpf = H * W`` tokens per frame, block size ``B``). A grid query
token at in-frame position ``r`` of frame ``i`` and a grid key token at position ``c`` of frame
``j`` interact iff, with ``d = |i - j|``:

* ``j < sink_frames`` (attention sink: whole first frame(s) visible as keys), or
* ``keep(d)`` and ``|r - c| <= width(d)``, where

  - ``width(d) = tpf`` for ``d == 0`` or ``d <= dense_near_frames``;
  - ``width(1) = tpf // 2`` when ``dense_near_frames == 0`` (Wan 2.1 setting);
  - otherwise ``width(d) = max(2**bitlen(tpf) / 2**bitlen(d) * decay_factor, B)``;
  - frequency reduction: with ``dl(d) = 2**bitlen(tpf) / 2**bitlen(d)`` (no decay factor),
    ``keep(d) = True`` if ``dl(d) >= B`` else ``d % floor(B / dl(d)) == 0`` (as in the authors'
    code it applies at every distance, so it only bites once ``dl(d) < B``).

``bitlen`` is Python's ``int.bit_length``. Non-grid (prefix/suffix: text) tokens attend and are
attended densely. Because the band never falls below one block (``width >= B``) and distant frames
are dropped whole, the mask is block-structured: the compiled :class:`~vidattn.plan.BlockPlan`
(block ``B``) has full blocks inside bands, skipped blocks outside and partial blocks (evaluated
exactly by :class:`RadialRule`) only on band edges. ``mask()`` is exactly what the plan executes
(``plan.token_mask() == mask()``). Unlike the authors' code (which rounds each frame-pair mask to
blocks with a density heuristic), the token rule is applied exactly, so the mask does not depend
on where block boundaries fall. Density falls like ``O(log n / n)`` in the number of frames.

Defaults are the paper's Wan 2.1 settings (decay 0.2, frame-0 sink, half width at distance 1,
block 128); HunyuanVideo: ``Radial(decay_factor=0.95, sink_frames=0, dense_near_frames=1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from ..layout import TokenLayout
from ..plan import FULL, BlockPlan, TokenRule, plan_from_block_mask, plan_from_rule
from .base import StaticPattern

__all__ = ["Radial", "RadialRule", "radial_tables"]


def radial_tables(num_frames: int, tokens_per_frame: int, block_size: int, decay_factor: float,
                  dense_near_frames: int) -> Tuple[Tuple[float, ...], Tuple[bool, ...]]:
    """Per frame distance ``d in [0, num_frames)``: ``(width(d), keep(d))`` as Python tuples
    (see the module docstring for the formula)."""
    tpf, B = tokens_per_frame, block_size
    widths, keeps = [], []
    top = 2 ** tpf.bit_length()
    for d in range(num_frames):
        dl = top / 2 ** d.bit_length()
        keeps.append(bool(dl >= B or d % int(B / dl) == 0))  # always True for d == 0
        if d == 0 or d <= dense_near_frames:
            widths.append(float(tpf))
        elif d == 1 and dense_near_frames == 0:
            widths.append(float(tpf // 2))
        else:
            widths.append(float(max(dl * decay_factor, B)))
    return tuple(widths), tuple(keeps)


@dataclass(frozen=True)
class RadialRule(TokenRule):
    """Token rule of :class:`Radial`; plain scalar fields, evaluated with elementwise integer /
    float arithmetic only (no table gathers), so FlexAttention and a Triton kernel run it cheaply.

    Fields: ``prefix``, ``num_frames`` (T), ``tokens_per_frame``, ``sink_frames``,
    ``decay_factor``, ``block_size`` (band floor and frequency-reduction threshold),
    ``dense_near_frames``, ``dense_text`` (non-grid tokens dense both ways). Equals
    :func:`radial_tables` evaluated at ``d = |f_q - f_k|``.
    """

    prefix: int
    num_frames: int
    tokens_per_frame: int
    sink_frames: int
    decay_factor: float
    block_size: int
    dense_near_frames: int
    dense_text: bool = True

    def warm(self, device) -> "RadialRule":
        """No device state to prepare (kept for the common rule interface); returns self."""
        return self

    def __call__(self, h, q_idx, k_idx):
        """Bool tensor of the broadcast shape of ``q_idx``/``k_idx`` (original token indices)."""
        tpf, T = self.tokens_per_frame, self.num_frames
        n = T * tpf
        gq, gk = q_idx - self.prefix, k_idx - self.prefix
        q_in = (gq >= 0) & (gq < n)
        k_in = (gk >= 0) & (gk < n)
        gq, gk = gq.clamp(0, n - 1), gk.clamp(0, n - 1)
        fq, fk = gq // tpf, gk // tpf
        d = (fq - fk).abs()
        bl = torch.zeros_like(d)
        for j in range(T.bit_length()):  # bitlen(d) = #{j : d >= 2^j}
            bl = bl + (d >= (1 << j)).to(d.dtype)
        dl = torch.exp2((tpf.bit_length() - bl).to(torch.float32))  # 2^bitlen(tpf) / 2^bitlen(d)
        width = torch.clamp(dl * self.decay_factor, min=float(self.block_size))
        if self.dense_near_frames == 0:
            width = torch.where(d == 1, torch.full_like(width, float(tpf // 2)), width)
        width = torch.where(d <= self.dense_near_frames, torch.full_like(width, float(tpf)), width)
        # d % floor(B / dl) == 0, in float32 (exact for these small integers; no integer modulo)
        split = torch.floor(self.block_size / dl).clamp(min=1.0)
        df = d.to(torch.float32)
        keep = (dl >= self.block_size) | (df == torch.floor(df / split) * split)
        band = keep & ((gq % tpf - gk % tpf).abs().to(torch.float32) <= width)
        ok = q_in & k_in & (band | (fk < self.sink_frames))
        if self.dense_text:
            ok = ok | ~q_in | ~k_in
        return ok

    def cache_key(self):
        return ("RadialRule", self.prefix, self.num_frames, self.tokens_per_frame, self.sink_frames,
                self.decay_factor, self.block_size, self.dense_near_frames, self.dense_text)


@dataclass(frozen=True)
class Radial(StaticPattern):
    """Radial attention on a ``(T, H, W)`` video grid (formula in the module docstring).

    Args:
        decay_factor: float > 0, multiplies the band width for ``d >= 2`` (Wan 0.2, Hunyuan 0.95).
        sink_frames: first frames fully visible as keys to every query (Wan 1, Hunyuan 0).
        dense_near_frames: frame distances with the full band (0: Wan, half band at d=1; 1: Hunyuan).
        block_size: block of the plan and of the band floor / frequency reduction (paper: 128).
        dense_text: prefix/suffix tokens attend and are attended densely.
        granularity: ``"token"`` (default): the exact token rule above, band edges run as
            partial blocks; ``"block"``: every block holding at least one allowed pair is run
            in full (a superset of the token mask, like the authors' block mask; no per-token
            masking work, so the fastest on GPU). ``mask()`` always equals what the plan runs.
    """

    decay_factor: float = 0.2
    sink_frames: int = 1
    dense_near_frames: int = 0
    block_size: int = 128
    dense_text: bool = True
    granularity: str = "token"

    needs_frames = True

    def __post_init__(self):
        if not isinstance(self.decay_factor, (int, float)) or isinstance(self.decay_factor, bool) \
                or not self.decay_factor > 0:
            raise ValueError(f"decay_factor must be a float > 0, got {self.decay_factor!r}")
        for name in ("sink_frames", "dense_near_frames"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")
        if self.granularity not in ("token", "block"):
            raise ValueError(f"granularity must be 'token' or 'block', got {self.granularity!r}")

    def validate(self, layout: TokenLayout) -> None:
        """Raise ``ValueError`` unless ``layout.grid`` is ``(T, H, W)``."""
        if not isinstance(layout, TokenLayout):
            raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
        if layout.ndim != 3:
            raise ValueError(f"Radial needs a (T, H, W) video grid (frames first), got grid={layout.grid}")

    def rule(self, layout: TokenLayout) -> RadialRule:
        """The :class:`RadialRule` of this pattern on ``layout``."""
        self.validate(layout)
        T, H, W = layout.grid
        return RadialRule(prefix=layout.prefix, num_frames=T, tokens_per_frame=H * W, sink_frames=self.sink_frames,
                          decay_factor=float(self.decay_factor), block_size=self.block_size,
                          dense_near_frames=self.dense_near_frames, dense_text=self.dense_text)

    def mask(self, layout: TokenLayout, num_heads: int = 1) -> torch.Tensor:
        """BoolTensor ``[1, S, S]`` (same for every head); costs S*S memory (tests / small S)."""
        if self.granularity == "block":
            return self.plan(layout).token_mask()[0]
        r = self.rule(layout)
        idx = torch.arange(layout.seq_len)
        return r(torch.tensor(0), idx[:, None], idx[None, :])[None]

    def candidate_blocks(self, layout: TokenLayout, device=None) -> torch.Tensor:
        """BoolTensor ``[NB, NB]`` (blocks of ``block_size``): a superset of the blocks holding
        allowed pairs, from per-block frame and in-frame position ranges (``O(S + NB^2)``).

        A block pair is a candidate if either block holds text tokens, the key block touches a
        sink frame, or some frame distance ``d`` between the blocks has ``keep(d)`` and (when each
        block lies inside one frame) the position ranges come within ``width(d)``."""
        r = self.rule(layout)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        S, P, bs = layout.seq_len, layout.prefix, self.block_size
        N, tpf, T = layout.num_grid_tokens, r.tokens_per_frame, r.num_frames
        nb = -(-S // bs)
        g = torch.arange(nb * bs, device=dev) - P
        valid = torch.arange(nb * bs, device=dev) < S
        grid_tok = (g >= 0) & (g < N) & valid
        text = (~grid_tok & valid).view(nb, bs).any(-1)
        gc = g.clamp(0, N - 1)
        big = 1 << 40

        def rng(x):
            lo = torch.where(grid_tok, x, big).view(nb, bs).amin(-1)
            hi = torch.where(grid_tok, x, -big).view(nb, bs).amax(-1)
            return lo, hi

        fmin, fmax = rng(gc // tpf)
        pmin, pmax = rng(gc % tpf)
        has_grid = fmin <= fmax
        fmin_c, fmax_c = fmin.clamp(0, T - 1), fmax.clamp(0, T - 1)
        dmin = torch.maximum(torch.maximum(fmin_c[:, None] - fmax_c[None], fmin_c[None] - fmax_c[:, None]),
                             torch.zeros(nb, nb, dtype=torch.long, device=dev))
        dmax = torch.maximum(fmax_c[:, None] - fmin_c[None], fmax_c[None] - fmin_c[:, None])
        widths, keeps = radial_tables(T, tpf, bs, float(self.decay_factor), self.dense_near_frames)
        widths = torch.tensor(widths, dtype=torch.float32, device=dev)
        keeps = torch.tensor(keeps, dtype=torch.bool, device=dev)
        ckeep = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), keeps.long().cumsum(0)])
        any_keep = (ckeep[dmax + 1] - ckeep[dmin]) > 0
        single = (fmin == fmax)[:, None] & (fmin == fmax)[None]
        gap = torch.maximum(torch.maximum(pmin[:, None] - pmax[None], pmin[None] - pmax[:, None]),
                            torch.zeros(nb, nb, dtype=torch.long, device=dev))
        band_ok = ~single | (gap.float() <= widths[dmin.clamp(max=T - 1)])
        sink = (fmin_c < r.sink_frames)[None] & has_grid[None]
        pair = has_grid[:, None] & has_grid[None] & ((any_keep & band_ok) | sink)
        if r.dense_text:
            pair = pair | text[:, None] | text[None]
        return pair

    def plan(self, layout: TokenLayout, q=None, k=None, *, num_heads: int = 1, device=None) -> BlockPlan:
        """Block plan (Bp = Hp = 1, block ``block_size``), cached per (layout, device).

        Built once by evaluating the rule on the :meth:`candidate_blocks` only, in bounded chunks
        (static pattern: paid once per layout, shared by all heads, layers and steps)."""
        dev = torch.device(device) if device is not None else (q.device if q is not None else torch.device("cpu"))
        r = self.rule(layout).warm(dev)
        bs = self.block_size

        def build():
            meta = dict(pattern="radial", decay_factor=float(self.decay_factor), sink_frames=self.sink_frames,
                        dense_near_frames=self.dense_near_frames)
            meta["granularity"] = self.granularity
            plan = plan_from_rule(r, seq_len=layout.seq_len, block_q=bs, block_k=bs, num_heads=1, device=dev,
                                  candidates=self.candidate_blocks(layout, dev)[None], meta=meta)
            if self.granularity == "token":
                return plan
            kept = plan.block_classes() > 0  # [1, 1, NB, NB]
            cnt = torch.clamp(layout.seq_len - torch.arange(kept.shape[-1], device=dev) * bs, max=bs).double()
            dens = float((kept.double() * cnt[:, None] * cnt[None, :]).sum()) / layout.seq_len ** 2
            return plan_from_block_mask(torch.where(kept, FULL, 0).to(torch.int8), seq_len=layout.seq_len,
                                        block_q=bs, block_k=bs, rule=None, token_density=dens, meta=meta)

        return self.cached_plan((layout, str(dev)), build)
