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

Authors-exact preset (``granularity="authors"``, built by :meth:`Radial.from_authors`)
-------------------------------------------------------------------------------------
Follows ``radial_attn/attn_mask.py`` of mit-han-lab/radial-attention at commit
``72788d4f0a6d202f1ec5f1c98a6e4c8b2e34fdbc`` (``gen_log_mask_shrinked``, ``get_window_width``,
``get_diagonal_split_mask``, ``shrinkMaskStrict``), re-derived, not copied. The executed mask is
their *block* mask over the video tokens, expanded to tokens; text (prefix/suffix) tokens are dense
both ways. For every frame pair ``(i, j)``, ``d = |i - j|``:

* local ``tpf x tpf`` mask: all ones if ``model == "wan"`` and ``j == 0`` (first-frame sink, both
  models' processors run with it only for Wan); else ``|c - r| <= w`` with ``w = tpf`` for
  ``d <= 1`` (both models in the current code) and ``max(2**bitlen(tpf) / 2**bitlen(d) * decay,
  B)`` beyond (compared in float32 as their torch code does), ANDed with the frequency reduction
  whose threshold is fixed at **128** whatever the block size (their ``threshold = 128``);
* the local mask is placed at row offset ``(i * tpf) % B`` and column offset ``(j * tpf) % B`` of
  a zero canvas whose first ``ceil(tpf / B)`` blocks (rows and columns) are shrunk: a block is kept
  iff more than 60% of its non-empty columns have density (allowed rows / B) above 1/3; the
  kept blocks are ORed into the global mask at block ``((i * tpf) // B, (j * tpf) // B)``.

Their attention kernels need the video token count ``N`` to be a multiple of ``B``. For other
``N`` this follows their mask function on the block-padded sequence (its own ``__main__``
example): the same construction over ``ceil(N / B)`` video blocks, and the ragged last video
block, which lies past their ``video_text_border = N // B``, dense as query and as key block
(their ``final[border:] = True``); padding tokens dropped. With ``B | N`` it is exactly theirs. Blocks are aligned to
the first *video* token: with a prefix that is not a block multiple the plan runs in the order
``[video, prefix, suffix]`` (a plan permutation) so that plan blocks coincide with their blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from ..layout import TokenLayout, grid_position
from ..plan import EMPTY, FULL, PARTIAL, BlockPlan, TokenRule, plan_from_block_mask, plan_from_rule
from .base import StaticPattern

__all__ = ["Radial", "RadialRule", "radial_tables", "authors_block_mask", "RadialBlockTableRule",
           "AUTHORS_SPLIT_THRESHOLD"]

AUTHORS_SPLIT_THRESHOLD = 128  # their frequency-reduction threshold, hard-coded whatever the block size


def authors_block_mask(num_frames: int, tokens_per_frame: int, block_size: int, decay_factor: float,
                       model: str, device=None, pairs_per_chunk: int = 64) -> torch.Tensor:
    """The authors' Radial block mask over the video tokens (module docstring, "Authors-exact").

    Computed per frame pair from closed-form row counts (the allowed rows of a band inside a row
    block form one interval), never materialising a ``tpf x tpf`` mask: ``O(F^2 * tpf)`` work.

    Args:
        num_frames: F (latent frames); tokens_per_frame: tpf; block_size: B (their code: 128 or 64).
        decay_factor: float > 0; model: ``"wan"`` (first-frame sink) or ``"hunyuan"``.
    Returns:
        BoolTensor ``[NVB, NVB]``, ``NVB = ceil(F * tpf / B)``; True = block computed.
    """
    if model not in ("wan", "hunyuan"):
        raise ValueError(f"model must be 'wan' or 'hunyuan', got {model!r}")
    F, tpf, B = int(num_frames), int(tokens_per_frame), int(block_size)
    if F < 1 or tpf < 1 or B < 1:
        raise ValueError(f"num_frames, tokens_per_frame and block_size must be >= 1, got {F}, {tpf}, {B}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    nvb = -(-F * tpf // B)
    nb = -(-tpf // B)  # blocks of one frame pair canvas that are shrunk
    top = 2 ** tpf.bit_length()
    # per pair: (row block start, col block start, row offset, col offset, band half-width or -1 for sink)
    rows = []
    for i in range(F):
        for j in range(F):
            d = abs(i - j)
            sink = model == "wan" and j == 0
            if not sink:
                dl = top / 2 ** d.bit_length()
                if dl < AUTHORS_SPLIT_THRESHOLD and d % int(AUTHORS_SPLIT_THRESHOLD / dl) != 0:
                    continue  # frequency reduction: the whole pair is empty
                w = tpf if d <= 1 else max(dl * decay_factor, B)
                width = int(torch.tensor(w, dtype=torch.float32).floor().item())  # |c-r| <= float32(w)
            else:
                width = -1
            rows.append(((i * tpf) // B, (j * tpf) // B, (i * tpf) % B, (j * tpf) % B, width))
    out = torch.zeros(nvb, nvb, dtype=torch.bool, device=dev)
    if (F * tpf) % B:
        # their ``final[video_text_border:] = True`` with border = N // B: on a sequence padded to a
        # block multiple (their own __main__ example) the ragged last video block is dense both ways
        out[(F * tpf) // B, :] = True
        out[:, (F * tpf) // B] = True
    if not rows:
        return out
    table = torch.tensor(rows, dtype=torch.long, device=dev)
    a = torch.arange(nb, device=dev)
    qcol = torch.arange(nb * B, device=dev)
    for c0 in range(0, table.shape[0], pairs_per_chunk):
        t = table[c0:c0 + pairs_per_chunk]
        brs, bcs, rr, rc, wd = (t[:, k] for k in range(5))
        lo = (a[None] * B - rr[:, None]).clamp(min=0)                 # [P, nb] first local row of row block a
        hi = ((a[None] + 1) * B - rr[:, None]).clamp(max=tpf)         # [P, nb] one past the last
        c = qcol[None] - rc[:, None]                                  # [P, nb*B] local column
        c_ok = (c >= 0) & (c < tpf)
        sink = (wd < 0)[:, None, None]
        w = wd.clamp(min=0)[:, None, None]
        blo = torch.where(sink, lo[:, :, None], torch.maximum(lo[:, :, None], c[:, None] - w))
        bhi = torch.where(sink, hi[:, :, None], torch.minimum(hi[:, :, None], c[:, None] + w + 1))
        cnt = (bhi - blo).clamp(min=0) * c_ok[:, None]               # [P, nb, nb*B] allowed rows per column
        cnt = cnt.view(t.shape[0], nb, nb, B)
        high = (3 * cnt > B).sum(-1)                                  # density > 1/3
        nonzero = (cnt > 0).sum(-1)
        keep = 5 * high > 3 * nonzero                                 # > 60% of the non-empty columns
        P = t.shape[0]
        ri = (brs[:, None, None] + a[None, :, None]).expand(P, nb, nb)
        ci = (bcs[:, None, None] + a[None, None, :]).expand(P, nb, nb)
        ok = keep & (ri < nvb) & (ci < nvb)
        out[ri[ok], ci[ok]] = True
    return out


class RadialBlockTableRule(TokenRule):
    """Token rule of the authors-exact Radial preset: grid tokens ``gq, gk`` (sequence index minus
    ``prefix``) may attend iff ``table[gq // B, gk // B]``; prefix/suffix tokens are dense both ways.

    Fields: ``prefix``, ``num_grid`` (N), ``block_size`` (B), ``table`` BoolTensor ``[ceil(N/B)]^2``
    (kept on CPU; device copies cached), ``key`` hashable identity of the table's construction.
    """

    def __init__(self, prefix: int, num_grid: int, block_size: int, table: torch.Tensor, key):
        self.prefix, self.num_grid, self.block_size = int(prefix), int(num_grid), int(block_size)
        self.table = table.to("cpu")
        self._key = key
        self._dev = {"cpu": self.table}

    def warm(self, device) -> "RadialBlockTableRule":
        """Create the device copy of the table now (before tracing); returns self."""
        self._table(torch.device(device))
        return self

    def _table(self, device):
        hit = self._dev.get(str(device))
        if hit is None:
            hit = self.table.to(device)
            if not torch.compiler.is_compiling():
                self._dev[str(device)] = hit
        return hit

    def __call__(self, h, q_idx, k_idx):
        """Bool tensor of the broadcast shape of ``q_idx``/``k_idx`` (original token indices)."""
        gq, q_in = grid_position(q_idx, self.prefix, self.num_grid)
        gk, k_in = grid_position(k_idx, self.prefix, self.num_grid)
        allowed = self._table(q_idx.device)[gq // self.block_size, gk // self.block_size]
        return (q_in & k_in & allowed) | ~q_in | ~k_in

    def cache_key(self):
        return ("RadialBlockTableRule", self.prefix, self.num_grid, self.block_size, self._key)


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
        gq, q_in = grid_position(q_idx, self.prefix, T * tpf)
        gk, k_in = grid_position(k_idx, self.prefix, T * tpf)
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
            masking work, so the fastest on GPU); ``"authors"``: the authors' block mask exactly
            (build it with :meth:`from_authors`). ``mask()`` always equals what the plan runs.
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
        if self.granularity not in ("token", "block", "authors"):
            raise ValueError(f"granularity must be 'token', 'block' or 'authors', got {self.granularity!r}")
        if self.granularity == "authors":
            if self.sink_frames not in (0, 1) or self.dense_near_frames != 1:
                raise ValueError("granularity='authors' follows the authors' code: sink_frames must be 1 (Wan) or 0 "
                                 f"(HunyuanVideo) and dense_near_frames 1, got sink_frames={self.sink_frames}, "
                                 f"dense_near_frames={self.dense_near_frames}; use Radial.from_authors(...)")

    @classmethod
    def from_authors(cls, model: str = "wan", decay_factor=None, block_size: int = 128) -> "Radial":
        """The authors' Radial Attention block mask (module docstring, "Authors-exact preset").

        Follows mit-han-lab/radial-attention ``radial_attn/attn_mask.py`` at commit
        ``72788d4f0a6d202f1ec5f1c98a6e4c8b2e34fdbc`` (``gen_log_mask_shrinked``). Deliberate
        differences: (a) video token counts that are not a multiple of ``block_size`` (their kernels
        reject them) follow their mask function on the block-padded sequence (module docstring); (b) text tokens are
        dense both ways (their HunyuanVideo path additionally masks *padded* text keys through the
        prompt's attention mask, which is an input here, not a pattern); (c) the dense warm-up
        (``dense_timesteps`` / ``dense_layers``) is the pipeline schedule's job, as for every pattern.

        Args:
            model: ``"wan"`` (first-frame attention sink) or ``"hunyuan"`` (no sink).
            decay_factor: band decay; default their scripts' value (Wan 2.1 0.2, HunyuanVideo 0.95;
                their Wan 2.2 script uses 0.8).
            block_size: 128 (their Wan 2.1 / HunyuanVideo path) or 64 (their Wan 2.2 path); the
                frequency-reduction threshold stays 128 either way, as in their code.
        Returns:
            ``Radial(granularity="authors", ...)``; ``mask(layout)`` is ``[1, S, S]`` bool and equals
            ``plan(layout).token_mask()[0]``.
        """
        if model not in ("wan", "hunyuan"):
            raise ValueError(f"model must be 'wan' or 'hunyuan', got {model!r}")
        if decay_factor is None:
            decay_factor = 0.2 if model == "wan" else 0.95
        return cls(decay_factor=float(decay_factor), sink_frames=1 if model == "wan" else 0, dense_near_frames=1,
                   block_size=block_size, dense_text=True, granularity="authors")

    # ---------------------------------------------------------------- authors preset
    def authors_table(self, layout: TokenLayout) -> torch.Tensor:
        """BoolTensor ``[NVB, NVB]``: the authors' block mask over the video tokens of ``layout``
        (``granularity="authors"``), cached per grid."""
        self.validate(layout)
        T, H, W = layout.grid
        return self.cached_plan(("authors_table", T, H * W),
                                lambda: authors_block_mask(T, H * W, self.block_size, float(self.decay_factor),
                                                           "wan" if self.sink_frames == 1 else "hunyuan"))

    def _authors_rule(self, layout: TokenLayout) -> RadialBlockTableRule:
        T, H, W = layout.grid
        return RadialBlockTableRule(layout.prefix, layout.num_grid_tokens, self.block_size, self.authors_table(layout),
                                    key=(T, H * W, float(self.decay_factor), self.sink_frames))

    def _authors_plan(self, layout: TokenLayout, dev) -> BlockPlan:
        S, P, N, B = layout.seq_len, layout.prefix, layout.num_grid_tokens, self.block_size
        rule = self._authors_rule(layout).warm(dev)
        table = rule.table.to(dev)
        nvb = table.shape[0]
        perm = None
        off = P
        if P % B:
            # plan order [video, prefix, suffix], so that plan blocks coincide with the video blocks
            perm = torch.cat([torch.arange(P, P + N), torch.arange(P), torch.arange(P + N, S)]).to(dev)[None]
            off = 0
        nb = -(-S // B)
        start = torch.arange(nb, device=dev) * B
        size = torch.clamp(S - start, max=B)
        nv = (torch.minimum(start + size, torch.tensor(off + N, device=dev)) - torch.maximum(start, torch.tensor(off, device=dev))).clamp(min=0)
        vb = ((start - off).clamp(min=0) // B).clamp(max=nvb - 1)
        tab = table[vb[:, None], vb[None, :]]
        no_video = (nv[:, None] == 0) | (nv[None, :] == 0)
        allowed = tab | no_video
        all_video = (nv[:, None] == size[:, None]) & (nv[None, :] == size[None, :])
        cls_ = torch.where(allowed, FULL, torch.where(all_video, EMPTY, PARTIAL)).to(torch.int8)
        pairs = size[:, None] * size[None, :] - torch.where(allowed, 0, nv[:, None] * nv[None, :])
        density = float(pairs.double().sum()) / S ** 2
        meta = dict(pattern="radial", granularity="authors", model="wan" if self.sink_frames == 1 else "hunyuan",
                    decay_factor=float(self.decay_factor), block_size=B)
        return plan_from_block_mask(cls_[None, None], seq_len=S, block_q=B, block_k=B, rule=rule, perm=perm,
                                    token_density=density, meta=meta)

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
        if self.granularity == "authors":
            r = self._authors_rule(layout)
            idx = torch.arange(layout.seq_len)
            return r(torch.tensor(0), idx[:, None], idx[None, :])[None]
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

    def plan(self, layout: TokenLayout, q=None, k=None, v=None, *, scale=None, num_heads: int = 1,
             device=None) -> BlockPlan:
        """Block plan (Bp = Hp = 1, block ``block_size``), cached per (layout, device).

        Built once by evaluating the rule on the :meth:`candidate_blocks` only, in bounded chunks
        (static pattern: paid once per layout, shared by all heads, layers and steps)."""
        dev = torch.device(device) if device is not None else (q.device if q is not None else torch.device("cpu"))
        if self.granularity == "authors":
            self.validate(layout)
            return self.cached_plan((layout, str(dev)), lambda: self._authors_plan(layout, dev))
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
