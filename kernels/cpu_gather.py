"""CPU fast path executing a BlockPlan: for each query block, gather its kept key blocks and run
``torch.nn.functional.scaled_dot_product_attention`` on them.

Query blocks (over batch and heads) with the same numbers of full and partial key blocks are
batched into one SDPA call. Query blocks whose kept keys are all full (and inside the sequence)
run without a mask (SDPA's fused CPU kernel); the others carry a boolean mask built from the
plan's token rule in their partial blocks and from the ragged sequence tail. Work and memory are
``O(kept blocks)``, never ``S x S``; gathered K/V copies are bounded per SDPA call by
``VIDATTN_CPU_CHUNK_BYTES`` (default 256 MiB). The grouping, gather indices and the token-rule
masks of partial blocks are computed once per plan and cached with it (masks up to
``VIDATTN_CPU_MASK_BUDGET_BYTES``, default 1 GiB, else evaluated per call).

float16 / bfloat16 inputs are computed in float32, float64 in float64. Fused rectification terms
are not handled here (the registry sends those plans to the reference backend).
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from vidattn.errors import BackendUnsupported
from vidattn.plan import BlockPlan
from vidattn.plan_order import expand_kv_heads, from_plan_order, to_plan_order

__all__ = ["block_sparse_attention_cpu"]

CHUNK_BYTES = int(os.environ.get("VIDATTN_CPU_CHUNK_BYTES", str(256 << 20)))
MASK_BUDGET_BYTES = int(os.environ.get("VIDATTN_CPU_MASK_BUDGET_BYTES", str(1 << 30)))

_plans: "weakref.WeakKeyDictionary[BlockPlan, dict]" = weakref.WeakKeyDictionary()


def _blocks(x: torch.Tensor, block: int, nb: int) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B * H * nb, block, D]`` (zero-padded tail), contiguous."""
    pad = nb * block - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(x.shape[0] * x.shape[1] * nb, block, x.shape[-1])


def _partial_mask(plan: BlockPlan, g: dict, perm_h: torch.Tensor) -> torch.Tensor:
    """Bool ``[N, block_q, n_p * block_k]``: the plan's rule on the group's partial key blocks."""
    S, bq, bk = plan.seq_len, plan.block_q, plan.block_k
    dev = perm_h.device
    ph = perm_h[g["h"]]  # [N, S]
    qo = torch.gather(ph, 1, (g["qb"][:, None] * bq + torch.arange(bq, device=dev)).clamp(max=S - 1))
    ko = torch.gather(ph, 1, g["kpos"][:, g["n_f"] * bk:].clamp(max=S - 1))
    return plan.rule(g["h"][:, None, None], qo[:, :, None], ko[:, None, :])


def _full_mask(plan: BlockPlan, g: dict, perm_h: torch.Tensor) -> Optional[torch.Tensor]:
    """Bool ``[N, block_q, m * block_k]`` of a group (None: every gathered key is allowed)."""
    n, bq, bk = g["q_rows"].numel(), plan.block_q, plan.block_k
    mask = None
    if g["n_p"] and plan.rule is not None:
        full = torch.ones(n, bq, g["n_f"] * bk, dtype=torch.bool, device=perm_h.device)
        mask = torch.cat([full, _partial_mask(plan, g, perm_h)], -1)
    if g["real"] is not None:
        m = g["n_f"] + g["n_p"]
        mask = g["real"].expand(n, bq, m * bk) if mask is None else mask & g["real"]
    return mask


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """Bool mask -> SDPA's additive float mask ``[N, 1, q, k]`` (0 allowed, -inf not)."""
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))[:, None]


