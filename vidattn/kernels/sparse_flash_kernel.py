"""Device code of the fused Triton block-sparse flash attention (forward).

One program per (query tile, batch x head). It runs an online softmax (base-2, fp32 accumulate)
over the plan's listed key blocks only:

* full blocks: no masking work beyond the ragged sequence tail;
* partial blocks: the token rule evaluated in-kernel, selected by the ``RULE`` constexpr
  (:class:`RuleMode`): ``RULE_NEIGHBORHOOD`` evaluates a neighborhood rule from per-position
  (dilation group, in-group coordinate) tables (query-side window starts hoisted out of the key
  loop); ``RULE_BLOCK_MASKS`` reads a precomputed uint8 mask per partial block;
* rectification: ``kept_log_scale`` added to kept logits, pooled key-block columns merged into the
  same softmax after the block loop;
* token permutation: Q is read and O / LSE written at the original token positions through the
  plan's permutation; K/V arrive in plan order;
* quantised precisions (the same loops; the prologue is :mod:`.quant_fp8`), two independent
  switches:

  - ``QK8``: Q and K tiles are 8-bit with fp32 dequantisation scales, one per Q token (a row
    vector of logit scales: free, the logits are scaled anyway) and one per plan key block,
    folded into each tile's logit scale; ``QK_INT8`` selects int8 operands and an
    int8 x int8 -> int32 dot (converted to fp32; exact, |sum| < 2^24 for D <= 256), else e4m3
    (an e4m3 x e4m3 -> fp32 dot);
  - ``PV8``: V arrives transposed and quantised per channel (e4m3 ``[B, Hk, D, S_pad]``, tokens
    contiguous; with ``P8_ORDER`` within each 32-token group in the order of
    :data:`.quant_fp8.P8_KEY_DIMS`, and P's keys permuted the same way, the order its registers
    hold them in), P enters P.V as e4m3 ``p * 448``, and the epilogue divides by 448 and applies
    the V channel scales. Without it P.V runs in V's dtype (P cast to it), V read in place.

  ``precision="fp8"`` is QK8 (e4m3) + PV8, ``"int8"`` QK8 + QK_INT8, ``"int8_fp8"`` QK8 +
  QK_INT8 + PV8. ``EMU_CAST`` (the CPU interpreter only) rounds P on the e4m3 / bf16 grid before
  its cast, as the GPU's conversion does;
* ``WARP_SPEC``: Triton's automatic warp specialisation of the full-block loop (opt-in).

This module holds device code only: no plan, pattern or dispatcher import. The per-plan tables
are built by :mod:`.sparse_flash_tables`, the launch by :mod:`.sparse_flash_launch`.
"""

from __future__ import annotations

from enum import IntEnum

import triton
import triton.language as tl

from .quant_fp8 import P8_KEY_DIMS, _bf16_round, _quantize_rows, _round_e4m3

__all__ = ["RuleMode", "LOG2E", "_sparse_flash_fwd"]

LOG2E = 1.4426950408889634


class RuleMode(IntEnum):
    """How the kernel evaluates the token rule inside partial blocks (the ``RULE`` constexpr)."""

    NONE = 0  # no partial blocks (or no rule): every listed pair is allowed
    NEIGHBORHOOD = 1  # in-kernel neighborhood rule (a :class:`vidattn.rules.NeighborhoodForm`)
    BLOCK_MASKS = 2  # precomputed uint8 mask per listed partial block


