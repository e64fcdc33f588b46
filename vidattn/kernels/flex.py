"""FlexAttention backend: a torch ``BlockMask`` built from a BlockPlan (same block layout).

On CUDA the flex kernel is ``torch.compile``d once per process; on CPU flex runs eagerly (a
debugging path that materializes scores: fine for tests, not for speed).
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Optional

import torch

from vidattn.errors import FlexUnsupported
from vidattn.plan import FULL, PARTIAL, BlockPlan
from vidattn.plan_order import expand_kv_heads, from_plan_order, to_plan_order


__all__ = ["block_sparse_attention_flex", "block_mask_from_plan", "flex_kernel_options", "FlexUnsupported"]


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cuda":
        return _compiled_flex()
    return flex_attention


def flex_kernel_options(plan: BlockPlan) -> Optional[dict]:
    """FlexAttention tile sizes that divide the plan's blocks (flex requires it): None (flex's own
    defaults, 128 x 64 on Hopper) for 128-token blocks, smaller tiles for smaller blocks."""
    if plan.block_q >= 128 and plan.block_k >= 128:
        return None
    return {"BLOCK_M": min(plan.block_q, 128), "BLOCK_N": min(plan.block_k, 64)}


_mask_cache: "weakref.WeakKeyDictionary[BlockPlan, object]" = weakref.WeakKeyDictionary()


def block_mask_from_plan(plan: BlockPlan, num_heads: int):
    """FlexAttention ``BlockMask`` executing ``plan`` in plan token order (cached per plan, so a
    compiled flex kernel is reused across calls instead of recompiling for a new mask_mod).

    The mask_mod maps plan positions back to original token indices through ``plan.perm`` and
    evaluates ``plan.rule`` only inside partial blocks (flex calls it only there).
    """
    bm = _mask_cache.get(plan)
    if bm is None:
        bm = _build_block_mask(plan)
        _mask_cache[plan] = bm
    return bm


def _build_block_mask(plan: BlockPlan):
    from torch.nn.attention.flex_attention import BlockMask

    S = plan.seq_len
    dev = plan.device
    rule = plan.rule
    if plan.perm is None:
        perm = torch.arange(S, device=dev)[None]
    else:
        perm = plan.perm.to(dev)
    hp = perm.shape[0]
    kperm = getattr(plan, "key_perm", plan.perm)  # keys may have their own order (kv_perm)
    kperm = perm if kperm is None else kperm.to(dev)
    khp = kperm.shape[0]
    # Eager (non-CUDA) flex evaluates mask_mod on every pair and ignores the BlockMask's block lists,
    # so there the mask_mod itself must skip unlisted blocks. Compiled (CUDA) flex only calls it
    # inside partial blocks, so the lookup is left out there (no extra gather in the kernel).
    eager = dev.type != "cuda"
    cls = plan.block_classes() if eager else None
    cbp, chp = (cls.shape[0], cls.shape[1]) if eager else (1, 1)
    if rule is not None and hasattr(rule, "warm"):  # rules with device lookup tables: build them before tracing
        rule.warm(dev)
    bq, bk = plan.block_q, plan.block_k

    def mask_mod(b, h, q_idx, kv_idx):
        hh = h if hp > 1 else torch.zeros_like(h)
        qo = perm[hh, q_idx.clamp(max=S - 1)]
        ko = kperm[h if khp > 1 else torch.zeros_like(h), kv_idx.clamp(max=S - 1)]
        ok = (q_idx < S) & (kv_idx < S)
        if not eager:
            return ok if rule is None else ok & rule(h, qo, ko)
        c = cls[b if cbp > 1 else torch.zeros_like(b), h if chp > 1 else torch.zeros_like(h),
                q_idx.clamp(max=S - 1) // bq, kv_idx.clamp(max=S - 1) // bk]
        if rule is None:
            return ok & (c > 0)
        return ok & ((c == FULL) | ((c == PARTIAL) & rule(h, qo, ko)))

    nkb = plan.num_k_blocks

    def padded(idx):  # flex's compiled kernels expect one index slot per key block
        idx = idx.to(dev, torch.int32)
        return torch.nn.functional.pad(idx, (0, nkb - idx.shape[-1])).contiguous()

    return BlockMask.from_kv_blocks(
        plan.kv_num_blocks.to(dev, torch.int32).contiguous(),
        padded(plan.kv_indices),
        plan.full_kv_num_blocks.to(dev, torch.int32).contiguous(),
        padded(plan.full_kv_indices),
        BLOCK_SIZE=(plan.block_q, plan.block_k),
        mask_mod=mask_mod,
        seq_lengths=(S, S),
    )


def block_sparse_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                                scale: Optional[float] = None, return_lse: bool = False):
    """Run a plan with FlexAttention.

    Args:
        q: ``[B, S, H, D]``; k, v: ``[B, S, Hk, D]`` (Hk divides H; expanded for flex).
        plan: a BlockPlan without fused rectification terms (``kept_log_scale`` / pooled columns).
            An output epilogue (``out_scale`` / ``out_shift``) is not this backend's job: it is
            ignored here and applied by ``vidattn.run_plan`` (which passes plans without it).
    Returns:
        ``[B, S, H, D]`` in q's dtype (and float32 lse ``[B, H, S]`` if ``return_lse``).
    Raises:
        FlexUnsupported: plans with fused rectification terms.
    """
    if plan.rectification is not None and plan.rectification.has_fused:
        raise FlexUnsupported("FlexAttention backend does not fuse rectification terms")
    B, S, H, D = q.shape
    qh = to_plan_order(q.transpose(1, 2), plan.perm)
    kperm = getattr(plan, "key_perm", plan.perm)
    kh = to_plan_order(expand_kv_heads(k.transpose(1, 2), H), kperm)
    vh = to_plan_order(expand_kv_heads(v.transpose(1, 2), H), kperm)
    if plan.device != q.device:
        plan = plan.to(q.device)
    bm = block_mask_from_plan(plan, H)
    fn = _flex_fn(q.device)
    scale = D ** -0.5 if scale is None else scale
    if q.device.type == "cpu" and q.dtype not in (torch.float32, torch.float64):
        qh, kh, vh = qh.float(), kh.float(), vh.float()  # eager CPU flex: half types computed in float32
    opts = flex_kernel_options(plan) if q.device.type == "cuda" else None
    # no exception is caught here: what this backend cannot run it declares up front
    # (vidattn.backends' can_run); an error raised by flex itself is a bug to see, not a fallback
    out, lse = fn(qh.contiguous(), kh.contiguous(), vh.contiguous(), block_mask=bm, scale=scale,
                  return_lse=True, kernel_options=opts)
    out = from_plan_order(out, plan.perm).transpose(1, 2).to(q.dtype)
    if return_lse:
        lse = from_plan_order(lse.float(), plan.perm)
        # flex reports lse in natural log; rows with no allowed key -> -inf
        return out, torch.where(torch.isfinite(lse), lse, torch.full_like(lse, -math.inf))
    return out
