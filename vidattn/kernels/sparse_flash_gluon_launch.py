"""Launcher of the Hopper Gluon kernel (:mod:`.sparse_flash_gluon`): when it can run, its launch.

The triton backend's entry point (:func:`.sparse_flash_launch.block_sparse_attention_triton`)
asks :func:`gluon_refusal` first and runs this path when it returns None; every other case (and
every GPU that is not sm_90, the interpreter, CI) runs the portable kernel. ``VIDATTN_GLUON``:
``auto`` (default) takes the Gluon path whenever it can run, ``0`` never, ``1`` always (a case it
cannot run then raises :class:`vidattn.errors.TritonUnsupported` with the reason, for benchmarks
that must not measure the portable kernel by mistake).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton

from vidattn.errors import TritonUnsupported
from vidattn.plan import BlockPlan

from .quant_fp8 import (FP8_DTYPE, PRECISIONS, int8_logits_by_bits, lse_smoothing_correction, precision_parts,
                        q_in_kernel)
from .sparse_flash_io import (_bhs_strides, _bsh_strides, capability_major, interpreting, kv_in_plan_order, kv_view,
                              last_launch, plan_bh_strides, prepare_call, quantize_plan_operands, vt_view)
from .sparse_flash_kernel import LOG2E
from .sparse_flash_tables import RuleMode, plan_launch_tables, plan_perm_int32

__all__ = ["gluon_mode", "gluon_available", "gluon_refusal", "gluon_config", "block_sparse_attention_gluon"]

_SMEM_BYTES = 227 * 1024  # per-block opt-in shared memory of an H100 / H200
_ROWS = 128  # query rows per work item: two consumer warpgroups of 64


def gluon_mode() -> str:
    """``VIDATTN_GLUON``: ``"auto"`` (default), ``"0"`` or ``"1"``; anything else is a ValueError."""
    mode = os.environ.get("VIDATTN_GLUON", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"VIDATTN_GLUON must be auto, 0 or 1, got {mode!r}")
    return mode


@functools.lru_cache(maxsize=None)
def gluon_available() -> Optional[str]:
    """None when this Triton has Gluon's Hopper module and the kernel module imports, else why not."""
    try:
        from . import sparse_flash_gluon  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except Exception as e:  # ImportError, or an API this module does not know (another triton)
        return f"triton {triton.__version__} has no usable Gluon Hopper module ({type(e).__name__}: {e})"[:300]
    return None


