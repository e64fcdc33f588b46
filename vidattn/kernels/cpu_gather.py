"""CPU fast path executing a BlockPlan: for each query block, gather its kept key blocks and run
``torch.nn.functional.scaled_dot_product_attention`` on them.

How a call is organised (everything but the gathers and the SDPA calls is computed once per plan
and cached with it):

* **Query super-blocks.** Query blocks of one plan (batch, head) that keep exactly the same set of key
  blocks (common in tiled neighborhoods: every query tile of a T-column whose window spans the
  clip, every border tile) are concatenated, up to ``VIDATTN_CPU_QUERY_ROWS`` (default 768) rows,
  into one SDPA query. Longer queries run SDPA's CPU flash kernel with larger query tiles (about
  1.5x the throughput of 64-row queries on AVX-512) and gather each key set once, not once per block.
* **Batched calls.** Super-blocks with the same (rows, kept key blocks, masked or not) run as one
  SDPA call ``[rep, n, rows, D]`` over batch and heads. Those whose kept keys are all full (and
  inside the sequence) run without a mask; the others carry SDPA's additive float mask (0 / -inf),
  built from the full / partial class of each (query block, key block), the plan's token rule on
  partial blocks and the ragged sequence tail. A mask is stored once per (super-block, head) and
  broadcast over the ``rep`` axis: the batch always, and the heads too when every head's mask is
  the same (checked exactly when the plan is first run), so the cache does not grow with
  ``B * H``. Masks are cached within ``VIDATTN_CPU_MASK_BUDGET_BYTES`` (default 1 GiB; beyond it
  they are rebuilt per call, which costs several times the attention). A float mask keeps SDPA on
  its fused kernel (a bool mask is about 1.4x slower there).
* **Gathers into reused buffers.** Without autograd, the gathered Q/K/V of a call go into
  per-thread work buffers that live across calls (fresh multi-MiB allocations are page-faulted in
  by the OS on every call, which cost as much as the gather itself); each SDPA call gathers at
  most ``VIDATTN_CPU_CHUNK_BYTES`` (default 64 MiB) of K/V, which bounds the buffers. With
  autograd the gathers are ordinary differentiable ops.
* **LSE** comes from SDPA's CPU flash op itself (no second score pass) when no gradient is needed
  (and the value head dim equals the query's, which that op needs).

Work and memory are ``O(kept blocks)``, never ``S x S``. float16 / bfloat16 inputs are computed in
float32, float64 in float64. Fused rectification terms are not handled here (the registry sends
those plans to the reference backend).
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from vidattn.errors import BackendUnsupported
from vidattn.plan import FULL, PARTIAL, BlockPlan
from vidattn.plan_order import expand_kv_heads, from_plan_order, to_plan_order

__all__ = ["block_sparse_attention_cpu"]

CHUNK_BYTES = int(os.environ.get("VIDATTN_CPU_CHUNK_BYTES", str(64 << 20)))
MASK_BUDGET_BYTES = int(os.environ.get("VIDATTN_CPU_MASK_BUDGET_BYTES", str(1 << 30)))
QUERY_ROWS = int(os.environ.get("VIDATTN_CPU_QUERY_ROWS", "768"))

_plans: "weakref.WeakKeyDictionary[BlockPlan, dict]" = weakref.WeakKeyDictionary()
_work = threading.local()
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _blocks(x: torch.Tensor, block: int, nb: int) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B * H * nb, block, D]`` (zero-padded tail), contiguous."""
    pad = nb * block - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(x.shape[0] * x.shape[1] * nb, block, x.shape[-1])