def _groups(plan: BlockPlan, B: int, H: int, kvh: int, item_bytes: int, dtype) -> list:
    """Query blocks (over batch and heads) grouped by their (full, partial) key-block counts and
    chunked to ``CHUNK_BYTES``; per chunk the flat row indices of Q/O and K/V blocks, the key
    positions, and (within ``MASK_BUDGET_BYTES``) the additive mask and the rows with no allowed
    key. Cached per plan."""
    cache = _plans.setdefault(plan, {})
    ck = (B, H, kvh, item_bytes, dtype, CHUNK_BYTES, MASK_BUDGET_BYTES)
    if ck in cache:
        return cache[ck]
    S, bq, bk, nqb, nkb = plan.seq_len, plan.block_q, plan.block_k, plan.num_q_blocks, plan.num_k_blocks
    dev = plan.device
    grp = H // kvh
    perm_h = (plan.perm if plan.perm is not None else torch.arange(S, device=dev)[None]).expand(H, S)

    def bh(t):  # plan tensor [Bp, Hp, ...] -> [B, H, ...]
        return t.expand(B, H, *t.shape[2:])

    nf, fidx = bh(plan.full_kv_num_blocks).long(), bh(plan.full_kv_indices).long()
    npart, pidx = bh(plan.kv_num_blocks).long(), bh(plan.kv_indices).long()
    mp = pidx.shape[-1]
    key = nf * (mp + 1) + npart  # query blocks with equal (full, partial) counts share one SDPA call
    ar_k = torch.arange(bk, device=dev)
    mask_bytes = 0
    out = []
    for u in torch.unique(key).tolist():
        n_f, n_p = divmod(u, mp + 1)
        m = n_f + n_p
        if m == 0:
            continue
        b_all, h_all, q_all = (key == u).nonzero(as_tuple=True)
        chunk = max(1, CHUNK_BYTES // (m * bk * item_bytes + bq * m * bk))
        for c0 in range(0, b_all.numel(), chunk):
            b_i, h_i, q_i = b_all[c0:c0 + chunk], h_all[c0:c0 + chunk], q_all[c0:c0 + chunk]
            blocks = torch.cat([fidx[b_i, h_i, q_i, :n_f], pidx[b_i, h_i, q_i, :n_p]], -1)  # [N, m]
            kpos = (blocks[..., None] * bk + ar_k).flatten(1)  # [N, m * bk] plan positions of the keys
            g = dict(n_f=n_f, n_p=n_p, h=h_i, qb=q_i, kpos=kpos,
                     q_rows=(b_i * H + h_i) * nqb + q_i,
                     kv_rows=(((b_i * kvh + h_i // grp) * nkb)[:, None] + blocks).flatten(),
                     real=(kpos < S)[:, None, :] if S % bk and bool((blocks == nkb - 1).any()) else None,
                     masked=bool(n_p and plan.rule is not None), add=None, empty=None)
            g["masked"] = g["masked"] or g["real"] is not None
            if g["masked"]:
                need = b_i.numel() * bq * m * bk * torch.finfo(dtype).bits // 8
                if mask_bytes + need <= MASK_BUDGET_BYTES:
                    mask = _full_mask(plan, g, perm_h)
                    g["add"] = _additive(mask, dtype)
                    empty = ~mask.any(-1, keepdim=True)
                    g["empty"] = empty if bool(empty.any()) else False
                    mask_bytes += need
            out.append(g)
    if len(cache) > 8:
        cache.clear()
    cache[ck] = out
    return out


def block_sparse_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                               scale: Optional[float] = None, return_lse: bool = False):
    """Run ``plan`` with per-query-block SDPA over gathered key blocks.

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
    qf = _blocks(to_plan_order(q.transpose(1, 2).to(cdt), perm), bq, nqb)  # [B * H * NQB, bq, D]
    kf = _blocks(to_plan_order(expand_kv_heads(k.transpose(1, 2), kvh).to(cdt), perm), bk, nkb)
    vf = _blocks(to_plan_order(expand_kv_heads(v.transpose(1, 2), kvh).to(cdt), perm), bk, nkb)
    perm_h = (perm if perm is not None else torch.arange(S, device=dev)[None]).expand(H, S)
    out = qf.new_zeros(B * H * nqb, bq, Dv)
    lse = torch.full((B * H * nqb, bq), -math.inf, dtype=torch.float32, device=dev) if return_lse else None
    for g in _groups(plan, B, H, kvh, (D + Dv) * qf.element_size(), cdt):
        n, m = g["q_rows"].numel(), g["n_f"] + g["n_p"]
        qq = qf.index_select(0, g["q_rows"])  # [N, bq, D]
        kk = kf.index_select(0, g["kv_rows"]).view(n, m * bk, D)
        vv = vf.index_select(0, g["kv_rows"]).view(n, m * bk, Dv)
        add, empty = g["add"], g["empty"]
        if g["masked"] and add is None:  # over the mask budget: built per call
            mask = _full_mask(plan, g, perm_h)
            add, empty = _additive(mask, cdt), ~mask.any(-1, keepdim=True)
        # 4-D [N, 1, L, D] inputs take SDPA's fused CPU kernel
        o = F.scaled_dot_product_attention(qq[:, None], kk[:, None], vv[:, None], attn_mask=add, scale=scale)[:, 0]
        if empty is not None and empty is not False:
            o = o.masked_fill(empty, 0.0)  # rows with no allowed key: 0
        out = out.index_copy(0, g["q_rows"], o) if o.requires_grad else out.index_copy_(0, g["q_rows"], o)
        if return_lse:
            s = torch.einsum("nqd,nkd->nqk", qq, kk) * scale
            if add is not None:
                s = s + add[:, 0]
            lse.index_copy_(0, g["q_rows"], torch.logsumexp(s, -1).float())
    res = from_plan_order(out.view(B, H, nqb * bq, Dv)[:, :, :S], perm).transpose(1, 2).to(q.dtype)
    if return_lse:
        return res, from_plan_order(lse.view(B, H, nqb * bq)[:, :, :S].contiguous(), perm)
    return res