def gluon_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                  precision: Optional[str] = None) -> Optional[str]:
    """Why the Gluon Hopper kernel cannot run this case, or None when it can.

    It runs: CUDA compute capability 9.x (Hopper), not under ``TRITON_INTERPRET``; q/k/v bf16 or
    fp16 ``[B, S, H|Hk, D]`` with D 64 or 128; ``precision`` None (the inputs' dtype) or a
    quantised one of :data:`.quant_fp8.PRECISIONS` (``"fp8"``, ``"int8"``, ``"int8_fp8"``); a plan
    of 64- or 128-token query and key blocks, no rectification, and partial blocks (if any) whose
    token masks fit ``VIDATTN_MASK_BUDGET_BYTES`` (they are then read as precomputed uint8 masks).
    Shapes are assumed checked by :func:`.sparse_flash_io.check_triton_inputs`.
    """
    if precision not in PRECISIONS:
        return f"precision={precision!r} (the Gluon kernel takes {PRECISIONS})"
    qk, pv8 = precision_parts(precision)
    if (qk == "e4m3" or pv8) and FP8_DTYPE is None:
        return f"torch {torch.__version__} has no float8_e4m3fn"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (the Gluon kernel takes bf16 / fp16)"
    if q.shape[-1] not in (64, 128):
        return f"head dim {q.shape[-1]} (the Gluon kernel takes 64 or 128)"
    if plan.block_q not in (64, 128) or plan.block_k not in (64, 128):
        return f"plan blocks {plan.block_q}x{plan.block_k} (the Gluon kernel takes 64 or 128 x 64 or 128)"
    if plan.has_partial:
        if plan.rule is None:
            return "the plan lists partial blocks without a token rule"
        try:
            mode = plan_launch_tables(plan)["rule_mode"]
        except TritonUnsupported as e:
            return str(e)
        if mode != RuleMode.BLOCK_MASKS:
            return ("the plan's partial-block masks exceed VIDATTN_MASK_BUDGET_BYTES (the Gluon kernel reads "
                    "precomputed masks; the portable kernel evaluates the rule in-kernel)")
    if plan.rectification is not None:
        return "rectification terms run on the portable kernel"
    if gluon_config(plan.block_q, plan.block_k, q.shape[-1], precision)["STAGES"] < 2:
        return (f"plan blocks {plan.block_q}x{plan.block_k} at head dim {q.shape[-1]}: two K/V rings of two "
                "stages do not fit in shared memory")
    if plan.key_perm is None:  # K/V read in place (not re-laid by a quantisation prologue): strides must fit TMA
        B, S, Hk = k.shape[0], k.shape[1], k.shape[2]
        for name, t in (("k", k), ("v", v)):
            in_place = precision is None or (name == "v" and not pv8)
            if in_place and t.stride(-1) == 1 and kv_view(t, _bsh_strides(t), B, Hk, S) is None:
                return f"{name} strides {tuple(t.stride())} do not allow a TMA tensor descriptor"
    if interpreting():
        return "the Gluon kernel does not run under TRITON_INTERPRET"
    if q.device.type != "cuda":
        return "the Gluon kernel needs a CUDA device"
    major = capability_major(q.device)
    if major != 9:
        return f"the Gluon kernel is Hopper-only (compute capability 9.x), this GPU is {major}.x"
    return gluon_available()


