"""Inputs of the forward kernels' launchers (the portable Triton kernel and the Hopper Gluon one):
input checks, K/V in the order and layout the kernels read, 2-D tensor descriptors over K/V, and
the diagnostics dict of the latest launch. Host code only; no device code.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # host-side tensor descriptors (TMA bulk copies on Hopper; emulated by the interpreter)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

from vidattn.errors import TritonUnsupported
from vidattn.plan import BlockPlan
from vidattn.plan_order import expand_kv_heads, to_plan_order
from vidattn.rules import NeighborhoodForm

from .quant_fp8 import FP8Operands, precision_parts, quantize_operands

__all__ = ["TensorDescriptor", "last_launch", "interpreting", "capability_major", "plan_bh_strides",
           "kv_in_plan_order", "quantize_plan_operands", "prepare_call", "check_triton_inputs", "kv_view",
           "kv_descriptor", "vt_view"]

# diagnostics of the latest forward launch: "path" ("gluon-hopper" / "portable"), "gluon_refused"
# (why the Gluon kernel did not run), "regs_spills" = (registers per thread, spills)
last_launch: dict = {}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def capability_major(device: torch.device) -> int:
    """Major CUDA compute capability of ``device`` (the current device when it has no index)."""
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def plan_bh_strides(t: torch.Tensor):
    """Strides of a plan tensor ``[Bp, Hp, ...]`` broadcast over batch and heads (0 on size-1 dims)."""
    return (0 if t.shape[0] == 1 else t.stride(0)), (0 if t.shape[1] == 1 else t.stride(1))


def _bsh_strides(t: torch.Tensor):
    """(batch, head, token) strides of a ``[B, S, H, D]`` tensor."""
    return t.stride(0), t.stride(2), t.stride(1)


def _bhs_strides(t: torch.Tensor):
    """(batch, head, token) strides of a ``[B, H, S, D]`` tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def kv_in_plan_order(k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, heads: int):
    """K and V as the kernels read them: in place (``[B, S, Hk, D]``, unit last stride) when the
    plan has no key permutation, else gathered once into plan order, head-major and contiguous
    (``[B, Hk', S, D]``; per-head permutations expand grouped K/V heads to ``heads``), so key tiles
    stay contiguous for tensor-descriptor loads.

    Returns:
        ``(k_t, v_t, bhs)``: the two tensors and the function giving a tensor's (batch, head,
        token) strides.
    """
    kperm = plan.key_perm
    if kperm is None:
        kh, vh = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
        return kh, vh, _bsh_strides
    if kperm.shape[0] > 1 and k.shape[2] != heads:
        k, v = (expand_kv_heads(t.transpose(1, 2), heads).transpose(1, 2) for t in (k, v))
    kh = to_plan_order(k.transpose(1, 2), kperm).contiguous()
    vh = to_plan_order(v.transpose(1, 2), kperm).contiguous()
    return kh, vh, _bhs_strides


def quantize_plan_operands(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, plan: BlockPlan,
                           precision: str, v_key_order: bool = True, with_q: bool = True) -> FP8Operands:
    """The quantisation prologue (:func:`.quant_fp8.quantize_operands`) of a quantised
    ``precision`` on ``q`` ``[B, S, H, D]`` and on K / V as :func:`kv_in_plan_order` returned
    them (``[B, S, Hk, D]`` in place, or ``[B, Hk', S, D]`` in plan order); V is read only for an
    8-bit P.V, its V^T tokens in the P8 key order with ``v_key_order`` (key tiles of at least
    :data:`.quant_fp8.P8_MIN_TILE`); Q only ``with_q`` (else the kernel quantises it)."""
    _, pv8 = precision_parts(precision)

    def as_bhsd(t):
        return t if plan.key_perm is not None else t.transpose(1, 2)

    return quantize_operands(q, as_bhsd(kh), as_bhsd(vh) if pv8 else None, plan.block_k, precision,
                             v_key_order=v_key_order, with_q=with_q)


def prepare_call(q, k, v, plan, scale):
    """The shared start of a kernel call (forward and backward): :func:`check_triton_inputs`, the
    default softmax scale ``D ** -0.5`` and the plan on q's device. Returns ``(plan, scale)``."""
    check_triton_inputs(q, k, v, plan)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return (plan.to(q.device) if plan.device != q.device else plan), scale


