"""Backward of the fused Triton block-sparse flash attention (FlashAttention-2 structure).

Gradients ``dq, dk, dv`` of the plan the forward (:mod:`.sparse_flash_launch`) ran, from the saved
output ``O`` and natural-log ``LSE`` (the forward is never recomputed as a whole: each tile
re-forms its probabilities ``P = exp(scale * q.k - LSE)`` from the LSE):

1. preprocess kernel: ``delta_i = sum_d dO_i * O_i`` (minus ``dLSE_i`` when the LSE output has a
   gradient);
2. dk/dv kernel, one program per (key tile, batch x head): iterates the query blocks that list
   this key block, from the *transposed block plan* (for each key block, its full and partial
   query blocks and, for partial ones, the index of their per-block mask) built once from the
   forward's per-plan tables and cached per plan (:func:`transposed_tables`);
   ``dv += P^T dO``, ``dS = P * (dO V^T - delta)``, ``dk += scale * dS^T Q``;
3. dq kernel, one program per (query tile, batch x head), over the same key-block lists as the
   forward: ``dq += scale * dS K``.

Every program owns its output tile, so the result is bitwise deterministic (no atomics; an atomic
dq variant is not implemented). Token rules inside partial blocks are the forward's: the in-kernel
neighborhood rule (:class:`~.sparse_flash_kernel.RuleMode` NEIGHBORHOOD) or the per-block uint8
masks (BLOCK_MASKS), from the same cached tables. The kernels work in the plan's token order with
heads expanded (``[B, H, S, D]``): Q, K, V, O, dO are gathered into plan order once (per-head
permutations included), GQA/MQA key/value gradients are summed over each group of query heads
afterwards (memory ``O(B H S D)`` fp32 for dk/dv).

Fused rectification (RectifiedSparse ``method="joint"``): ``kept_log_scale`` is added to the
logits exactly as in the forward (no gradient for it: :func:`block_sparse_attention_backward`
reports it as not differentiated); the pooled key-block columns' gradients (their share of ``dq``,
and ``d pooled_k``, ``d pooled_v``, ``d pooled_log_weight``) are computed in torch from the same
LSE in ``O(B H S NKB D)`` (``1 / block_k`` of dense cost).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from vidattn.errors import TritonUnsupported
from vidattn.plan import BlockPlan
from vidattn.plan_order import expand_kv_heads, from_plan_order, to_plan_order

from .sparse_flash_kernel import LOG2E, _na_axis_ok, _nongrid_policy
from .sparse_flash_io import interpreting, plan_bh_strides, prepare_call
from .sparse_flash_tables import _plan_cache, plan_launch_tables

__all__ = ["block_sparse_attention_backward", "transposed_tables", "bwd_launch_config"]

_stages_ok: dict = {}


# ----------------------------------------------------------------------------- transposed plan
def _transpose_lists(num: torch.Tensor, idx: torch.Tensor, nkb: int, mask_index: bool):
    """For block lists ``num [Bp, Hp, NQB]`` / ``idx [Bp, Hp, NQB, M]`` (key blocks per query
    block), the transposed lists: int32 ``tnum [Bp, Hp, NKB]``, int32 ``tidx [Bp, Hp, NKB, T]``
    (query blocks per key block, ascending) and, with ``mask_index``, int64 ``tmask`` of the same
    shape: the position of each (query block, slot) entry in row-major slot order (the index of
    its per-block mask in :func:`partial_block_masks`)."""
    bp, hp, nqb = num.shape
    dev = num.device
    m = idx.shape[-1]
    valid = torch.arange(m, device=dev) < num.long()[..., None]
    b_i, h_i, q_i, j_i = valid.nonzero(as_tuple=True)  # row-major: the masks' order
    k_i = idx.long()[b_i, h_i, q_i, j_i]
    n = b_i.numel()
    order_key = ((b_i * hp + h_i) * nkb + k_i) * nqb + q_i
    order = torch.argsort(order_key)
    grp = ((b_i * hp + h_i) * nkb + k_i)[order]
    counts = torch.bincount(grp, minlength=bp * hp * nkb)
    t = max(1, int(counts.max()) if n else 1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n, device=dev) - starts[grp]
    tidx = torch.zeros(bp * hp * nkb, t, dtype=torch.int32, device=dev)
    tidx[grp, pos] = q_i[order].to(torch.int32)
    out = [counts.view(bp, hp, nkb).to(torch.int32).contiguous(), tidx.view(bp, hp, nkb, t).contiguous()]
    if mask_index:
        tm = torch.zeros(bp * hp * nkb, t, dtype=torch.int64, device=dev)
        tm[grp, pos] = order.to(torch.int64)  # order[i] = row-major index of the i-th sorted entry
        out.append(tm.view(bp, hp, nkb, t).contiguous())
    return out


def transposed_tables(plan: BlockPlan) -> dict:
    """The transposed block plan of ``plan`` for the dk/dv kernel, computed once and cached per
    plan next to the forward's tables: ``tfnum, tfidx`` (full) and ``tpnum, tpidx, tpmask``
    (partial; ``tpmask`` int64 indexes the forward's per-block masks), shapes
    ``[Bp, Hp, NKB]`` / ``[Bp, Hp, NKB, T]``."""
    cache = _plan_cache(plan)
    if "bwd_transposed" not in cache:
        nkb = plan.num_k_blocks
        tfnum, tfidx = _transpose_lists(plan.full_kv_num_blocks, plan.full_kv_indices, nkb, False)
        tpnum, tpidx, tpmask = _transpose_lists(plan.kv_num_blocks, plan.kv_indices, nkb, True)
        cache["bwd_transposed"] = dict(tfnum=tfnum, tfidx=tfidx, tpnum=tpnum, tpidx=tpidx, tpmask=tpmask)
    return cache["bwd_transposed"]


# ----------------------------------------------------------------------------- device code
@triton.jit
def _load_rows(X, base, idx, idx_ok, D, BLOCK_D: tl.constexpr):
    """Rows ``idx`` ``[n]`` of the ``[S, D]`` matrix at ``X + base`` as an ``[n, BLOCK_D]`` tile (0
    outside ``idx_ok`` and past ``D``)."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(X + base + idx[:, None] * D + offs_d[None, :], mask=idx_ok[:, None] & (offs_d < D)[None, :],
                   other=0.0)


