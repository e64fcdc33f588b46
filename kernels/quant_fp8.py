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

Capability: :func:`fp8_support` (CUDA compute capability >= 8.9, or the CPU interpreter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["FP8_DTYPE", "FP8_MAX", "P_SCALE", "PRECISIONS", "check_precision", "fp8_support", "quantize_q_blocks",
           "smooth_quantize_k", "quantize_v_channels", "FP8Operands", "quantize_fp8_operands", "round_to_e4m3",
           "lse_smoothing_correction"]

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite e4m3fn value
P_SCALE = 448.0  # softmax numerators p in [0, 1] are cast as p * P_SCALE
PRECISIONS = (None, "fp8")  # None: compute in the inputs' dtype (fp32 accumulate)
_TINY = 1e-12  # scale floor for all-zero blocks / channels


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
                          block_q: int, block_k: int) -> FP8Operands:
    """The whole prologue: ``q [B, S, H, D]`` (original order), ``k_plan, v_plan [B, Hk, S, D]``
    (plan key order, any strides), the plan's query ``perm`` ``[Hp, S]`` or None and block sizes."""
    if FP8_DTYPE is None:
        raise TypeError(f"torch {torch.__version__} has no float8_e4m3fn")
    with torch.no_grad():
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