def check_triton_inputs(q, k, v, plan) -> None:
    """Raise :class:`TritonUnsupported` for a case the kernel does not handle (device, dtype, head
    dim, block sizes, rule rank); ``ValueError`` when the plan does not fit the tensors' length."""
    if q.shape[1] != plan.seq_len or k.shape[1] != plan.seq_len or v.shape[1] != plan.seq_len:
        raise ValueError(f"plan was built for {plan.seq_len} tokens but q/k/v have "
                         f"{q.shape[1]}/{k.shape[1]}/{v.shape[1]}")
    if q.device.type != "cuda" and not interpreting():
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
    form = plan.rule.kernel_form() if plan.rule is not None else None
    if isinstance(form, NeighborhoodForm) and len(form.grid) > 3:
        raise TritonUnsupported("neighborhood rules of rank > 3")


def kv_view(t: torch.Tensor, strides_bhs, batch: int, kv_heads: int, seq_len: int):
    """The 2-D view of K or V that tensor-descriptor tile loads use, or None when the layout does
    not allow one.

    ``t`` holds ``[B, S, Hk, D]`` (or ``[B, Hk, S, D]``) with unit last stride; ``strides_bhs`` its
    (batch, head, token) strides. Two layouts map to rows of one 2-D view so that a tile of key
    tokens ``col0 .. col0 + block_n`` of (batch b, head h) is the box at
    ``(b * row_b + h * row_h + col0, h * col_h)``: token-major (``[B, S, Hk, D]``: rows are (b, s),
    heads are column offsets) and head-major (``[B, Hk, S, D]``: rows are (b, h, s)). In both,
    rows past a sequence's end belong to the next sequence of the same tensor (finite values the
    kernel masks out) or lie past the view and are zero-filled.

    Returns:
        ``(rows, cols, row_stride, row_b, row_h, col_h)`` (the view is ``[rows, cols]`` with strides
        ``[row_stride, 1]``) or None.
    """
    sb, sh, ss = strides_bhs
    B, Hk, D = batch, kv_heads, t.shape[-1]
    es = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16 or (ss * es) % 16:
        return None
    if (sb == seq_len * ss or B == 1) and sh * (Hk - 1) + D <= ss:  # token-major
        row_b, row_h, col_h = seq_len, 0, sh
        rows, cols = B * seq_len, ss
    elif ss == D and (sh == seq_len * D or Hk == 1) and (sb == Hk * seq_len * D or B == 1):  # head-major
        row_b, row_h, col_h = Hk * seq_len, seq_len, 0
        rows, cols = B * Hk * seq_len, D
    else:
        return None
    return rows, cols, ss, row_b, row_h, col_h


def kv_descriptor(t: torch.Tensor, strides_bhs, batch: int, kv_heads: int, seq_len: int, block_n: int):
    """A 2-D tensor descriptor over K or V (:func:`kv_view`) with ``[block_n, D]`` boxes, or None.

    Returns:
        ``(descriptor, row_b, row_h, col_h)`` or None.
    """
    view = kv_view(t, strides_bhs, batch, kv_heads, seq_len)
    if view is None:
        return None
    rows, cols, ss, row_b, row_h, col_h = view
    desc = TensorDescriptor(t, shape=[rows, cols], strides=[ss, 1], block_shape=[block_n, t.shape[-1]])
    return desc, row_b, row_h, col_h


def vt_view(vt: torch.Tensor):
    """The 2-D view of a quantised V^T (e4m3 ``[B, Hk, D, S_pad]``, tokens contiguous) that
    tensor-descriptor tile loads use: rows are (batch, kv head, channel), columns tokens, so the
    ``[D, block_n]`` tile of tokens ``col0 .. col0 + block_n`` of (batch b, head h) is the box at
    ``(b * row_b + h * row_h, col0)``.

    Returns:
        ``(rows, cols, row_stride, row_b, row_h, col_h)`` as :func:`kv_view` (``col_h`` 0).
    """
    B, Hk, D, s_pad = vt.shape
    return B * Hk * D, s_pad, s_pad, Hk * D, D, 0
