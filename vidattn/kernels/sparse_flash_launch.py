"""Launcher of the Triton block-sparse kernel (forward): the choice between the Hopper Gluon kernel
(:mod:`.sparse_flash_gluon_launch`) and the portable kernel, and for the portable one its launch
configuration (tile sizes, warps, stages, program order; environment overrides) and the call.
Input checks, K/V layout and tensor descriptors are in :mod:`.sparse_flash_io`.

Device code lives in :mod:`.sparse_flash_kernel`, per-plan tables in :mod:`.sparse_flash_tables`.
Anything the kernel cannot run raises :class:`vidattn.errors.TritonUnsupported`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from vidattn.errors import TritonUnsupported
from vidattn.plan import BlockPlan

from .quant_fp8 import (P8_MIN_TILE, fp8_support, int8_logits_by_bits, lse_smoothing_correction, precision_parts,
                        q_in_kernel)
from .sparse_flash_kernel import LOG2E, RuleMode, _sparse_flash_fwd
from .sparse_flash_gluon_launch import block_sparse_attention_gluon, gluon_mode, gluon_refusal
from .sparse_flash_io import (TensorDescriptor, _bhs_strides, _bsh_strides, capability_major, check_triton_inputs,
                              interpreting, kv_descriptor, kv_in_plan_order, last_launch, plan_bh_strides,
                              prepare_call, quantize_plan_operands, vt_view)
from .sparse_flash_tables import ProgramOrder, plan_launch_tables, plan_perm_int32, program_schedule

__all__ = ["block_sparse_attention_triton", "launch_config", "kv_descriptor", "check_triton_inputs", "last_launch",
           "prepare_call", "kv_in_plan_order"]

_stages_ok: dict = {}


def _env_int(name: str) -> Optional[int]:
    val = os.environ.get(name)
    return int(val) if val else None


def launch_config(plan: BlockPlan, head_dim: int, dtype: torch.dtype, rule_mode: RuleMode,
                  precision: Optional[str] = None) -> dict:
    """Tile sizes and launch settings for one call.

    The kernel's query/key tiles (``BLOCK_M`` x ``BLOCK_N``) may be smaller than the plan's blocks
    (a 128-token plan block runs as two 64-token key tiles), which keeps more pipeline stages in
    shared memory. Defaults come from the H100 sweep in ``benchmarks/RESULTS.md``; environment
    overrides: ``VIDATTN_TRITON_BLOCK_M``, ``VIDATTN_TRITON_BLOCK_N``, ``VIDATTN_TRITON_WARPS``,
    ``VIDATTN_TRITON_STAGES``, ``VIDATTN_TRITON_SCHED`` (0 natural order, 1 heaviest query tiles
    first, 2 all heads of a query tile adjacent),
    ``VIDATTN_TRITON_TMA`` (0 disables tensor-descriptor loads), ``VIDATTN_P8_KEY_ORDER`` (0: an 8-bit
    P.V with keys in token order, P moved between threads; else in the S accumulator's register
    order, :data:`.quant_fp8.P8_KEY_DIMS`, for key tiles of >= 32), ``VIDATTN_WARP_SPECIALIZE``
    (1: Triton's automatic warp specialisation of the full-block loop, ``tl.range(...,
    warp_specialize=True)``; off by default, an experiment for Hopper). ``precision``: the call's
    precision (None or a quantised one, :func:`.quant_fp8.precision_parts`); with 8-bit K and V
    (``"fp8"``, ``"int8_fp8"``) full-block plans take 128-key tiles at head dims up to 128.

    Returns:
        dict with ``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``stages`` (list to try in order),
        ``sched`` (:class:`ProgramOrder`, NATURAL = the 2-D grid), ``warp_specialize`` (bool).
    """
    bd = max(16, triton.next_power_of_2(head_dim))
    bm = min(plan.block_q, 128)
    masked = rule_mode != RuleMode.NONE
    # fp8 (1-byte K/V tiles), full blocks: 128-key tiles, 4 warps, 2 stages were the fastest of the
    # H200 sweep (Wan shape: dense 9.73 ms vs 10.33 with 64-key tiles, d 0.25 2.78 vs 2.97 ms);
    # int8_fp8 has the same tile bytes. int8 (1-byte K, 16-bit V) keeps the bf16 tiles.
    _, pv8 = precision_parts(precision)
    if pv8 and not masked and bd <= 128:
        bn = min(plan.block_k, 128)
    else:
        bn = min(plan.block_k, 64 if bd >= 128 else 128)
    if interpreting():
        bm, bn = plan.block_q, plan.block_k  # fewer, larger steps under the interpreter
    bm = _env_int("VIDATTN_TRITON_BLOCK_M") or bm
    bn = _env_int("VIDATTN_TRITON_BLOCK_N") or bn
    bm, bn = min(bm, plan.block_q), min(bn, plan.block_k)
    # H100 sweep (d=128, bf16): full blocks only -> 128x64 tiles, 4 warps, 2 stages (~500 TFLOP/s);
    # partial blocks (token rule per element) -> 8 warps, 3 stages for 128-row tiles.
    warps = 8 if (masked and bm * bd >= 128 * 128) else 4
    warps = _env_int("VIDATTN_TRITON_WARPS") or warps
    if interpreting() or dtype == torch.float32:
        stages = [1]
    elif masked and bm >= 128:
        stages = [3, 2, 1]
    else:
        stages = [2, 1]
    forced = _env_int("VIDATTN_TRITON_STAGES")
    if forced and not interpreting():
        stages = [forced] + [s for s in stages if s != forced]
    # program order: natural by default. Heaviest-first (1) was 1-2% faster on dense and random
    # block-sparse plans but 11% slower on Radial (block) plans, whose neighbouring query tiles share
    # key blocks in L2 (H200, interleaved A/B in benchmarks/RESULTS.md).
    sched = ProgramOrder(_env_int("VIDATTN_TRITON_SCHED") or 0)
    warp_spec = os.environ.get("VIDATTN_WARP_SPECIALIZE", "0") == "1"
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, stages=stages, sched=sched, warp_specialize=warp_spec)


def _tested_triton() -> bool:
    """Triton 3.6 or newer: the versions this kernel is built with on CPU in every precision
    (``tests/kernels/test_portable_build.py``) and run on the GPU; a compile error there is a bug."""
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 6)


def _tma_ok(device: torch.device) -> bool:
    if TensorDescriptor is None or os.environ.get("VIDATTN_TRITON_TMA", "1") == "0":
        return False
    if interpreting():
        return True
    return device.type == "cuda" and capability_major(device) >= 9


# quantised precisions the Gluon kernel runs faster than the portable one (H100 / H200) on plans of
# full blocks
_GLUON_FULL_BLOCK_PRECISIONS = ("fp8", "int8")


def auto_portable_reason(plan: BlockPlan, precision: Optional[str]) -> Optional[str]:
    """In ``VIDATTN_GLUON=auto`` mode, why a quantised call takes the portable kernel, or None
    when it goes to the Gluon kernel (bf16 / fp16 always do, if the Gluon kernel can run them).

    Measured on the H200 (``benchmarks/gluon_ab.py --precisions``, Wan and HunyuanVideo):
    ``"fp8"``, since its P is cast to e4m3 next to the P.V MMA (session 13), runs 1.15x / 1.14x the
    portable kernel on dense plans and 1.08x / 1.08x at block density 0.25 (sessions 9 and 11,
    before that change: 0.96-1.02x at every block-sparse density, 0.82x on neighborhood plans,
    which have partial blocks and stay on the portable kernel); ``"int8"`` 1.05-1.07x on dense
    plans, 0.95-1.00x on block-sparse ones before session 13's in-kernel Q quantisation, then
    (H200, session 14) 1.04x / 0.97x at d 0.25 / 0.0625 on Wan and 1.03x / 1.04x on HunyuanVideo,
    and (H100, session 15, the default build: MMA row sums off) 1.04x / 0.99x on Wan and 1.03x /
    1.09x on HunyuanVideo (dense 1.06x / 1.12x); 0.88x on
    neighborhood plans; ``"int8_fp8"`` 0.88x / 1.02x dense and 0.88x / 1.00x at density 0.25
    (session 13). So ``"fp8"`` and ``"int8"`` on any plan of full blocks go to it.
    """
    if precision is None:
        return None
    full_blocks = plan.rectification is None and not plan.has_partial
    if precision in _GLUON_FULL_BLOCK_PRECISIONS and full_blocks:
        return None
    where = " except on plans of full blocks" if precision in _GLUON_FULL_BLOCK_PRECISIONS else ""
    return f"precision={precision!r} runs on the portable kernel unless VIDATTN_GLUON=1 (measured faster there{where})"


def _gluon_path(q, k, v, plan, precision):
    """The Hopper Gluon kernel's entry point when ``VIDATTN_GLUON`` and the case allow it, else None
    (the reason is kept in ``last_launch["gluon_refused"]``); with ``VIDATTN_GLUON=1`` a case it
    cannot run raises :class:`TritonUnsupported`. In ``auto`` mode the quantised precisions take
    the portable kernel except ``"fp8"`` and ``"int8"`` on plans of full blocks
    (:func:`auto_portable_reason`);
    ``VIDATTN_GLUON=1`` runs them all on it."""
    if q.device.type != "cuda":  # the CPU interpreter: no Gluon
        return None
    mode = gluon_mode()
    if mode == "0":
        last_launch["gluon_refused"] = "VIDATTN_GLUON=0"
        return None
    portable_why = auto_portable_reason(plan, precision) if mode == "auto" else None
    if portable_why is not None:
        last_launch["gluon_refused"] = portable_why
        return None
    why = gluon_refusal(q, k, v, plan, precision)
    last_launch["gluon_refused"] = why
    if why is None:
        return block_sparse_attention_gluon
    if mode == "1":
        raise TritonUnsupported(f"VIDATTN_GLUON=1 but {why}")
    return None


def block_sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan,
                                  scale: Optional[float] = None, return_lse: bool = False,
                                  precision: Optional[str] = None):
    """Run ``plan`` with the fused Triton kernel.

    Args:
        q: ``[B, S, H, D]``; k, v: ``[B, S, Hk, D]`` (Hk divides H); fp16/bf16 (fp32 accumulate)
            or fp32; D up to 256 (padded to a power of two in-kernel). q is read in place (any
            strides with a unit last stride); so are k, v when the plan has no token permutation
            (with one they are gathered into plan order once).
        plan: a BlockPlan on q's device (Bp in {1, B}, Hp in {1, H}); block sizes powers of two.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return float32 natural-log LSE ``[B, H, S]`` (original token order).
        precision: None (compute in the inputs' dtype) or a quantised precision
            (:mod:`.quant_fp8`; per-token Q and per-block K scales, K smoothing): ``"fp8"``: Q/K/V in e4m3
            (per-channel V scales), both matmuls on e4m3 operands with fp32 accumulation;
            ``"int8"``: int8 Q/K (an int32 Q.K^T), P.V in the inputs' dtype (fp32 for fp32
            inputs); ``"int8_fp8"``: int8 Q.K^T and fp8's e4m3 P.V. All: forward only (no
            autograd history), CUDA compute capability >= 8.9 (or the interpreter), no pooled
            rectification columns; the LSE is exact up to the quantisation (the smoothing
            shift added back). Output still in q's dtype.
    Returns:
        ``[B, S, H, D]`` in q's dtype (and the LSE).
    Raises:
        TritonUnsupported: for cases the kernel does not handle (the dispatcher falls back).
        ValueError: ``precision`` is not one of None, ``"fp8"``, ``"int8"``, ``"int8_fp8"``.
    """
    qk_fmt, pv8 = precision_parts(precision)
    quant = qk_fmt is not None
    plan, scale = prepare_call(q, k, v, plan, scale)
    gluon = _gluon_path(q, k, v, plan, precision)
    if gluon is not None:
        return gluon(q, k, v, plan, scale, return_lse, precision)
    last_launch["path"] = "portable"
    if quant:
        ok, why = fp8_support(q.device, precision)
        if not ok:
            raise TritonUnsupported(why)
        if plan.rectification is not None and plan.rectification.has_pooled:
            raise TritonUnsupported(f"precision={precision!r} does not fuse pooled rectification columns")
    q_in = q
    B, S, H, D = q.shape
    Hk = k.shape[2]
    dev = q.device
    # Q and O stay [B, S, H, D] in the original token order, read / written in place ((batch, head,
    # token) strides); with a token permutation the kernel maps its rows through the plan's perm
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=dev)
    q_bhs = _bsh_strides
    kperm = plan.key_perm  # keys may have their own order (kv_perm)
    kh, vh, kv_bhs = kv_in_plan_order(k, v, plan, H)
    k_bhs = v_bhs = kv_bhs  # (batch, head, token) strides of the tensors the kernel reads
    Hk = kh.shape[1] if kperm is not None else Hk
    qperm = plan_perm_int32(plan)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=dev) if return_lse else out

    t = plan_launch_tables(plan)
    fnum, fidx, pnum, pidx = t["fnum"], t["fidx"], t["pnum"], t["pidx"]
    rule_mode, na, bits, slot = t["rule_mode"], t["na"], t["bits"], t["slot"]
    na_args, causal, dense_nongrid = t["na_args"], t["causal"], t["dense_nongrid"]
    rect = plan.rectification
    kept = rect.kept_log_scale.float().contiguous() if rect is not None and rect.kept_log_scale is not None else None
    pooled = rect is not None and rect.has_pooled
    if pooled:
        pk = rect.pooled_k.to(q.dtype).contiguous()
        pv = rect.pooled_v.to(q.dtype).contiguous()
        pw = rect.pooled_log_weight.float().contiguous()
    fdummy = t["fdummy"]
    kept_t = kept if kept is not None else fdummy
    pk_t = pk if pooled else q
    pv_t = pv if pooled else q
    pw_t = pw if pooled else fdummy

    BLOCK_D = max(16, triton.next_power_of_2(D))
    cfg = launch_config(plan, D, q_in.dtype, rule_mode, precision=precision)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    p8_order = pv8 and BN >= P8_MIN_TILE and os.environ.get("VIDATTN_P8_KEY_ORDER", "1") != "0"
    last_launch["p8_key_order"] = p8_order
    qops = None
    q_quant = False
    if quant:  # quantisation prologue: 8-bit Q (original order), smoothed K, and for an 8-bit P.V
        # transposed V (plan order, tokens in the P8 key order for key tiles of >= 32); the int8
        # precision reads V itself
        q_quant = q_in_kernel("portable")  # the kernel quantises Q itself (else the prologue's q8)
        qops = quantize_plan_operands(q, kh, vh, plan, precision, v_key_order=p8_order, with_q=not q_quant)
        q, kh = (q if q_quant else qops.q8), qops.k8
        k_bhs = _bhs_strides
        if pv8:
            vh, v_bhs = qops.vt8, _bhs_strides  # (V^T: channel-row stride)
    nqt = triton.cdiv(S, BM)
    use_tma = BLOCK_D == D and _tma_ok(dev) and torch.float32 not in (kh.dtype, vh.dtype)
    dk = dv = None
    if use_tma:  # K and V each as (descriptor, row_b, row_h, col_h): tile at (b*row_b + h*row_h + col0, h*col_h)
        dk = kv_descriptor(kh, k_bhs(kh), B, Hk, S, BN)
        if pv8:  # V^T [B, Hk, D, S_pad] as rows (b, h, channel) x tokens; boxes of D channels x BN tokens
            rows, cols, row_stride, *offsets = vt_view(vh)
            dv = (TensorDescriptor(vh, shape=[rows, cols], strides=[row_stride, 1], block_shape=[D, BN]), *offsets)
        else:
            dv = kv_descriptor(vh, v_bhs(vh), B, Hk, S, BN)
        use_tma = dk is not None and dv is not None
    last_launch["use_tma"] = use_tma
    last_launch["q_in_kernel"] = q_quant
    if use_tma:
        (desc_k, row_b, row_h, col_h), (desc_v, vrow_b, vrow_h, vcol_h) = dk, dv
    else:
        desc_k, desc_v, row_b, row_h, col_h, vrow_b, vrow_h, vcol_h = kh, vh, 0, 0, 0, 0, 0, 0
    if cfg["sched"] != ProgramOrder.NATURAL:
        sched = program_schedule(plan, B, H, BM, cfg["sched"])
        grid = (sched.numel(),)
    else:
        sched = fnum
        grid = (nqt, B * H)
    io = dict(Q=q, K=kh, V=vh, O=out, LSE=lse, SCHED=sched, DESC_K=desc_k, DESC_V=desc_v, ROW_B=row_b, ROW_H=row_h,
              COL_H=col_h, VROW_B=vrow_b, VROW_H=vrow_h, VCOL_H=vcol_h, QPERM=qperm if qperm is not None else fnum,
              qperm_h=0 if qperm is None or qperm.shape[0] == 1 else qperm.stride(0))
    plan_tables = dict(FULL_NUM=fnum, FULL_IDX=fidx, PART_NUM=pnum, PART_IDX=pidx, NA_TAB=na, BITS=bits, SLOT=slot,
                       KEPT=kept_t, PK=pk_t, PV=pv_t, PW=pw_t)
    quant_scales = dict(QSC=fdummy, KSC=fdummy, VSC=fdummy, qs_b=0, qs_h=0, ks_b=0, ks_h=0, vs_b=0, vs_h=0)
    if quant:  # Q per (b, h, token), K per (b, kv head, key block)
        ksc = qops.k_scale
        quant_scales.update(KSC=ksc, ks_b=ksc.stride(0), ks_h=ksc.stride(1))
        if not q_quant:
            qsc = qops.q_scale
            quant_scales.update(QSC=qsc, qs_b=qsc.stride(0), qs_h=qsc.stride(1))
    if pv8:  # V per (b, kv head, channel)
        vsc = qops.v_scale
        quant_scales.update(VSC=vsc, vs_b=vsc.stride(0), vs_h=vsc.stride(1))
    scalars = dict(S=S, H=H, HK_GROUP=H // Hk, qk_scale=scale * LOG2E, NQT=nqt, NKB=plan.num_k_blocks, D=D)
    io_strides = dict(zip(("stride_qb", "stride_qh", "stride_qs"), q_bhs(q)))
    io_strides.update(zip(("stride_kb", "stride_kh", "stride_ks"), k_bhs(kh)))
    io_strides.update(zip(("stride_vb", "stride_vh", "stride_vs"), v_bhs(vh)))
    io_strides.update(zip(("stride_ob", "stride_oh", "stride_os"), q_bhs(out)))
    (fn_b, fn_h), (fi_b, fi_h), (pn_b, pn_h), (pi_b, pi_h) = (plan_bh_strides(x) for x in (fnum, fidx, pnum, pidx))
    (slot_b, slot_h), (kept_b, kept_h), (pw_b, pw_h) = (plan_bh_strides(x) for x in (slot, kept_t, pw_t))
    (pk_b, pk_h), (pv_b, pv_h) = (plan_bh_strides(pk_t), plan_bh_strides(pv_t)) if pooled else ((0, 0), (0, 0))
    table_strides = dict(fn_b=fn_b, fn_h=fn_h, fi_b=fi_b, fi_h=fi_h, fi_q=fidx.stride(2),
                         pn_b=pn_b, pn_h=pn_h, pi_b=pi_b, pi_h=pi_h, pi_q=pidx.stride(2),
                         na_h=0 if na.shape[0] == 1 else na.stride(0), slot_b=slot_b, slot_h=slot_h,
                         kept_b=kept_b, kept_h=kept_h, kept_q=kept_t.stride(2),
                         pk_b=pk_b, pk_h=pk_h, pk_s=pk_t.stride(2), pv_b=pv_b, pv_h=pv_h, pv_s=pv_t.stride(2),
                         pw_b=pw_b, pw_h=pw_h, pw_q=pw_t.stride(2))
    rule_params = dict(zip(("n0", "k0", "d0", "s0", "n1", "k1", "d1", "s1", "n2", "k2", "d2", "s2"), na_args))
    rule_params.update(C0=causal[0], C1=causal[1], C2=causal[2], DENSE_NONGRID=dense_nongrid)
    modes = dict(
        RULE=int(rule_mode), HAS_KEPT=kept is not None, HAS_POOLED=pooled, RETURN_LSE=return_lse,
        # fp32 inputs: exact fp32 dots; the interpreter's bf16 dot is broken (triton 3.8), so upcast there
        # (with QK8 this concerns the 16-bit P.V only; with PV8 neither dot)
        FP32_DOT=q_in.dtype == torch.float32 or (interpreting() and q_in.dtype == torch.bfloat16),
        QK8=quant, QK_INT8=qk_fmt == "int8", PV8=pv8, EMU_CAST=quant and interpreting(),
        I2F_BITS=qk_fmt == "int8" and int8_logits_by_bits(), P8_ORDER=p8_order, Q_QUANT=q_quant,
        WARP_SPEC=cfg["warp_specialize"],
        EVEN_D=BLOCK_D == D, SCHEDULED=cfg["sched"] != ProgramOrder.NATURAL, USE_TMA=use_tma,
        RAGGED=S % plan.block_k != 0, Q_PERM=qperm is not None, PLAN_BQ=plan.block_q, PLAN_BK=plan.block_k,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BLOCK_D,
    )
    kernel_args = {**io, **plan_tables, **quant_scales, **scalars, **io_strides, **table_strides, **rule_params, **modes}
    key = (BM, BN, BLOCK_D, q.dtype, vh.dtype, int(rule_mode), pooled, use_tma, cfg["num_warps"],
           tuple(cfg["stages"]), cfg["warp_specialize"])
    last = None
    for stages in ([_stages_ok[key]] if key in _stages_ok else cfg["stages"]):
        try:
            compiled = _sparse_flash_fwd[grid](**kernel_args, num_warps=cfg["num_warps"], num_stages=stages)
            last_launch["regs_spills"] = (getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None))
            _stages_ok[key] = stages
            break
        except OutOfResources as e:
            last = e
        except CompilationError as e:
            if _tested_triton():  # a bug in the kernel, not a case to fall back from
                raise
            # an older Triton without a language feature used here
            raise TritonUnsupported(f"kernel does not compile with triton {triton.__version__}: "
                                    f"{str(e).splitlines()[0][:200]}") from e
        except RuntimeError as e:  # an MLIR pass failure of the opt-in warp specialisation
            if not cfg["warp_specialize"]:
                raise
            raise TritonUnsupported(f"VIDATTN_WARP_SPECIALIZE=1 does not compile with triton {triton.__version__} "
                                    f"({cfg['num_warps']} warps): {str(e).splitlines()[0][:200]}") from e
    else:
        raise TritonUnsupported(f"kernel does not fit this GPU: {last}")
    if quant and return_lse:  # the smoothing removed scale * q . mean(k) from every logit of a row
        lse = lse + lse_smoothing_correction(q_in, qops.k_mean, scale)
    return (out, lse) if return_lse else out
