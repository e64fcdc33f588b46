"""Fused Triton block-sparse flash attention (forward) executing a :class:`~vidattn.plan.BlockPlan`.

One program per (query block, batch x head). It runs an online softmax (base-2, fp32 accumulate)
over the plan's listed key blocks only:

* full blocks: no masking work beyond the ragged sequence tail;
* partial blocks: the token rule evaluated in-kernel. ``NeighborhoodRule`` is evaluated from
  per-position (dilation group, in-group coordinate) tables of the plan's token order (query-side
  window starts hoisted out of the key loop); any other rule uses a generic per-partial-block
  uint8 mask computed once per plan with the rule in torch (``P x block_q x block_k`` bytes, never
  ``S x S``);
* rectification (RectifiedSparse): ``kept_log_scale`` added to kept logits, pooled key-block
  columns merged into the same softmax after the block loop;
* token permutation (tile orders, per-head PermutedGrid orders): Q is read and O / LSE are written
  at the original token positions through the plan's permutation; K/V are gathered into plan order
  once per call, so key tiles stay contiguous for the tensor-descriptor loads.

Returns the output and (optionally) the natural-log LSE. Anything unsupported raises
``TritonUnsupported`` (a ``BackendUnsupported``) so the dispatcher falls back with one warning.
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

try:  # host-side tensor descriptors (TMA bulk copies on Hopper; emulated by the interpreter)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

from vidattn.attention import BackendUnsupported
from vidattn.patterns.neighborhood import NeighborhoodRule
from vidattn.plan import PARTIAL, BlockPlan

from .reference import expand_kv_heads, to_plan_order

__all__ = ["block_sparse_attention_triton", "TritonUnsupported", "neighborhood_tables", "partial_block_masks",
           "partial_mask_bytes"]

LOG2E = 1.4426950408889634
_stages_ok: dict = {}
last_launch: dict = {}  # diagnostics of the latest launch: "regs_spills" = (registers per thread, spills)


class TritonUnsupported(BackendUnsupported):
    """The Triton kernel cannot run this case (the dispatcher falls back)."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- per-plan tables
_tables: "weakref.WeakKeyDictionary[BlockPlan, dict]" = weakref.WeakKeyDictionary()


def _plan_cache(plan: BlockPlan) -> dict:
    c = _tables.get(plan)
    if c is None:
        c = {}
        _tables[plan] = c
    return c


