"""Multi-dimensional neighborhood attention with NATTEN (0.21) semantics.

Per grid axis of size ``n`` with kernel ``k``, dilation ``d``, stride ``s`` and causal flag:

* **dilation** splits the axis into ``d`` interleaved groups (coordinate ``x`` is in group
  ``x % d`` at in-group position ``x // d``; group ``g`` has ``ceil((n - g) / d)`` positions).
  Queries only attend keys of their own group; everything below is in in-group positions.
* **stride** (Generalized Neighborhood Attention): queries are grouped in runs of ``s``; each
  run shares the window of its *leader* — the centre query ``(a // s) * s + s // 2`` (non-causal;
  the right one of the two centres for even ``s``) or the last query ``(a // s) * s + s - 1``
  (causal), clamped to the group's last position.
* **non-causal window**: ``start = clamp(leader - k // 2, 0, n_g - k)``; keys ``start .. start+k-1``.
  The window is shifted inward at borders, so every query sees exactly ``k`` keys per axis.
* **causal window**: keys ``b`` with ``b <= a`` (the query's own position) and ``leader - b < k``.

A (query, key) pair of grid tokens is allowed when every axis allows it. Non-grid (prefix /
suffix) tokens are dense both ways by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..layout import TokenLayout, tile_major_order
from ..plan import BlockPlan, TokenRule
from ..rules import NeighborhoodForm
from .base import StaticPattern
from .neighborhood_plan import neighborhood_block_counts, neighborhood_plan_analytic

NEIGHBORHOOD_BLOCK = 64

__all__ = ["Neighborhood", "NeighborhoodRule", "normalize_na_args", "auto_tile_shape", "rank_tile_shapes",
           "stride_aligned_tiles"]


def _as_tuple(name, value, ndim, kind=int, minimum=1):
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        value = (value,) * ndim
    if not isinstance(value, (tuple, list)) or len(value) != ndim:
        raise ValueError(f"{name} must be a {kind.__name__} or a tuple of {ndim} {kind.__name__}s "
                         f"(one per grid axis), got {value!r}")
    for v in value:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{name} entries must be ints, got {value!r}")
        if kind is bool and not isinstance(v, bool):
            raise TypeError(f"{name} entries must be bools, got {value!r}")
        if kind is int and v < minimum:
            raise ValueError(f"{name} entries must be >= {minimum}, got {value!r}")
    return tuple(value)


def normalize_na_args(ndim, kernel_size, dilation=1, stride=1, is_causal=False):
    """Broadcast and check neighborhood arguments for ``ndim`` axes.

    Returns ``(kernel_size, dilation, stride, is_causal)`` as tuples of length ``ndim``.
    Raises ``ValueError``/``TypeError`` naming the argument.
    """
    k = _as_tuple("kernel_size", kernel_size, ndim)
    d = _as_tuple("dilation", 1 if dilation is None else dilation, ndim)
    s = _as_tuple("stride", 1 if stride is None else stride, ndim)
    c = _as_tuple("is_causal", False if is_causal is None else is_causal, ndim, kind=bool)
    if any(si > ki for si, ki in zip(s, k)):
        raise ValueError(f"stride cannot be larger than kernel_size along any axis, got stride={s}, kernel_size={k}")
    return k, d, s, c


def check_na_against_grid(grid, kernel_size, dilation):
    """Raise ``ValueError`` when ``kernel_size * dilation > grid`` on some axis (as NATTEN)."""
    for g, k, d in zip(grid, kernel_size, dilation):
        if k * d > g:
            raise ValueError(f"kernel_size * dilation cannot be larger than the grid along any axis, got grid={tuple(grid)}, "
                             f"kernel_size={tuple(kernel_size)}, dilation={tuple(dilation)}")


@dataclass(frozen=True)
class NeighborhoodRule(NeighborhoodForm, TokenRule):
    """Token rule of :class:`Neighborhood` on a layout; its fields (grid, prefix, suffix,
    kernel_size, dilation, stride, is_causal, dense_nongrid) are those of its kernel form
    :class:`vidattn.rules.NeighborhoodForm`."""

    def cache_key(self):
        return ("NeighborhoodRule",) + tuple(self.__dict__.values())

    def kernel_form(self) -> NeighborhoodForm:
        """The in-kernel form: the rule itself (a :class:`vidattn.rules.NeighborhoodForm`)."""
        return self

    def axis_allowed(self, a: int, xq: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        """Per-axis rule on grid coordinates (integer tensors that broadcast)."""
        n, k, d, s = self.grid[a], self.kernel_size[a], self.dilation[a], self.stride[a]
        gq, gk = xq % d, xk % d
        aq, bk = xq // d, xk // d
        n_g = (n - gq + d - 1) // d
        group_start = (aq // s) * s
        if self.is_causal[a]:
            leader = torch.minimum(group_start + s - 1, n_g - 1)
            ok = (bk <= aq) & (leader - bk < k)
        else:
            leader = torch.minimum(group_start + s // 2, n_g - 1)
            start = torch.minimum(torch.clamp(leader - k // 2, min=0), n_g - k)
            ok = (bk >= start) & (bk < start + k)
        return ok & (gq == gk)

    def __call__(self, h, q_idx, k_idx):
        layout = TokenLayout(self.grid, self.prefix, self.suffix)
        q_in, qc = layout.token_coords(q_idx)
        k_in, kc = layout.token_coords(k_idx)
        ok = q_in & k_in
        for a in range(len(self.grid)):
            ok = ok & self.axis_allowed(a, qc[a], kc[a])
        if self.dense_nongrid:
            ok = ok | ~q_in | ~k_in
        else:
            ok = ok | (~q_in & ~k_in)
        return ok


def stride_aligned_tiles(grid, stride, block_size=None, min_block=16, max_block=256):
    """Tiles whose sides divide the stride on every axis (strided neighborhoods, GNA).

    All queries of such a tile share one stride group, hence one window, so with windows that
    start on tile boundaries (e.g. ``kernel_size = 3 * stride`` on grids the stride divides) every
    listed block is full. Sides are powers of two (kernel blocks are powers of two) and at most the
    axis. Returns a list of tuples: with ``block_size``, every such tile of exactly that many tokens;
    with None, the largest one if it has ``min_block .. max_block`` tokens; else ``[]``."""
    opts = []
    for g, s in zip(grid, stride):
        sides, t = [], 1
        while s % t == 0 and t <= g:
            sides.append(t)
            t *= 2
        opts.append(sides)
    if block_size is None:
        tile = tuple(o[-1] for o in opts)
        return [tile] if min_block <= math.prod(tile) <= max_block and any(t > 1 for t in tile) else []
    out = []

    def rec(a, tile, prod):
        if a == len(opts):
            if prod == block_size:
                out.append(tuple(tile))
            return
        for t in opts[a]:
            if prod * t <= block_size:
                rec(a + 1, tile + [t], prod * t)

    rec(0, [], 1)
    return out


def auto_tile_shape(grid, kernel_size, dilation, stride, block_size, is_causal=None):
    """Best tile by :func:`rank_tile_shapes`' cost model."""
    return rank_tile_shapes(grid, kernel_size, dilation, stride, block_size, is_causal)[0]


