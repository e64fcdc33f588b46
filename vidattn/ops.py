"""``torch.compile``-friendly entry point: sparse attention as one registered torch custom op.

Inside a compiled model the plan of a *static* pattern is looked up at trace time (it depends only
on the layout, which follows from tensor shapes) and baked into the graph as an integer id; the
attention itself is the custom op ``vidattn::sparse_attn`` with a fake (meta) implementation, so
dynamo and inductor see one opaque node and no graph break. Dynamic patterns (RectifiedSparse,
PermutedGrid) build their plan from Q/K values and go through the eager path.

Backward (for fine-tuning, e.g. swapped timm ViTs) recomputes the attention with the exact
reference backend under autograd (plus the plan's output epilogue, as ``run_plan`` applies it in
the forward; epilogue terms are constants of the plan).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .attention import apply_epilogue, backend_plan, check_qkv, run_plan
from .layout import TokenLayout
from .patterns.base import Pattern, pattern_by_key
from .plan import BlockPlan

__all__ = ["sparse_attention_op"]

@torch.library.custom_op("vidattn::sparse_attn", mutates_args=())
def _sparse_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_key: int, grid: List[int], prefix: int,
                 suffix: int, backend: str, scale: float) -> torch.Tensor:
    plan = _plan(pattern_key, grid, prefix, suffix, q.shape[2], q.device)
    # contiguous, as the fake implementation promises (backends may return a transposed view)
    return run_plan(q, k, v, plan, backend=backend, scale=scale).contiguous()


def _plan(pattern_key, grid, prefix, suffix, num_heads, device) -> BlockPlan:
    pattern = pattern_by_key(pattern_key)
    return pattern.plan(TokenLayout(tuple(grid), prefix, suffix), num_heads=num_heads, device=device)


@_sparse_attn.register_fake
def _sparse_attn_fake(q, k, v, pattern_key, grid, prefix, suffix, backend, scale):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _setup_context(ctx, inputs, output):
    q, k, v, pattern_key, grid, prefix, suffix, backend, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = (pattern_key, grid, prefix, suffix)
    ctx.scale = scale


def _backward(ctx, grad_out):
    from vidattn.kernels.reference import block_sparse_attention_reference

    q, k, v = ctx.saved_tensors
    plan = _plan(*ctx.args, q.shape[2], q.device)
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        # same computation as the forward's run_plan: sparse part, then the plan's output epilogue
        out = apply_epilogue(block_sparse_attention_reference(qq, kk, vv, backend_plan(plan), scale=ctx.scale), plan)
        gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), grad_out)
    return gq, gk, gv, None, None, None, None, None, None


_sparse_attn.register_autograd(_backward, setup_context=_setup_context)


def sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, layout: TokenLayout,
                        backend: str = "auto", scale: Optional[float] = None) -> torch.Tensor:
    """Same contract as :func:`vidattn.sparse_attention` (``[B, S, H, D]`` in and out), through
    the ``vidattn::sparse_attn`` custom op for static patterns, so it compiles without a graph
    break (the pattern travels as its integer key, the layout as ints; the cached plan is looked
    up inside the op) and supports autograd. Dynamic patterns fall back to
    :func:`vidattn.sparse_attention`."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if pattern.is_dynamic:
        from .attention import sparse_attention

        return sparse_attention(q, k, v, pattern, layout, backend=backend, scale=scale)
    if not torch.compiler.is_compiling():
        check_qkv(q, k, v, layout)
        pattern.validate(layout)
    return _sparse_attn(q, k, v, pattern._vidattn_key, list(layout.grid), layout.prefix, layout.suffix, backend, scale)