def neighborhood_tables(plan: BlockPlan) -> torch.Tensor:
    """int32 ``[Hp, 7, S]``: for each plan position, (in_grid, group0, pos0, group1, pos1, group2,
    pos2) of its original token (dilation group ``x % d`` and in-group position ``x // d`` per axis;
    unused axes are 0)."""
    cache = _plan_cache(plan)
    if "na" not in cache:
        rule: NeighborhoodRule = plan.rule
        from vidattn.layout import TokenLayout

        layout = TokenLayout(rule.grid, rule.prefix, rule.suffix)
        S = plan.seq_len
        dev = plan.device
        perm = plan.perm if plan.perm is not None else torch.arange(S, device=dev)[None]
        in_grid, coords = layout.token_coords(perm.to(dev))
        rows = [in_grid.to(torch.int32)]
        for a in range(3):
            if a < len(coords):
                d = rule.dilation[a]
                rows += [(coords[a] % d).to(torch.int32), (coords[a] // d).to(torch.int32)]
            else:
                rows += [torch.zeros_like(rows[0]), torch.zeros_like(rows[0])]
        cache["na"] = torch.stack(rows, 1).contiguous()
    return cache["na"]


MASK_BUDGET_BYTES = int(os.environ.get("VIDATTN_MASK_BUDGET_BYTES", str(3 << 30)))


def partial_mask_bytes(plan: BlockPlan) -> int:
    """Bytes :func:`partial_block_masks` needs for ``plan`` (one byte per pair in partial blocks)."""
    return int(plan.kv_num_blocks.sum()) * plan.block_q * plan.block_k


def partial_block_masks(plan: BlockPlan):
    """The rule inside every listed partial block, computed once per plan with the rule in torch
    (key columns past the sequence end are 0).

    Returns:
        ``(masks, slot_start)``: uint8 ``[P, block_q, block_k]`` (P = all listed partial blocks,
        ordered by (batch, head, query block, slot)) and int64 ``[Bp, Hp, NQB]``, the index in
        ``masks`` of each query block's first partial block.
    """
    cache = _plan_cache(plan)
    if "masks" not in cache:
        S, bq, bk = plan.seq_len, plan.block_q, plan.block_k
        dev = plan.device
        num = plan.kv_num_blocks.long()
        slot_start = (torch.cumsum(num.flatten(), 0) - num.flatten()).view(num.shape)
        mp = plan.kv_indices.shape[-1]
        valid = torch.arange(mp, device=dev) < num[..., None]
        b_i, h_i, q_i, j_i = valid.nonzero(as_tuple=True)  # row-major == slot order
        k_i = plan.kv_indices.long()[b_i, h_i, q_i, j_i]
        P = b_i.numel()
        masks = torch.zeros(max(P, 1), bq, bk, dtype=torch.uint8, device=dev)
        perm = plan.perm.to(dev) if plan.perm is not None else torch.arange(S, device=dev)[None]
        kp = getattr(plan, "key_perm", plan.perm)  # keys may have their own order (kv_perm)
        kperm = kp.to(dev) if kp is not None else perm
        ar_q, ar_k = torch.arange(bq, device=dev), torch.arange(bk, device=dev)
        chunk = max(1, (1 << 24) // (bq * bk))
        for c0 in range(0, P, chunk):
            sl = slice(c0, min(P, c0 + chunk))
            hh = h_i[sl]
            ph = perm[hh if perm.shape[0] > 1 else torch.zeros_like(hh)]  # [c, S]
            qpos = (q_i[sl, None] * bq + ar_q).clamp(max=S - 1)
            kpos = (k_i[sl, None] * bk + ar_k).clamp(max=S - 1)
            qo = torch.gather(ph, 1, qpos)
            pk = kperm[hh if kperm.shape[0] > 1 else torch.zeros_like(hh)]
            ko = torch.gather(pk, 1, kpos)
            k_real = (k_i[sl, None] * bk + ar_k) < S  # columns past the sequence: 0, so the kernel needs no tail mask
            masks[sl] = (plan.rule(hh[:, None, None], qo[:, :, None], ko[:, None, :]) & k_real[:, None, :]).to(torch.uint8)
        cache["masks"] = (masks, slot_start.contiguous())
    return cache["masks"]


# ----------------------------------------------------------------------------- the kernel
@triton.jit
def _na_axis_ok(gq, aq, gk, bk, n, k, d, s, causal: tl.constexpr):
    # gq/aq: [M] query dilation group / in-group position; gk/bk: [N] same for keys
    n_g = (n - gq + d - 1) // d
    first = (aq // s) * s
    if causal:
        leader = tl.minimum(first + s - 1, n_g - 1)
        ok = (bk[None, :] <= aq[:, None]) & ((leader[:, None] - bk[None, :]) < k)
    else:
        leader = tl.minimum(first + s // 2, n_g - 1)
        start = tl.minimum(tl.maximum(leader - k // 2, 0), n_g - k)
        ok = (bk[None, :] >= start[:, None]) & (bk[None, :] < start[:, None] + k)
    return ok & (gq[:, None] == gk[None, :])


@triton.jit
def _load_kv(k_base, v_base, desc_k, desc_v, kv_row0, kv_col, col0, offs_n, offs_d, stride_ks, stride_vs, n_cols, D,
             TAIL: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """K^T tile ``[BLOCK_D, BLOCK_N]`` and V tile ``[BLOCK_N, BLOCK_D]`` of key columns ``col0 + offs_n``.
    With ``USE_TMA`` the tiles come through tensor descriptors (bulk copies; rows past the
    sequence are either zero-filled or finite neighbouring rows, masked out by the caller)."""
    if USE_TMA:
        kt = desc_k.load([kv_row0 + col0, kv_col]).T
        v = desc_v.load([kv_row0 + col0, kv_col])
    else:
        cols = col0 + offs_n
        kt_ptrs = k_base + offs_d[:, None] + cols[None, :] * stride_ks
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :]
        if TAIL:
            col_ok = cols < n_cols
            if EVEN_D:
                kt = tl.load(kt_ptrs, mask=col_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
            else:
                kt = tl.load(kt_ptrs, mask=col_ok[None, :] & (offs_d < D)[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=col_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        else:
            if EVEN_D:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=(offs_d < D)[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return kt, v


@triton.jit
def _attend_tile(acc, m_i, l_i, q, kt, v, col0, offs_n, n_cols, qk_scale, allowed, bias, MASKED: tl.constexpr,
                 TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr):
    """One key tile of the online softmax (base 2). ``m_i`` starts finite (-1e30), so a fully
    masked tile leaves the state unchanged without any NaN guard."""
    if FP32_DOT:
        qk = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, kt)
    if MASKED or TAIL or HAS_BIAS:
        qk = qk * qk_scale
        if HAS_BIAS:
            qk = qk + bias
        if TAIL:
            col_ok = (col0 + offs_n) < n_cols
            if MASKED:
                qk = tl.where(allowed & col_ok[None, :], qk, float("-inf"))
            else:
                qk = tl.where(col_ok[None, :], qk, float("-inf"))
        elif MASKED:
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if FP32_DOT:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _full_tile(acc, m_i, l_i, q, j, f_idx, KEPT, kept_row, no_bias, ones, k_base, v_base, desc_k, desc_v, kv_row0,
               kv_col, offs_n, offs_d, stride_ks, stride_vs, S, D, qk_scale, TAIL: tl.constexpr,
               HAS_KEPT: tl.constexpr, FP32_DOT: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr,
               SUB_N: tl.constexpr, PLAN_BK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key tile ``j`` of a query block's full-block list (``SUB_N`` tiles per listed plan block):
    no token rule; ``TAIL`` masks columns past the sequence (the ragged last block only)."""
    kb = tl.load(f_idx + j // SUB_N)
    col0 = kb * PLAN_BK + (j % SUB_N) * BLOCK_N
    bias = no_bias
    if HAS_KEPT:
        bias = no_bias + tl.load(KEPT + kept_row + kb) * 1.4426950408889634
    kt, v = _load_kv(k_base, v_base, desc_k, desc_v, kv_row0, kv_col, col0, offs_n, offs_d, stride_ks, stride_vs, S,
                     D, TAIL, EVEN_D, USE_TMA, BLOCK_N, BLOCK_D)
    return _attend_tile(acc, m_i, l_i, q, kt, v, col0, offs_n, S, qk_scale, ones, bias, False, TAIL, HAS_KEPT,
                        FP32_DOT)


@triton.jit
def _sparse_flash_fwd(
    Q, K, V, O, LSE, SCHED, DESC_K, DESC_V, ROW_B, ROW_H, COL_H, QPERM, qperm_h,
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX,
    NA_TAB, BITS, SLOT, KEPT, PK, PV, PW,
    S, H, HK_GROUP, qk_scale, NQT,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    fn_b, fn_h, fi_b, fi_h, fi_q,
    pn_b, pn_h, pi_b, pi_h, pi_q,
    na_h, slot_b, slot_h,
    kept_b, kept_h, kept_q,
    pk_b, pk_h, pk_s, pv_b, pv_h, pv_s, pw_b, pw_h, pw_q,
    NKB, D,
    n0, k0, d0, s0, n1, k1, d1, s1, n2, k2, d2, s2,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, DENSE_NONGRID: tl.constexpr,
    RULE: tl.constexpr, HAS_KEPT: tl.constexpr, HAS_POOLED: tl.constexpr, RETURN_LSE: tl.constexpr,
    FP32_DOT: tl.constexpr, EVEN_D: tl.constexpr, SCHEDULED: tl.constexpr, USE_TMA: tl.constexpr,
    RAGGED: tl.constexpr, Q_PERM: tl.constexpr,
    PLAN_BQ: tl.constexpr, PLAN_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (query tile of BLOCK_M rows, batch x head); a plan query block of PLAN_BQ rows
    # spans PLAN_BQ // BLOCK_M tiles and a plan key block PLAN_BK // BLOCK_N key tiles.
    SUB_M: tl.constexpr = PLAN_BQ // BLOCK_M
    SUB_N: tl.constexpr = PLAN_BK // BLOCK_N
    if SCHEDULED:  # heaviest programs first (a 1-D grid over a precomputed order)
        item = tl.load(SCHED + tl.program_id(0))
        qt = item % NQT
        bh = item // NQT
    else:
        qt = tl.program_id(0)
        bh = tl.program_id(1)
    qb = qt // SUB_M
    row0 = (qt % SUB_M) * BLOCK_M  # first row of this tile inside its plan query block
    b = bh // H
    h = bh % H
    hk = h // HK_GROUP
    rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < S
    # plan position -> original token of the query row: with a token permutation, Q is read and
    # O / LSE are written at the original positions (no gather of Q, no scatter of O outside)
    if Q_PERM:
        qtok = tl.load(QPERM + h * qperm_h + rows, mask=row_ok, other=0)
    else:
        qtok = rows
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + qtok[:, None] * stride_qs + offs_d[None, :]
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    kv_row0 = b * ROW_B + hk * ROW_H  # descriptor row of token 0 of this (batch, kv head)
    kv_col = hk * COL_H
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    no_bias = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ones = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)

    # ---- full blocks: no masking work. Full-block lists are sorted (launcher), so the ragged
    # last key block, if listed, comes last and runs in its own masked loop: no branch inside
    # the main loop (a conditional load would not be software-pipelined).
    nfb = tl.load(FULL_NUM + b * fn_b + h * fn_h + qb)
    f_idx = FULL_IDX + b * fi_b + h * fi_h + qb * fi_q
    nmain = nfb
    if RAGGED:
        last = tl.load(f_idx + tl.maximum(nfb - 1, 0))
        nmain = tl.where((nfb > 0) & (last == NKB - 1), nfb - 1, nfb)
    kept_row = b * kept_b + h * kept_h + qb * kept_q
    for j in range(0, nmain * SUB_N):
        acc, m_i, l_i = _full_tile(acc, m_i, l_i, q, j, f_idx, KEPT, kept_row, no_bias, ones, k_base, v_base,
                                   DESC_K, DESC_V, kv_row0, kv_col, offs_n, offs_d, stride_ks, stride_vs, S, D,
                                   qk_scale, False, HAS_KEPT, FP32_DOT, EVEN_D, USE_TMA, SUB_N, PLAN_BK, BLOCK_N,
                                   BLOCK_D)
    if RAGGED:
        for j in range(nmain * SUB_N, nfb * SUB_N):
            acc, m_i, l_i = _full_tile(acc, m_i, l_i, q, j, f_idx, KEPT, kept_row, no_bias, ones, k_base, v_base,
                                       DESC_K, DESC_V, kv_row0, kv_col, offs_n, offs_d, stride_ks, stride_vs, S, D,
                                       qk_scale, True, HAS_KEPT, FP32_DOT, EVEN_D, USE_TMA, SUB_N, PLAN_BK, BLOCK_N,
                                       BLOCK_D)

    # ---- partial blocks: the token rule in-kernel
    npart = tl.load(PART_NUM + b * pn_b + h * pn_h + qb) * SUB_N
    p_idx = PART_IDX + b * pi_b + h * pi_h + qb * pi_q
    if RULE == 1:
        # query-side neighborhood data (hoisted out of the key loop)
        qrow = tl.minimum(rows, S - 1)
        tq = NA_TAB + h * na_h + qrow
        q_in = tl.load(tq) != 0
        qg0 = tl.load(tq + S)
        qa0 = tl.load(tq + 2 * S)
        qg1 = tl.load(tq + 3 * S)
        qa1 = tl.load(tq + 4 * S)
        qg2 = tl.load(tq + 5 * S)
        qa2 = tl.load(tq + 6 * S)
    if RULE == 2:
        slot0 = tl.load(SLOT + b * slot_b + h * slot_h + qb).to(tl.int64)
        # only the row offsets live across the key loop; the [M, N] offsets are formed per tile
        # (a hoisted [M, N] int32 tensor held 64 registers per thread at 128 x 64 tiles)
        m_row_off = (row0 + tl.arange(0, BLOCK_M)) * PLAN_BK
    for j in range(0, npart):
        kb = tl.load(p_idx + j // SUB_N)
        col0 = kb * PLAN_BK + (j % SUB_N) * BLOCK_N
        cols = col0 + offs_n
        if RULE == 1:
            kcol = tl.minimum(cols, S - 1)
            tk = NA_TAB + h * na_h + kcol
            k_in = tl.load(tk) != 0
            ok = _na_axis_ok(qg0, qa0, tl.load(tk + S), tl.load(tk + 2 * S), n0, k0, d0, s0, C0)
            ok = ok & _na_axis_ok(qg1, qa1, tl.load(tk + 3 * S), tl.load(tk + 4 * S), n1, k1, d1, s1, C1)
            ok = ok & _na_axis_ok(qg2, qa2, tl.load(tk + 5 * S), tl.load(tk + 6 * S), n2, k2, d2, s2, C2)
            both = q_in[:, None] & k_in[None, :]
            ok = ok & both
            if DENSE_NONGRID:
                ok = ok | (~both)
            else:
                ok = ok | ((~q_in[:, None]) & (~k_in[None, :]))
        elif RULE == 2:
            m_off = (slot0 + j // SUB_N) * (PLAN_BQ * PLAN_BK) + (j % SUB_N) * BLOCK_N + m_row_off
            mptr = BITS + m_off[:, None] + offs_n[None, :]
            ok = tl.load(mptr) != 0
        else:
            ok = ones
        bias = no_bias
        if HAS_KEPT:
            bias = no_bias + tl.load(KEPT + kept_row + kb) * 1.4426950408889634
        kt, v = _load_kv(k_base, v_base, DESC_K, DESC_V, kv_row0, kv_col, col0, offs_n, offs_d, stride_ks,
                         stride_vs, S, D, True, EVEN_D, USE_TMA, BLOCK_N, BLOCK_D)
        # RULE 2 masks are 0 past the sequence end: no separate tail mask on the logits
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kt, v, col0, offs_n, S, qk_scale, ok, bias,
                                     True, RULE != 2, HAS_KEPT, FP32_DOT)

    # ---- pooled columns of rectification (one per key block, weight -inf = absent)
    if HAS_POOLED:
        for c0 in range(0, NKB, BLOCK_N):
            pc = c0 + offs_n
            pw = tl.load(PW + b * pw_b + h * pw_h + qb * pw_q + pc, mask=pc < NKB, other=float("-inf"))
            present = pw > float("-inf")
            kt, v = _load_kv(PK + b * pk_b + h * pk_h, PV + b * pv_b + h * pv_h, DESC_K, DESC_V, 0, 0, c0, offs_n,
                             offs_d, pk_s, pv_s, NKB, D, True, EVEN_D, False, BLOCK_N, BLOCK_D)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kt, v, c0, offs_n, NKB, qk_scale, ones & present[None, :],
                                         no_bias + tl.where(present, pw, 0.0)[None, :] * 1.4426950408889634,
                                         True, True, True, FP32_DOT)

    denom = tl.where(l_i > 0, l_i, 1.0)
    out = acc / denom[:, None]
    out = tl.where((l_i > 0)[:, None], out, 0.0)
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + qtok[:, None] * stride_os + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])
    if RETURN_LSE:
        lse = tl.where(l_i > 0, (m_i + tl.log2(denom)) / 1.4426950408889634, float("-inf"))
        tl.store(LSE + bh.to(tl.int64) * S + qtok, lse, mask=row_ok)


# ----------------------------------------------------------------------------- launcher
def _bh_strides(t: torch.Tensor):
    """Strides of a plan tensor ``[Bp, Hp, ...]`` broadcast over batch and heads (0 on size-1 dims)."""
    sb = 0 if t.shape[0] == 1 else t.stride(0)
    sh = 0 if t.shape[1] == 1 else t.stride(1)
    return sb, sh


def _check(q, k, v, plan):
    if q.shape[1] != plan.seq_len or k.shape[1] != plan.seq_len or v.shape[1] != plan.seq_len:
        raise ValueError(f"plan was built for {plan.seq_len} tokens but q/k/v have {q.shape[1]}/{k.shape[1]}/{v.shape[1]}")
    if q.device.type != "cuda" and not _interpreting():
        raise TritonUnsupported("triton backend needs a CUDA device (or TRITON_INTERPRET=1)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TritonUnsupported(f"dtype {q.dtype} not supported")
    if v.shape[-1] != q.shape[-1]:
        raise TritonUnsupported("value head dim must equal query head dim")
    D = q.shape[-1]
    if D > 256 or D < 1:
        raise TritonUnsupported(f"head dim {D} not supported (max 256)")
    for name, bs in (("block_q", plan.block_q), ("block_k", plan.block_k)):
        if bs < 16 or bs > 256 or bs & (bs - 1):
            raise TritonUnsupported(f"plan {name}={bs} must be a power of two in [16, 256]")
    if isinstance(plan.rule, NeighborhoodRule) and len(plan.rule.grid) > 3:
        raise TritonUnsupported("neighborhood rules of rank > 3")


def _env_int(name: str) -> Optional[int]:
    val = os.environ.get(name)
    return int(val) if val else None


def launch_config(plan: BlockPlan, head_dim: int, dtype: torch.dtype, rule_mode: int) -> dict:
    """Tile sizes and launch settings for one call.

    The kernel's query/key tiles (``BLOCK_M`` x ``BLOCK_N``) may be smaller than the plan's blocks
    (a 128-token plan block runs as two 64-token key tiles), which keeps more pipeline stages in
    shared memory. Defaults come from the H100 sweep in ``benchmarks/RESULTS.md``; environment
    overrides: ``VIDATTN_TRITON_BLOCK_M``, ``VIDATTN_TRITON_BLOCK_N``, ``VIDATTN_TRITON_WARPS``,
    ``VIDATTN_TRITON_STAGES``, ``VIDATTN_TRITON_SCHED`` (0 natural order, 1 heaviest query tiles
    first, 2 all heads of a query tile adjacent),
    ``VIDATTN_TRITON_TMA`` (0 disables tensor-descriptor loads).

    Returns:
        dict with ``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``stages`` (list to try in order),
        ``sched`` (int program-order mode, 0 = natural grid).
    """
    bd = max(16, triton.next_power_of_2(head_dim))
    bm = min(plan.block_q, 128)
    bn = min(plan.block_k, 64 if bd >= 128 else 128)
    if _interpreting():
        bm, bn = plan.block_q, plan.block_k  # fewer, larger steps under the interpreter
    bm = _env_int("VIDATTN_TRITON_BLOCK_M") or bm
    bn = _env_int("VIDATTN_TRITON_BLOCK_N") or bn
    bm, bn = min(bm, plan.block_q), min(bn, plan.block_k)
    # H100 sweep (d=128, bf16): full blocks only -> 128x64 tiles, 4 warps, 2 stages (~500 TFLOP/s);
    # partial blocks (token rule per element) -> 8 warps, 3 stages for 128-row tiles.
    masked = rule_mode != 0
    warps = 8 if (masked and bm * bd >= 128 * 128) else 4
    warps = _env_int("VIDATTN_TRITON_WARPS") or warps
    if _interpreting() or dtype == torch.float32:
        stages = [1]
    elif masked and bm >= 128:
        stages = [3, 2, 1]
    else:
        stages = [2, 1]
    forced = _env_int("VIDATTN_TRITON_STAGES")
    if forced and not _interpreting():
        stages = [forced] + [s for s in stages if s != forced]
    # program order: natural by default. Heaviest-first (1) was 1-2% faster on dense and random
    # block-sparse plans but 11% slower on Radial (block) plans, whose neighbouring query tiles share
    # key blocks in L2 (H200, interleaved A/B in benchmarks/RESULTS.md).
    sched = _env_int("VIDATTN_TRITON_SCHED") or 0
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, stages=stages, sched=sched)


def sorted_full_indices(plan: BlockPlan) -> torch.Tensor:
    """int32 ``[Bp, Hp, NQB, maxF]``: the plan's full key-block lists sorted ascending (listed
    entries first, padding after), so a ragged last key block is always the last listed one.
    Computed once per plan."""
    cache = _plan_cache(plan)
    if "full_sorted" not in cache:
        idx = plan.full_kv_indices.long()
        num = plan.full_kv_num_blocks.long()
        valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        big = torch.iinfo(torch.int32).max
        srt = torch.where(valid, idx, big).sort(dim=-1).values
        cache["full_sorted"] = torch.where(valid, srt, 0).to(torch.int32).contiguous()
    return cache["full_sorted"]


def _schedule(plan: BlockPlan, B: int, H: int, block_m: int, mode: int = 1) -> torch.Tensor:
    """int32 ``[B * H * NQT]``: program order (items ``bh * NQT + query tile``), cached per plan.
    ``mode`` 1: by descending key-tile count; 2: query-tile major, so all heads of a query tile
    run side by side (they share its per-block masks in L2)."""
    cache = _plan_cache(plan)
    key = ("sched", B, H, block_m, mode)
    if key not in cache:
        nqt = triton.cdiv(plan.seq_len, block_m)
        if mode == 2:
            order = torch.arange(B * H * nqt, device=plan.device).view(B * H, nqt).t().flatten()
        else:
            sub = plan.block_q // block_m
            work = (plan.full_kv_num_blocks + plan.kv_num_blocks).expand(B, H, -1)  # [B, H, NQB]
            work = work.repeat_interleave(sub, dim=2)[..., :nqt]
            order = torch.argsort(work.flatten(), descending=True, stable=True)
        cache[key] = order.to(torch.int32).contiguous()
    return cache[key]


def plan_perm_int32(plan: BlockPlan) -> Optional[torch.Tensor]:
    """int32 ``[Hp, S]`` copy of the plan's token permutation (plan position -> original token),
    or None for the identity; cached per plan."""
    if plan.perm is None:
        return None
    cache = _plan_cache(plan)
    if "perm32" not in cache:
        cache["perm32"] = plan.perm.to(device=plan.device, dtype=torch.int32).contiguous()
    return cache["perm32"]


def plan_launch_tables(plan: BlockPlan) -> dict:
    """Everything the launcher derives from a plan alone, computed once per plan (and budget) so
    a cached plan costs no host synchronisation or tensor conversion per call (CUDA-graph safe):
    int32 block lists (full lists sorted), the partial-block rule path (0 none, 1 in-kernel
    neighborhood, 2 precomputed per-block masks) and its tables.

    Raises:
        TritonUnsupported: the partial-block masks exceed ``MASK_BUDGET_BYTES`` and the rule has no
            in-kernel form.
    """
    cache = _plan_cache(plan)
    key = ("launch", MASK_BUDGET_BYTES)
    if key in cache:
        return cache[key]
    dev = plan.device
    fidx = sorted_full_indices(plan)
    pidx = plan.kv_indices.to(torch.int32)
    if fidx.shape[-1] == 0:
        fidx = torch.zeros(*fidx.shape[:-1], 1, dtype=torch.int32, device=dev)
    if pidx.shape[-1] == 0:
        pidx = torch.zeros(*pidx.shape[:-1], 1, dtype=torch.int32, device=dev)
    t = dict(fnum=plan.full_kv_num_blocks.to(torch.int32).contiguous(), fidx=fidx.contiguous(),
             pnum=plan.kv_num_blocks.to(torch.int32).contiguous(), pidx=pidx.contiguous(), rule_mode=0,
             na=torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=dev),
             slot=torch.zeros(1, 1, 1, dtype=torch.int64, device=dev),
             fdummy=torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=dev),  # absent rectification inputs
             na_args=[1, 1, 1, 1] * 3, causal=[False] * 3, dense_nongrid=True)
    t["bits"] = t["na"]
    if plan.has_partial and plan.rule is not None:
        need = partial_mask_bytes(plan)
        fits = need <= MASK_BUDGET_BYTES
        if isinstance(plan.rule, NeighborhoodRule) and not fits:
            t["rule_mode"] = 1
            t["na"] = neighborhood_tables(plan)
            r = plan.rule
            for a in range(len(r.grid)):
                t["na_args"][4 * a: 4 * a + 4] = [r.grid[a], r.kernel_size[a], r.dilation[a], r.stride[a]]
                t["causal"][a] = bool(r.is_causal[a])
            t["dense_nongrid"] = bool(r.dense_nongrid)
        elif fits:
            # precomputed per-block masks: one byte load per pair, the fastest partial-block path
            t["rule_mode"] = 2
            t["bits"], t["slot"] = partial_block_masks(plan)
        else:
            raise TritonUnsupported(f"partial-block masks need {need / 2**30:.1f} GiB "
                                    f"(> VIDATTN_MASK_BUDGET_BYTES) and {type(plan.rule).__name__} has no in-kernel form")
    cache[key] = t
    return t


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _tma_ok(device: torch.device) -> bool:
    if TensorDescriptor is None or os.environ.get("VIDATTN_TRITON_TMA", "1") == "0":
        return False
    if _interpreting():
        return True
    return device.type == "cuda" and _capability_major(device.index if device.index is not None
                                                       else torch.cuda.current_device()) >= 9


def kv_descriptor(t: torch.Tensor, strides_bhs, batch: int, kv_heads: int, seq_len: int, block_n: int):
    """A 2-D tensor descriptor over K or V for bulk tile loads, or None when the layout does not allow one.

    ``t`` holds ``[B, S, Hk, D]`` (or ``[B, Hk, S, D]``) with unit last stride; ``strides_bhs`` its
    (batch, head, token) strides. Two layouts map to rows of one 2-D view so that a tile of key
    tokens ``col0 .. col0 + block_n`` of (batch b, head h) is the box at
    ``(b * row_b + h * row_h + col0, h * col_h)``: token-major (``[B, S, Hk, D]``: rows are (b, s),
    heads are column offsets) and head-major (``[B, Hk, S, D]``: rows are (b, h, s)). In both,
    rows past a sequence's end belong to the next sequence of the same tensor (finite values the
    kernel masks out) or lie past the view and are zero-filled.

    Returns:
        ``(descriptor, row_b, row_h, col_h)`` or None.
    """
    sb, sh, ss = strides_bhs
    B, Hk, D = batch, kv_heads, t.shape[-1]
    es = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16 or (ss * es) % 16:
        return None
    if (sb == seq_len * ss or B == 1) and sh * (Hk - 1) + D <= ss:  # token-major
        row_b, row_h, col_h = seq_len, 0, sh
        rows, cols = B * seq_len, ss
    elif ss == D and (sh == seq_len * D or Hk == 1) and (sb == Hk * seq_len * D or B == 1):  # head-major
        row_b, row_h, col_h = Hk * seq_len, seq_len, 0
        rows, cols = B * Hk * seq_len, D
    else:
        return None
    desc = TensorDescriptor(t, shape=[rows, cols], strides=[ss, 1], block_shape=[block_n, D])
    return desc, row_b, row_h, col_h


def block_sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                                  scale: Optional[float] = None, return_lse: bool = False):
    """Run ``plan`` with the fused Triton kernel.

    Args:
        q: ``[B, S, H, D]``; k, v: ``[B, S, Hk, D]`` (Hk divides H); fp16/bf16 (fp32 accumulate)
            or fp32; D up to 256 (padded to a power of two in-kernel). q is read in place (any
            strides with a unit last stride); so are k, v when the plan has no token permutation
            (with one they are gathered into plan order once).
        plan: a BlockPlan on q's device (Bp in {1, B}, Hp in {1, H}); block sizes powers of two.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return float32 natural-log LSE ``[B, H, S]`` (original token order).
    Returns:
        ``[B, S, H, D]`` in q's dtype (and the LSE).
    Raises:
        TritonUnsupported: for cases the kernel does not handle (the dispatcher falls back).
    """
    _check(q, k, v, plan)
    B, S, H, D = q.shape
    Hk = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    if plan.device != q.device:
        plan = plan.to(q.device)
    dev = q.device
    # Q and O stay [B, S, H, D] in the original token order, read / written in place ((batch, head,
    # token) strides); with a token permutation the kernel maps its rows through the plan's perm
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=dev)
    q_bhs = lambda t: (t.stride(0), t.stride(2), t.stride(1))  # noqa: E731
    kperm = getattr(plan, "key_perm", plan.perm)  # keys may have their own order (kv_perm)
    if kperm is None:
        kh, vh = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
        kv_bhs = q_bhs
    else:
        # K/V are gathered into plan order once (head-major, contiguous) so key tiles stay
        # contiguous for the tensor-descriptor loads
        if kperm.shape[0] > 1 and Hk != H:
            k, v = (expand_kv_heads(t.transpose(1, 2), H).transpose(1, 2) for t in (k, v))
            Hk = H
        kh = to_plan_order(k.transpose(1, 2), kperm).contiguous()
        vh = to_plan_order(v.transpose(1, 2), kperm).contiguous()
        kv_bhs = lambda t: (t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    qperm = plan_perm_int32(plan)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=dev) if return_lse else out

    t = plan_launch_tables(plan)
    fnum, fidx, pnum, pidx = t["fnum"], t["fidx"], t["pnum"], t["pidx"]
    rule_mode, na, bits, slot = t["rule_mode"], t["na"], t["bits"], t["slot"]
    na_args, causal, dense_nongrid = t["na_args"], t["causal"], t["dense_nongrid"]
    rect = plan.rectification
    kept = rect.kept_log_scale.float().contiguous() if rect is not None and rect.kept_log_scale is not None else None
    pooled = rect is not None and rect.has_pooled
    if pooled:
        pk = rect.pooled_k.to(q.dtype).contiguous()
        pv = rect.pooled_v.to(q.dtype).contiguous()
        pw = rect.pooled_log_weight.float().contiguous()
    fdummy = t["fdummy"]
    kept_t = kept if kept is not None else fdummy
    pk_t = pk if pooled else q
    pv_t = pv if pooled else q
    pw_t = pw if pooled else fdummy

    BLOCK_D = max(16, triton.next_power_of_2(D))
    cfg = launch_config(plan, D, q.dtype, rule_mode)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    nqt = triton.cdiv(S, BM)
    use_tma = BLOCK_D == D and _tma_ok(dev) and q.dtype != torch.float32
    dk = dv = None
    if use_tma:
        dk = kv_descriptor(kh, kv_bhs(kh), B, Hk, S, BN)
        dv = kv_descriptor(vh, kv_bhs(vh), B, Hk, S, BN)
        use_tma = dk is not None and dv is not None and dk[1:] == dv[1:]
    if use_tma:
        desc_k, desc_v, (row_b, row_h, col_h) = dk[0], dv[0], dk[1:]
    else:
        desc_k, desc_v, row_b, row_h, col_h = kh, vh, 0, 0, 0
    if cfg["sched"]:
        sched = _schedule(plan, B, H, BM, cfg["sched"])
        grid = (sched.numel(),)
    else:
        sched = fnum
        grid = (nqt, B * H)
    fn_b, fn_h = _bh_strides(fnum)
    fi_b, fi_h = _bh_strides(fidx)
    pn_b, pn_h = _bh_strides(pnum)
    pi_b, pi_h = _bh_strides(pidx)
    na_h = 0 if na.shape[0] == 1 else na.stride(0)
    slot_b, slot_h = _bh_strides(slot)
    kept_b, kept_h = _bh_strides(kept_t)
    pk_b, pk_h = _bh_strides(pk_t) if pooled else (0, 0)
    pv_b, pv_h = _bh_strides(pv_t) if pooled else (0, 0)
    pw_b, pw_h = _bh_strides(pw_t)
    launch_args = (
        q, kh, vh, out, lse, sched, desc_k, desc_v, row_b, row_h, col_h,
        qperm if qperm is not None else fnum, 0 if qperm is None or qperm.shape[0] == 1 else qperm.stride(0),
        fnum, fidx, pnum, pidx,
        na, bits, slot, kept_t, pk_t, pv_t, pw_t,
        S, H, H // Hk, scale * LOG2E, nqt,
        *q_bhs(q), *kv_bhs(kh), *kv_bhs(vh), *q_bhs(out),
        fn_b, fn_h, fi_b, fi_h, fidx.stride(2),
        pn_b, pn_h, pi_b, pi_h, pidx.stride(2),
        na_h, slot_b, slot_h,
        kept_b, kept_h, kept_t.stride(2),
        pk_b, pk_h, pk_t.stride(2), pv_b, pv_h, pv_t.stride(2), pw_b, pw_h, pw_t.stride(2),
        plan.num_k_blocks, D,
        *na_args,
    )
    consts = dict(
        C0=causal[0], C1=causal[1], C2=causal[2], DENSE_NONGRID=dense_nongrid,
        RULE=rule_mode, HAS_KEPT=kept is not None, HAS_POOLED=pooled, RETURN_LSE=return_lse,
        # fp32 inputs: exact fp32 dots; the interpreter's bf16 dot is broken (triton 3.8), so upcast there
        FP32_DOT=q.dtype == torch.float32 or (_interpreting() and q.dtype == torch.bfloat16),
        EVEN_D=BLOCK_D == D, SCHEDULED=cfg["sched"] != 0, USE_TMA=use_tma,
        RAGGED=S % plan.block_k != 0, Q_PERM=qperm is not None, PLAN_BQ=plan.block_q, PLAN_BK=plan.block_k,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BLOCK_D, num_warps=cfg["num_warps"],
    )
    key = (BM, BN, BLOCK_D, q.dtype, rule_mode, pooled, use_tma, cfg["num_warps"], tuple(cfg["stages"]))
    last = None
    for stages in ([_stages_ok[key]] if key in _stages_ok else cfg["stages"]):
        try:
            compiled = _sparse_flash_fwd[grid](*launch_args, num_stages=stages, **consts)
            last_launch["regs_spills"] = (getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None))
            _stages_ok[key] = stages
            break
        except OutOfResources as e:
            last = e
        except CompilationError as e:  # e.g. an older Triton without a language feature used here
            raise TritonUnsupported(f"kernel does not compile with triton {triton.__version__}: "
                                    f"{str(e).splitlines()[0][:200]}") from e
    else:
        raise TritonUnsupported(f"kernel does not fit this GPU: {last}")
    return (out, lse) if return_lse else out