def rank_tile_shapes(grid, kernel_size, dilation, stride, block_size, is_causal=None, top=4):
    """Rank up to ``top`` tiles (prod = block_size, or the whole grid if smaller) minimising the key tokens a
    query tile visits: per axis ``min(tiles on the axis, 1 + ceil(left_halo / t) + ceil(right_halo / t)) * t``
    (halos from the kernel and stride, in dilation-grouped coordinates), multiplied over axes.
    Tile sides are powers of two or the whole axis."""
    ndim = len(grid)
    causal = is_causal or (False,) * ndim
    halos = []
    for k, s, c in zip(kernel_size, stride, causal):
        if c:
            halos.append((k - 1 + s - 1, 0))
        else:
            halos.append((k // 2 + s // 2, k - 1 - k // 2 + (s - 1 - s // 2)))
    options = []
    for g in grid:
        opts, t = set(), 1
        while t < g:
            opts.add(t)
            t *= 2
        opts.add(g)
        options.append(sorted(opts))
    target = min(block_size, math.prod(grid))
    scored = {}

    def rec(a, tile, prod):
        if a == ndim:
            if prod < target or prod > block_size:
                return
            cost = 1.0
            for g, t, (hl, hr) in zip(grid, tile, halos):
                cost *= min(math.ceil(g / t), 1 + math.ceil(hl / t) + math.ceil(hr / t)) * t
            cost *= prod / target  # oversize tiles leave blocks straddling tiles
            scored[tuple(tile)] = cost
            return
        for t in options[a]:
            if prod * t <= block_size:
                rec(a + 1, tile + [t], prod * t)

    rec(0, [], 1)
    if not scored:  # no exact fit: accept any tile below a block
        target = 1
        rec(0, [], 1)
    return sorted(scored, key=lambda t: (scored[t], t))[:top]


@dataclass(frozen=True)
class Neighborhood(StaticPattern):
    """Neighborhood attention over the token grid (NATTEN semantics, see module docstring).

    Args:
        kernel_size: int or per-axis tuple, >= 1 (NATTEN itself requires >= 2).
        dilation: int or per-axis tuple, >= 1.
        stride: int or per-axis tuple, 1 <= stride <= kernel_size.
        is_causal: bool or per-axis tuple.
        block_size: query/key block size of the plan (None: 64).
        tile_shape: token tiling used by the plan (None: :func:`auto_tile_shape`; ``False``:
            keep row-major order). Tiling changes speed only, never the result.
        dense_nongrid: prefix/suffix tokens attend and are attended by everything (default);
            if False they only attend each other.
    """

    kernel_size: object = 7
    dilation: object = 1
    stride: object = 1
    is_causal: object = False
    block_size: Optional[int] = None
    tile_shape: object = None
    dense_nongrid: bool = True

    def __post_init__(self):
        # early checks that do not need the layout's rank
        for name in ("kernel_size", "dilation", "stride"):
            v = getattr(self, name)
            vals = v if isinstance(v, (tuple, list)) else (v,)
            for x in vals:
                if isinstance(x, bool) or not isinstance(x, int):
                    raise TypeError(f"{name} must be an int or a tuple of ints, got {v!r}")
                if x < 1:
                    raise ValueError(f"{name} entries must be >= 1, got {v!r}")
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        c = self.is_causal
        for x in (c if isinstance(c, (tuple, list)) else (c,)):
            if not isinstance(x, bool):
                raise TypeError(f"is_causal must be a bool or a tuple of bools, got {c!r}")
        if isinstance(c, list):
            object.__setattr__(self, "is_causal", tuple(c))
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")

    def resolved(self, layout: TokenLayout):
        """Per-axis ``(kernel_size, dilation, stride, is_causal)`` for ``layout``, validated."""
        for name in ("kernel_size", "dilation", "stride", "is_causal"):
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != layout.ndim:
                raise ValueError(f"{name}={v} has {len(v)} axes but the layout grid {layout.grid} has {layout.ndim}")
        args = normalize_na_args(layout.ndim, self.kernel_size, self.dilation, self.stride, self.is_causal)
        check_na_against_grid(layout.grid, args[0], args[1])
        return args

    def validate(self, layout: TokenLayout) -> None:
        self.resolved(layout)

    def rule(self, layout: TokenLayout) -> NeighborhoodRule:
        """The token rule on ``layout``."""
        k, d, s, c = self.resolved(layout)
        return NeighborhoodRule(layout.grid, layout.prefix, layout.suffix, k, d, s, c, self.dense_nongrid)

    def mask(self, layout: TokenLayout, num_heads: int = 1) -> torch.Tensor:
        """BoolTensor ``[1, S, S]``; True where the query may attend the key."""
        rule = self.rule(layout)
        idx = torch.arange(layout.seq_len)
        return rule(torch.tensor(0), idx[:, None], idx[None, :])[None]

    def permutation(self, layout: TokenLayout, block_size: int, device=None, tile=None) -> Optional[torch.Tensor]:
        """Token order of the plan: dilation groups made contiguous per axis, then tiles.

        ``tile`` overrides ``self.tile_shape``; with neither, the candidate tiles of
        :func:`rank_tile_shapes` and the row-major order are compared by their sampled block
        density and the best is used. Returns LongTensor ``[S]`` or None (row-major order)."""
        k, d, s, c = self.resolved(layout)
        if tile is None:
            tile = self.tile_shape
        if tile is False:
            return None
        if tile is None:
            plan = self.plan(layout, device=device) if (self.block_size or NEIGHBORHOOD_BLOCK) == block_size else None
            if plan is None:
                plan = self._best_plan(layout, block_size, device, {})
            return plan.perm[0] if plan.perm is not None else None
        tile = _as_tuple("tile_shape", tile, layout.ndim)
        coords = layout.coords(device)
        # dilation grouping: x -> offset(x % d) + x // d
        regrouped = []
        for a in range(layout.ndim):
            n, da = layout.grid[a], d[a]
            x = coords[:, a]
            g = x % da
            sizes = torch.tensor([(n - gg + da - 1) // da for gg in range(da)], device=coords.device)
            offsets = torch.cumsum(sizes, 0) - sizes
            regrouped.append(offsets[g] + x // da)
        grid_perm = tile_major_order(torch.stack(regrouped, -1), layout.grid, tile)
        return layout.custom_permutation(grid_perm)

    def _candidate_orders(self, layout, block_size):
        """``[(tile or None, perm or None)]``: row-major order and the tiles of :func:`rank_tile_shapes`."""
        k, d, s, c = self.resolved(layout)
        tiles = rank_tile_shapes(layout.grid, k, d, s, block_size, c)
        return [(None, None)] + [(t, self.permutation(layout, block_size, tile=t)) for t in tiles]

    def _build(self, layout, block_size, perm, regrouped, device, meta):
        return neighborhood_plan_analytic(self.rule(layout), layout, block_size, block_size, perm, regrouped,
                                          device=device, meta=meta)

    def plan(self, layout: TokenLayout, q=None, k=None, v=None, *, scale=None, num_heads: int = 1,
             device=None) -> BlockPlan:
        """Block plan (cached per layout/device): tiled token order, full blocks where the
        whole block pair is inside the windows, partial blocks evaluated with the rule.

        Built analytically from per-axis windows (:mod:`vidattn.patterns.neighborhood_plan`):
        cost grows with the number of listed blocks, not with ``S * S`` (65,536 1-D tokens: ~0.1 s)."""
        dev = torch.device(device) if device is not None else (q.device if q is not None else torch.device("cpu"))
        # 64-token blocks: smaller query tiles shrink the window halo (H100 sweep, benchmarks/RESULTS.md:
        # Wan (9,15,27) 6.7 ms at 64 vs 7.9 ms at 128)
        bs = self.block_size or NEIGHBORHOOD_BLOCK
        rule = self.rule(layout)
        meta = dict(pattern="neighborhood", kernel_size=list(rule.kernel_size), dilation=list(rule.dilation),
                    stride=list(rule.stride))

        def build():
            if self.tile_shape is False:
                return self._build(layout, bs, None, False, dev, meta)
            if self.tile_shape is not None:
                perm = self.permutation(layout, bs, tile=self.tile_shape)
                return self._build(layout, bs, perm, True, dev, dict(meta, tile_shape=list(self.tile_shape)))
            return self._best_plan(layout, bs, dev, meta)

        return self.cached_plan((layout, str(dev), bs), build)

    def _best_plan(self, layout, bs, dev, meta):
        """Plan in the candidate order with the lowest estimated cost, ``(listed + partial / 2)``
        key tokens per query token (sampled query blocks; partial blocks also pay the mask), ties:
        the larger block (larger query tiles run full blocks at a higher rate), then the earlier
        candidate. Candidates: row-major order, the
        tiles of :func:`rank_tile_shapes`, and the stride-aligned tiles of
        :func:`stride_aligned_tiles` (GNA: with ``block_size=None`` the largest tile whose block is
        the tile size, and a 128-token one when that is smaller). Only the winner is built in full."""
        rule = self.rule(layout)
        k, d, s, c = self.resolved(layout)
        cands = [(bs, t, p) for t, p in self._candidate_orders(layout, bs)]
        seen = {t for _, t, _ in cands}
        tiles = stride_aligned_tiles(layout.grid, s, self.block_size)
        if self.block_size is None and tiles:  # also the 128-token stride-aligned tiles below the largest
            tiles += [t for t in stride_aligned_tiles(layout.grid, s, 128) if t not in tiles][:1]
        for t in tiles:
            if t not in seen:
                seen.add(t)
                cands.append((math.prod(t), t, self.permutation(layout, math.prod(t), tile=t)))
        best = 0
        if layout.seq_len > bs or len(cands) > 1:
            def cost(i):
                b, _, perm = cands[i]
                listed, partial = neighborhood_block_counts(rule, layout, b, perm, perm is not None)
                return ((listed + 0.5 * partial) * b, -b, i)

            best = min(range(len(cands)), key=cost)
        b, tile, perm = cands[best]
        return self._build(layout, b, perm, perm is not None, dev,
                           meta if tile is None else dict(meta, tile_shape=list(tile)))
