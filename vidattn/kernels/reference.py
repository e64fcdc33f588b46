"""Pure-PyTorch reference executor of a BlockPlan: the ground truth the kernels are tested against.

Exact (fp32 accumulation, true softmax over the allowed keys only), chunked over query blocks so
memory is ``O(B * heads * block_q * keys_visited)``, never ``S x S``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from vidattn.plan import BlockPlan
from vidattn.plan_order import expand_kv_heads, from_plan_order, to_plan_order

__all__ = ["block_sparse_attention_reference", "to_plan_order", "from_plan_order", "expand_kv_heads"]


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                                     scale: Optional[float] = None, return_lse: bool = False):
    """Run a plan exactly.

    Args:
        q: ``[B, S, H, D]``; k, v: ``[B, S, Hk, D]`` with Hk dividing H. float16/bfloat16/float32
            (computed in float32) or float64 (computed in float64).
        plan: the BlockPlan (Bp in {1, B}, Hp in {1, H}). Fused rectification terms are executed;
            an output epilogue (``out_scale`` / ``out_shift``) is ignored here (``vidattn.run_plan``
            applies it after every backend).
        scale: softmax scale (default ``D ** -0.5``).
        return_lse: also return the natural-log sum-exp of the scaled logits, float32 ``[B, H, S]``
            (``-inf`` for a query with no allowed key, whose output is 0).
    Returns:
        ``[B, S, H, D]`` in q's dtype (and the lse if asked).
    """
    B, S, H, D = q.shape
    Dv = v.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    dev = q.device
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32  # float64 stays float64
    qh = to_plan_order(q.transpose(1, 2).to(cdt), plan.perm)
    kperm_plan = plan.key_perm  # keys may have their own order (kv_perm)
    kh = to_plan_order(expand_kv_heads(k.transpose(1, 2), H).to(cdt), kperm_plan)
    vh = to_plan_order(expand_kv_heads(v.transpose(1, 2), H).to(cdt), kperm_plan)
    bq, bk = plan.block_q, plan.block_k
    nqb, nkb = plan.num_q_blocks, plan.num_k_blocks
    perm = plan.perm.to(dev) if plan.perm is not None else torch.arange(S, device=dev)[None]
    rect = plan.rectification
    out = torch.zeros(B, H, S, Dv, dtype=cdt, device=dev)
    lse = torch.full((B, H, S), -math.inf, dtype=torch.float32, device=dev)

    def bh(t):  # broadcast plan tensor [Bp, Hp, ...] to [B, H, ...]
        return t.to(dev).expand(B, H, *t.shape[2:])

    num_p, idx_p = bh(plan.kv_num_blocks).long(), bh(plan.kv_indices).long()
    num_f, idx_f = bh(plan.full_kv_num_blocks).long(), bh(plan.full_kv_indices).long()
    heads = torch.arange(H, device=dev)
    perm_h = perm.expand(H, S) if perm.shape[0] == 1 else perm
    kperm = kperm_plan.to(dev) if kperm_plan is not None else torch.arange(S, device=dev)[None]
    kperm_h = kperm.expand(H, S) if kperm.shape[0] == 1 else kperm
    ar_k = torch.arange(bk, device=dev)
    for i in range(nqb):
        q0, q1 = i * bq, min(S, (i + 1) * bq)
        qi = qh[:, :, q0:q1]  # [B, H, nq, D]
        # key blocks of this query block: full first, then partial
        blocks = torch.cat([idx_f[:, :, i], idx_p[:, :, i]], dim=-1)  # [B, H, M]
        M = blocks.shape[-1]
        mf = idx_f.shape[-1]
        slot = torch.arange(M, device=dev)
        is_full = slot < mf
        valid = torch.where(is_full, slot < num_f[:, :, i, None], (slot - mf) < num_p[:, :, i, None])  # [B,H,M]
        pos = blocks[..., None] * bk + ar_k  # [B, H, M, bk]
        tok_valid = valid[..., None] & (pos < S)
        pos = pos.clamp(max=S - 1).flatten(2)  # [B, H, M*bk]
        kk = torch.gather(kh, 2, pos[..., None].expand(-1, -1, -1, D))
        vv = torch.gather(vh, 2, pos[..., None].expand(-1, -1, -1, Dv))
        s = torch.einsum("bhqd,bhkd->bhqk", qi, kk) * scale  # [B, H, nq, M*bk]
        allowed = tok_valid.flatten(2)[:, :, None, :].expand(-1, -1, q1 - q0, -1)
        part = (~is_full)[None, None, :, None].expand(B, H, M, bk).flatten(2)
        if plan.rule is not None and bool(part.any()):
            q_orig = perm_h[:, q0:q1]  # [H, nq]
            k_orig = torch.gather(kperm_h[None].expand(B, H, S), 2, pos)  # [B, H, M*bk]
            r = plan.rule(heads[None, :, None, None], q_orig[None, :, :, None], k_orig[:, :, None, :])
            allowed = allowed & (r | ~part[:, :, None, :])
        if rect is not None and rect.kept_log_scale is not None:
            kls = bh(rect.kept_log_scale)[:, :, i]  # [B, H, NKB]
            s = s + torch.gather(kls, 2, blocks)[..., None].expand(-1, -1, -1, bk).flatten(2)[:, :, None, :]
        s = s.masked_fill(~allowed, -math.inf)
        vals = vv
        if rect is not None and rect.has_pooled:
            pk = bh(rect.pooled_k).to(cdt)  # [B, H, NKB, D]
            pv = bh(rect.pooled_v).to(cdt)
            pw = bh(rect.pooled_log_weight)[:, :, i].to(cdt)  # [B, H, NKB]
            sp = torch.einsum("bhqd,bhkd->bhqk", qi, pk) * scale + pw[:, :, None, :]
            s = torch.cat([s, sp], dim=-1)
            vals = torch.cat([vv, pv], dim=2)
        m = s.amax(-1, keepdim=True)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m_safe)
        denom = p.sum(-1, keepdim=True)
        o = torch.einsum("bhqk,bhkd->bhqd", p, vals) / denom.clamp_min(1e-30)
        out[:, :, q0:q1] = torch.where(denom > 0, o, torch.zeros_like(o))
        lse[:, :, q0:q1] = torch.where(denom[..., 0] > 0, (m_safe + denom.log())[..., 0],
                                       torch.full_like(denom[..., 0], -math.inf))
    out = from_plan_order(out, plan.perm)
    result = out.transpose(1, 2).to(q.dtype)
    if return_lse:
        return result, from_plan_order(lse, plan.perm)
    return result
