"""Block mean pooling of Q/K/V in plan order.

Used by :class:`vidattn.patterns.rectified.RectifiedSparse` (pooled scores, pooled K/V columns).
On CUDA the fused one-pass Triton kernel (:mod:`vidattn.kernels.pooling_triton`) runs; the
vectorized PyTorch code below is the path everywhere else and the reference it is tested against. Blocks are consecutive runs of ``block``
tokens of the (optionally permuted) sequence; the last block may be short and is averaged over
its real tokens only.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["block_counts", "block_mean_pool", "block_moments", "block_mean_absdev", "block_masked_mean"]


def block_counts(seq_len: int, block: int, device=None) -> torch.Tensor:
    """Int64 ``[ceil(S / block)]``: number of real tokens in each block."""
    if block < 1 or seq_len < 1:
        raise ValueError(f"block and seq_len must be >= 1, got block={block}, seq_len={seq_len}")
    nb = -(-seq_len // block)
    starts = torch.arange(nb, device=device) * block
    return torch.clamp(seq_len - starts, max=block)


def _triton_pool(x: torch.Tensor, block: int, perm: Optional[torch.Tensor], mode: int):
    """The fused Triton kernel for CUDA tensors it supports, else None (use the torch path).
    The kernel has no autograd: an input tracked by autograd takes the (differentiable) torch path."""
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return None
    if not (isinstance(x, torch.Tensor) and x.is_cuda and x.dim() == 4 and isinstance(block, int)
            and 16 <= block <= 256 and not block & (block - 1) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return None
    try:
        from vidattn.kernels.pooling_triton import block_pool_triton
    except ImportError:  # pragma: no cover - triton missing
        return None
    return block_pool_triton(x, block, perm, mode)


def _blocked(x: torch.Tensor, block: int, perm: Optional[torch.Tensor]):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor [B, S, H, D], got {getattr(x, 'shape', type(x))}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    B, S, H, D = x.shape
    xh = x.transpose(1, 2).float()  # [B, H, S, D]
    if perm is not None:
        if perm.dim() != 2 or perm.shape[-1] != S or perm.shape[0] not in (1, H):
            raise ValueError(f"perm must be [1 or H, S] = [.., {S}], got {tuple(perm.shape)}")
        idx = perm.to(x.device).expand(H, S)
        xh = torch.gather(xh, 2, idx[None, :, :, None].expand(B, H, S, D))
    nb = -(-S // block)
    xh = torch.nn.functional.pad(xh, (0, 0, 0, nb * block - S))
    return xh.view(B, H, nb, block, D), block_counts(S, block, x.device)


def _block_spread(x: torch.Tensor, block: int, perm: Optional[torch.Tensor], squared: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block mean and the per-channel mean of squared (variance) or absolute deviations from it
    over each block's real tokens; the fused kernel on CUDA, vectorized torch elsewhere."""
    fused = _triton_pool(x, block, perm, 2 if squared else 1)
    if fused is not None:
        return fused
    xb, cnt = _blocked(x, block, perm)
    c = cnt[None, None, :, None].to(xb.dtype)
    mean = xb.sum(3) / c
    S = x.shape[1]
    valid = (torch.arange(xb.shape[2] * block, device=x.device) < S).view(xb.shape[2], block)
    dev = xb - mean[:, :, :, None]
    dev = dev * dev if squared else dev.abs()
    return mean, (dev * valid[None, None, :, :, None]).sum(3) / c


def block_mean_pool(x: torch.Tensor, block: int, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of each block of tokens.

    Args:
        x: ``[B, S, H, D]`` any float dtype.
        block: tokens per block.
        perm: optional LongTensor ``[1 or H, S]``: pool in plan order ``x[:, perm[h]]``.
    Returns:
        float32 ``[B, H, ceil(S / block), D]``.
    """
    fused = _triton_pool(x, block, perm, 0)
    if fused is not None:
        return fused[0]
    xb, cnt = _blocked(x, block, perm)
    return xb.sum(3) / cnt[None, None, :, None].to(xb.dtype)


def block_moments(x: torch.Tensor, block: int, perm: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-block mean and (biased) per-channel variance.

    Args: as :func:`block_mean_pool`.
    Returns:
        ``(mean, var)``: float32 ``[B, H, NB, D]`` each.
    """
    return _block_spread(x, block, perm, squared=True)


def block_mean_absdev(x: torch.Tensor, block: int, perm: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-block mean and per-channel mean absolute deviation from it (real tokens only).

    Args: as :func:`block_mean_pool`.
    Returns:
        ``(mean, mad)``: float32 ``[B, H, NB, D]`` each, ``mad[.., c] = mean_i |x_i[c] - mean[c]|``
        over the block's real tokens (the statistic RectifiedSparse's gain-vs-error test uses).
    """
    return _block_spread(x, block, perm, squared=False)


def block_masked_mean(x: torch.Tensor, block: int, token_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-block mean over the tokens selected by ``token_mask`` only (natural token order).

    Args:
        x: ``[B, S, H, D]`` any float dtype.
        block: tokens per block.
        token_mask: BoolTensor ``[S]``: tokens that take part.
    Returns:
        ``(mean, count)``: float32 ``[B, H, NB, D]`` (0 for a block with no selected token) and
        int64 ``[NB]`` selected tokens per block.
    """
    xb, _ = _blocked(x, block, None)
    S = x.shape[1]
    if not isinstance(token_mask, torch.Tensor) or token_mask.shape != (S,) or token_mask.dtype != torch.bool:
        raise ValueError(f"token_mask must be a BoolTensor [S={S}], got {getattr(token_mask, 'shape', token_mask)}")
    nb = xb.shape[2]
    m = torch.nn.functional.pad(token_mask.to(x.device), (0, nb * block - S)).view(nb, block)
    cnt = m.sum(-1)
    mean = (xb * m[None, None, :, :, None]).sum(3) / cnt.clamp_min(1)[None, None, :, None].to(xb.dtype)
    return mean, cnt
