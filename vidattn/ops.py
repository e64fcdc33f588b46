"""``torch.compile``-friendly entry point: sparse attention as one registered torch custom op.

Inside a compiled model the plan of a *static* pattern is looked up at trace time (it depends only
on the layout, which follows from tensor shapes) and baked into the graph as an integer id; the
attention itself is the custom op ``vidattn::sparse_attn`` with a fake (meta) implementation, so
dynamo and inductor see one opaque node and no graph break. Dynamic patterns (RectifiedSparse,
PermutedGrid) build their plan from Q/K values and go through the eager path.

The op returns the output and its float32 LSE ``[B, H, S]`` (saved for backward; the public
wrapper returns the output only). Backward is registered with ``register_autograd``: when the
backend is ``"triton"`` (or ``"auto"`` on CUDA) it runs the Triton block-sparse backward
(:mod:`vidattn.kernels.sparse_flash_bwd`) from the saved output and LSE, with no recomputation
of the forward, so a compiled model has no graph break in forward or backward; otherwise (CPU
reference / flex, or a case the Triton kernels refuse) it recomputes the attention with the exact
reference backend under autograd (plus the plan's output epilogue, as ``run_plan`` applies it).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .attention import apply_epilogue, backend_plan, check_qkv, run_plan
from .layout import TokenLayout
from .patterns.base import Pattern, pattern_by_key
from .plan import BlockPlan

__all__ = ["sparse_attention_op"]

@torch.library.custom_op("vidattn::sparse_attn", mutates_args=())
def _sparse_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_key: int, grid: List[int], prefix: int,
                 suffix: int, backend: str, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    plan = _plan(pattern_key, grid, prefix, suffix, q.shape[2], q.device)
    out, lse = run_plan(q, k, v, plan, backend=backend, scale=scale, return_lse=True)
    # contiguous, as the fake implementation promises (backends may return a transposed view)
    return out.contiguous(), lse.contiguous()


def _plan(pattern_key, grid, prefix, suffix, num_heads, device) -> BlockPlan:
    pattern = pattern_by_key(pattern_key)
    return pattern.plan(TokenLayout(tuple(grid), prefix, suffix), num_heads=num_heads, device=device)


@_sparse_attn.register_fake
def _sparse_attn_fake(q, k, v, pattern_key, grid, prefix, suffix, backend, scale):
    B, S, H, _ = q.shape
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty((B, H, S), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, pattern_key, grid, prefix, suffix, backend, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (pattern_key, grid, prefix, suffix)
    ctx.backend = backend
    ctx.scale = scale


def _reference_grads(q, k, v, grad_out, grad_lse, plan, scale):
    """dq, dk, dv by recomputing the attention with the exact reference backend (``torch.func.vjp``,
    which works inside a custom op's implementation) plus the plan's output epilogue."""
    from vidattn.kernels.reference import block_sparse_attention_reference

    def f(qq, kk, vv):
        o, l = block_sparse_attention_reference(qq, kk, vv, backend_plan(plan), scale=scale, return_lse=True)
        return apply_epilogue(o, plan), torch.where(torch.isfinite(l), l, torch.zeros_like(l))

    (_, lse), vjp = torch.func.vjp(f, q, k, v)
    gl = torch.zeros_like(lse) if grad_lse is None else torch.where(torch.isfinite(grad_lse), grad_lse, 0.0)
    return vjp((grad_out.to(q.dtype), gl))


@torch.library.custom_op("vidattn::sparse_attn_bwd", mutates_args=())
def _sparse_attn_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], pattern_key: int, grid: List[int],
                     prefix: int, suffix: int, backend: str, scale: float
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``vidattn::sparse_attn`` as its own opaque op (no graph break under compile):
    the Triton backward from the saved ``out`` / ``lse`` when the backend is triton (or auto on
    CUDA) and the kernels run the case; else the exact reference recomputation."""
    from vidattn.errors import BackendUnsupported

    plan = _plan(pattern_key, grid, prefix, suffix, q.shape[2], q.device)
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" else "reference"
    if backend == "triton" and plan.rectification is None:
        try:
            from vidattn.kernels.sparse_flash_bwd import block_sparse_attention_backward

            dq, dk, dv, _ = block_sparse_attention_backward(q, k, v, out, lse, grad_out.contiguous(), plan,
                                                            scale=scale, dlse=grad_lse)
            return dq.contiguous(), dk.contiguous(), dv.contiguous()
        except (ImportError, BackendUnsupported):
            pass
    dq, dk, dv = _reference_grads(q, k, v, grad_out, grad_lse, plan, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_sparse_attn_bwd.register_fake
def _sparse_attn_bwd_fake(q, k, v, out, lse, grad_out, grad_lse, pattern_key, grid, prefix, suffix, backend, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))  # contiguous, as the implementation returns


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    pattern_key, grid, prefix, suffix = ctx.args
    gq, gk, gv = _sparse_attn_bwd(q, k, v, out, lse, grad_out, grad_lse, pattern_key, grid, prefix, suffix,
                                  ctx.backend, ctx.scale)
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
    out, _lse = _sparse_attn(q, k, v, pattern._vidattn_key, list(layout.grid), layout.prefix, layout.suffix, backend,
                             scale)
    return out
