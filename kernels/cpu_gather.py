"""CPU fast path executing a BlockPlan: for each query block, gather its kept key blocks and run
``torch.nn.functional.scaled_dot_product_attention`` on them.

Query blocks (over batch and heads) with the same numbers of full and partial key blocks are
batched into one SDPA call. Query blocks whose kept keys are all full (and inside the sequence)
run without a mask (SDPA's fused CPU kernel); the others carry a boolean mask built from the
plan's token rule in their partial blocks and from the ragged sequence tail. Work and memory are
``O(kept blocks)``, never ``S x S``; gathered K/V copies are bounded per SDPA call by
``VIDATTN_CPU_CHUNK_BYTES`` (default 256 MiB).

float16 / bfloat16 inputs are computed in float32, float64 in float64. Fused rectification terms
are not handled here (the registry sends those plans to the reference backend).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from vidattn.errors import BackendUnsupported
from vidattn.plan import BlockPlan
from vidattn.plan_order import expand_kv_heads, from_plan_order, to_plan_order

__all__ = ["block_sparse_attention_cpu"]

CHUNK_BYTES = int(os.environ.get("VIDATTN_CPU_CHUNK_BYTES", str(256 << 20)))


def _blocks(x: torch.Tensor, block: int, nb: int) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B, H, nb, block, D]`` (zero-padded tail)."""
    pad = nb * block - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.view(x.shape[0], x.shape[1], nb, block, x.shape[-1])


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
    grp = H // kvh
    qb_ = _blocks(to_plan_order(q.transpose(1, 2).to(cdt), perm), bq, nqb)  # [B, H, NQB, bq, D]
    kb_ = _blocks(to_plan_order(expand_kv_heads(k.transpose(1, 2), kvh).to(cdt), perm), bk, nkb)
    vb_ = _blocks(to_plan_order(expand_kv_heads(v.transpose(1, 2), kvh).to(cdt), perm), bk, nkb)
    perm_h = (perm if perm is not None else torch.arange(S, device=dev)[None]).to(dev)
    perm_h = perm_h.expand(H, S)

    def bh(t):  # plan tensor [Bp, Hp, ...] -> [B, H, ...]
        return t.expand(B, H, *t.shape[2:])

    nf, fidx = bh(plan.full_kv_num_blocks).long(), bh(plan.full_kv_indices).long()
    npart, pidx = bh(plan.kv_num_blocks).long(), bh(plan.kv_indices).long()
    out = torch.zeros(B, H, nqb, bq, Dv, dtype=cdt, device=dev)
    lse = torch.full((B, H, nqb, bq), -math.inf, dtype=torch.float32, device=dev) if return_lse else None
    ragged = S % bk != 0
    ar_q, ar_k = torch.arange(bq, device=dev), torch.arange(bk, device=dev)
    mp = pidx.shape[-1]
    key = nf * (mp + 1) + npart  # query blocks with equal (full, partial) counts share one SDPA call
    for u in torch.unique(key).tolist():
        n_f, n_p = divmod(u, mp + 1)
        m = n_f + n_p
        if m == 0:
            continue
        b_all, h_all, q_all = (key == u).nonzero(as_tuple=True)
        per_item = m * bk * (D + Dv) * qb_.element_size() * 2 + bq * m * bk
        chunk = max(1, CHUNK_BYTES // per_item)
        for c0 in range(0, b_all.numel(), chunk):
            b_i, h_i, q_i = b_all[c0:c0 + chunk], h_all[c0:c0 + chunk], q_all[c0:c0 + chunk]
            blocks = torch.cat([fidx[b_i, h_i, q_i, :n_f], pidx[b_i, h_i, q_i, :n_p]], -1)  # [N, m]
            n = blocks.shape[0]
            hk_i = (h_i // grp)[:, None]
            kk = kb_[b_i[:, None], hk_i, blocks].reshape(n, m * bk, D)
            vv = vb_[b_i[:, None], hk_i, blocks].reshape(n, m * bk, Dv)
            qq = qb_[b_i, h_i, q_i]  # [N, bq, D]
            kpos = (blocks[..., None] * bk + ar_k).reshape(n, m * bk)  # plan positions of the keys
            mask = None
            if n_p and plan.rule is not None:
                qo = torch.gather(perm_h[h_i], 1, (q_i[:, None] * bq + ar_q).clamp(max=S - 1))  # [N, bq]
                ko = torch.gather(perm_h[h_i], 1, kpos[:, n_f * bk:].clamp(max=S - 1))  # [N, n_p * bk]
                part = plan.rule(h_i[:, None, None], qo[:, :, None], ko[:, None, :])
                mask = torch.cat([torch.ones(n, bq, n_f * bk, dtype=torch.bool, device=dev), part], -1)
            if ragged and bool((blocks == nkb - 1).any()):
                real = (kpos < S)[:, None, :]
                mask = real.expand(n, bq, m * bk) if mask is None else mask & real
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
            if mask is not None:
                o = torch.where(mask.any(-1, keepdim=True), o, torch.zeros((), dtype=cdt, device=dev))
            out[b_i, h_i, q_i] = o
            if return_lse:
                s = torch.einsum("nqd,nkd->nqk", qq, kk) * scale
                if mask is not None:
                    s = s.masked_fill(~mask, -math.inf)
                lse[b_i, h_i, q_i] = torch.logsumexp(s, -1).float()
    res = from_plan_order(out.view(B, H, nqb * bq, Dv)[:, :, :S], perm).transpose(1, 2).to(q.dtype)
    if return_lse:
        return res, from_plan_order(lse.view(B, H, nqb * bq)[:, :, :S].contiguous(), perm)
    return res
