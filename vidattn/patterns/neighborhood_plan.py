"""Analytic block classification of neighborhood plans: O(blocks), never S x S.

Per grid axis a neighborhood rule is a *window* per query coordinate: in dilation-group
positions (coordinate ``x`` is in group ``x % d`` at position ``x // d``) query position ``p``
attends keys of its own group at positions ``[lo(p), hi(p)]`` (see
:mod:`vidattn.patterns.neighborhood`). Within a group ``lo`` and ``hi`` never decrease with ``p``
and consecutive windows leave no gap (``lo(p + 1) <= hi(p) + 1``, as ``stride <= kernel_size``),
so for a query interval ``[p0, p1]`` and a key interval ``[b0, b1]`` of one group

* some pair is allowed  <=>  ``[lo(p0), hi(p1)]`` meets ``[b0, b1]``;
* every pair is allowed <=>  ``lo(p1) <= b0`` and ``hi(p0) >= b1``.

A (query, key) pair of grid tokens is allowed when every axis allows it, so for two *boxes*
(products of per-axis intervals) the pair of boxes is "any" / "full" when every axis is. Each
block of the plan (``block`` consecutive tokens in plan order) is cut into a few boxes (one per
block when blocks are tiles), key boxes are looked up per query box by a sorted search on axis 0,
and the per-box answers are reduced per block pair. Work and memory are proportional to the
number of listed block pairs times the boxes per block, plus ``O(S)`` per-token decoding.

Token order ("ordering coordinates" of the boxes): ``raw`` grid coordinates (row-major order,
``perm=None``) or ``regrouped`` ones (``offset(x % d) + x // d`` per axis, the order of
:meth:`Neighborhood.permutation`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..layout import TokenLayout
from ..plan import EMPTY, FULL, PARTIAL, BlockPlan

__all__ = ["axis_windows", "neighborhood_plan_analytic", "neighborhood_block_counts", "neighborhood_token_density"]

_PAIR_CHUNK = 1 << 21  # candidate box pairs evaluated at once (bounded memory)


def axis_windows(n: int, k: int, d: int, s: int, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Window of every coordinate of one axis, in dilation-group positions.

    Returns:
        ``(lo, hi)``: LongTensors ``[n]``; coordinate ``x`` attends the coordinates
        ``x % d + p * d`` for ``p`` in ``[lo[x], hi[x]]`` (inclusive).
    """
    x = torch.arange(n)
    g, p = x % d, x // d
    n_g = (n - g + d - 1) // d
    first = (p // s) * s
    if causal:
        leader = torch.minimum(first + s - 1, n_g - 1)
        lo = torch.clamp(leader - k + 1, min=0)
        hi = p
    else:
        leader = torch.minimum(first + s // 2, n_g - 1)
        lo = torch.minimum(torch.clamp(leader - k // 2, min=0), n_g - k)
        hi = lo + k - 1
    return lo, hi


def neighborhood_token_density(layout: TokenLayout, kernel_size, dilation, stride, is_causal,
                               dense_nongrid: bool = True) -> float:
    """Fraction of the ``S * S`` (query, key) pairs a neighborhood rule allows (exact, O(grid axes))."""
    grid_pairs = 1
    for a, n in enumerate(layout.grid):
        lo, hi = axis_windows(n, kernel_size[a], dilation[a], stride[a], is_causal[a])
        grid_pairs *= int((hi - lo + 1).sum())
    S, N = layout.seq_len, layout.num_grid_tokens
    E = S - N
    allowed = grid_pairs + (E * S + N * E if dense_nongrid else E * E)
    return allowed / (S * S)


def _ordering_coords(layout: TokenLayout, dilation, regrouped: bool) -> torch.Tensor:
    """LongTensor ``[N, ndim]``: ordering coordinate of each grid token (row-major index)."""
    c = layout.coords()
    if not regrouped:
        return c
    out = []
    for a, n in enumerate(layout.grid):
        d = dilation[a]
        sizes = torch.tensor([(n - g + d - 1) // d for g in range(d)])
        offsets = torch.cumsum(sizes, 0) - sizes
        out.append(offsets[c[:, a] % d] + c[:, a] // d)
    return torch.stack(out, -1)


def _boxes(block_of: torch.Tensor, coords: torch.Tensor):
    """Cut consecutive grid tokens (plan order) into boxes that stay inside one block.

    Args:
        block_of: LongTensor ``[M]`` block of each grid token, in plan order.
        coords: LongTensor ``[M, ndim]`` ordering coordinates.
    Returns:
        ``(blk [NB], lo [NB, ndim], hi [NB, ndim])``, each box the product of ``[lo, hi]``.
    """
    blk, lo, hi = block_of, coords, coords.clone()
    ndim = coords.shape[1]
    for a in reversed(range(ndim)):
        if blk.numel() <= 1:
            break
        same = blk[1:] == blk[:-1]
        for b in range(ndim):
            if b != a:
                same &= (lo[1:, b] == lo[:-1, b]) & (hi[1:, b] == hi[:-1, b])
        same &= lo[1:, a] == hi[:-1, a] + 1
        start = torch.cat([torch.ones(1, dtype=torch.bool), ~same])
        starts = start.nonzero().flatten()
        ends = torch.cat([starts[1:] - 1, torch.tensor([blk.numel() - 1])])
        new_hi = hi[starts].clone()
        new_hi[:, a] = hi[ends, a]
        blk, lo, hi = blk[starts], lo[starts], new_hi
    return blk, lo, hi


class _Axis:
    """Per-axis data: windows and the per-group parts of every box (in group positions)."""

    def __init__(self, n, k, d, s, causal, regrouped, lo, hi):
        self.d = d
        self.wlo, self.whi = axis_windows(n, k, d, s, causal)
        sizes = [(n - g + d - 1) // d for g in range(d)]
        p0, p1 = [], []
        off = 0
        for g in range(d):
            if regrouped:
                a0 = torch.clamp(lo, min=off) - off
                a1 = torch.clamp(hi, max=off + sizes[g] - 1) - off
            else:
                a0 = torch.div(lo - g + d - 1, d, rounding_mode="floor")
                a1 = torch.div(hi - g, d, rounding_mode="floor")
            p0.append(a0)
            p1.append(a1)
            off += sizes[g]
        self.p0 = torch.stack(p0, -1)  # [NB, d]
        self.p1 = torch.stack(p1, -1)
        self.nonempty = self.p0 <= self.p1
        gidx = torch.arange(d)
        x0 = (gidx + self.p0.clamp(min=0) * d).clamp(max=n - 1)  # raw coordinate of each part's ends
        x1 = (gidx + self.p1.clamp(min=0) * d).clamp(max=n - 1)
        self.lo_first, self.lo_last = self.wlo[x0], self.wlo[x1]
        self.hi_first, self.hi_last = self.whi[x0], self.whi[x1]
        self.groups = self.nonempty.sum(-1)
        # union window of a box on this axis, in ordering coordinates (for the candidate search)
        if regrouped:
            offs = torch.tensor([sum(sizes[:g]) for g in range(d)])
            w0, w1 = offs + self.lo_first, offs + self.hi_last
        else:
            w0, w1 = gidx + self.lo_first * d, gidx + self.hi_last * d
        big = torch.iinfo(torch.long).max
        self.union_lo = torch.where(self.nonempty, w0, big).min(-1).values
        self.union_hi = torch.where(self.nonempty, w1, -1).max(-1).values


def _pairs_from_ranges(start: torch.Tensor, count: torch.Tensor):
    """Flatten per-row ranges ``[start[i], start[i] + count[i])`` to ``(row, position)``."""
    rows = torch.repeat_interleave(torch.arange(count.numel()), count)
    first = torch.cumsum(count, 0) - count
    pos = start[rows] + (torch.arange(rows.numel()) - first[rows])
    return rows, pos


def _indices(qb: torch.Tensor, kb: torch.Tensor, nqb: int):
    """Ascending key-block lists per query block: int32 ``num [1, 1, NQB]``, ``idx [1, 1, NQB, width]``."""
    order = torch.argsort(qb * (int(kb.max()) + 1 if kb.numel() else 1) + kb)
    qb, kb = qb[order], kb[order]
    num = torch.bincount(qb, minlength=nqb)
    width = int(num.max()) if num.numel() and qb.numel() else 0
    first = torch.cumsum(num, 0) - num
    slot = torch.arange(qb.numel()) - first[qb]
    idx = torch.zeros(nqb, width, dtype=torch.long)
    idx[qb, slot] = kb
    return num.to(torch.int32)[None, None], idx.to(torch.int32)[None, None]


def _classify(rule, layout: TokenLayout, block_q: int, block_k: int, perm: Optional[torch.Tensor], regrouped: bool,
              q_blocks: Optional[torch.Tensor] = None):
    """Non-empty block pairs of the plan: ``(qb, kb, cls)`` LongTensors (cls PARTIAL or FULL), in
    no particular order. ``q_blocks``: LongTensor of query blocks to classify (None: all)."""
    S, N, P = layout.seq_len, layout.num_grid_tokens, layout.prefix
    nqb, nkb = -(-S // block_q), -(-S // block_k)
    order = torch.arange(S) if perm is None else perm.reshape(-1).cpu().long()
    pos = torch.arange(S)
    is_grid = (order >= P) & (order < P + N)
    grid_pos = pos[is_grid]
    coords = _ordering_coords(layout, rule.dilation, regrouped)[order[is_grid] - P]
    k, d, s, c = rule.kernel_size, rule.dilation, rule.stride, rule.is_causal
    ndim = layout.ndim

    def sides(block):
        blk, lo, hi = _boxes(grid_pos // block, coords)
        axes = [_Axis(layout.grid[a], k[a], d[a], s[a], c[a], regrouped, lo[:, a], hi[:, a]) for a in range(ndim)]
        nbox = torch.bincount(blk, minlength=-(-S // block))
        ng = torch.bincount(grid_pos // block, minlength=-(-S // block))
        ne = torch.bincount(pos[~is_grid] // block, minlength=-(-S // block))
        return blk, lo, hi, axes, nbox, ng, ne

    qblk, qlo, qhi, qaxes, qnbox, qng, qne = sides(block_q)
    if block_k == block_q:
        kblk, klo, khi, kaxes, knbox, kng, kne = qblk, qlo, qhi, qaxes, qnbox, qng, qne
    else:
        kblk, klo, khi, kaxes, knbox, kng, kne = sides(block_k)
    # axis-0 windows of the query boxes combine with key boxes' axis-0 extent: candidate search
    ksort = torch.argsort(klo[:, 0], stable=True)
    klo0 = klo[ksort, 0].contiguous()
    ext = int((khi[:, 0] - klo[:, 0]).max()) if klo.numel() else 0
    a0 = torch.searchsorted(klo0, (qaxes[0].union_lo - ext).contiguous(), right=False)
    a1 = torch.searchsorted(klo0, qaxes[0].union_hi.contiguous(), right=True)
    count = torch.clamp(a1 - a0, min=0)
    if q_blocks is not None:
        count = torch.where(torch.isin(qblk, q_blocks), count, 0)
    keys, fulls = [], []
    csum = torch.cumsum(count, 0)
    q_start = 0
    while q_start < count.numel():  # chunks of query boxes holding at most _PAIR_CHUNK pairs
        base = int(csum[q_start - 1]) if q_start else 0
        q_end = int(torch.searchsorted(csum, torch.tensor(base + _PAIR_CHUNK), right=True))
        q_end = max(q_end, q_start + 1)
        rows, kpos = _pairs_from_ranges(a0[q_start:q_end], count[q_start:q_end])
        qi, kj = rows + q_start, ksort[kpos]
        full = torch.ones(qi.numel(), dtype=torch.bool)
        for a in range(ndim):  # keep the pairs some axis allows, axis by axis (fewer each time)
            ax_any, ax_full = _pair_axis(qaxes[a], kaxes[a], qi, kj)
            qi, kj, full = qi[ax_any], kj[ax_any], full[ax_any] & ax_full[ax_any]
        keys.append(qblk[qi] * nkb + kblk[kj])
        fulls.append(full)
        q_start = q_end
    key = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long)
    full = torch.cat(fulls) if fulls else torch.zeros(0, dtype=torch.bool)
    uk, inv = torch.unique(key, return_inverse=True)
    full_cnt = torch.zeros(uk.numel(), dtype=torch.long).index_add_(0, inv, full.long())
    uq, ukb = uk // nkb, uk % nkb
    full_gg = full_cnt == qnbox[uq] * knbox[ukb]
    # block pairs that involve non-grid tokens (prefix / suffix), O(blocks) of them
    eq_blocks, ek_blocks = (qne > 0).nonzero().flatten(), (kne > 0).nonzero().flatten()
    if rule.dense_nongrid:
        extra = [eq_blocks[:, None] * nkb + torch.arange(nkb)[None], torch.arange(nqb)[:, None] * nkb + ek_blocks[None]]
    else:
        extra = [eq_blocks[:, None] * nkb + ek_blocks[None]]
    extra = torch.cat([e.reshape(-1) for e in extra])
    if q_blocks is not None:
        extra = extra[torch.isin(extra // nkb, q_blocks)]
    allk = torch.cat([uk, extra])
    allany = torch.cat([torch.ones(uk.numel(), dtype=torch.bool), torch.zeros(extra.numel(), dtype=torch.bool)])
    allfull = torch.cat([full_gg, torch.zeros(extra.numel(), dtype=torch.bool)])
    uk2, inv2 = torch.unique(allk, return_inverse=True)
    any_gg = torch.zeros(uk2.numel(), dtype=torch.bool).index_put_((inv2,), allany, accumulate=True)
    full_gg = torch.zeros(uk2.numel(), dtype=torch.bool).index_put_((inv2,), allfull, accumulate=True)
    qb, kb = uk2 // nkb, uk2 % nkb
    has_gg = (qng[qb] > 0) & (kng[kb] > 0)
    if rule.dense_nongrid:
        ng_any = (qne[qb] > 0) | (kne[kb] > 0)
        ng_full_ok = torch.ones_like(ng_any)
    else:
        ng_any = (qne[qb] > 0) & (kne[kb] > 0)
        ng_full_ok = ~(((qng[qb] > 0) & (kne[kb] > 0)) | ((qne[qb] > 0) & (kng[kb] > 0)))
    any_blk = (has_gg & any_gg) | ng_any
    full_blk = (~has_gg | full_gg) & ng_full_ok & any_blk
    cls = torch.where(full_blk, FULL, torch.where(any_blk, PARTIAL, EMPTY))
    keep = cls != EMPTY
    return qb[keep], kb[keep], cls[keep]


def neighborhood_block_counts(rule, layout: TokenLayout, block: int, perm: Optional[torch.Tensor], regrouped: bool,
                              samples: int = 32) -> Tuple[float, float]:
    """Mean ``(listed, partial)`` key blocks per query block over ``samples`` evenly spaced query
    blocks (a cheap cost estimate used to choose the token order; see :func:`neighborhood_plan_analytic`)."""
    nqb = -(-layout.seq_len // block)
    picks = torch.linspace(0, nqb - 1, min(samples, nqb)).round().long().unique()
    qb, kb, cls = _classify(rule, layout, block, block, perm, regrouped, q_blocks=picks)
    return qb.numel() / picks.numel(), int((cls == PARTIAL).sum()) / picks.numel()


def neighborhood_plan_analytic(rule, layout: TokenLayout, block_q: int, block_k: int,
                               perm: Optional[torch.Tensor], regrouped: bool, device=None,
                               meta: Optional[dict] = None) -> BlockPlan:
    """Block plan of a :class:`~vidattn.patterns.neighborhood.NeighborhoodRule`, classified analytically.

    Args:
        rule: the NeighborhoodRule (its grid/prefix/suffix must be ``layout``'s).
        block_q, block_k: block sizes.
        perm: LongTensor ``[S]`` token order of the plan, or None (row-major order).
        regrouped: True when ``perm`` orders grid tokens by regrouped coordinates (tiles of
            :meth:`Neighborhood.permutation`): then consecutive tokens of a tile row differ by one
            regrouped coordinate. False for ``perm=None``. Either is *exact* for any ``perm``;
            the choice only decides how few boxes each block is cut into.
    Returns:
        BlockPlan (Bp = Hp = 1) equal to :func:`vidattn.plan.plan_from_rule` on the same order
        (same full / partial / skipped blocks, same density).
    """
    S = layout.seq_len
    nqb = -(-S // block_q)
    k, d, s, c = rule.kernel_size, rule.dilation, rule.stride, rule.is_causal
    qb, kb, cls = _classify(rule, layout, block_q, block_k, perm, regrouped)
    num_p, idx_p = _indices(qb[cls == PARTIAL], kb[cls == PARTIAL], nqb)
    num_f, idx_f = _indices(qb[cls == FULL], kb[cls == FULL], nqb)
    density = neighborhood_token_density(layout, k, d, s, c, rule.dense_nongrid)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out_perm = None if perm is None else perm.reshape(1, -1).to(dev)
    return BlockPlan(seq_len=S, block_q=block_q, block_k=block_k, kv_num_blocks=num_p.to(dev),
                     kv_indices=idx_p.to(dev), full_kv_num_blocks=num_f.to(dev), full_kv_indices=idx_f.to(dev),
                     rule=rule, perm=out_perm, token_density=float(density), meta=dict(meta or {}))


def _pair_axis(qax: _Axis, kax: _Axis, qi, kj):
    """Per-axis test with query-side windows from ``qax`` and key-side parts from ``kax``."""
    qne, kne = qax.nonempty[qi], kax.nonempty[kj]
    kp0, kp1 = kax.p0[kj], kax.p1[kj]
    any_ = (qne & kne & (qax.lo_first[qi] <= kp1) & (qax.hi_last[qi] >= kp0)).any(-1)
    one_k_group = (kax.groups[kj] == 1)[:, None]
    ok = kne & one_k_group & (qax.lo_last[qi] <= kp0) & (qax.hi_first[qi] >= kp1)
    full = (~qne | ok).all(-1)
    return any_, full