# the same values as constexpr globals, readable inside @triton.jit code
RULE_NONE = tl.constexpr(int(RuleMode.NONE))
RULE_NEIGHBORHOOD = tl.constexpr(int(RuleMode.NEIGHBORHOOD))
RULE_BLOCK_MASKS = tl.constexpr(int(RuleMode.BLOCK_MASKS))


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
def _nongrid_policy(ok, q_in, k_in, DENSE_NONGRID: tl.constexpr):
    """Combine the grid-window test ``ok`` ``[M, N]`` with the non-grid (text) token policy:
    grid-grid pairs keep ``ok``; with ``DENSE_NONGRID`` every pair touching a non-grid token is
    allowed, else only non-grid-to-non-grid pairs are."""
    both = q_in[:, None] & k_in[None, :]
    ok = ok & both
    if DENSE_NONGRID:
        ok = ok | (~both)
    else:
        ok = ok | ((~q_in[:, None]) & (~k_in[None, :]))
    return ok


@triton.jit
def _load_kv(k_base, v_base, desc_k, desc_v, k_row0, k_col, v_row0, v_col, col0, offs_n, offs_d, stride_ks,
             stride_vs, n_cols, D, TAIL: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr,
             V_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """K^T tile ``[BLOCK_D, BLOCK_N]`` and V tile ``[BLOCK_N, BLOCK_D]`` of key columns ``col0 + offs_n``.
    With ``USE_TMA`` the tiles come through tensor descriptors (bulk copies; rows past the
    sequence are either zero-filled or finite neighbouring rows, masked out by the caller); the
    tile of K (V) is the box at descriptor row ``k_row0 + col0`` (``v_row0 + col0``), column
    ``k_col`` (``v_col``). With ``V_T`` V is stored transposed (``[D, S_pad]`` per head, tokens
    contiguous; ``stride_vs`` is then the stride of one channel row and ``v_row0`` the descriptor
    row of channel 0; tokens in :data:`.quant_fp8.P8_KEY_DIMS` order within 32-token groups): the 8-bit
    P.V's layout, whose operand has its reduction axis contiguous."""
    if USE_TMA:
        kt = desc_k.load([k_row0 + col0, k_col]).T
        if V_T:
            v = desc_v.load([v_row0, col0]).T
        else:
            v = desc_v.load([v_row0 + col0, v_col])
    else:
        cols = col0 + offs_n
        kt_ptrs = k_base + offs_d[:, None] + cols[None, :] * stride_ks
        if V_T:
            v_ptrs = v_base + cols[:, None] + offs_d[None, :] * stride_vs
        else:
            v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :]
        if TAIL:
            col_ok = cols < n_cols
            # V^T rows hold S_pad (= stride_vs) positions, tokens in P8_KEY_DIMS order: a position
            # past the sequence may hold a token inside it, so only the row's end masks
            v_ok = cols < stride_vs if V_T else col_ok
            if EVEN_D:
                kt = tl.load(kt_ptrs, mask=col_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=v_ok[:, None], other=0.0)
            else:
                kt = tl.load(kt_ptrs, mask=col_ok[None, :] & (offs_d < D)[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=v_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        else:
            if EVEN_D:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=(offs_d < D)[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return kt, v


@triton.jit
def _int32_to_f32(x, I2F_BITS: tl.constexpr):
    """int32 ``x`` (``|x| < 2**22``) as fp32: the conversion instruction, or with ``I2F_BITS``
    (:func:`.quant_fp8.int8_logits_by_bits`) an integer add into the mantissa of ``1.5 * 2**23``
    and a float subtract, exact in that range and off the slow conversion pipe."""
    if I2F_BITS:
        y = (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _scale_logits(qk, qk_scale, q_rows, ROWS: tl.constexpr):
    """``qk`` ``[M, N]`` times the scalar logit scale ``qk_scale`` and, with ``ROWS`` (the 8-bit
    Q.K^T, whose Q has one scale per token), each row's positive fp32 scale ``q_rows`` ``[M]``."""
    # (one return after an if / else: Triton's code generator still type-checks the statements
    # after a return inside a constexpr ``if``; a [M] x [M, N] product there failed to compile)
    if ROWS:
        scaled = (qk * qk_scale) * q_rows[:, None]
    else:
        scaled = qk * qk_scale
    return scaled


@triton.jit
def _scale_rows(x, qk_scale, q_rows, ROWS: tl.constexpr):
    """``x`` ``[M]`` times the logit scale (see :func:`_scale_logits`)."""
    if ROWS:
        scaled = (x * qk_scale) * q_rows
    else:
        scaled = x * qk_scale
    return scaled


@triton.jit
def _attend_tile(acc, m_i, l_i, q, kt, v, col0, offs_n, n_cols, qk_scale, q_rows, allowed, bias, MASKED: tl.constexpr,
                 TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, QK8: tl.constexpr,
                 QK_INT8: tl.constexpr, PV8: tl.constexpr, EMU_CAST: tl.constexpr, I2F_BITS: tl.constexpr = False,
                 P8_ORDER: tl.constexpr = False):
    """One key tile of the online softmax (base 2). ``m_i`` starts finite (-1e30), so a fully
    masked tile leaves the state unchanged without any NaN guard.

    ``qk_scale``: the scalar logit scale (softmax scale x log2(e), with ``QK8`` times this tile's K
    dequantisation scale). ``QK8``: q, kt are e4m3, or int8 with ``QK_INT8`` (an int32 dot), and
    ``q_rows`` ``[M]`` holds each row's Q dequantisation scale (else unused). It multiplies the
    logits as a factor of its own (one more multiply per logit): so Triton converts the
    loop-invariant vector to the MMA layout once, before the key loop. Its product with the scalar
    was converted in every tile: fp8 at 128 x 128 tiles spilled a 536-byte stack frame instead of
    16 bytes (``benchmarks/portable_build.py``; the H200 driver reported the same). ``PV8``: v is
    e4m3 and the numerators ``p`` in [0, 1] enter P.V as e4m3 ``p * 448`` (``P8_ORDER``: keys
    permuted into the S accumulator's register order, as V^T's tokens are; fp32 accumulate; the
    epilogue divides by 448 and applies the V channel scales); else P.V runs in v's dtype (``FP32_DOT``: in fp32). ``l_i``
    sums the fp32 ``p``. ``EMU_CAST`` (interpreter only): round ``p`` on the e4m3 grid (PV8) or,
    for a bf16 P.V of a QK8 tile, on the bf16 grid before the cast, as a GPU's conversion does."""
    if QK8:
        if QK_INT8:
            qk = _int32_to_f32(tl.dot(q, kt, out_dtype=tl.int32), I2F_BITS)
        else:
            qk = tl.dot(q, kt)
    elif FP32_DOT:
        qk = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, kt)
    if MASKED or TAIL or HAS_BIAS:
        qk = _scale_logits(qk, qk_scale, q_rows, QK8)
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
        # (scales > 0: the max of the scaled row is the scaled max)
        m_new = tl.maximum(m_i, _scale_rows(tl.max(qk, 1), qk_scale, q_rows, QK8))
        p = tl.exp2(_scale_logits(qk, qk_scale, q_rows, QK8) - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if PV8:
        p8 = p * 448.0
        if EMU_CAST:
            p8 = _round_e4m3(p8)
        p8 = p8.to(v.dtype)
        if P8_ORDER:  # keys in the S accumulator's register order, as V^T's tokens (P8_KEY_DIMS)
            p8 = tl.reshape(p8, [p8.shape[0], p8.shape[1] // 32, 2, 2, 2, 2, 2])
            p8 = tl.reshape(tl.permute(p8, P8_KEY_DIMS.value), [p8.shape[0], p8.shape[1] * 32])
        acc = tl.dot(p8, v, acc)
    elif FP32_DOT:
        if QK8 and EMU_CAST and v.dtype == tl.bfloat16:
            p = _bf16_round(p)
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _full_tile(acc, m_i, l_i, q, j, f_idx, KEPT, kept_row, KSC, ks_row, no_bias, ones, k_base, v_base, desc_k, desc_v,
               k_row0, k_col, v_row0, v_col, offs_n, offs_d, stride_ks, stride_vs, S, D, qk_scale, q_rows,
               TAIL: tl.constexpr,
               HAS_KEPT: tl.constexpr, FP32_DOT: tl.constexpr, QK8: tl.constexpr, QK_INT8: tl.constexpr,
               PV8: tl.constexpr, EMU_CAST: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr,
               SUB_N: tl.constexpr, PLAN_BK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               I2F_BITS: tl.constexpr, P8_ORDER: tl.constexpr):
    """Key tile ``j`` of a query block's full-block list (``SUB_N`` tiles per listed plan block):
    no token rule; ``TAIL`` masks columns past the sequence (the ragged last block only)."""
    kb = tl.load(f_idx + j // SUB_N)
    col0 = kb * PLAN_BK + (j % SUB_N) * BLOCK_N
    bias = no_bias
    if HAS_KEPT:
        bias = no_bias + tl.load(KEPT + kept_row + kb) * 1.4426950408889634
    tile_scale = qk_scale
    if QK8:  # this key block's K dequantisation scale
        tile_scale = qk_scale * tl.load(KSC + ks_row + kb)
    kt, v = _load_kv(k_base, v_base, desc_k, desc_v, k_row0, k_col, v_row0, v_col, col0, offs_n, offs_d, stride_ks,
                     stride_vs, S, D, TAIL, EVEN_D, USE_TMA, PV8, BLOCK_N, BLOCK_D)
    return _attend_tile(acc, m_i, l_i, q, kt, v, col0, offs_n, S, tile_scale, q_rows, ones, bias, False, TAIL, HAS_KEPT,
                        FP32_DOT, QK8, QK_INT8, PV8, EMU_CAST, I2F_BITS, P8_ORDER)


@triton.jit
def _sparse_flash_fwd(
    # ---- tensors: inputs / outputs (Q, O, LSE at original token positions; K, V in plan order)
    Q, K, V, O, LSE, SCHED, DESC_K, DESC_V, ROW_B, ROW_H, COL_H, VROW_B, VROW_H, VCOL_H, QPERM, qperm_h,
    # ---- plan tables: block lists, rule tables, rectification inputs
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX,
    NA_TAB, BITS, SLOT, KEPT, PK, PV, PW,
    # ---- dequantisation scales: Q per (b, h, token), K per (b, kv head, key block) (QK8),
    # V per (b, kv head, channel) (PV8)
    QSC, KSC, VSC, qs_b, qs_h, ks_b, ks_h, vs_b, vs_h,
    # ---- scalars
    S, H, HK_GROUP, qk_scale, NQT,
    # ---- strides of the inputs / outputs (batch, head, token)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    # ---- strides of the plan tables ([Bp, Hp, ...], 0 on broadcast dims)
    fn_b, fn_h, fi_b, fi_h, fi_q,
    pn_b, pn_h, pi_b, pi_h, pi_q,
    na_h, slot_b, slot_h,
    kept_b, kept_h, kept_q,
    pk_b, pk_h, pk_s, pv_b, pv_h, pv_s, pw_b, pw_h, pw_q,
    NKB, D,
    # ---- neighborhood rule parameters per axis: size, kernel, dilation, stride (RULE_NEIGHBORHOOD)
    n0, k0, d0, s0, n1, k1, d1, s1, n2, k2, d2, s2,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, DENSE_NONGRID: tl.constexpr,
    # ---- modes and tile sizes
    RULE: tl.constexpr, HAS_KEPT: tl.constexpr, HAS_POOLED: tl.constexpr, RETURN_LSE: tl.constexpr,
    FP32_DOT: tl.constexpr, EVEN_D: tl.constexpr, SCHEDULED: tl.constexpr, USE_TMA: tl.constexpr,
    RAGGED: tl.constexpr, Q_PERM: tl.constexpr, QK8: tl.constexpr, QK_INT8: tl.constexpr, PV8: tl.constexpr,
    EMU_CAST: tl.constexpr, WARP_SPEC: tl.constexpr, I2F_BITS: tl.constexpr, P8_ORDER: tl.constexpr,
    Q_QUANT: tl.constexpr, PLAN_BQ: tl.constexpr, PLAN_BK: tl.constexpr,
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
    # descriptor coordinates (USE_TMA): K's row of token 0 of this (batch, kv head) and its column;
    # V's the same, or with PV8 the row of channel 0 of this V^T head
    k_row0 = b * ROW_B + hk * ROW_H
    k_col = hk * COL_H
    v_row0 = b * VROW_B + hk * VROW_H
    v_col = hk * VCOL_H
    ks_row = b * ks_b + hk * ks_h
    q_rows = qk_scale  # (unused without QK8)
    if Q_QUANT:  # (QK8) Q arrives in 16 bits: quantised here per row (token), the prologue's arithmetic
        q, q_rows = _quantize_rows(q.to(tl.float32), QK_INT8, EMU_CAST)
    elif QK8:  # each row's (token's) Q dequantisation scale, a row vector
        q_rows = tl.load(QSC + b * qs_b + h * qs_h + qtok, mask=row_ok, other=1.0)
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
    # WARP_SPEC: Triton's automatic warp specialisation of the main loop (opt-in, Hopper+)
    for j in tl.range(0, nmain * SUB_N, warp_specialize=WARP_SPEC):
        acc, m_i, l_i = _full_tile(acc, m_i, l_i, q, j, f_idx, KEPT, kept_row, KSC, ks_row, no_bias, ones, k_base,
                                   v_base, DESC_K, DESC_V, k_row0, k_col, v_row0, v_col, offs_n, offs_d, stride_ks,
                                   stride_vs, S, D, qk_scale, q_rows, False, HAS_KEPT, FP32_DOT, QK8, QK_INT8, PV8,
                                   EMU_CAST, EVEN_D, USE_TMA, SUB_N, PLAN_BK, BLOCK_N, BLOCK_D, I2F_BITS, P8_ORDER)
    if RAGGED:
        for j in range(nmain * SUB_N, nfb * SUB_N):
            acc, m_i, l_i = _full_tile(acc, m_i, l_i, q, j, f_idx, KEPT, kept_row, KSC, ks_row, no_bias, ones,
                                       k_base, v_base, DESC_K, DESC_V, k_row0, k_col, v_row0, v_col, offs_n, offs_d,
                                       stride_ks, stride_vs, S, D, qk_scale, q_rows, True, HAS_KEPT, FP32_DOT, QK8,
                                       QK_INT8, PV8, EMU_CAST, EVEN_D, USE_TMA, SUB_N, PLAN_BK, BLOCK_N, BLOCK_D,
                                       I2F_BITS, P8_ORDER)

    # ---- partial blocks: the token rule in-kernel
    npart = tl.load(PART_NUM + b * pn_b + h * pn_h + qb) * SUB_N
    p_idx = PART_IDX + b * pi_b + h * pi_h + qb * pi_q
    if RULE == RULE_NEIGHBORHOOD:
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
    if RULE == RULE_BLOCK_MASKS:
        slot0 = tl.load(SLOT + b * slot_b + h * slot_h + qb).to(tl.int64)
        # only the row offsets live across the key loop; the [M, N] offsets are formed per tile
        # (a hoisted [M, N] int32 tensor held 64 registers per thread at 128 x 64 tiles)
        m_row_off = (row0 + tl.arange(0, BLOCK_M)) * PLAN_BK
    for j in range(0, npart):
        kb = tl.load(p_idx + j // SUB_N)
        col0 = kb * PLAN_BK + (j % SUB_N) * BLOCK_N
        cols = col0 + offs_n
        if RULE == RULE_NEIGHBORHOOD:
            kcol = tl.minimum(cols, S - 1)
            tk = NA_TAB + h * na_h + kcol
            k_in = tl.load(tk) != 0
            ok = _na_axis_ok(qg0, qa0, tl.load(tk + S), tl.load(tk + 2 * S), n0, k0, d0, s0, C0)
            ok = ok & _na_axis_ok(qg1, qa1, tl.load(tk + 3 * S), tl.load(tk + 4 * S), n1, k1, d1, s1, C1)
            ok = ok & _na_axis_ok(qg2, qa2, tl.load(tk + 5 * S), tl.load(tk + 6 * S), n2, k2, d2, s2, C2)
            ok = _nongrid_policy(ok, q_in, k_in, DENSE_NONGRID)
        elif RULE == RULE_BLOCK_MASKS:
            m_off = (slot0 + j // SUB_N) * (PLAN_BQ * PLAN_BK) + (j % SUB_N) * BLOCK_N + m_row_off
            mptr = BITS + m_off[:, None] + offs_n[None, :]
            ok = tl.load(mptr) != 0
        else:
            ok = ones
        bias = no_bias
        if HAS_KEPT:
            bias = no_bias + tl.load(KEPT + kept_row + kb) * 1.4426950408889634
        tile_scale = qk_scale
        if QK8:
            tile_scale = qk_scale * tl.load(KSC + ks_row + kb)
        kt, v = _load_kv(k_base, v_base, DESC_K, DESC_V, k_row0, k_col, v_row0, v_col, col0, offs_n, offs_d,
                         stride_ks, stride_vs, S, D, True, EVEN_D, USE_TMA, PV8, BLOCK_N, BLOCK_D)
        # RULE 2 masks are 0 past the sequence end: no separate tail mask on the logits
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kt, v, col0, offs_n, S, tile_scale, q_rows, ok, bias,
                                     True, RULE != RULE_BLOCK_MASKS, HAS_KEPT, FP32_DOT, QK8, QK_INT8, PV8, EMU_CAST,
                                     I2F_BITS, P8_ORDER)

    # ---- pooled columns of rectification (one per key block, weight -inf = absent)
    if HAS_POOLED:
        for c0 in range(0, NKB, BLOCK_N):
            pc = c0 + offs_n
            pw = tl.load(PW + b * pw_b + h * pw_h + qb * pw_q + pc, mask=pc < NKB, other=float("-inf"))
            present = pw > float("-inf")
            # (the launcher refuses pooled columns with a quantised precision)
            kt, v = _load_kv(PK + b * pk_b + h * pk_h, PV + b * pv_b + h * pv_h, DESC_K, DESC_V, 0, 0, 0, 0, c0,
                             offs_n, offs_d, pk_s, pv_s, NKB, D, True, EVEN_D, False, False, BLOCK_N, BLOCK_D)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kt, v, c0, offs_n, NKB, qk_scale, q_rows,
                                         ones & present[None, :],
                                         no_bias + tl.where(present, pw, 0.0)[None, :] * 1.4426950408889634,
                                         True, True, True, FP32_DOT, False, False, False, False)

    denom = tl.where(l_i > 0, l_i, 1.0)
    out = acc / denom[:, None]
    if PV8:  # dequantise P.V: the P factor 448 and the V channel scales
        vsc = tl.load(VSC + b * vs_b + hk * vs_h + offs_d, mask=offs_d < D, other=0.0)
        out = out * (vsc * (1.0 / 448.0))[None, :]
    out = tl.where((l_i > 0)[:, None], out, 0.0)
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + qtok[:, None] * stride_os + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])
    if RETURN_LSE:
        lse = tl.where(l_i > 0, (m_i + tl.log2(denom)) / 1.4426950408889634, float("-inf"))
        tl.store(LSE + bh.to(tl.int64) * S + qtok, lse, mask=row_ok)