def gluon_config(block_q: int, block_k: int, head_dim: int, precision: Optional[str] = None) -> dict:
    """Launch settings: ``SPLIT`` (64-token plan query blocks: each consumer warpgroup follows its
    own block's key list through its own ring), ``STAGES`` (depth of each ring: as many as fit next
    to Q and the layout-conversion scratch, 2 to 4; ``VIDATTN_GLUON_STAGES`` overrides),
    ``PINGPONG`` (the consumer warpgroups alternate issuing their MMAs, so one's softmax runs
    under the other's; shared lists only; opt-in, ``VIDATTN_GLUON_PINGPONG=1``: on the H200 it was within noise of
    off at densities <= 0.5 and 7% slower on the dense HunyuanVideo plan),
    ``PV_SPLIT_ACC`` (8-bit P.V: each tile's P.V is added to the output in fp32 registers instead
    of accumulating in the MMA; opt-in, ``VIDATTN_GLUON_PV_SPLIT_ACC=1``: on the H200, session 11, it was 5-13%
    slower for ``"fp8"`` on full-block plans (1% on a strided neighborhood) and 2-10% for
    ``"int8_fp8"`` (1.5% faster on the strided neighborhood), and no more accurate: 5.34% vs 5.37% relative L2 from the bf16 kernel, the portable kernel's 5.37%),
    ``Q_QUANT`` (quantised precisions: Q is read in 16 bits and quantised per token by the kernel
    itself, the prologue's arithmetic, instead of by the prologue; ``VIDATTN_Q_IN_KERNEL=0``
    turns it off, :func:`.quant_fp8.q_in_kernel`), ``EXP_POLY`` (half of each tile's softmax exponentials on the FMA pipe by a
    polynomial instead of the MUFU; opt-in, ``VIDATTN_GLUON_EXP_POLY=1``; plans without partial
    blocks only; on the H200, session 13, 8-12% slower for fp8 and int8: the softmax is bound by
    instruction issue, not by the MUFU), ``RESCALE_TAU`` (:func:`rescale_tau`), ``CONSUMER_REGS`` / ``PRODUCER_REGS`` (registers per thread of the consumer
    warpgroups / the load warp). ``STAGES`` < 2 means the case does not fit (:func:`gluon_refusal` says so).
    ``precision``: the operands' sizes (1 byte for 8-bit Q / K / V)."""
    qk, pv8 = precision_parts(precision)
    q_b, k_b, v_b = (1 if qk else 2), (1 if qk else 2), (1 if pv8 else 2)
    split = block_q == 64
    rowsum = rowsum_by_mma(precision)
    stage = block_k * head_dim * (k_b + v_b) * (2 if split else 1)
    q_bytes = _ROWS * head_dim * q_b
    ones_bytes = 2 * 8 * (block_k if rowsum else 8) * v_b  # each consumer warpgroup's B operand of ones
    scratch = 24 * 1024
    stages = min(4, (_SMEM_BYTES - q_bytes - ones_bytes - scratch) // stage)  # < 2: does not fit (gluon_refusal)
    forced = os.environ.get("VIDATTN_GLUON_STAGES")
    if forced:
        stages = int(forced)
    # PINGPONG: the two consumer warpgroups take turns issuing their MMAs (one list: not with SPLIT)
    pingpong = not split and os.environ.get("VIDATTN_GLUON_PINGPONG", "0") == "1"
    split_acc = os.environ.get("VIDATTN_GLUON_PV_SPLIT_ACC", "0") == "1"
    q_quant = qk is not None and q_in_kernel("gluon")
    exp_poly = os.environ.get("VIDATTN_GLUON_EXP_POLY", "0") == "1"
    return dict(SPLIT=split, PINGPONG=pingpong, STAGES=stages, PV_SPLIT_ACC=split_acc, Q_QUANT=q_quant,
                EXP_POLY=exp_poly, RESCALE_TAU=rescale_tau(pv8), ROWSUM_MMA=rowsum, CONSUMER_REGS=240,
                PRODUCER_REGS=24)


def rowsum_by_mma(precision: Optional[str] = None) -> bool:
    """``ROWSUM_MMA`` of the Gluon kernel for ``precision``: the softmax's row sums come from a
    second wgmma of the P operand against a tile of ones (N = 8), issued with each P.V, instead of
    ~70 adds and shuffles per thread and key tile (key loop, SASS instructions per tile and warp:
    bf16 454 -> 424, int8 523 -> 463; ``benchmarks/gluon_build.py --rowsum-mma``). The sums are
    then of P as it enters the P.V (rounded to 16 bits), the numerator's own values.

    Opt-in, ``VIDATTN_GLUON_ROWSUM_MMA=1`` (0 or unset: off; anything else is a ValueError), and
    only with a 16-bit P.V: with an e4m3 P (``"fp8"``, ``"int8_fp8"``) the N = 8 e4m3 MMA gave
    wrong sums on the H100 (relative difference 1.06-1,740 from the portable kernel; not
    understood), and that build was 9-16% slower anyway. Measured on the H100 (session 15,
    ``gluon_ab.py``, same runs): bf16 -7 to -29%; int8, Wan dense / 0.5 / 0.25 / 0.125 / 0.0625
    +1.7 / -2.3 / -1.8 / -4.5 / -1.8%, HunyuanVideo +5.5 / +3.1 / +2.9 / +5.7 / -3.4%. In the SASS
    the P.V's wait still lands right after the row max (ptxas reuses the in-flight P operand's
    registers for the max's temporaries), so fewer softmax instructions do not buy overlap."""
    mode = os.environ.get("VIDATTN_GLUON_ROWSUM_MMA", "0").strip()
    if mode not in ("0", "1"):
        raise ValueError(f"VIDATTN_GLUON_ROWSUM_MMA must be 0 or 1, got {mode!r}")
    return mode == "1" and not precision_parts(precision)[1]


# lazy rescale thresholds (base-2 logit units): a 16-bit P may grow to 2 ** 8 (FlashAttention-4's
# choice); an e4m3 P to 2 (its scale 448 becomes 224: the same relative precision, one binade less
# above the subnormals)
LAZY_TAU_16BIT = 8.0
LAZY_TAU_E4M3 = 1.0


def rescale_tau(pv8: bool) -> float:
    """``RESCALE_TAU`` of the Gluon kernel: with ``VIDATTN_GLUON_LAZY_RESCALE=1`` each query row
    keeps its running max until a key tile raises it by more than the threshold (``LAZY_TAU_E4M3``
    for an 8-bit P.V, else ``LAZY_TAU_16BIT``), and a consumer warpgroup rescales its output
    accumulator only after a tile that changed one of its rows' max (the result is the same up to
    rounding); ``0`` (default): every tile rescales (-1.0); anything else is a ValueError. Opt-in:
    on the H200 (session 14, ``gluon_ab.py``, Wan / HunyuanVideo, dense and densities 0.25 and
    0.0625) it was 9-18% slower for bf16, 1-4% slower for fp8 and -3% to +2% for int8: the
    warpgroup-wide vote goes through shared memory with barriers every tile, which costs more than
    the 64 multiplies per thread it skips."""
    mode = os.environ.get("VIDATTN_GLUON_LAZY_RESCALE", "0").strip()
    if mode not in ("0", "1", ""):
        raise ValueError(f"VIDATTN_GLUON_LAZY_RESCALE must be 0 or 1, got {mode!r}")
    if mode != "1":
        return -1.0
    return LAZY_TAU_E4M3 if pv8 else LAZY_TAU_16BIT


def q_prefetch(persistent: bool) -> bool:
    """``Q_PREFETCH`` of the Gluon kernel: with a persistent grid each consumer warpgroup issues the
    global loads of its next work item's Q rows (and their permutation entries) right after the
    current item's last P.V and keeps them in registers through the epilogue, so the next item's
    first S MMA does not wait for two dependent global loads. Opt-in,
    ``VIDATTN_GLUON_Q_PREFETCH=1`` (0 or unset: off; anything else is a ValueError); it only
    applies with ``VIDATTN_GLUON_PERSISTENT=1`` (one program per work item has no next item)."""
    mode = os.environ.get("VIDATTN_GLUON_Q_PREFETCH", "0").strip()
    if mode not in ("0", "1"):
        raise ValueError(f"VIDATTN_GLUON_Q_PREFETCH must be 0 or 1, got {mode!r}")
    return persistent and mode == "1"


def _persistent_programs(device: torch.device) -> int:
    """Programs of the grid. Default: one per work item (the hardware then starts work items in
    order as programs finish, which kept neighbouring query tiles' K/V in L2: on the H200 this was
    up to 12% faster than a persistent grid on HunyuanVideo plans). ``VIDATTN_GLUON_PERSISTENT=1``:
    one program per multiprocessor, each looping over work items ``pid, pid + grid, ...``."""
    if os.environ.get("VIDATTN_GLUON_PERSISTENT", "0") != "1":
        return 1 << 31
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _descriptor(t: torch.Tensor, view, box, gl_dtype):
    """A 2-D TMA descriptor over the ``[rows, cols]`` view ``view = (rows, cols, row_stride)`` of
    ``t`` with ``box``-shaped tiles (NVMMA shared layout of ``gl_dtype``)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    rows, cols, row_stride = view
    return TensorDescriptor(t, [rows, cols], [row_stride, 1], list(box), _shared_layout(tuple(box), gl_dtype))


@functools.lru_cache(maxsize=None)
def _shared_layout(box: tuple, gl_dtype):
    """The NVMMA shared layout of a ``box`` tile of ``gl_dtype`` (built once per pair: its
    construction was a tenth of the launcher's host time)."""
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout.get_default_for(list(box), gl_dtype)


def _gl_dtype(dtype: torch.dtype):
    from triton.experimental.gluon import language as gl

    return {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.int8: gl.int8,
            FP8_DTYPE: gl.float8e4nv}[dtype]


def _kv_tile_view(t: torch.Tensor, bhs, B: int, Hk: int, S: int):
    """(rows, cols, row_stride) and (row_b, row_h, col_h) of :func:`.sparse_flash_io.kv_view`."""
    view = kv_view(t, bhs(t), B, Hk, S)
    if view is None:
        raise TritonUnsupported("K/V strides do not allow a tensor descriptor (the Gluon kernel loads by TMA)")
    rows, cols, row_stride, row_b, row_h, col_h = view
    return (rows, cols, row_stride), (row_b, row_h, col_h)


def block_sparse_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                                 scale: Optional[float] = None, return_lse: bool = False,
                                 precision: Optional[str] = None):
    """Run ``plan`` with the Hopper Gluon kernel (the caller has checked :func:`gluon_refusal`).

    Args:
        q: ``[B, S, H, D]``; k, v: ``[B, S, Hk, D]`` (Hk divides H); bf16 or fp16, D 64 or 128.
        plan: BlockPlan with 64- or 128-token blocks (Bp in {1, B}, Hp in {1, H}); partial blocks
            run through their precomputed token masks.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return float32 natural-log LSE ``[B, H, S]`` (original token order).
        precision: None (bf16 / fp16 MMAs) or ``"fp8"`` / ``"int8"`` / ``"int8_fp8"``: Q quantised
            per token and K per block (K smoothed; e4m3 or int8, :mod:`.quant_fp8`) and, for ``"fp8"`` /
            ``"int8_fp8"``, V per channel to e4m3 with an e4m3 P; fp32 accumulation. Forward only.
    Returns:
        ``[B, S, H, D]`` in q's dtype (and the LSE).
    Raises:
        TritonUnsupported: K/V strides a tensor descriptor cannot describe.
    """
    from .sparse_flash_gluon import _gluon_sparse_flash_fwd

    plan, scale = prepare_call(q, k, v, plan, scale)
    qk_fmt, pv8 = precision_parts(precision)
    B, S, H, D = q.shape
    q_in = q
    q = q if q.stride(-1) == 1 else q.contiguous()
    kh, vh, kv_bhs = kv_in_plan_order(k, v, plan, H)
    Hk = kh.shape[1] if plan.key_perm is not None else kh.shape[2]
    BN = plan.block_k
    v_bhs = kv_bhs
    ops = None
    cfg = gluon_config(plan.block_q, BN, D, precision)
    if qk_fmt is not None:  # quantisation prologue: smoothed K (and V^T) in plan order, 8-bit Q (original
        # order) unless the kernel quantises Q itself (Q_QUANT)
        ops = quantize_plan_operands(q, kh, vh, plan, precision, with_q=not cfg["Q_QUANT"])
        q = q if cfg["Q_QUANT"] else ops.q8
        kh, kv_bhs = ops.k8, _bhs_strides
    k_view, (row_b, row_h, col_h) = _kv_tile_view(kh, kv_bhs, B, Hk, S)
    desc_k = _descriptor(kh, k_view, (BN, D), _gl_dtype(kh.dtype))
    if pv8:  # V^T [B, Hk, D, S_pad] as rows (b, hk, channel) x tokens; boxes of D channels x BN tokens
        rows, cols, row_stride, vrow_b, vrow_h, vcol_h = vt_view(ops.vt8)
        desc_v = _descriptor(ops.vt8, (rows, cols, row_stride), (D, BN), _gl_dtype(ops.vt8.dtype))
    else:
        v_view, (vrow_b, vrow_h, vcol_h) = _kv_tile_view(vh, v_bhs, B, Hk, S)
        desc_v = _descriptor(vh, v_view, (BN, D), _gl_dtype(vh.dtype))

    t = plan_launch_tables(plan)
    fnum, fidx = t["fnum"], t["fidx"]
    qperm = plan_perm_int32(plan)
    out = torch.empty(B, S, H, D, dtype=q_in.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device) if return_lse else out
    bs = plan_bh_strides
    (fn_b, fn_h), (fi_b, fi_h) = bs(fnum), bs(fidx)
    has_partial = plan.has_partial
    pnum, pidx = t["pnum"], t["pidx"]
    bits, slot = (t["bits"], t["slot"]) if has_partial else (fnum, fnum)
    (pn_b, pn_h), (pi_b, pi_h) = bs(pnum), bs(pidx)
    slot_b, slot_h = bs(slot) if has_partial else (0, 0)
    fdummy = t["fdummy"]
    qsc = ops.q_scale if ops is not None and ops.q_scale is not None else fdummy
    ksc = ops.k_scale if ops is not None else fdummy
    vsc = ops.v_scale if pv8 else fdummy
    (qs_b, qs_h), (ks_b, ks_h), (vs_b, vs_h) = ((x.stride(0), x.stride(1)) if x.dim() == 3 else (0, 0)
                                                for x in (qsc, ksc, vsc))
    nqt = triton.cdiv(S, _ROWS)
    num_tiles = nqt * B * H
    programs = _persistent_programs(q.device)
    grid = (min(num_tiles, programs),)
    prefetch = q_prefetch(programs < num_tiles)
    compiled = _gluon_sparse_flash_fwd[grid](
        desc_k, desc_v, q, out, lse, fnum, fidx, qperm if qperm is not None else fnum,
        0 if qperm is None or qperm.shape[0] == 1 else qperm.stride(0), pnum, pidx, bits, slot, qsc, ksc, vsc,
        S, H, H // Hk, row_b, row_h, col_h, vrow_b, vrow_h, vcol_h, nqt, num_tiles, plan.num_q_blocks,
        plan.num_k_blocks, scale * LOG2E,
        q.stride(0), q.stride(2), q.stride(1), out.stride(0), out.stride(2), out.stride(1),
        fn_b, fn_h, fi_b, fi_h, fidx.stride(2), pn_b, pn_h, pi_b, pi_h, pidx.stride(2), slot_b, slot_h,
        qs_b, qs_h, ks_b, ks_h, vs_b, vs_h,
        RAGGED=S % BN != 0, Q_PERM=qperm is not None, RETURN_LSE=return_lse, STAGES=cfg["STAGES"],
        SPLIT=cfg["SPLIT"], PINGPONG=cfg["PINGPONG"], HAS_PARTIAL=has_partial,
        BLOCK_N=BN, BLOCK_D=D, QK8=qk_fmt is not None, QK_INT8=qk_fmt == "int8", PV8=pv8,
        PV_SPLIT_ACC=cfg["PV_SPLIT_ACC"], I2F_BITS=qk_fmt == "int8" and int8_logits_by_bits(),
        Q_QUANT=cfg["Q_QUANT"], EXP_POLY=cfg["EXP_POLY"] and not has_partial, RESCALE_TAU=cfg["RESCALE_TAU"],
        ROWSUM_MMA=cfg["ROWSUM_MMA"], Q_PREFETCH=prefetch,
        CONSUMER_REGS=cfg["CONSUMER_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"],
        num_warps=4)
    last_launch["path"] = "gluon-hopper"
    last_launch["q_in_kernel"] = cfg["Q_QUANT"]  # (as the portable path records it)
    last_launch["rowsum_mma"] = cfg["ROWSUM_MMA"]
    last_launch["q_prefetch"] = prefetch  # (off when the grid has a program per work item)
    last_launch["regs_spills"] = (getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None))
    if ops is not None and return_lse:  # the smoothing removed scale * q . mean(k) from every logit of a row
        lse = lse + lse_smoothing_correction(q_in, ops.k_mean, scale)
    return (out, lse) if return_lse else out
