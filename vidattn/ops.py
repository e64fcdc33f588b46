"""``torch.compile``-friendly entry point: sparse attention as one registered torch custom op.

Inside a compiled model the plan of a *static* pattern is looked up at trace time (it depends only
on the layout, which follows from tensor shapes) and baked into the graph as an integer id; the
attention itself is the custom op ``vidattn::sparse_attn`` with a fake (meta) implementation, so
dynamo and inductor see one opaque node and no graph break. Dynamic patterns (RectifiedSparse,
PermutedGrid) build their plan from Q/K values and go through the eager path.

Backward (for fine-tuning, e.g. swapped timm ViTs) recomputes the attention with the exact
reference backend under autograd.
"""

from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

import torch

from .attention import check_qkv, run_plan
from .layout import TokenLayout
from .patterns.base import Pattern
from .plan import BlockPlan

__all__ = ["sparse_attention_op", "register_plan", "registered_plan"]

_lock = threading.Lock()
_plans: Dict[int, Tuple[BlockPlan, str]] = {}
_ids: Dict[tuple, int] = {}


def register_plan(plan: BlockPlan, backend: str = "auto") -> int:
    """Keep ``plan`` alive under an integer id usable inside compiled graphs."""
    key = (id(plan), backend)
    with _lock:
        pid = _ids.get(key)
        if pid is None:
            pid = len(_plans) + 1
            _plans[pid] = (plan, backend)
            _ids[key] = pid
    return pid


def registered_plan(plan_id: int) -> Tuple[BlockPlan, str]:
    """The (plan, backend) stored under ``plan_id``."""
    return _plans[plan_id]


@torch.library.custom_op("vidattn::sparse_attn", mutates_args=())
def _sparse_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan_id: int, scale: float) -> torch.Tensor:
    plan, backend = _plans[plan_id]
    return run_plan(q, k, v, plan, backend=backend, scale=scale)


@_sparse_attn.register_fake
def _sparse_attn_fake(q, k, v, plan_id, scale):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _setup_context(ctx, inputs, output):
    q, k, v, plan_id, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.plan_id, ctx.scale = plan_id, scale


def _backward(ctx, grad_out):
    from vidattn.kernels.reference import block_sparse_attention_reference

    q, k, v = ctx.saved_tensors
    plan, _ = _plans[ctx.plan_id]
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = block_sparse_attention_reference(qq, kk, vv, plan, scale=ctx.scale)
        gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), grad_out)
    return gq, gk, gv, None, None


_sparse_attn.register_autograd(_backward, setup_context=_setup_context)


def _plan_id(pattern: Pattern, layout: TokenLayout, num_heads: int, device: str, backend: str) -> int:
    plan = pattern.plan(layout, num_heads=num_heads, device=torch.device(device))
    return register_plan(plan, backend)


_plan_id_const = torch._dynamo.assume_constant_result(_plan_id)


def sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, layout: TokenLayout,
                        backend: str = "auto", scale: Optional[float] = None) -> torch.Tensor:
    """Same contract as :func:`vidattn.sparse_attention` (``[B, S, H, D]`` in and out), through
    the ``vidattn::sparse_attn`` custom op for static patterns, so it compiles without a graph
    break and supports autograd. Dynamic patterns fall back to :func:`vidattn.sparse_attention`."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if pattern.is_dynamic:
        from .attention import sparse_attention

        return sparse_attention(q, k, v, pattern, layout, backend=backend, scale=scale)
    if not torch.compiler.is_compiling():
        check_qkv(q, k, v, layout)
        pattern.validate(layout)
    pid = _plan_id_const(pattern, layout, q.shape[2], str(q.device), backend)
    return _sparse_attn(q, k, v, pid, scale)
