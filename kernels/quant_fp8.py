"""FP8 (e4m3) quantisation prologue of the Triton block-sparse kernel's ``precision="fp8"`` path.

Torch ops only (no device code); one job: turn bf16/fp16/fp32 ``q, k, v`` into the e4m3 operands
and fp32 scales the kernel's FP8 variant reads (the method of SageAttention: per-block Q/K
quantisation with K smoothing, and an FP8 P.V with per-channel V scales):

* **Q**: one scale per (batch, head, *plan* query block) (``amax / 448`` over the block's tokens
  and channels, the block cut in the plan's token order), ``q8`` stays at the original token
  positions (the kernel reads Q through the plan's permutation);
* **K**: smoothed (the per-(batch, kv head) mean over tokens is subtracted: every logit of a query
  row moves by the same ``q . mean``, which the softmax ignores), then one scale per (batch, kv
  head, key block of ``block_k`` tokens in plan order); head-major ``[B, Hk, S, D]`` e4m3;
* **V**: one scale per (batch, kv head, channel) (``amax / 448`` over tokens), stored transposed
  ``[B, Hk, D, S_pad]`` (``S_pad``: S rounded up to 16, zero-filled) so that the kernel's P.V
  operand has the reduction (token) axis contiguous, the layout FP8 tensor-core MMAs need;
* **P** (in-kernel): the softmax numerators in ``[0, 1]`` are multiplied by :data:`P_SCALE` before
  their cast to e4m3, and the accumulator is divided by it (and multiplied by the V channel
  scales) once at the end.

Two implementations with identical results: torch ops (:func:`quantize_q_blocks`,
:func:`smooth_quantize_k`, :func:`quantize_v_channels`; the reference) and three small Triton
kernels that read each tensor once more than the reductions need and write e4m3 directly (the
default where Triton runs; ``VIDATTN_FP8_PROLOGUE=torch`` or :data:`DEFAULT_IMPL` selects).

Capability: :func:`fp8_support` (CUDA compute capability >= 8.9, or the CPU interpreter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["FP8_DTYPE", "FP8_MAX", "P_SCALE", "PRECISIONS", "check_precision", "fp8_support", "quantize_q_blocks",
           "smooth_quantize_k", "quantize_v_channels", "FP8Operands", "quantize_fp8_operands", "round_to_e4m3",
           "lse_smoothing_correction", "DEFAULT_IMPL"]

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite e4m3fn value
P_SCALE = 448.0  # softmax numerators p in [0, 1] are cast as p * P_SCALE
PRECISIONS = (None, "fp8")  # None: compute in the inputs' dtype (fp32 accumulate)
_TINY = 1e-12  # scale floor for all-zero blocks / channels
DEFAULT_IMPL = "triton"  # prologue implementation: "triton" (kernels below) or "torch"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_precision(precision) -> Optional[str]:
    """``None`` (the inputs' dtype) or ``"fp8"``; raises ``ValueError`` naming ``precision`` otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (None: the inputs' dtype), got {precision!r}")
    return precision


def fp8_support(device: torch.device) -> Tuple[bool, str]:
    """Whether the FP8 kernel path can run on ``device``: ``(ok, reason)``. CUDA needs compute
    capability >= 8.9 (Ada / Hopper / Blackwell e4m3 tensor cores); a CPU device only under
    ``TRITON_INTERPRET=1`` (the interpreter emulates e4m3)."""
    if FP8_DTYPE is None:
        return False, f"torch {torch.__version__} has no float8_e4m3fn"
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        if cap < (8, 9):
            return False, f"precision='fp8' needs CUDA compute capability >= 8.9, got {cap[0]}.{cap[1]}"
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""
    return False, f"precision='fp8' needs a CUDA device of compute capability >= 8.9 (got {device.type})"


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast of fp32 ``x`` (already divided by its scale) to e4m3fn (torch's cast is not
    saturating: out-of-range values become NaN)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to the nearest e4m3fn value (saturating), as fp32: the reference the
    kernel's in-kernel P cast is tested against."""
    return _to_e4m3(x.float()).float()


