"""Plan token order: gather ``[B, H, S, D]`` tensors into a plan's per-head permuted order and back,
and repeat K/V heads for GQA/MQA. Neutral helpers shared by every backend and pattern."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["expand_kv_heads", "to_plan_order", "from_plan_order"]


def expand_kv_heads(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """GQA/MQA: repeat K/V heads ``[B, Hk, S, D]`` to ``[B, num_heads, S, D]`` (Hk divides num_heads)."""
    hk = k.shape[1]
    if hk == num_heads:
        return k
    return k.repeat_interleave(num_heads // hk, dim=1)


def to_plan_order(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, H, S, D]`` -> plan token order (per-head permutation ``perm`` ``[Hp, S]``)."""
    if perm is None:
        return x
    B, H, S, D = x.shape
    if perm.shape[0] == 1:  # one order for all heads: whole-row copies (no per-element index)
        return x.index_select(2, perm[0].to(x.device))
    return torch.gather(x, 2, perm.to(x.device)[None, :, :, None].expand(B, H, S, D))


def from_plan_order(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`to_plan_order` (works on ``[B, H, S, D]`` or ``[B, H, S]``)."""
    if perm is None:
        return x
    squeeze = x.dim() == 3
    if squeeze:
        x = x[..., None]
    B, H, S, D = x.shape
    out = torch.empty_like(x)
    if perm.shape[0] == 1:
        out = out.index_copy(2, perm[0].to(x.device), x) if x.requires_grad else out.index_copy_(2, perm[0].to(x.device), x)
    else:
        out.scatter_(2, perm.to(x.device)[None, :, :, None].expand(B, H, S, D), x)
    return out[..., 0] if squeeze else out