def _buffer(slot: str, shape, like: torch.Tensor) -> torch.Tensor:
    """A per-thread work tensor of ``shape`` (dtype / device of ``like``), reused across calls;
    grown on demand, never shrunk. Only for tensors that autograd does not save. Buffers made under
    ``torch.inference_mode`` are inference tensors (no in-place use outside it), so the two modes
    keep separate buffers."""
    n = math.prod(shape)
    bufs = getattr(_work, "bufs", None)
    if bufs is None:
        bufs = _work.bufs = {}
    key = (slot, like.dtype, like.device, torch.is_inference_mode_enabled())
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        buf = bufs[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


def _gather(x: torch.Tensor, rows: torch.Tensor, slot: Optional[str]) -> torch.Tensor:
    """``x[rows]`` along dim 0, into the reused buffer ``slot`` (None: a fresh, differentiable tensor)."""
    if slot is None:
        return x.index_select(0, rows)
    return torch.index_select(x, 0, rows, out=_buffer(slot, (rows.numel(),) + tuple(x.shape[1:]), x))


def _to_plan(x: torch.Tensor, perm: Optional[torch.Tensor], heads: int, dtype) -> torch.Tensor:
    """``[B, S, Hx, D]`` -> ``[B, heads, S, D]`` (heads repeated for GQA) in the plan's token order,
    in ``dtype``, contiguous. A shared order is one ``index_select`` (no full-size gather index)."""
    x = expand_kv_heads(x.transpose(1, 2), heads)
    if perm is None:
        x = x.contiguous()
    elif perm.shape[0] == 1:
        x = x.index_select(2, perm[0])
    else:
        x = to_plan_order(x, perm)
    return x.to(dtype)


def _inverse(plan: BlockPlan) -> torch.Tensor:
    """Inverse of a shared token order ``plan.perm[0]`` (cached per plan)."""
    cache = _plans.setdefault(plan, {})
    if "inv" not in cache:
        cache["inv"] = torch.argsort(plan.perm[0])
    return cache["inv"]


def _super_blocks(plan: BlockPlan, rows_max: int):
    """Plan-level query super-blocks: query blocks of one (plan batch, plan head) with identical
    kept key-block sets, in runs of at most ``max(1, rows_max // block_q)`` blocks.

    Returns a list of dicts, one per (blocks per super-block ``r``, kept key blocks ``m``), with
    ``bp``, ``hp`` ``[N]``, ``qb`` ``[N, r]`` query blocks, ``kb`` ``[N, m]`` key blocks (ascending)
    ``cls`` int8 ``[N, r, m]`` (PARTIAL / FULL per query block and key block) and ``masked`` (a
    PARTIAL block or the ragged last key block in every super-block of the group, else in none)."""
    cls = plan.block_classes()  # [Bp, Hp, NQB, NKB]
    Bp, Hp, nqb, nkb = cls.shape
    dev = cls.device
    rows = cls.reshape(-1, nkb)
    kept = rows > 0
    bh = torch.arange(Bp * Hp, device=dev).repeat_interleave(nqb)  # (bp, hp) of each row
    qb = torch.arange(nqb, device=dev).repeat(Bp * Hp)
    # rows with the same (bp, hp) and kept set share an id
    _, inv = torch.unique(torch.cat([bh[:, None], kept.long()], 1), dim=0, return_inverse=True)
    order = torch.argsort(inv * nqb + qb)  # by set, then by query block
    inv_o = inv[order]
    first = torch.searchsorted(inv_o, inv_o)  # first row of the set in the sorted order
    run = max(1, rows_max // plan.block_q)
    pos = torch.arange(order.numel(), device=dev) - first
    sb_key = inv_o * (nqb + 1) + pos // run  # super-block of each sorted row (contiguous)
    _, sb, sb_r = torch.unique_consecutive(sb_key, return_inverse=True, return_counts=True)
    sb_first = torch.cumsum(sb_r, 0) - sb_r  # first sorted row of each super-block
    sb_m = kept[order[sb_first]].sum(-1)
    # masked super-blocks (a PARTIAL block, or the ragged last key block) never share a call with unmasked ones
    part = torch.zeros(sb_r.numel(), dtype=torch.long, device=dev).index_add_(
        0, sb, (rows[order] == PARTIAL).any(-1).long()) > 0
    if plan.seq_len % plan.block_k:
        part = part | kept[order[sb_first], nkb - 1]
    out = []
    gkey = (sb_r * (nkb + 1) + sb_m) * 2 + part.long()
    for u in torch.unique(gkey).tolist():
        rm, masked = divmod(u, 2)
        r, m = divmod(rm, nkb + 1)
        if m == 0:
            continue
        sel = (gkey == u).nonzero(as_tuple=True)[0]  # super-blocks of this shape
        mem = order[(sb_first[sel][:, None] + torch.arange(r, device=dev))]  # [N, r] row ids
        kb = kept[mem[:, 0]].nonzero(as_tuple=True)[1].view(-1, m)  # [N, m] ascending
        c = torch.gather(rows[mem.flatten()], 1, kb.repeat_interleave(r, 0)).view(-1, r, m)
        b_h = bh[mem[:, 0]]
        out.append(dict(r=r, m=m, bp=b_h // Hp, hp=b_h % Hp, qb=qb[mem], kb=kb, cls=c, masked=bool(masked)))
    return out


def _mask(plan: BlockPlan, g: dict, perm_h: torch.Tensor) -> torch.Tensor:
    """Bool ``[n, r * block_q, m * block_k]`` of ``n`` mask instances (``g``: head ``h`` ``[n]``,
    query blocks ``qb`` ``[n, r]``, classes ``cls`` ``[n, r, m]``, key positions ``kpos``
    ``[n, m * block_k]``): FULL blocks allowed, PARTIAL blocks by the plan's rule (all allowed
    without one), keys past the sequence end not."""
    S, bq, bk = plan.seq_len, plan.block_q, plan.block_k
    dev = perm_h.device
    n, r, m = g["cls"].shape
    full = (g["cls"] == FULL)[:, :, None, :, None].expand(n, r, bq, m, bk).reshape(n, r * bq, m * bk)
    if plan.rule is not None and bool((g["cls"] == PARTIAL).any()):
        ph = perm_h[g["h"]]  # [n, S]
        qpos = (g["qb"][:, :, None] * bq + torch.arange(bq, device=dev)).flatten(1).clamp(max=S - 1)
        qo = torch.gather(ph, 1, qpos)
        ko = torch.gather(ph, 1, g["kpos"].clamp(max=S - 1))
        mask = full | plan.rule(g["h"][:, None, None], qo[:, :, None], ko[:, None, :])
    else:
        mask = torch.ones_like(full)
    if S % bk:
        mask = mask & (g["kpos"] < S)[:, None, :]
    return mask


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """Bool mask ``[n, q, k]`` -> SDPA's additive float mask ``[1, n, q, k]`` (0 allowed, -inf not)."""
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))[None]


def _mask_args(plan: BlockPlan, sbg: dict, sb: torch.Tensor, h: torch.Tensor) -> dict:
    """:func:`_mask`'s ``g`` for super-blocks ``sb`` (indices into ``sbg``) evaluated at heads ``h``."""
    kb = sbg["kb"][sb]
    return dict(h=h, qb=sbg["qb"][sb], cls=sbg["cls"][sb],
                kpos=(kb[..., None] * plan.block_k + torch.arange(plan.block_k, device=kb.device)).flatten(1))


def _heads_share_masks(plan: BlockPlan, sbg: dict, H: int, perm_h: torch.Tensor, piece: int) -> bool:
    """Whether every head's mask equals head 0's on all super-blocks of ``sbg`` (head-shared plan)."""
    n0 = sbg["bp"].numel()
    for c0 in range(0, n0, piece):
        sb = torch.arange(c0, min(n0, c0 + piece), device=perm_h.device)
        ref = _mask(plan, _mask_args(plan, sbg, sb, torch.zeros_like(sb)), perm_h)
        for h in range(1, H):
            if not torch.equal(_mask(plan, _mask_args(plan, sbg, sb, torch.full_like(sb, h)), perm_h), ref):
                return False
    return True


def _groups(plan: BlockPlan, B: int, H: int, kvh: int, item_bytes: int, dtype) -> list:
    """SDPA calls of the plan for this batch / head layout, cached per plan.

    Each super-block group of :func:`_super_blocks` becomes *mask units* of ``n`` mask instances
    (plan super-block, head); one SDPA call runs ``[rep, n, rows, D]`` queries whose leading ``rep``
    axis replicates the instances over the batch (masks never depend on it) and over heads when
    every head has the same mask, so the additive mask ``[1, n, rows, keys]`` is built and stored
    once per instance, not per (batch, head). Calls gather at most ``CHUNK_BYTES`` of K/V. Per
    unit: ``add`` / ``empty`` (within ``MASK_BUDGET_BYTES``, else built per call from ``mask``),
    and ``calls``: ``rep``, ``n``, the flat Q/O block rows and K/V block rows."""
    cache = _plans.setdefault(plan, {})
    ck = (B, H, kvh, item_bytes, dtype, CHUNK_BYTES, MASK_BUDGET_BYTES, QUERY_ROWS)
    if ck in cache:
        return cache[ck]
    S, bq, bk, nqb, nkb = plan.seq_len, plan.block_q, plan.block_k, plan.num_q_blocks, plan.num_k_blocks
    dev = plan.device
    grp = H // kvh
    Bp, Hp = plan.plan_batch, plan.kv_num_blocks.shape[1]
    perm_h = (plan.perm if plan.perm is not None else torch.arange(S, device=dev)[None]).expand(H, S)
    mask_bytes = 0
    out = []
    for sbg in _super_blocks(plan, QUERY_ROWS):
        r, m, masked = sbg["r"], sbg["m"], sbg["masked"]
        n0 = sbg["bp"].numel()
        per_inst = m * bk * item_bytes  # gathered K/V bytes of one instance
        rows_mask = r * bq * m * bk
        ar0 = torch.arange(n0, device=dev)
        head_rep = Hp == 1 and (H == 1 or not masked or _heads_share_masks(
            plan, sbg, H, perm_h, max(1, (8 << 20) // rows_mask)))  # rule temporaries <= ~64 MiB
        if Hp == 1 and not head_rep:  # one mask instance per (super-block, head)
            sb, sb_h = ar0.repeat_interleave(H), torch.arange(H, device=dev).repeat(n0)
        else:
            sb, sb_h = ar0, (torch.zeros_like(ar0) if Hp == 1 else sbg["hp"])
        rep_b = torch.arange(B, device=dev) if Bp == 1 else torch.zeros(1, dtype=torch.long, device=dev)
        rep_h = torch.arange(H, device=dev) if head_rep else torch.zeros(1, dtype=torch.long, device=dev)
        rb, rh = rep_b.repeat_interleave(rep_h.numel()), rep_h.repeat(rep_b.numel())  # [rep]
        rep = rb.numel()
        rep_c = max(1, min(rep, CHUNK_BYTES // per_inst))
        n_c = max(1, CHUNK_BYTES // (rep_c * per_inst)) if rep_c == rep else 1
        if masked:  # a unit's float mask stays within CHUNK_BYTES too (the rule's temporaries within ~2x)
            n_c = min(n_c, max(1, CHUNK_BYTES // (rows_mask * torch.finfo(dtype).bits // 8)))
        for i0 in range(0, sb.numel(), n_c):
            isb, ih = sb[i0:i0 + n_c], sb_h[i0:i0 + n_c]
            margs = _mask_args(plan, sbg, isb, ih)
            unit = dict(r=r, m=m, masked=masked, mask=margs if masked else None, add=None, empty=None, calls=[])
            if masked:
                need = isb.numel() * rows_mask * torch.finfo(dtype).bits // 8
                if mask_bytes + need <= MASK_BUDGET_BYTES:
                    unit["add"], unit["empty"] = _mask_parts(plan, margs, perm_h, dtype)
                    mask_bytes += need
            for j0 in range(0, rep, rep_c):
                jb, jh = rb[j0:j0 + rep_c], rh[j0:j0 + rep_c]
                b = jb[:, None] if Bp == 1 else sbg["bp"][isb][None, :]  # [rep_c, n] (broadcast)
                h = jh[:, None] if head_rep else ih[None, :]
                b, h = torch.broadcast_tensors(b, h)
                b, h = b.expand(jb.numel(), isb.numel()), h.expand(jb.numel(), isb.numel())
                q_rows = ((b * H + h) * nqb)[..., None] + sbg["qb"][isb][None]  # [rep_c, n, r]
                kv_rows = ((b * kvh + h // grp) * nkb)[..., None] + sbg["kb"][isb][None]  # [rep_c, n, m]
                unit["calls"].append(dict(rep=jb.numel(), n=isb.numel(), q_rows=q_rows.flatten(),
                                          kv_rows=kv_rows.flatten()))
            out.append(unit)
    if len(cache) > 8:
        cache.clear()
    cache[ck] = out
    return out


def _mask_parts(plan, margs, perm_h, dtype):
    """(additive float mask ``[1, n, r*bq, m*bk]``, bool ``[1, n, r*bq, 1]`` rows with no allowed
    key, or False when there are none)."""
    mask = _mask(plan, margs, perm_h)
    empty = ~mask.any(-1, keepdim=True)
    return _additive(mask, dtype), (empty[None] if bool(empty.any()) else False)


def block_sparse_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                               scale: Optional[float] = None, return_lse: bool = False):
    """Run ``plan`` with SDPA over gathered key blocks, per query super-block.

    Args:
        q: ``[B, S, H, D]``; k, v: ``[B, S, Hk, D]`` (Hk divides H); float16/bfloat16/float32/float64
            on the CPU (any device works, but this path is meant for CPU).
        plan: a BlockPlan (Bp in {1, B}, Hp in {1, H}) without fused rectification terms.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the float32 natural-log LSE ``[B, H, S]`` (``-inf`` for a query
            with no allowed key, whose output is 0).
    Returns:
        ``[B, S, H, D]`` in q's dtype (and the LSE). Differentiable in q, k, v.
    Raises:
        BackendUnsupported: plans with fused rectification terms.
    """
    rect = plan.rectification
    if rect is not None and rect.has_fused:
        raise BackendUnsupported("the cpu backend does not fuse rectification terms")
    B, S, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if scale is None else float(scale)
    dev = q.device
    if plan.device != dev:
        plan = plan.to(dev)
    bq, bk, nqb, nkb = plan.block_q, plan.block_k, plan.num_q_blocks, plan.num_k_blocks
    perm = plan.perm
    kvh = H if perm is not None and perm.shape[0] > 1 else Hk  # per-head orders need one K/V per head
    qf = _blocks(_to_plan(q, perm, H, cdt), bq, nqb)  # [B * H * NQB, bq, D]
    kf = _blocks(_to_plan(k, perm, kvh, cdt), bk, nkb)
    vf = _blocks(_to_plan(v, perm, kvh, cdt), bk, nkb)
    perm_h = (perm if perm is not None else torch.arange(S, device=dev)[None]).expand(H, S)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out = qf.new_zeros(B * H * nqb, bq, Dv)
    lse = torch.full((B * H * nqb, bq), -math.inf, dtype=torch.float32, device=dev) if return_lse else None
    for u in _groups(plan, B, H, kvh, (D + Dv) * qf.element_size(), cdt):
        r, m = u["r"], u["m"]
        add, empty = u["add"], u["empty"]
        if u["masked"] and add is None:  # over the mask budget: built per call
            add, empty = _mask_parts(plan, u["mask"], perm_h, cdt)
        has_empty = empty is not None and empty is not False
        for c in u["calls"]:
            rep, n = c["rep"], c["n"]
            qq = _gather(qf, c["q_rows"], None if grad else "q").view(rep, n, r * bq, D)
            kk = _gather(kf, c["kv_rows"], None if grad else "k").view(rep, n, m * bk, D)
            vv = _gather(vf, c["kv_rows"], None if grad else "v").view(rep, n, m * bk, Dv)
            l = None
            if return_lse and not grad and _flash_cpu is not None and dev.type == "cpu" and D == Dv:
                o, l = _flash_cpu(qq, kk, vv, attn_mask=add, scale=scale)  # LSE [rep, n, r * bq]
            else:
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=add, scale=scale)
            if has_empty:
                o = o.masked_fill(empty, 0.0)  # rows with no allowed key: 0
            o = o.reshape(rep * n * r, bq, Dv)
            out = out.index_copy(0, c["q_rows"], o) if o.requires_grad else out.index_copy_(0, c["q_rows"], o)
            if return_lse:
                if l is None:
                    s = torch.einsum("rnqd,rnkd->rnqk", qq, kk) * scale
                    if add is not None:
                        s = s + add
                    l = torch.logsumexp(s, -1)
                if has_empty:
                    l = l.masked_fill(empty[..., 0], -math.inf)
                lse.index_copy_(0, c["q_rows"], l.float().reshape(rep * n * r, bq))
    out = out.view(B, H, nqb * bq, Dv)[:, :, :S]
    lse = lse.view(B, H, nqb * bq)[:, :, :S] if return_lse else None
    if perm is not None and perm.shape[0] == 1:  # one shared order: undo it with one index_select
        inv = _inverse(plan)
        res = out.transpose(1, 2).index_select(1, inv).to(q.dtype)  # [B, S, H, Dv], contiguous
        return (res, lse.index_select(2, inv)) if return_lse else res
    res = from_plan_order(out, perm).transpose(1, 2).to(q.dtype)
    return (res, from_plan_order(lse.contiguous(), perm)) if return_lse else res