@triton.jit
def _store_rows(X, base, idx, idx_ok, val, D, BLOCK_D: tl.constexpr):
    """Store the ``[n, BLOCK_D]`` tile ``val`` into rows ``idx`` of the ``[S, D]`` matrix at ``X + base``."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(X + base + idx[:, None] * D + offs_d[None, :], val, mask=idx_ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA, S, D, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # O, DO: [BH, S, D] contiguous (plan order); DELTA, DLSE: [BH, S] fp32
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = bh.to(tl.int64) * S * D
    o = _load_rows(O, base, rows, rows < S, D, BLOCK_D).to(tl.float32)
    do = _load_rows(DO, base, rows, rows < S, D, BLOCK_D).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + bh.to(tl.int64) * S + rows, mask=rows < S, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * S + rows, delta, mask=rows < S)


@triton.jit
def _tile_rule(NA_TAB, na_h, h, rows, cols, S, BITS, midx, row_in_blk, col_in_blk, NA, CAUSAL: tl.constexpr,
               DENSE_NONGRID: tl.constexpr, RULE: tl.constexpr, PLAN_BQ: tl.constexpr, PLAN_BK: tl.constexpr):
    """The token rule on a ``[M, N]`` tile of plan positions ``rows`` x ``cols`` (partial blocks):
    the neighborhood rule (RULE 1; ``NA`` the 12 per-axis (size, kernel, dilation, stride) ints,
    ``CAUSAL`` the 3 per-axis flags), or (RULE 2) the ``[PLAN_BQ, PLAN_BK]`` uint8 mask number
    ``midx`` of ``BITS``."""
    if RULE == 1:
        tq = NA_TAB + h * na_h + tl.minimum(rows, S - 1)
        tk = NA_TAB + h * na_h + tl.minimum(cols, S - 1)
        q_in = tl.load(tq) != 0
        k_in = tl.load(tk) != 0
        ok = _na_axis_ok(tl.load(tq + S), tl.load(tq + 2 * S), tl.load(tk + S), tl.load(tk + 2 * S),
                         NA[0], NA[1], NA[2], NA[3], CAUSAL[0])
        ok = ok & _na_axis_ok(tl.load(tq + 3 * S), tl.load(tq + 4 * S), tl.load(tk + 3 * S), tl.load(tk + 4 * S),
                              NA[4], NA[5], NA[6], NA[7], CAUSAL[1])
        ok = ok & _na_axis_ok(tl.load(tq + 5 * S), tl.load(tq + 6 * S), tl.load(tk + 5 * S), tl.load(tk + 6 * S),
                              NA[8], NA[9], NA[10], NA[11], CAUSAL[2])
        ok = _nongrid_policy(ok, q_in, k_in, DENSE_NONGRID)
    else:  # RULE == 2: the precomputed mask of this (query block, key block)
        ptr = BITS + midx * (PLAN_BQ * PLAN_BK) + row_in_blk[:, None] * PLAN_BK + col_in_blk[None, :]
        ok = tl.load(ptr) != 0
    return ok


@triton.jit
def _owned_tile(H, S, BLOCK: tl.constexpr, PLAN_B: tl.constexpr):
    """The tile this program owns (``program_id`` = (tile, batch x head)): ``BLOCK`` plan positions,
    ``PLAN_B // BLOCK`` tiles to a plan block. Returns ``(b, h, blk, idx, in_blk, idx < S, row_base)``:
    batch, head, plan block, positions ``[BLOCK]``, their offsets inside the block, and the int64
    offset of this (batch, head)'s ``[S]`` row statistics (its ``[S, D]`` matrices start at ``row_base * D``)."""
    SUB: tl.constexpr = PLAN_B // BLOCK
    t = tl.program_id(0)
    bh = tl.program_id(1)
    idx = t * BLOCK + tl.arange(0, BLOCK)
    in_blk = (t % SUB) * BLOCK + tl.arange(0, BLOCK)
    return bh // H, bh % H, t // SUB, idx, in_blk, idx < S, bh.to(tl.int64) * S


