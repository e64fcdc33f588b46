"""Fused Triton block pooling of Q/K/V: one read of ``x`` per block, block mean plus (optionally)
the per-channel mean absolute deviation or variance, in plan order.

The PyTorch versions in :mod:`vidattn.kernels.pooling` are the reference; they upcast the whole
tensor to float32 and make several passes over it, which on a 32k-token video costs several
milliseconds per call (RectifiedSparse pools Q, K and V on every call). Here each program loads
one block of one (batch, head) once, in its own dtype, and reduces it in registers.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .plan_order_triton import token_of_position

__all__ = ["block_pool_triton", "STAT_NONE", "STAT_MAD", "STAT_VAR"]

STAT_NONE, STAT_MAD, STAT_VAR = 0, 1, 2


@triton.jit
def _block_pool_kernel(X, MEAN, STAT, PERM, S, H, NB, D, stride_b, stride_s, stride_h, perm_h,
                       HAS_PERM: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    nb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = nb * BLOCK + tl.arange(0, BLOCK)
    ok = rows < S
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    src = token_of_position(PERM, h * perm_h, rows, ok, HAS_PERM)
    ptrs = X + b.to(tl.int64) * stride_b + h * stride_h + src.to(tl.int64)[:, None] * stride_s + offs_d[None, :]
    x = tl.load(ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    cnt = tl.minimum(S - nb * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(x, 0) / cnt
    out = (bh.to(tl.int64) * NB + nb) * D + offs_d
    tl.store(MEAN + out, mean, mask=d_ok)
    if MODE != 0:
        dev = x - mean[None, :]
        if MODE == 1:
            dev = tl.abs(dev)
        else:
            dev = dev * dev
        dev = tl.where(ok[:, None], dev, 0.0)
        tl.store(STAT + out, tl.sum(dev, 0) / cnt, mask=d_ok)


def block_pool_triton(x: torch.Tensor, block: int, perm: Optional[torch.Tensor] = None,
                      mode: int = STAT_NONE) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Block mean (and a per-channel spread statistic) of ``x`` in one pass.

    Args:
        x: ``[B, S, H, D]`` float16/bfloat16/float32 on CUDA (or CPU under ``TRITON_INTERPRET=1``),
            unit last stride (any other strides).
        block: tokens per block, a power of two in [16, 256] (the last block may be short; it is
            averaged over its real tokens).
        perm: optional int LongTensor ``[1 or H, S]``: pool in plan order ``x[:, perm[h]]``.
        mode: ``STAT_NONE`` (mean only), ``STAT_MAD`` (mean absolute deviation from the block
            mean) or ``STAT_VAR`` (biased variance).
    Returns:
        ``(mean, stat)``: float32 ``[B, H, ceil(S / block), D]`` each (``stat`` None for STAT_NONE).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, S, H, D], got {tuple(x.shape)}")
    if not isinstance(block, int) or block < 16 or block > 256 or block & (block - 1):
        raise ValueError(f"block must be a power of two in [16, 256], got {block!r}")
    B, S, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    nb = -(-S // block)
    mean = torch.empty(B, H, nb, D, dtype=torch.float32, device=x.device)
    stat = torch.empty_like(mean) if mode != STAT_NONE else mean
    if perm is not None:
        if perm.dim() != 2 or perm.shape[-1] != S or perm.shape[0] not in (1, H):
            raise ValueError(f"perm must be [1 or H, S] = [.., {S}], got {tuple(perm.shape)}")
        perm_t = perm.to(device=x.device, dtype=torch.int32).contiguous()
        perm_h = 0 if perm_t.shape[0] == 1 else perm_t.stride(0)
    else:
        perm_t, perm_h = mean, 0
    bd = max(16, triton.next_power_of_2(D))
    _block_pool_kernel[(nb, B * H)](
        x, mean, stat, perm_t, S, H, nb, D, x.stride(0), x.stride(1), x.stride(2), perm_h,
        HAS_PERM=perm is not None, MODE=mode, BLOCK=block, BLOCK_D=bd,
        num_warps=4 if block * bd <= 64 * 128 else 8)
    return mean, (stat if mode != STAT_NONE else None)
