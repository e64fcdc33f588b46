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
  columns merged into the same softmax after the block loop.

Returns the output and (optionally) the natural-log LSE. Anything unsupported raises
``TritonUnsupported`` (a ``BackendUnsupported``) so the dispatcher falls back with one warning.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from vidattn.attention import BackendUnsupported
from vidattn.patterns.neighborhood import NeighborhoodRule
from vidattn.plan import PARTIAL, BlockPlan

from .reference import expand_kv_heads, from_plan_order, to_plan_order

__all__ = ["block_sparse_attention_triton", "TritonUnsupported", "neighborhood_tables", "partial_block_masks",
           "partial_mask_bytes"]

LOG2E = 1.4426950408889634
_stages_ok: dict = {}


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
    """The rule inside every listed partial block, computed once per plan with the rule in torch.

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
        ar_q, ar_k = torch.arange(bq, device=dev), torch.arange(bk, device=dev)
        chunk = max(1, (1 << 24) // (bq * bk))
        for c0 in range(0, P, chunk):
            sl = slice(c0, min(P, c0 + chunk))
            hh = h_i[sl]
            ph = perm[hh if perm.shape[0] > 1 else torch.zeros_like(hh)]  # [c, S]
            qpos = (q_i[sl, None] * bq + ar_q).clamp(max=S - 1)
            kpos = (k_i[sl, None] * bk + ar_k).clamp(max=S - 1)
            qo = torch.gather(ph, 1, qpos)
            ko = torch.gather(ph, 1, kpos)
            masks[sl] = plan.rule(hh[:, None, None], qo[:, :, None], ko[:, None, :]).to(torch.uint8)
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
def _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, cols, d_mask, S, qk_scale, allowed, extra_bias,
                  HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, CHECK_COLS: tl.constexpr = True):
    col_ok = cols < S
    if CHECK_COLS:
        k = tl.load(k_ptrs, mask=col_ok[:, None] & d_mask[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=d_mask[None, :], other=0.0)
    if FP32_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if HAS_BIAS:
        s = s + extra_bias
    if HAS_MASK:
        s = tl.where(col_ok[None, :] & allowed, s, float("-inf"))
    elif CHECK_COLS:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if CHECK_COLS:
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_mask[None, :], other=0.0)
    else:
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    if FP32_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _sparse_flash_fwd(
    Q, K, V, O, LSE,
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX,
    NA_TAB, BITS, SLOT, KEPT, PK, PV, PW,
    S, H, HK_GROUP, qk_scale,
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
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // HK_GROUP
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row_ok = rows < S
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    zero_bias = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ones = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)

    # ---- full blocks
    nf = tl.load(FULL_NUM + b * fn_b + h * fn_h + qb)
    for j in range(0, nf):
        kb = tl.load(FULL_IDX + b * fi_b + h * fi_h + qb * fi_q + j)
        cols = kb * BLOCK_N + offs_n
        bias = zero_bias
        if HAS_KEPT:
            bias = zero_bias + tl.load(KEPT + b * kept_b + h * kept_h + qb * kept_q + kb) * 1.4426950408889634
        if kb * BLOCK_N + BLOCK_N <= S:  # interior block: no tail masking at all
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base + cols[:, None] * stride_ks + offs_d[None, :],
                                          v_base + cols[:, None] * stride_vs + offs_d[None, :], cols, d_mask, S,
                                          qk_scale, ones, bias, False, HAS_KEPT, FP32_DOT, False)
        else:
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base + cols[:, None] * stride_ks + offs_d[None, :],
                                          v_base + cols[:, None] * stride_vs + offs_d[None, :], cols, d_mask, S,
                                          qk_scale, ones, bias, False, HAS_KEPT, FP32_DOT, True)

    # ---- partial blocks
    npart = tl.load(PART_NUM + b * pn_b + h * pn_h + qb)
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
    for j in range(0, npart):
        kb = tl.load(PART_IDX + b * pi_b + h * pi_h + qb * pi_q + j)
        cols = kb * BLOCK_N + offs_n
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
            mptr = (BITS + (slot0 + j) * (BLOCK_M * BLOCK_N)
                    + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + offs_n[None, :])
            ok = tl.load(mptr) != 0
        else:
            ok = ones
        bias = zero_bias
        if HAS_KEPT:
            bias = zero_bias + tl.load(KEPT + b * kept_b + h * kept_h + qb * kept_q + kb) * 1.4426950408889634
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base + cols[:, None] * stride_ks + offs_d[None, :],
                                      v_base + cols[:, None] * stride_vs + offs_d[None, :], cols, d_mask, S,
                                      qk_scale, ok, bias, True, HAS_KEPT, FP32_DOT)

    # ---- pooled columns of rectification (one per key block, weight -inf = absent)
    if HAS_POOLED:
        for c0 in range(0, NKB, BLOCK_N):
            pc = c0 + offs_n
            pw = tl.load(PW + b * pw_b + h * pw_h + qb * pw_q + pc, mask=pc < NKB, other=float("-inf"))
            present = pw > float("-inf")
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, PK + b * pk_b + h * pk_h + pc[:, None] * pk_s + offs_d[None, :],
                                          PV + b * pv_b + h * pv_h + pc[:, None] * pv_s + offs_d[None, :], pc, d_mask,
                                          NKB, qk_scale, ones & present[None, :],
                                          zero_bias + tl.where(present, pw, 0.0)[None, :] * 1.4426950408889634,
                                          True, True, FP32_DOT)

    denom = tl.where(l_i > 0, l_i, 1.0)
    out = acc / denom[:, None]
    out = tl.where((l_i > 0)[:, None], out, 0.0)
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    if RETURN_LSE:
        lse = tl.where(l_i > 0, (m_i + tl.log2(denom)) / 1.4426950408889634, float("-inf"))
        tl.store(LSE + bh * S + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------- launcher
def _bh_strides(t: torch.Tensor, B: int, H: int):
    """Strides of a plan tensor ``[Bp, Hp, ...]`` broadcast to ``[B, H, ...]`` (0 on size-1 dims)."""
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


def block_sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                                  scale: Optional[float] = None, return_lse: bool = False):
    """Run ``plan`` with the fused Triton kernel.

    Args:
        q: ``[B, S, H, D]``; k, v: ``[B, S, Hk, D]`` (Hk divides H); fp16/bf16 (fp32 accumulate)
            or fp32; D up to 256 (padded to a power of two in-kernel).
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
    per_head_perm = plan.perm is not None and plan.perm.shape[0] > 1
    qh = to_plan_order(q.transpose(1, 2), plan.perm).contiguous()
    if per_head_perm and Hk != H:
        k, v = (expand_kv_heads(t.transpose(1, 2), H).transpose(1, 2) for t in (k, v))
        Hk = H
    kh = to_plan_order(k.transpose(1, 2), plan.perm).contiguous()
    vh = to_plan_order(v.transpose(1, 2), plan.perm).contiguous()
    out = torch.empty_like(qh)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device) if return_lse else out
    dev = q.device

    fnum, fidx = plan.full_kv_num_blocks.to(torch.int32), plan.full_kv_indices.to(torch.int32)
    pnum, pidx = plan.kv_num_blocks.to(torch.int32), plan.kv_indices.to(torch.int32)
    if fidx.shape[-1] == 0:
        fidx = torch.zeros(*fidx.shape[:-1], 1, dtype=torch.int32, device=dev)
    if pidx.shape[-1] == 0:
        pidx = torch.zeros(*pidx.shape[:-1], 1, dtype=torch.int32, device=dev)
    rule_mode = 0
    na = bits = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=dev)
    slot = torch.zeros(1, 1, 1, dtype=torch.int64, device=dev)
    na_args = [1, 1, 1, 1] * 3
    causal = [False] * 3
    dense_nongrid = True
    if plan.has_partial and plan.rule is not None:
        fits = partial_mask_bytes(plan) <= MASK_BUDGET_BYTES
        if isinstance(plan.rule, NeighborhoodRule) and not fits:
            rule_mode = 1
            na = neighborhood_tables(plan)
            r = plan.rule
            for a in range(len(r.grid)):
                na_args[4 * a: 4 * a + 4] = [r.grid[a], r.kernel_size[a], r.dilation[a], r.stride[a]]
                causal[a] = bool(r.is_causal[a])
            dense_nongrid = bool(r.dense_nongrid)
        elif fits:
            # precomputed per-block masks: one byte load per pair, the fastest partial-block path
            rule_mode = 2
            bits, slot = partial_block_masks(plan)
        else:
            raise TritonUnsupported(f"partial-block masks need {partial_mask_bytes(plan) / 2**30:.1f} GiB "
                                    f"(> VIDATTN_MASK_BUDGET_BYTES) and {type(plan.rule).__name__} has no in-kernel form")
    rect = plan.rectification
    kept = rect.kept_log_scale.float().contiguous() if rect is not None and rect.kept_log_scale is not None else None
    pooled = rect is not None and rect.has_pooled
    if pooled:
        pk = rect.pooled_k.to(q.dtype).contiguous()
        pv = rect.pooled_v.to(q.dtype).contiguous()
        pw = rect.pooled_log_weight.float().contiguous()
    fdummy = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=dev)
    kept_t = kept if kept is not None else fdummy
    pk_t = pk if pooled else qh
    pv_t = pv if pooled else qh
    pw_t = pw if pooled else fdummy

    BLOCK_D = max(16, triton.next_power_of_2(D))
    BM, BN = plan.block_q, plan.block_k
    nqb = plan.num_q_blocks
    big = BM * BN * BLOCK_D >= 128 * 128 * 128
    num_warps = int(os.environ.get("VIDATTN_TRITON_WARPS", 8 if big else 4))
    stage_options = [1] if _interpreting() else ([2, 1] if q.dtype != torch.float32 else [1])
    if os.environ.get("VIDATTN_TRITON_STAGES") and not _interpreting():
        stage_options = [int(os.environ["VIDATTN_TRITON_STAGES"])] + stage_options
    grid = (nqb, B * H)
    fn_b, fn_h = _bh_strides(fnum, B, H)
    fi_b, fi_h = _bh_strides(fidx, B, H)
    pn_b, pn_h = _bh_strides(pnum, B, H)
    pi_b, pi_h = _bh_strides(pidx, B, H)
    na_h = 0 if na.shape[0] == 1 else na.stride(0)
    slot_b, slot_h = _bh_strides(slot, B, H)
    kept_b, kept_h = _bh_strides(kept_t, B, H)
    pk_b, pk_h = _bh_strides(pk_t, B, H) if pooled else (0, 0)
    pv_b, pv_h = _bh_strides(pv_t, B, H) if pooled else (0, 0)
    pw_b, pw_h = _bh_strides(pw_t, B, H)
    launch_args = (
        qh, kh, vh, out, lse,
        fnum, fidx, pnum, pidx,
        na, bits, slot, kept_t, pk_t, pv_t, pw_t,
        S, H, H // Hk, scale * LOG2E,
        qh.stride(0), qh.stride(1), qh.stride(2),
        kh.stride(0), kh.stride(1), kh.stride(2),
        vh.stride(0), vh.stride(1), vh.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
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
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    key = (BM, BN, BLOCK_D, q.dtype, rule_mode, pooled, num_warps, tuple(stage_options))
    for stages in ([_stages_ok[key]] if key in _stages_ok else stage_options):
        try:
            _sparse_flash_fwd[grid](*launch_args, num_stages=stages, **consts)
            _stages_ok[key] = stages
            break
        except OutOfResources as e:
            last = e
    else:
        raise TritonUnsupported(f"kernel does not fit this GPU: {last}")
    res = from_plan_order(out, plan.perm).transpose(1, 2)
    if return_lse:
        return res, from_plan_order(lse, plan.perm)
    return res