@triton.jit
def _listed_tiles(NUM, IDX, b, h, blk, num_b, num_h, idx_b, idx_h, idx_blk, BLOCK: tl.constexpr,
                  PLAN_B: tl.constexpr):
    """``(number of tiles, pointer to the first entry)`` of block ``blk``'s list in ``NUM [Bp, Hp, NB]``
    / ``IDX [Bp, Hp, NB, M]`` (broadcast dims with stride 0); ``PLAN_B // BLOCK`` tiles per listed block."""
    return tl.load(NUM + b * num_b + h * num_h + blk) * (PLAN_B // BLOCK), IDX + b * idx_b + h * idx_h + blk * idx_blk


@triton.jit
def _listed_tile(lst, j, S, BLOCK: tl.constexpr, PLAN_B: tl.constexpr):
    """Tile ``j`` of the blocks listed at ``lst``. Returns ``(e, blk, in_blk, idx, idx < S)``: its list
    entry, plan block, offsets inside the block and positions ``[BLOCK]``."""
    SUB: tl.constexpr = PLAN_B // BLOCK
    e = j // SUB
    blk = tl.load(lst + e)
    in_blk = (j % SUB) * BLOCK + tl.arange(0, BLOCK)
    idx = blk * PLAN_B + in_blk
    return e, blk, in_blk, idx, idx < S


@triton.jit
def _load_query_side(Q, DO, LSE2, DELTA, row_base, rows, row_ok, D, BLOCK_D: tl.constexpr):
    """``q, do`` ``[M, BLOCK_D]`` and ``lse2, delta`` ``[M]`` of query rows ``rows`` of one (batch, head)."""
    q = _load_rows(Q, row_base * D, rows, row_ok, D, BLOCK_D)
    do = _load_rows(DO, row_base * D, rows, row_ok, D, BLOCK_D)
    lse2 = tl.load(LSE2 + row_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _kept_bias(zero, KEPT, b, h, qb, kb, kept_b, kept_h, kept_q, HAS_KEPT: tl.constexpr):
    """The logit bias (log2 units) of the (query block, key block) tile: RectifiedSparse's
    ``kept_log_scale`` with HAS_KEPT, else ``zero``."""
    bias = zero
    if HAS_KEPT:
        bias = zero + tl.load(KEPT + b * kept_b + h * kept_h + qb * kept_q + kb) * 1.4426950408889634
    return bias


@triton.jit
def _bwd_tile_grads(q, do, k, v, lse2, delta, qk_scale, bias, ok, FP32_DOT: tl.constexpr):
    """``P`` and ``dS`` ``[M, N]`` of one tile (``ok`` already holds rule / tail / padding)."""
    if FP32_DOT:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        dp = tl.dot(do.to(tl.float32), tl.trans(v.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
        dp = tl.dot(do, tl.trans(v))
    s = qk * qk_scale + bias
    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _sparse_flash_bwd_dkdv(
    Q, K, V, DO, LSE2, DELTA, DK, DV,
    TF_NUM, TF_IDX, TP_NUM, TP_IDX, TP_MASK, NA_TAB, BITS, KEPT,
    S, H, qk_scale, sm_scale, D,
    tfn_b, tfn_h, tfi_b, tfi_h, tfi_k, tpn_b, tpn_h, tpi_b, tpi_h, tpi_k, na_h, kept_b, kept_h, kept_q,
    NA, CAUSAL: tl.constexpr, DENSE_NONGRID: tl.constexpr, RULE: tl.constexpr, HAS_KEPT: tl.constexpr,
    FP32_DOT: tl.constexpr, PLAN_BQ: tl.constexpr, PLAN_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key tile (``BLOCK_N`` keys) over the query blocks listing its key block."""
    b, h, kb, cols, col_in_blk, col_ok, row_base = _owned_tile(H, S, BLOCK_N, PLAN_BK)
    k = _load_rows(K, row_base * D, cols, col_ok, D, BLOCK_D)
    v = _load_rows(V, row_base * D, cols, col_ok, D, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    true_mn = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
    for part in tl.static_range(2):
        if part == 0:
            nt, lst = _listed_tiles(TF_NUM, TF_IDX, b, h, kb, tfn_b, tfn_h, tfi_b, tfi_h, tfi_k, BLOCK_M, PLAN_BQ)
        else:
            nt, lst = _listed_tiles(TP_NUM, TP_IDX, b, h, kb, tpn_b, tpn_h, tpi_b, tpi_h, tpi_k, BLOCK_M, PLAN_BQ)
            mlst = TP_MASK + b * tpi_b + h * tpi_h + kb * tpi_k  # laid out as TP_IDX
        for j in range(0, nt):
            e, qb, row_in_blk, rows, row_ok = _listed_tile(lst, j, S, BLOCK_M, PLAN_BQ)
            q, do, lse2, delta = _load_query_side(Q, DO, LSE2, DELTA, row_base, rows, row_ok, D, BLOCK_D)
            ok = true_mn & row_ok[:, None]
            if part == 1:
                if RULE != 0:
                    ok = ok & _tile_rule(NA_TAB, na_h, h, rows, cols, S, BITS, tl.load(mlst + e), row_in_blk,
                                         col_in_blk, NA, CAUSAL, DENSE_NONGRID, RULE, PLAN_BQ, PLAN_BK)
            bias = _kept_bias(zero, KEPT, b, h, qb, kb, kept_b, kept_h, kept_q, HAS_KEPT)
            p, ds = _bwd_tile_grads(q, do, k, v, lse2, delta, qk_scale, bias, ok, FP32_DOT)
            if FP32_DOT:
                dv = tl.dot(tl.trans(p), do.to(tl.float32), dv, input_precision="ieee")
                dk = tl.dot(tl.trans(ds), q.to(tl.float32), dk, input_precision="ieee")
            else:
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk)
    _store_rows(DK, row_base * D, cols, col_ok, dk * sm_scale, D, BLOCK_D)
    _store_rows(DV, row_base * D, cols, col_ok, dv, D, BLOCK_D)


@triton.jit
def _sparse_flash_bwd_dq(
    Q, K, V, DO, LSE2, DELTA, DQ,
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, SLOT, NA_TAB, BITS, KEPT,
    S, H, qk_scale, sm_scale, D,
    fn_b, fn_h, fi_b, fi_h, fi_q, pn_b, pn_h, pi_b, pi_h, pi_q, slot_b, slot_h, na_h, kept_b, kept_h, kept_q,
    NA, CAUSAL: tl.constexpr, DENSE_NONGRID: tl.constexpr, RULE: tl.constexpr, HAS_KEPT: tl.constexpr,
    FP32_DOT: tl.constexpr, PLAN_BQ: tl.constexpr, PLAN_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query tile (``BLOCK_M`` rows) over the key blocks its query block lists (as the forward)."""
    b, h, qb, rows, row_in_blk, row_ok, row_base = _owned_tile(H, S, BLOCK_M, PLAN_BQ)
    q, do, lse2, delta = _load_query_side(Q, DO, LSE2, DELTA, row_base, rows, row_ok, D, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    true_mn = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
    slot0 = 0
    if RULE == 2:
        slot0 = tl.load(SLOT + b * slot_b + h * slot_h + qb).to(tl.int64)
    for part in tl.static_range(2):
        if part == 0:
            nt, lst = _listed_tiles(FULL_NUM, FULL_IDX, b, h, qb, fn_b, fn_h, fi_b, fi_h, fi_q, BLOCK_N, PLAN_BK)
        else:
            nt, lst = _listed_tiles(PART_NUM, PART_IDX, b, h, qb, pn_b, pn_h, pi_b, pi_h, pi_q, BLOCK_N, PLAN_BK)
        for j in range(0, nt):
            e, kb, col_in_blk, cols, col_ok = _listed_tile(lst, j, S, BLOCK_N, PLAN_BK)
            k = _load_rows(K, row_base * D, cols, col_ok, D, BLOCK_D)
            v = _load_rows(V, row_base * D, cols, col_ok, D, BLOCK_D)
            ok = true_mn & col_ok[None, :]
            if part == 1:
                if RULE != 0:
                    ok = ok & _tile_rule(NA_TAB, na_h, h, rows, cols, S, BITS, slot0 + e, row_in_blk, col_in_blk,
                                         NA, CAUSAL, DENSE_NONGRID, RULE, PLAN_BQ, PLAN_BK)
            bias = _kept_bias(zero, KEPT, b, h, qb, kb, kept_b, kept_h, kept_q, HAS_KEPT)
            p, ds = _bwd_tile_grads(q, do, k, v, lse2, delta, qk_scale, bias, ok, FP32_DOT)
            if FP32_DOT:
                dq = tl.dot(ds, k.to(tl.float32), dq, input_precision="ieee")
            else:
                dq = tl.dot(ds.to(k.dtype), k, dq)
    _store_rows(DQ, row_base * D, rows, row_ok, dq * sm_scale, D, BLOCK_D)


# ----------------------------------------------------------------------------- launcher
def bwd_launch_config(plan: BlockPlan, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the backward kernels: ``BLOCK_M`` x ``BLOCK_N`` no larger than the plan's
    blocks (64 x 64 on a GPU; the plan's blocks under the interpreter); env overrides
    ``VIDATTN_TRITON_BWD_BLOCK_M`` / ``_BLOCK_N`` / ``_WARPS``. Returns a dict with ``BLOCK_M``,
    ``BLOCK_N``, ``num_warps`` and ``stages`` (list to try in order)."""
    bd = max(16, triton.next_power_of_2(head_dim))
    if interpreting():
        bm, bn = plan.block_q, plan.block_k
    else:
        bm, bn = min(plan.block_q, 64), min(plan.block_k, 64 if bd >= 64 else 128)
    env = lambda n: int(os.environ[n]) if os.environ.get(n) else None  # noqa: E731
    bm = min(env("VIDATTN_TRITON_BWD_BLOCK_M") or bm, plan.block_q)
    bn = min(env("VIDATTN_TRITON_BWD_BLOCK_N") or bn, plan.block_k)
    warps = env("VIDATTN_TRITON_BWD_WARPS") or (8 if bd >= 128 else 4)
    stages = [1] if (interpreting() or dtype == torch.float32) else [2, 1]
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, stages=stages)


def _pooled_grads(qh, doh, delta, lse_p, rect, plan, B, H, scale):
    """Gradients through the pooled columns (torch, plan order). Returns ``(dq_add [B, H, S, D]
    fp32, dpk, dpv, dpw)`` with the shapes of the plan's ``pooled_k / pooled_v / pooled_log_weight``."""
    S = plan.seq_len
    pk = rect.pooled_k.float().expand(B, H, -1, -1)
    pv = rect.pooled_v.float().expand(B, H, -1, -1)
    pw = rect.pooled_log_weight.float().expand(B, H, -1, -1)  # [B, H, NQB, NKB]
    qb = torch.arange(S, device=qh.device) // plan.block_q
    s = scale * torch.einsum("bhsd,bhkd->bhsk", qh, pk) + pw[:, :, qb]
    lse = lse_p[..., None]
    p = torch.where(torch.isfinite(lse), torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)), 0.0)
    p = torch.where(torch.isfinite(s), p, 0.0)
    ds = p * (torch.einsum("bhsd,bhkd->bhsk", doh, pv) - delta[..., None])
    dq = scale * torch.einsum("bhsk,bhkd->bhsd", ds, pk)
    dpk = scale * torch.einsum("bhsk,bhsd->bhkd", ds, qh)
    dpv = torch.einsum("bhsk,bhsd->bhkd", p, doh)
    dpw = torch.zeros(B, H, plan.num_q_blocks, pw.shape[-1], dtype=torch.float32, device=qh.device)
    dpw.index_add_(2, qb, ds)

    def fit(g, like):  # sum over broadcast plan dims
        if like.shape[0] == 1 and B > 1:
            g = g.sum(0, keepdim=True)
        if like.shape[1] == 1 and H > 1:
            g = g.sum(1, keepdim=True)
        return g.to(like.dtype)

    return dq, fit(dpk, rect.pooled_k), fit(dpv, rect.pooled_v), fit(dpw, rect.pooled_log_weight)


def block_sparse_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                    lse: torch.Tensor, dout: torch.Tensor, plan: BlockPlan,
                                    scale: Optional[float] = None, dlse: Optional[torch.Tensor] = None,
                                    deterministic: bool = True):
    """Gradients of :func:`~.sparse_flash_launch.block_sparse_attention_triton` for ``plan``.

    Args:
        q: ``[B, S, H, D]``; k, v: ``[B, S, Hk, D]`` (Hk divides H); fp16/bf16/fp32 (the forward's inputs).
        out: ``[B, S, H, D]`` the forward's output; lse: float32 ``[B, H, S]`` its natural-log LSE
            (``-inf`` for rows with no allowed key); dout: ``[B, S, H, D]`` gradient of ``out``.
        plan: the plan the forward ran (no output epilogue: that is differentiated in torch).
        scale: softmax scale (default ``D ** -0.5``).
        dlse: optional float32 ``[B, H, S]`` gradient of the LSE output.
        deterministic: must be True (the kernels use no atomics; bitwise repeatable).
    Returns:
        ``(dq, dk, dv, dpooled)`` with dq/dk/dv in the inputs' shapes and dtypes, and ``dpooled``
        None or ``(d pooled_k, d pooled_v, d pooled_log_weight)`` in the plan's shapes.
    Raises:
        TritonUnsupported: a case the kernels do not run (as the forward).
    """
    if not deterministic:
        raise TritonUnsupported("the atomic (non-deterministic) dq variant is not implemented")
    plan, scale = prepare_call(q, k, v, plan, scale)
    B, S, H, D = q.shape
    Hk = k.shape[2]
    perm = plan.perm
    dt = q.dtype
    # plan order, heads expanded, head-major contiguous [B, H, S, D]
    qh = to_plan_order(q.transpose(1, 2), perm).contiguous()
    kh = to_plan_order(expand_kv_heads(k.transpose(1, 2), H), perm).to(dt).contiguous()
    vh = to_plan_order(expand_kv_heads(v.transpose(1, 2), H), perm).to(dt).contiguous()
    oh = to_plan_order(out.transpose(1, 2), perm).to(dt).contiguous()
    doh = to_plan_order(dout.transpose(1, 2), perm).to(dt).contiguous()
    lse_p = to_plan_order(lse.float()[..., None], perm)[..., 0].contiguous()
    lse2 = torch.where(torch.isfinite(lse_p), lse_p * LOG2E, torch.full_like(lse_p, float("inf"))).contiguous()
    dlse_p = None if dlse is None else to_plan_order(dlse.float()[..., None], perm)[..., 0].contiguous()

    BLOCK_D = max(16, triton.next_power_of_2(D))
    cfg = bwd_launch_config(plan, D, dt)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    delta = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    _bwd_preprocess[(triton.cdiv(S, 64), B * H)](oh, doh, dlse_p if dlse_p is not None else delta, delta, S, D,
                                                 HAS_DLSE=dlse_p is not None, BLOCK_M=64, BLOCK_D=BLOCK_D)

    t = plan_launch_tables(plan)
    tt = transposed_tables(plan)
    rect = plan.rectification
    kept = rect.kept_log_scale.float().contiguous() if rect is not None and rect.kept_log_scale is not None else None
    kept_t = kept if kept is not None else t["fdummy"]
    kept_b, kept_h = plan_bh_strides(kept_t)
    na, bits = t["na"], t["bits"]
    na_h = 0 if na.shape[0] == 1 else na.stride(0)
    rule = dict(NA=tuple(t["na_args"]), CAUSAL=tuple(t["causal"]), DENSE_NONGRID=t["dense_nongrid"],
                RULE=int(t["rule_mode"]), HAS_KEPT=kept is not None,
                FP32_DOT=dt == torch.float32 or interpreting(),
                PLAN_BQ=plan.block_q, PLAN_BK=plan.block_k, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BLOCK_D)
    common = dict(S=S, H=H, qk_scale=scale * LOG2E, sm_scale=scale, D=D, na_h=na_h, kept_b=kept_b, kept_h=kept_h,
                  kept_q=kept_t.stride(2))
    dqh = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
    dkh = torch.empty_like(dqh)
    dvh = torch.empty_like(dqh)
    (tfn_b, tfn_h), (tfi_b, tfi_h), (tpn_b, tpn_h), (tpi_b, tpi_h) = (
        plan_bh_strides(x) for x in (tt["tfnum"], tt["tfidx"], tt["tpnum"], tt["tpidx"]))
    dkdv_args = dict(Q=qh, K=kh, V=vh, DO=doh, LSE2=lse2, DELTA=delta, DK=dkh, DV=dvh,
                     TF_NUM=tt["tfnum"], TF_IDX=tt["tfidx"], TP_NUM=tt["tpnum"], TP_IDX=tt["tpidx"],
                     TP_MASK=tt["tpmask"], NA_TAB=na, BITS=bits, KEPT=kept_t,
                     tfn_b=tfn_b, tfn_h=tfn_h, tfi_b=tfi_b, tfi_h=tfi_h, tfi_k=tt["tfidx"].stride(2),
                     tpn_b=tpn_b, tpn_h=tpn_h, tpi_b=tpi_b, tpi_h=tpi_h, tpi_k=tt["tpidx"].stride(2),
                     **common, **rule)
    fnum, fidx, pnum, pidx, slot = t["fnum"], t["fidx"], t["pnum"], t["pidx"], t["slot"]
    (fn_b, fn_h), (fi_b, fi_h), (pn_b, pn_h), (pi_b, pi_h), (slot_b, slot_h) = (
        plan_bh_strides(x) for x in (fnum, fidx, pnum, pidx, slot))
    dq_args = dict(Q=qh, K=kh, V=vh, DO=doh, LSE2=lse2, DELTA=delta, DQ=dqh,
                   FULL_NUM=fnum, FULL_IDX=fidx, PART_NUM=pnum, PART_IDX=pidx, SLOT=slot, NA_TAB=na, BITS=bits,
                   KEPT=kept_t, fn_b=fn_b, fn_h=fn_h, fi_b=fi_b, fi_h=fi_h, fi_q=fidx.stride(2),
                   pn_b=pn_b, pn_h=pn_h, pi_b=pi_b, pi_h=pi_h, pi_q=pidx.stride(2), slot_b=slot_b, slot_h=slot_h,
                   **common, **rule)
    key = (BM, BN, BLOCK_D, dt, int(t["rule_mode"]), cfg["num_warps"])
    last = None
    for stages in ([_stages_ok[key]] if key in _stages_ok else cfg["stages"]):
        try:
            _sparse_flash_bwd_dkdv[(triton.cdiv(S, BN), B * H)](**dkdv_args, num_warps=cfg["num_warps"],
                                                                num_stages=stages)
            _sparse_flash_bwd_dq[(triton.cdiv(S, BM), B * H)](**dq_args, num_warps=cfg["num_warps"], num_stages=stages)
            _stages_ok[key] = stages
            break
        except OutOfResources as e:
            last = e
    else:
        raise TritonUnsupported(f"backward kernels do not fit this GPU: {last}")

    dpooled = None
    if rect is not None and rect.has_pooled:
        dq_add, dpk, dpv, dpw = _pooled_grads(qh.float(), doh.float(), delta, lse_p, rect, plan, B, H, scale)
        dqh = dqh + dq_add
        dpooled = (dpk, dpv, dpw)
    dq = from_plan_order(dqh, perm).transpose(1, 2).to(q.dtype)
    dk = from_plan_order(dkh, perm)
    dv = from_plan_order(dvh, perm)
    if Hk != H:
        dk = dk.view(B, Hk, H // Hk, S, D).sum(2)
        dv = dv.view(B, Hk, H // Hk, S, D).sum(2)
    return dq, dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype), dpooled
