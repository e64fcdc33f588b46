"""Differentiable Triton block-sparse attention: ``torch.autograd.Function`` around the fused
forward (:mod:`.sparse_flash_launch`, run with ``return_lse=True``; ``out`` and ``lse`` saved) and
the block-sparse backward (:mod:`.sparse_flash_bwd`, from the saved LSE: no recomputation of the
forward).

:func:`block_sparse_attention_triton_autograd` has the triton backend's signature and is what the
dispatcher runs for ``backend="triton"``: without a gradient to track it is the plain forward;
with one, the output has a ``grad_fn`` whose backward gives ``dq, dk, dv`` and, for fused
rectification (RectifiedSparse ``method="joint"``), the gradients of the plan's ``pooled_k``,
``pooled_v`` and ``pooled_log_weight`` tensors (so a plan whose pooled terms were built from
``q, k, v`` under autograd is differentiated through them). ``kept_log_scale`` is not
differentiated by the Triton backward: a plan whose ``kept_log_scale`` requires grad raises
``TritonUnsupported`` (the dispatcher then falls back to a backend that differentiates it).
The LSE output is differentiable too (its gradient enters ``delta``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from vidattn.errors import TritonUnsupported
from vidattn.plan import BlockPlan, Rectification

from .sparse_flash_bwd import block_sparse_attention_backward
from .sparse_flash_launch import block_sparse_attention_triton

__all__ = ["block_sparse_attention_triton_autograd", "SparseFlashAttention"]


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


class SparseFlashAttention(torch.autograd.Function):
    """``apply(q, k, v, pooled_k, pooled_v, pooled_log_weight, plan, scale)`` -> ``(out, lse)``.

    ``pooled_*`` are the plan's rectification tensors (or None); they are inputs here only so
    autograd can route their gradients. Shapes as in
    :func:`~.sparse_flash_launch.block_sparse_attention_triton`.
    """

    @staticmethod
    def forward(ctx, q, k, v, pk, pv, pw, plan: BlockPlan, scale: Optional[float]):
        rect = plan.rectification
        if rect is not None and rect.has_pooled:  # the same values, detached from the graph
            plan = replace(plan, rectification=Rectification(rect.kept_log_scale, pk.detach(), pv.detach(), pw.detach()))
        out, lse = block_sparse_attention_triton(q, k, v, plan, scale=scale, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        ctx.has_pooled = pk is not None
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dpooled = block_sparse_attention_backward(q, k, v, out, lse, dout.contiguous(), ctx.plan,
                                                              scale=ctx.scale, dlse=dlse)
        dpk = dpv = dpw = None
        if ctx.has_pooled and dpooled is not None:
            dpk, dpv, dpw = dpooled
        return dq, dk, dv, dpk, dpv, dpw, None, None


def block_sparse_attention_triton_autograd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                                           scale: Optional[float] = None, return_lse: bool = False):
    """The triton backend with autograd: same contract as
    :func:`~.sparse_flash_launch.block_sparse_attention_triton` (``q [B, S, H, D]``, ``k/v
    [B, S, Hk, D]`` -> ``[B, S, H, D]`` and optionally the float32 ``[B, H, S]`` LSE), differentiable
    in q, k, v (and the plan's pooled rectification tensors) when grad mode is on and any of them
    requires grad.

    Raises:
        TritonUnsupported: as the forward, and when the plan's ``kept_log_scale`` requires grad
            (not differentiated by the Triton backward).
    """
    rect = plan.rectification
    pooled = (rect.pooled_k, rect.pooled_v, rect.pooled_log_weight) if rect is not None and rect.has_pooled else (None,) * 3
    if not _needs_grad(q, k, v, *pooled, None if rect is None else rect.kept_log_scale):
        return block_sparse_attention_triton(q, k, v, plan, scale=scale, return_lse=return_lse)
    if rect is not None and rect.kept_log_scale is not None and rect.kept_log_scale.requires_grad:
        raise TritonUnsupported("the Triton backward does not differentiate kept_log_scale (it requires grad here)")
    out, lse = SparseFlashAttention.apply(q, k, v, *pooled, plan, scale)
    return (out, lse) if return_lse else out