def _plan_order_rows(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, H, S]`` -> plan token order (``perm`` ``[Hp, S]``, Hp in {1, H}) along the last axis."""
    if perm is None:
        return x
    B, H, S = x.shape
    idx = perm.to(x.device).long().expand(H, S)
    return torch.gather(x, 2, idx[None].expand(B, H, S))


def _block_amax(rows: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, S]`` per-token amax -> ``[B, H, ceil(S / block)]`` per-block amax (padding 0)."""
    B, H, S = rows.shape
    nb = -(-S // block)
    pad = nb * block - S
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.view(B, H, nb, block).amax(-1)


def quantize_q_blocks(q: torch.Tensor, perm: Optional[torch.Tensor], block_q: int):
    """Per-block e4m3 quantisation of Q.

    Args:
        q: ``[B, S, H, D]`` float (original token order).
        perm: the plan's token order ``[Hp, S]`` (plan position -> original token) or None.
        block_q: the plan's query block size (blocks cut in plan order).
    Returns:
        ``(q8, q_scale)``: e4m3fn ``[B, S, H, D]`` contiguous (original token order) and fp32
        ``[B, H, NQB]`` with ``q ~= q8 * q_scale[b, h, block of the token]``.
    """
    B, S, H, D = q.shape
    amax_tok = q.detach().abs().amax(-1).float().transpose(1, 2)  # [B, H, S] original order
    scale = (_block_amax(_plan_order_rows(amax_tok, perm), block_q) / FP8_MAX).clamp_min(_TINY)  # [B, H, NQB]
    pos_blk = torch.arange(S, device=q.device) // block_q  # block of each plan position
    tok_scale = scale[:, :, pos_blk]  # [B, H, S] plan order
    if perm is not None:  # back to original token order: tok_scale[orig] = tok_scale_plan[pos]
        idx = perm.to(q.device).long().expand(H, S)[None].expand(B, H, S)
        tok_scale = torch.empty_like(tok_scale).scatter_(2, idx, tok_scale)
    q8 = _to_e4m3(q.float() / tok_scale.transpose(1, 2)[..., None]).contiguous()
    return q8, scale.contiguous()


def smooth_quantize_k(k: torch.Tensor, block_k: int):
    """K smoothing and per-block e4m3 quantisation.

    Args:
        k: ``[B, Hk, S, D]`` float (any strides), tokens in the plan's key order.
        block_k: the plan's key block size.
    Returns:
        ``(k8, k_scale, k_mean)``: e4m3fn ``[B, Hk, S, D]`` contiguous, fp32 ``[B, Hk, NKB]`` and
        fp32 ``[B, Hk, D]`` with ``k ~= k8 * k_scale[b, h, block] + k_mean[b, h]``.
    """
    kf = k.float()
    mean = kf.mean(2)  # [B, Hk, D]
    ks = kf - mean[:, :, None]
    scale = (_block_amax(ks.abs().amax(-1), block_k) / FP8_MAX).clamp_min(_TINY)  # [B, Hk, NKB]
    S = k.shape[2]
    tok = scale[:, :, torch.arange(S, device=k.device) // block_k]  # [B, Hk, S]
    return _to_e4m3(ks / tok[..., None]).contiguous(), scale.contiguous(), mean


def quantize_v_channels(v: torch.Tensor, pad_to: int = 16):
    """Per-channel e4m3 quantisation of V, stored transposed.

    Args:
        v: ``[B, Hk, S, D]`` float (any strides), tokens in the plan's key order.
        pad_to: the token axis of the result is padded (zeros) to a multiple of this (16: rows of
            16-byte aligned length, as tensor-descriptor loads need).
    Returns:
        ``(vt8, v_scale)``: e4m3fn ``[B, Hk, D, S_pad]`` and fp32 ``[B, Hk, D]`` with
        ``v[b, h, s, c] ~= vt8[b, h, c, s] * v_scale[b, h, c]``.
    """
    B, Hk, S, D = v.shape
    vf = v.float()
    scale = (vf.abs().amax(2) / FP8_MAX).clamp_min(_TINY)  # [B, Hk, D]
    s_pad = -(-S // pad_to) * pad_to
    vt8 = torch.zeros(B, Hk, D, s_pad, dtype=FP8_DTYPE, device=v.device)
    vt8[..., :S] = _to_e4m3((vf / scale[:, :, None]).transpose(2, 3))
    return vt8, scale.contiguous()



# ----------------------------------------------------------------------------- device code
@triton.jit
def _round_e4m3(x):
    """Non-negative fp32 ``x`` (<= 448) rounded to the nearest e4m3 value, as fp32 (normal range:
    the mantissa rounded to 3 bits, nearest even; subnormals: multiples of 2^-9). Used only under
    the CPU interpreter, whose fp32 -> e4m3 cast mis-rounds when the mantissa carries into the
    exponent; a value already on the e4m3 grid converts exactly there. GPUs cast in hardware."""
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    sub = tl.floor(x * 512.0 + 0.5) * 0.001953125
    return tl.where(x < 0.015625, sub, normal)


@triton.jit
def _cast_e4m3(x, EMU_CAST: tl.constexpr):
    """Saturating fp32 -> e4m3 cast of a tensor already divided by its scale (round to nearest)."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if EMU_CAST:
        r = _round_e4m3(tl.abs(x))
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def _tile_coords(H, TILE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(tile, batch x head)``: ``(b, h, bh, tile rows [TILE], channels [BLOCK_D])``."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
    return bh // H, bh % H, bh, rows, tl.arange(0, BLOCK_D)


@triton.jit
def _quant_rows_kernel(X, X8, SCALE, MEAN, PERM, perm_h, S, H, D,
                       sx_b, sx_h, sx_s, s8_b, s8_h, s8_s, sc_b, sc_h, mn_b, mn_h,
                       HAS_PERM: tl.constexpr, SMOOTH: tl.constexpr, EMU_CAST: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (plan block, batch x head) per program: the block's rows (through ``PERM`` when set)
    minus the head's mean (``SMOOTH``), one fp32 scale ``amax / 448`` for the block, e4m3 rows."""
    blk = tl.program_id(0)
    b, h, bh, pos, offs_d = _tile_coords(H, BLOCK, BLOCK_D)
    ok = (pos < S)[:, None] & (offs_d < D)[None, :]
    if HAS_PERM:
        tok = tl.load(PERM + h * perm_h + pos, mask=pos < S, other=0)
    else:
        tok = pos
    x = tl.load(X + b.to(tl.int64) * sx_b + h * sx_h + tok[:, None].to(tl.int64) * sx_s + offs_d[None, :],
                mask=ok, other=0.0).to(tl.float32)
    if SMOOTH:
        mean = tl.load(MEAN + b * mn_b + h * mn_h + offs_d, mask=offs_d < D, other=0.0)
        x = tl.where(ok, x - mean[None, :], 0.0)
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0) / 448.0, 1e-12)
    tl.store(SCALE + b * sc_b + h * sc_h + blk, scale)
    x8 = _cast_e4m3(x / scale, EMU_CAST)
    tl.store(X8 + b.to(tl.int64) * s8_b + h * s8_h + tok[:, None].to(tl.int64) * s8_s + offs_d[None, :], x8, mask=ok)


@triton.jit
def _quant_v_kernel(V, VT8, VSC, S, S_PAD, H, D, sv_b, sv_h, sv_s, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                    EMU_CAST: tl.constexpr):
    """One (token tile, batch x head) per program: V rows divided by the channel scales, stored
    transposed (``VT8 [B, H, D, S_PAD]`` contiguous; tokens S .. S_PAD written as 0)."""
    b, h, bh, t, offs_d = _tile_coords(H, BLOCK_T, BLOCK_D)
    d_ok = offs_d < D
    x = tl.load(V + b.to(tl.int64) * sv_b + h * sv_h + t[:, None].to(tl.int64) * sv_s + offs_d[None, :],
                mask=(t < S)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    sc = tl.load(VSC + bh * D + offs_d, mask=d_ok, other=1.0)
    x8 = tl.trans(_cast_e4m3(x / sc[None, :], EMU_CAST))  # [BLOCK_D, BLOCK_T]
    dst = VT8 + bh.to(tl.int64) * D * S_PAD + offs_d[:, None].to(tl.int64) * S_PAD + t[None, :]
    tl.store(dst, x8, mask=d_ok[:, None] & (t < S_PAD)[None, :])


def _quant_rows_triton(x, bhs_strides, sizes, out, out_strides, perm, block, mean=None):
    """Launch :func:`_quant_rows_kernel` over ``x`` of sizes ``(B, H, S, D)`` with (batch, head,
    token) strides ``bhs_strides`` into ``out`` (strides ``out_strides``); returns the fp32
    scales ``[B, H, ceil(S / block)]``."""
    B, H, S, D = sizes
    nb = -(-S // block)
    scale = torch.empty(B, H, nb, dtype=torch.float32, device=out.device)
    perm_t = perm.to(device=out.device, dtype=torch.int32).contiguous() if perm is not None else scale
    perm_h = 0 if perm is None or perm.shape[0] == 1 else perm_t.stride(0)
    mean_t = mean if mean is not None else scale
    mn_b, mn_h = (mean.stride(0), mean.stride(1)) if mean is not None else (0, 0)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    _quant_rows_kernel[(nb, B * H)](
        x, out, scale, mean_t, perm_t, perm_h, S, H, D, *bhs_strides, *out_strides, scale.stride(0), scale.stride(1),
        mn_b, mn_h, HAS_PERM=perm is not None, SMOOTH=mean is not None, EMU_CAST=_interpreting(), BLOCK=block,
        BLOCK_D=BLOCK_D, num_warps=8 if block * BLOCK_D >= 128 * 128 else 4)
    return scale


def _quantize_q_triton(q, perm, block_q):
    B, S, H, D = q.shape
    q8 = torch.empty(B, S, H, D, dtype=FP8_DTYPE, device=q.device)
    qs = _quant_rows_triton(q, (q.stride(0), q.stride(2), q.stride(1)), (B, H, S, D), q8,
                            (q8.stride(0), q8.stride(2), q8.stride(1)), perm, block_q)
    return q8, qs


def _smooth_quantize_k_triton(k, block_k):
    B, Hk, S, D = k.shape
    mean = k.float().mean(2)  # [B, Hk, D]
    k8 = torch.empty(B, Hk, S, D, dtype=FP8_DTYPE, device=k.device)
    ks = _quant_rows_triton(k, (k.stride(0), k.stride(1), k.stride(2)), (B, Hk, S, D), k8,
                            (k8.stride(0), k8.stride(1), k8.stride(2)), None, block_k, mean=mean)
    return k8, ks, mean


def _quantize_v_triton(v, pad_to=16):
    B, Hk, S, D = v.shape
    scale = (v.abs().amax(2).float() / FP8_MAX).clamp_min(_TINY).contiguous()  # [B, Hk, D]
    s_pad = -(-S // pad_to) * pad_to
    vt8 = torch.empty(B, Hk, D, s_pad, dtype=FP8_DTYPE, device=v.device)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_T = 64 if BLOCK_D <= 128 else 32
    _quant_v_kernel[(triton.cdiv(s_pad, BLOCK_T), B * Hk)](
        v, vt8, scale, S, s_pad, Hk, D, v.stride(0), v.stride(1), v.stride(2), BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
        EMU_CAST=_interpreting(), num_warps=4)
    return vt8, scale


@dataclass
class FP8Operands:
    """What the kernel's FP8 variant reads (shapes as in the functions above)."""

    q8: torch.Tensor  # [B, S, H, D] e4m3, original token order
    q_scale: torch.Tensor  # [B, H, NQB] fp32
    k8: torch.Tensor  # [B, Hk, S, D] e4m3, plan key order, smoothed
    k_scale: torch.Tensor  # [B, Hk, NKB] fp32
    k_mean: torch.Tensor  # [B, Hk, D] fp32 (the smoothing shift; for the LSE correction)
    vt8: torch.Tensor  # [B, Hk, D, S_pad] e4m3, plan key order
    v_scale: torch.Tensor  # [B, Hk, D] fp32


def quantize_fp8_operands(q: torch.Tensor, k_plan: torch.Tensor, v_plan: torch.Tensor, perm: Optional[torch.Tensor],
                          block_q: int, block_k: int, impl: Optional[str] = None) -> FP8Operands:
    """The whole prologue: ``q [B, S, H, D]`` (original order, unit last stride), ``k_plan,
    v_plan [B, Hk, S, D]`` (plan key order, any strides with a unit last one), the plan's query
    ``perm`` ``[Hp, S]`` or None and block sizes. ``impl``: ``"triton"`` / ``"torch"`` (default:
    ``VIDATTN_FP8_PROLOGUE`` or :data:`DEFAULT_IMPL`; torch where Triton cannot run)."""
    if FP8_DTYPE is None:
        raise TypeError(f"torch {torch.__version__} has no float8_e4m3fn")
    impl = impl or os.environ.get("VIDATTN_FP8_PROLOGUE") or DEFAULT_IMPL
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'triton' or 'torch', got {impl!r}")
    if q.device.type != "cuda" and not _interpreting():
        impl = "torch"
    with torch.no_grad():
        if impl == "triton":
            q8, qs = _quantize_q_triton(q, perm, block_q)
            k8, ks, km = _smooth_quantize_k_triton(k_plan, block_k)
            vt8, vs = _quantize_v_triton(v_plan)
        else:
            q8, qs = quantize_q_blocks(q, perm, block_q)
            k8, ks, km = smooth_quantize_k(k_plan, block_k)
            vt8, vs = quantize_v_channels(v_plan)
    return FP8Operands(q8, qs, k8, ks, km, vt8, vs)


def lse_smoothing_correction(q: torch.Tensor, k_mean: torch.Tensor, scale: float) -> torch.Tensor:
    """The term the K smoothing removed from every logit of a row, as a natural-log LSE shift:
    ``scale * q . k_mean`` ``[B, H, S]`` fp32 (``q [B, S, H, D]``, ``k_mean [B, Hk, D]``, Hk
    divides H). The true LSE is the smoothed one plus this."""
    H, Hk = q.shape[2], k_mean.shape[1]
    km = k_mean.repeat_interleave(H // Hk, dim=1) if Hk != H else k_mean
    return scale * torch.einsum("bshd,bhd->bhs", q.float(), km)
